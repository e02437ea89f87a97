//! Registered memory: SDK-owned buffers at distinct addresses of the
//! process's registered address space, served to the controller by the
//! SDK's reader thread through [`fractos_process::Memory`].

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use fractos_process::{Memory, OutOfWindow};
use fractos_wire::{ErrorCode, MAX_DATA_LEN};

use crate::error::SdkError;
use crate::slot::lock;

/// First address handed out; regions never start at 0 so a zeroed address
/// in a bug report stands out.
const BASE: u64 = 0x1_0000_0000;
/// Regions are aligned to and separated by at least one page, so an access
/// can never span two regions.
const PAGE: u64 = 4096;

struct RegionInner {
    space: u64,
    addr: u64,
    bytes: RwLock<Vec<u8>>,
}

/// A window of registered memory owned by the SDK.
///
/// The controller reads and writes it (through the SDK's reader thread)
/// when a copy involves a Memory capability made from it; the application
/// reads and writes it with the methods below. Clones share the same bytes.
/// A region stays registered until [`crate::Process::unregister`] or the
/// process closes, even if every `Region` value is dropped.
///
/// ```
/// # use fractos_sdk::MemorySpace;
/// let space = MemorySpace::new();
/// let r = space.register(8).unwrap();
/// r.write_at(2, b"hi").unwrap();
/// assert_eq!(r.to_vec(), b"\0\0hi\0\0\0\0");
/// let mut buf = [0u8; 2];
/// r.read_at(2, &mut buf).unwrap();
/// assert_eq!(&buf, b"hi");
/// assert!(r.write_at(7, b"xy").is_err());
/// ```
#[derive(Clone)]
pub struct Region {
    inner: Arc<RegionInner>,
    len: u64,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("addr", &format_args!("{:#x}", self.inner.addr))
            .field("len", &self.len)
            .finish()
    }
}

impl Region {
    /// Start address in the process's registered address space (what
    /// `MemoryCreate` carries on the wire).
    pub fn addr(&self) -> u64 {
        self.inner.addr
    }

    /// Length in bytes (fixed at registration).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the region has no bytes (never: registration refuses 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn space(&self) -> u64 {
        self.inner.space
    }

    fn check(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, SdkError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(offset as usize..end as usize),
            _ => Err(SdkError::OutOfRange {
                offset,
                len,
                region_len: self.len,
            }),
        }
    }

    fn read_guard(&self) -> RwLockReadGuard<'_, Vec<u8>> {
        self.inner.bytes.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_guard(&self) -> RwLockWriteGuard<'_, Vec<u8>> {
        self.inner.bytes.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Copies `buf.len()` bytes at `offset` into `buf`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SdkError> {
        let r = self.check(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.read_guard()[r]);
        Ok(())
    }

    /// Copies `data` into the region at `offset`.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), SdkError> {
        let r = self.check(offset, data.len() as u64)?;
        self.write_guard()[r].copy_from_slice(data);
        Ok(())
    }

    /// Sets every byte to `value`.
    pub fn fill(&self, value: u8) {
        self.write_guard().fill(value);
    }

    /// A copy of the whole region.
    pub fn to_vec(&self) -> Vec<u8> {
        self.read_guard().clone()
    }

    /// Runs `f` on the region's bytes (shared lock: controller reads may run
    /// concurrently, controller writes wait).
    pub fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        f(&self.read_guard())
    }

    /// Runs `f` on the region's bytes mutably (exclusive lock: controller
    /// accesses wait until `f` returns, so keep it short).
    pub fn with_bytes_mut<R>(&self, f: impl FnOnce(&mut [u8]) -> R) -> R {
        f(&mut self.write_guard())
    }
}

/// A registered address space: regions at distinct, never-reused addresses.
///
/// Every [`crate::Process`] has one ([`crate::Process::memory`]); it is also
/// usable on its own, which is how its serving logic is unit-tested.
#[derive(Clone)]
pub struct MemorySpace {
    inner: Arc<SpaceInner>,
}

struct SpaceInner {
    id: u64,
    state: std::sync::Mutex<SpaceState>,
}

