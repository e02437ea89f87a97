//! The stateful controller-core target: a small cluster driven step by
//! step by fuzz input. See [`core_cluster`].

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use arbitrary::{Result, Unstructured};
use fractos_core::{
    process_token, ChannelId, Config, Controller, Dest, Instant, Limits, LinkId, LinkRole, Output,
    Stats,
};
use fractos_wire::{
    frame_body, ControllerMsg, ErrorCode, NodeId, PeerMsg, PeerReply, PeerRequest, PeerSecurity,
    ProcessMsg, Reply, FRAME_HEADER_LEN, MAX_FRAME_LEN,
};

use crate::crypto::{self, Part, Session};
use crate::gen::{self, PeerCtx};

/// The cluster key every controller (and the fake peer) holds.
const KEY: [u8; 32] = [0x5a; 32];
/// Registered memory of each process.
const MEM: usize = 1024;
/// Steps taken from one input at most.
const MAX_STEPS: usize = 200;
/// Processes and links opened by one input at most.
const MAX_PROCS: usize = 10;
const MAX_CONNS: usize = 20;
/// Structured operations use ids from here up, so that raw frames (which
/// carry arbitrary ids) practically never collide with them.
const OP_BASE: u64 = 0x0f00_0000_0000_0000;
/// Incarnation of the fake peer.
const FAKE_INCARNATION: u64 = 7;
/// Deliveries or timer rounds after which the cluster is considered stuck
/// in a loop (a liveness bug of the core).
const LOOP_LIMIT: usize = 200_000;

/// What one run of [`core_cluster`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClusterReport {
    /// Steps decoded from the input.
    pub steps: usize,
    /// Frames delivered to controllers on peer links.
    pub peer_frames: u64,
    /// Frames delivered to controllers from processes.
    pub process_frames: u64,
    /// Operation completions received by processes.
    pub completions: u64,
    /// Handshakes the fake keyed peer completed.
    pub fake_handshakes: u64,
    /// Sealed frames the fake keyed peer sent after a handshake.
    pub fake_sealed_frames: u64,
}

/// Runs one fuzz input against a cluster of two or three controllers plus
/// a fake *keyed* peer controller played by the driver.
///
/// The input is decoded with [`arbitrary::Unstructured`] into up to 200
/// steps:
///
/// * process channels opened, attached (right or wrong token), closed;
/// * well-formed process operations on handles the process holds (or
///   not), and raw frame bodies;
/// * memory requests (`MemRead`/`MemWrite`) answered at once, late, with
///   the wrong size, with an error, for the wrong transfer, twice, or never;
/// * peer frames delivered in order per link but interleaved across links
///   as the input chooses; frames dropped, duplicated, bit-flipped,
///   truncated or replayed from anything controllers sent before; raw bytes
///   injected on links;
/// * links opened (three-message handshake, sometimes naming the wrong
///   peer), closed on both sides, on one side with the other told later,
///   or half-open;
/// * a fake peer controller that knows the cluster key completes real
///   handshakes (claiming its own node id or a real controller's) and then
///   sends sealed, arbitrary but plausible peer messages: requests on
///   capability references it saw, replies to the real controllers'
///   requests, copy chunks and acks on copy ids it saw;
/// * time advanced, firing every timer in order, with or without delivering
///   frames in between.
///
/// After every step, and after every timer round, every controller's
/// `check_invariants` must pass; controllers must only send decodable
/// frames to processes, well-framed frames on links, and nothing to a
/// channel or link they were told is gone; every structured operation is
/// completed at most once. At the end the input's processes are answered
/// and given time: every operation of a process still attached must have
/// completed (lookups waiting longer than the drain excepted). Then all
/// processes exit, all links close, time passes, and every controller must
/// be empty (no objects, capabilities, names, calls, copies, monitors or
/// pending operations left).
///
/// Panics on any violation: that is the finding.
pub fn core_cluster(data: &[u8]) -> ClusterReport {
    run(data, false)
}

/// [`core_cluster`] with a *hostile* keyed peer: its messages may also
/// hand a controller references to that controller's own capability
/// nodes where the protocol says the receiver already holds them (invoke
/// arguments, bound arguments, notify requests, published capabilities,
/// returned capabilities). The core trusts peers there, so this target
/// finds the known node-stealing issue quickly (README.md, "Findings"); it
/// is for checking a fix, and is not run in CI.
pub fn core_cluster_hostile(data: &[u8]) -> ClusterReport {
    run(data, true)
}

fn run(data: &[u8], hostile: bool) -> ClusterReport {
    let mut u = Unstructured::new(data);
    let mut world = World::new(&mut u).unwrap_or_else(|_| World::default_cluster());
    world.hostile = hostile;
    while world.report.steps < MAX_STEPS && !u.is_empty() {
        world.report.steps += 1;
        if world.step(&mut u).is_err() {
            break;
        }
        world.collect();
        world.check();
    }
    world.finish();
    world.report
}

/// Which party holds one end of a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Party {
    Real(usize),
    Fake,
}

/// The fake peer's handshake state on one link.
enum FakeState {
    AwaitHello,
    HelloSent {
        nonce: [u8; 32],
        claim: NodeId,
    },
    ReplySent {
        transcript: [u8; 32],
        security: PeerSecurity,
    },
    Up(Session),
}

