//! Nodes over in-memory channels: attach, limits, timeouts, metrics,
//! linked nodes, stuck readers, linger, link recovery, traffic.
//!
//! This is the one suite of the connection policy both hosts share; the
//! appliance's (`kernel/tests/service.rs`, smoltcp over an Ethernet hub)
//! and the hosted controller's (`controller/hosted/tests`, real sockets)
//! only test their glue.

use alloc::vec;

use fractos_core::{process_token, Config as CoreConfig, PeerSecurity};
use fractos_transport::{Framing, MemoryChannel, TransportError};
use fractos_wire::{ControllerMsg, ErrorCode, Handle, ProcessMsg, Reply, Rights};

use super::*;

const KEY: [u8; 32] = [7; 32];
const STEP: Duration = Duration::from_millis(1);

/// A node's peers are addressed by their index in the world.
type TestNode = Node<(), usize>;

struct World {
    nodes: Vec<TestNode>,
    /// Nodes that are not polled (a stalled or crashed host).
    paused: Vec<bool>,
    now: Instant,
}

/// A process (or a raw client) at the far end of a memory channel.
struct Client {
    ch: MemoryChannel,
    reader: FrameReader,
    inbox: Vec<ControllerMsg>,
    raw: Vec<u8>,
    next_op: u64,
}

impl Client {
    fn new(ch: MemoryChannel) -> Client {
        Client {
            ch,
            reader: FrameReader::new(1 << 20),
            inbox: Vec::new(),
            raw: Vec::new(),
            next_op: 1,
        }
    }

    fn send(&mut self, msg: &ProcessMsg) {
        let mut f = Vec::new();
        msg.encode(&mut f);
        self.send_raw(&f);
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        assert_eq!(self.ch.send(&mut (), bytes), Ok(bytes.len()));
    }

    /// Reads frames (or, with `raw`, bytes) that arrived.
    fn read(&mut self, raw: bool) {
        if raw {
            let _ = self.ch.recv(&mut (), &mut self.raw, 1 << 20);
            return;
        }
        let _ = self.reader.fill(&mut self.ch, &mut ());
        while let Ok(Some(body)) = self.reader.next_frame() {
            self.inbox
                .push(ControllerMsg::decode(body).expect("valid frame"));
        }
    }

    fn closed(&mut self) -> bool {
        self.read(false);
        self.reader.is_closed() || self.ch.peer_gone()
    }
}

fn core(node: u32, members: &[u32]) -> CoreConfig {
    let mut c = CoreConfig::new(NodeId(node), 10 + u64::from(node), KEY);
    c.members = members.iter().map(|&m| NodeId(m)).collect();
    c
}

impl World {
    fn new(n: usize) -> World {
        let members: Vec<u32> = (1..=n as u32).collect();
        let now = Instant(1_000_000_000);
        let nodes = (0..n)
            .map(|i| {
                let mut cfg = NodeConfig::new(core(i as u32 + 1, &members));
                cfg.peers = (0..n)
                    .filter(|&j| j != i)
                    .map(|j| (NodeId(j as u32 + 1), j))
                    .collect();
                Node::new(cfg, now)
            })
            .collect();
        World {
            nodes,
            paused: vec![false; n],
            now,
        }
    }

    fn with(cfgs: Vec<NodeConfig<usize>>) -> World {
        let now = Instant(1_000_000_000);
        World {
            paused: vec![false; cfgs.len()],
            nodes: cfgs.into_iter().map(|c| Node::new(c, now)).collect(),
            now,
        }
    }

