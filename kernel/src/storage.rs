//! The appliance's built-in storage service: a FractOS process that lives
//! inside the unikernel and serves a block device (the NVMe namespace)
//! under the same capability rules as any other process.
//!
//! It speaks the process protocol to the controller core through an
//! in-memory channel ([`LocalProcess`]): it attaches with a token like an
//! adaptor, makes a Memory capability over its DMA staging buffer and two
//! Requests, publishes them, and serves invocations:
//!
//! * **read** — immediates end with `(offset: u64, len: u64)` (bytes,
//!   little-endian, any alignment); capabilities `[dst Memory (WRITE),
//!   done Request?, err Request?]`. The covering blocks are read into the
//!   staging buffer by DMA, then the window is copied straight into `dst`
//!   with `done` as the copy's completion Request. This is the reference
//!   storage adaptor's read protocol, so the pipeline can use it unchanged.
//! * **write** — same immediates; capabilities `[src Memory (READ), done?,
//!   err?]`. `src` is copied into the staging buffer (read-modify-write of
//!   partial blocks), written to the device and flushed; then `done` is
//!   invoked. `src` must not be longer than `len` (the whole window is
//!   copied; a longer one fails the copy with `SizeMismatch` and nothing
//!   is written).
//!
//! Failures invoke `err` (when given) with immediates `[status u8, code
//! u16 LE]` ([`StorageStatus`]; `code` is the wire [`ErrorCode`] of a
//! failed copy, else 0), so a client gets a typed answer instead of a
//! timeout: a range past the end of the device is `OutOfRange`, a `dst`
//! without the WRITE right fails the copy with `MissingRight`.
//!
//! Bytes move between the NVMe DMA buffer and the controller's copy frames
//! with one memory copy each way (the frame has to be built anyway); the
//! device I/O itself is polled synchronously, one request at a time.
//!
//! The process protocol itself — attach, op ids, routing completions,
//! serving the controller's `MemRead`/`MemWrite` of the staging buffer
//! (out of window: `MemoryFault`, as in the SDK), the invocation queue — is
//! the sans-IO [`fractos_process::Connection`]; this module is the storage
//! logic on top of it plus the [`LocalProcess`] wiring into the service.

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;

use fractos_process::{Config, Connection, Event, Instant, Memory, OutOfWindow};
use fractos_wire::{
    CapInfo, ErrorCode, Handle, ObjectKind, ProcessMsg, Reply, Rights, FRAME_HEADER_LEN,
};
use log::{info, warn};

/// Handler tag of the read Request (the reference storage adaptor's).
pub const TAG_READ: u64 = 0x5354_0001;
/// Handler tag of the write Request.
pub const TAG_WRITE: u64 = 0x5354_0002;
/// Address of the staging buffer in the process's registered memory.
pub const BUFFER_ADDR: u64 = 0x1000_0000;

