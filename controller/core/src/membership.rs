//! SWIM-style gossip membership and failure detector.
//!
//! Sans-IO like the rest of the core: the controller calls
//! [`Membership::tick`] every protocol period, [`Membership::probe_timer`]
//! at the probe timeout it was asked for, and [`Membership::on_msg`] for
//! every membership frame; each call pushes [`SwimOut`]s (frames to send,
//! members found dead or restarted) that the controller applies.
//!
//! * Every period one member is probed, in a round-robin over a random
//!   permutation of the view (a random stride coprime with the view's size,
//!   so no shuffled copy of the view is stored). A member that does not
//!   answer within the probe timeout is probed indirectly through
//!   `indirect_probes` random members ([`PeerMsg::ProbeReq`]); one that has
//!   not answered either way by the end of the period becomes `Suspect`.
//! * A suspect is confirmed `Dead` by every member that learned of the
//!   suspicion once its suspicion timeout
//!   (`suspicion_mult × ⌈log10 N⌉` periods) passes, unless the suspect
//!   refutes it by bumping its sequence number (the SWIM incarnation
//!   counter) and gossiping `Alive`.
//! * Facts travel piggybacked on probes, acks and probe requests (at most
//!   [`MAX_PIGGYBACK`] each); each fact is sent about
//!   `retransmit_mult × ⌈log2 N⌉` times, fewest-sent first.
//! * A joining controller whose initial view is small (its seeds) asks one
//!   seed per period for the whole view ([`PeerMsg::Join`]) until one
//!   answers ([`PeerMsg::Members`]).
//!
//! Facts about a member are ordered by `(incarnation, seq)` then by state
//! (`Alive` < `Suspect` < `Dead` < `Left`); a controller's incarnation grows
//! on every restart, so a fact about a newer incarnation always wins and
//! reports a restart. Entries of members never heard from have incarnation
//! 0, so any real fact replaces them.

use alloc::vec::Vec;
use core::time::Duration;

use fractos_wire::{
    MemberState, MemberUpdate, NodeId, PeerMsg, MAX_MEMBERS_PER_FRAME, MAX_PIGGYBACK,
};

use crate::Instant;

/// Gossip membership parameters (see [`crate::Config::gossip`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gossip {
    /// Protocol period: one probe per member per period.
    pub protocol_period: Duration,
    /// How long a direct probe may stay unanswered before indirect probes.
    pub probe_timeout: Duration,
    /// Members asked to probe indirectly.
    pub indirect_probes: usize,
    /// Suspicion timeout in periods per decimal digit of the cluster size.
    pub suspicion_mult: u32,
    /// Transmissions of each fact per binary digit of the cluster size.
    pub retransmit_mult: u32,
    /// A link without traffic for this long, with nothing in progress on
    /// it, is closed (and opened again when next needed).
    pub link_idle: Duration,
    /// An initial view with at most this many other members is treated as
    /// seeds: the controller asks them for the whole view.
    pub join_below: usize,
}

impl Default for Gossip {
    fn default() -> Self {
        Gossip {
            protocol_period: Duration::from_secs(1),
            probe_timeout: Duration::from_millis(400),
            indirect_probes: 3,
            suspicion_mult: 4,
            retransmit_mult: 3,
            link_idle: Duration::from_secs(5),
            join_below: 8,
        }
    }
}

/// What membership asks of the controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SwimOut {
    /// Send a membership frame.
    Send(NodeId, PeerMsg),
    /// Call [`Membership::probe_timer`] with this probe id at this instant.
    ProbeTimer(Instant, u64),
    /// The member was confirmed dead (or left): what it held here goes.
    Dead(NodeId),
    /// The member restarted (a newer incarnation is alive).
    Restarted(NodeId),
}

#[derive(Clone, Copy, Debug)]
struct Member {
    node: NodeId,
    inc: u64,
    seq: u32,
    state: MemberState,
}

impl Member {
    fn fact(&self) -> MemberUpdate {
        MemberUpdate {
            node: self.node,
            incarnation: self.inc,
            seq: self.seq,
            state: self.state,
        }
    }
    fn probeable(&self) -> bool {
        matches!(self.state, MemberState::Alive | MemberState::Suspect)
    }
}

struct Probe {
    target: NodeId,
    seq: u64,
    acked: bool,
}

