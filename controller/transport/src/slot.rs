//! Shared-memory slots: one process's local channel to its controller and
//! its registered memory, in one piece of memory both map (an `ivshmem`
//! device's BAR2 on the appliance, the slot's file under `/dev/shm` in the
//! process).
//!
//! # Layout
//!
//! All integers little-endian `u64`; offsets from the start of the slot.
//!
//! ```text
//! 0      magic "FRACSLOT" (SLOT_MAGIC)             written by the controller
//! 8      version (SLOT_VERSION)                    controller
//! 16     slot size in bytes                        controller
//! 24     generation: +1 at every reset             controller
//! 64     state (SlotState)                         both (see below)
//! 128    liveness counter                          process (+1 while alive)
//! 192    nonce, 32 bytes, fresh at every reset     controller
//! 256    echo of the nonce, 32 bytes               process
//! 320    ring offset                               process
//! 328    ring capacity (each direction)            process
//! 336    memory-area offset                        process
//! 344    memory-area length                        process
//! 4096   (SLOT_HEADER) ring area, then the memory area (placed by the process)
//! ```
//!
//! The ring area is [`crate::ring`]'s layout, initialised by the process.
//! The memory area holds the process's registered regions: registered
//! address `SLOT_ADDR_BASE + x` is byte `x` of the memory area, and the
//! controller reads and writes it directly ([`SlotMemory`]).
//!
//! # Attach
//!
//! 1. The controller resets the slot ([`SlotHost::reset`]): a fresh nonce,
//!    generation + 1, state [`SlotState::Free`].
//! 2. The process ([`SlotClient::begin`]) checks magic, version and size,
//!    reads the nonce and generation, initialises the ring area, writes the
//!    layout words and the echo, then sets state
//!    [`SlotState::Attaching`] (a release store after everything else).
//! 3. The controller ([`SlotHost::poll`]) reads the layout words once,
//!    checks the echo against its nonce and the areas against the slot
//!    (inside it, after the header, not overlapping), opens the ring and
//!    sets [`SlotState::Attached`]; anything wrong sets
//!    [`SlotState::Refused`] with a fresh nonce. The process waits for one
//!    of the two ([`SlotClient::outcome`]).
//! 4. The process's `Attach` frame and token then cross the ring as over
//!    TCP: the slot proves only that the process can read the slot; the
//!    token proves who it is.
//!
//! # Detach and failure
//!
//! The channel closes (and the slot is reset with a fresh nonce, so an old
//! attach can never be replayed) when the process closes its ring, when
//! the ring is corrupt, when the controller drops the channel, or when the
//! liveness counter has not moved for [`SlotHost::liveness_timeout_ns`]
//! (a dead process). A process that rewrites anything in its slot at any
//! time can at most get its own channel closed: the header is read once,
//! counters are validated by the ring, and every direct access is
//! bounds-checked against the memory area read at attach.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};

use fractos_wire::ErrorCode;

use crate::ring::{
    ring_area_len, RingEndpoint, RingError, RingSide, SharedMemory, RING_MAX, RING_MIN,
};
use crate::{Channel, DirectMemory, Framing, NoKick, Received, RingChannel, TransportError};

/// The slot header's magic number (`b"FRACSLOT"`, little-endian).
pub const SLOT_MAGIC: u64 = u64::from_le_bytes(*b"FRACSLOT");
/// The slot layout version described in this module.
pub const SLOT_VERSION: u64 = 1;
/// Bytes of the header; the ring and memory areas start at or after it.
pub const SLOT_HEADER: usize = 4096;
/// Registered address of the first byte of the memory area.
pub const SLOT_ADDR_BASE: u64 = 0x1_0000_0000;
/// Bytes of the nonce (and of its echo).
pub const NONCE_LEN: usize = 32;

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_SIZE: usize = 16;
const OFF_GENERATION: usize = 24;
const OFF_STATE: usize = 64;
const OFF_LIVENESS: usize = 128;
const OFF_NONCE: usize = 192;
const OFF_ECHO: usize = 256;
const OFF_RING: usize = 320;
const OFF_RING_CAP: usize = 328;
const OFF_MEM: usize = 336;
const OFF_MEM_LEN: usize = 344;