/// A block device with a DMA staging buffer: what the storage service
/// serves.
pub trait BlockDevice {
    /// Bytes per block.
    fn block_size(&self) -> u32;
    /// Number of blocks.
    fn blocks(&self) -> u64;
    /// Bytes of the staging buffer (a whole number of blocks).
    fn buffer_len(&self) -> usize;
    /// Copies staging-buffer bytes at `offset` into `out`.
    fn buffer_read(&self, offset: usize, out: &mut [u8]);
    /// Copies `data` into the staging buffer at `offset`.
    fn buffer_write(&mut self, offset: usize, data: &[u8]);
    /// Reads `count` blocks at `lba` into the start of the staging buffer.
    fn read(&mut self, lba: u64, count: u32) -> Result<(), String>;
    /// Writes `count` blocks at `lba` from the start of the staging buffer.
    fn write(&mut self, lba: u64, count: u32) -> Result<(), String>;
    /// Makes written blocks durable.
    fn flush(&mut self) -> Result<(), String>;
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
    /// Called on every turn of the event loop with the time, for retries.
    fn tick(&mut self, _now_ns: u64) {}
    /// Prometheus lines of its own (each ending in a newline), if any.
    fn metrics_text(&self, _node: u32) -> String {
        String::new()
    }
    /// Whether it has given up its channel (the service then closes it,
    /// and the controller revokes what it owned).
    fn is_closed(&self) -> bool {
        false
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
    /// above the staging buffer.
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
    Diminish,
    Copy,
}

/// One invocation being served.
#[derive(Clone, Debug)]
struct Job {
    tag: u64,
    offset: u64,
    len: u64,
    target: (Handle, CapInfo),
    done: Option<Handle>,
    err: Option<Handle>,
    received: Vec<Handle>,
    /// The diminished window of the staging buffer.
    part: Option<Handle>,
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
    queue: VecDeque<Job>,
    current: Option<Job>,
    stats: StorageStats,
    now_ns: u64,
    /// Publishes to retry: (name, Request, when).
    retries: Vec<(String, Handle, u64)>,
}

/// The staging buffer as the controller reaches it: registered memory
/// `[BUFFER_ADDR, BUFFER_ADDR + buffer_len)`.
struct Staging<'a, B>(&'a mut B);

