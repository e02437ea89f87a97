//! Messages between two controllers.
//!
//! A link starts with a three-message handshake, sent in clear:
//!
//! 1. initiator → responder: [`PeerMsg::Hello`] (who I am, whom I dialled,
//!    a fresh nonce, the security I require);
//! 2. responder → initiator: [`PeerMsg::HelloReply`] (who I am, a fresh
//!    nonce, the security in force, and my proof over the whole transcript
//!    in the responder role);
//! 3. initiator → responder: [`PeerMsg::Finish`] (my proof over the same
//!    transcript in the initiator role), sent only after the initiator
//!    verified the responder's proof.
//!
//! Both proofs bind both node ids, both incarnations, both nonces, the
//! security mode and the prover's role, under a key derived from the cluster
//! key (see `fractos-core`'s `auth` module). Either side may answer a failed
//! handshake with [`PeerMsg::Rejected`] before closing. After the handshake
//! every frame body is sealed by the core (a 16-byte ChaCha20-Poly1305 tag,
//! and in `secure` mode the body encrypted), so this module only describes
//! the plaintext. Requests carry a sender-chosen `req` id answered by exactly
//! one [`PeerMsg::Reply`]; releases, copy chunks and heartbeats are one-way.

use alloc::vec::Vec;

use crate::codec::{Reader, Writer};
use crate::{
    begin_frame, end_frame, read_header, CapInfo, CapRef, DecodeError, ErrorCode, NodeId, Rights,
    MAX_DATA_LEN, MAX_IMMEDIATES, MAX_NAME_LEN,
};

/// How a derived capability differs from its parent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeriveSpec {
    /// Same window, rights and bound arguments (used to hand a capability to
    /// another holder).
    Transfer,
    /// Memory: a sub-window with a subset of the rights.
    Diminish {
        /// Offset inside the parent window.
        offset: u64,
        /// Length of the sub-window.
        len: u64,
        /// Rights (subset of the parent's).
        rights: Rights,
    },
    /// Request: append bound immediates and capabilities.
    Bind {
        /// Immediates to append.
        imms: Vec<u8>,
        /// Capabilities to append (already held by the owner's node).
        caps: Vec<CapRef>,
    },
}

/// A request from one controller to another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerRequest {
    /// Create a child of `parent` held by `holder`'s node.
    Derive {
        /// Parent capability (owned by the receiver).
        parent: CapRef,
        /// Node that will hold the child.
        holder: NodeId,
        /// How the child differs.
        spec: DeriveSpec,
    },
    /// Deliver an invocation of `target` to its owner process.
    Invoke {
        /// Request capability (owned by the receiver).
        target: CapRef,
        /// Invoker immediates.
        imms: Vec<u8>,
        /// Invoker capabilities, already held by the receiver's node, with
        /// what they are.
        caps: Vec<(CapRef, CapInfo)>,
    },
    /// Revoke `cap` and all its descendants.
    Revoke {
        /// Capability (owned by the receiver).
        cap: CapRef,
    },
    /// Invoke `notify` when `cap` dies.
    Monitor {
        /// Watched capability (owned by the receiver).
        cap: CapRef,
        /// Request to invoke, already held by the receiver's node.
        notify: CapRef,
        /// Registering process (its sequence number on the sender's node):
        /// the registration is dropped when that process exits
        /// ([`PeerMsg::MonitorsDrop`]).
        watcher: u64,
    },
    /// Start a copy from `src` (owned by the receiver) into `dst`.
    CopyStart {
        /// Source Memory capability.
        src: CapRef,
        /// Destination Memory capability.
        dst: CapRef,
    },
    /// Prepare to receive `len` bytes into `dst` (owned by the receiver).
    CopyOpen {
        /// Destination Memory capability.
        dst: CapRef,
        /// Bytes that will be sent.
        len: u64,
        /// The sender's copy id, echoed in acknowledgements.
        source: u64,
    },
    /// Publish `cap` (already held by the receiver's node) under `name`.
    Publish {
        /// Name.
        name: Vec<u8>,
        /// Capability.
        cap: CapRef,
        /// Cluster-unique publisher id (node and process).
        publisher: u64,
    },
    /// Remove `name` if `publisher` published it.
    Unpublish {
        /// Name.
        name: Vec<u8>,
        /// Publisher id.
        publisher: u64,
    },
    /// Look up `name`, waiting up to `wait_ms` for it to appear.
    Lookup {
        /// Name.
        name: Vec<u8>,
        /// Milliseconds to wait.
        wait_ms: u32,
    },
}

