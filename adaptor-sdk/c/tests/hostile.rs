//! The C boundary under abuse, through its Rust symbols: NULL in every
//! pointer, lengths and offsets that overflow, made-up, freed and
//! cross-type handles, handlers that call back into the library (including
//! the calls they must not make), and one process hammered from many
//! threads while another thread closes it. Every call must return a
//! status (a panic would be `FRACTOS_ERR_PANIC`, which no case accepts),
//! never hang (each risky call runs under a watchdog) and never touch
//! memory it was not given.

mod common;

use std::ffi::{c_void, CString};
use std::ptr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use fractos_c::fractos_status::{self, *};
use fractos_c::*;
use fractos_core::process_token;
use fractos_hosted::Running;

const WAIT: Duration = Duration::from_secs(20);

/// `s` is the error `want`, with a message.
#[track_caller]
fn refused(s: fractos_status, want: fractos_status, what: &str) {
    assert_eq!(s, want, "{what}: {}", last_error());
    assert!(!last_error().is_empty(), "{what}: no message");
}

fn attach_local(node: &Running, name: &str) -> *mut fractos_process {
    let path = CString::new(node.local_socket().unwrap().to_str().unwrap()).unwrap();
    let cname = CString::new(name).unwrap();
    let token = process_token(&KEY, name.as_bytes());
    let mut p = ptr::null_mut();
    // SAFETY: valid strings, a 32-byte token, an out-pointer.
    ok(unsafe {
        fractos_attach_local(
            path.as_ptr(),
            cname.as_ptr(),
            token.as_ptr(),
            ptr::null(),
            &mut p,
        )
    });
    p
}

fn register(p: *const fractos_process, len: u64) -> *mut fractos_region {
    let mut r = ptr::null_mut();
    // SAFETY: an out-pointer.
    ok(unsafe { fractos_register(p, len, &mut r) });
    r
}

fn request(p: *const fractos_process, tag: u64) -> fractos_cap {
    let mut out = fractos_cap::default();
    // SAFETY: no arrays, an out-pointer.
    ok(unsafe { fractos_request_create(p, tag, ptr::null(), 0, ptr::null(), 0, &mut out) });
    out
}

/// Runs `f` on another thread and fails the test if it does not return
/// within [`WAIT`] (a deadlock).
fn watchdog<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(WAIT)
        .unwrap_or_else(|_| panic!("{what}: no return within {WAIT:?} (deadlock)"))
}

/// A raw pointer that may cross threads (the library's handles are
/// numbers, safe to use from any thread).
#[derive(Clone, Copy)]
struct H<T>(*mut T);
// SAFETY: handles are opaque numbers checked by the library on every call.
unsafe impl<T> Send for H<T> {}

