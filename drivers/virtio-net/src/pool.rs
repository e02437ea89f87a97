//! Fixed pools of DMA buffer slots for the two queues.
//!
//! Each pool is one DMA region from the [`Hal`], cut into equal slots
//! ([`crate::BUF_LEN`] bytes unless the driver was built for larger frames). A slot is always in exactly one place: on a free/done list, posted
//! to the device under a token (the head descriptor index), or lent to one
//! smoltcp token. Lists are fixed arrays of `N`: nothing allocates after
//! construction.

use core::marker::PhantomData;
use core::ptr::NonNull;

use crate::{BufferDirection, Error, Hal, PhysAddr, PAGE_SIZE};

/// The largest virtio-net header (`virtio_net_hdr` with `num_buffers`).
pub(crate) const NET_HDR_MAX: usize = 12;

/// Pages of DMA memory, freed on drop.
struct DmaRegion<H: Hal> {
    paddr: PhysAddr,
    vaddr: NonNull<u8>,
    pages: usize,
    slots: usize,
    /// Bytes per slot.
    slot_len: usize,
    _hal: PhantomData<H>,
}

impl<H: Hal> DmaRegion<H> {
    fn new(slots: usize, slot_len: usize, direction: BufferDirection) -> Result<Self, Error> {
        let pages = (slots * slot_len).div_ceil(PAGE_SIZE);
        let (paddr, vaddr) = H::dma_alloc(pages, direction);
        if paddr == 0 {
            return Err(Error::Dma { pages });
        }
        Ok(Self {
            paddr,
            vaddr,
            pages,
            slots,
            slot_len,
            _hal: PhantomData,
        })
    }

    fn slot(&self, slot: u16) -> &[u8] {
        let slot = usize::from(slot);
        assert!(slot < self.slots, "slot {slot} out of range");
        let len = self.slot_len;
        // SAFETY: the region is `pages * PAGE_SIZE >= slots * slot_len`
        // bytes of zero-initialised memory owned by this value (HAL
        // implementation safety), so the slot lies inside it. The pool's
        // bookkeeping only asks for slots the device is not writing.
        unsafe { core::slice::from_raw_parts(self.vaddr.as_ptr().add(slot * len), len) }
    }

    fn slot_mut(&mut self, slot: u16) -> &mut [u8] {
        let slot = usize::from(slot);
        assert!(slot < self.slots, "slot {slot} out of range");
        let len = self.slot_len;
        // SAFETY: as in `slot`; `&mut self` makes this the only reference
        // the driver holds into the region.
        unsafe { core::slice::from_raw_parts_mut(self.vaddr.as_ptr().add(slot * len), len) }
    }
}

impl<H: Hal> Drop for DmaRegion<H> {
    fn drop(&mut self) {
        // SAFETY: allocated by `H::dma_alloc` in `new` with these values and
        // not yet freed; the owning driver unset its queues (dropping the
        // virtio-drivers device first) so the device no longer uses it.
        let _ = unsafe { H::dma_dealloc(self.paddr, self.vaddr, self.pages) };
    }
}

/// Receive slots: `N`, all posted except those smoltcp is reading or that
/// wait to be reposted.
pub(crate) struct RxPool<H: Hal, const N: usize> {
    mem: DmaRegion<H>,
    by_token: [Option<u16>; N],
    posted: usize,
    done: [u16; N],
    done_len: usize,
}

impl<H: Hal, const N: usize> RxPool<H, N> {
    pub(crate) fn new(slot_len: usize) -> Result<Self, Error> {
        let mut done = [0; N];
        for (i, d) in done.iter_mut().enumerate() {
            *d =
                u16::try_from(i).map_err(|_| Error::Virtio(virtio_drivers::Error::InvalidParam))?;
        }
        Ok(Self {
            mem: DmaRegion::new(N, slot_len, BufferDirection::DeviceToDriver)?,
            by_token: [None; N],
            posted: 0,
            done,
            done_len: N,
        })
    }

    /// The next slot waiting to be posted (stays listed until `posted`).
    pub(crate) fn next_done(&self) -> Option<u16> {
        self.done_len.checked_sub(1).map(|i| self.done[i])
    }

    /// Records that the slot `next_done` returned is posted under `token`.
    pub(crate) fn posted(&mut self, token: u16, slot: u16) -> Result<(), Error> {
        debug_assert_eq!(self.next_done(), Some(slot));
        self.done_len -= 1;
        let entry = self
            .by_token
            .get_mut(usize::from(token))
            .ok_or(Error::UnknownToken(token))?;
        *entry = Some(slot);
        self.posted += 1;
        Ok(())
    }

