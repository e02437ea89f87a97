//! Third-party copy: bytes stream from the source owner's process to the
//! destination owner's process in bounded chunks, never via the invoker.
//!
//! The source owner reads a chunk from its process (`MemRead`), ships it to
//! the destination owner (`CopyChunk`), which writes it into its process
//! (`MemWrite`) and acknowledges (`CopyAck`). At most `copy_window` chunks
//! of `copy_chunk` bytes are in flight per copy, so memory stays bounded
//! whatever the copy's length.
//!
//! Revocation: both capabilities are re-validated at every step where bytes
//! are accepted — before a chunk is read, when a read reply comes back (a
//! late reply after the source was revoked is discarded), and before a
//! chunk is written at the destination. A revoke that kills the source or
//! destination of running copies completes only once their in-flight bytes
//! have settled (see [`RevokeBarrier`]): chunks already sent to the
//! destination are acknowledged, writes already issued to the destination
//! process are answered. So once a revoke has completed, no chunk of a copy
//! through the revoked capability is written anywhere, and the copy fails
//! with `Revoked`. If in-flight bytes cannot settle (peer lost, deadline),
//! the revoke answers `Timeout`: it is in force for every new use, but an
//! earlier chunk may still land.

//!
//! Data path: every read and write of process memory is an
//! [`Effect::MemRead`] / [`Effect::MemWrite`] with a transfer id. The
//! controller turns it into a `MemRead` / `MemWrite` message to the process,
//! or, for a process whose memory the driver can reach directly (a mapped
//! shared-memory region, an RDMA memory region; see
//! [`CopyEngine::set_direct`]), hands it to the driver. Either way the
//! answer comes back through [`CopyEngine::read_done`] /
//! [`CopyEngine::write_done`], which validate it exactly alike: an answer
//! is accepted only from the path the transfer was issued on.
//!
//! The engine owns its state and never touches the controller's: it reads
//! capability validity from the [`CapStore`] it is given and pushes
//! [`Effect`]s for the controller to apply.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use core::time::Duration;

use fractos_wire::{CapRef, ErrorCode, NodeId, PeerMsg, PeerReply, Rights};
use slotmap::SlotMap;

use crate::caps::{key_from_u64, key_to_u64, CapStore};
use crate::effects::{BarrierKey, Effect, Effects, Origin, SinkKey, SourceKey, Timer};
use crate::{CapKey, Instant, ProcessKey};

/// A revoke that stopped running copies, answered once their in-flight
/// bytes have settled.
struct RevokeBarrier {
    origin: Origin,
    /// Sources whose capability died with chunks sent and not yet
    /// acknowledged by the destination.
    sources: Vec<SourceKey>,
    /// Writes into a dead destination issued to the process and not yet
    /// answered.
    writes: Vec<u64>,
    /// A source was aborted before its chunks settled.
    unsettled: bool,
}

struct Source {
    origin: Origin,
    src: CapKey,
    proc: ProcessKey,
    addr: u64,
    len: u64,
    dst_node: NodeId,
    sink: Option<u64>,
    next: u64,
    /// Chunks read or being read and not yet acknowledged.
    inflight: usize,
    /// Of `inflight`, reads still outstanding at the process.
    reading: usize,
    acked: u64,
    deadline: Instant,
}

struct Sink {
    from: NodeId,
    source: u64,
    dst: CapKey,
    proc: ProcessKey,
    addr: u64,
    len: u64,
    deadline: Instant,
}

/// A memory access outstanding at a local process (or at the driver, if
/// `direct`).
enum Xfer {
    Read {
        source: SourceKey,
        offset: u64,
        len: u32,
        proc: ProcessKey,
        direct: bool,
    },
    Write {
        sink: SinkKey,
        /// The destination capability the write goes through.
        dst: CapKey,
        offset: u64,
        len: u32,
        proc: ProcessKey,
        direct: bool,
    },
    /// A device of the driver writes `len` bytes into `proc`'s memory
    /// through `dst` itself (DMA into a shared-memory slot): held like a
    /// write, so a revoke of `dst` waits for it to end.
    Device {
        dst: CapKey,
        len: u64,
        proc: ProcessKey,
    },
}

impl Source {
    /// Chunks sent to the destination and not yet acknowledged.
    fn unacked(&self) -> usize {
        self.inflight - self.reading
    }
}

/// The copy engine: copies sent and received by this controller, the
/// memory transfers they wait for, and the revokes held for them.
pub(crate) struct CopyEngine {
    /// Bytes per chunk (at least 1, at most one `MemRead` answer).
    chunk: u64,
    /// Chunks in flight per copy (at least 1).
    window: usize,
    /// How long a copy may make no progress.
    op_timeout: Duration,
    sources: SlotMap<SourceKey, Source>,
    sinks: SlotMap<SinkKey, Sink>,
    barriers: SlotMap<BarrierKey, RevokeBarrier>,
    xfers: BTreeMap<u64, Xfer>,
    next_xfer: u64,
    /// Processes whose memory the driver serves directly.
    direct: BTreeSet<ProcessKey>,
}

impl CopyEngine {
    /// An idle engine moving `chunk` bytes per chunk, `window` chunks in
    /// flight per copy, failing copies idle for `op_timeout`.
    pub fn new(chunk: usize, window: usize, op_timeout: Duration) -> Self {
        CopyEngine {
            chunk: chunk.clamp(1, fractos_wire::MAX_DATA_LEN) as u64,
            window: window.max(1),
            op_timeout,
            sources: SlotMap::with_key(),
            sinks: SlotMap::with_key(),
            barriers: SlotMap::with_key(),
            xfers: BTreeMap::new(),
            next_xfer: 1,
            direct: BTreeSet::new(),
        }
    }

