//! Completion queues and work completions.

use alloc::collections::VecDeque;

/// Status of a work completion (the ibverbs `IBV_WC_*` statuses this engine
/// produces).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WcStatus {
    /// Completed successfully.
    Success,
    /// A received message did not fit the receive buffer.
    LocalLength,
    /// A local scatter/gather entry named a bad lkey, lacked rights or lay
    /// outside its region, or the backing memory refused the access.
    LocalProtection,
    /// Flushed because the QP entered the ERROR state.
    WrFlush,
    /// The responder NAK'd a remote access error (rkey, bounds, rights).
    RemoteAccess,
    /// The responder NAK'd an invalid request.
    RemoteInvalidRequest,
    /// The responder NAK'd a remote operational error.
    RemoteOperational,
    /// No acknowledgement after the retry count of timeouts.
    RetryExceeded,
    /// Still "receiver not ready" after the RNR retry count.
    RnrRetryExceeded,
}

/// What completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WcOpcode {
    /// A SEND (with or without immediate).
    Send,
    /// An RDMA WRITE (with or without immediate).
    RdmaWrite,
    /// An RDMA READ.
    RdmaRead,
    /// A received SEND.
    Recv,
    /// A receive consumed by an RDMA WRITE with immediate.
    RecvRdmaWithImm,
}

/// A work completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkCompletion {
    /// The caller's work request id.
    pub wr_id: u64,
    /// Outcome.
    pub status: WcStatus,
    /// Operation.
    pub opcode: WcOpcode,
    /// Bytes received (receives) or transferred (READ); 0 on errors.
    pub byte_len: u32,
    /// Immediate data of a SEND or WRITE with immediate.
    pub imm: Option<u32>,
    /// The local queue pair.
    pub qpn: u32,
}

/// A completion queue: a ring of fixed capacity.
#[derive(Debug)]
pub(crate) struct Cq {
    ring: VecDeque<WorkCompletion>,
    capacity: usize,
}

impl Cq {
    pub(crate) fn new(capacity: usize) -> Cq {
        Cq {
            ring: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    /// Appends; `false` (and nothing stored) if full.
    pub(crate) fn push(&mut self, wc: WorkCompletion) -> bool {
        if self.ring.len() >= self.capacity {
            return false;
        }
        self.ring.push_back(wc);
        true
    }

    pub(crate) fn pop(&mut self) -> Option<WorkCompletion> {
        self.ring.pop_front()
    }

    pub(crate) fn len(&self) -> usize {
        self.ring.len()
    }
}
