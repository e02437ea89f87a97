//! Memory regions: keys, access flags, bounds, invalidation, and the
//! [`Memory`] trait through which the engine reaches region bytes.

use alloc::vec::Vec;
use core::ops::BitOr;

/// Where region bytes live. The engine calls it only for ranges that lie
/// inside a registered region with the right access, after checking keys
/// and bounds; implementations may still refuse ([`MemoryFault`]) — e.g.
/// guest memory that went away — and the engine turns that into an error
/// completion or NAK.
pub trait Memory {
    /// Reads `buf.len()` bytes at `addr`.
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryFault>;
    /// Writes `data` at `addr`.
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), MemoryFault>;
}

/// The backing memory refused an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the memory backing a region refused the access")]
pub struct MemoryFault;

/// Access rights of a memory region (and the remote rights a QP allows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Access(u8);

impl Access {
    /// No rights beyond local read.
    pub const NONE: Access = Access(0);
    /// The engine may write the region for this host (RECV, READ results).
    pub const LOCAL_WRITE: Access = Access(1);
    /// Peers may WRITE into the region.
    pub const REMOTE_WRITE: Access = Access(2);
    /// Peers may READ the region.
    pub const REMOTE_READ: Access = Access(4);

    /// Whether all of `other`'s rights are present.
    pub const fn contains(self, other: Access) -> bool {
        self.0 & other.0 == other.0
    }
}

impl BitOr for Access {
    type Output = Access;
    fn bitor(self, rhs: Access) -> Access {
        Access(self.0 | rhs.0)
    }
}

/// The keys of a registered region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MrKeys {
    /// Local key, named in scatter/gather entries.
    pub lkey: u32,
    /// Remote key, given to peers for RDMA READ/WRITE.
    pub rkey: u32,
}

/// Why a region access was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// No valid region has this key (never registered, deregistered, or
    /// its rkey invalidated).
    #[error("no valid memory region with key {0:#x}")]
    BadKey(u32),
    /// The region lacks the needed right.
    #[error("the memory region lacks the access right")]
    Rights,
    /// The range does not lie inside the region.
    #[error("the range lies outside the memory region")]
    Bounds,
}

#[derive(Clone, Copy, Debug)]
struct Region {
    addr: u64,
    len: u64,
    access: Access,
    rkey_valid: bool,
}

#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    generation: u8,
    region: Option<Region>,
}

/// The region table (fixed capacity, allocated at setup).
#[derive(Debug)]
pub(crate) struct MrTable {
    slots: Vec<Slot>,
}

impl MrTable {
    pub(crate) fn new(capacity: usize) -> MrTable {
        let capacity = capacity.min(0x00FF_FFFF);
        let mut slots = Vec::with_capacity(capacity);
        slots.resize(capacity, Slot::default());
        MrTable { slots }
    }

    fn key(index: usize, generation: u8) -> u32 {
        ((index as u32 + 1) << 8) | u32::from(generation)
    }

    fn slot(&self, key: u32) -> Option<(usize, &Region)> {
        let index = (key >> 8).checked_sub(1)? as usize;
        let slot = self.slots.get(index)?;
        let region = slot.region.as_ref()?;
        (key & 0xFF == u32::from(slot.generation)).then_some((index, region))
    }

    /// Registers `[addr, addr + len)`; `None` if the table is full.
    pub(crate) fn register(&mut self, addr: u64, len: u64, access: Access) -> Option<MrKeys> {
        let index = self.slots.iter().position(|s| s.region.is_none())?;
        let slot = &mut self.slots[index];
        slot.region = Some(Region {
            addr,
            len,
            access,
            rkey_valid: true,
        });
        let key = Self::key(index, slot.generation);
        Some(MrKeys {
            lkey: key,
            rkey: key,
        })
    }

    /// Deregisters the region of `lkey`; its keys are never valid again
    /// (until the 8-bit generation wraps after 256 reuses of the slot).
    pub(crate) fn deregister(&mut self, lkey: u32) -> Result<(), AccessError> {
        let (index, _) = self.slot(lkey).ok_or(AccessError::BadKey(lkey))?;
        let slot = &mut self.slots[index];
        slot.region = None;
        slot.generation = slot.generation.wrapping_add(1);
        Ok(())
    }

