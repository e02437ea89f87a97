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

use alloc::vec::Vec;

use fractos_wire::{
    CapRef, ControllerMsg, ErrorCode, NodeId, ObjectKind, PeerMsg, PeerReply, PeerRequest, Rights,
};

use crate::caps::{key_from_u64, key_to_u64};
use crate::controller::{Controller, Origin, Timer, Waiter};
use crate::{CapKey, ProcessKey};

slotmap::new_key_type! {
    /// A copy being sent from this controller.
    pub(crate) struct SourceKey;
    /// A copy being received by this controller.
    pub(crate) struct SinkKey;
    /// A revoke waiting for the in-flight bytes of the copies it stopped.
    pub(crate) struct BarrierKey;
}

/// A revoke that stopped running copies, answered once their in-flight
/// bytes have settled.
pub(crate) struct RevokeBarrier {
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

pub(crate) struct Source {
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
    deadline: crate::Instant,
}

pub(crate) struct Sink {
    from: NodeId,
    source: u64,
    dst: CapKey,
    proc: ProcessKey,
    addr: u64,
    len: u64,
    deadline: crate::Instant,
}

/// A memory access outstanding at a local process.
pub(crate) enum Xfer {
    Read {
        source: SourceKey,
        offset: u64,
        len: u32,
        proc: ProcessKey,
    },
    Write {
        sink: SinkKey,
        /// The destination capability the write goes through.
        dst: CapKey,
        offset: u64,
        len: u32,
        proc: ProcessKey,
    },
}

impl Source {
    /// Chunks sent to the destination and not yet acknowledged.
    fn unacked(&self) -> usize {
        self.inflight - self.reading
    }
}

impl Controller {
    fn window(&self, key: CapKey, need: Rights) -> Result<(ProcessKey, u64, u64), ErrorCode> {
        let n = &self.store.nodes[key];
        let o = &self.store.objects[n.object];
        if o.kind != ObjectKind::Memory {
            return Err(ErrorCode::WrongType);
        }
        if !n.rights.contains(need) {
            return Err(ErrorCode::MissingRight);
        }
        Ok((o.owner, o.addr + n.offset(), n.len()))
    }

