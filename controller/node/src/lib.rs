//! The node driver: connection policy around the sans-IO controller core,
//! over any [`Channel`].
//!
//! A host (the appliance's smoltcp loop, the hosted controller's tokio
//! runtime, a test) owns the sockets and listeners. It hands every
//! established connection to [`Node::add`] (accepted) or [`Node::dialed`]
//! (dialled, when [`Node::poll_dial`] asked for it), then calls
//! [`Node::poll`] whenever something may have happened and at
//! [`Node::poll_timeout`]. One `poll` turn:
//!
//! 1. reads every connection through its [`FrameReader`] and feeds whole
//!    frames to the core (process or peer), reads metrics requests;
//! 2. enforces the attach timeout, the metrics timeout and the framing
//!    limit (an offending connection is closed);
//! 3. fires the core's timers, and performs the core's memory accesses
//!    for channels that reach their process's memory directly
//!    ([`Channel::direct_memory`]: shared memory, RDMA), at most
//!    [`MAX_MEMORY_ACCESSES_PER_POLL`] per turn;
//! 4. moves the core's outputs into per-connection queues (a connection
//!    whose queue passes [`NodeConfig::max_queued_bytes`] does not read:
//!    it is dropped) and closes what the core closes;
//! 5. pushes queued output into the channels as they accept it;
//! 6. reaps finished connections (closed, or lingering past
//!    [`NodeConfig::linger`]) and schedules re-dials of lost links.
//!
//! With gossip membership ([`fractos_core::Config::gossip`]) links are made
//! on demand: a peer is dialled (whatever its id) only when the core asks
//! ([`Output::Connect`]), a failed dial is reported to the core instead of
//! retried, and a closed link is not re-dialled until the core asks again.
//!
//! Nothing blocks, nothing reads a clock. Connection ids double as the
//! core's channel and link ids and are never reused.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

mod http;

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;
use core::time::Duration;

use fractos_core::{
    ChannelId, CloseReason, Config as CoreConfig, Controller, Dest, Instant, LinkId, LinkRole,
    LinkTraffic, MemAccess, Output, Traffic,
};
use fractos_transport::{Channel, FrameError, FrameReader};
use fractos_wire::{ErrorCode, Handle, NodeId};
use log::{debug, info, warn};

pub use http::MAX_HTTP_REQUEST;

/// The port processes attach to, on every kind of controller.
pub const PROCESS_PORT: u16 = 7100;
/// The port peer controllers link to.
pub const PEER_PORT: u16 = 7101;
/// The port of the Prometheus endpoint (`GET /metrics`).
pub const METRICS_PORT: u16 = 9100;

/// Direct memory accesses one [`Node::poll`] performs at most, so a long
/// copy between two directly reachable processes cannot starve the other
/// connections (the rest wait for the next turn, which `poll` asks for by
/// returning `true`).
pub const MAX_MEMORY_ACCESSES_PER_POLL: usize = 64;

/// What a connection is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConnKind {
    /// A process channel.
    Process,
    /// A link to a peer controller.
    Peer,
    /// A `GET /metrics` client.
    Metrics,
}

impl ConnKind {
    fn index(self) -> usize {
        self as usize
    }
}

/// A connection, as numbered by the node (also the core's channel or link
/// id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// How the node driver is set up; the same schema for every host.
#[derive(Clone, Debug)]
pub struct NodeConfig<A> {
    /// The controller core's configuration (node, key, members, limits).
    pub core: CoreConfig,
    /// Peers and their addresses (in the host's address type). Without
    /// gossip only peers with a higher node id are dialled (the others dial
    /// us); with gossip any of them is dialled when the core needs it.
    pub peers: Vec<(NodeId, A)>,
    /// Process connections at once.
    pub max_process_conns: usize,
    /// Accepted peer connections at once (dialled ones are one per peer).
    pub max_peer_conns: usize,
    /// Metrics connections at once.
    pub max_metrics_conns: usize,
    /// Output bytes allowed to wait for one slow connection.
    pub max_queued_bytes: usize,
    /// Time a new process connection has to send its first frame.
    pub attach_timeout: Duration,
    /// Time a metrics client has to send its request and take the answer.
    pub metrics_timeout: Duration,
    /// Time a finished connection may take to drain before it is aborted.
    pub linger: Duration,
    /// First and longest delay between attempts to dial a peer.
    pub dial_backoff: (Duration, Duration),
}

