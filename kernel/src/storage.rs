//! The appliance's built-in storage service: a FractOS process that lives
//! inside the unikernel and serves a block device (the NVMe namespace)
//! under the same capability rules as any other process.
//!
//! It speaks the process protocol to the controller core through an
//! in-memory channel ([`LocalProcess`]): it attaches with a token like an
//! adaptor, makes a Memory capability over its DMA pool and two Requests,
//! publishes them, and serves invocations:
//!
//! * **read** — immediates end with `(offset: u64, len: u64)` (bytes,
//!   little-endian, any alignment); capabilities `[dst Memory (WRITE),
//!   done Request?, err Request?]`. The covering blocks are read by DMA into
//!   a window of the pool, then that window is copied straight into `dst`
//!   with `done` as the copy's completion Request (or, into a slot
//!   process's memory, DMA'd into `dst` itself and `done` invoked; see
//!   *Data path*). This is the reference
//!   storage adaptor's read protocol, so the pipeline can use it unchanged.
//! * **write** — same immediates; capabilities `[src Memory (READ), done?,
//!   err?]`. `src` is copied into a window of the pool (after a device read
//!   of partial first or last blocks), written to the device and flushed;
//!   then `done` is invoked. `src` must not be longer than `len` (the whole
//!   window is copied; a longer one fails the copy with `SizeMismatch` and
//!   nothing is written).
//!
//! Failures invoke `err` (when given) with immediates `[status u8, code
//! u16 LE]` ([`StorageStatus`]; `code` is the wire [`ErrorCode`] of a
//! failed copy, else 0), so a client gets a typed answer instead of a
//! timeout: a range past the end of the device is `OutOfRange`, a `dst`
//! without the WRITE right fails the copy with `MissingRight`.
//!
//! # Data path
//!
//! Nothing waits for the device inside the event loop. Requests are
//! admitted in arrival order as long as the pool has room for their
//! covering blocks ([`BUFFER_ADDR`]-relative windows, page-granular); each
//! one is cut into commands of at most the device's per-command limit
//! ([`fractos_nvme::split_transfer`]) and submitted with
//! [`BlockDevice::submit`]; [`LocalProcess::tick`], called on every turn of
//! the event loop, reaps completions with [`BlockDevice::poll`] and moves
//! each request on (diminish its window, copy, answer). So up to
//! [`BlockDevice::queue_depth`] commands (at most [`MAX_COMMANDS`]) are in
//! flight while the controller moves earlier requests' bytes over the
//! network. The device writes the window the copy is then served from
//! (`MemRead` of the pool): the only CPU copy is the one into the copy
//! frame, which has to be built anyway. Writes run alone (no request is
//! admitted while one is active, and it waits for earlier ones), so
//! overlapping writes and reads keep their arrival order.
//!
//! The destination of a device transfer is a [`DmaTarget`]: a pool window,
//! or ([`DmaTarget::Phys`]) the memory of the reader's destination itself
//! when that is a process attached through a shared-memory slot: a read of
//! whole blocks into a dword-aligned window then skips the pool and the
//! copy. The controller core grants each such read ([`DeviceWrites`],
//! given to [`LocalProcess::tick_with`]) after validating the destination
//! capability like a copy's, and the grant is checked again before every
//! command; everything else (partial blocks, an odd address, a destination
//! that is not in a local slot) goes through the pool. Both paths' bytes
//! are counted (`fractos_storage_dma_bytes_total{path}`).
//!
//! The process protocol itself — attach, op ids, routing completions,
//! serving the controller's `MemRead`/`MemWrite` of the pool (out of window:
//! `MemoryFault`, as in the SDK), the invocation queue — is the sans-IO
//! [`fractos_process::Connection`]; this module is the storage logic on top
//! of it plus the [`LocalProcess`] wiring into the service.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;

pub use fractos_node::DeviceGrant;
use fractos_nvme::split_transfer;
use fractos_process::{Config, Connection, Event, Instant, Memory, OutOfWindow};
use fractos_wire::{
    CapInfo, ErrorCode, Handle, ObjectKind, ProcessMsg, Reply, Rights, FRAME_HEADER_LEN,
};
use log::{info, warn};

/// Handler tag of the read Request (the reference storage adaptor's).
pub const TAG_READ: u64 = 0x5354_0001;
/// Handler tag of the write Request.
pub const TAG_WRITE: u64 = 0x5354_0002;
/// Address of the DMA pool in the process's registered memory.
pub const BUFFER_ADDR: u64 = 0x1000_0000;
/// Most device commands the service keeps in flight (fewer if the device's
/// queue is shorter).
pub const MAX_COMMANDS: usize = 32;
/// Largest request: its covering blocks, in bytes (and at most the pool).
pub const MAX_REQUEST: usize = 2 << 20;
/// Granule of pool windows.
const GRANULE: usize = 4096;

/// Where the bytes of one device transfer land (reads) or come from
/// (writes).
///
/// This is the seam for DMA into memory other than the service's own pool
/// (issue 12 point 5): the target is any guest-physical range, so a later
/// change can point a read at a local process's shared-memory slot with
/// [`DmaTarget::Phys`] and fall back to a pool window (then a copy) only
/// where alignment forbids it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaTarget {
    /// This many bytes into the device's pool (checked by the device).
    Pool(usize),
    /// Guest-physical address of physically contiguous memory, dword
    /// aligned (see [`BlockDevice::submit`]'s safety contract).
    Phys(u64),
}

/// One device command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Io {
    /// Read `blocks` blocks at `lba` into `to`.
    Read {
        /// First block.
        lba: u64,
        /// Blocks, at most [`BlockDevice::max_blocks_per_command`].
        blocks: u32,
        /// Destination.
        to: DmaTarget,
    },
    /// Write `blocks` blocks at `lba` from `from`.
    Write {
        /// First block.
        lba: u64,
        /// Blocks, at most [`BlockDevice::max_blocks_per_command`].
        blocks: u32,
        /// Source.
        from: DmaTarget,
    },
    /// Make written blocks durable.
    Flush,
}

/// Why a device command failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// No room in the device's queue now; submit again after a completion.
    #[error("device queue full")]
    Busy,
    /// The target lies outside the pool (or cannot be reached by DMA).
    #[error("transfer target outside the DMA pool")]
    BadTarget,
    /// The command's outcome is unknown (it timed out, or the controller
    /// failed): the device may still access its memory, which must never
    /// be reused.
    #[error("command abandoned: {0}")]
    Abandoned(String),
    /// The device failed the command; its memory is free again.
    #[error("device error: {0}")]
    Failed(String),
}

/// A completed device command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoDone {
    /// The token given to [`BlockDevice::submit`].
    pub token: u64,
    /// Its outcome.
    pub result: Result<(), DeviceError>,
}

/// A block device with a DMA pool and a queue of commands: what the
/// storage service serves.
pub trait BlockDevice {
    /// Bytes per block.
    fn block_size(&self) -> u32;
    /// Number of blocks.
    fn blocks(&self) -> u64;
    /// Most blocks one command moves (`MDTS`, PRP list limits).
    fn max_blocks_per_command(&self) -> u32;
    /// Commands that may be in flight at once.
    fn queue_depth(&self) -> usize;
    /// Bytes of the DMA pool (a whole number of pages).
    fn pool_len(&self) -> usize;
    /// Copies pool bytes at `offset` into `out` (in range: the caller
    /// checks).
    fn pool_read(&self, offset: usize, out: &mut [u8]);
    /// Copies `data` into the pool at `offset` (in range: the caller
    /// checks).
    fn pool_write(&mut self, offset: usize, data: &[u8]);
    /// Submits `io`; its completion comes back from [`poll`](Self::poll)
    /// with `token`. [`DeviceError::Busy`] when the queue is full (nothing
    /// submitted).
    ///
    /// # Safety
    ///
    /// A [`DmaTarget::Phys`] range (the transfer's length from its address)
    /// must be memory the device may access, that nothing else uses and that
    /// stays allocated until the command's completion has been polled (or,
    /// for [`DeviceError::Abandoned`], forever). Pool targets are checked by
    /// the device; the caller gives each in-flight command its own bytes.
    unsafe fn submit(&mut self, io: Io, token: u64) -> Result<(), DeviceError>;
    /// The next completed command, if any. Never blocks.
    fn poll(&mut self) -> Option<IoDone>;
}

