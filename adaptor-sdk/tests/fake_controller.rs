//! The SDK against a scripted fake controller on a real socket: what a
//! misbehaving or slow controller sends never panics the SDK, memory is
//! served with `MemoryFault` outside registered regions, and capabilities
//! answered after their waiter gave up are dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use fractos_sdk::wire::{
    frame_body, CapInfo, ControllerMsg, ProcessMsg, Reply, MAX_FRAME_LEN, PROTOCOL_VERSION,
};
use fractos_sdk::{
    AttachOptions, DisconnectReason, ErrorCode, Handle, NodeId, ObjectKind, Process, Rights,
    SdkError,
};

const WAIT: Duration = Duration::from_secs(10);

/// The controller end of one connection.
struct Fake {
    s: TcpStream,
}

impl Fake {
    fn send(&mut self, m: &ControllerMsg) {
        let mut f = Vec::new();
        m.encode(&mut f);
        self.s.write_all(&f).unwrap();
    }

    fn recv(&mut self) -> Option<ProcessMsg> {
        let mut len = [0u8; 4];
        self.s.read_exact(&mut len).ok()?;
        let mut frame = len.to_vec();
        frame.resize(4 + u32::from_le_bytes(len) as usize, 0);
        self.s.read_exact(&mut frame[4..]).ok()?;
        Some(ProcessMsg::decode(frame_body(&frame, MAX_FRAME_LEN).unwrap()).unwrap())
    }

    /// Reads until EOF; true if the peer closed.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    }
}

/// Runs `script` as the controller of one connection; returns the SDK
/// process once attached (the script answers the attach itself).
fn with_fake(
    opts: AttachOptions,
    script: impl FnOnce(Fake) + Send + 'static,
) -> (Result<Process, SdkError>, thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        script(Fake { s });
    });
    (Process::attach(addr, "p", [1; 32], opts), t)
}

fn attached(f: &mut Fake) {
    assert!(matches!(f.recv(), Some(ProcessMsg::Attach { .. })));
    f.send(&ControllerMsg::Attached { node: NodeId(9) });
}

#[test]
fn garbage_after_attach_disconnects_with_protocol_reason() {
    let (p, t) = with_fake(AttachOptions::default(), |mut f| {
        attached(&mut f);
        // Wait for an operation, then answer with an unknown kind.
        assert!(matches!(f.recv(), Some(ProcessMsg::RequestCreate { .. })));
        f.s.write_all(&[3, 0, 0, 0, PROTOCOL_VERSION, 200, 0])
            .unwrap();
        assert!(f.closed());
    });
    let p = p.unwrap();
    assert_eq!(p.node(), NodeId(9));
    let e = p.request_create(1, &[], &[]).unwrap_err();
    assert!(e.is_disconnected(), "{e}");
    assert!(matches!(
        p.disconnect_reason(),
        Some(DisconnectReason::Protocol(_))
    ));
    t.join().unwrap();
}

#[test]
fn oversized_frame_disconnects() {
    let (p, t) = with_fake(AttachOptions::default(), |mut f| {
        attached(&mut f);
        assert!(f.recv().is_some());
        f.s.write_all(&u32::MAX.to_le_bytes()).unwrap();
        assert!(f.closed());
    });
    let p = p.unwrap();
    let e = p
        .revoke(fractos_sdk::RequestCap::from_raw(Handle(1)))
        .unwrap_err();
    assert!(e.is_disconnected(), "{e}");
    t.join().unwrap();
}

#[test]
fn kicked_after_attach_reports_the_code() {
    let (p, t) = with_fake(AttachOptions::default(), |mut f| {
        attached(&mut f);
        assert!(f.recv().is_some());
        f.send(&ControllerMsg::Rejected {
            code: ErrorCode::Malformed,
            version: PROTOCOL_VERSION,
        });
        assert!(f.closed());
    });
    let p = p.unwrap();
    let e = p.unpublish("n").unwrap_err();
    assert!(e.is_disconnected(), "{e}");
    assert_eq!(
        p.disconnect_reason(),
        Some(DisconnectReason::Kicked(ErrorCode::Malformed))
    );
    t.join().unwrap();
}

