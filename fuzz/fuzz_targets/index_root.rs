//! Index roots: decoding never panics, and decode(encode(decode(x))) == decode(x).
#![no_main]

use cairn_format::index::IndexRoot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(root) = IndexRoot::decode(data) {
        let again = IndexRoot::decode(&root.encode()).expect("a root it wrote must decode");
        assert_eq!(again, root);
    }
});