impl<A> NodeConfig<A> {
    /// The defaults both hosts use.
    pub fn new(core: CoreConfig) -> Self {
        NodeConfig {
            core,
            peers: Vec::new(),
            max_process_conns: 1024,
            max_peer_conns: 64,
            max_metrics_conns: 4,
            max_queued_bytes: 64 << 20,
            attach_timeout: Duration::from_secs(10),
            metrics_timeout: Duration::from_secs(5),
            linger: Duration::from_secs(2),
            dial_backoff: (Duration::from_millis(50), Duration::from_secs(1)),
        }
    }
}

/// Counters the node keeps besides the core's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Connections added, by kind: processes, peers, metrics.
    pub accepted: [u64; 3],
    /// Links dialled successfully.
    pub dialled: u64,
    /// Connections closed for unframeable input.
    pub unframeable: u64,
    /// Processes disconnected for not attaching in time.
    pub attach_timeouts: u64,
    /// Metrics clients dropped for being too slow.
    pub metrics_timeouts: u64,
    /// Connections dropped for not reading their output.
    pub stuck: u64,
    /// Direct memory reads performed for the core, and their bytes.
    pub direct_reads: u64,
    /// Bytes read directly.
    pub direct_read_bytes: u64,
    /// Direct memory writes performed for the core.
    pub direct_writes: u64,
    /// Bytes written directly.
    pub direct_write_bytes: u64,
    /// Direct accesses refused (outside every region, or the channel is
    /// gone or has no direct memory).
    pub direct_faults: u64,
    /// Device writes ended with every byte delivered
    /// ([`Node::device_write_end`]).
    pub device_writes: u64,
    /// Bytes of those.
    pub device_write_bytes: u64,
    /// Connections currently open, by kind.
    pub open: [usize; 3],
    /// Most accepted (not dialled) connections of each kind open at once
    /// since the node started: what the connection limits bound.
    pub accepted_peak: [usize; 3],
}

/// A device write granted by [`Node::device_write_begin`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceGrant {
    /// Grant id, for [`Node::device_write_valid`] and
    /// [`Node::device_write_end`].
    pub id: u64,
    /// The address the device writes the first byte to (physically
    /// contiguous for the granted length).
    pub address: u64,
}

struct Conn<Cx: ?Sized> {
    ch: Box<dyn Channel<Cx>>,
    kind: ConnKind,
    opened: Instant,
    frames_in: u64,
    reader: FrameReader,
    /// Metrics: the request bytes read so far.
    request: Vec<u8>,
    /// Metrics: the request is complete and waits for the host's answer.
    asked: bool,
    out: VecDeque<Vec<u8>>,
    /// Bytes of `out.front()` already sent.
    out_at: usize,
    queued: usize,
    /// Set once finished with: the core knows; output drains, then the
    /// channel closes.
    closing: Option<Instant>,
    /// Whether `close` was called on the channel.
    shut: bool,
    /// The peer this side dialled, if it did.
    dialed: Option<NodeId>,
    traffic: LinkTraffic,
    /// Device writes into this process's memory not yet ended: the channel
    /// (and the memory behind it, e.g. a shared-memory slot another
    /// process could attach to) is kept until they have.
    device_writes: usize,
}

enum DialState {
    /// Gossip mode: dialled only when the core asks.
    OnDemand,
    Idle {
        next: Instant,
    },
    Dialing,
    Up(ConnId),
}

struct Dialer<A> {
    node: NodeId,
    addr: A,
    state: DialState,
    backoff: Duration,
}

/// The node driver. See the crate documentation.
pub struct Node<Cx: ?Sized, A> {
    cfg: NodeConfig<A>,
    ctrl: Controller,
    conns: BTreeMap<u64, Conn<Cx>>,
    /// Device writes granted: id → (owner's connection, bytes).
    grants: BTreeMap<u64, (u64, u64)>,
    dialers: Vec<Dialer<A>>,
    next_id: u64,
    traffic: Traffic,
    stats: NodeStats,
    metrics_asks: VecDeque<ConnId>,
    now: Instant,
    /// When [`Node::new`] made the node: `fractos_uptime_seconds` counts
    /// from here.
    started: Instant,
}

fn elapsed(now: Instant, since: Instant) -> Duration {
    Duration::from_nanos(now.0.saturating_sub(since.0))
}

