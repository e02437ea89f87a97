//! A RoCEv2 reliable-connection engine, sans-IO.
//!
//! RoCEv2 is the InfiniBand transport (BTH and its extension headers, the
//! invariant CRC) carried in UDP to port 4791 over IPv4 or IPv6. This
//! crate is the transport of an RDMA NIC for the reliable-connection
//! service over IPv4, written as a state machine in the style of
//! `quinn-proto` and `smoltcp`: frames and `now` go in, frames and work
//! completions come out, and region bytes are reached through the
//! caller's [`Memory`]. It reads no clock, does no I/O and allocates only
//! when objects (queue pairs, regions, completion queues) are created.
//!
//! # Layers
//!
//! - [`wire`]: Ethernet II, ARP, IPv4, UDP, BTH/RETH/AETH/ImmDt, checked
//!   parsing into [`wire::Frame`] with a [`DropReason`] for every refusal,
//!   emission in place;
//! - [`icrc`]: CRC-32 and the RoCEv2 ICRC over the masked pseudo-packet;
//! - [`psn`]: 24-bit sequence arithmetic;
//! - [`Memory`], [`Access`], [`MrKeys`]: regions, keys, bounds and
//!   invalidation;
//! - queue pairs (requester and responder halves) and completion queues,
//!   driven through [`Engine`].
//!
//! # Driving it
//!
//! ```text
//! loop {
//!     for frame in nic.rx() { engine.receive(now, frame, &mut mem) }
//!     if engine.poll_timeout() <= now { engine.handle_timeout(now, &mut mem) }
//!     while let Some(n) = engine.poll_transmit(now, &mut buf, &mut mem) { nic.tx(&buf[..n]) }
//!     while let Some(wc) = engine.poll_cq(cq) { ... }
//! }
//! ```
//!
//! See the crate README for what is implemented and what is not.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

mod counters;
mod cq;
mod engine;
pub mod icrc;
mod mr;
pub mod psn;
mod qp;
#[cfg(feature = "testing")]
pub mod testing;
pub mod wire;

pub use counters::{Counters, DropReason, NakKind};
pub use cq::{WcOpcode, WcStatus, WorkCompletion};
pub use engine::{Config, Engine, FIRST_QPN};
pub use mr::{Access, AccessError, Memory, MemoryFault, MrKeys};
pub use qp::requester::{ACK_REQ_EVERY, SEND_WINDOW};
pub use qp::{
    local_ack_timeout, CqId, InitAttr, Mtu, QpCaps, QpState, RecvWr, RemoteAddr, RtrAttr, RtsAttr,
    SendOp, SendWr, Sge, MAX_PACKETS_PER_MESSAGE, MAX_RD_ATOMIC,
};

/// A point in time in nanoseconds since an epoch chosen by the caller.
/// Only differences matter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(pub u64);

impl Instant {
    /// `self + d`, saturating.
    #[must_use]
    pub fn after(self, d: core::time::Duration) -> Instant {
        Instant(
            self.0
                .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        )
    }
}

/// Errors of the verbs (setup and posting); the data path reports through
/// completions and counters instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerbsError {
    /// No queue pair has this number.
    #[error("no queue pair {0:#x}")]
    UnknownQp(u32),
    /// No completion queue has this id.
    #[error("no such completion queue")]
    UnknownCq,
    /// A table is full; raise the named [`Config`] limit.
    #[error("table full: raise Config::{0}")]
    TableFull(&'static str),
    /// The QP is not in the state the transition starts from.
    #[error("QP {qpn:#x} cannot go from {from:?} to {to:?}")]
    InvalidTransition {
        /// The QP.
        qpn: u32,
        /// Its state.
        from: QpState,
        /// The requested state.
        to: QpState,
    },
    /// An attribute is out of range (the message names it and the range).
    #[error("invalid attribute {0}")]
    InvalidAttribute(&'static str),
    /// The work queue is full: poll completions first.
    #[error("work queue full: poll the completion queue first")]
    QueueFull,
    /// The QP's state does not accept this work request.
    #[error("the QP is in state {0:?}")]
    InvalidState(QpState),
    /// The message exceeds 2^31 bytes or [`MAX_PACKETS_PER_MESSAGE`].
    #[error("message too long")]
    MessageTooLong,
}