/// A process living inside the appliance, wired to the controller core
/// by the service instead of a TCP connection.
pub trait LocalProcess {
    /// A message body (no length prefix) from the controller.
    fn on_message(&mut self, body: &[u8]);
    /// The next message body (no length prefix) for the controller.
    fn poll_message(&mut self) -> Option<Vec<u8>>;
    /// Its name, for logs.
    fn name(&self) -> &str;
    /// Called on every turn of the event loop with the time, for retries
    /// and device completions.
    fn tick(&mut self, _now_ns: u64) {}
    /// [`tick`](Self::tick), with device writes into other processes'
    /// memory available (the service calls this one).
    fn tick_with(&mut self, now_ns: u64, writes: &mut dyn DeviceWrites) {
        let _ = writes;
        self.tick(now_ns);
    }
    /// Prometheus lines of its own (each ending in a newline), if any.
    fn metrics_text(&self, _node: u32) -> String {
        String::new()
    }
    /// Whether it waits for its device (commands in flight): the event
    /// loop then keeps polling instead of idling.
    fn is_busy(&self) -> bool {
        false
    }
    /// Whether it has given up its channel (the service then closes it,
    /// and the controller revokes what it owned).
    fn is_closed(&self) -> bool {
        false
    }
}

/// Device writes straight into another process's memory: DMA into the
/// shared-memory slot of a process attached through one. The controller
/// core grants each after validating the destination capability (live,
/// Memory, WRITE, long enough, owned by a process whose memory devices
/// reach) and holds revokes of it until the grant ends; see
/// `fractos_node::Node::device_write_begin`.
pub trait DeviceWrites {
    /// Grants the device writes of `len` bytes at the start of the window
    /// of `handle`, a Memory capability this process holds.
    fn begin(&mut self, handle: Handle, len: u64) -> Result<DeviceGrant, ErrorCode>;
    /// Whether grant `id` may go on (checked before every command).
    fn valid(&mut self, id: u64) -> bool;
    /// Grant `id` ended; `ok`: every byte was written. `Err` (e.g.
    /// `Revoked`) means the bytes must not be reported as delivered.
    fn end(&mut self, id: u64, ok: bool) -> Result<(), ErrorCode>;
}

/// No device writes: every grant is refused (reads go through the pool).
pub struct NoDeviceWrites;

impl DeviceWrites for NoDeviceWrites {
    fn begin(&mut self, _: Handle, _: u64) -> Result<DeviceGrant, ErrorCode> {
        Err(ErrorCode::InvalidArgument)
    }
    fn valid(&mut self, _: u64) -> bool {
        false
    }
    fn end(&mut self, _: u64, _: bool) -> Result<(), ErrorCode> {
        Err(ErrorCode::InvalidArgument)
    }
}

/// Why a storage request failed, the first immediate of the `err`
/// invocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum StorageStatus {
    /// The byte range ends past the device.
    OutOfRange = 1,
    /// Malformed request: immediates, capabilities, or a length of 0 or
    /// above [`MAX_REQUEST`] (or the pool).
    BadRequest = 2,
    /// The device failed the I/O.
    Device = 3,
    /// The copy failed; the wire error code follows.
    Copy = 4,
}

/// Counters of the storage service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StorageStats {
    /// Reads served.
    pub reads: u64,
    /// Writes served.
    pub writes: u64,
    /// Bytes read from the device into copies.
    pub bytes_read: u64,
    /// Bytes written to the device.
    pub bytes_written: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Device commands submitted (reads, writes, flushes).
    pub commands: u64,
    /// Most device commands in flight at once.
    pub in_flight_max: u64,
    /// Requests whose device transfer used the very memory the copy is
    /// served from (reads) or lands in (whole-block writes): no CPU copy
    /// in the service.
    pub direct: u64,
    /// Requests that merged bytes in a staging window first (writes of
    /// partial blocks: the blocks are read, the new bytes copied over).
    pub staged: u64,
    /// Reads the device wrote straight into the destination's memory (a
    /// shared-memory slot): no pool window, no copy.
    pub slot_reads: u64,
    /// Bytes the device read into destinations' memory directly.
    pub dma_direct_bytes: u64,
    /// Bytes the device read into the pool for reads (then copied: the
    /// destination is not reachable by DMA, or the request is not
    /// block-aligned).
    pub dma_staged_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Attaching,
    Setup,
    Ready,
    Failed,
}

/// Delay before a publish that found the name's home controller
/// unreachable (links still coming up) is retried.
const PUBLISH_RETRY_NS: u64 = 200_000_000;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    BufferCap,
    RequestCap(u64),
    Publish(String, Handle),
    /// The window of job `.0`.
    Diminish(u64),
    /// The copy of job `.0`.
    Copy(u64),
}

/// Where an admitted job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Device reads of the covering blocks into the window (reads, and
    /// writes of partial blocks).
    Fetch,
    /// Waiting for the window's Memory capability.
    Diminish,
    /// The FractOS copy runs.
    Copy,
    /// Device writes from the window.
    Store,
    /// The flush after the writes.
    Flush,
    /// A read straight into the destination's memory is over (or failed):
    /// its grant ends next (see [`DeviceWrites::end`]).
    Settle,
}

/// One invocation being served.
#[derive(Clone, Debug)]
struct Job {
    tag: u64,
    offset: u64,
    len: u64,
    target: Handle,
    done: Option<Handle>,
    err: Option<Handle>,
    received: Vec<Handle>,
    /// The diminished window of the pool.
    part: Option<Handle>,
    /// Covering blocks: first, count, offset of the range in the first.
    lba: u64,
    count: u64,
    skew: u64,
    /// The pool window (bytes from the pool's start, length).
    window: (usize, usize),
    stage: Stage,
    /// Blocks of this stage submitted (1 once a flush is).
    next: u64,
    /// Commands of this job in flight.
    outstanding: u32,
    /// The first device failure; the job ends once nothing is in flight.
    error: Option<DeviceError>,
    /// A command was abandoned: the window is never reused.
    leak: bool,
    /// Reads: whether the route (pool or destination) is chosen yet.
    routed: bool,
    /// Reads into the destination's memory: the grant.
    grant: Option<DeviceGrant>,
    /// The grant stopped being valid before every command was submitted.
    revoked: bool,
}

impl Job {
    /// Units of the current stage to submit: blocks, or 1 flush.
    fn todo(&self) -> u64 {
        match self.stage {
            Stage::Fetch | Stage::Store => self.count,
            Stage::Flush => 1,
            Stage::Diminish | Stage::Copy | Stage::Settle => 0,
        }
    }

    fn partial(&self, bs: u64) -> bool {
        self.skew != 0 || (self.offset + self.len) % bs != 0
    }
}

/// Page-granular first-fit allocation of pool windows.
#[derive(Debug)]
struct Windows {
    used: Vec<bool>,
}

impl Windows {
    fn new(pool_len: usize) -> Self {
        Windows {
            used: alloc::vec![false; pool_len / GRANULE],
        }
    }

    /// A free window of `bytes` (rounded up to granules): its offset.
    fn alloc(&mut self, bytes: usize) -> Option<usize> {
        let n = bytes.div_ceil(GRANULE).max(1);
        let mut run = 0;
        for i in 0..self.used.len() {
            run = if self.used[i] { 0 } else { run + 1 };
            if run == n {
                let first = i + 1 - n;
                self.used[first..=i].fill(true);
                return Some(first * GRANULE);
            }
        }
        None
    }

    fn free(&mut self, offset: usize, bytes: usize) {
        let first = offset / GRANULE;
        let end = (first + bytes.div_ceil(GRANULE).max(1)).min(self.used.len());
        if let Some(s) = self.used.get_mut(first..end) {
            s.fill(false);
        }
    }
}

/// The storage service process. See the module doc.
pub struct StorageProcess<B: BlockDevice> {
    dev: B,
    name: String,
    names: Vec<(u64, String)>,
    phase: Phase,
    /// The protocol: op ids, completion routing, memory serving.
    conn: Connection<Op>,
    buffer_cap: Option<Handle>,
    setup_left: usize,
    /// Requests not admitted yet, in arrival order.
    queue: VecDeque<Job>,
    /// Admitted requests by id.
    active: BTreeMap<u64, Job>,
    next_id: u64,
    windows: Windows,
    /// Device commands in flight.
    in_flight: usize,
    stats: StorageStats,
    now_ns: u64,
    /// Publishes to retry: (name, Request, when).
    retries: Vec<(String, Handle, u64)>,
    /// Jobs whose device-write grant ends next (see [`Stage::Settle`]).
    settles: Vec<u64>,
    /// Sums of the times commands were submitted and reaped: with the
    /// commands in flight, the device's busy time ([`Self::device_ns`]).
    submitted_ns: u128,
    completed_ns: u128,
}

/// The pool as the controller reaches it: registered memory
/// `[BUFFER_ADDR, BUFFER_ADDR + pool_len)`.
struct Staging<'a, B>(&'a mut B);

