//! Sealed memfd mappings.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fractos_transport::ring::SharedMemory;
use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};

use crate::ShmError;

/// The page size every mapping offset and length is aligned to.
pub const PAGE: usize = 4096;

/// The seals a memfd must carry before the controller maps it: without
/// them the other process could shrink the file under the mapping, and
/// the next access would raise `SIGBUS` in the controller.
pub const REQUIRED_SEALS: SealFlags = SealFlags::SHRINK.union(SealFlags::GROW);

/// `len` rounded up to whole pages (`None` on overflow).
pub fn page_round(len: usize) -> Option<usize> {
    len.checked_add(PAGE - 1).map(|v| v / PAGE * PAGE)
}

/// Checks that `fd` holds `len` bytes (rounded up to pages) at the
/// page-aligned `offset`; returns the rounded length.
/// `statfs.f_type` of tmpfs/shmem, where plain memfds live.
const TMPFS_MAGIC: u64 = 0x0102_1994;

fn window(fd: &OwnedFd, offset: u64, len: usize) -> Result<usize, ShmError> {
    let size = page_round(len)
        .filter(|&s| s > 0)
        .ok_or(ShmError::BadLength { len })?;
    if offset % PAGE as u64 != 0 {
        return Err(ShmError::Misaligned { offset });
    }
    let st = rustix::fs::fstat(fd).map_err(io("examining the file"))?;
    let file_len = u64::try_from(st.st_size).unwrap_or(0);
    let end = offset.checked_add(size as u64);
    if end.is_none_or(|end| end > file_len) {
        return Err(ShmError::TooSmall {
            file_len,
            needed: end.unwrap_or(u64::MAX),
        });
    }
    Ok(size)
}

struct Inner {
    ptr: NonNull<u8>,
    len: usize,
    /// `None` for [`Mapping::open_detached`]: the mapping outlives its
    /// descriptor.
    fd: Option<OwnedFd>,
    /// Offset of the mapping in the file.
    offset: u64,
}

// SAFETY: the mapping is plain shared memory owned by `Inner` (unmapped
// only in its `Drop`); every access through it goes through raw-pointer
// copies or atomics, never through references that could alias mutably,
// so it may be used from any thread.
unsafe impl Send for Inner {}
// SAFETY: as for `Send`: concurrent accesses are copies and atomics.
unsafe impl Sync for Inner {}

