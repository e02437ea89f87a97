//! Connection slots of the hosted controller are bounded in number and time,
//! as on the appliance: a process connection that never attaches, and
//! `/metrics` connections beyond the bound, are closed.
//!
//! The timeouts themselves (attach, metrics: slow and silent clients) are
//! the node driver's, tested once in `controller/node`; the configuration
//! that reaches the node is checked in `src/driver.rs`. Here: what only the
//! tokio glue does, with real sockets: closing the socket, freeing the
//! accept slot, refusing extra connections at accept.
//!
//! Timing is only checked against generous bounds: the machine may be slow.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use fractos_core::process_token;
use fractos_hosted::{spawn, HostedConfig, Running};
use fractos_wire::{frame_body, ControllerMsg, NodeId, ProcessMsg, MAX_FRAME_LEN};

const KEY: [u8; 32] = [5; 32];

/// Waits (up to a generous bound) for the server to close `s`; true if it
/// did (end of stream or reset), false if it stayed open.
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            // An HTTP answer or a Rejected frame may precede the close.
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Attaches a process; returns its stream once `Attached` arrived, or the
/// message it got instead.
fn attach(addr: SocketAddr, name: &str) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut f = Vec::new();
    ProcessMsg::Attach {
        name: name.into(),
        token: process_token(&KEY, name.as_bytes()),
    }
    .encode(&mut f);
    s.write_all(&f).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if buf.len() >= 4 {
            let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if buf.len() < 4 + len {
                match s.read(&mut chunk) {
                    Ok(0) => return Err("closed".into()),
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) => return Err(e.to_string()),
                }
                continue;
            }
            let body = frame_body(&buf[..4 + len], MAX_FRAME_LEN).map_err(|e| e.to_string())?;
            return match ControllerMsg::decode(body) {
                Ok(ControllerMsg::Attached { .. }) => Ok(s),
                other => Err(format!("{other:?}")),
            };
        }
        match s.read(&mut chunk) {
            Ok(0) => return Err("closed".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn scrape(node: &Running) -> Result<String, String> {
    let mut s = TcpStream::connect(node.metrics_addr().unwrap()).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    if text.starts_with("HTTP/1.1 200 OK") {
        Ok(text)
    } else {
        Err(text)
    }
}

/// Retries `f` for up to 20 s.
fn eventually<T>(mut f: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if start.elapsed() > Duration::from_secs(20) => panic!("gave up: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[test]
fn a_connection_that_never_attaches_loses_its_slot() {
    let mut c = HostedConfig::local(NodeId(1), KEY);
    c.attach_timeout = Duration::from_millis(300);
    c.limits.max_processes = 1;
    let node = spawn(c).unwrap();
    let mut silent = TcpStream::connect(node.process_addr()).unwrap();
    let start = Instant::now();
    assert!(
        closed_by_server(&mut silent),
        "a silent process connection must be closed after the attach timeout"
    );
    assert!(start.elapsed() < Duration::from_secs(25));
    // Its slot is free again: the only process slot can be taken.
    let mut p = eventually(|| attach(node.process_addr(), "app"));
    // An attached process is not subject to the attach timeout.
    std::thread::sleep(Duration::from_millis(600));
    p.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut b = [0u8; 16];
    match p.read(&mut b) {
        Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
        other => panic!("attached process was disturbed: {other:?}"),
    }
    let text = node.metrics_text().unwrap();
    assert!(text.contains("fractos_processes_attached{node=\"1\"} 1"));
    node.shutdown();
}

#[test]
fn metrics_connections_are_bounded_in_number() {
    let mut c = HostedConfig::local(NodeId(1), KEY);
    c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    c.max_metrics_conns = 4;
    c.metrics_timeout = Duration::from_secs(120);
    let node = spawn(c).unwrap();
    let addr = node.metrics_addr().unwrap();
    // Four idle clients take every slot...
    let idle: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // ...so further ones are closed at once.
    for _ in 0..3 {
        let mut extra = TcpStream::connect(addr).unwrap();
        let _ = extra.write_all(b"GET /metrics HTTP/1.1\r\n\r\n");
        let mut answer = Vec::new();
        extra
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        match extra.read_to_end(&mut answer) {
            Ok(_) => assert!(
                answer.is_empty(),
                "an extra connection was served: {}",
                String::from_utf8_lossy(&answer)
            ),
            Err(e) => assert!(
                e.kind() != ErrorKind::WouldBlock && e.kind() != ErrorKind::TimedOut,
                "an extra metrics connection stayed open"
            ),
        }
    }
    // Once the idle clients leave, a normal scrape works.
    drop(idle);
    let text = eventually(|| scrape(&node));
    assert!(text.contains("fractos_processes_attached{node=\"1\"} 0"));
    node.shutdown();
}
