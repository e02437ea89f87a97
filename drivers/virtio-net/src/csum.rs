//! TCP checksums over IPv4, in the driver: filled on transmit and checked
//! on receive here, or left to the device when it offers checksum offload.
//!
//! smoltcp is told not to touch TCP checksums ([`crate::VirtioNet`]'s
//! capabilities say `tcp: None`): it writes 0 on transmit and checks
//! nothing on receive. The driver then either hands the work to the device
//! (`VIRTIO_NET_F_CSUM`: the device sums from `csum_start` and stores at
//! `csum_offset`; `VIRTIO_NET_F_GUEST_CSUM`: the device marks frames whose
//! checksum it validated) or does it in software with [`sum`], which adds
//! 64-bit words with end-around carry. smoltcp's own routine adds 16-bit
//! words and compiles to SIMD, which QEMU TCG emulates instruction by
//! instruction: measured there, a full segment costs several memcpys of it.
//!
//! Only complete, unfragmented IPv4 TCP frames are summed. A frame that
//! says IPv4 + TCP but does not parse (lengths inconsistent, a fragment)
//! is reported as [`Verdict::Bad`] on receive: smoltcp would have dropped
//! it too, and it must not slip through unchecked.

/// EtherType of IPv4.
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
/// Ethernet header length (no VLAN tags: smoltcp sends none and drops
/// tagged frames).
pub(crate) const ETH_LEN: usize = 14;
/// IP protocol number of TCP.
const PROTO_TCP: u8 = 6;
/// Offset of the checksum in the TCP header.
pub(crate) const TCP_CSUM_OFFSET: usize = 16;

/// Where a frame's TCP segment is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TcpSegment {
    /// Offset of the TCP header in the frame.
    pub start: usize,
    /// Length of the TCP segment (header and payload).
    pub len: usize,
    /// Sum of the pseudo-header (not folded, not complemented).
    pub pseudo: u64,
}

/// What a frame is, for checksumming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A complete IPv4 TCP segment.
    Tcp(TcpSegment),
    /// Not IPv4 + TCP: none of the driver's business.
    Other,
    /// Claims to be IPv4 + TCP but is malformed or a fragment.
    Malformed,
}

/// Finds the TCP segment of an Ethernet frame. Never panics.
pub(crate) fn classify(frame: &[u8]) -> Frame {
    if frame.get(12..14) != Some(&ETHERTYPE_IPV4[..]) {
        return Frame::Other;
    }
    let Some(ip) = frame.get(ETH_LEN..) else {
        return Frame::Other;
    };
    let (Some(&vihl), Some(&proto)) = (ip.first(), ip.get(9)) else {
        return Frame::Other;
    };
    if proto != PROTO_TCP || vihl >> 4 != 4 {
        return Frame::Other;
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    let (Some(total), Some(frag), Some(addrs)) = (ip.get(2..4), ip.get(6..8), ip.get(12..20))
    else {
        return Frame::Malformed;
    };
    let total = usize::from(u16::from_be_bytes([total[0], total[1]]));
    // More fragments, or a fragment offset: smoltcp does not reassemble.
    let fragment = (frag[0] & 0x3f) != 0 || frag[1] != 0;
    if ihl < 20 || total < ihl + 20 || total > ip.len() || fragment {
        return Frame::Malformed;
    }
    let len = total - ihl;
    // The pseudo-header: addresses, zero, protocol, TCP length.
    let mut pseudo = [0u8; 12];
    pseudo[..8].copy_from_slice(addrs);
    pseudo[9] = PROTO_TCP;
    // len <= total <= u16::MAX.
    pseudo[10..].copy_from_slice(&(len as u16).to_be_bytes());
    Frame::Tcp(TcpSegment {
        start: ETH_LEN + ihl,
        len,
        pseudo: sum(&pseudo, 0),
    })
}

/// Adds `data` to `acc` as little-endian 64-bit words with end-around
/// carry (a trailing partial word is zero-padded). Fold the result with
/// [`fold`]. The caller keeps every chunk but the last a multiple of 8
/// bytes long.
pub(crate) fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut add = |w: u64| {
        let (s, carry) = acc.overflowing_add(w);
        acc = s + u64::from(carry);
    };
    let mut blocks = data.chunks_exact(32);
    for b in &mut blocks {
        for w in b.chunks_exact(8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(w);
            add(u64::from_le_bytes(word));
        }
    }
    let mut words = blocks.remainder().chunks_exact(8);
    for w in &mut words {
        let mut word = [0u8; 8];
        word.copy_from_slice(w);
        add(u64::from_le_bytes(word));
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut word = [0u8; 8];
        word[..rest.len()].copy_from_slice(rest);
        add(u64::from_le_bytes(word));
    }
    acc
}

/// Folds a [`sum`] to the 16-bit ones'-complement sum, in network byte
/// order (not complemented).
pub(crate) fn fold(acc: u64) -> u16 {
    let mut x = (acc >> 32) + (acc & 0xffff_ffff);
    x = (x >> 32) + (x & 0xffff_ffff);
    let mut y = (x >> 16) + (x & 0xffff);
    y = (y >> 16) + (y & 0xffff);
    y = (y >> 16) + (y & 0xffff);
    // The words were read little-endian: the sum comes out byte-swapped.
    (y as u16).swap_bytes()
}

/// Fills the checksum of the TCP segment `seg` of `frame` (whose checksum
/// field smoltcp left 0).
pub(crate) fn fill(frame: &mut [u8], seg: TcpSegment) {
    let at = seg.start + TCP_CSUM_OFFSET;
    let Some(body) = frame.get(seg.start..seg.start + seg.len) else {
        return;
    };
    if at + 2 > seg.start + seg.len {
        return;
    }
    let c = !fold(sum(body, seg.pseudo));
    frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// Writes the pseudo-header sum into the checksum field, as a device that
/// completes the checksum (`VIRTIO_NET_F_CSUM`) expects.
pub(crate) fn fill_partial(frame: &mut [u8], seg: TcpSegment) {
    let at = seg.start + TCP_CSUM_OFFSET;
    if at + 2 > seg.start + seg.len || seg.start + seg.len > frame.len() {
        return;
    }
    frame[at..at + 2].copy_from_slice(&fold(seg.pseudo).to_be_bytes());
}

/// Whether the TCP segment `seg` of `frame` has a correct checksum.
pub(crate) fn verify(frame: &[u8], seg: TcpSegment) -> bool {
    frame
        .get(seg.start..seg.start + seg.len)
        .is_some_and(|body| fold(sum(body, seg.pseudo)) == 0xffff)
}
