//! The scan pipeline: one reader, N hashing workers, one ordering stage.
//!
//! ```text
//!  reader thread ──work──▶ worker threads ──results──▶ caller's thread (reorders, calls sink)
//!       ▲                        │
//!       └──── buffer pool ◀──────┘
//! ```
//! The reader takes a buffer from a fixed pool, fills it with the allocated parts of one batch
//! of blocks, attaches the previous index's entries for those blocks, and queues it. Workers
//! classify each block (hole, zero, unchanged, changed), hash it, encode changed blocks and give
//! the buffer back. The pool size is the memory bound and the backpressure: when the sink (the
//! uploads) is slow, results back up, workers stall, the pool empties and the reader waits.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use cairn_format::Digest;
use cairn_format::index::{BlockEntry, PatchRef};
use cairn_format::patch::{PieceSums, encode_patch, piece_size};
use crossbeam_channel::{Receiver, Sender, bounded};

use crate::{BlockSource, Error, Extent};

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
}

/// Points in a row a block may be stored as a patch over one base before it is stored whole
/// again: bounds how long a base outlives the versions that replaced it.
pub const DEFAULT_PATCH_GENERATIONS: u8 = 16;

/// Changed-block tracking for one scan: which ranges were written since the previous point.
#[derive(Clone, Debug)]
pub struct Tracked {
    /// Ranges written since the previous point, sorted and not overlapping.
    pub dirty: Arc<[Extent]>,
    /// One clean block in this many is read and checked anyway; 0 checks none.
    pub sample_one_in: u64,
    /// Chooses the sample; a different seed per backup checks different blocks each time.
    pub seed: u64,
}

impl Tracked {
    /// Whether clean block `block` is in this scan's sample.
    fn sampled(&self, block: u64) -> bool {
        self.sample_one_in != 0 && splitmix64(self.seed ^ block).is_multiple_of(self.sample_one_in)
    }
}

/// A well-mixed 64-bit hash (SplitMix64's finaliser): cheap, and plenty for sampling.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

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
        }
    }

    fn check(&self) -> Result<(), Error> {
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

/// The previous point's index for this disk, read block by block in order.
pub trait PreviousIndex: Send {
    /// The entry for the next block, or `None` when there is none (no previous point).
    fn next_entry(
        &mut self,
    ) -> Result<Option<BlockEntry>, Box<dyn std::error::Error + Send + Sync>>;
}

impl<P: PreviousIndex + ?Sized> PreviousIndex for Box<P> {
    fn next_entry(
        &mut self,
    ) -> Result<Option<BlockEntry>, Box<dyn std::error::Error + Send + Sync>> {
        (**self).next_entry()
    }
}

/// A previous index held in memory, one entry per block (tests, benchmarks, embedders).
impl PreviousIndex for std::vec::IntoIter<BlockEntry> {
    fn next_entry(
        &mut self,
    ) -> Result<Option<BlockEntry>, Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.next())
    }
}

/// No previous point: every allocated non-zero block is changed.
#[derive(Debug, Default)]
pub struct NoPrevious;

impl PreviousIndex for NoPrevious {
    fn next_entry(
        &mut self,
    ) -> Result<Option<BlockEntry>, Box<dyn std::error::Error + Send + Sync>> {
        Ok(None)
    }
}

/// Turns a changed block into what the caller will store; runs on the worker threads.
pub trait BlockEncoder: Sync {
    /// What a changed block becomes.
    type Output: Send;
    /// Encodes the bytes to store under chunk id `id` (their SHA-256): a changed block, or the
    /// patch that rebuilds it.
    fn encode(&self, id: &Digest, bytes: &[u8]) -> Self::Output;
}

/// Hash only: changed blocks carry no payload (benchmarks, dry runs).
impl BlockEncoder for () {
    type Output = ();
    fn encode(&self, _: &Digest, _: &[u8]) {}
}

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
    /// One event per block.
    pub events: Vec<BlockEvent<O>>,
    /// Bytes of the batch's blocks that were read and hashed (holes excluded).
    pub bytes_scanned: u64,
    /// Blocks taken from the previous index unread, because tracking calls them clean.
    pub carried: u64,
    /// Clean blocks read anyway to check the tracking (all matched, or the scan failed).
    pub sampled: u64,
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
}

/// What the workers do with one block.
#[derive(Clone, Copy, Debug)]
enum Slot {
    /// Tracking calls it clean: its previous entry stands, unread.
    Carry(BlockEntry),
    /// Read (unless `hole`) and hash it, and compare it with `prev`; a `sample` must match.
    Read { prev: Option<BlockEntry>, hole: bool, sample: bool },
}

