//! The wire decoder target (the body of `controller/wire/fuzz`'s `decode`
//! target) and an input generator for the stable driver.

use arbitrary::Unstructured;
use fractos_wire::{
    frame_body, ControllerMsg, DecodeError, FrameSplitter, PeerMsg, ProcessMsg, FRAME_HEADER_LEN,
    MAX_FRAME_LEN, PROTOCOL_VERSION,
};
use rand::Rng;

use crate::gen;

/// Decodes `body` as `M`; if that succeeds, checks the round trip.
fn check<M: PartialEq + core::fmt::Debug>(
    body: &[u8],
    decode: fn(&[u8]) -> Result<M, DecodeError>,
    encode: fn(&M, &mut Vec<u8>),
) {
    let Ok(msg) = decode(body) else { return };
    let mut frame = Vec::with_capacity(body.len() + FRAME_HEADER_LEN);
    encode(&msg, &mut frame);
    assert_eq!(
        frame_body(&frame, MAX_FRAME_LEN),
        Ok(body),
        "{msg:?} re-encodes to different bytes"
    );
    assert_eq!(decode(&frame[FRAME_HEADER_LEN..]).as_ref(), Ok(&msg));
}

fn check_body(body: &[u8]) {
    check(body, ProcessMsg::decode, ProcessMsg::encode);
    check(body, ControllerMsg::decode, ControllerMsg::encode);
    check(body, PeerMsg::decode, PeerMsg::encode);
}

/// The wire decoder target.
///
/// The input is treated three ways: as a frame body for each of the three
/// decoders, as a single frame for `frame_body`, and as a byte stream cut
/// into frames by `FrameSplitter`. No input may panic; every successful
/// decode must re-encode to exactly the bytes it came from (the encoding is
/// canonical) and decode again to the same message.
pub fn wire_decode(data: &[u8]) {
    // A message transport hands over exactly one body.
    check_body(data);

    // A message transport hands over one frame.
    if let Ok(body) = frame_body(data, MAX_FRAME_LEN) {
        assert_eq!(body.len() + FRAME_HEADER_LEN, data.len());
        check_body(body);
    }

    // A byte stream: split frames off the front until one is incomplete or
    // the stream is broken. A small limit makes `Oversized` reachable.
    for splitter in [FrameSplitter::default(), FrameSplitter::new(64)] {
        let mut rest = data;
        while let Ok(Some((body, used))) = splitter.split(rest) {
            assert_eq!(body.len() + FRAME_HEADER_LEN, used);
            assert!(used <= rest.len());
            check_body(body);
            rest = &rest[used..];
        }
    }
}

/// One valid encoded frame (prefix included) of any direction, built from
/// random bytes.
fn valid_frame(rng: &mut impl Rng) -> Vec<u8> {
    let mut seed = vec![0u8; rng.gen_range(0..256)];
    rng.fill(&mut seed[..]);
    let mut u = Unstructured::new(&seed);
    let mut frame = Vec::new();
    let ctx = gen::PeerCtx {
        nodes: vec![fractos_wire::NodeId(1), fractos_wire::NodeId(2)],
        ..gen::PeerCtx::default()
    };
    let built = match rng.gen_range(0..3) {
        0 => gen::any_process_msg(&mut u).map(|m| m.encode(&mut frame)),
        1 => gen::controller_msg(&mut u).map(|m| m.encode(&mut frame)),
        _ => gen::peer_msg(&mut u, &ctx, rng.gen()).map(|m| m.encode(&mut frame)),
    };
    if built.is_err() || frame.is_empty() {
        frame.clear();
        fractos_wire::PeerMsg::Ping.encode(&mut frame);
    }
    frame
}

/// An input for [`wire_decode`] from a seeded RNG: random bytes, random
/// bytes behind a valid header, or valid messages (as a body, a frame or a
/// stream of frames), mutated or not.
pub fn wire_input(rng: &mut impl Rng, max_len: usize) -> Vec<u8> {
    let mut data = match rng.gen_range(0..4) {
        0 => {
            let mut d = vec![0u8; rng.gen_range(0..=max_len.min(64))];
            rng.fill(&mut d[..]);
            d
        }
        1 => {
            let mut d = vec![0u8; rng.gen_range(2..=max_len.clamp(2, 96))];
            rng.fill(&mut d[..]);
            d[0] = PROTOCOL_VERSION;
            d[1] = rng.gen_range(0..=17);
            d
        }
        2 => valid_frame(rng).split_off(FRAME_HEADER_LEN),
        _ => {
            let mut d = Vec::new();
            for _ in 0..rng.gen_range(1..=4) {
                d.extend(valid_frame(rng));
            }
            d
        }
    };
    // Mutate half of them a little.
    if rng.gen_bool(0.5) && !data.is_empty() {
        for _ in 0..rng.gen_range(1..=4) {
            let i = rng.gen_range(0..data.len());
            match rng.gen_range(0..5) {
                0 => data[i] ^= 1 << rng.gen_range(0..8),
                1 => data[i] = rng.gen(),
                2 => data.truncate(i),
                3 => data.insert(i, rng.gen()),
                _ => {
                    let v = [0u8, 1, 0x7f, 0x80, 0xff][rng.gen_range(0..5)];
                    data[i] = v;
                }
            }
            if data.is_empty() {
                break;
            }
        }
    }
    data.truncate(max_len);
    data
}
