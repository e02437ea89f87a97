//! Minimal replays of the core bugs the simulator found, driven by hand
//! (two controllers, frames pumped in order, no randomness).

use std::collections::BTreeMap;

use std::time::Duration;

use fractos_core::{
    process_token, ChannelId, Config, Controller, Dest, Gossip, Instant, LinkId, LinkRole, Output,
};
use fractos_wire::{frame_body, ControllerMsg, Handle, NodeId, ProcessMsg, Reply, Rights};

const KEY: [u8; 32] = [7; 32];

struct Pair {
    c: [Controller; 2],
    /// Live link endpoints: endpoint -> (controller index, far endpoint).
    links: BTreeMap<LinkId, (usize, LinkId)>,
    next_link: u64,
    /// Frames for processes, by channel.
    inbox: BTreeMap<ChannelId, Vec<ControllerMsg>>,
    now: Instant,
}

impl Pair {
    fn new() -> Pair {
        Pair::with(None)
    }

    /// Two controllers with gossip membership and links on demand.
    fn gossip(link_idle: Duration) -> Pair {
        Pair::with(Some(Gossip {
            link_idle,
            // Probes use the link: none within the test.
            protocol_period: Duration::from_secs(600),
            ..Gossip::default()
        }))
    }

    fn with(gossip: Option<Gossip>) -> Pair {
        let mk = |i: u32| {
            let mut cfg = Config::new(NodeId(i), 1, KEY);
            cfg.members = vec![NodeId(1), NodeId(2)];
            cfg.gossip = gossip.clone();
            Controller::new(cfg, Instant(0))
        };
        let mut p = Pair {
            c: [mk(1), mk(2)],
            links: BTreeMap::new(),
            next_link: 1,
            inbox: BTreeMap::new(),
            now: Instant(1),
        };
        p.connect();
        p
    }

    fn connect(&mut self) {
        let (a, b) = (LinkId(self.next_link), LinkId(self.next_link + 1));
        self.next_link += 2;
        self.links.insert(a, (0, b));
        self.links.insert(b, (1, a));
        self.c[0].link_connected(self.now, a, LinkRole::Initiator { peer: NodeId(2) });
        self.c[1].link_connected(self.now, b, LinkRole::Responder);
        self.pump();
    }

    /// Delivers every output until nothing moves.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            for i in 0..2 {
                while let Some(out) = self.c[i].poll_output() {
                    moved = true;
                    match out {
                        Output::Send {
                            to: Dest::Link(l),
                            frame,
                        } => {
                            let Some(&(_, far)) = self.links.get(&l) else {
                                continue; // a dead link: the frame is lost
                            };
                            let (j, _) = self.links[&far];
                            let body = frame_body(&frame, usize::MAX).unwrap().to_vec();
                            self.c[j].link_message(self.now, far, &body);
                        }
                        Output::Send {
                            to: Dest::Process(ch),
                            frame,
                        } => {
                            let body = frame_body(&frame, usize::MAX).unwrap();
                            let msg = ControllerMsg::decode(body).unwrap();
                            self.inbox.entry(ch).or_default().push(msg);
                        }
                        Output::Close {
                            to: Dest::Link(l), ..
                        } => {
                            if let Some((_, far)) = self.links.remove(&l) {
                                let (j, _) = self.links.remove(&far).unwrap();
                                self.c[j].link_disconnected(self.now, far);
                            }
                        }
                        Output::Close { .. } | Output::Connect { .. } => {}
                    }
                }
            }
            if !moved {
                break;
            }
        }
    }

    /// Breaks the link so that only controller `aware` notices (a lost RST):
    /// the other keeps a half-open link.
    fn break_half_open(&mut self, aware: usize) {
        let ends: Vec<(LinkId, usize)> = self.links.iter().map(|(l, (i, _))| (*l, *i)).collect();
        self.links.clear();
        for (l, i) in ends {
            if i == aware {
                self.c[i].link_disconnected(self.now, l);
            }
        }
        self.pump();
    }

    fn attach(&mut self, i: usize, chan: u64, name: &str) -> ChannelId {
        let ch = ChannelId(chan);
        self.c[i].process_connected(self.now, ch);
        self.send(
            i,
            ch,
            ProcessMsg::Attach {
                name: name.as_bytes().to_vec(),
                token: process_token(&KEY, name.as_bytes()),
            },
        );
        assert!(matches!(
            self.inbox[&ch][..],
            [ControllerMsg::Attached { .. }]
        ));
        ch
    }

    fn send(&mut self, i: usize, ch: ChannelId, msg: ProcessMsg) {
        let mut frame = Vec::new();
        msg.encode(&mut frame);
        self.c[i].process_message(self.now, ch, frame_body(&frame, usize::MAX).unwrap());
        self.pump();
    }

    /// The answer to `op` on `ch`.
    fn answer(&self, ch: ChannelId, op: u64) -> Result<Reply, fractos_wire::ErrorCode> {
        self.inbox[&ch]
            .iter()
            .find_map(|m| match m {
                ControllerMsg::Completion { op: o, result } if *o == op => Some(*result),
                _ => None,
            })
            .unwrap_or_else(|| panic!("op {op} of {ch:?} unanswered"))
    }

    fn names(&self) -> [usize; 2] {
        [self.c[0].stats().names, self.c[1].stats().names]
    }
}

