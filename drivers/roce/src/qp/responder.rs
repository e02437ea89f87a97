//! The responder half: receive queue, in-order execution of SEND, WRITE
//! and READ requests, duplicate handling, coalesced ACKs, NAKs and READ
//! responses.

use alloc::collections::VecDeque;

use super::{
    push_bounded, Ctx, Path, QpCaps, RecvWr, TxAddr, TxPacket, MAX_PACKETS_PER_MESSAGE,
    MAX_RD_ATOMIC,
};
use crate::counters::{DropReason, NakKind};
use crate::cq::{WcOpcode, WcStatus, WorkCompletion};
use crate::mr::{Access, Memory};
use crate::psn::Psn;
use crate::wire::{Aeth, NakCode, OpKind, Opcode, Position, RocePacket, Syndrome};
use crate::VerbsError;

/// Credit code "not limited" sent in every ACK (no end-to-end credits).
const UNLIMITED_CREDITS: u8 = 0x1F;

#[derive(Clone, Copy, Debug)]
struct ReadJob {
    psn: Psn,
    va: u64,
    rkey: u32,
    len: u32,
    npkts: u32,
    sent: u32,
}

#[derive(Clone, Copy, Debug)]
struct WriteCursor {
    va: u64,
    rkey: u32,
    remaining: u32,
    total: u32,
}

/// The responder state of one QP.
#[derive(Debug)]
pub(crate) struct Responder {
    epsn: Psn,
    msn: u32,
    rq: VecDeque<RecvWr>,
    rq_cap: usize,
    /// Bytes of a multi-packet SEND placed in the head receive so far.
    send_offset: Option<u32>,
    write: Option<WriteCursor>,
    /// A sequence-error NAK was sent for `epsn` (only one per error).
    nak_sent: bool,
    /// Coalesced ACK to send.
    ack: Option<Psn>,
    /// NAK to send (sequence error, RNR, or the final one before ERROR).
    nak: Option<(Syndrome, Psn)>,
    reads: VecDeque<ReadJob>,
    max_reads: u8,
    min_rnr_timer: u8,
}

fn nak_kind(s: Syndrome) -> NakKind {
    match s {
        Syndrome::Rnr { .. } => NakKind::Rnr,
        Syndrome::Nak(NakCode::SequenceError) => NakKind::SequenceError,
        Syndrome::Nak(NakCode::RemoteAccess) => NakKind::RemoteAccess,
        Syndrome::Nak(NakCode::RemoteOperational) => NakKind::RemoteOperational,
        Syndrome::Nak(NakCode::InvalidRequest) | Syndrome::Ack { .. } => NakKind::InvalidRequest,
    }
}

fn npkts(len: u32, mtu: u32) -> u32 {
    len.div_ceil(mtu).max(1)
}

impl Responder {
    pub(crate) fn new(rq_cap: usize) -> Responder {
        Responder {
            epsn: Psn::new(0),
            msn: 0,
            rq: VecDeque::with_capacity(rq_cap),
            rq_cap,
            send_offset: None,
            write: None,
            nak_sent: false,
            ack: None,
            nak: None,
            reads: VecDeque::with_capacity(usize::from(MAX_RD_ATOMIC)),
            max_reads: 1,
            min_rnr_timer: 0,
        }
    }

    pub(crate) fn start(&mut self, epsn: Psn, max_reads: u8, min_rnr_timer: u8) {
        self.epsn = epsn;
        self.max_reads = max_reads;
        self.min_rnr_timer = min_rnr_timer;
    }

    pub(crate) fn post(&mut self, wr: RecvWr) -> Result<(), VerbsError> {
        push_bounded(&mut self.rq, self.rq_cap, wr).map_err(|_| VerbsError::QueueFull)
    }

    pub(crate) fn pop_recv(&mut self) -> Option<RecvWr> {
        self.send_offset = None;
        self.rq.pop_front()
    }

    pub(crate) fn clear_for_error(&mut self) {
        self.reads.clear();
        self.ack = None;
        self.write = None;
        self.send_offset = None;
    }

    pub(crate) fn has_final_nak(&self) -> bool {
        self.nak.is_some()
    }

    pub(crate) fn wants_transmit(&self) -> bool {
        self.nak.is_some() || self.ack.is_some() || !self.reads.is_empty()
    }

    fn nak_packet(&self, syndrome: Syndrome, psn: Psn) -> TxPacket {
        TxPacket {
            opcode: Opcode::Acknowledge,
            psn,
            ack_req: false,
            reth: None,
            aeth: Some(Aeth {
                syndrome,
                msn: self.msn,
            }),
            imm: None,
            payload: None,
        }
    }