    /// Dials what the nodes ask for and polls until nothing moves.
    fn settle(&mut self) {
        for _ in 0..1000 {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                if self.paused[i] {
                    continue;
                }
                while let Some((peer, j)) = self.nodes[i].poll_dial(self.now) {
                    let (a, b) = MemoryChannel::pair(Framing::Stream, 1 << 20);
                    self.nodes[i].dialed(self.now, peer, Box::new(a));
                    self.nodes[j].add(self.now, ConnKind::Peer, Box::new(b));
                    moved = true;
                }
                moved |= self.nodes[i].poll(self.now, &mut ());
            }
            if !moved {
                return;
            }
        }
        panic!("the world never settles");
    }

    /// Advances time by `d` in small steps, settling at each.
    fn advance(&mut self, d: Duration) {
        let end = self.now.after(d);
        while self.now < end {
            self.now = self.now.after(STEP * 10).min(end);
            self.settle();
        }
    }

    fn connect(&mut self, node: usize, kind: ConnKind) -> (Client, ConnId) {
        self.connect_with(node, kind, 1 << 20)
    }

    fn connect_with(&mut self, node: usize, kind: ConnKind, capacity: usize) -> (Client, ConnId) {
        let (a, b) = MemoryChannel::pair(Framing::Stream, capacity);
        let id = self.nodes[node].add(self.now, kind, Box::new(b));
        let c = Client::new(a);
        (c, id)
    }

    fn attach(&mut self, node: usize, name: &str) -> Client {
        let (c, _) = self.connect(node, ConnKind::Process);
        self.attach_client(c, name)
    }

    /// Adds `server` as a process channel and attaches through `client`.
    fn attach_over(
        &mut self,
        node: usize,
        client: MemoryChannel,
        server: Box<dyn Channel>,
        name: &str,
    ) -> Client {
        self.nodes[node].add(self.now, ConnKind::Process, server);
        let c = Client::new(client);
        self.attach_client(c, name)
    }

    fn attach_client(&mut self, mut c: Client, name: &str) -> Client {
        c.send(&ProcessMsg::Attach {
            name: name.as_bytes().to_vec(),
            token: process_token(&KEY, name.as_bytes()),
        });
        self.settle();
        c.read(false);
        assert!(
            matches!(c.inbox.first(), Some(ControllerMsg::Attached { .. })),
            "{:?}",
            c.inbox
        );
        c.inbox.clear();
        c
    }

    /// Breaks `node`'s end of its (first) peer link, then settles.
    fn break_link(&mut self, node: usize) {
        let c = self.nodes[node]
            .conns
            .values_mut()
            .find(|c| c.kind == ConnKind::Peer)
            .expect("a peer link");
        c.ch.abort(&mut ());
        self.settle();
    }

    /// A process that attaches with a wrong token, after the node
    /// answered it.
    fn refused(&mut self, node: usize) -> Client {
        let (mut c, _) = self.connect(node, ConnKind::Process);
        c.send(&ProcessMsg::Attach {
            name: b"bad".to_vec(),
            token: [0; 32],
        });
        self.settle();
        c
    }

    fn op(
        &mut self,
        c: &mut Client,
        make: impl FnOnce(u64) -> ProcessMsg,
    ) -> Result<Reply, ErrorCode> {
        let op = c.next_op;
        c.next_op += 1;
        c.send(&make(op));
        for _ in 0..100 {
            self.settle();
            c.read(false);
            if let Some(i) = c
                .inbox
                .iter()
                .position(|m| matches!(m, ControllerMsg::Completion { op: o, .. } if *o == op))
            {
                if let ControllerMsg::Completion { result, .. } = c.inbox.remove(i) {
                    return result;
                }
            }
            self.advance(STEP * 10);
        }
        panic!("op {op} never completed");
    }

    /// Answers pending metrics requests as a host would.
    fn serve_metrics(&mut self, node: usize) {
        while let Some(id) = self.nodes[node].poll_metrics_request() {
            let text = self.nodes[node].metrics_text();
            self.nodes[node].answer_metrics(id, &text);
        }
        self.settle();
    }
}

fn handle(r: Result<Reply, ErrorCode>) -> Handle {
    match r {
        Ok(Reply::Cap { handle, .. }) => handle,
        other => panic!("expected a capability, got {other:?}"),
    }
}

#[test]
fn processes_attach_and_a_wrong_token_is_refused() {
    let mut w = World::new(1);
    let mut p = w.attach(0, "p");
    let m = handle(w.op(&mut p, |op| ProcessMsg::MemoryCreate {
        op,
        addr: 0,
        len: 64,
        rights: Rights::READ,
    }));
    assert_eq!(m, Handle(0));
    let mut bad = w.refused(0);
    assert!(bad.closed());
    assert!(matches!(
        bad.inbox.first(),
        Some(ControllerMsg::Rejected {
            code: ErrorCode::AuthFailed,
            ..
        })
    ));
    w.advance(Duration::from_secs(3));
    assert_eq!(
        w.nodes[0].stats().open[0],
        1,
        "only the good process remains"
    );
    assert_eq!(w.nodes[0].controller().stats().processes, 1);
}

