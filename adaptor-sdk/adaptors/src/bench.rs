//! Micro-benchmarks through hosted controllers, each against a baseline
//! measured in the same run on the same loopback:
//!
//! * invoke round trip — process A (node 1) invokes B's Request (node 2),
//!   B invokes A's continuation — ÷ a raw TCP ping-pong between two plain
//!   sockets;
//! * copy bandwidth — 4 MiB copies from A's memory into B's memory —
//!   ÷ a raw loopback TCP stream.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use fractos_sdk::wire::Rights;
use fractos_sdk::Process;

use crate::demo::{attach, start_cluster};
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
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            round_trips: 2000,
            copy_bytes: 4 << 20,
            copies: 20,
        }
    }
}

/// Results.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BenchReport {
    /// Median invoke round trip through two controllers.
    pub invoke_rtt_us: f64,
    /// Median raw TCP ping-pong round trip.
    pub tcp_rtt_us: f64,
    /// Copy bandwidth between processes on two controllers.
    pub copy_gbps: f64,
    /// Raw loopback TCP stream bandwidth.
    pub tcp_stream_gbps: f64,
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
    /// Machine-readable results.
    pub fn to_json(&self) -> String {
        format!(
            "{{\n  \"invoke_rtt_us\": {:.2},\n  \"tcp_rtt_us\": {:.2},\n  \"invoke_rtt_ratio\": {:.3},\n  \"copy_gbps\": {:.3},\n  \"tcp_stream_gbps\": {:.3},\n  \"copy_bw_ratio\": {:.3}\n}}\n",
            self.invoke_rtt_us,
            self.tcp_rtt_us,
            self.invoke_rtt_ratio(),
            self.copy_gbps,
            self.tcp_stream_gbps,
            self.copy_bw_ratio()
        )
    }
    /// Human-readable table.
    pub fn table(&self) -> String {
        format!(
            "invoke round trip   {:>9.1} us   raw TCP ping-pong {:>9.1} us   ratio {:.2}\ncopy bandwidth      {:>9.2} GB/s raw TCP stream    {:>9.2} GB/s ratio {:.2}\n",
            self.invoke_rtt_us,
            self.tcp_rtt_us,
            self.invoke_rtt_ratio(),
            self.copy_gbps,
            self.tcp_stream_gbps,
            self.copy_bw_ratio()
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

/// Raw loopback TCP stream of `total` bytes in `chunk`-byte writes.
pub fn tcp_stream_gbps(total: usize, chunk: usize) -> std::io::Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let sink = std::thread::spawn(move || -> std::io::Result<usize> {
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        loop {
            match s.read(&mut buf)? {
                0 => return Ok(got),
                n => got += n,
            }
        }
    });
    let mut s = TcpStream::connect(addr)?;
    let data = vec![1u8; chunk];
    let t = Instant::now();
    let mut sent = 0;
    while sent < total {
        s.write_all(&data)?;
        sent += chunk;
    }
    drop(s);
    let got = sink
        .join()
        .map_err(|_| std::io::Error::other("sink thread panicked"))??;
    Ok(got as f64 / t.elapsed().as_secs_f64() / 1e9)
}

/// Runs both benchmarks on an embedded two-controller cluster.
pub fn run(cfg: &BenchConfig) -> Result<BenchReport, PipelineError> {
    let io = |e: std::io::Error| PipelineError::Protocol(format!("baseline socket: {e}"));
    let tcp_rtt = tcp_rtt_us(cfg.round_trips).map_err(io)?;
    let tcp_bw = tcp_stream_gbps(cfg.copy_bytes * cfg.copies, 256 * 1024).map_err(io)?;

    let nodes = start_cluster().map_err(|e| PipelineError::Protocol(e.to_string()))?;
    let a = attach(&nodes[0], "bench-a")?;
    let b = attach(&nodes[1], "bench-b")?;
    let m = measure(&a, &b, cfg)?;
    drop(a);
    drop(b);
    Ok(BenchReport {
        invoke_rtt_us: m.invoke_rtt_us,
        tcp_rtt_us: tcp_rtt,
        copy_gbps: m.copy_gbps,
        tcp_stream_gbps: tcp_bw,
    })
}

/// What [`measure`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Measured {
    /// Median invoke round trip (A invokes B's Request, B invokes A's
    /// continuation), µs.
    pub invoke_rtt_us: f64,
    /// Copy bandwidth from A's memory into B's, GB/s (10^9 bytes/s).
    pub copy_gbps: f64,
}

/// Measures invoke round trips and copies between two attached processes
/// (on one controller or two): `cfg.round_trips` round trips after a 10%
/// warm-up, then `cfg.copies` copies of `cfg.copy_bytes`, checking the
/// bytes that arrived. Names published under `bench/` must be free.
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
    b.serve(PING, move |p, _inv| {
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

    let src_region = a.register_vec(vec![0x5a; cfg.copy_bytes])?;
    let src = a.memory_create(&src_region, 0, cfg.copy_bytes as u64, Rights::READ)?;
    let dst_a = a
        .lookup("bench/dst", wait)?
        .as_memory()
        .ok_or_else(|| PipelineError::Protocol("expected Memory".into()))?;
    a.copy(&src, &dst_a, None)?;
    let t = Instant::now();
    for _ in 0..cfg.copies {
        a.copy(&src, &dst_a, None)?;
    }
    let copy_gbps = (cfg.copy_bytes * cfg.copies) as f64 / t.elapsed().as_secs_f64() / 1e9;
    let mut check = vec![0u8; 16];
    dst_region.read_at(cfg.copy_bytes as u64 - 16, &mut check)?;
    if check != [0x5a; 16] {
        return Err(PipelineError::Protocol(
            "copied bytes differ from the source".into(),
        ));
    }
    Ok(Measured {
        invoke_rtt_us: invoke_rtt,
        copy_gbps,
    })
}
