//! The SDK against real hosted controllers over loopback TCP: attach, every
//! operation's success path, typed errors, invocation delivery, copies
//! between SDK processes, revocation, monitors, naming and timeouts.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{attach, cluster, cluster_with, opts, retry, share, token, WAIT};
use fractos_sdk::wire::{frame_body, ControllerMsg, ProcessMsg, Reply, MAX_FRAME_LEN};
use fractos_sdk::{
    Cap, DisconnectReason, ErrorCode, Handle, MemoryCap, NodeId, ObjectKind, Process, RequestCap,
    Rights, SdkError,
};

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(seed as u32) as u8 ^ (i >> 16) as u8)
        .collect()
}

#[test]
fn attach_ok_and_wrong_token_rejected() {
    let nodes = cluster(1);
    let p = attach(&nodes[0], "app");
    assert_eq!(p.node(), NodeId(1));
    assert_eq!(p.name(), "app");
    assert!(p.is_connected());
    assert_eq!(p.controller_addr(), nodes[0].process_addr());

    // A token for another name is refused with a typed error.
    match Process::attach(nodes[0].process_addr(), "app", token("other"), opts()) {
        Err(e @ SdkError::Rejected { .. }) => {
            assert_eq!(e.code(), Some(ErrorCode::AuthFailed));
            assert!(e.to_string().contains("token"), "{e}");
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    // The first process is unaffected.
    let r = p.register(16).unwrap();
    p.memory_create(&r, 0, 16, Rights::READ).unwrap();
    p.close();
}

#[test]
fn memory_create_and_diminish() {
    let nodes = cluster(1);
    let p = attach(&nodes[0], "p");
    let r = p.register(1000).unwrap();
    let m = p.memory_create(&r, 100, 800, Rights::READ_WRITE).unwrap();
    assert_eq!((m.len(), m.rights()), (800, Rights::READ_WRITE));
    let d = p.diminish(&m, 10, 20, Rights::READ).unwrap();
    assert_eq!((d.len(), d.rights()), (20, Rights::READ));
    assert_ne!(d.handle(), m.handle());

    // Errors from the controller.
    let e = p.diminish(&m, 790, 20, Rights::READ).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::OutOfBounds), "{e}");
    let e = p.diminish(&d, 0, 10, Rights::WRITE).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::MissingRight), "{e}");
    let bogus = MemoryCap::from_raw(Handle(999_999), Rights::READ, 1);
    let e = p.diminish(&bogus, 0, 1, Rights::READ).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadHandle), "{e}");

    // Errors caught locally: nothing is sent.
    assert!(matches!(
        p.memory_create(&r, 900, 101, Rights::READ),
        Err(SdkError::OutOfRange { .. })
    ));
    assert!(matches!(
        p.memory_create(&r, 0, 0, Rights::READ),
        Err(SdkError::InvalidArgument(_))
    ));
    let q = attach(&nodes[0], "q");
    let foreign = q.register(10).unwrap();
    assert!(matches!(
        p.memory_create(&foreign, 0, 10, Rights::READ),
        Err(SdkError::InvalidArgument(_))
    ));
    assert!(p.is_connected());
}

