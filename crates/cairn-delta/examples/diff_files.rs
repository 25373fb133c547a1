//! The delta engine alone over files: what changed between two versions of a disk image.
//!
//! `cargo run --release -p cairn-delta --example diff_files [OLD NEW]` scans OLD, keeping its
//! index and its blocks in memory, then scans NEW against them and prints how many blocks are
//! unchanged, changed, or stored as patches of a few 4 KiB pieces. Without arguments it makes
//! a small sample image and a copy with 1% of its 4 KiB pieces changed.

use std::collections::HashMap;

use cairn_delta::{
    BlockEncoder, BlockEvent, EngineConfig, NoBases, NoPrevious, RawFile, ScanSummary, scan,
};
use cairn_format::Digest;
use cairn_format::index::BlockEntry;

/// Keeps each changed block (or patch) as it is: what a vault would store, compressed.
struct Keep;
impl BlockEncoder for Keep {
    type Output = Vec<u8>;
    fn encode(&self, _: &Digest, bytes: &[u8]) -> Vec<u8> {
        bytes.to_vec()
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let temp = tempfile::tempdir()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (old, new) = match args.as_slice() {
        [old, new] => (old.into(), new.into()),
        _ => {
            let (old, new) = (temp.path().join("old.raw"), temp.path().join("new.raw"));
            cairn_sample::create_disk(&old, 64 << 20, 1)?;
            std::fs::copy(&old, &new)?;
            cairn_sample::mutate_scattered(&new, 0.01, 2)?;
            (old, new)
        }
    };
    let config = EngineConfig::new(65536);
    let mut index: Vec<BlockEntry> = Vec::new();
    let mut chunks: HashMap<Digest, Vec<u8>> = HashMap::new();
    // First version: every block is new; keep the index and the blocks.
    let first = scan(&RawFile::open(&old)?, NoPrevious, &NoBases, &Keep, &config, |batch| {
        let holes = batch.trailing_holes as usize;
        for event in batch.events {
            index.push(event.entry());
            if let BlockEvent::Changed { chunk, payload, .. } = event {
                chunks.insert(chunk, payload);
            }
        }
        index.extend(std::iter::repeat_n(BlockEntry::Hole, holes));
        Ok(())
    })?;
    // Second version, against the first: the index says what each block was, and the kept
    // blocks are the bases a patch is checked against.
    let mut stored = 0u64;
    let second =
        scan(&RawFile::open(&new)?, index.into_iter(), &chunks, &Keep, &config, |batch| {
            for event in &batch.events {
                if let BlockEvent::Changed { payload, .. } = event {
                    stored += payload.len() as u64;
                }
            }
            Ok(())
        })?;
    report("old", &first, None);
    report("new", &second, Some(stored));
    Ok(())
}

fn report(what: &str, s: &ScanSummary, stored: Option<u64>) {
    println!(
        "{what}: {} blocks: {} holes, {} zero, {} unchanged, {} changed ({} as patches){}",
        s.blocks,
        s.holes,
        s.zeros,
        s.unchanged,
        s.changed,
        s.patched,
        stored.map(|b| format!("; {b} bytes to store")).unwrap_or_default()
    );
}
