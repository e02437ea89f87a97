//! The engine: queue pairs, regions and completion queues of one RoCEv2
//! port, driven by frames and time.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::net::Ipv4Addr;
use core::time::Duration;

use crate::counters::{Counters, DropReason};
use crate::cq::{Cq, WorkCompletion};
use crate::mr::{Access, AccessError, Memory, MrKeys, MrTable};
use crate::qp::{
    CqId, Ctx, InitAttr, Qp, QpCaps, QpState, RecvWr, RtrAttr, RtsAttr, SendWr, TxAddr,
};
use crate::wire::{self, Arp, ArpOp, Frame, LocalAddr, MacAddr, DEFAULT_PKEY};
use crate::{Instant, VerbsError};

/// The first QPN handed out (0 and 1 are the special QPs of IBA).
pub const FIRST_QPN: u32 = 0x11;

/// Engine limits and addresses, fixed at creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Our MAC.
    pub mac: MacAddr,
    /// Our IPv4 address (our GID is its IPv4-mapped form).
    pub ip: Ipv4Addr,
    /// Queue pairs at most.
    pub max_qps: usize,
    /// Memory regions at most.
    pub max_mrs: usize,
    /// Completion queues at most.
    pub max_cqs: usize,
    /// Time between ARP requests for an unresolved peer.
    pub arp_interval: Duration,
}

