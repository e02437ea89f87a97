//! Reliable-connection queue pairs: attributes, the state machine, and the
//! dispatch of packets to the requester and responder halves.

pub(crate) mod requester;
mod responder;

use alloc::collections::VecDeque;
use core::net::Ipv4Addr;
use core::time::Duration;

use crate::counters::{Counters, DropReason};
use crate::cq::{Cq, WcOpcode, WcStatus, WorkCompletion};
use crate::mr::{Access, Memory, MrTable};
use crate::psn::Psn;
use crate::wire::{self, Aeth, Bth, Gid, MacAddr, OpKind, Opcode, Reth, RoceHeaders, RocePacket};
use crate::{Instant, VerbsError};

pub(crate) use requester::Requester;
pub(crate) use responder::Responder;

/// The most RDMA READs a requester may have outstanding, and a responder
/// may queue, per QP.
pub const MAX_RD_ATOMIC: u8 = 16;
/// The most packets one message may take (keeps every message well inside
/// half the 24-bit PSN space).
pub const MAX_PACKETS_PER_MESSAGE: u32 = 1 << 20;

/// Queue pair states (IBA §10.3.1; SQD/SQE are not implemented).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QpState {
    /// Just created or reset: nothing is sent or received.
    Reset,
    /// Initialised: receives may be posted; nothing moves on the wire.
    Init,
    /// Ready to receive: the responder works, the requester does not.
    Rtr,
    /// Ready to send: both halves work.
    Rts,
    /// Failed: outstanding and new work requests complete with
    /// [`WcStatus::WrFlush`]; incoming packets are dropped.
    Error,
}

/// Path MTU: the payload bytes of one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mtu {
    /// 256 bytes.
    Mtu256,
    /// 512 bytes.
    Mtu512,
    /// 1024 bytes.
    Mtu1024,
    /// 2048 bytes.
    Mtu2048,
    /// 4096 bytes.
    Mtu4096,
}

impl Mtu {
    /// Every MTU, smallest first.
    pub const ALL: [Mtu; 5] = [
        Mtu::Mtu256,
        Mtu::Mtu512,
        Mtu::Mtu1024,
        Mtu::Mtu2048,
        Mtu::Mtu4096,
    ];

    /// Bytes.
    pub const fn bytes(self) -> u32 {
        match self {
            Mtu::Mtu256 => 256,
            Mtu::Mtu512 => 512,
            Mtu::Mtu1024 => 1024,
            Mtu::Mtu2048 => 2048,
            Mtu::Mtu4096 => 4096,
        }
    }

    /// The MTU of `bytes`, if it is one of the five.
    pub const fn from_bytes(bytes: u32) -> Option<Mtu> {
        Some(match bytes {
            256 => Mtu::Mtu256,
            512 => Mtu::Mtu512,
            1024 => Mtu::Mtu1024,
            2048 => Mtu::Mtu2048,
            4096 => Mtu::Mtu4096,
            _ => return None,
        })
    }
}

/// What a QP is created with (all its memory is allocated then).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpCaps {
    /// Completion queue of send work requests.
    pub send_cq: CqId,
    /// Completion queue of receive work requests.
    pub recv_cq: CqId,
    /// Send queue depth.
    pub sq_depth: u32,
    /// Receive queue depth.
    pub rq_depth: u32,
}

/// A completion queue handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CqId(pub(crate) u32);

/// RESET → INIT attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitAttr {
    /// Partition key (the default is [`wire::DEFAULT_PKEY`]).
    pub pkey: u16,
    /// Remote rights peers get through this QP
    /// ([`Access::REMOTE_READ`], [`Access::REMOTE_WRITE`]); each access
    /// also needs the right on the region.
    pub access: Access,
}

/// INIT → RTR attributes: the peer, as exchanged out of band.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RtrAttr {
    /// Path MTU.
    pub mtu: Mtu,
    /// The peer's QPN (24 bits).
    pub dest_qpn: u32,
    /// The first PSN expected from the peer (24 bits).
    pub rq_psn: u32,
    /// The peer's GID: must be IPv4-mapped.
    pub remote_gid: Gid,
    /// The peer's MAC, if the host knows it; otherwise it is resolved by
    /// ARP.
    pub dest_mac: Option<MacAddr>,
    /// READs the peer may have outstanding at us (1..=[`MAX_RD_ATOMIC`]).
    pub max_dest_rd_atomic: u8,
    /// RNR NAK timer code sent when no receive is posted (0..=31, IBA
    /// Table 45).
    pub min_rnr_timer: u8,
}

