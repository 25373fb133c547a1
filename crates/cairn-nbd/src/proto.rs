//! The NBD wire format: constants, and decoders for everything a server sends.
//!
//! Every decoder takes the bytes as received and returns an error, never panics, on short,
//! long or inconsistent input: a server (or whatever answers on the socket) is untrusted.
//! The constants and layouts follow the NBD protocol document (`doc/proto.md` of the NBD
//! project): fixed-newstyle negotiation, simple and structured replies.

use crate::Error;

/// "NBDMAGIC": the first 8 bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": the newstyle marker, and the prefix of every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag: no 124 zero bytes after the export data.
pub const FLAG_NO_ZEROES: u16 = 2;

/// Option: end negotiation politely.
pub const OPT_ABORT: u32 = 2;
/// Option: choose the export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: choose metadata contexts for `BLOCK_STATUS`.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: information about the export.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context the server agreed to.
pub const REP_META_CONTEXT: u32 = 4;
/// Option replies with this bit set are errors.
pub const REP_FLAG_ERROR: u32 = 1 << 31;

/// Info: export size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Info: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: block status of the negotiated metadata contexts.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Structured reply flag: the last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1;
/// Chunk: nothing (ends a reply).
pub const REPLY_NONE: u16 = 0;
/// Chunk: data at an offset.
pub const REPLY_OFFSET_DATA: u16 = 1;
/// Chunk: a range that reads as zeros.
pub const REPLY_OFFSET_HOLE: u16 = 2;
/// Chunk: extents of one metadata context.
pub const REPLY_BLOCK_STATUS: u16 = 5;
/// Chunk: an error.
pub const REPLY_ERROR: u16 = (1 << 15) + 1;
/// Chunk: an error at an offset.
pub const REPLY_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// `base:allocation` flag: not allocated.
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` flag: reads as zeros.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:*` flag: dirty.
pub const STATE_DIRTY: u32 = 1;

/// Transmission flag: the export is read-only.
pub const TRANSMIT_READ_ONLY: u16 = 1 << 1;

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn bad(what: impl Into<String>) -> Error {
    Error::Protocol(what.into())
}

/// The server's first 18 bytes: returns its handshake flags.
pub fn parse_greeting(b: &[u8]) -> Result<u16, Error> {
    if b.len() != 18 {
        return Err(bad(format!("greeting of {} bytes, expected 18", b.len())));
    }
    if be64(b, 0) != Some(NBD_MAGIC) {
        return Err(bad("the peer is not an NBD server (no NBDMAGIC)"));
    }
    if be64(b, 8) != Some(IHAVEOPT) {
        return Err(bad(
            "the server does not speak newstyle negotiation (oldstyle servers are not supported)",
        ));
    }
    let flags = be16(b, 16).unwrap_or(0);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(bad("the server does not speak fixed newstyle negotiation"));
    }
    Ok(flags)
}

/// The fixed part of an option reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReply {
    /// The option replied to.
    pub option: u32,
    /// `REP_*`, with `REP_FLAG_ERROR` for errors.
    pub kind: u32,
    /// Bytes of payload that follow.
    pub len: u32,
}

impl OptionReply {
    /// Size of the fixed part.
    pub const SIZE: usize = 20;

    /// Decodes the fixed part; `expected` is the option the client sent.
    pub fn parse(b: &[u8], expected: u32) -> Result<OptionReply, Error> {
        if b.len() != Self::SIZE || be64(b, 0) != Some(OPTION_REPLY_MAGIC) {
            return Err(bad("bad option reply magic"));
        }
        let reply = OptionReply {
            option: be32(b, 8).unwrap_or(0),
            kind: be32(b, 12).unwrap_or(0),
            len: be32(b, 16).unwrap_or(0),
        };
        if reply.option != expected {
            return Err(bad(format!(
                "reply to option {} while waiting for option {expected}",
                reply.option
            )));
        }
        Ok(reply)
    }
}

/// One `REP_INFO` payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Info {
    /// Size in bytes and transmission flags.
    Export {
        /// Bytes.
        size: u64,
        /// `TRANSMIT_*` flags.
        flags: u16,
    },
    /// Block size constraints.
    BlockSize {
        /// Smallest request alignment.
        minimum: u32,
        /// Preferred request size.
        preferred: u32,
        /// Largest read or write payload.
        maximum: u32,
    },
    /// An info type this client does not use.
    Other(u16),
}

/// Decodes a `REP_INFO` payload.
pub fn parse_info(b: &[u8]) -> Result<Info, Error> {
    let kind = be16(b, 0).ok_or_else(|| bad("empty info reply"))?;
    match kind {
        INFO_EXPORT => match (b.len(), be64(b, 2), be16(b, 10)) {
            (12, Some(size), Some(flags)) => Ok(Info::Export { size, flags }),
            _ => Err(bad(format!("export info of {} bytes, expected 12", b.len()))),
        },
        INFO_BLOCK_SIZE => match (b.len(), be32(b, 2), be32(b, 6), be32(b, 10)) {
            (14, Some(minimum), Some(preferred), Some(maximum)) => {
                Ok(Info::BlockSize { minimum, preferred, maximum })
            }
            _ => Err(bad(format!("block size info of {} bytes, expected 14", b.len()))),
        },
        other => Ok(Info::Other(other)),
    }
}

