//! `fractos demo`: the verification pipeline in three modes on a 3-node
//! cluster with the reference adaptors: three appliance VMs under QEMU
//! (the default when QEMU is installed) or three embedded hosted
//! controllers (the fallback, or `--hosted`).

use std::io::Write;
use std::path::PathBuf;

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use fractos_adaptors::demo::{
    run_in, run_on, wait_linked, DemoConfig, DemoNode, DemoReport, DEMO_KEY,
};
use fractos_adaptors::image::encoded_len;
use fractos_adaptors::netns::{LinkModel, Netns};
use fractos_adaptors::pipeline::names;
use fractos_qemu::cluster::{Cluster, ClusterSpec, ControllerSetup};
use fractos_qemu::node::Accel;

use super::cluster::{cluster_path, ClusterFile};

/// Shared-memory slots of each demo appliance (`--transport local`).
const DEMO_SLOTS: u32 = 2;
/// NVMe disk of each demo appliance, MiB.
const DEMO_DISK_MIB: u64 = 256;

/// Options of `fractos demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Verifications per mode.
    #[arg(long, default_value_t = 50)]
    pub requests: usize,
    /// Image side in pixels (an image is side² bytes).
    #[arg(long, default_value_t = 512)]
    pub image_side: usize,
    /// Distinct images in the store.
    #[arg(long, default_value_t = 8)]
    pub images: usize,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Compute kernel pixel sampling stride per axis (1 = every pixel; the
    /// default 4 samples 1 pixel in 16, standing in for an accelerator so
    /// transfers matter). Printed with every result.
    #[arg(long, default_value_t = 4)]
    pub stride: usize,
    /// Requests of one mode before the next mode runs (the modes alternate
    /// in rounds so machine-load drift falls on all of them).
    #[arg(long, default_value_t = 5)]
    pub block: usize,
    /// Put each node in its own network namespace, joined by veth through a
    /// bridge with the link model below (needs root and iproute2).
    #[arg(long)]
    pub netns: bool,
    /// --netns: one-way delay per hop in microseconds (needs sch_netem).
    #[arg(long, default_value_t = 50)]
    pub delay_us: u32,
    /// --netns: bandwidth of each node's uplink in Mbit/s.
    #[arg(long, default_value_t = 1000)]
    pub rate_mbit: u32,
    /// Run every node's controller as an appliance VM under QEMU (the
    /// default when QEMU is installed), linked over a VM-to-VM segment.
    #[arg(long, conflicts_with_all = ["hosted", "netns"])]
    pub appliance: bool,
    /// Use embedded hosted controllers even when QEMU is installed.
    #[arg(long)]
    pub hosted: bool,
    /// Testing the demo's checks: store the images corrupted (hosted
    /// controllers only); every verification must then fail.
    #[arg(long, hide = true, conflicts_with = "appliance")]
    pub corrupt_stored_images: bool,
    /// How adaptors attach to their controller: `local` (embedded hosted
    /// controllers: a local channel, shared-memory rings and memory the
    /// controller maps; appliances: a shared-memory slot of the
    /// appliance, an ivshmem device) or `tcp` (the old path, for
    /// comparison). Links between controllers are TCP either way.
    #[arg(long, default_value = "local")]
    pub transport: fractos_adaptors::demo::DemoTransport,
    /// --appliance: kernel ELF to boot [default: build it].
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// --appliance: CPU accelerator (tcg works everywhere).
    #[arg(long, default_value = "tcg")]
    pub accel: Accel,
    /// Run on a cluster that is already up instead of booting one: its
    /// `cluster.json` (written by `fractos up`) or that file's directory;
    /// without a value (or with FRACTOS_CLUSTER set), the cluster `fractos
    /// up` recorded. Uses nodes 0, 1 and 2; storage is node 0's storage
    /// service when `fractos up --nvme MIB --storage-names
    /// pipeline/storage/read` made it one, else the reference storage
    /// adaptor attached to node 0.
    #[arg(long, value_name = "FILE|DIR", num_args = 0..=1, default_missing_value = "", env = "FRACTOS_CLUSTER", value_hint = clap::ValueHint::AnyPath)]
    pub cluster: Option<String>,
}