    /// The NAK that explains why the QP went to ERROR, once.
    pub(crate) fn take_final_nak(&mut self) -> Option<(TxPacket, NakKind)> {
        let (s, psn) = self.nak.take()?;
        Some((self.nak_packet(s, psn), nak_kind(s)))
    }

    /// Records a NAK that ends the connection; the caller moves the QP to
    /// ERROR, which sends it.
    fn fatal(&mut self, code: NakCode, psn: Psn) -> bool {
        self.nak = Some((Syndrome::Nak(code), psn));
        true
    }

    fn complete_recv<M: Memory + ?Sized>(
        &mut self,
        status: WcStatus,
        opcode: WcOpcode,
        byte_len: u32,
        imm: Option<u32>,
        caps: QpCaps,
        qpn: u32,
        ctx: &mut Ctx<'_, M>,
    ) {
        if let Some(wr) = self.pop_recv() {
            let wc = WorkCompletion {
                wr_id: wr.wr_id,
                status,
                opcode,
                byte_len,
                imm,
                qpn,
            };
            ctx.complete(caps.recv_cq, wc);
        }
    }

    /// Handles a request packet. Returns whether the QP fails.
    pub(crate) fn on_request<M: Memory + ?Sized>(
        &mut self,
        p: &RocePacket<'_>,
        path: &Path,
        access: Access,
        caps: QpCaps,
        qpn: u32,
        ctx: &mut Ctx<'_, M>,
    ) -> bool {
        let psn = p.bth.psn;
        let ahead = psn.distance_from(self.epsn);
        if ahead != 0 {
            if ahead < Psn::HALF {
                // A gap: NAK once, then drop until `epsn` arrives.
                if self.nak_sent {
                    ctx.counters.drop(DropReason::OutOfSequence);
                } else {
                    self.nak_sent = true;
                    self.nak = Some((Syndrome::Nak(NakCode::SequenceError), self.epsn));
                }
            } else {
                ctx.counters.duplicates += 1;
                if p.bth.opcode == Opcode::ReadRequest {
                    self.duplicate_read(p, path, access, ctx);
                } else {
                    self.ack = Some(self.epsn.sub(1));
                }
            }
            return false;
        }
        self.nak_sent = false;
        let op = p.bth.opcode;
        let pos = op.position();
        let cont = matches!(pos, Position::Middle | Position::Last);
        let in_order = match op.kind() {
            OpKind::Send => self.write.is_none() && self.send_offset.is_some() == cont,
            OpKind::Write => self.send_offset.is_none() && self.write.is_some() == cont,
            _ => self.send_offset.is_none() && self.write.is_none(),
        };
        let n = p.payload.len() as u32;
        let len_ok = match pos {
            Position::First | Position::Middle => n == path.mtu,
            Position::Last => (1..=path.mtu).contains(&n),
            Position::Only => n <= path.mtu,
        };
        if !in_order || !len_ok {
            return self.fatal(NakCode::InvalidRequest, psn);
        }
        let fatal = match op.kind() {
            OpKind::Send => self.on_send(p, caps, qpn, ctx),
            OpKind::Write => self.on_write(p, path, access, caps, qpn, ctx),
            _ => return self.on_read(p, path, access, ctx),
        };
        match fatal {
            Step::Done => {
                self.epsn = self.epsn.add(1);
                if p.bth.ack_req {
                    self.ack = Some(psn);
                }
                false
            }
            Step::Rnr => {
                self.nak = Some((
                    Syndrome::Rnr {
                        timer: self.min_rnr_timer,
                    },
                    psn,
                ));
                false
            }
            Step::Fatal(code) => self.fatal(code, psn),
        }
    }

    fn on_send<M: Memory + ?Sized>(
        &mut self,
        p: &RocePacket<'_>,
        caps: QpCaps,
        qpn: u32,
        ctx: &mut Ctx<'_, M>,
    ) -> Step {
        let Some(wr) = self.rq.front().copied() else {
            return Step::Rnr;
        };
        let off = self.send_offset.unwrap_or(0);
        let n = p.payload.len() as u32;
        let Some(end) = off.checked_add(n).filter(|&e| e <= wr.sge.len) else {
            self.complete_recv(
                WcStatus::LocalLength,
                WcOpcode::Recv,
                0,
                None,
                caps,
                qpn,
                ctx,
            );
            return Step::Fatal(NakCode::InvalidRequest);
        };
        if n > 0 {
            let dst = wr.sge.addr.checked_add(u64::from(off));
            let ok = dst.is_some_and(|d| {
                ctx.mrs
                    .check_local(wr.sge.lkey, d, u64::from(n), Access::LOCAL_WRITE)
                    .is_ok()
                    && ctx.mem.write(d, p.payload).is_ok()
            });
            if !ok {
                self.complete_recv(
                    WcStatus::LocalProtection,
                    WcOpcode::Recv,
                    0,
                    None,
                    caps,
                    qpn,
                    ctx,
                );
                return Step::Fatal(NakCode::RemoteOperational);
            }
        }
        if matches!(p.bth.opcode.position(), Position::Last | Position::Only) {
            self.msn = (self.msn + 1) & Psn::MASK;
            self.complete_recv(
                WcStatus::Success,
                WcOpcode::Recv,
                end,
                p.imm,
                caps,
                qpn,
                ctx,
            );
        } else {
            self.send_offset = Some(end);
        }
        Step::Done
    }

