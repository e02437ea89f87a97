//! `cargo install` then, from an empty directory: `up` (3 appliances under
//! QEMU TCG), `status`, `demo --cluster`, `token`, `down`, `status` — the
//! README's flow, with the installed binary.
//!
//! The install is real (`cargo install --locked --offline --debug --path
//! controller/fractos --root <tmp>`) into the target directory this test
//! was built in, so it reuses what that build compiled: well under a
//! second after `cargo test -p fractos`; after a workspace-wide build,
//! whose feature unification differs, a few crates are compiled again (at
//! most ~3 minutes from scratch on 2 cores). The installed binary finds no
//! kernel next to itself and builds it from the checkout it was compiled
//! from (a no-op when the kernel is built already); its state goes to
//! `FRACTOS_STATE_DIR`, never to the working directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

struct Installed {
    root: PathBuf,
    exe: PathBuf,
    cwd: PathBuf,
    state: PathBuf,
}

impl Installed {
    fn new() -> Self {
        let root = std::env::temp_dir().join(format!("fractos-installed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("empty")).unwrap();
        // <target>/debug/fractos: install into the same target directory.
        let built = Path::new(env!("CARGO_BIN_EXE_fractos"));
        let target = built.parent().and_then(Path::parent).unwrap();
        let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let t0 = Instant::now();
        let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["install", "--locked", "--offline", "--debug", "--path"])
            .arg(crate_dir)
            .arg("--root")
            .arg(&root)
            .env("CARGO_TARGET_DIR", target)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cargo install failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("cargo install took {:.1} s", t0.elapsed().as_secs_f64());
        let exe = root.join("bin/fractos");
        assert!(exe.is_file(), "cargo install left no {}", exe.display());
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
            .env_remove("FRACTOS_CLUSTER")
            .env_remove("FRACTOS_KERNEL")
            .env_remove("FRACTOS_RESULTS")
            .env_remove("FRACTOS_WORKSPACE")
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
    let out = f.run(&[
        "up",
        "--detach",
        "--nodes",
        "3",
        "--nvme",
        "16",
        "--storage-names",
        "pipeline/storage/read",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap();
    assert!(
        err.contains(&format!(
            "building the appliance kernel from {}",
            checkout.display()
        )),
        "{err}"
    );
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
