//! Shared-memory slots over `ivshmem-plain` devices.
//!
//! Each `ivshmem-plain` PCI function (vendor `0x1af4`, device `0x1110`)
//! has a RAM BAR (BAR2) that QEMU backs with a host file, one file per
//! slot (`fractos up --shm-slots N`). [`BarMemory`] is that BAR as
//! [`SharedMemory`]: bounds-checked, atomic control words, copies in and
//! out. [`SlotPool`] runs one [`SlotHost`] per device (the slot layout and
//! the attach protocol are `fractos_transport::slot`'s) and hands every
//! attached process's channel to the controller service; the kernel's
//! event loop polls it like a NIC.
//!
//! Whatever a process writes into its slot, nothing here panics or
//! reaches outside the BAR: every access is checked against the BAR's
//! length, and the header and ring are validated by the transport.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use fractos_transport::ring::SharedMemory;
use fractos_transport::slot::{SlotChannel, SlotEvent, SlotHost, NONCE_LEN};
use log::{info, warn};
use sha2::{Digest, Sha256};

use crate::pci::PciFunction;

/// Red Hat / virtio vendor id (QEMU's ivshmem).
pub const IVSHMEM_VENDOR: u16 = 0x1af4;
/// `ivshmem-plain` (and `ivshmem-doorbell`) device id.
pub const IVSHMEM_DEVICE: u16 = 0x1110;
/// The BAR holding the shared memory.
pub const IVSHMEM_BAR: usize = 2;

/// The shared-memory windows `(function, address, size)` of every
/// `ivshmem` device found.
pub fn ivshmem_windows(devices: &[PciFunction]) -> Vec<(PciFunction, u64, u64)> {
    devices
        .iter()
        .filter(|d| d.vendor == IVSHMEM_VENDOR && d.device == IVSHMEM_DEVICE)
        .filter_map(|d| d.memory_bar(IVSHMEM_BAR).map(|(a, s)| (*d, a, s)))
        .collect()
}

/// A mapped window of memory shared with another party (an ivshmem BAR)
/// as [`SharedMemory`]. Copies share the window.
#[derive(Clone, Copy, Debug)]
pub struct BarMemory {
    base: usize,
    len: usize,
    /// The address devices use for `base`, if they may reach the window.
    device: Option<u64>,
}

impl BarMemory {
    /// The `len` bytes at `base`.
    ///
    /// # Safety
    ///
    /// `[base, base + len)` must be mapped, readable and writable for as
    /// long as any copy of the value is used, and hold no Rust object
    /// (only this type and the other party access it). `base` must be
    /// 8-aligned.
    pub unsafe fn new(base: *mut u8, len: usize) -> Self {
        BarMemory {
            base: base as usize,
            len,
            device: None,
        }
    }

    /// The same window, which DMA-capable devices reach at `device` (its
    /// guest-physical address: an ivshmem BAR is RAM in the guest-physical
    /// address space, so an NVMe controller can write it). Devices are
    /// then given addresses inside it
    /// ([`SharedMemory::device_address`]).
    pub fn with_device_address(self, device: u64) -> Self {
        BarMemory {
            device: Some(device),
            ..self
        }
    }

    /// The start of `[offset, offset + n)` if it lies inside the window.
    fn span(&self, offset: usize, n: usize) -> Option<*mut u8> {
        let end = offset.checked_add(n)?;
        (end <= self.len).then(|| (self.base + offset) as *mut u8)
    }

    fn word(&self, offset: usize) -> Option<&AtomicU64> {
        if offset % 8 != 0 {
            return None;
        }
        let p = self.span(offset, 8)?;
        // SAFETY: `p` is 8-aligned (base and offset are) and its 8 bytes
        // are inside the window, which `new`'s contract keeps mapped and
        // free of Rust objects; only atomics and byte copies touch it.
        Some(unsafe { AtomicU64::from_ptr(p.cast()) })
    }
}

impl SharedMemory for BarMemory {
    fn len(&self) -> usize {
        self.len
    }

    fn load_u64(&self, offset: usize) -> u64 {
        self.word(offset)
            .map_or(0, |w| u64::from_le(w.load(Ordering::Acquire)))
    }

    fn store_u64(&self, offset: usize, value: u64) {
        if let Some(w) = self.word(offset) {
            w.store(value.to_le(), Ordering::Release);
        }
    }

    fn fence(&self) {
        core::sync::atomic::fence(Ordering::SeqCst);
    }

