//! The Prometheus text rendering of a controller's metrics and traffic.

mod harness;

use std::collections::BTreeMap;

use fractos_core::{prometheus, LinkTraffic, Traffic};
use fractos_wire::{ErrorCode, Handle, ProcessMsg, Rights};
use harness::{handle, Net};

fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

#[track_caller]
fn assert_line(text: &str, line: &str) {
    assert!(has_line(text, line), "missing line {line:?} in:\n{text}");
}

#[test]
fn renders_ops_errors_gauges_and_traffic() {
    let mut net = Net::new(1);
    let p = net.attach(0, "app");
    let _m = handle(net.op(p, |op| ProcessMsg::MemoryCreate {
        op,
        addr: 0,
        len: 64,
        rights: Rights::READ_WRITE,
    }));
    assert_eq!(
        net.op(p, |op| ProcessMsg::Invoke {
            op,
            cap: Handle(999),
            imms: Vec::new(),
            caps: Vec::new(),
        }),
        Err(ErrorCode::BadHandle)
    );

    let mut traffic = Traffic {
        peers: BTreeMap::new(),
        processes: LinkTraffic {
            frames_in: 3,
            bytes_in: 120,
            frames_out: 4,
            bytes_out: 160,
        },
    };
    traffic.peers.insert(
        7,
        LinkTraffic {
            frames_in: 5,
            bytes_in: 500,
            frames_out: 6,
            bytes_out: 600,
        },
    );
    traffic.peers.insert(
        9,
        LinkTraffic {
            frames_in: 1,
            bytes_in: 10,
            frames_out: 2,
            bytes_out: 20,
        },
    );
    assert_eq!(
        traffic.peer_total(),
        LinkTraffic {
            frames_in: 6,
            bytes_in: 510,
            frames_out: 8,
            bytes_out: 620,
        }
    );

    let text = prometheus::render(&net.ctrls[0], &traffic);
    assert!(text.ends_with('\n'));

    // Operations: one of each kind issued, none of the others.
    assert_line(
        &text,
        "# HELP fractos_ops_total Operations received from local processes.",
    );
    assert_line(&text, "# TYPE fractos_ops_total counter");
    assert_line(&text, r#"fractos_ops_total{node="1",op="memory_create"} 1"#);
    assert_line(&text, r#"fractos_ops_total{node="1",op="invoke"} 1"#);
    assert_line(&text, r#"fractos_ops_total{node="1",op="lookup"} 0"#);
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("fractos_ops_total{"))
            .count(),
        12
    );

    // Errors, with snake_case labels.
    assert_line(
        &text,
        r#"fractos_errors_total{node="1",code="bad_handle"} 1"#,
    );
    assert_line(
        &text,
        r#"fractos_errors_total{node="1",code="wrong_type"} 0"#,
    );
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("fractos_errors_total{"))
            .count(),
        ErrorCode::ALL.len()
    );

    // Gauges.
    assert_line(&text, "# TYPE fractos_processes_attached gauge");
    assert_line(&text, r#"fractos_processes_attached{node="1"} 1"#);
    assert_line(&text, r#"fractos_objects{node="1"} 1"#);

    // Traffic from the driver.
    for line in [
        r#"fractos_traffic_bytes_total{node="1",link="process",direction="in"} 120"#,
        r#"fractos_traffic_frames_total{node="1",link="process",direction="out"} 4"#,
        r#"fractos_traffic_bytes_total{node="1",link="peer",peer="7",direction="in"} 500"#,
        r#"fractos_traffic_bytes_total{node="1",link="peer",peer="7",direction="out"} 600"#,
        r#"fractos_traffic_frames_total{node="1",link="peer",peer="9",direction="out"} 2"#,
    ] {
        assert_line(&text, line);
    }
    // Peers in ascending order.
    let p7 = text.find(r#"peer="7""#).unwrap();
    let p9 = text.find(r#"peer="9""#).unwrap();
    assert!(p7 < p9);

    // Latency histogram: both operations answered, cumulative buckets.
    assert_line(&text, "# TYPE fractos_op_latency_seconds histogram");
    assert_line(
        &text,
        r#"fractos_op_latency_seconds_bucket{node="1",le="+Inf"} 2"#,
    );
    assert_line(&text, r#"fractos_op_latency_seconds_count{node="1"} 2"#);
    assert_line(
        &text,
        r#"fractos_op_latency_seconds_bucket{node="1",le="0.000001"} 2"#,
    );
}

#[test]
fn empty_traffic_renders_only_process_lines() {
    let net = Net::new(1);
    let text = prometheus::render(&net.ctrls[0], &Traffic::default());
    assert_line(
        &text,
        r#"fractos_traffic_bytes_total{node="1",link="process",direction="in"} 0"#,
    );
    assert!(!text.contains(r#"link="peer""#), "{text}");
    assert_line(&text, r#"fractos_processes_attached{node="1"} 0"#);
    assert_line(&text, r#"fractos_op_latency_seconds_count{node="1"} 0"#);
}
