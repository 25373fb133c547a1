//! `qemu-img info --output=json` as Cairn reads it never panics (see bodies/nbd.rs).
#![no_main]

#[allow(dead_code)] // each target calls one of the file's bodies
#[path = "../bodies/nbd.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::qemu_img_info(data));
