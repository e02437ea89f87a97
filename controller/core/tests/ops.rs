//! Each operation's success path and error paths, on one and several
//! controllers, through the real wire encoding.

mod harness;

use std::time::Duration;

use fractos_core::CloseReason;
use fractos_wire::{ControllerMsg, ErrorCode, Handle, ObjectKind, ProcessMsg, Reply, Rights};
use harness::{handle, Net};

fn mem(net: &mut Net, p: usize, addr: u64, len: u64, rights: Rights) -> Handle {
    handle(net.op(p, |op| ProcessMsg::MemoryCreate {
        op,
        addr,
        len,
        rights,
    }))
}

fn req(net: &mut Net, p: usize, tag: u64, imms: &[u8], caps: Vec<Handle>) -> Handle {
    handle(net.op(p, |op| ProcessMsg::RequestCreate {
        op,
        tag,
        imms: imms.to_vec(),
        caps,
    }))
}

fn invoke(
    net: &mut Net,
    p: usize,
    cap: Handle,
    imms: &[u8],
    caps: Vec<Handle>,
) -> Result<Reply, ErrorCode> {
    net.op(p, |op| ProcessMsg::Invoke {
        op,
        cap,
        imms: imms.to_vec(),
        caps,
    })
}

/// Publishes `cap` from `p` and looks it up from `q`.
fn share(net: &mut Net, p: usize, cap: Handle, q: usize, name: &str) -> Handle {
    let n = name.as_bytes().to_vec();
    assert_eq!(
        net.op(p, |op| ProcessMsg::Publish {
            op,
            name: n.clone(),
            cap
        }),
        Ok(Reply::Done)
    );
    handle(net.op(q, |op| ProcessMsg::Lookup {
        op,
        name: n,
        wait_ms: 0,
    }))
}

#[test]
fn attach_accepts_valid_token_and_rejects_others() {
    let mut net = Net::new(1);
    let p = net.attach(0, "app");
    assert!(matches!(
        net.procs[p].inbox[0],
        ControllerMsg::Attached { .. }
    ));
    let bad = net.attach_with(0, "app", [0; 32]);
    assert!(matches!(
        net.procs[bad].inbox[0],
        ControllerMsg::Rejected {
            code: ErrorCode::AuthFailed,
            ..
        }
    ));
    assert_eq!(net.procs[bad].closed, Some(CloseReason::AuthFailed));
    let early = net.connect(0);
    net.send(
        early,
        &ProcessMsg::Revoke {
            op: 1,
            cap: Handle(0),
        },
    );
    assert!(matches!(
        net.procs[early].inbox[0],
        ControllerMsg::Rejected {
            code: ErrorCode::NotAttached,
            ..
        }
    ));
    assert!(net.procs[early].closed.is_some());
    assert_eq!(net.ctrls[0].stats().processes, 1);
}

#[test]
fn malformed_and_wrong_version_messages_disconnect_only_the_sender() {
    let mut net = Net::new(1);
    let good = net.attach(0, "good");
    let m = mem(&mut net, good, 0, 64, Rights::READ_WRITE);
    let bad = net.attach(0, "bad");
    net.send_raw(bad, &[3, 0, 0, 0, fractos_wire::PROTOCOL_VERSION, 200, 0]);
    assert!(net.procs[bad].inbox.iter().any(|m| matches!(
        m,
        ControllerMsg::Rejected {
            code: ErrorCode::Malformed,
            ..
        }
    )));
    assert_eq!(net.procs[bad].closed, Some(CloseReason::Malformed));
    let old = net.attach(0, "old");
    net.send_raw(old, &[2, 0, 0, 0, 9, 1]);
    assert!(net.procs[old].inbox.iter().any(|m| matches!(
        m,
        ControllerMsg::Rejected {
            code: ErrorCode::VersionMismatch,
            ..
        }
    )));
    // The well-behaved process keeps its state.
    let d = net.op(good, |op| ProcessMsg::Diminish {
        op,
        cap: m,
        offset: 0,
        len: 8,
        rights: Rights::READ,
    });
    assert!(d.is_ok());
    assert_eq!(net.ctrls[0].stats().processes, 1);
    net.check();
}