struct Work {
    seq: u64,
    first_block: u64,
    len: usize,
    /// `None` when no block of the batch was read.
    buf: Option<Vec<u8>>,
    slots: Vec<Slot>,
}

type Outcome<O> = Result<(u64, Batch<O>), Error>;

/// Scans `source` against `previous`, calling `sink` with each batch in block order. Returns
/// when the whole disk is scanned, or with the first error; when `sink` fails the scan stops
/// promptly and its error is returned.
pub fn scan<S, P, E, F>(
    source: &S,
    previous: P,
    encoder: &E,
    config: &EngineConfig,
    mut sink: F,
) -> Result<ScanSummary, Error>
where
    S: BlockSource + ?Sized,
    P: PreviousIndex,
    E: BlockEncoder,
    F: FnMut(Batch<E::Output>) -> Result<(), Error>,
{
    config.check()?;
    let stop = AtomicBool::new(false);
    let (pool_tx, pool_rx) = bounded::<Vec<u8>>(config.buffers);
    for _ in 0..config.buffers {
        // Cannot fail: the channel has room for every buffer.
        let _ = pool_tx.send(Vec::new());
    }
    let (work_tx, work_rx) = bounded::<Work>(config.threads);
    let (result_tx, result_rx) = bounded::<Outcome<E::Output>>(config.threads * 2);

    let disk = source.describe();
    std::thread::scope(|scope| {
        let reader_results = result_tx.clone();
        let stop_ref = &stop;
        scope.spawn(move || {
            if let Err(e) = read_batches(source, previous, config, stop_ref, &pool_rx, &work_tx) {
                let _ = reader_results.send(Err(e));
            }
        });
        for _ in 0..config.threads {
            let (work_rx, result_tx, pool_tx) =
                (work_rx.clone(), result_tx.clone(), pool_tx.clone());
            let disk = &disk;
            scope
                .spawn(move || hash_batches(encoder, config, disk, &work_rx, &result_tx, &pool_tx));
        }
        drop((work_rx, result_tx, pool_tx));
        let outcome = order_results(result_rx, &mut sink);
        stop.store(true, Ordering::Relaxed);
        outcome
    })
}

fn read_batches<S: BlockSource + ?Sized, P: PreviousIndex>(
    source: &S,
    mut previous: P,
    config: &EngineConfig,
    stop: &AtomicBool,
    pool: &Receiver<Vec<u8>>,
    work: &Sender<Work>,
) -> Result<(), Error> {
    let size = source.size();
    let block = u64::from(config.block_size);
    let mut dirty = DirtyCursor::default();
    let mut offset = 0u64;
    let mut seq = 0u64;
    while offset < size {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut len = (config.batch_bytes as u64).min(size - offset) as usize;
        let extents = source.allocated(offset, len as u64)?;
        if extents.is_empty() {
            len = hole_run(source, offset, len as u64, block)? as usize;
        }
        let blocks = (len as u64).div_ceil(block) as usize;
        let first_block = offset / block;
        let mut slots = Vec::with_capacity(blocks);
        for i in 0..blocks as u64 {
            let prev = previous.next_entry().map_err(Error::Previous)?;
            let start = offset + i * block;
            let end = (start + block).min(size);
            slots.push(match (&config.tracking, prev) {
                (Some(t), Some(p)) if !dirty.overlaps(&t.dirty, start, end) => {
                    if t.sampled(first_block + i) {
                        Slot::Read { prev, hole: false, sample: true }
                    } else {
                        Slot::Carry(p)
                    }
                }
                _ => Slot::Read { prev, hole: false, sample: false },
            });
        }
        let runs = read_runs(&slots, offset, block, len);
        mark_holes(&mut slots, &extents, offset, block);
        let buf = if runs.is_empty() || extents.is_empty() {
            None
        } else {
            let Ok(mut buf) = pool.recv() else { return Ok(()) };
            buf.resize(len, 0);
            // Holes inside a block read as zeros; a batch that is all data is overwritten whole.
            if extents.iter().map(|e| e.len).sum::<u64>() < len as u64 {
                buf.fill(0);
            }
            for e in &extents {
                if e.offset < offset || e.end() > offset + len as u64 {
                    return Err(Error::Config(format!(
                        "source {} reported an extent outside the range",
                        source.describe()
                    )));
                }
                for run in &runs {
                    let (from, to) = (e.offset.max(run.offset), e.end().min(run.end()));
                    if from < to {
                        let start = (from - offset) as usize;
                        source.read_at(from, &mut buf[start..start + (to - from) as usize])?;
                    }
                }
            }
            Some(buf)
        };
        let item = Work { seq, first_block, len, buf, slots };
        if work.send(item).is_err() {
            return Ok(());
        }
        seq += 1;
        offset += len as u64;
    }
    Ok(())
}

