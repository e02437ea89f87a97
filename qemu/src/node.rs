//! One appliance in one QEMU process.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::CONFIG_FW_CFG_NAME;
use crate::exit::KernelExit;
use crate::{QemuError, QEMU};

/// The machine's firmware.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Firmware {
    /// QEMU's default legacy BIOS (SeaBIOS).
    #[default]
    Bios,
    /// UEFI: OVMF (Debian's `ovmf`), loaded with `-bios`; its variable
    /// store is then volatile, which a GRUB ISO boot does not need. Only
    /// ISO boots use it: `-kernel` (PVH) ignores the firmware.
    Uefi,
}

impl Firmware {
    /// Where Debian's `ovmf` puts the combined code + variables image.
    pub const OVMF_DEFAULT: &'static str = "/usr/share/ovmf/OVMF.fd";

    /// Short lower-case name (`bios`, `uefi`).
    pub fn name(self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        }
    }

    /// The OVMF image: `FRACTOS_OVMF` if set, else [`Self::OVMF_DEFAULT`].
    pub fn ovmf_path() -> PathBuf {
        std::env::var_os("FRACTOS_OVMF")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(Self::OVMF_DEFAULT))
    }
}

impl std::str::FromStr for Firmware {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bios" | "seabios" => Ok(Firmware::Bios),
            "uefi" | "ovmf" => Ok(Firmware::Uefi),
            _ => Err(format!("unknown firmware `{s}`: use `bios` or `uefi`")),
        }
    }
}

/// The QEMU machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Machine {
    /// The PC (`-machine pc`): PCI, virtio-net-pci NICs, NVMe disks,
    /// ivshmem slots, SeaBIOS or OVMF.
    #[default]
    Pc,
    /// QEMU's `microvm`, the Firecracker-class machine: no PCI, no
    /// firmware beyond qboot, the kernel booted via PVH, NICs as
    /// virtio-mmio devices (`virtio-net-device`, modern: `-global
    /// virtio-mmio.force-legacy=false`) that QEMU announces on the kernel
    /// command line (`virtio_mmio.device=512@0xfeb00e00:12`; `acpi=off`
    /// makes it do so). No NVMe disks or shared-memory slots (they are PCI
    /// devices); the cluster key still arrives over fw_cfg, which microvm
    /// has.
    Microvm,
}

impl Machine {
    /// Short lower-case name (`pc`, `microvm`).
    pub fn name(self) -> &'static str {
        match self {
            Machine::Pc => "pc",
            Machine::Microvm => "microvm",
        }
    }

    /// The `-machine` argument.
    fn arg(self) -> &'static str {
        match self {
            Machine::Pc => "pc",
            // Without ACPI, QEMU writes the virtio-mmio devices onto the
            // kernel command line (its `auto-kernel-cmdline`); with ACPI it
            // describes them only in the DSDT, which the kernel does not
            // parse.
            Machine::Microvm => "microvm,acpi=off,auto-kernel-cmdline=on",
        }
    }

    /// The `-device` driver of a virtio-net NIC, with its options.
    fn nic(self) -> &'static str {
        match self {
            Machine::Pc => "virtio-net-pci,disable-legacy=on",
            Machine::Microvm => "virtio-net-device",
        }
    }
}

impl std::str::FromStr for Machine {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pc" => Ok(Machine::Pc),
            "microvm" => Ok(Machine::Microvm),
            _ => Err(format!("unknown machine `{s}`: use `pc` or `microvm`")),
        }
    }
}

/// CPU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// Software emulation: works everywhere, ~10x slower.
    #[default]
    Tcg,
    /// Linux KVM: needs `/dev/kvm`.
    Kvm,
}

impl Accel {
    /// QEMU's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }

    /// The `-cpu` model used with it: the host's CPU under KVM; under TCG
    /// `qemu64` plus RDRAND (emulated from the host's random source).
    pub fn cpu(self) -> &'static str {
        match self {
            Accel::Tcg => "qemu64,+rdrand",
            Accel::Kvm => "host",
        }
    }
}

impl std::str::FromStr for Accel {
    type Err = QemuError;
    fn from_str(s: &str) -> Result<Self, QemuError> {
        match s {
            "tcg" => Ok(Accel::Tcg),
            "kvm" => Ok(Accel::Kvm),
            other => Err(QemuError::Config(format!(
                "unknown accelerator `{other}`: use `tcg` or `kvm`"
            ))),
        }
    }
}

