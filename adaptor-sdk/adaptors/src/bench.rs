//! Micro-benchmarks through hosted controllers, each against a baseline
//! measured in the same run on the same loopback:
//!
//! * invoke round trip — process A (node 1) invokes B's Request (node 2),
//!   B invokes A's continuation — ÷ a raw TCP ping-pong between two plain
//!   sockets;
//! * copy bandwidth — 4 MiB copies from A's memory into B's memory —
//!   ÷ a raw loopback TCP stream (both warmed up by one unmeasured
//!   transfer, both timed until the receiver has every byte);
//!
//! each through controllers whose peer link is `authenticated` (every
//! frame MAC'd, the default) and `secure` (also encrypted), with both
//! processes on local channels (shared-memory rings, memory the
//! controllers reach directly); and on one controller, two processes on
//! local channels:
//!
//! * `shm_invoke_rtt_ratio` — invoke round trip between them ÷ the raw TCP
//!   ping-pong above;
//! * `shm_copy_ratio` — 64 MiB copies between them ÷ a single-thread
//!   `memcpy` of 64 MiB.
//!
//! Every copied byte is checked: each copy's source holds a fresh pattern
//! and the whole destination is compared after it, outside the timed
//! region.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use fractos_core::PeerSecurity;
use fractos_hosted::{spawn, HostedConfig, Running};
use fractos_sdk::wire::{NodeId, Rights};
use fractos_sdk::{Process, Region};

use crate::demo::{attach_local_spin, DEMO_KEY};
use crate::PipelineError;

const PING: u64 = 0xbe_0001;
const PONG: u64 = 0xbe_0002;
const SETUP: u64 = 0xbe_0003;

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Round trips measured (after warm-up).
    pub round_trips: usize,
    /// Bytes per copy.
    pub copy_bytes: usize,
    /// Copies measured.
    pub copies: usize,
    /// Bytes per copy on one controller (`shm_copy_ratio`).
    pub shm_copy_bytes: usize,
    /// Copies measured on one controller.
    pub shm_copies: usize,
    /// How long controllers and processes poll local rings before they
    /// sleep.
    pub local_spin: Duration,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            round_trips: 2000,
            copy_bytes: 4 << 20,
            copies: 20,
            shm_copy_bytes: 64 << 20,
            shm_copies: 5,
            local_spin: fractos_hosted::DEFAULT_LOCAL_SPIN,
        }
    }
}

/// Results.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BenchReport {
    /// Median invoke round trip through two controllers (peer link
    /// `authenticated`).
    pub invoke_rtt_us: f64,
    /// The same with the peer link `secure` (encrypted).
    pub invoke_rtt_us_secure: f64,
    /// Median raw TCP ping-pong round trip.
    pub tcp_rtt_us: f64,
    /// Copy bandwidth between processes on two controllers (peer link
    /// `authenticated`).
    pub copy_gbps: f64,
    /// The same with the peer link `secure` (encrypted).
    pub copy_gbps_secure: f64,
    /// Raw loopback TCP stream bandwidth.
    pub tcp_stream_gbps: f64,
    /// Copied bytes compared with their source (all copies, both modes).
    pub bytes_verified: u64,
    /// Median invoke round trip between two local-channel processes of
    /// one controller.
    pub shm_invoke_rtt_us: f64,
    /// Copy bandwidth between two local-channel processes of one
    /// controller ([`BenchConfig::shm_copy_bytes`] per copy).
    pub shm_copy_gbps: f64,
    /// Single-thread `memcpy` bandwidth of the same size.
    pub memcpy_gbps: f64,
}

