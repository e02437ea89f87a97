//! The pipeline demo: an embedded 3-node cluster (storage, compute, client
//! nodes, each a hosted controller with its adaptor) running the same
//! verifications in the three modes and reporting what crossed node
//! boundaries and how long it took.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use std::net::SocketAddr;

use fractos_core::{process_token, LinkTraffic};
use fractos_hosted::{spawn, HostedConfig, Running};
use fractos_sdk::wire::NodeId;
use fractos_sdk::{AttachOptions, Process};

use crate::compute::{CpuBackend, VerifyBackend};
use crate::image::{encoded_len, synth_face, Image};
use crate::netns::{Netns, NetnsError};
use crate::pipeline::{serve_compute, serve_storage, Client, Verdict};
use crate::storage::BlockStore;
use crate::PipelineError;

/// What to run.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// Verifications per mode.
    pub requests: usize,
    /// Image side in pixels (an image is `side²` bytes + 12).
    pub image_side: usize,
    /// Distinct images in the store (requests cycle through them).
    pub images: usize,
    /// Unmeasured verifications per mode first.
    pub warmup: usize,
    /// Consecutive requests of one mode before the next mode runs: the
    /// modes alternate in rounds of `block` requests (each round starts
    /// with a different mode), so load drift falls on all of them alike.
    pub block: usize,
    /// Pixel sampling stride of the compute kernel (see
    /// [`CpuBackend::stride`]).
    pub stride: usize,
    /// Where the storage stage lives: `None` runs the reference storage
    /// adaptor (a file-backed block store) on the first node; `Some(name)`
    /// uses a storage service already serving the read protocol under
    /// [`crate::pipeline::names::STORAGE_READ`] — the appliance's NVMe —
    /// and loads the images through the write Request published as `name`
    /// (see `kernel/src/storage.rs`).
    pub storage_write: Option<String>,
    /// For tests of the demo's own checks: store every image with its
    /// first byte flipped, as a faulty storage device would (reference
    /// storage adaptor only). Every verification must then fail.
    pub corrupt_stored_images: bool,
    /// How the adaptors attach to embedded hosted controllers: through
    /// their local sockets (shared-memory rings, memory the controller
    /// reaches directly; the default) or over TCP. Remote controllers are
    /// always reached over TCP.
    pub transport: DemoTransport,
}

/// How demo processes attach to an embedded hosted controller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DemoTransport {
    /// Local channels (`Process::attach_local`).
    #[default]
    Local,
    /// TCP (`Process::attach`), the old path, for comparison.
    Tcp,
}

impl std::str::FromStr for DemoTransport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" | "shm" | "slot" => Ok(DemoTransport::Local),
            "tcp" => Ok(DemoTransport::Tcp),
            _ => Err(format!(
                "unknown transport {s:?}: local (alias shm, slot) or tcp"
            )),
        }
    }
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            requests: 50,
            image_side: 512,
            images: 8,
            warmup: 3,
            block: 5,
            stride: 4,
            storage_write: None,
            corrupt_stored_images: false,
            transport: DemoTransport::Local,
        }
    }
}

/// Figures of one mode.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModeReport {
    /// Bytes sent between controllers (each frame counted once).
    pub inter_node_bytes: u64,
    /// Frames sent between controllers.
    pub inter_node_messages: u64,
    /// Median latency.
    pub latency_p50_us: f64,
    /// 99th percentile latency.
    pub latency_p99_us: f64,
    /// Every request's latency in microseconds, sorted (for distributions).
    pub latencies_us: Vec<f64>,
    /// Scores, in request order.
    pub scores: Vec<f32>,
    /// Requests whose score was not the expected result of its image pair
    /// (see [`Expected`]), in request order.
    pub failures: Vec<Failure>,
}

/// A verification whose score was not the expected result.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    /// Request index (0-based, in the mode's order).
    pub request: usize,
    /// Image index in the store.
    pub image: usize,
    /// The score the pipeline returned.
    pub got: f32,
    /// What was expected.
    pub expected: Expected,
}

/// The expected result of one known image pair (the enrolled face against
/// a stored image), computed locally by the demo with the same kernel.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Expected {
    /// The stored image shows the enrolled person.
    pub same_face: bool,
    /// The kernel's score of the pair computed here.
    pub score: f32,
}

/// Largest difference allowed between a pipeline score and the local one
/// (the same deterministic kernel over the same bytes: they are equal
/// unless bytes were lost or corrupted).
pub const SCORE_TOLERANCE: f32 = 1e-4;

/// The verdict rule of the demo over its known image pairs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verification {
    /// Expected result of each stored image.
    pub expected: Vec<Expected>,
    /// Score separating same-face pairs (above) from different-face pairs
    /// (below): the midpoint between the lowest same-face and the highest
    /// different-face reference score. `None` when the kernel at this
    /// stride and image size does not separate the demo's identities.
    pub threshold: Option<f32>,
}

