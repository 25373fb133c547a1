//! Chunk places held compactly: 44 bytes a place, in sorted arrays sharded by the chunk id's
//! first byte.
//!
//! The chunk map (one place per chunk) and the collector (every copy of every chunk) both hold
//! a place for each chunk of the vault: ten million chunks are 440 MB here. A hash map would
//! cost half as much again for its free slots, and twice as much while it grows; one sorted
//! array would need twice its size while it grows too. Sharding keeps every growth step to a
//! 256th of the table, and growth by a quarter keeps the slack small, so the peak stays near
//! 44 bytes a place. A lookup is a binary search in one shard.

use cairn_format::Digest;

/// Where one copy of a chunk is: `pack` numbers a pack in the owner's own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Place {
    pub(crate) id: Digest,
    pub(crate) pack: u32,
    pub(crate) offset: u32,
    pub(crate) len: u32,
}

const SHARDS: usize = 256;

/// Which places to keep when settling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Keep {
    /// The first place pushed for each chunk (the chunk map).
    First,
    /// Every distinct place (the collector: every copy, a place pushed twice counted once).
    Distinct,
}

/// Places sorted by chunk id; see the module docs.
#[derive(Debug)]
pub(crate) struct PlaceTable {
    shards: Vec<Vec<Place>>,
    /// Shards pushed to since the last `settle` (lookups must wait for it).
    unsettled: Vec<bool>,
}

impl Default for PlaceTable {
    fn default() -> Self {
        PlaceTable {
            shards: (0..SHARDS).map(|_| Vec::new()).collect(),
            unsettled: vec![false; SHARDS],
        }
    }
}

/// The shard of a chunk: a hash keyed per process, so that ids a guest ground to share their
/// first bytes (plain SHA-256 in an unencrypted vault) still spread over the shards.
fn shard_of(id: &Digest) -> usize {
    static KEY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let key = *KEY.get_or_init(|| rand::random::<u64>() | 1);
    let head = u64::from_le_bytes(id.0[..8].try_into().unwrap_or_default());
    (head.wrapping_mul(key) >> 56) as usize
}

/// Orders ids as `Digest`'s `Ord` does, eight bytes at a time: lookups compare ids millions
/// of times, and a call to `memcmp` for each was most of a collector's time.
fn cmp_ids(a: &Digest, b: &Digest) -> std::cmp::Ordering {
    let word =
        |d: &Digest, i: usize| u64::from_be_bytes(d.0[i..i + 8].try_into().unwrap_or_default());
    (0..32)
        .step_by(8)
        .map(|i| word(a, i).cmp(&word(b, i)))
        .find(|o| o.is_ne())
        .unwrap_or(std::cmp::Ordering::Equal)
}

impl PlaceTable {
    /// Adds a place; call `settle` before looking anything up.
    pub(crate) fn push(&mut self, place: Place) {
        let n = shard_of(&place.id);
        let shard = &mut self.shards[n];
        if shard.len() == shard.capacity() {
            // A quarter more, not double: the table is most of the memory of a large load.
            shard.reserve_exact((shard.len() / 4).max(64));
        }
        shard.push(place);
        self.unsettled[n] = true;
    }

    /// Sorts what was pushed by chunk id and keeps what `keep` says. With `Keep::First`, the
    /// order of pushes decides which place of a chunk stays.
    pub(crate) fn settle(&mut self, keep: Keep) {
        for (shard, unsettled) in self.shards.iter_mut().zip(&mut self.unsettled) {
            if !std::mem::take(unsettled) {
                continue;
            }
            match keep {
                Keep::First => {
                    // Stable: a shard already sorted plus places pushed after it are two runs,
                    // merged in one pass, and earlier places stay first.
                    shard.sort_by(|a, b| cmp_ids(&a.id, &b.id));
                    shard.dedup_by(|later, first| later.id == first.id);
                }
                Keep::Distinct => {
                    shard.sort_unstable_by(|a, b| {
                        cmp_ids(&a.id, &b.id)
                            .then(a.pack.cmp(&b.pack))
                            .then(a.offset.cmp(&b.offset))
                            .then(a.len.cmp(&b.len))
                    });
                    shard.dedup();
                }
            }
            if shard.capacity() - shard.len() > shard.len() / 4 + 64 {
                shard.shrink_to_fit();
            }
        }
    }

