//! QEMU's firmware configuration device (fw_cfg), legacy I/O-port interface.
//!
//! The VMM offers named files (`-fw_cfg name=opt/…,file=…`) that the guest
//! reads by selecting an item number and reading its bytes one at a time:
//!
//! - write the 16-bit item number to the selector port ([`SELECTOR_PORT`]),
//! - read the item's bytes in order from the data port ([`DATA_PORT`]);
//!   reads past the end of an item return 0.
//!
//! Item [`SIGNATURE_ITEM`] holds `"QEMU"`; item [`FILE_DIR_ITEM`] the file
//! directory: a big-endian `u32` count, then per file `{u32 size (BE), u16
//! select (BE), u16 reserved, char name[56]}` (NUL-padded).
//!
//! Everything the device says is untrusted: the directory scan stops after
//! [`MAX_DIR_ENTRIES`], names without a NUL are never matched, and a file
//! is only read into a buffer the caller sized, never past it. The port
//! access is the [`FwCfgPorts`] trait so the logic is tested on the host
//! against a fake device; the kernel binary implements it with port I/O.

/// The selector port (16-bit writes).
pub const SELECTOR_PORT: u16 = 0x510;
/// The data port (8-bit reads).
pub const DATA_PORT: u16 = 0x511;
/// Item holding the signature `"QEMU"`.
pub const SIGNATURE_ITEM: u16 = 0x0000;
/// Item holding the file directory.
pub const FILE_DIR_ITEM: u16 = 0x0019;
/// Item holding the size of the `-append` command line, NUL included,
/// as a little-endian `u32` (`FW_CFG_CMDLINE_SIZE`; 0 without `-kernel`).
pub const CMDLINE_SIZE_ITEM: u16 = 0x0014;
/// Length of a directory entry's name field, NUL included.
pub const NAME_LEN: usize = 56;
/// Bytes of one directory entry.
pub const DIR_ENTRY_LEN: usize = 4 + 2 + 2 + NAME_LEN;
/// Most directory entries looked at, whatever count the device claims
/// (QEMU offers at most 4096 file slots on current machine types).
pub const MAX_DIR_ENTRIES: u32 = 4096;

/// Access to the device's two ports.
pub trait FwCfgPorts {
    /// Selects item `item`; the next data read returns its first byte.
    fn select(&mut self, item: u16);
    /// Reads the next byte of the selected item.
    fn read_u8(&mut self) -> u8;
    /// Fills `buf` with the next bytes of the selected item.
    fn read(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.read_u8();
        }
    }
}

/// Why a fw_cfg file could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FwCfgError {
    /// No QEMU fw_cfg device answers (bare metal, or a VMM without one).
    #[error("no QEMU fw_cfg device (signature item does not read \"QEMU\")")]
    NoDevice,
    /// The name cannot be a fw_cfg file name.
    #[error("fw_cfg file name must be 1..=55 bytes, got {len}")]
    BadName {
        /// Length of the name asked for.
        len: usize,
    },
    /// The device has no file of that name.
    #[error("fw_cfg has no file of that name (QEMU: -fw_cfg name=<name>,file=<path>)")]
    NotFound,
    /// The file is bigger than the caller's buffer.
    #[error("fw_cfg file is {size} bytes, more than the {max} bytes expected")]
    TooLarge {
        /// Size the directory claims.
        size: u32,
        /// Largest size accepted.
        max: usize,
    },
}

/// One file of the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FwCfgFile {
    /// Its item number.
    pub select: u16,
    /// Its size in bytes, as the directory says.
    pub size: u32,
}

/// A fw_cfg device, once its signature checked out.
#[derive(Debug)]
pub struct FwCfg<P> {
    ports: P,
}

impl<P: FwCfgPorts> FwCfg<P> {
    /// Checks the signature; [`FwCfgError::NoDevice`] if it is not QEMU's.
    pub fn probe(mut ports: P) -> Result<Self, FwCfgError> {
        ports.select(SIGNATURE_ITEM);
        let mut sig = [0u8; 4];
        ports.read(&mut sig);
        if &sig != b"QEMU" {
            return Err(FwCfgError::NoDevice);
        }
        Ok(FwCfg { ports })
    }

