//! Several appliances at once, with a state directory so a later
//! `fractos down` can find and stop them.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::node::{Accel, Appliance, Boot, NodeSpec, NvmeDisk};
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
    /// Directory for serial logs, pidfiles and disk images.
    pub state_dir: PathBuf,
    /// Whether the nodes die with the launching thread (see
    /// [`NodeSpec::die_with_parent`]).
    pub die_with_parent: bool,
}

impl ClusterSpec {
    /// The spec of node `i`.
    pub fn node(&self, i: u32) -> NodeSpec {
        let dir = &self.state_dir;
        let cmdline = format!("fractos.node={i} {}", self.cmdline)
            .trim()
            .to_string();
        NodeSpec {
            name: format!("node{i}"),
            boot: Boot::Elf {
                kernel: self.kernel.clone(),
                cmdline,
            },
            memory_mib: self.memory_mib,
            nics: self.nics,
            hostfwd: Vec::new(),
            nvme: self
                .nvme_mib
                .iter()
                .enumerate()
                .map(|(j, &size_mib)| NvmeDisk {
                    path: dir.join(format!("node{i}-nvme{j}.img")),
                    size_mib,
                })
                .collect(),
            accel: self.accel,
            serial_log: dir.join(format!("node{i}.log")),
            pidfile: Some(dir.join(format!("node{i}.pid"))),
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
        fs::create_dir_all(&spec.state_dir).map_err(QemuError::io("creating", &spec.state_dir))?;
        let mut nodes = Vec::new();
        for i in 0..spec.nodes {
            nodes.push(Appliance::launch(spec.node(i))?);
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

/// Stops every QEMU recorded by a pidfile in `state_dir` (as left by an
/// earlier `fractos up`), returning `(pidfile name, pid)` of each stopped.
/// Pids whose process is not QEMU any more are skipped; stale pidfiles are
/// removed.
pub fn down(state_dir: &Path) -> Result<Vec<(String, i32)>, QemuError> {
    let mut stopped = Vec::new();
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
            state_dir: "/s".into(),
            die_with_parent: true,
        };
        let n1 = spec.node(1);
        assert_eq!(n1.serial_log, Path::new("/s/node1.log"));
        assert_eq!(n1.pidfile.as_deref(), Some(Path::new("/s/node1.pid")));
        assert_eq!(n1.nvme[0].path, Path::new("/s/node1-nvme0.img"));
        match &n1.boot {
            Boot::Elf { cmdline, .. } => assert_eq!(cmdline, "fractos.node=1 fractos.log=debug"),
            other => panic!("{other:?}"),
        }
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
}