impl<B: BlockDevice> Memory for Staging<'_, B> {
    fn read(&mut self, addr: u64, out: &mut [u8]) -> Result<(), OutOfWindow> {
        let len = self.0.pool_len() as u64;
        let off = OutOfWindow::check(BUFFER_ADDR, len, addr, out.len() as u64)?;
        self.0.pool_read(off as usize, out);
        Ok(())
    }

    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), OutOfWindow> {
        let len = self.0.pool_len() as u64;
        let off = OutOfWindow::check(BUFFER_ADDR, len, addr, data.len() as u64)?;
        self.0.pool_write(off as usize, data);
        Ok(())
    }
}

impl<B: BlockDevice> StorageProcess<B> {
    /// A storage process named `name` attaching with `token`, serving
    /// `dev`, publishing its read Request under every name of `read_names`
    /// and its write Request under `write_names`.
    pub fn new(
        dev: B,
        name: &str,
        token: [u8; 32],
        read_names: &[&str],
        write_names: &[&str],
    ) -> Self {
        let names = read_names
            .iter()
            .map(|n| (TAG_READ, String::from(*n)))
            .chain(write_names.iter().map(|n| (TAG_WRITE, String::from(*n))))
            .collect();
        // The controller answers the attach synchronously: no deadline.
        let config = Config::default().attach_timeout(None);
        let (conn, phase) = match Connection::new(name.as_bytes(), token, config, Instant(0)) {
            Ok(conn) => (conn, Phase::Attaching),
            Err(e) => {
                warn!("storage: {name}: cannot attach: {e}");
                let mut closed = Connection::new(b"", token, config, Instant(0))
                    .expect("an empty name is short enough");
                closed.close();
                (closed, Phase::Failed)
            }
        };
        let windows = Windows::new(dev.pool_len());
        StorageProcess {
            dev,
            name: String::from(name),
            names,
            phase,
            conn,
            buffer_cap: None,
            setup_left: 0,
            queue: VecDeque::new(),
            active: BTreeMap::new(),
            next_id: 1,
            windows,
            in_flight: 0,
            stats: StorageStats::default(),
            now_ns: 0,
            retries: Vec::new(),
            settles: Vec::new(),
            submitted_ns: 0,
            completed_ns: 0,
        }
    }

    /// Nanoseconds device commands have spent in flight (submitted, not yet
    /// reaped), summed over commands, up to the last tick.
    pub fn device_ns(&self) -> u128 {
        let now = u128::from(self.now_ns);
        (self.completed_ns + self.in_flight as u128 * now).saturating_sub(self.submitted_ns)
    }

    /// Counters.
    pub fn stats(&self) -> StorageStats {
        self.stats
    }

    /// Whether it is attached, set up and serving.
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// The device.
    pub fn device(&self) -> &B {
        &self.dev
    }

    /// Starts an operation whose answer comes back to `on_completion`
    /// with `kind`.
    fn send(&mut self, kind: Op, make: impl FnOnce(u64) -> ProcessMsg) {
        if let Err(e) = self.conn.start(kind, make) {
            warn!("storage: {}: not sent: {e}", self.name);
        }
    }

    /// Starts an operation whose answer nobody needs (drops, `done` and
    /// `err` invocations).
    fn send_detached(&mut self, make: impl FnOnce(u64) -> ProcessMsg) {
        if let Err(e) = self.conn.start_detached(make) {
            warn!("storage: {}: not sent: {e}", self.name);
        }
    }

    fn publish(&mut self, name: String, cap: Handle) {
        let bytes = name.clone().into_bytes();
        self.send(Op::Publish(name, cap), |op| ProcessMsg::Publish {
            op,
            name: bytes,
            cap,
        });
    }

    fn start_setup(&mut self) {
        self.phase = Phase::Setup;
        let len = self.dev.pool_len() as u64;
        self.setup_left = 3;
        self.send(Op::BufferCap, |op| ProcessMsg::MemoryCreate {
            op,
            addr: BUFFER_ADDR,
            len,
            rights: Rights::READ_WRITE,
        });
        for tag in [TAG_READ, TAG_WRITE] {
            self.send(Op::RequestCap(tag), |op| ProcessMsg::RequestCreate {
                op,
                tag,
                imms: Vec::new(),
                caps: Vec::new(),
            });
        }
    }

    fn setup_step_done(&mut self) {
        self.setup_left = self.setup_left.saturating_sub(1);
        if self.setup_left == 0 && self.phase == Phase::Setup {
            self.phase = Phase::Ready;
            info!(
                "storage: {} ready: {} blocks of {} bytes, DMA pool {} KiB, up to {} commands in flight of at most {} blocks",
                self.name,
                self.dev.blocks(),
                self.dev.block_size(),
                self.dev.pool_len() / 1024,
                self.max_in_flight(),
                self.dev.max_blocks_per_command(),
            );
            self.advance();
        }
    }

    fn on_completion(&mut self, kind: Op, result: Result<Reply, ErrorCode>) {
        match (kind, result) {
            (Op::BufferCap, Ok(Reply::Cap { handle, .. })) => {
                self.buffer_cap = Some(handle);
                self.setup_step_done();
            }
            (Op::RequestCap(tag), Ok(Reply::Cap { handle, .. })) => {
                let names: Vec<String> = self
                    .names
                    .iter()
                    .filter(|(t, _)| *t == tag)
                    .map(|(_, n)| n.clone())
                    .collect();
                self.setup_left += names.len();
                for n in names {
                    self.publish(n, handle);
                }
                self.setup_step_done();
            }
            (Op::Publish(..), Ok(_)) => self.setup_step_done(),
            (Op::Publish(name, cap), Err(ErrorCode::PeerUnreachable | ErrorCode::Timeout)) => {
                // The name's home is not linked yet: try again shortly.
                self.retries
                    .push((name, cap, self.now_ns + PUBLISH_RETRY_NS));
            }
            (Op::BufferCap | Op::RequestCap(_) | Op::Publish(..), r) => {
                warn!("storage: {}: setup failed: {r:?}", self.name);
                self.phase = Phase::Failed;
            }
            (Op::Diminish(id), Ok(Reply::Cap { handle, .. })) => self.on_part(id, handle),
            (Op::Diminish(id), r) => {
                warn!("storage: {}: diminish failed: {r:?}", self.name);
                self.finish_failed(id, StorageStatus::Device, None);
            }
            (Op::Copy(id), r) => self.on_copied(id, r.err()),
        }
        self.advance();
    }

