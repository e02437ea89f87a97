//! Benchmarks of the controller core alone (no I/O): run with
//! `cargo bench -p fractos-core --bench core`. Prints a table and writes
//! `target/bench/core.json`.
//!
//! Figures are ratios against a baseline measured in the same run where one
//! makes sense: invoke dispatch is compared with the bare wire work it must
//! do anyway (decode the Invoke, encode the Invocation and the Completion).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use std::time::{Duration, Instant as WallClock};

use fractos_core::{process_token, ChannelId, Config, Controller, Dest, Instant, Output};
use fractos_wire::{
    frame_body, CapInfo, ControllerMsg, Handle, NodeId, ObjectKind, ProcessMsg, Reply, Rights,
    MAX_FRAME_LEN,
};

/// Counts live heap bytes so we can report controller memory per capability.
struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);
/// Counting is switched on only while measuring memory, so the atomic
/// updates do not slow the throughput figures.
static COUNTING: AtomicBool = AtomicBool::new(false);

fn count(delta: isize) {
    if COUNTING.load(Ordering::Relaxed) {
        LIVE.fetch_add(delta, Ordering::Relaxed);
    }
}

// SAFETY: forwards to the system allocator unchanged, only counting sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count(l.size() as isize);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        count(-(l.size() as isize));
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count(n as isize - l.size() as isize);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const KEY: [u8; 32] = [9; 32];
const T0: Instant = Instant(1);

struct Bench {
    ctrl: Controller,
    next_op: u64,
}

impl Bench {
    fn new() -> Self {
        let mut cfg = Config::new(NodeId(1), 1, KEY);
        cfg.limits.max_caps_per_process = 1 << 24;
        Bench {
            ctrl: Controller::new(cfg, T0),
            next_op: 1,
        }
    }

    fn attach(&mut self, chan: u64, name: &str) -> ChannelId {
        let c = ChannelId(chan);
        self.ctrl.process_connected(T0, c);
        let token = process_token(&KEY, name.as_bytes());
        self.send(
            c,
            &ProcessMsg::Attach {
                name: name.as_bytes().to_vec(),
                token,
            },
        );
        self.drain();
        c
    }

    fn send(&mut self, c: ChannelId, m: &ProcessMsg) {
        let mut f = Vec::new();
        m.encode(&mut f);
        self.ctrl.process_message(T0, c, &f[4..]);
    }

    fn drain(&mut self) -> Vec<ControllerMsg> {
        let mut out = Vec::new();
        while let Some(o) = self.ctrl.poll_output() {
            if let Output::Send {
                to: Dest::Process(_),
                frame,
            } = o
            {
                out.push(
                    ControllerMsg::decode(frame_body(&frame, MAX_FRAME_LEN).unwrap()).unwrap(),
                );
            }
        }
        out
    }

    fn op(&mut self, c: ChannelId, make: impl FnOnce(u64) -> ProcessMsg) -> Handle {
        let op = self.next_op;
        self.next_op += 1;
        self.send(c, &make(op));
        for m in self.drain() {
            if let ControllerMsg::Completion {
                result: Ok(Reply::Cap { handle, .. }),
                ..
            } = m
            {
                return handle;
            }
        }
        panic!("operation returned no capability");
    }

    /// Creates `n` capabilities held by `c` (diminished children of one window).
    fn fill(&mut self, c: ChannelId, n: usize) {
        let m = self.op(c, |op| ProcessMsg::MemoryCreate {
            op,
            addr: 0,
            len: 1 << 20,
            rights: Rights::READ_WRITE,
        });
        for _ in 1..n {
            let msg = ProcessMsg::Diminish {
                op: 0,
                cap: m,
                offset: 0,
                len: 64,
                rights: Rights::READ,
            };
            self.send(c, &msg);
            while self.ctrl.poll_output().is_some() {}
        }
    }

