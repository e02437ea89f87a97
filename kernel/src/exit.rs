//! How the kernel ends a QEMU run: the `isa-debug-exit` device.
//!
//! Writing `v` to port [`DEBUG_EXIT_PORT`] makes QEMU exit with status
//! `(v << 1) | 1`, so every status the kernel produces is odd and never 0.
//! The host runner (`fractos-qemu`) decodes these statuses; keep the two in
//! step (the boot tests check both ends).

/// I/O port of QEMU's `isa-debug-exit` device (`iobase=0xf4,iosize=0x04`).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// Why the kernel stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// Clean shutdown (e.g. `fractos.test=exit` after the ready line).
    Success,
    /// A Rust panic.
    Panic,
    /// An interrupt arrived on a vector ≥ 32 (the kernel enables none).
    UnexpectedInterrupt,
    /// Boot could not complete (bad loader hand-over, no memory, …).
    BootFailed,
    /// A CPU exception with this vector (0..=31).
    Fault(u8),
}

impl ExitReason {
    /// The value written to the debug-exit port.
    pub fn code(self) -> u32 {
        match self {
            ExitReason::Success => 0x10,
            ExitReason::Panic => 0x11,
            ExitReason::UnexpectedInterrupt => 0x12,
            ExitReason::BootFailed => 0x13,
            ExitReason::Fault(v) => 0x20 + u32::from(v & 0x1f),
        }
    }

    /// The exit status QEMU reports for this reason.
    pub fn qemu_status(self) -> i32 {
        ((self.code() << 1) | 1) as i32
    }

    /// Decodes a QEMU exit status back into a reason.
    pub fn from_qemu_status(status: i32) -> Option<Self> {
        if status & 1 == 0 {
            return None;
        }
        match status >> 1 {
            0x10 => Some(ExitReason::Success),
            0x11 => Some(ExitReason::Panic),
            0x12 => Some(ExitReason::UnexpectedInterrupt),
            0x13 => Some(ExitReason::BootFailed),
            v @ 0x20..=0x3f => Some(ExitReason::Fault((v - 0x20) as u8)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_and_are_distinct() {
        let mut all = vec![
            ExitReason::Success,
            ExitReason::Panic,
            ExitReason::UnexpectedInterrupt,
            ExitReason::BootFailed,
        ];
        all.extend((0..32).map(ExitReason::Fault));
        let mut seen = std::collections::HashSet::new();
        for r in all {
            let s = r.qemu_status();
            assert!(s > 0 && s < 256, "{r:?} -> {s}");
            assert!(seen.insert(s), "duplicate status {s}");
            assert_eq!(ExitReason::from_qemu_status(s), Some(r));
        }
        assert_eq!(ExitReason::Success.qemu_status(), 33);
        assert_eq!(ExitReason::Fault(14).qemu_status(), 93);
        assert_eq!(ExitReason::from_qemu_status(0), None);
        assert_eq!(ExitReason::from_qemu_status(1), None);
    }
}