/// RTR → RTS attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RtsAttr {
    /// The first PSN sent (24 bits).
    pub sq_psn: u32,
    /// Time without an acknowledgement before retransmitting; zero means
    /// never (like ibverbs' timeout 0). See [`local_ack_timeout`].
    pub ack_timeout: Duration,
    /// Retransmissions (timeouts, NAK'd sequence errors without progress)
    /// before failing with [`WcStatus::RetryExceeded`] (0..=7).
    pub retry_cnt: u8,
    /// RNR retries before [`WcStatus::RnrRetryExceeded`] (0..=7; 7 means
    /// forever).
    pub rnr_retry: u8,
    /// READs outstanding at the peer (1..=[`MAX_RD_ATOMIC`]; at most the
    /// peer's `max_dest_rd_atomic`).
    pub max_rd_atomic: u8,
}

/// The ibverbs local ACK timeout code `t` as a duration: 4.096 µs × 2^t
/// (`t` = 0 is "infinite", returned as zero).
pub const fn local_ack_timeout(t: u8) -> Duration {
    if t == 0 || t > 31 {
        return Duration::ZERO;
    }
    Duration::from_nanos(4096u64 << t)
}

/// A scatter/gather entry: local memory named by an lkey.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sge {
    /// Address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Local key of the region holding it.
    pub lkey: u32,
}

/// Remote memory named by an rkey.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteAddr {
    /// Remote virtual address.
    pub va: u64,
    /// Remote key.
    pub rkey: u32,
}

/// A send work request's operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOp {
    /// SEND.
    Send,
    /// SEND with immediate data.
    SendImm(u32),
    /// RDMA WRITE.
    Write(RemoteAddr),
    /// RDMA WRITE with immediate data (consumes a receive at the peer).
    WriteImm(RemoteAddr, u32),
    /// RDMA READ into the local entry.
    Read(RemoteAddr),
}

/// A send work request (one scatter/gather entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendWr {
    /// Returned in the completion.
    pub wr_id: u64,
    /// Operation.
    pub op: SendOp,
    /// Local data (source, or destination of a READ).
    pub sge: Sge,
}

/// A receive work request (one scatter/gather entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvWr {
    /// Returned in the completion.
    pub wr_id: u64,
    /// Where a received SEND lands.
    pub sge: Sge,
}

/// What the QP halves need from the engine while handling one event.
pub(crate) struct Ctx<'a, M: Memory + ?Sized> {
    pub now: Instant,
    pub mrs: &'a MrTable,
    pub cqs: &'a mut [Option<Cq>],
    pub counters: &'a mut Counters,
    pub mem: &'a mut M,
}

impl<M: Memory + ?Sized> Ctx<'_, M> {
    pub(crate) fn complete(&mut self, cq: CqId, wc: WorkCompletion) {
        let pushed = self
            .cqs
            .get_mut(cq.0 as usize)
            .and_then(Option::as_mut)
            .is_some_and(|cq| cq.push(wc));
        if !pushed {
            self.counters.cq_overflows += 1;
        }
    }
}

/// Addresses of outgoing packets.
pub(crate) struct TxAddr {
    pub src_mac: MacAddr,
    pub dst_mac: MacAddr,
    pub src_ip: Ipv4Addr,
    pub ip_id: u16,
}

/// Everything about the connection fixed at RTR/RTS.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Path {
    pub mtu: u32,
    pub dest_qpn: u32,
    pub remote_ip: Ipv4Addr,
    pub pkey: u16,
    pub udp_src: u16,
}

/// One packet to build: headers and where its payload comes from.
pub(crate) struct TxPacket {
    pub opcode: Opcode,
    pub psn: Psn,
    pub ack_req: bool,
    pub reth: Option<Reth>,
    pub aeth: Option<Aeth>,
    pub imm: Option<u32>,
    /// Payload: `(addr, len)` in [`Memory`], already checked.
    pub payload: Option<(u64, u32)>,
}

impl Path {
    /// Builds `p` into `buf`. `Ok(None)`: `buf` too small.
    pub(crate) fn emit<M: Memory + ?Sized>(
        &self,
        addr: &TxAddr,
        p: &TxPacket,
        mem: &mut M,
        buf: &mut [u8],
    ) -> Result<Option<usize>, crate::mr::MemoryFault> {
        let h = RoceHeaders {
            dst_mac: addr.dst_mac,
            src_mac: addr.src_mac,
            src_ip: addr.src_ip,
            dst_ip: self.remote_ip,
            ip_id: addr.ip_id,
            udp_src: self.udp_src,
            bth: Bth {
                opcode: p.opcode,
                solicited: false,
                migreq: true,
                pad: 0,
                pkey: self.pkey,
                fecn: false,
                becn: false,
                dest_qp: self.dest_qpn,
                ack_req: p.ack_req,
                psn: p.psn,
            },
            reth: p.reth,
            aeth: p.aeth,
            imm: p.imm,
        };
        let (src, len) = p.payload.unwrap_or((0, 0));
        wire::emit_roce(buf, &h, len as usize, |out| {
            if out.is_empty() {
                Ok(())
            } else {
                mem.read(src, out)
            }
        })
    }
}

