//! The SDK's one error type.

use std::fmt;
use std::io;
use std::time::Duration;

use fractos_wire::{ErrorCode, ObjectKind};

/// Everything that can go wrong in the SDK.
///
/// * [`SdkError::Remote`]: the controller answered the operation with a
///   typed [`ErrorCode`] (bad handle, missing right, revoked, ...). The
///   connection is fine; fix the call or the capability.
/// * [`SdkError::Timeout`]: no answer within the wait's timeout. For an
///   operation the outcome is unknown (it may still happen at the owner);
///   a capability it returns later is dropped automatically.
/// * [`SdkError::Disconnected`]: the channel to the controller is gone;
///   every handle of this process is void. Attach again.
/// * [`SdkError::Rejected`]: the controller refused the attach.
/// * [`SdkError::Io`], [`SdkError::Protocol`]: transport failures.
/// * [`SdkError::OutOfRange`], [`SdkError::InvalidArgument`],
///   [`SdkError::UnexpectedCap`]: caught locally before anything was sent.
///
/// [`SdkError::code`] gives the remote code when there is one, so tests and
/// applications can match on `Some(ErrorCode::BadHandle)` and the like.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SdkError {
    /// The controller answered the operation with a typed error.
    #[error("the controller refused the operation: {0}")]
    Remote(ErrorCode),
    /// A transport error while connecting or talking to the controller.
    #[error("I/O error while {context}: {source}; check that the controller runs and listens at the address given to attach")]
    Io {
        /// What the SDK was doing.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A wait ran out of time.
    #[error("timed out after {after:?} waiting for {what}; the outcome is unknown: raise the timeout (AttachOptions::op_timeout or Process::with_timeout) or check that the other side serves its requests")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// The timeout that expired.
        after: Duration,
    },
    /// The channel to the controller is closed; every handle is void.
    #[error("disconnected from the controller ({reason}); every capability handle of this process is void: attach again")]
    Disconnected {
        /// Why the channel closed.
        reason: DisconnectReason,
    },
    /// The controller refused the attach.
    #[error("the controller rejected the attach: {code}{}", version_hint(*code, *controller_version))]
    Rejected {
        /// Why.
        code: ErrorCode,
        /// Protocol version the controller speaks.
        controller_version: u8,
    },
    /// The controller sent something this SDK does not understand.
    #[error("protocol violation by the controller: {detail}; the SDK and controller versions probably differ")]
    Protocol {
        /// What was wrong.
        detail: String,
    },
    /// A local access outside a registered region.
    #[error(
        "access of {len} bytes at offset {offset} is outside the region of {region_len} bytes"
    )]
    OutOfRange {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Length of the region.
        region_len: u64,
    },
    /// An argument was rejected before anything was sent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Registered memory could not be created or shared (memfd, mapping,
    /// eventfd, descriptor passing).
    #[error("shared memory: {0}")]
    SharedMemory(#[from] fractos_shm::ShmError),
    /// The controller refused what the process asked over its local
    /// channel's socket (a region registration, the rings).
    #[error("the controller refused the local channel's {what}: {reason}")]
    LocalRefused {
        /// What was refused.
        what: &'static str,
        /// The controller's reason.
        reason: String,
    },
    /// Attaching through an appliance's shared-memory slot failed (not a
    /// slot, in use, refused, stale nonce).
    #[error("shared-memory slot {path}: {source}")]
    Slot {
        /// The slot file.
        path: String,
        /// Why.
        #[source]
        source: fractos_transport::slot::SlotError,
    },
    /// An invocation's capability is not of the expected kind.
    #[error("capability #{index} of the invocation is {found}, expected {expected}")]
    UnexpectedCap {
        /// Position in the invocation's capability list.
        index: usize,
        /// What the handler expected.
        expected: CapKindName,
        /// What was found (`None`: fewer capabilities than that).
        found: CapKindName,
    },
}

