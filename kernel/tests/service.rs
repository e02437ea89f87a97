//! Host tests of the appliance's controller service (`service.rs`) over an
//! in-memory Ethernet hub: the service's smoltcp interface on one port, a
//! client interface with plain smoltcp TCP sockets (or a second service) on
//! the others, and a fake clock advanced 1 ms per step.
//!
//! The connection policy (framing limits, attach and metrics timeouts,
//! HTTP refusals, linger, backoff, traffic) is the node driver's and is
//! tested once, over in-memory channels, in `controller/node`. This suite
//! keeps what only the smoltcp glue can get wrong: TCP accept, listen
//! backlog and refusal at the limit, graceful close after a rejection,
//! the reset of a lingering connection, dialing and dial failures between
//! two services, heartbeats over real TCP, `/metrics` through a socket.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv4Addr;
use std::rc::Rc;

use fractos_core::{process_token, Config as CoreConfig, OpKind};
use fractos_kernel::service::{PeerAddr, Service, ServiceConfig};
use fractos_wire::{
    ControllerMsg, ErrorCode, FrameSplitter, NodeId, ProcessMsg, Reply, PROTOCOL_VERSION,
};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as NetInstant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

/// Ethernet MTU of the in-memory link (frame bytes, header included).
const MTU: usize = 1514;
/// Fake time per step.
const STEP_NS: u64 = 1_000_000;
/// The cluster key of every test.
const KEY: [u8; 32] = [7; 32];
/// The client's host number on 10.0.0.0/24.
const CLIENT_HOST: u8 = 100;

// ---------------------------------------------------------------------------
// An in-memory Ethernet hub.

type Hub = Rc<RefCell<Vec<VecDeque<Vec<u8>>>>>;

/// One port of the hub: a frame sent on it is queued for every other port
/// (the interfaces filter by MAC address, as on a real hub).
struct Port {
    hub: Hub,
    me: usize,
}

fn hub(ports: usize) -> Vec<Port> {
    let hub: Hub = Rc::new(RefCell::new(vec![VecDeque::new(); ports]));
    (0..ports)
        .map(|me| Port {
            hub: hub.clone(),
            me,
        })
        .collect()
}

struct RxToken(Vec<u8>);

struct TxToken {
    hub: Hub,
    me: usize,
}

impl phy::RxToken for RxToken {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        assert!(len <= MTU, "frame of {len} bytes exceeds the MTU");
        let mut frame = vec![0; len];
        let r = f(&mut frame);
        for (i, q) in self.hub.borrow_mut().iter_mut().enumerate() {
            if i != self.me {
                q.push_back(frame.clone());
            }
        }
        r
    }
}

impl Port {
    fn tx(&self) -> TxToken {
        TxToken {
            hub: self.hub.clone(),
            me: self.me,
        }
    }
}

impl Device for Port {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken;

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.max_transmission_unit = MTU;
        caps.medium = Medium::Ethernet;
        caps
    }

    fn receive(&mut self, _now: NetInstant) -> Option<(RxToken, TxToken)> {
        let frame = self.hub.borrow_mut()[self.me].pop_front()?;
        Some((RxToken(frame), self.tx()))
    }

    fn transmit(&mut self, _now: NetInstant) -> Option<TxToken> {
        Some(self.tx())
    }
}

/// An interface at 10.0.0.`host`/24 on a hub port.
struct Nic {
    iface: Interface,
    port: Port,
}

fn nic(mut port: Port, host: u8) -> Nic {
    let mut cfg = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress([
        0x02, 0, 0, 0, 0, host,
    ])));
    cfg.random_seed = u64::from(host);
    let mut iface = Interface::new(cfg, &mut port, NetInstant::ZERO);
    iface.update_ip_addrs(|a| {
        a.push(IpCidr::new(IpAddress::v4(10, 0, 0, host), 24))
            .unwrap()
    });
    Nic { iface, port }
}

fn net_now(now_ns: u64) -> NetInstant {
    NetInstant::from_micros((now_ns / 1000) as i64)
}

// ---------------------------------------------------------------------------
// The test network: services at 10.0.0.1, 10.0.0.2, … and one client.

struct Net {
    now_ns: u64,
    services: Vec<(Service, Nic)>,
    client: Nic,
    sockets: SocketSet<'static>,
    inbufs: BTreeMap<SocketHandle, Vec<u8>>,
    next_local_port: u16,
    /// Services not polled; frames sent to them are lost.
    paused: Vec<bool>,
}

