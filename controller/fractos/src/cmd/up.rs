//! `fractos up`: boot appliances and follow their serial logs.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use fractos_qemu::cluster::{self, Cluster, ClusterSpec, ControllerSetup};
use fractos_qemu::exit::KernelExit;
use fractos_qemu::node::{Accel, Firmware, Machine};

use super::cluster::{ClusterFile, ClusterNode, CLUSTER_FILE};

/// Options of `fractos up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Number of appliances (node ids 0..N).
    #[arg(long, default_value_t = 1)]
    pub nodes: u32,
    /// CPU accelerator: tcg (works everywhere) or kvm (needs /dev/kvm).
    #[arg(long, default_value = "tcg")]
    pub accel: Accel,
    /// Firmware: bios (SeaBIOS; the kernel boots directly via PVH) or uefi
    /// (OVMF from Debian's `ovmf`; each node boots a GRUB ISO built into
    /// the state directory, which needs `grub-efi-amd64-bin`).
    #[arg(long, default_value = "bios")]
    pub firmware: Firmware,
    /// Machine type: pc (PCI: virtio-net-pci NICs, NVMe, shared-memory
    /// slots) or microvm (QEMU's Firecracker-class machine: no PCI,
    /// virtio-mmio NICs announced on the kernel command line; no --nvme,
    /// --shm-slots or --firmware uefi).
    #[arg(long, default_value = "pc")]
    pub machine: Machine,
    /// RAM per appliance in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u32,
    /// virtio-net NICs per appliance.
    #[arg(long, default_value_t = 1)]
    pub nics: u32,
    /// Add an NVMe disk of this many MiB to every appliance (repeatable).
    #[arg(long = "nvme", value_name = "MIB")]
    pub nvme: Vec<u64>,
    /// Extra kernel command line (e.g. "fractos.log=debug").
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Kernel ELF to boot [default: build it].
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Directory for serial logs, pidfiles, disks and key files (default: `<target>/fractos/up` in a source checkout, else `$FRACTOS_STATE_DIR/up` or `~/.local/state/fractos/up`).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Seconds to wait for every node's ready line.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Exit once all nodes are ready, leaving them running (stop them with `fractos down`).
    #[arg(long)]
    pub detach: bool,
    /// Cluster key as 64 hex digits. Visible to every local user in the
    /// process list while `fractos up` runs: prefer --key-file. Default: a
    /// fresh random key, saved in `<state-dir>/cluster.key` (mode 0600).
    #[arg(long, conflicts_with = "key_file")]
    pub key: Option<String>,
    /// File holding the cluster key as 64 hex digits.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Give every appliance N shared-memory slots (ivshmem devices backed by
    /// mode-0600 files under /dev/shm, listed in cluster.json): local
    /// processes attach through one with `Process::attach_slot`.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub shm_slots: u32,
    /// Size of each shared-memory slot in MiB (a power of two).
    #[arg(long, default_value_t = cluster::SHM_SLOT_MIB, value_name = "MIB")]
    pub shm_slot_mib: u64,
    /// Boot the appliances without their controller service (bare kernels).
    #[arg(long)]
    pub no_controller: bool,
    /// Extra names (comma-separated) under which node 0's built-in storage
    /// service publishes its read Request; needs --nvme. `--storage-names
    /// pipeline/storage/read` makes node 0's disk the storage stage of
    /// `fractos demo --cluster`.
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    pub storage_names: Vec<String>,
}

/// Removes the cluster file when `fractos up` (not detached) stops its
/// appliances: what it recorded is no longer running.
struct Forget(PathBuf);

impl Drop for Forget {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn random_key() -> anyhow::Result<[u8; 32]> {
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .context("reading /dev/urandom for a cluster key")?;
    Ok(key)
}

/// Runs `fractos up`.
pub fn run(a: UpArgs) -> anyhow::Result<()> {
    fractos_qemu::node::check_qemu()?;
    let state_dir = a.state_dir.unwrap_or_else(super::default_state_dir);
    // Absolute, so the paths recorded in cluster.json hold from anywhere.
    let state_dir = std::path::absolute(&state_dir)
        .with_context(|| format!("cannot resolve {}", state_dir.display()))?;
    if !a.storage_names.is_empty() && a.nvme.is_empty() {
        anyhow::bail!(
            "--storage-names names node 0's storage service, which needs a disk: add --nvme MIB"
        );
    }
    if let Some(bad) = a
        .storage_names
        .iter()
        .find(|n| n.is_empty() || n.chars().any(|c| c.is_whitespace()))
    {
        anyhow::bail!(
            "--storage-names: {bad:?} is not a name (names are non-empty, without spaces)"
        );
    }
    let leftover = cluster::down(&state_dir)?;
    for (name, pid) in leftover {
        eprintln!("stopped leftover {name} (pid {pid}) from an earlier `fractos up`");
    }
    // What an earlier `fractos up` recorded no longer runs. (The key file
    // stays until the launch rewrites it: --key-file may name it.)
    let recorded = state_dir.join(CLUSTER_FILE);
    if let Err(e) = std::fs::remove_file(&recorded) {
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(e).with_context(|| format!("cannot remove {}", recorded.display()));
        }
    }
    let kernel = super::kernel_or_build(&a.kernel)?;
    let controller = if a.no_controller {
        None
    } else {
        let key = match (&a.key, &a.key_file) {
            (Some(k), _) => fractos_hosted::parse_key(k)?,
            (None, Some(f)) => fractos_hosted::parse_key(
                &std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read {}", f.display()))?,
            )?,
            (None, None) => random_key()?,
        };
        let mut setup = ControllerSetup::new(a.nodes, key)?;
        setup.shm_slots = a.shm_slots;
        setup.shm_slot_mib = a.shm_slot_mib;
        Some(setup)
    };
    if a.no_controller && a.shm_slots > 0 {
        anyhow::bail!("--shm-slots needs the controller service (drop --no-controller)");
    }
    let spec = ClusterSpec {
        nodes: a.nodes,
        kernel,
        cmdline: a.cmdline,
        memory_mib: a.memory,
        nics: a.nics,
        nvme_mib: a.nvme.clone(),
        accel: a.accel,
        firmware: a.firmware,
        machine: a.machine,
        state_dir: state_dir.clone(),
        die_with_parent: !a.detach,
        controller: controller.clone(),
        node_cmdline: if a.storage_names.is_empty() {
            Vec::new()
        } else {
            vec![format!(
                "fractos.storage_names={}",
                a.storage_names.join(",")
            )]
        },
    };
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    ctrlc::set_handler(move || s.store(true, Ordering::SeqCst))
        .context("installing Ctrl-C handler")?;

