//! GDT, TSS with IST stacks, and an IDT that catches all 256 vectors.
//!
//! Every vector enters a 16-byte assembly stub that pushes a dummy error code
//! (when the CPU does not push one) and the vector number, then the common
//! stub saves all registers and calls [`fractos_trap`] on an IST stack —
//! never on the interrupted stack, whose red zone the host-target code uses.
//! Every trap is fatal: the report goes to serial and QEMU exits with a code
//! naming the vector.

use core::sync::atomic::{AtomicBool, Ordering};

use fractos_kernel::fault::{self, Landmarks, TrapFrame};
use spin::Once;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::{lidt, load_tss};
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::structures::DescriptorTablePointer;
use x86_64::VirtAddr;

use super::layout;

const IST_STACK_SIZE: usize = 16 * 1024;

/// A stack with an unmapped guard page below it (unmapped by `paging`).
#[repr(C, align(4096))]
pub struct GuardedStack {
    guard: [u8; 4096],
    stack: [u8; IST_STACK_SIZE],
}

/// IST 1: double fault. IST 2: NMI and machine check. IST 3: everything else.
static mut IST_STACKS: [GuardedStack; 3] = [const {
    GuardedStack {
        guard: [0; 4096],
        stack: [0; IST_STACK_SIZE],
    }
}; 3];

/// Guard page addresses of the IST stacks.
pub fn ist_guards() -> [u64; 3] {
    let base = &raw const IST_STACKS as u64;
    let size = core::mem::size_of::<GuardedStack>() as u64;
    [base, base + size, base + 2 * size]
}

fn ist_top(i: usize) -> VirtAddr {
    let g = ist_guards()[i];
    VirtAddr::new(g + core::mem::size_of::<GuardedStack>() as u64)
}

static TSS: Once<TaskStateSegment> = Once::new();
static GDT: Once<GlobalDescriptorTable> = Once::new();

#[repr(C, align(16))]
struct Idt([[u64; 2]; 256]);

static IDT: Once<Idt> = Once::new();

extern "C" {
    static fractos_isr_stubs: u8;
    static fractos_tick_isr: u8;
    static fractos_spurious_isr: u8;
}

/// Vector of the idle tick (IRQ 0 of the remapped 8259 PIC, see
/// [`super::idle`]).
pub const TICK_VECTOR: usize = 0x20;
/// Vectors of the 8259s' spurious IRQ 7 and 15.
pub const SPURIOUS_VECTORS: [usize; 2] = [0x27, 0x2f];

fn gate(handler: u64, selector: u16, ist: u8) -> [u64; 2] {
    let low = (handler & 0xffff)
        | (u64::from(selector) << 16)
        | (u64::from(ist & 7) << 32)
        | (0x8e << 40) // present, DPL 0, 64-bit interrupt gate
        | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

/// Loads the GDT, TSS and IDT. Call once, early, with interrupts off.
pub fn init() {
    let tss = TSS.call_once(|| {
        let mut t = TaskStateSegment::new();
        for i in 0..3 {
            t.interrupt_stack_table[i] = ist_top(i);
        }
        t
    });
    let mut code = None;
    let mut data = None;
    let mut tss_sel = None;
    let gdt = GDT.call_once(|| {
        let mut g = GlobalDescriptorTable::new();
        code = Some(g.append(Descriptor::kernel_code_segment()));
        data = Some(g.append(Descriptor::kernel_data_segment()));
        tss_sel = Some(g.append(Descriptor::tss_segment(tss)));
        g
    });
    gdt.load();
    let (Some(code), Some(data), Some(tss_sel)) = (code, data, tss_sel) else {
        return; // already initialized
    };
    // SAFETY: the selectors index the GDT just loaded, which is 'static.
    unsafe {
        CS::set_reg(code);
        SS::set_reg(data);
        DS::set_reg(data);
        ES::set_reg(data);
        load_tss(tss_sel);
    }

    let stubs = &raw const fractos_isr_stubs as u64;
    let idt = IDT.call_once(|| {
        let mut idt = Idt([[0; 2]; 256]);
        for (v, entry) in idt.0.iter_mut().enumerate() {
            let ist = match v {
                8 => 1,
                2 | 18 => 2,
                _ => 3,
            };
            *entry = gate(stubs + 16 * v as u64, code.0, ist);
        }
        idt.0[TICK_VECTOR] = gate(&raw const fractos_tick_isr as u64, code.0, 3);
        for v in SPURIOUS_VECTORS {
            idt.0[v] = gate(&raw const fractos_spurious_isr as u64, code.0, 3);
        }
        idt
    });
    let ptr = DescriptorTablePointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: VirtAddr::new(idt as *const Idt as u64),
    };
    // SAFETY: the IDT is 'static and every entry points at a stub below.
    unsafe { lidt(&ptr) };
}

