//! The hosted controller over real sockets: attach, cross-node invoke and
//! copy, metrics, traffic accounting, and misbehaving processes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use fractos_core::process_token;
use fractos_hosted::{spawn, HostedConfig, Running};
use fractos_wire::{
    frame_body, ControllerMsg, ErrorCode, Handle, NodeId, ProcessMsg, Reply, Rights, MAX_FRAME_LEN,
};

const KEY: [u8; 32] = [3; 32];

/// A minimal raw process: speaks the wire protocol and serves its memory.
struct RawProc {
    s: TcpStream,
    buf: Vec<u8>,
    memory: Vec<u8>,
    inbox: Vec<ControllerMsg>,
    next_op: u64,
}

impl RawProc {
    fn connect(addr: SocketAddr) -> RawProc {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        RawProc {
            s,
            buf: Vec::new(),
            memory: (0..200_000u32).map(|i| (i % 251) as u8).collect(),
            inbox: Vec::new(),
            next_op: 1,
        }
    }

    fn attach(addr: SocketAddr, name: &str) -> RawProc {
        let mut p = RawProc::connect(addr);
        p.send(&ProcessMsg::Attach {
            name: name.into(),
            token: process_token(&KEY, name.as_bytes()),
        });
        match p.recv() {
            Some(ControllerMsg::Attached { .. }) => p,
            other => panic!("attach failed: {other:?}"),
        }
    }

    fn send(&mut self, m: &ProcessMsg) {
        let mut f = Vec::new();
        m.encode(&mut f);
        self.s.write_all(&f).unwrap();
    }

    /// Next message that is not a memory access (those are served here).
    fn recv(&mut self) -> Option<ControllerMsg> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_le_bytes(self.buf[..4].try_into().unwrap()) as usize;
                if self.buf.len() >= 4 + len {
                    let frame: Vec<u8> = self.buf.drain(..4 + len).collect();
                    let msg =
                        ControllerMsg::decode(frame_body(&frame, MAX_FRAME_LEN).unwrap()).unwrap();
                    match msg {
                        ControllerMsg::MemRead { xfer, addr, len } => {
                            let data =
                                self.memory[addr as usize..addr as usize + len as usize].to_vec();
                            self.send(&ProcessMsg::MemReadReply {
                                xfer,
                                result: Ok(data),
                            });
                        }
                        ControllerMsg::MemWrite { xfer, addr, data } => {
                            self.memory[addr as usize..addr as usize + data.len()]
                                .copy_from_slice(&data);
                            self.send(&ProcessMsg::MemWriteReply {
                                xfer,
                                result: Ok(()),
                            });
                        }
                        m => return Some(m),
                    }
                    continue;
                }
            }
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn op(&mut self, make: impl FnOnce(u64) -> ProcessMsg) -> Result<Reply, ErrorCode> {
        let op = self.next_op;
        self.next_op += 1;
        self.send(&make(op));
        if let Some(pos) = self
            .inbox
            .iter()
            .position(|m| matches!(m, ControllerMsg::Completion { op: o, .. } if *o == op))
        {
            if let ControllerMsg::Completion { result, .. } = self.inbox.remove(pos) {
                return result;
            }
        }
        loop {
            match self.recv() {
                Some(ControllerMsg::Completion { op: o, result }) if o == op => return result,
                Some(m) => self.inbox.push(m),
                None => panic!("channel closed while waiting for op {op}"),
            }
        }
    }

    fn cap(&mut self, make: impl FnOnce(u64) -> ProcessMsg) -> Handle {
        match self.op(make) {
            Ok(Reply::Cap { handle, .. }) => handle,
            other => panic!("expected a capability: {other:?}"),
        }
    }

    fn wait_invocation(&mut self) -> (u64, Vec<u8>) {
        if let Some(pos) = self
            .inbox
            .iter()
            .position(|m| matches!(m, ControllerMsg::Invocation { .. }))
        {
            if let ControllerMsg::Invocation { tag, imms, .. } = self.inbox.remove(pos) {
                return (tag, imms);
            }
        }
        loop {
            match self.recv() {
                Some(ControllerMsg::Invocation { tag, imms, .. }) => return (tag, imms),
                Some(m) => self.inbox.push(m),
                None => panic!("channel closed while waiting for an invocation"),
            }
        }
    }
}

fn cluster(n: u32) -> Vec<Running> {
    cluster_with(n, None)
}

