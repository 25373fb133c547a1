//! Fault injection for tests of the freeze path: `CAIRN_FAILPOINT=NAME=ACTION`.
//!
//! The only way to prove that a watchdog thaws a file system when the agent panics or is
//! killed while it is frozen is to make that happen to the real binary. `ACTION` is `panic`
//! or `sleep:MILLISECONDS`. Unset (the normal case), a failpoint costs one environment lookup.

use std::time::Duration;

/// Where a capture holds its quiescer: after the views are taken, before resuming.
pub const WHILE_QUIESCED: &str = "while-quiesced";

/// Acts on `CAIRN_FAILPOINT` when it names `name`.
pub fn hit(name: &str) {
    let Ok(spec) = std::env::var("CAIRN_FAILPOINT") else { return };
    let Some((point, action)) = spec.split_once('=') else { return };
    if point != name {
        return;
    }
    tracing::warn!(failpoint = name, action, "failpoint hit");
    if action == "panic" {
        panic!("failpoint {name}: panic requested by CAIRN_FAILPOINT");
    }
    if let Some(ms) = action.strip_prefix("sleep:").and_then(|m| m.parse().ok()) {
        std::thread::sleep(Duration::from_millis(ms));
    }
}
