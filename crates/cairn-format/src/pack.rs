//! Packs and pack indexes: how chunks are grouped into vault objects.
//!
//! A chunk of 64 KiB is too small to be an object of its own: on a local file system each one
//! costs an inode and a directory entry (measured: two thirds of a full backup's CPU time went
//! to creating files), and on an object store each one costs a request. So chunk frames are
//! written back to back into *packs* of a few MiB, and a pack ends with a table saying which
//! chunk sits where. The same tables, gathered per backup, form a *pack index* object, which
//! is what readers load to find a chunk; a pack's own table lets a lost index be rebuilt.
//!
//! Pack bytes:
//! ```text
//!  0  4  magic "CRNP"
//!  4  1  version (1)
//!  5  3  reserved, 0
//!  8  …  chunk frames ("CRNC", see the chunk module), back to back
//!  …  …  table: per chunk, 32-byte chunk id, offset u32 LE, stored length u32 LE
//! -12  4  table entry count, u32 LE
//!  -8  4  CRC-32 of the table and the count
//!  -4  4  magic "CRNT"
//! ```
//! A pack of an encrypted vault has version 2, and its table and count are sealed (see the
//! crypto module; the pack's path is the associated data):
//! ```text
//!  …  n  sealed table: "CRNS" 1 0 0 0, salt (24), AES-256-GCM(table || count), tag (16)
//! -12  4  n, the sealed table's length, u32 LE
//!  -8  4  CRC-32 of the sealed table and its length
//!  -4  4  magic "CRNT"
//! ```
//! A pack's name is 32 random bytes, chosen by its writer: never derived from content, so that
//! a chunk stored again after verify found its copy bad can never land in an object that
//! already exists (and may be the damaged one).
//!
//! Pack-index bytes:
//! ```text
//!  0  4  magic "CPIX"
//!  4  1  version (1)
//!  5  3  reserved, 0
//!  8  4  pack count, u32 LE
//! 12  …  per pack: 32-byte pack name, entry count u32 LE, entries as in a pack table
//! -4  4  CRC-32 of everything before it
//! ```

use crate::codec::Reader;
use crate::crypto::{Crypto, SALT_LEN};
use crate::{Digest, Error};

const PACK_MAGIC: &[u8; 4] = b"CRNP";
const TABLE_MAGIC: &[u8; 4] = b"CRNT";
const INDEX_MAGIC: &[u8; 4] = b"CPIX";
const VERSION: u8 = 1;
const PACK: &str = "pack";
const INDEX: &str = "pack index";
/// Bytes of a pack before its first frame.
pub const PACK_HEADER_LEN: usize = 8;
/// Bytes of a pack after its table.
pub const PACK_FOOTER_LEN: usize = 12;
/// Bytes of one table entry.
pub const PACK_ENTRY_LEN: usize = 40;
/// The largest pack a reader accepts (offsets are 32-bit).
pub const MAX_PACK_LEN: u64 = u32::MAX as u64;

/// Where one chunk sits in its pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PackEntry {
    /// The chunk id (SHA-256 of its plaintext).
    pub id: Digest,
    /// Offset of its frame from the start of the pack.
    pub offset: u32,
    /// Length of its frame.
    pub len: u32,
}

/// The header every pack of a plaintext vault starts with.
pub const PACK_HEADER: [u8; PACK_HEADER_LEN] =
    [PACK_MAGIC[0], PACK_MAGIC[1], PACK_MAGIC[2], PACK_MAGIC[3], VERSION, 0, 0, 0];
/// The header every pack of an encrypted vault starts with (version 2: a sealed table).
pub const SEALED_PACK_HEADER: [u8; PACK_HEADER_LEN] =
    [PACK_MAGIC[0], PACK_MAGIC[1], PACK_MAGIC[2], PACK_MAGIC[3], SEALED_VERSION, 0, 0, 0];
const SEALED_VERSION: u8 = 2;

/// The header of a pack of a vault with `crypto`.
pub fn pack_header(crypto: &Crypto) -> [u8; PACK_HEADER_LEN] {
    if crypto.is_encrypted() { SEALED_PACK_HEADER } else { PACK_HEADER }
}