    fn on_write<M: Memory + ?Sized>(
        &mut self,
        p: &RocePacket<'_>,
        path: &Path,
        access: Access,
        caps: QpCaps,
        qpn: u32,
        ctx: &mut Ctx<'_, M>,
    ) -> Step {
        let pos = p.bth.opcode.position();
        let n = p.payload.len() as u32;
        let mut cur = match (self.write, p.reth) {
            (None, Some(reth)) => {
                if !access.contains(Access::REMOTE_WRITE)
                    || (reth.len > 0
                        && ctx
                            .mrs
                            .check_remote(
                                reth.rkey,
                                reth.va,
                                u64::from(reth.len),
                                Access::REMOTE_WRITE,
                            )
                            .is_err())
                {
                    return Step::Fatal(NakCode::RemoteAccess);
                }
                if pos == Position::First && reth.len <= path.mtu {
                    return Step::Fatal(NakCode::InvalidRequest);
                }
                WriteCursor {
                    va: reth.va,
                    rkey: reth.rkey,
                    remaining: reth.len,
                    total: reth.len,
                }
            }
            (Some(cur), None) => cur,
            _ => return Step::Fatal(NakCode::InvalidRequest),
        };
        let last = matches!(pos, Position::Last | Position::Only);
        if n > cur.remaining || (last && n != cur.remaining) {
            return Step::Fatal(NakCode::InvalidRequest);
        }
        if p.imm.is_some() && self.rq.is_empty() {
            return Step::Rnr;
        }
        if n > 0 {
            if ctx
                .mrs
                .check_remote(cur.rkey, cur.va, u64::from(n), Access::REMOTE_WRITE)
                .is_err()
            {
                return Step::Fatal(NakCode::RemoteAccess);
            }
            if ctx.mem.write(cur.va, p.payload).is_err() {
                return Step::Fatal(NakCode::RemoteOperational);
            }
            cur.va = cur.va.wrapping_add(u64::from(n));
            cur.remaining -= n;
        }
        if last {
            self.write = None;
            self.msn = (self.msn + 1) & Psn::MASK;
            if p.imm.is_some() {
                self.complete_recv(
                    WcStatus::Success,
                    WcOpcode::RecvRdmaWithImm,
                    cur.total,
                    p.imm,
                    caps,
                    qpn,
                    ctx,
                );
            }
        } else {
            self.write = Some(cur);
        }
        Step::Done
    }

    fn read_job<M: Memory + ?Sized>(
        p: &RocePacket<'_>,
        path: &Path,
        access: Access,
        ctx: &Ctx<'_, M>,
    ) -> Result<ReadJob, NakCode> {
        let reth = p.reth.ok_or(NakCode::InvalidRequest)?;
        if !access.contains(Access::REMOTE_READ)
            || (reth.len > 0
                && ctx
                    .mrs
                    .check_remote(reth.rkey, reth.va, u64::from(reth.len), Access::REMOTE_READ)
                    .is_err())
        {
            return Err(NakCode::RemoteAccess);
        }
        let n = npkts(reth.len, path.mtu);
        if n > MAX_PACKETS_PER_MESSAGE || reth.len > 1 << 31 {
            return Err(NakCode::InvalidRequest);
        }
        Ok(ReadJob {
            psn: p.bth.psn,
            va: reth.va,
            rkey: reth.rkey,
            len: reth.len,
            npkts: n,
            sent: 0,
        })
    }

    fn on_read<M: Memory + ?Sized>(
        &mut self,
        p: &RocePacket<'_>,
        path: &Path,
        access: Access,
        ctx: &mut Ctx<'_, M>,
    ) -> bool {
        let job = match Self::read_job(p, path, access, ctx) {
            Ok(job) => job,
            Err(code) => return self.fatal(code, p.bth.psn),
        };
        if self.reads.len() >= usize::from(self.max_reads) {
            return self.fatal(NakCode::InvalidRequest, p.bth.psn);
        }
        self.reads.push_back(job);
        self.epsn = self.epsn.add(job.npkts);
        self.msn = (self.msn + 1) & Psn::MASK;
        false
    }

