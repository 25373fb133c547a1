//! VM configurations (TOML): parsing arbitrary text never panics, and every error names a
//! field.
#![no_main]

use std::path::Path;

use cairn_snapshot::{Error, VmConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match VmConfig::parse(text, Path::new("/etc/cairn/vm.toml")) {
        Ok(c) => assert!(!c.disks.is_empty()),
        Err(Error::Config { field, .. }) => assert!(!field.is_empty()),
        Err(other) => panic!("parse returned a non-config error: {other}"),
    }
});
