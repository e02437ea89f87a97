//! Stable fuzz driver: seeded arbitrary and mutated packets fed to a
//! connected responder. Nothing may panic, and `TestMemory` panics on any
//! access outside a registered region. `fuzz/` runs the same body under
//! libFuzzer.

use fractos_roce::testing::{fuzz_responder, reseal, Faults, Pair, PairConfig, Rng, Side};
use fractos_roce::{RemoteAddr, SendOp, SendWr, Sge};

#[test]
fn arbitrary_bytes() {
    let mut rng = Rng(0x5EED);
    for _ in 0..3_000 {
        let len = rng.below(3000) as usize;
        let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        fuzz_responder(&data);
    }
}

/// Real frames of an exchange (every opcode), mutated byte by byte, with
/// checksums and ICRC fixed up half the time so that mutations reach the
/// transport layer, fed to both engines of a fresh pair.
#[test]
fn mutated_real_frames() {
    let (mut pair, keys) = Pair::new(
        PairConfig {
            mem: 256 << 10,
            ..PairConfig::default()
        },
        Faults::default(),
        1,
    );
    static FRAMES: std::sync::Mutex<Vec<(Side, Vec<u8>)>> = std::sync::Mutex::new(Vec::new());
    pair.tap = Some(|to, f| {
        FRAMES.lock().unwrap().push((to, f.clone()));
        true
    });
    for i in 0..4 {
        pair.post_recv(Side::B, i, 0x10000 * i, 0x10000, keys.b.lkey);
    }
    let la = keys.a.lkey;
    let r = RemoteAddr {
        va: 0x20000,
        rkey: keys.b.rkey,
    };
    for (id, op, len) in [
        (1, SendOp::Send, 3000),
        (2, SendOp::SendImm(5), 10),
        (3, SendOp::Write(r), 5000),
        (4, SendOp::WriteImm(r, 6), 2000),
        (5, SendOp::Read(r), 5000),
    ] {
        let a = &mut pair.a;
        a.engine
            .post_send(
                a.qpn,
                SendWr {
                    wr_id: id,
                    op,
                    sge: Sge {
                        addr: 0,
                        len,
                        lkey: la,
                    },
                },
                &mut a.mem,
            )
            .unwrap();
    }
    assert!(pair.drive(10_000));
    let frames = std::mem::take(&mut *FRAMES.lock().unwrap());
    assert!(frames.len() > 10);
    let mut rng = Rng(7);
    for round in 0..3_000 {
        let cfg = PairConfig {
            mem: 256 << 10,
            ..PairConfig::default()
        };
        let (mut fresh, k) = Pair::new(cfg, Faults::default(), round);
        for i in 0..2 {
            fresh.post_recv(Side::B, i, 0x10000 * i, 0x10000, k.b.lkey);
        }
        // Feed a prefix of the real exchange, then a mutated frame.
        let upto = rng.below(frames.len() as u64) as usize;
        for (to, f) in &frames[..upto] {
            let now = fresh.now;
            let n = fresh.node(*to);
            n.engine.receive(now, f, &mut n.mem);
        }
        let (to, base) = &frames[upto];
        let mut f = base.clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(f.len() as u64) as usize;
            f[at] ^= 1 << rng.below(8);
        }
        if rng.below(4) == 0 {
            f.truncate(rng.below(f.len() as u64) as usize);
        }
        if rng.below(2) == 0 {
            reseal(&mut f);
        }
        let now = fresh.now;
        let n = fresh.node(*to);
        n.engine.receive(now, &f, &mut n.mem);
        fresh.drive(2_000);
    }
}
