//! Poll-mode virtio-net driver (virtio 1.x over PCI) as a [`smoltcp::phy::Device`].
//!
//! The appliance's event loop polls the NIC, smoltcp and the controller core
//! in turn and takes no interrupts (DESIGN.md §4–§5). This crate is the NIC
//! part: [`VirtioNet`] owns one receive and one transmit virtqueue, keeps
//! every receive buffer posted, and hands frames to smoltcp through
//! [`RxToken`]/[`TxToken`] without copying them.
//!
//! # Choice: the `virtio-drivers` crate, through its raw net driver
//!
//! We use [`virtio_drivers`] (rcore-os) rather than our own virtio stack:
//! its modern PCI transport (common/notify/device configuration
//! capabilities), split virtqueues and feature handshake are well kept and
//! already tested, and DESIGN.md §5 verified it builds into our kernel. It
//! fits polling and low-copy operation as long as we use the right layer:
//!
//! * [`VirtIONetRaw`] is non-blocking: `receive_begin`/`poll_receive`/
//!   `receive_complete` and `transmit_begin`/`poll_transmit`/
//!   `transmit_complete` post caller-owned buffers and report completions
//!   from the used ring without ever spinning, and interrupts can be
//!   suppressed (`disable_interrupts`).
//! * Its higher-level `VirtIONet` is **not** used: its `send` spins until the
//!   device has consumed the frame and every transmit allocates a `Vec`.
//!
//! So this crate owns the buffers: two fixed pools of [`BUF_LEN`]-byte slots
//! in DMA memory from the [`Hal`] (one slot per descriptor, plus one scratch
//! slot on the transmit side), recycled forever — memory is bounded and fixed
//! at construction. Received frames are handed to smoltcp in place; smoltcp
//! writes outgoing frames straight into a transmit slot. No frame is copied
//! by the driver.
//!
//! What the crate does not give us, we add here: a feature handshake that is
//! checked ([`Error::MissingFeatures`] when the device lacks
//! `VIRTIO_F_VERSION_1` or `VIRTIO_NET_F_MAC`, [`Error::FeaturesRejected`]
//! when it does not keep `FEATURES_OK`), and validation of everything the
//! device writes back (tokens, used lengths).
//!
//! # Hardware access
//!
//! All hardware access goes through two traits of `virtio-drivers`, re-exported
//! here: [`Hal`] — an `unsafe trait` for DMA allocation/deallocation,
//! physical↔virtual translation (`share`/`unshare`) and mapping MMIO BARs,
//! with "Implementation safety" and "Safety" sections per method — and
//! [`Transport`] (the kernel uses [`PciTransport`]; the unit tests use a fake
//! device that plays the other side of the rings).
//!
//! # Doorbells and checksums (what a frame costs under QEMU TCG)
//!
//! * Notifications follow the used ring's `NO_NOTIFY` flag:
//!   `VIRTIO_F_RING_EVENT_IDX` is hidden from `virtio-drivers`, whose
//!   event-index test notifies on almost every buffer with QEMU (see
//!   `negotiated.rs`). Transmit notifications are held back and rung once
//!   per batch by [`VirtioNet::flush`], which the event loop calls after
//!   polling smoltcp; receive slots go back in batches of
//!   [`RX_REFILL_BATCH`] with one notification each.
//! * TCP checksums over IPv4 are the driver's, not smoltcp's (the
//!   capabilities say so): with `VIRTIO_NET_F_CSUM` the device completes
//!   them from a partial sum, with `VIRTIO_NET_F_GUEST_CSUM` frames it
//!   marks `DATA_VALID` are not summed again; otherwise the driver sums
//!   64-bit words, several times faster than smoltcp's SIMD loop under
//!   TCG. Received TCP frames with a wrong checksum, or claiming IPv4 +
//!   TCP without parsing as such, are dropped and counted. QEMU offers the
//!   offloads only with a backend that carries virtio-net headers (tap,
//!   vhost); user networking (slirp) offers neither.
//! * [`Stats`] counts the TSC cycles of the receive queue, the transmit
//!   queue and the software checksums ([`tsc`]).
//!
//! # Poll mode
//!
//! Call [`VirtioNet::poll`] (or just smoltcp's `Interface::poll`, which calls
//! [`Device::receive`]/[`Device::transmit`]) from the event loop: it reposts
//! consumed receive slots and reclaims completed transmit slots; call
//! [`VirtioNet::flush`] after a burst of transmits. When every
//! transmit slot is in flight, [`Device::transmit`] returns `None`
//! (backpressure: smoltcp keeps the data in its socket buffers).
#![cfg_attr(not(test), no_std)]

extern crate alloc;

