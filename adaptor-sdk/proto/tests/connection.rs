//! The connection against scripted controller frames.

use std::time::Duration;

use fractos_process::{
    Config, Connection, Error, Event, FrameReader, Instant, Invocation, Memory, NoMemory,
    OutOfWindow, Phase,
};
use fractos_wire::{
    CapInfo, ControllerMsg, DecodeError, ErrorCode, Handle, NodeId, ObjectKind, ProcessMsg, Reply,
    Rights, MAX_DATA_LEN, PROTOCOL_VERSION,
};

const T0: Instant = Instant(0);

fn frame(m: &ControllerMsg) -> Vec<u8> {
    let mut f = Vec::new();
    m.encode(&mut f);
    f
}

fn sent<T>(c: &mut Connection<T>) -> Vec<ProcessMsg> {
    std::iter::from_fn(|| c.poll_transmit())
        .map(|f| ProcessMsg::decode(&f[4..]).expect("the connection encodes valid frames"))
        .collect()
}

fn events<T>(c: &mut Connection<T>) -> Vec<Event<T>> {
    std::iter::from_fn(|| c.poll_event()).collect()
}

fn feed<T>(c: &mut Connection<T>, m: &ControllerMsg) -> Result<(), Error> {
    c.handle_frame(&frame(m), T0, &mut NoMemory)
}

fn fresh<T>() -> Connection<T> {
    Connection::new(b"proc", [7; 32], Config::default(), T0).unwrap()
}

fn attached<T: std::fmt::Debug>() -> Connection<T> {
    let mut c = fresh();
    assert_eq!(
        sent(&mut c),
        vec![ProcessMsg::Attach {
            name: b"proc".to_vec(),
            token: [7; 32]
        }]
    );
    feed(&mut c, &ControllerMsg::Attached { node: NodeId(4) }).unwrap();
    assert!(matches!(
        events(&mut c)[..],
        [Event::Attached { node: NodeId(4) }]
    ));
    c
}

fn cap(h: u32) -> Reply {
    Reply::Cap {
        handle: Handle(h),
        info: CapInfo {
            kind: ObjectKind::Request,
            rights: Rights::NONE,
            len: 0,
        },
    }
}

fn revoke(c: &mut Connection<&'static str>, data: &'static str, h: u32) -> u64 {
    c.start(data, |op| ProcessMsg::Revoke { op, cap: Handle(h) })
        .unwrap()
}

// ---------------------------------------------------------------- attach

#[test]
fn attach_ok() {
    let c: Connection<()> = attached();
    assert_eq!(c.phase(), Phase::Attached(NodeId(4)));
    assert_eq!(c.node(), Some(NodeId(4)));
    assert_eq!(c.poll_timeout(), None);
    assert!(!c.is_closed());
}

#[test]
fn attach_rejected_is_fatal_and_typed() {
    let mut c: Connection<()> = fresh();
    let _ = sent(&mut c);
    let e = feed(
        &mut c,
        &ControllerMsg::Rejected {
            code: ErrorCode::AuthFailed,
            version: 9,
        },
    )
    .unwrap_err();
    assert_eq!(
        e,
        Error::Rejected {
            code: ErrorCode::AuthFailed,
            version: 9
        }
    );
    assert!(e.is_fatal());
    assert!(e.to_string().contains("protocol 9"), "{e}");
    assert!(c.is_closed());
    assert_eq!(c.close_reason(), Some(e));
    assert_eq!(
        c.start((), |op| ProcessMsg::Drop { op, cap: Handle(1) }),
        Err(Error::Closed)
    );
    assert_eq!(
        feed(&mut c, &ControllerMsg::Attached { node: NodeId(1) }),
        Err(Error::Closed)
    );
}

