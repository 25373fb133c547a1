//! Sub-block deltas: piece sums and patch chunks.
//!
//! A block is cut into at most [`MAX_PIECES`] *pieces* ([`piece_size`]: 4 KiB for the default
//! 64 KiB block). The index keeps a 64-bit XXH3 sum, keyed per vault ([`PieceKey`]), of every
//! piece of a stored block
//! ([`PieceSums`]), so the next backup learns which pieces of a changed block differ from a
//! stored version without reading anything but the new block. When few pieces differ, the block
//! is stored as a *patch*: a chunk holding only those pieces, applied over the *base* (a whole
//! block already in the vault). The index entry keeps the block's full SHA-256, so a rebuilt
//! block is checked against its real content; a piece-sum collision can make a patch wrong, never
//! silently right.
//!
//! Patch plaintext (stored as an ordinary chunk, named by the SHA-256 of these bytes):
//! ```text
//!  0  4  magic "CPAT"
//!  4  1  version (1)
//!  5  3  reserved, 0
//!  8  4  block length, u32 LE (1 .. 64 MiB)
//! 12  4  piece size, u32 LE (a power of two, 4 KiB to 4 MiB)
//! 16  4  piece mask, u32 LE: bit i set = piece i follows; at least one bit, none at or above
//!        the block's piece count (at most 16)
//! 20  …  the pieces whose bit is set, in order; piece i is bytes
//!        [i * piece size, min((i + 1) * piece size, block length)) of the block
//! ```

use crate::codec::Reader;
use crate::{Error, MAX_BLOCK_SIZE, MAX_CHUNK_LEN};

/// Most pieces a block is cut into (the mask and the sums have room for this many).
pub const MAX_PIECES: usize = 16;
/// Smallest piece: the page size of the guests we back up, and of their scattered writes.
pub const MIN_PIECE: u32 = 4096;

const MAGIC: &[u8; 4] = b"CPAT";
const VERSION: u8 = 1;
const WHAT: &str = "patch chunk";
const HEADER_LEN: usize = 20;

/// The piece size for blocks of `block_size` bytes: `block_size / 16`, at least 4 KiB.
pub fn piece_size(block_size: u32) -> u32 {
    (block_size / MAX_PIECES as u32).max(MIN_PIECE)
}

/// The secret that keys a vault's piece sums.
///
/// A guest writes its disks' bytes; if it could predict piece sums it could write a block whose
/// changed pieces keep their old sums, and the patch made from those sums would not rebuild
/// the block. So a vault created by this version keeps a random 32-byte key in its
/// configuration (which no guest reads), expanded with SHA-256 into the 192-byte secret of
/// keyed XXH3. Vaults created before keep unkeyed sums ([`PieceKey::UNKEYED`]). Either way a
/// patch is only stored after its rebuilt block was compared with the block itself.
#[derive(Clone, PartialEq, Eq)]
pub struct PieceKey {
    secret: Option<[u8; SECRET_LEN]>,
}

/// Bytes of a keyed XXH3 secret (XXH3's default secret size).
const SECRET_LEN: usize = 192;

impl PieceKey {
    /// Plain XXH3-64, as vaults of configuration format 2 sum their pieces.
    pub const UNKEYED: PieceKey = PieceKey { secret: None };

    /// The key a vault's configuration holds, expanded into a keyed XXH3 secret:
    /// `SHA-256(key || i)` for i = 0..6, concatenated.
    pub fn from_key(key: &[u8; 32]) -> PieceKey {
        use sha2::Digest as _;
        let mut secret = [0u8; SECRET_LEN];
        for (i, part) in secret.chunks_mut(32).enumerate() {
            let mut h = sha2::Sha256::new();
            h.update(key);
            h.update([i as u8]);
            part.copy_from_slice(&h.finalize());
        }
        PieceKey { secret: Some(secret) }
    }

    /// Whether the sums are keyed.
    pub fn is_keyed(&self) -> bool {
        self.secret.is_some()
    }

