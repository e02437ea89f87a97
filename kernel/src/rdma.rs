//! The appliance's RDMA port: the `fractos-roce` RoCEv2 engine on one NIC,
//! and the `fractos.test=rc_pingpong` server that proves it interoperates
//! with rdma-core's `ibv_rc_pingpong`.
//!
//! # Wiring (issue 13, point 2)
//!
//! - **Receive**: the NIC driver classifies every frame with [`rx_route`]
//!   before smoltcp sees it: IPv4/UDP to port 4791 is diverted (held in
//!   its receive slot, no copy) and handed to [`RdmaPort::receive`] by the
//!   event loop; ARP replies are copied to the engine *and* given to
//!   smoltcp; everything else is smoltcp's.
//! - **ARP**: the engine resolves its peers itself (its own ARP requests,
//!   the replies copied to it); smoltcp keeps answering ARP requests for
//!   the shared address, so the engine never answers them (no duplicate
//!   replies).
//! - **Transmit and time**: [`RdmaPort::poll`] fires the engine's timers
//!   (retransmission, RNR waits, ARP retries) with the kernel clock and
//!   sends its frames on the same NIC, as many as the transmit queue has
//!   room for.
//! - **Connection data** (QPN, PSN, GID, MTU) only ever comes from an out
//!   of band channel, never from a RoCE packet; the engine accepts packets
//!   for a QP only from the IPv4 address it was connected to. The one
//!   exception is [`PingPong`], the explicit test mode: it takes the
//!   example's unauthenticated TCP exchange, and only binds a QP to the
//!   address of the TCP peer that sent it.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write as _;
use core::net::Ipv4Addr;

use fractos_roce::wire::{Gid, MacAddr};
use fractos_roce::{
    local_ack_timeout, Access, Config, CqId, DropReason, Engine, InitAttr, Instant, Memory,
    MemoryFault, MrKeys, Mtu, NakKind, QpCaps, RecvWr, RtrAttr, RtsAttr, SendOp, SendWr, Sge,
    VerbsError, WcOpcode, WcStatus,
};
use fractos_virtio_net::RxRoute;
use log::{info, warn};
use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::IpAddress;

/// The RoCEv2 UDP destination port (IANA).
pub const ROCE_UDP_PORT: u16 = 4791;
/// The TCP port of `ibv_rc_pingpong`'s exchange (its default).
pub const PINGPONG_PORT: u16 = 18515;
/// The example's exchange message: `LLLL:QQQQQQ:PPPPPP:` and 32 hex
/// digits of GID, plus the C string's terminating NUL.
pub const EXCHANGE_LEN: usize = 52;
/// How long one client may hold the exchange socket, from its connection
/// to its close (nanoseconds). The example's exchange is three short
/// messages; the server holds one connection at a time, so a client that
/// connects and goes quiet (or keeps the connection open) is cut off after
/// this and the port listens again.
pub const EXCHANGE_TIMEOUT_NS: u64 = 10_000_000_000;
/// Frame buffer for one engine packet at the largest path MTU (4096) plus
/// headers, rounded up.
const TX_BUF: usize = 4224;

/// The driver's receive filter for a NIC carrying RoCEv2 (see the module
/// doc): IPv4 + UDP to [`ROCE_UDP_PORT`] → [`RxRoute::Divert`], ARP reply
/// → [`RxRoute::Copy`], anything else → [`RxRoute::Stack`]. Only the
/// routing fields are looked at; the engine checks everything else.
pub fn rx_route(frame: &[u8]) -> RxRoute {
    match frame.get(12..14) {
        Some([0x08, 0x00]) => {
            let Some(ip) = frame.get(14..) else {
                return RxRoute::Stack;
            };
            let ihl = usize::from(ip.first().copied().unwrap_or(0) & 0x0f) * 4;
            let udp = ip.get(9) == Some(&17);
            let port = ip
                .get(ihl + 2..ihl + 4)
                .map(|p| u16::from_be_bytes([p[0], p[1]]));
            if ihl >= 20 && udp && port == Some(ROCE_UDP_PORT) {
                RxRoute::Divert
            } else {
                RxRoute::Stack
            }
        }
        // ARP, operation 2 (reply).
        Some([0x08, 0x06]) if frame.get(20..22) == Some(&[0, 2]) => RxRoute::Copy,
        _ => RxRoute::Stack,
    }
}

/// Region memory of the RDMA port: one zeroed arena, addresses are
/// offsets into it. Accesses outside it fail (the engine's region checks
/// come first; this is the second wall).
#[derive(Debug)]
pub struct Arena {
    bytes: Vec<u8>,
    used: usize,
}

impl Arena {
    /// `len` zeroed bytes.
    pub fn new(len: usize) -> Arena {
        Arena {
            bytes: vec![0; len],
            used: 0,
        }
    }

    /// Takes `len` bytes (64-byte aligned); `None` when full.
    pub fn alloc(&mut self, len: usize) -> Option<u64> {
        let start = self.used.next_multiple_of(64);
        let end = start.checked_add(len)?;
        if end > self.bytes.len() {
            return None;
        }
        self.used = end;
        Some(start as u64)
    }

