//! Scans a disk image with the delta engine, hash only, and prints the rate: the engine's
//! read, zero-skip and SHA-256 pass over a real file.
//!
//! `cargo run --release -p cairn-benches --example scan_file -- IMAGE [BLOCK_SIZE]`

use std::time::Instant;

use cairn_delta::{EngineConfig, NoBases, NoPrevious, RawFile, scan};

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("usage: scan_file IMAGE [BLOCK_SIZE]");
    let block: u32 = args.next().map(|b| b.parse().expect("block size in bytes")).unwrap_or(65536);
    let source = RawFile::open(path.as_ref()).expect("open image");
    let clock = Instant::now();
    let summary = scan(&source, NoPrevious, &NoBases, &(), &EngineConfig::new(block), |_| Ok(()))
        .expect("scan");
    let secs = clock.elapsed().as_secs_f64();
    println!(
        "{path}: {} blocks, {:.1} MiB hashed in {secs:.3} s: {:.2} GiB/s of disk, {:.2} GiB/s hashed",
        summary.blocks,
        summary.bytes_scanned as f64 / 1048576.0,
        cairn_delta::BlockSource::size(&source) as f64 / secs / 1073741824.0,
        summary.bytes_scanned as f64 / secs / 1073741824.0
    );
}
