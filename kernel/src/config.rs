//! The appliance configuration, parsed from the kernel command line.
//!
//! Options are `fractos.<key>=<value>` words; other words (for example ones
//! a boot loader adds) are ignored. Recognised keys:
//!
//! | key | values | default |
//! |---|---|---|
//! | `fractos.log` | `off error warn info debug trace` | `info` |
//! | `fractos.node` | node id, `u32` | `0` |
//! | `fractos.test` | `exit pagefault divzero invalidopcode interrupt panic stackoverflow nvme net` | none |
//! | `fractos.ip` | IPv4 address/prefix of the first NIC, or `dhcp` | `10.0.2.15/24` |
//! | `fractos.gw` | IPv4 default gateway, or `none` | `10.0.2.2` |
//! | `fractos.test_port` | TCP port of the `fractos.test=net` echo server | `7000` |
//! | `fractos.ip1` | IPv4 address/prefix of the second NIC (the peer network) | none |
//! | `fractos.key_source` | where the cluster key is read: `fw_cfg:<name>`, `module:<name>` or `auto` (see [`crate::secret`]) | `auto`: fw_cfg `opt/fractos/cluster-key`, else module `fractos-cluster-key` |
//! | `fractos.key` | **refused**: a key on the command line stops the controller from starting | — |
//! | `fractos.members` | every node id of the cluster, `0,1,2` | this node only |
//! | `fractos.peers` | peers to link to, `1@10.1.0.2,2@10.1.0.3:7101` | none |
//! | `fractos.process_port` | TCP port for processes | `7100` |
//! | `fractos.peer_port` | TCP port for peer controllers | `7101` |
//! | `fractos.metrics_port` | TCP port of the Prometheus endpoint, `0` = off | `9100` |
//! | `fractos.storage_names` | extra names for the storage service's read Request, `pipeline/storage/read` | none |
//! | `fractos.idle` | `halt` (sleep to the next 1 ms tick when idle) or `poll` (spin) | `halt` |
//! | `fractos.peer_security` | `authenticated` (peer frames MAC'd) or `secure` (also encrypted) | `authenticated` |
//!
//! The network defaults suit QEMU user networking (slirp). Peer links use
//! the second NIC when `fractos.ip1` is set, else the first.

use alloc::vec::Vec;
use core::net::Ipv4Addr;

use log::LevelFilter;

use crate::secret::KeySource;

/// A test hook selected with `fractos.test=`: makes the kernel do something
/// a test can observe from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestHook {
    /// Exit QEMU with the success code right after the ready line.
    Exit,
    /// Read an unmapped address after the ready line (page fault).
    PageFault,
    /// Divide by zero after the ready line (divide error).
    DivZero,
    /// Panic after the ready line.
    Panic,
    /// Recurse until the boot stack's guard page is hit.
    StackOverflow,
    /// Execute `ud2` (invalid opcode).
    InvalidOpcode,
    /// Raise software interrupt 0x40, a vector the kernel never enables.
    Interrupt,
    /// Run the NVMe self-test at boot (write, read back, compare and flush
    /// blocks at the end of namespace 1 of every controller; no controller
    /// or any failure is a boot failure), then exit like [`TestHook::Exit`].
    Nvme,
    /// After the ready line, serve ARP/ICMP and one TCP echo connection on
    /// `fractos.test_port` over the first NIC, then exit like
    /// [`TestHook::Exit`]; no NIC, a failure or 60 s without a finished
    /// connection is a boot failure.
    Net,
}

impl TestHook {
    fn parse(v: &str) -> Option<Self> {
        Some(match v {
            "exit" => TestHook::Exit,
            "pagefault" => TestHook::PageFault,
            "divzero" => TestHook::DivZero,
            "panic" => TestHook::Panic,
            "stackoverflow" => TestHook::StackOverflow,
            "invalidopcode" => TestHook::InvalidOpcode,
            "interrupt" => TestHook::Interrupt,
            "nvme" => TestHook::Nvme,
            "net" => TestHook::Net,
            _ => return None,
        })
    }
}

/// A problem with one command-line word. The kernel logs it and goes on
/// with the default for that option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError<'a> {
    /// `fractos.<key>` is not an option this kernel knows.
    #[error(
        "unknown option `{0}` ignored: known options are fractos.log, fractos.node, fractos.test, fractos.ip, fractos.gw, fractos.test_port, fractos.ip1, fractos.key_source, fractos.members, fractos.peers, fractos.process_port, fractos.peer_port, fractos.metrics_port, fractos.idle, fractos.peer_security, fractos.storage_names"
    )]
    UnknownOption(&'a str),
    /// The value does not parse.
    #[error("bad value `{value}` for `{key}` ignored: expected {expected}")]
    BadValue {
        /// The option.
        key: &'a str,
        /// What was given.
        value: &'a str,
        /// What is accepted.
        expected: &'static str,
    },
}

