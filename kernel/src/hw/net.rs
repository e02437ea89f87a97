//! virtio-net bring-up at boot: the `fractos-virtio-net` driver's [`Hal`]
//! over the kernel's DMA frames and the identity-mapped (uncached) device
//! windows — PCI BARs, and virtio-mmio register blocks announced on the
//! command line (`virtio_mmio.device=`, Firecracker / QEMU microvm) — a
//! smoltcp [`Interface`] with the static IPv4 address of the command line,
//! and the `fractos.test=net` echo server.
//!
//! Everything polls: no interrupts, smoltcp's time comes from the TSC.

use alloc::vec;
use alloc::vec::Vec;
use core::ptr::NonNull;

use fractos_kernel::config::Config;
use fractos_kernel::pci::{self, PciFunction};
use fractos_kernel::virtio_mmio::MmioDevice;
use fractos_virtio_net::{
    is_virtio_net, mmio_transport, pci_transport, BufferDirection, Hal, PciConfig, PhysAddr,
    SomeTransport, VirtioNet,
};
use log::{debug, info, warn};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};
use spin::Once;

use super::nvme::Bdf;
use super::{dma, pio, time};

/// Receive and transmit queue size (entries, and 2 KiB buffer slots each).
pub const QUEUE: usize = 64;

/// How long the `fractos.test=net` server waits for one connection to be
/// served, in TSC time.
pub const TEST_TIMEOUT_NS: u64 = 60_000_000_000;

/// Memory windows of all enumerated BARs and announced virtio-mmio
/// devices, each `(address, size)`: the only ranges
/// [`KernelHal::mmio_phys_to_virt`] hands out.
static MMIO: Once<Vec<(u64, u64)>> = Once::new();

/// The virtio driver's hardware boundary (stateless: DMA comes from the
/// kernel-wide frame allocator).
#[derive(Clone, Copy, Debug)]
pub struct KernelHal;

// SAFETY: `dma_alloc` hands out fresh, zeroed, page-aligned frames from the
// kernel's bump allocator, physically contiguous, never handed out again,
// identity-mapped write-back (physical = virtual; x86 DMA is
// cache-coherent), so they alias nothing; failure is reported as physical
// address 0, which `virtio-drivers` checks. `dma_dealloc` never returns
// frames to anyone (the allocator does not free), so memory the device may
// still touch is never reused. `mmio_phys_to_virt` only returns addresses
// inside a BAR window found by enumeration or a virtio-mmio window checked
// against the memory map (`fractos_kernel::virtio_mmio`), which
// `paging::init` maps identity and uncached and which no other driver uses
// (each BAR belongs to one function, each window to one device). `share` returns the buffer's own address: all RAM the
// kernel uses (image, stacks, heap, frames) is identity-mapped.
unsafe impl Hal for KernelHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        dma::alloc_zeroed(pages)
            .and_then(|a| Some((a, NonNull::new(a as *mut u8)?)))
            .unwrap_or((0, NonNull::dangling()))
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        // The bump allocator cannot free: the frames stay out of use.
        debug!("net: {pages} DMA page(s) at {paddr:#x} released (not reused)");
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        let end = paddr.saturating_add(size as u64);
        let inside = MMIO
            .get()
            .is_some_and(|w| w.iter().any(|&(a, s)| paddr >= a && end <= a + s));
        assert!(
            inside,
            "virtio: MMIO range {paddr:#x}+{size:#x} is not inside a mapped device window"
        );
        NonNull::new(paddr as *mut u8).expect("BAR at address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr().cast::<u8>() as u64
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// The driver type the kernel uses (over PCI or virtio-mmio).
pub type Device = VirtioNet<KernelHal, SomeTransport<'static>, QUEUE>;

/// Where a NIC sits: a PCI function or a virtio-mmio window.
#[derive(Debug, Clone, Copy)]
pub enum NicAddr {
    /// A virtio-net PCI function.
    Pci(Bdf),
    /// A virtio-mmio device.
    Mmio(MmioDevice),
}

impl core::fmt::Display for NicAddr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            NicAddr::Pci(b) => b.fmt(f),
            NicAddr::Mmio(d) => d.fmt(f),
        }
    }
}

impl NicAddr {
    /// A small number that differs between NICs (seeds smoltcp).
    fn salt(&self) -> u64 {
        match self {
            NicAddr::Pci(b) => u64::from(b.0.device()),
            NicAddr::Mmio(d) => d.base >> 9,
        }
    }
}