/// The bytes that end a pack of a vault with `crypto`, whose path is `path`: its table (sealed
/// with `salt` in an encrypted vault) and footer.
pub fn pack_trailer_in(
    crypto: &Crypto,
    path: &str,
    entries: &[PackEntry],
    salt: [u8; SALT_LEN],
) -> Vec<u8> {
    if !crypto.is_encrypted() {
        return pack_trailer(entries);
    }
    let mut table = Vec::with_capacity(entries.len() * PACK_ENTRY_LEN + 4);
    put_entries(&mut table, entries);
    table.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    let mut out = crypto.seal(path, table, salt);
    out.extend_from_slice(&(out.len() as u32).to_le_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(TABLE_MAGIC);
    out
}

/// Reads the table of a whole pack of a vault with `crypto` (the pack at `path`), checked
/// against the pack's bytes: a plain table (version 1) in a plaintext vault, a sealed one
/// (version 2) in an encrypted vault.
pub fn decode_pack_table_in(
    crypto: &Crypto,
    path: &str,
    pack: &[u8],
) -> Result<Vec<PackEntry>, Error> {
    let footer_at = pack
        .len()
        .checked_sub(PACK_FOOTER_LEN)
        .filter(|at| *at >= PACK_HEADER_LEN)
        .ok_or(Error::Truncated { what: PACK, offset: pack.len(), needed: PACK_FOOTER_LEN })?;
    let table_len = pack_table_len(crypto, pack.get(footer_at..).unwrap_or_default())?;
    let table_at = footer_at
        .checked_sub(table_len)
        .filter(|at| *at >= PACK_HEADER_LEN)
        .ok_or_else(|| Error::corrupt(PACK, format!("a table of {table_len} bytes cannot fit")))?;
    decode_pack_tail_in(
        crypto,
        path,
        pack.get(..PACK_HEADER_LEN).unwrap_or_default(),
        pack.get(table_at..).unwrap_or_default(),
        table_at as u64,
    )
}

/// The length of a pack's table (sealed or not), from the pack's last [`PACK_FOOTER_LEN`]
/// bytes: what to fetch before the footer to read the table without the whole pack.
pub fn pack_table_len(crypto: &Crypto, footer: &[u8]) -> Result<usize, Error> {
    let mut foot = Reader::new(footer, PACK);
    let n = foot.u32()? as usize;
    let _crc = foot.u32()?;
    if foot.take(4)? != TABLE_MAGIC {
        return Err(Error::corrupt(PACK, "bad table magic (the pack is truncated or damaged)"));
    }
    foot.expect_end()?;
    if crypto.is_encrypted() {
        Ok(n)
    } else {
        n.checked_mul(PACK_ENTRY_LEN)
            .ok_or_else(|| Error::corrupt(PACK, format!("a table of {n} entries cannot fit")))
    }
}

/// Reads a pack's table from its `header` (first [`PACK_HEADER_LEN`] bytes) and `tail` (its
/// bytes from the table, at offset `table_at`, to the end): what verify checks of each pack
/// without reading its frames twice.
pub fn decode_pack_tail_in(
    crypto: &Crypto,
    path: &str,
    header: &[u8],
    tail: &[u8],
    table_at: u64,
) -> Result<Vec<PackEntry>, Error> {
    let want = if crypto.is_encrypted() { SEALED_VERSION } else { VERSION };
    let version = header.get(4).copied().unwrap_or(0);
    Reader::new(header, PACK).header(PACK_MAGIC, want).map_err(|e| match e {
        Error::Unsupported { .. } if version == VERSION => {
            Error::corrupt(PACK, "a plain pack in an encrypted vault")
        }
        Error::Unsupported { .. } if version == SEALED_VERSION => {
            Error::corrupt(PACK, "an encrypted pack in a plaintext vault")
        }
        e => e,
    })?;
    let footer_at = tail.len().checked_sub(PACK_FOOTER_LEN).ok_or(Error::Truncated {
        what: PACK,
        offset: tail.len(),
        needed: PACK_FOOTER_LEN,
    })?;
    let table_len = pack_table_len(crypto, tail.get(footer_at..).unwrap_or_default())?;
    if table_len != footer_at {
        return Err(Error::corrupt(
            PACK,
            format!("the table is {footer_at} bytes, its footer says {table_len}"),
        ));
    }
    let crc = u32::from_le_bytes(
        tail.get(footer_at + 4..footer_at + 8).and_then(|b| b.try_into().ok()).unwrap_or_default(),
    );
    if crc32fast::hash(tail.get(..footer_at + 4).unwrap_or_default()) != crc {
        return Err(Error::corrupt(PACK, "table CRC mismatch"));
    }
    let table = tail.get(..footer_at).unwrap_or_default();
    let (entries, count) = if crypto.is_encrypted() {
        let plain = crypto.open(PACK, path, table)?;
        let count_at = plain.len().checked_sub(4).ok_or(Error::Truncated {
            what: PACK,
            offset: 0,
            needed: 4,
        })?;
        let count = Reader::new(plain.get(count_at..).unwrap_or_default(), PACK).u32()? as usize;
        if count.checked_mul(PACK_ENTRY_LEN) != Some(count_at) {
            return Err(Error::corrupt(
                PACK,
                format!("a sealed table of {count} entries is {count_at} bytes"),
            ));
        }
        let mut r = Reader::new(plain.get(..count_at).unwrap_or_default(), PACK);
        (read_entries(&mut r, count, PACK)?, count)
    } else {
        let count = table.len() / PACK_ENTRY_LEN;
        let mut r = Reader::new(table, PACK);
        (read_entries(&mut r, count, PACK)?, count)
    };
    debug_assert_eq!(entries.len(), count);
    check_layout(&entries, table_at, PACK)?;
    Ok(entries)
}

fn put_entries(out: &mut Vec<u8>, entries: &[PackEntry]) {
    for e in entries {
        out.extend_from_slice(e.id.as_bytes());
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.len.to_le_bytes());
    }
}

