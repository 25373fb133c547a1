//! The chunk frame: how one block (or one index page) is stored in the vault.
//!
//! ```text
//! offset  size  field
//!  0      4     magic "CRNC"
//!  4      1     frame version (1)
//!  5      1     compression: 0 none, 1 zstd
//!  6      1     cipher: 0 none (other values are reserved for encryption at rest)
//!  7      1     reserved, 0
//!  8      4     plaintext length, u32 LE
//! 12      4     payload length, u32 LE
//! 16      n     payload (compressed and/or encrypted plaintext)
//! 16+n    4     CRC-32 (IEEE) of bytes 0 .. 16+n, u32 LE
//! ```
//!
//! The chunk's identity is not in the frame: it is the SHA-256 of the plaintext (HMAC-SHA256
//! in an encrypted vault), and the pack table names it. The CRC lets `verify` spot bit rot
//! without keys; the id proves the content once decoded.
//!
//! Cipher 1 (encrypted vaults, see the crypto module) hides the compression byte and the
//! plaintext length (both zero in the clear header) inside the payload:
//!
//! ```text
//! payload = salt (24) || AES-256-GCM(inner) || tag (16)
//! inner   = compression u8, 0 0 0, plaintext length u32 LE, body length u32 LE, body,
//!           zero padding up to the frame's size class
//! ```
//! The associated data is the header's first 8 bytes and the chunk id, so a frame read under
//! another id does not open.

use std::cell::RefCell;

use crate::codec::Reader;
use crate::crypto::{Crypto, SALT_LEN, TAG_LEN};
use crate::{Digest, Error};

const MAGIC: &[u8; 4] = b"CRNC";
const VERSION: u8 = 1;
/// Bytes of frame before the payload.
pub const FRAME_HEADER_LEN: usize = 16;
/// The largest plaintext a chunk may carry (64 MiB), so a corrupt length cannot make a reader
/// allocate without bound.
pub const MAX_CHUNK_LEN: u32 = 64 * 1024 * 1024;
const WHAT: &str = "chunk frame";

/// How the payload is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Stored as is.
    None,
    /// zstd, any level.
    Zstd,
}

/// How the payload is encrypted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cipher {
    /// Not encrypted.
    None,
    /// AES-256-GCM under a key derived per frame (cipher byte 1).
    Aes256Gcm,
}

/// Bytes of the inner header of an encrypted frame.
const INNER_HEADER_LEN: usize = 12;

/// The size class of an encrypted frame's inner bytes: `len` rounded up to a multiple of
/// `max(256, 2^(floor(log2 len) - 3))` (eight classes per doubling, at most 12.5% more), but
/// never beyond `cap`, the size of the block stored uncompressed: an incompressible block is
/// not padded, and a compressed one never grows past it.
pub fn size_class(len: usize, cap: usize) -> usize {
    let log = (usize::BITS - 1).saturating_sub(len.max(1).leading_zeros());
    let step = 1usize << log.saturating_sub(3).max(8);
    len.div_ceil(step).saturating_mul(step).min(cap).max(len)
}

/// A decoded chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkFrame {
    /// The plaintext the chunk id was computed over.
    pub plaintext: Vec<u8>,
    /// How it was stored.
    pub compression: Compression,
    /// How it was encrypted.
    pub cipher: Cipher,
}