    let mut c = Cluster::launch(&spec)?;
    eprintln!(
        "launched {} appliance(s) ({}, {}, {}, {} MiB each); serial logs in {}",
        a.nodes,
        a.machine.name(),
        a.accel.name(),
        a.firmware.name(),
        a.memory,
        state_dir.display()
    );
    let mut offsets = vec![0u64; a.nodes as usize];
    let ready = c.wait_ready(Duration::from_secs(a.timeout));
    follow(&spec, &mut offsets)?;
    let times = ready?;
    for (i, t) in times.iter().enumerate() {
        eprintln!("node{i} ready after {} ms", t.as_millis());
    }
    let mut _forget = None;
    if let Some(c) = &controller {
        let nodes: Vec<ClusterNode> = (0..a.nodes)
            .map(|i| {
                let (p, m) = (
                    c.process_addr(i).expect("node"),
                    c.metrics_addr(i).expect("node"),
                );
                eprintln!("node{i}: processes attach to {p}, metrics at http://{m}/metrics");
                let slots = c.slot_paths(i);
                for s in &slots {
                    eprintln!("node{i}: shared-memory slot {}", s.display());
                }
                ClusterNode {
                    node: i,
                    process_addr: p,
                    metrics_addr: m,
                    shm_slots: slots,
                    nvme_mib: a.nvme.clone(),
                    storage_names: if i == 0 {
                        a.storage_names.clone()
                    } else {
                        Vec::new()
                    },
                }
            })
            .collect();
        // The key stays in its own mode-0600 file (written by
        // `Cluster::launch` for the appliances' fw_cfg); cluster.json only
        // names it.
        let key_file = spec.key_file();
        let info = ClusterFile {
            key_file: key_file.clone(),
            nodes,
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let path = state_dir.join(CLUSTER_FILE);
        info.save(&path)?;
        if !a.detach {
            _forget = Some(Forget(path.clone()));
        }
        let which =
            if std::path::absolute(super::default_state_dir()).ok() == Some(state_dir.clone()) {
                String::new()
            } else {
                format!(" --cluster {}", state_dir.display())
            };
        eprintln!(
            "cluster key in {} (mode 0600); addresses in {}; see `fractos status{which}`, \
             `fractos demo --cluster{}`, tokens from `fractos token{which} <process name>`",
            key_file.display(),
            path.display(),
            if which.is_empty() {
                String::new()
            } else {
                format!(" {}", state_dir.display())
            }
        );
    }
    if a.detach {
        // Keep QEMU running: forget the handles without killing.
        for n in c.nodes() {
            eprintln!("node {} runs as pid {}", n.spec().name, n.pid());
        }
        std::mem::forget(c);
        eprintln!("detached; stop with `fractos down`");
        return Ok(());
    }
    eprintln!("following serial logs; Ctrl-C stops all appliances");
    while !stop.load(Ordering::SeqCst) {
        follow(&spec, &mut offsets)?;
        for n in c.nodes() {
            if !n.is_running() {
                let exit = n.wait_exit(Duration::from_secs(1))?;
                let name = n.spec().name.clone();
                follow(&spec, &mut offsets)?;
                if exit != KernelExit::Success {
                    anyhow::bail!("{name} exited: {exit}; stopping the other appliances");
                }
                eprintln!("{name} exited: {exit}");
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("stopping appliances");
    drop(c);
    Ok(())
}

/// Prints new serial output of every node, prefixed with its name.
fn follow(spec: &ClusterSpec, offsets: &mut [u64]) -> anyhow::Result<()> {
    let multi = offsets.len() > 1;
    let mut out = std::io::stdout().lock();
    for (i, off) in offsets.iter_mut().enumerate() {
        let path = spec.node(i as u32).serial_log;
        let Ok(mut f) = std::fs::File::open(&path) else {
            continue;
        };
        f.seek(SeekFrom::Start(*off))?;
        let mut buf = String::new();
        let n = f.read_to_string(&mut buf).unwrap_or(0);
        // Only print whole lines; keep a partial line for next time.
        let end = buf.rfind('\n').map(|p| p + 1).unwrap_or(0);
        for line in buf[..end].lines() {
            if multi {
                writeln!(out, "node{i} | {line}")?;
            } else {
                writeln!(out, "{line}")?;
            }
        }
        *off += if end == 0 && n > 0 { 0 } else { end as u64 };
    }
    out.flush()?;
    Ok(())
}