impl Net {
    fn new(cfgs: Vec<ServiceConfig>) -> Net {
        let n = cfgs.len();
        let mut ports = hub(cfgs.len() + 1);
        let client = nic(ports.pop().unwrap(), CLIENT_HOST);
        let services = cfgs
            .into_iter()
            .zip(ports)
            .enumerate()
            .map(|(i, (cfg, port))| (Service::new(cfg, 1, 0), nic(port, i as u8 + 1)))
            .collect();
        Net {
            now_ns: 0,
            services,
            client,
            sockets: SocketSet::new(vec![]),
            inbufs: BTreeMap::new(),
            next_local_port: 50000,
            paused: vec![false; n],
        }
    }

    /// One service with default settings changed by `f`.
    fn single(f: impl FnOnce(&mut ServiceConfig)) -> Net {
        let mut cfg = ServiceConfig::new(CoreConfig::new(NodeId(1), 11, KEY));
        f(&mut cfg);
        Net::new(vec![cfg])
    }

    fn svc(&self) -> &Service {
        &self.services[0].0
    }

    fn step(&mut self) {
        self.now_ns += STEP_NS;
        let now = self.now_ns;
        for ((svc, nic), &paused) in self.services.iter_mut().zip(&self.paused) {
            if paused {
                nic.port.hub.borrow_mut()[nic.port.me].clear();
            } else {
                svc.poll(now, &mut [(&mut nic.iface, &mut nic.port)]);
            }
        }
        self.client
            .iface
            .poll(net_now(now), &mut self.client.port, &mut self.sockets);
    }

    /// Steps until `cond` holds, at most `max_steps` times.
    fn run_until(&mut self, what: &str, max_steps: u32, mut cond: impl FnMut(&mut Net) -> bool) {
        for _ in 0..=max_steps {
            if cond(self) {
                return;
            }
            self.step();
        }
        panic!(
            "gave up waiting for {what} after {max_steps} steps (fake time now {} ms)",
            self.now_ns / 1_000_000
        );
    }

    /// Runs `steps` steps unconditionally.
    fn run(&mut self, steps: u32) {
        for _ in 0..steps {
            self.step();
        }
    }