/// Encodes `plaintext` as a frame. With `zstd_level` set, the payload is compressed when that
/// saves at least one eighth of the bytes, and stored plain otherwise (random data does not
/// pay for its decompression).
pub fn encode_chunk(plaintext: &[u8], zstd_level: Option<i32>) -> Result<Vec<u8>, Error> {
    let plain_len = check_len(plaintext)?;
    let compressed = compress(plaintext, zstd_level);
    let (compression, payload): (u8, &[u8]) = match &compressed {
        Some(buf) => (1, buf),
        None => (0, plaintext),
    };
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + payload.len() + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[VERSION, compression, 0, 0]);
    out.extend_from_slice(&plain_len.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Encodes chunk `id` (the id of `plaintext`) as a frame of a vault with `crypto`: as
/// [`encode_chunk`] in a plaintext vault; in an encrypted one, a cipher-1 frame whose key is
/// derived from `salt` (fresh random bytes from the caller), its inner bytes padded to their
/// [`size_class`].
pub fn encode_chunk_in(
    crypto: &Crypto,
    id: &Digest,
    plaintext: &[u8],
    zstd_level: Option<i32>,
    salt: [u8; SALT_LEN],
) -> Result<Vec<u8>, Error> {
    if !crypto.is_encrypted() {
        return encode_chunk(plaintext, zstd_level);
    }
    let plain_len = check_len(plaintext)?;
    let compressed = compress(plaintext, zstd_level);
    let (compression, body): (u8, &[u8]) = match &compressed {
        Some(buf) => (1, buf),
        None => (0, plaintext),
    };
    let inner_len = size_class(INNER_HEADER_LEN + body.len(), INNER_HEADER_LEN + plaintext.len());
    let payload_len = SALT_LEN + inner_len + TAG_LEN;
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + payload_len + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[VERSION, 0, 1, 0]);
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload_len as u32).to_le_bytes());
    out.extend_from_slice(&salt);
    let inner_at = out.len();
    out.extend_from_slice(&[compression, 0, 0, 0]);
    out.extend_from_slice(&plain_len.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out.resize(inner_at + inner_len, 0);
    let aad = frame_aad(&out, id);
    let failed = || Error::Invalid { what: "chunk", detail: "encryption failed".into() };
    let tag = crypto
        .seal_frame(&salt, &aad, out.get_mut(inner_at..).ok_or_else(failed)?)
        .ok_or_else(failed)?;
    out.extend_from_slice(&tag);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// The associated data of an encrypted frame: its first 8 header bytes and its chunk id.
fn frame_aad(frame: &[u8], id: &Digest) -> [u8; 40] {
    let mut aad = [0u8; 40];
    if let (Some(to), Some(from)) = (aad.get_mut(..8), frame.get(..8)) {
        to.copy_from_slice(from);
    }
    if let Some(to) = aad.get_mut(8..) {
        to.copy_from_slice(id.as_bytes());
    }
    aad
}

fn check_len(plaintext: &[u8]) -> Result<u32, Error> {
    u32::try_from(plaintext.len()).ok().filter(|len| *len <= MAX_CHUNK_LEN).ok_or_else(|| {
        Error::Invalid {
            what: "chunk",
            detail: format!("{} bytes is larger than {MAX_CHUNK_LEN}", plaintext.len()),
        }
    })
}

/// The zstd frame of `plaintext` if compressing it saves at least an eighth.
fn compress(plaintext: &[u8], zstd_level: Option<i32>) -> Option<Vec<u8>> {
    match zstd_level {
        Some(level) if !plaintext.is_empty() && worth_compressing(plaintext, level) => {
            compress_within(plaintext, level, plaintext.len() - plaintext.len() / 8)
        }
        _ => None,
    }
}

thread_local! {
    // A compression context costs more to create than to compress 64 KiB: keep one per thread.
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Compresses `data` at `level` into at most `budget` bytes; `None` when it does not fit.
fn compress_within(data: &[u8], level: i32, budget: usize) -> Option<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.try_borrow_mut().ok()?;
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, compressor) = slot.as_mut()?;
        // Written into spare capacity: no need to zero the buffer first.
        let mut buf = Vec::with_capacity(budget);
        // An error here means "does not fit in the budget", i.e. it does not pay.
        compressor.compress_to_buffer(data, &mut buf).ok()?;
        Some(buf)
    })
}

/// A quick look before paying for compression: two 4 KiB samples (start and middle) of a large
/// block; if neither shrinks by an eighth, the block is taken as incompressible (random data,
/// already-compressed files). Small blocks are always tried.
fn worth_compressing(data: &[u8], level: i32) -> bool {
    const SAMPLE: usize = 4096;
    if data.len() < 8 * SAMPLE {
        return true;
    }
    let mid = data.len() / 2;
    [data.get(..SAMPLE), data.get(mid..mid + SAMPLE)]
        .into_iter()
        .flatten()
        .any(|sample| compress_within(sample, level, SAMPLE - SAMPLE / 8).is_some())
}

fn decompress(payload: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.try_borrow_mut().map_err(std::io::Error::other)?;
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        match slot.as_mut() {
            Some(d) => d.decompress(payload, capacity),
            None => Err(std::io::Error::other("no zstd context")),
        }
    })
}

/// A frame whose header and CRC are checked.
struct Checked<'a> {
    compression: u8,
    cipher: Cipher,
    plain_len: u32,
    payload: &'a [u8],
}