mod csum;
#[cfg(test)]
mod fake;
mod mmio;
mod negotiated;
mod pci;
mod pool;
#[cfg(test)]
mod tests;

use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::EthernetAddress;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::DeviceStatus;

pub use mmio::mmio_transport;
pub use pci::{pci_transport, PciConfig};
pub use virtio_drivers::transport::mmio::{MmioError, MmioTransport};
pub use virtio_drivers::transport::pci::{PciTransport, VirtioPciError};
pub use virtio_drivers::transport::{DeviceType, SomeTransport, Transport};
pub use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

use negotiated::Negotiated;
use pool::{RxPool, TxPool};

/// Size of one receive or transmit buffer slot by default
/// ([`VirtioNet::new`]): the 12-byte virtio-net header plus a full
/// 1514-byte Ethernet frame fit with room to spare.
pub const BUF_LEN: usize = 2048;

/// Largest Ethernet frame [`VirtioNet::with_frame_len`] accepts: a
/// 9000-byte MTU (jumbo frames) plus the Ethernet header.
pub const MAX_JUMBO_FRAME_LEN: usize = 9014;

/// Small frames [`RxRoute::Copy`] keeps for [`VirtioNet::drain_diverted`]
/// at most (the oldest wait; more are counted in [`Stats::rx_copy_overflow`]).
pub const RX_COPIES: usize = 8;

/// Largest frame [`RxRoute::Copy`] copies (an ARP packet is 42 bytes,
/// padded to 60 on the wire).
pub const RX_COPY_LEN: usize = 64;

/// Where a received frame goes (see [`VirtioNet::set_rx_filter`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxRoute {
    /// To smoltcp, as without a filter.
    Stack,
    /// Held in its receive slot for [`VirtioNet::drain_diverted`]; smoltcp
    /// never sees it (no copy).
    Divert,
    /// To smoltcp, and a copy (if at most [`RX_COPY_LEN`] bytes) for
    /// [`VirtioNet::drain_diverted`]: for small frames both consumers need
    /// (ARP replies).
    Copy,
}

/// Classifies a received Ethernet frame (without the virtio-net header).
pub type RxFilter = fn(&[u8]) -> RxRoute;

/// Largest Ethernet frame (without FCS) the driver sends or expects.
pub const MAX_FRAME_LEN: usize = 1514;

/// PCI vendor id of virtio devices.
pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;

