//! CPU exceptions: names, the saved register frame, and the fault report.

use core::fmt::{self, Write};

use crate::exit::ExitReason;

/// Registers saved by the interrupt entry stubs, lowest address first.
///
/// The stub pushes an error code (or 0) and the vector, then `rax` … `r15`;
/// the CPU pushed `ss, rsp, rflags, cs, rip` before that.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
#[allow(missing_docs)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    /// Interrupt vector (pushed by the stub).
    pub vector: u64,
    /// CPU error code, or 0 for vectors without one.
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// Bit mask of the vectors for which the CPU pushes an error code.
pub const ERROR_CODE_VECTORS: u32 = (1 << 8)
    | (1 << 10)
    | (1 << 11)
    | (1 << 12)
    | (1 << 13)
    | (1 << 14)
    | (1 << 17)
    | (1 << 21)
    | (1 << 29)
    | (1 << 30);

/// Whether the CPU pushes an error code for `vector`.
pub fn has_error_code(vector: u8) -> bool {
    vector < 32 && ERROR_CODE_VECTORS & (1 << vector) != 0
}

/// Mnemonic and name of an exception vector.
pub fn vector_name(vector: u8) -> (&'static str, &'static str) {
    match vector {
        0 => ("#DE", "Divide Error"),
        1 => ("#DB", "Debug"),
        2 => ("NMI", "Non-Maskable Interrupt"),
        3 => ("#BP", "Breakpoint"),
        4 => ("#OF", "Overflow"),
        5 => ("#BR", "Bound Range Exceeded"),
        6 => ("#UD", "Invalid Opcode"),
        7 => ("#NM", "Device Not Available"),
        8 => ("#DF", "Double Fault"),
        9 => ("CSO", "Coprocessor Segment Overrun"),
        10 => ("#TS", "Invalid TSS"),
        11 => ("#NP", "Segment Not Present"),
        12 => ("#SS", "Stack-Segment Fault"),
        13 => ("#GP", "General Protection Fault"),
        14 => ("#PF", "Page Fault"),
        16 => ("#MF", "x87 Floating-Point Exception"),
        17 => ("#AC", "Alignment Check"),
        18 => ("#MC", "Machine Check"),
        19 => ("#XM", "SIMD Floating-Point Exception"),
        20 => ("#VE", "Virtualization Exception"),
        21 => ("#CP", "Control Protection Exception"),
        28 => ("#HV", "Hypervisor Injection Exception"),
        29 => ("#VC", "VMM Communication Exception"),
        30 => ("#SX", "Security Exception"),
        15 | 22..=27 | 31 => ("RSV", "Reserved Exception"),
        _ => ("IRQ", "Unexpected Interrupt"),
    }
}

/// The exit reason for a trap on `vector`.
pub fn exit_reason(vector: u8) -> ExitReason {
    if vector < 32 {
        ExitReason::Fault(vector)
    } else {
        ExitReason::UnexpectedInterrupt
    }
}

/// Human-readable decoding of a page-fault error code.
pub struct PageFaultCode(pub u64);

impl fmt::Display for PageFaultCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.0;
        f.write_str(if c & 1 != 0 {
            "protection-violation"
        } else {
            "not-present"
        })?;
        f.write_str(if c & 2 != 0 { " write" } else { " read" })?;
        if c & 16 != 0 {
            f.write_str(" instruction-fetch")?;
        }
        f.write_str(if c & 4 != 0 { " user" } else { " supervisor" })?;
        if c & 8 != 0 {
            f.write_str(" reserved-bit")?;
        }
        Ok(())
    }
}

/// Where things are, so the report can explain an address.
#[derive(Debug, Clone, Copy, Default)]
pub struct Landmarks {
    /// `[start, end)` of kernel code: stack words in here are likely return
    /// addresses.
    pub text: (u64, u64),
    /// Guard pages (start addresses, 4 KiB each) and what they guard.
    pub guards: [(u64, &'static str); 4],
}

impl Landmarks {
    fn guard_of(&self, addr: u64) -> Option<&'static str> {
        self.guards
            .iter()
            .find(|(g, _)| *g != 0 && addr >= *g && addr < *g + 4096)
            .map(|(_, name)| *name)
    }
}

/// Most return-address candidates a report prints.
pub const MAX_BACKTRACE: usize = 24;

/// Words of `stack` that point into `text` (likely return addresses), with
/// consecutive repeats dropped, at most [`MAX_BACKTRACE`].
pub fn return_addresses(stack: &[u64], text: (u64, u64)) -> impl Iterator<Item = u64> + '_ {
    let (lo, hi) = text;
    let mut last = None;
    stack
        .iter()
        .copied()
        .filter(move |&v| v >= lo && v < hi)
        .filter(move |&v| last.replace(v) != Some(v))
        .take(MAX_BACKTRACE)
}

