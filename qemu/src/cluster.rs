//! Several appliances at once, with a state directory so a later
//! `fractos down` can find and stop them.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::net::{Ipv4Addr, SocketAddr};

use crate::build::IsoModule;
use crate::node::{
    write_private_file, Accel, Appliance, Boot, Firmware, FwCfgFile, L2Segment, Machine, NodeSpec,
    NvmeDisk, ShmSlot,
};
use crate::{QemuError, READY_MARKER};

/// A cluster to launch.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Number of nodes (node ids 0..nodes).
    pub nodes: u32,
    /// Kernel ELF booted by every node (PVH).
    pub kernel: PathBuf,
    /// Extra kernel command line for every node (`fractos.node=<i>` is added).
    pub cmdline: String,
    /// RAM per node in MiB.
    pub memory_mib: u32,
    /// virtio-net NICs per node.
    pub nics: u32,
    /// NVMe disk sizes per node, in MiB (one disk per entry).
    pub nvme_mib: Vec<u64>,
    /// Accelerator.
    pub accel: Accel,
    /// Firmware. With [`Firmware::Uefi`] every node boots a GRUB ISO
    /// (`<state_dir>/node<i>.iso`, built by [`Cluster::launch`]) under
    /// OVMF instead of the kernel ELF via PVH.
    pub firmware: Firmware,
    /// Machine type of every node ([`Machine::Microvm`]: virtio-mmio NICs,
    /// no NVMe disks or shared-memory slots).
    pub machine: Machine,
    /// Directory for serial logs, pidfiles and disk images.
    pub state_dir: PathBuf,
    /// Whether the nodes die with the launching thread (see
    /// [`NodeSpec::die_with_parent`]).
    pub die_with_parent: bool,
    /// Run every node's controller service (and link the nodes), if set.
    pub controller: Option<ControllerSetup>,
    /// Extra kernel command line per node (index = node id; missing
    /// entries add nothing), after [`ClusterSpec::cmdline`].
    pub node_cmdline: Vec<String>,
}

/// The controller service of every node of a cluster: the cluster key, the
/// host ports that reach each node, and the VM-to-VM segment its peers talk
/// over.
///
/// Node `i` gets the key as the fw_cfg file [`KEY_FW_CFG_NAME`] (from
/// [`ClusterSpec::key_file`], written mode 0600 by [`Cluster::launch`]:
/// never on a command line) and a configuration file
/// ([`ControllerSetup::config`]: fw_cfg [`CONFIG_FW_CFG_NAME`], or a
/// Multiboot2 module in an ISO) with `members` (all nodes) and — with
/// more than one node — `ip1` for a second NIC on [`ControllerSetup::l2`]
/// (address `10.1.x.y/16`) and `peers` naming every other node there, so
/// the command line stays short whatever the cluster's size. Its process port (7100) and metrics port (9100) are forwarded
/// from `127.0.0.1:<host port>`.
#[derive(Clone)]
pub struct ControllerSetup {
    /// Cluster key.
    pub key: [u8; 32],
    /// Per node: host ports forwarded to its process and metrics ports.
    pub host_ports: Vec<(u16, u16)>,
    /// The peer network.
    pub l2: L2Segment,
    /// Shared-memory slots per node (0: none), each
    /// [`ControllerSetup::shm_slot_mib`] MiB, backed by
    /// [`ControllerSetup::slot_path`].
    pub shm_slots: u32,
    /// Size of each slot in MiB (a power of two).
    pub shm_slot_mib: u64,
    /// Makes this cluster's slot file names unique on the host.
    pub shm_tag: String,
}

/// Default size of a shared-memory slot in MiB.
pub const SHM_SLOT_MIB: u64 = 32;

impl std::fmt::Debug for ControllerSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerSetup")
            .field("key", &"<redacted>")
            .field("host_ports", &self.host_ports)
            .field("l2", &self.l2)
            .field("shm_slots", &self.shm_slots)
            .finish()
    }
}

/// `key` as 64 hex digits, the form key files (`fractos token --key-file`,
/// the appliance's fw_cfg file) and `fractos controller --key` take.
pub use fractos_hosted::key_hex;

