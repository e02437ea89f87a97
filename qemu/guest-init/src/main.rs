//! `fractos-guest-init`: PID 1 of the Linux baseline guest (an initramfs
//! built by `fractos_qemu::linux_guest`).
//!
//! It mounts devtmpfs, proc and sysfs, loads the kernel modules named on the
//! kernel command line, configures `lo` and `eth0` with a static IPv4
//! address, prints `fractos-guest: ready`, then either runs a command and
//! powers off when it exits, or runs a built-in `O_DIRECT` read benchmark on
//! a block device and powers off. Every failure prints one
//! `fractos-guest: error: ...` line and powers off.
//!
//! Kernel command line keys (each a single word, no spaces):
//!
//! * `fractos_guest.modules=/lib/modules/a.ko,/lib/modules/b.ko` — loaded in
//!   order with `finit_module(2)`; `.ko.xz`/`.ko.zst`/`.ko.gz` are passed
//!   with `MODULE_INIT_COMPRESSED_FILE`.
//! * `fractos_guest.ip=10.0.2.15/24`, `fractos_guest.gw=10.0.2.2`,
//!   `fractos_guest.dev=eth0` (default `eth0`).
//! * `fractos_guest.exec=/bin/fractos,controller,--config,/etc/fractos.toml`
//!   — the argv, words separated by `,`; inside a word `%XX` is the byte
//!   with hex code `XX` (so `%2C` is a comma, `%20` a space, `%25` a `%`).
//! * `fractos_guest.read=/dev/nvme0n1,bs=131072,count=512` — reads `count`
//!   blocks of `bs` bytes (default: the whole device) and prints
//!   `fractos-guest: read bs=.. bytes=.. secs=.. mbps=.. iops=.. ops=.. first=..`
//!   (`mbps` is 10^6 bytes per second; `first` the first 8 bytes read, hex).
//!   With `qd=8` and/or `stride=7919`, read `i` (of `count`, default the
//!   device's blocks) is at block `i * stride % blocks`, and Linux AIO
//!   (`io_submit`, one thread) keeps `qd` reads in flight; each read lands
//!   in its own slot of one buffer, so `fnv` covers the reads in index
//!   order, computed after the timed reads (`secs` is wall time from the
//!   first read to the last).
//! * `fractos_guest.wait=30` — seconds to wait for a NIC or block device to
//!   appear (default 60).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// `finit_module` flag: the file is compressed (the kernel decompresses it).
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;
const RTF_UP: libc::c_ushort = 0x0001;
const RTF_GATEWAY: libc::c_ushort = 0x0002;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "fractos-guest: {line}");
    let _ = out.flush();
}

fn main() {
    let result = run();
    if let Err(e) = result {
        say(&format!("error: {e}"));
    }
    power_off();
}