    /// Copies being sent from here.
    pub fn sources(&self) -> usize {
        self.sources.len()
    }

    /// Copies being received here.
    pub fn sinks(&self) -> usize {
        self.sinks.len()
    }

    /// Whether the driver serves `proc`'s memory itself. Applies to
    /// transfers issued from now on; those outstanding keep their path.
    pub fn set_direct(&mut self, proc: ProcessKey, direct: bool) {
        if direct {
            self.direct.insert(proc);
        } else {
            self.direct.remove(&proc);
        }
    }

    fn new_xfer(&mut self, x: Xfer) -> u64 {
        let xfer = self.next_xfer;
        self.next_xfer += 1;
        self.xfers.insert(xfer, x);
        xfer
    }

    /// Whether the driver serves `proc`'s memory directly.
    pub fn is_direct(&self, proc: ProcessKey) -> bool {
        self.direct.contains(&proc)
    }

    /// Source owner: `origin` asks to copy the window of `src` (owned here)
    /// to `dst`.
    pub fn start_source(
        &mut self,
        now: Instant,
        origin: Origin,
        src: CapKey,
        dst: CapRef,
        caps: &CapStore,
        fx: &mut Effects,
    ) {
        let (proc, addr, len) = match caps.memory_window(src, Rights::READ) {
            Ok(v) => v,
            Err(e) => return fx.push(Effect::Answer(origin, Err(e))),
        };
        let deadline = now.after(self.op_timeout);
        let sk = self.sources.insert(Source {
            origin,
            src,
            proc,
            addr,
            len,
            dst_node: dst.node,
            sink: None,
            next: 0,
            inflight: 0,
            reading: 0,
            acked: 0,
            deadline,
        });
        fx.push(Effect::Timer(deadline, Timer::Source(sk)));
        fx.push(Effect::OpenSink {
            node: dst.node,
            dst,
            len,
            source: sk,
        });
    }

    /// Destination owner: `from` asks to receive `len` bytes into the
    /// window of `dst` (owned here) for its copy `source`.
    #[allow(clippy::too_many_arguments)]
    pub fn open_sink(
        &mut self,
        now: Instant,
        origin: Origin,
        from: NodeId,
        dst: CapKey,
        len: u64,
        source: u64,
        caps: &CapStore,
        fx: &mut Effects,
    ) {
        let checked = caps
            .memory_window(dst, Rights::WRITE)
            .and_then(|(proc, addr, wlen)| {
                if wlen < len {
                    return Err(ErrorCode::SizeMismatch);
                }
                Ok((proc, addr))
            });
        match checked {
            Ok((proc, addr)) => {
                let deadline = now.after(self.op_timeout);
                let sink = self.sinks.insert(Sink {
                    from,
                    source,
                    dst,
                    proc,
                    addr,
                    len,
                    deadline,
                });
                fx.push(Effect::Timer(deadline, Timer::Sink(sink)));
                fx.push(Effect::Answer(
                    origin,
                    Ok(PeerReply::CopyOpened {
                        sink: key_to_u64(sink),
                    }),
                ));
            }
            Err(e) => fx.push(Effect::Answer(origin, Err(e))),
        }
    }

    /// The destination answered [`Effect::OpenSink`].
    pub fn opened(
        &mut self,
        sk: SourceKey,
        result: Result<PeerReply, ErrorCode>,
        caps: &CapStore,
        fx: &mut Effects,
    ) {
        let Some(s) = self.sources.get_mut(sk) else {
            // The copy already failed; a sink that opened meanwhile is
            // discarded by its own deadline.
            return;
        };
        match result {
            Ok(PeerReply::CopyOpened { sink }) => {
                s.sink = Some(sink);
                if s.len == 0 {
                    self.finish_source(sk, fx);
                } else {
                    self.pump(sk, caps, fx);
                }
            }
            Ok(_) => self.abort_source(sk, ErrorCode::Malformed, fx),
            Err(e) => self.abort_source(sk, e, fx),
        }
    }

    /// Reads chunks until the window is full or the copy is all read.
    fn pump(&mut self, sk: SourceKey, caps: &CapStore, fx: &mut Effects) {
        loop {
            let (window, chunk) = (self.window, self.chunk);
            let Some(s) = self.sources.get_mut(sk) else {
                return;
            };
            if s.inflight >= window || s.next >= s.len {
                return;
            }
            if !caps.alive(s.src) {
                return self.abort_source(sk, ErrorCode::Revoked, fx);
            }
            let n = chunk.min(s.len - s.next) as u32;
            let (offset, proc, addr) = (s.next, s.proc, s.addr + s.next);
            s.next += n as u64;
            s.inflight += 1;
            s.reading += 1;
            let direct = self.direct.contains(&proc);
            let xfer = self.new_xfer(Xfer::Read {
                source: sk,
                offset,
                len: n,
                proc,
                direct,
            });
            fx.push(Effect::MemRead {
                proc,
                xfer,
                addr,
                len: n,
                direct,
            });
        }
    }