    /// The bytes at `[addr, addr + len)`, if inside.
    pub fn get(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let start = usize::try_from(addr).ok()?;
        self.bytes.get(start..start.checked_add(len)?)
    }

    fn range(&self, addr: u64, len: usize) -> Result<core::ops::Range<usize>, MemoryFault> {
        let start = usize::try_from(addr).map_err(|_| MemoryFault)?;
        let end = start.checked_add(len).ok_or(MemoryFault)?;
        if end > self.bytes.len() {
            return Err(MemoryFault);
        }
        Ok(start..end)
    }
}

impl Memory for Arena {
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryFault> {
        let r = self.range(addr, buf.len())?;
        buf.copy_from_slice(&self.bytes[r]);
        Ok(())
    }

    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), MemoryFault> {
        let r = self.range(addr, data.len())?;
        self.bytes[r].copy_from_slice(data);
        Ok(())
    }
}

/// The engine on one NIC with its region memory.
#[derive(Debug)]
pub struct RdmaPort {
    /// The engine.
    pub engine: Engine,
    /// Region memory.
    pub mem: Arena,
    buf: Vec<u8>,
}

impl RdmaPort {
    /// An engine for `mac`/`ip` with `arena` bytes of region memory.
    pub fn new(mac: [u8; 6], ip: Ipv4Addr, arena: usize) -> RdmaPort {
        RdmaPort {
            engine: Engine::new(Config::new(MacAddr(mac), ip)),
            mem: Arena::new(arena),
            buf: vec![0; TX_BUF],
        }
    }

    /// Hands one diverted (or copied) frame to the engine.
    pub fn receive(&mut self, now_ns: u64, frame: &[u8]) {
        self.engine.receive(Instant(now_ns), frame, &mut self.mem);
    }

    /// Fires due timers, then sends what the engine has, while `send`
    /// accepts frames and at most `room` of them (the NIC's free transmit
    /// slots: a frame taken from the engine is never dropped here).
    /// Returns the frames sent.
    pub fn poll(&mut self, now_ns: u64, room: usize, mut send: impl FnMut(&[u8]) -> bool) -> usize {
        let now = Instant(now_ns);
        if self.engine.poll_timeout().is_some_and(|t| t <= now) {
            self.engine.handle_timeout(now, &mut self.mem);
        }
        let mut sent = 0;
        while sent < room {
            let Some(n) = self.engine.poll_transmit(now, &mut self.buf, &mut self.mem) else {
                break;
            };
            if !send(&self.buf[..n]) {
                break;
            }
            sent += 1;
        }
        sent
    }

    /// Our GID (IPv4-mapped).
    pub fn gid(&self) -> Gid {
        self.engine.gid()
    }
}

/// The engine's counters as Prometheus text (the families documented in
/// docs/metrics.md).
pub fn metrics_text(node: u32, c: &fractos_roce::Counters) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# HELP fractos_roce_frames_total RoCEv2 engine frames: received (handed to it), accepted for a queue pair, sent.\n\
         # TYPE fractos_roce_frames_total counter\n\
         fractos_roce_frames_total{{node=\"{node}\",dir=\"rx\"}} {}\n\
         fractos_roce_frames_total{{node=\"{node}\",dir=\"rx_accepted\"}} {}\n\
         fractos_roce_frames_total{{node=\"{node}\",dir=\"tx\"}} {}",
        c.rx_frames, c.rx_packets, c.tx_frames
    );
    let _ = writeln!(
        t,
        "# HELP fractos_roce_drops_total RoCEv2 frames dropped without effect, by reason.\n\
         # TYPE fractos_roce_drops_total counter"
    );
    for r in DropReason::ALL {
        let _ = writeln!(
            t,
            "fractos_roce_drops_total{{node=\"{node}\",reason=\"{}\"}} {}",
            r.name(),
            c.dropped(*r)
        );
    }
    let _ = writeln!(
        t,
        "# HELP fractos_roce_naks_total RoCEv2 negative acknowledgements sent and received, by kind.\n\
         # TYPE fractos_roce_naks_total counter"
    );
    for k in NakKind::ALL {
        let _ = writeln!(
            t,
            "fractos_roce_naks_total{{node=\"{node}\",dir=\"sent\",kind=\"{}\"}} {}\n\
             fractos_roce_naks_total{{node=\"{node}\",dir=\"received\",kind=\"{}\"}} {}",
            k.name(),
            c.nak_sent(*k),
            k.name(),
            c.nak_received(*k)
        );
    }
    let _ = writeln!(
        t,
        "# HELP fractos_roce_events_total RoCEv2 engine events: ACKs sent, duplicate requests, request packets retransmitted, retransmission timeouts, ARP requests and replies sent, completions lost to a full queue.\n\
         # TYPE fractos_roce_events_total counter\n\
         fractos_roce_events_total{{node=\"{node}\",event=\"ack_sent\"}} {}\n\
         fractos_roce_events_total{{node=\"{node}\",event=\"duplicate\"}} {}\n\
         fractos_roce_events_total{{node=\"{node}\",event=\"retransmit\"}} {}\n\
         fractos_roce_events_total{{node=\"{node}\",event=\"timeout\"}} {}\n\
         fractos_roce_events_total{{node=\"{node}\",event=\"arp_request\"}} {}\n\
         fractos_roce_events_total{{node=\"{node}\",event=\"arp_reply\"}} {}\n\
         fractos_roce_events_total{{node=\"{node}\",event=\"cq_overflow\"}} {}",
        c.acks_sent,
        c.duplicates,
        c.retransmits,
        c.timeouts,
        c.arp_requests,
        c.arp_replies,
        c.cq_overflows
    );
    t
}

