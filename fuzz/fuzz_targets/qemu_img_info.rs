//! `qemu-img info --output=json` as Cairn reads it: never panics on any bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = cairn_nbd::qemu::parse_info(data) {
        for b in &info.bitmaps {
            let _ = (b.enabled(), b.in_use());
        }
    }
});
