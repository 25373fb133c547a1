//! Changed-block tracking inside a scan: which blocks the tracker calls clean, and the random
//! sample of them that is read anyway to check it.

use std::sync::Arc;

use crate::Extent;

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
    pub(crate) fn sampled(&self, block: u64) -> bool {
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

/// Walks the sorted dirty ranges alongside the blocks, which come in increasing order.
#[derive(Default)]
pub(crate) struct DirtyCursor {
    next: usize,
}

impl DirtyCursor {
    pub(crate) fn overlaps(&mut self, dirty: &[Extent], start: u64, end: u64) -> bool {
        while dirty.get(self.next).is_some_and(|d| d.end() <= start) {
            self.next += 1;
        }
        dirty.get(self.next).is_some_and(|d| d.offset < end)
    }
}
