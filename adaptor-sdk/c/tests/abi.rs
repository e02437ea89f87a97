//! The C ABI called through its Rust symbols against a hosted controller:
//! the operations and invocation paths the C programs of `installed.rs`
//! do not use (derive, monitor, unpublish, dispatch, inline handlers,
//! per-handle timeouts, local channels), with their error codes.

mod common;

use std::ffi::{c_void, CStr, CString};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use fractos_c::fractos_status::{self, *};
use fractos_c::*;
use fractos_core::process_token;

fn request(p: *mut fractos_process, tag: u64, imms: &[u8], caps: &[fractos_cap]) -> fractos_cap {
    let mut out = fractos_cap::default();
    // SAFETY: slices with their lengths and an out-pointer.
    ok(unsafe {
        fractos_request_create(
            p,
            tag,
            imms.as_ptr(),
            imms.len(),
            caps.as_ptr(),
            caps.len(),
            &mut out,
        )
    });
    out
}

fn next(p: *mut fractos_process, timeout_ms: u32) -> (u64, Vec<u8>, Vec<fractos_cap>) {
    let mut inv = ptr::null_mut();
    ok(unsafe_next(p, timeout_ms, &mut inv));
    let (mut tag, mut n, mut ncaps) = (0u64, 0usize, 0usize);
    let mut imms = [0u8; 64];
    // SAFETY: out-pointers and a buffer with its length.
    unsafe {
        ok(fractos_invocation_tag(inv, &mut tag));
        ok(fractos_invocation_imms(
            inv,
            imms.as_mut_ptr(),
            imms.len(),
            &mut n,
        ));
        ok(fractos_invocation_cap_count(inv, &mut ncaps));
    }
    let caps = (0..ncaps)
        .map(|i| {
            let mut c = fractos_cap::default();
            // SAFETY: an out-pointer.
            ok(unsafe { fractos_invocation_cap(inv, i, &mut c) });
            c
        })
        .collect();
    let mut c = fractos_cap::default();
    // SAFETY: an out-pointer.
    let past = unsafe { fractos_invocation_cap(inv, ncaps, &mut c) };
    assert_eq!(past, FRACTOS_ERR_UNEXPECTED_CAP);
    ok(fractos_invocation_free(inv));
    assert_eq!(fractos_invocation_free(inv), FRACTOS_ERR_INVALID_HANDLE);
    (tag, imms[..n.min(64)].to_vec(), caps)
}

fn unsafe_next(
    p: *mut fractos_process,
    ms: u32,
    out: &mut *mut fractos_invocation,
) -> fractos_status {
    // SAFETY: an out-pointer.
    unsafe { fractos_next_invocation(p, ms, out) }
}

#[test]
fn derive_monitor_names_and_polling() {
    let node = controller(1, false);
    let p = attach(&node, "abi-owner", 2);
    let mut id = 0u32;
    // SAFETY: an out-pointer.
    ok(unsafe { fractos_node_id(p, &mut id) });
    assert_eq!(id, 1);

    // derive appends immediates and capabilities to the bound ones.
    let k = request(p, 9, &[], &[]);
    let r = request(p, 5, b"ab", &[k]);
    let mut d = fractos_cap::default();
    // SAFETY: slices with lengths, capability pointers and an out-pointer.
    ok(unsafe { fractos_derive(p, &r, b"cd".as_ptr(), 2, ptr::null(), 0, &mut d) });
    // SAFETY: as above.
    ok(unsafe { fractos_invoke(p, &d, b"ef".as_ptr(), 2, &k, 1) });
    let (tag, imms, caps) = next(p, 5000);
    assert_eq!((tag, imms.as_slice(), caps.len()), (5, &b"abcdef"[..], 2));
    assert!(caps.iter().all(|c| c.kind == FRACTOS_CAP_REQUEST));

    // monitor: revoking the watched Request invokes notify.
    let notify = request(p, 11, &[], &[]);
    // SAFETY: capability pointers.
    ok(unsafe { fractos_monitor(p, &d, &notify) });
    // SAFETY: a capability pointer.
    ok(unsafe { fractos_revoke(p, &d) });
    assert_eq!(next(p, 5000).0, 11);
    // SAFETY: as above.
    let again = unsafe { fractos_invoke(p, &d, ptr::null(), 0, ptr::null(), 0) };
    assert_eq!(again, FRACTOS_ERR_REVOKED, "{}", last_error());
    // Immediates over the protocol's limit are refused before the buffer
    // is read (a dangling pointer is never touched).
    let dangling = std::ptr::NonNull::<u8>::dangling().as_ptr();
    // SAFETY: the length is refused before `dangling` is read.
    let big = unsafe { fractos_invoke(p, &k, dangling, usize::MAX, ptr::null(), 0) };
    assert_eq!(big, FRACTOS_ERR_INVALID_ARGUMENT, "{}", last_error());

    // Names: publish, lookup from another process, unpublish.
    let name = c"abi/request";
    // SAFETY: a C string and a capability pointer.
    ok(unsafe { fractos_publish(p, name.as_ptr(), &r) });
    // SAFETY: as above.
    let taken = unsafe { fractos_publish(p, name.as_ptr(), &r) };
    assert_eq!(taken, FRACTOS_ERR_NAME_TAKEN);
    let q = attach(&node, "abi-user", 2);
    let mut found = fractos_cap::default();
    // SAFETY: a C string and an out-pointer.
    ok(unsafe { fractos_lookup(q, name.as_ptr(), 1000, &mut found) });
    assert_eq!(found.kind, FRACTOS_CAP_REQUEST);
    // SAFETY: a C string.
    ok(unsafe { fractos_unpublish(p, name.as_ptr()) });
    // SAFETY: a C string and an out-pointer.
    let gone = unsafe { fractos_lookup(q, name.as_ptr(), 0, &mut found) };
    assert_eq!(gone, FRACTOS_ERR_NAME_NOT_FOUND);
    assert!(last_error().contains("fractos_lookup"), "{}", last_error());

    // Per-handle timeouts (0 refused), and polling with a 0 timeout.
    ok(fractos_set_timeout(q, 2000));
    assert_eq!(fractos_set_timeout(q, 0), FRACTOS_ERR_INVALID_ARGUMENT);
    let mut inv = ptr::null_mut();
    assert_eq!(unsafe_next(q, 0, &mut inv), FRACTOS_ERR_TIMEOUT);
    assert!(inv.is_null());

    ok(fractos_close(q));
    ok(fractos_close(p));
    assert!(!fractos_is_connected(p));
}

