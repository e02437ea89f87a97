//! The normalized boot information handed to the kernel.

use crate::AcpiRoot;

/// Which boot protocol entered the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum BootProtocol {
    /// Xen PVH direct boot (`qemu -kernel`, Firecracker, cloud-hypervisor).
    Pvh = 1,
    /// Multiboot2 (GRUB).
    Multiboot2 = 2,
}

impl BootProtocol {
    /// Short lower-case name for logs.
    pub fn name(self) -> &'static str {
        match self {
            BootProtocol::Pvh => "pvh",
            BootProtocol::Multiboot2 => "multiboot2",
        }
    }
}

/// What a range of physical memory is, in E820 terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    /// Free RAM (E820 type 1).
    Usable,
    /// Reserved by firmware or devices (type 2, and unknown types).
    Reserved,
    /// ACPI tables, reclaimable after parsing (type 3).
    AcpiReclaimable,
    /// ACPI non-volatile storage (type 4).
    AcpiNvs,
    /// Defective RAM (type 5).
    Bad,
}

impl MemoryKind {
    /// Maps an E820 / Multiboot2 memory type number to a kind.
    pub fn from_e820(typ: u32) -> Self {
        match typ {
            1 => MemoryKind::Usable,
            3 => MemoryKind::AcpiReclaimable,
            4 => MemoryKind::AcpiNvs,
            5 => MemoryKind::Bad,
            _ => MemoryKind::Reserved,
        }
    }

    /// Short lower-case name for logs.
    pub fn name(self) -> &'static str {
        match self {
            MemoryKind::Usable => "usable",
            MemoryKind::Reserved => "reserved",
            MemoryKind::AcpiReclaimable => "acpi-reclaimable",
            MemoryKind::AcpiNvs => "acpi-nvs",
            MemoryKind::Bad => "bad",
        }
    }
}

/// One range of physical memory `[start, start + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    /// First byte.
    pub start: u64,
    /// Length in bytes (never 0 in a [`MemoryMap`]).
    pub len: u64,
    /// What the range is.
    pub kind: MemoryKind,
}

impl MemoryRegion {
    /// One past the last byte (saturating).
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

/// A sorted memory map with a fixed capacity (no allocator exists at boot).
#[derive(Debug, Clone, Copy)]
pub struct MemoryMap {
    regions: [MemoryRegion; MemoryMap::CAPACITY],
    len: usize,
    dropped: usize,
}

impl Default for MemoryMap {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryMap {
    /// Most regions kept; real firmware reports a few dozen at most.
    pub const CAPACITY: usize = 128;

    /// An empty map.
    pub const fn new() -> Self {
        MemoryMap {
            regions: [MemoryRegion {
                start: 0,
                len: 0,
                kind: MemoryKind::Reserved,
            }; MemoryMap::CAPACITY],
            len: 0,
            dropped: 0,
        }
    }

    /// Adds a region, keeping the map sorted by start address. Empty
    /// regions are ignored; past [`Self::CAPACITY`] regions are counted in
    /// [`Self::dropped`] instead of stored.
    pub fn push(&mut self, start: u64, len: u64, kind: MemoryKind) {
        if len == 0 {
            return;
        }
        if self.len == Self::CAPACITY {
            self.dropped += 1;
            return;
        }
        let at = self.regions[..self.len].partition_point(|r| r.start <= start);
        self.regions.copy_within(at..self.len, at + 1);
        self.regions[at] = MemoryRegion { start, len, kind };
        self.len += 1;
    }

    /// The regions, sorted by start address.
    pub fn regions(&self) -> &[MemoryRegion] {
        &self.regions[..self.len]
    }

    /// How many regions did not fit.
    pub fn dropped(&self) -> usize {
        self.dropped
    }

    /// Total bytes of [`MemoryKind::Usable`] memory.
    pub fn usable_bytes(&self) -> u64 {
        self.regions()
            .iter()
            .filter(|r| r.kind == MemoryKind::Usable)
            .map(|r| r.len)
            .sum()
    }

    /// One past the highest byte of any region (0 if empty).
    pub fn end(&self) -> u64 {
        self.regions()
            .iter()
            .map(MemoryRegion::end)
            .max()
            .unwrap_or(0)
    }

