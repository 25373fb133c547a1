//! The client's half of the NBD wire format, as a server reads it: options during
//! negotiation and requests during transmission.
//!
//! Every decoder takes the bytes as received and returns an error, never panics: whatever
//! connects to an export is untrusted (fuzzed by `fuzz/fuzz_targets/nbd_server.rs`).

use crate::Error;

/// Option: choose the export by name and enter transmission (old style, no error reply).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: upgrade the connection to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export without entering transmission.
pub const OPT_INFO: u32 = 6;

/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply error: the option is not supported.
pub const REP_ERR_UNSUP: u32 = 1 | crate::proto::REP_FLAG_ERROR;
/// Option reply error: the option's data is malformed.
pub const REP_ERR_INVALID: u32 = 3 | crate::proto::REP_FLAG_ERROR;
/// Option reply error: the server serves only over TLS (`STARTTLS` first).
pub const REP_ERR_TLS_REQD: u32 = 5 | crate::proto::REP_FLAG_ERROR;
/// Option reply error: no export by that name.
pub const REP_ERR_UNKNOWN: u32 = 6 | crate::proto::REP_FLAG_ERROR;

/// Client flag: fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
/// Client flag: no 124 zero bytes after `EXPORT_NAME`'s reply.
pub const CLIENT_NO_ZEROES: u32 = 2;

/// Transmission flag: the flags are valid.
pub const TX_HAS_FLAGS: u16 = 1;
/// Transmission flag: the export is read-only.
pub const TX_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `FLUSH` is understood.
pub const TX_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: several connections see the same data (read-only: always true).
pub const TX_CAN_MULTI_CONN: u16 = 1 << 8;

/// Command: write.
pub const CMD_WRITE: u16 = 1;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim.
pub const CMD_TRIM: u16 = 4;
/// Command: cache (a hint to read ahead).
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;

/// The longest option data read (an export name is at most 4096 bytes; `INFO` and `GO` add
/// a few requests).
pub const MAX_OPTION_DATA: u32 = 8192;
/// The longest read served at once, and the longest write payload skipped (the protocol's
/// usual maximum payload).
pub const MAX_REQUEST: u32 = 32 << 20;

/// `EPERM`: the export is read-only.
pub const EPERM: u32 = 1;
/// `EIO`: the data could not be read.
pub const EIO: u32 = 5;
/// `EINVAL`: a bad request (out of range, too long, unknown).
pub const EINVAL: u32 = 22;

/// An option's header: what follows it is `len` bytes of data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option.
    pub option: u32,
    /// Bytes of data that follow.
    pub len: u32,
}

/// Decodes an option's 16-byte header (`IHAVEOPT`, option, length).
pub fn parse_option_header(b: &[u8]) -> Result<OptionHeader, Error> {
    let b: &[u8; 16] = b.try_into().map_err(|_| bad("an option header is 16 bytes"))?;
    if u64::from_be_bytes(b[0..8].try_into().unwrap_or_default()) != crate::proto::IHAVEOPT {
        return Err(bad("an option does not start with IHAVEOPT"));
    }
    Ok(OptionHeader { option: be32(&b[8..12]), len: be32(&b[12..16]) })
}

/// `INFO` and `GO`'s data: the export's name and the information asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export's name (empty: the default export).
    pub name: String,
    /// The `NBD_INFO_*` types asked for.
    pub requests: Vec<u16>,
}

/// Decodes `INFO` and `GO`'s data: name length (u32), name, count (u16), that many u16.
pub fn parse_info_request(b: &[u8]) -> Result<InfoRequest, Error> {
    let len = b.get(0..4).map(be32).ok_or_else(|| bad("INFO or GO is too short"))? as usize;
    let name = b.get(4..4 + len).ok_or_else(|| bad("INFO or GO's name runs past its data"))?;
    let name = String::from_utf8(name.to_vec()).map_err(|_| bad("an export name not in UTF-8"))?;
    let rest = &b[4 + len..];
    let count =
        rest.get(0..2).map(be16).ok_or_else(|| bad("INFO or GO has no request count"))? as usize;
    let list = &rest[2..];
    if list.len() != count * 2 {
        return Err(bad("INFO or GO's request count does not match its data"));
    }
    let requests = list.chunks_exact(2).map(be16).collect();
    Ok(InfoRequest { name, requests })
}