core::arch::global_asm!(
    r#"
    .pushsection .text.fractos_isr, "ax"
    .balign 16
    .global fractos_isr_stubs
fractos_isr_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    .if ((0x60227d00 >> vec) & 1) == 0
    pushq $0
    .endif
    pushq $vec
    jmp fractos_isr_common
    .set vec, vec + 1
    .endr

fractos_isr_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    cld
    call fractos_trap
    ud2

    // The idle tick only wakes the CPU from `hlt`: acknowledge it at the
    // master PIC and return. Runs on IST 3; touches only %al.
    .balign 16
    .global fractos_tick_isr
fractos_tick_isr:
    pushq %rax
    movb $0x20, %al
    outb %al, $0x20
    popq %rax
    iretq

    // A spurious PIC interrupt is not acknowledged (8259 rules for IRQ 7;
    // IRQ 15 would need the master's EOI but is masked with the slave).
    .balign 16
    .global fractos_spurious_isr
fractos_spurious_isr:
    iretq
    .popsection
"#,
    options(att_syntax)
);

static IN_TRAP: AtomicBool = AtomicBool::new(false);

/// The stack ranges whose words may be read for the backtrace.
fn readable_stack(rsp: u64) -> Option<u64> {
    let boot = (layout::boot_stack_bottom(), layout::boot_stack_top());
    let ists = ist_guards().map(|g| (g + 4096, g + core::mem::size_of::<GuardedStack>() as u64));
    core::iter::once(boot)
        .chain(ists)
        .find(|&(lo, hi)| rsp >= lo && rsp < hi)
        .map(|(_, hi)| hi)
}

/// Landmarks for fault reports.
pub fn landmarks() -> Landmarks {
    let g = ist_guards();
    Landmarks {
        text: (layout::text_start(), layout::text_end()),
        guards: [
            (layout::boot_stack_guard(), "boot stack"),
            (g[0], "IST1 (double fault) stack"),
            (g[1], "IST2 (NMI/MCE) stack"),
            (g[2], "IST3 (exception) stack"),
        ],
    }
}

/// Words of stack scanned for return addresses.
pub const SCAN_WORDS: usize = 512;

/// Collects up to [`SCAN_WORDS`] words from `rsp` if it lies inside a known
/// stack.
pub fn stack_words(rsp: u64, out: &mut [u64; SCAN_WORDS]) -> usize {
    let Some(top) = readable_stack(rsp) else {
        return 0;
    };
    let n = (((top - rsp) / 8) as usize).min(out.len());
    for (i, w) in out.iter_mut().take(n).enumerate() {
        // SAFETY: `rsp + 8 * i` lies inside a mapped kernel stack (checked).
        *w = unsafe { ((rsp + 8 * i as u64) as *const u64).read_volatile() };
    }
    n
}

/// Called by the common stub with the saved registers; never returns.
#[no_mangle]
extern "C" fn fractos_trap(frame: &TrapFrame) -> ! {
    use core::fmt::Write;
    let mut out = super::serial::emergency();
    let reason = fault::exit_reason(frame.vector as u8);
    if IN_TRAP.swap(true, Ordering::SeqCst) {
        let _ = writeln!(
            out,
            "\n!!! nested trap (vector {}) while reporting a fault",
            frame.vector
        );
        super::pio::exit(reason);
    }
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    let mut words = [0u64; SCAN_WORDS];
    let n = stack_words(frame.rsp, &mut words);
    let _ = fault::write_report(&mut out, frame, cr2, &words[..n], &landmarks());
    super::pio::exit(reason)
}
