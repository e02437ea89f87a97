//! The event loop: sockets in, core, sockets out.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fractos_core::{
    ChannelId, CloseReason, Config, Controller, Dest, Instant, LinkId, LinkRole, LinkTraffic,
    Output, Traffic,
};
use fractos_wire::{FrameSplitter, NodeId};
use tokio::io::AsyncReadExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::{HostedConfig, HostedError};

pub(crate) enum Event {
    ProcOpened(TcpStream),
    ProcFrame(ChannelId, Vec<u8>),
    ProcClosed(ChannelId),
    /// A process channel's time to send its first frame is up.
    AttachDeadline(ChannelId),
    LinkOpened(TcpStream, Option<(NodeId, oneshot::Sender<()>)>),
    LinkFrame(LinkId, Vec<u8>),
    LinkClosed(LinkId),
    AddPeer(NodeId, SocketAddr),
    Metrics(oneshot::Sender<String>),
    Traffic(oneshot::Sender<Traffic>),
    Shutdown,
}

/// The sending side of a socket: the core task writes directly while
/// nothing is queued; otherwise frames queue for a writer task that waits
/// for the socket to become writable. Order is preserved either way.
struct Writer {
    half: Arc<OwnedWriteHalf>,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    queued: Arc<AtomicUsize>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Writer {
    fn start(
        stream: TcpStream,
        events: mpsc::Sender<Event>,
        max_frame: usize,
        on_frame: fn(u64, Vec<u8>) -> Event,
        on_close: fn(u64) -> Event,
        id: u64,
    ) -> Writer {
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        let half = Arc::new(wr);
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let writer = tokio::spawn(write_frames(half.clone(), rx, queued.clone()));
        let reader = tokio::spawn(read_frames(rd, max_frame, events, on_frame, on_close, id));
        Writer {
            half,
            tx,
            queued,
            reader,
            writer,
        }
    }

    /// Sends or queues a frame; false if the socket is broken or stuck past
    /// `limit` queued bytes.
    fn send(&self, mut frame: Vec<u8>, limit: usize) -> bool {
        if self.queued.load(Ordering::Relaxed) == 0 {
            match self.half.try_write(&frame) {
                Ok(n) if n == frame.len() => return true,
                Ok(n) => {
                    frame.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return false,
            }
        }
        let n = frame.len();
        if self.queued.fetch_add(n, Ordering::Relaxed) + n > limit {
            return false;
        }
        self.tx.send(frame).is_ok()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.reader.abort();
        // Let queued frames (e.g. a final Rejected) drain, then the writer
        // task ends when its inbox closes, closing the socket.
        if self.queued.load(Ordering::Relaxed) == 0 {
            self.writer.abort();
        }
    }
}

async fn read_frames(
    mut rd: OwnedReadHalf,
    max_frame: usize,
    events: mpsc::Sender<Event>,
    on_frame: fn(u64, Vec<u8>) -> Event,
    on_close: fn(u64) -> Event,
    id: u64,
) {
    let splitter = FrameSplitter::new(max_frame);
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    'outer: loop {
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let mut consumed = 0;
        loop {
            match splitter.split(&buf[consumed..]) {
                Ok(Some((body, n))) => {
                    let ev = on_frame(id, body.to_vec());
                    consumed += n;
                    if events.send(ev).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    debug!(id, error = %e, "unframeable input, closing");
                    break 'outer;
                }
            }
        }
        buf.drain(..consumed);
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
    }
    let _ = events.send(on_close(id)).await;
}

async fn write_frames(
    half: Arc<OwnedWriteHalf>,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    queued: Arc<AtomicUsize>,
) {
    while let Some(frame) = rx.recv().await {
        let mut at = 0;
        while at < frame.len() {
            if half.writable().await.is_err() {
                return;
            }
            match half.try_write(&frame[at..]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
        queued.fetch_sub(frame.len(), Ordering::Relaxed);
    }
}

/// A controller running on its own thread.
pub struct Running {
    events: mpsc::Sender<Event>,
    thread: Option<std::thread::JoinHandle<()>>,
    process_addr: SocketAddr,
    peer_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    node: NodeId,
}

impl Running {
    /// Node id.
    pub fn node(&self) -> NodeId {
        self.node
    }
    /// Where processes connect.
    pub fn process_addr(&self) -> SocketAddr {
        self.process_addr
    }
    /// Where peer controllers connect.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }
    /// Where metrics are served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }
    /// Sends an event from any thread, also one inside a tokio runtime
    /// (where `blocking_send` would panic).
    fn post(&self, ev: Event) -> bool {
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| {
                s.spawn(|| self.events.blocking_send(ev).is_ok())
                    .join()
                    .unwrap_or(false)
            })
        } else {
            self.events.blocking_send(ev).is_ok()
        }
    }

    /// Adds a peer controller (dialled if its id is higher than ours).
    pub fn add_peer(&self, node: NodeId, addr: SocketAddr) {
        self.post(Event::AddPeer(node, addr));
    }
    /// Current traffic counters.
    pub fn traffic(&self) -> Result<Traffic, HostedError> {
        let (tx, rx) = oneshot::channel();
        if !self.post(Event::Traffic(tx)) {
            return Err(HostedError::Stopped);
        }
        wait_reply(rx)
    }
    /// The Prometheus metrics text.
    pub fn metrics_text(&self) -> Result<String, HostedError> {
        let (tx, rx) = oneshot::channel();
        if !self.post(Event::Metrics(tx)) {
            return Err(HostedError::Stopped);
        }
        wait_reply(rx)
    }
    /// Stops the controller: every process is disconnected (its objects
    /// revoked), links close, the thread ends.
    pub fn shutdown(mut self) {
        self.stop();
    }
    fn stop(&mut self) {
        self.post(Event::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits for a reply from any thread, also one inside a tokio runtime.
fn wait_reply<T: Send>(rx: oneshot::Receiver<T>) -> Result<T, HostedError> {
    let recv = move || rx.blocking_recv().map_err(|_| HostedError::Stopped);
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| s.spawn(recv).join().unwrap_or(Err(HostedError::Stopped)))
    } else {
        recv()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Bound {
    process: std::net::TcpListener,
    peer: std::net::TcpListener,
    metrics: Option<std::net::TcpListener>,
}

fn bind(cfg: &HostedConfig) -> Result<Bound, HostedError> {
    let b = |addr: SocketAddr| {
        let l = std::net::TcpListener::bind(addr)
            .map_err(|source| HostedError::Bind { addr, source })?;
        l.set_nonblocking(true)
            .map_err(|source| HostedError::Bind { addr, source })?;
        Ok::<_, HostedError>(l)
    };
    Ok(Bound {
        process: b(cfg.process_listen)?,
        peer: b(cfg.peer_listen)?,
        metrics: cfg.metrics_listen.map(b).transpose()?,
    })
}

/// Starts a controller on a new thread with its own runtime.
pub fn spawn(cfg: HostedConfig) -> Result<Running, HostedError> {
    let bound = bind(&cfg)?;
    let addr = |l: &std::net::TcpListener| l.local_addr().expect("bound listener has an address");
    let (process_addr, peer_addr) = (addr(&bound.process), addr(&bound.peer));
    let metrics_addr = bound.metrics.as_ref().map(addr);
    let (tx, rx) = mpsc::channel(4096);
    let events = tx.clone();
    let node = cfg.node;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(format!("fractos-controller-{}", cfg.node.0))
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(HostedError::Runtime(e)));
                    return;
                }
            };
            rt.block_on(async move {
                match EventLoop::start(cfg, bound, tx, rx) {
                    Ok(l) => {
                        let _ = ready_tx.send(Ok(()));
                        l.run().await;
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
        })
        .map_err(HostedError::Runtime)?;
    ready_rx.recv().map_err(|_| HostedError::Stopped)??;
    Ok(Running {
        events,
        thread: Some(thread),
        process_addr,
        peer_addr,
        metrics_addr,
        node,
    })
}

/// Runs a controller on the current tokio runtime until `shutdown` resolves.
pub async fn run(
    cfg: HostedConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), HostedError> {
    let bound = bind(&cfg)?;
    info!(
        node = cfg.node.0,
        processes = %bound.process.local_addr().map_err(HostedError::Runtime)?,
        peers = %bound.peer.local_addr().map_err(HostedError::Runtime)?,
        "controller listening"
    );
    let (tx, rx) = mpsc::channel(4096);
    let stop = tx.clone();
    let l = EventLoop::start(cfg, bound, tx, rx)?;
    let looping = tokio::spawn(l.run());
    shutdown.await;
    info!("shutting down");
    let _ = stop.send(Event::Shutdown).await;
    let _ = looping.await;
    Ok(())
}

struct EventLoop {
    cfg: HostedConfig,
    ctrl: Controller,
    epoch: std::time::Instant,
    events: mpsc::Sender<Event>,
    rx: mpsc::Receiver<Event>,
    procs: BTreeMap<ChannelId, Writer>,
    /// Process channels that have not sent a frame yet, with the task that
    /// reports their attach deadline.
    unattached: BTreeMap<ChannelId, JoinHandle<()>>,
    links: BTreeMap<LinkId, (Writer, Option<oneshot::Sender<()>>)>,
    link_peer: BTreeMap<LinkId, Option<NodeId>>,
    dialers: BTreeMap<NodeId, JoinHandle<()>>,
    next_id: u64,
    traffic: Traffic,
    link_traffic: BTreeMap<LinkId, LinkTraffic>,
    tasks: Vec<JoinHandle<()>>,
}

fn incarnation() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_nanos() as u64) ^ ((std::process::id() as u64) << 48)
}

impl EventLoop {
    fn start(
        cfg: HostedConfig,
        bound: Bound,
        events: mpsc::Sender<Event>,
        rx: mpsc::Receiver<Event>,
    ) -> Result<Self, HostedError> {
        let inc = incarnation();
        let mut core = Config::new(cfg.node, inc, cfg.cluster_key);
        core.members = if cfg.members.is_empty() {
            std::iter::once(cfg.node)
                .chain(cfg.peers.iter().map(|p| p.0))
                .collect()
        } else {
            cfg.members.clone()
        };
        core.limits = cfg.limits.clone();
        core.op_timeout = cfg.op_timeout;
        core.heartbeat_interval = cfg.heartbeat_interval;
        core.peer_timeout = cfg.peer_timeout;
        core.copy_chunk = cfg.copy_chunk;
        core.copy_window = cfg.copy_window;
        core.peer_security = cfg.peer_security;
        getrandom::getrandom(&mut core.rng_seed).map_err(|e| {
            HostedError::Runtime(std::io::Error::other(format!(
                "the OS random number generator failed ({e}); the controller needs it for peer handshakes"
            )))
        })?;
        let epoch = std::time::Instant::now();
        let ctrl = Controller::new(core, Instant(0));
        let to_tokio =
            |l: std::net::TcpListener| TcpListener::from_std(l).map_err(HostedError::Runtime);
        let process = to_tokio(bound.process)?;
        let peer = to_tokio(bound.peer)?;
        let mut tasks = vec![
            tokio::spawn(accept(process, events.clone(), Event::ProcOpened)),
            tokio::spawn(accept(peer, events.clone(), |s| Event::LinkOpened(s, None))),
        ];
        if let Some(m) = bound.metrics {
            tasks.push(tokio::spawn(crate::metrics::serve(
                to_tokio(m)?,
                events.clone(),
                cfg.max_metrics_conns,
                cfg.metrics_timeout,
            )));
        }
        let mut l = EventLoop {
            ctrl,
            epoch,
            events,
            rx,
            procs: BTreeMap::new(),
            unattached: BTreeMap::new(),
            links: BTreeMap::new(),
            link_peer: BTreeMap::new(),
            dialers: BTreeMap::new(),
            next_id: 1,
            traffic: Traffic::default(),
            link_traffic: BTreeMap::new(),
            tasks,
            cfg,
        };
        for (node, addr) in l.cfg.peers.clone() {
            l.add_peer(node, addr);
        }
        Ok(l)
    }

