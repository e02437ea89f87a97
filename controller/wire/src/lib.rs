//! The FractOS wire protocol.
//!
//! One `no_std` crate shared by the controller core, the adaptor SDK and the
//! appliance. It defines every message exchanged between a **process** and
//! its **controller** ([`ProcessMsg`], [`ControllerMsg`]) and between two
//! **controllers** ([`PeerMsg`]).
//!
//! # Framing
//!
//! A frame is a little-endian `u32` body length followed by the body:
//!
//! ```text
//! +-----------+---------+------+------------------+
//! | len: u32  | version | kind | fields ...       |
//! +-----------+---------+------+------------------+
//!             |<------------ len bytes ---------->|
//! ```
//!
//! The same frame works on byte streams (TCP: use [`FrameSplitter`]) and on
//! message transports (shared-memory rings, RDMA SEND: one frame per
//! message, checked with [`frame_body`] then decoded). Every body carries
//! [`PROTOCOL_VERSION`]; a different version decodes to
//! [`DecodeError::BadVersion`].
//!
//! Decoding never panics: truncated, oversized, unknown-kind, bad-version
//! and inconsistent input all return a typed [`DecodeError`].
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

mod codec;
mod frame;
mod peer;
mod process;

pub use frame::{frame_body, FrameSplitter, FRAME_HEADER_LEN};
pub use peer::{
    DeriveSpec, MemberState, MemberUpdate, PeerMsg, PeerReply, PeerRequest, PeerSecurity,
    MAX_MEMBERS_PER_FRAME, MAX_PIGGYBACK,
};
pub use process::{ControllerMsg, ProcessMsg, Reply};

/// Version of this protocol. Bumped on any incompatible change.
///
/// Version 2: the peer handshake binds both identities, incarnations, nonces
/// and roles, and peer frames are sealed after it (version 1's
/// `Hello`/`Auth` handshake could be relayed).
///
/// Version 3: gossip membership (`Probe`, `ProbeAck`, `ProbeReq`, `Join`,
/// `Members`), idle-link close (`Bye`, `ByeOk`) and the simultaneous-dial
/// answer `Yield`.
pub const PROTOCOL_VERSION: u8 = 3;
/// Largest frame body accepted by default (copy chunks are far smaller).
pub const MAX_FRAME_LEN: usize = 1 << 20;
/// Largest number of capabilities one message may carry.
pub const MAX_CAPS_PER_MESSAGE: usize = 64;
/// Largest immediate-argument payload one message may carry.
pub const MAX_IMMEDIATES: usize = 64 * 1024;
/// Largest name in the cluster name service.
pub const MAX_NAME_LEN: usize = 256;
/// Largest process name sent at attach.
pub const MAX_PROCESS_NAME_LEN: usize = 128;
/// Largest memory payload (`MemWrite`, `MemReadReply`, copy chunks).
pub const MAX_DATA_LEN: usize = 512 * 1024;

/// A process's name for one of its capabilities: an index into its own
/// capability table. Meaningless to any other process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle(pub u32);

/// Cluster-unique identifier of a controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

/// A reference to a capability held at its owner controller: node, the
/// owner's incarnation (changes when a controller restarts) and the owner's
/// generation-tagged capability id. Only controllers exchange these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CapRef {
    /// Owner controller.
    pub node: NodeId,
    /// Owner controller incarnation the capability was created in.
    pub incarnation: u64,
    /// Owner-local capability id (index and generation).
    pub cap: u64,
}

/// Kind of object behind a capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ObjectKind {
    /// A window of a process's registered memory.
    Memory = 0,
    /// An invocable entry point of a process.
    Request = 1,
}

/// Access rights on a Memory capability. Rights only ever shrink along
/// derivations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Rights(u8);

impl Rights {
    /// No rights.
    pub const NONE: Rights = Rights(0);
    /// The window may be read (it may be the source of a copy).
    pub const READ: Rights = Rights(1);
    /// The window may be written (it may be the destination of a copy).
    pub const WRITE: Rights = Rights(2);
    /// Read and write.
    pub const READ_WRITE: Rights = Rights(3);

    /// Raw bits.
    pub const fn bits(self) -> u8 {
        self.0
    }
    /// Rights from raw bits; `None` if unknown bits are set.
    pub const fn from_bits(bits: u8) -> Option<Rights> {
        if bits & !3 == 0 {
            Some(Rights(bits))
        } else {
            None
        }
    }
    /// Whether every right in `other` is also in `self`.
    pub const fn contains(self, other: Rights) -> bool {
        self.0 & other.0 == other.0
    }
}

impl core::ops::BitOr for Rights {
    type Output = Rights;
    fn bitor(self, rhs: Rights) -> Rights {
        Rights(self.0 | rhs.0)
    }
}

/// What a process learns about a capability it receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CapInfo {
    /// Memory or Request.
    pub kind: ObjectKind,
    /// Rights (Memory only; empty for Requests).
    pub rights: Rights,
    /// Window length in bytes (Memory only; 0 for Requests).
    pub len: u64,
}

