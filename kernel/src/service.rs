//! The appliance's controller service: the shared node driver
//! ([`fractos_node::Node`], which owns the controller core, framing,
//! queues, timeouts, dialing policy, traffic and metrics) over smoltcp TCP
//! sockets, plus what only the appliance has: its NICs' interfaces and
//! listening sockets, DHCP, processes living inside the kernel (wired by
//! in-memory channels) and the heap gauge.
//!
//! [`Service::poll`] is one turn of the appliance's event loop: it polls
//! every NIC's smoltcp interface, turns established sockets into node
//! connections, starts the dials the node asks for, runs the node driver
//! and the in-kernel processes until nothing moves, answers metrics
//! requests, and polls the interfaces again so that output leaves in the
//! same turn. Nothing blocks and nothing reads a clock: the kernel passes
//! the time in and calls `poll` in a loop (no interrupts). Being generic
//! over [`smoltcp::phy::Device`], the same code runs on the host in unit
//! tests over an in-memory link.
//!
//! Resource bounds (see [`fractos_node`] for the rest): when a kind of
//! connection is at its limit ([`fractos_node::Node::accepts`]) no socket
//! listens for it and smoltcp answers new SYNs with RST; at most
//! [`ServiceConfig::backlog`] sockets listen per port and interface.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::net::Ipv4Addr;

use fractos_core::{ChannelId, Config as CoreConfig, Controller, Instant, Traffic};
use fractos_node::{ConnId, ConnKind, Node, NodeConfig, NodeStats};
use fractos_transport::{Channel, FrameReader, Framing, MemoryChannel, Received, TransportError};
use fractos_virtio_net::tsc;
use fractos_wire::{ErrorCode, Handle, NodeId, FRAME_HEADER_LEN};

use crate::storage::{DeviceGrant, DeviceWrites, LocalProcess};
use log::{debug, info, warn};
use smoltcp::iface::{Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::Device;
use smoltcp::socket::{dhcpv4, tcp};
use smoltcp::time::{Duration as NetDuration, Instant as NetInstant};
use smoltcp::wire::{IpAddress, IpCidr, IpEndpoint};

/// Where a peer controller's peer port is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddr {
    /// Its address on the peer network.
    pub addr: Ipv4Addr,
    /// Its peer port.
    pub port: u16,
}

/// How the service is set up: the node driver's configuration (shared
/// with the hosted controller) plus the appliance's network setup.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// Node driver: core configuration, peers, limits, timeouts.
    pub node: NodeConfig<PeerAddr>,
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
    /// Sockets kept listening per port and interface (the accept backlog).
    pub backlog: usize,
    /// Receive and send buffer bytes of a process socket.
    pub process_buffers: (usize, usize),
    /// Receive and send buffer bytes of a peer socket.
    pub peer_buffers: (usize, usize),
    /// Most dials in flight at once: a peer socket's buffers are
    /// allocated when its dial starts, so a cluster of a thousand
    /// unreachable peers must not dial them all at once. The others wait
    /// their turn: with more peers than this, [`Service::new`] raises the
    /// dial backoff to one dial timeout (3 s) per round of `max_dials`
    /// peers, so every peer is tried (a thousand peers: a retry every
    /// 189 s).
    pub max_dials: usize,
}

impl ServiceConfig {
    /// Defaults: the common ports ([`fractos_node::PROCESS_PORT`],
    /// [`fractos_node::PEER_PORT`], [`fractos_node::METRICS_PORT`]),
    /// everything on interface 0, limits sized for a small appliance
    /// (64 processes, 16 accepted peer links, 8 MiB queued per connection,
    /// 16 dials in flight).
    pub fn new(core: CoreConfig) -> Self {
        let mut node = NodeConfig::new(core);
        node.max_process_conns = 64;
        node.max_peer_conns = 16;
        node.max_queued_bytes = 8 << 20;
        ServiceConfig {
            node,
            process_port: fractos_node::PROCESS_PORT,
            peer_port: fractos_node::PEER_PORT,
            metrics_port: Some(fractos_node::METRICS_PORT),
            front_iface: 0,
            peer_iface: 0,
            dhcp_iface: None,
            backlog: 4,
            process_buffers: (64 * 1024, 128 * 1024),
            peer_buffers: (128 * 1024, 128 * 1024),
            max_dials: 16,
        }
    }
}