/// Decodes a `REP_META_CONTEXT` payload: the context's id and name.
pub fn parse_meta_context(b: &[u8]) -> Result<(u32, String), Error> {
    let id = be32(b, 0).ok_or_else(|| bad("short metadata context reply"))?;
    let name =
        std::str::from_utf8(&b[4..]).map_err(|_| bad("metadata context name is not UTF-8"))?;
    Ok((id, name.to_owned()))
}

/// Decodes an option error's payload (a message, possibly empty).
pub fn option_error_text(kind: u32, b: &[u8]) -> String {
    let name = match kind & !REP_FLAG_ERROR {
        1 => "unsupported option",
        2 => "policy",
        3 => "invalid",
        4 => "platform",
        5 => "TLS required",
        6 => "unknown export",
        7 => "shutting down",
        8 => "block size required",
        9 => "too big",
        _ => "error",
    };
    let text = String::from_utf8_lossy(b);
    if text.is_empty() { name.to_owned() } else { format!("{name}: {text}") }
}

/// The fixed part of a reply in transmission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply: an errno (0 for success); a read's data follows.
    Simple {
        /// Errno, 0 for success.
        error: u32,
        /// The request's handle.
        handle: u64,
    },
    /// One chunk of a structured reply.
    Chunk {
        /// `REPLY_FLAG_*`.
        flags: u16,
        /// `REPLY_*` type.
        kind: u16,
        /// The request's handle.
        handle: u64,
        /// Payload bytes that follow.
        len: u32,
    },
}

impl ReplyHeader {
    /// Bytes of a simple reply header.
    pub const SIMPLE_SIZE: usize = 16;
    /// Bytes of a structured chunk header.
    pub const CHUNK_SIZE: usize = 20;

    /// How many bytes the header starting with magic `magic` has in all.
    pub fn size_for_magic(magic: u32) -> Result<usize, Error> {
        match magic {
            SIMPLE_REPLY_MAGIC => Ok(Self::SIMPLE_SIZE),
            STRUCTURED_REPLY_MAGIC => Ok(Self::CHUNK_SIZE),
            other => Err(bad(format!("unknown reply magic {other:#010x}"))),
        }
    }

    /// Decodes a whole header (magic included).
    pub fn parse(b: &[u8]) -> Result<ReplyHeader, Error> {
        let magic = be32(b, 0).ok_or_else(|| bad("short reply header"))?;
        if b.len() != Self::size_for_magic(magic)? {
            return Err(bad("reply header of the wrong size"));
        }
        Ok(match magic {
            SIMPLE_REPLY_MAGIC => ReplyHeader::Simple {
                error: be32(b, 4).unwrap_or(0),
                handle: be64(b, 8).unwrap_or(0),
            },
            _ => ReplyHeader::Chunk {
                flags: be16(b, 4).unwrap_or(0),
                kind: be16(b, 6).unwrap_or(0),
                handle: be64(b, 8).unwrap_or(0),
                len: be32(b, 16).unwrap_or(0),
            },
        })
    }
}

/// A `REPLY_OFFSET_HOLE` payload: offset and length.
pub fn parse_hole(b: &[u8]) -> Result<(u64, u32), Error> {
    match (b.len(), be64(b, 0), be32(b, 8)) {
        (12, Some(offset), Some(len)) if len > 0 => Ok((offset, len)),
        _ => Err(bad("malformed hole chunk")),
    }
}

/// An error chunk's payload: errno, message, and the offset for `REPLY_ERROR_OFFSET`.
pub fn parse_error_chunk(kind: u16, b: &[u8]) -> Result<(u32, String, Option<u64>), Error> {
    let errno = be32(b, 0).ok_or_else(|| bad("short error chunk"))?;
    let msg_len = be16(b, 4).ok_or_else(|| bad("short error chunk"))? as usize;
    let msg = b.get(6..6 + msg_len).ok_or_else(|| bad("error message runs past its chunk"))?;
    let rest = &b[6 + msg_len..];
    let offset = match (kind, rest.len()) {
        (REPLY_ERROR_OFFSET, 8) => be64(rest, 0),
        (REPLY_ERROR, 0) => None,
        _ => return Err(bad("error chunk of the wrong size")),
    };
    Ok((errno, String::from_utf8_lossy(msg).into_owned(), offset))
}

/// One extent of a `REPLY_BLOCK_STATUS` chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusDescriptor {
    /// Bytes.
    pub len: u32,
    /// The context's `STATE_*` flags.
    pub flags: u32,
}