    /// Whether no two regions overlap.
    pub fn is_disjoint(&self) -> bool {
        self.regions().windows(2).all(|w| w[0].end() <= w[1].start)
    }
}

/// The kernel command line, copied out of loader memory.
#[derive(Clone, Copy)]
pub struct Cmdline {
    bytes: [u8; Cmdline::CAPACITY],
    len: usize,
    truncated: bool,
}

impl core::fmt::Debug for Cmdline {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Default for Cmdline {
    fn default() -> Self {
        Self::new()
    }
}

impl Cmdline {
    /// Longest command line kept, in bytes.
    pub const CAPACITY: usize = 2048;

    /// An empty command line.
    pub const fn new() -> Self {
        Cmdline {
            bytes: [0; Cmdline::CAPACITY],
            len: 0,
            truncated: false,
        }
    }

    /// Builds from raw bytes: stops at the first NUL, replaces non-ASCII
    /// bytes with `?`, truncates at [`Self::CAPACITY`].
    pub fn from_bytes(raw: &[u8]) -> Self {
        let mut c = Self::new();
        for &b in raw.iter().take_while(|&&b| b != 0) {
            if c.len == Self::CAPACITY {
                c.truncated = true;
                break;
            }
            c.bytes[c.len] = if b.is_ascii() { b } else { b'?' };
            c.len += 1;
        }
        c
    }

    /// The command line (always valid ASCII).
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }

    /// Whether the loader's command line was longer than [`Self::CAPACITY`].
    pub fn truncated(&self) -> bool {
        self.truncated
    }
}

/// Everything the kernel learns from its boot loader.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// How the kernel was entered.
    pub protocol: BootProtocol,
    /// Physical memory map, sorted.
    pub memory: MemoryMap,
    /// Kernel command line.
    pub cmdline: Cmdline,
    /// ACPI root pointer contents, when the firmware provides one.
    pub acpi: Option<AcpiRoot>,
}

impl BootInfo {
    /// An empty boot info for `protocol`.
    pub const fn new(protocol: BootProtocol) -> Self {
        BootInfo {
            protocol,
            memory: MemoryMap::new(),
            cmdline: Cmdline::new(),
            acpi: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_sorts_and_ignores_empty() {
        let mut m = MemoryMap::new();
        m.push(0x10_0000, 0x100, MemoryKind::Usable);
        m.push(0, 0x9fc00, MemoryKind::Usable);
        m.push(0x5000, 0, MemoryKind::Reserved);
        m.push(0xf0000, 0x10000, MemoryKind::Reserved);
        let starts: Vec<u64> = m.regions().iter().map(|r| r.start).collect();
        assert_eq!(starts, [0, 0xf0000, 0x10_0000]);
        assert_eq!(m.usable_bytes(), 0x9fc00 + 0x100);
        assert_eq!(m.end(), 0x10_0100);
        assert!(m.is_disjoint());
        m.push(0x10_0080, 0x10, MemoryKind::Reserved);
        assert!(!m.is_disjoint());
    }

    #[test]
    fn memory_map_counts_overflow() {
        let mut m = MemoryMap::new();
        for i in 0..(MemoryMap::CAPACITY as u64 + 3) {
            m.push(i * 0x1000, 0x1000, MemoryKind::Usable);
        }
        assert_eq!(m.regions().len(), MemoryMap::CAPACITY);
        assert_eq!(m.dropped(), 3);
    }

    #[test]
    fn cmdline_stops_at_nul_and_sanitizes() {
        let c = Cmdline::from_bytes(b"fractos.log=debug \xff x\0garbage");
        assert_eq!(c.as_str(), "fractos.log=debug ? x");
        assert!(!c.truncated());
        let long = vec![b'a'; Cmdline::CAPACITY + 5];
        let c = Cmdline::from_bytes(&long);
        assert_eq!(c.as_str().len(), Cmdline::CAPACITY);
        assert!(c.truncated());
    }

    #[test]
    fn e820_types() {
        assert_eq!(MemoryKind::from_e820(1), MemoryKind::Usable);
        assert_eq!(MemoryKind::from_e820(3), MemoryKind::AcpiReclaimable);
        assert_eq!(MemoryKind::from_e820(4), MemoryKind::AcpiNvs);
        assert_eq!(MemoryKind::from_e820(5), MemoryKind::Bad);
        assert_eq!(MemoryKind::from_e820(2), MemoryKind::Reserved);
        assert_eq!(MemoryKind::from_e820(77), MemoryKind::Reserved);
    }
}
