//! The Linux baseline: "the same thing inside a Debian Linux guest in the
//! same QEMU configuration".
//!
//! * [`fetch_debian_kernel`] (`debian`) — Debian's `linux-image-*-amd64` package via
//!   `apt-get download`, extracted once into `<target>/linux/root`.
//! * [`build_guest_init`] — the `fractos-guest-init` PID 1 (`qemu/guest-init`).
//! * [`Initramfs`] (`initramfs`) — a cpio "newc" archive writer; [`Initramfs::add_binary`]
//!   also adds the shared libraries `ldd` names (`ldd`, and the ELF
//!   interpreter).
//! * [`LinuxGuest`] — puts it together: [`LinuxGuest::node_spec`] writes the
//!   initramfs for a [`GuestImage`] and returns a [`NodeSpec`] with the
//!   appliances' NIC/NVMe configuration; [`LinuxGuest::launch_controller`]
//!   and [`LinuxGuest::run_read`] are the two benchmark baselines.
//!
//! The guest brings up `eth0` as [`GUEST_IP`]/24 with gateway [`GUEST_GW`]
//! (QEMU user networking's defaults, so `hostfwd` reaches it) and prints
//! [`GUEST_READY_MARKER`] on the serial console.
//! * [`parse_read_result`] (`read_log`) — the read benchmark's result line.
//! * [`rdma_image`] (`rdma`) — Soft-RoCE guests with rdma-core's tools
//!   (DESIGN.md §7), for interoperability tests against the appliance's
//!   RoCEv2 engine.

mod debian;
mod initramfs;
mod ldd;
mod rdma;
mod read_log;

use std::collections::{BTreeMap, BTreeSet};
use std::env;
use std::fs;
use std::io::ErrorKind;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fractos_hosted::FileConfig;
use fractos_wire::NodeId;

use crate::build::{run, Workspace};
use crate::node::{write_private_file, Accel, Appliance, Boot, NodeSpec, NvmeDisk};
use crate::QemuError;

pub use debian::{fetch_debian_kernel, DebianKernel};
pub use initramfs::Initramfs;
pub use ldd::shared_libraries;
pub use rdma::{
    parse_rc_pingpong, rdma_image, rdma_status, RdmaGuestSpec, RDMA_MODULES, RDMA_STATUS_MARKER,
    RXE_DRIVER_FILE, RXE_PROVIDER,
};
pub use read_log::{fnv1a, parse_read_result, ReadResult, FNV_OFFSET};

/// The line the guest init prints once modules are loaded and the network
/// is up (followed by ` uptime=SECONDS`).
pub const GUEST_READY_MARKER: &str = "fractos-guest: ready";
/// The guest's address on QEMU's user-mode network (where `hostfwd` goes).
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// QEMU user-mode network's gateway.
pub const GUEST_GW: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// Modules loaded by default (with their dependencies): virtio-net over
/// virtio-pci, and NVMe. Everything else the guest needs is built in.
pub const GUEST_MODULES: &[&str] = &["virtio_pci", "virtio_net", "nvme"];
/// Guest RAM used by [`LinuxGuest::node_spec`].
pub const GUEST_MEMORY_MIB: u32 = 512;
/// Process port of the controller in [`controller_config`] (the one port
/// convention of every controller, [`fractos_hosted::PROCESS_PORT`]).
pub const GUEST_PROCESS_PORT: u16 = fractos_hosted::PROCESS_PORT;
/// Peer port of the controller in [`controller_config`].
pub const GUEST_PEER_PORT: u16 = fractos_hosted::PEER_PORT;
/// Metrics port of the controller in [`controller_config`].
pub const GUEST_METRICS_PORT: u16 = fractos_hosted::METRICS_PORT;
/// Where [`controller_image`] puts the `fractos` binary and its config.
pub const GUEST_FRACTOS: &str = "/bin/fractos";
/// See [`GUEST_FRACTOS`].
pub const GUEST_CONFIG: &str = "/etc/fractos.toml";

// ---------------------------------------------------------------------------
// The Debian kernel package

/// Builds `fractos-guest-init` (release, stripped) with its own target
/// directory `<target>/guest-init`, so it works from inside `cargo test`.
pub fn build_guest_init(ws: &Workspace) -> Result<PathBuf, QemuError> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target = ws.target.join("guest-init");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&ws.root)
        .args(["build", "--release", "-p", "fractos-guest-init"])
        .arg("--target-dir")
        .arg(&target)
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR");
    run(&mut cmd, "cargo", "rustup (https://rustup.rs)")?;
    let bin = target.join("release").join("fractos-guest-init");
    if !bin.is_file() {
        return Err(QemuError::Config(format!(
            "cargo reported success but {} is missing",
            bin.display()
        )));
    }
    Ok(bin)
}

