//! Seeded sample disks.
//!
//! [`create_disk`] writes a sparse raw image whose content looks like a VM disk: runs of holes
//! and of allocated zeros (30% together), incompressible random data (40%) and log-like text
//! (30%), in regions of 64 KiB to 4 MiB. The same seed always gives the same bytes, so the
//! quickstart, the tests and the peer benchmark all work on reproducible data.
//! [`mutate_scattered`] then overwrites a fraction of the 4 KiB blocks at random offsets, the
//! worst case for a block-level incremental, and [`mutate_range`] one contiguous range.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rand::{Rng, RngExt, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

/// The kind of content of a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Region {
    /// Never written: a hole.
    Hole,
    /// Written with zeros.
    Zeros,
    /// Random bytes.
    Random,
    /// Log lines.
    Text,
}

/// Bytes of each kind in a generated disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Composition {
    /// Hole bytes.
    pub hole: u64,
    /// Zero bytes.
    pub zeros: u64,
    /// Random bytes.
    pub random: u64,
    /// Text bytes.
    pub text: u64,
}

const PIECE: u64 = 4096;
const MIN_REGION: u64 = 64 * 1024;
const MAX_REGION: u64 = 4 * 1024 * 1024;

fn pick_region(rng: &mut Xoshiro256PlusPlus) -> Region {
    match rng.random_range(0..100u32) {
        0..15 => Region::Hole,
        15..30 => Region::Zeros,
        30..70 => Region::Random,
        _ => Region::Text,
    }
}

/// Writes a sample disk of `size` bytes (rounded down to 4 KiB) at `path`, replacing any file.
pub fn create_disk(path: &Path, size: u64, seed: u64) -> io::Result<Composition> {
    let size = size / PIECE * PIECE;
    let file = OpenOptions::new().create(true).write(true).truncate(true).open(path)?;
    file.set_len(size)?;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut text = TextGen::new(seed ^ 0x5eed);
    let mut comp = Composition::default();
    let mut buf = vec![0u8; MAX_REGION as usize];
    let mut pos = 0;
    while pos < size {
        let len =
            (rng.random_range(MIN_REGION / PIECE..=MAX_REGION / PIECE) * PIECE).min(size - pos);
        let region = pick_region(&mut rng);
        let out = &mut buf[..len as usize];
        match region {
            Region::Hole => comp.hole += len,
            Region::Zeros => {
                out.fill(0);
                file.write_all_at(out, pos)?;
                comp.zeros += len;
            }
            Region::Random => {
                rng.fill_bytes(out);
                file.write_all_at(out, pos)?;
                comp.random += len;
            }
            Region::Text => {
                text.fill(out);
                file.write_all_at(out, pos)?;
                comp.text += len;
            }
        }
        pos += len;
    }
    file.sync_all()?;
    Ok(comp)
}

/// Overwrites `fraction` of the disk's 4 KiB blocks, chosen at random over the whole disk, with
/// random data; returns how many blocks were written. Like a running VM, it writes into holes
/// as well as into data.
pub fn mutate_scattered(path: &Path, fraction: f64, seed: u64) -> io::Result<u64> {
    let file = OpenOptions::new().write(true).open(path)?;
    let pieces = file.metadata()?.len() / PIECE;
    let count = ((pieces as f64) * fraction.clamp(0.0, 1.0)).round() as u64;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut buf = [0u8; PIECE as usize];
    for _ in 0..count {
        let at = rng.random_range(0..pieces.max(1)) * PIECE;
        rng.fill_bytes(&mut buf);
        file.write_all_at(&buf, at)?;
    }
    file.sync_all()?;
    Ok(count)
}

/// Overwrites `len` bytes from `offset` with random data (a contiguous change).
pub fn mutate_range(path: &Path, offset: u64, len: u64, seed: u64) -> io::Result<()> {
    let file = OpenOptions::new().write(true).open(path)?;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        file.write_all_at(&buf[..n], offset + done)?;
        done += n as u64;
    }
    file.sync_all()
}

