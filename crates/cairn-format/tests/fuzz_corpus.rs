//! Replays the committed fuzz corpus of each cairn-format fuzz target, `fuzz/corpus/<target>/`,
//! through the very body that target runs (`fuzz/bodies/format.rs`), on stable: every decoder
//! meets its hostile inputs in every test run.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

#[path = "../../../fuzz/bodies/format.rs"]
mod bodies;

/// Fewest inputs a target's corpus may hold: a missing or emptied corpus fails.
const MIN_INPUTS: usize = 5;

/// Runs `body` on every file of `fuzz/corpus/<target>/`, naming each file that panics.
fn replay(target: &str, body: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target);
    assert!(dir.is_dir(), "the fuzz corpus {} is missing", dir.display());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(
        files.len() >= MIN_INPUTS,
        "the fuzz corpus {} holds {} files, fewer than {MIN_INPUTS}",
        dir.display(),
        files.len()
    );
    let mut failed = Vec::new();
    for path in &files {
        let data =
            std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| body(&data))) {
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("(a panic without a message)");
            failed.push(format!("{}: {message}", path.display()));
        }
    }
    assert!(failed.is_empty(), "{target} panicked on {} input(s): {failed:#?}", failed.len());
}

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
