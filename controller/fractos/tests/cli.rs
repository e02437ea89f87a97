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

    // `--cluster FILE` names the state directory by its cluster file;
    // `down` forgets the recorded cluster there.
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["cluster.json", "cluster.key"] {
        std::fs::write(dir.join(f), "x").unwrap();
    }
    let out = fractos()
        .args(["down", "--cluster"])
        .arg(dir.join("cluster.json"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("removed") && !dir.join("cluster.json").exists(),
        "{s}"
    );
    assert!(!dir.join("cluster.key").exists());
    let _ = std::fs::remove_dir_all(&dir);
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

/// Runs `fractos down` on drop, so a failing test leaves no detached QEMU.
struct DownOnDrop(std::path::PathBuf);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        let _ = fractos()
            .arg("down")
            .arg("--state-dir")
            .arg(&self.0)
            .output();
    }
}

#[test]
fn up_detach_then_down() {
    let dir = std::env::temp_dir().join(format!("fractos-cli-up-{}", std::process::id()));
    let _guard = DownOnDrop(dir.clone());
    let out = fractos()
        .args([
            "up",
            "--detach",
            "--memory",
            "64",
            "--nvme",
            "1",
            "--state-dir",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{so}\n{se}");
    assert!(so.contains("fractos: ready node=0"), "{so}\n{se}");
    assert!(so.contains("1b36:0010"), "NVMe missing:\n{so}");
    assert!(se.contains("detached; stop with `fractos down`"), "{se}");
    let pid: i32 = std::fs::read_to_string(dir.join("node0.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    // The key is in its own 0600 file that cluster.json names; it is on no
    // command line and not printed.
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cluster.json")).unwrap()).unwrap();
    assert!(info.get("key").is_none(), "{info}");
    let key_file = std::path::PathBuf::from(info["key_file"].as_str().unwrap());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", key_file.display());
    }
    let key = std::fs::read_to_string(&key_file).unwrap();
    let key = key.trim();
    assert_eq!(key.len(), 64, "{key:?}");
    let argv = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap())
        .replace('\0', " ");
    assert!(
        argv.contains("-fw_cfg name=opt/fractos/cluster-key,file="),
        "{argv}"
    );
    assert!(!argv.contains(key), "key in QEMU's argv: {argv}");
    assert!(
        !so.contains(key) && !se.contains(key),
        "key printed:\n{so}\n{se}"
    );

    let out = fractos()
        .args(["down", "--state-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        so.contains(&format!("stopped node0 (QEMU pid {pid})")),
        "{so}"
    );
    // down waits for the process to go; give the reaper a moment at most.
    let gone = (0..100).any(|_| {
        let alive = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains("qemu-system"))
            .unwrap_or(false);
        if alive {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        !alive
    });
    assert!(gone, "QEMU {pid} still running after down");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An installed `fractos` away from its source tree: no kernel is built,
/// the image is looked for next to the binary (a clear error names where),
/// and state goes to the XDG state directory.
#[test]
fn installed_binary_finds_its_kernel_and_state_away_from_the_source() {
    let kernel = fractos_qemu::build::build_kernel(&fractos_qemu::build::Workspace::locate())
        .expect("build the kernel");
    let root = std::env::temp_dir().join(format!("fractos-cli-installed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (bin, home) = (root.join("bin"), root.join("home"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&home).unwrap();
    let exe = bin.join("fractos");
    std::fs::copy(env!("CARGO_BIN_EXE_fractos"), &exe).unwrap();
    let installed = |args: &[&str]| {
        let mut c = Command::new(&exe);
        c.args(args)
            .env("FRACTOS_WORKSPACE", root.join("no-source-here"))
            .env("HOME", &home)
            .env_remove("XDG_STATE_HOME")
            .env_remove("FRACTOS_STATE_DIR")
            .env_remove("FRACTOS_KERNEL")
            .env_remove("CARGO_TARGET_DIR");
        c.output().unwrap()
    };
    let state = home.join(".local/state/fractos/up");
    let _guard = DownOnDrop(state.clone());

    let out = installed(&["up", "--detach", "--memory", "64"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no appliance kernel found") && err.contains(&bin.display().to_string()),
        "{err}"
    );

    std::fs::copy(&kernel, bin.join("fractos-kernel")).unwrap();
    let out = installed(&["up", "--detach", "--memory", "64"]);
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{so}\n{se}");
    assert!(so.contains("fractos: ready node=0"), "{so}\n{se}");
    assert!(!se.contains("building the appliance kernel"), "{se}");
    assert!(
        state.join("node0.pid").is_file(),
        "no state in {}",
        state.display()
    );
    assert!(state.join("cluster.json").is_file());

    let out = installed(&["down"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!state.join("node0.pid").exists());
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn completions_and_man_page_cover_the_subcommands() {
    for shell in ["bash", "zsh", "fish"] {
        let out = fractos().args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}");
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(s.len() > 1000, "{shell}: {s}");
        for sub in ["status", "demo", "completions"] {
            assert!(s.contains(sub), "{shell} completions lack {sub}");
        }
    }
    let out = fractos().args(["completions", "tcsh"]).output().unwrap();
    assert!(!out.status.success());
    let out = fractos().arg("man").output().unwrap();
    assert!(out.status.success());
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH fractos"),
        "{page}"
    );
    for sub in [
        "image",
        "up",
        "down",
        "status",
        "bench",
        "controller",
        "demo",
        "token",
        "report",
        "completions",
        "man",
    ] {
        assert!(
            page.contains(&format!("fractos\\-{sub}(1)")),
            "{sub} missing"
        );
    }
    let dir = std::env::temp_dir().join(format!("fractos-cli-man-{}", std::process::id()));
    let out = fractos().args(["man", "--out"]).arg(&dir).output().unwrap();
    assert!(out.status.success());
    for page in ["fractos.1", "fractos-status.1", "fractos-demo.1"] {
        assert!(
            std::fs::metadata(dir.join(page)).unwrap().len() > 100,
            "{page}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn status_without_a_cluster_and_with_one_that_is_gone() {
    let dir = std::env::temp_dir().join(format!("fractos-cli-status-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let status = |args: &[&str]| {
        fractos()
            .arg("status")
            .args(args)
            .env("FRACTOS_STATE_DIR", &dir)
            .env_remove("FRACTOS_CLUSTER")
            .output()
            .unwrap()
    };
    let out = status(&[]);
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("no cluster is up"), "{s}");
    // Named explicitly, a missing cluster is an error that says what to do.
    let missing = dir.join("nowhere.json");
    let out = status(&["--cluster", missing.to_str().unwrap()]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("fractos up --detach"), "{e}");

    // A recorded cluster whose nodes are gone: every node is shown down.
    let key = dir.join("cluster.key");
    std::fs::write(&key, "11".repeat(32)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let up = dir.join("up");
    std::fs::create_dir_all(&up).unwrap();
    let nodes: Vec<serde_json::Value> = (0..2)
        .map(|i| {
            serde_json::json!({"node": i,
                "process_addr": format!("127.0.0.1:{}", closed_port()),
                "metrics_addr": format!("127.0.0.1:{}", closed_port())})
        })
        .collect();
    std::fs::write(
        up.join("cluster.json"),
        serde_json::json!({"key_file": key, "nodes": nodes}).to_string(),
    )
    .unwrap();
    let out = status(&["--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ns = j["nodes"].as_array().unwrap();
    assert_eq!(ns.len(), 2);
    assert!(
        ns.iter()
            .all(|n| n["up"] == false && n["error"].is_string()),
        "{j}"
    );
    let out = status(&[]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert_eq!(s.lines().filter(|l| l.contains(" down ")).count(), 2, "{s}");

    // The recorded cluster's key mints tokens; a key others can read is refused.
    let token = |dir: &std::path::Path| {
        fractos()
            .args(["token", "p"])
            .env("FRACTOS_STATE_DIR", dir)
            .env_remove("FRACTOS_CLUSTER")
            .output()
            .unwrap()
    };
    let out = token(&dir);
    let from_key = fractos()
        .args(["token", "p", "--key-file"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success() && from_key.status.success());
    assert_eq!(out.stdout, from_key.stdout);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = token(&dir);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
    let _ = std::fs::remove_dir_all(&dir);
}