/// Checks a frame's magic, version, fields, lengths and CRC: all that can be checked without
/// keys.
fn check(bytes: &[u8]) -> Result<Checked<'_>, Error> {
    let mut r = Reader::new(bytes, WHAT);
    if r.take(4)? != MAGIC {
        return Err(Error::corrupt(WHAT, "bad magic: not a Cairn chunk"));
    }
    let version = r.u8()?;
    if version != VERSION {
        return Err(Error::Unsupported { what: WHAT, detail: format!("frame version {version}") });
    }
    let compression = r.u8()?;
    if compression > 1 {
        return Err(Error::Unsupported {
            what: WHAT,
            detail: format!("compression {compression}"),
        });
    }
    let cipher = match r.u8()? {
        0 => Cipher::None,
        1 => Cipher::Aes256Gcm,
        other => return Err(Error::Unsupported { what: WHAT, detail: format!("cipher {other}") }),
    };
    if r.u8()? != 0 {
        return Err(Error::corrupt(WHAT, "reserved byte is not zero"));
    }
    let plain_len = r.u32()?;
    if plain_len > MAX_CHUNK_LEN {
        return Err(Error::corrupt(WHAT, format!("plaintext length {plain_len} is too large")));
    }
    let payload_len = r.u32()? as usize;
    let body_end = r.position();
    let payload = r.take(payload_len)?;
    let crc_offset = body_end + payload_len;
    let stored_crc = r.u32()?;
    r.expect_end()?;
    let computed = crc32fast::hash(bytes.get(..crc_offset).unwrap_or_default());
    if stored_crc != computed {
        return Err(Error::corrupt(
            WHAT,
            format!("CRC mismatch: stored {stored_crc:08x}, computed {computed:08x}"),
        ));
    }
    if cipher == Cipher::Aes256Gcm && (compression != 0 || plain_len != 0) {
        return Err(Error::corrupt(WHAT, "an encrypted frame shows its compression or length"));
    }
    Ok(Checked { compression, cipher, plain_len, payload })
}

/// Checks what can be checked of a frame without keys: magic, version, fields, lengths, CRC.
/// An encrypted frame is then known to be stored as written, not to be right.
pub fn check_chunk(bytes: &[u8]) -> Result<Cipher, Error> {
    check(bytes).map(|c| c.cipher)
}

/// The plaintext of a plain payload (`compression` 0 or 1).
fn unpack(
    compression: u8,
    payload: &[u8],
    plain_len: u32,
) -> Result<(Vec<u8>, Compression), Error> {
    let (plaintext, compression) = match compression {
        0 => (payload.to_vec(), Compression::None),
        _ => (
            decompress(payload, plain_len as usize)
                .map_err(|e| Error::corrupt(WHAT, format!("zstd payload does not decode: {e}")))?,
            Compression::Zstd,
        ),
    };
    if plaintext.len() != plain_len as usize {
        return Err(Error::corrupt(
            WHAT,
            format!("plaintext is {} bytes, header says {plain_len}", plaintext.len()),
        ));
    }
    Ok((plaintext, compression))
}

/// Decodes a plain frame, checking magic, version, lengths and CRC, and decompressing. An
/// encrypted frame is refused: it needs [`ChunkFrame::decode_in`] and the vault's keys.
pub fn decode_chunk(bytes: &[u8]) -> Result<ChunkFrame, Error> {
    let c = check(bytes)?;
    if c.cipher != Cipher::None {
        return Err(Error::corrupt(WHAT, "it is encrypted, and this vault is not"));
    }
    let (plaintext, compression) = unpack(c.compression, c.payload, c.plain_len)?;
    Ok(ChunkFrame { plaintext, compression, cipher: Cipher::None })
}

/// Opens an encrypted frame's payload: the inner header and body, padding dropped.
fn decrypt(
    crypto: &Crypto,
    frame: &[u8],
    payload: &[u8],
    id: &Digest,
) -> Result<ChunkFrame, Error> {
    if payload.len() < SALT_LEN + INNER_HEADER_LEN + TAG_LEN {
        return Err(Error::corrupt(WHAT, "an encrypted payload shorter than its overhead"));
    }
    let (salt, rest) = payload.split_at(SALT_LEN);
    let (sealed, tag) = rest.split_at(rest.len() - TAG_LEN);
    let mut inner = sealed.to_vec();
    if !crypto.open_frame(salt, &frame_aad(frame, id), &mut inner, tag) {
        return Err(Error::corrupt(
            WHAT,
            format!("it does not authenticate as chunk {id} (damaged, or not this vault's)"),
        ));
    }
    let mut r = Reader::new(&inner, WHAT);
    let compression = r.u8()?;
    if compression > 1 || r.take(3)? != [0, 0, 0] {
        return Err(Error::corrupt(WHAT, "bad inner header"));
    }
    let plain_len = r.u32()?;
    let body_len = r.u32()? as usize;
    if plain_len > MAX_CHUNK_LEN {
        return Err(Error::corrupt(WHAT, format!("plaintext length {plain_len} is too large")));
    }
    let body = r.take(body_len)?;
    let (plaintext, compression) = unpack(compression, body, plain_len)?;
    Ok(ChunkFrame { plaintext, compression, cipher: Cipher::Aes256Gcm })
}

