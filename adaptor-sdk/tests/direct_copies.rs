//! Copies through a controller that reads and writes local processes'
//! memory directly: windows at the very end of a region, empty windows,
//! overlapping windows of one region, destinations that vanish while a
//! copy runs, and capabilities without the right to be written.

mod common;

use std::time::Duration;

use common::*;
use fractos_hosted::{spawn, HostedConfig, Running};
use fractos_sdk::wire::Rights;
use fractos_sdk::{ErrorCode, NodeId, Process};

fn local_controller(tag: &str) -> Running {
    let mut c = HostedConfig::local(NodeId(1), KEY);
    c.local_socket = Some(socket_path(tag));
    spawn(c).expect("controller starts")
}

fn pattern(n: u64, seed: u64) -> Vec<u8> {
    (0..n).map(|i| ((i * 31 + seed) % 251) as u8).collect()
}

/// `a` copies `src[so..so+len)` into `b`'s `dst[dof..dof+len)`.
fn window_copy(
    a: &Process,
    b: &Process,
    src: &fractos_sdk::Region,
    so: u64,
    dst: &fractos_sdk::Region,
    dof: u64,
    len: u64,
) -> Result<(), fractos_sdk::SdkError> {
    let s = a.memory_create(src, so, len, Rights::READ)?;
    let d = b.memory_create(dst, dof, len, Rights::WRITE)?;
    let d = share(b, d, a, &format!("w/{so}/{dof}/{len}"))
        .as_memory()
        .unwrap();
    a.copy(&s, &d, None)
}

#[test]
fn windows_at_the_end_of_a_region_copy_exactly_their_bytes() {
    let node = local_controller("edges");
    let a = attach_local(&node, "edge-a");
    let b = attach_local(&node, "edge-b");
    // Not a whole number of pages: the region ends inside its mapping.
    let n = 3 * 4096 + 5;
    let src = a.register_vec(pattern(n, 1)).unwrap();
    let dst = b.register(n).unwrap();
    for (so, dof, len) in [
        (n - 1, n - 1, 1),
        (n - 1, 0, 1),
        (0, n - 1, 1),
        (n - 4096, n - 4096, 4096),
        (0, 0, n),
        (1, 0, n - 1),
        (0, 1, n - 1),
    ] {
        dst.fill(0);
        window_copy(&a, &b, &src, so, &dst, dof, len)
            .unwrap_or_else(|e| panic!("[{so}, +{len}) -> [{dof}, +{len}): {e}"));
        let mut want = vec![0u8; n as usize];
        want[dof as usize..(dof + len) as usize]
            .copy_from_slice(&src.to_vec()[so as usize..(so + len) as usize]);
        assert!(dst.to_vec() == want, "[{so}, +{len}) -> [{dof}, +{len})");
    }
    // One byte past the end: refused when the capability is made (by the
    // SDK, which knows the region).
    for (off, len) in [(n, 1), (n - 1, 2), (0, n + 1), (u64::MAX, 1), (1, u64::MAX)] {
        assert!(
            a.memory_create(&src, off, len, Rights::READ).is_err(),
            "[{off}, +{len})"
        );
    }
    let whole = a.memory_create(&src, 0, n, Rights::READ).unwrap();
    for (off, len) in [(n, 1), (n - 1, 2), (1, n), (u64::MAX, 2)] {
        let e = a.diminish(&whole, off, len, Rights::READ).unwrap_err();
        assert!(e.code().is_some(), "diminish [{off}, +{len}): {e}");
    }
}

