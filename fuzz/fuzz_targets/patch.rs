//! Patch chunks: decoding and applying never panic, and a patch that decodes is in canonical
//! form (re-encoding the block it rebuilds gives back the same bytes).
#![no_main]

use cairn_format::patch::{Patch, encode_patch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(patch) = Patch::decode(data) {
        let base = vec![0u8; patch.block_len() as usize];
        let block = patch.apply(&base).expect("a decoded patch applies to a base of its length");
        assert_eq!(encode_patch(&block, patch.piece_size(), patch.mask()), data);
        assert!(patch.apply(&base[1..]).is_err());
    }
});