// ---------------------------------------------------------------------------
// cpio "newc"

/// What the guest does once its network is up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestAction {
    /// Nothing: power off right after the ready line (boot-time baseline).
    PowerOff,
    /// Run this argv (words must not contain whitespace after encoding; any
    /// byte is allowed and %-encoded on the command line); power off when it
    /// exits.
    Exec(Vec<String>),
    /// The built-in `O_DIRECT` read benchmark; power off after it.
    Read(ReadSpec),
}

/// The built-in read benchmark's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadSpec {
    /// Block device, e.g. `/dev/nvme0n1`.
    pub device: String,
    /// Bytes per read (multiple of 512).
    pub block_size: u64,
    /// Reads; `None` reads the whole device.
    pub count: Option<u64>,
    /// Reads kept in flight (one guest thread each); `None`: one at a
    /// time, in the original loop.
    pub queue_depth: Option<u32>,
    /// Read `i` is at block `i * stride` modulo the device's blocks;
    /// `None`: sequential.
    pub stride: Option<u64>,
}

/// The contents and behaviour of one guest.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// Host executables and their guest paths; their shared libraries come
    /// along.
    pub binaries: Vec<(PathBuf, String)>,
    /// Extra files: guest path, contents, permission bits.
    pub files: Vec<(String, Vec<u8>, u32)>,
    /// Modules to load (plus dependencies); default [`GUEST_MODULES`].
    pub modules: Vec<String>,
    /// Configure `eth0` as [`GUEST_IP`]/24 via [`GUEST_GW`].
    pub network: bool,
    /// What to do after the ready line.
    pub action: GuestAction,
    /// Appended to the kernel command line.
    pub extra_cmdline: String,
}

impl GuestImage {
    /// A guest that loads the default modules, brings up the network and
    /// does `action`.
    pub fn new(action: GuestAction) -> Self {
        GuestImage {
            binaries: Vec::new(),
            files: Vec::new(),
            modules: GUEST_MODULES.iter().map(|s| s.to_string()).collect(),
            network: true,
            action,
            extra_cmdline: String::new(),
        }
    }
}

/// A TOML config for `fractos controller --config` listening on all guest
/// addresses: processes on [`GUEST_PROCESS_PORT`], peers on
/// [`GUEST_PEER_PORT`], metrics on [`GUEST_METRICS_PORT`]. It is the
/// hosted controller's own schema ([`fractos_hosted::FileConfig`])
/// serialized, so it cannot drift from what the CLI reads.
pub fn controller_config(node: u32, cluster_key: &[u8; 32]) -> Result<String, QemuError> {
    FileConfig::listen_all(NodeId(node), cluster_key, Ipv4Addr::UNSPECIFIED.into())
        .to_toml()
        .map_err(|e| QemuError::Config(format!("writing the guest controller's config: {e}")))
}

/// A guest running `fractos controller --config /etc/fractos.toml` with the
/// host's `fractos` binary and `config` (e.g. from [`controller_config`]).
pub fn controller_image(fractos: &Path, config: &str) -> GuestImage {
    let mut g = GuestImage::new(GuestAction::Exec(
        [GUEST_FRACTOS, "controller", "--config", GUEST_CONFIG]
            .iter()
            .map(|s| s.to_string())
            .collect(),
    ));
    g.binaries
        .push((fractos.to_path_buf(), GUEST_FRACTOS.to_string()));
    // The config holds the cluster key: readable by root (the controller)
    // only, and it travels in the initramfs, never on a command line.
    g.files
        .push((GUEST_CONFIG.to_string(), config.as_bytes().to_vec(), 0o600));
    g
}

/// A TCP port on 127.0.0.1 that is free right now (for `hostfwd`; another
/// process could still take it before QEMU binds it).
pub fn free_local_port() -> Result<u16, QemuError> {
    crate::node::bind_probe(|p| std::net::TcpListener::bind(("127.0.0.1", p)))?
        .local_addr()
        .map(|a| a.port())
        .map_err(QemuError::io("binding a free port on", "127.0.0.1"))
}

