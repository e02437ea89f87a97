//! Registered memory: page-aligned, memfd-backed mappings at distinct
//! addresses of the process's registered address space.
//!
//! # What the controller may do, what the adaptor may rely on
//!
//! A region's bytes live in a sealed memfd mapped `MAP_SHARED` (see
//! [`Backing`]), at a stable address ([`Region::as_ptr`]) for the
//! region's life: device code may hand the pointer to a device.
//!
//! * Over TCP, the controller reaches a region only through the SDK's
//!   reader thread (`MemRead` / `MemWrite`), which takes the region's lock
//!   like [`Region::read_at`] / [`Region::write_at`] do.
//! * Over a local channel ([`crate::Process::attach_local`]) the
//!   controller maps the memfd itself and reads or writes the bytes
//!   directly, **at any time a Memory capability covering them is used in
//!   a copy**, without taking the SDK's lock and without telling the
//!   process. It never touches bytes outside the regions the process
//!   registered with it, and stops before [`crate::Process::unregister`]
//!   returns.
//!
//! So an adaptor must not rely on atomicity of controller writes (a
//! concurrent reader can see a chunk half written) nor on a region staying
//! unchanged while a copy into it may run: synchronise through the copy's
//! completion (or a continuation Request), as with any DMA buffer.
//! [`Region::with_bytes`] slices are views of that shared memory.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use fractos_process::{Memory, OutOfWindow};
use fractos_shm::{Mapping, PAGE as SHM_PAGE};
use fractos_wire::{ErrorCode, MAX_DATA_LEN};

use crate::error::SdkError;
use crate::slot::lock;

/// First address handed out; regions never start at 0 so a zeroed address
/// in a bug report stands out.
const BASE: u64 = 0x1_0000_0000;
/// Regions are aligned to and separated by at least one page, so an access
/// can never span two regions.
const PAGE: u64 = SHM_PAGE as u64;

/// What holds a region's bytes: the seam between registered memory and
/// where it comes from.
///
/// * [`Backing::Memfd`]: a sealed memfd of the region's own
///   ([`MemorySpace::register`] makes these);
/// * [`Backing::Window`]: a page-aligned window of a mapping someone else
///   provides (e.g. the process's shared-memory slot of an appliance,
///   mapped with [`fractos_shm::Mapping::open_trusted`]); register one with
///   [`MemorySpace::register_backing`]. Regions in one mapping must not
///   overlap; the space does not check that, the provider of the mapping
///   does.
///
/// A local channel shares a region with its controller by passing the
/// backing's descriptor and file offset ([`Backing::file_offset`]), so
/// both kinds work as long as the descriptor is a sealed memfd.
#[derive(Clone, Debug)]
pub enum Backing {
    /// A memfd of the region's own, mapped from its start.
    Memfd(Mapping),
    /// `len` bytes at `offset` (page-aligned) of `mapping`.
    Window {
        /// The provided mapping.
        mapping: Mapping,
        /// Where the region starts in it (a multiple of the page size).
        offset: usize,
    },
}

impl Backing {
    /// A fresh sealed memfd of `len` bytes (rounded up to whole pages).
    pub fn memfd(len: u64) -> Result<Backing, SdkError> {
        let n = usize::try_from(len)
            .map_err(|_| SdkError::invalid(format!("cannot register {len} bytes")))?;
        Ok(Backing::Memfd(Mapping::create("fractos-region", n)?))
    }

    /// The mapping holding the bytes.
    pub fn mapping(&self) -> &Mapping {
        match self {
            Backing::Memfd(m) | Backing::Window { mapping: m, .. } => m,
        }
    }

    /// Where the region starts in the mapping.
    pub fn offset(&self) -> usize {
        match self {
            Backing::Memfd(_) => 0,
            Backing::Window { offset, .. } => *offset,
        }
    }

    /// Where the region starts in the mapping's file.
    pub fn file_offset(&self) -> u64 {
        self.mapping().file_offset() + self.offset() as u64
    }
}