impl<B: BlockDevice> Memory for Staging<'_, B> {
    fn read(&mut self, addr: u64, out: &mut [u8]) -> Result<(), OutOfWindow> {
        let len = self.0.buffer_len() as u64;
        let off = OutOfWindow::check(BUFFER_ADDR, len, addr, out.len() as u64)?;
        self.0.buffer_read(off as usize, out);
        Ok(())
    }

    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), OutOfWindow> {
        let len = self.0.buffer_len() as u64;
        let off = OutOfWindow::check(BUFFER_ADDR, len, addr, data.len() as u64)?;
        self.0.buffer_write(off as usize, data);
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
        StorageProcess {
            dev,
            name: String::from(name),
            names,
            phase,
            conn,
            buffer_cap: None,
            setup_left: 0,
            queue: VecDeque::new(),
            current: None,
            stats: StorageStats::default(),
            now_ns: 0,
            retries: Vec::new(),
        }
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
        let len = self.dev.buffer_len() as u64;
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
                "storage: {} ready: {} blocks of {} bytes, staging buffer {} KiB",
                self.name,
                self.dev.blocks(),
                self.dev.block_size(),
                self.dev.buffer_len() / 1024
            );
            self.next_job();
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
            (Op::Diminish, Ok(Reply::Cap { handle, .. })) => self.on_part(handle),
            (Op::Diminish, r) => {
                warn!("storage: {}: diminish failed: {r:?}", self.name);
                self.fail(StorageStatus::Device, None);
            }
            (Op::Copy, r) => self.on_copied(r.err()),
        }
    }

    fn on_invocation(&mut self, tag: u64, imms: &[u8], caps: &[(Handle, CapInfo)]) {
        let received: Vec<Handle> = caps.iter().map(|c| c.0).collect();
        let request = |k: usize| {
            caps.get(k)
                .filter(|c| c.1.kind == ObjectKind::Request)
                .map(|c| c.0)
        };
        let n = imms.len();
        let range = (n >= 16).then(|| {
            let at = |i: usize| u64::from_le_bytes(imms[i..i + 8].try_into().expect("8 bytes"));
            (at(n - 16), at(n - 8))
        });
        let target = caps
            .first()
            .filter(|c| c.1.kind == ObjectKind::Memory)
            .copied();
        let job = Job {
            tag,
            offset: range.map_or(0, |r| r.0),
            len: range.map_or(0, |r| r.1),
            target: target.unwrap_or((Handle(0), caps.first().map_or(NO_CAP, |c| c.1))),
            done: request(1),
            err: request(2),
            received,
            part: None,
        };
        if range.is_none() || target.is_none() || !matches!(tag, TAG_READ | TAG_WRITE) {
            // Malformed: answered at once (it needs no buffer).
            self.answer_error(&job, StorageStatus::BadRequest, None);
            return;
        }
        self.queue.push_back(job);
        self.next_job();
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

    /// Drops every handle the invocation brought (and the window of the
    /// staging buffer).
    fn release(&mut self, job: &Job) {
        for &h in job.received.iter().chain(job.part.iter()) {
            self.send_detached(|op| ProcessMsg::Drop { op, cap: h });
        }
    }

    fn fail(&mut self, status: StorageStatus, code: Option<ErrorCode>) {
        if let Some(job) = self.current.take() {
            self.answer_error(&job, status, code);
        }
        self.next_job();
    }

    /// The blocks covering the job's byte range: (first lba, count, offset
    /// of the range in the first block).
    fn covering(&self, job: &Job) -> Result<(u64, u32, u64), StorageStatus> {
        let bs = u64::from(self.dev.block_size());
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
        let last = end.div_ceil(bs);
        let count = last - first;
        if count * bs > self.dev.buffer_len() as u64 {
            return Err(StorageStatus::BadRequest);
        }
        Ok((first, count as u32, job.offset % bs))
    }

    /// Starts the next queued job if the buffer is free.
    fn next_job(&mut self) {
        while self.phase == Phase::Ready && self.current.is_none() {
            let Some(job) = self.queue.pop_front() else {
                return;
            };
            let (lba, count, skew) = match self.covering(&job) {
                Ok(c) => c,
                Err(status) => {
                    self.current = Some(job);
                    self.fail(status, None);
                    continue;
                }
            };
            let bs = u64::from(self.dev.block_size());
            // Reads need the blocks; writes need them only for partial
            // first or last blocks.
            let partial = skew != 0 || (job.offset + job.len) % bs != 0;
            if job.tag == TAG_READ || partial {
                if let Err(e) = self.dev.read(lba, count) {
                    warn!(
                        "storage: {}: read of {count} blocks at {lba} failed: {e}",
                        self.name
                    );
                    self.current = Some(job);
                    self.fail(StorageStatus::Device, None);
                    continue;
                }
            }
            let rights = if job.tag == TAG_READ {
                Rights::READ
            } else {
                Rights::WRITE
            };
            let (buffer, len) = (self.buffer_cap.expect("ready has a buffer"), job.len);
            self.current = Some(job);
            self.send(Op::Diminish, |op| ProcessMsg::Diminish {
                op,
                cap: buffer,
                offset: skew,
                len,
                rights,
            });
        }
    }

    fn on_part(&mut self, part: Handle) {
        let Some(job) = self.current.as_mut() else {
            return;
        };
        job.part = Some(part);
        let (tag, target, done) = (job.tag, job.target.0, job.done);
        if tag == TAG_READ {
            self.send(Op::Copy, |op| ProcessMsg::Copy {
                op,
                src: part,
                dst: target,
                completion: done,
            });
        } else {
            self.send(Op::Copy, |op| ProcessMsg::Copy {
                op,
                src: target,
                dst: part,
                completion: None,
            });
        }
    }

    fn on_copied(&mut self, error: Option<ErrorCode>) {
        if let Some(code) = error {
            self.fail(StorageStatus::Copy, Some(code));
            return;
        }
        let Some(job) = self.current.take() else {
            return;
        };
        if job.tag == TAG_READ {
            self.stats.reads += 1;
            self.stats.bytes_read += job.len;
        } else {
            let (lba, count, _) = self.covering(&job).expect("checked before");
            let written = self.dev.write(lba, count).and_then(|()| self.dev.flush());
            if let Err(e) = written {
                warn!(
                    "storage: {}: write of {count} blocks at {lba} failed: {e}",
                    self.name
                );
                self.current = Some(job);
                self.fail(StorageStatus::Device, None);
                return;
            }
            self.stats.writes += 1;
            self.stats.bytes_written += job.len;
            if let Some(done) = job.done {
                self.send_detached(|op| ProcessMsg::Invoke {
                    op,
                    cap: done,
                    imms: Vec::new(),
                    caps: Vec::new(),
                });
            }
        }
        self.release(&job);
        self.next_job();
    }
}

