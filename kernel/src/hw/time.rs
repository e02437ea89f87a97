//! Time since boot from the TSC, calibrated against CPUID or the PIT.

use core::sync::atomic::{AtomicU64, Ordering};

use x86_64::instructions::port::Port;

static TSC_HZ: AtomicU64 = AtomicU64::new(0);

/// How the TSC frequency was found.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// CPUID leaf 0x15 (TSC/crystal ratio).
    Cpuid,
    /// Counted against PIT channel 2 for 10 ms.
    Pit,
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC is available on every x86_64 CPU and has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn from_cpuid() -> Option<u64> {
    let max = core::arch::x86_64::__cpuid(0).eax;
    if max < 0x15 {
        return None;
    }
    let l = core::arch::x86_64::__cpuid(0x15);
    (l.eax != 0 && l.ebx != 0 && l.ecx != 0)
        .then(|| u64::from(l.ecx) * u64::from(l.ebx) / u64::from(l.eax))
}

fn from_pit() -> u64 {
    const PIT_HZ: u64 = 1_193_182;
    const COUNT: u16 = 11_932; // 10 ms
    let mut ctl = Port::<u8>::new(0x61);
    let mut cmd = Port::<u8>::new(0x43);
    let mut ch2 = Port::<u8>::new(0x42);
    // SAFETY: ports 0x61/0x43/0x42 are the PC speaker gate and PIT; using
    // channel 2 in one-shot mode with the speaker off has no other effect.
    unsafe {
        let v = ctl.read() & !0x02; // speaker data off
        ctl.write(v & !0x01); // gate low
        cmd.write(0b1011_0000); // channel 2, lo/hi byte, mode 0, binary
        ch2.write((COUNT & 0xff) as u8);
        ch2.write((COUNT >> 8) as u8);
        ctl.write(v | 0x01); // gate high: start counting
        let t0 = rdtsc();
        while ctl.read() & 0x20 == 0 {
            core::hint::spin_loop();
        }
        let t1 = rdtsc();
        ctl.write(v & !0x01);
        (t1 - t0) * PIT_HZ / u64::from(COUNT)
    }
}

/// Calibrates the TSC; returns its frequency and how it was found.
pub fn init() -> (u64, Source) {
    let (hz, src) = match from_cpuid() {
        Some(hz) => (hz, Source::Cpuid),
        None => (from_pit(), Source::Pit),
    };
    TSC_HZ.store(hz.max(1), Ordering::Relaxed);
    (hz, src)
}

/// Nanoseconds since the CPU's TSC started (reset), 0 before calibration.
pub fn now_ns() -> u64 {
    let hz = TSC_HZ.load(Ordering::Relaxed);
    if hz == 0 {
        return 0;
    }
    (u128::from(rdtsc()) * 1_000_000_000 / u128::from(hz)) as u64
}
