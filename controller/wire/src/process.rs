//! Messages between a process and its controller.

use alloc::vec::Vec;

use crate::codec::{Reader, Writer};
use crate::{
    begin_frame, end_frame, read_header, CapInfo, DecodeError, ErrorCode, Handle, NodeId, Rights,
    MAX_CAPS_PER_MESSAGE, MAX_DATA_LEN, MAX_IMMEDIATES, MAX_NAME_LEN, MAX_PROCESS_NAME_LEN,
};

/// A message from a process to its controller.
///
/// Operations carry an `op` id chosen by the process; the controller answers
/// each with exactly one [`ControllerMsg::Completion`] carrying that id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProcessMsg {
    /// First message on a channel: authenticate with a per-process token.
    Attach {
        /// Process name (the token is bound to it).
        name: Vec<u8>,
        /// Token proving the process may attach under `name`.
        token: [u8; 32],
    },
    /// Make a Memory capability for a registered window `[addr, addr+len)`.
    MemoryCreate {
        /// Operation id.
        op: u64,
        /// Start address in the process's registered memory.
        addr: u64,
        /// Length in bytes (non-zero).
        len: u64,
        /// Rights of the new capability.
        rights: Rights,
    },
    /// Derive a Memory capability with a sub-window and fewer rights.
    Diminish {
        /// Operation id.
        op: u64,
        /// The Memory capability to diminish.
        cap: Handle,
        /// Offset of the sub-window inside `cap`'s window.
        offset: u64,
        /// Length of the sub-window.
        len: u64,
        /// Rights of the new capability (a subset of `cap`'s).
        rights: Rights,
    },
    /// Make a Request capability for one of this process's handlers.
    RequestCreate {
        /// Operation id.
        op: u64,
        /// Handler tag delivered with every invocation.
        tag: u64,
        /// Bound immediates (prepended to invoker immediates).
        imms: Vec<u8>,
        /// Bound capabilities (prepended to invoker capabilities).
        caps: Vec<Handle>,
    },
    /// Derive a Request capability with more bound arguments.
    Derive {
        /// Operation id.
        op: u64,
        /// The Request capability to derive from.
        cap: Handle,
        /// Immediates to append to the bound immediates.
        imms: Vec<u8>,
        /// Capabilities to append to the bound capabilities.
        caps: Vec<Handle>,
    },
    /// Deliver a Request to its owner.
    Invoke {
        /// Operation id.
        op: u64,
        /// The Request capability.
        cap: Handle,
        /// Invoker immediates.
        imms: Vec<u8>,
        /// Invoker capabilities, installed as fresh handles in the receiver.
        caps: Vec<Handle>,
    },
    /// Copy the source window into the destination window, owner to owner.
    Copy {
        /// Operation id.
        op: u64,
        /// Memory capability with READ.
        src: Handle,
        /// Memory capability with WRITE, at least as long as `src`.
        dst: Handle,
        /// Request invoked (without arguments) once the bytes are in place.
        completion: Option<Handle>,
    },
    /// Invalidate this capability and every capability derived from it.
    Revoke {
        /// Operation id.
        op: u64,
        /// Capability to revoke.
        cap: Handle,
    },
    /// Remove one handle from this process's table.
    Drop {
        /// Operation id.
        op: u64,
        /// Handle to drop.
        cap: Handle,
    },
    /// Invoke `notify` when the capability `cap` dies.
    Monitor {
        /// Operation id.
        op: u64,
        /// Capability to watch.
        cap: Handle,
        /// Request to invoke when it dies.
        notify: Handle,
    },
    /// Bind a capability to a cluster-wide name.
    Publish {
        /// Operation id.
        op: u64,
        /// Name (non-empty).
        name: Vec<u8>,
        /// Capability to publish.
        cap: Handle,
    },
    /// Remove a name this process published.
    Unpublish {
        /// Operation id.
        op: u64,
        /// Name.
        name: Vec<u8>,
    },
    /// Fetch the capability published under a name, waiting up to
    /// `wait_ms` milliseconds for it to appear (0: do not wait).
    Lookup {
        /// Operation id.
        op: u64,
        /// Name.
        name: Vec<u8>,
        /// How long to wait for the name to be published.
        wait_ms: u32,
    },
    /// Answer to [`ControllerMsg::MemRead`].
    MemReadReply {
        /// Transfer id from the request.
        xfer: u64,
        /// The bytes read, or why they could not be.
        result: Result<Vec<u8>, ErrorCode>,
    },
    /// Answer to [`ControllerMsg::MemWrite`].
    MemWriteReply {
        /// Transfer id from the request.
        xfer: u64,
        /// Success, or why the write failed.
        result: Result<(), ErrorCode>,
    },
}

