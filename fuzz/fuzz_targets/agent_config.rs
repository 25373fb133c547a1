//! Fuzz target agent_config: see bodies/protocol.rs.
#![no_main]

#[allow(dead_code)] // each target calls one of the file's bodies
#[path = "../bodies/protocol.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::agent_config(data));