#[test]
fn null_pointers_and_overflowing_lengths_are_refused() {
    let node = controller(1, false);
    let p = attach(&node, "nulls", 1);
    let r = register(p, 8192);
    let mut cap = fractos_cap::default();
    let mut len = 0u64;
    let mut byte = [0u8; 16];
    let name = CString::new("x").unwrap();
    let rq = request(p, 1);
    // SAFETY: every pointer is NULL or valid for its call; the lengths lie
    // only where the library must refuse before reading.
    unsafe {
        refused(
            fractos_register(p, 4096, ptr::null_mut()),
            FRACTOS_ERR_NULL_POINTER,
            "register out",
        );
        refused(
            fractos_region_len(r, ptr::null_mut()),
            FRACTOS_ERR_NULL_POINTER,
            "region_len out",
        );
        refused(
            fractos_region_data(r, ptr::null_mut()),
            FRACTOS_ERR_NULL_POINTER,
            "region_data out",
        );
        refused(
            fractos_node_id(p, ptr::null_mut()),
            FRACTOS_ERR_NULL_POINTER,
            "node_id out",
        );
        refused(
            fractos_region_read(r, 0, ptr::null_mut(), 1),
            FRACTOS_ERR_NULL_POINTER,
            "read NULL buf",
        );
        refused(
            fractos_region_write(r, 0, ptr::null(), 1),
            FRACTOS_ERR_NULL_POINTER,
            "write NULL data",
        );
        ok(fractos_region_read(r, 0, ptr::null_mut(), 0));
        ok(fractos_region_write(r, 8192, ptr::null(), 0));
        for (off, n, what) in [
            (u64::MAX, 1, "offset 2^64-1"),
            (8192, 1, "one past the end"),
            (8191, 2, "straddling the end"),
            (1, usize::MAX, "length usize::MAX"),
            (u64::MAX - 3, 8, "offset + length wraps"),
        ] {
            let n = if n == usize::MAX {
                n
            } else {
                n.min(byte.len())
            };
            for (op, s) in [
                ("read", fractos_region_read(r, off, byte.as_mut_ptr(), n)),
                ("write", fractos_region_write(r, off, byte.as_ptr(), n)),
            ] {
                assert!(
                    matches!(s, FRACTOS_ERR_OUT_OF_RANGE | FRACTOS_ERR_INVALID_ARGUMENT),
                    "{op} {what}: {s:?} {}",
                    last_error()
                );
            }
        }
        for (off, n) in [(u64::MAX, 2), (8192, 1), (0, 0), (1, u64::MAX), (0, 8193)] {
            let s = fractos_memory_create(p, r, off, n, FRACTOS_RIGHT_READ, &mut cap);
            assert!(
                s != FRACTOS_OK && s != FRACTOS_ERR_PANIC,
                "memory_create [{off}, +{n}): {s:?}"
            );
        }
        refused(
            fractos_memory_create(p, r, 0, 1, FRACTOS_RIGHT_READ, ptr::null_mut()),
            FRACTOS_ERR_NULL_POINTER,
            "memory_create out",
        );
        refused(
            fractos_memory_create(p, ptr::null(), 0, 1, FRACTOS_RIGHT_READ, &mut cap),
            FRACTOS_ERR_NULL_POINTER,
            "memory_create region",
        );
        ok(fractos_memory_create(
            p,
            r,
            0,
            8192,
            FRACTOS_RIGHT_READ,
            &mut cap,
        ));
        let mem = cap;
        for (off, n) in [(u64::MAX, 2), (8192, 1), (1, u64::MAX), (0, 8193)] {
            let s = fractos_diminish(p, &mem, off, n, FRACTOS_RIGHT_READ, &mut cap);
            assert!(
                s != FRACTOS_OK && s != FRACTOS_ERR_PANIC,
                "diminish [{off}, +{n}): {s:?}"
            );
        }
        refused(
            fractos_diminish(p, ptr::null(), 0, 1, FRACTOS_RIGHT_READ, &mut cap),
            FRACTOS_ERR_NULL_POINTER,
            "diminish cap",
        );
        // Arrays: NULL with a length, absurd lengths (never read).
        refused(
            fractos_request_create(p, 1, ptr::null(), usize::MAX, ptr::null(), 0, &mut cap),
            FRACTOS_ERR_INVALID_ARGUMENT,
            "imms usize::MAX",
        );
        refused(
            fractos_request_create(p, 1, byte.as_ptr(), usize::MAX, ptr::null(), 0, &mut cap),
            FRACTOS_ERR_INVALID_ARGUMENT,
            "imms usize::MAX, real pointer",
        );
        refused(
            fractos_request_create(p, 1, ptr::null(), 0, ptr::null(), 3, &mut cap),
            FRACTOS_ERR_NULL_POINTER,
            "NULL caps with a count",
        );
        refused(
            fractos_request_create(p, 1, ptr::null(), 0, &mem, usize::MAX, &mut cap),
            FRACTOS_ERR_INVALID_ARGUMENT,
            "caps usize::MAX",
        );
        refused(
            fractos_invoke(p, &rq, ptr::null(), 0, &mem, usize::MAX),
            FRACTOS_ERR_INVALID_ARGUMENT,
            "invoke caps usize::MAX",
        );
        refused(
            fractos_derive(p, &rq, ptr::null(), usize::MAX, ptr::null(), 0, &mut cap),
            FRACTOS_ERR_INVALID_ARGUMENT,
            "derive imms usize::MAX",
        );
        refused(
            fractos_invoke(p, ptr::null(), ptr::null(), 0, ptr::null(), 0),
            FRACTOS_ERR_NULL_POINTER,
            "invoke NULL request",
        );
        refused(
            fractos_copy(p, ptr::null(), &mem, ptr::null()),
            FRACTOS_ERR_NULL_POINTER,
            "copy NULL src",
        );
        refused(
            fractos_copy(p, &mem, ptr::null(), ptr::null()),
            FRACTOS_ERR_NULL_POINTER,
            "copy NULL dst",
        );
        refused(
            fractos_revoke(p, ptr::null()),
            FRACTOS_ERR_NULL_POINTER,
            "revoke NULL",
        );
        refused(
            fractos_drop_cap(p, ptr::null()),
            FRACTOS_ERR_NULL_POINTER,
            "drop NULL",
        );
        refused(
            fractos_monitor(p, ptr::null(), &rq),
            FRACTOS_ERR_NULL_POINTER,
            "monitor NULL cap",
        );
        refused(
            fractos_monitor(p, &mem, ptr::null()),
            FRACTOS_ERR_NULL_POINTER,
            "monitor NULL notify",
        );
        refused(
            fractos_publish(p, ptr::null(), &mem),
            FRACTOS_ERR_NULL_POINTER,
            "publish NULL name",
        );
        refused(
            fractos_publish(p, name.as_ptr(), ptr::null()),
            FRACTOS_ERR_NULL_POINTER,
            "publish NULL cap",
        );
        refused(
            fractos_unpublish(p, ptr::null()),
            FRACTOS_ERR_NULL_POINTER,
            "unpublish NULL",
        );
        refused(
            fractos_lookup(p, ptr::null(), 0, &mut cap),
            FRACTOS_ERR_NULL_POINTER,
            "lookup NULL name",
        );
        refused(
            fractos_lookup(p, name.as_ptr(), 0, ptr::null_mut()),
            FRACTOS_ERR_NULL_POINTER,
            "lookup NULL out",
        );
        let bad_utf8 = [0xffu8, 0xfe, 0];
        let s = fractos_lookup(p, bad_utf8.as_ptr().cast(), 0, &mut cap);
        assert_eq!(s, FRACTOS_ERR_INVALID_ARGUMENT, "{}", last_error());
        let s = fractos_token_from_hex(bad_utf8.as_ptr().cast(), byte.as_mut_ptr());
        assert_eq!(s, FRACTOS_ERR_INVALID_ARGUMENT, "{}", last_error());
        refused(
            fractos_token_from_hex(name.as_ptr(), ptr::null_mut()),
            FRACTOS_ERR_NULL_POINTER,
            "token out",
        );
        // A name of a megabyte: refused or looked up, never a crash.
        let long = CString::new(vec![b'n'; 1 << 20]).unwrap();
        let s = fractos_lookup(p, long.as_ptr(), 0, &mut cap);
        assert!(s != FRACTOS_OK && s != FRACTOS_ERR_PANIC, "{s:?}");
        let s = fractos_publish(p, long.as_ptr(), &mem);
        assert!(s != FRACTOS_OK && s != FRACTOS_ERR_PANIC, "{s:?}");
        // Pipelined forms.
        let mut pend = ptr::null_mut();
        refused(
            fractos_start_copy(p, &mem, &mem, ptr::null(), ptr::null_mut()),
            FRACTOS_ERR_NULL_POINTER,
            "start_copy out",
        );
        refused(
            fractos_start_drop_cap(p, ptr::null(), &mut pend),
            FRACTOS_ERR_NULL_POINTER,
            "start_drop NULL",
        );
        refused(
            fractos_start_invoke(p, &rq, ptr::null(), usize::MAX, ptr::null(), 0, &mut pend),
            FRACTOS_ERR_INVALID_ARGUMENT,
            "start_invoke usize::MAX",
        );
        ok(fractos_start_drop_cap(p, &mem, &mut pend));
        refused(
            fractos_pending_wait(ptr::null_mut(), &mut cap),
            FRACTOS_ERR_NULL_POINTER,
            "pending_wait NULL",
        );
        ok(fractos_pending_wait(pend, ptr::null_mut()));
        refused(
            fractos_pending_wait(pend, &mut cap),
            FRACTOS_ERR_INVALID_HANDLE,
            "pending waited twice",
        );
        refused(
            fractos_pending_free(pend),
            FRACTOS_ERR_INVALID_HANDLE,
            "pending freed after wait",
        );
        // Invocation accessors.
        refused(
            fractos_next_invocation(p, 0, ptr::null_mut()),
            FRACTOS_ERR_NULL_POINTER,
            "next out",
        );
        ok(fractos_invoke(p, &rq, b"abc".as_ptr(), 3, ptr::null(), 0));
        let mut inv = ptr::null_mut();
        ok(fractos_next_invocation(p, 5000, &mut inv));
        let mut n = 0usize;
        refused(
            fractos_invocation_imms(inv, ptr::null_mut(), 0, ptr::null_mut()),
            FRACTOS_ERR_NULL_POINTER,
            "imms len out",
        );
        ok(fractos_invocation_imms(inv, ptr::null_mut(), 0, &mut n));
        assert_eq!(n, 3);
        refused(
            fractos_invocation_imms(inv, ptr::null_mut(), 5, &mut n),
            FRACTOS_ERR_NULL_POINTER,
            "imms NULL buf",
        );
        refused(
            fractos_invocation_imms(inv, byte.as_mut_ptr(), usize::MAX, &mut n),
            FRACTOS_ERR_INVALID_ARGUMENT,
            "imms usize::MAX",
        );
        let mut c = fractos_cap::default();
        refused(
            fractos_invocation_cap(inv, usize::MAX, &mut c),
            FRACTOS_ERR_UNEXPECTED_CAP,
            "cap usize::MAX",
        );
        refused(
            fractos_invocation_cap(inv, 0, ptr::null_mut()),
            FRACTOS_ERR_NULL_POINTER,
            "cap out",
        );
        refused(
            fractos_invocation_tag(inv, ptr::null_mut()),
            FRACTOS_ERR_NULL_POINTER,
            "tag out",
        );
        ok(fractos_invocation_free(inv));
        refused(
            fractos_invocation_tag(inv, &mut len),
            FRACTOS_ERR_INVALID_HANDLE,
            "freed invocation",
        );
        // Attach arguments.
        let mut q = ptr::null_mut();
        let token = [0u8; 32];
        refused(
            fractos_attach_tcp(
                ptr::null(),
                name.as_ptr(),
                token.as_ptr(),
                ptr::null(),
                &mut q,
            ),
            FRACTOS_ERR_NULL_POINTER,
            "attach addr",
        );
        refused(
            fractos_attach_tcp(
                name.as_ptr(),
                ptr::null(),
                token.as_ptr(),
                ptr::null(),
                &mut q,
            ),
            FRACTOS_ERR_NULL_POINTER,
            "attach name",
        );
        refused(
            fractos_attach_tcp(
                name.as_ptr(),
                name.as_ptr(),
                ptr::null(),
                ptr::null(),
                &mut q,
            ),
            FRACTOS_ERR_NULL_POINTER,
            "attach token",
        );
        refused(
            fractos_attach_local(
                ptr::null(),
                name.as_ptr(),
                token.as_ptr(),
                ptr::null(),
                &mut q,
            ),
            FRACTOS_ERR_NULL_POINTER,
            "attach_local path",
        );
        let not_a_socket = CString::new("/proc/self/exe").unwrap();
        let s = fractos_attach_local(
            not_a_socket.as_ptr(),
            name.as_ptr(),
            token.as_ptr(),
            ptr::null(),
            &mut q,
        );
        assert!(
            s != FRACTOS_OK && s != FRACTOS_ERR_PANIC && q.is_null(),
            "{s:?}"
        );
        let mut opts = fractos_attach_options_default();
        opts.op_timeout_ms = 0;
        let addr = CString::new(node.process_addr().to_string()).unwrap();
        let s = fractos_attach_tcp(addr.as_ptr(), name.as_ptr(), token.as_ptr(), &opts, &mut q);
        assert!(
            s != FRACTOS_OK && s != FRACTOS_ERR_PANIC && q.is_null(),
            "{s:?}"
        );
        refused(
            fractos_set_timeout(p, 0),
            FRACTOS_ERR_INVALID_ARGUMENT,
            "timeout 0",
        );
        ok(fractos_set_timeout(p, u32::MAX));
    }
    // Registering absurd sizes fails cleanly.
    for n in [0, u64::MAX, u64::MAX / 2, 1 << 62] {
        let mut r2 = ptr::null_mut();
        // SAFETY: an out-pointer.
        let s = unsafe { fractos_register(p, n, &mut r2) };
        assert!(
            s != FRACTOS_OK && s != FRACTOS_ERR_PANIC && r2.is_null(),
            "register {n}: {s:?}"
        );
    }
    ok(fractos_region_free(r));
    ok(fractos_close(p));
}

