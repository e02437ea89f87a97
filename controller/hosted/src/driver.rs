//! The event loop: tokio sockets as transport channels under the shared
//! node driver ([`fractos_node::Node`]), which owns the controller core and
//! every connection policy (framing, queues, timeouts, dialing, traffic,
//! metrics). This module is only glue: accept and dial tasks, per-socket
//! reader tasks feeding a bounded event queue (TCP backpressure for
//! floods), writers that write directly while the socket takes bytes, and
//! one timer re-armed to the node's next deadline.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fractos_core::{Config, Instant, Traffic};
use fractos_node::{ConnKind, Node, NodeConfig};
use fractos_transport::{Channel, Framing, Received, TransportError};
use fractos_wire::NodeId;
use tokio::io::AsyncReadExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::local::{self, LocalHandle, LocalParts};
use crate::{HostedConfig, HostedError};

pub(crate) enum Event {
    Accepted(ConnKind, TcpStream),
    Data(u64, Vec<u8>),
    Eof(u64),
    Dialed(NodeId, TcpStream),
    DialFailed(NodeId),
    AddPeer(NodeId, SocketAddr),
    Metrics(oneshot::Sender<String>),
    Traffic(oneshot::Sender<Traffic>),
    Peers(oneshot::Sender<usize>),
    /// A local process's rings are open: add its channel (answer whether
    /// it was taken).
    Local(Box<LocalParts>, oneshot::Sender<bool>),
    /// Something happened on a local channel (a kick, the process left).
    Wake,
    Shutdown,
}

/// Bytes a socket's writer may hold before the channel stops taking more
/// (the node driver's own queue, with its stuck bound, takes over).
const WRITE_QUEUE_LIMIT: usize = 4 << 20;
/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 64 * 1024;

/// What a socket's reader task delivered and the node has not read yet.
#[derive(Default)]
struct Inbox {
    chunks: VecDeque<Vec<u8>>,
    /// Bytes of the front chunk already taken.
    at: usize,
    eof: bool,
    /// The channel was dropped by the node: the loop forgets the inbox.
    dropped: bool,
}

/// A tokio TCP stream as a [`Channel`].
struct TokioChannel {
    inbox: Rc<RefCell<Inbox>>,
    half: Option<Arc<OwnedWriteHalf>>,
    tx: Option<mpsc::UnboundedSender<Vec<u8>>>,
    queued: Arc<AtomicUsize>,
    broken: Arc<AtomicBool>,
    writer: JoinHandle<()>,
    reader: JoinHandle<()>,
}

impl TokioChannel {
    /// Wraps `stream`; its reader task reports as connection `id` once the
    /// returned sender is given the id.
    fn start(stream: TcpStream, events: mpsc::Sender<Event>) -> (Self, oneshot::Sender<u64>) {
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        let half = Arc::new(wr);
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let broken = Arc::new(AtomicBool::new(false));
        let writer = tokio::spawn(write_queue(
            half.clone(),
            rx,
            queued.clone(),
            broken.clone(),
        ));
        let (id_tx, id_rx) = oneshot::channel();
        let reader = tokio::spawn(read_chunks(rd, id_rx, events));
        let ch = TokioChannel {
            inbox: Rc::new(RefCell::new(Inbox::default())),
            half: Some(half),
            tx: Some(tx),
            queued,
            broken,
            writer,
            reader,
        };
        (ch, id_tx)
    }
}

impl Channel for TokioChannel {
    fn framing(&self) -> Framing {
        Framing::Stream
    }