#[test]
fn empty_windows_copy_nothing() {
    let node = local_controller("empty");
    let a = attach_local(&node, "empty-a");
    let b = attach_local(&node, "empty-b");
    let n = 8192;
    let src = a.register_vec(pattern(n, 2)).unwrap();
    let dst = b.register_vec(vec![7; n as usize]).unwrap();
    for (so, dof) in [(0, 0), (n, n), (n / 2, n - 1)] {
        // Refusing empty capabilities is fine, if it says why.
        if let Err(e) = window_copy(&a, &b, &src, so, &dst, dof, 0) {
            assert!(e.to_string().contains("empty"), "{e}");
        }
        assert!(
            dst.with_bytes(|d| d.iter().all(|&x| x == 7)),
            "bytes changed"
        );
    }
    // The controller still copies.
    window_copy(&a, &b, &src, 0, &dst, 0, n).unwrap();
    assert_eq!(dst.to_vec(), src.to_vec());
}

#[test]
fn overlapping_windows_of_one_region_stay_inside_the_destination() {
    let node = local_controller("overlap");
    let a = attach_local(&node, "overlap-a");
    let helper = attach_local(&node, "overlap-h");
    // More than the copy window (8 chunks of 64 KiB) in flight, in both
    // directions.
    let n: u64 = 3 << 20;
    let len: u64 = 2 << 20;
    for (so, dof) in [(0, 4096), (4096, 0), (0, 1 << 20), (1 << 20, 0), (0, 0)] {
        let r = a.register_vec(pattern(n, 3)).unwrap();
        let before = r.to_vec();
        let s = a.memory_create(&r, so, len, Rights::READ).unwrap();
        let d = a.memory_create(&r, dof, len, Rights::WRITE).unwrap();
        let d = share(&a, d, &helper, &format!("ov/{so}/{dof}"))
            .as_memory()
            .unwrap();
        let s = share(&a, s, &helper, &format!("os/{so}/{dof}"))
            .as_memory()
            .unwrap();
        helper.copy(&s, &d, None).unwrap();
        let after = r.to_vec();
        let (lo, hi) = (dof as usize, (dof + len) as usize);
        assert!(
            after[..lo] == before[..lo] && after[hi..] == before[hi..],
            "[{so}, +{len}) -> [{dof}, +{len}) wrote outside its destination"
        );
        if so == dof {
            assert!(after == before);
        }
        a.unregister(&r);
    }
}

#[test]
fn read_only_capabilities_are_refused_as_destinations() {
    let node = local_controller("rights");
    let a = attach_local(&node, "rights-a");
    let b = attach_local(&node, "rights-b");
    let n = 4096;
    let src = a.register_vec(pattern(n, 4)).unwrap();
    let dst = b.register_vec(vec![9; n as usize]).unwrap();
    let s = a.memory_create(&src, 0, n, Rights::READ).unwrap();
    let rw = b
        .memory_create(&dst, 0, n, Rights::READ | Rights::WRITE)
        .unwrap();
    let ro = b.diminish(&rw, 0, n, Rights::READ).unwrap();
    let ro_made = b.memory_create(&dst, 0, n, Rights::READ).unwrap();
    let wo = a.memory_create(&src, 0, n, Rights::WRITE).unwrap();
    for (name, d) in [("diminished", ro), ("created read-only", ro_made)] {
        let d = share(&b, d, &a, &format!("ro/{name}")).as_memory().unwrap();
        let e = a.copy(&s, &d, None).unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::MissingRight), "{name}: {e}");
        // Diminishing cannot add the right back.
        if let Ok(again) = a.diminish(&d, 0, n, Rights::READ | Rights::WRITE) {
            let e = a.copy(&s, &again, None).unwrap_err();
            assert_eq!(e.code(), Some(ErrorCode::MissingRight), "{name}: {e}");
        }
    }
    // A write-only source cannot be read either.
    let d = share(&b, rw, &a, "rw").as_memory().unwrap();
    let e = a.copy(&wo, &d, None).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::MissingRight), "{e}");
    assert!(
        dst.with_bytes(|d| d.iter().all(|&x| x == 9)),
        "bytes changed"
    );
    a.copy(&s, &d, None).unwrap();
    assert_eq!(dst.to_vec(), src.to_vec());
}