    fn now(&self) -> Instant {
        Instant(self.epoch.elapsed().as_nanos() as u64)
    }

    fn add_peer(&mut self, node: NodeId, addr: SocketAddr) {
        if node <= self.cfg.node || self.dialers.contains_key(&node) {
            return;
        }
        let events = self.events.clone();
        self.dialers
            .insert(node, tokio::spawn(dial(node, addr, events)));
    }

    async fn run(mut self) {
        // One timer, re-armed to the core's next deadline only when the
        // event queue is empty: bursts of frames never touch the timer wheel.
        let sleep = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(sleep);
        'events: loop {
            while let Ok(ev) = self.rx.try_recv() {
                if !self.handle(ev) {
                    break 'events;
                }
            }
            self.flush();
            let deadline = self.ctrl.poll_timeout();
            if let Some(d) = deadline {
                if d <= self.now() {
                    let now = self.now();
                    self.ctrl.handle_timeout(now);
                    self.flush();
                    continue;
                }
                let at = self.epoch + Duration::from_nanos(d.0);
                sleep.as_mut().reset(at.into());
            }
            tokio::select! {
                ev = self.rx.recv() => match ev {
                    Some(ev) => {
                        if !self.handle(ev) {
                            break 'events;
                        }
                        self.flush();
                    }
                    None => break 'events,
                },
                _ = &mut sleep, if deadline.is_some() => {
                    let now = self.now();
                    self.ctrl.handle_timeout(now);
                    self.flush();
                }
            }
        }
        // Disconnect every process so the core revokes what they own.
        let now = self.now();
        for chan in self.procs.keys().copied().collect::<Vec<_>>() {
            self.ctrl.process_disconnected(now, chan);
        }
        self.flush();
        for t in self.tasks.iter().chain(self.unattached.values()) {
            t.abort();
        }
        for d in self.dialers.values() {
            d.abort();
        }
        info!(node = self.cfg.node.0, "controller stopped");
    }

