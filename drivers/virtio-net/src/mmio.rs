//! The virtio-mmio transport (virtio 1.x, "version 2" register layout) of
//! `virtio-drivers`, for VMMs without PCI (Firecracker, QEMU `microvm`):
//! a device is a register block at a physical address the kernel learns
//! from its command line (`virtio_mmio.device=<size>@<base>:<irq>`).

use virtio_drivers::transport::mmio::{MmioTransport, MmioVersion, VirtIOHeader};

use crate::{Error, Hal, PhysAddr};

/// Builds the virtio-mmio transport for the register block of `size`
/// bytes at physical address `base`. Only modern devices (register layout
/// version 2, virtio 1.x) are accepted: a legacy one (version 1, QEMU's
/// default for `virtio-mmio` unless `-global
/// virtio-mmio.force-legacy=false`) is [`Error::MmioLegacy`].
///
/// # Safety
///
/// `[base, base + size)` must be the register block of one virtio-mmio
/// device (or nothing that reacts to reads), mapped uncached so that
/// `H::mmio_phys_to_virt(base, size)` returns a pointer valid for volatile
/// 32-bit reads and writes of the whole window for the rest of the
/// program, and no other code may access it.
pub unsafe fn mmio_transport<H: Hal>(
    base: PhysAddr,
    size: usize,
) -> Result<MmioTransport<'static>, Error> {
    if base % 4 != 0 || base == 0 {
        return Err(Error::MmioWindow { base, size });
    }
    // SAFETY: the caller guarantees the window is mapped device memory the
    // HAL translates.
    let header = unsafe { H::mmio_phys_to_virt(base, size) }.cast::<VirtIOHeader>();
    if header.as_ptr().align_offset(4) != 0 {
        return Err(Error::MmioWindow { base, size });
    }
    // SAFETY: `header` points to the 4-byte aligned register block of
    // `size` bytes the caller vouches for, valid (and ours alone) for the
    // rest of the program; `MmioTransport::new` checks `size` covers the
    // header.
    let t =
        unsafe { MmioTransport::new(header, size) }.map_err(|e| Error::Mmio { base, error: e })?;
    match t.version() {
        MmioVersion::Modern => Ok(t),
        MmioVersion::Legacy => Err(Error::MmioLegacy(base)),
    }
}

#[cfg(test)]
mod tests {
    use virtio_drivers::transport::mmio::MmioError;
    use virtio_drivers::transport::{DeviceType, Transport};

    use super::*;
    use crate::fake::TestHal;
    use crate::VirtioNet;

    /// A register block in plain memory: it reads back what was written,
    /// so it plays a device only up to the first register whose value
    /// the device would change (enough for identification and the
    /// feature handshake's failures).
    struct Block(Box<[u32; 128]>);

    const MAGIC: usize = 0;
    const VERSION: usize = 1;
    const DEVICE_ID: usize = 2;
    const DEVICE_FEATURES: usize = 4;
    const STATUS: usize = 0x70 / 4;

    impl Block {
        fn new(version: u32, device: u32) -> Self {
            let mut b = Box::new([0u32; 128]);
            b[MAGIC] = 0x7472_6976;
            b[VERSION] = version;
            b[DEVICE_ID] = device;
            Block(b)
        }

        fn base(&mut self) -> PhysAddr {
            self.0.as_mut_ptr() as PhysAddr
        }

        fn read(&self, word: usize) -> u32 {
            // SAFETY: in bounds of the box, which the transport writes
            // through raw pointers: read volatile like it.
            unsafe { core::ptr::read_volatile(&self.0[word]) }
        }

        fn write(&mut self, word: usize, v: u32) {
            // SAFETY: as in `read`.
            unsafe { core::ptr::write_volatile(&mut self.0[word], v) }
        }

        fn transport(&mut self) -> Result<MmioTransport<'static>, Error> {
            // SAFETY: the box outlives every transport a test builds (each
            // is dropped before the block) and is 512 bytes, 4-aligned.
            unsafe { mmio_transport::<TestHal>(self.base(), 512) }
        }
    }

    #[test]
    fn modern_network_device_is_accepted() {
        let mut b = Block::new(2, 1);
        let t = b.transport().expect("modern NIC");
        assert_eq!(t.device_type(), DeviceType::Network);
        assert_eq!(t.version(), MmioVersion::Modern);
    }

    #[test]
    fn legacy_and_foreign_blocks_are_refused_with_typed_errors() {
        let mut b = Block::new(1, 1);
        let base = b.base();
        let err = b.transport().unwrap_err();
        assert_eq!(err, Error::MmioLegacy(base));
        assert!(err.to_string().contains("force-legacy=false"), "{err}");

        let mut b = Block::new(2, 1);
        b.write(MAGIC, 0x1234_5678);
        let base = b.base();
        assert_eq!(
            b.transport().unwrap_err(),
            Error::Mmio {
                base,
                error: MmioError::BadMagic(0x1234_5678)
            }
        );

        let mut b = Block::new(3, 1);
        assert!(matches!(
            b.transport(),
            Err(Error::Mmio {
                error: MmioError::UnsupportedVersion(3),
                ..
            })
        ));

        // An empty slot (device id 0), as QEMU microvm has many.
        let mut b = Block::new(2, 0);
        assert!(matches!(
            b.transport(),
            Err(Error::Mmio {
                error: MmioError::InvalidDeviceID(_),
                ..
            })
        ));

        let mut b = Block::new(2, 1);
        let base = b.base();
        // SAFETY: the window is inside the box (checks fail before any access).
        let small = unsafe { mmio_transport::<TestHal>(base, 0x80) };
        assert!(matches!(
            small,
            Err(Error::Mmio {
                error: MmioError::MmioRegionTooSmall,
                ..
            })
        ));
        // SAFETY: refused before any access.
        let odd = unsafe { mmio_transport::<TestHal>(base + 2, 512) };
        assert_eq!(
            odd.unwrap_err(),
            Error::MmioWindow {
                base: base + 2,
                size: 512
            }
        );
    }

    #[test]
    fn a_block_device_is_not_a_nic() {
        let mut b = Block::new(2, 2);
        let t = b.transport().expect("a modern device");
        let err = VirtioNet::<TestHal, _, 16>::new(t)
            .err()
            .expect("not a NIC");
        assert_eq!(err, Error::NotNetwork(DeviceType::Block));
    }

    /// What `VirtioNet::new` says about a modern NIC whose feature words
    /// both read `features`.
    fn handshake_error(features: u32) -> Error {
        let mut b = Block::new(2, 1);
        b.write(DEVICE_FEATURES, features);
        let t = b.transport().unwrap();
        let err = VirtioNet::<TestHal, _, 16>::new(t).err().unwrap();
        // Dropping the transport reset the device (after the driver set
        // FAILED): status reads what was last written.
        assert_eq!(b.read(STATUS), 0);
        err
    }

    #[test]
    fn handshake_runs_over_the_registers_and_fails_the_device() {
        // 0x20: MAC in the low word, bit 37 (not VERSION_1, bit 32) in the
        // high one.
        assert_eq!(
            handshake_error(0x20),
            Error::MissingFeatures {
                offered: 0x20_0000_0020,
                missing: 1 << 32
            }
        );
        // VERSION_1 and MAC offered, FEATURES_OK "kept" (memory reads back),
        // but no queue: the maximum queue size register reads 0.
        assert_eq!(
            handshake_error(0x21),
            Error::QueueTooSmall {
                queue: 0,
                max: 0,
                needed: 16
            }
        );
    }
}