/// The bytes that end a pack: its table and footer.
pub fn pack_trailer(entries: &[PackEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * PACK_ENTRY_LEN + PACK_FOOTER_LEN);
    put_entries(&mut out, entries);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(TABLE_MAGIC);
    out
}

fn read_entries(
    r: &mut Reader<'_>,
    count: usize,
    what: &'static str,
) -> Result<Vec<PackEntry>, Error> {
    if count > r.remaining() / PACK_ENTRY_LEN {
        return Err(Error::corrupt(what, format!("{count} entries in {} bytes", r.remaining())));
    }
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        let id = Digest(r.array()?);
        let offset = r.u32()?;
        let len = r.u32()?;
        entries.push(PackEntry { id, offset, len });
    }
    Ok(entries)
}

/// Checks that every entry lies between the header and `end`, in order, without overlap.
fn check_layout(entries: &[PackEntry], end: u64, what: &'static str) -> Result<(), Error> {
    let mut next = PACK_HEADER_LEN as u64;
    for e in entries {
        let start = u64::from(e.offset);
        let stop = start + u64::from(e.len);
        if e.len == 0 || start < next || stop > end {
            return Err(Error::corrupt(
                what,
                format!("chunk {} at {start}..{stop} is out of place", e.id),
            ));
        }
        next = stop;
    }
    Ok(())
}

/// Reads the table at the end of a whole pack and checks it against the pack's bytes.
pub fn decode_pack_table(pack: &[u8]) -> Result<Vec<PackEntry>, Error> {
    Reader::new(pack, PACK).header(PACK_MAGIC, VERSION)?;
    let footer_at = pack
        .len()
        .checked_sub(PACK_FOOTER_LEN)
        .filter(|at| *at >= PACK_HEADER_LEN)
        .ok_or(Error::Truncated { what: PACK, offset: pack.len(), needed: PACK_FOOTER_LEN })?;
    let mut foot = Reader::new(pack.get(footer_at..).unwrap_or_default(), PACK);
    let count = foot.u32()? as usize;
    let crc = foot.u32()?;
    if foot.take(4)? != TABLE_MAGIC {
        return Err(Error::corrupt(PACK, "bad table magic (the pack is truncated or damaged)"));
    }
    let table_len = count
        .checked_mul(PACK_ENTRY_LEN)
        .filter(|len| *len <= footer_at - PACK_HEADER_LEN)
        .ok_or_else(|| Error::corrupt(PACK, format!("a table of {count} entries cannot fit")))?;
    let table_at = footer_at - table_len;
    let checked = pack.get(table_at..footer_at + 4).unwrap_or_default();
    if crc32fast::hash(checked) != crc {
        return Err(Error::corrupt(PACK, "table CRC mismatch"));
    }
    let mut r = Reader::new(pack.get(table_at..footer_at).unwrap_or_default(), PACK);
    let entries = read_entries(&mut r, count, PACK)?;
    check_layout(&entries, table_at as u64, PACK)?;
    Ok(entries)
}

/// The chunks of one pack, as a pack index lists them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexedPack {
    /// The pack's name.
    pub pack: Digest,
    /// Its chunks, in pack order.
    pub entries: Vec<PackEntry>,
}