#[test]
fn made_up_freed_and_cross_type_handles_are_refused() {
    let node = controller(1, false);
    let p = attach(&node, "handles", 1);
    let r = register(p, 4096);
    let rq = request(p, 9);
    // SAFETY: no arrays; an out-pointer.
    ok(unsafe { fractos_invoke(p, &rq, ptr::null(), 0, ptr::null(), 0) });
    let mut inv = ptr::null_mut();
    // SAFETY: an out-pointer.
    ok(unsafe { fractos_next_invocation(p, 5000, &mut inv) });
    let mut pend = ptr::null_mut();
    // SAFETY: a capability and an out-pointer.
    ok(unsafe { fractos_start_drop_cap(p, &rq, &mut pend) });
    let addrs: Vec<usize> = vec![
        1,
        0x1000,
        0xdead_beef,
        usize::MAX,
        usize::MAX - 7,
        p.addr(),
        r.addr(),
        inv.addr(),
        pend.addr(),
        (&rq as *const fractos_cap).addr(),
    ];
    let mut len = 0u64;
    let mut node_id = 0u32;
    let mut n = 0usize;
    let mut c = fractos_cap::default();
    for a in addrs {
        let as_p = ptr::without_provenance_mut::<fractos_process>(a);
        let as_r = ptr::without_provenance_mut::<fractos_region>(a);
        let as_i = ptr::without_provenance_mut::<fractos_invocation>(a);
        let as_pend = ptr::without_provenance_mut::<fractos_pending>(a);
        let bad = FRACTOS_ERR_INVALID_HANDLE;
        // SAFETY: the handles are numbers the library looks up, never
        // dereferences; every other pointer is valid.
        unsafe {
            if a != p.addr() {
                refused(fractos_node_id(as_p, &mut node_id), bad, "node_id");
                refused(
                    fractos_register(as_p, 1, &mut ptr::null_mut()),
                    bad,
                    "register",
                );
                refused(
                    fractos_invoke(as_p, &rq, ptr::null(), 0, ptr::null(), 0),
                    bad,
                    "invoke",
                );
                refused(fractos_set_timeout(as_p, 10), bad, "set_timeout");
                refused(fractos_unserve(as_p, 1), bad, "unserve");
                refused(fractos_dispatch(as_p, 0, ptr::null_mut()), bad, "dispatch");
                assert!(!fractos_is_connected(as_p));
                refused(fractos_close(as_p), bad, "close");
            }
            if a != r.addr() {
                refused(fractos_region_len(as_r, &mut len), bad, "region_len");
                refused(fractos_region_free(as_r), bad, "region_free");
                refused(fractos_unregister(p, as_r), bad, "unregister");
                refused(
                    fractos_memory_create(p, as_r, 0, 1, FRACTOS_RIGHT_READ, &mut c),
                    bad,
                    "memory_create",
                );
            }
            if a != inv.addr() {
                refused(
                    fractos_invocation_imms(as_i, ptr::null_mut(), 0, &mut n),
                    bad,
                    "imms",
                );
                refused(fractos_invocation_free(as_i), bad, "invocation_free");
                refused(fractos_invocation_drop_caps(p, as_i), bad, "drop_caps");
            }
            if a != pend.addr() {
                refused(fractos_pending_free(as_pend), bad, "pending_free");
                refused(fractos_pending_wait(as_pend, &mut c), bad, "pending_wait");
            }
        }
    }
    // Capabilities that name nothing, or lie about their kind.
    let mut fake = rq;
    fake.handle = u32::MAX;
    // SAFETY: capabilities by pointer.
    let s = unsafe { fractos_invoke(p, &fake, ptr::null(), 0, ptr::null(), 0) };
    assert_eq!(s, FRACTOS_ERR_BAD_HANDLE, "{}", last_error());
    let mut lying = rq;
    lying.kind = 77;
    // SAFETY: capabilities by pointer.
    let s = unsafe { fractos_invoke(p, &lying, ptr::null(), 0, ptr::null(), 0) };
    assert!(
        matches!(s, FRACTOS_ERR_INVALID_ARGUMENT | FRACTOS_ERR_WRONG_TYPE),
        "{s:?}"
    );
    ok(fractos_invocation_free(inv));
    ok(fractos_pending_free(pend));
    ok(fractos_region_free(r));
    ok(fractos_close(p));
    // Everything of a closed process is refused, not dereferenced.
    // SAFETY: an out-pointer.
    refused(
        unsafe { fractos_node_id(p, &mut node_id) },
        FRACTOS_ERR_INVALID_HANDLE,
        "closed",
    );
}

