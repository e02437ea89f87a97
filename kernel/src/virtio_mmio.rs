//! virtio-mmio device announcements on the kernel command line.
//!
//! VMMs without PCI (Firecracker, QEMU `-M microvm`) place virtio devices
//! as memory-mapped register blocks and announce each one on the kernel
//! command line the way Linux's `virtio_mmio` driver reads them:
//!
//! ```text
//! virtio_mmio.device=<size>@<base>:<irq>[:<id>]
//! ```
//!
//! `<size>` is a number with an optional `K`, `M` or `G` suffix
//! (`512`, `4K`, `0x1000`), `<base>` the physical address (`0xfeb00e00`,
//! decimal also accepted), `<irq>` the interrupt line and `<id>` Linux's
//! platform-device id (both parsed and kept, unused: the appliance polls).
//! QEMU microvm (with `acpi=off`; with ACPI it describes the devices in the
//! DSDT instead) writes `virtio_mmio.device=512@0xfeb00e00:12`; Firecracker
//! `virtio_mmio.device=4K@0xd0000000:5`.
//!
//! Parsing is strict: a malformed entry is reported as an
//! [`MmioEntryError`] and skipped, never guessed at. [`check_window`] then
//! refuses windows the page tables must not map as a device: overlapping
//! RAM or ACPI memory of the memory map, the first MiB, beyond the
//! identity map's reach, too small for the register block, or overlapping
//! a PCI BAR, the APICs or another announced device.

use alloc::vec::Vec;

use fractos_loader::{MemoryKind, MemoryRegion};

/// The command-line key.
pub const KEY: &str = "virtio_mmio.device";

/// The register block (header) of a virtio-mmio device: 0x100 bytes,
/// device configuration space after it. A NIC's configuration needs a few
/// more bytes (MAC, status), so a window is at least this large.
pub const MIN_SIZE: u64 = 0x200;

/// The largest window accepted: VMMs use 512 bytes (QEMU) or 4 KiB
/// (Firecracker); anything beyond 1 MiB is a typo, and would cost page
/// tables for nothing.
pub const MAX_SIZE: u64 = 1 << 20;

/// Devices must lie below this address: the kernel maps them at their
/// physical address, which must be a canonical lower-half virtual address
/// (x86-64, 4-level paging: below 2^47).
pub const ADDRESS_LIMIT: u64 = 1 << 47;

/// One announced virtio-mmio device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    /// Physical address of the register block.
    pub base: u64,
    /// Window size in bytes (header plus device configuration).
    pub size: u64,
    /// Interrupt line (unused: the driver polls).
    pub irq: u32,
    /// Linux platform-device id, if given.
    pub id: Option<u32>,
}

impl MmioDevice {
    /// One past the window's last byte.
    ///
    /// Saturating: [`parse_entry`] never yields a window that wraps, but
    /// the fields are public and [`check_window`] must not overflow on a
    /// device built by hand.
    pub fn end(&self) -> u64 {
        self.base.saturating_add(self.size)
    }

    /// The window rounded out to whole 4 KiB pages: what the page tables
    /// map uncached.
    pub fn pages(&self) -> (u64, u64) {
        let start = self.base & !0xfff;
        let end = self.end().saturating_add(0xfff) & !0xfff;
        (start, end)
    }
}

impl core::fmt::Display for MmioDevice {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "mmio@{:#x}", self.base)
    }
}