static DISPATCHED: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" fn count(
    p: *mut fractos_process,
    inv: *const fractos_invocation,
    user: *mut c_void,
) {
    let mut tag = 0;
    // SAFETY: the SDK lends `inv` for the call; `tag` is writable.
    if unsafe { fractos_invocation_tag(inv, &mut tag) } == FRACTOS_OK {
        // SAFETY: `user` is the &AtomicU64 the test passed to fractos_serve.
        let counter = unsafe { &*(user as *const AtomicU64) };
        counter.fetch_add(tag, Ordering::SeqCst);
    }
    let _ = fractos_invocation_drop_caps(p, inv);
}

#[test]
fn dispatch_inline_handlers_and_local_channels() {
    let node = controller(2, true);
    // handler_threads 0: handlers run in fractos_dispatch.
    let p = attach(&node, "abi-dispatch", 0);
    let user = &DISPATCHED as *const AtomicU64 as *mut c_void;
    // SAFETY: `count` stays callable; DISPATCHED is a static.
    ok(unsafe { fractos_serve(p, 3, Some(count), user, 0) });
    // SAFETY: as above, on the reader thread.
    ok(unsafe { fractos_serve(p, 4, Some(count), user, FRACTOS_SERVE_INLINE) });
    // SAFETY: as above (unknown flags are refused).
    let flags = unsafe { fractos_serve(p, 5, Some(count), user, 8) };
    assert_eq!(flags, FRACTOS_ERR_INVALID_ARGUMENT);
    let r3 = request(p, 3, &[], &[]);
    let r4 = request(p, 4, &[], &[]);
    // SAFETY: capability pointers, no arguments.
    ok(unsafe { fractos_invoke(p, &r4, ptr::null(), 0, ptr::null(), 0) });
    // SAFETY: as above.
    ok(unsafe { fractos_invoke(p, &r3, ptr::null(), 0, ptr::null(), 0) });
    let mut tag = 0;
    // SAFETY: an out-pointer.
    ok(unsafe { fractos_dispatch(p, 5000, &mut tag) });
    assert_eq!(tag, 3);
    // The inline handler ran on its own; dispatch saw only tag 3.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while DISPATCHED.load(Ordering::SeqCst) != 7 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(DISPATCHED.load(Ordering::SeqCst), 7);
    // SAFETY: a NULL tag is allowed.
    let none = unsafe { fractos_dispatch(p, 10, ptr::null_mut()) };
    assert_eq!(none, FRACTOS_ERR_TIMEOUT);
    ok(fractos_unserve(p, 3));
    assert_eq!(fractos_unserve(p, 3), FRACTOS_ERR_INVALID_ARGUMENT);
    ok(fractos_close(p));

    // A local channel: regions the controller maps, a copy between two of
    // them, read back with fractos_region_read; then unregistered.
    let path = CString::new(node.local_socket().unwrap().to_str().unwrap()).unwrap();
    let token = process_token(&KEY, b"abi-local");
    let mut l = ptr::null_mut();
    // SAFETY: valid strings, token, NULL options (defaults), out-pointer.
    ok(unsafe {
        fractos_attach_local(
            path.as_ptr(),
            c"abi-local".as_ptr(),
            token.as_ptr(),
            ptr::null(),
            &mut l,
        )
    });
    let (mut a, mut b) = (ptr::null_mut(), ptr::null_mut());
    // SAFETY: out-pointers.
    unsafe {
        ok(fractos_register(l, 4096, &mut a));
        ok(fractos_register(l, 4096, &mut b));
        ok(fractos_region_write(a, 10, b"local bytes".as_ptr(), 11));
    }
    let (mut src, mut dst) = (fractos_cap::default(), fractos_cap::default());
    // SAFETY: out-pointers.
    unsafe {
        ok(fractos_memory_create(
            l,
            a,
            10,
            11,
            FRACTOS_RIGHT_READ,
            &mut src,
        ));
        ok(fractos_memory_create(
            l,
            b,
            0,
            4096,
            FRACTOS_RIGHT_WRITE,
            &mut dst,
        ));
        // Wrong direction: dst lacks READ.
        assert_eq!(
            fractos_copy(l, &dst, &src, ptr::null()),
            FRACTOS_ERR_MISSING_RIGHT
        );
        // A Request where Memory is expected is refused locally.
        let k = request(l, 1, &[], &[]);
        assert_eq!(
            fractos_copy(l, &k, &dst, ptr::null()),
            FRACTOS_ERR_WRONG_TYPE
        );
        ok(fractos_copy(l, &src, &dst, ptr::null()));
    }
    let mut back = [0u8; 11];
    // SAFETY: a buffer with its length.
    ok(unsafe { fractos_region_read(b, 0, back.as_mut_ptr(), back.len()) });
    assert_eq!(&back, b"local bytes");
    ok(fractos_unregister(l, a));
    assert_eq!(fractos_unregister(l, a), FRACTOS_ERR_INVALID_ARGUMENT);
    // SAFETY: capability pointers.
    let faulted = unsafe { fractos_copy(l, &src, &dst, ptr::null()) };
    assert_eq!(faulted, FRACTOS_ERR_MEMORY_FAULT, "{}", last_error());
    ok(fractos_region_free(a));
    ok(fractos_region_free(b));
    ok(fractos_close(l));
    fractos_adaptors::bench::remove_socket_dir(&node);
}

