//! The owner-side capability store: objects and their derivation trees.
//!
//! Every object (Memory or Request) lives at its owner controller together
//! with the tree of capabilities derived from it. Each tree node is one
//! capability with exactly one holder (a local process handle, a peer node, a
//! monitor registration) or none (kept only while it has children). Rights
//! and windows only shrink from parent to child. Revoking a node removes its
//! whole subtree; a node without holder and children is collected.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use fractos_wire::{CapInfo, CapRef, ErrorCode, NodeId, ObjectKind, Rights};
use slotmap::{Key, KeyData, SlotMap};

use crate::{CapKey, MonitorKey, ObjectKey, ProcessKey};

/// Who holds a capability node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Holder {
    /// Nobody: the node only anchors children.
    None,
    /// A handle in a local process's table.
    Process(ProcessKey),
    /// A node (possibly this one) holding a remote reference: a handle of a
    /// process there, a bound argument of a Request, a name entry, ...
    Node(NodeId),
    /// A monitor registration; fires when the node dies.
    Monitor(MonitorKey),
}

/// Bound arguments added by one derivation step of a Request.
#[derive(Debug, Default)]
pub(crate) struct Binds {
    pub imms: Vec<u8>,
    /// Capabilities held by this controller's node on behalf of the binding.
    pub caps: Vec<CapRef>,
}

/// One capability.
#[derive(Debug)]
pub(crate) struct CapNode {
    pub object: ObjectKey,
    pub parent: Option<CapKey>,
    pub first_child: Option<CapKey>,
    pub next_sibling: Option<CapKey>,
    pub prev_sibling: Option<CapKey>,
    pub holder: Holder,
    /// Memory: window offset and length inside the object (as 32-bit
    /// halves, so the node stays 4-byte aligned and 72 bytes long).
    window: [u32; 4],
    pub rights: Rights,
    /// Requests: whether this step bound arguments (kept in
    /// [`CapStore::binds`]; ancestors hold the rest).
    pub has_binds: bool,
}

impl CapNode {
    fn new(
        object: ObjectKey,
        parent: Option<CapKey>,
        holder: Holder,
        offset: u64,
        len: u64,
        rights: Rights,
    ) -> Self {
        CapNode {
            object,
            parent,
            first_child: None,
            next_sibling: None,
            prev_sibling: None,
            holder,
            window: [
                offset as u32,
                (offset >> 32) as u32,
                len as u32,
                (len >> 32) as u32,
            ],
            rights,
            has_binds: false,
        }
    }
    /// Window offset inside the object.
    pub fn offset(&self) -> u64 {
        self.window[0] as u64 | (self.window[1] as u64) << 32
    }
    /// Window length.
    pub fn len(&self) -> u64 {
        self.window[2] as u64 | (self.window[3] as u64) << 32
    }
}

/// An object at its owner.
#[derive(Debug)]
pub(crate) struct Object {
    pub kind: ObjectKind,
    pub owner: ProcessKey,
    pub root: CapKey,
    /// Memory: start address in the owner's registered memory.
    pub addr: u64,
    /// Requests: handler tag.
    pub tag: u64,
}

/// Side effects of removing capabilities, for the controller to act on.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fallout {
    /// A monitor registration died: invoke its notification Request.
    FireMonitor(MonitorKey),
    /// A capability this node held as a bound argument must be released.
    Release(CapRef),
    /// An object died.
    ObjectDied {
        owner: ProcessKey,
        object: ObjectKey,
    },
}

/// Objects and capability trees owned by this controller.
#[derive(Default)]
pub(crate) struct CapStore {
    pub objects: SlotMap<ObjectKey, Object>,
    pub nodes: SlotMap<CapKey, CapNode>,
    /// Bound arguments of the Request nodes that bind some.
    pub binds: BTreeMap<CapKey, Box<Binds>>,
}

/// Bounded total of bound immediates along a derivation chain.
pub(crate) const MAX_BOUND_IMMS: usize = fractos_wire::MAX_IMMEDIATES;
/// Bounded total of bound capabilities along a derivation chain.
pub(crate) const MAX_BOUND_CAPS: usize = fractos_wire::MAX_CAPS_PER_MESSAGE;

pub(crate) fn key_to_u64<K: Key>(k: K) -> u64 {
    k.data().as_ffi()
}

pub(crate) fn key_from_u64<K: Key>(v: u64) -> K {
    KeyData::from_ffi(v).into()
}

