//! The hosted FractOS controller: the shared node driver
//! ([`fractos_node::Node`], which owns the sans-IO
//! [`fractos_core::Controller`]) over real TCP sockets on Linux with tokio.
//!
//! One task owns the node and is the only place state changes; per-socket
//! reader tasks feed it byte chunks through a bounded queue (so a flooding
//! peer meets TCP backpressure), writers send what it emits. Timers come
//! from the node's `poll_timeout`. Framing, output queues, the attach and
//! metrics timeouts, connection limits, dialing policy, traffic and the
//! `/metrics` responder are the node driver's, exactly as on the appliance.
//!
//! * process channels: TCP on `process_listen`;
//! * peer controllers: TCP on `peer_listen`; the controller with the lower
//!   node id dials, the other accepts; dropped links are re-dialled with
//!   backoff;
//! * metrics: Prometheus text format over HTTP on `metrics_listen`
//!   (`GET /metrics`);
//! * traffic accounting per link and per process channel
//!   ([`Running::traffic`]).
//!
//! [`spawn`] runs a controller on its own thread (tests, the embedded demo);
//! [`run`] runs it on the caller's tokio runtime until a shutdown future
//! resolves (the `fractos controller` command).
#![forbid(unsafe_code)]

mod config;
mod driver;
mod local;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use config::{key_hex, parse_key, parse_peer_security, FileConfig, FilePeer};
pub use driver::{run, spawn, Running};
use fractos_core::{Limits, PeerSecurity};
pub use fractos_core::{LinkTraffic, Traffic};
pub use fractos_node::{METRICS_PORT, PEER_PORT, PROCESS_PORT};
use fractos_wire::NodeId;
pub use local::{MAX_LOCAL_REGIONS, MAX_PENDING_LOCAL, MAX_REGIONS};

/// Configuration of a hosted controller.
#[derive(Clone, Debug)]
pub struct HostedConfig {
    /// This controller's cluster-unique id.
    pub node: NodeId,
    /// Shared cluster secret (peers' authentication, process tokens).
    pub cluster_key: [u8; 32],
    /// Where processes connect (port 0: any free port).
    pub process_listen: SocketAddr,
    /// Where peer controllers connect.
    pub peer_listen: SocketAddr,
    /// Where `GET /metrics` is served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Peer controllers and their peer addresses.
    pub peers: Vec<(NodeId, SocketAddr)>,
    /// Every controller of the cluster (homes of names). Empty: this node
    /// plus `peers`.
    pub members: Vec<NodeId>,
    /// Resource limits.
    pub limits: Limits,
    /// How long a request to a peer may stay unanswered.
    pub op_timeout: Duration,
    /// Heartbeat interval on peer links.
    pub heartbeat_interval: Duration,
    /// Silence after which a peer is declared lost.
    pub peer_timeout: Duration,
    /// Bytes per copy chunk.
    pub copy_chunk: usize,
    /// Copy chunks in flight per copy.
    pub copy_window: usize,
    /// Bytes queued towards one socket before it is considered stuck and
    /// closed.
    pub max_queued_bytes: usize,
    /// Protection required on peer links: `Authenticated` (every frame
    /// MAC'd) or `Secure` (also encrypted).
    pub peer_security: PeerSecurity,
    /// Time a new process connection has to send its first frame (its
    /// `Attach`) before it is closed and its slot freed.
    pub attach_timeout: Duration,
    /// `/metrics` connections served at once; further ones are closed at
    /// once.
    pub max_metrics_conns: usize,
    /// Time a `/metrics` connection has to send its request and take the
    /// answer before it is dropped.
    pub metrics_timeout: Duration,
    /// The Unix socket local processes attach through (shared-memory
    /// rings and directly reached memory), if any.
    pub local_socket: Option<PathBuf>,
    /// Permission bits of the local socket (who may attach). Default
    /// `0o660`.
    pub local_socket_mode: u32,
    /// Owner and group of the local socket (`None`: leave as created).
    pub local_socket_owner: Option<(Option<u32>, Option<u32>)>,
    /// How long the controller polls its local rings before it sleeps on
    /// their eventfds (see the README for the measurement behind the
    /// default).
    pub local_spin: Duration,
    /// Gossip membership and links on demand (`None`: a link to every
    /// peer, kept up with heartbeats). See [`fractos_core::Gossip`].
    pub gossip: Option<fractos_core::Gossip>,
}

impl HostedConfig {
    /// Defaults for a single local controller on loopback with ephemeral
    /// ports.
    pub fn local(node: NodeId, cluster_key: [u8; 32]) -> Self {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
        let defaults = fractos_core::Config::new(node, 0, cluster_key);
        HostedConfig {
            node,
            cluster_key,
            process_listen: any,
            peer_listen: any,
            metrics_listen: None,
            peers: Vec::new(),
            members: Vec::new(),
            limits: Limits::default(),
            op_timeout: defaults.op_timeout,
            heartbeat_interval: defaults.heartbeat_interval,
            peer_timeout: defaults.peer_timeout,
            copy_chunk: defaults.copy_chunk,
            copy_window: defaults.copy_window,
            max_queued_bytes: 64 << 20,
            peer_security: PeerSecurity::Authenticated,
            attach_timeout: Duration::from_secs(10),
            max_metrics_conns: 4,
            metrics_timeout: Duration::from_secs(5),
            local_socket: None,
            local_socket_mode: 0o660,
            local_socket_owner: None,
            local_spin: DEFAULT_LOCAL_SPIN,
            gossip: None,
        }
    }
}

/// Default of [`HostedConfig::local_spin`].
pub const DEFAULT_LOCAL_SPIN: Duration = Duration::ZERO;

/// Errors of the hosted controller.
#[derive(Debug, thiserror::Error)]
pub enum HostedError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}; pick a free address or port")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The local socket could not be set up.
    #[error("cannot listen on local socket {}: {source}", path.display())]
    BindLocal {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The tokio runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// The configuration file is unreadable or invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The controller task is gone.
    #[error("the controller has stopped")]
    Stopped,
    /// Peers did not link in time.
    #[error("only {linked} of {wanted} peer controllers linked in time; check their addresses and cluster key")]
    NotLinked {
        /// Peers linked.
        linked: usize,
        /// Peers waited for.
        wanted: usize,
    },
}