/// One side's connection data in `ibv_rc_pingpong`'s exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dest {
    /// LID (0 on Ethernet).
    pub lid: u16,
    /// Queue pair number (24 bits).
    pub qpn: u32,
    /// First packet sequence number (24 bits).
    pub psn: u32,
    /// GID (16 bytes).
    pub gid: [u8; 16],
}

/// Why an exchange message was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    /// Not `LLLL:QQQQQQ:PPPPPP:` + 32 hex digits + NUL.
    #[error(
        "malformed ibv_rc_pingpong exchange message (expected `LLLL:QQQQQQ:PPPPPP:GID`, 52 bytes with the NUL)"
    )]
    Malformed,
    /// The GID is not IPv4-mapped (run the client with `-g` naming the
    /// IPv4 GID, index 1 on Soft-RoCE).
    #[error("the client's GID is not an IPv4-mapped address: run ibv_rc_pingpong with -g 1")]
    NotIpv4Gid,
    /// The GID's address is not the TCP peer's.
    #[error("the client's GID names {gid} but the exchange came from {peer}")]
    WrongAddress {
        /// The GID's IPv4 address.
        gid: Ipv4Addr,
        /// The TCP peer.
        peer: Ipv4Addr,
    },
}

fn hex_field(s: &[u8], digits: usize) -> Option<u32> {
    if s.len() != digits {
        return None;
    }
    s.iter().try_fold(0u32, |acc, &b| {
        let d = char::from(b).to_digit(16)?;
        Some(acc << 4 | d)
    })
}

/// Parses the example's message: `%04x:%06x:%06x:%s` with the GID as 32
/// hex digits (its 16 bytes in order), NUL-terminated.
pub fn parse_dest(msg: &[u8]) -> Result<Dest, ExchangeError> {
    let m = ExchangeError::Malformed;
    if msg.len() != EXCHANGE_LEN || msg[EXCHANGE_LEN - 1] != 0 {
        return Err(m);
    }
    let text = &msg[..EXCHANGE_LEN - 1];
    if text[4] != b':' || text[11] != b':' || text[18] != b':' {
        return Err(m);
    }
    let lid = hex_field(&text[..4], 4).ok_or(m)? as u16;
    let qpn = hex_field(&text[5..11], 6).ok_or(m)?;
    let psn = hex_field(&text[12..18], 6).ok_or(m)?;
    let mut gid = [0u8; 16];
    for (i, g) in gid.iter_mut().enumerate() {
        *g = hex_field(&text[19 + 2 * i..21 + 2 * i], 2).ok_or(m)? as u8;
    }
    Ok(Dest { lid, qpn, psn, gid })
}

/// Formats `d` as the example does (52 bytes, NUL-terminated).
pub fn format_dest(d: &Dest) -> [u8; EXCHANGE_LEN] {
    let mut s = String::with_capacity(EXCHANGE_LEN);
    let _ = write!(
        s,
        "{:04x}:{:06x}:{:06x}:",
        d.lid,
        d.qpn & 0xFF_FFFF,
        d.psn & 0xFF_FFFF
    );
    for b in d.gid {
        let _ = write!(s, "{b:02x}");
    }
    let mut out = [0u8; EXCHANGE_LEN];
    out[..s.len()].copy_from_slice(s.as_bytes());
    out
}

/// The `ibv_rc_pingpong` server's parameters (they must match the
/// client's `-s`, `-n`, `-m`, `-r`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PingPongConfig {
    /// Message bytes (`-s`, default 4096).
    pub size: u32,
    /// Iterations (`-n`, default 1000).
    pub iters: u32,
    /// Path MTU (`-m`, default 1024).
    pub mtu: Mtu,
    /// Receives kept posted (`-r`, default 500).
    pub rx_depth: u32,
}

impl Default for PingPongConfig {
    fn default() -> Self {
        PingPongConfig {
            size: 4096,
            iters: 1000,
            mtu: Mtu::Mtu1024,
            rx_depth: 500,
        }
    }
}

/// The page size the example's `--chk` marks (`sysconf(_SC_PAGESIZE)` on
/// x86-64 Linux).
pub const CHK_PAGE: usize = 4096;

/// What a finished (or failed) session did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionReport {
    /// Session number (1-based).
    pub session: u32,
    /// Messages received.
    pub received: u32,
    /// Messages sent (and acknowledged).
    pub sent: u32,
    /// Received messages that pass the example's `--chk` test (byte 0 of
    /// every page is `i / page_size % sizeof(char)`, i.e. 0).
    pub chk_ok: u32,
    /// Received messages byte-identical to the session's first one (the
    /// ping-pong echoes one buffer, so any difference is corruption).
    pub same_as_first: u32,
}