/// Success value of an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The operation succeeded and returns nothing.
    Done,
    /// The operation returns a new capability.
    Cap {
        /// The new handle in the process's table.
        handle: Handle,
        /// What the capability is.
        info: CapInfo,
    },
}

/// A message from a controller to one of its processes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControllerMsg {
    /// Attach accepted.
    Attached {
        /// The controller's node id.
        node: NodeId,
    },
    /// Attach refused; the controller closes the channel after this.
    Rejected {
        /// Why.
        code: ErrorCode,
        /// Protocol version the controller speaks.
        version: u8,
    },
    /// The one answer to an operation.
    Completion {
        /// Operation id from the request.
        op: u64,
        /// Result.
        result: Result<Reply, ErrorCode>,
    },
    /// One of this process's Requests was invoked.
    Invocation {
        /// Handler tag of the Request.
        tag: u64,
        /// Bound immediates followed by invoker immediates.
        imms: Vec<u8>,
        /// Bound then invoker capabilities, as fresh handles.
        caps: Vec<(Handle, CapInfo)>,
    },
    /// Read `len` bytes at `addr` of registered memory and answer with
    /// [`ProcessMsg::MemReadReply`].
    MemRead {
        /// Transfer id to echo.
        xfer: u64,
        /// Address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// Write `data` at `addr` of registered memory and answer with
    /// [`ProcessMsg::MemWriteReply`].
    MemWrite {
        /// Transfer id to echo.
        xfer: u64,
        /// Address.
        addr: u64,
        /// Bytes.
        data: Vec<u8>,
    },
}

