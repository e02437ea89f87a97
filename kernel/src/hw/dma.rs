//! DMA memory for drivers: zeroed, physically contiguous frames from the
//! kernel's frame allocator. RAM is identity-mapped write-back (x86 DMA is
//! cache-coherent), so a frame's physical address is also its virtual one.

use fractos_kernel::frames::{FrameAllocator, FRAME_SIZE};
use spin::Mutex;

/// The frame allocator, handed over once the kernel's page tables are built.
static FRAMES: Mutex<Option<FrameAllocator>> = Mutex::new(None);

/// Makes `frames` the source of DMA memory (and of any later frames).
pub fn install(frames: FrameAllocator) {
    *FRAMES.lock() = Some(frames);
}

/// Allocates `pages` zeroed, contiguous, page-aligned frames and returns
/// their (physical = virtual) address; `None` when out of memory or before
/// [`install`].
pub fn alloc_zeroed(pages: usize) -> Option<u64> {
    let mut guard = FRAMES.lock();
    let frames = guard.as_mut()?;
    let addr = frames.alloc_contiguous(pages as u64, FRAME_SIZE).ok()?;
    // SAFETY: the frames are fresh from the bump allocator (never handed
    // out before, never freed), lie in usable RAM that the kernel's page
    // tables identity-map writable, and span exactly `pages` frames.
    unsafe { core::ptr::write_bytes(addr as *mut u8, 0, pages * FRAME_SIZE as usize) };
    Some(addr)
}

/// Frames allocated so far and bytes still free (after [`install`]).
pub fn usage() -> Option<(u64, u64)> {
    FRAMES
        .lock()
        .as_ref()
        .map(|f| (f.allocated_frames(), f.remaining_bytes()))
}
