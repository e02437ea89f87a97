//! A small deterministic test network: controllers in a full mesh, test
//! processes that serve their memory automatically, and virtual time.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use fractos_core::{
    process_token, ChannelId, CloseReason, Config, Controller, Dest, Instant, LinkId, LinkRole,
    MemAccess, Output,
};
use fractos_wire::{
    frame_body, CapInfo, ControllerMsg, ErrorCode, Handle, NodeId, ProcessMsg, Reply, MAX_FRAME_LEN,
};

pub const KEY: [u8; 32] = [42; 32];

/// An invocation as a process sees it: tag, immediates, capabilities.
pub type Delivered = (u64, Vec<u8>, Vec<(Handle, CapInfo)>);

/// A test process.
pub struct Proc {
    pub node: usize,
    pub chan: ChannelId,
    pub memory: Vec<u8>,
    pub inbox: Vec<ControllerMsg>,
    pub closed: Option<CloseReason>,
    /// Answer memory accesses (tests switch this off to stall copies).
    pub serve_memory: bool,
    next_op: u64,
}

enum Input {
    Link {
        to: usize,
        from: usize,
        frame: Vec<u8>,
    },
    Proc {
        proc: usize,
        frame: Vec<u8>,
    },
}

pub struct Net {
    pub ctrls: Vec<Controller>,
    pub procs: Vec<Proc>,
    pub now: Instant,
    queue: VecDeque<Input>,
    /// Node pairs whose traffic is silently dropped.
    pub cut: BTreeSet<(usize, usize)>,
    pub closed_links: Vec<(usize, usize, CloseReason)>,
    /// Sees (and may rewrite) every peer frame body `(from, to, body)`
    /// before delivery; returning `false` drops it. An on-path attacker.
    pub tap: Option<Tap>,
    /// `MemRead` / `MemWrite` frames delivered to processes.
    pub mem_frames: usize,
    /// Memory accesses served directly by the "driver" (see
    /// [`Net::set_direct`]).
    pub direct_accesses: usize,
    /// Hold direct accesses in `held` instead of serving them (a stalled
    /// driver).
    pub hold_direct: bool,
    pub held: Vec<(usize, MemAccess)>,
    next_chan: u64,
}

/// See [`Net::tap`].
pub type Tap = Box<dyn FnMut(usize, usize, &mut Vec<u8>) -> bool>;

/// The lower index dials: controller `i`'s role on its link to `j`.
pub fn role(i: usize, j: usize) -> LinkRole {
    if i < j {
        LinkRole::Initiator {
            peer: NodeId(j as u32 + 1),
        }
    } else {
        LinkRole::Responder
    }
}

pub fn config(node: usize, n: usize, incarnation: u64) -> Config {
    let mut c = Config::new(NodeId(node as u32 + 1), incarnation, KEY);
    c.members = (0..n).map(|i| NodeId(i as u32 + 1)).collect();
    c.copy_chunk = 1024;
    c.copy_window = 2;
    c
}

impl Net {
    pub fn new(n: usize) -> Self {
        Self::with_configs((0..n).map(|i| config(i, n, 1)).collect())
    }

