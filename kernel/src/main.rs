//! The FractOS appliance kernel.
//!
//! Entered from `fractos_loader`'s 32-bit stubs (PVH or Multiboot2) in long
//! mode on the boot stack, with SSE on and the first 4 GiB identity-mapped.
//! Boot order: serial → GDT/TSS/IDT → boot info → command line → logger →
//! TSC → cluster key (fw_cfg or boot module) → entropy → frames → heap →
//! PCI → virtio-mmio announcements → page tables → NVMe → virtio-net →
//! controller → ready.
#![no_std]
#![no_main]

extern crate alloc;

mod hw;

use alloc::vec::Vec;

use fractos_core::Config as CoreConfig;
use fractos_kernel::config::{self, Config, TestHook};
use fractos_kernel::entropy::{self, EntropySource};
use fractos_kernel::exit::ExitReason;
use fractos_kernel::frames::{FrameAllocator, FRAME_SIZE};
use fractos_kernel::fw_cfg::FwCfgError;
use fractos_kernel::pci;
use fractos_kernel::rdma::{PingPong, PingPongConfig, RdmaPort};
use fractos_kernel::secret::{self, KeyError, KeySource, Redacted, KEY_FILE_MAX};
use fractos_kernel::service::{PeerAddr, Service, ServiceConfig};
use fractos_kernel::shm::{BarMemory, SlotPool};
use fractos_kernel::storage::StorageProcess;
use fractos_loader::{BootInfo, BootModule, BootProtocol, IdentityMapped, PhysMem};
use fractos_wire::NodeId;
use linked_list_allocator::LockedHeap;
use log::{debug, error, info, warn};

use hw::{cpu, dma, fw_cfg, idle, layout, net, nvme, paging, pio, serial, time};

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// Heap size: a quarter of usable RAM, between 1 and 64 MiB.
fn heap_bytes(usable: u64) -> u64 {
    (usable / 4).clamp(1 << 20, 64 << 20) & !(FRAME_SIZE - 1)
}

/// Rust entry, called by the boot stub (`fractos_loader` `entry.rs`).
#[no_mangle]
extern "C" fn fractos_kernel_entry(protocol: u32, magic: u32, info: u64) -> ! {
    serial::init();
    // Exceptions are reported from here on, even while parsing boot data.
    cpu::init();
    hw::entropy::note_boot_info(protocol, info);
    // QEMU's PVH boot ROM copies the command line into a 4 KiB buffer
    // without a bound: a longer one has overwritten the start info, so it
    // is named by its size before the start info is read.
    if protocol == BootProtocol::Pvh as u32 {
        if let Ok(mut fw) = fw_cfg::open() {
            if let Err(e) = config::check_pvh_cmdline_size(fw.cmdline_size()) {
                kprintln!("fractos: boot failed: {e}");
                pio::exit(ExitReason::BootFailed);
            }
        }
    }
    // SAFETY: the stub passes the loader's pointer unchanged; the first
    // 4 GiB are identity-mapped and nothing else runs.
    let boot = match unsafe { fractos_loader::from_entry(protocol, magic, info, &IdentityMapped) } {
        Ok(b) => b,
        Err(e) => {
            kprintln!("fractos: boot failed: {e}");
            pio::exit(ExitReason::BootFailed);
        }
    };
    if boot.cmdline.truncated() {
        let e = config::CmdlineError::TooLong {
            max: fractos_loader::Cmdline::CAPACITY,
        };
        kprintln!("fractos: boot failed: {e}");
        pio::exit(ExitReason::BootFailed);
    }
    // The full configuration allocates: it is parsed once the heap exists.
    serial::init_logger(Config::log_level_of(boot.cmdline.as_str()));
    let (tsc_hz, tsc_src) = time::init();
    info!(
        "FractOS appliance kernel {} booting via {}",
        env!("CARGO_PKG_VERSION"),
        boot.protocol.name()
    );
    info!("cmdline: \"{}\"", Redacted(boot.cmdline.as_str()));
    info!(
        "time: TSC {}.{:03} MHz ({:?})",
        tsc_hz / 1_000_000,
        (tsc_hz / 1000) % 1000,
        tsc_src
    );
    debug!("cpu: GDT, TSS (3 IST stacks), IDT with 256 vectors loaded");

    // Devices brought up at boot stay owned here (dropping an NVMe
    // controller would disable it).
    let devices = match run(&boot) {
        Ok(d) => d,
        Err(e) => {
            error!("boot failed: {e}");
            pio::exit(ExitReason::BootFailed);
        }
    };
    let idle_poll = devices.config.idle_poll;
    serve(devices, idle_poll)
}

