//! Holes: skipped without reading, and a batch that starts in one grown to the hole's end.

use crate::scan::Slot;
use crate::{BlockSource, Error, Extent};

/// Longest batch made of one hole. A hole batch is a count, not a list of blocks, so this
/// bounds only the number of work items: a 16 TiB sparse disk is about sixteen thousand.
const MAX_HOLE_BATCH: u64 = 1 << 30;
/// How far ahead each probe for data looks while a hole batch grows.
const HOLE_PROBE: u64 = 64 << 20;

/// How long a batch starting with the hole `[offset, offset + len)` can be while it stays one
/// hole: up to [`MAX_HOLE_BATCH`], ending on a block boundary or at the end of the disk.
pub(crate) fn hole_run<S: BlockSource + ?Sized>(
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
                // Clamped: a source that reports data past its own end cannot grow the run.
                end = end.max(data.offset / block * block).min(size);
                break;
            }
        }
    }
    Ok(end - offset)
}

/// The byte ranges of a batch's consecutive blocks that must be read.
pub(crate) fn read_runs(slots: &[Slot], offset: u64, block: u64, len: usize) -> Vec<Extent> {
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
pub(crate) fn mark_holes(slots: &mut [Slot], extents: &[Extent], offset: u64, block: u64) {
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