impl BenchReport {
    /// invoke ÷ TCP round trip.
    pub fn invoke_rtt_ratio(&self) -> f64 {
        self.invoke_rtt_us / self.tcp_rtt_us
    }
    /// copy ÷ TCP stream bandwidth.
    pub fn copy_bw_ratio(&self) -> f64 {
        self.copy_gbps / self.tcp_stream_gbps
    }
    /// Secure ÷ authenticated copy bandwidth (< 1: what encryption costs).
    pub fn secure_copy_cost(&self) -> f64 {
        self.copy_gbps_secure / self.copy_gbps
    }
    /// Local-channel invoke round trip on one controller ÷ raw TCP round
    /// trip (goal ≤ 1).
    pub fn shm_invoke_rtt_ratio(&self) -> f64 {
        self.shm_invoke_rtt_us / self.tcp_rtt_us
    }
    /// Local-channel copy on one controller ÷ `memcpy` bandwidth (goal
    /// ≥ 0.5).
    pub fn shm_copy_ratio(&self) -> f64 {
        self.shm_copy_gbps / self.memcpy_gbps
    }
    /// Secure ÷ authenticated invoke round trip.
    pub fn secure_rtt_cost(&self) -> f64 {
        self.invoke_rtt_us_secure / self.invoke_rtt_us
    }
    /// Machine-readable results.
    pub fn to_json(&self) -> String {
        format!(
            "{{\n  \"invoke_rtt_us\": {:.2},\n  \"invoke_rtt_us_secure\": {:.2},\n  \"tcp_rtt_us\": {:.2},\n  \"invoke_rtt_ratio\": {:.3},\n  \"secure_rtt_cost\": {:.3},\n  \"copy_gbps\": {:.3},\n  \"copy_gbps_secure\": {:.3},\n  \"tcp_stream_gbps\": {:.3},\n  \"copy_bw_ratio\": {:.3},\n  \"secure_copy_cost\": {:.3},\n  \"shm_invoke_rtt_us\": {:.2},\n  \"shm_invoke_rtt_ratio\": {:.3},\n  \"shm_copy_gbps\": {:.3},\n  \"memcpy_gbps\": {:.3},\n  \"shm_copy_ratio\": {:.3},\n  \"bytes_verified\": {}\n}}\n",
            self.invoke_rtt_us,
            self.invoke_rtt_us_secure,
            self.tcp_rtt_us,
            self.invoke_rtt_ratio(),
            self.secure_rtt_cost(),
            self.copy_gbps,
            self.copy_gbps_secure,
            self.tcp_stream_gbps,
            self.copy_bw_ratio(),
            self.secure_copy_cost(),
            self.shm_invoke_rtt_us,
            self.shm_invoke_rtt_ratio(),
            self.shm_copy_gbps,
            self.memcpy_gbps,
            self.shm_copy_ratio(),
            self.bytes_verified,
        )
    }
    /// Human-readable table.
    pub fn table(&self) -> String {
        format!(
            "                    authenticated      secure             raw TCP\n\
             invoke round trip   {:>9.1} us       {:>9.1} us       {:>9.1} us   ratio {:.2} (secure x{:.2})\n\
             copy bandwidth      {:>9.2} GB/s     {:>9.2} GB/s     {:>9.2} GB/s ratio {:.2} (secure x{:.2})\n\
             one controller, local channels: invoke round trip {:.1} us (ratio to raw TCP {:.2}), \
             copy {:.2} GB/s (memcpy {:.2} GB/s, ratio {:.2})\n\
             {} copied bytes compared with their source\n",
            self.invoke_rtt_us,
            self.invoke_rtt_us_secure,
            self.tcp_rtt_us,
            self.invoke_rtt_ratio(),
            self.secure_rtt_cost(),
            self.copy_gbps,
            self.copy_gbps_secure,
            self.tcp_stream_gbps,
            self.copy_bw_ratio(),
            self.secure_copy_cost(),
            self.shm_invoke_rtt_us,
            self.shm_invoke_rtt_ratio(),
            self.shm_copy_gbps,
            self.memcpy_gbps,
            self.shm_copy_ratio(),
            self.bytes_verified,
        )
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Raw TCP ping-pong of 64-byte messages between two threads.
pub fn tcp_rtt_us(n: usize) -> std::io::Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        s.set_nodelay(true)?;
        let mut buf = [0u8; 64];
        loop {
            if s.read_exact(&mut buf).is_err() {
                return Ok(());
            }
            s.write_all(&buf)?;
        }
    });
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut buf = [7u8; 64];
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let t = Instant::now();
        s.write_all(&buf)?;
        s.read_exact(&mut buf)?;
        if i >= n / 10 {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    drop(s);
    let _ = echo.join();
    Ok(median(samples))
}