    pub fn with_configs(cfgs: Vec<Config>) -> Self {
        let now = Instant(1_000_000);
        let ctrls = cfgs.into_iter().map(|c| Controller::new(c, now)).collect();
        let mut net = Net {
            ctrls,
            procs: Vec::new(),
            now,
            queue: VecDeque::new(),
            cut: BTreeSet::new(),
            closed_links: Vec::new(),
            tap: None,
            mem_frames: 0,
            direct_accesses: 0,
            hold_direct: false,
            held: Vec::new(),
            next_chan: 1,
        };
        let n = net.ctrls.len();
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    net.ctrls[i].link_connected(now, LinkId(j as u64), role(i, j));
                }
            }
        }
        net.run();
        net
    }

    /// Restarts controller `i` with a new incarnation and reconnects it.
    pub fn restart(&mut self, i: usize, incarnation: u64) {
        let n = self.ctrls.len();
        for j in 0..n {
            if j != i {
                self.ctrls[j].link_disconnected(self.now, LinkId(i as u64));
            }
        }
        for p in self.procs.iter_mut().filter(|p| p.node == i) {
            p.closed = Some(CloseReason::PeerTimeout);
        }
        self.ctrls[i] = Controller::new(config(i, n, incarnation), self.now);
        for j in 0..n {
            if j != i {
                self.ctrls[i].link_connected(self.now, LinkId(j as u64), role(i, j));
                self.ctrls[j].link_connected(self.now, LinkId(i as u64), role(j, i));
            }
        }
        self.run();
    }

    /// Attaches a process named `name` to controller `node`.
    pub fn attach(&mut self, node: usize, name: &str) -> usize {
        let token = process_token(&KEY, name.as_bytes());
        self.attach_with(node, name, token)
    }

    pub fn attach_with(&mut self, node: usize, name: &str, token: [u8; 32]) -> usize {
        let p = self.connect(node);
        self.send(
            p,
            &ProcessMsg::Attach {
                name: name.as_bytes().to_vec(),
                token,
            },
        );
        p
    }

    /// Opens a channel without attaching.
    pub fn connect(&mut self, node: usize) -> usize {
        let chan = ChannelId(self.next_chan);
        self.next_chan += 1;
        self.ctrls[node].process_connected(self.now, chan);
        self.procs.push(Proc {
            node,
            chan,
            memory: (0..65536u32).map(|i| (i * 7 + node as u32) as u8).collect(),
            inbox: Vec::new(),
            closed: None,
            serve_memory: true,
            next_op: 1,
        });
        self.procs.len() - 1
    }

    pub fn send(&mut self, p: usize, msg: &ProcessMsg) {
        let mut frame = Vec::new();
        msg.encode(&mut frame);
        self.send_raw(p, &frame);
    }

    pub fn send_raw(&mut self, p: usize, frame: &[u8]) {
        let (node, chan) = (self.procs[p].node, self.procs[p].chan);
        let body = &frame[4..];
        self.ctrls[node].process_message(self.now, chan, body);
        self.run();
    }

    /// Delivers a raw frame body to controller `to` as if sent by `from`.
    pub fn send_link_raw(&mut self, to: usize, from: usize, body: &[u8]) {
        self.ctrls[to].link_message(self.now, fractos_core::LinkId(from as u64), body);
        self.run();
    }

    /// Answers the memory requests parked in `p`'s inbox while it did not
    /// serve memory (late answers, from its memory as it is now).
    pub fn serve_parked(&mut self, p: usize) {
        let mut parked = Vec::new();
        self.procs[p].inbox.retain(|m| {
            let mem = matches!(
                m,
                ControllerMsg::MemRead { .. } | ControllerMsg::MemWrite { .. }
            );
            if mem {
                parked.push(m.clone());
            }
            !mem
        });
        let serving = std::mem::replace(&mut self.procs[p].serve_memory, true);
        for m in parked {
            let mut f = Vec::new();
            m.encode(&mut f);
            self.deliver_to_proc(p, &f);
        }
        self.procs[p].serve_memory = serving;
        self.run();
    }

    /// Memory requests parked in `p`'s inbox: (reads, writes).
    pub fn parked(&self, p: usize) -> (usize, usize) {
        let inbox = &self.procs[p].inbox;
        (
            inbox
                .iter()
                .filter(|m| matches!(m, ControllerMsg::MemRead { .. }))
                .count(),
            inbox
                .iter()
                .filter(|m| matches!(m, ControllerMsg::MemWrite { .. }))
                .count(),
        )
    }

    /// Lets the "driver" serve `p`'s memory directly (no `MemRead` /
    /// `MemWrite` frames): accesses are polled with `poll_mem_access` and
    /// performed on `p`'s memory by [`Net::run`].
    pub fn set_direct(&mut self, p: usize, direct: bool) {
        let (node, chan) = (self.procs[p].node, self.procs[p].chan);
        assert!(self.ctrls[node].set_direct_memory(chan, direct));
    }

    /// Performs one direct memory access for controller `i`, as a driver
    /// with the process's memory mapped would.
    fn serve_direct(&mut self, i: usize, access: MemAccess) {
        if self.hold_direct {
            self.held.push((i, access));
            return;
        }
        self.direct_accesses += 1;
        let Some(p) = self.proc_by_chan(i, access.chan()) else {
            return;
        };
        let now = self.now;
        match access {
            MemAccess::Read {
                chan,
                xfer,
                addr,
                len,
                ..
            } => {
                let (a, l) = (addr as usize, len as usize);
                let data = self.procs[p]
                    .memory
                    .get(a..a + l)
                    .map(|s| s.to_vec())
                    .ok_or(ErrorCode::MemoryFault);
                self.ctrls[i].mem_read_done(now, chan, xfer, data);
            }
            MemAccess::Write {
                chan,
                xfer,
                addr,
                data,
            } => {
                let a = addr as usize;
                let result = match self.procs[p].memory.get_mut(a..a + data.len()) {
                    Some(s) => {
                        s.copy_from_slice(&data);
                        Ok(())
                    }
                    None => Err(ErrorCode::MemoryFault),
                };
                self.ctrls[i].mem_write_done(now, chan, xfer, result);
            }
        }
    }

    /// Serves the held direct accesses now.
    pub fn serve_held(&mut self) {
        let hold = std::mem::replace(&mut self.hold_direct, false);
        for (i, access) in std::mem::take(&mut self.held) {
            self.serve_direct(i, access);
        }
        self.hold_direct = hold;
        self.run();
    }

    /// Disconnects a process.
    pub fn exit(&mut self, p: usize) {
        let (node, chan) = (self.procs[p].node, self.procs[p].chan);
        self.procs[p].closed = Some(CloseReason::Duplicate);
        self.ctrls[node].process_disconnected(self.now, chan);
        self.run();
    }

    fn proc_by_chan(&self, node: usize, chan: ChannelId) -> Option<usize> {
        self.procs
            .iter()
            .position(|p| p.node == node && p.chan == chan && p.closed.is_none())
    }

    /// Delivers everything until no controller has output.
    pub fn run(&mut self) {
        loop {
            let mut progressed = false;
            for i in 0..self.ctrls.len() {
                while let Some(out) = self.ctrls[i].poll_output() {
                    progressed = true;
                    match out {
                        Output::Send {
                            to: Dest::Link(l),
                            frame,
                        } => {
                            let j = l.0 as usize;
                            if !self.cut.contains(&(i.min(j), i.max(j))) {
                                self.queue.push_back(Input::Link {
                                    to: j,
                                    from: i,
                                    frame,
                                });
                            }
                        }
                        Output::Send {
                            to: Dest::Process(c),
                            frame,
                        } => {
                            if let Some(p) = self.proc_by_chan(i, c) {
                                self.queue.push_back(Input::Proc { proc: p, frame });
                            }
                        }
                        Output::Close {
                            to: Dest::Process(c),
                            reason,
                        } => {
                            if let Some(p) = self.proc_by_chan(i, c) {
                                self.procs[p].closed = Some(reason);
                            }
                        }
                        Output::Close {
                            to: Dest::Link(l),
                            reason,
                        } => {
                            self.closed_links.push((i, l.0 as usize, reason));
                        }
                        // The harness keeps a full mesh (gossip is off).
                        Output::Connect { .. } => {}
                    }
                }
                while let Some(access) = self.ctrls[i].poll_mem_access() {
                    progressed = true;
                    self.serve_direct(i, access);
                }
            }
            while let Some(input) = self.queue.pop_front() {
                progressed = true;
                match input {
                    Input::Link { to, from, frame } => {
                        let mut body = frame_body(&frame, MAX_FRAME_LEN + 64)
                            .expect("controllers send valid frames")
                            .to_vec();
                        if let Some(tap) = self.tap.as_mut() {
                            if !tap(from, to, &mut body) {
                                continue;
                            }
                        }
                        self.ctrls[to].link_message(self.now, LinkId(from as u64), &body);
                    }
                    Input::Proc { proc, frame } => self.deliver_to_proc(proc, &frame),
                }
            }
            if !progressed {
                break;
            }
        }
    }

    fn deliver_to_proc(&mut self, p: usize, frame: &[u8]) {
        let msg = ControllerMsg::decode(frame_body(frame, MAX_FRAME_LEN).unwrap()).unwrap();
        if matches!(
            msg,
            ControllerMsg::MemRead { .. } | ControllerMsg::MemWrite { .. }
        ) {
            self.mem_frames += 1;
        }
        let node = self.procs[p].node;
        let chan = self.procs[p].chan;
        let reply = match &msg {
            ControllerMsg::MemRead { xfer, addr, len } if self.procs[p].serve_memory => {
                let mem = &self.procs[p].memory;
                let (a, l) = (*addr as usize, *len as usize);
                let result = mem
                    .get(a..a + l)
                    .map(|s| s.to_vec())
                    .ok_or(ErrorCode::MemoryFault);
                Some(ProcessMsg::MemReadReply {
                    xfer: *xfer,
                    result,
                })
            }
            ControllerMsg::MemWrite { xfer, addr, data } if self.procs[p].serve_memory => {
                let a = *addr as usize;
                let mem = &mut self.procs[p].memory;
                let result = match mem.get_mut(a..a + data.len()) {
                    Some(s) => {
                        s.copy_from_slice(data);
                        Ok(())
                    }
                    None => Err(ErrorCode::MemoryFault),
                };
                Some(ProcessMsg::MemWriteReply {
                    xfer: *xfer,
                    result,
                })
            }
            _ => None,
        };
        match reply {
            Some(r) => {
                let mut f = Vec::new();
                r.encode(&mut f);
                self.ctrls[node].process_message(self.now, chan, &f[4..]);
            }
            None => self.procs[p].inbox.push(msg),
        }
    }

    /// Advances virtual time by `d`, firing timers on the way.
    pub fn advance(&mut self, d: Duration) {
        let end = self.now.after(d);
        loop {
            let next = self.ctrls.iter().filter_map(|c| c.poll_timeout()).min();
            match next {
                Some(t) if t <= end => {
                    self.now = self.now.max(t);
                    for i in 0..self.ctrls.len() {
                        self.ctrls[i].handle_timeout(self.now);
                    }
                    self.run();
                }
                _ => break,
            }
        }
        self.now = end;
    }

    /// Sends an operation and returns its completion (panics if none).
    pub fn op(
        &mut self,
        p: usize,
        make: impl FnOnce(u64) -> ProcessMsg,
    ) -> Result<Reply, ErrorCode> {
        let op = self.start(p, make);
        self.completion(p, op)
            .unwrap_or_else(|| panic!("op {op} of process {p} got no completion"))
    }

    /// Sends an operation without waiting; returns its id.
    pub fn start(&mut self, p: usize, make: impl FnOnce(u64) -> ProcessMsg) -> u64 {
        let op = self.procs[p].next_op;
        self.procs[p].next_op += 1;
        let msg = make(op);
        self.send(p, &msg);
        op
    }

    /// Takes the completion of `op` from the inbox, if it arrived.
    pub fn completion(&mut self, p: usize, op: u64) -> Option<Result<Reply, ErrorCode>> {
        let inbox = &mut self.procs[p].inbox;
        let pos = inbox
            .iter()
            .position(|m| matches!(m, ControllerMsg::Completion { op: o, .. } if *o == op))?;
        match inbox.remove(pos) {
            ControllerMsg::Completion { result, .. } => {
                assert!(
                    !inbox
                        .iter()
                        .any(|m| matches!(m, ControllerMsg::Completion { op: o, .. } if *o == op)),
                    "op {op} completed twice"
                );
                Some(result)
            }
            _ => unreachable!(),
        }
    }

    /// Takes the invocations delivered to `p`.
    pub fn invocations(&mut self, p: usize) -> Vec<Delivered> {
        let mut out = Vec::new();
        self.procs[p].inbox.retain(|m| match m {
            ControllerMsg::Invocation { tag, imms, caps } => {
                out.push((*tag, imms.clone(), caps.clone()));
                false
            }
            _ => true,
        });
        out
    }

    pub fn check(&self) {
        for c in &self.ctrls {
            c.check_invariants().unwrap();
        }
    }

    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for c in &self.ctrls {
            let s = c.stats();
            *m.entry("objects").or_default() += s.objects;
            *m.entry("caps").or_default() += s.caps;
            *m.entry("handles").or_default() += s.handles;
            *m.entry("names").or_default() += s.names;
            *m.entry("calls").or_default() += s.calls;
            *m.entry("monitors").or_default() += s.monitors;
            *m.entry("copies").or_default() += s.copy_sources + s.copy_sinks;
        }
        m
    }
}

/// The handle of a successful capability-returning reply.
pub fn handle(r: Result<Reply, ErrorCode>) -> Handle {
    match r {
        Ok(Reply::Cap { handle, .. }) => handle,
        other => panic!("expected a capability, got {other:?}"),
    }
}