/// Where an attach stands, as the state word says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// Reset by the controller; a process may attach.
    Free,
    /// The process wrote its echo and layout and waits.
    Attaching,
    /// The controller accepted: the ring carries the channel.
    Attached,
    /// The controller refused the last attach (wrong echo, bad layout);
    /// the nonce is fresh again, so a process may attach.
    Refused,
    /// Anything else (uninitialised, scribbled).
    Unknown(u64),
}

impl SlotState {
    fn word(self) -> u64 {
        match self {
            SlotState::Free => 1,
            SlotState::Attaching => 2,
            SlotState::Attached => 3,
            SlotState::Refused => 4,
            SlotState::Unknown(w) => w,
        }
    }

    fn of(word: u64) -> Self {
        match word {
            1 => SlotState::Free,
            2 => SlotState::Attaching,
            3 => SlotState::Attached,
            4 => SlotState::Refused,
            w => SlotState::Unknown(w),
        }
    }
}

/// Why a slot cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    /// No controller has set the slot up (wrong file, appliance not booted).
    #[error("not a FractOS slot (magic {found:#x}): is the appliance running with this slot?")]
    BadMagic {
        /// What was there.
        found: u64,
    },
    /// A slot layout this build does not speak.
    #[error("slot layout version {found} is not supported (this build speaks {SLOT_VERSION})")]
    BadVersion {
        /// What was there.
        found: u64,
    },
    /// The controller and the process disagree on the slot's size.
    #[error("the slot header says {header} bytes but {mapped} are mapped")]
    SizeMismatch {
        /// Size in the header.
        header: u64,
        /// Bytes mapped here.
        mapped: usize,
    },
    /// Another process is attached through this slot.
    #[error("the slot is in use by another process")]
    Busy,
    /// The ring or memory area asked for does not fit the slot.
    #[error(
        "ring capacity {ring_capacity} and memory area {mem_len} do not fit a slot of {slot} bytes"
    )]
    Layout {
        /// Ring capacity asked for.
        ring_capacity: u64,
        /// Memory-area bytes asked for.
        mem_len: u64,
        /// Slot size.
        slot: usize,
    },
    /// The controller refused the attach (stale or wrong nonce echo).
    #[error("the controller refused the attach through this slot (stale nonce or bad layout)")]
    Refused,
    /// The ring area is unusable.
    #[error("slot ring: {0}")]
    Ring(#[from] RingError),
}

fn read_nonce<M: SharedMemory>(mem: &M, at: usize) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    mem.read(at, &mut n);
    n
}

fn check_header<M: SharedMemory>(mem: &M) -> Result<(), SlotError> {
    let magic = mem.load_u64(OFF_MAGIC);
    if magic != SLOT_MAGIC {
        return Err(SlotError::BadMagic { found: magic });
    }
    let version = mem.load_u64(OFF_VERSION);
    if version != SLOT_VERSION {
        return Err(SlotError::BadVersion { found: version });
    }
    let header = mem.load_u64(OFF_SIZE);
    if header != mem.len() as u64 {
        return Err(SlotError::SizeMismatch {
            header,
            mapped: mem.len(),
        });
    }
    Ok(())
}

/// Where a process puts its ring area and its memory area in the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotLayout {
    /// Offset of the ring area.
    pub ring: usize,
    /// Capacity of each ring.
    pub ring_capacity: u64,
    /// Offset of the memory area.
    pub mem: usize,
    /// Bytes of the memory area.
    pub mem_len: usize,
}

impl SlotLayout {
    /// The default layout of a slot of `slot` bytes with rings of
    /// `ring_capacity`: ring after the header, memory area from the next
    /// page to the end of the slot.
    pub fn new(slot: usize, ring_capacity: u64) -> Result<Self, SlotError> {
        let bad = SlotError::Layout {
            ring_capacity,
            mem_len: 0,
            slot,
        };
        if !ring_capacity.is_power_of_two() || !(RING_MIN..=RING_MAX).contains(&ring_capacity) {
            return Err(bad);
        }
        let mem = (SLOT_HEADER + ring_area_len(ring_capacity)).next_multiple_of(4096);
        if mem >= slot {
            return Err(bad);
        }
        Ok(SlotLayout {
            ring: SLOT_HEADER,
            ring_capacity,
            mem,
            mem_len: slot - mem,
        })
    }