/// A link between a real controller (end 0) and a real controller or the
/// fake peer (end 1). Both real ends know it as the same `LinkId`.
struct Conn {
    ends: [Party; 2],
    open: [bool; 2],
    link: LinkId,
    fake: Option<FakeState>,
    /// The fake peer proves itself correctly.
    honest: bool,
}

/// A frame body in flight to end `to` of `conn`; `None` is the transport
/// telling that end the other side closed.
struct Packet {
    conn: usize,
    to: usize,
    body: Option<Vec<u8>>,
}

struct Proc {
    node: usize,
    chan: ChannelId,
    mem: Vec<u8>,
    open: bool,
    attached: bool,
    known: Vec<u32>,
    parked: VecDeque<ControllerMsg>,
    auto_serve: bool,
    next_op: u64,
    /// Structured operations sent, and how long each may legitimately wait
    /// (a lookup's `wait_ms`).
    issued: Vec<(u64, u32)>,
    completed: BTreeSet<u64>,
    /// Raw frames may carry any op id: completion accounting is off.
    raw_sent: bool,
}

struct World {
    ctrls: Vec<Controller>,
    procs: Vec<Proc>,
    conns: Vec<Conn>,
    queue: VecDeque<Packet>,
    /// Peer frame bodies controllers sent, for replays.
    history: VecDeque<Vec<u8>>,
    now: Instant,
    next_chan: u64,
    next_link: u64,
    fake_node: NodeId,
    fake_nonces: u64,
    fake_req: u64,
    ctx: PeerCtx,
    report: ClusterReport,
    /// Print every step (`FRACTOS_FUZZ_TRACE`), to explain a finding.
    trace: bool,
    /// See [`core_cluster_hostile`].
    hostile: bool,
}

fn config(node: usize, members: &[NodeId], security: PeerSecurity, chunk: usize) -> Config {
    let mut c = Config::new(NodeId(node as u32 + 1), 1, KEY);
    c.members = members.to_vec();
    c.limits = Limits {
        max_caps_per_process: 48,
        max_pending_per_process: 8,
        max_processes: 4,
        max_monitors_per_process: 4,
        max_names_per_process: 3,
        ..Limits::default()
    };
    c.copy_chunk = chunk;
    c.copy_window = 2;
    c.rng_seed = [node as u8; 32];
    c.peer_security = security;
    c
}

impl World {
    fn with(n: usize, security: &[PeerSecurity], chunk: usize) -> World {
        let fake_node = NodeId(n as u32 + 1);
        let members: Vec<NodeId> = (1..=n as u32 + 1).map(NodeId).collect();
        let now = Instant(1_000_000_000);
        let ctrls = (0..n)
            .map(|i| Controller::new(config(i, &members, security[i], chunk), now))
            .collect();
        let mut w = World {
            ctrls,
            procs: Vec::new(),
            conns: Vec::new(),
            queue: VecDeque::new(),
            history: VecDeque::new(),
            now,
            next_chan: 1,
            next_link: 1,
            fake_node,
            fake_nonces: 0,
            fake_req: 1,
            ctx: PeerCtx {
                nodes: members,
                fake: Some(fake_node),
                receiver: None,
                ..PeerCtx::default()
            },
            report: ClusterReport::default(),
            trace: std::env::var_os("FRACTOS_FUZZ_TRACE").is_some(),
            hostile: false,
        };
        for i in 0..n {
            for j in i + 1..n {
                w.connect_real(i, j, NodeId(j as u32 + 1));
            }
        }
        w.settle();
        for node in 0..n.min(2) {
            let p = w.open_proc(node);
            w.attach(p, format!("p{node}").as_bytes(), true);
        }
        w.settle();
        w.check();
        w
    }

    fn default_cluster() -> World {
        Self::with(2, &[PeerSecurity::Authenticated; 2], 64)
    }

    fn new(u: &mut Unstructured) -> Result<World> {
        let n = u.int_in_range(2..=3)?;
        let security = [gen::security(u)?, gen::security(u)?, gen::security(u)?];
        let chunk = *u.choose(&[16usize, 64, 300])?;
        Ok(Self::with(n, &security, chunk))
    }

    // ---------------------------------------------------------- plumbing

    fn trace(&self, what: impl FnOnce() -> String) {
        if self.trace {
            let line: String = what().chars().take(400).collect();
            eprintln!("[t={}ms] {line}", self.now.0 / 1_000_000);
        }
    }

    fn check(&self) {
        for (i, c) in self.ctrls.iter().enumerate() {
            if let Err(e) = c.check_invariants() {
                panic!("controller {i}: invariant violated: {e}");
            }
        }
    }

    /// Takes every output of every controller until none has any, answering
    /// memory requests of auto-serving processes on the way.
    fn collect(&mut self) {
        let mut rounds = 0;
        loop {
            let mut any = false;
            for i in 0..self.ctrls.len() {
                while let Some(out) = self.ctrls[i].poll_output() {
                    any = true;
                    self.output(i, out);
                }
            }
            if !any {
                break;
            }
            rounds += 1;
            assert!(rounds < LOOP_LIMIT, "controllers keep producing output");
        }
    }