#[test]
fn invoke_delivers_bound_and_invoker_arguments_to_another_process() {
    let nodes = cluster(1);
    let owner = attach(&nodes[0], "owner");
    let invoker = attach(&nodes[0], "invoker");

    let own_mem = owner.register(64).unwrap();
    let bound_cap = owner.memory_create(&own_mem, 0, 64, Rights::READ).unwrap();
    let req = owner
        .request_create(42, b"bound|", &[bound_cap.into()])
        .unwrap();
    let got = share(&owner, req, &invoker, "svc");
    let req = got.as_request().expect("a Request");
    assert_eq!(got.kind(), ObjectKind::Request);

    let curried = invoker.derive(&req, b"derived|", &[]).unwrap();
    let inv_mem = invoker.register(4096).unwrap();
    let inv_cap = invoker
        .memory_create(&inv_mem, 0, 4096, Rights::WRITE)
        .unwrap();
    let cont = invoker.request_create(7, &[], &[]).unwrap();
    invoker
        .invoke(&curried, b"invoker", &[inv_cap.into(), cont.into()])
        .unwrap();

    let inv = owner.next_invocation().unwrap();
    assert_eq!(inv.tag, 42);
    assert_eq!(inv.imms, b"bound|derived|invoker");
    assert_eq!(inv.caps.len(), 3);
    let m0 = inv.memory(0).unwrap();
    assert_eq!((m0.len(), m0.rights()), (64, Rights::READ));
    let m1 = inv.memory(1).unwrap();
    assert_eq!((m1.len(), m1.rights()), (4096, Rights::WRITE));
    let k = inv.request(2).unwrap();
    // Received caps are fresh handles in the owner's table.
    assert_ne!(m0.handle(), bound_cap.handle());
    assert!(inv.request(0).is_err());

    // The owner answers through the continuation it received.
    owner.invoke(&k, b"done", &[]).unwrap();
    let back = invoker.next_invocation().unwrap();
    assert_eq!((back.tag, back.imms.as_slice()), (7, &b"done"[..]));

    // Received handles can be dropped; a second drop is a bad handle.
    owner.drop_cap(k).unwrap();
    let e = owner.drop_cap(k).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadHandle));
}

#[test]
fn typed_errors_of_each_kind() {
    let nodes = cluster(1);
    let p = attach(&nodes[0], "p");
    let r = p.register(100).unwrap();
    let ro = p.memory_create(&r, 0, 100, Rights::READ).unwrap();
    let rw = p.memory_create(&r, 0, 50, Rights::READ_WRITE).unwrap();
    let req = p.request_create(1, &[], &[]).unwrap();

    let code = |res: Result<(), SdkError>| res.unwrap_err().code();
    let bad = RequestCap::from_raw(Handle(123_456));
    assert_eq!(code(p.invoke(&bad, &[], &[])), Some(ErrorCode::BadHandle));
    // A Memory handle used as a Request.
    let wrong = RequestCap::from_raw(ro.handle());
    assert_eq!(code(p.invoke(&wrong, &[], &[])), Some(ErrorCode::WrongType));
    // Copy into a read-only window.
    assert_eq!(code(p.copy(&rw, &ro, None)), Some(ErrorCode::MissingRight));
    // Destination shorter than source.
    let big_src = p.memory_create(&r, 0, 100, Rights::READ_WRITE).unwrap();
    assert_eq!(
        code(p.copy(&big_src, &rw, None)),
        Some(ErrorCode::SizeMismatch)
    );
    // Names.
    assert_eq!(
        p.lookup("nothing-here", Duration::ZERO).unwrap_err().code(),
        Some(ErrorCode::NameNotFound)
    );
    p.publish("taken", req).unwrap();
    assert_eq!(code(p.publish("taken", ro)), Some(ErrorCode::NameTaken));
    assert_eq!(code(p.publish("", ro)), Some(ErrorCode::InvalidArgument));
    // Oversized arguments are refused locally (the controller would close
    // the channel on an undecodable message).
    let huge = vec![0u8; fractos_sdk::wire::MAX_IMMEDIATES + 1];
    assert!(matches!(
        p.invoke(&req, &huge, &[]),
        Err(SdkError::InvalidArgument(_))
    ));
    assert!(matches!(
        p.publish("x".repeat(300), req),
        Err(SdkError::InvalidArgument(_))
    ));
    // Unpublish, then the name is free again.
    p.unpublish("taken").unwrap();
    p.publish("taken", ro).unwrap();
    assert!(p.is_connected());
}

