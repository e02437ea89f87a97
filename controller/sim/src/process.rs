//! Simulated processes: registered memory, a handle table as the process
//! sees it, a random workload over every operation, and the checks on each
//! answer.

use std::collections::BTreeMap;

use fractos_core::ChannelId;
use fractos_wire::{CapRef, ErrorCode, Handle, ObjectKind, ProcessMsg, Reply, Rights};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::oracle::{Binding, CopyRec, HandleRec, InvokeRec, Oracle, INVOKE_MAGIC};

/// An operation in flight, with what the oracle needs to judge its answer.
pub(crate) struct OpRec {
    pub kind: OpKind,
    /// Tick the process sent it.
    pub start: u64,
    /// The one answer the operation must get, when it is certain.
    pub expect: Option<ErrorCode>,
}

pub(crate) enum OpKind {
    MemoryCreate {
        addr: u64,
        len: u64,
        rights: Rights,
    },
    Diminish {
        parent: HandleRec,
        offset: u64,
        len: u64,
        rights: Rights,
    },
    RequestCreate {
        tag: u64,
        imms: Vec<u8>,
        caps: Vec<HandleRec>,
    },
    Derive {
        parent: HandleRec,
        imms: Vec<u8>,
        caps: Vec<HandleRec>,
    },
    Invoke {
        target: HandleRec,
        caps: Vec<HandleRec>,
        id: u64,
    },
    Copy {
        src: HandleRec,
        dst: HandleRec,
        completion: Option<HandleRec>,
        idx: usize,
    },
    Revoke {
        cap: HandleRec,
    },
    Drop,
    Monitor {
        cap: HandleRec,
        notify: HandleRec,
    },
    Publish {
        cap: HandleRec,
    },
    Unpublish,
    Lookup,
    /// An operation on a handle the process never had.
    Bad,
}

impl OpKind {
    fn name(&self) -> &'static str {
        match self {
            OpKind::MemoryCreate { .. } => "MemoryCreate",
            OpKind::Diminish { .. } => "Diminish",
            OpKind::RequestCreate { .. } => "RequestCreate",
            OpKind::Derive { .. } => "Derive",
            OpKind::Invoke { .. } => "Invoke",
            OpKind::Copy { .. } => "Copy",
            OpKind::Revoke { .. } => "Revoke",
            OpKind::Drop => "Drop",
            OpKind::Monitor { .. } => "Monitor",
            OpKind::Publish { .. } => "Publish",
            OpKind::Unpublish => "Unpublish",
            OpKind::Lookup => "Lookup",
            OpKind::Bad => "BadHandle",
        }
    }
}

/// A simulated process.
pub(crate) struct Proc {
    pub node: usize,
    /// Incarnation of the controller it attached to.
    pub inc: u64,
    pub chan: ChannelId,
    pub alive: bool,
    pub attached: bool,
    /// Attaches with a wrong token and must be rejected.
    pub rogue: bool,
    pub name: Vec<u8>,
    pub mem: Vec<u8>,
    pub handles: BTreeMap<Handle, HandleRec>,
    pub outstanding: BTreeMap<u64, OpRec>,
    pub next_op: u64,
    pub ops_left: usize,
    pub published: Vec<Vec<u8>>,
    /// Roots of the objects this process created.
    pub roots: Vec<CapRef>,
    /// Scripted workload (the scale run): the step reached, and the handles
    /// the script works with.
    pub script: Option<Script>,
    /// The controller runs with tight limits.
    pub tight: bool,
    /// The process sends nothing before this virtual time.
    pub stalled_until: u64,
}

/// State of the scripted scale workload: publish a Request under the
/// process's own name, then repeatedly look up another process's Request,
/// invoke it handing over a Memory capability, and copy into the Memory
/// capabilities received that way (so copies cross nodes).
#[derive(Default)]
pub(crate) struct Script {
    pub index: usize,
    pub step: usize,
    pub own_mem: Option<Handle>,
    pub own_req: Option<Handle>,
    pub looked_up: Option<Handle>,
    pub received_mem: Option<Handle>,
}

const MAX_OUTSTANDING: usize = 6;
const MAX_HANDLES: usize = 40;