#[test]
fn memory_create_and_diminish() {
    let mut net = Net::new(1);
    let p = net.attach(0, "p");
    let r = net.op(p, |op| ProcessMsg::MemoryCreate {
        op,
        addr: 16,
        len: 100,
        rights: Rights::READ_WRITE,
    });
    let Ok(Reply::Cap { handle: m, info }) = r else {
        panic!("{r:?}")
    };
    assert_eq!(
        (info.kind, info.len, info.rights),
        (ObjectKind::Memory, 100, Rights::READ_WRITE)
    );
    let zero = net.op(p, |op| ProcessMsg::MemoryCreate {
        op,
        addr: 0,
        len: 0,
        rights: Rights::READ,
    });
    assert_eq!(zero, Err(ErrorCode::InvalidArgument));
    let wrap = net.op(p, |op| ProcessMsg::MemoryCreate {
        op,
        addr: u64::MAX,
        len: 2,
        rights: Rights::READ,
    });
    assert_eq!(wrap, Err(ErrorCode::InvalidArgument));

    let r = net.op(p, |op| ProcessMsg::Diminish {
        op,
        cap: m,
        offset: 10,
        len: 20,
        rights: Rights::READ,
    });
    let Ok(Reply::Cap { handle: d, info }) = r else {
        panic!("{r:?}")
    };
    assert_eq!((info.len, info.rights), (20, Rights::READ));
    let oob = net.op(p, |op| ProcessMsg::Diminish {
        op,
        cap: d,
        offset: 10,
        len: 11,
        rights: Rights::READ,
    });
    assert_eq!(oob, Err(ErrorCode::OutOfBounds));
    let grow = net.op(p, |op| ProcessMsg::Diminish {
        op,
        cap: d,
        offset: 0,
        len: 4,
        rights: Rights::READ_WRITE,
    });
    assert_eq!(grow, Err(ErrorCode::MissingRight));
    let bad = net.op(p, |op| ProcessMsg::Diminish {
        op,
        cap: Handle(77),
        offset: 0,
        len: 1,
        rights: Rights::READ,
    });
    assert_eq!(bad, Err(ErrorCode::BadHandle));
    let rq = req(&mut net, p, 1, &[], vec![]);
    let wrong = net.op(p, |op| ProcessMsg::Diminish {
        op,
        cap: rq,
        offset: 0,
        len: 1,
        rights: Rights::READ,
    });
    assert_eq!(wrong, Err(ErrorCode::WrongType));
    net.check();
}

#[test]
fn invoke_delivers_tag_bound_and_invoker_arguments_across_nodes() {
    let mut net = Net::new(2);
    let server = net.attach(0, "server");
    let client = net.attach(1, "client");
    let bound_mem = mem(&mut net, server, 0, 64, Rights::READ);
    let r = req(&mut net, server, 77, b"ab", vec![bound_mem]);
    let remote = share(&mut net, server, r, client, "svc");
    // Derive (curry) on the client: the owner registers the derivation.
    let client_mem = mem(&mut net, client, 128, 32, Rights::READ_WRITE);
    let derived = handle(net.op(client, |op| ProcessMsg::Derive {
        op,
        cap: remote,
        imms: b"cd".to_vec(),
        caps: vec![client_mem],
    }));
    assert_eq!(
        invoke(&mut net, client, derived, b"ef", vec![client_mem]),
        Ok(Reply::Done)
    );
    let inv = net.invocations(server);
    assert_eq!(inv.len(), 1);
    let (tag, imms, caps) = &inv[0];
    assert_eq!(*tag, 77);
    assert_eq!(imms, b"abcdef");
    assert_eq!(caps.len(), 3);
    assert_eq!(caps[0].1.len, 64);
    assert_eq!(caps[1].1.len, 32);
    assert_eq!(caps[2].1.rights, Rights::READ_WRITE);
    // The received capabilities are usable: diminish the client's memory.
    let h = caps[2].0;
    let d = net.op(server, |op| ProcessMsg::Diminish {
        op,
        cap: h,
        offset: 0,
        len: 8,
        rights: Rights::READ,
    });
    assert!(d.is_ok());
    // Wrong type and bad handle.
    assert_eq!(
        invoke(&mut net, client, client_mem, b"", vec![]),
        Err(ErrorCode::WrongType)
    );
    assert_eq!(
        invoke(&mut net, client, Handle(999), b"", vec![]),
        Err(ErrorCode::BadHandle)
    );
    assert_eq!(
        invoke(&mut net, client, remote, b"", vec![Handle(999)]),
        Err(ErrorCode::BadHandle)
    );
    net.check();
}