/// Copies `len` bytes from a process on `a` to a process on `b`, with a
/// completion Request served by a handler of the destination process.
fn copy_case(nodes: &[fractos_hosted::Running], a: usize, b: usize, len: usize) {
    let src_p = attach(&nodes[a], "src");
    let dst_p = attach(&nodes[b], "dst");
    let app = attach(&nodes[(a + 1) % nodes.len()], "app");

    let data = pattern(len, 3);
    let src_r = src_p.register_vec(data.clone()).unwrap();
    // The destination window starts 100 bytes into a larger region.
    let dst_r = dst_p.register(len as u64 + 200).unwrap();
    dst_r.fill(0xee);
    let src = src_p
        .memory_create(&src_r, 0, len as u64, Rights::READ)
        .unwrap();
    let dst = dst_p
        .memory_create(&dst_r, 100, len as u64, Rights::WRITE)
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    dst_p.serve(9, move |_, inv| {
        let _ = tx.lock().unwrap().send(inv);
    });
    let done = dst_p.request_create(9, b"copied", &[]).unwrap();

    let s = share(&src_p, src, &app, "copy/src").as_memory().unwrap();
    let d = share(&dst_p, dst, &app, "copy/dst").as_memory().unwrap();
    let c = share(&dst_p, done, &app, "copy/done").as_request().unwrap();
    // The invoker holds only the capabilities; the bytes go owner to owner.
    app.copy(&s, &d, Some(&c)).unwrap();

    // The completion was invoked after the last byte landed.
    let inv = rx.recv_timeout(WAIT).expect("completion invocation");
    assert_eq!((inv.tag, inv.imms.as_slice()), (9, &b"copied"[..]));
    let got = dst_r.to_vec();
    assert!(got[..100].iter().all(|b| *b == 0xee));
    assert!(got[100 + len..].iter().all(|b| *b == 0xee));
    assert!(got[100..100 + len] == data[..], "copied bytes differ");
}

#[test]
fn copy_between_two_processes_on_one_node_multi_chunk() {
    let nodes = cluster(1);
    copy_case(&nodes, 0, 0, 300_000);
}

#[test]
fn copy_between_processes_on_two_nodes_multi_chunk() {
    let nodes = cluster(3);
    copy_case(&nodes, 0, 1, 1 << 20);
}

#[test]
fn copy_without_completion_and_small_windows() {
    let nodes = cluster(1);
    let p = attach(&nodes[0], "p");
    let q = attach(&nodes[0], "q");
    let a = p.register_vec(b"hello world".to_vec()).unwrap();
    let b = q.register(11).unwrap();
    let src = p.memory_create(&a, 6, 5, Rights::READ).unwrap();
    let dst = q.memory_create(&b, 0, 11, Rights::WRITE).unwrap();
    let dst = share(&q, dst, &p, "b").as_memory().unwrap();
    p.copy(&src, &dst, None).unwrap();
    assert_eq!(&b.to_vec()[..5], b"world");
    // Diminished source window.
    let hello = p.diminish(
        &p.memory_create(&a, 0, 11, Rights::READ).unwrap(),
        0,
        5,
        Rights::READ,
    );
    p.copy(&hello.unwrap(), &dst, None).unwrap();
    assert_eq!(&b.to_vec()[..5], b"hello");
}

#[test]
fn unregistered_memory_faults() {
    let nodes = cluster(1);
    let p = attach(&nodes[0], "p");
    let a = p.register(10).unwrap();
    let b = p.register(10).unwrap();
    let src = p.memory_create(&a, 0, 10, Rights::READ).unwrap();
    let dst = p.memory_create(&b, 0, 10, Rights::WRITE).unwrap();
    assert!(p.unregister(&a));
    let e = p.copy(&src, &dst, None).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::MemoryFault), "{e}");
    assert!(p.is_connected());
}

