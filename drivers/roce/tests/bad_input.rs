//! Bad input (issue 13, point 5): every malformed or hostile packet is
//! dropped or NAK'd as the specification says, counted, and nothing outside
//! a registered region is read or written ([`TestMemory`] panics if it is).

use fractos_roce::testing::{
    self, address, bth, frame, reseal, Faults, Pair, PairConfig, Side, TestMemory, FRAME_BUF,
};
use fractos_roce::wire::{self, Aeth, Frame, LocalAddr, NakCode, Opcode, Reth, Syndrome};
use fractos_roce::{
    Access, DropReason, NakKind, QpState, RemoteAddr, SendOp, SendWr, Sge, WcStatus,
};

/// B's expected PSN in a fresh pair.
const EPSN: u32 = 100;

struct Fixture {
    pair: Pair,
    rkey: u32,
    lkey: u32,
}

/// B has one 4 KiB region at 0x1000 (in 64 KiB of memory) and two posted
/// receives.
fn fixture() -> Fixture {
    let (mut pair, _) = Pair::new(
        PairConfig {
            mem: 64 << 10,
            ..PairConfig::default()
        },
        Faults::default(),
        9,
    );
    let b = &mut pair.b;
    // Forget the all-memory region: only [0x1000, 0x2000) is registered.
    b.mem = TestMemory::new(64 << 10);
    let keys = b.mem.register(
        &mut b.engine,
        0x1000,
        0x1000,
        Access::LOCAL_WRITE | Access::REMOTE_READ | Access::REMOTE_WRITE,
    );
    pair.post_recv(Side::B, 1, 0x1000, 256, keys.lkey);
    pair.post_recv(Side::B, 2, 0x1100, 256, keys.lkey);
    Fixture {
        pair,
        rkey: keys.rkey,
        lkey: keys.lkey,
    }
}

/// What B sends back: `(opcode, psn, syndrome)`.
fn feed(f: &mut Fixture, frame: &[u8]) -> Vec<(Opcode, u32, Option<Syndrome>)> {
    let b = &mut f.pair.b;
    let now = f.pair.now;
    b.engine.receive(now, frame, &mut b.mem);
    let mut out = Vec::new();
    let mut buf = vec![0u8; FRAME_BUF];
    let (mac, ip) = address(Side::A);
    while let Some(n) = b.engine.poll_transmit(now, &mut buf, &mut b.mem) {
        if let Ok(Frame::Roce(p)) = wire::parse_frame(&buf[..n], &LocalAddr { mac, ip }) {
            out.push((
                p.bth.opcode,
                p.bth.psn.value(),
                p.aeth.map(|a: Aeth| a.syndrome),
            ));
        }
    }
    out
}

fn write_only(f: &Fixture, psn: u32, va: u64, rkey: u32, payload: &[u8]) -> Vec<u8> {
    testing::write_a_to_b(f.pair.b.qpn, psn, va, rkey, payload)
}

fn read_req(f: &Fixture, psn: u32, va: u64, rkey: u32, len: u32) -> Vec<u8> {
    let reth = Reth { va, rkey, len };
    testing::reth_request(
        Side::A,
        Side::B,
        Opcode::ReadRequest,
        f.pair.b.qpn,
        psn,
        reth,
        &[],
    )
}

fn send_only(f: &Fixture, psn: u32, payload: &[u8]) -> Vec<u8> {
    frame(
        Side::A,
        Side::B,
        bth(Opcode::SendOnly, f.pair.b.qpn, psn),
        payload,
    )
}

/// Feeds `frame` and expects one drop for `reason`, nothing sent, no
/// memory touched.
fn expect_drop(f: &mut Fixture, frame: &[u8], reason: DropReason) {
    let before = f.pair.b.engine.counters().clone();
    let accesses = f.pair.b.mem.accesses;
    let out = feed(f, frame);
    testing::assert_one_drop(&before, f.pair.b.engine.counters(), reason);
    assert!(out.is_empty(), "{reason:?}: sent {out:?}");
    assert_eq!(
        f.pair.b.mem.accesses, accesses,
        "{reason:?}: memory touched"
    );
}

