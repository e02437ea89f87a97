//! Test support (feature `testing`): a memory that refuses to be touched
//! outside registered regions, a two-engine [`Pair`] over a virtual wire
//! with seeded loss, duplication and reordering, and the fuzz body
//! [`fuzz_responder`].

use alloc::vec;
use alloc::vec::Vec;
use core::net::Ipv4Addr;
use core::time::Duration;

use crate::wire::{self, Bth, Gid, MacAddr, RoceHeaders, DEFAULT_PKEY};
use crate::{
    Access, Config, Counters, CqId, DropReason, Engine, InitAttr, Instant, Memory, MemoryFault,
    MrKeys, Mtu, QpCaps, QpState, RecvWr, RtrAttr, RtsAttr, Sge,
};

/// Buffer size for [`Engine::poll_transmit`] that fits every MTU.
pub const FRAME_BUF: usize = 4096 + 128;

/// Byte-addressed memory `[0, len)` that panics on any engine access
/// outside the ranges currently allowed (the registered regions).
#[derive(Clone, Debug)]
pub struct TestMemory {
    /// The bytes.
    pub bytes: Vec<u8>,
    allowed: Vec<(u64, u64)>,
    /// Accesses the engine made.
    pub accesses: u64,
}

impl TestMemory {
    /// `len` zero bytes, nothing allowed.
    pub fn new(len: usize) -> TestMemory {
        TestMemory {
            bytes: vec![0; len],
            allowed: Vec::new(),
            accesses: 0,
        }
    }

    /// Allows engine accesses to `[addr, addr + len)`.
    pub fn allow(&mut self, addr: u64, len: u64) {
        self.allowed.push((addr, len));
    }

    /// Forbids `[addr, addr + len)` again.
    pub fn forbid(&mut self, addr: u64, len: u64) {
        self.allowed.retain(|&r| r != (addr, len));
    }

    fn check(&mut self, addr: u64, len: usize) -> Result<core::ops::Range<usize>, MemoryFault> {
        self.accesses += 1;
        let len = len as u64;
        let inside = self
            .allowed
            .iter()
            .any(|&(a, l)| addr >= a && len <= l && addr - a <= l - len);
        assert!(
            inside,
            "engine accessed [{addr:#x}, +{len:#x}) outside every registered region"
        );
        let start = usize::try_from(addr).map_err(|_| MemoryFault)?;
        let end = start.checked_add(len as usize).ok_or(MemoryFault)?;
        if end > self.bytes.len() {
            return Err(MemoryFault);
        }
        Ok(start..end)
    }

    /// Registers `[addr, addr + len)` with `engine` and allows it here.
    pub fn register(&mut self, engine: &mut Engine, addr: u64, len: u64, access: Access) -> MrKeys {
        let keys = engine.register_mr(addr, len, access).expect("register_mr");
        self.allow(addr, len);
        keys
    }
}

impl Memory for TestMemory {
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryFault> {
        let r = self.check(addr, buf.len())?;
        buf.copy_from_slice(&self.bytes[r]);
        Ok(())
    }

    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), MemoryFault> {
        let r = self.check(addr, data.len())?;
        self.bytes[r].copy_from_slice(data);
        Ok(())
    }
}

/// A small deterministic generator (SplitMix64).
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// True with probability `per_mille`/1000.
    pub fn chance(&mut self, per_mille: u32) -> bool {
        (self.next_u64() % 1000) < u64::from(per_mille)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// What the virtual wire does to each frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Frames lost, per mille.
    pub loss: u32,
    /// Frames delivered twice, per mille.
    pub duplicate: u32,
    /// Frames delayed by up to `jitter` (so reordered), per mille.
    pub reorder: u32,
    /// The largest extra delay of a reordered frame.
    pub jitter: Duration,
}

/// One end of a [`Pair`].
#[derive(Debug)]
pub struct Node {
    /// The engine.
    pub engine: Engine,
    /// Its memory.
    pub mem: TestMemory,
    /// Its completion queue (send and receive).
    pub cq: CqId,
    /// Its queue pair.
    pub qpn: u32,
}

/// Which node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Node `a`.
    A,
    /// Node `b`.
    B,
}