#[test]
fn attach_timeout_and_unexpected_answer() {
    // A controller that never answers the attach.
    let opts = AttachOptions::default().connect_timeout(Duration::from_millis(100));
    let (p, t) = with_fake(opts, |mut f| {
        assert!(f.recv().is_some());
        assert!(f.closed());
    });
    assert!(p.unwrap_err().is_timeout());
    t.join().unwrap();

    // A controller that answers attach with something else.
    let (p, t) = with_fake(AttachOptions::default(), |mut f| {
        assert!(f.recv().is_some());
        f.send(&ControllerMsg::Completion {
            op: 1,
            result: Ok(Reply::Done),
        });
        assert!(f.closed());
    });
    assert!(matches!(p.unwrap_err(), SdkError::Protocol { .. }));
    t.join().unwrap();

    // A version mismatch is a typed rejection naming both versions.
    let (p, t) = with_fake(AttachOptions::default(), |mut f| {
        assert!(f.recv().is_some());
        f.send(&ControllerMsg::Rejected {
            code: ErrorCode::VersionMismatch,
            version: 7,
        });
    });
    let e = p.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::VersionMismatch));
    assert!(e.to_string().contains("protocol 7"), "{e}");
    t.join().unwrap();
}

#[test]
fn memory_is_served_and_faults_outside_regions() {
    let (tx, rx) = std::sync::mpsc::channel::<u64>();
    let (p, t) = with_fake(AttachOptions::default(), move |mut f| {
        attached(&mut f);
        let addr = rx.recv().unwrap();
        let reply = |f: &mut Fake, m: ControllerMsg| {
            f.send(&m);
            f.recv().unwrap()
        };
        // In range.
        let r = reply(
            &mut f,
            ControllerMsg::MemRead {
                xfer: 1,
                addr: addr + 2,
                len: 3,
            },
        );
        assert_eq!(
            r,
            ProcessMsg::MemReadReply {
                xfer: 1,
                result: Ok(b"cde".to_vec())
            }
        );
        let r = reply(
            &mut f,
            ControllerMsg::MemWrite {
                xfer: 2,
                addr,
                data: b"XY".to_vec(),
            },
        );
        assert_eq!(
            r,
            ProcessMsg::MemWriteReply {
                xfer: 2,
                result: Ok(())
            }
        );
        // Out of range, below, and nowhere.
        for (xfer, a, len) in [(3, addr + 5, 2), (4, addr - 1, 1), (5, 0, 1)] {
            let r = reply(&mut f, ControllerMsg::MemRead { xfer, addr: a, len });
            assert_eq!(
                r,
                ProcessMsg::MemReadReply {
                    xfer,
                    result: Err(ErrorCode::MemoryFault)
                }
            );
        }
        let r = reply(
            &mut f,
            ControllerMsg::MemWrite {
                xfer: 6,
                addr: addr + 4,
                data: b"too long".to_vec(),
            },
        );
        assert_eq!(
            r,
            ProcessMsg::MemWriteReply {
                xfer: 6,
                result: Err(ErrorCode::MemoryFault)
            }
        );
        // A completion nobody waits for and an invocation are fine too.
        f.send(&ControllerMsg::Completion {
            op: 999,
            result: Ok(Reply::Done),
        });
        f.send(&ControllerMsg::Invocation {
            tag: 5,
            imms: b"end".to_vec(),
            caps: vec![],
        });
        assert!(f.closed());
    });
    let p = p.unwrap();
    let r = p.register_vec(b"abcdef".to_vec()).unwrap();
    tx.send(r.addr()).unwrap();
    let inv = p.next_invocation_timeout(WAIT).unwrap();
    assert_eq!((inv.tag, inv.imms.as_slice()), (5, &b"end"[..]));
    assert_eq!(r.to_vec(), b"XYcdef");
    assert!(p.is_connected());
    p.close();
    t.join().unwrap();
}

