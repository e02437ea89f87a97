//! The oracle: what the simulator knows about every capability and
//! operation, and the invariant checks over it.
//!
//! Time for the oracle is the *tick*: a counter incremented for every event
//! the simulator runs, so "starts after a revoke has completed" is a strict
//! order even between events at the same virtual instant.
//!
//! * **Revocation.** A revoke completes when its controller emits the
//!   `Completion` (tick `T`); the revoked capability goes into
//!   [`Oracle::revoked`]. A process exit revokes every object the process
//!   owns at the tick it is disconnected; a controller crash kills every
//!   capability of its incarnation. Every handle a process receives is
//!   recorded with its ancestor chain (asked of the owner controller with
//!   `debug_handle`/`debug_cap` at the moment the handle is created). An
//!   operation issued at tick `S` that succeeds must not use (as target,
//!   source, destination, completion, parent, bound or transferred
//!   capability) a handle whose chain holds a capability revoked at `T < S`.
//! * **Monotonic derivations.** Each new handle's rights and window must lie
//!   inside its parent's, and its `CapInfo` must match the owner's view.
//! * **Exactly one answer.** Every operation id is answered once; answers for
//!   unknown or already answered ids fail the run; nothing may stay
//!   unanswered at the end.
//! * **Copies.** An `Ok` copy must have moved exactly the source window into
//!   the destination window's prefix; every `MemRead`/`MemWrite` a
//!   controller sends must lie inside a running copy's window, and not only
//!   inside copies through a capability whose `Revoke` operation had already
//!   completed (`Ok`): no chunk is written after the revoke of the source or
//!   destination completed, and no chunk read after the source's.
//! * **Invocations.** Each invocation carries a unique id in its immediates;
//!   it must reach the owner of the invoked Request exactly once with the
//!   bound immediates followed by the invoker's, and only if the invoke
//!   succeeded or its outcome is unknown (`Timeout`, `PeerUnreachable`).

use std::collections::BTreeMap;

use fractos_core::ChannelId;
use fractos_wire::{CapInfo, CapRef, ErrorCode, NodeId};

/// An absolute memory window: owner channel, start address, length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Win {
    /// Channel of the owning process.
    pub chan: ChannelId,
    /// Start address in the owner's memory.
    pub addr: u64,
    /// Length.
    pub len: u64,
}

impl Win {
    /// Whether the two windows share a byte of the same process.
    pub fn overlaps(&self, o: &Win) -> bool {
        self.chan == o.chan && self.addr < o.addr + o.len && o.addr < self.addr + self.len
    }

    /// Whether `[addr, addr+len)` of `chan` lies inside this window.
    pub fn covers(&self, chan: ChannelId, addr: u64, len: u64) -> bool {
        self.chan == chan && addr >= self.addr && addr + len <= self.addr + self.len
    }

    /// The first `len` bytes of this window.
    pub fn prefix(&self, len: u64) -> Win {
        Win {
            len: len.min(self.len),
            ..*self
        }
    }
}

/// What the oracle knows about one handle of one process.
#[derive(Clone, Debug)]
pub struct HandleRec {
    /// The capability behind the handle.
    pub cap: CapRef,
    /// What the process was told.
    pub info: CapInfo,
    /// The capability, then its parent, ... up to its object's root.
    pub chain: Vec<CapRef>,
    /// Memory: the absolute window.
    pub win: Option<Win>,
    /// Channel of the process owning the object.
    pub owner: Option<ChannelId>,
    /// Tick at which the capability was already dead when the handle
    /// appeared.
    pub dead_at: Option<u64>,
    /// Request: tag, bound immediates and bound capability count.
    pub binds: Option<Binding>,
}

/// The bound arguments of a Request capability.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// Handler tag.
    pub tag: u64,
    /// Bound immediates, root first.
    pub imms: Vec<u8>,
    /// Number of bound capabilities.
    pub caps: usize,
}