/// Longest batch made of one hole: a 1 TiB disk with 1 GiB of data costs about a thousand
/// work items for its holes instead of half a million.
const MAX_HOLE_BATCH: u64 = 1 << 30;
/// How far ahead each probe for data looks while a hole batch grows.
const HOLE_PROBE: u64 = 64 << 20;

/// How long a batch starting with the hole `[offset, offset + len)` can be while it stays one
/// hole: up to [`MAX_HOLE_BATCH`], ending on a block boundary or at the end of the disk.
fn hole_run<S: BlockSource + ?Sized>(
    source: &S,
    offset: u64,
    len: u64,
    block: u64,
) -> Result<u64, Error> {
    let size = source.size();
    let mut end = offset + len;
    while end < size && end - offset < MAX_HOLE_BATCH {
        let window = HOLE_PROBE.min(size - end).min(MAX_HOLE_BATCH - (end - offset));
        match source.allocated(end, window)?.first() {
            None => end += window,
            Some(data) => {
                end = end.max(data.offset / block * block);
                break;
            }
        }
    }
    Ok(end - offset)
}

/// The byte ranges of a batch's consecutive blocks that must be read.
fn read_runs(slots: &[Slot], offset: u64, block: u64, len: usize) -> Vec<Extent> {
    let mut runs: Vec<Extent> = Vec::new();
    let batch_end = offset + len as u64;
    for (i, slot) in slots.iter().enumerate() {
        if let Slot::Read { .. } = slot {
            let start = offset + i as u64 * block;
            let end = (start + block).min(batch_end);
            match runs.last_mut() {
                Some(r) if r.end() == start => r.len += end - start,
                _ => runs.push(Extent { offset: start, len: end - start }),
            }
        }
    }
    runs
}

/// Marks the blocks to read that no allocated extent touches as holes.
fn mark_holes(slots: &mut [Slot], extents: &[Extent], offset: u64, block: u64) {
    let mut allocated = vec![false; slots.len()];
    for e in extents {
        let first = (e.offset.saturating_sub(offset) / block) as usize;
        let last = (e.end().saturating_sub(offset)).div_ceil(block) as usize;
        for a in allocated.iter_mut().take(last).skip(first) {
            *a = true;
        }
    }
    for (slot, allocated) in slots.iter_mut().zip(allocated) {
        if let Slot::Read { hole, .. } = slot {
            *hole = !allocated;
        }
    }
}

/// Walks the sorted dirty ranges alongside the blocks, which come in increasing order.
#[derive(Default)]
struct DirtyCursor {
    next: usize,
}

impl DirtyCursor {
    fn overlaps(&mut self, dirty: &[Extent], start: u64, end: u64) -> bool {
        while dirty.get(self.next).is_some_and(|d| d.end() <= start) {
            self.next += 1;
        }
        dirty.get(self.next).is_some_and(|d| d.offset < end)
    }
}

fn hash_batches<E: BlockEncoder>(
    encoder: &E,
    config: &EngineConfig,
    disk: &str,
    work: &Receiver<Work>,
    results: &Sender<Outcome<E::Output>>,
    pool: &Sender<Vec<u8>>,
) {
    let block = config.block_size as usize;
    let patching = Patching {
        piece_size: piece_size(config.block_size),
        generations: config.patch_generations,
    };
    for item in work {
        let mut batch = Batch {
            first_block: item.first_block,
            events: Vec::with_capacity(item.slots.len()),
            bytes_scanned: 0,
            carried: 0,
            sampled: 0,
        };
        let mut mismatch = None;
        for (i, slot) in item.slots.iter().enumerate() {
            let (prev, hole, sample) = match *slot {
                Slot::Carry(entry) => {
                    batch.carried += 1;
                    batch.events.push(match entry {
                        BlockEntry::Hole => BlockEvent::Hole,
                        BlockEntry::Zero => BlockEvent::Zero,
                        stored => BlockEvent::Unchanged(stored),
                    });
                    continue;
                }
                Slot::Read { prev, hole, sample } => (prev, hole, sample),
            };
            let start = i * block;
            let data =
                item.buf.as_deref().and_then(|b| b.get(start..(start + block).min(item.len)));
            let event = match data {
                Some(data) if !hole => {
                    // Bytes hashed: every block that is not a hole, whole (holes inside it
                    // read as zeros).
                    batch.bytes_scanned += data.len() as u64;
                    classify(encoder, &patching, data, prev)
                }
                _ => BlockEvent::Hole,
            };
            if sample {
                batch.sampled += 1;
                if !agrees(&event, prev) {
                    mismatch.get_or_insert(item.first_block + i as u64);
                }
            }
            batch.events.push(event);
        }
        if let Some(buf) = item.buf {
            let _ = pool.send(buf);
        }
        let outcome = match mismatch {
            Some(block) => Err(Error::TrackingMismatch { disk: disk.to_owned(), block }),
            None => Ok((item.seq, batch)),
        };
        if results.send(outcome).is_err() {
            return;
        }
    }
}