    /// A Request owned by `server`, held by `client`; returns the client's handle.
    fn request_pair(&mut self, server: ChannelId, client: ChannelId) -> Handle {
        let r = self.op(server, |op| ProcessMsg::RequestCreate {
            op,
            tag: 1,
            imms: vec![],
            caps: vec![],
        });
        let name = b"bench".to_vec();
        self.send(
            server,
            &ProcessMsg::Publish {
                op: 0,
                name: name.clone(),
                cap: r,
            },
        );
        self.drain();
        self.op(client, |op| ProcessMsg::Lookup {
            op,
            name,
            wait_ms: 0,
        })
    }
}

/// Invokes per second for a client holding `held` capabilities.
fn invoke_rate(held: usize, iters: u64) -> f64 {
    let mut b = Bench::new();
    let server = b.attach(1, "server");
    let client = b.attach(2, "client");
    let h = b.request_pair(server, client);
    b.fill(client, held);
    let mut frame = Vec::new();
    ProcessMsg::Invoke {
        op: 7,
        cap: h,
        imms: vec![0; 16],
        caps: vec![],
    }
    .encode(&mut frame);
    let body = &frame[4..];
    let start = WallClock::now();
    for _ in 0..iters {
        b.ctrl.process_message(T0, client, body);
        while let Some(o) = b.ctrl.poll_output() {
            black_box(o);
        }
    }
    iters as f64 / start.elapsed().as_secs_f64()
}

/// The wire work an invoke needs anyway: decode the request, encode the
/// delivery and the completion.
fn wire_baseline_rate(iters: u64) -> f64 {
    let mut frame = Vec::new();
    ProcessMsg::Invoke {
        op: 7,
        cap: Handle(3),
        imms: vec![0; 16],
        caps: vec![],
    }
    .encode(&mut frame);
    let start = WallClock::now();
    for _ in 0..iters {
        let m = ProcessMsg::decode(black_box(&frame[4..])).unwrap();
        let ProcessMsg::Invoke { op, imms, .. } = m else {
            unreachable!()
        };
        let mut a = Vec::with_capacity(64);
        ControllerMsg::Invocation {
            tag: 1,
            imms,
            caps: vec![],
        }
        .encode(&mut a);
        let mut c = Vec::with_capacity(40);
        ControllerMsg::Completion {
            op,
            result: Ok(Reply::Done),
        }
        .encode(&mut c);
        black_box((a, c));
    }
    iters as f64 / start.elapsed().as_secs_f64()
}

fn diminish_rate(iters: u64) -> f64 {
    let mut b = Bench::new();
    let c = b.attach(1, "p");
    let m = b.op(c, |op| ProcessMsg::MemoryCreate {
        op,
        addr: 0,
        len: 1 << 20,
        rights: Rights::READ_WRITE,
    });
    let mut dim = Vec::new();
    ProcessMsg::Diminish {
        op: 1,
        cap: m,
        offset: 4096,
        len: 4096,
        rights: Rights::READ,
    }
    .encode(&mut dim);
    let mut drop_frame = Vec::new();
    // Handles are reused after a drop, so the same frame drops each new child.
    ProcessMsg::Drop {
        op: 2,
        cap: Handle(1),
    }
    .encode(&mut drop_frame);
    let start = WallClock::now();
    for _ in 0..iters {
        b.ctrl.process_message(T0, c, &dim[4..]);
        b.ctrl.process_message(T0, c, &drop_frame[4..]);
        while let Some(o) = b.ctrl.poll_output() {
            black_box(o);
        }
    }
    assert_eq!(
        b.ctrl.stats().caps,
        1,
        "every derived capability was dropped"
    );
    iters as f64 / start.elapsed().as_secs_f64()
}

