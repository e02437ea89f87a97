//! PCI enumeration over an abstract configuration space.
//!
//! Walks bus 0 and every bus behind a PCI-to-PCI bridge, and for each
//! endpoint records its ids, class code and BARs — sized by the usual
//! write-all-ones probe (done by `pci_types`, 64-bit BARs included) with
//! memory and I/O decoding switched off meanwhile. The kernel runs it over
//! legacy port I/O (`0xCF8`/`0xCFC`); tests run it over a fake device model.

use alloc::vec::Vec;
use core::fmt;

pub use pci_types::{Bar, CommandRegister, ConfigRegionAccess, PciAddress};
use pci_types::{EndpointHeader, HeaderType, PciHeader, PciPciBridgeHeader};

/// One PCI function found during enumeration.
#[derive(Debug, Clone, Copy)]
pub struct PciFunction {
    /// Bus/device/function.
    pub address: PciAddress,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Base class.
    pub class: u8,
    /// Sub class.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Revision id.
    pub revision: u8,
    /// BARs by slot; a 64-bit BAR occupies its slot and leaves the next `None`.
    pub bars: [Option<Bar>; 6],
    /// Whether this is a PCI-to-PCI bridge.
    pub bridge: bool,
}

impl PciFunction {
    /// Memory BAR windows `(slot, address, size)` that are assigned (non-zero).
    pub fn memory_windows(&self) -> impl Iterator<Item = (usize, u64, u64)> + '_ {
        self.bars.iter().enumerate().filter_map(|(i, b)| match b {
            Some(Bar::Memory32 { address, size, .. }) if *address != 0 => {
                Some((i, u64::from(*address), u64::from(*size)))
            }
            Some(Bar::Memory64 { address, size, .. }) if *address != 0 => {
                Some((i, *address, *size))
            }
            _ => None,
        })
    }

    /// Whether this is an NVM Express controller (class 01.08.02).
    pub fn is_nvme(&self) -> bool {
        (self.class, self.subclass, self.prog_if) == (0x01, 0x08, 0x02)
    }

    /// The memory window `(address, size)` of BAR `slot`, if assigned.
    pub fn memory_bar(&self, slot: usize) -> Option<(u64, u64)> {
        self.memory_windows()
            .find(|&(i, _, _)| i == slot)
            .map(|(_, a, s)| (a, s))
    }

    /// A short description of the class code.
    pub fn class_name(&self) -> &'static str {
        match (self.class, self.subclass, self.prog_if) {
            (0x01, 0x08, 0x02) => "storage/nvme",
            (0x01, 0x01, _) => "storage/ide",
            (0x01, 0x06, _) => "storage/sata",
            (0x01, 0x00, _) => "storage/scsi",
            (0x01, _, _) => "storage",
            (0x02, 0x00, _) => "network/ethernet",
            (0x02, _, _) => "network",
            (0x03, _, _) => "display",
            (0x05, _, _) => "memory",
            (0x06, 0x00, _) => "bridge/host",
            (0x06, 0x01, _) => "bridge/isa",
            (0x06, 0x04, _) => "bridge/pci",
            (0x06, _, _) => "bridge",
            (0x0c, 0x03, _) => "serial-bus/usb",
            (0xff, _, _) => "unassigned-class",
            _ => "other",
        }
    }
}

impl fmt::Display for PciFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = self.address;
        write!(
            f,
            "{:02x}:{:02x}.{} {:04x}:{:04x} class {:02x}.{:02x}.{:02x} rev {:02x} ({})",
            a.bus(),
            a.device(),
            a.function(),
            self.vendor,
            self.device,
            self.class,
            self.subclass,
            self.prog_if,
            self.revision,
            self.class_name()
        )?;
        for (i, bar) in self.bars.iter().enumerate() {
            match bar {
                Some(Bar::Memory32 {
                    address,
                    size,
                    prefetchable,
                }) => write!(
                    f,
                    " bar{i}=mem32:{address:#x}+{size:#x}{}",
                    if *prefetchable { ":pref" } else { "" }
                )?,
                Some(Bar::Memory64 {
                    address,
                    size,
                    prefetchable,
                }) => write!(
                    f,
                    " bar{i}=mem64:{address:#x}+{size:#x}{}",
                    if *prefetchable { ":pref" } else { "" }
                )?,
                Some(Bar::Io { port }) => write!(f, " bar{i}=io:{port:#x}")?,
                None => {}
            }
        }
        Ok(())
    }
}

/// Turns on memory-space decoding and bus mastering of the endpoint at
/// `address` (leaving its other command bits alone), so that its memory
/// BARs answer and it may DMA. Returns the command register as it was
/// before, or `None` if `address` is not an endpoint.
///
/// # Safety
///
/// Bus mastering lets the device read and write any physical memory: the
/// caller must only program it (through its BARs) with memory it owns.
pub unsafe fn enable_memory_and_bus_master(
    access: &impl ConfigRegionAccess,
    address: PciAddress,
) -> Option<CommandRegister> {
    let mut ep = EndpointHeader::from_header(PciHeader::new(address), access)?;
    let before = ep.command(access);
    ep.update_command(access, |c| {
        c | CommandRegister::MEMORY_ENABLE | CommandRegister::BUS_MASTER_ENABLE
    });
    Some(before)
}