/// Powers the machine off (PID 1 only; elsewhere just exits).
fn power_off() -> ! {
    // SAFETY: getpid(2) and sync(2) take no arguments and cannot fail.
    let pid = unsafe {
        libc::sync();
        libc::getpid()
    };
    if pid == 1 {
        // SAFETY: reboot(2) with a valid magic command; as PID 1 this powers
        // the machine off and does not return on success.
        unsafe {
            libc::reboot(libc::RB_POWER_OFF);
        }
        // If it did return, PID 1 must not exit (that panics the kernel).
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    std::process::exit(0);
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// The parsed `fractos_guest.*` keys.
#[derive(Debug, Default)]
struct Params {
    modules: Vec<String>,
    ip: Option<(Ipv4Addr, u8)>,
    gw: Option<Ipv4Addr>,
    dev: String,
    exec: Option<Vec<String>>,
    read: Option<String>,
    wait: Duration,
}

fn parse_params(cmdline: &str) -> Result<Params, String> {
    let mut p = Params {
        dev: "eth0".into(),
        wait: Duration::from_secs(60),
        ..Params::default()
    };
    for word in cmdline.split_whitespace() {
        let Some(kv) = word.strip_prefix("fractos_guest.") else {
            continue;
        };
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "modules" => {
                p.modules = v
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect();
            }
            "ip" => {
                let (a, len) = v.split_once('/').unwrap_or((v, "24"));
                let a = a.parse().map_err(|_| format!("bad address in ip={v}"))?;
                let len: u8 = len
                    .parse()
                    .ok()
                    .filter(|l| *l <= 32)
                    .ok_or_else(|| format!("bad prefix length in ip={v}"))?;
                p.ip = Some((a, len));
            }
            "gw" => p.gw = Some(v.parse().map_err(|_| format!("bad gw={v}"))?),
            "dev" => p.dev = v.to_string(),
            "exec" => {
                let words = v
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(percent_decode)
                    .collect::<Result<Vec<_>, _>>()?;
                if words.is_empty() {
                    return Err("exec= is empty".into());
                }
                p.exec = Some(words);
            }
            "read" => p.read = Some(v.to_string()),
            "wait" => p.wait = Duration::from_secs(v.parse().map_err(|_| format!("bad wait={v}"))?),
            other => return Err(format!("unknown key fractos_guest.{other}")),
        }
    }
    Ok(p)
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad %-escape in exec word {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("exec word {s:?} is not UTF-8"))
}

fn run() -> Result<(), String> {
    mount("devtmpfs", "/dev", "devtmpfs")?;
    mount("proc", "/proc", "proc")?;
    mount("sysfs", "/sys", "sysfs")?;
    ensure_console();
    let cmdline = std::fs::read_to_string("/proc/cmdline")
        .map_err(|e| format!("reading /proc/cmdline: {e}"))?;
    let p = parse_params(&cmdline)?;
    for m in &p.modules {
        load_module(m)?;
    }
    let sock = Socket::new()?;
    sock.up("lo")?;
    if let Some((ip, len)) = p.ip {
        wait_for(&p.dev, p.wait, || sock.index(&p.dev).is_ok())?;
        sock.configure(&p.dev, ip, len)?;
        if let Some(gw) = p.gw {
            sock.default_route(gw)?;
        }
    }
    let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    say(&format!(
        "ready uptime={}",
        uptime.split_whitespace().next().unwrap_or("?")
    ));
    if let Some(spec) = &p.read {
        read_bench(spec, p.wait)?;
    }
    if let Some(argv) = &p.exec {
        let st = Command::new(&argv[0])
            .args(&argv[1..])
            .env_clear()
            .env("PATH", "/bin:/sbin:/usr/bin:/usr/sbin")
            .env("HOME", "/")
            .env("TERM", "dumb")
            .env("NO_COLOR", "1")
            .status()
            .map_err(|e| format!("running {}: {e}", argv[0]))?;
        say(&format!("exit {st}"));
    }
    Ok(())
}

fn mount(src: &str, dir: &str, fstype: &str) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {dir}: {e}"))?;
    let (s, d, t) = (cstr(src)?, cstr(dir)?, cstr(fstype)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the
    // call; `data` may be null.
    let r = unsafe { libc::mount(s.as_ptr(), d.as_ptr(), t.as_ptr(), 0, std::ptr::null()) };
    if r != 0 {
        let e = errno();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(format!("mounting {fstype} on {dir}: {e}"));
        }
    }
    Ok(())
}

fn cstr(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{s:?} contains NUL"))
}

/// Makes fds 0-2 the console if the kernel could not open it for us.
fn ensure_console() {
    // SAFETY: fcntl(F_GETFD) only queries a descriptor number.
    if unsafe { libc::fcntl(1, libc::F_GETFD) } >= 0 {
        return;
    }
    if let Ok(f) = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        for fd in 0..3 {
            // SAFETY: dup2 of a descriptor we own onto the standard ones.
            unsafe {
                libc::dup2(f.as_raw_fd(), fd);
            }
        }
    }
}

