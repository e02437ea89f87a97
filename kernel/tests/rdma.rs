//! Bad input (issue 13, point 5) through the appliance's RDMA wiring: every
//! hostile frame goes through the driver's receive filter
//! ([`fractos_kernel::rdma::rx_route`], which must divert it) into the
//! appliance's [`RdmaPort`] (the engine over the appliance's region arena),
//! and is dropped or NAK'd as the specification says, counted, and leaves
//! every byte of the arena outside a registered region untouched. The
//! engine crate's own `tests/bad_input.rs` covers the same cases (and more
//! framing ones) against its test memory.

use fractos_kernel::rdma::{rx_route, RdmaPort};
use fractos_roce::testing::{self, address, bth, frame, reseal, Side};
use fractos_roce::wire::{self, Frame, Gid, LocalAddr, NakCode, Opcode, Reth, Syndrome};
use fractos_roce::{
    local_ack_timeout, Access, DropReason, InitAttr, Mtu, NakKind, QpCaps, RecvWr, RtrAttr,
    RtsAttr, Sge,
};
use fractos_virtio_net::RxRoute;

/// The peer's QPN (A) and the PSN our QP (B) expects.
const PEER_QPN: u32 = 0x42;
const EPSN: u32 = 100;
/// The registered region and the arena around it.
const REGION: (u64, u64) = (0x1000, 0x1000);
const ARENA: usize = 0x4000;
const FILL: u8 = 0x5A;

struct Fixture {
    port: RdmaPort,
    qpn: u32,
    rkey: u32,
    now: u64,
}

/// The appliance is B, connected to A; one region with remote rights and
/// two receives posted into it; the rest of the arena is filled with
/// [`FILL`].
fn fixture() -> Fixture {
    let (mac, ip) = address(Side::B);
    let (peer_mac, peer_ip) = address(Side::A);
    let mut port = RdmaPort::new(mac.0, ip, ARENA);
    let all = port.mem.alloc(ARENA).unwrap();
    fractos_roce::Memory::write(&mut port.mem, all, &[FILL; ARENA]).unwrap();
    let e = &mut port.engine;
    let cq = e.create_cq(16).unwrap();
    let keys = e
        .register_mr(
            REGION.0,
            REGION.1,
            Access::LOCAL_WRITE | Access::REMOTE_READ | Access::REMOTE_WRITE,
        )
        .unwrap();
    let qpn = e
        .create_qp(QpCaps {
            send_cq: cq,
            recv_cq: cq,
            sq_depth: 4,
            rq_depth: 4,
        })
        .unwrap();
    e.modify_qp_init(qpn, &InitAttr::default()).unwrap();
    for (i, at) in [(1, REGION.0), (2, REGION.0 + 0x100)] {
        let wr = RecvWr {
            wr_id: i,
            sge: Sge {
                addr: at,
                len: 0x100,
                lkey: keys.lkey,
            },
        };
        e.post_recv(qpn, wr, &mut port.mem).unwrap();
    }
    e.modify_qp_rtr(
        qpn,
        &RtrAttr {
            mtu: Mtu::Mtu1024,
            dest_qpn: PEER_QPN,
            rq_psn: EPSN,
            remote_gid: Gid::from_ipv4(peer_ip),
            dest_mac: Some(peer_mac),
            max_dest_rd_atomic: 1,
            min_rnr_timer: 12,
        },
    )
    .unwrap();
    e.modify_qp_rts(
        qpn,
        &RtsAttr {
            sq_psn: 7,
            ack_timeout: local_ack_timeout(14),
            retry_cnt: 7,
            rnr_retry: 7,
            max_rd_atomic: 1,
        },
    )
    .unwrap();
    Fixture {
        port,
        qpn,
        rkey: keys.rkey,
        now: 1_000_000,
    }
}

impl Fixture {
    /// Through the driver's filter and the port, as the event loop does;
    /// returns what the appliance sends back: `(opcode, psn, syndrome)`.
    fn feed(&mut self, frame: &[u8]) -> Vec<(Opcode, u32, Option<Syndrome>)> {
        assert_eq!(rx_route(frame), RxRoute::Divert, "the driver diverts it");
        self.now += 1000;
        self.port.receive(self.now, frame);
        let (mac, ip) = address(Side::A);
        let mut out = Vec::new();
        self.port.poll(self.now, 64, |f| {
            if let Ok(Frame::Roce(p)) = wire::parse_frame(f, &LocalAddr { mac, ip }) {
                out.push((p.bth.opcode, p.bth.psn.value(), p.aeth.map(|a| a.syndrome)));
            }
            true
        });
        out
    }