#[test]
fn pipelined_operations() {
    let node = controller(3, false);
    let p = attach(&node, "abi-pipeline", 2);
    let (mut a, mut b) = (ptr::null_mut(), ptr::null_mut());
    let (mut src, mut dst) = (fractos_cap::default(), fractos_cap::default());
    // SAFETY: out-pointers and a buffer with its length.
    unsafe {
        ok(fractos_register(p, 8 * 512, &mut a));
        ok(fractos_register(p, 8 * 512, &mut b));
        let bytes: Vec<u8> = (0..8 * 512).map(|i| (i / 512) as u8 + 1).collect();
        ok(fractos_region_write(a, 0, bytes.as_ptr(), bytes.len()));
        ok(fractos_memory_create(
            p,
            a,
            0,
            8 * 512,
            FRACTOS_RIGHT_READ,
            &mut src,
        ));
        ok(fractos_memory_create(
            p,
            b,
            0,
            8 * 512,
            FRACTOS_RIGHT_WRITE,
            &mut dst,
        ));
    }
    // Eight windows of src and dst derived in flight, then eight copies.
    let start_windows = |cap: &fractos_cap, rights| -> Vec<*mut fractos_pending> {
        (0..8u64)
            .map(|i| {
                let mut h = ptr::null_mut();
                // SAFETY: a capability pointer and an out-pointer.
                ok(unsafe { fractos_start_diminish(p, cap, i * 512, 512, rights, &mut h) });
                h
            })
            .collect()
    };
    let wait_windows = |hs: Vec<*mut fractos_pending>| -> Vec<fractos_cap> {
        hs.into_iter()
            .map(|h| {
                let mut c = fractos_cap::default();
                // SAFETY: NULL is refused for a diminish, and the handle survives.
                let refused = unsafe { fractos_pending_wait(h, ptr::null_mut()) };
                assert_eq!(refused, FRACTOS_ERR_NULL_POINTER);
                // SAFETY: an out-pointer.
                ok(unsafe { fractos_pending_wait(h, &mut c) });
                // SAFETY: the handle is gone now.
                let again = unsafe { fractos_pending_wait(h, &mut c) };
                assert_eq!(again, FRACTOS_ERR_INVALID_HANDLE);
                c
            })
            .collect()
    };
    let srcs = wait_windows(start_windows(&src, FRACTOS_RIGHT_READ));
    let dsts = wait_windows(start_windows(&dst, FRACTOS_RIGHT_WRITE));
    assert!(srcs
        .iter()
        .all(|c| c.len == 512 && c.rights == FRACTOS_RIGHT_READ));
    // Window i of src into window 7-i of dst: reversed blocks.
    let copies: Vec<_> = (0..8)
        .map(|i| {
            let mut h = ptr::null_mut();
            // SAFETY: capability pointers and an out-pointer.
            ok(unsafe { fractos_start_copy(p, &srcs[i], &dsts[7 - i], ptr::null(), &mut h) });
            h
        })
        .collect();
    for h in copies {
        // SAFETY: NULL result is fine for a copy.
        ok(unsafe { fractos_pending_wait(h, ptr::null_mut()) });
    }
    let mut back = vec![0u8; 8 * 512];
    // SAFETY: a buffer with its length.
    ok(unsafe { fractos_region_read(b, 0, back.as_mut_ptr(), back.len()) });
    for (i, block) in back.chunks(512).enumerate() {
        assert!(block.iter().all(|x| *x == 8 - i as u8), "block {i}");
    }
    // Invoke and drop in flight; one abandoned.
    let k = request(p, 21, &[], &[]);
    let (mut inv, mut dropped, mut abandoned) = (ptr::null_mut(), ptr::null_mut(), ptr::null_mut());
    // SAFETY: capability pointers, bytes with length, out-pointers.
    unsafe {
        ok(fractos_start_invoke(
            p,
            &k,
            b"x".as_ptr(),
            1,
            ptr::null(),
            0,
            &mut inv,
        ));
        ok(fractos_start_drop_cap(p, &srcs[0], &mut dropped));
        ok(fractos_start_copy(
            p,
            &srcs[1],
            &dsts[1],
            ptr::null(),
            &mut abandoned,
        ));
        ok(fractos_pending_wait(inv, ptr::null_mut()));
        ok(fractos_pending_wait(dropped, ptr::null_mut()));
    }
    ok(fractos_pending_free(abandoned));
    assert_eq!(fractos_pending_free(abandoned), FRACTOS_ERR_INVALID_HANDLE);
    assert_eq!(next(p, 5000).0, 21);
    // The dropped window is gone from the table.
    // SAFETY: capability pointers.
    let gone = unsafe { fractos_copy(p, &srcs[0], &dsts[0], ptr::null()) };
    assert_eq!(gone, FRACTOS_ERR_BAD_HANDLE, "{}", last_error());
    // A pending handle is not a region handle.
    let mut len = 0u64;
    // SAFETY: an out-pointer.
    let foreign = unsafe { fractos_region_len(inv.cast(), &mut len) };
    assert_eq!(foreign, FRACTOS_ERR_INVALID_HANDLE);
    ok(fractos_close(p));
}

