//! Replays the committed fuzz corpus of each cairn-qemu fuzz target, `fuzz/corpus/<target>/`,
//! through the very body that target runs (`fuzz/bodies/qemu.rs`), on stable.

#[path = "../../../fuzz/bodies/qemu.rs"]
mod bodies;

use cairn_testkit::replay_corpus as replay;

#[test]
fn qmp_message() {
    replay("qmp_message", bodies::qmp_message);
}

#[test]
fn guest_agent() {
    replay("guest_agent", bodies::guest_agent);
}

#[test]
fn guest_hook_report() {
    replay("guest_hook_report", bodies::guest_hook_report);
}
