//! The C symbols the precompiled host-target `core` expects (DESIGN.md §5).
//!
//! Written in assembly so the compiler cannot turn them back into calls
//! to themselves. `memcpy` and `memset` move 32 bytes per loop iteration
//! in general-purpose registers and finish with `rep movsb`/`rep stosb`:
//! under QEMU TCG a `rep` string instruction runs one translated-block
//! pass per iteration, so byte-wise `rep movsb` over a whole buffer costs
//! several times the unrolled loop (the boot log's `perf:` line measures
//! both copies and fills of 64 KiB).

use core::arch::asm;

/// # Safety
/// Standard C `memcpy` contract: valid, non-overlapping ranges.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid for `n` bytes and
    // do not overlap; the loop reads and writes only inside them (32-byte
    // blocks while at least 32 remain, then the rest bytewise); DF is
    // clear (SysV ABI). Only the named scratch registers are written.
    unsafe {
        asm!(
            "cmp rcx, 32",
            "jb 3f",
            "2:",
            "mov {a}, [rsi]",
            "mov {b}, [rsi + 8]",
            "mov {c}, [rsi + 16]",
            "mov {d}, [rsi + 24]",
            "mov [rdi], {a}",
            "mov [rdi + 8], {b}",
            "mov [rdi + 16], {c}",
            "mov [rdi + 24], {d}",
            "add rsi, 32",
            "add rdi, 32",
            "sub rcx, 32",
            "cmp rcx, 32",
            "jae 2b",
            "3:",
            "rep movsb",
            a = out(reg) _, b = out(reg) _, c = out(reg) _, d = out(reg) _,
            inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
            options(nostack),
        );
    }
    dst
}

/// # Safety
/// Standard C `memmove` contract: valid ranges, may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: forward copy is correct when dst is below src or disjoint.
        return unsafe { memcpy(dst, src, n) };
    }
    if n == 0 {
        return dst;
    }
    // SAFETY: overlapping with dst above src: copy backwards from the last
    // byte with DF set, then clear DF again as the ABI requires.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
             options(nostack));
    }
    dst
}

/// # Safety
/// Standard C `memset` contract.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // The byte repeated in all eight bytes of a word.
    let word = u64::from(c as u8) * 0x0101_0101_0101_0101;
    // SAFETY: the caller guarantees `dst` is valid for `n` bytes; the loop
    // writes only inside it (32-byte blocks while at least 32 remain, then
    // the rest bytewise with AL, the low byte of `word`); DF is clear.
    unsafe {
        asm!(
            "cmp rcx, 32",
            "jb 3f",
            "2:",
            "mov [rdi], rax",
            "mov [rdi + 8], rax",
            "mov [rdi + 16], rax",
            "mov [rdi + 24], rax",
            "add rdi, 32",
            "sub rcx, 32",
            "cmp rcx, 32",
            "jae 2b",
            "3:",
            "rep stosb",
            inout("rcx") n => _, inout("rdi") dst => _, in("rax") word,
            options(nostack),
        );
    }
    dst
}

/// # Safety
/// Standard C `memcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: `i < n` and both ranges are valid for `n` bytes.
        let (x, y) = unsafe { (a.add(i).read(), b.add(i).read()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// Standard C `bcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// Referenced by the precompiled `core`'s unwind tables; never called
/// (panic = "abort").
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

/// Referenced by cleanup paths in the precompiled `alloc` (e.g.
/// `alloc::fmt::format`), which was built with unwinding; with
/// panic = "abort" no unwind ever starts, so reaching this is a bug: it
/// ends the run with the panic exit code.
#[no_mangle]
pub extern "C" fn _Unwind_Resume() -> ! {
    crate::kprintln!("\n!!! FRACTOS PANIC: _Unwind_Resume called under panic=abort");
    super::pio::exit(fractos_kernel::exit::ExitReason::Panic)
}
