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