/// The event loop: polls every NIC and the controller service forever.
/// Without a service (no key or no NIC) the CPU halts.
fn serve(mut devices: Devices, idle_poll: bool) -> ! {
    let Some(service) = devices.service.as_mut() else {
        pio::halt_forever()
    };
    if !idle_poll && idle::init_tick(IDLE_TICK_HZ) {
        info!(
            "idle: local APIC LINT0 was masked; set to ExtINT for the 8259's {IDLE_TICK_HZ} Hz tick"
        );
    }
    let mut nics: Vec<(&mut smoltcp::iface::Interface, &mut net::Device)> = devices
        .net
        .iter_mut()
        .map(|n| (&mut n.iface, &mut n.dev))
        .collect();
    let mut next_report = time::now_ns() + REPORT_INTERVAL_NS;
    let mut busy_at = time::now_ns();
    let mut next_heap = 0;
    let mut perf = PerfReport::default();
    let mut next_perf = time::now_ns() + PERF_INTERVAL_NS;
    let slots = &mut devices.slots;
    let mut rdma = devices.rdma.take();
    loop {
        let now = time::now_ns();
        let attached = slots.poll(now, |ch| {
            service.add_process_channel(now, ch);
        });
        let mut moved = service.poll(now, &mut nics);
        if let Some(r) = rdma.as_mut() {
            moved |= r.poll(now, service, &mut nics);
        }
        for (_, dev) in nics.iter_mut() {
            // One doorbell for the frames this turn queued.
            dev.flush();
        }
        if moved | attached {
            busy_at = now;
        } else if !idle_poll && now.saturating_sub(busy_at) > IDLE_SPIN_NS {
            idle::halt_until_tick();
        }
        for (_, dev) in nics.iter_mut() {
            if let Some(e) = dev.take_error() {
                warn!("net: driver: {e}");
            }
        }
        if now >= next_heap {
            next_heap = now + HEAP_SAMPLE_NS;
            let h = HEAP.lock();
            service.set_heap_usage(h.used(), h.size());
            service.set_slot_stats(slots.stats());
        }
        if now >= next_perf {
            next_perf = now + PERF_INTERVAL_NS;
            perf.report(service.cycles(), nics.iter().map(|(_, d)| d.stats()));
        }
        if now >= next_report {
            next_report = now + REPORT_INTERVAL_NS;
            let s = service.stats();
            let c = service.controller().stats();
            debug!("controller: {s:?} {c:?} {:?}", slots.stats());
        }
    }
}

/// The RoCEv2 engine on one NIC, and the `rc_pingpong` server if that
/// test mode is on.
struct Rdma {
    iface: usize,
    port: RdmaPort,
    pingpong: Option<PingPong>,
}

impl Rdma {
    /// Brings the engine up on the peer NIC (the second when it has an
    /// address, else the first); `None` without one.
    fn start(
        config: &Config,
        net: &[net::Net],
        service: Option<&mut Service>,
        seed: &[u8; 32],
    ) -> Option<Rdma> {
        let iface = net::rdma_nic(config)?;
        let nic = net.get(iface)?;
        let Some(ip) = nic.iface.ipv4_addr() else {
            warn!("rdma: nic {iface} has no IPv4 address; RoCEv2 engine not started");
            return None;
        };
        let size = config.rc_size as usize;
        let mut port = RdmaPort::new(nic.dev.mac_address().0, ip, size.next_multiple_of(4096));
        info!(
            "rdma: RoCEv2 engine on {} ip {ip}, GID {}, frames up to {} bytes",
            nic.bdf,
            core::net::Ipv6Addr::from(port.gid().octets()),
            nic.dev.max_frame_len()
        );
        let mut pingpong = None;
        if config.test == Some(TestHook::RcPingpong) {
            let Some(sockets) = service.and_then(|s| s.socket_set(iface)) else {
                error!("rc_pingpong: no controller service to serve the exchange; not started");
                return Some(Rdma {
                    iface,
                    port,
                    pingpong,
                });
            };
            let cfg = PingPongConfig {
                size: config.rc_size,
                iters: config.rc_iters,
                mtu: fractos_roce::Mtu::from_bytes(config.rc_mtu)
                    .unwrap_or(fractos_roce::Mtu::Mtu1024),
                ..PingPongConfig::default()
            };
            let psn_seed = u64::from_le_bytes(seed[..8].try_into().unwrap_or_default());
            match PingPong::new(cfg, &mut port, sockets, psn_seed) {
                Ok(p) => {
                    info!(
                        "rc_pingpong: serving ibv_rc_pingpong on {ip}:{} (-g 1 -s {} -n {} -m {}); the exchange is the example's own, unauthenticated (test mode)",
                        fractos_kernel::rdma::PINGPONG_PORT,
                        cfg.size,
                        cfg.iters,
                        cfg.mtu.bytes()
                    );
                    pingpong = Some(p);
                }
                Err(e) => error!("rc_pingpong: not started: {e}"),
            }
        }
        Some(Rdma {
            iface,
            port,
            pingpong,
        })
    }

