//! The three pipeline modes over a real embedded 3-controller cluster.

use fractos_adaptors::demo::{run, DemoConfig};

#[test]
fn all_modes_agree_and_fractos_moves_each_image_once() {
    let cfg = DemoConfig {
        requests: 6,
        image_side: 256,
        images: 4,
        warmup: 1,
        stride: 1,
        storage_write: None,
    };
    let r = run(&cfg, |_, _, _| {}).expect("demo runs");
    // Same person scores high, strangers (every 4th image) lower.
    assert!(r.fractos.scores[0] > 0.8, "{:?}", r.fractos.scores);
    assert!(
        r.fractos.scores[3] < r.fractos.scores[0],
        "{:?}",
        r.fractos.scores
    );
    let image = r.image_bytes as u64 * cfg.requests as u64;
    // FractOS: each image crosses the network once; centralised: twice.
    assert!(r.fractos.inter_node_bytes >= image, "{r:?}");
    assert!(r.fractos.inter_node_bytes < image + image / 4, "{r:?}");
    assert!(r.centralized.inter_node_bytes >= 2 * image, "{r:?}");
    assert!(r.traffic_ratio() > 1.7, "{}", r.traffic_ratio());
    // Remote API: one round trip per block and device operation.
    assert!(
        r.remote_api_message_ratio() > 1.5,
        "{}",
        r.remote_api_message_ratio()
    );
    let json = r.to_json();
    for key in [
        "\"fractos\"",
        "\"centralized\"",
        "\"remote_api\"",
        "\"traffic_ratio\"",
        "\"latency_ratio\"",
        "\"remote_api_latency_ratio\"",
        "\"remote_api_message_ratio\"",
        "\"latency_p50_us\"",
    ] {
        assert!(json.contains(key), "{key} missing in {json}");
    }
}

#[test]
fn netns_mode_moves_bytes_between_namespaces() {
    use fractos_adaptors::demo::run_in;
    use fractos_adaptors::netns::{LinkModel, Netns};
    // Needs root and iproute2 (CI has both; `.ci/run` installs iproute2).
    let net = Netns::create(
        3,
        LinkModel {
            delay_us: 20,
            rate_mbit: 2000,
        },
    )
    .expect("create namespaces (run as root)");
    let cfg = DemoConfig {
        requests: 3,
        image_side: 128,
        images: 2,
        warmup: 1,
        stride: 2,
        storage_write: None,
    };
    let r = run_in(&cfg, Some(&net), |_, _, _| {}).expect("demo runs across namespaces");
    assert_eq!(r.link_model.map(|m| m.rate_mbit), Some(2000));
    assert!(r.traffic_ratio() > 1.5, "{r:?}");
    let name = net.name(0);
    drop(net);
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(&name),
        "namespaces are deleted on drop"
    );
}
