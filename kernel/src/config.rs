//! The appliance configuration: the configuration file ([`parse_blob`],
//! from fw_cfg [`BLOB_FW_CFG_NAME`] or the Multiboot2 module
//! [`BLOB_MODULE_NAME`]) with the kernel command line applied over it
//! ([`Config::layered`]).
//!
//! Command-line options are `fractos.<key>=<value>` words; other words
//! (for example ones a boot loader adds) are ignored. The file carries the
//! same keys without `fractos.` except [`BOOT_ONLY`] ones. Recognised keys:
//!
//! | key | values | default |
//! |---|---|---|
//! | `fractos.log` | `off error warn info debug trace` | `info` |
//! | `fractos.node` | node id, `u32` | `0` |
//! | `fractos.test` | `exit pagefault divzero invalidopcode interrupt panic stackoverflow nvme net rc_pingpong` | none |
//! | `fractos.ip` | IPv4 address/prefix of the first NIC, or `dhcp` | `10.0.2.15/24` |
//! | `fractos.gw` | IPv4 default gateway, or `none` | `10.0.2.2` |
//! | `fractos.test_port` | TCP port of the `fractos.test=net` echo server | `7000` |
//! | `fractos.ip1` | IPv4 address/prefix of the second NIC (the peer network) | none |
//! | `fractos.key_source` | where the cluster key is read: `fw_cfg:<name>`, `module:<name>`, `initrd` or `auto` (see [`crate::secret`]) | `auto`: fw_cfg `opt/fractos/cluster-key`, else module `fractos-cluster-key` |
//! | `fractos.key` | **refused**: a key on the command line stops the controller from starting | — |
//! | `fractos.members` | every node id of the cluster, `0,1,2` | this node only |
//! | `fractos.peers` | peers to link to, `1@10.1.0.2,2@10.1.0.3:7101` | none |
//! | `fractos.process_port` | TCP port for processes | `7100` |
//! | `fractos.peer_port` | TCP port for peer controllers | `7101` |
//! | `fractos.metrics_port` | TCP port of the Prometheus endpoint, `0` = off | `9100` |
//! | `fractos.storage_names` | extra names for the storage service's read Request, `pipeline/storage/read` | none |
//! | `fractos.idle` | `halt` (sleep to the next 1 ms tick when idle) or `poll` (spin) | `halt` |
//! | `fractos.peer_security` | `authenticated` (peer frames MAC'd) or `secure` (also encrypted) | `authenticated` |
//! | `fractos.rdma` | `on`: the RoCEv2 engine on the peer-network NIC (see [`crate::rdma`]) | `off` (`on` with `fractos.test=rc_pingpong`) |
//! | `fractos.rc_mtu` | path MTU of the `rc_pingpong` server (the client's `-m`): `256 512 1024 2048 4096` | `1024` |
//! | `fractos.rc_size` | message bytes of the `rc_pingpong` server (the client's `-s`), 1..=1048576 | `4096` |
//! | `fractos.rc_iters` | iterations of the `rc_pingpong` server (the client's `-n`), 1..=1000000 | `1000` |
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
    /// Run the controller service with the RoCEv2 engine on the peer
    /// NIC and serve `ibv_rc_pingpong` clients (its TCP exchange on port
    /// 18515, then the SEND ping-pong; [`crate::rdma::PingPong`]). The
    /// exchange is the example's own, unauthenticated: a test mode only.
    RcPingpong,
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
            "rc_pingpong" => TestHook::RcPingpong,
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
        "unknown option `{0}` ignored: known options are fractos.log, fractos.node, fractos.test, fractos.ip, fractos.gw, fractos.test_port, fractos.ip1, fractos.key_source, fractos.members, fractos.peers, fractos.process_port, fractos.peer_port, fractos.metrics_port, fractos.idle, fractos.peer_security, fractos.storage_names, fractos.rdma, fractos.rc_mtu, fractos.rc_size, fractos.rc_iters"
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
    /// Run the RoCEv2 engine on the peer-network NIC.
    pub rdma: bool,
    /// Path MTU of the `rc_pingpong` server, bytes.
    pub rc_mtu: u32,
    /// Message bytes of the `rc_pingpong` server.
    pub rc_size: u32,
    /// Iterations of the `rc_pingpong` server.
    pub rc_iters: u32,
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
            rdma: false,
            rc_mtu: 1024,
            rc_size: 4096,
            rc_iters: 1000,
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
    pub fn parse<'a>(cmdline: &'a str, on_error: impl FnMut(ConfigError<'a>)) -> Self {
        let mut c = Config::default();
        c.apply_cmdline(cmdline, on_error);
        c
    }

    /// Applies the `fractos.*` words of `cmdline` on top of `self`,
    /// calling `on_error` for every word it cannot use (that option keeps
    /// its value).
    pub fn apply_cmdline<'a>(
        &mut self,
        cmdline: &'a str,
        mut on_error: impl FnMut(ConfigError<'a>),
    ) {
        for word in cmdline.split_ascii_whitespace() {
            let Some(rest) = word.strip_prefix("fractos.") else {
                continue;
            };
            let (key, value) = match rest.split_once('=') {
                Some((k, v)) => (&word[..k.len() + "fractos.".len()], v),
                None => (word, ""),
            };
            let name = &key["fractos.".len()..];
            let result = match name {
                // Refused before this parse (`secret::key_on_cmdline` stops
                // the controller); its value is a secret, never echoed here.
                "key" => Ok(()),
                "key_source" => KeySource::parse(value)
                    .map(|_| ())
                    .ok_or(Refusal::Bad("fw_cfg:<name> (1..=55 bytes), module:<name>, initrd or auto")),
                "log" => value
                    .parse::<LevelFilter>()
                    .map(|l| self.log_level = l)
                    .map_err(|_| Refusal::Bad("off, error, warn, info, debug or trace")),
                "test" => TestHook::parse(value).map(|t| self.test = Some(t)).ok_or(Refusal::Bad(
                    "exit, pagefault, divzero, invalidopcode, interrupt, panic, stackoverflow, nvme, net or rc_pingpong",
                )),
                _ => self.set(name, value),
            };
            match result {
                Ok(()) => {}
                Err(Refusal::Unknown) => on_error(ConfigError::UnknownOption(key)),
                Err(refusal) => on_error(ConfigError::BadValue {
                    key,
                    value,
                    expected: match refusal {
                        Refusal::Bad(e) | Refusal::BadItem { expected: e, .. } => e,
                        Refusal::DuplicateItem(_) => "a list naming each node once",
                        _ => "a list of at most 16384 items",
                    },
                }),
            }
        }
    }

    /// Sets the cluster option `name` (without `fractos.`) from `value`:
    /// every option a configuration file may carry. `self` is unchanged
    /// on error.
    fn set<'v>(&mut self, name: &str, value: &'v str) -> Result<(), Refusal<'v>> {
        let port = |zero_ok, expected| parse_port(value, zero_ok).ok_or(Refusal::Bad(expected));
        match name {
            "node" => {
                self.node = value
                    .parse::<u32>()
                    .map_err(|_| Refusal::Bad("a node id (0..=4294967295)"))?
            }
            "ip" if value == "dhcp" => self.ip_dhcp = true,
            "ip" => {
                self.ip = Ipv4Net::parse(value).ok_or(Refusal::Bad(
                    "an IPv4 address with prefix, like 10.0.2.15/24, or dhcp",
                ))?;
                // A static address replaces `dhcp` given before it (in the
                // configuration file, or earlier on the command line).
                self.ip_dhcp = false;
            }
            "gw" => {
                self.gateway = match value {
                    "none" => None,
                    v => Some(
                        v.parse::<Ipv4Addr>()
                            .map_err(|_| Refusal::Bad("an IPv4 address or `none`"))?,
                    ),
                }
            }
            "test_port" => self.test_port = port(false, "a TCP port (1..=65535)")?,
            "rdma" => {
                self.rdma = match value {
                    "on" => true,
                    "off" => false,
                    _ => return Err(Refusal::Bad("on or off")),
                }
            }
            "rc_mtu" => {
                self.rc_mtu = match value.parse::<u32>() {
                    Ok(m @ (256 | 512 | 1024 | 2048 | 4096)) => m,
                    _ => return Err(Refusal::Bad("256, 512, 1024, 2048 or 4096")),
                }
            }
            "rc_size" => {
                self.rc_size = match value.parse::<u32>() {
                    Ok(n @ 1..=1_048_576) => n,
                    _ => return Err(Refusal::Bad("a message size in bytes, 1..=1048576")),
                }
            }
            "rc_iters" => {
                self.rc_iters = match value.parse::<u32>() {
                    Ok(n @ 1..=1_000_000) => n,
                    _ => return Err(Refusal::Bad("an iteration count, 1..=1000000")),
                }
            }
            "ip1" => {
                self.ip1 = Some(Ipv4Net::parse(value).ok_or(Refusal::Bad(
                    "an IPv4 address with prefix, like 10.1.0.1/24",
                ))?)
            }
            "members" => {
                let members = parse_list(value, "comma-separated node ids, like 0,1,2", |w| {
                    w.parse::<u32>().ok()
                })?;
                unique(members.iter().copied())?;
                self.members = members;
            }
            "peers" => {
                let peers = parse_list(
                    value,
                    "comma-separated node@ipv4[:port], like 1@10.1.0.2",
                    Peer::parse,
                )?;
                unique(peers.iter().map(|p| p.node))?;
                self.peers = peers;
            }
            "process_port" => self.process_port = port(false, "a TCP port (1..=65535)")?,
            "peer_port" => self.peer_port = port(false, "a TCP port (1..=65535)")?,
            "metrics_port" => {
                self.metrics_port = port(true, "a TCP port (1..=65535), or 0 for none")?
            }
            "storage_names" => {
                self.storage_names = value
                    .split(',')
                    .filter(|n| !n.is_empty())
                    .map(alloc::string::String::from)
                    .collect()
            }
            "idle" => {
                self.idle_poll = match value {
                    "halt" => false,
                    "poll" => true,
                    _ => return Err(Refusal::Bad("halt or poll")),
                }
            }
            "peer_security" => {
                self.peer_security = match value {
                    "authenticated" => fractos_core::PeerSecurity::Authenticated,
                    "secure" => fractos_core::PeerSecurity::Secure,
                    _ => return Err(Refusal::Bad("authenticated or secure")),
                }
            }
            _ => return Err(Refusal::Unknown),
        }
        Ok(())
    }

    /// Parses a configuration file (see [`parse_blob`]) and applies the
    /// command line over it: an option in both takes the command line's
    /// value. Command-line problems go to `on_error` as with
    /// [`Config::parse`]; any problem in the file is an error.
    pub fn layered<'a>(
        cmdline: &'a str,
        blob: &'a [u8],
        on_error: impl FnMut(ConfigError<'a>),
    ) -> Result<Layered<'a>, BlobError<'a>> {
        let (mut config, keys) = parse_blob(blob)?;
        let overridden = keys
            .into_iter()
            .filter(|k| {
                cmdline.split_ascii_whitespace().any(|w| {
                    w.strip_prefix("fractos.")
                        .and_then(|r| r.strip_prefix(*k))
                        .is_some_and(|r| r.is_empty() || r.starts_with('='))
                })
            })
            .collect();
        config.apply_cmdline(cmdline, on_error);
        Ok(Layered { config, overridden })
    }
}

