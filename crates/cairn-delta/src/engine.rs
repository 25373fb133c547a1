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
use std::sync::atomic::{AtomicBool, Ordering};

use cairn_format::Digest;
use cairn_format::index::BlockEntry;
use crossbeam_channel::{Receiver, Sender, bounded};

use crate::{BlockSource, Error};

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
        EngineConfig { block_size, threads, batch_bytes, buffers: threads * 2 + 2 }
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
    /// Encodes one changed block whose SHA-256 is `digest`.
    fn encode(&self, digest: &Digest, block: &[u8]) -> Self::Output;
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
    /// Same content as in the previous point.
    Unchanged(Digest),
    /// New content.
    Changed {
        /// SHA-256 of the block.
        digest: Digest,
        /// Block length (the last block of a disk may be short).
        len: u32,
        /// The encoder's output.
        payload: O,
    },
}

impl<O> BlockEvent<O> {
    /// The index entry this block gets.
    pub fn entry(&self) -> BlockEntry {
        match self {
            BlockEvent::Hole => BlockEntry::Hole,
            BlockEvent::Zero => BlockEntry::Zero,
            BlockEvent::Unchanged(d) | BlockEvent::Changed { digest: d, .. } => {
                BlockEntry::Data(*d)
            }
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
}

struct Work {
    seq: u64,
    first_block: u64,
    len: usize,
    /// `None` when the whole batch is a hole.
    buf: Option<Vec<u8>>,
    holes: Vec<bool>,
    prev: Vec<Option<BlockEntry>>,
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
            scope.spawn(move || {
                hash_batches(encoder, config.block_size, &work_rx, &result_tx, &pool_tx)
            });
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
    let mut offset = 0u64;
    let mut seq = 0u64;
    while offset < size {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let len = (config.batch_bytes as u64).min(size - offset) as usize;
        let blocks = (len as u64).div_ceil(block) as usize;
        let extents = source.allocated(offset, len as u64)?;
        let mut holes = vec![true; blocks];
        for e in &extents {
            let first = (e.offset - offset) / block;
            let last = (e.end() - offset).div_ceil(block);
            for h in holes.iter_mut().take(last as usize).skip(first as usize) {
                *h = false;
            }
        }
        let buf = if extents.is_empty() {
            None
        } else {
            let Ok(mut buf) = pool.recv() else { return Ok(()) };
            buf.resize(len, 0);
            let covered: u64 = extents.iter().map(|e| e.len).sum();
            if covered < len as u64 {
                buf.fill(0);
            }
            for e in &extents {
                let start = (e.offset - offset) as usize;
                let dst = buf.get_mut(start..start + e.len as usize).ok_or_else(|| {
                    Error::Config(format!(
                        "source {} reported an extent outside the range",
                        source.describe()
                    ))
                })?;
                source.read_at(e.offset, dst)?;
            }
            Some(buf)
        };
        let mut prev = Vec::with_capacity(blocks);
        for _ in 0..blocks {
            prev.push(previous.next_entry().map_err(Error::Previous)?);
        }
        let first_block = offset / block;
        let item = Work { seq, first_block, len, buf, holes, prev };
        if work.send(item).is_err() {
            return Ok(());
        }
        seq += 1;
        offset += len as u64;
    }
    Ok(())
}

fn hash_batches<E: BlockEncoder>(
    encoder: &E,
    block_size: u32,
    work: &Receiver<Work>,
    results: &Sender<Outcome<E::Output>>,
    pool: &Sender<Vec<u8>>,
) {
    let block = block_size as usize;
    for item in work {
        let mut events = Vec::with_capacity(item.holes.len());
        // Bytes hashed: every block that is not a hole, whole (holes inside it read as zeros).
        let mut bytes_scanned = 0;
        for (i, hole) in item.holes.iter().enumerate() {
            let start = i * block;
            let data =
                item.buf.as_deref().and_then(|b| b.get(start..(start + block).min(item.len)));
            let event = match data {
                Some(data) if !hole => {
                    bytes_scanned += data.len() as u64;
                    if is_zero(data) {
                        BlockEvent::Zero
                    } else {
                        let digest = Digest::of(data);
                        match item.prev.get(i) {
                            Some(Some(BlockEntry::Data(d))) if *d == digest => {
                                BlockEvent::Unchanged(digest)
                            }
                            _ => BlockEvent::Changed {
                                digest,
                                len: data.len() as u32,
                                payload: encoder.encode(&digest, data),
                            },
                        }
                    }
                }
                _ => BlockEvent::Hole,
            };
            events.push(event);
        }
        if let Some(buf) = item.buf {
            let _ = pool.send(buf);
        }
        let batch = Batch { first_block: item.first_block, events, bytes_scanned };
        if results.send(Ok((item.seq, batch))).is_err() {
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
    for event in &batch.events {
        s.blocks += 1;
        match event {
            BlockEvent::Hole => s.holes += 1,
            BlockEvent::Zero => s.zeros += 1,
            BlockEvent::Unchanged(_) => s.unchanged += 1,
            BlockEvent::Changed { len, .. } => {
                s.changed += 1;
                s.bytes_changed += u64::from(*len);
            }
        }
    }
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
        EngineConfig { block_size: 4096, threads, batch_bytes: 16384, buffers: 3 }
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
    }
}
