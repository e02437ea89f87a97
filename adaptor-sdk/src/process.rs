//! A process attached to its controller: the channel, the reader thread,
//! operations, invocation delivery and handler dispatch.
//!
//! The protocol itself (attach handshake, op ids, completion routing,
//! serving registered memory, the invocation queue) is the sans-IO
//! [`fractos_process::Connection`]; this module owns what it leaves out:
//! the byte stream, the reader thread that feeds it, the writes it asks
//! for, and the waits (blocking and async) of the application's threads.
//! Handlers registered with [`Process::serve_inline`] run on the reader
//! thread, and their operation waits read the channel themselves (the
//! stream and its frame buffer sit under a lock the reader thread takes
//! for each read and releases while it runs them).

use std::collections::HashMap;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::thread::{self, JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use fractos_process::{Config, Connection, Event, FrameReader, NoMemory};
use fractos_wire::{
    Handle, NodeId, ObjectKind, ProcessMsg, Reply, Rights, MAX_CAPS_PER_MESSAGE, MAX_FRAME_LEN,
    MAX_IMMEDIATES, MAX_NAME_LEN, MAX_PROCESS_NAME_LEN,
};

use crate::caps::{Cap, MemoryCap, RequestCap};
use crate::error::{DisconnectReason, SdkError};
use crate::invocation::Invocation;
use crate::memory::{MemorySpace, Region};
use crate::slot::{lock, PopError, Queue, Slot};

/// How [`Process::attach`] connects and how long waits last.
///
/// ```
/// use std::time::Duration;
/// use fractos_sdk::AttachOptions;
///
/// let opts = AttachOptions::default()
///     .op_timeout(Duration::from_secs(2))
///     .handler_threads(4);
/// assert_eq!(opts.op_timeout, Duration::from_secs(2));
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct AttachOptions {
    /// Default timeout of every wait: operations, `next_invocation` (when
    /// called through the defaults) ... Override per call with
    /// [`Process::with_timeout`]. Default 10 s.
    pub op_timeout: Duration,
    /// Timeout of the TCP connect and of the attach handshake. Default 5 s.
    pub connect_timeout: Duration,
    /// A socket write blocked this long closes the channel (the controller
    /// stopped reading). Default 10 s.
    pub write_timeout: Duration,
    /// Threads running handlers registered with [`Process::serve`]
    /// (started at the first `serve`). 0: no pool; the application runs
    /// handlers on its own thread with [`Process::dispatch`]. Default 2.
    pub handler_threads: usize,
    /// Largest frame accepted from the controller. Default
    /// [`fractos_wire::MAX_FRAME_LEN`].
    pub max_frame_len: usize,
    /// Local channels ([`Process::attach_local`]): how long the reader
    /// thread polls its ring before it sleeps on its eventfd. Default 0
    /// (announce sleep at once when the ring is empty): measured best on a
    /// loaded 2-core machine, where a spinning reader takes the core the
    /// controller needs; raise it where processes have cores of their own.
    pub local_spin: Duration,
}

impl Default for AttachOptions {
    fn default() -> Self {
        AttachOptions {
            op_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            handler_threads: 2,
            max_frame_len: MAX_FRAME_LEN,
            local_spin: crate::local::DEFAULT_SPIN,
        }
    }
}

impl AttachOptions {
    /// Sets [`AttachOptions::op_timeout`].
    pub fn op_timeout(mut self, d: Duration) -> Self {
        self.op_timeout = d;
        self
    }
    /// Sets [`AttachOptions::connect_timeout`].
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }
    /// Sets [`AttachOptions::write_timeout`].
    pub fn write_timeout(mut self, d: Duration) -> Self {
        self.write_timeout = d;
        self
    }
    /// Sets [`AttachOptions::local_spin`].
    pub fn local_spin(mut self, d: Duration) -> Self {
        self.local_spin = d;
        self
    }
    /// Sets [`AttachOptions::handler_threads`].
    pub fn handler_threads(mut self, n: usize) -> Self {
        self.handler_threads = n;
        self
    }
}

type OpResult = Result<Reply, SdkError>;
type Handler = Arc<dyn Fn(&Process, Invocation) + Send + Sync + 'static>;
/// A registered handler and whether it runs on the reader thread
/// ([`Process::serve_inline`]).
type HandlerEntry = (Handler, bool);
/// The protocol state machine, each operation carrying its waiter's slot.
type Conn = Connection<Arc<Slot<OpResult>>>;
type Events = Vec<Event<Arc<Slot<OpResult>>>>;

/// A byte stream to a controller, for [`Process::attach_stream`].
///
/// The SDK reads from one handle on its reader thread while operations
/// write to another ([`ByteStream::try_clone`]), and closes the channel
/// with [`ByteStream::shutdown`], which must make a blocked read on any
/// handle return. Implemented for [`TcpStream`] and, on Unix,
/// [`std::os::unix::net::UnixStream`].
pub trait ByteStream: Read + Write + Send + Sized + 'static {
    /// Another handle to the same stream.
    fn try_clone(&self) -> io::Result<Self>;
    /// Shuts both directions down: blocked reads return.
    fn shutdown(&self) -> io::Result<()>;
    /// Bounds reads (`None`: block forever); used during the attach.
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// The controller's socket address, if the stream has one.
    fn peer_addr(&self) -> Option<SocketAddr> {
        None
    }
}

impl ByteStream for TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn shutdown(&self) -> io::Result<()> {
        TcpStream::shutdown(self, std::net::Shutdown::Both)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
    fn peer_addr(&self) -> Option<SocketAddr> {
        TcpStream::peer_addr(self).ok()
    }
}

#[cfg(unix)]
impl ByteStream for std::os::unix::net::UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        std::os::unix::net::UnixStream::try_clone(self)
    }
    fn shutdown(&self) -> io::Result<()> {
        std::os::unix::net::UnixStream::shutdown(self, std::net::Shutdown::Both)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        std::os::unix::net::UnixStream::set_read_timeout(self, timeout)
    }
}