    pub(crate) fn start_copy_source(&mut self, origin: Origin, src: CapRef, dst: CapRef) {
        let checked = self
            .resolve_local(&src)
            .and_then(|k| Ok((k, self.window(k, Rights::READ)?)));
        let (key, (proc, addr, len)) = match checked {
            Ok(v) => v,
            Err(e) => return self.answer(origin, Err(e)),
        };
        let deadline = self.now.after(self.cfg.op_timeout);
        let sk = self.sources.insert(Source {
            origin,
            src: key,
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
        self.push_timer(deadline, Timer::Source(sk));
        let body = PeerRequest::CopyOpen {
            dst,
            len,
            source: key_to_u64(sk),
        };
        self.call(dst.node, body, Waiter::CopyOpened { source: sk });
    }

    pub(crate) fn open_copy_sink(
        &mut self,
        origin: Origin,
        from: NodeId,
        dst: CapRef,
        len: u64,
        source: u64,
    ) {
        let checked = self.resolve_local(&dst).and_then(|k| {
            let (proc, addr, wlen) = self.window(k, Rights::WRITE)?;
            if wlen < len {
                return Err(ErrorCode::SizeMismatch);
            }
            Ok((k, proc, addr))
        });
        match checked {
            Ok((key, proc, addr)) => {
                let deadline = self.now.after(self.cfg.op_timeout);
                let sink = self.sinks.insert(Sink {
                    from,
                    source,
                    dst: key,
                    proc,
                    addr,
                    len,
                    deadline,
                });
                self.push_timer(deadline, Timer::Sink(sink));
                self.answer(
                    origin,
                    Ok(PeerReply::CopyOpened {
                        sink: key_to_u64(sink),
                    }),
                );
            }
            Err(e) => self.answer(origin, Err(e)),
        }
    }

    pub(crate) fn on_copy_opened(&mut self, sk: SourceKey, result: Result<PeerReply, ErrorCode>) {
        let Some(s) = self.sources.get_mut(sk) else {
            // The copy already failed; a sink that opened meanwhile is
            // discarded by its own deadline.
            return;
        };
        match result {
            Ok(PeerReply::CopyOpened { sink }) => {
                s.sink = Some(sink);
                if s.len == 0 {
                    self.finish_source(sk);
                } else {
                    self.pump(sk);
                }
            }
            Ok(_) => self.abort_source(sk, ErrorCode::Malformed),
            Err(e) => self.abort_source(sk, e),
        }
    }

    fn pump(&mut self, sk: SourceKey) {
        loop {
            let window = self.cfg.copy_window;
            let chunk = self.cfg.copy_chunk as u64;
            let alive = self
                .sources
                .get(sk)
                .is_some_and(|s| self.store.nodes.contains_key(s.src));
            let Some(s) = self.sources.get_mut(sk) else {
                return;
            };
            if s.inflight >= window || s.next >= s.len {
                return;
            }
            if !alive {
                return self.abort_source(sk, ErrorCode::Revoked);
            }
            let n = chunk.min(s.len - s.next) as u32;
            let (offset, proc, addr) = (s.next, s.proc, s.addr + s.next);
            s.next += n as u64;
            s.inflight += 1;
            s.reading += 1;
            let xfer = self.next_xfer;
            self.next_xfer += 1;
            self.xfers.insert(
                xfer,
                Xfer::Read {
                    source: sk,
                    offset,
                    len: n,
                    proc,
                },
            );
            self.send_process(proc, &ControllerMsg::MemRead { xfer, addr, len: n });
        }
    }

    pub(crate) fn on_mem_read_reply(
        &mut self,
        proc: ProcessKey,
        xfer: u64,
        result: Result<Vec<u8>, ErrorCode>,
    ) {
        let (sk, offset, len) = match self.xfers.get(&xfer) {
            Some(Xfer::Read {
                source,
                offset,
                len,
                proc: p,
            }) if *p == proc => (*source, *offset, *len),
            _ => return,
        };
        self.xfers.remove(&xfer);
        let alive = self
            .sources
            .get(sk)
            .is_some_and(|s| self.store.nodes.contains_key(s.src));
        let Some(s) = self.sources.get_mut(sk) else {
            return;
        };
        s.reading -= 1;
        if !alive {
            // Revoked while the process was reading: the bytes go nowhere.
            s.inflight -= 1;
            if s.unacked() == 0 {
                self.abort_source(sk, ErrorCode::Revoked);
            }
            return;
        }
        match result {
            Ok(data) if data.len() == len as usize => {
                s.deadline = self.now.after(self.cfg.op_timeout);
                let (node, sink) = (s.dst_node, s.sink.unwrap_or(0));
                self.metrics.bytes_copied_out += data.len() as u64;
                self.send_peer(node, PeerMsg::CopyChunk { sink, offset, data });
            }
            _ => self.abort_source(sk, ErrorCode::MemoryFault),
        }
    }

    pub(crate) fn on_copy_chunk(&mut self, from: NodeId, sink: u64, offset: u64, data: Vec<u8>) {
        let key: SinkKey = key_from_u64(sink);
        let Some(s) = self.sinks.get_mut(key) else {
            return;
        };
        if s.from != from {
            return;
        }
        s.deadline = self.now.after(self.cfg.op_timeout);
        let (source, proc, addr, len, dst) = (s.source, s.proc, s.addr, s.len, s.dst);
        let end = offset.checked_add(data.len() as u64);
        let check = if !self.store.nodes.contains_key(dst) {
            Err(ErrorCode::Revoked)
        } else if end.is_none_or(|e| e > len) {
            Err(ErrorCode::OutOfBounds)
        } else {
            Ok(())
        };
        if let Err(e) = check {
            self.send_peer(
                from,
                PeerMsg::CopyAck {
                    source,
                    offset,
                    result: Err(e),
                },
            );
            return;
        }
        let xfer = self.next_xfer;
        self.next_xfer += 1;
        self.xfers.insert(
            xfer,
            Xfer::Write {
                sink: key,
                dst,
                offset,
                len: data.len() as u32,
                proc,
            },
        );
        self.send_process(
            proc,
            &ControllerMsg::MemWrite {
                xfer,
                addr: addr + offset,
                data,
            },
        );
    }

    pub(crate) fn on_mem_write_reply(
        &mut self,
        proc: ProcessKey,
        xfer: u64,
        result: Result<(), ErrorCode>,
    ) {
        let (key, offset, len) = match self.xfers.get(&xfer) {
            Some(Xfer::Write {
                sink,
                offset,
                len,
                proc: p,
                ..
            }) if *p == proc => (*sink, *offset, *len),
            _ => return,
        };
        self.xfers.remove(&xfer);
        let Some(s) = self.sinks.get(key) else {
            return self.barriers_progress();
        };
        let (from, source) = (s.from, s.source);
        let result = result.map_err(|_| ErrorCode::MemoryFault);
        if result.is_ok() {
            self.metrics.bytes_copied_in += len as u64;
        }
        self.send_peer(
            from,
            PeerMsg::CopyAck {
                source,
                offset,
                result,
            },
        );
        self.barriers_progress();
    }

    pub(crate) fn on_copy_ack(
        &mut self,
        from: NodeId,
        source: u64,
        offset: u64,
        result: Result<(), ErrorCode>,
    ) {
        let sk: SourceKey = key_from_u64(source);
        let chunk = self.cfg.copy_chunk as u64;
        let alive = self
            .sources
            .get(sk)
            .is_some_and(|s| self.store.nodes.contains_key(s.src));
        let Some(s) = self.sources.get_mut(sk) else {
            return;
        };
        if s.dst_node != from || offset >= s.next || s.unacked() == 0 {
            return;
        }
        if !alive {
            // Revoked: count the chunk settled; fail once all have.
            s.inflight -= 1;
            if s.unacked() == 0 {
                self.abort_source(sk, ErrorCode::Revoked);
            }
            return;
        }
        if let Err(e) = result {
            return self.abort_source(sk, e);
        }
        s.acked += chunk.min(s.len - offset);
        s.inflight = s.inflight.saturating_sub(1);
        s.deadline = self.now.after(self.cfg.op_timeout);
        if s.acked >= s.len {
            self.finish_source(sk);
        } else {
            self.pump(sk);
        }
    }

    pub(crate) fn on_copy_close(&mut self, from: NodeId, sink: u64) {
        let key: SinkKey = key_from_u64(sink);
        if self.sinks.get(key).is_some_and(|s| s.from == from) {
            self.sinks.remove(key);
        }
    }

    fn finish_source(&mut self, sk: SourceKey) {
        let s = self.sources.remove(sk).expect("caller checked");
        if let Some(sink) = s.sink {
            self.send_peer(s.dst_node, PeerMsg::CopyClose { sink });
        }
        self.answer(s.origin, Ok(PeerReply::Copied { len: s.len }));
        self.barriers_progress();
    }

    pub(crate) fn abort_source(&mut self, sk: SourceKey, e: ErrorCode) {
        let Some(s) = self.sources.remove(sk) else {
            return;
        };
        if s.unacked() > 0 {
            // Chunks may still land: revokes waiting for them cannot
            // promise that none will.
            for b in self.revoke_barriers.values_mut() {
                if b.sources.contains(&sk) {
                    b.unsettled = true;
                }
            }
        }
        if let Some(sink) = s.sink {
            self.send_peer(s.dst_node, PeerMsg::CopyClose { sink });
        }
        self.answer(s.origin, Err(e));
        self.barriers_progress();
    }

    /// Revokes `key` (and its subtree) for `origin` and answers once the
    /// copies it stopped have no bytes in flight.
    pub(crate) fn revoke_cap(&mut self, origin: Origin, key: CapKey) {
        if let Err(e) = self.store.revoke(key, &mut self.fallout) {
            return self.answer(origin, Err(e));
        }
        let dead_sources: Vec<SourceKey> = self
            .sources
            .iter()
            .filter(|(_, s)| !self.store.nodes.contains_key(s.src))
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
                self.abort_source(sk, ErrorCode::Revoked);
            } else {
                barrier.sources.push(sk);
            }
        }
        barrier.writes = self
            .xfers
            .iter()
            .filter(|(_, x)| matches!(x, Xfer::Write { dst, .. } if !self.store.nodes.contains_key(*dst)))
            .map(|(k, _)| *k)
            .collect();
        if barrier.sources.is_empty() && barrier.writes.is_empty() {
            return self.answer(origin, Ok(PeerReply::Done));
        }
        self.metrics.revokes_held_for_copies += 1;
        let deadline = self.now.after(self.cfg.op_timeout);
        let bk = self.revoke_barriers.insert(barrier);
        self.push_timer(deadline, Timer::Barrier(bk));
    }

