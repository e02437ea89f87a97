//! The built-in read benchmark's result line on the guest's serial log.

use super::*;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
