//! The hardware boundary: DMA memory and controller registers.

use core::ptr::NonNull;

/// A physical (bus) address, as the controller sees it.
pub type PhysAddr = u64;

/// Size of a memory page: the driver runs the controller with
/// `CC.MPS = 0`, i.e. 4 KiB pages, for queues and PRPs.
pub const PAGE_SIZE: usize = 4096;

/// What the driver needs from the platform: DMA memory with both its
/// physical and virtual address, and 32-bit access to the controller's
/// registers (BAR0). The kernel implements it over its frame allocator and
/// the uncached identity mapping of PCI BARs; the host tests implement it
/// over the fake device in [`fake`](crate::fake).
///
/// Physical↔virtual translation is given by [`Hal::dma_alloc`] returning
/// both addresses of every allocation (the driver keeps them together in
/// [`Dma`]); data buffers of I/O commands are passed by physical address.
///
/// # Implementation safety
///
/// Implementations must ensure that:
///
/// - [`dma_alloc`](Hal::dma_alloc) returns `pages` physically contiguous,
///   page-aligned, zeroed pages that nothing else uses until they are passed
///   to [`dma_dealloc`](Hal::dma_dealloc); the virtual address is valid for
///   reads and writes of `pages * PAGE_SIZE` bytes and maps exactly those
///   physical pages, in a mapping coherent with device DMA;
/// - [`read_reg32`](Hal::read_reg32) and [`write_reg32`](Hal::write_reg32)
///   access the 32-bit register at `offset` in the controller's BAR0 with a
///   single uncached, non-reordered (volatile) access.
pub unsafe trait Hal: Clone {
    /// Allocates `pages` contiguous zeroed pages for DMA and returns their
    /// physical and virtual addresses, or `None` when out of memory.
    fn dma_alloc(&self, pages: usize) -> Option<(PhysAddr, NonNull<u8>)>;

    /// Frees an allocation made by [`dma_alloc`](Hal::dma_alloc).
    ///
    /// # Safety
    ///
    /// `paddr`, `vaddr` and `pages` must be exactly those of one earlier
    /// `dma_alloc` on this HAL that was not freed yet, and the controller
    /// must no longer access that memory.
    unsafe fn dma_dealloc(&self, paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize);

    /// Reads the 32-bit controller register at byte `offset` of BAR0.
    fn read_reg32(&self, offset: usize) -> u32;

    /// Writes the 32-bit controller register at byte `offset` of BAR0.
    ///
    /// # Safety
    ///
    /// A register write can make the controller read or write any physical
    /// memory (queue base addresses, doorbells that hand it commands whose
    /// PRPs name memory). The caller must ensure that every address the
    /// controller may use as a result is DMA memory owned by the driver, or
    /// a data buffer the caller of the driver lent it for that command.
    unsafe fn write_reg32(&self, offset: usize, value: u32);
}

/// Volatile 32-bit access to a mapped register window, for [`Hal`]
/// implementations on real hardware (the kernel maps PCI BARs uncached).
#[derive(Clone, Copy, Debug)]
pub struct MmioRegisters {
    base: NonNull<u32>,
    len: usize,
}

impl MmioRegisters {
    /// Wraps the register window of `len` bytes at `base`.
    ///
    /// # Safety
    ///
    /// `base` must be 4-byte aligned and map `len` bytes of device registers
    /// uncached for as long as the returned value (or a copy) is used, and
    /// nothing else may treat that memory as ordinary Rust memory.
    pub unsafe fn new(base: NonNull<u8>, len: usize) -> Self {
        Self {
            base: base.cast(),
            len,
        }
    }

    /// Reads the register at byte `offset`.
    ///
    /// # Panics
    ///
    /// If `offset` is not 4-byte aligned or outside the window.
    pub fn read32(&self, offset: usize) -> u32 {
        self.check(offset);
        // SAFETY: `new`'s contract makes `base..base+len` mapped registers;
        // `check` keeps the aligned access inside that window.
        unsafe { self.base.add(offset / 4).as_ptr().read_volatile() }
    }

    /// Writes the register at byte `offset`.
    ///
    /// # Panics
    ///
    /// If `offset` is not 4-byte aligned or outside the window.
    pub fn write32(&self, offset: usize, value: u32) {
        self.check(offset);
        // SAFETY: as in `read32`; what the device does with the value is the
        // concern of `Hal::write_reg32`'s caller.
        unsafe { self.base.add(offset / 4).as_ptr().write_volatile(value) }
    }