#[test]
fn a_good_packet_is_accepted() {
    let mut f = fixture();
    let p = write_only(&f, EPSN, 0x1800, f.rkey, &[7; 64]);
    let out = feed(&mut f, &p);
    assert_eq!(
        out,
        [(
            Opcode::Acknowledge,
            EPSN,
            Some(Syndrome::Ack { credits: 0x1F })
        )]
    );
    assert_eq!(&f.pair.b.mem.bytes[0x1800..0x1840], &[7; 64]);
}

#[test]
fn wrong_icrc() {
    let mut f = fixture();
    let mut p = write_only(&f, EPSN, 0x1800, f.rkey, &[7; 64]);
    let n = p.len();
    p[n - 1] ^= 1;
    expect_drop(&mut f, &p, DropReason::BadIcrc);
    // A payload byte changed after the ICRC was computed.
    let mut p = write_only(&f, EPSN, 0x1800, f.rkey, &[7; 64]);
    p[n - 10] ^= 0x80;
    expect_drop(&mut f, &p, DropReason::BadIcrc);
    // The masked fields may change freely: TTL, TOS, FECN/BECN.
    let mut p = write_only(&f, EPSN, 0x1800, f.rkey, &[7; 64]);
    p[14 + 8] = 3;
    p[14 + 1] = 0x02;
    p[14 + 28 + 4] = 0xC0;
    reseal_ip_only(&mut p);
    assert_eq!(feed(&mut f, &p).len(), 1);
    assert_eq!(f.pair.b.engine.counters().dropped_total(), 2);
}

fn reseal_ip_only(p: &mut [u8]) {
    p[24..26].fill(0);
    let c = wire::internet_checksum(&p[14..34]);
    p[24..26].copy_from_slice(&c.to_be_bytes());
}

/// An edit of a good frame.
type Edit = Box<dyn Fn(&mut Vec<u8>)>;