/// The reading half of the channel, used by the reader thread only (and by
/// inline handlers, which run on it).
trait ReadHalf: Read + Send {
    /// Bounds the next reads (`None`: block).
    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl<S: ByteStream> ReadHalf for S {
    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
}

/// The stream being read and the frames read from it so far.
struct ReaderIo {
    stream: Box<dyn ReadHalf>,
    frames: FrameReader,
}

/// The protocol state and why the channel closed, under one lock.
struct Proto {
    conn: Conn,
    closed: Option<DisconnectReason>,
}

/// State shared by the application's handles, the reader thread and the
/// handler threads. Lock order: `writer` before `proto`.
struct Shared {
    name: String,
    node: NodeId,
    peer: Option<SocketAddr>,
    opts: AttachOptions,
    /// The connection's clock origin.
    epoch: std::time::Instant,
    proto: Mutex<Proto>,
    writer: Mutex<Box<dyn Write + Send>>,
    /// Shuts the stream down (taken once).
    closer: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    memory: MemorySpace,
    invocations: Queue<Invocation>,
    handlers: RwLock<HashMap<u64, HandlerEntry>>,
    jobs: Queue<(Handler, Invocation)>,
    /// Invocations for inline handlers, run by the reader thread between
    /// reads.
    inline_jobs: Mutex<VecDeque<(Handler, Invocation)>>,
    pool_started: Mutex<bool>,
    reader: Mutex<Option<JoinHandle<()>>>,
    /// The channel's read half; locked by the reader thread for each read
    /// (never while it runs an inline handler).
    io: Mutex<Option<ReaderIo>>,
    /// The reader thread, whose waits read the channel themselves.
    reader_id: OnceLock<ThreadId>,
    /// The application's handles, for inline handlers.
    outer: OnceLock<Weak<Outer>>,
}
/// Closes the channel when the last application handle goes.
struct Outer {
    shared: Arc<Shared>,
}

impl Drop for Outer {
    fn drop(&mut self) {
        self.shared.close_and_join();
    }
}

/// A process attached to its controller.
///
/// Cheap to clone (clones share the channel); the channel closes when the
/// last clone is dropped or on [`Process::close`]. Closing is process exit
/// for the controller: everything this process owns is revoked (monitors
/// fire), its handles are released and its names withdrawn.
///
/// Every operation blocks the calling thread until the controller answers or
/// the timeout passes ([`AttachOptions::op_timeout`], or per call through
/// [`Process::with_timeout`]). For async code see [`crate::AsyncProcess`].
///
/// ```no_run
/// use std::time::Duration;
/// use fractos_sdk::{AttachOptions, Process};
/// use fractos_sdk::wire::Rights;
///
/// # fn main() -> Result<(), fractos_sdk::SdkError> {
/// # let token = [0u8; 32];
/// let p = Process::attach("127.0.0.1:7000", "storage", token, AttachOptions::default())?;
/// let buf = p.register(4096)?;
/// buf.write_at(0, b"hello")?;
/// let cap = p.memory_create(&buf, 0, 4096, Rights::READ)?;
/// p.publish("storage/buf", cap)?;
/// // A per-call timeout:
/// let found = p.with_timeout(Duration::from_millis(100)).lookup("other", Duration::ZERO);
/// assert!(found.is_err());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Process {
    outer: Arc<Outer>,
    timeout: Duration,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.outer.shared;
        f.debug_struct("Process")
            .field("name", &s.name)
            .field("node", &s.node)
            .field("controller", &s.peer)
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn check_len(what: &str, len: usize, max: usize) -> Result<(), SdkError> {
    if len > max {
        return Err(SdkError::invalid(format!(
            "{what} has {len} elements, at most {max} are allowed"
        )));
    }
    Ok(())
}

fn check_args(imms: &[u8], caps: &[Cap]) -> Result<Vec<Handle>, SdkError> {
    check_len("the immediate argument", imms.len(), MAX_IMMEDIATES)?;
    check_len("the capability list", caps.len(), MAX_CAPS_PER_MESSAGE)?;
    Ok(caps.iter().map(Cap::handle).collect())
}

fn check_name(name: &[u8]) -> Result<Vec<u8>, SdkError> {
    check_len("the name", name.len(), MAX_NAME_LEN)?;
    Ok(name.to_vec())
}

impl Process {
    /// Connects to the controller at `addr` over TCP and attaches as `name`
    /// with `token` (issued by whoever runs the cluster:
    /// `fractos_core::process_token(cluster_key, name)`).
    ///
    /// Errors: [`SdkError::Io`] if nothing listens, [`SdkError::Rejected`]
    /// with [`fractos_wire::ErrorCode::AuthFailed`] for a wrong token,
    /// [`SdkError::Timeout`] if the controller does not answer within
    /// [`AttachOptions::connect_timeout`].
    pub fn attach(
        addr: impl ToSocketAddrs,
        name: &str,
        token: [u8; 32],
        options: AttachOptions,
    ) -> Result<Process, SdkError> {
        check_len("the process name", name.len(), MAX_PROCESS_NAME_LEN)?;
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| SdkError::io("resolving the controller address", e))?
            .collect();
        let mut last = io::Error::new(io::ErrorKind::InvalidInput, "no address to connect to");
        let mut stream = None;
        for a in &addrs {
            let t = options.connect_timeout.max(Duration::from_millis(1));
            match TcpStream::connect_timeout(a, t) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let stream = stream.ok_or_else(|| SdkError::io("connecting to the controller", last))?;
        let setup = |s: &TcpStream| -> io::Result<()> {
            s.set_nodelay(true)?;
            s.set_write_timeout(Some(options.write_timeout.max(Duration::from_millis(1))))
        };
        setup(&stream).map_err(|e| SdkError::io("configuring the socket", e))?;
        Self::attach_stream(stream, name, token, options)
    }

    /// Attaches as `name` with `token` over an already connected byte
    /// stream (a Unix socket, a TCP stream set up by the application, a
    /// pipe pair wrapped in a [`ByteStream`]). Everything else is as in
    /// [`Process::attach`]; [`AttachOptions::write_timeout`] is the
    /// stream's business here. [`Process::controller_addr`] is the
    /// unspecified address when the stream has none.
    ///
    /// ```no_run
    /// # #[cfg(unix)]
    /// # fn f() -> Result<(), fractos_sdk::SdkError> {
    /// use std::os::unix::net::UnixStream;
    /// use fractos_sdk::{AttachOptions, Process};
    ///
    /// let s = UnixStream::connect("/run/fractos/controller.sock")
    ///     .map_err(|e| fractos_sdk::SdkError::Io { context: "connecting", source: e })?;
    /// let p = Process::attach_stream(s, "storage", [0; 32], AttachOptions::default())?;
    /// # drop(p); Ok(()) }
    /// ```
    pub fn attach_stream<S: ByteStream>(
        stream: S,
        name: &str,
        token: [u8; 32],
        options: AttachOptions,
    ) -> Result<Process, SdkError> {
        Self::attach_with(stream, name, token, options, MemorySpace::new())
    }

    /// Attaches as `name` with `token` to the controller of this host
    /// through its local socket at `path` (`fractos controller
    /// --local-socket PATH`): a **local channel**. The process and the
    /// controller then talk through shared-memory rings (a sealed memfd
    /// passed over the socket, with an eventfd per direction), and the
    /// controller reads and writes the process's registered memory
    /// directly: every region is registered with it (its memfd passed
    /// once) before [`Process::register`] returns, and a copy between two
    /// local processes moves no `MemRead`/`MemWrite` messages. The socket
    /// stays open for registrations; its end is the process's exit for
    /// the controller.
    ///
    /// Errors as [`Process::attach`], plus [`SdkError::LocalRefused`] if
    /// the controller refuses the rings (and [`SdkError::SharedMemory`] if
    /// they cannot be created).
    ///
    /// ```no_run
    /// # fn f() -> Result<(), fractos_sdk::SdkError> {
    /// use fractos_sdk::{AttachOptions, Process};
    /// let p = Process::attach_local("/run/fractos/local.sock", "storage", [0; 32], AttachOptions::default())?;
    /// let r = p.register(1 << 20)?; // mapped by the controller too
    /// # drop(r); Ok(()) }
    /// ```
    pub fn attach_local(
        path: impl AsRef<std::path::Path>,
        name: &str,
        token: [u8; 32],
        options: AttachOptions,
    ) -> Result<Process, SdkError> {
        check_len("the process name", name.len(), MAX_PROCESS_NAME_LEN)?;
        let (stream, registrar) = crate::local::connect(path.as_ref(), &options)?;
        let memory = MemorySpace::new();
        memory.set_registrar(Arc::new(registrar));
        Self::attach_with(stream, name, token, options, memory)
    }