/// A copy operation, for the byte and window checks.
#[derive(Clone, Debug)]
pub struct CopyRec {
    /// Source window.
    pub src: Option<Win>,
    /// Destination window (the whole capability window).
    pub dst: Option<Win>,
    /// Tick the copy was issued.
    pub start: u64,
    /// Virtual time the copy was issued.
    pub start_ns: u64,
    /// Tick it completed and whether it succeeded.
    pub end: Option<(u64, bool)>,
    /// A failed copy may still have chunks in flight: the virtual time after
    /// which it can no longer write (0 if it failed before moving a byte).
    pub quiet_ns: u64,
    /// The source's capability chain (empty if unknown).
    pub src_chain: Vec<CapRef>,
    /// The source's then the destination's capability chains.
    pub chains: Vec<CapRef>,
}

impl CopyRec {
    /// A copy issued now.
    pub fn new(src: Option<Win>, dst: Option<Win>, tick: u64, ns: u64) -> CopyRec {
        CopyRec {
            src,
            dst,
            start: tick,
            start_ns: ns,
            end: None,
            quiet_ns: u64::MAX,
            src_chain: Vec::new(),
            chains: Vec::new(),
        }
    }

    /// The same copy, through the capabilities of handles `src` and `dst`.
    pub fn through(mut self, src: &HandleRec, dst: &HandleRec) -> CopyRec {
        self.src_chain = src.chain.clone();
        self.chains = src.chain.iter().chain(&dst.chain).copied().collect();
        self
    }

    /// Whether the copy may access memory at tick `t` (virtual time `ns`)
    /// or later.
    pub fn may_run_at(&self, t: u64, ns: u64) -> bool {
        match self.end {
            None => true,
            Some((_, false)) => self.quiet_ns >= ns,
            Some((e, true)) => e >= t,
        }
    }

    /// The bytes it writes.
    pub fn write_window(&self) -> Option<Win> {
        match (self.src, self.dst) {
            (Some(s), Some(d)) => Some(d.prefix(s.len)),
            (None, d) => d,
            _ => None,
        }
    }
}

/// An invocation the oracle expects.
#[derive(Clone, Debug)]
pub struct InvokeRec {
    /// Expected tag, immediates and capability count, if the target's
    /// binding is known.
    pub expect: Option<(u64, Vec<u8>, usize)>,
    /// Expected receiver.
    pub owner: Option<ChannelId>,
    /// Deliveries seen.
    pub delivered: u32,
    /// The invoke failed with a definite error: it must never be delivered.
    pub refused: bool,
}

/// Cluster-wide knowledge shared by every check.
#[derive(Default)]
pub struct Oracle {
    /// Revoked capabilities and the tick their revocation completed.
    pub revoked: BTreeMap<CapRef, u64>,
    /// Dead controller incarnations and the tick they died.
    pub dead_incarnations: BTreeMap<(NodeId, u64), u64>,
    /// Known bindings of Request capabilities created by RequestCreate and
    /// Derive.
    pub bindings: BTreeMap<CapRef, Binding>,
    /// Every copy issued.
    pub copies: Vec<CopyRec>,
    /// Every invoke issued, by invocation id.
    pub invokes: BTreeMap<u64, InvokeRec>,
    /// Successful copies whose bytes were compared.
    pub copies_checked: u64,
    /// Answers seen, by operation and result.
    pub outcomes: BTreeMap<String, u64>,
    /// Argument-less invocations (monitor notifications, copy completions)
    /// that may legitimately arrive, by (receiver, tag, bound immediates).
    pub notify_budget: BTreeMap<NotifyKey, u64>,
    /// Argument-less invocations delivered, by the same key.
    pub notified: BTreeMap<NotifyKey, u64>,
    /// A notification Request with an unknown binding was used: the
    /// spurious-invocation check is off for this run.
    pub notify_unknown: bool,
    /// Successful monitor registrations.
    pub monitors: Vec<MonitorRec>,
    /// Virtual time of each revocation in [`Oracle::revoked`].
    pub revoked_ns: BTreeMap<CapRef, u64>,
    /// Capabilities revoked by a `Revoke` operation answered `Ok`, and the
    /// tick the revoker received the answer.
    pub revoke_ops: BTreeMap<CapRef, u64>,
    /// Current virtual time (kept by the simulator).
    pub now_ns: u64,
    /// How long a copy that timed out or lost its peer may keep landing
    /// chunks after its answer.
    pub zombie_ns: u64,
    /// How long a copy aborted at its source may keep landing chunks
    /// (chunks still in flight) after its answer.
    pub linger_ns: u64,
}

