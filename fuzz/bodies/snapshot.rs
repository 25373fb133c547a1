//! Fuzz bodies for cairn-snapshot's configuration parsers, shared by the fuzz targets and the
//! stable corpus replay.

use std::path::Path;

use cairn_snapshot::scripts::{MAX_RETRIES, MAX_TIMEOUT_SECONDS, ScriptConfig};
use cairn_snapshot::{Error, VmConfig};

/// VM configurations (TOML): parsing arbitrary text never panics, and every error names a
/// field.
pub fn vm_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match VmConfig::parse(text, Path::new("/etc/cairn/vm.toml")) {
        Ok(c) => assert!(!c.disks.is_empty()),
        Err(Error::Config { field, .. }) => assert!(!field.is_empty()),
        Err(other) => panic!("parse returned a non-config error: {other}"),
    }
}

/// Script configurations (Azure's VMSnapshotScriptPluginConfig.json): parsing arbitrary text
/// never panics, and what parses is within the documented limits.
pub fn script_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(c) = ScriptConfig::parse(text, "fuzz.json") {
        assert!((1..=MAX_TIMEOUT_SECONDS).contains(&c.timeout_seconds));
        assert!(c.pre_retries <= MAX_RETRIES && c.post_retries <= MAX_RETRIES);
        assert!(c.pre_script.is_absolute() && c.post_script.is_absolute());
    }
}
