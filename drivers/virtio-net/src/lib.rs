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
//! # Poll mode
//!
//! Call [`VirtioNet::poll`] (or just smoltcp's `Interface::poll`, which calls
//! [`Device::receive`]/[`Device::transmit`]) from the event loop: it reposts
//! consumed receive slots and reclaims completed transmit slots. When every
//! transmit slot is in flight, [`Device::transmit`] returns `None`
//! (backpressure: smoltcp keeps the data in its socket buffers).
#![cfg_attr(not(test), no_std)]

extern crate alloc;

#[cfg(test)]
mod fake;
mod pci;
mod pool;
#[cfg(test)]
mod tests;

use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::EthernetAddress;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::DeviceStatus;

pub use pci::{pci_transport, PciConfig};
pub use virtio_drivers::transport::pci::{PciTransport, VirtioPciError};
pub use virtio_drivers::transport::{DeviceType, Transport};
pub use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

use pool::{RxPool, TxPool};

/// Size of one receive or transmit buffer slot: the 12-byte virtio-net
/// header plus a full Ethernet frame fit with room to spare.
pub const BUF_LEN: usize = 2048;

/// Largest Ethernet frame (without FCS) the driver sends or expects.
pub const MAX_FRAME_LEN: usize = 1514;

/// PCI vendor id of virtio devices.
pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;

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

/// Features the driver accepts: exactly the set `VirtIONetRaw` negotiates.
pub const ACCEPTED_FEATURES: u64 =
    F_MAC | F_STATUS | F_RING_INDIRECT_DESC | F_RING_EVENT_IDX | F_VERSION_1;

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
}

/// A virtio-net device in poll mode with `N`-entry receive and transmit
/// queues (`N` a power of two, at most the device's queue size).
pub struct VirtioNet<H: Hal, T: Transport, const N: usize = 64> {
    // Declared first so it is dropped first: its drop unsets both queues
    // (and a `PciTransport` resets the device) before the buffer pools the
    // device may still write to are freed.
    raw: VirtIONetRaw<H, T, N>,
    rx: RxPool<H, N>,
    tx: TxPool<H, N>,
    features: u64,
    stats: Stats,
    last_error: Option<Error>,
}

impl<H: Hal, T: Transport, const N: usize> VirtioNet<H, T, N> {
    /// Initialises the device: checked feature negotiation, both queues set
    /// up, interrupts suppressed, every receive slot posted.
    pub fn new(mut transport: T) -> Result<Self, Error> {
        let features = negotiate(&mut transport, N)?;
        let mut raw = VirtIONetRaw::<H, T, N>::new(transport)?;
        raw.disable_interrupts();
        let mut dev = Self {
            raw,
            rx: RxPool::new()?,
            tx: TxPool::new()?,
            features,
            stats: Stats::default(),
            last_error: None,
        };
        dev.refill_rx()?;
        Ok(dev)
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

    /// Posts every slot smoltcp has finished with back to the device.
    fn refill_rx(&mut self) -> Result<(), Error> {
        while let Some(slot) = self.rx.next_done() {
            let buf = self.rx.slot_mut(slot);
            // SAFETY: `slot` came off the done list, so neither the device
            // nor an `RxToken` holds it; the pool outlives `raw`'s use of it
            // (the queues are unset when `raw` drops, before the pool).
            let token = unsafe { self.raw.receive_begin(buf) }?;
            self.rx.posted(token, slot)?;
        }
        Ok(())
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
            match done {
                Ok((hdr, len)) if hdr + len <= BUF_LEN => {
                    self.stats.rx_frames += 1;
                    self.stats.rx_bytes += len as u64;
                    return Some((slot, hdr, len));
                }
                Ok((hdr, len)) => {
                    self.rx.done(slot);
                    self.stats.rx_errors += 1;
                    self.last_error = Some(Error::BadLength {
                        len: hdr + len,
                        capacity: BUF_LEN,
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
    raw: &'a mut VirtIONetRaw<H, T, N>,
    pool: &'a mut TxPool<H, N>,
    stats: &'a mut Stats,
    last_error: &'a mut Option<Error>,
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
        } = self;
        let slot = match pool.take_free() {
            Some(slot) if len <= BUF_LEN - pool::NET_HDR_MAX => slot,
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
        let result = f(&mut buf[hdr..hdr + len]);
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
        let housekeeping = self.poll();
        self.record(housekeeping);
        let (slot, start, len) = self.next_rx()?;
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
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        let housekeeping = self.reclaim_tx();
        self.record(housekeeping);
        if self.tx.free_count() == 0 {
            self.stats.tx_full += 1;
            return None;
        }
        Some(TxToken {
            raw: &mut self.raw,
            pool: &mut self.tx,
            stats: &mut self.stats,
            last_error: &mut self.last_error,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME_LEN;
        caps.max_burst_size = Some(N);
        caps
    }
}