/// Builds a derivation tree of `n` capabilities (fan-out 10) and times one
/// revoke of its root.
fn revoke_tree(n: usize) -> Duration {
    let mut b = Bench::new();
    let c = b.attach(1, "p");
    let root = b.op(c, |op| ProcessMsg::MemoryCreate {
        op,
        addr: 0,
        len: 1 << 30,
        rights: Rights::READ_WRITE,
    });
    let mut level = vec![root];
    let mut count = 1;
    'build: loop {
        let mut next = Vec::new();
        for parent in &level {
            for _ in 0..10 {
                let h = b.op(c, |op| ProcessMsg::Diminish {
                    op,
                    cap: *parent,
                    offset: 0,
                    len: 4096,
                    rights: Rights::READ,
                });
                next.push(h);
                count += 1;
                if count >= n {
                    break 'build;
                }
            }
        }
        level = next;
    }
    assert_eq!(b.ctrl.stats().caps, n);
    let mut f = Vec::new();
    ProcessMsg::Revoke { op: 99, cap: root }.encode(&mut f);
    let start = WallClock::now();
    b.ctrl.process_message(T0, c, &f[4..]);
    let took = start.elapsed();
    assert_eq!(b.ctrl.stats().caps, 0);
    took
}

/// Heap bytes per capability held (owner node + the holder's handle entry).
fn bytes_per_cap(n: usize) -> f64 {
    let mut b = Bench::new();
    let c = b.attach(1, "p");
    COUNTING.store(true, Ordering::SeqCst);
    let before = LIVE.load(Ordering::Relaxed);
    b.fill(c, n);
    let after = LIVE.load(Ordering::Relaxed);
    COUNTING.store(false, Ordering::SeqCst);
    assert_eq!(b.ctrl.stats().handles, n);
    (after - before) as f64 / n as f64
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick")
        || std::env::var_os("FRACTOS_BENCH_QUICK").is_some();
    let iters = if quick { 200_000 } else { 2_000_000 };
    let big = if quick { 100_000 } else { 1_000_000 };

    let baseline = wire_baseline_rate(iters);
    let invoke_1k = invoke_rate(1_000, iters);
    let invoke_big = invoke_rate(big, iters);
    let diminish = diminish_rate(iters / 2);
    let revoke = revoke_tree(10_000);
    let per_cap = bytes_per_cap(big);

    let _ = CapInfo {
        kind: ObjectKind::Memory,
        rights: Rights::READ,
        len: 0,
    };
    println!("FractOS controller core benchmarks ({} iterations)", iters);
    println!("  wire baseline (decode+2 encodes)   {:>12.0} /s", baseline);
    println!(
        "  invoke dispatch, 10^3 caps held    {:>12.0} /s  ({:.2}x baseline time)",
        invoke_1k,
        baseline / invoke_1k
    );
    println!(
        "  invoke dispatch, {big} caps held {:>12.0} /s  (flatness {:.2})",
        invoke_big,
        invoke_1k / invoke_big
    );
    println!("  diminish + drop                    {:>12.0} /s", diminish);
    println!(
        "  revoke of a 10,000-cap tree        {:>12.3} ms",
        revoke.as_secs_f64() * 1e3
    );
    println!("  heap bytes per capability          {:>12.1}", per_cap);

    let json = format!(
        "{{\n  \"iterations\": {iters},\n  \"wire_baseline_per_s\": {baseline:.0},\n  \"invoke_dispatch_per_s_1k_caps\": {invoke_1k:.0},\n  \"invoke_dispatch_per_s_big_caps\": {invoke_big:.0},\n  \"big_caps\": {big},\n  \"invoke_vs_wire_baseline_time_ratio\": {:.3},\n  \"invoke_flatness_ratio\": {:.3},\n  \"diminish_drop_per_s\": {diminish:.0},\n  \"revoke_10k_tree_ms\": {:.3},\n  \"bytes_per_capability\": {per_cap:.1}\n}}\n",
        baseline / invoke_1k,
        invoke_1k / invoke_big,
        revoke.as_secs_f64() * 1e3,
    );
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench");
    std::fs::create_dir_all(&dir).expect("create target/bench");
    let path = dir.join("core.json");
    std::fs::write(&path, json).expect("write core.json");
    println!("  wrote {}", path.display());
}