    fn send(&mut self, _: &mut (), data: &[u8]) -> Result<usize, TransportError> {
        let (Some(half), Some(tx)) = (&self.half, &self.tx) else {
            return Err(TransportError::Closed);
        };
        if self.broken.load(Ordering::Relaxed) {
            return Err(TransportError::Reset);
        }
        let queued = self.queued.load(Ordering::Relaxed);
        if queued == 0 {
            match half.try_write(data) {
                Ok(n) if n == data.len() => return Ok(n),
                Ok(n) => {
                    // The rest waits for the writer task (order kept).
                    let rest = &data[n..];
                    self.queued.fetch_add(rest.len(), Ordering::Relaxed);
                    let _ = tx.send(rest.to_vec());
                    return Ok(data.len());
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Err(TransportError::Reset),
            }
        } else if queued > WRITE_QUEUE_LIMIT {
            return Ok(0);
        }
        self.queued.fetch_add(data.len(), Ordering::Relaxed);
        tx.send(data.to_vec()).map_err(|_| TransportError::Reset)?;
        Ok(data.len())
    }

    fn recv(
        &mut self,
        _: &mut (),
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<Received, TransportError> {
        let mut inbox = self.inbox.borrow_mut();
        let mut n = 0;
        while n < max {
            let at = inbox.at;
            let Some(front) = inbox.chunks.front() else {
                break;
            };
            let take = (front.len() - at).min(max - n);
            out.extend_from_slice(&front[at..at + take]);
            n += take;
            if at + take == front.len() {
                inbox.chunks.pop_front();
                inbox.at = 0;
            } else {
                inbox.at += take;
            }
        }
        if n > 0 {
            Ok(Received::Data(n))
        } else if inbox.eof {
            Ok(Received::Closed)
        } else {
            Ok(Received::Empty)
        }
    }

    fn close(&mut self, _: &mut ()) {
        // The writer task drains what is queued, then drops its half; ours
        // goes now, so the socket's write side shuts when it is done.
        self.tx = None;
        self.half = None;
    }

    fn abort(&mut self, _: &mut ()) {
        self.tx = None;
        self.half = None;
        self.writer.abort();
        self.reader.abort();
        self.inbox.borrow_mut().eof = true;
    }

    fn is_finished(&self, _: &mut ()) -> bool {
        let gone = self.inbox.borrow().eof || self.broken.load(Ordering::Relaxed);
        (self.half.is_none() && self.writer.is_finished() && gone)
            || (self.broken.load(Ordering::Relaxed) && self.half.is_some() && gone)
    }
}

impl Drop for TokioChannel {
    fn drop(&mut self) {
        self.reader.abort();
        if self.half.is_some() {
            self.writer.abort();
        }
        self.inbox.borrow_mut().dropped = true;
    }
}

async fn read_chunks(
    mut rd: OwnedReadHalf,
    id: oneshot::Receiver<u64>,
    events: mpsc::Sender<Event>,
) {
    let Ok(id) = id.await else {
        return;
    };
    loop {
        let mut buf = Vec::with_capacity(READ_CHUNK);
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if events.send(Event::Data(id, buf)).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = events.send(Event::Eof(id)).await;
}

async fn write_queue(
    half: Arc<OwnedWriteHalf>,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    queued: Arc<AtomicUsize>,
    broken: Arc<AtomicBool>,
) {
    while let Some(frame) = rx.recv().await {
        let mut at = 0;
        while at < frame.len() {
            if half.writable().await.is_err() {
                broken.store(true, Ordering::Relaxed);
                return;
            }
            match half.try_write(&frame[at..]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    broken.store(true, Ordering::Relaxed);
                    return;
                }
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
    local_socket: Option<std::path::PathBuf>,
    node: NodeId,
}

impl Running {
    /// Where local processes attach ([`HostedConfig::local_socket`]).
    pub fn local_socket(&self) -> Option<&std::path::Path> {
        self.local_socket.as_deref()
    }
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
    /// Authenticated peer controllers linked right now.
    pub fn peers(&self) -> Result<usize, HostedError> {
        let (tx, rx) = oneshot::channel();
        if !self.post(Event::Peers(tx)) {
            return Err(HostedError::Stopped);
        }
        wait_reply(rx)
    }

    /// Waits until at least `n` peers are linked (links come up
    /// asynchronously: dial, handshake); `Err(NotLinked)` after `timeout`.
    pub fn wait_peers(&self, n: usize, timeout: Duration) -> Result<(), HostedError> {
        // A timeout too large for the clock is no deadline.
        let deadline = std::time::Instant::now().checked_add(timeout);
        loop {
            let linked = self.peers()?;
            if linked >= n {
                return Ok(());
            }
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return Err(HostedError::NotLinked { linked, wanted: n });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
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
    local: Option<(std::os::unix::net::UnixListener, std::path::PathBuf)>,
}

/// Binds the local socket at `path` (a stale socket file there is
/// replaced; anything else is an error), with `mode` and `owner`.
fn bind_local(
    cfg: &HostedConfig,
) -> Result<Option<(std::os::unix::net::UnixListener, std::path::PathBuf)>, HostedError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let Some(path) = &cfg.local_socket else {
        return Ok(None);
    };
    let fail = |source: std::io::Error| HostedError::BindLocal {
        path: path.clone(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(fail(std::io::Error::other(
                "the path exists and is not a socket",
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(fail(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "a controller already listens there",
            )));
        }
        std::fs::remove_file(path).map_err(fail)?;
    }
    let l = std::os::unix::net::UnixListener::bind(path).map_err(fail)?;
    l.set_nonblocking(true).map_err(fail)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(cfg.local_socket_mode))
        .map_err(fail)?;
    if let Some((uid, gid)) = cfg.local_socket_owner {
        std::os::unix::fs::chown(path, uid, gid).map_err(fail)?;
    }
    Ok(Some((l, path.clone())))
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
        local: bind_local(cfg)?,
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
    let local_socket = cfg.local_socket.clone();
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
        local_socket,
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
    if let Some((_, path)) = &bound.local {
        info!(path = %path.display(), mode = format_args!("{:o}", cfg.local_socket_mode), "local socket listening");
    }
    let (tx, rx) = mpsc::channel(4096);
    let stop = tx.clone();
    let l = EventLoop::start(cfg, bound, tx, rx)?;
    // The loop owns non-`Send` channels: it runs on this task, next to the
    // shutdown watcher.
    let watch = async move {
        shutdown.await;
        info!("shutting down");
        let _ = stop.send(Event::Shutdown).await;
    };
    tokio::join!(l.run(), watch);
    Ok(())
}

struct EventLoop {
    node: Node<(), SocketAddr>,
    /// Local channels, to spin and sleep on their rings.
    locals: HashMap<u64, LocalHandle>,
    /// How long the loop polls local rings before it sleeps.
    spin: Duration,
    /// The local socket's path, removed when the loop ends.
    local_path: Option<std::path::PathBuf>,
    epoch: std::time::Instant,
    events: mpsc::Sender<Event>,
    rx: mpsc::Receiver<Event>,
    inboxes: HashMap<u64, Rc<RefCell<Inbox>>>,
    tasks: Vec<JoinHandle<()>>,
    dials: Vec<JoinHandle<()>>,
    stopping: bool,
}

/// Grows with every start (gossip membership takes the higher incarnation
/// as the newer one): the boot time in nanoseconds, its low 16 bits
/// replaced by the process id's so two starts in one tick still differ.
fn incarnation() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    ((t.as_nanos() as u64) & !0xffff) | (std::process::id() as u64 & 0xffff)
}

/// The node driver's configuration for `cfg` (the schema both hosts use).
fn node_config(cfg: &HostedConfig) -> Result<NodeConfig<SocketAddr>, HostedError> {
    let mut core = Config::new(cfg.node, incarnation(), cfg.cluster_key);
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
    core.gossip = cfg.gossip.clone();
    getrandom::getrandom(&mut core.rng_seed).map_err(|e| {
        HostedError::Runtime(std::io::Error::other(format!(
            "the OS random number generator failed ({e}); the controller needs it for peer handshakes"
        )))
    })?;
    let mut n = NodeConfig::new(core);
    n.peers = cfg.peers.clone();
    n.max_process_conns = cfg.limits.max_processes;
    n.max_metrics_conns = cfg.max_metrics_conns;
    n.max_queued_bytes = cfg.max_queued_bytes;
    n.attach_timeout = cfg.attach_timeout;
    n.metrics_timeout = cfg.metrics_timeout;
    // Dial backoff, linger and buffer bounds: the node's defaults, the
    // same as the appliance's.
    Ok(n)
}

impl EventLoop {
    fn start(
        cfg: HostedConfig,
        bound: Bound,
        events: mpsc::Sender<Event>,
        rx: mpsc::Receiver<Event>,
    ) -> Result<Self, HostedError> {
        let node = Node::new(node_config(&cfg)?, Instant(0));
        let epoch = std::time::Instant::now();
        let to_tokio =
            |l: std::net::TcpListener| TcpListener::from_std(l).map_err(HostedError::Runtime);
        let mut tasks = vec![
            tokio::spawn(accept(
                to_tokio(bound.process)?,
                events.clone(),
                ConnKind::Process,
            )),
            tokio::spawn(accept(
                to_tokio(bound.peer)?,
                events.clone(),
                ConnKind::Peer,
            )),
        ];
        if let Some(m) = bound.metrics {
            tasks.push(tokio::spawn(accept(
                to_tokio(m)?,
                events.clone(),
                ConnKind::Metrics,
            )));
        }
        let mut local_path = None;
        if let Some((l, path)) = bound.local {
            let l = tokio::net::UnixListener::from_std(l).map_err(HostedError::Runtime)?;
            tasks.push(tokio::spawn(accept_local(
                l,
                events.clone(),
                local::LocalShared::new(cfg.attach_timeout),
            )));
            local_path = Some(path);
        }
        Ok(EventLoop {
            node,
            locals: HashMap::new(),
            spin: cfg.local_spin,
            local_path,
            epoch,
            events,
            rx,
            inboxes: HashMap::new(),
            tasks,
            dials: Vec::new(),
            stopping: false,
        })
    }

    fn now(&self) -> Instant {
        Instant(self.epoch.elapsed().as_nanos() as u64)
    }

    async fn run(mut self) {
        // One timer, re-armed to the node's next deadline only when the
        // event queue is empty: bursts of frames never touch the timer wheel.
        let sleep = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(sleep);
        loop {
            while let Ok(ev) = self.rx.try_recv() {
                self.handle(ev);
            }
            let busy = self.turn();
            if self.stopping && self.node.is_idle() {
                break;
            }
            if busy {
                tokio::task::yield_now().await;
                continue;
            }
            if !self.locals.is_empty() && !self.settle_locals() {
                // Something arrived while spinning, or while announcing
                // sleep: another turn.
                tokio::task::yield_now().await;
                continue;
            }
            let deadline = self.node.poll_timeout();
            if let Some(d) = deadline {
                if d <= self.now() {
                    continue;
                }
                let at = self.epoch + Duration::from_nanos(d.0);
                sleep.as_mut().reset(at.into());
            }
            tokio::select! {
                ev = self.rx.recv() => match ev {
                    Some(ev) => self.handle(ev),
                    None => break,
                },
                _ = &mut sleep, if deadline.is_some() => {}
            }
            for l in self.locals.values() {
                l.woke();
            }
        }
        for t in self.tasks.iter().chain(&self.dials) {
            t.abort();
        }
        if let Some(p) = &self.local_path {
            let _ = std::fs::remove_file(p);
        }
        info!(node = self.node.controller().node().0, "controller stopped");
    }

    /// Before sleeping: polls the local rings for up to `spin` (a busy
    /// process's next message is then taken without a system call on
    /// either side), then announces sleep on every ring. Returns `true` if
    /// the loop may sleep, `false` if something arrived.
    fn settle_locals(&mut self) -> bool {
        let start = std::time::Instant::now();
        loop {
            if self.locals.values().any(LocalHandle::ready) {
                return false;
            }
            if let Ok(ev) = self.rx.try_recv() {
                self.handle(ev);
                return false;
            }
            if start.elapsed() >= self.spin {
                break;
            }
            std::hint::spin_loop();
        }
        let mut sleep = true;
        for l in self.locals.values() {
            sleep &= l.prepare_sleep();
        }
        if !sleep {
            for l in self.locals.values() {
                l.woke();
            }
        }
        sleep
    }

    /// Runs the node until it settles (bounded; returns true if it did
    /// not, so the loop comes back at once); answers metrics; starts dials;
    /// forgets the inboxes of dropped channels.
    fn turn(&mut self) -> bool {
        let now = self.now();
        let mut busy = true;
        for _ in 0..64 {
            if !self.node.poll(now, &mut ()) {
                busy = false;
                break;
            }
        }
        while let Some(id) = self.node.poll_metrics_request() {
            let text = self.node.metrics_text();
            self.node.answer_metrics(id, &text);
            self.node.poll(now, &mut ());
        }
        if !self.stopping {
            while let Some((node, addr)) = self.node.poll_dial(now) {
                let events = self.events.clone();
                self.dials.retain(|d| !d.is_finished());
                self.dials.push(tokio::spawn(async move {
                    let ev = match TcpStream::connect(addr).await {
                        Ok(s) => Event::Dialed(node, s),
                        Err(e) => {
                            debug!(node = node.0, %addr, error = %e, "dial failed");
                            Event::DialFailed(node)
                        }
                    };
                    let _ = events.send(ev).await;
                }));
            }
        }
        self.inboxes.retain(|_, i| !i.borrow().dropped);
        self.locals.retain(|_, l| !l.dropped());
        busy
    }

    fn add(&mut self, kind: ConnKind, stream: TcpStream, dialed: Option<NodeId>) {
        let now = self.now();
        let peer = stream.peer_addr().ok();
        let (ch, id_tx) = TokioChannel::start(stream, self.events.clone());
        let inbox = ch.inbox.clone();
        let id = match dialed {
            Some(node) => self.node.dialed(now, node, Box::new(ch)),
            None => self.node.add(now, kind, Box::new(ch)),
        };
        debug!(id = id.0, ?kind, ?peer, "connection added");
        self.inboxes.insert(id.0, inbox);
        let _ = id_tx.send(id.0);
    }

    fn handle(&mut self, ev: Event) {
        let now = self.now();
        match ev {
            Event::Accepted(kind, stream) => {
                if self.stopping || !self.node.accepts(kind) {
                    debug!(?kind, "connection refused: at the limit");
                    drop(stream);
                } else {
                    self.add(kind, stream, None);
                }
            }
            Event::Data(id, chunk) => {
                if let Some(i) = self.inboxes.get(&id) {
                    i.borrow_mut().chunks.push_back(chunk);
                }
            }
            Event::Eof(id) => {
                if let Some(i) = self.inboxes.get(&id) {
                    i.borrow_mut().eof = true;
                }
            }
            Event::Dialed(node, stream) => {
                if self.stopping {
                    drop(stream);
                } else {
                    self.add(ConnKind::Peer, stream, Some(node));
                }
            }
            Event::DialFailed(node) => self.node.dial_failed(now, node),
            Event::AddPeer(node, addr) => self.node.add_peer(now, node, addr),
            Event::Metrics(reply) => {
                let _ = reply.send(self.node.metrics_text());
            }
            Event::Traffic(reply) => {
                let _ = reply.send(self.node.traffic());
            }
            Event::Peers(reply) => {
                let _ = reply.send(self.node.controller().stats().peers);
            }
            Event::Local(parts, taken) => {
                if self.stopping || !self.node.accepts(ConnKind::Process) {
                    debug!("local process refused: at the limit");
                    let _ = taken.send(false);
                } else {
                    let pid = parts.pid;
                    let (ch, handle) = local::channel(*parts);
                    let id = self.node.add(now, ConnKind::Process, Box::new(ch));
                    debug!(id = id.0, pid, "local channel added");
                    self.locals.insert(id.0, handle);
                    let _ = taken.send(true);
                }
            }
            Event::Wake => {}
            Event::Shutdown => {
                if !self.stopping {
                    // Disconnect every process so the core revokes what
                    // they own; links close.
                    self.stopping = true;
                    self.node.shutdown(now, &mut ());
                    for d in &self.dials {
                        d.abort();
                    }
                }
            }
        }
    }
}

async fn accept_local(
    l: tokio::net::UnixListener,
    events: mpsc::Sender<Event>,
    shared: local::LocalShared,
) {
    loop {
        match l.accept().await {
            Ok((s, _)) => match shared.admit(s, events.clone()) {
                Some(task) => {
                    tokio::spawn(task);
                }
                None => debug!(
                    "local connection closed: {} are already waiting for their hello",
                    local::MAX_PENDING_LOCAL
                ),
            },
            Err(e) => {
                warn!(error = %e, "local accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn accept(l: TcpListener, events: mpsc::Sender<Event>, kind: ConnKind) {
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                if events.send(Event::Accepted(kind, s)).await.is_err() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use fractos_core::PeerSecurity;

    #[test]
    fn the_node_gets_the_hosted_configuration() {
        let mut c = HostedConfig::local(NodeId(2), [1; 32]);
        let peer: SocketAddr = "127.0.0.1:7101".parse().unwrap();
        c.peers = vec![(NodeId(3), peer)];
        c.attach_timeout = Duration::from_millis(300);
        c.metrics_timeout = Duration::from_millis(400);
        c.max_metrics_conns = 7;
        c.max_queued_bytes = 1234;
        c.limits.max_processes = 5;
        c.op_timeout = Duration::from_millis(600);
        c.peer_timeout = Duration::from_millis(700);
        c.peer_security = PeerSecurity::Secure;
        let n = node_config(&c).unwrap();
        assert_eq!(n.peers, vec![(NodeId(3), peer)]);
        assert_eq!(n.attach_timeout, Duration::from_millis(300));
        assert_eq!(n.metrics_timeout, Duration::from_millis(400));
        assert_eq!(n.max_metrics_conns, 7);
        assert_eq!(n.max_queued_bytes, 1234);
        assert_eq!(n.max_process_conns, 5);
        assert_eq!(n.core.node, NodeId(2));
        assert_eq!(n.core.cluster_key, [1; 32]);
        assert_eq!(n.core.members, vec![NodeId(2), NodeId(3)]);
        assert_eq!(n.core.op_timeout, Duration::from_millis(600));
        assert_eq!(n.core.peer_timeout, Duration::from_millis(700));
        assert_eq!(n.core.peer_security, PeerSecurity::Secure);
        // Two controllers of one process get different handshake seeds.
        assert_ne!(n.core.rng_seed, node_config(&c).unwrap().core.rng_seed);
    }
}