/// Told about every region registered or unregistered (the local channel
/// tells its controller and waits for its answer).
pub(crate) trait Registrar: Send + Sync {
    /// `region` is about to become reachable; `Err` refuses it.
    fn register(&self, region: &Region) -> Result<(), SdkError>;
    /// `region` is no longer registered; returns once the controller
    /// stopped touching it.
    fn unregister(&self, region: &Region);
}

/// Chooses where new regions live when the memory is provided (a
/// shared-memory slot's memory area): each region's backing and its
/// registered address. Addresses handed out must never overlap nor be
/// reused.
pub(crate) trait Carver: Send + Sync {
    /// A backing of `len` bytes and the address it is registered at.
    fn carve(&self, len: u64) -> Result<(Backing, u64), SdkError>;
}

struct RegionInner {
    space: u64,
    addr: u64,
    backing: Backing,
    /// Serialises this process's accesses (application and reader thread);
    /// a controller with direct access does not take it.
    lock: RwLock<()>,
}

/// A window of registered memory owned by the SDK.
///
/// The controller reads and writes it when a copy involves a Memory
/// capability made from it (see *Concurrency* below);
/// the application reads and writes it with the methods below, or through
/// [`Region::as_ptr`]. Clones share the same bytes. A region stays
/// registered until [`crate::Process::unregister`] or the process closes,
/// even if every `Region` value is dropped.
///
/// # Concurrency
///
/// Over TCP the controller reaches the bytes only through the SDK's reader
/// thread, which takes the region's lock as [`Region::read_at`] and
/// [`Region::write_at`] do. Over a local channel the controller maps the
/// memfd and reads or writes the bytes directly, at any time a Memory
/// capability covering them is used in a copy, without the lock; it never
/// touches other bytes and stops before [`crate::Process::unregister`]
/// returns. Do not rely on atomicity of controller writes, nor on bytes
/// staying unchanged while a copy into them may run: synchronise through
/// the copy's completion, as with a DMA buffer.
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
/// assert_eq!(r.as_ptr() as usize % 4096, 0);
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

    /// The region's first byte in this process (page-aligned, stable for
    /// the region's life): for device code. See [`Region`]'s *Concurrency*
    /// for what the controller may do to the bytes concurrently.
    pub fn as_ptr(&self) -> *const u8 {
        self.as_mut_ptr().cast_const()
    }

    /// As [`Region::as_ptr`], for writing (a device's DMA target).
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.inner
            .backing
            .mapping()
            .as_ptr()
            .wrapping_add(self.inner.backing.offset())
    }

    /// What holds the bytes.
    pub fn backing(&self) -> &Backing {
        &self.inner.backing
    }

    pub(crate) fn space(&self) -> u64 {
        self.inner.space
    }

    fn check(&self, offset: u64, len: u64) -> Result<usize, SdkError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.inner.backing.offset() + offset as usize),
            _ => Err(SdkError::OutOfRange {
                offset,
                len,
                region_len: self.len,
            }),
        }
    }

    fn read_guard(&self) -> RwLockReadGuard<'_, ()> {
        self.inner.lock.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_guard(&self) -> RwLockWriteGuard<'_, ()> {
        self.inner.lock.write().unwrap_or_else(|e| e.into_inner())
    }

    fn mapping(&self) -> &Mapping {
        self.inner.backing.mapping()
    }

    /// Copies `buf.len()` bytes at `offset` into `buf`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SdkError> {
        let at = self.check(offset, buf.len() as u64)?;
        let _g = self.read_guard();
        self.mapping().read_at(at, buf)?;
        Ok(())
    }

    /// Copies `data` into the region at `offset`.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), SdkError> {
        let at = self.check(offset, data.len() as u64)?;
        let _g = self.write_guard();
        self.mapping().write_at(at, data)?;
        Ok(())
    }

    /// Sets every byte to `value`.
    pub fn fill(&self, value: u8) {
        let _g = self.write_guard();
        let _ = self
            .mapping()
            .fill(self.inner.backing.offset(), self.len as usize, value);
    }

    /// A copy of the whole region.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.len as usize];
        let _ = self.read_at(0, &mut v);
        v
    }

    /// Runs `f` on the region's bytes (shared lock: SDK-served controller
    /// reads may run concurrently, SDK-served writes wait; a controller
    /// with direct access does not wait, see [`Region`]'s *Concurrency*).
    pub fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        let _g = self.read_guard();
        let (at, len) = (self.inner.backing.offset(), self.len as usize);
        match self.mapping().with_bytes(at, len, f) {
            Ok(r) => r,
            Err(_) => unreachable!("a region lies inside its mapping"),
        }
    }

    /// Runs `f` on the region's bytes mutably (exclusive lock: SDK-served
    /// controller accesses wait until `f` returns, so keep it short).
    pub fn with_bytes_mut<R>(&self, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let _g = self.write_guard();
        let (at, len) = (self.inner.backing.offset(), self.len as usize);
        match self.mapping().with_bytes_mut(at, len, f) {
            Ok(r) => r,
            Err(_) => unreachable!("a region lies inside its mapping"),
        }
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
    registrar: Option<Arc<dyn Registrar>>,
    carver: Option<Arc<dyn Carver>>,
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
                    registrar: None,
                    carver: None,
                }),
            }),
        }
    }

    /// Tells `registrar` about every later registration (set once, by a
    /// local channel, before the application sees the space).
    pub(crate) fn set_registrar(&self, registrar: Arc<dyn Registrar>) {
        lock(&self.inner.state).registrar = Some(registrar);
    }

    /// Makes every later [`MemorySpace::register`] and
    /// [`MemorySpace::register_vec`] take its memory from `carver` (set
    /// once, by a shared-memory slot, before the application sees the
    /// space).
    pub(crate) fn set_carver(&self, carver: Arc<dyn Carver>) {
        lock(&self.inner.state).carver = Some(carver);
    }

    fn carve(&self, len: u64) -> Result<Option<Region>, SdkError> {
        let Some(c) = lock(&self.inner.state).carver.clone() else {
            return Ok(None);
        };
        let (backing, addr) = c.carve(len)?;
        let n = usize::try_from(len).map_err(|_| SdkError::invalid("region too large"))?;
        backing.mapping().fill(backing.offset(), n, 0)?;
        self.register_at(backing, len, Some(addr)).map(Some)
    }

    /// Registers a zeroed region of `len` bytes, backed by a fresh sealed
    /// memfd (or carved out of the process's shared-memory slot).
    pub fn register(&self, len: u64) -> Result<Region, SdkError> {
        if len == 0 {
            return Err(SdkError::invalid("cannot register an empty region"));
        }
        if let Some(r) = self.carve(len)? {
            return Ok(r);
        }
        self.register_backing(Backing::memfd(len)?, len)
    }

    /// Registers a region holding `bytes` (copied once into a fresh sealed
    /// memfd).
    pub fn register_vec(&self, bytes: Vec<u8>) -> Result<Region, SdkError> {
        if bytes.is_empty() {
            return Err(SdkError::invalid("cannot register an empty region"));
        }
        if let Some(r) = self.carve(bytes.len() as u64)? {
            r.write_at(0, &bytes)?;
            return Ok(r);
        }
        let backing = Backing::memfd(bytes.len() as u64)?;
        backing.mapping().write_at(0, &bytes)?;
        self.register_backing(backing, bytes.len() as u64)
    }

    /// Registers `len` bytes of `backing` as a region (the seam for memory
    /// provided by someone else: see [`Backing::Window`]). The window must
    /// lie inside the mapping and start on a page boundary.
    pub fn register_backing(&self, backing: Backing, len: u64) -> Result<Region, SdkError> {
        self.register_at(backing, len, None)
    }

    /// As [`MemorySpace::register_backing`], at address `at` if given.
    fn register_at(&self, backing: Backing, len: u64, at: Option<u64>) -> Result<Region, SdkError> {
        if len == 0 {
            return Err(SdkError::invalid("cannot register an empty region"));
        }
        let (offset, mapped) = (backing.offset(), backing.mapping().len());
        let fits = usize::try_from(len)
            .ok()
            .and_then(|l| offset.checked_add(l))
            .is_some_and(|end| end <= mapped);
        if !fits || offset as u64 % PAGE != 0 {
            return Err(SdkError::invalid(format!(
                "a region of {len} bytes at offset {offset} does not fit a {mapped}-byte mapping on a page boundary"
            )));
        }
        let (addr, registrar) = {
            let mut s = lock(&self.inner.state);
            let addr = match at {
                Some(addr) => addr,
                None => {
                    let addr = s.next;
                    let span = len
                        .checked_add(2 * PAGE - 1)
                        .map(|v| v / PAGE * PAGE)
                        .and_then(|span| addr.checked_add(span))
                        .ok_or_else(|| SdkError::invalid("registered address space exhausted"))?;
                    s.next = span;
                    addr
                }
            };
            (addr, s.registrar.clone())
        };
        let region = Region {
            inner: Arc::new(RegionInner {
                space: self.inner.id,
                addr,
                backing,
                lock: RwLock::new(()),
            }),
            len,
        };
        if let Some(r) = registrar {
            r.register(&region)?;
        }
        lock(&self.inner.state).regions.insert(addr, region.clone());
        Ok(region)
    }

    /// Removes `region` from the address space: later controller accesses
    /// to it fail with `MemoryFault`. Returns whether it was registered.
    pub fn unregister(&self, region: &Region) -> bool {
        if region.space() != self.inner.id {
            return false;
        }
        let (removed, registrar) = {
            let mut s = lock(&self.inner.state);
            (s.regions.remove(&region.addr()), s.registrar.clone())
        };
        match (removed, registrar) {
            (Some(r), Some(registrar)) => {
                registrar.unregister(&r);
                true
            }
            (removed, _) => removed.is_some(),
        }
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
        region.read_at(offset, out).map_err(|_| OutOfWindow)
    }

    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), OutOfWindow> {
        let (region, offset) = self.find(addr, data.len() as u64)?;
        region.write_at(offset, data).map_err(|_| OutOfWindow)
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
    fn regions_are_shared_memory_at_stable_page_aligned_addresses() {
        let s = MemorySpace::new();
        let r = s.register(10_000).unwrap();
        let p = r.as_ptr();
        assert_eq!(p as usize % 4096, 0);
        r.write_at(9_998, b"ok").unwrap();
        assert_eq!(r.as_ptr(), p, "stable");
        // Another mapping of the same memfd (what a controller maps) sees
        // the bytes and its writes are seen.
        let Backing::Memfd(m) = r.backing() else {
            panic!("register makes memfd regions")
        };
        let other = Mapping::open(m.fd().try_clone_to_owned().unwrap(), 0, 10_000).unwrap();
        let mut b = [0u8; 2];
        other.read_at(9_998, &mut b).unwrap();
        assert_eq!(&b, b"ok");
        other.write_at(0, b"from afar").unwrap();
        assert_eq!(s.serve_read(r.addr(), 9).unwrap(), b"from afar");
        assert_eq!(r.with_bytes(|b| b.len()), 10_000);
        // register_vec copies its bytes in.
        let v = s.register_vec(vec![5; 3]).unwrap();
        assert_eq!(v.to_vec(), vec![5, 5, 5]);
    }

    #[test]
    fn windows_of_a_provided_mapping_are_regions_too() {
        let s = MemorySpace::new();
        let slot = Mapping::create("slot", 4 * 4096).unwrap();
        let w = Backing::Window {
            mapping: slot.clone(),
            offset: 4096,
        };
        let r = s.register_backing(w, 2 * 4096).unwrap();
        assert_eq!(r.backing().file_offset(), 4096);
        s.serve_write(r.addr() + 1, b"xy").unwrap();
        let mut b = [0u8; 2];
        slot.read_at(4097, &mut b).unwrap();
        assert_eq!(&b, b"xy");
        assert_eq!(r.as_ptr(), slot.as_ptr().wrapping_add(4096).cast_const());
        // Outside the mapping, or off a page boundary: refused.
        let past = Backing::Window {
            mapping: slot.clone(),
            offset: 3 * 4096,
        };
        assert!(s.register_backing(past, 4097).is_err());
        let odd = Backing::Window {
            mapping: slot,
            offset: 100,
        };
        assert!(s.register_backing(odd, 10).is_err());
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