#[test]
fn malformed_framing() {
    let mut f = fixture();
    let good = write_only(&f, EPSN, 0x1800, f.rkey, &[1; 8]);
    let cases: Vec<(Edit, DropReason)> = vec![
        (Box::new(|p| p.truncate(10)), DropReason::Truncated),
        (Box::new(|p| p.truncate(30)), DropReason::Truncated),
        (Box::new(|p| p.truncate(60)), DropReason::Truncated),
        (Box::new(|p| p[0] = 0x04), DropReason::NotOurMac),
        (
            Box::new(|p| p[12..14].copy_from_slice(&[0x81, 0x00])),
            DropReason::EtherType,
        ),
        (Box::new(|p| p[14] = 0x65), DropReason::IpHeader),
        (Box::new(|p| p[14] = 0x44), DropReason::IpHeader),
        (
            Box::new(|p| {
                p[14] = 0x46;
                reseal_ip_only(p)
            }),
            DropReason::IpOptions,
        ),
        (Box::new(|p| p[14 + 12] ^= 1), DropReason::IpChecksum),
        (
            Box::new(|p| {
                p[14 + 6] = 0x20;
                reseal_ip_only(p)
            }),
            DropReason::IpFragment,
        ),
        (
            Box::new(|p| {
                p[14 + 7] = 0x08;
                reseal_ip_only(p)
            }),
            DropReason::IpFragment,
        ),
        (
            Box::new(|p| {
                p[14 + 9] = 6;
                reseal_ip_only(p)
            }),
            DropReason::NotUdp,
        ),
        (
            Box::new(|p| {
                p[14 + 19] = 99;
                reseal_ip_only(p)
            }),
            DropReason::NotOurIp,
        ),
        (
            Box::new(|p| {
                p[14 + 2..14 + 4].copy_from_slice(&2000u16.to_be_bytes());
                reseal_ip_only(p)
            }),
            DropReason::Truncated,
        ),
        (
            Box::new(|p| {
                p[14 + 2..14 + 4].copy_from_slice(&20u16.to_be_bytes());
                reseal_ip_only(p)
            }),
            DropReason::IpHeader,
        ),
        (Box::new(|p| p[34 + 5] ^= 4), DropReason::UdpLength),
        (Box::new(|p| p[34 + 2] = 0x13), DropReason::NotRocePort),
        (Box::new(|p| p[34 + 6] = 0x12), DropReason::UdpChecksum),
        (
            Box::new(|p| {
                p[42 + 1] |= 0x01;
                reseal(p)
            }),
            DropReason::BthVersion,
        ),
        (
            Box::new(|p| {
                p[42] = 0x13;
                reseal(p)
            }),
            DropReason::UnsupportedOpcode,
        ), // compare & swap
        (
            Box::new(|p| {
                p[42] = 0x64;
                reseal(p)
            }),
            DropReason::UnsupportedOpcode,
        ), // UD send only
        (
            Box::new(|p| {
                p[42] = 0x81;
                reseal(p)
            }),
            DropReason::UnsupportedOpcode,
        ), // CNP
        (
            Box::new(|p| {
                p[42] = 0x0C;
                reseal(p)
            }),
            DropReason::BadLength,
        ), // READ request with payload
    ];
    for (edit, reason) in cases {
        let mut p = good.clone();
        edit(&mut p);
        expect_drop(&mut f, &p, reason);
    }
    // Pad count larger than payload+pad, and payload not a whole word.
    let mut h = bth(Opcode::SendOnly, f.pair.b.qpn, EPSN);
    h.pad = 3;
    expect_drop(
        &mut f,
        &frame(Side::A, Side::B, h, &[]),
        DropReason::BadLength,
    );
    let mut p = send_only(&f, EPSN, &[1, 2, 3, 4]);
    let icrc_at = p.len() - 4;
    p.insert(icrc_at, 9); // 5 bytes of payload+pad
    for (at, len) in [(14 + 2, p.len() - 14), (34 + 4, p.len() - 34)] {
        p[at..at + 2].copy_from_slice(&(len as u16).to_be_bytes());
    }
    reseal(&mut p);
    expect_drop(&mut f, &p, DropReason::BadLength);
    // Ethernet padding after the IP packet is ignored.
    let mut p = send_only(&f, EPSN, &[5; 4]);
    p.extend_from_slice(&[0; 20]);
    assert_eq!(feed(&mut f, &p).len(), 1);
    assert_eq!(f.pair.b.engine.poll_cq(f.pair.b.cq).unwrap().byte_len, 4);
}

#[test]
fn a_correct_udp_checksum_is_accepted() {
    let mut f = fixture();
    let mut p = send_only(&f, EPSN, &[3; 16]);
    let (src, dst) = (address(Side::A).1, address(Side::B).1);
    let c = wire::udp_checksum(src, dst, &p[34..]);
    p[40..42].copy_from_slice(&c.to_be_bytes());
    assert_eq!(feed(&mut f, &p).len(), 1);
    assert_eq!(f.pair.b.engine.counters().dropped_total(), 0);
}