/// Why one `virtio_mmio.device=` entry is not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MmioEntryError<'a> {
    /// The entry is not `<size>@<base>:<irq>[:<id>]`.
    #[error(
        "`{KEY}={0}` ignored: expected <size>@<base>:<irq>[:<id>], e.g. {KEY}=512@0xfeb00e00:12"
    )]
    Syntax(&'a str),
    /// The size does not parse.
    #[error("`{KEY}={entry}` ignored: bad size `{size}`: expected a number with an optional K, M or G suffix (512, 4K, 0x1000)")]
    BadSize {
        /// The whole entry.
        entry: &'a str,
        /// The size part.
        size: &'a str,
    },
    /// The base address does not parse.
    #[error("`{KEY}={entry}` ignored: bad base address `{base}`: expected 0x<hex> or decimal")]
    BadBase {
        /// The whole entry.
        entry: &'a str,
        /// The base part.
        base: &'a str,
    },
    /// The interrupt line or id does not parse.
    #[error("`{KEY}={entry}` ignored: bad {what} `{value}`: expected a decimal number")]
    BadNumber {
        /// The whole entry.
        entry: &'a str,
        /// `irq` or `id`.
        what: &'static str,
        /// What was given.
        value: &'a str,
    },
    /// The window is smaller than a device's registers or implausibly large.
    #[error("virtio-mmio device at {base:#x}: size {size:#x} ignored: a window is {MIN_SIZE:#x} to {MAX_SIZE:#x} bytes")]
    BadWindowSize {
        /// Base address.
        base: u64,
        /// Its size.
        size: u64,
    },
    /// The base is not 4-byte aligned (the registers are 32-bit).
    #[error("virtio-mmio device at {0:#x} ignored: the base must be 4-byte aligned")]
    Unaligned(u64),
    /// The window reaches beyond what the kernel can map.
    #[error("virtio-mmio device at {base:#x} (size {size:#x}) ignored: it ends above {ADDRESS_LIMIT:#x}, beyond the kernel's identity map")]
    TooHigh {
        /// Base address.
        base: u64,
        /// Its size.
        size: u64,
    },
    /// The window lies in the first MiB (BIOS, VGA and ROM area).
    #[error("virtio-mmio device at {0:#x} ignored: the first MiB is legacy BIOS/VGA space, not a device window")]
    LowMemory(u64),
    /// The window overlaps memory the memory map describes as RAM or ACPI.
    #[error("virtio-mmio device at {base:#x} (size {size:#x}) ignored: it overlaps {kind} memory [{start:#x}-{end:#x}) of the memory map")]
    OverlapsMemory {
        /// Base address.
        base: u64,
        /// Its size.
        size: u64,
        /// The region's kind.
        kind: &'static str,
        /// The region's first byte.
        start: u64,
        /// One past its last byte.
        end: u64,
    },
    /// The window overlaps another device: a PCI BAR, the I/O APIC or the
    /// local APIC.
    #[error(
        "virtio-mmio device at {base:#x} ignored: it overlaps the {what} at [{start:#x}-{end:#x})"
    )]
    OverlapsDeviceWindow {
        /// Base address.
        base: u64,
        /// What is there.
        what: &'static str,
        /// Its first byte.
        start: u64,
        /// One past its last byte.
        end: u64,
    },
    /// The window overlaps one announced before it.
    #[error("virtio-mmio device at {base:#x} ignored: it overlaps the device at {other:#x} announced before it")]
    OverlapsDevice {
        /// Base address.
        base: u64,
        /// The earlier device's base.
        other: u64,
    },
}

/// Parses a number as Linux's `memparse`/`%lli` do, minus octal: `0x`
/// hex or decimal.
fn number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            u64::from_str_radix(hex, 16).ok()
        }
        Some(_) => None,
        None if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s.parse().ok(),
        None => None,
    }
}

/// A decimal `u32` (interrupt lines, ids).
fn decimal(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// A size with an optional `K`/`M`/`G` suffix (either case).
fn size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n = number(digits)?;
    n.checked_mul(1 << shift)
}