#[test]
fn an_oversized_prefix_closes_only_that_connection() {
    let mut w = World::new(1);
    let mut good = w.attach(0, "good");
    let (mut bad, _) = w.connect(0, ConnKind::Process);
    bad.send_raw(&u32::MAX.to_le_bytes());
    w.settle();
    assert!(bad.closed());
    bad.read(true);
    assert!(
        bad.raw.is_empty(),
        "the node answered garbage: {:?}",
        bad.raw
    );
    assert!(bad.inbox.is_empty());
    let s = w.nodes[0].stats();
    assert_eq!((s.unframeable, s.attach_timeouts), (1, 0));
    // Once the other side closes too, the slot is reaped.
    bad.ch.close(&mut ());
    w.settle();
    assert_eq!(w.nodes[0].stats().open[0], 1);
    assert_eq!(w.nodes[0].controller().stats().processes, 1);
    let r = w.op(&mut good, |op| ProcessMsg::MemoryCreate {
        op,
        addr: 0,
        len: 8,
        rights: Rights::READ,
    });
    assert!(r.is_ok());
}

#[test]
fn a_well_framed_garbage_body_is_the_cores_to_reject() {
    let mut w = World::new(1);
    let mut good = w.attach(0, "good");
    let mut bad = w.attach(0, "bad");
    // A frame of the right length and version whose body decodes to
    // nothing.
    bad.send_raw(&[4, 0, 0, 0, fractos_wire::PROTOCOL_VERSION, 0xff, 0xff, 0xff]);
    w.settle();
    assert!(bad.closed());
    assert!(
        matches!(
            bad.inbox.first(),
            Some(ControllerMsg::Rejected {
                code: ErrorCode::Malformed,
                ..
            })
        ),
        "{:?}",
        bad.inbox
    );
    // Not a framing failure: the node counts nothing of its own.
    assert_eq!(w.nodes[0].stats().unframeable, 0);
    assert_eq!(w.nodes[0].controller().stats().processes, 1);
    assert!(w
        .op(&mut good, |op| ProcessMsg::MemoryCreate {
            op,
            addr: 0,
            len: 8,
            rights: Rights::READ,
        })
        .is_ok());
}

#[test]
fn silent_connections_lose_their_slot_after_the_attach_timeout() {
    let mut w = World::new(1);
    let (mut silent, _) = w.connect(0, ConnKind::Process);
    w.advance(Duration::from_secs(5));
    assert!(!silent.closed());
    assert!(w.nodes[0].poll_timeout().is_some());
    w.advance(Duration::from_secs(6));
    assert!(silent.closed());
    assert_eq!(w.nodes[0].stats().attach_timeouts, 1);
    w.advance(Duration::from_secs(3));
    assert_eq!(w.nodes[0].stats().open, [0, 0, 0]);
    assert_eq!(w.nodes[0].controller().stats().processes, 0);
}

#[test]
fn the_attach_timeout_is_kept_to_the_step_and_spares_attached_processes() {
    let mut cfg = NodeConfig::new(core(1, &[1]));
    cfg.attach_timeout = Duration::from_millis(100);
    let mut w = World::with(vec![cfg]);
    let opened = w.now;
    let (mut silent, _) = w.connect(0, ConnKind::Process);
    let mut prompt = w.attach(0, "prompt");
    // A host sleeping until `poll_timeout` wakes up in time.
    assert!(w.nodes[0]
        .poll_timeout()
        .is_some_and(|t| t <= opened.after(Duration::from_millis(100))));
    w.advance(Duration::from_millis(100));
    assert!(!silent.closed(), "closed before the timeout");
    w.advance(STEP * 20);
    assert!(silent.closed(), "not closed within 20 ms of the timeout");
    assert_eq!(w.nodes[0].stats().attach_timeouts, 1);
    // The attached process is not subject to it.
    w.advance(Duration::from_secs(1));
    assert!(!prompt.closed());
    assert_eq!(w.nodes[0].stats().attach_timeouts, 1);
    assert_eq!(w.nodes[0].controller().stats().processes, 1);
}

#[test]
fn connection_limits_are_reported_to_the_host() {
    let mut cfg = NodeConfig::new(core(1, &[1]));
    cfg.max_process_conns = 2;
    cfg.max_metrics_conns = 1;
    cfg.max_peer_conns = 1;
    let mut w = World::with(vec![cfg]);
    assert!(w.nodes[0].accepts(ConnKind::Process));
    let (mut a, _) = w.connect(0, ConnKind::Process);
    let _b = w.connect(0, ConnKind::Process);
    assert!(!w.nodes[0].accepts(ConnKind::Process));
    let _m = w.connect(0, ConnKind::Metrics);
    assert!(!w.nodes[0].accepts(ConnKind::Metrics));
    assert!(w.nodes[0].accepts(ConnKind::Peer));
    let _p = w.connect(0, ConnKind::Peer);
    assert!(!w.nodes[0].accepts(ConnKind::Peer));
    // A slot frees up once its connection is reaped.
    a.ch.close(&mut ());
    w.settle();
    assert!(w.nodes[0].accepts(ConnKind::Process));
    assert_eq!(w.nodes[0].stats().accepted, [2, 1, 1]);
    // A replacement raises the total but not the peak held at once.
    let _c = w.connect(0, ConnKind::Process);
    let stats = w.nodes[0].stats();
    assert_eq!(stats.accepted, [3, 1, 1]);
    assert_eq!(stats.accepted_peak, [2, 1, 1]);
    let text = w.nodes[0].metrics_text();
    assert!(
        text.contains("fractos_node_accepted_peak{node=\"1\",kind=\"process\"} 2"),
        "{text}"
    );
}

