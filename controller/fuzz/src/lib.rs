//! Fuzz targets for FractOS, and bounded drivers that run them on the
//! stable toolchain.
//!
//! Each target is one function over `&[u8]`:
//!
//! * [`wire_decode`] — the wire decoders never panic and what decodes
//!   re-encodes canonically (the body of `controller/wire/fuzz`'s `decode`
//!   cargo-fuzz target);
//! * [`core_cluster`] — a stateful target: the input, decoded with
//!   [`arbitrary::Unstructured`], drives a cluster of real controller cores
//!   (plus a fake keyed peer) through process and peer traffic, link and
//!   channel churn, memory answers and time, checking every controller's
//!   invariants after every step.
//!
//! The same functions run under libFuzzer (`controller/fuzz/fuzz`,
//! `controller/wire/fuzz`: nightly and cargo-fuzz) for long campaigns, and
//! under [`campaign`] — a seeded random-input driver with an execution
//! count and a time cap — in `cargo test` on stable (`tests/fuzz.rs`), so
//! CI runs every target. See README.md.

mod cluster;
mod crypto;
mod gen;
mod wire;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use cluster::{core_cluster, core_cluster_hostile, ClusterReport};
pub use wire::{wire_decode, wire_input};

/// A random input for [`core_cluster`]: uniformly random bytes (every byte
/// decodes to a meaningful choice) of a random length up to `max_len`.
pub fn cluster_input(rng: &mut impl RngCore, max_len: usize) -> Vec<u8> {
    let len = (rng.next_u32() as usize) % (max_len + 1);
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    data
}

/// What a [`campaign`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Target name.
    pub target: String,
    /// Inputs executed.
    pub execs: u64,
    /// Bytes of input executed.
    pub bytes: u64,
    /// RNG seed of the inputs.
    pub seed: u64,
    /// Wall-clock time.
    pub secs: f64,
    /// Whether the time cap stopped the campaign before `execs` planned.
    pub capped: bool,
}

impl Summary {
    /// The summary as one JSON object.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"target\":\"{}\",\"execs\":{},\"bytes\":{},\"seed\":{},\"secs\":{:.3},\"capped\":{}}}",
            self.target, self.execs, self.bytes, self.seed, self.secs, self.capped
        )
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

/// The workspace's target directory (`CARGO_TARGET_DIR` or `target/`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

/// Runs `target` on inputs from `input` (a ChaCha8 RNG seeded with
/// `FRACTOS_FUZZ_SEED`, default 0): `FRACTOS_FUZZ_EXECS` inputs (default
/// `default_execs`), stopping early after `FRACTOS_FUZZ_SECS` seconds
/// (default `default_secs`). Prints the summary, writes it to
/// `target/fuzz-stats/<name>.json`, and returns it.
///
/// An input that panics is saved to `target/fuzz-findings/` (replay it with
/// the cargo-fuzz target or [`replay_dir`]) and the panic goes on.
pub fn campaign(
    name: &str,
    default_execs: u64,
    default_secs: u64,
    target: impl Fn(&[u8]),
    mut input: impl FnMut(&mut ChaCha8Rng) -> Vec<u8>,
) -> Summary {
    let planned = env_u64("FRACTOS_FUZZ_EXECS").unwrap_or(default_execs);
    let seed = env_u64("FRACTOS_FUZZ_SEED").unwrap_or(0);
    let cap = Duration::from_secs(env_u64("FRACTOS_FUZZ_SECS").unwrap_or(default_secs));
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let start = Instant::now();
    let (mut execs, mut bytes) = (0u64, 0u64);
    while execs < planned {
        if execs & 63 == 0 && start.elapsed() >= cap {
            break;
        }
        let data = input(&mut rng);
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| target(&data))) {
            let dir = target_dir().join("fuzz-findings");
            let path = dir.join(format!("{name}-seed{seed}-exec{execs}.bin"));
            let saved = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, &data));
            eprintln!(
                "fuzz {name}: input {execs} (seed {seed}, {} bytes) panicked; saved to {} ({saved:?})",
                data.len(),
                path.display()
            );
            std::panic::resume_unwind(panic);
        }
        execs += 1;
        bytes += data.len() as u64;
    }
    let summary = Summary {
        target: name.to_owned(),
        execs,
        bytes,
        seed,
        secs: start.elapsed().as_secs_f64(),
        capped: execs < planned,
    };
    eprintln!("fuzz {name}: {}", summary.to_json());
    let dir = target_dir().join("fuzz-stats");
    if std::fs::create_dir_all(&dir).is_ok() {
        // Best effort: the stats file is informational.
        let _ = std::fs::write(dir.join(format!("{name}.json")), summary.to_json() + "\n");
    }
    summary
}

/// Runs `target` on every file in `dir` (sorted by name); returns how many.
/// A missing directory holds no inputs.
pub fn replay_dir(dir: &Path, target: impl Fn(&[u8])) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        eprintln!("replaying {}", f.display());
        target(&data);
    }
    files.len()
}

/// Whether `target` panics on `data` (with the panic message silenced).
fn panics(target: &impl Fn(&[u8]), data: &[u8]) -> Option<String> {
    let result = catch_unwind(AssertUnwindSafe(|| target(data)));
    result.err().map(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

/// Shrinks a panicking input: removes chunks and zeroes bytes while the
/// target still panics with a message starting like the original's first
/// line. Returns the smallest input found (the input itself if it does not
/// panic). Silences the panic hook while it runs.
pub fn minimize(data: &[u8], target: impl Fn(&[u8])) -> Vec<u8> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut best = data.to_vec();
    if let Some(msg) = panics(&target, &best) {
        let key: String = msg.lines().next().unwrap_or("").chars().take(40).collect();
        let same = |d: &[u8]| panics(&target, d).is_some_and(|m| m.starts_with(&key));
        let mut chunk = best.len().max(1);
        while chunk >= 1 {
            let mut i = 0;
            while i < best.len() {
                let mut cand = best.clone();
                cand.drain(i..(i + chunk).min(best.len()));
                if same(&cand) {
                    best = cand;
                } else {
                    i += chunk;
                }
            }
            if chunk == 1 {
                break;
            }
            chunk /= 2;
        }
        for i in 0..best.len() {
            if best[i] != 0 {
                let mut cand = best.clone();
                cand[i] = 0;
                if same(&cand) {
                    best = cand;
                }
            }
        }
    }
    std::panic::set_hook(hook);
    best
}
