//! The appliance's controller service: the sans-IO controller core
//! ([`fractos_core::Controller`]) served over smoltcp TCP, with the same
//! wire protocol and ports as the hosted controller.
//!
//! [`Service::poll`] is one turn of the appliance's event loop: it polls
//! every NIC's smoltcp interface, accepts process, peer and metrics
//! connections, feeds complete frames to the core, fires the core's timers,
//! queues the core's output frames per connection and pushes them into the
//! TCP send buffers as space allows. Nothing blocks and nothing reads a
//! clock: the kernel passes the time in and calls `poll` in a loop (no
//! interrupts). Being generic over [`smoltcp::phy::Device`], the same code
//! runs on the host in unit tests over an in-memory link.
//!
//! Resource bounds (what keeps random bytes, malformed frames and floods of
//! connections from exhausting the appliance):
//! * at most [`ServiceConfig::max_process_conns`] process connections (and
//!   [`ServiceConfig::max_metrics_conns`] metrics connections); when all
//!   are taken no socket listens and smoltcp answers new SYNs with RST;
//! * a process must send its first frame within
//!   [`ServiceConfig::attach_timeout_ns`] or is disconnected;
//! * a frame longer than the core's `max_message_len` closes the connection
//!   (the core closes it on undecodable bodies);
//! * at most [`ServiceConfig::max_queued_bytes`] of output may wait for a
//!   slow reader; past that a process is disconnected and a link closed,
//!   as the hosted controller does.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::net::Ipv4Addr;

use fractos_core::{
    ChannelId, CloseReason, Config as CoreConfig, Controller, Dest, Instant, LinkId, LinkRole,
    LinkTraffic, Output, Traffic,
};
use fractos_wire::{FrameSplitter, NodeId, FRAME_HEADER_LEN};

use crate::storage::LocalProcess;
use log::{debug, info, warn};
use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::phy::Device;
use smoltcp::socket::{dhcpv4, tcp};
use smoltcp::time::{Duration as NetDuration, Instant as NetInstant};
use smoltcp::wire::{IpAddress, IpCidr, IpEndpoint};

/// A peer controller to keep a link to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddr {
    /// Its node id.
    pub node: NodeId,
    /// Its address on the peer network.
    pub addr: Ipv4Addr,
    /// Its peer port.
    pub port: u16,
}

/// How the service is set up.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// The controller core's configuration (node, key, members, limits).
    pub core: CoreConfig,
    /// Peers to dial. Only peers with a higher node id are dialled (the
    /// lower id dials, as in the hosted controller); the others dial us.
    pub peers: Vec<PeerAddr>,
    /// TCP port for processes.
    pub process_port: u16,
    /// TCP port for peer controllers.
    pub peer_port: u16,
    /// TCP port of the Prometheus endpoint (`GET /metrics`), if any.
    pub metrics_port: Option<u16>,
    /// Index of the interface serving metrics (processes are served on
    /// every interface).
    pub front_iface: usize,
    /// Index of the interface serving peer links.
    pub peer_iface: usize,
    /// Index of an interface to configure by DHCP, if any.
    pub dhcp_iface: Option<usize>,
    /// Process connections at once.
    pub max_process_conns: usize,
    /// Metrics connections at once.
    pub max_metrics_conns: usize,
    /// Peer connections at once (accepted ones; dialled ones are one per
    /// configured peer).
    pub max_peer_conns: usize,
    /// Sockets kept listening per port (the accept backlog).
    pub backlog: usize,
    /// Output bytes allowed to wait for one slow connection.
    pub max_queued_bytes: usize,
    /// Time a new process connection has to send its first frame.
    pub attach_timeout_ns: u64,
    /// Receive and send buffer bytes of a process socket.
    pub process_buffers: (usize, usize),
    /// Receive and send buffer bytes of a peer socket.
    pub peer_buffers: (usize, usize),
}

impl ServiceConfig {
    /// Defaults matching the hosted controller's ports (7100 processes,
    /// 7101 peers, 9100 metrics), everything on interface 0.
    pub fn new(core: CoreConfig) -> Self {
        ServiceConfig {
            core,
            peers: Vec::new(),
            process_port: 7100,
            peer_port: 7101,
            metrics_port: Some(9100),
            front_iface: 0,
            peer_iface: 0,
            dhcp_iface: None,
            max_process_conns: 64,
            max_metrics_conns: 4,
            max_peer_conns: 16,
            backlog: 4,
            max_queued_bytes: 8 << 20,
            attach_timeout_ns: 10_000_000_000,
            process_buffers: (64 * 1024, 128 * 1024),
            peer_buffers: (128 * 1024, 128 * 1024),
        }
    }
}

