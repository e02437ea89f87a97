//! Shared-memory rings: a FractOS channel carried by two single-producer,
//! single-consumer byte rings in memory that a process and its controller
//! both map (a sealed memfd on a Linux host, an ivshmem slot on the
//! appliance).
//!
//! # Layout
//!
//! A ring area starts at some offset `base` of a [`SharedMemory`] (all
//! integers little-endian `u64`, each control word on its own 64-byte
//! cache line):
//!
//! ```text
//! base + 0     magic  "FRACRING" (RING_MAGIC)
//! base + 8     version (RING_VERSION)
//! base + 16    ring capacity C in bytes (a power of two, RING_MIN..=RING_MAX)
//! base + 256   up   ring (process -> controller): head      (written by the process)
//! base + 320                                     tail      (written by the controller)
//! base + 384                                     sleeping  (written by the controller)
//! base + 448                                     closed    (written by the process)
//! base + 512   down ring (controller -> process): head, tail, sleeping, closed (same shape)
//! base + 1024  up   data, C bytes
//! base + 1024 + C  down data, C bytes
//! ```
//!
//! `head` and `tail` are free-running byte counters: the producer has
//! written `head` bytes in total, the consumer has read `tail`; the bytes
//! live at `counter % C`. The rings carry a byte stream
//! ([`crate::Framing::Stream`]): frames are recovered by the
//! [`crate::FrameReader`] as over TCP.
//!
//! # Trust
//!
//! The controller does not trust anything the process can write. Each
//! endpoint keeps its own copy of the counter it owns and reads the other
//! side's counter once per operation; any counter that would put more
//! than `C` bytes in flight (or fewer than zero) is
//! [`RingError::Corrupt`], after which the endpoint refuses every
//! operation. The header is read once, at [`RingEndpoint::open`]. Data
//! bytes are copied out before anything looks at them, so a process that
//! rewrites them concurrently only garbles its own frames, which the frame
//! reader and the wire decoder then reject. A hostile process can get its
//! own channel closed, nothing more.
//!
//! # Waking
//!
//! A consumer that found its ring empty for a while announces that it is
//! going to sleep ([`RingEndpoint::prepare_sleep`]: sets its `sleeping`
//! word, fences, re-checks the ring). A producer that published bytes asks
//! [`RingEndpoint::peer_sleeping`] (fence, then a load) and kicks the
//! consumer through whatever the host offers (an eventfd, nothing on a
//! polled appliance). The fence pair guarantees that either the producer
//! sees the flag or the consumer sees the bytes, so no wake-up is lost; a
//! busy consumer never sets the flag and a busy producer makes no system
//! call.

use alloc::vec::Vec;

/// The ring area's magic number (`b"FRACRING"`, little-endian).
pub const RING_MAGIC: u64 = u64::from_le_bytes(*b"FRACRING");
/// The ring layout version described in this module.
pub const RING_VERSION: u64 = 1;
/// Smallest ring capacity accepted.
pub const RING_MIN: u64 = 4096;
/// Largest ring capacity accepted.
pub const RING_MAX: u64 = 1 << 30;
/// Bytes before the first data byte.
pub const RING_HEADER: usize = 1024;

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_CAPACITY: usize = 16;
const OFF_UP: usize = 256;
const OFF_DOWN: usize = 512;
const OFF_HEAD: usize = 0;
const OFF_TAIL: usize = 64;
const OFF_SLEEPING: usize = 128;
const OFF_CLOSED: usize = 192;

/// Bytes a ring area of capacity `capacity` occupies.
pub const fn ring_area_len(capacity: u64) -> usize {
    RING_HEADER + 2 * capacity as usize
}

/// Memory shared with another party, which may write it at any moment.
///
/// Offsets are relative to the start of the shared memory. Implementations
/// must never access memory outside `0..len()`: an out-of-range call is a
/// bug of the caller, and must read as zeros / write nothing rather than
/// fault. The rings only pass 8-aligned offsets to the `u64` accessors.
pub trait SharedMemory {
    /// Size in bytes.
    fn len(&self) -> usize;

    /// Whether the memory has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Atomic load with acquire ordering of the `u64` at `offset`
    /// (8-aligned, little-endian).
    fn load_u64(&self, offset: usize) -> u64;

    /// Atomic store with release ordering of the `u64` at `offset`.
    fn store_u64(&self, offset: usize, value: u64);

    /// A sequentially consistent fence: orders an earlier store before a
    /// later load (the sleep/wake handshake needs it).
    fn fence(&self);