/// Success value of a [`PeerRequest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerReply {
    /// Done, nothing returned.
    Done,
    /// A capability created for the requesting node.
    Cap {
        /// The capability.
        cap: CapRef,
        /// What it is.
        info: CapInfo,
    },
    /// The destination accepted a copy; chunks go to `sink`.
    CopyOpened {
        /// Receiver's copy id.
        sink: u64,
    },
    /// A copy finished; `len` bytes were moved.
    Copied {
        /// Bytes moved.
        len: u64,
    },
}

/// What protects a peer link's frames after the handshake.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum PeerSecurity {
    /// Every frame carries a ChaCha20-Poly1305 tag over its bytes and its
    /// position in the stream: an on-path attacker can read frames but not
    /// inject, rewrite, replay, reorder or drop one unnoticed.
    #[default]
    Authenticated = 1,
    /// As `Authenticated`, and every frame body is encrypted.
    Secure = 2,
}

impl PeerSecurity {
    fn decode(v: u8) -> Result<Self, DecodeError> {
        match v {
            1 => Ok(PeerSecurity::Authenticated),
            2 => Ok(PeerSecurity::Secure),
            v => Err(DecodeError::BadField {
                field: "peer security",
                value: v as u64,
            }),
        }
    }
}

/// What the gossip membership believes of a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum MemberState {
    /// Answering probes.
    Alive = 0,
    /// Missed a probe; confirmed dead unless it refutes in time.
    Suspect = 1,
    /// Confirmed dead (until it refutes with a higher sequence number or
    /// comes back with a new incarnation).
    Dead = 2,
    /// Left the cluster on purpose.
    Left = 3,
}

impl MemberState {
    fn decode(v: u8) -> Result<Self, DecodeError> {
        Ok(match v {
            0 => MemberState::Alive,
            1 => MemberState::Suspect,
            2 => MemberState::Dead,
            3 => MemberState::Left,
            v => {
                return Err(DecodeError::BadField {
                    field: "member state",
                    value: v as u64,
                })
            }
        })
    }
}

/// One membership fact, gossiped between controllers. Facts about a member
/// are ordered by `(incarnation, seq)`, then by state (`Alive` < `Suspect` <
/// `Dead` < `Left`): a member refutes a suspicion by bumping `seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MemberUpdate {
    /// The member.
    pub node: NodeId,
    /// Its controller incarnation (grows on every restart).
    pub incarnation: u64,
    /// Its refutation counter within the incarnation.
    pub seq: u32,
    /// What is claimed.
    pub state: MemberState,
}

/// Largest number of membership facts one probe frame carries.
pub const MAX_PIGGYBACK: usize = 16;
/// Largest number of members one [`PeerMsg::Members`] frame carries.
pub const MAX_MEMBERS_PER_FRAME: usize = 4096;

