//! The cluster name service. Each name is homed on one member controller
//! chosen by hashing the name; publish, unpublish and lookup go there.
//!
//! [`NameService`] keeps both sides of it on one controller: at the home,
//! the names homed here and the lookups waiting for them; at the
//! publisher, each local process's list of names it published or is
//! publishing (withdrawn at its exit, bounded by
//! `Limits::max_names_per_process`). It owns that state and never touches
//! the controller's: it pushes [`Effect`]s for the controller to apply.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use fractos_wire::{CapRef, ErrorCode, NodeId, PeerReply};
use slotmap::SlotMap;

use crate::effects::{Effect, Effects, Origin, Timer, WaiterKey};
use crate::{Instant, ProcessKey};

/// A published name at its home.
struct NameEntry {
    /// Held by this (home) node.
    cap: CapRef,
    /// Node of the publishing process.
    node: NodeId,
    /// Publishing process's sequence number on that node.
    publisher: u64,
}

/// A lookup waiting at the home.
struct NameWaiter {
    name: Vec<u8>,
    origin: Origin,
    from: NodeId,
    /// The asking node's request id (with `from`, the key in
    /// `NameService::waiter_index`).
    req: u64,
    deadline: Instant,
}

/// A name in a local process's published list: published at its home, or
/// being published. Counts against `max_names_per_process`.
#[derive(Default)]
struct Published {
    /// Publish operations of this name not yet answered.
    inflight: u32,
    /// Unpublish requests sent for this name so far. A publish sent to the
    /// home before an unpublish is served there before it, so its outcome
    /// no longer matters.
    epoch: u32,
    /// Publishes sent to the home in the current epoch, not yet answered:
    /// each may succeed.
    sent: u32,
    /// A publish of the current epoch succeeded (or timed out, outcome
    /// unknown): the name may be published at its home.
    confirmed: bool,
}

impl Published {
    /// The entry must stay listed: the name is or may become published.
    fn needed(&self) -> bool {
        self.inflight > 0 || self.confirmed
    }
}

