//! Valid-looking wire messages built from fuzz input.
//!
//! Values are drawn mostly from small, meaningful ranges (handles the
//! process holds, windows inside its memory, names from a short list) so
//! that operations reach deep into the core, and sometimes from the edges
//! (zero, `u64::MAX`, limits and one past them).

use arbitrary::{Result, Unstructured};
use fractos_wire::{
    CapInfo, CapRef, ControllerMsg, DeriveSpec, ErrorCode, Handle, NodeId, ObjectKind, PeerMsg,
    PeerReply, PeerRequest, PeerSecurity, ProcessMsg, Reply, Rights, MAX_CAPS_PER_MESSAGE,
    MAX_IMMEDIATES, MAX_NAME_LEN,
};

/// Names processes and peers publish and look up.
const NAMES: [&[u8]; 4] = [b"a", b"b", b"svc", b"x/y"];

pub(crate) fn small_bytes(u: &mut Unstructured, max: usize) -> Result<Vec<u8>> {
    let n = u.int_in_range(0..=max)?;
    let mut v = vec![0; n];
    u.fill_buffer(&mut v)?;
    Ok(v)
}

fn edge_u64(u: &mut Unstructured) -> Result<u64> {
    Ok(match u.int_in_range(0..=3u8)? {
        0 => 0,
        1 => u64::MAX,
        2 => u.arbitrary()?,
        _ => u.int_in_range(1..=4096)?,
    })
}

pub(crate) fn rights(u: &mut Unstructured) -> Result<Rights> {
    Ok(Rights::from_bits(u.int_in_range(0..=3)?).expect("two bits"))
}

pub(crate) fn error_code(u: &mut Unstructured) -> Result<ErrorCode> {
    Ok(*u.choose(&ErrorCode::ALL)?)
}

fn handle(u: &mut Unstructured, known: &[u32]) -> Result<Handle> {
    Ok(Handle(match u.int_in_range(0..=7u8)? {
        0 => u.arbitrary()?,
        1 => u.int_in_range(0..=40)?,
        _ if !known.is_empty() => *u.choose(known)?,
        _ => u.int_in_range(0..=8)?,
    }))
}

fn handles(u: &mut Unstructured, known: &[u32]) -> Result<Vec<Handle>> {
    match u.int_in_range(0..=15u8)? {
        0 => Ok(vec![handle(u, known)?; MAX_CAPS_PER_MESSAGE]),
        1 => Ok(vec![handle(u, known)?; MAX_CAPS_PER_MESSAGE + 1]),
        _ => (0..u.int_in_range(0..=3)?)
            .map(|_| handle(u, known))
            .collect(),
    }
}

pub(crate) fn imms(u: &mut Unstructured) -> Result<Vec<u8>> {
    Ok(match u.int_in_range(0..=19u8)? {
        0 => vec![0xa5; MAX_IMMEDIATES],
        1 => vec![0x5a; MAX_IMMEDIATES + 1],
        _ => small_bytes(u, 16)?,
    })
}

pub(crate) fn name(u: &mut Unstructured) -> Result<Vec<u8>> {
    Ok(match u.int_in_range(0..=15u8)? {
        0 => Vec::new(),
        1 => vec![b'n'; MAX_NAME_LEN],
        2 => vec![b'n'; MAX_NAME_LEN + 1],
        3 => small_bytes(u, 8)?,
        _ => u.choose(&NAMES)?.to_vec(),
    })
}

pub(crate) fn wait_ms(u: &mut Unstructured) -> Result<u32> {
    Ok(match u.int_in_range(0..=7u8)? {
        0 => u.arbitrary()?,
        1 => 10,
        2 => 1_000,
        3 => 20_000,
        _ => 0,
    })
}

/// A window `(addr, len)` in a memory of `mem` bytes, sometimes outside.
fn window(u: &mut Unstructured, mem: u64) -> Result<(u64, u64)> {
    Ok(match u.int_in_range(0..=9u8)? {
        0 => (edge_u64(u)?, edge_u64(u)?),
        1 => (mem - 1, u.int_in_range(1..=2)?),
        2 => (u.int_in_range(0..=mem)?, 0),
        _ => {
            let addr = u.int_in_range(0..=mem - 1)?;
            (addr, u.int_in_range(1..=mem - addr)?)
        }
    })
}