/// Raw loopback TCP stream of `total` bytes in `chunk`-byte writes, after
/// an unmeasured warm-up transfer of `warmup` bytes on the same
/// connection (as the copy benchmark's warm-up copy); timed from the first
/// write until the receiver acknowledges the last byte.
pub fn tcp_stream_gbps(warmup: usize, total: usize, chunk: usize) -> std::io::Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let sink = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        for want in [warmup, total] {
            let mut got = 0;
            while got < want {
                match s.read(&mut buf[..(want - got).min(1 << 20)])? {
                    0 => return Err(std::io::Error::other("stream ended early")),
                    n => got += n,
                }
            }
            s.write_all(&[1])?;
        }
        Ok(())
    });
    let mut s = TcpStream::connect(addr)?;
    let data = vec![1u8; chunk];
    let mut ack = [0u8; 1];
    let send = |s: &mut TcpStream, n: usize| -> std::io::Result<()> {
        let mut sent = 0;
        while sent < n {
            let k = chunk.min(n - sent);
            s.write_all(&data[..k])?;
            sent += k;
        }
        Ok(())
    };
    send(&mut s, warmup)?;
    s.read_exact(&mut ack)?;
    let t = Instant::now();
    send(&mut s, total)?;
    s.read_exact(&mut ack)?;
    let secs = t.elapsed().as_secs_f64();
    drop(s);
    sink.join()
        .map_err(|_| std::io::Error::other("sink thread panicked"))??;
    Ok(total as f64 / secs / 1e9)
}

