//! Invoke round trip through a hosted controller vs. a raw TCP ping-pong.
//!
//! `cargo run --release -p fractos-sdk --example rtt [iterations]`
//!
//! A invokes B's Request passing a continuation; B's handler invokes the
//! continuation; A waits for it. Also: 4 MiB copy bandwidth between two
//! processes on two controllers.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use fractos_core::process_token;
use fractos_hosted::{spawn, HostedConfig};
use fractos_sdk::wire::{ControllerMsg, ProcessMsg, Reply};
use fractos_sdk::{AttachOptions, ErrorCode, Handle, NodeId, Process, Rights, SdkError};

const KEY: [u8; 32] = [9; 32];

fn attach(addr: std::net::SocketAddr, name: &str) -> Process {
    Process::attach(
        addr,
        name,
        process_token(&KEY, name.as_bytes()),
        AttachOptions::default(),
    )
    .expect("attach")
}

fn retry<T>(mut f: impl FnMut() -> Result<T, SdkError>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match f() {
            Err(e) if e.code() == Some(ErrorCode::PeerUnreachable) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            r => return r.expect("operation"),
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A raw process without the SDK: blocking socket, no threads.
struct Raw {
    s: TcpStream,
    next_op: u64,
}

impl Raw {
    fn attach(addr: std::net::SocketAddr, name: &str) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        let mut r = Raw { s, next_op: 1 };
        r.send(&ProcessMsg::Attach {
            name: name.into(),
            token: process_token(&KEY, name.as_bytes()),
        });
        r.recv();
        r
    }
    fn send(&mut self, m: &ProcessMsg) {
        let mut f = Vec::new();
        m.encode(&mut f);
        self.s.write_all(&f).unwrap();
    }
    fn recv(&mut self) -> ControllerMsg {
        let mut len = [0u8; 4];
        self.s.read_exact(&mut len).unwrap();
        let mut body = vec![0; u32::from_le_bytes(len) as usize];
        self.s.read_exact(&mut body).unwrap();
        ControllerMsg::decode(&body).unwrap()
    }
    fn op(&mut self, make: impl FnOnce(u64) -> ProcessMsg) -> u64 {
        let op = self.next_op;
        self.next_op += 1;
        self.send(&make(op));
        op
    }
    /// Sends an operation and returns its answer, queueing nothing else.
    fn call(&mut self, make: impl FnOnce(u64) -> ProcessMsg) -> Result<Reply, ErrorCode> {
        let op = self.op(make);
        loop {
            if let ControllerMsg::Completion { op: o, result } = self.recv() {
                if o == op {
                    return result;
                }
            }
        }
    }
    fn handle(&mut self, make: impl FnOnce(u64) -> ProcessMsg) -> Handle {
        match self.call(make) {
            Ok(Reply::Cap { handle, .. }) => handle,
            other => panic!("{other:?}"),
        }
    }
}

/// Invoke round trip between two raw processes (the floor for any SDK).
fn raw_invoke_rtt(addr: std::net::SocketAddr, n: usize) -> Duration {
    let mut a = Raw::attach(addr, "raw-a");
    let mut b = Raw::attach(addr, "raw-b");
    let svc = b.handle(|op| ProcessMsg::RequestCreate {
        op,
        tag: 1,
        imms: vec![],
        caps: vec![],
    });
    b.call(|op| ProcessMsg::Publish {
        op,
        name: b"raw-svc".to_vec(),
        cap: svc,
    })
    .unwrap();
    let svc = a.handle(|op| ProcessMsg::Lookup {
        op,
        name: b"raw-svc".to_vec(),
        wait_ms: 0,
    });
    let k = a.handle(|op| ProcessMsg::RequestCreate {
        op,
        tag: 2,
        imms: vec![],
        caps: vec![],
    });
    let server = std::thread::spawn(move || {
        // Serve n invocations: invoke the continuation, drop it.
        let mut served = 0;
        while served < n {
            if let ControllerMsg::Invocation { caps, .. } = b.recv() {
                let k = caps[0].0;
                b.op(|op| ProcessMsg::Invoke {
                    op,
                    cap: k,
                    imms: vec![],
                    caps: vec![],
                });
                b.op(|op| ProcessMsg::Drop { op, cap: k });
                served += 1;
            }
        }
    });
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        a.op(|op| ProcessMsg::Invoke {
            op,
            cap: svc,
            imms: vec![],
            caps: vec![k],
        });
        // Wait for the continuation (the invoke's completion comes first).
        loop {
            if let ControllerMsg::Invocation { .. } = a.recv() {
                break;
            }
        }
        times.push(t.elapsed());
    }
    server.join().unwrap();
    median(times)
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);

    // Raw TCP ping-pong.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut b = [0u8; 64];
        while s.read_exact(&mut b).is_ok() {
            s.write_all(&b).unwrap();
        }
    });
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_nodelay(true).unwrap();
    let mut b = [0u8; 64];
    let mut tcp = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.write_all(&b).unwrap();
        c.read_exact(&mut b).unwrap();
        tcp.push(t.elapsed());
    }
    drop(c);
    echo.join().unwrap();

    // Invoke round trip on one controller.
    let mut cfg = HostedConfig::local(NodeId(1), KEY);
    cfg.members = vec![NodeId(1), NodeId(2)];
    let n1 = spawn(cfg).unwrap();
    let mut cfg = HostedConfig::local(NodeId(2), KEY);
    cfg.members = vec![NodeId(1), NodeId(2)];
    let n2 = spawn(cfg).unwrap();
    n1.add_peer(n2.node(), n2.peer_addr());
    n2.add_peer(n1.node(), n1.peer_addr());

    let a = attach(n1.process_addr(), "a");
    let b = attach(n1.process_addr(), "b");
    b.serve(1, |p, inv| {
        let k = inv.request(0).unwrap();
        p.invoke(&k, &[], &[]).unwrap();
        p.drop_cap(k).unwrap();
    });
    let svc = b.request_create(1, &[], &[]).unwrap();
    retry(|| b.publish("svc", svc));
    let svc = retry(|| a.lookup("svc", Duration::from_secs(5)))
        .as_request()
        .unwrap();
    let k = a.request_create(2, &[], &[]).unwrap();
    let mut inv = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        a.invoke(&svc, &[], &[k.into()]).unwrap();
        a.next_invocation().unwrap();
        inv.push(t.elapsed());
    }
    // One operation round trip (an error answer: no state change).
    let bad = fractos_sdk::RequestCap::from_raw(fractos_sdk::Handle(999_999));
    let mut op = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let _ = a.drop_cap(bad);
        op.push(t.elapsed());
    }
    // The same with a raw socket and no reader thread.
    let mut raw = TcpStream::connect(n1.process_addr()).unwrap();
    raw.set_nodelay(true).unwrap();
    let send = |s: &mut TcpStream, m: fractos_sdk::wire::ProcessMsg| {
        let mut f = Vec::new();
        m.encode(&mut f);
        s.write_all(&f).unwrap();
    };
    let recv = |s: &mut TcpStream| {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut body = vec![0; u32::from_le_bytes(len) as usize];
        s.read_exact(&mut body).unwrap();
    };
    send(
        &mut raw,
        fractos_sdk::wire::ProcessMsg::Attach {
            name: b"raw".to_vec(),
            token: process_token(&KEY, b"raw"),
        },
    );
    recv(&mut raw);
    let mut rawop = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        send(
            &mut raw,
            fractos_sdk::wire::ProcessMsg::Drop {
                op: i as u64,
                cap: fractos_sdk::Handle(999_999),
            },
        );
        recv(&mut raw);
        rawop.push(t.elapsed());
    }
    println!(
        "op rtt p50: sdk {:?}, raw socket {:?}",
        median(op),
        median(rawop)
    );
    // Variant: B serves on its own thread with next_invocation.
    let b2 = attach(n1.process_addr(), "b2");
    let svc2 = b2.request_create(3, &[], &[]).unwrap();
    let b2c = b2.clone();
    let server = std::thread::spawn(move || {
        while let Ok(inv) = b2c.next_invocation() {
            let k = inv.request(0).unwrap();
            b2c.invoke(&k, &[], &[]).unwrap();
        }
    });
    retry(|| b2.publish("svc2", svc2));
    let svc2 = retry(|| a.lookup("svc2", Duration::from_secs(5)))
        .as_request()
        .unwrap();
    let mut inv2 = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        a.invoke(&svc2, &[], &[k.into()]).unwrap();
        a.next_invocation().unwrap();
        inv2.push(t.elapsed());
    }
    println!("invoke rtt, next_invocation server: {:?}", median(inv2));
    b2.close();
    server.join().unwrap();
    println!(
        "invoke rtt, raw processes (no SDK): {:?}",
        raw_invoke_rtt(n1.process_addr(), n)
    );
    let (tcp_m, inv_m) = (median(tcp), median(inv));
    println!(
        "tcp rtt p50 {:?}, invoke rtt p50 {:?}, ratio {:.2}",
        tcp_m,
        inv_m,
        inv_m.as_secs_f64() / tcp_m.as_secs_f64()
    );

    // 4 MiB copies between processes on two controllers.
    const LEN: u64 = 4 << 20;
    let src_p = attach(n1.process_addr(), "src");
    let dst_p = attach(n2.process_addr(), "dst");
    let src_r = src_p.register_vec(vec![7; LEN as usize]).unwrap();
    let dst_r = dst_p.register(LEN).unwrap();
    let src = src_p.memory_create(&src_r, 0, LEN, Rights::READ).unwrap();
    let dst = dst_p.memory_create(&dst_r, 0, LEN, Rights::WRITE).unwrap();
    retry(|| dst_p.publish("dst", dst));
    let dst = retry(|| src_p.lookup("dst", Duration::from_secs(5)))
        .as_memory()
        .unwrap();
    let rounds = 20;
    let t = Instant::now();
    for _ in 0..rounds {
        src_p.copy(&src, &dst, None).unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "copy 4 MiB x {rounds}: {:.2} Gbit/s",
        (LEN * rounds) as f64 * 8.0 / secs / 1e9
    );
}
