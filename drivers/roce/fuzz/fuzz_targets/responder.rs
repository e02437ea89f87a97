//! libFuzzer wrapper of [`fractos_roce::testing::fuzz_responder`]: the
//! input becomes frames (raw, or well-framed RoCEv2 with fuzzed transport
//! headers) fed to a connected responder; no panic, no access outside a
//! registered region.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fractos_roce::testing::fuzz_responder(data);
});
