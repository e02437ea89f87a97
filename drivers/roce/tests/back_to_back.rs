//! Two engines back to back over a clean virtual wire: every opcode, every
//! MTU, large messages, multi-packet READ responses, RNR, ARP.

use fractos_roce::testing::{Faults, Pair, PairConfig, Side};
use fractos_roce::{
    Mtu, QpState, RemoteAddr, SendOp, SendWr, Sge, WcOpcode, WcStatus, WorkCompletion,
};

fn fill(pair: &mut Pair, side: Side, addr: u64, len: usize, seed: u8) {
    let m = &mut pair.node(side).mem.bytes;
    for (i, b) in m[addr as usize..addr as usize + len].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
}

fn same(pair: &mut Pair, a: u64, b: u64, len: usize) -> bool {
    pair.a.mem.bytes[a as usize..a as usize + len] == pair.b.mem.bytes[b as usize..b as usize + len]
}

fn completions(pair: &mut Pair, side: Side) -> Vec<WorkCompletion> {
    let n = pair.node(side);
    std::iter::from_fn(|| n.engine.poll_cq(n.cq)).collect()
}

fn post(pair: &mut Pair, side: Side, wr: SendWr) {
    let n = pair.node(side);
    n.engine
        .post_send(n.qpn, wr, &mut n.mem)
        .expect("post_send");
}

/// A send work request with one entry `[addr, addr + len)` of `lkey`.
fn wr(wr_id: u64, op: SendOp, addr: u64, len: u32, lkey: u32) -> SendWr {
    SendWr {
        wr_id,
        op,
        sge: Sge { addr, len, lkey },
    }
}

const LEN: u32 = 70_000; // 69 packets at 1 KiB, 18 at 4 KiB, not a multiple of any MTU

#[test]
fn every_opcode_at_every_mtu() {
    for mtu in Mtu::ALL {
        let (mut pair, keys) = Pair::new(
            PairConfig {
                mtu,
                ..PairConfig::default()
            },
            Faults::default(),
            1,
        );
        let (la, lb, rb) = (keys.a.lkey, keys.b.lkey, keys.b.rkey);
        fill(&mut pair, Side::A, 0, LEN as usize, 7);
        fill(&mut pair, Side::B, 0x40000, LEN as usize, 9);
        // SEND and SEND with immediate into posted receives.
        pair.post_recv(Side::B, 1, 0x10000, LEN, lb);
        pair.post_recv(Side::B, 2, 0x30000, LEN + 100, lb);
        pair.post_recv(Side::B, 3, 0x60000, 16, lb);
        post(&mut pair, Side::A, wr(10, SendOp::Send, 0, LEN, la));
        post(
            &mut pair,
            Side::A,
            wr(11, SendOp::SendImm(0xDEAD), 0, 1000, la),
        );
        // WRITE, WRITE with immediate (consumes receive 3), READ.
        let w = RemoteAddr {
            va: 0x80000,
            rkey: rb,
        };
        post(&mut pair, Side::A, wr(12, SendOp::Write(w), 0, LEN, la));
        let wi = RemoteAddr {
            va: 0xA0000,
            rkey: rb,
        };
        post(
            &mut pair,
            Side::A,
            wr(13, SendOp::WriteImm(wi, 77), 5, 333, la),
        );
        let r = RemoteAddr {
            va: 0x40000,
            rkey: rb,
        };
        post(
            &mut pair,
            Side::A,
            wr(14, SendOp::Read(r), 0xC0000, LEN, la),
        );
        // Zero-length SEND, WRITE and READ.
        pair.post_recv(Side::B, 4, 0x60000, 16, lb);
        post(&mut pair, Side::A, wr(15, SendOp::Send, 0, 0, la));
        post(
            &mut pair,
            Side::A,
            wr(16, SendOp::Write(RemoteAddr { va: 0, rkey: 0 }), 0, 0, la),
        );
        post(
            &mut pair,
            Side::A,
            wr(17, SendOp::Read(RemoteAddr { va: 0, rkey: 0 }), 0, 0, la),
        );
        assert!(pair.drive(100_000), "{mtu:?}: livelock");

        let a = completions(&mut pair, Side::A);
        let ids: Vec<_> = a.iter().map(|c| (c.wr_id, c.status)).collect();
        assert_eq!(
            ids,
            (10..=17)
                .map(|i| (i, WcStatus::Success))
                .collect::<Vec<_>>(),
            "{mtu:?}"
        );
        assert_eq!(a[4].opcode, WcOpcode::RdmaRead);
        assert_eq!(a[4].byte_len, LEN);
        let b = completions(&mut pair, Side::B);
        assert_eq!(b.len(), 4, "{mtu:?}: {b:?}");
        assert_eq!(
            (b[0].wr_id, b[0].byte_len, b[0].imm, b[0].opcode),
            (1, LEN, None, WcOpcode::Recv)
        );
        assert_eq!(
            (b[1].wr_id, b[1].byte_len, b[1].imm),
            (2, 1000, Some(0xDEAD))
        );
        assert_eq!(
            (b[2].wr_id, b[2].byte_len, b[2].imm, b[2].opcode),
            (3, 333, Some(77), WcOpcode::RecvRdmaWithImm)
        );
        assert_eq!(
            (b[3].wr_id, b[3].byte_len, b[3].status),
            (4, 0, WcStatus::Success)
        );
        assert!(same(&mut pair, 0, 0x10000, LEN as usize));
        assert!(same(&mut pair, 0, 0x30000, 1000));
        assert!(same(&mut pair, 0, 0x80000, LEN as usize));
        assert!(same(&mut pair, 5, 0xA0000, 333));
        assert!(same(&mut pair, 0xC0000, 0x40000, LEN as usize));
        let c = pair.a.engine.counters();
        assert_eq!(
            (c.retransmits, c.timeouts, c.dropped_total()),
            (0, 0, 0),
            "{mtu:?}: {c:?}"
        );
        assert_eq!(pair.states(), (Some(QpState::Rts), Some(QpState::Rts)));
    }
}

