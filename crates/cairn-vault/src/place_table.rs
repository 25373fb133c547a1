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

/// Places sorted by chunk id; see the module docs.
#[derive(Debug)]
pub(crate) struct PlaceTable {
    shards: Vec<Vec<Place>>,
    /// Places pushed since the last `settle` (lookups must wait for it).
    unsettled: bool,
}

impl Default for PlaceTable {
    fn default() -> Self {
        PlaceTable { shards: (0..SHARDS).map(|_| Vec::new()).collect(), unsettled: false }
    }
}

fn shard_of(id: &Digest) -> usize {
    usize::from(id.0[0])
}

impl PlaceTable {
    /// Adds a place; call `settle` before looking anything up.
    pub(crate) fn push(&mut self, place: Place) {
        let shard = &mut self.shards[shard_of(&place.id)];
        if shard.len() == shard.capacity() {
            // A quarter more, not double: the table is most of the memory of a large load.
            shard.reserve_exact((shard.len() / 4).max(64));
        }
        shard.push(place);
        self.unsettled = true;
    }

    /// Sorts what was pushed by chunk id, keeping the order of pushes among places of one
    /// chunk; with `first_only`, keeps only the first place pushed for each chunk.
    pub(crate) fn settle(&mut self, first_only: bool) {
        if !self.unsettled {
            return;
        }
        for shard in &mut self.shards {
            // Stable: a shard already sorted plus places pushed after it are two runs, merged
            // in one pass, and earlier places stay first.
            shard.sort_by_key(|p| p.id);
            if first_only {
                shard.dedup_by(|later, first| later.id == first.id);
            }
            if shard.capacity() - shard.len() > shard.len() / 4 + 64 {
                shard.shrink_to_fit();
            }
        }
        self.unsettled = false;
    }

    /// The places of chunk `id`, in the order they were pushed.
    pub(crate) fn places(&self, id: &Digest) -> &[Place] {
        let (shard, range) = self.span(id);
        &self.shards[shard][range]
    }

    /// Where the places of chunk `id` are: a shard and a range in it.
    pub(crate) fn span(&self, id: &Digest) -> (usize, std::ops::Range<usize>) {
        debug_assert!(!self.unsettled, "a place table is looked up before it is settled");
        let n = shard_of(id);
        let shard = &self.shards[n];
        let start = shard.partition_point(|p| p.id < *id);
        let end = start + shard[start..].partition_point(|p| p.id == *id);
        (n, start..end)
    }

    /// The shards, each sorted by chunk id once settled.
    pub(crate) fn shards(&self) -> &[Vec<Place>] {
        &self.shards
    }

    /// Renumbers packs: `f` maps a pack number to its new one.
    pub(crate) fn renumber(&mut self, f: impl Fn(u32) -> u32) {
        self.shards.iter_mut().flatten().for_each(|p| p.pack = f(p.pack));
    }

    /// Moves every place of `other` into this table (unsettled: call `settle`).
    pub(crate) fn append(&mut self, other: PlaceTable) {
        for (mine, theirs) in self.shards.iter_mut().zip(other.shards) {
            if mine.is_empty() {
                *mine = theirs;
            } else {
                mine.extend(theirs);
            }
        }
        self.unsettled = true;
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
        t.settle(true);
        assert_eq!(t.places(&place(7, 1, 0).id), &[place(7, 1, 3)]);
        assert_eq!(t.len(), 2);
        // A later push of a known chunk does not displace it.
        t.push(place(7, 1, 9));
        t.settle(true);
        assert_eq!(t.places(&place(7, 1, 0).id)[0].pack, 3);
    }

    proptest! {
        #[test]
        fn places_finds_every_copy_in_push_order(
            pushes in proptest::collection::vec((0u8..4, 0u8..4, 0u32..100), 0..200)
        ) {
            let mut t = PlaceTable::default();
            for &(id, tail, pack) in &pushes {
                t.push(place(id, tail, pack));
            }
            t.settle(false);
            prop_assert_eq!(t.len(), pushes.len());
            for &(id, tail, _) in &pushes {
                let want: Vec<Place> = pushes
                    .iter()
                    .filter(|(i, t, _)| (*i, *t) == (id, tail))
                    .map(|&(i, t, p)| place(i, t, p))
                    .collect();
                prop_assert_eq!(t.places(&place(id, tail, 0).id), &want[..]);
            }
        }
    }
}