#[test]
fn slot_attach_errors_are_typed() {
    // No appliance here: a missing file is FRACTOS_ERR_IO, a file that is
    // not a slot FRACTOS_ERR_SLOT (the QEMU tests attach to real slots
    // through the same Rust call).
    let dir = std::env::temp_dir().join(format!("fractos-csdk-slot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let not_slot = dir.join("not-a-slot");
    std::fs::write(&not_slot, vec![0x5a; 1 << 16]).unwrap();
    let token = [0u8; 32];
    for (path, want) in [
        (dir.join("missing"), FRACTOS_ERR_IO),
        (not_slot, FRACTOS_ERR_SLOT),
    ] {
        let path = CString::new(path.to_str().unwrap()).unwrap();
        let mut p = ptr::null_mut();
        // SAFETY: valid strings, token, NULL options and an out-pointer.
        let got = unsafe {
            fractos_attach_slot(
                path.as_ptr(),
                c"x".as_ptr(),
                token.as_ptr(),
                ptr::null(),
                &mut p,
            )
        };
        assert_eq!(got, want, "{}", last_error());
        assert!(p.is_null());
        assert!(
            last_error().starts_with("fractos_attach_slot: "),
            "{}",
            last_error()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_status_has_a_description() {
    for code in (0..=18).chain(100..=113) {
        // SAFETY: static NUL-terminated strings.
        let text = unsafe { CStr::from_ptr(fractos_status_str(code)) }
            .to_str()
            .unwrap();
        assert_ne!(text, "unknown status", "code {code}");
    }
    // SAFETY: as above.
    let unknown = unsafe { CStr::from_ptr(fractos_status_str(19)) };
    assert_eq!(unknown.to_str().unwrap(), "unknown status");
    // SAFETY: a static NUL-terminated string.
    let version = unsafe { CStr::from_ptr(fractos_version()) };
    assert_eq!(version.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    assert_eq!(fractos_selftest_panic(), FRACTOS_ERR_PANIC);
    assert!(last_error().contains("forced by fractos_selftest_panic"));
}