#[test]
fn large_messages_both_ways_and_psn_wrap() {
    let (mut pair, keys) = Pair::new(
        PairConfig {
            mtu: Mtu::Mtu4096,
            mem: 8 << 20,
            ..PairConfig::default()
        },
        Faults::default(),
        2,
    );
    let len = 3 << 20; // 768 packets at 4 KiB; B's PSNs wrap past 2^24
    fill(&mut pair, Side::A, 0, len, 1);
    fill(&mut pair, Side::B, 4 << 20, len, 2);
    let (la, lb, ra, rb) = (keys.a.lkey, keys.b.lkey, keys.a.rkey, keys.b.rkey);
    post(
        &mut pair,
        Side::A,
        wr(
            1,
            SendOp::Write(RemoteAddr { va: 0, rkey: rb }),
            0,
            len as u32,
            la,
        ),
    );
    post(
        &mut pair,
        Side::B,
        wr(
            2,
            SendOp::Write(RemoteAddr {
                va: 4 << 20,
                rkey: ra,
            }),
            4 << 20,
            len as u32,
            lb,
        ),
    );
    // A READs back from B while both write.
    post(
        &mut pair,
        Side::A,
        wr(
            3,
            SendOp::Read(RemoteAddr {
                va: 4 << 20,
                rkey: rb,
            }),
            7 << 20,
            1 << 20,
            la,
        ),
    );
    assert!(pair.drive(1_000_000));
    assert_eq!(
        completions(&mut pair, Side::A)
            .iter()
            .map(|c| c.status)
            .collect::<Vec<_>>(),
        [WcStatus::Success; 2]
    );
    assert_eq!(
        completions(&mut pair, Side::B)
            .iter()
            .map(|c| c.status)
            .collect::<Vec<_>>(),
        [WcStatus::Success]
    );
    assert!(same(&mut pair, 0, 0, len));
    assert!(same(&mut pair, 4 << 20, 4 << 20, len));
    assert!(same(&mut pair, 7 << 20, 4 << 20, 1 << 20));
}

#[test]
fn rnr_nak_then_receive_posted() {
    let (mut pair, keys) = Pair::new(PairConfig::default(), Faults::default(), 3);
    let (la, lb) = (keys.a.lkey, keys.b.lkey);
    post(&mut pair, Side::A, wr(1, SendOp::Send, 0, 100, la));
    for _ in 0..50 {
        pair.step();
    }
    assert!(
        pair.b
            .engine
            .counters()
            .nak_sent(fractos_roce::NakKind::Rnr)
            > 0
    );
    pair.post_recv(Side::B, 9, 0x1000, 100, lb);
    assert!(pair.drive(10_000));
    assert_eq!(completions(&mut pair, Side::A)[0].status, WcStatus::Success);
    assert_eq!(completions(&mut pair, Side::B)[0].wr_id, 9);
}