/// A `REPLY_BLOCK_STATUS` payload: the context id and its extents, in order.
pub fn parse_block_status(b: &[u8]) -> Result<(u32, Vec<StatusDescriptor>), Error> {
    let id = be32(b, 0).ok_or_else(|| bad("short block status chunk"))?;
    let rest = &b[4..];
    if rest.is_empty() || !rest.len().is_multiple_of(8) {
        return Err(bad(format!("block status chunk of {} bytes", b.len())));
    }
    let mut out = Vec::with_capacity(rest.len() / 8);
    for d in rest.chunks_exact(8) {
        let len = be32(d, 0).unwrap_or(0);
        if len == 0 {
            return Err(bad("block status extent of length 0"));
        }
        out.push(StatusDescriptor { len, flags: be32(d, 4).unwrap_or(0) });
    }
    Ok((id, out))
}

/// A request header.
pub fn request(kind: u16, flags: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

/// An option: `IHAVEOPT`, the option, its length and data.
pub fn option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// Appends a length-prefixed (u32) string.
pub fn push_string(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u32).to_be_bytes());
    b.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_must_be_fixed_newstyle() {
        let mut g = Vec::new();
        g.extend_from_slice(&NBD_MAGIC.to_be_bytes());
        g.extend_from_slice(&IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&3u16.to_be_bytes());
        assert_eq!(parse_greeting(&g).unwrap(), 3);
        g[17] = 0;
        assert!(parse_greeting(&g).unwrap_err().to_string().contains("fixed newstyle"));
        g[0] = 0;
        assert!(parse_greeting(&g).unwrap_err().to_string().contains("not an NBD server"));
    }

    #[test]
    fn block_status_decodes_and_refuses_bad_lengths() {
        let mut b = 7u32.to_be_bytes().to_vec();
        for (len, flags) in [(65536u32, 0u32), (4096, 1)] {
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(&flags.to_be_bytes());
        }
        let (id, d) = parse_block_status(&b).unwrap();
        assert_eq!(id, 7);
        assert_eq!(
            d,
            vec![
                StatusDescriptor { len: 65536, flags: 0 },
                StatusDescriptor { len: 4096, flags: 1 }
            ]
        );
        assert!(parse_block_status(&b[..10]).is_err());
        assert!(parse_block_status(&b[..4]).is_err());
    }

    #[test]
    fn error_chunks_carry_their_message() {
        let mut b = 5u32.to_be_bytes().to_vec();
        b.extend_from_slice(&3u16.to_be_bytes());
        b.extend_from_slice(b"EIO");
        assert_eq!(parse_error_chunk(REPLY_ERROR, &b).unwrap(), (5, "EIO".into(), None));
        b.extend_from_slice(&9u64.to_be_bytes());
        assert_eq!(parse_error_chunk(REPLY_ERROR_OFFSET, &b).unwrap().2, Some(9));
        assert!(parse_error_chunk(REPLY_ERROR, &b).is_err());
    }

    proptest! {
        /// No decoder panics on any input.
        #[test]
        fn decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64), kind in any::<u16>()) {
            let _ = parse_greeting(&b);
            let _ = OptionReply::parse(&b, 7);
            let _ = parse_info(&b);
            let _ = parse_meta_context(&b);
            let _ = ReplyHeader::parse(&b);
            let _ = parse_hole(&b);
            let _ = parse_error_chunk(kind, &b);
            let _ = parse_block_status(&b);
        }

        /// A request header round-trips its fields.
        #[test]
        fn request_layout(kind in any::<u16>(), flags in any::<u16>(), h in any::<u64>(), o in any::<u64>(), l in any::<u32>()) {
            let r = request(kind, flags, h, o, l);
            prop_assert_eq!(be32(&r, 0), Some(REQUEST_MAGIC));
            prop_assert_eq!(be16(&r, 4), Some(flags));
            prop_assert_eq!(be16(&r, 6), Some(kind));
            prop_assert_eq!(be64(&r, 8), Some(h));
            prop_assert_eq!(be64(&r, 16), Some(o));
            prop_assert_eq!(be32(&r, 24), Some(l));
        }

        /// Block status chunks built from descriptors decode to the same descriptors.
        #[test]
        fn block_status_round_trip(id in any::<u32>(), d in proptest::collection::vec((1u32.., any::<u32>()), 1..20)) {
            let mut b = id.to_be_bytes().to_vec();
            for (len, flags) in &d {
                b.extend_from_slice(&len.to_be_bytes());
                b.extend_from_slice(&flags.to_be_bytes());
            }
            let (got_id, got) = parse_block_status(&b).unwrap();
            prop_assert_eq!(got_id, id);
            prop_assert_eq!(got.iter().map(|s| (s.len, s.flags)).collect::<Vec<_>>(), d);
        }
    }
}