#[test]
fn metrics_are_served_and_bounded() {
    let mut w = World::new(1);
    let _p = w.attach(0, "p");
    for (request, status) in [
        (&b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"[..], "200 OK"),
        (&b"GET /other HTTP/1.1\r\n\r\n"[..], "404 Not Found"),
        (
            &b"POST /metrics HTTP/1.1\r\n\r\n"[..],
            "405 Method Not Allowed",
        ),
    ] {
        let (mut m, _) = w.connect(0, ConnKind::Metrics);
        m.send_raw(request);
        w.settle();
        w.serve_metrics(0);
        m.read(true);
        let text = String::from_utf8(m.raw.clone()).unwrap();
        assert!(
            text.starts_with(&alloc::format!("HTTP/1.1 {status}")),
            "{text}"
        );
        let (head, body) = text.split_once("\r\n\r\n").expect("an end of head");
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .expect("a Content-Length")
            .parse()
            .unwrap();
        assert_eq!(len, body.len(), "Content-Length does not match the body");
        if status == "200 OK" {
            assert!(
                body.contains("fractos_processes_attached{node=\"1\"} 1"),
                "{text}"
            );
            assert!(body.contains("fractos_ops_total"));
            assert!(body.contains("fractos_node_connections{node=\"1\",kind=\"process\"} 1"));
            // The metrics connection itself is open while the text is
            // rendered.
            assert!(body.contains("fractos_node_connections{node=\"1\",kind=\"metrics\"} 1"));
            assert!(body.contains("fractos_node_accepted_total{node=\"1\",kind=\"metrics\"} 1"));
        }
        // Answered connections close and are reaped.
        assert!(m.ch.peer_gone());
        m.ch.close(&mut ());
        w.settle();
        assert_eq!(w.nodes[0].stats().open[2], 0);
    }
    // An endless header: 431, not unbounded buffering.
    let (mut big, _) = w.connect(0, ConnKind::Metrics);
    big.send_raw(&[b'a'; MAX_HTTP_REQUEST + 100]);
    w.settle();
    big.read(true);
    assert!(big.raw.starts_with(b"HTTP/1.1 431"));
    // A slow client (half a request) and a silent one (nothing) are
    // dropped after the metrics timeout, and their slots freed.
    let (mut slow, _) = w.connect(0, ConnKind::Metrics);
    slow.send_raw(b"GET /met");
    let (silent, _) = w.connect(0, ConnKind::Metrics);
    w.advance(Duration::from_secs(4));
    assert!(!slow.ch.peer_gone() && !silent.ch.peer_gone());
    w.advance(Duration::from_secs(2));
    assert!(slow.ch.peer_gone() && silent.ch.peer_gone());
    assert_eq!(w.nodes[0].stats().metrics_timeouts, 2);
    slow.read(true);
    assert!(slow.raw.is_empty(), "a timed-out client got an answer");
    w.advance(Duration::from_secs(3));
    assert_eq!(w.nodes[0].stats().open[2], 0);
    assert!(w.nodes[0].accepts(ConnKind::Metrics));
}

#[test]
fn linked_nodes_invoke_across_and_count_traffic() {
    for security in [PeerSecurity::Authenticated, PeerSecurity::Secure] {
        let mut w = World::new(2);
        for n in &mut w.nodes {
            n.cfg.core.peer_security = security;
        }
        w.settle();
        assert_eq!(w.nodes[0].controller().stats().peers, 1);
        assert_eq!(w.nodes[1].controller().stats().peers, 1);
        assert_eq!(w.nodes[0].stats().dialled, 1, "the lower id dials");
        assert_eq!(w.nodes[1].stats().dialled, 0);
        let mut a = w.attach(0, "a");
        let mut b = w.attach(1, "b");
        let r = handle(w.op(&mut b, |op| ProcessMsg::RequestCreate {
            op,
            tag: 9,
            imms: vec![],
            caps: vec![],
        }));
        let name = b"svc".to_vec();
        w.op(&mut b, |op| ProcessMsg::Publish {
            op,
            name: name.clone(),
            cap: r,
        })
        .unwrap();
        let at_a = handle(w.op(&mut a, |op| ProcessMsg::Lookup {
            op,
            name,
            wait_ms: 1000,
        }));
        assert_eq!(
            w.op(&mut a, |op| ProcessMsg::Invoke {
                op,
                cap: at_a,
                imms: vec![1, 2],
                caps: vec![],
            }),
            Ok(Reply::Done)
        );
        b.read(false);
        assert!(b
            .inbox
            .iter()
            .any(|m| matches!(m, ControllerMsg::Invocation { tag: 9, .. })));
        let t = w.nodes[0].traffic();
        assert!(t.peers[&2].frames_out > 0 && t.peers[&2].frames_in > 0);
        assert!(t.processes.frames_in > 0);
        // Heartbeats keep an idle link up.
        w.advance(Duration::from_secs(5));
        assert_eq!(w.nodes[0].controller().stats().peers, 1);
    }
}

#[test]
fn a_lost_link_is_redialled_with_backoff() {
    let mut w = World::new(2);
    w.settle();
    assert_eq!(w.nodes[0].stats().dialled, 1);
    // Node 2's end of the link breaks.
    w.break_link(1);
    assert_eq!(w.nodes[0].controller().stats().peers, 0);
    // Not at once: after the backoff.
    assert!(w.nodes[0].poll_dial(w.now).is_none());
    w.advance(Duration::from_millis(200));
    assert_eq!(w.nodes[0].stats().dialled, 2);
    assert_eq!(w.nodes[0].controller().stats().peers, 1);
    assert_eq!(w.nodes[1].controller().stats().peers, 1);
    // Failed dials back off exponentially up to the maximum.
    let mut cfg = NodeConfig::new(core(1, &[1, 2]));
    cfg.peers = vec![(NodeId(2), 1usize)];
    let mut n: TestNode = Node::new(cfg, Instant(0));
    let mut t = Instant(0);
    let mut gaps = Vec::new();
    let mut last = t;
    while gaps.len() < 8 {
        if let Some((peer, _)) = n.poll_dial(t) {
            gaps.push(elapsed(t, last));
            last = t;
            n.dial_failed(t, peer);
        }
        n.poll(t, &mut ());
        t = n.poll_timeout().expect("a re-dial is scheduled").max(t);
    }
    assert_eq!(gaps[1], Duration::from_millis(50));
    assert_eq!(gaps[2], Duration::from_millis(100));
    assert_eq!(*gaps.last().unwrap(), Duration::from_secs(1));
}

#[test]
fn a_stalled_peer_loses_its_link_and_gets_it_back() {
    let mut w = World::new(2);
    w.settle();
    assert_eq!(w.nodes[0].stats().dialled, 1);
    // Node 2 stalls (nothing polled) past the peer timeout (3 s): node 1
    // drops the link.
    w.paused[1] = true;
    w.advance(Duration::from_secs(5));
    assert_eq!(w.nodes[0].controller().stats().peers, 0);
    // Node 2 comes back: the link is dialled and authenticated again, and
    // no stale connection is left on either side.
    w.paused[1] = false;
    w.advance(Duration::from_secs(5));
    assert!(w.nodes[0].stats().dialled >= 2);
    for n in &w.nodes {
        assert_eq!(n.controller().stats().peers, 1);
        assert_eq!(
            n.stats().open,
            [0, 1, 0],
            "stale connections: {:?}",
            n.stats()
        );
    }
}

#[test]
fn traffic_of_closed_links_is_kept() {
    let mut w = World::new(2);
    w.settle();
    w.advance(Duration::from_secs(2));
    let before = w.nodes[0].traffic().peers[&2];
    assert!(before.frames_in > 0 && before.frames_out > 0);
    // The link breaks and is redialled: what crossed the old link still
    // counts, under the same peer.
    w.break_link(1);
    let closed = w.nodes[0].traffic().peers[&2];
    assert!(closed.frames_in >= before.frames_in && closed.bytes_out >= before.bytes_out);
    assert_eq!(w.nodes[0].traffic().peers.len(), 1);
    w.advance(Duration::from_secs(2));
    assert_eq!(w.nodes[0].stats().dialled, 2);
    let after = w.nodes[0].traffic().peers[&2];
    assert!(
        after.frames_in > closed.frames_in,
        "{after:?} vs {closed:?}"
    );
    // The accepting side accounts the same way.
    assert!(w.nodes[1].traffic().peers[&1].frames_in >= before.frames_out);
    // Process traffic survives its channel too.
    let mut p = w.attach(0, "p");
    let _ = w.op(&mut p, |op| ProcessMsg::MemoryCreate {
        op,
        addr: 0,
        len: 8,
        rights: Rights::READ,
    });
    p.ch.close(&mut ());
    w.settle();
    let t = w.nodes[0].traffic().processes;
    assert_eq!((t.frames_in, t.frames_out), (2, 2));
}

#[test]
fn finished_connections_linger_then_are_reset() {
    let mut w = World::new(1);
    // Rejected, and the other side neither reads nor closes.
    let mut bad = w.refused(0);
    // The rejection is flushed and the channel half-closed, not reset...
    w.advance(Duration::from_secs(1));
    assert_eq!(w.nodes[0].stats().open[0], 1, "reaped before the linger");
    // ...until the linger time (2 s) passes: then it is aborted.
    w.advance(Duration::from_millis(1100));
    assert_eq!(w.nodes[0].stats().open[0], 0);
    let mut sink = Vec::new();
    assert_eq!(
        bad.ch.recv(&mut (), &mut sink, 1 << 20),
        Err(TransportError::Reset)
    );
    // A client that reads and closes is reaped at once, well before.
    let mut polite = w.refused(0);
    assert!(polite.closed());
    assert!(matches!(
        polite.inbox.first(),
        Some(ControllerMsg::Rejected { .. })
    ));
    polite.ch.close(&mut ());
    w.settle();
    assert_eq!(w.nodes[0].stats().open[0], 0);
    assert!(w.nodes[0].poll_timeout().is_none_or(|t| t > w.now));
}

#[test]
fn a_process_that_does_not_read_is_dropped() {
    let mut cfg = NodeConfig::new(core(1, &[1]));
    cfg.max_queued_bytes = 16 * 1024;
    let mut w = World::with(vec![cfg]);
    // A channel that buffers little, read by nobody.
    let (mut p, _) = w.connect_with(0, ConnKind::Process, 4096);
    p.send(&ProcessMsg::Attach {
        name: b"p".to_vec(),
        token: process_token(&KEY, b"p"),
    });
    w.settle();
    for op in 0..2000 {
        p.send(&ProcessMsg::MemoryCreate {
            op,
            addr: 0,
            len: 8,
            rights: Rights::READ,
        });
        if op % 50 == 0 {
            w.settle();
        }
        if w.nodes[0].stats().stuck > 0 {
            break;
        }
    }
    w.settle();
    assert_eq!(w.nodes[0].stats().stuck, 1);
    w.advance(Duration::from_secs(3));
    assert_eq!(w.nodes[0].controller().stats().processes, 0);
    assert_eq!(w.nodes[0].stats().open[0], 0);
}

#[test]
fn message_channels_carry_processes_too() {
    let mut w = World::new(1);
    let (a, b) = MemoryChannel::pair(Framing::Message, 1 << 20);
    let mut c = w.attach_over(0, a, Box::new(b), "m");
    let r = w.op(&mut c, |op| ProcessMsg::MemoryCreate {
        op,
        addr: 0,
        len: 8,
        rights: Rights::READ_WRITE,
    });
    assert!(r.is_ok());
}

#[test]
fn shutdown_disconnects_everyone() {
    let mut w = World::new(2);
    w.settle();
    let mut p = w.attach(0, "p");
    let _m = handle(w.op(&mut p, |op| ProcessMsg::MemoryCreate {
        op,
        addr: 0,
        len: 8,
        rights: Rights::READ,
    }));
    let now = w.now;
    w.nodes[0].shutdown(now, &mut ());
    w.advance(Duration::from_secs(3));
    assert!(w.nodes[0].is_idle());
    assert_eq!(w.nodes[0].controller().stats().objects, 0);
    assert!(p.closed());
}

/// A process channel whose memory the node reaches directly: `len` bytes
/// registered at `base`.
struct DirectChannel {
    ch: MemoryChannel,
    mem: alloc::rc::Rc<core::cell::RefCell<Vec<u8>>>,
    base: u64,
    /// Where devices reach `base`, if they do.
    device: Option<u64>,
    /// Set when the node drops the channel.
    dropped: alloc::rc::Rc<core::cell::Cell<bool>>,
}

impl Drop for DirectChannel {
    fn drop(&mut self) {
        self.dropped.set(true);
    }
}

impl DirectChannel {
    fn window(&self, addr: u64, len: usize) -> Result<core::ops::Range<usize>, ErrorCode> {
        let start = addr.checked_sub(self.base).ok_or(ErrorCode::MemoryFault)? as usize;
        let end = start.checked_add(len).ok_or(ErrorCode::MemoryFault)?;
        if end > self.mem.borrow().len() {
            return Err(ErrorCode::MemoryFault);
        }
        Ok(start..end)
    }
}

impl fractos_transport::DirectMemory for DirectChannel {
    fn read(&mut self, _: &mut (), addr: u64, out: &mut [u8]) -> Result<(), ErrorCode> {
        let r = self.window(addr, out.len())?;
        out.copy_from_slice(&self.mem.borrow()[r]);
        Ok(())
    }
    fn write(&mut self, _: &mut (), addr: u64, data: &[u8]) -> Result<(), ErrorCode> {
        let r = self.window(addr, data.len())?;
        self.mem.borrow_mut()[r].copy_from_slice(data);
        Ok(())
    }
    fn device_address(&mut self, addr: u64, len: usize) -> Option<u64> {
        let r = self.window(addr, len).ok()?;
        Some(self.device? + r.start as u64)
    }
}

impl Channel for DirectChannel {
    fn framing(&self) -> Framing {
        Channel::<()>::framing(&self.ch)
    }
    fn send(
        &mut self,
        cx: &mut (),
        data: &[u8],
    ) -> Result<usize, fractos_transport::TransportError> {
        self.ch.send(cx, data)
    }
    fn recv(
        &mut self,
        cx: &mut (),
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<fractos_transport::Received, fractos_transport::TransportError> {
        self.ch.recv(cx, out, max)
    }
    fn close(&mut self, cx: &mut ()) {
        self.ch.close(cx)
    }
    fn abort(&mut self, cx: &mut ()) {
        self.ch.abort(cx)
    }
    fn is_finished(&self, cx: &mut ()) -> bool {
        self.ch.is_finished(cx)
    }
    fn direct_memory(&mut self) -> Option<&mut dyn fractos_transport::DirectMemory> {
        Some(self)
    }
}

#[test]
fn directly_reachable_memory_is_copied_by_the_node_without_messages() {
    let mut w = World::new(1);
    let (a, b) = MemoryChannel::pair(Framing::Stream, 1 << 20);
    let base = 0x10_0000;
    let len = 1 << 20;
    let mem = alloc::rc::Rc::new(core::cell::RefCell::new(
        (0..len).map(|i| (i % 253) as u8).collect::<Vec<u8>>(),
    ));
    let direct = DirectChannel {
        ch: b,
        mem: mem.clone(),
        base,
        device: None,
        dropped: Default::default(),
    };
    let mut c = w.attach_over(0, a, Box::new(direct), "d");
    let half = len as u64 / 2;
    let mut create = |w: &mut World, addr: u64, rights| {
        handle(w.op(&mut c, |op| ProcessMsg::MemoryCreate {
            op,
            addr,
            len: half,
            rights,
        }))
    };
    let src = create(&mut w, base, Rights::READ);
    let dst = create(&mut w, base + half, Rights::WRITE);
    let outside = create(&mut w, base + 4 * half, Rights::READ);
    let r = w.op(&mut c, |op| ProcessMsg::Copy {
        op,
        src,
        dst,
        completion: None,
    });
    assert!(r.is_ok(), "{r:?}");
    {
        let m = mem.borrow();
        let (lo, hi) = m.split_at(half as usize);
        assert!(lo == hi, "the destination holds the source's bytes");
    }
    assert!(
        !c.inbox.iter().any(|m| matches!(
            m,
            ControllerMsg::MemRead { .. } | ControllerMsg::MemWrite { .. }
        )),
        "no memory messages reach a directly served process"
    );
    let s = w.nodes[0].stats();
    assert_eq!(s.direct_read_bytes, half);
    assert_eq!(s.direct_write_bytes, half);
    assert_eq!(s.direct_faults, 0);

    // A window outside every region the channel reaches fails the copy
    // with a fault and touches nothing.
    mem.borrow_mut()[half as usize..].fill(0xEE);
    let r = w.op(&mut c, |op| ProcessMsg::Copy {
        op,
        src: outside,
        dst,
        completion: None,
    });
    assert_eq!(r, Err(ErrorCode::MemoryFault));
    assert!(mem.borrow()[half as usize..].iter().all(|&b| b == 0xEE));
    assert!(w.nodes[0].stats().direct_faults >= 1);
    assert!(w.nodes[0]
        .metrics_text()
        .contains("fractos_node_direct_memory_bytes_total{node=\"1\",op=\"read\"} 524288"));
}

#[test]
fn uptime_counts_from_the_nodes_start() {
    let mut w = World::new(1);
    let uptime = |w: &World| -> f64 {
        let text = w.nodes[0].metrics_text();
        text.lines()
            .find_map(|l| l.strip_prefix("fractos_uptime_seconds{node=\"1\"} "))
            .unwrap_or_else(|| panic!("no uptime in {text}"))
            .parse()
            .unwrap()
    };
    assert_eq!(uptime(&w), 0.0);
    w.advance(Duration::from_millis(2500));
    assert!((uptime(&w) - 2.5).abs() < 1e-9, "{}", uptime(&w));
}

/// A device write into a directly reached process's memory: granted at
/// the device address of the capability's window, refused where devices
/// cannot reach; the owner's channel (its memory) is kept after the owner
/// leaves until the grant ends, which then reports `Revoked`.
#[test]
fn device_writes_keep_the_owners_memory_until_they_end() {
    let mut w = World::new(1);
    let (a, b) = MemoryChannel::pair(Framing::Stream, 1 << 20);
    let base = 0x10_0000;
    let mem = alloc::rc::Rc::new(core::cell::RefCell::new(vec![0u8; 1 << 16]));
    let dropped = alloc::rc::Rc::new(core::cell::Cell::new(false));
    let direct = DirectChannel {
        ch: b,
        mem,
        base,
        device: Some(0xd000_0000),
        dropped: dropped.clone(),
    };
    let mut d = w.attach_over(0, a, Box::new(direct), "d");
    let (c_end, s_end) = MemoryChannel::pair(Framing::Stream, 1 << 20);
    let now = w.now;
    let holder = w.nodes[0].add(now, ConnKind::Process, Box::new(s_end));
    let mut h = w.attach_client(Client::new(c_end), "h");
    let cap = handle(w.op(&mut d, |op| ProcessMsg::MemoryCreate {
        op,
        addr: base + 4096,
        len: 8192,
        rights: Rights::READ_WRITE,
    }));
    assert!(w
        .op(&mut d, |op| ProcessMsg::Publish {
            op,
            name: b"m".to_vec(),
            cap,
        })
        .is_ok());
    let got = handle(w.op(&mut h, |op| ProcessMsg::Lookup {
        op,
        name: b"m".to_vec(),
        wait_ms: 0,
    }));
    let now = w.now;
    let node = &mut w.nodes[0];
    assert_eq!(
        node.device_write_begin(now, holder, got, 8193),
        Err(ErrorCode::SizeMismatch)
    );
    let g = node.device_write_begin(now, holder, got, 8192).unwrap();
    assert_eq!(g.address, 0xd000_1000);
    assert!(node.device_write_valid(g.id));
    assert_eq!(node.device_write_end(now, g.id, true), Ok(()));
    assert_eq!(
        node.device_write_end(now, g.id, true),
        Err(ErrorCode::InvalidArgument)
    );
    assert_eq!(node.stats().device_write_bytes, 8192);

    // The owner leaves with a grant outstanding: its channel stays.
    let g = node.device_write_begin(now, holder, got, 4096).unwrap();
    d.ch.close(&mut ());
    drop(d);
    w.advance(Duration::from_secs(5));
    assert!(!dropped.get(), "the channel went while a device may write");
    let now = w.now;
    assert!(!w.nodes[0].device_write_valid(g.id));
    assert_eq!(
        w.nodes[0].device_write_end(now, g.id, true),
        Err(ErrorCode::Revoked)
    );
    w.advance(Duration::from_secs(5));
    assert!(dropped.get(), "released once the grant ended");
    // Memory the node does not reach directly is refused.
    let mut p = w.attach(0, "plain");
    let cap = handle(w.op(&mut p, |op| ProcessMsg::MemoryCreate {
        op,
        addr: 0,
        len: 64,
        rights: Rights::WRITE,
    }));
    assert!(w
        .op(&mut p, |op| ProcessMsg::Publish {
            op,
            name: b"p".to_vec(),
            cap,
        })
        .is_ok());
    let got = handle(w.op(&mut h, |op| ProcessMsg::Lookup {
        op,
        name: b"p".to_vec(),
        wait_ms: 0,
    }));
    let now = w.now;
    assert_eq!(
        w.nodes[0].device_write_begin(now, holder, got, 64),
        Err(ErrorCode::InvalidArgument)
    );
}
