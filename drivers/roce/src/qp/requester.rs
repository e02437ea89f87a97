//! The requester half: send queue, segmentation, PSNs, acknowledgements,
//! retransmission (timeout, go-back-N after a sequence NAK, RNR waits).

use alloc::collections::VecDeque;
use core::time::Duration;

use super::{
    push_bounded, Ctx, Path, QpCaps, RtsAttr, SendOp, SendWr, TxAddr, TxPacket,
    MAX_PACKETS_PER_MESSAGE,
};
use crate::counters::{DropReason, NakKind};
use crate::cq::{WcOpcode, WcStatus, WorkCompletion};
use crate::mr::{Access, Memory};
use crate::psn::Psn;
use crate::wire::{
    rnr_timer_micros, NakCode, OpKind, Opcode, Position, Reth, RocePacket, Syndrome,
};
use crate::{Instant, VerbsError};

/// Packets in flight (sent, not acknowledged) at most.
pub const SEND_WINDOW: u32 = 1024;
/// The requester asks for an acknowledgement at least every this many
/// packets (and on the last packet of every message).
pub const ACK_REQ_EVERY: u32 = 64;

#[derive(Clone, Copy, Debug)]
struct Wqe {
    wr: SendWr,
    first: Psn,
    npkts: u32,
    assigned: bool,
}

impl Wqe {
    fn is_read(&self) -> bool {
        matches!(self.wr.op, SendOp::Read(_))
    }
}

pub(crate) fn wc_opcode(op: &SendOp) -> WcOpcode {
    match op {
        SendOp::Send | SendOp::SendImm(_) => WcOpcode::Send,
        SendOp::Write(_) | SendOp::WriteImm(..) => WcOpcode::RdmaWrite,
        SendOp::Read(_) => WcOpcode::RdmaRead,
    }
}

fn position(k: u32, npkts: u32) -> Position {
    match (k, npkts) {
        (_, 1) => Position::Only,
        (0, _) => Position::First,
        (k, n) if k + 1 == n => Position::Last,
        _ => Position::Middle,
    }
}

/// The requester state of one QP.
#[derive(Debug)]
pub(crate) struct Requester {
    sq: VecDeque<Wqe>,
    cap: usize,
    /// PSN of the next WQE to be assigned PSNs.
    next_psn: Psn,
    /// Oldest unacknowledged PSN.
    una: Psn,
    /// Index into `sq` of the WQE to (re)transmit next, and packet in it.
    cursor: usize,
    cursor_pkt: u32,
    /// Packets before this PSN that are sent again are retransmits.
    resend_until: Psn,
    timer: Option<Instant>,
    rnr_until: Option<Instant>,
    retries_left: u8,
    rnr_left: u8,
    retry_cnt: u8,
    rnr_retry: u8,
    ack_timeout: Duration,
    max_rd_atomic: u8,
    reads_out: u8,
    /// `una` when the last go-back-N started, until progress is made.
    retried_at: Option<Psn>,
}

enum Acked {
    Done,
    /// An outstanding READ lost responses before the acknowledged PSN.
    Hole,
}

impl Requester {
    pub(crate) fn new(cap: usize) -> Requester {
        Requester {
            sq: VecDeque::with_capacity(cap),
            cap,
            next_psn: Psn::new(0),
            una: Psn::new(0),
            cursor: 0,
            cursor_pkt: 0,
            resend_until: Psn::new(0),
            timer: None,
            rnr_until: None,
            retries_left: 0,
            rnr_left: 0,
            retry_cnt: 0,
            rnr_retry: 0,
            ack_timeout: Duration::ZERO,
            max_rd_atomic: 1,
            reads_out: 0,
            retried_at: None,
        }
    }

    pub(crate) fn start(&mut self, psn: Psn, a: &RtsAttr) {
        self.next_psn = psn;
        self.una = psn;
        self.resend_until = psn;
        self.retry_cnt = a.retry_cnt;
        self.retries_left = a.retry_cnt;
        self.rnr_retry = a.rnr_retry;
        self.rnr_left = a.rnr_retry;
        self.ack_timeout = a.ack_timeout;
        self.max_rd_atomic = a.max_rd_atomic;
    }

