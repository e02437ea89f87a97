//! The controller state machine: process channels, peer links, operations.

use alloc::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cmp::Reverse;

use fractos_wire::{
    CapInfo, CapRef, ControllerMsg, DecodeError, DeriveSpec, ErrorCode, Handle, MemberState,
    NodeId, ObjectKind, PeerMsg, PeerReply, PeerRequest, PeerSecurity, ProcessMsg, Reply, Rights,
    PROTOCOL_VERSION,
};
use slotmap::SlotMap;

use crate::auth::{self, HelloPart, NonceSource, Role, Session};
use crate::caps::{key_from_u64, key_to_u64, Binds, CapStore, DeriveKind, Fallout, Holder};
use crate::copy::CopyEngine;
use crate::effects::{Effect, Effects, Origin, SourceKey, Timer};
use crate::membership::{Membership, SwimOut};
use crate::metrics::{Metrics, OpKind};
use crate::names::{name_home, NameService};
use crate::table::{Entry, HandleTable};
use crate::{
    CapKey, ChannelId, CloseReason, Config, Dest, DeviceWrite, Instant, LinkId, LinkRole,
    MemAccess, MembershipStats, MonitorKey, ObjectKey, Output, ProcessKey, Stats,
};

slotmap::new_key_type! {
    /// Key of an in-progress capability acquisition.
    struct AggKey;
}

/// An attached (or attaching) process.
struct Process {
    chan: ChannelId,
    /// Controller-unique sequence number (publisher id in the name service).
    seq: u64,
    attached: bool,
    table: HandleTable,
    objects: BTreeSet<ObjectKey>,
    pending: usize,
    /// Controllers where this process may have monitors registered; told
    /// to drop them at exit.
    monitor_nodes: BTreeSet<NodeId>,
    /// Request ids of this process's waiting lookups (in `calls`), cancelled
    /// at the name's home at exit.
    lookups: BTreeSet<u64>,
}

/// A monitor registration at the owner of the watched capability.
struct MonitorReg {
    /// Request invoked when the watched node dies (held by this node).
    notify: CapRef,
    /// The capability node the registration holds.
    node: CapKey,
    /// Registering process: its node and sequence number there.
    watcher: (NodeId, u64),
}

/// What to do with the reply to a request this controller sent.
enum Waiter {
    /// Pass the result to the origin (installing a returned capability).
    Answer(Origin),
    /// A waiting lookup of a local process: as `Answer`, and the request
    /// leaves the process's `lookups`.
    Lookup(Origin),
    /// A publish of a local process: as `Answer`, and its published list
    /// learns the outcome.
    Published {
        origin: Origin,
        name: Vec<u8>,
        /// Epoch of the list entry when the publish was sent.
        sent: u32,
    },
    /// One capability of an acquisition.
    Acquire { agg: AggKey, index: usize },
    /// A copy finished at the source owner; then maybe invoke `completion`.
    CopyStarted {
        origin: Origin,
        completion: Option<CapRef>,
    },
    /// The destination accepted (or refused) a copy.
    CopyOpened { source: SourceKey },
    /// Release `cap` once the request is answered (monitor notifications).
    ReleaseAfter(CapRef),
    /// Nobody waits (withdrawals at exit).
    Ignore,
}

struct Call {
    node: NodeId,
    deadline: Instant,
    waiter: Waiter,
}

/// What to do once every capability of an acquisition is held.
enum Then {
    RequestCreate {
        origin: Origin,
        tag: u64,
        imms: Vec<u8>,
    },
    Derive {
        origin: Origin,
        parent: CapRef,
        imms: Vec<u8>,
    },
    Invoke {
        origin: Origin,
        target: CapRef,
        imms: Vec<u8>,
    },
    Monitor {
        origin: Origin,
        cap: CapRef,
    },
    Publish {
        origin: Origin,
        home: NodeId,
        name: Vec<u8>,
        publisher: u64,
    },
    Deliver {
        origin: Origin,
        proc: ProcessKey,
        tag: u64,
        imms: Vec<u8>,
        invoker: Vec<(CapRef, CapInfo)>,
    },
    ServeLookup {
        origin: Origin,
    },
}

impl Then {
    fn origin(&self) -> Origin {
        match self {
            Then::RequestCreate { origin, .. }
            | Then::Derive { origin, .. }
            | Then::Invoke { origin, .. }
            | Then::Monitor { origin, .. }
            | Then::Publish { origin, .. }
            | Then::Deliver { origin, .. }
            | Then::ServeLookup { origin } => *origin,
        }
    }
}

struct Agg {
    results: Vec<Option<(CapRef, CapInfo)>>,
    waiting: usize,
    error: Option<ErrorCode>,
    then: Then,
}

/// Where a link's handshake stands (see the `auth` module).
enum LinkState {
    /// Initiator: `Hello` sent, waiting for `HelloReply`.
    HelloSent { expect: NodeId, nonce: [u8; 32] },
    /// Responder: waiting for `Hello`.
    AwaitHello,
    /// Responder: `HelloReply` sent, waiting for `Finish`.
    ReplySent {
        peer: NodeId,
        incarnation: u64,
        transcript: [u8; 32],
        security: PeerSecurity,
    },
    /// Responder: answered `Yield` to a simultaneous dial; the initiator
    /// closes the link (closing it here could lose the `Yield`).
    Yielded,
    /// Authenticated: every frame is sealed with the session's keys.
    Up {
        node: NodeId,
        incarnation: u64,
        session: Session,
    },
}

/// Where closing an idle link stands (gossip mode only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bye {
    /// In use.
    None,
    /// This side proposed closing and has sent nothing since.
    Sent,
    /// This side agreed to the peer's proposal and sends nothing more on
    /// the link (frames wait in the queue) until the peer closes it or
    /// sends something.
    Acked,
}

struct Link {
    state: LinkState,
    opened: Instant,
    last_rx: Instant,
    /// This controller dialled the link.
    initiated: bool,
    /// Last frame other than heartbeats and closing, either way.
    last_use: Instant,
    bye: Bye,
    /// This side proposed closing and has not seen the answer yet (it may
    /// have resumed since: then it tells the peer, see `ByeOk`).
    proposed: bool,
}

/// A dial the core asked the driver for (gossip mode).
struct Dial {
    /// The handshake must have finished by then.
    deadline: Instant,
    /// The link the driver reported for it.
    link: Option<LinkId>,
    /// The peer answered `Yield`: its own dial to us is the link to use.
    yielded: bool,
}

impl Link {
    fn peer(&self) -> Option<NodeId> {
        match self.state {
            LinkState::Up { node, .. } => Some(node),
            _ => None,
        }
    }
    fn graceful(&self) -> bool {
        self.bye != Bye::None
    }
}

struct Peer {
    link: LinkId,
}

/// A snapshot of one capability node, for tests and the simulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapDebug {
    /// Parent capability, if any.
    pub parent: Option<CapRef>,
    /// Object kind.
    pub kind: ObjectKind,
    /// Channel of the owning process.
    pub owner: ChannelId,
    /// Absolute start address of the window in the owner's memory (Memory).
    pub addr: u64,
    /// Window length (Memory).
    pub len: u64,
    /// Rights.
    pub rights: Rights,
}

/// The sans-IO controller. See the crate documentation for the protocol.
pub struct Controller {
    cfg: Config,
    store: CapStore,
    procs: SlotMap<ProcessKey, Process>,
    chans: BTreeMap<ChannelId, ProcessKey>,
    links: BTreeMap<LinkId, Link>,
    peers: BTreeMap<NodeId, Peer>,
    calls: BTreeMap<u64, Call>,
    next_req: u64,
    aggs: SlotMap<AggKey, Agg>,
    monitors: SlotMap<MonitorKey, MonitorReg>,
    /// Monitor registrations by registering process.
    watchers: BTreeMap<(NodeId, u64), BTreeSet<MonitorKey>>,
    /// The copy engine.
    copy: CopyEngine,
    /// The name service.
    names: NameService,
    /// Effects pushed by `copy` and `names`, applied by `apply_effects`.
    fx: Effects,
    /// Memory accesses for the driver to perform (direct channels).
    mem_access: VecDeque<MemAccess>,
    timers: BinaryHeap<Reverse<(Instant, Timer)>>,
    outputs: VecDeque<Output>,
    loopback: VecDeque<(NodeId, PeerMsg)>,
    fallout: Vec<Fallout>,
    nonces: NonceSource,
    /// Reused buffer for decrypting `Secure` peer frames.
    open_scratch: Vec<u8>,
    now: Instant,
    next_seq: u64,
    metrics: Metrics,
    /// Gossip membership (gossip mode).
    swim: Option<Membership>,
    /// Dials in progress (gossip mode).
    dials: BTreeMap<NodeId, Dial>,
    /// Frames waiting for a link to their peer (gossip mode).
    outq: BTreeMap<NodeId, Vec<PeerMsg>>,
    /// Requests from each peer not answered yet.
    owed: BTreeMap<NodeId, u32>,
    dials_started: u64,
    idle_closed: u64,
}

impl Controller {
    /// A controller with no processes and no links, at time `now`.
    pub fn new(cfg: Config, now: Instant) -> Self {
        let mut members = cfg.members.clone();
        if !members.contains(&cfg.node) {
            members.push(cfg.node);
        }
        members.sort();
        members.dedup();
        let nonces = NonceSource::new(&cfg.cluster_key, &cfg.rng_seed, cfg.node, cfg.incarnation);
        // A chunk must fit one MemRead answer; at least one chunk in flight.
        let copy_chunk = cfg.copy_chunk.clamp(1, fractos_wire::MAX_DATA_LEN);
        let copy_window = cfg.copy_window.max(1);
        let copy = CopyEngine::new(copy_chunk, copy_window, cfg.op_timeout);
        let names = NameService::new(cfg.limits.max_names_per_process);
        let mut c = Controller {
            cfg: Config {
                members,
                copy_chunk,
                copy_window,
                ..cfg
            },
            store: CapStore::default(),
            procs: SlotMap::with_key(),
            chans: BTreeMap::new(),
            links: BTreeMap::new(),
            peers: BTreeMap::new(),
            calls: BTreeMap::new(),
            next_req: 1,
            aggs: SlotMap::with_key(),
            monitors: SlotMap::with_key(),
            watchers: BTreeMap::new(),
            copy,
            names,
            fx: Effects::new(),
            mem_access: VecDeque::new(),
            timers: BinaryHeap::new(),
            outputs: VecDeque::new(),
            loopback: VecDeque::new(),
            fallout: Vec::new(),
            nonces,
            open_scratch: Vec::new(),
            now,
            next_seq: 1,
            metrics: Metrics::default(),
            swim: None,
            dials: BTreeMap::new(),
            outq: BTreeMap::new(),
            owed: BTreeMap::new(),
            dials_started: 0,
            idle_closed: 0,
        };
        let hb = now.after(c.cfg.heartbeat_interval);
        c.timers.push(Reverse((hb, Timer::Heartbeat)));
        if let Some(g) = c.cfg.gossip.clone() {
            let mut seed = [0u8; 8];
            seed.copy_from_slice(&c.cfg.rng_seed[..8]);
            let seed = u64::from_le_bytes(seed) ^ (c.cfg.node.0 as u64).wrapping_mul(0x9e37_79b9);
            // Members start their periods at different phases.
            let period = g.protocol_period.as_nanos().max(1) as u64;
            let first = now.after(core::time::Duration::from_nanos(1 + seed % period));
            c.swim = Some(Membership::new(
                c.cfg.node,
                c.cfg.incarnation,
                &c.cfg.members,
                g,
                seed,
            ));
            c.timers.push(Reverse((first, Timer::Swim)));
        }
        c
    }