    /// A READ request already executed (its responses were lost, or the
    /// requester re-asks for the rest of them): serve it again.
    fn duplicate_read<M: Memory + ?Sized>(
        &mut self,
        p: &RocePacket<'_>,
        path: &Path,
        access: Access,
        ctx: &mut Ctx<'_, M>,
    ) {
        let Ok(job) = Self::read_job(p, path, access, ctx) else {
            ctx.counters.drop(DropReason::DuplicateRead);
            return;
        };
        // The responses must all lie before `epsn`: a duplicate cannot
        // claim PSNs not yet used.
        let end = job.psn.add(job.npkts);
        if end.distance_from(job.psn) != job.npkts || self.epsn.before(end) {
            ctx.counters.drop(DropReason::DuplicateRead);
            return;
        }
        // The requester re-sends everything from here: forget responses
        // at or after this PSN.
        self.reads
            .retain(|r| r.psn.add(r.npkts - 1).before(job.psn));
        if self.reads.len() >= usize::from(MAX_RD_ATOMIC) {
            ctx.counters.drop(DropReason::DuplicateRead);
            return;
        }
        self.reads.push_back(job);
    }

    /// The next ACK, NAK or READ response. Returns the frame length and
    /// whether the QP fails.
    pub(crate) fn poll_transmit<M: Memory + ?Sized>(
        &mut self,
        path: &Path,
        addr: &TxAddr,
        buf: &mut [u8],
        ctx: &mut Ctx<'_, M>,
    ) -> (Option<usize>, bool) {
        let front = self.reads.front().map(|r| r.psn);
        if let Some((syn, psn)) = self.nak.filter(|_| front.is_none()) {
            let out = self.send(path, addr, &self.nak_packet(syn, psn), buf, ctx);
            if out.is_some() {
                self.nak = None;
                self.ack = None;
                ctx.counters.naks_sent[nak_kind(syn) as usize] += 1;
            }
            return (out, false);
        }
        if let Some(a) = self.ack.filter(|a| front.is_none_or(|f| a.before(f))) {
            let pkt = self.nak_packet(
                Syndrome::Ack {
                    credits: UNLIMITED_CREDITS,
                },
                a,
            );
            let out = self.send(path, addr, &pkt, buf, ctx);
            if out.is_some() {
                self.ack = None;
                ctx.counters.acks_sent += 1;
            }
            return (out, false);
        }
        let Some(job) = self.reads.front().copied() else {
            return (None, false);
        };
        let k = job.sent;
        let psn = job.psn.add(k);
        let off = k * path.mtu;
        let plen = (job.len - off).min(path.mtu);
        let pos = match (k, job.npkts) {
            (_, 1) => Position::Only,
            (0, _) => Position::First,
            (k, n) if k + 1 == n => Position::Last,
            _ => Position::Middle,
        };
        let opcode = Opcode::for_message(OpKind::ReadResponse, pos, false);
        let va = job.va.wrapping_add(u64::from(off));
        if plen > 0
            && ctx
                .mrs
                .check_remote(job.rkey, va, u64::from(plen), Access::REMOTE_READ)
                .is_err()
        {
            self.reads.clear();
            return (None, self.fatal(NakCode::RemoteAccess, psn));
        }
        let pkt = TxPacket {
            opcode,
            psn,
            ack_req: false,
            reth: None,
            aeth: opcode.has_aeth().then_some(Aeth {
                syndrome: Syndrome::Ack {
                    credits: UNLIMITED_CREDITS,
                },
                msn: self.msn,
            }),
            imm: None,
            payload: (plen > 0).then_some((va, plen)),
        };
        match path.emit(addr, &pkt, ctx.mem, buf) {
            Ok(Some(n)) => {
                if let Some(j) = self.reads.front_mut() {
                    j.sent += 1;
                    if j.sent == j.npkts {
                        self.reads.pop_front();
                    }
                }
                (Some(n), false)
            }
            Ok(None) => (None, false),
            Err(_) => {
                self.reads.clear();
                (None, self.fatal(NakCode::RemoteOperational, psn))
            }
        }
    }

    fn send<M: Memory + ?Sized>(
        &self,
        path: &Path,
        addr: &TxAddr,
        pkt: &TxPacket,
        buf: &mut [u8],
        ctx: &mut Ctx<'_, M>,
    ) -> Option<usize> {
        path.emit(addr, pkt, ctx.mem, buf).ok().flatten()
    }
}

/// Outcome of executing one in-order request packet.
enum Step {
    Done,
    Rnr,
    Fatal(NakCode),
}