/// Single-thread `memcpy` bandwidth of `bytes` (median of `runs`, both
/// buffers touched first), GB/s.
pub fn memcpy_gbps(bytes: usize, runs: usize) -> f64 {
    let mut src = vec![0u8; bytes];
    fill_pattern(&mut src, run_seed());
    let mut dst = vec![1u8; bytes];
    let mut samples = Vec::new();
    for _ in 0..runs.max(1) + 1 {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        samples.push(bytes as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    samples.remove(0);
    median(samples)
}

/// A fresh local-socket path under the temporary directory (its directory
/// is made here; [`remove_socket_dir`] removes it).
pub fn socket_path(tag: &str) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("fractos-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir.join("local.sock")
}

/// Removes the directory [`socket_path`] made for `node`'s socket.
pub fn remove_socket_dir(node: &Running) {
    if let Some(dir) = node.local_socket().and_then(|p| p.parent()) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Two hosted controllers (nodes 1 and 2) whose peer link runs in
/// `security` mode, each with a local socket.
pub fn start_pair(security: PeerSecurity) -> Result<Vec<Running>, PipelineError> {
    start_pair_spin(security, fractos_hosted::DEFAULT_LOCAL_SPIN)
}

/// [`start_pair`] with the controllers' local spin bound.
pub fn start_pair_spin(
    security: PeerSecurity,
    spin: Duration,
) -> Result<Vec<Running>, PipelineError> {
    let err = |e: fractos_hosted::HostedError| PipelineError::Protocol(format!("controller: {e}"));
    let mut nodes = Vec::new();
    for i in 1..=2u32 {
        let mut c = HostedConfig::local(NodeId(i), DEMO_KEY);
        c.members = vec![NodeId(1), NodeId(2)];
        c.peer_security = security;
        c.local_socket = Some(socket_path("bench"));
        c.local_spin = spin;
        nodes.push(spawn(c).map_err(err)?);
    }
    nodes[0].add_peer(nodes[1].node(), nodes[1].peer_addr());
    nodes[1].add_peer(nodes[0].node(), nodes[0].peer_addr());
    for n in &nodes {
        n.wait_peers(1, Duration::from_secs(30)).map_err(err)?;
    }
    Ok(nodes)
}

fn through(security: PeerSecurity, cfg: &BenchConfig) -> Result<Measured, PipelineError> {
    let nodes = start_pair_spin(security, cfg.local_spin)?;
    let a = attach_local_spin(&nodes[0], "bench-a", cfg.local_spin)?;
    let b = attach_local_spin(&nodes[1], "bench-b", cfg.local_spin)?;
    let m = measure(&a, &b, cfg);
    drop((a, b));
    nodes.iter().for_each(remove_socket_dir);
    m
}

/// Two processes on local channels of one controller.
fn on_one(cfg: &BenchConfig) -> Result<Measured, PipelineError> {
    let err = |e: fractos_hosted::HostedError| PipelineError::Protocol(format!("controller: {e}"));
    let mut c = HostedConfig::local(NodeId(1), DEMO_KEY);
    c.local_socket = Some(socket_path("bench"));
    c.local_spin = cfg.local_spin;
    let node = spawn(c).map_err(err)?;
    let a = attach_local_spin(&node, "shm-a", cfg.local_spin)?;
    let b = attach_local_spin(&node, "shm-b", cfg.local_spin)?;
    let one = BenchConfig {
        copy_bytes: cfg.shm_copy_bytes,
        copies: cfg.shm_copies,
        ..cfg.clone()
    };
    let m = measure(&a, &b, &one);
    drop((a, b));
    remove_socket_dir(&node);
    m
}

/// Runs every benchmark: the raw TCP baselines, then two embedded
/// controllers with an `authenticated` peer link, then with a `secure` one.
pub fn run(cfg: &BenchConfig) -> Result<BenchReport, PipelineError> {
    let io = |e: std::io::Error| PipelineError::Protocol(format!("baseline socket: {e}"));
    let tcp_rtt = tcp_rtt_us(cfg.round_trips).map_err(io)?;
    let tcp_bw =
        tcp_stream_gbps(cfg.copy_bytes, cfg.copy_bytes * cfg.copies, 256 * 1024).map_err(io)?;
    let auth = through(PeerSecurity::Authenticated, cfg)?;
    let secure = through(PeerSecurity::Secure, cfg)?;
    let one = on_one(cfg)?;
    let memcpy = memcpy_gbps(cfg.shm_copy_bytes, 5);
    Ok(BenchReport {
        shm_invoke_rtt_us: one.invoke_rtt_us,
        shm_copy_gbps: one.copy_gbps,
        memcpy_gbps: memcpy,
        invoke_rtt_us: auth.invoke_rtt_us,
        invoke_rtt_us_secure: secure.invoke_rtt_us,
        tcp_rtt_us: tcp_rtt,
        copy_gbps: auth.copy_gbps,
        copy_gbps_secure: secure.copy_gbps,
        tcp_stream_gbps: tcp_bw,
        bytes_verified: auth.bytes_verified + secure.bytes_verified + one.bytes_verified,
    })
}

/// A pattern no earlier run or copy wrote: xorshift bytes from `seed`.
pub fn fill_pattern(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for w in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
}

/// A seed unique to this run (time, process id, call counter).
pub fn run_seed() -> u64 {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (t ^ (u64::from(std::process::id()) << 32) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1
}

/// Offset of the first byte where `got` differs from `want` (or where one
/// is shorter).
pub fn first_difference(got: &[u8], want: &[u8]) -> Option<usize> {
    got.iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .or((got.len() != want.len()).then(|| got.len().min(want.len())))
}

fn check_copy(dst: &Region, src: &Region, what: &str) -> Result<u64, PipelineError> {
    let diff = src.with_bytes(|s| dst.with_bytes(|d| first_difference(d, s)));
    match diff {
        None => Ok(src.len()),
        Some(at) => Err(PipelineError::Protocol(format!(
            "{what}: the destination differs from the source at byte {at}"
        ))),
    }
}

/// What [`measure`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Measured {
    /// Median invoke round trip (A invokes B's Request, B invokes A's
    /// continuation), µs.
    pub invoke_rtt_us: f64,
    /// Copy bandwidth from A's memory into B's, GB/s (10^9 bytes/s).
    pub copy_gbps: f64,
    /// Copied bytes compared with their source.
    pub bytes_verified: u64,
}

/// Measures invoke round trips and copies between two attached processes
/// (on one controller or two): `cfg.round_trips` round trips after a 10%
/// warm-up, then one warm-up copy and `cfg.copies` timed copies of
/// `cfg.copy_bytes`. Before each copy the source gets a fresh pattern and
/// the destination a different one; after it the whole destination is
/// compared with the source (both outside the timed region). Names
/// published under `bench/` must be free.
pub fn measure(a: &Process, b: &Process, cfg: &BenchConfig) -> Result<Measured, PipelineError> {
    // B: SETUP hands over A's continuation once; PING invokes it.
    let (k_tx, k_rx) = std::sync::mpsc::channel();
    b.serve(SETUP, move |_p, inv| {
        if let Ok(k) = inv.request(0) {
            let _ = k_tx.send(k);
        }
    });
    let setup = b.request_create(SETUP, &[], &[])?;
    b.publish("bench/setup", setup)?;
    let ping_b = b.request_create(PING, &[], &[])?;
    b.publish("bench/ping", ping_b)?;
    let dst_region = b.register(cfg.copy_bytes as u64)?;
    let dst = b.memory_create(&dst_region, 0, cfg.copy_bytes as u64, Rights::WRITE)?;
    b.publish("bench/dst", dst)?;

    let wait = Duration::from_secs(10);
    let as_req = |c: fractos_sdk::Cap| {
        c.as_request()
            .ok_or_else(|| PipelineError::Protocol("expected a Request".into()))
    };
    let ping = as_req(a.lookup("bench/ping", wait)?)?;
    let setup_a = as_req(a.lookup("bench/setup", wait)?)?;
    let pong = a.request_create(PONG, &[], &[])?;
    a.invoke(&setup_a, &[], &[pong.into()])?;
    let k = k_rx
        .recv_timeout(wait)
        .map_err(|_| PipelineError::Protocol("setup never arrived".into()))?;
    let pong_at_b = k;
    // Inline: B's reader thread answers without a hand-off to the pool.
    b.serve_inline(PING, move |p, _inv| {
        let _ = p.invoke(&pong_at_b, &[], &[]);
    });

    let mut samples = Vec::with_capacity(cfg.round_trips);
    for i in 0..cfg.round_trips + cfg.round_trips / 10 {
        let t = Instant::now();
        a.invoke(&ping, &[], &[])?;
        let inv = a.next_invocation_timeout(wait)?;
        if inv.tag != PONG {
            return Err(PipelineError::Protocol(format!(
                "unexpected invocation {:#x}",
                inv.tag
            )));
        }
        if i >= cfg.round_trips / 10 {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let invoke_rtt = median(samples);

    let src_region = a.register_vec(vec![0; cfg.copy_bytes])?;
    let src = a.memory_create(&src_region, 0, cfg.copy_bytes as u64, Rights::READ)?;
    let dst_a = a
        .lookup("bench/dst", wait)?
        .as_memory()
        .ok_or_else(|| PipelineError::Protocol("expected Memory".into()))?;
    let seed = run_seed();
    let mut elapsed = Duration::ZERO;
    let mut bytes_verified = 0;
    for i in 0..=cfg.copies {
        // Untimed: fresh source pattern, destination overwritten with
        // another, so only this copy can make them equal.
        let s = seed.wrapping_add((i as u64) << 1);
        src_region.with_bytes_mut(|b| fill_pattern(b, s));
        dst_region.with_bytes_mut(|b| fill_pattern(b, !s));
        let t = Instant::now();
        a.copy(&src, &dst_a, None)?;
        if i > 0 {
            // Copy 0 is the warm-up.
            elapsed += t.elapsed();
        }
        bytes_verified += check_copy(&dst_region, &src_region, &format!("copy {i}"))?;
    }
    let copy_gbps = (cfg.copy_bytes * cfg.copies) as f64 / elapsed.as_secs_f64() / 1e9;
    Ok(Measured {
        invoke_rtt_us: invoke_rtt,
        copy_gbps,
        bytes_verified,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_differ_per_seed_and_differences_are_found() {
        let (mut a, mut b) = (vec![0u8; 1000], vec![0u8; 1000]);
        fill_pattern(&mut a, 1);
        fill_pattern(&mut b, 3);
        assert_ne!(a, b);
        assert_ne!(run_seed(), run_seed());
        assert_eq!(first_difference(&a, &a), None);
        let mut c = a.clone();
        c[999] ^= 1;
        assert_eq!(first_difference(&c, &a), Some(999));
        assert_eq!(first_difference(&a[..10], &a), Some(10));
    }

    #[test]
    fn the_stream_baseline_moves_every_byte_after_its_warm_up() {
        let gbps = tcp_stream_gbps(1 << 20, 4 << 20, 64 * 1024).unwrap();
        assert!(gbps > 0.0 && gbps.is_finite(), "{gbps}");
    }
}
