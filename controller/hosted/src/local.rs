//! Local channels: processes on this host attach through a Unix socket and
//! then talk through shared-memory rings, and the controller reads and
//! writes their registered memory directly.
//!
//! A connection's task ([`serve`]) logs the peer's credentials, takes the
//! process's `Hello` (ring memfd and two eventfds, `SCM_RIGHTS`), checks
//! the memfd's seals and size before mapping it once, opens the rings as
//! the controller, and hands the event loop a [`LocalParts`]: the loop
//! adds a [`LocalChannel`] to the node (the attach handshake then runs
//! through the rings as over TCP). The task stays on the socket: it maps
//! and unmaps regions the process registers (each acknowledged after the
//! mapping), turns kicks of the up eventfd into wake-ups of the loop, and
//! marks the channel gone at the socket's end (the process exited).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fractos_shm::local::{LocalMsg, HELLO, LOCAL_VERSION, MAX_LOCAL_MSG, REGISTER, UNREGISTER};
use fractos_shm::{AsyncEventFd, EventFd, Mapping, MAX_FDS};
use fractos_transport::ring::{ring_area_len, RingEndpoint, RingSide, RING_MAX};
use fractos_transport::{Channel, DirectMemory, Framing, Received, RingChannel, TransportError};
use fractos_wire::ErrorCode;
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::driver::Event;

/// Regions one process may register with its controller.
pub const MAX_REGIONS: usize = 4096;

/// Regions all local processes of one controller may have registered at
/// once. Each is one mapping of the controller (Linux allows 65 530 per
/// process by default, `vm.max_map_count`): the bound keeps the
/// controller's own allocations and other processes' rings mappable
/// whatever registering processes do.
pub const MAX_LOCAL_REGIONS: usize = 16_384;

/// Local connections that may be between their accept and their `Hello`
/// at once; more are closed at once (each waits at most the attach
/// timeout for its `Hello`).
pub const MAX_PENDING_LOCAL: usize = 64;

/// The controller's side of the rings.
pub(crate) type Rings = RingChannel<Mapping, EventFd>;

/// The registered regions of one process, mapped: start address →
/// (length, mapping).
#[derive(Default)]
pub(crate) struct Regions {
    map: BTreeMap<u64, (u64, Mapping)>,
    /// Regions registered by all processes of the controller (this table's
    /// share is given back when it is dropped).
    total: Arc<AtomicUsize>,
}

impl Drop for Regions {
    fn drop(&mut self) {
        self.total.fetch_sub(self.map.len(), Ordering::AcqRel);
    }
}

impl Regions {
    /// An empty table counting against the controller-wide `total`.
    pub(crate) fn new(total: Arc<AtomicUsize>) -> Self {
        Regions {
            map: BTreeMap::new(),
            total,
        }
    }

    /// The mapping and offset holding all of `[addr, addr+len)`.
    fn find(&self, addr: u64, len: usize) -> Result<(&Mapping, usize), ErrorCode> {
        let (&start, (rlen, m)) = self
            .map
            .range(..=addr)
            .next_back()
            .ok_or(ErrorCode::MemoryFault)?;
        let off = addr - start;
        match off.checked_add(len as u64) {
            Some(end) if end <= *rlen => Ok((m, off as usize)),
            _ => Err(ErrorCode::MemoryFault),
        }
    }

    /// Adds a region unless it is empty, wraps around, overlaps another or
    /// is one too many.
    fn insert(&mut self, addr: u64, len: u64, m: Mapping) -> Result<(), String> {
        let end = addr
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or_else(|| format!("region [{addr:#x}, +{len}) is empty or wraps around"))?;
        if self.map.len() >= MAX_REGIONS {
            return Err(format!(
                "at most {MAX_REGIONS} regions per process; unregister some or register larger ones"
            ));
        }
        let before = self.map.range(..end).next_back();
        if let Some((&s, (l, _))) = before {
            if s + l > addr {
                return Err(format!(
                    "region [{addr:#x}, {end:#x}) overlaps the registered region at {s:#x}"
                ));
            }
        }
        let taken = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_LOCAL_REGIONS).then_some(n + 1)
            });
        if taken.is_err() {
            return Err(format!(
                "the controller holds {MAX_LOCAL_REGIONS} regions of local processes, its limit; try again later"
            ));
        }
        self.map.insert(addr, (len, m));
        Ok(())
    }

    fn remove(&mut self, addr: u64) -> bool {
        let removed = self.map.remove(&addr).is_some();
        if removed {
            self.total.fetch_sub(1, Ordering::AcqRel);
        }
        removed
    }
}

