//! Multiboot2 (GRUB): parsed with the `multiboot2` crate.

use ::multiboot2::{BootInformation, BootInformationHeader, TagType};

use crate::acpi::find_rsdp_in_bios;
use crate::{
    AcpiRoot, BootInfo, BootModule, BootProtocol, Cmdline, LoaderError, MemoryKind, PhysMem,
};

/// The value a Multiboot2 loader leaves in `eax`.
pub const MULTIBOOT2_BOOTLOADER_MAGIC: u32 = 0x36d7_6289;

/// Builds the [`BootInfo`] from the Multiboot2 information at physical
/// address `info` (`ebx` at entry), checking `magic` (`eax` at entry).
///
/// # Safety
///
/// `info` must point at a Multiboot2 information structure, readable at that
/// address (identity mapping), that nothing modifies during this call.
pub unsafe fn from_multiboot2(
    magic: u32,
    info: u64,
    mem: &impl PhysMem,
) -> Result<BootInfo, LoaderError> {
    if magic != MULTIBOOT2_BOOTLOADER_MAGIC {
        return Err(LoaderError::BadMultibootMagic { found: magic });
    }
    let ptr = usize::try_from(info).map_err(|_| LoaderError::OutOfRange { addr: info })?;
    // SAFETY: the caller guarantees `info` points at a readable, unmodified
    // Multiboot2 structure; `load` validates its header and end tag.
    let mbi = unsafe { BootInformation::load(ptr as *const BootInformationHeader) }
        .map_err(|_| LoaderError::BadMultibootInfo)?;
    let mut out = BootInfo::new(BootProtocol::Multiboot2);

    // GRUB EFI passes the EFI memory map it got from `ExitBootServices`
    // (tag 17): it is the final map, so it wins over the BIOS-style map
    // (tag 6), which GRUB EFI builds earlier and may omit. While boot
    // services still run (tag 18) the EFI map is not final: use tag 6.
    let bs_running = mbi.tags().any(|t| t.header().typ == TagType::EfiBs);
    let efi_map = mbi
        .tags()
        .find(|t| t.header().typ == TagType::EfiMmap)
        .filter(|_| !bs_running);
    if let Some(tag) = efi_map {
        push_efi_memory_map(tag.payload(), &mut out.memory)?;
        out.memory_from_efi = true;
    } else {
        let areas = mbi.memory_map_tag().ok_or(LoaderError::NoMemoryMap)?;
        for a in areas.memory_areas() {
            out.memory.push(
                a.start_address(),
                a.size(),
                MemoryKind::from_e820(a.typ().into()),
            );
        }
    }
    if out.memory.regions().is_empty() {
        return Err(LoaderError::NoMemoryMap);
    }
    if let Some(Ok(cmdline)) = mbi.command_line_tag().map(|t| t.cmdline()) {
        out.cmdline = Cmdline::from_bytes(cmdline.as_bytes());
    }
    for m in mbi.module_tags() {
        // A command line that is not UTF-8 is kept as `?`s: it then names
        // no module the kernel looks for.
        let cmdline = m.cmdline().map(str::as_bytes).unwrap_or(b"?");
        out.modules.push(BootModule::new(
            m.start_address().into(),
            m.end_address().into(),
            cmdline,
        ));
    }
    out.acpi = if let Some(v2) = mbi.rsdp_v2_tag().filter(|t| t.checksum_is_valid()) {
        Some(AcpiRoot {
            rsdp_addr: None,
            revision: v2.revision(),
            oem_id: oem(v2.oem_id().ok()),
            rsdt_addr: 0,
            xsdt_addr: Some(v2.xsdt_address() as u64),
        })
    } else if let Some(v1) = mbi.rsdp_v1_tag().filter(|t| t.checksum_is_valid()) {
        Some(AcpiRoot {
            rsdp_addr: None,
            revision: v1.revision(),
            oem_id: oem(v1.oem_id().ok()),
            rsdt_addr: v1.rsdt_address() as u32,
            xsdt_addr: None,
        })
    } else {
        find_rsdp_in_bios(mem)
    };
    Ok(out)
}

/// Size of the EFI memory descriptor version 1 this parser reads: type,
/// padding, physical start, virtual start, page count, attributes.
const EFI_DESC_MIN: usize = 40;

