//! QEMU exit statuses as the kernel produces them.
//!
//! The kernel writes a code `v` to QEMU's `isa-debug-exit` port and QEMU
//! exits with `(v << 1) | 1`. The codes are defined in the kernel
//! (`fractos_kernel::exit::ExitReason`); this is the host-side decoding,
//! checked against the real kernel by the boot tests.

use std::fmt;

/// How a QEMU process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelExit {
    /// Clean kernel exit (code 0x10, status 33).
    Success,
    /// Kernel panic (0x11, status 35).
    Panic,
    /// Unexpected interrupt (0x12, status 37).
    UnexpectedInterrupt,
    /// Boot failed (0x13, status 39).
    BootFailed,
    /// CPU exception with this vector (0x20 + vector).
    Fault(u8),
    /// QEMU itself exited with this status (not a kernel code), e.g. 1 for
    /// a bad command line or a triple fault with `-no-reboot` (0).
    Qemu(i32),
    /// Killed by a signal.
    Signal(i32),
}

impl KernelExit {
    /// Decodes a process exit status.
    pub fn from_status(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(c), _) => Self::from_code(c),
            (None, Some(s)) => KernelExit::Signal(s),
            (None, None) => KernelExit::Qemu(-1),
        }
    }

    /// Decodes a numeric QEMU exit status.
    pub fn from_code(c: i32) -> Self {
        if c & 1 == 0 {
            return KernelExit::Qemu(c);
        }
        match c >> 1 {
            0x10 => KernelExit::Success,
            0x11 => KernelExit::Panic,
            0x12 => KernelExit::UnexpectedInterrupt,
            0x13 => KernelExit::BootFailed,
            v @ 0x20..=0x3f => KernelExit::Fault((v - 0x20) as u8),
            _ => KernelExit::Qemu(c),
        }
    }
}

impl fmt::Display for KernelExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelExit::Success => write!(f, "kernel exited cleanly, status 33"),
            KernelExit::Panic => write!(f, "kernel panic, status 35"),
            KernelExit::UnexpectedInterrupt => write!(f, "unexpected interrupt, status 37"),
            KernelExit::BootFailed => write!(f, "kernel boot failed, status 39"),
            KernelExit::Fault(v) => write!(
                f,
                "CPU exception vector {v}, status {}",
                ((0x20 + u32::from(*v)) << 1) | 1
            ),
            KernelExit::Qemu(c) => write!(f, "QEMU exit status {c}"),
            KernelExit::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_kernel_codes() {
        assert_eq!(KernelExit::from_code(33), KernelExit::Success);
        assert_eq!(KernelExit::from_code(35), KernelExit::Panic);
        assert_eq!(KernelExit::from_code(39), KernelExit::BootFailed);
        assert_eq!(KernelExit::from_code(65), KernelExit::Fault(0));
        assert_eq!(KernelExit::from_code(93), KernelExit::Fault(14));
        assert_eq!(KernelExit::from_code(1), KernelExit::Qemu(1));
        assert_eq!(KernelExit::from_code(0), KernelExit::Qemu(0));
        assert!(KernelExit::Fault(14).to_string().contains("status 93"));
    }
}