    /// Frames the driver diverted go to the engine, the ping-pong server
    /// runs, the engine's timers fire and its frames leave. Returns
    /// whether anything moved.
    fn poll(
        &mut self,
        now: u64,
        service: &mut Service,
        nics: &mut [(&mut smoltcp::iface::Interface, &mut net::Device)],
    ) -> bool {
        let Some((_, dev)) = nics.get_mut(self.iface) else {
            return false;
        };
        let port = &mut self.port;
        let mut moved = dev.drain_diverted(|f| port.receive(now, f)) > 0;
        if let (Some(p), Some(sockets)) = (self.pingpong.as_mut(), service.socket_set(self.iface)) {
            p.poll(now, port, sockets);
        }
        // The engine's answers and the server's sends leave this turn.
        let room = dev.tx_free();
        moved |= port.poll(now, room, |f| dev.send_frame(f)) > 0;
        service.set_roce_counters(port.engine.counters());
        moved
    }
}

/// How often the event loop logs where its cycles went (when frames
/// moved since the last report).
const PERF_INTERVAL_NS: u64 = 2_000_000_000;

/// The per-frame cycle breakdown of the event loop: totals at the last
/// report, so that each report covers the interval since.
#[derive(Default)]
struct PerfReport {
    cycles: fractos_kernel::service::Cycles,
    nic: fractos_virtio_net::Stats,
}

impl PerfReport {
    /// Logs cycles per frame by stage since the last report, if frames
    /// moved: event-loop turn (busy and idle), smoltcp (with the driver
    /// work it calls), of which the driver's receive and transmit queue
    /// work, the node driver and core, of which socket copies.
    fn report(
        &mut self,
        cycles: fractos_kernel::service::Cycles,
        nics: impl Iterator<Item = fractos_virtio_net::Stats>,
    ) {
        let mut nic = fractos_virtio_net::Stats::default();
        for s in nics {
            nic.rx_frames += s.rx_frames;
            nic.tx_frames += s.tx_frames;
            nic.rx_bytes += s.rx_bytes;
            nic.tx_bytes += s.tx_bytes;
            nic.rx_cycles += s.rx_cycles;
            nic.tx_cycles += s.tx_cycles;
            nic.csum_cycles += s.csum_cycles;
            nic.rx_bad_checksum += s.rx_bad_checksum;
        }
        let frames = (nic.rx_frames + nic.tx_frames) - (self.nic.rx_frames + self.nic.tx_frames);
        if frames > 0 {
            let per = |now: u64, then: u64| now.wrapping_sub(then) / frames;
            let c = &cycles;
            let o = &self.cycles;
            info!(
                "perf: {frames} frames (rx {} / {} B, tx {} / {} B), {} turns; cycles per frame: \
                 loop {} = smoltcp {} (driver rx {}, tx {}, checksums {}) + node {} (socket copies {}) \
                 + rest; {} bad checksums",
                nic.rx_frames - self.nic.rx_frames,
                nic.rx_bytes - self.nic.rx_bytes,
                nic.tx_frames - self.nic.tx_frames,
                nic.tx_bytes - self.nic.tx_bytes,
                c.turns - o.turns,
                per(c.total, o.total),
                per(c.ifaces, o.ifaces),
                per(nic.rx_cycles, self.nic.rx_cycles),
                per(nic.tx_cycles, self.nic.tx_cycles),
                per(nic.csum_cycles, self.nic.csum_cycles),
                per(c.node, o.node),
                per(c.socket_io, o.socket_io),
                nic.rx_bad_checksum - self.nic.rx_bad_checksum,
            );
        }
        self.cycles = cycles;
        self.nic = nic;
    }
}

