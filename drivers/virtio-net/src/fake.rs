//! A fake virtio-net device for host tests.
//!
//! [`TestHal`] hands out heap pages as "DMA memory" with physical address ==
//! virtual address, so the fake can follow the ring addresses the driver
//! programs. [`FakeTransport`] is the driver's side of the transport (status,
//! features, queue registers, configuration space); [`FakeDevice`] is the
//! other side, stepped by the test: it consumes the avail rings and writes
//! the used rings the way a virtio 1.x split-queue device does.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{fence, Ordering};

use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};
use zerocopy::{FromBytes, Immutable, IntoBytes};

thread_local! {
    /// DMA pages currently allocated by this test thread.
    static LIVE_PAGES: Cell<usize> = const { Cell::new(0) };
    /// Allocations that may still succeed on this thread (`None`: any).
    static DMA_BUDGET: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Lets only the next `allocations` DMA allocations on this thread succeed.
pub(crate) fn limit_dma(allocations: usize) {
    DMA_BUDGET.with(|b| b.set(Some(allocations)));
}

/// DMA pages allocated and not yet freed on this thread.
pub(crate) fn live_dma_pages() -> usize {
    LIVE_PAGES.with(Cell::get)
}

/// Heap-backed HAL with physical address == virtual address.
pub(crate) struct TestHal;

fn layout(pages: usize) -> Layout {
    Layout::from_size_align(pages.max(1) * PAGE_SIZE, PAGE_SIZE).expect("valid DMA layout")
}

// SAFETY: `dma_alloc` returns fresh zeroed page-aligned heap memory that
// nothing else references; `dma_dealloc` frees it with the same layout;
// `share` returns the buffer's own address, which is what `dma_alloc`
// reports as physical.
unsafe impl Hal for TestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let refused = DMA_BUDGET.with(|b| match b.get() {
            Some(0) => true,
            Some(n) => {
                b.set(Some(n - 1));
                false
            }
            None => false,
        });
        if refused {
            return (0, NonNull::dangling());
        }
        // SAFETY: the layout has non-zero size (at least one page).
        let ptr = unsafe { alloc_zeroed(layout(pages)) };
        match NonNull::new(ptr) {
            Some(p) => {
                LIVE_PAGES.with(|l| l.set(l.get() + pages));
                (p.as_ptr() as usize as PhysAddr, p)
            }
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        // SAFETY: the caller guarantees `vaddr`/`pages` come from
        // `dma_alloc`, which used this same layout.
        unsafe { dealloc(vaddr.as_ptr(), layout(pages)) };
        LIVE_PAGES.with(|l| l.set(l.get() - pages));
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as usize as *mut u8).expect("MMIO address is not null")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr().cast::<u8>() as usize as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// The virtio-net header the device prepends on receive (virtio 1.x:
/// 12 bytes, `num_buffers` = 1).
const RX_HEADER: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Queue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub ready: bool,
    pub last_avail: u16,
    pub used_idx: u16,
}

/// Everything the fake device knows, shared by both sides.
#[derive(Debug)]
pub(crate) struct Model {
    pub device_type: DeviceType,
    pub status: DeviceStatus,
    pub device_features: u64,
    pub driver_features: u64,
    /// Refuse every feature set: clear `FEATURES_OK` when it is written.
    pub reject_features: bool,
    /// Never complete a reset: writing 0 leaves the status unchanged.
    pub stuck_reset: bool,
    pub max_queue_size: u32,
    pub config: [u8; 12],
    pub queues: [Queue; 2],
    pub notifications: [u32; 2],
    pub resets: u32,
    /// Frames the driver transmitted, header stripped.
    pub sent: VecDeque<Vec<u8>>,
    /// Headers of those frames.
    pub sent_headers: Vec<Vec<u8>>,
}

/// Features a QEMU virtio-net-pci device with a vnet-header backend (tap)
/// offers that matter here: checksum offload, which the driver takes, and
/// some it must decline (TSO, mergeable buffers).
pub(crate) const QEMU_LIKE_FEATURES: u64 = crate::F_VERSION_1
    | crate::F_MAC
    | crate::F_STATUS
    | 1 // VIRTIO_NET_F_CSUM
    | (1 << 7) // VIRTIO_NET_F_GUEST_TSO4
    | (1 << 15); // VIRTIO_NET_F_MRG_RXBUF

pub(crate) const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

impl Model {
    pub(crate) fn new(device_features: u64) -> Self {
        let mut config = [0; 12];
        config[..6].copy_from_slice(&MAC);
        config[6] = 1; // VIRTIO_NET_S_LINK_UP
        Self {
            device_type: DeviceType::Network,
            status: DeviceStatus::empty(),
            device_features,
            driver_features: 0,
            reject_features: false,
            stuck_reset: false,
            max_queue_size: 256,
            config,
            queues: [Queue::default(); 2],
            notifications: [0; 2],
            resets: 0,
            sent: VecDeque::new(),
            sent_headers: Vec::new(),
        }
    }
}

/// The driver's handle on the fake device.
pub(crate) struct FakeTransport(Rc<RefCell<Model>>);