/// Parses one entry (the value after `virtio_mmio.device=`).
pub fn parse_entry(entry: &str) -> Result<MmioDevice, MmioEntryError<'_>> {
    let (size_s, rest) = entry.split_once('@').ok_or(MmioEntryError::Syntax(entry))?;
    let mut parts = rest.split(':');
    let base_s = parts.next().ok_or(MmioEntryError::Syntax(entry))?;
    let irq_s = parts.next().ok_or(MmioEntryError::Syntax(entry))?;
    let id_s = parts.next();
    if parts.next().is_some() {
        return Err(MmioEntryError::Syntax(entry));
    }
    let size = size(size_s).ok_or(MmioEntryError::BadSize {
        entry,
        size: size_s,
    })?;
    let base = number(base_s).ok_or(MmioEntryError::BadBase {
        entry,
        base: base_s,
    })?;
    let irq = decimal(irq_s).ok_or(MmioEntryError::BadNumber {
        entry,
        what: "irq",
        value: irq_s,
    })?;
    let id = match id_s {
        None => None,
        Some(v) => Some(decimal(v).ok_or(MmioEntryError::BadNumber {
            entry,
            what: "id",
            value: v,
        })?),
    };
    if !(MIN_SIZE..=MAX_SIZE).contains(&size) {
        return Err(MmioEntryError::BadWindowSize { base, size });
    }
    if base % 4 != 0 {
        return Err(MmioEntryError::Unaligned(base));
    }
    if base.checked_add(size).is_none_or(|end| end > ADDRESS_LIMIT) {
        return Err(MmioEntryError::TooHigh { base, size });
    }
    Ok(MmioDevice {
        base,
        size,
        irq,
        id,
    })
}

/// Every `virtio_mmio.device=` entry of `cmdline`, in order, each parsed
/// (a word may repeat; other words are ignored).
pub fn parse_cmdline(cmdline: &str) -> Vec<Result<MmioDevice, MmioEntryError<'_>>> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.strip_prefix(KEY)?.strip_prefix('='))
        .map(parse_entry)
        .collect()
}

fn kind_name(kind: MemoryKind) -> &'static str {
    match kind {
        MemoryKind::Usable => "usable",
        MemoryKind::Reserved => "reserved",
        MemoryKind::AcpiReclaimable => "ACPI reclaimable",
        MemoryKind::AcpiNvs => "ACPI NVS",
        MemoryKind::Bad => "bad",
    }
}

/// The x86 interrupt controllers' fixed windows: the I/O APIC's registers
/// and the local APIC / MSI range.
pub const APIC_WINDOWS: [(&str, u64, u64); 2] = [
    ("I/O APIC", 0xfec0_0000, 0x1000),
    ("local APIC", 0xfee0_0000, 0x10_0000),
];

/// Checks that `dev` may be mapped as a device window: outside the first
/// MiB, outside every non-reserved region of the memory map (RAM, ACPI,
/// bad RAM), outside the APICs' windows and every PCI BAR of `bars`
/// (`(address, size)`), and not overlapping any of `earlier` (the devices
/// accepted before it).
pub fn check_window<'a>(
    dev: &MmioDevice,
    memory: &[MemoryRegion],
    bars: &[(u64, u64)],
    earlier: &[MmioDevice],
) -> Result<(), MmioEntryError<'a>> {
    if dev.base < 0x10_0000 {
        return Err(MmioEntryError::LowMemory(dev.base));
    }
    // Checked when parsed; again for a device built by hand.
    if !(MIN_SIZE..=MAX_SIZE).contains(&dev.size) {
        return Err(MmioEntryError::BadWindowSize {
            base: dev.base,
            size: dev.size,
        });
    }
    if dev
        .base
        .checked_add(dev.size)
        .is_none_or(|end| end > ADDRESS_LIMIT)
    {
        return Err(MmioEntryError::TooHigh {
            base: dev.base,
            size: dev.size,
        });
    }
    let fixed = APIC_WINDOWS.iter().copied();
    let pci = bars.iter().map(|&(a, s)| ("PCI BAR", a, s));
    if let Some((what, start, len)) = fixed
        .chain(pci)
        .find(|&(_, a, s)| a < dev.end() && dev.base < a.saturating_add(s))
    {
        return Err(MmioEntryError::OverlapsDeviceWindow {
            base: dev.base,
            what,
            start,
            end: start.saturating_add(len),
        });
    }
    // Page granular: the page tables map the window's whole pages
    // uncached, so RAM sharing a page with it would be mapped uncached too.
    let (page_start, page_end) = dev.pages();
    if let Some(r) = memory
        .iter()
        .find(|r| r.kind != MemoryKind::Reserved && r.start < page_end && page_start < r.end())
    {
        return Err(MmioEntryError::OverlapsMemory {
            base: dev.base,
            size: dev.size,
            kind: kind_name(r.kind),
            start: r.start,
            end: r.end(),
        });
    }
    if let Some(o) = earlier
        .iter()
        .find(|o| o.base < dev.end() && dev.base < o.end())
    {
        return Err(MmioEntryError::OverlapsDevice {
            base: dev.base,
            other: o.base,
        });
    }
    Ok(())
}