impl Verification {
    /// The rule for `expected`.
    pub fn new(expected: Vec<Expected>) -> Verification {
        let same = expected
            .iter()
            .filter(|e| e.same_face)
            .map(|e| e.score)
            .fold(f32::INFINITY, f32::min);
        let other = expected
            .iter()
            .filter(|e| !e.same_face)
            .map(|e| e.score)
            .fold(f32::NEG_INFINITY, f32::max);
        let threshold =
            (same > other && same.is_finite() && other.is_finite()).then(|| (same + other) / 2.0);
        Verification {
            expected,
            threshold,
        }
    }

    /// Whether `score` is the right result for stored image `image`: a
    /// finite number equal (within [`SCORE_TOLERANCE`]) to the reference,
    /// on the right side of the threshold if there is one.
    pub fn accepts(&self, image: usize, score: f32) -> bool {
        let Some(e) = self.expected.get(image) else {
            return false;
        };
        if !score.is_finite() || (score - e.score).abs() > SCORE_TOLERANCE {
            return false;
        }
        match self.threshold {
            Some(t) => (score > t) == e.same_face,
            None => true,
        }
    }
}

/// Figures of the whole demo.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DemoReport {
    /// FractOS mode.
    pub fractos: ModeReport,
    /// Centralised mode.
    pub centralized: ModeReport,
    /// Remote-device API mode.
    pub remote_api: ModeReport,
    /// Requests per mode.
    pub requests: usize,
    /// Bytes per image.
    pub image_bytes: usize,
    /// The network between the nodes: `None` for loopback.
    pub link_model: Option<crate::netns::AppliedModel>,
    /// What the controllers were: `"hosted"` (embedded) or `"remote"`
    /// (reached over TCP, e.g. appliance VMs).
    pub controllers: &'static str,
    /// Pixel sampling stride per axis of the compute kernel (1 in
    /// `stride²` pixels is sampled).
    pub stride: usize,
    /// Alternating rounds the modes ran in.
    pub rounds: usize,
    /// The verdict rule the scores were checked against.
    pub verification: Verification,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

impl DemoReport {
    /// Centralised ÷ FractOS inter-node bytes.
    pub fn traffic_ratio(&self) -> f64 {
        ratio(
            self.centralized.inter_node_bytes as f64,
            self.fractos.inter_node_bytes as f64,
        )
    }
    /// Centralised ÷ FractOS median latency.
    pub fn latency_ratio(&self) -> f64 {
        ratio(self.centralized.latency_p50_us, self.fractos.latency_p50_us)
    }
    /// Remote API ÷ FractOS median latency.
    pub fn remote_api_latency_ratio(&self) -> f64 {
        ratio(self.remote_api.latency_p50_us, self.fractos.latency_p50_us)
    }
    /// Remote API ÷ FractOS inter-node messages.
    pub fn remote_api_message_ratio(&self) -> f64 {
        ratio(
            self.remote_api.inter_node_messages as f64,
            self.fractos.inter_node_messages as f64,
        )
    }

    /// Verifications whose score was wrong, all modes.
    pub fn failures(&self) -> usize {
        self.fractos.failures.len()
            + self.centralized.failures.len()
            + self.remote_api.failures.len()
    }

    /// `Err` naming the first wrong score's mode and request if any score
    /// was not the expected result.
    pub fn check(&self) -> Result<(), DemoError> {
        for (mode, m) in [
            ("fractos", &self.fractos),
            ("centralized", &self.centralized),
            ("remote-api", &self.remote_api),
        ] {
            if let Some(f) = m.failures.first() {
                return Err(DemoError::WrongScore {
                    mode,
                    request: f.request,
                    image: f.image,
                    got: f.got,
                    want: f.expected.score,
                    face: if f.expected.same_face {
                        "the enrolled face"
                    } else {
                        "a different face"
                    },
                    failures: self.failures(),
                    total: 3 * self.requests,
                });
            }
        }
        Ok(())
    }