    /// Revokes remote access through `rkey` (the region stays usable
    /// locally).
    pub(crate) fn invalidate_rkey(&mut self, rkey: u32) -> Result<(), AccessError> {
        let (index, _) = self.slot(rkey).ok_or(AccessError::BadKey(rkey))?;
        if let Some(r) = self.slots[index].region.as_mut() {
            r.rkey_valid = false;
        }
        Ok(())
    }

    fn check(region: &Region, addr: u64, len: u64, need: Access) -> Result<(), AccessError> {
        if !region.access.contains(need) {
            return Err(AccessError::Rights);
        }
        // addr >= start && len <= size && addr - start <= size - len, with
        // no sum that could overflow.
        let inside =
            addr >= region.addr && len <= region.len && addr - region.addr <= region.len - len;
        if inside {
            Ok(())
        } else {
            Err(AccessError::Bounds)
        }
    }

    /// Checks a local access through `lkey`.
    pub(crate) fn check_local(
        &self,
        lkey: u32,
        addr: u64,
        len: u64,
        need: Access,
    ) -> Result<(), AccessError> {
        let (_, region) = self.slot(lkey).ok_or(AccessError::BadKey(lkey))?;
        Self::check(region, addr, len, need)
    }

    /// Checks a remote access through `rkey`.
    pub(crate) fn check_remote(
        &self,
        rkey: u32,
        addr: u64,
        len: u64,
        need: Access,
    ) -> Result<(), AccessError> {
        match self.slot(rkey) {
            Some((_, region)) if region.rkey_valid => Self::check(region, addr, len, need),
            _ => Err(AccessError::BadKey(rkey)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_bounds_and_revocation() {
        let mut t = MrTable::new(2);
        let rw = Access::LOCAL_WRITE | Access::REMOTE_WRITE;
        let k = t.register(0x1000, 0x100, rw).unwrap();
        assert!(t
            .check_remote(k.rkey, 0x1000, 0x100, Access::REMOTE_WRITE)
            .is_ok());
        assert!(t
            .check_remote(k.rkey, 0x10FF, 1, Access::REMOTE_WRITE)
            .is_ok());
        assert!(t
            .check_remote(k.rkey, 0x1000, 0, Access::REMOTE_WRITE)
            .is_ok());
        assert_eq!(
            t.check_remote(k.rkey, 0x10FF, 2, Access::REMOTE_WRITE),
            Err(AccessError::Bounds)
        );
        assert_eq!(
            t.check_remote(k.rkey, 0xFFF, 1, Access::REMOTE_WRITE),
            Err(AccessError::Bounds)
        );
        assert_eq!(
            t.check_remote(k.rkey, 0x1000, 0x101, Access::REMOTE_WRITE),
            Err(AccessError::Bounds)
        );
        assert_eq!(
            t.check_remote(k.rkey, u64::MAX, u64::MAX, Access::REMOTE_WRITE),
            Err(AccessError::Bounds)
        );
        assert_eq!(
            t.check_remote(k.rkey, 0x1080, u64::MAX - 0x7F, Access::NONE),
            Err(AccessError::Bounds)
        );
        assert_eq!(
            t.check_remote(k.rkey, 0x1000, 1, Access::REMOTE_READ),
            Err(AccessError::Rights)
        );
        assert_eq!(
            t.check_remote(k.rkey ^ 1, 0x1000, 1, Access::NONE),
            Err(AccessError::BadKey(k.rkey ^ 1))
        );
        assert_eq!(
            t.check_remote(0, 0x1000, 1, Access::NONE),
            Err(AccessError::BadKey(0))
        );

        t.invalidate_rkey(k.rkey).unwrap();
        assert_eq!(
            t.check_remote(k.rkey, 0x1000, 1, Access::REMOTE_WRITE),
            Err(AccessError::BadKey(k.rkey))
        );
        assert!(t
            .check_local(k.lkey, 0x1000, 1, Access::LOCAL_WRITE)
            .is_ok());

        t.deregister(k.lkey).unwrap();
        assert!(t.check_local(k.lkey, 0x1000, 1, Access::NONE).is_err());
        let again = t.register(0x1000, 0x100, rw).unwrap();
        assert_ne!(again.rkey, k.rkey, "a reused slot gets a new key");
        assert!(t
            .check_remote(k.rkey, 0x1000, 1, Access::REMOTE_WRITE)
            .is_err());
        t.register(0, 1, rw).unwrap();
        assert!(t.register(0, 1, rw).is_none(), "capacity");
    }
}
