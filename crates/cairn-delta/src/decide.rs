//! What a block becomes: a hole, zeros, unchanged, a patch over its base, or stored whole.
//!
//! The rules, in order, for a block that was read:
//! 1. all zeros: a zero block (never stored);
//! 2. its SHA-256 equals its previous entry's: unchanged;
//! 3. its previous entry can be a base (it has piece sums, its patch chain is below its bound),
//!    at most a quarter of its pieces have sums that differ from the base's, and the base,
//!    read back, equals the block in every other piece: a patch of the differing pieces;
//! 4. otherwise: stored whole, and the next base of this block.
//!
//! Rule 3's last check is what makes a patch safe: piece sums only choose the pieces. A block
//! whose sums match its base where its bytes do not (a collision a guest crafted, or a base
//! damaged in the vault) is stored whole and counted, never stored as a patch that would fail
//! its SHA-256 on the day of the restore.

use cairn_format::Digest;
use cairn_format::index::{BlockEntry, PatchRef};
use cairn_format::patch::{PieceKey, PieceSums, encode_patch};

use crate::{BlockEncoder, BlockEvent};

/// How changed blocks may become patches.
pub(crate) struct Patching<'a> {
    pub(crate) piece_size: u32,
    pub(crate) generations: u8,
    pub(crate) key: &'a PieceKey,
    pub(crate) ids: &'a cairn_format::ChunkIds,
}

/// What a block is before its base, if it needs one, is read back (rules 1, 2 and the sums
/// part of rule 3). A worker looks at every block of a batch first, then reads all the bases
/// the batch needs at once, then [`decide`]s: the reads of a batch overlap instead of
/// waiting one after another.
pub(crate) enum Look {
    /// All zeros.
    Zero,
    /// Same content as the previous entry.
    Unchanged(BlockEntry),
    /// New content; `patch` when its sums choose a patch, pending the base's check.
    Changed {
        /// The block's SHA-256.
        digest: Digest,
        /// Its piece sums.
        sums: PieceSums,
        /// The patch the sums choose, if any.
        patch: Option<Candidate>,
    },
}

/// A patch the piece sums choose: the pieces in `mask`, over `base`.
pub(crate) struct Candidate {
    pub(crate) base: Digest,
    base_sums: PieceSums,
    generation: u8,
    mask: u32,
}

/// Looks at a block read with content `data`, against its previous entry `prev`.
pub(crate) fn look(patching: &Patching<'_>, data: &[u8], prev: Option<BlockEntry>) -> Look {
    if is_zero(data) {
        return Look::Zero;
    }
    let digest = patching.ids.of(data);
    if let Some(prev) = prev.filter(|p| p.content() == Some(&digest)) {
        return Look::Unchanged(prev);
    }
    let sums = PieceSums::of(data, patching.piece_size, patching.key);
    let patch = candidate(patching, &sums, prev);
    Look::Changed { digest, sums, patch }
}

/// The patch a changed block's sums choose over the base of its previous entry: when that
/// entry has piece sums, the chain is below its bound, and at most a quarter of the pieces
/// differ from the base (a patch must be much smaller than the block to be worth a second
/// read on restore).
fn candidate(
    patching: &Patching<'_>,
    sums: &PieceSums,
    prev: Option<BlockEntry>,
) -> Option<Candidate> {
    let (base, base_sums, generation) = prev?.patch_base()?;
    if generation >= patching.generations {
        return None;
    }
    let mask = sums.differing(&base_sums)?;
    let changed = mask.count_ones() as usize;
    if changed == 0 || changed * 4 > sums.as_slice().len() {
        return None;
    }
    Some(Candidate { base, base_sums, generation, mask })
}

/// What a changed block becomes, given its base's bytes as read back (`None`: unreadable):
/// the candidate patch if the base supports it, otherwise the block stored whole (a refused
/// candidate is counted in `refused`).
pub(crate) fn decide<E: BlockEncoder>(
    encoder: &E,
    patching: &Patching<'_>,
    data: &[u8],
    (digest, sums, patch): (Digest, PieceSums, Option<Candidate>),
    base: Option<&[u8]>,
    refused: &mut u64,
) -> BlockEvent<E::Output> {
    if let Some(c) = patch {
        if base.is_some_and(|base| rebuilds(patching, base, data, c.mask)) {
            let bytes = encode_patch(data, patching.piece_size, c.mask);
            let id = patching.ids.of(&bytes);
            return BlockEvent::Changed {
                entry: BlockEntry::Patch(PatchRef {
                    digest,
                    base: c.base,
                    patch: id,
                    generation: c.generation + 1,
                    base_sums: c.base_sums,
                }),
                chunk: id,
                len: data.len() as u32,
                payload: encoder.encode(&id, &bytes),
            };
        }
        *refused += 1;
    }
    BlockEvent::Changed {
        entry: BlockEntry::Data { digest, sums },
        chunk: digest,
        len: data.len() as u32,
        payload: encoder.encode(&digest, data),
    }
}

/// Whether the patch of `data`'s pieces in `mask` over `base` rebuilds `data`: the base must
/// equal `data` byte for byte in every other piece (then the rebuilt block is `data`, and has
/// its SHA-256). Comparing bytes costs nothing beside reading the base; hashing the rebuilt
/// block again would cost a SHA-256 per patch.
fn rebuilds(patching: &Patching<'_>, base: &[u8], data: &[u8], mask: u32) -> bool {
    if base.len() != data.len() {
        return false;
    }
    let piece = patching.piece_size.max(1) as usize;
    data.chunks(piece)
        .zip(base.chunks(piece))
        .enumerate()
        .all(|(i, (new, old))| mask & (1 << i) != 0 || new == old)
}

/// Whether a sampled block's content is what its previous entry says (holes and zeros both
/// read as zeros).
pub(crate) fn agrees<O>(event: &BlockEvent<O>, prev: Option<BlockEntry>) -> bool {
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