/// A message between two controllers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerMsg {
    /// Handshake 1/3, initiator → responder.
    Hello {
        /// Initiator node id.
        node: NodeId,
        /// Initiator incarnation (changes on restart).
        incarnation: u64,
        /// Fresh random challenge (from a cryptographic RNG).
        nonce: [u8; 32],
        /// The node the initiator meant to dial; a responder with another
        /// id refuses the link.
        responder: NodeId,
        /// Security the initiator requires for the link's frames.
        security: PeerSecurity,
    },
    /// Handshake, responder → initiator, instead of `HelloReply`: both
    /// sides dialled each other at once and the responder (the lower node
    /// id) keeps its own dial; the initiator waits for that link instead.
    /// Sent in clear like `Rejected`.
    Yield,
    /// Gossip probe: the receiver answers [`PeerMsg::ProbeAck`] with the
    /// same `seq`. Carries membership facts.
    Probe {
        /// Sender-chosen probe id.
        seq: u64,
        /// Piggybacked membership facts (at most [`MAX_PIGGYBACK`]).
        updates: Vec<MemberUpdate>,
    },
    /// Answer to a [`PeerMsg::Probe`] (or, relayed, to a
    /// [`PeerMsg::ProbeReq`]).
    ProbeAck {
        /// The probe's id.
        seq: u64,
        /// Piggybacked membership facts.
        updates: Vec<MemberUpdate>,
    },
    /// Indirect probe: probe `target` on the sender's behalf and answer
    /// [`PeerMsg::ProbeAck`] with `seq` if it answers.
    ProbeReq {
        /// The requester's probe id.
        seq: u64,
        /// The member to probe.
        target: NodeId,
        /// Piggybacked membership facts.
        updates: Vec<MemberUpdate>,
    },
    /// A joining controller asks for the sender's whole membership view.
    Join,
    /// Part of a membership view (the answer to [`PeerMsg::Join`]).
    Members {
        /// Members (at most [`MAX_MEMBERS_PER_FRAME`]).
        entries: Vec<MemberUpdate>,
    },
    /// The sender has nothing in progress with the receiver and proposes
    /// to close this idle link.
    Bye,
    /// Answer to [`PeerMsg::Bye`]: the receiver has nothing in progress
    /// either; the `Bye` sender closes the link unless it sent anything
    /// since.
    ByeOk,
    /// Handshake 2/3, responder → initiator.
    HelloReply {
        /// Responder node id.
        node: NodeId,
        /// Responder incarnation.
        incarnation: u64,
        /// Fresh random challenge.
        nonce: [u8; 32],
        /// Security in force: the stronger of both sides' requirements.
        security: PeerSecurity,
        /// HMAC-SHA256 proof over the transcript, responder role.
        proof: [u8; 32],
    },
    /// Handshake 3/3, initiator → responder: proof over the transcript,
    /// initiator role.
    Finish {
        /// HMAC-SHA256 proof.
        proof: [u8; 32],
    },
    /// The sender refuses the handshake and closes the link.
    Rejected {
        /// Why (for example `AuthFailed`, `VersionMismatch`).
        code: ErrorCode,
    },
    /// Liveness heartbeat.
    Ping,
    /// A request expecting one [`PeerMsg::Reply`].
    Request {
        /// Sender-chosen id.
        req: u64,
        /// The request.
        body: PeerRequest,
    },
    /// The answer to a request.
    Reply {
        /// Id of the request.
        req: u64,
        /// Result.
        result: Result<PeerReply, ErrorCode>,
    },
    /// The sender's node no longer holds `cap` (nor the node it speaks for).
    Release {
        /// Capability owned by the receiver.
        cap: CapRef,
    },
    /// Copy payload for an open sink.
    CopyChunk {
        /// Receiver's copy id.
        sink: u64,
        /// Offset in the copy.
        offset: u64,
        /// Bytes.
        data: Vec<u8>,
    },
    /// A chunk was written (or failed).
    CopyAck {
        /// Sender's copy id.
        source: u64,
        /// Offset of the chunk.
        offset: u64,
        /// Outcome.
        result: Result<(), ErrorCode>,
    },
    /// The source ends a copy (success or abort); the sink is discarded.
    CopyClose {
        /// Receiver's copy id.
        sink: u64,
    },
    /// A process of the sender exited: drop every monitor it registered
    /// at the receiver (without firing them).
    MonitorsDrop {
        /// The process's sequence number on the sender's node (the
        /// `watcher` of its [`PeerRequest::Monitor`] requests).
        watcher: u64,
    },
    /// The process waiting on lookup request `req` exited: drop the waiting
    /// lookup without answering it.
    LookupCancel {
        /// The sender's id of the [`PeerRequest::Lookup`] request.
        req: u64,
    },
}

