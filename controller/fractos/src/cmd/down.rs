//! `fractos down`: stop what `fractos up` started.

use std::path::PathBuf;

use clap::Args;
use fractos_qemu::cluster;

/// Options of `fractos down`.
#[derive(Debug, Args)]
pub struct DownArgs {
    /// State directory used by `fractos up` (default: `<target>/fractos/up` in a source checkout, else `$FRACTOS_STATE_DIR/up` or `~/.local/state/fractos/up`).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

/// Runs `fractos down`.
pub fn run(a: DownArgs) -> anyhow::Result<()> {
    let dir = a.state_dir.unwrap_or_else(super::default_state_dir);
    let stopped = cluster::down(&dir)?;
    if stopped.is_empty() {
        println!("no running appliances recorded in {}", dir.display());
    }
    for (name, pid) in stopped {
        println!("stopped {name} (QEMU pid {pid})");
    }
    Ok(())
}
