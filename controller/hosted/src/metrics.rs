//! Prometheus text-format metrics over a minimal HTTP/1.1 endpoint.

use std::fmt::Write;

use fractos_core::{Controller, OpKind, LATENCY_BUCKETS};
use fractos_wire::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use crate::driver::Event;
use crate::driver::Traffic;

/// `snake_case` label for an error code.
fn error_label(e: ErrorCode) -> String {
    let mut out = String::new();
    for (i, ch) in format!("{e:?}").chars().enumerate() {
        if ch.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(ch.to_ascii_lowercase());
        } else {
            out.push(ch);
        }
    }
    out
}

/// Renders every metric.
pub(crate) fn render(ctrl: &Controller, traffic: &Traffic) -> String {
    let m = ctrl.metrics();
    let s = ctrl.stats();
    let node = ctrl.node().0;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# HELP fractos_ops_total Operations received from local processes."
    );
    let _ = writeln!(o, "# TYPE fractos_ops_total counter");
    for k in OpKind::ALL {
        let _ = writeln!(
            o,
            "fractos_ops_total{{node=\"{node}\",op=\"{}\"}} {}",
            k.name(),
            m.ops[k as usize]
        );
    }
    let _ = writeln!(
        o,
        "# HELP fractos_errors_total Errors returned to local processes."
    );
    let _ = writeln!(o, "# TYPE fractos_errors_total counter");
    for e in ErrorCode::ALL {
        let _ = writeln!(
            o,
            "fractos_errors_total{{node=\"{node}\",code=\"{}\"}} {}",
            error_label(e),
            m.errors[e as usize]
        );
    }
    let _ = writeln!(
        o,
        "# HELP fractos_bytes_copied_total Bytes moved by copies into and out of local processes."
    );
    let _ = writeln!(o, "# TYPE fractos_bytes_copied_total counter");
    let _ = writeln!(
        o,
        "fractos_bytes_copied_total{{node=\"{node}\",direction=\"in\"}} {}",
        m.bytes_copied_in
    );
    let _ = writeln!(
        o,
        "fractos_bytes_copied_total{{node=\"{node}\",direction=\"out\"}} {}",
        m.bytes_copied_out
    );
    let _ = writeln!(o, "# TYPE fractos_invocations_delivered_total counter");
    let _ = writeln!(
        o,
        "fractos_invocations_delivered_total{{node=\"{node}\"}} {}",
        m.invocations_delivered
    );
    let _ = writeln!(o, "# TYPE fractos_processes_kicked_total counter");
    let _ = writeln!(
        o,
        "fractos_processes_kicked_total{{node=\"{node}\"}} {}",
        m.processes_kicked
    );
    let gauges = [
        (
            "fractos_processes_attached",
            "Processes attached.",
            s.processes,
        ),
        (
            "fractos_caps_held",
            "Handles held by local processes.",
            s.handles,
        ),
        ("fractos_cap_nodes", "Capability nodes owned here.", s.caps),
        ("fractos_objects", "Objects owned here.", s.objects),
        ("fractos_names", "Names homed here.", s.names),
        (
            "fractos_peers_connected",
            "Authenticated peer controllers.",
            s.peers,
        ),
        (
            "fractos_pending_ops",
            "Operations in flight.",
            s.pending_ops,
        ),
        (
            "fractos_copies_active",
            "Copies being sent or received.",
            s.copy_sources + s.copy_sinks,
        ),
    ];
    for (name, help, v) in gauges {
        let _ = writeln!(
            o,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{node=\"{node}\"}} {v}"
        );
    }
    let _ = writeln!(
        o,
        "# HELP fractos_traffic_bytes_total Bytes on the wire by link kind."
    );
    let _ = writeln!(o, "# TYPE fractos_traffic_bytes_total counter");
    let _ = writeln!(o, "# TYPE fractos_traffic_frames_total counter");
    let p = &traffic.processes;
    for (dir, b, f) in [
        ("in", p.bytes_in, p.frames_in),
        ("out", p.bytes_out, p.frames_out),
    ] {
        let _ = writeln!(o, "fractos_traffic_bytes_total{{node=\"{node}\",link=\"process\",direction=\"{dir}\"}} {b}");
        let _ = writeln!(o, "fractos_traffic_frames_total{{node=\"{node}\",link=\"process\",direction=\"{dir}\"}} {f}");
    }
    for (peer, t) in &traffic.peers {
        for (dir, b, f) in [
            ("in", t.bytes_in, t.frames_in),
            ("out", t.bytes_out, t.frames_out),
        ] {
            let _ = writeln!(o, "fractos_traffic_bytes_total{{node=\"{node}\",link=\"peer\",peer=\"{peer}\",direction=\"{dir}\"}} {b}");
            let _ = writeln!(o, "fractos_traffic_frames_total{{node=\"{node}\",link=\"peer\",peer=\"{peer}\",direction=\"{dir}\"}} {f}");
        }
    }
    let _ = writeln!(o, "# HELP fractos_op_latency_seconds Operation latency inside the controller (arrival to answer).");
    let _ = writeln!(o, "# TYPE fractos_op_latency_seconds histogram");
    let mut cumulative = 0u64;
    for (i, c) in m.latency_us_buckets.iter().enumerate() {
        cumulative += c;
        if i + 1 < LATENCY_BUCKETS {
            let le = (1u64 << i) as f64 / 1e6;
            let _ = writeln!(
                o,
                "fractos_op_latency_seconds_bucket{{node=\"{node}\",le=\"{le}\"}} {cumulative}"
            );
        }
    }
    let _ = writeln!(
        o,
        "fractos_op_latency_seconds_bucket{{node=\"{node}\",le=\"+Inf\"}} {cumulative}"
    );
    let _ = writeln!(
        o,
        "fractos_op_latency_seconds_sum{{node=\"{node}\"}} {}",
        m.latency_us_sum as f64 / 1e6
    );
    let _ = writeln!(
        o,
        "fractos_op_latency_seconds_count{{node=\"{node}\"}} {cumulative}"
    );
    o
}

/// Serves `GET /metrics` (any other path: 404).
pub(crate) async fn serve(l: TcpListener, events: mpsc::Sender<Event>) {
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        let events = events.clone();
        tokio::spawn(async move {
            let mut req = [0u8; 1024];
            let mut n = 0;
            while n < req.len() && !req[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut req[n..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => n += k,
                }
            }
            let ok = req[..n].starts_with(b"GET /metrics ");
            let (status, body) = if ok {
                let (tx, rx) = oneshot::channel();
                if events.send(Event::Metrics(tx)).await.is_err() {
                    return;
                }
                match rx.await {
                    Ok(b) => ("200 OK", b),
                    Err(_) => return,
                }
            } else {
                ("404 Not Found", "try GET /metrics\n".to_string())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(body.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}