    /// The places of chunk `id`, in the order they were pushed.
    pub(crate) fn places(&self, id: &Digest) -> &[Place] {
        let (shard, range) = self.span(id);
        &self.shards[shard][range]
    }

    /// Where the places of chunk `id` are: a shard and a range in it.
    pub(crate) fn span(&self, id: &Digest) -> (usize, std::ops::Range<usize>) {
        let n = shard_of(id);
        debug_assert!(!self.unsettled[n], "a place table is looked up before it is settled");
        let shard = &self.shards[n];
        let start = shard.partition_point(|p| cmp_ids(&p.id, id).is_lt());
        let end = start + shard[start..].partition_point(|p| p.id == *id);
        (n, start..end)
    }

    /// The shards, each sorted by chunk id once settled (places of one chunk are together).
    pub(crate) fn shards(&self) -> &[Vec<Place>] {
        &self.shards
    }

    /// Renumbers packs: `f` maps a pack number to its new one.
    pub(crate) fn renumber(&mut self, f: impl Fn(u32) -> u32) {
        self.shards.iter_mut().flatten().for_each(|p| p.pack = f(p.pack));
    }

    /// Moves every place of `other` into this table (unsettled: call `settle`).
    pub(crate) fn append(&mut self, other: PlaceTable) {
        for ((mine, theirs), unsettled) in
            self.shards.iter_mut().zip(other.shards).zip(&mut self.unsettled)
        {
            if theirs.is_empty() {
                continue;
            }
            if mine.is_empty() {
                *mine = theirs;
            } else {
                mine.reserve_exact(theirs.len());
                mine.extend(theirs);
            }
            *unsettled = true;
        }
    }

    /// Places held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn place(id: u8, tail: u8, pack: u32) -> Place {
        let mut d = [0u8; 32];
        d[0] = id;
        d[31] = tail;
        Place { id: Digest(d), pack, offset: 0, len: 1 }
    }

    #[test]
    fn first_only_keeps_the_first_place_pushed() {
        let mut t = PlaceTable::default();
        t.push(place(7, 1, 3));
        t.push(place(7, 1, 1));
        t.push(place(7, 0, 2));
        t.settle(Keep::First);
        assert_eq!(t.places(&place(7, 1, 0).id), &[place(7, 1, 3)]);
        assert_eq!(t.len(), 2);
        // A later push of a known chunk does not displace it.
        t.push(place(7, 1, 9));
        t.settle(Keep::First);
        assert_eq!(t.places(&place(7, 1, 0).id)[0].pack, 3);
    }

    proptest! {
        #[test]
        fn places_finds_every_distinct_copy(
            pushes in proptest::collection::vec((0u8..4, 0u8..4, 0u32..100), 0..200)
        ) {
            let mut t = PlaceTable::default();
            for &(id, tail, pack) in &pushes {
                t.push(place(id, tail, pack));
            }
            t.settle(Keep::Distinct);
            let distinct: std::collections::BTreeSet<(u8, u8, u32)> =
                pushes.iter().copied().collect();
            prop_assert_eq!(t.len(), distinct.len());
            for &(id, tail, _) in &pushes {
                let want: Vec<Place> = distinct
                    .iter()
                    .filter(|(i, t, _)| (*i, *t) == (id, tail))
                    .map(|&(i, t, p)| place(i, t, p))
                    .collect();
                prop_assert_eq!(t.places(&place(id, tail, 0).id), &want[..]);
            }
        }

        #[test]
        fn ids_order_as_digests_do(a in any::<[u8; 32]>(), b in any::<[u8; 32]>(), same in 0usize..32) {
            let mut b = b;
            b[..same].copy_from_slice(&a[..same]);
            prop_assert_eq!(cmp_ids(&Digest(a), &Digest(b)), Digest(a).cmp(&Digest(b)));
        }
    }
}