    /// Takes the slot posted under `token` back from the device.
    pub(crate) fn take_posted(&mut self, token: u16) -> Result<u16, Error> {
        let slot = self
            .by_token
            .get_mut(usize::from(token))
            .and_then(Option::take)
            .ok_or(Error::UnknownToken(token))?;
        self.posted -= 1;
        Ok(slot)
    }

    /// Lists a slot for reposting.
    pub(crate) fn done(&mut self, slot: u16) {
        // Each of the N slots is in one place only, so the list has room.
        self.done[self.done_len] = slot;
        self.done_len += 1;
    }

    /// Bytes per slot.
    pub(crate) fn slot_len(&self) -> usize {
        self.mem.slot_len
    }

    pub(crate) fn posted_count(&self) -> usize {
        self.posted
    }

    /// Slots waiting to be reposted.
    pub(crate) fn done_count(&self) -> usize {
        self.done_len
    }

    pub(crate) fn slot(&self, slot: u16) -> &[u8] {
        self.mem.slot(slot)
    }

    pub(crate) fn slot_mut(&mut self, slot: u16) -> &mut [u8] {
        self.mem.slot_mut(slot)
    }
}

/// Transmit slots: `N` that cycle free → written → in flight → free, plus
/// one scratch slot (index `N`) for frames that are built and then dropped.
pub(crate) struct TxPool<H: Hal, const N: usize> {
    mem: DmaRegion<H>,
    in_flight: [Option<(u16, u16)>; N],
    free: [u16; N],
    free_len: usize,
}

impl<H: Hal, const N: usize> TxPool<H, N> {
    pub(crate) fn new(slot_len: usize) -> Result<Self, Error> {
        let mut free = [0; N];
        for (i, f) in free.iter_mut().enumerate() {
            *f =
                u16::try_from(i).map_err(|_| Error::Virtio(virtio_drivers::Error::InvalidParam))?;
        }
        Ok(Self {
            mem: DmaRegion::new(N + 1, slot_len, BufferDirection::DriverToDevice)?,
            in_flight: [None; N],
            free,
            free_len: N,
        })
    }

    /// Bytes per slot.
    pub(crate) fn slot_len(&self) -> usize {
        self.mem.slot_len
    }

    pub(crate) fn free_count(&self) -> usize {
        self.free_len
    }

    pub(crate) fn take_free(&mut self) -> Option<u16> {
        self.free_len = self.free_len.checked_sub(1)?;
        Some(self.free[self.free_len])
    }

    pub(crate) fn give_back(&mut self, slot: u16) {
        self.free[self.free_len] = slot;
        self.free_len += 1;
    }

    /// Records a slot posted under `token` with `len` bytes (header included).
    pub(crate) fn sent(&mut self, token: u16, slot: u16, len: usize) -> Result<(), Error> {
        let entry = self
            .in_flight
            .get_mut(usize::from(token))
            .ok_or(Error::UnknownToken(token))?;
        // len <= slot_len <= u16::MAX (checked before the frame was built
        // and at construction) fits in u16.
        *entry = Some((slot, len as u16));
        Ok(())
    }

    /// The slot and length posted under `token`.
    pub(crate) fn in_flight(&self, token: u16) -> Result<(u16, usize), Error> {
        self.in_flight
            .get(usize::from(token))
            .copied()
            .flatten()
            .map(|(slot, len)| (slot, usize::from(len)))
            .ok_or(Error::UnknownToken(token))
    }

    /// Frees the slot of a completed `token`.
    pub(crate) fn complete(&mut self, token: u16) {
        if let Some((slot, _)) = self
            .in_flight
            .get_mut(usize::from(token))
            .and_then(Option::take)
        {
            self.give_back(slot);
        }
    }

    pub(crate) fn slot(&self, slot: u16, len: usize) -> &[u8] {
        &self.mem.slot(slot)[..len]
    }

    pub(crate) fn slot_mut(&mut self, slot: u16) -> &mut [u8] {
        self.mem.slot_mut(slot)
    }

    /// Lets `f` build a frame that will not be sent.
    pub(crate) fn scratch<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        if len <= self.mem.slot_len {
            let scratch = u16::try_from(N).unwrap_or(u16::MAX);
            f(&mut self.mem.slot_mut(scratch)[..len])
        } else {
            // Only for a caller that ignores our MTU; never on the fast path.
            f(&mut alloc::vec![0; len])
        }
    }
}