/// A configuration file with the command line applied over it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layered<'a> {
    /// The result.
    pub config: Config,
    /// Keys of the file whose value the command line replaced.
    pub overridden: Vec<&'a str>,
}

/// Why [`Config::set`] did not take a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal<'v> {
    /// No such option.
    Unknown,
    /// The value does not parse; what is accepted.
    Bad(&'static str),
    /// One item of a list does not parse.
    BadItem {
        item: &'v str,
        expected: &'static str,
    },
    /// A node id appears twice in a list.
    DuplicateItem(u32),
    /// A list has this many items, more than [`MAX_LIST_ITEMS`].
    TooMany(usize),
}

fn parse_list<'v, T>(
    v: &'v str,
    expected: &'static str,
    item: impl Fn(&str) -> Option<T>,
) -> Result<Vec<T>, Refusal<'v>> {
    let mut out = Vec::new();
    for w in v.split(',').filter(|w| !w.is_empty()) {
        if out.len() == MAX_LIST_ITEMS {
            return Err(Refusal::TooMany(
                v.split(',').filter(|w| !w.is_empty()).count(),
            ));
        }
        out.push(item(w).ok_or(Refusal::BadItem { item: w, expected })?);
    }
    Ok(out)
}

/// `Err` naming the first node id that repeats.
fn unique<'v>(ids: impl Iterator<Item = u32>) -> Result<(), Refusal<'v>> {
    let mut seen: Vec<u32> = ids.collect();
    seen.sort_unstable();
    match seen.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(Refusal::DuplicateItem(w[0])),
        None => Ok(()),
    }
}

