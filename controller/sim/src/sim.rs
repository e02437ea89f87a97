//! The event loop: controllers, processes, the network, faults and the
//! per-step checks.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

use fractos_core::{
    process_token, ChannelId, CloseReason, Config, Controller, Dest, Instant, LinkId, LinkRole,
    MemAccess, Output, PeerSecurity,
};
use fractos_wire::{
    frame_body, CapInfo, ControllerMsg, ErrorCode, Handle, NodeId, ObjectKind, PeerMsg, ProcessMsg,
    Rights, MAX_FRAME_LEN,
};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::net::{Conn, Ep, Rules, Verdict};
use crate::oracle::{HandleRec, Oracle, Win, INVOKE_MAGIC};
use crate::process::Proc;
use crate::{Failure, Report, SimConfig};

const MS: u64 = 1_000_000;
/// One-way latency of a process channel (local, reliable, ordered).
const PROC_LATENCY: u64 = 5_000;
/// Events one run may execute before it is declared a livelock.
const MAX_EVENTS: u64 = 200_000_000;
const TAIL: usize = 80;
/// Wire kind byte of `PeerMsg::Ping` (heartbeats are left out of traces).
const PING_KIND: u8 = 3;

enum Ev {
    Dial(usize, usize),
    /// Gossip: controller `from` (incarnation `inc`) asked for a link to
    /// `to`.
    Connect {
        from: usize,
        inc: u64,
        to: usize,
    },
    /// Gossip: the dial of `from` to `to` failed.
    DialFailed {
        from: usize,
        inc: u64,
        to: usize,
    },
    /// `measure`: the idle window opens.
    IdleStart,
    /// `measure`: the idle window closes; one controller is killed.
    IdleEnd,
    /// `measure`: has every live controller confirmed the killed one dead?
    DetectCheck,
    LinkFrame {
        to: LinkId,
        frame: Vec<u8>,
    },
    LinkDown(LinkId),
    ToCtrl {
        chan: ChannelId,
        frame: Vec<u8>,
    },
    ToProc {
        proc: usize,
        msg: ControllerMsg,
        regs: Vec<HandleRec>,
        pulled: u64,
    },
    /// The driver serves a direct memory access (a process whose memory
    /// the controller reaches without MemRead/MemWrite messages).
    DirectMem {
        node: usize,
        inc: u64,
        access: MemAccess,
    },
    ProcStart(usize),
    ProcTick(usize),
    Crash {
        node: usize,
        silent: bool,
    },
    Restart(usize),
    ProcCrash,
    /// A live process stops answering for a while (its frames queue up).
    ProcStall {
        dur: u64,
    },
    Partition {
        dur: u64,
    },
    Heal,
    FaultsOn,
    FaultsOff,
    Stop,
    /// Periodic end-of-run check: answers overdue? cluster quiescent?
    Check,
}

struct Queued {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

struct Node {
    ctrl: Option<Controller>,
    inc: u64,
    /// Deadline pushed on the timer heap for the current controller.
    armed: Option<u64>,
}

/// A simulated cluster. Build with [`Sim::new`], run with [`Sim::run`].
pub struct Sim {
    cfg: SimConfig,
    rng: ChaCha8Rng,
    now: u64,
    tick: u64,
    seq: u64,
    events: BinaryHeap<Reverse<Queued>>,
    timers: BinaryHeap<Reverse<(u64, usize, u64)>>,
    nodes: Vec<Node>,
    procs: Vec<Proc>,
    chans: BTreeMap<ChannelId, usize>,
    next_chan: u64,
    next_link: u64,
    next_conn: u64,
    conns: BTreeMap<u64, Conn>,
    pairs: BTreeMap<(usize, usize), u64>,
    eps: BTreeMap<LinkId, Ep>,
    rules: Rules,
    oracle: Oracle,
    key: [u8; 32],
    stopping: bool,
    ended: bool,
    touched: BTreeSet<usize>,
    tail: VecDeque<String>,
    report: Report,
    error: Option<String>,
    /// `FRACTOS_SIM_TRACE` is set: print every event to stderr.
    print_trace: bool,
    /// Controller frames other than heartbeats in flight.
    inflight: u64,
    /// When the cluster must be quiet, once every process is gone.
    settle_limit: Option<u64>,
    /// `measure`: messages delivered when the idle window opened.
    idle_from: Option<(u64, u64)>,
    /// `measure`: the killed controller and when.
    killed: Option<(usize, u64)>,
    /// `measure`: detection finished.
    detected: bool,
}

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn summarize_peer(body: &[u8]) -> String {
    match PeerMsg::decode(body) {
        Ok(PeerMsg::CopyChunk { sink, offset, data }) => {
            format!(
                "CopyChunk {{ sink: {sink:#x}, offset: {offset}, len: {} }}",
                data.len()
            )
        }
        Ok(m) => {
            let mut s = format!("{m:?}");
            s.truncate(220);
            s
        }
        Err(e) => format!("undecodable ({e})"),
    }
}

fn summarize_ctrl(m: &ControllerMsg) -> String {
    match m {
        ControllerMsg::MemWrite { xfer, addr, data } => {
            format!(
                "MemWrite {{ xfer: {xfer}, addr: {addr:#x}, len: {} }}",
                data.len()
            )
        }
        m => {
            let mut s = format!("{m:?}");
            s.truncate(220);
            s
        }
    }
}

fn summarize_proc(m: &ProcessMsg) -> String {
    match m {
        ProcessMsg::MemReadReply {
            xfer,
            result: Ok(d),
        } => format!("MemReadReply {{ xfer: {xfer}, len: {} }}", d.len()),
        m => {
            let mut s = format!("{m:?}");
            s.truncate(220);
            s
        }
    }
}

impl Sim {
    /// A cluster for `cfg`, with its workload and faults scheduled.
    pub fn new(cfg: SimConfig) -> Sim {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut key = [0u8; 32];
        rng.fill(&mut key);
        let mut sim = Sim {
            rng,
            now: 0,
            tick: 0,
            seq: 0,
            events: BinaryHeap::new(),
            timers: BinaryHeap::new(),
            nodes: Vec::new(),
            procs: Vec::new(),
            chans: BTreeMap::new(),
            next_chan: 1,
            next_link: 1,
            next_conn: 1,
            conns: BTreeMap::new(),
            pairs: BTreeMap::new(),
            eps: BTreeMap::new(),
            rules: Rules::default(),
            oracle: Oracle::default(),
            key,
            stopping: false,
            ended: false,
            touched: BTreeSet::new(),
            tail: VecDeque::new(),
            report: Report {
                seed: cfg.seed,
                controllers: cfg.controllers,
                ..Report::default()
            },
            error: None,
            print_trace: std::env::var_os("FRACTOS_SIM_TRACE").is_some(),
            inflight: 0,
            settle_limit: None,
            idle_from: None,
            killed: None,
            detected: false,
            cfg,
        };
        sim.oracle.zombie_ns = 2 * Self::nanos(sim.cfg.op_timeout)
            + 2 * Self::nanos(sim.cfg.peer_timeout)
            + 1_000 * MS;
        // Chunks in flight can be held by a partition for up to 2 s.
        sim.oracle.linger_ns = if sim.cfg.faults { 2_500 * MS } else { 50 * MS };
        sim.setup();
        sim
    }

    fn nanos(d: core::time::Duration) -> u64 {
        d.as_nanos() as u64
    }

