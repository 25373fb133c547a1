//! Recovery-point manifests: decoding never panics, and a decoded manifest round-trips.
#![no_main]

use cairn_format::PointManifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = PointManifest::decode(data) {
        assert_eq!(PointManifest::decode(&m.encode()).expect("round trip"), m);
    }
});
