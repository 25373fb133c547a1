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
//! The chunk's identity is not in the frame: it is the SHA-256 of the plaintext, and the object
//! is stored under that name. The CRC lets `verify` spot bit rot without decrypting; the
//! SHA-256 proves the content once decoded.

use std::cell::RefCell;

use crate::codec::Reader;
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

/// How the payload is encrypted. Only `None` exists today; the byte is in every frame so that
/// encryption at rest arrives without a new frame version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cipher {
    /// Not encrypted.
    None,
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
    let plain_len = u32::try_from(plaintext.len())
        .ok()
        .filter(|len| *len <= MAX_CHUNK_LEN)
        .ok_or_else(|| Error::Invalid {
            what: "chunk",
            detail: format!("{} bytes is larger than {MAX_CHUNK_LEN}", plaintext.len()),
        })?;
    let compressed = match zstd_level {
        Some(level) if !plaintext.is_empty() && worth_compressing(plaintext, level) => {
            compress_within(plaintext, level, plaintext.len() - plaintext.len() / 8)
        }
        _ => None,
    };
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

/// Decodes a frame, checking magic, version, lengths and CRC, and decompressing.
pub fn decode_chunk(bytes: &[u8]) -> Result<ChunkFrame, Error> {
    let mut r = Reader::new(bytes, WHAT);
    if r.take(4)? != MAGIC {
        return Err(Error::corrupt(WHAT, "bad magic: not a Cairn chunk"));
    }
    let version = r.u8()?;
    if version != VERSION {
        return Err(Error::Unsupported { what: WHAT, detail: format!("frame version {version}") });
    }
    let compression = match r.u8()? {
        0 => Compression::None,
        1 => Compression::Zstd,
        other => {
            return Err(Error::Unsupported { what: WHAT, detail: format!("compression {other}") });
        }
    };
    let cipher = match r.u8()? {
        0 => Cipher::None,
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
    let plaintext = match compression {
        Compression::None => payload.to_vec(),
        Compression::Zstd => decompress(payload, plain_len as usize)
            .map_err(|e| Error::corrupt(WHAT, format!("zstd payload does not decode: {e}")))?,
    };
    if plaintext.len() != plain_len as usize {
        return Err(Error::corrupt(
            WHAT,
            format!("plaintext is {} bytes, header says {plain_len}", plaintext.len()),
        ));
    }
    Ok(ChunkFrame { plaintext, compression, cipher })
}

impl ChunkFrame {
    /// Decodes a frame and checks that its plaintext hashes to `expected`.
    pub fn decode_verified(bytes: &[u8], expected: &Digest) -> Result<ChunkFrame, Error> {
        let frame = decode_chunk(bytes)?;
        let got = Digest::of(&frame.plaintext);
        if &got != expected {
            return Err(Error::corrupt(
                WHAT,
                format!("content hashes to {got}, not to its id {expected}"),
            ));
        }
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