impl CapStore {
    /// Creates an object and its root capability.
    pub fn create_object(
        &mut self,
        kind: ObjectKind,
        owner: ProcessKey,
        addr: u64,
        len: u64,
        rights: Rights,
        tag: u64,
        binds: Option<Box<Binds>>,
        holder: Holder,
    ) -> CapKey {
        let object = self.objects.insert(Object {
            kind,
            owner,
            root: CapKey::null(),
            addr,
            tag,
        });
        let root = self
            .nodes
            .insert(CapNode::new(object, None, holder, 0, len, rights));
        if let Some(b) = binds {
            self.nodes[root].has_binds = true;
            self.binds.insert(root, b);
        }
        self.objects[object].root = root;
        root
    }

    /// Whether the capability node is alive (not revoked or released).
    #[inline]
    pub fn alive(&self, key: CapKey) -> bool {
        self.nodes.contains_key(key)
    }

    /// The memory window behind a live Memory node, if it has the rights
    /// `need`: the owning process, the absolute start address and length.
    pub fn memory_window(
        &self,
        key: CapKey,
        need: Rights,
    ) -> Result<(ProcessKey, u64, u64), ErrorCode> {
        let n = self.nodes.get(key).ok_or(ErrorCode::Revoked)?;
        let o = &self.objects[n.object];
        if o.kind != ObjectKind::Memory {
            return Err(ErrorCode::WrongType);
        }
        if !n.rights.contains(need) {
            return Err(ErrorCode::MissingRight);
        }
        Ok((o.owner, o.addr + n.offset(), n.len()))
    }

    /// What a holder learns about a node.
    pub fn info(&self, key: CapKey) -> Option<CapInfo> {
        let node = self.nodes.get(key)?;
        let kind = self.objects.get(node.object)?.kind;
        Some(CapInfo {
            kind,
            rights: node.rights,
            len: node.len(),
        })
    }

    /// Derives a child of `parent`. Validates kind, window and rights.
    pub fn derive(
        &mut self,
        parent: CapKey,
        spec: DeriveKind,
        holder: Holder,
    ) -> Result<CapKey, ErrorCode> {
        let p = self.nodes.get(parent).ok_or(ErrorCode::Revoked)?;
        let kind = self.objects[p.object].kind;
        let (offset, len, rights, binds) = match spec {
            DeriveKind::Transfer => (p.offset(), p.len(), p.rights, None),
            DeriveKind::Diminish {
                offset,
                len,
                rights,
            } => {
                if kind != ObjectKind::Memory {
                    return Err(ErrorCode::WrongType);
                }
                if !p.rights.contains(rights) {
                    return Err(ErrorCode::MissingRight);
                }
                if len == 0 {
                    return Err(ErrorCode::InvalidArgument);
                }
                let end = offset.checked_add(len).ok_or(ErrorCode::OutOfBounds)?;
                if end > p.len() {
                    return Err(ErrorCode::OutOfBounds);
                }
                (p.offset() + offset, len, rights, None)
            }
            DeriveKind::Bind(binds) => {
                if kind != ObjectKind::Request {
                    return Err(ErrorCode::WrongType);
                }
                let (imms, caps) = self.bound_totals(parent);
                if imms + binds.imms.len() > MAX_BOUND_IMMS
                    || caps + binds.caps.len() > MAX_BOUND_CAPS
                {
                    return Err(ErrorCode::LimitReached);
                }
                (p.offset(), p.len(), p.rights, Some(binds))
            }
        };
        let object = p.object;
        let old_first = p.first_child;
        let mut node = CapNode::new(object, Some(parent), holder, offset, len, rights);
        node.next_sibling = old_first;
        let child = self.nodes.insert(node);
        if let Some(b) = binds {
            self.nodes[child].has_binds = true;
            self.binds.insert(child, b);
        }
        if let Some(f) = old_first {
            self.nodes[f].prev_sibling = Some(child);
        }
        self.nodes[parent].first_child = Some(child);
        Ok(child)
    }

    /// Total bound immediates and capabilities along the chain to `key`.
    fn bound_totals(&self, mut key: CapKey) -> (usize, usize) {
        let (mut imms, mut caps) = (0, 0);
        while let Some(n) = self.nodes.get(key) {
            if let Some(b) = self.binds.get(&key) {
                imms += b.imms.len();
                caps += b.caps.len();
            }
            match n.parent {
                Some(p) => key = p,
                None => break,
            }
        }
        (imms, caps)
    }

    /// Whether any node on the chain to `key` binds arguments.
    pub fn has_binds(&self, mut key: CapKey) -> bool {
        while let Some(n) = self.nodes.get(key) {
            if n.has_binds {
                return true;
            }
            match n.parent {
                Some(p) => key = p,
                None => return false,
            }
        }
        false
    }