impl ProcessMsg {
    /// Appends this message as one frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let kind = match self {
            ProcessMsg::Attach { .. } => 1,
            ProcessMsg::MemoryCreate { .. } => 2,
            ProcessMsg::Diminish { .. } => 3,
            ProcessMsg::RequestCreate { .. } => 4,
            ProcessMsg::Derive { .. } => 5,
            ProcessMsg::Invoke { .. } => 6,
            ProcessMsg::Copy { .. } => 7,
            ProcessMsg::Revoke { .. } => 8,
            ProcessMsg::Drop { .. } => 9,
            ProcessMsg::Monitor { .. } => 10,
            ProcessMsg::Publish { .. } => 11,
            ProcessMsg::Unpublish { .. } => 12,
            ProcessMsg::Lookup { .. } => 13,
            ProcessMsg::MemReadReply { .. } => 14,
            ProcessMsg::MemWriteReply { .. } => 15,
        };
        let start = begin_frame(out, kind);
        let mut w = Writer { out };
        match self {
            ProcessMsg::Attach { name, token } => {
                w.bytes(name);
                w.array(token);
            }
            ProcessMsg::MemoryCreate {
                op,
                addr,
                len,
                rights,
            } => {
                w.u64(*op);
                w.u64(*addr);
                w.u64(*len);
                w.u8(rights.bits());
            }
            ProcessMsg::Diminish {
                op,
                cap,
                offset,
                len,
                rights,
            } => {
                w.u64(*op);
                w.handle(*cap);
                w.u64(*offset);
                w.u64(*len);
                w.u8(rights.bits());
            }
            ProcessMsg::RequestCreate {
                op,
                tag: cap_or_tag,
                imms,
                caps,
            } => {
                w.u64(*op);
                w.u64(*cap_or_tag);
                w.bytes(imms);
                w.handles(caps);
            }
            ProcessMsg::Derive {
                op,
                cap,
                imms,
                caps,
            }
            | ProcessMsg::Invoke {
                op,
                cap,
                imms,
                caps,
            } => {
                w.u64(*op);
                w.handle(*cap);
                w.bytes(imms);
                w.handles(caps);
            }
            ProcessMsg::Copy {
                op,
                src,
                dst,
                completion,
            } => {
                w.u64(*op);
                w.handle(*src);
                w.handle(*dst);
                w.opt_handle(*completion);
            }
            ProcessMsg::Revoke { op, cap } | ProcessMsg::Drop { op, cap } => {
                w.u64(*op);
                w.handle(*cap);
            }
            ProcessMsg::Monitor { op, cap, notify } => {
                w.u64(*op);
                w.handle(*cap);
                w.handle(*notify);
            }
            ProcessMsg::Publish { op, name, cap } => {
                w.u64(*op);
                w.bytes(name);
                w.handle(*cap);
            }
            ProcessMsg::Unpublish { op, name } => {
                w.u64(*op);
                w.bytes(name);
            }
            ProcessMsg::Lookup { op, name, wait_ms } => {
                w.u64(*op);
                w.bytes(name);
                w.u32(*wait_ms);
            }
            ProcessMsg::MemReadReply { xfer, result } => {
                w.u64(*xfer);
                match result {
                    Ok(data) => {
                        w.u8(0);
                        w.bytes(data);
                    }
                    Err(e) => {
                        w.u8(1);
                        w.error(*e);
                    }
                }
            }
            ProcessMsg::MemWriteReply { xfer, result } => {
                w.u64(*xfer);
                match result {
                    Ok(()) => w.u8(0),
                    Err(e) => {
                        w.u8(1);
                        w.error(*e);
                    }
                }
            }
        }
        end_frame(out, start);
    }

    /// Decodes one frame body (without the length prefix).
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let kind = read_header(&mut r)?;
        let msg = match kind {
            1 => ProcessMsg::Attach {
                name: r.bytes(MAX_PROCESS_NAME_LEN)?,
                token: r.array()?,
            },
            2 => ProcessMsg::MemoryCreate {
                op: r.u64()?,
                addr: r.u64()?,
                len: r.u64()?,
                rights: r.rights()?,
            },
            3 => ProcessMsg::Diminish {
                op: r.u64()?,
                cap: r.handle()?,
                offset: r.u64()?,
                len: r.u64()?,
                rights: r.rights()?,
            },
            4 => ProcessMsg::RequestCreate {
                op: r.u64()?,
                tag: r.u64()?,
                imms: r.bytes(MAX_IMMEDIATES)?,
                caps: r.handles()?,
            },
            5 | 6 => {
                let (op, cap, imms, caps) = (
                    r.u64()?,
                    r.handle()?,
                    r.bytes(MAX_IMMEDIATES)?,
                    r.handles()?,
                );
                if kind == 5 {
                    ProcessMsg::Derive {
                        op,
                        cap,
                        imms,
                        caps,
                    }
                } else {
                    ProcessMsg::Invoke {
                        op,
                        cap,
                        imms,
                        caps,
                    }
                }
            }
            7 => ProcessMsg::Copy {
                op: r.u64()?,
                src: r.handle()?,
                dst: r.handle()?,
                completion: r.opt_handle()?,
            },
            8 => ProcessMsg::Revoke {
                op: r.u64()?,
                cap: r.handle()?,
            },
            9 => ProcessMsg::Drop {
                op: r.u64()?,
                cap: r.handle()?,
            },
            10 => ProcessMsg::Monitor {
                op: r.u64()?,
                cap: r.handle()?,
                notify: r.handle()?,
            },
            11 => ProcessMsg::Publish {
                op: r.u64()?,
                name: r.bytes(MAX_NAME_LEN)?,
                cap: r.handle()?,
            },
            12 => ProcessMsg::Unpublish {
                op: r.u64()?,
                name: r.bytes(MAX_NAME_LEN)?,
            },
            13 => ProcessMsg::Lookup {
                op: r.u64()?,
                name: r.bytes(MAX_NAME_LEN)?,
                wait_ms: r.u32()?,
            },
            14 => {
                let xfer = r.u64()?;
                let result = match r.u8()? {
                    0 => Ok(r.bytes(MAX_DATA_LEN)?),
                    1 => Err(r.error()?),
                    t => {
                        return Err(DecodeError::BadField {
                            field: "result tag",
                            value: t as u64,
                        })
                    }
                };
                ProcessMsg::MemReadReply { xfer, result }
            }
            15 => {
                let xfer = r.u64()?;
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
                ProcessMsg::MemWriteReply { xfer, result }
            }
            k => return Err(DecodeError::UnknownKind(k)),
        };
        r.finish()?;
        Ok(msg)
    }

    /// The operation id, for messages that are operations.
    pub fn op_id(&self) -> Option<u64> {
        match self {
            ProcessMsg::Attach { .. }
            | ProcessMsg::MemReadReply { .. }
            | ProcessMsg::MemWriteReply { .. } => None,
            ProcessMsg::MemoryCreate { op, .. }
            | ProcessMsg::Diminish { op, .. }
            | ProcessMsg::RequestCreate { op, .. }
            | ProcessMsg::Derive { op, .. }
            | ProcessMsg::Invoke { op, .. }
            | ProcessMsg::Copy { op, .. }
            | ProcessMsg::Revoke { op, .. }
            | ProcessMsg::Drop { op, .. }
            | ProcessMsg::Monitor { op, .. }
            | ProcessMsg::Publish { op, .. }
            | ProcessMsg::Unpublish { op, .. }
            | ProcessMsg::Lookup { op, .. } => Some(*op),
        }
    }
}