/// A process's registered memory as the node reaches it.
pub(crate) struct LocalMemory {
    regions: Arc<Mutex<Regions>>,
}

impl LocalMemory {
    fn regions(&self) -> std::sync::MutexGuard<'_, Regions> {
        self.regions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl DirectMemory for LocalMemory {
    fn read(&mut self, _: &mut (), addr: u64, out: &mut [u8]) -> Result<(), ErrorCode> {
        let r = self.regions();
        let (m, off) = r.find(addr, out.len())?;
        m.read_at(off, out).map_err(|_| ErrorCode::MemoryFault)
    }

    fn write(&mut self, _: &mut (), addr: u64, data: &[u8]) -> Result<(), ErrorCode> {
        let r = self.regions();
        let (m, off) = r.find(addr, data.len())?;
        m.write_at(off, data).map_err(|_| ErrorCode::MemoryFault)
    }
}

/// A local channel as the node sees it: the rings, plus direct access to
/// the process's registered memory.
pub(crate) struct LocalChannel {
    rings: Rc<RefCell<Rings>>,
    memory: LocalMemory,
    gone: Arc<AtomicBool>,
    /// Dropped with the channel: the socket's task then ends (and closes
    /// the socket, unmapping the regions), so a process whose channel the
    /// node dropped (attach timeout, rejected token, corrupt ring) keeps
    /// nothing.
    _alive: oneshot::Sender<()>,
}

impl Channel for LocalChannel {
    fn framing(&self) -> Framing {
        Framing::Stream
    }

    fn send(&mut self, cx: &mut (), data: &[u8]) -> Result<usize, TransportError> {
        if self.gone.load(Ordering::Acquire) {
            return Err(TransportError::Reset);
        }
        self.rings.borrow_mut().send(cx, data)
    }

    fn recv(
        &mut self,
        cx: &mut (),
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<Received, TransportError> {
        if self.gone.load(Ordering::Acquire) {
            return Err(TransportError::Reset);
        }
        self.rings.borrow_mut().recv(cx, out, max)
    }

    fn close(&mut self, cx: &mut ()) {
        self.rings.borrow_mut().close(cx);
    }

    fn abort(&mut self, cx: &mut ()) {
        self.rings.borrow_mut().abort(cx);
    }

    fn is_finished(&self, cx: &mut ()) -> bool {
        // A corrupt ring carries nothing more: done at once (no linger, so
        // the loop does not keep finding it ready).
        let mut rings = self.rings.borrow_mut();
        self.gone.load(Ordering::Acquire) || rings.ring().is_corrupt() || rings.is_finished(cx)
    }

    fn direct_memory(&mut self) -> Option<&mut dyn DirectMemory> {
        Some(&mut self.memory)
    }
}

/// What a connection's task hands the event loop once the rings are open.
pub(crate) struct LocalParts {
    pub(crate) alive: oneshot::Sender<()>,
    pub(crate) rings: Rings,
    pub(crate) regions: Arc<Mutex<Regions>>,
    pub(crate) gone: Arc<AtomicBool>,
    pub(crate) pid: i32,
}

/// The loop's handle on a local channel: to spin on and sleep on its
/// rings.
pub(crate) struct LocalHandle {
    pub(crate) rings: Rc<RefCell<Rings>>,
    pub(crate) gone: Arc<AtomicBool>,
}

impl LocalHandle {
    /// Whether the channel has something for the node (bytes, a close, a
    /// corrupt ring, the process's exit).
    pub(crate) fn ready(&self) -> bool {
        if self.gone.load(Ordering::Acquire) {
            return true;
        }
        let mut r = self.rings.borrow_mut();
        let ring = r.ring();
        !matches!(ring.available(), Ok(0)) || ring.peer_closed()
    }

