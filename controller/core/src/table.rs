//! A process's capability table: handles are indices, reused after drop.

use alloc::vec::Vec;

use fractos_wire::{CapInfo, CapRef, Handle, NodeId, ObjectKind, Rights};

/// One handle's capability: where it lives and what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub cap: CapRef,
    pub info: CapInfo,
}

/// [`Entry`] packed into 32 bytes (a table holds up to millions).
#[derive(Clone, Copy)]
struct Packed {
    cap: u64,
    incarnation: u64,
    len: u64,
    node: u32,
    kind: ObjectKind,
    rights: Rights,
}

impl Packed {
    fn pack(e: Entry) -> Packed {
        Packed {
            cap: e.cap.cap,
            incarnation: e.cap.incarnation,
            len: e.info.len,
            node: e.cap.node.0,
            kind: e.info.kind,
            rights: e.info.rights,
        }
    }
    fn unpack(&self) -> Entry {
        Entry {
            cap: CapRef {
                node: NodeId(self.node),
                incarnation: self.incarnation,
                cap: self.cap,
            },
            info: CapInfo {
                kind: self.kind,
                rights: self.rights,
                len: self.len,
            },
        }
    }
}

/// Handles of one process.
#[derive(Default)]
pub(crate) struct HandleTable {
    slots: Vec<Option<Packed>>,
    free: Vec<u32>,
    len: usize,
}

impl HandleTable {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn get(&self, h: Handle) -> Option<Entry> {
        self.slots
            .get(h.0 as usize)
            .and_then(|s| s.as_ref())
            .map(Packed::unpack)
    }

    pub fn insert(&mut self, e: Entry) -> Handle {
        let e = Packed::pack(e);
        self.len += 1;
        if let Some(i) = self.free.pop() {
            self.slots[i as usize] = Some(e);
            Handle(i)
        } else {
            self.slots.push(Some(e));
            Handle((self.slots.len() - 1) as u32)
        }
    }

    pub fn remove(&mut self, h: Handle) -> Option<Entry> {
        let e = self.slots.get_mut(h.0 as usize)?.take()?;
        self.free.push(h.0);
        self.len -= 1;
        Some(e.unpack())
    }

    pub fn drain(&mut self) -> impl Iterator<Item = Entry> + '_ {
        self.len = 0;
        self.free.clear();
        self.slots.drain(..).flatten().map(|p| p.unpack())
    }

    pub fn iter(&self) -> impl Iterator<Item = (Handle, Entry)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|e| (Handle(i as u32), e.unpack())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_reused_after_remove() {
        let mut t = HandleTable::default();
        let e = Entry {
            cap: CapRef {
                node: NodeId(1),
                incarnation: 1,
                cap: 9,
            },
            info: CapInfo {
                kind: ObjectKind::Memory,
                rights: Rights::READ,
                len: 1,
            },
        };
        let a = t.insert(e);
        let b = t.insert(e);
        assert_ne!(a, b);
        assert_eq!(t.remove(a), Some(e));
        assert_eq!(t.remove(a), None);
        assert_eq!(t.get(a), None);
        assert_eq!(t.insert(e), a);
        assert_eq!(t.len(), 2);
        assert_eq!(core::mem::size_of::<Option<Packed>>(), 32);
        assert_eq!(t.get(Handle(999)), None);
    }
}