/// The smoltcp socket sets, lent to TCP channels for their I/O.
pub struct Sockets {
    sets: Vec<SocketSet<'static>>,
    /// Aborted sockets kept until the next turn so that their reset goes
    /// out before they are removed.
    aborted: Vec<(usize, SocketHandle)>,
    /// Cycles of TCP channel sends and receives (copies between node
    /// buffers and socket buffers).
    io_cycles: u64,
}

/// Where the event loop's time goes, in TSC cycles
/// ([`fractos_virtio_net::tsc`]), cumulative since boot; the kernel
/// combines them with the NICs' frame counts into a per-frame breakdown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cycles {
    /// Inside smoltcp's `Interface::poll` (TCP/IP ingress and egress,
    /// checksums, segment copies, and the driver's queue work it calls).
    pub ifaces: u64,
    /// Running the node driver and in-kernel processes (controller core,
    /// framing, sealing), socket copies included.
    pub node: u64,
    /// Of `node`: copies into and out of TCP socket buffers.
    pub socket_io: u64,
    /// Whole event-loop turns.
    pub total: u64,
    /// Event-loop turns.
    pub turns: u64,
}

/// A smoltcp TCP socket as a [`Channel`].
struct TcpChannel {
    iface: usize,
    handle: SocketHandle,
    /// Aborted: its reset is sent by the next interface poll.
    aborted: bool,
}

impl TcpChannel {
    fn socket<'a>(&self, cx: &'a mut Sockets) -> &'a mut tcp::Socket<'static> {
        cx.sets[self.iface].get_mut::<tcp::Socket>(self.handle)
    }
}

impl Channel<Sockets> for TcpChannel {
    fn framing(&self) -> Framing {
        Framing::Stream
    }

    fn send(&mut self, cx: &mut Sockets, data: &[u8]) -> Result<usize, TransportError> {
        let t0 = tsc();
        let s = self.socket(cx);
        let r = if !s.may_send() {
            Err(TransportError::Closed)
        } else if !s.can_send() {
            Ok(0)
        } else {
            s.send_slice(data).map_err(|_| TransportError::Reset)
        };
        cx.io_cycles += tsc().wrapping_sub(t0);
        r
    }

    fn recv(
        &mut self,
        cx: &mut Sockets,
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<Received, TransportError> {
        let s = self.socket(cx);
        if s.can_recv() {
            let t0 = tsc();
            // Both halves of the ring, in one call.
            let mut got = 0;
            while got < max {
                let n = s.recv(|b| {
                    let n = b.len().min(max - got);
                    out.extend_from_slice(&b[..n]);
                    (n, n)
                });
                match n {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(_) if got > 0 => break,
                    Err(_) => return Err(TransportError::Reset),
                }
            }
            cx.io_cycles += tsc().wrapping_sub(t0);
            return Ok(Received::Data(got));
        }
        if s.may_recv() {
            Ok(Received::Empty)
        } else if s.state() == tcp::State::Closed {
            Err(TransportError::Reset)
        } else {
            Ok(Received::Closed)
        }
    }

    fn close(&mut self, cx: &mut Sockets) {
        // A FIN rather than a reset: QEMU's user networking forwards a FIN
        // to the host side but not a reset.
        self.socket(cx).close();
    }

    fn abort(&mut self, cx: &mut Sockets) {
        self.socket(cx).abort();
        self.aborted = true;
    }

    fn is_finished(&self, cx: &mut Sockets) -> bool {
        let s = cx.sets[self.iface].get::<tcp::Socket>(self.handle);
        matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait)
    }

    fn release(&mut self, cx: &mut Sockets) {
        if self.is_finished(cx) && !self.aborted {
            cx.sets[self.iface].remove(self.handle);
        } else {
            // smoltcp sends the reset when the interface next polls the
            // socket, so it stays in the set until then.
            self.socket(cx).abort();
            cx.aborted.push((self.iface, self.handle));
        }
    }
}

/// A socket waiting for a connection.
struct Listener {
    iface: usize,
    handle: SocketHandle,
    kind: ConnKind,
}