    fn controller_config(&mut self, node: usize, inc: u64) -> Config {
        let id = NodeId(node as u32 + 1);
        let mut c = Config::new(id, inc, self.key);
        c.members = (0..self.cfg.controllers)
            .map(|i| NodeId(i as u32 + 1))
            .collect();
        c.op_timeout = self.cfg.op_timeout;
        c.heartbeat_interval = self.cfg.heartbeat;
        c.peer_timeout = self.cfg.peer_timeout;
        c.copy_chunk = self.cfg.copy_chunk;
        c.copy_window = self.rng.gen_range(1..=4);
        if self.cfg.tight_limits {
            // Exercise the limit paths: handle tables and pending operations
            // fill up, returned and delivered capabilities are refused.
            c.limits.max_caps_per_process = self.rng.gen_range(8..=24);
            c.limits.max_pending_per_process = self.rng.gen_range(2..=6);
        }
        c.rng_seed = self.rng.gen();
        if self.cfg.gossip {
            let period = self.cfg.protocol_period;
            c.gossip = Some(fractos_core::Gossip {
                protocol_period: period,
                probe_timeout: period / 4,
                link_idle: period * 5,
                ..fractos_core::Gossip::default()
            });
        }
        // Both peer modes, and links between nodes that differ in mode.
        c.peer_security = if c.rng_seed[0] & 1 == 1 {
            PeerSecurity::Secure
        } else {
            PeerSecurity::Authenticated
        };
        c
    }

    fn setup(&mut self) {
        let n = self.cfg.controllers;
        for i in 0..n {
            let cfg = self.controller_config(i, 1);
            self.nodes.push(Node {
                ctrl: Some(Controller::new(cfg, Instant(0))),
                inc: 1,
                armed: None,
            });
            self.rearm(i);
        }
        if !self.cfg.gossip {
            for a in 0..n {
                for b in a + 1..n {
                    let at = self.rng.gen_range(0..2 * MS);
                    self.schedule(at, Ev::Dial(a, b));
                }
            }
        }
        for node in 0..n {
            for _ in 0..self.cfg.procs_per_controller {
                let at = 20 * MS + self.rng.gen_range(0..10 * MS);
                self.spawn_proc(node, at, false);
            }
        }
        if n > 0 && !self.cfg.scripted && self.rng.gen_bool(0.25) {
            let node = self.rng.gen_range(0..n);
            let at = 30 * MS + self.rng.gen_range(0..100 * MS);
            self.spawn_proc(node, at, true);
        }
        let stop = Self::nanos(self.cfg.stop_at);
        if self.cfg.faults {
            let fault_end = stop.saturating_sub(500 * MS).max(300 * MS);
            self.setup_faults(200 * MS, fault_end);
            self.schedule(fault_end, Ev::FaultsOff);
        } else if !self.cfg.scripted {
            // Processes also exit in calm runs: their objects die and the
            // monitors on them must fire.
            for _ in 0..self.rng.gen_range(0..=2) {
                let at = self
                    .rng
                    .gen_range(300 * MS..stop.saturating_sub(600 * MS).max(400 * MS));
                self.schedule(at, Ev::ProcCrash);
            }
        }
        self.schedule(stop, Ev::Stop);
        self.schedule(stop, Ev::Check);
        if self.cfg.measure {
            let from = stop + 2_000 * MS;
            self.schedule(from, Ev::IdleStart);
            self.schedule(from + Self::nanos(self.cfg.idle_window), Ev::IdleEnd);
        }
    }

    fn setup_faults(&mut self, from: u64, to: u64) {
        let n = self.cfg.controllers;
        self.rules.loss = *[0.0, 0.0005, 0.002, 0.01]
            .choose(&mut self.rng)
            .expect("non-empty");
        self.rules.jitter = self.rng.gen_range(0..=3 * MS);
        self.schedule(from, Ev::FaultsOn);
        // One run in four is a storm.
        let count = if self.rng.gen_bool(0.25) {
            self.rules.loss = self.rules.loss.max(0.005) * 2.0;
            self.rng.gen_range(6..=16)
        } else {
            self.rng.gen_range(1..=6)
        };
        for _ in 0..count {
            let at = self.rng.gen_range(from..to);
            let ev = match self.rng.gen_range(0..5) {
                0 if n > 1 => Ev::Crash {
                    node: self.rng.gen_range(0..n),
                    silent: self.rng.gen_bool(0.5),
                },
                1 if n > 1 => Ev::Partition {
                    dur: self.rng.gen_range(50 * MS..2_000 * MS),
                },
                2 => Ev::ProcStall {
                    dur: self.rng.gen_range(10 * MS..500 * MS),
                },
                _ => Ev::ProcCrash,
            };
            self.schedule(at, ev);
        }
    }

    fn spawn_proc(&mut self, node: usize, at: u64, rogue: bool) -> usize {
        let idx = self.procs.len();
        let chan = ChannelId(self.next_chan);
        self.next_chan += 1;
        let mut mem = vec![0u8; self.cfg.mem_size];
        self.rng.fill(&mut mem[..]);
        let mut p = Proc::new(
            node,
            self.nodes[node].inc,
            chan,
            format!("proc-{idx}").into_bytes(),
            mem,
            self.cfg.ops_per_process,
        );
        p.rogue = rogue;
        p.tight = self.cfg.tight_limits;
        p.alive = false; // until started
        if self.cfg.scripted {
            p.script = Some(crate::process::Script {
                index: idx,
                ..Default::default()
            });
        }
        self.procs.push(p);
        self.chans.insert(chan, idx);
        self.schedule(at, Ev::ProcStart(idx));
        idx
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.events.push(Reverse(Queued {
            at,
            seq: self.seq,
            ev,
        }));
    }

    fn note(&mut self, s: impl FnOnce() -> String) {
        if self.cfg.keep_trace || self.print_trace {
            let line = format!("t={:.6} #{} {}", self.now as f64 / 1e9, self.tick, s());
            if self.print_trace {
                eprintln!("{line}");
            }
            if self.tail.len() == TAIL {
                self.tail.pop_front();
            }
            self.tail.push_back(line);
        }
    }

    fn count_fault(&mut self, kind: &str) {
        self.report.faults += 1;
        *self.report.fault_kinds.entry(kind.to_string()).or_insert(0) += 1;
    }

    fn fail(&mut self, msg: String) {
        if self.error.is_none() {
            self.error = Some(msg);
        }
    }

    fn hash(&mut self, endpoint: u64, bytes: &[u8]) {
        let mut h = fnv(self.report.trace_hash, &self.now.to_le_bytes());
        h = fnv(h, &endpoint.to_le_bytes());
        self.report.trace_hash = fnv(h, bytes);
    }

    fn rearm(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        let Some(c) = n.ctrl.as_ref() else {
            n.armed = None;
            return;
        };
        match c.poll_timeout() {
            Some(t) => {
                let t = t.0.max(self.now);
                if n.armed != Some(t) {
                    n.armed = Some(t);
                    let inc = n.inc;
                    self.timers.push(Reverse((t, node, inc)));
                }
            }
            None => n.armed = None,
        }
    }

    /// Runs to the end; returns the report or the first violation.
    pub fn run(mut self) -> Result<Report, Box<Failure>> {
        let mut events = 0u64;
        while !self.ended && self.error.is_none() {
            events += 1;
            if events > MAX_EVENTS {
                self.fail(format!("livelock: more than {MAX_EVENTS} events"));
                break;
            }
            let ev_at = self.events.peek().map(|Reverse(q)| q.at);
            let tm_at = self.timers.peek().map(|Reverse((t, _, _))| *t);
            let use_timer = match (ev_at, tm_at) {
                (Some(e), Some(t)) => t < e,
                (None, Some(_)) => true,
                (Some(_), None) => false,
                (None, None) => break,
            };
            self.tick += 1;
            if use_timer {
                self.oracle.now_ns = self.now.max(tm_at.unwrap_or(0));
                let Reverse((at, node, inc)) = self.timers.pop().expect("peeked");
                self.now = self.now.max(at);
                let n = &mut self.nodes[node];
                if n.inc != inc || n.armed != Some(at) || n.ctrl.is_none() {
                    continue;
                }
                n.armed = None;
                let now = Instant(self.now);
                n.ctrl.as_mut().expect("checked").handle_timeout(now);
                self.drain(node);
            } else {
                let Reverse(q) = self.events.pop().expect("peeked");
                self.now = self.now.max(q.at);
                self.oracle.now_ns = self.now;
                self.handle(q.ev);
            }
            self.after_step();
        }
        self.report.virtual_nanos = self.now;
        self.report.copies_checked = self.oracle.copies_checked;
        for c in self.nodes.iter().filter_map(|n| n.ctrl.as_ref()) {
            self.report.revokes_held_for_copies += c.metrics().revokes_held_for_copies;
        }
        self.report.outcomes = std::mem::take(&mut self.oracle.outcomes);
        self.report.processes = self.procs.len();
        match self.error.take() {
            None => Ok(self.report),
            Some(message) => Err(Box::new(Failure {
                seed: self.cfg.seed,
                config: self.cfg.clone(),
                at_nanos: self.now,
                message,
                trace_tail: self.tail.into_iter().collect(),
            })),
        }
    }

