//! The data path does not allocate: once the engines, regions, queues and
//! buffers exist, posting, transmitting, receiving (including NAKs,
//! retransmissions and READ responses) and polling completions make no heap
//! allocation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use fractos_roce::testing::{Faults, Pair, PairConfig, Side, FRAME_BUF};
use fractos_roce::{Mtu, RemoteAddr, SendOp, SendWr, Sge, WcStatus};

struct Counting;

thread_local! {
    static MEASURING: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

fn account() {
    // `try_with`: the slots may be gone while a thread is being torn down.
    let _ = MEASURING.try_with(|m| {
        if m.get() {
            ALLOCS.with(|a| a.set(a.get() + 1));
        }
    });
}

// SAFETY: every method forwards to the system allocator with the caller's
// arguments unchanged; the bookkeeping only touches `const`-initialised
// thread-locals of `Copy` types, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        account();
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        account();
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        account();
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Moves frames between the two engines, dropping every `drop_every`-th
/// frame (0: none), until both are quiet; then fires timers once.
fn exchange(pair: &mut Pair, buf: &mut [u8], drop_every: usize, sent: &mut usize) -> bool {
    let mut moved = false;
    loop {
        let mut any = false;
        for side in [Side::A, Side::B] {
            let now = pair.now;
            let (from, to) = match side {
                Side::A => (&mut pair.a, &mut pair.b),
                Side::B => (&mut pair.b, &mut pair.a),
            };
            if let Some(n) = from.engine.poll_transmit(now, buf, &mut from.mem) {
                *sent += 1;
                if drop_every == 0 || *sent % drop_every != 0 {
                    to.engine.receive(now, &buf[..n], &mut to.mem);
                }
                any = true;
            }
        }
        if !any {
            break;
        }
        moved = true;
    }
    let next = [pair.a.engine.poll_timeout(), pair.b.engine.poll_timeout()]
        .into_iter()
        .flatten()
        .min();
    if let Some(t) = next {
        pair.now = pair.now.max(t);
        let now = pair.now;
        pair.a.engine.handle_timeout(now, &mut pair.a.mem);
        pair.b.engine.handle_timeout(now, &mut pair.b.mem);
        moved = true;
    }
    moved
}

/// Three 64 KiB receives on B.
fn post_receives(pair: &mut Pair, lkey: u32) {
    for i in 0..3 {
        let sge = Sge {
            addr: 0x10000 * (i + 1),
            len: 0x10000,
            lkey,
        };
        pair.post_recv(Side::B, i, sge.addr, sge.len, sge.lkey);
    }
}

#[test]
fn data_path_makes_no_allocation() {
    let (mut pair, keys) = Pair::new(
        PairConfig {
            mtu: Mtu::Mtu1024,
            mem: 1 << 20,
            depth: 64,
            ..PairConfig::default()
        },
        Faults::default(),
        0,
    );
    let mut buf = vec![0u8; FRAME_BUF];
    let mut sent = 0;
    let r = RemoteAddr {
        va: 0x40000,
        rkey: keys.b.rkey,
    };
    let la = keys.a.lkey;
    let wrs = [
        SendWr {
            wr_id: 1,
            op: SendOp::Send,
            sge: Sge {
                addr: 0,
                len: 20_000,
                lkey: la,
            },
        },
        SendWr {
            wr_id: 2,
            op: SendOp::SendImm(3),
            sge: Sge {
                addr: 0,
                len: 100,
                lkey: la,
            },
        },
        SendWr {
            wr_id: 3,
            op: SendOp::Write(r),
            sge: Sge {
                addr: 0,
                len: 50_000,
                lkey: la,
            },
        },
        SendWr {
            wr_id: 4,
            op: SendOp::WriteImm(r, 4),
            sge: Sge {
                addr: 0,
                len: 3000,
                lkey: la,
            },
        },
        SendWr {
            wr_id: 5,
            op: SendOp::Read(r),
            sge: Sge {
                addr: 0x80000,
                len: 50_000,
                lkey: la,
            },
        },
    ];
    MEASURING.with(|m| m.set(true));
    for round in 0..3 {
        // Round 1 loses every 7th frame (NAKs, timeouts, go-back-N);
        // round 2 starts without receives posted (RNR NAKs).
        if round != 2 {
            post_receives(&mut pair, keys.b.lkey);
        }
        for wr in wrs {
            let a = &mut pair.a;
            a.engine.post_send(a.qpn, wr, &mut a.mem).unwrap();
        }
        let mut steps = 0;
        while exchange(
            &mut pair,
            &mut buf,
            if round == 1 { 7 } else { 0 },
            &mut sent,
        ) {
            steps += 1;
            if round == 2 && steps == 3 {
                post_receives(&mut pair, keys.b.lkey);
            }
            assert!(steps < 10_000);
        }
        for _ in 0..wrs.len() {
            let a = &mut pair.a;
            assert_eq!(
                a.engine.poll_cq(a.cq).map(|c| c.status),
                Some(WcStatus::Success)
            );
        }
        for _ in 0..3 {
            let b = &mut pair.b;
            assert_eq!(
                b.engine.poll_cq(b.cq).map(|c| c.status),
                Some(WcStatus::Success)
            );
        }
    }
    MEASURING.with(|m| m.set(false));
    let c = pair.a.engine.counters();
    assert!(
        c.retransmits > 0 && c.nak_received(fractos_roce::NakKind::Rnr) > 0,
        "{c:?}"
    );
    assert_eq!(ALLOCS.with(Cell::get), 0, "allocations on the data path");
}