/// The fw_cfg name appliances read their cluster key from.
pub const KEY_FW_CFG_NAME: &str = "opt/fractos/cluster-key";

/// The fw_cfg name appliances read their configuration file from (PVH
/// boots).
pub const CONFIG_FW_CFG_NAME: &str = "opt/org.fractos/config";

/// The command line of the Multiboot2 module holding an appliance's
/// configuration file (ISO boots).
pub const CONFIG_MODULE_NAME: &str = "fractos-config";

/// The first line of a configuration file (format version 1, see
/// docs/appliance.md).
pub const CONFIG_HEADER: &str = "fractos-config 1";

/// Writes `key` as a key file (64 hex digits and a newline) at `path`,
/// mode 0600 from its creation.
pub fn write_key_file(path: &Path, key: &[u8; 32]) -> Result<(), QemuError> {
    write_private_file(path, format!("{}\n", key_hex(key)).as_bytes())
}

/// Guest port of the controller's process listener (the common
/// [`fractos_hosted::PROCESS_PORT`]).
pub const GUEST_PROCESS_PORT: u16 = fractos_hosted::PROCESS_PORT;
/// Guest port of the controller's metrics endpoint.
pub const GUEST_METRICS_PORT: u16 = fractos_hosted::METRICS_PORT;

impl ControllerSetup {
    /// A setup for `nodes` nodes with free host ports and a fresh segment.
    pub fn new(nodes: u32, key: [u8; 32]) -> Result<Self, QemuError> {
        let mut probes = Vec::new();
        let mut ports = Vec::new();
        // Hold every probe until all are picked so no port repeats.
        for _ in 0..nodes * 2 {
            let l = crate::node::bind_probe(|p| std::net::TcpListener::bind(("127.0.0.1", p)))?;
            ports.push(
                l.local_addr()
                    .map_err(QemuError::io("reading the probe socket of", "127.0.0.1"))?
                    .port(),
            );
            probes.push(l);
        }
        Ok(ControllerSetup {
            key,
            host_ports: ports.chunks(2).map(|p| (p[0], p[1])).collect(),
            l2: L2Segment::pick()?,
            shm_slots: 0,
            shm_slot_mib: SHM_SLOT_MIB,
            shm_tag: format!(
                "{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() % 1_000_000_000_000)
            ),
        })
    }

    /// The backing file of node `i`'s slot `j`:
    /// `/dev/shm/fractos-<tag>-node<i>-slot<j>` (mode 0600, one per slot,
    /// so a process can open only the slots it is given).
    pub fn slot_path(&self, i: u32, j: u32) -> PathBuf {
        PathBuf::from(format!("/dev/shm/fractos-{}-node{i}-slot{j}", self.shm_tag))
    }

    /// Node `i`'s slot files, in device order.
    pub fn slot_paths(&self, i: u32) -> Vec<PathBuf> {
        (0..self.shm_slots).map(|j| self.slot_path(i, j)).collect()
    }

    /// Where host processes attach to node `i`.
    pub fn process_addr(&self, i: u32) -> Option<SocketAddr> {
        let (p, _) = *self.host_ports.get(i as usize)?;
        Some(SocketAddr::from((Ipv4Addr::LOCALHOST, p)))
    }

    /// Where node `i`'s metrics are served on the host.
    pub fn metrics_addr(&self, i: u32) -> Option<SocketAddr> {
        let (_, m) = *self.host_ports.get(i as usize)?;
        Some(SocketAddr::from((Ipv4Addr::LOCALHOST, m)))
    }

    /// Node `i`'s address on the peer network.
    pub fn peer_ip(i: u32) -> Ipv4Addr {
        Ipv4Addr::new(10, 1, (((i + 1) >> 8) & 0xff) as u8, ((i + 1) & 0xff) as u8)
    }

    /// The cluster key as 64 hex digits (as key files hold it).
    pub fn key_hex(&self) -> String {
        key_hex(&self.key)
    }