#[test]
fn attach_answered_with_garbage_or_another_message_closes() {
    let mut c: Connection<()> = fresh();
    let e = c
        .handle_body(&[PROTOCOL_VERSION, 99], T0, &mut NoMemory)
        .unwrap_err();
    assert_eq!(e, Error::Malformed(DecodeError::UnknownKind(99)));
    assert!(c.is_closed() && e.is_fatal());

    let mut c: Connection<()> = fresh();
    let e = c
        .handle_body(&[PROTOCOL_VERSION + 1, 1], T0, &mut NoMemory)
        .unwrap_err();
    assert!(
        matches!(e, Error::Malformed(DecodeError::BadVersion { .. })),
        "{e}"
    );

    let mut c: Connection<()> = fresh();
    let e = feed(
        &mut c,
        &ControllerMsg::Completion {
            op: 1,
            result: Ok(Reply::Done),
        },
    )
    .unwrap_err();
    assert_eq!(
        e,
        Error::Unexpected {
            got: "Completion",
            phase: "attaching"
        }
    );
    assert!(c.is_closed());

    // A truncated frame on a message transport.
    let mut c: Connection<()> = fresh();
    let f = frame(&ControllerMsg::Attached { node: NodeId(1) });
    let e = c
        .handle_frame(&f[..f.len() - 1], T0, &mut NoMemory)
        .unwrap_err();
    assert_eq!(e, Error::Malformed(DecodeError::Truncated));
}

#[test]
fn attach_times_out_without_a_clock() {
    let cfg = Config::default().attach_timeout(Some(Duration::from_millis(5)));
    let mut c: Connection<()> = Connection::new(b"p", [0; 32], cfg, Instant(1_000)).unwrap();
    assert_eq!(c.poll_timeout(), Some(Instant(5_001_000)));
    assert_eq!(c.handle_timeout(Instant(5_000_999)), Ok(()));
    assert_eq!(
        c.handle_timeout(Instant(5_001_000)),
        Err(Error::AttachTimeout)
    );
    assert!(c.is_closed());
    assert_eq!(c.poll_timeout(), None);

    // No timeout configured: never fires.
    let cfg = Config::default().attach_timeout(None);
    let mut c: Connection<()> = Connection::new(b"p", [0; 32], cfg, T0).unwrap();
    assert_eq!(c.poll_timeout(), None);
    assert_eq!(c.handle_timeout(Instant(u64::MAX)), Ok(()));
}

#[test]
fn local_refusals_before_attach() {
    let long = vec![b'x'; fractos_wire::MAX_PROCESS_NAME_LEN + 1];
    assert_eq!(
        Connection::<()>::new(&long, [0; 32], Config::default(), T0).unwrap_err(),
        Error::NameTooLong { len: long.len() }
    );
    let mut c: Connection<()> = fresh();
    assert_eq!(
        c.start((), |op| ProcessMsg::Drop { op, cap: Handle(1) }),
        Err(Error::NotAttached)
    );
    let mut c: Connection<()> = attached();
    let e = c
        .start((), |_| ProcessMsg::MemWriteReply {
            xfer: 1,
            result: Ok(()),
        })
        .unwrap_err();
    assert_eq!(e, Error::NotAnOperation("MemWriteReply"));
    // An op id other than the one handed out is refused too.
    let e = c
        .start((), |op| ProcessMsg::Drop {
            op: op + 1,
            cap: Handle(1),
        })
        .unwrap_err();
    assert!(matches!(e, Error::NotAnOperation(_)) && !e.is_fatal());
    assert!(c.poll_transmit().is_none());
    assert_eq!(c.in_flight(), 0);
}

// ----------------------------------------------------------- completions

#[test]
fn completions_out_of_order_reach_their_operations() {
    let mut c = attached();
    let a = revoke(&mut c, "a", 1);
    let b = revoke(&mut c, "b", 2);
    let d = revoke(&mut c, "d", 3);
    assert_ne!(a, b);
    let ops: Vec<_> = sent(&mut c).iter().map(|m| m.op_id().unwrap()).collect();
    assert_eq!(ops, vec![a, b, d]);
    assert_eq!(c.in_flight(), 3);
    for (op, r) in [
        (d, Err(ErrorCode::Revoked)),
        (a, Ok(cap(9))),
        (b, Ok(Reply::Done)),
    ] {
        feed(&mut c, &ControllerMsg::Completion { op, result: r }).unwrap();
    }
    assert_eq!(
        events(&mut c),
        vec![
            Event::Completion {
                op: d,
                data: "d",
                result: Err(ErrorCode::Revoked)
            },
            Event::Completion {
                op: a,
                data: "a",
                result: Ok(cap(9))
            },
            Event::Completion {
                op: b,
                data: "b",
                result: Ok(Reply::Done)
            },
        ]
    );
    assert_eq!(c.in_flight(), 0);
}