    fn attach_with<S: ByteStream>(
        mut stream: S,
        name: &str,
        token: [u8; 32],
        options: AttachOptions,
        memory: MemorySpace,
    ) -> Result<Process, SdkError> {
        check_len("the process name", name.len(), MAX_PROCESS_NAME_LEN)?;
        let epoch = std::time::Instant::now();
        let connect_timeout = options.connect_timeout.max(Duration::from_millis(1));
        let config = Config::default()
            .max_frame_len(options.max_frame_len)
            .attach_timeout(Some(connect_timeout));
        let mut conn = Conn::new(name.as_bytes(), token, config, now(epoch))
            .map_err(|e| SdkError::invalid(e.to_string()))?;
        let mut reader = FrameReader::new(options.max_frame_len);
        let node = handshake(
            &mut stream,
            &mut conn,
            &mut reader,
            epoch,
            options.connect_timeout,
        )?;
        while conn.poll_event().is_some() {}
        stream
            .set_read_timeout(None)
            .map_err(|e| SdkError::io("configuring the socket", e))?;
        let clone = |s: &S| {
            s.try_clone()
                .map_err(|e| SdkError::io("duplicating the socket", e))
        };
        let writer = clone(&stream)?;
        let closing = clone(&stream)?;
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            node,
            peer: stream.peer_addr(),
            epoch,
            proto: Mutex::new(Proto { conn, closed: None }),
            writer: Mutex::new(Box::new(writer)),
            closer: Mutex::new(Some(Box::new(move || {
                let _ = closing.shutdown();
            }))),
            memory,
            invocations: Queue::new(),
            handlers: RwLock::new(HashMap::new()),
            jobs: Queue::new(),
            inline_jobs: Mutex::new(VecDeque::new()),
            pool_started: Mutex::new(false),
            reader: Mutex::new(None),
            io: Mutex::new(Some(ReaderIo {
                stream: Box::new(stream),
                frames: reader,
            })),
            reader_id: OnceLock::new(),
            outer: OnceLock::new(),
            opts: options,
        });
        let outer = Arc::new(Outer {
            shared: shared.clone(),
        });
        let _ = shared.outer.set(Arc::downgrade(&outer));
        let reader_shared = shared.clone();
        let handle = thread::Builder::new()
            .name(format!("fractos-sdk-reader:{name}"))
            .spawn(move || reader_loop(reader_shared))
            .map_err(|e| SdkError::io("starting the reader thread", e))?;
        *lock(&shared.reader) = Some(handle);
        let timeout = shared.opts.op_timeout;
        Ok(Process { outer, timeout })
    }

    /// Attaches as `name` with `token` over any connected
    /// [`fractos_transport::Channel`] (byte stream or messages), through the
    /// blocking adapter [`crate::ChannelStream`]. Everything else is as in
    /// [`Process::attach_stream`]. This is the entry point for channel
    /// kinds other than TCP: implement `Channel` for the process's end, and
    /// nothing in the SDK changes.
    pub fn attach_channel<C>(
        channel: C,
        name: &str,
        token: [u8; 32],
        options: AttachOptions,
    ) -> Result<Process, SdkError>
    where
        C: fractos_transport::Channel + Send + 'static,
    {
        Self::attach_stream(crate::ChannelStream::new(channel), name, token, options)
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.outer.shared
    }

    /// The controller's node id.
    pub fn node(&self) -> NodeId {
        self.shared().node
    }

    /// The name this process attached under.
    pub fn name(&self) -> &str {
        &self.shared().name
    }

    /// The controller's socket address (the unspecified address
    /// `0.0.0.0:0` for a [`Process::attach_stream`] stream without one).
    pub fn controller_addr(&self) -> SocketAddr {
        self.shared()
            .peer
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The timeout of this handle's waits.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A handle to the same process whose waits use `timeout`.
    pub fn with_timeout(&self, timeout: Duration) -> Process {
        Process {
            outer: self.outer.clone(),
            timeout,
        }
    }

    /// Whether the channel is still open.
    pub fn is_connected(&self) -> bool {
        lock(&self.shared().proto).closed.is_none()
    }

    /// Why the channel closed, once it has.
    pub fn disconnect_reason(&self) -> Option<DisconnectReason> {
        lock(&self.shared().proto).closed.clone()
    }

    /// Closes the channel (process exit for the controller) and waits for
    /// the reader thread. Pending operations fail with
    /// [`SdkError::Disconnected`]. Other clones of this handle see the
    /// channel closed.
    pub fn close(self) {
        self.shared().close_and_join();
    }

    // ------------------------------------------------------------- memory

    /// This process's registered address space.
    pub fn memory(&self) -> &MemorySpace {
        &self.shared().memory
    }

    /// Registers a zeroed region of `len` bytes that the controller may
    /// read and write once a Memory capability covers it.
    pub fn register(&self, len: u64) -> Result<Region, SdkError> {
        self.shared().memory.register(len)
    }

    /// Registers `bytes` as a region.
    pub fn register_vec(&self, bytes: Vec<u8>) -> Result<Region, SdkError> {
        self.shared().memory.register_vec(bytes)
    }

    /// Unregisters `region`: later controller accesses to it (copies through
    /// capabilities covering it) fail with `MemoryFault`. Revoke those
    /// capabilities first to fail them early with `Revoked` instead.
    pub fn unregister(&self, region: &Region) -> bool {
        self.shared().memory.unregister(region)
    }

    // --------------------------------------------------------- operations

    /// Sends [`Process::memory_create`] without waiting: the answer is awaited
    /// later with [`Pending::wait`] or [`Pending::wait_async`], so one
    /// thread can keep many operations in flight.
    pub fn start_memory_create(
        &self,
        region: &Region,
        offset: u64,
        len: u64,
        rights: Rights,
    ) -> Result<Pending<MemoryCap>, SdkError> {
        if region.space() != self.shared().memory.id() {
            return Err(SdkError::invalid(
                "the region was registered by another process",
            ));
        }
        if len == 0 {
            return Err(SdkError::invalid(
                "a Memory capability needs a non-empty window",
            ));
        }
        match offset.checked_add(len) {
            Some(end) if end <= region.len() => {}
            _ => {
                return Err(SdkError::OutOfRange {
                    offset,
                    len,
                    region_len: region.len(),
                })
            }
        }
        let addr = region.addr() + offset;
        self.start("memory_create", reply_memory, |op| {
            ProcessMsg::MemoryCreate {
                op,
                addr,
                len,
                rights,
            }
        })
    }

    /// Makes a Memory capability for `[offset, offset+len)` of `region`
    /// with `rights`. Checked locally: the window must lie inside the region.
    pub fn memory_create(
        &self,
        region: &Region,
        offset: u64,
        len: u64,
        rights: Rights,
    ) -> Result<MemoryCap, SdkError> {
        self.start_memory_create(region, offset, len, rights)?
            .wait()
    }

    /// Sends [`Process::diminish`] without waiting: the answer is awaited
    /// later with [`Pending::wait`] or [`Pending::wait_async`], so one
    /// thread can keep many operations in flight.
    pub fn start_diminish(
        &self,
        cap: &MemoryCap,
        offset: u64,
        len: u64,
        rights: Rights,
    ) -> Result<Pending<MemoryCap>, SdkError> {
        let cap = cap.handle();
        self.start("diminish", reply_memory, |op| ProcessMsg::Diminish {
            op,
            cap,
            offset,
            len,
            rights,
        })
    }

    /// Derives a Memory capability for the sub-window `[offset, offset+len)`
    /// of `cap` with `rights` (a subset of `cap`'s).
    pub fn diminish(
        &self,
        cap: &MemoryCap,
        offset: u64,
        len: u64,
        rights: Rights,
    ) -> Result<MemoryCap, SdkError> {
        self.start_diminish(cap, offset, len, rights)?.wait()
    }

    /// Sends [`Process::request_create`] without waiting: the answer is awaited
    /// later with [`Pending::wait`] or [`Pending::wait_async`], so one
    /// thread can keep many operations in flight.
    pub fn start_request_create(
        &self,
        tag: u64,
        imms: &[u8],
        caps: &[Cap],
    ) -> Result<Pending<RequestCap>, SdkError> {
        let caps = check_args(imms, caps)?;
        let imms = imms.to_vec();
        self.start("request_create", reply_request, |op| {
            ProcessMsg::RequestCreate {
                op,
                tag,
                imms,
                caps,
            }
        })
    }

    /// Makes a Request capability for this process's handler `tag`, with
    /// bound immediates and capabilities (delivered before the invoker's).
    pub fn request_create(
        &self,
        tag: u64,
        imms: &[u8],
        caps: &[Cap],
    ) -> Result<RequestCap, SdkError> {
        self.start_request_create(tag, imms, caps)?.wait()
    }

    /// Sends [`Process::derive`] without waiting: the answer is awaited
    /// later with [`Pending::wait`] or [`Pending::wait_async`], so one
    /// thread can keep many operations in flight.
    pub fn start_derive(
        &self,
        cap: &RequestCap,
        imms: &[u8],
        caps: &[Cap],
    ) -> Result<Pending<RequestCap>, SdkError> {
        let caps = check_args(imms, caps)?;
        let (cap, imms) = (cap.handle(), imms.to_vec());
        self.start("derive", reply_request, |op| ProcessMsg::Derive {
            op,
            cap,
            imms,
            caps,
        })
    }

    /// Derives a Request capability from `cap` with more bound arguments
    /// (currying): `imms` and `caps` are appended to the bound ones.
    pub fn derive(
        &self,
        cap: &RequestCap,
        imms: &[u8],
        caps: &[Cap],
    ) -> Result<RequestCap, SdkError> {
        self.start_derive(cap, imms, caps)?.wait()
    }

    /// Sends [`Process::invoke`] without waiting: the answer is awaited
    /// later with [`Pending::wait`] or [`Pending::wait_async`], so one
    /// thread can keep many operations in flight.
    pub fn start_invoke(
        &self,
        cap: &RequestCap,
        imms: &[u8],
        caps: &[Cap],
    ) -> Result<Pending<()>, SdkError> {
        let caps = check_args(imms, caps)?;
        let (cap, imms) = (cap.handle(), imms.to_vec());
        self.start("invoke", reply_done, |op| ProcessMsg::Invoke {
            op,
            cap,
            imms,
            caps,
        })
    }

    /// Invokes the Request `cap` with `imms` and `caps`. Completes once the
    /// owner's controller delivered the invocation (not when the owner has
    /// handled it: pass a continuation Request for that).
    pub fn invoke(&self, cap: &RequestCap, imms: &[u8], caps: &[Cap]) -> Result<(), SdkError> {
        self.start_invoke(cap, imms, caps)?.wait()
    }

    /// Sends [`Process::copy`] without waiting: the answer is awaited
    /// later with [`Pending::wait`] or [`Pending::wait_async`], so one
    /// thread can keep many operations in flight.
    pub fn start_copy(
        &self,
        src: &MemoryCap,
        dst: &MemoryCap,
        completion: Option<&RequestCap>,
    ) -> Result<Pending<()>, SdkError> {
        let (src, dst) = (src.handle(), dst.handle());
        let completion = completion.map(RequestCap::handle);
        self.start("copy", reply_done, |op| ProcessMsg::Copy {
            op,
            src,
            dst,
            completion,
        })
    }

    /// Copies the bytes of `src` (READ) into the start of `dst` (WRITE),
    /// owner to owner, then invokes `completion` (without arguments) if
    /// given. Completes after the last byte is written and the completion
    /// invoked. `dst` shorter than `src` fails with `SizeMismatch`.
    pub fn copy(
        &self,
        src: &MemoryCap,
        dst: &MemoryCap,
        completion: Option<&RequestCap>,
    ) -> Result<(), SdkError> {
        self.start_copy(src, dst, completion)?.wait()
    }

    /// Sends [`Process::revoke`] without waiting: the answer is awaited
    /// later with [`Pending::wait`] or [`Pending::wait_async`], so one
    /// thread can keep many operations in flight.
    pub fn start_revoke(&self, cap: impl Into<Cap>) -> Result<Pending<()>, SdkError> {
        let cap = cap.into().handle();
        self.start("revoke", reply_done, |op| ProcessMsg::Revoke { op, cap })
    }

    /// Revokes `cap` and every capability derived from it, in every process
    /// on every controller. Once this returns, no later use of them
    /// succeeds. The handle itself stays in the table (drop it).
    pub fn revoke(&self, cap: impl Into<Cap>) -> Result<(), SdkError> {
        self.start_revoke(cap)?.wait()
    }

    /// Sends [`Process::drop_cap`] without waiting: the answer is awaited
    /// later with [`Pending::wait`] or [`Pending::wait_async`], so one
    /// thread can keep many operations in flight.
    pub fn start_drop_cap(&self, cap: impl Into<Cap>) -> Result<Pending<()>, SdkError> {
        let cap = cap.into().handle();
        self.start("drop", reply_done, |op| ProcessMsg::Drop { op, cap })
    }

    /// Removes `cap`'s handle from this process's table (the `drop`
    /// operation). Capabilities derived from it are unaffected.
    pub fn drop_cap(&self, cap: impl Into<Cap>) -> Result<(), SdkError> {
        self.start_drop_cap(cap)?.wait()
    }

    /// Sends [`Process::monitor`] without waiting: the answer is awaited
    /// later with [`Pending::wait`] or [`Pending::wait_async`], so one
    /// thread can keep many operations in flight.
    pub fn start_monitor(
        &self,
        cap: impl Into<Cap>,
        notify: &RequestCap,
    ) -> Result<Pending<()>, SdkError> {
        let (cap, notify) = (cap.into().handle(), notify.handle());
        self.start("monitor", reply_done, |op| ProcessMsg::Monitor {
            op,
            cap,
            notify,
        })
    }

    /// Invokes `notify` (without arguments) when the object behind `cap`
    /// dies: revoked, or its owner exited.
    pub fn monitor(&self, cap: impl Into<Cap>, notify: &RequestCap) -> Result<(), SdkError> {
        self.start_monitor(cap, notify)?.wait()
    }

    /// Sends [`Process::publish`] without waiting: the answer is awaited
    /// later with [`Pending::wait`] or [`Pending::wait_async`], so one
    /// thread can keep many operations in flight.
    pub fn start_publish(
        &self,
        name: impl AsRef<[u8]>,
        cap: impl Into<Cap>,
    ) -> Result<Pending<()>, SdkError> {
        let name = check_name(name.as_ref())?;
        let cap = cap.into().handle();
        self.start("publish", reply_done, |op| ProcessMsg::Publish {
            op,
            name,
            cap,
        })
    }

    /// Publishes `cap` under `name` in the cluster name service (withdrawn
    /// when this process exits). A taken name fails with `NameTaken`.
    pub fn publish(&self, name: impl AsRef<[u8]>, cap: impl Into<Cap>) -> Result<(), SdkError> {
        self.start_publish(name, cap)?.wait()
    }

    /// Sends [`Process::unpublish`] without waiting: the answer is awaited
    /// later with [`Pending::wait`] or [`Pending::wait_async`], so one
    /// thread can keep many operations in flight.
    pub fn start_unpublish(&self, name: impl AsRef<[u8]>) -> Result<Pending<()>, SdkError> {
        let name = check_name(name.as_ref())?;
        self.start("unpublish", reply_done, |op| ProcessMsg::Unpublish {
            op,
            name,
        })
    }

    /// Withdraws this process's publication of `name`.
    pub fn unpublish(&self, name: impl AsRef<[u8]>) -> Result<(), SdkError> {
        self.start_unpublish(name)?.wait()
    }

    /// Sends [`Process::lookup`] without waiting: the answer is awaited
    /// later with [`Pending::wait`] or [`Pending::wait_async`], so one
    /// thread can keep many operations in flight.
    pub fn start_lookup(
        &self,
        name: impl AsRef<[u8]>,
        wait: Duration,
    ) -> Result<Pending<Cap>, SdkError> {
        let name = check_name(name.as_ref())?;
        // Round up so a non-zero wait never becomes "do not wait".
        let wait_ms = wait.as_nanos().div_ceil(1_000_000).min(u32::MAX as u128) as u32;
        let mut p = self.start("lookup", reply_any, |op| ProcessMsg::Lookup {
            op,
            name,
            wait_ms,
        })?;
        p.op.timeout = p.op.timeout.saturating_add(wait);
        Ok(p)
    }

    /// Fetches the capability published under `name` (a fresh handle),
    /// waiting up to `wait` for it to appear (`Duration::ZERO`: fail at
    /// once with `NameNotFound`). The local timeout is this handle's
    /// timeout plus `wait`.
    pub fn lookup(&self, name: impl AsRef<[u8]>, wait: Duration) -> Result<Cap, SdkError> {
        self.start_lookup(name, wait)?.wait()
    }

    fn start<T>(
        &self,
        what: &'static str,
        convert: fn(Reply) -> Result<T, SdkError>,
        make: impl FnOnce(u64) -> ProcessMsg,
    ) -> Result<Pending<T>, SdkError> {
        let s = self.shared();
        let slot = Slot::new();
        let op = {
            let mut p = lock(&s.proto);
            if let Some(reason) = &p.closed {
                return Err(SdkError::Disconnected {
                    reason: reason.clone(),
                });
            }
            p.conn
                .start(slot.clone(), make)
                .map_err(|e| SdkError::invalid(e.to_string()))?
        };
        s.flush()?;
        Ok(Pending {
            op: PendingOp {
                shared: s.clone(),
                op,
                slot,
                done: false,
                what,
                timeout: self.timeout,
            },
            convert,
        })
    }

    // -------------------------------------------------------- invocations

    /// Waits up to this handle's timeout for the next invocation not taken
    /// by a handler. See [`Process::next_invocation_timeout`].
    pub fn next_invocation(&self) -> Result<Invocation, SdkError> {
        self.next_invocation_timeout(self.timeout)
    }

    /// Waits up to `timeout` for the next invocation of one of this
    /// process's Requests whose tag has no handler ([`Process::serve`]).
    /// [`SdkError::Timeout`] if none came; [`SdkError::Disconnected`] once
    /// the channel is closed and the queue empty.
    ///
    /// ```no_run
    /// # fn f(p: &fractos_sdk::Process) -> Result<(), fractos_sdk::SdkError> {
    /// use std::time::Duration;
    /// loop {
    ///     match p.next_invocation_timeout(Duration::from_secs(1)) {
    ///         Ok(inv) => println!("tag {} with {} bytes", inv.tag, inv.imms.len()),
    ///         Err(e) if e.is_timeout() => continue,
    ///         Err(e) => return Err(e),
    ///     }
    /// }
    /// # }
    /// ```
    pub fn next_invocation_timeout(&self, timeout: Duration) -> Result<Invocation, SdkError> {
        match self.shared().invocations.pop(timeout) {
            Ok(inv) => Ok(inv),
            Err(PopError::Timeout) => Err(SdkError::Timeout {
                what: "an invocation",
                after: timeout,
            }),
            Err(PopError::Closed) => Err(self.shared().disconnected()),
        }
    }

    #[cfg(feature = "tokio")]
    pub(crate) fn invocation_queue(&self) -> &Queue<Invocation> {
        &self.shared().invocations
    }

    #[cfg(feature = "tokio")]
    pub(crate) fn disconnected_error(&self) -> SdkError {
        self.shared().disconnected()
    }

    /// Invocations queued for [`Process::next_invocation`].
    pub fn queued_invocations(&self) -> usize {
        self.shared().invocations.len()
    }

    /// Runs `handler` on the handler thread pool (or in
    /// [`Process::dispatch`] on the application's thread) for every
    /// invocation with `tag` (replacing a previous handler). Invocations with this tag that
    /// were already queued for [`Process::next_invocation`] are handed to it
    /// too. Handlers may call any operation of the `&Process` they are
    /// given; they should not capture a `Process` clone (that keeps the
    /// channel open until [`Process::close`]).
    ///
    /// ```no_run
    /// # fn f(p: &fractos_sdk::Process) -> Result<(), fractos_sdk::SdkError> {
    /// const ECHO: u64 = 1;
    /// p.serve(ECHO, |p, inv| {
    ///     // The invoker passed a continuation as capability 0.
    ///     if let Ok(k) = inv.request(0) {
    ///         let _ = p.invoke(&k, &inv.imms, &[]);
    ///         let _ = p.drop_cap(k);
    ///     }
    /// });
    /// let echo = p.request_create(ECHO, &[], &[])?;
    /// p.publish("echo", echo)?;
    /// # Ok(()) }
    /// ```
    pub fn serve<F>(&self, tag: u64, handler: F)
    where
        F: Fn(&Process, Invocation) + Send + Sync + 'static,
    {
        let (handler, queued) = self.set_handler(tag, Arc::new(handler), false);
        self.start_pool();
        for inv in queued {
            let _ = self.shared().jobs.push((handler.clone(), inv));
        }
    }

    /// Registers `handler` for `tag` and takes the invocations with `tag`
    /// already queued for [`Process::next_invocation`].
    fn set_handler(&self, tag: u64, handler: Handler, inline: bool) -> (Handler, Vec<Invocation>) {
        let s = self.shared();
        s.handlers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tag, (handler.clone(), inline));
        (handler, s.invocations.take_where(|i| i.tag == tag))
    }

    /// Like [`Process::serve`], but runs `handler` on the channel's reader
    /// thread itself, as soon as the invocation is read: no hand-off to
    /// another thread. An operation the handler waits for
    /// ([`Pending::wait`] and every blocking operation) is read off the
    /// channel by the same thread, so an invoke-and-answer handler costs no
    /// thread wake-up inside the SDK. Invocations with this tag that were
    /// already queued for [`Process::next_invocation`] run on the calling
    /// thread before `serve_inline` returns.
    ///
    /// For cheap handlers only: while one runs (outside its operation
    /// waits), nothing else of this process is read. It must not wait for
    /// anything but its own operations: not for
    /// [`Process::next_invocation`], [`Process::dispatch`],
    /// `Pending::wait_async`, or another thread of the application that
    /// may itself wait for an operation (that is a deadlock). Invocations
    /// arriving during one of its waits are run after it returns, in order.
    ///
    /// ```no_run
    /// # fn f(p: &fractos_sdk::Process) -> Result<(), fractos_sdk::SdkError> {
    /// const PING: u64 = 2;
    /// p.serve_inline(PING, |p, inv| {
    ///     if let Ok(k) = inv.request(0) {
    ///         let _ = p.invoke(&k, &[], &[]);
    ///         let _ = p.drop_cap(k);
    ///     }
    /// });
    /// # Ok(()) }
    /// ```
    pub fn serve_inline<F>(&self, tag: u64, handler: F)
    where
        F: Fn(&Process, Invocation) + Send + Sync + 'static,
    {
        let (handler, queued) = self.set_handler(tag, Arc::new(handler), true);
        for inv in queued {
            handler(self, inv);
        }
    }

    /// Runs the next invocation that has a handler ([`Process::serve`]) on
    /// the calling thread and returns its tag: the caller's-loop
    /// alternative to the handler pool (set
    /// [`AttachOptions::handler_threads`] to 0 to have every handled
    /// invocation come here). [`SdkError::Timeout`] if none arrives within
    /// `timeout`; [`SdkError::Disconnected`] once the channel is closed and
    /// nothing is left to run.
    ///
    /// ```no_run
    /// # fn f(p: &fractos_sdk::Process) -> Result<(), fractos_sdk::SdkError> {
    /// use std::time::Duration;
    /// p.serve(1, |_, inv| println!("got {:?}", inv.imms));
    /// loop {
    ///     match p.dispatch(Duration::from_secs(1)) {
    ///         Ok(_tag) => {}
    ///         Err(e) if e.is_timeout() => {}
    ///         Err(e) => return Err(e),
    ///     }
    /// }
    /// # }
    /// ```
    pub fn dispatch(&self, timeout: Duration) -> Result<u64, SdkError> {
        match self.shared().jobs.pop(timeout) {
            Ok((handler, inv)) => {
                let tag = inv.tag;
                handler(self, inv);
                Ok(tag)
            }
            Err(PopError::Timeout) => Err(SdkError::Timeout {
                what: "an invocation to dispatch",
                after: timeout,
            }),
            Err(PopError::Closed) => Err(self.shared().disconnected()),
        }
    }

    /// Removes the handler of `tag`; later invocations with it are queued
    /// for [`Process::next_invocation`]. Returns whether one was registered.
    pub fn unserve(&self, tag: u64) -> bool {
        self.shared()
            .handlers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&tag)
            .is_some()
    }

    fn start_pool(&self) {
        let s = self.shared();
        let mut started = lock(&s.pool_started);
        if *started {
            return;
        }
        *started = true;
        for i in 0..s.opts.handler_threads {
            let weak = Arc::downgrade(&self.outer);
            let shared = s.clone();
            let timeout = s.opts.op_timeout;
            let spawned = thread::Builder::new()
                .name(format!("fractos-sdk-handler-{i}:{}", s.name))
                .spawn(move || handler_loop(shared, weak, timeout));
            if spawned.is_err() && i == 0 {
                // Without a single handler thread, run handlers nowhere
                // rather than silently queueing forever: let the next
                // `serve` retry.
                *started = false;
            }
        }
    }
}