/// Placeholder info for a missing capability (a malformed invocation).
const NO_CAP: CapInfo = CapInfo {
    kind: ObjectKind::Request,
    rights: Rights::NONE,
    len: 0,
};

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
        // reached; jobs queue here until the staging buffer is free.
        while let Some(inv) = self.conn.poll_invocation() {
            self.on_invocation(inv.tag, &inv.imms, &inv.caps);
        }
    }

    fn is_closed(&self) -> bool {
        self.phase == Phase::Failed
    }

    fn poll_message(&mut self) -> Option<Vec<u8>> {
        self.conn.poll_transmit().map(|mut frame| {
            frame.drain(..FRAME_HEADER_LEN);
            frame
        })
    }

    fn tick(&mut self, now_ns: u64) {
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
             fractos_storage_bytes_total{{node=\"{node}\",direction=\"written\"}} {}\n",
            s.reads, s.writes, s.errors, s.bytes_read, s.bytes_written
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fractos_wire::{ControllerMsg, NodeId};

    /// A device with only a staging buffer.
    struct Buf(Vec<u8>);

    impl BlockDevice for Buf {
        fn block_size(&self) -> u32 {
            512
        }
        fn blocks(&self) -> u64 {
            1
        }
        fn buffer_len(&self) -> usize {
            self.0.len()
        }
        fn buffer_read(&self, offset: usize, out: &mut [u8]) {
            out.copy_from_slice(&self.0[offset..offset + out.len()]);
        }
        fn buffer_write(&mut self, offset: usize, data: &[u8]) {
            self.0[offset..offset + data.len()].copy_from_slice(data);
        }
        fn read(&mut self, _: u64, _: u32) -> Result<(), String> {
            Ok(())
        }
        fn write(&mut self, _: u64, _: u32) -> Result<(), String> {
            Ok(())
        }
        fn flush(&mut self) -> Result<(), String> {
            Ok(())
        }
    }

    fn body(m: &ControllerMsg) -> Vec<u8> {
        let mut f = Vec::new();
        m.encode(&mut f);
        f.split_off(FRAME_HEADER_LEN)
    }

    fn sent(p: &mut StorageProcess<Buf>) -> Vec<ProcessMsg> {
        core::iter::from_fn(|| p.poll_message())
            .map(|b| ProcessMsg::decode(&b).unwrap())
            .collect()
    }

    #[test]
    fn staging_buffer_is_served_and_faults_outside_like_the_sdk() {
        let mut p = StorageProcess::new(Buf(vec![1, 2, 3, 4]), "s", [0; 32], &[], &[]);
        assert!(matches!(sent(&mut p)[..], [ProcessMsg::Attach { .. }]));
        p.on_message(&body(&ControllerMsg::Attached { node: NodeId(1) }));
        // Setup: the buffer's Memory cap and the two Requests.
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
        let mut p = StorageProcess::new(Buf(vec![0; 4]), "s", [0; 32], &[], &[]);
        let _ = sent(&mut p);
        p.on_message(&[fractos_wire::PROTOCOL_VERSION, 200]);
        assert!(!p.is_ready());
        assert_eq!(p.phase, Phase::Failed);
        assert!(sent(&mut p).is_empty());
        // A name the protocol cannot carry fails at once.
        let long = "n".repeat(fractos_wire::MAX_PROCESS_NAME_LEN + 1);
        let mut p = StorageProcess::new(Buf(vec![0; 4]), &long, [0; 32], &[], &[]);
        assert_eq!(p.phase, Phase::Failed);
        assert!(sent(&mut p).is_empty());
    }
}
