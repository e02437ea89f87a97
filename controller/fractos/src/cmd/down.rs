//! `fractos down`: stop what `fractos up` started and forget the cluster.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use fractos_qemu::cluster;

use super::cluster::CLUSTER_FILE;

/// Options of `fractos down`.
#[derive(Debug, Args)]
pub struct DownArgs {
    /// State directory used by `fractos up` (default: `<target>/fractos/up` for a development build in a source checkout, else `$FRACTOS_STATE_DIR/up` or `~/.local/state/fractos/up`).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

/// Removes what `fractos up` recorded about a cluster in `dir`: its
/// cluster file and key file.
fn forget(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for f in [CLUSTER_FILE, "cluster.key"] {
        let path = dir.join(f);
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
    }
    Ok(removed)
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
    for f in forget(&dir)? {
        println!("removed {}", f.display());
    }
    Ok(())
}
