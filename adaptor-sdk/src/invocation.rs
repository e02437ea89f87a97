//! Invocations delivered to this process.

use fractos_wire::{CapInfo, Handle, ObjectKind};

use crate::caps::{Cap, MemoryCap, RequestCap};
use crate::error::{CapKindName, SdkError};

/// One of this process's Requests was invoked.
///
/// Carries the Request's handler tag, its bound immediates followed by the
/// invoker's, and its bound capabilities followed by the invoker's (each
/// installed as a fresh handle in this process's table: drop them with
/// [`crate::Process::drop_cap`] when done, or they count against the
/// process's capability limit until it exits).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    /// Handler tag given at `request_create`.
    pub tag: u64,
    /// Bound immediates followed by invoker immediates.
    pub imms: Vec<u8>,
    /// Bound capabilities followed by invoker capabilities.
    pub caps: Vec<Cap>,
}

impl Invocation {
    pub(crate) fn from_wire(tag: u64, imms: Vec<u8>, caps: Vec<(Handle, CapInfo)>) -> Self {
        Invocation {
            tag,
            imms,
            caps: caps
                .into_iter()
                .map(|(h, info)| Cap::from_info(h, info))
                .collect(),
        }
    }

    fn typed<T>(
        &self,
        index: usize,
        kind: ObjectKind,
        pick: impl FnOnce(&Cap) -> Option<T>,
    ) -> Result<T, SdkError> {
        let found = self.caps.get(index);
        found.and_then(pick).ok_or(SdkError::UnexpectedCap {
            index,
            expected: CapKindName(Some(kind)),
            found: CapKindName(found.map(|c| c.kind())),
        })
    }

    /// Capability `index` as a Memory capability, or
    /// [`SdkError::UnexpectedCap`].
    ///
    /// ```
    /// use fractos_sdk::{Cap, Invocation, MemoryCap, RequestCap};
    /// use fractos_sdk::wire::{Handle, Rights};
    ///
    /// let inv = Invocation {
    ///     tag: 1,
    ///     imms: vec![],
    ///     caps: vec![
    ///         MemoryCap::from_raw(Handle(5), Rights::READ, 4096).into(),
    ///         RequestCap::from_raw(Handle(6)).into(),
    ///     ],
    /// };
    /// assert_eq!(inv.memory(0).unwrap().len(), 4096);
    /// assert_eq!(inv.request(1).unwrap().handle(), Handle(6));
    /// assert!(inv.memory(1).is_err());
    /// assert!(inv.request(2).is_err());
    /// ```
    pub fn memory(&self, index: usize) -> Result<MemoryCap, SdkError> {
        self.typed(index, ObjectKind::Memory, Cap::as_memory)
    }

    /// Capability `index` as a Request capability, or
    /// [`SdkError::UnexpectedCap`].
    pub fn request(&self, index: usize) -> Result<RequestCap, SdkError> {
        self.typed(index, ObjectKind::Request, Cap::as_request)
    }

    /// Immediates `[offset, offset+N)` as an array, or
    /// [`SdkError::InvalidArgument`] if too short. Handy for fixed-layout
    /// arguments: `u64::from_le_bytes(inv.imm_array(0)?)`.
    pub fn imm_array<const N: usize>(&self, offset: usize) -> Result<[u8; N], SdkError> {
        offset
            .checked_add(N)
            .and_then(|end| self.imms.get(offset..end))
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| {
                SdkError::invalid(format!(
                    "invocation carries {} immediate bytes, {N} wanted at offset {offset}",
                    self.imms.len()
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fractos_wire::Rights;

    #[test]
    fn from_wire_types_caps() {
        let inv = Invocation::from_wire(
            9,
            42u64.to_le_bytes().to_vec(),
            vec![
                (
                    Handle(1),
                    CapInfo {
                        kind: ObjectKind::Request,
                        rights: Rights::NONE,
                        len: 0,
                    },
                ),
                (
                    Handle(2),
                    CapInfo {
                        kind: ObjectKind::Memory,
                        rights: Rights::WRITE,
                        len: 8,
                    },
                ),
            ],
        );
        assert_eq!(inv.tag, 9);
        assert_eq!(u64::from_le_bytes(inv.imm_array(0).unwrap()), 42);
        assert!(inv.imm_array::<8>(1).is_err());
        assert!(inv.imm_array::<1>(usize::MAX).is_err());
        assert_eq!(inv.request(0).unwrap().handle(), Handle(1));
        assert_eq!(inv.memory(1).unwrap().rights(), Rights::WRITE);
        match inv.memory(0) {
            Err(SdkError::UnexpectedCap {
                index: 0,
                expected: CapKindName(Some(ObjectKind::Memory)),
                found: CapKindName(Some(ObjectKind::Request)),
            }) => {}
            other => panic!("{other:?}"),
        }
        match inv.memory(7) {
            Err(SdkError::UnexpectedCap {
                index: 7,
                expected: CapKindName(Some(ObjectKind::Memory)),
                found: CapKindName(None),
            }) => {}
            other => panic!("{other:?}"),
        }
    }
}
