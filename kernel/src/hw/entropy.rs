//! The boot seed: RDSEED, else RDRAND, else TSC jitter, always hashed
//! together with the weak boot inputs (`fractos_kernel::entropy::Pool`).
//!
//! Fallback, for CPUs without a usable generator (QEMU's default `qemu64`
//! model has neither): [`JITTER_SAMPLES`] TSC deltas, each timing a short
//! loop of data-dependent length plus a port read (an exit to the VMM under
//! virtualisation, a bus cycle on hardware), the CMOS RTC time, the TSC,
//! the boot-info address and the fw_cfg file `opt/fractos/entropy` if the
//! VMM offers one. That is guessable by a patient attacker who knows the
//! boot timing: the boot log says `weak` so operators notice; give the
//! appliance a CPU with RDRAND (`-cpu max` under TCG, `-cpu host` on KVM).

use core::arch::asm;
use core::arch::x86_64::{__cpuid, __cpuid_count, _rdtsc};
use core::sync::atomic::{AtomicU64, Ordering};

use fractos_kernel::entropy::{
    distinct_low_bytes, looks_stuck, EntropySource, Pool, ENTROPY_FILE_MAX, ENTROPY_FW_CFG_NAME,
};
use x86_64::instructions::port::Port;

use super::{fw_cfg, time};

/// TSC deltas sampled for the jitter input (mixed in whatever the source).
pub const JITTER_SAMPLES: usize = 4096;
/// Attempts per RDRAND word: Intel's DRNG guide says 10 failures in a row
/// mean the generator is broken.
const RDRAND_RETRIES: u32 = 10;
/// Attempts per RDSEED word: RDSEED may fail transiently when its entropy
/// source is drained; Intel recommends retrying with a pause.
const RDSEED_RETRIES: u32 = 1000;

static BOOT_INFO: AtomicU64 = AtomicU64::new(0);

/// Records the boot loader's information address (mixed into the seed).
pub fn note_boot_info(protocol: u32, info: u64) {
    BOOT_INFO.store(info ^ (u64::from(protocol) << 56), Ordering::Relaxed);
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC exists on every x86_64 CPU and has no side effects.
    unsafe { _rdtsc() }
}

fn has_rdseed() -> bool {
    // CPUID is always available in long mode.
    __cpuid(0).eax >= 7 && __cpuid_count(7, 0).ebx & (1 << 18) != 0
}

fn has_rdrand() -> bool {
    __cpuid(1).ecx & (1 << 30) != 0
}

fn rdseed_step() -> Option<u64> {
    let v: u64;
    let ok: u8;
    // SAFETY: only called when CPUID reports RDSEED; it writes a register
    // and CF, touches no memory.
    unsafe {
        asm!("rdseed {v}", "setc {ok}", v = out(reg) v, ok = out(reg_byte) ok,
             options(nomem, nostack))
    };
    (ok != 0).then_some(v)
}

fn rdrand_step() -> Option<u64> {
    let v: u64;
    let ok: u8;
    // SAFETY: only called when CPUID reports RDRAND; it writes a register
    // and CF, touches no memory.
    unsafe {
        asm!("rdrand {v}", "setc {ok}", v = out(reg) v, ok = out(reg_byte) ok,
             options(nomem, nostack))
    };
    (ok != 0).then_some(v)
}

/// Four words from `step`, each retried up to `retries` times (pausing in
/// between); `None` if a word never came or the output looks stuck.
fn words(step: fn() -> Option<u64>, retries: u32) -> Option<[u64; 4]> {
    let mut w = [0u64; 4];
    for slot in &mut w {
        *slot = (0..retries).find_map(|_| {
            let v = step();
            if v.is_none() {
                core::hint::spin_loop();
            }
            v
        })?;
    }
    (!looks_stuck(&w)).then_some(w)
}

/// Mixes [`JITTER_SAMPLES`] TSC deltas into `pool`; returns how many
/// distinct low bytes they had (a rough quality figure for the log).
fn jitter(pool: &mut Pool) -> usize {
    let mut port = Port::<u8>::new(0x80);
    let mut deltas = [0u64; 256];
    let mut distinct = 0;
    let mut last = 0u64;
    for chunk in 0..JITTER_SAMPLES / deltas.len() {
        for d in deltas.iter_mut() {
            let t0 = rdtsc();
            // A loop whose length depends on the previous delta, so timing
            // noise compounds.
            let mut x = last;
            for _ in 0..(16 + (last & 0x3f)) {
                x = core::hint::black_box(x.rotate_left(7) ^ t0);
            }
            // SAFETY: reading port 0x80 (the POST diagnostic port) has no
            // effect; it costs a bus cycle or a VMM exit, whose time varies.
            let b = unsafe { port.read() };
            *d = rdtsc().wrapping_sub(t0) ^ (u64::from(b) << 56) ^ (x & 0xff00_0000);
            last = *d;
        }
        if chunk == 0 {
            distinct = distinct_low_bytes(&deltas);
        }
        let bytes: [u8; 256 * 8] = {
            let mut b = [0u8; 256 * 8];
            for (o, d) in b.chunks_exact_mut(8).zip(&deltas) {
                o.copy_from_slice(&d.to_le_bytes());
            }
            b
        };
        pool.add("tsc-jitter", &bytes);
    }
    distinct
}

/// The boot seed and where its entropy came from. Call once.
pub fn seed() -> ([u8; 32], EntropySource) {
    let mut pool = Pool::new();
    let mut source = EntropySource::TscJitter;
    if has_rdseed() {
        if let Some(w) = words(rdseed_step, RDSEED_RETRIES) {
            for v in w {
                pool.add_u64("rdseed", v);
            }
            source = EntropySource::Rdseed;
        } else {
            log::warn!("entropy: RDSEED advertised but failing; trying RDRAND");
        }
    }
    if source == EntropySource::TscJitter && has_rdrand() {
        if let Some(w) = words(rdrand_step, RDRAND_RETRIES) {
            for v in w {
                pool.add_u64("rdrand", v);
            }
            source = EntropySource::Rdrand;
        } else {
            log::warn!("entropy: RDRAND advertised but failing");
        }
    }
    pool.add_u64("tsc", rdtsc());
    pool.add_u64("rtc", time::rtc_unix_seconds());
    pool.add_u64("boot-info", BOOT_INFO.load(Ordering::Relaxed));
    let mut file = [0u8; ENTROPY_FILE_MAX];
    if let Ok(n) = fw_cfg::read_file(ENTROPY_FW_CFG_NAME, &mut file) {
        pool.add("fw_cfg", &file[..n]);
        log::debug!("entropy: {n} bytes from fw_cfg {ENTROPY_FW_CFG_NAME}");
    }
    let distinct = jitter(&mut pool);
    log::debug!("entropy: TSC jitter: {distinct} distinct low bytes in 256 samples");
    pool.add_u64("tsc", rdtsc());
    (pool.finish(), source)
}