    /// The configuration file of node `i` of `nodes` (never the key):
    /// `members`, and with several nodes `ip1` and `peers`.
    pub fn config(&self, i: u32, nodes: u32) -> String {
        let members: Vec<String> = (0..nodes).map(|n| n.to_string()).collect();
        let mut c = format!("{CONFIG_HEADER}\nmembers={}\n", members.join(","));
        if nodes > 1 {
            let peers: Vec<String> = (0..nodes)
                .filter(|&n| n != i)
                .map(|n| format!("{n}@{}", Self::peer_ip(n)))
                .collect();
            c.push_str(&format!(
                "ip1={}/16\npeers={}\n",
                Self::peer_ip(i),
                peers.join(",")
            ));
        }
        c.push_str("end\n");
        c
    }
}

impl ClusterSpec {
    /// One node per host-port pair of `setup`, each running its controller:
    /// 256 MiB, one user-mode NIC (plus the peer segment with several
    /// nodes), no disks, TCG, dying with the launcher. Adjust fields with
    /// struct-update syntax.
    pub fn controllers(kernel: PathBuf, state_dir: PathBuf, setup: ControllerSetup) -> Self {
        ClusterSpec {
            nodes: setup.host_ports.len() as u32,
            kernel,
            cmdline: String::new(),
            memory_mib: 256,
            nics: 1,
            nvme_mib: Vec::new(),
            accel: Accel::Tcg,
            firmware: Firmware::Bios,
            machine: Machine::Pc,
            state_dir,
            die_with_parent: true,
            controller: Some(setup),
            node_cmdline: Vec::new(),
        }
    }

    /// Where [`Cluster::launch`] writes the cluster key (mode 0600) for
    /// the nodes' fw_cfg: `<state_dir>/cluster.key`.
    pub fn key_file(&self) -> PathBuf {
        self.state_dir.join("cluster.key")
    }