/// A frame on the wire.
#[derive(Clone, Debug)]
struct InFlight {
    at: Instant,
    seq: u64,
    to: Side,
    frame: Vec<u8>,
}

/// Link latency of the virtual wire.
pub const LATENCY: Duration = Duration::from_micros(10);
/// The ACK timeout the pair uses.
pub const ACK_TIMEOUT: Duration = Duration::from_millis(1);

/// The MAC and IPv4 address of a side.
pub fn address(side: Side) -> (MacAddr, Ipv4Addr) {
    match side {
        Side::A => (MacAddr([2, 0, 0, 0, 0, 0xA]), Ipv4Addr::new(10, 0, 0, 1)),
        Side::B => (MacAddr([2, 0, 0, 0, 0, 0xB]), Ipv4Addr::new(10, 0, 0, 2)),
    }
}

/// Two engines, each with one RC QP connected to the other, over a
/// virtual wire.
#[derive(Debug)]
pub struct Pair {
    /// Node A.
    pub a: Node,
    /// Node B.
    pub b: Node,
    /// Virtual time.
    pub now: Instant,
    /// Faults applied to every frame.
    pub faults: Faults,
    /// The fault generator.
    pub rng: Rng,
    wire: Vec<InFlight>,
    seq: u64,
    /// Frames put on the wire.
    pub frames: u64,
    /// A frame a test may inspect or rewrite before it is delivered.
    pub tap: Option<fn(Side, &mut Vec<u8>) -> bool>,
}

/// Options of [`Pair::new`].
#[derive(Clone, Copy, Debug)]
pub struct PairConfig {
    /// Path MTU.
    pub mtu: Mtu,
    /// Bytes of memory per node (one region `[0, mem)`, all rights).
    pub mem: usize,
    /// Retry count.
    pub retry_cnt: u8,
    /// RNR retry count.
    pub rnr_retry: u8,
    /// Work queue depths.
    pub depth: u32,
    /// Whether the peers learn each other's MAC by ARP.
    pub arp: bool,
}

impl Default for PairConfig {
    fn default() -> PairConfig {
        PairConfig {
            mtu: Mtu::Mtu1024,
            mem: 1 << 20,
            retry_cnt: 7,
            rnr_retry: 7,
            depth: 256,
            arp: false,
        }
    }
}

/// The region key of every node in a [`Pair`] (one region over all its
/// memory).
pub struct PairKeys {
    /// Keys of A's region.
    pub a: MrKeys,
    /// Keys of B's region.
    pub b: MrKeys,
}

fn node(side: Side, cfg: &PairConfig) -> (Node, MrKeys) {
    let (mac, ip) = address(side);
    let mut engine = Engine::new(Config::new(mac, ip));
    let cq = engine.create_cq(4 * cfg.depth as usize).expect("cq");
    let qpn = engine
        .create_qp(QpCaps {
            send_cq: cq,
            recv_cq: cq,
            sq_depth: cfg.depth,
            rq_depth: cfg.depth,
        })
        .expect("qp");
    engine
        .modify_qp_init(qpn, &InitAttr::default())
        .expect("init");
    let mut mem = TestMemory::new(cfg.mem);
    let keys = mem.register(
        &mut engine,
        0,
        cfg.mem as u64,
        Access::LOCAL_WRITE | Access::REMOTE_READ | Access::REMOTE_WRITE,
    );
    (
        Node {
            engine,
            mem,
            cq,
            qpn,
        },
        keys,
    )
}

