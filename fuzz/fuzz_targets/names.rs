//! Names, point ids and digests parsed from vault paths: parsing never panics and round-trips.
#![no_main]

use cairn_format::{Digest, Name, PointId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(n) = s.parse::<Name>() {
        assert_eq!(n.as_str(), s);
    }
    if let Ok(p) = s.parse::<PointId>() {
        assert_eq!(p.as_str(), s);
    }
    if let Ok(d) = s.parse::<Digest>() {
        assert_eq!(d.to_hex(), s);
    }
});