    /// Announces sleep; `false`: something arrived meanwhile.
    pub(crate) fn prepare_sleep(&self) -> bool {
        if self.gone.load(Ordering::Acquire) {
            return false;
        }
        matches!(self.rings.borrow_mut().ring().prepare_sleep(), Ok(true))
    }

    pub(crate) fn woke(&self) {
        self.rings.borrow_mut().ring().woke();
    }

    /// Whether the node dropped the channel (only the loop holds it now).
    pub(crate) fn dropped(&self) -> bool {
        Rc::strong_count(&self.rings) == 1
    }
}

/// Builds the node's channel and the loop's handle from `parts`.
pub(crate) fn channel(parts: LocalParts) -> (LocalChannel, LocalHandle) {
    let rings = Rc::new(RefCell::new(parts.rings));
    let ch = LocalChannel {
        rings: rings.clone(),
        memory: LocalMemory {
            regions: parts.regions,
        },
        gone: parts.gone.clone(),
        _alive: parts.alive,
    };
    (
        ch,
        LocalHandle {
            rings,
            gone: parts.gone,
        },
    )
}

/// Why a local connection ended before or during its life.
#[derive(Debug, thiserror::Error)]
enum LocalError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Shm(#[from] fractos_shm::ShmError),
    #[error("{0}")]
    Protocol(String),
}

/// Reads messages (and their descriptors) from a local socket.
struct Inbox {
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Inbox {
    /// The next whole message and its descriptors; `Ok(None)` at the
    /// socket's end.
    async fn next(
        &mut self,
        s: &UnixStream,
    ) -> Result<Option<(LocalMsg, Vec<OwnedFd>)>, LocalError> {
        loop {
            if let Some((msg, n)) = LocalMsg::decode(&self.buf)? {
                self.buf.drain(..n);
                let want = msg.fds();
                if self.fds.len() != want {
                    return Err(LocalError::Protocol(format!(
                        "a message of kind {} came with {} descriptors; it takes {want} (send one message at a time, with exactly its descriptors)",
                        msg.kind(),
                        self.fds.len()
                    )));
                }
                let fds: Vec<OwnedFd> = self.fds.drain(..want).collect();
                return Ok(Some((msg, fds)));
            }
            if !self.try_fill(s).await? {
                return Ok(None);
            }
        }
    }

    /// One read; `false` at the end.
    async fn try_fill(&mut self, s: &UnixStream) -> Result<bool, LocalError> {
        let mut chunk = [0u8; MAX_LOCAL_MSG];
        let fds = &mut self.fds;
        let n = s
            .async_io(Interest::READABLE, || {
                fractos_shm::recv_with_fds(s.as_fd(), &mut chunk, fds)
            })
            .await?;
        if n == 0 {
            return Ok(false);
        }
        if self.fds.len() > MAX_FDS {
            return Err(LocalError::Protocol(format!(
                "{} descriptors sent before a whole message; no message takes more than 3",
                self.fds.len()
            )));
        }
        if self.buf.len() + n > 4 * MAX_LOCAL_MSG {
            return Err(LocalError::Protocol(
                "the process sends without waiting for answers".into(),
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(true)
    }
}

async fn send(s: &UnixStream, msg: &LocalMsg) -> Result<(), LocalError> {
    let mut out = Vec::new();
    msg.encode(&mut out);
    let mut at = 0;
    while at < out.len() {
        s.writable().await?;
        match s.try_write(&out[at..]) {
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn ack(s: &UnixStream, of: u8, addr: u64, error: String) -> Result<(), LocalError> {
    send(s, &LocalMsg::Ack { of, addr, error }).await
}

/// What every local connection of one controller shares: the bound on
/// connections still waiting for their `Hello`, and the count of regions
/// registered.
#[derive(Clone)]
pub(crate) struct LocalShared {
    pending: Arc<tokio::sync::Semaphore>,
    regions: Arc<AtomicUsize>,
    attach_timeout: Duration,
}

impl LocalShared {
    pub(crate) fn new(attach_timeout: Duration) -> Self {
        LocalShared {
            pending: Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_LOCAL)),
            regions: Arc::default(),
            attach_timeout,
        }
    }

    /// Takes on a freshly accepted connection: its task, or `None` (the
    /// connection is dropped, hence closed) when [`MAX_PENDING_LOCAL`]
    /// connections are already waiting for their `Hello`.
    pub(crate) fn admit(
        &self,
        s: UnixStream,
        events: mpsc::Sender<Event>,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let permit = self.pending.clone().try_acquire_owned().ok()?;
        Some(serve(s, events, self.clone(), permit))
    }
}

/// Opens the rings of a `Hello`'s descriptors.
fn open_rings(fds: Vec<OwnedFd>) -> Result<(Rings, AsyncEventFd), LocalError> {
    let mut fds = fds.into_iter();
    let (Some(ring), Some(up), Some(down)) = (fds.next(), fds.next(), fds.next()) else {
        return Err(LocalError::Protocol("hello without its descriptors".into()));
    };
    let mem = Mapping::open_whole(ring, ring_area_len(RING_MAX))?;
    let endpoint = RingEndpoint::open(mem, 0, RingSide::Controller)
        .map_err(|e| LocalError::Protocol(e.to_string()))?;
    // The up eventfd wakes this side; the down one wakes the process.
    let up = EventFd::from_fd(up)?;
    let down = EventFd::from_fd(down)?;
    let waker = AsyncEventFd::new(&up)?;
    Ok((RingChannel::new(endpoint, down), waker))
}

/// Serves one local connection until the process goes. `pending` is
/// released once the `Hello` is answered.
async fn serve(
    s: UnixStream,
    events: mpsc::Sender<Event>,
    shared: LocalShared,
    pending: tokio::sync::OwnedSemaphorePermit,
) {
    let cred = fractos_shm::peer_cred(&s);
    let pid = match &cred {
        Ok(c) => {
            info!(
                pid = c.pid,
                uid = c.uid,
                gid = c.gid,
                "local process connected"
            );
            c.pid
        }
        Err(e) => {
            warn!(error = %e, "local connection without peer credentials");
            0
        }
    };
    let mut inbox = Inbox {
        buf: Vec::new(),
        fds: Vec::new(),
    };
    let hello = tokio::time::timeout(shared.attach_timeout, inbox.next(&s)).await;
    let (rings, waker) = match hello {
        Ok(Ok(Some((LocalMsg::Hello { version }, fds)))) if version == LOCAL_VERSION => {
            match open_rings(fds) {
                Ok(r) => r,
                Err(e) => {
                    warn!(pid, error = %e, "local channel refused");
                    let _ = ack(&s, HELLO, 0, e.to_string()).await;
                    return;
                }
            }
        }
        Ok(Ok(Some((LocalMsg::Hello { version }, _)))) => {
            let _ = ack(
                &s,
                HELLO,
                0,
                format!("local protocol version {version} is not {LOCAL_VERSION}"),
            )
            .await;
            return;
        }
        Ok(Ok(Some(_))) => {
            let _ = ack(&s, HELLO, 0, "the first message must be a hello".into()).await;
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            debug!(pid, error = %e, "local connection refused before its hello");
            let _ = ack(&s, HELLO, 0, e.to_string()).await;
            return;
        }
        Err(_) => {
            debug!(pid, "local connection sent no hello in time");
            return;
        }
    };
    let regions = Arc::new(Mutex::new(Regions::new(shared.regions.clone())));
    let gone = Arc::new(AtomicBool::new(false));
    let (ok_tx, ok_rx) = oneshot::channel();
    let (alive, mut dropped) = oneshot::channel();
    let parts = LocalParts {
        alive,
        rings,
        regions: regions.clone(),
        gone: gone.clone(),
        pid,
    };
    if events
        .send(Event::Local(Box::new(parts), ok_tx))
        .await
        .is_err()
        || !ok_rx.await.unwrap_or(false)
    {
        let _ = ack(
            &s,
            HELLO,
            0,
            "the controller takes no more processes".into(),
        )
        .await;
        return;
    }
    if ack(&s, HELLO, 0, String::new()).await.is_err() {
        gone.store(true, Ordering::Release);
        let _ = events.send(Event::Wake).await;
        return;
    }
    drop(pending);
    let why = tokio::select! {
        r = run(&s, &mut inbox, &regions, &waker, &events, &gone) => r,
        _ = &mut dropped => {
            debug!(pid, "local channel dropped by the node; closing its socket");
            Ok(())
        }
    };
    match why {
        Ok(()) => debug!(pid, "local process left"),
        Err(e) => {
            warn!(pid, error = %e, "local channel closed");
            // Tell the process why, if it still listens (`of` 0: the
            // message could not be read).
            let _ =
                tokio::time::timeout(Duration::from_secs(1), ack(&s, 0, 0, e.to_string())).await;
        }
    }
    gone.store(true, Ordering::Release);
    let _ = events.send(Event::Wake).await;
}

/// Registrations and kicks until the socket ends (`Ok`) or the process
/// breaks the protocol.
async fn run(
    s: &UnixStream,
    inbox: &mut Inbox,
    regions: &Mutex<Regions>,
    waker: &AsyncEventFd,
    events: &mpsc::Sender<Event>,
    gone: &AtomicBool,
) -> Result<(), LocalError> {
    loop {
        tokio::select! {
            msg = inbox.next(s) => {
                let Some((msg, fds)) = msg? else { return Ok(()) };
                let lock = || regions.lock().unwrap_or_else(|e| e.into_inner());
                match msg {
                    LocalMsg::Register { addr, len, file_offset } => {
                        let r = usize::try_from(len)
                            .map_err(|_| "region too large".to_string())
                            .and_then(|n| {
                                let fd = fds.into_iter().next().ok_or("no descriptor")?;
                                Mapping::open_detached(fd, file_offset, n)
                                    .map_err(|e| e.to_string())
                            })
                            .and_then(|m| lock().insert(addr, len, m));
                        ack(s, REGISTER, addr, r.err().unwrap_or_default()).await?;
                    }
                    LocalMsg::Unregister { addr } => {
                        let removed = lock().remove(addr);
                        let e = if removed { String::new() } else { format!("no region at {addr:#x}") };
                        ack(s, UNREGISTER, addr, e).await?;
                    }
                    other => {
                        return Err(LocalError::Protocol(format!(
                            "unexpected message kind {}", other.kind()
                        )))
                    }
                }
            }
            kicked = waker.kicked() => {
                kicked?;
                if gone.load(Ordering::Acquire) {
                    return Ok(());
                }
                let _ = events.try_send(Event::Wake);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_corrupt_ring_is_a_reset_and_finishes_the_channel_at_once() {
        use fractos_transport::ring::SharedMemory;
        use fractos_transport::ring::RING_MIN;
        let mem = Mapping::create("ring", ring_area_len(RING_MIN)).unwrap();
        let _process = RingEndpoint::init(mem.clone(), 0, RING_MIN).unwrap();
        let ctl = RingEndpoint::open(mem.clone(), 0, RingSide::Controller).unwrap();
        let (alive, _dropped) = oneshot::channel();
        let parts = LocalParts {
            alive,
            rings: RingChannel::new(ctl, EventFd::new().unwrap()),
            regions: Arc::default(),
            gone: Arc::default(),
            pid: 0,
        };
        let (mut ch, handle) = channel(parts);
        let mut out = Vec::new();
        assert_eq!(ch.recv(&mut (), &mut out, 100), Ok(Received::Empty));
        assert!(!handle.ready() && !ch.is_finished(&mut ()));
        // The process claims more bytes than the ring holds.
        mem.store_u64(256, RING_MIN + 1);
        assert!(handle.ready(), "the loop must look at it");
        assert_eq!(ch.recv(&mut (), &mut out, 100), Err(TransportError::Reset));
        assert!(ch.is_finished(&mut ()), "no linger for a corrupt ring");
        assert!(ch.direct_memory().is_some());
        drop(ch);
        assert!(handle.dropped());
    }

    #[test]
    fn region_table_checks_bounds_and_overlaps() {
        let total = Arc::new(AtomicUsize::new(0));
        let mut r = Regions::new(total.clone());
        let m = Mapping::create("r", 8192).unwrap();
        r.insert(0x1000, 100, m.clone()).unwrap();
        r.insert(0x3000, 8192, m.clone()).unwrap();
        assert!(r.insert(0x1000 + 99, 1, m.clone()).is_err(), "overlap");
        assert!(r.insert(0x0, 0x1001, m.clone()).is_err(), "overlap below");
        assert!(r.insert(0x10, 0, m.clone()).is_err(), "empty");
        assert!(r.insert(u64::MAX, 2, m.clone()).is_err(), "wraps");
        let mut mem = LocalMemory {
            regions: Arc::new(Mutex::new(r)),
        };
        mem.write(&mut (), 0x1000 + 98, b"ab").unwrap();
        let mut out = [0u8; 2];
        mem.read(&mut (), 0x1000 + 98, &mut out).unwrap();
        assert_eq!(&out, b"ab");
        for (addr, len) in [
            (0x1000 + 99, 2),
            (0xfff, 1),
            (0x2000, 1),
            (0x3000 + 8191, 2),
            (u64::MAX, 1),
            (0, 0),
        ] {
            assert_eq!(
                mem.read(&mut (), addr, &mut vec![0; len]),
                Err(ErrorCode::MemoryFault),
                "{addr:#x}+{len}"
            );
            assert_eq!(
                mem.write(&mut (), addr, &vec![0; len]),
                Err(ErrorCode::MemoryFault)
            );
        }
        assert!(mem.regions().remove(0x1000));
        assert_eq!(
            mem.read(&mut (), 0x1000, &mut out),
            Err(ErrorCode::MemoryFault)
        );
        assert_eq!(total.load(Ordering::Acquire), 1, "one region left");
        drop(mem);
        assert_eq!(
            total.load(Ordering::Acquire),
            0,
            "a dropped table gives back its share"
        );
    }

    #[test]
    fn region_counts_are_bounded_per_process_and_per_controller() {
        let total = Arc::new(AtomicUsize::new(0));
        let m = Mapping::create("r", 4096).unwrap();
        let mut r = Regions::new(total.clone());
        for i in 0..MAX_REGIONS as u64 {
            r.insert(i * 4096, 4096, m.clone()).unwrap();
        }
        let e = r.insert(u64::MAX / 2, 1, m.clone()).unwrap_err();
        assert!(e.contains("regions per process"), "{e}");
        assert!(r.remove(0));
        r.insert(u64::MAX / 2, 1, m.clone()).unwrap();
        assert_eq!(total.load(Ordering::Acquire), MAX_REGIONS);
        // Other processes fill the controller's budget.
        total.fetch_add(MAX_LOCAL_REGIONS - MAX_REGIONS, Ordering::AcqRel);
        let mut other = Regions::new(total.clone());
        let e = other.insert(0, 1, m.clone()).unwrap_err();
        assert!(e.contains("its limit"), "{e}");
        drop(r);
        other.insert(0, 1, m).unwrap();
        assert_eq!(
            total.load(Ordering::Acquire),
            MAX_LOCAL_REGIONS - MAX_REGIONS + 1
        );
    }
}