/// A NIC found at boot, not yet brought up.
enum Found<'a> {
    Pci(&'a PciFunction),
    Mmio(&'a MmioDevice),
}

impl Found<'_> {
    fn addr(&self) -> NicAddr {
        match self {
            Found::Pci(f) => NicAddr::Pci(Bdf(f.address)),
            Found::Mmio(d) => NicAddr::Mmio(**d),
        }
    }
}

/// A NIC, brought up, with its smoltcp interface.
pub struct Net {
    /// Where it sits.
    pub bdf: NicAddr,
    /// The driver.
    pub dev: Device,
    /// smoltcp's interface over it.
    pub iface: Interface,
}

/// Why a NIC could not be brought up.
#[derive(Debug, thiserror::Error)]
pub enum BringUpError {
    /// The function is not a PCI endpoint.
    #[error("not a PCI endpoint")]
    NotEndpoint,
    /// The driver failed.
    #[error(transparent)]
    Driver(#[from] fractos_virtio_net::Error),
}

/// Why the `fractos.test=net` server failed.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    /// No NIC came up.
    #[error("no virtio-net NIC is up")]
    NoNic,
    /// smoltcp refused to listen.
    #[error("listen on port {0} failed: {1}")]
    Listen(u16, tcp::ListenError),
    /// Socket send/receive failed.
    #[error("echo failed: {0}")]
    Echo(&'static str),
    /// Nothing finished in time.
    #[error(
        "timed out after {}s in TCP state {state} ({bytes} bytes echoed)",
        TEST_TIMEOUT_NS / 1_000_000_000
    )]
    Timeout {
        /// The socket's state at the deadline.
        state: tcp::State,
        /// Bytes echoed so far.
        bytes: usize,
    },
}

/// Formats a MAC as `xx:xx:xx:xx:xx:xx`.
pub struct Mac(pub EthernetAddress);