/// The test's handle: plays the device.
#[derive(Clone)]
pub(crate) struct FakeDevice(pub Rc<RefCell<Model>>);

/// A fake device and the transport to give the driver.
pub(crate) fn fake(model: Model) -> (FakeDevice, FakeTransport) {
    let m = Rc::new(RefCell::new(model));
    (FakeDevice(Rc::clone(&m)), FakeTransport(m))
}

impl Transport for FakeTransport {
    fn device_type(&self) -> DeviceType {
        self.0.borrow().device_type
    }

    fn read_device_features(&mut self) -> u64 {
        self.0.borrow().device_features
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.0.borrow_mut().driver_features = driver_features;
    }

    fn max_queue_size(&mut self, _queue: u16) -> u32 {
        self.0.borrow().max_queue_size
    }

    fn notify(&mut self, queue: u16) {
        self.0.borrow_mut().notifications[usize::from(queue)] += 1;
    }

    fn get_status(&self) -> DeviceStatus {
        self.0.borrow().status
    }

    fn set_status(&mut self, status: DeviceStatus) {
        let mut m = self.0.borrow_mut();
        if status.is_empty() && m.stuck_reset {
            return;
        }
        if status.is_empty() {
            m.resets += 1;
            m.driver_features = 0;
            m.queues = [Queue::default(); 2];
        }
        m.status = if m.reject_features {
            status - DeviceStatus::FEATURES_OK
        } else {
            status
        };
    }

    fn set_guest_page_size(&mut self, _guest_page_size: u32) {}

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.0.borrow_mut().queues[usize::from(queue)] = Queue {
            size: u16::try_from(size).expect("queue size fits u16"),
            desc: descriptors,
            avail: driver_area,
            used: device_area,
            ready: true,
            last_avail: 0,
            used_idx: 0,
        };
    }

    fn queue_unset(&mut self, queue: u16) {
        self.0.borrow_mut().queues[usize::from(queue)] = Queue::default();
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.0.borrow().queues[usize::from(queue)].ready
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        InterruptStatus::empty()
    }

    fn read_config_generation(&self) -> u32 {
        0
    }

    fn read_config_space<T: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<T> {
        let m = self.0.borrow();
        let bytes = m
            .config
            .get(offset..offset + size_of::<T>())
            .ok_or(virtio_drivers::Error::ConfigSpaceTooSmall)?;
        T::read_from_bytes(bytes).map_err(|_| virtio_drivers::Error::ConfigSpaceTooSmall)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> virtio_drivers::Result<()> {
        let mut m = self.0.borrow_mut();
        let bytes = value.as_bytes();
        m.config
            .get_mut(offset..offset + bytes.len())
            .ok_or(virtio_drivers::Error::ConfigSpaceTooSmall)?
            .copy_from_slice(bytes);
        Ok(())
    }
}

/// Reads a `T` at a "physical" (== virtual) address the driver programmed.
///
/// # Safety
///
/// `addr` must point to a live, aligned `T` inside DMA memory the driver
/// owns (a ring or a posted buffer) that nothing writes meanwhile.
unsafe fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: guaranteed by the caller.
    unsafe { std::ptr::read_volatile(addr as usize as *const T) }
}

/// Writes a `T` at a "physical" (== virtual) address.
///
/// # Safety
///
/// As for [`rd`], and the memory must be device-writable (used ring or a
/// device-writable buffer) with no live reference to it.
unsafe fn wr<T: Copy>(addr: u64, value: T) {
    // SAFETY: guaranteed by the caller.
    unsafe { std::ptr::write_volatile(addr as usize as *mut T, value) }
}

/// One descriptor of a chain.
#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    writable: bool,
}