fn handler_loop(shared: Arc<Shared>, outer: Weak<Outer>, timeout: Duration) {
    loop {
        match shared.jobs.pop(Duration::from_secs(3600)) {
            Ok((handler, inv)) => {
                let Some(outer) = outer.upgrade() else {
                    return;
                };
                let p = Process { outer, timeout };
                // A panicking handler must not take the pool down with it.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(&p, inv)));
            }
            Err(PopError::Timeout) => {}
            Err(PopError::Closed) => return,
        }
    }
}

/// An operation sent and not yet answered. Dropping it without an answer
/// abandons it: a capability it returns later is dropped automatically.
struct PendingOp {
    shared: Arc<Shared>,
    op: u64,
    slot: Arc<Slot<OpResult>>,
    done: bool,
    what: &'static str,
    timeout: Duration,
}

impl PendingOp {
    fn timed_out(&mut self) -> OpResult {
        self.done = true;
        match self.shared.abandon(self.op, &self.slot) {
            Some(late) => late,
            None => Err(SdkError::Timeout {
                what: self.what,
                after: self.timeout,
            }),
        }
    }

    fn wait(&mut self) -> OpResult {
        let got = if self.shared.on_reader_thread() {
            // An inline handler: nobody else reads the channel.
            self.shared.wait_reading(&self.slot, self.timeout)
        } else {
            self.slot.wait(self.timeout)
        };
        match got {
            Some(r) => {
                self.done = true;
                r
            }
            None => self.timed_out(),
        }
    }