#[test]
fn copy_moves_bytes_owner_to_owner_and_invokes_completion() {
    let mut net = Net::new(3);
    let storage = net.attach(0, "storage");
    let compute = net.attach(1, "compute");
    let app = net.attach(2, "app");
    let src = mem(&mut net, storage, 1000, 5000, Rights::READ);
    let dst = mem(&mut net, compute, 2000, 6000, Rights::WRITE);
    let done = req(&mut net, compute, 5, b"done", vec![]);
    let s = share(&mut net, storage, src, app, "src");
    let d = share(&mut net, compute, dst, app, "dst");
    let c = share(&mut net, compute, done, app, "done");
    let before = net.ctrls[2].metrics().peer_bytes_in;
    let r = net.op(app, |op| ProcessMsg::Copy {
        op,
        src: s,
        dst: d,
        completion: Some(c),
    });
    assert_eq!(r, Ok(Reply::Done));
    assert_eq!(
        net.procs[compute].memory[2000..7000],
        net.procs[storage].memory[1000..6000]
    );
    assert_ne!(
        net.procs[compute].memory[7000], net.procs[storage].memory[6000],
        "only len(src) bytes move"
    );
    let inv = net.invocations(compute);
    assert_eq!(inv.len(), 1);
    assert_eq!(inv[0].1, b"done");
    // The bytes never went through the invoker's controller.
    assert!(net.ctrls[2].metrics().peer_bytes_in - before < 1000);
    assert_eq!(net.ctrls[0].metrics().bytes_copied_out, 5000);
    assert_eq!(net.ctrls[1].metrics().bytes_copied_in, 5000);

    // Size mismatch, missing rights, wrong type.
    assert_eq!(
        net.op(app, |op| ProcessMsg::Copy {
            op,
            src: d,
            dst: s,
            completion: None
        }),
        Err(ErrorCode::MissingRight)
    );
    let small = mem(&mut net, compute, 0, 10, Rights::READ_WRITE);
    let small_app = share(&mut net, compute, small, app, "small");
    assert_eq!(
        net.op(app, |op| ProcessMsg::Copy {
            op,
            src: s,
            dst: small_app,
            completion: None
        }),
        Err(ErrorCode::SizeMismatch)
    );
    assert_eq!(
        net.op(app, |op| ProcessMsg::Copy {
            op,
            src: c,
            dst: d,
            completion: None
        }),
        Err(ErrorCode::WrongType)
    );
    net.check();
}

#[test]
fn copy_within_one_node_and_zero_work_edge_cases() {
    let mut net = Net::new(1);
    let p = net.attach(0, "p");
    let q = net.attach(0, "q");
    let a = mem(&mut net, p, 0, 3000, Rights::READ_WRITE);
    let b = mem(&mut net, q, 10_000, 3000, Rights::READ_WRITE);
    let b_p = share(&mut net, q, b, p, "b");
    assert_eq!(
        net.op(p, |op| ProcessMsg::Copy {
            op,
            src: a,
            dst: b_p,
            completion: None
        }),
        Ok(Reply::Done)
    );
    assert_eq!(
        net.procs[q].memory[10_000..13_000],
        net.procs[p].memory[0..3000]
    );
    assert_eq!(net.counts()["copies"], 0);
    net.check();
}

#[test]
fn copy_fails_with_memory_fault_when_owner_cannot_serve() {
    let mut net = Net::new(2);
    let p = net.attach(0, "p");
    let q = net.attach(1, "q");
    let a = mem(&mut net, p, 65_000, 1000, Rights::READ); // beyond the test memory
    let b = mem(&mut net, q, 0, 1000, Rights::WRITE);
    let b_p = share(&mut net, q, b, p, "b");
    assert_eq!(
        net.op(p, |op| ProcessMsg::Copy {
            op,
            src: a,
            dst: b_p,
            completion: None
        }),
        Err(ErrorCode::MemoryFault)
    );
    assert_eq!(net.counts()["copies"], 0);
}

#[test]
fn copy_times_out_when_a_process_never_answers() {
    let mut net = Net::new(2);
    let p = net.attach(0, "p");
    let q = net.attach(1, "q");
    let a = mem(&mut net, p, 0, 1000, Rights::READ);
    let b = mem(&mut net, q, 0, 1000, Rights::WRITE);
    let b_p = share(&mut net, q, b, p, "b");
    net.procs[q].serve_memory = false;
    let op = net.start(p, |op| ProcessMsg::Copy {
        op,
        src: a,
        dst: b_p,
        completion: None,
    });
    assert_eq!(net.completion(p, op), None);
    net.advance(Duration::from_secs(6));
    assert_eq!(net.completion(p, op), Some(Err(ErrorCode::Timeout)));
    net.advance(Duration::from_secs(6));
    assert_eq!(net.counts()["copies"], 0);
}