#[derive(Debug)]
enum Tcp {
    /// Waiting for a client's message.
    Listening,
    /// Our reply is queued; waiting for "done" or the close.
    Replied,
}

/// The server side of `ibv_rc_pingpong`: answers the example's TCP
/// exchange on [`PINGPONG_PORT`] (client message, our reply, the client's
/// `done`), connects a fresh queue pair to the client's QPN/PSN/GID, then
/// plays the ping-pong: every received message is sent back from the same
/// buffer, as the example's server does, `iters` times. One session at a
/// time; a new exchange replaces the queue pair.
#[derive(Debug)]
pub struct PingPong {
    cfg: PingPongConfig,
    sock: SocketHandle,
    tcp: Tcp,
    /// When the current client's connection was first seen (kernel
    /// nanoseconds); `None` while listening.
    since: Option<u64>,
    cq: CqId,
    buf: u64,
    keys: MrKeys,
    qpn: Option<u32>,
    /// The last session's QP, kept until the next exchange so that what it
    /// still owes the peer (a coalesced ACK, a final NAK) goes out.
    retired: Option<u32>,
    psn_seed: u64,
    pending_send: bool,
    first: Vec<u8>,
    scratch: Vec<u8>,
    report: SessionReport,
    finished: Option<SessionReport>,
}

