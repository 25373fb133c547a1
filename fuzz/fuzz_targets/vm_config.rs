//! VM configurations (TOML): parsing never panics, errors name a field (see bodies/snapshot.rs).
#![no_main]

#[allow(dead_code)] // each target calls one of the file's bodies
#[path = "../bodies/snapshot.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::vm_config(data));