/// An IPv4 address with its prefix length (`10.0.2.15/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    /// The address.
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub prefix_len: u8,
}

impl Ipv4Net {
    /// Parses `a.b.c.d/len`; a bare address means `/32`.
    pub fn parse(s: &str) -> Option<Self> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, l.parse::<u8>().ok().filter(|l| *l <= 32)?),
            None => (s, 32),
        };
        Some(Ipv4Net {
            addr: addr.parse().ok()?,
            prefix_len: len,
        })
    }
}

impl core::fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// A peer controller named on the command line (`node@addr[:port]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Its node id.
    pub node: u32,
    /// Its address on the peer network.
    pub addr: Ipv4Addr,
    /// Its peer port, if not the default.
    pub port: Option<u16>,
}

impl Peer {
    fn parse(s: &str) -> Option<Self> {
        let (node, rest) = s.split_once('@')?;
        let (addr, port) = match rest.split_once(':') {
            Some((a, p)) => (a, Some(p.parse::<u16>().ok().filter(|p| *p != 0)?)),
            None => (rest, None),
        };
        Some(Peer {
            node: node.parse().ok()?,
            addr: addr.parse().ok()?,
            port,
        })
    }
}

fn parse_list<T>(v: &str, item: impl Fn(&str) -> Option<T>) -> Option<Vec<T>> {
    v.split(',').filter(|w| !w.is_empty()).map(item).collect()
}

fn parse_port(v: &str, zero_ok: bool) -> Option<u16> {
    v.parse::<u16>().ok().filter(|p| zero_ok || *p != 0)
}

/// The appliance configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Maximum log level on the serial console.
    pub log_level: LevelFilter,
    /// This appliance's node id in the cluster.
    pub node: u32,
    /// Test hook, if any.
    pub test: Option<TestHook>,
    /// Static IPv4 address of the first NIC.
    pub ip: Ipv4Net,
    /// Configure the first NIC with DHCP instead (`fractos.ip=dhcp`).
    pub ip_dhcp: bool,
    /// Default gateway, if any.
    pub gateway: Option<Ipv4Addr>,
    /// TCP port of the `fractos.test=net` echo server.
    pub test_port: u16,
    /// Static IPv4 address of the second NIC (the peer network), if any.
    pub ip1: Option<Ipv4Net>,
    /// Every node of the cluster (empty: this node alone).
    pub members: Vec<u32>,
    /// Peers to keep links to.
    pub peers: Vec<Peer>,
    /// TCP port for processes.
    pub process_port: u16,
    /// TCP port for peer controllers.
    pub peer_port: u16,
    /// TCP port of the metrics endpoint; 0 turns it off.
    pub metrics_port: u16,
    /// Spin while idle instead of halting until the next tick.
    pub idle_poll: bool,
    /// Protection required on peer links.
    pub peer_security: fractos_core::PeerSecurity,
    /// Extra names to publish the storage service's read Request under.
    pub storage_names: Vec<alloc::string::String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            log_level: LevelFilter::Info,
            node: 0,
            test: None,
            ip_dhcp: false,
            ip: Ipv4Net {
                addr: Ipv4Addr::new(10, 0, 2, 15),
                prefix_len: 24,
            },
            gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
            test_port: 7000,
            ip1: None,
            members: Vec::new(),
            peers: Vec::new(),
            process_port: 7100,
            peer_port: 7101,
            metrics_port: 9100,
            idle_poll: false,
            peer_security: fractos_core::PeerSecurity::Authenticated,
            storage_names: Vec::new(),
        }
    }
}

impl Config {
    /// The `fractos.log` level of `cmdline` alone (default `info`), without
    /// allocating: usable before the heap exists.
    pub fn log_level_of(cmdline: &str) -> LevelFilter {
        cmdline
            .split_ascii_whitespace()
            .rev()
            .filter_map(|w| w.strip_prefix("fractos.log="))
            .find_map(|v| v.parse::<LevelFilter>().ok())
            .unwrap_or(LevelFilter::Info)
    }