fn version_hint(code: ErrorCode, version: u8) -> String {
    match code {
        ErrorCode::VersionMismatch => format!(
            " (controller speaks protocol {version}, this SDK {})",
            fractos_wire::PROTOCOL_VERSION
        ),
        ErrorCode::AuthFailed => {
            "; derive the token from the cluster key and this exact process name".into()
        }
        _ => String::new(),
    }
}

impl SdkError {
    /// The remote error code, for [`SdkError::Remote`] and
    /// [`SdkError::Rejected`].
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            SdkError::Remote(c) | SdkError::Rejected { code: c, .. } => Some(*c),
            _ => None,
        }
    }

    /// Whether this is a [`SdkError::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, SdkError::Timeout { .. })
    }

    /// Whether this is a [`SdkError::Disconnected`].
    pub fn is_disconnected(&self) -> bool {
        matches!(self, SdkError::Disconnected { .. })
    }

    pub(crate) fn io(context: &'static str, source: io::Error) -> Self {
        SdkError::Io { context, source }
    }

    pub(crate) fn protocol(detail: impl Into<String>) -> Self {
        SdkError::Protocol {
            detail: detail.into(),
        }
    }

    pub(crate) fn invalid(detail: impl Into<String>) -> Self {
        SdkError::InvalidArgument(detail.into())
    }
}

impl From<ErrorCode> for SdkError {
    fn from(code: ErrorCode) -> Self {
        SdkError::Remote(code)
    }
}

/// A capability kind (or its absence) in [`SdkError::UnexpectedCap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapKindName(pub Option<ObjectKind>);

impl fmt::Display for CapKindName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(ObjectKind::Memory) => f.write_str("a Memory capability"),
            Some(ObjectKind::Request) => f.write_str("a Request capability"),
            None => f.write_str("missing"),
        }
    }
}

/// Why a channel to the controller closed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// This process closed it ([`crate::Process::close`] or last handle
    /// dropped).
    Closed,
    /// The controller closed the connection.
    ControllerClosed,
    /// The controller sent `Rejected` and closed the channel (for instance
    /// after a malformed message).
    Kicked(ErrorCode),
    /// A socket error.
    Io(String),
    /// The controller sent bytes this SDK cannot decode.
    Protocol(String),
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DisconnectReason::Closed => f.write_str("closed by this process"),
            DisconnectReason::ControllerClosed => f.write_str("the controller closed the channel"),
            DisconnectReason::Kicked(code) => {
                write!(f, "the controller kicked this process: {code}")
            }
            DisconnectReason::Io(e) => write!(f, "socket error: {e}"),
            DisconnectReason::Protocol(e) => {
                write!(f, "undecodable message from the controller: {e}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_predicates() {
        let e = SdkError::from(ErrorCode::BadHandle);
        assert_eq!(e.code(), Some(ErrorCode::BadHandle));
        assert!(e.to_string().contains("bad handle"));
        let t = SdkError::Timeout {
            what: "x",
            after: Duration::from_millis(5),
        };
        assert!(t.is_timeout() && t.code().is_none());
        let r = SdkError::Rejected {
            code: ErrorCode::AuthFailed,
            controller_version: 1,
        };
        assert_eq!(r.code(), Some(ErrorCode::AuthFailed));
        assert!(r.to_string().contains("token"));
        let v = SdkError::Rejected {
            code: ErrorCode::VersionMismatch,
            controller_version: 9,
        };
        assert!(v.to_string().contains("protocol 9"));
        let d = SdkError::Disconnected {
            reason: DisconnectReason::Kicked(ErrorCode::Malformed),
        };
        assert!(d.is_disconnected() && d.to_string().contains("attach again"));
        let u = SdkError::UnexpectedCap {
            index: 1,
            expected: CapKindName(Some(ObjectKind::Memory)),
            found: CapKindName(None),
        };
        assert_eq!(
            u.to_string(),
            "capability #1 of the invocation is missing, expected a Memory capability"
        );
    }
}
