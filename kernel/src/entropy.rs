//! The boot entropy pool: every input is hashed together with SHA-256.
//!
//! The kernel binary (`hw/entropy.rs`) feeds it the CPU's random number
//! generator (RDSEED, else RDRAND) when there is one, and always the weak
//! inputs too (TSC jitter, the RTC time, boot-info addresses, the fw_cfg
//! file `opt/fractos/entropy` if the VMM offers one): hashing them in can
//! only add entropy. The seed is then derived per purpose with
//! [`derive()`], so values sent on the wire (the incarnation) reveal nothing
//! about the nonce generator's seed.

use sha2::{Digest, Sha256};

/// fw_cfg file whose contents are mixed into the pool if present (QEMU:
/// `-fw_cfg name=opt/fractos/entropy,file=<path>`); at most
/// [`ENTROPY_FILE_MAX`] bytes are read.
pub const ENTROPY_FW_CFG_NAME: &str = "opt/fractos/entropy";
/// Most bytes read from [`ENTROPY_FW_CFG_NAME`].
pub const ENTROPY_FILE_MAX: usize = 64;

/// Where the seed's entropy came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntropySource {
    /// The CPU's RDSEED (conditioned entropy source).
    Rdseed,
    /// The CPU's RDRAND (DRBG reseeded from the entropy source).
    Rdrand,
    /// No usable CPU generator: TSC jitter and boot data only.
    TscJitter,
}

impl EntropySource {
    /// Whether the seed may be guessable (no hardware generator).
    pub fn is_weak(self) -> bool {
        self == EntropySource::TscJitter
    }
}

impl core::fmt::Display for EntropySource {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            EntropySource::Rdseed => "rdseed",
            EntropySource::Rdrand => "rdrand",
            EntropySource::TscJitter => "tsc-jitter (weak: no RDRAND/RDSEED on this CPU)",
        })
    }
}

/// An accumulating pool: inputs are labelled and length-prefixed so two
/// different input sequences never hash the same.
#[derive(Debug, Clone)]
pub struct Pool {
    hash: Sha256,
}

impl Default for Pool {
    fn default() -> Self {
        Self::new()
    }
}

impl Pool {
    /// An empty pool.
    pub fn new() -> Self {
        let mut hash = Sha256::new();
        hash.update(b"fractos-boot-entropy-v1\0");
        Pool { hash }
    }

    /// Mixes in `data`, labelled `label`.
    pub fn add(&mut self, label: &str, data: &[u8]) {
        self.hash.update((label.len() as u64).to_le_bytes());
        self.hash.update(label.as_bytes());
        self.hash.update((data.len() as u64).to_le_bytes());
        self.hash.update(data);
    }

    /// Mixes in a `u64`.
    pub fn add_u64(&mut self, label: &str, v: u64) {
        self.add(label, &v.to_le_bytes());
    }

    /// The 32-byte seed.
    pub fn finish(self) -> [u8; 32] {
        self.hash.finalize().into()
    }
}

/// A value for `purpose` derived from `seed` (SHA-256 of both): knowing
/// one derived value tells nothing about the seed or other derivations.
pub fn derive(seed: &[u8; 32], purpose: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"fractos-derive-v1\0");
    h.update(purpose.as_bytes());
    h.update([0]);
    h.update(seed);
    h.finalize().into()
}

/// Whether hardware generator output looks broken: every word equal (some
/// faulty CPUs return all ones, or the same value, from RDRAND with CF=1).
pub fn looks_stuck(words: &[u64]) -> bool {
    words.windows(2).all(|w| w[0] == w[1])
}

/// Jitter statistics of TSC deltas: how many distinct low bytes appear.
/// Used to log how much the fallback can rely on (a constant-time
/// emulator yields few).
pub fn distinct_low_bytes(deltas: &[u64]) -> usize {
    let mut seen = [false; 256];
    for d in deltas {
        seen[(*d & 0xff) as usize] = true;
    }
    seen.iter().filter(|s| **s).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_is_deterministic_and_input_sensitive() {
        let seed = |f: &dyn Fn(&mut Pool)| {
            let mut p = Pool::new();
            f(&mut p);
            p.finish()
        };
        let a = seed(&|p| p.add("x", b"ab"));
        assert_eq!(a, seed(&|p| p.add("x", b"ab")));
        assert_ne!(a, seed(&|p| p.add("x", b"ac")));
        assert_ne!(a, seed(&|p| p.add("y", b"ab")));
        // Framing: moving a byte between label and data changes the seed.
        assert_ne!(seed(&|p| p.add("xa", b"b")), a);
        assert_ne!(
            seed(&|p| {
                p.add("x", b"a");
                p.add("x", b"b")
            }),
            a
        );
        assert_ne!(seed(&|p| p.add_u64("t", 1)), seed(&|p| p.add_u64("t", 2)));
    }

    #[test]
    fn derivations_differ_per_purpose() {
        let s = [7u8; 32];
        assert_ne!(derive(&s, "rng"), derive(&s, "incarnation"));
        assert_ne!(derive(&s, "rng"), s);
        assert_eq!(derive(&s, "rng"), derive(&s, "rng"));
        assert_ne!(derive(&[8; 32], "rng"), derive(&s, "rng"));
    }

    #[test]
    fn stuck_generators_are_detected() {
        assert!(looks_stuck(&[u64::MAX; 4]));
        assert!(looks_stuck(&[5; 4]));
        assert!(!looks_stuck(&[1, 2, 3, 4]));
        assert!(!looks_stuck(&[1, 1, 1, 2]));
        assert_eq!(distinct_low_bytes(&[0x100, 0x200, 0x301]), 2);
        assert_eq!(EntropySource::Rdseed.to_string(), "rdseed");
        assert!(EntropySource::TscJitter.is_weak());
        assert!(EntropySource::TscJitter
            .to_string()
            .starts_with("tsc-jitter (weak"));
    }
}
