//! A synchronous NBD client: fixed-newstyle negotiation, structured replies, reads and
//! `BLOCK_STATUS`, one request in flight at a time.
//!
//! One request at a time keeps the client small and its replies trivially matched; the engine
//! reads each disk from one thread in large requests, so the round trips do not show.

use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::Error;
use crate::proto::{self, Info, OptionReply, ReplyHeader, StatusDescriptor};

/// Largest non-data chunk payload accepted (block status, errors): bounds memory against a
/// hostile server.
const MAX_META_PAYLOAD: u32 = 16 << 20;
/// Largest read sent when the server names no maximum (the protocol's default).
const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;
/// Largest range asked for in one `BLOCK_STATUS`.
const MAX_STATUS_RANGE: u64 = 1 << 30;

/// What the server said about its export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Export {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Largest payload of one read.
    pub max_payload: u32,
}

/// One extent of a metadata context: `[offset, offset + len)` has `flags`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusExtent {
    /// Start, in bytes.
    pub offset: u64,
    /// Length, in bytes.
    pub len: u64,
    /// The context's flags (`proto::STATE_*`).
    pub flags: u32,
}

/// A connected client in the transmission phase.
pub struct Client<R, W> {
    reader: R,
    writer: W,
    server: String,
    export: Export,
    contexts: Vec<(u32, String)>,
    next_handle: u64,
}

impl Client<BufReader<UnixStream>, UnixStream> {
    /// Connects to the server on unix socket `path` and negotiates `export` with the
    /// metadata `contexts` (such as `base:allocation`, `qemu:dirty-bitmap:NAME`).
    pub fn connect_unix(path: &Path, export: &str, contexts: &[String]) -> Result<Self, Error> {
        let server = path.display().to_string();
        let stream = UnixStream::connect(path).map_err(Error::io(&server))?;
        let writer = stream.try_clone().map_err(Error::io(&server))?;
        Client::handshake(
            BufReader::with_capacity(256 << 10, stream),
            writer,
            server,
            export,
            contexts,
        )
    }
}

impl<R: Read, W: Write> Client<R, W> {
    /// Negotiates over an established connection; `server` names it in errors.
    pub fn handshake(
        mut reader: R,
        mut writer: W,
        server: String,
        export: &str,
        contexts: &[String],
    ) -> Result<Self, Error> {
        let io = |e| Error::Io { server: server.clone(), source: e };
        let mut greeting = [0u8; 18];
        reader.read_exact(&mut greeting).map_err(io)?;
        let flags = proto::parse_greeting(&greeting)?;
        let client_flags = u32::from(flags & (proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES));
        writer.write_all(&client_flags.to_be_bytes()).map_err(io)?;

        let mut nego = Negotiation { reader: &mut reader, writer: &mut writer, server: &server };
        nego.send(proto::OPT_STRUCTURED_REPLY, &[])?;
        nego.expect_ack(proto::OPT_STRUCTURED_REPLY, "structured replies")?;

        let mut agreed = Vec::new();
        if !contexts.is_empty() {
            let mut data = Vec::new();
            proto::push_string(&mut data, export);
            data.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
            for c in contexts {
                proto::push_string(&mut data, c);
            }
            nego.send(proto::OPT_SET_META_CONTEXT, &data)?;
            loop {
                let (reply, payload) =
                    nego.reply(proto::OPT_SET_META_CONTEXT, "metadata contexts")?;
                match reply.kind {
                    proto::REP_META_CONTEXT => agreed.push(proto::parse_meta_context(&payload)?),
                    proto::REP_ACK => break,
                    other => {
                        return Err(Error::Protocol(format!(
                            "unexpected reply {other} to SET_META_CONTEXT"
                        )));
                    }
                }
            }
            for c in contexts {
                if !agreed.iter().any(|(_, name)| name == c) {
                    return Err(Error::Refused {
                        option: "metadata contexts",
                        message: format!("the server does not offer {c:?} for export {export:?}"),
                    });
                }
            }
        }

        let mut data = Vec::new();
        proto::push_string(&mut data, export);
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
        nego.send(proto::OPT_GO, &data)?;
        let mut size_flags = None;
        let mut max_payload = DEFAULT_MAX_PAYLOAD;
        loop {
            let (reply, payload) = nego.reply(proto::OPT_GO, "export")?;
            match reply.kind {
                proto::REP_INFO => match proto::parse_info(&payload)? {
                    Info::Export { size, flags } => size_flags = Some((size, flags)),
                    Info::BlockSize { maximum, .. } => {
                        max_payload = maximum.clamp(4096, DEFAULT_MAX_PAYLOAD)
                    }
                    Info::Other(_) => {}
                },
                proto::REP_ACK => break,
                other => return Err(Error::Protocol(format!("unexpected reply {other} to GO"))),
            }
        }
        let (size, flags) = size_flags
            .ok_or_else(|| Error::Protocol("the server sent no export size before GO".into()))?;
        Ok(Client {
            reader,
            writer,
            server,
            export: Export { size, flags, max_payload },
            contexts: agreed,
            next_handle: 1,
        })
    }