impl Pair {
    /// Two connected nodes.
    pub fn new(cfg: PairConfig, faults: Faults, seed: u64) -> (Pair, PairKeys) {
        let (mut a, ka) = node(Side::A, &cfg);
        let (mut b, kb) = node(Side::B, &cfg);
        let (qa, qb) = (a.qpn, b.qpn);
        for (me, peer, peer_side, rq_psn, sq_psn) in [
            (&mut a, qb, Side::B, 0xFF_FFF0, 100),
            (&mut b, qa, Side::A, 100, 0xFF_FFF0),
        ] {
            let (peer_mac, peer_ip) = address(peer_side);
            let rtr = RtrAttr {
                mtu: cfg.mtu,
                dest_qpn: peer,
                rq_psn,
                remote_gid: Gid::from_ipv4(peer_ip),
                dest_mac: (!cfg.arp).then_some(peer_mac),
                max_dest_rd_atomic: crate::MAX_RD_ATOMIC,
                min_rnr_timer: 1,
            };
            me.engine.modify_qp_rtr(me.qpn, &rtr).expect("rtr");
            let rts = RtsAttr {
                sq_psn,
                ack_timeout: ACK_TIMEOUT,
                retry_cnt: cfg.retry_cnt,
                rnr_retry: cfg.rnr_retry,
                max_rd_atomic: crate::MAX_RD_ATOMIC,
            };
            me.engine.modify_qp_rts(me.qpn, &rts).expect("rts");
        }
        let pair = Pair {
            a,
            b,
            now: Instant(0),
            faults,
            rng: Rng(seed),
            wire: Vec::new(),
            seq: 0,
            frames: 0,
            tap: None,
        };
        (pair, PairKeys { a: ka, b: kb })
    }

    /// The node on `side`.
    pub fn node(&mut self, side: Side) -> &mut Node {
        match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
    }

    /// Posts a receive of `[addr, addr + len)` on `side`.
    pub fn post_recv(&mut self, side: Side, wr_id: u64, addr: u64, len: u32, lkey: u32) {
        let n = self.node(side);
        n.engine
            .post_recv(
                n.qpn,
                RecvWr {
                    wr_id,
                    sge: Sge { addr, len, lkey },
                },
                &mut n.mem,
            )
            .expect("post_recv");
    }

    fn put(&mut self, to: Side, frame: Vec<u8>) {
        self.frames += 1;
        let f = self.faults;
        if self.rng.chance(f.loss) {
            return;
        }
        let copies = if self.rng.chance(f.duplicate) { 2 } else { 1 };
        for _ in 0..copies {
            let mut at = self.now.after(LATENCY);
            if self.rng.chance(f.reorder) && !f.jitter.is_zero() {
                at = at.after(Duration::from_nanos(
                    self.rng.below(f.jitter.as_nanos() as u64 + 1),
                ));
            }
            self.seq += 1;
            self.wire.push(InFlight {
                at,
                seq: self.seq,
                to,
                frame: frame.clone(),
            });
        }
    }

    /// Moves every frame the engines want to send onto the wire.
    pub fn transmit(&mut self) {
        let mut buf = vec![0u8; FRAME_BUF];
        loop {
            let mut any = false;
            for side in [Side::A, Side::B] {
                let now = self.now;
                let n = self.node(side);
                if let Some(len) = n.engine.poll_transmit(now, &mut buf, &mut n.mem) {
                    let frame = buf[..len].to_vec();
                    let to = if side == Side::A { Side::B } else { Side::A };
                    self.put(to, frame);
                    any = true;
                }
            }
            if !any {
                break;
            }
        }
    }

    /// One step: send what is due, then deliver the earliest frames or
    /// fire the earliest timer (advancing virtual time). Returns `false`
    /// when nothing is left to do.
    pub fn step(&mut self) -> bool {
        self.transmit();
        let next_frame = self.wire.iter().map(|f| (f.at, f.seq)).min();
        let next_timer = [self.a.engine.poll_timeout(), self.b.engine.poll_timeout()]
            .into_iter()
            .flatten()
            .min();
        match (next_frame, next_timer) {
            (None, None) => false,
            (Some((at, seq)), t) if t.is_none_or(|t| at <= t) => {
                self.now = self.now.max(at);
                let i = self
                    .wire
                    .iter()
                    .position(|f| f.seq == seq)
                    .expect("present");
                let mut f = self.wire.swap_remove(i);
                if let Some(tap) = self.tap {
                    if !tap(f.to, &mut f.frame) {
                        return true;
                    }
                }
                let now = self.now;
                let n = self.node(f.to);
                n.engine.receive(now, &f.frame, &mut n.mem);
                true
            }
            (_, Some(t)) => {
                self.now = self.now.max(t);
                let now = self.now;
                for side in [Side::A, Side::B] {
                    let n = self.node(side);
                    n.engine.handle_timeout(now, &mut n.mem);
                }
                true
            }
            (Some(_), None) => unreachable!("handled by the first arm"),
        }
    }