fn load_module(path: &str) -> Result<(), String> {
    let f = File::open(path).map_err(|e| format!("opening module {path}: {e}"))?;
    let flags = if [".xz", ".zst", ".gz"].iter().any(|s| path.ends_with(s)) {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    };
    let params = c"";
    // SAFETY: finit_module(2) with an open descriptor, a valid empty
    // parameter string and flags; no memory is written.
    let r = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            f.as_raw_fd(),
            params.as_ptr(),
            flags,
        )
    };
    if r != 0 {
        let e = errno();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(format!("loading module {path}: {e}"));
        }
    }
    Ok(())
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !ok() {
        if Instant::now() >= deadline {
            return Err(format!("{what} did not appear within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// `struct ifreq` (40 bytes on x86-64): name, then a union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

/// `struct rtentry` of `<net/route.h>` on 64-bit Linux.
#[repr(C)]
struct RtEntry {
    pad1: libc::c_ulong,
    dst: [u8; 16],
    gateway: [u8; 16],
    genmask: [u8; 16],
    flags: libc::c_ushort,
    pad2: libc::c_short,
    pad3: libc::c_ulong,
    pad4: *mut libc::c_void,
    metric: libc::c_short,
    dev: *mut libc::c_char,
    mtu: libc::c_ulong,
    window: libc::c_ulong,
    irtt: libc::c_ushort,
}

/// A `struct sockaddr_in` as 16 bytes.
fn sockaddr_in(a: Ipv4Addr) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    s[4..8].copy_from_slice(&a.octets());
    s
}

/// A datagram socket used for interface ioctls.
struct Socket(File);

impl Socket {
    fn new() -> Result<Self, String> {
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(format!("socket: {}", errno()));
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by nobody
        // else.
        Ok(Socket(unsafe {
            <File as std::os::fd::FromRawFd>::from_raw_fd(fd)
        }))
    }

    fn req(dev: &str) -> Result<IfReq, String> {
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        if dev.len() >= libc::IFNAMSIZ {
            return Err(format!("interface name {dev:?} too long"));
        }
        r.name[..dev.len()].copy_from_slice(dev.as_bytes());
        Ok(r)
    }

    fn ioctl<T>(
        &self,
        what: &str,
        dev: &str,
        req: libc::c_ulong,
        arg: &mut T,
    ) -> Result<(), String> {
        // SAFETY: `arg` is a live, correctly laid out `ifreq`/`rtentry` for
        // this request; the kernel reads and writes only within it.
        let r = unsafe { libc::ioctl(self.0.as_raw_fd(), req, arg as *mut T) };
        if r < 0 {
            return Err(format!("{what} on {dev}: {}", errno()));
        }
        Ok(())
    }

    fn index(&self, dev: &str) -> Result<(), String> {
        let mut r = Self::req(dev)?;
        self.ioctl("SIOCGIFINDEX", dev, libc::SIOCGIFINDEX, &mut r)
    }

    fn up(&self, dev: &str) -> Result<(), String> {
        let mut r = Self::req(dev)?;
        self.ioctl("SIOCGIFFLAGS", dev, libc::SIOCGIFFLAGS, &mut r)?;
        let flags =
            i16::from_ne_bytes([r.data[0], r.data[1]]) | (libc::IFF_UP | libc::IFF_RUNNING) as i16;
        r.data[..2].copy_from_slice(&flags.to_ne_bytes());
        self.ioctl("SIOCSIFFLAGS", dev, libc::SIOCSIFFLAGS, &mut r)
    }

    fn configure(&self, dev: &str, ip: Ipv4Addr, len: u8) -> Result<(), String> {
        let mut r = Self::req(dev)?;
        r.data[..16].copy_from_slice(&sockaddr_in(ip));
        self.ioctl("SIOCSIFADDR", dev, libc::SIOCSIFADDR, &mut r)?;
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        let mut r = Self::req(dev)?;
        r.data[..16].copy_from_slice(&sockaddr_in(Ipv4Addr::from(mask)));
        self.ioctl("SIOCSIFNETMASK", dev, libc::SIOCSIFNETMASK, &mut r)?;
        self.up(dev)
    }

    fn default_route(&self, gw: Ipv4Addr) -> Result<(), String> {
        let any = sockaddr_in(Ipv4Addr::UNSPECIFIED);
        let mut rt = RtEntry {
            pad1: 0,
            dst: any,
            gateway: sockaddr_in(gw),
            genmask: any,
            flags: RTF_UP | RTF_GATEWAY,
            pad2: 0,
            pad3: 0,
            pad4: std::ptr::null_mut(),
            metric: 0,
            dev: std::ptr::null_mut(),
            mtu: 0,
            window: 0,
            irtt: 0,
        };
        self.ioctl("SIOCADDRT", "default route", libc::SIOCADDRT, &mut rt)
    }
}

/// A `bs`-byte buffer aligned to 4 KiB, as `O_DIRECT` needs.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(size: usize) -> Result<Self, String> {
        let layout = std::alloc::Layout::from_size_align(size, 4096)
            .map_err(|_| format!("bad block size {size}"))?;
        // SAFETY: the layout has a non-zero size (checked by the caller).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(format!("cannot allocate {size} bytes"));
        }
        Ok(AlignedBuf { ptr, layout })
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// FNV-1a 64 offset basis.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a 64 of `data` continuing from `h`.
fn fnv1a(mut h: u64, data: &[u8]) -> u64 {
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Waits for `dev`, opens it with `O_DIRECT` and sizes it.
fn open_direct(dev: &str, wait: Duration) -> Result<(File, u64), String> {
    wait_for(dev, wait, || Path::new(dev).exists())?;
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .map_err(|e| format!("opening {dev}: {e}"))?;
    let size = f
        .seek(SeekFrom::End(0))
        .map_err(|e| format!("sizing {dev}: {e}"))?;
    Ok((f, size))
}

fn read_bench(spec: &str, wait: Duration) -> Result<(), String> {
    let mut parts = spec.split(',');
    let dev = parts
        .next()
        .filter(|d| !d.is_empty())
        .ok_or("read= needs a device")?;
    let (mut bs, mut count) = (131072usize, None::<u64>);
    let (mut qd, mut stride) = (None::<usize>, None::<u64>);
    for kv in parts {
        match kv.split_once('=') {
            Some(("bs", v)) => bs = v.parse().map_err(|_| format!("bad bs={v}"))?,
            Some(("count", v)) => count = Some(v.parse().map_err(|_| format!("bad count={v}"))?),
            Some(("qd", v)) => qd = Some(v.parse().map_err(|_| format!("bad qd={v}"))?),
            Some(("stride", v)) => stride = Some(v.parse().map_err(|_| format!("bad stride={v}"))?),
            _ => return Err(format!("unknown read option {kv:?}")),
        }
    }
    if bs == 0 || bs % 512 != 0 {
        return Err(format!("bs={bs} must be a non-zero multiple of 512"));
    }
    if qd.is_some() || stride.is_some() {
        return read_bench_deep(dev, wait, bs, count, qd.unwrap_or(1), stride.unwrap_or(1));
    }
    let (f, size) = open_direct(dev, wait)?;
    let count = count.unwrap_or(size / bs as u64);
    let buf = AlignedBuf::new(bs)?;
    let fd = f.as_raw_fd();
    let (mut bytes, mut ops) = (0u64, 0u64);
    let mut first = [0u8; 8];
    let mut sum = FNV_OFFSET;
    let mut timed = Duration::ZERO;
    for i in 0..count {
        let off = (i * bs as u64) as libc::off_t;
        let t = Instant::now();
        // SAFETY: `buf` is a live allocation of `bs` bytes; pread(2) writes
        // at most `bs` bytes into it.
        let n = unsafe { libc::pread(fd, buf.ptr.cast(), bs, off) };
        timed += t.elapsed();
        if n < 0 {
            return Err(format!("reading {dev} at {off}: {}", errno()));
        }
        if n == 0 {
            break;
        }
        if i == 0 {
            // SAFETY: at least 512 bytes of `buf` were just filled (O_DIRECT
            // reads whole sectors) and `first` is 8 bytes.
            unsafe { std::ptr::copy_nonoverlapping(buf.ptr, first.as_mut_ptr(), 8) };
        }
        // Untimed: every byte read goes into the checksum the host compares
        // with the disk image.
        // SAFETY: pread(2) filled the first `n` bytes of `buf`.
        let got = unsafe { std::slice::from_raw_parts(buf.ptr, n as usize) };
        sum = fnv1a(sum, got);
        bytes += n as u64;
        ops += 1;
    }
    let secs = timed.as_secs_f64().max(1e-9);
    let hex: String = first.iter().map(|b| format!("{b:02x}")).collect();
    say(&format!(
        "read bs={bs} bytes={bytes} secs={secs:.6} mbps={:.2} iops={:.1} ops={ops} first={hex} fnv={sum:016x}",
        bytes as f64 / secs / 1e6,
        ops as f64 / secs
    ));
    Ok(())
}

/// Block of read `i`: `i * stride` modulo the device's `blocks`.
fn strided(i: u64, stride: u64, blocks: u64) -> u64 {
    ((u128::from(i) * u128::from(stride)) % u128::from(blocks.max(1))) as u64
}

/// Linux AIO control block (`struct iocb`, x86-64 little-endian layout).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Iocb {
    data: u64,
    key: u32,
    rw_flags: i32,
    lio_opcode: u16,
    reqprio: i16,
    fildes: u32,
    buf: u64,
    nbytes: u64,
    offset: i64,
    reserved2: u64,
    flags: u32,
    resfd: u32,
}

/// Linux AIO completion (`struct io_event`).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

/// `IOCB_CMD_PREAD`.
const IOCB_CMD_PREAD: u16 = 0;

/// A Linux AIO context (`io_setup`), destroyed on drop.
struct Aio(libc::c_ulong);

impl Aio {
    fn new(depth: usize) -> Result<Self, String> {
        let mut ctx: libc::c_ulong = 0;
        // SAFETY: io_setup writes the new context into `ctx`.
        let r = unsafe { libc::syscall(libc::SYS_io_setup, depth as libc::c_long, &mut ctx) };
        if r != 0 {
            return Err(format!("io_setup: {}", errno()));
        }
        Ok(Aio(ctx))
    }

    /// Submits one read.
    fn submit(&self, cb: &mut Iocb) -> Result<(), String> {
        let mut list = [cb as *mut Iocb];
        // SAFETY: one valid control block whose buffer the caller keeps
        // alive and untouched until its event is reaped.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_submit,
                self.0,
                1 as libc::c_long,
                list.as_mut_ptr(),
            )
        };
        if r != 1 {
            return Err(format!("io_submit: {r}, {}", errno()));
        }
        Ok(())
    }

    /// Waits for at least one completion; fills `events`, returns how many.
    fn reap(&self, events: &mut [IoEvent]) -> Result<usize, String> {
        loop {
            // SAFETY: `events` has room for `events.len()` entries; no
            // timeout (null): waits until one completes.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_getevents,
                    self.0,
                    1 as libc::c_long,
                    events.len() as libc::c_long,
                    events.as_mut_ptr(),
                    std::ptr::null_mut::<libc::timespec>(),
                )
            };
            if r >= 0 {
                return Ok(r as usize);
            }
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return Err(format!("io_getevents: {}", errno()));
            }
        }
    }
}

