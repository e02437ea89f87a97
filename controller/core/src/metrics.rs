//! Counters the drivers export (rendered by [`crate::prometheus`]).

use fractos_wire::ErrorCode;

/// Operation kinds counted by [`Metrics`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
#[allow(missing_docs)]
pub enum OpKind {
    MemoryCreate,
    Diminish,
    RequestCreate,
    Derive,
    Invoke,
    Copy,
    Revoke,
    Drop,
    Monitor,
    Publish,
    Unpublish,
    Lookup,
}

impl OpKind {
    /// Every kind, in counter order.
    pub const ALL: [OpKind; 12] = [
        OpKind::MemoryCreate,
        OpKind::Diminish,
        OpKind::RequestCreate,
        OpKind::Derive,
        OpKind::Invoke,
        OpKind::Copy,
        OpKind::Revoke,
        OpKind::Drop,
        OpKind::Monitor,
        OpKind::Publish,
        OpKind::Unpublish,
        OpKind::Lookup,
    ];
    /// Lower-case name for metric labels.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::MemoryCreate => "memory_create",
            OpKind::Diminish => "diminish",
            OpKind::RequestCreate => "request_create",
            OpKind::Derive => "derive",
            OpKind::Invoke => "invoke",
            OpKind::Copy => "copy",
            OpKind::Revoke => "revoke",
            OpKind::Drop => "drop",
            OpKind::Monitor => "monitor",
            OpKind::Publish => "publish",
            OpKind::Unpublish => "unpublish",
            OpKind::Lookup => "lookup",
        }
    }
}

/// Monotonic counters.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// Operations received from local processes, by [`OpKind`] index.
    pub ops: [u64; 12],
    /// Errors returned to local processes, indexed by `ErrorCode as usize`.
    pub errors: [u64; ERROR_SLOTS],
    /// Invocations delivered to local processes.
    pub invocations_delivered: u64,
    /// Bytes written into local processes by copies.
    pub bytes_copied_in: u64,
    /// Bytes read from local processes by copies.
    pub bytes_copied_out: u64,
    /// Frames sent to peers.
    pub peer_frames_out: u64,
    /// Bytes sent to peers.
    pub peer_bytes_out: u64,
    /// Frames received from peers.
    pub peer_frames_in: u64,
    /// Bytes received from peers.
    pub peer_bytes_in: u64,
    /// Peer handshakes refused (by this side or the other).
    pub peer_handshake_failures: u64,
    /// Authenticated peer frames that failed their integrity check.
    pub peer_integrity_failures: u64,
    /// Revokes that cut running copies and waited for their in-flight
    /// bytes to settle before answering.
    pub revokes_held_for_copies: u64,
    /// References to capabilities owned here that a peer asked us to hand
    /// to a process although they were not held for us (refused).
    pub peer_refs_refused: u64,
    /// Process channels closed for misbehaviour.
    pub processes_kicked: u64,
    /// Operation latency histogram as seen by the core (arrival to answer),
    /// bucket `i` counts latencies below `2^i` microseconds (last: the rest).
    pub latency_us_buckets: [u64; LATENCY_BUCKETS],
    /// Sum of all recorded latencies in microseconds.
    pub latency_us_sum: u64,
}

/// Slots of [`Metrics::errors`]: one per `ErrorCode` value (codes start at 1).
pub const ERROR_SLOTS: usize = ErrorCode::ALL.len() + 1;

/// Number of latency histogram buckets (1 µs … 2^22 µs ≈ 4 s, then +Inf).
pub const LATENCY_BUCKETS: usize = 24;

impl Metrics {
    pub(crate) fn op(&mut self, k: OpKind) {
        self.ops[k as usize] += 1;
    }
    pub(crate) fn latency(&mut self, micros: u64) {
        let i = (64 - micros.leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
        self.latency_us_buckets[i] += 1;
        self.latency_us_sum += micros;
    }
    pub(crate) fn error(&mut self, e: ErrorCode) {
        if let Some(c) = self.errors.get_mut(e as usize) {
            *c += 1;
        }
    }
}