#[test]
fn unknown_op_completion_is_typed_and_not_fatal() {
    let mut c = attached();
    let a = revoke(&mut c, "a", 1);
    let done = ControllerMsg::Completion {
        op: a,
        result: Ok(Reply::Done),
    };
    feed(&mut c, &done).unwrap();
    // Answered twice, and never started.
    assert_eq!(feed(&mut c, &done), Err(Error::UnknownOp { op: a }));
    let e = feed(
        &mut c,
        &ControllerMsg::Completion {
            op: 999,
            result: Ok(Reply::Done),
        },
    )
    .unwrap_err();
    assert_eq!(e, Error::UnknownOp { op: 999 });
    assert!(!e.is_fatal());
    assert_eq!(c.phase(), Phase::Attached(NodeId(4)));
    assert_eq!(events(&mut c).len(), 1);
}

#[test]
fn forgotten_operations_are_absorbed_and_late_caps_dropped() {
    let mut c = attached();
    let a = revoke(&mut c, "a", 1);
    let b = revoke(&mut c, "b", 2);
    let _ = sent(&mut c);
    assert_eq!(c.forget(a), Some("a"));
    assert_eq!(c.forget(a), None);
    assert_eq!(c.forget(12345), None);
    // A forgotten Done is absorbed; a forgotten capability is dropped.
    feed(
        &mut c,
        &ControllerMsg::Completion {
            op: a,
            result: Ok(cap(31)),
        },
    )
    .unwrap();
    let drop_op = match &sent(&mut c)[..] {
        [ProcessMsg::Drop {
            op,
            cap: Handle(31),
        }] => *op,
        other => panic!("expected one Drop of handle 31, got {other:?}"),
    };
    feed(
        &mut c,
        &ControllerMsg::Completion {
            op: drop_op,
            result: Ok(Reply::Done),
        },
    )
    .unwrap();
    assert!(events(&mut c).is_empty());
    // Detached operations behave the same.
    let inv = c
        .start_detached(|op| ProcessMsg::Invoke {
            op,
            cap: Handle(5),
            imms: vec![],
            caps: vec![],
        })
        .unwrap();
    feed(
        &mut c,
        &ControllerMsg::Completion {
            op: inv,
            result: Err(ErrorCode::BadHandle),
        },
    )
    .unwrap();
    assert!(events(&mut c).is_empty());
    // `b` still routes.
    feed(
        &mut c,
        &ControllerMsg::Completion {
            op: b,
            result: Ok(Reply::Done),
        },
    )
    .unwrap();
    assert!(matches!(
        events(&mut c)[..],
        [Event::Completion { data: "b", .. }]
    ));
}

#[test]
fn close_aborts_waiting_operations() {
    let mut c = attached();
    let a = revoke(&mut c, "a", 1);
    let b = revoke(&mut c, "b", 2);
    c.forget(b);
    c.close();
    c.close();
    assert!(c.is_closed());
    assert_eq!(c.close_reason(), None);
    assert!(c.poll_transmit().is_none(), "queued frames are discarded");
    assert_eq!(events(&mut c), vec![Event::Aborted { op: a, data: "a" }]);
}

#[test]
fn kicked_and_duplicate_attached_are_fatal() {
    let mut c = attached();
    let a = revoke(&mut c, "a", 1);
    let e = feed(
        &mut c,
        &ControllerMsg::Rejected {
            code: ErrorCode::Malformed,
            version: PROTOCOL_VERSION,
        },
    )
    .unwrap_err();
    assert_eq!(e, Error::Kicked(ErrorCode::Malformed));
    assert_eq!(events(&mut c), vec![Event::Aborted { op: a, data: "a" }]);

    let mut c: Connection<()> = attached();
    let e = feed(&mut c, &ControllerMsg::Attached { node: NodeId(4) }).unwrap_err();
    assert!(matches!(
        e,
        Error::Unexpected {
            got: "Attached",
            ..
        }
    ));
    assert!(c.is_closed());
}