/// Writes the fault report for `frame`. `stack` holds the words at the
/// faulting RSP (as many as could be read safely); the ones inside
/// [`Landmarks::text`] are printed as a stack-scan backtrace.
pub fn write_report(
    w: &mut impl Write,
    frame: &TrapFrame,
    cr2: u64,
    stack: &[u64],
    marks: &Landmarks,
) -> fmt::Result {
    let vector = frame.vector as u8;
    let (mnemonic, name) = vector_name(vector);
    let reason = exit_reason(vector);
    writeln!(w)?;
    writeln!(w, "!!! FRACTOS FAULT: {name} ({mnemonic}, vector {vector})")?;
    write!(w, "    error code: {:#x}", frame.error_code)?;
    if vector == 14 {
        write!(w, " ({})", PageFaultCode(frame.error_code))?;
    }
    writeln!(w)?;
    writeln!(
        w,
        "    rip: {:#018x}  cs: {:#x}  rflags: {:#x}",
        frame.rip, frame.cs, frame.rflags
    )?;
    writeln!(w, "    rsp: {:#018x}  ss: {:#x}", frame.rsp, frame.ss)?;
    write!(w, "    cr2: {cr2:#018x}")?;
    if vector == 14 {
        if let Some(what) = marks.guard_of(cr2) {
            write!(w, " (guard page of {what}: stack overflow)")?;
        } else if cr2 < 4096 {
            write!(w, " (null pointer)")?;
        }
    }
    writeln!(w)?;
    writeln!(
        w,
        "    rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x}",
        frame.rax, frame.rbx, frame.rcx, frame.rdx
    )?;
    writeln!(
        w,
        "    rsi {:#x} rdi {:#x} rbp {:#x} r8 {:#x} r9 {:#x}",
        frame.rsi, frame.rdi, frame.rbp, frame.r8, frame.r9
    )?;
    writeln!(
        w,
        "    r10 {:#x} r11 {:#x} r12 {:#x} r13 {:#x} r14 {:#x} r15 {:#x}",
        frame.r10, frame.r11, frame.r12, frame.r13, frame.r14, frame.r15
    )?;
    write!(w, "    backtrace (stack scan from rsp): {:#x}", frame.rip)?;
    for word in return_addresses(stack, marks.text) {
        write!(w, " <- {word:#x}")?;
    }
    writeln!(w)?;
    writeln!(
        w,
        "!!! exit code {:#x} (qemu status {})",
        reason.code(),
        reason.qemu_status()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_code_vectors_match_the_sdm() {
        let with: Vec<u8> = (0..32).filter(|&v| has_error_code(v)).collect();
        assert_eq!(with, [8, 10, 11, 12, 13, 14, 17, 21, 29, 30]);
        assert!(!has_error_code(40));
    }

    #[test]
    fn every_vector_has_a_name_and_exit_reason() {
        for v in 0..=255u8 {
            let (m, n) = vector_name(v);
            assert!(!m.is_empty() && !n.is_empty());
            let r = exit_reason(v);
            if v < 32 {
                assert_eq!(r, ExitReason::Fault(v));
            } else {
                assert_eq!(r, ExitReason::UnexpectedInterrupt);
            }
        }
        assert_eq!(vector_name(14).0, "#PF");
        assert_eq!(vector_name(0).1, "Divide Error");
    }

    #[test]
    fn page_fault_report_names_guard_and_backtrace() {
        let frame = TrapFrame {
            vector: 14,
            error_code: 2,
            rip: 0x10_2345,
            rsp: 0x20_0ff8,
            ..TrapFrame::default()
        };
        let marks = Landmarks {
            text: (0x10_0000, 0x11_0000),
            guards: [(0x1ff_000, "boot stack"), (0, ""), (0, ""), (0, "")],
        };
        let mut s = String::new();
        write_report(
            &mut s,
            &frame,
            0x1ff_008,
            &[7, 0x10_4444, 0x10_4444, 0x99_0000, 0x10_5555],
            &marks,
        )
        .unwrap();
        assert!(
            s.contains("FRACTOS FAULT: Page Fault (#PF, vector 14)"),
            "{s}"
        );
        assert!(s.contains("not-present write supervisor"), "{s}");
        assert!(
            s.contains("guard page of boot stack: stack overflow"),
            "{s}"
        );
        assert!(s.contains("0x102345 <- 0x104444 <- 0x105555\n"), "{s}");
        assert!(s.contains("exit code 0x2e (qemu status 93)"), "{s}");
    }
}