    /// The machine-readable report.
    pub fn to_json(&self) -> String {
        let mode = |m: &ModeReport| {
            let latencies: Vec<String> = m.latencies_us.iter().map(|l| format!("{l:.1}")).collect();
            format!(
                "{{\"inter_node_bytes\": {}, \"inter_node_messages\": {}, \"latency_p50_us\": {:.1}, \"latency_p99_us\": {:.1}, \"failures\": {}, \"latencies_us\": [{}]}}",
                m.inter_node_bytes, m.inter_node_messages, m.latency_p50_us, m.latency_p99_us, m.failures.len(), latencies.join(", ")
            )
        };
        let threshold = match self.verification.threshold {
            Some(t) => format!("{t:.4}"),
            None => "null".into(),
        };
        format!(
            "{{\n  \"requests\": {},\n  \"image_bytes\": {},\n  \"stride\": {},\n  \"pixels_sampled\": \"1 in {}\",\n  \"rounds\": {},\n  \"failures\": {},\n  \"identity_threshold\": {threshold},\n  \"controllers\": \"{}\",\n  \"link_model\": {},\n  \"fractos\": {},\n  \"centralized\": {},\n  \"remote_api\": {},\n  \"traffic_ratio\": {:.3},\n  \"latency_ratio\": {:.3},\n  \"remote_api_latency_ratio\": {:.3},\n  \"remote_api_message_ratio\": {:.3}\n}}\n",
            self.requests,
            self.image_bytes,
            self.stride,
            self.stride * self.stride,
            self.rounds,
            self.failures(),
            self.controllers,
            match self.link_model {
                None if self.controllers == "remote" => "\"remote\"".to_string(),
                None => "\"loopback\"".to_string(),
                Some(m) => format!(
                    "{{\"delay_us\": {}, \"rate_mbit\": {}, \"netem\": {}}}",
                    m.delay_us, m.rate_mbit, m.netem
                ),
            },
            mode(&self.fractos),
            mode(&self.centralized),
            mode(&self.remote_api),
            self.traffic_ratio(),
            self.latency_ratio(),
            self.remote_api_latency_ratio(),
            self.remote_api_message_ratio(),
        )
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let net = match self.link_model {
            None if self.controllers == "remote" => "remote controllers".to_string(),
            None => "loopback".to_string(),
            Some(m) if m.netem => format!(
                "namespaces, {} us + {} Mbit/s per hop",
                m.delay_us, m.rate_mbit
            ),
            Some(m) => format!(
                "namespaces, {} Mbit/s per hop (no sch_netem: no added delay)",
                m.rate_mbit
            ),
        };
        let _ = writeln!(
            t,
            "{} verifications per mode in {} alternating rounds, {} KiB images, {net}",
            self.requests,
            self.rounds,
            self.image_bytes / 1024
        );
        let _ = writeln!(
            t,
            "compute kernel: stride {} (samples 1 pixel in {}){}\n",
            self.stride,
            self.stride * self.stride,
            if self.stride == 1 {
                ""
            } else {
                "; --stride 1 runs the full kernel"
            }
        );
        let _ = writeln!(
            t,
            "{:<12} {:>16} {:>12} {:>12} {:>12} {:>9}",
            "mode", "inter-node bytes", "messages", "p50 (us)", "p99 (us)", "wrong"
        );
        for (name, m) in [
            ("fractos", &self.fractos),
            ("centralized", &self.centralized),
            ("remote-api", &self.remote_api),
        ] {
            let _ = writeln!(
                t,
                "{:<12} {:>16} {:>12} {:>12.0} {:>12.0} {:>9}",
                name,
                m.inter_node_bytes,
                m.inter_node_messages,
                m.latency_p50_us,
                m.latency_p99_us,
                m.failures.len()
            );
        }
        let _ = writeln!(
            t,
            "\ncentralized / fractos: bytes x{:.2}, p50 latency x{:.2}",
            self.traffic_ratio(),
            self.latency_ratio()
        );
        let _ = writeln!(
            t,
            "remote-api  / fractos: messages x{:.2}, p50 latency x{:.2}",
            self.remote_api_message_ratio(),
            self.remote_api_latency_ratio()
        );
        if self.verification.threshold.is_none() {
            let _ = writeln!(
                t,
                "note: at stride {} the kernel does not separate the demo's faces; scores were checked against the reference scores only",
                self.stride
            );
        }
        t
    }
}

/// Errors of the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A controller failed to start.
    #[error("controller: {0}")]
    Hosted(#[from] fractos_hosted::HostedError),
    /// The pipeline failed.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// Network namespaces could not be set up.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A verification returned a wrong score: a correctness failure.
    #[error("{mode} request {request} (image {image}, {face}) scored {got} but {want} was expected; {failures} of {total} verifications failed")]
    WrongScore {
        /// Mode.
        mode: &'static str,
        /// Request index within the mode.
        request: usize,
        /// Stored image.
        image: usize,
        /// Its score.
        got: f32,
        /// Expected score.
        want: f32,
        /// What the image shows.
        face: &'static str,
        /// Wrong verifications, all modes.
        failures: usize,
        /// Verifications, all modes.
        total: usize,
    },
    /// Setup I/O failed.
    #[error("demo storage: {0}")]
    Storage(#[from] crate::StorageError),
    /// A controller did not link to its peers in time.
    #[error("the controller with metrics at {addr} linked {linked} of {peers} peers in time; check its serial log")]
    NotLinked {
        /// Its metrics endpoint (an embedded controller: its peer address).
        addr: SocketAddr,
        /// Peers linked.
        linked: usize,
        /// Peers expected.
        peers: usize,
    },
    /// A remote controller's metrics endpoint could not be read.
    #[error(
        "reading metrics from {addr}: {source}; is the controller running with a metrics port?"
    )]
    Metrics {
        /// The endpoint.
        addr: SocketAddr,
        /// What failed.
        source: std::io::Error,
    },
}

/// A controller the demo's processes attach to.
pub enum DemoNode {
    /// An embedded hosted controller.
    Hosted(Running),
    /// A controller reached over TCP (e.g. an appliance VM), whose traffic
    /// counters are read from its Prometheus endpoint.
    Remote {
        /// Where processes attach over TCP.
        process_addr: SocketAddr,
        /// Its `GET /metrics` endpoint.
        metrics_addr: SocketAddr,
        /// The cluster key its process tokens are minted under
        /// ([`DEMO_KEY`] for the clusters the demo boots itself).
        key: [u8; 32],
        /// Its shared-memory slot files (`fractos up --shm-slots`): with
        /// [`DemoTransport::Local`] each process attaches through the first
        /// free one; none: over TCP.
        slots: Vec<std::path::PathBuf>,
    },
}