    /// The kernel command line of node `i`: a few scalar options; the
    /// cluster's members and peers are in [`ClusterSpec::node_config`].
    pub fn node_cmdline(&self, i: u32) -> String {
        let own = self.node_cmdline.get(i as usize).map_or("", String::as_str);
        format!("fractos.node={i} {} {own}", self.cmdline)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The configuration file of node `i`, if it runs a controller.
    pub fn node_config(&self, i: u32) -> Option<String> {
        self.controller.as_ref().map(|c| c.config(i, self.nodes))
    }

    /// Where [`Cluster::launch`] writes node `i`'s configuration file:
    /// `<state_dir>/node<i>.config` (passed as fw_cfg
    /// [`CONFIG_FW_CFG_NAME`], or in the ISO as the module
    /// [`CONFIG_MODULE_NAME`]).
    pub fn config_file(&self, i: u32) -> PathBuf {
        self.state_dir.join(format!("node{i}.config"))
    }

    /// The spec of node `i`.
    pub fn node(&self, i: u32) -> NodeSpec {
        let dir = &self.state_dir;
        let cmdline = self.node_cmdline(i);
        let hostfwd = match self
            .controller
            .as_ref()
            .and_then(|c| c.host_ports.get(i as usize))
        {
            Some(&(p, m)) => vec![(p, GUEST_PROCESS_PORT), (m, GUEST_METRICS_PORT)],
            None => Vec::new(),
        };
        let l2 = self
            .controller
            .as_ref()
            .filter(|_| self.nodes > 1)
            .map(|c| c.l2);
        NodeSpec {
            name: format!("node{i}"),
            boot: match self.firmware {
                Firmware::Bios => Boot::Elf {
                    kernel: self.kernel.clone(),
                    cmdline,
                },
                Firmware::Uefi => Boot::Iso(dir.join(format!("node{i}.iso"))),
            },
            memory_mib: self.memory_mib,
            nics: if self.controller.is_some() {
                self.nics.max(1)
            } else {
                self.nics
            },
            hostfwd,
            l2,
            nvme: self
                .nvme_mib
                .iter()
                .enumerate()
                .map(|(j, &size_mib)| NvmeDisk {
                    path: dir.join(format!("node{i}-nvme{j}.img")),
                    size_mib,
                })
                .collect(),
            shm_slots: self
                .controller
                .iter()
                .flat_map(|c| {
                    c.slot_paths(i).into_iter().map(|path| ShmSlot {
                        path,
                        size_mib: c.shm_slot_mib,
                    })
                })
                .collect(),
            accel: self.accel,
            firmware: self.firmware,
            machine: self.machine,
            serial_log: dir.join(format!("node{i}.log")),
            pidfile: Some(dir.join(format!("node{i}.pid"))),
            fw_cfg: self
                .controller
                .iter()
                .flat_map(|_| {
                    let key = FwCfgFile {
                        name: KEY_FW_CFG_NAME.into(),
                        path: self.key_file(),
                    };
                    // An ISO carries the configuration as a module.
                    let config = (self.firmware == Firmware::Bios).then(|| FwCfgFile {
                        name: CONFIG_FW_CFG_NAME.into(),
                        path: self.config_file(i),
                    });
                    std::iter::once(key).chain(config)
                })
                .collect(),
            initrd: None,
            index: i,
            die_with_parent: self.die_with_parent,
        }
    }
}

/// Running appliances; dropping the cluster stops them all.
#[derive(Debug)]
pub struct Cluster {
    nodes: Vec<Appliance>,
}

impl Cluster {
    /// Launches every node of `spec`. If one fails to start, the ones
    /// already started are stopped.
    pub fn launch(spec: &ClusterSpec) -> Result<Self, QemuError> {
        if spec.nodes == 0 {
            return Err(QemuError::Config(
                "a cluster needs at least one node".into(),
            ));
        }
        // Before writing anything: a node the machine cannot have.
        for i in 0..spec.nodes {
            spec.node(i).check_machine()?;
        }
        fs::create_dir_all(&spec.state_dir).map_err(QemuError::io("creating", &spec.state_dir))?;
        if let Some(c) = &spec.controller {
            write_key_file(&spec.key_file(), &c.key)?;
            // For `down`: the slot files of every node.
            let slots: Vec<String> = (0..spec.nodes)
                .flat_map(|i| c.slot_paths(i))
                .map(|p| p.display().to_string())
                .collect();
            let list = spec.state_dir.join(SLOT_LIST);
            fs::write(&list, slots.join("\n")).map_err(QemuError::io("writing", &list))?;
        }
        let mut nodes = Vec::new();
        for i in 0..spec.nodes {
            let node = spec.node(i);
            if let Some(config) = spec.node_config(i) {
                write_private_file(&spec.config_file(i), config.as_bytes())?;
            }
            if let Boot::Iso(iso) = &node.boot {
                // The command line lives in the ISO's grub.cfg and the
                // configuration in a module; the key still comes through
                // fw_cfg, so the ISO holds no secret.
                let modules: Vec<IsoModule> = spec
                    .node_config(i)
                    .map(|_| IsoModule {
                        file: spec.config_file(i),
                        cmdline: CONFIG_MODULE_NAME.into(),
                    })
                    .into_iter()
                    .collect();
                crate::build::build_iso_with_modules(
                    &spec.kernel,
                    &spec.node_cmdline(i),
                    &modules,
                    iso,
                )?;
            }
            nodes.push(Appliance::launch(node)?);
        }
        Ok(Cluster { nodes })
    }

    /// Waits until every node printed its ready line; returns each node's
    /// time from launch to ready.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Vec<Duration>, QemuError> {
        let deadline = Instant::now() + timeout;
        self.nodes
            .iter_mut()
            .map(|n| {
                n.wait_for(
                    READY_MARKER,
                    deadline.saturating_duration_since(Instant::now()),
                )
            })
            .collect()
    }

    /// The nodes.
    pub fn nodes(&mut self) -> &mut [Appliance] {
        &mut self.nodes
    }
}

/// The file in a state directory naming the cluster's shared-memory slot
/// files (one path a line), for [`down`].
const SLOT_LIST: &str = "shm-slots";

/// Removes the slot files a state directory's [`SLOT_LIST`] names (only
/// ones shaped like [`ControllerSetup::slot_path`]'s), then the list.
fn remove_slot_files(state_dir: &Path) {
    let list = state_dir.join(SLOT_LIST);
    let Ok(text) = fs::read_to_string(&list) else {
        return;
    };
    for line in text.lines() {
        let p = Path::new(line);
        let ours = p.parent() == Some(Path::new("/dev/shm"))
            && p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("fractos-") && n.contains("-slot"));
        if ours {
            let _ = fs::remove_file(p);
        }
    }
    let _ = fs::remove_file(&list);
}

