//! The Linux baseline: "the same thing inside a Debian Linux guest in the
//! same QEMU configuration".
//!
//! * [`fetch_debian_kernel`] — Debian's `linux-image-*-amd64` package via
//!   `apt-get download`, extracted once into `<target>/linux/root`.
//! * [`build_guest_init`] — the `fractos-guest-init` PID 1 (`qemu/guest-init`).
//! * [`Initramfs`] — a cpio "newc" archive writer; [`Initramfs::add_binary`]
//!   also adds the shared libraries `ldd` names (and the ELF interpreter).
//! * [`LinuxGuest`] — puts it together: [`LinuxGuest::node_spec`] writes the
//!   initramfs for a [`GuestImage`] and returns a [`NodeSpec`] with the
//!   appliances' NIC/NVMe configuration; [`LinuxGuest::launch_controller`]
//!   and [`LinuxGuest::run_read`] are the two benchmark baselines.
//!
//! The guest brings up `eth0` as [`GUEST_IP`]/24 with gateway [`GUEST_GW`]
//! (QEMU user networking's defaults, so `hostfwd` reaches it) and prints
//! [`GUEST_READY_MARKER`] on the serial console.

use std::collections::{BTreeMap, BTreeSet};
use std::env;
use std::fs;
use std::io::ErrorKind;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::build::{run, Workspace};
use crate::node::{write_private_file, Accel, Appliance, Boot, NodeSpec, NvmeDisk};
use crate::QemuError;

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
/// Process port of the controller in [`controller_config`].
pub const GUEST_PROCESS_PORT: u16 = 7100;
/// Peer port of the controller in [`controller_config`].
pub const GUEST_PEER_PORT: u16 = 7101;
/// Metrics port of the controller in [`controller_config`].
pub const GUEST_METRICS_PORT: u16 = 9100;
/// Where [`controller_image`] puts the `fractos` binary and its config.
pub const GUEST_FRACTOS: &str = "/bin/fractos";
/// See [`GUEST_FRACTOS`].
pub const GUEST_CONFIG: &str = "/etc/fractos.toml";

// ---------------------------------------------------------------------------
// The Debian kernel package

/// An extracted Debian `linux-image-*` package.
#[derive(Debug, Clone)]
pub struct DebianKernel {
    /// Where the package was extracted (holds `boot/` and `lib/modules/`).
    pub root: PathBuf,
    /// The bzImage (`boot/vmlinuz-*`).
    pub vmlinuz: PathBuf,
    /// The kernel release, e.g. `6.1.0-48-amd64`.
    pub release: String,
}

/// Downloads Debian's current `linux-image-*-amd64` package (the one
/// `linux-image-amd64` depends on) with `apt-get download` into `dir` and
/// extracts it into `dir/root`; reuses an earlier extraction.
pub fn fetch_debian_kernel(dir: &Path) -> Result<DebianKernel, QemuError> {
    fs::create_dir_all(dir).map_err(QemuError::io("creating", dir))?;
    let root = dir.join("root");
    if let Some(k) = DebianKernel::open(&root)? {
        return Ok(k);
    }
    let out = run(
        Command::new("apt-cache").args(["depends", "linux-image-amd64"]),
        "apt-cache",
        "apt (Debian/Ubuntu only; or pass a kernel path)",
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let pkg = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && !p.contains("unsigned"))
        .map(str::to_string)
        .ok_or_else(|| {
            QemuError::Config(
                "apt-cache knows no linux-image-amd64: run `apt-get update` first (needs the Debian mirrors)"
                    .into(),
            )
        })?;
    eprintln!("fetching {pkg} with apt-get download");
    run(
        Command::new("apt-get")
            .args(["download", &pkg])
            .current_dir(dir),
        "apt-get",
        "apt",
    )?;
    let deb = fs::read_dir(dir)
        .map_err(QemuError::io("reading", dir))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|e| e == "deb")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pkg}_")))
        })
        .ok_or_else(|| QemuError::Config(format!("`apt-get download {pkg}` produced no .deb")))?;
    // Extract next to the final place, then rename: a half-extracted tree is
    // never taken for a complete one.
    let tmp = dir.join(format!("root.tmp{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp),
        "dpkg-deb",
        "dpkg",
    )?;
    let _ = fs::remove_dir_all(&root);
    fs::rename(&tmp, &root).map_err(QemuError::io("renaming", &tmp))?;
    DebianKernel::open(&root)?
        .ok_or_else(|| QemuError::Config(format!("{pkg} has no /boot/vmlinuz-*")))
}

