//! `fractos bench boot`: boot time against a Debian Linux kernel, twice:
//!
//! * *kernel ready* — QEMU start to the appliance's ready line (no cluster
//!   key, so no controller service) vs Debian's kernel to its root-mount
//!   panic (no initramfs): both kernels alone;
//! * *serving* — QEMU start until a process has attached to a controller:
//!   the appliance with a cluster key (fw_cfg) serving on its NIC vs the
//!   same kernel with our initramfs (modules, network, `fractos
//!   controller`), both with [`GUEST_MEMORY_MIB`] and one virtio-net NIC on
//!   user networking with a host forward.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use fractos_adaptors::demo::{attach_to, DEMO_KEY};
use fractos_qemu::build::Workspace;
use fractos_qemu::cluster::{Cluster, ClusterSpec, ControllerSetup};
use fractos_qemu::linux_guest::{
    controller_config, free_local_port, LinuxGuest, GUEST_MEMORY_MIB, GUEST_PROCESS_PORT,
};
use fractos_qemu::node::{Accel, Appliance, Boot, NodeSpec};
use fractos_qemu::READY_MARKER;
use serde_json::json;

/// `fractos bench [boot]`
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    /// A specific benchmark; none runs the micro-benchmarks.
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
    #[command(flatten)]
    pub micro: super::micro::MicroArgs,
}

/// `fractos bench ...`
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Median wall time from QEMU start to the appliance's ready line next
    /// to a Debian Linux kernel booted to its root-mount panic, and until a
    /// process has attached to the appliance's controller next to `fractos
    /// controller` in a Linux guest.
    Boot(BootArgs),
    /// Read throughput (128 KiB) and IOPS (4 KiB) of the appliance's
    /// built-in storage service end to end, next to the same NVMe disk
    /// read inside a Debian Linux guest.
    Nvme(super::nvme_bench::NvmeArgs),
}

