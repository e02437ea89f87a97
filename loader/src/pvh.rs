//! PVH direct boot: `struct hvm_start_info` (Xen public `arch-x86/hvm/start_info.h`).

use crate::acpi::{find_rsdp_in_bios, read_rsdp};
use crate::{BootInfo, BootModule, BootProtocol, Cmdline, LoaderError, MemoryKind, PhysMem};

/// `hvm_start_info.magic`: "xEn3" with the top bit set.
pub const PVH_START_MAGIC: u32 = 0x336e_c578;

/// The fixed part of `hvm_start_info` (version 1 layout).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HvmStartInfo {
    /// Must be [`PVH_START_MAGIC`].
    pub magic: u32,
    /// Structure version (0 has no memory map fields).
    pub version: u32,
    /// `SIF_*` flags.
    pub flags: u32,
    /// Number of module entries.
    pub nr_modules: u32,
    /// Physical address of the module list.
    pub modlist_paddr: u64,
    /// Physical address of the NUL-terminated command line (0 = none).
    pub cmdline_paddr: u64,
    /// Physical address of the RSDP (0 = not provided).
    pub rsdp_paddr: u64,
    /// Physical address of the memory map (version ≥ 1).
    pub memmap_paddr: u64,
    /// Number of memory map entries (version ≥ 1).
    pub memmap_entries: u32,
}

impl HvmStartInfo {
    /// Size of the version-1 structure in bytes.
    pub const SIZE: usize = 56;

    /// Decodes the structure from its little-endian bytes.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        HvmStartInfo {
            magic: u32_at(0),
            version: u32_at(4),
            flags: u32_at(8),
            nr_modules: u32_at(12),
            modlist_paddr: u64_at(16),
            cmdline_paddr: u64_at(24),
            rsdp_paddr: u64_at(32),
            memmap_paddr: u64_at(40),
            memmap_entries: u32_at(48),
        }
    }
}

/// One `hvm_memmap_table_entry`: addr u64, size u64, type u32, reserved u32.
const MEMMAP_ENTRY_SIZE: u64 = 24;

/// One `hvm_modlist_entry`: paddr u64, size u64, cmdline_paddr u64,
/// reserved u64.
const MODLIST_ENTRY_SIZE: u64 = 32;

/// Most module entries read (the rest are counted as dropped): bounds the
/// work a bogus `nr_modules` can cause.
const MAX_MODULE_ENTRIES: u32 = 64;

/// Reads the NUL-terminated string at `paddr` into `buf` in small chunks
/// (so one near the end of readable memory is still found); returns the
/// bytes read, the NUL included if it was reached.
fn read_cstr(mem: &impl PhysMem, paddr: u64, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        let chunk = (buf.len() - n).min(64);
        if mem.read(paddr + n as u64, &mut buf[n..n + chunk]).is_err() {
            break;
        }
        if buf[n..n + chunk].contains(&0) {
            return n + chunk;
        }
        n += chunk;
    }
    n
}

