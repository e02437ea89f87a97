//! Authentication: process tokens, the peer handshake and the sealing of
//! peer frames. Public so that tools and test peers (the fuzz driver's
//! keyed peer) speak the protocol with the controller's own code.
//!
//! Process tokens are HMAC-SHA256 of the process name under the cluster key.
//!
//! Peer handshake (initiator I dials responder R; all in clear):
//!
//! ```text
//! I -> R  Hello      { I, inc_I, nonce_I, expected R, security_I }
//! R -> I  HelloReply { R, inc_R, nonce_R, security, proof_R }
//! I -> R  Finish     { proof_I }
//!
//! T        = SHA-256("fractos-peer-handshake" || version || security
//!                    || I || inc_I || nonce_I || R || inc_R || nonce_R)
//! K_auth   = HMAC(cluster key, "fractos-peer-auth-key")
//! proof_R  = HMAC(K_auth, "responder" || T)
//! proof_I  = HMAC(K_auth, "initiator" || T)
//! K_sess   = HMAC(cluster key, "fractos-peer-session-key" || T)
//! K_I->R   = HMAC(K_sess, "initiator->responder"), K_R->I likewise
//! ```
//!
//! I sends its proof only after verifying R's. R's proof is sent to an
//! unauthenticated initiator, but it binds R's fresh nonce, the
//! initiator's claimed identity and nonce, and the responder role: it is
//! accepted only as a `HelloReply` to the one initiator that chose that
//! nonce, so relaying it yields at most a relayed link between the two real
//! controllers, whose frames the relay can neither read (in `Secure` mode)
//! nor forge (session keys never leave the controllers). It cannot be
//! reflected (roles differ) or replayed (every handshake has two fresh
//! nonces). After `Finish`, every frame is sealed (see [`Session`]).

use alloc::vec::Vec;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use fractos_wire::{NodeId, PeerSecurity, FRAME_HEADER_LEN};

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &[u8; 32], parts: &[&[u8]]) -> HmacSha256 {
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    for p in parts {
        m.update(p);
    }
    m
}

/// The token a process named `name` presents at attach: HMAC-SHA256 of the
/// name under the cluster key. Operators mint tokens with this function
/// (`fractos token NAME`), so a process can attach only under its own name.
pub fn process_token(cluster_key: &[u8; 32], name: &[u8]) -> [u8; 32] {
    mac(cluster_key, &[b"fractos-process-token\0", name])
        .finalize()
        .into_bytes()
        .into()
}

/// Constant-time check of a process token.
pub(crate) fn verify_process_token(cluster_key: &[u8; 32], name: &[u8], token: &[u8; 32]) -> bool {
    mac(cluster_key, &[b"fractos-process-token\0", name])
        .verify_slice(token)
        .is_ok()
}

/// Which side of a link's handshake a controller plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The side that dialled.
    Initiator,
    /// The side that accepted.
    Responder,
}

/// One side's contribution to a handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HelloPart {
    /// Its node id.
    pub node: NodeId,
    /// Its incarnation.
    pub incarnation: u64,
    /// Its fresh nonce.
    pub nonce: [u8; 32],
}

/// SHA-256 of everything both sides said in the handshake: both node ids,
/// both incarnations, both nonces, the security in force and the protocol
/// version. Proofs and session keys are derived from it, so a proof or key
/// made for one handshake is useless in any other.
pub fn transcript(
    initiator: &HelloPart,
    responder: &HelloPart,
    security: PeerSecurity,
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"fractos-peer-handshake\0");
    h.update([fractos_wire::PROTOCOL_VERSION, security as u8]);
    for part in [initiator, responder] {
        h.update(part.node.0.to_le_bytes());
        h.update(part.incarnation.to_le_bytes());
        h.update(part.nonce);
    }
    h.finalize().into()
}

/// The proof a side sends in `role` over a handshake `transcript`, under a
/// key derived from the cluster key for this purpose only.
pub fn handshake_proof(cluster_key: &[u8; 32], role: Role, transcript: &[u8; 32]) -> [u8; 32] {
    let auth_key = derive(cluster_key, b"fractos-peer-auth-key\0", &[]);
    let label: &[u8] = match role {
        Role::Initiator => b"initiator",
        Role::Responder => b"responder",
    };
    derive(&auth_key, label, &[transcript])
}

