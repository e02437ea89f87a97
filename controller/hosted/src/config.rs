//! The TOML configuration file of `fractos controller --config FILE`.
//!
//! ```toml
//! node = 1
//! cluster_key = "000102…1f"          # 64 hex digits
//! process_listen = "0.0.0.0:7100"    # the ports every controller uses
//! peer_listen = "0.0.0.0:7101"       # (fractos_node::{PROCESS,PEER,METRICS}_PORT):
//! metrics_listen = "127.0.0.1:9100"  # optional
//! op_timeout_ms = 5000               # optional
//! peer_timeout_ms = 3000             # optional
//! max_caps_per_process = 1048576     # optional
//! max_pending_per_process = 4096     # optional
//! max_processes = 1024               # optional
//! peer_security = "authenticated"    # optional: or "secure" (encrypted)
//! gossip_period_ms = 1000            # optional: gossip membership and
//!                                    # links on demand (see the README)
//! link_idle_ms = 5000                # optional, with gossip
//!
//! [[peer]]
//! node = 2
//! address = "10.0.0.2:7101"
//! ```
//!
//! The schema exists once, as [`FileConfig`]: the CLI parses it, and tools
//! that write a config for a controller elsewhere (the Linux guest image
//! builder) build a [`FileConfig`] (e.g. [`FileConfig::listen_all`]) and
//! serialize it with [`FileConfig::to_toml`].

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use fractos_core::PeerSecurity;
use fractos_node::{METRICS_PORT, PEER_PORT, PROCESS_PORT};
use fractos_wire::NodeId;
use serde::{Deserialize, Serialize};

use crate::{HostedConfig, HostedError};

/// A peer entry of the file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FilePeer {
    /// Peer node id.
    pub node: u32,
    /// Peer's peer-link address.
    pub address: SocketAddr,
}

/// The file's contents.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// Peer request timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op_timeout_ms: Option<u64>,
    /// Peer silence timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_timeout_ms: Option<u64>,
    /// Limit: handles per process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_caps_per_process: Option<usize>,
    /// Limit: operations in flight per process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_per_process: Option<usize>,
    /// Limit: attached processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_processes: Option<usize>,
    /// `"authenticated"` (default) or `"secure"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_security: Option<String>,
    /// Monitors one process may register at this controller's objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_monitors_per_process: Option<usize>,
    /// Names one process may publish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_names_per_process: Option<usize>,
    /// Time a new process connection has to send its first frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach_timeout_ms: Option<u64>,
    /// `/metrics` connections served at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_metrics_conns: Option<usize>,
    /// Time a `/metrics` connection may take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_timeout_ms: Option<u64>,
    /// Turns on gossip membership and links on demand with this protocol
    /// period (the peers listed become the seeds and initial view).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gossip_period_ms: Option<u64>,
    /// With gossip: how long an unused link stays open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_idle_ms: Option<u64>,
    /// Peers.
    #[serde(default, rename = "peer", skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<FilePeer>,
}