    /// Whether the layout fits a slot of `slot` bytes: both areas after
    /// the header, inside the slot, not overlapping, aligned.
    pub fn fits(&self, slot: usize) -> bool {
        let cap_ok = self.ring_capacity.is_power_of_two()
            && (RING_MIN..=RING_MAX).contains(&self.ring_capacity);
        if !cap_ok || !self.ring.is_multiple_of(64) || !self.mem.is_multiple_of(8) {
            return false;
        }
        let Some(ring_end) = self.ring.checked_add(ring_area_len(self.ring_capacity)) else {
            return false;
        };
        let Some(mem_end) = self.mem.checked_add(self.mem_len) else {
            return false;
        };
        let apart = ring_end <= self.mem || mem_end <= self.ring;
        self.ring >= SLOT_HEADER
            && self.mem >= SLOT_HEADER
            && ring_end <= slot
            && mem_end <= slot
            && self.mem_len > 0
            && apart
    }
}

/// The process's side of an attach through a slot.
#[derive(Debug)]
pub struct SlotClient<M> {
    mem: M,
    generation: u64,
    layout: SlotLayout,
}

impl<M: SharedMemory + Clone> SlotClient<M> {
    /// Starts attaching through the slot in `mem`: checks the header,
    /// reads the nonce, initialises the ring area, echoes the nonce and
    /// sets [`SlotState::Attaching`]. Returns the client (wait with
    /// [`SlotClient::outcome`]) and the process's ring endpoint.
    ///
    /// `echo` rewrites the nonce before it is echoed (tests of stale or
    /// forged echoes; pass `|_| {}`).
    pub fn begin(
        mem: M,
        ring_capacity: u64,
        echo: impl FnOnce(&mut [u8; NONCE_LEN]),
    ) -> Result<(Self, RingEndpoint<M>), SlotError> {
        check_header(&mem)?;
        match SlotState::of(mem.load_u64(OFF_STATE)) {
            SlotState::Free | SlotState::Refused => {}
            _ => return Err(SlotError::Busy),
        }
        let generation = mem.load_u64(OFF_GENERATION);
        let mut nonce = read_nonce(&mem, OFF_NONCE);
        echo(&mut nonce);
        let layout = SlotLayout::new(mem.len(), ring_capacity)?;
        let ring = RingEndpoint::init(mem.clone(), layout.ring, ring_capacity)?;
        mem.store_u64(OFF_RING, layout.ring as u64);
        mem.store_u64(OFF_RING_CAP, ring_capacity);
        mem.store_u64(OFF_MEM, layout.mem as u64);
        mem.store_u64(OFF_MEM_LEN, layout.mem_len as u64);
        mem.write(OFF_ECHO, &nonce);
        mem.fence();
        mem.store_u64(OFF_STATE, SlotState::Attaching.word());
        Ok((
            SlotClient {
                mem,
                generation,
                layout,
            },
            ring,
        ))
    }

    /// The layout this client asked for.
    pub fn layout(&self) -> SlotLayout {
        self.layout
    }

    /// `Some(Ok)` once the controller accepted, `Some(Err(Refused))` if it
    /// refused (or reset the slot meanwhile), `None` while it has not
    /// looked yet.
    pub fn outcome(&self) -> Option<Result<(), SlotError>> {
        let state = SlotState::of(self.mem.load_u64(OFF_STATE));
        if self.mem.load_u64(OFF_GENERATION) != self.generation {
            return Some(Err(SlotError::Refused));
        }
        match state {
            SlotState::Attaching => None,
            SlotState::Attached => Some(Ok(())),
            _ => Some(Err(SlotError::Refused)),
        }
    }

    /// Tells the controller this process is alive (call often: at least
    /// every second).
    pub fn heartbeat(&self) {
        let v = self.mem.load_u64(OFF_LIVENESS);
        self.mem.store_u64(OFF_LIVENESS, v.wrapping_add(1));
    }

    /// The slot's memory.
    pub fn memory(&self) -> &M {
        &self.mem
    }
}

