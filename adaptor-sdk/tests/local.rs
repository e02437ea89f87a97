//! Local channels against a real hosted controller: rings in a sealed
//! memfd, eventfd wake-ups, regions mapped by the controller, one-sided
//! copies, and processes that write garbage into their shared memory.

mod common;

use std::time::{Duration, Instant};

use common::*;
use fractos_hosted::{spawn, HostedConfig, Running};
use fractos_sdk::wire::Rights;
use fractos_sdk::{ErrorCode, NodeId, Process};

fn local_controller(tag: &str) -> Running {
    let mut c = HostedConfig::local(NodeId(1), KEY);
    c.local_socket = Some(socket_path(tag));
    spawn(c).expect("controller starts")
}

fn metric(node: &Running, name: &str) -> f64 {
    let text = node.metrics_text().unwrap();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn wait_until(mut f: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn local_processes_invoke_and_copy_through_shared_memory() {
    let node = local_controller("basic");
    let a = attach_local(&node, "a");
    let b = attach_local(&node, "b");
    assert_eq!(a.node(), NodeId(1));

    // Invoke across two local channels, answered through a continuation.
    let req = b.request_create(7, &[], &[]).unwrap();
    b.publish("b/req", req).unwrap();
    let r = a.lookup("b/req", WAIT).unwrap().as_request().unwrap();
    for i in 0..200u8 {
        a.invoke(&r, &[i], &[]).unwrap();
        let inv = b.next_invocation_timeout(WAIT).unwrap();
        assert_eq!((inv.tag, inv.imms.as_slice()), (7, &[i][..]));
    }

    // A copy of 3 MiB + 5 bytes between two local processes: one-sided.
    let n = (3 << 20) + 5;
    let src = a
        .register_vec((0..n).map(|i| (i * 7 % 251) as u8).collect())
        .unwrap();
    let dst = b.register(n as u64).unwrap();
    let s = a.memory_create(&src, 0, n as u64, Rights::READ).unwrap();
    let d = b.memory_create(&dst, 0, n as u64, Rights::WRITE).unwrap();
    b.publish("b/dst", d).unwrap();
    let d_at_a = a.lookup("b/dst", WAIT).unwrap().as_memory().unwrap();
    let before = metric(&node, "fractos_node_direct_memory_bytes_total");
    a.copy(&s, &d_at_a, None).unwrap();
    assert_eq!(dst.to_vec(), src.to_vec());
    let moved = metric(&node, "fractos_node_direct_memory_bytes_total") - before;
    assert_eq!(moved, 2.0 * n as f64, "read once, written once, directly");

    // An unregistered region is gone for the controller at once.
    assert!(b.unregister(&dst));
    let e = a.copy(&s, &d_at_a, None).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::MemoryFault), "{e}");

    // A process that exits is noticed (its socket ends).
    let gone = metric(
        &node,
        "fractos_node_connections{node=\"1\",kind=\"process\"}",
    );
    assert_eq!(gone, 2.0);
    b.close();
    wait_until(
        || {
            metric(
                &node,
                "fractos_node_connections{node=\"1\",kind=\"process\"}",
            ) == 1.0
        },
        "the closed process to leave",
    );
    let e = a.invoke(&r, &[], &[]).unwrap_err();
    assert!(e.code().is_some(), "{e}");
}

#[test]
fn an_idle_local_channel_sleeps_and_wakes() {
    let node = local_controller("idle");
    let a = attach_local(&node, "idle-a");
    let b = attach_local(&node, "idle-b");
    let req = b.request_create(1, &[], &[]).unwrap();
    b.publish("idle/req", req).unwrap();
    let r = a.lookup("idle/req", WAIT).unwrap().as_request().unwrap();
    // Both sides and the controller go to sleep between these.
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(30));
        a.invoke(&r, &[], &[]).unwrap();
        b.next_invocation_timeout(WAIT).unwrap();
    }
}