/// A dial in progress.
struct Dialing {
    node: NodeId,
    handle: SocketHandle,
    started_ns: u64,
}

/// A process inside the appliance and its end of an in-memory channel.
struct Local {
    process: Box<dyn LocalProcess>,
    /// Its connection at the node.
    conn: ConnId,
    end: MemoryChannel,
    reader: FrameReader,
    /// A frame the channel had no room for yet.
    pending: Option<Vec<u8>>,
    closed: bool,
}

/// Device writes of an in-kernel process, granted by the node.
struct NodeWrites<'a> {
    node: &'a mut Node<Sockets, PeerAddr>,
    holder: ConnId,
    now: Instant,
}

impl DeviceWrites for NodeWrites<'_> {
    fn begin(&mut self, handle: Handle, len: u64) -> Result<DeviceGrant, ErrorCode> {
        self.node
            .device_write_begin(self.now, self.holder, handle, len)
    }
    fn valid(&mut self, id: u64) -> bool {
        self.node.device_write_valid(id)
    }
    fn end(&mut self, id: u64, ok: bool) -> Result<(), ErrorCode> {
        self.node.device_write_end(self.now, id, ok)
    }
}

/// Counters the service keeps (the node driver's plus dials started).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Connections taken, by kind: processes, peers, metrics (in-kernel
    /// processes not counted).
    pub accepted: [u64; 3],
    /// Links dialled successfully.
    pub dialled: u64,
    /// Connections closed for unframeable input.
    pub unframeable: u64,
    /// Processes disconnected for not attaching in time.
    pub attach_timeouts: u64,
    /// Connections dropped for not reading their output.
    pub stuck: u64,
    /// Network connections currently open, all kinds.
    pub open: usize,
}

/// Extra egress passes per interface poll (each sends at most one segment
/// per socket).
const EGRESS_BURST: usize = 64;
/// A dial that is not established after this long is abandoned.
const DIAL_TIMEOUT_NS: u64 = 3_000_000_000;
/// Bytes an in-kernel process's channel buffers each way.
const LOCAL_CHANNEL_BYTES: usize = 16 << 20;