fn cluster_with(n: u32, gossip: Option<fractos_core::Gossip>) -> Vec<Running> {
    let nodes: Vec<Running> = (1..=n)
        .map(|i| {
            let mut c = HostedConfig::local(NodeId(i), KEY);
            c.gossip = gossip.clone();
            c.members = (1..=n).map(NodeId).collect();
            c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
            c.copy_chunk = 16 * 1024;
            spawn(c).unwrap()
        })
        .collect();
    for a in &nodes {
        for b in &nodes {
            if a.node() != b.node() {
                a.add_peer(b.node(), b.peer_addr());
            }
        }
    }
    nodes
}

/// Publishes from `p` and looks up from `q`, waiting for peers to connect.
fn share(p: &mut RawProc, cap: Handle, q: &mut RawProc, name: &str) -> Handle {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match p.op(|op| ProcessMsg::Publish {
            op,
            name: name.into(),
            cap,
        }) {
            Ok(_) => break,
            Err(ErrorCode::PeerUnreachable) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("publish: {e}"),
        }
    }
    q.cap(|op| ProcessMsg::Lookup {
        op,
        name: name.into(),
        wait_ms: 5000,
    })
}

#[test]
fn cross_node_invoke_and_copy_over_tcp() {
    let nodes = cluster(3);
    let mut storage = RawProc::attach(nodes[0].process_addr(), "storage");
    let mut compute = RawProc::attach(nodes[1].process_addr(), "compute");
    let mut app = RawProc::attach(nodes[2].process_addr(), "app");

    let src = storage.cap(|op| ProcessMsg::MemoryCreate {
        op,
        addr: 1000,
        len: 100_000,
        rights: Rights::READ,
    });
    let dst = compute.cap(|op| ProcessMsg::MemoryCreate {
        op,
        addr: 50_000,
        len: 100_000,
        rights: Rights::WRITE,
    });
    let done = compute.cap(|op| ProcessMsg::RequestCreate {
        op,
        tag: 7,
        imms: b"ok".to_vec(),
        caps: vec![],
    });
    let s = share(&mut storage, src, &mut app, "src");
    let d = share(&mut compute, dst, &mut app, "dst");
    let c = share(&mut compute, done, &mut app, "done");

    // The app drives a copy between two other nodes; compute must keep
    // serving its memory while the copy runs, so it runs on a thread.
    let t = std::thread::spawn(move || {
        let inv = compute.wait_invocation();
        (compute, inv)
    });
    let storage_thread = std::thread::spawn(move || {
        // Serve reads until the channel closes at the end of the test.
        while storage.recv().is_some() {}
    });
    assert_eq!(
        app.op(|op| ProcessMsg::Copy {
            op,
            src: s,
            dst: d,
            completion: Some(c)
        }),
        Ok(Reply::Done)
    );
    let (compute, (tag, imms)) = t.join().unwrap();
    assert_eq!((tag, imms.as_slice()), (7, &b"ok"[..]));
    assert_eq!(
        compute.memory[50_000..150_000],
        (1000..101_000u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>()[..]
    );

    // Traffic: the copied bytes crossed node 1 → node 2 once, and never
    // reached node 3 (the invoker).
    let t1 = nodes[0].traffic().unwrap();
    let t3 = nodes[2].traffic().unwrap();
    assert!(t1.peers[&2].bytes_out >= 100_000, "{t1:?}");
    assert!(t3.peer_total().bytes_in < 10_000, "{t3:?}");

    // Metrics over HTTP.
    let mut http = TcpStream::connect(nodes[0].metrics_addr().unwrap()).unwrap();
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    http.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(
        text.contains("fractos_bytes_copied_total{node=\"1\",direction=\"out\"} 100000"),
        "{text}"
    );
    assert!(text.contains("fractos_processes_attached{node=\"1\"} 1"));
    drop(compute);
    for n in nodes {
        n.shutdown();
    }
    storage_thread.join().unwrap();
}

#[test]
fn garbage_and_connection_floods_do_not_disturb_other_processes() {
    let nodes = cluster(1);
    let addr = nodes[0].process_addr();
    let mut good = RawProc::attach(addr, "good");
    let m = good.cap(|op| ProcessMsg::MemoryCreate {
        op,
        addr: 0,
        len: 4096,
        rights: Rights::READ_WRITE,
    });

    // Garbage: a frame that decodes to nothing.
    let mut bad = RawProc::connect(addr);
    bad.s
        .write_all(&[5, 0, 0, 0, fractos_wire::PROTOCOL_VERSION, 99, 1, 2, 3])
        .unwrap();
    assert!(matches!(
        bad.recv(),
        Some(ControllerMsg::Rejected {
            code: ErrorCode::Malformed,
            ..
        })
    ));
    assert!(
        bad.recv().is_none(),
        "the controller closes the garbage channel"
    );

    // An oversized length prefix.
    let mut huge = RawProc::connect(addr);
    huge.s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    assert!(huge.recv().is_none());

    // A burst of connections that never attach, then all drop.
    let flood: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    let r = good.op(|op| ProcessMsg::Diminish {
        op,
        cap: m,
        offset: 0,
        len: 16,
        rights: Rights::READ,
    });
    assert!(matches!(r, Ok(Reply::Cap { .. })), "{r:?}");
    drop(flood);

    // Wrong token.
    let mut liar = RawProc::connect(addr);
    liar.send(&ProcessMsg::Attach {
        name: b"good".to_vec(),
        token: [0; 32],
    });
    assert!(matches!(
        liar.recv(),
        Some(ControllerMsg::Rejected {
            code: ErrorCode::AuthFailed,
            ..
        })
    ));

    // The well-behaved process still works and its state is intact.
    let r = good.op(|op| ProcessMsg::Diminish {
        op,
        cap: m,
        offset: 8,
        len: 8,
        rights: Rights::READ,
    });
    assert!(matches!(r, Ok(Reply::Cap { .. })), "{r:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = nodes[0].metrics_text().unwrap();
        if text.contains("fractos_processes_attached{node=\"1\"} 1\n") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "flood connections were not cleaned up:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn controller_shutdown_gives_typed_errors_to_remote_holders() {
    let nodes = cluster(2);
    let mut a = RawProc::attach(nodes[0].process_addr(), "a");
    let mut b = RawProc::attach(nodes[1].process_addr(), "b");
    let r = b.cap(|op| ProcessMsg::RequestCreate {
        op,
        tag: 1,
        imms: vec![],
        caps: vec![],
    });
    let at_a = share(&mut b, r, &mut a, "r");
    let mut nodes = nodes;
    let node_b = nodes.pop().unwrap();
    drop(b);
    node_b.shutdown();
    let started = Instant::now();
    let r = a.op(|op| ProcessMsg::Invoke {
        op,
        cap: at_a,
        imms: vec![],
        caps: vec![],
    });
    assert!(
        matches!(
            r,
            Err(ErrorCode::PeerUnreachable) | Err(ErrorCode::Timeout) | Err(ErrorCode::Revoked)
        ),
        "{r:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "typed error within the op timeout"
    );
}

#[test]
fn running_can_be_driven_from_inside_a_tokio_runtime() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let a = spawn(HostedConfig::local(NodeId(1), KEY)).unwrap();
        let b = spawn(HostedConfig::local(NodeId(2), KEY)).unwrap();
        a.add_peer(NodeId(2), b.peer_addr());
        b.add_peer(NodeId(1), a.peer_addr());
        assert!(a.traffic().is_ok());
        assert!(a
            .metrics_text()
            .unwrap()
            .contains("fractos_peers_connected"));
        drop(a);
        b.shutdown();
    });
}

