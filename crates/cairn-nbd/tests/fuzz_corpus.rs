//! Replays the committed fuzz corpus of each cairn-nbd fuzz target, `fuzz/corpus/<target>/`,
//! through the very body that target runs (`fuzz/bodies/nbd.rs`), on stable: every decoder
//! meets its hostile inputs in every test run.

#[path = "../../../fuzz/bodies/nbd.rs"]
mod bodies;

use cairn_testkit::replay_corpus as replay;

#[test]
fn nbd_client() {
    replay("nbd_client", bodies::nbd_client);
}

#[test]
fn qemu_img_info() {
    replay("qemu_img_info", bodies::qemu_img_info);
}

#[test]
fn qcow2_header() {
    replay("qcow2_header", bodies::qcow2_header);
}

#[test]
fn nbd_server() {
    replay("nbd_server", bodies::nbd_server);
}
