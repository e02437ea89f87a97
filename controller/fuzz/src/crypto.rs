//! The fake keyed peer's handshake and frame sealing: the controller's own
//! ([`fractos_core::auth`]), with the small adapters the driver uses.

use fractos_core::auth::{self, Role};
use fractos_wire::PeerSecurity;

pub(crate) use fractos_core::auth::{transcript, HelloPart as Part};

/// The proof of the initiator (`true`) or the responder over `transcript`.
pub(crate) fn proof(cluster_key: &[u8; 32], initiator: bool, transcript: &[u8; 32]) -> [u8; 32] {
    let role = if initiator {
        Role::Initiator
    } else {
        Role::Responder
    };
    auth::handshake_proof(cluster_key, role, transcript)
}

/// The sealing state of one authenticated link end.
pub(crate) struct Session {
    inner: auth::Session,
    scratch: Vec<u8>,
}

impl Session {
    pub(crate) fn new(
        cluster_key: &[u8; 32],
        initiator: bool,
        transcript: &[u8; 32],
        security: PeerSecurity,
    ) -> Self {
        let role = if initiator {
            Role::Initiator
        } else {
            Role::Responder
        };
        Session {
            inner: auth::Session::new(cluster_key, role, transcript, security),
            scratch: Vec::new(),
        }
    }

    /// Seals a complete frame (length prefix included) in place.
    pub(crate) fn seal(&mut self, frame: &mut Vec<u8>) {
        self.inner.seal(frame);
    }

    /// The plaintext of a sealed body, or `None` if it fails its tag.
    pub(crate) fn open(&mut self, sealed: &[u8]) -> Option<Vec<u8>> {
        self.inner
            .open(sealed, &mut self.scratch)
            .ok()
            .map(<[u8]>::to_vec)
    }
}