fn parse_port(v: &str, zero_ok: bool) -> Option<u16> {
    v.parse::<u16>().ok().filter(|p| zero_ok || *p != 0)
}

/// Largest configuration file accepted, in bytes (1 MiB: the longest
/// lists, 16,384 members and peers with addresses, take about 350 KiB).
pub const BLOB_MAX: usize = 1 << 20;

/// Most items in `members` or in `peers`.
pub const MAX_LIST_ITEMS: usize = 16_384;

/// The first line of a configuration file, version 1.
pub const BLOB_HEADER: &str = "fractos-config 1";

/// The last line of a configuration file: a file cut short is detected.
pub const BLOB_END: &str = "end";

/// Options only the command line sets: they are needed before the
/// configuration file is read (`log`, `key_source`), are secrets (`key`)
/// or are test switches (`test`).
pub const BOOT_ONLY: [&str; 4] = ["log", "key_source", "key", "test"];

/// The fw_cfg file the appliance reads its configuration from (QEMU:
/// `-fw_cfg name=opt/org.fractos/config,file=<path>`).
pub const BLOB_FW_CFG_NAME: &str = "opt/org.fractos/config";

/// The command line of the Multiboot2 module holding the configuration
/// (GRUB: `module2 /boot/node.config fractos-config`).
pub const BLOB_MODULE_NAME: &str = "fractos-config";

/// Largest command line QEMU's PVH boot ROM holds, its NUL included: the
/// ROM copies the `-append` string into a 4096-byte buffer without a
/// bound, so a longer one overwrites what follows (the PVH start info).
pub const QEMU_PVH_CMDLINE_MAX: u32 = 4096;