impl DeriveSpec {
    fn encode(&self, w: &mut Writer<'_>) {
        match self {
            DeriveSpec::Transfer => w.u8(0),
            DeriveSpec::Diminish {
                offset,
                len,
                rights,
            } => {
                w.u8(1);
                w.u64(*offset);
                w.u64(*len);
                w.u8(rights.bits());
            }
            DeriveSpec::Bind { imms, caps } => {
                w.u8(2);
                w.bytes(imms);
                w.cap_refs(caps);
            }
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(match r.u8()? {
            0 => DeriveSpec::Transfer,
            1 => DeriveSpec::Diminish {
                offset: r.u64()?,
                len: r.u64()?,
                rights: r.rights()?,
            },
            2 => DeriveSpec::Bind {
                imms: r.bytes(MAX_IMMEDIATES)?,
                caps: r.cap_refs()?,
            },
            t => {
                return Err(DecodeError::BadField {
                    field: "derive spec",
                    value: t as u64,
                })
            }
        })
    }
}

impl PeerRequest {
    fn encode(&self, w: &mut Writer<'_>) {
        match self {
            PeerRequest::Derive {
                parent,
                holder,
                spec,
            } => {
                w.u8(1);
                w.cap_ref(parent);
                w.u32(holder.0);
                spec.encode(w);
            }
            PeerRequest::Invoke { target, imms, caps } => {
                w.u8(2);
                w.cap_ref(target);
                w.bytes(imms);
                w.cap_grants(caps);
            }
            PeerRequest::Revoke { cap } => {
                w.u8(3);
                w.cap_ref(cap);
            }
            PeerRequest::Monitor {
                cap,
                notify,
                watcher,
            } => {
                w.u8(4);
                w.cap_ref(cap);
                w.cap_ref(notify);
                w.u64(*watcher);
            }
            PeerRequest::CopyStart { src, dst } => {
                w.u8(5);
                w.cap_ref(src);
                w.cap_ref(dst);
            }
            PeerRequest::CopyOpen { dst, len, source } => {
                w.u8(6);
                w.cap_ref(dst);
                w.u64(*len);
                w.u64(*source);
            }
            PeerRequest::Publish {
                name,
                cap,
                publisher,
            } => {
                w.u8(7);
                w.bytes(name);
                w.cap_ref(cap);
                w.u64(*publisher);
            }
            PeerRequest::Unpublish { name, publisher } => {
                w.u8(8);
                w.bytes(name);
                w.u64(*publisher);
            }
            PeerRequest::Lookup { name, wait_ms } => {
                w.u8(9);
                w.bytes(name);
                w.u32(*wait_ms);
            }
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(match r.u8()? {
            1 => PeerRequest::Derive {
                parent: r.cap_ref()?,
                holder: NodeId(r.u32()?),
                spec: DeriveSpec::decode(r)?,
            },
            2 => PeerRequest::Invoke {
                target: r.cap_ref()?,
                imms: r.bytes(MAX_IMMEDIATES)?,
                caps: r.cap_grants()?,
            },
            3 => PeerRequest::Revoke { cap: r.cap_ref()? },
            4 => PeerRequest::Monitor {
                cap: r.cap_ref()?,
                notify: r.cap_ref()?,
                watcher: r.u64()?,
            },
            5 => PeerRequest::CopyStart {
                src: r.cap_ref()?,
                dst: r.cap_ref()?,
            },
            6 => PeerRequest::CopyOpen {
                dst: r.cap_ref()?,
                len: r.u64()?,
                source: r.u64()?,
            },
            7 => PeerRequest::Publish {
                name: r.bytes(MAX_NAME_LEN)?,
                cap: r.cap_ref()?,
                publisher: r.u64()?,
            },
            8 => PeerRequest::Unpublish {
                name: r.bytes(MAX_NAME_LEN)?,
                publisher: r.u64()?,
            },
            9 => PeerRequest::Lookup {
                name: r.bytes(MAX_NAME_LEN)?,
                wait_ms: r.u32()?,
            },
            t => {
                return Err(DecodeError::BadField {
                    field: "peer request",
                    value: t as u64,
                })
            }
        })
    }
}

impl PeerMsg {
    /// Appends this message as one frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let kind = match self {
            PeerMsg::Hello { .. } => 1,
            PeerMsg::HelloReply { .. } => 2,
            PeerMsg::Ping => 3,
            PeerMsg::Request { .. } => 4,
            PeerMsg::Reply { .. } => 5,
            PeerMsg::Release { .. } => 6,
            PeerMsg::CopyChunk { .. } => 7,
            PeerMsg::CopyAck { .. } => 8,
            PeerMsg::CopyClose { .. } => 9,
            PeerMsg::Finish { .. } => 20,
            PeerMsg::Rejected { .. } => 21,
            PeerMsg::MonitorsDrop { .. } => 10,
            PeerMsg::LookupCancel { .. } => 11,
            PeerMsg::Yield => 22,
            PeerMsg::Probe { .. } => 12,
            PeerMsg::ProbeAck { .. } => 13,
            PeerMsg::ProbeReq { .. } => 14,
            PeerMsg::Join => 15,
            PeerMsg::Members { .. } => 16,
            PeerMsg::Bye => 17,
            PeerMsg::ByeOk => 18,
        };
        let start = begin_frame(out, kind);
        let mut w = Writer { out };
        match self {
            PeerMsg::Hello {
                node,
                incarnation,
                nonce,
                responder,
                security,
            } => {
                w.u32(node.0);
                w.u64(*incarnation);
                w.array(nonce);
                w.u32(responder.0);
                w.u8(*security as u8);
            }
            PeerMsg::HelloReply {
                node,
                incarnation,
                nonce,
                security,
                proof,
            } => {
                w.u32(node.0);
                w.u64(*incarnation);
                w.array(nonce);
                w.u8(*security as u8);
                w.array(proof);
            }
            PeerMsg::Finish { proof } => w.array(proof),
            PeerMsg::Rejected { code } => w.error(*code),
            PeerMsg::Ping => {}
            PeerMsg::Request { req, body } => {
                w.u64(*req);
                body.encode(&mut w);
            }
            PeerMsg::Reply { req, result } => {
                w.u64(*req);
                match result {
                    Ok(PeerReply::Done) => w.u8(0),
                    Ok(PeerReply::Cap { cap, info }) => {
                        w.u8(1);
                        w.cap_ref(cap);
                        w.cap_info(info);
                    }
                    Ok(PeerReply::CopyOpened { sink }) => {
                        w.u8(2);
                        w.u64(*sink);
                    }
                    Ok(PeerReply::Copied { len }) => {
                        w.u8(3);
                        w.u64(*len);
                    }
                    Err(e) => {
                        w.u8(4);
                        w.error(*e);
                    }
                }
            }
            PeerMsg::Release { cap } => w.cap_ref(cap),
            PeerMsg::CopyChunk { sink, offset, data } => {
                w.u64(*sink);
                w.u64(*offset);
                w.bytes(data);
            }
            PeerMsg::CopyAck {
                source,
                offset,
                result,
            } => {
                w.u64(*source);
                w.u64(*offset);
                match result {
                    Ok(()) => w.u8(0),
                    Err(e) => {
                        w.u8(1);
                        w.error(*e);
                    }
                }
            }
            PeerMsg::CopyClose { sink } => w.u64(*sink),
            PeerMsg::MonitorsDrop { watcher } => w.u64(*watcher),
            PeerMsg::LookupCancel { req } => w.u64(*req),
            PeerMsg::Yield | PeerMsg::Join | PeerMsg::Bye | PeerMsg::ByeOk => {}
            PeerMsg::Probe { seq, updates } | PeerMsg::ProbeAck { seq, updates } => {
                w.u64(*seq);
                write_updates(&mut w, updates);
            }
            PeerMsg::ProbeReq {
                seq,
                target,
                updates,
            } => {
                w.u64(*seq);
                w.u32(target.0);
                write_updates(&mut w, updates);
            }
            PeerMsg::Members { entries } => write_updates(&mut w, entries),
        }
        end_frame(out, start);
    }

