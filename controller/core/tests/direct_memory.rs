//! The data-path seam: a driver that reaches a process's memory directly
//! (a mapped shared-memory region, an RDMA memory region) serves copy
//! chunks itself, without `MemRead` / `MemWrite` messages, while the core
//! still validates every chunk.

mod harness;

use std::time::Duration;

use fractos_wire::{ErrorCode, Handle, ProcessMsg, Reply, Rights};
use harness::{handle, Net};

fn mem(net: &mut Net, p: usize, addr: u64, len: u64, rights: Rights) -> Handle {
    handle(net.op(p, |op| ProcessMsg::MemoryCreate {
        op,
        addr,
        len,
        rights,
    }))
}

fn share(net: &mut Net, p: usize, cap: Handle, q: usize, name: &str) -> Handle {
    let n = name.as_bytes().to_vec();
    let r = net.op(p, |op| ProcessMsg::Publish {
        op,
        name: n.clone(),
        cap,
    });
    assert_eq!(r, Ok(Reply::Done));
    handle(net.op(q, |op| ProcessMsg::Lookup {
        op,
        name: n,
        wait_ms: 0,
    }))
}

#[test]
fn a_driver_serving_memory_directly_sends_no_memory_frames() {
    let mut net = Net::new(2);
    let p = net.attach(0, "p");
    let q = net.attach(1, "q");
    let r = net.attach(1, "r");
    net.set_direct(p, true);
    net.set_direct(q, true);
    net.set_direct(r, true);
    let a = mem(&mut net, p, 100, 5000, Rights::READ);
    let b = mem(&mut net, q, 20_000, 6000, Rights::WRITE);
    let b_p = share(&mut net, q, b, p, "b");
    let copy = |net: &mut Net, src, dst| {
        net.op(p, |op| ProcessMsg::Copy {
            op,
            src,
            dst,
            completion: None,
        })
    };
    // Across nodes.
    assert_eq!(copy(&mut net, a, b_p), Ok(Reply::Done));
    assert_eq!(
        net.procs[q].memory[20_000..25_000],
        net.procs[p].memory[100..5100]
    );
    assert_eq!(net.mem_frames, 0, "no MemRead/MemWrite frame was sent");
    // 5 chunks of 1024 bytes read at p, written at q.
    assert_eq!(net.direct_accesses, 10);
    assert_eq!(net.ctrls[0].metrics().bytes_copied_out, 5000);
    assert_eq!(net.ctrls[1].metrics().bytes_copied_in, 5000);
    // On one node, between two direct processes.
    let c = mem(&mut net, r, 0, 5000, Rights::READ_WRITE);
    let c_p = share(&mut net, r, c, p, "c");
    assert_eq!(copy(&mut net, a, c_p), Ok(Reply::Done));
    assert_eq!(net.procs[r].memory[..5000], net.procs[p].memory[100..5100]);
    assert_eq!(net.mem_frames, 0);
    net.check();
}

#[test]
fn direct_accesses_are_validated_like_messages() {
    let mut net = Net::new(2);
    let p = net.attach(0, "p");
    let q = net.attach(1, "q");
    net.set_direct(q, true);
    // The source is served by messages, the destination directly.
    let a = mem(&mut net, p, 0, 3000, Rights::READ);
    let b = mem(&mut net, q, 64_000, 5000, Rights::WRITE);
    let b_p = share(&mut net, q, b, p, "b");
    let r = net.op(p, |op| ProcessMsg::Copy {
        op,
        src: a,
        dst: b_p,
        completion: None,
    });
    // The window runs past q's memory: the driver reports a fault, the
    // copy fails as with a process's answer.
    assert_eq!(r, Err(ErrorCode::MemoryFault));
    assert!(net.mem_frames > 0, "p's reads were messages");
    // Completions of unknown transfers, or for another channel, are
    // ignored.
    let (now, chan) = (net.now, net.procs[q].chan);
    net.ctrls[1].mem_write_done(now, chan, 12345, Ok(()));
    net.ctrls[1].mem_read_done(now, chan, 1, Ok(vec![0; 8]));
    net.run();
    net.advance(Duration::from_secs(6));
    assert_eq!(net.counts()["copies"], 0);
    net.check();
}

/// A revoke of the destination waits for the writes the driver was
/// given, as it waits for a process's; completions after exit are ignored.
#[test]
fn revoke_waits_for_direct_writes() {
    let mut net = Net::new(1);
    let p = net.attach(0, "p");
    let q = net.attach(0, "q");
    net.set_direct(q, true);
    let a = mem(&mut net, p, 0, 8000, Rights::READ);
    let b = mem(&mut net, q, 0, 8000, Rights::WRITE);
    let b_p = share(&mut net, q, b, p, "b");
    let before = net.procs[q].memory.clone();
    net.hold_direct = true;
    let copy = net.start(p, |op| ProcessMsg::Copy {
        op,
        src: a,
        dst: b_p,
        completion: None,
    });
    assert_eq!(net.held.len(), 2, "two writes issued, window full");
    let revoke = net.start(q, |op| ProcessMsg::Revoke { op, cap: b });
    assert_eq!(net.completion(q, revoke), None, "held for the writes");
    net.serve_held();
    assert_eq!(net.completion(q, revoke), Some(Ok(Reply::Done)));
    assert_eq!(net.completion(p, copy), Some(Err(ErrorCode::Revoked)));
    net.advance(Duration::from_secs(6));
    assert!(net.held.is_empty(), "nothing issued after the revoke");
    assert_eq!(net.procs[q].memory[2048..], before[2048..]);

    // A write outstanding at the driver when its process exits.
    let c = mem(&mut net, q, 0, 8000, Rights::WRITE);
    let c_p = share(&mut net, q, c, p, "c");
    let copy = net.start(p, |op| ProcessMsg::Copy {
        op,
        src: a,
        dst: c_p,
        completion: None,
    });
    assert_eq!(net.held.len(), 2);
    net.exit(q);
    assert_eq!(net.completion(p, copy), Some(Err(ErrorCode::Revoked)));
    let (now, chan) = (net.now, net.procs[q].chan);
    net.ctrls[0].mem_write_done(now, chan, 1, Ok(()));
    net.held.clear();
    net.run();
    assert!(!net.ctrls[0].set_direct_memory(chan, true));
    assert_eq!(net.counts()["copies"], 0);
    net.check();
}