#[test]
fn revoke_is_transitive_across_nodes_and_spares_siblings() {
    let mut net = Net::new(3);
    let owner = net.attach(0, "owner");
    let b = net.attach(1, "b");
    let c = net.attach(2, "c");
    let r = req(&mut net, owner, 1, &[], vec![]);
    let for_b = share(&mut net, owner, r, b, "r");
    // b derives and hands the derivation to c.
    let b_derived = handle(net.op(b, |op| ProcessMsg::Derive {
        op,
        cap: for_b,
        imms: vec![1],
        caps: vec![],
    }));
    let at_c = share(&mut net, b, b_derived, c, "r2");
    // A sibling lookup stays valid.
    let sibling = handle(net.op(c, |op| ProcessMsg::Lookup {
        op,
        name: b"r".to_vec(),
        wait_ms: 0,
    }));
    assert_eq!(invoke(&mut net, c, at_c, b"", vec![]), Ok(Reply::Done));
    // b revokes its derivation: c's copy dies, c's sibling does not.
    assert_eq!(
        net.op(b, |op| ProcessMsg::Revoke { op, cap: b_derived }),
        Ok(Reply::Done)
    );
    assert_eq!(
        invoke(&mut net, c, at_c, b"", vec![]),
        Err(ErrorCode::Revoked)
    );
    assert_eq!(
        invoke(&mut net, b, b_derived, b"", vec![]),
        Err(ErrorCode::Revoked)
    );
    assert_eq!(invoke(&mut net, c, sibling, b"", vec![]), Ok(Reply::Done));
    assert_eq!(invoke(&mut net, b, for_b, b"", vec![]), Ok(Reply::Done));
    // Deriving from a revoked capability fails too.
    let d = net.op(c, |op| ProcessMsg::Derive {
        op,
        cap: at_c,
        imms: vec![],
        caps: vec![],
    });
    assert_eq!(d, Err(ErrorCode::Revoked));
    // The owner revokes the root: everything dies, the object too.
    assert_eq!(
        net.op(owner, |op| ProcessMsg::Revoke { op, cap: r }),
        Ok(Reply::Done)
    );
    assert_eq!(
        invoke(&mut net, c, sibling, b"", vec![]),
        Err(ErrorCode::Revoked)
    );
    assert_eq!(
        net.op(owner, |op| ProcessMsg::Revoke { op, cap: r }),
        Err(ErrorCode::Revoked)
    );
    assert_eq!(net.ctrls[0].stats().objects, 0);
    net.check();
}

/// A copy `p` → `q` of 20,000 bytes in 1,024-byte chunks, 2 in flight,
/// with the destination published to `p`. Returns (p, q, src, dst at q,
/// dst at p).
fn copy_setup(net: &mut Net) -> (usize, usize, Handle, Handle, Handle) {
    let p = net.attach(0, "p");
    let q = net.attach(1, "q");
    let a = mem(net, p, 0, 20_000, Rights::READ);
    let b = mem(net, q, 30_000, 20_000, Rights::WRITE);
    let b_p = share(net, q, b, p, "b");
    (p, q, a, b, b_p)
}

/// The destination's owner revokes while writes it was sent are still
/// unanswered: the revoke completes only once they are answered, no chunk
/// is written after it, and the copy fails `Revoked`.
#[test]
fn revoking_the_destination_waits_for_issued_writes_and_stops_the_copy() {
    let mut net = Net::new(2);
    let (p, q, a, b, b_p) = copy_setup(&mut net);
    let before = net.procs[q].memory.clone();
    net.procs[q].serve_memory = false; // writes park in q's inbox
    let copy = net.start(p, |op| ProcessMsg::Copy {
        op,
        src: a,
        dst: b_p,
        completion: None,
    });
    assert_eq!(net.parked(q), (0, 2), "two chunks written, window full");
    let revoke = net.start(q, |op| ProcessMsg::Revoke { op, cap: b });
    assert_eq!(
        net.completion(q, revoke),
        None,
        "the revoke waits for the two writes already issued"
    );
    net.serve_parked(q);
    assert_eq!(net.completion(q, revoke), Some(Ok(Reply::Done)));
    assert_eq!(net.completion(p, copy), Some(Err(ErrorCode::Revoked)));
    // Nothing more is ever written: only the two chunks issued before.
    net.advance(Duration::from_secs(6));
    assert_eq!(net.parked(q), (0, 0));
    let written = (0..net.procs[q].memory.len())
        .filter(|&i| net.procs[q].memory[i] != before[i])
        .count();
    assert!(written <= 2 * 1024, "{written} bytes written");
    assert_eq!(
        &net.procs[q].memory[30_000 + 2048..50_000],
        &before[30_000 + 2048..50_000]
    );
    assert_eq!(net.counts()["copies"], 0);
    net.check();
}