impl DebianKernel {
    /// The package extracted at `root`, if there is one.
    pub fn open(root: &Path) -> Result<Option<Self>, QemuError> {
        let boot = root.join("boot");
        if !boot.is_dir() {
            return Ok(None);
        }
        let vmlinuz = fs::read_dir(&boot)
            .map_err(QemuError::io("reading", &boot))?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            });
        let Some(vmlinuz) = vmlinuz else {
            return Ok(None);
        };
        let release = vmlinuz
            .file_name()
            .map(|n| {
                n.to_string_lossy()
                    .trim_start_matches("vmlinuz-")
                    .to_string()
            })
            .unwrap_or_default();
        Ok(Some(DebianKernel {
            root: root.to_path_buf(),
            vmlinuz,
            release,
        }))
    }

    /// `lib/modules/<release>` of the package.
    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib").join("modules").join(&self.release)
    }

    /// The modules `names` (e.g. `virtio_net`) and everything they depend
    /// on, dependencies first, as `(name, uncompressed .ko contents)`.
    /// Built-in modules are skipped. Dependencies come from each module's
    /// `.modinfo` (the package ships no `modules.dep`; depmod makes it at
    /// install time).
    pub fn modules(&self, names: &[&str]) -> Result<Vec<(String, Vec<u8>)>, QemuError> {
        let dir = self.modules_dir();
        let order_file = dir.join("modules.order");
        let order =
            fs::read_to_string(&order_file).map_err(QemuError::io("reading", &order_file))?;
        let index: BTreeMap<String, PathBuf> = order
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| (module_name(l), dir.join(l)))
            .collect();
        let builtin: BTreeSet<String> = fs::read_to_string(dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .map(module_name)
            .collect();
        let mut out = Vec::new();
        let mut done = BTreeSet::new();
        for n in names {
            self.visit(&module_name(n), &index, &builtin, &mut done, &mut out, 0)?;
        }
        Ok(out)
    }

    fn visit(
        &self,
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        builtin: &BTreeSet<String>,
        done: &mut BTreeSet<String>,
        out: &mut Vec<(String, Vec<u8>)>,
        depth: usize,
    ) -> Result<(), QemuError> {
        if done.contains(name) || builtin.contains(name) {
            return Ok(());
        }
        if depth > 32 {
            return Err(QemuError::Config(format!(
                "module dependency loop at {name}"
            )));
        }
        let path = index.get(name).ok_or_else(|| {
            QemuError::Config(format!(
                "kernel {} has no module `{name}` (neither built in nor in modules.order)",
                self.release
            ))
        })?;
        let data = read_module(path)?;
        for dep in modinfo(&data, "depends")
            .split(',')
            .filter(|d| !d.is_empty())
        {
            self.visit(&module_name(dep), index, builtin, done, out, depth + 1)?;
        }
        done.insert(name.to_string());
        out.push((name.to_string(), data));
        Ok(())
    }
}

/// `kernel/drivers/nvme/host/nvme-core.ko` → `nvme_core`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Reads a module, decompressing `.ko.xz`/`.ko.zst`/`.ko.gz` on the host
/// (modules.order names `.ko`; newer packages ship them compressed).
fn read_module(path: &Path) -> Result<Vec<u8>, QemuError> {
    if path.is_file() {
        return fs::read(path).map_err(QemuError::io("reading", path));
    }
    for (ext, tool, pkg) in [
        ("xz", "xz", "xz-utils"),
        ("zst", "zstd", "zstd"),
        ("gz", "gzip", "gzip"),
    ] {
        let p = PathBuf::from(format!("{}.{ext}", path.display()));
        if p.is_file() {
            let out = run(Command::new(tool).arg("-dc").arg(&p), tool, pkg)?;
            return Ok(out.stdout);
        }
    }
    Err(QemuError::Config(format!(
        "module {} is missing (also as .xz/.zst/.gz)",
        path.display()
    )))
}