/// What a socket is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Process,
    Peer,
    Metrics,
}

/// A socket waiting for a connection.
struct Listener {
    iface: usize,
    handle: SocketHandle,
    kind: Kind,
}

/// An established connection. Its key doubles as the core's channel or
/// link id.
struct Conn {
    iface: usize,
    handle: SocketHandle,
    kind: Kind,
    opened_ns: u64,
    frames_in: u64,
    inbuf: Vec<u8>,
    out: VecDeque<Vec<u8>>,
    /// Bytes of `out.front()` already in the socket.
    out_at: usize,
    queued: usize,
    /// Set once the connection is finished with: the core has been told (or
    /// asked for it); remaining output drains, then the socket closes.
    closing: Option<u64>,
    /// The peer this side dialled, if it did.
    dialed: Option<NodeId>,
    traffic: LinkTraffic,
}

/// One configured peer's dialler.
struct Dialer {
    peer: PeerAddr,
    /// The connecting socket, until it is established.
    connecting: Option<(SocketHandle, u64)>,
    /// The established link's connection key.
    link: Option<u64>,
    next_attempt_ns: u64,
    backoff_ns: u64,
}

/// Counters the service keeps besides the core's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Connections accepted, by kind: processes, peers, metrics.
    pub accepted: [u64; 3],
    /// Links dialled successfully.
    pub dialled: u64,
    /// Connections closed for unframeable input (oversized length prefix).
    pub unframeable: u64,
    /// Processes disconnected for not attaching in time.
    pub attach_timeouts: u64,
    /// Connections dropped for not reading their output.
    pub stuck: u64,
    /// Connections currently open, all kinds.
    pub open: usize,
}

/// How long a finished connection may take to drain and close before it
/// is aborted.
const LINGER_NS: u64 = 2_000_000_000;
/// First and longest delay between dial attempts.
const DIAL_BACKOFF_NS: (u64, u64) = (50_000_000, 1_000_000_000);
/// A dial that is not established after this long is abandoned.
const DIAL_TIMEOUT_NS: u64 = 3_000_000_000;
/// Largest HTTP request head the metrics endpoint reads.
const MAX_HTTP_REQUEST: usize = 4096;

/// The controller service. See the module doc.
pub struct Service {
    cfg: ServiceConfig,
    ctrl: Controller,
    sets: Vec<SocketSet<'static>>,
    listeners: Vec<Listener>,
    conns: BTreeMap<u64, Conn>,
    dialers: Vec<Dialer>,
    next_id: u64,
    next_local_port: u16,
    splitter: FrameSplitter,
    traffic: Traffic,
    stats: ServiceStats,
    heap: Option<(usize, usize)>,
    /// Aborted sockets (interface, handle) kept until the next turn so
    /// that their reset goes out before they are removed.
    aborted: Vec<(usize, SocketHandle)>,
    /// The DHCP client socket and its interface.
    dhcp: Option<(usize, SocketHandle)>,
    /// Processes inside the appliance, by channel id.
    locals: BTreeMap<u64, Box<dyn LocalProcess>>,
}

/// Channel ids of local processes start here (connections count from 1).
const LOCAL_CHANNELS: u64 = 1 << 62;

fn net_now(now_ns: u64) -> NetInstant {
    NetInstant::from_micros((now_ns / 1000) as i64)
}

