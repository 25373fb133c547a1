//! qcow2 headers: parsing never panics, backing names fit qemu (see bodies/nbd.rs).
#![no_main]

#[allow(dead_code)] // each target calls one of the file's bodies
#[path = "../bodies/nbd.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::qcow2_header(data));