/// Builds the [`BootInfo`] from the `hvm_start_info` at physical `start_info`.
///
/// The memory map comes from the start info (version ≥ 1). The command line
/// and the modules (the VMM's initrd: Firecracker's `initrd_path`, QEMU's
/// `-initrd`; their command lines, usually none) are copied; the RSDP is read from `rsdp_paddr`, or found by scanning the
/// BIOS area when the VMM leaves it 0 (QEMU does).
pub fn from_pvh(start_info: u64, mem: &impl PhysMem) -> Result<BootInfo, LoaderError> {
    let mut raw = [0u8; HvmStartInfo::SIZE];
    mem.read(start_info, &mut raw)?;
    let si = HvmStartInfo::from_bytes(&raw);
    if si.magic != PVH_START_MAGIC {
        return Err(LoaderError::BadPvhMagic { found: si.magic });
    }
    let mut info = BootInfo::new(BootProtocol::Pvh);
    if si.version < 1 || si.memmap_paddr == 0 || si.memmap_entries == 0 {
        return Err(LoaderError::NoMemoryMap);
    }
    for i in 0..u64::from(si.memmap_entries) {
        let e = si.memmap_paddr + i * MEMMAP_ENTRY_SIZE;
        let addr = mem.read_u64(e)?;
        let size = mem.read_u64(e + 8)?;
        let typ = mem.read_u32(e + 16)?;
        info.memory.push(addr, size, MemoryKind::from_e820(typ));
    }
    if si.cmdline_paddr != 0 {
        let mut buf = [0u8; Cmdline::CAPACITY + 1];
        let n = read_cstr(mem, si.cmdline_paddr, &mut buf);
        info.cmdline = Cmdline::from_bytes(&buf[..n]);
    }
    if si.modlist_paddr != 0 {
        for i in 0..si.nr_modules.min(MAX_MODULE_ENTRIES) {
            let e = si.modlist_paddr + u64::from(i) * MODLIST_ENTRY_SIZE;
            let start = mem.read_u64(e)?;
            let size = mem.read_u64(e + 8)?;
            let cmdline_paddr = mem.read_u64(e + 16)?;
            let mut name = [0u8; BootModule::CMDLINE_CAPACITY];
            let n = match cmdline_paddr {
                0 => 0,
                p => read_cstr(mem, p, &mut name),
            };
            // An overflowing range is kept empty (never readable).
            let end = start.checked_add(size).unwrap_or(start);
            info.modules.push(BootModule::new(start, end, &name[..n]));
        }
    }
    info.acpi = if si.rsdp_paddr != 0 {
        Some(read_rsdp(si.rsdp_paddr, mem)?)
    } else {
        find_rsdp_in_bios(mem)
    };
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi::tests::rsdp;
    use crate::testmem::FakeMem;

    fn start_info(cmdline: u64, rsdp: u64, memmap: u64, entries: u32) -> Vec<u8> {
        let mut b = vec![0u8; HvmStartInfo::SIZE];
        b[0..4].copy_from_slice(&PVH_START_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[24..32].copy_from_slice(&cmdline.to_le_bytes());
        b[32..40].copy_from_slice(&rsdp.to_le_bytes());
        b[40..48].copy_from_slice(&memmap.to_le_bytes());
        b[48..52].copy_from_slice(&entries.to_le_bytes());
        b
    }

    fn entry(addr: u64, size: u64, typ: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&addr.to_le_bytes());
        b.extend_from_slice(&size.to_le_bytes());
        b.extend_from_slice(&typ.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b
    }

    /// Memory laid out like QEMU's PVH hand-over: start info at 0x6000,
    /// memory map after it, command line, RSDP in the BIOS area.
    fn qemu_like(with_rsdp_ptr: bool) -> FakeMem {
        let mut mem = FakeMem::new(0, 0x10_0000);
        let rsdp_ptr = if with_rsdp_ptr { 0xF_5A00 } else { 0 };
        mem.write(0x6000, &start_info(0x7000, rsdp_ptr, 0x6100, 3));
        mem.write(0x6100, &entry(0x10_0000, 0x7f0_0000, 1));
        mem.write(0x6118, &entry(0, 0x9_fc00, 1));
        mem.write(0x6130, &entry(0xF_0000, 0x1_0000, 2));
        mem.write(0x7000, b"fractos.log=debug fractos.node=3\0");
        mem.write(0xF_5A00, &rsdp(0, 0x7fe_2000, 0));
        mem
    }

    #[test]
    fn parses_qemu_like_start_info() {
        let info = from_pvh(0x6000, &qemu_like(true)).unwrap();
        assert_eq!(info.protocol, BootProtocol::Pvh);
        assert_eq!(info.cmdline.as_str(), "fractos.log=debug fractos.node=3");
        let r = info.memory.regions();
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].start, r[0].kind), (0, MemoryKind::Usable));
        assert_eq!((r[1].start, r[1].kind), (0xF_0000, MemoryKind::Reserved));
        assert_eq!(r[2].len, 0x7f0_0000);
        assert!(info.memory.is_disjoint());
        let acpi = info.acpi.unwrap();
        assert_eq!(acpi.rsdp_addr, Some(0xF_5A00));
        assert_eq!(acpi.rsdt_addr, 0x7fe_2000);
    }

    #[test]
    fn reads_modules_like_firecrackers_initrd() {
        let mut mem = qemu_like(true);
        let mut si = start_info(0x7000, 0xF_5A00, 0x6100, 3);
        si[12..16].copy_from_slice(&3u32.to_le_bytes()); // nr_modules
        si[16..24].copy_from_slice(&0x8000u64.to_le_bytes()); // modlist
        mem.write(0x6000, &si);
        let module = |paddr: u64, size: u64, cmdline: u64| {
            [paddr, size, cmdline, 0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
        };
        // The initrd (no command line), a named one, an overflowing one.
        mem.write(0x8000, &module(0x20_0000, 65, 0));
        mem.write(0x8020, &module(0x30_0000, 4096, 0x8100));
        mem.write(0x8040, &module(u64::MAX - 1, 16, 0));
        mem.write(0x8100, b"fractos-cluster-key\0");
        let info = from_pvh(0x6000, &mem).unwrap();
        let m = info.modules.as_slice();
        assert_eq!(m.len(), 3);
        assert_eq!(
            (m[0].start, m[0].len(), m[0].cmdline()),
            (0x20_0000, 65, "")
        );
        assert_eq!((m[1].len(), m[1].cmdline()), (4096, "fractos-cluster-key"));
        assert!(m[2].is_empty());
        // A module list outside memory is an error, not a panic.
        si[16..24].copy_from_slice(&0x7fff_0000u64.to_le_bytes());
        mem.write(0x6000, &si);
        assert!(from_pvh(0x6000, &mem).is_err());
    }

    #[test]
    fn finds_rsdp_by_scanning_when_not_given() {
        let info = from_pvh(0x6000, &qemu_like(false)).unwrap();
        assert_eq!(info.acpi.unwrap().rsdp_addr, Some(0xF_5A00));
    }

    #[test]
    fn rejects_bad_magic_and_missing_map() {
        let mut mem = qemu_like(true);
        mem.write(0x6000, &0xdead_beefu32.to_le_bytes());
        assert_eq!(
            from_pvh(0x6000, &mem).unwrap_err(),
            LoaderError::BadPvhMagic { found: 0xdead_beef }
        );
        let mut mem = qemu_like(true);
        mem.write(0x6000, &start_info(0, 0, 0, 0));
        assert_eq!(
            from_pvh(0x6000, &mem).unwrap_err(),
            LoaderError::NoMemoryMap
        );
        assert!(matches!(
            from_pvh(0x20_0000, &qemu_like(true)),
            Err(LoaderError::OutOfRange { .. })
        ));
    }

    #[test]
    fn command_line_up_to_qemus_limit_is_kept_whole() {
        let mut mem = qemu_like(true);
        let mut line = vec![b'x'; Cmdline::CAPACITY];
        line.push(0);
        mem.write(0x7000, &line);
        let info = from_pvh(0x6000, &mem).unwrap();
        assert_eq!(info.cmdline.as_str().len(), 4095);
        assert!(!info.cmdline.truncated());
        // One byte more is marked, for the kernel to refuse.
        let mut mem = qemu_like(true);
        mem.write(0x7000, &[b'y'; Cmdline::CAPACITY + 1]);
        let info = from_pvh(0x6000, &mem).unwrap();
        assert!(info.cmdline.truncated());
    }
}
