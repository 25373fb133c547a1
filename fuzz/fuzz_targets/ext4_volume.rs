//! Fuzz target ext4_volume: see bodies/files.rs.
#![no_main]

#[allow(dead_code)] // each target calls one of the file's bodies
#[path = "../bodies/files.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::ext4_volume(data));