    fn on_invocation(&mut self, tag: u64, imms: &[u8], caps: &[(Handle, CapInfo)]) {
        let received: Vec<Handle> = caps.iter().map(|c| c.0).collect();
        let request = |k: usize| {
            caps.get(k)
                .filter(|c| c.1.kind == ObjectKind::Request)
                .map(|c| c.0)
        };
        let n = imms.len();
        let at = |i: usize| {
            imms.get(i..i + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
        };
        let range = n.checked_sub(16).and_then(|s| Some((at(s)?, at(s + 8)?)));
        let target = caps
            .first()
            .filter(|c| c.1.kind == ObjectKind::Memory)
            .map(|c| c.0);
        let mut job = Job {
            tag,
            offset: range.map_or(0, |r| r.0),
            len: range.map_or(0, |r| r.1),
            target: target.unwrap_or(Handle(0)),
            done: request(1),
            err: request(2),
            received,
            part: None,
            lba: 0,
            count: 0,
            skew: 0,
            window: (0, 0),
            stage: Stage::Fetch,
            next: 0,
            outstanding: 0,
            error: None,
            leak: false,
            routed: tag != TAG_READ,
            grant: None,
            revoked: false,
        };
        if range.is_none() || target.is_none() || !matches!(tag, TAG_READ | TAG_WRITE) {
            // Malformed: answered at once (it needs no buffer).
            self.answer_error(&job, StorageStatus::BadRequest, None);
            return;
        }
        match self.covering(&job) {
            Ok((lba, count, skew)) => {
                (job.lba, job.count, job.skew) = (lba, count, skew);
                // Only whole blocks may go straight into the destination.
                let bs = u64::from(self.dev.block_size().max(1));
                job.routed |= job.partial(bs);
            }
            Err(status) => {
                self.answer_error(&job, status, None);
                return;
            }
        }
        self.queue.push_back(job);
        self.advance();
    }

    /// Counts a failed request, invokes its `err` Request (if any) with
    /// `[status, code u16 LE]` and drops its handles.
    fn answer_error(&mut self, job: &Job, status: StorageStatus, code: Option<ErrorCode>) {
        self.stats.errors += 1;
        if let Some(err) = job.err {
            let mut imms = alloc::vec![status as u8];
            imms.extend_from_slice(&code.map_or(0, |c| c as u16).to_le_bytes());
            self.send_detached(|op| ProcessMsg::Invoke {
                op,
                cap: err,
                imms,
                caps: Vec::new(),
            });
        }
        self.release(job);
    }

    /// Invokes the job's `done` Request, if it has one.
    fn invoke_done(&mut self, job: &Job) {
        if let Some(done) = job.done {
            self.send_detached(|op| ProcessMsg::Invoke {
                op,
                cap: done,
                imms: Vec::new(),
                caps: Vec::new(),
            });
        }
    }

    /// Drops every handle the invocation brought (and the window of the
    /// pool).
    fn release(&mut self, job: &Job) {
        for &h in job.received.iter().chain(job.part.iter()) {
            self.send_detached(|op| ProcessMsg::Drop { op, cap: h });
        }
    }

    /// Ends admitted job `id` with an error (nothing of it in flight).
    fn finish_failed(&mut self, id: u64, status: StorageStatus, code: Option<ErrorCode>) {
        if let Some(job) = self.active.remove(&id) {
            self.free_window(&job);
            self.answer_error(&job, status, code);
        }
    }

    fn free_window(&mut self, job: &Job) {
        if job.grant.is_some() {
            // It had no pool window.
        } else if job.leak {
            warn!(
                "storage: {}: {} KiB of the DMA pool at {:#x} withheld for good (the device may still write it)",
                self.name,
                job.window.1 / 1024,
                job.window.0
            );
        } else {
            self.windows.free(job.window.0, job.window.1);
        }
    }

    /// Most commands to keep in flight.
    fn max_in_flight(&self) -> usize {
        self.dev.queue_depth().clamp(1, MAX_COMMANDS)
    }

    /// Largest covering range of a request, in bytes.
    fn max_request(&self) -> u64 {
        MAX_REQUEST.min(self.dev.pool_len()) as u64
    }

    /// The blocks covering the job's byte range: (first lba, count, offset
    /// of the range in the first block).
    fn covering(&self, job: &Job) -> Result<(u64, u64, u64), StorageStatus> {
        let bs = u64::from(self.dev.block_size().max(1));
        let capacity = self.dev.blocks().saturating_mul(bs);
        let end = job
            .offset
            .checked_add(job.len)
            .ok_or(StorageStatus::OutOfRange)?;
        if job.len == 0 {
            return Err(StorageStatus::BadRequest);
        }
        if end > capacity {
            return Err(StorageStatus::OutOfRange);
        }
        let first = job.offset / bs;
        let count = end.div_ceil(bs) - first;
        if count.saturating_mul(bs) > self.max_request() {
            return Err(StorageStatus::BadRequest);
        }
        Ok((first, count, job.offset % bs))
    }

    /// Moves everything on that can move: admits queued requests, then
    /// submits device commands while the queue has room.
    fn advance(&mut self) {
        self.admit();
        self.submit_io(None);
    }

    /// Admits queued requests in order while their windows fit (a write
    /// only alone).
    fn admit(&mut self) {
        let bs = u64::from(self.dev.block_size().max(1));
        while self.phase == Phase::Ready {
            let Some(front) = self.queue.front() else {
                return;
            };
            let writing = self.active.values().any(|j| j.tag == TAG_WRITE);
            if writing || (front.tag == TAG_WRITE && !self.active.is_empty()) || !front.routed {
                return;
            }
            // At most `max_request()` (checked on arrival), so it fits in usize.
            let bytes = (front.count * bs) as usize;
            let at = if front.grant.is_some() {
                0
            } else {
                match self.windows.alloc(bytes) {
                    Some(at) => at,
                    None => return,
                }
            };
            let Some(mut job) = self.queue.pop_front() else {
                return;
            };
            job.window = (at, bytes);
            let id = self.next_id;
            self.next_id += 1;
            if job.tag == TAG_WRITE && job.partial(bs) {
                self.stats.staged += 1;
            } else {
                self.stats.direct += 1;
            }
            let fetch = job.tag == TAG_READ || job.partial(bs);
            job.stage = if fetch { Stage::Fetch } else { Stage::Diminish };
            self.active.insert(id, job);
            if !fetch {
                self.diminish(id);
            }
        }
    }

    /// Asks for the Memory capability of job `id`'s window.
    fn diminish(&mut self, id: u64) {
        let Some(job) = self.active.get_mut(&id) else {
            return;
        };
        job.stage = Stage::Diminish;
        let rights = if job.tag == TAG_READ {
            Rights::READ
        } else {
            Rights::WRITE
        };
        let (offset, len) = (job.window.0 as u64 + job.skew, job.len);
        let Some(buffer) = self.buffer_cap else {
            self.finish_failed(id, StorageStatus::Device, None);
            return;
        };
        self.send(Op::Diminish(id), |op| ProcessMsg::Diminish {
            op,
            cap: buffer,
            offset,
            len,
            rights,
        });
    }

    /// Submits device commands of admitted jobs, oldest first, while the
    /// device queue has room. Commands into a destination's memory only
    /// with `writes` (their grant is checked before each).
    fn submit_io(&mut self, mut writes: Option<&mut dyn DeviceWrites>) {
        let max = self.dev.max_blocks_per_command();
        let bs = u64::from(self.dev.block_size().max(1));
        let limit = self.max_in_flight();
        let mut ended = Vec::new();
        'jobs: for (&id, job) in self.active.iter_mut() {
            if job.grant.is_some() && writes.is_none() {
                continue;
            }
            while job.error.is_none() && job.next < job.todo() {
                if self.in_flight >= limit {
                    break 'jobs;
                }
                if let (Some(g), Some(w)) = (job.grant, writes.as_deref_mut()) {
                    if !w.valid(g.id) {
                        // Revoked (or its process left) meanwhile: nothing
                        // more is written; the job ends once its commands
                        // in flight have.
                        job.revoked = true;
                        job.error = Some(DeviceError::BadTarget);
                        if job.outstanding == 0 {
                            ended.push(id);
                        }
                        break;
                    }
                }
                let (io, units) = match job.stage {
                    Stage::Flush => (Io::Flush, 1),
                    stage => {
                        let Some(c) =
                            split_transfer(job.lba + job.next, job.count - job.next, max).next()
                        else {
                            break;
                        };
                        // Inside the window (or the granted destination):
                        // `next < count` blocks of it.
                        let at = match job.grant {
                            Some(g) => DmaTarget::Phys(g.address + job.next * bs),
                            None => DmaTarget::Pool(job.window.0 + (job.next * bs) as usize),
                        };
                        let io = if stage == Stage::Fetch {
                            Io::Read {
                                lba: c.lba,
                                blocks: c.blocks,
                                to: at,
                            }
                        } else {
                            Io::Write {
                                lba: c.lba,
                                blocks: c.blocks,
                                from: at,
                            }
                        };
                        (io, u64::from(c.blocks))
                    }
                };
                // SAFETY: a pool target is checked by the device; each
                // command gets its own blocks of a window that belongs to
                // this job alone until every one of its commands has
                // completed. A `Phys` target lies inside the `count` blocks
                // the controller granted (`DeviceWrites::begin`): memory of
                // the destination process that devices may write (its
                // slot's memory area, bounds-checked by the node), that no
                // Rust object occupies, whose capability was checked just
                // above, and which the node keeps from any other process
                // until the grant ends: only after every command of the job
                // has completed (never, if one was abandoned).
                match unsafe { self.dev.submit(io, id) } {
                    Ok(()) => {
                        job.next += units;
                        job.outstanding += 1;
                        self.in_flight += 1;
                        self.stats.commands += 1;
                        self.submitted_ns += u128::from(self.now_ns);
                        self.stats.in_flight_max =
                            self.stats.in_flight_max.max(self.in_flight as u64);
                    }
                    Err(DeviceError::Busy) => break 'jobs,
                    Err(e) => {
                        warn!("storage: {}: submit failed: {e}", self.name);
                        job.error = Some(e);
                        if job.outstanding == 0 {
                            ended.push(id);
                        }
                    }
                }
            }
        }
        for id in ended {
            self.stage_done(id);
        }
    }

    /// Takes the device's completions and moves their jobs on.
    fn reap(&mut self) {
        // Until the device has nothing more: a device that completes at
        // once answers what `advance` submitted in the same call.
        loop {
            if !self.reap_once() {
                return;
            }
            self.advance();
        }
    }

    /// Takes the completions the device has now; whether there were any.
    fn reap_once(&mut self) -> bool {
        let mut any = false;
        while let Some(d) = self.dev.poll() {
            any = true;
            self.in_flight = self.in_flight.saturating_sub(1);
            self.completed_ns += u128::from(self.now_ns);
            let Some(job) = self.active.get_mut(&d.token) else {
                warn!(
                    "storage: {}: completion for unknown request {}",
                    self.name, d.token
                );
                continue;
            };
            job.outstanding = job.outstanding.saturating_sub(1);
            if let Err(e) = d.result {
                job.leak |= matches!(e, DeviceError::Abandoned(_));
                job.error.get_or_insert(e);
            }
            if job.outstanding == 0 && (job.error.is_some() || job.next >= job.todo()) {
                self.stage_done(d.token);
            }
        }
        any
    }

