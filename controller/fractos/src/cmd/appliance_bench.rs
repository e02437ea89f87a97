//! `fractos bench --appliance`: invoke round trip and copy bandwidth
//! through an appliance VM, next to the same through the hosted controller
//! (this very binary) running inside a Debian Linux guest in the same QEMU
//! configuration (TCG, RAM, one virtio-net NIC with user networking and
//! host forwards), measured in the same run; and the same two measurements
//! through the appliance with both processes attached through its
//! shared-memory slots (ivshmem) instead of TCP.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use fractos_adaptors::bench::{measure, BenchConfig, Measured};
use fractos_adaptors::demo::{attach_to, DEMO_KEY};
use fractos_qemu::build::Workspace;
use fractos_qemu::cluster::{Cluster, ClusterSpec, ControllerSetup};
use fractos_qemu::linux_guest::{
    controller_config, free_local_port, LinuxGuest, GUEST_MEMORY_MIB, GUEST_METRICS_PORT,
    GUEST_PROCESS_PORT,
};
use fractos_qemu::node::Accel;
use serde_json::json;

/// What to run.
pub struct ApplianceBench {
    /// Kernel ELF [default: build it].
    pub kernel: Option<PathBuf>,
    /// Accelerator of both VMs.
    pub accel: Accel,
    /// Round trips and copies.
    pub cfg: BenchConfig,
    /// Where to write the JSON.
    pub json: Option<PathBuf>,
}

/// Attaches `name` to `addr`, retrying while the controller comes up.
fn attach_retrying(addr: std::net::SocketAddr, name: &str) -> anyhow::Result<fractos_sdk::Process> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match attach_to(addr, name) {
            Ok(p) => return Ok(p),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e).with_context(|| format!("attaching {name} to {addr}")),
        }
    }
}

fn through(addr: std::net::SocketAddr, cfg: &BenchConfig) -> anyhow::Result<Measured> {
    let a = attach_retrying(addr, "bench-a")?;
    let b = attach_retrying(addr, "bench-b")?;
    Ok(measure(&a, &b, cfg)?)
}

/// Attaches `name` through the slot file `path`.
fn attach_slot(path: &Path, name: &str) -> anyhow::Result<fractos_sdk::Process> {
    let opts = fractos_sdk::AttachOptions::default()
        .op_timeout(Duration::from_secs(20))
        .connect_timeout(Duration::from_secs(60));
    let token = fractos_core::process_token(&DEMO_KEY, name.as_bytes());
    fractos_sdk::Process::attach_slot(path, name, token, opts)
        .with_context(|| format!("attaching {name} through {}", path.display()))
}

/// The appliance's figures: over TCP, then through shared-memory slots.
fn appliance(b: &ApplianceBench, dir: &Path) -> anyhow::Result<(Measured, Measured)> {
    let kernel = super::kernel_or_build(&b.kernel)?;
    let mut setup = ControllerSetup::new(1, DEMO_KEY)?;
    setup.shm_slots = 2;
    let spec = ClusterSpec {
        memory_mib: GUEST_MEMORY_MIB,
        accel: b.accel,
        firmware: fractos_qemu::node::Firmware::Bios,
        ..ClusterSpec::controllers(kernel, dir.join("appliance"), setup.clone())
    };
    let mut c = Cluster::launch(&spec)?;
    c.wait_ready(Duration::from_secs(300))?;
    eprintln!("appliance up; measuring over TCP…");
    let tcp = through(setup.process_addr(0).expect("one node"), &b.cfg)?;
    eprintln!("measuring through shared-memory slots…");
    let slots = setup.slot_paths(0);
    let a = attach_slot(&slots[0], "bench-a")?;
    let s = attach_slot(&slots[1], "bench-b")?;
    let shm = measure(&a, &s, &b.cfg)?;
    Ok((tcp, shm))
}

fn linux_guest(b: &ApplianceBench, dir: &Path) -> anyhow::Result<Measured> {
    eprintln!("preparing the Debian Linux guest (kernel via apt-get download, initramfs)…");
    let mut guest = LinuxGuest::prepare(&Workspace::locate())?;
    // Like with like: the guest runs on the appliance's accelerator.
    guest.accel = b.accel;
    let fractos = std::env::current_exe().context("locating this fractos binary")?;
    let (p, m) = (free_local_port()?, free_local_port()?);
    let (_vm, ready) = guest.launch_controller(
        "linux-guest",
        &fractos,
        &controller_config(0, &DEMO_KEY)?,
        &[(p, GUEST_PROCESS_PORT), (m, GUEST_METRICS_PORT)],
        dir,
        Duration::from_secs(300),
    )?;
    eprintln!(
        "Linux guest up after {:.1} s; measuring…",
        ready.as_secs_f64()
    );
    through(std::net::SocketAddr::from(([127, 0, 0, 1], p)), &b.cfg)
}

/// Runs the benchmark, prints a table and writes the JSON.
pub fn run(b: ApplianceBench) -> anyhow::Result<()> {
    fractos_qemu::node::check_qemu()?;
    let dir = super::default_state_dir().join("bench-appliance");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (app, shm) = appliance(&b, &dir)?;
    let lin = linux_guest(&b, &dir)?;
    let mbps = |m: &Measured| m.copy_gbps * 1000.0;
    let report = json!({
        "appliance_rtt_us": app.invoke_rtt_us,
        "linux_guest_rtt_us": lin.invoke_rtt_us,
        "rtt_ratio": app.invoke_rtt_us / lin.invoke_rtt_us,
        "appliance_copy_mbps": mbps(&app),
        "linux_guest_copy_mbps": mbps(&lin),
        "copy_ratio": mbps(&app) / mbps(&lin),
        "shm_rtt_us": shm.invoke_rtt_us,
        "shm_copy_mbps": mbps(&shm),
        "shm_copy_speedup": mbps(&shm) / mbps(&app),
        "shm_rtt_speedup": app.invoke_rtt_us / shm.invoke_rtt_us,
        "round_trips": b.cfg.round_trips,
        "copy_bytes": b.cfg.copy_bytes,
        "copies": b.cfg.copies,
        "accel": b.accel.name(),
        "memory_mib": GUEST_MEMORY_MIB,
    });
    println!("                       appliance   Linux guest   ratio");
    println!(
        "invoke RTT (median)  {:>9.1} µs {:>10.1} µs  {:>6.3}",
        app.invoke_rtt_us,
        lin.invoke_rtt_us,
        app.invoke_rtt_us / lin.invoke_rtt_us
    );
    println!(
        "copy bandwidth       {:>8.1} MB/s {:>8.1} MB/s  {:>6.3}",
        mbps(&app),
        mbps(&lin),
        mbps(&app) / mbps(&lin)
    );
    println!(
        "through slots (shm): invoke RTT {:.1} µs ({:.1}x TCP), copy {:.1} MB/s ({:.1}x TCP)",
        shm.invoke_rtt_us,
        app.invoke_rtt_us / shm.invoke_rtt_us,
        mbps(&shm),
        mbps(&shm) / mbps(&app)
    );
    if let Some(path) = &b.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