fn order_results<O, F>(results: Receiver<Outcome<O>>, sink: &mut F) -> Result<ScanSummary, Error>
where
    F: FnMut(Batch<O>) -> Result<(), Error>,
{
    let mut summary = ScanSummary::default();
    let mut waiting = BTreeMap::new();
    let mut next = 0u64;
    for outcome in &results {
        let (seq, batch) = outcome?;
        waiting.insert(seq, batch);
        while let Some(batch) = waiting.remove(&next) {
            tally(&mut summary, &batch);
            sink(batch)?;
            next += 1;
        }
    }
    Ok(summary)
}

fn tally<O>(s: &mut ScanSummary, batch: &Batch<O>) {
    s.bytes_scanned += batch.bytes_scanned;
    s.carried += batch.carried;
    s.sampled += batch.sampled;
    for event in &batch.events {
        s.blocks += 1;
        match event {
            BlockEvent::Hole => s.holes += 1,
            BlockEvent::Zero => s.zeros += 1,
            BlockEvent::Unchanged(_) => s.unchanged += 1,
            BlockEvent::Changed { entry, len, payload: _, chunk: _ } => {
                s.changed += 1;
                s.bytes_changed += u64::from(*len);
                if let BlockEntry::Patch(_) = entry {
                    s.patched += 1;
                }
            }
        }
    }
}

/// How changed blocks may become patches.
struct Patching {
    piece_size: u32,
    generations: u8,
}

/// What a block read with content `data` is, against its previous entry `prev`.
fn classify<E: BlockEncoder>(
    encoder: &E,
    patching: &Patching,
    data: &[u8],
    prev: Option<BlockEntry>,
) -> BlockEvent<E::Output> {
    if is_zero(data) {
        return BlockEvent::Zero;
    }
    let digest = Digest::of(data);
    if let Some(prev) = prev.filter(|p| p.content() == Some(&digest)) {
        return BlockEvent::Unchanged(prev);
    }
    let sums = PieceSums::of(data, patching.piece_size);
    if let Some(patched) = patch(encoder, patching, data, digest, &sums, prev) {
        return patched;
    }
    BlockEvent::Changed {
        entry: BlockEntry::Data { digest, sums },
        chunk: digest,
        len: data.len() as u32,
        payload: encoder.encode(&digest, data),
    }
}

/// The changed block `data` as a patch over the base of its previous entry, when that entry
/// has piece sums, the chain is below its bound, and at most a quarter of the pieces differ
/// from the base (a patch must be much smaller than the block to be worth a second read on
/// restore). Otherwise `None`: the block is stored whole and becomes the next base.
fn patch<E: BlockEncoder>(
    encoder: &E,
    patching: &Patching,
    data: &[u8],
    digest: Digest,
    sums: &PieceSums,
    prev: Option<BlockEntry>,
) -> Option<BlockEvent<E::Output>> {
    let (base, base_sums, generation) = prev?.patch_base()?;
    if generation >= patching.generations {
        return None;
    }
    let mask = sums.differing(&base_sums)?;
    let changed = mask.count_ones() as usize;
    if changed == 0 || changed * 4 > sums.as_slice().len() {
        return None;
    }
    let bytes = encode_patch(data, patching.piece_size, mask);
    let id = Digest::of(&bytes);
    Some(BlockEvent::Changed {
        entry: BlockEntry::Patch(PatchRef {
            digest,
            base,
            patch: id,
            generation: generation + 1,
            base_sums,
        }),
        chunk: id,
        len: data.len() as u32,
        payload: encoder.encode(&id, &bytes),
    })
}

/// Whether a sampled block's content is what its previous entry says (holes and zeros both
/// read as zeros).
fn agrees<O>(event: &BlockEvent<O>, prev: Option<BlockEntry>) -> bool {
    matches!(
        (event, prev),
        (BlockEvent::Hole | BlockEvent::Zero, Some(BlockEntry::Hole | BlockEntry::Zero))
            | (BlockEvent::Unchanged(_), _)
    )
}