    fn output(&mut self, i: usize, out: Output) {
        match out {
            Output::Send {
                to: Dest::Process(chan),
                frame,
            } => {
                let p = self
                    .proc_of(i, chan)
                    .unwrap_or_else(|| panic!("controller {i} sent to a closed channel {chan:?}"));
                let body = frame_body(&frame, MAX_FRAME_LEN)
                    .unwrap_or_else(|e| panic!("controller {i} sent a bad process frame: {e:?}"));
                let msg = ControllerMsg::decode(body).unwrap_or_else(|e| {
                    panic!("controller {i} sent an undecodable process message: {e:?}")
                });
                self.trace(|| format!("ctrl {i} -> proc {p}: {msg:?}"));
                self.on_process_msg(p, msg);
            }
            Output::Send {
                to: Dest::Link(link),
                frame,
            } => {
                let (c, side) = self
                    .conn_of(i, link)
                    .unwrap_or_else(|| panic!("controller {i} sent on a closed link {link:?}"));
                let body = frame_body(&frame, MAX_FRAME_LEN + 64)
                    .unwrap_or_else(|e| panic!("controller {i} sent a bad peer frame: {e:?}"))
                    .to_vec();
                if self.history.len() >= 32 {
                    self.history.pop_front();
                }
                self.history.push_back(body.clone());
                self.queue.push_back(Packet {
                    conn: c,
                    to: 1 - side,
                    body: Some(body),
                });
            }
            Output::Close {
                to: Dest::Process(chan),
                ..
            } => {
                let p = self
                    .proc_of(i, chan)
                    .unwrap_or_else(|| panic!("controller {i} closed a closed channel {chan:?}"));
                self.trace(|| format!("ctrl {i} closes proc {p}"));
                self.procs[p].open = false;
            }
            Output::Close {
                to: Dest::Link(link),
                ..
            } => {
                let (c, side) = self
                    .conn_of(i, link)
                    .unwrap_or_else(|| panic!("controller {i} closed a closed link {link:?}"));
                self.trace(|| format!("ctrl {i} closes conn {c}"));
                self.conns[c].open[side] = false;
                self.queue.push_back(Packet {
                    conn: c,
                    to: 1 - side,
                    body: None,
                });
            }
            // Gossip is off: the fuzzed cluster is a fixed mesh.
            Output::Connect { .. } => {}
        }
    }

    fn proc_of(&self, node: usize, chan: ChannelId) -> Option<usize> {
        self.procs
            .iter()
            .position(|p| p.node == node && p.chan == chan && p.open)
    }

    fn conn_of(&self, node: usize, link: LinkId) -> Option<(usize, usize)> {
        self.conns.iter().enumerate().find_map(|(c, conn)| {
            (0..2)
                .find(|&s| conn.link == link && conn.ends[s] == Party::Real(node) && conn.open[s])
                .map(|s| (c, s))
        })
    }

    fn on_process_msg(&mut self, p: usize, msg: ControllerMsg) {
        match msg {
            ControllerMsg::Attached { .. } => self.procs[p].attached = true,
            ControllerMsg::Rejected { .. } => {}
            ControllerMsg::Completion { op, result } => {
                self.report.completions += 1;
                let proc = &mut self.procs[p];
                if !proc.raw_sent && proc.issued.iter().any(|&(o, _)| o == op) {
                    assert!(proc.completed.insert(op), "op {op:#x} completed twice");
                }
                if let Ok(Reply::Cap { handle, .. }) = result {
                    proc.known.push(handle.0);
                }
            }
            ControllerMsg::Invocation { caps, .. } => {
                self.procs[p].known.extend(caps.iter().map(|(h, _)| h.0));
            }
            m @ (ControllerMsg::MemRead { .. } | ControllerMsg::MemWrite { .. }) => {
                if self.procs[p].auto_serve {
                    self.serve(p, &m, 0, 0);
                } else {
                    self.procs[p].parked.push_back(m);
                }
            }
        }
    }

    /// Answers a memory request: `mode` 0 correctly, 1 with the wrong
    /// size, 2 with an error, 3 for the wrong transfer, 4 twice.
    fn serve(&mut self, p: usize, m: &ControllerMsg, mode: u8, arg: u8) {
        let proc = &mut self.procs[p];
        let reply = match m {
            ControllerMsg::MemRead { xfer, addr, len } => {
                let range = usize::try_from(*addr)
                    .ok()
                    .and_then(|a| a.checked_add(*len as usize).map(|e| a..e));
                let mut result = range
                    .and_then(|r| proc.mem.get(r))
                    .map(|s| s.to_vec())
                    .ok_or(ErrorCode::MemoryFault);
                if mode == 1 {
                    if let Ok(data) = &mut result {
                        if arg & 1 == 0 || data.is_empty() {
                            data.push(arg);
                        } else {
                            data.truncate(usize::from(arg) % data.len());
                        }
                    }
                }
                ProcessMsg::MemReadReply {
                    xfer: *xfer,
                    result,
                }
            }
            ControllerMsg::MemWrite { xfer, addr, data } => {
                let range = usize::try_from(*addr)
                    .ok()
                    .and_then(|a| a.checked_add(data.len()).map(|e| a..e));
                let result = match range.and_then(|r| proc.mem.get_mut(r)) {
                    Some(s) => {
                        s.copy_from_slice(data);
                        Ok(())
                    }
                    None => Err(ErrorCode::MemoryFault),
                };
                ProcessMsg::MemWriteReply {
                    xfer: *xfer,
                    result,
                }
            }
            _ => return,
        };
        let reply = match (mode, reply) {
            (2, ProcessMsg::MemReadReply { xfer, .. }) => ProcessMsg::MemReadReply {
                xfer,
                result: Err(ErrorCode::ALL[usize::from(arg) % ErrorCode::ALL.len()]),
            },
            (2, ProcessMsg::MemWriteReply { xfer, .. }) => ProcessMsg::MemWriteReply {
                xfer,
                result: Err(ErrorCode::ALL[usize::from(arg) % ErrorCode::ALL.len()]),
            },
            (3, ProcessMsg::MemReadReply { xfer, result }) => ProcessMsg::MemReadReply {
                xfer: xfer ^ u64::from(arg | 1),
                result,
            },
            (3, ProcessMsg::MemWriteReply { xfer, result }) => ProcessMsg::MemWriteReply {
                xfer: xfer ^ u64::from(arg | 1),
                result,
            },
            (_, r) => r,
        };
        self.send_process(p, &reply);
        if mode == 4 {
            self.send_process(p, &reply);
        }
    }