    /// Collects the bound arguments of a Request node, root first.
    pub fn collect_binds(&self, key: CapKey, imms: &mut Vec<u8>, caps: &mut Vec<CapRef>) {
        let mut chain: Vec<CapKey> = Vec::new();
        let mut cur = Some(key);
        while let Some(k) = cur {
            let Some(n) = self.nodes.get(k) else { break };
            if n.has_binds {
                chain.push(k);
            }
            cur = n.parent;
        }
        for k in chain.iter().rev() {
            if let Some(b) = self.binds.get(k) {
                imms.extend_from_slice(&b.imms);
                caps.extend_from_slice(&b.caps);
            }
        }
    }

    /// Revokes `key` and its whole subtree.
    pub fn revoke(&mut self, key: CapKey, out: &mut Vec<Fallout>) -> Result<(), ErrorCode> {
        let node = self.nodes.get(key).ok_or(ErrorCode::Revoked)?;
        let parent = node.parent;
        self.unlink(key);
        self.remove_subtree(key, out);
        if let Some(p) = parent {
            self.collect(p, out);
        }
        Ok(())
    }

    /// Removes every node of the subtree rooted at `key` (already unlinked).
    fn remove_subtree(&mut self, key: CapKey, out: &mut Vec<Fallout>) {
        let mut stack = alloc::vec![key];
        while let Some(k) = stack.pop() {
            let Some(node) = self.nodes.remove(k) else {
                continue;
            };
            let mut child = node.first_child;
            while let Some(c) = child {
                stack.push(c);
                child = self.nodes.get(c).and_then(|n| n.next_sibling);
            }
            self.dispose(k, node, out);
        }
    }

    /// Effects of one removed node.
    fn dispose(&mut self, key: CapKey, node: CapNode, out: &mut Vec<Fallout>) {
        if let Holder::Monitor(m) = node.holder {
            out.push(Fallout::FireMonitor(m));
        }
        if node.has_binds {
            if let Some(b) = self.binds.remove(&key) {
                out.extend(b.caps.into_iter().map(Fallout::Release));
            }
        }
        if let Some(obj) = self.objects.get(node.object) {
            if obj.root == key {
                let owner = obj.owner;
                self.objects.remove(node.object);
                out.push(Fallout::ObjectDied {
                    owner,
                    object: node.object,
                });
            }
        }
    }

    /// Detaches `key` from its parent and siblings.
    fn unlink(&mut self, key: CapKey) {
        let (parent, prev, next) = {
            let n = &self.nodes[key];
            (n.parent, n.prev_sibling, n.next_sibling)
        };
        if let Some(p) = prev {
            self.nodes[p].next_sibling = next;
        } else if let Some(par) = parent {
            if let Some(pn) = self.nodes.get_mut(par) {
                pn.first_child = next;
            }
        }
        if let Some(nx) = next {
            self.nodes[nx].prev_sibling = prev;
        }
        let n = &mut self.nodes[key];
        n.parent = None;
        n.prev_sibling = None;
        n.next_sibling = None;
    }

    /// Removes the holder of `key` and collects unreachable nodes upwards.
    pub fn release(&mut self, key: CapKey, expected: Holder, out: &mut Vec<Fallout>) -> bool {
        match self.nodes.get_mut(key) {
            Some(n) if n.holder == expected => {
                n.holder = Holder::None;
                self.collect(key, out);
                true
            }
            _ => false,
        }
    }

    /// Collects `key` and then its ancestors while they have neither holder
    /// nor children.
    fn collect(&mut self, mut key: CapKey, out: &mut Vec<Fallout>) {
        loop {
            let Some(n) = self.nodes.get(key) else { return };
            if n.holder != Holder::None || n.first_child.is_some() {
                return;
            }
            let parent = n.parent;
            self.unlink(key);
            let node = self.nodes.remove(key).expect("node checked above");
            self.dispose(key, node, out);
            match parent {
                Some(p) => key = p,
                None => return,
            }
        }
    }