/// Idle tick rate: the longest an idle appliance sleeps before polling.
const IDLE_TICK_HZ: u32 = 1000;
/// How long the loop keeps spinning after the last activity before it
/// starts halting between ticks.
const IDLE_SPIN_NS: u64 = 2_000_000;

/// How often the heap gauge of the metrics is refreshed.
const HEAP_SAMPLE_NS: u64 = 100_000_000;

/// How often the event loop logs its counters (at debug level).
const REPORT_INTERVAL_NS: u64 = 30_000_000_000;

/// Starts the built-in storage service over the first NVMe controller
/// as a local process of `svc`; failures are logged and skip it.
fn start_storage(svc: &mut Service, disk: nvme::Disk, config: &Config, key: &[u8; 32]) {
    let blocks = match nvme::NvmeBlocks::new(disk) {
        Ok(b) => b,
        Err(e) => {
            warn!("storage: not started: DMA pool: {e}");
            return;
        }
    };
    let name = alloc::format!("appliance{}/storage", config.node);
    let read = alloc::format!("storage/{}/read", config.node);
    let write = alloc::format!("storage/{}/write", config.node);
    let mut reads: Vec<&str> = alloc::vec![read.as_str()];
    reads.extend(config.storage_names.iter().map(|s| s.as_str()));
    info!(
        "storage: serving nvme {} as {name}: read Request published as {reads:?}, write as {write:?}",
        blocks.bdf()
    );
    let token = fractos_core::process_token(key, name.as_bytes());
    let p = StorageProcess::new(blocks, &name, token, &reads, &[write.as_str()]);
    svc.add_local(time::now_ns(), alloc::boxed::Box::new(p));
}

/// Why the controller service is not started.
#[derive(Debug, thiserror::Error)]
enum NotStarted<'a> {
    #[error("{0}")]
    Key(KeyError<'a>),
    #[error("no NIC: give the appliance a virtio-net NIC (QEMU: -device virtio-net-pci; QEMU microvm or Firecracker: a virtio-mmio net device announced as virtio_mmio.device=<size>@<base>:<irq> on the command line)")]
    NoNic,
}

/// Loads the cluster key from where the command line says (before the
/// frame allocator exists: a boot module's memory is still intact), and
/// wipes a boot module it came from.
fn load_cluster_key(boot: &BootInfo) -> Result<[u8; 32], KeyError<'_>> {
    let cmdline = boot.cmdline.as_str();
    if secret::key_on_cmdline(cmdline) {
        return Err(KeyError::OnCommandLine);
    }
    let modules = boot
        .modules
        .as_slice()
        .iter()
        .map(|m| (m.cmdline(), m.start, m.len()));
    let read_module = |start: u64, buf: &mut [u8]| {
        if IdentityMapped.read(start, buf).is_err() {
            return false;
        }
        // SAFETY: `IdentityMapped::read` just checked that `[start, start +
        // len)` lies in the identity-mapped first 4 GiB; it is the loader's
        // module memory (usable RAM), which nothing else uses yet: the frame
        // allocator does not exist. Zeroing leaves no copy of the key in
        // RAM the heap will reuse.
        unsafe { core::ptr::write_bytes(start as *mut u8, 0, buf.len()) };
        true
    };
    let read_fw_cfg = |name: &str, buf: &mut [u8; KEY_FILE_MAX]| -> Result<usize, FwCfgError> {
        fw_cfg::read_file(name, buf)
    };
    secret::load_key(KeySource::of(cmdline), read_fw_cfg, modules, read_module)
}

