//! `fractos bench boot`: boot-to-ready time against a Debian Linux kernel.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use fractos_qemu::build::Workspace;
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
    /// Median wall time from QEMU start to the appliance's ready line, next to
    /// a Debian Linux kernel booted in the same QEMU configuration to its
    /// root-mount panic.
    Boot(BootArgs),
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

fn boot(a: BootArgs) -> anyhow::Result<()> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    fractos_qemu::node::check_qemu()?;
    let ws = Workspace::locate();
    let images = super::image::build_images(None, "fractos.log=info fractos.node=0")?;
    let dir = ws.target.join("fractos").join("bench");
    std::fs::create_dir_all(&dir)?;
    let linux = match &a.linux_kernel {
        Some(k) => k.clone(),
        None => fetch_debian_kernel(&ws.target.join("linux"))?,
    };

    let fractos = Boot::Elf {
        kernel: images.elf.clone(),
        cmdline: "fractos.node=0".into(),
    };
    let linux_boot = Boot::Linux {
        kernel: linux.clone(),
        cmdline: "console=ttyS0 panic=-1".into(),
    };
    // Alternate the two so that background load hits both alike.
    let (mut f, mut l) = (Vec::new(), Vec::new());
    for i in 1..=a.runs {
        f.push(time_boot("fractos", &fractos, READY_MARKER, &a, &dir)?);
        l.push(time_boot("linux", &linux_boot, LINUX_MARKER, &a, &dir)?);
        eprintln!(
            "run {i}/{}: fractos {:.1} ms, linux {:.1} ms",
            a.runs,
            f[i - 1],
            l[i - 1]
        );
    }
    let (fm, lm) = (median(&mut f), median(&mut l));
    let ratio = fm / lm;
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
    });
    println!("boot to ready (median of {}, {}):", a.runs, a.accel.name());
    println!("  fractos  {fm:>9.1} ms");
    println!("  linux    {lm:>9.1} ms  ({})", linux.display());
    println!("  ratio    {ratio:>9.4}");
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

/// Downloads Debian's current `linux-image-*-amd64` package (the one
/// `linux-image-amd64` depends on) into `dir` and returns its vmlinuz.
fn fetch_debian_kernel(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    if let Some(k) = find_vmlinuz(&dir.join("root"))? {
        return Ok(k);
    }
    let out = Command::new("apt-cache")
        .args(["depends", "linux-image-amd64"])
        .output()
        .context("running apt-cache (Debian/Ubuntu only; or pass --linux-kernel PATH)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let pkg = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && !p.contains("unsigned"))
        .map(str::to_string)
        .context("apt-cache knows no linux-image-amd64: run `apt-get update` first, or pass --linux-kernel PATH")?;
    eprintln!("fetching {pkg} with apt-get download");
    let st = Command::new("apt-get")
        .args(["download", &pkg])
        .current_dir(dir)
        .status()
        .context("running apt-get")?;
    if !st.success() {
        bail!("`apt-get download {pkg}` failed ({st}); pass --linux-kernel PATH instead");
    }
    let deb = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download produced no .deb")?;
    let st = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(dir.join("root"))
        .status()
        .context("running dpkg-deb")?;
    if !st.success() {
        bail!("`dpkg-deb -x {}` failed ({st})", deb.display());
    }
    find_vmlinuz(&dir.join("root"))?.context("the package has no /boot/vmlinuz-*")
}

fn find_vmlinuz(root: &Path) -> anyhow::Result<Option<PathBuf>> {
    let boot = root.join("boot");
    if !boot.is_dir() {
        return Ok(None);
    }
    Ok(std::fs::read_dir(boot)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        }))
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
