//! `fractos controller`: runs a hosted controller until Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use fractos_core::Limits;
use fractos_hosted::{FileConfig, HostedConfig};
use fractos_wire::NodeId;

/// Where the cluster key comes from.
#[derive(Debug, Args)]
pub struct KeyArgs {
    /// Cluster key as 64 hex digits. Any local user can read it from the
    /// process list: prefer --key-file on shared hosts.
    #[arg(long, conflicts_with = "key_file")]
    pub key: Option<String>,
    /// File holding the cluster key as 64 hex digits.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
}

impl KeyArgs {
    /// The 32-byte key.
    pub fn load(&self) -> anyhow::Result<[u8; 32]> {
        let hex = match (&self.key, &self.key_file) {
            (Some(k), _) => {
                eprintln!(
                    "warning: --key puts the cluster key in the process list, readable by any local user; use --key-file PATH (a 0600 file) instead"
                );
                k.clone()
            }
            (None, Some(f)) => std::fs::read_to_string(f)
                .with_context(|| format!("cannot read {}", f.display()))?,
            (None, None) => {
                bail!("give the cluster key with --key HEX or --key-file PATH (64 hex digits)")
            }
        };
        Ok(fractos_hosted::parse_key(&hex)?)
    }
}

/// A `NODE=HOST:PORT` peer.
#[derive(Clone, Debug)]
pub struct PeerArg(pub NodeId, pub SocketAddr);

impl std::str::FromStr for PeerArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (n, a) = s
            .split_once('=')
            .ok_or("expected NODE=HOST:PORT, e.g. 2=10.0.0.2:7101")?;
        let node = n.parse().map_err(|_| format!("bad node id {n:?}"))?;
        let addr = a.parse().map_err(|_| format!("bad address {a:?}"))?;
        Ok(PeerArg(NodeId(node), addr))
    }
}

/// Options of `fractos controller`.
#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// TOML configuration file (see the hosted controller's docs); flags
    /// below are then not allowed.
    #[arg(long, conflicts_with_all = ["node", "key", "key_file", "peer"])]
    pub config: Option<PathBuf>,
    /// This controller's node id.
    #[arg(long)]
    pub node: Option<u32>,
    #[command(flatten)]
    pub key: KeyArgs,
    /// Where processes connect.
    #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], fractos_hosted::PROCESS_PORT)))]
    pub listen: SocketAddr,
    /// Where peer controllers connect.
    #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], fractos_hosted::PEER_PORT)))]
    pub peer_listen: SocketAddr,
    /// Prometheus metrics address (GET /metrics).
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// A peer controller, NODE=HOST:PORT (repeatable).
    #[arg(long)]
    pub peer: Vec<PeerArg>,
    /// Handles one process may hold.
    #[arg(long)]
    pub max_caps_per_process: Option<usize>,
    /// Operations one process may have in flight.
    #[arg(long)]
    pub max_pending_per_process: Option<usize>,
    /// Protection of peer links after the handshake: `authenticated`
    /// (every frame MAC'd) or `secure` (also encrypted).
    #[arg(long, default_value = "authenticated", value_parser = parse_security)]
    pub peer_security: fractos_core::PeerSecurity,
    /// A Unix socket where processes of this host attach through a local
    /// channel (shared-memory rings, memory the controller maps):
    /// `Process::attach_local(PATH, ..)`. Also with `--config`.
    #[arg(long)]
    pub local_socket: Option<PathBuf>,
    /// Permission bits of the local socket, octal (who may attach).
    #[arg(long, default_value = "660", value_parser = parse_mode)]
    pub local_socket_mode: u32,
    /// Owner of the local socket, `UID` or `UID:GID` (numeric).
    #[arg(long, value_parser = parse_owner)]
    pub local_socket_owner: Option<(Option<u32>, Option<u32>)>,
    /// Microseconds the controller polls its local rings before it sleeps.
    #[arg(long)]
    pub local_spin_us: Option<u64>,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `fractos_hosted=debug`.
    #[arg(long, default_value = "info")]
    pub log: String,
    /// Log line format on stderr: `text` for people, `json` (one object
    /// per line, with timestamp, level, target and fields) for log
    /// collectors.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("bad mode {s:?}: give octal permission bits, e.g. 660"))
}

fn parse_owner(s: &str) -> Result<(Option<u32>, Option<u32>), String> {
    let num = |v: &str| {
        v.parse::<u32>()
            .map_err(|_| format!("bad owner {s:?}: give UID or UID:GID (numeric)"))
    };
    match s.split_once(':') {
        Some((u, g)) => Ok(((!u.is_empty()).then(|| num(u)).transpose()?, Some(num(g)?))),
        None => Ok((Some(num(s)?), None)),
    }
}

fn parse_security(s: &str) -> Result<fractos_core::PeerSecurity, String> {
    fractos_hosted::parse_peer_security(s).map_err(|e| e.to_string())
}

/// Runs `fractos controller`.
pub fn run(a: ControllerArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&a.log).context("bad --log filter")?;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if a.log_format == "json" {
        logs.json().init();
    } else {
        logs.init();
    }
    let cfg = match &a.config {
        Some(path) => FileConfig::load(path)?.into_config()?,
        None => {
            let node = a.node.context("give --node ID (or --config FILE)")?;
            let mut c = HostedConfig::local(NodeId(node), a.key.load()?);
            c.process_listen = a.listen;
            c.peer_listen = a.peer_listen;
            c.metrics_listen = a.metrics;
            c.peers = a.peer.iter().map(|p| (p.0, p.1)).collect();
            c.peer_security = a.peer_security;
            let d = Limits::default();
            c.limits.max_caps_per_process =
                a.max_caps_per_process.unwrap_or(d.max_caps_per_process);
            c.limits.max_pending_per_process = a
                .max_pending_per_process
                .unwrap_or(d.max_pending_per_process);
            c
        }
    };
    let mut cfg = cfg;
    if a.local_socket.is_some() {
        cfg.local_socket = a.local_socket.clone();
    }
    cfg.local_socket_mode = a.local_socket_mode;
    cfg.local_socket_owner = a.local_socket_owner;
    if let Some(us) = a.local_spin_us {
        cfg.local_spin = std::time::Duration::from_micros(us);
    }
    raise_open_files_limit();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(fractos_hosted::run(cfg, async {
        let _ = tokio::signal::ctrl_c().await;
    }))?;
    Ok(())
}

/// Raises this process's soft limit on open files to its hard limit: every
/// process, peer and local connection costs the controller a descriptor
/// (and a local hello up to four more while it is read), and the usual
/// soft limit of 1024 would otherwise be the first thing connection
/// floods exhaust. Best effort: a limit that cannot be raised stays.
fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        l.current = l.maximum;
        let _ = setrlimit(Resource::Nofile, l);
    }
}