/// The usable devices of `cmdline` against the memory map and the PCI
/// BARs: each entry parsed and checked; `on_error` gets every refused one.
pub fn devices<'a>(
    cmdline: &'a str,
    memory: &[MemoryRegion],
    bars: &[(u64, u64)],
    mut on_error: impl FnMut(MmioEntryError<'a>),
) -> Vec<MmioDevice> {
    let mut ok: Vec<MmioDevice> = Vec::new();
    for entry in parse_cmdline(cmdline) {
        match entry.and_then(|d| check_window(&d, memory, bars, &ok).map(|()| d)) {
            Ok(d) => ok.push(d),
            Err(e) => on_error(e),
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(start: u64, len: u64, kind: MemoryKind) -> MemoryRegion {
        MemoryRegion { start, len, kind }
    }

    fn qemu_map() -> Vec<MemoryRegion> {
        vec![
            region(0, 0x9fc00, MemoryKind::Usable),
            region(0xf0000, 0x10000, MemoryKind::Reserved),
            region(0x10_0000, 0x7f0_0000, MemoryKind::Usable),
            region(0xfeff_c000, 0x4000, MemoryKind::Reserved),
        ]
    }

    #[test]
    fn parses_what_qemu_and_firecracker_write() {
        let d = parse_entry("512@0xfeb00e00:12").unwrap();
        assert_eq!(
            d,
            MmioDevice {
                base: 0xfeb0_0e00,
                size: 512,
                irq: 12,
                id: None
            }
        );
        assert_eq!(d.end(), 0xfeb0_1000);
        assert_eq!(d.to_string(), "mmio@0xfeb00e00");
        let f = parse_entry("4K@0xd0000000:5").unwrap();
        assert_eq!((f.base, f.size, f.irq), (0xd000_0000, 4096, 5));
        let g = parse_entry("0x1000@3489660928:5:7").unwrap();
        assert_eq!((g.base, g.size, g.id), (0xd000_0000, 4096, Some(7)));
        assert_eq!(parse_entry("1m@0xd0000000:5").unwrap().size, 1 << 20);
    }

    #[test]
    fn malformed_entries_are_typed_errors() {
        use MmioEntryError as E;
        assert_eq!(parse_entry("512"), Err(E::Syntax("512")));
        assert_eq!(
            parse_entry("512@0xfeb00000"),
            Err(E::Syntax("512@0xfeb00000"))
        );
        assert_eq!(
            parse_entry("512@0xfeb00000:1:2:3"),
            Err(E::Syntax("512@0xfeb00000:1:2:3"))
        );
        // Entry, and the error's variant name as `Debug` prints it.
        let refused = [
            ("5x@0xfeb00000:1", "BadSize"),
            ("K@0xfeb00000:1", "BadSize"),
            ("99999999999G@0xfeb00000:1", "BadSize"),
            ("512@feb00000:1", "BadBase"),
            ("512@0x:1", "BadBase"),
            (
                "512@0xfeb00000:-1",
                "BadNumber { entry: \"512@0xfeb00000:-1\", what: \"irq\"",
            ),
            (
                "512@0xfeb00000:5:x",
                "BadNumber { entry: \"512@0xfeb00000:5:x\", what: \"id\"",
            ),
            ("2M@0xfeb00000:5", "BadWindowSize"),
            ("4K@0xfffffffffffff000:5", "TooHigh"),
            ("4K@0x7ffffffff800:5", "TooHigh"),
        ];
        for (entry, variant) in refused {
            let err = format!("{:?}", parse_entry(entry).unwrap_err());
            assert!(err.starts_with(variant), "{entry}: {err}");
        }
        assert_eq!(
            parse_entry("256@0xfeb00000:5"),
            Err(E::BadWindowSize {
                base: 0xfeb0_0000,
                size: 256
            })
        );
        assert_eq!(
            parse_entry("512@0xfeb00002:5"),
            Err(E::Unaligned(0xfeb0_0002))
        );
        assert!(matches!(
            parse_entry("512@feb00000:1"),
            Err(E::BadBase {
                base: "feb00000",
                ..
            })
        ));
        // Every message says what is expected.
        let msg = parse_entry("junk").unwrap_err().to_string();
        assert!(msg.contains("expected <size>@<base>:<irq>"), "{msg}");
    }

    #[test]
    fn windows_must_not_overlap_memory_or_each_other() {
        let map = qemu_map();
        let d = |s: &str| parse_entry(s).unwrap();
        assert_eq!(
            check_window(&d("512@0xfeb00e00:12"), &map, &[], &[]),
            Ok(())
        );
        // A reserved region is device space: fine.
        assert_eq!(check_window(&d("4K@0xfeffc000:12"), &map, &[], &[]), Ok(()));
        let err = check_window(&d("4K@0x7fff000:12"), &map, &[], &[]).unwrap_err();
        assert!(
            matches!(err, MmioEntryError::OverlapsMemory { kind: "usable", .. }),
            "{err}"
        );
        assert_eq!(
            check_window(&d("4K@0xf0000:12"), &map, &[], &[]),
            Err(MmioEntryError::LowMemory(0xf0000))
        );
        let first = d("4K@0xd0000000:5");
        assert_eq!(
            check_window(&d("512@0xd0000e00:6"), &map, &[], &[first]),
            Err(MmioEntryError::OverlapsDevice {
                base: 0xd000_0e00,
                other: 0xd000_0000
            })
        );
        assert_eq!(
            check_window(&d("4K@0xd0001000:6"), &map, &[], &[first]),
            Ok(())
        );
        // Other devices' windows: a PCI BAR, the APICs.
        let bar = [(0xfebf_0000u64, 0x4000u64)];
        assert_eq!(
            check_window(&d("512@0xfebf1000:6"), &map, &bar, &[]),
            Err(MmioEntryError::OverlapsDeviceWindow {
                base: 0xfebf_1000,
                what: "PCI BAR",
                start: 0xfebf_0000,
                end: 0xfebf_4000
            })
        );
        assert_eq!(
            check_window(&d("512@0xfebf4000:6"), &map, &bar, &[]),
            Ok(())
        );
        for apic in ["4K@0xfec00000:6", "4K@0xfee00000:6"] {
            let err = check_window(&d(apic), &map, &[], &[]).unwrap_err();
            assert!(err.to_string().contains("APIC"), "{err}");
        }
    }

    #[test]
    fn command_line_entries_are_collected_and_checked() {
        let cmdline = "fractos.node=1 virtio_mmio.device=512@0xfeb00e00:12 \
                       virtio_mmio.device=oops virtio_mmio.devicex=1 \
                       virtio_mmio.device=512@0xfeb00e00:13 virtio_mmio.device=512@0xfeb00c00:11";
        assert_eq!(parse_cmdline(cmdline).len(), 4);
        let mut errors = Vec::new();
        let devs = devices(cmdline, &qemu_map(), &[], |e| errors.push(e));
        let bases: Vec<u64> = devs.iter().map(|d| d.base).collect();
        assert_eq!(bases, [0xfeb0_0e00, 0xfeb0_0c00]);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[0], MmioEntryError::Syntax("oops"));
        assert!(matches!(errors[1], MmioEntryError::OverlapsDevice { .. }));
        assert!(devices("fractos.node=1", &qemu_map(), &[], |_| panic!()).is_empty());
    }

    #[test]
    fn ram_sharing_a_page_with_the_window_is_refused() {
        // RAM ends mid-page; a device starting right after it shares the
        // page, which would be mapped uncached.
        let map = [region(0x10_0000, 0x7f0_0800, MemoryKind::Usable)];
        let dev = parse_entry("512@0x8000800:5").unwrap();
        assert!(matches!(
            check_window(&dev, &map, &[], &[]),
            Err(MmioEntryError::OverlapsMemory { .. })
        ));
        let next_page = parse_entry("512@0x8001000:5").unwrap();
        assert_eq!(check_window(&next_page, &map, &[], &[]), Ok(()));
    }

    #[test]
    fn hand_built_windows_that_wrap_are_refused_not_overflowed() {
        let map = qemu_map();
        let wraps = MmioDevice {
            base: u64::MAX - 0xff,
            size: 0x1000,
            irq: 0,
            id: None,
        };
        assert_eq!(wraps.end(), u64::MAX);
        assert!(matches!(
            check_window(&wraps, &map, &[], &[]),
            Err(MmioEntryError::TooHigh { .. })
        ));
        let huge = MmioDevice {
            base: 0xd000_0000,
            size: u64::MAX,
            irq: 0,
            id: None,
        };
        assert!(matches!(
            check_window(&huge, &map, &[], &[]),
            Err(MmioEntryError::BadWindowSize { .. })
        ));
        // An earlier device built by hand near the top does not overflow the
        // overlap test either.
        let ok = parse_entry("4K@0xd0000000:5").unwrap();
        assert_eq!(
            check_window(&ok, &map, &[(u64::MAX, u64::MAX)], &[wraps]),
            Ok(())
        );
    }

    mod props {
        use super::*;
        use crate::fuzz::{Rng, PRINTABLE};
        use alloc::format;
        use alloc::string::{String, ToString};

        fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
            a.0 < b.1 && b.0 < a.1
        }

        /// An entry built from parts that are each sometimes valid.
        fn entry(r: &mut Rng) -> String {
            let size = match r.below(4) {
                0 => r.below(0x20_0000).to_string(),
                1 => format!("{:#x}", r.number()),
                2 => {
                    let suffix = r.pick(&["K", "M", "G", "k", "m", "g", "T", ""]);
                    format!("{}{suffix}", r.number())
                }
                _ => r.text(b"0123456789xKMG@:", 6),
            };
            let base = match r.below(4) {
                0 => format!("{:#x}", r.below(0x1_0000_0000) & !0x1ff),
                1 => format!("{:#x}", r.number()),
                2 => r.number().to_string(),
                _ => r.text(b"0123456789abcdefx", 20),
            };
            let irq = match r.below(3) {
                0 => (r.u64() as u32).to_string(),
                1 => format!("{}:{}", r.below(32), r.u64() as u32),
                _ => r.text(b"0123456789:-", 12),
            };
            format!("{size}@{base}:{irq}")
        }

        fn memory(r: &mut Rng) -> Vec<MemoryRegion> {
            let kinds = [
                MemoryKind::Usable,
                MemoryKind::Reserved,
                MemoryKind::AcpiReclaimable,
                MemoryKind::AcpiNvs,
                MemoryKind::Bad,
            ];
            (0..r.below(6))
                .map(|_| {
                    let start = r.below(0x1_0000_0000);
                    // Region ends fall mid-page too.
                    region(start, r.below(0x1000_0000), r.pick(&kinds))
                })
                .collect()
        }

        #[test]
        fn arbitrary_text_never_panics() {
            let mut r = Rng::new(0x3310);
            for _ in 0..20_000 {
                let s = if r.chance(2) {
                    r.text(PRINTABLE, 80)
                } else {
                    String::from_utf8_lossy(&r.bytes(80)).into_owned()
                };
                match parse_entry(&s) {
                    Ok(d) => {
                        assert!((MIN_SIZE..=MAX_SIZE).contains(&d.size), "{s}");
                        assert!(d.base % 4 == 0, "{s}");
                        assert!(d
                            .base
                            .checked_add(d.size)
                            .is_some_and(|e| e <= ADDRESS_LIMIT));
                    }
                    Err(e) => assert!(!e.to_string().is_empty()),
                }
                let _ = parse_cmdline(&s);
            }
        }

        #[test]
        fn accepted_windows_never_overlap_ram_devices_or_each_other() {
            let mut r = Rng::new(0x3311);
            let mut accepted = 0;
            for _ in 0..5000 {
                let entries: Vec<String> = (0..r.below(8)).map(|_| entry(&mut r)).collect();
                let memory = memory(&mut r);
                let bars: Vec<(u64, u64)> =
                    (0..r.below(4)).map(|_| (r.number(), r.number())).collect();
                let mut cmdline = r.text(b"abcz=. ", 20);
                for e in &entries {
                    cmdline.push_str(" virtio_mmio.device=");
                    cmdline.push_str(e);
                }
                let mut refused = 0;
                let devs = devices(&cmdline, &memory, &bars, |e| {
                    refused += 1;
                    let _ = e.to_string();
                });
                assert_eq!(devs.len() + refused, entries.len());
                accepted += devs.len();
                for (i, d) in devs.iter().enumerate() {
                    assert!(d.base >= 0x10_0000);
                    assert!((MIN_SIZE..=MAX_SIZE).contains(&d.size));
                    assert!(d
                        .base
                        .checked_add(d.size)
                        .is_some_and(|e| e <= ADDRESS_LIMIT));
                    let w = (d.base, d.end());
                    for m in memory.iter().filter(|m| m.kind != MemoryKind::Reserved) {
                        assert!(!overlaps(d.pages(), (m.start, m.end())), "{d:?} {m:?}");
                    }
                    for &(a, s) in &bars {
                        assert!(
                            !overlaps(w, (a, a.saturating_add(s))),
                            "{d:?} {a:#x}+{s:#x}"
                        );
                    }
                    for (_, a, s) in APIC_WINDOWS {
                        assert!(!overlaps(w, (a, a + s)));
                    }
                    for o in &devs[..i] {
                        assert!(!overlaps(w, (o.base, o.end())), "{d:?} {o:?}");
                    }
                }
            }
            assert!(
                accepted > 100,
                "the generator reaches accepted windows ({accepted})"
            );
        }

        #[test]
        fn sizes_with_suffixes_never_overflow() {
            let mut r = Rng::new(0x3312);
            for _ in 0..20_000 {
                let n = r.number();
                let (letter, shift) = r.pick(&[("", 0), ("K", 10), ("M", 20), ("G", 30)]);
                let entry = format!("{n}{letter}@0xd0000000:5");
                let got = parse_entry(&entry);
                match n.checked_mul(1 << shift) {
                    Some(size) if (MIN_SIZE..=MAX_SIZE).contains(&size) => {
                        assert_eq!(got.unwrap().size, size)
                    }
                    Some(_) => assert!(
                        matches!(got, Err(MmioEntryError::BadWindowSize { .. })),
                        "{entry}"
                    ),
                    None => assert!(
                        matches!(got, Err(MmioEntryError::BadSize { .. })),
                        "{entry}"
                    ),
                }
            }
        }
    }
}