/// Receiver, tag and immediates of an argument-less invocation.
pub type NotifyKey = (ChannelId, u64, Vec<u8>);

/// A successful `Monitor`.
#[derive(Clone, Debug)]
pub struct MonitorRec {
    /// The watched capability's chain: the registration dies with any of
    /// them.
    pub watched: Vec<CapRef>,
    /// The notification Request's chain.
    pub notify: Vec<CapRef>,
    /// Where the notification goes.
    pub key: NotifyKey,
    /// Capabilities bound to the notification Request (their revocation
    /// would also stop the notification).
    pub notify_caps: usize,
    /// The registering process: its exit drops the registration.
    pub watcher: ChannelId,
}

/// Magic marking the invocation id at the end of invoker immediates. Bound
/// immediates are drawn from `b'a'..=b'z'`, so they never contain it.
pub const INVOKE_MAGIC: [u8; 8] = *b"\xffINVOKE\xff";

impl Oracle {
    /// The notification key of Request `h`, if its binding and owner are
    /// known.
    pub fn notify_key(h: &HandleRec) -> Option<NotifyKey> {
        let b = h.binds.as_ref()?;
        Some((h.owner?, b.tag, b.imms.clone()))
    }

    /// Records the failure of copy `idx` with `e` at tick `t`.
    pub fn copy_failed(&mut self, idx: usize, t: u64, e: ErrorCode) {
        let c = &mut self.copies[idx];
        c.end = Some((t, false));
        // These are decided before the first chunk is read. Anything else
        // may come after bytes moved: a copy with a completion Request
        // answers with the completion's invocation result (e.g.
        // `LimitReached` when the receiver's table is full).
        let early = matches!(
            e,
            ErrorCode::BadHandle
                | ErrorCode::WrongType
                | ErrorCode::MissingRight
                | ErrorCode::SizeMismatch
        );
        // After an abort at the source the invoker hears of it about when
        // the last chunks land (they travel on another link, possibly held
        // by a partition); after a timeout or a lost peer the source may
        // still be running.
        let linger = match e {
            _ if early => 0,
            ErrorCode::Timeout | ErrorCode::PeerUnreachable => self.zombie_ns,
            _ => self.linger_ns,
        };
        c.quiet_ns = if early {
            0
        } else {
            self.now_ns.saturating_add(linger)
        };
    }

    /// Allows one more argument-less invocation of `h`.
    pub fn expect_notify(&mut self, h: &HandleRec) {
        match Self::notify_key(h) {
            Some(k) => *self.notify_budget.entry(k).or_insert(0) += 1,
            None => self.notify_unknown = true,
        }
    }

    /// Records that `cap`'s subtree is revoked as of tick `t`.
    pub fn revoke(&mut self, cap: CapRef, t: u64) {
        self.revoked.entry(cap).or_insert(t);
        self.revoked_ns.entry(cap).or_insert(self.now_ns);
    }

    /// Records a `Revoke` operation on `cap` answered `Ok` at tick `t`.
    pub fn revoke_op(&mut self, cap: CapRef, t: u64) {
        self.revoke_ops.entry(cap).or_insert(t);
    }

    /// A capability of `chains` whose `Revoke` operation completed before
    /// tick `t`.
    fn revoked_op_before(&self, chains: &[CapRef], t: u64) -> Option<(CapRef, u64)> {
        chains
            .iter()
            .find_map(|c| self.revoke_ops.get(c).filter(|r| **r < t).map(|r| (*c, *r)))
    }