    /// Every command of job `id`'s stage has completed (or one failed and
    /// nothing is in flight).
    fn stage_done(&mut self, id: u64) {
        let Some(job) = self.active.get_mut(&id) else {
            return;
        };
        if job.grant.is_some() {
            job.stage = Stage::Settle;
            self.settles.push(id);
            return;
        }
        if let Some(e) = &job.error {
            warn!(
                "storage: {}: {} of {} blocks at {} failed: {e}",
                self.name,
                if job.stage == Stage::Fetch {
                    "read"
                } else {
                    "write"
                },
                job.count,
                job.lba
            );
            self.finish_failed(id, StorageStatus::Device, None);
            return;
        }
        job.next = 0;
        match job.stage {
            Stage::Fetch => self.diminish(id),
            Stage::Store => job.stage = Stage::Flush,
            Stage::Flush => {
                let Some(job) = self.active.remove(&id) else {
                    return;
                };
                self.stats.writes += 1;
                self.stats.bytes_written += job.len;
                self.invoke_done(&job);
                self.free_window(&job);
                self.release(&job);
            }
            Stage::Diminish | Stage::Copy | Stage::Settle => {}
        }
    }

    /// The clock, the protocol's timeouts, publish retries and the
    /// device's completions.
    fn tick_inner(&mut self, now_ns: u64) {
        self.now_ns = now_ns;

        if let Err(e) = self.conn.handle_timeout(Instant(now_ns)) {
            warn!("storage: {}: {e}", self.name);
            self.phase = Phase::Failed;
        }
        if self.retries.iter().any(|r| r.2 <= now_ns) {
            let (due, later): (Vec<_>, Vec<_>) =
                self.retries.drain(..).partition(|r| r.2 <= now_ns);
            self.retries = later;
            for (name, cap, _) in due {
                self.publish(name, cap);
            }
        }
        self.reap();
    }

    /// Chooses the route of queued reads: straight into the destination's
    /// memory when the request covers whole blocks and the controller
    /// grants a device write there at a dword-aligned address (what an
    /// NVMe PRP entry needs); through a pool window otherwise.
    fn route(&mut self, writes: &mut dyn DeviceWrites) {
        let bs = u64::from(self.dev.block_size().max(1));
        for job in self.queue.iter_mut().filter(|j| !j.routed) {
            job.routed = true;
            if job.partial(bs) {
                continue;
            }
            match writes.begin(job.target, job.len) {
                Ok(g) if g.address % 4 == 0 => job.grant = Some(g),
                Ok(g) => {
                    let _ = writes.end(g.id, false);
                }
                Err(_) => {}
            }
        }
    }

    /// Ends the grants of reads into destinations' memory whose commands
    /// are all over, and answers them.
    fn settle(&mut self, writes: &mut dyn DeviceWrites) {
        for id in core::mem::take(&mut self.settles) {
            let Some(job) = self.active.remove(&id) else {
                continue;
            };
            let Some(g) = job.grant else {
                continue;
            };
            let bytes = job.count * u64::from(self.dev.block_size());
            if job.leak {
                // The device may still write there: the grant (and with it
                // the process's slot) is never released.
                warn!(
                    "storage: {}: a read into a process's memory was abandoned; its grant is kept",
                    self.name
                );
                self.answer_error(&job, StorageStatus::Device, None);
                continue;
            }
            let ended = writes.end(g.id, job.error.is_none());
            match (&job.error, ended) {
                (None, Ok(())) => {
                    self.stats.reads += 1;
                    self.stats.slot_reads += 1;
                    self.stats.bytes_read += job.len;
                    self.stats.dma_direct_bytes += bytes;
                    self.invoke_done(&job);
                    self.release(&job);
                }
                (Some(e), _) if !job.revoked => {
                    warn!(
                        "storage: {}: read of {} blocks at {} into a process's memory failed: {e}",
                        self.name, job.count, job.lba
                    );
                    self.answer_error(&job, StorageStatus::Device, None);
                }
                (_, ended) => {
                    let code = ended.err().unwrap_or(ErrorCode::Revoked);
                    self.answer_error(&job, StorageStatus::Copy, Some(code));
                }
            }
        }
    }

    fn on_part(&mut self, id: u64, part: Handle) {
        let Some(job) = self.active.get_mut(&id) else {
            // Nobody waits for it any more.
            self.send_detached(|op| ProcessMsg::Drop { op, cap: part });
            return;
        };
        job.part = Some(part);
        job.stage = Stage::Copy;
        let (tag, target, done) = (job.tag, job.target, job.done);
        if tag == TAG_READ {
            self.send(Op::Copy(id), |op| ProcessMsg::Copy {
                op,
                src: part,
                dst: target,
                completion: done,
            });
        } else {
            self.send(Op::Copy(id), |op| ProcessMsg::Copy {
                op,
                src: target,
                dst: part,
                completion: None,
            });
        }
    }

    fn on_copied(&mut self, id: u64, error: Option<ErrorCode>) {
        if let Some(code) = error {
            self.finish_failed(id, StorageStatus::Copy, Some(code));
            return;
        }
        let Some(job) = self.active.get_mut(&id) else {
            return;
        };
        if job.tag == TAG_WRITE {
            job.stage = Stage::Store;
            job.next = 0;
            return;
        }
        let Some(job) = self.active.remove(&id) else {
            return;
        };
        self.stats.reads += 1;
        self.stats.bytes_read += job.len;
        self.stats.dma_staged_bytes += job.window.1 as u64;
        self.free_window(&job);
        self.release(&job);
    }
}

impl<B: BlockDevice> LocalProcess for StorageProcess<B> {
    fn on_message(&mut self, body: &[u8]) {
        let now = Instant(self.now_ns);
        let handled = self
            .conn
            .handle_body(body, now, &mut Staging(&mut self.dev));
        match handled {
            Ok(()) => {}
            Err(e) if e.is_fatal() => {
                warn!("storage: {}: channel closed: {e}", self.name);
                self.phase = Phase::Failed;
            }
            Err(e) => warn!("storage: {}: {e}", self.name),
        }
        while let Some(event) = self.conn.poll_event() {
            match event {
                Event::Attached { .. } if self.phase == Phase::Attaching => self.start_setup(),
                Event::Attached { .. } | Event::Aborted { .. } => {}
                Event::Completion { data, result, .. } => self.on_completion(data, result),
            }
        }
        // Drained after every message, so the connection's bound is never
        // reached; jobs queue here until the pool has room.
        while let Some(inv) = self.conn.poll_invocation() {
            self.on_invocation(inv.tag, &inv.imms, &inv.caps);
        }
    }

    fn is_closed(&self) -> bool {
        self.phase == Phase::Failed
    }

    fn is_busy(&self) -> bool {
        self.in_flight > 0 || !self.settles.is_empty() || self.queue.iter().any(|j| !j.routed)
    }

    fn poll_message(&mut self) -> Option<Vec<u8>> {
        self.conn.poll_transmit().map(|mut frame| {
            frame.drain(..FRAME_HEADER_LEN);
            frame
        })
    }

    fn tick(&mut self, now_ns: u64) {
        self.tick_inner(now_ns);
        // Without device writes every read goes through the pool.
        self.route(&mut NoDeviceWrites);
        self.advance();
    }