/// A reliable-connection queue pair.
#[derive(Debug)]
pub(crate) struct Qp {
    pub qpn: u32,
    pub state: QpState,
    pub caps: QpCaps,
    pub access: Access,
    pub path: Path,
    pub req: Requester,
    pub resp: Responder,
}

fn check(ok: bool, what: &'static str) -> Result<(), VerbsError> {
    if ok {
        Ok(())
    } else {
        Err(VerbsError::InvalidAttribute(what))
    }
}

impl Qp {
    pub(crate) fn new(qpn: u32, caps: QpCaps) -> Qp {
        Qp {
            qpn,
            state: QpState::Reset,
            caps,
            access: Access::NONE,
            path: Path {
                mtu: 256,
                dest_qpn: 0,
                remote_ip: Ipv4Addr::UNSPECIFIED,
                pkey: wire::DEFAULT_PKEY,
                udp_src: 0xC000 | (qpn as u16 & 0x3FFF),
            },
            req: Requester::new(caps.sq_depth as usize),
            resp: Responder::new(caps.rq_depth as usize),
        }
    }

    fn transition(&self, from: QpState, to: QpState) -> Result<(), VerbsError> {
        if self.state == from {
            Ok(())
        } else {
            Err(VerbsError::InvalidTransition {
                qpn: self.qpn,
                from: self.state,
                to,
            })
        }
    }

    pub(crate) fn modify_init(&mut self, a: &InitAttr) -> Result<(), VerbsError> {
        self.transition(QpState::Reset, QpState::Init)?;
        check(a.pkey & 0x7FFF != 0, "pkey: the invalid partition 0")?;
        self.path.pkey = a.pkey;
        self.access = a.access;
        self.state = QpState::Init;
        Ok(())
    }

    pub(crate) fn modify_rtr(&mut self, a: &RtrAttr) -> Result<Ipv4Addr, VerbsError> {
        self.transition(QpState::Init, QpState::Rtr)?;
        check(
            a.dest_qpn <= Psn::MASK && a.dest_qpn > 1,
            "dest_qpn: 2..2^24",
        )?;
        check(a.rq_psn <= Psn::MASK, "rq_psn: 24 bits")?;
        check(
            (1..=MAX_RD_ATOMIC).contains(&a.max_dest_rd_atomic),
            "max_dest_rd_atomic: 1..=16",
        )?;
        check(a.min_rnr_timer <= 31, "min_rnr_timer: 0..=31")?;
        let ip = a
            .remote_gid
            .ipv4()
            .ok_or(VerbsError::InvalidAttribute("remote_gid: not IPv4-mapped"))?;
        check(
            !ip.is_unspecified() && !ip.is_broadcast() && !ip.is_multicast(),
            "remote_gid: not a unicast IPv4 address",
        )?;
        self.path.mtu = a.mtu.bytes();
        self.path.dest_qpn = a.dest_qpn;
        self.path.remote_ip = ip;
        self.path.udp_src = 0xC000 | ((self.qpn ^ a.dest_qpn) as u16 & 0x3FFF);
        self.resp
            .start(Psn::new(a.rq_psn), a.max_dest_rd_atomic, a.min_rnr_timer);
        self.state = QpState::Rtr;
        Ok(ip)
    }

    pub(crate) fn modify_rts(&mut self, a: &RtsAttr) -> Result<(), VerbsError> {
        self.transition(QpState::Rtr, QpState::Rts)?;
        check(a.sq_psn <= Psn::MASK, "sq_psn: 24 bits")?;
        check(a.retry_cnt <= 7, "retry_cnt: 0..=7")?;
        check(a.rnr_retry <= 7, "rnr_retry: 0..=7")?;
        check(
            (1..=MAX_RD_ATOMIC).contains(&a.max_rd_atomic),
            "max_rd_atomic: 1..=16",
        )?;
        self.req.start(Psn::new(a.sq_psn), a);
        self.state = QpState::Rts;
        Ok(())
    }

    /// Any state → ERROR: flush both queues.
    pub(crate) fn enter_error<M: Memory + ?Sized>(&mut self, ctx: &mut Ctx<'_, M>) {
        if self.state == QpState::Error {
            return;
        }
        self.state = QpState::Error;
        let (qpn, caps) = (self.qpn, self.caps);
        while let Some(wr) = self.req.pop_unfinished() {
            let opcode = requester::wc_opcode(&wr.op);
            ctx.complete(caps.send_cq, flush(qpn, wr.wr_id, opcode));
        }
        while let Some(wr) = self.resp.pop_recv() {
            ctx.complete(caps.recv_cq, flush(qpn, wr.wr_id, WcOpcode::Recv));
        }
        self.resp.clear_for_error();
    }