/// The attack: the source's owner answers reads late, after its capability
/// was revoked, with bytes it wrote after the revoke. Nothing lands in the
/// destination and the copy fails `Revoked`.
#[test]
fn a_late_read_reply_after_a_revoke_lands_nowhere() {
    let mut net = Net::new(2);
    let (p, q, a, _b, b_p) = copy_setup(&mut net);
    let before = net.procs[q].memory.clone();
    net.procs[p].serve_memory = false; // reads park in p's inbox
    let copy = net.start(p, |op| ProcessMsg::Copy {
        op,
        src: a,
        dst: b_p,
        completion: None,
    });
    assert_eq!(net.parked(p), (2, 0));
    // No chunk has left the source: the revoke completes at once.
    assert_eq!(
        net.op(p, |op| ProcessMsg::Revoke { op, cap: a }),
        Ok(Reply::Done)
    );
    assert_eq!(net.completion(p, copy), Some(Err(ErrorCode::Revoked)));
    // The owner rewrites its memory and answers the reads now.
    net.procs[p].memory[..20_000].fill(0xEE);
    net.serve_parked(p);
    net.advance(Duration::from_secs(6));
    assert_eq!(net.parked(q), (0, 0));
    assert_eq!(net.procs[q].memory, before, "bytes landed after the revoke");
    assert_eq!(net.counts()["copies"], 0);
    net.check();
}

/// The source is revoked while chunks are on their way to (and being
/// written at) the destination: the revoke completes after those chunks
/// are acknowledged, and no chunk is sent after it.
#[test]
fn revoking_the_source_waits_for_chunks_in_flight() {
    let mut net = Net::new(2);
    let (p, q, a, _b, b_p) = copy_setup(&mut net);
    net.procs[q].serve_memory = false;
    let copy = net.start(p, |op| ProcessMsg::Copy {
        op,
        src: a,
        dst: b_p,
        completion: None,
    });
    assert_eq!(net.parked(q), (0, 2));
    let revoke = net.start(p, |op| ProcessMsg::Revoke { op, cap: a });
    assert_eq!(net.completion(p, revoke), None, "chunks still in flight");
    assert_eq!(net.completion(p, copy), None);
    net.serve_parked(q);
    assert_eq!(net.completion(p, revoke), Some(Ok(Reply::Done)));
    assert_eq!(net.completion(p, copy), Some(Err(ErrorCode::Revoked)));
    net.advance(Duration::from_secs(6));
    assert_eq!(
        net.parked(q),
        (0, 0),
        "a chunk was written after the revoke"
    );
    assert_eq!(net.counts()["copies"], 0);
    net.check();
}

/// A destination process that never answers its writes cannot hold a
/// revoke forever: after the operation timeout the revoke answers
/// `Timeout` (in force, but an issued write may still land).
#[test]
fn a_revoke_waiting_on_a_silent_destination_times_out() {
    let mut net = Net::new(2);
    let (p, q, a, b, b_p) = copy_setup(&mut net);
    net.procs[q].serve_memory = false;
    let copy = net.start(p, |op| ProcessMsg::Copy {
        op,
        src: a,
        dst: b_p,
        completion: None,
    });
    let revoke = net.start(q, |op| ProcessMsg::Revoke { op, cap: b });
    net.advance(Duration::from_secs(6));
    assert_eq!(net.completion(q, revoke), Some(Err(ErrorCode::Timeout)));
    let r = net.completion(p, copy).expect("copy answered");
    assert!(
        matches!(r, Err(ErrorCode::Revoked | ErrorCode::Timeout)),
        "{r:?}"
    );
    // Using the revoked capability fails at once.
    assert_eq!(
        net.op(p, |op| ProcessMsg::Copy {
            op,
            src: a,
            dst: b_p,
            completion: None,
        }),
        Err(ErrorCode::Revoked)
    );
    net.check();
}

