//! Glue from the kernel's PCI configuration access (`pci_types`, which the
//! kernel's enumeration already implements over port I/O) to the
//! `virtio-drivers` PCI transport.

use pci_types::{ConfigRegionAccess, PciAddress};
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction, PciRoot};
use virtio_drivers::transport::pci::PciTransport;

use crate::{Error, Hal};

/// A `pci_types` configuration access seen as `virtio-drivers`'
/// [`ConfigurationAccess`] (PCI segment 0).
#[derive(Debug, Clone)]
pub struct PciConfig<A>(A);

impl<A: ConfigRegionAccess + Clone> PciConfig<A> {
    /// Wraps `access`.
    ///
    /// # Safety
    ///
    /// `access` must be valid for 32-bit reads and writes of the whole
    /// 256-byte configuration space of every segment-0 function the
    /// transport is pointed at (as `pci_types::ConfigRegionAccess::read`
    /// and `write` require), for as long as the wrapper or a clone lives.
    pub unsafe fn new(access: A) -> Self {
        Self(access)
    }
}

fn address(f: DeviceFunction) -> PciAddress {
    PciAddress::new(0, f.bus, f.device, f.function)
}

impl<A: ConfigRegionAccess + Clone> ConfigurationAccess for PciConfig<A> {
    fn read_word(&self, device_function: DeviceFunction, register_offset: u8) -> u32 {
        // SAFETY: `new`'s contract covers every offset below 256 of the
        // functions the transport reads.
        unsafe {
            self.0
                .read(address(device_function), register_offset.into())
        }
    }

    fn write_word(&mut self, device_function: DeviceFunction, register_offset: u8, data: u32) {
        // SAFETY: as in `read_word`.
        unsafe {
            self.0
                .write(address(device_function), register_offset.into(), data)
        }
    }

    unsafe fn unsafe_clone(&self) -> Self {
        self.clone()
    }
}

/// Builds the virtio 1.x PCI transport (common/notify/ISR/device
/// configuration capabilities) for the function at `function`.
///
/// The function's memory BARs must be assigned, decoding enabled, and
/// mapped so that `H::mmio_phys_to_virt` can hand out pointers to them (the
/// kernel identity-maps BARs uncached).
pub fn pci_transport<H: Hal, A: ConfigRegionAccess + Clone>(
    config: PciConfig<A>,
    function: PciAddress,
) -> Result<PciTransport, Error> {
    let mut root = PciRoot::new(config);
    let device_function = DeviceFunction {
        bus: function.bus(),
        device: function.device(),
        function: function.function(),
    };
    PciTransport::new::<H, _>(&mut root, device_function).map_err(Error::Pci)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use virtio_drivers::transport::pci::VirtioPciError;

    use super::*;
    use crate::fake::TestHal;

    /// Bus, device, function and offset of one configuration read.
    type Access = (u8, u8, u8, u16);

    /// Configuration space of one fake function at 00:03.0; records accesses.
    #[derive(Clone)]
    struct FakeConfig {
        space: Rc<RefCell<Vec<u32>>>,
        log: Rc<RefCell<Vec<Access>>>,
    }

    impl Default for FakeConfig {
        fn default() -> Self {
            Self {
                space: Rc::new(RefCell::new(vec![0; 64])),
                log: Rc::default(),
            }
        }
    }

    impl ConfigRegionAccess for FakeConfig {
        unsafe fn read(&self, a: PciAddress, offset: u16) -> u32 {
            self.log
                .borrow_mut()
                .push((a.bus(), a.device(), a.function(), offset));
            if (a.bus(), a.device(), a.function()) == (0, 3, 0) {
                self.space.borrow()[usize::from(offset / 4)]
            } else {
                u32::MAX
            }
        }

        unsafe fn write(&self, a: PciAddress, offset: u16, value: u32) {
            if (a.bus(), a.device(), a.function()) == (0, 3, 0) {
                self.space.borrow_mut()[usize::from(offset / 4)] = value;
            }
        }
    }

    #[test]
    fn config_access_maps_function_and_offset() {
        let fake = FakeConfig::default();
        fake.space.borrow_mut()[0] = 0x1041_1af4;
        // SAFETY: the fake accepts any address and offset.
        let mut config = unsafe { PciConfig::new(fake.clone()) };
        let f = DeviceFunction {
            bus: 0,
            device: 3,
            function: 0,
        };
        assert_eq!(config.read_word(f, 0), 0x1041_1af4);
        config.write_word(f, 0x10, 0xfebf_0000);
        assert_eq!(fake.space.borrow()[4], 0xfebf_0000);
        let other = DeviceFunction {
            bus: 1,
            device: 2,
            function: 5,
        };
        assert_eq!(config.read_word(other, 0x34), u32::MAX);
        assert_eq!(fake.log.borrow().last(), Some(&(1, 2, 5, 0x34)));
    }

    #[test]
    fn transport_refuses_a_non_virtio_function() {
        let fake = FakeConfig::default();
        fake.space.borrow_mut()[0] = 0x0010_1b36; // QEMU NVMe
                                                  // SAFETY: the fake accepts any address and offset.
        let config = unsafe { PciConfig::new(fake) };
        let err = pci_transport::<TestHal, _>(config, PciAddress::new(0, 0, 3, 0))
            .expect_err("not virtio");
        assert_eq!(err, Error::Pci(VirtioPciError::InvalidVendorId(0x1b36)));
    }
}