    /// Checks the structural invariants; returns a description of the first
    /// violation.
    pub fn check(&self) -> Result<(), alloc::string::String> {
        use alloc::format;
        for (k, n) in &self.nodes {
            let Some(obj) = self.objects.get(n.object) else {
                return Err(format!("cap {k:?} points at a dead object"));
            };
            match n.parent {
                None => {
                    if obj.root != k {
                        return Err(format!(
                            "cap {k:?} has no parent but is not its object's root"
                        ));
                    }
                }
                Some(p) => {
                    let Some(pn) = self.nodes.get(p) else {
                        return Err(format!("cap {k:?} has a dangling parent"));
                    };
                    if pn.object != n.object {
                        return Err(format!("cap {k:?} and its parent name different objects"));
                    }
                    if !pn.rights.contains(n.rights) {
                        return Err(format!("cap {k:?} has rights its parent lacks"));
                    }
                    if n.offset() < pn.offset() || n.offset() + n.len() > pn.offset() + pn.len() {
                        return Err(format!("cap {k:?} window exceeds its parent's"));
                    }
                    // The parent must list this child.
                    let mut c = pn.first_child;
                    let mut found = false;
                    while let Some(ck) = c {
                        if ck == k {
                            found = true;
                            break;
                        }
                        c = self.nodes.get(ck).and_then(|x| x.next_sibling);
                    }
                    if !found {
                        return Err(format!("cap {k:?} is missing from its parent's children"));
                    }
                }
            }
            if n.holder == Holder::None && n.first_child.is_none() {
                return Err(format!("cap {k:?} has neither holder nor children (leak)"));
            }
        }
        for (ok, o) in &self.objects {
            match self.nodes.get(o.root) {
                Some(r) if r.object == ok && r.parent.is_none() => {}
                _ => return Err(format!("object {ok:?} has no valid root")),
            }
        }
        Ok(())
    }
}

/// How a local derivation differs from its parent.
pub(crate) enum DeriveKind {
    Transfer,
    Diminish {
        offset: u64,
        len: u64,
        rights: Rights,
    },
    Bind(Box<Binds>),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with_memory() -> (CapStore, ProcessKey, CapKey) {
        let mut procs: SlotMap<ProcessKey, ()> = SlotMap::with_key();
        let p = procs.insert(());
        let mut s = CapStore::default();
        let root = s.create_object(
            ObjectKind::Memory,
            p,
            0x1000,
            4096,
            Rights::READ_WRITE,
            0,
            None,
            Holder::Process(p),
        );
        (s, p, root)
    }

    #[test]
    fn diminish_shrinks_and_rejects_growth() {
        let (mut s, p, root) = store_with_memory();
        let d = DeriveKind::Diminish {
            offset: 100,
            len: 200,
            rights: Rights::READ,
        };
        let c = s.derive(root, d, Holder::Process(p)).unwrap();
        assert_eq!(s.nodes[c].offset(), 100);
        assert_eq!(core::mem::size_of::<CapNode>(), 72);
        let grow = DeriveKind::Diminish {
            offset: 0,
            len: 201,
            rights: Rights::READ,
        };
        assert_eq!(
            s.derive(c, grow, Holder::Process(p)),
            Err(ErrorCode::OutOfBounds)
        );
        let more = DeriveKind::Diminish {
            offset: 0,
            len: 10,
            rights: Rights::READ_WRITE,
        };
        assert_eq!(
            s.derive(c, more, Holder::Process(p)),
            Err(ErrorCode::MissingRight)
        );
        let overflow = DeriveKind::Diminish {
            offset: u64::MAX,
            len: 2,
            rights: Rights::READ,
        };
        assert_eq!(
            s.derive(c, overflow, Holder::Process(p)),
            Err(ErrorCode::OutOfBounds)
        );
        s.check().unwrap();
    }

    #[test]
    fn revoke_removes_subtree_and_keeps_siblings() {
        let (mut s, p, root) = store_with_memory();
        let a = s
            .derive(root, DeriveKind::Transfer, Holder::Process(p))
            .unwrap();
        let b = s
            .derive(root, DeriveKind::Transfer, Holder::Process(p))
            .unwrap();
        let a1 = s
            .derive(a, DeriveKind::Transfer, Holder::Node(NodeId(2)))
            .unwrap();
        let mut out = Vec::new();
        s.revoke(a, &mut out).unwrap();
        assert!(!s.nodes.contains_key(a) && !s.nodes.contains_key(a1));
        assert!(s.nodes.contains_key(b) && s.nodes.contains_key(root));
        assert!(out.is_empty());
        s.check().unwrap();
        assert_eq!(s.revoke(a, &mut out), Err(ErrorCode::Revoked));
        s.revoke(root, &mut out).unwrap();
        assert!(s.nodes.is_empty() && s.objects.is_empty());
        assert!(matches!(out[..], [Fallout::ObjectDied { .. }]));
    }

    #[test]
    fn release_collects_unheld_chain() {
        let (mut s, p, root) = store_with_memory();
        let a = s
            .derive(root, DeriveKind::Transfer, Holder::Node(NodeId(3)))
            .unwrap();
        let mut out = Vec::new();
        assert!(s.release(root, Holder::Process(p), &mut out));
        assert_eq!(s.nodes.len(), 2, "root stays while a child lives");
        assert!(
            !s.release(a, Holder::Node(NodeId(4)), &mut out),
            "wrong holder is ignored"
        );
        assert!(s.release(a, Holder::Node(NodeId(3)), &mut out));
        assert!(s.nodes.is_empty() && s.objects.is_empty());
        s.check().unwrap();
    }
}