    fn send_process(&mut self, p: usize, msg: &ProcessMsg) {
        self.trace(|| format!("proc {p} -> ctrl {}: {msg:?}", self.procs[p].node));
        let mut frame = Vec::new();
        msg.encode(&mut frame);
        self.send_process_raw(p, &frame[FRAME_HEADER_LEN..]);
    }

    fn send_process_raw(&mut self, p: usize, body: &[u8]) {
        let (node, chan) = (self.procs[p].node, self.procs[p].chan);
        if !self.procs[p].open {
            return;
        }
        self.report.process_frames += 1;
        self.ctrls[node].process_message(self.now, chan, body);
    }

    fn open_proc(&mut self, node: usize) -> usize {
        let chan = ChannelId(self.next_chan);
        self.next_chan += 1;
        self.ctrls[node].process_connected(self.now, chan);
        self.procs.push(Proc {
            node,
            chan,
            mem: (0..MEM).map(|i| (i * 7 + node) as u8).collect(),
            open: true,
            attached: false,
            known: Vec::new(),
            parked: VecDeque::new(),
            auto_serve: true,
            next_op: OP_BASE,
            issued: Vec::new(),
            completed: BTreeSet::new(),
            raw_sent: false,
        });
        self.collect();
        self.procs.len() - 1
    }

    fn attach(&mut self, p: usize, name: &[u8], good: bool) {
        let mut token = process_token(&KEY, name);
        if !good {
            token[0] ^= 1;
        }
        let msg = ProcessMsg::Attach {
            name: name.to_vec(),
            token,
        };
        self.send_process(p, &msg);
    }

    fn connect_real(&mut self, i: usize, j: usize, claim: NodeId) {
        let link = LinkId(self.next_link);
        self.next_link += 1;
        self.conns.push(Conn {
            ends: [Party::Real(i), Party::Real(j)],
            open: [true, true],
            link,
            fake: None,
            honest: true,
        });
        self.trace(|| {
            format!(
                "conn {}: ctrl {i} dials ctrl {j} as {claim:?}",
                self.conns.len() - 1
            )
        });
        self.ctrls[i].link_connected(self.now, link, LinkRole::Initiator { peer: claim });
        self.ctrls[j].link_connected(self.now, link, LinkRole::Responder);
    }

    /// Opens a link between real controller `i` and the fake peer; the
    /// fake dials (claiming to be `claim`) or is dialled.
    fn connect_fake(&mut self, i: usize, fake_dials: bool, claim: NodeId, honest: bool) {
        let link = LinkId(self.next_link);
        self.next_link += 1;
        let c = self.conns.len();
        let state = if fake_dials {
            FakeState::HelloSent {
                nonce: self.fake_nonce(),
                claim,
            }
        } else {
            FakeState::AwaitHello
        };
        let hello = match &state {
            FakeState::HelloSent { nonce, claim } => Some(PeerMsg::Hello {
                node: *claim,
                incarnation: FAKE_INCARNATION,
                nonce: *nonce,
                responder: NodeId(i as u32 + 1),
                security: PeerSecurity::Authenticated,
            }),
            _ => None,
        };
        self.conns.push(Conn {
            ends: [Party::Real(i), Party::Fake],
            open: [true, true],
            link,
            fake: Some(state),
            honest,
        });
        let role = if fake_dials {
            LinkRole::Responder
        } else {
            LinkRole::Initiator {
                peer: self.fake_node,
            }
        };
        self.trace(|| format!("conn {c}: ctrl {i} and fake (dials: {fake_dials}, claims {claim:?}, honest: {honest})"));
        self.ctrls[i].link_connected(self.now, link, role);
        if let Some(hello) = hello {
            self.fake_send(c, &hello);
        }
    }

    fn fake_nonce(&mut self) -> [u8; 32] {
        self.fake_nonces += 1;
        let mut n = [0xfa; 32];
        n[..8].copy_from_slice(&self.fake_nonces.to_le_bytes());
        n
    }

    /// The fake peer sends `msg` on `c`, sealed if its handshake is done.
    fn fake_send(&mut self, c: usize, msg: &PeerMsg) {
        self.trace(|| format!("fake -> conn {c}: {msg:?}"));
        if !self.conns[c].open[1] {
            return;
        }
        let mut frame = Vec::new();
        msg.encode(&mut frame);
        if let Some(FakeState::Up(session)) = &mut self.conns[c].fake {
            session.seal(&mut frame);
            self.report.fake_sealed_frames += 1;
        }
        self.queue.push_back(Packet {
            conn: c,
            to: 0,
            body: Some(frame[FRAME_HEADER_LEN..].to_vec()),
        });
    }