    #[cfg(feature = "tokio")]
    async fn wait_async(&mut self) -> OpResult {
        let fut = crate::slot::SlotFuture {
            slot: self.slot.clone(),
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => {
                self.done = true;
                r
            }
            Err(_) => self.timed_out(),
        }
    }
}

impl Drop for PendingOp {
    fn drop(&mut self) {
        // Cancelled (an async wait dropped early): give up on the answer,
        // and release a capability that arrived meanwhile.
        if !self.done {
            if let Some(Ok(Reply::Cap { handle, .. })) = self.shared.abandon(self.op, &self.slot) {
                self.shared.drop_orphan(handle);
            }
        }
    }
}

/// An operation sent to the controller and not yet awaited, from the
/// `start_*` methods of [`Process`].
///
/// Await it once with [`Pending::wait`] (blocking) or [`Pending::wait_async`]
/// (tokio), each bounded by the timeout of the handle that started it.
/// Dropping it without waiting abandons the answer: a capability the
/// operation returns later is dropped automatically.
///
/// ```no_run
/// # fn f(p: &fractos_sdk::Process, svc: fractos_sdk::RequestCap) -> Result<(), fractos_sdk::SdkError> {
/// // Eight invocations in flight from one thread, then collect the answers.
/// let pending: Vec<_> = (0..8u8)
///     .map(|i| p.start_invoke(&svc, &[i], &[]))
///     .collect::<Result<_, _>>()?;
/// for op in pending {
///     op.wait()?;
/// }
/// # Ok(()) }
/// ```
#[must_use = "an operation's answer is lost unless it is awaited"]
pub struct Pending<T> {
    op: PendingOp,
    convert: fn(Reply) -> Result<T, SdkError>,
}

