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

use crate::{Bases, BlockEncoder, BlockEvent};

/// How changed blocks may become patches.
pub(crate) struct Patching<'a> {
    pub(crate) piece_size: u32,
    pub(crate) generations: u8,
    pub(crate) key: &'a PieceKey,
    /// Where a patch's base is read back from, to check the patch rebuilds its block.
    pub(crate) bases: &'a dyn Bases,
}

/// What a block read with content `data` is, against its previous entry `prev`. A patch that
/// the base read back does not support is counted in `refused` (the block is stored whole).
pub(crate) fn classify<E: BlockEncoder>(
    encoder: &E,
    patching: &Patching<'_>,
    data: &[u8],
    prev: Option<BlockEntry>,
    refused: &mut u64,
) -> BlockEvent<E::Output> {
    if is_zero(data) {
        return BlockEvent::Zero;
    }
    let digest = Digest::of(data);
    if let Some(prev) = prev.filter(|p| p.content() == Some(&digest)) {
        return BlockEvent::Unchanged(prev);
    }
    let sums = PieceSums::of(data, patching.piece_size, patching.key);
    match patch(encoder, patching, data, digest, &sums, prev) {
        Ok(event) => return event,
        Err(NotPatched::Refused) => *refused += 1,
        Err(NotPatched::Unfit) => {}
    }
    BlockEvent::Changed {
        entry: BlockEntry::Data { digest, sums },
        chunk: digest,
        len: data.len() as u32,
        payload: encoder.encode(&digest, data),
    }
}

/// Why a changed block is not a patch.
enum NotPatched {
    /// It cannot be one: no base, chain at its bound, too many pieces changed.
    Unfit,
    /// The sums chose a patch, and the base read back does not rebuild the block with it.
    Refused,
}

/// The changed block `data` as a patch over the base of its previous entry, when that entry
/// has piece sums, the chain is below its bound, at most a quarter of the pieces differ from
/// the base (a patch must be much smaller than the block to be worth a second read on
/// restore), and the base read back equals `data` in every piece the patch leaves out.
fn patch<E: BlockEncoder>(
    encoder: &E,
    patching: &Patching<'_>,
    data: &[u8],
    digest: Digest,
    sums: &PieceSums,
    prev: Option<BlockEntry>,
) -> Result<BlockEvent<E::Output>, NotPatched> {
    let (base, base_sums, generation) =
        prev.and_then(|p| p.patch_base()).ok_or(NotPatched::Unfit)?;
    if generation >= patching.generations {
        return Err(NotPatched::Unfit);
    }
    let mask = sums.differing(&base_sums).ok_or(NotPatched::Unfit)?;
    let changed = mask.count_ones() as usize;
    if changed == 0 || changed * 4 > sums.as_slice().len() {
        return Err(NotPatched::Unfit);
    }
    if !rebuilds(patching, &base, data, mask) {
        return Err(NotPatched::Refused);
    }
    let bytes = encode_patch(data, patching.piece_size, mask);
    let id = Digest::of(&bytes);
    Ok(BlockEvent::Changed {
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

/// Whether the patch of `data`'s pieces in `mask` over base chunk `base` rebuilds `data`: the
/// base, read back, must equal `data` byte for byte in every other piece (then the rebuilt
/// block is `data`, and has its SHA-256). Comparing bytes costs nothing beside reading the
/// base; hashing the rebuilt block again would cost a SHA-256 per patch.
fn rebuilds(patching: &Patching<'_>, base: &Digest, data: &[u8], mask: u32) -> bool {
    let Ok(base_bytes) = patching.bases.base(base) else { return false };
    if base_bytes.len() != data.len() {
        return false;
    }
    let piece = patching.piece_size.max(1) as usize;
    data.chunks(piece)
        .zip(base_bytes.chunks(piece))
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