    fn fake_close(&mut self, c: usize) {
        if self.conns[c].open[1] {
            self.conns[c].open[1] = false;
            self.queue.push_back(Packet {
                conn: c,
                to: 0,
                body: None,
            });
        }
    }

    /// A frame from a real controller reaches the fake peer.
    fn fake_receive(&mut self, c: usize, body: &[u8]) {
        let real = match self.conns[c].ends[0] {
            Party::Real(i) => i,
            Party::Fake => unreachable!("end 0 is always real"),
        };
        let honest = self.conns[c].honest;
        let Some(state) = self.conns[c].fake.take() else {
            return;
        };
        if let FakeState::Up(mut session) = state {
            let plain = session.open(body);
            self.conns[c].fake = Some(FakeState::Up(session));
            match plain {
                Some(plain) => {
                    let msg = PeerMsg::decode(&plain).unwrap_or_else(|e| {
                        panic!("controller {real} sealed an undecodable peer message: {e:?}")
                    });
                    self.trace(|| format!("conn {c} -> fake: {msg:?}"));
                    self.learn(&msg);
                }
                // Tampered with by the input on the way: drop the link.
                None => self.fake_close(c),
            }
            return;
        }
        let Ok(msg) = PeerMsg::decode(body) else {
            self.conns[c].fake = Some(state);
            return self.fake_close(c);
        };
        let fake_node = self.fake_node;
        let me = |nonce| Part {
            node: fake_node,
            incarnation: FAKE_INCARNATION,
            nonce,
        };
        let next = match (state, msg) {
            (
                FakeState::AwaitHello,
                PeerMsg::Hello {
                    node,
                    incarnation,
                    nonce,
                    security,
                    ..
                },
            ) => {
                let mine = me(self.fake_nonce());
                let theirs = Part {
                    node,
                    incarnation,
                    nonce,
                };
                let transcript = crypto::transcript(&theirs, &mine, security);
                let mut proof = crypto::proof(&KEY, false, &transcript);
                if !honest {
                    proof[7] ^= 0x10;
                }
                self.fake_send(
                    c,
                    &PeerMsg::HelloReply {
                        node: mine.node,
                        incarnation: mine.incarnation,
                        nonce: mine.nonce,
                        security,
                        proof,
                    },
                );
                FakeState::ReplySent {
                    transcript,
                    security,
                }
            }
            (
                FakeState::HelloSent { nonce: mine, claim },
                PeerMsg::HelloReply {
                    node,
                    incarnation,
                    nonce,
                    security,
                    ..
                },
            ) => {
                let mine = Part {
                    node: claim,
                    incarnation: FAKE_INCARNATION,
                    nonce: mine,
                };
                let theirs = Part {
                    node,
                    incarnation,
                    nonce,
                };
                let transcript = crypto::transcript(&mine, &theirs, security);
                let mut proof = crypto::proof(&KEY, true, &transcript);
                if !honest {
                    proof[3] ^= 0x01;
                }
                self.fake_send(c, &PeerMsg::Finish { proof });
                self.report.fake_handshakes += 1;
                FakeState::Up(Session::new(&KEY, true, &transcript, security))
            }
            (
                FakeState::ReplySent {
                    transcript,
                    security,
                },
                PeerMsg::Finish { .. },
            ) => {
                self.report.fake_handshakes += 1;
                FakeState::Up(Session::new(&KEY, false, &transcript, security))
            }
            (state, _) => {
                self.conns[c].fake = Some(state);
                return self.fake_close(c);
            }
        };
        self.conns[c].fake = Some(next);
    }

    /// Remembers ids and references from a real controller's message, for
    /// the fake peer's later messages.
    fn learn(&mut self, msg: &PeerMsg) {
        let ctx = &mut self.ctx;
        let mut caps = Vec::new();
        match msg {
            PeerMsg::Request { req, body } => {
                ctx.reqs.push(*req);
                match body {
                    PeerRequest::Derive { parent, spec, .. } => {
                        caps.push(*parent);
                        if let fractos_wire::DeriveSpec::Bind { caps: c, .. } = spec {
                            caps.extend(c);
                        }
                    }
                    PeerRequest::Invoke {
                        target, caps: c, ..
                    } => {
                        caps.push(*target);
                        caps.extend(c.iter().map(|(r, _)| *r));
                    }
                    PeerRequest::Revoke { cap } => caps.push(*cap),
                    PeerRequest::Monitor { cap, notify, .. } => caps.extend([*cap, *notify]),
                    PeerRequest::CopyStart { src, dst } => caps.extend([*src, *dst]),
                    PeerRequest::CopyOpen { dst, source, .. } => {
                        caps.push(*dst);
                        ctx.copy_ids.push(*source);
                    }
                    PeerRequest::Publish { cap, .. } => caps.push(*cap),
                    PeerRequest::Unpublish { .. } | PeerRequest::Lookup { .. } => {}
                }
            }
            PeerMsg::Reply { result, .. } => match result {
                Ok(PeerReply::Cap { cap, .. }) => caps.push(*cap),
                Ok(PeerReply::CopyOpened { sink }) => ctx.copy_ids.push(*sink),
                _ => {}
            },
            PeerMsg::Release { cap } => caps.push(*cap),
            PeerMsg::CopyChunk { sink, .. } | PeerMsg::CopyClose { sink } => {
                ctx.copy_ids.push(*sink)
            }
            PeerMsg::CopyAck { source, .. } => ctx.copy_ids.push(*source),
            _ => {}
        }
        ctx.caps.extend(caps);
        for v in [&mut ctx.reqs, &mut ctx.copy_ids] {
            if v.len() > 16 {
                v.drain(..v.len() - 16);
            }
        }
        if ctx.caps.len() > 32 {
            ctx.caps.drain(..ctx.caps.len() - 32);
        }
    }