/// The controller service's configuration, or why it is not started.
fn service_config<'a>(
    config: &Config,
    key: &Result<[u8; 32], KeyError<'a>>,
    seed: &[u8; 32],
    nics: usize,
) -> Result<ServiceConfig, NotStarted<'a>> {
    let key = (*key).map_err(NotStarted::Key)?;
    if nics == 0 {
        return Err(NotStarted::NoNic);
    }
    // Distinct per boot and unpredictable: the RTC's seconds in the high
    // half, 32 random bits (derived, so the seed stays secret: the
    // incarnation travels in the clear) in the low half.
    let random = entropy::derive(seed, "incarnation");
    let incarnation = (time::rtc_unix_seconds() << 32)
        | u64::from(u32::from_le_bytes([
            random[0], random[1], random[2], random[3],
        ]));
    let node = NodeId(config.node);
    let mut core = CoreConfig::new(node, incarnation, key);
    // Handshake nonces: the core mixes this seed with the cluster key.
    core.rng_seed = entropy::derive(seed, "controller-rng");
    core.peer_security = config.peer_security;
    core.members = if config.members.is_empty() {
        core::iter::once(config.node)
            .chain(config.peers.iter().map(|p| p.node))
            .map(NodeId)
            .collect()
    } else {
        config.members.iter().copied().map(NodeId).collect()
    };
    let mut s = ServiceConfig::new(core);
    s.node.core.limits.max_message_len = MAX_MESSAGE_LEN;
    // In-kernel processes (the storage service) take a slot too.
    s.node.core.limits.max_processes = s.node.max_process_conns + 4;
    s.process_port = config.process_port;
    s.peer_port = config.peer_port;
    s.metrics_port = (config.metrics_port != 0).then_some(config.metrics_port);
    s.peer_iface = usize::from(nics > 1);
    s.dhcp_iface = config.ip_dhcp.then_some(0);
    s.node.peers = config
        .peers
        .iter()
        .map(|p| {
            let addr = PeerAddr {
                addr: p.addr,
                port: p.port.unwrap_or(config.peer_port),
            };
            (NodeId(p.node), addr)
        })
        .collect();
    Ok(s)
}

/// The Multiboot2 module named [`config::BLOB_MODULE_NAME`], if any;
/// one over [`config::BLOB_MAX`] is refused here, before its memory is
/// reserved.
fn config_module(boot: &BootInfo) -> Result<Option<&BootModule>, BootError> {
    let mut named = boot
        .modules
        .as_slice()
        .iter()
        .filter(|m| secret::module_named(m.cmdline(), config::BLOB_MODULE_NAME));
    let Some(m) = named.next() else {
        return Ok(None);
    };
    if named.next().is_some() {
        return Err(BootError::ConfigTwice("two Multiboot2 modules"));
    }
    if m.len() > config::BLOB_MAX as u64 {
        return Err(BootError::ConfigTooLarge {
            what: "Multiboot2 module `fractos-config`",
            size: m.len(),
        });
    }
    Ok(Some(m))
}

/// The configuration: the configuration file (fw_cfg
/// [`config::BLOB_FW_CFG_NAME`] or the module [`config::BLOB_MODULE_NAME`],
/// never both), if any, with the command line applied over it.
fn load_config(cmdline: &str, module: Option<&BootModule>) -> Result<Config, BootError> {
    let from_fw_cfg = match fw_cfg::open() {
        Ok(mut fw) => match fw.read_file_to_vec(config::BLOB_FW_CFG_NAME, config::BLOB_MAX) {
            Ok(b) => Some(b),
            Err(FwCfgError::NotFound) => None,
            Err(FwCfgError::TooLarge { size, .. }) => {
                return Err(BootError::ConfigTooLarge {
                    what: "fw_cfg file `opt/org.fractos/config`",
                    size: u64::from(size),
                })
            }
            Err(e) => {
                warn!("config: fw_cfg: {e}");
                None
            }
        },
        Err(_) => None,
    };
    let blob = match (from_fw_cfg, module) {
        (Some(_), Some(_)) => return Err(BootError::ConfigTwice(
            "the fw_cfg file `opt/org.fractos/config` and the Multiboot2 module `fractos-config`",
        )),
        (Some(b), None) => {
            info!(
                "config: {} bytes from fw_cfg {}",
                b.len(),
                config::BLOB_FW_CFG_NAME
            );
            b
        }
        (None, Some(m)) => {
            let mut b = alloc::vec![0u8; m.len() as usize];
            IdentityMapped
                .read(m.start, &mut b)
                .map_err(|_| BootError::ConfigUnreadable { start: m.start })?;
            info!(
                "config: {} bytes from module {}",
                b.len(),
                config::BLOB_MODULE_NAME
            );
            b
        }
        (None, None) => return Ok(Config::parse(cmdline, |e| warn!("cmdline: {e}"))),
    };
    let layered = Config::layered(cmdline, &blob, |e| warn!("cmdline: {e}"))
        .map_err(|e| BootError::Config(alloc::string::ToString::to_string(&e)))?;
    for key in &layered.overridden {
        info!("config: `{key}` from the command line overrides the configuration file");
    }
    Ok(layered.config)
}

