//! Index pages: decoding never panics, and decode(encode(decode(x))) == decode(x).
#![no_main]

use cairn_format::index::IndexPage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(page) = IndexPage::decode(data) {
        let again = IndexPage::decode(&page.encode()).expect("a page it wrote must decode");
        assert_eq!(again, page);
        assert_eq!(page.entries().count() as u64, page.block_count());
    }
});