impl<T> std::fmt::Debug for Pending<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("op", &self.op.op)
            .field("what", &self.op.what)
            .field("timeout", &self.op.timeout)
            .finish()
    }
}

impl<T> Pending<T> {
    /// The operation id on the wire.
    pub fn op_id(&self) -> u64 {
        self.op.op
    }

    /// Blocks for the answer, up to the timeout of the handle that started
    /// the operation.
    pub fn wait(mut self) -> Result<T, SdkError> {
        self.op.wait().and_then(self.convert)
    }

    /// Awaits the answer, up to the timeout of the handle that started the
    /// operation (needs a tokio runtime with time enabled).
    #[cfg(feature = "tokio")]
    pub async fn wait_async(mut self) -> Result<T, SdkError> {
        self.op.wait_async().await.and_then(self.convert)
    }
}

fn reply_cap(r: Reply, kind: ObjectKind) -> Result<Cap, SdkError> {
    match r {
        Reply::Cap { handle, info } if info.kind == kind => Ok(Cap::from_info(handle, info)),
        other => Err(SdkError::protocol(format!(
            "expected a {kind:?} capability, got {other:?}"
        ))),
    }
}

fn reply_memory(r: Reply) -> Result<MemoryCap, SdkError> {
    reply_cap(r, ObjectKind::Memory).map(|c| c.as_memory().expect("kind checked"))
}

fn reply_request(r: Reply) -> Result<RequestCap, SdkError> {
    reply_cap(r, ObjectKind::Request).map(|c| c.as_request().expect("kind checked"))
}

fn reply_any(r: Reply) -> Result<Cap, SdkError> {
    match r {
        Reply::Cap { handle, info } => Ok(Cap::from_info(handle, info)),
        Reply::Done => Err(SdkError::protocol("expected a capability, got Done")),
    }
}

fn reply_done(r: Reply) -> Result<(), SdkError> {
    match r {
        Reply::Done => Ok(()),
        other => Err(SdkError::protocol(format!("expected Done, got {other:?}"))),
    }
}

/// The connection's time: nanoseconds since `epoch`.
fn now(epoch: std::time::Instant) -> fractos_process::Instant {
    fractos_process::Instant(epoch.elapsed().as_nanos().min(u64::MAX as u128) as u64)
}

