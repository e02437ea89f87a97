//! The kernel's own page tables: RAM identity-mapped write-back, device
//! windows identity-mapped uncached, guard pages (and page 0) left unmapped.

use fractos_kernel::frames::{FrameAllocator, FrameError};
use fractos_loader::{MemoryKind, MemoryMap};
use x86_64::registers::control::{Cr3, Cr3Flags};
use x86_64::structures::paging::mapper::MapToError;
use x86_64::structures::paging::{
    FrameAllocator as XFrameAllocator, Mapper, OffsetPageTable, Page, PageSize, PageTable,
    PageTableFlags as F, PhysFrame, Size2MiB, Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

/// Page-table construction failed.
#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    /// No memory for page tables.
    #[error(transparent)]
    Frames(#[from] FrameError),
    /// Page tables must come from the boot identity map (first 4 GiB).
    #[error("page-table frame at {0:#x} is above 4 GiB: the boot identity map cannot reach it")]
    FrameTooHigh(u64),
}

/// What was mapped, for the boot log.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// 2 MiB pages mapped.
    pub huge: u64,
    /// 4 KiB pages mapped.
    pub small: u64,
    /// Uncached device windows mapped.
    pub mmio_windows: u64,
    /// Guard pages left unmapped.
    pub guards: u64,
}

struct Frames<'a>(&'a mut FrameAllocator);

// SAFETY: every frame returned is fresh from the bump allocator, so unused.
unsafe impl XFrameAllocator<Size4KiB> for Frames<'_> {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        let a = self.0.alloc().ok().filter(|&a| a < 1 << 32)?;
        Some(PhysFrame::containing_address(PhysAddr::new(a)))
    }
}

/// Builds and activates the kernel page tables.
///
/// `guards` are 4 KiB pages that stay unmapped; `mmio` are `(addr, len)`
/// device windows mapped uncached.
pub fn init(
    map: &MemoryMap,
    frames: &mut FrameAllocator,
    guards: &[u64],
    mmio: &[(u64, u64)],
) -> Result<Stats, PagingError> {
    let l4_addr = frames.alloc()?;
    if l4_addr >= 1 << 32 {
        return Err(PagingError::FrameTooHigh(l4_addr));
    }
    // SAFETY: the frame is fresh, identity-mapped by the boot tables, and
    // page-aligned; nothing else refers to it.
    let l4 = unsafe {
        let p = l4_addr as *mut PageTable;
        p.write(PageTable::new());
        &mut *p
    };
    // SAFETY: physical memory is identity-mapped (offset 0) by the boot
    // tables for everything this mapper will touch (frames < 4 GiB).
    let mut mapper = unsafe { OffsetPageTable::new(l4, VirtAddr::new(0)) };
    let mut alloc = Frames(frames);
    let mut stats = Stats {
        guards: guards.len() as u64 + 1,
        ..Stats::default()
    };
    let is_guarded = |lo: u64, hi: u64| lo == 0 || guards.iter().any(|&g| g + 4096 > lo && g < hi);

    let ram = F::PRESENT | F::WRITABLE;
    let dev = F::PRESENT | F::WRITABLE | F::NO_CACHE | F::WRITE_THROUGH;
    // Reserved ranges above 4 GiB are address-space holes (e.g. the
    // HyperTransport window), not memory anyone touches: leave them out.
    for r in map
        .regions()
        .iter()
        .filter(|r| r.kind != MemoryKind::Reserved || r.start < 1 << 32)
    {
        let flags = if r.kind == MemoryKind::Reserved && r.start >= 0x10_0000 {
            dev
        } else {
            ram
        };
        map_range(
            &mut mapper,
            &mut alloc,
            r.start,
            r.end(),
            flags,
            &is_guarded,
            &mut stats,
        )?;
    }
    for &(addr, len) in mmio {
        map_range(
            &mut mapper,
            &mut alloc,
            addr,
            addr + len,
            dev,
            &|_, _| false,
            &mut stats,
        )?;
        stats.mmio_windows += 1;
    }
    // SAFETY: the new tables identity-map all RAM the kernel uses (its image,
    // stacks, heap and loader data are in memory-map regions), so execution
    // continues at the same addresses.
    unsafe {
        Cr3::write(
            PhysFrame::containing_address(PhysAddr::new(l4_addr)),
            Cr3Flags::empty(),
        )
    };
    Ok(stats)
}

fn map_range(
    mapper: &mut OffsetPageTable<'_>,
    alloc: &mut Frames<'_>,
    start: u64,
    end: u64,
    flags: F,
    is_guarded: &dyn Fn(u64, u64) -> bool,
    stats: &mut Stats,
) -> Result<(), PagingError> {
    let mut a = start & !(Size4KiB::SIZE - 1);
    let end = (end + Size4KiB::SIZE - 1) & !(Size4KiB::SIZE - 1);
    while a < end {
        let huge_fits = a % Size2MiB::SIZE == 0 && a + Size2MiB::SIZE <= end;
        if huge_fits && !is_guarded(a, a + Size2MiB::SIZE) {
            let page = Page::<Size2MiB>::containing_address(VirtAddr::new(a));
            let frame = PhysFrame::<Size2MiB>::containing_address(PhysAddr::new(a));
            // SAFETY: identity mapping of physical memory the memory map or
            // a device BAR describes; no existing mapping is changed.
            match unsafe { mapper.map_to(page, frame, flags, alloc) } {
                Ok(f) => {
                    f.ignore();
                    stats.huge += 1;
                }
                Err(e) => check(e)?,
            }
            a += Size2MiB::SIZE;
            continue;
        }
        if !is_guarded(a, a + Size4KiB::SIZE) {
            let page = Page::<Size4KiB>::containing_address(VirtAddr::new(a));
            let frame = PhysFrame::<Size4KiB>::containing_address(PhysAddr::new(a));
            // SAFETY: as above.
            match unsafe { mapper.map_to(page, frame, flags, alloc) } {
                Ok(f) => {
                    f.ignore();
                    stats.small += 1;
                }
                Err(e) => check(e)?,
            }
        }
        a += Size4KiB::SIZE;
    }
    Ok(())
}

/// Overlapping regions (rounded to pages) meet already-mapped pages: fine.
fn check<S: PageSize>(e: MapToError<S>) -> Result<(), PagingError> {
    match e {
        MapToError::FrameAllocationFailed => Err(PagingError::Frames(FrameError::OutOfMemory {
            bytes: Size4KiB::SIZE,
        })),
        MapToError::ParentEntryHugePage | MapToError::PageAlreadyMapped(_) => Ok(()),
    }
}
