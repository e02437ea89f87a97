//! The process side of a local channel ([`crate::Process::attach_local`]):
//! rings in a sealed memfd shared with the controller, eventfd kicks, and
//! region registration over the controller's Unix socket.
//!
//! The rings carry the same byte stream as a TCP connection, so the SDK's
//! reader thread and writers run over a [`RingStream`] (a
//! [`crate::ByteStream`]) unchanged. Reading spins on the down ring for
//! [`crate::AttachOptions::local_spin`] before it announces sleep and blocks on its eventfd (or the
//! socket hanging up: the controller is gone).

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fractos_shm::local::{LocalMsg, LOCAL_VERSION, MAX_LOCAL_MSG};
use fractos_shm::{EventFd, Mapping};
use fractos_transport::ring::{ring_area_len, RingEndpoint, RingSide};
use fractos_transport::Kick;

use crate::error::SdkError;
use crate::memory::{Backing, Region, Registrar};
use crate::process::ByteStream;
use crate::slot::lock;

/// Bytes of each ring (process → controller, controller → process).
pub const RING_CAPACITY: u64 = 1 << 20;

/// How long a reader polls its ring before it sleeps on its eventfd, by
/// default ([`crate::AttachOptions::local_spin`]; see the README's
/// measurement).
pub const DEFAULT_SPIN: Duration = Duration::ZERO;

/// What both halves of a [`RingStream`] share.
struct Rings {
    /// The up ring's producer side (this process writes).
    tx: Mutex<RingEndpoint<Mapping>>,
    /// The down ring's consumer side (this process reads).
    rx: Mutex<RingEndpoint<Mapping>>,
    /// Kicks the controller.
    up: Mutex<EventFd>,
    /// Kicked by the controller.
    down: EventFd,
    /// The local socket: its hang-up is the controller's end.
    sock: UnixStream,
    closed: AtomicBool,
    read_timeout: Mutex<Option<Duration>>,
    write_timeout: Duration,
    spin: Duration,
}

impl Rings {
    fn kick_if_sleeping(&self) {
        if lock(&self.tx).peer_sleeping() {
            lock(&self.up).kick();
        }
    }
}

/// The rings as a byte stream (see the module docs).
pub struct RingStream {
    rings: Arc<Rings>,
    stage: Vec<u8>,
}

fn corrupt() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "the controller's ring counters are corrupt",
    )
}

impl Read for RingStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = &self.rings;
        // A timeout too large for the clock is no deadline.
        let deadline = lock(&r.read_timeout).and_then(|t| Instant::now().checked_add(t));
        let mut spin_from = Instant::now();
        loop {
            if r.closed.load(Ordering::Acquire) {
                return Ok(0);
            }
            self.stage.clear();
            let (n, closed) = {
                let mut rx = lock(&r.rx);
                let n = rx.recv(&mut self.stage, buf.len()).map_err(|_| corrupt())?;
                (n, rx.peer_closed())
            };
            if n > 0 {
                buf[..n].copy_from_slice(&self.stage[..n]);
                // Room was made: a controller asleep with output waiting
                // for that room must hear of it.
                r.kick_if_sleeping();
                return Ok(n);
            }
            if closed {
                return Ok(0);
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "read timed out"));
            }
            if now.duration_since(spin_from) < r.spin {
                std::hint::spin_loop();
                continue;
            }
            if !lock(&r.rx).prepare_sleep().map_err(|_| corrupt())? {
                continue;
            }
            let nap = deadline.map_or(Duration::from_millis(200), |d| {
                d.saturating_duration_since(now)
                    .min(Duration::from_millis(200))
            });
            let (_, hup) = r.down.wait_or_hangup(Some(r.sock.as_fd()), Some(nap));
            lock(&r.rx).woke();
            if hup {
                return Ok(0);
            }
            spin_from = Instant::now();
        }
    }
}

impl Write for RingStream {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let r = &self.rings;
        let start = Instant::now();
        let mut tries = 0u32;
        loop {
            if r.closed.load(Ordering::Acquire) {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the local channel is closed",
                ));
            }
            let n = lock(&r.tx).send(data).map_err(|_| corrupt())?;
            if n > 0 || data.is_empty() {
                r.kick_if_sleeping();
                return Ok(n);
            }
            // Full: the controller is behind. Make sure it is awake, then
            // back off.
            lock(&r.up).kick();
            if start.elapsed() > r.write_timeout {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the controller stopped reading its ring",
                ));
            }
            tries += 1;
            if tries < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ByteStream for RingStream {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(RingStream {
            rings: self.rings.clone(),
            stage: Vec::new(),
        })
    }

    fn shutdown(&self) -> io::Result<()> {
        let r = &self.rings;
        if !r.closed.swap(true, Ordering::AcqRel) {
            lock(&r.tx).close();
            lock(&r.up).kick();
            // Wake our own reader too.
            let mut down = r.down.clone();
            down.kick();
            let _ = r.sock.shutdown(std::net::Shutdown::Both);
        }
        Ok(())
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        *lock(&self.rings.read_timeout) = timeout;
        Ok(())
    }
}

