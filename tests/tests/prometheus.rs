//! A real Prometheus server (Debian's `prometheus`) scrapes both kinds of
//! controller: a hosted controller on loopback and an appliance in QEMU.
//! The test makes a counter move on each (memory_create operations from
//! SDK processes) and asks Prometheus's HTTP query API for it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fractos_adaptors::demo::{scrape_metrics, DEMO_KEY};
use fractos_qemu::cluster::{Cluster, ClusterSpec, ControllerSetup};
use fractos_sdk::{Process, Rights};
use fractos_tests::{attach_demo, kernel, scratch, READY_TIMEOUT};
use fractos_wire::NodeId;

/// Generous: TCG, two shared cores, scrapes every second.
const WAIT: Duration = Duration::from_secs(180);

/// Kills the Prometheus server when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn start_prometheus(dir: &Path, targets: &[(&str, SocketAddr)]) -> (Server, SocketAddr) {
    let mut config =
        String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n");
    for (job, addr) in targets {
        config.push_str(&format!(
            "  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n"
        ));
    }
    let file = dir.join("prometheus.yml");
    std::fs::write(&file, config).expect("write the scrape config");
    let web: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).expect("log file");
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", file.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "starting Debian's `prometheus` failed ({e}): install it with \
                 `apt-get install prometheus` (bash .ci/run does)"
            )
        });
    (Server(child), web)
}

/// Prometheus's answer to an instant query, as JSON.
fn query(web: SocketAddr, expr: &str) -> Option<serde_json::Value> {
    let encoded: String = expr
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let mut s = TcpStream::connect_timeout(&web, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET /api/v1/query?query={encoded} HTTP/1.1\r\nHost: prometheus\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (_, body) = text.split_once("\r\n\r\n")?;
    serde_json::from_str(body).ok()
}

/// The value of the single sample `expr` selects, once Prometheus has one.
fn sample(web: SocketAddr, expr: &str) -> Option<f64> {
    let v = query(web, expr)?;
    if v["status"] != "success" {
        return None;
    }
    let result = v["data"]["result"].as_array()?;
    let [one] = result.as_slice() else {
        return None;
    };
    one["value"][1].as_str()?.parse().ok()
}

/// Waits until `expr` has a sample of at least `min`.
fn wait_for(web: SocketAddr, expr: &str, min: f64, log: &Path) -> f64 {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = sample(web, expr).filter(|&v| v >= min) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never reported {expr} >= {min}; last answer {:?}\n{}",
            query(web, expr),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn create_memory(p: &Process, n: usize) {
    let region = p.register(4096).expect("register");
    for _ in 0..n {
        p.memory_create(&region, 0, 4096, Rights::READ)
            .expect("memory_create");
    }
}

#[test]
fn prometheus_scrapes_a_hosted_controller_and_an_appliance() {
    let dir = scratch("prometheus");

    // A hosted controller with its /metrics endpoint.
    let mut cfg = fractos_hosted::HostedConfig::local(NodeId(1), DEMO_KEY);
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let hosted = fractos_hosted::spawn(cfg).expect("start a hosted controller");
    let hosted_metrics = hosted.metrics_addr().expect("metrics endpoint");

    // An appliance in QEMU, its /metrics forwarded to loopback.
    let setup = ControllerSetup::new(1, DEMO_KEY).expect("pick ports");
    let spec = ClusterSpec::controllers(kernel(), dir.join("appliance"), setup.clone());
    let mut cluster = Cluster::launch(&spec).expect("launch QEMU");
    if let Err(e) = cluster.wait_ready(READY_TIMEOUT) {
        panic!("{e}");
    }
    let appliance_metrics = setup.metrics_addr(0).expect("node exists");

    let (_server, web) = start_prometheus(
        &dir,
        &[("hosted", hosted_metrics), ("appliance", appliance_metrics)],
    );
    let log = dir.join("prometheus.log");

    // Both targets are scraped and up.
    for job in ["hosted", "appliance"] {
        wait_for(web, &format!("up{{job=\"{job}\"}}"), 1.0, &log);
    }

    // Make a counter move on each, by a different amount, and see it in
    // Prometheus.
    let p = attach_demo(hosted.process_addr(), "hosted-user");
    create_memory(&p, 7);
    let q = attach_demo(
        setup.process_addr(0).expect("node exists"),
        "appliance-user",
    );
    create_memory(&q, 5);

    let counter = |job: &str| format!("fractos_ops_total{{job=\"{job}\",op=\"memory_create\"}}");
    assert_eq!(wait_for(web, &counter("hosted"), 7.0, &log), 7.0);
    assert_eq!(wait_for(web, &counter("appliance"), 5.0, &log), 5.0);

    // Prometheus parsed every family without complaint: a metric it knows
    // as a counter can be rated.
    let rate = "rate(fractos_ops_total{job=\"hosted\",op=\"memory_create\"}[1m])";
    assert!(
        sample(web, rate).is_some(),
        "rate() over a counter gives a sample"
    );
    // Every family either controller exports is documented, with its type.
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md"))
            .expect("docs/metrics.md");
    for addr in [hosted_metrics, appliance_metrics] {
        let text = scrape_metrics(addr).expect("scrape");
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut words = line.split_whitespace().skip(2);
            let (name, kind) = (words.next().unwrap(), words.next().unwrap());
            assert!(
                doc.contains(&format!("| `{name}` | {kind} |")),
                "{name} ({kind}) is not documented in docs/metrics.md"
            );
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no HELP line"
            );
        }
    }
    drop(p);
    drop(q);
    hosted.shutdown();
}
