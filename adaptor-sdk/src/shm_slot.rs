//! Attaching through a shared-memory slot of an appliance
//! ([`Process::attach_slot`]).
//!
//! The slot is a file under `/dev/shm` that the appliance's VM sees as an
//! `ivshmem-plain` device (`fractos up --shm-slots N` lists them in
//! `cluster.json`). The process maps it, proves it can read it (echoes the
//! nonce the appliance wrote there), and then talks to the controller over
//! the rings in it (`fractos_transport::slot` has the layout). Its
//! registered regions are carved out of the slot's memory area, which the
//! appliance reads and writes directly in copies: no `MemRead`/`MemWrite`
//! messages, no network.
//!
//! ivshmem-plain has no interrupts, so both sides poll: the SDK's reader
//! thread spins briefly, then sleeps in the shortest steps the host
//! timer gives for a few milliseconds, then in growing steps up to 1 ms
//! (an idle process costs little CPU; a busy one makes no system call
//! per message). The reader also bumps the slot's liveness counter:
//! an appliance closes the channel of a process whose counter stalls.
//!
//! Regions are carved by a bump allocator: addresses are never reused
//! (like every registered address space), so space of unregistered
//! regions comes back only when the process detaches.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fractos_shm::{Mapping, PAGE};
use fractos_transport::ring::RingEndpoint;
use fractos_transport::slot::{SlotClient, SlotLayout, SLOT_ADDR_BASE};

use crate::error::SdkError;
use crate::memory::{Backing, Carver};
use crate::process::{AttachOptions, ByteStream, Process};
use crate::slot::lock;

/// Capacity of each of the slot's rings.
pub const SLOT_RING_CAPACITY: u64 = 256 * 1024;

/// Polls before sleeping: spin this long, then sleep in short steps
/// (each a timer wake-up, ~50-60 µs with Linux's default timer slack)
/// until [`SHORT_SLEEPS_FOR`], then in growing steps up to [`MAX_SLEEP`].
/// No `yield`: on a machine whose cores are busy (a TCG vCPU), a yielding
/// thread waits a whole time slice.
const SPIN_FOR: Duration = Duration::from_micros(20);
const SHORT_SLEEPS_FOR: Duration = Duration::from_millis(5);
const MAX_SLEEP: Duration = Duration::from_millis(1);

/// Waits a little, more the longer nothing happened since `idle_since`.
fn backoff(idle_since: Instant) {
    let idle = idle_since.elapsed();
    if idle < SPIN_FOR {
        std::hint::spin_loop();
    } else if idle < SHORT_SLEEPS_FOR {
        std::thread::sleep(Duration::from_micros(1));
    } else {
        std::thread::sleep((idle / 16).min(MAX_SLEEP));
    }
}

struct SlotInner {
    ring: Mutex<RingEndpoint<Mapping>>,
    client: SlotClient<Mapping>,
    shut: AtomicBool,
    read_timeout: Mutex<Option<Duration>>,
    write_timeout: Duration,
}

impl SlotInner {
    fn close(&self) {
        if !self.shut.swap(true, Ordering::AcqRel) {
            lock(&self.ring).close();
        }
    }
}

impl Drop for SlotInner {
    fn drop(&mut self) {
        self.close();
    }
}

/// The slot's rings as a [`ByteStream`] for the SDK's reader and writers.
struct SlotStream {
    inner: Arc<SlotInner>,
    buf: Vec<u8>,
}

impl Read for SlotStream {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let started = Instant::now();
        let timeout = *lock(&self.inner.read_timeout);
        loop {
            if self.inner.shut.load(Ordering::Acquire) {
                return Ok(0);
            }
            self.inner.client.heartbeat();
            {
                let mut ring = lock(&self.inner.ring);
                self.buf.clear();
                let n = ring
                    .recv(&mut self.buf, out.len())
                    .map_err(io::Error::other)?;
                if n > 0 {
                    out[..n].copy_from_slice(&self.buf[..n]);
                    return Ok(n);
                }
                if ring.peer_closed() && ring.available().map_err(io::Error::other)? == 0 {
                    return Ok(0);
                }
            }
            if timeout.is_some_and(|t| started.elapsed() >= t) {
                return Err(io::ErrorKind::TimedOut.into());
            }
            backoff(started);
        }
    }
}

