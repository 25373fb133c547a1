//! Pack tables: decoding never panics, and every entry it accepts lies inside the pack.
#![no_main]

use cairn_format::pack::{PACK_HEADER_LEN, decode_pack_table, pack_trailer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = decode_pack_table(data) {
        let trailer = pack_trailer(&entries);
        assert!(data.ends_with(&trailer), "an accepted table must be the one it would write");
        let frames_end = (data.len() - trailer.len()) as u64;
        for e in &entries {
            assert!(u64::from(e.offset) >= PACK_HEADER_LEN as u64);
            assert!(u64::from(e.offset) + u64::from(e.len) <= frames_end);
        }
    }
});