impl<Cx: ?Sized, A: Clone> Node<Cx, A> {
    /// A node with no connections, at `now`.
    pub fn new(cfg: NodeConfig<A>, now: Instant) -> Self {
        let me = cfg.core.node;
        let on_demand = cfg.core.gossip.is_some();
        let dialers = cfg
            .peers
            .iter()
            .filter(|(n, _)| *n > me || (on_demand && *n != me))
            .map(|(node, addr)| Dialer {
                node: *node,
                addr: addr.clone(),
                state: if on_demand {
                    DialState::OnDemand
                } else {
                    DialState::Idle { next: now }
                },
                backoff: cfg.dial_backoff.0,
            })
            .collect();
        Node {
            ctrl: Controller::new(cfg.core.clone(), now),
            cfg,
            conns: BTreeMap::new(),
            grants: BTreeMap::new(),
            dialers,
            next_id: 1,
            traffic: Traffic::default(),
            stats: NodeStats::default(),
            metrics_asks: VecDeque::new(),
            now,
            started: now,
        }
    }

    /// The controller core.
    pub fn controller(&self) -> &Controller {
        &self.ctrl
    }

    /// The configuration in force.
    pub fn config(&self) -> &NodeConfig<A> {
        &self.cfg
    }

    /// The node's own counters.
    pub fn stats(&self) -> NodeStats {
        let mut s = self.stats;
        for c in self.conns.values() {
            s.open[c.kind.index()] += 1;
        }
        s
    }

    /// Whether another connection of `kind` is welcome. Hosts stop
    /// listening (or refuse at once) while it is not.
    pub fn accepts(&self, kind: ConnKind) -> bool {
        let max = match kind {
            ConnKind::Process => self.cfg.max_process_conns,
            ConnKind::Peer => self.cfg.max_peer_conns,
            ConnKind::Metrics => self.cfg.max_metrics_conns,
        };
        self.accepted_open(kind) < max
    }

    /// Open connections of `kind` that were accepted (not dialled).
    fn accepted_open(&self, kind: ConnKind) -> usize {
        self.conns
            .values()
            .filter(|c| c.kind == kind && c.dialed.is_none())
            .count()
    }

    fn insert(&mut self, now: Instant, kind: ConnKind, ch: Box<dyn Channel<Cx>>) -> ConnId {
        let id = self.next_id;
        self.next_id += 1;
        self.stats.accepted[kind.index()] += 1;
        let max = self.cfg.core.limits.max_message_len;
        self.conns.insert(
            id,
            Conn {
                ch,
                kind,
                opened: now,
                frames_in: 0,
                reader: FrameReader::new(max),
                request: Vec::new(),
                asked: false,
                out: VecDeque::new(),
                out_at: 0,
                queued: 0,
                closing: None,
                shut: false,
                dialed: None,
                traffic: LinkTraffic::default(),
                device_writes: 0,
            },
        );
        ConnId(id)
    }

    /// An accepted connection of `kind`. Processes must attach; peers are
    /// handshake responders.
    pub fn add(&mut self, now: Instant, kind: ConnKind, ch: Box<dyn Channel<Cx>>) -> ConnId {
        self.now = now;
        let id = self.insert(now, kind, ch);
        let open = self.accepted_open(kind);
        let peak = &mut self.stats.accepted_peak[kind.index()];
        *peak = (*peak).max(open);
        match kind {
            ConnKind::Process => {
                self.ctrl.process_connected(now, ChannelId(id.0));
                let direct = self
                    .conns
                    .get_mut(&id.0)
                    .is_some_and(|c| c.ch.direct_memory().is_some());
                if direct {
                    self.ctrl.set_direct_memory(ChannelId(id.0), true);
                }
            }
            ConnKind::Peer => self
                .ctrl
                .link_connected(now, LinkId(id.0), LinkRole::Responder),
            ConnKind::Metrics => {}
        }
        id
    }

    /// Adds a peer to keep a link to (dialled if its id is higher than
    /// ours; otherwise it dials us). Known peers are left as they are.
    pub fn add_peer(&mut self, now: Instant, node: NodeId, addr: A) {
        let on_demand = self.on_demand();
        let wanted = node > self.cfg.core.node || (on_demand && node != self.cfg.core.node);
        if !wanted || self.dialers.iter().any(|d| d.node == node) {
            return;
        }
        self.dialers.push(Dialer {
            node,
            addr,
            state: if on_demand {
                DialState::OnDemand
            } else {
                DialState::Idle { next: now }
            },
            backoff: self.cfg.dial_backoff.0,
        });
    }

    fn on_demand(&self) -> bool {
        self.cfg.core.gossip.is_some()
    }

    /// The peer the host should dial now, if any (lower ids dial, with
    /// backoff). Report the outcome with [`Node::dialed`] or
    /// [`Node::dial_failed`].
    pub fn poll_dial(&mut self, now: Instant) -> Option<(NodeId, A)> {
        self.now = now;
        let d = self
            .dialers
            .iter_mut()
            .find(|d| matches!(d.state, DialState::Idle { next } if next <= now))?;
        d.state = DialState::Dialing;
        Some((d.node, d.addr.clone()))
    }