#[test]
fn revoke_is_transitive_and_fires_monitors() {
    let nodes = cluster(2);
    let owner = attach(&nodes[0], "owner");
    let holder = attach(&nodes[1], "holder");
    let r = owner.register(32).unwrap();
    let root = owner.memory_create(&r, 0, 32, Rights::READ).unwrap();
    let child = owner.diminish(&root, 0, 16, Rights::READ).unwrap();
    let held = share(&owner, child, &holder, "child").as_memory().unwrap();
    let sink_r = holder.register(32).unwrap();
    let sink = holder.memory_create(&sink_r, 0, 32, Rights::WRITE).unwrap();
    holder.copy(&held, &sink, None).unwrap();

    let notify = holder.request_create(77, b"gone", &[]).unwrap();
    retry(|| holder.monitor(held, &notify)).unwrap();

    owner.revoke(root).unwrap();
    let inv = holder.next_invocation().unwrap();
    assert_eq!((inv.tag, inv.imms.as_slice()), (77, &b"gone"[..]));
    // Revocation reached the derived capability on the other node.
    let e = holder.copy(&held, &sink, None).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Revoked), "{e}");
    let e = owner.diminish(&child, 0, 1, Rights::READ).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Revoked), "{e}");
}

#[test]
fn monitor_fires_on_owner_exit() {
    let nodes = cluster(2);
    let owner = attach(&nodes[0], "owner");
    let watcher = attach(&nodes[1], "watcher");
    let svc = owner.request_create(1, &[], &[]).unwrap();
    let svc = share(&owner, svc, &watcher, "svc").as_request().unwrap();
    let notify = watcher.request_create(5, &[], &[]).unwrap();
    watcher.monitor(svc, &notify).unwrap();
    assert!(watcher
        .next_invocation_timeout(Duration::from_millis(20))
        .unwrap_err()
        .is_timeout());

    owner.close();
    let inv = watcher.next_invocation().unwrap();
    assert_eq!(inv.tag, 5);
    let e = watcher.invoke(&svc, &[], &[]).unwrap_err();
    assert!(
        matches!(e.code(), Some(ErrorCode::Revoked | ErrorCode::OwnerGone)),
        "{e}"
    );
    // The owner's names are withdrawn.
    assert_eq!(
        retry_until_gone(&watcher, "svc").code(),
        Some(ErrorCode::NameNotFound)
    );
}

#[test]
fn lookup_waits_for_a_later_publish() {
    let nodes = cluster(2);
    let publisher = attach(&nodes[0], "publisher");
    let client = attach(&nodes[1], "client");
    let req = publisher.request_create(3, &[], &[]).unwrap();

    // The name does not exist yet: a bounded wait ends with NameNotFound.
    let t = Instant::now();
    let e = retry(|| client.lookup("later", Duration::from_millis(150))).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NameNotFound), "{e}");
    assert!(t.elapsed() >= Duration::from_millis(140));

    // A lookup waiting in another thread gets the capability once published.
    let c2 = client.clone();
    let waiter = std::thread::spawn(move || c2.lookup("later", WAIT));
    retry(|| publisher.publish("later", req)).unwrap();
    let cap = waiter.join().unwrap().unwrap();
    let cap = cap.as_request().unwrap();
    client.invoke(&cap, b"hi", &[]).unwrap();
    let inv = publisher.next_invocation().unwrap();
    assert_eq!((inv.tag, inv.imms.as_slice()), (3, &b"hi"[..]));
}