struct SpaceState {
    next: u64,
    regions: BTreeMap<u64, Region>,
}

impl Default for MemorySpace {
    fn default() -> Self {
        Self::new()
    }
}

impl MemorySpace {
    /// An empty address space.
    pub fn new() -> Self {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        MemorySpace {
            inner: Arc::new(SpaceInner {
                id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                state: std::sync::Mutex::new(SpaceState {
                    next: BASE,
                    regions: BTreeMap::new(),
                }),
            }),
        }
    }

    /// Registers a zeroed region of `len` bytes.
    pub fn register(&self, len: u64) -> Result<Region, SdkError> {
        let n = usize::try_from(len)
            .map_err(|_| SdkError::invalid(format!("cannot register {len} bytes")))?;
        self.register_vec(vec![0; n])
    }

    /// Registers `bytes` as a region (no copy).
    pub fn register_vec(&self, bytes: Vec<u8>) -> Result<Region, SdkError> {
        let len = bytes.len() as u64;
        if len == 0 {
            return Err(SdkError::invalid("cannot register an empty region"));
        }
        let mut s = lock(&self.inner.state);
        let addr = s.next;
        let span = len
            .checked_add(2 * PAGE - 1)
            .map(|v| v / PAGE * PAGE)
            .and_then(|span| addr.checked_add(span))
            .ok_or_else(|| SdkError::invalid("registered address space exhausted"))?;
        s.next = span;
        let region = Region {
            inner: Arc::new(RegionInner {
                space: self.inner.id,
                addr,
                bytes: RwLock::new(bytes),
            }),
            len,
        };
        s.regions.insert(addr, region.clone());
        Ok(region)
    }

    /// Removes `region` from the address space: later controller accesses
    /// to it fail with `MemoryFault`. Returns whether it was registered.
    pub fn unregister(&self, region: &Region) -> bool {
        if region.space() != self.inner.id {
            return false;
        }
        lock(&self.inner.state)
            .regions
            .remove(&region.addr())
            .is_some()
    }

    /// Whether `region` belongs to this space and is registered.
    pub fn contains(&self, region: &Region) -> bool {
        region.space() == self.inner.id
            && lock(&self.inner.state)
                .regions
                .get(&region.addr())
                .is_some_and(|r| Arc::ptr_eq(&r.inner, &region.inner))
    }

    /// Registered regions.
    pub fn len(&self) -> usize {
        lock(&self.inner.state).regions.len()
    }

    /// Whether no region is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn id(&self) -> u64 {
        self.inner.id
    }

    /// The region holding `[addr, addr+len)` and the offset of `addr` in it.
    fn find(&self, addr: u64, len: u64) -> Result<(Region, u64), OutOfWindow> {
        let s = lock(&self.inner.state);
        let (base, region) = s.regions.range(..=addr).next_back().ok_or(OutOfWindow)?;
        let offset = OutOfWindow::check(*base, region.len, addr, len)?;
        Ok((region.clone(), offset))
    }

    /// Serves a controller `MemRead` the way the protocol state machine
    /// does: `MemoryFault` outside every region, `InvalidArgument` above
    /// [`fractos_wire::MAX_DATA_LEN`].
    pub fn serve_read(&self, addr: u64, len: u32) -> Result<Vec<u8>, ErrorCode> {
        if len as usize > MAX_DATA_LEN {
            return Err(ErrorCode::InvalidArgument);
        }
        let mut data = vec![0; len as usize];
        Memory::read(&mut &*self, addr, &mut data).map_err(|_| ErrorCode::MemoryFault)?;
        Ok(data)
    }

    /// Serves a controller `MemWrite` (`MemoryFault` outside every region).
    pub fn serve_write(&self, addr: u64, data: &[u8]) -> Result<(), ErrorCode> {
        Memory::write(&mut &*self, addr, data).map_err(|_| ErrorCode::MemoryFault)
    }
}