    fn after_step(&mut self) {
        let touched = std::mem::take(&mut self.touched);
        if !self.cfg.check_controllers || self.error.is_some() {
            return;
        }
        for node in touched {
            if let Some(c) = &self.nodes[node].ctrl {
                if let Err(e) = c.check_invariants() {
                    let msg = format!("controller {} invariant: {e}", node + 1);
                    self.fail(msg);
                    return;
                }
            }
        }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Dial(a, b) => self.dial(a, b),
            Ev::Connect { from, inc, to } => self.connect(from, inc, to),
            Ev::DialFailed { from, inc, to } => {
                if self.nodes[from].inc == inc && self.nodes[from].ctrl.is_some() {
                    self.note(|| format!("dial {}->{} failed", from + 1, to + 1));
                    let now = Instant(self.now);
                    if let Some(c) = self.nodes[from].ctrl.as_mut() {
                        c.dial_failed(now, NodeId(to as u32 + 1));
                    }
                    self.drain(from);
                }
            }
            Ev::IdleStart => {
                let live = self.nodes.iter().filter(|n| n.ctrl.is_some()).count() as u64;
                self.idle_from = Some((self.report.messages, self.now));
                self.report.idle_controllers = live;
                self.sample_links();
            }
            Ev::IdleEnd => {
                if let Some((m0, t0)) = self.idle_from {
                    self.report.idle_messages = self.report.messages - m0;
                    self.report.idle_window_nanos = self.now - t0;
                }
                self.sample_links();
                self.kill_one();
            }
            Ev::DetectCheck => self.detect_check(),
            Ev::LinkFrame { to, frame } => self.link_frame(to, frame),
            Ev::LinkDown(l) => self.link_down(l),
            Ev::ToCtrl { chan, frame } => self.deliver_to_ctrl(chan, frame),
            Ev::ToProc {
                proc,
                msg,
                regs,
                pulled,
            } => self.deliver_to_proc(proc, msg, regs, pulled),
            Ev::DirectMem { node, inc, access } => self.direct_mem(node, inc, access),
            Ev::ProcStart(p) => self.proc_start(p),
            Ev::ProcTick(p) => self.proc_tick(p),
            Ev::Crash { node, silent } => self.crash(node, silent),
            Ev::Restart(node) => self.restart(node),
            Ev::ProcStall { dur } => {
                let live: Vec<usize> = (0..self.procs.len())
                    .filter(|p| self.procs[*p].alive && !self.procs[*p].rogue)
                    .collect();
                if let Some(p) = live.choose(&mut self.rng).copied() {
                    self.count_fault("process stall");
                    let until = self.now + dur;
                    self.note(|| format!("FAULT process {p} stalls until {until}"));
                    let pr = &mut self.procs[p];
                    pr.stalled_until = pr.stalled_until.max(until);
                }
            }
            Ev::ProcCrash => {
                let live: Vec<usize> = (0..self.procs.len())
                    .filter(|p| self.procs[*p].alive && !self.procs[*p].rogue)
                    .collect();
                if let Some(p) = live.choose(&mut self.rng).copied() {
                    self.count_fault("process crash");
                    self.note(|| format!("FAULT process crash {p}"));
                    self.exit_proc(p);
                }
            }
            Ev::Partition { dur } => {
                if self.rules.partition.is_some() || !self.rules.active {
                    return;
                }
                let n = self.cfg.controllers;
                let mut side = BTreeSet::new();
                let k = self.rng.gen_range(1..n);
                let mut all: Vec<usize> = (0..n).collect();
                all.shuffle(&mut self.rng);
                side.extend(all.into_iter().take(k));
                let heal = self.now + dur;
                self.count_fault("partition");
                self.note(|| format!("FAULT partition {side:?} until {heal}"));
                self.rules.partition = Some((side, heal));
                self.schedule(heal, Ev::Heal);
            }
            Ev::FaultsOn => {
                self.rules.active = true;
                self.note(|| "faults on".into());
            }
            Ev::Heal => {
                if let Some((_, heal)) = &self.rules.partition {
                    if *heal <= self.now {
                        self.rules.partition = None;
                        self.note(|| "partition healed".into());
                    }
                }
            }
            Ev::FaultsOff => {
                self.rules.active = false;
                self.rules.partition = None;
                self.note(|| "faults off".into());
                for node in 0..self.nodes.len() {
                    if self.nodes[node].ctrl.is_none() {
                        self.restart(node);
                    }
                }
            }
            Ev::Stop => {
                if !self.cfg.faults {
                    self.check_monitors_fired();
                }
                self.stopping = true;
                for p in 0..self.procs.len() {
                    if self.procs[p].alive && self.procs[p].outstanding.is_empty() {
                        self.exit_proc(p);
                    }
                }
            }
            Ev::Check => self.check_end(),
        }
    }

    // ---------------------------------------------------------------- links

    fn dial(&mut self, a: usize, b: usize) {
        let (a, b) = (a.min(b), a.max(b));
        if self.nodes[a].ctrl.is_none() || self.nodes[b].ctrl.is_none() {
            return;
        }
        if self.pairs.contains_key(&(a, b)) {
            return;
        }
        if self.rules.cut(a, b) {
            let at = self.now + 200 * MS;
            self.schedule(at, Ev::Dial(a, b));
            return;
        }
        let id = self.open_conn(a, b);
        self.pairs.insert((a, b), id);
        // The lower id dials, as the drivers do.
        self.start_handshake(id, "dial");
    }

    /// A new connection from `from` (the dialling side) to `to`.
    fn open_conn(&mut self, from: usize, to: usize) -> u64 {
        let id = self.next_conn;
        self.next_conn += 1;
        let la = LinkId(self.next_link);
        let lb = LinkId(self.next_link + 1);
        self.next_link += 2;
        self.conns.insert(
            id,
            Conn {
                nodes: [from, to],
                eps: [la, lb],
                alive: true,
                last: [0, 0],
            },
        );
        for (side, (node, l)) in [(from, la), (to, lb)].into_iter().enumerate() {
            let inc = self.nodes[node].inc;
            self.eps.insert(
                l,
                Ep {
                    node,
                    inc,
                    conn: id,
                    side,
                    open: true,
                },
            );
        }
        id
    }

    /// Tells both ends of new connection `id` that it is up (its first
    /// node dialled).
    fn start_handshake(&mut self, id: u64, what: &str) {
        let c = &self.conns[&id];
        let ([a, b], [la, lb]) = (c.nodes, c.eps);
        self.note(|| format!("{what} {}->{} links {la:?}/{lb:?}", a + 1, b + 1));
        let now = Instant(self.now);
        let peer = NodeId(b as u32 + 1);
        for (node, l, role) in [
            (a, la, LinkRole::Initiator { peer }),
            (b, lb, LinkRole::Responder),
        ] {
            if let Some(c) = self.nodes[node].ctrl.as_mut() {
                c.link_connected(now, l, role);
                self.drain(node);
            }
        }
    }