/// Four threads of `client` invoke `echo` 50 times each with `reply` as
/// the continuation; every one of the 200 answers (tag 2) comes, once.
fn echo_from_four_threads(client: &Process, echo: RequestCap, reply: RequestCap) {
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let c = client.clone();
            std::thread::spawn(move || {
                for i in 0..50u8 {
                    c.invoke(&echo, &[t, i], &[reply.into()]).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let inv = client.next_invocation().unwrap();
        assert_eq!(inv.tag, 2);
        assert!(seen.insert(inv.imms.clone()), "duplicate {:?}", inv.imms);
    }
    assert_eq!(seen.len(), 200);
}

#[test]
fn serve_dispatches_handlers_on_the_pool() {
    let nodes = cluster(1);
    let server = attach(&nodes[0], "server");
    let client = attach(&nodes[0], "client");
    // Echo: invoke the continuation (cap 0) with the same immediates.
    server.serve(1, |p, inv| {
        let k = inv.request(0).expect("continuation");
        p.invoke(&k, &inv.imms, &[]).expect("reply");
        p.drop_cap(k).expect("drop");
    });
    let echo = server.request_create(1, &[], &[]).unwrap();
    let echo = share(&server, echo, &client, "echo").as_request().unwrap();
    let reply = client.request_create(2, &[], &[]).unwrap();

    // Several client threads at once.
    echo_from_four_threads(&client, echo, reply);
    assert!(client
        .next_invocation_timeout(Duration::from_millis(10))
        .unwrap_err()
        .is_timeout());

    // Without a handler, invocations queue for next_invocation.
    assert!(server.unserve(1));
    client.invoke(&echo, b"q", &[reply.into()]).unwrap();
    let inv = server.next_invocation().unwrap();
    assert_eq!(inv.imms, b"q");
}

#[test]
fn serve_takes_over_already_queued_invocations() {
    let nodes = cluster(1);
    let p = attach(&nodes[0], "p");
    let req = p.request_create(11, &[], &[]).unwrap();
    p.invoke(&req, b"early", &[]).unwrap();
    assert_eq!(p.queued_invocations(), 1);
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    p.serve(11, move |_, inv| {
        let _ = tx.lock().unwrap().send(inv.imms);
    });
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), b"early");
    assert_eq!(p.queued_invocations(), 0);
}

/// A raw process that attaches, creates a Memory capability and publishes
/// it, then never answers the controller's memory reads.
fn stalled_owner(addr: SocketAddr, name: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let send = |s: &mut TcpStream, m: ProcessMsg| {
        let mut f = Vec::new();
        m.encode(&mut f);
        s.write_all(&f).unwrap();
    };
    let recv = |s: &mut TcpStream| {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut frame = len.to_vec();
        frame.resize(4 + u32::from_le_bytes(len) as usize, 0);
        s.read_exact(&mut frame[4..]).unwrap();
        ControllerMsg::decode(frame_body(&frame, MAX_FRAME_LEN).unwrap()).unwrap()
    };
    send(
        &mut s,
        ProcessMsg::Attach {
            name: name.into(),
            token: token(name),
        },
    );
    assert!(matches!(recv(&mut s), ControllerMsg::Attached { .. }));
    send(
        &mut s,
        ProcessMsg::MemoryCreate {
            op: 1,
            addr: 0,
            len: 1000,
            rights: Rights::READ,
        },
    );
    let cap = match recv(&mut s) {
        ControllerMsg::Completion {
            result: Ok(Reply::Cap { handle, .. }),
            ..
        } => handle,
        other => panic!("{other:?}"),
    };
    send(
        &mut s,
        ProcessMsg::Publish {
            op: 2,
            name: b"stalled".to_vec(),
            cap,
        },
    );
    assert!(matches!(
        recv(&mut s),
        ControllerMsg::Completion {
            result: Ok(Reply::Done),
            ..
        }
    ));
    s
}

#[test]
fn a_wait_that_cannot_complete_times_out() {
    let nodes = cluster(1);
    let _stalled = stalled_owner(nodes[0].process_addr(), "stalled");
    let p = attach(&nodes[0], "p");
    let src = p.lookup("stalled", WAIT).unwrap().as_memory().unwrap();
    let r = p.register(1000).unwrap();
    let dst = p.memory_create(&r, 0, 1000, Rights::WRITE).unwrap();

    let short = p.with_timeout(Duration::from_millis(100));
    assert_eq!(short.timeout(), Duration::from_millis(100));
    let t = Instant::now();
    let e = short.copy(&src, &dst, None).unwrap_err();
    assert!(e.is_timeout(), "{e}");
    assert!(t.elapsed() >= Duration::from_millis(100));
    assert!(e.to_string().contains("copy"), "{e}");
    // Nothing invokes us: waiting for an invocation times out too.
    assert!(short.next_invocation().unwrap_err().is_timeout());
    // The channel is fine after a timeout.
    let m = p.memory_create(&r, 0, 10, Rights::READ).unwrap();
    assert_eq!(m.len(), 10);
}

