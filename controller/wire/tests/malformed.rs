//! Malformed input: decoding never panics, never allocates more than the
//! input could describe, and reports the specific [`DecodeError`].

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use common::*;
use fractos_wire::{
    frame_body, CapInfo, CapRef, ControllerMsg, DecodeError, DeriveSpec, ErrorCode, FrameSplitter,
    Handle, NodeId, ObjectKind, PeerMsg, PeerReply, PeerRequest, ProcessMsg, Reply, Rights,
    FRAME_HEADER_LEN, MAX_CAPS_PER_MESSAGE, MAX_DATA_LEN, MAX_FRAME_LEN, MAX_IMMEDIATES,
    MAX_NAME_LEN, MAX_PROCESS_NAME_LEN, PROTOCOL_VERSION,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

// ---------------------------------------------------------------------------
// Allocation accounting: the peak number of live heap bytes allocated by the
// current thread while a measurement is running. Per thread, so tests running
// in parallel do not disturb each other.
// ---------------------------------------------------------------------------

struct Counting;

thread_local! {
    static MEASURING: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn account(delta: isize) {
    // `try_with`: the slots may be gone while a thread is being torn down.
    let _ = MEASURING.try_with(|m| {
        if m.get() {
            let live = LIVE.with(|l| {
                l.set(l.get() + delta);
                l.get()
            });
            PEAK.with(|p| p.set(p.get().max(live)));
        }
    });
}

// SAFETY: every method forwards to the system allocator with the caller's
// arguments unchanged; the bookkeeping only touches `const`-initialised
// thread-locals of `Copy` types, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        account(layout.size() as isize);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        account(layout.size() as isize);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        account(-(layout.size() as isize));
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Counted as alloc(new) then dealloc(old): the worst case of a move.
        account(new_size as isize);
        // SAFETY: same contract as our caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        account(-(layout.size() as isize));
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result with the peak heap bytes it held live.
fn peak_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    MEASURING.with(|m| m.set(true));
    let out = f();
    MEASURING.with(|m| m.set(false));
    (out, PEAK.with(|p| p.get()).max(0) as usize)
}

/// Decodes `body` with all three decoders and checks none of them holds more
/// heap than a small multiple of the input (in-memory elements are at most
/// about twice their wire size, and growing vectors double).
fn decode_all_bounded(body: &[u8]) {
    let (_, peak) = peak_alloc(|| decode_all(body));
    assert!(
        peak <= 4 * body.len() + 64,
        "decoding {} bytes held {peak} heap bytes",
        body.len()
    );
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// `(variant, direction index into [`decode_all`]'s result, body)` of every
/// example message.
fn all_example_bodies() -> Vec<(&'static str, usize, Vec<u8>)> {
    fn bodies<M: Wire>(examples: Vec<M>, dir: usize) -> Vec<(&'static str, usize, Vec<u8>)> {
        examples
            .iter()
            .map(|m| (m.variant(), dir, m.body()))
            .collect()
    }
    let mut all = bodies(process_examples(), 0);
    all.extend(bodies(controller_examples(), 1));
    all.extend(bodies(peer_examples(), 2));
    all
}

/// A frame header announcing `len` body bytes.
fn header(len: u32) -> [u8; FRAME_HEADER_LEN] {
    len.to_le_bytes()
}

/// The single byte index at which two encodings differ.
fn diff_index(a: &[u8], b: &[u8]) -> usize {
    assert_eq!(a.len(), b.len());
    let diffs: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
    assert_eq!(
        diffs.len(),
        1,
        "expected exactly one differing byte: {diffs:?}"
    );
    diffs[0]
}

/// `body` with the byte at `at` replaced by `value`.
fn patched(body: &[u8], at: usize, value: u8) -> Vec<u8> {
    let mut b = body.to_vec();
    b[at] = value;
    b
}

/// `body` with the little-endian `u16` at `at` replaced by `value`.
fn patched_u16(body: &[u8], at: usize, value: u16) -> Vec<u8> {
    let mut b = body.to_vec();
    b[at..at + 2].copy_from_slice(&value.to_le_bytes());
    b
}

/// `body` with the little-endian `u32` at `at` replaced by `value`.
fn patched_u32(body: &[u8], at: usize, value: u32) -> Vec<u8> {
    let mut b = body.to_vec();
    b[at..at + 4].copy_from_slice(&value.to_le_bytes());
    b
}

fn bad_field(field: &'static str, value: u64) -> DecodeError {
    DecodeError::BadField { field, value }
}

fn too_long(len: usize, max: usize) -> DecodeError {
    DecodeError::FieldTooLong { len, max }
}

// ---------------------------------------------------------------------------
// Truncation
// ---------------------------------------------------------------------------

fn check_prefixes<M: Wire>(msg: &M) {
    let frame = msg.frame();
    let body = &frame[FRAME_HEADER_LEN..];
    for cut in 0..body.len() {
        assert_eq!(
            M::dec(&body[..cut]),
            Err(DecodeError::Truncated),
            "{} body cut at {cut} of {}",
            msg.variant(),
            body.len()
        );
    }
    let splitter = FrameSplitter::default();
    for cut in 0..frame.len() {
        assert_eq!(
            frame_body(&frame[..cut], MAX_FRAME_LEN),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            splitter.split(&frame[..cut]),
            Ok(None),
            "splitter must wait for more"
        );
    }
}

#[test]
fn every_strict_prefix_of_every_example_is_truncated() {
    process_examples().iter().for_each(check_prefixes);
    controller_examples().iter().for_each(check_prefixes);
    peer_examples().iter().for_each(check_prefixes);
}

#[test]
fn empty_and_tiny_inputs() {
    for decoded in decode_all(&[]) {
        assert_eq!(decoded, Err(DecodeError::Truncated));
    }
    for decoded in decode_all(&[PROTOCOL_VERSION]) {
        assert_eq!(decoded, Err(DecodeError::Truncated));
    }
    for len in 0..FRAME_HEADER_LEN {
        assert_eq!(
            frame_body(&[0; 3][..len], MAX_FRAME_LEN),
            Err(DecodeError::Truncated)
        );
        assert_eq!(FrameSplitter::default().split(&[0; 3][..len]), Ok(None));
    }
    // A frame announcing an empty body is a frame; its body is not a message.
    let empty = header(0);
    assert_eq!(frame_body(&empty, MAX_FRAME_LEN), Ok(&[][..]));
    assert_eq!(
        FrameSplitter::default().split(&empty),
        Ok(Some((&[][..], FRAME_HEADER_LEN)))
    );
}

// ---------------------------------------------------------------------------
// Version and kind
// ---------------------------------------------------------------------------

#[test]
fn wrong_version_is_bad_version() {
    for v in (0..=u8::MAX).filter(|&v| v != PROTOCOL_VERSION) {
        let expected = DecodeError::BadVersion {
            got: v,
            expected: PROTOCOL_VERSION,
        };
        // The version is checked before anything else, even the kind.
        for decoded in decode_all(&[v]) {
            assert_eq!(decoded, Err(expected));
        }
        for (name, _, body) in all_example_bodies() {
            let body = patched(&body, 0, v);
            for decoded in decode_all(&body) {
                assert_eq!(decoded, Err(expected), "{name} with version {v}");
            }
        }
    }
}

fn check_kinds<M: Wire>() {
    for kind in 0..=u8::MAX {
        let decoded = M::dec(&[PROTOCOL_VERSION, kind]);
        if !M::KINDS.contains(&kind) {
            assert_eq!(
                decoded,
                Err(DecodeError::UnknownKind(kind)),
                "{} kind {kind}",
                M::DIRECTION
            );
            // Whatever follows an unknown kind does not matter.
            assert_eq!(
                M::dec(&[PROTOCOL_VERSION, kind, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
                decoded
            );
        } else if let Ok(msg) = decoded {
            // Only field-less messages decode from the header alone.
            assert!(
                ["Ping", "Yield", "Join", "Bye", "ByeOk"].contains(&msg.variant()),
                "kind {kind} decoded from its header alone: {}",
                msg.variant()
            );
        } else {
            assert_eq!(
                decoded,
                Err(DecodeError::Truncated),
                "{} kind {kind}",
                M::DIRECTION
            );
        }
    }
}

#[test]
fn unknown_kinds_are_rejected_per_direction() {
    check_kinds::<ProcessMsg>();
    check_kinds::<ControllerMsg>();
    check_kinds::<PeerMsg>();
    assert_eq!(PeerMsg::decode(&[PROTOCOL_VERSION, 3]), Ok(PeerMsg::Ping));
    // Kinds are per direction: a peer-only kind is unknown to a process.
    assert_eq!(
        ControllerMsg::decode(&[PROTOCOL_VERSION, 9]),
        Err(DecodeError::UnknownKind(9))
    );
    assert_eq!(
        ProcessMsg::decode(&[PROTOCOL_VERSION, 16]),
        Err(DecodeError::UnknownKind(16))
    );
    assert_eq!(
        PeerMsg::decode(&[PROTOCOL_VERSION, 0]),
        Err(DecodeError::UnknownKind(0))
    );
}

// ---------------------------------------------------------------------------
// Oversized frames
// ---------------------------------------------------------------------------

#[test]
fn oversized_announced_length_in_frame_body() {
    for (len, max) in [
        (17u32, 16usize),
        (u32::MAX, 16),
        (u32::MAX, MAX_FRAME_LEN),
        (1, 0),
    ] {
        let err = DecodeError::Oversized {
            len: len as usize,
            max,
        };
        // Rejected from the header alone, whatever follows.
        assert_eq!(frame_body(&header(len), max), Err(err));
        let mut frame = header(len).to_vec();
        frame.extend_from_slice(&[0; 20]);
        assert_eq!(frame_body(&frame, max), Err(err));
    }
    let too_big = MAX_FRAME_LEN as u32 + 1;
    assert_eq!(
        frame_body(&header(too_big), MAX_FRAME_LEN),
        Err(DecodeError::Oversized {
            len: MAX_FRAME_LEN + 1,
            max: MAX_FRAME_LEN
        })
    );
    // Exactly at the limit is not oversized, just incomplete.
    assert_eq!(frame_body(&header(16), 16), Err(DecodeError::Truncated));
    let mut frame = header(16).to_vec();
    frame.extend_from_slice(&[0; 16]);
    assert_eq!(frame_body(&frame, 16), Ok(&[0u8; 16][..]));
}

#[test]
fn oversized_announced_length_in_frame_splitter() {
    for (len, max) in [(17u32, 16usize), (u32::MAX, 16), (u32::MAX, MAX_FRAME_LEN)] {
        let err = DecodeError::Oversized {
            len: len as usize,
            max,
        };
        // Reported as soon as the header is in, without waiting for a body
        // that could never be buffered.
        assert_eq!(FrameSplitter::new(max).split(&header(len)), Err(err));
    }
    let too_big = MAX_FRAME_LEN as u32 + 1;
    assert_eq!(
        FrameSplitter::default().split(&header(too_big)),
        Err(DecodeError::Oversized {
            len: MAX_FRAME_LEN + 1,
            max: MAX_FRAME_LEN
        })
    );
    // A valid frame followed by an oversized one: the first is delivered,
    // the second is reported once the first has been consumed.
    let mut stream = PeerMsg::Ping.frame();
    stream.extend_from_slice(&header(u32::MAX));
    let splitter = FrameSplitter::new(64);
    let (body, used) = splitter.split(&stream).unwrap().unwrap();
    assert_eq!(PeerMsg::decode(body), Ok(PeerMsg::Ping));
    assert_eq!(
        splitter.split(&stream[used..]),
        Err(DecodeError::Oversized {
            len: u32::MAX as usize,
            max: 64
        })
    );
    // A frame exactly at the limit passes.
    let mut frame = header(16).to_vec();
    frame.extend_from_slice(&[1; 16]);
    assert_eq!(
        FrameSplitter::new(16).split(&frame),
        Ok(Some((&[1u8; 16][..], 20)))
    );
    assert_eq!(FrameSplitter::new(16).split(&frame[..19]), Ok(None));
}

// ---------------------------------------------------------------------------
// Trailing bytes
// ---------------------------------------------------------------------------

#[test]
fn trailing_bytes_after_a_message() {
    for (name, dir, body) in all_example_bodies() {
        for extra in 1..=3 {
            let mut long = body.clone();
            long.extend(std::iter::repeat_n(0u8, extra));
            assert_eq!(
                decode_all(&long)[dir],
                Err(DecodeError::TrailingBytes(extra)),
                "{name} + {extra} bytes"
            );
        }
    }
    // Direction-specific, exact.
    let mut b = ProcessMsg::Revoke {
        op: 1,
        cap: Handle(2),
    }
    .body();
    b.push(0xFF);
    assert_eq!(ProcessMsg::decode(&b), Err(DecodeError::TrailingBytes(1)));
    let mut b = PeerMsg::Ping.body();
    b.extend_from_slice(&[0; 9]);
    assert_eq!(PeerMsg::decode(&b), Err(DecodeError::TrailingBytes(9)));
}

#[test]
fn trailing_bytes_after_a_frame() {
    let one = ControllerMsg::Attached { node: NodeId(1) }.frame();
    let mut two = one.clone();
    two.extend_from_slice(&PeerMsg::Ping.frame());
    assert_eq!(
        frame_body(&two, MAX_FRAME_LEN),
        Err(DecodeError::TrailingBytes(6))
    );
    let mut junk = one.clone();
    junk.push(0);
    assert_eq!(
        frame_body(&junk, MAX_FRAME_LEN),
        Err(DecodeError::TrailingBytes(1))
    );
    // The splitter, by contrast, hands out the first frame and leaves the rest.
    assert_eq!(
        FrameSplitter::default().split(&two),
        Ok(Some((&one[FRAME_HEADER_LEN..], one.len())))
    );
}

// ---------------------------------------------------------------------------
// Bad field values
// ---------------------------------------------------------------------------

/// Patches the byte at which `a` and `b` differ with every value in `values`
/// and checks the decoder's answer.
fn check_byte_field<M: Wire>(
    a: M,
    b: M,
    values: impl IntoIterator<Item = u8>,
    expect: impl Fn(u8) -> DecodeError,
) {
    let (ba, bb) = (a.body(), b.body());
    let at = diff_index(&ba, &bb);
    for v in values {
        assert_eq!(
            M::dec(&patched(&ba, at, v)),
            Err(expect(v)),
            "{} byte {at} = {v}",
            a.variant()
        );
    }
}

#[test]
fn bad_rights_bits() {
    let rights = |v: u8| bad_field("rights", v as u64);
    let mem = |rights| ProcessMsg::MemoryCreate {
        op: 1,
        addr: 2,
        len: 3,
        rights,
    };
    check_byte_field(mem(Rights::READ), mem(Rights::WRITE), 4..=u8::MAX, rights);
    let dim = |rights| ProcessMsg::Diminish {
        op: 1,
        cap: Handle(2),
        offset: 3,
        len: 4,
        rights,
    };
    check_byte_field(dim(Rights::READ), dim(Rights::WRITE), 4..=u8::MAX, rights);

    let info = |rights| CapInfo {
        kind: ObjectKind::Memory,
        rights,
        len: 9,
    };
    let completion = |rights| ControllerMsg::Completion {
        op: 1,
        result: Ok(Reply::Cap {
            handle: Handle(1),
            info: info(rights),
        }),
    };
    check_byte_field(
        completion(Rights::READ),
        completion(Rights::WRITE),
        4..=u8::MAX,
        rights,
    );
    let invocation = |rights| ControllerMsg::Invocation {
        tag: 1,
        imms: vec![],
        caps: vec![(Handle(1), MEM_INFO), (Handle(2), info(rights))],
    };
    check_byte_field(
        invocation(Rights::READ),
        invocation(Rights::WRITE),
        4..=u8::MAX,
        rights,
    );

    let reply = |rights| PeerMsg::Reply {
        req: 1,
        result: Ok(PeerReply::Cap {
            cap: CAP_A,
            info: info(rights),
        }),
    };
    check_byte_field(
        reply(Rights::READ),
        reply(Rights::WRITE),
        4..=u8::MAX,
        rights,
    );
    let derive = |rights| PeerMsg::Request {
        req: 1,
        body: PeerRequest::Derive {
            parent: CAP_A,
            holder: NodeId(2),
            spec: DeriveSpec::Diminish {
                offset: 0,
                len: 1,
                rights,
            },
        },
    };
    check_byte_field(
        derive(Rights::READ),
        derive(Rights::WRITE),
        4..=u8::MAX,
        rights,
    );
}

#[test]
fn bad_object_kind() {
    let kind = |v: u8| bad_field("object kind", v as u64);
    let info = |kind| CapInfo {
        kind,
        rights: Rights::NONE,
        len: 0,
    };
    let completion = |k| ControllerMsg::Completion {
        op: 1,
        result: Ok(Reply::Cap {
            handle: Handle(1),
            info: info(k),
        }),
    };
    check_byte_field(
        completion(ObjectKind::Memory),
        completion(ObjectKind::Request),
        2..=u8::MAX,
        kind,
    );
    let invocation = |k| ControllerMsg::Invocation {
        tag: 1,
        imms: vec![1],
        caps: vec![(Handle(1), info(k))],
    };
    check_byte_field(
        invocation(ObjectKind::Memory),
        invocation(ObjectKind::Request),
        2..=u8::MAX,
        kind,
    );
    let reply = |k| PeerMsg::Reply {
        req: 1,
        result: Ok(PeerReply::Cap {
            cap: CAP_B,
            info: info(k),
        }),
    };
    check_byte_field(
        reply(ObjectKind::Memory),
        reply(ObjectKind::Request),
        2..=u8::MAX,
        kind,
    );
}

/// Error codes outside the table, including the unused 0.
const BAD_CODES: [u16; 6] = [0, 19, 20, 0x100, 0x8000, u16::MAX];

fn check_error_code_field<M: Wire>(make: impl Fn(ErrorCode) -> M) {
    // BadHandle = 1 and WrongType = 2 differ in the low byte only.
    let (a, b) = (
        make(ErrorCode::BadHandle).body(),
        make(ErrorCode::WrongType).body(),
    );
    let at = diff_index(&a, &b);
    for v in BAD_CODES {
        let msg = make(ErrorCode::BadHandle);
        assert_eq!(
            M::dec(&patched_u16(&a, at, v)),
            Err(bad_field("error code", v as u64)),
            "{} code {v}",
            msg.variant()
        );
    }
    for code in ErrorCode::ALL {
        assert_eq!(M::dec(&patched_u16(&a, at, code as u16)), Ok(make(code)));
    }
}

#[test]
fn bad_error_codes() {
    for v in 0..=u16::MAX {
        let known = ErrorCode::ALL.iter().any(|c| *c as u16 == v);
        assert_eq!(ErrorCode::from_u16(v).is_some(), known);
    }
    check_error_code_field(|e| ProcessMsg::MemReadReply {
        xfer: 1,
        result: Err(e),
    });
    check_error_code_field(|e| ProcessMsg::MemWriteReply {
        xfer: 1,
        result: Err(e),
    });
    check_error_code_field(|code| ControllerMsg::Rejected { code, version: 1 });
    check_error_code_field(|e| ControllerMsg::Completion {
        op: 1,
        result: Err(e),
    });
    check_error_code_field(|e| PeerMsg::Reply {
        req: 1,
        result: Err(e),
    });
    check_error_code_field(|e| PeerMsg::CopyAck {
        source: 1,
        offset: 2,
        result: Err(e),
    });
}

#[test]
fn bad_option_tag() {
    let body = ProcessMsg::Copy {
        op: 1,
        src: Handle(2),
        dst: Handle(3),
        completion: None,
    }
    .body();
    let at = body.len() - 1;
    assert_eq!(body[at], 0);
    for t in 2..=u8::MAX {
        assert_eq!(
            ProcessMsg::decode(&patched(&body, at, t)),
            Err(bad_field("option tag", t as u64))
        );
    }
    // Tag 1 promises a handle that is not there.
    assert_eq!(
        ProcessMsg::decode(&patched(&body, at, 1)),
        Err(DecodeError::Truncated)
    );
    let mut some = patched(&body, at, 1);
    some.extend_from_slice(&7u32.to_le_bytes());
    assert_eq!(
        ProcessMsg::decode(&some),
        Ok(ProcessMsg::Copy {
            op: 1,
            src: Handle(2),
            dst: Handle(3),
            completion: Some(Handle(7))
        })
    );
}

/// The tag byte sits at the end of each of these bodies (the success variant
/// carries no payload).
fn check_tag_at_end<M: Wire>(msg: M, valid: usize, field: &'static str) {
    let body = msg.body();
    let at = body.len() - 1;
    assert_eq!(body[at], 0, "{}: expected tag 0 at the end", msg.variant());
    for t in (valid as u16..=255).map(|t| t as u8) {
        assert_eq!(
            M::dec(&patched(&body, at, t)),
            Err(bad_field(field, t as u64)),
            "{} tag {t}",
            msg.variant()
        );
    }
}

#[test]
fn bad_result_and_union_tags() {
    check_tag_at_end(
        ProcessMsg::MemWriteReply {
            xfer: 1,
            result: Ok(()),
        },
        2,
        "result tag",
    );
    check_tag_at_end(
        ControllerMsg::Completion {
            op: 1,
            result: Ok(Reply::Done),
        },
        3,
        "result tag",
    );
    check_tag_at_end(
        PeerMsg::Reply {
            req: 1,
            result: Ok(PeerReply::Done),
        },
        5,
        "result tag",
    );
    check_tag_at_end(
        PeerMsg::CopyAck {
            source: 1,
            offset: 2,
            result: Ok(()),
        },
        2,
        "result tag",
    );
    check_tag_at_end(
        PeerMsg::Request {
            req: 1,
            body: PeerRequest::Derive {
                parent: CAP_A,
                holder: NodeId(1),
                spec: DeriveSpec::Transfer,
            },
        },
        3,
        "derive spec",
    );

    // MemReadReply: the tag precedes the data.
    let body = ProcessMsg::MemReadReply {
        xfer: 1,
        result: Ok(vec![]),
    }
    .body();
    let at = 2 + 8;
    assert_eq!(body[at], 0);
    for t in 2..=u8::MAX {
        assert_eq!(
            ProcessMsg::decode(&patched(&body, at, t)),
            Err(bad_field("result tag", t as u64))
        );
    }

    // Peer requests: tag after version, kind and the request id.
    let body = PeerMsg::Request {
        req: 1,
        body: PeerRequest::Revoke { cap: CAP_A },
    }
    .body();
    let at = 2 + 8;
    assert_eq!(body[at], 3);
    for t in [0u8, 10, 11, 100, u8::MAX] {
        assert_eq!(
            PeerMsg::decode(&patched(&body, at, t)),
            Err(bad_field("peer request", t as u64))
        );
    }
}

// ---------------------------------------------------------------------------
// Length prefixes
// ---------------------------------------------------------------------------

/// Encodes an over-limit message (the encoder does not police limits) and
/// checks the decoder refuses it with `FieldTooLong`.
fn check_too_long<M: Wire>(msg: M, len: usize, max: usize) {
    let body = msg.body();
    let (decoded, peak) = peak_alloc(|| M::dec(&body));
    assert_eq!(decoded, Err(too_long(len, max)), "{}", msg.variant());
    assert!(
        peak <= 4 * body.len() + 64,
        "{}: {peak} bytes",
        msg.variant()
    );
}

#[test]
fn vector_lengths_over_their_limits_are_field_too_long() {
    let imms = vec![0; MAX_IMMEDIATES + 1];
    let caps: Vec<Handle> = vec![Handle(0); MAX_CAPS_PER_MESSAGE + 1];
    let refs: Vec<CapRef> = vec![CAP_A; MAX_CAPS_PER_MESSAGE + 1];
    let grants: Vec<(CapRef, CapInfo)> = vec![(CAP_A, REQ_INFO); MAX_CAPS_PER_MESSAGE + 1];
    let name = vec![b'x'; MAX_NAME_LEN + 1];
    let data = vec![0; MAX_DATA_LEN + 1];
    let (imm_len, cap_len) = (MAX_IMMEDIATES + 1, MAX_CAPS_PER_MESSAGE + 1);
    let (name_len, data_len) = (MAX_NAME_LEN + 1, MAX_DATA_LEN + 1);

    check_too_long(
        ProcessMsg::Attach {
            name: vec![b'p'; MAX_PROCESS_NAME_LEN + 1],
            token: [0; 32],
        },
        MAX_PROCESS_NAME_LEN + 1,
        MAX_PROCESS_NAME_LEN,
    );
    let rc = |imms, caps| ProcessMsg::RequestCreate {
        op: 1,
        tag: 2,
        imms,
        caps,
    };
    check_too_long(rc(imms.clone(), vec![]), imm_len, MAX_IMMEDIATES);
    check_too_long(rc(vec![], caps.clone()), cap_len, MAX_CAPS_PER_MESSAGE);
    let derive = |imms, caps| ProcessMsg::Derive {
        op: 1,
        cap: Handle(1),
        imms,
        caps,
    };
    check_too_long(derive(imms.clone(), vec![]), imm_len, MAX_IMMEDIATES);
    check_too_long(derive(vec![], caps.clone()), cap_len, MAX_CAPS_PER_MESSAGE);
    let invoke = |imms, caps| ProcessMsg::Invoke {
        op: 1,
        cap: Handle(1),
        imms,
        caps,
    };
    check_too_long(invoke(imms.clone(), vec![]), imm_len, MAX_IMMEDIATES);
    check_too_long(invoke(vec![], caps), cap_len, MAX_CAPS_PER_MESSAGE);
    check_too_long(
        ProcessMsg::Publish {
            op: 1,
            name: name.clone(),
            cap: Handle(1),
        },
        name_len,
        MAX_NAME_LEN,
    );
    check_too_long(
        ProcessMsg::Unpublish {
            op: 1,
            name: name.clone(),
        },
        name_len,
        MAX_NAME_LEN,
    );
    check_too_long(
        ProcessMsg::Lookup {
            op: 1,
            name: name.clone(),
            wait_ms: 0,
        },
        name_len,
        MAX_NAME_LEN,
    );
    check_too_long(
        ProcessMsg::MemReadReply {
            xfer: 1,
            result: Ok(data.clone()),
        },
        data_len,
        MAX_DATA_LEN,
    );

    check_too_long(
        ControllerMsg::Invocation {
            tag: 1,
            imms: vec![0; 2 * MAX_IMMEDIATES + 1],
            caps: vec![],
        },
        2 * MAX_IMMEDIATES + 1,
        2 * MAX_IMMEDIATES,
    );
    check_too_long(
        ControllerMsg::Invocation {
            tag: 1,
            imms: vec![],
            caps: vec![(Handle(1), MEM_INFO); 2 * MAX_CAPS_PER_MESSAGE + 1],
        },
        2 * MAX_CAPS_PER_MESSAGE + 1,
        2 * MAX_CAPS_PER_MESSAGE,
    );
    check_too_long(
        ControllerMsg::MemWrite {
            xfer: 1,
            addr: 0,
            data: data.clone(),
        },
        data_len,
        MAX_DATA_LEN,
    );

    let req = |body| PeerMsg::Request { req: 1, body };
    let bind = |imms, caps| {
        req(PeerRequest::Derive {
            parent: CAP_A,
            holder: NodeId(1),
            spec: DeriveSpec::Bind { imms, caps },
        })
    };
    check_too_long(bind(imms.clone(), vec![]), imm_len, MAX_IMMEDIATES);
    check_too_long(bind(vec![], refs), cap_len, MAX_CAPS_PER_MESSAGE);
    let pinvoke = |imms, caps| {
        req(PeerRequest::Invoke {
            target: CAP_A,
            imms,
            caps,
        })
    };
    check_too_long(pinvoke(imms, vec![]), imm_len, MAX_IMMEDIATES);
    check_too_long(pinvoke(vec![], grants), cap_len, MAX_CAPS_PER_MESSAGE);
    check_too_long(
        req(PeerRequest::Publish {
            name: name.clone(),
            cap: CAP_A,
            publisher: 1,
        }),
        name_len,
        MAX_NAME_LEN,
    );
    check_too_long(
        req(PeerRequest::Unpublish {
            name: name.clone(),
            publisher: 1,
        }),
        name_len,
        MAX_NAME_LEN,
    );
    check_too_long(
        req(PeerRequest::Lookup { name, wait_ms: 1 }),
        name_len,
        MAX_NAME_LEN,
    );
    check_too_long(
        PeerMsg::CopyChunk {
            sink: 1,
            offset: 0,
            data,
        },
        data_len,
        MAX_DATA_LEN,
    );
}

/// Where each length prefix of a message with empty vectors sits, with the
/// limit that applies to it and the wire size of one element.
struct Prefix {
    body: Vec<u8>,
    at: usize,
    max: usize,
    elem: usize,
    decode: fn(&[u8]) -> Result<(), DecodeError>,
}

fn prefix<M: Wire>(msg: M, at: usize, max: usize, elem: usize) -> Prefix {
    let body = msg.body();
    assert_eq!(
        &body[at..at + 4],
        &[0, 0, 0, 0],
        "{}: no empty prefix at {at}",
        msg.variant()
    );
    Prefix {
        body,
        at,
        max,
        elem,
        decode: |b| M::dec(b).map(drop),
    }
}

fn all_prefixes() -> Vec<Prefix> {
    let h = 2; // version + kind
    let grant_elem = 20 + 10; // CapRef + CapInfo
    vec![
        prefix(
            ProcessMsg::Attach {
                name: vec![],
                token: [0; 32],
            },
            h,
            MAX_PROCESS_NAME_LEN,
            1,
        ),
        prefix(
            ProcessMsg::RequestCreate {
                op: 1,
                tag: 1,
                imms: vec![],
                caps: vec![],
            },
            h + 16,
            MAX_IMMEDIATES,
            1,
        ),
        prefix(
            ProcessMsg::RequestCreate {
                op: 1,
                tag: 1,
                imms: vec![],
                caps: vec![],
            },
            h + 20,
            MAX_CAPS_PER_MESSAGE,
            4,
        ),
        prefix(
            ProcessMsg::Invoke {
                op: 1,
                cap: Handle(1),
                imms: vec![],
                caps: vec![],
            },
            h + 12,
            MAX_IMMEDIATES,
            1,
        ),
        prefix(
            ProcessMsg::Derive {
                op: 1,
                cap: Handle(1),
                imms: vec![],
                caps: vec![],
            },
            h + 16,
            MAX_CAPS_PER_MESSAGE,
            4,
        ),
        prefix(
            ProcessMsg::Publish {
                op: 1,
                name: vec![],
                cap: Handle(1),
            },
            h + 8,
            MAX_NAME_LEN,
            1,
        ),
        prefix(
            ProcessMsg::MemReadReply {
                xfer: 1,
                result: Ok(vec![]),
            },
            h + 9,
            MAX_DATA_LEN,
            1,
        ),
        prefix(
            ControllerMsg::Invocation {
                tag: 1,
                imms: vec![],
                caps: vec![],
            },
            h + 8,
            2 * MAX_IMMEDIATES,
            1,
        ),
        prefix(
            ControllerMsg::Invocation {
                tag: 1,
                imms: vec![],
                caps: vec![],
            },
            h + 12,
            2 * MAX_CAPS_PER_MESSAGE,
            14,
        ),
        prefix(
            ControllerMsg::MemWrite {
                xfer: 1,
                addr: 1,
                data: vec![],
            },
            h + 16,
            MAX_DATA_LEN,
            1,
        ),
        prefix(
            PeerMsg::Request {
                req: 1,
                body: PeerRequest::Invoke {
                    target: CAP_A,
                    imms: vec![],
                    caps: vec![],
                },
            },
            h + 8 + 1 + 20 + 4,
            MAX_CAPS_PER_MESSAGE,
            grant_elem,
        ),
        prefix(
            PeerMsg::Request {
                req: 1,
                body: PeerRequest::Derive {
                    parent: CAP_A,
                    holder: NodeId(1),
                    spec: DeriveSpec::Bind {
                        imms: vec![],
                        caps: vec![],
                    },
                },
            },
            h + 8 + 1 + 20 + 4 + 1,
            MAX_IMMEDIATES,
            1,
        ),
        prefix(
            PeerMsg::Request {
                req: 1,
                body: PeerRequest::Derive {
                    parent: CAP_A,
                    holder: NodeId(1),
                    spec: DeriveSpec::Bind {
                        imms: vec![],
                        caps: vec![],
                    },
                },
            },
            h + 8 + 1 + 20 + 4 + 1 + 4,
            MAX_CAPS_PER_MESSAGE,
            20,
        ),
        prefix(
            PeerMsg::Request {
                req: 1,
                body: PeerRequest::Lookup {
                    name: vec![],
                    wait_ms: 1,
                },
            },
            h + 8 + 1,
            MAX_NAME_LEN,
            1,
        ),
        prefix(
            PeerMsg::CopyChunk {
                sink: 1,
                offset: 1,
                data: vec![],
            },
            h + 16,
            MAX_DATA_LEN,
            1,
        ),
    ]
}

#[test]
fn length_prefixes_over_the_limit_are_field_too_long() {
    for p in all_prefixes() {
        for len in [p.max as u32 + 1, p.max as u32 * 2, u32::MAX] {
            let body = patched_u32(&p.body, p.at, len);
            let (decoded, peak) = peak_alloc(|| (p.decode)(&body));
            assert_eq!(
                decoded,
                Err(too_long(len as usize, p.max)),
                "prefix at {}",
                p.at
            );
            assert_eq!(peak, 0, "nothing may be allocated for a refused length");
        }
    }
}

/// A length prefix within the limit but beyond the input is `Truncated`, and
/// the decoder does not reserve memory for the announced elements.
#[test]
fn huge_length_prefixes_with_little_data_are_truncated_without_allocating() {
    for p in all_prefixes() {
        for len in [p.max as u32, p.max as u32 / 2 + 1, 2] {
            // The announced elements would need len * elem bytes; give fewer.
            let body = patched_u32(&p.body, p.at, len);
            let (decoded, peak) = peak_alloc(|| (p.decode)(&body));
            assert_eq!(
                decoded,
                Err(DecodeError::Truncated),
                "prefix at {} = {len}",
                p.at
            );
            assert!(
                peak <= 4 * body.len() + 64,
                "prefix at {} = {len}: {peak} bytes held for a {}-byte body",
                p.at,
                body.len()
            );
            // Still truncated with all but one element's worth of bytes.
            let have = (len as usize * p.elem).saturating_sub(1);
            if have <= 1 << 16 {
                let mut short = body[..p.at + 4].to_vec();
                short.extend(std::iter::repeat_n(0u8, have));
                assert_eq!(
                    (p.decode)(&short),
                    Err(DecodeError::Truncated),
                    "at {} = {len}",
                    p.at
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Arbitrary input never panics
// ---------------------------------------------------------------------------

/// If `body` decodes as `M`, re-encoding gives back exactly `body`: the
/// encoding is canonical, so a decoder that accepts something sloppy shows up.
fn check_canonical<M: Wire>(body: &[u8]) {
    if let Ok(msg) = M::dec(body) {
        assert_eq!(msg.body(), body, "{} re-encodes differently", msg.variant());
    }
}

fn check_any_input(bytes: &[u8]) {
    decode_all_bounded(bytes);
    check_canonical::<ProcessMsg>(bytes);
    check_canonical::<ControllerMsg>(bytes);
    check_canonical::<PeerMsg>(bytes);

    // As a frame and as a stream.
    let _ = frame_body(bytes, MAX_FRAME_LEN);
    let _ = frame_body(bytes, 64);
    let splitter = FrameSplitter::new(4096);
    let mut rest = bytes;
    while let Ok(Some((body, used))) = splitter.split(rest) {
        assert_eq!(body.len() + FRAME_HEADER_LEN, used);
        decode_all_bounded(body);
        rest = &rest[used..];
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..512)) {
        check_any_input(&bytes);
    }

    /// Random bytes rarely get past the header; start from a valid version and
    /// a plausible kind so the field decoders are exercised too.
    #[test]
    fn arbitrary_fields_never_panic(kind in 0u8..20, tail in vec(any::<u8>(), 0..256)) {
        let mut body = vec![PROTOCOL_VERSION, kind];
        body.extend_from_slice(&tail);
        check_any_input(&body);
    }

    /// Valid messages with a few bytes overwritten.
    #[test]
    fn mutated_messages_never_panic(
        msg in prop_oneof![
            process_msg().prop_map(|m| m.body()),
            controller_msg().prop_map(|m| m.body()),
            peer_msg().prop_map(|m| m.body()),
        ],
        edits in vec((any::<Index>(), any::<u8>()), 1..4),
        cut in any::<Index>(),
    ) {
        let mut body = msg;
        for (at, v) in edits {
            let i = at.index(body.len());
            body[i] = v;
        }
        check_any_input(&body);
        // And every mutated message cut short.
        let cut = cut.index(body.len() + 1);
        check_any_input(&body[..cut]);
    }

    /// Strict prefixes of random valid messages are always `Truncated`.
    #[test]
    fn prefixes_of_random_messages_are_truncated(
        msg in prop_oneof![
            process_msg().prop_map(|m| (m.body(), 0u8)),
            controller_msg().prop_map(|m| (m.body(), 1u8)),
            peer_msg().prop_map(|m| (m.body(), 2u8)),
        ],
        cut in any::<Index>(),
    ) {
        let (body, dir) = msg;
        let cut = cut.index(body.len());
        let decoded = decode_all(&body[..cut])[dir as usize];
        prop_assert_eq!(decoded, Err(DecodeError::Truncated));
    }
}