/// Constant-time check of a handshake proof.
pub fn verify_handshake_proof(
    cluster_key: &[u8; 32],
    role: Role,
    transcript: &[u8; 32],
    proof: &[u8; 32],
) -> bool {
    let expected = handshake_proof(cluster_key, role, transcript);
    // Constant time: fold every byte difference.
    expected
        .iter()
        .zip(proof)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// HMAC-SHA256(key, label || parts...).
fn derive(key: &[u8; 32], label: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = mac(key, &[label]);
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// Fresh 32-byte nonces for handshakes: HMAC-SHA256 in counter mode under a
/// key derived from the cluster key and a seed from the host's
/// cryptographic RNG (`getrandom` in the hosted controller, RDSEED/RDRAND in
/// the appliance). Nonces are unpredictable to anyone who lacks the cluster
/// key *or* the seed, and never repeat within one controller's life.
pub(crate) struct NonceSource {
    key: [u8; 32],
    counter: u64,
}

impl NonceSource {
    pub(crate) fn new(
        cluster_key: &[u8; 32],
        seed: &[u8; 32],
        node: NodeId,
        incarnation: u64,
    ) -> Self {
        let key = derive(
            cluster_key,
            b"fractos-nonce-key\0",
            &[seed, &node.0.to_le_bytes(), &incarnation.to_le_bytes()],
        );
        Self { key, counter: 0 }
    }

    pub(crate) fn next(&mut self) -> [u8; 32] {
        self.counter += 1;
        derive(&self.key, b"nonce", &[&self.counter.to_le_bytes()])
    }
}

/// Bytes a sealed frame adds: the Poly1305 tag.
pub const SEAL_OVERHEAD: usize = 16;

/// A frame failed its integrity check (rewritten, injected, replayed,
/// reordered or dropped on the way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IntegrityError;

/// The keys and sequence numbers of an authenticated link. Each direction
/// has its own ChaCha20-Poly1305 key derived from the cluster key and the
/// handshake transcript; the 96-bit AEAD nonce is the frame's sequence
/// number in its direction, so a frame is accepted only at its position in
/// the stream.
pub struct Session {
    send: ChaCha20Poly1305,
    recv: ChaCha20Poly1305,
    send_seq: u64,
    recv_seq: u64,
    security: PeerSecurity,
}

impl Session {
    /// The session of `role`'s end of a link whose handshake had
    /// `transcript`.
    pub fn new(
        cluster_key: &[u8; 32],
        role: Role,
        transcript: &[u8; 32],
        security: PeerSecurity,
    ) -> Self {
        let base = derive(cluster_key, b"fractos-peer-session-key\0", &[transcript]);
        let i2r = derive(&base, b"initiator->responder", &[]);
        let r2i = derive(&base, b"responder->initiator", &[]);
        let (send, recv) = match role {
            Role::Initiator => (i2r, r2i),
            Role::Responder => (r2i, i2r),
        };
        Self {
            send: ChaCha20Poly1305::new(Key::from_slice(&send)),
            recv: ChaCha20Poly1305::new(Key::from_slice(&recv)),
            send_seq: 0,
            recv_seq: 0,
            security,
        }
    }

    /// The security in force.
    pub fn security(&self) -> PeerSecurity {
        self.security
    }

    fn nonce(seq: u64) -> Nonce {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&seq.to_le_bytes());
        *Nonce::from_slice(&n)
    }

    /// Seals a complete frame (length prefix included) in place: encrypts
    /// the body in `Secure` mode, appends the tag and fixes the prefix.
    pub fn seal(&mut self, frame: &mut Vec<u8>) {
        let nonce = Self::nonce(self.send_seq);
        self.send_seq += 1;
        let body = &mut frame[FRAME_HEADER_LEN..];
        let tag = match self.security {
            PeerSecurity::Authenticated => {
                self.send.encrypt_in_place_detached(&nonce, body, &mut [])
            }
            PeerSecurity::Secure => self.send.encrypt_in_place_detached(&nonce, &[], body),
        }
        .expect("frames are far below ChaCha20-Poly1305's 256 GiB limit");
        frame.extend_from_slice(&tag);
        let len = (frame.len() - FRAME_HEADER_LEN) as u32;
        frame[..FRAME_HEADER_LEN].copy_from_slice(&len.to_le_bytes());
    }

    /// Checks (and in `Secure` mode decrypts) a sealed frame body; returns
    /// the plaintext body. `scratch` holds the plaintext when decrypting.
    pub fn open<'a>(
        &mut self,
        sealed: &'a [u8],
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], IntegrityError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(IntegrityError);
        }
        let (body, tag) = sealed.split_at(sealed.len() - SEAL_OVERHEAD);
        let nonce = Self::nonce(self.recv_seq);
        let tag = Tag::from_slice(tag);
        let plain: &'a [u8] = match self.security {
            PeerSecurity::Authenticated => {
                self.recv
                    .decrypt_in_place_detached(&nonce, body, &mut [], tag)
                    .map_err(|_| IntegrityError)?;
                body
            }
            PeerSecurity::Secure => {
                scratch.clear();
                scratch.extend_from_slice(body);
                self.recv
                    .decrypt_in_place_detached(&nonce, &[], scratch, tag)
                    .map_err(|_| IntegrityError)?;
                scratch
            }
        };
        self.recv_seq += 1;
        Ok(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_bind_name_and_key() {
        let k = [7u8; 32];
        let t = process_token(&k, b"storage");
        assert!(verify_process_token(&k, b"storage", &t));
        assert!(!verify_process_token(&k, b"compute", &t));
        assert!(!verify_process_token(&[8u8; 32], b"storage", &t));
    }

    fn parts() -> (HelloPart, HelloPart) {
        (
            HelloPart {
                node: NodeId(1),
                incarnation: 10,
                nonce: [1; 32],
            },
            HelloPart {
                node: NodeId(2),
                incarnation: 20,
                nonce: [2; 32],
            },
        )
    }

    #[test]
    fn proofs_bind_role_transcript_and_key() {
        let k = [1u8; 32];
        let (i, r) = parts();
        let t = transcript(&i, &r, PeerSecurity::Authenticated);
        let p = handshake_proof(&k, Role::Responder, &t);
        assert!(verify_handshake_proof(&k, Role::Responder, &t, &p));
        // Not usable in the other role (no reflection).
        assert!(!verify_handshake_proof(&k, Role::Initiator, &t, &p));
        // Not under another key.
        assert!(!verify_handshake_proof(&[2; 32], Role::Responder, &t, &p));
        // Every field of the transcript matters.
        let mut variants = alloc::vec::Vec::new();
        for f in 0..6 {
            let (mut i2, mut r2) = (i, r);
            match f {
                0 => i2.node = NodeId(3),
                1 => i2.incarnation += 1,
                2 => i2.nonce[31] ^= 1,
                3 => r2.node = NodeId(3),
                4 => r2.incarnation += 1,
                _ => r2.nonce[0] ^= 1,
            }
            variants.push(transcript(&i2, &r2, PeerSecurity::Authenticated));
        }
        variants.push(transcript(&i, &r, PeerSecurity::Secure));
        // Swapped roles give another transcript.
        variants.push(transcript(&r, &i, PeerSecurity::Authenticated));
        for t2 in variants {
            assert_ne!(t2, t);
            assert!(!verify_handshake_proof(&k, Role::Responder, &t2, &p));
        }
    }

    #[test]
    fn nonces_differ_and_depend_on_key_and_seed() {
        let mut a = NonceSource::new(&[1; 32], &[9; 32], NodeId(1), 5);
        let mut b = NonceSource::new(&[2; 32], &[9; 32], NodeId(1), 5);
        let mut c = NonceSource::new(&[1; 32], &[8; 32], NodeId(1), 5);
        let (a1, a2) = (a.next(), a.next());
        assert_ne!(a1, a2);
        assert_ne!(a1, b.next());
        assert_ne!(a1, c.next());
    }

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    fn session_pair(security: PeerSecurity) -> (Session, Session) {
        let k = [4u8; 32];
        let (i, r) = parts();
        let t = transcript(&i, &r, security);
        (
            Session::new(&k, Role::Initiator, &t, security),
            Session::new(&k, Role::Responder, &t, security),
        )
    }

    #[test]
    fn sealed_frames_open_in_order_only() {
        for security in [PeerSecurity::Authenticated, PeerSecurity::Secure] {
            let (mut i, mut r) = session_pair(security);
            let mut scratch = Vec::new();
            let mut f1 = frame(b"first frame");
            let mut f2 = frame(b"second frame");
            i.seal(&mut f1);
            i.seal(&mut f2);
            let len = u32::from_le_bytes(f1[..4].try_into().unwrap()) as usize;
            assert_eq!(len, f1.len() - 4);
            assert_eq!(len, b"first frame".len() + SEAL_OVERHEAD);
            let visible = f1[4..].windows(5).any(|w| w == b"first");
            assert_eq!(visible, security == PeerSecurity::Authenticated);
            // Out of order: refused (replay/reorder/drop protection).
            assert_eq!(r.open(&f2[4..], &mut scratch), Err(IntegrityError));
            assert_eq!(r.open(&f1[4..], &mut scratch).unwrap(), b"first frame");
            // Replayed: refused.
            assert_eq!(r.open(&f1[4..], &mut scratch), Err(IntegrityError));
            assert_eq!(r.open(&f2[4..], &mut scratch).unwrap(), b"second frame");
            // A frame sealed in one direction does not open in the other.
            let mut back = frame(b"reply");
            i.seal(&mut back);
            assert_eq!(i.open(&back[4..], &mut scratch), Err(IntegrityError));
        }
    }

    #[test]
    fn any_flipped_bit_is_detected() {
        for security in [PeerSecurity::Authenticated, PeerSecurity::Secure] {
            let mut f = frame(b"copy chunk bytes");
            let (mut i, _) = session_pair(security);
            i.seal(&mut f);
            for bit in 0..(f.len() - 4) * 8 {
                let (_, mut r) = session_pair(security);
                let mut g = f.clone();
                g[4 + bit / 8] ^= 1 << (bit % 8);
                assert_eq!(r.open(&g[4..], &mut Vec::new()), Err(IntegrityError));
            }
            let (_, mut r) = session_pair(security);
            assert_eq!(r.open(&f[4..10], &mut Vec::new()), Err(IntegrityError));
            assert_eq!(r.open(&[], &mut Vec::new()), Err(IntegrityError));
        }
    }
}