/// A process operation with id `op`, naming handles mostly from `known`,
/// for a process whose registered memory is `mem` bytes.
pub(crate) fn process_op(
    u: &mut Unstructured,
    op: u64,
    known: &[u32],
    mem: u64,
) -> Result<ProcessMsg> {
    Ok(match u.int_in_range(0..=13u8)? {
        0 | 1 => {
            let (addr, len) = window(u, mem)?;
            ProcessMsg::MemoryCreate {
                op,
                addr,
                len,
                rights: rights(u)?,
            }
        }
        2 => {
            let (offset, len) = window(u, mem / 2)?;
            ProcessMsg::Diminish {
                op,
                cap: handle(u, known)?,
                offset,
                len,
                rights: rights(u)?,
            }
        }
        3 => ProcessMsg::RequestCreate {
            op,
            tag: u.arbitrary()?,
            imms: imms(u)?,
            caps: handles(u, known)?,
        },
        4 => ProcessMsg::Derive {
            op,
            cap: handle(u, known)?,
            imms: imms(u)?,
            caps: handles(u, known)?,
        },
        5 => ProcessMsg::Invoke {
            op,
            cap: handle(u, known)?,
            imms: imms(u)?,
            caps: handles(u, known)?,
        },
        6 | 7 => ProcessMsg::Copy {
            op,
            src: handle(u, known)?,
            dst: handle(u, known)?,
            completion: if u.arbitrary()? {
                Some(handle(u, known)?)
            } else {
                None
            },
        },
        8 => ProcessMsg::Revoke {
            op,
            cap: handle(u, known)?,
        },
        9 => ProcessMsg::Drop {
            op,
            cap: handle(u, known)?,
        },
        10 => ProcessMsg::Monitor {
            op,
            cap: handle(u, known)?,
            notify: handle(u, known)?,
        },
        11 => ProcessMsg::Publish {
            op,
            name: name(u)?,
            cap: handle(u, known)?,
        },
        12 => ProcessMsg::Unpublish { op, name: name(u)? },
        _ => ProcessMsg::Lookup {
            op,
            name: name(u)?,
            wait_ms: wait_ms(u)?,
        },
    })
}

/// What a fake peer knows to make its messages plausible.
#[derive(Default)]
pub(crate) struct PeerCtx {
    /// Capability references seen anywhere (in traffic, in tables).
    pub caps: Vec<CapRef>,
    /// Request ids the real controllers sent to the fake peer.
    pub reqs: Vec<u64>,
    /// Copy ids (sinks and sources) seen in traffic.
    pub copy_ids: Vec<u64>,
    /// Node ids of the cluster.
    pub nodes: Vec<NodeId>,
    /// The fake peer's node id.
    pub fake: Option<NodeId>,
    /// Set to the receiving controller to keep references it must already
    /// hold (invoke arguments, bound arguments, notify requests, published
    /// and returned capabilities) off its own objects: the core trusts
    /// peers on these (see README.md, "Findings"). `None`: hostile peer.
    pub receiver: Option<NodeId>,
}

/// A reference the receiver is told it already holds.
fn held_ref(u: &mut Unstructured, ctx: &PeerCtx) -> Result<CapRef> {
    let mut c = cap_ref(u, ctx)?;
    if let (Some(r), Some(f)) = (ctx.receiver, ctx.fake) {
        if c.node == r {
            c.node = f;
        }
    }
    Ok(c)
}

fn pick_u64(u: &mut Unstructured, seen: &[u64]) -> Result<u64> {
    if !seen.is_empty() && u.ratio(3u8, 4)? {
        Ok(*u.choose(seen)?)
    } else {
        Ok(u.int_in_range(0..=8)?)
    }
}

pub(crate) fn cap_ref(u: &mut Unstructured, ctx: &PeerCtx) -> Result<CapRef> {
    if !ctx.caps.is_empty() && u.ratio(3u8, 4)? {
        let mut c = *u.choose(&ctx.caps)?;
        match u.int_in_range(0..=9u8)? {
            0 => c.incarnation = c.incarnation.wrapping_add(1),
            1 => c.cap ^= 1 << u.int_in_range(0..=63)?,
            _ => {}
        }
        return Ok(c);
    }
    Ok(CapRef {
        node: *u.choose(&ctx.nodes)?,
        incarnation: u.int_in_range(0..=2)?,
        cap: edge_u64(u)?,
    })
}