/// A process's memory area as the controller reaches it: registered
/// address `SLOT_ADDR_BASE + x` is byte `x` of the area; anything outside
/// it is [`ErrorCode::MemoryFault`].
#[derive(Debug, Clone)]
pub struct SlotMemory<M> {
    mem: M,
    offset: usize,
    len: usize,
}

impl<M: SharedMemory> SlotMemory<M> {
    /// The area `[offset, offset + len)` of `mem` (checked by the caller).
    pub fn new(mem: M, offset: usize, len: usize) -> Self {
        SlotMemory { mem, offset, len }
    }

    /// Bytes of the area.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the area is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The slot offset of `[addr, addr + len)`, if wholly inside the area.
    pub fn locate(&self, addr: u64, len: usize) -> Option<usize> {
        let x = addr.checked_sub(SLOT_ADDR_BASE)?;
        let x = usize::try_from(x).ok()?;
        let end = x.checked_add(len)?;
        (end <= self.len).then_some(self.offset + x)
    }
}

impl<Cx: ?Sized, M: SharedMemory> DirectMemory<Cx> for SlotMemory<M> {
    fn read(&mut self, _: &mut Cx, addr: u64, out: &mut [u8]) -> Result<(), ErrorCode> {
        let at = self.locate(addr, out.len()).ok_or(ErrorCode::MemoryFault)?;
        self.mem.read(at, out);
        Ok(())
    }

    fn write(&mut self, _: &mut Cx, addr: u64, data: &[u8]) -> Result<(), ErrorCode> {
        let at = self
            .locate(addr, data.len())
            .ok_or(ErrorCode::MemoryFault)?;
        self.mem.write(at, data);
        Ok(())
    }

    fn device_address(&mut self, addr: u64, len: usize) -> Option<u64> {
        self.mem.device_address(self.locate(addr, len)?, len)
    }
}

/// The controller's end of a slot: the ring channel plus direct access to
/// the process's memory area. Dropping it tells the [`SlotHost`] the slot
/// is free again.
#[derive(Debug)]
pub struct SlotChannel<M: SharedMemory> {
    ring: RingChannel<M, NoKick>,
    memory: SlotMemory<M>,
    /// Set by the host to close the channel (dead process).
    kill: Arc<AtomicBool>,
    /// Set when this channel is dropped.
    gone: Arc<AtomicBool>,
}

impl<M: SharedMemory> Drop for SlotChannel<M> {
    fn drop(&mut self) {
        self.gone.store(true, Ordering::Release);
    }
}

impl<M: SharedMemory> SlotChannel<M> {
    fn killed(&self) -> bool {
        self.kill.load(Ordering::Acquire)
    }
}

impl<Cx: ?Sized, M: SharedMemory> Channel<Cx> for SlotChannel<M> {
    fn framing(&self) -> Framing {
        Framing::Stream
    }

    fn send(&mut self, cx: &mut Cx, data: &[u8]) -> Result<usize, TransportError> {
        if self.killed() {
            return Err(TransportError::Reset);
        }
        Channel::<Cx>::send(&mut self.ring, cx, data)
    }

    fn recv(
        &mut self,
        cx: &mut Cx,
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<Received, TransportError> {
        if self.killed() {
            return Err(TransportError::Reset);
        }
        Channel::<Cx>::recv(&mut self.ring, cx, out, max)
    }

    fn close(&mut self, cx: &mut Cx) {
        Channel::<Cx>::close(&mut self.ring, cx);
    }

    fn abort(&mut self, cx: &mut Cx) {
        Channel::<Cx>::abort(&mut self.ring, cx);
    }

    fn is_finished(&self, cx: &mut Cx) -> bool {
        self.killed() || Channel::<Cx>::is_finished(&self.ring, cx)
    }

    fn direct_memory(&mut self) -> Option<&mut dyn DirectMemory<Cx>> {
        Some(&mut self.memory)
    }
}

/// What [`SlotHost::poll`] saw.
#[derive(Debug)]
pub enum SlotEvent<M: SharedMemory> {
    /// A process attached: add this channel to the node.
    Attached(SlotChannel<M>),
    /// An attach was refused (the reason, for the log).
    Refused(SlotError),
    /// The attached process stopped (its channel was dropped, or it looked
    /// dead and its channel is being closed); the slot was reset.
    Detached {
        /// Whether the liveness counter stalled.
        dead: bool,
    },
}

enum HostState {
    Free,
    Attached {
        kill: Arc<AtomicBool>,
        gone: Arc<AtomicBool>,
        liveness: u64,
        moved_at: u64,
    },
}

/// The controller's side of one slot. See the module documentation.
pub struct SlotHost<M> {
    mem: M,
    nonce: [u8; NONCE_LEN],
    generation: u64,
    state: HostState,
    /// A process whose liveness counter stands still this long is dead.
    pub liveness_timeout_ns: u64,
    /// Attaches accepted so far.
    pub attaches: u64,
    /// Attaches refused so far.
    pub refusals: u64,
    /// Times a free slot's header had to be published again because it
    /// had been rewritten.
    pub repairs: u64,
}

impl<M> core::fmt::Debug for SlotHost<M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SlotHost")
            .field("generation", &self.generation)
            .field(
                "attached",
                &matches!(self.state, HostState::Attached { .. }),
            )
            .finish()
    }
}

