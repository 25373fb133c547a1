//! In-flight markers and damage records: decoding never panics.
#![no_main]

use cairn_format::{DamageRecord, InflightMarker};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = InflightMarker::decode(data) {
        assert_eq!(InflightMarker::decode(&m.encode()).expect("round trip"), m);
    }
    if let Ok(d) = DamageRecord::decode(data) {
        assert_eq!(DamageRecord::decode(&d.encode()).expect("round trip"), d);
    }
});
