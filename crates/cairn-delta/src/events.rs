//! What a scan hands back: one event per block, in batches, and the totals.

use cairn_format::Digest;
use cairn_format::index::BlockEntry;

/// What the engine found for one block.
#[derive(Debug)]
pub enum BlockEvent<O> {
    /// Unallocated in the source; not read.
    Hole,
    /// Read, and all zeros.
    Zero,
    /// Same content as in the previous point: its entry stands.
    Unchanged(BlockEntry),
    /// New content, stored as chunk `chunk`: the whole block, or a patch over its base.
    Changed {
        /// The block's new entry ([`BlockEntry::Data`] or [`BlockEntry::Patch`]).
        entry: BlockEntry,
        /// The id of the chunk to store: the block's SHA-256, or the patch's.
        chunk: Digest,
        /// Block length (the last block of a disk may be short).
        len: u32,
        /// The encoder's output for the chunk.
        payload: O,
    },
}

impl<O> BlockEvent<O> {
    /// The index entry this block gets.
    pub fn entry(&self) -> BlockEntry {
        match self {
            BlockEvent::Hole => BlockEntry::Hole,
            BlockEvent::Zero => BlockEntry::Zero,
            BlockEvent::Unchanged(entry) | BlockEvent::Changed { entry, .. } => *entry,
        }
    }
}

/// Consecutive blocks' events, handed to the sink in disk order.
#[derive(Debug)]
pub struct Batch<O> {
    /// Index of the first block.
    pub first_block: u64,
    /// One event per block, for the batch's first blocks.
    pub events: Vec<BlockEvent<O>>,
    /// Blocks after `events` that are holes, counted rather than listed: a hole batch (a run
    /// of up to 1 GiB the source calls unallocated) has no events, only this count, so a
    /// sparse disk costs memory and time by its data, not by its size.
    pub trailing_holes: u64,
    /// Bytes of the batch's blocks that were read and hashed (holes excluded).
    pub bytes_scanned: u64,
    /// Blocks taken from the previous index unread, because tracking calls them clean.
    pub carried: u64,
    /// Clean blocks read anyway to check the tracking (all matched, or the scan failed).
    pub sampled: u64,
    /// Changed blocks stored whole because their base, read back, did not support the patch
    /// their piece sums chose (a piece-sum collision, or a damaged base).
    pub patches_refused: u64,
}

impl<O> Batch<O> {
    /// How many blocks the batch covers.
    pub fn block_count(&self) -> u64 {
        self.events.len() as u64 + self.trailing_holes
    }

    /// Each block's index entry, in order (the trailing holes included).
    pub fn entries(&self) -> impl Iterator<Item = BlockEntry> + '_ {
        let holes = std::iter::repeat_n(BlockEntry::Hole, self.trailing_holes as usize);
        self.events.iter().map(BlockEvent::entry).chain(holes)
    }
}

/// Totals of one scan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanSummary {
    /// Blocks in the disk.
    pub blocks: u64,
    /// Blocks skipped as holes.
    pub holes: u64,
    /// All-zero blocks.
    pub zeros: u64,
    /// Blocks equal to the previous point's.
    pub unchanged: u64,
    /// Blocks with new content.
    pub changed: u64,
    /// Bytes read from the source.
    pub bytes_scanned: u64,
    /// Bytes of changed blocks.
    pub bytes_changed: u64,
    /// Changed blocks stored as a patch over their base.
    pub patched: u64,
    /// Blocks taken from the previous index unread (changed-block tracking).
    pub carried: u64,
    /// Clean blocks read to check the tracking.
    pub sampled: u64,
    /// Changed blocks stored whole because their base did not support the patch their piece
    /// sums chose.
    pub patches_refused: u64,
}
