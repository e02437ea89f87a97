//! One module per `fractos` subcommand.

pub mod appliance_bench;
pub mod bench;
pub mod cluster;
pub mod completions;
pub mod controller;
pub mod demo;
pub mod down;
pub mod image;
pub mod micro;
pub mod nvme_bench;
pub mod report;
pub mod status;
pub mod token;
pub mod up;

use std::path::PathBuf;

use fractos_qemu::build::Workspace;

/// The source checkout this binary was built in, when it runs from that
/// checkout's target directory (`cargo run`, tests): a development build.
/// An installed copy (`cargo install`, a copied binary) gets `None` even
/// when its sources are still there.
fn dev_build() -> Option<Workspace> {
    let ws = Workspace::source_tree()?;
    let exe = std::env::current_exe().ok()?.canonicalize().ok()?;
    let target = ws.target.canonicalize().ok()?;
    exe.starts_with(target).then_some(ws)
}

/// Where `fractos` keeps its state (serial logs, pidfiles, disks, key
/// files, `cluster.json`): `$FRACTOS_STATE_DIR`; else, for a development
/// build running from a source checkout's target directory,
/// `<target>/fractos`; else the XDG state directory
/// (`$XDG_STATE_HOME/fractos`, `~/.local/state/fractos`).
pub fn state_root() -> PathBuf {
    if let Some(d) = std::env::var_os("FRACTOS_STATE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(ws) = dev_build() {
        return ws.target.join("fractos");
    }
    let xdg = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")));
    xdg.unwrap_or_else(std::env::temp_dir).join("fractos")
}

/// Default state directory of `fractos up` / `down`.
pub fn default_state_dir() -> PathBuf {
    state_root().join("up")
}

/// File name of the appliance kernel image.
const KERNEL_FILE: &str = "fractos-kernel";

/// Where an installed `fractos` looks for the appliance kernel, in order:
/// `$FRACTOS_KERNEL`, next to the binary, `../share/fractos/` from the
/// binary, the state directory's `images/`.
fn installed_kernel_candidates() -> Vec<PathBuf> {
    let mut c = Vec::new();
    if let Some(k) = std::env::var_os("FRACTOS_KERNEL") {
        c.push(PathBuf::from(k));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(PathBuf::from))
    {
        c.push(dir.join(KERNEL_FILE));
        c.push(dir.join("../share/fractos").join(KERNEL_FILE));
    }
    c.push(state_root().join("images").join(KERNEL_FILE));
    c
}

/// The kernel ELF given on the command line; else, for a development
/// build, a freshly built one (unless `$FRACTOS_KERNEL` names one); else an
/// installed one (see [`installed_kernel_candidates`]); else one built
/// from the source checkout the binary was built in, if it is still there.
pub fn kernel_or_build(kernel: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(k) = kernel {
        return Ok(k.clone());
    }
    let build = |ws: &Workspace| -> anyhow::Result<PathBuf> {
        eprintln!(
            "building the appliance kernel from {} (cargo, target dir {})…",
            ws.root.display(),
            ws.kernel_target().display()
        );
        Ok(fractos_qemu::build::build_kernel(ws)?)
    };
    if let Some(ws) = dev_build() {
        if std::env::var_os("FRACTOS_KERNEL").is_none() {
            return build(&ws);
        }
    }
    let candidates = installed_kernel_candidates();
    if let Some(k) = candidates.iter().find(|k| k.is_file()) {
        return Ok(k.clone());
    }
    if let Some(ws) = Workspace::source_tree() {
        if std::env::var_os("FRACTOS_KERNEL").is_none() {
            return build(&ws);
        }
    }
    let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    anyhow::bail!(
        "no appliance kernel found (looked in {}) and no source checkout to build one from; \
         pass --kernel PATH, set FRACTOS_KERNEL, or copy the kernel ELF (`fractos-kernel.elf` \
         from `fractos image build` in a source checkout) to {}",
        looked.join(", "),
        state_root().join("images").join(KERNEL_FILE).display()
    )
}

/// Formats a byte count for people.
pub fn human_bytes(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.2} MiB", n as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", n as f64 / 1024.0)
    }
}