    /// Steps until idle; `false` if `max_steps` were not enough (livelock).
    pub fn drive(&mut self, max_steps: usize) -> bool {
        for _ in 0..max_steps {
            if !self.step() {
                return true;
            }
        }
        false
    }

    /// Both QPs' states.
    pub fn states(&self) -> (Option<QpState>, Option<QpState>) {
        (
            self.a.engine.qp_state(self.a.qpn),
            self.b.engine.qp_state(self.b.qpn),
        )
    }
}

/// Builds a RoCEv2 frame from `from` to `to` carrying `bth` and the raw
/// bytes `rest` (extension headers and payload) with a correct ICRC.
pub fn frame(from: Side, to: Side, bth: Bth, rest: &[u8]) -> Vec<u8> {
    // Emit as SEND middle (no extension headers), then patch
    // the opcode: the ICRC is recomputed over the final bytes.
    let (src_mac, src_ip) = address(from);
    let (dst_mac, dst_ip) = address(to);
    let h = RoceHeaders {
        dst_mac,
        src_mac,
        src_ip,
        dst_ip,
        ip_id: 1,
        udp_src: 0xC000,
        bth: Bth {
            opcode: wire::Opcode::SendMiddle,
            ..bth
        },
        reth: None,
        aeth: None,
        imm: None,
    };
    let mut buf = vec![0u8; rest.len() + 128];
    let n = wire::emit_roce(&mut buf, &h, rest.len(), |out| {
        out.copy_from_slice(rest);
        Ok::<(), ()>(())
    })
    .expect("infallible")
    .expect("fits");
    buf.truncate(n);
    let t = wire::ETH_HDR_LEN + wire::IPV4_HDR_LEN + wire::UDP_HDR_LEN;
    buf[t] = bth.opcode as u8;
    // The emitter padded `rest` to a word; pad count as the caller says.
    buf[t + 1] = (buf[t + 1] & !0x30) | ((bth.pad & 3) << 4);
    reseal(&mut buf);
    buf
}

/// A request carrying a RETH (WRITE ONLY with `payload`, or READ request
/// with none) from `from` to `to`'s QP `qpn` at `psn`.
pub fn reth_request(
    from: Side,
    to: Side,
    op: wire::Opcode,
    qpn: u32,
    psn: u32,
    reth: wire::Reth,
    payload: &[u8],
) -> Vec<u8> {
    let mut rest = [0u8; wire::RETH_LEN];
    reth.write(&mut rest);
    let mut rest = rest.to_vec();
    rest.extend_from_slice(payload);
    frame(from, to, bth(op, qpn, psn), &rest)
}

/// A WRITE ONLY from A to B's QP `qpn` at `psn` of `payload` at `va`
/// with `rkey` (the RETH says `payload.len()` bytes).
pub fn write_a_to_b(qpn: u32, psn: u32, va: u64, rkey: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let reth = wire::Reth { va, rkey, len };
    let op = wire::Opcode::WriteOnly;
    reth_request(Side::A, Side::B, op, qpn, psn, reth, payload)
}

/// Asserts that going from `before` to `after` one frame was dropped, for
/// `reason` and nothing else.
pub fn assert_one_drop(before: &Counters, after: &Counters, reason: DropReason) {
    assert_eq!(
        after.dropped(reason),
        before.dropped(reason) + 1,
        "{reason:?}: {after:?}"
    );
    assert_eq!(
        after.dropped_total(),
        before.dropped_total() + 1,
        "only {reason:?}"
    );
}