#[test]
fn drop_removes_only_the_handle() {
    let mut net = Net::new(2);
    let p = net.attach(0, "p");
    let q = net.attach(1, "q");
    let r = req(&mut net, p, 3, &[], vec![]);
    let at_q = share(&mut net, p, r, q, "r");
    assert_eq!(
        net.op(q, |op| ProcessMsg::Drop { op, cap: at_q }),
        Ok(Reply::Done)
    );
    assert_eq!(
        invoke(&mut net, q, at_q, b"", vec![]),
        Err(ErrorCode::BadHandle)
    );
    assert_eq!(
        net.op(q, |op| ProcessMsg::Drop { op, cap: at_q }),
        Err(ErrorCode::BadHandle)
    );
    assert_eq!(invoke(&mut net, p, r, b"", vec![]), Ok(Reply::Done));
    net.check();
}

#[test]
fn dropping_every_handle_collects_the_object() {
    let mut net = Net::new(2);
    let p = net.attach(0, "p");
    let q = net.attach(1, "q");
    let m = mem(&mut net, p, 0, 10, Rights::READ);
    let r = req(&mut net, p, 1, &[], vec![m]);
    let at_q = share(&mut net, p, r, q, "r");
    assert_eq!(
        net.op(p, |op| ProcessMsg::Unpublish {
            op,
            name: b"r".to_vec()
        }),
        Ok(Reply::Done)
    );
    for h in [m, r] {
        assert_eq!(
            net.op(p, |op| ProcessMsg::Drop { op, cap: h }),
            Ok(Reply::Done)
        );
    }
    assert_eq!(
        net.ctrls[0].stats().objects,
        2,
        "q still holds the request, which binds the memory"
    );
    assert_eq!(
        net.op(q, |op| ProcessMsg::Drop { op, cap: at_q }),
        Ok(Reply::Done)
    );
    assert_eq!(net.ctrls[0].stats().objects, 0);
    assert_eq!(net.ctrls[0].stats().caps, 0);
    net.check();
}

#[test]
fn monitors_fire_on_revoke_and_on_owner_exit() {
    let mut net = Net::new(2);
    let owner = net.attach(0, "owner");
    let watcher = net.attach(1, "watcher");
    let m1 = mem(&mut net, owner, 0, 10, Rights::READ);
    let m2 = mem(&mut net, owner, 10, 10, Rights::READ);
    let w1 = share(&mut net, owner, m1, watcher, "m1");
    let w2 = share(&mut net, owner, m2, watcher, "m2");
    let n1 = req(&mut net, watcher, 101, &[], vec![]);
    let n2 = req(&mut net, watcher, 102, &[], vec![]);
    assert_eq!(
        net.op(watcher, |op| ProcessMsg::Monitor {
            op,
            cap: w1,
            notify: n1
        }),
        Ok(Reply::Done)
    );
    assert_eq!(
        net.op(watcher, |op| ProcessMsg::Monitor {
            op,
            cap: w2,
            notify: n2
        }),
        Ok(Reply::Done)
    );
    assert!(net.invocations(watcher).is_empty());
    assert_eq!(
        net.op(owner, |op| ProcessMsg::Revoke { op, cap: m1 }),
        Ok(Reply::Done)
    );
    let tags: Vec<u64> = net.invocations(watcher).iter().map(|i| i.0).collect();
    assert_eq!(tags, vec![101]);
    net.exit(owner);
    let tags: Vec<u64> = net.invocations(watcher).iter().map(|i| i.0).collect();
    assert_eq!(tags, vec![102]);
    // Monitoring a dead capability is an error; a non-Request notify too.
    let r = net.op(watcher, |op| ProcessMsg::Monitor {
        op,
        cap: w1,
        notify: n1,
    });
    assert_eq!(r, Err(ErrorCode::Revoked));
    let r = net.op(watcher, |op| ProcessMsg::Monitor {
        op,
        cap: n1,
        notify: w1,
    });
    assert_eq!(r, Err(ErrorCode::WrongType));
    assert_eq!(net.ctrls[0].stats().monitors, 0);
    net.check();
}