/// Runs `fractos demo`.
pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.requests > 0 && a.images > 0,
        "--requests and --images must be positive"
    );
    anyhow::ensure!(a.image_side >= 16, "--image-side must be at least 16");
    anyhow::ensure!(a.stride >= 1, "--stride must be at least 1");
    let cfg = DemoConfig {
        requests: a.requests,
        image_side: a.image_side,
        images: a.images,
        warmup: 3,
        block: a.block.max(1),
        stride: a.stride,
        storage_write: None,
        corrupt_stored_images: a.corrupt_stored_images,
        transport: a.transport,
    };
    if let Some(c) = &a.cluster {
        anyhow::ensure!(
            !(a.appliance || a.hosted || a.netns || a.corrupt_stored_images),
            "--cluster runs on a cluster that is already up: drop --appliance, --hosted and --netns \
             (or unset FRACTOS_CLUSTER)"
        );
        let report = run_cluster(c, &cfg)?;
        return finish(&a, report);
    }
    let appliance = if a.appliance {
        fractos_qemu::node::check_qemu()
            .context("--appliance needs QEMU (or run with --hosted)")?;
        true
    } else if a.hosted || a.netns || a.corrupt_stored_images {
        false
    } else {
        match fractos_qemu::node::check_qemu() {
            Ok(()) => true,
            Err(e) => {
                eprintln!("{e}\nfalling back to embedded hosted controllers");
                false
            }
        }
    };
    let report = if appliance {
        run_appliances(&a, &cfg)?
    } else {
        run_hosted(&a, &cfg)?
    };
    finish(&a, report)
}

