//! Packet formats: Ethernet II, ARP, IPv4, UDP and the InfiniBand transport
//! headers, with checked parsing ([`parse_frame`]) and emission
//! ([`emit_roce`], [`emit_arp`]).
//!
//! Parsing checks, in order: Ethernet length and destination, EtherType;
//! for IPv4: version, header length (options are refused: RoCEv2 senders
//! never add them), checksum, total length, fragmentation, protocol,
//! destination; UDP length, checksum (when non-zero) and port 4791; then the
//! ICRC over the whole IP packet, and only then the transport headers (BTH
//! version and opcode, extension headers, pad count). Every failure is a
//! [`DropReason`].

mod ib;

use core::net::{Ipv4Addr, Ipv6Addr};

pub use ib::*;

use crate::counters::DropReason;
use crate::icrc::icrc;

/// Ethernet II header length.
pub const ETH_HDR_LEN: usize = 14;
/// IPv4 header length (no options).
pub const IPV4_HDR_LEN: usize = 20;
/// UDP header length.
pub const UDP_HDR_LEN: usize = 8;
/// ARP packet length (Ethernet/IPv4).
pub const ARP_LEN: usize = 28;
/// The RoCEv2 UDP destination port.
pub const ROCE_V2_PORT: u16 = 4791;
/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// Bytes of framing around a payload with no extension headers: Ethernet,
/// IPv4, UDP, BTH and ICRC.
pub const ROCE_FRAMING: usize = ETH_HDR_LEN + IPV4_HDR_LEN + UDP_HDR_LEN + BTH_LEN + ICRC_LEN;
/// The shortest Ethernet frame without its FCS (shorter ones are padded).
pub const MIN_FRAME_LEN: usize = 60;
/// The TTL of emitted packets.
pub const TTL: u8 = 64;

/// An Ethernet MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The broadcast address.
    pub const BROADCAST: MacAddr = MacAddr([0xFF; 6]);
}

/// A global identifier: for RoCEv2 over IPv4 the IPv4-mapped IPv6 address
/// `::ffff:a.b.c.d` (what Linux lists at GID index 1 for an IPv4 address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Gid(pub Ipv6Addr);

impl Gid {
    /// The IPv4-mapped GID of `ip`.
    pub const fn from_ipv4(ip: Ipv4Addr) -> Gid {
        Gid(ip.to_ipv6_mapped())
    }

    /// The GID as the 16 raw bytes exchanged out of band.
    pub const fn octets(self) -> [u8; 16] {
        self.0.octets()
    }

    /// The IPv4 address, if this is an IPv4-mapped GID.
    pub const fn ipv4(self) -> Option<Ipv4Addr> {
        self.0.to_ipv4_mapped()
    }
}

/// The local addresses a frame must be sent to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalAddr {
    /// Our MAC.
    pub mac: MacAddr,
    /// Our IPv4 address.
    pub ip: Ipv4Addr,
}

/// ARP operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArpOp {
    /// Who has `target_ip`?
    Request,
    /// `sender_ip` is at `sender_mac`.
    Reply,
}

/// An Ethernet/IPv4 ARP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arp {
    /// Request or reply.
    pub op: ArpOp,
    /// Sender hardware address.
    pub sender_mac: MacAddr,
    /// Sender protocol address.
    pub sender_ip: Ipv4Addr,
    /// Target hardware address.
    pub target_mac: MacAddr,
    /// Target protocol address.
    pub target_ip: Ipv4Addr,
}

/// A checked RoCEv2 packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RocePacket<'a> {
    /// Source MAC.
    pub src_mac: MacAddr,
    /// Source IPv4 address.
    pub src_ip: Ipv4Addr,
    /// UDP source port.
    pub udp_src: u16,
    /// Base transport header.
    pub bth: Bth,
    /// RETH, when the opcode has one.
    pub reth: Option<Reth>,
    /// AETH, when the opcode has one.
    pub aeth: Option<Aeth>,
    /// Immediate data, when the opcode has it.
    pub imm: Option<u32>,
    /// The payload without pad bytes.
    pub payload: &'a [u8],
}

