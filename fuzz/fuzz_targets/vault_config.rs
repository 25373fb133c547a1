//! Vault configs: decoding never panics, and a decoded config round-trips.
#![no_main]

use cairn_format::VaultConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = VaultConfig::decode(data) {
        assert_eq!(VaultConfig::decode(&c.encode()).expect("round trip"), c);
    }
});