#[test]
fn controller_shutdown_disconnects_with_a_typed_error() {
    let mut nodes = cluster(1);
    let p = attach(&nodes[0], "p");
    let p2 = p.clone();
    let waiter = std::thread::spawn(move || p2.next_invocation());
    nodes.pop().unwrap().shutdown();
    let e = waiter.join().unwrap().unwrap_err();
    assert!(e.is_disconnected(), "{e}");
    assert!(!p.is_connected());
    assert!(matches!(
        p.disconnect_reason(),
        Some(DisconnectReason::ControllerClosed | DisconnectReason::Io(_))
    ));
    let e = p.request_create(1, &[], &[]).unwrap_err();
    assert!(e.is_disconnected(), "{e}");
    assert!(e.to_string().contains("attach again"), "{e}");
}

#[test]
fn closing_fails_pending_waits_and_releases_names() {
    let nodes = cluster(1);
    let p = attach(&nodes[0], "p");
    let q = attach(&nodes[0], "q");
    let req = p.request_create(1, &[], &[]).unwrap();
    p.publish("p/svc", req).unwrap();
    let p2 = p.clone();
    let waiter = std::thread::spawn(move || p2.next_invocation());
    p.close();
    let e = waiter.join().unwrap().unwrap_err();
    assert!(matches!(
        e,
        SdkError::Disconnected {
            reason: DisconnectReason::Closed
        }
    ));
    // The controller saw the exit: the name is withdrawn.
    let e = retry_until_gone(&q, "p/svc");
    assert_eq!(e.code(), Some(ErrorCode::NameNotFound));
}