    fn read(&self, offset: usize, out: &mut [u8]) {
        match self.span(offset, out.len()) {
            Some(p) => {
                // SAFETY: `[p, p + out.len())` is inside the window (checked
                // by `span`) and `out` is our own buffer, so they do not
                // overlap. The other party may write concurrently; the
                // bytes are copied out before anything interprets them.
                unsafe { core::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
                core::sync::atomic::fence(Ordering::Acquire);
            }
            None => out.fill(0),
        }
    }

    fn write(&self, offset: usize, data: &[u8]) {
        if let Some(p) = self.span(offset, data.len()) {
            core::sync::atomic::fence(Ordering::Release);
            // SAFETY: `[p, p + data.len())` is inside the window (checked
            // by `span`); `data` is ours and does not overlap it.
            unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        }
    }

    fn device_address(&self, offset: usize, len: usize) -> Option<u64> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        self.device?.checked_add(offset as u64)
    }
}

/// Fresh nonces: SHA-256 of a secret seed, a counter and a caller value
/// (the time), so no two resets ever hand out the same nonce.
pub struct NonceSource {
    seed: [u8; 32],
    counter: u64,
}

impl NonceSource {
    /// Nonces derived from `seed` (keep it secret).
    pub fn new(seed: [u8; 32]) -> Self {
        NonceSource { seed, counter: 0 }
    }

    /// The next nonce, mixed with `extra`.
    pub fn next(&mut self, extra: u64) -> [u8; NONCE_LEN] {
        self.counter += 1;
        let mut h = Sha256::new();
        h.update(b"fractos-slot-nonce");
        h.update(self.seed);
        h.update(self.counter.to_le_bytes());
        h.update(extra.to_le_bytes());
        h.finalize().into()
    }
}

/// One slot and where it came from.
struct Slot<M> {
    name: String,
    host: SlotHost<M>,
}

/// Every slot of the appliance. See the module documentation.
pub struct SlotPool<M> {
    slots: Vec<Slot<M>>,
    nonces: NonceSource,
}

/// Counters of a [`SlotPool`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotStats {
    /// Slots.
    pub slots: usize,
    /// Slots with a process attached.
    pub attached: usize,
    /// Attaches accepted.
    pub attaches: u64,
    /// Attaches refused.
    pub refusals: u64,
    /// Free slots whose rewritten header was published again.
    pub repairs: u64,
}