/// A frame this engine handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// ARP (requests for our address, or replies to anyone).
    Arp(Arp),
    /// A RoCEv2 packet for our address.
    Roce(RocePacket<'a>),
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn mac_at(b: &[u8], at: usize) -> MacAddr {
    let mut m = [0; 6];
    m.copy_from_slice(&b[at..at + 6]);
    MacAddr(m)
}

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// The ones'-complement sum of `data` folded to 16 bits, starting at `sum`.
fn ones_sum(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    sum
}

/// The Internet checksum of `data`.
pub fn internet_checksum(data: &[u8]) -> u16 {
    !(ones_sum(0, data) as u16)
}

/// The UDP checksum of `udp` (header with a zero checksum field, and data)
/// between `src` and `dst`; never 0 (0 means "no checksum").
pub fn udp_checksum(src: Ipv4Addr, dst: Ipv4Addr, udp: &[u8]) -> u16 {
    let sum = ones_sum(ones_sum(0, &udp_pseudo(src, dst, udp.len())), udp);
    match !(sum as u16) {
        0 => 0xFFFF,
        c => c,
    }
}

/// Checks and decodes an Ethernet frame addressed to `local`.
pub fn parse_frame<'a>(frame: &'a [u8], local: &LocalAddr) -> Result<Frame<'a>, DropReason> {
    if frame.len() < ETH_HDR_LEN {
        return Err(DropReason::Truncated);
    }
    let dst = mac_at(frame, 0);
    let src_mac = mac_at(frame, 6);
    let body = &frame[ETH_HDR_LEN..];
    match be16(frame, 12) {
        ETHERTYPE_ARP => {
            if dst != local.mac && dst != MacAddr::BROADCAST {
                return Err(DropReason::NotOurMac);
            }
            parse_arp(body, local).map(Frame::Arp)
        }
        ETHERTYPE_IPV4 => {
            if dst != local.mac {
                return Err(DropReason::NotOurMac);
            }
            parse_ipv4(body, src_mac, local).map(Frame::Roce)
        }
        _ => Err(DropReason::EtherType),
    }
}

fn parse_arp(b: &[u8], local: &LocalAddr) -> Result<Arp, DropReason> {
    if b.len() < ARP_LEN {
        return Err(DropReason::Truncated);
    }
    if be16(b, 0) != 1 || be16(b, 2) != ETHERTYPE_IPV4 || b[4] != 6 || b[5] != 4 {
        return Err(DropReason::ArpMalformed);
    }
    let op = match be16(b, 6) {
        1 => ArpOp::Request,
        2 => ArpOp::Reply,
        _ => return Err(DropReason::ArpMalformed),
    };
    let arp = Arp {
        op,
        sender_mac: mac_at(b, 8),
        sender_ip: ip_at(b, 14),
        target_mac: mac_at(b, 18),
        target_ip: ip_at(b, 24),
    };
    if arp.target_ip != local.ip {
        return Err(DropReason::ArpNotForUs);
    }
    Ok(arp)
}

