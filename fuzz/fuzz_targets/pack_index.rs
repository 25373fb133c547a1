//! Pack indexes: decoding never panics, and decode(encode(decode(x))) == decode(x).
#![no_main]

use cairn_format::pack::{decode_pack_index, encode_pack_index};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(packs) = decode_pack_index(data) {
        let bytes = encode_pack_index(&packs);
        assert_eq!(bytes, data, "an accepted index must be the bytes it would write");
        assert_eq!(decode_pack_index(&bytes).expect("its own bytes decode"), packs);
    }
});