    /// Transfer `xfer`, a read of `proc`'s memory, was answered, by the
    /// process (`direct == false`) or by the driver (`direct == true`).
    /// Answers from the wrong process or path, unknown or late ones, are
    /// ignored.
    #[allow(clippy::too_many_arguments)]
    pub fn read_done(
        &mut self,
        now: Instant,
        proc: ProcessKey,
        xfer: u64,
        direct: bool,
        result: Result<Vec<u8>, ErrorCode>,
        caps: &CapStore,
        fx: &mut Effects,
    ) {
        let (sk, offset, len) = match self.xfers.get(&xfer) {
            Some(Xfer::Read {
                source,
                offset,
                len,
                proc: p,
                direct: d,
            }) if *p == proc && *d == direct => (*source, *offset, *len),
            _ => return,
        };
        self.xfers.remove(&xfer);
        let Some(s) = self.sources.get_mut(sk) else {
            return;
        };
        s.reading -= 1;
        if !caps.alive(s.src) {
            // Revoked while the process was reading: the bytes go nowhere.
            s.inflight -= 1;
            if s.unacked() == 0 {
                self.abort_source(sk, ErrorCode::Revoked, fx);
            }
            return;
        }
        match result {
            Ok(data) if data.len() == len as usize => {
                s.deadline = now.after(self.op_timeout);
                let (node, sink) = (s.dst_node, s.sink.unwrap_or(0));
                fx.push(Effect::BytesOut(data.len() as u64));
                fx.push(Effect::Peer(
                    node,
                    PeerMsg::CopyChunk { sink, offset, data },
                ));
            }
            _ => self.abort_source(sk, ErrorCode::MemoryFault, fx),
        }
    }

    /// Destination owner: a chunk of copy `sink` arrived from `from`.
    #[allow(clippy::too_many_arguments)]
    pub fn chunk(
        &mut self,
        now: Instant,
        from: NodeId,
        sink: u64,
        offset: u64,
        data: Vec<u8>,
        caps: &CapStore,
        fx: &mut Effects,
    ) {
        let key: SinkKey = key_from_u64(sink);
        let Some(s) = self.sinks.get_mut(key) else {
            return;
        };
        if s.from != from {
            return;
        }
        s.deadline = now.after(self.op_timeout);
        let (source, proc, addr, len, dst) = (s.source, s.proc, s.addr, s.len, s.dst);
        let end = offset.checked_add(data.len() as u64);
        let check = if !caps.alive(dst) {
            Err(ErrorCode::Revoked)
        } else if end.is_none_or(|e| e > len) {
            Err(ErrorCode::OutOfBounds)
        } else {
            Ok(())
        };
        if let Err(e) = check {
            let ack = PeerMsg::CopyAck {
                source,
                offset,
                result: Err(e),
            };
            return fx.push(Effect::Peer(from, ack));
        }
        let direct = self.direct.contains(&proc);
        let xfer = self.new_xfer(Xfer::Write {
            sink: key,
            dst,
            offset,
            len: data.len() as u32,
            proc,
            direct,
        });
        fx.push(Effect::MemWrite {
            proc,
            xfer,
            addr: addr + offset,
            data,
            direct,
        });
    }

    /// Transfer `xfer`, a write into `proc`'s memory, was answered (see
    /// [`CopyEngine::read_done`] for `direct`).
    pub fn write_done(
        &mut self,
        proc: ProcessKey,
        xfer: u64,
        direct: bool,
        result: Result<(), ErrorCode>,
        fx: &mut Effects,
    ) {
        let (key, offset, len) = match self.xfers.get(&xfer) {
            Some(Xfer::Write {
                sink,
                offset,
                len,
                proc: p,
                direct: d,
                ..
            }) if *p == proc && *d == direct => (*sink, *offset, *len),
            _ => return,
        };
        self.xfers.remove(&xfer);
        let Some(s) = self.sinks.get(key) else {
            return self.barriers_progress(fx);
        };
        let (from, source) = (s.from, s.source);
        let result = result.map_err(|_| ErrorCode::MemoryFault);
        if result.is_ok() {
            fx.push(Effect::BytesIn(len as u64));
        }
        let ack = PeerMsg::CopyAck {
            source,
            offset,
            result,
        };
        fx.push(Effect::Peer(from, ack));
        self.barriers_progress(fx);
    }

    /// Source owner: the destination `from` acknowledged the chunk at
    /// `offset` of copy `source`.
    #[allow(clippy::too_many_arguments)]
    pub fn ack(
        &mut self,
        now: Instant,
        from: NodeId,
        source: u64,
        offset: u64,
        result: Result<(), ErrorCode>,
        caps: &CapStore,
        fx: &mut Effects,
    ) {
        let sk: SourceKey = key_from_u64(source);
        let chunk = self.chunk;
        let Some(s) = self.sources.get_mut(sk) else {
            return;
        };
        if s.dst_node != from || offset >= s.next || s.unacked() == 0 {
            return;
        }
        if !caps.alive(s.src) {
            // Revoked: count the chunk settled; fail once all have.
            s.inflight -= 1;
            if s.unacked() == 0 {
                self.abort_source(sk, ErrorCode::Revoked, fx);
            }
            return;
        }
        if let Err(e) = result {
            return self.abort_source(sk, e, fx);
        }
        s.acked += chunk.min(s.len - offset);
        s.inflight = s.inflight.saturating_sub(1);
        s.deadline = now.after(self.op_timeout);
        if s.acked >= s.len {
            self.finish_source(sk, fx);
        } else {
            self.pump(sk, caps, fx);
        }
    }

    /// Destination owner: the source `from` is done with copy `sink`.
    pub fn close(&mut self, from: NodeId, sink: u64) {
        let key: SinkKey = key_from_u64(sink);
        if self.sinks.get(key).is_some_and(|s| s.from == from) {
            self.sinks.remove(key);
        }
    }

