//! Chunk frames: decoding never panics, and what decodes re-encodes to something that decodes
//! to the same plaintext.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = cairn_format::decode_chunk(data) {
        let again = cairn_format::encode_chunk(&frame.plaintext, Some(1)).expect("re-encode");
        let back = cairn_format::decode_chunk(&again).expect("re-decode");
        assert_eq!(back.plaintext, frame.plaintext);
    }
});