    pub(crate) fn post(&mut self, wr: SendWr, mtu: u32) -> Result<(), VerbsError> {
        if wr.sge.len > 1 << 31 {
            return Err(VerbsError::MessageTooLong);
        }
        let npkts = wr.sge.len.div_ceil(mtu).max(1);
        if npkts > MAX_PACKETS_PER_MESSAGE {
            return Err(VerbsError::MessageTooLong);
        }
        let wqe = Wqe {
            wr,
            first: Psn::new(0),
            npkts,
            assigned: false,
        };
        push_bounded(&mut self.sq, self.cap, wqe).map_err(|_| VerbsError::QueueFull)
    }

    pub(crate) fn pop_unfinished(&mut self) -> Option<SendWr> {
        self.cursor = 0;
        self.cursor_pkt = 0;
        self.reads_out = 0;
        self.timer = None;
        self.rnr_until = None;
        self.sq.pop_front().map(|w| w.wr)
    }

    fn in_flight(&self) -> u32 {
        self.next_psn.distance_from(self.una)
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        match (self.timer, self.rnr_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub(crate) fn wants_transmit(&self, now: Instant) -> bool {
        self.rnr_until.is_none_or(|t| t <= now) && self.cursor < self.sq.len()
    }

    fn pop_head(&mut self) -> Option<Wqe> {
        let w = self.sq.pop_front()?;
        if self.cursor > 0 {
            self.cursor -= 1;
        } else {
            self.cursor_pkt = 0;
        }
        if w.is_read() {
            self.reads_out = self.reads_out.saturating_sub(1);
        }
        Some(w)
    }

    /// Where PSN `psn` lives: `(index, packet)`; the first unassigned WQE
    /// if no assigned one holds it.
    fn locate(&self, psn: Psn) -> (usize, u32) {
        for (i, w) in self.sq.iter().enumerate() {
            if !w.assigned {
                return (i, 0);
            }
            if psn.in_range(w.first, w.npkts) {
                return (i, psn.distance_from(w.first));
            }
        }
        (self.sq.len(), 0)
    }

    /// Go back to `psn` and send everything from there again.
    fn rewind(&mut self, psn: Psn) {
        (self.cursor, self.cursor_pkt) = self.locate(psn);
        self.resend_until = self.next_psn;
    }

    /// Completes the WQE at `index` with `status` after flushing the ones
    /// before it; the caller moves the QP to ERROR.
    fn fail_at<M: Memory + ?Sized>(
        &mut self,
        index: usize,
        status: WcStatus,
        caps: QpCaps,
        qpn: u32,
        ctx: &mut Ctx<'_, M>,
    ) {
        for i in 0..=index {
            let Some(w) = self.pop_head() else { break };
            let st = if i == index {
                status
            } else {
                WcStatus::WrFlush
            };
            let wc = WorkCompletion {
                wr_id: w.wr.wr_id,
                status: st,
                opcode: wc_opcode(&w.wr.op),
                byte_len: 0,
                imm: None,
                qpn,
            };
            ctx.complete(caps.send_cq, wc);
        }
    }

    fn complete_ok<M: Memory + ?Sized>(w: &Wqe, caps: QpCaps, qpn: u32, ctx: &mut Ctx<'_, M>) {
        let wc = WorkCompletion {
            wr_id: w.wr.wr_id,
            status: WcStatus::Success,
            opcode: wc_opcode(&w.wr.op),
            byte_len: w.wr.sge.len,
            imm: None,
            qpn,
        };
        ctx.complete(caps.send_cq, wc);
    }

    /// Everything up to and including `p` (which is at or after `una`) is
    /// acknowledged.
    fn ack_through<M: Memory + ?Sized>(
        &mut self,
        p: Psn,
        caps: QpCaps,
        qpn: u32,
        ctx: &mut Ctx<'_, M>,
    ) -> Acked {
        while let Some(w) = self.sq.front().copied() {
            if !w.assigned || p.before(w.first) {
                break;
            }
            if w.is_read() {
                return Acked::Hole;
            }
            let last = w.first.add(w.npkts - 1);
            if last.before(p) || last == p {
                self.pop_head();
                self.una = last.add(1);
                Self::complete_ok(&w, caps, qpn, ctx);
            } else {
                self.una = p.add(1);
                break;
            }
        }
        Acked::Done
    }

    /// Retransmit from `psn`; without progress this uses up a retry.
    /// Returns whether the QP fails.
    fn retry_from<M: Memory + ?Sized>(
        &mut self,
        psn: Psn,
        progressed: bool,
        timeout: bool,
        caps: QpCaps,
        qpn: u32,
        ctx: &mut Ctx<'_, M>,
    ) -> bool {
        // A NAK or a gap seen again at the same `una` after a go-back-N
        // started (late or reordered responses of the old stream) changes
        // nothing; only timeouts and new gaps use up retries.
        if !progressed && !timeout && self.retried_at == Some(self.una) {
            return false;
        }
        self.retried_at = Some(self.una);
        if !progressed {
            if self.retries_left == 0 {
                self.fail_at(0, WcStatus::RetryExceeded, caps, qpn, ctx);
                return true;
            }
            self.retries_left -= 1;
        }
        self.rewind(psn);
        false
    }

    /// After `una` moved: reset retry counts, restart or stop the timer,
    /// and skip the cursor past what is acknowledged.
    fn progressed(&mut self, now: Instant) {
        self.retried_at = None;
        self.retries_left = self.retry_cnt;
        self.rnr_left = self.rnr_retry;
        self.timer = (self.in_flight() != 0 && self.ack_timeout != Duration::ZERO)
            .then(|| now.after(self.ack_timeout));
        if let Some(w) = self.sq.get(self.cursor) {
            if w.assigned && w.first.add(self.cursor_pkt).before(self.una) {
                (self.cursor, self.cursor_pkt) = self.locate(self.una);
            }
        }
    }

    /// Handles an ACK, NAK or READ response. Returns whether the QP fails.
    pub(crate) fn on_response<M: Memory + ?Sized>(
        &mut self,
        p: &RocePacket<'_>,
        path: &Path,
        caps: QpCaps,
        qpn: u32,
        ctx: &mut Ctx<'_, M>,
    ) -> bool {
        let psn = p.bth.psn;
        if !psn.in_range(self.una, self.in_flight()) {
            ctx.counters.drop(DropReason::StaleResponse);
            return false;
        }
        let una_before = self.una;
        let fatal = if p.bth.opcode.kind() == OpKind::ReadResponse {
            self.on_read_response(p, path, caps, qpn, ctx)
        } else {
            self.on_ack(p, caps, qpn, ctx)
        };
        if !fatal && self.una != una_before {
            self.progressed(ctx.now);
        }
        fatal
    }

    fn on_ack<M: Memory + ?Sized>(
        &mut self,
        p: &RocePacket<'_>,
        caps: QpCaps,
        qpn: u32,
        ctx: &mut Ctx<'_, M>,
    ) -> bool {
        let psn = p.bth.psn;
        let Some(aeth) = p.aeth else {
            ctx.counters.drop(DropReason::BadResponse);
            return false;
        };
        let una_before = self.una;
        // A NAK (of any kind) at `psn` acknowledges everything before it.
        let through = match aeth.syndrome {
            Syndrome::Ack { .. } => Some(psn),
            _ if psn == self.una => None,
            _ => Some(psn.sub(1)),
        };
        if let Some(t) = through {
            if let Acked::Hole = self.ack_through(t, caps, qpn, ctx) {
                // Responses of an outstanding READ were lost (implied NAK).
                let progressed = self.una != una_before;
                let una = self.una;
                return self.retry_from(una, progressed, false, caps, qpn, ctx);
            }
        }
        let progressed = self.una != una_before;
        match aeth.syndrome {
            Syndrome::Ack { .. } => false,
            Syndrome::Rnr { timer } => {
                ctx.counters.naks_received[NakKind::Rnr as usize] += 1;
                if self.rnr_left == 0 {
                    self.fail_at(0, WcStatus::RnrRetryExceeded, caps, qpn, ctx);
                    return true;
                }
                if self.rnr_retry != 7 {
                    self.rnr_left -= 1;
                }
                let wait = Duration::from_micros(u64::from(rnr_timer_micros(timer)));
                self.rnr_until = Some(ctx.now.after(wait));
                self.timer = None;
                self.rewind(psn);
                // Sequence NAKs for packets sent after the RNR'd one are
                // part of this retry, not new ones.
                self.retried_at = Some(self.una);
                false
            }
            Syndrome::Nak(NakCode::SequenceError) => {
                ctx.counters.naks_received[NakKind::SequenceError as usize] += 1;
                self.retry_from(psn, progressed, false, caps, qpn, ctx)
            }
            Syndrome::Nak(code) => {
                let (kind, status) = match code {
                    NakCode::RemoteAccess => (NakKind::RemoteAccess, WcStatus::RemoteAccess),
                    NakCode::RemoteOperational => {
                        (NakKind::RemoteOperational, WcStatus::RemoteOperational)
                    }
                    _ => (NakKind::InvalidRequest, WcStatus::RemoteInvalidRequest),
                };
                ctx.counters.naks_received[kind as usize] += 1;
                let (index, _) = self.locate(psn);
                self.fail_at(index, status, caps, qpn, ctx);
                true
            }
        }
    }

    fn on_read_response<M: Memory + ?Sized>(
        &mut self,
        p: &RocePacket<'_>,
        path: &Path,
        caps: QpCaps,
        qpn: u32,
        ctx: &mut Ctx<'_, M>,
    ) -> bool {
        let psn = p.bth.psn;
        if psn != self.una {
            // Earlier requests are implicitly acknowledged, unless a READ
            // before this one is missing responses.
            let before = self.una;
            if let Acked::Hole = self.ack_through(psn.sub(1), caps, qpn, ctx) {
                let progressed = self.una != before;
                let una = self.una;
                ctx.counters.drop(DropReason::StaleResponse);
                return self.retry_from(una, progressed, false, caps, qpn, ctx);
            }
        }
        let Some(w) = self.sq.front().copied() else {
            ctx.counters.drop(DropReason::UnexpectedOpcode);
            return false;
        };
        let SendOp::Read(_) = w.wr.op else {
            ctx.counters.drop(DropReason::UnexpectedOpcode);
            return false;
        };
        if !w.assigned || !psn.in_range(w.first, w.npkts) {
            ctx.counters.drop(DropReason::UnexpectedOpcode);
            return false;
        }
        let k = psn.distance_from(w.first);
        let last = k + 1 == w.npkts;
        let is_last_op = matches!(
            p.bth.opcode,
            Opcode::ReadResponseLast | Opcode::ReadResponseOnly
        );
        let off = k * path.mtu;
        let want = if last { w.wr.sge.len - off } else { path.mtu };
        if is_last_op != last || p.payload.len() != want as usize {
            ctx.counters.drop(DropReason::BadResponse);
            return false;
        }
        if want > 0 {
            let dst = w.wr.sge.addr.checked_add(u64::from(off));
            let ok = dst.is_some_and(|dst| {
                ctx.mrs
                    .check_local(w.wr.sge.lkey, dst, u64::from(want), Access::LOCAL_WRITE)
                    .is_ok()
                    && ctx.mem.write(dst, p.payload).is_ok()
            });
            if !ok {
                self.fail_at(0, WcStatus::LocalProtection, caps, qpn, ctx);
                return true;
            }
        }
        self.una = psn.add(1);
        if last {
            self.pop_head();
            Self::complete_ok(&w, caps, qpn, ctx);
        }
        false
    }

    /// A timer fired at `ctx.now`? Returns whether the QP fails.
    pub(crate) fn handle_timeout<M: Memory + ?Sized>(
        &mut self,
        caps: QpCaps,
        qpn: u32,
        ctx: &mut Ctx<'_, M>,
    ) -> bool {
        if self.rnr_until.is_some_and(|t| t <= ctx.now) {
            self.rnr_until = None;
        }
        if self.timer.is_none_or(|t| t > ctx.now) {
            return false;
        }
        self.timer = None;
        if self.in_flight() == 0 {
            return false;
        }
        ctx.counters.timeouts += 1;
        let una = self.una;
        self.retry_from(una, false, true, caps, qpn, ctx)
    }

    /// The next request packet, if the window, READ credits and RNR wait
    /// allow. Returns the frame length and whether the QP fails.
    pub(crate) fn poll_transmit<M: Memory + ?Sized>(
        &mut self,
        path: &Path,
        addr: &TxAddr,
        buf: &mut [u8],
        caps: QpCaps,
        qpn: u32,
        ctx: &mut Ctx<'_, M>,
    ) -> (Option<usize>, bool) {
        if let Some(t) = self.rnr_until {
            if ctx.now < t {
                return (None, false);
            }
            self.rnr_until = None;
        }
        let Some(&w) = self.sq.get(self.cursor) else {
            return (None, false);
        };
        let (first, fresh) = if w.assigned {
            (w.first, false)
        } else {
            if w.is_read() && self.reads_out >= self.max_rd_atomic {
                return (None, false);
            }
            (self.next_psn, true)
        };
        let k = self.cursor_pkt;
        let psn = first.add(k);
        let ahead = psn.distance_from(self.una);
        if ahead >= SEND_WINDOW && psn != self.una {
            return (None, false);
        }
        let mtu = path.mtu;
        let off = k * mtu;
        let sge = w.wr.sge;
        let (pkt, done_wqe) = match w.wr.op {
            SendOp::Read(ra) => {
                let reth = Reth {
                    va: ra.va.wrapping_add(u64::from(off)),
                    rkey: ra.rkey,
                    len: sge.len - off,
                };
                let pkt = TxPacket {
                    opcode: Opcode::ReadRequest,
                    psn,
                    ack_req: true,
                    reth: Some(reth),
                    aeth: None,
                    imm: None,
                    payload: None,
                };
                (pkt, true)
            }
            op => {
                let plen = (sge.len - off).min(mtu);
                let pos = position(k, w.npkts);
                let (kind, remote, imm) = match op {
                    SendOp::Send => (OpKind::Send, None, None),
                    SendOp::SendImm(i) => (OpKind::Send, None, Some(i)),
                    SendOp::Write(r) => (OpKind::Write, Some(r), None),
                    SendOp::WriteImm(r, i) => (OpKind::Write, Some(r), Some(i)),
                    SendOp::Read(_) => unreachable!("handled above"),
                };
                let opcode = Opcode::for_message(kind, pos, imm.is_some());
                let reth = remote.filter(|_| opcode.has_reth()).map(|r| Reth {
                    va: r.va,
                    rkey: r.rkey,
                    len: sge.len,
                });
                let payload = if plen == 0 {
                    None
                } else {
                    let src = sge.addr.checked_add(u64::from(off));
                    match src.filter(|&s| {
                        ctx.mrs
                            .check_local(sge.lkey, s, u64::from(plen), Access::NONE)
                            .is_ok()
                    }) {
                        Some(s) => Some((s, plen)),
                        None => {
                            self.fail_at(self.cursor, WcStatus::LocalProtection, caps, qpn, ctx);
                            return (None, true);
                        }
                    }
                };
                let last = k + 1 == w.npkts;
                let ack_req = last || (k + 1) % ACK_REQ_EVERY == 0 || ahead + 1 >= SEND_WINDOW;
                let pkt = TxPacket {
                    opcode,
                    psn,
                    ack_req,
                    reth,
                    aeth: None,
                    imm: imm.filter(|_| opcode.has_imm()),
                    payload,
                };
                (pkt, last)
            }
        };
        match path.emit(addr, &pkt, ctx.mem, buf) {
            Ok(Some(n)) => {
                if fresh {
                    let wq = &mut self.sq[self.cursor];
                    wq.first = self.next_psn;
                    wq.assigned = true;
                    self.next_psn = self.next_psn.add(w.npkts);
                    if w.is_read() {
                        self.reads_out += 1;
                    }
                }
                if done_wqe {
                    self.cursor += 1;
                    self.cursor_pkt = 0;
                } else {
                    self.cursor_pkt += 1;
                }
                if psn.before(self.resend_until) {
                    ctx.counters.retransmits += 1;
                }
                if self.timer.is_none() && self.ack_timeout != Duration::ZERO {
                    self.timer = Some(ctx.now.after(self.ack_timeout));
                }
                (Some(n), false)
            }
            Ok(None) => (None, false),
            Err(_) => {
                self.fail_at(self.cursor, WcStatus::LocalProtection, caps, qpn, ctx);
                (None, true)
            }
        }
    }
}