impl DemoNode {
    /// Where processes attach.
    pub fn process_addr(&self) -> SocketAddr {
        match self {
            DemoNode::Hosted(r) => r.process_addr(),
            DemoNode::Remote { process_addr, .. } => *process_addr,
        }
    }

    /// Attaches a process named `name`. With [`DemoTransport::Local`]:
    /// through the local socket of an embedded controller (demo key), or
    /// the first free shared-memory slot of a remote one (an appliance);
    /// otherwise, and for a remote controller without slots, over TCP. A
    /// remote controller's tokens are minted under its cluster key.
    pub fn attach(&self, name: &str, transport: DemoTransport) -> Result<Process, PipelineError> {
        match self {
            DemoNode::Hosted(r) if transport == DemoTransport::Local => attach_local(r, name),
            DemoNode::Hosted(r) => attach(r, name),
            DemoNode::Remote { slots, key, .. }
                if transport == DemoTransport::Local && !slots.is_empty() =>
            {
                for path in slots {
                    match attach_slot_with_key(path, key, name) {
                        Err(PipelineError::Sdk(fractos_sdk::SdkError::Slot {
                            source: fractos_transport::slot::SlotError::Busy,
                            ..
                        })) => continue,
                        other => return other,
                    }
                }
                Err(PipelineError::Protocol(format!(
                    "every one of the {} shared-memory slots is in use; start the appliance with more (--shm-slots)",
                    slots.len()
                )))
            }
            DemoNode::Remote {
                process_addr, key, ..
            } => attach_with_key(*process_addr, key, name),
        }
    }

    /// Controller-to-controller traffic so far (all peers).
    pub fn peer_traffic(&self) -> Result<LinkTraffic, DemoError> {
        match self {
            DemoNode::Hosted(r) => Ok(r.traffic()?.peer_total()),
            DemoNode::Remote { metrics_addr, .. } => {
                Ok(peer_traffic_from_metrics(&scrape_metrics(*metrics_addr)?))
            }
        }
    }
}

/// Waits until every remote node reports `peers` authenticated peer
/// controllers on its metrics endpoint (embedded nodes are linked when
/// [`start_cluster_in`] returns). Fails after `timeout` with the counts seen.
pub fn wait_linked(nodes: &[DemoNode], peers: usize, timeout: Duration) -> Result<(), DemoError> {
    // A timeout too large for the clock is no deadline.
    let deadline = std::time::Instant::now().checked_add(timeout);
    for n in nodes {
        let DemoNode::Remote { metrics_addr, .. } = n else {
            continue;
        };
        loop {
            let linked = peers_connected(&scrape_metrics(*metrics_addr)?);
            if linked >= peers {
                break;
            }
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return Err(DemoError::NotLinked {
                    addr: *metrics_addr,
                    linked,
                    peers,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

/// Fetches the Prometheus text from `GET http://addr/metrics`.
pub fn scrape_metrics(addr: SocketAddr) -> Result<String, DemoError> {
    scrape_metrics_within(addr, Duration::from_secs(10), Duration::from_secs(20))
}

/// Largest metrics answer [`scrape_metrics_within`] reads.
pub const METRICS_MAX_BYTES: usize = 16 << 20;

/// Longest [`scrape_metrics_within`] waits, whatever it is asked (a day):
/// a deadline further away would overflow the clock (`fractos status
/// --timeout 18446744073709551615`).
pub const METRICS_MAX_WAIT: Duration = Duration::from_secs(86_400);

/// [`scrape_metrics`] giving up after `connect` to connect and `read` for
/// the whole answer (an endpoint that trickles bytes cannot hold the
/// caller), and on answers over [`METRICS_MAX_BYTES`].
pub fn scrape_metrics_within(
    addr: SocketAddr,
    connect: Duration,
    read: Duration,
) -> Result<String, DemoError> {
    use std::io::{Read, Write};
    let err = |source| DemoError::Metrics { addr, source };
    let bad = |what: &str| {
        err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            what.to_string(),
        ))
    };
    let (connect, read) = (connect.min(METRICS_MAX_WAIT), read.min(METRICS_MAX_WAIT));
    let mut s = std::net::TcpStream::connect_timeout(&addr, connect).map_err(err)?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: fractos\r\nConnection: close\r\n\r\n")
        .map_err(err)?;
    let deadline = std::time::Instant::now() + read;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 << 10];
    let late = || {
        err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no complete answer within {read:?}"),
        ))
    };
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(late());
        }
        s.set_read_timeout(Some(left)).map_err(err)?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) if raw.len() + n > METRICS_MAX_BYTES => {
                return Err(bad("answer larger than 16 MiB"));
            }
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A read timeout: Linux reports it as WouldBlock.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(late())
            }
            Err(e) => return Err(err(e)),
        }
    }
    let text = String::from_utf8(raw).map_err(|_| bad("answer is not UTF-8"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no HTTP header end"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(bad(head.lines().next().unwrap_or("empty response")));
    }
    Ok(body.to_string())
}