    /// A dial of `node` succeeded: the link's handshake starts (this side
    /// initiates).
    pub fn dialed(&mut self, now: Instant, node: NodeId, ch: Box<dyn Channel<Cx>>) -> ConnId {
        self.now = now;
        let id = self.insert(now, ConnKind::Peer, ch);
        if let Some(c) = self.conns.get_mut(&id.0) {
            c.dialed = Some(node);
        }
        if let Some(d) = self.dialers.iter_mut().find(|d| d.node == node) {
            d.state = DialState::Up(id);
            d.backoff = self.cfg.dial_backoff.0;
        }
        self.stats.dialled += 1;
        info!("node: peer link {} to node {} up", id.0, node.0);
        self.ctrl
            .link_connected(now, LinkId(id.0), LinkRole::Initiator { peer: node });
        id
    }

    /// A dial of `node` failed; it is retried after a backoff (with
    /// gossip: the core is told, and asks again when it needs the link).
    pub fn dial_failed(&mut self, now: Instant, node: NodeId) {
        self.now = now;
        let max = self.cfg.dial_backoff.1;
        let on_demand = self.on_demand();
        if let Some(d) = self.dialers.iter_mut().find(|d| d.node == node) {
            if on_demand {
                d.state = DialState::OnDemand;
            } else {
                Self::backoff(d, now, max);
            }
        }
        if on_demand {
            self.ctrl.dial_failed(now, node);
        }
    }

    fn backoff(d: &mut Dialer<A>, now: Instant, max: Duration) {
        d.state = DialState::Idle {
            next: now.after(d.backoff),
        };
        d.backoff = (d.backoff * 2).min(max);
    }

    /// Metrics requests waiting for an answer: the host renders
    /// [`Node::metrics_text`] plus its own gauges and calls
    /// [`Node::answer_metrics`].
    pub fn poll_metrics_request(&mut self) -> Option<ConnId> {
        while let Some(id) = self.metrics_asks.pop_front() {
            if self
                .conns
                .get(&id.0)
                .is_some_and(|c| c.asked && c.closing.is_none())
            {
                return Some(id);
            }
        }
        None
    }

    /// Answers metrics request `id` with `body` (Prometheus text).
    pub fn answer_metrics(&mut self, id: ConnId, body: &str) {
        let now = self.now;
        if let Some(c) = self.conns.get_mut(&id.0) {
            c.asked = false;
            http::respond(
                c,
                now,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                body,
            );
        }
    }

    /// Traffic so far (live links included).
    pub fn traffic(&self) -> Traffic {
        let mut t = self.traffic.clone();
        for (&id, c) in &self.conns {
            if let Some(node) = self.link_node(id, c) {
                t.peers.entry(node.0).or_default().add(&c.traffic);
            }
        }
        t
    }