/// The value of `key=` in a module's `.modinfo` strings (empty if absent).
fn modinfo(data: &[u8], key: &str) -> String {
    let needle = format!("{key}=");
    data.split(|b| *b == 0)
        .find_map(|s| s.strip_prefix(needle.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// The guest init

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

#[derive(Debug, Clone)]
enum Entry {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

/// An initramfs: a cpio "newc" archive (uncompressed, which the kernel
/// unpacks fastest). Parent directories are added implicitly. Paths are
/// absolute guest paths (`/bin/x`).
#[derive(Debug, Clone)]
pub struct Initramfs {
    entries: BTreeMap<String, Entry>,
}

impl Default for Initramfs {
    fn default() -> Self {
        Self::new()
    }
}

impl Initramfs {
    /// An archive with `/dev/console` (so PID 1 starts with a console),
    /// `/proc`, `/sys`, `/tmp` and `/root`.
    pub fn new() -> Self {
        let mut i = Initramfs {
            entries: BTreeMap::new(),
        };
        for d in ["/dev", "/proc", "/sys", "/tmp", "/root"] {
            i.add_dir(d);
        }
        i.add_char_dev("/dev/console", 5, 1);
        i
    }

    fn key(path: &str) -> String {
        path.trim_start_matches('/')
            .trim_end_matches('/')
            .to_string()
    }

    /// Adds a directory.
    pub fn add_dir(&mut self, path: &str) {
        self.entries.insert(Self::key(path), Entry::Dir);
    }

    /// Adds a regular file with permission bits `mode` (e.g. `0o755`).
    pub fn add_file(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        self.entries.insert(
            Self::key(path),
            Entry::File {
                data,
                mode: mode & 0o7777,
            },
        );
    }

    /// Adds a symbolic link to `target`.
    pub fn add_symlink(&mut self, path: &str, target: &str) {
        self.entries
            .insert(Self::key(path), Entry::Symlink(target.to_string()));
    }

    /// Adds a character device node.
    pub fn add_char_dev(&mut self, path: &str, major: u32, minor: u32) {
        self.entries
            .insert(Self::key(path), Entry::CharDev { major, minor });
    }

    /// Adds the host file `host` (following symlinks) at `path`.
    pub fn add_host_file(&mut self, host: &Path, path: &str, mode: u32) -> Result<(), QemuError> {
        let data = fs::read(host).map_err(QemuError::io("reading", host))?;
        self.add_file(path, data, mode);
        Ok(())
    }

    /// Adds the host executable `host` at `path`, without debug info if
    /// `strip` is installed, plus every shared library `ldd` names, at the
    /// paths `ldd` prints (which are the guest's default search paths as
    /// the guest runs the host's own libraries).
    pub fn add_binary(&mut self, host: &Path, path: &str) -> Result<(), QemuError> {
        let data = strip_debug(host)?;
        self.add_file(path, data, 0o755);
        for lib in shared_libraries(host)? {
            let guest = lib.display().to_string();
            if !self.entries.contains_key(&Self::key(&guest)) {
                self.add_host_file(&lib, &guest, 0o755)?;
            }
        }
        Ok(())
    }

    /// Whether `path` is in the archive.
    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(&Self::key(path))
    }

    /// The archive bytes.
    pub fn to_newc(&self) -> Vec<u8> {
        // Every parent directory, then the entries; BTreeMap order puts `a`
        // before `a/b`, so parents are created first.
        let mut all = self.entries.clone();
        for k in self.entries.keys() {
            let mut p = k.as_str();
            while let Some((parent, _)) = p.rsplit_once('/') {
                all.entry(parent.to_string()).or_insert(Entry::Dir);
                p = parent;
            }
        }
        let mut out = Vec::new();
        for (ino, (name, e)) in all.iter().enumerate() {
            let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match e {
                Entry::Dir => (0o040755, 2, &[], (0, 0)),
                Entry::File { data, mode } => (0o100000 | mode, 1, data, (0, 0)),
                Entry::Symlink(t) => (0o120777, 1, t.as_bytes(), (0, 0)),
                Entry::CharDev { major, minor } => (0o020600, 1, &[], (*major, *minor)),
            };
            newc_entry(&mut out, ino as u32 + 1, mode, nlink, rdev, name, data);
        }
        newc_entry(&mut out, 0, 0, 1, (0, 0), "TRAILER!!!", &[]);
        out
    }

    /// Writes the archive to `out`, mode 0600 from its creation (it may
    /// hold secrets such as a controller's cluster key); returns its size
    /// in bytes.
    pub fn write(&self, out: &Path) -> Result<u64, QemuError> {
        let bytes = self.to_newc();
        write_private_file(out, &bytes)?;
        Ok(bytes.len() as u64)
    }
}

fn newc_entry(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    name: &str,
    data: &[u8],
) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        data.len() as u32,
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

/// `host` without debug info (`strip --strip-debug`), or as is if `strip`
/// is not installed.
fn strip_debug(host: &Path) -> Result<Vec<u8>, QemuError> {
    // Unique per call: several guests may be built at once.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = env::temp_dir().join(format!(
        "fractos-strip-{}-{seq}-{}",
        std::process::id(),
        host.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let st = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&tmp)
        .arg(host)
        .stderr(std::process::Stdio::null())
        .status();
    let data = match st {
        Ok(s) if s.success() => fs::read(&tmp).map_err(QemuError::io("reading", &tmp)),
        _ => fs::read(host).map_err(QemuError::io("reading", host)),
    };
    let _ = fs::remove_file(&tmp);
    data
}

/// The shared libraries (and ELF interpreter) `ldd` lists for `host`; empty
/// for a static executable.
pub fn shared_libraries(host: &Path) -> Result<Vec<PathBuf>, QemuError> {
    let out = Command::new("ldd")
        .arg(host)
        .output()
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound => QemuError::ToolMissing {
                tool: "ldd".into(),
                package: "libc-bin".into(),
            },
            _ => QemuError::io("running ldd on", host)(e),
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable"
        return Ok(Vec::new());
    }
    parse_ldd(&text)
}

fn parse_ldd(text: &str) -> Result<Vec<PathBuf>, QemuError> {
    let mut libs = Vec::new();
    for l in text.lines().map(str::trim) {
        let path = match l.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    return Err(QemuError::Config(format!(
                        "ldd: shared library {} not found",
                        name.trim()
                    )));
                }
                rest.split_whitespace().next().unwrap_or("")
            }
            None => l.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

// ---------------------------------------------------------------------------
// Guests

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
/// [`GUEST_PEER_PORT`], metrics on [`GUEST_METRICS_PORT`].
pub fn controller_config(node: u32, cluster_key_hex: &str) -> String {
    format!(
        "node = {node}\n\
         cluster_key = \"{cluster_key_hex}\"\n\
         process_listen = \"0.0.0.0:{GUEST_PROCESS_PORT}\"\n\
         peer_listen = \"0.0.0.0:{GUEST_PEER_PORT}\"\n\
         metrics_listen = \"0.0.0.0:{GUEST_METRICS_PORT}\"\n"
    )
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
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(QemuError::io("binding a free port on", "127.0.0.1"))
}

/// One result line of the built-in read benchmark.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadResult {
    /// Bytes per read.
    pub block_size: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Reads done.
    pub ops: u64,
    /// Wall time of the reads in the guest.
    pub secs: f64,
    /// 10^6 bytes per second.
    pub mbps: f64,
    /// Reads per second.
    pub iops: f64,
    /// The first 8 bytes read, hex.
    pub first: String,
    /// FNV-1a 64 of every byte read, in order (see [`fnv1a`]), computed
    /// outside the timed reads.
    pub fnv: u64,
}