    /// Decodes one frame body (without the length prefix).
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let msg = match read_header(&mut r)? {
            1 => PeerMsg::Hello {
                node: NodeId(r.u32()?),
                incarnation: r.u64()?,
                nonce: r.array()?,
                responder: NodeId(r.u32()?),
                security: PeerSecurity::decode(r.u8()?)?,
            },
            2 => PeerMsg::HelloReply {
                node: NodeId(r.u32()?),
                incarnation: r.u64()?,
                nonce: r.array()?,
                security: PeerSecurity::decode(r.u8()?)?,
                proof: r.array()?,
            },
            20 => PeerMsg::Finish { proof: r.array()? },
            21 => PeerMsg::Rejected { code: r.error()? },
            3 => PeerMsg::Ping,
            4 => PeerMsg::Request {
                req: r.u64()?,
                body: PeerRequest::decode(&mut r)?,
            },
            5 => {
                let req = r.u64()?;
                let result = match r.u8()? {
                    0 => Ok(PeerReply::Done),
                    1 => Ok(PeerReply::Cap {
                        cap: r.cap_ref()?,
                        info: r.cap_info()?,
                    }),
                    2 => Ok(PeerReply::CopyOpened { sink: r.u64()? }),
                    3 => Ok(PeerReply::Copied { len: r.u64()? }),
                    4 => Err(r.error()?),
                    t => {
                        return Err(DecodeError::BadField {
                            field: "result tag",
                            value: t as u64,
                        })
                    }
                };
                PeerMsg::Reply { req, result }
            }
            6 => PeerMsg::Release { cap: r.cap_ref()? },
            7 => PeerMsg::CopyChunk {
                sink: r.u64()?,
                offset: r.u64()?,
                data: r.bytes(MAX_DATA_LEN)?,
            },
            8 => {
                let (source, offset) = (r.u64()?, r.u64()?);
                let result = match r.u8()? {
                    0 => Ok(()),
                    1 => Err(r.error()?),
                    t => {
                        return Err(DecodeError::BadField {
                            field: "result tag",
                            value: t as u64,
                        })
                    }
                };
                PeerMsg::CopyAck {
                    source,
                    offset,
                    result,
                }
            }
            9 => PeerMsg::CopyClose { sink: r.u64()? },
            10 => PeerMsg::MonitorsDrop { watcher: r.u64()? },
            11 => PeerMsg::LookupCancel { req: r.u64()? },
            22 => PeerMsg::Yield,
            12 => PeerMsg::Probe {
                seq: r.u64()?,
                updates: read_updates(&mut r, MAX_PIGGYBACK)?,
            },
            13 => PeerMsg::ProbeAck {
                seq: r.u64()?,
                updates: read_updates(&mut r, MAX_PIGGYBACK)?,
            },
            14 => PeerMsg::ProbeReq {
                seq: r.u64()?,
                target: NodeId(r.u32()?),
                updates: read_updates(&mut r, MAX_PIGGYBACK)?,
            },
            15 => PeerMsg::Join,
            16 => PeerMsg::Members {
                entries: read_updates(&mut r, MAX_MEMBERS_PER_FRAME)?,
            },
            17 => PeerMsg::Bye,
            18 => PeerMsg::ByeOk,
            k => return Err(DecodeError::UnknownKind(k)),
        };
        r.finish()?;
        Ok(msg)
    }
}

fn write_updates(w: &mut Writer<'_>, updates: &[MemberUpdate]) {
    w.u32(updates.len() as u32);
    for u in updates {
        w.u32(u.node.0);
        w.u64(u.incarnation);
        w.u32(u.seq);
        w.u8(u.state as u8);
    }
}

fn read_updates(r: &mut Reader<'_>, max: usize) -> Result<Vec<MemberUpdate>, DecodeError> {
    let n = r.u32()? as usize;
    if n > max {
        return Err(DecodeError::FieldTooLong { len: n, max });
    }
    // 17 bytes each: refuse counts the body cannot hold before allocating.
    if n.saturating_mul(17) > r.remaining() {
        return Err(DecodeError::Truncated);
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(MemberUpdate {
            node: NodeId(r.u32()?),
            incarnation: r.u64()?,
            seq: r.u32()?,
            state: MemberState::decode(r.u8()?)?,
        });
    }
    Ok(v)
}