/// Region registration over the local socket (one request at a time).
pub(crate) struct LocalRegistrar {
    sock: Mutex<UnixStream>,
    timeout: Duration,
}

impl LocalRegistrar {
    /// Sends `msg` (with `fds`) and waits for its `Ack`.
    fn ask(
        &self,
        msg: &LocalMsg,
        fds: &[std::os::fd::BorrowedFd<'_>],
        what: &'static str,
    ) -> Result<(), SdkError> {
        let s = lock(&self.sock);
        exchange(&s, msg, fds, what, self.timeout)
    }
}

/// One request/answer on the local socket.
fn exchange(
    s: &UnixStream,
    msg: &LocalMsg,
    fds: &[std::os::fd::BorrowedFd<'_>],
    what: &'static str,
    timeout: Duration,
) -> Result<(), SdkError> {
    let mut out = Vec::new();
    msg.encode(&mut out);
    fractos_shm::send_with_fds(s.as_fd(), &out, fds).map_err(|e| match e {
        // The socket is shut (this process closed, or the controller went):
        // a disconnection, not a shared-memory failure.
        fractos_shm::ShmError::Io { source, .. }
            if matches!(
                source.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::NotConnected
            ) =>
        {
            SdkError::Disconnected {
                reason: crate::DisconnectReason::Io(format!("local socket: {source}")),
            }
        }
        e => e.into(),
    })?;
    s.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        .map_err(|e| SdkError::io("configuring the local socket", e))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; MAX_LOCAL_MSG];
    loop {
        if let Some((answer, _)) = LocalMsg::decode(&buf)? {
            return match answer {
                LocalMsg::Ack { of, error, .. } if of == msg.kind() => {
                    if error.is_empty() {
                        Ok(())
                    } else {
                        Err(SdkError::LocalRefused {
                            what,
                            reason: error,
                        })
                    }
                }
                other => Err(SdkError::protocol(format!(
                    "local socket: expected the answer to a {what}, got {other:?}"
                ))),
            };
        }
        match fractos_shm::recv_with_fds(s.as_fd(), &mut chunk, &mut Vec::new()) {
            Ok(0) => {
                return Err(SdkError::Disconnected {
                    reason: crate::DisconnectReason::ControllerClosed,
                })
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(SdkError::Timeout {
                    what,
                    after: timeout,
                })
            }
            Err(e) => return Err(SdkError::io("reading the local socket", e)),
        }
    }
}

impl Registrar for LocalRegistrar {
    fn register(&self, region: &Region) -> Result<(), SdkError> {
        let b: &Backing = region.backing();
        let msg = LocalMsg::Register {
            addr: region.addr(),
            len: region.len(),
            file_offset: b.file_offset(),
        };
        self.ask(&msg, &[b.mapping().fd()], "region registration")
    }

    fn unregister(&self, region: &Region) {
        let msg = LocalMsg::Unregister {
            addr: region.addr(),
        };
        let _ = self.ask(&msg, &[], "region unregistration");
    }
}

/// Connects to the controller's local socket at `path` and sets up the
/// rings: returns the ring stream (for the attach handshake) and the
/// registrar for the process's memory.
pub(crate) fn connect(
    path: &Path,
    opts: &crate::AttachOptions,
) -> Result<(RingStream, LocalRegistrar), SdkError> {
    let (connect_timeout, write_timeout) = (opts.connect_timeout, opts.write_timeout);
    let sock = UnixStream::connect(path)
        .map_err(|e| SdkError::io("connecting to the controller's local socket", e))?;
    let mem = Mapping::create("fractos-rings", ring_area_len(RING_CAPACITY))?;
    let tx = RingEndpoint::init(mem.clone(), 0, RING_CAPACITY)
        .map_err(|e| SdkError::invalid(e.to_string()))?;
    let rx = RingEndpoint::open(mem.clone(), 0, RingSide::Process)
        .map_err(|e| SdkError::invalid(e.to_string()))?;
    let up = EventFd::new()?;
    let down = EventFd::new()?;
    exchange(
        &sock,
        &LocalMsg::Hello {
            version: LOCAL_VERSION,
        },
        &[mem.fd(), up.fd(), down.fd()],
        "rings",
        connect_timeout,
    )?;
    let reg_sock = sock
        .try_clone()
        .map_err(|e| SdkError::io("duplicating the local socket", e))?;
    let rings = Arc::new(Rings {
        tx: Mutex::new(tx),
        rx: Mutex::new(rx),
        up: Mutex::new(up),
        down,
        sock,
        closed: AtomicBool::new(false),
        read_timeout: Mutex::new(None),
        write_timeout: write_timeout.max(Duration::from_millis(1)),
        spin: opts.local_spin,
    });
    Ok((
        RingStream {
            rings,
            stage: Vec::new(),
        },
        LocalRegistrar {
            sock: Mutex::new(reg_sock),
            timeout: connect_timeout,
        },
    ))
}
