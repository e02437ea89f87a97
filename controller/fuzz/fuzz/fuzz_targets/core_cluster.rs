//! libFuzzer wrapper of [`fractos_fuzz::core_cluster`]: a cluster of
//! controller cores (and a fake keyed peer) driven by the input, every
//! controller's invariants checked after every step.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fractos_fuzz::core_cluster(data);
});