/// Sums the peer-link lines of `fractos_traffic_{bytes,frames}_total`.
pub fn peer_traffic_from_metrics(text: &str) -> LinkTraffic {
    let mut t = LinkTraffic::default();
    for line in text.lines() {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if !name.contains("link=\"peer\"") {
            continue;
        }
        let Ok(v) = value.parse::<u64>() else {
            continue;
        };
        let out = name.contains("direction=\"out\"");
        match (
            name.starts_with("fractos_traffic_bytes_total{"),
            name.starts_with("fractos_traffic_frames_total{"),
            out,
        ) {
            (true, _, true) => t.bytes_out += v,
            (true, _, false) => t.bytes_in += v,
            (_, true, true) => t.frames_out += v,
            (_, true, false) => t.frames_in += v,
            _ => {}
        }
    }
    t
}

/// The demo's cluster key (the embedded cluster is private to the process).
pub const DEMO_KEY: [u8; 32] = *b"fractos-embedded-demo-cluster-k!";

/// Runs `f` on a thread inside node `i`'s namespace (or right here
/// without namespaces). Sockets and threads created there stay there.
pub fn in_node<T: Send>(
    net: Option<&Netns>,
    i: usize,
    f: impl FnOnce() -> T + Send,
) -> Result<T, NetnsError> {
    match net {
        None => Ok(f()),
        Some(ns) => std::thread::scope(|s| {
            s.spawn(|| {
                ns.enter(i)?;
                Ok(f())
            })
            .join()
            .expect("namespace thread panicked")
        }),
    }
}

/// Starts the embedded 3-controller cluster (storage = node 1, compute =
/// node 2, client = node 3) on loopback, or one controller per namespace.
pub fn start_cluster_in(net: Option<&Netns>) -> Result<Vec<Running>, DemoError> {
    let mut nodes = Vec::new();
    for i in 0..3usize {
        let mut c = HostedConfig::local(NodeId(i as u32 + 1), DEMO_KEY);
        c.members = (1..=3).map(NodeId).collect();
        c.local_socket = Some(crate::bench::socket_path("demo"));
        if let Some(ns) = net {
            c.peer_listen = std::net::SocketAddr::new(ns.addr(i), 0);
        }
        nodes.push(in_node(net, i, move || spawn(c))??);
    }
    for a in &nodes {
        for b in &nodes {
            if a.node() != b.node() {
                a.add_peer(b.node(), b.peer_addr());
            }
        }
    }
    // Links come up asynchronously (dial, three-message handshake): wait
    // for all of them, so the first operation never meets an unlinked peer.
    for n in &nodes {
        n.wait_peers(nodes.len() - 1, Duration::from_secs(30))
            .map_err(|e| {
                DemoError::Pipeline(PipelineError::Protocol(format!("node {}: {e}", n.node().0)))
            })?;
    }
    Ok(nodes)
}

/// The `fractos_peers_connected` gauge of a Prometheus text.
fn peers_connected(text: &str) -> usize {
    text.lines()
        .find(|l| l.starts_with("fractos_peers_connected{"))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0)
}

/// [`start_cluster_in`] on loopback.
pub fn start_cluster() -> Result<Vec<Running>, DemoError> {
    start_cluster_in(None)
}

/// Writes `images` (image `i` at byte `i * slot`) through the storage
/// service's write Request published as `write`, one FractOS copy each,
/// waiting for each `done` (a failure comes back as the `err` Request's
/// status; see `kernel/src/storage.rs`).
pub fn load_images(
    p: &Process,
    write: &str,
    images: &[Vec<u8>],
    slot: u64,
) -> Result<(), PipelineError> {
    const DONE: u64 = 0x4c4f_0001;
    const ERR: u64 = 0x4c4f_0002;
    let wait = Duration::from_secs(60);
    let write = p
        .lookup(write, wait)?
        .as_request()
        .ok_or_else(|| PipelineError::Protocol(format!("{write} is not a Request")))?;
    let done = p.request_create(DONE, &[], &[])?;
    let err = p.request_create(ERR, &[], &[])?;
    for (i, img) in images.iter().enumerate() {
        let region = p.register_vec(img.clone())?;
        let src = p.memory_create(
            &region,
            0,
            img.len() as u64,
            fractos_sdk::wire::Rights::READ,
        )?;
        let mut imms = (i as u64 * slot).to_le_bytes().to_vec();
        imms.extend_from_slice(&(img.len() as u64).to_le_bytes());
        p.invoke(&write, &imms, &[src.into(), done.into(), err.into()])?;
        let inv = p.next_invocation_timeout(wait)?;
        p.drop_cap(src)?;
        p.unregister(&region);
        if inv.tag != DONE {
            return Err(PipelineError::Protocol(format!(
                "loading image {i} into the storage service failed: status {:?}",
                inv.imms
            )));
        }
    }
    Ok(())
}

/// Attaches a process named `name` to `node` with the demo key.
pub fn attach(node: &Running, name: &str) -> Result<Process, PipelineError> {
    attach_to(node.process_addr(), name)
}

/// Attaches a process named `name` to `node` through its local socket
/// (a local channel) with the demo key.
pub fn attach_local(node: &Running, name: &str) -> Result<Process, PipelineError> {
    attach_local_spin(node, name, fractos_sdk::AttachOptions::default().local_spin)
}

