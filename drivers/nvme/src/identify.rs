//! Identify Controller and Identify Namespace data structures.

use core::fmt;

use crate::error::NvmeError;

/// Identify CNS values.
pub mod cns {
    /// Identify Namespace data structure for `nsid`.
    pub const NAMESPACE: u32 = 0x00;
    /// Identify Controller data structure.
    pub const CONTROLLER: u32 = 0x01;
}

/// An ASCII field of the Identify data, space padded.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AsciiField<const N: usize>([u8; N]);

impl<const N: usize> AsciiField<N> {
    /// The text without trailing spaces or NULs; non-ASCII bytes make it
    /// empty rather than lying.
    pub fn as_str(&self) -> &str {
        let end = self
            .0
            .iter()
            .rposition(|&b| b != b' ' && b != 0)
            .map_or(0, |i| i + 1);
        core::str::from_utf8(&self.0[..end])
            .ok()
            .filter(|s| s.is_ascii())
            .unwrap_or("")
    }
}

impl<const N: usize> fmt::Debug for AsciiField<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl<const N: usize> fmt::Display for AsciiField<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn le16(d: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([d[at], d[at + 1]])
}

fn le32(d: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([d[at], d[at + 1], d[at + 2], d[at + 3]])
}

fn le64(d: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(d[at..at + 8].try_into().expect("8 bytes"))
}

fn field<const N: usize>(d: &[u8], at: usize) -> AsciiField<N> {
    AsciiField(d[at..at + N].try_into().expect("N bytes"))
}

/// What the driver uses from the Identify Controller data structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControllerInfo {
    /// PCI Vendor ID.
    pub vendor_id: u16,
    /// Serial Number.
    pub serial: AsciiField<20>,
    /// Model Number.
    pub model: AsciiField<40>,
    /// Firmware Revision.
    pub firmware: AsciiField<8>,
    /// Maximum Data Transfer Size as a power of two of the minimum memory
    /// page size; 0 means no limit.
    pub mdts: u8,
    /// Submission Queue Entry Size: (required, maximum) as log2 bytes.
    pub sqes: (u8, u8),
    /// Completion Queue Entry Size: (required, maximum) as log2 bytes.
    pub cqes: (u8, u8),
    /// Number of Namespaces (highest valid namespace id).
    pub namespaces: u32,
    /// A volatile write cache is present (flush does real work).
    pub volatile_write_cache: bool,
}

impl ControllerInfo {
    /// Parses the 4096-byte data structure.
    pub fn parse(d: &[u8; 4096]) -> Self {
        Self {
            vendor_id: le16(d, 0),
            serial: field(d, 4),
            model: field(d, 24),
            firmware: field(d, 64),
            mdts: d[77],
            sqes: (d[512] & 0xF, d[512] >> 4),
            cqes: (d[513] & 0xF, d[513] >> 4),
            namespaces: le32(d, 516),
            volatile_write_cache: d[525] & 1 != 0,
        }
    }
}

/// What the driver uses from the Identify Namespace data structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// Namespace id.
    pub nsid: u32,
    /// Namespace Size, in logical blocks.
    pub blocks: u64,
    /// Namespace Capacity, in logical blocks.
    pub capacity: u64,
    /// Index of the LBA format in use.
    pub lba_format: u8,
    /// Logical block size in bytes.
    pub block_size: u32,
}

impl NamespaceInfo {
    /// Parses the 4096-byte data structure of namespace `nsid`. Fails for an
    /// inactive namespace and for LBA formats with metadata, which this
    /// driver does not transfer.
    pub fn parse(nsid: u32, d: &[u8; 4096]) -> Result<Self, NvmeError> {
        let blocks = le64(d, 0);
        if blocks == 0 {
            return Err(NvmeError::InactiveNamespace(nsid));
        }
        let nlbaf = d[25] as usize + 1;
        let flbas = d[26];
        // Bits 3:0 are the low, bits 6:5 the high bits of the format index.
        let index = (flbas & 0xF) as usize | (((flbas >> 5) & 0x3) as usize) << 4;
        if index >= nlbaf.max(1) || index >= 64 {
            return Err(NvmeError::Unsupported(
                "namespace LBA format index out of range",
            ));
        }
        let lbaf = le32(d, 128 + 4 * index);
        let metadata = lbaf & 0xFFFF;
        let lbads = (lbaf >> 16) & 0xFF;
        if metadata != 0 {
            return Err(NvmeError::Unsupported("LBA formats with metadata"));
        }
        if !(9..=12).contains(&lbads) {
            return Err(NvmeError::Unsupported(
                "block size other than 512 B to 4 KiB",
            ));
        }
        Ok(Self {
            nsid,
            blocks,
            capacity: le64(d, 8),
            lba_format: index as u8,
            block_size: 1 << lbads,
        })
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.blocks * self.block_size as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_fields_parse() {
        let mut d = [0u8; 4096];
        d[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
        d[4..24].copy_from_slice(b"deadbeef            ");
        d[24..64].copy_from_slice(b"QEMU NVMe Ctrl                          ");
        d[77] = 7;
        d[512] = 0x66;
        d[513] = 0x44;
        d[516..520].copy_from_slice(&256u32.to_le_bytes());
        d[525] = 1;
        let c = ControllerInfo::parse(&d);
        assert_eq!(c.vendor_id, 0x1b36);
        assert_eq!(c.serial.as_str(), "deadbeef");
        assert_eq!(c.model.as_str(), "QEMU NVMe Ctrl");
        assert_eq!(c.firmware.as_str(), "");
        assert_eq!(
            (c.mdts, c.sqes, c.cqes, c.namespaces),
            (7, (6, 6), (4, 4), 256)
        );
        assert!(c.volatile_write_cache);
    }

    #[test]
    fn namespace_block_size_from_selected_format() {
        let mut d = [0u8; 4096];
        d[0..8].copy_from_slice(&1000u64.to_le_bytes());
        d[25] = 1; // two formats
        d[26] = 1; // format 1 in use
        d[128..132].copy_from_slice(&(9u32 << 16).to_le_bytes());
        d[132..136].copy_from_slice(&(12u32 << 16).to_le_bytes());
        let ns = NamespaceInfo::parse(1, &d).unwrap();
        assert_eq!((ns.blocks, ns.block_size, ns.lba_format), (1000, 4096, 1));
        assert_eq!(ns.size_bytes(), 1000 * 4096);

        d[132..136].copy_from_slice(&(12u32 << 16 | 8).to_le_bytes());
        assert!(matches!(
            NamespaceInfo::parse(1, &d),
            Err(NvmeError::Unsupported(_))
        ));
        d[26] = 5;
        assert!(matches!(
            NamespaceInfo::parse(1, &d),
            Err(NvmeError::Unsupported(_))
        ));
        d[0..8].copy_from_slice(&0u64.to_le_bytes());
        assert_eq!(
            NamespaceInfo::parse(3, &d),
            Err(NvmeError::InactiveNamespace(3))
        );
    }
}