/// What QEMU boots.
#[derive(Debug, Clone)]
pub enum Boot {
    /// The kernel ELF via PVH (`-kernel`), with this command line.
    Elf {
        /// Kernel ELF.
        kernel: PathBuf,
        /// Kernel command line (`-append`).
        cmdline: String,
    },
    /// A bootable ISO via the firmware and GRUB (`-cdrom`); the command line
    /// is baked into its `grub.cfg`.
    Iso(PathBuf),
    /// A Linux bzImage via `-kernel` (the benchmarks' baseline), optionally
    /// with an initramfs (`-initrd`, see [`crate::linux_guest`]).
    Linux {
        /// The bzImage.
        kernel: PathBuf,
        /// Kernel command line.
        cmdline: String,
        /// Initramfs (`-initrd`), if any.
        initrd: Option<PathBuf>,
    },
}

/// An emulated NVMe disk backed by a raw (sparse) file.
#[derive(Debug, Clone)]
pub struct NvmeDisk {
    /// Backing file; created with `size_mib` if missing.
    pub path: PathBuf,
    /// Size when created.
    pub size_mib: u64,
}

/// A shared-memory slot: an `ivshmem-plain` device whose BAR2 is the host
/// file `path` (QEMU `memory-backend-file,share=on`). A process on the
/// host maps the same file to attach through the slot (see
/// `fractos_transport::slot`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShmSlot {
    /// Backing file, normally under `/dev/shm`; created mode 0600 (and
    /// replaced if it exists) at launch, removed when the VM is dropped.
    pub path: PathBuf,
    /// Size in MiB (ivshmem wants a power of two).
    pub size_mib: u64,
}

/// A VM-to-VM Ethernet segment: QEMU's `socket` netdev on a UDP multicast
/// group over the host's loopback. Every NIC joined to the same group and
/// port sees every frame the others send, like a hub; nothing leaves the
/// host and no privileges are needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Segment {
    /// Multicast group (239.0.0.0/8 is site-local).
    pub group: std::net::Ipv4Addr,
    /// UDP port; distinct per segment so clusters never hear each other.
    pub port: u16,
}

/// Ports are picked below this when the kernel's ephemeral range starts
/// above it (Linux's default range is 32768–60999).
const PICKED_PORT_FLOOR: u16 = 20_000;

/// Ports to pick probes from: below the kernel's ephemeral (automatic)
/// range, so an outgoing connection of another program or test cannot be
/// given the port between our probe and QEMU's bind (which failed a CI run
/// with "Could not set up host forwarding rule").
fn pick_range() -> std::ops::Range<u16> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if low > PICKED_PORT_FLOOR + 1_000 {
        PICKED_PORT_FLOOR..low
    } else {
        // An unusual range: fall back to what the kernel hands out.
        0..0
    }
}

/// Binds a probe on 127.0.0.1 with `bind`, at a port below the ephemeral
/// range chosen at random (tried up to 256 times), else at a port the
/// kernel picks. The caller holds the probe while it picks others.
pub fn bind_probe<S>(bind: impl Fn(u16) -> std::io::Result<S>) -> Result<S, QemuError> {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let range = pick_range();
    if !range.is_empty() {
        let span = u64::from(range.end - range.start);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut x = nanos
            ^ (u64::from(std::process::id()) << 32)
            ^ COUNTER.fetch_add(0x9e37_79b9_7f4a_7c15, std::sync::atomic::Ordering::Relaxed);
        for _ in 0..256 {
            // xorshift64*
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let port = range.start + (x.wrapping_mul(0x2545_f491_4f6c_dd1d) % span) as u16;
            if let Ok(s) = bind(port) {
                return Ok(s);
            }
        }
    }
    bind(0).map_err(QemuError::io(
        "binding a probe socket on",
        Path::new("127.0.0.1"),
    ))
}

impl L2Segment {
    /// A segment on group 239.70.0.1 and a currently free UDP port.
    pub fn pick() -> Result<Self, QemuError> {
        let s = bind_probe(|p| std::net::UdpSocket::bind(("127.0.0.1", p)))?;
        let port = s
            .local_addr()
            .map_err(QemuError::io(
                "reading the probe socket of",
                Path::new("127.0.0.1"),
            ))?
            .port();
        Ok(L2Segment {
            group: std::net::Ipv4Addr::new(239, 70, 0, 1),
            port,
        })
    }
}

/// A file the guest reads by name through QEMU's fw_cfg device
/// (`-fw_cfg name=<name>,file=<path>`): how secrets such as the cluster key
/// reach an appliance without appearing on any command line (QEMU's argv
/// names only the path). Keep such files mode 0600, see
/// [`write_private_file`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwCfgFile {
    /// fw_cfg name, e.g. `opt/fractos/cluster-key` (QEMU wants user files
    /// under `opt/`).
    pub name: String,
    /// Host file QEMU reads at launch.
    pub path: PathBuf,
}