    fn sock(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    fn state(&mut self, h: SocketHandle) -> tcp::State {
        self.sock(h).state()
    }

    /// Starts connecting to 10.0.0.`host`:`port`.
    fn connect_to(&mut self, host: u8, port: u16) -> SocketHandle {
        self.connect_with(host, port, 64 * 1024)
    }

    /// Starts connecting to 10.0.0.`host`:`port` with a receive buffer of
    /// `rx` bytes.
    fn connect_with(&mut self, host: u8, port: u16, rx: usize) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; rx]),
            tcp::SocketBuffer::new(vec![0; 64 * 1024]),
        );
        s.set_nagle_enabled(false);
        s.set_ack_delay(None);
        let local = self.next_local_port;
        self.next_local_port += 1;
        s.connect(
            self.client.iface.context(),
            (IpAddress::v4(10, 0, 0, host), port),
            local,
        )
        .unwrap();
        let h = self.sockets.add(s);
        self.inbufs.insert(h, Vec::new());
        h
    }

    /// Connects to 10.0.0.`host`:`port` and waits until established.
    ///
    /// The budget covers smoltcp's ARP rate limit: the client interface
    /// sends no ARP request for 1 s after its previous one, whatever the
    /// address.
    fn connect_host(&mut self, host: u8, port: u16) -> SocketHandle {
        let h = self.connect_to(host, port);
        self.run_until("the connection to be established", 2000, |n| {
            n.state(h) == tcp::State::Established
        });
        h
    }

    /// Connects to the first service's `port` and waits until established.
    fn connect(&mut self, port: u16) -> SocketHandle {
        self.connect_host(1, port)
    }

    /// Sends all of `bytes` on `h`.
    fn send(&mut self, h: SocketHandle, bytes: &[u8]) {
        let mut at = 0;
        self.run_until("the bytes to be sent", 1000, |n| {
            let s = n.sock(h);
            if s.can_send() {
                at += s.send_slice(&bytes[at..]).unwrap();
            }
            at == bytes.len()
        });
    }

    fn send_msg(&mut self, h: SocketHandle, msg: &ProcessMsg) {
        let mut frame = Vec::new();
        msg.encode(&mut frame);
        self.send(h, &frame);
    }

    /// Moves whatever `h` received into its input buffer.
    fn pump(&mut self, h: SocketHandle) {
        let s = self.sockets.get_mut::<tcp::Socket>(h);
        let buf = self.inbufs.get_mut(&h).unwrap();
        while s.can_recv() {
            s.recv(|b| {
                buf.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
    }

    /// A complete controller message received on `h`, if there is one.
    fn take_msg(&mut self, h: SocketHandle) -> Option<ControllerMsg> {
        self.pump(h);
        let buf = self.inbufs.get_mut(&h).unwrap();
        let (body, n) = FrameSplitter::default().split(buf).unwrap()?;
        let msg = ControllerMsg::decode(body).expect("undecodable controller message");
        buf.drain(..n);
        Some(msg)
    }

    fn recv_msg(&mut self, h: SocketHandle) -> ControllerMsg {
        let mut got = None;
        self.run_until("a controller message", 1000, |n| {
            got = n.take_msg(h);
            got.is_some()
        });
        got.unwrap()
    }

    /// Whether the service finished sending on `h` (FIN or reset).
    fn closed_by_service(&mut self, h: SocketHandle) -> bool {
        self.pump(h);
        !self.sock(h).may_recv()
    }

    fn wait_closed_by_service(&mut self, h: SocketHandle) {
        self.run_until("the service to close the connection", 1000, |n| {
            n.closed_by_service(h)
        });
    }

    /// Closes `h` from the client side and waits until the service has no
    /// connection left.
    fn close_and_wait_reaped(&mut self, h: SocketHandle, open_after: usize) {
        self.sock(h).close();
        self.run_until("the service to drop the connection", 1000, |n| {
            n.svc().stats().open == open_after
        });
    }

    /// An HTTP exchange with the metrics port: the whole response.
    fn http(&mut self, request: &str) -> String {
        let h = self.connect(9100);
        self.send(h, request.as_bytes());
        self.wait_closed_by_service(h);
        let bytes = self.inbufs.remove(&h).unwrap();
        self.sock(h).close();
        String::from_utf8(bytes).expect("response is not UTF-8")
    }
}

fn attach(name: &[u8], key: &[u8; 32]) -> ProcessMsg {
    ProcessMsg::Attach {
        name: name.to_vec(),
        token: process_token(key, name),
    }
}

// ---------------------------------------------------------------------------
// The tests.

#[test]
fn process_attaches_and_creates_a_request() {
    let mut net = Net::single(|_| {});
    let h = net.connect(7100);
    net.send_msg(h, &attach(b"app", &KEY));
    assert_eq!(net.recv_msg(h), ControllerMsg::Attached { node: NodeId(1) });
    assert_eq!(net.svc().controller().stats().processes, 1);
    assert_eq!(net.svc().stats().accepted, [1, 0, 0]);
    assert_eq!(net.svc().stats().open, 1);

    net.send_msg(
        h,
        &ProcessMsg::RequestCreate {
            op: 42,
            tag: 9,
            imms: vec![1, 2, 3],
            caps: vec![],
        },
    );
    match net.recv_msg(h) {
        ControllerMsg::Completion {
            op: 42,
            result: Ok(Reply::Cap { .. }),
        } => {}
        other => panic!("expected a successful completion of op 42, got {other:?}"),
    }
    let ctrl = net.svc().controller();
    assert_eq!(ctrl.metrics().ops[OpKind::RequestCreate as usize], 1);
    assert_eq!(ctrl.stats().handles, 1);
    assert_eq!(ctrl.stats().pending_ops, 0);
    let traffic = net.svc().traffic();
    assert_eq!(traffic.processes.frames_in, 2);
    assert_eq!(traffic.processes.frames_out, 2);

    // A lookup of a name nobody publishes waits `wait_ms` and then fails:
    // the core's timers fire.
    let asked = net.now_ns;
    net.send_msg(
        h,
        &ProcessMsg::Lookup {
            op: 43,
            name: b"nobody".to_vec(),
            wait_ms: 50,
        },
    );
    match net.recv_msg(h) {
        ControllerMsg::Completion {
            op: 43,
            result: Err(_),
        } => {}
        other => panic!("expected the lookup to fail, got {other:?}"),
    }
    assert!(
        net.now_ns - asked >= 50_000_000,
        "the lookup gave up after {} ns, before its 50 ms wait",
        net.now_ns - asked
    );

    // The process goes away: the core forgets it and the service drops the
    // connection.
    net.close_and_wait_reaped(h, 0);
    assert_eq!(net.svc().controller().stats().processes, 0);
    assert_eq!(net.svc().controller().stats().handles, 0);
}

#[test]
fn wrong_token_is_rejected_and_closed() {
    let mut net = Net::single(|_| {});
    let h = net.connect(7100);
    // A token minted under another key.
    net.send_msg(h, &attach(b"app", &[8; 32]));
    assert_eq!(
        net.recv_msg(h),
        ControllerMsg::Rejected {
            code: ErrorCode::AuthFailed,
            version: PROTOCOL_VERSION,
        }
    );
    net.wait_closed_by_service(h);
    assert!(net.inbufs[&h].is_empty(), "bytes after the rejection");
    assert_eq!(net.svc().controller().stats().processes, 0);
    assert_eq!(net.svc().controller().metrics().processes_kicked, 1);
    net.close_and_wait_reaped(h, 0);
}

#[test]
fn connection_limit_refuses_extra_connections() {
    let mut net = Net::single(|c| {
        c.node.max_process_conns = 2;
        c.backlog = 1;
    });
    let a = net.connect(7100);
    net.run_until("the first accept", 100, |n| {
        n.svc().stats().accepted[0] == 1
    });
    let b = net.connect(7100);
    net.run_until("the second accept", 100, |n| {
        n.svc().stats().accepted[0] == 2
    });
    let c = net.connect_to(1, 7100);
    net.run_until("the third connection to be refused", 1000, |n| {
        n.state(c) == tcp::State::Closed
    });
    net.run(20);
    assert_eq!(net.state(a), tcp::State::Established);
    assert_eq!(net.state(b), tcp::State::Established);
    assert_eq!(net.svc().stats().accepted[0], 2);
    assert_eq!(net.svc().stats().open, 2);

    // The first two still work.
    for (h, name) in [(a, &b"a"[..]), (b, &b"b"[..])] {
        net.send_msg(h, &attach(name, &KEY));
        assert_eq!(net.recv_msg(h), ControllerMsg::Attached { node: NodeId(1) });
    }

    // A slot frees up: a new connection gets in.
    net.close_and_wait_reaped(a, 1);
    let d = net.connect(7100);
    net.run_until("the fourth accept", 100, |n| {
        n.svc().stats().accepted[0] == 3
    });
    net.send_msg(d, &attach(b"d", &KEY));
    assert_eq!(net.recv_msg(d), ControllerMsg::Attached { node: NodeId(1) });
    assert_eq!(net.svc().controller().stats().processes, 2);
}

#[test]
fn metrics_endpoint_serves_metrics() {
    let mut net = Net::single(|_| {});
    let r = net.http("GET /metrics HTTP/1.1\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "response: {r}");
    let (head, body) = r.split_once("\r\n\r\n").expect("no end of head");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("no Content-Length")
        .parse()
        .unwrap();
    assert_eq!(len, body.len(), "Content-Length does not match the body");
    assert!(body.contains("fractos_ops_total"), "body: {body}");
    // The metrics connection itself is open while the text is rendered.
    assert!(
        body.contains("fractos_node_connections{node=\"1\",kind=\"metrics\"} 1"),
        "body: {body}"
    );
    assert!(body.contains("fractos_node_accepted_total{node=\"1\",kind=\"metrics\"} 1"));
    assert!(
        !body.contains("fractos_appliance_shm_slots"),
        "no slots, no slot metrics"
    );

    // 404, 405, 431 and the metrics timeout are the node driver's
    // (`controller/node/src/tests.rs`); here: the answer crossed smoltcp
    // and the connection is dropped.
    net.run_until("the metrics connection to be dropped", 1000, |n| {
        n.svc().stats().open == 0
    });
    assert_eq!(net.svc().stats().accepted, [0, 0, 1]);
}

#[test]
fn two_services_link_up() {
    let node_cfg = |me: u32, other: u32| {
        let mut core = CoreConfig::new(NodeId(me), 10 + u64::from(me), KEY);
        core.members = vec![NodeId(1), NodeId(2)];
        let mut cfg = ServiceConfig::new(core);
        cfg.node.peers = vec![(
            NodeId(other),
            PeerAddr {
                addr: Ipv4Addr::new(10, 0, 0, other as u8),
                port: 7101,
            },
        )];
        cfg
    };
    let mut net = Net::new(vec![node_cfg(1, 2), node_cfg(2, 1)]);
    net.run_until("both controllers to see their peer", 5000, |n| {
        n.services
            .iter()
            .all(|(s, _)| s.controller().stats().peers == 1)
    });
    // Node 1 (the lower id) dialled, node 2 accepted.
    assert_eq!(net.services[0].0.stats().dialled, 1);
    assert_eq!(net.services[0].0.stats().accepted[1], 0);
    assert_eq!(net.services[1].0.stats().dialled, 0);
    assert_eq!(net.services[1].0.stats().accepted[1], 1);
    for (s, _) in &net.services {
        let node = s.controller().node().0;
        assert!(s
            .metrics_text()
            .contains(&format!("fractos_peers_connected{{node=\"{node}\"}} 1")));
    }

    // The link stays up across heartbeats and peer timeouts (3 s).
    let frames_in = |n: &Net, i: usize| {
        let other = 2 - i as u32;
        n.services[i]
            .0
            .traffic()
            .peers
            .get(&other)
            .map_or(0, |t| t.frames_in)
    };
    let before = [frames_in(&net, 0), frames_in(&net, 1)];
    net.run(5000);
    for (i, b) in before.into_iter().enumerate() {
        // Heartbeats every 500 ms on the idle link.
        assert!(
            frames_in(&net, i) >= b + 5,
            "node {}: only {} frames in over 5 s of idle link",
            i + 1,
            frames_in(&net, i) - b
        );
    }
    for (s, _) in &net.services {
        assert_eq!(s.controller().stats().peers, 1);
        assert_eq!(s.stats().dialled + s.stats().accepted[1], 1, "link flapped");
        assert_eq!(s.stats().open, 1);
    }

    // A process on node 2 publishes a name; a process on node 1 finds it
    // (one of the two nodes homes the name, so the lookup or the publish
    // crosses the link).
    let p2 = net.connect_host(2, 7100);
    net.send_msg(p2, &attach(b"p2", &KEY));
    assert_eq!(
        net.recv_msg(p2),
        ControllerMsg::Attached { node: NodeId(2) }
    );
    net.send_msg(
        p2,
        &ProcessMsg::RequestCreate {
            op: 1,
            tag: 5,
            imms: vec![],
            caps: vec![],
        },
    );
    let handle = match net.recv_msg(p2) {
        ControllerMsg::Completion {
            op: 1,
            result: Ok(Reply::Cap { handle, .. }),
        } => handle,
        other => panic!("RequestCreate failed: {other:?}"),
    };
    let p1 = net.connect_host(1, 7100);
    net.send_msg(p1, &attach(b"p1", &KEY));
    assert_eq!(
        net.recv_msg(p1),
        ControllerMsg::Attached { node: NodeId(1) }
    );
    for (i, name) in [b"svc-a", b"svc-b", b"svc-c", b"svc-d"].iter().enumerate() {
        let op = 10 + i as u64;
        net.send_msg(
            p2,
            &ProcessMsg::Publish {
                op,
                name: name.to_vec(),
                cap: handle,
            },
        );
        assert_eq!(
            net.recv_msg(p2),
            ControllerMsg::Completion {
                op,
                result: Ok(Reply::Done)
            },
            "publish {i}"
        );
        net.send_msg(
            p1,
            &ProcessMsg::Lookup {
                op,
                name: name.to_vec(),
                wait_ms: 0,
            },
        );
        match net.recv_msg(p1) {
            ControllerMsg::Completion {
                op: got,
                result: Ok(Reply::Cap { .. }),
            } if got == op => {}
            other => panic!("lookup {i} failed: {other:?}"),
        }
    }
    let t = net.services[0].0.traffic();
    assert!(
        t.peers.get(&2).is_some_and(|l| l.frames_in > 0),
        "no traffic from node 2 recorded on node 1: {t:?}"
    );
}

#[test]
fn process_not_reading_its_output_is_dropped() {
    let mut net = Net::single(|c| {
        c.node.max_queued_bytes = 4096;
        c.process_buffers = (64 * 1024, 2048);
    });
    let h = net.connect_with(1, 7100, 256);
    net.run_until("the connection to be established", 2000, |n| {
        n.state(h) == tcp::State::Established
    });
    net.send_msg(h, &attach(b"slow", &KEY));
    net.run_until("the attach", 1000, |n| {
        n.svc().controller().stats().processes == 1
    });
    // Many operations, never reading a reply: the answers pile up in the
    // client's 256-byte window, the service's 2 KiB send buffer, then its
    // queue, until the queue passes 4 KiB.
    let mut frames = Vec::new();
    for op in 0..1000 {
        ProcessMsg::RequestCreate {
            op,
            tag: op,
            imms: vec![],
            caps: vec![],
        }
        .encode(&mut frames);
    }
    net.send(h, &frames);
    net.run_until("the service to drop the slow process", 5000, |n| {
        n.svc().stats().stuck == 1
    });
    assert_eq!(net.svc().controller().stats().processes, 0);
    // Its output can never drain: the connection is aborted after the
    // linger time, and the process learns it from a reset (it would
    // otherwise wait forever on a connection the appliance forgot).
    net.run_until("the connection to be gone", 5000, |n| {
        n.svc().stats().open == 0 && n.state(h) == tcp::State::Closed
    });
    assert_eq!(net.svc().stats().stuck, 1);
}

#[test]
fn link_comes_back_after_a_peer_stalls() {
    let node_cfg = |me: u32, other: u32| {
        let mut core = CoreConfig::new(NodeId(me), 10 + u64::from(me), KEY);
        core.members = vec![NodeId(1), NodeId(2)];
        let mut cfg = ServiceConfig::new(core);
        cfg.node.peers = vec![(
            NodeId(other),
            PeerAddr {
                addr: Ipv4Addr::new(10, 0, 0, other as u8),
                port: 7101,
            },
        )];
        cfg
    };
    let mut net = Net::new(vec![node_cfg(1, 2), node_cfg(2, 1)]);
    // Node 2 is down at first: node 1's dials fail and are retried.
    net.paused[1] = true;
    net.run(5000);
    assert_eq!(net.services[0].0.stats().dialled, 0);
    net.paused[1] = false;
    net.run_until("the first link", 5000, |n| {
        n.services
            .iter()
            .all(|(s, _)| s.controller().stats().peers == 1)
    });
    assert_eq!(net.services[0].0.stats().dialled, 1);

    // Node 2 stalls past the peer timeout: node 1 drops the link.
    net.paused[1] = true;
    net.run_until("node 1 to drop the link", 10000, |n| {
        n.services[0].0.controller().stats().peers == 0
    });
    // Node 2 comes back: a new link is dialled and authenticated.
    net.paused[1] = false;
    net.run_until("the second link", 20000, |n| {
        n.services[0].0.stats().dialled == 2
            && n.services
                .iter()
                .all(|(s, _)| s.controller().stats().peers == 1)
    });
    net.run(5000);
    for (s, _) in &net.services {
        assert_eq!(s.controller().stats().peers, 1);
        assert_eq!(s.stats().open, 1, "stale connections left: {:?}", s.stats());
    }
}

#[test]
fn unreachable_peers_are_dialled_a_few_at_a_time() {
    // 300 peers on a subnet nobody answers on (ARP goes unanswered): the
    // service keeps at most `max_dials` dials, each with its buffers, in
    // flight, and rotates through the peers as dials time out.
    let mut core = CoreConfig::new(NodeId(0), 10, KEY);
    core.members = (0..=300).map(NodeId).collect();
    let mut cfg = ServiceConfig::new(core);
    cfg.node.peers = (1..=300u32)
        .map(|n| {
            let addr = Ipv4Addr::new(10, 0, 1 + (n >> 8) as u8, (n & 0xff) as u8);
            (NodeId(n), PeerAddr { addr, port: 7101 })
        })
        .collect();
    let max = cfg.max_dials;
    let mut net = Net::new(vec![cfg]);
    let mut seen = std::collections::BTreeSet::new();
    let mut peak = 0;
    for _ in 0..300_000 {
        net.step();
        let now: Vec<NodeId> = net.svc().dials_in_flight().collect();
        peak = peak.max(now.len());
        seen.extend(now);
    }
    assert_eq!(peak, max, "dials in flight never reached the cap");
    // 300 s: every peer had its turn, not only the first few.
    assert_eq!(seen.len(), 300, "only {} peers dialled", seen.len());
    assert_eq!(net.svc().stats().dialled, 0);
}
