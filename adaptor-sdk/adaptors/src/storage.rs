//! The storage backend: a block store over a file or block device.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::StorageError;

/// A file-backed store addressed by byte ranges (aligned to nothing: the
/// adaptor reads and writes exactly the requested range).
pub struct BlockStore {
    file: File,
    len: u64,
}

impl BlockStore {
    /// Opens (creating if needed) a store of exactly `len` bytes.
    pub fn open(path: &Path, len: u64) -> Result<BlockStore, StorageError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if file.metadata()?.len() < len {
            file.set_len(len)?;
        }
        Ok(BlockStore { file, len })
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the store has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), StorageError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(StorageError::OutOfRange {
                offset,
                len: len as u64,
                size: self.len,
            }),
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), StorageError> {
        self.check(offset, buf.len())?;
        self.file.read_exact_at(buf, offset)?;
        Ok(())
    }

    /// Writes `data` at `offset`.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        self.check(offset, data.len())?;
        self.file.write_all_at(data, offset)?;
        Ok(())
    }

    /// Flushes to stable storage.
    pub fn flush(&self) -> Result<(), StorageError> {
        self.file.sync_data()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_writes_and_rejects_out_of_range() {
        let dir = std::env::temp_dir().join(format!("fractos-store-{}", std::process::id()));
        let s = BlockStore::open(&dir, 8192).unwrap();
        s.write_at(4000, b"hello").unwrap();
        let mut buf = [0u8; 5];
        s.read_at(4000, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(matches!(
            s.read_at(8190, &mut buf),
            Err(StorageError::OutOfRange { .. })
        ));
        assert!(matches!(
            s.write_at(u64::MAX, b"x"),
            Err(StorageError::OutOfRange { .. })
        ));
        std::fs::remove_file(dir).unwrap();
    }
}