/// FNV-1a 64 of `data` continuing from `h` (start with
/// [`FNV_OFFSET`]): the guest's checksum of what it read.
pub fn fnv1a(mut h: u64, data: &[u8]) -> u64 {
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// FNV-1a 64 offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Parses the last `fractos-guest: read ...` line of a serial log.
pub fn parse_read_result(log: &str) -> Option<ReadResult> {
    let line = log
        .lines()
        .rev()
        .find_map(|l| l.split("fractos-guest: read ").nth(1))?;
    let kv: BTreeMap<&str, &str> = line
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect();
    Some(ReadResult {
        block_size: kv.get("bs")?.parse().ok()?,
        bytes: kv.get("bytes")?.parse().ok()?,
        ops: kv.get("ops")?.parse().ok()?,
        secs: kv.get("secs")?.parse().ok()?,
        mbps: kv.get("mbps")?.parse().ok()?,
        iops: kv.get("iops")?.parse().ok()?,
        first: kv.get("first")?.to_string(),
        fnv: u64::from_str_radix(kv.get("fnv")?, 16).ok()?,
    })
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
    fn newc_layout() {
        let mut i = Initramfs::new();
        i.add_file("/a/b/c", b"hello".to_vec(), 0o755);
        let b = i.to_newc();
        let s = String::from_utf8_lossy(&b);
        assert!(b.starts_with(b"070701"));
        assert!(s.contains("a\0"), "parent directory added");
        assert!(s.contains("a/b/c\0"));
        assert!(s.contains("dev/console\0"));
        assert!(s.contains("TRAILER!!!\0"));
        assert_eq!(b.len() % 4, 0);
        // Parents precede children.
        assert!(s.find("a/b\0").unwrap() < s.find("a/b/c\0").unwrap());
    }

    #[test]
    fn ldd_output() {
        let t = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                 \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                 \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        let l = parse_ldd(t).unwrap();
        assert_eq!(
            l,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(parse_ldd("\tlibfoo.so => not found\n").is_err());
    }

    #[test]
    fn module_names_and_modinfo() {
        assert_eq!(
            module_name("kernel/drivers/nvme/host/nvme-core.ko"),
            "nvme_core"
        );
        assert_eq!(module_name("x/virtio_net.ko.xz"), "virtio_net");
        let data = b"\x7fELF\0license=GPL\0depends=virtio,virtio_ring\0name=x\0";
        assert_eq!(modinfo(data, "depends"), "virtio,virtio_ring");
        assert_eq!(modinfo(data, "nope"), "");
    }

    #[test]
    fn read_line_parses() {
        let log = "x\nfractos-guest: read bs=131072 bytes=67108864 secs=0.500000 mbps=134.22 iops=1024.0 ops=512 first=a5a5a5a5a5a5a5a5 fnv=00000000000000ff\n";
        let r = parse_read_result(log).unwrap();
        assert_eq!(r.fnv, 0xff);
        assert_eq!(fnv1a(FNV_OFFSET, b""), FNV_OFFSET);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(r.bytes, 64 << 20);
        assert_eq!(r.ops, 512);
        assert_eq!(r.first, "a5a5a5a5a5a5a5a5");
        assert!((r.mbps - 134.22).abs() < 1e-9);
    }

    #[test]
    fn exec_words_are_encoded() {
        assert_eq!(encode_word("/bin/x"), "/bin/x");
        assert_eq!(encode_word("a,b c%"), "a%2Cb%20c%25");
    }

    #[test]
    fn controller_config_listens_everywhere() {
        let c = controller_config(3, &"ab".repeat(32));
        assert!(c.contains("process_listen = \"0.0.0.0:7100\""));
        assert!(c.contains("metrics_listen = \"0.0.0.0:9100\""));
    }

    #[test]
    fn controller_key_stays_in_a_private_initramfs() {
        use std::os::unix::fs::PermissionsExt;
        let key = "5a".repeat(32);
        let g = controller_image(Path::new("/bin/true"), &controller_config(0, &key));
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
