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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};

use cairn_format::Digest;
use cairn_format::index::BlockEntry;
use cairn_format::patch::piece_size;
use crossbeam_channel::{Receiver, Sender, bounded};

use crate::decide::{Look, Patching, agrees, decide, look};
use crate::holes::{hole_run, mark_holes, read_runs};
use crate::tracking::DirtyCursor;
use crate::{
    Bases, Batch, BlockEncoder, BlockEvent, BlockSource, EngineConfig, Error, PreviousIndex,
    ScanSummary,
};

/// What the workers do with one block.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Slot {
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
    /// A batch of holes only, counted (`slots` is then empty).
    holes: Option<HoleRun>,
}

/// Consecutive blocks that all come out as holes, and how many of them tracking carried or
/// sampled.
#[derive(Clone, Copy, Debug, Default)]
struct HoleRun {
    blocks: u64,
    carried: u64,
    sampled: u64,
}

/// The previous index with room to give one entry back.
struct Lookahead<P> {
    inner: P,
    back: Option<Option<BlockEntry>>,
}

impl<P: PreviousIndex> Lookahead<P> {
    fn next(&mut self) -> Result<Option<BlockEntry>, Error> {
        match self.back.take() {
            Some(entry) => Ok(entry),
            None => self.inner.next_entry().map_err(Error::Previous),
        }
    }

    fn put_back(&mut self, entry: Option<BlockEntry>) {
        self.back = Some(entry);
    }

    fn skip(&mut self, mut count: u64) -> Result<(), Error> {
        if count > 0 && self.back.take().is_some() {
            count -= 1;
        }
        self.inner.skip_entries(count).map_err(Error::Previous)
    }
}

type Outcome<O> = Result<(u64, Batch<O>), Error>;