    /// Looks `name` up in the file directory.
    pub fn find(&mut self, name: &str) -> Result<FwCfgFile, FwCfgError> {
        let want = name.as_bytes();
        if want.is_empty() || want.len() >= NAME_LEN {
            return Err(FwCfgError::BadName { len: want.len() });
        }
        self.ports.select(FILE_DIR_ITEM);
        let mut count = [0u8; 4];
        self.ports.read(&mut count);
        let count = u32::from_be_bytes(count).min(MAX_DIR_ENTRIES);
        let mut entry = [0u8; DIR_ENTRY_LEN];
        for _ in 0..count {
            self.ports.read(&mut entry);
            let size = u32::from_be_bytes([entry[0], entry[1], entry[2], entry[3]]);
            let select = u16::from_be_bytes([entry[4], entry[5]]);
            if entry_name(&entry[8..]) == Some(want) {
                return Ok(FwCfgFile { select, size });
            }
        }
        Err(FwCfgError::NotFound)
    }

    /// Reads the file `name` into `buf`; returns how many bytes it has.
    /// Files larger than `buf` are refused without reading them.
    pub fn read_file<'b>(&mut self, name: &str, buf: &'b mut [u8]) -> Result<&'b [u8], FwCfgError> {
        let len = self.select_file(name, buf.len())?;
        self.ports.read(&mut buf[..len]);
        Ok(&buf[..len])
    }

    /// The size QEMU gives for the `-append` command line, NUL included
    /// (0 when it booted no `-kernel`).
    pub fn cmdline_size(&mut self) -> u32 {
        self.ports.select(CMDLINE_SIZE_ITEM);
        let mut b = [0u8; 4];
        self.ports.read(&mut b);
        u32::from_le_bytes(b)
    }

    /// Reads the file `name` into a new buffer of its size; files larger
    /// than `max` are refused without reading them.
    pub fn read_file_to_vec(
        &mut self,
        name: &str,
        max: usize,
    ) -> Result<alloc::vec::Vec<u8>, FwCfgError> {
        let mut buf = alloc::vec![0u8; self.select_file(name, max)?];
        self.ports.read(&mut buf);
        Ok(buf)
    }

    /// Selects the file `name` if it has at most `max` bytes; returns its
    /// size.
    fn select_file(&mut self, name: &str, max: usize) -> Result<usize, FwCfgError> {
        let file = self.find(name)?;
        let len = usize::try_from(file.size)
            .ok()
            .filter(|&l| l <= max)
            .ok_or(FwCfgError::TooLarge {
                size: file.size,
                max,
            })?;
        self.ports.select(file.select);
        Ok(len)
    }
}

/// The name of a directory entry: the bytes before the first NUL, or
/// `None` if the field has none (not a valid name) or is empty.
fn entry_name(field: &[u8]) -> Option<&[u8]> {
    let end = field.iter().position(|&b| b == 0)?;
    (end > 0).then_some(&field[..end])
}