#[test]
fn rnr_retry_exceeded() {
    let (mut pair, keys) = Pair::new(
        PairConfig {
            rnr_retry: 2,
            ..PairConfig::default()
        },
        Faults::default(),
        4,
    );
    let la = keys.a.lkey;
    post(&mut pair, Side::A, wr(1, SendOp::Send, 0, 100, la));
    post(&mut pair, Side::A, wr(2, SendOp::Send, 0, 100, la));
    assert!(pair.drive(10_000));
    let a = completions(&mut pair, Side::A);
    assert_eq!(
        a.iter().map(|c| (c.wr_id, c.status)).collect::<Vec<_>>(),
        [(1, WcStatus::RnrRetryExceeded), (2, WcStatus::WrFlush)]
    );
    assert_eq!(pair.states().0, Some(QpState::Error));
    assert_eq!(
        pair.b
            .engine
            .counters()
            .nak_sent(fractos_roce::NakKind::Rnr),
        3
    );
}

#[test]
fn retry_exceeded_when_peer_is_gone() {
    let (mut pair, keys) = Pair::new(
        PairConfig {
            retry_cnt: 3,
            ..PairConfig::default()
        },
        Faults {
            loss: 1000,
            ..Faults::default()
        },
        5,
    );
    let la = keys.a.lkey;
    post(
        &mut pair,
        Side::A,
        wr(
            1,
            SendOp::Write(RemoteAddr {
                va: 0,
                rkey: keys.b.rkey,
            }),
            0,
            5000,
            la,
        ),
    );
    assert!(pair.drive(10_000));
    let a = completions(&mut pair, Side::A);
    assert_eq!(
        a.iter().map(|c| c.status).collect::<Vec<_>>(),
        [WcStatus::RetryExceeded]
    );
    assert_eq!(pair.a.engine.counters().timeouts, 4);
    assert_eq!(pair.states().0, Some(QpState::Error));
}

#[test]
fn arp_resolves_the_peer() {
    let (mut pair, keys) = Pair::new(
        PairConfig {
            arp: true,
            ..PairConfig::default()
        },
        Faults::default(),
        6,
    );
    assert_eq!(
        pair.a
            .engine
            .neighbor(fractos_roce::testing::address(Side::B).1),
        None
    );
    pair.post_recv(Side::B, 1, 0x1000, 64, keys.b.lkey);
    post(&mut pair, Side::A, wr(1, SendOp::Send, 0, 64, keys.a.lkey));
    assert!(pair.drive(10_000));
    assert_eq!(completions(&mut pair, Side::A)[0].status, WcStatus::Success);
    assert_eq!(
        pair.a
            .engine
            .neighbor(fractos_roce::testing::address(Side::B).1),
        Some(fractos_roce::testing::address(Side::B).0)
    );
    assert!(pair.a.engine.counters().arp_requests >= 1);
    assert!(pair.b.engine.counters().arp_replies >= 1);
}

#[test]
fn error_state_flushes_and_refuses() {
    let (mut pair, keys) = Pair::new(PairConfig::default(), Faults::default(), 7);
    pair.post_recv(Side::B, 1, 0, 64, keys.b.lkey);
    pair.post_recv(Side::B, 2, 0, 64, keys.b.lkey);
    let b = &mut pair.b;
    b.engine.modify_qp_error(b.qpn, &mut b.mem).unwrap();
    let wcs = completions(&mut pair, Side::B);
    assert_eq!(
        wcs.iter().map(|c| (c.wr_id, c.status)).collect::<Vec<_>>(),
        [(1, WcStatus::WrFlush), (2, WcStatus::WrFlush)]
    );
    pair.post_recv(Side::B, 3, 0, 64, keys.b.lkey);
    assert_eq!(completions(&mut pair, Side::B)[0].status, WcStatus::WrFlush);
    let b = &mut pair.b;
    b.engine.modify_qp_reset(b.qpn).unwrap();
    assert_eq!(b.engine.qp_state(b.qpn), Some(QpState::Reset));
}