    /// The Prometheus text of the core and of this node's connections.
    pub fn metrics_text(&self) -> String {
        use core::fmt::Write;
        let mut text = fractos_core::prometheus::render(&self.ctrl, &self.traffic());
        let s = self.stats();
        let node = self.cfg.core.node.0;
        let _ = writeln!(
            text,
            "# HELP fractos_uptime_seconds Seconds since the node started (as of its last event-loop turn).\n\
             # TYPE fractos_uptime_seconds gauge\n\
             fractos_uptime_seconds{{node=\"{node}\"}} {:.3}",
            elapsed(self.now, self.started).as_secs_f64()
        );
        let _ = writeln!(
            text,
            "# HELP fractos_node_connections Open connections, by kind.\n\
             # TYPE fractos_node_connections gauge\n\
             fractos_node_connections{{node=\"{node}\",kind=\"process\"}} {}\n\
             fractos_node_connections{{node=\"{node}\",kind=\"peer\"}} {}\n\
             fractos_node_connections{{node=\"{node}\",kind=\"metrics\"}} {}",
            s.open[0], s.open[1], s.open[2]
        );
        let _ = writeln!(
            text,
            "# HELP fractos_node_accepted_total Connections taken, by kind.\n\
             # TYPE fractos_node_accepted_total counter\n\
             fractos_node_accepted_total{{node=\"{node}\",kind=\"process\"}} {}\n\
             fractos_node_accepted_total{{node=\"{node}\",kind=\"peer\"}} {}\n\
             fractos_node_accepted_total{{node=\"{node}\",kind=\"metrics\"}} {}",
            s.accepted[0], s.accepted[1], s.accepted[2]
        );
        let _ = writeln!(
            text,
            "# HELP fractos_node_accepted_peak Most accepted connections open at once since start, by kind (bounded by the connection limits).\n\
             # TYPE fractos_node_accepted_peak gauge\n\
             fractos_node_accepted_peak{{node=\"{node}\",kind=\"process\"}} {}\n\
             fractos_node_accepted_peak{{node=\"{node}\",kind=\"peer\"}} {}\n\
             fractos_node_accepted_peak{{node=\"{node}\",kind=\"metrics\"}} {}",
            s.accepted_peak[0], s.accepted_peak[1], s.accepted_peak[2]
        );
        let _ = writeln!(
            text,
            "# HELP fractos_node_dropped_total Connections dropped, by reason.\n\
             # TYPE fractos_node_dropped_total counter\n\
             fractos_node_dropped_total{{node=\"{node}\",reason=\"unframeable\"}} {}\n\
             fractos_node_dropped_total{{node=\"{node}\",reason=\"attach_timeout\"}} {}\n\
             fractos_node_dropped_total{{node=\"{node}\",reason=\"metrics_timeout\"}} {}\n\
             fractos_node_dropped_total{{node=\"{node}\",reason=\"stuck\"}} {}",
            s.unframeable, s.attach_timeouts, s.metrics_timeouts, s.stuck
        );
        let _ = writeln!(
            text,
            "# HELP fractos_node_direct_memory_bytes_total Bytes of process memory read or written directly (shared memory, RDMA), without MemRead/MemWrite messages.\n\
             # TYPE fractos_node_direct_memory_bytes_total counter\n\
             fractos_node_direct_memory_bytes_total{{node=\"{node}\",op=\"read\"}} {}\n\
             fractos_node_direct_memory_bytes_total{{node=\"{node}\",op=\"write\"}} {}\n\
             # HELP fractos_node_direct_memory_faults_total Direct memory accesses refused (outside every registered region).\n\
             # TYPE fractos_node_direct_memory_faults_total counter\n\
             fractos_node_direct_memory_faults_total{{node=\"{node}\"}} {}",
            s.direct_read_bytes, s.direct_write_bytes, s.direct_faults
        );
        text
    }

