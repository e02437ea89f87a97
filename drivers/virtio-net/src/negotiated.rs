//! The transport as [`VirtIONetRaw`](virtio_drivers::device::net::VirtIONetRaw)
//! sees it: the device's features filtered by what this driver wants.
//!
//! `VirtIONetRaw` negotiates a fixed feature set of its own. Two of our
//! choices differ from it, and this wrapper applies them without forking
//! the crate:
//!
//! * **No `VIRTIO_F_RING_EVENT_IDX`.** `virtio-drivers` 0.12 decides
//!   whether to notify with `avail_idx >= avail_event + 1`, which ignores
//!   where the previous notification was and wraps wrongly: with a device
//!   that leaves `avail_event` where it was while it is busy (QEMU does,
//!   for both virtio-net queues), the driver notifies on almost every
//!   buffer. Each notification is an MMIO write, a VM exit (under TCG a
//!   trip through the device model under the big lock). Without event
//!   indices the used ring's `NO_NOTIFY` flag is honoured, which QEMU
//!   sets while it still has receive buffers and while a transmit flush
//!   is pending, so the driver notifies only when the device waits.
//! * **Checksum offloads** (`VIRTIO_NET_F_CSUM`, `VIRTIO_NET_F_GUEST_CSUM`),
//!   which `VirtIONetRaw` does not know: they are added to what it writes,
//!   when the device offers them. The driver fills and reads the
//!   virtio-net header itself (see the crate doc).

use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::PhysAddr;
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// A transport whose offered features hide `hide` and whose written
/// features gain `extra`, and which holds back queue notifications.
///
/// Notifications of the two virtio-net queues are deferred: `VirtIONetRaw`
/// asks for one after posting each buffer (when the device does not
/// suppress them), and this wrapper only records it; the driver sends
/// them once per batch through [`Transport::ack_interrupt`], which it never
/// needs for its own sake (it runs without interrupts) and which here means
/// "deliver the deferred notifications" (`VirtIONetRaw::ack_interrupt` is
/// the only call that reaches the transport on demand). One doorbell per
/// batch instead of one per frame.
#[derive(Debug)]
pub(crate) struct Negotiated<T> {
    inner: T,
    hide: u64,
    extra: u64,
    /// A notification is owed to queue 0 (receive) / 1 (transmit).
    pending: [bool; 2],
}

impl<T: Transport> Negotiated<T> {
    pub(crate) fn new(inner: T, hide: u64, extra: u64) -> Self {
        Self {
            inner,
            hide,
            extra,
            pending: [false; 2],
        }
    }
}

impl<T: Transport> Transport for Negotiated<T> {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }

    fn read_device_features(&mut self) -> u64 {
        self.inner.read_device_features() & !self.hide
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.inner
            .write_driver_features((driver_features & !self.hide) | self.extra);
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }

    fn notify(&mut self, queue: u16) {
        match self.pending.get_mut(usize::from(queue)) {
            Some(owed) => *owed = true,
            None => self.inner.notify(queue),
        }
    }

    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.inner.set_status(status);
    }

    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.inner.set_guest_page_size(guest_page_size);
    }

    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.inner
            .queue_set(queue, size, descriptors, driver_area, device_area);
    }

    fn queue_unset(&mut self, queue: u16) {
        self.inner.queue_unset(queue);
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }

    /// Delivers the deferred notifications (see the type's doc); reads no
    /// interrupt status.
    fn ack_interrupt(&mut self) -> InterruptStatus {
        for queue in [crate::QUEUE_RECEIVE, crate::QUEUE_TRANSMIT] {
            if core::mem::take(&mut self.pending[usize::from(queue)]) {
                self.inner.notify(queue);
            }
        }
        InterruptStatus::empty()
    }

    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }

    fn read_config_space<V: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<V> {
        self.inner.read_config_space(offset)
    }

    fn write_config_space<V: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: V,
    ) -> virtio_drivers::Result<()> {
        self.inner.write_config_space(offset, value)
    }
}