/// Writes `data` to a new file `path` that only its owner can read or
/// write (mode 0600 from its creation: an existing file is removed first,
/// and the new one is created exclusively, so no other user can open it in
/// between or plant a symlink there).
pub fn write_private_file(path: &Path, data: &[u8]) -> Result<(), QemuError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(QemuError::io("creating", dir))?;
    }
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(QemuError::io("replacing", path)(e)),
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(QemuError::io("creating", path))?;
    f.write_all(data).map_err(QemuError::io("writing", path))
}

/// Everything needed to launch one appliance.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Name used in logs and errors (e.g. `node0`).
    pub name: String,
    /// What to boot.
    pub boot: Boot,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Number of virtio-net NICs (user-mode networking backends).
    pub nics: u32,
    /// TCP forwards `(host_port, guest_port)` on the first NIC's user-mode
    /// network: `127.0.0.1:<host_port>` on the host reaches the guest's
    /// `<guest_port>` (QEMU `hostfwd`). Ignored without a NIC.
    pub hostfwd: Vec<(u16, u16)>,
    /// NVMe disks.
    pub nvme: Vec<NvmeDisk>,
    /// Shared-memory slots (`ivshmem-plain` devices), one file each.
    pub shm_slots: Vec<ShmSlot>,
    /// A further NIC on this VM-to-VM segment (after the user-mode ones),
    /// if any.
    pub l2: Option<L2Segment>,
    /// Accelerator.
    pub accel: Accel,
    /// Firmware (BIOS by default; UEFI boots ISOs with OVMF).
    pub firmware: Firmware,
    /// Machine type (PC by default).
    pub machine: Machine,
    /// Serial console output file.
    pub serial_log: PathBuf,
    /// Where QEMU writes its pid (for `fractos down`), if anywhere.
    pub pidfile: Option<PathBuf>,
    /// Files offered to the guest through fw_cfg (the cluster key).
    pub fw_cfg: Vec<FwCfgFile>,
    /// An initrd for a [`Boot::Elf`] boot (`-initrd`), which reaches the
    /// kernel as the PVH module without a command line: how a VMM without
    /// fw_cfg (Firecracker's `initrd_path`) delivers the cluster key, read
    /// with `fractos.key_source=initrd`. Keep it mode 0600.
    pub initrd: Option<PathBuf>,
    /// Index used to derive unique MAC addresses in a cluster.
    pub index: u32,
    /// Kill QEMU when the thread that launched it dies (default). Turn off
    /// only for appliances meant to outlive the launcher (`fractos up
    /// --detach`), which must then be stopped with [`crate::cluster::down`].
    pub die_with_parent: bool,
}

impl NodeSpec {
    /// A node booting `boot` with 128 MiB, no devices, TCG, logging to
    /// `serial_log`.
    pub fn new(name: &str, boot: Boot, serial_log: &Path) -> Self {
        NodeSpec {
            name: name.to_string(),
            boot,
            memory_mib: 128,
            nics: 0,
            hostfwd: Vec::new(),
            nvme: Vec::new(),
            shm_slots: Vec::new(),
            l2: None,
            accel: Accel::Tcg,
            firmware: Firmware::Bios,
            machine: Machine::Pc,
            serial_log: serial_log.to_path_buf(),
            pidfile: None,
            fw_cfg: Vec::new(),
            initrd: None,
            index: 0,
            die_with_parent: true,
        }
    }

    /// A node booting the kernel ELF `kernel` via PVH with `cmdline`
    /// (otherwise as [`NodeSpec::new`]).
    pub fn pvh(name: &str, kernel: &Path, cmdline: &str, serial_log: &Path) -> Self {
        let boot = Boot::Elf {
            kernel: kernel.to_path_buf(),
            cmdline: cmdline.to_string(),
        };
        Self::new(name, boot, serial_log)
    }

    /// Refuses what the machine type cannot have: on microvm (no PCI, no
    /// firmware choice) NVMe disks, shared-memory slots, UEFI and ISO or
    /// bzImage boots.
    pub fn check_machine(&self) -> Result<(), QemuError> {
        if self.machine != Machine::Microvm {
            return Ok(());
        }
        let refuse = |what: &str| {
            Err(QemuError::Config(format!(
                "{}: the microvm machine has no PCI and boots only the kernel ELF via PVH, so it cannot have {what}; use --machine pc for it",
                self.name
            )))
        };
        if !self.nvme.is_empty() {
            return refuse("NVMe disks (PCI devices)");
        }
        if !self.shm_slots.is_empty() {
            return refuse("shared-memory slots (ivshmem, a PCI device)");
        }
        if self.firmware == Firmware::Uefi {
            return refuse("UEFI firmware");
        }
        match self.boot {
            Boot::Elf { .. } => Ok(()),
            Boot::Iso(_) => refuse("an ISO boot"),
            Boot::Linux { .. } => refuse("a Linux bzImage boot here"),
        }
    }

