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
    /// Counted against PIT channel 0 for 50 ms (no speaker gate at port
    /// 0x61, as on QEMU microvm).
    PitChannel0,
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

/// Whether the PC speaker / PIT channel 2 gate port (0x61) exists: on
/// machines without it (QEMU microvm) it reads as all ones, while its
/// high bits (parity, channel check) read 0 on a PC.
fn has_speaker_port() -> bool {
    // SAFETY: reading port 0x61 (system control port B) has no side effect.
    unsafe { Port::<u8>::new(0x61).read() != 0xff }
}

/// Counts TSC ticks over 50 ms of PIT channel 0, read back with latch
/// commands (channel 0's gate is always on) and summed across the
/// counter's wrap-arounds. Interrupts are off; the idle tick reprograms
/// the channel later.
fn from_pit_channel0() -> u64 {
    const PIT_HZ: u64 = 1_193_182;
    const TICKS: u64 = PIT_HZ / 20; // 50 ms
    let mut cmd = Port::<u8>::new(0x43);
    let mut ch0 = Port::<u8>::new(0x40);
    // SAFETY: ports 0x43/0x40 are the PIT command and channel 0 ports:
    // rate generator with the full count (its interrupt stays masked:
    // interrupts are disabled), then latched reads, which only observe.
    unsafe {
        cmd.write(0b0011_0100); // channel 0, lo/hi, mode 2
        ch0.write(0);
        ch0.write(0);
    }
    let mut read = || {
        // SAFETY: as above.
        unsafe {
            cmd.write(0b0000_0000); // latch channel 0
            let lo = ch0.read();
            let hi = ch0.read();
            u16::from_le_bytes([lo, hi])
        }
    };
    let mut last = read();
    let t0 = rdtsc();
    let mut elapsed = 0u64;
    // Bounded: a PIT that never counts gives up after 2^24 reads.
    for _ in 0..(1u32 << 24) {
        let now = read();
        elapsed += u64::from(last.wrapping_sub(now));
        last = now;
        if elapsed >= TICKS {
            let t1 = rdtsc();
            return (t1 - t0) * PIT_HZ / elapsed;
        }
    }
    0
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
        None if has_speaker_port() => (from_pit(), Source::Pit),
        None => (from_pit_channel0(), Source::PitChannel0),
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

/// Wall-clock seconds since 1970 from the CMOS real-time clock (UTC as
/// QEMU and most firmware keep it), or 0 if it reads as nonsense. Only used
/// to make each boot's controller incarnation distinct, so a coarse,
/// unsynchronised read is enough.
pub fn rtc_unix_seconds() -> u64 {
    fn read(reg: u8) -> u8 {
        let mut index = Port::<u8>::new(0x70);
        let mut data = Port::<u8>::new(0x71);
        // SAFETY: ports 0x70/0x71 are the CMOS index/data pair; selecting a
        // clock register (with NMIs left enabled, bit 7 clear) and reading
        // it has no other effect.
        unsafe {
            index.write(reg & 0x7f);
            data.read()
        }
    }
    // Wait out an update in progress (bit 7 of status A), bounded.
    for _ in 0..100_000 {
        if read(0x0a) & 0x80 == 0 {
            break;
        }
        core::hint::spin_loop();
    }
    let binary = read(0x0b) & 0x04 != 0;
    let v = |r: u8| {
        let x = read(r);
        u64::from(if binary {
            x
        } else {
            (x & 0x0f) + (x >> 4) * 10
        })
    };
    let (s, m, h) = (v(0x00), v(0x02), v(0x04) % 24);
    let (day, month, year) = (v(0x07), v(0x08), 2000 + v(0x09));
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return 0;
    }
    // Days since 1970-01-01 (civil-from-days inverse, Howard Hinnant's).
    let (y, mo) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + h * 3600 + m * 60 + s
}
