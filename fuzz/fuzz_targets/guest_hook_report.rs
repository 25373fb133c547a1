//! See bodies/qemu.rs.
#![no_main]

#[allow(dead_code)] // each target calls one of the file's bodies
#[path = "../bodies/qemu.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::guest_hook_report(data));