    /// Checks that an operation issued at tick `start` could succeed through
    /// the handle `h`.
    pub fn check_use(&self, h: &HandleRec, start: u64, what: &str) -> Result<(), String> {
        if let Some(d) = h.dead_at {
            if d < start {
                return Err(format!(
                    "{what}: succeeded through {:?}, which was already dead at tick {d} (op issued at tick {start})",
                    h.cap
                ));
            }
        }
        for c in &h.chain {
            if let Some(t) = self.revoked.get(c) {
                if *t < start {
                    return Err(format!(
                        "{what}: succeeded through {:?}, a descendant of {c:?} whose revocation completed at tick {t} (op issued at tick {start})",
                        h.cap
                    ));
                }
            }
            if let Some(t) = self.dead_incarnations.get(&(c.node, c.incarnation)) {
                if *t < start {
                    return Err(format!(
                        "{what}: succeeded through {:?} of a controller incarnation that died at tick {t} (op issued at tick {start})",
                        h.cap
                    ));
                }
            }
        }
        Ok(())
    }

    /// The binding of the nearest ancestor of `chain` with a known binding.
    pub fn binding_of(&self, chain: &[CapRef]) -> Option<Binding> {
        chain.iter().find_map(|c| self.bindings.get(c).cloned())
    }

    /// Checks a `MemRead` (`write == false`) or `MemWrite` against the
    /// running copies. Returns an error if no running copy covers it.
    pub fn check_access(
        &self,
        tick: u64,
        chan: ChannelId,
        addr: u64,
        len: u64,
        write: bool,
    ) -> Result<(), String> {
        let mut unknown = false;
        let mut cut = None;
        let ns = self.now_ns;
        for c in self.copies.iter().filter(|c| c.may_run_at(tick, ns)) {
            let w = if write { c.write_window() } else { c.src };
            match w {
                Some(w) if w.covers(chan, addr, len) => {
                    // Reading the source is stopped by its revoke; writing
                    // by the revoke of either side.
                    let chains = if write { &c.chains } else { &c.src_chain };
                    match self.revoked_op_before(chains, tick) {
                        Some(r) => cut = Some(r),
                        None => return Ok(()),
                    }
                }
                Some(_) => {}
                None => unknown = true,
            }
        }
        if unknown {
            return Ok(());
        }
        if let Some((cap, t)) = cut {
            return Err(format!(
                "controller sent Mem{} of [{addr:#x}, +{len}) to {chan:?} for a copy through {cap:?}, whose revoke completed at tick {t} (now tick {tick})",
                if write { "Write" } else { "Read" },
            ));
        }
        Err(format!(
            "controller sent Mem{} of [{addr:#x}, +{len}) to {chan:?}, outside every running copy's {} window",
            if write { "Write" } else { "Read" },
            if write { "destination" } else { "source" }
        ))
    }