/// `VIRTIO_NET_F_CSUM`: the device completes partial checksums of frames
/// the driver sends.
pub const F_CSUM: u64 = 1 << 0;
/// `VIRTIO_NET_F_GUEST_CSUM`: the device may mark received frames whose
/// checksum it validated (or that carry a partial one).
pub const F_GUEST_CSUM: u64 = 1 << 1;
/// `VIRTIO_NET_F_MAC`: the device has a MAC address in its configuration.
pub const F_MAC: u64 = 1 << 5;
/// `VIRTIO_NET_F_STATUS`: the configuration has a link status field.
pub const F_STATUS: u64 = 1 << 16;
/// `VIRTIO_F_RING_INDIRECT_DESC`.
pub const F_RING_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_F_RING_EVENT_IDX`.
pub const F_RING_EVENT_IDX: u64 = 1 << 29;
/// `VIRTIO_F_VERSION_1`: a virtio 1.x (modern) device.
pub const F_VERSION_1: u64 = 1 << 32;

/// Features the device must offer.
pub const REQUIRED_FEATURES: u64 = F_VERSION_1 | F_MAC;

/// Features the driver accepts: the set `VirtIONetRaw` negotiates less
/// `VIRTIO_F_RING_EVENT_IDX` (the crate doc says why), plus the checksum
/// offloads, which the driver handles itself.
pub const ACCEPTED_FEATURES: u64 =
    F_MAC | F_STATUS | F_RING_INDIRECT_DESC | F_VERSION_1 | OFFLOAD_FEATURES;

/// Offloads the driver takes when offered; `VirtIONetRaw` does not know
/// them, so they are added to what it negotiates.
pub const OFFLOAD_FEATURES: u64 = F_CSUM | F_GUEST_CSUM;

/// `virtio_net_hdr.flags`: the checksum is partial, complete it.
const HDR_F_NEEDS_CSUM: u8 = 1;
/// `virtio_net_hdr.flags`: the device validated the checksum.
const HDR_F_DATA_VALID: u8 = 2;

/// Features `VirtIONetRaw` would take that the driver hides from it
/// (negotiated.rs says why).
const HIDDEN_FEATURES: u64 = F_RING_EVENT_IDX;

/// Receive slots reposted at once by [`Device::receive`] (at most a
/// quarter of the queue); [`VirtioNet::poll`] reposts all.
pub const RX_REFILL_BATCH: usize = 16;

/// Status reads to wait for a reset to complete before giving up.
const RESET_POLLS: u32 = 100_000;

const QUEUE_RECEIVE: u16 = 0;
const QUEUE_TRANSMIT: u16 = 1;

/// Whether a PCI function with these ids is a virtio network device
/// (modern id `0x1041` or transitional id `0x1000`).
pub fn is_virtio_net(vendor: u16, device: u16) -> bool {
    vendor == VIRTIO_PCI_VENDOR && (device == 0x1041 || device == 0x1000)
}

/// Everything that can go wrong in the driver.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The transport is some other kind of virtio device.
    #[error("not a virtio network device: {0:?}")]
    NotNetwork(DeviceType),
    /// The device did not finish a reset (status never read back as 0).
    #[error("device did not complete its reset")]
    ResetTimeout,
    /// The device does not offer a feature the driver requires.
    #[error("device lacks required features {missing:#x} (it offers {offered:#x})")]
    MissingFeatures {
        /// The device's feature bits.
        offered: u64,
        /// Required bits it does not offer.
        missing: u64,
    },
    /// The device cleared `FEATURES_OK` after the driver wrote its features.
    #[error("device rejected features {0:#x} (FEATURES_OK not kept)")]
    FeaturesRejected(u64),
    /// A virtqueue of the device is smaller than the driver's queue size.
    #[error("virtqueue {queue} holds at most {max} entries, the driver needs {needed}")]
    QueueTooSmall {
        /// Queue index.
        queue: u16,
        /// The device's maximum.
        max: u32,
        /// The driver's queue size.
        needed: usize,
    },
    /// The HAL could not allocate DMA memory.
    #[error("DMA allocation of {pages} pages failed")]
    Dma {
        /// Pages asked for.
        pages: usize,
    },
    /// The device completed a descriptor the driver has not posted.
    #[error("device completed unknown descriptor {0}")]
    UnknownToken(u16),
    /// The device reported a used length that does not fit the buffer.
    #[error("device reported {len} bytes used in a {capacity}-byte buffer")]
    BadLength {
        /// Length the device wrote in the used ring.
        len: usize,
        /// Buffer capacity.
        capacity: usize,
    },
    /// The PCI function is not a usable virtio 1.x device.
    #[error("virtio PCI transport: {0}")]
    Pci(VirtioPciError),
    /// The virtio-mmio register block is not a usable device.
    #[error("virtio-mmio device at {base:#x}: {error}")]
    Mmio {
        /// Its physical address.
        base: PhysAddr,
        /// What `virtio-drivers` found.
        error: MmioError,
    },
    /// The virtio-mmio device speaks the legacy (version 1) register layout.
    #[error("virtio-mmio device at {0:#x} is legacy (version 1): the driver needs a virtio 1.x device (version 2); QEMU: -global virtio-mmio.force-legacy=false (Firecracker's devices are version 2)")]
    MmioLegacy(PhysAddr),
    /// The virtio-mmio window's address is not usable (0, or not 4-byte
    /// aligned).
    #[error("virtio-mmio window {base:#x}+{size:#x} is not usable: its base must be non-zero and 4-byte aligned")]
    MmioWindow {
        /// Its physical address.
        base: PhysAddr,
        /// Its size.
        size: usize,
    },
    /// An error from `virtio-drivers` (transport, queue).
    #[error(transparent)]
    Virtio(#[from] virtio_drivers::Error),
}

/// Counters, for the boot log and the metrics endpoint.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Frames handed to smoltcp.
    pub rx_frames: u64,
    /// Bytes of those frames.
    pub rx_bytes: u64,
    /// Receive completions dropped as malformed.
    pub rx_errors: u64,
    /// Frames posted to the transmit queue.
    pub tx_frames: u64,
    /// Bytes of those frames.
    pub tx_bytes: u64,
    /// Transmit completions reclaimed.
    pub tx_completed: u64,
    /// Times `transmit` refused a token because every slot was in flight.
    pub tx_full: u64,
    /// Frames built by smoltcp but dropped (no free slot for a reply, or
    /// larger than a slot).
    pub tx_dropped: u64,
    /// Frames the transmit queue refused.
    pub tx_errors: u64,
    /// Received TCP frames dropped for a wrong checksum, or for claiming
    /// IPv4 + TCP without parsing as such.
    pub rx_bad_checksum: u64,
    /// TCP frames sent with their checksum left to the device.
    pub tx_csum_offloaded: u64,
    /// TSC cycles spent on TCP checksums in software (both directions).
    pub csum_cycles: u64,
    /// TSC cycles spent on the receive queue: reposting slots, popping
    /// used entries (see [`tsc`]).
    pub rx_cycles: u64,
    /// TSC cycles spent on the transmit queue: headers, posting frames
    /// (notifications included), reclaiming completions.
    pub tx_cycles: u64,
    /// Frames the receive filter diverted away from smoltcp.
    pub rx_diverted: u64,
    /// Frames the receive filter copied (and also gave smoltcp).
    pub rx_copied: u64,
    /// Copies not kept because [`RX_COPIES`] were waiting, or the frame
    /// was longer than [`RX_COPY_LEN`].
    pub rx_copy_overflow: u64,
    /// Frames sent with [`VirtioNet::send_frame`].
    pub tx_raw: u64,
    /// With a receive filter: frames dropped because they carry our own
    /// source MAC (a hub, such as QEMU's multicast `socket` netdev, hands
    /// every station its own frames back).
    pub rx_own: u64,
}

/// The 16-bit ones'-complement sum of `data` (RFC 1071, network byte
/// order, not complemented) as the driver computes TCP checksums.
pub fn ones_complement_sum(data: &[u8]) -> u16 {
    csum::fold(csum::sum(data, 0))
}

/// The CPU's time-stamp counter (0 off x86-64): the driver counts the
/// cycles of its own stages with it, for the appliance's per-frame cost
/// breakdown. Under QEMU TCG it ticks with host time.
#[inline]
pub fn tsc() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC exists on every x86-64 CPU, reads a counter and
        // has no side effects.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        0
    }
}

/// A virtio-net device in poll mode with `N`-entry receive and transmit
/// queues (`N` a power of two, at most the device's queue size).
pub struct VirtioNet<H: Hal, T: Transport, const N: usize = 64> {
    // Declared first so it is dropped first: its drop unsets both queues
    // (and a `PciTransport` resets the device) before the buffer pools the
    // device may still write to are freed.
    raw: VirtIONetRaw<H, Negotiated<T>, N>,
    rx: RxPool<H, N>,
    tx: TxPool<H, N>,
    features: u64,
    stats: Stats,
    last_error: Option<Error>,
    filter: Option<RxFilter>,
    /// The device's MAC (to recognise our own frames echoed by a hub).
    mac: [u8; 6],
    /// Diverted frames in arrival order: `(slot, start, len)`, a ring.
    diverted: [(u16, u16, u16); N],
    diverted_head: usize,
    diverted_len: usize,
    /// Copied small frames in arrival order: `(bytes, len)`, a ring.
    copies: [([u8; RX_COPY_LEN], u8); RX_COPIES],
    copies_head: usize,
    copies_len: usize,
}

impl<H: Hal, T: Transport, const N: usize> VirtioNet<H, T, N> {
    /// Initialises the device: checked feature negotiation, both queues set
    /// up, interrupts suppressed, every receive slot posted; frames up to
    /// [`MAX_FRAME_LEN`] bytes ([`BUF_LEN`]-byte slots).
    pub fn new(transport: T) -> Result<Self, Error> {
        Self::with_slots(transport, BUF_LEN)
    }

    /// As [`VirtioNet::new`], for Ethernet frames of up to `max_frame`
    /// bytes ([`MAX_FRAME_LEN`]..=[`MAX_JUMBO_FRAME_LEN`], e.g. 9014 for a
    /// 9000-byte MTU): every slot holds a whole frame, as a device without
    /// mergeable receive buffers requires. smoltcp still sees
    /// [`MAX_FRAME_LEN`]; larger frames are for [`VirtioNet::send_frame`]
    /// and [`VirtioNet::drain_diverted`].
    pub fn with_frame_len(transport: T, max_frame: usize) -> Result<Self, Error> {
        let max_frame = max_frame.clamp(MAX_FRAME_LEN, MAX_JUMBO_FRAME_LEN);
        // Whole cache lines; never below the default.
        let slot = (max_frame + pool::NET_HDR_MAX)
            .next_multiple_of(64)
            .max(BUF_LEN);
        Self::with_slots(transport, slot)
    }

    fn with_slots(mut transport: T, slot_len: usize) -> Result<Self, Error> {
        let features = negotiate(&mut transport, N)?;
        let transport = Negotiated::new(transport, HIDDEN_FEATURES, features & OFFLOAD_FEATURES);
        let mut raw = VirtIONetRaw::<H, Negotiated<T>, N>::new(transport)?;
        raw.disable_interrupts();
        let mut dev = Self {
            raw,
            rx: RxPool::new(slot_len)?,
            tx: TxPool::new(slot_len)?,
            features,
            stats: Stats::default(),
            last_error: None,
            filter: None,
            mac: [0; 6],
            diverted: [(0, 0, 0); N],
            diverted_head: 0,
            diverted_len: 0,
            copies: [([0; RX_COPY_LEN], 0); RX_COPIES],
            copies_head: 0,
            copies_len: 0,
        };
        dev.mac = dev.raw.mac_address();
        dev.refill_rx()?;
        Ok(dev)
    }

    /// The largest Ethernet frame a slot holds (without the virtio-net
    /// header).
    pub fn max_frame_len(&self) -> usize {
        self.rx.slot_len() - pool::NET_HDR_MAX
    }

    /// Routes every received frame through `filter` before smoltcp sees
    /// it (`None`: everything to smoltcp); with a filter, frames with our
    /// own source MAC are dropped first (counted in [`Stats::rx_own`]: a
    /// hub echoing what we sent). Diverted frames stay in their
    /// receive slots until [`VirtioNet::drain_diverted`] hands them out:
    /// drain after every smoltcp poll, or the receive queue runs dry.
    pub fn set_rx_filter(&mut self, filter: Option<RxFilter>) {
        self.filter = filter;
    }

    /// Hands every frame the filter diverted or copied so far to `f`,
    /// copies first, each group in arrival order; diverted slots go back
    /// to the device. Returns how many frames were handed out.
    pub fn drain_diverted(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        let mut n = 0;
        while self.copies_len > 0 {
            let (bytes, len) = &self.copies[self.copies_head];
            f(&bytes[..usize::from(*len)]);
            self.copies_head = (self.copies_head + 1) % RX_COPIES;
            self.copies_len -= 1;
            n += 1;
        }
        while self.diverted_len > 0 {
            let (slot, start, len) = self.diverted[self.diverted_head];
            let (start, len) = (usize::from(start), usize::from(len));
            f(&self.rx.slot(slot)[start..start + len]);
            self.rx.done(slot);
            self.diverted_head = (self.diverted_head + 1) % N;
            self.diverted_len -= 1;
            n += 1;
        }
        if n > 0 {
            let refill = self.refill_rx_batched();
            self.record(refill);
        }
        n
    }

    /// Sends one whole Ethernet frame (built elsewhere, e.g. by an RDMA
    /// engine) through a transmit slot: one copy. `false` when every slot
    /// is in flight or the frame is longer than a slot (counted as
    /// `tx_full` / `tx_dropped`). Call [`VirtioNet::flush`] after a burst.
    pub fn send_frame(&mut self, frame: &[u8]) -> bool {
        if frame.len() > self.max_frame_len() {
            self.stats.tx_dropped += 1;
            return false;
        }
        let Some(token) = Device::transmit(self, Instant::ZERO) else {
            return false;
        };
        let before = token.stats.tx_frames;
        phy::TxToken::consume(token, frame.len(), |buf| buf.copy_from_slice(frame));
        let ok = self.stats.tx_frames > before;
        if ok {
            self.stats.tx_raw += 1;
        }
        ok
    }

    /// Applies the receive filter to a good frame in `slot`; `true` when it
    /// is smoltcp's.
    fn route(&mut self, slot: u16, start: usize, len: usize) -> bool {
        let Some(filter) = self.filter else {
            return true;
        };
        let frame = &self.rx.slot(slot)[start..start + len];
        if frame.get(6..12) == Some(&self.mac[..]) {
            self.rx.done(slot);
            self.stats.rx_own += 1;
            return false;
        }
        match filter(frame) {
            RxRoute::Stack => true,
            RxRoute::Copy => {
                if len <= RX_COPY_LEN && self.copies_len < RX_COPIES {
                    let i = (self.copies_head + self.copies_len) % RX_COPIES;
                    self.copies[i].0[..len].copy_from_slice(frame);
                    // len <= RX_COPY_LEN = 64 fits in u8.
                    self.copies[i].1 = len as u8;
                    self.copies_len += 1;
                    self.stats.rx_copied += 1;
                } else {
                    self.stats.rx_copy_overflow += 1;
                }
                true
            }
            RxRoute::Divert => {
                // At most N slots exist, so the ring has room; slot
                // offsets fit u16 (slots are at most 9 KiB).
                let i = (self.diverted_head + self.diverted_len) % N;
                self.diverted[i] = (slot, start as u16, len as u16);
                self.diverted_len += 1;
                self.stats.rx_diverted += 1;
                false
            }
        }
    }

    /// The device's MAC address.
    pub fn mac_address(&self) -> EthernetAddress {
        EthernetAddress(self.raw.mac_address())
    }

    /// The negotiated feature bits.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Takes the last error met inside a smoltcp call (which cannot return
    /// one); the counters say how many there were.
    pub fn take_error(&mut self) -> Option<Error> {
        self.last_error.take()
    }

    /// Housekeeping without smoltcp: reposts consumed receive slots and
    /// reclaims completed transmissions. Bounded work: at most `N` of each.
    pub fn poll(&mut self) -> Result<(), Error> {
        self.refill_rx()?;
        self.reclaim_tx()
    }

    /// Notifies the device of frames posted since the last notification
    /// (if it asked to be notified). Transmit notifications are batched:
    /// **call this after polling smoltcp** (after each `Interface::poll`,
    /// or once per event-loop turn); until then, frames smoltcp sent may
    /// sit unannounced in the transmit queue (a device that is still
    /// working through earlier frames takes them anyway).
    pub fn flush(&mut self) {
        let t0 = tsc();
        // Our transport's `ack_interrupt` delivers the deferred
        // notification (negotiated.rs).
        let _ = self.raw.ack_interrupt();
        self.stats.tx_cycles += tsc().wrapping_sub(t0);
    }

    /// Free transmit slots right now (without reclaiming).
    pub fn tx_free(&self) -> usize {
        self.tx.free_count()
    }

    /// Receive slots currently posted to the device.
    pub fn rx_posted(&self) -> usize {
        self.rx.posted_count()
    }

    fn record(&mut self, result: Result<(), Error>) {
        if let Err(e) = result {
            self.last_error = Some(e);
        }
    }

    /// Posts every slot smoltcp has finished with back to the device, then
    /// rings its doorbell once if it asked for one.
    fn refill_rx(&mut self) -> Result<(), Error> {
        let mut posted = false;
        let mut result = Ok(());
        while let Some(slot) = self.rx.next_done() {
            let buf = self.rx.slot_mut(slot);
            // SAFETY: `slot` came off the done list, so neither the device
            // nor an `RxToken` holds it; the pool outlives `raw`'s use of it
            // (the queues are unset when `raw` drops, before the pool).
            match unsafe { self.raw.receive_begin(buf) } {
                Ok(token) => {
                    posted = true;
                    if let Err(e) = self.rx.posted(token, slot) {
                        result = Err(e);
                        break;
                    }
                }
                Err(e) => {
                    result = Err(e.into());
                    break;
                }
            }
        }
        if posted {
            // Delivers the notification deferred by our transport.
            let _ = self.raw.ack_interrupt();
        }
        result
    }

    /// Reposts receive slots in batches of [`RX_REFILL_BATCH`] (at most a
    /// quarter of the queue): a device that has run dry is notified once
    /// per batch rather than once per frame, and it always holds all but a
    /// batch of the slots.
    fn refill_rx_batched(&mut self) -> Result<(), Error> {
        let batch = RX_REFILL_BATCH.min(N / 4).max(1);
        if self.rx.done_count() >= batch {
            self.refill_rx()
        } else {
            Ok(())
        }
    }

    /// Returns completed transmit slots to the free list.
    fn reclaim_tx(&mut self) -> Result<(), Error> {
        while let Some(token) = self.raw.poll_transmit() {
            let (slot, len) = self.tx.in_flight(token)?;
            let frame = self.tx.slot(slot, len);
            // SAFETY: `frame` is exactly the slice passed to
            // `transmit_begin` for this token (same slot, same length).
            unsafe { self.raw.transmit_complete(token, frame) }?;
            self.tx.complete(token);
            self.stats.tx_completed += 1;
        }
        Ok(())
    }

    /// Takes the next good received frame off the used ring, if any.
    fn next_rx(&mut self) -> Option<(u16, usize, usize)> {
        // Bounded: each iteration pops one used entry, at most N exist.
        for _ in 0..N {
            let token = self.raw.poll_receive()?;
            let slot = match self.rx.take_posted(token) {
                Ok(slot) => slot,
                Err(e) => {
                    // Not ours: we cannot pop it without its buffer. The
                    // device is broken; report and stop receiving.
                    self.stats.rx_errors += 1;
                    self.last_error = Some(e);
                    return None;
                }
            };
            let buf = self.rx.slot_mut(slot);
            // SAFETY: `buf` is the slice posted with this token in
            // `refill_rx` (same slot, full length).
            let done = unsafe { self.raw.receive_complete(token, buf) };
            let capacity = self.rx.slot_len();
            match done {
                Ok((hdr, len)) if hdr + len <= capacity => {
                    if !self.rx_checksum_ok(slot, hdr, len) {
                        self.rx.done(slot);
                        self.stats.rx_bad_checksum += 1;
                        continue;
                    }
                    self.stats.rx_frames += 1;
                    self.stats.rx_bytes += len as u64;
                    if !self.route(slot, hdr, len) {
                        continue;
                    }
                    return Some((slot, hdr, len));
                }
                Ok((hdr, len)) => {
                    self.rx.done(slot);
                    self.stats.rx_errors += 1;
                    self.last_error = Some(Error::BadLength {
                        len: hdr + len,
                        capacity,
                    });
                }
                Err(e) => {
                    self.rx.done(slot);
                    self.stats.rx_errors += 1;
                    self.last_error = Some(e.into());
                }
            }
        }
        None
    }
}

impl<H: Hal, T: Transport, const N: usize> VirtioNet<H, T, N> {
    /// Whether a received frame may go to smoltcp (which does not check
    /// TCP checksums, see [`csum`]): the device vouched for it
    /// (`GUEST_CSUM` negotiated and `DATA_VALID` or a partial checksum from
    /// a local sender), or it is not IPv4 + TCP, or its checksum is right.
    fn rx_checksum_ok(&mut self, slot: u16, hdr: usize, len: usize) -> bool {
        let buf = self.rx.slot(slot);
        let flags = buf.first().copied().unwrap_or(0);
        if self.features & F_GUEST_CSUM != 0 && flags & (HDR_F_DATA_VALID | HDR_F_NEEDS_CSUM) != 0 {
            return true;
        }
        let Some(frame) = buf.get(hdr..hdr + len) else {
            return false;
        };
        match csum::classify(frame) {
            csum::Frame::Other => true,
            csum::Frame::Malformed => false,
            csum::Frame::Tcp(seg) => {
                let t0 = tsc();
                let ok = csum::verify(frame, seg);
                self.stats.csum_cycles += tsc().wrapping_sub(t0);
                ok
            }
        }
    }
}

/// Fills the TCP checksum of an outgoing frame (smoltcp left it 0), or
/// marks it for the device to complete when `offload` (`VIRTIO_NET_F_CSUM`
/// negotiated). `buf` is the slot: the virtio-net header, then the frame
/// from `hdr`.
fn tx_checksum(buf: &mut [u8], hdr: usize, offload: bool, stats: &mut Stats) {
    let Some(frame) = buf.get_mut(hdr..) else {
        return;
    };
    let csum::Frame::Tcp(seg) = csum::classify(frame) else {
        return;
    };
    if offload {
        csum::fill_partial(frame, seg);
        let start = seg.start as u16;
        let offset = csum::TCP_CSUM_OFFSET as u16;
        // virtio_net_hdr: flags @0, csum_start @6, csum_offset @8 (LE).
        if let Some(h) = buf.get_mut(..10) {
            h[0] = HDR_F_NEEDS_CSUM;
            h[6..8].copy_from_slice(&start.to_le_bytes());
            h[8..10].copy_from_slice(&offset.to_le_bytes());
        }
        stats.tx_csum_offloaded += 1;
    } else {
        let t0 = tsc();
        csum::fill(frame, seg);
        stats.csum_cycles += tsc().wrapping_sub(t0);
    }
}

/// Checks the feature handshake, then resets the device so that
/// `VirtIONetRaw::new` can run it again (it does not check the device's
/// answer itself). Sets `FAILED` when the device is unusable.
fn negotiate<T: Transport>(t: &mut T, queue_size: usize) -> Result<u64, Error> {
    let kind = t.device_type();
    if kind != DeviceType::Network {
        return Err(Error::NotNetwork(kind));
    }
    let base = DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER;
    reset(t)?;
    t.set_status(base);
    let offered = t.read_device_features();
    let missing = REQUIRED_FEATURES & !offered;
    if missing != 0 {
        t.set_status(base | DeviceStatus::FAILED);
        return Err(Error::MissingFeatures { offered, missing });
    }
    let features = offered & ACCEPTED_FEATURES;
    t.write_driver_features(features);
    t.set_status(base | DeviceStatus::FEATURES_OK);
    if !t.get_status().contains(DeviceStatus::FEATURES_OK) {
        t.set_status(base | DeviceStatus::FAILED);
        return Err(Error::FeaturesRejected(features));
    }
    for queue in [QUEUE_RECEIVE, QUEUE_TRANSMIT] {
        let max = t.max_queue_size(queue);
        if usize::try_from(max).map_or(true, |m| m < queue_size) {
            t.set_status(base | DeviceStatus::FAILED);
            return Err(Error::QueueTooSmall {
                queue,
                max,
                needed: queue_size,
            });
        }
    }
    reset(t)?;
    Ok(features)
}

/// Resets the device and waits (bounded) until it reads back status 0, as
/// the driver must before initialising it again.
fn reset<T: Transport>(t: &mut T) -> Result<(), Error> {
    t.set_status(DeviceStatus::empty());
    for _ in 0..RESET_POLLS {
        if t.get_status().is_empty() {
            return Ok(());
        }
        core::hint::spin_loop();
    }
    Err(Error::ResetTimeout)
}

/// A received frame, read in place from its receive slot; the slot goes back
/// to the device on the next poll after this token is consumed or dropped.
pub struct RxToken<'a, H: Hal, const N: usize> {
    pool: &'a mut RxPool<H, N>,
    slot: u16,
    start: usize,
    len: usize,
}

impl<H: Hal, const N: usize> phy::RxToken for RxToken<'_, H, N> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let frame = &self.pool.slot(self.slot)[self.start..self.start + self.len];
        f(frame)
    }
}

impl<H: Hal, const N: usize> Drop for RxToken<'_, H, N> {
    fn drop(&mut self) {
        self.pool.done(self.slot);
    }
}

/// Room for one outgoing frame: smoltcp writes it straight into a transmit
/// slot, which is posted when the closure returns.
pub struct TxToken<'a, H: Hal, T: Transport, const N: usize> {
    raw: &'a mut VirtIONetRaw<H, Negotiated<T>, N>,
    pool: &'a mut TxPool<H, N>,
    stats: &'a mut Stats,
    last_error: &'a mut Option<Error>,
    /// The device completes TCP checksums (`VIRTIO_NET_F_CSUM`).
    csum_offload: bool,
}

impl<H: Hal, T: Transport, const N: usize> phy::TxToken for TxToken<'_, H, T, N> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let Self {
            raw,
            pool,
            stats,
            last_error,
            csum_offload,
        } = self;
        let slot = match pool.take_free() {
            Some(slot) if len <= pool.slot_len() - pool::NET_HDR_MAX => slot,
            other => {
                if let Some(slot) = other {
                    pool.give_back(slot);
                }
                // No room (a reply token while every slot is in flight) or
                // an oversized frame: let smoltcp build it, then drop it.
                stats.tx_dropped += 1;
                return pool.scratch(len, f);
            }
        };
        let t0 = tsc();
        let buf = pool.slot_mut(slot);
        let hdr = match raw.fill_buffer_header(buf) {
            Ok(hdr) => hdr,
            Err(e) => {
                pool.give_back(slot);
                stats.tx_errors += 1;
                *last_error = Some(e.into());
                return pool.scratch(len, f);
            }
        };
        let t1 = tsc();
        let result = f(&mut buf[hdr..hdr + len]);
        tx_checksum(&mut buf[..hdr + len], hdr, csum_offload, stats);
        let t2 = tsc();
        let frame = pool.slot(slot, hdr + len);
        // SAFETY: the slot was free (not posted, no other token); it stays
        // untouched until `reclaim_tx` completes this token with the same
        // slice, and the pool outlives `raw`'s queues.
        match unsafe { raw.transmit_begin(frame) } {
            Ok(token) => match pool.sent(token, slot, hdr + len) {
                Ok(()) => {
                    stats.tx_frames += 1;
                    stats.tx_bytes += len as u64;
                }
                Err(e) => {
                    stats.tx_errors += 1;
                    *last_error = Some(e);
                }
            },
            Err(e) => {
                pool.give_back(slot);
                stats.tx_errors += 1;
                *last_error = Some(e.into());
            }
        }
        stats.tx_cycles += t1.wrapping_sub(t0) + tsc().wrapping_sub(t2);
        result
    }
}

impl<H: Hal, T: Transport, const N: usize> Device for VirtioNet<H, T, N> {
    type RxToken<'a>
        = RxToken<'a, H, N>
    where
        Self: 'a;
    type TxToken<'a>
        = TxToken<'a, H, T, N>
    where
        Self: 'a;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let t0 = tsc();
        let refill = self.refill_rx_batched();
        self.record(refill);
        let reclaim = self.reclaim_tx();
        self.record(reclaim);
        let next = self.next_rx();
        self.stats.rx_cycles += tsc().wrapping_sub(t0);
        let (slot, start, len) = next?;
        Some((
            RxToken {
                pool: &mut self.rx,
                slot,
                start,
                len,
            },
            TxToken {
                raw: &mut self.raw,
                pool: &mut self.tx,
                stats: &mut self.stats,
                last_error: &mut self.last_error,
                csum_offload: self.features & F_CSUM != 0,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        let t0 = tsc();
        let housekeeping = self.reclaim_tx();
        self.record(housekeeping);
        self.stats.tx_cycles += tsc().wrapping_sub(t0);
        if self.tx.free_count() == 0 {
            self.stats.tx_full += 1;
            return None;
        }
        Some(TxToken {
            raw: &mut self.raw,
            pool: &mut self.tx,
            stats: &mut self.stats,
            last_error: &mut self.last_error,
            csum_offload: self.features & F_CSUM != 0,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME_LEN;
        caps.max_burst_size = Some(N);
        // TCP checksums are the driver's (or the device's): see `csum`.
        caps.checksum.tcp = phy::Checksum::None;
        caps
    }
}