    /// The sum of one piece.
    fn sum(&self, piece: &[u8]) -> u64 {
        match &self.secret {
            None => twox_hash::XxHash3_64::oneshot(piece),
            // The secret is SECRET_LEN bytes, over XXH3's minimum: this cannot fail.
            Some(secret) => twox_hash::XxHash3_64::oneshot_with_secret(secret, piece)
                .unwrap_or_else(|_| twox_hash::XxHash3_64::oneshot(piece)),
        }
    }
}

impl std::fmt::Debug for PieceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_keyed() { "PieceKey(keyed)" } else { "PieceKey(unkeyed)" })
    }
}

/// The 64-bit XXH3 sum (keyed with the vault's [`PieceKey`]) of each piece of one block; empty
/// when the block has fewer than two pieces (a patch could not be smaller than the block) or
/// the sums were not recorded.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PieceSums {
    count: u8,
    sums: [u64; MAX_PIECES],
}

impl PieceSums {
    /// No sums.
    pub const NONE: PieceSums = PieceSums { count: 0, sums: [0; MAX_PIECES] };

    /// The sums of `block`'s pieces of `piece_size` bytes (the last may be short), keyed with
    /// `key`.
    pub fn of(block: &[u8], piece_size: u32, key: &PieceKey) -> PieceSums {
        let pieces = block.chunks(piece_size.max(1) as usize);
        if pieces.len() < 2 || pieces.len() > MAX_PIECES {
            return PieceSums::NONE;
        }
        let mut out = PieceSums::NONE;
        for (slot, piece) in out.sums.iter_mut().zip(pieces) {
            *slot = key.sum(piece);
            out.count += 1;
        }
        out
    }

    /// Sums from their values; `None` unless there are 2 to [`MAX_PIECES`] of them.
    pub fn from_slice(sums: &[u64]) -> Option<PieceSums> {
        if !(2..=MAX_PIECES).contains(&sums.len()) {
            return None;
        }
        let mut out = PieceSums { count: sums.len() as u8, sums: [0; MAX_PIECES] };
        out.sums.iter_mut().zip(sums).for_each(|(to, from)| *to = *from);
        Some(out)
    }

    /// The sums, one per piece.
    pub fn as_slice(&self) -> &[u64] {
        self.sums.get(..usize::from(self.count)).unwrap_or_default()
    }

    /// Whether there are no sums.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Which pieces differ between two blocks' sums, as a mask (bit i = piece i); `None` when
    /// they cannot be compared (either is empty, or their piece counts differ).
    pub fn differing(&self, other: &PieceSums) -> Option<u32> {
        if self.is_empty() || self.count != other.count {
            return None;
        }
        let mask = self
            .as_slice()
            .iter()
            .zip(other.as_slice())
            .enumerate()
            .fold(0u32, |mask, (i, (a, b))| if a == b { mask } else { mask | 1 << i });
        Some(mask)
    }
}

impl std::fmt::Debug for PieceSums {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PieceSums({} pieces)", self.count)
    }
}

/// The pieces of `block` named by `mask`, as patch plaintext. `mask` must name at least one
/// piece of the block, each at most once (bits beyond the block's pieces are ignored).
pub fn encode_patch(block: &[u8], piece_size: u32, mask: u32) -> Vec<u8> {
    let pieces_len = (mask.count_ones() as usize).saturating_mul(piece_size as usize);
    let mut out = Vec::with_capacity(HEADER_LEN + pieces_len.min(block.len()));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[VERSION, 0, 0, 0]);
    out.extend_from_slice(&(block.len() as u32).to_le_bytes());
    out.extend_from_slice(&piece_size.to_le_bytes());
    let pieces = block.chunks(piece_size.max(1) as usize).take(MAX_PIECES);
    let mask = mask & ((1u32 << pieces.len()) - 1);
    out.extend_from_slice(&mask.to_le_bytes());
    for (i, piece) in pieces.enumerate() {
        if mask & (1 << i) != 0 {
            out.extend_from_slice(piece);
        }
    }
    out
}

/// A decoded, checked patch.
#[derive(Debug, PartialEq, Eq)]
pub struct Patch<'a> {
    block_len: u32,
    piece_size: u32,
    mask: u32,
    data: &'a [u8],
}