/// Maps an EFI memory type (UEFI spec, `EFI_MEMORY_TYPE`) to a kind, as
/// seen after `ExitBootServices`: loader and boot-services memory is free
/// RAM again (the kernel image, its modules and the boot information are
/// protected by the kernel itself, exactly as with an E820 map).
pub fn efi_memory_kind(typ: u32) -> MemoryKind {
    match typ {
        // LoaderCode, LoaderData, BootServicesCode, BootServicesData,
        // ConventionalMemory.
        1..=4 | 7 => MemoryKind::Usable,
        // UnusableMemory.
        8 => MemoryKind::Bad,
        // ACPIReclaimMemory.
        9 => MemoryKind::AcpiReclaimable,
        // ACPIMemoryNVS.
        10 => MemoryKind::AcpiNvs,
        // Reserved, RuntimeServicesCode/Data, MMIO, MMIO port space,
        // PalCode, persistent memory, unaccepted memory and anything newer.
        _ => MemoryKind::Reserved,
    }
}

/// Adds the regions of an EFI memory map tag's payload (`desc_size`,
/// `desc_version`, then the descriptors) to `map`, merging neighbours of
/// the same kind (an OVMF map has over a hundred descriptors). Returns how
/// many descriptors were read. A truncated last descriptor is ignored; a
/// descriptor size smaller than version 1's is
/// [`LoaderError::BadMultibootInfo`].
pub fn push_efi_memory_map(
    payload: &[u8],
    map: &mut crate::MemoryMap,
) -> Result<usize, LoaderError> {
    let u32_at = |b: &[u8], at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    let u64_at = |b: &[u8], at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
    };
    let desc_size = u32_at(payload, 0).ok_or(LoaderError::BadMultibootInfo)? as usize;
    if desc_size < EFI_DESC_MIN {
        return Err(LoaderError::BadMultibootInfo);
    }
    let descs = payload.get(8..).unwrap_or(&[]);
    let mut pending: Option<(u64, u64, MemoryKind)> = None;
    let mut n = 0;
    for d in descs.chunks_exact(desc_size) {
        let (Some(typ), Some(start), Some(pages)) = (u32_at(d, 0), u64_at(d, 8), u64_at(d, 24))
        else {
            continue;
        };
        n += 1;
        let kind = efi_memory_kind(typ);
        let len = pages.saturating_mul(4096);
        match &mut pending {
            Some((s, l, k)) if *k == kind && s.saturating_add(*l) == start => {
                *l = l.saturating_add(len);
            }
            _ => {
                if let Some((s, l, k)) = pending.replace((start, len, kind)) {
                    map.push(s, l, k);
                }
            }
        }
    }
    if let Some((s, l, k)) = pending {
        map.push(s, l, k);
    }
    Ok(n)
}