#[test]
fn local_and_tcp_processes_share_a_controller() {
    let node = local_controller("mixed");
    let l = attach_local(&node, "local");
    let t = Process::attach(node.process_addr(), "tcp", token("tcp"), opts()).unwrap();
    let n = 200_000u64;
    let src = t.register_vec(vec![9; n as usize]).unwrap();
    let dst = l.register(n).unwrap();
    let s = t.memory_create(&src, 0, n, Rights::READ).unwrap();
    let d = l.memory_create(&dst, 0, n, Rights::WRITE).unwrap();
    l.publish("m/dst", d).unwrap();
    let d_at_t = t.lookup("m/dst", WAIT).unwrap().as_memory().unwrap();
    t.copy(&s, &d_at_t, None).unwrap();
    assert_eq!(dst.to_vec(), vec![9; n as usize]);
}

// ------------------------------------------------------------ hostile

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use fractos_sdk::shm::local::LocalMsg;
use fractos_sdk::shm::{recv_with_fds, send_with_fds, EventFd, Mapping};
use fractos_sdk::wire::ProcessMsg;
use fractos_transport::ring::{ring_area_len, RingEndpoint, SharedMemory, RING_MIN};
use fractos_transport::Kick;

/// Sends `msg` with `fds` and returns the controller's `Ack` error
/// (empty: accepted).
fn ask(s: &UnixStream, msg: &LocalMsg, fds: &[BorrowedFd<'_>]) -> String {
    let mut out = Vec::new();
    msg.encode(&mut out);
    send_with_fds(s.as_fd(), &out, fds).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((LocalMsg::Ack { error, .. }, _)) = LocalMsg::decode(&buf).unwrap() {
            return error;
        }
        let n = recv_with_fds(s.as_fd(), &mut chunk, &mut Vec::new()).unwrap();
        assert!(n > 0, "the controller hung up instead of answering");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A memfd that is not sealed at all, of `len` bytes.
fn unsealed(len: u64) -> OwnedFd {
    use rustix::fs::{ftruncate, memfd_create, MemfdFlags};
    let fd = memfd_create("loose", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
    ftruncate(&fd, len).unwrap();
    fd
}

/// A raw local client: rings set up by hand, the hello sent.
struct Raw {
    sock: UnixStream,
    mem: Mapping,
    ring: RingEndpoint<Mapping>,
    up: EventFd,
    _down: EventFd,
}

fn raw_hello(node: &Running) -> Raw {
    let sock = UnixStream::connect(node.local_socket().unwrap()).unwrap();
    let mem = Mapping::create("raw", ring_area_len(RING_MIN)).unwrap();
    let ring = RingEndpoint::init(mem.clone(), 0, RING_MIN).unwrap();
    let (up, down) = (EventFd::new().unwrap(), EventFd::new().unwrap());
    let err = ask(
        &sock,
        &LocalMsg::Hello { version: 1 },
        &[mem.fd(), up.fd(), down.fd()],
    );
    assert_eq!(err, "");
    Raw {
        sock,
        mem,
        ring,
        up,
        _down: down,
    }
}

#[test]
fn unsealed_and_short_memfds_are_refused_with_the_reason() {
    let node = local_controller("seals");
    // Rings in an unsealed memfd.
    let sock = UnixStream::connect(node.local_socket().unwrap()).unwrap();
    let loose = unsealed(ring_area_len(RING_MIN) as u64);
    let (up, down) = (EventFd::new().unwrap(), EventFd::new().unwrap());
    let err = ask(
        &sock,
        &LocalMsg::Hello { version: 1 },
        &[loose.as_fd(), up.fd(), down.fd()],
    );
    assert!(err.contains("F_SEAL_SHRINK|F_SEAL_GROW"), "{err}");
    // A file that is no memfd at all.
    let sock = UnixStream::connect(node.local_socket().unwrap()).unwrap();
    let file = std::fs::File::open("/proc/self/exe").unwrap();
    let err = ask(
        &sock,
        &LocalMsg::Hello { version: 1 },
        &[file.as_fd(), up.fd(), down.fd()],
    );
    assert!(err.contains("memfd"), "{err}");
    // Eventfds that are not eventfds.
    let sock = UnixStream::connect(node.local_socket().unwrap()).unwrap();
    let m = Mapping::create("r", ring_area_len(RING_MIN)).unwrap();
    RingEndpoint::init(m.clone(), 0, RING_MIN).unwrap();
    let err = ask(
        &sock,
        &LocalMsg::Hello { version: 1 },
        &[m.fd(), m.fd(), down.fd()],
    );
    assert!(err.contains("eventfd"), "{err}");

    // Regions: unsealed, shorter than claimed, misaligned, overlapping.
    let raw = raw_hello(&node);
    let reg = |addr, len, off, fd: BorrowedFd<'_>| {
        ask(
            &raw.sock,
            &LocalMsg::Register {
                addr,
                len,
                file_offset: off,
            },
            &[fd],
        )
    };
    let loose = unsealed(8192);
    assert!(reg(0x10000, 4096, 0, loose.as_fd()).contains("F_SEAL"));
    let r = Mapping::create("region", 8192).unwrap();
    assert!(reg(0x10000, 8193, 0, r.fd()).contains("needed"));
    assert!(reg(0x10000, 4096, 8192, r.fd()).contains("needed"));
    assert!(reg(0x10000, 10, 100, r.fd()).contains("page-aligned"));
    assert_eq!(reg(0x10000, 8192, 0, r.fd()), "");
    assert!(reg(0x11000, 10, 0, r.fd()).contains("overlaps"));
    assert!(reg(u64::MAX - 5, 10, 0, r.fd()).contains("wraps"));
    let err = ask(&raw.sock, &LocalMsg::Unregister { addr: 0x12345 }, &[]);
    assert!(err.contains("no region"), "{err}");
    assert_eq!(
        ask(&raw.sock, &LocalMsg::Unregister { addr: 0x10000 }, &[]),
        ""
    );
    // The controller is unharmed.
    let p = attach_local(&node, "after");
    p.register(10).unwrap();
}

#[test]
fn a_bad_token_or_no_attach_gets_the_socket_closed() {
    let mut c = HostedConfig::local(NodeId(1), KEY);
    c.local_socket = Some(socket_path("timeout"));
    c.attach_timeout = Duration::from_millis(300);
    let node = spawn(c).unwrap();
    let path = node.local_socket().unwrap();
    match Process::attach_local(path, "p", token("someone-else"), opts()) {
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::AuthFailed), "{e}"),
        Ok(_) => panic!("a wrong token attached"),
    }
    // Rings offered, but no attach through them: the node drops the
    // channel after the attach timeout and the socket is closed.
    let raw = raw_hello(&node);
    raw.sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 16];
    let n = recv_with_fds(raw.sock.as_fd(), &mut buf, &mut Vec::new()).unwrap();
    assert_eq!(n, 0, "the controller closes the socket");
    wait_until(
        || {
            metric(
                &node,
                "fractos_node_connections{node=\"1\",kind=\"process\"}",
            ) == 0.0
        },
        "the channel to go",
    );
}

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Two local processes and a TCP one keep invoking and copying while a
/// hostile local process flips random bytes of its rings, rewrites their
/// counters and kicks the controller. The controller must not panic or
/// touch anything outside the hostile mapping (either would kill this
/// test process, which hosts it), the bystanders must not notice, and
/// the hostile channel is closed.
#[test]
fn a_process_scribbling_over_its_rings_hurts_only_itself() {
    let node = local_controller("hostile");
    let a = attach_local(&node, "by-a");
    let b = attach_local(&node, "by-b");
    let t = Process::attach(node.process_addr(), "by-t", token("by-t"), opts()).unwrap();
    let req = b.request_create(3, &[], &[]).unwrap();
    b.publish("by/req", req).unwrap();
    let n = 256 * 1024;
    let dst = b.register(n).unwrap();
    let d = b.memory_create(&dst, 0, n, Rights::WRITE).unwrap();
    b.publish("by/dst", d).unwrap();

    let mut raw = raw_hello(&node);
    let mut attach = Vec::new();
    ProcessMsg::Attach {
        name: b"evil".to_vec(),
        token: token("evil"),
    }
    .encode(&mut attach);
    raw.ring.send(&attach).unwrap();
    raw.up.kick();
    let evil_region = Mapping::create("evil", 4096).unwrap();
    let err = ask(
        &raw.sock,
        &LocalMsg::Register {
            addr: 0x1_0000_0000,
            len: 4096,
            file_offset: 0,
        },
        &[evil_region.fd()],
    );
    assert_eq!(err, "");
    wait_until(
        || {
            metric(
                &node,
                "fractos_node_connections{node=\"1\",kind=\"process\"}",
            ) == 4.0
        },
        "the hostile process to connect",
    );

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scribbler = {
        let (mem, stop) = (raw.mem.clone(), stop.clone());
        let mut kick = raw.up.clone();
        std::thread::spawn(move || {
            let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
            let mut rounds = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let x = rng.next();
                match x % 4 {
                    // Counters and flags: any word of the control blocks.
                    0 => {
                        let word = 256 + (x as usize >> 8) % 96 * 8;
                        mem.store_u64(word, rng.next() % (RING_MIN * 3));
                    }
                    1 => mem.store_u64(256 + (x as usize >> 8) % 96 * 8, rng.next()),
                    // Data and header bytes.
                    _ => {
                        let at = (x as usize >> 8) % mem.len();
                        mem.write(at, &[(x >> 56) as u8]);
                    }
                }
                kick.kick();
                rounds += 1;
                if rounds % 64 == 0 {
                    std::thread::yield_now();
                }
            }
            rounds
        })
    };

    let r_a = a.lookup("by/req", WAIT).unwrap().as_request().unwrap();
    let r_t = t.lookup("by/req", WAIT).unwrap().as_request().unwrap();
    let d_a = a.lookup("by/dst", WAIT).unwrap().as_memory().unwrap();
    let src = a.register_vec(vec![0; n as usize]).unwrap();
    let s = a.memory_create(&src, 0, n, Rights::READ).unwrap();
    let started = Instant::now();
    let mut ops = 0u32;
    while started.elapsed() < Duration::from_millis(800) {
        a.invoke(&r_a, &[1], &[]).unwrap();
        t.invoke(&r_t, &[2], &[]).unwrap();
        for _ in 0..2 {
            b.next_invocation_timeout(WAIT).unwrap();
        }
        src.fill(ops as u8);
        a.copy(&s, &d_a, None).unwrap();
        assert!(dst.with_bytes(|d| d.iter().all(|&x| x == ops as u8)));
        ops += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = scribbler.join().unwrap();
    assert!(ops > 5 && rounds > 1000, "ops {ops}, scribbles {rounds}");
    // The hostile channel is closed; the bystanders go on.
    wait_until(
        || {
            metric(
                &node,
                "fractos_node_connections{node=\"1\",kind=\"process\"}",
            ) == 3.0
        },
        "the hostile channel to close",
    );
    a.invoke(&r_a, &[], &[]).unwrap();
    b.next_invocation_timeout(WAIT).unwrap();
    drop(raw);
    let late = attach_local(&node, "late");
    late.register(1).unwrap();
}

#[test]
fn inline_handlers_answer_over_local_channels() {
    let node = local_controller("inline");
    let a = attach_local(&node, "inline-a");
    let b = attach_local(&node, "inline-b");
    let ping = b.request_create(1, &[], &[]).unwrap();
    b.publish("inline/ping", ping).unwrap();
    let ping = a.lookup("inline/ping", WAIT).unwrap().as_request().unwrap();
    let pong = a.request_create(2, &[], &[]).unwrap();
    b.serve_inline(1, |p, inv| {
        let k = inv.request(0).expect("continuation");
        p.invoke(&k, &inv.imms, &[]).expect("pong");
        p.drop_cap(k).expect("drop");
    });
    for i in 0..200u8 {
        a.invoke(&ping, &[i], &[pong.into()]).unwrap();
        let inv = a.next_invocation_timeout(WAIT).unwrap();
        assert_eq!((inv.tag, inv.imms.as_slice()), (2, &[i][..]));
    }
    // B's application thread still gets its operations answered.
    b.publish("inline/more", b.request_create(3, &[], &[]).unwrap())
        .unwrap();
}