impl Service {
    /// A service over `ifaces` interfaces (the `nics` later passed to
    /// [`Service::poll`] must be that many, in the same order), started at
    /// `now_ns`.
    pub fn new(cfg: ServiceConfig, ifaces: usize, now_ns: u64) -> Self {
        let ifaces = ifaces.max(1);
        let mut cfg = cfg;
        cfg.front_iface = cfg.front_iface.min(ifaces - 1);
        cfg.peer_iface = cfg.peer_iface.min(ifaces - 1);
        let me = cfg.core.node;
        let dialers = cfg
            .peers
            .iter()
            .filter(|p| p.node > me)
            .map(|&peer| Dialer {
                peer,
                connecting: None,
                link: None,
                next_attempt_ns: now_ns,
                backoff_ns: DIAL_BACKOFF_NS.0,
            })
            .collect();
        let splitter = FrameSplitter::new(cfg.core.limits.max_message_len);
        let ctrl = Controller::new(cfg.core.clone(), Instant(now_ns));
        let mut s = Service {
            sets: (0..ifaces).map(|_| SocketSet::new(vec![])).collect(),
            listeners: Vec::new(),
            conns: BTreeMap::new(),
            dialers,
            next_id: 1,
            next_local_port: 49152,
            splitter,
            traffic: Traffic::default(),
            stats: ServiceStats::default(),
            heap: None,
            aborted: Vec::new(),
            dhcp: None,
            locals: BTreeMap::new(),
            ctrl,
            cfg,
        };
        if let Some(i) = s.cfg.dhcp_iface.filter(|&i| i < ifaces) {
            let handle = s.sets[i].add(dhcpv4::Socket::new());
            s.dhcp = Some((i, handle));
        }
        s.replenish_listeners();
        s
    }

    /// Connects a process living inside the appliance (e.g. the storage
    /// service) to the controller core; it attaches like any other.
    pub fn add_local(&mut self, now_ns: u64, p: Box<dyn LocalProcess>) -> ChannelId {
        let chan = ChannelId(LOCAL_CHANNELS + self.locals.len() as u64);
        info!("service: local process {} on channel {}", p.name(), chan.0);
        self.locals.insert(chan.0, p);
        self.ctrl.process_connected(Instant(now_ns), chan);
        self.route_all(now_ns);
        chan
    }

    /// Routes the core's outputs and local processes' messages until both
    /// are drained (local processes answer synchronously), bounded.
    fn route_all(&mut self, now_ns: u64) -> bool {
        let mut moved = false;
        for _ in 0..1024 {
            let a = self.route_outputs(now_ns);
            let b = self.pump_locals(now_ns);
            moved |= a | b;
            if !a && !b {
                break;
            }
        }
        moved
    }

    /// Feeds every message local processes have queued to the core.
    fn pump_locals(&mut self, now_ns: u64) -> bool {
        let mut moved = false;
        for (&id, p) in self.locals.iter_mut() {
            p.tick(now_ns);
            while let Some(body) = p.poll_message() {
                moved = true;
                self.ctrl
                    .process_message(Instant(now_ns), ChannelId(id), &body);
            }
        }
        moved
    }

    /// Applies what the DHCP client learnt to its interface.
    fn apply_dhcp<D: Device>(&mut self, nics: &mut [(&mut Interface, &mut D)]) {
        let Some((i, handle)) = self.dhcp else {
            return;
        };
        let Some((iface, _)) = nics.get_mut(i) else {
            return;
        };
        match self.sets[i].get_mut::<dhcpv4::Socket>(handle).poll() {
            None => {}
            Some(dhcpv4::Event::Configured(c)) => {
                iface.update_ip_addrs(|a| {
                    a.clear();
                    // One address into an empty list: cannot be full.
                    let _ = a.push(IpCidr::Ipv4(c.address));
                });
                match c.router {
                    Some(r) => {
                        if iface.routes_mut().add_default_ipv4_route(r).is_err() {
                            warn!("net: dhcp: default route via {r} not added");
                        }
                    }
                    None => {
                        iface.routes_mut().remove_default_ipv4_route();
                    }
                }
                info!("net: dhcp: address {} router {:?}", c.address, c.router);
            }
            Some(dhcpv4::Event::Deconfigured) => {
                iface.update_ip_addrs(|a| a.clear());
                iface.routes_mut().remove_default_ipv4_route();
                warn!("net: dhcp: lease lost; no address until a new one");
            }
        }
    }

    /// The controller core.
    pub fn controller(&self) -> &Controller {
        &self.ctrl
    }

    /// The service's own counters.
    pub fn stats(&self) -> ServiceStats {
        ServiceStats {
            open: self.conns.len(),
            ..self.stats
        }
    }

    /// Records the kernel heap's bytes in use and size, exported as the
    /// `fractos_appliance_heap_bytes` gauge.
    pub fn set_heap_usage(&mut self, used: usize, size: usize) {
        self.heap = Some((used, size));
    }

