//! Typed capability handles.
//!
//! A capability is named by a [`Handle`]: an index into this process's
//! table at its controller, meaningless to any other process. The wrappers
//! below add what the controller said about it ([`CapInfo`]) and let the
//! compiler keep Memory and Request capabilities apart. They are plain
//! values: copying one does not copy the capability, and dropping one does
//! not release it (use [`crate::Process::drop_cap`]).

use fractos_wire::{CapInfo, Handle, ObjectKind, Rights};

/// A capability to a Memory object (a window of some process's registered
/// memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MemoryCap {
    handle: Handle,
    rights: Rights,
    len: u64,
}

impl MemoryCap {
    /// Wraps a raw handle. The controller checks every use, so a wrong
    /// handle yields `BadHandle` or `WrongType`, never undefined behaviour.
    pub fn from_raw(handle: Handle, rights: Rights, len: u64) -> Self {
        MemoryCap {
            handle,
            rights,
            len,
        }
    }

    /// The handle in this process's table.
    pub fn handle(&self) -> Handle {
        self.handle
    }

    /// Rights of this capability.
    pub fn rights(&self) -> Rights {
        self.rights
    }

    /// Window length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the window is empty (never for a controller-issued cap).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// What the controller reports about it.
    pub fn info(&self) -> CapInfo {
        CapInfo {
            kind: ObjectKind::Memory,
            rights: self.rights,
            len: self.len,
        }
    }
}

/// A capability to a Request object (an invocable entry point of some
/// process, with bound arguments).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestCap {
    handle: Handle,
}

impl RequestCap {
    /// Wraps a raw handle (see [`MemoryCap::from_raw`]).
    pub fn from_raw(handle: Handle) -> Self {
        RequestCap { handle }
    }

    /// The handle in this process's table.
    pub fn handle(&self) -> Handle {
        self.handle
    }

    /// What the controller reports about it.
    pub fn info(&self) -> CapInfo {
        CapInfo {
            kind: ObjectKind::Request,
            rights: Rights::NONE,
            len: 0,
        }
    }
}

/// A capability of either kind.
///
/// ```
/// use fractos_sdk::{Cap, RequestCap};
/// use fractos_sdk::wire::{CapInfo, Handle, ObjectKind, Rights};
///
/// let info = CapInfo { kind: ObjectKind::Memory, rights: Rights::READ, len: 64 };
/// let cap = Cap::from_info(Handle(3), info);
/// assert_eq!(cap.as_memory().unwrap().len(), 64);
/// assert!(cap.as_request().is_none());
/// let any: Cap = RequestCap::from_raw(Handle(4)).into();
/// assert_eq!(any.handle(), Handle(4));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cap {
    /// A Memory capability.
    Memory(MemoryCap),
    /// A Request capability.
    Request(RequestCap),
}

impl Cap {
    /// Types a handle by the controller's description of it.
    pub fn from_info(handle: Handle, info: CapInfo) -> Self {
        match info.kind {
            ObjectKind::Memory => Cap::Memory(MemoryCap::from_raw(handle, info.rights, info.len)),
            ObjectKind::Request => Cap::Request(RequestCap::from_raw(handle)),
        }
    }

    /// The handle in this process's table.
    pub fn handle(&self) -> Handle {
        match self {
            Cap::Memory(m) => m.handle,
            Cap::Request(r) => r.handle,
        }
    }

    /// Object kind.
    pub fn kind(&self) -> ObjectKind {
        match self {
            Cap::Memory(_) => ObjectKind::Memory,
            Cap::Request(_) => ObjectKind::Request,
        }
    }

    /// What the controller reports about it.
    pub fn info(&self) -> CapInfo {
        match self {
            Cap::Memory(m) => m.info(),
            Cap::Request(r) => r.info(),
        }
    }

    /// The Memory capability, if it is one.
    pub fn as_memory(&self) -> Option<MemoryCap> {
        match self {
            Cap::Memory(m) => Some(*m),
            Cap::Request(_) => None,
        }
    }

    /// The Request capability, if it is one.
    pub fn as_request(&self) -> Option<RequestCap> {
        match self {
            Cap::Request(r) => Some(*r),
            Cap::Memory(_) => None,
        }
    }
}

impl From<MemoryCap> for Cap {
    fn from(m: MemoryCap) -> Self {
        Cap::Memory(m)
    }
}

impl From<RequestCap> for Cap {
    fn from(r: RequestCap) -> Self {
        Cap::Request(r)
    }
}

impl From<&MemoryCap> for Cap {
    fn from(m: &MemoryCap) -> Self {
        Cap::Memory(*m)
    }
}

impl From<&RequestCap> for Cap {
    fn from(r: &RequestCap) -> Self {
        Cap::Request(*r)
    }
}

impl From<&Cap> for Cap {
    fn from(c: &Cap) -> Self {
        *c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typing_by_info() {
        let m = Cap::from_info(
            Handle(1),
            CapInfo {
                kind: ObjectKind::Memory,
                rights: Rights::READ_WRITE,
                len: 10,
            },
        );
        assert_eq!(m.kind(), ObjectKind::Memory);
        assert_eq!(m.info().len, 10);
        assert!(m.as_request().is_none());
        let mc = m.as_memory().unwrap();
        assert_eq!(mc.rights(), Rights::READ_WRITE);
        assert!(!mc.is_empty());
        let r = Cap::from(RequestCap::from_raw(Handle(2)));
        assert_eq!(r.info().kind, ObjectKind::Request);
        assert!(r.as_memory().is_none());
        assert_eq!(Cap::from(&mc), m);
    }
}