struct Relay {
    seq: u64,
    requester: NodeId,
    their_seq: u64,
    expires: Instant,
}

struct Pending {
    fact: MemberUpdate,
    sent: u32,
}

/// Most indirect probes relayed at once.
const MAX_RELAYS: usize = 256;
/// Most facts waiting to be gossiped.
const MAX_QUEUE: usize = 4096;
/// Periods between probes of a member believed dead.
const RECLAIM_EVERY: u64 = 4;

/// One controller's membership view and failure detector.
pub(crate) struct Membership {
    cfg: Gossip,
    me: NodeId,
    inc: u64,
    seq: u32,
    /// Every other member ever heard of, sorted by node id.
    members: Vec<Member>,
    round_offset: usize,
    round_stride: usize,
    round_step: usize,
    rng: u64,
    probe: Option<Probe>,
    next_seq: u64,
    relays: Vec<Relay>,
    suspects: Vec<(NodeId, Instant)>,
    queue: Vec<Pending>,
    synced: bool,
    periods: u64,
    /// Members confirmed dead by this controller (for metrics).
    pub(crate) confirmed_dead: u64,
    /// Probes sent (direct and indirect).
    pub(crate) probes_sent: u64,
}

fn rank(s: MemberState) -> u8 {
    s as u8
}

