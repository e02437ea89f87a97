//! A host-side station on an appliance cluster's VM-to-VM segment (QEMU's
//! multicast `socket` netdev): a smoltcp interface whose device sends and
//! receives raw Ethernet frames as UDP datagrams on the segment's group.
//! Lets tests reach an appliance's peer-network NIC directly, without
//! QEMU's user-mode forwarder in between.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::FromRawFd;
use std::time::{Duration, Instant as StdInstant};

use fractos_qemu::node::L2Segment;
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

/// The segment as a smoltcp device.
pub struct SegmentDevice {
    sock: UdpSocket,
    group: SocketAddr,
    buf: Vec<u8>,
}

impl SegmentDevice {
    /// Joins `seg` on the loopback interface.
    pub fn join(seg: L2Segment) -> std::io::Result<Self> {
        // SAFETY: plain socket(2)/setsockopt(2)/bind(2) calls on a fresh
        // descriptor whose ownership passes to the UdpSocket below; every
        // pointer refers to a live local of the right size.
        let sock = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let sock = UdpSocket::from_raw_fd(fd);
            let one: libc::c_int = 1;
            let set = |level, name, val: *const libc::c_void, len| {
                if libc::setsockopt(fd, level, name, val, len as libc::socklen_t) != 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            let int = std::mem::size_of::<libc::c_int>();
            set(
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&raw const one).cast(),
                int,
            )?;
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: seg.port.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(seg.group).to_be(),
                },
                sin_zero: [0; 8],
            };
            if libc::bind(
                fd,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            let mreq = libc::ip_mreq {
                imr_multiaddr: libc::in_addr {
                    s_addr: u32::from(seg.group).to_be(),
                },
                imr_interface: libc::in_addr {
                    s_addr: u32::from(Ipv4Addr::LOCALHOST).to_be(),
                },
            };
            set(
                libc::IPPROTO_IP,
                libc::IP_ADD_MEMBERSHIP,
                (&raw const mreq).cast(),
                std::mem::size_of::<libc::ip_mreq>(),
            )?;
            let lo = libc::in_addr {
                s_addr: u32::from(Ipv4Addr::LOCALHOST).to_be(),
            };
            set(
                libc::IPPROTO_IP,
                libc::IP_MULTICAST_IF,
                (&raw const lo).cast(),
                std::mem::size_of::<libc::in_addr>(),
            )?;
            set(
                libc::IPPROTO_IP,
                libc::IP_MULTICAST_LOOP,
                (&raw const one).cast(),
                int,
            )?;
            sock
        };
        sock.set_nonblocking(true)?;
        Ok(SegmentDevice {
            sock,
            group: SocketAddr::from((seg.group, seg.port)),
            buf: vec![0; 65536],
        })
    }
}

/// A received frame.
pub struct Rx(Vec<u8>);
/// A frame to send.
pub struct Tx<'a>(&'a UdpSocket, SocketAddr);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let r = f(&mut frame);
        let _ = self.0.send_to(&frame, self.1);
        r
    }
}

impl Device for SegmentDevice {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c
    }

    fn receive(&mut self, _t: Instant) -> Option<(Rx, Tx<'_>)> {
        let n = self.sock.recv(&mut self.buf).ok()?;
        Some((Rx(self.buf[..n].to_vec()), Tx(&self.sock, self.group)))
    }

    fn transmit(&mut self, _t: Instant) -> Option<Tx<'_>> {
        Some(Tx(&self.sock, self.group))
    }
}

/// How a connection flood ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FloodReport {
    /// Connections attempted.
    pub attempted: usize,
    /// Reached ESTABLISHED at some point.
    pub established: usize,
    /// Answered with a reset (refused) before being established.
    pub refused: usize,
    /// Still without an answer at the end.
    pub unanswered: usize,
}

/// From `ip` on the segment, opens `n` TCP connections to `target` at
/// once, keeps them for `hold` after the last answer (or until `timeout`),
/// then aborts all of them.
pub fn flood(
    seg: L2Segment,
    ip: Ipv4Addr,
    target: SocketAddr,
    n: usize,
    timeout: Duration,
) -> std::io::Result<FloodReport> {
    let mut dev = SegmentDevice::join(seg)?;
    let t0 = StdInstant::now();
    let now = || Instant::from_micros(t0.elapsed().as_micros() as i64);
    let mac = EthernetAddress([0x02, 0xf1, 0x00, 0x00, ip.octets()[2], ip.octets()[3]]);
    let mut iface = Interface::new(Config::new(HardwareAddress::Ethernet(mac)), &mut dev, now());
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(IpAddress::Ipv4(ip), 16));
    });
    let mut sockets = SocketSet::new(vec![]);
    let mut handles = Vec::new();
    let remote = (
        IpAddress::Ipv4(match target.ip() {
            std::net::IpAddr::V4(a) => a,
            std::net::IpAddr::V6(_) => return Err(std::io::Error::other("IPv4 only")),
        }),
        target.port(),
    );
    for i in 0..n {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 256]),
            tcp::SocketBuffer::new(vec![0; 256]),
        );
        s.connect(iface.context(), remote, 20_000 + i as u16)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        handles.push(sockets.add(s));
    }
    let mut report = FloodReport {
        attempted: n,
        ..FloodReport::default()
    };
    let mut seen = vec![false; n];
    while t0.elapsed() < timeout {
        iface.poll(now(), &mut dev, &mut sockets);
        let mut open = 0;
        for (k, h) in handles.iter().enumerate() {
            let s = sockets.get_mut::<tcp::Socket>(*h);
            match s.state() {
                tcp::State::SynSent => open += 1,
                tcp::State::Established if !seen[k] => {
                    seen[k] = true;
                    report.established += 1;
                }
                tcp::State::Closed if !seen[k] => {
                    seen[k] = true;
                    report.refused += 1;
                }
                _ => {}
            }
        }
        if open == 0 {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    report.unanswered = seen.iter().filter(|s| !**s).count();
    for h in &handles {
        sockets.get_mut::<tcp::Socket>(*h).abort();
    }
    for _ in 0..50 {
        iface.poll(now(), &mut dev, &mut sockets);
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(report)
}
