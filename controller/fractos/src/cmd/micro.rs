//! `fractos bench` (no subcommand): invoke round trip and copy bandwidth
//! through hosted controllers, against raw TCP measured in the same run.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use fractos_adaptors::bench::{run as run_bench, BenchConfig};

/// Options of the micro-benchmarks.
#[derive(Debug, Args)]
pub struct MicroArgs {
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Invoke round trips measured.
    #[arg(long, default_value_t = 2000)]
    pub round_trips: usize,
    /// Copies of 4 MiB measured.
    #[arg(long, default_value_t = 20)]
    pub copies: usize,
    /// Microseconds controllers and processes poll local rings before they
    /// sleep on their eventfds.
    #[arg(long)]
    pub local_spin_us: Option<u64>,
    /// Measure through an appliance VM and through the hosted controller
    /// in a Debian Linux guest (QEMU) instead of two embedded controllers.
    #[arg(long)]
    pub appliance: bool,
    /// --appliance: kernel ELF to boot [default: build it].
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// --appliance: CPU accelerator of both VMs.
    #[arg(long, default_value = "tcg")]
    pub accel: fractos_qemu::node::Accel,
}

/// Runs the micro-benchmarks.
pub fn run(a: MicroArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.round_trips >= 10 && a.copies > 0,
        "--round-trips must be >= 10 and --copies > 0"
    );
    let mut cfg = BenchConfig {
        round_trips: a.round_trips,
        copies: a.copies,
        ..BenchConfig::default()
    };
    if let Some(us) = a.local_spin_us {
        cfg.local_spin = std::time::Duration::from_micros(us);
    }
    if a.appliance {
        return super::appliance_bench::run(super::appliance_bench::ApplianceBench {
            kernel: a.kernel,
            accel: a.accel,
            cfg,
            json: a.json,
        });
    }
    eprintln!("benchmarking invoke round trips and 4 MiB copies through two hosted controllers, and 64 MiB copies on one...");
    let r = run_bench(&cfg).context("the benchmark failed")?;
    print!("{}", r.table());
    if let Some(path) = a.json {
        std::fs::write(&path, r.to_json())
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
