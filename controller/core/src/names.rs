//! The cluster name service. Each name is homed on one member controller
//! chosen by hashing the name; publish, unpublish and lookup go there.

use alloc::vec::Vec;

use fractos_wire::{CapRef, ErrorCode, NodeId, PeerReply};

use crate::controller::{Controller, Origin, Then, Timer};
use crate::{Instant, ProcessKey};

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
    /// The asking node's request id (with `from`, the key in
    /// [`Controller::waiter_index`]).
    pub req: u64,
    pub deadline: Instant,
}

/// A name in a local process's published list: published at its home, or
/// being published. Counts against `max_names_per_process`.
#[derive(Default)]
pub(crate) struct Published {
    /// Publish operations of this name not yet answered.
    pub inflight: u32,
    /// Unpublish requests sent for this name so far. A publish sent to the
    /// home before an unpublish is served there before it, so its outcome
    /// no longer matters.
    pub epoch: u32,
    /// Publishes sent to the home in the current epoch, not yet answered:
    /// each may succeed.
    pub sent: u32,
    /// A publish of the current epoch succeeded (or timed out, outcome
    /// unknown): the name may be published at its home.
    pub confirmed: bool,
}

impl Published {
    /// The entry must stay listed: the name is or may become published.
    pub fn needed(&self) -> bool {
        self.inflight > 0 || self.confirmed
    }
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
            self.waiter_index.remove(&(w.from, w.req));
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
        let req = match origin {
            Origin::Peer { req, .. } => req,
            Origin::Proc { .. } => return self.answer(origin, Err(ErrorCode::Malformed)),
        };
        if wait_ms == 0 {
            return self.answer(origin, Err(ErrorCode::NameNotFound));
        }
        if self.waiter_index.contains_key(&(from, req)) {
            // A peer reusing a request id: refuse rather than lose track.
            return self.answer(origin, Err(ErrorCode::Malformed));
        }
        let deadline = self
            .now
            .after(core::time::Duration::from_millis(wait_ms as u64));
        let k = self.waiters.insert(NameWaiter {
            name,
            origin,
            from,
            req,
            deadline,
        });
        self.waiter_index.insert((from, req), k);
        self.push_timer(deadline, Timer::NameWaiter(k));
    }

    pub(crate) fn on_waiter_timer(&mut self, k: WaiterKey) {
        if self.waiters.get(k).is_some_and(|w| w.deadline <= self.now) {
            let w = self.waiters.remove(k).expect("checked");
            self.waiter_index.remove(&(w.from, w.req));
            self.answer(w.origin, Err(ErrorCode::NameNotFound));
        }
    }

    /// The process waiting on `from`'s lookup `req` exited: forget the
    /// waiter without answering (nobody waits for the answer any more).
    pub(crate) fn cancel_lookup(&mut self, from: NodeId, req: u64) {
        if let Some(k) = self.waiter_index.remove(&(from, req)) {
            self.waiters.remove(k);
        }
    }

    /// A local process starts publishing `name`; refused with
    /// `LimitReached` when that would exceed its name budget.
    pub(crate) fn publish_begin(&mut self, proc: ProcessKey, name: &[u8]) -> Result<(), ErrorCode> {
        let max = self.cfg.limits.max_names_per_process;
        let p = &mut self.procs[proc];
        let full = p.published.len() >= max;
        match p.published.get_mut(name) {
            Some(e) => e.inflight += 1,
            None if full => return Err(ErrorCode::LimitReached),
            None => {
                p.published.insert(
                    name.to_vec(),
                    Published {
                        inflight: 1,
                        ..Published::default()
                    },
                );
            }
        }
        Ok(())
    }

    /// A publish of `name` is about to be sent to the home: from now on it
    /// may succeed. Returns the entry's epoch.
    pub(crate) fn publish_sent(&mut self, proc: ProcessKey, name: &[u8]) -> u32 {
        match self
            .procs
            .get_mut(proc)
            .and_then(|p| p.published.get_mut(name))
        {
            Some(e) => {
                e.sent += 1;
                e.epoch
            }
            None => 0,
        }
    }

    /// A publish of `name` by `proc` ended. `sent`: the epoch in which it
    /// was sent to the home, if it was; `maybe_published`: the home
    /// published it, or the outcome is unknown.
    pub(crate) fn publish_end(
        &mut self,
        proc: ProcessKey,
        name: &[u8],
        sent: Option<u32>,
        maybe_published: bool,
    ) {
        let Some(p) = self.procs.get_mut(proc) else {
            return;
        };
        let Some(e) = p.published.get_mut(name) else {
            return;
        };
        e.inflight = e.inflight.saturating_sub(1);
        if sent == Some(e.epoch) {
            e.sent = e.sent.saturating_sub(1);
            e.confirmed |= maybe_published;
        }
        if !e.needed() {
            p.published.remove(name);
        }
    }

    /// A local process unpublishes `name`: it leaves the published list at
    /// once unless a publish of it is still in flight.
    pub(crate) fn unpublish_begin(&mut self, proc: ProcessKey, name: &[u8]) {
        let p = &mut self.procs[proc];
        if let Some(e) = p.published.get_mut(name) {
            e.epoch = e.epoch.wrapping_add(1);
            e.sent = 0;
            e.confirmed = false;
            if !e.needed() {
                p.published.remove(name);
            }
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
        self.waiter_index.retain(|(from, _), _| *from != node);
    }
}
