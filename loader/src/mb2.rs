//! Multiboot2 (GRUB): parsed with the `multiboot2` crate.

use ::multiboot2::{BootInformation, BootInformationHeader};

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

    let areas = mbi.memory_map_tag().ok_or(LoaderError::NoMemoryMap)?;
    for a in areas.memory_areas() {
        out.memory.push(
            a.start_address(),
            a.size(),
            MemoryKind::from_e820(a.typ().into()),
        );
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
    use ::multiboot2::{
        Builder, CommandLineTag, MaybeDynSized, MemoryArea, MemoryAreaType, MemoryMapTag,
        ModuleTag, RsdpV1Tag,
    };

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
}
