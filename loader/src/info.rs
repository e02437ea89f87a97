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
    /// Longest command line kept, in bytes: what QEMU's PVH boot ROM
    /// holds (4096 with the NUL). Longer ones are marked
    /// [`Self::truncated`]; the kernel refuses them.
    pub const CAPACITY: usize = 4095;

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

/// A boot module (Multiboot2 `module2`): a range of physical memory the
/// loader filled with a file, and the module's command line.
///
/// The range is only recorded, never read, by the loader: the kernel reads
/// what it needs (a cluster key) before it reuses that memory.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct BootModule {
    /// First byte.
    pub start: u64,
    /// One past the last byte (`>= start`).
    pub end: u64,
    cmdline: [u8; BootModule::CMDLINE_CAPACITY],
    cmdline_len: usize,
}

impl core::fmt::Debug for BootModule {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BootModule")
            .field("start", &self.start)
            .field("end", &self.end)
            .field("cmdline", &self.cmdline())
            .finish()
    }
}

impl BootModule {
    /// Longest module command line kept, in bytes (longer ones are cut).
    pub const CMDLINE_CAPACITY: usize = 64;

    /// A module over `[start, end)` (an inverted range is recorded as
    /// empty) with `cmdline` (cut at a NUL or [`Self::CMDLINE_CAPACITY`],
    /// non-ASCII bytes replaced with `?`).
    pub fn new(start: u64, end: u64, cmdline: &[u8]) -> Self {
        let mut m = BootModule {
            start,
            end: end.max(start),
            cmdline: [0; Self::CMDLINE_CAPACITY],
            cmdline_len: 0,
        };
        for &b in cmdline
            .iter()
            .take_while(|&&b| b != 0)
            .take(Self::CMDLINE_CAPACITY)
        {
            m.cmdline[m.cmdline_len] = if b.is_ascii() { b } else { b'?' };
            m.cmdline_len += 1;
        }
        m
    }

    /// Its size in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Its command line (always ASCII).
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }
}

/// The boot modules, with a fixed capacity.
#[derive(Debug, Clone, Copy)]
pub struct Modules {
    list: [BootModule; Modules::CAPACITY],
    len: usize,
    dropped: usize,
}

impl Default for Modules {
    fn default() -> Self {
        Self::new()
    }
}

impl Modules {
    /// Most modules kept.
    pub const CAPACITY: usize = 16;

    /// No modules.
    pub const fn new() -> Self {
        Modules {
            list: [BootModule {
                start: 0,
                end: 0,
                cmdline: [0; BootModule::CMDLINE_CAPACITY],
                cmdline_len: 0,
            }; Modules::CAPACITY],
            len: 0,
            dropped: 0,
        }
    }

    /// Adds a module; past [`Self::CAPACITY`] it is counted in
    /// [`Self::dropped`] instead.
    pub fn push(&mut self, m: BootModule) {
        match self.list.get_mut(self.len) {
            Some(slot) => {
                *slot = m;
                self.len += 1;
            }
            None => self.dropped += 1,
        }
    }

    /// The modules, in the loader's order.
    pub fn as_slice(&self) -> &[BootModule] {
        &self.list[..self.len]
    }

    /// How many modules did not fit.
    pub fn dropped(&self) -> usize {
        self.dropped
    }
}

/// Everything the kernel learns from its boot loader.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// How the kernel was entered.
    pub protocol: BootProtocol,
    /// Physical memory map, sorted.
    pub memory: MemoryMap,
    /// Boot modules (Multiboot2 modules; the PVH module list, e.g. the initrd).
    pub modules: Modules,
    /// Kernel command line.
    pub cmdline: Cmdline,
    /// ACPI root pointer contents, when the firmware provides one.
    pub acpi: Option<AcpiRoot>,
    /// The memory map came from UEFI (Multiboot2 tag 17), not E820.
    pub memory_from_efi: bool,
}

impl BootInfo {
    /// An empty boot info for `protocol`.
    pub const fn new(protocol: BootProtocol) -> Self {
        BootInfo {
            protocol,
            memory: MemoryMap::new(),
            modules: Modules::new(),
            cmdline: Cmdline::new(),
            acpi: None,
            memory_from_efi: false,
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
    fn modules_keep_ranges_and_command_lines() {
        let mut ms = Modules::new();
        ms.push(BootModule::new(
            0x20_0000,
            0x20_0041,
            b"fractos-cluster-key\0junk",
        ));
        ms.push(BootModule::new(0x30_0000, 0x10, &[b'x'; 100]));
        ms.push(BootModule::new(0, 0, b"caf\xc3\xa9"));
        let m = ms.as_slice();
        assert_eq!(m.len(), 3);
        assert_eq!((m[0].len(), m[0].cmdline()), (0x41, "fractos-cluster-key"));
        assert!(m[1].is_empty(), "inverted range is empty");
        assert_eq!(m[1].cmdline().len(), BootModule::CMDLINE_CAPACITY);
        assert_eq!(m[2].cmdline(), "caf??");
        for _ in 0..Modules::CAPACITY {
            ms.push(BootModule::new(0, 1, b""));
        }
        assert_eq!(ms.as_slice().len(), Modules::CAPACITY);
        assert_eq!(ms.dropped(), 3);
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
