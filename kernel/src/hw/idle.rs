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

use x86_64::instructions::port::Port;

use super::cpu::TICK_VECTOR;

const PIT_HZ: u32 = 1_193_182;

/// Remaps the PICs, masks every IRQ but the timer and starts PIT channel
/// 0 at `hz` ticks per second. Interrupts stay disabled except inside
/// [`halt_until_tick`].
pub fn init_tick(hz: u32) {
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
}

/// Halts until the next tick (or returns at once if one is pending).
pub fn halt_until_tick() {
    // SAFETY: `sti; hlt` is the race-free idiom (the interrupt shadow of
    // `sti` covers `hlt`); the only unmasked interrupt is the tick, whose
    // handler acknowledges it and returns; `cli` restores the
    // interrupts-off state the rest of the kernel assumes.
    unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
}
