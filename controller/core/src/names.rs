//! The cluster name service. Each name is homed on one member controller
//! chosen by hashing the name; publish, unpublish and lookup go there.

use alloc::vec::Vec;

use fractos_wire::{CapRef, ErrorCode, NodeId, PeerReply};

use crate::controller::{Controller, Origin, Then, Timer};
use crate::Instant;

slotmap::new_key_type! {
    /// A lookup waiting for its name to be published.
    pub(crate) struct WaiterKey;
}

/// A published name at its home.
pub(crate) struct NameEntry {
    /// Held by this (home) node.
    pub cap: CapRef,
    /// Node of the publishing process.
    pub node: NodeId,
    /// Publishing process's sequence number on that node.
    pub publisher: u64,
}

/// A lookup waiting at the home.
pub(crate) struct NameWaiter {
    pub name: Vec<u8>,
    pub origin: Origin,
    pub from: NodeId,
    pub deadline: Instant,
}

/// FNV-1a, stable across builds and platforms.
fn name_hash(name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl Controller {
    /// The member controller that homes `name`.
    pub(crate) fn name_home(&self, name: &[u8]) -> NodeId {
        let m = &self.cfg.members;
        m[(name_hash(name) % m.len() as u64) as usize]
    }

    pub(crate) fn serve_publish(
        &mut self,
        origin: Origin,
        from: NodeId,
        name: Vec<u8>,
        cap: CapRef,
        publisher: u64,
    ) {
        if self.names.contains_key(&name) {
            self.release_ref(cap);
            return self.answer(origin, Err(ErrorCode::NameTaken));
        }
        self.names.insert(
            name.clone(),
            NameEntry {
                cap,
                node: from,
                publisher,
            },
        );
        self.answer(origin, Ok(PeerReply::Done));
        let ready: Vec<_> = self
            .waiters
            .iter()
            .filter(|(_, w)| w.name == name)
            .map(|(k, _)| k)
            .collect();
        for k in ready {
            let w = self.waiters.remove(k).expect("listed above");
            self.acquire(
                alloc::vec![cap],
                w.from,
                Then::ServeLookup { origin: w.origin },
            );
        }
    }

    pub(crate) fn serve_unpublish(
        &mut self,
        origin: Origin,
        from: NodeId,
        name: Vec<u8>,
        publisher: u64,
    ) {
        match self.names.get(&name) {
            Some(e) if e.node == from && e.publisher == publisher => {
                let e = self.names.remove(&name).expect("present");
                self.release_ref(e.cap);
                self.answer(origin, Ok(PeerReply::Done));
            }
            _ => self.answer(origin, Err(ErrorCode::NameNotFound)),
        }
    }

    pub(crate) fn serve_lookup(
        &mut self,
        origin: Origin,
        from: NodeId,
        name: Vec<u8>,
        wait_ms: u32,
    ) {
        if let Some(e) = self.names.get(&name) {
            let cap = e.cap;
            return self.acquire(alloc::vec![cap], from, Then::ServeLookup { origin });
        }
        if wait_ms == 0 {
            return self.answer(origin, Err(ErrorCode::NameNotFound));
        }
        let deadline = self
            .now
            .after(core::time::Duration::from_millis(wait_ms as u64));
        let k = self.waiters.insert(NameWaiter {
            name,
            origin,
            from,
            deadline,
        });
        self.push_timer(deadline, Timer::NameWaiter(k));
    }

    pub(crate) fn on_waiter_timer(&mut self, k: WaiterKey) {
        if self.waiters.get(k).is_some_and(|w| w.deadline <= self.now) {
            let w = self.waiters.remove(k).expect("checked");
            self.answer(w.origin, Err(ErrorCode::NameNotFound));
        }
    }

    /// A peer is gone: its names and waiting lookups go too.
    pub(crate) fn names_peer_lost(&mut self, node: NodeId) {
        let gone: Vec<Vec<u8>> = self
            .names
            .iter()
            .filter(|(_, e)| e.node == node)
            .map(|(n, _)| n.clone())
            .collect();
        for name in gone {
            if let Some(e) = self.names.remove(&name) {
                self.release_ref(e.cap);
            }
        }
        self.waiters.retain(|_, w| w.from != node);
    }
}
