//! Round-trip properties: every message of every direction survives
//! encode → frame → decode unchanged, alone and inside a byte stream cut at
//! arbitrary points.

mod common;

use std::collections::BTreeSet;

use common::*;
use fractos_wire::{
    frame_body, CapInfo, CapRef, ControllerMsg, DeriveSpec, ErrorCode, FrameSplitter, Handle,
    NodeId, ObjectKind, PeerMsg, PeerRequest, ProcessMsg, Rights, FRAME_HEADER_LEN,
    MAX_CAPS_PER_MESSAGE, MAX_DATA_LEN, MAX_FRAME_LEN, MAX_IMMEDIATES, MAX_NAME_LEN,
    MAX_PROCESS_NAME_LEN, PROTOCOL_VERSION,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;

/// Encodes `msg`, checks the frame layout, and decodes it back through
/// [`frame_body`] and through a [`FrameSplitter`].
fn check_roundtrip<M: Wire>(msg: &M) {
    // Encoding appends: bytes already in the buffer are left alone.
    let mut frame = vec![0xEE; 3];
    msg.enc(&mut frame);
    assert_eq!(&frame[..3], &[0xEE; 3], "encode must only append");
    let frame = frame.split_off(3);
    assert_eq!(frame, msg.frame(), "encoding is deterministic");

    // Layout: u32 LE body length, version, kind.
    assert!(frame.len() >= FRAME_HEADER_LEN + 2, "{msg:?}");
    let len = u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize;
    assert_eq!(
        len,
        frame.len() - FRAME_HEADER_LEN,
        "length prefix of {msg:?}"
    );
    assert!(len <= MAX_FRAME_LEN);
    assert_eq!(frame[4], PROTOCOL_VERSION);
    assert_eq!(
        frame[5],
        msg.kind(),
        "kind byte of {msg:?} ({})",
        M::DIRECTION
    );

    // Message transport: one frame per message.
    let body = frame_body(&frame, MAX_FRAME_LEN).expect("valid frame");
    assert_eq!(M::dec(body).as_ref(), Ok(msg));

    // Byte stream: the splitter finds exactly this frame.
    let (body, used) = FrameSplitter::default()
        .split(&frame)
        .unwrap()
        .expect("complete frame");
    assert_eq!(used, frame.len());
    assert_eq!(M::dec(body).as_ref(), Ok(msg));
}

/// Concatenates the frames of `msgs`, feeds the stream to a reassembly buffer
/// in chunks cut at `cuts`, and checks the splitter yields `msgs` in order.
fn check_stream<M: Wire>(msgs: &[M], cuts: &[Index]) {
    let mut stream = Vec::new();
    for m in msgs {
        m.enc(&mut stream);
    }
    let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
    points.push(stream.len());
    points.sort_unstable();

    let splitter = FrameSplitter::default();
    let mut buf: Vec<u8> = Vec::new();
    let mut got = Vec::new();
    let mut fed = 0;
    for p in points {
        buf.extend_from_slice(&stream[fed..p]);
        fed = p;
        loop {
            let (msg, used) = match splitter.split(&buf) {
                Ok(Some((body, used))) => (M::dec(body).expect("valid body"), used),
                Ok(None) => break,
                Err(e) => panic!("splitter error {e:?} on a valid stream"),
            };
            got.push(msg);
            buf.drain(..used);
        }
    }
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
    assert_eq!(got, msgs);
}

proptest! {
    #[test]
    fn process_msg_roundtrip(msg in process_msg()) {
        check_roundtrip(&msg);
    }

    #[test]
    fn controller_msg_roundtrip(msg in controller_msg()) {
        check_roundtrip(&msg);
    }

    #[test]
    fn peer_msg_roundtrip(msg in peer_msg()) {
        check_roundtrip(&msg);
    }

    #[test]
    fn process_stream_reassembly(
        msgs in vec(process_msg(), 0..6),
        cuts in vec(any::<Index>(), 0..16),
    ) {
        check_stream(&msgs, &cuts);
    }

    #[test]
    fn controller_stream_reassembly(
        msgs in vec(controller_msg(), 0..6),
        cuts in vec(any::<Index>(), 0..16),
    ) {
        check_stream(&msgs, &cuts);
    }

    #[test]
    fn peer_stream_reassembly(
        msgs in vec(peer_msg(), 0..6),
        cuts in vec(any::<Index>(), 0..16),
    ) {
        check_stream(&msgs, &cuts);
    }
}

#[test]
fn every_example_roundtrips_and_examples_cover_every_variant() {
    fn run<M: Wire>(examples: Vec<M>) {
        let mut names = BTreeSet::new();
        for m in &examples {
            check_roundtrip(m);
            names.insert(m.variant());
        }
        assert_covers_all_variants::<M>(&names);
        // Byte by byte: the worst case for stream reassembly.
        let cuts: Vec<Index> = Vec::new();
        check_stream(&examples, &cuts);
        let mut stream = Vec::new();
        for m in &examples {
            m.enc(&mut stream);
        }
        let splitter = FrameSplitter::default();
        let (mut buf, mut got) = (Vec::new(), Vec::new());
        for b in stream {
            buf.push(b);
            if let Some((body, used)) = splitter.split(&buf).unwrap() {
                got.push(M::dec(body).unwrap());
                buf.drain(..used);
            }
        }
        assert_eq!(got, examples);
    }
    run(process_examples());
    run(controller_examples());
    run(peer_examples());
}

/// The strategies themselves must reach every variant, or the round-trip
/// properties above silently test less than they claim.
#[test]
fn strategies_cover_every_variant() {
    fn run<M: Wire>(strategy: impl Strategy<Value = M>) {
        let mut runner = TestRunner::deterministic();
        let mut names = BTreeSet::new();
        for _ in 0..3000 {
            names.insert(strategy.new_tree(&mut runner).unwrap().current().variant());
        }
        assert_covers_all_variants::<M>(&names);
    }
    run(process_msg());
    run(controller_msg());
    run(peer_msg());
}

#[test]
fn every_error_code_roundtrips_everywhere_an_error_travels() {
    for code in ErrorCode::ALL {
        assert_eq!(ErrorCode::from_u16(code as u16), Some(code));
        check_roundtrip(&ProcessMsg::MemReadReply {
            xfer: 1,
            result: Err(code),
        });
        check_roundtrip(&ProcessMsg::MemWriteReply {
            xfer: 1,
            result: Err(code),
        });
        check_roundtrip(&ControllerMsg::Rejected {
            code,
            version: PROTOCOL_VERSION,
        });
        check_roundtrip(&ControllerMsg::Completion {
            op: 1,
            result: Err(code),
        });
        check_roundtrip(&PeerMsg::Reply {
            req: 1,
            result: Err(code),
        });
        check_roundtrip(&PeerMsg::CopyAck {
            source: 1,
            offset: 2,
            result: Err(code),
        });
    }
}

#[test]
fn every_rights_and_kind_combination_roundtrips() {
    for bits in 0..=3 {
        let rights = Rights::from_bits(bits).unwrap();
        assert_eq!(rights.bits(), bits);
        for kind in [ObjectKind::Memory, ObjectKind::Request] {
            let info = CapInfo {
                kind,
                rights,
                len: u64::MAX,
            };
            check_roundtrip(&ControllerMsg::Completion {
                op: 0,
                result: Ok(fractos_wire::Reply::Cap {
                    handle: Handle(u32::MAX),
                    info,
                }),
            });
            check_roundtrip(&PeerMsg::Reply {
                req: 0,
                result: Ok(fractos_wire::PeerReply::Cap { cap: CAP_A, info }),
            });
        }
        check_roundtrip(&ProcessMsg::MemoryCreate {
            op: 0,
            addr: 0,
            len: 1,
            rights,
        });
        check_roundtrip(&ProcessMsg::Diminish {
            op: 0,
            cap: Handle(0),
            offset: 0,
            len: 1,
            rights,
        });
        check_roundtrip(&PeerMsg::Request {
            req: 0,
            body: PeerRequest::Derive {
                parent: CAP_A,
                holder: NodeId(0),
                spec: DeriveSpec::Diminish {
                    offset: 0,
                    len: 0,
                    rights,
                },
            },
        });
    }
}

/// Every limit is inclusive: a field exactly at its limit round-trips.
#[test]
fn fields_exactly_at_their_limits_roundtrip() {
    let imms = vec![0x5A; MAX_IMMEDIATES];
    let caps: Vec<Handle> = (0..MAX_CAPS_PER_MESSAGE as u32).map(Handle).collect();
    let refs: Vec<CapRef> = (0..MAX_CAPS_PER_MESSAGE as u64)
        .map(|i| CapRef { cap: i, ..CAP_A })
        .collect();
    let grants: Vec<(CapRef, CapInfo)> = refs.iter().map(|r| (*r, MEM_INFO)).collect();
    let name = vec![b'n'; MAX_NAME_LEN];
    let data = vec![0xC3; MAX_DATA_LEN];

    check_roundtrip(&ProcessMsg::Attach {
        name: vec![b'p'; MAX_PROCESS_NAME_LEN],
        token: [1; 32],
    });
    check_roundtrip(&ProcessMsg::RequestCreate {
        op: 1,
        tag: 2,
        imms: imms.clone(),
        caps: caps.clone(),
    });
    check_roundtrip(&ProcessMsg::Derive {
        op: 1,
        cap: Handle(1),
        imms: imms.clone(),
        caps: caps.clone(),
    });
    check_roundtrip(&ProcessMsg::Invoke {
        op: 1,
        cap: Handle(1),
        imms: imms.clone(),
        caps,
    });
    check_roundtrip(&ProcessMsg::Publish {
        op: 1,
        name: name.clone(),
        cap: Handle(1),
    });
    check_roundtrip(&ProcessMsg::Unpublish {
        op: 1,
        name: name.clone(),
    });
    check_roundtrip(&ProcessMsg::Lookup {
        op: 1,
        name: name.clone(),
        wait_ms: u32::MAX,
    });
    check_roundtrip(&ProcessMsg::MemReadReply {
        xfer: 1,
        result: Ok(data.clone()),
    });

    // An invocation carries bound ++ invoker arguments: twice the limits.
    check_roundtrip(&ControllerMsg::Invocation {
        tag: 1,
        imms: vec![1; 2 * MAX_IMMEDIATES],
        caps: (0..2 * MAX_CAPS_PER_MESSAGE as u32)
            .map(|h| (Handle(h), MEM_INFO))
            .collect(),
    });
    check_roundtrip(&ControllerMsg::MemWrite {
        xfer: 1,
        addr: 0,
        data: data.clone(),
    });

    check_roundtrip(&PeerMsg::Request {
        req: 1,
        body: PeerRequest::Derive {
            parent: CAP_A,
            holder: NodeId(1),
            spec: DeriveSpec::Bind {
                imms: imms.clone(),
                caps: refs.clone(),
            },
        },
    });
    check_roundtrip(&PeerMsg::Request {
        req: 1,
        body: PeerRequest::Invoke {
            target: CAP_A,
            imms,
            caps: grants,
        },
    });
    check_roundtrip(&PeerMsg::Request {
        req: 1,
        body: PeerRequest::Publish {
            name: name.clone(),
            cap: CAP_B,
            publisher: 1,
        },
    });
    check_roundtrip(&PeerMsg::Request {
        req: 1,
        body: PeerRequest::Unpublish {
            name: name.clone(),
            publisher: 1,
        },
    });
    check_roundtrip(&PeerMsg::Request {
        req: 1,
        body: PeerRequest::Lookup { name, wait_ms: 1 },
    });
    check_roundtrip(&PeerMsg::CopyChunk {
        sink: 1,
        offset: 0,
        data,
    });
}

/// Pins the byte layout (little-endian integers, `u32` length prefixes,
/// option and result tags) so an accidental format change fails loudly.
#[test]
fn golden_encodings() {
    let revoke = ProcessMsg::Revoke {
        op: 0x0102_0304_0506_0708,
        cap: Handle(0x0A0B_0C0D),
    };
    assert_eq!(
        revoke.frame(),
        [
            14, 0, 0, 0, // body length
            3, 8, // version, kind
            8, 7, 6, 5, 4, 3, 2, 1, // op
            0x0D, 0x0C, 0x0B, 0x0A, // handle
        ]
    );

    let copy = ProcessMsg::Copy {
        op: 1,
        src: Handle(2),
        dst: Handle(3),
        completion: Some(Handle(4)),
    };
    assert_eq!(
        copy.body(),
        [3, 7, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 1, 4, 0, 0, 0]
    );

    let lookup = ProcessMsg::Lookup {
        op: 2,
        name: b"ab".to_vec(),
        wait_ms: 5,
    };
    assert_eq!(
        lookup.body(),
        [3, 13, 2, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, b'a', b'b', 5, 0, 0, 0]
    );

    let done = ControllerMsg::Completion {
        op: 3,
        result: Ok(fractos_wire::Reply::Cap {
            handle: Handle(1),
            info: MEM_INFO,
        }),
    };
    assert_eq!(
        done.body(),
        [3, 3, 3, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 16, 0, 0, 0, 0, 0, 0]
    );

    let err = ControllerMsg::Completion {
        op: 4,
        result: Err(ErrorCode::Revoked),
    };
    assert_eq!(err.body(), [3, 3, 4, 0, 0, 0, 0, 0, 0, 0, 2, 5, 0]);

    assert_eq!(PeerMsg::Ping.frame(), [2, 0, 0, 0, 3, 3]);
    let release = PeerMsg::Release {
        cap: CapRef {
            node: NodeId(1),
            incarnation: 2,
            cap: 3,
        },
    };
    assert_eq!(
        release.body(),
        [3, 6, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]
    );

    // The handshake opening (unchanged since version 2): node, incarnation, 32-byte nonce,
    // the node dialled, the security required.
    let hello = PeerMsg::Hello {
        node: NodeId(1),
        incarnation: 2,
        nonce: [7; 32],
        responder: NodeId(3),
        security: fractos_wire::PeerSecurity::Secure,
    };
    let mut want = vec![3, 1, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0];
    want.extend_from_slice(&[7; 32]);
    want.extend_from_slice(&[3, 0, 0, 0, 2]);
    assert_eq!(hello.body(), want);
    // A version-1 Hello (the relayable handshake) is refused by version.
    let mut old = vec![1u8, 1, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0];
    old.extend_from_slice(&[7; 16]);
    assert_eq!(
        PeerMsg::decode(&old),
        Err(fractos_wire::DecodeError::BadVersion {
            got: 1,
            expected: 3
        })
    );
    // A version-2 peer (no gossip frames) is refused by version too.
    assert_eq!(
        PeerMsg::decode(&[2, 3]),
        Err(fractos_wire::DecodeError::BadVersion {
            got: 2,
            expected: 3
        })
    );
    // Version 3's probe: seq, count, then node, incarnation, seq, state.
    let probe = PeerMsg::Probe {
        seq: 5,
        updates: vec![fractos_wire::MemberUpdate {
            node: NodeId(2),
            incarnation: 9,
            seq: 1,
            state: fractos_wire::MemberState::Suspect,
        }],
    };
    assert_eq!(
        probe.body(),
        [
            3, 12, 5, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0,
            0, 1
        ]
    );
}
