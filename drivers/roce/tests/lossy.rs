//! Property tests over a wire that loses, duplicates and reorders frames:
//! every message is delivered exactly once, in order, with the right
//! bytes — or the QP goes to ERROR with an error completion, and every
//! work request still completes exactly once.

use std::time::Duration;

use fractos_roce::testing::{Faults, Pair, PairConfig, Side};
use fractos_roce::{
    Mtu, QpState, RemoteAddr, SendOp, SendWr, Sge, WcOpcode, WcStatus, WorkCompletion,
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

const SLOT: u64 = 16 << 10;
const READ_BASE: u64 = 1 << 20;

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

fn run(mtu: Mtu, faults: Faults, seed: u64, msgs: &[(Kind, usize)]) -> Result<(), TestCaseError> {
    let cfg = PairConfig {
        mtu,
        mem: 2 << 20,
        depth: 64,
        ..PairConfig::default()
    };
    let (mut pair, keys) = Pair::new(cfg, faults, seed);
    for (i, &(k, len)) in msgs.iter().enumerate() {
        let src = pattern(i, len, 1);
        let off = i as u64 * SLOT;
        pair.a.mem.bytes[off as usize..off as usize + len].copy_from_slice(&src);
        let rsrc = pattern(i, len, 2);
        let roff = (READ_BASE + off) as usize;
        pair.b.mem.bytes[roff..roff + len].copy_from_slice(&rsrc);
        if matches!(k, Kind::Send | Kind::SendImm | Kind::WriteImm) {
            pair.post_recv(Side::B, i as u64, off, SLOT as u32, keys.b.lkey);
        }
        let remote = RemoteAddr {
            va: off,
            rkey: keys.b.rkey,
        };
        let op = match k {
            Kind::Send => SendOp::Send,
            Kind::SendImm => SendOp::SendImm(i as u32),
            Kind::Write => SendOp::Write(remote),
            Kind::WriteImm => SendOp::WriteImm(remote, i as u32),
            Kind::Read => SendOp::Read(RemoteAddr {
                va: READ_BASE + off,
                rkey: keys.b.rkey,
            }),
        };
        let sge = if matches!(k, Kind::Read) {
            Sge {
                addr: READ_BASE + off,
                len: len as u32,
                lkey: keys.a.lkey,
            }
        } else {
            Sge {
                addr: off,
                len: len as u32,
                lkey: keys.a.lkey,
            }
        };
        let a = &mut pair.a;
        a.engine
            .post_send(
                a.qpn,
                SendWr {
                    wr_id: i as u64,
                    op,
                    sge,
                },
                &mut a.mem,
            )
            .unwrap();
    }
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
    let a = drain(&mut pair, Side::A);
    let b = drain(&mut pair, Side::B);
    // Every send WR completes exactly once, in order.
    prop_assert_eq!(
        a.iter().map(|c| c.wr_id).collect::<Vec<_>>(),
        (0..msgs.len() as u64).collect::<Vec<_>>()
    );
    let ok = a
        .iter()
        .take_while(|c| c.status == WcStatus::Success)
        .count();
    if ok < a.len() {
        prop_assert!(
            matches!(
                a[ok].status,
                WcStatus::RetryExceeded | WcStatus::RnrRetryExceeded
            ),
            "unexpected error {:?}",
            a[ok]
        );
        prop_assert!(a[ok + 1..].iter().all(|c| c.status == WcStatus::WrFlush));
        prop_assert_eq!(pair.states().0, Some(QpState::Error));
    } else {
        prop_assert_eq!(pair.states(), (Some(QpState::Rts), Some(QpState::Rts)));
    }
    prop_assert_ne!(
        pair.states().1,
        Some(QpState::Error),
        "an honest requester never breaks the responder"
    );
    // Completed messages landed exactly, and receives matched them in order.
    let mut recv = b.iter().filter(|c| c.status == WcStatus::Success);
    for (i, &(k, len)) in msgs.iter().enumerate().take(ok) {
        let off = (i as u64 * SLOT) as usize;
        match k {
            Kind::Read => {
                let at = READ_BASE as usize + off;
                prop_assert_eq!(&pair.a.mem.bytes[at..at + len], &pattern(i, len, 2)[..]);
            }
            _ => prop_assert_eq!(&pair.b.mem.bytes[off..off + len], &pattern(i, len, 1)[..]),
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
    if ok == a.len() {
        prop_assert!(recv.next().is_none(), "a message was delivered twice");
    }
    Ok(())
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn exactly_once_in_order_or_error(
        mtu in prop::sample::select(Mtu::ALL.to_vec()),
        faults in faults(),
        seed in any::<u64>(),
        msgs in prop::collection::vec((kind(), 0usize..12_000), 1..12),
    ) {
        run(mtu, faults, seed, &msgs)?;
    }

    #[test]
    fn clean_wire_always_succeeds(
        mtu in prop::sample::select(Mtu::ALL.to_vec()),
        seed in any::<u64>(),
        msgs in prop::collection::vec((kind(), 0usize..12_000), 1..12),
    ) {
        run(mtu, Faults::default(), seed, &msgs)?;
    }
}

/// A very lossy wire: the QP either finishes everything or fails cleanly.
#[test]
fn heavy_loss_fails_cleanly_or_finishes() {
    for seed in 0..20 {
        let faults = Faults {
            loss: 450,
            duplicate: 100,
            reorder: 300,
            jitter: Duration::from_micros(500),
        };
        run(
            Mtu::Mtu1024,
            faults,
            seed,
            &[(Kind::Write, 9000), (Kind::Read, 9000), (Kind::Send, 5000)],
        )
        .unwrap();
    }
}