    /// Delivers queued packet `idx`.
    fn deliver(&mut self, idx: usize) {
        let Some(Packet { conn, to, body }) = self.queue.remove(idx) else {
            return;
        };
        if !self.conns[conn].open[to] {
            return;
        }
        let link = self.conns[conn].link;
        self.trace(|| {
            let what = match &body {
                None => "close".to_string(),
                Some(b) => format!("{} bytes", b.len()),
            };
            format!(
                "deliver conn {conn} to end {to} ({:?}): {what}",
                self.conns[conn].ends[to]
            )
        });
        match (self.conns[conn].ends[to], body) {
            (Party::Real(i), None) => {
                self.conns[conn].open[to] = false;
                self.ctrls[i].link_disconnected(self.now, link);
            }
            (Party::Real(i), Some(body)) => {
                self.report.peer_frames += 1;
                self.ctrls[i].link_message(self.now, link, &body);
            }
            (Party::Fake, None) => self.conns[conn].open[to] = false,
            (Party::Fake, Some(body)) => self.fake_receive(conn, &body),
        }
        self.collect();
    }

    /// Delivers up to `n` packets of the flow (link and direction) of the
    /// packet at `pick`, in order.
    fn deliver_flow(&mut self, pick: usize, n: usize) {
        for _ in 0..n {
            if self.queue.is_empty() {
                return;
            }
            let p = &self.queue[pick % self.queue.len()];
            let (c, to) = (p.conn, p.to);
            let first = self
                .queue
                .iter()
                .position(|p| p.conn == c && p.to == to)
                .expect("the picked packet is there");
            self.deliver(first);
            self.check();
        }
    }

    /// Delivers everything until nothing is in flight.
    fn settle(&mut self) {
        let mut n = 0;
        while !self.queue.is_empty() {
            self.deliver(0);
            n += 1;
            assert!(n < LOOP_LIMIT, "peer traffic never settles");
        }
    }

    /// Moves time forward by `d`, firing timers in order; with `deliver`,
    /// all traffic settles after each round.
    fn advance(&mut self, d: Duration, deliver: bool) {
        let end = self.now.after(d);
        let mut rounds = 0;
        loop {
            let next = self.ctrls.iter().filter_map(|c| c.poll_timeout()).min();
            match next {
                Some(t) if t <= end => {
                    self.now = self.now.max(t);
                    for i in 0..self.ctrls.len() {
                        self.ctrls[i].handle_timeout(self.now);
                    }
                    self.collect();
                    self.check();
                    if deliver {
                        self.settle();
                        self.check();
                    }
                }
                _ => break,
            }
            rounds += 1;
            assert!(rounds < LOOP_LIMIT, "timers keep firing at {:?}", self.now);
        }
        self.now = end;
    }

    fn open_procs(&self) -> Vec<usize> {
        (0..self.procs.len())
            .filter(|&p| self.procs[p].open)
            .collect()
    }

    // ------------------------------------------------------------- steps

