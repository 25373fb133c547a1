//! Fuzz target partition_table: see bodies/files.rs.
#![no_main]

#[allow(dead_code)] // each target calls one of the file's bodies
#[path = "../bodies/files.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::partition_table(data));