    fn handle(&mut self, ev: Event) -> bool {
        let now = self.now();
        match ev {
            Event::ProcOpened(stream) => {
                let chan = ChannelId(self.next_id);
                self.next_id += 1;
                debug!(chan = chan.0, peer = ?stream.peer_addr().ok(), "process connected");
                let w = Writer::start(
                    stream,
                    self.events.clone(),
                    self.cfg.limits.max_message_len,
                    |id, b| Event::ProcFrame(ChannelId(id), b),
                    |id| Event::ProcClosed(ChannelId(id)),
                    chan.0,
                );
                self.procs.insert(chan, w);
                let (events, timeout) = (self.events.clone(), self.cfg.attach_timeout);
                let deadline = tokio::spawn(async move {
                    tokio::time::sleep(timeout).await;
                    let _ = events.send(Event::AttachDeadline(chan)).await;
                });
                self.unattached.insert(chan, deadline);
                self.ctrl.process_connected(now, chan);
            }
            Event::ProcFrame(chan, body) => {
                if self.procs.contains_key(&chan) {
                    self.forget_deadline(chan);
                    self.traffic.processes.frames_in += 1;
                    self.traffic.processes.bytes_in += body.len() as u64 + 4;
                    self.ctrl.process_message(now, chan, &body);
                }
            }
            Event::ProcClosed(chan) => {
                self.forget_deadline(chan);
                if self.procs.remove(&chan).is_some() {
                    debug!(chan = chan.0, "process disconnected");
                    self.ctrl.process_disconnected(now, chan);
                }
            }
            Event::AttachDeadline(chan) => {
                // Still silent: the connection loses its slot, as on the
                // appliance.
                if self.unattached.remove(&chan).is_some() && self.procs.remove(&chan).is_some() {
                    info!(chan = chan.0, "process sent nothing in time; closing");
                    self.ctrl.process_disconnected(now, chan);
                }
            }
            Event::LinkOpened(stream, dialed) => {
                let link = LinkId(self.next_id);
                self.next_id += 1;
                let peer = dialed.as_ref().map(|d| d.0);
                debug!(link = link.0, ?peer, "peer link up");
                let w = Writer::start(
                    stream,
                    self.events.clone(),
                    self.cfg.limits.max_message_len,
                    |id, b| Event::LinkFrame(LinkId(id), b),
                    |id| Event::LinkClosed(LinkId(id)),
                    link.0,
                );
                self.links.insert(link, (w, dialed.map(|d| d.1)));
                self.link_peer.insert(link, peer);
                let role = match peer {
                    Some(peer) => LinkRole::Initiator { peer },
                    None => LinkRole::Responder,
                };
                self.ctrl.link_connected(now, link, role);
            }
            Event::LinkFrame(link, body) => {
                if self.links.contains_key(&link) {
                    let t = self.link_traffic.entry(link).or_default();
                    t.frames_in += 1;
                    t.bytes_in += body.len() as u64 + 4;
                    self.ctrl.link_message(now, link, &body);
                }
            }
            Event::LinkClosed(link) => {
                if self.links.remove(&link).is_some() {
                    info!(link = link.0, "peer link down");
                    self.retire_link(link);
                    self.ctrl.link_disconnected(now, link);
                }
            }
            Event::AddPeer(node, addr) => self.add_peer(node, addr),
            Event::Metrics(reply) => {
                let _ = reply.send(fractos_core::prometheus::render(
                    &self.ctrl,
                    &self.traffic_snapshot(),
                ));
            }
            Event::Traffic(reply) => {
                let _ = reply.send(self.traffic_snapshot());
            }
            Event::Shutdown => return false,
        }
        true
    }