    /// Any state → RESET: forget everything, no completions.
    pub(crate) fn reset(&mut self) {
        let (qpn, caps) = (self.qpn, self.caps);
        *self = Qp::new(qpn, caps);
    }

    pub(crate) fn post_send<M: Memory + ?Sized>(
        &mut self,
        wr: SendWr,
        ctx: &mut Ctx<'_, M>,
    ) -> Result<(), VerbsError> {
        match self.state {
            QpState::Rts => self.req.post(wr, self.path.mtu),
            QpState::Error => {
                ctx.complete(
                    self.caps.send_cq,
                    flush(self.qpn, wr.wr_id, requester::wc_opcode(&wr.op)),
                );
                Ok(())
            }
            s => Err(VerbsError::InvalidState(s)),
        }
    }

    pub(crate) fn post_recv<M: Memory + ?Sized>(
        &mut self,
        wr: RecvWr,
        ctx: &mut Ctx<'_, M>,
    ) -> Result<(), VerbsError> {
        match self.state {
            QpState::Init | QpState::Rtr | QpState::Rts => self.resp.post(wr),
            QpState::Error => {
                ctx.complete(self.caps.recv_cq, flush(self.qpn, wr.wr_id, WcOpcode::Recv));
                Ok(())
            }
            s => Err(VerbsError::InvalidState(s)),
        }
    }

    /// Handles a packet already matched to this QP (address and pkey
    /// checked).
    pub(crate) fn receive<M: Memory + ?Sized>(&mut self, p: &RocePacket<'_>, ctx: &mut Ctx<'_, M>) {
        let fatal = match p.bth.opcode.kind() {
            OpKind::ReadResponse | OpKind::Acknowledge => {
                if self.state != QpState::Rts {
                    ctx.counters.drop(DropReason::QpState);
                    return;
                }
                self.req
                    .on_response(p, &self.path, self.caps, self.qpn, ctx)
            }
            OpKind::Send | OpKind::Write | OpKind::ReadRequest => {
                if !matches!(self.state, QpState::Rtr | QpState::Rts) {
                    ctx.counters.drop(DropReason::QpState);
                    return;
                }
                self.resp
                    .on_request(p, &self.path, self.access, self.caps, self.qpn, ctx)
            }
        };
        if fatal {
            self.enter_error(ctx);
        }
    }

    /// The next packet this QP sends, if any.
    pub(crate) fn poll_transmit<M: Memory + ?Sized>(
        &mut self,
        ctx: &mut Ctx<'_, M>,
        addr: &TxAddr,
        buf: &mut [u8],
    ) -> Option<usize> {
        match self.state {
            QpState::Reset | QpState::Init => None,
            QpState::Error => {
                let (p, kind) = self.resp.take_final_nak()?;
                let n = self.path.emit(addr, &p, ctx.mem, buf).ok().flatten()?;
                ctx.counters.naks_sent[kind as usize] += 1;
                Some(n)
            }
            QpState::Rtr | QpState::Rts => {
                let (out, fatal) = self.resp.poll_transmit(&self.path, addr, buf, ctx);
                if fatal {
                    self.enter_error(ctx);
                }
                if out.is_some() || self.state != QpState::Rts {
                    return out;
                }
                let (out, fatal) = self
                    .req
                    .poll_transmit(&self.path, addr, buf, self.caps, self.qpn, ctx);
                if fatal {
                    self.enter_error(ctx);
                }
                out
            }
        }
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        if self.state == QpState::Rts {
            self.req.poll_timeout()
        } else {
            None
        }
    }

    pub(crate) fn handle_timeout<M: Memory + ?Sized>(&mut self, ctx: &mut Ctx<'_, M>) {
        if self.state == QpState::Rts && self.req.handle_timeout(self.caps, self.qpn, ctx) {
            self.enter_error(ctx);
        }
    }

    pub(crate) fn wants_transmit(&self, now: Instant) -> bool {
        match self.state {
            QpState::Error => self.resp.has_final_nak(),
            QpState::Rtr => self.resp.wants_transmit(),
            QpState::Rts => self.resp.wants_transmit() || self.req.wants_transmit(now),
            _ => false,
        }
    }
}

pub(crate) fn flush(qpn: u32, wr_id: u64, opcode: WcOpcode) -> WorkCompletion {
    WorkCompletion {
        wr_id,
        status: WcStatus::WrFlush,
        opcode,
        byte_len: 0,
        imm: None,
        qpn,
    }
}

/// Fixed-capacity ring helper: `VecDeque` whose capacity is reserved at
/// setup; pushes beyond it are refused instead of growing.
pub(crate) fn push_bounded<T>(q: &mut VecDeque<T>, cap: usize, v: T) -> Result<(), T> {
    if q.len() >= cap {
        Err(v)
    } else {
        q.push_back(v);
        Ok(())
    }
}