/// A request during transmission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// The command.
    pub command: u16,
    /// The client's handle, echoed in the reply.
    pub handle: u64,
    /// Where.
    pub offset: u64,
    /// How many bytes (for a write, the payload that follows).
    pub len: u32,
}

/// Decodes a request's 28 bytes.
pub fn parse_request(b: &[u8]) -> Result<Request, Error> {
    let b: &[u8; 28] = b.try_into().map_err(|_| bad("a request is 28 bytes"))?;
    if be32(&b[0..4]) != crate::proto::REQUEST_MAGIC {
        return Err(bad("a request does not start with the request magic"));
    }
    Ok(Request {
        flags: be16(&b[4..6]),
        command: be16(&b[6..8]),
        handle: u64::from_be_bytes(b[8..16].try_into().unwrap_or_default()),
        offset: u64::from_be_bytes(b[16..24].try_into().unwrap_or_default()),
        len: be32(&b[24..28]),
    })
}

/// What a read of an export of `size` bytes must be refused for, if anything.
pub fn check_read(request: &Request, size: u64) -> Result<(), &'static str> {
    if request.len == 0 {
        return Err("an empty read");
    }
    if request.len > MAX_REQUEST {
        return Err("a read longer than 32 MiB");
    }
    match request.offset.checked_add(u64::from(request.len)) {
        Some(end) if end <= size => Ok(()),
        _ => Err("a read past the end of the export"),
    }
}

/// An option reply: magic, option, reply type, length, data.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&crate::proto::OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// A simple reply's 16-byte header.
pub fn simple_reply(error: u32, handle: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&crate::proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().unwrap_or_default())
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b.try_into().unwrap_or_default())
}

fn bad(what: &str) -> Error {
    Error::Protocol(format!("client sent {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_and_options_decode() {
        let mut r = crate::proto::REQUEST_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&crate::proto::CMD_READ.to_be_bytes());
        r.extend_from_slice(&7u64.to_be_bytes());
        r.extend_from_slice(&4096u64.to_be_bytes());
        r.extend_from_slice(&512u32.to_be_bytes());
        let req = parse_request(&r).unwrap();
        assert_eq!((req.command, req.handle, req.offset, req.len), (0, 7, 4096, 512));
        assert!(check_read(&req, 4608).is_ok());
        assert!(check_read(&req, 4607).is_err());
        assert!(check_read(&Request { offset: u64::MAX, ..req }, u64::MAX).is_err());
        assert!(check_read(&Request { len: 0, ..req }, 1 << 20).is_err());
        assert!(check_read(&Request { len: MAX_REQUEST + 1, offset: 0, ..req }, u64::MAX).is_err());
        r[0] ^= 1;
        assert!(parse_request(&r).is_err());
        assert!(parse_request(&r[..27]).is_err());

        let mut go = 2u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"os");
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&3u16.to_be_bytes());
        let info = parse_info_request(&go).unwrap();
        assert_eq!(info, InfoRequest { name: "os".into(), requests: vec![3] });
        assert!(parse_info_request(&go[..go.len() - 1]).is_err());
        let mut long = u32::MAX.to_be_bytes().to_vec();
        long.extend_from_slice(b"x");
        assert!(parse_info_request(&long).is_err());

        let mut h = crate::proto::IHAVEOPT.to_be_bytes().to_vec();
        h.extend_from_slice(&7u32.to_be_bytes());
        h.extend_from_slice(&9u32.to_be_bytes());
        assert_eq!(parse_option_header(&h).unwrap(), OptionHeader { option: 7, len: 9 });
        h[0] = 0;
        assert!(parse_option_header(&h).is_err());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_option_header(&bytes);
            let _ = parse_info_request(&bytes);
            if let Ok(r) = parse_request(&bytes) {
                let _ = check_read(&r, u64::MAX);
            }
        }

        #[test]
        fn names_round_trip(name in "[a-z0-9-]{0,40}", requests in proptest::collection::vec(any::<u16>(), 0..8)) {
            let mut b = (name.len() as u32).to_be_bytes().to_vec();
            b.extend_from_slice(name.as_bytes());
            b.extend_from_slice(&(requests.len() as u16).to_be_bytes());
            for r in &requests {
                b.extend_from_slice(&r.to_be_bytes());
            }
            prop_assert_eq!(parse_info_request(&b).unwrap(), InfoRequest { name, requests });
        }
    }
}