#[test]
fn request_floods_get_limit_errors_and_mid_operation_exits_are_cleaned_up() {
    let mut c = HostedConfig::local(NodeId(1), KEY);
    c.limits.max_pending_per_process = 64;
    let node = spawn(c).unwrap();
    let addr = node.process_addr();
    let mut good = RawProc::attach(addr, "good");
    let mut flood = RawProc::attach(addr, "flood");
    // 500 lookups that wait: the first 64 stay pending, the rest are refused.
    for op in 1..=500u64 {
        flood.send(&ProcessMsg::Lookup {
            op,
            name: b"never".to_vec(),
            wait_ms: 60_000,
        });
    }
    let mut limited = 0;
    while limited < 500 - 64 {
        match flood.recv() {
            Some(ControllerMsg::Completion {
                result: Err(ErrorCode::LimitReached),
                ..
            }) => limited += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    // Everyone else is served meanwhile.
    let m = good.cap(|op| ProcessMsg::MemoryCreate {
        op,
        addr: 0,
        len: 64,
        rights: Rights::READ,
    });
    assert!(good
        .op(|op| ProcessMsg::Diminish {
            op,
            cap: m,
            offset: 0,
            len: 8,
            rights: Rights::READ
        })
        .is_ok());
    // The flooder exits with 64 operations in flight: the controller forgets it.
    drop(flood);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = node.metrics_text().unwrap();
        if text.contains("fractos_processes_attached{node=\"1\"} 1\n")
            && text.contains("fractos_pending_ops{node=\"1\"} 0\n")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "flooder state not cleaned up:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(good.op(|op| ProcessMsg::Drop { op, cap: m }).is_ok());
}

/// The peer port under attack: more half-open connections than it takes,
/// connections that send part of a frame and stop, a length prefix of
/// 4 GiB, a garbage frame. Links already up keep carrying invocations;
/// every hostile connection is closed (at once beyond the bound, after the
/// peer timeout otherwise).
#[test]
fn peer_port_floods_and_oversized_frames_leave_links_alone() {
    let nodes: Vec<Running> = (1..=2)
        .map(|i| {
            let mut c = HostedConfig::local(NodeId(i), KEY);
            c.members = vec![NodeId(1), NodeId(2)];
            c.heartbeat_interval = Duration::from_millis(100);
            c.peer_timeout = Duration::from_secs(1);
            spawn(c).unwrap()
        })
        .collect();
    nodes[0].add_peer(NodeId(2), nodes[1].peer_addr());
    nodes[1].add_peer(NodeId(1), nodes[0].peer_addr());
    nodes[0].wait_peers(1, Duration::from_secs(10)).unwrap();
    let mut server = RawProc::attach(nodes[0].process_addr(), "server");
    let mut client = RawProc::attach(nodes[1].process_addr(), "client");
    let req = server.cap(|op| ProcessMsg::RequestCreate {
        op,
        tag: 4,
        imms: vec![],
        caps: vec![],
    });
    let r = share(&mut server, req, &mut client, "peer-flood/req");
    let round = |client: &mut RawProc, server: &mut RawProc, i: u8| {
        assert_eq!(
            client.op(|op| ProcessMsg::Invoke {
                op,
                cap: r,
                imms: vec![i],
                caps: vec![],
            }),
            Ok(Reply::Done)
        );
        assert_eq!(server.wait_invocation(), (4, vec![i]));
    };
    round(&mut client, &mut server, 0);

    let peer = nodes[0].peer_addr();
    let mut hostile: Vec<TcpStream> = Vec::new();
    for i in 0..100 {
        let mut s = TcpStream::connect(peer).unwrap();
        let _ = match i % 4 {
            0 => s.write_all(&[200, 0, 0]),
            1 => s.write_all(&u32::MAX.to_le_bytes()),
            2 => s.write_all(&[8, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]),
            _ => Ok(()),
        };
        hostile.push(s);
    }
    round(&mut client, &mut server, 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    for (i, s) in hostile.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 256];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        assert!(
            Instant::now() < deadline,
            "hostile peer connection {i} still open"
        );
    }
    round(&mut client, &mut server, 2);
    nodes[0]
        .wait_peers(1, Duration::from_secs(1))
        .expect("the link is still up");
}

/// Gossip membership over real sockets: links are dialled when an
/// operation needs them (by either side, whatever the ids), closed when
/// idle, dialled again for the next operation, and a controller that
/// stops is confirmed dead by the failure detector: operations on its
/// objects get a typed error.
#[test]
fn gossip_links_on_demand_and_failure_detection_over_tcp() {
    let gossip = fractos_core::Gossip {
        protocol_period: Duration::from_millis(100),
        probe_timeout: Duration::from_millis(40),
        link_idle: Duration::from_millis(300),
        ..fractos_core::Gossip::default()
    };
    let nodes = cluster_with(3, Some(gossip));
    let mut a = RawProc::attach(nodes[0].process_addr(), "a");
    let mut c = RawProc::attach(nodes[2].process_addr(), "c");
    let r = c.cap(|op| ProcessMsg::RequestCreate {
        op,
        tag: 5,
        imms: b"hi".to_vec(),
        caps: vec![],
    });
    let at_a = share(&mut c, r, &mut a, "r");
    let t = std::thread::spawn(move || {
        let first = c.wait_invocation();
        let second = c.wait_invocation();
        (c, first, second)
    });
    let invoke = |a: &mut RawProc| {
        a.op(|op| ProcessMsg::Invoke {
            op,
            cap: at_a,
            imms: vec![],
            caps: vec![],
        })
    };
    assert_eq!(invoke(&mut a), Ok(Reply::Done));
    // Longer than the idle timeout: the links close, and the next
    // invocation opens one again.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(invoke(&mut a), Ok(Reply::Done));
    let (c, first, second) = t.join().unwrap();
    assert_eq!(first, (5, b"hi".to_vec()));
    assert_eq!(second, (5, b"hi".to_vec()));
    // Node 3 goes away; node 1 learns it from membership (node 2 probes
    // it too), and operations on its objects fail with a typed error.
    let mut nodes = nodes;
    let node_c = nodes.pop().unwrap();
    drop(c);
    node_c.shutdown();
    std::thread::sleep(Duration::from_millis(3000));
    let started = Instant::now();
    let r = invoke(&mut a);
    assert!(
        matches!(r, Err(ErrorCode::PeerUnreachable) | Err(ErrorCode::Revoked)),
        "{r:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a member confirmed dead fails at once, not after a timeout: {:?}",
        started.elapsed()
    );
    for n in nodes {
        n.shutdown();
    }
}