/// A kernel command line the appliance cannot use whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CmdlineError {
    /// QEMU's PVH boot ROM copied more than its buffer holds.
    #[error("the kernel command line is {size} bytes (NUL included) but QEMU's PVH boot ROM holds at most {max}: the excess overwrote the PVH start info. Keep the command line to a few options (fractos.node, fractos.log, ...) and pass members and peers in the configuration file, fw_cfg `opt/org.fractos/config` (see docs/appliance.md)")]
    PvhOverflow {
        /// The size QEMU reports (fw_cfg `FW_CFG_CMDLINE_SIZE`).
        size: u32,
        /// [`QEMU_PVH_CMDLINE_MAX`].
        max: u32,
    },
    /// The boot loader's command line is longer than the kernel keeps.
    #[error("the kernel command line is longer than the {max} bytes the appliance keeps: options past that would be lost. Pass members and peers in the configuration file instead (fw_cfg `opt/org.fractos/config`, or a Multiboot2 module named `fractos-config`; see docs/appliance.md)")]
    TooLong {
        /// The kernel's limit.
        max: usize,
    },
}

/// Checks the command-line size QEMU reports for a PVH boot.
pub fn check_pvh_cmdline_size(size: u32) -> Result<(), CmdlineError> {
    if size > QEMU_PVH_CMDLINE_MAX {
        return Err(CmdlineError::PvhOverflow {
            size,
            max: QEMU_PVH_CMDLINE_MAX,
        });
    }
    Ok(())
}

/// A value or item shown in an error, cut to 48 characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clip<'a>(pub &'a str);

impl core::fmt::Display for Clip<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0.char_indices().nth(48) {
            Some((at, _)) => write!(f, "{}…", &self.0[..at]),
            None => f.write_str(self.0),
        }
    }
}

/// Why a configuration file was refused. Lines count from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BlobError<'a> {
    /// The file is over [`BLOB_MAX`].
    #[error("configuration is {size} bytes, more than the {max} accepted: split the cluster or drop unused peers")]
    TooLarge {
        /// Its size.
        size: u64,
        /// [`BLOB_MAX`].
        max: usize,
    },
    /// A line is not UTF-8.
    #[error("configuration line {line} is not UTF-8 text: write the file as plain ASCII")]
    NotUtf8 {
        /// The line.
        line: usize,
    },
    /// A line holds a NUL byte (a binary file, or a short read).
    #[error(
        "configuration line {line} holds a NUL byte: the file is binary or was not fully read"
    )]
    Nul {
        /// The line.
        line: usize,
    },
    /// The first line is not [`BLOB_HEADER`].
    #[error("configuration line 1 is `{}`, expected `fractos-config 1`: the file is not a FractOS configuration", Clip(found))]
    NoHeader {
        /// What the first line holds.
        found: &'a str,
    },
    /// The header names a version this kernel does not read.
    #[error("configuration version `{}` is not supported: this kernel reads version 1; regenerate the file or update the kernel", Clip(found))]
    Version {
        /// The version given.
        found: &'a str,
    },
    /// A line is not `key=value`.
    #[error("configuration line {line} is `{}`: expected key=value", Clip(text))]
    NotKeyValue {
        /// The line.
        line: usize,
        /// Its text.
        text: &'a str,
    },
    /// A key this kernel does not know.
    #[error("configuration line {line}: unknown key `{}`: keys are node, ip, gw, ip1, members, peers, process_port, peer_port, metrics_port, test_port, storage_names, idle, peer_security (without the `fractos.` prefix)", Clip(key))]
    UnknownKey {
        /// The line.
        line: usize,
        /// The key.
        key: &'a str,
    },
    /// A key only the command line may set.
    #[error("configuration line {line}: `{key}` is a boot option: set it on the kernel command line (`fractos.{key}=`), not in the configuration")]
    BootOnly {
        /// The line.
        line: usize,
        /// The key.
        key: &'a str,
    },
    /// A key given twice.
    #[error(
        "configuration line {line}: `{key}` was already set on line {first}: give each key once"
    )]
    DuplicateKey {
        /// The line.
        line: usize,
        /// The key.
        key: &'a str,
        /// Where it was first set.
        first: usize,
    },
    /// A value that does not parse.
    #[error(
        "configuration line {line}: bad value `{}` for `{key}`: expected {expected}",
        Clip(value)
    )]
    BadValue {
        /// The line.
        line: usize,
        /// The key.
        key: &'a str,
        /// The value (or the list item) given.
        value: &'a str,
        /// What is accepted.
        expected: &'static str,
    },
    /// A node id listed twice.
    #[error(
        "configuration line {line}: node {node} appears twice in `{key}`: list each node once"
    )]
    DuplicateNode {
        /// The line.
        line: usize,
        /// The key.
        key: &'a str,
        /// The repeated id.
        node: u32,
    },
    /// A list longer than [`MAX_LIST_ITEMS`].
    #[error("configuration line {line}: `{key}` has {count} items, more than the {max} accepted")]
    TooManyItems {
        /// The line.
        line: usize,
        /// The key.
        key: &'a str,
        /// How many were given.
        count: usize,
        /// [`MAX_LIST_ITEMS`].
        max: usize,
    },
    /// No [`BLOB_END`] line.
    #[error("configuration ends without its `end` line: it was cut short (a truncated file or a short read); regenerate it")]
    NoEnd,
    /// Text after the [`BLOB_END`] line.
    #[error("configuration line {line} follows the `end` line: nothing may follow it")]
    AfterEnd {
        /// The line.
        line: usize,
    },
}

