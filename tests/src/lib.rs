//! Shared helpers for the boot tests in `tests/`: build the kernel and ISO
//! once per test process, give each test its own scratch directory.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use fractos_qemu::build::{self, Workspace};

pub mod l2;
pub mod storage;

/// Generous: TCG on two shared cores can be slow. Tests wait for events,
/// they never measure time.
pub const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Time allowed between the ready line and QEMU's exit.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(120);

/// The kernel ELF, built once per test process.
pub fn kernel() -> PathBuf {
    static KERNEL: OnceLock<PathBuf> = OnceLock::new();
    KERNEL
        .get_or_init(|| match build::build_kernel(&Workspace::locate()) {
            Ok(p) => p,
            Err(e) => panic!("building the kernel failed: {e}"),
        })
        .clone()
}

/// An ISO booting the kernel with `cmdline`, built once per command line.
pub fn iso(cmdline: &str) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let name: String = cmdline
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let out = scratch("iso").join(format!("fractos-{name}.iso"));
    let elf = kernel();
    match build::build_iso(&elf, cmdline, &out) {
        Ok(p) => p,
        Err(e) => panic!("building the ISO failed: {e}"),
    }
}

/// An ISO booting the kernel with `cmdline` and the key file `key_file` as
/// the Multiboot2 module `fractos-cluster-key`, written to `out`.
pub fn iso_with_key(cmdline: &str, key_file: &std::path::Path, out: &std::path::Path) -> PathBuf {
    let module = build::IsoModule {
        file: key_file.to_path_buf(),
        cmdline: "fractos-cluster-key".into(),
    };
    match build::build_iso_with_modules(&kernel(), cmdline, &[module], out) {
        Ok(p) => p,
        Err(e) => panic!("building the ISO failed: {e}"),
    }
}

/// A fresh scratch directory for one test (`<target>/fractos-tests/<pid>-<test>`,
/// kept after the run for its serial logs). Directories of earlier test
/// processes that are no longer running are removed on first use.
pub fn scratch(test: &str) -> PathBuf {
    let root = Workspace::locate().target.join("fractos-tests");
    static CLEANED: OnceLock<()> = OnceLock::new();
    CLEANED.get_or_init(|| remove_stale(&root));
    let dir = root.join(format!("{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

fn remove_stale(root: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// A parsed `memory: [start-end] kind (N KiB)` boot-log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRegion {
    /// First byte.
    pub start: u64,
    /// Last byte.
    pub last: u64,
    /// Kind name.
    pub kind: String,
}

/// The memory map the kernel logged.
pub fn memory_map(log: &str) -> Vec<LoggedRegion> {
    log.lines()
        .filter_map(|l| {
            let rest = l.split("memory: [").nth(1)?;
            let (range, tail) = rest.split_once("] ")?;
            let (a, b) = range.split_once('-')?;
            let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
            Some(LoggedRegion {
                start: hex(a)?,
                last: hex(b)?,
                kind: tail.split_whitespace().next()?.to_string(),
            })
        })
        .collect()
}

/// The `pci: ...` device lines the kernel logged (without the prefix).
pub fn pci_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.split("pci: ").nth(1))
        .filter(|l| l.contains(" class "))
        .map(str::to_string)
        .collect()
}

/// How long appliance tests wait for an answer (generous for TCG).
pub const APPLIANCE_WAIT: Duration = Duration::from_secs(60);

/// Attach options for SDK processes talking to appliances under TCG.
pub fn appliance_attach_options() -> fractos_sdk::AttachOptions {
    fractos_sdk::AttachOptions::default()
        .op_timeout(APPLIANCE_WAIT)
        .connect_timeout(APPLIANCE_WAIT)
}

/// Attaches an SDK process named `name` to the controller at `addr` with
/// the demo cluster key (the key the test clusters use); panics on failure.
pub fn attach_demo(addr: std::net::SocketAddr, name: &str) -> fractos_sdk::Process {
    let token = fractos_core::process_token(&fractos_adaptors::demo::DEMO_KEY, name.as_bytes());
    fractos_sdk::Process::attach(addr, name, token, appliance_attach_options())
        .unwrap_or_else(|e| panic!("attach {name} at {addr}: {e}"))
}

/// Registers `len` bytes in `user`, makes a WRITE capability over them
/// and copies `src` into it (panicking on failure); returns the region
/// and the capability.
pub fn copy_to_new_region(
    user: &fractos_sdk::Process,
    src: &fractos_sdk::MemoryCap,
    len: u64,
) -> (fractos_sdk::Region, fractos_sdk::MemoryCap) {
    let dst = user.register(len).expect("register");
    let cap = user
        .memory_create(&dst, 0, len, fractos_sdk::Rights::WRITE)
        .expect("memory_create");
    user.copy(src, &cap, None).expect("copy");
    (dst, cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_log_lines() {
        let log = "[    0.1] INFO  memory: [0x000000000000-0x00000009fbff] usable (639 KiB)\n\
                   [    0.2] INFO  pci: 00:02.0 1af4:1041 class 02.00.00 rev 01 (network/ethernet)\n\
                   [    0.3] INFO  pci: 1 functions\n";
        let m = memory_map(log);
        assert_eq!(
            m,
            [LoggedRegion {
                start: 0,
                last: 0x9fbff,
                kind: "usable".into()
            }]
        );
        assert_eq!(pci_lines(log).len(), 1);
    }
}