/// [`attach_local`] with the reader's spin bound.
pub fn attach_local_spin(
    node: &Running,
    name: &str,
    spin: Duration,
) -> Result<Process, PipelineError> {
    let path = node.local_socket().ok_or_else(|| {
        PipelineError::Protocol(format!("controller {} has no local socket", node.node().0))
    })?;
    let opts = AttachOptions::default()
        .op_timeout(Duration::from_secs(20))
        .local_spin(spin);
    Ok(Process::attach_local(
        path,
        name,
        process_token(&DEMO_KEY, name.as_bytes()),
        opts,
    )?)
}

/// Attaches a process named `name` with the demo key through the
/// shared-memory slot file `path` of an appliance (`fractos up
/// --shm-slots`).
pub fn attach_slot_to(path: &std::path::Path, name: &str) -> Result<Process, PipelineError> {
    attach_slot_with_key(path, &DEMO_KEY, name)
}

/// Attaches a process named `name` through the shared-memory slot file
/// `path` with a token minted under the cluster key `key`.
pub fn attach_slot_with_key(
    path: &std::path::Path,
    key: &[u8; 32],
    name: &str,
) -> Result<Process, PipelineError> {
    let opts = AttachOptions::default()
        .op_timeout(Duration::from_secs(20))
        .connect_timeout(Duration::from_secs(20));
    Ok(Process::attach_slot(
        path,
        name,
        process_token(key, name.as_bytes()),
        opts,
    )?)
}

/// Attaches a process named `name` to the controller at `addr` with the
/// demo key.
pub fn attach_to(addr: SocketAddr, name: &str) -> Result<Process, PipelineError> {
    attach_with_key(addr, &DEMO_KEY, name)
}

/// Attaches a process named `name` to the controller at `addr` with a
/// token minted under the cluster key `key`.
pub fn attach_with_key(
    addr: SocketAddr,
    key: &[u8; 32],
    name: &str,
) -> Result<Process, PipelineError> {
    let opts = AttachOptions::default().op_timeout(Duration::from_secs(20));
    Ok(Process::attach(
        addr,
        name,
        process_token(key, name.as_bytes()),
        opts,
    )?)
}

