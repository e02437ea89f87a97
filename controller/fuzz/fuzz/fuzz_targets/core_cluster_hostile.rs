//! libFuzzer wrapper of [`fractos_fuzz::core_cluster_hostile`]: as
//! `core_cluster`, with a peer that also hands controllers references to
//! their own nodes where the protocol says they already hold them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fractos_fuzz::core_cluster_hostile(data);
});
