//! Property tests over a wire that loses, duplicates and reorders frames,
//! with traffic in both directions at once: every message is delivered
//! exactly once, in order, with the right bytes — or the QP goes to ERROR
//! with an error completion, and every work request still completes
//! exactly once.

use std::time::Duration;

use fractos_roce::testing::{Faults, Pair, PairConfig, Side};
use fractos_roce::{
    MrKeys, Mtu, QpState, RemoteAddr, SendOp, SendWr, Sge, WcOpcode, WcStatus, WorkCompletion,
};
use proptest::prelude::*;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Send,
    SendImm,
    Write,
    WriteImm,
    Read,
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Send),
        Just(Kind::SendImm),
        Just(Kind::Write),
        Just(Kind::WriteImm),
        Just(Kind::Read)
    ]
}

type Msgs = [(Kind, usize)];

const SLOT: u64 = 16 << 10;
/// Where READ sources and destinations live.
const READ_BASE: u64 = 1 << 20;
/// Offset of the B → A direction's slots.
const BA_BASE: u64 = 256 << 10;

fn pattern(i: usize, len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|j| {
            (j as u8)
                .wrapping_mul(13)
                .wrapping_add(i as u8 * 7)
                .wrapping_add(salt)
        })
        .collect()
}

fn drain(pair: &mut Pair, side: Side) -> Vec<WorkCompletion> {
    let n = pair.node(side);
    std::iter::from_fn(|| n.engine.poll_cq(n.cq)).collect()
}

fn other(side: Side) -> Side {
    match side {
        Side::A => Side::B,
        Side::B => Side::A,
    }
}

fn base(from: Side) -> u64 {
    match from {
        Side::A => 0,
        Side::B => BA_BASE,
    }
}

/// Posts `msgs` from `from` (and the receives they need at the peer).
fn post_all(pair: &mut Pair, from: Side, msgs: &Msgs, keys: (MrKeys, MrKeys)) {
    let (mine, theirs) = keys;
    let to = other(from);
    for (i, &(k, len)) in msgs.iter().enumerate() {
        let off = base(from) + i as u64 * SLOT;
        let (o, r) = (off as usize, (READ_BASE + off) as usize);
        pair.node(from).mem.bytes[o..o + len].copy_from_slice(&pattern(i, len, 1));
        pair.node(to).mem.bytes[r..r + len].copy_from_slice(&pattern(i, len, 2));
        if matches!(k, Kind::Send | Kind::SendImm | Kind::WriteImm) {
            pair.post_recv(to, i as u64, off, SLOT as u32, theirs.lkey);
        }
        let remote = RemoteAddr {
            va: off,
            rkey: theirs.rkey,
        };
        let (op, addr) = match k {
            Kind::Send => (SendOp::Send, off),
            Kind::SendImm => (SendOp::SendImm(i as u32), off),
            Kind::Write => (SendOp::Write(remote), off),
            Kind::WriteImm => (SendOp::WriteImm(remote, i as u32), off),
            Kind::Read => (
                SendOp::Read(RemoteAddr {
                    va: READ_BASE + off,
                    rkey: theirs.rkey,
                }),
                READ_BASE + off,
            ),
        };
        let sge = Sge {
            addr,
            len: len as u32,
            lkey: mine.lkey,
        };
        let n = pair.node(from);
        n.engine
            .post_send(
                n.qpn,
                SendWr {
                    wr_id: i as u64,
                    op,
                    sge,
                },
                &mut n.mem,
            )
            .unwrap();
    }
}

fn is_recv(c: &WorkCompletion) -> bool {
    matches!(c.opcode, WcOpcode::Recv | WcOpcode::RecvRdmaWithImm)
}

/// Checks one direction: `sends` are `from`'s send completions, `recvs` the
/// peer's receive completions. Returns whether `from`'s QP failed.
fn check(
    pair: &mut Pair,
    from: Side,
    msgs: &Msgs,
    sends: &[WorkCompletion],
    recvs: &[WorkCompletion],
) -> Result<bool, TestCaseError> {
    let to = other(from);
    // Every send WR completes exactly once, in order.
    prop_assert_eq!(
        sends.iter().map(|c| c.wr_id).collect::<Vec<_>>(),
        (0..msgs.len() as u64).collect::<Vec<_>>()
    );
    let ok = sends
        .iter()
        .take_while(|c| c.status == WcStatus::Success)
        .count();
    let failed = ok < sends.len();
    if failed {
        prop_assert!(
            matches!(
                sends[ok].status,
                WcStatus::RetryExceeded | WcStatus::RnrRetryExceeded
            ),
            "unexpected error {:?}",
            sends[ok]
        );
        prop_assert!(sends[ok + 1..]
            .iter()
            .all(|c| c.status == WcStatus::WrFlush));
    }
    let mut recv = recvs.iter().filter(|c| c.status == WcStatus::Success);
    for (i, &(k, len)) in msgs.iter().enumerate().take(ok) {
        let off = (base(from) + i as u64 * SLOT) as usize;
        match k {
            Kind::Read => {
                let at = READ_BASE as usize + off;
                prop_assert_eq!(
                    &pair.node(from).mem.bytes[at..at + len],
                    &pattern(i, len, 2)[..]
                );
            }
            _ => prop_assert_eq!(
                &pair.node(to).mem.bytes[off..off + len],
                &pattern(i, len, 1)[..]
            ),
        }
        if matches!(k, Kind::Send | Kind::SendImm | Kind::WriteImm) {
            let wc = recv.next();
            prop_assert!(wc.is_some(), "receive of message {} missing", i);
            let wc = wc.unwrap();
            prop_assert_eq!(wc.wr_id as usize, i, "receives in order");
            prop_assert_eq!(wc.byte_len as usize, len);
            let (imm, opcode) = match k {
                Kind::Send => (None, WcOpcode::Recv),
                Kind::SendImm => (Some(i as u32), WcOpcode::Recv),
                _ => (Some(i as u32), WcOpcode::RecvRdmaWithImm),
            };
            prop_assert_eq!((wc.imm, wc.opcode), (imm, opcode));
        }
    }
    if !failed {
        prop_assert!(recv.next().is_none(), "a message was delivered twice");
    }
    Ok(failed)
}