    fn step(&mut self, u: &mut Unstructured) -> Result<()> {
        self.trace(|| format!("-- step {}", self.report.steps));
        let open = self.open_procs();
        match u.int_in_range(0..=30u8)? {
            // A well-formed operation.
            0..=8 => {
                let Some(&p) = open.get(u.choose_index(open.len().max(1))?) else {
                    return self.new_proc(u);
                };
                let op = self.procs[p].next_op;
                self.procs[p].next_op += 1;
                let msg = gen::process_op(u, op, &self.procs[p].known, MEM as u64)?;
                let wait = match msg {
                    ProcessMsg::Lookup { wait_ms, .. } => wait_ms,
                    _ => 0,
                };
                self.procs[p].issued.push((op, wait));
                self.send_process(p, &msg);
            }
            // A raw frame body, sometimes behind a valid header.
            9 => {
                let p = u.choose_index(self.procs.len().max(1))?;
                if p < self.procs.len() {
                    let mut body = gen::small_bytes(u, 48)?;
                    if u.arbitrary()? && body.len() >= 2 {
                        body[0] = fractos_wire::PROTOCOL_VERSION;
                        body[1] %= 17;
                    }
                    self.procs[p].raw_sent = true;
                    self.send_process_raw(p, &body);
                }
            }
            10 | 11 => self.new_proc(u)?,
            12 => {
                if let Some(&p) = open.get(u.choose_index(open.len().max(1))?) {
                    let name = format!("p{}", u.int_in_range(0..=3)?);
                    let good = u.ratio(7u8, 8)?;
                    self.attach(p, name.as_bytes(), good);
                }
            }
            13 => {
                if let Some(&p) = open.get(u.choose_index(open.len().max(1))?) {
                    self.procs[p].open = false;
                    let (node, chan) = (self.procs[p].node, self.procs[p].chan);
                    self.ctrls[node].process_disconnected(self.now, chan);
                }
            }
            // Answer a parked memory request, somehow.
            14 | 15 => {
                let parked: Vec<usize> = (0..self.procs.len())
                    .filter(|&p| !self.procs[p].parked.is_empty())
                    .collect();
                if let Some(&p) = parked.get(u.choose_index(parked.len().max(1))?) {
                    let k = u.choose_index(self.procs[p].parked.len())?;
                    let m = self.procs[p].parked.remove(k).expect("in range");
                    let (mode, arg) = (u.int_in_range(0..=6u8)?, u.arbitrary()?);
                    match mode {
                        // Never answered.
                        5 => {}
                        // Later.
                        6 => self.procs[p].parked.push_back(m),
                        _ => self.serve(p, &m, mode, arg),
                    }
                }
            }
            16 => {
                if let Some(&p) = open.get(u.choose_index(open.len().max(1))?) {
                    self.procs[p].auto_serve = !self.procs[p].auto_serve;
                }
            }
            17..=20 => {
                let pick = u.arbitrary()?;
                let n = u.int_in_range(1..=8)?;
                self.deliver_flow(pick, n);
            }
            21 => self.settle(),
            22 | 23 => {
                let d = match u.int_in_range(0..=5u8)? {
                    0 => Duration::from_millis(u.int_in_range(1..=100)?),
                    1 => Duration::from_millis(600),
                    2 => Duration::from_millis(3_100),
                    3 => Duration::from_millis(5_100),
                    4 => Duration::from_millis(u.int_in_range(0..=30_000)?),
                    _ => Duration::from_millis(u.int_in_range(100..=1_500)?),
                };
                let deliver = u.ratio(3u8, 4)?;
                self.trace(|| format!("advance {d:?} (deliver: {deliver})"));
                self.advance(d, deliver);
            }
            24 => self.new_link(u)?,
            25 => self.drop_link(u)?,
            26..=28 => self.fake_step(u)?,
            29 => self.tamper(u)?,
            _ => self.inject(u)?,
        }
        Ok(())
    }

    fn new_proc(&mut self, u: &mut Unstructured) -> Result<()> {
        if self.procs.len() >= MAX_PROCS {
            return Ok(());
        }
        let node = u.choose_index(self.ctrls.len())?;
        let p = self.open_proc(node);
        if u.ratio(3u8, 4)? {
            let name = format!("p{}", u.int_in_range(0..=3)?);
            self.attach(p, name.as_bytes(), true);
        }
        Ok(())
    }

    fn new_link(&mut self, u: &mut Unstructured) -> Result<()> {
        if self.conns.len() >= MAX_CONNS {
            return Ok(());
        }
        let n = self.ctrls.len();
        let i = u.choose_index(n)?;
        let j = u.choose_index(n + 1)?;
        if j == n || j == i {
            // With the fake peer; it dials claiming its own id or (keyed
            // as it is) a real controller's.
            let fake_dials = u.arbitrary()?;
            let claim = if u.ratio(3u8, 4)? {
                self.fake_node
            } else {
                NodeId(u.choose_index(n)? as u32 + 1)
            };
            let honest = u.ratio(7u8, 8)?;
            self.connect_fake(i, fake_dials, claim, honest);
        } else {
            let claim = if u.ratio(7u8, 8)? {
                NodeId(j as u32 + 1)
            } else {
                NodeId(u.int_in_range(0..=5)?)
            };
            self.connect_real(i, j, claim);
        }
        self.collect();
        Ok(())
    }

    fn drop_link(&mut self, u: &mut Unstructured) -> Result<()> {
        let live: Vec<usize> = (0..self.conns.len())
            .filter(|&c| self.conns[c].open.iter().any(|&o| o))
            .collect();
        let Some(&c) = live.get(u.choose_index(live.len().max(1))?) else {
            return Ok(());
        };
        // 0: both ends at once; 1, 2: that end now, the other told later;
        // 3, 4: only that end (half-open).
        let mode = u.int_in_range(0..=4u8)?;
        for side in 0..2 {
            let this = match mode {
                0 => true,
                1 | 3 => side == 0,
                _ => side == 1,
            };
            if !this || !self.conns[c].open[side] {
                continue;
            }
            self.trace(|| format!("conn {c}: end {side} disconnected (mode {mode})"));
            self.conns[c].open[side] = false;
            if let Party::Real(i) = self.conns[c].ends[side] {
                self.ctrls[i].link_disconnected(self.now, self.conns[c].link);
            }
            if mode == 1 || mode == 2 {
                self.queue.push_back(Packet {
                    conn: c,
                    to: 1 - side,
                    body: None,
                });
            }
        }
        Ok(())
    }

    /// The fake keyed peer says something.
    fn fake_step(&mut self, u: &mut Unstructured) -> Result<()> {
        let fakes: Vec<usize> = (0..self.conns.len())
            .filter(|&c| self.conns[c].fake.is_some() && self.conns[c].open[1])
            .collect();
        let Some(&c) = fakes.get(u.choose_index(fakes.len().max(1))?) else {
            // No link to the fake peer: open one.
            let i = u.choose_index(self.ctrls.len())?;
            let fake_dials = u.arbitrary()?;
            let claim = self.fake_node;
            self.connect_fake(i, fake_dials, claim, true);
            return Ok(());
        };
        // Learn a capability reference a process holds.
        if !self.procs.is_empty() && u.arbitrary()? {
            let p = u.choose_index(self.procs.len())?;
            let proc = &self.procs[p];
            if let Some(&h) = proc.known.get(u.choose_index(proc.known.len().max(1))?) {
                if let Some((cap, _)) =
                    self.ctrls[proc.node].debug_handle(proc.chan, fractos_wire::Handle(h))
                {
                    self.ctx.caps.push(cap);
                }
            }
        }
        let req = self.fake_req;
        self.fake_req += 1;
        self.ctx.receiver = match (self.hostile, self.conns[c].ends[0]) {
            (false, Party::Real(i)) => Some(NodeId(i as u32 + 1)),
            _ => None,
        };
        let msg = gen::peer_msg(u, &self.ctx, req)?;
        self.fake_send(c, &msg);
        Ok(())
    }