#[test]
fn unknown_qp_wrong_source_bad_pkey() {
    let mut f = fixture();
    let p = frame(
        Side::A,
        Side::B,
        bth(Opcode::SendOnly, 0x9999, EPSN),
        &[0; 4],
    );
    expect_drop(&mut f, &p, DropReason::UnknownQp);
    let p = frame(Side::A, Side::B, bth(Opcode::SendOnly, 0, EPSN), &[0; 4]);
    expect_drop(&mut f, &p, DropReason::UnknownQp);
    // The same packet from another IPv4 address.
    let mut p = send_only(&f, EPSN, &[0; 4]);
    p[14 + 15] = 77;
    reseal(&mut p);
    expect_drop(&mut f, &p, DropReason::WrongSource);
    let mut h = bth(Opcode::SendOnly, f.pair.b.qpn, EPSN);
    h.pkey = 0x8001;
    expect_drop(
        &mut f,
        &frame(Side::A, Side::B, h, &[0; 4]),
        DropReason::BadPkey,
    );
    h.pkey = 0x7FFF; // limited member talking to a full member is fine
    assert_eq!(feed(&mut f, &frame(Side::A, Side::B, h, &[0; 4])).len(), 1);
    // A QP that is not connected yet.
    let b = &mut f.pair.b;
    let cq = b.cq;
    let qpn = b
        .engine
        .create_qp(fractos_roce::QpCaps {
            send_cq: cq,
            recv_cq: cq,
            sq_depth: 4,
            rq_depth: 4,
        })
        .unwrap();
    expect_drop(
        &mut f,
        &frame(Side::A, Side::B, bth(Opcode::SendOnly, qpn, 0), &[0; 4]),
        DropReason::QpState,
    );
}

#[test]
fn psn_far_ahead_is_one_sequence_nak_then_silence() {
    let mut f = fixture();
    let far = EPSN + (1 << 22);
    let out = {
        let p = send_only(&f, far, &[1; 8]);
        feed(&mut f, &p)
    };
    assert_eq!(
        out,
        [(
            Opcode::Acknowledge,
            EPSN,
            Some(Syndrome::Nak(NakCode::SequenceError))
        )]
    );
    {
        let p = send_only(&f, far + 1, &[1; 8]);
        expect_drop(&mut f, &p, DropReason::OutOfSequence)
    };
    {
        let p = write_only(&f, EPSN + 1, 0x1000, f.rkey, &[1; 8]);
        expect_drop(&mut f, &p, DropReason::OutOfSequence)
    };
    assert_eq!(
        f.pair.b.engine.counters().nak_sent(NakKind::SequenceError),
        1
    );
    assert_eq!(f.pair.b.mem.accesses, 0);
    // The expected PSN clears the state.
    assert_eq!(
        {
            let p = send_only(&f, EPSN, &[1; 8]);
            feed(&mut f, &p)
        }
        .len(),
        1
    );
    assert_eq!(f.pair.b.engine.qp_state(f.pair.b.qpn), Some(QpState::Rts));
}

#[test]
fn psn_far_behind_is_a_duplicate_and_re_acked() {
    let mut f = fixture();
    let far_behind = EPSN.wrapping_sub(1 << 22) & 0xFF_FFFF;
    let out = {
        let p = write_only(&f, far_behind, 0x1000, f.rkey, &[9; 8]);
        feed(&mut f, &p)
    };
    assert_eq!(
        out,
        [(
            Opcode::Acknowledge,
            EPSN - 1,
            Some(Syndrome::Ack { credits: 0x1F })
        )]
    );
    assert_eq!(f.pair.b.engine.counters().duplicates, 1);
    assert_eq!(
        f.pair.b.mem.accesses, 0,
        "a duplicate is not executed again"
    );
    // A duplicate READ outside the region is not served.
    let p = read_req(&f, far_behind, 0x8000, f.rkey, 8);
    expect_drop(&mut f, &p, DropReason::DuplicateRead);
    // A duplicate READ that would claim PSNs not yet used is not served.
    let p = read_req(&f, EPSN - 1, 0x1000, f.rkey, 4096);
    expect_drop(&mut f, &p, DropReason::DuplicateRead);
}

