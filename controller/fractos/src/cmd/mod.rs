//! One module per `fractos` subcommand.

pub mod appliance_bench;
pub mod bench;
pub mod controller;
pub mod demo;
pub mod down;
pub mod image;
pub mod micro;
pub mod nvme_bench;
pub mod token;
pub mod up;

use std::path::PathBuf;

use fractos_qemu::build::Workspace;

/// Default state directory of `fractos up` / `down`.
pub fn default_state_dir() -> PathBuf {
    Workspace::locate().target.join("fractos").join("up")
}

/// The kernel ELF given on the command line, or a freshly built one.
pub fn kernel_or_build(kernel: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match kernel {
        Some(k) => Ok(k.clone()),
        None => {
            eprintln!("building the appliance kernel…");
            Ok(fractos_qemu::build::build_kernel(&Workspace::locate())?)
        }
    }
}

/// Formats a byte count for people.
pub fn human_bytes(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.2} MiB", n as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", n as f64 / 1024.0)
    }
}