/// Whether `data` is all zeros; stops at the first non-zero 4 KiB piece.
fn is_zero(data: &[u8]) -> bool {
    data.chunks(4096).all(|piece| {
        let (words, rest) = piece.as_chunks::<8>();
        words.iter().fold(0u64, |acc, w| acc | u64::from_ne_bytes(*w)) == 0
            && rest.iter().all(|b| *b == 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemSource;
    use proptest::prelude::*;

    struct Copy;
    impl BlockEncoder for Copy {
        type Output = Vec<u8>;
        fn encode(&self, _: &Digest, block: &[u8]) -> Vec<u8> {
            block.to_vec()
        }
    }

    fn config(threads: usize) -> EngineConfig {
        EngineConfig {
            block_size: 4096,
            threads,
            batch_bytes: 16384,
            buffers: 3,
            tracking: None,
            patch_generations: DEFAULT_PATCH_GENERATIONS,
        }
    }

    fn run(
        src: &MemSource,
        prev: Vec<BlockEntry>,
        threads: usize,
    ) -> (ScanSummary, Vec<BlockEvent<Vec<u8>>>) {
        let mut events = Vec::new();
        let mut expected_first = 0;
        let summary = scan(src, prev.into_iter(), &Copy, &config(threads), |b| {
            assert_eq!(b.first_block, expected_first);
            expected_first += b.events.len() as u64;
            events.extend(b.events);
            Ok(())
        })
        .unwrap();
        (summary, events)
    }

    #[test]
    fn classifies_blocks() {
        let mut data = vec![0u8; 4096 * 10 + 100];
        data[4096..8192].fill(1); // block 1: data
        data[4096 * 3 + 5] = 9; // block 3: data
        data[4096 * 10..].fill(2); // block 10: short tail
        let src = MemSource::new("m", data).with_hole(4096 * 5, 4096 * 3);
        let (s, events) = run(&src, vec![], 2);
        let kinds: String = events
            .iter()
            .map(|e| match e {
                BlockEvent::Hole => 'h',
                BlockEvent::Zero => '0',
                BlockEvent::Unchanged(_) => 'u',
                BlockEvent::Changed { .. } => 'c',
            })
            .collect();
        assert_eq!(kinds, "0c0c0hhh00c");
        assert_eq!(s.changed, 3);
        assert_eq!(s.bytes_changed, 4096 * 2 + 100);
        assert_eq!(s.bytes_scanned, 4096 * 7 + 100);
    }

    #[test]
    fn only_changed_blocks_come_with_payload() {
        let data: Vec<u8> = (0..4096 * 8).map(|i| (i / 4096 + 1) as u8).collect();
        let mut src = MemSource::new("m", data);
        let (_, first) = run(&src, vec![], 1);
        let prev: Vec<BlockEntry> = first.iter().map(|e| e.entry()).collect();
        src.data_mut()[4096 * 6] = 0xff;
        let (s, second) = run(&src, prev, 3);
        assert_eq!((s.unchanged, s.changed), (7, 1));
        assert!(matches!(&second[6], BlockEvent::Changed { payload, .. } if payload[0] == 0xff));
    }

    #[test]
    fn a_failing_sink_stops_the_scan() {
        let src = MemSource::new("m", vec![1u8; 4096 * 64]);
        let mut calls = 0;
        let err = scan(&src, NoPrevious, &(), &config(2), |_| {
            calls += 1;
            Err(Error::Stopped)
        })
        .unwrap_err();
        assert!(matches!(err, Error::Stopped));
        assert_eq!(calls, 1);
    }

    #[test]
    fn bad_config_is_refused() {
        let src = MemSource::new("m", vec![1u8; 4096]);
        let mut c = config(1);
        c.batch_bytes = 5000;
        assert!(scan(&src, NoPrevious, &(), &c, |_| Ok(())).is_err());
    }

    /// Counts the bytes read, to show what tracking spares.
    struct Counting {
        inner: MemSource,
        read: std::sync::atomic::AtomicU64,
    }
    impl BlockSource for Counting {
        fn describe(&self) -> String {
            self.inner.describe()
        }
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
            self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
            self.inner.read_at(offset, buf)
        }
    }

    fn tracked(dirty: Vec<Extent>, sample_one_in: u64) -> EngineConfig {
        EngineConfig {
            tracking: Some(Tracked { dirty: dirty.into(), sample_one_in, seed: 7 }),
            ..config(2)
        }
    }

    fn scan_all(
        src: &dyn BlockSource,
        prev: Vec<BlockEntry>,
        config: &EngineConfig,
    ) -> Result<(ScanSummary, Vec<BlockEntry>), Error> {
        let mut entries = Vec::new();
        let summary = scan(src, prev.into_iter(), &(), config, |b| {
            entries.extend(b.events.iter().map(|e| e.entry()));
            Ok(())
        })?;
        Ok((summary, entries))
    }

    #[test]
    fn tracking_reads_only_dirty_blocks() {
        let data: Vec<u8> = (0..4096 * 64).map(|i| (i / 4096 + 1) as u8).collect();
        let old = MemSource::new("m", data).with_hole(4096 * 40, 4096 * 8);
        let (_, prev) = scan_all(&old, vec![], &config(2)).unwrap();
        let mut new = old.clone();
        new.data_mut()[4096 * 10 + 7] = 0xee;
        new.data_mut()[4096 * 33..4096 * 35].fill(0x42);
        let (plain, want) = scan_all(&new, prev.clone(), &config(2)).unwrap();
        let counting = Counting { inner: new, read: 0.into() };
        let dirty =
            vec![Extent { offset: 4096 * 10, len: 4096 }, Extent { offset: 4096 * 33, len: 8192 }];
        let (s, got) = scan_all(&counting, prev, &tracked(dirty, 0)).unwrap();
        assert_eq!(got, want);
        assert_eq!((s.changed, plain.changed), (3, 3));
        assert_eq!(s.carried, 61);
        assert_eq!(counting.read.load(Ordering::Relaxed), 3 * 4096);
    }

    #[test]
    fn a_sampled_clean_block_that_changed_stops_the_scan() {
        let data: Vec<u8> = (0..4096 * 16).map(|i| (i / 4096 + 1) as u8).collect();
        let old = MemSource::new("m", data);
        let (_, prev) = scan_all(&old, vec![], &config(1)).unwrap();
        let mut new = old.clone();
        new.data_mut()[4096 * 5] = 0;
        // The tracker says nothing changed; sampling every clean block catches the lie.
        let err = scan_all(&new, prev.clone(), &tracked(vec![], 1)).unwrap_err();
        assert!(matches!(err, Error::TrackingMismatch { block: 5, .. }), "{err}");
        // Without sampling the lie would pass: which is why every tracked scan samples.
        let (s, _) = scan_all(&new, prev.clone(), &tracked(vec![], 0)).unwrap();
        assert_eq!((s.changed, s.carried), (0, 16));
        // Samples of blocks that did not change pass, and are counted.
        let (s, _) = scan_all(&old, prev, &tracked(vec![], 1)).unwrap();
        assert_eq!((s.sampled, s.carried, s.bytes_scanned), (16, 0, 16 * 4096));
    }

    /// 64 GiB of holes around two MiB of data, without the bytes behind it.
    struct Sparse;
    impl BlockSource for Sparse {
        fn describe(&self) -> String {
            "sparse".into()
        }
        fn size(&self) -> u64 {
            64 << 30
        }
        fn read_at(&self, _: u64, buf: &mut [u8]) -> Result<(), Error> {
            buf.fill(7);
            Ok(())
        }
        fn allocated(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Error> {
            let data = [
                Extent { offset: 5 << 30, len: 1 << 20 },
                Extent { offset: 40 << 30, len: 1 << 20 },
            ];
            let end = offset + len;
            Ok(data
                .iter()
                .filter(|d| d.offset < end && d.end() > offset)
                .map(|d| {
                    let from = d.offset.max(offset);
                    Extent { offset: from, len: d.end().min(end) - from }
                })
                .collect())
        }
    }

    #[test]
    fn long_holes_are_few_batches() {
        let mut batches = 0;
        let mut entries = Vec::new();
        let config = EngineConfig::with_threads(65536, 2);
        let s = scan(&Sparse, NoPrevious, &(), &config, |b| {
            batches += 1;
            entries.extend(b.events.iter().map(|e| e.entry()));
            Ok(())
        })
        .unwrap();
        assert_eq!(s.blocks, 1 << 20);
        assert_eq!((s.changed, s.bytes_scanned), (32, 2 << 20));
        assert_eq!(s.holes, (1 << 20) - 32);
        // 64 one-GiB hole batches and the two data batches, give or take the edges.
        assert!(batches < 80, "{batches} batches");
        let data_block = |e: &BlockEntry| matches!(e, BlockEntry::Data { .. });
        assert!(entries[(5 << 30) / 65536..][..16].iter().all(data_block));
        assert!(entries[(40 << 30) / 65536..][..16].iter().all(data_block));
        assert!(!data_block(&entries[(5 << 30) / 65536 + 16]));
    }

    /// Engine settings for patch tests: 16 KiB blocks of four 4 KiB pieces.
    fn patch_config(generations: u8) -> EngineConfig {
        EngineConfig {
            block_size: 16384,
            batch_bytes: 65536,
            patch_generations: generations,
            ..config(2)
        }
    }

    /// Scans `disk` against `prev`, keeping every chunk stored in `store`; returns the entries.
    fn backup_into(
        store: &mut std::collections::HashMap<Digest, Vec<u8>>,
        disk: &[u8],
        prev: Vec<BlockEntry>,
        config: &EngineConfig,
    ) -> (ScanSummary, Vec<BlockEntry>) {
        let mut entries = Vec::new();
        let summary =
            scan(&MemSource::new("d", disk.to_vec()), prev.into_iter(), &Copy, config, |b| {
                for e in b.events {
                    entries.push(e.entry());
                    if let BlockEvent::Changed { chunk, payload, .. } = e {
                        assert_eq!(Digest::of(&payload), chunk);
                        store.insert(chunk, payload);
                    }
                }
                Ok(())
            })
            .unwrap();
        (summary, entries)
    }

    /// The disk as restore would rebuild it from `entries` and the chunks in `store`.
    fn rebuild(
        store: &std::collections::HashMap<Digest, Vec<u8>>,
        entries: &[BlockEntry],
        block: usize,
        size: usize,
    ) -> Vec<u8> {
        let mut out = vec![0u8; size];
        for (i, e) in entries.iter().enumerate() {
            let range = i * block..((i + 1) * block).min(size);
            let bytes = match e {
                BlockEntry::Hole | BlockEntry::Zero => continue,
                BlockEntry::Data { digest, .. } => store[digest].clone(),
                BlockEntry::Patch(p) => cairn_format::patch::Patch::decode(&store[&p.patch])
                    .unwrap()
                    .apply(&store[&p.base])
                    .unwrap(),
            };
            assert_eq!(Digest::of(&bytes), *e.content().unwrap(), "block {i}");
            out[range].copy_from_slice(&bytes);
        }
        out
    }

    #[test]
    fn scattered_writes_become_patches() {
        let mut store = std::collections::HashMap::new();
        let mut disk: Vec<u8> = (0..16384 * 8).map(|i| (i % 251) as u8 | 1).collect();
        let config = patch_config(DEFAULT_PATCH_GENERATIONS);
        let (_, prev) = backup_into(&mut store, &disk, vec![], &config);
        disk[16384 * 2 + 5] ^= 0xff; // one piece of block 2
        disk[16384 * 5..16384 * 5 + 8192].fill(9); // two pieces of block 5: stored whole
        let (s, entries) = backup_into(&mut store, &disk, prev, &config);
        assert_eq!((s.changed, s.patched), (2, 1));
        let BlockEntry::Patch(p) = entries[2] else { panic!("{:?}", entries[2]) };
        assert_eq!(p.generation, 1);
        assert_eq!(cairn_format::patch::Patch::decode(&store[&p.patch]).unwrap().mask(), 1);
        assert!(matches!(entries[5], BlockEntry::Data { .. }));
        assert_eq!(rebuild(&store, &entries, 16384, disk.len()), disk);
    }

    #[test]
    fn a_patch_chain_at_its_bound_is_rebased() {
        let mut store = std::collections::HashMap::new();
        let mut disk = vec![3u8; 16384 * 2];
        let config = patch_config(3);
        let (_, mut prev) = backup_into(&mut store, &disk, vec![], &config);
        let first_base = *prev[0].content().unwrap();
        let mut generations = Vec::new();
        for round in 0..5u8 {
            disk[100] = round + 10; // always the same piece of block 0
            let (_, entries) = backup_into(&mut store, &disk, prev, &config);
            assert_eq!(rebuild(&store, &entries, 16384, disk.len()), disk);
            generations.push(match entries[0] {
                BlockEntry::Patch(p) => {
                    assert_eq!(p.base == first_base, round < 3, "round {round}");
                    p.generation
                }
                _ => 0,
            });
            prev = entries;
        }
        // Three patches over the first base, then whole again, then patches over the new base.
        assert_eq!(generations, [1, 2, 3, 0, 1]);
        assert_ne!(prev[0].patch_base().unwrap().0, first_base);
    }

    #[test]
    fn patches_can_be_turned_off() {
        let mut store = std::collections::HashMap::new();
        let mut disk = vec![3u8; 16384];
        let (_, prev) = backup_into(&mut store, &disk, vec![], &patch_config(0));
        disk[0] = 1;
        let (s, entries) = backup_into(&mut store, &disk, prev, &patch_config(0));
        assert_eq!((s.changed, s.patched), (1, 0));
        assert!(matches!(entries[0], BlockEntry::Data { .. }));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Diff then apply: patching the old disk with the changed blocks gives the new disk.
        #[test]
        fn diff_then_apply_reproduces_the_disk(
            seed in proptest::collection::vec(0u8..4, 1..40),
            edits in proptest::collection::vec((0usize..40 * 4096, any::<u8>()), 0..20),
            threads in 1usize..4,
        ) {
            let old: Vec<u8> = seed.iter().flat_map(|b| vec![*b; 4096]).collect();
            let mut new = old.clone();
            for (pos, byte) in &edits {
                if let Some(b) = new.get_mut(*pos) { *b = *byte; }
            }
            let (_, first) = run(&MemSource::new("old", old.clone()), vec![], threads);
            let prev: Vec<BlockEntry> = first.iter().map(|e| e.entry()).collect();
            let (_, events) = run(&MemSource::new("new", new.clone()), prev, threads);
            let mut applied = old.clone();
            for (i, e) in events.iter().enumerate() {
                let range = i * 4096..((i + 1) * 4096).min(applied.len());
                match e {
                    BlockEvent::Changed { payload, .. } => applied[range].copy_from_slice(payload),
                    BlockEvent::Zero | BlockEvent::Hole => applied[range].fill(0),
                    BlockEvent::Unchanged(_) => {}
                }
            }
            prop_assert_eq!(applied, new);
        }

        /// Backups of a disk edited between each: rebuilding any point from its entries and the
        /// stored chunks (whole blocks and patches) gives that point's disk.
        #[test]
        fn patched_points_rebuild_their_disk(
            seed in proptest::collection::vec(0u8..4, 1..12),
            rounds in proptest::collection::vec(
                proptest::collection::vec((0usize..12 * 16384, any::<u8>()), 0..6), 1..5),
            generations in 0u8..4,
        ) {
            let mut disk: Vec<u8> = seed.iter().flat_map(|b| vec![*b; 16384]).collect();
            let config = patch_config(generations);
            let mut store = std::collections::HashMap::new();
            let (_, mut prev) = backup_into(&mut store, &disk, vec![], &config);
            for edits in rounds {
                for (pos, byte) in edits {
                    if let Some(b) = disk.get_mut(pos) { *b = byte; }
                }
                let (_, entries) = backup_into(&mut store, &disk, prev, &config);
                prop_assert_eq!(rebuild(&store, &entries, 16384, disk.len()), disk.clone());
                prev = entries;
            }
        }

        /// With dirty ranges that cover every write, a tracked scan finds what a full one does.
        #[test]
        fn tracked_scan_equals_full_scan(
            seed in proptest::collection::vec(0u8..4, 1..40),
            edits in proptest::collection::vec((0usize..40 * 4096, 1u8..), 0..20),
            extra in proptest::collection::vec(0u64..40, 0..5),
            sample in 0u64..4,
        ) {
            let old: Vec<u8> = seed.iter().flat_map(|b| vec![*b; 4096]).collect();
            let mut new = old.clone();
            let mut dirty: Vec<Extent> = Vec::new();
            for (pos, byte) in &edits {
                if let Some(b) = new.get_mut(*pos) {
                    *b = *byte;
                    dirty.push(Extent { offset: *pos as u64, len: 1 });
                }
            }
            // Trackers round up: whole granules may be marked dirty without a change.
            dirty.extend(extra.iter().map(|b| Extent { offset: b * 4096, len: 4096 }));
            dirty.sort_by_key(|e| e.offset);
            let mut merged: Vec<Extent> = Vec::new();
            for d in dirty {
                match merged.last_mut() {
                    Some(m) if d.offset <= m.end() => m.len = m.len.max(d.end() - m.offset),
                    _ => merged.push(d),
                }
            }
            let (_, prev) = scan_all(&MemSource::new("old", old), vec![], &config(2)).unwrap();
            let new = MemSource::new("new", new);
            let (_, want) = scan_all(&new, prev.clone(), &config(2)).unwrap();
            let (_, got) = scan_all(&new, prev, &tracked(merged, sample)).unwrap();
            prop_assert_eq!(got, want);
        }
    }
}