/// Prints and saves the report and checks every score.
fn finish(a: &DemoArgs, report: DemoReport) -> anyhow::Result<()> {
    println!();
    print!("{}", report.table());
    if let Some(path) = &a.json {
        std::fs::write(path, report.to_json())
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    // The pipeline must have computed the right answer in every mode.
    report
        .check()
        .context("the demo's pipeline returned a wrong score")?;
    eprintln!(
        "all {} verifications returned the expected score",
        3 * report.requests
    );
    Ok(())
}

/// Prints the progress of the three (interleaved) modes on one line.
fn progress() -> impl FnMut(&str, usize, usize) {
    let mut done: Vec<(String, usize)> = Vec::new();
    let mut last = String::new();
    move |mode, n, total| {
        match done.iter_mut().find(|(m, _)| m == mode) {
            Some(d) => d.1 = n,
            None => done.push((mode.to_string(), n)),
        }
        let line = format!(
            "\r {}",
            done.iter()
                .map(|(m, d)| format!(" {m} {d:>4}/{total}"))
                .collect::<String>()
        );
        if line != last {
            eprint!("{line}");
            let _ = std::io::stderr().flush();
            last = line;
        }
        if done.len() == 3 && done.iter().all(|(_, d)| *d == total) {
            eprintln!();
        }
    }
}

/// Boots three appliances (nodes 0, 1, 2) and runs the demo on them.
fn run_appliances(a: &DemoArgs, cfg: &DemoConfig) -> anyhow::Result<DemoReport> {
    let kernel = super::kernel_or_build(&a.kernel)?;
    let state_dir = super::default_state_dir().join("demo");
    let leftover = fractos_qemu::cluster::down(&state_dir)?;
    for (name, pid) in leftover {
        eprintln!("stopped leftover {name} (pid {pid}) of an earlier demo");
    }
    let mut setup = ControllerSetup::new(3, DEMO_KEY)?;
    let local = a.transport == fractos_adaptors::demo::DemoTransport::Local;
    if local {
        // Each node's adaptor attaches through a slot of its appliance
        // (one per node; a spare for a retry).
        setup.shm_slots = DEMO_SLOTS;
    }
    let spec = ClusterSpec {
        // Node 0's NVMe disk is the storage stage: its built-in storage
        // service also publishes the pipeline's read name.
        nvme_mib: vec![DEMO_DISK_MIB],
        accel: a.accel,
        firmware: fractos_qemu::node::Firmware::Bios,
        node_cmdline: vec![format!("fractos.storage_names={}", names::STORAGE_READ)],
        ..ClusterSpec::controllers(kernel, state_dir.clone(), setup.clone())
    };
    let mut cluster = Cluster::launch(&spec)?;
    cluster
        .wait_ready(Duration::from_secs(300))
        .with_context(|| format!("serial logs are in {}", state_dir.display()))?;
    let nodes: Vec<DemoNode> = (0..3)
        .map(|i| DemoNode::Remote {
            process_addr: setup.process_addr(i).expect("3 nodes"),
            metrics_addr: setup.metrics_addr(i).expect("3 nodes"),
            key: DEMO_KEY,
            slots: if local {
                setup.slot_paths(i)
            } else {
                Vec::new()
            },
        })
        .collect();
    wait_linked(&nodes, 2, Duration::from_secs(120))
        .with_context(|| format!("serial logs are in {}", state_dir.display()))?;
    eprintln!(
        "FractOS pipeline demo: storage (node 0's NVMe, built-in storage service) -> compute (node 1) -> client (node 2), appliance VMs ({}; adaptors attached {}; serial logs in {})",
        a.accel.name(),
        if local { "through shared-memory slots" } else { "over TCP" },
        state_dir.display()
    );
    for i in 0..3 {
        eprintln!(
            "  node{i}: processes {} metrics http://{}/metrics",
            setup.process_addr(i).expect("3 nodes"),
            setup.metrics_addr(i).expect("3 nodes")
        );
    }
    let mut cfg = cfg.clone();
    cfg.storage_write = Some("storage/0/write".into());
    let needed = (cfg.images as u64) * (encoded_len(cfg.image_side, cfg.image_side) as u64);
    anyhow::ensure!(
        needed <= DEMO_DISK_MIB << 20,
        "{} images of {} pixels need {needed} bytes; the appliance disk has {DEMO_DISK_MIB} MiB",
        cfg.images,
        cfg.image_side
    );
    let report = run_on(&cfg, &nodes, None, progress()).context("the demo failed")?;
    drop(cluster);
    Ok(report)
}

/// Runs the demo on nodes 0, 1 and 2 of the cluster recorded at `arg`.
fn run_cluster(arg: &str, cfg: &DemoConfig) -> anyhow::Result<DemoReport> {
    let path = cluster_path(Some(arg));
    let cluster = ClusterFile::load(&path)?;
    anyhow::ensure!(
        cluster.nodes.len() >= 3,
        "the demo needs 3 nodes and {} has {}: start the cluster with `fractos up --nodes 3`",
        path.display(),
        cluster.nodes.len()
    );
    let key = cluster.key()?;
    let used = &cluster.nodes[..3];
    let nodes: Vec<DemoNode> = used
        .iter()
        .map(|n| DemoNode::Remote {
            process_addr: n.process_addr,
            metrics_addr: n.metrics_addr,
            key,
            // Slots recorded by `fractos up --shm-slots`, unless the user
            // asked for TCP.
            slots: if cfg.transport == fractos_adaptors::demo::DemoTransport::Local {
                n.shm_slots.clone()
            } else {
                Vec::new()
            },
        })
        .collect();
    wait_linked(&nodes, 2, Duration::from_secs(120)).with_context(|| {
        format!(
            "the nodes of {} are not linked (is the cluster up? see `fractos status`)",
            path.display()
        )
    })?;
    let mut cfg = cfg.clone();
    let store = &used[0];
    let needed = (cfg.images as u64) * (encoded_len(cfg.image_side, cfg.image_side) as u64);
    let storage = if store.storage_names.iter().any(|n| n == names::STORAGE_READ) {
        let disk = store.nvme_mib.first().copied().unwrap_or(0);
        anyhow::ensure!(
            needed <= disk << 20,
            "{} images of {} pixels need {needed} bytes; node 0's disk has {disk} MiB",
            cfg.images,
            cfg.image_side
        );
        cfg.storage_write = Some("storage/0/write".into());
        "node 0's NVMe, built-in storage service"
    } else {
        "the reference storage adaptor attached to node 0"
    };
    eprintln!(
        "FractOS pipeline demo on the cluster in {}: storage ({storage}) -> compute (node 1) -> client (node 2)",
        path.display()
    );
    for n in used {
        eprintln!(
            "  node{}: processes {} metrics http://{}/metrics",
            n.node, n.process_addr, n.metrics_addr
        );
    }
    run_on(&cfg, &nodes, None, progress()).context("the demo failed")
}

fn run_hosted(a: &DemoArgs, cfg: &DemoConfig) -> anyhow::Result<DemoReport> {
    let net = if a.netns {
        let model = LinkModel {
            delay_us: a.delay_us,
            rate_mbit: a.rate_mbit,
        };
        Some(Netns::create(3, model).context("cannot set up network namespaces")?)
    } else {
        None
    };
    eprintln!(
        "FractOS pipeline demo: storage (node 1) -> compute (node 2) -> client (node 3), hosted controllers{}",
        if a.netns { " in network namespaces" } else { " on loopback" }
    );
    run_in(cfg, net.as_ref(), progress()).context("the demo failed")
}