/// The member of `members` (sorted, deduplicated, not empty) that homes
/// `name`.
pub(crate) fn name_home(members: &[NodeId], name: &[u8]) -> NodeId {
    members[(name_hash(name) % members.len() as u64) as usize]
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

/// The name service's state on one controller.
pub(crate) struct NameService {
    /// Names homed here.
    names: BTreeMap<Vec<u8>, NameEntry>,
    /// Lookups waiting here for their names.
    waiters: SlotMap<WaiterKey, NameWaiter>,
    /// Waiting lookups by asking node and its request id.
    waiter_index: BTreeMap<(NodeId, u64), WaiterKey>,
    /// Names each local process published or is publishing (no empty
    /// lists).
    published: BTreeMap<ProcessKey, BTreeMap<Vec<u8>, Published>>,
    /// Names one process may have in its list.
    max_names: usize,
}

impl NameService {
    /// An empty service allowing `max_names` names per local process.
    pub fn new(max_names: usize) -> Self {
        NameService {
            names: BTreeMap::new(),
            waiters: SlotMap::with_key(),
            waiter_index: BTreeMap::new(),
            published: BTreeMap::new(),
            max_names,
        }
    }

    /// Names homed here.
    pub fn names(&self) -> usize {
        self.names.len()
    }

    /// Lookups waiting here.
    pub fn waiters(&self) -> usize {
        self.waiters.len()
    }

    /// Names local processes published or are publishing: in all, and the
    /// most of one process.
    pub fn published(&self) -> (usize, usize) {
        let lens = self.published.values().map(|l| l.len());
        (lens.clone().sum(), lens.max().unwrap_or(0))
    }

    // ------------------------------------------------------------ home side

    /// Home: `from`'s process `publisher` publishes `cap` (held by this
    /// node) under `name`. Lookups waiting for it are served.
    pub fn serve_publish(
        &mut self,
        origin: Origin,
        from: NodeId,
        name: Vec<u8>,
        cap: CapRef,
        publisher: u64,
        fx: &mut Effects,
    ) {
        if self.names.contains_key(&name) {
            fx.push(Effect::Release(cap));
            return fx.push(Effect::Answer(origin, Err(ErrorCode::NameTaken)));
        }
        let ready: Vec<_> = self
            .waiters
            .iter()
            .filter(|(_, w)| w.name == name)
            .map(|(k, _)| k)
            .collect();
        self.names.insert(
            name,
            NameEntry {
                cap,
                node: from,
                publisher,
            },
        );
        fx.push(Effect::Answer(origin, Ok(PeerReply::Done)));
        for k in ready {
            let Some(w) = self.waiters.remove(k) else {
                continue;
            };
            self.waiter_index.remove(&(w.from, w.req));
            fx.push(Effect::ServeLookup {
                cap,
                holder: w.from,
                origin: w.origin,
            });
        }
    }

    /// Home: `from`'s process `publisher` withdraws `name`; only the
    /// publisher may.
    pub fn serve_unpublish(
        &mut self,
        origin: Origin,
        from: NodeId,
        name: &[u8],
        publisher: u64,
        fx: &mut Effects,
    ) {
        match self.names.get(name) {
            Some(e) if e.node == from && e.publisher == publisher => {
                if let Some(e) = self.names.remove(name) {
                    fx.push(Effect::Release(e.cap));
                }
                fx.push(Effect::Answer(origin, Ok(PeerReply::Done)));
            }
            _ => fx.push(Effect::Answer(origin, Err(ErrorCode::NameNotFound))),
        }
    }

    /// Home: `from` looks `name` up, waiting up to `wait_ms` for it to be
    /// published.
    pub fn serve_lookup(
        &mut self,
        now: Instant,
        origin: Origin,
        from: NodeId,
        name: Vec<u8>,
        wait_ms: u32,
        fx: &mut Effects,
    ) {
        if let Some(e) = self.names.get(&name) {
            return fx.push(Effect::ServeLookup {
                cap: e.cap,
                holder: from,
                origin,
            });
        }
        let req = match origin {
            Origin::Peer { req, .. } => req,
            Origin::Proc { .. } => {
                return fx.push(Effect::Answer(origin, Err(ErrorCode::Malformed)))
            }
        };
        if wait_ms == 0 {
            return fx.push(Effect::Answer(origin, Err(ErrorCode::NameNotFound)));
        }
        if self.waiter_index.contains_key(&(from, req)) {
            // A peer reusing a request id: refuse rather than lose track.
            return fx.push(Effect::Answer(origin, Err(ErrorCode::Malformed)));
        }
        let deadline = now.after(core::time::Duration::from_millis(wait_ms as u64));
        let k = self.waiters.insert(NameWaiter {
            name,
            origin,
            from,
            req,
            deadline,
        });
        self.waiter_index.insert((from, req), k);
        fx.push(Effect::Timer(deadline, Timer::NameWaiter(k)));
    }

    /// A waiting lookup's deadline.
    pub fn waiter_timer(&mut self, now: Instant, k: WaiterKey, fx: &mut Effects) {
        if self.waiters.get(k).is_none_or(|w| w.deadline > now) {
            return;
        }
        if let Some(w) = self.waiters.remove(k) {
            self.waiter_index.remove(&(w.from, w.req));
            fx.push(Effect::Answer(w.origin, Err(ErrorCode::NameNotFound)));
        }
    }

    /// The process waiting on `from`'s lookup `req` exited: forget the
    /// waiter without answering (nobody waits for the answer any more).
    pub fn cancel_lookup(&mut self, from: NodeId, req: u64) {
        if let Some(k) = self.waiter_index.remove(&(from, req)) {
            self.waiters.remove(k);
        }
    }

    /// A peer is gone: the names its processes published here and their
    /// waiting lookups go too.
    pub fn peer_lost(&mut self, node: NodeId, fx: &mut Effects) {
        self.names.retain(|_, e| {
            if e.node == node {
                fx.push(Effect::Release(e.cap));
            }
            e.node != node
        });
        self.waiters.retain(|_, w| w.from != node);
        self.waiter_index.retain(|(from, _), _| *from != node);
    }

    // ------------------------------------------------------- publisher side

    /// A local process starts publishing `name`; refused with
    /// `LimitReached` when that would exceed its name budget.
    pub fn publish_begin(&mut self, proc: ProcessKey, name: &[u8]) -> Result<(), ErrorCode> {
        let list = self.published.entry(proc).or_default();
        let full = list.len() >= self.max_names;
        match list.get_mut(name) {
            Some(e) => e.inflight += 1,
            None if full => {
                if list.is_empty() {
                    self.published.remove(&proc);
                }
                return Err(ErrorCode::LimitReached);
            }
            None => {
                list.insert(
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
    pub fn publish_sent(&mut self, proc: ProcessKey, name: &[u8]) -> u32 {
        match self.published.get_mut(&proc).and_then(|l| l.get_mut(name)) {
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
    pub fn publish_end(
        &mut self,
        proc: ProcessKey,
        name: &[u8],
        sent: Option<u32>,
        maybe_published: bool,
    ) {
        let Some(list) = self.published.get_mut(&proc) else {
            return;
        };
        let Some(e) = list.get_mut(name) else {
            return;
        };
        e.inflight = e.inflight.saturating_sub(1);
        if sent == Some(e.epoch) {
            e.sent = e.sent.saturating_sub(1);
            e.confirmed |= maybe_published;
        }
        if !e.needed() {
            list.remove(name);
            if list.is_empty() {
                self.published.remove(&proc);
            }
        }
    }

    /// A local process unpublishes `name`: it leaves the published list at
    /// once unless a publish of it is still in flight.
    pub fn unpublish_begin(&mut self, proc: ProcessKey, name: &[u8]) {
        let Some(list) = self.published.get_mut(&proc) else {
            return;
        };
        if let Some(e) = list.get_mut(name) {
            e.epoch = e.epoch.wrapping_add(1);
            e.sent = 0;
            e.confirmed = false;
            if !e.needed() {
                list.remove(name);
                if list.is_empty() {
                    self.published.remove(&proc);
                }
            }
        }
    }

    /// A local process exited: its list goes; returns the names to
    /// withdraw at their homes, in order.
    pub fn process_exited(&mut self, proc: ProcessKey) -> Vec<Vec<u8>> {
        self.published
            .remove(&proc)
            .map(|l| l.into_keys().collect())
            .unwrap_or_default()
    }

    // ------------------------------------------------------------ invariants

    /// Checks that the waiter index agrees with the waiters, that every
    /// lookup waiting here for a local process (`me`) is still pending
    /// (`local_waits`), and that every published list belongs to a live
    /// process (`proc_name` names it), stays within budget and holds only
    /// needed entries.
    pub fn check(
        &self,
        me: NodeId,
        local_waits: impl Fn(u64) -> bool,
        proc_name: impl Fn(ProcessKey) -> Option<String>,
    ) -> Result<(), String> {
        if self.waiter_index.len() != self.waiters.len() {
            return Err("waiting lookups missing from the waiter index".into());
        }
        for ((from, req), k) in &self.waiter_index {
            match self.waiters.get(*k) {
                Some(w) if w.from == *from && w.req == *req => {}
                _ => return Err("waiter index is stale".into()),
            }
            if *from == me && !local_waits(*req) {
                return Err(alloc::format!(
                    "lookup {req} waits here for a process that is gone"
                ));
            }
        }
        for (proc, list) in &self.published {
            let Some(who) = proc_name(*proc) else {
                return Err("an exited process keeps a published list".into());
            };
            if list.is_empty() {
                return Err(alloc::format!("{who} keeps an empty published list"));
            }
            if list.len() > self.max_names {
                return Err(alloc::format!("{who} exceeds its name budget"));
            }
            if list.values().any(|e| !e.needed()) {
                return Err(alloc::format!(
                    "{who} keeps an unpublished name in its list"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOME: NodeId = NodeId(1);
    const A: NodeId = NodeId(2);
    const B: NodeId = NodeId(3);
    const T0: Instant = Instant(1_000);

    fn cap(n: u64) -> CapRef {
        CapRef {
            node: HOME,
            incarnation: 1,
            cap: n,
        }
    }

    fn peer(node: NodeId, req: u64) -> Origin {
        Origin::Peer { node, req }
    }

    fn check(ns: &NameService) -> Result<(), String> {
        ns.check(HOME, |_| false, |k| Some(alloc::format!("{k:?}")))
    }

    #[test]
    fn homes_are_stable_and_spread() {
        let members = [NodeId(1), NodeId(2), NodeId(3)];
        let a = name_home(&members, b"alpha");
        assert_eq!(a, name_home(&members, b"alpha"));
        assert_eq!(name_home(&members[..1], b"alpha"), NodeId(1));
        let homes: alloc::collections::BTreeSet<NodeId> =
            (0..64u8).map(|i| name_home(&members, &[b'n', i])).collect();
        assert_eq!(homes.len(), 3);
    }

    #[test]
    fn publish_lookup_unpublish() {
        let mut ns = NameService::new(8);
        let mut fx = Vec::new();
        ns.serve_publish(peer(A, 1), A, b"svc".to_vec(), cap(5), 7, &mut fx);
        assert_eq!(fx, [Effect::Answer(peer(A, 1), Ok(PeerReply::Done))]);
        assert_eq!(ns.names(), 1);
        fx.clear();
        // Taken: the second publisher's capability is given back.
        ns.serve_publish(peer(B, 1), B, b"svc".to_vec(), cap(6), 1, &mut fx);
        assert_eq!(
            fx,
            [
                Effect::Release(cap(6)),
                Effect::Answer(peer(B, 1), Err(ErrorCode::NameTaken))
            ]
        );
        fx.clear();
        // A lookup acquires the capability for the asking node.
        ns.serve_lookup(T0, peer(B, 2), B, b"svc".to_vec(), 0, &mut fx);
        assert_eq!(
            fx,
            [Effect::ServeLookup {
                cap: cap(5),
                holder: B,
                origin: peer(B, 2)
            }]
        );
        fx.clear();
        ns.serve_lookup(T0, peer(B, 3), B, b"none".to_vec(), 0, &mut fx);
        assert_eq!(
            fx,
            [Effect::Answer(peer(B, 3), Err(ErrorCode::NameNotFound))]
        );
        fx.clear();
        // Only the publisher may unpublish.
        ns.serve_unpublish(peer(B, 4), B, b"svc", 7, &mut fx);
        ns.serve_unpublish(peer(A, 4), A, b"svc", 8, &mut fx);
        assert_eq!(
            fx,
            [
                Effect::Answer(peer(B, 4), Err(ErrorCode::NameNotFound)),
                Effect::Answer(peer(A, 4), Err(ErrorCode::NameNotFound))
            ]
        );
        fx.clear();
        ns.serve_unpublish(peer(A, 5), A, b"svc", 7, &mut fx);
        assert_eq!(
            fx,
            [
                Effect::Release(cap(5)),
                Effect::Answer(peer(A, 5), Ok(PeerReply::Done))
            ]
        );
        assert_eq!(ns.names(), 0);
        check(&ns).unwrap();
    }

    #[test]
    fn waiting_lookups_are_served_or_time_out() {
        let mut ns = NameService::new(8);
        let mut fx = Vec::new();
        ns.serve_lookup(T0, peer(B, 1), B, b"svc".to_vec(), 100, &mut fx);
        ns.serve_lookup(T0, peer(A, 1), A, b"svc".to_vec(), 50, &mut fx);
        ns.serve_lookup(T0, peer(A, 2), A, b"other".to_vec(), 50, &mut fx);
        let timers: Vec<(Instant, WaiterKey)> = fx
            .drain(..)
            .map(|e| match e {
                Effect::Timer(at, Timer::NameWaiter(k)) => (at, k),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            timers[0].0,
            T0.after(core::time::Duration::from_millis(100))
        );
        assert_eq!(ns.waiters(), 3);
        // A peer reusing a request id is refused; a process origin cannot
        // wait at a home.
        ns.serve_lookup(T0, peer(A, 1), A, b"x".to_vec(), 50, &mut fx);
        let local = Origin::Proc {
            proc: ProcessKey::default(),
            op: 1,
            started: T0,
        };
        ns.serve_lookup(T0, local, HOME, b"x".to_vec(), 50, &mut fx);
        assert_eq!(
            answers(&fx),
            [Err(ErrorCode::Malformed), Err(ErrorCode::Malformed)]
        );
        fx.clear();
        // Publishing serves both waiters of the name, each for its node.
        ns.serve_publish(peer(A, 9), A, b"svc".to_vec(), cap(5), 7, &mut fx);
        assert_eq!(
            fx,
            [
                Effect::Answer(peer(A, 9), Ok(PeerReply::Done)),
                Effect::ServeLookup {
                    cap: cap(5),
                    holder: B,
                    origin: peer(B, 1)
                },
                Effect::ServeLookup {
                    cap: cap(5),
                    holder: A,
                    origin: peer(A, 1)
                },
            ]
        );
        fx.clear();
        // Their timers fire harmlessly; the other one's fires on time only.
        ns.waiter_timer(
            T0.after(core::time::Duration::from_secs(1)),
            timers[0].1,
            &mut fx,
        );
        assert!(fx.is_empty());
        ns.waiter_timer(T0, timers[2].1, &mut fx);
        assert!(fx.is_empty());
        ns.waiter_timer(timers[2].0, timers[2].1, &mut fx);
        assert_eq!(
            fx,
            [Effect::Answer(peer(A, 2), Err(ErrorCode::NameNotFound))]
        );
        assert_eq!(ns.waiters(), 0);
        check(&ns).unwrap();
    }

    #[test]
    fn cancelled_and_lost_waiters_go_silently() {
        let mut ns = NameService::new(8);
        let mut fx = Vec::new();
        ns.serve_lookup(T0, peer(A, 1), A, b"x".to_vec(), 50, &mut fx);
        ns.serve_lookup(T0, peer(B, 1), B, b"x".to_vec(), 50, &mut fx);
        ns.serve_lookup(T0, peer(B, 2), B, b"y".to_vec(), 50, &mut fx);
        fx.clear();
        ns.cancel_lookup(A, 1);
        ns.cancel_lookup(A, 99);
        assert_eq!(ns.waiters(), 2);
        // B is lost: its waiters and its names go, its capabilities are
        // released.
        ns.serve_publish(peer(B, 3), B, b"b1".to_vec(), cap(1), 4, &mut fx);
        ns.serve_publish(peer(A, 3), A, b"a1".to_vec(), cap(2), 4, &mut fx);
        fx.clear();
        ns.peer_lost(B, &mut fx);
        assert_eq!(fx, [Effect::Release(cap(1))]);
        assert_eq!((ns.names(), ns.waiters()), (1, 0));
        fx.clear();
        ns.serve_publish(peer(A, 4), A, b"x".to_vec(), cap(3), 4, &mut fx);
        assert_eq!(fx, [Effect::Answer(peer(A, 4), Ok(PeerReply::Done))]);
        check(&ns).unwrap();
    }

    #[test]
    fn published_lists_are_bounded_and_withdrawn_at_exit() {
        let mut procs: SlotMap<ProcessKey, ()> = SlotMap::with_key();
        let (p, q) = (procs.insert(()), procs.insert(()));
        let mut ns = NameService::new(2);
        ns.publish_begin(p, b"a").unwrap();
        ns.publish_begin(p, b"b").unwrap();
        // Full, but publishing a listed name again is fine.
        assert_eq!(ns.publish_begin(p, b"c"), Err(ErrorCode::LimitReached));
        ns.publish_begin(p, b"a").unwrap();
        ns.publish_begin(q, b"c").unwrap();
        assert_eq!(ns.published(), (3, 2));
        // "b" fails before it is sent: it leaves the list.
        ns.publish_end(p, b"b", None, false);
        assert_eq!(ns.published(), (2, 1));
        // "a": one publish succeeds, the other is refused; it stays.
        let e = ns.publish_sent(p, b"a");
        ns.publish_end(p, b"a", Some(e), true);
        ns.publish_end(p, b"a", Some(e), false);
        assert_eq!(ns.published(), (2, 1));
        check(&ns).unwrap();
        // Unpublished: gone at once.
        ns.unpublish_begin(p, b"a");
        assert_eq!(ns.published(), (1, 1));
        assert!(ns.process_exited(p).is_empty());
        // "c": unpublished while its publish is in flight, it stays listed
        // until that publish ends; an answer from before the unpublish no
        // longer confirms it.
        let e = ns.publish_sent(q, b"c");
        ns.unpublish_begin(q, b"c");
        assert_eq!(ns.published(), (1, 1));
        ns.publish_end(q, b"c", Some(e), true);
        assert_eq!(ns.published(), (0, 0));
        // A publish that timed out keeps the name for the exit to withdraw.
        ns.publish_begin(q, b"d").unwrap();
        let e = ns.publish_sent(q, b"d");
        ns.publish_end(q, b"d", Some(e), true);
        ns.publish_begin(q, b"e").unwrap();
        check(&ns).unwrap();
        assert_eq!(ns.process_exited(q), [b"d".to_vec(), b"e".to_vec()]);
        assert_eq!(ns.published(), (0, 0));
        // Late ends of an exited process change nothing.
        ns.publish_end(q, b"e", None, false);
        assert_eq!(ns.publish_sent(q, b"e"), 0);
        check(&ns).unwrap();
    }

    #[test]
    fn check_finds_lists_of_exited_processes_and_stray_local_waits() {
        let mut procs: SlotMap<ProcessKey, ()> = SlotMap::with_key();
        let p = procs.insert(());
        let mut ns = NameService::new(2);
        ns.publish_begin(p, b"a").unwrap();
        assert!(ns.check(HOME, |_| true, |_| None).is_err());
        let mut fx = Vec::new();
        ns.serve_lookup(T0, peer(HOME, 4), HOME, b"x".to_vec(), 5, &mut fx);
        assert!(ns.check(HOME, |_| false, |_| Some("p".into())).is_err());
        assert!(ns.check(HOME, |r| r == 4, |_| Some("p".into())).is_ok());
    }

    fn answers(fx: &[Effect]) -> Vec<Result<PeerReply, ErrorCode>> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Answer(_, r) => Some(*r),
                _ => None,
            })
            .collect()
    }
}
