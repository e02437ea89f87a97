//! The ACPI root system description pointer (RSDP).

use crate::{LoaderError, PhysMem};

/// What the kernel needs from the RSDP: where the ACPI tables are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiRoot {
    /// Physical address of the RSDP itself, when it lives in firmware memory
    /// (Multiboot2 hands over a copy, so this is `None` there).
    pub rsdp_addr: Option<u64>,
    /// ACPI revision byte (0 = ACPI 1.0, 2 = ACPI 2.0+).
    pub revision: u8,
    /// OEM id, as found.
    pub oem_id: [u8; 6],
    /// Physical address of the RSDT.
    pub rsdt_addr: u32,
    /// Physical address of the XSDT (ACPI 2.0+ only).
    pub xsdt_addr: Option<u64>,
}

const SIGNATURE: &[u8; 8] = b"RSD PTR ";
const V1_LEN: usize = 20;
const V2_LEN: usize = 36;

fn checksum_ok(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)) == 0
}

/// Parses and validates RSDP bytes (at least the 20-byte ACPI 1.0 part;
/// 36 bytes are used when the revision says ACPI 2.0+). `addr` is only for
/// error messages and [`AcpiRoot::rsdp_addr`].
pub fn parse_rsdp(bytes: &[u8], addr: Option<u64>) -> Result<AcpiRoot, LoaderError> {
    let bad = LoaderError::BadRsdp {
        addr: addr.unwrap_or(0),
    };
    if bytes.len() < V1_LEN || &bytes[..8] != SIGNATURE || !checksum_ok(&bytes[..V1_LEN]) {
        return Err(bad);
    }
    let revision = bytes[15];
    let mut oem_id = [0u8; 6];
    oem_id.copy_from_slice(&bytes[9..15]);
    let rsdt_addr = u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
    let xsdt_addr = if revision >= 2 {
        if bytes.len() < V2_LEN || !checksum_ok(&bytes[..V2_LEN]) {
            return Err(bad);
        }
        let mut x = [0u8; 8];
        x.copy_from_slice(&bytes[24..32]);
        Some(u64::from_le_bytes(x)).filter(|&a| a != 0)
    } else {
        None
    };
    Ok(AcpiRoot {
        rsdp_addr: addr,
        revision,
        oem_id,
        rsdt_addr,
        xsdt_addr,
    })
}

/// Reads and validates the RSDP at physical address `addr`.
pub fn read_rsdp(addr: u64, mem: &impl PhysMem) -> Result<AcpiRoot, LoaderError> {
    let mut buf = [0u8; V2_LEN];
    mem.read(addr, &mut buf[..V1_LEN])?;
    if buf[15] >= 2 {
        mem.read(addr, &mut buf)?;
    }
    parse_rsdp(&buf, Some(addr))
}

/// Searches the legacy BIOS area `[0xE0000, 0x100000)` for a valid RSDP on a
/// 16-byte boundary, as ACPI specifies for PC-compatible firmware.
pub fn find_rsdp_in_bios(mem: &impl PhysMem) -> Option<AcpiRoot> {
    (0xE_0000u64..0x10_0000).step_by(16).find_map(|addr| {
        let mut sig = [0u8; 8];
        mem.read(addr, &mut sig).ok()?;
        if &sig != SIGNATURE {
            return None;
        }
        read_rsdp(addr, mem).ok()
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testmem::FakeMem;

    /// A valid RSDP with the given revision.
    pub fn rsdp(revision: u8, rsdt: u32, xsdt: u64) -> Vec<u8> {
        let mut b = vec![0u8; V2_LEN];
        b[..8].copy_from_slice(SIGNATURE);
        b[9..15].copy_from_slice(b"BOCHS ");
        b[15] = revision;
        b[16..20].copy_from_slice(&rsdt.to_le_bytes());
        b[20..24].copy_from_slice(&(V2_LEN as u32).to_le_bytes());
        b[24..32].copy_from_slice(&xsdt.to_le_bytes());
        let s: u8 = b[..V1_LEN].iter().fold(0u8, |a, &x| a.wrapping_add(x));
        b[8] = 0u8.wrapping_sub(s);
        let s: u8 = b.iter().fold(0u8, |a, &x| a.wrapping_add(x));
        b[32] = 0u8.wrapping_sub(s);
        b
    }

    #[test]
    fn parses_v1_and_v2() {
        let r = parse_rsdp(&rsdp(0, 0x7fe1000, 0), Some(0xf5a00)).unwrap();
        assert_eq!(r.revision, 0);
        assert_eq!(r.rsdt_addr, 0x7fe1000);
        assert_eq!(r.xsdt_addr, None);
        assert_eq!(&r.oem_id, b"BOCHS ");
        let r = parse_rsdp(&rsdp(2, 0x1000, 0x2000), None).unwrap();
        assert_eq!(r.xsdt_addr, Some(0x2000));
        assert_eq!(r.rsdp_addr, None);
    }

    #[test]
    fn rejects_bad_checksum_and_signature() {
        let mut b = rsdp(0, 0x1000, 0);
        b[17] ^= 1;
        assert!(matches!(
            parse_rsdp(&b, Some(5)),
            Err(LoaderError::BadRsdp { addr: 5 })
        ));
        let mut b = rsdp(0, 0x1000, 0);
        b[0] = b'X';
        assert!(parse_rsdp(&b, None).is_err());
        let mut b = rsdp(2, 0x1000, 0x2000);
        b[30] ^= 1; // breaks only the extended checksum
        assert!(parse_rsdp(&b, None).is_err());
        assert!(parse_rsdp(&b[..10], None).is_err());
    }

    #[test]
    fn scans_bios_area() {
        let mut mem = FakeMem::new(0xE_0000, 0x2_0000);
        // A decoy signature with a broken checksum comes first.
        let mut decoy = rsdp(0, 1, 0);
        decoy[8] ^= 0xff;
        mem.write(0xE_1000, &decoy);
        mem.write(0xF_5A00, &rsdp(2, 0x7fe_0000, 0x7fe_1000));
        let r = find_rsdp_in_bios(&mem).unwrap();
        assert_eq!(r.rsdp_addr, Some(0xF_5A00));
        assert_eq!(r.xsdt_addr, Some(0x7fe_1000));
        assert!(find_rsdp_in_bios(&FakeMem::new(0xE_0000, 0x2_0000)).is_none());
    }
}
