//! The Prometheus text exposition format (version 0.0.4) of a controller's
//! metrics, shared by every driver (the hosted controller serves it over
//! HTTP, the unikernel can serve the same text).

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use core::fmt::Write;

use fractos_wire::ErrorCode;

use crate::{Controller, OpKind, LATENCY_BUCKETS};

/// Bytes and frames that crossed one link or channel, each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkTraffic {
    /// Frames received.
    pub frames_in: u64,
    /// Bytes received (length prefixes included).
    pub bytes_in: u64,
    /// Frames sent.
    pub frames_out: u64,
    /// Bytes sent (length prefixes included).
    pub bytes_out: u64,
}

impl LinkTraffic {
    /// Adds `o`'s counts to these.
    pub fn add(&mut self, o: &LinkTraffic) {
        self.frames_in += o.frames_in;
        self.bytes_in += o.bytes_in;
        self.frames_out += o.frames_out;
        self.bytes_out += o.bytes_out;
    }
}

/// Traffic of a controller, split by kind of link.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Controller↔controller traffic per peer node (all links to it, ever).
    pub peers: BTreeMap<u32, LinkTraffic>,
    /// Process↔controller traffic, all channels together (ever).
    pub processes: LinkTraffic,
}

impl Traffic {
    /// Sum of all controller↔controller traffic.
    pub fn peer_total(&self) -> LinkTraffic {
        let mut t = LinkTraffic::default();
        for l in self.peers.values() {
            t.add(l);
        }
        t
    }
}

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

/// Renders every metric of `ctrl`, and the link traffic `traffic` the
/// driver counted, in the Prometheus text exposition format (version 0.0.4).
pub fn render(ctrl: &Controller, traffic: &Traffic) -> String {
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
    let counters = [
        (
            "fractos_invocations_delivered_total",
            "Invocations delivered to local processes.",
            m.invocations_delivered,
        ),
        (
            "fractos_processes_kicked_total",
            "Process channels closed for misbehaving.",
            m.processes_kicked,
        ),
        (
            "fractos_peer_handshake_failures_total",
            "Peer handshakes refused (by either side).",
            m.peer_handshake_failures,
        ),
        (
            "fractos_peer_integrity_failures_total",
            "Sealed peer frames that failed their integrity check.",
            m.peer_integrity_failures,
        ),
        (
            "fractos_revokes_held_for_copies_total",
            "Revokes that waited for the in-flight bytes of the copies they cut.",
            m.revokes_held_for_copies,
        ),
        (
            "fractos_peer_refs_refused_total",
            "Capabilities a peer named as held for us that were not (refused).",
            m.peer_refs_refused,
        ),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(
            o,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{node=\"{node}\"}} {value}"
        );
    }
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
        (
            "fractos_pending_ops_max_per_process",
            "Most operations in flight for one local process.",
            s.pending_ops_max,
        ),
        (
            "fractos_monitors",
            "Monitor registrations on capabilities owned here.",
            s.monitors,
        ),
        (
            "fractos_monitors_max_per_process",
            "Most monitor registrations here by one process.",
            s.monitors_max_per_watcher,
        ),
        (
            "fractos_name_waiters",
            "Lookups waiting here for names homed here.",
            s.name_waiters,
        ),
        (
            "fractos_waiting_lookups",
            "Waiting lookups of local processes.",
            s.waiting_lookups,
        ),
        (
            "fractos_waiting_lookups_max_per_process",
            "Most waiting lookups of one local process.",
            s.waiting_lookups_max,
        ),
        (
            "fractos_published_names",
            "Names local processes published or are publishing.",
            s.published_names,
        ),
        (
            "fractos_published_names_max_per_process",
            "Most names published by one local process.",
            s.published_names_max,
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
    let _ = writeln!(
        o,
        "# HELP fractos_traffic_frames_total Frames on the wire by link kind."
    );
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