impl Config {
    /// Defaults for `mac`/`ip`: 64 QPs, 256 regions, 64 CQs, ARP every
    /// second.
    pub fn new(mac: MacAddr, ip: Ipv4Addr) -> Config {
        Config {
            mac,
            ip,
            max_qps: 64,
            max_mrs: 256,
            max_cqs: 64,
            arp_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Neighbor {
    ip: Ipv4Addr,
    mac: Option<MacAddr>,
    next_request: Instant,
}

/// ARP replies waiting to be sent at most (more requests are dropped
/// until they drain).
const ARP_REPLY_QUEUE: usize = 8;

/// A RoCEv2 RC engine (sans-IO).
///
/// Inputs: [`Engine::receive`] (a frame and `now`), [`Engine::handle_timeout`]
/// (at or after [`Engine::poll_timeout`]), and the verbs (`post_send`,
/// `post_recv`, `modify_qp_*`). Outputs: [`Engine::poll_transmit`] (call
/// until `None` after every input) and [`Engine::poll_cq`]. Region bytes
/// are reached through the caller's [`Memory`]. Nothing here reads a clock
/// or allocates after the objects are created.
#[derive(Debug)]
pub struct Engine {
    cfg: Config,
    local: LocalAddr,
    qps: Vec<Option<Qp>>,
    mrs: MrTable,
    cqs: Vec<Option<Cq>>,
    neighbors: Vec<Neighbor>,
    arp_replies: VecDeque<Arp>,
    counters: Counters,
    ip_id: u16,
    next_qp: usize,
}

impl Engine {
    /// An engine with every table allocated.
    pub fn new(cfg: Config) -> Engine {
        let mut qps = Vec::with_capacity(cfg.max_qps);
        qps.resize_with(cfg.max_qps, || None);
        let mut cqs = Vec::with_capacity(cfg.max_cqs);
        cqs.resize_with(cfg.max_cqs, || None);
        Engine {
            cfg,
            local: LocalAddr {
                mac: cfg.mac,
                ip: cfg.ip,
            },
            qps,
            mrs: MrTable::new(cfg.max_mrs),
            cqs,
            neighbors: Vec::with_capacity(cfg.max_qps + 8),
            arp_replies: VecDeque::with_capacity(ARP_REPLY_QUEUE),
            counters: Counters::default(),
            ip_id: 0,
            next_qp: 0,
        }
    }

    /// Our GID (IPv4-mapped).
    pub fn gid(&self) -> wire::Gid {
        wire::Gid::from_ipv4(self.cfg.ip)
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Creates a completion queue holding up to `capacity` completions.
    pub fn create_cq(&mut self, capacity: usize) -> Result<CqId, VerbsError> {
        let slot = self
            .cqs
            .iter()
            .position(Option::is_none)
            .ok_or(VerbsError::TableFull("max_cqs"))?;
        self.cqs[slot] = Some(Cq::new(capacity));
        Ok(CqId(slot as u32))
    }

    /// Takes the oldest completion of `cq`.
    pub fn poll_cq(&mut self, cq: CqId) -> Option<WorkCompletion> {
        self.cqs.get_mut(cq.0 as usize)?.as_mut()?.pop()
    }

    /// Completions waiting in `cq`.
    pub fn cq_len(&self, cq: CqId) -> usize {
        self.cqs
            .get(cq.0 as usize)
            .and_then(Option::as_ref)
            .map_or(0, Cq::len)
    }

    /// Registers `[addr, addr + len)` of the caller's [`Memory`] with
    /// `access`. Remote write access needs local write access (as in
    /// ibverbs).
    pub fn register_mr(
        &mut self,
        addr: u64,
        len: u64,
        access: Access,
    ) -> Result<MrKeys, VerbsError> {
        if addr.checked_add(len).is_none() {
            return Err(VerbsError::InvalidAttribute("region: addr + len overflows"));
        }
        if access.contains(Access::REMOTE_WRITE) && !access.contains(Access::LOCAL_WRITE) {
            return Err(VerbsError::InvalidAttribute(
                "region: remote write without local write",
            ));
        }
        self.mrs
            .register(addr, len, access)
            .ok_or(VerbsError::TableFull("max_mrs"))
    }

    /// Deregisters the region of `lkey`: its lkey and rkey are refused from
    /// now on (remote accesses are NAK'd with a remote access error).
    pub fn deregister_mr(&mut self, lkey: u32) -> Result<(), AccessError> {
        self.mrs.deregister(lkey)
    }

    /// Invalidates `rkey`: remote accesses through it are refused from now
    /// on; the region stays registered for local use.
    pub fn invalidate_rkey(&mut self, rkey: u32) -> Result<(), AccessError> {
        self.mrs.invalidate_rkey(rkey)
    }

    fn cq_exists(&self, cq: CqId) -> bool {
        self.cqs.get(cq.0 as usize).is_some_and(Option::is_some)
    }

    /// Creates an RC queue pair in RESET; returns its QPN.
    pub fn create_qp(&mut self, caps: QpCaps) -> Result<u32, VerbsError> {
        if !self.cq_exists(caps.send_cq) || !self.cq_exists(caps.recv_cq) {
            return Err(VerbsError::UnknownCq);
        }
        if caps.sq_depth == 0
            || caps.rq_depth == 0
            || caps.sq_depth > 1 << 16
            || caps.rq_depth > 1 << 16
        {
            return Err(VerbsError::InvalidAttribute("queue depth: 1..=65536"));
        }
        let slot = self
            .qps
            .iter()
            .position(Option::is_none)
            .ok_or(VerbsError::TableFull("max_qps"))?;
        let qpn = FIRST_QPN + slot as u32;
        self.qps[slot] = Some(Qp::new(qpn, caps));
        Ok(qpn)
    }

    /// Destroys a queue pair (no completions are generated).
    pub fn destroy_qp(&mut self, qpn: u32) -> Result<(), VerbsError> {
        let slot = self.slot(qpn).ok_or(VerbsError::UnknownQp(qpn))?;
        self.qps[slot] = None;
        Ok(())
    }

    fn slot(&self, qpn: u32) -> Option<usize> {
        let slot = qpn.checked_sub(FIRST_QPN)? as usize;
        self.qps.get(slot)?.as_ref().map(|_| slot)
    }

    fn qp_mut(&mut self, qpn: u32) -> Result<&mut Qp, VerbsError> {
        let slot = self.slot(qpn).ok_or(VerbsError::UnknownQp(qpn))?;
        Ok(self.qps[slot].as_mut().expect("slot checked"))
    }

    /// The state of a queue pair.
    pub fn qp_state(&self, qpn: u32) -> Option<QpState> {
        Some(self.qps[self.slot(qpn)?].as_ref()?.state)
    }

    /// RESET → INIT.
    pub fn modify_qp_init(&mut self, qpn: u32, attr: &InitAttr) -> Result<(), VerbsError> {
        self.qp_mut(qpn)?.modify_init(attr)
    }

    /// INIT → RTR: connects the QP to its peer. If `attr.dest_mac` is
    /// `None` and the peer's MAC is not known, it is resolved by ARP.
    pub fn modify_qp_rtr(&mut self, qpn: u32, attr: &RtrAttr) -> Result<(), VerbsError> {
        let ip = attr
            .remote_gid
            .ipv4()
            .ok_or(VerbsError::InvalidAttribute("remote_gid: not IPv4-mapped"))?;
        if !self.neighbors.iter().any(|n| n.ip == ip)
            && self.neighbors.len() >= self.neighbors.capacity()
        {
            self.prune_neighbors();
            if self.neighbors.len() >= self.neighbors.capacity() {
                return Err(VerbsError::TableFull("neighbors"));
            }
        }
        self.qp_mut(qpn)?.modify_rtr(attr)?;
        match attr.dest_mac {
            Some(mac) => self.set_neighbor(ip, mac)?,
            None if !self.neighbors.iter().any(|n| n.ip == ip) => {
                self.neighbors.push(Neighbor {
                    ip,
                    mac: None,
                    next_request: Instant(0),
                });
            }
            None => {}
        }
        Ok(())
    }

    /// RTR → RTS.
    pub fn modify_qp_rts(&mut self, qpn: u32, attr: &RtsAttr) -> Result<(), VerbsError> {
        self.qp_mut(qpn)?.modify_rts(attr)
    }

    /// Any state → ERROR: outstanding work requests complete with
    /// [`crate::WcStatus::WrFlush`].
    pub fn modify_qp_error<M: Memory + ?Sized>(
        &mut self,
        qpn: u32,
        mem: &mut M,
    ) -> Result<(), VerbsError> {
        let slot = self.slot(qpn).ok_or(VerbsError::UnknownQp(qpn))?;
        let (qp, mut ctx) = self.split(slot, Instant(0), mem);
        qp.enter_error(&mut ctx);
        Ok(())
    }

    /// Any state → RESET: forgets all queued work without completions.
    pub fn modify_qp_reset(&mut self, qpn: u32) -> Result<(), VerbsError> {
        self.qp_mut(qpn)?.reset();
        Ok(())
    }

    /// Supplies a peer's MAC (the hook for hosts that resolve addresses
    /// themselves, e.g. through smoltcp's neighbour cache).
    pub fn set_neighbor(&mut self, ip: Ipv4Addr, mac: MacAddr) -> Result<(), VerbsError> {
        if let Some(n) = self.neighbors.iter_mut().find(|n| n.ip == ip) {
            n.mac = Some(mac);
            return Ok(());
        }
        if self.neighbors.len() >= self.neighbors.capacity() {
            self.prune_neighbors();
        }
        if self.neighbors.len() >= self.neighbors.capacity() {
            return Err(VerbsError::TableFull("neighbors"));
        }
        self.neighbors.push(Neighbor {
            ip,
            mac: Some(mac),
            next_request: Instant(0),
        });
        Ok(())
    }

    /// The MAC known for `ip`.
    pub fn neighbor(&self, ip: Ipv4Addr) -> Option<MacAddr> {
        self.neighbors.iter().find(|n| n.ip == ip)?.mac
    }

    fn prune_neighbors(&mut self) {
        let qps = &self.qps;
        self.neighbors.retain(|n| {
            qps.iter()
                .flatten()
                .any(|q| q.path.remote_ip == n.ip && matches!(q.state, QpState::Rtr | QpState::Rts))
        });
    }

    fn split<'a, M: Memory + ?Sized>(
        &'a mut self,
        slot: usize,
        now: Instant,
        mem: &'a mut M,
    ) -> (&'a mut Qp, Ctx<'a, M>) {
        let qp = self.qps[slot].as_mut().expect("slot checked");
        let ctx = Ctx {
            now,
            mrs: &self.mrs,
            cqs: &mut self.cqs,
            counters: &mut self.counters,
            mem,
        };
        (qp, ctx)
    }

    /// Posts a send work request (the QP must be in RTS; in ERROR it
    /// completes at once with a flush error).
    pub fn post_send<M: Memory + ?Sized>(
        &mut self,
        qpn: u32,
        wr: SendWr,
        mem: &mut M,
    ) -> Result<(), VerbsError> {
        let slot = self.slot(qpn).ok_or(VerbsError::UnknownQp(qpn))?;
        let (qp, mut ctx) = self.split(slot, Instant(0), mem);
        qp.post_send(wr, &mut ctx)
    }

    /// Posts a receive work request (INIT, RTR or RTS; in ERROR it
    /// completes at once with a flush error).
    pub fn post_recv<M: Memory + ?Sized>(
        &mut self,
        qpn: u32,
        wr: RecvWr,
        mem: &mut M,
    ) -> Result<(), VerbsError> {
        let slot = self.slot(qpn).ok_or(VerbsError::UnknownQp(qpn))?;
        let (qp, mut ctx) = self.split(slot, Instant(0), mem);
        qp.post_recv(wr, &mut ctx)
    }

    /// Handles one received Ethernet frame (RoCEv2 on UDP 4791, or ARP).
    /// Anything else is counted as a drop.
    pub fn receive<M: Memory + ?Sized>(&mut self, now: Instant, frame: &[u8], mem: &mut M) {
        self.counters.rx_frames += 1;
        let pkt = match wire::parse_frame(frame, &self.local) {
            Ok(Frame::Roce(p)) => p,
            Ok(Frame::Arp(arp)) => return self.on_arp(&arp),
            Err(reason) => return self.counters.drop(reason),
        };
        let Some(slot) = self.slot(pkt.bth.dest_qp) else {
            return self.counters.drop(DropReason::UnknownQp);
        };
        let qp = self.qps[slot].as_ref().expect("slot checked");
        if !matches!(qp.state, QpState::Rtr | QpState::Rts) {
            return self.counters.drop(DropReason::QpState);
        }
        if pkt.src_ip != qp.path.remote_ip {
            return self.counters.drop(DropReason::WrongSource);
        }
        if pkt.bth.pkey & 0x7FFF != qp.path.pkey & 0x7FFF
            || (pkt.bth.pkey | qp.path.pkey) & 0x8000 == 0
        {
            return self.counters.drop(DropReason::BadPkey);
        }
        self.counters.rx_packets += 1;
        let (qp, mut ctx) = self.split(slot, now, mem);
        qp.receive(&pkt, &mut ctx);
    }

    fn on_arp(&mut self, arp: &Arp) {
        if let Some(n) = self.neighbors.iter_mut().find(|n| n.ip == arp.sender_ip) {
            n.mac = Some(arp.sender_mac);
        }
        if arp.op == ArpOp::Request && self.arp_replies.len() < ARP_REPLY_QUEUE {
            self.arp_replies.push_back(Arp {
                op: ArpOp::Reply,
                sender_mac: self.cfg.mac,
                sender_ip: self.cfg.ip,
                target_mac: arp.sender_mac,
                target_ip: arp.sender_ip,
            });
        }
    }

    /// Writes the next frame to send into `buf` (which should hold
    /// `14 + 20 + 8 + 12 + 16 + 4 + MTU + 4` bytes: 4174 for MTU 4096) and
    /// returns its length; `None` when nothing is due. Call until `None`
    /// after every input.
    pub fn poll_transmit<M: Memory + ?Sized>(
        &mut self,
        now: Instant,
        buf: &mut [u8],
        mem: &mut M,
    ) -> Option<usize> {
        if let Some(arp) = self.arp_replies.front() {
            let n = wire::emit_arp(buf, self.cfg.mac, arp)?;
            self.arp_replies.pop_front();
            self.counters.arp_replies += 1;
            self.counters.tx_frames += 1;
            return Some(n);
        }
        let (mac, ip, interval) = (self.cfg.mac, self.cfg.ip, self.cfg.arp_interval);
        if let Some(n) = self
            .neighbors
            .iter_mut()
            .find(|n| n.mac.is_none() && n.next_request <= now)
        {
            let req = Arp {
                op: ArpOp::Request,
                sender_mac: mac,
                sender_ip: ip,
                target_mac: MacAddr::default(),
                target_ip: n.ip,
            };
            let len = wire::emit_arp(buf, mac, &req)?;
            n.next_request = now.after(interval);
            self.counters.arp_requests += 1;
            self.counters.tx_frames += 1;
            return Some(len);
        }
        let count = self.qps.len();
        for i in 0..count {
            let slot = (self.next_qp + i) % count;
            let Some(qp) = self.qps[slot].as_ref() else {
                continue;
            };
            if !qp.wants_transmit(now) {
                continue;
            }
            let Some(dst_mac) = self.neighbor(qp.path.remote_ip) else {
                continue;
            };
            let addr = TxAddr {
                src_mac: mac,
                dst_mac,
                src_ip: ip,
                ip_id: self.ip_id,
            };
            let (qp, mut ctx) = self.split(slot, now, mem);
            if let Some(n) = qp.poll_transmit(&mut ctx, &addr, buf) {
                self.next_qp = (slot + 1) % count;
                self.ip_id = self.ip_id.wrapping_add(1);
                self.counters.tx_frames += 1;
                return Some(n);
            }
        }
        None
    }

    /// When [`Engine::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let qps = self.qps.iter().flatten().filter_map(Qp::poll_timeout);
        let arp = self
            .neighbors
            .iter()
            .filter(|n| n.mac.is_none())
            .map(|n| n.next_request);
        qps.chain(arp).min()
    }

    /// Fires the timers due at `now` (retransmission, RNR waits).
    pub fn handle_timeout<M: Memory + ?Sized>(&mut self, now: Instant, mem: &mut M) {
        for slot in 0..self.qps.len() {
            if self.qps[slot]
                .as_ref()
                .and_then(Qp::poll_timeout)
                .is_some_and(|t| t <= now)
            {
                let (qp, mut ctx) = self.split(slot, now, mem);
                qp.handle_timeout(&mut ctx);
            }
        }
    }
}

impl Default for InitAttr {
    fn default() -> InitAttr {
        InitAttr {
            pkey: DEFAULT_PKEY,
            access: Access::REMOTE_READ | Access::REMOTE_WRITE,
        }
    }
}
