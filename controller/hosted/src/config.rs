//! The TOML configuration file of `fractos controller --config FILE`.
//!
//! ```toml
//! node = 1
//! cluster_key = "000102…1f"          # 64 hex digits
//! process_listen = "0.0.0.0:7100"    # the ports every controller uses:
//! peer_listen = "0.0.0.0:7101"       # processes 7100, peers 7101, metrics 9100
//! metrics_listen = "127.0.0.1:9100"  # optional
//! op_timeout_ms = 5000               # optional
//! peer_timeout_ms = 3000             # optional
//! max_caps_per_process = 1048576     # optional
//! max_pending_per_process = 4096     # optional
//! max_processes = 1024               # optional
//! peer_security = "authenticated"    # optional: or "secure" (encrypted)
//!
//! [[peer]]
//! node = 2
//! address = "10.0.0.2:7101"
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use fractos_core::PeerSecurity;
use fractos_wire::NodeId;
use serde::Deserialize;

use crate::{HostedConfig, HostedError};

/// A peer entry of the file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePeer {
    /// Peer node id.
    pub node: u32,
    /// Peer's peer-link address.
    pub address: SocketAddr,
}

/// The file's contents.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Node id.
    pub node: u32,
    /// Cluster key, 64 hex digits.
    pub cluster_key: String,
    /// Process listen address.
    pub process_listen: SocketAddr,
    /// Peer listen address.
    pub peer_listen: SocketAddr,
    /// Metrics listen address.
    pub metrics_listen: Option<SocketAddr>,
    /// Peer request timeout.
    pub op_timeout_ms: Option<u64>,
    /// Peer silence timeout.
    pub peer_timeout_ms: Option<u64>,
    /// Limit: handles per process.
    pub max_caps_per_process: Option<usize>,
    /// Limit: operations in flight per process.
    pub max_pending_per_process: Option<usize>,
    /// Limit: attached processes.
    pub max_processes: Option<usize>,
    /// `"authenticated"` (default) or `"secure"`.
    pub peer_security: Option<String>,
    /// Monitors one process may register at this controller's objects.
    pub max_monitors_per_process: Option<usize>,
    /// Names one process may publish.
    pub max_names_per_process: Option<usize>,
    /// Time a new process connection has to send its first frame.
    pub attach_timeout_ms: Option<u64>,
    /// `/metrics` connections served at once.
    pub max_metrics_conns: Option<usize>,
    /// Time a `/metrics` connection may take.
    pub metrics_timeout_ms: Option<u64>,
    /// Peers.
    #[serde(default, rename = "peer")]
    pub peers: Vec<FilePeer>,
}

/// Parses a 64-hex-digit key.
pub fn parse_key(hex: &str) -> Result<[u8; 32], HostedError> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return Err(HostedError::Config(format!(
            "cluster key must be 64 hex digits (32 bytes), got {} characters",
            hex.len()
        )));
    }
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| HostedError::Config("cluster key must be hexadecimal".into()))?;
    }
    Ok(key)
}

/// Parses `authenticated` or `secure`.
pub fn parse_peer_security(s: &str) -> Result<PeerSecurity, HostedError> {
    match s {
        "authenticated" => Ok(PeerSecurity::Authenticated),
        "secure" => Ok(PeerSecurity::Secure),
        other => Err(HostedError::Config(format!(
            "peer security must be \"authenticated\" (frames MAC'd) or \"secure\" (also encrypted), got {other:?}"
        ))),
    }
}

impl FileConfig {
    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Self, HostedError> {
        toml::from_str(text).map_err(|e| HostedError::Config(e.to_string()))
    }

    /// Reads and parses a file.
    pub fn load(path: &std::path::Path) -> Result<Self, HostedError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| HostedError::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text)
    }

    /// The controller configuration this file describes.
    pub fn into_config(self) -> Result<HostedConfig, HostedError> {
        let mut c = HostedConfig::local(NodeId(self.node), parse_key(&self.cluster_key)?);
        c.process_listen = self.process_listen;
        c.peer_listen = self.peer_listen;
        c.metrics_listen = self.metrics_listen;
        c.peers = self
            .peers
            .iter()
            .map(|p| (NodeId(p.node), p.address))
            .collect();
        if let Some(ms) = self.op_timeout_ms {
            c.op_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = self.peer_timeout_ms {
            c.peer_timeout = Duration::from_millis(ms);
        }
        if let Some(v) = self.max_caps_per_process {
            c.limits.max_caps_per_process = v;
        }
        if let Some(v) = self.max_pending_per_process {
            c.limits.max_pending_per_process = v;
        }
        if let Some(v) = self.max_processes {
            c.limits.max_processes = v;
        }
        if let Some(v) = &self.peer_security {
            c.peer_security = parse_peer_security(v)?;
        }
        if let Some(v) = self.max_monitors_per_process {
            c.limits.max_monitors_per_process = v;
        }
        if let Some(v) = self.max_names_per_process {
            c.limits.max_names_per_process = v;
        }
        if let Some(ms) = self.attach_timeout_ms {
            c.attach_timeout = Duration::from_millis(ms);
        }
        if let Some(v) = self.max_metrics_conns {
            c.max_metrics_conns = v;
        }
        if let Some(ms) = self.metrics_timeout_ms {
            c.metrics_timeout = Duration::from_millis(ms);
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_file() {
        let text = r#"
            node = 2
            cluster_key = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
            process_listen = "127.0.0.1:7000"
            peer_listen = "127.0.0.1:7100"
            op_timeout_ms = 100
            [[peer]]
            node = 1
            address = "127.0.0.1:7101"
        "#;
        let c = FileConfig::parse(text).unwrap().into_config().unwrap();
        assert_eq!(c.node, NodeId(2));
        assert_eq!(c.cluster_key[31], 0x1f);
        assert_eq!(
            c.peers,
            vec![(NodeId(1), "127.0.0.1:7101".parse().unwrap())]
        );
        assert_eq!(c.op_timeout, Duration::from_millis(100));
    }

    #[test]
    fn rejects_bad_keys_and_unknown_fields() {
        assert!(parse_key("00").is_err());
        assert!(parse_key(&"zz".repeat(32)).is_err());
        let text = "node = 1\ncluster_key = \"\"\nprocess_listen = \"127.0.0.1:1\"\npeer_listen = \"127.0.0.1:2\"\nbogus = 3\n";
        assert!(matches!(
            FileConfig::parse(text),
            Err(HostedError::Config(_))
        ));
    }
}
