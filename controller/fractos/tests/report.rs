//! `fractos --results DIR ...` and `fractos report DIR`: real hosted runs
//! write their JSON into a results directory, the report plots them, and
//! headless Chromium renders the page.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fractos() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fractos"))
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fractos-report-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run fractos");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// A results directory with a real hosted demo and a real hosted bench
/// (small, so the test is quick), plus the QEMU benchmarks' files in the
/// shape their commands write (those take many minutes to measure).
fn results() -> PathBuf {
    let dir = scratch("results");
    ok(fractos().arg("--results").arg(&dir).args([
        "demo",
        "--hosted",
        "--requests",
        "6",
        "--image-side",
        "128",
    ]));
    ok(fractos()
        .args(["bench", "--round-trips", "50", "--copies", "1"])
        .env("FRACTOS_RESULTS", &dir));
    // With --json as well, the file is written there and copied.
    let own = dir.join("own-bench.json");
    ok(fractos()
        .arg("--results")
        .arg(&dir)
        .args(["bench", "--round-trips", "20", "--copies", "1", "--json"])
        .arg(&own));
    assert!(own.is_file());
    std::fs::remove_file(&own).unwrap();
    let write = |name: &str, v: serde_json::Value| {
        std::fs::write(dir.join(name), serde_json::to_string_pretty(&v).unwrap()).unwrap()
    };
    write(
        "bench-appliance.json",
        serde_json::json!({"appliance_rtt_us": 352.3, "linux_guest_rtt_us": 1125.6,
            "appliance_copy_mbps": 29.7, "linux_guest_copy_mbps": 19.9,
            "rtt_ratio": 0.313, "copy_ratio": 1.49}),
    );
    write(
        "bench-nvme.json",
        serde_json::json!({"appliance_read_mbps_128k": 6.0, "linux_guest_read_mbps_128k": 313.2,
            "appliance_iops_4k": 328.3, "linux_guest_iops_4k": 2793.0,
            "read_ratio_128k": 0.019, "iops_ratio_4k": 0.118}),
    );
    write(
        "bench-boot.json",
        serde_json::json!({"boot_ready_ms": 112.6, "linux_boot_ms": 5970.0, "boot_ratio": 0.019,
            "boot_serving_ms": 900.1, "linux_serving_ms": 20000.0, "serving_ratio": 0.045}),
    );
    dir
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn results_directory_and_report() {
    let dir = results();
    for f in ["demo-hosted.json", "bench.json"] {
        let v: serde_json::Value = serde_json::from_str(&read(&dir.join(f))).unwrap();
        assert!(v.is_object(), "{f}");
    }
    let demo: serde_json::Value =
        serde_json::from_str(&read(&dir.join("demo-hosted.json"))).unwrap();
    assert_eq!(
        demo["fractos"]["latencies_us"].as_array().map(Vec::len),
        Some(6),
        "one latency per request"
    );

    let out = dir.join("out");
    let said = ok(fractos().arg("report").arg(&dir).arg("--out").arg(&out));
    assert!(said.contains("wrote 6 plots"), "{said}");
    let html = read(&out.join("index.html"));
    let md = read(&out.join("report.md"));
    let svgs: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "svg"))
        .collect();
    assert_eq!(svgs.len(), 6);
    assert_eq!(html.matches("<svg").count(), 6, "every plot inline");
    for svg in &svgs {
        let name = svg.file_name().unwrap().to_str().unwrap();
        assert!(md.contains(&format!("]({name})")), "{name} in report.md");
        assert!(read(svg).starts_with("<svg"), "{name}");
    }
    // Self-contained: nothing fetched from elsewhere.
    assert!(
        !html.contains("src=\"http") && !html.contains("<link"),
        "{html}"
    );
    // The series are labelled from the results.
    let cdf = read(&out.join("demo-hosted-latency-cdf.svg"));
    for mode in ["FractOS (continuations)", "centralised", "remote API"] {
        assert!(cdf.contains(mode), "{mode} missing from the CDF");
    }
    assert!(read(&out.join("bench-nvme.svg")).contains("linux guest"));
    assert!(read(&out.join("bench-hosted.svg")).contains("invoke rtt secure"));

    // Chromium renders the page without console errors.
    let shot = dir.join("report.png");
    let chromium = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1000,4000",
            "--enable-logging=stderr",
            "--v=1",
        ])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", out.join("index.html").display()))
        .output()
        .unwrap_or_else(|e| {
            panic!("running Debian's `chromium` failed ({e}): apt-get install chromium (bash .ci/run does)")
        });
    let log = String::from_utf8_lossy(&chromium.stderr);
    assert!(chromium.status.success(), "{log}");
    let console_errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("CONSOLE") && (l.contains("Error") || l.contains("Uncaught")))
        .collect();
    assert!(console_errors.is_empty(), "{console_errors:?}");
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
}

#[test]
fn report_of_an_empty_directory_says_what_to_run() {
    let dir = scratch("empty");
    let out = fractos().arg("report").arg(&dir).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no results") && err.contains("--results"),
        "{err}"
    );
}