    /// The arena outside the region is still all [`FILL`].
    fn outside_untouched(&self) {
        let (start, len) = (REGION.0 as usize, REGION.1 as usize);
        let all = self.port.mem.get(0, ARENA).unwrap();
        assert!(all[..start].iter().all(|&b| b == FILL), "before the region");
        assert!(
            all[start + len..].iter().all(|&b| b == FILL),
            "after the region"
        );
    }

    fn region_untouched(&self) {
        let r = self.port.mem.get(REGION.0, REGION.1 as usize).unwrap();
        assert!(r.iter().all(|&b| b == FILL), "the region was written");
    }

    /// Expects one drop for `reason`, nothing sent, nothing written.
    fn expect_drop(&mut self, frame: &[u8], reason: DropReason) {
        let before = self.port.engine.counters().clone();
        let out = self.feed(frame);
        testing::assert_one_drop(&before, self.port.engine.counters(), reason);
        assert!(out.is_empty(), "{reason:?}: sent {out:?}");
        self.outside_untouched();
        self.region_untouched();
    }

    /// Expects one remote-access NAK for `psn`, counted, nothing written.
    fn expect_access_nak(&mut self, frame: &[u8], psn: u32) {
        let before = self.port.engine.counters().nak_sent(NakKind::RemoteAccess);
        let out = self.feed(frame);
        assert_eq!(
            out,
            vec![(
                Opcode::Acknowledge,
                psn,
                Some(Syndrome::Nak(NakCode::RemoteAccess))
            )]
        );
        assert_eq!(
            self.port.engine.counters().nak_sent(NakKind::RemoteAccess),
            before + 1
        );
        self.outside_untouched();
        self.region_untouched();
    }

    fn write_only(&self, psn: u32, va: u64, rkey: u32, payload: &[u8]) -> Vec<u8> {
        testing::write_a_to_b(self.qpn, psn, va, rkey, payload)
    }

    fn send_only(&self, psn: u32, payload: &[u8]) -> Vec<u8> {
        send_only_to(self.qpn, psn, payload)
    }
}

/// A SEND ONLY from A to QP `qpn` of B.
fn send_only_to(qpn: u32, psn: u32, payload: &[u8]) -> Vec<u8> {
    frame(Side::A, Side::B, bth(Opcode::SendOnly, qpn, psn), payload)
}

#[test]
fn a_good_write_lands_inside_the_region_only() {
    let mut f = fixture();
    let p = f.write_only(EPSN, REGION.0 + 0x10, f.rkey, &[0xEE; 8]);
    let out = f.feed(&p);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].0, Opcode::Acknowledge);
    assert!(matches!(out[0].2, Some(Syndrome::Ack { .. })), "{out:?}");
    f.outside_untouched();
    let r = f.port.mem.get(REGION.0, REGION.1 as usize).unwrap();
    assert_eq!(&r[0x10..0x18], &[0xEE; 8]);
    assert!(r[..0x10].iter().chain(&r[0x18..]).all(|&b| b == FILL));
    assert_eq!(f.port.engine.counters().dropped_total(), 0);
}

#[test]
fn wrong_icrc_is_dropped() {
    let mut f = fixture();
    let mut p = f.send_only(EPSN, &[1; 8]);
    let last = p.len() - 1;
    p[last] ^= 0x01;
    f.expect_drop(&p, DropReason::BadIcrc);
    // A payload byte changed after the ICRC was computed.
    let mut p = f.write_only(EPSN, REGION.0, f.rkey, &[2; 8]);
    p[14 + 20 + 8 + 12 + 16] ^= 0xFF;
    f.expect_drop(&p, DropReason::BadIcrc);
}

#[test]
fn psn_far_outside_the_window_is_one_sequence_nak_then_silence() {
    let mut f = fixture();
    let far = (EPSN + 0x40_0000) & 0xFF_FFFF;
    let out = f.feed(&f.write_only(far, REGION.0, f.rkey, &[3; 8]));
    assert_eq!(
        out,
        vec![(
            Opcode::Acknowledge,
            EPSN,
            Some(Syndrome::Nak(NakCode::SequenceError))
        )]
    );
    assert_eq!(f.port.engine.counters().nak_sent(NakKind::SequenceError), 1);
    f.region_untouched();
    // Until the expected PSN comes, more out-of-sequence requests are
    // dropped silently (one NAK per error).
    let p = f.write_only(far + 1, REGION.0, f.rkey, &[3; 8]);
    f.expect_drop(&p, DropReason::OutOfSequence);
}

