//! Idling without burning the host CPU.
//!
//! The event loop polls its devices; it never takes a device interrupt.
//! But a VM that spins while idle costs a whole host core, which a
//! cluster of appliances on one machine cannot afford. So, once the loop
//! has seen nothing for a while, it halts until the next tick of PIT
//! channel 0 (through the 8259 PIC remapped to vectors 0x20..0x2f, only
//! IRQ 0 unmasked). The tick's handler only acknowledges it: all work is
//! still done by polling. `fractos.idle=poll` keeps the loop spinning
//! (lowest latency, one busy core).
//!
//! The tick reaches the CPU from the 8259 through the local APIC's LINT0
//! in ExtINT mode (the PC's virtual-wire mode). SeaBIOS programs LINT0 so;
//! qboot on QEMU microvm leaves it masked, which would swallow every tick
//! and the halted loop would never wake: [`init_tick`] programs it when
//! it is not (the APIC page is mapped uncached by `paging::init`, see
//! [`lapic_window`]).
use x86_64::instructions::port::Port;
use x86_64::registers::model_specific::Msr;

use super::cpu::{SPURIOUS_VECTORS, TICK_VECTOR};

const PIT_HZ: u32 = 1_193_182;

/// `IA32_APIC_BASE` and its global enable bit.
const APIC_BASE_MSR: u32 = 0x1b;
const APIC_GLOBAL_ENABLE: u64 = 1 << 11;
/// Local APIC registers: spurious-interrupt vector (bit 8: software
/// enable) and LINT0's local vector table entry.
const APIC_SVR: u64 = 0xf0;
const APIC_LVT0: u64 = 0x350;
/// LINT0 as ExtINT, unmasked, edge.
const LVT_EXTINT: u32 = 0x700;
const LVT_MASKED: u32 = 1 << 16;

/// The local APIC's register page `(address, 4096)` if the APIC is on:
/// the page tables must map it uncached for [`init_tick`].
pub fn lapic_window() -> Option<(u64, u64)> {
    // SAFETY: IA32_APIC_BASE exists on every x86-64 CPU; reading it has no
    // side effect.
    let v = unsafe { Msr::new(APIC_BASE_MSR).read() };
    (v & APIC_GLOBAL_ENABLE != 0).then_some((v & 0x000f_ffff_ffff_f000, 4096))
}

/// Routes the 8259 to the CPU through LINT0 (ExtINT) unless the firmware
/// already did; returns whether it had to.
fn route_pic_through_lapic() -> bool {
    let Some((base, _)) = lapic_window() else {
        // APIC off: the 8259 drives the CPU's interrupt line directly.
        return false;
    };
    let reg = |off: u64| (base + off) as *mut u32;
    // SAFETY: `lapic_window` gave the enabled local APIC's register page,
    // which `paging::init` mapped identity and uncached; 32-bit aligned
    // accesses to SVR and LVT0 only change how LINT0 is delivered.
    unsafe {
        let lvt0 = reg(APIC_LVT0).read_volatile();
        if lvt0 & LVT_MASKED == 0 && (lvt0 >> 8) & 7 == 7 {
            return false;
        }
        // Software-enable the APIC (LVT entries stay masked otherwise)
        // with its spurious vector on an IDT stub that just returns (an
        // APIC spurious interrupt takes no EOI), then unmask LINT0 as
        // ExtINT.
        let svr = reg(APIC_SVR).read_volatile();
        reg(APIC_SVR).write_volatile((svr & !0x3ff) | 0x100 | SPURIOUS_VECTORS[1] as u32);
        reg(APIC_LVT0).write_volatile(LVT_EXTINT);
    }
    true
}

/// Remaps the PICs, masks every IRQ but the timer and starts PIT channel
/// 0 at `hz` ticks per second. Interrupts stay disabled except inside
/// [`halt_until_tick`]. Returns whether LINT0 had to be programmed.
pub fn init_tick(hz: u32) -> bool {
    let routed = route_pic_through_lapic();
    let divisor = (PIT_HZ / hz.clamp(19, PIT_HZ)).clamp(1, 0xffff) as u16;
    let (mut m_cmd, mut m_data) = (Port::<u8>::new(0x20), Port::<u8>::new(0x21));
    let (mut s_cmd, mut s_data) = (Port::<u8>::new(0xa0), Port::<u8>::new(0xa1));
    let (mut pit_cmd, mut pit_ch0) = (Port::<u8>::new(0x43), Port::<u8>::new(0x40));
    // SAFETY: the standard 8259 initialisation sequence (ICW1-ICW4) on the
    // PC's PIC ports, then the masks; and PIT channel 0 programmed as a
    // rate generator. Interrupts are disabled throughout, the IDT has
    // handlers for vectors 0x20..0x2f (the tick and spurious stubs or the
    // reporting catch-all), and no other code uses these devices.
    unsafe {
        m_cmd.write(0x11);
        s_cmd.write(0x11);
        m_data.write(TICK_VECTOR as u8);
        s_data.write(TICK_VECTOR as u8 + 8);
        m_data.write(0x04);
        s_data.write(0x02);
        m_data.write(0x01);
        s_data.write(0x01);
        m_data.write(0xfe); // only IRQ 0
        s_data.write(0xff);
        pit_cmd.write(0b0011_0100); // channel 0, lo/hi, mode 2, binary
        pit_ch0.write((divisor & 0xff) as u8);
        pit_ch0.write((divisor >> 8) as u8);
    }
    routed
}

/// Halts until the next tick (or returns at once if one is pending).
pub fn halt_until_tick() {
    // SAFETY: `sti; hlt` is the race-free idiom (the interrupt shadow of
    // `sti` covers `hlt`); the only unmasked interrupt is the tick, whose
    // handler acknowledges it and returns; `cli` restores the
    // interrupts-off state the rest of the kernel assumes.
    unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
}
