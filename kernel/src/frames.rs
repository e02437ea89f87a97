//! Physical frame allocator built from the boot memory map.
//!
//! A bump allocator over the usable regions, skipping reserved ranges (the
//! kernel image, the first MiB). The appliance allocates its long-lived
//! structures once at boot (page tables, heap, DMA rings) and never frees
//! frames, so a bump allocator is the right shape: O(1), no metadata.

use fractos_loader::{MemoryKind, MemoryMap};

/// Size of a frame.
pub const FRAME_SIZE: u64 = 4096;

/// Most usable regions tracked.
const MAX_REGIONS: usize = 64;
/// Most reserved ranges.
const MAX_RESERVED: usize = 8;

/// Frame allocation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not enough free contiguous memory.
    #[error("out of physical memory allocating {bytes} bytes: give the appliance more RAM (qemu -m / fractos up --memory)")]
    OutOfMemory {
        /// The request size.
        bytes: u64,
    },
    /// Too many reserved ranges were given.
    #[error("too many reserved ranges (at most {MAX_RESERVED})")]
    TooManyReserved,
}

/// Bump allocator over usable physical memory.
#[derive(Debug, Clone)]
pub struct FrameAllocator {
    regions: [(u64, u64); MAX_REGIONS],
    n_regions: usize,
    reserved: [(u64, u64); MAX_RESERVED],
    n_reserved: usize,
    idx: usize,
    next: u64,
    allocated: u64,
}

const fn align_up(x: u64, a: u64) -> u64 {
    (x + a - 1) & !(a - 1)
}

impl FrameAllocator {
    /// Allocator over the usable regions of `map` (trimmed to whole frames)
    /// minus every `[start, end)` in `reserved`.
    pub fn new(map: &MemoryMap, reserved: &[(u64, u64)]) -> Result<Self, FrameError> {
        if reserved.len() > MAX_RESERVED {
            return Err(FrameError::TooManyReserved);
        }
        let mut a = FrameAllocator {
            regions: [(0, 0); MAX_REGIONS],
            n_regions: 0,
            reserved: [(0, 0); MAX_RESERVED],
            n_reserved: reserved.len(),
            idx: 0,
            next: 0,
            allocated: 0,
        };
        a.reserved[..reserved.len()].copy_from_slice(reserved);
        for r in map
            .regions()
            .iter()
            .filter(|r| r.kind == MemoryKind::Usable)
        {
            let start = align_up(r.start, FRAME_SIZE);
            let end = r.end() & !(FRAME_SIZE - 1);
            if end > start && a.n_regions < MAX_REGIONS {
                a.regions[a.n_regions] = (start, end);
                a.n_regions += 1;
            }
        }
        a.next = a.regions[0].0;
        Ok(a)
    }

    /// Allocates `count` physically contiguous frames aligned to `align`
    /// bytes (a power of two ≥ 4096); returns the physical address.
    pub fn alloc_contiguous(&mut self, count: u64, align: u64) -> Result<u64, FrameError> {
        let bytes = count * FRAME_SIZE;
        let align = align.max(FRAME_SIZE);
        while self.idx < self.n_regions {
            let (rstart, rend) = self.regions[self.idx];
            let start = align_up(self.next.max(rstart), align);
            let end = start.saturating_add(bytes);
            if end > rend {
                self.idx += 1;
                if self.idx < self.n_regions {
                    self.next = self.regions[self.idx].0;
                }
                continue;
            }
            if let Some(&(_, rend)) = self.reserved[..self.n_reserved]
                .iter()
                .find(|&&(a, b)| start < b && a < end)
            {
                self.next = rend;
                continue;
            }
            self.next = end;
            self.allocated += count;
            return Ok(start);
        }
        Err(FrameError::OutOfMemory { bytes })
    }

    /// Allocates one frame.
    pub fn alloc(&mut self) -> Result<u64, FrameError> {
        self.alloc_contiguous(1, FRAME_SIZE)
    }

    /// Frames handed out so far.
    pub fn allocated_frames(&self) -> u64 {
        self.allocated
    }

    /// Bytes still available (reserved ranges ahead not subtracted).
    pub fn remaining_bytes(&self) -> u64 {
        if self.idx >= self.n_regions {
            return 0;
        }
        let cur = self.regions[self.idx].1.saturating_sub(self.next);
        cur + self.regions[self.idx + 1..self.n_regions]
            .iter()
            .map(|(a, b)| b - a)
            .sum::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_map() -> MemoryMap {
        let mut m = MemoryMap::new();
        m.push(0, 0x9_fc00, MemoryKind::Usable);
        m.push(0xf_0000, 0x1_0000, MemoryKind::Reserved);
        m.push(0x10_0000, 0x7ee_0000, MemoryKind::Usable);
        m.push(0x7fe_0000, 0x2_0000, MemoryKind::Reserved);
        m
    }

    #[test]
    fn skips_reserved_and_stays_in_usable_memory() {
        let kernel = (0x10_0000, 0x18_0000);
        let mut a = FrameAllocator::new(&qemu_map(), &[(0, 0x10_0000), kernel]).unwrap();
        let f = a.alloc().unwrap();
        assert_eq!(f, 0x18_0000);
        let g = a.alloc().unwrap();
        assert_eq!(g, 0x18_1000);
        let big = a.alloc_contiguous(512, 0x20_0000).unwrap();
        assert_eq!(big % 0x20_0000, 0);
        assert!(big >= 0x18_2000 && big + 512 * 4096 <= 0x7fe_0000);
        assert_eq!(a.allocated_frames(), 514);
    }

    #[test]
    fn runs_out_cleanly() {
        let mut m = MemoryMap::new();
        m.push(0x1000, 0x3000, MemoryKind::Usable);
        m.push(0x10000, 0x1800, MemoryKind::Usable); // one whole frame
        let mut a = FrameAllocator::new(&m, &[]).unwrap();
        assert_eq!(a.remaining_bytes(), 0x4000);
        let got: Vec<u64> = (0..4).map(|_| a.alloc().unwrap()).collect();
        assert_eq!(got, [0x1000, 0x2000, 0x3000, 0x10000]);
        assert_eq!(
            a.alloc(),
            Err(FrameError::OutOfMemory { bytes: FRAME_SIZE })
        );
        assert_eq!(a.remaining_bytes(), 0);
    }

    #[test]
    fn contiguous_request_moves_to_a_region_that_fits() {
        let mut a = FrameAllocator::new(&qemu_map(), &[(0, 0x1000)]).unwrap();
        let f = a.alloc_contiguous(200, FRAME_SIZE).unwrap();
        assert_eq!(f, 0x10_0000, "low region (0x9f frames) is too small");
        assert!(FrameAllocator::new(&qemu_map(), &[(0, 1); 9]).is_err());
    }
}