    /// The offsets of copy `idx` whose bytes cannot be predicted: those
    /// whose source or destination byte another copy that may have run
    /// meanwhile could have written, and source bytes inside the copy's own
    /// destination. `None` if a window involved is unknown.
    pub fn copy_exclusions(&self, idx: usize, now: u64) -> Option<Vec<(u64, u64)>> {
        let c = &self.copies[idx];
        let (src, dst) = (c.src?, c.dst?);
        let len = src.len;
        let dstp = dst.prefix(len);
        let mut out = Vec::new();
        if src.overlaps(&dstp) {
            // Only the source side: the copy itself rewrites those bytes.
            let lo = dstp.addr.max(src.addr);
            let hi = (dstp.addr + dstp.len).min(src.addr + len);
            out.push((lo - src.addr, hi - src.addr));
        }
        let mut add = |w: &Win| {
            for base in [&src, &dstp] {
                if w.chan == base.chan {
                    let lo = w.addr.max(base.addr);
                    let hi = (w.addr + w.len).min(base.addr + len);
                    if lo < hi {
                        out.push((lo - base.addr, hi - base.addr));
                    }
                }
            }
        };

        for (i, o) in self.copies.iter().enumerate() {
            if i == idx || o.start > now || !o.may_run_at(c.start, c.start_ns) {
                continue;
            }
            add(&o.write_window()?);
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fractos_wire::{ObjectKind, Rights};

    fn cap(n: u64) -> CapRef {
        CapRef {
            node: NodeId(1),
            incarnation: 1,
            cap: n,
        }
    }

    fn handle(chain: &[u64]) -> HandleRec {
        HandleRec {
            cap: cap(chain[0]),
            info: CapInfo {
                kind: ObjectKind::Memory,
                rights: Rights::READ,
                len: 8,
            },
            chain: chain.iter().map(|c| cap(*c)).collect(),
            win: None,
            owner: None,
            dead_at: None,
            binds: None,
        }
    }

    #[test]
    fn use_after_revoke_of_an_ancestor_is_caught() {
        let mut o = Oracle::default();
        let h = handle(&[3, 2, 1]);
        o.revoke(cap(2), 10);
        assert!(
            o.check_use(&h, 10, "op").is_ok(),
            "issued before the revoke completed"
        );
        let e = o.check_use(&h, 11, "op").unwrap_err();
        assert!(e.contains("revocation completed at tick 10"), "{e}");
        assert!(
            o.check_use(&handle(&[4, 1]), 11, "op").is_ok(),
            "a sibling survives"
        );
    }

    #[test]
    fn use_of_a_dead_incarnation_or_dead_handle_is_caught() {
        let mut o = Oracle::default();
        o.dead_incarnations.insert((NodeId(1), 1), 5);
        assert!(o.check_use(&handle(&[7]), 6, "op").is_err());
        let mut o = Oracle::default();
        let mut h = handle(&[7]);
        h.dead_at = Some(5);
        assert!(o.check_use(&h, 5, "op").is_ok());
        assert!(o.check_use(&h, 6, "op").is_err());
        o.revoke(cap(9), 1);
        assert!(o.check_use(&handle(&[7]), 6, "op").is_ok());
    }

    fn win(chan: u64, addr: u64, len: u64) -> Win {
        Win {
            chan: ChannelId(chan),
            addr,
            len,
        }
    }

    #[test]
    fn memory_accesses_must_lie_in_a_running_copy() {
        let mut o = Oracle::default();
        o.copies.push(CopyRec::new(
            Some(win(1, 100, 50)),
            Some(win(2, 0, 80)),
            1,
            0,
        ));
        assert!(o.check_access(2, ChannelId(2), 0, 50, true).is_ok());
        assert!(
            o.check_access(2, ChannelId(2), 10, 41, true).is_err(),
            "beyond the source length"
        );
        assert!(o.check_access(2, ChannelId(1), 100, 50, false).is_ok());
        assert!(o.check_access(2, ChannelId(1), 99, 2, false).is_err());
        o.copies[0].end = Some((3, true));
        assert!(
            o.check_access(4, ChannelId(2), 0, 1, true).is_err(),
            "finished copies write nothing"
        );
        o.zombie_ns = 100;
        o.copy_failed(0, 3, ErrorCode::Revoked);
        assert!(
            o.check_access(4, ChannelId(2), 0, 1, true).is_ok(),
            "failed copies may still land chunks"
        );
    }

    #[test]
    fn bytes_other_copies_may_touch_are_not_compared() {
        let mut o = Oracle::default();
        let mk = |src, dst, start, end| CopyRec {
            end,
            ..CopyRec::new(Some(src), Some(dst), start, start)
        };
        o.copies
            .push(mk(win(1, 0, 10), win(2, 0, 10), 1, Some((5, true))));
        o.copies
            .push(mk(win(3, 0, 10), win(4, 0, 10), 2, Some((4, true))));
        assert_eq!(o.copy_exclusions(0, 5), Some(vec![]));
        o.copies
            .push(mk(win(3, 0, 10), win(1, 5, 10), 3, Some((9, true))));
        assert_eq!(
            o.copy_exclusions(0, 5),
            Some(vec![(5, 10)]),
            "another copy wrote into the source meanwhile"
        );
        o.copies.push(mk(win(1, 0, 10), win(1, 5, 10), 10, None));
        assert_eq!(
            o.copy_exclusions(3, 11),
            Some(vec![(5, 10)]),
            "source bytes inside the copy's own destination"
        );
        o.copies[0].dst = None;
        assert_eq!(
            o.copy_exclusions(1, 5),
            None,
            "a writer with an unknown window"
        );
    }
}