impl Drop for Aio {
    fn drop(&mut self) {
        // SAFETY: destroys our own context (waiting for anything in flight).
        unsafe { libc::syscall(libc::SYS_io_destroy, self.0) };
    }
}

/// The read benchmark with `qd` reads in flight (Linux AIO, one thread,
/// `O_DIRECT`) at strided offsets; see the module doc.
fn read_bench_deep(
    dev: &str,
    wait: Duration,
    bs: usize,
    count: Option<u64>,
    qd: usize,
    stride: u64,
) -> Result<(), String> {
    if qd == 0 || qd > 256 {
        return Err(format!("qd={qd} must be 1..=256"));
    }
    let (f, size) = open_direct(dev, wait)?;
    let blocks = size / bs as u64;
    let count = count.unwrap_or(blocks);
    if blocks == 0 || count == 0 {
        return Err(format!("{dev}: nothing to read"));
    }
    let total = usize::try_from(count)
        .ok()
        .and_then(|c| c.checked_mul(bs))
        .ok_or("count * bs too large")?;
    // Read `i` lands in slot `i` of one buffer (aligned to `bs`, a multiple
    // of 512, from a 4 KiB-aligned base, as O_DIRECT needs).
    let buf = AlignedBuf::new(total)?;
    let aio = Aio::new(qd)?;
    let fd = f.as_raw_fd() as u32;
    let mut cbs = vec![Iocb::default(); qd];
    let mut events = vec![IoEvent::default(); qd];
    let start = |cb: &mut Iocb, slot: usize, i: u64| -> Result<(), String> {
        *cb = Iocb {
            data: (slot as u64) << 32 | i,
            lio_opcode: IOCB_CMD_PREAD,
            fildes: fd,
            buf: buf.ptr as u64 + i * bs as u64,
            nbytes: bs as u64,
            offset: (strided(i, stride, blocks) * bs as u64) as i64,
            ..Iocb::default()
        };
        aio.submit(cb)
    };
    let t = Instant::now();
    let mut next = 0u64;
    for (slot, cb) in cbs.iter_mut().enumerate().take(count as usize) {
        start(cb, slot, next)?;
        next += 1;
    }
    let mut done = 0u64;
    while done < count {
        let n = aio.reap(&mut events)?;
        for e in &events[..n] {
            let (slot, i) = ((e.data >> 32) as usize, e.data & 0xffff_ffff);
            if e.res != bs as i64 {
                return Err(format!("reading {dev}: read {i} returned {}", e.res));
            }
            done += 1;
            if next < count {
                let cb = cbs.get_mut(slot).ok_or("bad event")?;
                start(cb, slot, next)?;
                next += 1;
            }
        }
    }
    let secs = t.elapsed().as_secs_f64().max(1e-9);
    // SAFETY: every slot was filled by a successful read (else we failed
    // above), so all `total` bytes are initialised.
    let all = unsafe { std::slice::from_raw_parts(buf.ptr, total) };
    let sum = fnv1a(FNV_OFFSET, all);
    let hex: String = all[..8].iter().map(|b| format!("{b:02x}")).collect();
    say(&format!(
        "read bs={bs} bytes={total} secs={secs:.6} mbps={:.2} iops={:.1} ops={count} first={hex} fnv={sum:016x} qd={qd} stride={stride}",
        total as f64 / secs / 1e6,
        count as f64 / secs
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_command_line() {
        let p = parse_params(
            "console=ttyS0 quiet fractos_guest.modules=/a.ko,/b.ko fractos_guest.ip=10.0.2.15/24 \
             fractos_guest.gw=10.0.2.2 fractos_guest.exec=/bin/x,--a,b%2Cc%20d fractos_guest.wait=5",
        )
        .unwrap();
        assert_eq!(p.modules, ["/a.ko", "/b.ko"]);
        assert_eq!(p.ip, Some((Ipv4Addr::new(10, 0, 2, 15), 24)));
        assert_eq!(p.gw, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(p.exec.unwrap(), ["/bin/x", "--a", "b,c d"]);
        assert_eq!(p.wait, Duration::from_secs(5));
        assert!(parse_params("fractos_guest.bogus=1").is_err());
        assert!(parse_params("fractos_guest.ip=10.0.2.15/33").is_err());
        assert!(percent_decode("%zz").is_err());
    }

    #[test]
    fn struct_layouts_match_the_kernel() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
        assert_eq!(std::mem::offset_of!(RtEntry, flags), 56);
        assert_eq!(std::mem::offset_of!(RtEntry, dev), 88);
    }
}