    /// Answers the revokes whose copies have settled.
    fn barriers_progress(&mut self) {
        if self.revoke_barriers.is_empty() {
            return;
        }
        let mut done = Vec::new();
        for (k, b) in self.revoke_barriers.iter_mut() {
            b.sources.retain(|sk| self.sources.contains_key(*sk));
            b.writes.retain(|x| self.xfers.contains_key(x));
            if b.sources.is_empty() && b.writes.is_empty() {
                done.push(k);
            }
        }
        for k in done {
            let b = self.revoke_barriers.remove(k).expect("just found");
            let result = if b.unsettled {
                Err(ErrorCode::Timeout)
            } else {
                Ok(PeerReply::Done)
            };
            self.answer(b.origin, result);
        }
    }

    /// A revoke's in-flight bytes did not settle in time: its outcome for
    /// them is unknown.
    pub(crate) fn on_barrier_timer(&mut self, bk: BarrierKey) {
        if let Some(b) = self.revoke_barriers.remove(bk) {
            self.answer(b.origin, Err(ErrorCode::Timeout));
        }
    }

    pub(crate) fn on_source_timer(&mut self, sk: SourceKey) {
        let Some(s) = self.sources.get(sk) else {
            return;
        };
        if s.deadline <= self.now {
            self.abort_source(sk, ErrorCode::Timeout);
        } else {
            let d = s.deadline;
            self.push_timer(d, Timer::Source(sk));
        }
    }