    /// Cancels a channel's attach deadline (it sent a frame or is gone).
    fn forget_deadline(&mut self, chan: ChannelId) {
        if let Some(t) = self.unattached.remove(&chan) {
            t.abort();
        }
    }

    /// Folds a closed link's counters into its peer's totals.
    fn retire_link(&mut self, link: LinkId) {
        let t = self.link_traffic.remove(&link).unwrap_or_default();
        let node = self.link_node(link);
        self.link_peer.remove(&link);
        self.traffic.peers.entry(node).or_default().add(&t);
    }

    /// The peer node behind a link (the dialled node, else the one that
    /// authenticated on it; 0 while unknown).
    fn link_node(&self, link: LinkId) -> u32 {
        self.link_peer
            .get(&link)
            .copied()
            .flatten()
            .or_else(|| self.ctrl.link_peer(link))
            .map(|n| n.0)
            .unwrap_or(0)
    }

    fn traffic_snapshot(&self) -> Traffic {
        let mut t = self.traffic.clone();
        for (link, lt) in &self.link_traffic {
            t.peers.entry(self.link_node(*link)).or_default().add(lt);
        }
        t
    }

    fn flush(&mut self) {
        let limit = self.cfg.max_queued_bytes;
        while let Some(out) = self.ctrl.poll_output() {
            match out {
                Output::Send {
                    to: Dest::Process(chan),
                    frame,
                } => {
                    let n = frame.len() as u64;
                    let stuck = match self.procs.get(&chan) {
                        Some(w) => !w.send(frame, limit),
                        None => false,
                    };
                    self.traffic.processes.frames_out += 1;
                    self.traffic.processes.bytes_out += n;
                    if stuck {
                        warn!(
                            chan = chan.0,
                            "process does not read its channel; disconnecting"
                        );
                        self.procs.remove(&chan);
                        self.forget_deadline(chan);
                        let now = self.now();
                        self.ctrl.process_disconnected(now, chan);
                    }
                }
                Output::Send {
                    to: Dest::Link(link),
                    frame,
                } => {
                    let n = frame.len() as u64;
                    let t = self.link_traffic.entry(link).or_default();
                    t.frames_out += 1;
                    t.bytes_out += n;
                    let stuck = match self.links.get(&link) {
                        Some((w, _)) => !w.send(frame, limit),
                        None => false,
                    };
                    if stuck && self.links.remove(&link).is_some() {
                        warn!(link = link.0, "peer link is stuck; closing");
                        self.retire_link(link);
                        let now = self.now();
                        self.ctrl.link_disconnected(now, link);
                    }
                }
                Output::Close {
                    to: Dest::Process(chan),
                    reason,
                } => {
                    info!(chan = chan.0, ?reason, "closing process channel");
                    self.procs.remove(&chan);
                    self.forget_deadline(chan);
                }
                Output::Close {
                    to: Dest::Link(link),
                    reason,
                } => {
                    if reason != CloseReason::Duplicate {
                        warn!(link = link.0, ?reason, "closing peer link");
                    }
                    if self.links.remove(&link).is_some() {
                        self.retire_link(link);
                    }
                }
            }
        }
    }
}

async fn accept(l: TcpListener, events: mpsc::Sender<Event>, wrap: fn(TcpStream) -> Event) {
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                if events.send(wrap(s)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Keeps one link to `node` up, re-dialling with backoff.
async fn dial(node: NodeId, addr: SocketAddr, events: mpsc::Sender<Event>) {
    let mut backoff = Duration::from_millis(20);
    loop {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                let (done_tx, done_rx) = oneshot::channel();
                if events
                    .send(Event::LinkOpened(s, Some((node, done_tx))))
                    .await
                    .is_err()
                {
                    return;
                }
                let _ = done_rx.await;
                backoff = Duration::from_millis(20);
            }
            Err(e) => debug!(node = node.0, %addr, error = %e, "dial failed"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}