#[test]
fn names_publish_lookup_wait_and_errors() {
    let mut net = Net::new(3);
    let a = net.attach(0, "a");
    let b = net.attach(1, "b");
    let r = req(&mut net, a, 9, &[], vec![]);
    let missing = net.op(b, |op| ProcessMsg::Lookup {
        op,
        name: b"svc".to_vec(),
        wait_ms: 0,
    });
    assert_eq!(missing, Err(ErrorCode::NameNotFound));
    // A waiting lookup is answered when the name appears.
    let waiting = net.start(b, |op| ProcessMsg::Lookup {
        op,
        name: b"svc".to_vec(),
        wait_ms: 1000,
    });
    net.advance(Duration::from_millis(100));
    assert_eq!(net.completion(b, waiting), None);
    assert_eq!(
        net.op(a, |op| ProcessMsg::Publish {
            op,
            name: b"svc".to_vec(),
            cap: r
        }),
        Ok(Reply::Done)
    );
    let h = handle(net.completion(b, waiting).expect("woken by publish"));
    assert_eq!(invoke(&mut net, b, h, b"", vec![]), Ok(Reply::Done));
    // Taken, unpublish by a stranger, unpublish by the publisher.
    assert_eq!(
        net.op(b, |op| ProcessMsg::Publish {
            op,
            name: b"svc".to_vec(),
            cap: h
        }),
        Err(ErrorCode::NameTaken)
    );
    assert_eq!(
        net.op(b, |op| ProcessMsg::Unpublish {
            op,
            name: b"svc".to_vec()
        }),
        Err(ErrorCode::NameNotFound)
    );
    assert_eq!(
        net.op(a, |op| ProcessMsg::Unpublish {
            op,
            name: b"svc".to_vec()
        }),
        Ok(Reply::Done)
    );
    // A wait that expires.
    let op = net.start(b, |op| ProcessMsg::Lookup {
        op,
        name: b"late".to_vec(),
        wait_ms: 500,
    });
    net.advance(Duration::from_millis(600));
    assert_eq!(net.completion(b, op), Some(Err(ErrorCode::NameNotFound)));
    let empty = net.op(b, |op| ProcessMsg::Lookup {
        op,
        name: vec![],
        wait_ms: 0,
    });
    assert_eq!(empty, Err(ErrorCode::InvalidArgument));
    // Exit withdraws published names.
    assert_eq!(
        net.op(a, |op| ProcessMsg::Publish {
            op,
            name: b"gone".to_vec(),
            cap: r
        }),
        Ok(Reply::Done)
    );
    net.exit(a);
    let gone = net.op(b, |op| ProcessMsg::Lookup {
        op,
        name: b"gone".to_vec(),
        wait_ms: 0,
    });
    assert_eq!(gone, Err(ErrorCode::NameNotFound));
    net.check();
}

#[test]
fn process_exit_revokes_owned_objects_everywhere() {
    let mut net = Net::new(2);
    let owner = net.attach(0, "owner");
    let user = net.attach(1, "user");
    let m = mem(&mut net, owner, 0, 100, Rights::READ_WRITE);
    let r = req(&mut net, owner, 1, &[], vec![m]);
    let at_user = share(&mut net, owner, r, user, "r");
    net.exit(owner);
    assert_eq!(
        invoke(&mut net, user, at_user, b"", vec![]),
        Err(ErrorCode::Revoked)
    );
    assert_eq!(net.ctrls[0].stats().objects, 0);
    net.exit(user);
    net.advance(Duration::from_secs(10));
    for (k, v) in net.counts() {
        assert_eq!(v, 0, "{k} left after every process exited");
    }
    net.check();
}

#[test]
fn controller_loss_gives_typed_errors_in_bounded_time() {
    let mut net = Net::new(2);
    let a = net.attach(0, "a");
    let b = net.attach(1, "b");
    let r = req(&mut net, b, 1, &[], vec![]);
    let at_a = share(&mut net, b, r, a, "r");
    // Partition: the pending invoke fails by timeout (or peer loss).
    net.cut.insert((0, 1));
    let op = net.start(a, |op| ProcessMsg::Invoke {
        op,
        cap: at_a,
        imms: vec![],
        caps: vec![],
    });
    assert_eq!(net.completion(a, op), None);
    net.advance(Duration::from_secs(6));
    let r1 = net
        .completion(a, op)
        .expect("answered within the op timeout");
    assert!(
        matches!(
            r1,
            Err(ErrorCode::Timeout) | Err(ErrorCode::PeerUnreachable)
        ),
        "{r1:?}"
    );
    // The silent link was declared lost: new operations fail at once.
    assert_eq!(
        invoke(&mut net, a, at_a, b"", vec![]),
        Err(ErrorCode::PeerUnreachable)
    );
    assert!(net
        .closed_links
        .iter()
        .any(|(_, _, reason)| *reason == CloseReason::PeerTimeout));
}