    /// The export's size and flags.
    pub fn export(&self) -> Export {
        self.export
    }

    /// Fills `buf` from `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        if offset.checked_add(buf.len() as u64).is_none_or(|end| end > self.export.size) {
            return Err(Error::Protocol(format!("read past the end of the export at {offset}")));
        }
        let max = self.export.max_payload as usize;
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(max);
            self.read_one(offset + done as u64, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn read_one(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let handle = self.send(proto::CMD_READ, offset, buf.len() as u32)?;
        let mut covered = 0u64;
        let mut failure = None;
        loop {
            match self.header(handle)? {
                ReplyHeader::Simple { error, .. } => {
                    if error != 0 {
                        return Err(command_error("READ", offset, error, String::new()));
                    }
                    self.reader.read_exact(buf).map_err(self.io_err())?;
                    return Ok(());
                }
                ReplyHeader::Chunk { flags, kind, len, .. } => {
                    match kind {
                        proto::REPLY_OFFSET_DATA => {
                            let n = len.checked_sub(8).map(u64::from).ok_or_else(|| {
                                Error::Protocol("data chunk shorter than its offset".into())
                            })?;
                            let at = self.read_u64()?;
                            let start = range_in(offset, buf.len(), at, n)?;
                            self.reader
                                .read_exact(&mut buf[start..start + n as usize])
                                .map_err(self.io_err())?;
                            covered += n;
                        }
                        proto::REPLY_OFFSET_HOLE => {
                            let payload = self.payload(len)?;
                            let (at, n) = proto::parse_hole(&payload)?;
                            let start = range_in(offset, buf.len(), at, u64::from(n))?;
                            buf[start..start + n as usize].fill(0);
                            covered += u64::from(n);
                        }
                        _ => self.other_chunk(kind, len, &mut failure)?,
                    }
                    if flags & proto::REPLY_FLAG_DONE != 0 {
                        break;
                    }
                }
            }
        }
        if let Some((errno, message)) = failure {
            return Err(command_error("READ", offset, errno, message));
        }
        if covered != buf.len() as u64 {
            return Err(Error::Protocol(format!(
                "READ at {offset}: the reply covered {covered} of {} bytes",
                buf.len()
            )));
        }
        Ok(())
    }

    /// The extents of metadata context `context` over `[offset, offset + len)`, in order and
    /// covering the whole range (the last one clipped to it).
    pub fn block_status(
        &mut self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<StatusExtent>, Error> {
        let id =
            self.contexts.iter().find(|(_, name)| name == context).map(|(id, _)| *id).ok_or_else(
                || Error::Protocol(format!("metadata context {context:?} was not negotiated")),
            )?;
        let end = offset.saturating_add(len).min(self.export.size);
        let mut out: Vec<StatusExtent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let ask = (end - pos).min(MAX_STATUS_RANGE) as u32;
            let got = self.status_once(id, pos, ask)?;
            for d in got {
                if pos >= end {
                    break;
                }
                let n = u64::from(d.len).min(end - pos);
                match out.last_mut() {
                    Some(last) if last.flags == d.flags && last.offset + last.len == pos => {
                        last.len += n
                    }
                    _ => out.push(StatusExtent { offset: pos, len: n, flags: d.flags }),
                }
                pos += n;
            }
        }
        Ok(out)
    }

    fn status_once(
        &mut self,
        id: u32,
        offset: u64,
        len: u32,
    ) -> Result<Vec<StatusDescriptor>, Error> {
        let handle = self.send(proto::CMD_BLOCK_STATUS, offset, len)?;
        let mut mine = None;
        let mut failure = None;
        loop {
            match self.header(handle)? {
                ReplyHeader::Simple { error, .. } => {
                    return Err(if error != 0 {
                        command_error("BLOCK_STATUS", offset, error, String::new())
                    } else {
                        Error::Protocol("BLOCK_STATUS answered with a simple reply".into())
                    });
                }
                ReplyHeader::Chunk { flags, kind, len, .. } => {
                    if kind == proto::REPLY_BLOCK_STATUS {
                        let payload = self.payload(len)?;
                        let (ctx, descriptors) = proto::parse_block_status(&payload)?;
                        if ctx == id {
                            mine = Some(descriptors);
                        }
                    } else {
                        self.other_chunk(kind, len, &mut failure)?;
                    }
                    if flags & proto::REPLY_FLAG_DONE != 0 {
                        break;
                    }
                }
            }
        }
        if let Some((errno, message)) = failure {
            return Err(command_error("BLOCK_STATUS", offset, errno, message));
        }
        mine.ok_or_else(|| {
            Error::Protocol(format!("BLOCK_STATUS at {offset}: no extents for the context"))
        })
    }

    /// Ends the session politely.
    pub fn disconnect(mut self) {
        let handle = self.next_handle;
        let _ = self.writer.write_all(&proto::request(proto::CMD_DISC, 0, handle, 0, 0));
        let _ = self.writer.flush();
    }

    fn send(&mut self, kind: u16, offset: u64, len: u32) -> Result<u64, Error> {
        let handle = self.next_handle;
        self.next_handle += 1;
        self.writer
            .write_all(&proto::request(kind, 0, handle, offset, len))
            .and_then(|()| self.writer.flush())
            .map_err(self.io_err())?;
        Ok(handle)
    }

    fn header(&mut self, handle: u64) -> Result<ReplyHeader, Error> {
        let mut b = [0u8; ReplyHeader::CHUNK_SIZE];
        self.reader.read_exact(&mut b[..4]).map_err(self.io_err())?;
        let size = ReplyHeader::size_for_magic(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))?;
        self.reader.read_exact(&mut b[4..size]).map_err(self.io_err())?;
        let header = ReplyHeader::parse(&b[..size])?;
        let got = match header {
            ReplyHeader::Simple { handle, .. } | ReplyHeader::Chunk { handle, .. } => handle,
        };
        if got != handle {
            return Err(Error::Protocol(format!(
                "reply for handle {got} while waiting for {handle}"
            )));
        }
        Ok(header)
    }

    /// Handles a chunk that is neither data nor status: errors are kept, the end is accepted.
    fn other_chunk(
        &mut self,
        kind: u16,
        len: u32,
        failure: &mut Option<(u32, String)>,
    ) -> Result<(), Error> {
        match kind {
            proto::REPLY_NONE if len == 0 => Ok(()),
            proto::REPLY_ERROR | proto::REPLY_ERROR_OFFSET => {
                let payload = self.payload(len)?;
                let (errno, msg, _) = proto::parse_error_chunk(kind, &payload)?;
                let message = if msg.is_empty() { String::new() } else { format!(": {msg}") };
                failure.get_or_insert((errno, message));
                Ok(())
            }
            other => {
                Err(Error::Protocol(format!("unexpected reply chunk type {other} of {len} bytes")))
            }
        }
    }

    fn payload(&mut self, len: u32) -> Result<Vec<u8>, Error> {
        if len > MAX_META_PAYLOAD {
            return Err(Error::Protocol(format!("reply chunk of {len} bytes is too large")));
        }
        let mut b = vec![0u8; len as usize];
        self.reader.read_exact(&mut b).map_err(self.io_err())?;
        Ok(b)
    }

    fn read_u64(&mut self) -> Result<u64, Error> {
        let mut b = [0u8; 8];
        self.reader.read_exact(&mut b).map_err(self.io_err())?;
        Ok(u64::from_be_bytes(b))
    }

    fn io_err(&self) -> impl FnOnce(std::io::Error) -> Error + '_ {
        Error::io(&self.server)
    }
}

