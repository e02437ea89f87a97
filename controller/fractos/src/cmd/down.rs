//! `fractos down`: stop what `fractos up` started and forget the cluster.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use fractos_qemu::cluster;

use super::cluster::{cluster_path, CLUSTER_FILE};
use super::status::ClusterArg;

/// Options of `fractos down`.
#[derive(Debug, Args)]
pub struct DownArgs {
    /// State directory used by `fractos up` (default: `<target>/fractos/up` for a development build in a source checkout, else `$FRACTOS_STATE_DIR/up` or `~/.local/state/fractos/up`).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The cluster to stop, by its `cluster.json` or that file's directory
    /// (--state-dir wins over this).
    #[command(flatten)]
    pub cluster: ClusterArg,
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
    let dir = match (a.state_dir, a.cluster.cluster.as_deref()) {
        (Some(d), _) => d,
        (None, Some(c)) if !c.is_empty() => {
            let file = cluster_path(Some(c));
            file.parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf()
        }
        _ => super::default_state_dir(),
    };
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