impl core::fmt::Display for Mac {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let b = self.0 .0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// smoltcp time: TSC microseconds since reset.
pub fn now() -> Instant {
    Instant::from_micros((time::now_ns() / 1000) as i64)
}

/// The NIC the RoCEv2 engine runs on when `fractos.rdma=on` or
/// `fractos.test=rc_pingpong`: the peer network's (the second NIC when
/// `fractos.ip1` is set, else the first); `None` when RDMA is off.
pub fn rdma_nic(config: &Config) -> Option<usize> {
    let on = config.rdma || config.test == Some(fractos_kernel::config::TestHook::RcPingpong);
    on.then_some(usize::from(config.ip1.is_some()))
}

/// Brings up every virtio-net function in `devices`, then every
/// virtio-mmio NIC of `mmio_devices` (logging `net: <where> mac=...` for
/// each) and returns the ones used, each with an interface: the first NIC
/// gets `fractos.ip`/`fractos.gw`, the second `fractos.ip1` (no gateway;
/// the peer network) if set. `mmio` lists the device windows (BARs and
/// virtio-mmio blocks) the page tables mapped uncached. Failures are
/// logged as warnings.
pub fn bring_up(
    devices: &[PciFunction],
    mmio_devices: &[MmioDevice],
    mmio: &[(u64, u64)],
    config: &Config,
) -> Vec<Net> {
    MMIO.call_once(|| mmio.to_vec());
    let mut nics = Vec::new();
    let pci = devices
        .iter()
        .filter(|f| is_virtio_net(f.vendor, f.device))
        .map(Found::Pci);
    for found in pci.chain(mmio_devices.iter().map(Found::Mmio)) {
        let bdf = found.addr();
        let ip = match nics.len() {
            0 if config.ip_dhcp => Some((None, None)),
            0 => Some((Some(config.ip), config.gateway)),
            1 => config.ip1.map(|ip| (Some(ip), None)),
            _ => None,
        };
        let Some((ip, gateway)) = ip else {
            info!("net: {bdf} not used (no address configured for it)");
            continue;
        };
        let rdma = rdma_nic(config) == Some(nics.len());
        // The RDMA NIC takes jumbo frames (RDMA MTU 4096 needs an Ethernet
        // MTU of 9000 on the path) and hands RoCEv2 frames to the engine.
        let frame_len = if rdma {
            fractos_virtio_net::MAX_JUMBO_FRAME_LEN
        } else {
            fractos_virtio_net::MAX_FRAME_LEN
        };
        let dev = match found {
            Found::Pci(f) => init_pci(f, frame_len),
            Found::Mmio(d) => init_mmio(d, frame_len),
        };
        match dev {
            Ok(mut dev) => {
                if rdma {
                    dev.set_rx_filter(Some(fractos_kernel::rdma::rx_route));
                }
                info!("net: {bdf} mac={}", Mac(dev.mac_address()));
                debug!(
                    "net: {bdf} features {:#x}, {QUEUE}-entry queues, {} receive buffers posted",
                    dev.features(),
                    dev.rx_posted()
                );
                nics.push(configure(bdf, dev, ip, gateway));
            }
            Err(e) => warn!("net: {bdf}: bring-up failed, continuing without it: {e}"),
        }
    }
    if nics.is_empty() {
        warn!("net: no usable virtio-net NIC (PCI or virtio-mmio); continuing without networking");
    } else {
        log_costs();
    }
    nics
}

/// Logs what the per-byte work of the data path costs on this CPU (under
/// TCG, emulated): a 64 KiB memcpy and memset, and a TCP checksum over a
/// full-sized segment as smoltcp computes it.
fn log_costs() {
    use core::hint::black_box;
    use smoltcp::wire::{Ipv4Address, TcpPacket};
    const ROUNDS: u64 = 8;
    let src = vec![0x5au8; 64 * 1024];
    let mut dst = vec![0u8; 64 * 1024];
    let t0 = time::now_ns();
    for _ in 0..ROUNDS {
        black_box(&mut dst[..]).copy_from_slice(black_box(&src[..]));
    }
    let t1 = time::now_ns();
    for i in 0..ROUNDS {
        black_box(&mut dst[..]).fill(black_box(i as u8));
    }
    let t2 = time::now_ns();
    let mut seg = vec![0x33u8; 1480];
    let (a, b) = (
        Ipv4Address::new(10, 0, 2, 15),
        Ipv4Address::new(10, 0, 2, 2),
    );
    for _ in 0..ROUNDS * 8 {
        let mut p = TcpPacket::new_unchecked(black_box(&mut seg[..]));
        p.fill_checksum(&a.into(), &b.into());
    }
    let t3 = time::now_ns();
    for _ in 0..ROUNDS * 8 {
        black_box(fractos_virtio_net::ones_complement_sum(black_box(&seg[..])));
    }
    let t4 = time::now_ns();
    let mbps = |ns: u64| (64 * 1024 * ROUNDS * 1000).checked_div(ns).unwrap_or(0);
    info!(
        "perf: memcpy 64 KiB {} ns ({} MB/s), memset 64 KiB {} ns ({} MB/s), TCP checksum of a 1480-byte segment: smoltcp {} ns, driver {} ns",
        (t1 - t0) / ROUNDS,
        mbps(t1 - t0),
        (t2 - t1) / ROUNDS,
        mbps(t2 - t1),
        (t3 - t2) / (ROUNDS * 8),
        (t4 - t3) / (ROUNDS * 8)
    );
}

fn configure(
    bdf: NicAddr,
    mut dev: Device,
    ip: Option<fractos_kernel::config::Ipv4Net>,
    gateway: Option<core::net::Ipv4Addr>,
) -> Net {
    let mut c = IfaceConfig::new(HardwareAddress::Ethernet(dev.mac_address()));
    c.random_seed = time::now_ns() ^ 0x6e65_7466_7261_6374 ^ bdf.salt();
    let mut iface = Interface::new(c, &mut dev, now());
    let Some(ip) = ip else {
        info!("net: {bdf} address by DHCP (once the event loop runs)");
        return Net { bdf, dev, iface };
    };
    iface.update_ip_addrs(|a| {
        // One address into an empty list: cannot be full.
        let _ = a.push(IpCidr::new(IpAddress::Ipv4(ip.addr), ip.prefix_len));
    });
    if let Some(gw) = gateway {
        if iface.routes_mut().add_default_ipv4_route(gw).is_err() {
            warn!("net: default route via {gw} not added (route table full)");
        }
    }
    match gateway {
        Some(gw) => info!("net: {bdf} ip {ip} gateway {gw}"),
        None => info!("net: {bdf} ip {ip} (no gateway)"),
    }
    Net { bdf, dev, iface }
}

fn init_pci(f: &PciFunction, frame_len: usize) -> Result<Device, BringUpError> {
    // SAFETY: the driver resets the device and then only points it at DMA
    // frames it allocated itself (rings and buffer pools, which it keeps for
    // its lifetime); no other code programs this device.
    unsafe { pci::enable_memory_and_bus_master(&pio::PortConfigAccess, f.address) }
        .ok_or(BringUpError::NotEndpoint)?;
    // SAFETY: configuration mechanism #1 over ports 0xCF8/0xCFC reaches the
    // whole 256-byte configuration space of every segment-0 function, for
    // as long as the kernel runs; one CPU, no interrupts, so accesses never
    // interleave.
    let config = unsafe { PciConfig::new(pio::PortConfigAccess) };
    let transport = pci_transport::<KernelHal, _>(config, f.address)?;
    Ok(VirtioNet::with_frame_len(transport.into(), frame_len)?)
}

fn init_mmio(d: &MmioDevice, frame_len: usize) -> Result<Device, BringUpError> {
    // At most 1 MiB (checked when parsed); 0 would be refused as too small.
    let size = usize::try_from(d.size).unwrap_or(0);
    // SAFETY: `d` was announced on the command line and checked against
    // the memory map (`virtio_mmio::devices`: not RAM, ACPI or the first
    // MiB, no overlap with another device); `paging::init` mapped it
    // identity and uncached and `MMIO` lists it, so the HAL hands out a
    // pointer valid for the kernel's lifetime; only this driver touches
    // it. If nothing is there, reads return what the VMM returns for
    // unassigned space and the magic check refuses it.
    let transport = unsafe { mmio_transport::<KernelHal>(d.base, size) }?;
    // The driver resets the device and then only points it at DMA frames
    // it allocated itself, which it keeps for its lifetime.
    Ok(VirtioNet::with_frame_len(transport.into(), frame_len)?)
}

/// What the echo server did.
#[derive(Debug)]
pub struct EchoReport {
    /// The client.
    pub peer: Option<smoltcp::wire::IpEndpoint>,
    /// Bytes echoed.
    pub bytes: usize,
}

/// The `fractos.test=net` server: polls the NIC (answering ARP and ICMP
/// echo through smoltcp) and serves one TCP connection on `port`, echoing
/// every byte until the client closes; then closes its side and returns.
/// Bounded by [`TEST_TIMEOUT_NS`] of TSC time.
pub fn echo_test(
    net: &mut Net,
    ip: core::net::Ipv4Addr,
    port: u16,
) -> Result<EchoReport, TestError> {
    let mut sockets = SocketSet::new(vec![]);
    let mut sock = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 4096]),
        tcp::SocketBuffer::new(vec![0; 4096]),
    );
    sock.listen(port).map_err(|e| TestError::Listen(port, e))?;
    let handle = sockets.add(sock);
    info!(
        "net: test: {} echo server listening on {ip}:{port}",
        net.bdf
    );
    let deadline = time::now_ns() + TEST_TIMEOUT_NS;
    let mut report = EchoReport {
        peer: None,
        bytes: 0,
    };
    let mut closing = false;
    let mut buf = [0u8; 1024];
    loop {
        net.iface.poll(now(), &mut net.dev, &mut sockets);
        net.dev.flush();
        if let Some(e) = net.dev.take_error() {
            warn!("net: driver: {e}");
        }
        let s = sockets.get_mut::<tcp::Socket>(handle);
        if report.peer.is_none() {
            if let Some(ep) = s.remote_endpoint() {
                info!("net: test: connection from {ep}");
                report.peer = Some(ep);
            }
        }
        if s.can_recv() && s.can_send() {
            let room = (s.send_capacity() - s.send_queue()).min(buf.len());
            let n = s
                .recv_slice(&mut buf[..room])
                .map_err(|_| TestError::Echo("receive"))?;
            let sent = s
                .send_slice(&buf[..n])
                .map_err(|_| TestError::Echo("send"))?;
            if sent != n {
                return Err(TestError::Echo("send buffer overflow"));
            }
            report.bytes += n;
        }
        if report.peer.is_some() {
            // The client closed its side and everything it sent is echoed
            // and acknowledged: close ours.
            if !closing
                && s.state() == tcp::State::CloseWait
                && s.recv_queue() == 0
                && s.send_queue() == 0
            {
                s.close();
                closing = true;
            }
            if matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait) {
                let st = net.dev.stats();
                info!(
                    "net: test: served 1 connection, {} bytes echoed; nic rx {} frames, tx {} frames",
                    report.bytes, st.rx_frames, st.tx_frames
                );
                return Ok(report);
            }
        }
        if time::now_ns() >= deadline {
            return Err(TestError::Timeout {
                state: s.state(),
                bytes: report.bytes,
            });
        }
    }
}
