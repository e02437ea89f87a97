//! The `fractos` binary's user-facing behaviour that needs no QEMU run.

use std::process::Command;

fn fractos() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fractos"))
}

#[test]
fn missing_qemu_says_how_to_install_it() {
    let empty = std::env::temp_dir().join(format!("fractos-cli-nopath-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let out = fractos()
        .args(["up", "--kernel", "/nonexistent"])
        .env("PATH", &empty)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("qemu-system-x86_64") && err.contains("apt-get install qemu-system-x86"),
        "{err}"
    );
    std::fs::remove_dir_all(&empty).unwrap();
}

#[test]
fn down_with_nothing_running_says_so() {
    let dir = std::env::temp_dir().join(format!("fractos-cli-down-{}", std::process::id()));
    let out = fractos()
        .args(["down", "--state-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("no running appliances"), "{s}");
}

#[test]
fn help_lists_subcommands_and_rejects_bad_accel() {
    let out = fractos().arg("--help").output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    for sub in ["image", "up", "down", "bench"] {
        assert!(s.contains(sub), "{sub} missing from:\n{s}");
    }
    let out = fractos().args(["up", "--accel", "xen"]).output().unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("use `tcg` or `kvm`"), "{e}");
}