    /// This controller's node id.
    pub fn node(&self) -> NodeId {
        self.cfg.node
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The authenticated peer behind a link, if any.
    pub fn link_peer(&self, link: LinkId) -> Option<NodeId> {
        self.links.get(&link)?.peer()
    }

    /// The protection in force on an authenticated link.
    pub fn link_security(&self, link: LinkId) -> Option<PeerSecurity> {
        match &self.links.get(&link)?.state {
            LinkState::Up { session, .. } => Some(session.security()),
            _ => None,
        }
    }

    /// Counters since start.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    // ----------------------------------------------------------------- inputs

    /// A process opened a channel. It must send `Attach` first.
    pub fn process_connected(&mut self, now: Instant, chan: ChannelId) {
        self.now = now;
        if self.chans.contains_key(&chan) {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let p = self.procs.insert(Process {
            chan,
            seq,
            attached: false,
            table: HandleTable::default(),
            objects: BTreeSet::new(),
            pending: 0,
            monitor_nodes: BTreeSet::new(),
            lookups: BTreeSet::new(),
        });
        self.chans.insert(chan, p);
        if self.procs.len() > self.cfg.limits.max_processes {
            self.kick(p, ErrorCode::LimitReached, CloseReason::LimitReached);
        }
        self.drain();
    }

    /// A process channel closed (or the process exited). Everything the
    /// process owns is revoked and everything it holds released.
    pub fn process_disconnected(&mut self, now: Instant, chan: ChannelId) {
        self.now = now;
        if let Some(p) = self.chans.get(&chan).copied() {
            self.exit_process(p);
        }
        self.drain();
    }

    /// One frame body from a process.
    pub fn process_message(&mut self, now: Instant, chan: ChannelId, body: &[u8]) {
        self.now = now;
        if let Some(p) = self.chans.get(&chan).copied() {
            self.on_process_message(p, body);
        }
        self.drain();
    }

    /// A link to another controller is up; the handshake starts. The side
    /// that dialled is the [`LinkRole::Initiator`] and names the node it
    /// meant to reach; the side that accepted is the responder.
    pub fn link_connected(&mut self, now: Instant, link: LinkId, role: LinkRole) {
        self.now = now;
        let state = match role {
            LinkRole::Initiator { peer } => LinkState::HelloSent {
                expect: peer,
                nonce: self.nonces.next(),
            },
            LinkRole::Responder => LinkState::AwaitHello,
        };
        let hello = match &state {
            LinkState::HelloSent { expect, nonce } => Some(PeerMsg::Hello {
                node: self.cfg.node,
                incarnation: self.cfg.incarnation,
                nonce: *nonce,
                responder: *expect,
                security: self.cfg.peer_security,
            }),
            _ => None,
        };
        if let LinkRole::Initiator { peer } = role {
            if let Some(d) = self.dials.get_mut(&peer) {
                d.link = Some(link);
            }
        }
        self.links.insert(
            link,
            Link {
                state,
                opened: now,
                last_rx: now,
                initiated: matches!(role, LinkRole::Initiator { .. }),
                last_use: now,
                bye: Bye::None,
                proposed: false,
            },
        );
        if let Some(hello) = hello {
            self.send_link(link, &hello);
        }
        self.drain();
    }

    /// A link closed.
    pub fn link_disconnected(&mut self, now: Instant, link: LinkId) {
        self.now = now;
        self.forget_link(link);
        self.drain();
    }

    /// A dial asked for by [`Output::Connect`] failed (refused, no route,
    /// timed out). Requests waiting for the link fail with
    /// `PeerUnreachable`; one-way frames wait for a later dial.
    pub fn dial_failed(&mut self, now: Instant, peer: NodeId) {
        self.now = now;
        self.abandon_dial(peer);
        self.drain();
    }

    /// Gives up the dial to `peer`: closes its link if still in handshake
    /// and fails the requests waiting for it.
    fn abandon_dial(&mut self, peer: NodeId) {
        let Some(d) = self.dials.remove(&peer) else {
            return;
        };
        if let Some(l) = d.link {
            if self.links.get(&l).is_some_and(|l| l.peer().is_none()) {
                self.links.remove(&l);
                self.outputs.push_back(Output::Close {
                    to: Dest::Link(l),
                    reason: CloseReason::PeerTimeout,
                });
            }
        }
        self.fail_queued_requests(peer);
    }

    /// What the gossip membership believes of `node` (`None`: unknown, or
    /// gossip is off).
    pub fn member_state(&self, node: NodeId) -> Option<MemberState> {
        self.swim.as_ref()?.state(node)
    }

    /// The membership view: every other member with its incarnation and
    /// state (empty when gossip is off).
    pub fn members(&self) -> Vec<(NodeId, u64, MemberState)> {
        self.swim
            .as_ref()
            .map(|m| m.view().collect())
            .unwrap_or_default()
    }

    /// Links open (authenticated or in handshake); cheaper than
    /// [`Controller::membership_stats`].
    pub fn link_count(&self) -> usize {
        self.links.len()
    }

    /// Frames other than gossip waiting for a link; cheaper than
    /// [`Controller::membership_stats`].
    pub fn queued_frames(&self) -> usize {
        self.outq
            .values()
            .map(|q| q.iter().filter(|m| !is_gossip(m)).count())
            .sum()
    }

    /// Membership and link counts (walks the view: O(members)).
    pub fn membership_stats(&self) -> MembershipStats {
        let m = self.swim.as_ref();
        MembershipStats {
            live: m.map_or(0, |m| m.live()),
            known: m.map_or(0, |m| m.view().count()),
            links: self.links.len(),
            dials: self.dials.len(),
            queued: self.queued_frames(),
            gossip_queue: m.map_or(0, |m| m.queued()),
            confirmed_dead: m.map_or(0, |m| m.confirmed_dead),
            probes_sent: m.map_or(0, |m| m.probes_sent),
            dials_started: self.dials_started,
            idle_closed: self.idle_closed,
        }
    }

    /// Leaves the cluster on purpose (gossip mode): tells a few members,
    /// who spread it, so the others do not wait for the failure detector.
    /// The driver stops the controller afterwards.
    pub fn leave(&mut self, now: Instant) {
        self.now = now;
        let Some(m) = self.swim.as_mut() else { return };
        let fact = m.leave();
        let peers: Vec<NodeId> = m
            .view()
            .filter(|(_, _, s)| matches!(s, MemberState::Alive | MemberState::Suspect))
            .map(|(n, _, _)| n)
            .take(3)
            .collect();
        for node in peers {
            self.send_peer(
                node,
                PeerMsg::Probe {
                    seq: 0,
                    updates: vec![fact],
                },
            );
        }
        self.drain();
    }

    /// One frame body from a peer link.
    pub fn link_message(&mut self, now: Instant, link: LinkId, body: &[u8]) {
        self.now = now;
        self.on_link_message(link, body);
        self.drain();
    }

    /// Call when [`Controller::poll_timeout`]'s deadline has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        while let Some(Reverse((at, t))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            self.on_timer(at, t);
        }
        self.drain();
    }

    /// Declares whether the driver serves the memory of the process on
    /// `chan` itself (a shared-memory region the controller maps, an RDMA
    /// memory region): copy chunks from or to it are then handed to the
    /// driver by [`Controller::poll_mem_access`] instead of being sent to
    /// the process as `MemRead` / `MemWrite` messages. Transfers already
    /// issued keep their path. Returns `false` if no process is on `chan`.
    ///
    /// The core still validates both capabilities of a copy for every
    /// chunk; the driver only moves bytes at the addresses it is given
    /// (absolute addresses in the process's registered memory, as in the
    /// messages).
    pub fn set_direct_memory(&mut self, chan: ChannelId, direct: bool) -> bool {
        match self.chans.get(&chan) {
            Some(p) => {
                self.copy.set_direct(*p, direct);
                true
            }
            None => false,
        }
    }

    /// The driver performed [`MemAccess::Read`] `xfer` on `chan`: `data` is
    /// the bytes read, or an error (e.g. `MemoryFault`). Unknown, repeated
    /// or late completions are ignored.
    pub fn mem_read_done(
        &mut self,
        now: Instant,
        chan: ChannelId,
        xfer: u64,
        data: Result<Vec<u8>, ErrorCode>,
    ) {
        self.now = now;
        if let Some(p) = self.chans.get(&chan).copied() {
            self.read_done(p, xfer, true, data);
        }
        self.drain();
    }

    /// The driver performed [`MemAccess::Write`] `xfer` on `chan`, with
    /// this result. Unknown, repeated or late completions are ignored.
    pub fn mem_write_done(
        &mut self,
        now: Instant,
        chan: ChannelId,
        xfer: u64,
        result: Result<(), ErrorCode>,
    ) {
        self.now = now;
        if let Some(p) = self.chans.get(&chan).copied() {
            self.write_done(p, xfer, true, result);
        }
        self.drain();
    }

    /// Lets the driver's own device write `len` bytes at the start of the
    /// window of `handle`, a Memory capability held by the process on
    /// `holder`, straight into the owner's memory (DMA into a shared-memory
    /// slot instead of a copy). The capability is validated like a copy's
    /// destination: a live Memory capability owned here with the WRITE
    /// right and at least `len` bytes, whose owner's memory the driver
    /// serves directly ([`Controller::set_direct_memory`]); otherwise the
    /// error (`InvalidArgument` for a remote or not directly reachable
    /// owner, or a zero `len`).
    ///
    /// The grant is held like a copy's write in flight: a revoke of the
    /// capability completes only once the grant has ended. Check
    /// [`Controller::device_write_valid`] before each device command and
    /// end the grant with [`Controller::device_write_end`] once nothing of
    /// it is in flight.
    pub fn device_write_begin(
        &mut self,
        now: Instant,
        holder: ChannelId,
        handle: Handle,
        len: u64,
    ) -> Result<DeviceWrite, ErrorCode> {
        self.now = now;
        let proc = *self.chans.get(&holder).ok_or(ErrorCode::NotAttached)?;
        let e = self.entry(proc, handle)?;
        if e.info.kind != ObjectKind::Memory {
            return Err(ErrorCode::WrongType);
        }
        if !e.info.rights.contains(Rights::WRITE) {
            return Err(ErrorCode::MissingRight);
        }
        if len == 0 || !self.is_local(&e.cap) {
            return Err(ErrorCode::InvalidArgument);
        }
        let key = self.resolve_local(&e.cap)?;
        let (owner, addr, wlen) = self.store.memory_window(key, Rights::WRITE)?;
        if wlen < len {
            return Err(ErrorCode::SizeMismatch);
        }
        if !self.copy.is_direct(owner) {
            return Err(ErrorCode::InvalidArgument);
        }
        let chan = self.procs.get(owner).ok_or(ErrorCode::OwnerGone)?.chan;
        let id = self.copy.device_write_begin(key, len, owner);
        Ok(DeviceWrite { id, chan, addr })
    }

    /// Whether device write `id` may go on: its capability is alive and
    /// its owner still attached. Check before every device command.
    pub fn device_write_valid(&self, id: u64) -> bool {
        self.copy.device_write_valid(id, &self.store)
    }

    /// Device write `id` ended; `ok`: the device wrote every byte. `Ok`
    /// only if the capability stayed alive and the owner attached
    /// throughout (then the bytes count as delivered); `Revoked` otherwise,
    /// `MemoryFault` if the device failed. Revokes held for it complete.
    pub fn device_write_end(&mut self, now: Instant, id: u64, ok: bool) -> Result<(), ErrorCode> {
        self.now = now;
        let r = self
            .copy
            .device_write_end(id, ok, &self.store, &mut self.fx);
        self.apply_effects();
        self.drain();
        r
    }

    // ---------------------------------------------------------------- outputs

    /// The next thing to do, in order.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// The next memory access for the driver to perform on a channel set
    /// with [`Controller::set_direct_memory`], in order; complete each with
    /// [`Controller::mem_read_done`] or [`Controller::mem_write_done`].
    /// Poll it, like [`Controller::poll_output`], after every input.
    #[must_use]
    pub fn poll_mem_access(&mut self) -> Option<MemAccess> {
        self.mem_access.pop_front()
    }

    /// When [`Controller::handle_timeout`] must be called next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    // ---------------------------------------------------------- introspection

    /// What the controller holds.
    pub fn stats(&self) -> Stats {
        Stats {
            processes: self.procs.len(),
            objects: self.store.objects.len(),
            caps: self.store.nodes.len(),
            handles: self.procs.values().map(|p| p.table.len()).sum(),
            names: self.names.names(),
            name_waiters: self.names.waiters(),
            calls: self.calls.len(),
            copy_sources: self.copy.sources(),
            copy_sinks: self.copy.sinks(),
            monitors: self.monitors.len(),
            peers: self.peers.len(),
            pending_ops: self.procs.values().map(|p| p.pending).sum(),
            pending_ops_max: self.procs.values().map(|p| p.pending).max().unwrap_or(0),
            monitors_max_per_watcher: self.watchers.values().map(|s| s.len()).max().unwrap_or(0),
            published_names: self.names.published().0,
            published_names_max: self.names.published().1,
            waiting_lookups: self.procs.values().map(|p| p.lookups.len()).sum(),
            waiting_lookups_max: self
                .procs
                .values()
                .map(|p| p.lookups.len())
                .max()
                .unwrap_or(0),
        }
    }