fn expect_remote_access_nak(f: &mut Fixture, p: &[u8], psn: u32) {
    let accesses = f.pair.b.mem.accesses;
    let out = feed(f, p);
    assert_eq!(
        out,
        [(
            Opcode::Acknowledge,
            psn,
            Some(Syndrome::Nak(NakCode::RemoteAccess))
        )]
    );
    assert_eq!(
        f.pair.b.engine.counters().nak_sent(NakKind::RemoteAccess),
        1
    );
    assert_eq!(f.pair.b.mem.accesses, accesses, "nothing read or written");
    assert_eq!(f.pair.b.engine.qp_state(f.pair.b.qpn), Some(QpState::Error));
    // The posted receives are flushed; later packets are dropped.
    let b = &mut f.pair.b;
    let wcs: Vec<_> = std::iter::from_fn(|| b.engine.poll_cq(b.cq))
        .map(|c| c.status)
        .collect();
    assert!(
        wcs.iter().all(|s| *s == WcStatus::WrFlush) && !wcs.is_empty(),
        "{wcs:?}"
    );
    let p = send_only(f, psn + 1, &[0; 4]);
    expect_drop(f, &p, DropReason::QpState);
}

#[test]
fn reth_outside_the_region() {
    for (va, len) in [
        (0x1FFC, 8),
        (0x0FFF, 4),
        (0x8000, 4),
        (u64::MAX - 3, 8),
        (0x1000, 0x1004),
    ] {
        let mut f = fixture();
        let p = if len <= 8 {
            write_only(&f, EPSN, va, f.rkey, &vec![0xEE; len as usize])
        } else {
            // A WRITE_FIRST announcing more than the region holds.
            let mut rest = vec![0u8; 16];
            let mut reth = [0u8; 16];
            Reth {
                va,
                rkey: f.rkey,
                len,
            }
            .write(&mut reth);
            rest[..16].copy_from_slice(&reth);
            rest.extend_from_slice(&[0xEE; 1024]);
            frame(
                Side::A,
                Side::B,
                bth(Opcode::WriteFirst, f.pair.b.qpn, EPSN),
                &rest,
            )
        };
        expect_remote_access_nak(&mut f, &p, EPSN);
    }
    for (va, len) in [(0x1FFF, 2), (0x800, 0x900), (u64::MAX, 1)] {
        let mut f = fixture();
        let p = read_req(&f, EPSN, va, f.rkey, len);
        expect_remote_access_nak(&mut f, &p, EPSN);
    }
}

#[test]
fn revoked_and_deregistered_rkeys() {
    let mut f = fixture();
    f.pair.b.engine.invalidate_rkey(f.rkey).unwrap();
    let p = write_only(&f, EPSN, 0x1000, f.rkey, &[1; 8]);
    expect_remote_access_nak(&mut f, &p, EPSN);

    let mut f = fixture();
    f.pair.b.engine.deregister_mr(f.lkey).unwrap();
    f.pair.b.mem.forbid(0x1000, 0x1000);
    let p = read_req(&f, EPSN, 0x1000, f.rkey, 8);
    expect_remote_access_nak(&mut f, &p, EPSN);

    // A region without remote write rights.
    let mut f = fixture();
    let b = &mut f.pair.b;
    let ro = b
        .mem
        .register(&mut b.engine, 0x3000, 0x100, Access::REMOTE_READ);
    let p = write_only(&f, EPSN, 0x3000, ro.rkey, &[1; 8]);
    expect_remote_access_nak(&mut f, &p, EPSN);
}

#[test]
fn rkey_revoked_in_the_middle_of_a_write() {
    let mut f = fixture();
    let mut rest = vec![0u8; 16];
    Reth {
        va: 0x1000,
        rkey: f.rkey,
        len: 2048,
    }
    .write((&mut rest[..16]).try_into().unwrap());
    rest.extend_from_slice(&[0xAB; 1024]);
    let first = frame(
        Side::A,
        Side::B,
        bth(Opcode::WriteFirst, f.pair.b.qpn, EPSN),
        &rest,
    );
    assert_eq!(
        feed(&mut f, &first),
        [(
            Opcode::Acknowledge,
            EPSN,
            Some(Syndrome::Ack { credits: 0x1F })
        )]
    );
    assert_eq!(&f.pair.b.mem.bytes[0x1000..0x1400], &[0xAB; 1024]);
    f.pair.b.engine.invalidate_rkey(f.rkey).unwrap();
    let last = frame(
        Side::A,
        Side::B,
        bth(Opcode::WriteLast, f.pair.b.qpn, EPSN + 1),
        &[0xCD; 1024],
    );
    expect_remote_access_nak(&mut f, &last, EPSN + 1);
    assert_eq!(&f.pair.b.mem.bytes[0x1400..0x1800], &[0; 1024]);
}