#[test]
fn reth_outside_the_region_is_a_remote_access_nak() {
    for (va, len) in [
        (REGION.0 + REGION.1 - 4, 8u32),
        (REGION.0 - 1, 4),
        (0x3000, 4),
        (u64::MAX - 3, 8),
    ] {
        let mut f = fixture();
        let p = f.write_only(EPSN, va, f.rkey, &vec![0xEE; len as usize]);
        f.expect_access_nak(&p, EPSN);
    }
    // A READ reaching past the end.
    let mut f = fixture();
    let va = REGION.0 + REGION.1 - 2;
    let reth = Reth {
        va,
        rkey: f.rkey,
        len: 8,
    };
    let p = testing::reth_request(
        Side::A,
        Side::B,
        Opcode::ReadRequest,
        f.qpn,
        EPSN,
        reth,
        &[],
    );
    f.expect_access_nak(&p, EPSN);
}

#[test]
fn a_revoked_rkey_is_a_remote_access_nak() {
    let mut f = fixture();
    f.port.engine.invalidate_rkey(f.rkey).unwrap();
    let p = f.write_only(EPSN, REGION.0, f.rkey, &[4; 8]);
    f.expect_access_nak(&p, EPSN);
    // A guessed key of another generation too.
    let mut f = fixture();
    let p = f.write_only(EPSN, REGION.0, f.rkey ^ 0x100, &[4; 8]);
    f.expect_access_nak(&p, EPSN);
}

#[test]
fn unknown_qps_and_wrong_sources_are_dropped() {
    let mut f = fixture();
    f.expect_drop(&send_only_to(0x9999, EPSN, &[0; 4]), DropReason::UnknownQp);
    // The right QP from another IPv4 address (the connection data named
    // A's address; nothing in a packet can change that).
    let mut p = f.send_only(EPSN, &[0; 4]);
    p[14 + 15] = 77;
    reseal(&mut p);
    f.expect_drop(&p, DropReason::WrongSource);
    // A write from the wrong address.
    let mut p = f.write_only(EPSN, REGION.0, f.rkey, &[5; 8]);
    p[14 + 12..14 + 16].copy_from_slice(&[10, 0, 0, 99]);
    reseal(&mut p);
    f.expect_drop(&p, DropReason::WrongSource);
    // Addressed to another host's IP on our MAC.
    let mut p = f.send_only(EPSN, &[0; 4]);
    p[14 + 19] = 200;
    reseal(&mut p);
    f.expect_drop(&p, DropReason::NotOurIp);
    // None of it moved the QP: the expected PSN is still accepted.
    let out = f.feed(&f.send_only(EPSN, &[6; 4]));
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(matches!(out[0].2, Some(Syndrome::Ack { .. })), "{out:?}");
}

#[test]
fn arp_replies_reach_the_engine_and_requests_do_not_divert() {
    // The engine resolves a peer it has no MAC for through the copied ARP
    // reply (the driver gives smoltcp the same frame).
    let (mac, ip) = address(Side::B);
    let (peer_mac, peer_ip) = address(Side::A);
    let mut port = RdmaPort::new(mac.0, ip, 4096);
    let e = &mut port.engine;
    let cq = e.create_cq(4).unwrap();
    let qpn = e
        .create_qp(QpCaps {
            send_cq: cq,
            recv_cq: cq,
            sq_depth: 1,
            rq_depth: 1,
        })
        .unwrap();
    e.modify_qp_init(qpn, &InitAttr::default()).unwrap();
    e.modify_qp_rtr(
        qpn,
        &RtrAttr {
            mtu: Mtu::Mtu1024,
            dest_qpn: PEER_QPN,
            rq_psn: 0,
            remote_gid: Gid::from_ipv4(peer_ip),
            dest_mac: None,
            max_dest_rd_atomic: 1,
            min_rnr_timer: 12,
        },
    )
    .unwrap();
    let mut sent = Vec::new();
    port.poll(1, 8, |f| {
        sent.push(f.to_vec());
        true
    });
    assert_eq!(sent.len(), 1, "one ARP request");
    assert_eq!(rx_route(&sent[0]), RxRoute::Stack, "requests are smoltcp's");
    let reply = wire::Arp {
        op: wire::ArpOp::Reply,
        sender_mac: peer_mac,
        sender_ip: peer_ip,
        target_mac: mac,
        target_ip: ip,
    };
    let mut buf = vec![0u8; 64];
    let n = wire::emit_arp(&mut buf, peer_mac, &reply).unwrap();
    assert_eq!(rx_route(&buf[..n]), RxRoute::Copy);
    port.receive(2, &buf[..n]);
    assert_eq!(port.engine.neighbor(peer_ip), Some(peer_mac));
}