/// Whether two files have the same length and bytes.
pub fn same_content(a: &Path, b: &Path) -> io::Result<bool> {
    let (fa, fb) = (File::open(a)?, File::open(b)?);
    let len = fa.metadata()?.len();
    if len != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(1 << 20) as usize;
        fa.read_exact_at(&mut ba[..n], pos)?;
        fb.read_exact_at(&mut bb[..n], pos)?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
        pos += n as u64;
    }
    Ok(true)
}

/// Log lines with timestamps, levels, services, paths and ids: compressible like real logs.
struct TextGen {
    rng: Xoshiro256PlusPlus,
    clock_ms: u64,
    pending: Vec<u8>,
}

const LEVELS: [&str; 4] = ["INFO ", "INFO ", "DEBUG", "WARN "];
const SERVICES: [&str; 6] = ["api-gw", "orders", "billing", "auth", "search", "worker"];
const METHODS: [&str; 3] = ["GET", "GET", "POST"];
const PATHS: [&str; 6] = [
    "/api/v1/orders/",
    "/api/v1/users/",
    "/api/v2/search?q=",
    "/health",
    "/api/v1/cart/",
    "/static/app.",
];
const STATUS: [u16; 6] = [200, 200, 200, 201, 404, 500];

impl TextGen {
    fn new(seed: u64) -> Self {
        TextGen {
            rng: Xoshiro256PlusPlus::seed_from_u64(seed),
            clock_ms: 1_795_000_000_000,
            pending: Vec::new(),
        }
    }

    fn line(&mut self) {
        use std::io::Write;
        let r = &mut self.rng;
        self.clock_ms += r.random_range(0..40);
        let (secs, ms) = (self.clock_ms / 1000, self.clock_ms % 1000);
        let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
        let _ = writeln!(
            self.pending,
            "2026-11-22T{h:02}:{m:02}:{s:02}.{ms:03}Z {} {}[{}]: {} {}{} status={} bytes={} dur_ms={} req={:016x}",
            LEVELS[r.random_range(0..LEVELS.len())],
            SERVICES[r.random_range(0..SERVICES.len())],
            2000 + r.random_range(0..64u32),
            METHODS[r.random_range(0..METHODS.len())],
            PATHS[r.random_range(0..PATHS.len())],
            r.random_range(0..100_000u32),
            STATUS[r.random_range(0..STATUS.len())],
            r.random_range(0..65536u32),
            r.random_range(0..500u32),
            r.random::<u64>(),
        );
    }

    fn fill(&mut self, out: &mut [u8]) {
        let mut filled = 0;
        while filled < out.len() {
            if self.pending.is_empty() {
                for _ in 0..64 {
                    self.line();
                }
            }
            let n = self.pending.len().min(out.len() - filled);
            out[filled..filled + n].copy_from_slice(&self.pending[..n]);
            self.pending.drain(..n);
            filled += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_disk_and_a_realistic_mix() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let comp = create_disk(&a, 64 << 20, 7).unwrap();
        create_disk(&b, 64 << 20, 7).unwrap();
        assert!(same_content(&a, &b).unwrap());
        let total = (comp.hole + comp.zeros + comp.random + comp.text) as f64;
        assert_eq!(total as u64, 64 << 20);
        assert!(comp.random as f64 / total > 0.2 && comp.text as f64 / total > 0.1, "{comp:?}");
        create_disk(&b, 64 << 20, 8).unwrap();
        assert!(!same_content(&a, &b).unwrap());
    }

    #[test]
    fn mutation_changes_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        create_disk(&a, 8 << 20, 1).unwrap();
        std::fs::copy(&a, &b).unwrap();
        assert_eq!(mutate_scattered(&b, 0.01, 2).unwrap(), 20);
        assert!(!same_content(&a, &b).unwrap());
    }
}
