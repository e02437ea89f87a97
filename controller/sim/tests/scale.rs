//! The `--scale` run: every operation must succeed and every controller's
//! invariants are checked after every step.

use fractos_sim::{run, Report, SimConfig};

#[test]
fn the_scale_configuration_checks_controller_invariants() {
    assert!(SimConfig::scale(10, 8).check_controllers);
}

#[test]
fn a_small_scale_run_succeeds_in_every_operation() {
    let r = run(SimConfig::scale(12, 4)).unwrap_or_else(|f| panic!("{f}"));
    assert!(r.operations > 0);
    r.all_succeeded().unwrap();
}

#[test]
fn a_run_with_a_failed_operation_is_not_all_succeeded() {
    let mut r = Report {
        operations: 10,
        succeeded: 9,
        ..Report::default()
    };
    r.outcomes.insert("Invoke Timeout".into(), 1);
    let e = r.all_succeeded().unwrap_err();
    assert!(
        e.contains("9 of 10") && e.contains("1 Invoke Timeout"),
        "{e}"
    );
    assert!(
        Report::default().all_succeeded().is_err(),
        "no operation ran"
    );
}

#[test]
fn the_scale_binary_exits_zero_only_when_all_succeeded() {
    let dir = std::env::temp_dir().join(format!("fractos-sim-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fractos-sim"))
        .args(["--scale", "8", "--ops", "4"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(json.contains("\"all_succeeded\": true"), "{json}");
    assert!(json.contains("\"invariants_checked\": true"), "{json}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Membership at scale: a killed controller is confirmed dead by every
/// other one within a bound of protocol periods that grows like log N, and
/// the idle traffic per controller does not grow with the cluster (figures
/// in virtual time: deterministic, not timing goals).
#[test]
fn membership_detects_a_kill_in_log_periods_with_idle_traffic_independent_of_size() {
    let mut rates = Vec::new();
    for n in [40usize, 160] {
        let r = run(SimConfig::scale(n, 2)).unwrap_or_else(|f| panic!("{f}"));
        r.all_succeeded().unwrap();
        let periods = r.detection_nanos.expect("the kill was detected") / r.period_nanos;
        // Suspicion lasts 4 × ⌈log10 N⌉ periods; finding the failure and
        // spreading the suspicion add O(log N) more.
        let log10 = (n as f64).log10().ceil() as u64;
        let log2 = (n as f64).log2().ceil() as u64;
        assert!(
            periods >= 4 * log10 && periods <= 4 * log10 + 2 * log2 + 4,
            "{n} controllers: {periods} periods"
        );
        assert!(r.idle_messages > 0 && r.idle_controllers == n as u64);
        let rate =
            r.idle_messages as f64 / r.idle_controllers as f64 / (r.idle_window_nanos as f64 / 1e9);
        rates.push(rate);
        // Links in use are bounded by what a controller does (the
        // workload's partners, recent probes), not by the cluster size
        // (37 at 1,000 controllers, 40 at 2,000).
        assert!(
            r.max_links_per_controller < 60,
            "{n}: {} links",
            r.max_links_per_controller
        );
        assert!(r.idle_closes > 0 && r.dials > 0);
    }
    let (small, large) = (rates[0], rates[1]);
    assert!(
        large < small * 1.3 && large > small * 0.7,
        "idle messages per controller per second: {small:.1} at 40, {large:.1} at 160"
    );
}

/// The fault seeds with gossip forced on (the sweep runs it on half of
/// them): crashes, partitions and resets with links on demand and the
/// failure detector, every invariant including the membership ones.
#[test]
fn gossip_fault_seeds() {
    for seed in 0..150u64 {
        let mut c = SimConfig::for_seed(10_000 + seed);
        c.gossip = true;
        if let Err(f) = run(c) {
            panic!("{f}");
        }
    }
}