/// Default [`SlotHost::liveness_timeout_ns`]: 3 s.
pub const LIVENESS_TIMEOUT_NS: u64 = 3_000_000_000;

impl<M: SharedMemory + Clone> SlotHost<M> {
    /// Takes over the slot in `mem` and resets it with `nonce`.
    pub fn new(mem: M, nonce: [u8; NONCE_LEN]) -> Self {
        let mut h = SlotHost {
            mem,
            nonce: [0; NONCE_LEN],
            generation: 0,
            state: HostState::Free,
            liveness_timeout_ns: LIVENESS_TIMEOUT_NS,
            attaches: 0,
            refusals: 0,
            repairs: 0,
        };
        h.reset(nonce, SlotState::Free);
        h
    }

    /// The slot's size.
    pub fn len(&self) -> usize {
        self.mem.len()
    }

    /// Whether the slot has no bytes.
    pub fn is_empty(&self) -> bool {
        self.mem.is_empty()
    }

    /// Whether a process is attached.
    pub fn is_attached(&self) -> bool {
        matches!(self.state, HostState::Attached { .. })
    }

    /// Writes a fresh header: `nonce`, generation + 1, `state`.
    pub fn reset(&mut self, nonce: [u8; NONCE_LEN], state: SlotState) {
        self.nonce = nonce;
        self.generation = self.generation.wrapping_add(1);
        self.state = HostState::Free;
        let m = &self.mem;
        m.store_u64(OFF_STATE, 0);
        m.fence();
        m.store_u64(OFF_MAGIC, SLOT_MAGIC);
        m.store_u64(OFF_VERSION, SLOT_VERSION);
        m.store_u64(OFF_SIZE, m.len() as u64);
        m.store_u64(OFF_GENERATION, self.generation);
        m.write(OFF_NONCE, &nonce);
        m.write(OFF_ECHO, &[0; NONCE_LEN]);
        for off in [OFF_RING, OFF_RING_CAP, OFF_MEM, OFF_MEM_LEN, OFF_LIVENESS] {
            m.store_u64(off, 0);
        }
        m.fence();
        m.store_u64(OFF_STATE, state.word());
    }

    /// One look at the slot at `now_ns`. `fresh_nonce` is asked for a new
    /// nonce whenever the slot is reset.
    pub fn poll(
        &mut self,
        now_ns: u64,
        fresh_nonce: impl FnOnce() -> [u8; NONCE_LEN],
    ) -> Option<SlotEvent<M>> {
        match &mut self.state {
            HostState::Free => {
                if !self.header_intact() {
                    // Someone (a process that held the slot before, or
                    // anyone who can write the file) rewrote the words
                    // the controller owns: publish them again, with a
                    // fresh nonce, so the slot stays usable.
                    self.repairs += 1;
                    self.reset(fresh_nonce(), SlotState::Free);
                    return None;
                }
                self.try_attach(now_ns, fresh_nonce)
            }
            HostState::Attached {
                kill,
                gone,
                liveness,
                moved_at,
            } => {
                if gone.load(Ordering::Acquire) {
                    let dead = kill.load(Ordering::Acquire);
                    self.reset(fresh_nonce(), SlotState::Free);
                    return Some(SlotEvent::Detached { dead });
                }
                let now_live = self.mem.load_u64(OFF_LIVENESS);
                if now_live != *liveness {
                    *liveness = now_live;
                    *moved_at = now_ns;
                } else if now_ns.saturating_sub(*moved_at) > self.liveness_timeout_ns
                    && !kill.load(Ordering::Acquire)
                {
                    // The node reaps the channel; the slot is reset once
                    // it is dropped.
                    kill.store(true, Ordering::Release);
                }
                None
            }
        }
    }