impl ControllerMsg {
    /// Appends this message as one frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let kind = match self {
            ControllerMsg::Attached { .. } => 1,
            ControllerMsg::Rejected { .. } => 2,
            ControllerMsg::Completion { .. } => 3,
            ControllerMsg::Invocation { .. } => 4,
            ControllerMsg::MemRead { .. } => 5,
            ControllerMsg::MemWrite { .. } => 6,
        };
        let start = begin_frame(out, kind);
        let mut w = Writer { out };
        match self {
            ControllerMsg::Attached { node } => w.u32(node.0),
            ControllerMsg::Rejected { code, version } => {
                w.error(*code);
                w.u8(*version);
            }
            ControllerMsg::Completion { op, result } => {
                w.u64(*op);
                match result {
                    Ok(Reply::Done) => w.u8(0),
                    Ok(Reply::Cap { handle, info }) => {
                        w.u8(1);
                        w.handle(*handle);
                        w.cap_info(info);
                    }
                    Err(e) => {
                        w.u8(2);
                        w.error(*e);
                    }
                }
            }
            ControllerMsg::Invocation { tag, imms, caps } => {
                w.u64(*tag);
                w.bytes(imms);
                w.u32(caps.len() as u32);
                for (h, info) in caps {
                    w.handle(*h);
                    w.cap_info(info);
                }
            }
            ControllerMsg::MemRead { xfer, addr, len } => {
                w.u64(*xfer);
                w.u64(*addr);
                w.u32(*len);
            }
            ControllerMsg::MemWrite { xfer, addr, data } => {
                w.u64(*xfer);
                w.u64(*addr);
                w.bytes(data);
            }
        }
        end_frame(out, start);
    }

    /// Decodes one frame body (without the length prefix).
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let msg = match read_header(&mut r)? {
            1 => ControllerMsg::Attached {
                node: NodeId(r.u32()?),
            },
            2 => ControllerMsg::Rejected {
                code: r.error()?,
                version: r.u8()?,
            },
            3 => {
                let op = r.u64()?;
                let result = match r.u8()? {
                    0 => Ok(Reply::Done),
                    1 => Ok(Reply::Cap {
                        handle: r.handle()?,
                        info: r.cap_info()?,
                    }),
                    2 => Err(r.error()?),
                    t => {
                        return Err(DecodeError::BadField {
                            field: "result tag",
                            value: t as u64,
                        })
                    }
                };
                ControllerMsg::Completion { op, result }
            }
            4 => {
                let tag = r.u64()?;
                let imms = r.bytes(MAX_IMMEDIATES * 2)?;
                let n = r.u32()? as usize;
                if n > MAX_CAPS_PER_MESSAGE * 2 {
                    return Err(DecodeError::FieldTooLong {
                        len: n,
                        max: MAX_CAPS_PER_MESSAGE * 2,
                    });
                }
                if n * 14 > r.remaining() {
                    return Err(DecodeError::Truncated);
                }
                let mut caps = Vec::with_capacity(n);
                for _ in 0..n {
                    caps.push((r.handle()?, r.cap_info()?));
                }
                ControllerMsg::Invocation { tag, imms, caps }
            }
            5 => ControllerMsg::MemRead {
                xfer: r.u64()?,
                addr: r.u64()?,
                len: r.u32()?,
            },
            6 => ControllerMsg::MemWrite {
                xfer: r.u64()?,
                addr: r.u64()?,
                data: r.bytes(MAX_DATA_LEN)?,
            },
            k => return Err(DecodeError::UnknownKind(k)),
        };
        r.finish()?;
        Ok(msg)
    }
}