fn handle(r: Result<Reply, fractos_wire::ErrorCode>) -> Handle {
    match r {
        Ok(Reply::Cap { handle, .. }) => handle,
        other => panic!("expected a capability, got {other:?}"),
    }
}

/// A name homed at controller `home` (names are homed by hash): found by
/// publishing candidates from a throwaway process, which then exits.
fn name_homed_at(p: &mut Pair, home: usize) -> Vec<u8> {
    let ch = p.attach(0, 999, "probe");
    p.send(
        0,
        ch,
        ProcessMsg::RequestCreate {
            op: 1,
            tag: 0,
            imms: vec![],
            caps: vec![],
        },
    );
    let req = handle(p.answer(ch, 1));
    let mut found = None;
    for i in 0..64u64 {
        let name = format!("n{i}").into_bytes();
        let before = p.names();
        p.send(
            0,
            ch,
            ProcessMsg::Publish {
                op: 2 + i,
                name: name.clone(),
                cap: req,
            },
        );
        if p.names()[home] > before[home] {
            found = Some(name);
            break;
        }
    }
    p.c[0].process_disconnected(p.now, ch);
    p.pump();
    found.expect("some name is homed there")
}

/// Attaches a process to controller `i` that publishes a request
/// capability of its own under `name` (ops 1 and 2).
fn publish_from(p: &mut Pair, i: usize, name: Vec<u8>) -> ChannelId {
    let ch = p.attach(i, 1, "publisher");
    p.send(
        i,
        ch,
        ProcessMsg::RequestCreate {
            op: 1,
            tag: 9,
            imms: vec![],
            caps: vec![],
        },
    );
    let req = handle(p.answer(ch, 1));
    p.send(
        i,
        ch,
        ProcessMsg::Publish {
            op: 2,
            name,
            cap: req,
        },
    );
    assert_eq!(p.answer(ch, 2), Ok(Reply::Done));
    ch
}

/// Bug 1: a link broke but only controller 1 noticed; it re-dialled and the
/// other controller kept the old session's state, so a withdrawal lost with
/// the old connection was never compensated and the name leaked.
#[test]
fn half_open_link_does_not_leak_names() {
    let mut p = Pair::new();
    let name = name_homed_at(&mut p, 1);
    assert_eq!(p.names(), [0, 0]);
    let ch = publish_from(&mut p, 0, name);
    assert_eq!(p.names(), [0, 1], "the name is homed at controller 2");
    // Controller 1 sees the link die; controller 2 does not.
    p.break_half_open(0);
    // The publisher exits: its withdrawal cannot reach controller 2.
    p.c[0].process_disconnected(p.now, ch);
    p.pump();
    // Controller 1 re-dials; controller 2 must drop the old session.
    p.connect();
    assert_eq!(
        p.names(),
        [0, 0],
        "the dead publisher's name leaked at its home"
    );
    assert_eq!(p.c[1].stats().caps, 0);
}

