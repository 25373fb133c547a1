//! Shared set-up for Cairn's benchmarks: a seeded sample disk held in memory.

use cairn_delta::MemSource;

/// A seeded sample disk of `size` bytes (holes, zeros, random, log text), read into memory so
/// the benchmark measures the engine, not the file system.
pub fn sample_disk(size: u64, seed: u64) -> MemSource {
    let dir =
        std::env::temp_dir().join(format!("cairn-bench-{}-{size}-{seed}", std::process::id()));
    cairn_sample::create_disk(&dir, size, seed)
        .unwrap_or_else(|e| panic!("writing {}: {e}", dir.display()));
    let data = std::fs::read(&dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    let _ = std::fs::remove_file(&dir);
    MemSource::new("sample", data)
}

/// Overwrites `fraction` of the 4 KiB pieces of `disk` at seeded random offsets.
pub fn mutate(disk: &mut MemSource, fraction: f64, seed: u64) {
    let data = disk.data_mut();
    let pieces = data.len() / 4096;
    let count = (pieces as f64 * fraction) as usize;
    let mut x = seed | 1;
    for _ in 0..count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let at = (x as usize % pieces) * 4096;
        if let Some(piece) = data.get_mut(at..at + 4096) {
            for (i, b) in piece.iter_mut().enumerate() {
                *b = (x >> (i % 8 * 8)) as u8 ^ i as u8;
            }
        }
    }
}
