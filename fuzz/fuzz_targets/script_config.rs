//! Script configurations (Azure's VMSnapshotScriptPluginConfig.json): parsing arbitrary text
//! never panics, and what parses is within the documented limits.
#![no_main]

use cairn_snapshot::scripts::{MAX_RETRIES, MAX_TIMEOUT_SECONDS, ScriptConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(c) = ScriptConfig::parse(text, "fuzz.json") {
        assert!((1..=MAX_TIMEOUT_SECONDS).contains(&c.timeout_seconds));
        assert!(c.pre_retries <= MAX_RETRIES && c.post_retries <= MAX_RETRIES);
        assert!(c.pre_script.is_absolute() && c.post_script.is_absolute());
    }
});