/// Sends the attach and reads the answer (nothing after it, so frames that
/// follow are left in `reader` for the reader thread).
fn handshake<S: ByteStream>(
    stream: &mut S,
    conn: &mut Conn,
    reader: &mut FrameReader,
    epoch: std::time::Instant,
    connect_timeout: Duration,
) -> Result<NodeId, SdkError> {
    let failed = |e: fractos_process::Error| match e {
        fractos_process::Error::Rejected { code, version } => SdkError::Rejected {
            code,
            controller_version: version,
        },
        fractos_process::Error::AttachTimeout => SdkError::Timeout {
            what: "the controller's answer to attach",
            after: connect_timeout,
        },
        e => SdkError::protocol(format!("attach answer: {e}")),
    };
    while let Some(frame) = conn.poll_transmit() {
        stream
            .write_all(&frame)
            .map_err(|e| SdkError::io("sending the attach", e))?;
    }
    loop {
        match reader.frame() {
            Ok(Some(body)) => {
                let r = conn.handle_body(body, now(epoch), &mut NoMemory);
                reader.consume();
                r.map_err(failed)?;
                match conn.node() {
                    Some(node) => return Ok(node),
                    None => continue,
                }
            }
            Ok(None) => {}
            Err(e) => return Err(failed(e.into())),
        }
        let t = now(epoch);
        conn.handle_timeout(t).map_err(failed)?;
        let left = conn
            .poll_timeout()
            .map(|d| Duration::from_nanos(d.0.saturating_sub(t.0)));
        stream
            .set_read_timeout(left.map(|l| l.max(Duration::from_millis(1))))
            .map_err(|e| SdkError::io("configuring the socket", e))?;
        match stream.read(reader.read_buf()) {
            Ok(0) => {
                return Err(SdkError::Disconnected {
                    reason: DisconnectReason::ControllerClosed,
                })
            }
            Ok(n) => reader.filled(n),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(SdkError::io("reading the attach answer", e)),
        }
    }
}

/// Why a fatal protocol error closes the channel, in the SDK's terms.
fn disconnect_reason(e: fractos_process::Error) -> DisconnectReason {
    match e {
        fractos_process::Error::Kicked(code) => DisconnectReason::Kicked(code),
        e => DisconnectReason::Protocol(e.to_string()),
    }
}

/// Fills the waiters of completed (or aborted) operations.
fn deliver(events: Events, aborted: &DisconnectReason) {
    for ev in events {
        match ev {
            Event::Completion { data, result, .. } => data.fill(result.map_err(SdkError::Remote)),
            Event::Aborted { data, .. } => data.fill(Err(SdkError::Disconnected {
                reason: aborted.clone(),
            })),
            Event::Attached { .. } => {}
        }
    }
}

impl Shared {
    fn disconnected(&self) -> SdkError {
        SdkError::Disconnected {
            reason: lock(&self.proto)
                .closed
                .clone()
                .unwrap_or(DisconnectReason::Closed),
        }
    }

    /// Writes every frame the connection has queued, in order; a failed
    /// write closes the channel.
    fn flush(&self) -> Result<(), SdkError> {
        let mut w = lock(&self.writer);
        let mut wrote = false;
        let result = loop {
            let frame = lock(&self.proto).conn.poll_transmit();
            match frame {
                Some(frame) => {
                    wrote = true;
                    if let Err(e) = w.write_all(&frame) {
                        break Err(e);
                    }
                }
                None if wrote => break w.flush(),
                None => break Ok(()),
            }
        };
        drop(w);
        if let Err(e) = result {
            self.shutdown(DisconnectReason::Io(format!(
                "writing to the controller: {e}"
            )));
            return Err(self.disconnected());
        }
        Ok(())
    }

    /// Gives up on `op`. Returns its result if it arrived meanwhile.
    fn abandon(&self, op: u64, slot: &Slot<OpResult>) -> Option<OpResult> {
        if lock(&self.proto).conn.forget(op).is_some() {
            // A capability it returns later is dropped by the connection.
            return None;
        }
        // Answered (or aborted): the answer is in the slot (or about to be).
        slot.wait(Duration::from_secs(1))
    }

    /// Drops a capability nobody waits for any more.
    fn drop_orphan(&self, handle: Handle) {
        let started = lock(&self.proto)
            .conn
            .start_detached(|op| ProcessMsg::Drop { op, cap: handle });
        if started.is_ok() {
            let _ = self.flush();
        }
    }

    /// Marks the channel closed, fails every pending operation, closes the
    /// queues and the stream. Idempotent; the first reason wins.
    fn shutdown(&self, reason: DisconnectReason) {
        let events: Events = {
            let mut p = lock(&self.proto);
            if p.closed.is_some() {
                return;
            }
            p.closed = Some(reason.clone());
            p.conn.close();
            std::iter::from_fn(|| p.conn.poll_event()).collect()
        };
        self.release(events, &reason);
    }

    /// The rest of a shutdown once `closed` is set: the stream, the
    /// waiters, the queues.
    fn release(&self, events: Events, reason: &DisconnectReason) {
        if let Some(close) = lock(&self.closer).take() {
            close();
        }
        deliver(events, reason);
        self.invocations.close();
        self.jobs.close();
    }

    fn on_reader_thread(&self) -> bool {
        self.reader_id.get() == Some(&thread::current().id())
    }

    /// Reads the channel once (up to `deadline`, or until data or its end
    /// if `None`) and hands what came to the connection. `Err` is why the
    /// channel must close.
    fn read_once(&self, deadline: Option<Instant>) -> Result<(), DisconnectReason> {
        let mut io = lock(&self.io);
        let Some(io) = io.as_mut() else {
            return Err(DisconnectReason::Closed);
        };
        self.on_frames(&mut io.frames)?;
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            let _ = io
                .stream
                .set_timeout(Some(left.max(Duration::from_millis(1))));
        }
        let got = read_chunk(&mut io.stream, &mut io.frames);
        if deadline.is_some() {
            let _ = io.stream.set_timeout(None);
        }
        match got {
            Ok(true) => self.on_frames(&mut io.frames),
            Ok(false) => Ok(()),
            Err(Some(reason)) => Err(reason),
            // Nothing came before the deadline.
            Err(None) => Ok(()),
        }
    }

    /// Waits for `slot` on the reader thread (an inline handler's wait) by
    /// reading the channel until it is filled or `timeout` passes.
    fn wait_reading<T>(&self, slot: &Slot<T>, timeout: Duration) -> Option<T> {
        let deadline = Instant::now().checked_add(timeout);
        loop {
            if let Some(v) = slot.wait(Duration::ZERO) {
                return Some(v);
            }
            let d = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            if Instant::now() >= d {
                return None;
            }
            if let Err(reason) = self.read_once(Some(d)) {
                // Fails every pending operation, ours included.
                self.shutdown(reason);
                return slot.wait(Duration::ZERO);
            }
        }
    }

    /// Runs the invocations queued for inline handlers, in order.
    fn run_inline(&self) {
        loop {
            let job = lock(&self.inline_jobs).pop_front();
            let Some((handler, inv)) = job else {
                return;
            };
            let Some(outer) = self.outer.get().and_then(Weak::upgrade) else {
                continue;
            };
            let p = Process {
                outer,
                timeout: self.opts.op_timeout,
            };
            // A panicking handler must not take the reader down with it.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(&p, inv)));
        }
    }

    fn close_and_join(&self) {
        self.shutdown(DisconnectReason::Closed);
        let handle = lock(&self.reader).take();
        if let Some(h) = handle {
            if h.thread().id() != thread::current().id() {
                let _ = h.join();
            }
        }
    }

    /// Hands every complete frame of `reader` to the connection, one at a
    /// time (so completions and invocations reach the application in wire
    /// order), then delivers what it produced. `Err` closes the channel.
    fn on_frames(&self, reader: &mut FrameReader) -> Result<(), DisconnectReason> {
        loop {
            let body = match reader.frame() {
                Ok(Some(body)) => body,
                Ok(None) => return Ok(()),
                Err(e) => return Err(disconnect_reason(e.into())),
            };
            let (result, events, invocations) = {
                let mut p = lock(&self.proto);
                if p.closed.is_some() {
                    return Ok(());
                }
                let mut memory = &self.memory;
                let r = p.conn.handle_body(body, now(self.epoch), &mut memory);
                let fatal = match r {
                    Err(e) if e.is_fatal() => Some(disconnect_reason(e)),
                    _ => None,
                };
                if let Some(reason) = &fatal {
                    p.closed = Some(reason.clone());
                }
                let events: Events = std::iter::from_fn(|| p.conn.poll_event()).collect();
                let invocations: Vec<_> = std::iter::from_fn(|| p.conn.poll_invocation()).collect();
                (r.map_err(|e| (e, fatal)), events, invocations)
            };
            for inv in invocations {
                self.route(Invocation::from_wire(inv.tag, inv.imms, inv.caps));
            }
            match result {
                Err((_, Some(reason))) => {
                    self.release(events, &reason);
                    return Err(reason);
                }
                // Refused for lack of room: the queue was just drained,
                // hand the same frame in again.
                Err((fractos_process::Error::InvocationQueueFull { .. }, None)) => {
                    deliver(events, &DisconnectReason::Closed);
                }
                // A completion for an op nobody started is dropped.
                Ok(()) | Err((_, None)) => {
                    reader.consume();
                    deliver(events, &DisconnectReason::Closed);
                }
            }
            self.flush()
                .map_err(|e| DisconnectReason::Io(e.to_string()))?;
        }
    }

    /// Hands an invocation to its handler, else to `next_invocation`.
    fn route(&self, inv: Invocation) {
        let handler = self
            .handlers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&inv.tag)
            .cloned();
        let _ = match handler {
            Some((h, true)) => {
                lock(&self.inline_jobs).push_back((h, inv));
                Ok(())
            }
            Some((h, false)) => self.jobs.push((h, inv)).map_err(drop),
            None => self.invocations.push(inv).map_err(drop),
        };
    }
}

