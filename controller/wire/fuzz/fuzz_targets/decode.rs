//! Fuzz target for the wire decoders.
//!
//! The input is treated three ways: as a frame body for each of the three
//! decoders, as a single frame for `frame_body`, and as a byte stream cut
//! into frames by `FrameSplitter`. No input may panic; every successful
//! decode must re-encode to exactly the bytes it came from (the encoding is
//! canonical) and decode again to the same message.
#![no_main]

use fractos_wire::{
    frame_body, ControllerMsg, DecodeError, FrameSplitter, PeerMsg, ProcessMsg, FRAME_HEADER_LEN,
    MAX_FRAME_LEN,
};
use libfuzzer_sys::fuzz_target;

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

fuzz_target!(|data: &[u8]| {
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
});