    /// Copies `out.len()` bytes at `offset` into `out`. The other party
    /// may be writing them: the bytes are whatever was there.
    fn read(&self, offset: usize, out: &mut [u8]);

    /// Copies `data` to `offset`.
    fn write(&self, offset: usize, data: &[u8]);

    /// The address DMA-capable devices use for the `len` bytes at
    /// `offset`, if they are inside the memory and it is physically
    /// contiguous device-visible memory; `None` (the default) otherwise.
    fn device_address(&self, offset: usize, len: usize) -> Option<u64> {
        let _ = (offset, len);
        None
    }
}

/// Why a ring operation failed. The endpoint refuses every later
/// operation once corrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The header's magic number is wrong: not a FractOS ring area.
    #[error("shared memory does not start with a FractOS ring header (magic {found:#x})")]
    BadMagic {
        /// What was there.
        found: u64,
    },
    /// A ring layout this build does not speak.
    #[error("ring layout version {found} is not supported (this build speaks {RING_VERSION}); use matching SDK and controller versions")]
    BadVersion {
        /// What was there.
        found: u64,
    },
    /// The capacity is not a power of two in range, or the area does not
    /// fit the shared memory.
    #[error("ring capacity {capacity} is invalid or does not fit {len} bytes of shared memory (a power of two in 4 KiB..=1 GiB is required)")]
    BadCapacity {
        /// The capacity asked for.
        capacity: u64,
        /// Bytes of shared memory available from the ring's base.
        len: usize,
    },
    /// The other side wrote a counter that cannot be right.
    #[error("the other side corrupted the ring's counters; the channel must be closed")]
    Corrupt,
}

/// Which end of the rings this endpoint is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingSide {
    /// The process: produces on the up ring, consumes the down ring.
    Process,
    /// The controller: produces on the down ring, consumes the up ring.
    Controller,
}

/// One side's view of a ring area: the producer of one ring and the
/// consumer of the other.
#[derive(Debug)]
pub struct RingEndpoint<M> {
    mem: M,
    capacity: u64,
    /// Control block and data offset of the ring this side produces.
    tx_ctl: usize,
    tx_data: usize,
    /// Control block and data offset of the ring this side consumes.
    rx_ctl: usize,
    rx_data: usize,
    /// This side's own counters (never read back from shared memory).
    tx_head: u64,
    rx_tail: u64,
    corrupt: bool,
}

impl<M: SharedMemory> RingEndpoint<M> {
    /// Writes a fresh ring header at `base` (all counters zero) and returns
    /// the process's endpoint. The process does this before it shares the
    /// memory.
    pub fn init(mem: M, base: usize, capacity: u64) -> Result<Self, RingError> {
        check_capacity(&mem, base, capacity)?;
        for off in [OFF_UP, OFF_DOWN] {
            for word in [OFF_HEAD, OFF_TAIL, OFF_SLEEPING, OFF_CLOSED] {
                mem.store_u64(base + off + word, 0);
            }
        }
        mem.store_u64(base + OFF_CAPACITY, capacity);
        mem.store_u64(base + OFF_VERSION, RING_VERSION);
        mem.store_u64(base + OFF_MAGIC, RING_MAGIC);
        Ok(Self::endpoint(mem, base, capacity, RingSide::Process))
    }

    /// Opens a ring area someone else initialised, reading (and
    /// validating) its header once. This side's counters start at zero:
    /// bytes the process produced before the controller opened the area
    /// are received normally.
    pub fn open(mem: M, base: usize, side: RingSide) -> Result<Self, RingError> {
        let magic = mem.load_u64(base + OFF_MAGIC);
        if magic != RING_MAGIC {
            return Err(RingError::BadMagic { found: magic });
        }
        let version = mem.load_u64(base + OFF_VERSION);
        if version != RING_VERSION {
            return Err(RingError::BadVersion { found: version });
        }
        let capacity = mem.load_u64(base + OFF_CAPACITY);
        check_capacity(&mem, base, capacity)?;
        Ok(Self::endpoint(mem, base, capacity, side))
    }

    fn endpoint(mem: M, base: usize, capacity: u64, side: RingSide) -> Self {
        let up = (base + OFF_UP, base + RING_HEADER);
        let down = (base + OFF_DOWN, base + RING_HEADER + capacity as usize);
        let (tx, rx) = match side {
            RingSide::Process => (up, down),
            RingSide::Controller => (down, up),
        };
        RingEndpoint {
            mem,
            capacity,
            tx_ctl: tx.0,
            tx_data: tx.1,
            rx_ctl: rx.0,
            rx_data: rx.1,
            tx_head: 0,
            rx_tail: 0,
            corrupt: false,
        }
    }

