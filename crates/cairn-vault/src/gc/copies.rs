//! Every copy of every chunk the collector knows, with a live bit each: 44 bytes and a bit a
//! copy, whatever the number of points.
//!
//! The copies come from the pack indexes, and from the own tables of unindexed packs that no
//! running backup claims. Marking a chunk live sets the bit of each of its copies, so the
//! live set costs nothing more than the table, and a point that needs a chunk no pack holds
//! marks nothing (verify reports it). Ids are whole: a copy "elsewhere" must be the same chunk,
//! or repacking would drop one that only looks copied.

use std::collections::HashMap;

use cairn_format::Digest;
use cairn_format::pack::PackEntry;

use crate::chunk_map::ChunkLocation;
use crate::place_table::{Keep, Place, PlaceTable};

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Copies {
    packs: Vec<Digest>,
    numbers: HashMap<Digest, u32>,
    table: PlaceTable,
    /// One bit per place, per shard; sized by `settle`.
    live: Vec<Vec<u64>>,
}

impl Copies {
    /// The number of `pack` in this table.
    pub(crate) fn number(&mut self, pack: Digest) -> u32 {
        *self.numbers.entry(pack).or_insert_with(|| {
            self.packs.push(pack);
            (self.packs.len() - 1) as u32
        })
    }

    /// The pack numbered `n`.
    pub(crate) fn pack(&self, n: u32) -> Digest {
        self.packs[n as usize]
    }

    /// True if `pack` holds copies here (or was pushed with none).
    pub(crate) fn has_pack(&self, pack: &Digest) -> bool {
        self.numbers.contains_key(pack)
    }

    /// How many packs are numbered.
    pub(crate) fn pack_count(&self) -> usize {
        self.packs.len()
    }

    /// Adds the chunks of `pack`.
    pub(crate) fn push(&mut self, pack: Digest, entries: &[PackEntry]) {
        let n = self.number(pack);
        for e in entries {
            self.table.push(Place { id: e.id, pack: n, offset: e.offset, len: e.len });
        }
    }

    /// Sorts the table; call once every copy is pushed and before marking or looking up.
    pub(crate) fn settle(&mut self) {
        self.table.settle(Keep::Distinct);
        self.live = self.table.shards().iter().map(|s| vec![0; s.len().div_ceil(64)]).collect();
    }

    /// Marks every copy of `id` live.
    pub(crate) fn mark_live(&mut self, id: &Digest) {
        let (shard, range) = self.table.span(id);
        let bits = &mut self.live[shard];
        for i in range {
            bits[i / 64] |= 1 << (i % 64);
        }
    }

    /// True if a point needs chunk `id`.
    #[cfg(test)]
    pub(crate) fn is_live(&self, id: &Digest) -> bool {
        let (shard, range) = self.table.span(id);
        range.start < range.end && self.bit(shard, range.start)
    }

    fn bit(&self, shard: usize, i: usize) -> bool {
        self.live[shard][i / 64] & (1 << (i % 64)) != 0
    }

    /// The first copy of `id` that `usable` accepts.
    pub(crate) fn locate(
        &self,
        id: &Digest,
        usable: impl Fn(&Place) -> bool,
    ) -> Option<ChunkLocation> {
        let p = self.table.places(id).iter().find(|p| usable(p))?;
        Some(ChunkLocation { pack: self.pack(p.pack), offset: p.offset, len: p.len })
    }

    /// Each chunk that some point needs, as the run of its copies (sorted by id).
    pub(crate) fn live_groups(&self) -> impl Iterator<Item = &[Place]> + '_ {
        self.table.shards().iter().enumerate().flat_map(move |(n, shard)| {
            shard
                .chunk_by(|a, b| a.id == b.id)
                .scan(0usize, move |at, group| {
                    let start = *at;
                    *at += group.len();
                    Some((start, group))
                })
                .filter(move |(start, _)| self.bit(n, *start))
                .map(|(_, group)| group)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u8, offset: u32) -> PackEntry {
        PackEntry { id: Digest([id; 32]), offset, len: 10 }
    }

    #[test]
    fn marking_a_chunk_marks_every_copy_and_nothing_else() {
        let mut c = Copies::default();
        let (a, b) = (Digest([1; 32]), Digest([2; 32]));
        c.push(a, &[entry(5, 0), entry(6, 10)]);
        c.push(b, &[entry(6, 0), entry(7, 10)]);
        c.settle();
        c.mark_live(&Digest([6; 32]));
        c.mark_live(&Digest([9; 32])); // in no pack: nothing to mark
        assert!(c.is_live(&Digest([6; 32])));
        assert!(!c.is_live(&Digest([5; 32])));
        assert!(!c.is_live(&Digest([9; 32])));
        let groups: Vec<Vec<Digest>> =
            c.live_groups().map(|g| g.iter().map(|p| c.pack(p.pack)).collect()).collect();
        assert_eq!(groups, vec![vec![a, b]]);
        let second = c.locate(&Digest([6; 32]), |p| c.pack(p.pack) == b).unwrap();
        assert_eq!((second.pack, second.offset), (b, 0));
    }
}