    /// Parses `cmdline`, calling `on_error` for every word it cannot use.
    pub fn parse<'a>(cmdline: &'a str, mut on_error: impl FnMut(ConfigError<'a>)) -> Self {
        let mut c = Config::default();
        for word in cmdline.split_ascii_whitespace() {
            let Some(rest) = word.strip_prefix("fractos.") else {
                continue;
            };
            let (key, value) = match rest.split_once('=') {
                Some((k, v)) => (&word[..k.len() + "fractos.".len()], v),
                None => (word, ""),
            };
            let bad = |expected| ConfigError::BadValue {
                key,
                value,
                expected,
            };
            match &key["fractos.".len()..] {
                "log" => match value.parse::<LevelFilter>() {
                    Ok(l) => c.log_level = l,
                    Err(_) => on_error(bad("off, error, warn, info, debug or trace")),
                },
                "node" => match value.parse::<u32>() {
                    Ok(n) => c.node = n,
                    Err(_) => on_error(bad("a node id (0..=4294967295)")),
                },
                "test" => match TestHook::parse(value) {
                    Some(t) => c.test = Some(t),
                    None => on_error(bad(
                        "exit, pagefault, divzero, invalidopcode, interrupt, panic, stackoverflow, nvme or net",
                    )),
                },
                "ip" if value == "dhcp" => c.ip_dhcp = true,
                "ip" => match Ipv4Net::parse(value) {
                    Some(n) => c.ip = n,
                    None => on_error(bad(
                        "an IPv4 address with prefix, like 10.0.2.15/24, or dhcp",
                    )),
                },
                "gw" => match value {
                    "none" => c.gateway = None,
                    v => match v.parse::<Ipv4Addr>() {
                        Ok(a) => c.gateway = Some(a),
                        Err(_) => on_error(bad("an IPv4 address or `none`")),
                    },
                },
                "test_port" => match value.parse::<u16>() {
                    Ok(p) if p != 0 => c.test_port = p,
                    _ => on_error(bad("a TCP port (1..=65535)")),
                },
                "ip1" => match Ipv4Net::parse(value) {
                    Some(n) => c.ip1 = Some(n),
                    None => on_error(bad("an IPv4 address with prefix, like 10.1.0.1/24")),
                },
                // Refused before this parse (`secret::key_on_cmdline` stops
                // the controller); its value is a secret, never echoed here.
                "key" => {}
                "key_source" => {
                    if KeySource::parse(value).is_none() {
                        on_error(bad("fw_cfg:<name> (1..=55 bytes), module:<name> or auto"))
                    }
                }
                "members" => match parse_list(value, |w| w.parse::<u32>().ok()) {
                    Some(m) => c.members = m,
                    None => on_error(bad("comma-separated node ids, like 0,1,2")),
                },
                "peers" => match parse_list(value, Peer::parse) {
                    Some(p) => c.peers = p,
                    None => on_error(bad("comma-separated node@ipv4[:port], like 1@10.1.0.2")),
                },
                "process_port" => match parse_port(value, false) {
                    Some(p) => c.process_port = p,
                    None => on_error(bad("a TCP port (1..=65535)")),
                },
                "peer_port" => match parse_port(value, false) {
                    Some(p) => c.peer_port = p,
                    None => on_error(bad("a TCP port (1..=65535)")),
                },
                "metrics_port" => match parse_port(value, true) {
                    Some(p) => c.metrics_port = p,
                    None => on_error(bad("a TCP port (1..=65535), or 0 for none")),
                },
                "storage_names" => {
                    c.storage_names = value
                        .split(',')
                        .filter(|n| !n.is_empty())
                        .map(alloc::string::String::from)
                        .collect()
                }
                "idle" => match value {
                    "halt" => c.idle_poll = false,
                    "poll" => c.idle_poll = true,
                    _ => on_error(bad("halt or poll")),
                },
                "peer_security" => match value {
                    "authenticated" => c.peer_security = fractos_core::PeerSecurity::Authenticated,
                    "secure" => c.peer_security = fractos_core::PeerSecurity::Secure,
                    _ => on_error(bad("authenticated or secure")),
                },
                _ => on_error(ConfigError::UnknownOption(key)),
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_options_and_ignores_foreign_words() {
        let mut errs = Vec::new();
        let c = Config::parse(
            "console=ttyS0 fractos.log=debug  fractos.node=7 fractos.test=divzero",
            |e| errs.push(e),
        );
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(c.log_level, LevelFilter::Debug);
        assert_eq!(c.node, 7);
        assert_eq!(c.test, Some(TestHook::DivZero));
        let c = Config::parse("fractos.test=nvme", |e| panic!("{e}"));
        assert_eq!(c.test, Some(TestHook::Nvme));
        assert_eq!(Config::parse("", |_| panic!()), Config::default());
        assert_eq!(
            Config::log_level_of("fractos.log=warn x fractos.log=bogus"),
            LevelFilter::Warn
        );
        assert_eq!(Config::log_level_of("fractos.node=1"), LevelFilter::Info);
    }

    #[test]
    fn parses_cluster_options() {
        let c = Config::parse(
            "fractos.key_source=fw_cfg:opt/k fractos.members=0,1,2 fractos.peers=1@10.1.0.2,2@10.1.0.3:7201 \
             fractos.ip1=10.1.0.1/24 fractos.process_port=8100 fractos.peer_port=8101 fractos.metrics_port=0 fractos.idle=poll",
            |e| panic!("{e}"),
        );
        assert_eq!(c.members, [0, 1, 2]);
        assert_eq!(
            c.peers,
            [
                Peer {
                    node: 1,
                    addr: Ipv4Addr::new(10, 1, 0, 2),
                    port: None
                },
                Peer {
                    node: 2,
                    addr: Ipv4Addr::new(10, 1, 0, 3),
                    port: Some(7201)
                },
            ]
        );
        assert_eq!(c.ip1.map(|n| n.to_string()).as_deref(), Some("10.1.0.1/24"));
        assert_eq!(
            (c.process_port, c.peer_port, c.metrics_port),
            (8100, 8101, 0)
        );
        let mut errs = Vec::new();
        let c = Config::parse(
            "fractos.key_source=abc fractos.key_source=fw_cfg: \
             fractos.members=0,x fractos.peers=1@10.1.0 fractos.peers=10.1.0.2 fractos.process_port=0 fractos.idle=nap",
            |e| errs.push(e),
        );
        assert_eq!(errs.len(), 7, "{errs:?}");
        assert_eq!(c, Config::default());
    }

    #[test]
    fn key_on_the_command_line_is_never_kept_or_echoed() {
        // `secret::key_on_cmdline` refuses it; the parse neither keeps the
        // value nor reports it (an error message would log the secret).
        let mut errs = Vec::new();
        let c = Config::parse(
            "fractos.key=00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff fractos.key=short",
            |e| errs.push(e),
        );
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(c, Config::default());
    }

    #[test]
    fn parses_network_options() {
        let d = Config::default();
        assert_eq!(d.ip.to_string(), "10.0.2.15/24");
        assert_eq!(d.gateway, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(d.test_port, 7000);
        let c = Config::parse(
            "fractos.test=net fractos.ip=192.168.7.9/16 fractos.gw=192.168.0.1 fractos.test_port=8080",
            |e| panic!("{e}"),
        );
        assert_eq!(c.test, Some(TestHook::Net));
        assert_eq!(c.ip.addr, Ipv4Addr::new(192, 168, 7, 9));
        assert_eq!(c.ip.prefix_len, 16);
        assert_eq!(c.gateway, Some(Ipv4Addr::new(192, 168, 0, 1)));
        assert_eq!(c.test_port, 8080);
        let c = Config::parse("fractos.gw=none fractos.ip=10.1.1.1", |e| panic!("{e}"));
        assert_eq!(c.gateway, None);
        assert_eq!(c.ip.prefix_len, 32);
        assert!(!c.ip_dhcp);
        assert!(Config::parse("fractos.ip=dhcp", |e| panic!("{e}")).ip_dhcp);
        let mut errs = Vec::new();
        let c = Config::parse(
            "fractos.ip=10.0.2/24 fractos.ip=10.0.2.1/33 fractos.gw=x fractos.test_port=0 fractos.test_port=70000",
            |e| errs.push(e),
        );
        assert_eq!(errs.len(), 5, "{errs:?}");
        assert_eq!(c, Config::default());
    }

    #[test]
    fn reports_bad_words_and_keeps_defaults() {
        let mut errs = Vec::new();
        let c = Config::parse(
            "fractos.log=loud fractos.node=-1 fractos.bogus=1 fractos.test",
            |e| errs.push(e),
        );
        assert_eq!(c, Config::default());
        assert_eq!(errs.len(), 4);
        assert_eq!(errs[2], ConfigError::UnknownOption("fractos.bogus"));
        assert!(matches!(
            errs[0],
            ConfigError::BadValue {
                key: "fractos.log",
                value: "loud",
                ..
            }
        ));
        assert!(errs[3].to_string().contains("expected exit, pagefault"));
    }
}