    fn check(&self, offset: usize) {
        assert!(
            offset % 4 == 0 && offset + 4 <= self.len,
            "register offset {offset:#x} outside the {:#x}-byte window",
            self.len
        );
    }
}

/// One DMA allocation, freed on drop.
#[derive(Debug)]
pub struct Dma<H: Hal> {
    hal: H,
    paddr: PhysAddr,
    vaddr: NonNull<u8>,
    pages: usize,
}

impl<H: Hal> Dma<H> {
    /// Allocates `pages` zeroed, physically contiguous pages.
    pub fn new(hal: &H, pages: usize) -> Result<Self, crate::NvmeError> {
        let pages = pages.max(1);
        let (paddr, vaddr) = hal
            .dma_alloc(pages)
            .ok_or(crate::NvmeError::DmaAlloc { pages })?;
        Ok(Self {
            hal: hal.clone(),
            paddr,
            vaddr,
            pages,
        })
    }

    /// Physical address of the first byte.
    pub fn paddr(&self) -> PhysAddr {
        self.paddr
    }

    /// Virtual address of the first byte.
    pub fn vaddr(&self) -> NonNull<u8> {
        self.vaddr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.pages * PAGE_SIZE
    }

    /// Always false: an allocation has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Copies `data` into the buffer at byte `offset`. Do not call while a
    /// command that the controller may write into this buffer is in flight:
    /// the copy would race with the device.
    ///
    /// # Panics
    ///
    /// If the range exceeds the buffer.
    pub fn write_bytes(&mut self, offset: usize, data: &[u8]) {
        assert!(offset
            .checked_add(data.len())
            .is_some_and(|e| e <= self.len()));
        // SAFETY: the range is inside the allocation (checked above), which
        // `Hal::dma_alloc` guarantees valid for writes; `data` is ordinary
        // memory and cannot overlap DMA memory that the HAL handed out.
        unsafe {
            core::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.vaddr.as_ptr().add(offset),
                data.len(),
            )
        }
    }

    /// Copies bytes at `offset` of the buffer into `out` (same caveat as
    /// [`write_bytes`](Dma::write_bytes)).
    ///
    /// # Panics
    ///
    /// If the range exceeds the buffer.
    pub fn read_bytes(&self, offset: usize, out: &mut [u8]) {
        assert!(offset
            .checked_add(out.len())
            .is_some_and(|e| e <= self.len()));
        // SAFETY: as in `write_bytes`, for reads.
        unsafe {
            core::ptr::copy_nonoverlapping(
                self.vaddr.as_ptr().add(offset),
                out.as_mut_ptr(),
                out.len(),
            )
        }
    }

    /// Volatile read of the `u32` at byte `offset` (4-byte aligned).
    pub(crate) fn read_u32(&self, offset: usize) -> u32 {
        assert!(offset % 4 == 0 && offset + 4 <= self.len());
        // SAFETY: aligned (page-aligned base, aligned offset) and inside the
        // allocation; volatile because the device writes this memory.
        unsafe {
            self.vaddr
                .as_ptr()
                .add(offset)
                .cast::<u32>()
                .read_volatile()
        }
    }

    /// Volatile write of the `u32` at byte `offset` (4-byte aligned).
    pub(crate) fn write_u32(&mut self, offset: usize, value: u32) {
        assert!(offset % 4 == 0 && offset + 4 <= self.len());
        // SAFETY: as in `read_u32`.
        unsafe {
            self.vaddr
                .as_ptr()
                .add(offset)
                .cast::<u32>()
                .write_volatile(value)
        }
    }

    /// Volatile write of the `u64` at byte `offset` (8-byte aligned).
    pub(crate) fn write_u64(&mut self, offset: usize, value: u64) {
        assert!(offset % 8 == 0 && offset + 8 <= self.len());
        // SAFETY: as in `read_u32`.
        unsafe {
            self.vaddr
                .as_ptr()
                .add(offset)
                .cast::<u64>()
                .write_volatile(value)
        }
    }
}

impl<H: Hal> Drop for Dma<H> {
    fn drop(&mut self) {
        // SAFETY: the three values come from our own `dma_alloc` and are freed
        // once. Whoever hands a `Dma` to the controller keeps it alive while
        // the controller may use it (queues live as long as the controller,
        // which is disabled before they are dropped; data buffers are the
        // caller's, see `NvmeController`'s docs).
        unsafe { self.hal.dma_dealloc(self.paddr, self.vaddr, self.pages) }
    }
}