fn run(mtu: Mtu, faults: Faults, seed: u64, ab: &Msgs, ba: &Msgs) -> Result<(), TestCaseError> {
    let cfg = PairConfig {
        mtu,
        mem: 2 << 20,
        depth: 64,
        ..PairConfig::default()
    };
    let (mut pair, keys) = Pair::new(cfg, faults, seed);
    post_all(&mut pair, Side::A, ab, (keys.a, keys.b));
    post_all(&mut pair, Side::B, ba, (keys.b, keys.a));
    prop_assert!(pair.drive(2_000_000), "livelock");
    if std::env::var_os("ROCE_TRACE").is_some() {
        eprintln!(
            "{:?} {:?} frames={} a={:?} b={:?}",
            faults,
            pair.states(),
            pair.frames,
            pair.a.engine.counters(),
            pair.b.engine.counters()
        );
    }
    let (a, b) = (drain(&mut pair, Side::A), drain(&mut pair, Side::B));
    let split = |v: &[WorkCompletion]| -> (Vec<WorkCompletion>, Vec<WorkCompletion>) {
        v.iter().partition(|c| !is_recv(c))
    };
    let ((a_sends, a_recvs), (b_sends, b_recvs)) = (split(&a), split(&b));
    let a_failed = check(&mut pair, Side::A, ab, &a_sends, &b_recvs)?;
    let b_failed = check(&mut pair, Side::B, ba, &b_sends, &a_recvs)?;
    let (sa, sb) = pair.states();
    // A QP with an error completion is in ERROR; a QP in ERROR reported it
    // with an error completion, unless it had no work request to report on
    // (it then failed because its peer gave up on it).
    for (state, failed, sends) in [(sa, a_failed, &a_sends), (sb, b_failed, &b_sends)] {
        if failed {
            prop_assert_eq!(state, Some(QpState::Error));
        }
        if state == Some(QpState::Error) {
            prop_assert!(failed || sends.is_empty());
        }
    }
    if !faults_possible(&faults) {
        prop_assert_eq!((sa, sb), (Some(QpState::Rts), Some(QpState::Rts)));
    }
    Ok(())
}

fn faults_possible(f: &Faults) -> bool {
    f.loss > 0 || f.duplicate > 0 || f.reorder > 0
}

fn faults() -> impl Strategy<Value = Faults> {
    (0u32..150, 0u32..150, 0u32..300, 0u64..300).prop_map(|(loss, duplicate, reorder, jitter)| {
        Faults {
            loss,
            duplicate,
            reorder,
            jitter: Duration::from_micros(jitter),
        }
    })
}

fn msgs() -> impl Strategy<Value = Vec<(Kind, usize)>> {
    prop::collection::vec((kind(), 0usize..12_000), 0..12)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn exactly_once_in_order_or_error(
        mtu in prop::sample::select(Mtu::ALL.to_vec()),
        faults in faults(),
        seed in any::<u64>(),
        ab in msgs(),
        ba in msgs(),
    ) {
        run(mtu, faults, seed, &ab, &ba)?;
    }

    #[test]
    fn clean_wire_always_succeeds(
        mtu in prop::sample::select(Mtu::ALL.to_vec()),
        seed in any::<u64>(),
        ab in msgs(),
        ba in msgs(),
    ) {
        run(mtu, Faults::default(), seed, &ab, &ba)?;
    }
}

/// A very lossy wire: the QPs either finish everything or fail cleanly.
#[test]
fn heavy_loss_fails_cleanly_or_finishes() {
    for seed in 0..20 {
        let faults = Faults {
            loss: 450,
            duplicate: 100,
            reorder: 300,
            jitter: Duration::from_micros(500),
        };
        let ab = [(Kind::Write, 9000), (Kind::Read, 9000), (Kind::Send, 5000)];
        let ba = [(Kind::SendImm, 7000), (Kind::Read, 3000)];
        run(Mtu::Mtu1024, faults, seed, &ab, &ba).unwrap();
    }
}
