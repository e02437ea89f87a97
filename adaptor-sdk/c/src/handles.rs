//! Handle tables: what the C side holds as `fractos_process *`,
//! `fractos_region *` and `fractos_invocation *`.
//!
//! A handle is never a real address: it is a number drawn from one
//! counter (never reused) with the table's tag in its low bits, shown to C
//! as an opaque pointer. Every entry point looks it up in its table, so a
//! freed handle (double free, use after free), a handle of another type
//! cast to this one, or a made-up pointer is refused with
//! `FRACTOS_ERR_INVALID_HANDLE` instead of being dereferenced. Objects are
//! `Arc`s: a handle freed while another thread still uses the object keeps
//! it alive until that call returns.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use crate::status::{fractos_status, Fail};

/// Bits of a handle holding its table's tag.
const TAG_BITS: u32 = 4;
/// Handles start above the first page, so NULL and small integers are
/// never valid.
static NEXT: AtomicU64 = AtomicU64::new(0x1000);

/// One table of live handles of one type.
pub(crate) struct Table<T> {
    tag: u64,
    what: &'static str,
    map: LazyLock<Mutex<HashMap<u64, Arc<T>>>>,
}

impl<T> Table<T> {
    pub(crate) const fn new(tag: u64, what: &'static str) -> Table<T> {
        Table {
            tag,
            what,
            map: LazyLock::new(|| Mutex::new(HashMap::new())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<T>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `value` and returns its handle as the opaque pointer type `P`.
    pub(crate) fn insert<P>(&self, value: T) -> *mut P {
        let id = (NEXT.fetch_add(1, Ordering::Relaxed) << TAG_BITS) | self.tag;
        self.lock().insert(id, Arc::new(value));
        std::ptr::without_provenance_mut(id as usize)
    }

    fn id<P>(&self, handle: *const P) -> Result<u64, Fail> {
        if handle.is_null() {
            return Err(Fail::null(&format!("the {} handle", self.what)));
        }
        Ok(handle.addr() as u64)
    }

    fn stale(&self) -> Fail {
        Fail::new(
            fractos_status::FRACTOS_ERR_INVALID_HANDLE,
            format!(
                "not a live {} handle (already freed or closed, or a handle of another type)",
                self.what
            ),
        )
    }

    /// The object behind `handle`.
    pub(crate) fn get<P>(&self, handle: *const P) -> Result<Arc<T>, Fail> {
        let id = self.id(handle)?;
        self.lock().get(&id).cloned().ok_or_else(|| self.stale())
    }

    /// Replaces the object behind `handle`.
    pub(crate) fn replace<P>(&self, handle: *const P, value: T) -> Result<(), Fail> {
        let id = self.id(handle)?;
        match self.lock().get_mut(&id) {
            Some(slot) => {
                *slot = Arc::new(value);
                Ok(())
            }
            None => Err(self.stale()),
        }
    }

    /// Removes `handle` and returns its object.
    pub(crate) fn remove<P>(&self, handle: *const P) -> Result<Arc<T>, Fail> {
        let id = self.id(handle)?;
        self.lock().remove(&id).ok_or_else(|| self.stale())
    }

    /// Removes `handle` if it is live (no error otherwise).
    pub(crate) fn forget(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Live handles (tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Opaque;

    #[test]
    fn handles_are_unique_tagged_and_refused_once_removed() {
        static A: Table<u32> = Table::new(1, "test A");
        static B: Table<u32> = Table::new(2, "test B");
        let a: *mut Opaque = A.insert(7);
        let b: *mut Opaque = B.insert(8);
        assert_ne!(a, b);
        assert_eq!(*A.get(a).unwrap(), 7);
        // A handle of another table is refused, not misread.
        assert_eq!(
            A.get(b).unwrap_err().status,
            fractos_status::FRACTOS_ERR_INVALID_HANDLE
        );
        assert_eq!(
            A.get(std::ptr::null::<Opaque>()).unwrap_err().status,
            fractos_status::FRACTOS_ERR_NULL_POINTER
        );
        assert_eq!(*A.remove(a).unwrap(), 7);
        // Double free and use after free.
        assert!(A.remove(a).is_err());
        assert!(A.get(a).is_err());
        let again: *mut Opaque = A.insert(7);
        assert_ne!(again, a, "handles are never reused");
        assert_eq!(A.len(), 1);
        B.forget(b.addr() as u64);
        assert_eq!(B.len(), 0);
    }
}