/// Options of `fractos bench boot`.
#[derive(Debug, Args)]
pub struct BootArgs {
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Boots per kernel (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// RAM per VM in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u32,
    /// CPU accelerator.
    #[arg(long, default_value = "tcg")]
    pub accel: Accel,
    /// Linux bzImage for the baseline [default: fetch Debian's
    /// linux-image-amd64 with apt-get download into target/linux].
    #[arg(long)]
    pub linux_kernel: Option<PathBuf>,
}

const LINUX_MARKER: &str = "Kernel panic";

/// Runs `fractos bench ...`.
pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    match a.command {
        Some(BenchCommand::Boot(b)) => boot(b),
        Some(BenchCommand::Nvme(n)) => super::nvme_bench::run(n),
        None => super::micro::run(a.micro),
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn spec(name: &str, boot: Boot, a: &BootArgs, dir: &Path) -> NodeSpec {
    let mut s = NodeSpec::new(name, boot, &dir.join(format!("{name}.log")));
    s.memory_mib = a.memory;
    s.nics = 1;
    s.accel = a.accel;
    s
}

/// Boots `boot` once and returns the wall time from launch to `marker`.
fn time_boot(
    name: &str,
    boot: &Boot,
    marker: &str,
    a: &BootArgs,
    dir: &Path,
) -> anyhow::Result<f64> {
    let mut vm = Appliance::launch(spec(name, boot.clone(), a, dir))?;
    let t = vm.wait_for(marker, Duration::from_secs(600))?;
    vm.kill();
    Ok(t.as_secs_f64() * 1000.0)
}

/// After `ready` (time from launch to the ready line), attaches a process
/// to `addr` until it succeeds; returns launch-to-attached in ms.
fn until_attached(addr: std::net::SocketAddr, ready: Duration) -> anyhow::Result<f64> {
    let t = std::time::Instant::now();
    loop {
        match attach_to(addr, "boot-probe") {
            Ok(p) => {
                drop(p);
                return Ok((ready + t.elapsed()).as_secs_f64() * 1000.0);
            }
            Err(e) if t.elapsed() < Duration::from_secs(120) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("no process could attach"),
        }
    }
}

/// The appliance with a controller: (ms to the ready line, ms until a
/// process attached).
fn appliance_serving(elf: &Path, a: &BootArgs, dir: &Path) -> anyhow::Result<(f64, f64)> {
    let setup = ControllerSetup::new(1, DEMO_KEY)?;
    let spec = ClusterSpec {
        memory_mib: GUEST_MEMORY_MIB,
        accel: a.accel,
        firmware: fractos_qemu::node::Firmware::Bios,
        ..ClusterSpec::controllers(elf.to_path_buf(), dir.join("serving"), setup.clone())
    };
    let mut c = Cluster::launch(&spec)?;
    let ready = c.wait_ready(Duration::from_secs(600))?[0];
    let serving = until_attached(setup.process_addr(0).expect("one node"), ready)?;
    drop(c);
    Ok((ready.as_secs_f64() * 1000.0, serving))
}

/// The Linux guest running `fractos controller`: (ms to the guest init's
/// ready line, ms until a process attached).
fn linux_serving(guest: &LinuxGuest, dir: &Path) -> anyhow::Result<(f64, f64)> {
    let fractos = std::env::current_exe().context("locating this fractos binary")?;
    let port = free_local_port()?;
    let (vm, ready) = guest.launch_controller(
        "linux-serving",
        &fractos,
        &controller_config(0, &DEMO_KEY)?,
        &[(port, GUEST_PROCESS_PORT)],
        dir,
        Duration::from_secs(600),
    )?;
    let serving = until_attached(std::net::SocketAddr::from(([127, 0, 0, 1], port)), ready)?;
    drop(vm);
    Ok((ready.as_secs_f64() * 1000.0, serving))
}

fn boot(a: BootArgs) -> anyhow::Result<()> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    fractos_qemu::node::check_qemu()?;
    let ws = Workspace::locate();
    let images = super::image::build_images(None, "fractos.log=info fractos.node=0", None)?;
    let dir = ws.target.join("fractos").join("bench");
    std::fs::create_dir_all(&dir)?;
    let linux = match &a.linux_kernel {
        Some(k) => k.clone(),
        None => {
            fractos_qemu::linux_guest::fetch_debian_kernel(&ws.target.join("linux"))
                .context("fetching Debian's kernel (or pass --linux-kernel PATH)")?
                .vmlinuz
        }
    };

    let fractos = Boot::Elf {
        kernel: images.elf.clone(),
        cmdline: "fractos.node=0".into(),
    };
    let linux_boot = Boot::Linux {
        kernel: linux.clone(),
        cmdline: "console=ttyS0 panic=-1".into(),
        initrd: None,
    };
    let mut guest = LinuxGuest::prepare(&ws).context("preparing the Linux guest")?;
    guest.accel = a.accel;
    // Alternate all four so that background load hits them alike.
    let (mut f, mut l) = (Vec::new(), Vec::new());
    let (mut fs, mut ls) = (Vec::new(), Vec::new());
    for i in 1..=a.runs {
        f.push(time_boot("fractos", &fractos, READY_MARKER, &a, &dir)?);
        l.push(time_boot("linux", &linux_boot, LINUX_MARKER, &a, &dir)?);
        fs.push(appliance_serving(&images.elf, &a, &dir)?.1);
        ls.push(linux_serving(&guest, &dir)?.1);
        eprintln!(
            "run {i}/{}: kernel ready: fractos {:.1} ms, linux {:.1} ms; serving: fractos {:.1} ms, linux {:.1} ms",
            a.runs,
            f[i - 1],
            l[i - 1],
            fs[i - 1],
            ls[i - 1]
        );
    }
    let (fm, lm) = (median(&mut f), median(&mut l));
    let ratio = fm / lm;
    let (fsm, lsm) = (median(&mut fs), median(&mut ls));
    let serving_ratio = fsm / lsm;
    let r1 = |x: f64| (x * 10.0).round() / 10.0;
    let result = json!({
        "boot_ready_ms": (fm * 10.0).round() / 10.0,
        "linux_boot_ms": (lm * 10.0).round() / 10.0,
        "boot_ratio": (ratio * 10000.0).round() / 10000.0,
        "elf_bytes": images.elf_bytes,
        "iso_bytes": images.iso_bytes,
        "runs": a.runs,
        "accel": a.accel.name(),
        "memory_mib": a.memory,
        "fractos_ms": f.iter().map(|x| (x * 10.0).round() / 10.0).collect::<Vec<_>>(),
        "linux_ms": l.iter().map(|x| (x * 10.0).round() / 10.0).collect::<Vec<_>>(),
        "linux_kernel": linux.display().to_string(),
        "linux_marker": LINUX_MARKER,
        "boot_serving_ms": r1(fsm),
        "linux_serving_ms": r1(lsm),
        "serving_ratio": (serving_ratio * 10000.0).round() / 10000.0,
        "serving_memory_mib": GUEST_MEMORY_MIB,
        "fractos_serving_ms": fs.iter().map(|x| r1(*x)).collect::<Vec<_>>(),
        "linux_serving_ms_runs": ls.iter().map(|x| r1(*x)).collect::<Vec<_>>(),
    });
    println!("kernel ready (median of {}, {}):", a.runs, a.accel.name());
    println!("  fractos  {fm:>9.1} ms  (ready line, no controller service)");
    println!(
        "  linux    {lm:>9.1} ms  (root-mount panic, {})",
        linux.display()
    );
    println!("  ratio    {ratio:>9.4}");
    println!("serving a process (QEMU start until a process attached):");
    println!("  fractos  {fsm:>9.1} ms  (appliance controller, key via fw_cfg)");
    println!("  linux    {lsm:>9.1} ms  (initramfs: modules, network, fractos controller)");
    println!("  ratio    {serving_ratio:>9.4}");
    println!(
        "  ELF {} bytes, ISO {} bytes",
        images.elf_bytes, images.iso_bytes
    );
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&result)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
        println!("wrote {}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