    /// Whether the header words the controller owns (magic, version,
    /// size, generation, nonce) still hold what it wrote.
    fn header_intact(&self) -> bool {
        let m = &self.mem;
        m.load_u64(OFF_MAGIC) == SLOT_MAGIC
            && m.load_u64(OFF_VERSION) == SLOT_VERSION
            && m.load_u64(OFF_SIZE) == m.len() as u64
            && m.load_u64(OFF_GENERATION) == self.generation
            && read_nonce(m, OFF_NONCE) == self.nonce
    }

    fn try_attach(
        &mut self,
        now_ns: u64,
        fresh_nonce: impl FnOnce() -> [u8; NONCE_LEN],
    ) -> Option<SlotEvent<M>> {
        if SlotState::of(self.mem.load_u64(OFF_STATE)) != SlotState::Attaching {
            return None;
        }
        match self.accept() {
            Ok((ring, memory)) => {
                let kill = Arc::new(AtomicBool::new(false));
                let gone = Arc::new(AtomicBool::new(false));
                self.state = HostState::Attached {
                    kill: kill.clone(),
                    gone: gone.clone(),
                    liveness: self.mem.load_u64(OFF_LIVENESS),
                    moved_at: now_ns,
                };
                self.attaches += 1;
                self.mem.store_u64(OFF_STATE, SlotState::Attached.word());
                Some(SlotEvent::Attached(SlotChannel {
                    ring: RingChannel::new(ring, NoKick),
                    memory,
                    kill,
                    gone,
                }))
            }
            Err(e) => {
                self.refusals += 1;
                self.reset(fresh_nonce(), SlotState::Refused);
                Some(SlotEvent::Refused(e))
            }
        }
    }

