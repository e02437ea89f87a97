//! Hostile processes on a hosted controller's local socket, written as
//! raw clients (`rustix` system calls, bytes encoded by hand, not the
//! SDK): wrong, missing and excess descriptors, lying sizes, too many
//! regions, connections that never finish their hello, rings with
//! impossible counters and frames. Each attack must end in a clear refusal
//! or a closed connection; SDK bystanders keep invoking and copying
//! throughout; the controller (in this process) keeps no descriptor of a
//! hostile connection after it ends.
//!
//! The tests count this process's open descriptors, so they run one at a
//! time (`SERIAL`).

mod common;

use std::io::{IoSlice, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use fractos_hosted::{spawn, HostedConfig, Running};
use fractos_sdk::wire::{ControllerMsg, FrameSplitter, ProcessMsg, Reply, Rights};
use fractos_sdk::{ErrorCode, Handle, NodeId, Process};
use rustix::fs::{MemfdFlags, SealFlags};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

static SERIAL: Mutex<()> = Mutex::new(());

const PAGE: u64 = 4096;
const RING: u64 = 4096;
const HELLO: u8 = 1;
const REGISTER: u8 = 2;
const UNREGISTER: u8 = 3;

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn controller(tag: &str, tune: impl FnOnce(&mut HostedConfig)) -> Running {
    let mut c = HostedConfig::local(NodeId(1), KEY);
    c.local_socket = Some(socket_path(tag));
    tune(&mut c);
    spawn(c).expect("controller starts")
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn wait_until(mut f: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until this process holds `baseline` descriptors again.
fn no_leak(baseline: usize) {
    let deadline = Instant::now() + WAIT;
    while open_fds() != baseline {
        assert!(
            Instant::now() < deadline,
            "descriptors leaked: {} open, {baseline} before the attacks",
            open_fds()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ------------------------------------------------------------ bystanders

/// Two SDK processes on the local socket: one invokes the other and
/// copies into its memory until stopped; counts rounds, fails on any
/// error.
struct Bystanders {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl Bystanders {
    fn start(node: &Running, tag: &str) -> Bystanders {
        let a = attach_local(node, &format!("{tag}-a"));
        let b = attach_local(node, &format!("{tag}-b"));
        let req = b.request_create(5, &[], &[]).unwrap();
        let r = share(&b, req, &a, &format!("{tag}/req"))
            .as_request()
            .unwrap();
        let n = 64 * 1024;
        let dst = b.register(n).unwrap();
        let d = b.memory_create(&dst, 0, n, Rights::WRITE).unwrap();
        let d = share(&b, d, &a, &format!("{tag}/dst")).as_memory().unwrap();
        let src = a.register(n).unwrap();
        let s = a.memory_create(&src, 0, n, Rights::READ).unwrap();
        let (stop, rounds) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let thread = {
            let (stop, rounds) = (stop.clone(), rounds.clone());
            std::thread::spawn(move || {
                let mut i = 0u8;
                while !stop.load(Ordering::Relaxed) {
                    i = i.wrapping_add(1);
                    a.invoke(&r, &[i], &[])
                        .map_err(|e| format!("invoke: {e}"))?;
                    let inv = b
                        .next_invocation_timeout(WAIT)
                        .map_err(|e| format!("invocation: {e}"))?;
                    if inv.imms != [i] {
                        return Err(format!("invocation carried {:?}, not [{i}]", inv.imms));
                    }
                    src.fill(i);
                    a.copy(&s, &d, None).map_err(|e| format!("copy: {e}"))?;
                    if !dst.with_bytes(|d| d.iter().all(|&x| x == i)) {
                        return Err("a copy delivered wrong bytes".into());
                    }
                    rounds.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok(())
            })
        };
        let by = Bystanders {
            stop,
            rounds,
            thread: Some(thread),
        };
        by.progress();
        by
    }

    /// Waits for a few more rounds.
    fn progress(&self) {
        let at = self.rounds.load(Ordering::Relaxed);
        wait_until(
            || {
                self.rounds.load(Ordering::Relaxed) >= at + 3
                    || self.thread.as_ref().is_some_and(|t| t.is_finished())
            },
            "bystanders to make progress",
        );
        assert!(
            !self.thread.as_ref().is_some_and(|t| t.is_finished()),
            "the bystanders stopped: {:?}",
            self.finish_early()
        );
    }

    fn finish_early(&self) -> &'static str {
        "see the panic or error below"
    }

    fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let r = self.thread.take().unwrap().join().unwrap();
        assert_eq!(r, Ok(()), "the bystanders failed");
    }
}

impl Drop for Bystanders {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ------------------------------------------------------------ raw client

fn msg(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = ((payload.len() + 1) as u32).to_le_bytes().to_vec();
    out.push(kind);
    out.extend_from_slice(payload);
    out
}

fn hello(version: u32) -> Vec<u8> {
    msg(HELLO, &version.to_le_bytes())
}

fn register(addr: u64, len: u64, file_offset: u64) -> Vec<u8> {
    let mut p = Vec::new();
    for v in [addr, len, file_offset] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    msg(REGISTER, &p)
}

/// Sends `bytes` with any number of descriptors in one `sendmsg`.
fn send_raw(s: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    }
    let n =
        rustix::net::sendmsg(s, &[IoSlice::new(bytes)], &mut control, SendFlags::NOSIGNAL).unwrap();
    assert_eq!(n, bytes.len());
}

/// The controller's next answer: `Some(error)` for an `Ack` (empty:
/// accepted), `None` if it closed the socket first.
fn answer(s: &UnixStream) -> Option<String> {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if buf.len() >= 4 {
            let len = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
            if buf.len() >= 4 + len {
                assert_eq!(buf[4], 4, "an Ack");
                let elen = u16::from_le_bytes([buf[14], buf[15]]) as usize;
                return Some(String::from_utf8_lossy(&buf[16..16 + elen]).into_owned());
            }
        }
        match (&*s).read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("no answer from the controller: {e}"),
        }
    }
}

/// Waits until the controller closes `s`.
fn closed(s: &UnixStream) -> bool {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut chunk = [0u8; 4096];
    loop {
        match (&*s).read(&mut chunk) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn memfd(len: u64, seals: SealFlags) -> OwnedFd {
    let fd = rustix::fs::memfd_create("hostile", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
        .unwrap();
    rustix::fs::ftruncate(&fd, len).unwrap();
    if !seals.is_empty() {
        rustix::fs::fcntl_add_seals(&fd, seals).unwrap();
    }
    fd
}

fn sealed(len: u64) -> OwnedFd {
    memfd(len, SealFlags::SHRINK | SealFlags::GROW)
}

fn put(fd: &OwnedFd, at: u64, bytes: &[u8]) {
    assert_eq!(rustix::io::pwrite(fd, bytes, at).unwrap(), bytes.len());
}

fn put_u64(fd: &OwnedFd, at: u64, v: u64) {
    put(fd, at, &v.to_le_bytes());
}

/// A ring memfd with a header claiming `capacity`.
fn ring_fd(file_len: u64, capacity: u64) -> OwnedFd {
    let fd = sealed(file_len);
    put_u64(&fd, 0, u64::from_le_bytes(*b"FRACRING"));
    put_u64(&fd, 8, 1);
    put_u64(&fd, 16, capacity);
    fd
}

fn eventfd() -> OwnedFd {
    rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap()
}

fn kick(fd: &OwnedFd) {
    let _ = rustix::io::write(fd, &1u64.to_le_bytes());
}

/// A raw process whose rings the controller accepted and which attached
/// through them.
struct RawProcess {
    sock: UnixStream,
    ring: OwnedFd,
    up: OwnedFd,
    _down: OwnedFd,
    head: u64,
    /// What this side read of the down ring, and the bytes not yet framed.
    down_tail: u64,
    down_buf: Vec<u8>,
}

impl RawProcess {
    fn attach(node: &Running, name: &str) -> RawProcess {
        let sock = UnixStream::connect(node.local_socket().unwrap()).unwrap();
        let ring = ring_fd(3 * PAGE, RING);
        let (up, down) = (eventfd(), eventfd());
        send_raw(&sock, &hello(1), &[ring.as_fd(), up.as_fd(), down.as_fd()]);
        assert_eq!(answer(&sock).as_deref(), Some(""), "rings accepted");
        let mut p = RawProcess {
            sock,
            ring,
            up,
            _down: down,
            head: 0,
            down_tail: 0,
            down_buf: Vec::new(),
        };
        let mut frame = Vec::new();
        ProcessMsg::Attach {
            name: name.as_bytes().to_vec(),
            token: token(name),
        }
        .encode(&mut frame);
        p.send_up(&frame);
        p
    }

    /// Writes `bytes` to the up ring and publishes them.
    fn send_up(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            let at = (self.head + i as u64) % RING;
            put(&self.ring, 1024 + at, &[*b]);
        }
        self.head += bytes.len() as u64;
        put_u64(&self.ring, 256, self.head);
        kick(&self.up);
    }

    fn get_u64(&self, at: u64) -> u64 {
        let mut b = [0u8; 8];
        rustix::io::pread(&self.ring, &mut b, at).unwrap();
        u64::from_le_bytes(b)
    }

    /// The next message from the controller (polls the down ring).
    fn next_msg(&mut self) -> ControllerMsg {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some((body, n)) = FrameSplitter::default().split(&self.down_buf).unwrap() {
                let m = ControllerMsg::decode(body).unwrap();
                self.down_buf.drain(..n);
                return m;
            }
            let head = self.get_u64(512);
            while self.down_tail < head {
                let at = 1024 + RING + self.down_tail % RING;
                let mut b = [0u8; 1];
                rustix::io::pread(&self.ring, &mut b, at).unwrap();
                self.down_buf.push(b[0]);
                self.down_tail += 1;
            }
            put_u64(&self.ring, 512 + 64, self.down_tail);
            assert!(Instant::now() < deadline, "no message from the controller");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Sends `msg` (whose op id is `op`) and returns its completion.
    fn call(&mut self, op: u64, msg: ProcessMsg) -> Result<Reply, ErrorCode> {
        let mut f = Vec::new();
        msg.encode(&mut f);
        self.send_up(&f);
        loop {
            if let ControllerMsg::Completion { op: o, result } = self.next_msg() {
                if o == op {
                    return result;
                }
            }
        }
    }

    fn memory(&mut self, op: u64, addr: u64, len: u64, rights: Rights) -> Handle {
        match self.call(
            op,
            ProcessMsg::MemoryCreate {
                op,
                addr,
                len,
                rights,
            },
        ) {
            Ok(Reply::Cap { handle, .. }) => handle,
            other => panic!("memory_create [{addr:#x}, +{len}): {other:?}"),
        }
    }

    /// Waits until the controller took everything from the up ring.
    fn consumed(&self) {
        wait_until(
            || {
                let mut b = [0u8; 8];
                rustix::io::pread(&self.ring, &mut b, 320).unwrap();
                u64::from_le_bytes(b) == self.head
            },
            "the controller to read the up ring",
        );
    }

    fn ask(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Option<String> {
        send_raw(&self.sock, bytes, fds);
        answer(&self.sock)
    }
}

fn process_conns(node: &Running) -> f64 {
    node.metrics_text()
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("fractos_node_connections{node=\"1\",kind=\"process\"}"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ------------------------------------------------------------ attacks

#[test]
fn hostile_hellos_get_their_reason_and_leave_nothing_behind() {
    let _serial = serial();
    let node = controller("hellos", |_| {});
    let by = Bystanders::start(&node, "hellos");

    let good_ring = || ring_fd(3 * PAGE, RING);
    let (up, down) = (eventfd(), eventfd());
    let (pipe_r, _pipe_w) = rustix::pipe::pipe().unwrap();
    let devzero = std::fs::File::open("/dev/zero").unwrap();
    let (sock_a, _sock_b) = UnixStream::pair().unwrap();
    let dir = std::fs::File::open(std::env::temp_dir()).unwrap();
    let unsealed = {
        let fd = memfd(3 * PAGE, SealFlags::empty());
        put(&fd, 0, b"FRACRING");
        fd
    };
    let grow_only = memfd(3 * PAGE, SealFlags::GROW);
    let no_sealing = {
        let fd = rustix::fs::memfd_create("plain", MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 3 * PAGE).unwrap();
        fd
    };
    // Claims 1 MiB rings in 12 KiB; a capacity that is no power of two;
    // an empty memfd; a sparse memfd larger than any ring area.
    let short = ring_fd(3 * PAGE, 1 << 20);
    let odd = ring_fd(5 * PAGE, RING + 100);
    let empty = sealed(0);
    let huge = ring_fd(3 << 30, RING);
    let no_magic = sealed(3 * PAGE);
    let ragged = ring_fd(1024 + 2 * RING, RING);
    let ring = good_ring();
    // The controller's descriptors, from here on.
    let baseline = open_fds();

    let cases: Vec<(&str, Vec<u8>, Vec<BorrowedFd<'_>>, &str)> = vec![
        ("no descriptors", hello(1), vec![], "descriptors"),
        (
            "two descriptors",
            hello(1),
            vec![ring.as_fd(), up.as_fd()],
            "descriptors",
        ),
        (
            "eight descriptors",
            hello(1),
            vec![ring.as_fd(); 8],
            "more than 4",
        ),
        (
            "four descriptors",
            hello(1),
            vec![ring.as_fd(), up.as_fd(), down.as_fd(), up.as_fd()],
            "descriptors",
        ),
        (
            "a pipe as rings",
            hello(1),
            vec![pipe_r.as_fd(), up.as_fd(), down.as_fd()],
            "memfd",
        ),
        (
            "/dev/zero as rings",
            hello(1),
            vec![devzero.as_fd(), up.as_fd(), down.as_fd()],
            "memfd",
        ),
        (
            "a socket as rings",
            hello(1),
            vec![sock_a.as_fd(), up.as_fd(), down.as_fd()],
            "memfd",
        ),
        (
            "a directory as rings",
            hello(1),
            vec![dir.as_fd(), up.as_fd(), down.as_fd()],
            "memfd",
        ),
        (
            "an unsealed memfd",
            hello(1),
            vec![unsealed.as_fd(), up.as_fd(), down.as_fd()],
            "F_SEAL_SHRINK|F_SEAL_GROW",
        ),
        (
            "a memfd that may still shrink",
            hello(1),
            vec![grow_only.as_fd(), up.as_fd(), down.as_fd()],
            "F_SEAL_SHRINK|F_SEAL_GROW",
        ),
        (
            "a memfd without sealing",
            hello(1),
            vec![no_sealing.as_fd(), up.as_fd(), down.as_fd()],
            "memfd",
        ),
        (
            "rings larger than their memfd",
            hello(1),
            vec![short.as_fd(), up.as_fd(), down.as_fd()],
            "capacity",
        ),
        (
            "a memfd of no whole number of pages",
            hello(1),
            vec![ragged.as_fd(), up.as_fd(), down.as_fd()],
            "needed",
        ),
        (
            "a capacity that is no power of two",
            hello(1),
            vec![odd.as_fd(), up.as_fd(), down.as_fd()],
            "capacity",
        ),
        (
            "an empty memfd",
            hello(1),
            vec![empty.as_fd(), up.as_fd(), down.as_fd()],
            "0 bytes",
        ),
        (
            "a 3 GiB memfd",
            hello(1),
            vec![huge.as_fd(), up.as_fd(), down.as_fd()],
            "cannot map",
        ),
        (
            "no ring header",
            hello(1),
            vec![no_magic.as_fd(), up.as_fd(), down.as_fd()],
            "ring header",
        ),
        (
            "a memfd as eventfd",
            hello(1),
            vec![ring.as_fd(), ring.as_fd(), down.as_fd()],
            "eventfd",
        ),
        (
            "a pipe as eventfd",
            hello(1),
            vec![ring.as_fd(), up.as_fd(), pipe_r.as_fd()],
            "eventfd",
        ),
        (
            "another version",
            hello(7),
            vec![ring.as_fd(), up.as_fd(), down.as_fd()],
            "version",
        ),
        (
            "a register first",
            register(0, PAGE, 0),
            vec![ring.as_fd()],
            "hello",
        ),
        (
            "a 4 GiB message",
            [u32::MAX.to_le_bytes().as_slice(), &[HELLO]].concat(),
            vec![],
            "length",
        ),
        ("an unknown kind", msg(99, &[0; 4]), vec![], "kind"),
        ("a short hello", msg(HELLO, &[1]), vec![], "length"),
    ];
    for (what, bytes, fds, expect) in &cases {
        let s = UnixStream::connect(node.local_socket().unwrap()).unwrap();
        send_raw(&s, bytes, fds);
        let err = answer(&s).unwrap_or_else(|| panic!("{what}: closed without a reason"));
        assert!(
            err.contains(expect),
            "{what}: the refusal {err:?} does not say {expect:?}"
        );
        assert!(closed(&s), "{what}: the connection stays open");
    }

    // Descriptors piled up one byte at a time, never making a message.
    let s = UnixStream::connect(node.local_socket().unwrap()).unwrap();
    let head = 4096u32.to_le_bytes();
    for b in head {
        if send_raw_checked(&s, &[b], &[up.as_fd(); 4]).is_err() {
            break;
        }
    }
    let err = answer(&s).expect("a reason");
    assert!(err.contains("descriptors"), "{err}");
    assert!(closed(&s));
    drop(s);

    by.progress();
    drop(cases);
    no_leak(baseline);
    // A well-behaved newcomer is served as before.
    let late = attach_local(&node, "hellos-late");
    late.register(PAGE).unwrap();
    drop(late);
    by.finish();
}

/// `send_raw`, but a closed socket is an error rather than a panic.
fn send_raw_checked(s: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ()> {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    }
    rustix::net::sendmsg(s, &[IoSlice::new(bytes)], &mut control, SendFlags::NOSIGNAL)
        .map(|_| ())
        .map_err(|_| ())
}

#[test]
fn hostile_registrations_are_refused_and_regions_hold_no_descriptors() {
    let _serial = serial();
    let node = controller("regions", |_| {});
    let by = Bystanders::start(&node, "regions");
    let baseline = open_fds();

    let p = RawProcess::attach(&node, "raw-regions");
    wait_until(|| process_conns(&node) == 3.0, "the raw process to attach");
    let region = sealed(4 * PAGE);
    let unsealed = memfd(4 * PAGE, SealFlags::empty());
    let (pipe_r, _pipe_w) = rustix::pipe::pipe().unwrap();
    let devzero = std::fs::File::open("/dev/zero").unwrap();
    let write_sealed = memfd(PAGE, SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE);
    let future_sealed = memfd(
        PAGE,
        SealFlags::SHRINK | SealFlags::GROW | SealFlags::FUTURE_WRITE,
    );
    let refused: Vec<(&str, Vec<u8>, Vec<BorrowedFd<'_>>, &str)> = vec![
        (
            "a pipe",
            register(0x10000, PAGE, 0),
            vec![pipe_r.as_fd()],
            "memfd",
        ),
        (
            "/dev/zero",
            register(0x10000, PAGE, 0),
            vec![devzero.as_fd()],
            "memfd",
        ),
        (
            "an unsealed memfd",
            register(0x10000, PAGE, 0),
            vec![unsealed.as_fd()],
            "F_SEAL",
        ),
        (
            "a memfd sealed against writes",
            register(0x10000, PAGE, 0),
            vec![write_sealed.as_fd()],
            "mapping the memfd",
        ),
        (
            "a memfd sealed against future writes",
            register(0x10000, PAGE, 0),
            vec![future_sealed.as_fd()],
            "mapping the memfd",
        ),
        (
            "more than the memfd holds",
            register(0x10000, 4 * PAGE + 1, 0),
            vec![region.as_fd()],
            "needed",
        ),
        (
            "a window past the memfd's end",
            register(0x10000, PAGE, 4 * PAGE),
            vec![region.as_fd()],
            "needed",
        ),
        (
            "an offset past every size",
            register(0x10000, PAGE, u64::MAX - 4095),
            vec![region.as_fd()],
            "needed",
        ),
        (
            "a misaligned offset",
            register(0x10000, PAGE, 12),
            vec![region.as_fd()],
            "page-aligned",
        ),
        (
            "zero bytes",
            register(0x10000, 0, 0),
            vec![region.as_fd()],
            "0 bytes",
        ),
        (
            "2^64 - 1 bytes",
            register(0x10000, u64::MAX, 0),
            vec![region.as_fd()],
            "cannot map",
        ),
        (
            "an address range that wraps",
            register(u64::MAX - 100, PAGE, 0),
            vec![region.as_fd()],
            "wraps",
        ),
        (
            "an unknown region",
            msg(UNREGISTER, &0x777u64.to_le_bytes()),
            vec![],
            "no region",
        ),
    ];
    for (what, bytes, fds, expect) in &refused {
        let err = p.ask(bytes, fds).expect("an answer");
        assert!(
            err.contains(expect),
            "{what}: the refusal {err:?} does not say {expect:?}"
        );
    }
    drop(refused);
    // A huge-page memfd (where the kernel has hugetlbfs): holes punched in
    // it could fault the controller's mapping.
    if let Ok(h) = rustix::fs::memfd_create(
        "huge",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING | MemfdFlags::HUGETLB,
    ) {
        rustix::fs::ftruncate(&h, 2 << 20).unwrap();
        rustix::fs::fcntl_add_seals(&h, SealFlags::SHRINK | SealFlags::GROW).unwrap();
        let err = p.ask(&register(0x10000, 2 << 20, 0), &[h.as_fd()]).unwrap();
        assert!(err.contains("MFD_HUGETLB"), "{err}");
    }
    // A region twice, and overlapping.
    assert_eq!(
        p.ask(&register(0x10000, 2 * PAGE, 0), &[region.as_fd()])
            .as_deref(),
        Some("")
    );
    for (addr, what) in [
        (0x10000, "the same address"),
        (0x11000, "inside it"),
        (0xf000, "below it"),
    ] {
        let err = p
            .ask(&register(addr, 2 * PAGE, 0), &[region.as_fd()])
            .unwrap();
        assert!(err.contains("overlaps"), "{what}: {err}");
    }
    // Many regions, all one memfd: they cost the controller mappings but
    // no descriptors, and the per-process bound stops them.
    let fds_before = open_fds();
    let mut n = 1;
    let err = loop {
        let e = p
            .ask(&register(0x100_0000 + n * PAGE, PAGE, 0), &[region.as_fd()])
            .unwrap();
        if !e.is_empty() {
            break e;
        }
        n += 1;
        assert!(n <= 100_000, "no bound on regions");
    };
    assert!(err.contains("regions per process"), "{err}");
    assert!(
        open_fds() < fds_before + 16,
        "{n} regions hold {} descriptors",
        open_fds() - fds_before
    );
    by.progress();
    // Wrong descriptor counts close the connection, with the reason.
    let err = p.ask(&register(0x20000, PAGE, 0), &[]).expect("a reason");
    assert!(err.contains("descriptors"), "{err}");
    assert!(closed(&p.sock));
    let q = RawProcess::attach(&node, "raw-regions-2");
    let err = q
        .ask(
            &register(0x20000, PAGE, 0),
            &[region.as_fd(), region.as_fd()],
        )
        .expect("a reason");
    assert!(err.contains("descriptors"), "{err}");
    assert!(closed(&q.sock));

    drop((p, q));
    wait_until(|| process_conns(&node) == 2.0, "the raw processes to go");
    by.progress();
    drop(region);
    drop(unsealed);
    drop((pipe_r, _pipe_w, devzero, write_sealed, future_sealed));
    no_leak(baseline);
    by.finish();
}

#[test]
fn connections_that_never_say_hello_are_bounded_and_timed_out() {
    let _serial = serial();
    // A long attach timeout: connections beyond the bound must be closed
    // at once, not when it expires.
    let node = controller("slowloris", |c| c.attach_timeout = Duration::from_secs(60));
    let by = Bystanders::start(&node, "slowloris");
    let baseline = open_fds();
    let hostile: Vec<UnixStream> = (0..100)
        .map(|_| {
            let s = UnixStream::connect(node.local_socket().unwrap()).unwrap();
            // Three bytes of a header: never a whole message.
            send_raw(&s, &[9, 0, 0], &[]);
            s
        })
        .collect();
    // Connections beyond the bound are closed at once (the attach
    // timeout is a minute away).
    for s in &hostile {
        s.set_nonblocking(true).unwrap();
    }
    let open = || {
        hostile
            .iter()
            .filter(|s| {
                matches!((&**s).read(&mut [0u8; 16]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            })
            .count()
    };
    wait_until(
        || open() <= fractos_hosted::MAX_PENDING_LOCAL,
        "connections beyond the bound to be closed",
    );
    by.progress();
    drop(hostile);
    // Their slots come back once they are gone.
    wait_until(
        || {
            Process::attach_local(
                node.local_socket().unwrap(),
                "slowloris-late",
                token("slowloris-late"),
                opts(),
            )
            .is_ok()
        },
        "a newcomer to attach",
    );
    wait_until(|| process_conns(&node) == 2.0, "the newcomer to leave");
    no_leak(baseline);
    by.finish();
}

#[test]
fn a_silent_connection_is_closed_after_the_attach_timeout() {
    let _serial = serial();
    let node = controller("silent", |c| c.attach_timeout = Duration::from_millis(300));
    let baseline = open_fds();
    let s = UnixStream::connect(node.local_socket().unwrap()).unwrap();
    let up = eventfd();
    send_raw(&s, &[9], &[up.as_fd(); 3]);
    assert!(
        closed(&s),
        "the controller closes a connection without a hello"
    );
    drop((s, up));
    no_leak(baseline);
}

#[test]
fn impossible_rings_close_only_their_own_channel() {
    let _serial = serial();
    let node = controller("rings", |_| {});
    let by = Bystanders::start(&node, "rings");
    let baseline = open_fds();
    type Attack = fn(&mut RawProcess);
    let attacks: [(&str, Attack); 6] = [
        ("up head at 2^64 - 1", |p| {
            put_u64(&p.ring, 256, u64::MAX);
            kick(&p.up);
        }),
        ("up head one past the capacity", |p| {
            put_u64(&p.ring, 256, p.head + RING + 1);
            kick(&p.up);
        }),
        ("up head moved backwards", |p| {
            put_u64(&p.ring, 256, p.head.wrapping_sub(1));
            kick(&p.up);
        }),
        ("down tail 2^63 ahead", |p| {
            // The controller notices when it next sends: make it answer.
            put_u64(&p.ring, 512 + 64, u64::MAX / 2);
            let mut f = Vec::new();
            ProcessMsg::Lookup {
                op: 1,
                name: b"nothing".to_vec(),
                wait_ms: 0,
            }
            .encode(&mut f);
            p.send_up(&f);
        }),
        ("a frame declaring 4 GiB", |p| {
            p.send_up(&u32::MAX.to_le_bytes())
        }),
        ("a frame of garbage", |p| {
            p.send_up(&[
                16, 0, 0, 0, 0xff, 0xfe, 0xfd, 0xfc, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
            ])
        }),
    ];
    for (what, attack) in attacks {
        let mut p = RawProcess::attach(&node, "raw-rings");
        wait_until(|| process_conns(&node) == 3.0, "the raw process to attach");
        p.consumed();
        attack(&mut p);
        assert!(closed(&p.sock), "{what}: the channel stays open");
        wait_until(|| process_conns(&node) == 2.0, "the raw channel to go");
        by.progress();
    }
    no_leak(baseline);
    by.finish();
}

/// A process that asks the controller (not the SDK) for capabilities over
/// windows it never registered, or that straddle a region's end: copies
/// through them fault, for it and for anyone it hands them to; windows
/// ending exactly at the region's end copy.
#[test]
fn capabilities_past_registered_memory_fault_and_hurt_no_one() {
    let _serial = serial();
    let node = controller("windows", |_| {});
    let by = Bystanders::start(&node, "windows");
    let mut p = RawProcess::attach(&node, "raw-windows");
    match p.next_msg() {
        ControllerMsg::Attached { .. } => {}
        other => panic!("not attached: {other:?}"),
    }
    let region = sealed(PAGE);
    put(&region, PAGE - 1, b"z");
    const BASE: u64 = 0x10000;
    assert_eq!(
        p.ask(&register(BASE, PAGE, 0), &[region.as_fd()])
            .as_deref(),
        Some("")
    );
    let rw = Rights::READ_WRITE;
    let whole = p.memory(1, BASE, PAGE, rw);
    let last = p.memory(2, BASE + PAGE - 1, 1, rw);
    let first = p.memory(3, BASE, 1, rw);
    let straddle = p.memory(4, BASE + PAGE - 1, 2, rw);
    let nowhere = p.memory(5, 0x90_0000, PAGE, rw);
    let below = p.memory(6, BASE - 1, 2, rw);
    let huge = p.memory(7, BASE, u64::MAX - BASE, rw);
    let two = p.memory(8, BASE, 2, rw);
    let mut op = 100;
    let mut copy = |p: &mut RawProcess, src: Handle, dst: Handle| {
        op += 1;
        p.call(
            op,
            ProcessMsg::Copy {
                op,
                src,
                dst,
                completion: None,
            },
        )
    };
    for (what, src, dst) in [
        ("from a straddling window", straddle, whole),
        ("into a straddling window", two, straddle),
        ("from unregistered memory", nowhere, whole),
        ("into unregistered memory", whole, nowhere),
        ("from below the region", below, whole),
        ("into below the region", first, below),
        ("through a 2^64-byte window", huge, huge),
    ] {
        let r = copy(&mut p, src, dst);
        assert_eq!(r, Err(ErrorCode::MemoryFault), "{what}");
    }
    // The last byte of the region is reachable, and lands at its start.
    assert_eq!(copy(&mut p, last, first), Ok(Reply::Done));
    let mut b = [0u8; 1];
    rustix::io::pread(&region, &mut b, 0).unwrap();
    assert_eq!(&b, b"z");
    // A bystander handed the straddling window faults too.
    op += 1;
    assert_eq!(
        p.call(
            op,
            ProcessMsg::Publish {
                op,
                name: b"windows/straddle".to_vec(),
                cap: straddle,
            }
        ),
        Ok(Reply::Done)
    );
    let victim = attach_local(&node, "windows-victim");
    let d = victim
        .lookup("windows/straddle", WAIT)
        .unwrap()
        .as_memory()
        .unwrap();
    let r = victim.register_vec(vec![1, 2]).unwrap();
    let s = victim.memory_create(&r, 0, 2, Rights::READ).unwrap();
    let e = victim.copy(&s, &d, None).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::MemoryFault), "{e}");
    by.progress();
    by.finish();
}