    /// The reference behind a process's handle.
    pub fn debug_handle(&self, chan: ChannelId, handle: Handle) -> Option<(CapRef, CapInfo)> {
        let p = self.chans.get(&chan)?;
        self.procs[*p].table.get(handle).map(|e| (e.cap, e.info))
    }

    /// A capability node owned here, if it is alive.
    pub fn debug_cap(&self, cap: CapRef) -> Option<CapDebug> {
        let key = self.resolve_local(&cap).ok()?;
        let n = &self.store.nodes[key];
        let o = &self.store.objects[n.object];
        Some(CapDebug {
            parent: n.parent.map(|p| self.cap_ref(p)),
            kind: o.kind,
            owner: self
                .procs
                .get(o.owner)
                .map(|p| p.chan)
                .unwrap_or(ChannelId(u64::MAX)),
            addr: o.addr + n.offset(),
            len: n.len(),
            rights: n.rights,
        })
    }

    /// Checks internal invariants: derivation trees are consistent, rights
    /// and windows shrink along derivations, every process-held node is in
    /// its holder's table, and no node is leaked; no monitor registration
    /// or waiting lookup of an exited local process remains, and published
    /// name lists stay within their limit and hold only live entries.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.store.check()?;
        let mut held = 0usize;
        for (pk, p) in &self.procs {
            for (h, e) in p.table.iter() {
                if let Ok(key) = self.resolve_local(&e.cap) {
                    let n = &self.store.nodes[key];
                    if n.holder != Holder::Process(pk) {
                        return Err(alloc::format!(
                            "handle {h:?} of {:?} names a node held by {:?}",
                            p.chan,
                            n.holder
                        ));
                    }
                    held += 1;
                }
            }
            for o in &p.objects {
                match self.store.objects.get(*o) {
                    Some(obj) if obj.owner == pk => {}
                    _ => {
                        return Err(alloc::format!(
                            "{:?} lists a dead or foreign object",
                            p.chan
                        ))
                    }
                }
            }
        }
        let by_procs = self
            .store
            .nodes
            .values()
            .filter(|n| matches!(n.holder, Holder::Process(_)))
            .count();
        if by_procs != held {
            return Err(alloc::format!(
                "{by_procs} nodes are held by processes but only {held} handles name them"
            ));
        }
        for n in self.store.nodes.values() {
            if let Holder::Process(p) = n.holder {
                if !self.procs.contains_key(p) {
                    return Err("a node is held by an exited process".into());
                }
            }
            if let Holder::Monitor(m) = n.holder {
                if !self.monitors.contains_key(m) {
                    return Err("a monitor node has no registration".into());
                }
            }
        }
        if self.monitors.len()
            != self
                .store
                .nodes
                .values()
                .filter(|n| matches!(n.holder, Holder::Monitor(_)))
                .count()
        {
            return Err("monitor registrations without nodes".into());
        }
        self.check_lifetimes()
    }

    /// No monitor, waiting lookup or published-name entry outlives the
    /// process that created it, and the indexes agree with what they index.
    fn check_lifetimes(&self) -> Result<(), String> {
        let local_seqs: BTreeMap<u64, ProcessKey> =
            self.procs.iter().map(|(k, p)| (p.seq, k)).collect();
        let mut indexed = 0usize;
        for (who, set) in &self.watchers {
            if set.is_empty() {
                return Err(alloc::format!("empty monitor index entry for {who:?}"));
            }
            if who.0 == self.cfg.node && !local_seqs.contains_key(&who.1) {
                return Err(alloc::format!(
                    "{} monitors registered by exited local process {}",
                    set.len(),
                    who.1
                ));
            }
            for m in set {
                match self.monitors.get(*m) {
                    Some(reg) if reg.watcher == *who => {}
                    _ => return Err(alloc::format!("monitor index of {who:?} is stale")),
                }
            }
            indexed += set.len();
        }
        if indexed != self.monitors.len() {
            return Err("monitor registrations missing from the watcher index".into());
        }
        for (m, reg) in &self.monitors {
            if self.store.nodes.get(reg.node).map(|n| n.holder) != Some(Holder::Monitor(m)) {
                return Err("a monitor registration does not hold its node".into());
            }
        }
        let local_waits = |req: u64| match self.calls.get(&req).map(|c| &c.waiter) {
            Some(Waiter::Lookup(Origin::Proc { proc, .. })) => self
                .procs
                .get(*proc)
                .is_some_and(|p| p.lookups.contains(&req)),
            _ => false,
        };
        let proc_name = |k: ProcessKey| self.procs.get(k).map(|p| alloc::format!("{:?}", p.chan));
        self.names.check(self.cfg.node, local_waits, proc_name)?;
        for p in self.procs.values() {
            for req in &p.lookups {
                if !self.calls.contains_key(req) {
                    return Err(alloc::format!(
                        "{:?} lists lookup {req} that is not pending",
                        p.chan
                    ));
                }
            }
        }
        Ok(())
    }

    // -------------------------------------------------------------- internals

    fn cap_ref(&self, key: CapKey) -> CapRef {
        CapRef {
            node: self.cfg.node,
            incarnation: self.cfg.incarnation,
            cap: key_to_u64(key),
        }
    }

    fn is_local(&self, cap: &CapRef) -> bool {
        cap.node == self.cfg.node
    }

    /// Resolves a reference to a node owned here.
    fn resolve_local(&self, cap: &CapRef) -> Result<CapKey, ErrorCode> {
        if cap.node != self.cfg.node {
            return Err(ErrorCode::InvalidArgument);
        }
        if cap.incarnation != self.cfg.incarnation {
            return Err(ErrorCode::OwnerGone);
        }
        let key: CapKey = key_from_u64(cap.cap);
        if self.store.nodes.contains_key(key) {
            Ok(key)
        } else {
            Err(ErrorCode::Revoked)
        }
    }

    fn push_timer(&mut self, at: Instant, t: Timer) {
        self.timers.push(Reverse((at, t)));
    }

    fn send_process(&mut self, proc: ProcessKey, msg: &ControllerMsg) {
        if let Some(p) = self.procs.get(proc) {
            let mut frame = Vec::with_capacity(frame_capacity_hint(msg));
            msg.encode(&mut frame);
            self.outputs.push_back(Output::Send {
                to: Dest::Process(p.chan),
                frame,
            });
        }
    }

    fn send_link(&mut self, link: LinkId, msg: &PeerMsg) {
        let mut frame = Vec::with_capacity(match msg {
            PeerMsg::CopyChunk { data, .. } => data.len() + 32 + auth::SEAL_OVERHEAD,
            _ => 128,
        });
        msg.encode(&mut frame);
        let use_ = is_use(msg);
        if let Some(l) = self.links.get_mut(&link) {
            if use_ {
                l.last_use = self.now;
                if l.bye == Bye::Sent {
                    l.bye = Bye::None;
                }
            }
            if let LinkState::Up { session, .. } = &mut l.state {
                session.seal(&mut frame);
            }
        }
        self.metrics.peer_frames_out += 1;
        self.metrics.peer_bytes_out += frame.len() as u64;
        self.outputs.push_back(Output::Send {
            to: Dest::Link(link),
            frame,
        });
    }

    /// Sends a one-way message to a controller (possibly this one).
    /// Messages to unreachable peers are dropped.
    fn send_peer(&mut self, node: NodeId, msg: PeerMsg) {
        if node == self.cfg.node {
            self.loopback.push_back((node, msg));
            return;
        }
        if let PeerMsg::Reply { .. } = msg {
            if let Some(o) = self.owed.get_mut(&node) {
                *o = o.saturating_sub(1);
                if *o == 0 {
                    self.owed.remove(&node);
                }
            }
        }
        let link = self.peers.get(&node).map(|p| p.link);
        if self.swim.is_none() {
            if let Some(link) = link {
                self.send_link(link, &msg);
            }
            return;
        }
        match link {
            Some(l) if self.links.get(&l).is_some_and(|l| l.bye != Bye::Acked) => {
                self.send_link(l, &msg)
            }
            _ => {
                // Only gossip still goes to members confirmed dead (to
                // let a wrongly buried one refute).
                if self.gone(node) && link.is_none() && !is_gossip(&msg) {
                    return;
                }
                self.outq.entry(node).or_default().push(msg);
                if link.is_none() {
                    self.ensure_dial(node);
                }
            }
        }
    }

    /// Whether the membership has confirmed `node` dead or departed.
    fn gone(&self, node: NodeId) -> bool {
        matches!(
            self.swim.as_ref().and_then(|m| m.state(node)),
            Some(MemberState::Dead | MemberState::Left)
        )
    }

    /// Asks the driver for a link to `node` unless one is on its way.
    fn ensure_dial(&mut self, node: NodeId) {
        if self.dials.contains_key(&node) || self.peers.contains_key(&node) {
            return;
        }
        // A link from the peer is finishing its handshake: use that one
        // (a second link would replace it and lose the peer's state).
        let incoming = self
            .links
            .values()
            .any(|l| matches!(l.state, LinkState::ReplySent { peer, .. } if peer == node));
        if incoming {
            return;
        }
        self.dials_started += 1;
        self.dials.insert(
            node,
            Dial {
                deadline: self.now.after(self.cfg.peer_timeout),
                link: None,
                yielded: false,
            },
        );
        self.outputs.push_back(Output::Connect { peer: node });
    }

    /// Sends what waits for `node` on its (new or resumed) link.
    fn flush(&mut self, node: NodeId) {
        let Some(link) = self.peers.get(&node).map(|p| p.link) else {
            return;
        };
        if let Some(q) = self.outq.remove(&node) {
            for m in q {
                self.send_link(link, &m);
            }
        }
    }

    /// Requests still waiting for a link to `node` fail (they were never
    /// sent, so `PeerUnreachable` is certain); one-way frames stay queued.
    fn fail_queued_requests(&mut self, node: NodeId) {
        let Some(q) = self.outq.remove(&node) else {
            return;
        };
        let mut keep = Vec::new();
        for m in q {
            match m {
                PeerMsg::Request { req, .. } => {
                    self.loopback.push_back((
                        node,
                        PeerMsg::Reply {
                            req,
                            result: Err(ErrorCode::PeerUnreachable),
                        },
                    ));
                }
                // Membership frames are only worth their moment.
                m if is_gossip(&m) => {}
                other => keep.push(other),
            }
        }
        if !keep.is_empty() && !self.gone(node) {
            self.outq.insert(node, keep);
        }
    }

    /// Sends a request; `waiter` handles its one reply (a synthesized
    /// `PeerUnreachable` or `Timeout` if the peer cannot answer).
    fn call(&mut self, node: NodeId, body: PeerRequest, waiter: Waiter) -> u64 {
        let req = self.next_req;
        self.next_req += 1;
        let mut timeout = self.cfg.op_timeout;
        if let PeerRequest::Lookup { wait_ms, .. } = &body {
            timeout += core::time::Duration::from_millis(*wait_ms as u64);
        }
        let deadline = self.now.after(timeout);
        self.calls.insert(
            req,
            Call {
                node,
                deadline,
                waiter,
            },
        );
        if node == self.cfg.node {
            // Served here: every serving path answers by itself (directly,
            // or through its own deadlines: copies, name waits, the calls it
            // makes), so no deadline entry is needed.
            self.send_peer(node, PeerMsg::Request { req, body });
        } else if self.peers.contains_key(&node) || (self.swim.is_some() && !self.gone(node)) {
            self.push_timer(deadline, Timer::Call(req));
            self.send_peer(node, PeerMsg::Request { req, body });
        } else {
            let reply = PeerMsg::Reply {
                req,
                result: Err(ErrorCode::PeerUnreachable),
            };
            self.loopback.push_back((node, reply));
        }
        req
    }

    /// Processes loopback messages and fallout until both are empty.
    fn drain(&mut self) {
        loop {
            if !self.fallout.is_empty() {
                self.process_fallout();
                continue;
            }
            match self.loopback.pop_front() {
                Some((from, msg)) => self.on_peer_msg(from, msg),
                None => break,
            }
        }
    }

    fn process_fallout(&mut self) {
        while let Some(f) = self.fallout.pop() {
            match f {
                Fallout::FireMonitor(m) => {
                    if let Some(reg) = self.monitors.remove(m) {
                        self.unindex_monitor(reg.watcher, m);
                        let notify = reg.notify;
                        let body = PeerRequest::Invoke {
                            target: notify,
                            imms: Vec::new(),
                            caps: Vec::new(),
                        };
                        self.call(notify.node, body, Waiter::ReleaseAfter(notify));
                    }
                }
                Fallout::Release(cap) => self.release_ref(cap),
                Fallout::ObjectDied { owner, object } => {
                    if let Some(p) = self.procs.get_mut(owner) {
                        p.objects.remove(&object);
                    }
                }
            }
        }
    }

    /// Releases a reference held by a node (this one or one it speaks for).
    fn release_ref(&mut self, cap: CapRef) {
        if self.is_local(&cap) {
            self.release_node_held(&cap);
        } else {
            self.send_peer(cap.node, PeerMsg::Release { cap });
        }
    }

    fn release_node_held(&mut self, cap: &CapRef) {
        if let Ok(key) = self.resolve_local(cap) {
            if let Holder::Node(n) = self.store.nodes[key].holder {
                self.store.release(key, Holder::Node(n), &mut self.fallout);
            }
        }
    }

    /// Releases the capability behind a process's table entry.
    fn release_entry(&mut self, proc: ProcessKey, e: Entry) {
        if self.is_local(&e.cap) {
            if let Ok(key) = self.resolve_local(&e.cap) {
                self.store
                    .release(key, Holder::Process(proc), &mut self.fallout);
            }
        } else {
            self.send_peer(e.cap.node, PeerMsg::Release { cap: e.cap });
        }
    }

    /// Installs a capability (held by this node) as a fresh handle.
    /// Whether `cap` may be installed in a process table: a capability
    /// owned here must be a node held for this node and not yet handed out
    /// (a peer cannot make us install a node someone else holds); remote
    /// ones are validated by their owner.
    fn installable(&self, cap: &CapRef) -> bool {
        !self.is_local(cap)
            || self
                .resolve_local(cap)
                .is_ok_and(|k| self.store.nodes[k].holder == Holder::Node(self.cfg.node))
    }

    /// Installs a capability (held by this node) as a fresh handle; `None`
    /// (and nothing changed) if it is not [`Controller::installable`].
    fn install(&mut self, proc: ProcessKey, cap: CapRef, info: CapInfo) -> Option<Handle> {
        let mut info = info;
        if self.is_local(&cap) {
            if !self.installable(&cap) {
                self.metrics.peer_refs_refused += 1;
                return None;
            }
            let key = self.resolve_local(&cap).ok()?;
            self.store.nodes[key].holder = Holder::Process(proc);
            // What the process is told comes from the owner: us.
            info = self.store.info(key).unwrap_or(info);
        }
        Some(self.procs[proc].table.insert(Entry { cap, info }))
    }

    fn has_room(&self, proc: ProcessKey, n: usize) -> bool {
        self.procs[proc].table.len() + n <= self.cfg.limits.max_caps_per_process
    }

    /// Delivers the result of an operation to whoever asked.
    fn answer(&mut self, origin: Origin, result: Result<PeerReply, ErrorCode>) {
        match origin {
            Origin::Peer { node, req } => self.send_peer(node, PeerMsg::Reply { req, result }),
            Origin::Proc { proc, op, started } => {
                let micros = self.now.0.saturating_sub(started.0) / 1000;
                self.metrics.latency(micros);
                if !self.procs.contains_key(proc) {
                    if let Ok(PeerReply::Cap { cap, .. }) = result {
                        self.release_ref(cap);
                    }
                    return;
                }
                self.procs[proc].pending = self.procs[proc].pending.saturating_sub(1);
                let result = match result {
                    Ok(PeerReply::Cap { cap, info }) => {
                        if !self.has_room(proc, 1) {
                            self.release_ref(cap);
                            Err(ErrorCode::LimitReached)
                        } else {
                            match self.install(proc, cap, info) {
                                Some(handle) => {
                                    let info =
                                        self.procs[proc].table.get(handle).map_or(info, |e| e.info);
                                    Ok(Reply::Cap { handle, info })
                                }
                                None => Err(ErrorCode::InvalidArgument),
                            }
                        }
                    }
                    Ok(_) => Ok(Reply::Done),
                    Err(e) => Err(e),
                };
                if let Err(e) = result {
                    self.metrics.error(e);
                }
                self.send_process(proc, &ControllerMsg::Completion { op, result });
            }
        }
    }

    /// Answers a process operation that failed before it became pending.
    fn reject_op(&mut self, proc: ProcessKey, op: u64, e: ErrorCode) {
        self.metrics.error(e);
        self.send_process(proc, &ControllerMsg::Completion { op, result: Err(e) });
    }

    // ------------------------------------------------------------ subsystems

    /// Applies the effects the copy engine and the name service pushed, in
    /// order.
    fn apply_effects(&mut self) {
        while !self.fx.is_empty() {
            let mut fx = core::mem::take(&mut self.fx);
            for e in fx.drain(..) {
                self.apply(e);
            }
            if self.fx.is_empty() {
                // Keep the buffer's capacity.
                self.fx = fx;
            }
        }
    }

    fn apply(&mut self, e: Effect) {
        match e {
            Effect::Answer(origin, result) => self.answer(origin, result),
            Effect::Peer(node, msg) => self.send_peer(node, msg),
            Effect::Timer(at, t) => self.push_timer(at, t),
            Effect::Release(cap) => self.release_ref(cap),
            Effect::OpenSink {
                node,
                dst,
                len,
                source,
            } => {
                let body = PeerRequest::CopyOpen {
                    dst,
                    len,
                    source: key_to_u64(source),
                };
                self.call(node, body, Waiter::CopyOpened { source });
            }
            Effect::MemRead {
                proc,
                xfer,
                addr,
                len,
                direct,
            } => {
                if !direct {
                    self.send_process(proc, &ControllerMsg::MemRead { xfer, addr, len });
                } else if let Some(p) = self.procs.get(proc) {
                    let chan = p.chan;
                    self.mem_access.push_back(MemAccess::Read {
                        chan,
                        xfer,
                        addr,
                        len,
                    });
                }
            }
            Effect::MemWrite {
                proc,
                xfer,
                addr,
                data,
                direct,
            } => {
                if !direct {
                    self.send_process(proc, &ControllerMsg::MemWrite { xfer, addr, data });
                } else if let Some(p) = self.procs.get(proc) {
                    let chan = p.chan;
                    self.mem_access.push_back(MemAccess::Write {
                        chan,
                        xfer,
                        addr,
                        data,
                    });
                }
            }
            Effect::BytesOut(n) => self.metrics.bytes_copied_out += n,
            Effect::BytesIn(n) => self.metrics.bytes_copied_in += n,
            Effect::RevokeHeld => self.metrics.revokes_held_for_copies += 1,
            Effect::ServeLookup {
                cap,
                holder,
                origin,
            } => self.acquire(vec![cap], holder, Then::ServeLookup { origin }),
        }
    }

    /// Revokes `key` (and its subtree) for `origin`; the copy engine
    /// answers once the copies it stopped have no bytes in flight.
    fn revoke_cap(&mut self, origin: Origin, key: CapKey) {
        if let Err(e) = self.store.revoke(key, &mut self.fallout) {
            return self.answer(origin, Err(e));
        }
        let now = self.now;
        self.copy.revoked(now, origin, &self.store, &mut self.fx);
        self.apply_effects();
    }

    /// A read of `proc`'s memory was answered (by the process, or by the
    /// driver if `direct`).
    fn read_done(
        &mut self,
        proc: ProcessKey,
        xfer: u64,
        direct: bool,
        result: Result<Vec<u8>, ErrorCode>,
    ) {
        let now = self.now;
        let fx = &mut self.fx;
        self.copy
            .read_done(now, proc, xfer, direct, result, &self.store, fx);
        self.apply_effects();
    }

    /// A write into `proc`'s memory was answered (see `read_done`).
    fn write_done(
        &mut self,
        proc: ProcessKey,
        xfer: u64,
        direct: bool,
        result: Result<(), ErrorCode>,
    ) {
        self.copy
            .write_done(proc, xfer, direct, result, &mut self.fx);
        self.apply_effects();
    }

    // ------------------------------------------------------- process messages

    fn kick(&mut self, proc: ProcessKey, code: ErrorCode, reason: CloseReason) {
        self.send_process(
            proc,
            &ControllerMsg::Rejected {
                code,
                version: PROTOCOL_VERSION,
            },
        );
        let chan = self.procs[proc].chan;
        self.outputs.push_back(Output::Close {
            to: Dest::Process(chan),
            reason,
        });
        self.metrics.processes_kicked += 1;
        self.exit_process(proc);
    }

    fn on_process_message(&mut self, proc: ProcessKey, body: &[u8]) {
        if body.len() > self.cfg.limits.max_message_len {
            return self.kick(proc, ErrorCode::Malformed, CloseReason::Malformed);
        }
        let msg = match ProcessMsg::decode(body) {
            Ok(m) => m,
            Err(DecodeError::BadVersion { .. }) => {
                return self.kick(
                    proc,
                    ErrorCode::VersionMismatch,
                    CloseReason::VersionMismatch,
                )
            }
            Err(_) => return self.kick(proc, ErrorCode::Malformed, CloseReason::Malformed),
        };
        if !self.procs[proc].attached {
            return match msg {
                ProcessMsg::Attach { name, token } => {
                    if auth::verify_process_token(&self.cfg.cluster_key, &name, &token) {
                        self.procs[proc].attached = true;
                        self.send_process(
                            proc,
                            &ControllerMsg::Attached {
                                node: self.cfg.node,
                            },
                        );
                    } else {
                        self.kick(proc, ErrorCode::AuthFailed, CloseReason::AuthFailed);
                    }
                }
                _ => self.kick(proc, ErrorCode::NotAttached, CloseReason::Malformed),
            };
        }
        match msg {
            ProcessMsg::Attach { .. } => {
                self.kick(proc, ErrorCode::Malformed, CloseReason::Malformed)
            }
            ProcessMsg::MemReadReply { xfer, result } => self.read_done(proc, xfer, false, result),
            ProcessMsg::MemWriteReply { xfer, result } => {
                self.write_done(proc, xfer, false, result)
            }
            op_msg => {
                let op = op_msg.op_id().unwrap_or(0);
                if self.procs[proc].pending >= self.cfg.limits.max_pending_per_process {
                    return self.reject_op(proc, op, ErrorCode::LimitReached);
                }
                self.procs[proc].pending += 1;
                let origin = Origin::Proc {
                    proc,
                    op,
                    started: self.now,
                };
                if let Err(e) = self.start_op(proc, origin, op_msg) {
                    self.answer(origin, Err(e));
                }
            }
        }
    }

    fn entry(&self, proc: ProcessKey, h: Handle) -> Result<Entry, ErrorCode> {
        self.procs[proc].table.get(h).ok_or(ErrorCode::BadHandle)
    }

    fn entries(&self, proc: ProcessKey, hs: &[Handle]) -> Result<Vec<CapRef>, ErrorCode> {
        hs.iter()
            .map(|h| self.entry(proc, *h).map(|e| e.cap))
            .collect()
    }

    /// Starts a process operation. An `Err` is the operation's answer; `Ok`
    /// means the operation answered or will answer itself.
    fn start_op(
        &mut self,
        proc: ProcessKey,
        origin: Origin,
        msg: ProcessMsg,
    ) -> Result<(), ErrorCode> {
        match msg {
            ProcessMsg::MemoryCreate {
                addr, len, rights, ..
            } => {
                self.metrics.op(OpKind::MemoryCreate);
                if len == 0 || addr.checked_add(len).is_none() {
                    return Err(ErrorCode::InvalidArgument);
                }
                let root = self.create_object(proc, ObjectKind::Memory, addr, len, rights, 0, None);
                let info = CapInfo {
                    kind: ObjectKind::Memory,
                    rights,
                    len,
                };
                self.answer(
                    origin,
                    Ok(PeerReply::Cap {
                        cap: self.cap_ref(root),
                        info,
                    }),
                );
            }
            ProcessMsg::Diminish {
                cap,
                offset,
                len,
                rights,
                ..
            } => {
                self.metrics.op(OpKind::Diminish);
                let e = self.entry(proc, cap)?;
                if e.info.kind != ObjectKind::Memory {
                    return Err(ErrorCode::WrongType);
                }
                let spec = DeriveSpec::Diminish {
                    offset,
                    len,
                    rights,
                };
                let body = PeerRequest::Derive {
                    parent: e.cap,
                    holder: self.cfg.node,
                    spec,
                };
                self.call(e.cap.node, body, Waiter::Answer(origin));
            }
            ProcessMsg::RequestCreate {
                tag, imms, caps, ..
            } => {
                self.metrics.op(OpKind::RequestCreate);
                let caps = self.entries(proc, &caps)?;
                let node = self.cfg.node;
                self.acquire(caps, node, Then::RequestCreate { origin, tag, imms });
            }
            ProcessMsg::Derive {
                cap, imms, caps, ..
            } => {
                self.metrics.op(OpKind::Derive);
                let e = self.entry(proc, cap)?;
                if e.info.kind != ObjectKind::Request {
                    return Err(ErrorCode::WrongType);
                }
                let caps = self.entries(proc, &caps)?;
                self.acquire(
                    caps,
                    e.cap.node,
                    Then::Derive {
                        origin,
                        parent: e.cap,
                        imms,
                    },
                );
            }
            ProcessMsg::Invoke {
                cap, imms, caps, ..
            } => {
                self.metrics.op(OpKind::Invoke);
                let e = self.entry(proc, cap)?;
                if e.info.kind != ObjectKind::Request {
                    return Err(ErrorCode::WrongType);
                }
                let caps = self.entries(proc, &caps)?;
                if caps.is_empty() && self.is_local(&e.cap) {
                    self.deliver(origin, e.cap, imms, Vec::new());
                } else {
                    self.acquire(
                        caps,
                        e.cap.node,
                        Then::Invoke {
                            origin,
                            target: e.cap,
                            imms,
                        },
                    );
                }
            }
            ProcessMsg::Copy {
                src,
                dst,
                completion,
                ..
            } => {
                self.metrics.op(OpKind::Copy);
                let s = self.entry(proc, src)?;
                let d = self.entry(proc, dst)?;
                let c = match completion {
                    Some(h) => {
                        let c = self.entry(proc, h)?;
                        if c.info.kind != ObjectKind::Request {
                            return Err(ErrorCode::WrongType);
                        }
                        Some(c.cap)
                    }
                    None => None,
                };
                if s.info.kind != ObjectKind::Memory || d.info.kind != ObjectKind::Memory {
                    return Err(ErrorCode::WrongType);
                }
                if !s.info.rights.contains(Rights::READ) || !d.info.rights.contains(Rights::WRITE) {
                    return Err(ErrorCode::MissingRight);
                }
                if d.info.len < s.info.len {
                    return Err(ErrorCode::SizeMismatch);
                }
                let body = PeerRequest::CopyStart {
                    src: s.cap,
                    dst: d.cap,
                };
                self.call(
                    s.cap.node,
                    body,
                    Waiter::CopyStarted {
                        origin,
                        completion: c,
                    },
                );
            }
            ProcessMsg::Revoke { cap, .. } => {
                self.metrics.op(OpKind::Revoke);
                let e = self.entry(proc, cap)?;
                if self.is_local(&e.cap) {
                    let key = self.resolve_local(&e.cap)?;
                    self.revoke_cap(origin, key);
                } else {
                    self.call(
                        e.cap.node,
                        PeerRequest::Revoke { cap: e.cap },
                        Waiter::Answer(origin),
                    );
                }
            }
            ProcessMsg::Drop { cap, .. } => {
                self.metrics.op(OpKind::Drop);
                let e = self.procs[proc]
                    .table
                    .remove(cap)
                    .ok_or(ErrorCode::BadHandle)?;
                self.release_entry(proc, e);
                self.answer(origin, Ok(PeerReply::Done));
            }
            ProcessMsg::Monitor { cap, notify, .. } => {
                self.metrics.op(OpKind::Monitor);
                let e = self.entry(proc, cap)?;
                let n = self.entry(proc, notify)?;
                if n.info.kind != ObjectKind::Request {
                    return Err(ErrorCode::WrongType);
                }
                self.acquire(
                    vec![n.cap],
                    e.cap.node,
                    Then::Monitor { origin, cap: e.cap },
                );
            }
            ProcessMsg::Publish { name, cap, .. } => {
                self.metrics.op(OpKind::Publish);
                if name.is_empty() {
                    return Err(ErrorCode::InvalidArgument);
                }
                let e = self.entry(proc, cap)?;
                let home = name_home(&self.cfg.members, &name);
                let publisher = self.procs[proc].seq;
                self.names.publish_begin(proc, &name)?;
                self.acquire(
                    vec![e.cap],
                    home,
                    Then::Publish {
                        origin,
                        home,
                        name,
                        publisher,
                    },
                );
            }
            ProcessMsg::Unpublish { name, .. } => {
                self.metrics.op(OpKind::Unpublish);
                let home = name_home(&self.cfg.members, &name);
                let publisher = self.procs[proc].seq;
                // The name leaves the published list now, unless a Publish
                // of it is still in flight (it may land after this
                // Unpublish, and the withdrawal at exit must cover it).
                self.names.unpublish_begin(proc, &name);
                self.call(
                    home,
                    PeerRequest::Unpublish { name, publisher },
                    Waiter::Answer(origin),
                );
            }
            ProcessMsg::Lookup { name, wait_ms, .. } => {
                self.metrics.op(OpKind::Lookup);
                if name.is_empty() {
                    return Err(ErrorCode::InvalidArgument);
                }
                let home = name_home(&self.cfg.members, &name);
                if wait_ms == 0 {
                    self.call(
                        home,
                        PeerRequest::Lookup { name, wait_ms },
                        Waiter::Answer(origin),
                    );
                } else {
                    // A waiting lookup may stay at the home for a long time:
                    // remember it so that exit can cancel it there.
                    let req = self.call(
                        home,
                        PeerRequest::Lookup { name, wait_ms },
                        Waiter::Lookup(origin),
                    );
                    if self.calls.contains_key(&req) {
                        self.procs[proc].lookups.insert(req);
                    }
                }
            }
            ProcessMsg::Attach { .. }
            | ProcessMsg::MemReadReply { .. }
            | ProcessMsg::MemWriteReply { .. } => return Err(ErrorCode::Malformed),
        }
        Ok(())
    }

    /// Creates an object owned by `proc` whose root is held by this node
    /// until [`Controller::answer`] installs it.
    fn create_object(
        &mut self,
        proc: ProcessKey,
        kind: ObjectKind,
        addr: u64,
        len: u64,
        rights: Rights,
        tag: u64,
        binds: Option<alloc::boxed::Box<Binds>>,
    ) -> CapKey {
        let holder = Holder::Node(self.cfg.node);
        let root = self
            .store
            .create_object(kind, proc, addr, len, rights, tag, binds, holder);
        let object = self.store.nodes[root].object;
        self.procs[proc].objects.insert(object);
        root
    }

    fn exit_process(&mut self, proc: ProcessKey) {
        let Some(mut p) = self.procs.remove(proc) else {
            return;
        };
        self.chans.remove(&p.chan);
        let entries: Vec<Entry> = p.table.drain().collect();
        for e in entries {
            self.release_entry(proc, e);
        }
        for object in core::mem::take(&mut p.objects) {
            if let Some(root) = self.store.objects.get(object).map(|o| o.root) {
                let _ = self.store.revoke(root, &mut self.fallout);
            }
        }
        for node in core::mem::take(&mut p.monitor_nodes) {
            self.send_peer(node, PeerMsg::MonitorsDrop { watcher: p.seq });
        }
        for req in core::mem::take(&mut p.lookups) {
            if let Some(c) = self.calls.remove(&req) {
                self.send_peer(c.node, PeerMsg::LookupCancel { req });
            }
        }
        for name in self.names.process_exited(proc) {
            let home = name_home(&self.cfg.members, &name);
            self.call(
                home,
                PeerRequest::Unpublish {
                    name,
                    publisher: p.seq,
                },
                Waiter::Ignore,
            );
        }
        self.mem_access.retain(|a| a.chan() != p.chan);
        self.copy.process_exited(proc, &mut self.fx);
        self.apply_effects();
    }

    // ------------------------------------------------------------ acquisition

    /// Derives a child of every capability in `caps`, each held by `holder`,
    /// then runs `then` (or fails its origin with the first error).
    fn acquire(&mut self, caps: Vec<CapRef>, holder: NodeId, then: Then) {
        if caps.is_empty() {
            return self.run_then(then, Vec::new());
        }
        let n = caps.len();
        let agg = self.aggs.insert(Agg {
            results: vec![None; n],
            waiting: n,
            error: None,
            then,
        });
        for (index, parent) in caps.into_iter().enumerate() {
            let body = PeerRequest::Derive {
                parent,
                holder,
                spec: DeriveSpec::Transfer,
            };
            self.call(parent.node, body, Waiter::Acquire { agg, index });
        }
    }

    fn on_acquired(&mut self, agg: AggKey, index: usize, result: Result<PeerReply, ErrorCode>) {
        let Some(a) = self.aggs.get_mut(agg) else {
            if let Ok(PeerReply::Cap { cap, .. }) = result {
                self.release_ref(cap);
            }
            return;
        };
        match result {
            Ok(PeerReply::Cap { cap, info }) => a.results[index] = Some((cap, info)),
            Ok(_) => a.error = a.error.or(Some(ErrorCode::Malformed)),
            Err(e) => a.error = a.error.or(Some(e)),
        }
        a.waiting -= 1;
        if a.waiting > 0 {
            return;
        }
        let a = self.aggs.remove(agg).expect("present above");
        let caps: Vec<(CapRef, CapInfo)> = a.results.into_iter().flatten().collect();
        match a.error {
            None => self.run_then(a.then, caps),
            Some(e) => {
                for (c, _) in caps {
                    self.release_ref(c);
                }
                self.fail_then(a.then, e);
            }
        }
    }

    fn fail_then(&mut self, then: Then, e: ErrorCode) {
        let origin = then.origin();
        match then {
            Then::Deliver { invoker, .. } => {
                for (c, _) in invoker {
                    self.release_ref(c);
                }
            }
            Then::Publish {
                origin: Origin::Proc { proc, .. },
                name,
                ..
            } => self.names.publish_end(proc, &name, None, false),
            _ => {}
        }
        self.answer(origin, Err(e));
    }

    fn run_then(&mut self, then: Then, caps: Vec<(CapRef, CapInfo)>) {
        match then {
            Then::RequestCreate { origin, tag, imms } => {
                let Origin::Proc { proc, .. } = origin else {
                    unreachable!("request creation always comes from a local process")
                };
                if !self.procs.contains_key(proc) {
                    for (c, _) in caps {
                        self.release_ref(c);
                    }
                    return;
                }
                let binds = if imms.is_empty() && caps.is_empty() {
                    None
                } else {
                    Some(alloc::boxed::Box::new(Binds {
                        imms,
                        caps: caps.iter().map(|c| c.0).collect(),
                    }))
                };
                let root =
                    self.create_object(proc, ObjectKind::Request, 0, 0, Rights::NONE, tag, binds);
                let info = CapInfo {
                    kind: ObjectKind::Request,
                    rights: Rights::NONE,
                    len: 0,
                };
                self.answer(
                    origin,
                    Ok(PeerReply::Cap {
                        cap: self.cap_ref(root),
                        info,
                    }),
                );
            }
            Then::Derive {
                origin,
                parent,
                imms,
            } => {
                let spec = DeriveSpec::Bind {
                    imms,
                    caps: caps.into_iter().map(|c| c.0).collect(),
                };
                let body = PeerRequest::Derive {
                    parent,
                    holder: self.cfg.node,
                    spec,
                };
                self.call(parent.node, body, Waiter::Answer(origin));
            }
            Then::Invoke {
                origin,
                target,
                imms,
            } => {
                if self.is_local(&target) {
                    self.deliver(origin, target, imms, caps);
                } else {
                    self.call(
                        target.node,
                        PeerRequest::Invoke { target, imms, caps },
                        Waiter::Answer(origin),
                    );
                }
            }
            Then::Monitor { origin, cap } => {
                let notify = caps[0].0;
                let watcher = match origin {
                    Origin::Proc { proc, .. } => match self.procs.get_mut(proc) {
                        Some(p) => {
                            // Before the request goes out: the drop sent at
                            // exit must follow it to the owner.
                            p.monitor_nodes.insert(cap.node);
                            p.seq
                        }
                        // The watcher exited while its notification Request
                        // was being acquired: register nothing.
                        None => return self.release_ref(notify),
                    },
                    Origin::Peer { .. } => {
                        self.release_ref(notify);
                        return self.answer(origin, Err(ErrorCode::Malformed));
                    }
                };
                self.call(
                    cap.node,
                    PeerRequest::Monitor {
                        cap,
                        notify,
                        watcher,
                    },
                    Waiter::Answer(origin),
                );
            }
            Then::Publish {
                origin,
                home,
                name,
                publisher,
            } => {
                let cap = caps[0].0;
                let Origin::Proc { proc, .. } = origin else {
                    self.release_ref(cap);
                    return self.answer(origin, Err(ErrorCode::Malformed));
                };
                if !self.procs.contains_key(proc) {
                    // The publisher exited while its capability was being
                    // acquired; its withdrawal has already been sent.
                    return self.release_ref(cap);
                }
                let sent = self.names.publish_sent(proc, &name);
                self.call(
                    home,
                    PeerRequest::Publish {
                        name: name.clone(),
                        cap,
                        publisher,
                    },
                    Waiter::Published { origin, name, sent },
                );
            }
            Then::Deliver {
                origin,
                proc,
                tag,
                imms,
                invoker,
            } => self.finish_delivery(origin, proc, tag, imms, caps, invoker),
            Then::ServeLookup { origin } => {
                let (cap, info) = caps[0];
                self.answer(origin, Ok(PeerReply::Cap { cap, info }));
            }
        }
    }

    // ------------------------------------------------------------- invocation

    /// Owner side of invoke: `target` is local; `caps` are held by this node.
    fn deliver(
        &mut self,
        origin: Origin,
        target: CapRef,
        imms: Vec<u8>,
        caps: Vec<(CapRef, CapInfo)>,
    ) {
        let checked = self.resolve_local(&target).and_then(|key| {
            let n = &self.store.nodes[key];
            let o = &self.store.objects[n.object];
            if o.kind == ObjectKind::Request {
                Ok((key, o.owner, o.tag))
            } else {
                Err(ErrorCode::WrongType)
            }
        });
        let (key, owner, tag) = match checked {
            Ok(v) => v,
            Err(e) => {
                for (c, _) in caps {
                    self.release_ref(c);
                }
                return self.answer(origin, Err(e));
            }
        };
        if !self.store.has_binds(key) {
            return self.finish_delivery(origin, owner, tag, imms, Vec::new(), caps);
        }
        let mut all_imms = Vec::new();
        let mut bound = Vec::new();
        self.store.collect_binds(key, &mut all_imms, &mut bound);
        all_imms.extend_from_slice(&imms);
        if bound.is_empty() {
            self.finish_delivery(origin, owner, tag, all_imms, Vec::new(), caps);
        } else {
            let node = self.cfg.node;
            self.acquire(
                bound,
                node,
                Then::Deliver {
                    origin,
                    proc: owner,
                    tag,
                    imms: all_imms,
                    invoker: caps,
                },
            );
        }
    }

    fn finish_delivery(
        &mut self,
        origin: Origin,
        proc: ProcessKey,
        tag: u64,
        imms: Vec<u8>,
        bound: Vec<(CapRef, CapInfo)>,
        invoker: Vec<(CapRef, CapInfo)>,
    ) {
        let n = bound.len() + invoker.len();
        // Capabilities a peer named that we must not install (held by
        // someone else, or named twice): refuse the delivery, release only
        // what was really held for us.
        let mut seen = BTreeSet::new();
        let valid: Vec<bool> = bound
            .iter()
            .chain(&invoker)
            .map(|(c, _)| self.installable(c) && (!self.is_local(c) || seen.insert(c.cap)))
            .collect();
        let error = if !self.procs.contains_key(proc) {
            Some(ErrorCode::OwnerGone)
        } else if !self.has_room(proc, n) {
            Some(ErrorCode::LimitReached)
        } else if valid.contains(&false) {
            self.metrics.peer_refs_refused += 1;
            Some(ErrorCode::InvalidArgument)
        } else {
            None
        };
        if let Some(e) = error {
            for ((c, _), ok) in bound.into_iter().chain(invoker).zip(valid) {
                if ok {
                    self.release_ref(c);
                }
            }
            return self.answer(origin, Err(e));
        }
        let mut caps = Vec::with_capacity(n);
        for (c, info) in bound.into_iter().chain(invoker) {
            if let Some(h) = self.install(proc, c, info) {
                let info = self.procs[proc].table.get(h).map_or(info, |e| e.info);
                caps.push((h, info));
            }
        }
        self.metrics.invocations_delivered += 1;
        self.send_process(proc, &ControllerMsg::Invocation { tag, imms, caps });
        self.answer(origin, Ok(PeerReply::Done));
    }

    // ------------------------------------------------------------ peer links

    fn on_link_message(&mut self, link: LinkId, body: &[u8]) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        l.last_rx = self.now;
        self.metrics.peer_frames_in += 1;
        self.metrics.peer_bytes_in += body.len() as u64 + 4;
        if body.len() > self.cfg.limits.max_message_len + auth::SEAL_OVERHEAD {
            return self.close_link(link, CloseReason::Malformed);
        }
        if let LinkState::Up { node, session, .. } = &mut l.state {
            let node = *node;
            let mut scratch = core::mem::take(&mut self.open_scratch);
            let decoded = session.open(body, &mut scratch).map(PeerMsg::decode);
            self.open_scratch = scratch;
            return match decoded {
                Err(auth::IntegrityError) => {
                    self.metrics.peer_integrity_failures += 1;
                    self.close_link(link, CloseReason::IntegrityFailed)
                }
                Ok(Err(DecodeError::BadVersion { .. })) => {
                    self.close_link(link, CloseReason::VersionMismatch)
                }
                Ok(Err(_)) => self.close_link(link, CloseReason::Malformed),
                Ok(Ok(
                    PeerMsg::Hello { .. }
                    | PeerMsg::HelloReply { .. }
                    | PeerMsg::Finish { .. }
                    | PeerMsg::Rejected { .. }
                    | PeerMsg::Yield,
                )) => self.close_link(link, CloseReason::Malformed),
                Ok(Ok(m)) => self.on_up_msg(link, node, m),
            };
        }
        match PeerMsg::decode(body) {
            Ok(msg) => self.on_handshake(link, msg),
            Err(DecodeError::BadVersion { .. }) => self.reject_link(
                link,
                ErrorCode::VersionMismatch,
                CloseReason::VersionMismatch,
            ),
            Err(_) => self.reject_link(link, ErrorCode::Malformed, CloseReason::Malformed),
        }
    }

    /// One handshake step on a link that is not yet authenticated.
    fn on_handshake(&mut self, link: LinkId, msg: PeerMsg) {
        let me = HelloPart {
            node: self.cfg.node,
            incarnation: self.cfg.incarnation,
            nonce: [0; 32],
        };
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        match (&l.state, msg) {
            (
                LinkState::AwaitHello,
                PeerMsg::Hello {
                    node,
                    incarnation,
                    nonce,
                    responder,
                    security,
                },
            ) => {
                // The initiator must be another member (with gossip: any
                // controller holding the cluster key, so members can join)
                // and must have meant to dial us.
                let member = self.swim.is_some() || self.cfg.members.contains(&node);
                if responder != me.node || node == me.node || !member {
                    return self.reject_link(link, ErrorCode::AuthFailed, CloseReason::AuthFailed);
                }
                if self.dial_wins(node, incarnation) {
                    // Both sides dialled: the lower id's dial is the link.
                    self.send_link(link, &PeerMsg::Yield);
                    if let Some(l) = self.links.get_mut(&link) {
                        l.state = LinkState::Yielded;
                    }
                    return;
                }
                let Some(l) = self.links.get_mut(&link) else {
                    return;
                };
                let security = security.max(self.cfg.peer_security);
                let mine = HelloPart {
                    nonce: self.nonces.next(),
                    ..me
                };
                let theirs = HelloPart {
                    node,
                    incarnation,
                    nonce,
                };
                let transcript = auth::transcript(&theirs, &mine, security);
                let proof =
                    auth::handshake_proof(&self.cfg.cluster_key, Role::Responder, &transcript);
                l.state = LinkState::ReplySent {
                    peer: node,
                    incarnation,
                    transcript,
                    security,
                };
                let reply = PeerMsg::HelloReply {
                    node: mine.node,
                    incarnation: mine.incarnation,
                    nonce: mine.nonce,
                    security,
                    proof,
                };
                self.send_link(link, &reply);
            }
            (
                &LinkState::HelloSent {
                    expect,
                    nonce: my_nonce,
                },
                PeerMsg::HelloReply {
                    node,
                    incarnation,
                    nonce,
                    security,
                    proof,
                },
            ) => {
                // A weaker mode than we require is a downgrade.
                if node != expect || security < self.cfg.peer_security {
                    return self.reject_link(link, ErrorCode::AuthFailed, CloseReason::AuthFailed);
                }
                let mine = HelloPart {
                    nonce: my_nonce,
                    ..me
                };
                let theirs = HelloPart {
                    node,
                    incarnation,
                    nonce,
                };
                let transcript = auth::transcript(&mine, &theirs, security);
                let key = self.cfg.cluster_key;
                if !auth::verify_handshake_proof(&key, Role::Responder, &transcript, &proof) {
                    return self.reject_link(link, ErrorCode::AuthFailed, CloseReason::AuthFailed);
                }
                // Only now, with the responder proven, do we prove ourselves.
                let proof = auth::handshake_proof(&key, Role::Initiator, &transcript);
                self.send_link(link, &PeerMsg::Finish { proof });
                let session = Session::new(&key, Role::Initiator, &transcript, security);
                if let Some(l) = self.links.get_mut(&link) {
                    l.state = LinkState::Up {
                        node,
                        incarnation,
                        session,
                    };
                }
                self.peer_up(link, node, incarnation);
            }
            (
                &LinkState::ReplySent {
                    peer,
                    incarnation,
                    transcript,
                    security,
                },
                PeerMsg::Finish { proof },
            ) => {
                let key = self.cfg.cluster_key;
                if !auth::verify_handshake_proof(&key, Role::Initiator, &transcript, &proof) {
                    return self.reject_link(link, ErrorCode::AuthFailed, CloseReason::AuthFailed);
                }
                let session = Session::new(&key, Role::Responder, &transcript, security);
                l.state = LinkState::Up {
                    node: peer,
                    incarnation,
                    session,
                };
                self.peer_up(link, peer, incarnation);
            }
            (&LinkState::HelloSent { expect, .. }, PeerMsg::Yield) => {
                // The peer's own dial to us wins; wait for it (until the
                // dial's deadline).
                if let Some(d) = self.dials.get_mut(&expect) {
                    d.yielded = true;
                    d.link = None;
                }
                self.links.remove(&link);
                self.outputs.push_back(Output::Close {
                    to: Dest::Link(link),
                    reason: CloseReason::Duplicate,
                });
            }
            (_, PeerMsg::Rejected { code }) => {
                self.metrics.peer_handshake_failures += 1;
                let reason = match code {
                    ErrorCode::VersionMismatch => CloseReason::VersionMismatch,
                    _ => CloseReason::AuthFailed,
                };
                self.close_link(link, reason);
            }
            _ => self.reject_link(link, ErrorCode::Malformed, CloseReason::Malformed),
        }
    }

    /// Refuses a handshake: tells the other side why (in clear), closes.
    fn reject_link(&mut self, link: LinkId, code: ErrorCode, reason: CloseReason) {
        self.metrics.peer_handshake_failures += 1;
        self.send_link(link, &PeerMsg::Rejected { code });
        self.close_link(link, reason);
    }

    fn peer_up(&mut self, link: LinkId, node: NodeId, incarnation: u64) {
        if self.swim.is_some() {
            self.gossip_peer_up(link, node, incarnation);
            return;
        }
        if let Some(old) = self.peers.get(&node) {
            // A new link from a peer we still think connected (same or new
            // incarnation) means the old link broke without us noticing (a
            // half-open connection). The peer already dropped the state of
            // the old session and frames in flight on it are lost, so drop
            // ours too: keeping it would leak names and capabilities held
            // for the peer and leave calls the peer will never answer.
            let old_link = old.link;
            self.links.remove(&old_link);
            self.outputs.push_back(Output::Close {
                to: Dest::Link(old_link),
                reason: CloseReason::Duplicate,
            });
            self.peer_lost(node);
        }
        self.peers.insert(node, Peer { link });
    }

    fn close_link(&mut self, link: LinkId, reason: CloseReason) {
        self.outputs.push_back(Output::Close {
            to: Dest::Link(link),
            reason,
        });
        self.forget_link(link);
    }

    /// A link is gone (closed here or by the driver). Losing an
    /// authenticated link loses the peer, unless both sides had agreed to
    /// close it; a dial that never came up fails its queued requests.
    fn forget_link(&mut self, link: LinkId) {
        let Some(l) = self.links.remove(&link) else {
            return;
        };
        match l.peer() {
            Some(node) if self.peers.get(&node).is_some_and(|p| p.link == link) => {
                if l.graceful() {
                    self.peers.remove(&node);
                    if self.outq.contains_key(&node) {
                        self.ensure_dial(node);
                    }
                } else {
                    self.peer_lost(node);
                }
            }
            Some(_) => {}
            None => {
                if let LinkState::HelloSent { expect, .. } = l.state {
                    let ours = self
                        .dials
                        .get(&expect)
                        .is_some_and(|d| d.link == Some(link) && !d.yielded);
                    // The peer's own dial to us is finishing: it is the link.
                    let incoming = self.links.values().any(
                        |l| matches!(l.state, LinkState::ReplySent { peer, .. } if peer == expect),
                    );
                    if ours && incoming {
                        if let Some(d) = self.dials.get_mut(&expect) {
                            d.yielded = true;
                            d.link = None;
                        }
                    } else if ours {
                        self.dials.remove(&expect);
                        self.fail_queued_requests(expect);
                    }
                }
            }
        }
    }

    /// Whether our own dial to `node` wins over its dial to us: the lower
    /// id's dial wins (while it is in handshake, or up and of the same
    /// incarnation of the peer — a new incarnation always gets through).
    fn dial_wins(&self, node: NodeId, incarnation: u64) -> bool {
        if self.swim.is_none() || self.cfg.node > node {
            return false;
        }
        if let Some(l) = self.dials.get(&node).and_then(|d| d.link) {
            if self
                .links
                .get(&l)
                .is_some_and(|l| matches!(l.state, LinkState::HelloSent { .. }))
            {
                return true;
            }
        }
        self.peers
            .get(&node)
            .and_then(|p| self.links.get(&p.link))
            .is_some_and(|l| {
                l.initiated
                    && !l.graceful()
                    && matches!(l.state, LinkState::Up { incarnation: i, .. } if i == incarnation)
            })
    }

    /// Gossip mode: a link to `node` authenticated.
    fn gossip_peer_up(&mut self, link: LinkId, node: NodeId, incarnation: u64) {
        let known = self.swim.as_ref().map_or(0, |m| m.incarnation(node));
        if known != 0 && known < incarnation && !self.peers.contains_key(&node) {
            // A restarted peer: what its old incarnation held goes (with a
            // link to the old one, replacing it below does the same).
            self.fail_queued_requests(node);
            self.peer_lost(node);
        }
        if let Some(old) = self.peers.get(&node).map(|p| p.link) {
            // A link being closed by agreement hands over to the new one,
            // unless the new one is to a restarted peer.
            let graceful = self.links.get(&old).is_some_and(|l| {
                l.graceful()
                    && matches!(l.state, LinkState::Up { incarnation: i, .. } if i == incarnation)
            });
            self.links.remove(&old);
            self.outputs.push_back(Output::Close {
                to: Dest::Link(old),
                reason: CloseReason::Duplicate,
            });
            if !graceful {
                // A half-open link or a restarted peer (see `peer_up`).
                self.peer_lost(node);
            }
        }
        if let Some(d) = self.dials.remove(&node) {
            if let Some(l) = d.link.filter(|l| *l != link) {
                if self.links.remove(&l).is_some() {
                    self.outputs.push_back(Output::Close {
                        to: Dest::Link(l),
                        reason: CloseReason::Duplicate,
                    });
                }
            }
        }
        self.peers.insert(node, Peer { link });
        let mut out = Vec::new();
        if let Some(m) = self.swim.as_mut() {
            m.observed(self.now, node, incarnation, &mut out);
        }
        self.flush(node);
        self.apply_swim(out);
    }

    /// Applies what the membership asks for.
    fn apply_swim(&mut self, out: Vec<SwimOut>) {
        for o in out {
            match o {
                SwimOut::Send(node, msg) => self.send_peer(node, msg),
                SwimOut::ProbeTimer(at, seq) => self.push_timer(at, Timer::Probe(seq)),
                SwimOut::Dead(node) => self.member_gone(node),
                SwimOut::Restarted(node) => self.member_restarted(node),
            }
        }
    }

    /// The membership confirmed `node` dead, or saw it restart: what its
    /// (old) incarnation held here goes, and calls to it fail.
    fn member_gone(&mut self, node: NodeId) {
        self.dials.remove(&node);
        self.fail_queued_requests(node);
        self.outq.remove(&node);
        if let Some(link) = self.peers.get(&node).map(|p| p.link) {
            self.close_link(link, CloseReason::PeerDead);
        }
        // Also when the link was being closed by agreement (closing it
        // then does not lose the peer).
        self.peer_lost(node);
    }

    /// The membership learned of a newer incarnation of `node`: a link to
    /// an older one is dead (and with it what that one held here); a link
    /// to the new one already cleaned up when it came up.
    fn member_restarted(&mut self, node: NodeId) {
        let current = self.swim.as_ref().map_or(0, |m| m.incarnation(node));
        match self.peers.get(&node).map(|p| p.link) {
            Some(link) => {
                let old = self.links.get(&link).is_some_and(
                    |l| matches!(l.state, LinkState::Up { incarnation, .. } if incarnation < current),
                );
                if old {
                    self.dials.remove(&node);
                    self.fail_queued_requests(node);
                    self.close_link(link, CloseReason::PeerDead);
                    self.peer_lost(node);
                }
            }
            None => self.member_gone(node),
        }
    }

    /// An authenticated frame from `node` on `link`.
    fn on_up_msg(&mut self, link: LinkId, node: NodeId, msg: PeerMsg) {
        if self.swim.is_none() {
            return self.on_peer_msg(node, msg);
        }
        if is_use(&msg) {
            let resumed = match self.links.get_mut(&link) {
                Some(l) => {
                    l.last_use = self.now;
                    let r = l.bye == Bye::Acked;
                    if r {
                        l.bye = Bye::None;
                    }
                    r
                }
                None => false,
            };
            if resumed {
                self.flush(node);
            }
        }
        match msg {
            PeerMsg::Bye => {
                let state = self.links.get(&link).map(|l| l.bye);
                if state == Some(Bye::Sent) && self.cfg.node > node {
                    // Both proposed at once: the lower id answers ours and
                    // we close on its answer. Closing here instead (or on
                    // the higher side's proposal) could lose what the
                    // other side sent after its own proposal (withdrawing
                    // it): the other side would lose this peer, this side
                    // would keep what the other holds here (a name leaked,
                    // seed 16613).
                    return;
                }
                let ok = self.quiet(node) && state.is_some_and(|b| b != Bye::Acked);
                if ok {
                    self.send_link(link, &PeerMsg::ByeOk);
                    if let Some(l) = self.links.get_mut(&link) {
                        l.bye = Bye::Acked;
                    }
                }
            }
            PeerMsg::ByeOk => {
                let Some(l) = self.links.get_mut(&link) else {
                    return;
                };
                match (l.bye, l.proposed) {
                    (Bye::Sent, _) => {
                        self.idle_closed += 1;
                        self.close_link(link, CloseReason::Idle);
                    }
                    // The answer to a proposal this side withdrew by
                    // sending since: tell the peer, which holds its frames
                    // until this side closes or speaks, to go on.
                    (Bye::None, true) => {
                        l.proposed = false;
                        self.send_link(link, &PeerMsg::ByeOk);
                    }
                    // That word, on the side that agreed.
                    (Bye::Acked, _) => {
                        l.bye = Bye::None;
                        self.flush(node);
                    }
                    (Bye::None, false) => {}
                }
            }
            m @ (PeerMsg::Probe { .. }
            | PeerMsg::ProbeAck { .. }
            | PeerMsg::ProbeReq { .. }
            | PeerMsg::Join
            | PeerMsg::Members { .. }) => {
                let mut out = Vec::new();
                if let Some(s) = self.swim.as_mut() {
                    s.on_msg(self.now, node, m, &mut out);
                }
                self.apply_swim(out);
            }
            m => self.on_peer_msg(node, m),
        }
    }

    /// Gossip mode, every heartbeat: failed dials, dials to retry for
    /// queued one-way frames, idle links to close.
    fn gossip_housekeeping(&mut self) {
        let late: Vec<NodeId> = self
            .dials
            .iter()
            .filter(|(_, d)| d.deadline <= self.now)
            .map(|(n, _)| *n)
            .collect();
        for node in late {
            self.abandon_dial(node);
        }
        let waiting: Vec<NodeId> = self
            .outq
            .keys()
            .filter(|n| !self.peers.contains_key(n) && !self.dials.contains_key(n))
            .copied()
            .collect();
        for node in waiting {
            if self.gone(node) {
                self.outq.remove(&node);
            } else {
                self.ensure_dial(node);
            }
        }
        let Some(idle) = self
            .cfg
            .gossip
            .as_ref()
            .map(|g| g.link_idle.as_nanos() as u64)
        else {
            return;
        };
        let candidates: Vec<(LinkId, NodeId)> = self
            .peers
            .iter()
            .filter_map(|(n, p)| {
                let l = self.links.get(&p.link)?;
                let quiet_for = self.now.0.saturating_sub(l.last_use.0);
                match l.bye {
                    Bye::None if quiet_for >= idle => Some((p.link, *n)),
                    _ => None,
                }
            })
            .collect();
        for (link, node) in candidates {
            if self.quiet(node) {
                if let Some(l) = self.links.get_mut(&link) {
                    l.bye = Bye::Sent;
                    l.proposed = true;
                    // Ask again after another idle period if unanswered.
                    l.last_use = self.now;
                }
                self.send_link(link, &PeerMsg::Bye);
            }
        }
        // A proposal left unanswered (the peer was busy) is withdrawn so it
        // can be made again.
        for l in self.links.values_mut() {
            if l.bye == Bye::Sent && self.now.0.saturating_sub(l.last_use.0) >= idle {
                l.bye = Bye::None;
            }
        }
    }

    /// Nothing in progress with `node`: no calls to it, no requests of it
    /// unanswered, no copies with it.
    fn quiet(&self, node: NodeId) -> bool {
        !self.owed.contains_key(&node)
            && !self.outq.contains_key(&node)
            && !self.calls.values().any(|c| c.node == node)
            && !self.copy.involves(node)
    }

    /// A peer controller is gone: fail what waits on it, release what it held.
    fn peer_lost(&mut self, node: NodeId) {
        self.peers.remove(&node);
        self.owed.remove(&node);
        let reqs: Vec<u64> = self
            .calls
            .iter()
            .filter(|(_, c)| c.node == node)
            .map(|(r, _)| *r)
            .collect();
        for req in reqs {
            self.on_reply(node, req, Err(ErrorCode::PeerUnreachable));
        }
        self.copy.peer_lost(node, &mut self.fx);
        self.apply_effects();
        let held: Vec<CapKey> = self
            .store
            .nodes
            .iter()
            .filter(|(_, n)| n.holder == Holder::Node(node))
            .map(|(k, _)| k)
            .collect();
        for key in held {
            self.store
                .release(key, Holder::Node(node), &mut self.fallout);
        }
        self.names.peer_lost(node, &mut self.fx);
        self.apply_effects();
        // Monitors registered by the lost peer's processes go too: their
        // exits may never be reported (as with their names).
        let gone: Vec<(NodeId, u64)> = self
            .watchers
            .keys()
            .filter(|w| w.0 == node)
            .copied()
            .collect();
        for w in gone {
            self.drop_monitors(w);
        }
    }

    fn on_peer_msg(&mut self, from: NodeId, msg: PeerMsg) {
        match msg {
            PeerMsg::Hello { .. }
            | PeerMsg::HelloReply { .. }
            | PeerMsg::Finish { .. }
            | PeerMsg::Rejected { .. }
            | PeerMsg::Yield
            | PeerMsg::Probe { .. }
            | PeerMsg::ProbeAck { .. }
            | PeerMsg::ProbeReq { .. }
            | PeerMsg::Join
            | PeerMsg::Members { .. }
            | PeerMsg::Bye
            | PeerMsg::ByeOk
            | PeerMsg::Ping => {}
            PeerMsg::Request { req, body } => self.serve(from, req, body),
            PeerMsg::Reply { req, result } => self.on_reply(from, req, result),
            PeerMsg::Release { cap } => {
                if self.is_local(&cap) {
                    self.release_node_held(&cap);
                }
            }
            PeerMsg::CopyChunk { sink, offset, data } => {
                let now = self.now;
                let fx = &mut self.fx;
                self.copy
                    .chunk(now, from, sink, offset, data, &self.store, fx);
                self.apply_effects();
            }
            PeerMsg::CopyAck {
                source,
                offset,
                result,
            } => {
                let now = self.now;
                let fx = &mut self.fx;
                self.copy
                    .ack(now, from, source, offset, result, &self.store, fx);
                self.apply_effects();
            }
            PeerMsg::CopyClose { sink } => self.copy.close(from, sink),
            PeerMsg::MonitorsDrop { watcher } => self.drop_monitors((from, watcher)),
            PeerMsg::LookupCancel { req } => self.names.cancel_lookup(from, req),
        }
    }

    // --------------------------------------------------------------- monitors

    /// Owner side of monitor: `watcher` registers `notify` (held by this
    /// node) to be invoked when `cap` (owned here) dies.
    fn register_monitor(
        &mut self,
        cap: CapRef,
        notify: CapRef,
        watcher: (NodeId, u64),
    ) -> Result<(), ErrorCode> {
        let key = self.resolve_local(&cap)?;
        let held = self.watchers.get(&watcher).map_or(0, |s| s.len());
        if held >= self.cfg.limits.max_monitors_per_process {
            return Err(ErrorCode::LimitReached);
        }
        let m = self.monitors.insert(MonitorReg {
            notify,
            node: CapKey::default(),
            watcher,
        });
        match self
            .store
            .derive(key, DeriveKind::Transfer, Holder::Monitor(m))
        {
            Ok(node) => {
                self.monitors[m].node = node;
                self.watchers.entry(watcher).or_default().insert(m);
                Ok(())
            }
            Err(e) => {
                self.monitors.remove(m);
                Err(e)
            }
        }
    }

    fn unindex_monitor(&mut self, watcher: (NodeId, u64), m: MonitorKey) {
        if let Some(set) = self.watchers.get_mut(&watcher) {
            set.remove(&m);
            if set.is_empty() {
                self.watchers.remove(&watcher);
            }
        }
    }

    /// Drops every monitor `watcher` registered here, without firing them.
    fn drop_monitors(&mut self, watcher: (NodeId, u64)) {
        let Some(set) = self.watchers.remove(&watcher) else {
            return;
        };
        for m in set {
            if let Some(reg) = self.monitors.remove(m) {
                self.store
                    .release(reg.node, Holder::Monitor(m), &mut self.fallout);
                self.release_ref(reg.notify);
            }
        }
    }

    fn on_reply(&mut self, from: NodeId, req: u64, result: Result<PeerReply, ErrorCode>) {
        let call = match self.calls.get(&req) {
            Some(c) if c.node == from => self.calls.remove(&req).expect("present"),
            _ => {
                // Late (timed out) or foreign reply: give back any capability.
                if let Ok(PeerReply::Cap { cap, .. }) = result {
                    self.release_ref(cap);
                }
                return;
            }
        };
        match call.waiter {
            Waiter::Answer(origin) => self.answer(origin, result),
            Waiter::Lookup(origin) => {
                if let Origin::Proc { proc, .. } = origin {
                    if let Some(p) = self.procs.get_mut(proc) {
                        p.lookups.remove(&req);
                    }
                }
                self.answer(origin, result)
            }
            Waiter::Published { origin, name, sent } => {
                if let Origin::Proc { proc, .. } = origin {
                    // A timeout leaves the outcome unknown: keep the name
                    // listed so that exit withdraws it.
                    let maybe = !matches!(result, Err(e) if e != ErrorCode::Timeout);
                    self.names.publish_end(proc, &name, Some(sent), maybe);
                }
                self.answer(origin, result)
            }
            Waiter::Acquire { agg, index } => self.on_acquired(agg, index, result),
            Waiter::CopyStarted { origin, completion } => match (result, completion) {
                (Ok(_), Some(c)) => {
                    if self.is_local(&c) {
                        self.deliver(origin, c, Vec::new(), Vec::new());
                    } else {
                        let body = PeerRequest::Invoke {
                            target: c,
                            imms: Vec::new(),
                            caps: Vec::new(),
                        };
                        self.call(c.node, body, Waiter::Answer(origin));
                    }
                }
                (Ok(_), None) => self.answer(origin, Ok(PeerReply::Done)),
                (Err(e), _) => self.answer(origin, Err(e)),
            },
            Waiter::CopyOpened { source } => {
                self.copy.opened(source, result, &self.store, &mut self.fx);
                self.apply_effects();
            }
            Waiter::ReleaseAfter(cap) => {
                if let Ok(PeerReply::Cap { cap, .. }) = result {
                    self.release_ref(cap);
                }
                self.release_ref(cap);
            }
            Waiter::Ignore => {
                if let Ok(PeerReply::Cap { cap, .. }) = result {
                    self.release_ref(cap);
                }
            }
        }
    }

    /// Owner/home side of a peer request (or of a local one via loopback).
    fn serve(&mut self, from: NodeId, req: u64, body: PeerRequest) {
        if from != self.cfg.node {
            *self.owed.entry(from).or_default() += 1;
        }
        let origin = Origin::Peer { node: from, req };
        match body {
            PeerRequest::Derive {
                parent,
                holder,
                spec,
            } => {
                let bound: Vec<CapRef> = match &spec {
                    DeriveSpec::Bind { caps, .. } => caps.clone(),
                    _ => Vec::new(),
                };
                let result = self.resolve_local(&parent).and_then(|key| {
                    let kind = match spec {
                        DeriveSpec::Transfer => DeriveKind::Transfer,
                        DeriveSpec::Diminish {
                            offset,
                            len,
                            rights,
                        } => DeriveKind::Diminish {
                            offset,
                            len,
                            rights,
                        },
                        DeriveSpec::Bind { imms, caps } => {
                            DeriveKind::Bind(alloc::boxed::Box::new(Binds { imms, caps }))
                        }
                    };
                    self.store.derive(key, kind, Holder::Node(holder))
                });
                match result {
                    Ok(child) => {
                        let info = self.store.info(child).expect("just created");
                        self.answer(
                            origin,
                            Ok(PeerReply::Cap {
                                cap: self.cap_ref(child),
                                info,
                            }),
                        );
                    }
                    Err(e) => {
                        for c in bound {
                            self.release_ref(c);
                        }
                        self.answer(origin, Err(e));
                    }
                }
            }
            PeerRequest::Invoke { target, imms, caps } => self.deliver(origin, target, imms, caps),
            PeerRequest::Revoke { cap } => match self.resolve_local(&cap) {
                Ok(key) => self.revoke_cap(origin, key),
                Err(e) => self.answer(origin, Err(e)),
            },
            PeerRequest::Monitor {
                cap,
                notify,
                watcher,
            } => {
                let result = self.register_monitor(cap, notify, (from, watcher));
                if result.is_err() {
                    self.release_ref(notify);
                }
                self.answer(origin, result.map(|()| PeerReply::Done));
            }
            PeerRequest::CopyStart { src, dst } => match self.resolve_local(&src) {
                Ok(key) => {
                    let now = self.now;
                    let fx = &mut self.fx;
                    self.copy
                        .start_source(now, origin, key, dst, &self.store, fx);
                    self.apply_effects();
                }
                Err(e) => self.answer(origin, Err(e)),
            },
            PeerRequest::CopyOpen { dst, len, source } => match self.resolve_local(&dst) {
                Ok(key) => {
                    let now = self.now;
                    let fx = &mut self.fx;
                    self.copy
                        .open_sink(now, origin, from, key, len, source, &self.store, fx);
                    self.apply_effects();
                }
                Err(e) => self.answer(origin, Err(e)),
            },
            PeerRequest::Publish {
                name,
                cap,
                publisher,
            } => {
                self.names
                    .serve_publish(origin, from, name, cap, publisher, &mut self.fx);
                self.apply_effects();
            }
            PeerRequest::Unpublish { name, publisher } => {
                self.names
                    .serve_unpublish(origin, from, &name, publisher, &mut self.fx);
                self.apply_effects();
            }
            PeerRequest::Lookup { name, wait_ms } => {
                let now = self.now;
                self.names
                    .serve_lookup(now, origin, from, name, wait_ms, &mut self.fx);
                self.apply_effects();
            }
        }
    }

    // ----------------------------------------------------------------- timers

    fn on_timer(&mut self, at: Instant, t: Timer) {
        match t {
            Timer::Heartbeat => {
                // Silent links, and links whose handshake has not finished
                // within the peer timeout, are closed.
                let limit = self.cfg.peer_timeout.as_nanos() as u64;
                let silent: Vec<LinkId> = self
                    .links
                    .iter()
                    .filter(|(_, l)| {
                        self.now.0.saturating_sub(l.last_rx.0) > limit
                            || (l.peer().is_none() && self.now.0.saturating_sub(l.opened.0) > limit)
                    })
                    .map(|(k, _)| *k)
                    .collect();
                for link in silent {
                    self.close_link(link, CloseReason::PeerTimeout);
                }
                let authed: Vec<LinkId> = self
                    .links
                    .iter()
                    .filter(|(_, l)| l.peer().is_some())
                    .map(|(k, _)| *k)
                    .collect();
                for link in authed {
                    self.send_link(link, &PeerMsg::Ping);
                }
                if self.swim.is_some() {
                    self.gossip_housekeeping();
                }
                let next = at.after(self.cfg.heartbeat_interval).max(self.now);
                self.push_timer(next, Timer::Heartbeat);
            }
            Timer::Swim => {
                let mut out = Vec::new();
                let mut next = None;
                if let Some(m) = self.swim.as_mut() {
                    m.tick(self.now, &mut out);
                    next = self.cfg.gossip.as_ref().map(|g| g.protocol_period);
                }
                self.apply_swim(out);
                if let Some(p) = next {
                    self.push_timer(at.after(p).max(self.now), Timer::Swim);
                }
            }
            Timer::Probe(seq) => {
                let mut out = Vec::new();
                if let Some(m) = self.swim.as_mut() {
                    m.probe_timer(seq, &mut out);
                }
                self.apply_swim(out);
            }
            Timer::Call(req) => {
                if let Some(c) = self.calls.get(&req) {
                    if c.deadline <= self.now {
                        let node = c.node;
                        self.on_reply(node, req, Err(ErrorCode::Timeout));
                    }
                }
            }
            Timer::Source(k) => self.copy.source_timer(self.now, k, &mut self.fx),
            Timer::Sink(k) => self.copy.sink_timer(self.now, k, &mut self.fx),
            Timer::Barrier(k) => self.copy.barrier_timer(k, &mut self.fx),
            Timer::NameWaiter(k) => self.names.waiter_timer(self.now, k, &mut self.fx),
        }
        self.apply_effects();
    }
}

/// Whether a peer frame counts as use of its link (heartbeats and the
/// closing exchange do not).
fn is_use(msg: &PeerMsg) -> bool {
    !matches!(
        msg,
        PeerMsg::Ping
            | PeerMsg::Bye
            | PeerMsg::ByeOk
            | PeerMsg::Hello { .. }
            | PeerMsg::HelloReply { .. }
            | PeerMsg::Finish { .. }
            | PeerMsg::Rejected { .. }
            | PeerMsg::Yield
    )
}

/// Whether a peer frame belongs to the membership protocol.
fn is_gossip(msg: &PeerMsg) -> bool {
    matches!(
        msg,
        PeerMsg::Probe { .. }
            | PeerMsg::ProbeAck { .. }
            | PeerMsg::ProbeReq { .. }
            | PeerMsg::Join
            | PeerMsg::Members { .. }
    )
}

/// A capacity that avoids reallocations while encoding `msg`.
fn frame_capacity_hint(msg: &ControllerMsg) -> usize {
    match msg {
        ControllerMsg::Invocation { imms, caps, .. } => 24 + imms.len() + caps.len() * 14,
        ControllerMsg::MemWrite { data, .. } => 32 + data.len(),
        _ => 40,
    }
}