use std::sync::atomic::{AtomicUsize, Ordering};

/// Frames seen by the taps below, per test (each test has its own).
static GBN_SEEN: AtomicUsize = AtomicUsize::new(0);
static READ_SEEN: AtomicUsize = AtomicUsize::new(0);
static ACK_SEEN: AtomicUsize = AtomicUsize::new(0);

#[test]
fn lost_request_is_a_sequence_nak_and_go_back_n() {
    let (mut pair, keys) = Pair::new(PairConfig::default(), Faults::default(), 11);
    // Lose the third frame A sends, once.
    pair.tap = Some(|to, _| !(to == Side::B && GBN_SEEN.fetch_add(1, Ordering::SeqCst) == 2));
    fill(&mut pair, Side::A, 0, 20_000, 3);
    let w = wr(
        1,
        SendOp::Write(RemoteAddr {
            va: 0x10000,
            rkey: keys.b.rkey,
        }),
        0,
        20_000,
        keys.a.lkey,
    );
    post(&mut pair, Side::A, w);
    assert!(pair.drive(10_000));
    assert_eq!(completions(&mut pair, Side::A)[0].status, WcStatus::Success);
    assert!(same(&mut pair, 0, 0x10000, 20_000));
    let (a, b) = (pair.a.engine.counters(), pair.b.engine.counters());
    assert_eq!(b.nak_sent(fractos_roce::NakKind::SequenceError), 1);
    assert_eq!(a.nak_received(fractos_roce::NakKind::SequenceError), 1);
    assert_eq!(a.timeouts, 0, "recovered by the NAK, not by a timeout");
    assert!(a.retransmits >= 1);
    assert!(
        b.dropped(fractos_roce::DropReason::OutOfSequence) >= 1,
        "one NAK per gap: {b:?}"
    );
}

#[test]
fn lost_read_response_re_executes_the_read_from_the_gap() {
    let (mut pair, keys) = Pair::new(PairConfig::default(), Faults::default(), 12);
    // Lose the second frame B sends (a READ response in the middle), once.
    pair.tap = Some(|to, _| !(to == Side::A && READ_SEEN.fetch_add(1, Ordering::SeqCst) == 1));
    fill(&mut pair, Side::B, 0x20000, 10_000, 4);
    let r = wr(
        1,
        SendOp::Read(RemoteAddr {
            va: 0x20000,
            rkey: keys.b.rkey,
        }),
        0x50000,
        10_000,
        keys.a.lkey,
    );
    post(&mut pair, Side::A, r);
    assert!(pair.drive(10_000));
    assert_eq!(completions(&mut pair, Side::A)[0].status, WcStatus::Success);
    assert!(same(&mut pair, 0x50000, 0x20000, 10_000));
    let (a, b) = (pair.a.engine.counters(), pair.b.engine.counters());
    assert_eq!(
        b.duplicates, 1,
        "the re-issued READ is a duplicate, served again"
    );
    assert_eq!(a.timeouts, 0, "the gap in the responses triggers the retry");
    assert_eq!(a.retransmits, 1, "one READ request for the rest");
}

#[test]
fn lost_ack_makes_a_duplicate_that_is_re_acked_not_redelivered() {
    let (mut pair, keys) = Pair::new(PairConfig::default(), Faults::default(), 13);
    // Lose the first ACK B sends.
    pair.tap = Some(|to, _| !(to == Side::A && ACK_SEEN.fetch_add(1, Ordering::SeqCst) == 0));
    pair.post_recv(Side::B, 7, 0x1000, 100, keys.b.lkey);
    pair.post_recv(Side::B, 8, 0x2000, 100, keys.b.lkey);
    post(&mut pair, Side::A, wr(1, SendOp::Send, 0, 100, keys.a.lkey));
    assert!(pair.drive(10_000));
    assert_eq!(completions(&mut pair, Side::A)[0].status, WcStatus::Success);
    let b = completions(&mut pair, Side::B);
    assert_eq!(
        b.iter().map(|c| c.wr_id).collect::<Vec<_>>(),
        [7],
        "delivered once"
    );
    assert_eq!(pair.a.engine.counters().timeouts, 1);
    assert_eq!(pair.b.engine.counters().duplicates, 1);
}