/// Enumerates every function reachable from bus 0.
pub fn enumerate(access: &impl ConfigRegionAccess) -> Vec<PciFunction> {
    let mut found = Vec::new();
    let mut visited = [false; 256];
    scan_bus(access, 0, &mut visited, &mut found);
    found
}

fn scan_bus(
    access: &impl ConfigRegionAccess,
    bus: u8,
    visited: &mut [bool; 256],
    found: &mut Vec<PciFunction>,
) {
    if core::mem::replace(&mut visited[usize::from(bus)], true) {
        return;
    }
    for device in 0..32 {
        let header = PciHeader::new(PciAddress::new(0, bus, device, 0));
        if header.id(access).0 == 0xffff {
            continue;
        }
        let functions = if header.has_multiple_functions(access) {
            8
        } else {
            1
        };
        for function in 0..functions {
            let address = PciAddress::new(0, bus, device, function);
            if let Some((f, secondary)) = probe(access, address) {
                found.push(f);
                if let Some(sec) = secondary {
                    scan_bus(access, sec, visited, found);
                }
            }
        }
    }
}

fn probe(
    access: &impl ConfigRegionAccess,
    address: PciAddress,
) -> Option<(PciFunction, Option<u8>)> {
    let header = PciHeader::new(address);
    let (vendor, device) = header.id(access);
    if vendor == 0xffff {
        return None;
    }
    let (revision, class, subclass, prog_if) = header.revision_and_class(access);
    let mut f = PciFunction {
        address,
        vendor,
        device,
        class,
        subclass,
        prog_if,
        revision,
        bars: [None; 6],
        bridge: false,
    };
    let mut secondary = None;
    match header.header_type(access) {
        HeaderType::Endpoint => {
            let mut ep = EndpointHeader::from_header(header, access)?;
            let saved = ep.command(access);
            ep.update_command(access, |c| {
                c - (CommandRegister::IO_ENABLE | CommandRegister::MEMORY_ENABLE)
            });
            let mut slot = 0;
            while slot < 6 {
                let bar = ep.bar(slot, access);
                f.bars[usize::from(slot)] = bar;
                slot += if matches!(bar, Some(Bar::Memory64 { .. })) {
                    2
                } else {
                    1
                };
            }
            ep.update_command(access, |_| saved);
        }
        HeaderType::PciPciBridge => {
            f.bridge = true;
            let b = PciPciBridgeHeader::from_header(header, access)?;
            let sec = b.secondary_bus_number(access);
            if sec != 0 {
                secondary = Some(sec);
            }
        }
        _ => {}
    }
    Some((f, secondary))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// A device model: config dwords plus, per BAR dword, the writable mask.
    struct FakeFn {
        regs: [u32; 64],
        bar_mask: [u32; 6],
    }

    #[derive(Default)]
    struct FakeBus {
        fns: RefCell<HashMap<(u8, u8, u8), FakeFn>>,
    }

    impl FakeBus {
        fn add(&self, bdf: (u8, u8, u8), id: (u16, u16), class: u32, header_type: u8) -> &Self {
            let mut regs = [0u32; 64];
            regs[0] = u32::from(id.0) | (u32::from(id.1) << 16);
            regs[1] = 0x0000_0007; // io + mem + bus master enabled
            regs[2] = class << 8 | 0x01;
            regs[3] = u32::from(header_type) << 16;
            self.fns.borrow_mut().insert(
                bdf,
                FakeFn {
                    regs,
                    bar_mask: [0; 6],
                },
            );
            self
        }
        /// Sets a BAR's value and size; 64-bit BARs take two slots.
        fn bar(&self, bdf: (u8, u8, u8), slot: usize, value: u64, size: u64, is64: bool) -> &Self {
            let mut fns = self.fns.borrow_mut();
            let f = fns.get_mut(&bdf).unwrap();
            let mask = !(size - 1);
            f.regs[4 + slot] = value as u32;
            f.bar_mask[slot] = (mask as u32) & !0xf;
            if is64 {
                f.regs[5 + slot] = (value >> 32) as u32;
                f.bar_mask[slot + 1] = (mask >> 32) as u32;
            }
            self
        }
    }

    impl ConfigRegionAccess for FakeBus {
        unsafe fn read(&self, a: PciAddress, offset: u16) -> u32 {
            let fns = self.fns.borrow();
            match fns.get(&(a.bus(), a.device(), a.function())) {
                Some(f) => f.regs[usize::from(offset / 4)],
                None => 0xffff_ffff,
            }
        }
        unsafe fn write(&self, a: PciAddress, offset: u16, value: u32) {
            let mut fns = self.fns.borrow_mut();
            let Some(f) = fns.get_mut(&(a.bus(), a.device(), a.function())) else {
                return;
            };
            let i = usize::from(offset / 4);
            if (4..10).contains(&i) {
                if value == 0xffff_ffff {
                    // Sizing probe: memory decoding must be off.
                    assert_eq!(f.regs[1] & 0x3, 0, "BAR probed with decoding enabled");
                }
                let m = f.bar_mask[i - 4];
                f.regs[i] = (value & m) | (f.regs[i] & !m & 0xf);
            } else {
                f.regs[i] = value;
            }
        }
    }

    #[test]
    fn enumerates_qemu_like_bus_with_64bit_bars() {
        let bus = FakeBus::default();
        bus.add((0, 0, 0), (0x8086, 0x1237), 0x06_00_00, 0)
            .add((0, 3, 0), (0x1af4, 0x1041), 0x02_00_00, 0)
            .bar((0, 3, 0), 1, 0xfebd_1000, 0x1000, false)
            .bar((0, 3, 0), 4, 0xfe00_000c, 0x4000, true)
            .add((0, 4, 0), (0x1b36, 0x0010), 0x01_08_02, 0)
            .bar((0, 4, 0), 0, 0x8_0000_0004, 0x4000, true)
            .add((0, 5, 0), (0x1b36, 0x0001), 0x06_04_00, 1)
            .add((1, 0, 0), (0x1af4, 0x1000), 0x02_00_00, 0);
        // Bridge: secondary bus number 1 at offset 0x19.
        bus.fns.borrow_mut().get_mut(&(0, 5, 0)).unwrap().regs[6] = 1 << 8;

        let found = enumerate(&bus);
        let ids: Vec<(u16, u16)> = found.iter().map(|f| (f.vendor, f.device)).collect();
        assert_eq!(
            ids,
            [
                (0x8086, 0x1237),
                (0x1af4, 0x1041),
                (0x1b36, 0x0010),
                (0x1b36, 0x0001),
                (0x1af4, 0x1000)
            ]
        );
        let net = &found[1];
        assert_eq!(net.class_name(), "network/ethernet");
        assert!(matches!(
            net.bars[4],
            Some(Bar::Memory64 {
                address: 0xfe00_0000,
                size: 0x4000,
                prefetchable: true
            })
        ));
        assert!(net.bars[5].is_none());
        assert!(matches!(
            net.bars[1],
            Some(Bar::Memory32 {
                address: 0xfebd_1000,
                size: 0x1000,
                ..
            })
        ));
        let nvme = &found[2];
        assert_eq!(nvme.class_name(), "storage/nvme");
        assert!(matches!(
            nvme.bars[0],
            Some(Bar::Memory64 {
                address: 0x8_0000_0000,
                size: 0x4000,
                prefetchable: false
            })
        ));
        let windows: Vec<_> = nvme.memory_windows().collect();
        assert_eq!(windows, [(0, 0x8_0000_0000, 0x4000)]);
        assert!(found[3].bridge);
        assert_eq!(found[4].address.bus(), 1);
        // Decoding restored and BARs restored after the probe.
        let fns = bus.fns.borrow();
        assert_eq!(fns[&(0, 4, 0)].regs[1] & 0x7, 0x7);
        assert_eq!(fns[&(0, 4, 0)].regs[4], 0x0000_0004);
        assert_eq!(fns[&(0, 4, 0)].regs[5], 0x8);
        let line = nvme.to_string();
        assert_eq!(
            line,
            "00:04.0 1b36:0010 class 01.08.02 rev 01 (storage/nvme) bar0=mem64:0x800000000+0x4000"
        );
        assert!(nvme.is_nvme() && !net.is_nvme());
        assert_eq!(nvme.memory_bar(0), Some((0x8_0000_0000, 0x4000)));
        assert_eq!(nvme.memory_bar(1), None);
        assert_eq!(net.memory_bar(4), Some((0xfe00_0000, 0x4000)));
    }

    #[test]
    fn enabling_bus_master_keeps_other_command_bits() {
        let bus = FakeBus::default();
        bus.add((0, 4, 0), (0x1b36, 0x0010), 0x01_08_02, 0).add(
            (0, 5, 0),
            (0x1b36, 0x0001),
            0x06_04_00,
            1,
        );
        let a = PciAddress::new(0, 0, 4, 0);
        // Decoding off, INTx disabled (bit 10) as firmware may leave it.
        bus.fns.borrow_mut().get_mut(&(0, 4, 0)).unwrap().regs[1] = 1 << 10;
        // SAFETY: a fake device; no memory is touched.
        let before = unsafe { enable_memory_and_bus_master(&bus, a) }.unwrap();
        assert_eq!(before.bits(), 1 << 10);
        assert_eq!(
            bus.fns.borrow()[&(0, 4, 0)].regs[1] & 0xffff,
            (1 << 10) | 0x2 | 0x4
        );
        // SAFETY: as above.
        let bridge = unsafe { enable_memory_and_bus_master(&bus, PciAddress::new(0, 0, 5, 0)) };
        assert!(bridge.is_none(), "not an endpoint");
    }
}
