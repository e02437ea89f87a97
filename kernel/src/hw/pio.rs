//! Port-I/O devices: QEMU's debug-exit port and legacy PCI configuration.

use fractos_kernel::exit::{ExitReason, DEBUG_EXIT_PORT};
use fractos_kernel::pci::{ConfigRegionAccess, PciAddress};
use x86_64::instructions::port::Port;

/// Ends the QEMU run with `reason`; on hardware without the debug-exit
/// device, halts forever.
pub fn exit(reason: ExitReason) -> ! {
    // SAFETY: port 0xf4 is QEMU's isa-debug-exit device; on other machines
    // the write goes nowhere.
    unsafe { Port::<u32>::new(DEBUG_EXIT_PORT).write(reason.code()) };
    halt_forever()
}

/// Stops this CPU for good (interrupts stay off).
pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

/// PCI configuration mechanism #1 (`0xCF8` address, `0xCFC` data).
#[derive(Debug, Clone, Copy)]
pub struct PortConfigAccess;

impl PortConfigAccess {
    fn select(address: PciAddress, offset: u16) {
        let v = 0x8000_0000
            | (u32::from(address.bus()) << 16)
            | (u32::from(address.device()) << 11)
            | (u32::from(address.function()) << 8)
            | u32::from(offset & 0xfc);
        // SAFETY: 0xCF8 is the PCI configuration address port on PC
        // platforms; one CPU, no interrupts, so no one else interleaves.
        unsafe { Port::<u32>::new(0xcf8).write(v) };
    }
}

impl ConfigRegionAccess for PortConfigAccess {
    unsafe fn read(&self, address: PciAddress, offset: u16) -> u32 {
        Self::select(address, offset);
        // SAFETY: 0xCFC is the data port for the address just selected.
        unsafe { Port::<u32>::new(0xcfc).read() }
    }

    unsafe fn write(&self, address: PciAddress, offset: u16, value: u32) {
        Self::select(address, offset);
        // SAFETY: 0xCFC is the data port; the caller vouches for the value.
        unsafe { Port::<u32>::new(0xcfc).write(value) }
    }
}