fn oem(s: Option<&str>) -> [u8; 6] {
    let mut o = [b' '; 6];
    if let Some(s) = s {
        for (d, b) in o.iter_mut().zip(s.bytes()) {
            *d = b;
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testmem::FakeMem;
    use crate::{MemoryMap, MemoryRegion};
    use ::multiboot2::{
        Builder, CommandLineTag, EFIBootServicesNotExitedTag, EFIMemoryAreaType, EFIMemoryDesc,
        EFIMemoryMapTag, EFISdt64Tag, MaybeDynSized, MemoryArea, MemoryAreaType, MemoryMapTag,
        ModuleTag, RsdpV1Tag,
    };

    fn desc(ty: EFIMemoryAreaType, start: u64, pages: u64) -> EFIMemoryDesc {
        EFIMemoryDesc {
            ty,
            phys_start: start,
            virt_start: 0,
            page_count: pages,
            att: Default::default(),
        }
    }

    /// What OVMF + GRUB EFI pass, in miniature: the EFI map (tag 17), the
    /// EFI system table (tag 12), no BIOS map (tag 6).
    fn ovmf_like() -> Builder {
        Builder::new()
            .cmdline(CommandLineTag::new("fractos.node=1"))
            .efi64(EFISdt64Tag::new(0x7f9e_e018))
            .efi_mmap(EFIMemoryMapTag::new_from_descs(&[
                desc(EFIMemoryAreaType::BOOT_SERVICES_CODE, 0, 0xa0),
                desc(EFIMemoryAreaType::CONVENTIONAL, 0x10_0000, 0x700),
                desc(EFIMemoryAreaType::LOADER_DATA, 0x80_0000, 0x10),
                desc(EFIMemoryAreaType::ACPI_NON_VOLATILE, 0x81_0000, 0xf0),
                desc(EFIMemoryAreaType::BOOT_SERVICES_DATA, 0x90_0000, 0x100),
                desc(EFIMemoryAreaType::ACPI_RECLAIM, 0xa0_0000, 0x10),
                desc(EFIMemoryAreaType::RUNTIME_SERVICES_DATA, 0xa1_0000, 0x10),
                desc(EFIMemoryAreaType::MMIO, 0xffc0_0000, 0x400),
                desc(EFIMemoryAreaType::UNUSABLE, 0x1_0000_0000, 1),
            ]))
    }

    fn load(builder: Builder, magic: u32) -> Result<BootInfo, LoaderError> {
        let s = builder.build();
        let addr = s.as_bytes().as_ptr() as u64;
        // SAFETY: `s` is a valid Multiboot2 structure built by the crate and
        // lives until the end of this function.
        unsafe { from_multiboot2(magic, addr, &FakeMem::new(0xE_0000, 0x2_0000)) }
    }

    #[test]
    fn parses_grub_like_info() {
        let b = Builder::new()
            .cmdline(CommandLineTag::new("fractos.node=2 fractos.log=trace"))
            .mmap(MemoryMapTag::new(&[
                MemoryArea::new(0, 0x9_fc00, MemoryAreaType::Available),
                MemoryArea::new(0x10_0000, 0x7de_0000, MemoryAreaType::Available),
                MemoryArea::new(0x7fe_0000, 0x2_0000, MemoryAreaType::Reserved),
                MemoryArea::new(0x7ee_0000, 0x1_0000, MemoryAreaType::AcpiAvailable),
            ]))
            .rsdpv1(RsdpV1Tag::new(0, *b"BOCHS ", 0, 0x7fe_1000))
            .add_module(ModuleTag::new(0x20_0000, 0x20_0041, "fractos-cluster-key"))
            .add_module(ModuleTag::new(0x30_0000, 0x30_1000, ""));
        let info = load(b, MULTIBOOT2_BOOTLOADER_MAGIC).unwrap();
        let m = info.modules.as_slice();
        assert_eq!(m.len(), 2);
        assert_eq!(
            (m[0].start, m[0].end, m[0].cmdline()),
            (0x20_0000, 0x20_0041, "fractos-cluster-key")
        );
        assert_eq!((m[1].len(), m[1].cmdline()), (0x1000, ""));
        assert_eq!(info.protocol, BootProtocol::Multiboot2);
        assert_eq!(info.cmdline.as_str(), "fractos.node=2 fractos.log=trace");
        let kinds: Vec<MemoryKind> = info.memory.regions().iter().map(|r| r.kind).collect();
        assert_eq!(
            kinds,
            [
                MemoryKind::Usable,
                MemoryKind::Usable,
                MemoryKind::AcpiReclaimable,
                MemoryKind::Reserved
            ]
        );
        assert_eq!(info.memory.usable_bytes(), 0x9_fc00 + 0x7de_0000);
        assert!(info.memory.is_disjoint());
        // The tag built with checksum 0 is invalid, so the BIOS scan (empty
        // fake memory) finds nothing: invalid tags are never trusted.
        assert_eq!(info.acpi, None);
    }

    #[test]
    fn rejects_wrong_magic_and_missing_map() {
        let b = Builder::new().cmdline(CommandLineTag::new("x"));
        assert_eq!(
            load(b, 0x2bad_b002).unwrap_err(),
            LoaderError::BadMultibootMagic { found: 0x2bad_b002 }
        );
        let b = Builder::new().cmdline(CommandLineTag::new("x"));
        assert_eq!(
            load(b, MULTIBOOT2_BOOTLOADER_MAGIC).unwrap_err(),
            LoaderError::NoMemoryMap
        );
    }

    #[test]
    fn takes_the_efi_memory_map_without_a_bios_map() {
        let info = load(ovmf_like(), MULTIBOOT2_BOOTLOADER_MAGIC).unwrap();
        let r = info.memory.regions();
        let got: Vec<(u64, u64, MemoryKind)> = r.iter().map(|r| (r.start, r.len, r.kind)).collect();
        assert_eq!(
            got,
            [
                (0, 0xa_0000, MemoryKind::Usable),
                // Conventional + LoaderData merged: adjacent, both usable.
                (0x10_0000, 0x71_0000, MemoryKind::Usable),
                (0x81_0000, 0xf_0000, MemoryKind::AcpiNvs),
                (0x90_0000, 0x10_0000, MemoryKind::Usable),
                (0xa0_0000, 0x1_0000, MemoryKind::AcpiReclaimable),
                (0xa1_0000, 0x1_0000, MemoryKind::Reserved),
                (0xffc0_0000, 0x40_0000, MemoryKind::Reserved),
                (0x1_0000_0000, 0x1000, MemoryKind::Bad),
            ]
        );
        assert!(info.memory.is_disjoint());
        assert!(info.memory_from_efi);
        assert_eq!(info.cmdline.as_str(), "fractos.node=1");
    }

    #[test]
    fn efi_map_wins_over_the_bios_map() {
        let b = ovmf_like().mmap(MemoryMapTag::new(&[MemoryArea::new(
            0,
            0x1000_0000,
            MemoryAreaType::Available,
        )]));
        let info = load(b, MULTIBOOT2_BOOTLOADER_MAGIC).unwrap();
        assert_eq!(info.memory.usable_bytes(), 0xa_0000 + 0x71_0000 + 0x10_0000);
    }

    #[test]
    fn efi_map_is_ignored_while_boot_services_run() {
        let b = ovmf_like()
            .efi_bs(EFIBootServicesNotExitedTag::new())
            .mmap(MemoryMapTag::new(&[MemoryArea::new(
                0x10_0000,
                0x100_0000,
                MemoryAreaType::Available,
            )]));
        let info = load(b, MULTIBOOT2_BOOTLOADER_MAGIC).unwrap();
        assert_eq!(info.memory.usable_bytes(), 0x100_0000);
        // Without a BIOS map there is then no usable map: a typed error.
        let b = ovmf_like().efi_bs(EFIBootServicesNotExitedTag::new());
        assert_eq!(
            load(b, MULTIBOOT2_BOOTLOADER_MAGIC).unwrap_err(),
            LoaderError::NoMemoryMap
        );
    }

    #[test]
    fn odd_efi_maps_give_errors_not_panics() {
        let mut map = MemoryMap::new();
        // Too short for even the header.
        assert_eq!(
            push_efi_memory_map(&[1, 2], &mut map),
            Err(LoaderError::BadMultibootInfo)
        );
        // Descriptor size below version 1's.
        let mut p = 16u32.to_le_bytes().to_vec();
        p.extend(1u32.to_le_bytes());
        assert_eq!(
            push_efi_memory_map(&p, &mut map),
            Err(LoaderError::BadMultibootInfo)
        );
        // Larger descriptors (newer firmware), a truncated tail, an unknown
        // type and a page count that overflows.
        let mut p = 48u32.to_le_bytes().to_vec();
        p.extend(2u32.to_le_bytes());
        for (ty, start, pages) in [
            (7u32, 0x1000u64, 2u64),
            (0x7000_0001, 0x3000, 1),
            (7, 0x4000, u64::MAX),
        ] {
            let mut d = [0u8; 48];
            d[0..4].copy_from_slice(&ty.to_le_bytes());
            d[8..16].copy_from_slice(&start.to_le_bytes());
            d[24..32].copy_from_slice(&pages.to_le_bytes());
            p.extend(d);
        }
        p.extend([0u8; 20]);
        assert_eq!(push_efi_memory_map(&p, &mut map), Ok(3));
        assert_eq!(
            map.regions(),
            [
                MemoryRegion {
                    start: 0x1000,
                    len: 0x2000,
                    kind: MemoryKind::Usable
                },
                MemoryRegion {
                    start: 0x3000,
                    len: 0x1000,
                    kind: MemoryKind::Reserved
                },
                MemoryRegion {
                    start: 0x4000,
                    len: u64::MAX,
                    kind: MemoryKind::Usable
                },
            ]
        );
        // An empty map is the caller's NoMemoryMap.
        let mut empty = 40u32.to_le_bytes().to_vec();
        empty.extend(1u32.to_le_bytes());
        let mut map = MemoryMap::new();
        assert_eq!(push_efi_memory_map(&empty, &mut map), Ok(0));
        assert!(map.regions().is_empty());
    }
}