/// Where `[at, at + n)` starts inside a buffer for `[offset, offset + len)`, if it lies within.
fn range_in(offset: u64, len: usize, at: u64, n: u64) -> Result<usize, Error> {
    let start = at.checked_sub(offset);
    match start.and_then(|s| s.checked_add(n).map(|e| (s, e))) {
        Some((s, e)) if e <= len as u64 => Ok(s as usize),
        _ => Err(Error::Protocol(format!(
            "reply chunk [{at}, +{n}) lies outside the request [{offset}, +{len})"
        ))),
    }
}

fn command_error(command: &'static str, offset: u64, errno: u32, message: String) -> Error {
    Error::Command { command, offset, errno, message }
}

struct Negotiation<'a, R, W> {
    reader: &'a mut R,
    writer: &'a mut W,
    server: &'a str,
}

impl<R: Read, W: Write> Negotiation<'_, R, W> {
    fn send(&mut self, option: u32, data: &[u8]) -> Result<(), Error> {
        self.writer
            .write_all(&proto::option(option, data))
            .and_then(|()| self.writer.flush())
            .map_err(Error::io(self.server))
    }

    fn reply(&mut self, option: u32, what: &'static str) -> Result<(OptionReply, Vec<u8>), Error> {
        let mut b = [0u8; OptionReply::SIZE];
        self.reader.read_exact(&mut b).map_err(Error::io(self.server))?;
        let reply = OptionReply::parse(&b, option)?;
        if reply.len > MAX_META_PAYLOAD {
            return Err(Error::Protocol(format!(
                "option reply of {} bytes is too large",
                reply.len
            )));
        }
        let mut payload = vec![0u8; reply.len as usize];
        self.reader.read_exact(&mut payload).map_err(Error::io(self.server))?;
        if reply.kind & proto::REP_FLAG_ERROR != 0 {
            return Err(Error::Refused {
                option: what,
                message: proto::option_error_text(reply.kind, &payload),
            });
        }
        Ok((reply, payload))
    }

    fn expect_ack(&mut self, option: u32, what: &'static str) -> Result<(), Error> {
        let (reply, _) = self.reply(option, what)?;
        if reply.kind != proto::REP_ACK {
            return Err(Error::Protocol(format!("expected an acknowledgement of {what}")));
        }
        Ok(())
    }
}