    /// An on-path attacker rewrites, drops, duplicates or replays frames.
    fn tamper(&mut self, u: &mut Unstructured) -> Result<()> {
        let mode = u.int_in_range(0..=4u8)?;
        if mode == 4 {
            // Replay something a controller sent before, on any link.
            if self.history.is_empty() || self.conns.is_empty() {
                return Ok(());
            }
            let body = self.history[u.choose_index(self.history.len())?].clone();
            let c = u.choose_index(self.conns.len())?;
            self.queue.push_back(Packet {
                conn: c,
                to: u.choose_index(2)?,
                body: Some(body),
            });
            return Ok(());
        }
        if self.queue.is_empty() {
            return Ok(());
        }
        let k = u.choose_index(self.queue.len())?;
        match mode {
            0 => {
                self.queue.remove(k);
            }
            1 => {
                let p = &self.queue[k];
                let copy = Packet {
                    conn: p.conn,
                    to: p.to,
                    body: p.body.clone(),
                };
                self.queue.insert(k + 1, copy);
            }
            2 => {
                let (pos, bit) = (u.arbitrary::<u16>()?, u.int_in_range(0..=7)?);
                if let Some(body) = &mut self.queue[k].body {
                    if !body.is_empty() {
                        let i = usize::from(pos) % body.len();
                        body[i] ^= 1 << bit;
                    }
                }
            }
            _ => {
                let cut = u.arbitrary::<u16>()?;
                if let Some(body) = &mut self.queue[k].body {
                    body.truncate(usize::from(cut) % (body.len() + 1));
                }
            }
        }
        Ok(())
    }

    /// Raw bytes or an unsealed message straight into a real link end.
    fn inject(&mut self, u: &mut Unstructured) -> Result<()> {
        let ends: Vec<(usize, usize)> = (0..self.conns.len())
            .flat_map(|c| (0..2).map(move |s| (c, s)))
            .filter(|&(c, s)| self.conns[c].open[s] && self.conns[c].ends[s] != Party::Fake)
            .collect();
        let Some(&(c, s)) = ends.get(u.choose_index(ends.len().max(1))?) else {
            return Ok(());
        };
        let body = if u.arbitrary()? {
            gen::small_bytes(u, 64)?
        } else {
            let msg = gen::peer_msg(u, &self.ctx, 1)?;
            let mut frame = Vec::new();
            msg.encode(&mut frame);
            frame.split_off(FRAME_HEADER_LEN)
        };
        self.queue.push_back(Packet {
            conn: c,
            to: s,
            body: Some(body),
        });
        Ok(())
    }

    // ------------------------------------------------------------ ending

    fn finish(&mut self) {
        // Every process answers its memory, links recover, time passes:
        // every operation of a process still attached must complete.
        for p in 0..self.procs.len() {
            self.procs[p].auto_serve = true;
            while let Some(m) = self.procs[p].parked.pop_front() {
                self.serve(p, &m, 0, 0);
                self.collect();
            }
        }
        self.settle();
        self.check();
        let drain = Duration::from_secs(40);
        self.advance(drain, true);
        for (p, proc) in self.procs.iter().enumerate() {
            if !proc.open || !proc.attached || proc.raw_sent {
                continue;
            }
            for &(op, wait_ms) in &proc.issued {
                if u64::from(wait_ms) < 30_000 {
                    assert!(
                        proc.completed.contains(&op),
                        "process {p} (node {}): op {op:#x} never completed",
                        proc.node
                    );
                }
            }
        }
        // Everyone leaves: nothing may remain.
        for p in 0..self.procs.len() {
            if self.procs[p].open {
                self.procs[p].open = false;
                let (node, chan) = (self.procs[p].node, self.procs[p].chan);
                self.ctrls[node].process_disconnected(self.now, chan);
                self.collect();
            }
        }
        self.settle();
        self.check();
        for c in 0..self.conns.len() {
            for side in 0..2 {
                if self.conns[c].open[side] {
                    self.conns[c].open[side] = false;
                    if let Party::Real(i) = self.conns[c].ends[side] {
                        self.ctrls[i].link_disconnected(self.now, self.conns[c].link);
                        self.collect();
                    }
                }
            }
        }
        self.settle();
        self.advance(drain, true);
        for (i, c) in self.ctrls.iter().enumerate() {
            let s = c.stats();
            let left = Stats {
                pending_ops_max: 0,
                monitors_max_per_watcher: 0,
                published_names_max: 0,
                waiting_lookups_max: 0,
                ..s
            };
            assert_eq!(
                left,
                Stats::default(),
                "controller {i} keeps state after every process and link is gone"
            );
        }
    }
}
