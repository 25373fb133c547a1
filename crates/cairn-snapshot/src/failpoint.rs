//! Fault injection for tests of the freeze path: `CAIRN_FAILPOINT=NAME=ACTION`.
//!
//! The only way to prove that a watchdog thaws a file system when the agent panics or is
//! killed while it is frozen is to make that happen to the real binary. `ACTION` is `panic`
//! or `sleep:MILLISECONDS`.
//!
//! Failpoints exist only in builds with the `failpoints` feature, which only tests turn on
//! (`cairn-agent` enables it through a dev-dependency, so the binary its integration tests
//! spawn has them and a release build does not): without it, [`hit`] is empty and the
//! variable is never read. An agent that freezes guests must not be made to panic or sleep
//! inside the freeze by its environment.

/// Where a capture holds its quiescer: after the views are taken, before resuming.
pub const WHILE_QUIESCED: &str = "while-quiesced";
/// Where an agent's job waits between its snapshot and its transfer (a slow queue, in tests).
pub const BEFORE_TRANSFER: &str = "before-transfer";

/// Acts on `CAIRN_FAILPOINT` when it names `name` (only with the `failpoints` feature).
#[cfg(feature = "failpoints")]
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
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Does nothing: this build has no failpoints.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}