    /// Kills connection `id`: frames in flight are lost; endpoints still
    /// open at live controllers learn it after a short delay (or, if
    /// `silent`, only from their heartbeat); the pair re-dials later.
    fn kill_conn(&mut self, id: u64, notify: bool) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if !c.alive {
            return;
        }
        c.alive = false;
        let (nodes, eps) = (c.nodes, c.eps);
        if self.pairs.get(&(nodes[0], nodes[1])) == Some(&id) {
            self.pairs.remove(&(nodes[0], nodes[1]));
        }
        if notify {
            // Usually both ends see the reset; sometimes one end misses it
            // (a lost RST) and keeps a half-open link until its heartbeat
            // times out or the peer's new connection replaces it.
            let half_open = self.rules.active && self.rng.gen_bool(0.2);
            if half_open {
                self.count_fault("half-open link");
            }
            let deaf = self.rng.gen_range(0..2);
            for (i, l) in eps.into_iter().enumerate() {
                if half_open && i == deaf {
                    continue;
                }
                if self.eps.get(&l).is_some_and(|e| e.open) {
                    let at = self.now + self.rng.gen_range(100_000..5 * MS);
                    self.schedule(at, Ev::LinkDown(l));
                }
            }
        }
        if !self.cfg.gossip {
            let at = self.now + self.rng.gen_range(50 * MS..300 * MS);
            self.schedule(at, Ev::Dial(nodes[0], nodes[1]));
        }
    }

    /// Gossip: `from` dials `to` (which accepts, unless it is down or the
    /// partition separates them: then the dial fails after a while).
    fn connect(&mut self, from: usize, inc: u64, to: usize) {
        if self.nodes[from].inc != inc || self.nodes[from].ctrl.is_none() {
            return;
        }
        if self.nodes[to].ctrl.is_none() || self.rules.cut(from, to) {
            // A refused connection answers fast; a partition only times out.
            let delay = if self.rules.cut(from, to) {
                self.rng.gen_range(50 * MS..300 * MS)
            } else {
                self.rng.gen_range(MS..5 * MS)
            };
            self.schedule(self.now + delay, Ev::DialFailed { from, inc, to });
            return;
        }
        let id = self.open_conn(from, to);
        self.start_handshake(id, "connect");
    }

    /// Drops a connection whose both ends are closed (gossip runs open and
    /// close links all the time).
    fn reap_conn(&mut self, id: u64) {
        let Some(c) = self.conns.get(&id) else { return };
        let closed = !c.alive
            && c.eps
                .iter()
                .all(|l| self.eps.get(l).is_none_or(|e| !e.open));
        if closed && self.cfg.gossip {
            let eps = c.eps;
            self.conns.remove(&id);
            for l in eps {
                self.eps.remove(&l);
            }
        }
    }

    fn sample_links(&mut self) {
        let most = self
            .nodes
            .iter()
            .filter_map(|n| n.ctrl.as_ref())
            .map(|c| c.link_count())
            .max()
            .unwrap_or(0);
        self.report.max_links_per_controller = self.report.max_links_per_controller.max(most);
    }

    /// `measure`: one controller crashes silently for good.
    fn kill_one(&mut self) {
        let live: Vec<usize> = (0..self.nodes.len())
            .filter(|i| self.nodes[*i].ctrl.is_some())
            .collect();
        if live.len() < 2 {
            self.detected = true;
            return;
        }
        let node = *live.choose(&mut self.rng).expect("non-empty");
        self.note(|| format!("kill ctrl {} for good", node + 1));
        // Silent: the others learn it from the failure detector.
        self.vanish(node, true);
        self.killed = Some((node, self.now));
        let at = self.now + Self::nanos(self.cfg.protocol_period);
        self.schedule(at, Ev::DetectCheck);
    }

    fn detect_check(&mut self) {
        let Some((dead, at)) = self.killed else {
            return;
        };
        let id = NodeId(dead as u32 + 1);
        let all = self
            .nodes
            .iter()
            .filter_map(|n| n.ctrl.as_ref())
            .all(|c| c.member_state(id) == Some(fractos_core::MemberState::Dead));
        if all {
            self.detected = true;
            self.report.detection_nanos = Some(self.now - at);
            self.report.period_nanos = Self::nanos(self.cfg.protocol_period);
            self.sample_links();
            return;
        }
        let limit = 200 * Self::nanos(self.cfg.protocol_period);
        if self.now - at > limit {
            return self.fail(format!(
                "controller {} killed {} ms ago is still not confirmed dead by every live controller",
                dead + 1,
                (self.now - at) / MS
            ));
        }
        let next = self.now + Self::nanos(self.cfg.protocol_period);
        self.schedule(next, Ev::DetectCheck);
    }

    fn send_link(&mut self, node: usize, l: LinkId, frame: Vec<u8>) {
        let Some(ep) = self.eps.get(&l) else {
            return self.fail(format!(
                "controller {} sent on unknown link {l:?}",
                node + 1
            ));
        };
        if !ep.open || ep.node != node {
            return self.fail(format!(
                "controller {} sent on link {l:?} after it was closed",
                node + 1
            ));
        }
        let (cid, side) = (ep.conn, ep.side);
        let c = &self.conns[&cid];
        if !c.alive {
            return;
        }
        let (from, to, to_ep, last) = (
            c.nodes[side],
            c.nodes[1 - side],
            c.eps[1 - side],
            c.last[side],
        );
        let latency = Self::nanos(self.cfg.latency);
        match self
            .rules
            .judge(&mut self.rng, self.now, latency, from, to, last)
        {
            Verdict::Deliver(at) => {
                self.conns.get_mut(&cid).expect("present").last[side] = at;
                if frame.get(5) != Some(&PING_KIND) {
                    self.inflight += 1;
                }
                self.schedule(at, Ev::LinkFrame { to: to_ep, frame });
            }
            Verdict::Reset => {
                self.count_fault("frame lost (reset)");
                self.note(|| format!("FAULT frame lost: reset {}<->{}", from + 1, to + 1));
                self.kill_conn(cid, true);
            }
        }
    }

    fn link_frame(&mut self, to: LinkId, frame: Vec<u8>) {
        if frame.get(5) != Some(&PING_KIND) {
            self.inflight -= 1;
        }
        let Some(ep) = self.eps.get(&to) else { return };
        if !ep.open || !self.conns.get(&ep.conn).is_some_and(|c| c.alive) {
            return;
        }
        let (node, inc) = (ep.node, ep.inc);
        if self.nodes[node].inc != inc || self.nodes[node].ctrl.is_none() {
            return;
        }
        self.report.messages += 1;
        self.hash(to.0, &frame);
        let body = match frame_body(&frame, MAX_FRAME_LEN) {
            Ok(b) => b,
            Err(e) => return self.fail(format!("controller emitted a bad frame: {e}")),
        };
        if self.cfg.keep_trace && body.get(1) != Some(&PING_KIND) {
            let s = summarize_peer(body);
            self.note(|| format!("-> ctrl {} via {to:?}: {s}", node + 1));
        }
        let now = Instant(self.now);
        self.nodes[node]
            .ctrl
            .as_mut()
            .expect("checked")
            .link_message(now, to, body);
        self.drain(node);
    }

    fn link_down(&mut self, l: LinkId) {
        let Some(ep) = self.eps.get_mut(&l) else {
            return;
        };
        if !ep.open {
            return;
        }
        ep.open = false;
        let (node, inc) = (ep.node, ep.inc);
        if self.nodes[node].inc != inc {
            return;
        }
        let now = Instant(self.now);
        let conn = ep.conn;
        self.note(|| format!("link_disconnected ctrl {} {l:?}", node + 1));
        if let Some(c) = self.nodes[node].ctrl.as_mut() {
            c.link_disconnected(now, l);
            self.drain(node);
        }
        self.reap_conn(conn);
    }

    // ------------------------------------------------------------ controllers

    /// Pulls every output of `node` and routes it.
    fn drain(&mut self, node: usize) {
        self.touched.insert(node);
        loop {
            let Some(c) = self.nodes[node].ctrl.as_mut() else {
                return;
            };
            let Some(out) = c.poll_output() else { break };
            match out {
                Output::Send {
                    to: Dest::Link(l),
                    frame,
                } => self.send_link(node, l, frame),
                Output::Send {
                    to: Dest::Process(chan),
                    frame,
                } => self.on_ctrl_frame(node, chan, frame),
                Output::Close {
                    to: Dest::Link(l),
                    reason,
                } => {
                    self.note(|| format!("ctrl {} closes {l:?}: {reason:?}", node + 1));
                    if let Some(ep) = self.eps.get_mut(&l) {
                        ep.open = false;
                        let cid = ep.conn;
                        self.kill_conn(cid, true);
                        self.reap_conn(cid);
                    }
                }
                Output::Connect { peer } => {
                    let to = peer.0 as usize - 1;
                    let inc = self.nodes[node].inc;
                    if to >= self.nodes.len() || to == node {
                        let at = self.now + MS;
                        self.schedule(
                            at,
                            Ev::DialFailed {
                                from: node,
                                inc,
                                to,
                            },
                        );
                    } else {
                        // Connection setup takes a round trip.
                        let at = self.now + 2 * Self::nanos(self.cfg.latency);
                        self.schedule(
                            at,
                            Ev::Connect {
                                from: node,
                                inc,
                                to,
                            },
                        );
                    }
                }
                Output::Close {
                    to: Dest::Process(chan),
                    reason,
                } => self.proc_closed(node, chan, reason),
            }
        }
        loop {
            let Some(c) = self.nodes[node].ctrl.as_mut() else {
                return;
            };
            let Some(access) = c.poll_mem_access() else {
                break;
            };
            self.on_direct_access(node, access);
        }
        self.rearm(node);
    }

    /// A direct memory access the controller asks of the driver: checked
    /// like a MemRead/MemWrite frame, served a moment later.
    fn on_direct_access(&mut self, node: usize, access: MemAccess) {
        let (chan, addr, len, write) = match &access {
            MemAccess::Read {
                chan, addr, len, ..
            } => (*chan, *addr, *len as u64, false),
            MemAccess::Write {
                chan, addr, data, ..
            } => (*chan, *addr, data.len() as u64, true),
        };
        if let Err(e) = self.oracle.check_access(self.tick, chan, addr, len, write) {
            return self.fail(e);
        }
        self.report.direct_accesses += 1;
        let inc = self.nodes[node].inc;
        let at = self.now + self.rng.gen_range(1_000..=PROC_LATENCY);
        self.schedule(at, Ev::DirectMem { node, inc, access });
    }

    /// Serves a direct access from (into) the process's memory, as a
    /// driver with the memory mapped would, and completes it.
    fn direct_mem(&mut self, node: usize, inc: u64, access: MemAccess) {
        if self.nodes[node].inc != inc {
            return; // the controller that asked is gone
        }
        let chan = access.chan();
        let Some(&p) = self.chans.get(&chan) else {
            return;
        };
        if !self.procs[p].alive {
            return;
        }
        let now = Instant(self.now);
        let mem = &mut self.procs[p].mem;
        let Some(c) = self.nodes[node].ctrl.as_mut() else {
            return;
        };
        match access {
            MemAccess::Read {
                xfer, addr, len, ..
            } => {
                let end = addr.checked_add(len as u64);
                let result = match end {
                    Some(e) if e <= mem.len() as u64 => Ok(mem[addr as usize..e as usize].to_vec()),
                    _ => Err(ErrorCode::MemoryFault),
                };
                c.mem_read_done(now, chan, xfer, result);
            }
            MemAccess::Write {
                xfer, addr, data, ..
            } => {
                let end = addr.checked_add(data.len() as u64);
                let result = match end {
                    Some(e) if e <= mem.len() as u64 => {
                        mem[addr as usize..e as usize].copy_from_slice(&data);
                        Ok(())
                    }
                    _ => Err(ErrorCode::MemoryFault),
                };
                c.mem_write_done(now, chan, xfer, result);
            }
        }
        self.drain(node);
    }

    fn crash(&mut self, node: usize, silent: bool) {
        if !self.rules.active || self.nodes[node].ctrl.is_none() {
            return;
        }
        self.count_fault(if silent {
            "controller crash (silent)"
        } else {
            "controller crash (reset)"
        });
        self.note(|| format!("FAULT crash ctrl {} (silent: {silent})", node + 1));
        self.vanish(node, silent);
        let at = self.now + self.rng.gen_range(200 * MS..1_000 * MS);
        self.schedule(at, Ev::Restart(node));
    }

    /// The controller and all its processes vanish; its connections die
    /// (the peers are told, unless `silent`).
    fn vanish(&mut self, node: usize, silent: bool) {
        let n = &mut self.nodes[node];
        if let Some(c) = n.ctrl.take() {
            self.report.revokes_held_for_copies += c.metrics().revokes_held_for_copies;
        }
        n.armed = None;
        let inc = n.inc;
        self.oracle
            .dead_incarnations
            .insert((NodeId(node as u32 + 1), inc), self.tick);
        for p in &mut self.procs {
            if p.node == node && p.alive {
                p.alive = false;
            }
        }
        let mine: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.alive && c.nodes.contains(&node))
            .map(|(id, _)| *id)
            .collect();
        for id in mine {
            let c = &self.conns[&id];
            let side = if c.nodes[0] == node { 0 } else { 1 };
            let own = c.eps[side];
            if let Some(e) = self.eps.get_mut(&own) {
                e.open = false;
            }
            self.kill_conn(id, !silent);
        }
    }

    fn restart(&mut self, node: usize) {
        if self.nodes[node].ctrl.is_some() {
            return;
        }
        let inc = self.nodes[node].inc + 1;
        let cfg = self.controller_config(node, inc);
        self.note(|| format!("restart ctrl {} incarnation {inc}", node + 1));
        let n = &mut self.nodes[node];
        n.inc = inc;
        n.ctrl = Some(Controller::new(cfg, Instant(self.now)));
        n.armed = None;
        self.rearm(node);
        for other in 0..self.nodes.len() {
            if other != node && !self.cfg.gossip {
                let at = self.now + self.rng.gen_range(0..5 * MS);
                self.schedule(at, Ev::Dial(node, other));
            }
        }
        let stop = Self::nanos(self.cfg.stop_at);
        for _ in 0..self.cfg.procs_per_controller {
            let at = self.now + 20 * MS + self.rng.gen_range(0..10 * MS);
            if at + 100 * MS < stop {
                self.spawn_proc(node, at, false);
            }
        }
    }

    // -------------------------------------------------------------- processes

    fn proc_start(&mut self, p: usize) {
        let node = self.procs[p].node;
        if self.nodes[node].ctrl.is_none() || self.nodes[node].inc != self.procs[p].inc {
            return; // its controller died before it started
        }
        let chan = self.procs[p].chan;
        self.procs[p].alive = true;
        let now = Instant(self.now);
        self.nodes[node]
            .ctrl
            .as_mut()
            .expect("checked")
            .process_connected(now, chan);
        // Half the processes have memory the driver reaches directly (a
        // mapped shared-memory region, an RDMA memory region).
        if self.cfg.direct_memory && self.rng.gen_bool(0.5) {
            if let Some(c) = self.nodes[node].ctrl.as_mut() {
                c.set_direct_memory(chan, true);
            }
        }
        self.drain(node);
        let name = self.procs[p].name.clone();
        let mut token = process_token(&self.key, &name);
        if self.procs[p].rogue {
            if self.rng.gen_bool(0.5) {
                token[0] ^= 1;
            } else {
                // An operation before Attach.
                let op = ProcessMsg::Lookup {
                    op: 1,
                    name: b"x".to_vec(),
                    wait_ms: 0,
                };
                self.send_to_ctrl(p, &op);
            }
        }
        self.send_to_ctrl(p, &ProcessMsg::Attach { name, token });
    }

    fn send_to_ctrl(&mut self, p: usize, msg: &ProcessMsg) {
        let mut frame = Vec::new();
        msg.encode(&mut frame);
        let chan = self.procs[p].chan;
        if self.cfg.keep_trace {
            let s = summarize_proc(msg);
            self.note(|| format!("{chan:?} sends {s}"));
        }
        // A stalled process sends nothing until the stall ends; its frames
        // stay in order.
        let at = (self.now + PROC_LATENCY).max(self.procs[p].stalled_until);
        self.schedule(at, Ev::ToCtrl { chan, frame });
    }

    fn deliver_to_ctrl(&mut self, chan: ChannelId, frame: Vec<u8>) {
        let p = self.chans[&chan];
        if !self.procs[p].alive {
            return;
        }
        let node = self.procs[p].node;
        self.report.process_frames += 1;
        self.hash(u64::MAX - chan.0, &frame);
        let body = frame_body(&frame, MAX_FRAME_LEN).expect("we encoded it");
        let now = Instant(self.now);
        self.nodes[node]
            .ctrl
            .as_mut()
            .expect("a live process has a live controller")
            .process_message(now, chan, body);
        self.drain(node);
    }

    /// A frame a controller sends to a process: checked and recorded now
    /// (while the controllers' state matches it), delivered a moment later.
    fn on_ctrl_frame(&mut self, node: usize, chan: ChannelId, frame: Vec<u8>) {
        let Some(&p) = self.chans.get(&chan) else {
            return self.fail(format!("controller {} sent to unknown {chan:?}", node + 1));
        };
        if !self.procs[p].alive {
            return self.fail(format!(
                "controller {} sent to {chan:?} after the process disconnected",
                node + 1
            ));
        }
        let body = frame_body(&frame, MAX_FRAME_LEN).expect("controller frames are whole");
        let msg = match ControllerMsg::decode(body) {
            Ok(m) => m,
            Err(e) => return self.fail(format!("controller sent an undecodable frame: {e}")),
        };
        if self.cfg.keep_trace {
            let s = summarize_ctrl(&msg);
            self.note(|| format!("ctrl {} -> {chan:?}: {s}", node + 1));
        }
        let mut regs = Vec::new();
        let res: Result<(), String> = (|| {
            match &msg {
                ControllerMsg::Completion {
                    result: Ok(fractos_wire::Reply::Cap { handle, info }),
                    ..
                } => regs.push(self.register(node, chan, *handle, *info)?),
                ControllerMsg::Invocation { tag, imms, caps } => {
                    for (h, info) in caps {
                        regs.push(self.register(node, chan, *h, *info)?);
                    }
                    self.check_invocation(chan, *tag, imms, caps.len())?;
                }
                ControllerMsg::MemRead { addr, len, .. } => {
                    self.oracle
                        .check_access(self.tick, chan, *addr, *len as u64, false)?
                }
                ControllerMsg::MemWrite { addr, data, .. } => {
                    self.oracle
                        .check_access(self.tick, chan, *addr, data.len() as u64, true)?
                }
                ControllerMsg::Attached { .. } if self.procs[p].rogue => {
                    return Err(format!("rogue process {chan:?} was accepted"))
                }
                ControllerMsg::Rejected { code, .. } if !self.procs[p].rogue => {
                    return Err(format!("process {chan:?} was rejected: {code:?}"))
                }
                ControllerMsg::Rejected { code, .. } => {
                    if !matches!(code, ErrorCode::AuthFailed | ErrorCode::NotAttached) {
                        return Err(format!("rogue {chan:?} rejected with {code:?}"));
                    }
                    self.procs[p].attached = true; // marks "rejected as expected"
                }
                _ => {}
            }
            Ok(())
        })();
        if let Err(e) = res {
            return self.fail(e);
        }
        let pulled = self.tick;
        self.schedule(
            self.now + PROC_LATENCY,
            Ev::ToProc {
                proc: p,
                msg,
                regs,
                pulled,
            },
        );
    }

    fn check_invocation(
        &mut self,
        chan: ChannelId,
        tag: u64,
        imms: &[u8],
        ncaps: usize,
    ) -> Result<(), String> {
        let n = imms.len();
        if n < 16 || imms[n - 16..n - 8] != INVOKE_MAGIC {
            // A monitor notification or a copy completion: no arguments.
            let key = (chan, tag, imms.to_vec());
            let seen = self.oracle.notified.entry(key.clone()).or_insert(0);
            *seen += 1;
            let budget = self.oracle.notify_budget.get(&key).copied().unwrap_or(0);
            if *seen > budget && !self.oracle.notify_unknown {
                return Err(format!(
                    "{chan:?} received argument-less invocation #{seen} of tag {tag:#x}, but only {budget} monitors/copy completions could send it"
                ));
            }
            return Ok(());
        }
        let id = u64::from_le_bytes(imms[n - 8..].try_into().expect("8 bytes"));
        let Some(inv) = self.oracle.invokes.get_mut(&id) else {
            return Err(format!("{chan:?} received unknown invocation {id}"));
        };
        inv.delivered += 1;
        if inv.delivered > 1 {
            return Err(format!("invocation {id} delivered twice"));
        }
        if inv.refused {
            return Err(format!(
                "invocation {id} delivered after its invoke failed definitively"
            ));
        }
        if let Some(owner) = inv.owner {
            if owner != chan {
                return Err(format!(
                    "invocation {id} delivered to {chan:?}, the Request belongs to {owner:?}"
                ));
            }
        }
        if let Some((etag, eimms, ecaps)) = &inv.expect {
            if *etag != tag || eimms.as_slice() != imms || *ecaps != ncaps {
                return Err(format!(
                    "invocation {id}: got tag {tag:#x}, {} imms, {ncaps} caps; expected tag {etag:#x}, imms {:?}, {ecaps} caps (got {:?})",
                    imms.len(),
                    String::from_utf8_lossy(eimms),
                    String::from_utf8_lossy(imms)
                ));
            }
        }
        Ok(())
    }

    /// Records a handle a controller just gave `chan`: its capability, its
    /// ancestor chain at the owner, and its window; checks monotonicity.
    fn register(
        &self,
        node: usize,
        chan: ChannelId,
        handle: Handle,
        info: CapInfo,
    ) -> Result<HandleRec, String> {
        let ctrl = self.nodes[node]
            .ctrl
            .as_ref()
            .expect("draining a live controller");
        let (cap, cinfo) = ctrl.debug_handle(chan, handle).ok_or_else(|| {
            format!(
                "controller {} gave {chan:?} handle {handle:?} but holds no entry for it",
                node + 1
            )
        })?;
        if cinfo != info {
            return Err(format!(
                "{chan:?} handle {handle:?}: message says {info:?}, table says {cinfo:?}"
            ));
        }
        let mut rec = HandleRec {
            cap,
            info,
            chain: vec![cap],
            win: None,
            owner: None,
            dead_at: None,
            binds: None,
        };
        let owner = cap.node.0 as usize;
        let Some(on) = owner.checked_sub(1).and_then(|i| self.nodes.get(i)) else {
            return Err(format!("{cap:?} names no controller"));
        };
        match (&on.ctrl, on.inc == cap.incarnation) {
            (Some(oc), true) => match oc.debug_cap(cap) {
                None => rec.dead_at = Some(self.tick),
                Some(d) => {
                    if d.kind != info.kind
                        || d.rights != info.rights
                        || (d.kind == ObjectKind::Memory && d.len != info.len)
                    {
                        return Err(format!(
                            "{chan:?} was told {info:?} of {cap:?}, the owner has {d:?}"
                        ));
                    }
                    rec.owner = Some(d.owner);
                    if d.kind == ObjectKind::Memory {
                        rec.win = Some(Win {
                            chan: d.owner,
                            addr: d.addr,
                            len: d.len,
                        });
                    }
                    let mut child = d;
                    let mut next = d.parent;
                    while let Some(pc) = next {
                        let pd = oc
                            .debug_cap(pc)
                            .ok_or_else(|| format!("live {cap:?} has a dead ancestor {pc:?}"))?;
                        if !pd.rights.contains(child.rights) {
                            return Err(format!(
                                "rights grew along a derivation: {pc:?} has {:?}, its child {:?}",
                                pd.rights, child.rights
                            ));
                        }
                        if pd.kind != child.kind
                            || pd.owner != child.owner
                            || (pd.kind == ObjectKind::Memory
                                && (child.addr < pd.addr
                                    || child.addr + child.len > pd.addr + pd.len))
                        {
                            return Err(format!(
                                "window grew along a derivation: parent {pd:?}, child {child:?}"
                            ));
                        }
                        rec.chain.push(pc);
                        if rec.chain.len() > 1_000_000 {
                            return Err(format!("derivation chain of {cap:?} loops"));
                        }
                        child = pd;
                        next = pd.parent;
                    }
                }
            },
            _ => {
                if !self
                    .oracle
                    .dead_incarnations
                    .contains_key(&(cap.node, cap.incarnation))
                {
                    return Err(format!("{cap:?} names an incarnation that never existed"));
                }
                rec.dead_at = Some(self.tick);
            }
        }
        for c in &rec.chain {
            if let Some(t) = self.oracle.revoked.get(c) {
                if rec.dead_at.is_none() {
                    return Err(format!(
                        "{chan:?} received live {cap:?} descending from {c:?}, revoked at tick {t}"
                    ));
                }
            }
        }
        if info.kind == ObjectKind::Request {
            rec.binds = self.oracle.binding_of(&rec.chain);
        }
        Ok(rec)
    }

    fn proc_closed(&mut self, node: usize, chan: ChannelId, reason: CloseReason) {
        let p = self.chans[&chan];
        self.note(|| format!("ctrl {} closes {chan:?}: {reason:?}", node + 1));
        if !self.procs[p].rogue {
            return self.fail(format!("process {chan:?} was kicked: {reason:?}"));
        }
        self.procs[p].alive = false;
    }

    fn deliver_to_proc(&mut self, p: usize, msg: ControllerMsg, regs: Vec<HandleRec>, pulled: u64) {
        if !self.procs[p].alive {
            return;
        }
        self.report.process_frames += 1;
        let chan = self.procs[p].chan;
        match msg {
            ControllerMsg::Attached { .. } => {
                self.procs[p].attached = true;
                self.schedule_tick(p);
            }
            ControllerMsg::Rejected { .. } => {}
            ControllerMsg::Completion { op, result } => {
                if result.is_ok() {
                    self.report.succeeded += 1;
                }
                let reg = regs.into_iter().next();
                let r = self.procs[p].on_completion(op, result, reg, &mut self.oracle, pulled);
                match r {
                    Err(e) => return self.fail(e),
                    Ok(Some(idx)) => self.check_copy(idx),
                    Ok(None) => {}
                }
                if self.stopping && self.procs[p].outstanding.is_empty() {
                    self.exit_proc(p);
                }
            }
            ControllerMsg::Invocation { caps, .. } => {
                for ((h, info), rec) in caps.into_iter().zip(regs) {
                    if let Some(sc) = self.procs[p].script.as_mut() {
                        if info.kind == ObjectKind::Memory && info.rights.contains(Rights::WRITE) {
                            sc.received_mem = Some(h);
                        }
                    }
                    if self.procs[p].handles.insert(h, rec).is_some() {
                        return self.fail(format!(
                            "{chan:?} received handle {h:?} which it already holds"
                        ));
                    }
                }
            }
            ControllerMsg::MemRead { xfer, addr, len } => {
                let mem = &self.procs[p].mem;
                let end = addr.checked_add(len as u64);
                let result = match end {
                    Some(e) if e <= mem.len() as u64 => Ok(mem[addr as usize..e as usize].to_vec()),
                    _ => Err(ErrorCode::MemoryFault),
                };
                self.send_to_ctrl(p, &ProcessMsg::MemReadReply { xfer, result });
            }
            ControllerMsg::MemWrite { xfer, addr, data } => {
                let mem = &mut self.procs[p].mem;
                let end = addr.checked_add(data.len() as u64);
                let result = match end {
                    Some(e) if e <= mem.len() as u64 => {
                        mem[addr as usize..e as usize].copy_from_slice(&data);
                        Ok(())
                    }
                    _ => Err(ErrorCode::MemoryFault),
                };
                self.send_to_ctrl(p, &ProcessMsg::MemWriteReply { xfer, result });
            }
        }
    }

    fn check_copy(&mut self, idx: usize) {
        let Some(excl) = self.oracle.copy_exclusions(idx, self.tick) else {
            if self.print_trace {
                eprintln!("copy #{idx} unchecked: {:?}", self.oracle.copies[idx]);
            }
            return;
        };
        let c = &self.oracle.copies[idx];
        let (Some(src), Some(dst)) = (c.src, c.dst) else {
            return;
        };
        let (Some(&sp), Some(&dp)) = (self.chans.get(&src.chan), self.chans.get(&dst.chan)) else {
            return;
        };
        if !self.procs[sp].alive || !self.procs[dp].alive {
            return;
        }
        let (s, d) = (&self.procs[sp].mem, &self.procs[dp].mem);
        let (sa, da, len) = (src.addr as usize, dst.addr as usize, src.len as usize);
        if sa + len > s.len() || da + len > d.len() {
            return self.fail(format!(
                "copy #{idx} of {src:?} into {dst:?} succeeded outside registered memory"
            ));
        }
        let mut skip = vec![false; len];
        for (lo, hi) in excl {
            skip[lo as usize..hi as usize].fill(true);
        }
        let mut compared = 0;
        for i in 0..len {
            if skip[i] {
                continue;
            }
            if s[sa + i] != d[da + i] {
                return self.fail(format!(
                    "copy #{idx} of {src:?} into {dst:?} succeeded but byte {i} differs"
                ));
            }
            compared += 1;
        }
        if compared > 0 {
            self.oracle.copies_checked += 1;
        }
        if self.print_trace {
            eprintln!("copy #{idx}: {compared} of {len} bytes compared ({src:?} -> {dst:?})");
        }
    }

    fn schedule_tick(&mut self, p: usize) {
        let mean = Self::nanos(self.cfg.think).max(1);
        let at = self.now + self.rng.gen_range(mean / 4..=mean * 2);
        self.schedule(at, Ev::ProcTick(p));
    }

    fn proc_tick(&mut self, p: usize) {
        if self.stopping || !self.procs[p].alive || self.procs[p].rogue {
            return;
        }
        if self.procs[p].can_issue() {
            let names = self.cfg.names;
            let (rng, oracle, tick) = (&mut self.rng, &mut self.oracle, self.tick);
            let msg = match self.procs[p].scripted_op(rng, oracle, tick, names) {
                Some(m) => m,
                None => self.procs[p].next_op(rng, oracle, tick, names),
            };
            self.report.operations += 1;
            self.send_to_ctrl(p, &msg);
        }
        if self.procs[p].ops_left > 0 {
            self.schedule_tick(p);
        }
    }

    /// A process exits (or crashes): its channel closes.
    fn exit_proc(&mut self, p: usize) {
        let proc = &mut self.procs[p];
        if !proc.alive {
            return;
        }
        proc.alive = false;
        let (node, chan) = (proc.node, proc.chan);
        let roots = std::mem::take(&mut proc.roots);
        for r in roots {
            self.oracle.revoke(r, self.tick);
        }
        self.note(|| format!("{chan:?} exits"));
        let now = Instant(self.now);
        if let Some(c) = self.nodes[node].ctrl.as_mut() {
            c.process_disconnected(now, chan);
            self.drain(node);
        }
    }

    // ------------------------------------------------------------------- end

    /// After the workload stopped: every operation must be answered within
    /// a bounded time, then (every process gone) the cluster must become
    /// empty and quiet.
    fn check_end(&mut self) {
        let stop = Self::nanos(self.cfg.stop_at);
        let op = Self::nanos(self.cfg.op_timeout);
        let deadline = stop + 3 * op + 1_000 * MS;
        let live = self.procs.iter().any(|p| p.alive);
        if live {
            if self.now >= deadline {
                self.deadline();
            } else {
                self.schedule(self.now + 100 * MS, Ev::Check);
            }
            return;
        }
        let limit = *self
            .settle_limit
            .get_or_insert(self.now + 2 * op + 2 * Self::nanos(self.cfg.peer_timeout) + 1_000 * MS);
        // Gossip with faults: members wrongly confirmed dead during the
        // faults get time to refute (20 protocol periods after the faults
        // ended) before the end checks the views.
        let refute_by = stop + 20 * Self::nanos(self.cfg.protocol_period);
        if (self.cfg.measure && !self.detected)
            || (self.cfg.gossip && self.cfg.faults && self.now < refute_by)
        {
            self.schedule(self.now + 100 * MS, Ev::Check);
            return;
        }
        // Gossip traffic never stops: there the controllers' own state (and
        // what waits for a link) tells whether the cluster settled.
        let quiet = (self.inflight == 0 || self.cfg.gossip)
            && self.nodes.iter().enumerate().all(|(i, n)| {
                if self.killed.is_some_and(|(k, _)| k == i) {
                    return true;
                }
                n.ctrl.as_ref().is_some_and(|c| {
                    let s = c.stats();
                    s == fractos_core::Stats {
                        peers: s.peers,
                        ..Default::default()
                    } && c.queued_frames() == 0
                })
            });
        if quiet || self.now >= limit {
            self.end();
        } else {
            self.schedule(self.now + 100 * MS, Ev::Check);
        }
    }

    /// Membership invariants at the end of a gossip run: without faults no
    /// live controller is confirmed dead (or suspected) by anyone, and a
    /// killed one is confirmed dead by everyone (`detect_check`). With
    /// faults, every controller up at the end that others believe dead has
    /// refuted it or restarted (a newer incarnation) — checked as: no
    /// controller believes a live one of the *current* incarnation dead.
    fn check_membership(&mut self) {
        if !self.cfg.gossip {
            return;
        }
        let mut dials = 0;
        let mut idle = 0;
        for (i, n) in self.nodes.iter().enumerate() {
            let Some(c) = &n.ctrl else { continue };
            let m = c.membership_stats();
            dials += m.dials_started;
            idle += m.idle_closed;
            for (node, inc, state) in c.members() {
                let j = node.0 as usize - 1;
                if j >= self.nodes.len() || self.killed.is_some_and(|(k, _)| k == j) {
                    continue;
                }
                let target = &self.nodes[j];
                let live_now = target.ctrl.is_some() && target.inc == inc;
                let bad = match state {
                    fractos_core::MemberState::Dead | fractos_core::MemberState::Left => live_now,
                    fractos_core::MemberState::Suspect => live_now && !self.cfg.faults,
                    fractos_core::MemberState::Alive => false,
                };
                if bad {
                    let msg = format!(
                        "controller {} believes live controller {} (incarnation {inc}) is {state:?} at the end{}",
                        i + 1,
                        j + 1,
                        if self.cfg.faults { " (faults healed long ago)" } else { " of a fault-free run" }
                    );
                    self.error.get_or_insert(msg);
                    return;
                }
            }
        }
        self.report.dials = dials;
        self.report.idle_closes = idle;
    }

    /// Without faults, every monitor whose watched capability was revoked
    /// (well before now) while its notification Request stayed alive must
    /// have fired.
    fn check_monitors_fired(&mut self) {
        let mut due: BTreeMap<crate::oracle::NotifyKey, u64> = BTreeMap::new();
        for m in &self.oracle.monitors {
            let died = m
                .watched
                .iter()
                .filter_map(|c| self.oracle.revoked_ns.get(c))
                .any(|t| *t + 500 * MS < self.now);
            let notify_dead = m.notify.iter().any(|c| self.oracle.revoked.contains_key(c));
            let owner_alive = self
                .chans
                .get(&m.key.0)
                .is_some_and(|p| self.procs[*p].alive);
            // A registration dies with its watcher; one still alive now was
            // alive when the watched capability died.
            let watcher_alive = self
                .chans
                .get(&m.watcher)
                .is_some_and(|p| self.procs[*p].alive);
            if died && !notify_dead && owner_alive && watcher_alive && m.notify_caps == 0 {
                *due.entry(m.key.clone()).or_insert(0) += 1;
                if self.print_trace {
                    eprintln!("monitor due: {m:?}");
                }
            }
        }
        for (key, n) in due {
            self.report.monitors_checked += n;
            let got = self.oracle.notified.get(&key).copied().unwrap_or(0);
            if got < n {
                return self.fail(format!(
                    "{n} monitors notifying {:?} (tag {:#x}) saw their capability revoked, but only {got} notifications arrived",
                    key.0, key.1
                ));
            }
        }
    }

    fn deadline(&mut self) {
        for p in 0..self.procs.len() {
            let pr = &self.procs[p];
            if pr.alive && !pr.rogue && !pr.outstanding.is_empty() {
                let ops: Vec<u64> = pr.outstanding.keys().copied().collect();
                return self.fail(format!(
                    "{:?} still waits for ops {ops:?} long after the workload stopped (an operation was never answered)",
                    pr.chan
                ));
            }
            if pr.rogue && pr.alive {
                return self.fail(format!("rogue {:?} was never rejected", pr.chan));
            }
        }
        self.fail("processes outlived the deadline".into());
    }

    fn end(&mut self) {
        self.ended = true;
        self.check_membership();
        if self.error.is_some() {
            return;
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if self.killed.is_some_and(|(k, _)| k == i) {
                continue;
            }
            let Some(c) = &n.ctrl else {
                return self.fail(format!("controller {} is down at the end", i + 1));
            };
            let s = c.stats();
            let leftovers = [
                ("processes", s.processes),
                ("objects", s.objects),
                ("caps", s.caps),
                ("handles", s.handles),
                ("names", s.names),
                ("name_waiters", s.name_waiters),
                ("calls", s.calls),
                ("copy_sources", s.copy_sources),
                ("copy_sinks", s.copy_sinks),
                ("monitors", s.monitors),
                ("monitors_max_per_watcher", s.monitors_max_per_watcher),
                ("pending_ops", s.pending_ops),
                ("published_names", s.published_names),
                ("waiting_lookups", s.waiting_lookups),
            ];
            let bad: Vec<String> = leftovers
                .iter()
                .filter(|(_, v)| *v != 0)
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            if !bad.is_empty() {
                let msg = format!(
                    "controller {} is not empty after every process exited and the cluster settled: {}",
                    i + 1,
                    bad.join(", ")
                );
                return self.fail(msg);
            }
            if let Err(e) = c.check_invariants() {
                return self.fail(format!("controller {} invariant at the end: {e}", i + 1));
            }
        }
        for (id, inv) in &self.oracle.invokes {
            if inv.delivered > 1 {
                let msg = format!("invocation {id} delivered {} times", inv.delivered);
                return self.fail(msg);
            }
        }
    }
}
