//! How a scan runs: block size, threads, buffers, tracking, sub-block deltas.

use cairn_format::ChunkIds;
use cairn_format::patch::PieceKey;

use crate::Error;
use crate::tracking::Tracked;

/// How a scan runs.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Block size in bytes (a power of two, 4 KiB to 4 MiB).
    pub block_size: u32,
    /// Hashing threads.
    pub threads: usize,
    /// Bytes per read (a multiple of the block size).
    pub batch_bytes: usize,
    /// Read buffers in the pool; memory is about `buffers * batch_bytes` plus encoded output.
    pub buffers: usize,
    /// Changed-block tracking for this scan, if the source has it and the caller trusts it.
    pub tracking: Option<Tracked>,
    /// Sub-block deltas: a changed block is stored as a patch over its base for at most this
    /// many points in a row, then whole again (a rebase); 0 never patches.
    pub patch_generations: u8,
    /// The key of the vault's piece sums ([`PieceKey::UNKEYED`] for vaults made before keys).
    pub piece_key: PieceKey,
    /// How chunk ids are computed (SHA-256, or an encrypted vault's keyed HMAC).
    pub ids: ChunkIds,
}

/// Points in a row a block may be stored as a patch over one base before it is stored whole
/// again: bounds how long a base outlives the versions that replaced it.
pub const DEFAULT_PATCH_GENERATIONS: u8 = 16;

impl EngineConfig {
    /// Defaults for `block_size`: one worker per core, 2 MiB reads, two buffers per worker.
    pub fn new(block_size: u32) -> Self {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self::with_threads(block_size, threads)
    }

    /// Defaults for `block_size` with `threads` hashing threads (at least one).
    pub fn with_threads(block_size: u32, threads: usize) -> Self {
        let threads = threads.max(1);
        let batch_bytes = (block_size as usize).max(2 << 20);
        EngineConfig {
            block_size,
            threads,
            batch_bytes,
            buffers: threads * 2 + 2,
            tracking: None,
            patch_generations: DEFAULT_PATCH_GENERATIONS,
            piece_key: PieceKey::UNKEYED,
            ids: ChunkIds::Sha256,
        }
    }

    pub(crate) fn check(&self) -> Result<(), Error> {
        cairn_format::check_block_size(self.block_size)
            .map_err(|e| Error::Config(e.to_string()))?;
        if self.threads == 0 || self.buffers == 0 {
            return Err(Error::Config("threads and buffers must be at least 1".into()));
        }
        if self.batch_bytes == 0 || !self.batch_bytes.is_multiple_of(self.block_size as usize) {
            return Err(Error::Config(format!(
                "batch of {} bytes is not a multiple of the block size {}",
                self.batch_bytes, self.block_size
            )));
        }
        Ok(())
    }
}
