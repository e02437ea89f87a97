//! Fuzz target for the wire decoders: [`fractos_fuzz::wire_decode`].
//!
//! The input is treated three ways: as a frame body for each of the three
//! decoders, as a single frame for `frame_body`, and as a byte stream cut
//! into frames by `FrameSplitter`. No input may panic; every successful
//! decode must re-encode to exactly the bytes it came from (the encoding is
//! canonical) and decode again to the same message. The same function runs
//! on stable in `cargo test -p fractos-fuzz`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fractos_fuzz::wire_decode(data);
});