    /// Traffic so far (live links included).
    pub fn traffic(&self) -> Traffic {
        let mut t = self.traffic.clone();
        for (&id, c) in &self.conns {
            if let Some(node) = self.link_node(id, c) {
                t.peers.entry(node).or_default().add(&c.traffic);
            }
        }
        t
    }

    /// The Prometheus metrics text (what `GET /metrics` returns).
    pub fn metrics_text(&self) -> String {
        let mut text = fractos_core::prometheus::render(&self.ctrl, &self.traffic());
        let s = self.stats();
        let node = self.cfg.core.node.0;
        use core::fmt::Write;
        let _ = writeln!(
            text,
            "# HELP fractos_appliance_connections Open TCP connections of the appliance.\n\
             # TYPE fractos_appliance_connections gauge\n\
             fractos_appliance_connections{{node=\"{node}\"}} {}",
            s.open
        );
        let _ = writeln!(
            text,
            "# HELP fractos_appliance_dropped_total Connections the appliance dropped, by reason.\n\
             # TYPE fractos_appliance_dropped_total counter\n\
             fractos_appliance_dropped_total{{node=\"{node}\",reason=\"unframeable\"}} {}\n\
             fractos_appliance_dropped_total{{node=\"{node}\",reason=\"attach_timeout\"}} {}\n\
             fractos_appliance_dropped_total{{node=\"{node}\",reason=\"stuck\"}} {}",
            s.unframeable, s.attach_timeouts, s.stuck
        );
        let _ = writeln!(
            text,
            "# HELP fractos_appliance_accepted_total TCP connections the appliance accepted, by kind.\n\
             # TYPE fractos_appliance_accepted_total counter\n\
             fractos_appliance_accepted_total{{node=\"{node}\",kind=\"process\"}} {}\n\
             fractos_appliance_accepted_total{{node=\"{node}\",kind=\"peer\"}} {}\n\
             fractos_appliance_accepted_total{{node=\"{node}\",kind=\"metrics\"}} {}",
            s.accepted[0], s.accepted[1], s.accepted[2]
        );
        for p in self.locals.values() {
            text.push_str(&p.metrics_text(node));
        }
        if let Some((used, size)) = self.heap {
            let _ = writeln!(
                text,
                "# HELP fractos_appliance_heap_bytes The appliance kernel heap.\n\
                 # TYPE fractos_appliance_heap_bytes gauge\n\
                 fractos_appliance_heap_bytes{{node=\"{node}\",kind=\"used\"}} {used}\n\
                 fractos_appliance_heap_bytes{{node=\"{node}\",kind=\"size\"}} {size}"
            );
        }
        text
    }

    /// One turn of the event loop at `now_ns` over `nics` (interface and
    /// device of each NIC, in the order given to [`Service::new`]). Returns
    /// whether anything moved (frames in or out, connections changed).
    pub fn poll<D: Device>(&mut self, now_ns: u64, nics: &mut [(&mut Interface, &mut D)]) -> bool {
        let at = net_now(now_ns);
        let mut moved = false;
        for (i, (iface, dev)) in nics.iter_mut().enumerate() {
            if let Some(set) = self.sets.get_mut(i) {
                moved |= iface.poll(at, *dev, set) != smoltcp::iface::PollResult::None;
            }
        }
        self.apply_dhcp(nics);
        moved |= self.accept(now_ns);
        moved |= self.dial(now_ns, nics);
        moved |= self.receive(now_ns);
        let now = Instant(now_ns);
        if self.ctrl.poll_timeout().is_some_and(|t| t <= now) {
            self.ctrl.handle_timeout(now);
        }
        moved |= self.route_all(now_ns);
        moved |= self.transmit();
        self.reap(now_ns);
        self.replenish_listeners();
        for (i, (iface, dev)) in nics.iter_mut().enumerate() {
            if let Some(set) = self.sets.get_mut(i) {
                moved |= iface.poll(at, *dev, set) != smoltcp::iface::PollResult::None;
            }
        }
        moved
    }

    fn port(&self, kind: Kind) -> Option<u16> {
        match kind {
            Kind::Process => Some(self.cfg.process_port),
            Kind::Peer => Some(self.cfg.peer_port),
            Kind::Metrics => self.cfg.metrics_port,
        }
    }