pub(crate) fn cap_info(u: &mut Unstructured) -> Result<CapInfo> {
    Ok(CapInfo {
        kind: if u.arbitrary()? {
            ObjectKind::Memory
        } else {
            ObjectKind::Request
        },
        rights: rights(u)?,
        len: edge_u64(u)?,
    })
}

fn held_refs(u: &mut Unstructured, ctx: &PeerCtx) -> Result<Vec<CapRef>> {
    (0..u.int_in_range(0..=3)?)
        .map(|_| held_ref(u, ctx))
        .collect()
}

fn peer_request(u: &mut Unstructured, ctx: &PeerCtx) -> Result<PeerRequest> {
    Ok(match u.int_in_range(0..=8u8)? {
        0 => PeerRequest::Derive {
            parent: cap_ref(u, ctx)?,
            holder: *u.choose(&ctx.nodes)?,
            spec: match u.int_in_range(0..=2u8)? {
                0 => DeriveSpec::Transfer,
                1 => DeriveSpec::Diminish {
                    offset: edge_u64(u)?,
                    len: edge_u64(u)?,
                    rights: rights(u)?,
                },
                _ => DeriveSpec::Bind {
                    imms: imms(u)?,
                    caps: held_refs(u, ctx)?,
                },
            },
        },
        1 => PeerRequest::Invoke {
            target: cap_ref(u, ctx)?,
            imms: imms(u)?,
            caps: (0..u.int_in_range(0..=3)?)
                .map(|_| Ok((held_ref(u, ctx)?, cap_info(u)?)))
                .collect::<Result<_>>()?,
        },
        2 => PeerRequest::Revoke {
            cap: cap_ref(u, ctx)?,
        },
        3 => PeerRequest::Monitor {
            cap: cap_ref(u, ctx)?,
            notify: held_ref(u, ctx)?,
            watcher: u.int_in_range(0..=4)?,
        },
        4 => PeerRequest::CopyStart {
            src: cap_ref(u, ctx)?,
            dst: cap_ref(u, ctx)?,
        },
        5 => PeerRequest::CopyOpen {
            dst: cap_ref(u, ctx)?,
            len: edge_u64(u)?,
            source: pick_u64(u, &ctx.copy_ids)?,
        },
        6 => PeerRequest::Publish {
            name: name(u)?,
            cap: held_ref(u, ctx)?,
            publisher: u.int_in_range(0..=4)?,
        },
        7 => PeerRequest::Unpublish {
            name: name(u)?,
            publisher: u.int_in_range(0..=4)?,
        },
        _ => PeerRequest::Lookup {
            name: name(u)?,
            wait_ms: wait_ms(u)?,
        },
    })
}

