//! The hosted-side commands of the `fractos` binary: demo, token, controller.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn fractos() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fractos"))
}

#[test]
fn demo_writes_the_documented_json() {
    let dir = std::env::temp_dir().join(format!("fractos-demo-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("demo.json");
    let out = fractos()
        .args([
            "demo",
            "--hosted",
            "--requests",
            "3",
            "--image-side",
            "96",
            "--images",
            "2",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&json).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for mode in ["fractos", "centralized", "remote_api"] {
        for k in [
            "inter_node_bytes",
            "inter_node_messages",
            "latency_p50_us",
            "latency_p99_us",
        ] {
            assert!(v[mode][k].is_number(), "{mode}.{k} in {text}");
        }
    }
    for k in [
        "traffic_ratio",
        "latency_ratio",
        "remote_api_latency_ratio",
        "remote_api_message_ratio",
    ] {
        assert!(v[k].as_f64().is_some_and(|x| x > 0.0), "{k} in {text}");
    }
    assert!(v["traffic_ratio"].as_f64().unwrap() > 1.5, "{text}");
    // Every verification of every mode returned the expected score, and the
    // report says what the compute kernel did.
    assert_eq!(v["failures"], 0, "{text}");
    for mode in ["fractos", "centralized", "remote_api"] {
        assert_eq!(v[mode]["failures"], 0, "{mode} in {text}");
    }
    assert_eq!(v["stride"], 4, "{text}");
    assert_eq!(v["pixels_sampled"], "1 in 16", "{text}");
    assert!(v["rounds"].as_u64().unwrap() >= 1, "{text}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("centralized / fractos"), "{stdout}");
    assert!(
        stdout.contains("stride 4 (samples 1 pixel in 16)"),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("all 9 verifications returned the expected score"),
        "{stderr}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// A pipeline that returns wrong scores makes the demo fail, naming the
/// mode and request, with the failures counted in the JSON: with every
/// stored image corrupted, the compute stage cannot parse any and every
/// verification's score is NaN in every mode (which the old bitwise
/// cross-mode comparison accepted).
#[test]
fn demo_fails_when_verifications_fail() {
    let dir = std::env::temp_dir().join(format!("fractos-demo-fail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("demo.json");
    let out = fractos()
        .args([
            "demo",
            "--requests",
            "2",
            "--image-side",
            "32",
            "--images",
            "2",
            "--corrupt-stored-images",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("wrong score"), "{stderr}");
    assert!(stderr.contains("fractos request 0"), "{stderr}");
    let text = std::fs::read_to_string(&json).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["failures"], 6, "{text}");
    for mode in ["fractos", "centralized", "remote_api"] {
        assert_eq!(v[mode]["failures"], 2, "{mode} in {text}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn token_is_deterministic_and_key_bound() {
    let run = |key: &str| {
        let out = fractos()
            .args(["token", "storage", "--key", key])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let a = run(&"07".repeat(32));
    assert_eq!(a.trim().len(), 64);
    assert_eq!(a, run(&"07".repeat(32)));
    assert_ne!(a, run(&"08".repeat(32)));
    let bad = fractos()
        .args(["token", "x", "--key", "123"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("64 hex digits"));
}

#[test]
fn controller_serves_metrics_and_stops_on_sigint() {
    // Find free ports by binding and releasing them.
    let port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (p, q, m) = (port(), port(), port());
    // The key from a 0600 file, never on the command line.
    let key_file = std::env::temp_dir().join(format!("fractos-cli-key-{}", std::process::id()));
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&key_file)
            .unwrap();
        writeln!(f, "{}", "01".repeat(32)).unwrap();
    }
    // Started with a low soft limit on open files, which the controller
    // raises to the hard one.
    let mut child = Command::new("sh")
        .args(["-c", "ulimit -S -n 64 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_fractos"))
        .args(["controller", "--node", "1", "--key-file"])
        .arg(&key_file)
        .args([
            "--listen",
            &format!("127.0.0.1:{p}"),
            "--peer-listen",
            &format!("127.0.0.1:{q}"),
        ])
        .args(["--metrics", &format!("127.0.0.1:{m}")])
        .args(["--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", m)) {
            s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
            let mut t = String::new();
            s.read_to_string(&mut t).unwrap();
            break t;
        }
        assert!(Instant::now() < deadline, "controller never served metrics");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        text.contains("fractos_processes_attached{node=\"1\"} 0"),
        "{text}"
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        files[3], files[4],
        "soft limit raised to the hard one: {limits}"
    );
    // SIGINT: graceful shutdown.
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let lines: Vec<String> = stderr.lines().map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?} {lines:?}");
    // `--log-format json`: one JSON object per line, for log collectors.
    let logs: Vec<serde_json::Value> = lines
        .iter()
        .filter(|l| !l.starts_with("warning:"))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(logs
        .iter()
        .all(|v| v["level"].is_string() && v["timestamp"].is_string()));
    assert!(
        logs.iter()
            .any(|v| v["fields"]["message"] == "controller stopped"),
        "{lines:?}"
    );
}

/// Kills the child controllers however the test ends.
struct Children(Vec<std::process::Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A cluster file written by hand for three hosted controllers (the
/// cluster `fractos up` records is of appliances; the format is the same):
/// `status` reads them, `demo --cluster` runs on them with the reference
/// storage adaptor, and once they are killed `status` shows them down.
#[test]
fn status_and_demo_on_a_cluster_file_of_hosted_controllers() {
    let port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let dir =
        std::env::temp_dir().join(format!("fractos-cli-hosted-cluster-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("cluster.key");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&key_file)
            .unwrap();
        writeln!(f, "{}", "5a".repeat(32)).unwrap();
    }
    // (process, peer, metrics) ports of nodes 1..=3.
    let ports: Vec<(u16, u16, u16)> = (0..3).map(|_| (port(), port(), port())).collect();
    let mut children = Children(Vec::new());
    for (i, (p, q, m)) in ports.iter().enumerate() {
        let mut c = fractos();
        c.args(["controller", "--node", &(i + 1).to_string(), "--key-file"])
            .arg(&key_file)
            .args(["--listen", &format!("127.0.0.1:{p}")])
            .args(["--peer-listen", &format!("127.0.0.1:{q}")])
            .args(["--metrics", &format!("127.0.0.1:{m}")])
            .args(["--log", "warn"]);
        for (j, (_, q2, _)) in ports.iter().enumerate() {
            if j != i {
                c.args(["--peer", &format!("{}=127.0.0.1:{q2}", j + 1)]);
            }
        }
        children.0.push(
            c.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let nodes: Vec<serde_json::Value> = ports
        .iter()
        .enumerate()
        .map(|(i, (p, _, m))| {
            serde_json::json!({"node": i + 1, "process_addr": format!("127.0.0.1:{p}"),
                "metrics_addr": format!("127.0.0.1:{m}")})
        })
        .collect();
    std::fs::write(
        dir.join("cluster.json"),
        // A relative key file is taken from the cluster file's directory.
        serde_json::json!({"key_file": "cluster.key", "nodes": nodes}).to_string(),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = fractos()
            .args(args)
            .env_remove("FRACTOS_CLUSTER")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let d = dir.to_str().unwrap();
    let status = |want_up: bool| -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (ok, out, err) = run(&["status", "--json", "--cluster", d]);
            assert!(ok, "{err}");
            let j: serde_json::Value = serde_json::from_str(&out).unwrap();
            let nodes = j["nodes"].as_array().unwrap();
            assert_eq!(nodes.len(), 3, "{j}");
            if nodes.iter().all(|n| n["up"] == want_up) {
                return j;
            }
            assert!(Instant::now() < deadline, "not all up={want_up}: {j}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    status(true);
    let (ok, out, err) = run(&[
        "demo",
        "--cluster",
        d,
        "--requests",
        "3",
        "--image-side",
        "96",
        "--images",
        "2",
    ]);
    assert!(ok, "{out}\n{err}");
    assert!(
        err.contains("the reference storage adaptor attached to node 0"),
        "{err}"
    );
    assert!(
        err.contains("all 9 verifications returned the expected score"),
        "{err}"
    );
    let j = status(true);
    let copied: u64 = j["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["copy_bytes"].as_u64().unwrap())
        .sum();
    assert!(copied > 0, "{j}");
    assert!(
        j["nodes"][0]["uptime_seconds"].as_f64().unwrap() > 0.0,
        "{j}"
    );
    let (ok, table, _) = run(&["status", "--cluster", d]);
    assert!(ok);
    assert_eq!(
        table.lines().filter(|l| l.contains(" up ")).count(),
        3,
        "{table}"
    );
    // Under another key the controllers refuse the demo's processes.
    let wrong = dir.join("wrong");
    std::fs::create_dir_all(&wrong).unwrap();
    std::fs::copy(dir.join("cluster.json"), wrong.join("cluster.json")).unwrap();
    std::fs::copy(&key_file, wrong.join("cluster.key")).unwrap();
    std::fs::write(wrong.join("cluster.key"), "77".repeat(32)).unwrap();
    let (ok, _, err) = run(&[
        "demo",
        "--cluster",
        wrong.to_str().unwrap(),
        "--requests",
        "3",
    ]);
    assert!(!ok);
    assert!(err.contains("wrong process token or cluster key"), "{err}");
    drop(children);
    status(false);
    let _ = std::fs::remove_dir_all(&dir);
}