    fn tick_with(&mut self, now_ns: u64, writes: &mut dyn DeviceWrites) {
        self.tick_inner(now_ns);
        self.route(writes);
        self.admit();
        self.submit_io(Some(writes));
        self.settle(writes);
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn metrics_text(&self, node: u32) -> String {
        let s = self.stats;
        alloc::format!(
            "# HELP fractos_storage_requests_total Requests the built-in storage service served, by kind.\n\
             # TYPE fractos_storage_requests_total counter\n\
             fractos_storage_requests_total{{node=\"{node}\",kind=\"read\"}} {}\n\
             fractos_storage_requests_total{{node=\"{node}\",kind=\"write\"}} {}\n\
             fractos_storage_requests_total{{node=\"{node}\",kind=\"error\"}} {}\n\
             # HELP fractos_storage_bytes_total Bytes the built-in storage service moved.\n\
             # TYPE fractos_storage_bytes_total counter\n\
             fractos_storage_bytes_total{{node=\"{node}\",direction=\"read\"}} {}\n\
             fractos_storage_bytes_total{{node=\"{node}\",direction=\"written\"}} {}\n\
             # HELP fractos_storage_commands_total Device commands the storage service submitted.\n\
             # TYPE fractos_storage_commands_total counter\n\
             fractos_storage_commands_total{{node=\"{node}\"}} {}\n\
             # HELP fractos_storage_in_flight Device commands in flight: now, and the most at once.\n\
             # TYPE fractos_storage_in_flight gauge\n\
             fractos_storage_in_flight{{node=\"{node}\",kind=\"now\"}} {}\n\
             fractos_storage_in_flight{{node=\"{node}\",kind=\"max\"}} {}\n\
             # HELP fractos_storage_transfers_total Requests by data path: direct (device DMA into the memory the copy uses) or staged (partial blocks merged first).\n\
             # TYPE fractos_storage_transfers_total counter\n\
             fractos_storage_transfers_total{{node=\"{node}\",path=\"direct\"}} {}\n\
             fractos_storage_transfers_total{{node=\"{node}\",path=\"staged\"}} {}\n\
             # HELP fractos_storage_device_seconds_total Time device commands spent in flight (submitted to completion reaped), summed over commands.\n\
             # TYPE fractos_storage_device_seconds_total counter\n\
             fractos_storage_device_seconds_total{{node=\"{node}\"}} {:.6}\n\
             # HELP fractos_storage_dma_bytes_total Bytes the device read for reads, by destination: direct (DMA straight into a shared-memory process's slot, no copy) or staged (DMA into the service's pool, then a copy).\n\
             # TYPE fractos_storage_dma_bytes_total counter\n\
             fractos_storage_dma_bytes_total{{node=\"{node}\",path=\"direct\"}} {}\n\
             fractos_storage_dma_bytes_total{{node=\"{node}\",path=\"staged\"}} {}\n",
            s.reads,
            s.writes,
            s.errors,
            s.bytes_read,
            s.bytes_written,
            s.commands,
            self.in_flight,
            s.in_flight_max,
            s.direct,
            s.staged,
            self.device_ns() as f64 / 1e9,
            s.dma_direct_bytes,
            s.dma_staged_bytes
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::Cell;
    use fractos_wire::{ControllerMsg, NodeId};

    const BS: usize = 512;

    /// A block device model: `disk` bytes, a DMA `pool`, commands queued
    /// until polled and completed last first (out of order) unless `hold`.
    struct Disk {
        disk: Vec<u8>,
        pool: Vec<u8>,
        max_blocks: u32,
        depth: usize,
        queued: Vec<(Io, u64)>,
        hold: Cell<bool>,
        /// Reads touching this block fail.
        bad_block: Option<u64>,
        most_queued: usize,
        /// A process's slot memory at guest-physical [`SLOT_BASE`]: where
        /// `Phys` reads land (when inside it).
        slot: Vec<u8>,
        /// Every `Phys` read completed: (address, bytes).
        phys_writes: Vec<(u64, u64)>,
    }

    const SLOT_BASE: u64 = 0x1_0000_0000;

    impl Disk {
        fn new(blocks: usize, pool: usize) -> Self {
            Disk {
                disk: (0..blocks * BS)
                    .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2])
                    .collect(),
                pool: vec![0; pool],
                max_blocks: 8,
                depth: 16,
                queued: Vec::new(),
                hold: Cell::new(false),
                bad_block: None,
                most_queued: 0,
                slot: vec![0; 64 * 1024],
                phys_writes: Vec::new(),
            }
        }

        fn pool_range(&self, t: DmaTarget, blocks: u32) -> Result<usize, DeviceError> {
            match t {
                DmaTarget::Pool(at) if at + blocks as usize * BS <= self.pool.len() => Ok(at),
                _ => Err(DeviceError::BadTarget),
            }
        }
    }

    impl BlockDevice for Disk {
        fn block_size(&self) -> u32 {
            BS as u32
        }
        fn blocks(&self) -> u64 {
            (self.disk.len() / BS) as u64
        }
        fn max_blocks_per_command(&self) -> u32 {
            self.max_blocks
        }
        fn queue_depth(&self) -> usize {
            self.depth
        }
        fn pool_len(&self) -> usize {
            self.pool.len()
        }
        fn pool_read(&self, offset: usize, out: &mut [u8]) {
            out.copy_from_slice(&self.pool[offset..offset + out.len()]);
        }
        fn pool_write(&mut self, offset: usize, data: &[u8]) {
            self.pool[offset..offset + data.len()].copy_from_slice(data);
        }
        unsafe fn submit(&mut self, io: Io, token: u64) -> Result<(), DeviceError> {
            if self.queued.len() >= self.depth {
                return Err(DeviceError::Busy);
            }
            match io {
                Io::Read {
                    to: DmaTarget::Phys(_),
                    ..
                } => 0,
                Io::Read { blocks, to, .. } => self.pool_range(to, blocks)?,
                Io::Write { blocks, from, .. } => self.pool_range(from, blocks)?,
                Io::Flush => 0,
            };
            assert!(
                !matches!(io, Io::Read { blocks, .. } | Io::Write { blocks, .. } if blocks > self.max_blocks),
                "{io:?} exceeds one command"
            );
            self.queued.push((io, token));
            self.most_queued = self.most_queued.max(self.queued.len());
            Ok(())
        }
        fn poll(&mut self) -> Option<IoDone> {
            if self.hold.get() {
                return None;
            }
            let (io, token) = self.queued.pop()?;
            let mut result = Ok(());
            match io {
                Io::Read {
                    lba,
                    blocks,
                    to: DmaTarget::Phys(a),
                } => {
                    let (d, n) = (lba as usize * BS, blocks as usize * BS);
                    self.phys_writes.push((a, n as u64));
                    // Outside the slot nothing is written; the tests check
                    // `phys_writes` against the grants.
                    if let Some(at) = a
                        .checked_sub(SLOT_BASE)
                        .and_then(|o| usize::try_from(o).ok())
                        .filter(|&o| o + n <= self.slot.len())
                    {
                        self.slot[at..at + n].copy_from_slice(&self.disk[d..d + n]);
                    }
                }
                Io::Read { lba, blocks, to } => {
                    let (d, n) = (lba as usize * BS, blocks as usize * BS);
                    let at = self.pool_range(to, blocks).expect("checked on submit");
                    if self
                        .bad_block
                        .is_some_and(|b| (lba..lba + u64::from(blocks)).contains(&b))
                    {
                        result = Err(DeviceError::Failed("unrecovered read".into()));
                    } else {
                        self.pool[at..at + n].copy_from_slice(&self.disk[d..d + n]);
                    }
                }
                Io::Write { lba, blocks, from } => {
                    let (d, n) = (lba as usize * BS, blocks as usize * BS);
                    let at = self.pool_range(from, blocks).expect("checked on submit");
                    self.disk[d..d + n].copy_from_slice(&self.pool[at..at + n]);
                }
                Io::Flush => {}
            }
            Some(IoDone { token, result })
        }
    }

    fn body(m: &ControllerMsg) -> Vec<u8> {
        let mut f = Vec::new();
        m.encode(&mut f);
        f.split_off(FRAME_HEADER_LEN)
    }

    fn sent(p: &mut StorageProcess<Disk>) -> Vec<ProcessMsg> {
        core::iter::from_fn(|| p.poll_message())
            .map(|b| ProcessMsg::decode(&b).unwrap())
            .collect()
    }

    const MEM: CapInfo = CapInfo {
        kind: ObjectKind::Memory,
        rights: Rights::READ_WRITE,
        len: 0,
    };
    const REQ: CapInfo = CapInfo {
        kind: ObjectKind::Request,
        rights: Rights::NONE,
        len: 0,
    };

    /// The controller's side, as far as the storage service needs it:
    /// answers setup, diminishes and copies (a read copy fetches the
    /// window with `MemRead`; a write copy stores `sources[src]` with
    /// `MemWrite`), records what reached each destination and which
    /// continuations were invoked.
    #[derive(Default)]
    struct Controller {
        next_handle: u32,
        /// Part handle → (offset in the pool, len).
        parts: BTreeMap<u32, (u64, u64)>,
        /// Destination handle → bytes copied into it.
        copied: BTreeMap<u32, Vec<u8>>,
        /// Source handle → bytes a write copies.
        sources: BTreeMap<u32, Vec<u8>>,
        /// Invoked Requests: (handle, immediates).
        invoked: Vec<(u32, Vec<u8>)>,
        /// Copies to answer: (op, error).
        copies: Vec<(u64, Option<ErrorCode>)>,
        xfer: u64,
    }

    impl Controller {
        fn reply(p: &mut StorageProcess<Disk>, op: u64, result: Result<Reply, ErrorCode>) {
            p.on_message(&body(&ControllerMsg::Completion { op, result }));
        }

        fn cap(&mut self) -> Reply {
            self.next_handle += 1;
            Reply::Cap {
                handle: Handle(1000 + self.next_handle),
                info: MEM,
            }
        }

        /// Answers everything the process sent, until it is quiet.
        fn run(&mut self, p: &mut StorageProcess<Disk>) {
            self.run_with(p, None)
        }

        /// [`run`](Self::run), with device writes into destinations'
        /// memory through `writes`.
        fn run_with(
            &mut self,
            p: &mut StorageProcess<Disk>,
            mut writes: Option<&mut dyn DeviceWrites>,
        ) {
            for _ in 0..1000 {
                match writes.as_deref_mut() {
                    Some(w) => p.tick_with(1, w),
                    None => p.tick(1),
                }
                let msgs = sent(p);
                if msgs.is_empty() && self.copies.is_empty() && p.device().queued.is_empty() {
                    return;
                }
                for m in msgs {
                    self.answer(p, m);
                }
                for (op, e) in core::mem::take(&mut self.copies) {
                    Self::reply(p, op, e.map_or(Ok(Reply::Done), Err));
                }
            }
            panic!("the storage process never went quiet");
        }

        fn answer(&mut self, p: &mut StorageProcess<Disk>, m: ProcessMsg) {
            match m {
                ProcessMsg::Attach { .. } => {
                    p.on_message(&body(&ControllerMsg::Attached { node: NodeId(1) }))
                }
                ProcessMsg::MemoryCreate { op, .. } | ProcessMsg::RequestCreate { op, .. } => {
                    let cap = self.cap();
                    Self::reply(p, op, Ok(cap));
                }
                ProcessMsg::Diminish {
                    op, offset, len, ..
                } => {
                    let cap = self.cap();
                    if let Reply::Cap { handle, .. } = cap {
                        self.parts.insert(handle.0, (offset, len));
                    }
                    Self::reply(p, op, Ok(cap));
                }
                ProcessMsg::Copy { op, src, dst, .. } => {
                    if let Some(&(offset, len)) = self.parts.get(&src.0) {
                        self.xfer += 1;
                        p.on_message(&body(&ControllerMsg::MemRead {
                            xfer: self.xfer,
                            addr: BUFFER_ADDR + offset,
                            len: len as u32,
                        }));
                        let data = sent(p)
                            .into_iter()
                            .find_map(|m| match m {
                                ProcessMsg::MemReadReply { result, .. } => result.ok(),
                                _ => None,
                            })
                            .expect("the window is served");
                        self.copied.insert(dst.0, data);
                    } else {
                        let (offset, _) = self.parts[&dst.0];
                        self.xfer += 1;
                        p.on_message(&body(&ControllerMsg::MemWrite {
                            xfer: self.xfer,
                            addr: BUFFER_ADDR + offset,
                            data: self.sources[&src.0].clone(),
                        }));
                        let _ = sent(p);
                    }
                    self.copies.push((op, None));
                }
                ProcessMsg::Invoke { cap, imms, .. } => self.invoked.push((cap.0, imms)),
                _ => {}
            }
        }
    }

    fn ready(disk: Disk) -> (StorageProcess<Disk>, Controller) {
        let mut p = StorageProcess::new(disk, "s", [0; 32], &[], &[]);
        let mut c = Controller::default();
        c.run(&mut p);
        assert!(p.is_ready());
        (p, c)
    }

    /// Invokes `tag` for `offset+len` with Memory `mem` and `done`/`err`
    /// Requests `mem + 1` and `mem + 2`.
    fn invoke(p: &mut StorageProcess<Disk>, tag: u64, offset: u64, len: u64, mem: u32) {
        let mut imms = offset.to_le_bytes().to_vec();
        imms.extend_from_slice(&len.to_le_bytes());
        p.on_message(&body(&ControllerMsg::Invocation {
            tag,
            imms,
            caps: vec![
                (Handle(mem), MEM),
                (Handle(mem + 1), REQ),
                (Handle(mem + 2), REQ),
            ],
        }));
    }

    #[test]
    fn concurrent_reads_keep_commands_in_flight_split_and_return_their_own_bytes() {
        let disk = Disk::new(4096, 256 * 1024);
        disk.hold.set(true);
        let (mut p, mut c) = ready(disk);
        // Ten reads at once: aligned, unaligned, one of 5 commands (20 KiB
        // over 8-block commands), one of a single byte.
        let reads: Vec<(u64, u64)> = (0..10u64)
            .map(|i| match i {
                3 => (7 * 4096 + 100, 20 * 1024),
                7 => (1_000_001, 1),
                _ => (i * 40_000 + (i % 2) * 77, 4096 + i * 100),
            })
            .collect();
        for (i, &(offset, len)) in reads.iter().enumerate() {
            invoke(&mut p, TAG_READ, offset, len, 10 * (i as u32 + 1));
        }
        // Nothing completes yet: commands pile up to the device's depth,
        // no request waits on another.
        p.tick(1);
        assert_eq!(
            p.device().most_queued,
            16,
            "the device's whole queue in use"
        );
        assert_eq!(p.stats().in_flight_max, 16);
        // 16 commands in flight for 1000 ns each, so far.
        p.tick(1_001);
        assert_eq!(p.device_ns(), 16 * 1000);
        p.device().hold.set(false);
        c.run(&mut p);
        for (i, &(offset, len)) in reads.iter().enumerate() {
            let mem = 10 * (i as u32 + 1);
            let want = &p.device().disk[offset as usize..(offset + len) as usize];
            assert_eq!(c.copied[&mem], want, "read {i} at {offset}+{len}");
        }
        let s = p.stats();
        assert_eq!((s.reads, s.errors, s.direct, s.staged), (10, 0, 10, 0));
        let blocks = |o: u64, l: u64| (o + l).div_ceil(BS as u64) - o / BS as u64;
        let commands: u64 = reads.iter().map(|&(o, l)| blocks(o, l).div_ceil(8)).sum();
        assert_eq!(s.commands, commands);
        assert!(
            c.invoked.is_empty(),
            "done goes with the copy: {:?}",
            c.invoked
        );
        // Every window went back to the pool.
        assert!(p.windows.used.iter().all(|u| !u));
        assert!(p.active.is_empty() && p.queue.is_empty());
    }

    #[test]
    fn requests_wait_for_pool_room_and_writes_run_alone_in_order() {
        // A pool of 8 KiB: one 6 KiB request at a time.
        let (mut p, mut c) = ready(Disk::new(256, 8 * 1024));
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        c.sources.insert(20, data.clone());
        invoke(&mut p, TAG_READ, 1000, 6000, 10);
        invoke(&mut p, TAG_WRITE, 3000, 5000, 20);
        invoke(&mut p, TAG_READ, 3000, 5000, 30);
        assert_eq!(p.queue.len(), 2, "the write waits for the read");
        c.run(&mut p);
        let before = Disk::new(256, 0).disk;
        assert_eq!(c.copied[&10], before[1000..7000], "read before the write");
        assert_eq!(c.copied[&30], data, "read after the write");
        assert_eq!(p.device().disk[3000..8000], data[..]);
        assert_eq!(p.device().disk[..3000], before[..3000], "bytes around kept");
        assert_eq!(p.device().disk[8000..], before[8000..]);
        assert_eq!(c.invoked, [(21, vec![])], "the write's done");
        let s = p.stats();
        assert_eq!((s.reads, s.writes, s.direct, s.staged), (2, 1, 2, 1));
        // Too large for the pool: refused at once.
        invoke(&mut p, TAG_READ, 0, 9000, 40);
        c.run(&mut p);
        assert_eq!(
            c.invoked[1],
            (42, vec![StorageStatus::BadRequest as u8, 0, 0])
        );
    }

    #[test]
    fn device_errors_answer_err_and_free_the_window() {
        let mut disk = Disk::new(256, 64 * 1024);
        disk.bad_block = Some(20);
        let (mut p, mut c) = ready(disk);
        // 16 blocks over two commands, one of which fails.
        invoke(&mut p, TAG_READ, 16 * BS as u64, 16 * BS as u64, 10);
        invoke(&mut p, TAG_READ, 0, 100, 20);
        invoke(&mut p, TAG_READ, 256 * BS as u64 - 10, 20, 30);
        c.run(&mut p);
        assert_eq!(
            c.invoked,
            [
                (32, vec![StorageStatus::OutOfRange as u8, 0, 0]),
                (12, vec![StorageStatus::Device as u8, 0, 0]),
            ]
        );
        assert_eq!(c.copied[&20], p.device().disk[..100]);
        assert_eq!(p.stats().errors, 2);
        assert!(p.windows.used.iter().all(|u| !u));
        assert!(p.active.is_empty());
    }

    #[test]
    fn pool_is_served_and_faults_outside_like_the_sdk() {
        let mut disk = Disk::new(1, 0);
        disk.pool = vec![1, 2, 3, 4];
        let mut p = StorageProcess::new(disk, "s", [0; 32], &[], &[]);
        assert!(matches!(sent(&mut p)[..], [ProcessMsg::Attach { .. }]));
        p.on_message(&body(&ControllerMsg::Attached { node: NodeId(1) }));
        // Setup: the pool's Memory cap and the two Requests.
        assert_eq!(sent(&mut p).len(), 3);
        let read = |xfer, addr, len| ControllerMsg::MemRead { xfer, addr, len };
        p.on_message(&body(&read(1, BUFFER_ADDR + 1, 2)));
        p.on_message(&body(&read(2, BUFFER_ADDR + 3, 2)));
        p.on_message(&body(&read(3, BUFFER_ADDR - 1, 1)));
        p.on_message(&body(&ControllerMsg::MemWrite {
            xfer: 4,
            addr: BUFFER_ADDR + 4,
            data: alloc::vec![9],
        }));
        assert_eq!(
            sent(&mut p),
            [
                ProcessMsg::MemReadReply {
                    xfer: 1,
                    result: Ok(alloc::vec![2, 3])
                },
                ProcessMsg::MemReadReply {
                    xfer: 2,
                    result: Err(ErrorCode::MemoryFault)
                },
                ProcessMsg::MemReadReply {
                    xfer: 3,
                    result: Err(ErrorCode::MemoryFault)
                },
                ProcessMsg::MemWriteReply {
                    xfer: 4,
                    result: Err(ErrorCode::MemoryFault)
                },
            ]
        );
    }

    #[test]
    fn malformed_input_fails_the_process_without_panicking() {
        let mut p = StorageProcess::new(Disk::new(1, 4096), "s", [0; 32], &[], &[]);
        let _ = sent(&mut p);
        p.on_message(&[fractos_wire::PROTOCOL_VERSION, 200]);
        assert!(!p.is_ready());
        assert_eq!(p.phase, Phase::Failed);
        assert!(sent(&mut p).is_empty());
        // A name the protocol cannot carry fails at once.
        let long = "n".repeat(fractos_wire::MAX_PROCESS_NAME_LEN + 1);
        let mut p = StorageProcess::new(Disk::new(1, 4096), &long, [0; 32], &[], &[]);
        assert_eq!(p.phase, Phase::Failed);
        assert!(sent(&mut p).is_empty());
        // Short immediates and missing capabilities: BadRequest, no panic.
        let (mut p, mut c) = ready(Disk::new(8, 4096));
        p.on_message(&body(&ControllerMsg::Invocation {
            tag: TAG_READ,
            imms: vec![1, 2, 3],
            caps: vec![(Handle(5), MEM), (Handle(6), REQ), (Handle(7), REQ)],
        }));
        p.on_message(&body(&ControllerMsg::Invocation {
            tag: TAG_READ,
            imms: vec![0; 16],
            caps: vec![],
        }));
        c.run(&mut p);
        assert_eq!(
            c.invoked,
            [(7, vec![StorageStatus::BadRequest as u8, 0, 0])]
        );
        assert_eq!(p.stats().errors, 2);
    }

    /// The controller's device-write grants, as far as the storage service
    /// sees them: each grant at `SLOT_BASE + offset`; `valid` turns false
    /// after `revoke_after` checks.
    #[derive(Default)]
    struct Grants {
        offset: u64,
        revoke_after: Option<usize>,
        checks: usize,
        /// (id, address, len) of every grant.
        granted: Vec<(u64, u64, u64)>,
        /// (id, ok) of every end.
        ended: Vec<(u64, bool)>,
    }

    impl DeviceWrites for Grants {
        fn begin(&mut self, _: Handle, len: u64) -> Result<DeviceGrant, ErrorCode> {
            let id = self.granted.len() as u64 + 1;
            let address = SLOT_BASE + self.offset;
            self.granted.push((id, address, len));
            Ok(DeviceGrant { id, address })
        }
        fn valid(&mut self, _: u64) -> bool {
            self.checks += 1;
            self.revoke_after.is_none_or(|n| self.checks <= n)
        }
        fn end(&mut self, id: u64, ok: bool) -> Result<(), ErrorCode> {
            self.ended.push((id, ok));
            match (self.revoke_after.is_some_and(|n| self.checks > n), ok) {
                (true, _) => Err(ErrorCode::Revoked),
                (false, true) => Ok(()),
                (false, false) => Err(ErrorCode::MemoryFault),
            }
        }
    }

    /// Every device write landed inside a grant.
    fn inside_grants(disk: &Disk, g: &Grants) -> bool {
        disk.phys_writes.iter().all(|&(a, n)| {
            g.granted
                .iter()
                .any(|&(_, at, len)| a >= at && a + n <= at + len)
        })
    }

    #[test]
    fn direct_reads_write_only_inside_the_grant() {
        let (mut p, mut c) = ready(Disk::new(256, 16 * 1024));
        // 16 blocks at block 8: two 8-block commands into the slot at 4 KiB.
        let mut g = Grants {
            offset: 4096,
            ..Grants::default()
        };
        invoke(&mut p, TAG_READ, 8 * BS as u64, 16 * BS as u64, 10);
        c.run_with(&mut p, Some(&mut g));
        let len = 16 * BS;
        assert_eq!(g.granted, [(1, SLOT_BASE + 4096, len as u64)]);
        assert_eq!(g.ended, [(1, true)]);
        let d = p.device();
        assert_eq!(d.phys_writes.len(), 2);
        assert!(inside_grants(d, &g), "{:?}", d.phys_writes);
        assert_eq!(d.slot[4096..4096 + len], d.disk[8 * BS..8 * BS + len]);
        assert!(d.slot[..4096].iter().all(|&b| b == 0), "before the window");
        assert!(d.slot[4096 + len..].iter().all(|&b| b == 0), "after it");
        assert_eq!(c.invoked, [(11, vec![])], "done invoked");
        assert_eq!(p.stats().slot_reads, 1);
    }

    #[test]
    fn a_revoke_between_commands_stops_the_read_and_fails_it() {
        let (mut p, mut c) = ready(Disk::new(256, 16 * 1024));
        // Valid for the first command only: the second is never submitted.
        let mut g = Grants {
            revoke_after: Some(1),
            ..Grants::default()
        };
        invoke(&mut p, TAG_READ, 0, 16 * BS as u64, 10);
        c.run_with(&mut p, Some(&mut g));
        let d = p.device();
        assert_eq!(d.phys_writes, [(SLOT_BASE, 8 * BS as u64)]);
        assert!(inside_grants(d, &g));
        assert_eq!(g.ended, [(1, false)], "ended once, not delivered");
        assert_eq!(c.invoked.len(), 1);
        assert_eq!(c.invoked[0].0, 12, "err invoked, not done");
        assert_eq!(p.stats().slot_reads, 0);
        assert!(p.active.is_empty() && p.queue.is_empty());
        // The service goes on serving.
        let mut g2 = Grants::default();
        invoke(&mut p, TAG_READ, 0, 8 * BS as u64, 20);
        c.run_with(&mut p, Some(&mut g2));
        assert_eq!(g2.ended, [(1, true)]);
        assert_eq!(c.invoked.last().unwrap().0, 21);
    }

    #[test]
    fn partial_empty_and_huge_reads_never_get_a_grant() {
        let (mut p, mut c) = ready(Disk::new(256, 16 * 1024));
        let mut g = Grants::default();
        let cap = 256 * BS as u64;
        let reads = [
            (0, BS as u64 - 1),               // not a whole block
            (100, BS as u64),                 // not block aligned
            (cap - 1, 1),                     // the last byte
            (0, 0),                           // empty
            (0, u64::MAX),                    // wraps
            (u64::MAX - 10, 100),             // wraps
            (cap - BS as u64, 2 * BS as u64), // past the end
        ];
        for (i, &(offset, len)) in reads.iter().enumerate() {
            invoke(&mut p, TAG_READ, offset, len, 10 * (i as u32 + 1));
        }
        c.run_with(&mut p, Some(&mut g));
        assert!(g.granted.is_empty(), "{:?}", g.granted);
        assert!(p.device().phys_writes.is_empty());
        // The partial reads went through the pool with the right bytes.
        for (i, &(offset, len)) in reads[..3].iter().enumerate() {
            let want = &p.device().disk[offset as usize..(offset + len) as usize];
            assert_eq!(c.copied[&(10 * (i as u32 + 1))], want);
        }
        // The others were refused: their err Request invoked.
        let errs: Vec<u32> = c.invoked.iter().map(|(h, _)| *h).collect();
        assert_eq!(errs, [42, 52, 62, 72]);
    }

    #[test]
    fn a_grant_at_an_unaligned_address_is_ended_and_the_pool_used() {
        let (mut p, mut c) = ready(Disk::new(256, 16 * 1024));
        let mut g = Grants {
            offset: 2,
            ..Grants::default()
        };
        invoke(&mut p, TAG_READ, 0, 8 * BS as u64, 10);
        c.run_with(&mut p, Some(&mut g));
        assert_eq!(g.ended, [(1, false)]);
        assert!(p.device().phys_writes.is_empty());
        assert_eq!(c.copied[&10], p.device().disk[..8 * BS]);
    }
}