/// Lowercase bytes (never [`INVOKE_MAGIC`]).
fn letters(rng: &mut ChaCha8Rng, max: usize) -> Vec<u8> {
    let n = rng.gen_range(0..=max);
    (0..n).map(|_| rng.gen_range(b'a'..=b'z')).collect()
}

fn rights(rng: &mut ChaCha8Rng) -> Rights {
    match rng.gen_range(0..8) {
        0 => Rights::NONE,
        1 | 2 => Rights::READ,
        3 => Rights::WRITE,
        _ => Rights::READ_WRITE,
    }
}

pub(crate) fn name_of(i: usize) -> Vec<u8> {
    format!("svc-{i}").into_bytes()
}

impl Proc {
    pub fn new(
        node: usize,
        inc: u64,
        chan: ChannelId,
        name: Vec<u8>,
        mem: Vec<u8>,
        ops: usize,
    ) -> Proc {
        Proc {
            node,
            inc,
            chan,
            alive: true,
            attached: false,
            rogue: false,
            name,
            mem,
            handles: BTreeMap::new(),
            outstanding: BTreeMap::new(),
            next_op: 1,
            ops_left: ops,
            published: Vec::new(),
            roots: Vec::new(),
            script: None,
            tight: false,
            stalled_until: 0,
        }
    }

    pub fn can_issue(&self) -> bool {
        let max = if self.script.is_some() {
            1
        } else {
            MAX_OUTSTANDING
        };
        self.alive && self.attached && self.ops_left > 0 && self.outstanding.len() < max
    }

    /// The next operation of the scripted workload; `None` falls back to
    /// a random one.
    pub fn scripted_op(
        &mut self,
        rng: &mut ChaCha8Rng,
        oracle: &mut Oracle,
        tick: u64,
        names: usize,
    ) -> Option<ProcessMsg> {
        let sc = self.script.as_mut()?;
        let op = self.next_op;
        let step = sc.step;
        sc.step += 1;
        let get = |h: Option<Handle>, handles: &BTreeMap<Handle, HandleRec>| {
            h.and_then(|h| handles.get(&h).map(|r| (h, r.clone())))
        };
        let (msg, kind) = match step {
            0 => {
                let len = (self.mem.len() as u64).min(8192);
                let rights = Rights::READ_WRITE;
                let msg = ProcessMsg::MemoryCreate {
                    op,
                    addr: 0,
                    len,
                    rights,
                };
                (
                    msg,
                    OpKind::MemoryCreate {
                        addr: 0,
                        len,
                        rights,
                    },
                )
            }
            1 => {
                let (tag, imms) = (sc.index as u64, b"svc".to_vec());
                let msg = ProcessMsg::RequestCreate {
                    op,
                    tag,
                    imms: imms.clone(),
                    caps: Vec::new(),
                };
                let kind = OpKind::RequestCreate {
                    tag,
                    imms,
                    caps: Vec::new(),
                };
                (msg, kind)
            }
            2 if get(sc.own_req, &self.handles).is_some() => {
                let (h, cap) = get(sc.own_req, &self.handles)?;
                let name = name_of(sc.index);
                self.published.push(name.clone());
                (
                    ProcessMsg::Publish { op, name, cap: h },
                    OpKind::Publish { cap },
                )
            }
            s if s % 3 == 0
                || s < 3
                || get(sc.looked_up, &self.handles).is_none()
                || get(sc.own_mem, &self.handles).is_none()
                || (s % 3 == 2 && get(sc.received_mem, &self.handles).is_none()) =>
            {
                let mut other = rng.gen_range(0..names);
                if other == sc.index {
                    other = (other + 1) % names;
                }
                let msg = ProcessMsg::Lookup {
                    op,
                    name: name_of(other),
                    wait_ms: 1000,
                };
                (msg, OpKind::Lookup)
            }
            s if s % 3 == 1 => {
                let (h, target) = get(sc.looked_up, &self.handles)?;
                let (mh, mem) = get(sc.own_mem, &self.handles)?;
                let id = oracle.invokes.len() as u64 + 1;
                let mut imms = INVOKE_MAGIC.to_vec();
                imms.extend_from_slice(&id.to_le_bytes());
                let expect = target.binds.clone().map(|b| {
                    let mut all = b.imms.clone();
                    all.extend_from_slice(&imms);
                    (b.tag, all, b.caps + 1)
                });
                oracle.invokes.insert(
                    id,
                    InvokeRec {
                        expect,
                        owner: target.owner,
                        delivered: 0,
                        refused: false,
                    },
                );
                let msg = ProcessMsg::Invoke {
                    op,
                    cap: h,
                    imms,
                    caps: vec![mh],
                };
                let kind = OpKind::Invoke {
                    target,
                    caps: vec![mem],
                    id,
                };
                (msg, kind)
            }
            _ => {
                let (sh, src) = get(sc.own_mem, &self.handles)?;
                let (dh, dst) = get(sc.received_mem, &self.handles)?;
                let idx = oracle.copies.len();
                oracle
                    .copies
                    .push(CopyRec::new(src.win, dst.win, tick, oracle.now_ns).through(&src, &dst));
                let msg = ProcessMsg::Copy {
                    op,
                    src: sh,
                    dst: dh,
                    completion: None,
                };
                let kind = OpKind::Copy {
                    src,
                    dst,
                    completion: None,
                    idx,
                };
                (msg, kind)
            }
        };
        self.next_op += 1;
        self.ops_left -= 1;
        self.outstanding.insert(
            op,
            OpRec {
                kind,
                start: tick,
                expect: None,
            },
        );
        Some(msg)
    }

