//! The three pipeline modes over a real embedded 3-controller cluster.

use fractos_adaptors::demo::{run, DemoConfig, DemoTransport};

#[test]
fn all_modes_agree_and_fractos_moves_each_image_once() {
    let cfg = DemoConfig {
        requests: 6,
        image_side: 256,
        images: 4,
        warmup: 1,
        block: 2,
        stride: 1,
        storage_write: None,
        corrupt_stored_images: false,
        transport: DemoTransport::Local,
    };
    let r = run(&cfg, |_, _, _| {}).expect("demo runs");
    // Every score of every mode is the expected result of its image pair:
    // at stride 1 the kernel separates the faces, so same-face pairs score
    // above the threshold and strangers (every 4th image) below.
    let t = r
        .verification
        .threshold
        .expect("stride 1 separates the faces");
    assert_eq!(r.failures(), 0, "{r:?}");
    r.check().expect("no wrong score");
    assert_eq!(r.rounds, 3, "modes alternate in rounds of 2");
    for m in [&r.fractos, &r.centralized, &r.remote_api] {
        assert_eq!(m.scores.len(), cfg.requests);
        for (i, s) in m.scores.iter().enumerate() {
            let e = r.verification.expected[i % cfg.images];
            assert!(
                s.is_finite() && (*s > t) == e.same_face,
                "{i}: {s} vs {e:?}"
            );
        }
    }
    assert!(!r.verification.expected[3].same_face);
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
        "\"stride\": 1",
        "\"failures\": 0",
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
        block: 1,
        stride: 2,
        storage_write: None,
        corrupt_stored_images: false,
        transport: DemoTransport::Local,
    };
    let r = run_in(&cfg, Some(&net), |_, _, _| {}).expect("demo runs across namespaces");
    r.check().expect("every score is the expected one");
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

/// The baselines are as good as a careful programmer would write them: no
/// capability is derived and dropped per request when a window equal to
/// the buffer (or one made at connect) does. Counts the frames the client
/// process asks of its controller per verification.
#[test]
fn baselines_make_no_avoidable_local_round_trips() {
    use fractos_adaptors::compute::{CpuBackend, VerifyBackend};
    use fractos_adaptors::demo::{attach, start_cluster};
    use fractos_adaptors::image::{encoded_len, synth_face, Image};
    use fractos_adaptors::pipeline::{serve_compute, serve_storage, Client, REMOTE_BLOCK};
    use fractos_adaptors::storage::BlockStore;
    use std::sync::Arc;
    use std::time::Duration;

    let side = 512; // 512² + 12 bytes: three remote-API blocks
    let slot = encoded_len(side, side) as u64;
    let blocks = slot.div_ceil(REMOTE_BLOCK);
    assert_eq!(blocks, 3);
    let path = std::env::temp_dir().join(format!("fractos-ops-{}", std::process::id()));
    let store = Arc::new(BlockStore::open(&path, slot).unwrap());
    store.write_at(0, &synth_face(1, 1, side, side)).unwrap();
    let nodes = start_cluster().unwrap();
    let storage = attach(&nodes[0], "storage").unwrap();
    serve_storage(&storage, store, slot).unwrap();
    let backend = Arc::new(CpuBackend { stride: 4 });
    let reference = backend
        .features(&Image::parse(&synth_face(1, 0, side, side)).unwrap())
        .unwrap();
    let compute = attach(&nodes[1], "compute").unwrap();
    serve_compute(&compute, backend, reference, slot).unwrap();
    let client = Client::connect(
        attach(&nodes[2], "client").unwrap(),
        slot,
        Duration::from_secs(10),
    )
    .unwrap();
    // Operations the client's controller received from its processes (the
    // client is its only one), all kinds.
    let sent = || -> u64 {
        let text = nodes[2].metrics_text().unwrap();
        text.lines()
            .filter(|l| l.starts_with("fractos_ops_total{"))
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
            .sum()
    };
    let per_request = |f: &dyn Fn() -> f32| {
        f(); // warm-up
        let before = sent();
        let n = 4;
        for _ in 0..n {
            assert!(f().is_finite());
        }
        (sent() - before) as f64 / n as f64
    };
    // Centralised: invoke the read, copy buffer -> compute input, invoke
    // verify (the replies carry no capabilities to drop).
    let central = per_request(&|| client.verify_centralized(0, slot).unwrap().score);
    assert_eq!(central, 3.0, "centralised operations per request");
    // Remote API: one read invoke per block, alloc, drop of the two device
    // buffer caps, copy-in, launch, sync, copy-out, free.
    let remote = per_request(&|| client.verify_remote_api(0, slot).unwrap().score);
    assert_eq!(
        remote,
        blocks as f64 + 8.0,
        "remote-API operations per request"
    );
    let _ = std::fs::remove_file(path);
}