    fn finish_source(&mut self, sk: SourceKey, fx: &mut Effects) {
        let Some(s) = self.sources.remove(sk) else {
            return;
        };
        if let Some(sink) = s.sink {
            fx.push(Effect::Peer(s.dst_node, PeerMsg::CopyClose { sink }));
        }
        fx.push(Effect::Answer(
            s.origin,
            Ok(PeerReply::Copied { len: s.len }),
        ));
        self.barriers_progress(fx);
    }

    fn abort_source(&mut self, sk: SourceKey, e: ErrorCode, fx: &mut Effects) {
        let Some(s) = self.sources.remove(sk) else {
            return;
        };
        if s.unacked() > 0 {
            // Chunks may still land: revokes waiting for them cannot
            // promise that none will.
            for b in self.barriers.values_mut() {
                if b.sources.contains(&sk) {
                    b.unsettled = true;
                }
            }
        }
        if let Some(sink) = s.sink {
            fx.push(Effect::Peer(s.dst_node, PeerMsg::CopyClose { sink }));
        }
        fx.push(Effect::Answer(s.origin, Err(e)));
        self.barriers_progress(fx);
    }

    /// A revoke for `origin` has just removed capabilities from `caps`:
    /// stop the copies through them and answer `origin` once those have no
    /// bytes in flight (at once if none had).
    pub fn revoked(&mut self, now: Instant, origin: Origin, caps: &CapStore, fx: &mut Effects) {
        let dead_sources: Vec<SourceKey> = self
            .sources
            .iter()
            .filter(|(_, s)| !caps.alive(s.src))
            .map(|(k, _)| k)
            .collect();
        let mut barrier = RevokeBarrier {
            origin,
            sources: Vec::new(),
            writes: Vec::new(),
            unsettled: false,
        };
        for sk in dead_sources {
            if self.sources[sk].unacked() == 0 {
                self.abort_source(sk, ErrorCode::Revoked, fx);
            } else {
                barrier.sources.push(sk);
            }
        }
        barrier.writes = self
            .xfers
            .iter()
            .filter(|(_, x)| {
                matches!(x, Xfer::Write { dst, .. } | Xfer::Device { dst, .. } if !caps.alive(*dst))
            })
            .map(|(k, _)| *k)
            .collect();
        if barrier.sources.is_empty() && barrier.writes.is_empty() {
            return fx.push(Effect::Answer(origin, Ok(PeerReply::Done)));
        }
        fx.push(Effect::RevokeHeld);
        let deadline = now.after(self.op_timeout);
        let bk = self.barriers.insert(barrier);
        fx.push(Effect::Timer(deadline, Timer::Barrier(bk)));
    }

    /// Answers the revokes whose copies have settled.
    fn barriers_progress(&mut self, fx: &mut Effects) {
        if self.barriers.is_empty() {
            return;
        }
        let mut done = Vec::new();
        for (k, b) in self.barriers.iter_mut() {
            b.sources.retain(|sk| self.sources.contains_key(*sk));
            b.writes.retain(|x| self.xfers.contains_key(x));
            if b.sources.is_empty() && b.writes.is_empty() {
                done.push(k);
            }
        }
        for k in done {
            let Some(b) = self.barriers.remove(k) else {
                continue;
            };
            let result = if b.unsettled {
                Err(ErrorCode::Timeout)
            } else {
                Ok(PeerReply::Done)
            };
            fx.push(Effect::Answer(b.origin, result));
        }
    }

    /// A revoke's in-flight bytes did not settle in time: its outcome for
    /// them is unknown.
    pub fn barrier_timer(&mut self, bk: BarrierKey, fx: &mut Effects) {
        if let Some(b) = self.barriers.remove(bk) {
            fx.push(Effect::Answer(b.origin, Err(ErrorCode::Timeout)));
        }
    }

    /// A source's deadline: fail it if it made no progress since.
    pub fn source_timer(&mut self, now: Instant, sk: SourceKey, fx: &mut Effects) {
        let Some(s) = self.sources.get(sk) else {
            return;
        };
        if s.deadline <= now {
            self.abort_source(sk, ErrorCode::Timeout, fx);
        } else {
            fx.push(Effect::Timer(s.deadline, Timer::Source(sk)));
        }
    }

    /// A sink's deadline: drop it if it received nothing since.
    pub fn sink_timer(&mut self, now: Instant, key: SinkKey, fx: &mut Effects) {
        let Some(s) = self.sinks.get(key) else { return };
        if s.deadline <= now {
            self.sinks.remove(key);
        } else {
            fx.push(Effect::Timer(s.deadline, Timer::Sink(key)));
        }
    }

    /// A process exited: copies waiting on its memory fail.
    pub fn process_exited(&mut self, proc: ProcessKey, fx: &mut Effects) {
        self.direct.remove(&proc);
        let mine: Vec<u64> = self
            .xfers
            .iter()
            .filter(|(_, x)| match x {
                Xfer::Read { proc: p, .. }
                | Xfer::Write { proc: p, .. }
                | Xfer::Device { proc: p, .. } => *p == proc,
            })
            .map(|(k, _)| *k)
            .collect();
        for xfer in mine {
            match self.xfers.remove(&xfer) {
                Some(Xfer::Read { source, .. }) => {
                    self.abort_source(source, ErrorCode::Revoked, fx)
                }
                Some(Xfer::Write { sink, offset, .. }) => {
                    if let Some(s) = self.sinks.remove(sink) {
                        let ack = PeerMsg::CopyAck {
                            source: s.source,
                            offset,
                            result: Err(ErrorCode::Revoked),
                        };
                        fx.push(Effect::Peer(s.from, ack));
                    }
                }
                // Its end finds it gone and fails.
                Some(Xfer::Device { .. }) | None => {}
            }
        }
        self.barriers_progress(fx);
    }