#[test]
fn a_capability_answered_after_the_timeout_is_dropped() {
    let (p, t) = with_fake(AttachOptions::default(), |mut f| {
        attached(&mut f);
        let op = match f.recv() {
            Some(ProcessMsg::RequestCreate { op, .. }) => op,
            other => panic!("{other:?}"),
        };
        // The SDK gave up (its timeout is tiny); answer anyway, first with
        // the capability, and expect the SDK to drop it.
        let Some(ProcessMsg::Lookup { op: next, .. }) = f.recv() else {
            panic!("expected the marker lookup");
        };
        f.send(&ControllerMsg::Completion {
            op,
            result: Ok(Reply::Cap {
                handle: Handle(31),
                info: CapInfo {
                    kind: ObjectKind::Request,
                    rights: Rights::NONE,
                    len: 0,
                },
            }),
        });
        match f.recv() {
            Some(ProcessMsg::Drop { cap, op: drop_op }) => {
                assert_eq!(cap, Handle(31));
                // Its completion is absorbed silently.
                f.send(&ControllerMsg::Completion {
                    op: drop_op,
                    result: Ok(Reply::Done),
                });
            }
            other => panic!("expected a Drop, got {other:?}"),
        }
        f.send(&ControllerMsg::Completion {
            op: next,
            result: Err(ErrorCode::NameNotFound),
        });
        assert!(f.closed());
    });
    let p = p.unwrap();
    let e = p
        .with_timeout(Duration::from_millis(1))
        .request_create(1, &[], &[])
        .unwrap_err();
    assert!(e.is_timeout(), "{e}");
    let e = p.lookup("marker", Duration::ZERO).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NameNotFound));
    p.close();
    t.join().unwrap();
}

#[test]
fn wrong_reply_shapes_are_protocol_errors_not_panics() {
    let (p, t) = with_fake(AttachOptions::default(), |mut f| {
        attached(&mut f);
        // memory_create answered with Done; invoke answered with a cap.
        let Some(ProcessMsg::MemoryCreate { op, .. }) = f.recv() else {
            panic!()
        };
        f.send(&ControllerMsg::Completion {
            op,
            result: Ok(Reply::Done),
        });
        let Some(ProcessMsg::Invoke { op, .. }) = f.recv() else {
            panic!()
        };
        f.send(&ControllerMsg::Completion {
            op,
            result: Ok(Reply::Cap {
                handle: Handle(1),
                info: CapInfo {
                    kind: ObjectKind::Memory,
                    rights: Rights::READ,
                    len: 1,
                },
            }),
        });
        // A duplicate Attached closes the channel.
        f.send(&ControllerMsg::Attached { node: NodeId(1) });
        assert!(f.closed());
    });
    let p = p.unwrap();
    let r = p.register(4).unwrap();
    assert!(matches!(
        p.memory_create(&r, 0, 4, Rights::READ),
        Err(SdkError::Protocol { .. })
    ));
    assert!(matches!(
        p.invoke(&fractos_sdk::RequestCap::from_raw(Handle(2)), &[], &[]),
        Err(SdkError::Protocol { .. })
    ));
    let e = p.next_invocation_timeout(WAIT).unwrap_err();
    assert!(e.is_disconnected(), "{e}");
    t.join().unwrap();
}

#[test]
fn a_cancelled_async_operation_drops_its_late_capability() {
    let (p, t) = with_fake(AttachOptions::default(), |mut f| {
        attached(&mut f);
        let Some(ProcessMsg::Derive { op, .. }) = f.recv() else {
            panic!("expected the derive")
        };
        let Some(ProcessMsg::Unpublish { op: marker, .. }) = f.recv() else {
            panic!("expected the marker")
        };
        f.send(&ControllerMsg::Completion {
            op,
            result: Ok(Reply::Cap {
                handle: Handle(44),
                info: CapInfo {
                    kind: ObjectKind::Request,
                    rights: Rights::NONE,
                    len: 0,
                },
            }),
        });
        assert!(matches!(
            f.recv(),
            Some(ProcessMsg::Drop {
                cap: Handle(44),
                ..
            })
        ));
        f.send(&ControllerMsg::Completion {
            op: marker,
            result: Ok(Reply::Done),
        });
        assert!(f.closed());
    });
    let p = p.unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let ap = p.to_async();
        let req = fractos_sdk::RequestCap::from_raw(Handle(1));
        // The caller stops waiting (its own timeout drops the future).
        let r = tokio::time::timeout(Duration::from_millis(5), ap.derive(&req, b"x", &[])).await;
        assert!(r.is_err());
        ap.unpublish("marker").await.unwrap();
    });
    p.close();
    t.join().unwrap();
}