/// Stops every QEMU recorded by a pidfile in `state_dir` (as left by an
/// earlier `fractos up`), returning `(pidfile name, pid)` of each stopped.
/// Pids whose process is not QEMU any more are skipped; stale pidfiles are
/// removed.
pub fn down(state_dir: &Path) -> Result<Vec<(String, i32)>, QemuError> {
    let mut stopped = Vec::new();
    remove_slot_files(state_dir);
    let entries = match fs::read_dir(state_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(stopped),
        Err(e) => return Err(QemuError::io("reading", state_dir)(e)),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("pid") {
            continue;
        }
        let pid: Option<i32> = fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        if let Some(pid) = pid.filter(|&p| p > 0 && is_qemu(p)) {
            terminate(pid);
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            stopped.push((name, pid));
        }
        let _ = fs::remove_file(&path);
    }
    stopped.sort();
    Ok(stopped)
}

fn is_qemu(pid: i32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("qemu-system"))
        .unwrap_or(false)
}

fn terminate(pid: i32) {
    // SAFETY: kill(2) with a pid verified to be a QEMU process; no memory.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if is_qemu(pid) {
        // SAFETY: as above.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_specs_are_distinct() {
        let spec = ClusterSpec {
            nodes: 2,
            kernel: "/k".into(),
            cmdline: "fractos.log=debug".into(),
            memory_mib: 64,
            nics: 1,
            nvme_mib: vec![16],
            accel: Accel::Tcg,
            firmware: Firmware::Bios,
            machine: Machine::Pc,
            state_dir: "/s".into(),
            die_with_parent: true,
            controller: None,
            node_cmdline: Vec::new(),
        };
        let n1 = spec.node(1);
        assert_eq!(n1.serial_log, Path::new("/s/node1.log"));
        assert_eq!(n1.pidfile.as_deref(), Some(Path::new("/s/node1.pid")));
        assert_eq!(n1.nvme[0].path, Path::new("/s/node1-nvme0.img"));
        match &n1.boot {
            Boot::Elf { cmdline, .. } => assert_eq!(cmdline, "fractos.node=1 fractos.log=debug"),
            other => panic!("{other:?}"),
        }
        assert!(n1.hostfwd.is_empty() && n1.l2.is_none() && n1.fw_cfg.is_empty());
    }

    #[test]
    fn controller_nodes_are_linked_over_the_segment() {
        let setup = ControllerSetup::new(3, [0xab; 32]).unwrap();
        let spec = ClusterSpec {
            nodes: 3,
            kernel: "/k".into(),
            cmdline: String::new(),
            memory_mib: 64,
            nics: 0,
            nvme_mib: vec![],
            accel: Accel::Tcg,
            firmware: Firmware::Bios,
            machine: Machine::Pc,
            state_dir: "/s".into(),
            die_with_parent: true,
            controller: Some(setup.clone()),
            node_cmdline: Vec::new(),
        };
        let n2 = spec.node(2);
        let Boot::Elf { cmdline, .. } = &n2.boot else {
            panic!("{:?}", n2.boot)
        };
        // Members and peers travel in the configuration file.
        assert_eq!(cmdline, "fractos.node=2");
        assert_eq!(
            n2.fw_cfg,
            [
                FwCfgFile {
                    name: KEY_FW_CFG_NAME.into(),
                    path: "/s/cluster.key".into()
                },
                FwCfgFile {
                    name: CONFIG_FW_CFG_NAME.into(),
                    path: "/s/node2.config".into()
                }
            ]
        );
        assert_eq!(
            spec.node_config(2).unwrap(),
            "fractos-config 1\nmembers=0,1,2\nip1=10.1.0.3/16\npeers=0@10.1.0.1,1@10.1.0.2\nend\n"
        );
        assert!(!spec.node_config(2).unwrap().contains(&setup.key_hex()));
        // An ISO node carries the configuration as a module instead.
        let iso = ClusterSpec {
            firmware: Firmware::Uefi,
            ..spec.clone()
        };
        assert_eq!(iso.node(2).fw_cfg.len(), 1);
        let args = n2.args().join(" ");
        assert!(!args.contains(&setup.key_hex()), "{args}");
        assert!(!format!("{setup:?}").contains(&setup.key_hex()));
        assert_eq!(n2.nics, 1);
        assert_eq!(n2.l2, Some(setup.l2));
        let (p, m) = setup.host_ports[2];
        assert_eq!(
            n2.hostfwd,
            vec![(p, GUEST_PROCESS_PORT), (m, GUEST_METRICS_PORT)]
        );
        assert_eq!(setup.process_addr(2).unwrap().port(), p);
        let mut all: Vec<u16> = setup.host_ports.iter().flat_map(|&(a, b)| [a, b]).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 6, "host ports repeat: {:?}", setup.host_ports);
        let args = n2.args().join(" ");
        assert!(
            args.contains(&format!(
                "socket,id=l2,mcast=239.70.0.1:{},localaddr=127.0.0.1",
                setup.l2.port
            )),
            "{args}"
        );
    }

    #[test]
    fn down_skips_stale_and_foreign_pidfiles() {
        let dir = std::env::temp_dir().join(format!("fractos-down-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        // Our own pid is alive but not QEMU; 0 and garbage are invalid.
        fs::write(dir.join("a.pid"), std::process::id().to_string()).unwrap();
        fs::write(dir.join("b.pid"), "garbage").unwrap();
        fs::write(dir.join("keep.txt"), "x").unwrap();
        assert!(down(&dir).unwrap().is_empty());
        assert!(!dir.join("a.pid").exists() && !dir.join("b.pid").exists());
        assert!(dir.join("keep.txt").exists());
        fs::remove_dir_all(&dir).unwrap();
        assert!(down(&dir).unwrap().is_empty());
    }

    #[test]
    fn a_thousand_nodes_keep_a_short_command_line() {
        let setup = ControllerSetup::new(1, [1; 32]).unwrap();
        let spec = ClusterSpec {
            nodes: 1000,
            ..ClusterSpec::controllers("/k".into(), "/s".into(), setup)
        };
        let Boot::Elf { cmdline, .. } = spec.node(999).boot else {
            panic!()
        };
        assert_eq!(cmdline, "fractos.node=999");
        let config = spec.node_config(999).unwrap();
        assert!(config.len() > 10_000, "{}", config.len());
        assert!(config.contains(",998@10.1.3.231\nend\n"), "{config}");
    }

    #[test]
    fn an_overlong_pvh_command_line_is_refused_by_its_length() {
        let spec = NodeSpec::pvh(
            "big",
            "/k".as_ref(),
            &"x".repeat(5000),
            "/tmp/big.log".as_ref(),
        );
        let e = Appliance::launch(spec).unwrap_err();
        assert!(
            matches!(
                e,
                QemuError::CommandLineTooLong {
                    len: 5000,
                    max: 4095,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("opt/org.fractos/config"), "{e}");
        let iso = crate::build::build_iso("/k".as_ref(), &"y".repeat(4096), "/tmp/x.iso".as_ref());
        assert!(
            matches!(iso, Err(QemuError::CommandLineTooLong { len: 4096, .. })),
            "{iso:?}"
        );
    }

    #[test]
    fn an_oversized_configuration_file_is_refused_before_qemu_starts() {
        let dir = std::env::temp_dir().join(format!("fractos-config-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node0.config");
        write_private_file(&path, &vec![b'#'; (1 << 20) + 1]).unwrap();
        let mut spec = NodeSpec::pvh("big", "/k".as_ref(), "", &dir.join("serial.log"));
        spec.fw_cfg.push(FwCfgFile {
            name: CONFIG_FW_CFG_NAME.into(),
            path: path.clone(),
        });
        let e = Appliance::launch(spec).unwrap_err();
        assert!(
            matches!(e, QemuError::ConfigTooLarge { size, max: 1_048_576, .. } if size == (1 << 20) + 1),
            "{e}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