#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use alloc::vec::Vec;

    /// A fake device: items by number, plus a count of data reads.
    #[derive(Debug, Default)]
    pub struct FakeFwCfg {
        pub items: Vec<(u16, Vec<u8>)>,
        selected: Option<usize>,
        pos: usize,
        pub reads: usize,
    }

    impl FakeFwCfg {
        /// A QEMU-like device whose directory lists `files` (name, item,
        /// contents), with items from 0x20 on.
        pub fn with_files(files: &[(&str, &[u8])]) -> Self {
            let mut dir = (files.len() as u32).to_be_bytes().to_vec();
            let mut d = FakeFwCfg::default();
            d.items.push((SIGNATURE_ITEM, b"QEMU".to_vec()));
            for (i, (name, data)) in files.iter().enumerate() {
                let select = 0x20 + i as u16;
                dir.extend(dir_entry(name.as_bytes(), select, data.len() as u32));
                d.items.push((select, data.to_vec()));
            }
            d.items.push((FILE_DIR_ITEM, dir));
            d
        }

        /// Replaces item `item`'s contents.
        pub fn set(&mut self, item: u16, data: Vec<u8>) {
            self.items.retain(|(i, _)| *i != item);
            self.items.push((item, data));
        }
    }

    /// One raw directory entry (name truncated/padded to 56 bytes).
    pub fn dir_entry(name: &[u8], select: u16, size: u32) -> Vec<u8> {
        let mut e = size.to_be_bytes().to_vec();
        e.extend(select.to_be_bytes());
        e.extend([0, 0]);
        let mut n = [0u8; NAME_LEN];
        for (d, s) in n.iter_mut().zip(name) {
            *d = *s;
        }
        e.extend(n);
        e
    }

    impl FwCfgPorts for FakeFwCfg {
        fn select(&mut self, item: u16) {
            self.selected = self.items.iter().position(|(i, _)| *i == item);
            self.pos = 0;
        }

        fn read_u8(&mut self) -> u8 {
            self.reads += 1;
            let b = self
                .selected
                .and_then(|s| self.items[s].1.get(self.pos).copied())
                .unwrap_or(0);
            self.pos += 1;
            b
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::*;
    use super::*;
    use alloc::vec;

    #[test]
    fn reads_a_named_file() {
        let dev = FakeFwCfg::with_files(&[
            ("etc/e820", &[1, 2, 3]),
            ("opt/fractos/cluster-key", b"00ff\n"),
        ]);
        let mut fw = FwCfg::probe(dev).unwrap();
        assert_eq!(
            fw.find("opt/fractos/cluster-key").unwrap(),
            FwCfgFile {
                select: 0x21,
                size: 5
            }
        );
        let mut buf = [0u8; 16];
        assert_eq!(
            fw.read_file("opt/fractos/cluster-key", &mut buf).unwrap(),
            b"00ff\n"
        );
        assert_eq!(fw.read_file("etc/e820", &mut buf).unwrap(), [1, 2, 3]);
    }

    #[test]
    fn no_signature_is_no_device() {
        // Bare metal: nothing decodes the ports, reads float high.
        #[derive(Debug)]
        struct Floating;
        impl FwCfgPorts for Floating {
            fn select(&mut self, _: u16) {}
            fn read_u8(&mut self) -> u8 {
                0xff
            }
        }
        assert_eq!(FwCfg::probe(Floating).unwrap_err(), FwCfgError::NoDevice);
        let mut dev = FakeFwCfg::with_files(&[]);
        dev.set(SIGNATURE_ITEM, b"QEMX".to_vec());
        assert_eq!(FwCfg::probe(dev).unwrap_err(), FwCfgError::NoDevice);
    }

    #[test]
    fn names_match_exactly() {
        let dev = FakeFwCfg::with_files(&[
            ("opt/fractos/cluster-key-old", b"a"),
            ("opt/fractos/cluster-ke", b"b"),
        ]);
        let mut fw = FwCfg::probe(dev).unwrap();
        assert_eq!(
            fw.find("opt/fractos/cluster-key"),
            Err(FwCfgError::NotFound)
        );
        assert_eq!(fw.find(""), Err(FwCfgError::BadName { len: 0 }));
        let long = "x".repeat(NAME_LEN);
        assert_eq!(fw.find(&long), Err(FwCfgError::BadName { len: NAME_LEN }));
        assert_eq!(fw.find(&long[..55]), Err(FwCfgError::NotFound));
    }

    #[test]
    fn entry_without_nul_never_matches() {
        // A 56-byte name field with no terminator: refused even though its
        // first bytes equal the name asked for.
        let mut dev = FakeFwCfg::with_files(&[]);
        let mut dir = 1u32.to_be_bytes().to_vec();
        let mut name = b"opt/fractos/cluster-key".to_vec();
        name.resize(NAME_LEN, b'!');
        dir.extend(dir_entry(&name, 0x20, 4));
        dev.set(FILE_DIR_ITEM, dir);
        let mut fw = FwCfg::probe(dev).unwrap();
        assert_eq!(
            fw.find("opt/fractos/cluster-key"),
            Err(FwCfgError::NotFound)
        );
    }

    #[test]
    fn truncated_directory_is_not_found() {
        // The count claims three entries but the item ends inside the
        // first: the rest reads as zeros (empty names), which match nothing.
        let mut dev = FakeFwCfg::with_files(&[]);
        let mut dir = 3u32.to_be_bytes().to_vec();
        dir.extend(&dir_entry(b"opt/fractos/cluster-key", 0x20, 4)[..20]);
        dev.set(FILE_DIR_ITEM, dir);
        let mut fw = FwCfg::probe(dev).unwrap();
        assert_eq!(
            fw.find("opt/fractos/cluster-key"),
            Err(FwCfgError::NotFound)
        );
    }

    #[test]
    fn huge_count_is_bounded() {
        let mut dev = FakeFwCfg::with_files(&[]);
        dev.set(FILE_DIR_ITEM, vec![0xff, 0xff, 0xff, 0xff]);
        let mut fw = FwCfg::probe(dev).unwrap();
        assert_eq!(
            fw.find("opt/fractos/cluster-key"),
            Err(FwCfgError::NotFound)
        );
        let reads = fw.ports.reads;
        assert_eq!(reads, 4 + 4 + MAX_DIR_ENTRIES as usize * DIR_ENTRY_LEN);
    }

    #[test]
    fn oversized_file_is_refused_unread() {
        let big = vec![b'7'; 1 << 16];
        let mut dev = FakeFwCfg::with_files(&[("opt/fractos/cluster-key", &big)]);
        // A directory may also claim any size, whatever the item holds.
        let mut dir = 2u32.to_be_bytes().to_vec();
        dir.extend(dir_entry(b"opt/fractos/cluster-key", 0x20, 1 << 16));
        dir.extend(dir_entry(b"opt/fractos/liar", 0x20, u32::MAX));
        dev.set(FILE_DIR_ITEM, dir);
        let mut fw = FwCfg::probe(dev).unwrap();
        let mut buf = [0u8; 128];
        assert_eq!(
            fw.read_file("opt/fractos/cluster-key", &mut buf),
            Err(FwCfgError::TooLarge {
                size: 1 << 16,
                max: 128
            })
        );
        assert_eq!(
            fw.read_file("opt/fractos/liar", &mut buf),
            Err(FwCfgError::TooLarge {
                size: u32::MAX,
                max: 128
            })
        );
        assert!(fw.ports.reads < 4 + 4 + 2 * 2 * DIR_ENTRY_LEN + 8);
    }

    #[test]
    fn short_item_reads_zeros_within_the_buffer() {
        // The directory claims 8 bytes but the item holds 3: the read stays
        // within the claimed (and buffer-bounded) length.
        let mut dev = FakeFwCfg::with_files(&[("f", b"abc")]);
        let mut dir = 1u32.to_be_bytes().to_vec();
        dir.extend(dir_entry(b"f", 0x20, 8));
        dev.set(FILE_DIR_ITEM, dir);
        let mut fw = FwCfg::probe(dev).unwrap();
        let mut buf = [0xaa; 8];
        assert_eq!(fw.read_file("f", &mut buf).unwrap(), b"abc\0\0\0\0\0");
    }

    #[test]
    fn reads_the_command_line_size_and_whole_files() {
        let mut dev =
            FakeFwCfg::with_files(&[("opt/org.fractos/config", b"fractos-config 1\nend\n")]);
        dev.set(CMDLINE_SIZE_ITEM, 5000u32.to_le_bytes().to_vec());
        let mut fw = FwCfg::probe(dev).unwrap();
        assert_eq!(fw.cmdline_size(), 5000);
        assert_eq!(
            fw.read_file_to_vec("opt/org.fractos/config", 64).unwrap(),
            b"fractos-config 1\nend\n"
        );
        assert_eq!(
            fw.read_file_to_vec("opt/org.fractos/config", 8),
            Err(FwCfgError::TooLarge { size: 21, max: 8 })
        );
        assert_eq!(
            fw.read_file_to_vec("opt/other", 64),
            Err(FwCfgError::NotFound)
        );
        // No `-kernel`: the item is absent and reads as zeros.
        let mut fw = FwCfg::probe(FakeFwCfg::with_files(&[])).unwrap();
        assert_eq!(fw.cmdline_size(), 0);
    }
}