/// Looks `name` up until it is gone (the controller handles the exit
/// asynchronously), at most [`WAIT`].
fn retry_until_gone(q: &Process, name: &str) -> SdkError {
    let deadline = Instant::now() + WAIT;
    loop {
        match q.lookup(name, Duration::ZERO) {
            Err(e) => return e,
            Ok(c) => {
                q.drop_cap(c).unwrap();
                assert!(Instant::now() < deadline, "{name} still published");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

#[test]
fn revoke_and_drop_of_request_caps() {
    let nodes = cluster(1);
    let p = attach(&nodes[0], "p");
    let q = attach(&nodes[0], "q");
    let req = p.request_create(1, b"x", &[]).unwrap();
    let held = share(&p, req, &q, "r").as_request().unwrap();
    let derived = q.derive(&held, b"y", &[]).unwrap();
    q.invoke(&derived, b"z", &[]).unwrap();
    assert_eq!(p.next_invocation().unwrap().imms, b"xyz");
    // Revoking the holder's node kills what was derived from it only.
    q.revoke(held).unwrap();
    let e = q.invoke(&derived, &[], &[]).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Revoked));
    p.invoke(&req, b"still", &[]).unwrap();
    assert_eq!(p.next_invocation().unwrap().imms, b"xstill");
    q.drop_cap(Cap::from(held)).unwrap();
    q.drop_cap(derived).unwrap();
}

#[test]
fn pipelined_operations_from_one_thread() {
    let nodes = cluster(1);
    let p = attach(&nodes[0], "p");
    let q = attach(&nodes[0], "q");
    let req = p.request_create(6, &[], &[]).unwrap();
    let req = share(&p, req, &q, "svc").as_request().unwrap();
    let pending: Vec<_> = (0..64u8)
        .map(|i| q.start_invoke(&req, &[i], &[]).unwrap())
        .collect();
    let ids: std::collections::BTreeSet<u64> = pending.iter().map(|op| op.op_id()).collect();
    assert_eq!(ids.len(), 64);
    for op in pending {
        op.wait().unwrap();
    }
    // Delivery keeps the order of the invocations on one channel.
    for i in 0..64u8 {
        assert_eq!(p.next_invocation().unwrap().imms, [i]);
    }
    // Pipelined copies between regions of one process.
    let a = q.register_vec(pattern(4096, 1)).unwrap();
    let b = q.register(4096 * 4).unwrap();
    let src = q.memory_create(&a, 0, 4096, Rights::READ).unwrap();
    let dsts: Vec<MemoryCap> = (0..4)
        .map(|i| q.memory_create(&b, i * 4096, 4096, Rights::WRITE).unwrap())
        .collect();
    let copies: Vec<_> = dsts
        .iter()
        .map(|d| q.start_copy(&src, d, None).unwrap())
        .collect();
    for c in copies {
        c.wait().unwrap();
    }
    assert!(b.to_vec().chunks(4096).all(|c| c == a.to_vec()));
    // An answer nobody waits for is abandoned without harm.
    drop(q.start_request_create(1, &[], &[]).unwrap());
    let e = q.start_lookup("absent", Duration::ZERO).unwrap().wait();
    assert_eq!(e.unwrap_err().code(), Some(ErrorCode::NameNotFound));
}

#[test]
fn controller_crash_gives_typed_errors_in_bounded_time() {
    let mut nodes = cluster_with(3, |c| {
        c.heartbeat_interval = Duration::from_millis(50);
        c.peer_timeout = Duration::from_millis(300);
        c.op_timeout = Duration::from_millis(500);
    });
    let owner = attach(&nodes[2], "owner");
    let user = attach(&nodes[0], "user");
    let r = owner.register(100).unwrap();
    let mem = owner.memory_create(&r, 0, 100, Rights::READ).unwrap();
    let svc = owner.request_create(1, &[], &[]).unwrap();
    let mem = share(&owner, mem, &user, "crash/mem").as_memory().unwrap();
    let svc = share(&owner, svc, &user, "crash/svc").as_request().unwrap();
    user.invoke(&svc, &[], &[]).unwrap();
    assert_eq!(owner.next_invocation().unwrap().tag, 1);
    // Between the survivors (set up now: a name may be homed on the node
    // about to die).
    let other = attach(&nodes[1], "other");
    let req = user.request_create(2, &[], &[]).unwrap();
    let req = share(&user, req, &other, "alive").as_request().unwrap();

    // The owner's controller dies.
    nodes.pop().unwrap().shutdown();
    assert!(owner.next_invocation().unwrap_err().is_disconnected());
    let dst_r = user.register(100).unwrap();
    let dst = user.memory_create(&dst_r, 0, 100, Rights::WRITE).unwrap();
    let t = Instant::now();
    let e = user.invoke(&svc, &[], &[]).unwrap_err();
    assert!(
        matches!(
            e.code(),
            Some(ErrorCode::PeerUnreachable | ErrorCode::Timeout | ErrorCode::OwnerGone)
        ),
        "{e}"
    );
    let e = user.copy(&mem, &dst, None).unwrap_err();
    assert!(
        matches!(
            e.code(),
            Some(ErrorCode::PeerUnreachable | ErrorCode::Timeout | ErrorCode::OwnerGone)
        ),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // The surviving controllers keep serving.
    other.invoke(&req, b"ok", &[]).unwrap();
    assert_eq!(user.next_invocation().unwrap().imms, b"ok");
}

#[test]
fn handlers_run_in_the_callers_loop_without_a_pool() {
    let nodes = cluster(1);
    let p = Process::attach(
        nodes[0].process_addr(),
        "p",
        token("p"),
        opts().handler_threads(0),
    )
    .unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let caller = std::thread::current().id();
    p.serve(4, move |p, inv| {
        assert_eq!(std::thread::current().id(), caller);
        // Handlers may use the process (here: create and drop a cap).
        let r = p.request_create(5, &[], &[]).unwrap();
        p.drop_cap(r).unwrap();
        s2.lock().unwrap().push(inv.imms);
    });
    let req = p.request_create(4, &[], &[]).unwrap();
    p.invoke(&req, b"a", &[]).unwrap();
    p.invoke(&req, b"b", &[]).unwrap();
    assert_eq!(p.dispatch(WAIT).unwrap(), 4);
    assert_eq!(p.dispatch(WAIT).unwrap(), 4);
    assert!(p
        .dispatch(Duration::from_millis(10))
        .unwrap_err()
        .is_timeout());
    assert_eq!(*seen.lock().unwrap(), vec![b"a".to_vec(), b"b".to_vec()]);
    p.clone().close();
    assert!(p.dispatch(WAIT).unwrap_err().is_disconnected());
}

#[test]
fn serve_inline_answers_on_the_reader_thread() {
    let nodes = cluster(1);
    let server = attach(&nodes[0], "server");
    let client = attach(&nodes[0], "client");
    let req = server.request_create(1, &[], &[]).unwrap();
    let echo = share(&server, req, &client, "echo").as_request().unwrap();
    let reply = client.request_create(2, &[], &[]).unwrap();
    // Queued before the handler exists: run by serve_inline's caller.
    client.invoke(&echo, b"early", &[reply.into()]).unwrap();
    let t = Instant::now();
    while server.queued_invocations() == 0 {
        assert!(t.elapsed() < WAIT, "the invocation never queued");
        std::thread::sleep(Duration::from_millis(2));
    }
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    // Echo through the continuation; its waits read the channel themselves.
    server.serve_inline(1, move |p, inv| {
        let thread = std::thread::current().name().unwrap_or("").to_owned();
        let k = inv.request(0).expect("continuation");
        p.invoke(&k, &inv.imms, &[]).expect("reply");
        p.drop_cap(k).expect("drop");
        let _ = tx.lock().unwrap().send(thread);
    });
    let first = rx.recv_timeout(WAIT).unwrap();
    assert!(!first.starts_with("fractos-sdk-reader"), "{first}");
    assert_eq!(client.next_invocation().unwrap().imms, b"early");

    // Several client threads at once: every answer comes, once.
    echo_from_four_threads(&client, echo, reply);
    for _ in 0..200 {
        let thread = rx.recv_timeout(WAIT).unwrap();
        assert!(thread.starts_with("fractos-sdk-reader"), "{thread}");
    }
    // Operations of the application's threads still complete meanwhile.
    let other = server.request_create(99, &[], &[]).unwrap();
    server.publish("still", other).unwrap();
}

#[test]
fn closing_a_process_while_an_inline_handler_waits_fails_its_wait() {
    let nodes = cluster(1);
    let server = attach(&nodes[0], "server");
    let client = attach(&nodes[0], "client");
    let req = server.request_create(5, &[], &[]).unwrap();
    let cap = share(&server, req, &client, "slow").as_request().unwrap();
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let (started_tx, started_rx) = mpsc::channel();
    let started_tx = std::sync::Mutex::new(started_tx);
    server.serve_inline(5, move |p, _inv| {
        let _ = started_tx.lock().unwrap().send(());
        // Never published: the lookup waits until the channel closes.
        let r = p.lookup("never/there", Duration::from_secs(30));
        let _ = tx.lock().unwrap().send(r.map(drop));
    });
    client.invoke(&cap, &[], &[]).unwrap();
    started_rx.recv_timeout(WAIT).unwrap();
    let t = Instant::now();
    server.close();
    match rx.recv_timeout(WAIT).unwrap() {
        Err(SdkError::Disconnected { .. }) => {}
        other => panic!("expected Disconnected, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}