fn inter_node(nodes: &[DemoNode]) -> Result<(u64, u64), DemoError> {
    let mut bytes = 0;
    let mut frames = 0;
    for n in nodes {
        let t = n.peer_traffic()?;
        bytes += t.bytes_out;
        frames += t.frames_out;
    }
    Ok((bytes, frames))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs the demo on an embedded cluster. `progress` is called after each
/// request with (mode, done, total).
pub fn run(
    cfg: &DemoConfig,
    progress: impl FnMut(&str, usize, usize),
) -> Result<DemoReport, DemoError> {
    run_in(cfg, None, progress)
}

/// Runs the demo with every node in its own network namespace of `net`.
pub fn run_in(
    cfg: &DemoConfig,
    net: Option<&Netns>,
    progress: impl FnMut(&str, usize, usize),
) -> Result<DemoReport, DemoError> {
    let nodes: Vec<DemoNode> = start_cluster_in(net)?
        .into_iter()
        .map(DemoNode::Hosted)
        .collect();
    let report = run_on(cfg, &nodes, net, progress);
    for n in &nodes {
        if let DemoNode::Hosted(r) = n {
            crate::bench::remove_socket_dir(r);
        }
    }
    report
}

/// Runs the demo on three controllers that already form a cluster (the
/// embedded ones with the demo key [`DEMO_KEY`], remote ones with the key
/// each [`DemoNode::Remote`] names): storage on `nodes[0]`, compute on `nodes[1]`,
/// the client on `nodes[2]`. `net` is where the embedded nodes live
/// (processes are attached from inside it), `None` for anything reachable
/// from here.
pub fn run_on(
    cfg: &DemoConfig,
    nodes: &[DemoNode],
    net: Option<&Netns>,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<DemoReport, DemoError> {
    if nodes.len() < 3 {
        return Err(DemoError::Pipeline(PipelineError::Protocol(format!(
            "the demo needs 3 controllers, got {}",
            nodes.len()
        ))));
    }
    let image_bytes = encoded_len(cfg.image_side, cfg.image_side);
    let slot = image_bytes as u64;
    let images: Vec<Vec<u8>> = (0..cfg.images)
        .map(|i| synth_face(person(i), i as u64 + 1, cfg.image_side, cfg.image_side))
        .collect();
    /// Deletes the store file however the run ends.
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    /// Where the storage stage lives.
    enum Stage<'a> {
        /// The reference adaptor over a file-backed store.
        Adaptor(Arc<BlockStore>),
        /// A storage service's write Request to load the images through.
        Service(&'a str),
    }
    let mut _remove_store = None;
    let stage = match &cfg.storage_write {
        Some(write) => Stage::Service(write),
        None => {
            // Unique per run: several demos may run in one process (tests).
            static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let run_id = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!(
                "fractos-demo-store-{}-{run_id}",
                std::process::id()
            ));
            _remove_store = Some(Remove(path.clone()));
            let store = Arc::new(BlockStore::open(&path, slot * cfg.images as u64)?);
            for (i, img) in images.iter().enumerate() {
                let mut img = img.clone();
                if cfg.corrupt_stored_images {
                    img[0] ^= 0xff;
                }
                store.write_at(i as u64 * slot, &img)?;
            }
            Stage::Adaptor(store)
        }
    };
    let backend: Arc<dyn VerifyBackend> = Arc::new(CpuBackend { stride: cfg.stride });
    let enrolled_img = synth_face(1, 0, cfg.image_side, cfg.image_side);
    let enrolled = backend
        .features(&Image::parse(&enrolled_img).map_err(|e| PipelineError::Protocol(e.to_string()))?)
        .map_err(|e| PipelineError::Protocol(e.to_string()))?;
    let verification = Verification::new(
        images
            .iter()
            .enumerate()
            .map(|(i, img)| Expected {
                same_face: person(i) == ENROLLED,
                score: backend.verify(img, &enrolled).unwrap_or(f32::NAN),
            })
            .collect(),
    );

    let storage = in_node(net, 0, || -> Result<Process, PipelineError> {
        match &stage {
            Stage::Adaptor(store) => {
                let p = nodes[0].attach("storage", cfg.transport)?;
                serve_storage(&p, store.clone(), slot)?;
                Ok(p)
            }
            Stage::Service(write) => {
                let p = nodes[0].attach("storage-loader", cfg.transport)?;
                load_images(&p, write, &images, slot)?;
                Ok(p)
            }
        }
    })??;
    let compute = in_node(net, 1, || -> Result<Process, PipelineError> {
        let p = nodes[1].attach("compute", cfg.transport)?;
        serve_compute(&p, backend, enrolled, slot)?;
        Ok(p)
    })??;
    let client = in_node(net, 2, || {
        Client::connect(
            nodes[2].attach("client", cfg.transport)?,
            slot,
            Duration::from_secs(10),
        )
    })??;

    type Mode = fn(&Client, u64, u64) -> Result<Verdict, PipelineError>;
    let modes: [(&'static str, Mode); 3] = [
        ("fractos", Client::verify_fractos),
        ("centralized", Client::verify_centralized),
        ("remote-api", Client::verify_remote_api),
    ];
    for (_, f) in modes {
        for i in 0..cfg.warmup {
            f(&client, (i % cfg.images) as u64 * slot, slot)?;
        }
    }
    let mut reports: [ModeReport; 3] = Default::default();
    let mut lat: [Vec<f64>; 3] = Default::default();
    let plan = schedule(cfg.requests, cfg.block);
    let rounds = plan.iter().map(|b| b.round).max().map_or(0, |r| r + 1);
    for b in &plan {
        let (name, f) = modes[b.mode];
        let (b0, m0) = inter_node(nodes)?;
        for i in b.requests.clone() {
            let image = i % cfg.images;
            let v = f(&client, image as u64 * slot, slot)?;
            lat[b.mode].push(v.latency.as_secs_f64() * 1e6);
            let r = &mut reports[b.mode];
            r.scores.push(v.score);
            if !verification.accepts(image, v.score) {
                r.failures.push(Failure {
                    request: i,
                    image,
                    got: v.score,
                    expected: verification.expected[image],
                });
            }
            progress(name, i + 1, cfg.requests);
        }
        let (b1, m1) = inter_node(nodes)?;
        reports[b.mode].inter_node_bytes += b1 - b0;
        reports[b.mode].inter_node_messages += m1 - m0;
    }
    for (r, l) in reports.iter_mut().zip(lat.iter_mut()) {
        l.sort_by(|a, b| a.total_cmp(b));
        r.latency_p50_us = percentile(l, 0.5);
        r.latency_p99_us = percentile(l, 0.99);
        r.latencies_us = l.clone();
    }
    let [fractos, centralized, remote_api] = reports;
    drop(client);
    drop(compute);
    drop(storage);
    Ok(DemoReport {
        fractos,
        centralized,
        remote_api,
        requests: cfg.requests,
        image_bytes,
        link_model: net.map(|n| n.applied()),
        controllers: if nodes.iter().any(|n| matches!(n, DemoNode::Remote { .. })) {
            "remote"
        } else {
            "hosted"
        },
        stride: cfg.stride,
        rounds,
        verification,
    })
}

/// The enrolled identity.
pub const ENROLLED: u64 = 1;

/// The person shown by stored image `i`: mostly the enrolled person, every
/// fourth a stranger.
pub fn person(i: usize) -> u64 {
    if i % 4 == 3 {
        100 + i as u64
    } else {
        ENROLLED
    }
}

/// One block of the run: `requests` (indices within the mode) of `mode`
/// (0 FractOS, 1 centralised, 2 remote API) in round `round`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// Round number.
    pub round: usize,
    /// Mode index.
    pub mode: usize,
    /// Request indices within the mode.
    pub requests: std::ops::Range<usize>,
}

/// The order the demo runs its modes in: rounds of `block` requests per
/// mode, each round starting with the next mode (0-1-2, 1-2-0, 2-0-1, …),
/// so no mode always runs first or last and slow drift of the machine's
/// load falls on all three.
pub fn schedule(requests: usize, block: usize) -> Vec<Block> {
    let block = block.max(1);
    let mut out = Vec::new();
    let mut round = 0;
    let mut at = 0;
    while at < requests {
        let n = block.min(requests - at);
        for k in 0..3 {
            out.push(Block {
                round,
                mode: (round + k) % 3,
                requests: at..at + n,
            });
        }
        at += n;
        round += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves one connection: reads the request, then runs `answer`.
    fn one_shot(answer: impl FnOnce(std::net::TcpStream) + Send + 'static) -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            use std::io::Read;
            let (mut s, _) = l.accept().unwrap();
            let mut req = [0u8; 256];
            let _ = s.read(&mut req);
            answer(s);
        });
        addr
    }

    #[test]
    fn scrapes_are_bounded_in_time_and_size() {
        use std::io::Write;
        let t = Duration::from_secs(5);
        let ok = one_shot(|mut s| {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\nfractos_objects{node=\"1\"} 3\n");
        });
        assert_eq!(
            scrape_metrics_within(ok, t, t).unwrap(),
            "fractos_objects{node=\"1\"} 3\n"
        );
        // A trickle that would finish after 10 s: the 300 ms budget is for
        // the whole answer, not for each read.
        let slow = one_shot(|mut s| {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n");
            for _ in 0..200 {
                if s.write_all(b"#").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let e = scrape_metrics_within(slow, t, Duration::from_millis(300)).unwrap_err();
        assert!(e.to_string().contains("no complete answer"), "{e}");
        let huge = one_shot(|mut s| {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n");
            let chunk = vec![b'#'; 1 << 20];
            for _ in 0..20 {
                if s.write_all(&chunk).is_err() {
                    return;
                }
            }
        });
        let e = scrape_metrics_within(huge, t, Duration::from_secs(60)).unwrap_err();
        assert!(e.to_string().contains("larger than 16 MiB"), "{e}");
        let refused = one_shot(|mut s| {
            let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\n\r\n");
        });
        let e = scrape_metrics_within(refused, t, t).unwrap_err();
        assert!(e.to_string().contains("404"), "{e}");
        // A wait too long for the clock (`status --timeout u64::MAX`):
        // clamped, no overflow panic.
        let ok = one_shot(|mut s| {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\nx 1\n");
        });
        let forever = Duration::from_secs(u64::MAX);
        assert_eq!(
            scrape_metrics_within(ok, forever, forever).unwrap(),
            "x 1\n"
        );
    }

    #[test]
    fn schedule_interleaves_every_mode_in_every_round() {
        let plan = schedule(12, 5);
        assert_eq!(plan.len(), 9, "{plan:?}");
        for m in 0..3 {
            let reqs: Vec<usize> = plan
                .iter()
                .filter(|b| b.mode == m)
                .flat_map(|b| b.requests.clone())
                .collect();
            assert_eq!(reqs, (0..12).collect::<Vec<_>>(), "mode {m}");
        }
        // After every round all modes have run equally often, and the
        // first mode rotates.
        let firsts: Vec<usize> = plan.chunks(3).map(|r| r[0].mode).collect();
        assert_eq!(firsts, [0, 1, 2]);
        for r in plan.chunks(3) {
            let mut modes: Vec<usize> = r.iter().map(|b| b.mode).collect();
            modes.sort();
            assert_eq!(modes, [0, 1, 2]);
        }
    }

    fn rule() -> Verification {
        Verification::new(vec![
            Expected {
                same_face: true,
                score: 0.9,
            },
            Expected {
                same_face: false,
                score: 0.5,
            },
            Expected {
                same_face: true,
                score: 0.8,
            },
        ])
    }

    #[test]
    fn verdicts_reject_nan_wrong_scores_and_wrong_sides() {
        let v = rule();
        assert_eq!(v.threshold, Some(0.65));
        assert!(v.accepts(0, 0.9) && v.accepts(1, 0.5) && v.accepts(2, 0.8));
        // A failed verification is NaN: never accepted.
        assert!(!(0..3).any(|i| v.accepts(i, f32::NAN)));
        assert!(!v.accepts(0, 0.8), "another pair's score");
        assert!(!v.accepts(3, 0.9), "unknown image");
        // Without separation only the reference score counts.
        let mut flat = rule();
        flat.expected[1].score = 0.85;
        let flat = Verification::new(flat.expected);
        assert_eq!(flat.threshold, None);
        assert!(flat.accepts(1, 0.85) && !flat.accepts(1, f32::NAN));
    }

    #[test]
    fn a_report_with_a_wrong_score_fails_naming_mode_and_request() {
        let mut r = DemoReport {
            requests: 2,
            verification: rule(),
            ..DemoReport::default()
        };
        assert!(r.check().is_ok());
        r.centralized.failures.push(Failure {
            request: 1,
            image: 0,
            got: f32::NAN,
            expected: r.verification.expected[0],
        });
        let e = r.check().unwrap_err().to_string();
        assert!(e.contains("centralized request 1"), "{e}");
        assert!(e.contains("1 of 6"), "{e}");
        assert!(r.to_json().contains("\"failures\": 1"), "{}", r.to_json());
    }
}