fn parse_ipv4<'a>(
    b: &'a [u8],
    src_mac: MacAddr,
    local: &LocalAddr,
) -> Result<RocePacket<'a>, DropReason> {
    if b.len() < IPV4_HDR_LEN {
        return Err(DropReason::Truncated);
    }
    let ihl = usize::from(b[0] & 0x0F) * 4;
    if b[0] >> 4 != 4 || ihl < IPV4_HDR_LEN {
        return Err(DropReason::IpHeader);
    }
    if ihl != IPV4_HDR_LEN {
        return Err(DropReason::IpOptions);
    }
    if internet_checksum(&b[..IPV4_HDR_LEN]) != 0 {
        return Err(DropReason::IpChecksum);
    }
    let total = usize::from(be16(b, 2));
    if total < IPV4_HDR_LEN + UDP_HDR_LEN {
        return Err(DropReason::IpHeader);
    }
    // Ethernet may pad short frames: the IP total length is authoritative.
    let ip = b.get(..total).ok_or(DropReason::Truncated)?;
    if be16(ip, 6) & 0x3FFF != 0 {
        return Err(DropReason::IpFragment);
    }
    if ip[9] != 17 {
        return Err(DropReason::NotUdp);
    }
    let src_ip = ip_at(ip, 12);
    if ip_at(ip, 16) != local.ip {
        return Err(DropReason::NotOurIp);
    }
    let udp = &ip[IPV4_HDR_LEN..];
    if usize::from(be16(udp, 4)) != udp.len() {
        return Err(DropReason::UdpLength);
    }
    if be16(udp, 2) != ROCE_V2_PORT {
        return Err(DropReason::NotRocePort);
    }
    if be16(udp, 6) != 0 && !udp_checksum_ok(src_ip, local.ip, udp) {
        return Err(DropReason::UdpChecksum);
    }
    let transport = &udp[UDP_HDR_LEN..];
    if transport.len() < BTH_LEN + ICRC_LEN {
        return Err(DropReason::Truncated);
    }
    let (covered, sent) = ip.split_at(total - ICRC_LEN);
    let mut wire_icrc = [0; ICRC_LEN];
    wire_icrc.copy_from_slice(sent);
    if icrc(covered).map(u32::to_le_bytes) != Some(wire_icrc) {
        return Err(DropReason::BadIcrc);
    }
    let transport = &transport[..transport.len() - ICRC_LEN];
    let mut bth_bytes = [0; BTH_LEN];
    bth_bytes.copy_from_slice(&transport[..BTH_LEN]);
    let bth = Bth::parse(&bth_bytes).map_err(|e| match e {
        BthError::Version => DropReason::BthVersion,
        BthError::Opcode => DropReason::UnsupportedOpcode,
    })?;
    let op = bth.opcode;
    let mut rest = &transport[BTH_LEN..];
    if rest.len() < op.ext_len() {
        return Err(DropReason::Truncated);
    }
    let mut reth = None;
    let mut aeth = None;
    let mut imm = None;
    if op.has_reth() {
        let (h, r) = rest.split_at(RETH_LEN);
        let mut a = [0; RETH_LEN];
        a.copy_from_slice(h);
        reth = Some(Reth::parse(&a));
        rest = r;
    }
    if op.has_aeth() {
        let (h, r) = rest.split_at(AETH_LEN);
        let mut a = [0; AETH_LEN];
        a.copy_from_slice(h);
        aeth = Some(Aeth::parse(&a).ok_or(DropReason::BadResponse)?);
        rest = r;
    }
    if op.has_imm() {
        let (h, r) = rest.split_at(IMM_LEN);
        imm = Some(u32::from_be_bytes([h[0], h[1], h[2], h[3]]));
        rest = r;
    }
    // Headers are whole words, so payload plus pad must be too.
    let pad = usize::from(bth.pad);
    if rest.len() % 4 != 0 || rest.len() < pad || (!op.has_payload() && !rest.is_empty()) {
        return Err(DropReason::BadLength);
    }
    Ok(RocePacket {
        src_mac,
        src_ip,
        udp_src: be16(udp, 0),
        bth,
        reth,
        aeth,
        imm,
        payload: &rest[..rest.len() - pad],
    })
}

fn udp_checksum_ok(src: Ipv4Addr, dst: Ipv4Addr, udp: &[u8]) -> bool {
    ones_sum(ones_sum(0, &udp_pseudo(src, dst, udp.len())), udp) == 0xFFFF
}

fn udp_pseudo(src: Ipv4Addr, dst: Ipv4Addr, len: usize) -> [u8; 12] {
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&src.octets());
    pseudo[4..8].copy_from_slice(&dst.octets());
    pseudo[9] = 17;
    pseudo[10..].copy_from_slice(&(len as u16).to_be_bytes());
    pseudo
}

/// Everything needed to emit one RoCEv2 packet except its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoceHeaders {
    /// Destination MAC.
    pub dst_mac: MacAddr,
    /// Source MAC.
    pub src_mac: MacAddr,
    /// Source IPv4 address.
    pub src_ip: Ipv4Addr,
    /// Destination IPv4 address.
    pub dst_ip: Ipv4Addr,
    /// IPv4 identification.
    pub ip_id: u16,
    /// UDP source port (flow entropy).
    pub udp_src: u16,
    /// Base transport header (`pad` is overwritten).
    pub bth: Bth,
    /// RETH, present iff the opcode has one.
    pub reth: Option<Reth>,
    /// AETH, present iff the opcode has one.
    pub aeth: Option<Aeth>,
    /// Immediate data, present iff the opcode has it.
    pub imm: Option<u32>,
}

/// The length of a frame with these headers and `payload_len` bytes.
pub fn roce_frame_len(h: &RoceHeaders, payload_len: usize) -> usize {
    ROCE_FRAMING + h.bth.opcode.ext_len() + payload_len.next_multiple_of(4)
}