/// Typed operation errors carried on the wire. Every operation is answered by
/// exactly one completion: a success value or one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[repr(u16)]
pub enum ErrorCode {
    /// The handle names no capability in this process's table.
    #[error("bad handle: the process holds no capability under this handle")]
    BadHandle = 1,
    /// The capability is of the wrong kind for this operation.
    #[error("wrong object type: use a Memory capability for memory operations and a Request capability for invoke")]
    WrongType = 2,
    /// The capability lacks a right the operation needs.
    #[error("missing right: the capability lacks READ/WRITE needed here; ask its owner for a capability with that right")]
    MissingRight = 3,
    /// A window or offset lies outside the capability's window.
    #[error("out of bounds: the requested window is not inside the capability's window")]
    OutOfBounds = 4,
    /// The capability (or an ancestor) was revoked.
    #[error("revoked: the capability was revoked by a holder of it or of an ancestor")]
    Revoked = 5,
    /// The process owning the object has exited or its controller restarted.
    #[error("owner gone: the process that owns the object exited or its controller restarted")]
    OwnerGone = 6,
    /// The controller owning the object cannot be reached.
    #[error("peer unreachable: the owner controller is not connected; check the cluster links")]
    PeerUnreachable = 7,
    /// The operation did not finish in time; its outcome is unknown.
    #[error("timeout: no answer in time; the outcome of the operation is unknown")]
    Timeout = 8,
    /// A per-process or per-controller resource limit was reached.
    #[error("limit reached: too many capabilities or pending operations; drop handles or wait for completions")]
    LimitReached = 9,
    /// The message could not be decoded.
    #[error("malformed message: the bytes do not decode as a FractOS message")]
    Malformed = 10,
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: upgrade the older side")]
    VersionMismatch = 11,
    /// Wrong process token or cluster key.
    #[error("authentication failed: wrong process token or cluster key")]
    AuthFailed = 12,
    /// An operation was sent before a successful attach.
    #[error("not attached: send Attach with a valid token first")]
    NotAttached = 13,
    /// Copy source is longer than the destination window.
    #[error("size mismatch: the copy destination window is shorter than the source window")]
    SizeMismatch = 14,
    /// No capability is published under the name.
    #[error("name not found: nothing is published under this name (yet)")]
    NameNotFound = 15,
    /// The name is already published.
    #[error("name taken: another capability is published under this name")]
    NameTaken = 16,
    /// An argument is invalid (zero-length window, overflow, empty name...).
    #[error("invalid argument: check lengths, offsets and names")]
    InvalidArgument = 17,
    /// The owning process failed to serve a memory access.
    #[error("memory fault: the owning process could not read or write the registered window")]
    MemoryFault = 18,
}

impl ErrorCode {
    /// Every code, for exhaustive tests.
    pub const ALL: [ErrorCode; 18] = [
        ErrorCode::BadHandle,
        ErrorCode::WrongType,
        ErrorCode::MissingRight,
        ErrorCode::OutOfBounds,
        ErrorCode::Revoked,
        ErrorCode::OwnerGone,
        ErrorCode::PeerUnreachable,
        ErrorCode::Timeout,
        ErrorCode::LimitReached,
        ErrorCode::Malformed,
        ErrorCode::VersionMismatch,
        ErrorCode::AuthFailed,
        ErrorCode::NotAttached,
        ErrorCode::SizeMismatch,
        ErrorCode::NameNotFound,
        ErrorCode::NameTaken,
        ErrorCode::InvalidArgument,
        ErrorCode::MemoryFault,
    ];

    /// Decode a code from its wire value.
    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| *c as u16 == v)
    }
}

/// Why bytes failed to decode as a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ends before the message does.
    #[error("truncated message: more bytes were expected")]
    Truncated,
    /// The frame announces a body longer than the limit.
    #[error("oversized frame: {len} bytes announced, at most {max} accepted")]
    Oversized {
        /// Announced length.
        len: usize,
        /// Limit in force.
        max: usize,
    },
    /// The body was produced by another protocol version.
    #[error("protocol version {got} received, this side speaks {expected}")]
    BadVersion {
        /// Version in the message.
        got: u8,
        /// Our version.
        expected: u8,
    },
    /// The message kind is unknown for this direction.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// A field holds a value outside its domain.
    #[error("invalid value {value} in field {field}")]
    BadField {
        /// Field name.
        field: &'static str,
        /// Value found.
        value: u64,
    },
    /// A variable-length field exceeds its limit.
    #[error("field of {len} elements exceeds the limit of {max}")]
    FieldTooLong {
        /// Length found.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// Bytes remain after the message ended.
    #[error("{0} unexpected trailing bytes after the message")]
    TrailingBytes(usize),
}

/// Shared body prologue: version byte then kind byte.
pub(crate) fn read_header(r: &mut codec::Reader<'_>) -> Result<u8, DecodeError> {
    let version = r.u8()?;
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::BadVersion {
            got: version,
            expected: PROTOCOL_VERSION,
        });
    }
    r.u8()
}

/// Starts a frame in `out`: reserves the length prefix and writes version and
/// kind. Returns the frame's start offset for [`end_frame`].
pub(crate) fn begin_frame(out: &mut alloc::vec::Vec<u8>, kind: u8) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, PROTOCOL_VERSION, kind]);
    start
}

/// Patches the length prefix of the frame started at `start`.
pub(crate) fn end_frame(out: &mut [u8], start: usize) {
    let len = (out.len() - start - FRAME_HEADER_LEN) as u32;
    out[start..start + FRAME_HEADER_LEN].copy_from_slice(&len.to_le_bytes());
}