impl FakeDevice {
    pub(crate) fn model(&self) -> std::cell::RefMut<'_, Model> {
        self.0.borrow_mut()
    }

    /// Entries the driver made available on `queue` that the device has not
    /// consumed.
    pub(crate) fn pending(&self, queue: u16) -> u16 {
        let q = self.0.borrow().queues[usize::from(queue)];
        assert!(q.ready, "queue {queue} not set up");
        // SAFETY: `q.avail` is the driver's live avail ring (the driver is
        // alive while the test steps the device); `idx` is at offset 2.
        let idx: u16 = unsafe { rd(q.avail + 2) };
        fence(Ordering::Acquire);
        idx.wrapping_sub(q.last_avail)
    }

    /// The avail ring's flags (bit 0: no interrupts wanted).
    pub(crate) fn avail_flags(&self, queue: u16) -> u16 {
        let q = self.0.borrow().queues[usize::from(queue)];
        // SAFETY: as in `pending`; `flags` is at offset 0.
        unsafe { rd(q.avail) }
    }

    /// Sets the used ring's flags of `queue` (bit 0: no notifications
    /// wanted), as a device does while it is busy with the queue.
    pub(crate) fn set_used_flags(&self, queue: u16, flags: u16) {
        let q = self.0.borrow().queues[usize::from(queue)];
        assert!(q.ready, "queue {queue} not set up");
        // SAFETY: the used ring is live device memory only the device
        // writes; `flags` is at offset 0.
        unsafe { wr(q.used, flags) };
        fence(Ordering::Release);
    }

    /// Pops the next available chain of `queue`: its head and descriptors.
    fn pop_avail(&self, queue: u16) -> Option<(u16, Vec<Desc>)> {
        if self.pending(queue) == 0 {
            return None;
        }
        let mut m = self.0.borrow_mut();
        let q = &mut m.queues[usize::from(queue)];
        let slot = u64::from(q.last_avail % q.size);
        // SAFETY: ring entry `slot < size` of the live avail ring.
        let head: u16 = unsafe { rd(q.avail + 4 + 2 * slot) };
        q.last_avail = q.last_avail.wrapping_add(1);
        let mut chain = Vec::new();
        let mut index = head;
        loop {
            assert!(index < q.size, "descriptor index {index} out of range");
            assert!(chain.len() < usize::from(q.size), "descriptor loop");
            let base = q.desc + 16 * u64::from(index);
            // SAFETY: descriptor `index < size` of the live descriptor table
            // (addr @0, len @8, flags @12, next @14).
            let (addr, len, flags, next): (u64, u32, u16, u16) =
                unsafe { (rd(base), rd(base + 8), rd(base + 12), rd(base + 14)) };
            chain.push(Desc {
                addr,
                len,
                writable: flags & DESC_F_WRITE != 0,
            });
            if flags & DESC_F_NEXT == 0 {
                break;
            }
            index = next;
        }
        Some((head, chain))
    }

    /// Puts `(head, len)` on the used ring of `queue`.
    fn push_used(&self, queue: u16, head: u16, len: u32) {
        let mut m = self.0.borrow_mut();
        let q = &mut m.queues[usize::from(queue)];
        let slot = u64::from(q.used_idx % q.size);
        let elem = q.used + 4 + 8 * slot;
        // SAFETY: used-ring element `slot < size` of the live used ring,
        // which only the device writes.
        unsafe {
            wr(elem, u32::from(head));
            wr(elem + 4, len);
        }
        fence(Ordering::Release);
        q.used_idx = q.used_idx.wrapping_add(1);
        // SAFETY: the used ring's `idx` at offset 2.
        unsafe { wr(q.used + 2, q.used_idx) };
    }

    /// Transmits up to `max` frames the driver queued; returns how many.
    pub(crate) fn complete_tx(&self, max: usize) -> usize {
        let mut done = 0;
        while done < max {
            let Some((head, chain)) = self.pop_avail(crate::QUEUE_TRANSMIT) else {
                break;
            };
            let mut bytes = Vec::new();
            for d in &chain {
                assert!(!d.writable, "transmit descriptors are device-readable");
                // SAFETY: a posted transmit buffer of `len` bytes, which the
                // driver does not touch until we complete it.
                let data = unsafe {
                    std::slice::from_raw_parts(d.addr as usize as *const u8, d.len as usize)
                };
                bytes.extend_from_slice(data);
            }
            assert!(bytes.len() >= 12, "frame shorter than the net header");
            let frame = bytes.split_off(12);
            let mut m = self.0.borrow_mut();
            m.sent_headers.push(bytes);
            m.sent.push_back(frame);
            drop(m);
            self.push_used(crate::QUEUE_TRANSMIT, head, 0);
            done += 1;
        }
        done
    }

    /// Delivers `frame` into the next receive buffer; `false` if the driver
    /// has none posted (a real device would drop the frame).
    pub(crate) fn deliver(&self, frame: &[u8]) -> bool {
        self.deliver_claiming(frame, None)
    }

    /// Like [`deliver`](Self::deliver), but writes `claimed` as the used
    /// length when given (a misbehaving device).
    pub(crate) fn deliver_claiming(&self, frame: &[u8], claimed: Option<u32>) -> bool {
        self.deliver_raw(RX_HEADER[0], frame, claimed)
    }

    /// Like [`deliver`](Self::deliver) with `flags` in the virtio-net
    /// header (`DATA_VALID`, `NEEDS_CSUM`).
    pub(crate) fn deliver_flagged(&self, flags: u8, frame: &[u8]) -> bool {
        self.deliver_raw(flags, frame, None)
    }

    fn deliver_raw(&self, flags: u8, frame: &[u8], claimed: Option<u32>) -> bool {
        let Some((head, chain)) = self.pop_avail(crate::QUEUE_RECEIVE) else {
            return false;
        };
        let mut data = RX_HEADER.to_vec();
        data[0] = flags;
        data.extend_from_slice(frame);
        let mut rest = &data[..];
        for d in &chain {
            assert!(d.writable, "receive descriptors are device-writable");
            let n = rest.len().min(d.len as usize);
            // SAFETY: a posted receive buffer of `d.len >= n` bytes that the
            // driver does not touch until we complete it.
            unsafe {
                std::ptr::copy_nonoverlapping(rest.as_ptr(), d.addr as usize as *mut u8, n);
            }
            rest = &rest[n..];
        }
        assert!(rest.is_empty(), "frame larger than the posted buffer");
        let len = claimed.unwrap_or(u32::try_from(data.len()).expect("small frame"));
        self.push_used(crate::QUEUE_RECEIVE, head, len);
        true
    }
}
