//! The crate's one error type.

use fractos_wire::{DecodeError, ErrorCode, MAX_PROCESS_NAME_LEN};

/// Everything the process side of the protocol can report.
///
/// Errors are either **fatal** ([`Error::is_fatal`]): the input proved the
/// controller and this process no longer agree, the [`crate::Connection`]
/// is closed, every pending operation is aborted and the host should close
/// the transport; or **local**: the call was refused (or a frame was not
/// consumed) and the connection carries on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The controller refused the attach (fatal).
    #[error("the controller rejected the attach: {code} (it speaks protocol {version}, this process {ours}); check the token, the process name and the versions", ours = fractos_wire::PROTOCOL_VERSION)]
    Rejected {
        /// Why.
        code: ErrorCode,
        /// Protocol version the controller speaks.
        version: u8,
    },
    /// No answer to the attach before the deadline (fatal).
    #[error("the controller did not answer the attach in time; check that it runs and that this transport reaches it")]
    AttachTimeout,
    /// The controller closed the channel with a `Rejected` after the
    /// attach, for instance after a malformed message from this process
    /// (fatal).
    #[error("the controller closed the channel: {0}; attach again")]
    Kicked(ErrorCode),
    /// A frame from the controller is too long, truncated or does not
    /// decode (fatal: a byte stream cannot be resynchronised).
    #[error("malformed frame from the controller: {0}; the controller and this process probably speak different protocol versions")]
    Malformed(DecodeError),
    /// A well-formed message that is not allowed in the current phase, for
    /// instance a `Completion` before `Attached` or a second `Attached`
    /// (fatal).
    #[error("unexpected {got} from the controller while {phase}; the controller violates the process protocol")]
    Unexpected {
        /// The message kind received.
        got: &'static str,
        /// What the connection was doing.
        phase: &'static str,
    },
    /// A completion for an operation id this process never started or that
    /// was already answered. Not fatal: the completion is discarded and the
    /// connection carries on (the host may log it).
    #[error("completion for unknown operation {op}: the controller answered an operation twice or one never started; it was ignored")]
    UnknownOp {
        /// The operation id in the completion.
        op: u64,
    },
    /// An invocation arrived while the invocation queue holds `capacity`
    /// undrained invocations. Not fatal and nothing was consumed: take
    /// invocations with [`crate::Connection::poll_invocation`], then hand
    /// the same frame in again (and stop reading the transport meanwhile:
    /// that is the backpressure).
    #[error("invocation queue full ({capacity} undrained invocations): poll invocations, then hand this frame in again")]
    InvocationQueueFull {
        /// The queue's bound ([`crate::Config::invocation_capacity`]).
        capacity: usize,
    },
    /// An operation was started before the controller accepted the attach.
    #[error("not attached yet: wait for Event::Attached before starting operations")]
    NotAttached,
    /// The connection is closed; nothing can be sent any more.
    #[error("the connection to the controller is closed; attach again on a new transport")]
    Closed,
    /// [`crate::Connection::start`] was given a message that is not an
    /// operation (`Attach`, `MemReadReply`, `MemWriteReply`), or whose
    /// `op` field differs from the id it was handed.
    #[error("{0} is not an operation with the id it was given: build the message from the op id passed to the closure")]
    NotAnOperation(&'static str),
    /// The process name is longer than the protocol allows.
    #[error("process name of {len} bytes, at most {max} allowed", max = MAX_PROCESS_NAME_LEN)]
    NameTooLong {
        /// Length given.
        len: usize,
    },
}

impl Error {
    /// Whether this error closed the connection.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Error::Rejected { .. }
                | Error::AttachTimeout
                | Error::Kicked(_)
                | Error::Malformed(_)
                | Error::Unexpected { .. }
        )
    }
}

impl From<DecodeError> for Error {
    fn from(e: DecodeError) -> Self {
        Error::Malformed(e)
    }
}