    fn pick(
        &self,
        rng: &mut ChaCha8Rng,
        f: impl Fn(&HandleRec) -> bool,
    ) -> Option<(Handle, HandleRec)> {
        let v: Vec<(&Handle, &HandleRec)> = self.handles.iter().filter(|(_, r)| f(r)).collect();
        v.choose(rng).map(|(h, r)| (**h, (*r).clone()))
    }

    fn pick_caps(&self, rng: &mut ChaCha8Rng, max: usize) -> Vec<(Handle, HandleRec)> {
        let n = rng.gen_range(0..=max);
        (0..n).filter_map(|_| self.pick(rng, |_| true)).collect()
    }

    /// A handle value this process never held.
    fn bad_handle(&self, rng: &mut ChaCha8Rng) -> Handle {
        Handle(rng.gen_range(1 << 28..1 << 30))
    }

    /// Chooses the next operation.
    #[allow(clippy::too_many_lines)]
    pub fn next_op(
        &mut self,
        rng: &mut ChaCha8Rng,
        oracle: &mut Oracle,
        tick: u64,
        names: usize,
    ) -> ProcessMsg {
        let op = self.next_op;
        self.next_op += 1;
        self.ops_left -= 1;
        let is_mem = |r: &HandleRec| r.info.kind == ObjectKind::Memory;
        let is_req = |r: &HandleRec| r.info.kind == ObjectKind::Request;
        let mem_size = self.mem.len() as u64;
        let mut roll = rng.gen_range(0..100);
        if self.handles.len() > MAX_HANDLES && roll >= 10 {
            roll = 200; // drop something
        }
        let name = name_of(rng.gen_range(0..names));
        let (msg, kind, expect) = loop {
            match roll {
                // MemoryCreate (sometimes empty or beyond the registered memory).
                0..=9 => {
                    let addr = rng.gen_range(0..mem_size);
                    let mut len = rng.gen_range(1..=(mem_size - addr).min(12 * 1024));
                    let mut expect = None;
                    match rng.gen_range(0..20) {
                        0 => {
                            len = 0;
                            expect = Some(ErrorCode::InvalidArgument);
                        }
                        1 => len += mem_size, // beyond memory: copies fault
                        _ => {}
                    }
                    let rights = rights(rng);
                    break (
                        ProcessMsg::MemoryCreate {
                            op,
                            addr,
                            len,
                            rights,
                        },
                        OpKind::MemoryCreate { addr, len, rights },
                        expect,
                    );
                }
                // Diminish, sometimes growing the window or the rights.
                10..=19 => {
                    let Some((h, parent)) = self.pick(rng, is_mem) else {
                        roll = 0;
                        continue;
                    };
                    let plen = parent.info.len.max(1);
                    let (offset, len) = match rng.gen_range(0..10) {
                        0 => (rng.gen_range(0..plen), plen + 1),
                        1 => (plen, 1),
                        _ => {
                            let off = rng.gen_range(0..plen);
                            (off, rng.gen_range(1..=plen - off))
                        }
                    };
                    let r = if rng.gen_bool(0.2) {
                        rights(rng)
                    } else {
                        Rights::from_bits(parent.info.rights.bits() & rights(rng).bits())
                            .unwrap_or(Rights::NONE)
                    };
                    break (
                        ProcessMsg::Diminish {
                            op,
                            cap: h,
                            offset,
                            len,
                            rights: r,
                        },
                        OpKind::Diminish {
                            parent,
                            offset,
                            len,
                            rights: r,
                        },
                        None,
                    );
                }
                // RequestCreate with bound immediates and capabilities.
                20..=27 => {
                    let tag = rng.gen::<u64>();
                    let imms = letters(rng, 12);
                    let caps = self.pick_caps(rng, 2);
                    break (
                        ProcessMsg::RequestCreate {
                            op,
                            tag,
                            imms: imms.clone(),
                            caps: caps.iter().map(|c| c.0).collect(),
                        },
                        OpKind::RequestCreate {
                            tag,
                            imms,
                            caps: caps.into_iter().map(|c| c.1).collect(),
                        },
                        None,
                    );
                }
                // Derive (curry more arguments).
                28..=33 => {
                    let Some((h, parent)) = self.pick(rng, is_req) else {
                        roll = 20;
                        continue;
                    };
                    let imms = letters(rng, 8);
                    let caps = self.pick_caps(rng, 1);
                    break (
                        ProcessMsg::Derive {
                            op,
                            cap: h,
                            imms: imms.clone(),
                            caps: caps.iter().map(|c| c.0).collect(),
                        },
                        OpKind::Derive {
                            parent,
                            imms,
                            caps: caps.into_iter().map(|c| c.1).collect(),
                        },
                        None,
                    );
                }
                // Invoke with transferred capabilities.
                34..=49 => {
                    let Some((h, target)) = self.pick(rng, is_req) else {
                        roll = 80;
                        continue;
                    };
                    let caps = self.pick_caps(rng, 2);
                    let id = oracle.invokes.len() as u64 + 1;
                    let mut imms = letters(rng, 8);
                    imms.extend_from_slice(&INVOKE_MAGIC);
                    imms.extend_from_slice(&id.to_le_bytes());
                    let binding = target.binds.clone().filter(|_| target.dead_at.is_none());
                    let expect = binding.map(|b| {
                        let mut all = b.imms.clone();
                        all.extend_from_slice(&imms);
                        (b.tag, all, b.caps + caps.len())
                    });
                    oracle.invokes.insert(
                        id,
                        InvokeRec {
                            expect,
                            owner: target.owner,
                            delivered: 0,
                            refused: false,
                        },
                    );
                    break (
                        ProcessMsg::Invoke {
                            op,
                            cap: h,
                            imms,
                            caps: caps.iter().map(|c| c.0).collect(),
                        },
                        OpKind::Invoke {
                            target,
                            caps: caps.into_iter().map(|c| c.1).collect(),
                            id,
                        },
                        None,
                    );
                }
                // Copy, with or without a completion Request.
                50..=64 => {
                    let Some((sh, src)) = self.pick(rng, is_mem) else {
                        roll = 0;
                        continue;
                    };
                    let slen = src.info.len;
                    let apart = |r: &HandleRec| match (r.win, src.win) {
                        (Some(a), Some(b)) => !a.overlaps(&b),
                        _ => true,
                    };
                    let fits = |r: &HandleRec| is_mem(r) && r.info.len >= slen && apart(r);
                    let dst = if rng.gen_bool(0.85) {
                        self.pick(rng, fits)
                            .or_else(|| self.pick(rng, |r| is_mem(r) && apart(r)))
                            .or_else(|| self.pick(rng, is_mem))
                    } else {
                        self.pick(rng, is_mem)
                    };
                    let Some((dh, dst)) = dst else {
                        roll = 0;
                        continue;
                    };
                    let completion = if rng.gen_bool(0.3) {
                        self.pick(rng, is_req)
                    } else {
                        None
                    };
                    let expect = (src.info.rights.contains(Rights::READ)
                        && dst.info.rights.contains(Rights::WRITE)
                        && dst.info.len < src.info.len)
                        .then_some(ErrorCode::SizeMismatch);
                    if let Some((_, c)) = &completion {
                        oracle.expect_notify(c);
                    }
                    let idx = oracle.copies.len();
                    oracle.copies.push(
                        CopyRec::new(src.win, dst.win, tick, oracle.now_ns).through(&src, &dst),
                    );
                    break (
                        ProcessMsg::Copy {
                            op,
                            src: sh,
                            dst: dh,
                            completion: completion.as_ref().map(|c| c.0),
                        },
                        OpKind::Copy {
                            src,
                            dst,
                            completion: completion.map(|c| c.1),
                            idx,
                        },
                        expect,
                    );
                }
                // Revoke.
                65..=67 => {
                    let Some((h, cap)) = self.pick(rng, |_| true) else {
                        roll = 0;
                        continue;
                    };
                    break (
                        ProcessMsg::Revoke { op, cap: h },
                        OpKind::Revoke { cap },
                        None,
                    );
                }
                // Monitor.
                68..=71 => {
                    let Some((h, cap)) = self.pick(rng, |_| true) else {
                        roll = 0;
                        continue;
                    };
                    let Some((n, notify)) = self.pick(rng, is_req) else {
                        roll = 20;
                        continue;
                    };
                    oracle.expect_notify(&notify);
                    break (
                        ProcessMsg::Monitor {
                            op,
                            cap: h,
                            notify: n,
                        },
                        OpKind::Monitor { cap, notify },
                        None,
                    );
                }
                // Publish.
                72..=79 => {
                    let Some((h, cap)) = self.pick(rng, |_| true) else {
                        roll = 20;
                        continue;
                    };
                    if !self.published.contains(&name) {
                        self.published.push(name.clone());
                    }
                    break (
                        ProcessMsg::Publish { op, name, cap: h },
                        OpKind::Publish { cap },
                        None,
                    );
                }
                // Lookup, with or without waiting.
                80..=91 => {
                    let wait_ms = if rng.gen_bool(0.5) {
                        0
                    } else {
                        rng.gen_range(1..300)
                    };
                    break (
                        ProcessMsg::Lookup { op, name, wait_ms },
                        OpKind::Lookup,
                        None,
                    );
                }
                // Unpublish.
                92..=93 => {
                    let name = self.published.choose(rng).cloned().unwrap_or(name);
                    self.published.retain(|n| *n != name);
                    break (ProcessMsg::Unpublish { op, name }, OpKind::Unpublish, None);
                }
                // A handle never held, or a handle of the wrong type.
                94..=96 => {
                    let bad = self.bad_handle(rng);
                    let msg = match rng.gen_range(0..4) {
                        0 => ProcessMsg::Invoke {
                            op,
                            cap: bad,
                            imms: Vec::new(),
                            caps: Vec::new(),
                        },
                        1 => ProcessMsg::Revoke { op, cap: bad },
                        2 => ProcessMsg::Drop { op, cap: bad },
                        _ => ProcessMsg::Diminish {
                            op,
                            cap: bad,
                            offset: 0,
                            len: 1,
                            rights: Rights::READ,
                        },
                    };
                    break (msg, OpKind::Bad, Some(ErrorCode::BadHandle));
                }
                97..=99 => {
                    if rng.gen_bool(0.5) {
                        let Some((h, _)) = self.pick(rng, is_mem) else {
                            roll = 0;
                            continue;
                        };
                        let msg = ProcessMsg::Invoke {
                            op,
                            cap: h,
                            imms: Vec::new(),
                            caps: Vec::new(),
                        };
                        break (msg, OpKind::Bad, Some(ErrorCode::WrongType));
                    }
                    let Some((h, _)) = self.pick(rng, is_req) else {
                        roll = 20;
                        continue;
                    };
                    let msg = ProcessMsg::Diminish {
                        op,
                        cap: h,
                        offset: 0,
                        len: 1,
                        rights: Rights::NONE,
                    };
                    break (msg, OpKind::Bad, Some(ErrorCode::WrongType));
                }
                // Drop.
                _ => {
                    let Some((h, _)) = self.pick(rng, |_| true) else {
                        roll = 0;
                        continue;
                    };
                    // The handle is unusable from now on (its number may be
                    // reused once the drop is answered).
                    self.handles.remove(&h);
                    break (ProcessMsg::Drop { op, cap: h }, OpKind::Drop, None);
                }
            }
        };
        self.outstanding.insert(
            op,
            OpRec {
                kind,
                start: tick,
                expect,
            },
        );
        msg
    }