#[test]
fn restarted_controller_reports_owner_gone_for_old_references() {
    let mut net = Net::new(2);
    let a = net.attach(0, "a");
    let b = net.attach(1, "b");
    let r = req(&mut net, b, 1, &[], vec![]);
    let at_a = share(&mut net, b, r, a, "r");
    net.restart(1, 2);
    assert_eq!(
        invoke(&mut net, a, at_a, b"", vec![]),
        Err(ErrorCode::OwnerGone)
    );
}

#[test]
fn wrong_cluster_key_is_rejected_between_controllers() {
    let mut c0 = harness::config(0, 2, 1);
    let mut c1 = harness::config(1, 2, 1);
    c0.cluster_key = [1; 32];
    c1.cluster_key = [2; 32];
    let net = Net::with_configs(vec![c0, c1]);
    assert!(net
        .closed_links
        .iter()
        .any(|(_, _, r)| *r == CloseReason::AuthFailed));
    assert_eq!(net.ctrls[0].stats().peers, 0);
    assert_eq!(net.ctrls[1].stats().peers, 0);
}

#[test]
fn limits_on_capabilities_and_pending_operations() {
    let mut c = harness::config(0, 2, 1);
    c.limits.max_caps_per_process = 3;
    c.limits.max_pending_per_process = 2;
    let mut net = Net::with_configs(vec![c, harness::config(1, 2, 1)]);
    let p = net.attach(0, "p");
    for i in 0..3 {
        mem(&mut net, p, i * 10, 10, Rights::READ);
    }
    let r = net.op(p, |op| ProcessMsg::MemoryCreate {
        op,
        addr: 0,
        len: 1,
        rights: Rights::READ,
    });
    assert_eq!(r, Err(ErrorCode::LimitReached));
    assert_eq!(
        net.ctrls[0].stats().objects,
        3,
        "the refused object was collected"
    );
    // Pending limit: lookups that wait stay pending.
    let q = net.attach(0, "q");
    let w1 = net.start(q, |op| ProcessMsg::Lookup {
        op,
        name: b"x".to_vec(),
        wait_ms: 1000,
    });
    let w2 = net.start(q, |op| ProcessMsg::Lookup {
        op,
        name: b"y".to_vec(),
        wait_ms: 1000,
    });
    let third = net.op(q, |op| ProcessMsg::Lookup {
        op,
        name: b"z".to_vec(),
        wait_ms: 1000,
    });
    assert_eq!(third, Err(ErrorCode::LimitReached));
    net.advance(Duration::from_secs(2));
    assert_eq!(net.completion(q, w1), Some(Err(ErrorCode::NameNotFound)));
    assert_eq!(net.completion(q, w2), Some(Err(ErrorCode::NameNotFound)));
    net.check();
}

#[test]
fn delivery_to_a_full_table_fails_with_limit_reached() {
    let mut c = harness::config(0, 1, 1);
    c.limits.max_caps_per_process = 2;
    let mut net = Net::with_configs(vec![c]);
    let server = net.attach(0, "server");
    let client = net.attach(0, "client");
    let m = mem(&mut net, server, 0, 10, Rights::READ);
    let r = req(&mut net, server, 1, &[], vec![m]);
    let at_client = share(&mut net, server, r, client, "r");
    assert_eq!(
        invoke(&mut net, client, at_client, b"", vec![]),
        Err(ErrorCode::LimitReached)
    );
    assert!(net.invocations(server).is_empty());
    net.check();
}

#[test]
fn garbage_on_a_peer_link_closes_only_that_link() {
    let mut net = Net::new(3);
    let a = net.attach(0, "a");
    let c = net.attach(2, "c");
    let r = req(&mut net, c, 1, &[], vec![]);
    let at_a = share(&mut net, c, r, a, "r");
    // After the handshake every frame is sealed: injected bytes fail the
    // integrity check.
    net.send_link_raw(0, 1, &[1, 99, 0, 0]);
    assert!(net
        .closed_links
        .contains(&(0, 1, CloseReason::IntegrityFailed)));
    assert_eq!(
        net.ctrls[0].stats().peers,
        1,
        "only the link to node 2 survives"
    );
    assert_eq!(invoke(&mut net, a, at_a, b"", vec![]), Ok(Reply::Done));
    net.check();
}