#[test]
fn invalid_request_sequences() {
    // A middle packet with no first, a READ inside a SEND, a short FIRST.
    let mut f = fixture();
    let p = frame(
        Side::A,
        Side::B,
        bth(Opcode::SendMiddle, f.pair.b.qpn, EPSN),
        &[0; 1024],
    );
    let out = feed(&mut f, &p);
    assert_eq!(
        out,
        [(
            Opcode::Acknowledge,
            EPSN,
            Some(Syndrome::Nak(NakCode::InvalidRequest))
        )]
    );
    assert_eq!(f.pair.b.engine.qp_state(f.pair.b.qpn), Some(QpState::Error));

    let mut f = fixture();
    let p = frame(
        Side::A,
        Side::B,
        bth(Opcode::SendFirst, f.pair.b.qpn, EPSN),
        &[0; 100],
    );
    assert_eq!(
        feed(&mut f, &p)[0].2,
        Some(Syndrome::Nak(NakCode::InvalidRequest))
    );

    // A SEND longer than the posted receive: local length error there.
    let mut f = fixture();
    let p = frame(
        Side::A,
        Side::B,
        bth(Opcode::SendFirst, f.pair.b.qpn, EPSN),
        &[0; 1024],
    );
    assert_eq!(
        feed(&mut f, &p)[0].2,
        Some(Syndrome::Nak(NakCode::InvalidRequest))
    );
    let b = &mut f.pair.b;
    assert_eq!(
        b.engine.poll_cq(b.cq).unwrap().status,
        WcStatus::LocalLength
    );
    assert_eq!(
        &b.mem.bytes[0x1000..0x1100],
        &[0; 256],
        "nothing written past nor into the receive"
    );
}

#[test]
fn rnr_nak_when_no_receive_is_posted() {
    let mut f = fixture();
    assert_eq!(
        {
            let p = send_only(&f, EPSN, &[1; 4]);
            feed(&mut f, &p)
        }
        .len(),
        1
    );
    assert_eq!(
        {
            let p = send_only(&f, EPSN + 1, &[1; 4]);
            feed(&mut f, &p)
        }
        .len(),
        1
    );
    let out = {
        let p = send_only(&f, EPSN + 2, &[1; 4]);
        feed(&mut f, &p)
    };
    assert_eq!(
        out,
        [(
            Opcode::Acknowledge,
            EPSN + 2,
            Some(Syndrome::Rnr { timer: 1 })
        )]
    );
    assert_eq!(f.pair.b.engine.qp_state(f.pair.b.qpn), Some(QpState::Rts));
}

/// End to end: the requester sees the responder's NAK as a completion.
#[test]
fn remote_access_error_completes_the_requester() {
    let (mut pair, keys) = Pair::new(PairConfig::default(), Faults::default(), 10);
    pair.b.engine.invalidate_rkey(keys.b.rkey).unwrap();
    let a = &mut pair.a;
    let w = SendWr {
        wr_id: 5,
        op: SendOp::Write(RemoteAddr {
            va: 0,
            rkey: keys.b.rkey,
        }),
        sge: Sge {
            addr: 0,
            len: 3000,
            lkey: keys.a.lkey,
        },
    };
    a.engine.post_send(a.qpn, w, &mut a.mem).unwrap();
    let w2 = SendWr {
        wr_id: 6,
        op: SendOp::Send,
        sge: Sge {
            addr: 0,
            len: 10,
            lkey: keys.a.lkey,
        },
    };
    a.engine.post_send(a.qpn, w2, &mut a.mem).unwrap();
    assert!(pair.drive(10_000));
    let a = &mut pair.a;
    let wcs: Vec<_> = std::iter::from_fn(|| a.engine.poll_cq(a.cq))
        .map(|c| (c.wr_id, c.status))
        .collect();
    assert_eq!(wcs, [(5, WcStatus::RemoteAccess), (6, WcStatus::WrFlush)]);
    assert_eq!(a.engine.counters().nak_received(NakKind::RemoteAccess), 1);
    assert_eq!(pair.states(), (Some(QpState::Error), Some(QpState::Error)));
    assert!(pair.b.mem.bytes[..3000].iter().all(|&b| b == 0));
}