impl<'a> Patch<'a> {
    /// Decodes and checks patch plaintext.
    pub fn decode(bytes: &'a [u8]) -> Result<Patch<'a>, Error> {
        let mut r = Reader::new(bytes, WHAT);
        r.header(MAGIC, VERSION)?;
        let block_len = r.u32()?;
        let piece_size = r.u32()?;
        let mask = r.u32()?;
        if block_len == 0 || block_len > MAX_CHUNK_LEN {
            return Err(Error::corrupt(WHAT, format!("block length {block_len}")));
        }
        if !piece_size.is_power_of_two() || !(MIN_PIECE..=MAX_BLOCK_SIZE).contains(&piece_size) {
            return Err(Error::corrupt(WHAT, format!("piece size {piece_size}")));
        }
        let pieces = block_len.div_ceil(piece_size);
        if pieces as usize > MAX_PIECES {
            return Err(Error::corrupt(WHAT, format!("{pieces} pieces; at most {MAX_PIECES}")));
        }
        if mask == 0 || mask >> pieces != 0 {
            return Err(Error::corrupt(WHAT, format!("mask {mask:#x} for {pieces} pieces")));
        }
        let expected: u64 = (0..pieces)
            .filter(|i| mask & (1 << i) != 0)
            .map(|i| u64::from(piece_size.min(block_len - i * piece_size)))
            .sum();
        let data = r.take(r.remaining())?;
        if data.len() as u64 != expected {
            return Err(Error::corrupt(
                WHAT,
                format!("{} bytes of pieces, the mask needs {expected}", data.len()),
            ));
        }
        Ok(Patch { block_len, piece_size, mask, data })
    }

    /// The length of the block this patch rebuilds.
    pub fn block_len(&self) -> u32 {
        self.block_len
    }

    /// The piece size it was cut with.
    pub fn piece_size(&self) -> u32 {
        self.piece_size
    }

    /// Which pieces it carries.
    pub fn mask(&self) -> u32 {
        self.mask
    }

    /// The block: `base` with this patch's pieces written over it. `base` must have the
    /// block's length.
    pub fn apply(&self, base: &[u8]) -> Result<Vec<u8>, Error> {
        if base.len() != self.block_len as usize {
            return Err(Error::corrupt(
                WHAT,
                format!("it rebuilds {} bytes, its base holds {}", self.block_len, base.len()),
            ));
        }
        let mut block = base.to_vec();
        let mut data = self.data;
        for (i, piece) in block.chunks_mut(self.piece_size as usize).enumerate() {
            if self.mask & (1 << i) != 0 {
                // Decode checked that the pieces add up to exactly the data's length.
                let (from, rest) = data.split_at(piece.len().min(data.len()));
                piece.copy_from_slice(from);
                data = rest;
            }
        }
        Ok(block)
    }
}

/// The block a patch entry names: `patch` (patch plaintext) applied over `base` (the base
/// chunk's plaintext), checked against the block's id `digest` (computed with `ids`).
pub fn rebuild(
    base: &[u8],
    patch: &[u8],
    digest: &crate::Digest,
    ids: &crate::ChunkIds,
) -> Result<Vec<u8>, Error> {
    let block = Patch::decode(patch)?.apply(base)?;
    let got = ids.of(&block);
    if got != *digest {
        return Err(Error::corrupt(
            "patched block",
            format!("rebuilt from its base and patch it hashes to {got}, the index says {digest}"),
        ));
    }
    Ok(block)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keyed_sums_depend_on_the_key_alone() {
        let block: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let (k1, k2) = (PieceKey::from_key(&[1; 32]), PieceKey::from_key(&[2; 32]));
        let sums = |k: &PieceKey| PieceSums::of(&block, 4096, k);
        assert_eq!(sums(&k1), sums(&PieceKey::from_key(&[1; 32])));
        assert_ne!(sums(&k1).as_slice()[0], sums(&k2).as_slice()[0]);
        assert_ne!(sums(&k1).as_slice()[0], sums(&PieceKey::UNKEYED).as_slice()[0]);
        assert_eq!(
            sums(&PieceKey::UNKEYED).as_slice()[0],
            twox_hash::XxHash3_64::oneshot(&block[..4096])
        );
        assert_eq!(format!("{k1:?}"), "PieceKey(keyed)", "the secret is never printed");
    }

    #[test]
    fn piece_sizes() {
        assert_eq!(piece_size(4096), 4096);
        assert_eq!(piece_size(65536), 4096);
        assert_eq!(piece_size(1 << 20), 65536);
        assert!(PieceSums::of(&[1u8; 4096], 4096, &PieceKey::UNKEYED).is_empty());
        assert_eq!(PieceSums::of(&[1u8; 65536], 4096, &PieceKey::UNKEYED).as_slice().len(), 16);
        assert_eq!(PieceSums::of(&[1u8; 5000], 4096, &PieceKey::UNKEYED).as_slice().len(), 2);
    }

    #[test]
    fn a_changed_piece_is_found() {
        let base = vec![7u8; 65536];
        let mut new = base.clone();
        new[3 * 4096 + 17] = 1;
        new[65535] = 2;
        let key = PieceKey::from_key(&[7; 32]);
        let (a, b) = (PieceSums::of(&base, 4096, &key), PieceSums::of(&new, 4096, &key));
        assert_eq!(b.differing(&a), Some(1 << 3 | 1 << 15));
        assert_eq!(b.differing(&PieceSums::NONE), None);
        let patch = encode_patch(&new, 4096, 1 << 3 | 1 << 15);
        assert_eq!(patch.len(), HEADER_LEN + 2 * 4096);
        assert_eq!(Patch::decode(&patch).unwrap().apply(&base).unwrap(), new);
        assert_eq!(
            rebuild(&base, &patch, &crate::Digest::of(&new), &crate::ChunkIds::Sha256).unwrap(),
            new
        );
        assert!(
            rebuild(&base, &patch, &crate::Digest::of(&base), &crate::ChunkIds::Sha256).is_err()
        );
    }

    #[test]
    fn bad_patches_are_refused() {
        let block = vec![1u8; 10000];
        let good = encode_patch(&block, 4096, 0b101);
        assert!(Patch::decode(&good).is_ok());
        let mut no_pieces = good.clone();
        no_pieces[16..20].copy_from_slice(&0u32.to_le_bytes());
        assert!(Patch::decode(&no_pieces).is_err());
        let mut beyond = good.clone();
        beyond[16..20].copy_from_slice(&0b1001u32.to_le_bytes());
        assert!(Patch::decode(&beyond).is_err());
        assert!(Patch::decode(&good[..good.len() - 1]).is_err());
        let patch = Patch::decode(&good).unwrap();
        assert!(patch.apply(&[0u8; 9999]).is_err());
    }

    proptest! {
        #[test]
        fn patch_then_apply_rebuilds(
            base in proptest::collection::vec(any::<u8>(), 4097..65536),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        ) {
            let mut new = base.clone();
            for (at, byte) in edits {
                let i = at % new.len();
                new[i] = new[i].wrapping_add(byte | 1);
            }
            let (old, cur) = (PieceSums::of(&base, 4096, &PieceKey::UNKEYED), PieceSums::of(&new, 4096, &PieceKey::UNKEYED));
            let mask = cur.differing(&old).unwrap();
            prop_assert!(mask != 0);
            let bytes = encode_patch(&new, 4096, mask);
            let patch = Patch::decode(&bytes).unwrap();
            prop_assert_eq!(patch.apply(&base).unwrap(), new);
        }

        #[test]
        fn decode_never_panics(bytes: Vec<u8>) {
            if let Ok(p) = Patch::decode(&bytes) {
                let _ = p.apply(&vec![0u8; p.block_len() as usize]);
            }
        }

        #[test]
        fn mutated_patches_never_panic(pos: usize, byte: u8) {
            let mut bytes = encode_patch(&[3u8; 20000], 4096, 0b10010);
            let i = pos % bytes.len();
            bytes[i] = byte;
            if let Ok(p) = Patch::decode(&bytes) {
                let _ = p.apply(&[0u8; 20000]);
            }
        }
    }
}
