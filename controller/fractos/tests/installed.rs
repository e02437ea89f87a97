//! An installed `fractos`, away from its source tree, run from an empty
//! directory: `up` (3 appliances under QEMU TCG), `status`, `demo
//! --cluster`, `token`, `down`, `status`.
//!
//! "Installed" is what `cargo install` leaves: the binary in `<root>/bin`
//! and (copied by hand, as the README says) the kernel ELF in
//! `<root>/share/fractos/fractos-kernel`. The test copies the binary cargo
//! built for it instead of running `cargo install`: that would rebuild the
//! whole dependency tree in a second target directory (the test's own is
//! locked by the `cargo test` running it), minutes of CPU for the same
//! bytes. `FRACTOS_WORKSPACE` points at a directory without sources, so
//! the binary cannot fall back on building the kernel from the checkout.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Installed {
    root: PathBuf,
    exe: PathBuf,
    cwd: PathBuf,
    state: PathBuf,
}

impl Installed {
    fn new() -> Self {
        let kernel = fractos_qemu::build::build_kernel(&fractos_qemu::build::Workspace::locate())
            .expect("build the kernel");
        let root = std::env::temp_dir().join(format!("fractos-installed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let share = root.join("share/fractos");
        for d in [
            root.join("bin"),
            share.clone(),
            root.join("empty"),
            root.join("home"),
        ] {
            std::fs::create_dir_all(d).unwrap();
        }
        let exe = root.join("bin/fractos");
        std::fs::copy(env!("CARGO_BIN_EXE_fractos"), &exe).unwrap();
        std::fs::copy(kernel, share.join("fractos-kernel")).unwrap();
        Installed {
            exe,
            cwd: root.join("empty"),
            state: root.join("state"),
            root,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new(&self.exe)
            .args(args)
            .current_dir(&self.cwd)
            .env("FRACTOS_STATE_DIR", &self.state)
            .env("FRACTOS_WORKSPACE", self.root.join("no-source-here"))
            .env("HOME", self.root.join("home"))
            .env_remove("FRACTOS_CLUSTER")
            .env_remove("FRACTOS_KERNEL")
            .env_remove("FRACTOS_RESULTS")
            .env_remove("CARGO_TARGET_DIR")
            .output()
            .unwrap();
        eprintln!(
            "$ fractos {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "fractos {} failed", args.join(" "));
        String::from_utf8(out.stdout).unwrap()
    }

    fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).unwrap()
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn up_status_demo_down_from_an_installed_binary() {
    let f = Installed::new();
    f.ok(&[
        "up",
        "--detach",
        "--nodes",
        "3",
        "--nvme",
        "16",
        "--storage-names",
        "pipeline/storage/read",
    ]);
    let up = f.state.join("up");
    let cluster = up.join("cluster.json");
    assert_eq!(mode(&cluster), 0o600);
    assert_eq!(mode(&up.join("cluster.key")), 0o600);
    assert!(
        std::fs::read_dir(&f.cwd).unwrap().next().is_none(),
        "fractos wrote into the working directory"
    );

    let s = f.status();
    let nodes = s["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{s}");
    for n in nodes {
        assert_eq!(n["up"], true, "{s}");
        assert!(n["uptime_seconds"].as_f64().unwrap() > 0.0, "{s}");
    }
    let table = f.ok(&["status"]);
    assert_eq!(
        table.lines().filter(|l| l.contains(" up ")).count(),
        3,
        "{table}"
    );

    // The pipeline on the cluster that is up: node 0's disk is the store.
    let demo = f.run(&[
        "demo",
        "--cluster",
        "--requests",
        "4",
        "--images",
        "2",
        "--image-side",
        "128",
        "--block",
        "2",
    ]);
    let err = String::from_utf8_lossy(&demo.stderr);
    assert!(demo.status.success(), "{err}");
    assert!(err.contains("node 0's NVMe"), "{err}");
    assert!(
        err.contains("all 12 verifications returned the expected score"),
        "{err}"
    );
    let s = f.status();
    let copied: u64 = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["copy_bytes"].as_u64().unwrap())
        .sum();
    assert!(copied > 0, "the demo copied nothing: {s}");

    // Tokens come from the recorded cluster's key.
    let token = f.ok(&["token", "someone"]);
    assert_eq!(token.trim().len(), 64, "{token}");

    let kept = f.root.join("kept-cluster.json");
    std::fs::copy(&cluster, &kept).unwrap();
    let down = f.ok(&["down"]);
    assert_eq!(down.matches("stopped node").count(), 3, "{down}");
    assert!(!cluster.exists() && !up.join("cluster.key").exists());
    let after = f.ok(&["status"]);
    assert!(after.contains("no cluster is up"), "{after}");
    // The old record, named explicitly, shows every node down.
    let s: serde_json::Value = serde_json::from_str(&f.ok(&[
        "status",
        "--json",
        "--timeout",
        "2",
        "--cluster",
        kept.to_str().unwrap(),
    ]))
    .unwrap();
    assert!(
        s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["up"] == false),
        "{s}"
    );
}