/// A key as the 64 lower-case hex digits [`parse_key`] reads.
pub fn key_hex(key: &[u8; 32]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
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
    let not_hex = || HostedError::Config("cluster key must be hexadecimal".into());
    let mut key = [0u8; 32];
    // By bytes: 64 bytes of text may hold multi-byte characters, and
    // slicing the string between them would panic.
    for (b, pair) in key.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
        let digit = |c: u8| char::from(c).to_digit(16).ok_or_else(not_hex);
        *b = (digit(pair[0])? << 4 | digit(pair[1])?) as u8;
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
    /// A file for node `node` with `cluster_key` listening on `ip` at the
    /// ports every controller uses: processes on [`PROCESS_PORT`], peers
    /// on [`PEER_PORT`], metrics on [`METRICS_PORT`]; everything else at
    /// its default, no peers.
    pub fn listen_all(node: NodeId, cluster_key: &[u8; 32], ip: IpAddr) -> Self {
        FileConfig {
            node: node.0,
            cluster_key: key_hex(cluster_key),
            process_listen: SocketAddr::new(ip, PROCESS_PORT),
            peer_listen: SocketAddr::new(ip, PEER_PORT),
            metrics_listen: Some(SocketAddr::new(ip, METRICS_PORT)),
            op_timeout_ms: None,
            peer_timeout_ms: None,
            max_caps_per_process: None,
            max_pending_per_process: None,
            max_processes: None,
            peer_security: None,
            max_monitors_per_process: None,
            max_names_per_process: None,
            attach_timeout_ms: None,
            max_metrics_conns: None,
            metrics_timeout_ms: None,
            gossip_period_ms: None,
            link_idle_ms: None,
            peers: Vec::new(),
        }
    }

    /// The file's TOML text (what [`FileConfig::parse`] reads back).
    pub fn to_toml(&self) -> Result<String, HostedError> {
        toml::to_string(self).map_err(|e| HostedError::Config(e.to_string()))
    }

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
        match (self.gossip_period_ms, self.link_idle_ms) {
            (Some(0), _) => {
                return Err(HostedError::Config(
                    "gossip_period_ms must be at least 1 (or left out to keep a link to every peer)"
                        .into(),
                ))
            }
            (Some(ms), idle) => {
                let period = Duration::from_millis(ms);
                let mut g = fractos_core::Gossip {
                    protocol_period: period,
                    probe_timeout: period * 2 / 5,
                    ..fractos_core::Gossip::default()
                };
                if let Some(idle) = idle {
                    g.link_idle = Duration::from_millis(idle);
                }
                c.gossip = Some(g);
            }
            (None, Some(_)) => {
                return Err(HostedError::Config(
                    "link_idle_ms needs gossip_period_ms (links close when idle only with gossip membership)"
                        .into(),
                ))
            }
            (None, None) => {}
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
    fn listen_all_round_trips_through_toml() {
        let key: [u8; 32] = core::array::from_fn(|i| i as u8);
        let mut f = FileConfig::listen_all(NodeId(3), &key, "0.0.0.0".parse().unwrap());
        let text = f.to_toml().unwrap();
        assert!(text.contains("process_listen = \"0.0.0.0:7100\""), "{text}");
        assert!(text.contains("peer_listen = \"0.0.0.0:7101\""), "{text}");
        assert!(text.contains("metrics_listen = \"0.0.0.0:9100\""), "{text}");
        assert!(!text.contains("op_timeout_ms"), "{text}");
        assert_eq!(FileConfig::parse(&text).unwrap(), f);
        let c = FileConfig::parse(&text).unwrap().into_config().unwrap();
        assert_eq!((c.node, c.cluster_key), (NodeId(3), key));
        // Options and peers survive the trip too.
        f.op_timeout_ms = Some(250);
        f.peer_security = Some("secure".into());
        f.peers.push(FilePeer {
            node: 4,
            address: "10.0.0.4:7101".parse().unwrap(),
        });
        assert_eq!(FileConfig::parse(&f.to_toml().unwrap()).unwrap(), f);
    }

    #[test]
    fn rejects_bad_keys_and_unknown_fields() {
        assert!(parse_key("00").is_err());
        assert!(parse_key(&"zz".repeat(32)).is_err());
        // 64 bytes of text with multi-byte characters: an error, no panic.
        for text in [
            format!("é{}", "a".repeat(62)),
            format!("a€{}", "b".repeat(60)),
            "ü".repeat(32),
            format!("{}+1", "a".repeat(62)),
        ] {
            assert_eq!(text.len(), 64, "{text}");
            let e = parse_key(&text).unwrap_err();
            assert!(e.to_string().contains("hexadecimal"), "{e}");
        }
        assert_eq!(parse_key(&"aB".repeat(32)).unwrap(), [0xab; 32]);
        let text = "node = 1\ncluster_key = \"\"\nprocess_listen = \"127.0.0.1:1\"\npeer_listen = \"127.0.0.1:2\"\nbogus = 3\n";
        assert!(matches!(
            FileConfig::parse(text),
            Err(HostedError::Config(_))
        ));
    }

    #[test]
    fn gossip_keys_turn_on_membership_and_are_checked() {
        let base = r#"
            node = 2
            cluster_key = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
            process_listen = "127.0.0.1:7000"
            peer_listen = "127.0.0.1:7100"
        "#;
        let off = FileConfig::parse(base).unwrap().into_config().unwrap();
        assert!(off.gossip.is_none());
        let on = FileConfig::parse(&format!(
            "gossip_period_ms = 250\nlink_idle_ms = 900\n{base}"
        ))
        .unwrap()
        .into_config()
        .unwrap();
        let g = on.gossip.expect("gossip on");
        assert_eq!(g.protocol_period, Duration::from_millis(250));
        assert_eq!(g.probe_timeout, Duration::from_millis(100));
        assert_eq!(g.link_idle, Duration::from_millis(900));
        for bad in ["gossip_period_ms = 0", "link_idle_ms = 900"] {
            let e = FileConfig::parse(&format!("{bad}\n{base}"))
                .unwrap()
                .into_config()
                .unwrap_err();
            assert!(e.to_string().contains("gossip_period_ms"), "{e}");
        }
    }
}
