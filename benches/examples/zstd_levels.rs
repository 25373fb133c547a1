//! Ratio and speed of zstd levels on the sample disk's compressible blocks (64 KiB each), to
//! choose the vault default: `cargo run --release -p cairn-benches --example zstd_levels`.

use std::time::Instant;

fn main() {
    let disk = cairn_benches::sample_disk(256 << 20, 1);
    // The blocks that compress at all (the log text); random blocks are skipped by the probe.
    let blocks: Vec<&[u8]> = disk
        .data()
        .chunks(65536)
        .filter(|b| b.iter().any(|x| *x != 0))
        .filter(|b| {
            cairn_format::encode_chunk(b, Some(1)).map(|f| f.len() < b.len()).unwrap_or(false)
        })
        .collect();
    let total: usize = blocks.iter().map(|b| b.len()).sum();
    println!("{} compressible blocks, {} MiB", blocks.len(), total >> 20);
    println!("| level | ratio | MB/s (one core) |");
    println!("|---:|---:|---:|");
    for level in [-7, -5, -3, -1, 1, 2, 3] {
        let clock = Instant::now();
        let stored: usize = blocks
            .iter()
            .map(|b| cairn_format::encode_chunk(b, Some(level)).map(|f| f.len()).unwrap_or(b.len()))
            .sum();
        let secs = clock.elapsed().as_secs_f64();
        println!(
            "| {level} | {:.2} | {:.0} |",
            total as f64 / stored as f64,
            total as f64 / secs / 1e6
        );
    }
}
