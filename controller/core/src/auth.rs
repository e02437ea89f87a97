//! Authentication: process tokens and peer challenge-response, both HMAC-SHA256
//! under the cluster key.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use fractos_wire::NodeId;

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

/// The proof that `node`/`incarnation` knows the cluster key, over `nonce`
/// chosen by the verifier.
pub(crate) fn peer_proof(
    key: &[u8; 32],
    node: NodeId,
    incarnation: u64,
    nonce: &[u8; 16],
) -> [u8; 32] {
    mac(
        key,
        &[
            b"fractos-peer\0",
            &node.0.to_le_bytes(),
            &incarnation.to_le_bytes(),
            nonce,
        ],
    )
    .finalize()
    .into_bytes()
    .into()
}

/// Constant-time check of a peer proof.
pub(crate) fn verify_peer_proof(
    key: &[u8; 32],
    node: NodeId,
    incarnation: u64,
    nonce: &[u8; 16],
    proof: &[u8; 32],
) -> bool {
    mac(
        key,
        &[
            b"fractos-peer\0",
            &node.0.to_le_bytes(),
            &incarnation.to_le_bytes(),
            nonce,
        ],
    )
    .verify_slice(proof)
    .is_ok()
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

    #[test]
    fn peer_proof_binds_nonce() {
        let k = [1u8; 32];
        let p = peer_proof(&k, NodeId(3), 9, &[5; 16]);
        assert!(verify_peer_proof(&k, NodeId(3), 9, &[5; 16], &p));
        assert!(!verify_peer_proof(&k, NodeId(3), 9, &[6; 16], &p));
        assert!(!verify_peer_proof(&[2; 32], NodeId(3), 9, &[5; 16], &p));
    }
}