    /// A device write of `len` bytes into `proc`'s memory through `dst`
    /// (validated by the caller) begins: its transfer id.
    pub fn device_write_begin(&mut self, dst: CapKey, len: u64, proc: ProcessKey) -> u64 {
        self.new_xfer(Xfer::Device { dst, len, proc })
    }

    /// Whether device write `xfer` may go on: begun, its process still
    /// attached and its capability alive.
    pub fn device_write_valid(&self, xfer: u64, caps: &CapStore) -> bool {
        matches!(self.xfers.get(&xfer), Some(Xfer::Device { dst, .. }) if caps.alive(*dst))
    }

    /// Device write `xfer` ended (`ok`: the device wrote every byte). Its
    /// outcome: `Revoked` if the capability died or the process left
    /// meanwhile (the bytes must not be taken as delivered), `MemoryFault`
    /// if the device failed or `xfer` is unknown.
    pub fn device_write_end(
        &mut self,
        xfer: u64,
        ok: bool,
        caps: &CapStore,
        fx: &mut Effects,
    ) -> Result<(), ErrorCode> {
        let result = match self.xfers.get(&xfer) {
            Some(Xfer::Device { dst, len, .. }) => {
                let (alive, len) = (caps.alive(*dst), *len);
                self.xfers.remove(&xfer);
                if !alive {
                    Err(ErrorCode::Revoked)
                } else if ok {
                    fx.push(Effect::BytesIn(len));
                    Ok(())
                } else {
                    Err(ErrorCode::MemoryFault)
                }
            }
            // Removed when its process left.
            None if xfer < self.next_xfer => Err(ErrorCode::Revoked),
            _ => Err(ErrorCode::MemoryFault),
        };
        self.barriers_progress(fx);
        result
    }

    /// A peer is gone: copies to or from it fail.
    /// Whether a copy is in progress with `node` (as destination or
    /// source of chunks).
    pub fn involves(&self, node: NodeId) -> bool {
        self.sources.values().any(|s| s.dst_node == node)
            || self.sinks.values().any(|s| s.from == node)
    }