    /// The QEMU arguments for this node.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = [
            "-machine",
            self.machine.arg(),
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-monitor",
            "none",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push("-accel".into());
        a.push(self.accel.name().into());
        if self.machine == Machine::Microvm {
            // Modern (version 2) virtio-mmio devices: QEMU's default is
            // legacy, which the driver refuses (Firecracker's are modern).
            a.extend(["-global".into(), "virtio-mmio.force-legacy=false".into()]);
        }
        // A CPU with RDRAND, so the appliance seeds its nonces from the
        // CPU's generator (`entropy: rdrand` in its log) instead of TSC
        // jitter: QEMU's default `qemu64` has none, and TCG emulates RDRAND
        // (from the host's getrandom) but not RDSEED.
        a.extend(["-cpu".into(), self.accel.cpu().into()]);
        a.extend(["-m".into(), format!("{}M", self.memory_mib)]);
        if self.firmware == Firmware::Uefi {
            a.extend(["-bios".into(), Firmware::ovmf_path().display().to_string()]);
        }
        a.extend([
            "-serial".into(),
            format!("file:{}", self.serial_log.display()),
        ]);
        if let Some(p) = &self.pidfile {
            a.extend(["-pidfile".into(), p.display().to_string()]);
        }
        for f in &self.fw_cfg {
            a.extend([
                "-fw_cfg".into(),
                format!("name={},file={}", f.name, f.path.display()),
            ]);
        }
        match &self.boot {
            Boot::Elf { kernel, cmdline } => {
                a.extend(["-kernel".into(), kernel.display().to_string()]);
                a.extend(["-append".into(), cmdline.clone()]);
                if let Some(i) = &self.initrd {
                    a.extend(["-initrd".into(), i.display().to_string()]);
                }
            }
            Boot::Linux {
                kernel,
                cmdline,
                initrd,
            } => {
                a.extend(["-kernel".into(), kernel.display().to_string()]);
                a.extend(["-append".into(), cmdline.clone()]);
                if let Some(i) = initrd {
                    a.extend(["-initrd".into(), i.display().to_string()]);
                }
            }
            Boot::Iso(iso) => {
                a.extend(["-cdrom".into(), iso.display().to_string()]);
                a.extend(["-boot".into(), "d".into()]);
            }
        }
        for n in 0..self.nics {
            let mut netdev = format!("user,id=net{n}");
            if n == 0 {
                for (host, guest) in &self.hostfwd {
                    netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
                }
            }
            a.extend([
                "-netdev".into(),
                netdev,
                "-device".into(),
                format!(
                    "{},netdev=net{n},mac=52:54:00:fa:{:02x}:{:02x}",
                    self.machine.nic(),
                    self.index & 0xff,
                    n & 0xff
                ),
            ]);
        }
        if let Some(l2) = &self.l2 {
            a.extend([
                "-netdev".into(),
                format!(
                    "socket,id=l2,mcast={}:{},localaddr=127.0.0.1",
                    l2.group, l2.port
                ),
                "-device".into(),
                format!(
                    "{},netdev=l2,mac=52:54:00:fb:{:02x}:{:02x}",
                    self.machine.nic(),
                    (self.index >> 8) & 0xff,
                    self.index & 0xff
                ),
            ]);
        }
        for (i, d) in self.nvme.iter().enumerate() {
            a.extend([
                "-drive".into(),
                format!("file={},if=none,id=nvme{i},format=raw", d.path.display()),
                "-device".into(),
                format!("nvme,serial=fractos{}n{i},drive=nvme{i}", self.index),
            ]);
        }
        for (i, slot) in self.shm_slots.iter().enumerate() {
            a.extend([
                "-object".into(),
                format!(
                    "memory-backend-file,id=shm{i},share=on,mem-path={},size={}M",
                    slot.path.display(),
                    slot.size_mib
                ),
                "-device".into(),
                format!("ivshmem-plain,memdev=shm{i}"),
            ]);
        }
        a
    }
}

/// Open-file limit QEMU is started with (or the hard limit, if lower).
const QEMU_OPEN_FILES: libc::rlim_t = 16_384;

/// Fails with [`QemuError::QemuMissing`] unless QEMU can be run.
pub fn check_qemu() -> Result<(), QemuError> {
    match Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Err(QemuError::QemuMissing {
            binary: QEMU.to_string(),
        }),
        Err(e) => Err(QemuError::io("running", QEMU)(e)),
    }
}