/// A message a keyed (but arbitrary) peer controller might send.
pub(crate) fn peer_msg(u: &mut Unstructured, ctx: &PeerCtx, req: u64) -> Result<PeerMsg> {
    Ok(match u.int_in_range(0..=14u8)? {
        0 => PeerMsg::Ping,
        1..=3 => PeerMsg::Request {
            req,
            body: peer_request(u, ctx)?,
        },
        4..=6 => PeerMsg::Reply {
            req: pick_u64(u, &ctx.reqs)?,
            result: match u.int_in_range(0..=5u8)? {
                0 => Ok(PeerReply::Done),
                1 => Ok(PeerReply::Cap {
                    cap: held_ref(u, ctx)?,
                    info: cap_info(u)?,
                }),
                2 => Ok(PeerReply::CopyOpened {
                    sink: pick_u64(u, &ctx.copy_ids)?,
                }),
                3 => Ok(PeerReply::Copied { len: edge_u64(u)? }),
                _ => Err(error_code(u)?),
            },
        },
        7 => PeerMsg::Release {
            cap: cap_ref(u, ctx)?,
        },
        8 | 9 => PeerMsg::CopyChunk {
            sink: pick_u64(u, &ctx.copy_ids)?,
            offset: match u.int_in_range(0..=3u8)? {
                0 => edge_u64(u)?,
                n => u64::from(n - 1) * 64,
            },
            data: small_bytes(u, 130)?,
        },
        10 => PeerMsg::CopyAck {
            source: pick_u64(u, &ctx.copy_ids)?,
            offset: u.int_in_range(0..=4)? * 64,
            result: if u.ratio(3u8, 4)? {
                Ok(())
            } else {
                Err(error_code(u)?)
            },
        },
        11 => PeerMsg::CopyClose {
            sink: pick_u64(u, &ctx.copy_ids)?,
        },
        12 => PeerMsg::MonitorsDrop {
            watcher: u.int_in_range(0..=4)?,
        },
        13 => PeerMsg::LookupCancel {
            req: pick_u64(u, &ctx.reqs)?,
        },
        _ => match u.int_in_range(0..=3u8)? {
            0 => PeerMsg::Hello {
                node: *u.choose(&ctx.nodes)?,
                incarnation: u.arbitrary()?,
                nonce: u.arbitrary()?,
                responder: *u.choose(&ctx.nodes)?,
                security: security(u)?,
            },
            1 => PeerMsg::HelloReply {
                node: *u.choose(&ctx.nodes)?,
                incarnation: u.arbitrary()?,
                nonce: u.arbitrary()?,
                security: security(u)?,
                proof: u.arbitrary()?,
            },
            2 => PeerMsg::Finish {
                proof: u.arbitrary()?,
            },
            _ => PeerMsg::Rejected {
                code: error_code(u)?,
            },
        },
    })
}

pub(crate) fn security(u: &mut Unstructured) -> Result<PeerSecurity> {
    Ok(if u.arbitrary()? {
        PeerSecurity::Authenticated
    } else {
        PeerSecurity::Secure
    })
}

/// Any controller-to-process message (for the wire decode driver).
pub(crate) fn controller_msg(u: &mut Unstructured) -> Result<ControllerMsg> {
    Ok(match u.int_in_range(0..=5u8)? {
        0 => ControllerMsg::Attached {
            node: NodeId(u.arbitrary()?),
        },
        1 => ControllerMsg::Rejected {
            code: error_code(u)?,
            version: u.arbitrary()?,
        },
        2 => ControllerMsg::Completion {
            op: u.arbitrary()?,
            result: match u.int_in_range(0..=2u8)? {
                0 => Ok(Reply::Done),
                1 => Ok(Reply::Cap {
                    handle: Handle(u.arbitrary()?),
                    info: cap_info(u)?,
                }),
                _ => Err(error_code(u)?),
            },
        },
        3 => ControllerMsg::Invocation {
            tag: u.arbitrary()?,
            imms: small_bytes(u, 32)?,
            caps: (0..u.int_in_range(0..=3)?)
                .map(|_| Ok((Handle(u.arbitrary()?), cap_info(u)?)))
                .collect::<Result<_>>()?,
        },
        4 => ControllerMsg::MemRead {
            xfer: u.arbitrary()?,
            addr: u.arbitrary()?,
            len: u.arbitrary()?,
        },
        _ => ControllerMsg::MemWrite {
            xfer: u.arbitrary()?,
            addr: u.arbitrary()?,
            data: small_bytes(u, 32)?,
        },
    })
}

/// Any process-to-controller message (for the wire decode driver).
pub(crate) fn any_process_msg(u: &mut Unstructured) -> Result<ProcessMsg> {
    Ok(match u.int_in_range(0..=3u8)? {
        0 => ProcessMsg::Attach {
            name: small_bytes(u, 16)?,
            token: u.arbitrary()?,
        },
        1 => ProcessMsg::MemReadReply {
            xfer: u.arbitrary()?,
            result: if u.arbitrary()? {
                Ok(small_bytes(u, 32)?)
            } else {
                Err(error_code(u)?)
            },
        },
        2 => ProcessMsg::MemWriteReply {
            xfer: u.arbitrary()?,
            result: if u.arbitrary()? {
                Ok(())
            } else {
                Err(error_code(u)?)
            },
        },
        _ => {
            let op = u.arbitrary()?;
            process_op(u, op, &[], 4096)?
        }
    })
}