impl<M: SharedMemory + Clone + 'static> SlotPool<M> {
    /// No slots yet; nonces from `seed`.
    pub fn new(seed: [u8; 32]) -> Self {
        SlotPool {
            slots: Vec::new(),
            nonces: NonceSource::new(seed),
        }
    }

    /// Takes over the slot `mem` (resets its header), named `name` in logs.
    pub fn add(&mut self, name: &str, mem: M, now_ns: u64) {
        let nonce = self.nonces.next(now_ns);
        self.slots.push(Slot {
            name: name.into(),
            host: SlotHost::new(mem, nonce),
        });
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are no slots.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Counters.
    pub fn stats(&self) -> SlotStats {
        let mut s = SlotStats {
            slots: self.slots.len(),
            ..SlotStats::default()
        };
        for slot in &self.slots {
            s.attached += usize::from(slot.host.is_attached());
            s.attaches += slot.host.attaches;
            s.refusals += slot.host.refusals;
            s.repairs += slot.host.repairs;
        }
        s
    }

    /// One look at every slot at `now_ns`; each newly attached process's
    /// channel goes to `connect`. Returns whether anything changed.
    pub fn poll(&mut self, now_ns: u64, mut connect: impl FnMut(Box<SlotChannel<M>>)) -> bool {
        let mut moved = false;
        for slot in &mut self.slots {
            let nonces = &mut self.nonces;
            let Some(ev) = slot.host.poll(now_ns, || nonces.next(now_ns)) else {
                continue;
            };
            moved = true;
            match ev {
                SlotEvent::Attached(ch) => {
                    info!("shm: slot {}: process attached", slot.name);
                    connect(Box::new(ch));
                }
                SlotEvent::Refused(e) => warn!("shm: slot {}: attach refused: {e}", slot.name),
                SlotEvent::Detached { dead: true } => {
                    warn!(
                        "shm: slot {}: process stopped its heartbeat; detached",
                        slot.name
                    )
                }
                SlotEvent::Detached { dead: false } => {
                    info!("shm: slot {}: process detached", slot.name)
                }
            }
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fractos_transport::ring::RING_MIN;
    use fractos_transport::slot::{SlotClient, SLOT_ADDR_BASE};
    use fractos_transport::Channel;

    fn buffer(len: usize) -> (Vec<u64>, BarMemory) {
        let mut words = vec![0u64; len / 8];
        // SAFETY: the vector outlives every use in the test and is only
        // reached through the BarMemory from here on.
        let m = unsafe { BarMemory::new(words.as_mut_ptr().cast(), len) };
        (words, m)
    }

    #[test]
    fn bar_memory_is_bounds_checked() {
        let (_keep, m) = buffer(64);
        m.store_u64(56, 0x1122);
        assert_eq!(m.load_u64(56), 0x1122);
        m.store_u64(60, 1);
        m.store_u64(64, 1);
        m.store_u64(usize::MAX - 3, 1);
        assert_eq!(m.load_u64(60), 0);
        assert_eq!(m.load_u64(64), 0);
        assert_eq!(m.load_u64(usize::MAX - 7), 0);
        m.write(62, b"ab");
        let mut two = [9u8; 2];
        m.read(62, &mut two);
        assert_eq!(&two, b"ab");
        m.write(63, b"ab");
        m.write(usize::MAX, b"ab");
        let mut three = [9u8; 3];
        m.read(62, &mut three);
        assert_eq!(three, [0; 3], "out of range reads as zeros");
        m.read(usize::MAX, &mut three);
        assert_eq!(three, [0; 3]);
    }

    #[test]
    fn device_addresses_are_bounded_by_the_window_and_the_slot_memory() {
        let (_keep, m) = buffer(1 << 20);
        assert_eq!(m.device_address(0, 8), None);
        let m = m.with_device_address(0xfe00_0000);
        assert_eq!(m.device_address(4096, 8), Some(0xfe00_1000));
        assert_eq!(m.device_address((1 << 20) - 8, 8), Some(0xfe0f_fff8));
        assert_eq!(m.device_address((1 << 20) - 8, 9), None);
        assert_eq!(m.device_address(usize::MAX, 2), None);
        // Through an attached slot's direct memory: registered addresses
        // inside the process's memory area only.
        let mut pool = SlotPool::new([1; 32]);
        pool.add("00:05.0", m, 0);
        let (client, _ring) = SlotClient::begin(m, RING_MIN, |_| {}).unwrap();
        let mut got = Vec::new();
        pool.poll(1, |c| got.push(c));
        let layout = client.layout();
        let mut ch = got.pop().unwrap();
        let dm = Channel::<()>::direct_memory(&mut *ch).unwrap();
        let at = |x: usize| Some(0xfe00_0000 + (layout.mem + x) as u64);
        assert_eq!(dm.device_address(SLOT_ADDR_BASE, 4096), at(0));
        assert_eq!(dm.device_address(SLOT_ADDR_BASE + 12, 100), at(12));
        let len = layout.mem_len;
        assert_eq!(dm.device_address(SLOT_ADDR_BASE, len), at(0));
        assert_eq!(dm.device_address(SLOT_ADDR_BASE, len + 1), None);
        assert_eq!(
            dm.device_address(SLOT_ADDR_BASE - 1, 2),
            None,
            "the ring is not"
        );
        assert_eq!(dm.device_address(u64::MAX, 2), None);
    }

    #[test]
    fn a_pool_attaches_a_process_and_renonces_after_it_leaves() {
        let (_keep, m) = buffer(1 << 20);
        let mut pool = SlotPool::new([1; 32]);
        pool.add("00:05.0", m, 0);
        let mut got = Vec::new();
        assert!(!pool.poll(1, |c| got.push(c)));
        let (client, _ring) = SlotClient::begin(m, RING_MIN, |_| {}).unwrap();
        assert!(pool.poll(2, |c| got.push(c)));
        assert_eq!(client.outcome(), Some(Ok(())));
        assert_eq!(pool.stats().attached, 1);
        let mut ch = got.pop().unwrap();
        let dm = Channel::<()>::direct_memory(&mut *ch).unwrap();
        dm.write(&mut (), SLOT_ADDR_BASE, b"hi").unwrap();
        assert_eq!(
            dm.device_address(SLOT_ADDR_BASE, 8),
            None,
            "no device address"
        );
        drop(ch);
        assert!(pool.poll(3, |c| got.push(c)));
        assert_eq!(pool.stats().attached, 0);
        // The old echo is stale now.
        let (c2, _) = SlotClient::begin(m, RING_MIN, |n| *n = [0; 32]).unwrap();
        pool.poll(4, |c| got.push(c));
        assert!(c2.outcome().unwrap().is_err());
        assert_eq!(pool.stats().refusals, 1);
        let mut n = NonceSource::new([0; 32]);
        assert_ne!(n.next(0), n.next(0));
    }
}