/// A running appliance. Dropping it kills QEMU (its whole process group).
#[derive(Debug)]
pub struct Appliance {
    spec: NodeSpec,
    child: Child,
    started: Instant,
    exit: Option<KernelExit>,
}

/// Longest kernel command line: QEMU's PVH boot ROM copies `-append`,
/// NUL included, into a 4096-byte buffer without a bound, and the kernel
/// keeps no more under any loader.
pub const MAX_PVH_CMDLINE: usize = 4095;

/// Largest configuration file the appliance reads (1 MiB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// [`QemuError::CommandLineTooLong`] if `cmdline` is over
/// [`MAX_PVH_CMDLINE`].
pub(crate) fn check_cmdline(node: &str, cmdline: &str) -> Result<(), QemuError> {
    if cmdline.len() > MAX_PVH_CMDLINE {
        return Err(QemuError::CommandLineTooLong {
            node: node.to_string(),
            len: cmdline.len(),
            max: MAX_PVH_CMDLINE,
        });
    }
    Ok(())
}

impl Appliance {
    /// Starts QEMU for `spec` (creating NVMe backing files and truncating
    /// the serial log).
    pub fn launch(spec: NodeSpec) -> Result<Self, QemuError> {
        if let Boot::Elf { cmdline, .. } = &spec.boot {
            check_cmdline(&spec.name, cmdline)?;
        }
        for f in spec.fw_cfg.iter().filter(|f| f.name == CONFIG_FW_CFG_NAME) {
            let size = fs::metadata(&f.path)
                .map_err(QemuError::io("reading", &f.path))?
                .len();
            if size > MAX_CONFIG_BYTES {
                return Err(QemuError::ConfigTooLarge {
                    node: spec.name.clone(),
                    path: f.path.clone(),
                    size,
                    max: MAX_CONFIG_BYTES,
                });
            }
        }
        if spec.accel == Accel::Kvm && !Path::new("/dev/kvm").exists() {
            return Err(QemuError::Config(
                "--accel kvm needs /dev/kvm; use --accel tcg on this machine".into(),
            ));
        }
        spec.check_machine()?;
        let mut paths: Vec<&Path> = vec![&spec.serial_log];
        paths.extend(spec.pidfile.as_deref());
        paths.extend(spec.nvme.iter().map(|d| d.path.as_path()));
        paths.extend(spec.shm_slots.iter().map(|d| d.path.as_path()));
        paths.extend(spec.fw_cfg.iter().map(|f| f.path.as_path()));
        paths.extend(spec.initrd.as_deref());
        let ovmf = Firmware::ovmf_path();
        if spec.firmware == Firmware::Uefi {
            if !ovmf.is_file() {
                return Err(QemuError::ToolMissing {
                    tool: format!("OVMF UEFI firmware ({})", ovmf.display()),
                    package: "ovmf".into(),
                });
            }
            paths.push(&ovmf);
        }
        if let Some(f) = spec.fw_cfg.iter().find(|f| f.name.contains(',')) {
            return Err(QemuError::Config(format!(
                "fw_cfg name `{}` contains a comma: QEMU options cannot carry it",
                f.name
            )));
        }
        for f in &spec.fw_cfg {
            check_private(&f.path, &format!("fw_cfg {}", f.name))?;
        }
        if let Some(i) = &spec.initrd {
            check_private(i, "initrd")?;
        }
        match &spec.boot {
            Boot::Elf { kernel, .. } => paths.push(kernel),
            Boot::Linux { kernel, initrd, .. } => {
                paths.push(kernel);
                paths.extend(initrd.as_deref());
            }
            Boot::Iso(iso) => paths.push(iso),
        }
        if let Some(p) = paths.iter().find(|p| p.to_string_lossy().contains(',')) {
            return Err(QemuError::Config(format!(
                "QEMU options cannot carry the path `{}` (it contains a comma): use another directory",
                p.display()
            )));
        }
        for d in &spec.nvme {
            if !d.path.exists() {
                let f = fs::File::create(&d.path).map_err(QemuError::io("creating", &d.path))?;
                f.set_len(d.size_mib << 20)
                    .map_err(QemuError::io("sizing", &d.path))?;
            }
        }
        for slot in &spec.shm_slots {
            create_slot_file(slot)?;
        }
        if let Some(dir) = spec.serial_log.parent() {
            fs::create_dir_all(dir).map_err(QemuError::io("creating", dir))?;
        }
        fs::write(&spec.serial_log, b"").map_err(QemuError::io("creating", &spec.serial_log))?;
        let mut cmd = Command::new(QEMU);
        cmd.args(spec.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        if spec.die_with_parent {
            // SAFETY: the closure runs in the forked child before exec and
            // only calls prctl(2), which is async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    // Die with the thread that started us, so even a
                    // SIGKILLed test run leaves no QEMU behind.
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        // User networking holds one host socket per forwarded connection:
        // let QEMU hold many (floods of connections are part of the tests).
        // SAFETY: runs in the forked child before exec and only calls
        // setrlimit(2), which is async-signal-safe; failure leaves the
        // inherited limit.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: QEMU_OPEN_FILES,
                    rlim_max: QEMU_OPEN_FILES,
                };
                let mut cur = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) == 0 {
                    let want = libc::rlimit {
                        rlim_cur: lim.rlim_cur.min(cur.rlim_max.max(cur.rlim_cur)),
                        rlim_max: cur.rlim_max,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        libc::setrlimit(libc::RLIMIT_NOFILE, &want);
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| match e.kind() {
            ErrorKind::NotFound => QemuError::QemuMissing {
                binary: QEMU.to_string(),
            },
            _ => QemuError::io("starting", QEMU)(e),
        })?;
        Ok(Appliance {
            spec,
            child,
            started: Instant::now(),
            exit: None,
        })
    }

    /// The spec this node was launched with.
    pub fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The serial log so far.
    pub fn log(&self) -> String {
        fs::read(&self.spec.serial_log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(20);
        lines[from..].join("\n")
    }

    fn poll_exit(&mut self) -> Result<Option<KernelExit>, QemuError> {
        if self.exit.is_none() {
            if let Some(st) = self
                .child
                .try_wait()
                .map_err(QemuError::io("waiting for", QEMU))?
            {
                self.exit = Some(KernelExit::from_status(st));
            }
        }
        Ok(self.exit)
    }

    /// Waits until the serial log contains a whole line with `marker`;
    /// returns the time since launch. Fails if QEMU exits first or `timeout`
    /// passes.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<Duration, QemuError> {
        let deadline = Instant::now() + timeout;
        let mut seen = 0usize;
        let mut buf = Vec::new();
        loop {
            if let Ok(mut f) = fs::File::open(&self.spec.serial_log) {
                buf.clear();
                let _ = f.read_to_end(&mut buf);
                // Search only the new part (plus overlap for a split marker).
                let from = seen.saturating_sub(marker.len());
                if buf.len() > from {
                    let text = String::from_utf8_lossy(&buf[from..]);
                    match text.find(marker) {
                        // Only a whole line counts: the serial log is
                        // written byte by byte, so the rest of the marker's
                        // line may not be there yet.
                        Some(at) if text[at..].contains('\n') => {
                            return Ok(self.started.elapsed());
                        }
                        Some(_) => {}
                        None => seen = buf.len(),
                    }
                }
            }
            if let Some(exit) = self.poll_exit()? {
                // One last look: QEMU may have written and exited at once.
                if self.log().contains(marker) {
                    return Ok(self.started.elapsed());
                }
                return Err(QemuError::ExitedEarly {
                    node: self.spec.name.clone(),
                    marker: marker.to_string(),
                    exit,
                    log: self.spec.serial_log.clone(),
                    tail: self.tail_with_stderr(),
                });
            }
            if Instant::now() >= deadline {
                return Err(QemuError::Timeout {
                    node: self.spec.name.clone(),
                    marker: marker.to_string(),
                    timeout,
                    log: self.spec.serial_log.clone(),
                    tail: self.tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn tail_with_stderr(&mut self) -> String {
        let mut t = self.tail();
        if let Some(mut e) = self.child.stderr.take() {
            let mut s = String::new();
            let _ = e.read_to_string(&mut s);
            if !s.trim().is_empty() {
                t.push_str("\n[qemu stderr] ");
                t.push_str(s.trim());
            }
        }
        t
    }

    /// Waits for QEMU to exit by itself and decodes the status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<KernelExit, QemuError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.poll_exit()? {
                return Ok(e);
            }
            if Instant::now() >= deadline {
                return Err(QemuError::Timeout {
                    node: self.spec.name.clone(),
                    marker: "QEMU exit".into(),
                    timeout,
                    log: self.spec.serial_log.clone(),
                    tail: self.tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether QEMU is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.poll_exit(), Ok(None))
    }

    /// Kills QEMU (its process group) and reaps it. Idempotent.
    pub fn kill(&mut self) {
        if self.exit.is_none() {
            let pgid = self.child.id() as i32;
            // SAFETY: kill(2) on our own child's process group (created with
            // process_group(0), so pgid == pid); no memory is involved.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
            if let Ok(st) = self.child.wait() {
                self.exit = Some(KernelExit::from_status(st));
            }
        }
        if let Some(p) = &self.spec.pidfile {
            let _ = fs::remove_file(p);
        }
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        self.kill();
        if self.spec.die_with_parent {
            for slot in &self.spec.shm_slots {
                let _ = fs::remove_file(&slot.path);
            }
        }
    }
}

/// Refuses a secret file (`what` names its use) that users other than its
/// owner can read or write.
fn check_private(path: &Path, what: &str) -> Result<(), QemuError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(path)
        .map_err(QemuError::io("reading", path))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(QemuError::Config(format!(
            "{} ({what}) is readable by other users (mode {:o}): it holds a secret; `chmod 600` it",
            path.display(),
            mode & 0o777
        )));
    }
    Ok(())
}

/// Creates a slot's backing file, mode 0600 from its creation (an old
/// one is replaced), at its full size (sparse).
fn create_slot_file(slot: &ShmSlot) -> Result<(), QemuError> {
    if !slot.size_mib.is_power_of_two() {
        return Err(QemuError::Config(format!(
            "shared-memory slot size {} MiB is not a power of two (ivshmem needs one)",
            slot.size_mib
        )));
    }
    write_private_file(&slot.path, b"")?;
    let f = fs::OpenOptions::new()
        .write(true)
        .open(&slot.path)
        .map_err(QemuError::io("opening", &slot.path))?;
    f.set_len(slot.size_mib << 20)
        .map_err(QemuError::io("sizing", &slot.path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_are_picked_below_the_ephemeral_range_and_held_apart() {
        let range = pick_range();
        let held: Vec<std::net::TcpListener> = (0..16)
            .map(|_| bind_probe(|p| std::net::TcpListener::bind(("127.0.0.1", p))).unwrap())
            .collect();
        let mut ports: Vec<u16> = held
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        if !range.is_empty() {
            assert!(
                ports.iter().all(|p| range.contains(p)),
                "{ports:?} not in {range:?}"
            );
        }
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 16, "a held probe's port was handed out twice");
        let seg = L2Segment::pick().unwrap();
        if !range.is_empty() {
            assert!(range.contains(&seg.port), "{}", seg.port);
        }
    }

    #[test]
    fn uefi_firmware_loads_ovmf_for_an_iso() {
        let mut s = NodeSpec::new("n", Boot::Iso("/x.iso".into()), Path::new("/tmp/s.log"));
        assert!(!s.args().iter().any(|a| a == "-bios"));
        s.firmware = "uefi".parse().unwrap();
        let a = s.args().join(" ");
        assert!(
            a.contains(&format!("-bios {}", Firmware::ovmf_path().display())),
            "{a}"
        );
        assert!(a.contains("-cdrom /x.iso -boot d"), "{a}");
        assert_eq!("bios".parse::<Firmware>(), Ok(Firmware::Bios));
        assert!("coreboot".parse::<Firmware>().is_err());
    }

    #[test]
    fn args_describe_devices() {
        let mut s = NodeSpec::pvh(
            "n",
            Path::new("/k"),
            "fractos.node=1",
            Path::new("/tmp/s.log"),
        );
        s.nics = 2;
        s.hostfwd.push((17000, 7000));
        s.index = 3;
        s.memory_mib = 256;
        s.nvme.push(NvmeDisk {
            path: "/tmp/d.img".into(),
            size_mib: 8,
        });
        s.shm_slots.push(ShmSlot {
            path: "/dev/shm/x-slot0".into(),
            size_mib: 16,
        });
        let a = s.args().join(" ");
        assert!(
            a.contains("-object memory-backend-file,id=shm0,share=on,mem-path=/dev/shm/x-slot0,size=16M -device ivshmem-plain,memdev=shm0"),
            "{a}"
        );
        assert!(a.contains("-m 256M"), "{a}");
        assert!(a.contains("-kernel /k -append fractos.node=1"), "{a}");
        assert!(
            a.contains("virtio-net-pci,disable-legacy=on,netdev=net1,mac=52:54:00:fa:03:01"),
            "{a}"
        );
        assert!(
            a.contains("-netdev user,id=net0,hostfwd=tcp:127.0.0.1:17000-:7000 "),
            "{a}"
        );
        assert!(a.contains("-netdev user,id=net1 "), "{a}");
        assert!(a.contains("nvme,serial=fractos3n0,drive=nvme0"), "{a}");
        assert!(a.contains("-serial file:/tmp/s.log"), "{a}");
        assert!(a.contains("isa-debug-exit,iobase=0xf4,iosize=0x04"), "{a}");
        assert!(a.contains("-accel tcg -cpu qemu64,+rdrand "), "{a}");
        assert!("kvm".parse::<Accel>().is_ok());
        let bad = NodeSpec::pvh("n", Path::new("/a,b/k"), "", Path::new("/tmp/s.log"));
        let err = Appliance::launch(bad).unwrap_err().to_string();
        assert!(err.contains("contains a comma"), "{err}");
        assert!("xen".parse::<Accel>().is_err());
    }

    #[test]
    fn fw_cfg_files_are_passed_by_path() {
        let mut s = NodeSpec::pvh("n", Path::new("/k"), "", Path::new("/tmp/s.log"));
        s.fw_cfg.push(FwCfgFile {
            name: "opt/fractos/cluster-key".into(),
            path: "/s/cluster.key".into(),
        });
        let a = s.args().join(" ");
        assert!(
            a.contains("-fw_cfg name=opt/fractos/cluster-key,file=/s/cluster.key"),
            "{a}"
        );
        s.fw_cfg[0].name = "opt/a,b".into();
        let err = Appliance::launch(s.clone()).unwrap_err().to_string();
        assert!(err.contains("contains a comma"), "{err}");

        // A secret readable by others is refused before QEMU starts.
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("fractos-fwcfg-mode-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let key = dir.join("k");
        fs::write(&key, b"x").unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        s.fw_cfg[0] = FwCfgFile {
            name: "opt/fractos/cluster-key".into(),
            path: key,
        };
        let err = Appliance::launch(s).unwrap_err().to_string();
        assert!(err.contains("readable by other users (mode 644)"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn private_files_are_created_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("fractos-private-{}", std::process::id()));
        let path = dir.join("k");
        // An existing, world-readable file is replaced, not reused.
        fs::create_dir_all(&dir).unwrap();
        fs::write(&path, b"old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write_private_file(&path, b"secret\n").unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read(&path).unwrap(), b"secret\n");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn microvm_uses_virtio_mmio_nics_and_refuses_pci_devices() {
        let mut s = NodeSpec::pvh(
            "n",
            Path::new("/k"),
            "fractos.node=0",
            Path::new("/tmp/s.log"),
        );
        s.machine = "microvm".parse().unwrap();
        s.nics = 1;
        s.hostfwd.push((17100, 7100));
        s.l2 = Some(L2Segment {
            group: std::net::Ipv4Addr::new(239, 70, 0, 1),
            port: 4000,
        });
        let a = s.args().join(" ");
        for want in [
            "-machine microvm,acpi=off,auto-kernel-cmdline=on ",
            "-global virtio-mmio.force-legacy=false",
            "-device virtio-net-device,netdev=net0,mac=52:54:00:fa:00:00",
            "-device virtio-net-device,netdev=l2,mac=",
        ] {
            assert!(a.contains(want), "{want}: {a}");
        }
        assert!(!a.contains("-pci"), "{a}");
        assert!(!a.contains("-initrd"), "{a}");
        let mut with_key = s.clone();
        with_key.initrd = Some("/s/cluster.key".into());
        let a = with_key.args().join(" ");
        assert!(
            a.contains("-kernel /k -append fractos.node=0 -initrd /s/cluster.key"),
            "{a}"
        );
        assert!(s.check_machine().is_ok());
        let pc = NodeSpec::pvh("n", Path::new("/k"), "", Path::new("/tmp/s.log"));
        assert!(!pc.args().join(" ").contains("virtio-mmio"));

        let mut disk = s.clone();
        disk.nvme.push(NvmeDisk {
            path: "/tmp/d.img".into(),
            size_mib: 8,
        });
        let err = Appliance::launch(disk).unwrap_err().to_string();
        assert!(err.contains("cannot have NVMe disks"), "{err}");
        let mut slot = s.clone();
        slot.shm_slots.push(ShmSlot {
            path: "/dev/shm/x".into(),
            size_mib: 16,
        });
        let err = slot.check_machine().unwrap_err().to_string();
        assert!(err.contains("shared-memory slots"), "{err}");
        let mut iso = s.clone();
        iso.boot = Boot::Iso("/x.iso".into());
        assert!(iso.check_machine().is_err());
        let mut uefi = s;
        uefi.firmware = Firmware::Uefi;
        assert!(uefi.check_machine().is_err());
        assert_eq!("pc".parse::<Machine>(), Ok(Machine::Pc));
        assert!("firecracker".parse::<Machine>().is_err());
    }

    #[test]
    fn linux_boot_passes_the_initrd() {
        let boot = Boot::Linux {
            kernel: "/vmlinuz".into(),
            cmdline: "console=ttyS0".into(),
            initrd: Some("/i.cpio".into()),
        };
        let a = NodeSpec::new("l", boot, Path::new("/tmp/l.log"))
            .args()
            .join(" ");
        assert!(
            a.contains("-kernel /vmlinuz -append console=ttyS0 -initrd /i.cpio"),
            "{a}"
        );
    }
}
