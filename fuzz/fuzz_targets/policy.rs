//! Fuzz target policy: see bodies/policy.rs.
#![no_main]

#[allow(dead_code)] // each target calls one of the file's bodies
#[path = "../bodies/policy.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::policy(data));