// ---------------------------------------------------------------- memory

/// One window of bytes at `base`.
struct Window {
    base: u64,
    bytes: Vec<u8>,
}

impl Memory for Window {
    fn read(&mut self, addr: u64, out: &mut [u8]) -> Result<(), OutOfWindow> {
        let off = OutOfWindow::check(self.base, self.bytes.len() as u64, addr, out.len() as u64)?;
        out.copy_from_slice(&self.bytes[off as usize..off as usize + out.len()]);
        Ok(())
    }
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), OutOfWindow> {
        let off = OutOfWindow::check(self.base, self.bytes.len() as u64, addr, data.len() as u64)?;
        self.bytes[off as usize..off as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
}

#[test]
fn memory_is_served_in_window_and_faults_outside() {
    let mut c: Connection<()> = attached();
    let mut w = Window {
        base: 0x1000,
        bytes: b"abcdef".to_vec(),
    };
    let mut serve = |c: &mut Connection<()>, m: ControllerMsg| {
        c.handle_frame(&frame(&m), T0, &mut w).unwrap();
        let mut out = sent(c);
        assert_eq!(out.len(), 1);
        out.pop().unwrap()
    };
    let read = |xfer, addr, len| ControllerMsg::MemRead { xfer, addr, len };
    assert_eq!(
        serve(&mut c, read(1, 0x1002, 3)),
        ProcessMsg::MemReadReply {
            xfer: 1,
            result: Ok(b"cde".to_vec())
        }
    );
    assert_eq!(
        serve(
            &mut c,
            ControllerMsg::MemWrite {
                xfer: 2,
                addr: 0x1000,
                data: b"XY".to_vec()
            }
        ),
        ProcessMsg::MemWriteReply {
            xfer: 2,
            result: Ok(())
        }
    );
    // Past the end, below, nowhere, overflowing: all MemoryFault.
    for (xfer, addr, len) in [(3, 0x1005, 2), (4, 0xfff, 1), (5, 0, 1), (6, u64::MAX, 2)] {
        assert_eq!(
            serve(&mut c, read(xfer, addr, len)),
            ProcessMsg::MemReadReply {
                xfer,
                result: Err(ErrorCode::MemoryFault)
            }
        );
    }
    assert_eq!(
        serve(
            &mut c,
            ControllerMsg::MemWrite {
                xfer: 7,
                addr: 0x1004,
                data: b"too long".to_vec()
            }
        ),
        ProcessMsg::MemWriteReply {
            xfer: 7,
            result: Err(ErrorCode::MemoryFault)
        }
    );
    // A read larger than any payload is refused before allocating.
    assert_eq!(
        serve(&mut c, read(8, 0x1000, MAX_DATA_LEN as u32 + 1)),
        ProcessMsg::MemReadReply {
            xfer: 8,
            result: Err(ErrorCode::InvalidArgument)
        }
    );
    assert_eq!(w.bytes, b"XYcdef");
    // Without memory, everything faults.
    c.handle_frame(&frame(&read(9, 0x1000, 1)), T0, &mut NoMemory)
        .unwrap();
    assert_eq!(
        sent(&mut c),
        vec![ProcessMsg::MemReadReply {
            xfer: 9,
            result: Err(ErrorCode::MemoryFault)
        }]
    );
}

#[test]
fn memory_access_before_attach_is_unexpected() {
    let mut c: Connection<()> = fresh();
    let e = feed(
        &mut c,
        &ControllerMsg::MemRead {
            xfer: 1,
            addr: 0,
            len: 1,
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::Unexpected { got: "MemRead", .. }));
}

// ---------------------------------------------------------------- frames

#[test]
fn oversize_frames_close_on_every_path() {
    let cfg = Config::default().max_frame_len(64);
    let big = ControllerMsg::Invocation {
        tag: 1,
        imms: vec![0; 100],
        caps: vec![],
    };
    let f = frame(&big);

    // Message transport.
    let mut c: Connection<u8> = Connection::new(b"p", [0; 32], cfg, T0).unwrap();
    c.handle_frame(
        &frame(&ControllerMsg::Attached { node: NodeId(1) }),
        T0,
        &mut NoMemory,
    )
    .unwrap();
    let op = c
        .start(1, |op| ProcessMsg::Drop { op, cap: Handle(1) })
        .unwrap();
    let e = c.handle_frame(&f, T0, &mut NoMemory).unwrap_err();
    assert!(
        matches!(e, Error::Malformed(DecodeError::Oversized { max: 64, .. })),
        "{e}"
    );
    assert!(events(&mut c).contains(&Event::Aborted { op, data: 1 }));

    // Bare body.
    let mut c: Connection<()> = Connection::new(b"p", [0; 32], cfg, T0).unwrap();
    let e = c.handle_body(&f[4..], T0, &mut NoMemory).unwrap_err();
    assert!(matches!(e, Error::Malformed(DecodeError::Oversized { .. })));

    // Byte stream: refused from the length prefix alone.
    let mut c: Connection<()> = Connection::new(b"p", [0; 32], cfg, T0).unwrap();
    let mut r = FrameReader::new(64);
    r.push(&u32::MAX.to_le_bytes());
    let e = c.handle_stream(&mut r, T0, &mut NoMemory).unwrap_err();
    assert!(matches!(e, Error::Malformed(DecodeError::Oversized { .. })));
    assert!(c.is_closed());
}

#[test]
fn byte_stream_in_any_chunking() {
    let msgs = [
        ControllerMsg::Attached { node: NodeId(2) },
        ControllerMsg::Invocation {
            tag: 5,
            imms: vec![1; 100_000],
            caps: vec![],
        },
        ControllerMsg::MemWrite {
            xfer: 1,
            addr: 0x1000,
            data: b"hi".to_vec(),
        },
        ControllerMsg::Invocation {
            tag: 6,
            imms: vec![],
            caps: vec![],
        },
    ];
    let wire: Vec<u8> = msgs.iter().flat_map(frame).collect();
    for step in [1, 3, 4, 61, 4096, 70_000, wire.len()] {
        let mut c: Connection<()> = Connection::new(b"p", [0; 32], Config::default(), T0).unwrap();
        let mut w = Window {
            base: 0x1000,
            bytes: vec![0; 4],
        };
        let mut r = FrameReader::new(fractos_wire::MAX_FRAME_LEN);
        for chunk in wire.chunks(step) {
            // Alternate the two ways of filling the reader.
            if step % 2 == 0 {
                let buf = r.read_buf();
                let n = chunk.len().min(buf.len());
                buf[..n].copy_from_slice(&chunk[..n]);
                r.filled(n);
                r.push(&chunk[n..]);
            } else {
                r.push(chunk);
            }
            c.handle_stream(&mut r, T0, &mut w).unwrap();
        }
        assert!(r.is_empty() && r.buffered() == 0, "step {step}");
        assert_eq!(c.node(), Some(NodeId(2)));
        let tags: Vec<u64> = std::iter::from_fn(|| c.poll_invocation())
            .map(|i| i.tag)
            .collect();
        assert_eq!(tags, vec![5, 6], "step {step}");
        assert_eq!(&w.bytes[..2], b"hi");
    }
}

// ----------------------------------------------------------- invocations

#[test]
fn invocation_queue_is_bounded_with_backpressure() {
    let cfg = Config::default().invocation_capacity(2);
    let mut c: Connection<()> = Connection::new(b"p", [0; 32], cfg, T0).unwrap();
    let inv = |tag| ControllerMsg::Invocation {
        tag,
        imms: vec![tag as u8],
        caps: vec![(
            Handle(tag as u32),
            CapInfo {
                kind: ObjectKind::Memory,
                rights: Rights::READ,
                len: 8,
            },
        )],
    };
    let mut r = FrameReader::new(fractos_wire::MAX_FRAME_LEN);
    r.push(&frame(&ControllerMsg::Attached { node: NodeId(1) }));
    for tag in 1..=4 {
        r.push(&frame(&inv(tag)));
    }
    r.push(&frame(&ControllerMsg::Completion {
        op: 77,
        result: Ok(Reply::Done),
    }));
    let e = c.handle_stream(&mut r, T0, &mut NoMemory).unwrap_err();
    assert_eq!(e, Error::InvocationQueueFull { capacity: 2 });
    assert!(!e.is_fatal());
    assert_eq!(c.queued_invocations(), 2);
    // The refused frame stays in the reader: nothing is lost.
    assert_eq!(
        c.handle_stream(&mut r, T0, &mut NoMemory),
        Err(Error::InvocationQueueFull { capacity: 2 })
    );
    assert_eq!(
        c.poll_invocation(),
        Some(Invocation {
            tag: 1,
            imms: vec![1],
            caps: vec![(
                Handle(1),
                CapInfo {
                    kind: ObjectKind::Memory,
                    rights: Rights::READ,
                    len: 8
                }
            )]
        })
    );
    // One slot free: invocation 3 goes in, 4 is refused again.
    assert_eq!(
        c.handle_stream(&mut r, T0, &mut NoMemory),
        Err(Error::InvocationQueueFull { capacity: 2 })
    );
    let _ = c.poll_invocation();
    let _ = c.poll_invocation();
    // Invocation 4 then the stray completion (non-fatal, consumed).
    assert_eq!(
        c.handle_stream(&mut r, T0, &mut NoMemory),
        Err(Error::UnknownOp { op: 77 })
    );
    assert_eq!(c.handle_stream(&mut r, T0, &mut NoMemory), Ok(()));
    assert!(r.is_empty());
    assert_eq!(c.poll_invocation().map(|i| i.tag), Some(4));
    assert_eq!(c.poll_invocation(), None);
    // Message transports get the same answer, the frame stays with them.
    let f = frame(&inv(5));
    for _ in 0..2 {
        c.handle_frame(&f, T0, &mut NoMemory).unwrap();
    }
    assert_eq!(
        c.handle_frame(&f, T0, &mut NoMemory),
        Err(Error::InvocationQueueFull { capacity: 2 })
    );
    assert_eq!(c.phase(), Phase::Attached(NodeId(1)));
}

// ----------------------------------------------------------- robustness

#[test]
fn arbitrary_input_never_panics() {
    // A small LCG: deterministic, no dependency.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) as u32
    };
    let valid: Vec<Vec<u8>> = [
        ControllerMsg::Attached { node: NodeId(1) },
        ControllerMsg::Completion {
            op: 1,
            result: Ok(cap(2)),
        },
        ControllerMsg::MemRead {
            xfer: 1,
            addr: 0x1000,
            len: 4,
        },
    ]
    .iter()
    .map(frame)
    .collect();
    for round in 0..2_000 {
        let mut c: Connection<()> = Connection::new(b"p", [0; 32], Config::default(), T0).unwrap();
        let mut r = FrameReader::new(256);
        let mut w = Window {
            base: 0x1000,
            bytes: vec![0; 8],
        };
        for _ in 0..8 {
            let mut chunk = valid[next() as usize % valid.len()].clone();
            // Flip some bytes of valid frames, or send pure noise.
            if round % 3 == 0 {
                chunk = (0..next() % 40).map(|_| next() as u8).collect();
            } else {
                for _ in 0..next() % 3 {
                    let i = next() as usize % chunk.len();
                    chunk[i] ^= next() as u8;
                }
            }
            r.push(&chunk);
            let _ = c.handle_stream(&mut r, T0, &mut w);
            let _ = c.handle_body(&chunk, T0, &mut w);
            let _ = c.start((), |op| ProcessMsg::Drop { op, cap: Handle(1) });
            while c.poll_transmit().is_some() {}
            while c.poll_event().is_some() {}
            if c.is_closed() {
                assert!(c.close_reason().is_some_and(|e| e.is_fatal()));
                break;
            }
        }
    }
}