/// `%`-encodes what cannot appear in a `fractos_guest.exec=` word.
fn encode_word(w: &str) -> String {
    let mut s = String::new();
    for b in w.bytes() {
        if b.is_ascii_graphic() && b != b',' && b != b'%' && b != b'"' {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// A Debian kernel plus the guest init: everything to build Linux guests.
#[derive(Debug, Clone)]
pub struct LinuxGuest {
    /// The kernel package.
    pub kernel: DebianKernel,
    /// The `fractos-guest-init` binary.
    pub init: PathBuf,
    /// CPU accelerator of every guest booted from here (default TCG); set
    /// it to the appliance's when the two are compared.
    pub accel: Accel,
}

impl LinuxGuest {
    /// Fetches the Debian kernel into `<target>/linux` (once) and builds the
    /// guest init.
    pub fn prepare(ws: &Workspace) -> Result<Self, QemuError> {
        let kernel = fetch_debian_kernel(&ws.target.join("linux"))?;
        let init = build_guest_init(ws)?;
        Ok(LinuxGuest {
            kernel,
            init,
            accel: Accel::Tcg,
        })
    }

    /// The kernel command line for `image`.
    pub fn cmdline(&self, image: &GuestImage) -> Result<String, QemuError> {
        let mut c = String::from("console=ttyS0 panic=-1 quiet");
        let mods = self.module_paths(image)?;
        if !mods.is_empty() {
            c.push_str(" fractos_guest.modules=");
            c.push_str(&mods.join(","));
        }
        if image.network {
            c.push_str(&format!(
                " fractos_guest.ip={GUEST_IP}/24 fractos_guest.gw={GUEST_GW}"
            ));
        }
        match &image.action {
            GuestAction::PowerOff => {}
            GuestAction::Exec(argv) => {
                let words: Vec<String> = argv.iter().map(|w| encode_word(w)).collect();
                c.push_str(" fractos_guest.exec=");
                c.push_str(&words.join(","));
            }
            GuestAction::Read(r) => {
                c.push_str(&format!(
                    " fractos_guest.read={},bs={}",
                    encode_word(&r.device),
                    r.block_size
                ));
                if let Some(n) = r.count {
                    c.push_str(&format!(",count={n}"));
                }
                if let Some(qd) = r.queue_depth {
                    c.push_str(&format!(",qd={qd}"));
                }
                if let Some(stride) = r.stride {
                    c.push_str(&format!(",stride={stride}"));
                }
            }
        }
        if !image.extra_cmdline.is_empty() {
            c.push(' ');
            c.push_str(&image.extra_cmdline);
        }
        // COMMAND_LINE_SIZE on x86.
        if c.len() >= 2048 {
            return Err(QemuError::Config(format!(
                "kernel command line too long ({} bytes): {c}",
                c.len()
            )));
        }
        Ok(c)
    }

    fn module_paths(&self, image: &GuestImage) -> Result<Vec<String>, QemuError> {
        let names: Vec<&str> = image.modules.iter().map(String::as_str).collect();
        Ok(self
            .kernel
            .modules(&names)?
            .into_iter()
            .map(|(n, _)| format!("/lib/modules/{n}.ko"))
            .collect())
    }

    /// The initramfs for `image`: the init as `/init`, the binaries with
    /// their libraries, the files and the modules (as `/lib/modules/NAME.ko`).
    pub fn initramfs(&self, image: &GuestImage) -> Result<Initramfs, QemuError> {
        let mut i = Initramfs::new();
        i.add_binary(&self.init, "/init")?;
        for (host, guest) in &image.binaries {
            i.add_binary(host, guest)?;
        }
        for (path, data, mode) in &image.files {
            i.add_file(path, data.clone(), *mode);
        }
        let names: Vec<&str> = image.modules.iter().map(String::as_str).collect();
        for (n, data) in self.kernel.modules(&names)? {
            i.add_file(&format!("/lib/modules/{n}.ko"), data, 0o644);
        }
        Ok(i)
    }

    /// Writes `dir/<name>.cpio` for `image` and returns a node booting it:
    /// [`GUEST_MEMORY_MIB`], one NIC, serial log `dir/<name>.log`,
    /// [`LinuxGuest::accel`]. Set `hostfwd`, `nvme`, ... on the result as
    /// for an appliance.
    pub fn node_spec(
        &self,
        name: &str,
        image: &GuestImage,
        dir: &Path,
    ) -> Result<NodeSpec, QemuError> {
        let initrd = dir.join(format!("{name}.cpio"));
        self.initramfs(image)?.write(&initrd)?;
        let boot = Boot::Linux {
            kernel: self.kernel.vmlinuz.clone(),
            cmdline: self.cmdline(image)?,
            initrd: Some(initrd),
        };
        let mut s = NodeSpec::new(name, boot, &dir.join(format!("{name}.log")));
        s.memory_mib = GUEST_MEMORY_MIB;
        s.nics = 1;
        s.accel = self.accel;
        Ok(s)
    }

    /// Boots a guest running `fractos controller` (the host binary `fractos`
    /// with `config`, e.g. [`controller_config`]) with `hostfwd` forwards
    /// `(host_port, guest_port)`, and waits for the guest's ready line.
    /// Returns the running guest and the time from launch to ready. The
    /// controller is started right after the ready line: poll its port
    /// until it answers.
    pub fn launch_controller(
        &self,
        name: &str,
        fractos: &Path,
        config: &str,
        hostfwd: &[(u16, u16)],
        dir: &Path,
        timeout: Duration,
    ) -> Result<(Appliance, Duration), QemuError> {
        let mut spec = self.node_spec(name, &controller_image(fractos, config), dir)?;
        spec.hostfwd = hostfwd.to_vec();
        let mut vm = Appliance::launch(spec)?;
        let t = vm.wait_for(GUEST_READY_MARKER, timeout)?;
        Ok((vm, t))
    }

    /// Boots a guest with `disk` as its only NVMe disk, runs the read
    /// benchmark `read` on it and returns the result (the guest powers off).
    pub fn run_read(
        &self,
        name: &str,
        disk: NvmeDisk,
        read: ReadSpec,
        dir: &Path,
        timeout: Duration,
    ) -> Result<ReadResult, QemuError> {
        let mut image = GuestImage::new(GuestAction::Read(read));
        image.network = false;
        image.modules = vec!["nvme".into()];
        let mut spec = self.node_spec(name, &image, dir)?;
        spec.nics = 0;
        spec.nvme = vec![disk];
        let mut vm = Appliance::launch(spec)?;
        vm.wait_for("fractos-guest: read ", timeout)?;
        let log = vm.log();
        let _ = vm.wait_exit(Duration::from_secs(30));
        parse_read_result(&log).ok_or_else(|| {
            QemuError::Config(format!(
                "guest `{name}` printed no parsable read line:\n{log}"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_words_are_encoded() {
        assert_eq!(encode_word("/bin/x"), "/bin/x");
        assert_eq!(encode_word("a,b c%"), "a%2Cb%20c%25");
    }

    #[test]
    fn controller_config_listens_everywhere() {
        let c = controller_config(3, &[0xab; 32]).unwrap();
        assert!(c.contains("process_listen = \"0.0.0.0:7100\""), "{c}");
        assert!(c.contains("metrics_listen = \"0.0.0.0:9100\""), "{c}");
        // What the CLI reads: the hosted controller's schema.
        let cfg = FileConfig::parse(&c).unwrap().into_config().unwrap();
        assert_eq!(cfg.node, NodeId(3));
        assert_eq!(cfg.cluster_key, [0xab; 32]);
        assert_eq!(cfg.process_listen.port(), GUEST_PROCESS_PORT);
        assert_eq!(cfg.peer_listen.port(), GUEST_PEER_PORT);
        assert_eq!(
            cfg.metrics_listen.map(|a| a.port()),
            Some(GUEST_METRICS_PORT)
        );
        assert!(cfg.process_listen.ip().is_unspecified());
    }

    #[test]
    fn controller_key_stays_in_a_private_initramfs() {
        use std::os::unix::fs::PermissionsExt;
        let key = "5a".repeat(32);
        let g = controller_image(
            Path::new("/bin/true"),
            &controller_config(0, &[0x5a; 32]).unwrap(),
        );
        // The key is in the config file (root-only in the guest), not in
        // what the guest's kernel command line is built from.
        let GuestAction::Exec(argv) = &g.action else {
            panic!("{:?}", g.action)
        };
        assert!(argv.iter().all(|w| !w.contains(&key)), "{argv:?}");
        assert!(!g.extra_cmdline.contains(&key));
        let (path, data, mode) = &g.files[0];
        assert_eq!((path.as_str(), *mode), (GUEST_CONFIG, 0o600));
        assert!(String::from_utf8_lossy(data).contains(&key));
        let mut i = Initramfs::new();
        i.add_file(GUEST_CONFIG, data.clone(), *mode);
        let dir = std::env::temp_dir().join(format!("fractos-initramfs-{}", std::process::id()));
        let out = dir.join("g.cpio");
        i.write(&out).unwrap();
        let perm = fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(perm & 0o777, 0o600);
        fs::remove_dir_all(&dir).unwrap();
    }
}