/// Why the ping-pong server could not start or a session failed.
#[derive(Debug, thiserror::Error)]
pub enum PingPongError {
    /// smoltcp refused to listen.
    #[error("listen on port {PINGPONG_PORT} failed: {0}")]
    Listen(tcp::ListenError),
    /// The region does not fit the arena.
    #[error("the RDMA arena has no room for a {0}-byte buffer: lower fractos.rc_size")]
    Arena(u32),
    /// A verb failed.
    #[error("verbs: {0}")]
    Verbs(#[from] VerbsError),
    /// The client's exchange message was refused.
    #[error(transparent)]
    Exchange(#[from] ExchangeError),
}

impl PingPong {
    /// A server on `sockets` (the NIC's socket set) with its buffer in
    /// `port`'s arena. `psn_seed` picks the first PSNs.
    pub fn new(
        cfg: PingPongConfig,
        port: &mut RdmaPort,
        sockets: &mut SocketSet<'static>,
        psn_seed: u64,
    ) -> Result<PingPong, PingPongError> {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 256]),
            tcp::SocketBuffer::new(vec![0; 256]),
        );
        s.set_nagle_enabled(false);
        s.set_ack_delay(None);
        s.listen(PINGPONG_PORT).map_err(PingPongError::Listen)?;
        let sock = sockets.add(s);
        let cq = port.engine.create_cq(cfg.rx_depth as usize + 2)?;
        let buf = port
            .mem
            .alloc(cfg.size as usize)
            .ok_or(PingPongError::Arena(cfg.size))?;
        let keys = port
            .engine
            .register_mr(buf, u64::from(cfg.size), Access::LOCAL_WRITE)?;
        Ok(PingPong {
            cfg,
            sock,
            tcp: Tcp::Listening,
            since: None,
            cq,
            buf,
            keys,
            qpn: None,
            retired: None,
            psn_seed,
            pending_send: false,
            first: Vec::new(),
            scratch: vec![0; cfg.size as usize],
            report: SessionReport::default(),
            finished: None,
        })
    }

    /// The last finished session, taken.
    pub fn take_finished(&mut self) -> Option<SessionReport> {
        self.finished.take()
    }

    /// The session in progress.
    pub fn current(&self) -> SessionReport {
        self.report
    }

    /// One turn: the TCP exchange, then completions.
    pub fn poll(&mut self, now_ns: u64, port: &mut RdmaPort, sockets: &mut SocketSet<'static>) {
        self.poll_tcp(now_ns, port, sockets);
        self.poll_cq(now_ns, port);
    }

    fn poll_tcp(&mut self, now_ns: u64, port: &mut RdmaPort, sockets: &mut SocketSet<'static>) {
        let s = sockets.get_mut::<tcp::Socket>(self.sock);
        if matches!(s.state(), tcp::State::Listen | tcp::State::Closed) {
            self.since = None;
        } else {
            let since = *self.since.get_or_insert(now_ns);
            if now_ns.saturating_sub(since) > EXCHANGE_TIMEOUT_NS {
                warn!(
                    "rc_pingpong: exchange from {:?} not finished within {} s: dropped, listening again",
                    s.remote_endpoint(),
                    EXCHANGE_TIMEOUT_NS / 1_000_000_000
                );
                // The reset goes out with the next interface poll; the
                // listening state listens again after it.
                s.abort();
                self.tcp = Tcp::Listening;
                self.since = None;
                return;
            }
        }
        match self.tcp {
            Tcp::Listening => {
                if s.recv_queue() < EXCHANGE_LEN {
                    if !s.is_open() || s.state() == tcp::State::CloseWait {
                        relisten(s);
                    }
                    return;
                }
                let mut msg = [0u8; EXCHANGE_LEN];
                let n = s.recv_slice(&mut msg).unwrap_or(0);
                let peer = match s.remote_endpoint().map(|e| e.addr) {
                    Some(IpAddress::Ipv4(a)) => a,
                    _ => Ipv4Addr::UNSPECIFIED,
                };
                let reply = parse_dest(&msg[..n])
                    .and_then(|d| check_peer(&d, peer).map(|ip| (d, ip)))
                    .map_err(PingPongError::from)
                    .and_then(|(d, ip)| self.connect(port, &d, ip));
                match reply {
                    Ok(mine) => {
                        let out = format_dest(&mine);
                        if s.send_slice(&out) != Ok(out.len()) {
                            warn!("rc_pingpong: reply did not fit the socket");
                        }
                        self.tcp = Tcp::Replied;
                    }
                    Err(e) => {
                        warn!("rc_pingpong: exchange from {peer} refused: {e}");
                        s.abort();
                    }
                }
            }
            Tcp::Replied => {
                // The client sends "done" and closes; we close once our
                // reply has left.
                if s.can_recv() {
                    let mut sink = [0u8; 64];
                    let _ = s.recv_slice(&mut sink);
                }
                if s.send_queue() == 0 && s.state() == tcp::State::CloseWait {
                    s.close();
                }
                if matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait) {
                    relisten(s);
                    self.tcp = Tcp::Listening;
                }
            }
        }
    }

    /// A fresh QP connected to `d` at `ip`, with every receive posted; our
    /// side of the exchange.
    fn connect(
        &mut self,
        port: &mut RdmaPort,
        d: &Dest,
        ip: Ipv4Addr,
    ) -> Result<Dest, PingPongError> {
        if let Some(old) = self.qpn.take() {
            self.finish();
            let _ = port.engine.destroy_qp(old);
        }
        if let Some(old) = self.retired.take() {
            let _ = port.engine.destroy_qp(old);
        }
        while port.engine.poll_cq(self.cq).is_some() {}
        let e = &mut port.engine;
        let qpn = e.create_qp(QpCaps {
            send_cq: self.cq,
            recv_cq: self.cq,
            sq_depth: 1,
            rq_depth: self.cfg.rx_depth,
        })?;
        let result = (|| {
            e.modify_qp_init(
                qpn,
                &InitAttr {
                    access: Access::NONE,
                    ..InitAttr::default()
                },
            )?;
            for _ in 0..self.cfg.rx_depth {
                e.post_recv(qpn, self.recv_wr(), &mut port.mem)?;
            }
            e.modify_qp_rtr(
                qpn,
                &RtrAttr {
                    mtu: self.cfg.mtu,
                    dest_qpn: d.qpn,
                    rq_psn: d.psn,
                    remote_gid: Gid::from_ipv4(ip),
                    dest_mac: None,
                    max_dest_rd_atomic: 1,
                    min_rnr_timer: 12,
                },
            )?;
            // The example's PSN is lrand48() & 0xffffff.
            self.psn_seed = self
                .psn_seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let psn = (self.psn_seed >> 33) as u32 & 0xFF_FFFF;
            e.modify_qp_rts(
                qpn,
                &RtsAttr {
                    sq_psn: psn,
                    ack_timeout: local_ack_timeout(14),
                    retry_cnt: 7,
                    rnr_retry: 7,
                    max_rd_atomic: 1,
                },
            )?;
            Ok(psn)
        })();
        let psn = match result {
            Ok(psn) => psn,
            Err(err) => {
                let _ = e.destroy_qp(qpn);
                return Err(PingPongError::Verbs(err));
            }
        };
        self.qpn = Some(qpn);
        self.pending_send = false;
        self.first.clear();
        let session = self
            .report
            .session
            .max(self.finished.map_or(0, |f| f.session))
            + 1;
        self.report = SessionReport {
            session,
            ..SessionReport::default()
        };
        info!(
            "rc_pingpong: session {session}: QP {qpn:#08x} PSN {psn:#08x} connected to {ip} QPN {:#08x} PSN {:#08x}, MTU {}",
            d.qpn,
            d.psn,
            self.cfg.mtu.bytes()
        );
        Ok(Dest {
            lid: 0,
            qpn,
            psn,
            gid: port.gid().octets(),
        })
    }

    fn recv_wr(&self) -> RecvWr {
        RecvWr {
            wr_id: 1,
            sge: Sge {
                addr: self.buf,
                len: self.cfg.size,
                lkey: self.keys.lkey,
            },
        }
    }

    fn poll_cq(&mut self, _now_ns: u64, port: &mut RdmaPort) {
        let Some(qpn) = self.qpn else {
            return;
        };
        while let Some(wc) = port.engine.poll_cq(self.cq) {
            if wc.status != WcStatus::Success {
                warn!(
                    "rc_pingpong: session {}: completion {:?} for {:?}; session ends",
                    self.report.session, wc.status, wc.opcode
                );
                self.finish();
                self.retire();
                return;
            }
            match wc.opcode {
                WcOpcode::Recv => {
                    self.report.received += 1;
                    self.check(port, wc.byte_len);
                    if let Err(e) = port.engine.post_recv(qpn, self.recv_wr(), &mut port.mem) {
                        warn!("rc_pingpong: re-posting a receive failed: {e}");
                    }
                    // The example's server answers every message once its
                    // previous send completed.
                    self.maybe_send(port, qpn);
                }
                WcOpcode::Send => {
                    self.report.sent += 1;
                    self.pending_send = false;
                    self.maybe_send(port, qpn);
                }
                _ => {}
            }
            if self.report.sent >= self.cfg.iters && self.report.received >= self.cfg.iters {
                self.finish();
                self.retire();
                return;
            }
        }
    }

    /// Sends one message per message received, one at a time.
    fn maybe_send(&mut self, port: &mut RdmaPort, qpn: u32) {
        if self.pending_send || self.report.sent >= self.report.received {
            return;
        }
        let wr = SendWr {
            wr_id: 2,
            op: SendOp::Send,
            sge: Sge {
                addr: self.buf,
                len: self.cfg.size,
                lkey: self.keys.lkey,
            },
        };
        match port.engine.post_send(qpn, wr, &mut port.mem) {
            Ok(()) => self.pending_send = true,
            Err(e) => warn!("rc_pingpong: post_send failed: {e}"),
        }
    }

    /// The example's `--chk` test and the consistency test on the buffer.
    fn check(&mut self, port: &mut RdmaPort, len: u32) {
        let len = (len as usize).min(self.scratch.len());
        if port.mem.read(self.buf, &mut self.scratch[..len]).is_err() {
            return;
        }
        let msg = &self.scratch[..len];
        if (0..len).step_by(CHK_PAGE).all(|i| msg[i] == 0) {
            self.report.chk_ok += 1;
        }
        if self.first.is_empty() {
            self.first.extend_from_slice(msg);
        }
        if self.first == msg {
            self.report.same_as_first += 1;
        }
    }

    /// Ends the session's use of its QP; it is destroyed at the next
    /// exchange.
    fn retire(&mut self) {
        self.retired = self.qpn.take();
    }

    fn finish(&mut self) {
        let r = self.report;
        if r.received == 0 && r.sent == 0 {
            return;
        }
        let verdict = if r.received == self.cfg.iters
            && r.sent == self.cfg.iters
            && r.chk_ok == r.received
            && r.same_as_first == r.received
        {
            "ok"
        } else {
            "FAILED"
        };
        info!(
            "rc_pingpong: session {} {verdict}: received {} sent {} of {} messages of {} bytes, chk ok {}, identical {}",
            r.session, r.received, r.sent, self.cfg.iters, self.cfg.size, r.chk_ok, r.same_as_first
        );
        self.finished = Some(r);
    }
}