fn newer(a: &MemberUpdate, b: &Member) -> bool {
    (a.incarnation, a.seq, rank(a.state)) > (b.inc, b.seq, rank(b.state))
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// `⌈log_base(n)⌉`, at least 1.
fn ceil_log(n: usize, base: usize) -> u32 {
    let (mut k, mut p) = (0u32, 1usize);
    while p < n {
        p = p.saturating_mul(base);
        k += 1;
    }
    k.max(1)
}

impl Membership {
    /// A view of `initial` (this node excluded), all presumed alive.
    pub(crate) fn new(me: NodeId, inc: u64, initial: &[NodeId], cfg: Gossip, seed: u64) -> Self {
        let mut members: Vec<Member> = initial
            .iter()
            .filter(|n| **n != me)
            .map(|&node| Member {
                node,
                inc: 0,
                seq: 0,
                state: MemberState::Alive,
            })
            .collect();
        members.sort_by_key(|m| m.node);
        members.dedup_by_key(|m| m.node);
        let synced = members.len() > cfg.join_below || members.is_empty();
        let mut m = Membership {
            cfg,
            me,
            inc,
            seq: 0,
            members,
            round_offset: 0,
            round_stride: 1,
            round_step: usize::MAX,
            rng: seed | 1,
            probe: None,
            next_seq: 1,
            relays: Vec::new(),
            suspects: Vec::new(),
            queue: Vec::new(),
            synced,
            periods: 0,
            confirmed_dead: 0,
            probes_sent: 0,
        };
        m.enqueue(m.my_fact());
        m
    }

    fn my_fact(&self) -> MemberUpdate {
        MemberUpdate {
            node: self.me,
            incarnation: self.inc,
            seq: self.seq,
            state: MemberState::Alive,
        }
    }

    fn rand(&mut self) -> u64 {
        // xorshift64*: deterministic for a given seed.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn index(&self, node: NodeId) -> Result<usize, usize> {
        self.members.binary_search_by_key(&node, |m| m.node)
    }

    /// What this controller believes of `node`.
    pub(crate) fn state(&self, node: NodeId) -> Option<MemberState> {
        if node == self.me {
            return Some(MemberState::Alive);
        }
        self.index(node).ok().map(|i| self.members[i].state)
    }

    /// The incarnation this controller knows of `node` (0: never heard).
    pub(crate) fn incarnation(&self, node: NodeId) -> u64 {
        self.index(node).map_or(0, |i| self.members[i].inc)
    }

    /// Every other member with its state, by node id.
    pub(crate) fn view(&self) -> impl Iterator<Item = (NodeId, u64, MemberState)> + '_ {
        self.members.iter().map(|m| (m.node, m.inc, m.state))
    }

    /// Members believed alive or suspect, this one included.
    pub(crate) fn live(&self) -> usize {
        1 + self.members.iter().filter(|m| m.probeable()).count()
    }

    /// Facts waiting to be gossiped.
    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
    }

    fn size(&self) -> usize {
        self.members.len() + 1
    }

    fn suspicion_timeout(&self) -> Duration {
        self.cfg.protocol_period * (self.cfg.suspicion_mult.max(1) * ceil_log(self.size(), 10))
    }

    fn retransmits(&self) -> u32 {
        self.cfg.retransmit_mult.max(1) * ceil_log(self.size() + 1, 2)
    }

    fn enqueue(&mut self, fact: MemberUpdate) {
        self.queue.retain(|p| p.fact.node != fact.node);
        if self.queue.len() >= MAX_QUEUE {
            // Drop the most-sent fact.
            if let Some(i) = (0..self.queue.len()).max_by_key(|&i| self.queue[i].sent) {
                self.queue.swap_remove(i);
            }
        }
        self.queue.push(Pending { fact, sent: 0 });
    }

    /// Up to [`MAX_PIGGYBACK`] facts to carry on one frame, suspicions and
    /// deaths first, then fewest-sent first; facts sent often enough leave
    /// the queue.
    fn piggyback(&mut self) -> Vec<MemberUpdate> {
        if self.queue.is_empty() {
            return Vec::new();
        }
        // Failures first (they are what must spread fast), then the
        // fewest-sent.
        self.queue
            .sort_by_key(|p| (p.fact.state == MemberState::Alive, p.sent));
        let limit = self.retransmits();
        let n = self.queue.len().min(MAX_PIGGYBACK);
        let mut out = Vec::with_capacity(n);
        for p in &mut self.queue[..n] {
            p.sent += 1;
            out.push(p.fact);
        }
        self.queue.retain(|p| p.sent < limit);
        out
    }

    /// A controller proved `node` and `inc` in a link handshake: direct
    /// evidence that this incarnation is alive.
    pub(crate) fn observed(
        &mut self,
        now: Instant,
        node: NodeId,
        inc: u64,
        out: &mut Vec<SwimOut>,
    ) {
        let seq = match self.index(node) {
            Ok(i) if self.members[i].inc == inc => {
                let m = self.members[i];
                if m.probeable() {
                    return;
                }
                // It still believes itself alive: tell it, so it refutes.
                let fact = m.fact();
                let seq = self.next_seq;
                self.next_seq += 1;
                out.push(SwimOut::Send(
                    node,
                    PeerMsg::Probe {
                        seq,
                        updates: alloc::vec![fact],
                    },
                ));
                return;
            }
            _ => 0,
        };
        self.apply(
            now,
            MemberUpdate {
                node,
                incarnation: inc,
                seq,
                state: MemberState::Alive,
            },
            out,
        );
    }

    /// Merges one fact; returns whether it changed the view.
    fn apply(&mut self, now: Instant, f: MemberUpdate, out: &mut Vec<SwimOut>) -> bool {
        if f.node == self.me {
            // Someone suspects (or buried) this incarnation: refute, and
            // gossip the refutation again if the claim is an old one still
            // going round (our earlier refutation may have retired).
            let mine = f.incarnation == self.inc || f.incarnation == 0;
            if mine && f.state != MemberState::Alive {
                if f.seq >= self.seq {
                    self.seq = f.seq.saturating_add(1);
                }
                self.enqueue(self.my_fact());
            }
            return false;
        }
        match self.index(f.node) {
            Err(i) => {
                self.members.insert(
                    i,
                    Member {
                        node: f.node,
                        inc: f.incarnation,
                        seq: f.seq,
                        state: f.state,
                    },
                );
                if f.state == MemberState::Suspect {
                    let at = now.after(self.suspicion_timeout());
                    self.suspects.push((f.node, at));
                }
                self.enqueue(f);
                true
            }
            Ok(i) => {
                let old = self.members[i];
                // A suspicion about incarnation 0 comes from a member that
                // never linked with this one (it only knows it from its
                // configuration): it is about whatever incarnation runs, and
                // we time it out ourselves. (A death claim about
                // incarnation 0 is not applied to a known incarnation: it
                // may be stale news of an earlier one.)
                let f = if f.incarnation == 0 && f.state == MemberState::Suspect {
                    MemberUpdate {
                        incarnation: old.inc,
                        ..f
                    }
                } else {
                    f
                };
                if !newer(&f, &old) {
                    return false;
                }
                self.members[i] = Member {
                    node: f.node,
                    inc: f.incarnation,
                    seq: f.seq,
                    state: f.state,
                };
                if f.incarnation > old.inc && old.inc != 0 {
                    out.push(SwimOut::Restarted(f.node));
                }
                // A configured member first heard of: everyone configured
                // with it already presumes it alive, so this is not news
                // worth gossip (it would flood the piggyback queues of a
                // large cluster at startup).
                if old.inc == 0 && old.state == MemberState::Alive && f.state == MemberState::Alive
                {
                    return true;
                }
                match f.state {
                    MemberState::Suspect => {
                        let at = now.after(self.suspicion_timeout());
                        self.suspects.push((f.node, at));
                    }
                    MemberState::Dead | MemberState::Left if old.probeable() => {
                        out.push(SwimOut::Dead(f.node));
                    }
                    _ => {}
                }
                self.enqueue(f);
                true
            }
        }
    }

    fn merge(&mut self, now: Instant, facts: &[MemberUpdate], out: &mut Vec<SwimOut>) {
        for f in facts {
            self.apply(now, *f, out);
        }
    }

    fn send_probe(&mut self, to: NodeId, seq: u64, out: &mut Vec<SwimOut>) {
        self.probes_sent += 1;
        let updates = self.piggyback();
        out.push(SwimOut::Send(to, PeerMsg::Probe { seq, updates }));
    }

    /// The next member to probe, or `None` if no other member is alive.
    fn next_target(&mut self) -> Option<NodeId> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        for _ in 0..2 * n + 1 {
            if self.round_step >= n {
                self.round_offset = (self.rand() % n as u64) as usize;
                let mut stride = 1 + (self.rand() % n as u64) as usize;
                while gcd(stride, n) != 1 {
                    stride = stride % n + 1;
                }
                self.round_stride = stride;
                self.round_step = 0;
            }
            let i = (self.round_offset + self.round_step * self.round_stride) % n;
            self.round_step += 1;
            if self.members[i].probeable() {
                return Some(self.members[i].node);
            }
        }
        None
    }

    /// One protocol period: settle the last probe, confirm expired
    /// suspicions, start the next probe.
    pub(crate) fn tick(&mut self, now: Instant, out: &mut Vec<SwimOut>) {
        if let Some(p) = self.probe.take() {
            if !p.acked {
                if let Ok(i) = self.index(p.target) {
                    let m = self.members[i];
                    if m.state == MemberState::Alive {
                        let f = MemberUpdate {
                            state: MemberState::Suspect,
                            ..m.fact()
                        };
                        self.apply(now, f, out);
                    }
                }
            }
        }
        let mut expired = Vec::new();
        self.suspects.retain(|&(node, at)| {
            if at <= now {
                expired.push(node);
                false
            } else {
                true
            }
        });
        for node in expired {
            if let Ok(i) = self.index(node) {
                let m = self.members[i];
                if m.state == MemberState::Suspect {
                    self.confirmed_dead += 1;
                    let f = MemberUpdate {
                        state: MemberState::Dead,
                        ..m.fact()
                    };
                    self.apply(now, f, out);
                }
            }
        }
        self.relays.retain(|r| r.expires > now);
        if !self.synced {
            if let Some(seed) = self.random_member(&[]) {
                out.push(SwimOut::Send(seed, PeerMsg::Join));
            }
        }
        // Every few periods, probe one member believed dead: after a
        // partition heals, members on each side buried the other and no
        // longer probe them; the link this opens shows the buried member
        // the fact (see `observed`) so it refutes.
        self.periods += 1;
        if self.periods.is_multiple_of(RECLAIM_EVERY) {
            if let Some(node) = self.random_dead() {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.send_probe(node, seq, out);
            }
        }
        if let Some(target) = self.next_target() {
            let seq = self.next_seq;
            self.next_seq += 1;
            self.probe = Some(Probe {
                target,
                seq,
                acked: false,
            });
            self.send_probe(target, seq, out);
            out.push(SwimOut::ProbeTimer(now.after(self.cfg.probe_timeout), seq));
        }
    }

    fn random_dead(&mut self) -> Option<NodeId> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        for _ in 0..8 {
            let i = (self.rand() % n as u64) as usize;
            if self.members[i].state == MemberState::Dead {
                return Some(self.members[i].node);
            }
        }
        None
    }

    fn random_member(&mut self, except: &[NodeId]) -> Option<NodeId> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        for _ in 0..8 {
            let i = (self.rand() % n as u64) as usize;
            let m = self.members[i];
            if m.probeable() && !except.contains(&m.node) {
                return Some(m.node);
            }
        }
        None
    }

    /// The direct probe `seq` timed out: ask members to probe indirectly.
    pub(crate) fn probe_timer(&mut self, seq: u64, out: &mut Vec<SwimOut>) {
        let Some(p) = &self.probe else { return };
        if p.seq != seq || p.acked {
            return;
        }
        let target = p.target;
        let mut asked: Vec<NodeId> = alloc::vec![target];
        for _ in 0..self.cfg.indirect_probes {
            let Some(via) = self.random_member(&asked) else {
                break;
            };
            asked.push(via);
            self.probes_sent += 1;
            let updates = self.piggyback();
            out.push(SwimOut::Send(
                via,
                PeerMsg::ProbeReq {
                    seq,
                    target,
                    updates,
                },
            ));
        }
    }

    /// A membership frame from `from` (authenticated by its link).
    pub(crate) fn on_msg(
        &mut self,
        now: Instant,
        from: NodeId,
        msg: PeerMsg,
        out: &mut Vec<SwimOut>,
    ) {
        match msg {
            PeerMsg::Probe { seq, updates } => {
                self.merge(now, &updates, out);
                let updates = self.piggyback();
                out.push(SwimOut::Send(from, PeerMsg::ProbeAck { seq, updates }));
            }
            PeerMsg::ProbeAck { seq, updates } => {
                self.merge(now, &updates, out);
                if let Some(p) = &mut self.probe {
                    if p.seq == seq {
                        p.acked = true;
                        return;
                    }
                }
                if let Some(i) = self.relays.iter().position(|r| r.seq == seq) {
                    let r = self.relays.swap_remove(i);
                    let updates = self.piggyback();
                    out.push(SwimOut::Send(
                        r.requester,
                        PeerMsg::ProbeAck {
                            seq: r.their_seq,
                            updates,
                        },
                    ));
                }
            }
            PeerMsg::ProbeReq {
                seq,
                target,
                updates,
            } => {
                self.merge(now, &updates, out);
                if target == self.me {
                    let updates = self.piggyback();
                    out.push(SwimOut::Send(from, PeerMsg::ProbeAck { seq, updates }));
                    return;
                }
                if self.relays.len() >= MAX_RELAYS {
                    return;
                }
                let mine = self.next_seq;
                self.next_seq += 1;
                self.relays.push(Relay {
                    seq: mine,
                    requester: from,
                    their_seq: seq,
                    expires: now.after(self.cfg.protocol_period),
                });
                self.send_probe(target, mine, out);
            }
            PeerMsg::Join => {
                let mut all: Vec<MemberUpdate> = self
                    .members
                    .iter()
                    .filter(|m| m.probeable())
                    .map(|m| m.fact())
                    .collect();
                all.push(self.my_fact());
                for chunk in all.chunks(MAX_MEMBERS_PER_FRAME) {
                    out.push(SwimOut::Send(
                        from,
                        PeerMsg::Members {
                            entries: chunk.to_vec(),
                        },
                    ));
                }
            }
            PeerMsg::Members { entries } => {
                self.synced = true;
                self.merge(now, &entries, out);
            }
            _ => {}
        }
    }

    /// This controller leaves: the fact to tell others before going.
    pub(crate) fn leave(&mut self) -> MemberUpdate {
        let f = MemberUpdate {
            state: MemberState::Left,
            seq: self.seq.saturating_add(1),
            ..self.my_fact()
        };
        self.enqueue(f);
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::{BTreeMap, BTreeSet, VecDeque};

    const MS: u64 = 1_000_000;

    fn cfg() -> Gossip {
        Gossip {
            protocol_period: Duration::from_millis(100),
            probe_timeout: Duration::from_millis(30),
            ..Gossip::default()
        }
    }

    /// N members exchanging frames with 1 ms latency; `dead` nodes neither
    /// answer nor probe.
    struct Net {
        nodes: Vec<Membership>,
        dead: BTreeSet<usize>,
        frames: VecDeque<(u64, usize, NodeId, PeerMsg)>,
        timers: Vec<(u64, usize, u64)>,
        lost: BTreeMap<usize, BTreeSet<NodeId>>,
        now: u64,
        sent: u64,
    }

    impl Net {
        fn new(n: usize, seeds_only: bool) -> Net {
            let all: Vec<NodeId> = (1..=n as u32).map(NodeId).collect();
            let nodes = (0..n)
                .map(|i| {
                    let initial = if seeds_only { &all[..1] } else { &all[..] };
                    Membership::new(NodeId(i as u32 + 1), 1, initial, cfg(), 7 + i as u64)
                })
                .collect();
            Net {
                nodes,
                dead: BTreeSet::new(),
                frames: VecDeque::new(),
                timers: Vec::new(),
                lost: BTreeMap::new(),
                now: 0,
                sent: 0,
            }
        }

        fn route(&mut self, i: usize, out: Vec<SwimOut>) {
            for o in out {
                match o {
                    SwimOut::Send(to, msg) => {
                        self.sent += 1;
                        self.frames.push_back((
                            self.now + MS,
                            to.0 as usize - 1,
                            NodeId(i as u32 + 1),
                            msg,
                        ))
                    }
                    SwimOut::ProbeTimer(at, seq) => self.timers.push((at.0, i, seq)),
                    SwimOut::Dead(n) => {
                        self.lost.entry(i).or_default().insert(n);
                    }
                    SwimOut::Restarted(_) => {}
                }
            }
        }

        /// Runs one protocol period in 1 ms steps.
        fn period(&mut self) {
            for i in 0..self.nodes.len() {
                if !self.dead.contains(&i) {
                    let mut out = Vec::new();
                    self.nodes[i].tick(Instant(self.now), &mut out);
                    self.route(i, out);
                }
            }
            for _ in 0..100 {
                self.now += MS;
                while self.frames.front().is_some_and(|f| f.0 <= self.now) {
                    let (_, to, from, msg) = self.frames.pop_front().expect("present");
                    if self.dead.contains(&to) {
                        continue;
                    }
                    let mut out = Vec::new();
                    self.nodes[to].on_msg(Instant(self.now), from, msg, &mut out);
                    self.route(to, out);
                }
                let due: Vec<(u64, usize, u64)> = self
                    .timers
                    .iter()
                    .filter(|t| t.0 <= self.now)
                    .copied()
                    .collect();
                self.timers.retain(|t| t.0 > self.now);
                for (_, i, seq) in due {
                    if !self.dead.contains(&i) {
                        let mut out = Vec::new();
                        self.nodes[i].probe_timer(seq, &mut out);
                        self.route(i, out);
                    }
                }
            }
        }

        fn all_know_dead(&self, d: usize) -> bool {
            (0..self.nodes.len())
                .filter(|i| !self.dead.contains(i))
                .all(|i| self.nodes[i].state(NodeId(d as u32 + 1)) == Some(MemberState::Dead))
        }
    }

    #[test]
    fn fault_free_cluster_confirms_nobody_dead() {
        let mut net = Net::new(32, false);
        for _ in 0..60 {
            net.period();
        }
        assert!(net.lost.is_empty(), "{:?}", net.lost);
        for m in &net.nodes {
            assert_eq!(m.live(), 32);
        }
        // About one probe and one ack per member per period, plus the
        // startup gossip: the traffic does not depend on who is probed.
        assert!(net.sent <= 60 * 32 * 2 + 64, "{} frames", net.sent);
    }

    #[test]
    fn failure_is_known_by_every_member_within_log_periods() {
        let mut net = Net::new(64, false);
        for _ in 0..5 {
            net.period();
        }
        net.dead.insert(17);
        let mut periods = 0;
        while !net.all_know_dead(17) {
            net.period();
            periods += 1;
            assert!(periods < 60, "not detected after {periods} periods");
        }
        // Suspicion lasts 4 × ⌈log10 64⌉ = 8 periods; detection and
        // dissemination add a few.
        assert!(
            periods >= 8,
            "confirmed before the suspicion timeout: {periods}"
        );
        // Nobody else was confirmed dead, and every live member reported
        // the dead one exactly through `SwimOut::Dead`.
        for (i, lost) in &net.lost {
            assert_eq!(
                lost.iter().copied().collect::<Vec<_>>(),
                [NodeId(18)],
                "node {i}"
            );
        }
        assert_eq!(net.lost.len(), 63);
    }

    #[test]
    fn suspected_member_refutes_and_stays_alive() {
        let mut net = Net::new(8, false);
        net.period();
        // Node 2 is wrongly suspected by node 1.
        let f = MemberUpdate {
            node: NodeId(2),
            incarnation: 1,
            seq: 0,
            state: MemberState::Suspect,
        };
        let mut out = Vec::new();
        net.nodes[0].apply(Instant(net.now), f, &mut out);
        net.route(0, out);
        for _ in 0..30 {
            net.period();
        }
        assert!(net.lost.is_empty(), "{:?}", net.lost);
        assert!(net.nodes[1].seq >= 1, "node 2 refuted");
        for m in &net.nodes {
            assert_eq!(m.state(NodeId(2)), Some(MemberState::Alive));
        }
    }

    #[test]
    fn members_join_from_one_seed_and_learn_the_whole_view() {
        let mut net = Net::new(40, true);
        for _ in 0..20 {
            net.period();
        }
        for (i, m) in net.nodes.iter().enumerate() {
            assert_eq!(m.live(), 40, "node {} knows {}", i + 1, m.live());
        }
        assert!(net.lost.is_empty());
    }

    #[test]
    fn restart_with_a_new_incarnation_is_reported() {
        let mut m = Membership::new(NodeId(1), 1, &[NodeId(2)], cfg(), 1);
        let mut out = Vec::new();
        m.observed(Instant(0), NodeId(2), 5, &mut out);
        assert!(out.is_empty());
        m.observed(Instant(0), NodeId(2), 6, &mut out);
        assert_eq!(out, [SwimOut::Restarted(NodeId(2))]);
        // A stale fact about the old incarnation changes nothing.
        out.clear();
        let stale = MemberUpdate {
            node: NodeId(2),
            incarnation: 5,
            seq: 9,
            state: MemberState::Dead,
        };
        assert!(!m.apply(Instant(0), stale, &mut out));
        assert_eq!(m.state(NodeId(2)), Some(MemberState::Alive));
    }

    #[test]
    fn piggyback_is_bounded_and_each_fact_retires() {
        let mut m = Membership::new(NodeId(1), 1, &[], cfg(), 1);
        let mut out = Vec::new();
        for n in 2..100 {
            m.apply(
                Instant(0),
                MemberUpdate {
                    node: NodeId(n),
                    incarnation: 1,
                    seq: 0,
                    state: MemberState::Alive,
                },
                &mut out,
            );
        }
        let mut rounds = 0;
        while m.queued() > 0 {
            assert!(m.piggyback().len() <= MAX_PIGGYBACK);
            rounds += 1;
            assert!(rounds < 1000);
        }
        // 99 facts × 3 × ⌈log2 101⌉ transmissions, 16 per frame.
        assert!(rounds <= 99 * 3 * 7 / 16 + 2, "{rounds}");
    }

    #[test]
    fn a_claim_about_incarnation_zero_applies_to_the_running_one() {
        // Node 1 linked with node 2 (knows incarnation 5); node 3 knows
        // node 2 only from its configuration and suspects it.
        let mut m = Membership::new(NodeId(1), 1, &[NodeId(2), NodeId(3)], cfg(), 1);
        let mut out = Vec::new();
        m.observed(Instant(0), NodeId(2), 5, &mut out);
        let claim = |state| MemberUpdate {
            node: NodeId(2),
            incarnation: 0,
            seq: 0,
            state,
        };
        // A death claim about incarnation 0 may be stale news of an
        // earlier incarnation: not applied to the known one.
        assert!(!m.apply(Instant(0), claim(MemberState::Dead), &mut out));
        assert_eq!(m.state(NodeId(2)), Some(MemberState::Alive));
        assert!(m.apply(Instant(0), claim(MemberState::Suspect), &mut out));
        assert_eq!(m.state(NodeId(2)), Some(MemberState::Suspect));
        assert_eq!(m.incarnation(NodeId(2)), 5, "no restart was invented");
        // Its own suspicion timer confirms it.
        m.tick(Instant(60_000_000_000), &mut out);
        assert!(out.contains(&SwimOut::Dead(NodeId(2))), "{out:?}");
        assert_eq!(m.state(NodeId(2)), Some(MemberState::Dead));
        // Such a claim about this node makes it refute.
        let mut me = Membership::new(NodeId(2), 5, &[NodeId(1)], cfg(), 1);
        let about_me = MemberUpdate {
            node: NodeId(2),
            ..claim(MemberState::Suspect)
        };
        me.apply(Instant(0), about_me, &mut out);
        assert_eq!(me.seq, 1);
    }
}