#[test]
fn acks_are_coalesced() {
    let mut f = fixture();
    let now = f.pair.now;
    for psn in [EPSN, EPSN + 1] {
        let p = send_only(&f, psn, &[1; 4]);
        let b = &mut f.pair.b;
        b.engine.receive(now, &p, &mut b.mem);
    }
    // Both arrive before B polls: one ACK, for the newer PSN (the empty
    // frame only triggers the poll).
    let out = feed(&mut f, &[]);
    assert_eq!(
        out,
        [(
            Opcode::Acknowledge,
            EPSN + 1,
            Some(Syndrome::Ack { credits: 0x1F })
        )]
    );
    assert_eq!(f.pair.b.engine.counters().acks_sent, 1);
}

#[test]
fn stray_responses_and_arp() {
    let mut f = fixture();
    // B has sent nothing: any ACK is stale.
    let mut aeth = [0u8; 4];
    Aeth {
        syndrome: Syndrome::Ack { credits: 0x1F },
        msn: 0,
    }
    .write(&mut aeth);
    let qpn = f.pair.b.qpn;
    let p = frame(
        Side::A,
        Side::B,
        bth(Opcode::Acknowledge, qpn, 0xFF_FFF0),
        &aeth,
    );
    expect_drop(&mut f, &p, DropReason::StaleResponse);
    // A reserved AETH syndrome.
    let p = frame(
        Side::A,
        Side::B,
        bth(Opcode::Acknowledge, qpn, 0xFF_FFF0),
        &[0x40, 0, 0, 0],
    );
    expect_drop(&mut f, &p, DropReason::BadResponse);
    // ARP for someone else, and a malformed ARP.
    let (a_mac, a_ip) = address(Side::A);
    let arp = wire::Arp {
        op: wire::ArpOp::Request,
        sender_mac: a_mac,
        sender_ip: a_ip,
        target_mac: wire::MacAddr::default(),
        target_ip: std::net::Ipv4Addr::new(10, 0, 0, 99),
    };
    let mut buf = [0u8; 64];
    let n = wire::emit_arp(&mut buf, a_mac, &arp).unwrap();
    expect_drop(&mut f, &buf[..n], DropReason::ArpNotForUs);
    let arp = wire::Arp {
        target_ip: address(Side::B).1,
        ..arp
    };
    let n = wire::emit_arp(&mut buf, a_mac, &arp).unwrap();
    let mut bad = buf[..n].to_vec();
    bad[14 + 4] = 5;
    expect_drop(&mut f, &bad, DropReason::ArpMalformed);
    // A request for B's address is answered.
    f.pair
        .b
        .engine
        .receive(f.pair.now, &buf[..n], &mut f.pair.b.mem);
    let mut out = vec![0u8; FRAME_BUF];
    let b = &mut f.pair.b;
    let len = b
        .engine
        .poll_transmit(f.pair.now, &mut out, &mut b.mem)
        .unwrap();
    let reply = wire::parse_frame(
        &out[..len],
        &LocalAddr {
            mac: a_mac,
            ip: a_ip,
        },
    )
    .unwrap();
    let Frame::Arp(reply) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(
        (reply.op, reply.sender_mac, reply.sender_ip),
        (wire::ArpOp::Reply, address(Side::B).0, address(Side::B).1)
    );
}
