//! The stable drivers: every fuzz target runs for a bounded number of
//! seeded random inputs in `cargo test` (scale with `FRACTOS_FUZZ_EXECS`,
//! `FRACTOS_FUZZ_SECS`, `FRACTOS_FUZZ_SEED`), and every committed regression
//! input is replayed.

use std::path::Path;

use fractos_fuzz::{
    campaign, cluster_input, core_cluster, replay_dir, wire_decode, wire_input, ClusterReport,
};

fn regressions(target: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("regressions")
        .join(target)
}

#[test]
fn wire_decode_campaign() {
    let s = campaign("wire_decode", 3_000_000, 25, wire_decode, |rng| {
        wire_input(rng, 512)
    });
    assert!(s.execs > 0);
}

#[test]
fn core_cluster_campaign() {
    let s = campaign(
        "core_cluster",
        20_000,
        40,
        |d| {
            core_cluster(d);
        },
        |rng| cluster_input(rng, 2048),
    );
    assert!(s.execs > 0);
}

#[test]
fn regression_inputs() {
    replay_dir(&regressions("wire_decode"), wire_decode);
    replay_dir(&regressions("core_cluster"), |d| {
        core_cluster(d);
    });
    let n = replay_dir(&regressions("core_cluster_hostile"), |d| {
        fractos_fuzz::core_cluster_hostile(d);
    });
    assert!(n >= 1, "the hostile finding is replayed");
}

/// The keyed-peer target without the CI target's restriction: the fake
/// peer may name the receiver's own capabilities anywhere a peer names
/// capabilities it holds (found: an `Invoke` naming the target's own node
/// as an argument was installed twice; the core now installs a local
/// capability only if it is held for this node, once).
#[test]
fn core_cluster_hostile_campaign() {
    let s = campaign(
        "core_cluster_hostile",
        5_000,
        20,
        |d| {
            fractos_fuzz::core_cluster_hostile(d);
        },
        |rng| cluster_input(rng, 2048),
    );
    assert!(s.execs > 0);
}

/// The fake keyed peer gets through the core's handshake: the
/// fake keyed peer completes handshakes and its sealed frames are accepted,
/// so the stateful target reaches the core's authenticated peer handling.
#[test]
fn fake_peer_gets_through() {
    let mut total = ClusterReport::default();
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(7);
    for _ in 0..300 {
        let r = core_cluster(&cluster_input(&mut rng, 2048));
        total.fake_handshakes += r.fake_handshakes;
        total.fake_sealed_frames += r.fake_sealed_frames;
        total.peer_frames += r.peer_frames;
        total.completions += r.completions;
    }
    eprintln!("{total:?}");
    assert!(total.fake_handshakes > 0, "{total:?}");
    assert!(total.fake_sealed_frames > 0, "{total:?}");
    assert!(total.completions > 0, "{total:?}");
}

/// Shrinks a panicking input and replays the result (with a step trace if
/// `FRACTOS_FUZZ_TRACE` is set). The workspace's profiles abort on panic
/// outside tests, so the minimizer runs as a test:
///
/// ```sh
/// FRACTOS_FUZZ_MINIMIZE=core_cluster:IN[:OUT] \
///     cargo test -p fractos-fuzz --test fuzz -- --ignored minimize --nocapture
/// ```
#[test]
#[ignore = "a tool: needs FRACTOS_FUZZ_MINIMIZE=target:input[:output]"]
fn minimize() {
    let spec = std::env::var("FRACTOS_FUZZ_MINIMIZE").expect("FRACTOS_FUZZ_MINIMIZE");
    let mut parts = spec.splitn(3, ':');
    let target = parts.next().expect("target");
    let input = parts.next().expect("input file");
    let run: fn(&[u8]) = match target {
        "core_cluster" => |d| {
            core_cluster(d);
        },
        "core_cluster_hostile" => |d| {
            fractos_fuzz::core_cluster_hostile(d);
        },
        "wire_decode" => wire_decode,
        t => panic!("unknown target {t}"),
    };
    let data = std::fs::read(input).expect("read input");
    let small = fractos_fuzz::minimize(&data, run);
    eprintln!("{input}: {} -> {} bytes", data.len(), small.len());
    if let Some(out) = parts.next() {
        std::fs::write(out, &small).expect("write output");
    }
    run(&small);
}