/// The controller service. See the module doc.
pub struct Service {
    cfg: ServiceConfig,
    node: Node<Sockets, PeerAddr>,
    sockets: Sockets,
    listeners: Vec<Listener>,
    dialing: Vec<Dialing>,
    next_local_port: u16,
    heap: Option<(usize, usize)>,
    slots: Option<crate::shm::SlotStats>,
    roce: Option<fractos_roce::Counters>,
    /// The DHCP client socket and its interface.
    dhcp: Option<(usize, SocketHandle)>,
    locals: Vec<Local>,
    /// Node connections that are in-kernel processes (not network ones).
    local_conns: usize,
    cycles: Cycles,
}

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
        cfg.max_dials = cfg.max_dials.max(1);
        // The node driver redials the first peer whose backoff ran out:
        // with more peers than dials in flight, a backoff shorter than a
        // round through all of them would keep redialling the first few.
        if cfg.node.peers.len() > cfg.max_dials {
            let rounds = cfg.node.peers.len().div_ceil(cfg.max_dials) as u64;
            let round = core::time::Duration::from_nanos(DIAL_TIMEOUT_NS.saturating_mul(rounds));
            cfg.node.dial_backoff.0 = cfg.node.dial_backoff.0.max(round);
            cfg.node.dial_backoff.1 = cfg.node.dial_backoff.1.max(round);
        }
        let node = Node::new(cfg.node.clone(), Instant(now_ns));
        let mut s = Service {
            sockets: Sockets {
                sets: (0..ifaces).map(|_| SocketSet::new(vec![])).collect(),
                aborted: Vec::new(),
                io_cycles: 0,
            },
            cycles: Cycles::default(),
            node,
            listeners: Vec::new(),
            dialing: Vec::new(),
            next_local_port: 49152,
            heap: None,
            slots: None,
            roce: None,
            dhcp: None,
            locals: Vec::new(),
            local_conns: 0,
            cfg,
        };
        if let Some(i) = s.cfg.dhcp_iface.filter(|&i| i < ifaces) {
            let handle = s.sockets.sets[i].add(dhcpv4::Socket::new());
            s.dhcp = Some((i, handle));
        }
        s.replenish_listeners();
        s
    }

    /// Connects a process living inside the appliance (e.g. the storage
    /// service) to the controller through an in-memory channel; it attaches
    /// like any other process.
    pub fn add_local(&mut self, now_ns: u64, p: Box<dyn LocalProcess>) -> ChannelId {
        let (end, theirs) = MemoryChannel::pair(Framing::Message, LOCAL_CHANNEL_BYTES);
        let id = self
            .node
            .add(Instant(now_ns), ConnKind::Process, Box::new(theirs));
        self.local_conns += 1;
        info!("service: local process {} on channel {}", p.name(), id.0);
        self.locals.push(Local {
            process: p,
            conn: id,
            end,
            reader: FrameReader::new(self.cfg.node.core.limits.max_message_len),
            pending: None,
            closed: false,
        });
        self.run_node(now_ns);
        ChannelId(id.0)
    }

    /// Connects a process that reached the appliance over a channel of its
    /// own (a shared-memory slot); it attaches like any other process.
    pub fn add_process_channel(&mut self, now_ns: u64, ch: Box<dyn Channel<Sockets>>) -> ConnId {
        self.node.add(Instant(now_ns), ConnKind::Process, ch)
    }

    /// Runs the node driver and the in-kernel processes until neither
    /// moves (in-kernel processes answer synchronously), bounded.
    fn run_node(&mut self, now_ns: u64) -> bool {
        let t0 = tsc();
        let mut moved = false;
        for _ in 0..64 {
            let a = self.node.poll(Instant(now_ns), &mut self.sockets);
            let b = self.pump_locals(now_ns);
            moved |= a | b;
            if !a && !b {
                break;
            }
        }
        self.cycles.node += tsc().wrapping_sub(t0);
        moved
    }

    /// Moves frames between in-kernel processes and their channels.
    fn pump_locals(&mut self, now_ns: u64) -> bool {
        let mut moved = false;
        for l in self.locals.iter_mut().filter(|l| !l.closed) {
            let mut writes = NodeWrites {
                node: &mut self.node,
                holder: l.conn,
                now: Instant(now_ns),
            };
            l.process.tick_with(now_ns, &mut writes);
            match l.reader.fill(&mut l.end, &mut ()) {
                Ok(m) => moved |= m,
                Err(e) => {
                    warn!("service: local process {}: {e}", l.process.name());
                    l.end.close(&mut ());
                    l.closed = true;
                    continue;
                }
            }
            while let Ok(Some(body)) = l.reader.next_frame() {
                l.process.on_message(body);
                moved = true;
            }
            loop {
                let frame = match l.pending.take() {
                    Some(f) => f,
                    None => match l.process.poll_message() {
                        Some(body) => {
                            let mut f = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
                            f.extend_from_slice(&(body.len() as u32).to_le_bytes());
                            f.extend_from_slice(&body);
                            f
                        }
                        None => break,
                    },
                };
                match l.end.send(&mut (), &frame) {
                    Ok(0) => {
                        l.pending = Some(frame);
                        break;
                    }
                    Ok(_) => moved = true,
                    Err(e) => {
                        warn!("service: local process {}: {e}", l.process.name());
                        l.closed = true;
                        break;
                    }
                }
            }
            if (l.reader.is_closed() || l.process.is_closed()) && !l.closed {
                warn!("service: local process {} closed", l.process.name());
                l.end.close(&mut ());
                l.closed = true;
                moved = true;
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
        match self.sockets.sets[i]
            .get_mut::<dhcpv4::Socket>(handle)
            .poll()
        {
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
        self.node.controller()
    }

    /// The nodes being dialled now (at most [`ServiceConfig::max_dials`]).
    pub fn dials_in_flight(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.dialing.iter().map(|d| d.node)
    }

    /// The service's counters.
    pub fn stats(&self) -> ServiceStats {
        let n: NodeStats = self.node.stats();
        ServiceStats {
            accepted: [
                n.accepted[0] - self.local_conns as u64,
                n.accepted[1] - n.dialled,
                n.accepted[2],
            ],
            dialled: n.dialled,
            unframeable: n.unframeable,
            attach_timeouts: n.attach_timeouts,
            stuck: n.stuck,
            open: n.open.iter().sum::<usize>() - self.locals.iter().filter(|l| !l.closed).count(),
        }
    }

    /// Records the kernel heap's bytes in use and size, exported as the
    /// `fractos_appliance_heap_bytes` gauge.
    pub fn set_heap_usage(&mut self, used: usize, size: usize) {
        self.heap = Some((used, size));
    }

    /// Records the shared-memory slots' counters, exported as
    /// `fractos_appliance_shm_slots` and
    /// `fractos_appliance_shm_slot_events_total` (absent without slots).
    pub fn set_slot_stats(&mut self, stats: crate::shm::SlotStats) {
        self.slots = (stats.slots > 0).then_some(stats);
    }

    /// Records the RoCEv2 engine's counters, exported as the
    /// `fractos_roce_*` families ([`crate::rdma::metrics_text`]; absent
    /// without an engine).
    pub fn set_roce_counters(&mut self, c: &fractos_roce::Counters) {
        match &mut self.roce {
            Some(mine) => mine.clone_from(c),
            None => self.roce = Some(c.clone()),
        }
    }

    /// The smoltcp socket set of interface `iface`, for sockets the
    /// appliance serves outside the node driver (the `rc_pingpong` test
    /// server's exchange); they are polled with the interface.
    pub fn socket_set(&mut self, iface: usize) -> Option<&mut SocketSet<'static>> {
        self.sockets.sets.get_mut(iface)
    }

    /// Traffic so far (live links included).
    pub fn traffic(&self) -> Traffic {
        self.node.traffic()
    }

    /// The Prometheus metrics text (what `GET /metrics` returns): the
    /// node's (core and connections), the in-kernel processes', the heap,
    /// the shared-memory slots, the RoCEv2 engine.
    pub fn metrics_text(&self) -> String {
        let mut text = self.node.metrics_text();
        let node = self.cfg.node.core.node.0;
        for l in &self.locals {
            text.push_str(&l.process.metrics_text(node));
        }
        if let Some((used, size)) = self.heap {
            use core::fmt::Write;
            let _ = writeln!(
                text,
                "# HELP fractos_appliance_heap_bytes The appliance kernel heap.\n\
                 # TYPE fractos_appliance_heap_bytes gauge\n\
                 fractos_appliance_heap_bytes{{node=\"{node}\",kind=\"used\"}} {used}\n\
                 fractos_appliance_heap_bytes{{node=\"{node}\",kind=\"size\"}} {size}"
            );
        }
        if let Some(s) = &self.slots {
            use core::fmt::Write;
            let _ = writeln!(
                text,
                "# HELP fractos_appliance_shm_slots Shared-memory (ivshmem) slots, and those with a process attached.\n\
                 # TYPE fractos_appliance_shm_slots gauge\n\
                 fractos_appliance_shm_slots{{node=\"{node}\",kind=\"total\"}} {}\n\
                 fractos_appliance_shm_slots{{node=\"{node}\",kind=\"attached\"}} {}\n\
                 # HELP fractos_appliance_shm_slot_events_total Slot attaches accepted, attaches refused (wrong echo, bad layout), and free slots whose rewritten header was published again.\n\
                 # TYPE fractos_appliance_shm_slot_events_total counter\n\
                 fractos_appliance_shm_slot_events_total{{node=\"{node}\",event=\"attach\"}} {}\n\
                 fractos_appliance_shm_slot_events_total{{node=\"{node}\",event=\"refusal\"}} {}\n\
                 fractos_appliance_shm_slot_events_total{{node=\"{node}\",event=\"repair\"}} {}",
                s.slots, s.attached, s.attaches, s.refusals, s.repairs
            );
        }
        if let Some(c) = &self.roce {
            text.push_str(&crate::rdma::metrics_text(node, c));
        }
        text
    }

    /// One turn of the event loop at `now_ns` over `nics` (interface and
    /// device of each NIC, in the order given to [`Service::new`]). Returns
    /// whether anything moved (frames in or out, connections changed).
    pub fn poll<D: Device>(&mut self, now_ns: u64, nics: &mut [(&mut Interface, &mut D)]) -> bool {
        let t0 = tsc();
        let moved = self.turn(now_ns, nics);
        self.cycles.total += tsc().wrapping_sub(t0);
        self.cycles.turns += 1;
        self.cycles.socket_io = self.sockets.io_cycles;
        moved
    }

    /// Cycles spent so far, by stage.
    pub fn cycles(&self) -> Cycles {
        self.cycles
    }

    fn turn<D: Device>(&mut self, now_ns: u64, nics: &mut [(&mut Interface, &mut D)]) -> bool {
        let at = net_now(now_ns);
        let mut moved = self.poll_ifaces(at, nics);
        // Their reset went out with the interface poll just made.
        for (iface, handle) in self.sockets.aborted.drain(..) {
            self.sockets.sets[iface].remove(handle);
        }
        self.apply_dhcp(nics);
        moved |= self.accept(now_ns);
        moved |= self.dial(now_ns, nics);
        moved |= self.run_node(now_ns);
        while let Some(id) = self.node.poll_metrics_request() {
            let text = self.metrics_text();
            self.node.answer_metrics(id, &text);
            moved = true;
        }
        if moved {
            self.run_node(now_ns);
        }
        self.replenish_listeners();
        moved |= self.poll_ifaces(at, nics);
        // A process waiting for its device keeps the loop from idling.
        moved || self.locals.iter().any(|l| !l.closed && l.process.is_busy())
    }

    fn poll_ifaces<D: Device>(
        &mut self,
        at: NetInstant,
        nics: &mut [(&mut Interface, &mut D)],
    ) -> bool {
        let t0 = tsc();
        let mut moved = false;
        for (i, (iface, dev)) in nics.iter_mut().enumerate() {
            if let Some(set) = self.sockets.sets.get_mut(i) {
                moved |= iface.poll(at, *dev, set) != PollResult::None;
                // smoltcp sends at most one segment per socket per egress
                // pass: keep passing while segments leave (bounded by the
                // windows, the device's free slots and EGRESS_BURST), so
                // a bulk send fills the transmit queue in one turn.
                for _ in 0..EGRESS_BURST {
                    if iface.poll_egress(at, *dev, set) == PollResult::None {
                        break;
                    }
                    moved = true;
                }
            }
        }
        self.cycles.ifaces += tsc().wrapping_sub(t0);
        moved
    }

    fn port(&self, kind: ConnKind) -> Option<u16> {
        match kind {
            ConnKind::Process => Some(self.cfg.process_port),
            ConnKind::Peer => Some(self.cfg.peer_port),
            ConnKind::Metrics => self.cfg.metrics_port,
        }
    }

    fn new_socket(&self, kind: ConnKind) -> tcp::Socket<'static> {
        let (rx, tx) = match kind {
            ConnKind::Process => self.cfg.process_buffers,
            ConnKind::Peer => self.cfg.peer_buffers,
            ConnKind::Metrics => (fractos_node::MAX_HTTP_REQUEST, 4096),
        };
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; rx]),
            tcp::SocketBuffer::new(vec![0; tx]),
        );
        // Frames are sent whole: no Nagle, no delayed ACKs (they would add
        // up to 10 ms to every round trip).
        s.set_nagle_enabled(false);
        s.set_ack_delay(None);
        if kind == ConnKind::Peer {
            s.set_keep_alive(Some(NetDuration::from_millis(1000)));
        }
        s
    }

    /// Keeps `backlog` sockets listening on every port while the node
    /// accepts more connections of that kind.
    fn replenish_listeners(&mut self) {
        for kind in [ConnKind::Process, ConnKind::Peer, ConnKind::Metrics] {
            let Some(port) = self.port(kind) else {
                continue;
            };
            // Processes may attach on every interface (adaptors on the host
            // or on the peer network); metrics are served on the front one,
            // peers on the peer one.
            let ifaces = match kind {
                ConnKind::Process => 0..self.sockets.sets.len(),
                ConnKind::Peer => self.cfg.peer_iface..self.cfg.peer_iface + 1,
                ConnKind::Metrics => self.cfg.front_iface..self.cfg.front_iface + 1,
            };
            if !self.node.accepts(kind) {
                continue;
            }
            for iface in ifaces {
                let mut here = self
                    .listeners
                    .iter()
                    .filter(|l| l.kind == kind && l.iface == iface)
                    .count();
                while here < self.cfg.backlog {
                    let mut s = self.new_socket(kind);
                    if let Err(e) = s.listen(port) {
                        warn!("service: cannot listen on port {port}: {e}");
                        break;
                    }
                    let handle = self.sockets.sets[iface].add(s);
                    self.listeners.push(Listener {
                        iface,
                        handle,
                        kind,
                    });
                    here += 1;
                }
            }
        }
    }

    /// Turns listening sockets that got a connection into node connections
    /// (or refuses them when the node is full).
    fn accept(&mut self, now_ns: u64) -> bool {
        let mut moved = false;
        let mut i = 0;
        while i < self.listeners.len() {
            let l = &self.listeners[i];
            let s = self.sockets.sets[l.iface].get_mut::<tcp::Socket>(l.handle);
            match s.state() {
                tcp::State::Listen | tcp::State::SynReceived => {
                    i += 1;
                    continue;
                }
                tcp::State::Closed => {
                    // Reset before it was established: drop the socket; a
                    // fresh listener replaces it.
                    let l = self.listeners.swap_remove(i);
                    self.sockets.sets[l.iface].remove(l.handle);
                    continue;
                }
                _ => {}
            }
            let remote = s.remote_endpoint();
            let l = self.listeners.swap_remove(i);
            moved = true;
            if !self.node.accepts(l.kind) {
                // The backlog took more than the node has room for.
                let s = self.sockets.sets[l.iface].get_mut::<tcp::Socket>(l.handle);
                s.abort();
                self.sockets.aborted.push((l.iface, l.handle));
                continue;
            }
            let ch = TcpChannel {
                iface: l.iface,
                handle: l.handle,
                aborted: false,
            };
            let id: ConnId = self.node.add(Instant(now_ns), l.kind, Box::new(ch));
            match l.kind {
                ConnKind::Process => debug!("service: process channel {} from {remote:?}", id.0),
                ConnKind::Peer => info!("service: peer link {} accepted from {remote:?}", id.0),
                ConnKind::Metrics => {}
            }
        }
        moved
    }

    /// Starts the dials the node asks for; hands established ones over.
    fn dial<D: Device>(&mut self, now_ns: u64, nics: &mut [(&mut Interface, &mut D)]) -> bool {
        let mut moved = false;
        let pi = self.cfg.peer_iface;
        let now = Instant(now_ns);
        let mut i = 0;
        while i < self.dialing.len() {
            let d = &self.dialing[i];
            let s = self.sockets.sets[pi].get_mut::<tcp::Socket>(d.handle);
            match s.state() {
                tcp::State::Established => {
                    let d = self.dialing.swap_remove(i);
                    let ch = TcpChannel {
                        iface: pi,
                        handle: d.handle,
                        aborted: false,
                    };
                    self.node.dialed(now, d.node, Box::new(ch));
                    moved = true;
                }
                tcp::State::SynSent if now_ns.saturating_sub(d.started_ns) < DIAL_TIMEOUT_NS => {
                    i += 1;
                }
                state => {
                    debug!("service: dial of node {} failed ({state})", d.node.0);
                    s.abort();
                    let d = self.dialing.swap_remove(i);
                    self.sockets.sets[pi].remove(d.handle);
                    self.node.dial_failed(now, d.node);
                }
            }
        }
        while self.dialing.len() < self.cfg.max_dials {
            let Some((node, peer)) = self.node.poll_dial(now) else {
                break;
            };
            let Some((iface, _)) = nics.get_mut(pi) else {
                self.node.dial_failed(now, node);
                break;
            };
            let mut s = self.new_socket(ConnKind::Peer);
            let local = self.next_local_port;
            self.next_local_port = if local == u16::MAX { 49152 } else { local + 1 };
            let remote = IpEndpoint::new(IpAddress::Ipv4(peer.addr), peer.port);
            match s.connect(iface.context(), remote, local) {
                Ok(()) => {
                    let handle = self.sockets.sets[pi].add(s);
                    self.dialing.push(Dialing {
                        node,
                        handle,
                        started_ns: now_ns,
                    });
                }
                Err(e) => {
                    warn!("service: cannot dial node {} at {remote}: {e}", node.0);
                    self.node.dial_failed(now, node);
                }
            }
        }
        moved
    }
}