    pub(crate) fn on_sink_timer(&mut self, key: SinkKey) {
        let Some(s) = self.sinks.get(key) else { return };
        if s.deadline <= self.now {
            self.sinks.remove(key);
        } else {
            let d = s.deadline;
            self.push_timer(d, Timer::Sink(key));
        }
    }

    /// A process exited: copies waiting on its memory fail.
    pub(crate) fn fail_xfers_of(&mut self, proc: ProcessKey) {
        let mine: Vec<u64> = self
            .xfers
            .iter()
            .filter(|(_, x)| match x {
                Xfer::Read { proc: p, .. } | Xfer::Write { proc: p, .. } => *p == proc,
            })
            .map(|(k, _)| *k)
            .collect();
        for xfer in mine {
            match self.xfers.remove(&xfer) {
                Some(Xfer::Read { source, .. }) => self.abort_source(source, ErrorCode::Revoked),
                Some(Xfer::Write { sink, offset, .. }) => {
                    if let Some(s) = self.sinks.remove(sink) {
                        let ack = PeerMsg::CopyAck {
                            source: s.source,
                            offset,
                            result: Err(ErrorCode::Revoked),
                        };
                        self.send_peer(s.from, ack);
                    }
                }
                None => {}
            }
        }
        self.barriers_progress();
    }

    /// A peer is gone: copies to or from it fail.
    pub(crate) fn copies_peer_lost(&mut self, node: NodeId) {
        let sources: Vec<SourceKey> = self
            .sources
            .iter()
            .filter(|(_, s)| s.dst_node == node)
            .map(|(k, _)| k)
            .collect();
        for sk in sources {
            self.abort_source(sk, ErrorCode::PeerUnreachable);
        }
        self.sinks.retain(|_, s| s.from != node);
    }
}
