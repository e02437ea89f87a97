//! `fractos demo` with QEMU installed: the pipeline on three appliance VMs
//! (the default), the storage stage on node 0's NVMe.

use std::process::Command;

#[test]
fn demo_runs_on_appliance_vms_by_default() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = std::env::temp_dir().join(format!("fractos-demo-appliance-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("demo.json");
    let out = Command::new(env!("CARGO_BIN_EXE_fractos"))
        .current_dir(&root)
        .args([
            "demo",
            "--requests",
            "2",
            "--image-side",
            "64",
            "--images",
            "2",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("appliance VMs"), "{stderr}");
    assert!(stderr.contains("built-in storage service"), "{stderr}");
    let text = std::fs::read_to_string(&json).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["controllers"], "remote", "{text}");
    assert_eq!(v["requests"], 2, "{text}");
    assert!(v["traffic_ratio"].as_f64().unwrap() > 1.5, "{text}");
    // Every verification returned the expected score.
    assert_eq!(v["failures"], 0, "{text}");
    for mode in ["fractos", "centralized", "remote_api"] {
        assert_eq!(v[mode]["failures"], 0, "{mode} in {text}");
    }
    assert_eq!(v["stride"], 4, "{text}");
    assert!(
        stderr.contains("all 6 verifications returned the expected score"),
        "{stderr}"
    );
    assert!(
        v["fractos"]["inter_node_bytes"].as_u64().unwrap() > 0,
        "{text}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