// ------------------------------------------------ re-entrant handlers

/// What the re-entrant handler did, for the test to check.
struct Reentry {
    /// The Request the handler invokes (its own tag 2), and a flag for
    /// what it tries.
    echo: fractos_cap,
    mode: AtomicU32,
    statuses: std::sync::Mutex<Vec<(&'static str, fractos_status)>>,
    calls: AtomicU64,
}

unsafe extern "C" fn reenter(
    p: *mut fractos_process,
    inv: *const fractos_invocation,
    user: *mut c_void,
) {
    // SAFETY: `user` is the `Reentry` the test passed, alive until unserve.
    let st = unsafe { &*(user as *const Reentry) };
    st.calls.fetch_add(1, Ordering::SeqCst);
    let mut tag = 0;
    // SAFETY: `inv` is lent for the call; `tag` is writable.
    unsafe { fractos_invocation_tag(inv, &mut tag) };
    if tag != 1 {
        return;
    }
    let mut out = Vec::new();
    // SAFETY: every pointer is valid or NULL where allowed; handles are
    // the library's.
    unsafe {
        out.push((
            "invoke",
            fractos_invoke(p, &st.echo, ptr::null(), 0, ptr::null(), 0),
        ));
        let mut r = ptr::null_mut();
        out.push(("register", fractos_register(p, 4096, &mut r)));
        out.push(("region_free", fractos_region_free(r)));
        out.push((
            "invocation_free (lent)",
            fractos_invocation_free(inv.cast_mut()),
        ));
        match st.mode.load(Ordering::SeqCst) {
            0 => {
                out.push((
                    "next_invocation",
                    fractos_next_invocation(p, 100, &mut ptr::null_mut()),
                ));
                out.push(("dispatch", fractos_dispatch(p, 100, ptr::null_mut())));
            }
            1 => out.push(("close", fractos_close(p))),
            _ => out.push(("unserve", fractos_unserve(p, 1))),
        }
    }
    st.statuses.lock().unwrap().extend(out);
}

fn reentrant_round(
    node: &Running,
    name: &str,
    threads: u32,
    inline: bool,
    mode: u32,
) -> Vec<(&'static str, fractos_status)> {
    let p = attach(node, name, threads);
    let echo = request(p, 2);
    let st = Box::new(Reentry {
        echo,
        mode: AtomicU32::new(mode),
        statuses: std::sync::Mutex::new(Vec::new()),
        calls: AtomicU64::new(0),
    });
    let user = (&*st as *const Reentry).cast_mut().cast::<c_void>();
    let flags = if inline { FRACTOS_SERVE_INLINE } else { 0 };
    // SAFETY: a handler that stays callable; `user` outlives the serving.
    ok(unsafe { fractos_serve(p, 1, Some(reenter), user, flags) });
    // SAFETY: as above.
    ok(unsafe { fractos_serve(p, 2, Some(reenter), user, flags) });
    let rq = request(p, 1);
    let hp = H(p);
    let s = watchdog(name, move || {
        let p = hp;
        // SAFETY: a capability by pointer.
        unsafe { fractos_invoke(p.0, &rq, ptr::null(), 0, ptr::null(), 0) }
    });
    assert!(s == FRACTOS_OK || mode == 1, "{name}: {s:?}");
    let deadline = std::time::Instant::now() + WAIT;
    while st.statuses.lock().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "{name}: the handler never finished"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let statuses = st.statuses.lock().unwrap().clone();
    let hp = H(p);
    watchdog(name, move || {
        let p = hp;
        fractos_close(p.0)
    });
    // The handler may still be running on an SDK thread for an instant
    // after close returns: `st` must outlive it.
    std::thread::sleep(Duration::from_millis(50));
    drop(st);
    statuses
}

#[test]
fn handlers_that_call_back_into_the_library_neither_deadlock_nor_crash() {
    let node = controller(1, false);
    for (threads, inline) in [(1, false), (4, false), (1, true)] {
        for mode in 0..3 {
            let name = format!("reenter-{threads}-{inline}-{mode}");
            let statuses = reentrant_round(
                &node,
                Box::leak(name.clone().into_boxed_str()),
                threads,
                inline,
                mode,
            );
            for (what, s) in &statuses {
                assert_ne!(*s, FRACTOS_ERR_PANIC, "{name}: {what}");
                match *what {
                    "invoke" | "register" | "region_free" => {
                        assert_eq!(*s, FRACTOS_OK, "{name}: {what} from a handler")
                    }
                    "invocation_free (lent)" => {
                        // Freeing the lent invocation is the SDK's job;
                        // refused or accepted, it must not double free.
                    }
                    // The calls a handler must not make: whatever they
                    // return, they returned (the watchdog saw no hang).
                    _ => eprintln!("{name}: {what} from a handler: {s:?}"),
                }
            }
        }
    }
}

// ------------------------------------------------------------ threads

#[test]
fn one_process_hammered_from_many_threads_then_closed_under_them() {
    let node = controller(1, true);
    for local in [false, true] {
        let p = if local {
            attach_local(&node, "hammer-l")
        } else {
            attach(&node, "hammer-t", 2)
        };
        let rq = request(p, 3);
        let served = Box::leak(Box::new(AtomicU64::new(0)));
        unsafe extern "C" fn bump(
            _: *mut fractos_process,
            _: *const fractos_invocation,
            user: *mut c_void,
        ) {
            // SAFETY: `user` is a leaked AtomicU64.
            unsafe { &*(user as *const AtomicU64) }.fetch_add(1, Ordering::SeqCst);
        }
        // SAFETY: a handler that stays callable; `user` is leaked.
        ok(unsafe {
            fractos_serve(
                p,
                3,
                Some(bump),
                (served as *const AtomicU64).cast_mut().cast(),
                0,
            )
        });
        let workers: Vec<_> = (0..8)
            .map(|t| {
                let hp = H(p);
                std::thread::spawn(move || {
                    let hp = hp;
                    let p = hp.0;
                    let mut bad = Vec::new();
                    for i in 0..150u32 {
                        let mut r = ptr::null_mut();
                        let mut c = fractos_cap::default();
                        // SAFETY: valid pointers; handles may die under us,
                        // which the library must report.
                        let ss = unsafe {
                            [
                                fractos_invoke(
                                    p,
                                    &rq,
                                    [t as u8, i as u8].as_ptr(),
                                    2,
                                    ptr::null(),
                                    0,
                                ),
                                fractos_register(p, 4096, &mut r),
                                fractos_memory_create(p, r, 0, 4096, FRACTOS_RIGHT_READ, &mut c),
                                fractos_drop_cap(p, &c),
                                fractos_region_free(r),
                            ]
                        };
                        for s in ss {
                            if !matches!(
                                s,
                                FRACTOS_OK
                                    | FRACTOS_ERR_INVALID_HANDLE
                                    | FRACTOS_ERR_DISCONNECTED
                                    | FRACTOS_ERR_NULL_POINTER
                                    | FRACTOS_ERR_BAD_HANDLE
                            ) {
                                bad.push((i, s, last_error()));
                            }
                        }
                    }
                    bad
                })
            })
            .collect();
        // Close it while they run.
        let deadline = std::time::Instant::now() + WAIT;
        while served.load(Ordering::SeqCst) < 100 {
            assert!(
                std::time::Instant::now() < deadline,
                "no invocations served"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let hp = H(p);
        let s = watchdog("close under load", move || {
            let hp = hp;
            fractos_close(hp.0)
        });
        ok(s);
        for w in workers {
            let bad = w.join().expect("a worker panicked");
            assert!(
                bad.is_empty(),
                "local {local}: unexpected statuses {:?}",
                &bad[..bad.len().min(5)]
            );
        }
    }
    let _ = fractos_status::FRACTOS_OK;
}
