//! CRC-32 (IEEE 802.3, reflected) and the RoCEv2 invariant CRC.
//!
//! The ICRC (IBA Vol 1 §7.8.1, Annex A17.3.3 for RoCEv2) is a CRC-32 over a
//! pseudo-packet: eight bytes of `0xFF` standing for the masked LRH, then
//! the IPv4 header with Type of Service, TTL and header checksum replaced
//! by ones, the UDP header with its checksum replaced by ones, the BTH with
//! its FECN/BECN/reserved byte (byte 4) replaced by ones, then the rest of
//! the transport headers, the payload and the pad bytes. The result is
//! complemented and sent least significant byte first (like an Ethernet
//! FCS). Linux Soft-RoCE seeds its CRC with `0xdebb20e3`, the state after
//! the eight `0xFF` bytes; the unit tests check that this crate agrees.

use crate::wire::{BTH_LEN, IPV4_HDR_LEN, UDP_HDR_LEN};

/// Slicing-by-8 tables for the reflected polynomial `0xEDB88320`.
const TABLES: [[u32; 256]; 8] = make_tables();

const fn make_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut s = 1;
        while s < 8 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xFF) as usize];
            s += 1;
        }
        i += 1;
    }
    t
}

/// Feeds `data` into a raw CRC-32 state (no initial or final inversion).
pub fn crc32_update(mut crc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = crc ^ u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        let hi = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        crc = TABLES[7][(lo & 0xFF) as usize]
            ^ TABLES[6][((lo >> 8) & 0xFF) as usize]
            ^ TABLES[5][((lo >> 16) & 0xFF) as usize]
            ^ TABLES[4][(lo >> 24) as usize]
            ^ TABLES[3][(hi & 0xFF) as usize]
            ^ TABLES[2][((hi >> 8) & 0xFF) as usize]
            ^ TABLES[1][((hi >> 16) & 0xFF) as usize]
            ^ TABLES[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        crc = (crc >> 8) ^ TABLES[0][((crc ^ u32::from(b)) & 0xFF) as usize];
    }
    crc
}

/// The standard CRC-32 of `data` (as zlib's `crc32`).
pub fn crc32(data: &[u8]) -> u32 {
    !crc32_update(!0, data)
}

/// Length of the masked prefix: IPv4 header, UDP header, BTH.
const MASKED_LEN: usize = IPV4_HDR_LEN + UDP_HDR_LEN + BTH_LEN;

/// The CRC state after the eight `0xFF` bytes of the masked LRH.
pub const PSEUDO_LRH_SEED: u32 = 0xdebb_20e3;

/// The ICRC of a RoCEv2 IPv4 packet. `ip_packet` runs from the first byte
/// of the (option-less) IPv4 header to the last pad byte, i.e. it excludes
/// the four ICRC bytes. Returns `None` if it is shorter than the IPv4, UDP
/// and base transport headers. Send and compare the result as
/// `to_le_bytes()`.
pub fn icrc(ip_packet: &[u8]) -> Option<u32> {
    let head = ip_packet.get(..MASKED_LEN)?;
    let mut masked = [0u8; MASKED_LEN];
    masked.copy_from_slice(head);
    masked[1] = 0xFF; // Type of Service (DSCP + ECN)
    masked[8] = 0xFF; // TTL
    masked[10] = 0xFF; // header checksum
    masked[11] = 0xFF;
    masked[IPV4_HDR_LEN + 6] = 0xFF; // UDP checksum
    masked[IPV4_HDR_LEN + 7] = 0xFF;
    masked[IPV4_HDR_LEN + UDP_HDR_LEN + 4] = 0xFF; // BTH FECN, BECN, Resv6a
    let crc = crc32_update(PSEUDO_LRH_SEED, &masked);
    Some(!crc32_update(crc, &ip_packet[MASKED_LEN..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> alloc::vec::Vec<u8> {
        let digits: alloc::vec::Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|p| u8::from_str_radix(core::str::from_utf8(p).unwrap(), 16).unwrap())
            .collect()
    }

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        // Slicing-by-8 agrees with the bytewise path at every length.
        let data: alloc::vec::Vec<u8> = (0..100u8).map(|i| i.wrapping_mul(37)).collect();
        for n in 0..data.len() {
            let mut bytewise = !0u32;
            for &b in &data[..n] {
                bytewise = (bytewise >> 8) ^ TABLES[0][((bytewise ^ u32::from(b)) & 0xFF) as usize];
            }
            assert_eq!(crc32_update(!0, &data[..n]), bytewise);
        }
    }

    /// Linux Soft-RoCE starts from `0xdebb20e3`, "the result of computing a
    /// CRC with a seed of 0xffffffff and 8 bytes of 0xff representing a
    /// masked LRH" (rxe_icrc.c): derive it independently.
    #[test]
    fn pseudo_lrh_seed_matches_soft_roce() {
        assert_eq!(crc32_update(!0, &[0xFF; 8]), PSEUDO_LRH_SEED);
    }

    /// A congestion notification packet captured from a Mellanox
    /// ConnectX-4 Lx (published with scapy's RoCE tests): hardware-made
    /// ICRC `82 fd 00 2a`, with a non-zero TOS and the BECN bit set (both
    /// masked).
    #[test]
    fn icrc_of_connectx4_capture() {
        let frame = hex("e41d 2dab 2bc2 7cfe 9064 3b32 0800 45c2
             003c 718c 4000 4011 9161 0a00 1101 0a00
             1201 0000 12b7 0028 0000 8100 ffff 4000
             0118 0000 0000 0000 0000 0000 0000 0000
             0000 0000 0000 82fd 002a");
        let ip = &frame[14..frame.len() - 4];
        let got = icrc(ip).unwrap().to_le_bytes();
        assert_eq!(got, [0x82, 0xfd, 0x00, 0x2a]);
    }

    #[test]
    fn icrc_ignores_masked_fields_only() {
        let mut ip = hex("4501 0040 0478 4000 4011 b4d5 c0a8 0007 c0a8 0007
             c000 12b7 002c aca2 2460 ffff 0000 00d3 00cf 1610 4630 818b");
        let base = icrc(&ip).unwrap();
        for masked in [1, 8, 10, 11, 26, 27, 32] {
            ip[masked] ^= 0x5A;
            assert_eq!(icrc(&ip).unwrap(), base, "byte {masked} is masked");
            ip[masked] ^= 0x5A;
        }
        for covered in [0, 2, 9, 12, 16, 20, 22, 28, 31, 33, 36, 40] {
            ip[covered] ^= 0x01;
            assert_ne!(icrc(&ip).unwrap(), base, "byte {covered} is covered");
            ip[covered] ^= 0x01;
        }
        assert_eq!(icrc(&ip[..39]), None);
    }
}