/// Bug 2: an Unpublish overtook a Publish still acquiring its (remote)
/// capability; the process then forgot the name, so its exit did not
/// withdraw the name published a moment later.
#[test]
fn publish_landing_after_unpublish_is_withdrawn_at_exit() {
    let mut p = Pair::new();
    let local = name_homed_at(&mut p, 0);
    // A capability owned by controller 2, held by a process on controller 1.
    let owner = p.attach(1, 2, "owner");
    p.send(
        1,
        owner,
        ProcessMsg::MemoryCreate {
            op: 1,
            addr: 0,
            len: 64,
            rights: Rights::READ,
        },
    );
    let mem = handle(p.answer(owner, 1));
    let shared = b"shared".to_vec();
    p.send(
        1,
        owner,
        ProcessMsg::Publish {
            op: 2,
            name: shared.clone(),
            cap: mem,
        },
    );
    assert_eq!(p.answer(owner, 2), Ok(Reply::Done));
    let user = p.attach(0, 3, "user");
    p.send(
        0,
        user,
        ProcessMsg::Lookup {
            op: 1,
            name: shared,
            wait_ms: 0,
        },
    );
    let remote = handle(p.answer(user, 1));
    // Publish the remote capability under a name homed locally, and
    // unpublish it before the acquisition round trip completes.
    let mut frames = Vec::new();
    for msg in [
        ProcessMsg::Publish {
            op: 2,
            name: local.clone(),
            cap: remote,
        },
        ProcessMsg::Unpublish {
            op: 3,
            name: local.clone(),
        },
    ] {
        let mut f = Vec::new();
        msg.encode(&mut f);
        frames.push(f);
    }
    for f in &frames {
        p.c[0].process_message(p.now, user, frame_body(f, usize::MAX).unwrap());
    }
    p.pump();
    assert_eq!(
        p.answer(user, 3),
        Err(fractos_wire::ErrorCode::NameNotFound)
    );
    assert_eq!(
        p.answer(user, 2),
        Ok(Reply::Done),
        "the publish landed after the unpublish"
    );
    p.c[0].process_disconnected(p.now, user);
    p.c[1].process_disconnected(p.now, owner);
    p.pump();
    assert_eq!(p.names(), [0, 0], "the name outlived its publisher");
}

/// Seed 16613 (gossip): both sides proposed closing the idle link at the
/// same heartbeat; the higher id then withdrew its proposal by sending (its
/// publisher exited: withdraw the name) before the lower id's proposal
/// arrived. The lower id closed the link on the higher id's proposal, losing
/// the withdrawal with it; the higher id saw a link it no longer agreed to
/// close break and dropped the lower id's state, while the lower id (closed
/// by agreement) kept the name published by the dead process.
#[test]
fn crossed_idle_close_proposals_do_not_lose_frames_sent_after_them() {
    let idle = Duration::from_secs(2);
    let mut p = Pair::gossip(idle);
    // Homed at controller 1 (the lower id), published from controller 2.
    let name = name_homed_at(&mut p, 0);
    let ch = publish_from(&mut p, 1, name);
    assert_eq!(p.names(), [1, 0], "the name is homed at controller 1");
    // Keep the membership going (probes answered) until just before the
    // heartbeat at which both sides find the link idle.
    let step = Duration::from_millis(100).as_nanos() as u64;
    // The link was last used at 1 ns; heartbeats (which close idle links)
    // fall on multiples of 500 ms, handled at the first step after them.
    let propose_at = 1 + idle.as_nanos() as u64;
    while p.now.0 + step < propose_at {
        p.now = Instant(p.now.0 + step);
        for i in 0..2 {
            p.c[i].handle_timeout(p.now);
        }
        p.pump();
    }
    assert_eq!(p.links.len(), 2, "the link is still up before it is idle");
    // Both propose at once (neither proposal delivered yet); then the
    // publisher on controller 2 exits, which sends the withdrawal.
    p.now = Instant(propose_at);
    for i in 0..2 {
        p.c[i].handle_timeout(p.now);
    }
    p.c[1].process_disconnected(p.now, ch);
    p.pump();
    assert_eq!(p.names(), [0, 0], "the exited publisher's name leaked");
    assert_eq!(p.c[0].stats().caps, 0);
}