fn reader_loop(shared: Arc<Shared>) {
    let _ = shared.reader_id.set(thread::current().id());
    let reason = loop {
        if let Err(reason) = shared.read_once(None) {
            break reason;
        }
        shared.run_inline();
    };
    shared.shutdown(reason);
    // Don't keep the stream (and the shared state) alive from here.
    lock(&shared.io).take();
    lock(&shared.inline_jobs).clear();
    drop(shared);
}

/// One read of `stream` straight into `frames`' buffer (no intermediate
/// copy): `Ok(true)` if bytes came, `Ok(false)` if interrupted,
/// `Err(None)` if a read timeout passed, `Err(Some(why))` at the end of the
/// stream or on an error.
fn read_chunk(
    stream: &mut impl Read,
    frames: &mut FrameReader,
) -> Result<bool, Option<DisconnectReason>> {
    match stream.read(frames.read_buf()) {
        Ok(0) => Err(Some(DisconnectReason::ControllerClosed)),
        Ok(n) => {
            frames.filled(n);
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Err(None)
        }
        Err(e) => Err(Some(DisconnectReason::Io(format!(
            "reading from the controller: {e}"
        )))),
    }
}

/// Reads `stream` until its end (`Ok`) or an error, calling `on_frames`
/// after every read.
#[cfg(test)]
fn read_frames(
    stream: &mut impl Read,
    reader: &mut FrameReader,
    mut on_frames: impl FnMut(&mut FrameReader) -> Result<(), DisconnectReason>,
) -> Result<(), DisconnectReason> {
    loop {
        on_frames(reader)?;
        match read_chunk(stream, reader) {
            Ok(_) => {}
            Err(Some(DisconnectReason::ControllerClosed)) => return Ok(()),
            Err(Some(r)) => return Err(r),
            Err(None) => return Err(DisconnectReason::Io("timed out".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fractos_wire::ControllerMsg;

    /// A reader handing out at most `step` bytes per call.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        step: usize,
    }

    impl Read for Trickle {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(out.len()).min(self.data.len() - self.pos);
            out[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    /// Takes every complete frame out of `r`, decoded.
    fn drain(r: &mut FrameReader, got: &mut Vec<ControllerMsg>) -> Result<(), DisconnectReason> {
        while let Some(body) = r.frame().map_err(|e| disconnect_reason(e.into()))? {
            got.push(ControllerMsg::decode(body).unwrap());
            r.consume();
        }
        Ok(())
    }

    #[test]
    fn read_frames_splits_any_chunking_and_large_frames() {
        let msgs: Vec<ControllerMsg> = (0..14u64)
            .map(|i| ControllerMsg::MemWrite {
                xfer: i,
                addr: i * 7,
                // Sizes around and beyond the read buffer.
                data: vec![i as u8; (i as usize * 40_000) % fractos_wire::MAX_DATA_LEN + 1],
            })
            .collect();
        let mut wire = Vec::new();
        for m in &msgs {
            m.encode(&mut wire);
        }
        for (step, split_at) in [
            (61, 0),
            (7, 3),
            (4096, 100),
            (256 * 1024, 0),
            (usize::MAX, 10),
        ] {
            let split_at = split_at.min(wire.len());
            let mut r = Trickle {
                data: wire[split_at..].to_vec(),
                pos: 0,
                step,
            };
            let mut reader = FrameReader::new(MAX_FRAME_LEN);
            reader.push(&wire[..split_at]);
            let mut got = Vec::new();
            let res = read_frames(&mut r, &mut reader, |b| drain(b, &mut got));
            assert_eq!(res, Ok(()));
            assert_eq!(got, msgs, "step {step}");
        }
        // An oversized announcement is a protocol error.
        let mut r = Trickle {
            data: u32::MAX.to_le_bytes().to_vec(),
            pos: 0,
            step: 4,
        };
        let mut reader = FrameReader::new(MAX_FRAME_LEN);
        let res = read_frames(&mut r, &mut reader, |b| drain(b, &mut Vec::new()));
        assert!(matches!(res, Err(DisconnectReason::Protocol(_))));
    }

    #[test]
    fn handles_are_send_and_sync() {
        fn is<T: Send + Sync>() {}
        is::<Process>();
        is::<SdkError>();
    }

    #[test]
    fn argument_checks_are_local() {
        assert!(check_args(&vec![0; MAX_IMMEDIATES], &[]).is_ok());
        assert!(matches!(
            check_args(&vec![0; MAX_IMMEDIATES + 1], &[]),
            Err(SdkError::InvalidArgument(_))
        ));
        let caps = vec![Cap::from(RequestCap::from_raw(Handle(1))); MAX_CAPS_PER_MESSAGE + 1];
        assert!(check_args(&[], &caps).is_err());
        assert_eq!(
            check_args(&[], &caps[..2]).unwrap(),
            vec![Handle(1), Handle(1)]
        );
        assert!(check_name(&[b'x'; MAX_NAME_LEN]).is_ok());
        assert!(check_name(&[b'x'; MAX_NAME_LEN + 1]).is_err());
    }

    #[test]
    fn reply_typing() {
        use fractos_wire::CapInfo;
        let mem = Reply::Cap {
            handle: Handle(3),
            info: CapInfo {
                kind: ObjectKind::Memory,
                rights: Rights::READ,
                len: 9,
            },
        };
        assert_eq!(reply_memory(mem).unwrap().len(), 9);
        assert!(matches!(reply_request(mem), Err(SdkError::Protocol { .. })));
        assert!(matches!(reply_done(mem), Err(SdkError::Protocol { .. })));
        assert!(reply_any(mem).is_ok());
        assert!(reply_any(Reply::Done).is_err());
        assert!(reply_done(Reply::Done).is_ok());
        assert!(reply_memory(Reply::Done).is_err());
    }

    #[test]
    fn attach_to_nothing_is_an_io_error() {
        // Bind then drop a listener: the port is very likely closed.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        match Process::attach(addr, "p", [0; 32], AttachOptions::default()) {
            Err(SdkError::Io { .. }) => {}
            other => panic!("expected an I/O error, got {other:?}"),
        }
        assert!(matches!(
            Process::attach(
                addr,
                &"n".repeat(MAX_PROCESS_NAME_LEN + 1),
                [0; 32],
                AttachOptions::default()
            ),
            Err(SdkError::InvalidArgument(_))
        ));
    }
}
