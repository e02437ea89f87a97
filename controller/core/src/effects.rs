//! Small types shared by the controller and its subsystems.
//!
//! The subsystems (the copy engine in `copy`, the name service in `names`)
//! own their state and never touch the controller's: each input method
//! takes what it needs to read (the time, the capability store) and pushes
//! [`Effect`]s, which the controller applies in order once the method
//! returns. This module depends on no subsystem, so none of them depends
//! on another or on the controller.

use alloc::vec::Vec;

use fractos_wire::{CapRef, ErrorCode, NodeId, PeerMsg, PeerReply};

use crate::{Instant, ProcessKey};

slotmap::new_key_type! {
    /// A copy being sent from this controller.
    pub(crate) struct SourceKey;
    /// A copy being received by this controller.
    pub(crate) struct SinkKey;
    /// A revoke waiting for the in-flight bytes of the copies it stopped.
    pub(crate) struct BarrierKey;
    /// A lookup waiting for its name to be published.
    pub(crate) struct WaiterKey;
}

/// Who receives the result of an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A local process's operation.
    Proc {
        proc: ProcessKey,
        op: u64,
        started: Instant,
    },
    /// A peer's request.
    Peer { node: NodeId, req: u64 },
}

/// A deadline kept in the controller's timer heap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Timer {
    /// Heartbeats and silent-link detection.
    Heartbeat,
    /// A request to a peer awaiting its reply.
    Call(u64),
    /// A copy source's progress deadline (copy engine).
    Source(SourceKey),
    /// A copy sink's idle deadline (copy engine).
    Sink(SinkKey),
    /// A waiting lookup's deadline (name service).
    NameWaiter(WaiterKey),
    /// A revoke barrier's deadline (copy engine).
    Barrier(BarrierKey),
    /// Gossip protocol period.
    Swim,
    /// A gossip probe's direct timeout.
    Probe(u64),
}

/// Something a subsystem asks the controller to do.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Effect {
    /// Deliver the result of an operation to whoever asked.
    Answer(Origin, Result<PeerReply, ErrorCode>),
    /// Send a one-way message to a controller (possibly this one).
    Peer(NodeId, PeerMsg),
    /// Call `handle_timeout` for `Timer` at this instant.
    Timer(Instant, Timer),
    /// Release a reference held by this node.
    Release(CapRef),
    /// Copy engine: ask the destination owner `node` to open a sink for
    /// `source` (a `CopyOpen` request whose reply goes back to the engine).
    OpenSink {
        node: NodeId,
        dst: CapRef,
        len: u64,
        source: SourceKey,
    },
    /// Copy engine: read `len` bytes at `addr` of `proc`'s memory and
    /// complete transfer `xfer` with them. `direct`: the driver serves the
    /// process's memory itself (see `Controller::set_direct_memory`);
    /// otherwise the process is asked with a `MemRead` message.
    MemRead {
        proc: ProcessKey,
        xfer: u64,
        addr: u64,
        len: u32,
        direct: bool,
    },
    /// Copy engine: write `data` at `addr` of `proc`'s memory, then complete
    /// transfer `xfer`. `direct` as for [`Effect::MemRead`].
    MemWrite {
        proc: ProcessKey,
        xfer: u64,
        addr: u64,
        data: Vec<u8>,
        direct: bool,
    },
    /// Copy engine: bytes read at the source and sent on (metrics).
    BytesOut(u64),
    /// Copy engine: bytes written at the destination (metrics).
    BytesIn(u64),
    /// Copy engine: a revoke is held until its copies settle (metrics).
    RevokeHeld,
    /// Name service: a waiting lookup found its name. Acquire `cap` for
    /// `holder` (the asking node) and answer `origin` with the result.
    ServeLookup {
        cap: CapRef,
        holder: NodeId,
        origin: Origin,
    },
}

/// The effects a subsystem method pushed.
pub(crate) type Effects = Vec<Effect>;