    /// Reads the process's words once and checks them.
    fn accept(&mut self) -> Result<(RingEndpoint<M>, SlotMemory<M>), SlotError> {
        let m = &self.mem;
        let echo = read_nonce(m, OFF_ECHO);
        // Constant time: the nonce is a secret of the slot's owner.
        let diff = echo
            .iter()
            .zip(self.nonce.iter())
            .fold(0u8, |d, (a, b)| d | (a ^ b));
        if diff != 0 {
            return Err(SlotError::Refused);
        }
        let word = |off| usize::try_from(m.load_u64(off)).unwrap_or(usize::MAX);
        let layout = SlotLayout {
            ring: word(OFF_RING),
            ring_capacity: m.load_u64(OFF_RING_CAP),
            mem: word(OFF_MEM),
            mem_len: word(OFF_MEM_LEN),
        };
        if !layout.fits(m.len()) {
            return Err(SlotError::Layout {
                ring_capacity: layout.ring_capacity,
                mem_len: layout.mem_len as u64,
                slot: m.len(),
            });
        }
        let ring = RingEndpoint::open(m.clone(), layout.ring, RingSide::Controller)?;
        if ring.capacity() != layout.ring_capacity {
            // Rewritten between our two reads: refuse.
            return Err(SlotError::Refused);
        }
        Ok((ring, SlotMemory::new(m.clone(), layout.mem, layout.mem_len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::AtomicMemory;
    use crate::FrameReader;

    const SLOT: usize = 1 << 20;

    fn host() -> (AtomicMemory, SlotHost<AtomicMemory>) {
        let mem = AtomicMemory::new(SLOT);
        let h = SlotHost::new(mem.clone(), [7; 32]);
        (mem, h)
    }

    fn attach(h: &mut SlotHost<AtomicMemory>, mem: &AtomicMemory) -> SlotChannel<AtomicMemory> {
        let (c, _ring) = SlotClient::begin(mem.clone(), RING_MIN, |_| {}).unwrap();
        assert_eq!(c.outcome(), None);
        let Some(SlotEvent::Attached(ch)) = h.poll(0, || [8; 32]) else {
            panic!("not attached")
        };
        assert_eq!(c.outcome(), Some(Ok(())));
        ch
    }

    #[test]
    fn attach_carries_frames_and_direct_memory_is_bounded() {
        let (mem, mut h) = host();
        let (c, ring) = SlotClient::begin(mem.clone(), RING_MIN, |_| {}).unwrap();
        let Some(SlotEvent::Attached(mut ch)) = h.poll(0, || [8; 32]) else {
            panic!("not attached")
        };
        assert_eq!(c.outcome(), Some(Ok(())));
        let mut p = RingChannel::new(ring, NoKick);
        let frame = [3, 0, 0, 0, b'a', b'b', b'c'];
        Channel::<()>::send(&mut p, &mut (), &frame).unwrap();
        let mut r = FrameReader::new(64);
        r.fill(&mut ch, &mut ()).unwrap();
        assert_eq!(r.next_frame().unwrap(), Some(&b"abc"[..]));

        let layout = c.layout();
        let dm = Channel::<()>::direct_memory(&mut ch).unwrap();
        dm.write(&mut (), SLOT_ADDR_BASE + 10, b"xyz").unwrap();
        let mut got = [0; 3];
        mem.read(layout.mem + 10, &mut got);
        assert_eq!(&got, b"xyz");
        let end = SLOT_ADDR_BASE + layout.mem_len as u64;
        let mut one = [0u8; 1];
        assert_eq!(dm.read(&mut (), end, &mut one), Err(ErrorCode::MemoryFault));
        assert!(dm.read(&mut (), end - 1, &mut one).is_ok());
        assert_eq!(
            dm.read(&mut (), SLOT_ADDR_BASE - 1, &mut one),
            Err(ErrorCode::MemoryFault)
        );
        assert_eq!(
            dm.write(&mut (), u64::MAX, b"xx"),
            Err(ErrorCode::MemoryFault)
        );
        assert_eq!(dm.read(&mut (), 0, &mut one), Err(ErrorCode::MemoryFault));
    }

    #[test]
    fn a_wrong_echo_is_refused_and_the_nonce_changes() {
        let (mem, mut h) = host();
        let (c, _) = SlotClient::begin(mem.clone(), RING_MIN, |n| n[0] ^= 1).unwrap();
        assert!(matches!(
            h.poll(0, || [9; 32]),
            Some(SlotEvent::Refused(SlotError::Refused))
        ));
        assert_eq!(c.outcome(), Some(Err(SlotError::Refused)));
        // The stale nonce (7s) no longer works either.
        let (c2, _) = SlotClient::begin(mem.clone(), RING_MIN, |n| *n = [7; 32]).unwrap();
        assert!(matches!(
            h.poll(0, || [10; 32]),
            Some(SlotEvent::Refused(_))
        ));
        assert_eq!(c2.outcome(), Some(Err(SlotError::Refused)));
        // A correct one does.
        let _ch = attach(&mut h, &mem);
        assert_eq!(h.attaches, 1);
        assert_eq!(h.refusals, 2);
    }

    #[test]
    fn a_free_slot_whose_header_was_rewritten_is_published_again() {
        let (mem, mut h) = host();
        for (off, junk) in [
            (OFF_SIZE, 90_608_403_914_686_464u64),
            (OFF_MAGIC, 1),
            (OFF_VERSION, 99),
            (OFF_GENERATION, 5),
            (OFF_NONCE + 8, 0xdead),
        ] {
            // A process that held the slot keeps writing after its
            // channel closed: a header with a wrong size, magic or
            // version turns every later process away.
            mem.store_u64(off, junk);
            if off < OFF_GENERATION {
                assert!(SlotClient::begin(mem.clone(), RING_MIN, |_| {}).is_err());
            }
            assert!(h.poll(0, || [11; 32]).is_none());
            assert_eq!(mem.load_u64(OFF_SIZE), SLOT as u64);
            assert_eq!(mem.load_u64(OFF_MAGIC), SLOT_MAGIC);
            assert_eq!(read_nonce(&mem, OFF_NONCE), [11; 32], "a fresh nonce");
            let _ch = attach(&mut h, &mem);
            drop(_ch);
            assert!(h.poll(0, || [12; 32]).is_some(), "detached");
        }
        assert_eq!(h.repairs, 5);
        // An intact header is left alone.
        assert!(h.poll(0, || [13; 32]).is_none());
        assert_eq!(h.repairs, 5);
    }

    #[test]
    fn a_busy_slot_is_refused_to_a_second_process() {
        let (mem, mut h) = host();
        let _ch = attach(&mut h, &mem);
        assert_eq!(
            SlotClient::begin(mem.clone(), RING_MIN, |_| {}).unwrap_err(),
            SlotError::Busy
        );
        let other = AtomicMemory::new(SLOT);
        assert!(matches!(
            SlotClient::begin(other, RING_MIN, |_| {}),
            Err(SlotError::BadMagic { found: 0 })
        ));
    }

    #[test]
    fn hostile_layouts_are_refused() {
        let (mem, mut h) = host();
        let bad = [
            (OFF_RING, 0u64),
            (OFF_RING, SLOT as u64),
            (OFF_RING, u64::MAX),
            (OFF_RING, 4097),
            (OFF_RING_CAP, 3),
            (OFF_RING_CAP, 1 << 40),
            (OFF_MEM, 100),
            (OFF_MEM, SLOT as u64 - 8),
            (OFF_MEM, 4096),
            (OFF_MEM_LEN, u64::MAX),
            (OFF_MEM_LEN, 0),
        ];
        for (off, v) in bad {
            let _ = SlotClient::begin(mem.clone(), RING_MIN, |_| {}).unwrap();
            mem.store_u64(off, v);
            assert!(
                matches!(h.poll(0, || [1; 32]), Some(SlotEvent::Refused(_))),
                "{off} = {v}"
            );
        }
        // Magic scribbled into the ring header.
        let _ = SlotClient::begin(mem.clone(), RING_MIN, |_| {}).unwrap();
        mem.store_u64(SLOT_HEADER, 0);
        assert!(matches!(
            h.poll(0, || [1; 32]),
            Some(SlotEvent::Refused(SlotError::Ring(_)))
        ));
        let _ch = attach(&mut h, &mem);
    }

    #[test]
    fn a_stalled_process_is_killed_and_a_dropped_channel_frees_the_slot() {
        let (mem, mut h) = host();
        let ch = attach(&mut h, &mem);
        let t = LIVENESS_TIMEOUT_NS;
        assert!(h.poll(t / 2, || [0; 32]).is_none());
        mem.store_u64(OFF_LIVENESS, 5);
        assert!(h.poll(t, || [0; 32]).is_none());
        assert!(!Channel::<()>::is_finished(&ch, &mut ()));
        assert!(h.poll(2 * t + 1, || [0; 32]).is_none());
        assert!(Channel::<()>::is_finished(&ch, &mut ()));
        drop(ch);
        assert!(matches!(
            h.poll(2 * t + 2, || [3; 32]),
            Some(SlotEvent::Detached { dead: true })
        ));
        assert!(!h.is_attached());
        assert_eq!(read_nonce(&mem, OFF_NONCE), [3; 32]);
        let ch = attach(&mut h, &mem);
        drop(ch);
        assert!(matches!(
            h.poll(0, || [4; 32]),
            Some(SlotEvent::Detached { dead: false })
        ));
    }

    #[test]
    fn scribbled_counters_close_only_this_channel() {
        let (mem, mut h) = host();
        let mut ch = attach(&mut h, &mem);
        for off in (SLOT_HEADER..SLOT_HEADER + 1024).step_by(8) {
            mem.store_u64(off, u64::MAX - off as u64);
        }
        let mut out = Vec::new();
        let r = Channel::<()>::recv(&mut ch, &mut (), &mut out, 1 << 20);
        assert!(r.is_err() || out.len() <= RING_MIN as usize);
        // Header words rewritten after attach change nothing.
        mem.store_u64(OFF_MEM_LEN, u64::MAX);
        let dm = Channel::<()>::direct_memory(&mut ch).unwrap();
        assert_eq!(
            dm.read(&mut (), SLOT_ADDR_BASE + SLOT as u64, &mut [0]),
            Err(ErrorCode::MemoryFault)
        );
    }
}
