//! Fuzz target lifecycle: see bodies/format.rs.
#![no_main]

#[allow(dead_code)] // each target calls one of the file's bodies
#[path = "../bodies/format.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::lifecycle(data));