/// A device write (DMA into a directly reachable process's memory) is
/// granted only through a valid capability, and is held like a write in
/// flight: a revoke waits for it, and the grant then ends `Revoked`.
#[test]
fn device_writes_are_validated_and_hold_revokes() {
    let mut net = Net::new(2);
    let p = net.attach(0, "p");
    let q = net.attach(0, "q");
    let far = net.attach(1, "far");
    let ro = net.attach(0, "ro");
    net.set_direct(q, true);
    net.set_direct(far, true);
    let b = mem(&mut net, q, 4096, 8192, Rights::READ_WRITE);
    let b_p = share(&mut net, q, b, p, "b");
    let (now, pchan) = (net.now, net.procs[p].chan);
    let begin = |net: &mut Net, h, len| net.ctrls[0].device_write_begin(now, pchan, h, len);

    // Refusals: unknown handle, too long, zero, a Request, no WRITE right,
    // a remote owner, an owner served by messages.
    assert_eq!(begin(&mut net, Handle(999), 10), Err(ErrorCode::BadHandle));
    assert_eq!(begin(&mut net, b_p, 8193), Err(ErrorCode::SizeMismatch));
    assert_eq!(begin(&mut net, b_p, 0), Err(ErrorCode::InvalidArgument));
    let req = handle(net.op(p, |op| ProcessMsg::RequestCreate {
        op,
        tag: 1,
        imms: vec![],
        caps: vec![],
    }));
    assert_eq!(begin(&mut net, req, 10), Err(ErrorCode::WrongType));
    let r = mem(&mut net, q, 0, 4096, Rights::READ);
    let r_p = share(&mut net, q, r, p, "r");
    assert_eq!(begin(&mut net, r_p, 10), Err(ErrorCode::MissingRight));
    let f = mem(&mut net, far, 0, 4096, Rights::WRITE);
    let f_p = share(&mut net, far, f, p, "f");
    assert_eq!(begin(&mut net, f_p, 10), Err(ErrorCode::InvalidArgument));
    let m = mem(&mut net, ro, 0, 4096, Rights::WRITE);
    let m_p = share(&mut net, ro, m, p, "m");
    assert_eq!(begin(&mut net, m_p, 10), Err(ErrorCode::InvalidArgument));
    let stranger = net.ctrls[0].device_write_begin(now, fractos_core::ChannelId(777), b_p, 10);
    assert_eq!(stranger, Err(ErrorCode::NotAttached));

    // A grant: where to write; it ends delivered, counted as copied in.
    let before = net.ctrls[0].metrics().bytes_copied_in;
    let g = begin(&mut net, b_p, 8192).unwrap();
    assert_eq!((g.chan, g.addr), (net.procs[q].chan, 4096));
    assert!(net.ctrls[0].device_write_valid(g.id));
    assert_eq!(net.ctrls[0].device_write_end(now, g.id, true), Ok(()));
    assert!(!net.ctrls[0].device_write_valid(g.id));
    assert_eq!(net.ctrls[0].metrics().bytes_copied_in, before + 8192);
    // A failed device write.
    let g = begin(&mut net, b_p, 100).unwrap();
    assert_eq!(
        net.ctrls[0].device_write_end(now, g.id, false),
        Err(ErrorCode::MemoryFault)
    );

    // A revoke waits for the grant; the grant is invalid at once and ends
    // `Revoked`; then the revoke completes.
    let g = begin(&mut net, b_p, 4096).unwrap();
    let revoke = net.start(q, |op| ProcessMsg::Revoke { op, cap: b });
    net.run();
    assert_eq!(net.completion(q, revoke), None, "held for the device write");
    assert!(!net.ctrls[0].device_write_valid(g.id));
    let now = net.now;
    assert_eq!(
        net.ctrls[0].device_write_end(now, g.id, true),
        Err(ErrorCode::Revoked)
    );
    net.run();
    assert_eq!(net.completion(q, revoke), Some(Ok(Reply::Done)));
    assert_eq!(begin(&mut net, b_p, 10), Err(ErrorCode::Revoked));

    // The owner exits with a grant outstanding: it ends `Revoked`.
    let c = mem(&mut net, q, 0, 4096, Rights::WRITE);
    let c_p = share(&mut net, q, c, p, "c");
    let g = begin(&mut net, c_p, 4096).unwrap();
    net.exit(q);
    assert!(!net.ctrls[0].device_write_valid(g.id));
    let now = net.now;
    assert_eq!(
        net.ctrls[0].device_write_end(now, g.id, true),
        Err(ErrorCode::Revoked)
    );
    net.check();
}
