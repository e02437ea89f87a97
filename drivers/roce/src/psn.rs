//! 24-bit packet sequence numbers.

use core::fmt;

/// A packet sequence number: 24 bits, compared modulo 2^24 (IBA §9.7.1).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Psn(u32);

impl Psn {
    /// The PSN space is 24 bits.
    pub const MASK: u32 = 0x00FF_FFFF;
    /// Half the PSN space: a PSN up to this far ahead counts as "later",
    /// further away as "earlier".
    pub const HALF: u32 = 1 << 23;

    /// `v` truncated to 24 bits.
    pub const fn new(v: u32) -> Psn {
        Psn(v & Self::MASK)
    }

    /// The 24-bit value.
    pub const fn value(self) -> u32 {
        self.0
    }

    /// `self + n` modulo 2^24.
    #[must_use]
    pub const fn add(self, n: u32) -> Psn {
        Psn(self.0.wrapping_add(n) & Self::MASK)
    }

    /// `self - n` modulo 2^24.
    #[must_use]
    pub const fn sub(self, n: u32) -> Psn {
        Psn(self.0.wrapping_sub(n) & Self::MASK)
    }

    /// How far `self` is after `base`, modulo 2^24 (0 ..= 2^24 - 1).
    pub const fn distance_from(self, base: Psn) -> u32 {
        self.0.wrapping_sub(base.0) & Self::MASK
    }

    /// Whether `self` comes strictly before `other` in the half-space order.
    pub const fn before(self, other: Psn) -> bool {
        let d = other.distance_from(self);
        d != 0 && d < Self::HALF
    }

    /// Whether `self` is in `[start, start + len)`, modulo 2^24.
    pub const fn in_range(self, start: Psn, len: u32) -> bool {
        self.distance_from(start) < len
    }
}

impl fmt::Debug for Psn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "psn:{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_at_24_bits() {
        let top = Psn::new(Psn::MASK);
        assert_eq!(top.add(1), Psn::new(0));
        assert_eq!(Psn::new(0).sub(1), top);
        assert!(top.before(Psn::new(0)));
        assert!(!Psn::new(0).before(top));
        assert_eq!(Psn::new(2).distance_from(top), 3);
        assert!(Psn::new(1).in_range(top, 3));
        assert!(!Psn::new(2).in_range(top, 3));
        assert_eq!(Psn::new(0x0100_0005), Psn::new(5));
    }

    #[test]
    fn half_space_order() {
        let a = Psn::new(10);
        assert!(a.before(a.add(Psn::HALF - 1)));
        assert!(!a.before(a.add(Psn::HALF)));
        assert!(!a.before(a));
    }
}