/// A destination whose region is unregistered, whose capability is
/// revoked, or whose process exits while a long copy into it runs: the
/// copy ends (done or with an error code), the controller serves others.
#[test]
fn destinations_vanishing_mid_copy_end_the_copy_cleanly() {
    let node = local_controller("vanish");
    let a = attach_local(&node, "vanish-a");
    let by = attach_local(&node, "vanish-by");
    let n: u64 = 32 << 20;
    let src = a.register_vec(pattern(n, 5)).unwrap();
    let s = a.memory_create(&src, 0, n, Rights::READ).unwrap();
    for (round, how) in ["unregister", "revoke", "exit", "source-unregister"]
        .into_iter()
        .enumerate()
    {
        let b = attach_local(&node, &format!("vanish-b{round}"));
        let dst = b.register(n).unwrap();
        let d0 = b.memory_create(&dst, 0, n, Rights::WRITE).unwrap();
        let d = share(&b, d0, &a, &format!("vanish/{round}"))
            .as_memory()
            .unwrap();
        let src2 = a.register_vec(pattern(n, 6)).unwrap();
        let s2 = a.memory_create(&src2, 0, n, Rights::READ).unwrap();
        let source = if how == "source-unregister" { &s2 } else { &s };
        let pending = a.start_copy(source, &d, None).unwrap();
        match how {
            "unregister" => assert!(b.unregister(&dst)),
            "revoke" => b.revoke(d0).unwrap(),
            "exit" => b.close(),
            _ => assert!(a.unregister(&src2)),
        }
        match pending.wait() {
            Ok(()) => {}
            Err(e) => assert!(
                matches!(
                    e.code(),
                    Some(
                        ErrorCode::MemoryFault
                            | ErrorCode::Revoked
                            | ErrorCode::OwnerGone
                            | ErrorCode::BadHandle
                    )
                ),
                "{how}: {e}"
            ),
        }
        // Bystanders are served.
        let r = by.register(4096).unwrap();
        let c = by.memory_create(&r, 0, 4096, Rights::READ).unwrap();
        by.drop_cap(c).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    let b = attach_local(&node, "vanish-late");
    let dst = b.register(n).unwrap();
    let d = b.memory_create(&dst, 0, n, Rights::WRITE).unwrap();
    let d = share(&b, d, &a, "vanish/late").as_memory().unwrap();
    a.copy(&s, &d, None).unwrap();
    assert!(dst.to_vec() == src.to_vec());
}

/// Timeouts as large as a `Duration` holds (a C caller passing
/// `UINT64_MAX` milliseconds, say) mean "no deadline": attaching, operating
/// and failing to attach through a slot work without overflowing a clock.
#[test]
fn unbounded_timeouts_do_not_overflow_the_clock() {
    let node = local_controller("unbounded");
    let forever = fractos_sdk::AttachOptions::default()
        .op_timeout(Duration::MAX)
        .connect_timeout(Duration::MAX)
        .write_timeout(Duration::MAX);
    let path = node.local_socket().expect("a local socket");
    let local = Process::attach_local(path, "forever-l", token("forever-l"), forever.clone())
        .expect("attach_local with unbounded timeouts");
    let tcp = Process::attach(
        node.process_addr(),
        "forever-t",
        token("forever-t"),
        forever.clone(),
    )
    .expect("attach with unbounded timeouts");
    for p in [&local, &tcp] {
        let r = p.register(4096).expect("register");
        p.memory_create(&r, 0, 4096, Rights::READ)
            .expect("memory_create");
    }
    // A slot path that is not a slot: a typed error, not a panic.
    let not_a_slot = socket_path("unbounded-slot").with_file_name("not-a-slot");
    std::fs::write(&not_a_slot, vec![0u8; 8192]).unwrap();
    let e = Process::attach_slot(&not_a_slot, "forever-s", token("forever-s"), forever)
        .expect_err("not a slot");
    assert!(!e.to_string().is_empty());
}
