//! Replays the committed fuzz corpus of each cairn-snapshot fuzz target, `fuzz/corpus/<target>/`,
//! through the very body that target runs (`fuzz/bodies/snapshot.rs`), on stable: every decoder
//! meets its hostile inputs in every test run.

#[path = "../../../fuzz/bodies/snapshot.rs"]
mod bodies;

use cairn_testkit::replay_corpus as replay;

#[test]
fn vm_config() {
    replay("vm_config", bodies::vm_config);
}

#[test]
fn script_config() {
    replay("script_config", bodies::script_config);
}