    /// When [`Node::poll`] must run next at the latest (the core's
    /// deadline, attach and metrics deadlines, linger, re-dials).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut at = self.ctrl.poll_timeout();
        let mut earlier = |t: Instant| at = Some(at.map_or(t, |a| a.min(t)));
        for c in self.conns.values() {
            match (c.closing, c.kind) {
                (Some(since), _) => earlier(since.after(self.cfg.linger)),
                (None, ConnKind::Process) if c.frames_in == 0 => {
                    earlier(c.opened.after(self.cfg.attach_timeout))
                }
                (None, ConnKind::Metrics) => earlier(c.opened.after(self.cfg.metrics_timeout)),
                _ => {}
            }
        }
        for d in &self.dialers {
            if let DialState::Idle { next } = d.state {
                earlier(next);
            }
        }
        at
    }

    /// One turn at `now` (see the crate documentation). Returns whether
    /// anything moved.
    pub fn poll(&mut self, now: Instant, cx: &mut Cx) -> bool {
        self.now = now;
        let mut moved = self.receive(now, cx);
        if self.ctrl.poll_timeout().is_some_and(|t| t <= now) {
            self.ctrl.handle_timeout(now);
        }
        moved |= self.serve_memory(now, cx);
        moved |= self.route(now, cx);
        moved |= self.transmit(cx);
        moved |= self.reap(now, cx);
        moved
    }

    /// Disconnects every process (the core revokes what they own) and
    /// closes every link; keep polling until [`Node::is_idle`] to flush.
    pub fn shutdown(&mut self, now: Instant, cx: &mut Cx) {
        self.now = now;
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            self.finish(id, now, false, cx);
        }
        self.dialers.clear();
        self.route(now, cx);
        self.transmit(cx);
    }

    /// Whether no connection is left.
    pub fn is_idle(&self) -> bool {
        self.conns.is_empty()
    }

    fn receive(&mut self, now: Instant, cx: &mut Cx) -> bool {
        let mut moved = false;
        let ids: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.closing.is_none())
            .map(|(k, _)| *k)
            .collect();
        for id in ids {
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            let (fail, gone) = match c.kind {
                ConnKind::Metrics => {
                    let r = http::read(c, cx);
                    if let Ok(true) = r {
                        moved = true;
                    }
                    match r {
                        Ok(_) => {
                            if let Some(answer) = http::parse(c) {
                                match answer {
                                    http::Request::Metrics => {
                                        c.asked = true;
                                        self.metrics_asks.push_back(ConnId(id));
                                    }
                                    http::Request::Refused { status, body } => {
                                        http::respond(c, now, status, "text/plain", body);
                                    }
                                }
                            }
                            (false, false)
                        }
                        Err(_) => (false, true),
                    }
                }
                ConnKind::Process | ConnKind::Peer => {
                    let (m, fail) = self.deliver(id, now, cx);
                    moved |= m;
                    let gone = self.conns.get(&id).is_some_and(|c| c.reader.is_closed());
                    (fail, gone)
                }
            };
            let Some(c) = self.conns.get(&id) else {
                continue;
            };
            if c.closing.is_some() {
                continue;
            }
            let late = match c.kind {
                ConnKind::Process => {
                    c.frames_in == 0 && elapsed(now, c.opened) > self.cfg.attach_timeout
                }
                ConnKind::Metrics => elapsed(now, c.opened) > self.cfg.metrics_timeout,
                ConnKind::Peer => false,
            };
            if late {
                match c.kind {
                    ConnKind::Process => {
                        self.stats.attach_timeouts += 1;
                        debug!("node: channel {id} sent nothing in time; closing");
                    }
                    _ => {
                        self.stats.metrics_timeouts += 1;
                        debug!("node: metrics client {id} too slow; dropped");
                    }
                }
            }
            if fail || gone || late {
                self.finish(id, now, fail || late, cx);
                moved = true;
            }
        }
        moved
    }

    /// Reads connection `id` and hands its whole frames to the core.
    /// Returns (moved, unframeable-or-broken).
    fn deliver(&mut self, id: u64, now: Instant, cx: &mut Cx) -> (bool, bool) {
        let Some(c) = self.conns.get_mut(&id) else {
            return (false, false);
        };
        let mut moved = false;
        let mut fail = match c.reader.fill(&mut *c.ch, cx) {
            Ok(m) => {
                moved = m;
                false
            }
            Err(FrameError::Unframeable(e)) => {
                debug!("node: connection {id}: unframeable input ({e}); closing");
                self.stats.unframeable += 1;
                true
            }
            Err(FrameError::Transport(e)) => {
                debug!("node: connection {id}: {e}");
                true
            }
        };
        while !fail {
            match c.reader.next_frame() {
                Ok(Some(body)) => {
                    moved = true;
                    c.frames_in += 1;
                    let n = body.len() as u64 + 4;
                    match c.kind {
                        ConnKind::Process => {
                            self.traffic.processes.frames_in += 1;
                            self.traffic.processes.bytes_in += n;
                            self.ctrl.process_message(now, ChannelId(id), body);
                        }
                        _ => {
                            c.traffic.frames_in += 1;
                            c.traffic.bytes_in += n;
                            self.ctrl.link_message(now, LinkId(id), body);
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    debug!("node: connection {id}: {e}; closing");
                    self.stats.unframeable += 1;
                    fail = true;
                }
            }
        }
        (moved, fail)
    }

    /// Performs the core's direct memory accesses (bounded per turn).
    fn serve_memory(&mut self, now: Instant, cx: &mut Cx) -> bool {
        let mut moved = false;
        for _ in 0..MAX_MEMORY_ACCESSES_PER_POLL {
            let Some(access) = self.ctrl.poll_mem_access() else {
                break;
            };
            moved = true;
            let chan = access.chan();
            let mem = self
                .conns
                .get_mut(&chan.0)
                .filter(|c| c.closing.is_none())
                .and_then(|c| c.ch.direct_memory());
            match access {
                MemAccess::Read {
                    xfer, addr, len, ..
                } => {
                    let mut buf = alloc::vec![0; len as usize];
                    let r = match mem {
                        Some(m) => m.read(cx, addr, &mut buf).map(|()| buf),
                        None => Err(ErrorCode::MemoryFault),
                    };
                    match &r {
                        Ok(b) => {
                            self.stats.direct_reads += 1;
                            self.stats.direct_read_bytes += b.len() as u64;
                        }
                        Err(_) => self.stats.direct_faults += 1,
                    }
                    self.ctrl.mem_read_done(now, chan, xfer, r);
                }
                MemAccess::Write {
                    xfer, addr, data, ..
                } => {
                    let r = match mem {
                        Some(m) => m.write(cx, addr, &data),
                        None => Err(ErrorCode::MemoryFault),
                    };
                    match r {
                        Ok(()) => {
                            self.stats.direct_writes += 1;
                            self.stats.direct_write_bytes += data.len() as u64;
                        }
                        Err(_) => self.stats.direct_faults += 1,
                    }
                    self.ctrl.mem_write_done(now, chan, xfer, r);
                }
            }
        }
        moved
    }

    /// Lets a device of this machine write `len` bytes straight into the
    /// memory behind the Memory capability `handle` of the process on
    /// `holder` (see [`Controller::device_write_begin`], which validates
    /// the capability): the grant and the device address to write.
    /// `InvalidArgument` when devices cannot reach that memory (its channel
    /// has no [`DirectMemory::device_address`] for it).
    ///
    /// Until [`Node::device_write_end`], the owner's channel is kept (not
    /// released) even if it closes, so its memory is never handed to
    /// anyone else while the device may write it. Check
    /// [`Node::device_write_valid`] before each device command.
    ///
    /// [`DirectMemory::device_address`]: fractos_transport::DirectMemory::device_address
    pub fn device_write_begin(
        &mut self,
        now: Instant,
        holder: ConnId,
        handle: Handle,
        len: u64,
    ) -> Result<DeviceGrant, ErrorCode> {
        let g = self
            .ctrl
            .device_write_begin(now, ChannelId(holder.0), handle, len)?;
        let conn = self
            .conns
            .get_mut(&g.chan.0)
            .filter(|c| c.closing.is_none());
        let address = match (conn, usize::try_from(len)) {
            (Some(c), Ok(n)) => {
                c.ch.direct_memory()
                    .and_then(|m| m.device_address(g.addr, n))
                    .map(|a| (c, a))
            }
            _ => None,
        };
        match address {
            Some((c, address)) => {
                c.device_writes += 1;
                self.grants.insert(g.id, (g.chan.0, len));
                Ok(DeviceGrant { id: g.id, address })
            }
            None => {
                let _ = self.ctrl.device_write_end(now, g.id, false);
                Err(ErrorCode::InvalidArgument)
            }
        }
    }

    /// Whether device write `id` may go on (its capability alive, its
    /// process attached).
    pub fn device_write_valid(&self, id: u64) -> bool {
        self.grants.contains_key(&id) && self.ctrl.device_write_valid(id)
    }

    /// Device write `id` ended (`ok`: every byte written); see
    /// [`Controller::device_write_end`]. Call it only once the device can
    /// no longer touch the memory: a command whose outcome is unknown must
    /// keep its grant forever.
    pub fn device_write_end(&mut self, now: Instant, id: u64, ok: bool) -> Result<(), ErrorCode> {
        let Some((chan, len)) = self.grants.remove(&id) else {
            return Err(ErrorCode::InvalidArgument);
        };
        if let Some(c) = self.conns.get_mut(&chan) {
            c.device_writes = c.device_writes.saturating_sub(1);
        }
        let r = self.ctrl.device_write_end(now, id, ok);
        if r.is_ok() {
            self.stats.device_writes += 1;
            self.stats.device_write_bytes += len;
        }
        r
    }

    /// Marks connection `id` finished: tells the core (unless it asked for
    /// the close itself) and lets output drain; `abort` drops the output
    /// and closes at once.
    fn finish(&mut self, id: u64, now: Instant, abort: bool, cx: &mut Cx) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.closing.is_some() {
            return;
        }
        c.closing = Some(now);
        if abort {
            c.out.clear();
            c.out_at = 0;
            c.queued = 0;
            c.ch.close(cx);
            c.shut = true;
        }
        match c.kind {
            ConnKind::Process => self.ctrl.process_disconnected(now, ChannelId(id)),
            ConnKind::Peer => {
                info!("node: peer link {id} down");
                self.ctrl.link_disconnected(now, LinkId(id));
            }
            ConnKind::Metrics => {}
        }
    }

    /// Moves the core's outputs into the connections' queues.
    fn route(&mut self, now: Instant, cx: &mut Cx) -> bool {
        let mut moved = false;
        while let Some(out) = self.ctrl.poll_output() {
            moved = true;
            match out {
                Output::Send { to, frame } => {
                    let id = match to {
                        Dest::Process(c) => c.0,
                        Dest::Link(l) => l.0,
                    };
                    let n = frame.len();
                    if matches!(to, Dest::Process(_)) {
                        self.traffic.processes.frames_out += 1;
                        self.traffic.processes.bytes_out += n as u64;
                    }
                    let Some(c) = self.conns.get_mut(&id) else {
                        continue;
                    };
                    if c.closing.is_some() {
                        continue;
                    }
                    if matches!(to, Dest::Link(_)) {
                        c.traffic.frames_out += 1;
                        c.traffic.bytes_out += n as u64;
                    }
                    if c.queued + n > self.cfg.max_queued_bytes {
                        warn!("node: connection {id} does not read its output; dropping it");
                        self.stats.stuck += 1;
                        self.finish(id, now, true, cx);
                        continue;
                    }
                    c.queued += n;
                    c.out.push_back(frame);
                }
                Output::Connect { peer } => {
                    match self.dialers.iter_mut().find(|d| d.node == peer) {
                        Some(d) if matches!(d.state, DialState::OnDemand) => {
                            d.state = DialState::Idle { next: now };
                        }
                        Some(_) => {}
                        None => {
                            warn!("node: no address for node {}; cannot link to it", peer.0);
                            self.ctrl.dial_failed(now, peer);
                        }
                    }
                }
                Output::Close { to, reason } => {
                    let id = match to {
                        Dest::Process(c) => c.0,
                        Dest::Link(l) => l.0,
                    };
                    if reason != CloseReason::Duplicate {
                        debug!("node: core closes connection {id} ({reason:?})");
                    }
                    if let Some(c) = self.conns.get_mut(&id) {
                        // The core already forgot it: drain what it sent
                        // last (e.g. the error explaining the close).
                        c.closing.get_or_insert(now);
                    }
                }
            }
        }
        moved
    }

    /// Pushes queued output into the channels; starts closing finished
    /// connections whose output drained.
    fn transmit(&mut self, cx: &mut Cx) -> bool {
        let mut moved = false;
        for c in self.conns.values_mut() {
            while let Some(front) = c.out.front() {
                match c.ch.send(cx, &front[c.out_at..]) {
                    Ok(0) => break,
                    Ok(n) => {
                        moved = true;
                        c.out_at += n;
                        c.queued -= n;
                        if c.out_at == front.len() {
                            c.out.pop_front();
                            c.out_at = 0;
                        }
                    }
                    Err(_) => {
                        // Broken: drop the output; the reap takes it.
                        c.out.clear();
                        c.out_at = 0;
                        c.queued = 0;
                        break;
                    }
                }
            }
            if c.closing.is_some() && c.out.is_empty() && !c.shut {
                c.ch.close(cx);
                c.shut = true;
            }
        }
        moved
    }

    /// Removes finished connections; notices channels that broke.
    fn reap(&mut self, now: Instant, cx: &mut Cx) -> bool {
        let mut broken = Vec::new();
        let mut done = Vec::new();
        for (&id, c) in self.conns.iter_mut() {
            match c.closing {
                Some(since) => {
                    if c.ch.is_finished(cx) || elapsed(now, since) > self.cfg.linger {
                        done.push(id);
                    }
                }
                None => {
                    if c.ch.is_finished(cx) {
                        broken.push(id);
                    }
                }
            }
        }
        for &id in &broken {
            self.finish(id, now, true, cx);
            done.push(id);
        }
        // Memory a device may still write stays with its channel.
        done.retain(|id| self.conns.get(id).is_some_and(|c| c.device_writes == 0));
        let moved = !done.is_empty();
        for id in done {
            let Some(mut c) = self.conns.remove(&id) else {
                continue;
            };
            if !c.ch.is_finished(cx) {
                // Lingered too long: reset the other side.
                c.ch.abort(cx);
            }
            c.ch.release(cx);
            if c.kind == ConnKind::Peer {
                if let Some(node) = c.dialed.or_else(|| self.ctrl.link_peer(LinkId(id))) {
                    self.traffic
                        .peers
                        .entry(node.0)
                        .or_default()
                        .add(&c.traffic);
                }
            }
            let max = self.cfg.dial_backoff.1;
            let on_demand = self.on_demand();
            for d in self.dialers.iter_mut() {
                if matches!(d.state, DialState::Up(ConnId(x)) if x == id) {
                    if on_demand {
                        d.state = DialState::OnDemand;
                    } else {
                        Self::backoff(d, now, max);
                    }
                }
            }
        }
        // A route/transmit may be owed for what `finish` produced.
        if moved {
            self.route(now, cx);
        }
        moved
    }

    fn link_node(&self, id: u64, c: &Conn<Cx>) -> Option<NodeId> {
        if c.kind != ConnKind::Peer {
            return None;
        }
        c.dialed.or_else(|| self.ctrl.link_peer(LinkId(id)))
    }
}

#[cfg(test)]
mod tests;