impl Drop for Inner {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr+len` is exactly the region `mmap` returned in
        // `map`, it is unmapped only here, and no reference into it can
        // outlive `Inner` (accessors copy or borrow `&self`).
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A `MAP_SHARED` mapping of (a page-aligned window of) a sealed memfd:
/// memory shared with another process, which may write it at any moment.
///
/// Clones share the mapping; it is unmapped when the last clone goes. The
/// address is stable for the mapping's life. Every accessor is
/// bounds-checked; the bulk ones copy (`memcpy`) and never hand out a
/// reference to bytes another process may be changing, except
/// [`Mapping::with_bytes`] / [`Mapping::with_bytes_mut`], whose contract
/// says so.
#[derive(Clone)]
pub struct Mapping {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping")
            .field("ptr", &self.inner.ptr)
            .field("len", &self.inner.len)
            .field("offset", &self.inner.offset)
            .finish()
    }
}

fn io(what: &'static str) -> impl FnOnce(rustix::io::Errno) -> ShmError {
    move |e| ShmError::Io {
        what,
        source: e.into(),
    }
}

impl Mapping {
    /// A fresh zeroed memfd of `len` bytes (rounded up to whole pages),
    /// sealed against shrinking and growing (and against further seal
    /// changes), mapped read-write and shared. `name` shows in
    /// `/proc/PID/fd` and `/proc/PID/maps`.
    pub fn create(name: &str, len: usize) -> Result<Mapping, ShmError> {
        let size = page_round(len)
            .filter(|&s| s > 0)
            .ok_or(ShmError::BadLength { len })?;
        let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .map_err(io("creating a memfd"))?;
        rustix::fs::ftruncate(&fd, size as u64).map_err(io("sizing the memfd"))?;
        rustix::fs::fcntl_add_seals(&fd, REQUIRED_SEALS | SealFlags::SEAL)
            .map_err(io("sealing the memfd"))?;
        Self::map(fd, 0, size)
    }

    /// Maps `len` bytes at `offset` of a memfd another process sent, after
    /// checking that it is sealed against shrinking and growing
    /// ([`REQUIRED_SEALS`]) and holds `offset + len` bytes. `offset` must
    /// be page-aligned; `len` is rounded up to whole pages (the file must
    /// hold those too).
    pub fn open(fd: OwnedFd, offset: u64, len: usize) -> Result<Mapping, ShmError> {
        let seals = rustix::fs::fcntl_get_seals(&fd).map_err(|_| ShmError::NotSealable)?;
        if !seals.contains(REQUIRED_SEALS) {
            return Err(ShmError::NotSealed {
                seals: seals.bits(),
            });
        }
        // Seals keep a shmem file's pages; on hugetlbfs a punched hole
        // would need a huge page that may not exist when touched (SIGBUS).
        let magic = rustix::fs::fstatfs(&fd)
            .map_err(io("examining the memfd's file system"))?
            .f_type as u64;
        if magic != TMPFS_MAGIC {
            return Err(ShmError::NotShmem { magic });
        }
        let size = window(&fd, offset, len)?;
        Self::map(fd, offset, size)
    }

    /// As [`Mapping::open`], then closes the descriptor: the mapping stays
    /// valid (and backed: the seals outlive every descriptor) but costs
    /// the caller no file descriptor, so a process registering many
    /// regions cannot exhaust its controller's descriptor table.
    /// [`Mapping::fd`] must not be called on the result.
    pub fn open_detached(fd: OwnedFd, offset: u64, len: usize) -> Result<Mapping, ShmError> {
        let mut m = Self::open(fd, offset, len)?;
        if let Some(inner) = Arc::get_mut(&mut m.inner) {
            inner.fd = None;
        }
        Ok(m)
    }

    /// Maps the whole of a received memfd (checked as by
    /// [`Mapping::open`]) if it holds at most `max_len` bytes.
    pub fn open_whole(fd: OwnedFd, max_len: usize) -> Result<Mapping, ShmError> {
        let st = rustix::fs::fstat(&fd).map_err(io("examining the memfd"))?;
        let len = usize::try_from(st.st_size).unwrap_or(usize::MAX);
        if len > max_len {
            return Err(ShmError::BadLength { len });
        }
        Self::open(fd, 0, len)
    }

    /// Maps `len` bytes at `offset` of a file this process trusts not to
    /// shrink while mapped (its own ivshmem slot file, say), checking only
    /// that it is long enough now. Use [`Mapping::open`] for anything
    /// another process controls: if the file shrinks under the mapping,
    /// accesses raise `SIGBUS`.
    pub fn open_trusted(fd: OwnedFd, offset: u64, len: usize) -> Result<Mapping, ShmError> {
        let size = window(&fd, offset, len)?;
        Self::map(fd, offset, size)
    }

    fn map(fd: OwnedFd, offset: u64, len: usize) -> Result<Mapping, ShmError> {
        // SAFETY: a fresh mapping chosen by the kernel (null hint, no
        // MAP_FIXED), so no existing memory is replaced. Every byte stays
        // backed: `fd` holds `offset + len` bytes and cannot shrink (the
        // seals checked by `create`/`open`; the caller's word for
        // `open_trusted`).
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &fd,
                offset,
            )
        }
        .map_err(io("mapping the memfd"))?;
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(ShmError::Io {
            what: "mapping the memfd",
            source: std::io::Error::other("mmap returned a null pointer"),
        })?;
        Ok(Mapping {
            inner: Arc::new(Inner {
                ptr,
                len,
                fd: Some(fd),
                offset,
            }),
        })
    }

    /// The first byte of the mapping (page-aligned, stable until the last
    /// clone is dropped): for device code that needs a raw pointer.
    pub fn as_ptr(&self) -> *mut u8 {
        self.inner.ptr.as_ptr()
    }

    /// Mapped bytes (whole pages).
    pub fn len(&self) -> usize {
        self.inner.len
    }

    /// Whether the mapping is empty (never: mappings have at least a page).
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// Where the mapping starts in its file.
    pub fn file_offset(&self) -> u64 {
        self.inner.offset
    }

    /// The memfd, to pass to another process.
    ///
    /// # Panics
    ///
    /// On a mapping made by [`Mapping::open_detached`], which closed it (a
    /// bug of the caller: such mappings are only read and written).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inner
            .fd
            .as_ref()
            .expect("Mapping::fd on a detached mapping")
            .as_fd()
    }

    /// Whether `a` and `b` are the same mapping.
    pub fn ptr_eq(a: &Mapping, b: &Mapping) -> bool {
        Arc::ptr_eq(&a.inner, &b.inner)
    }

    fn range(&self, offset: usize, len: usize) -> Result<*mut u8, ShmError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.inner.len => {
                // SAFETY: `offset + len <= self.len`, so the pointer stays
                // inside (or one past the end of) the mapping.
                Ok(unsafe { self.inner.ptr.as_ptr().add(offset) })
            }
            _ => Err(ShmError::OutOfBounds {
                offset,
                len,
                mapped: self.inner.len,
            }),
        }
    }

    /// Copies `out.len()` bytes at `offset` into `out`. Bytes another
    /// process writes concurrently may be old, new or a mix.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<(), ShmError> {
        let src = self.range(offset, out.len())?;
        // SAFETY: `src..src+out.len()` is inside the mapping (checked by
        // `range`), which lives as long as `self`; `out` is a distinct
        // private buffer, so the two cannot overlap. The bytes are plain
        // data: any value is valid, a concurrent writer only tears them.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Copies `data` to `offset`.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<(), ShmError> {
        let dst = self.range(offset, data.len())?;
        // SAFETY: as in `read_at`, with the roles swapped; no reference
        // to the destination bytes exists (accessors copy).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    /// Copies `len` bytes from `src` at `src_offset` to `dst_offset` of
    /// `self`, in one `memcpy` (the two mappings may be the same; the
    /// ranges may then overlap).
    pub fn copy_from(
        &self,
        dst_offset: usize,
        src: &Mapping,
        src_offset: usize,
        len: usize,
    ) -> Result<(), ShmError> {
        let from = src.range(src_offset, len)?;
        let to = self.range(dst_offset, len)?;
        // SAFETY: both ranges are inside live mappings (checked above);
        // `copy` tolerates overlap.
        unsafe { std::ptr::copy(from, to, len) };
        Ok(())
    }

    /// Sets `len` bytes at `offset` to `value`.
    pub fn fill(&self, offset: usize, len: usize, value: u8) -> Result<(), ShmError> {
        let dst = self.range(offset, len)?;
        // SAFETY: inside the mapping (checked by `range`).
        unsafe { std::ptr::write_bytes(dst, value, len) };
        Ok(())
    }

    /// Runs `f` on `len` bytes at `offset` as a slice.
    ///
    /// Contract: the slice is memory shared with another process. If that
    /// process (or a controller serving a copy into it) writes the bytes
    /// while `f` runs, `f` sees them change; it must treat them as plain
    /// bytes (no validation-then-use), exactly as with a DMA buffer. Within
    /// this process, callers serialise their own writers (the SDK does).
    pub fn with_bytes<R>(
        &self,
        offset: usize,
        len: usize,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, ShmError> {
        let p = self.range(offset, len)?;
        // SAFETY: `p..p+len` is inside the live mapping, initialised (a
        // memfd reads as zeros until written) and aligned for `u8`. Other
        // writers are outside this process or serialised by the caller
        // (the contract above); the bytes are plain data.
        let s = unsafe { std::slice::from_raw_parts(p, len) };
        Ok(f(s))
    }

    /// Runs `f` on `len` bytes at `offset` as a mutable slice (same
    /// contract as [`Mapping::with_bytes`]; the caller must hold whatever
    /// lock serialises this process's own accesses to these bytes).
    pub fn with_bytes_mut<R>(
        &self,
        offset: usize,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R, ShmError> {
        let p = self.range(offset, len)?;
        // SAFETY: as in `with_bytes`; exclusivity inside this process is
        // the caller's lock (documented contract).
        let s = unsafe { std::slice::from_raw_parts_mut(p, len) };
        Ok(f(s))
    }

    fn word(&self, offset: usize) -> Option<&AtomicU64> {
        if offset % 8 != 0 {
            return None;
        }
        let p = self.range(offset, 8).ok()?;
        // SAFETY: `p` is inside the mapping, 8-aligned (page-aligned base,
        // 8-aligned offset) and lives as long as `&self`; the word is
        // accessed only atomically through this view by this process.
        Some(unsafe { AtomicU64::from_ptr(p.cast::<u64>()) })
    }
}

impl SharedMemory for Mapping {
    fn len(&self) -> usize {
        self.inner.len
    }

    fn load_u64(&self, offset: usize) -> u64 {
        self.word(offset)
            .map_or(0, |w| u64::from_le(w.load(Ordering::Acquire)))
    }

    fn store_u64(&self, offset: usize, value: u64) {
        if let Some(w) = self.word(offset) {
            w.store(value.to_le(), Ordering::Release);
        }
    }

    fn fence(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    fn read(&self, offset: usize, out: &mut [u8]) {
        if self.read_at(offset, out).is_err() {
            out.fill(0);
        }
        std::sync::atomic::fence(Ordering::Acquire);
    }

    fn write(&self, offset: usize, data: &[u8]) {
        let _ = self.write_at(offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fractos_transport::ring::{ring_area_len, RingEndpoint, RingSide, RING_MIN};

    fn dup(m: &Mapping) -> OwnedFd {
        m.fd().try_clone_to_owned().unwrap()
    }

    #[test]
    fn two_mappings_of_one_memfd_share_bytes() {
        let a = Mapping::create("t", 10_000).unwrap();
        assert_eq!(a.len(), 3 * PAGE);
        assert_eq!(a.as_ptr() as usize % PAGE, 0);
        let b = Mapping::open(dup(&a), PAGE as u64, PAGE).unwrap();
        a.write_at(PAGE + 5, b"hello").unwrap();
        let mut out = [0u8; 5];
        b.read_at(5, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        assert!(b.read_at(PAGE - 2, &mut out).is_err());
        assert!(b.write_at(usize::MAX, b"x").is_err());
        assert_eq!(b.with_bytes(5, 5, |s| s.to_vec()).unwrap(), b"hello");
        a.fill(0, 3 * PAGE, 7).unwrap();
        assert!(b
            .with_bytes(0, PAGE, |s| s.iter().all(|&x| x == 7))
            .unwrap());
        b.copy_from(0, &a, 0, 16).unwrap();
        assert!(b.copy_from(0, &a, 3 * PAGE - 8, 16).is_err());
    }

    #[test]
    fn unsealed_shrinkable_and_short_memfds_are_refused() {
        // No seals at all.
        let fd =
            rustix::fs::memfd_create("u", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&fd, PAGE as u64).unwrap();
        let fd2 = fd.try_clone().unwrap();
        assert!(matches!(
            Mapping::open(fd, 0, PAGE),
            Err(ShmError::NotSealed { .. })
        ));
        // Growing sealed but still shrinkable.
        rustix::fs::fcntl_add_seals(&fd2, SealFlags::GROW).unwrap();
        let e = Mapping::open(fd2.try_clone().unwrap(), 0, PAGE).unwrap_err();
        assert!(e.to_string().contains("F_SEAL_SHRINK"), "{e}");
        // A huge-page memfd, sealed and sized (created where the kernel
        // has hugetlbfs; refused whether or not huge pages are reserved).
        if let Ok(h) = rustix::fs::memfd_create(
            "h",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING | MemfdFlags::HUGETLB,
        ) {
            rustix::fs::ftruncate(&h, 2 << 20).unwrap();
            rustix::fs::fcntl_add_seals(&h, REQUIRED_SEALS).unwrap();
            let e = Mapping::open(h, 0, 2 << 20).unwrap_err();
            assert!(matches!(e, ShmError::NotShmem { .. }), "{e}");
            assert!(e.to_string().contains("MFD_HUGETLB"), "{e}");
        }
        // A memfd created without sealing support.
        let plain = rustix::fs::memfd_create("p", MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&plain, PAGE as u64).unwrap();
        assert!(Mapping::open(plain, 0, PAGE).is_err());
        // Sealed, but smaller than asked for; misaligned offset; zero length.
        let m = Mapping::create("s", PAGE).unwrap();
        assert!(matches!(
            Mapping::open(dup(&m), 0, 2 * PAGE),
            Err(ShmError::TooSmall { .. })
        ));
        assert!(matches!(
            Mapping::open(dup(&m), PAGE as u64, 1),
            Err(ShmError::TooSmall { .. })
        ));
        assert!(matches!(
            Mapping::open(dup(&m), 8, 1),
            Err(ShmError::Misaligned { offset: 8 })
        ));
        assert!(matches!(
            Mapping::open(dup(&m), 0, 0),
            Err(ShmError::BadLength { len: 0 })
        ));
        assert!(Mapping::open(dup(&m), u64::MAX - 4095, PAGE).is_err());
        // The created memfd cannot be shrunk by anyone.
        assert!(rustix::fs::ftruncate(m.fd(), 0).is_err());
    }

    #[test]
    fn rings_run_over_a_memfd_shared_by_two_mappings() {
        let len = ring_area_len(RING_MIN);
        let a = Mapping::create("ring", len).unwrap();
        let b = Mapping::open(dup(&a), 0, len).unwrap();
        let mut p = RingEndpoint::init(a, 0, RING_MIN).unwrap();
        let mut c = RingEndpoint::open(b.clone(), 0, RingSide::Controller).unwrap();
        assert_eq!(p.send(b"ping").unwrap(), 4);
        let mut out = Vec::new();
        assert_eq!(c.recv(&mut out, 100).unwrap(), 4);
        assert_eq!(out, b"ping");
        // Out-of-range words read as zero and writes are dropped.
        assert_eq!(b.load_u64(b.len()), 0);
        assert_eq!(b.load_u64(3), 0);
        b.store_u64(b.len(), 1);
    }
}
