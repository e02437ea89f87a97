//! The peer handshake and frame sealing, re-implemented from the
//! specification in `fractos-core`'s `auth` module (whose functions are
//! crate-private), so the fuzz driver can play a controller that holds the
//! cluster key: a *keyed* peer whose sealed frames the real controllers
//! accept and must survive, whatever they say.
//!
//! If this copy drifted from the core, every handshake of the fake peer
//! would fail; `tests/fuzz.rs` checks that it completes.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use fractos_wire::{NodeId, PeerSecurity, FRAME_HEADER_LEN, PROTOCOL_VERSION};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// HMAC-SHA256(key, label || parts...).
fn derive(key: &[u8; 32], label: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    m.update(label);
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// One side's contribution to a handshake.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Part {
    pub node: NodeId,
    pub incarnation: u64,
    pub nonce: [u8; 32],
}

/// SHA-256 of both sides' handshake contributions.
pub(crate) fn transcript(initiator: &Part, responder: &Part, security: PeerSecurity) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"fractos-peer-handshake\0");
    h.update([PROTOCOL_VERSION, security as u8]);
    for part in [initiator, responder] {
        h.update(part.node.0.to_le_bytes());
        h.update(part.incarnation.to_le_bytes());
        h.update(part.nonce);
    }
    h.finalize().into()
}

/// The proof of the initiator (`initiator == true`) or the responder.
pub(crate) fn proof(cluster_key: &[u8; 32], initiator: bool, transcript: &[u8; 32]) -> [u8; 32] {
    let auth_key = derive(cluster_key, b"fractos-peer-auth-key\0", &[]);
    let label: &[u8] = if initiator {
        b"initiator"
    } else {
        b"responder"
    };
    derive(&auth_key, label, &[transcript])
}

/// The sealing state of one authenticated link end.
pub(crate) struct Session {
    send: ChaCha20Poly1305,
    recv: ChaCha20Poly1305,
    send_seq: u64,
    recv_seq: u64,
    security: PeerSecurity,
}

impl Session {
    pub(crate) fn new(
        cluster_key: &[u8; 32],
        initiator: bool,
        transcript: &[u8; 32],
        security: PeerSecurity,
    ) -> Self {
        let base = derive(cluster_key, b"fractos-peer-session-key\0", &[transcript]);
        let i2r = derive(&base, b"initiator->responder", &[]);
        let r2i = derive(&base, b"responder->initiator", &[]);
        let (send, recv) = if initiator { (i2r, r2i) } else { (r2i, i2r) };
        Self {
            send: ChaCha20Poly1305::new(Key::from_slice(&send)),
            recv: ChaCha20Poly1305::new(Key::from_slice(&recv)),
            send_seq: 0,
            recv_seq: 0,
            security,
        }
    }

    fn nonce(seq: u64) -> Nonce {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&seq.to_le_bytes());
        *Nonce::from_slice(&n)
    }

    /// Seals a complete frame (prefix included) in place.
    pub(crate) fn seal(&mut self, frame: &mut Vec<u8>) {
        let nonce = Self::nonce(self.send_seq);
        self.send_seq += 1;
        let body = &mut frame[FRAME_HEADER_LEN..];
        let tag = match self.security {
            PeerSecurity::Authenticated => {
                self.send.encrypt_in_place_detached(&nonce, body, &mut [])
            }
            PeerSecurity::Secure => self.send.encrypt_in_place_detached(&nonce, &[], body),
        }
        .expect("small frames");
        frame.extend_from_slice(&tag);
        let len = (frame.len() - FRAME_HEADER_LEN) as u32;
        frame[..FRAME_HEADER_LEN].copy_from_slice(&len.to_le_bytes());
    }

    /// Opens a sealed body; `None` if it fails its integrity check.
    pub(crate) fn open(&mut self, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < 16 {
            return None;
        }
        let (body, tag) = sealed.split_at(sealed.len() - 16);
        let nonce = Self::nonce(self.recv_seq);
        let tag = Tag::from_slice(tag);
        let mut plain = body.to_vec();
        match self.security {
            PeerSecurity::Authenticated => self
                .recv
                .decrypt_in_place_detached(&nonce, body, &mut [], tag)
                .ok()?,
            PeerSecurity::Secure => self
                .recv
                .decrypt_in_place_detached(&nonce, &[], &mut plain, tag)
                .ok()?,
        }
        self.recv_seq += 1;
        Some(plain)
    }
}