fn check_peer(d: &Dest, peer: Ipv4Addr) -> Result<Ipv4Addr, ExchangeError> {
    let gid = Gid(core::net::Ipv6Addr::from(d.gid))
        .ipv4()
        .ok_or(ExchangeError::NotIpv4Gid)?;
    if gid != peer {
        return Err(ExchangeError::WrongAddress { gid, peer });
    }
    Ok(gid)
}

fn relisten(s: &mut tcp::Socket<'static>) {
    s.abort();
    if let Err(e) = s.listen(PINGPONG_PORT) {
        warn!("rc_pingpong: listen again failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `ibv_rc_pingpong -g 1` on 10.9.0.2 sends (LID 0, QPN 0x11,
    /// PSN 0xabcdef), NUL included.
    fn client_msg() -> Vec<u8> {
        let mut m = b"0000:000011:abcdef:00000000000000000000ffff0a090002".to_vec();
        m.push(0);
        m
    }

    #[test]
    fn exchange_messages_parse_and_format_like_the_example() {
        let m = client_msg();
        assert_eq!(m.len(), EXCHANGE_LEN);
        let d = parse_dest(&m).unwrap();
        assert_eq!((d.lid, d.qpn, d.psn), (0, 0x11, 0xab_cdef));
        assert_eq!(
            Gid(core::net::Ipv6Addr::from(d.gid)).ipv4(),
            Some(Ipv4Addr::new(10, 9, 0, 2))
        );
        assert_eq!(format_dest(&d).to_vec(), m);
        assert_eq!(
            check_peer(&d, Ipv4Addr::new(10, 9, 0, 2)),
            Ok(Ipv4Addr::new(10, 9, 0, 2))
        );
        assert_eq!(
            check_peer(&d, Ipv4Addr::new(10, 9, 0, 3)),
            Err(ExchangeError::WrongAddress {
                gid: Ipv4Addr::new(10, 9, 0, 2),
                peer: Ipv4Addr::new(10, 9, 0, 3)
            })
        );
        // The link-local GID (index 0) is refused with advice.
        let mut ll = b"0000:000011:abcdef:fe800000000000005054fffe12345678".to_vec();
        ll.push(0);
        let d = parse_dest(&ll).unwrap();
        let e = check_peer(&d, Ipv4Addr::new(10, 9, 0, 2)).unwrap_err();
        assert!(e.to_string().contains("-g 1"), "{e}");
    }

    #[test]
    fn malformed_exchange_messages_are_refused() {
        let good = client_msg();
        let mut cases: Vec<Vec<u8>> = vec![
            good[..EXCHANGE_LEN - 1].to_vec(),
            [good.clone(), vec![0]].concat(),
            Vec::new(),
        ];
        for (i, b) in [
            (51, b'x'),
            (4, b'-'),
            (11, b'0'),
            (18, b' '),
            (0, b'g'),
            (30, b'Z'),
        ] {
            let mut m = good.clone();
            m[i] = b;
            cases.push(m);
        }
        for m in cases {
            assert_eq!(parse_dest(&m), Err(ExchangeError::Malformed), "{m:?}");
        }
    }

    fn udp_frame(port: u16, ihl_words: u8, proto: u8) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 4 * usize::from(ihl_words) + 8 + 16];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x40 | ihl_words;
        f[14 + 9] = proto;
        let udp = 14 + 4 * usize::from(ihl_words);
        f[udp + 2..udp + 4].copy_from_slice(&port.to_be_bytes());
        f
    }

    #[test]
    fn rx_route_diverts_roce_copies_arp_replies_and_keeps_the_rest() {
        assert_eq!(rx_route(&udp_frame(4791, 5, 17)), RxRoute::Divert);
        // Options move the UDP header; still RoCE's port (the engine drops
        // it, counted).
        assert_eq!(rx_route(&udp_frame(4791, 6, 17)), RxRoute::Divert);
        assert_eq!(rx_route(&udp_frame(4792, 5, 17)), RxRoute::Stack);
        assert_eq!(rx_route(&udp_frame(4791, 5, 6)), RxRoute::Stack, "TCP");
        assert_eq!(rx_route(&udp_frame(4791, 4, 17)), RxRoute::Stack, "bad IHL");
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        arp[20..22].copy_from_slice(&[0, 2]);
        assert_eq!(rx_route(&arp), RxRoute::Copy);
        arp[21] = 1;
        assert_eq!(rx_route(&arp), RxRoute::Stack, "ARP requests are smoltcp's");
        for n in 0..20 {
            // Truncated frames never panic.
            let _ = rx_route(&udp_frame(4791, 5, 17)[..n]);
        }
    }

    #[test]
    fn arena_refuses_accesses_outside_it() {
        let mut a = Arena::new(256);
        let x = a.alloc(100).unwrap();
        let y = a.alloc(100).unwrap();
        assert_eq!((x, y), (0, 128));
        assert_eq!(a.alloc(100), None);
        a.write(250, &[1; 6]).unwrap();
        assert_eq!(a.write(251, &[1; 6]), Err(MemoryFault));
        let mut b = [0u8; 8];
        assert_eq!(a.read(u64::MAX - 2, &mut b), Err(MemoryFault));
        assert_eq!(a.get(250, 6), Some(&[1u8; 6][..]));
    }

    #[test]
    fn metrics_name_every_reason_and_kind() {
        let mut c = fractos_roce::Counters {
            retransmits: 7,
            ..Default::default()
        };
        c.drops[DropReason::BadIcrc as usize] = 3;
        c.naks_sent[NakKind::SequenceError as usize] = 2;
        let t = metrics_text(4, &c);
        assert!(
            t.contains("fractos_roce_events_total{node=\"4\",event=\"retransmit\"} 7"),
            "{t}"
        );
        assert!(
            t.contains("fractos_roce_drops_total{node=\"4\",reason=\"bad_icrc\"} 3"),
            "{t}"
        );
        assert!(t.contains(
            "fractos_roce_naks_total{node=\"4\",dir=\"sent\",kind=\"sequence_error\"} 2"
        ));
        for r in DropReason::ALL {
            assert!(t.contains(&format!("reason=\"{}\"", r.name())));
        }
        for family in ["frames", "drops", "naks", "events"] {
            assert!(t.contains(&format!("# TYPE fractos_roce_{family}_total counter")));
        }
    }

    /// The exchange server on a smoltcp loopback interface (127.0.0.1),
    /// with hostile clients on the same interface.
    mod exchange {
        use super::*;
        use smoltcp::iface::{Config as IfConfig, Interface};
        use smoltcp::phy::{Loopback, Medium};
        use smoltcp::time::Instant as SmolInstant;
        use smoltcp::wire::{EthernetAddress, IpCidr};

        const HOST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

        struct Rig {
            dev: Loopback,
            iface: Interface,
            sockets: SocketSet<'static>,
            port: RdmaPort,
            server: PingPong,
            now_ms: u64,
            next_port: u16,
        }

        impl Rig {
            fn new() -> Rig {
                let mut dev = Loopback::new(Medium::Ethernet);
                let cfg = IfConfig::new(EthernetAddress([2, 0, 0, 0, 0, 1]).into());
                let mut iface = Interface::new(cfg, &mut dev, SmolInstant::from_millis(0));
                iface.update_ip_addrs(|a| {
                    a.push(IpCidr::new(IpAddress::Ipv4(HOST), 8)).unwrap();
                });
                let mut sockets = SocketSet::new(vec![]);
                let mut port = RdmaPort::new([2, 0, 0, 0, 0, 1], HOST, 1 << 20);
                let cfg = PingPongConfig {
                    size: 64,
                    iters: 1,
                    rx_depth: 4,
                    ..PingPongConfig::default()
                };
                let server = PingPong::new(cfg, &mut port, &mut sockets, 7).unwrap();
                Rig {
                    dev,
                    iface,
                    sockets,
                    port,
                    server,
                    now_ms: 0,
                    next_port: 40_000,
                }
            }

            /// Runs the interface and the server for `ms` milliseconds of
            /// simulated time, 10 ms a step.
            fn run(&mut self, ms: u64) {
                for _ in 0..ms / 10 {
                    self.now_ms += 10;
                    let now = SmolInstant::from_millis(self.now_ms as i64);
                    self.iface.poll(now, &mut self.dev, &mut self.sockets);
                    self.server
                        .poll(self.now_ms * 1_000_000, &mut self.port, &mut self.sockets);
                    self.iface.poll(now, &mut self.dev, &mut self.sockets);
                }
            }

            /// A client connected (or connecting) to the exchange port.
            fn client(&mut self) -> SocketHandle {
                let mut s = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; 1 << 16]),
                    tcp::SocketBuffer::new(vec![0; 1 << 16]),
                );
                self.next_port += 1;
                s.connect(self.iface.context(), (HOST, PINGPONG_PORT), self.next_port)
                    .unwrap();
                let h = self.sockets.add(s);
                self.run(100);
                h
            }

            fn sock(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
                self.sockets.get_mut::<tcp::Socket>(h)
            }

            /// Sends `msg` from `h` (all of it, running the rig as the
            /// window allows) and returns what the server answered.
            fn exchange(&mut self, h: SocketHandle, msg: &[u8]) -> Vec<u8> {
                let mut sent = 0;
                for _ in 0..10_000 {
                    if sent == msg.len() || !self.sock(h).may_send() {
                        break;
                    }
                    sent += self.sock(h).send_slice(&msg[sent..]).unwrap_or(0);
                    self.run(10);
                }
                self.run(200);
                let mut got = vec![0u8; 256];
                let n = self.sock(h).recv_slice(&mut got).unwrap_or(0);
                got.truncate(n);
                got
            }

            fn msg_from(ip: Ipv4Addr) -> Vec<u8> {
                format_dest(&Dest {
                    lid: 0,
                    qpn: 0x11,
                    psn: 0xabcdef,
                    gid: Gid::from_ipv4(ip).octets(),
                })
                .to_vec()
            }
        }

        #[test]
        fn a_well_formed_exchange_gets_the_servers_connection_data() {
            let mut r = Rig::new();
            let c = r.client();
            let reply = r.exchange(c, &Rig::msg_from(HOST));
            let d = parse_dest(&reply).expect("a 52-byte reply");
            assert_eq!(Gid(core::net::Ipv6Addr::from(d.gid)).ipv4(), Some(HOST));
        }

        #[test]
        fn a_client_that_goes_quiet_is_cut_off_and_the_next_one_is_served() {
            let mut r = Rig::new();
            let stuck = r.client();
            assert!(r.sock(stuck).may_send(), "the first client connected");
            // Half a message, then silence.
            assert!(r.exchange(stuck, b"0000:000011:").is_empty());
            r.run(EXCHANGE_TIMEOUT_NS / 1_000_000 + 1_000);
            assert!(!r.sock(stuck).may_send(), "the quiet client was dropped");
            let next = r.client();
            let reply = r.exchange(next, &Rig::msg_from(HOST));
            assert!(parse_dest(&reply).is_ok(), "{reply:?}");
        }

        #[test]
        fn a_client_that_never_closes_after_the_reply_is_cut_off() {
            let mut r = Rig::new();
            let c = r.client();
            assert!(parse_dest(&r.exchange(c, &Rig::msg_from(HOST))).is_ok());
            // No "done", no close: the socket is freed after the timeout.
            r.run(EXCHANGE_TIMEOUT_NS / 1_000_000 + 1_000);
            let next = r.client();
            assert!(parse_dest(&r.exchange(next, &Rig::msg_from(HOST))).is_ok());
        }

        #[test]
        fn garbage_a_megabyte_and_a_foreign_gid_are_refused_and_the_server_recovers() {
            let mut r = Rig::new();
            let garbage = r.client();
            assert!(r.exchange(garbage, &[0xa5; EXCHANGE_LEN]).is_empty());
            assert!(!r.sock(garbage).is_open() || !r.sock(garbage).may_send());
            let big = r.client();
            assert!(r.exchange(big, &vec![b'0'; 1 << 20]).is_empty());
            // The GID names another host than the TCP peer.
            let liar = r.client();
            assert!(r
                .exchange(liar, &Rig::msg_from(Ipv4Addr::new(10, 9, 0, 2)))
                .is_empty());
            assert_eq!(r.server.current().received, 0);
            let honest = r.client();
            assert!(parse_dest(&r.exchange(honest, &Rig::msg_from(HOST))).is_ok());
        }
    }
}