/// Largest frame body the appliance accepts: copy chunks are 64 KiB, so
/// this leaves room while bounding each connection's receive buffer.
const MAX_MESSAGE_LEN: usize = 256 * 1024;

/// Errors that stop the boot.
#[derive(Debug, thiserror::Error)]
enum BootError {
    #[error("frame allocator: {0}")]
    Frames(#[from] fractos_kernel::frames::FrameError),
    #[error("page tables: {0}")]
    Paging(#[from] paging::PagingError),
    #[error("nvme: self-test FAILED: {0}")]
    NvmeSelfTest(#[from] nvme::SelfTestError),
    #[error("config: {0}")]
    Config(alloc::string::String),
    #[error("config: the {what} is {size} bytes, more than the {max} accepted", max = config::BLOB_MAX)]
    ConfigTooLarge { what: &'static str, size: u64 },
    #[error("config: configuration given twice ({0}): give one")]
    ConfigTwice(&'static str),
    #[error("config: the Multiboot2 module `fractos-config` at {start:#x} is outside readable memory: the loader placed it above 4 GiB")]
    ConfigUnreadable { start: u64 },
}

/// What the boot brought up.
struct Devices {
    #[expect(dead_code, reason = "owned until the storage service takes the disks")]
    nvme: Vec<nvme::Disk>,
    net: Vec<net::Net>,
    service: Option<Service>,
    /// The RoCEv2 engine, if on.
    rdma: Option<Rdma>,
    /// Shared-memory slots (ivshmem devices), polled with the NICs.
    slots: SlotPool<BarMemory>,
    config: Config,
}

fn run(boot: &BootInfo) -> Result<Devices, BootError> {
    log_memory_map(boot);
    if let Some(acpi) = &boot.acpi {
        info!(
            "acpi: RSDP rev {} oem {:?} rsdt {:#x} xsdt {:#x?}",
            acpi.revision,
            core::str::from_utf8(&acpi.oem_id).unwrap_or("?"),
            acpi.rsdt_addr,
            acpi.xsdt_addr
        );
    } else {
        warn!("acpi: no RSDP found");
    }

    // Before the frame allocator: a key module's memory is still intact.
    let key = load_cluster_key(boot);
    let (seed, source) = hw::entropy::seed();
    match source {
        EntropySource::TscJitter => warn!("entropy: {source}"),
        _ => info!("entropy: {source}"),
    }

    let kernel = (layout::kernel_start(), layout::kernel_end());
    // A configuration module stays intact until the heap holds a copy.
    let module = config_module(boot)?;
    let module_range = module.map_or((0, 0), |m| (m.start, m.end));
    let mut frames = FrameAllocator::new(&boot.memory, &[(0, 0x10_0000), kernel, module_range])?;
    let heap_len = heap_bytes(boot.memory.usable_bytes());
    let heap = frames.alloc_contiguous(heap_len / FRAME_SIZE, FRAME_SIZE)?;
    // SAFETY: `[heap, heap + heap_len)` is fresh usable RAM below the
    // frame allocator's cursor, identity-mapped, and never handed out again.
    unsafe { HEAP.lock().init(heap as *mut u8, heap_len as usize) };
    let config = load_config(boot.cmdline.as_str(), module)?;
    let config = &config;
    info!(
        "memory: kernel {:#x}-{:#x}, heap {} KiB at {:#x}",
        kernel.0,
        kernel.1,
        heap_len / 1024,
        heap
    );

    let devices = pci::enumerate(&pio::PortConfigAccess);
    for d in &devices {
        info!("pci: {d}");
    }
    info!("pci: {} functions", devices.len());
    if devices.is_empty() {
        info!("pci: no PCI functions (a VMM without PCI, e.g. QEMU microvm or Firecracker): no NVMe storage service, no shared-memory slots");
    }
    let bars: Vec<(u64, u64)> = devices
        .iter()
        .flat_map(|d| d.memory_windows().map(|(_, a, s)| (a, s)))
        .collect();
    let virtio_mmio = fractos_kernel::virtio_mmio::devices(
        boot.cmdline.as_str(),
        boot.memory.regions(),
        &bars,
        |e| warn!("virtio-mmio: {e}"),
    );
    for d in &virtio_mmio {
        info!(
            "virtio-mmio: device at {:#x} size {:#x} irq {} (polled)",
            d.base, d.size, d.irq
        );
    }
    let mmio: Vec<(u64, u64)> = bars
        .iter()
        .copied()
        .chain(virtio_mmio.iter().map(|d| (d.base, d.size)))
        .collect();

    let g = cpu::ist_guards();
    let guards = [layout::boot_stack_guard(), g[0], g[1], g[2]];
    // The local APIC's page too, for routing the idle tick (hw/idle.rs).
    let windows: Vec<(u64, u64)> = mmio.iter().copied().chain(idle::lapic_window()).collect();
    let stats = paging::init(&boot.memory, &mut frames, &guards, &windows)?;
    info!(
        "paging: {} x 2MiB + {} x 4KiB pages, {} MMIO windows uncached, {} guard pages unmapped",
        stats.huge, stats.small, stats.mmio_windows, stats.guards
    );
    dma::install(frames);

    let mut nvme = nvme::bring_up(&devices, config.test == Some(TestHook::Nvme))?;
    let mut net = net::bring_up(&devices, &virtio_mmio, &mmio, config);
    let slots = bring_up_slots(&devices, &seed);
    let mut service = match service_config(config, &key, &seed, net.len()) {
        Ok(c) => {
            let members: Vec<u32> = c.node.core.members.iter().map(|n| n.0).collect();
            info!(
                "controller: node {} members {members:?}, processes on port {}, peers on port {} (nic {}), metrics on {:?}, {} peer(s) to dial",
                config.node,
                c.process_port,
                c.peer_port,
                c.peer_iface,
                c.metrics_port,
                c.node.peers.iter().filter(|p| p.0 .0 > config.node).count()
            );
            let key = c.node.core.cluster_key;
            let mut svc = Service::new(c, net.len(), time::now_ns());
            if !nvme.is_empty() {
                start_storage(&mut svc, nvme.remove(0), config, &key);
            }
            Some(svc)
        }
        Err(why @ NotStarted::Key(KeyError::OnCommandLine)) => {
            error!("controller: not started: {why}");
            None
        }
        Err(why) => {
            warn!("controller: not started: {why}");
            None
        }
    };
    let rdma = Rdma::start(config, &net, service.as_mut(), &seed);
    if let Some((allocated, free)) = dma::usage() {
        info!(
            "memory: {allocated} frames allocated, {} MiB free",
            free >> 20
        );
    }

    let boot_us = time::now_ns() / 1000;
    kprintln!(
        "fractos: ready node={} boot_us={} protocol={}",
        config.node,
        boot_us,
        boot.protocol.name()
    );
    if config.test == Some(TestHook::Net) {
        run_net_test(net.first_mut(), config);
    }
    run_test_hook(config.test);
    Ok(Devices {
        nvme,
        net,
        service,
        rdma,
        slots,
        config: config.clone(),
    })
}

/// Takes over every `ivshmem-plain` device's BAR2 as a shared-memory
/// slot (mapped by `paging::init` with the other BARs).
fn bring_up_slots(devices: &[pci::PciFunction], seed: &[u8; 32]) -> SlotPool<BarMemory> {
    let mut pool = SlotPool::new(entropy::derive(seed, "slot-nonces"));
    for (f, addr, size) in fractos_kernel::shm::ivshmem_windows(devices) {
        let a = f.address;
        let name = alloc::format!("{:02x}:{:02x}.{}", a.bus(), a.device(), a.function());
        let Ok(len) = usize::try_from(size) else {
            continue;
        };
        // SAFETY: enabling memory decoding of an ivshmem device: it does
        // no DMA (it has no DMA engine), so bus mastering grants nothing.
        unsafe { pci::enable_memory_and_bus_master(&pio::PortConfigAccess, a) };
        // SAFETY: `paging::init` identity-mapped every assigned memory BAR,
        // this one included; it is device memory (RAM shared with the host
        // file), never part of the heap or of any Rust object, and the
        // devices live as long as the kernel. PCI BARs are aligned to
        // their size (at least 4 KiB).
        // Identity-mapped, so devices reach it at the same address.
        let mem = unsafe { BarMemory::new(addr as *mut u8, len) }.with_device_address(addr);
        info!("shm: slot {name}: {} KiB at {addr:#x}", size / 1024);
        pool.add(&name, mem, time::now_ns());
    }
    pool
}

fn log_memory_map(boot: &BootInfo) {
    info!(
        "memory: {} memory map",
        if boot.memory_from_efi { "EFI" } else { "E820" }
    );
    for r in boot.memory.regions() {
        info!(
            "memory: [{:#014x}-{:#014x}] {} ({} KiB)",
            r.start,
            r.end() - 1,
            r.kind.name(),
            r.len / 1024
        );
    }
    if boot.memory.dropped() > 0 {
        warn!(
            "memory: {} regions dropped (map full)",
            boot.memory.dropped()
        );
    }
    info!(
        "memory: {} MiB usable in {} regions",
        boot.memory.usable_bytes() >> 20,
        boot.memory.regions().len()
    );
}

/// `fractos.test=net`: serve one TCP echo connection, then exit cleanly;
/// no NIC, a failure or the timeout exits with the boot-failed code.
fn run_net_test(net: Option<&mut net::Net>, config: &Config) -> ! {
    info!("test hook: Net");
    let result = match net {
        Some(n) => net::echo_test(n, config.ip.addr, config.test_port),
        None => Err(net::TestError::NoNic),
    };
    match result {
        Ok(_) => {
            info!("net: test ok");
            pio::exit(ExitReason::Success)
        }
        Err(e) => {
            error!("net: test FAILED: {e}");
            pio::exit(ExitReason::BootFailed)
        }
    }
}

#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let pad = core::hint::black_box([depth; 64]);
    if core::hint::black_box(depth) == u64::MAX {
        return 0;
    }
    recurse(depth + 1) + pad[depth as usize % 64]
}

fn run_test_hook(hook: Option<TestHook>) {
    let Some(hook) = hook else { return };
    info!("test hook: {hook:?}");
    match hook {
        // The NVMe self-test ran (and passed) before the ready line.
        TestHook::Exit | TestHook::Nvme => pio::exit(ExitReason::Success),
        // Run by `run_net_test` before this.
        TestHook::Net => error!("net test hook not run"),
        // Served by the event loop.
        TestHook::RcPingpong => return,
        TestHook::PageFault => {
            let p = core::hint::black_box(0x0000_7fff_dead_b000u64) as *const u64;
            // SAFETY: deliberately unsound: this address is never mapped and
            // the read must fault; the fault handler ends the run.
            let v = unsafe { p.read_volatile() };
            error!("read {v:#x} from an unmapped page without a fault");
        }
        TestHook::DivZero => {
            let d = core::hint::black_box(0u32);
            // SAFETY: `div` by zero raises #DE, which the IDT reports; no
            // memory is touched.
            unsafe {
                core::arch::asm!("div {d:e}", d = in(reg) d, inout("eax") 1u32 => _,
                                 inout("edx") 0u32 => _, options(nostack))
            };
            error!("divided by zero without a fault");
        }
        TestHook::Panic => panic!("test panic requested by fractos.test=panic"),
        TestHook::InvalidOpcode => {
            // SAFETY: `ud2` raises #UD, which the IDT reports; nothing else.
            unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
            error!("ud2 executed without a fault");
        }
        TestHook::Interrupt => {
            // SAFETY: `int 0x40` enters the IDT's catch-all stub for vector
            // 0x40, which reports it; nothing else.
            unsafe { core::arch::asm!("int 0x40", options(nomem, nostack)) };
            error!("int 0x40 returned");
        }
        TestHook::StackOverflow => {
            let r = recurse(core::hint::black_box(0));
            error!("recursion returned {r} without hitting the guard page");
        }
    }
    pio::exit(ExitReason::BootFailed)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    use core::fmt::Write;
    let mut out = serial::emergency();
    let _ = writeln!(out, "\n!!! FRACTOS PANIC: {}", info.message());
    if let Some(l) = info.location() {
        let _ = writeln!(out, "    at {}:{}:{}", l.file(), l.line(), l.column());
    }
    let mut words = [0u64; cpu::SCAN_WORDS];
    // Scan the caller frames, above this handler's own buffer.
    let from = (&raw const words) as u64 + core::mem::size_of_val(&words) as u64;
    let n = cpu::stack_words(from, &mut words);
    let text = (layout::text_start(), layout::text_end());
    let _ = write!(out, "    stack: {from:#x}\n    backtrace (stack scan):");
    for w in fractos_kernel::fault::return_addresses(&words[..n], text) {
        let _ = write!(out, " {w:#x}");
    }
    let r = ExitReason::Panic;
    let _ = writeln!(
        out,
        "\n!!! exit code {:#x} (qemu status {})",
        r.code(),
        r.qemu_status()
    );
    pio::exit(r)
}