/// Encodes a pack index.
pub fn encode_pack_index(packs: &[IndexedPack]) -> Vec<u8> {
    let entries: usize = packs.iter().map(|p| p.entries.len()).sum();
    let mut out = Vec::with_capacity(16 + packs.len() * 36 + entries * PACK_ENTRY_LEN);
    out.extend_from_slice(INDEX_MAGIC);
    out.extend_from_slice(&[VERSION, 0, 0, 0]);
    out.extend_from_slice(&(packs.len() as u32).to_le_bytes());
    for p in packs {
        out.extend_from_slice(p.pack.as_bytes());
        out.extend_from_slice(&(p.entries.len() as u32).to_le_bytes());
        put_entries(&mut out, &p.entries);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes and checks a pack index: CRC, counts, and each entry's place.
pub fn decode_pack_index(bytes: &[u8]) -> Result<Vec<IndexedPack>, Error> {
    let body_len = bytes.len().checked_sub(4).ok_or(Error::Truncated {
        what: INDEX,
        offset: bytes.len(),
        needed: 4,
    })?;
    let (body, crc) = bytes.split_at(body_len);
    let mut r = Reader::new(body, INDEX);
    r.header(INDEX_MAGIC, VERSION)?;
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err(Error::corrupt(INDEX, "CRC mismatch"));
    }
    let count = r.u32()? as usize;
    if count > r.remaining() / 36 {
        return Err(Error::corrupt(INDEX, format!("{count} packs in {} bytes", r.remaining())));
    }
    let mut packs = Vec::with_capacity(count);
    for _ in 0..count {
        let pack = Digest(r.array()?);
        let n = r.u32()? as usize;
        let entries = read_entries(&mut r, n, INDEX)?;
        check_layout(&entries, MAX_PACK_LEN, INDEX)?;
        packs.push(IndexedPack { pack, entries });
    }
    r.expect_end()?;
    Ok(packs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode_chunk;
    use proptest::prelude::*;

    /// Builds a pack from plaintexts the way the vault does.
    fn build(chunks: &[Vec<u8>]) -> (Vec<u8>, Vec<PackEntry>) {
        let mut pack = PACK_HEADER.to_vec();
        let mut entries = Vec::new();
        for c in chunks {
            let frame = encode_chunk(c, Some(1)).unwrap();
            entries.push(PackEntry {
                id: Digest::of(c),
                offset: pack.len() as u32,
                len: frame.len() as u32,
            });
            pack.extend_from_slice(&frame);
        }
        pack.extend_from_slice(&pack_trailer(&entries));
        (pack, entries)
    }

    #[test]
    fn an_empty_pack_holds_no_chunks() {
        let (pack, entries) = build(&[]);
        assert_eq!(decode_pack_table(&pack).unwrap(), entries);
    }

    #[test]
    fn a_truncated_pack_is_refused() {
        let (pack, _) = build(&[b"one".to_vec(), b"two".to_vec()]);
        for keep in 0..pack.len() {
            assert!(decode_pack_table(&pack[..keep]).is_err(), "kept {keep}");
        }
    }

    proptest! {
        #[test]
        fn packs_round_trip(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..20)) {
            let (pack, entries) = build(&chunks);
            let table = decode_pack_table(&pack).unwrap();
            prop_assert_eq!(&table, &entries);
            for (e, c) in table.iter().zip(&chunks) {
                let frame = &pack[e.offset as usize..(e.offset + e.len) as usize];
                prop_assert_eq!(&crate::ChunkFrame::decode_verified(frame, &e.id).unwrap().plaintext, c);
            }
            let packs = vec![IndexedPack { pack: Digest::of(&pack), entries }];
            prop_assert_eq!(decode_pack_index(&encode_pack_index(&packs)).unwrap(), packs);
        }

        #[test]
        fn pack_table_decode_never_panics(bytes: Vec<u8>) {
            let _ = decode_pack_table(&bytes);
        }

        #[test]
        fn pack_index_decode_never_panics(bytes: Vec<u8>) {
            let _ = decode_pack_index(&bytes);
        }

        #[test]
        fn mutated_pack_indexes_are_refused(n in 1usize..5, pos: usize, bit in 0u8..8) {
            let chunks: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8; 10 + i]).collect();
            let (_, entries) = build(&chunks);
            let mut bytes = encode_pack_index(&[IndexedPack { pack: Digest([9; 32]), entries }]);
            let i = pos % bytes.len();
            bytes[i] ^= 1 << bit;
            prop_assert!(decode_pack_index(&bytes).is_err());
        }
    }
}