    fn buffers(&self, kind: Kind) -> (usize, usize) {
        match kind {
            Kind::Process => self.cfg.process_buffers,
            Kind::Peer => self.cfg.peer_buffers,
            Kind::Metrics => (MAX_HTTP_REQUEST, 4096),
        }
    }

    fn new_socket(&self, kind: Kind) -> tcp::Socket<'static> {
        let (rx, tx) = self.buffers(kind);
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; rx]),
            tcp::SocketBuffer::new(vec![0; tx]),
        );
        // Frames are sent whole: no Nagle, no delayed ACKs (they would add
        // up to 10 ms to every round trip).
        s.set_nagle_enabled(false);
        s.set_ack_delay(None);
        if kind == Kind::Peer {
            s.set_keep_alive(Some(NetDuration::from_millis(1000)));
        }
        s
    }

    /// Keeps `backlog` sockets listening on every port while there is room
    /// for more connections of that kind.
    fn replenish_listeners(&mut self) {
        for kind in [Kind::Process, Kind::Peer, Kind::Metrics] {
            let Some(port) = self.port(kind) else {
                continue;
            };
            // Processes may attach on every interface (adaptors on the host
            // or on the peer network); metrics are served on the front one,
            // peers on the peer one.
            let ifaces = match kind {
                Kind::Process => 0..self.sets.len(),
                Kind::Peer => self.cfg.peer_iface..self.cfg.peer_iface + 1,
                Kind::Metrics => self.cfg.front_iface..self.cfg.front_iface + 1,
            };
            let max = match kind {
                Kind::Process => self.cfg.max_process_conns,
                Kind::Peer => self.cfg.max_peer_conns,
                Kind::Metrics => self.cfg.max_metrics_conns,
            };
            let open = self.conns.values().filter(|c| c.kind == kind).count();
            let mut total = self.listeners.iter().filter(|l| l.kind == kind).count();
            for iface in ifaces {
                let mut here = self
                    .listeners
                    .iter()
                    .filter(|l| l.kind == kind && l.iface == iface)
                    .count();
                while here < self.cfg.backlog && open + total < max {
                    let mut s = self.new_socket(kind);
                    if let Err(e) = s.listen(port) {
                        warn!("service: cannot listen on port {port}: {e}");
                        break;
                    }
                    let handle = self.sets[iface].add(s);
                    self.listeners.push(Listener {
                        iface,
                        handle,
                        kind,
                    });
                    here += 1;
                    total += 1;
                }
            }
        }
    }

    fn new_conn(&mut self, now_ns: u64, iface: usize, handle: SocketHandle, kind: Kind) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.conns.insert(
            id,
            Conn {
                iface,
                handle,
                kind,
                opened_ns: now_ns,
                frames_in: 0,
                inbuf: Vec::new(),
                out: VecDeque::new(),
                out_at: 0,
                queued: 0,
                closing: None,
                dialed: None,
                traffic: LinkTraffic::default(),
            },
        );
        id
    }

    /// Turns listening sockets that got a connection into connections.
    fn accept(&mut self, now_ns: u64) -> bool {
        let mut moved = false;
        let mut i = 0;
        while i < self.listeners.len() {
            let l = &self.listeners[i];
            let s = self.sets[l.iface].get_mut::<tcp::Socket>(l.handle);
            match s.state() {
                tcp::State::Listen | tcp::State::SynReceived => {
                    i += 1;
                    continue;
                }
                tcp::State::Closed => {
                    // Reset before it was established: drop the socket; a
                    // fresh listener replaces it.
                    let l = self.listeners.swap_remove(i);
                    self.sets[l.iface].remove(l.handle);
                    continue;
                }
                _ => {}
            }
            let remote = s.remote_endpoint();
            let l = self.listeners.swap_remove(i);
            let id = self.new_conn(now_ns, l.iface, l.handle, l.kind);
            moved = true;
            self.stats.accepted[l.kind as usize] += 1;
            let now = Instant(now_ns);
            match l.kind {
                Kind::Process => {
                    debug!("service: process channel {id} from {remote:?}");
                    self.ctrl.process_connected(now, ChannelId(id));
                }
                Kind::Peer => {
                    info!("service: peer link {id} accepted from {remote:?}");
                    self.ctrl
                        .link_connected(now, LinkId(id), LinkRole::Responder);
                }
                Kind::Metrics => {}
            }
        }
        moved
    }

    /// Keeps one link to every configured higher-numbered peer.
    fn dial<D: Device>(&mut self, now_ns: u64, nics: &mut [(&mut Interface, &mut D)]) -> bool {
        let mut moved = false;
        let pi = self.cfg.peer_iface;
        for d in 0..self.dialers.len() {
            if let Some((handle, started)) = self.dialers[d].connecting {
                let s = self.sets[pi].get_mut::<tcp::Socket>(handle);
                match s.state() {
                    tcp::State::Established => {
                        self.dialers[d].connecting = None;
                        let id = self.new_conn(now_ns, pi, handle, Kind::Peer);
                        let node = self.dialers[d].peer.node;
                        if let Some(c) = self.conns.get_mut(&id) {
                            c.dialed = Some(node);
                        }
                        self.dialers[d].link = Some(id);
                        self.dialers[d].backoff_ns = DIAL_BACKOFF_NS.0;
                        self.stats.dialled += 1;
                        info!("service: peer link {id} to node {} up", node.0);
                        let role = LinkRole::Initiator { peer: node };
                        self.ctrl.link_connected(Instant(now_ns), LinkId(id), role);
                        moved = true;
                    }
                    tcp::State::SynSent if now_ns.saturating_sub(started) < DIAL_TIMEOUT_NS => {}
                    state => {
                        debug!(
                            "service: dial of node {} failed ({state})",
                            self.dialers[d].peer.node.0
                        );
                        s.abort();
                        self.sets[pi].remove(handle);
                        self.dialers[d].connecting = None;
                        self.schedule_redial(d, now_ns);
                    }
                }
                continue;
            }
            if self.dialers[d].link.is_some() || now_ns < self.dialers[d].next_attempt_ns {
                continue;
            }
            let Some((iface, _)) = nics.get_mut(pi) else {
                continue;
            };
            let peer = self.dialers[d].peer;
            let mut s = self.new_socket(Kind::Peer);
            let local = self.next_local_port;
            self.next_local_port = if local == u16::MAX { 49152 } else { local + 1 };
            let remote = IpEndpoint::new(IpAddress::Ipv4(peer.addr), peer.port);
            match s.connect(iface.context(), remote, local) {
                Ok(()) => {
                    let handle = self.sets[pi].add(s);
                    self.dialers[d].connecting = Some((handle, now_ns));
                }
                Err(e) => {
                    warn!("service: cannot dial node {} at {remote}: {e}", peer.node.0);
                    self.schedule_redial(d, now_ns);
                }
            }
        }
        moved
    }

    fn schedule_redial(&mut self, d: usize, now_ns: u64) {
        let dl = &mut self.dialers[d];
        dl.next_attempt_ns = now_ns + dl.backoff_ns;
        dl.backoff_ns = (dl.backoff_ns * 2).min(DIAL_BACKOFF_NS.1);
    }

    /// Reads every connection, feeding complete frames to the core;
    /// notices connections the other side closed or reset.
    fn receive(&mut self, now_ns: u64) -> bool {
        let mut moved = false;
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        let frame_limit = self.cfg.core.limits.max_message_len + 4 + 64 * 1024;
        for id in ids {
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            if c.closing.is_some() {
                continue;
            }
            let s = self.sets[c.iface].get_mut::<tcp::Socket>(c.handle);
            let limit = match c.kind {
                Kind::Metrics => MAX_HTTP_REQUEST,
                _ => frame_limit,
            };
            while s.can_recv() && c.inbuf.len() < limit {
                let room = limit - c.inbuf.len();
                let got = s.recv(|b| {
                    let n = b.len().min(room);
                    (n, b[..n].to_vec())
                });
                match got {
                    Ok(bytes) if !bytes.is_empty() => {
                        c.inbuf.extend_from_slice(&bytes);
                        moved = true;
                    }
                    _ => break,
                }
            }
            let gone = !s.may_recv() && !s.can_recv();
            let kind = c.kind;
            let fail = match kind {
                Kind::Metrics => {
                    self.serve_http(id, now_ns);
                    false
                }
                Kind::Process | Kind::Peer => self.deliver_frames(id, now_ns),
            };
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            if c.closing.is_some() {
                continue;
            }
            let attach_late = kind == Kind::Process
                && c.frames_in == 0
                && now_ns.saturating_sub(c.opened_ns) > self.cfg.attach_timeout_ns;
            if attach_late {
                self.stats.attach_timeouts += 1;
                debug!("service: channel {id} sent nothing in time; closing");
            }
            if fail || gone || attach_late {
                self.finish(id, now_ns, fail || attach_late);
                moved = true;
            }
        }
        moved
    }

    /// Hands every complete frame of connection `id` to the core. Returns
    /// true if the stream cannot be framed (the connection must go).
    fn deliver_frames(&mut self, id: u64, now_ns: u64) -> bool {
        let Some(c) = self.conns.get_mut(&id) else {
            return false;
        };
        let now = Instant(now_ns);
        let mut consumed = 0;
        let mut bad = false;
        loop {
            match self.splitter.split(&c.inbuf[consumed..]) {
                Ok(Some((body, n))) => {
                    c.frames_in += 1;
                    match c.kind {
                        Kind::Process => {
                            self.traffic.processes.frames_in += 1;
                            self.traffic.processes.bytes_in += n as u64;
                            self.ctrl.process_message(now, ChannelId(id), body);
                        }
                        _ => {
                            c.traffic.frames_in += 1;
                            c.traffic.bytes_in += n as u64;
                            self.ctrl.link_message(now, LinkId(id), body);
                        }
                    }
                    consumed += n;
                }
                Ok(None) => break,
                Err(e) => {
                    debug!("service: connection {id}: unframeable input ({e}); closing");
                    self.stats.unframeable += 1;
                    bad = true;
                    break;
                }
            }
        }
        c.inbuf.drain(..consumed);
        bad
    }

    /// Answers a complete HTTP request on metrics connection `id`.
    fn serve_http(&mut self, id: u64, now_ns: u64) {
        let Some(c) = self.conns.get(&id) else {
            return;
        };
        let Some(end) = c.inbuf.windows(4).position(|w| w == b"\r\n\r\n") else {
            if c.inbuf.len() >= MAX_HTTP_REQUEST {
                self.respond(id, now_ns, "431 Request Header Fields Too Large", "", "");
            }
            return;
        };
        let head = &c.inbuf[..end];
        let line = head.split(|&b| b == b'\r').next().unwrap_or(&[]);
        let mut words = line.split(|&b| b == b' ');
        let (method, path) = (words.next(), words.next());
        match (method, path) {
            (Some(b"GET"), Some(b"/metrics")) => {
                let body = self.metrics_text();
                self.respond(
                    id,
                    now_ns,
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    &body,
                );
            }
            (Some(b"GET"), Some(_)) => self.respond(
                id,
                now_ns,
                "404 Not Found",
                "text/plain",
                "only /metrics is served here\n",
            ),
            _ => self.respond(
                id,
                now_ns,
                "405 Method Not Allowed",
                "text/plain",
                "use GET /metrics\n",
            ),
        }
    }

    fn respond(&mut self, id: u64, now_ns: u64, status: &str, ctype: &str, body: &str) {
        let mut r = alloc::format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        if !ctype.is_empty() {
            r.push_str("Content-Type: ");
            r.push_str(ctype);
            r.push_str("\r\n");
        }
        r.push_str("\r\n");
        r.push_str(body);
        if let Some(c) = self.conns.get_mut(&id) {
            c.queued += r.len();
            c.out.push_back(r.into_bytes());
            c.closing = Some(now_ns);
        }
    }

    /// Marks connection `id` finished: tells the core (unless it asked for
    /// the close itself) and lets pending output drain. `abort` drops the
    /// pending output and closes at once.
    fn finish(&mut self, id: u64, now_ns: u64, abort: bool) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.closing.is_some() {
            return;
        }
        c.closing = Some(now_ns);
        if abort {
            // Drop pending output and close at once. A FIN rather than a
            // reset: QEMU's user networking forwards a FIN to the host
            // side but not a reset, and the connection is reaped after
            // `LINGER_NS` anyway.
            c.out.clear();
            c.out_at = 0;
            c.queued = 0;
            self.sets[c.iface].get_mut::<tcp::Socket>(c.handle).close();
        }
        let now = Instant(now_ns);
        match c.kind {
            Kind::Process => self.ctrl.process_disconnected(now, ChannelId(id)),
            Kind::Peer => {
                info!("service: peer link {id} down");
                self.ctrl.link_disconnected(now, LinkId(id));
            }
            Kind::Metrics => {}
        }
    }

    /// Moves the core's outputs into per-connection queues.
    fn route_outputs(&mut self, now_ns: u64) -> bool {
        let mut moved = false;
        while let Some(out) = self.ctrl.poll_output() {
            moved = true;
            match out {
                Output::Send { to, frame } => {
                    let id = match to {
                        Dest::Process(c) => c.0,
                        Dest::Link(l) => l.0,
                    };
                    if let Some(p) = self.locals.get_mut(&id) {
                        p.on_message(frame.get(FRAME_HEADER_LEN..).unwrap_or(&[]));
                        continue;
                    }
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
                        warn!("service: connection {id} does not read its output; dropping it");
                        self.stats.stuck += 1;
                        self.finish(id, now_ns, true);
                        continue;
                    }
                    c.queued += n;
                    c.out.push_back(frame);
                }
                Output::Close { to, reason } => {
                    let id = match to {
                        Dest::Process(c) => c.0,
                        Dest::Link(l) => l.0,
                    };
                    if let Some(p) = self.locals.remove(&id) {
                        warn!(
                            "service: core closed local process {} ({reason:?})",
                            p.name()
                        );
                        continue;
                    }
                    if reason != CloseReason::Duplicate {
                        debug!("service: core closes connection {id} ({reason:?})");
                    }
                    if let Some(c) = self.conns.get_mut(&id) {
                        // The core already forgot it: drain what it sent
                        // last (e.g. the error that explains the close).
                        c.closing.get_or_insert(now_ns);
                    }
                }
            }
        }
        moved
    }

    /// Pushes queued output into the sockets; starts closing finished
    /// connections whose output has drained.
    fn transmit(&mut self) -> bool {
        let mut moved = false;
        for c in self.conns.values_mut() {
            let s = self.sets[c.iface].get_mut::<tcp::Socket>(c.handle);
            while let Some(front) = c.out.front() {
                if !s.can_send() {
                    break;
                }
                match s.send_slice(&front[c.out_at..]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        moved = true;
                        c.out_at += n;
                        c.queued -= n;
                        if c.out_at == front.len() {
                            c.out.pop_front();
                            c.out_at = 0;
                        }
                    }
                }
            }
            if c.closing.is_some() && c.out.is_empty() && s.is_open() {
                s.close();
            }
        }
        moved
    }

    /// Removes connections that are closed, or have lingered too long.
    fn reap(&mut self, now_ns: u64) {
        // Their reset was sent by the interface poll that ended the last
        // turn.
        for (iface, handle) in self.aborted.drain(..) {
            self.sets[iface].remove(handle);
        }
        let mut done = Vec::new();
        for (&id, c) in &self.conns {
            let Some(since) = c.closing else { continue };
            let s = self.sets[c.iface].get::<tcp::Socket>(c.handle);
            let closed = matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait);
            if closed || now_ns.saturating_sub(since) > LINGER_NS {
                done.push(id);
            }
        }
        for id in done {
            let Some(c) = self.conns.remove(&id) else {
                continue;
            };
            let s = self.sets[c.iface].get_mut::<tcp::Socket>(c.handle);
            if matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait) {
                self.sets[c.iface].remove(c.handle);
            } else {
                // Lingered too long: reset the other side. smoltcp sends
                // the reset when the interface next polls the socket, so
                // it must stay in the set until then.
                s.abort();
                self.aborted.push((c.iface, c.handle));
            }
            if c.kind == Kind::Peer {
                if let Some(node) = c.dialed.or_else(|| self.ctrl.link_peer(LinkId(id))) {
                    self.traffic
                        .peers
                        .entry(node.0)
                        .or_default()
                        .add(&c.traffic);
                }
            }
            for d in 0..self.dialers.len() {
                if self.dialers[d].link == Some(id) {
                    self.dialers[d].link = None;
                    self.schedule_redial(d, now_ns);
                }
            }
        }
    }

    fn link_node(&self, id: u64, c: &Conn) -> Option<u32> {
        if c.kind != Kind::Peer {
            return None;
        }
        c.dialed
            .or_else(|| self.ctrl.link_peer(LinkId(id)))
            .map(|n| n.0)
    }
}