impl Write for SlotStream {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        let started = Instant::now();
        loop {
            if self.inner.shut.load(Ordering::Acquire) {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            {
                let mut ring = lock(&self.inner.ring);
                if ring.peer_closed() {
                    return Err(io::ErrorKind::BrokenPipe.into());
                }
                let n = ring.send(data).map_err(io::Error::other)?;
                if n > 0 {
                    return Ok(n);
                }
            }
            if started.elapsed() >= self.inner.write_timeout {
                return Err(io::ErrorKind::TimedOut.into());
            }
            backoff(started);
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ByteStream for SlotStream {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(SlotStream {
            inner: self.inner.clone(),
            buf: Vec::new(),
        })
    }

    fn shutdown(&self) -> io::Result<()> {
        self.inner.close();
        Ok(())
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        *lock(&self.inner.read_timeout) = timeout;
        Ok(())
    }
}

/// Carves regions out of the slot's memory area, never reusing space.
struct SlotCarver {
    mapping: Mapping,
    layout: SlotLayout,
    /// Next free byte of the memory area.
    next: Mutex<usize>,
}

impl Carver for SlotCarver {
    fn carve(&self, len: u64) -> Result<(Backing, u64), SdkError> {
        let full = || {
            SdkError::invalid(format!(
                "the slot's memory area ({} bytes) has no room for a region of {len} bytes",
                self.layout.mem_len
            ))
        };
        let n = usize::try_from(len).map_err(|_| full())?;
        let mut next = lock(&self.next);
        let at = *next;
        let end = at.checked_add(n).filter(|&e| e <= self.layout.mem_len);
        let end = end.ok_or_else(full)?;
        // A page of space between regions, as in every address space.
        *next = end.div_ceil(PAGE) * PAGE + PAGE;
        let backing = Backing::Window {
            mapping: self.mapping.clone(),
            offset: self.layout.mem + at,
        };
        Ok((backing, SLOT_ADDR_BASE + at as u64))
    }
}

impl Process {
    /// Attaches as `name` with `token` through the appliance's
    /// shared-memory slot at `path` (a file listed under `shm_slots` in
    /// `fractos up`'s `cluster.json`): maps the file, echoes the slot's
    /// nonce, initialises the rings, waits for the appliance to accept,
    /// then attaches over the rings as over TCP. Regions registered
    /// afterwards live in the slot, where the appliance reads and writes
    /// them directly.
    ///
    /// Errors: [`SdkError::Io`] if the file cannot be opened,
    /// [`SdkError::Slot`] if it is not a slot, is in use by another
    /// process, or the appliance refused the attach,
    /// [`SdkError::Timeout`] if the appliance did not look at the slot
    /// within [`AttachOptions::connect_timeout`], and then everything
    /// [`Process::attach`] can return.
    pub fn attach_slot(
        path: impl AsRef<Path>,
        name: &str,
        token: [u8; 32],
        options: AttachOptions,
    ) -> Result<Process, SdkError> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let slot_err = |source| SdkError::Slot {
            path: shown.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| SdkError::io("opening the shared-memory slot", e))?;
        let len = file
            .metadata()
            .map_err(|e| SdkError::io("reading the size of the shared-memory slot", e))?
            .len();
        let len = usize::try_from(len).map_err(|_| SdkError::invalid("slot file too large"))?;
        // The slot file is the appliance's (QEMU holds it at its full size
        // for the VM's life): nobody shrinks it under the mapping.
        let mapping = Mapping::open_trusted(file.into(), 0, len)?;
        let (client, ring) =
            SlotClient::begin(mapping.clone(), SLOT_RING_CAPACITY, |_| {}).map_err(slot_err)?;
        // A timeout too large for the clock is no deadline.
        let deadline = Instant::now().checked_add(options.connect_timeout);
        let started = Instant::now();
        loop {
            client.heartbeat();
            match client.outcome() {
                Some(Ok(())) => break,
                Some(Err(e)) => return Err(slot_err(e)),
                None if deadline.is_some_and(|d| Instant::now() >= d) => {
                    return Err(SdkError::Timeout {
                        what: "the appliance to accept the attach through its slot",
                        after: options.connect_timeout,
                    })
                }
                None => backoff(started),
            }
        }
        let layout = client.layout();
        let stream = SlotStream {
            inner: Arc::new(SlotInner {
                ring: Mutex::new(ring),
                client,
                shut: AtomicBool::new(false),
                read_timeout: Mutex::new(None),
                write_timeout: options.write_timeout,
            }),
            buf: Vec::new(),
        };
        let p = Process::attach_stream(stream, name, token, options)?;
        p.memory().set_carver(Arc::new(SlotCarver {
            mapping,
            layout,
            next: Mutex::new(0),
        }));
        Ok(p)
    }
}