    /// Judges the answer to operation `op`. `reg` is the oracle's record of
    /// the returned handle, made when the controller emitted the answer at
    /// tick `pulled`. Returns the index of a successful copy whose bytes the
    /// caller must compare.
    pub fn on_completion(
        &mut self,
        op: u64,
        result: Result<Reply, ErrorCode>,
        reg: Option<HandleRec>,
        oracle: &mut Oracle,
        pulled: u64,
    ) -> Result<Option<usize>, String> {
        let Some(rec) = self.outstanding.remove(&op) else {
            return Err(format!(
                "{:?} got a completion for op {op}, which is unknown or already answered",
                self.chan
            ));
        };
        let start_kind = rec.kind.name();
        let what = format!("{:?} op {op} {start_kind}", self.chan);
        let outcome = match &result {
            Ok(_) => format!("{} Ok", rec.kind.name()),
            Err(e) => format!("{} {e:?}", rec.kind.name()),
        };
        *oracle.outcomes.entry(outcome).or_insert(0) += 1;
        if let Some(e) = rec.expect {
            // Under tight limits the pending-operation limit may refuse any
            // operation first.
            let limited = self.tight && result == Err(ErrorCode::LimitReached);
            if result != Err(e) && !limited {
                return Err(format!("{what}: expected Err({e:?}), got {result:?}"));
            }
        }
        let start = rec.start;
        let mut new = match (&result, reg) {
            (Ok(Reply::Cap { handle, info }), Some(r)) => {
                if r.info != *info {
                    return Err(format!(
                        "{what}: reply info {info:?} != controller's {:?}",
                        r.info
                    ));
                }
                if self.handles.contains_key(handle) {
                    return Err(format!(
                        "{what}: returned handle {handle:?} is already in use"
                    ));
                }
                Some((*handle, r))
            }
            (Ok(Reply::Cap { .. }), None) => {
                return Err(format!(
                    "{what}: a capability reply without a handle record"
                ))
            }
            (Ok(Reply::Done), _) => None,
            (Err(_), _) => None,
        };
        let ok = result.is_ok();
        let returns_cap = matches!(
            rec.kind,
            OpKind::MemoryCreate { .. }
                | OpKind::Diminish { .. }
                | OpKind::RequestCreate { .. }
                | OpKind::Derive { .. }
                | OpKind::Lookup
        );
        if ok && returns_cap != new.is_some() {
            return Err(format!("{what}: wrong kind of success {result:?}"));
        }
        let mut check_copy = None;
        match rec.kind {
            OpKind::Copy { idx, .. } if !ok => {
                let e = result.err().unwrap_or(ErrorCode::Malformed);
                oracle.copy_failed(idx, pulled, e);
            }
            OpKind::Invoke { id, .. } if !ok => {
                let e = result.err().unwrap_or(ErrorCode::Malformed);
                if !matches!(e, ErrorCode::Timeout | ErrorCode::PeerUnreachable) {
                    let inv = oracle.invokes.get_mut(&id).expect("recorded at issue");
                    if inv.delivered > 0 {
                        return Err(format!(
                            "{what}: failed with {e:?} but invocation {id} was delivered"
                        ));
                    }
                    inv.refused = true;
                }
            }
            _ if !ok => {}
            OpKind::MemoryCreate { addr, len, rights } => {
                let (_, r) = new.as_mut().expect("checked above");
                let want = Some(crate::oracle::Win {
                    chan: self.chan,
                    addr,
                    len,
                });
                if r.info.kind != ObjectKind::Memory
                    || r.info.rights != rights
                    || r.info.len != len
                    || (r.dead_at.is_none() && r.win != want)
                {
                    return Err(format!(
                        "{what}({addr:#x}, {len}, {rights:?}) returned {:?} window {:?}",
                        r.info, r.win
                    ));
                }
                self.roots.push(r.cap);
            }
            OpKind::Diminish {
                parent,
                offset,
                len,
                rights,
            } => {
                oracle.check_use(&parent, start, &what)?;
                let (_, r) = new.as_ref().expect("checked above");
                if r.info.kind != ObjectKind::Memory
                    || r.info.rights != rights
                    || r.info.len != len
                    || !parent.info.rights.contains(rights)
                    || offset + len > parent.info.len
                {
                    return Err(format!(
                        "{what}(+{offset}, {len}, {rights:?}) of {:?} returned {:?}",
                        parent.info, r.info
                    ));
                }
                if let (Some(pw), Some(w)) = (parent.win, r.win) {
                    if w.chan != pw.chan || w.addr != pw.addr + offset {
                        return Err(format!(
                            "{what}(+{offset}, {len}) of window {pw:?} returned window {w:?}"
                        ));
                    }
                }
            }
            OpKind::RequestCreate { tag, imms, caps } => {
                for c in &caps {
                    oracle.check_use(c, start, &what)?;
                }
                let (_, r) = new.as_mut().expect("checked above");
                if r.info.kind != ObjectKind::Request {
                    return Err(format!("{what} returned {:?}", r.info));
                }
                let b = Binding {
                    tag,
                    imms,
                    caps: caps.len(),
                };
                oracle.bindings.insert(r.cap, b.clone());
                r.binds = Some(b);
                self.roots.push(r.cap);
            }
            OpKind::Derive { parent, imms, caps } => {
                oracle.check_use(&parent, start, &what)?;
                for c in &caps {
                    oracle.check_use(c, start, &what)?;
                }
                let (_, r) = new.as_mut().expect("checked above");
                if r.info.kind != ObjectKind::Request {
                    return Err(format!("{what} returned {:?}", r.info));
                }
                if let Some(mut b) = parent.binds.clone() {
                    b.imms.extend_from_slice(&imms);
                    b.caps += caps.len();
                    oracle.bindings.insert(r.cap, b.clone());
                    r.binds = Some(b);
                } else {
                    r.binds = None;
                }
            }
            OpKind::Invoke { target, caps, id } => {
                oracle.check_use(&target, start, &what)?;
                for c in &caps {
                    oracle.check_use(c, start, &what)?;
                }
                let inv = &oracle.invokes[&id];
                if inv.delivered != 1 {
                    return Err(format!(
                        "{what}: succeeded but invocation {id} was delivered {} times",
                        inv.delivered
                    ));
                }
            }
            OpKind::Copy {
                src,
                dst,
                completion,
                idx,
            } => {
                oracle.check_use(&src, start, &what)?;
                oracle.check_use(&dst, start, &what)?;
                if let Some(c) = &completion {
                    oracle.check_use(c, start, &what)?;
                }
                oracle.copies[idx].end = Some((pulled, true));
                check_copy = Some(idx);
            }
            OpKind::Revoke { cap } => {
                oracle.check_use(&cap, start, &what)?;
                oracle.revoke(cap.cap, pulled);
                oracle.revoke_op(cap.cap, pulled);
            }
            OpKind::Monitor { cap, notify } => {
                oracle.check_use(&cap, start, &what)?;
                oracle.check_use(&notify, start, &what)?;
                if let Some(key) = Oracle::notify_key(&notify) {
                    oracle.monitors.push(crate::oracle::MonitorRec {
                        watched: cap.chain.clone(),
                        notify: notify.chain.clone(),
                        notify_caps: notify.binds.as_ref().map_or(0, |b| b.caps),
                        key,
                        watcher: self.chan,
                    });
                }
            }
            OpKind::Publish { cap } => oracle.check_use(&cap, start, &what)?,
            OpKind::Drop | OpKind::Unpublish | OpKind::Lookup | OpKind::Bad => {}
        }
        if let Some((h, r)) = new {
            if let Some(sc) = self.script.as_mut() {
                match (r.info.kind, start_kind) {
                    (_, "Lookup") => sc.looked_up = Some(h),
                    (ObjectKind::Memory, "MemoryCreate") => sc.own_mem = Some(h),
                    (ObjectKind::Request, "RequestCreate") => sc.own_req = Some(h),
                    _ => {}
                }
            }
            self.handles.insert(h, r);
        }
        Ok(check_copy)
    }
}
