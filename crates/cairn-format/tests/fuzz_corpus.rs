//! Replays the committed fuzz corpus of each cairn-format fuzz target, `fuzz/corpus/<target>/`,
//! through the very body that target runs (`fuzz/bodies/format.rs`), on stable: every decoder
//! meets its hostile inputs in every test run.

#[path = "../../../fuzz/bodies/format.rs"]
mod bodies;

use cairn_testkit::replay_corpus as replay;

#[test]
fn chunk_frame() {
    replay("chunk_frame", bodies::chunk_frame);
}

#[test]
fn index_page() {
    replay("index_page", bodies::index_page);
}

#[test]
fn index_root() {
    replay("index_root", bodies::index_root);
}

#[test]
fn manifest() {
    replay("manifest", bodies::manifest);
}

#[test]
fn markers() {
    replay("markers", bodies::markers);
}

#[test]
fn names() {
    replay("names", bodies::names);
}

#[test]
fn pack_index() {
    replay("pack_index", bodies::pack_index);
}

#[test]
fn pack_table() {
    replay("pack_table", bodies::pack_table);
}

#[test]
fn patch() {
    replay("patch", bodies::patch);
}

#[test]
fn vault_config() {
    replay("vault_config", bodies::vault_config);
}

#[test]
fn encrypted_frame() {
    replay("encrypted_frame", bodies::encrypted_frame);
}

#[test]
fn sealed_object() {
    replay("sealed_object", bodies::sealed_object);
}

#[test]
fn key_slot() {
    replay("key_slot", bodies::key_slot);
}

#[test]
fn lifecycle() {
    replay("lifecycle", bodies::lifecycle);
}