    pub fn peer_lost(&mut self, node: NodeId, fx: &mut Effects) {
        let sources: Vec<SourceKey> = self
            .sources
            .iter()
            .filter(|(_, s)| s.dst_node == node)
            .map(|(k, _)| k)
            .collect();
        for sk in sources {
            self.abort_source(sk, ErrorCode::PeerUnreachable, fx);
        }
        self.sinks.retain(|_, s| s.from != node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caps::Holder;
    use fractos_wire::ObjectKind;

    const ME: NodeId = NodeId(1);
    const PEER: NodeId = NodeId(2);
    const ORIGIN: Origin = Origin::Peer { node: ME, req: 9 };
    const SINK: u64 = 77;
    const T0: Instant = Instant(1_000);
    const TIMEOUT: Duration = Duration::from_secs(5);

    /// One controller's copy engine and capability store, with one
    /// process owning a 100-byte memory object at address 1000.
    struct T {
        engine: CopyEngine,
        store: CapStore,
        proc: ProcessKey,
        mem: CapKey,
        fx: Effects,
    }

    impl T {
        /// Chunks of 10 bytes, 2 in flight.
        fn new() -> T {
            let mut procs: SlotMap<ProcessKey, ()> = SlotMap::with_key();
            let proc = procs.insert(());
            let mut store = CapStore::default();
            let mem = store.create_object(
                ObjectKind::Memory,
                proc,
                1000,
                100,
                Rights::READ | Rights::WRITE,
                0,
                None,
                Holder::Node(ME),
            );
            T {
                engine: CopyEngine::new(10, 2, TIMEOUT),
                store,
                proc,
                mem,
                fx: Vec::new(),
            }
        }

        /// A child of the memory object: `len` bytes at `offset`.
        fn window(&mut self, offset: u64, len: u64, rights: Rights) -> CapKey {
            let spec = crate::caps::DeriveKind::Diminish {
                offset,
                len,
                rights,
            };
            self.store
                .derive(self.mem, spec, Holder::Node(ME))
                .expect("valid window")
        }

        fn take(&mut self) -> Vec<Effect> {
            core::mem::take(&mut self.fx)
        }

        fn revoke(&mut self, key: CapKey) {
            let mut fallout = Vec::new();
            self.store.revoke(key, &mut fallout).expect("alive");
            self.engine.revoked(T0, ORIGIN, &self.store, &mut self.fx);
        }

        /// Starts a copy of `src` to a destination on `PEER` and opens it;
        /// returns the source's key.
        fn start(&mut self, src: CapKey) -> SourceKey {
            let dst = CapRef {
                node: PEER,
                incarnation: 1,
                cap: 5,
            };
            self.engine
                .start_source(T0, ORIGIN, src, dst, &self.store, &mut self.fx);
            let sk = match self.take().as_slice() {
                [Effect::Timer(_, Timer::Source(sk)), Effect::OpenSink {
                    node: PEER, source, ..
                }] if sk == source => *sk,
                other => panic!("unexpected {other:?}"),
            };
            let opened = Ok(PeerReply::CopyOpened { sink: SINK });
            self.engine.opened(sk, opened, &self.store, &mut self.fx);
            sk
        }

        fn read(&mut self, xfer: u64, data: Vec<u8>) {
            self.engine.read_done(
                T0,
                self.proc,
                xfer,
                false,
                Ok(data),
                &self.store,
                &mut self.fx,
            );
        }

        fn ack(&mut self, sk: SourceKey, offset: u64, result: Result<(), ErrorCode>) {
            let source = key_to_u64(sk);
            self.engine
                .ack(T0, PEER, source, offset, result, &self.store, &mut self.fx);
        }

        /// Opens a sink into `dst` for `len` bytes from `PEER`; returns
        /// its wire id.
        fn open_sink(&mut self, dst: CapKey, len: u64) -> u64 {
            self.engine
                .open_sink(T0, ORIGIN, PEER, dst, len, 5, &self.store, &mut self.fx);
            match self.take().as_slice() {
                [Effect::Timer(_, Timer::Sink(_)), Effect::Answer(ORIGIN, Ok(PeerReply::CopyOpened { sink }))] => {
                    *sink
                }
                other => panic!("unexpected {other:?}"),
            }
        }

        fn chunk(&mut self, sink: u64, offset: u64, len: usize) {
            let data = alloc::vec![7; len];
            self.engine
                .chunk(T0, PEER, sink, offset, data, &self.store, &mut self.fx);
        }
    }

    /// The reads among `fx`: (xfer, addr, len).
    fn reads(fx: &[Effect]) -> Vec<(u64, u64, u32)> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::MemRead {
                    xfer, addr, len, ..
                } => Some((*xfer, *addr, *len)),
                _ => None,
            })
            .collect()
    }

    /// The chunks sent among `fx`: (offset, len).
    fn chunks(fx: &[Effect]) -> Vec<(u64, usize)> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Peer(
                    PEER,
                    PeerMsg::CopyChunk {
                        sink: SINK,
                        offset,
                        data,
                    },
                ) => Some((*offset, data.len())),
                _ => None,
            })
            .collect()
    }

    fn answers(fx: &[Effect]) -> Vec<Result<PeerReply, ErrorCode>> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Answer(_, r) => Some(*r),
                _ => None,
            })
            .collect()
    }

    fn acks(fx: &[Effect]) -> Vec<(u64, Result<(), ErrorCode>)> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Peer(PEER, PeerMsg::CopyAck { offset, result, .. }) => {
                    Some((*offset, *result))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn chunks_stay_within_window_and_copy_completes() {
        let mut t = T::new();
        let src = t.window(20, 35, Rights::READ);
        let sk = t.start(src);
        // Two chunks of 10 in flight, at the window's absolute addresses.
        let fx = t.take();
        let r = reads(&fx);
        assert_eq!(
            r.iter().map(|x| (x.1, x.2)).collect::<Vec<_>>(),
            [(1020, 10), (1030, 10)]
        );
        // Reads answered: chunks go out, but no new read until an ack.
        t.read(r[0].0, alloc::vec![1; 10]);
        t.read(r[1].0, alloc::vec![2; 10]);
        let fx = t.take();
        assert_eq!(chunks(&fx), [(0, 10), (10, 10)]);
        assert!(reads(&fx).is_empty());
        assert!(fx.contains(&Effect::BytesOut(10)));
        t.ack(sk, 0, Ok(()));
        let r2 = reads(&t.take());
        assert_eq!(
            r2.iter().map(|x| (x.1, x.2)).collect::<Vec<_>>(),
            [(1040, 10)]
        );
        t.ack(sk, 10, Ok(()));
        let r3 = reads(&t.take());
        // The last chunk is short.
        assert_eq!(
            r3.iter().map(|x| (x.1, x.2)).collect::<Vec<_>>(),
            [(1050, 5)]
        );
        t.read(r2[0].0, alloc::vec![3; 10]);
        t.read(r3[0].0, alloc::vec![4; 5]);
        assert_eq!(chunks(&t.take()), [(20, 10), (30, 5)]);
        t.ack(sk, 20, Ok(()));
        assert!(answers(&t.take()).is_empty());
        t.ack(sk, 30, Ok(()));
        let fx = t.take();
        assert!(fx.contains(&Effect::Peer(PEER, PeerMsg::CopyClose { sink: SINK })));
        assert_eq!(answers(&fx), [Ok(PeerReply::Copied { len: 35 })]);
        assert_eq!((t.engine.sources(), t.engine.xfers.len()), (0, 0));
    }

    #[test]
    fn acks_out_of_order_and_bogus_acks() {
        let mut t = T::new();
        let src = t.window(0, 20, Rights::READ);
        let sk = t.start(src);
        let r = reads(&t.take());
        t.read(r[0].0, alloc::vec![1; 10]);
        t.read(r[1].0, alloc::vec![2; 10]);
        t.take();
        // From the wrong node, beyond what was read: ignored.
        let source = key_to_u64(sk);
        t.engine
            .ack(T0, NodeId(3), source, 0, Ok(()), &t.store, &mut t.fx);
        t.ack(sk, 20, Ok(()));
        assert!(t.take().is_empty());
        // The second chunk first.
        t.ack(sk, 10, Ok(()));
        assert!(answers(&t.take()).is_empty());
        t.ack(sk, 0, Ok(()));
        assert_eq!(answers(&t.take()), [Ok(PeerReply::Copied { len: 20 })]);
        // A late duplicate: the copy is gone.
        t.ack(sk, 0, Ok(()));
        assert!(t.take().is_empty());
    }

    #[test]
    fn a_failed_ack_or_bad_read_fails_the_copy() {
        let mut t = T::new();
        let sk = t.start(t.mem);
        let r = reads(&t.take());
        t.read(r[0].0, alloc::vec![1; 10]);
        t.take();
        t.ack(sk, 0, Err(ErrorCode::MemoryFault));
        let fx = t.take();
        assert_eq!(answers(&fx), [Err(ErrorCode::MemoryFault)]);
        assert!(fx.contains(&Effect::Peer(PEER, PeerMsg::CopyClose { sink: SINK })));

        let mut t = T::new();
        t.start(t.mem);
        let r = reads(&t.take());
        // Too short an answer.
        t.read(r[0].0, alloc::vec![1; 3]);
        assert_eq!(answers(&t.take()), [Err(ErrorCode::MemoryFault)]);
    }

    #[test]
    fn source_checks_rights_and_destination_checks_size() {
        let mut t = T::new();
        let w = t.window(0, 10, Rights::WRITE);
        let dst = CapRef {
            node: PEER,
            incarnation: 1,
            cap: 5,
        };
        t.engine
            .start_source(T0, ORIGIN, w, dst, &t.store, &mut t.fx);
        assert_eq!(answers(&t.take()), [Err(ErrorCode::MissingRight)]);
        t.engine
            .open_sink(T0, ORIGIN, PEER, w, 11, 5, &t.store, &mut t.fx);
        assert_eq!(answers(&t.take()), [Err(ErrorCode::SizeMismatch)]);
        let r = t.window(0, 10, Rights::READ);
        t.engine
            .open_sink(T0, ORIGIN, PEER, r, 5, 5, &t.store, &mut t.fx);
        assert_eq!(answers(&t.take()), [Err(ErrorCode::MissingRight)]);
        assert_eq!((t.engine.sources(), t.engine.sinks()), (0, 0));
    }

    #[test]
    fn sink_validates_every_chunk() {
        let mut t = T::new();
        let dst = t.window(50, 30, Rights::WRITE);
        let sink = t.open_sink(dst, 25);
        t.chunk(sink, 0, 10);
        let fx = t.take();
        assert!(matches!(
            fx.as_slice(),
            [Effect::MemWrite {
                addr: 1050,
                direct: false,
                ..
            }]
        ));
        // Past the copy's length (not the window's), overflowing, from
        // another node, for an unknown sink.
        t.chunk(sink, 20, 10);
        t.chunk(sink, u64::MAX, 1);
        assert_eq!(
            acks(&t.take()),
            [
                (20, Err(ErrorCode::OutOfBounds)),
                (u64::MAX, Err(ErrorCode::OutOfBounds))
            ]
        );
        t.engine
            .chunk(T0, NodeId(3), sink, 0, alloc::vec![1], &t.store, &mut t.fx);
        t.chunk(sink ^ 0xffff, 0, 1);
        assert!(t.take().is_empty());
        // The write's answer becomes the ack.
        let xfer = *t.engine.xfers.keys().next().expect("one write");
        t.engine.write_done(t.proc, xfer, false, Ok(()), &mut t.fx);
        let fx = t.take();
        assert_eq!(acks(&fx), [(0, Ok(()))]);
        assert!(fx.contains(&Effect::BytesIn(10)));
        // A close from another node is ignored; from the source it ends.
        t.engine.close(NodeId(3), sink);
        assert_eq!(t.engine.sinks(), 1);
        t.engine.close(PEER, sink);
        assert_eq!(t.engine.sinks(), 0);
    }

    #[test]
    fn revoking_the_source_waits_for_unacked_chunks() {
        let mut t = T::new();
        let src = t.window(0, 40, Rights::READ);
        let sk = t.start(src);
        let r = reads(&t.take());
        // One chunk sent, one still being read.
        t.read(r[0].0, alloc::vec![1; 10]);
        t.take();
        t.revoke(src);
        let fx = t.take();
        assert!(answers(&fx).is_empty(), "held while a chunk is in flight");
        assert!(fx.contains(&Effect::RevokeHeld));
        assert_eq!(t.engine.barriers.len(), 1);
        // The late read reply is discarded: nothing is sent.
        t.read(r[1].0, alloc::vec![2; 10]);
        assert!(t.take().is_empty());
        // The in-flight chunk is acknowledged: the copy fails, the revoke
        // completes.
        t.ack(sk, 0, Ok(()));
        let fx = t.take();
        assert!(fx.contains(&Effect::Peer(PEER, PeerMsg::CopyClose { sink: SINK })));
        assert_eq!(answers(&fx), [Err(ErrorCode::Revoked), Ok(PeerReply::Done)]);
        assert_eq!(t.engine.barriers.len(), 0);
    }

    #[test]
    fn revoking_a_source_with_nothing_sent_answers_at_once() {
        let mut t = T::new();
        let src = t.window(0, 40, Rights::READ);
        t.start(src);
        let r = reads(&t.take());
        t.revoke(src);
        assert_eq!(
            answers(&t.take()),
            [Err(ErrorCode::Revoked), Ok(PeerReply::Done)]
        );
        // Late read replies go nowhere.
        t.read(r[0].0, alloc::vec![1; 10]);
        assert!(t.take().is_empty());
        // Revoking something no copy uses answers Done at once.
        let other = t.window(50, 10, Rights::READ);
        t.revoke(other);
        assert_eq!(answers(&t.take()), [Ok(PeerReply::Done)]);
    }

    #[test]
    fn revoke_answers_timeout_when_bytes_cannot_settle() {
        // The destination is lost with a chunk in flight.
        let mut t = T::new();
        let src = t.window(0, 40, Rights::READ);
        t.start(src);
        let r = reads(&t.take());
        t.read(r[0].0, alloc::vec![1; 10]);
        t.take();
        t.revoke(src);
        t.take();
        t.engine.peer_lost(PEER, &mut t.fx);
        assert_eq!(
            answers(&t.take()),
            [Err(ErrorCode::PeerUnreachable), Err(ErrorCode::Timeout)]
        );
        // The barrier's deadline passes first.
        let mut t = T::new();
        let src = t.window(0, 40, Rights::READ);
        t.start(src);
        let r = reads(&t.take());
        t.read(r[0].0, alloc::vec![1; 10]);
        t.take();
        t.revoke(src);
        let bk = t
            .take()
            .iter()
            .find_map(|e| match e {
                Effect::Timer(at, Timer::Barrier(bk)) => {
                    assert_eq!(*at, T0.after(TIMEOUT));
                    Some(*bk)
                }
                _ => None,
            })
            .expect("barrier deadline");
        t.engine.barrier_timer(bk, &mut t.fx);
        assert_eq!(answers(&t.take()), [Err(ErrorCode::Timeout)]);
    }

    #[test]
    fn revoking_the_destination_waits_for_issued_writes() {
        let mut t = T::new();
        let dst = t.window(0, 30, Rights::WRITE);
        let sink = t.open_sink(dst, 30);
        t.chunk(sink, 0, 10);
        t.take();
        t.revoke(dst);
        let fx = t.take();
        assert!(answers(&fx).is_empty(), "held while a write is issued");
        // Later chunks are refused without touching memory.
        t.chunk(sink, 10, 10);
        let fx = t.take();
        assert_eq!(fx.len(), 1);
        assert_eq!(acks(&fx), [(10, Err(ErrorCode::Revoked))]);
        // The issued write is answered: its ack goes out, the revoke
        // completes.
        let xfer = *t.engine.xfers.keys().next().expect("one write");
        t.engine.write_done(t.proc, xfer, false, Ok(()), &mut t.fx);
        let fx = t.take();
        assert_eq!(acks(&fx), [(0, Ok(()))]);
        assert_eq!(answers(&fx), [Ok(PeerReply::Done)]);
    }

    #[test]
    fn deadlines_fail_sources_and_drop_sinks() {
        let mut t = T::new();
        let sk = t.start(t.mem);
        t.take();
        let later = T0.after(TIMEOUT);
        t.engine.source_timer(T0, sk, &mut t.fx);
        assert_eq!(t.take(), [Effect::Timer(later, Timer::Source(sk))]);
        t.engine.source_timer(later, sk, &mut t.fx);
        assert_eq!(answers(&t.take()), [Err(ErrorCode::Timeout)]);

        let dst = t.window(0, 30, Rights::WRITE);
        let sink = t.open_sink(dst, 30);
        let key: SinkKey = key_from_u64(sink);
        t.engine.sink_timer(T0, key, &mut t.fx);
        assert_eq!(t.take(), [Effect::Timer(later, Timer::Sink(key))]);
        t.engine.sink_timer(later, key, &mut t.fx);
        assert_eq!(t.engine.sinks(), 0);
        t.chunk(sink, 0, 10);
        assert!(t.take().is_empty());
    }

    #[test]
    fn peer_loss_and_process_exit_fail_copies() {
        let mut t = T::new();
        let src = t.window(0, 40, Rights::READ);
        t.start(src);
        t.take();
        let dst = t.window(50, 30, Rights::WRITE);
        let sink = t.open_sink(dst, 30);
        t.engine.peer_lost(PEER, &mut t.fx);
        assert_eq!(answers(&t.take()), [Err(ErrorCode::PeerUnreachable)]);
        assert_eq!((t.engine.sources(), t.engine.sinks()), (0, 0));
        t.chunk(sink, 0, 10);
        assert!(t.take().is_empty());

        // Exit with a read and a write outstanding.
        let mut t = T::new();
        let src = t.window(0, 10, Rights::READ);
        t.start(src);
        t.take();
        let dst = t.window(50, 30, Rights::WRITE);
        let sink = t.open_sink(dst, 30);
        t.chunk(sink, 0, 10);
        t.take();
        t.engine.process_exited(t.proc, &mut t.fx);
        let fx = t.take();
        assert_eq!(answers(&fx), [Err(ErrorCode::Revoked)]);
        assert_eq!(acks(&fx), [(0, Err(ErrorCode::Revoked))]);
        assert_eq!(
            (t.engine.sources(), t.engine.sinks(), t.engine.xfers.len()),
            (0, 0, 0)
        );
    }

    #[test]
    fn direct_transfers_are_completed_only_by_the_driver() {
        let mut t = T::new();
        t.engine.set_direct(t.proc, true);
        let src = t.window(0, 10, Rights::READ);
        let sk = t.start(src);
        let fx = t.take();
        let xfer = match fx.as_slice() {
            [Effect::MemRead {
                xfer,
                addr: 1000,
                len: 10,
                direct: true,
                ..
            }] => *xfer,
            other => panic!("unexpected {other:?}"),
        };
        // The process answering a transfer the driver serves is ignored.
        t.read(xfer, alloc::vec![9; 10]);
        assert!(t.take().is_empty());
        t.engine.read_done(
            T0,
            t.proc,
            xfer,
            true,
            Ok(alloc::vec![1; 10]),
            &t.store,
            &mut t.fx,
        );
        assert_eq!(chunks(&t.take()), [(0, 10)]);
        t.ack(sk, 0, Ok(()));
        assert_eq!(answers(&t.take()), [Ok(PeerReply::Copied { len: 10 })]);
        // Switched off: new transfers go to the process again.
        t.engine.set_direct(t.proc, false);
        let dst = t.window(50, 30, Rights::WRITE);
        let sink = t.open_sink(dst, 30);
        t.chunk(sink, 0, 10);
        assert!(matches!(
            t.take().as_slice(),
            [Effect::MemWrite { direct: false, .. }]
        ));
    }
}