/// Recomputes the IPv4 checksum and the ICRC of a frame after a test
/// edited it (frames too short to hold them are left alone).
pub fn reseal(frame: &mut [u8]) {
    let ip = wire::ETH_HDR_LEN;
    if frame.len() < ip + wire::IPV4_HDR_LEN + wire::UDP_HDR_LEN + wire::BTH_LEN + wire::ICRC_LEN {
        return;
    }
    frame[ip + 10..ip + 12].fill(0);
    let c = wire::internet_checksum(&frame[ip..ip + wire::IPV4_HDR_LEN]);
    frame[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
    let end = frame.len();
    if let Some(crc) = crate::icrc::icrc(&frame[ip..end - wire::ICRC_LEN]) {
        frame[end - wire::ICRC_LEN..].copy_from_slice(&crc.to_le_bytes());
    }
}

/// A plain BTH for hand-made packets.
pub fn bth(opcode: wire::Opcode, dest_qp: u32, psn: u32) -> Bth {
    Bth {
        opcode,
        solicited: false,
        migreq: true,
        pad: 0,
        pkey: DEFAULT_PKEY,
        fecn: false,
        becn: false,
        dest_qp,
        ack_req: true,
        psn: crate::psn::Psn::new(psn),
    }
}

/// The fuzz body: arbitrary bytes become a stream of frames fed to a
/// connected responder (node B of a [`Pair`], with receives posted and a
/// 4 KiB region in the middle of 16 KiB of memory). Half the frames are
/// raw bytes, half are well-framed RoCEv2 packets (correct Ethernet, IPv4,
/// UDP and ICRC, aimed at B's QP near its expected PSN) whose transport
/// headers and payload come from the input. Nothing may panic and
/// [`TestMemory`] panics on any access outside a registered region.
pub fn fuzz_responder(data: &[u8]) {
    let cfg = PairConfig {
        mtu: Mtu::Mtu256,
        mem: 16 << 10,
        depth: 16,
        ..PairConfig::default()
    };
    let (mut pair, _) = Pair::new(cfg, Faults::default(), 0);
    // Replace B's all-memory region by a small one in the middle.
    let b = &mut pair.b;
    b.mem = TestMemory::new(16 << 10);
    let keys = b.mem.register(
        &mut b.engine,
        0x1000,
        0x1000,
        Access::LOCAL_WRITE | Access::REMOTE_READ | Access::REMOTE_WRITE,
    );
    for i in 0..8 {
        let sge = Sge {
            addr: 0x1000 + i * 0x200,
            len: 0x200,
            lkey: keys.lkey,
        };
        let _ = b
            .engine
            .post_recv(b.qpn, RecvWr { wr_id: i, sge }, &mut b.mem);
    }
    let b_qpn = b.qpn;
    let mut input = data;
    let mut buf = vec![0u8; FRAME_BUF];
    let mut psn_base = 100u32;
    while input.len() >= 3 {
        let mode = input[0];
        let len = usize::from(u16::from_le_bytes([input[1], input[2]]) % 1100).min(input.len() - 3);
        let chunk = &input[3..3 + len];
        input = &input[3 + len..];
        let frame = if mode & 1 == 0 || chunk.len() < 4 {
            chunk.to_vec()
        } else {
            let op = chunk[0] % 0x12;
            let mut h = bth(
                wire::Opcode::from_u8(op).expect("RC opcode"),
                b_qpn,
                psn_base.wrapping_add(u32::from(chunk[1] % 8)),
            );
            h.pad = chunk[2] & 3;
            h.ack_req = chunk[3] & 1 != 0;
            if mode & 2 != 0 {
                psn_base = psn_base.wrapping_add(1);
            }
            let mut rest = chunk[4..].to_vec();
            // Point RETHs near the region now and then.
            if mode & 4 != 0 && rest.len() >= 16 {
                rest[..8].copy_from_slice(&(0x0F00u64 + u64::from(chunk[1]) * 0x40).to_be_bytes());
                rest[8..12].copy_from_slice(&keys.rkey.to_be_bytes());
            }
            frame(Side::A, Side::B, h, &rest)
        };
        let now = pair.now;
        let b = &mut pair.b;
        b.engine.receive(now, &frame, &mut b.mem);
        while b.engine.poll_transmit(now, &mut buf, &mut b.mem).is_some() {}
        while b.engine.poll_cq(b.cq).is_some() {}
        pair.now = pair.now.after(Duration::from_micros(100));
        let now = pair.now;
        b.engine.handle_timeout(now, &mut b.mem);
    }
}