impl ChunkFrame {
    /// Decodes a plain frame and checks that its plaintext hashes (SHA-256) to `expected`.
    pub fn decode_verified(bytes: &[u8], expected: &Digest) -> Result<ChunkFrame, Error> {
        ChunkFrame::decode_in(&Crypto::none(), bytes, expected)
    }

    /// Decodes a frame of a vault with `crypto` and checks that its plaintext has the id
    /// `expected`. A plaintext vault accepts plain frames only, an encrypted vault encrypted
    /// ones only.
    pub fn decode_in(
        crypto: &Crypto,
        bytes: &[u8],
        expected: &Digest,
    ) -> Result<ChunkFrame, Error> {
        let frame = ChunkFrame::open_in(crypto, bytes, expected)?;
        let got = crypto.ids().of(&frame.plaintext);
        if &got != expected {
            return Err(Error::corrupt(
                WHAT,
                format!("content hashes to {got}, not to its id {expected}"),
            ));
        }
        Ok(frame)
    }

    /// Decodes a frame of a vault with `crypto` stored as chunk `id`, without hashing its
    /// plaintext: the CRC is checked, and in an encrypted vault the AEAD tag (bound to `id`),
    /// but a plaintext vault's frame is not proven to be `id`. For readers that check the
    /// content another way (the engine compares a base with the new block byte for byte).
    pub fn open_in(crypto: &Crypto, bytes: &[u8], id: &Digest) -> Result<ChunkFrame, Error> {
        let c = check(bytes)?;
        let frame = match (c.cipher, crypto.is_encrypted()) {
            (Cipher::None, false) => {
                let (plaintext, compression) = unpack(c.compression, c.payload, c.plain_len)?;
                ChunkFrame { plaintext, compression, cipher: Cipher::None }
            }
            (Cipher::Aes256Gcm, true) => decrypt(crypto, bytes, c.payload, id)?,
            (Cipher::None, true) => {
                return Err(Error::corrupt(WHAT, "it is not encrypted, in an encrypted vault"));
            }
            (Cipher::Aes256Gcm, false) => {
                return Err(Error::corrupt(WHAT, "it is encrypted, and this vault is not"));
            }
        };
        Ok(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn compresses_only_when_it_pays() {
        let text = b"INFO request ok\n".repeat(4096);
        let frame = encode_chunk(&text, Some(1)).unwrap();
        assert!(frame.len() < text.len() / 4);
        assert_eq!(decode_chunk(&frame).unwrap().compression, Compression::Zstd);

        let mut noise = vec![0u8; 65536];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in &mut noise {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let frame = encode_chunk(&noise, Some(1)).unwrap();
        assert_eq!(frame.len(), noise.len() + FRAME_HEADER_LEN + 4);
        assert_eq!(decode_chunk(&frame).unwrap().compression, Compression::None);
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let frame = encode_chunk(b"hello, vault", Some(1)).unwrap();
        for i in 0..frame.len() * 8 {
            let mut bad = frame.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(decode_chunk(&bad).is_err(), "bit {i}");
        }
    }

    #[test]
    fn verified_decode_checks_identity() {
        let frame = encode_chunk(b"abc", None).unwrap();
        assert!(ChunkFrame::decode_verified(&frame, &Digest::of(b"abc")).is_ok());
        let err = ChunkFrame::decode_verified(&frame, &Digest::of(b"abd")).unwrap_err();
        assert!(err.to_string().contains("not to its id"));
    }

    proptest! {
        #[test]
        fn round_trips(data: Vec<u8>, level in proptest::option::of(1i32..4)) {
            let frame = encode_chunk(&data, level).unwrap();
            let back = decode_chunk(&frame).unwrap();
            prop_assert_eq!(back.plaintext, data);
        }

        #[test]
        fn decode_never_panics(bytes: Vec<u8>) {
            let _ = decode_chunk(&bytes);
        }

        #[test]
        fn truncation_is_an_error(data: Vec<u8>, cut in 0usize..64) {
            let frame = encode_chunk(&data, Some(1)).unwrap();
            let keep = frame.len().saturating_sub(cut + 1);
            prop_assert!(decode_chunk(&frame[..keep]).is_err());
        }
    }
}