/// Writes a RoCEv2 frame into `buf`: headers, then `fill` writes the
/// `payload_len` payload bytes in place, then pad, checksums and ICRC.
/// Returns the frame length, or `Ok(None)` if `buf` is too small or the
/// frame would exceed an IPv4 length.
///
/// # Panics
///
/// If the extension headers present disagree with the opcode.
pub fn emit_roce<E>(
    buf: &mut [u8],
    h: &RoceHeaders,
    payload_len: usize,
    fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
) -> Result<Option<usize>, E> {
    let op = h.bth.opcode;
    assert!(
        op.has_reth() == h.reth.is_some()
            && op.has_aeth() == h.aeth.is_some()
            && op.has_imm() == h.imm.is_some(),
        "extension headers disagree with {op:?}"
    );
    let len = roce_frame_len(h, payload_len);
    let ip_len = len - ETH_HDR_LEN;
    if len > buf.len() || ip_len > usize::from(u16::MAX) {
        return Ok(None);
    }
    let frame = &mut buf[..len];
    frame[..6].copy_from_slice(&h.dst_mac.0);
    frame[6..12].copy_from_slice(&h.src_mac.0);
    frame[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    let ip = &mut frame[ETH_HDR_LEN..];
    ip[0] = 0x45;
    ip[1] = 0;
    ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&h.ip_id.to_be_bytes());
    ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // don't fragment
    ip[8] = TTL;
    ip[9] = 17;
    ip[10..12].fill(0);
    ip[12..16].copy_from_slice(&h.src_ip.octets());
    ip[16..20].copy_from_slice(&h.dst_ip.octets());
    let csum = internet_checksum(&ip[..IPV4_HDR_LEN]);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    let udp_len = ip_len - IPV4_HDR_LEN;
    let udp = &mut ip[IPV4_HDR_LEN..];
    udp[..2].copy_from_slice(&h.udp_src.to_be_bytes());
    udp[2..4].copy_from_slice(&ROCE_V2_PORT.to_be_bytes());
    udp[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    udp[6..8].fill(0); // optional over IPv4; the ICRC covers the packet
    let t = &mut udp[UDP_HDR_LEN..];
    let pad = (4 - payload_len % 4) % 4;
    let mut bth = h.bth;
    bth.pad = pad as u8;
    let (bth_bytes, mut rest) = t.split_at_mut(BTH_LEN);
    bth.write(bth_bytes.try_into().expect("BTH_LEN"));
    if let Some(reth) = &h.reth {
        let (a, r) = rest.split_at_mut(RETH_LEN);
        reth.write(a.try_into().expect("RETH_LEN"));
        rest = r;
    }
    if let Some(aeth) = &h.aeth {
        let (a, r) = rest.split_at_mut(AETH_LEN);
        aeth.write(a.try_into().expect("AETH_LEN"));
        rest = r;
    }
    if let Some(imm) = h.imm {
        rest[..IMM_LEN].copy_from_slice(&imm.to_be_bytes());
        rest = &mut rest[IMM_LEN..];
    }
    fill(&mut rest[..payload_len])?;
    rest[payload_len..payload_len + pad].fill(0);
    let ip = &mut frame[ETH_HDR_LEN..];
    let crc = icrc(&ip[..ip_len - ICRC_LEN]).expect("long enough");
    ip[ip_len - ICRC_LEN..].copy_from_slice(&crc.to_le_bytes());
    Ok(Some(len))
}

/// Writes an ARP frame into `buf`, zero-padded to the Ethernet minimum of
/// [`MIN_FRAME_LEN`] bytes; `None` if `buf` is too small. Requests go to
/// the broadcast MAC, replies to `arp.target_mac`.
pub fn emit_arp(buf: &mut [u8], src_mac: MacAddr, arp: &Arp) -> Option<usize> {
    let len = MIN_FRAME_LEN;
    let frame = buf.get_mut(..len)?;
    frame[ETH_HDR_LEN + ARP_LEN..].fill(0);
    let dst = match arp.op {
        ArpOp::Request => MacAddr::BROADCAST,
        ArpOp::Reply => arp.target_mac,
    };
    frame[..6].copy_from_slice(&dst.0);
    frame[6..12].copy_from_slice(&src_mac.0);
    frame[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    let a = &mut frame[ETH_HDR_LEN..];
    a[..2].copy_from_slice(&1u16.to_be_bytes());
    a[2..4].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    a[4] = 6;
    a[5] = 4;
    let op: u16 = match arp.op {
        ArpOp::Request => 1,
        ArpOp::Reply => 2,
    };
    a[6..8].copy_from_slice(&op.to_be_bytes());
    a[8..14].copy_from_slice(&arp.sender_mac.0);
    a[14..18].copy_from_slice(&arp.sender_ip.octets());
    a[18..24].copy_from_slice(&arp.target_mac.0);
    a[24..28].copy_from_slice(&arp.target_ip.octets());
    Some(len)
}