/// The SDK's registered memory as the protocol state machine reaches it:
/// the reader thread hands `&mut &MemorySpace` to
/// [`fractos_process::Connection::handle_body`].
impl Memory for &MemorySpace {
    fn read(&mut self, addr: u64, out: &mut [u8]) -> Result<(), OutOfWindow> {
        let (region, offset) = self.find(addr, out.len() as u64)?;
        let start = offset as usize;
        out.copy_from_slice(&region.read_guard()[start..start + out.len()]);
        Ok(())
    }

    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), OutOfWindow> {
        let (region, offset) = self.find(addr, data.len() as u64)?;
        let start = offset as usize;
        region.write_guard()[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_distinct_and_page_separated() {
        let s = MemorySpace::new();
        let a = s.register(1).unwrap();
        let b = s.register(PAGE).unwrap();
        let c = s.register(PAGE + 1).unwrap();
        assert!(a.addr() + a.len() < b.addr());
        assert!(b.addr() + b.len() < c.addr());
        assert_eq!(a.addr() % PAGE, 0);
        assert_eq!(b.addr() % PAGE, 0);
        assert_eq!(c.addr() % PAGE, 0);
        assert_eq!(s.len(), 3);
        assert!(s.register(0).is_err());
    }

    #[test]
    fn serve_read_write_in_bounds() {
        let s = MemorySpace::new();
        let r = s.register_vec((0..100u8).collect()).unwrap();
        assert_eq!(s.serve_read(r.addr() + 10, 3).unwrap(), vec![10, 11, 12]);
        s.serve_write(r.addr() + 98, &[1, 2]).unwrap();
        let mut b = [0; 2];
        r.read_at(98, &mut b).unwrap();
        assert_eq!(b, [1, 2]);
        // Whole region.
        assert_eq!(s.serve_read(r.addr(), 100).unwrap().len(), 100);
    }

    #[test]
    fn serve_out_of_range_is_memory_fault() {
        let s = MemorySpace::new();
        let r = s.register(100).unwrap();
        let r2 = s.register(100).unwrap();
        assert_eq!(s.serve_read(r.addr() + 99, 2), Err(ErrorCode::MemoryFault));
        assert_eq!(s.serve_read(r.addr() - 1, 1), Err(ErrorCode::MemoryFault));
        assert_eq!(s.serve_read(0, 1), Err(ErrorCode::MemoryFault));
        assert_eq!(s.serve_read(u64::MAX, 1), Err(ErrorCode::MemoryFault));
        assert_eq!(
            s.serve_write(r.addr() + 100, &[1]),
            Err(ErrorCode::MemoryFault)
        );
        // Between regions.
        assert_eq!(
            s.serve_write(r.addr() + 100, &vec![0; (r2.addr() - r.addr()) as usize]),
            Err(ErrorCode::MemoryFault)
        );
        assert_eq!(
            s.serve_read(r.addr(), MAX_DATA_LEN as u32 + 1),
            Err(ErrorCode::InvalidArgument)
        );
        assert!(s.unregister(&r));
        assert!(!s.unregister(&r));
        assert!(!s.contains(&r));
        assert!(s.contains(&r2));
        assert_eq!(s.serve_read(r.addr(), 1), Err(ErrorCode::MemoryFault));
        // A region of another space is not ours.
        let other = MemorySpace::new();
        assert!(!other.unregister(&r2));
        assert!(!other.contains(&r2));
    }

    #[test]
    fn local_access_checks() {
        let s = MemorySpace::new();
        let r = s.register(4).unwrap();
        assert!(matches!(
            r.write_at(3, &[1, 2]),
            Err(SdkError::OutOfRange {
                offset: 3,
                len: 2,
                region_len: 4
            })
        ));
        assert!(r.read_at(u64::MAX, &mut [0]).is_err());
        r.fill(9);
        assert_eq!(
            r.with_bytes(|b| b.iter().map(|x| *x as u32).sum::<u32>()),
            36
        );
        r.with_bytes_mut(|b| b[0] = 1);
        assert_eq!(r.to_vec(), vec![1, 9, 9, 9]);
        assert!(!r.is_empty());
        assert!(format!("{r:?}").contains("len: 4"));
    }
}
