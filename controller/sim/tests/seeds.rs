//! The simulator's seed sweep, replay and determinism tests.
//!
//! * `cargo test -p fractos-sim` runs 2,000 seeds (cluster sizes 1–8, faults
//!   on most), split over several tests so the harness uses every core;
//! * `FRACTOS_SIM_SEEDS=<n>` runs `n` seeds instead;
//! * `FRACTOS_SIM_SEED=<s>` runs exactly seed `s` (in `replay`; the sweep
//!   tests then do nothing).

use fractos_sim::{run, SimConfig};

const DEFAULT_SEEDS: u64 = 2000;
const PARTS: u64 = 4;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v} is not a number: {e}")),
    )
}

/// Runs every seed `s < n` with `s % PARTS == part`.
fn sweep(part: u64) {
    if env_u64("FRACTOS_SIM_SEED").is_some() {
        return;
    }
    let n = env_u64("FRACTOS_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    let mut ops = 0;
    let mut count = 0;
    let mut direct = 0;
    for seed in (part..n).step_by(PARTS as usize) {
        match run(SimConfig::for_seed(seed)) {
            Ok(r) => {
                ops += r.operations;
                direct += r.direct_accesses;
                count += 1;
            }
            Err(f) => panic!("{f}"),
        }
    }
    // Every seed of the sweep does real work, and copies also run through
    // the driver-served (direct memory) path.
    assert!(
        count == 0 || ops > count * 5,
        "{ops} operations in {count} seeds"
    );
    assert!(
        count < 50 || direct > 0,
        "no direct memory access in {count} seeds"
    );
}

#[test]
fn seeds_part_0() {
    sweep(0);
}

#[test]
fn seeds_part_1() {
    sweep(1);
}

#[test]
fn seeds_part_2() {
    sweep(2);
}

#[test]
fn seeds_part_3() {
    sweep(3);
}

/// `FRACTOS_SIM_SEED=<s> cargo test -p fractos-sim --test seeds replay -- --nocapture`
#[test]
fn replay() {
    let seed = env_u64("FRACTOS_SIM_SEED").unwrap_or(7);
    match run(SimConfig::for_seed(seed)) {
        Ok(r) => println!("{r:#?}"),
        Err(f) => panic!("{f}"),
    }
}

/// One seed run twice gives the same trace (a hash chain over every frame
/// delivered, with its time and endpoint) and the same counters; another
/// seed gives another trace.
#[test]
fn deterministic() {
    let seed = env_u64("FRACTOS_SIM_SEED").unwrap_or(12_345);
    let mut cfg = SimConfig::for_seed(seed);
    cfg.controllers = 5;
    cfg.faults = true;
    let a = run(cfg.clone()).unwrap_or_else(|f| panic!("{f}"));
    let b = run(cfg.clone()).unwrap_or_else(|f| panic!("{f}"));
    assert!(
        a.messages > 100,
        "the run exchanged {} messages",
        a.messages
    );
    assert_eq!(a, b, "seed {seed} is not deterministic");
    cfg.seed += 1;
    let c = run(cfg).unwrap_or_else(|f| panic!("{f}"));
    assert_ne!(a.trace_hash, c.trace_hash, "different seeds, same trace");
}

/// A larger fault-free cluster: every kind of operation succeeds somewhere
/// and copies are compared byte for byte.
#[test]
fn every_operation_succeeds_somewhere() {
    let mut cfg = SimConfig::for_seed(3);
    cfg.controllers = 6;
    cfg.procs_per_controller = 3;
    cfg.ops_per_process = 80;
    cfg.faults = false;
    let r = run(cfg).unwrap_or_else(|f| panic!("{f}"));
    for op in [
        "MemoryCreate",
        "Diminish",
        "RequestCreate",
        "Derive",
        "Invoke",
        "Copy",
        "Revoke",
        "Drop",
        "Monitor",
        "Publish",
        "Unpublish",
        "Lookup",
    ] {
        let ok = r.outcomes.get(&format!("{op} Ok")).copied().unwrap_or(0);
        assert!(ok > 0, "no successful {op}: {:#?}", r.outcomes);
    }
    assert!(r.copies_checked > 0, "no copy was compared: {r:#?}");
}

/// Seeds on which the copy engine before the revoke barrier wrote chunks
/// after a revoke of the copy's source or destination had completed (the
/// oracle's "no MemWrite after the revoke completed" check failed on them).
/// They must pass, and must still cut running copies with a revoke.
#[test]
fn revoke_cuts_running_copies_regression_seeds() {
    let mut held = 0;
    for seed in [718, 971, 1396, 3709] {
        // As when they were found: every process served by messages.
        let cfg = SimConfig {
            direct_memory: false,
            ..SimConfig::for_seed(seed)
        };
        match run(cfg) {
            Ok(r) => held += r.revokes_held_for_copies,
            Err(f) => panic!("{f}"),
        }
    }
    assert!(held > 0, "no revoke cut a running copy in these seeds");
}