/// Scans `source` against `previous`, calling `sink` with each batch in block order; a block
/// becomes a patch only when its base, read from `bases`, shows the patch rebuilds it.
/// Returns when the whole disk is scanned, or with the first error; when `sink` fails the scan
/// stops promptly and its error is returned.
pub fn scan<S, P, E, F>(
    source: &S,
    previous: P,
    bases: &dyn Bases,
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
            scope.spawn(move || {
                hash_batches(encoder, bases, config, disk, &work_rx, &result_tx, &pool_tx)
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
    previous: P,
    config: &EngineConfig,
    stop: &AtomicBool,
    pool: &Receiver<Vec<u8>>,
    work: &Sender<Work>,
) -> Result<(), Error> {
    let size = source.size();
    let block = u64::from(config.block_size);
    let mut previous = Lookahead { inner: previous, back: None };
    let mut dirty = DirtyCursor::default();
    let mut offset = 0u64;
    let mut seq = 0u64;
    while offset < size {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let len = (config.batch_bytes as u64).min(size - offset) as usize;
        let first_block = offset / block;
        let extents = source.allocated(offset, len as u64)?;
        if extents.is_empty() {
            let run = hole_run(source, offset, len as u64, block)?;
            let holes = count_holes(&mut previous, config, &mut dirty, offset, run, size)?;
            if holes.blocks > 0 {
                let item = Work {
                    seq,
                    first_block,
                    len: 0,
                    buf: None,
                    slots: Vec::new(),
                    holes: Some(holes),
                };
                if work.send(item).is_err() {
                    return Ok(());
                }
                seq += 1;
                offset = (offset + holes.blocks * block).min(size);
                continue;
            }
            // Tracking carries a block here that is not a hole: an ordinary batch.
        }
        let blocks = (len as u64).div_ceil(block) as usize;
        let mut slots = Vec::with_capacity(blocks);
        for i in 0..blocks as u64 {
            let prev = previous.next()?;
            let start = offset + i * block;
            let end = (start + block).min(size);
            slots.push(slot_for(config, &mut dirty, prev, first_block + i, start, end));
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
        let item = Work { seq, first_block, len, buf, slots, holes: None };
        if work.send(item).is_err() {
            return Ok(());
        }
        seq += 1;
        offset += len as u64;
    }
    Ok(())
}

/// What the workers will do with block number `block_no`, `[start, end)` on the disk.
fn slot_for(
    config: &EngineConfig,
    dirty: &mut DirtyCursor,
    prev: Option<BlockEntry>,
    block_no: u64,
    start: u64,
    end: u64,
) -> Slot {
    match (&config.tracking, prev) {
        (Some(t), Some(p)) if !dirty.overlaps(&t.dirty, start, end) => {
            if t.sampled(block_no) {
                Slot::Read { prev, hole: false, sample: true }
            } else {
                Slot::Carry(p)
            }
        }
        _ => Slot::Read { prev, hole: false, sample: false },
    }
}

/// How many blocks from `offset`, within a hole of `run` bytes, come out as holes: all of
/// them without tracking (their previous entries are skipped unread), else up to the first
/// that tracking carries as something else or whose sample disagrees (left to an ordinary
/// batch, which reports it).
fn count_holes<P: PreviousIndex>(
    previous: &mut Lookahead<P>,
    config: &EngineConfig,
    dirty: &mut DirtyCursor,
    offset: u64,
    run: u64,
    size: u64,
) -> Result<HoleRun, Error> {
    let block = u64::from(config.block_size);
    let blocks = run.div_ceil(block);
    if config.tracking.is_none() {
        previous.skip(blocks)?;
        return Ok(HoleRun { blocks, ..HoleRun::default() });
    }
    let mut holes = HoleRun::default();
    let first_block = offset / block;
    while holes.blocks < blocks {
        let prev = previous.next()?;
        let start = offset + holes.blocks * block;
        let end = (start + block).min(size);
        let hole = match slot_for(config, dirty, prev, first_block + holes.blocks, start, end) {
            Slot::Carry(BlockEntry::Hole) => {
                holes.carried += 1;
                true
            }
            Slot::Carry(_) => false,
            Slot::Read { sample: false, .. } => true,
            Slot::Read { sample: true, prev, .. } => {
                let agrees = agrees::<()>(&BlockEvent::Hole, prev);
                holes.sampled += u64::from(agrees);
                agrees
            }
        };
        if !hole {
            previous.put_back(prev);
            break;
        }
        holes.blocks += 1;
    }
    Ok(holes)
}

fn hash_batches<E: BlockEncoder>(
    encoder: &E,
    bases: &dyn Bases,
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
        key: &config.piece_key,
        ids: &config.ids,
    };
    for item in work {
        let outcome = hash_batch(encoder, bases, &patching, block, disk, &item);
        if let Some(buf) = item.buf {
            let _ = pool.send(buf);
        }
        if results.send(outcome).is_err() {
            return;
        }
    }
}

/// One batch: every block looked at, the bases its patches need read back at once, then
/// every block decided, in order.
fn hash_batch<E: BlockEncoder>(
    encoder: &E,
    bases: &dyn Bases,
    patching: &Patching<'_>,
    block: usize,
    disk: &str,
    item: &Work,
) -> Outcome<E::Output> {
    let mut batch = Batch {
        first_block: item.first_block,
        events: Vec::with_capacity(item.slots.len()),
        trailing_holes: 0,
        bytes_scanned: 0,
        carried: 0,
        sampled: 0,
        patches_refused: 0,
    };
    if let Some(holes) = item.holes {
        batch.trailing_holes = holes.blocks;
        batch.carried = holes.carried;
        batch.sampled = holes.sampled;
        return Ok((item.seq, batch));
    }
    // First pass: what each block is, short of the patch checks.
    let mut looks = Vec::with_capacity(item.slots.len());
    for (i, slot) in item.slots.iter().enumerate() {
        let Slot::Read { prev, hole: false, .. } = *slot else {
            looks.push(None);
            continue;
        };
        let start = i * block;
        let data = item.buf.as_deref().and_then(|b| b.get(start..(start + block).min(item.len)));
        looks.push(data.map(|data| {
            // Bytes hashed: every block that is not a hole, whole (holes inside it read as
            // zeros).
            batch.bytes_scanned += data.len() as u64;
            let looked = look(patching, data, prev);
            if let Look::Changed { patch: Some(c), .. } = &looked {
                // Fetched while the rest of the batch is hashed.
                bases.expect(&c.base);
            }
            (data, looked)
        }));
    }
    // The bases of the batch's patches, read back together.
    let mut wanted: Vec<Digest> = looks
        .iter()
        .filter_map(|l| match l {
            Some((_, Look::Changed { patch: Some(c), .. })) => Some(c.base),
            _ => None,
        })
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    let fetched: HashMap<Digest, Vec<u8>> = match wanted.is_empty() {
        true => HashMap::new(),
        false => wanted
            .iter()
            .copied()
            .zip(bases.bases(&wanted))
            .filter_map(|(id, r)| Some((id, r.ok()?)))
            .collect(),
    };
    // Second pass: events, in order.
    let mut mismatch = None;
    for (i, (slot, looked)) in item.slots.iter().zip(looks).enumerate() {
        let (prev, sample) = match *slot {
            Slot::Carry(entry) => {
                batch.carried += 1;
                batch.events.push(match entry {
                    BlockEntry::Hole => BlockEvent::Hole,
                    BlockEntry::Zero => BlockEvent::Zero,
                    stored => BlockEvent::Unchanged(stored),
                });
                continue;
            }
            Slot::Read { prev, sample, .. } => (prev, sample),
        };
        let event = match looked {
            None => BlockEvent::Hole,
            Some((_, Look::Zero)) => BlockEvent::Zero,
            Some((_, Look::Unchanged(entry))) => BlockEvent::Unchanged(entry),
            Some((data, Look::Changed { digest, sums, patch })) => {
                let base = patch.as_ref().and_then(|c| fetched.get(&c.base)).map(Vec::as_slice);
                let refused = &mut batch.patches_refused;
                decide(encoder, patching, data, (digest, sums, patch), base, refused)
            }
        };
        if sample {
            batch.sampled += 1;
            if !agrees(&event, prev) {
                mismatch.get_or_insert(item.first_block + i as u64);
            }
        }
        batch.events.push(event);
    }
    match mismatch {
        Some(block) => Err(Error::TrackingMismatch { disk: disk.to_owned(), block }),
        None => Ok((item.seq, batch)),
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
    s.patches_refused += batch.patches_refused;
    s.blocks += batch.trailing_holes;
    s.holes += batch.trailing_holes;
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