/// Parses a configuration file, version 1:
///
/// ```text
/// fractos-config 1
/// # comments and blank lines are ignored
/// members=0,1,2
/// peers=1@10.1.0.2,2@10.1.0.3:7101
/// end
/// ```
///
/// Keys are the command-line options without `fractos.` (except
/// [`BOOT_ONLY`] ones), each at most once, with the same values; spaces
/// around keys and values and a `\r` before `\n` are ignored. Returns the
/// configuration (defaults for keys not given) and the keys given, in
/// order. Every problem is an error naming its line: a file that is only
/// partly understood is never used.
pub fn parse_blob(blob: &[u8]) -> Result<(Config, Vec<&str>), BlobError<'_>> {
    if blob.len() > BLOB_MAX {
        return Err(BlobError::TooLarge {
            size: blob.len() as u64,
            max: BLOB_MAX,
        });
    }
    let mut config = Config::default();
    let mut keys: Vec<(&str, usize)> = Vec::new();
    let mut header = false;
    let mut ended = false;
    for (i, raw) in blob.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        if raw.contains(&0) {
            return Err(BlobError::Nul { line });
        }
        let text = core::str::from_utf8(raw).map_err(|_| BlobError::NotUtf8 { line })?;
        let text = text.strip_suffix('\r').unwrap_or(text).trim();
        if ended {
            if text.is_empty() {
                continue;
            }
            return Err(BlobError::AfterEnd { line });
        }
        if !header {
            header = true;
            let Some(version) = text.strip_prefix("fractos-config") else {
                return Err(BlobError::NoHeader { found: text });
            };
            if version.trim() != "1" || !version.starts_with([' ', '\t']) {
                return Err(BlobError::Version {
                    found: version.trim(),
                });
            }
            continue;
        }
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        if text == BLOB_END {
            ended = true;
            continue;
        }
        let Some((key, value)) = text.split_once('=') else {
            return Err(BlobError::NotKeyValue { line, text });
        };
        let (key, value) = (key.trim(), value.trim());
        if BOOT_ONLY.contains(&key) {
            return Err(BlobError::BootOnly { line, key });
        }
        if let Some(&(_, first)) = keys.iter().find(|(k, _)| *k == key) {
            return Err(BlobError::DuplicateKey { line, key, first });
        }
        config.set(key, value).map_err(|r| match r {
            Refusal::Unknown => BlobError::UnknownKey { line, key },
            Refusal::Bad(expected) => BlobError::BadValue {
                line,
                key,
                value,
                expected,
            },
            Refusal::BadItem { item, expected } => BlobError::BadValue {
                line,
                key,
                value: item,
                expected,
            },
            Refusal::DuplicateItem(node) => BlobError::DuplicateNode { line, key, node },
            Refusal::TooMany(count) => BlobError::TooManyItems {
                line,
                key,
                count,
                max: MAX_LIST_ITEMS,
            },
        })?;
        keys.push((key, line));
    }
    if !header {
        return Err(BlobError::NoHeader { found: "" });
    }
    if !ended {
        return Err(BlobError::NoEnd);
    }
    Ok((config, keys.into_iter().map(|(k, _)| k).collect()))
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
    fn parses_rdma_options() {
        let c = Config::parse(
            "fractos.test=rc_pingpong fractos.rdma=on fractos.rc_mtu=4096 fractos.rc_size=8192 fractos.rc_iters=10",
            |e| panic!("{e}"),
        );
        assert_eq!(c.test, Some(TestHook::RcPingpong));
        assert!(c.rdma);
        assert_eq!((c.rc_mtu, c.rc_size, c.rc_iters), (4096, 8192, 10));
        let mut errs = Vec::new();
        let c = Config::parse(
            "fractos.rdma=yes fractos.rc_mtu=1500 fractos.rc_size=0 fractos.rc_iters=x",
            |e| errs.push(e.to_string()),
        );
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(errs[1].contains("1024"), "{errs:?}");
        assert!(!c.rdma);
        assert_eq!((c.rc_mtu, c.rc_size, c.rc_iters), (1024, 4096, 1000));
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
    fn blob(body: &str) -> alloc::string::String {
        alloc::format!("fractos-config 1\n{body}end\n")
    }

    #[test]
    fn blob_carries_cluster_options() {
        let text = blob(
            "# a comment\n\nmembers = 0,1,2\r\npeers=1@10.1.0.2,2@10.1.0.3:7201\nip1=10.1.0.1/16\n\
             process_port=8100\nmetrics_port=0\nidle=poll\nstorage_names=a/b,c\n",
        );
        let (c, keys) = parse_blob(text.as_bytes()).unwrap();
        assert_eq!(c.members, [0, 1, 2]);
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.peers[1].port, Some(7201));
        assert_eq!(c.ip1.map(|n| n.to_string()).as_deref(), Some("10.1.0.1/16"));
        assert_eq!(
            (c.process_port, c.metrics_port, c.idle_poll),
            (8100, 0, true)
        );
        assert_eq!(c.storage_names, ["a/b", "c"]);
        assert_eq!(
            keys,
            [
                "members",
                "peers",
                "ip1",
                "process_port",
                "metrics_port",
                "idle",
                "storage_names"
            ]
        );
        // No final newline after `end`, trailing blank lines: both fine.
        assert!(parse_blob(b"fractos-config 1\nend").is_ok());
        assert!(parse_blob(b"fractos-config 1\nend\n\n  \n").is_ok());
        assert_eq!(
            parse_blob(b"fractos-config 1\nend").unwrap().0,
            Config::default()
        );
    }

    #[test]
    fn command_line_wins_over_the_blob() {
        let text = blob("node=3\nmembers=0,1,2,3\nprocess_port=8100\n");
        let l = Config::layered(
            "fractos.node=5 fractos.log=debug fractos.process_port_x=1 fractos.members=5",
            text.as_bytes(),
            |_| {},
        )
        .unwrap();
        assert_eq!(l.config.node, 5);
        assert_eq!(l.config.members, [5]);
        assert_eq!(l.config.process_port, 8100);
        assert_eq!(l.config.log_level, LevelFilter::Debug);
        assert_eq!(l.overridden, ["node", "members"]);
        // A bad command-line word keeps the file's value.
        let l = Config::layered("fractos.node=x", text.as_bytes(), |_| {}).unwrap();
        assert_eq!((l.config.node, l.overridden), (3, vec!["node"]));
    }

    #[test]
    fn blob_of_ten_thousand_members() {
        let members: Vec<alloc::string::String> = (0..10_000).map(|n| n.to_string()).collect();
        let peers: Vec<alloc::string::String> = (1..10_000u32)
            .map(|n| alloc::format!("{n}@10.{}.{}.{}:7101", n >> 16, (n >> 8) & 0xff, n & 0xff))
            .collect();
        let text = blob(&alloc::format!(
            "members={}\npeers={}\n",
            members.join(","),
            peers.join(",")
        ));
        assert!(text.len() < BLOB_MAX, "{}", text.len());
        let (c, _) = parse_blob(text.as_bytes()).unwrap();
        assert_eq!(c.members.len(), 10_000);
        assert_eq!(c.members[9_999], 9_999);
        assert_eq!(c.peers.len(), 9_999);
        assert_eq!(
            c.peers[9_998],
            Peer {
                node: 9_999,
                addr: Ipv4Addr::new(10, 0, 39, 15),
                port: Some(7101)
            }
        );
    }

    fn err(text: &[u8]) -> alloc::string::String {
        parse_blob(text).unwrap_err().to_string()
    }

    #[test]
    fn hostile_blobs_are_refused_with_their_line() {
        // Over the limit: refused before looking at a byte.
        let huge = vec![b'#'; BLOB_MAX + 1];
        assert_eq!(
            parse_blob(&huge).unwrap_err(),
            BlobError::TooLarge {
                size: BLOB_MAX as u64 + 1,
                max: BLOB_MAX
            }
        );
        // Cut short: no `end` line, even mid-list.
        let full = blob("members=0,1,2\npeers=1@10.1.0.2\n");
        let mid_list = full.find(",2").unwrap();
        for cut in [full.len() - 4, mid_list] {
            assert_eq!(
                parse_blob(&full.as_bytes()[..cut]).unwrap_err(),
                BlobError::NoEnd,
                "{cut}"
            );
        }
        for cut in 0..full.len() - 1 {
            assert!(parse_blob(&full.as_bytes()[..cut]).is_err(), "{cut}");
        }
        assert!(err(b"").contains("line 1 is ``"));
        assert!(err(b"members=1\nend\n").contains("expected `fractos-config 1`"));
        assert!(err(b"fractos-config 2\nend\n").contains("version `2`"));
        assert!(err(b"fractos-config\nend\n").contains("version ``"));
        assert_eq!(
            parse_blob(b"fractos-config 1\nmembers=0\n\xff\xfe=1\nend\n").unwrap_err(),
            BlobError::NotUtf8 { line: 3 }
        );
        assert_eq!(
            parse_blob(b"fractos-config 1\nmembers=0\0\0\0\nend\n").unwrap_err(),
            BlobError::Nul { line: 2 }
        );
        assert_eq!(
            parse_blob(blob("node=1\n# x\nnode=2\n").as_bytes()).unwrap_err(),
            BlobError::DuplicateKey {
                line: 4,
                key: "node",
                first: 2
            }
        );
        assert_eq!(
            parse_blob(blob("members=0,1,2,1\n").as_bytes()).unwrap_err(),
            BlobError::DuplicateNode {
                line: 2,
                key: "members",
                node: 1
            }
        );
        assert!(
            err(blob("peers=1@10.1.0.2,1@10.1.0.3\n").as_bytes()).contains("node 1 appears twice")
        );
        assert_eq!(
            parse_blob(blob("peers=1@10.1.0.2,x@10.1.0.3\n").as_bytes()).unwrap_err(),
            BlobError::BadValue {
                line: 2,
                key: "peers",
                value: "x@10.1.0.3",
                expected: "comma-separated node@ipv4[:port], like 1@10.1.0.2"
            }
        );
        assert!(
            err(blob("fractos.members=1\n").as_bytes()).contains("unknown key `fractos.members`")
        );
        assert!(
            err(blob("members\n").as_bytes()).contains("line 2 is `members`: expected key=value")
        );
        for key in BOOT_ONLY {
            let e = err(blob(&alloc::format!("{key}=x\n")).as_bytes());
            assert!(e.contains("is a boot option"), "{e}");
            assert!(!e.contains("=x"), "a key's value is never echoed: {e}");
        }
        assert_eq!(
            parse_blob(b"fractos-config 1\nend\nnode=1\n").unwrap_err(),
            BlobError::AfterEnd { line: 3 }
        );
        assert!(err(blob("process_port=0\n").as_bytes()).contains("expected a TCP port"));
        // A list over the item limit, and a giant value: clipped in the message.
        let many: Vec<alloc::string::String> = (0..MAX_LIST_ITEMS as u32 + 1)
            .map(|n| n.to_string())
            .collect();
        assert_eq!(
            parse_blob(blob(&alloc::format!("members={}\n", many.join(","))).as_bytes())
                .unwrap_err(),
            BlobError::TooManyItems {
                line: 2,
                key: "members",
                count: MAX_LIST_ITEMS + 1,
                max: MAX_LIST_ITEMS
            }
        );
        let giant = alloc::format!("ip={}\n", "9".repeat(100_000));
        let e = err(blob(&giant).as_bytes());
        assert!(e.len() < 300, "{e}");
        assert!(e.contains("99999…"), "{e}");
    }

    #[test]
    fn blob_parse_never_panics_on_mangled_input() {
        // Every prefix and every single-byte corruption of a valid file
        // either parses or returns an error.
        let good = blob("members=0,1\npeers=1@10.1.0.2:7101\nip1=10.1.0.1/16\n");
        for cut in 0..good.len() {
            let _ = parse_blob(&good.as_bytes()[..cut]);
        }
        for at in 0..good.len() {
            for b in [0u8, b'\n', b'=', b',', b'@', b':', 0xff, b'#'] {
                let mut m = good.clone().into_bytes();
                m[at] = b;
                let _ = parse_blob(&m);
            }
        }
    }

    #[test]
    fn pvh_command_line_over_the_rom_buffer_is_named() {
        assert!(check_pvh_cmdline_size(0).is_ok());
        assert!(check_pvh_cmdline_size(QEMU_PVH_CMDLINE_MAX).is_ok());
        let e = check_pvh_cmdline_size(5121).unwrap_err();
        assert_eq!(
            e,
            CmdlineError::PvhOverflow {
                size: 5121,
                max: 4096
            }
        );
        let msg = e.to_string();
        assert!(
            msg.contains("5121 bytes") && msg.contains("at most 4096"),
            "{msg}"
        );
        assert!(msg.contains("opt/org.fractos/config"), "{msg}");
        assert!(!msg.contains("not PVH-compliant"), "{msg}");
    }

    #[test]
    fn a_static_address_on_the_command_line_replaces_dhcp_in_the_file() {
        let text = blob("ip=dhcp\n");
        let l = Config::layered("fractos.ip=10.0.2.20/24", text.as_bytes(), |e| {
            panic!("{e}")
        })
        .unwrap();
        assert!(
            !l.config.ip_dhcp,
            "the command line's static address must win"
        );
        assert_eq!(l.config.ip, Ipv4Net::parse("10.0.2.20/24").unwrap());
        assert_eq!(l.overridden, ["ip"]);
        // And within one command line the last word wins, either way.
        assert!(!Config::parse("fractos.ip=dhcp fractos.ip=10.0.2.2/24", |_| {}).ip_dhcp);
        assert!(Config::parse("fractos.ip=10.0.2.2/24 fractos.ip=dhcp", |_| {}).ip_dhcp);
        // A bad static address leaves dhcp on (the option keeps its value).
        assert!(Config::parse("fractos.ip=dhcp fractos.ip=10.0.2/24", |_| {}).ip_dhcp);
    }

    mod props {
        use super::*;
        use crate::fuzz::{Rng, PRINTABLE};
        use alloc::format;
        use alloc::string::{String, ToString};

        const KEYS: [&str; 18] = [
            "node",
            "ip",
            "gw",
            "ip1",
            "members",
            "peers",
            "process_port",
            "peer_port",
            "metrics_port",
            "test_port",
            "storage_names",
            "idle",
            "peer_security",
            "rdma",
            "rc_mtu",
            "log",
            "key",
            "bogus",
        ];
        const VALUE_CHARS: &[u8] = b"0123456789abcdefxyz.,@:/=# \\-\r\t";

        /// A line that looks like a configuration line, or not.
        fn line(r: &mut Rng) -> String {
            match r.below(4) {
                0 | 1 => format!("{}={}", r.pick(&KEYS), r.text(VALUE_CHARS, 40)),
                2 => r.text(PRINTABLE, 40),
                _ => r.pick(&["end", "", "# c", "fractos-config 1"]).to_string(),
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic() {
            let mut r = Rng::new(0xc0f1);
            for _ in 0..5000 {
                let mut bytes = r.bytes(600);
                if r.chance(2) {
                    bytes.splice(0..0, b"fractos-config 1\n".iter().copied());
                }
                match parse_blob(&bytes) {
                    Ok((_, keys)) => {
                        assert!(bytes.windows(14).any(|w| w == b"fractos-config"));
                        assert!(keys.iter().all(|k| !BOOT_ONLY.contains(k)));
                    }
                    Err(e) => assert!(!e.to_string().is_empty()),
                }
            }
        }

        #[test]
        fn configuration_shaped_text_never_panics() {
            let mut r = Rng::new(0xc0f2);
            let mut accepted = 0;
            for _ in 0..5000 {
                let mut text = String::new();
                if !r.chance(8) {
                    text.push_str("fractos-config 1\n");
                }
                for _ in 0..r.below(12) {
                    text.push_str(&line(&mut r));
                    text.push('\n');
                }
                if !r.chance(4) {
                    text.push_str("end\n");
                }
                match parse_blob(text.as_bytes()) {
                    Ok((_, keys)) => {
                        accepted += 1;
                        let first = text.lines().next().unwrap_or("");
                        assert!(first.trim().starts_with("fractos-config"), "{text}");
                        let mut sorted = keys.clone();
                        sorted.sort_unstable();
                        sorted.dedup();
                        assert_eq!(sorted.len(), keys.len(), "a key accepted twice: {text}");
                    }
                    // Clipped: a hostile value never floods the console.
                    Err(e) => assert!(e.to_string().len() < 600, "{e}"),
                }
            }
            assert!(accepted > 0, "the generator reaches accepted files");
        }

        #[test]
        fn arbitrary_command_lines_never_panic() {
            let mut r = Rng::new(0xc0f3);
            for _ in 0..5000 {
                let mut cmdline = r.text(PRINTABLE, 100);
                for _ in 0..r.below(4) {
                    cmdline.push_str(&format!(" fractos.{}", line(&mut r)));
                }
                let c = Config::parse(&cmdline, |e| {
                    let _ = e.to_string();
                });
                // Lists stay lists of distinct nodes whatever was given.
                let mut m = c.members.clone();
                m.sort_unstable();
                m.dedup();
                assert_eq!(m.len(), c.members.len(), "{cmdline}");
            }
        }

        #[test]
        fn cluster_lists_round_trip() {
            let mut r = Rng::new(0xc0f4);
            for _ in 0..300 {
                let members: alloc::collections::BTreeSet<u32> =
                    (0..r.below(50)).map(|_| r.u64() as u32).collect();
                let peers: alloc::collections::BTreeMap<u32, Peer> = (0..r.below(50))
                    .map(|_| {
                        let node = r.u64() as u32;
                        let port = match r.below(3) {
                            0 => None,
                            _ => Some((r.below(u64::from(u16::MAX)) + 1) as u16),
                        };
                        let addr = Ipv4Addr::from(r.u64() as u32);
                        (node, Peer { node, addr, port })
                    })
                    .collect();
                let members: Vec<u32> = members.into_iter().collect();
                let peers: Vec<Peer> = peers.into_values().collect();
                let items = |v: Vec<String>| v.join(",");
                let body = format!(
                    "members={}\npeers={}\n",
                    items(members.iter().map(|m| m.to_string()).collect()),
                    items(
                        peers
                            .iter()
                            .map(|p| match p.port {
                                Some(port) => format!("{}@{}:{port}", p.node, p.addr),
                                None => format!("{}@{}", p.node, p.addr),
                            })
                            .collect()
                    ),
                );
                let (c, _) = parse_blob(blob(&body).as_bytes()).unwrap();
                assert_eq!(c.members, members);
                assert_eq!(c.peers, peers);
            }
        }

        #[test]
        fn the_command_line_wins_for_every_port() {
            let mut r = Rng::new(0xc0f5);
            for _ in 0..500 {
                let port = (r.below(u64::from(u16::MAX)) + 1) as u16;
                let other = (r.below(u64::from(u16::MAX)) + 1) as u16;
                let text = blob(&format!("process_port={other}\npeer_port={other}\n"));
                let cmdline = format!("fractos.process_port={port} fractos.peer_port={port}");
                let l = Config::layered(&cmdline, text.as_bytes(), |e| panic!("{e}")).unwrap();
                assert_eq!((l.config.process_port, l.config.peer_port), (port, port));
            }
        }
    }
}
