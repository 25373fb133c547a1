//! The NBD server against arbitrary client bytes never panics (see bodies/nbd.rs).
#![no_main]

#[allow(dead_code)] // each target calls one of the file's bodies
#[path = "../bodies/nbd.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::nbd_server(data));