    /// The shared memory.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Each ring's capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the other side corrupted the rings (every operation fails).
    pub fn is_corrupt(&self) -> bool {
        self.corrupt
    }

    fn fail(&mut self) -> RingError {
        self.corrupt = true;
        RingError::Corrupt
    }

    /// Copies as much of `data` as fits into the ring this side produces
    /// and publishes it; returns the bytes taken (0 when the ring is
    /// full).
    pub fn send(&mut self, data: &[u8]) -> Result<usize, RingError> {
        if self.corrupt {
            return Err(RingError::Corrupt);
        }
        let tail = self.mem.load_u64(self.tx_ctl + OFF_TAIL);
        let used = self.tx_head.wrapping_sub(tail);
        if used > self.capacity {
            return Err(self.fail());
        }
        let n = (self.capacity - used).min(data.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.copy_in(self.tx_head, &data[..n]);
        self.tx_head = self.tx_head.wrapping_add(n as u64);
        self.mem.store_u64(self.tx_ctl + OFF_HEAD, self.tx_head);
        Ok(n)
    }

    /// Appends at most `max` available bytes of the ring this side
    /// consumes to `out` and frees their space; returns how many (0 when
    /// the ring is empty).
    pub fn recv(&mut self, out: &mut Vec<u8>, max: usize) -> Result<usize, RingError> {
        let avail = self.available()?;
        let n = avail.min(max as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        let start = out.len();
        out.resize(start + n, 0);
        self.copy_out(self.rx_tail, &mut out[start..]);
        self.rx_tail = self.rx_tail.wrapping_add(n as u64);
        self.mem.store_u64(self.rx_ctl + OFF_TAIL, self.rx_tail);
        Ok(n)
    }

    /// Bytes waiting in the ring this side consumes.
    pub fn available(&mut self) -> Result<u64, RingError> {
        if self.corrupt {
            return Err(RingError::Corrupt);
        }
        let head = self.mem.load_u64(self.rx_ctl + OFF_HEAD);
        let avail = head.wrapping_sub(self.rx_tail);
        if avail > self.capacity {
            return Err(self.fail());
        }
        Ok(avail)
    }

    /// Bytes this side produced that the other has not consumed yet.
    pub fn unread(&mut self) -> Result<u64, RingError> {
        if self.corrupt {
            return Err(RingError::Corrupt);
        }
        let tail = self.mem.load_u64(self.tx_ctl + OFF_TAIL);
        let used = self.tx_head.wrapping_sub(tail);
        if used > self.capacity {
            return Err(self.fail());
        }
        Ok(used)
    }

    /// Marks this side's direction finished: once the other side has
    /// drained the ring it sees [`RingEndpoint::peer_closed`].
    pub fn close(&mut self) {
        self.mem.store_u64(self.tx_ctl + OFF_CLOSED, 1);
    }

    /// Whether the other side marked its direction finished. Data it sent
    /// before may still be waiting: drain with [`RingEndpoint::recv`]
    /// first.
    pub fn peer_closed(&self) -> bool {
        self.mem.load_u64(self.rx_ctl + OFF_CLOSED) != 0
    }

    /// Announces that this side is about to sleep until kicked. Returns
    /// `true` if it may sleep now (the ring is still empty after the
    /// announcement), `false` if bytes arrived meanwhile (the flag is
    /// cleared again; receive them). Call [`RingEndpoint::woke`] after
    /// sleeping.
    pub fn prepare_sleep(&mut self) -> Result<bool, RingError> {
        self.mem.store_u64(self.rx_ctl + OFF_SLEEPING, 1);
        self.mem.fence();
        if self.available()? > 0 || self.peer_closed() {
            self.woke();
            return Ok(false);
        }
        Ok(true)
    }

    /// Clears this side's sleeping announcement.
    pub fn woke(&mut self) {
        self.mem.store_u64(self.rx_ctl + OFF_SLEEPING, 0);
    }

    /// After publishing bytes (or closing): whether the other side
    /// announced it sleeps and must be kicked.
    pub fn peer_sleeping(&self) -> bool {
        self.mem.fence();
        self.mem.load_u64(self.tx_ctl + OFF_SLEEPING) != 0
    }

    fn split(&self, counter: u64, len: usize) -> (usize, usize) {
        let pos = (counter & (self.capacity - 1)) as usize;
        let first = len.min(self.capacity as usize - pos);
        (pos, first)
    }

    fn copy_in(&self, counter: u64, data: &[u8]) {
        let (pos, first) = self.split(counter, data.len());
        self.mem.write(self.tx_data + pos, &data[..first]);
        if first < data.len() {
            self.mem.write(self.tx_data, &data[first..]);
        }
    }

    fn copy_out(&self, counter: u64, out: &mut [u8]) {
        let (pos, first) = self.split(counter, out.len());
        let (a, b) = out.split_at_mut(first);
        self.mem.read(self.rx_data + pos, a);
        if !b.is_empty() {
            self.mem.read(self.rx_data, b);
        }
    }
}

fn check_capacity<M: SharedMemory>(mem: &M, base: usize, capacity: u64) -> Result<(), RingError> {
    let room = mem.len().saturating_sub(base);
    let ok = capacity.is_power_of_two()
        && (RING_MIN..=RING_MAX).contains(&capacity)
        && base.is_multiple_of(64)
        && ring_area_len(capacity) <= room;
    if ok {
        Ok(())
    } else {
        Err(RingError::BadCapacity {
            capacity,
            len: room,
        })
    }
}

/// Shared memory on the heap, made of atomics: for tests of anything that
/// runs over rings, and for two threads of one process. Clones share the
/// bytes.
#[derive(Clone, Debug)]
pub struct AtomicMemory {
    words: alloc::sync::Arc<[core::sync::atomic::AtomicU64]>,
    len: usize,
}

impl AtomicMemory {
    /// `len` zero bytes (rounded up to a multiple of 8).
    pub fn new(len: usize) -> Self {
        let words = (0..len.div_ceil(8))
            .map(|_| core::sync::atomic::AtomicU64::new(0))
            .collect();
        AtomicMemory { words, len }
    }

    fn byte(&self, i: usize) -> u8 {
        use core::sync::atomic::Ordering;
        (self.words[i / 8].load(Ordering::Relaxed) >> (8 * (i % 8))) as u8
    }

    fn set_byte(&self, i: usize, v: u8) {
        use core::sync::atomic::Ordering;
        let shift = 8 * (i % 8);
        let _ = self.words[i / 8].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
            Some((w & !(0xff << shift)) | (u64::from(v) << shift))
        });
    }
}

impl SharedMemory for AtomicMemory {
    fn len(&self) -> usize {
        self.len
    }

    fn load_u64(&self, offset: usize) -> u64 {
        match self.words.get(offset / 8) {
            Some(w) if offset.is_multiple_of(8) => w.load(core::sync::atomic::Ordering::Acquire),
            _ => 0,
        }
    }

    fn store_u64(&self, offset: usize, value: u64) {
        if let Some(w) = self
            .words
            .get(offset / 8)
            .filter(|_| offset.is_multiple_of(8))
        {
            w.store(value, core::sync::atomic::Ordering::Release);
        }
    }

    fn fence(&self) {
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    }

    fn read(&self, offset: usize, out: &mut [u8]) {
        for (i, b) in out.iter_mut().enumerate() {
            *b = match offset.checked_add(i) {
                Some(at) if at < self.len => self.byte(at),
                _ => 0,
            };
        }
        core::sync::atomic::fence(core::sync::atomic::Ordering::Acquire);
    }

    fn write(&self, offset: usize, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            if let Some(at) = offset.checked_add(i).filter(|&at| at < self.len) {
                self.set_byte(at, b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn pair(capacity: u64) -> (RingEndpoint<AtomicMemory>, RingEndpoint<AtomicMemory>) {
        let mem = AtomicMemory::new(64 + ring_area_len(capacity));
        let p = RingEndpoint::init(mem.clone(), 64, capacity).unwrap();
        let c = RingEndpoint::open(mem, 64, RingSide::Controller).unwrap();
        (p, c)
    }

    #[test]
    fn bytes_cross_in_both_directions_with_wrap_around() {
        let (mut p, mut c) = pair(RING_MIN);
        let mut sent = Vec::new();
        let mut got = Vec::new();
        // 3000-byte messages wrap the 4096-byte ring on the second send.
        for round in 0..20u8 {
            let msg: Vec<u8> = (0..3000).map(|i| (i as u8).wrapping_add(round)).collect();
            assert_eq!(p.send(&msg).unwrap(), 3000);
            sent.extend_from_slice(&msg);
            assert_eq!(c.recv(&mut got, usize::MAX).unwrap(), 3000);
            let back = c.send(&msg[..100]).unwrap();
            assert_eq!(back, 100);
            let mut echo = Vec::new();
            assert_eq!(p.recv(&mut echo, 64).unwrap(), 64);
            assert_eq!(p.recv(&mut echo, 64).unwrap(), 36);
            assert_eq!(echo, msg[..100]);
        }
        assert_eq!(got, sent);
    }

    #[test]
    fn a_full_ring_takes_only_what_fits_and_an_empty_one_gives_nothing() {
        let (mut p, mut c) = pair(RING_MIN);
        let big = vec![7u8; 5000];
        assert_eq!(p.send(&big).unwrap(), 4096);
        assert_eq!(p.send(&big).unwrap(), 0);
        assert_eq!(p.unread().unwrap(), 4096);
        let mut out = Vec::new();
        assert_eq!(c.recv(&mut out, 1000).unwrap(), 1000);
        assert_eq!(p.send(&big).unwrap(), 1000);
        assert_eq!(c.recv(&mut out, usize::MAX).unwrap(), 4096);
        assert_eq!(c.recv(&mut out, usize::MAX).unwrap(), 0);
        assert_eq!(out, vec![7u8; 5096]);
    }

    #[test]
    fn bad_headers_are_refused_with_the_reason() {
        let mem = AtomicMemory::new(ring_area_len(RING_MIN));
        assert!(matches!(
            RingEndpoint::open(mem.clone(), 0, RingSide::Controller),
            Err(RingError::BadMagic { found: 0 })
        ));
        RingEndpoint::init(mem.clone(), 0, RING_MIN).unwrap();
        mem.store_u64(OFF_VERSION, 9);
        assert_eq!(
            RingEndpoint::open(mem.clone(), 0, RingSide::Controller).unwrap_err(),
            RingError::BadVersion { found: 9 }
        );
        mem.store_u64(OFF_VERSION, RING_VERSION);
        for cap in [0, 3, 5000, RING_MIN * 2, u64::MAX, 1 << 63] {
            mem.store_u64(OFF_CAPACITY, cap);
            assert!(matches!(
                RingEndpoint::open(mem.clone(), 0, RingSide::Controller),
                Err(RingError::BadCapacity { .. })
            ));
        }
        assert!(
            RingEndpoint::init(mem, 8, RING_MIN).is_err(),
            "misaligned base"
        );
    }

    #[test]
    fn hostile_counters_corrupt_the_endpoint_for_good() {
        let (p, mut c) = pair(RING_MIN);
        // The process claims more bytes than the ring holds.
        p.mem.store_u64(p.tx_ctl + OFF_HEAD, RING_MIN + 1);
        let mut out = Vec::new();
        assert_eq!(c.recv(&mut out, usize::MAX), Err(RingError::Corrupt));
        assert!(c.is_corrupt());
        // Even once the counter looks sane again.
        p.mem.store_u64(p.tx_ctl + OFF_HEAD, 0);
        assert_eq!(c.recv(&mut out, usize::MAX), Err(RingError::Corrupt));
        assert_eq!(c.send(b"x"), Err(RingError::Corrupt));
        assert!(out.is_empty());

        // A consumer tail ahead of the producer's head.
        let (mut p, c) = pair(RING_MIN);
        c.mem.store_u64(c.rx_ctl + OFF_TAIL, 10);
        assert_eq!(p.send(b"abc"), Err(RingError::Corrupt));
    }

    #[test]
    fn sleeping_consumers_are_announced_and_data_cancels_the_sleep() {
        let (mut p, mut c) = pair(RING_MIN);
        assert!(!p.peer_sleeping());
        assert!(c.prepare_sleep().unwrap());
        assert!(p.peer_sleeping());
        c.woke();
        assert!(!p.peer_sleeping());
        p.send(b"hi").unwrap();
        assert!(!c.prepare_sleep().unwrap(), "bytes are waiting");
        assert!(!p.peer_sleeping());
        p.close();
        let mut out = Vec::new();
        c.recv(&mut out, 10).unwrap();
        assert!(c.peer_closed());
        assert!(!c.prepare_sleep().unwrap(), "closed rings wake");
    }

    #[test]
    fn two_threads_stream_a_megabyte_in_order() {
        extern crate std;
        let (mut p, mut c) = pair(RING_MIN);
        let total = 1 << 20;
        let t = std::thread::spawn(move || {
            let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
            let mut off = 0;
            while off < data.len() {
                off += p.send(&data[off..(off + 777).min(data.len())]).unwrap();
                std::thread::yield_now();
            }
        });
        let mut got = Vec::new();
        while got.len() < total {
            c.recv(&mut got, 1000).unwrap();
        }
        t.join().unwrap();
        assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
    }
}
