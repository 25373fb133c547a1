//! A read-only NBD server for one export: what an instant restore serves a point's disk on,
//! so that `qemu-img`, `nbdcopy` or a QEMU guest read it before anything has been copied.
//!
//! Fixed-newstyle negotiation with the options `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`
//! and `STRUCTURED_REPLY` (reads are then answered with one data or error chunk); anything
//! else is answered "unsupported". A server given a TLS configuration ([`Server::with_tls`])
//! answers every option of a TCP client but `STARTTLS` and `ABORT` with "TLS required", and
//! negotiates the rest over TLS (`tls.rs`). In transmission, reads go to a few worker threads per connection and are answered
//! as they complete, within a byte budget shared by every connection; `WRITE`, `TRIM` and
//! `WRITE_ZEROES` are refused with `EPERM` (a guest booting from the export writes to its
//! own overlay), `FLUSH` succeeds, and anything else (`CACHE` included: it is not offered)
//! is `EINVAL`. A client that breaks the protocol is disconnected; one that goes away
//! mid-read costs only its own connection; one that stops reading its replies is cut off
//! after [`WRITE_TIMEOUT`], and one that does not finish negotiating after
//! [`NEGOTIATION_TIMEOUT`]. A server may be private: then only its export's exact name
//! reaches it and `LIST` names nothing (for TCP, where anyone on the host can connect). The crate has no async runtime: an
//! export backed by async code blocks on it from the server's threads.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::Duration;

use crate::Error;
use crate::proto::{
    CMD_DISC, CMD_READ, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_BLOCK_SIZE,
    INFO_EXPORT, NBD_MAGIC, OPT_ABORT, OPT_GO, OPT_STRUCTURED_REPLY, REP_ACK, REP_INFO,
    REPLY_ERROR, REPLY_FLAG_DONE, STRUCTURED_REPLY_MAGIC,
};
use crate::server_proto::*;

/// What an export serves: a fixed size of bytes, read at any offset.
pub trait ExportSource: Send + Sync + 'static {
    /// The export's size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `offset` (the range is within the size). An error is
    /// logged with its text, and the client gets `EIO` for that read.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String>;
    /// The size reads should come in (the export's block size), advertised to clients.
    fn preferred_block(&self) -> u32 {
        4096
    }
}

/// A connection the server can read from and write to at once.
pub trait Stream: Read + Write + Send + 'static {
    /// A second handle on the same connection (for the replies).
    fn try_clone_stream(&self) -> io::Result<Self>
    where
        Self: Sized;
    /// Ends the connection both ways.
    fn shut(&self);
    /// Ends the connection in good order (TLS says goodbye first); by default [`Stream::shut`].
    fn close(&self) {
        self.shut();
    }
    /// Limits how long a read or a write may wait (`None`: forever).
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()>;
}

/// The socket types the server listens with: their own methods do it all.
macro_rules! socket_stream {
    ($($t:ty),*) => {$(
        impl Stream for $t {
            fn try_clone_stream(&self) -> io::Result<Self> {
                self.try_clone()
            }
            fn shut(&self) {
                let _ = self.shutdown(std::net::Shutdown::Both);
            }
            fn set_timeouts(
                &self,
                read: Option<Duration>,
                write: Option<Duration>,
            ) -> io::Result<()> {
                self.set_read_timeout(read)?;
                self.set_write_timeout(write)
            }
        }
    )*};
}

socket_stream!(UnixStream, TcpStream);

/// How a negotiation ended.
enum Negotiated {
    /// The client chose the export; whether it asked for structured replies.
    Go(bool),
    /// The client left.
    Left,
    /// The client upgrades to TLS: negotiation goes on encrypted.
    StartTls,
}

/// Options one negotiation may send: real clients send a handful.
const MAX_OPTIONS: usize = 64;
/// Options a client may send before it upgrades to TLS (STARTTLS is the first a client that
/// knows sends).
const MAX_OPTIONS_BEFORE_TLS: usize = 4;

/// Shuts a connection that has not finished negotiating within [`NEGOTIATION_TIMEOUT`] in
/// all (a timeout per read alone lets a client that sends a byte now and then hold its slot
/// for ever).
struct Watchdog(mpsc::Sender<()>);

impl Watchdog {
    fn start<S: Stream>(stream: S) -> Watchdog {
        let (disarm, armed) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = armed.recv_timeout(NEGOTIATION_TIMEOUT) {
                tracing::info!("an NBD client did not finish negotiating in time: cut off");
                stream.shut();
            }
        });
        Watchdog(disarm)
    }

    fn disarm(self) {
        let _ = self.0.send(());
    }
}

/// How long a client may take to negotiate.
pub const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a reply may wait for the client to read it before the connection is cut.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Reads served at once per connection.
const WORKERS: usize = 4;
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 16;
/// Bytes of reads in flight across every connection.
const IN_FLIGHT_BYTES: u64 = 256 << 20;

/// The server of one export.
pub struct Server {
    name: String,
    /// Whether only the exact name reaches the export, and `LIST` names nothing.
    private: bool,
    export: Arc<dyn ExportSource>,
    connections: Arc<AtomicUsize>,
    budget: Arc<Budget>,
    /// Clients over TCP must upgrade to TLS (`STARTTLS`) before anything else.
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl Server {
    /// A server of `export` under the name `name` (a client asking for the empty name gets it
    /// too).
    pub fn new(name: &str, export: Arc<dyn ExportSource>) -> Server {
        Server {
            name: name.to_owned(),
            private: false,
            export,
            connections: Arc::new(AtomicUsize::new(0)),
            budget: Arc::new(Budget { used: Mutex::new(0), freed: Condvar::new() }),
            tls: None,
        }
    }

    /// This server, over TCP, for clients that upgrade to TLS with `config` first: any other
    /// option is answered "TLS required", and the export is reached only once encrypted.
    pub fn with_tls(mut self, config: Arc<rustls::ServerConfig>) -> Server {
        self.tls = Some(config);
        self
    }

    /// This server, reachable only by its export's exact name (a name hard to guess is then
    /// what a client must know), with `LIST` naming nothing.
    pub fn private(mut self) -> Server {
        self.private = true;
        self
    }

    /// Serves every client that connects to `listener`, each on its own thread. A failure
    /// to accept (too many open files, a connection aborted) is logged and waited out.
    pub fn serve_unix(self: &Arc<Self>, listener: UnixListener) -> io::Result<()> {
        loop {
            match listener.accept() {
                Ok((stream, _)) => self.spawn(stream, Server::serve_connection),
                Err(e) => accept_failed(e),
            }
        }
    }

    /// [`Server::serve_unix`] over TCP.
    pub fn serve_tcp(self: &Arc<Self>, listener: TcpListener) -> io::Result<()> {
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    match &self.tls {
                        Some(config) => {
                            let config = Arc::clone(config);
                            self.spawn(stream, move |server, s| server.serve_tls(s, config));
                        }
                        None => self.spawn(stream, Server::serve_connection),
                    }
                }
                Err(e) => accept_failed(e),
            }
        }
    }

    fn spawn<S: Stream>(
        self: &Arc<Self>,
        stream: S,
        serve: impl FnOnce(&Server, S) -> Result<(), Error> + Send + 'static,
    ) {
        if self.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            self.connections.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("more than {MAX_CONNECTIONS} NBD clients at once: one refused");
            stream.shut();
            return;
        }
        let server = Arc::clone(self);
        std::thread::spawn(move || {
            // Given back however the connection ends, a panic included.
            let _slot = Slot(&server.connections);
            if let Err(e) = serve(&server, stream) {
                tracing::info!("NBD client: {e}");
            }
        });
    }

    /// Serves one client to the end of its connection.
    pub fn serve_connection<S: Stream>(&self, mut stream: S) -> Result<(), Error> {
        stream.set_timeouts(Some(NEGOTIATION_TIMEOUT), Some(WRITE_TIMEOUT)).map_err(io_err)?;
        let watchdog = Watchdog::start(stream.try_clone_stream().map_err(io_err)?);
        let flags = self.greet(&mut stream);
        let entered = flags.and_then(|flags| self.negotiate(&mut stream, flags, false));
        watchdog.disarm();
        self.enter(stream, entered)
    }

    /// Serves one client over TCP that must upgrade to TLS with `config` first.
    fn serve_tls(
        &self,
        mut tcp: TcpStream,
        config: Arc<rustls::ServerConfig>,
    ) -> Result<(), Error> {
        tcp.set_timeouts(Some(NEGOTIATION_TIMEOUT), Some(WRITE_TIMEOUT)).map_err(io_err)?;
        // One deadline for the greeting, the handshake and the options together.
        let watchdog = Watchdog::start(tcp.try_clone().map_err(io_err)?);
        let flags = match self.greet(&mut tcp) {
            Ok(flags) => flags,
            Err(e) => {
                tcp.shut();
                return Err(e);
            }
        };
        match self.negotiate(&mut tcp, flags, true) {
            Ok(Negotiated::StartTls) => {}
            other => return self.enter(tcp, other),
        }
        let mut tls = match crate::tls::TlsStream::accept(config, tcp.try_clone().map_err(io_err)?)
        {
            Ok(tls) => tls,
            Err(e) => {
                tcp.shut();
                return Err(Error::Protocol(format!("the TLS handshake failed: {e}")));
            }
        };
        let entered = self.negotiate(&mut tls, flags, false);
        watchdog.disarm();
        self.enter(tls, entered)
    }

    /// After negotiating: serves the export the client chose, or ends the connection.
    fn enter<S: Stream>(&self, stream: S, entered: Result<Negotiated, Error>) -> Result<(), Error> {
        match entered {
            Ok(Negotiated::Go(structured)) => {
                // A client may sit idle between requests for as long as it likes (a booted
                // guest does); a reply it does not read still times out.
                stream.set_timeouts(None, Some(WRITE_TIMEOUT)).map_err(io_err)?;
                self.transmit(stream, structured)
            }
            Ok(Negotiated::Left) => Ok(()),
            Ok(Negotiated::StartTls) => {
                stream.shut();
                Err(Error::Protocol("client asked for TLS where none is offered".into()))
            }
            Err(e) => {
                stream.shut();
                Err(e)
            }
        }
    }

    /// The server's greeting and the client's flags.
    fn greet<S: Stream>(&self, s: &mut S) -> Result<u32, Error> {
        let mut hello = NBD_MAGIC.to_be_bytes().to_vec();
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        s.write_all(&hello).map_err(io_err)?;
        let flags = u32::from_be_bytes(read_n::<4, S>(s)?);
        if flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
            return Err(Error::Protocol(format!("client sent unknown flags {flags:#x}")));
        }
        Ok(flags)
    }

    /// The options, until the client chooses the export (whether it asked for structured
    /// replies), leaves, or, when `tls_first`, upgrades to TLS (only that or leaving is
    /// allowed then).
    fn negotiate<S: Stream>(
        &self,
        s: &mut S,
        flags: u32,
        tls_first: bool,
    ) -> Result<Negotiated, Error> {
        let mut structured = false;
        let no_zeroes = flags & CLIENT_NO_ZEROES != 0;
        let mut asked = 0usize;
        let tx_flags = TX_HAS_FLAGS | TX_READ_ONLY | TX_SEND_FLUSH | TX_CAN_MULTI_CONN;
        let size = self.export.size();
        loop {
            let header = parse_option_header(&read_n::<16, S>(s)?)?;
            if header.len > MAX_OPTION_DATA {
                return Err(Error::Protocol(format!(
                    "client sent an option of {} bytes (at most {MAX_OPTION_DATA})",
                    header.len
                )));
            }
            asked += 1;
            let most = if tls_first { MAX_OPTIONS_BEFORE_TLS } else { MAX_OPTIONS };
            if asked > most {
                return Err(Error::Protocol(format!("client sent more than {most} options")));
            }
            let mut data = vec![0u8; header.len as usize];
            s.read_exact(&mut data).map_err(io_err)?;
            let reply = |s: &mut S, kind: u32, data: &[u8]| {
                s.write_all(&option_reply(header.option, kind, data)).map_err(io_err)
            };
            if tls_first {
                match header.option {
                    OPT_STARTTLS if data.is_empty() => {
                        reply(s, REP_ACK, &[])?;
                        return Ok(Negotiated::StartTls);
                    }
                    OPT_STARTTLS => reply(s, REP_ERR_INVALID, &[])?,
                    OPT_ABORT => {
                        reply(s, REP_ACK, &[])?;
                        return Ok(Negotiated::Left);
                    }
                    // Answered by closing: `EXPORT_NAME` has no error reply.
                    OPT_EXPORT_NAME => {
                        return Err(Error::Protocol(
                            "client asked for the export without TLS".into(),
                        ));
                    }
                    _ => reply(s, REP_ERR_TLS_REQD, b"this export is served over TLS only")?,
                }
                continue;
            }
            match header.option {
                OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data);
                    if !self.is_ours(&name) {
                        return Err(Error::Protocol(format!("client asked for export {name:?}")));
                    }
                    let mut b = size.to_be_bytes().to_vec();
                    b.extend_from_slice(&tx_flags.to_be_bytes());
                    if !no_zeroes {
                        b.extend_from_slice(&[0u8; 124]);
                    }
                    s.write_all(&b).map_err(io_err)?;
                    return Ok(Negotiated::Go(structured));
                }
                OPT_ABORT => {
                    reply(s, REP_ACK, &[])?;
                    return Ok(Negotiated::Left);
                }
                OPT_STRUCTURED_REPLY if data.is_empty() => {
                    structured = true;
                    reply(s, REP_ACK, &[])?;
                }
                OPT_LIST if data.is_empty() => {
                    if !self.private {
                        let mut b = (self.name.len() as u32).to_be_bytes().to_vec();
                        b.extend_from_slice(self.name.as_bytes());
                        reply(s, REP_SERVER, &b)?;
                    }
                    reply(s, REP_ACK, &[])?;
                }
                OPT_INFO | OPT_GO => {
                    let request = match parse_info_request(&data) {
                        Ok(r) => r,
                        Err(_) => {
                            reply(s, REP_ERR_INVALID, &[])?;
                            continue;
                        }
                    };
                    if !self.is_ours(&request.name) {
                        reply(s, REP_ERR_UNKNOWN, b"no such export")?;
                        continue;
                    }
                    let mut export = INFO_EXPORT.to_be_bytes().to_vec();
                    export.extend_from_slice(&size.to_be_bytes());
                    export.extend_from_slice(&tx_flags.to_be_bytes());
                    reply(s, REP_INFO, &export)?;
                    if request.requests.contains(&INFO_BLOCK_SIZE) {
                        let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                        let preferred = self.export.preferred_block().clamp(512, MAX_REQUEST);
                        for v in [1u32, preferred, MAX_REQUEST] {
                            b.extend_from_slice(&v.to_be_bytes());
                        }
                        reply(s, REP_INFO, &b)?;
                    }
                    reply(s, REP_ACK, &[])?;
                    if header.option == OPT_GO {
                        return Ok(Negotiated::Go(structured));
                    }
                }
                // STARTTLS once encrypted is invalid; without TLS offered, unsupported.
                OPT_STARTTLS if self.tls.is_some() => reply(s, REP_ERR_INVALID, &[])?,
                OPT_LIST | OPT_STRUCTURED_REPLY => reply(s, REP_ERR_INVALID, &[])?,
                _ => reply(s, REP_ERR_UNSUP, &[])?,
            }
        }
    }

    fn is_ours(&self, name: &str) -> bool {
        (name.is_empty() && !self.private) || name == self.name
    }

    /// Requests until the client disconnects.
    fn transmit<S: Stream>(&self, mut s: S, structured: bool) -> Result<(), Error> {
        let writer = Arc::new(Mutex::new(s.try_clone_stream().map_err(io_err)?));
        let (to_workers, requests) = mpsc::sync_channel::<Request>(WORKERS * 2);
        let requests = Arc::new(Mutex::new(requests));
        let workers: Vec<_> = (0..WORKERS)
            .map(|_| {
                let (requests, writer) = (Arc::clone(&requests), Arc::clone(&writer));
                let (export, budget) = (Arc::clone(&self.export), Arc::clone(&self.budget));
                std::thread::spawn(move || {
                    serve_reads(&requests, &writer, &*export, &budget, structured)
                })
            })
            .collect();
        let size = self.export.size();
        let outcome = loop {
            let request = match read_n::<28, S>(&mut s).and_then(|b| parse_request(&b)) {
                Ok(r) => r,
                Err(e) => break Err(e),
            };
            let answer = |error: u32| reply(&writer, error, request.handle, &[]);
            let done = match request.command {
                CMD_READ => match check_read(&request, size) {
                    Ok(()) => match to_workers.send(request) {
                        Ok(()) => Ok(()),
                        Err(_) => break Err(Error::Protocol("the readers stopped".into())),
                    },
                    Err(why) => {
                        tracing::debug!("refused {why}");
                        // Once structured replies are agreed, a read is answered by chunks.
                        match structured {
                            true => send(&writer, &error_chunk(request.handle, EINVAL, why), &[]),
                            false => answer(EINVAL),
                        }
                    }
                },
                CMD_WRITE => {
                    if request.len > MAX_REQUEST {
                        break Err(Error::Protocol("client sent a write over 32 MiB".into()));
                    }
                    // The payload is read and dropped: the export is read-only.
                    let skipped =
                        io::copy(&mut (&mut s).take(u64::from(request.len)), &mut io::sink());
                    match skipped {
                        Ok(n) if n == u64::from(request.len) => answer(EPERM),
                        Ok(_) => break Ok(()),
                        Err(e) => break Err(io_err(e)),
                    }
                }
                CMD_DISC => break Ok(()),
                CMD_FLUSH => answer(0),
                CMD_TRIM | CMD_WRITE_ZEROES => answer(EPERM),
                _ => answer(EINVAL),
            };
            if let Err(e) = done {
                break Err(e);
            }
        };
        drop(to_workers);
        // Shut first on a failure: a worker stuck writing to a client that reads nothing is
        // freed at once.
        if outcome.is_err() {
            s.shut();
        }
        for w in workers {
            let _ = w.join();
        }
        s.close();
        match outcome {
            // The client went away: that is how many clients end.
            Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::UnexpectedEof => {
                Ok(())
            }
            other => other,
        }
    }
}

/// A worker: reads requests from the queue, answers each.
fn serve_reads<S: Stream>(
    requests: &Mutex<mpsc::Receiver<Request>>,
    writer: &Mutex<S>,
    export: &dyn ExportSource,
    budget: &Budget,
    structured: bool,
) {
    loop {
        let next = requests.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(request) = next else { return };
        let len = u64::from(request.len);
        let _held = budget.take(len);
        let mut buf = vec![0u8; request.len as usize];
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            export.read_at(request.offset, &mut buf)
        }))
        .unwrap_or_else(|_| Err("the read panicked".into()));
        let sent = match (read, structured) {
            (Ok(()), false) => reply(writer, 0, request.handle, &buf),
            (Ok(()), true) => {
                let mut head = offset_data_chunk(request.handle, request.len).to_vec();
                head.extend_from_slice(&request.offset.to_be_bytes());
                send(writer, &head, &buf)
            }
            (Err(e), structured) => {
                // The reason, which may name vault objects, stays in the server's log.
                tracing::warn!(offset = request.offset, len, "NBD read failed: {e}");
                match structured {
                    false => reply(writer, EIO, request.handle, &[]),
                    true => send(writer, &error_chunk(request.handle, EIO, UNREADABLE), &[]),
                }
            }
        };
        drop(buf);
        if sent.is_err() {
            // The client is gone: the main loop sees it too.
            writer.lock().unwrap_or_else(|p| p.into_inner()).shut();
            return;
        }
    }
}

/// A simple reply, written whole under the writer's lock.
fn reply<S: Stream>(writer: &Mutex<S>, error: u32, handle: u64, data: &[u8]) -> Result<(), Error> {
    send(writer, &simple_reply(error, handle), data)
}

/// A reply's header and data, written whole under the writer's lock.
fn send<S: Stream>(writer: &Mutex<S>, head: &[u8], data: &[u8]) -> Result<(), Error> {
    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
    w.write_all(head).map_err(io_err)?;
    if !data.is_empty() {
        w.write_all(data).map_err(io_err)?;
    }
    w.flush().map_err(io_err)
}

/// A structured reply's last chunk header: `kind` with `len` bytes of payload.
fn chunk_header(handle: u64, kind: u16, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// The header of a read's one data chunk (its offset follows, then the data).
fn offset_data_chunk(handle: u64, len: u32) -> [u8; 20] {
    chunk_header(handle, crate::proto::REPLY_OFFSET_DATA, len + 8)
}

/// What a client is told of a failed read.
const UNREADABLE: &str = "this block could not be read from the vault (the server's log says why)";

/// A read's one error chunk: the errno and a message (short, whole characters).
fn error_chunk(handle: u64, errno: u32, message: &str) -> Vec<u8> {
    let mut cut = message.len().min(1024);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let message = &message.as_bytes()[..cut];
    let mut b = chunk_header(handle, REPLY_ERROR, 6 + message.len() as u32).to_vec();
    b.extend_from_slice(&errno.to_be_bytes());
    b.extend_from_slice(&(message.len() as u16).to_be_bytes());
    b.extend_from_slice(message);
    b
}

/// Bytes of reads in flight across connections, waited on when over [`IN_FLIGHT_BYTES`].
struct Budget {
    used: Mutex<u64>,
    freed: Condvar,
}

impl Budget {
    /// Waits until `n` more bytes fit, and holds them until the returned guard is dropped.
    fn take(&self, n: u64) -> Held<'_> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        // One read alone always goes (a read is at most 32 MiB).
        while *used > 0 && *used + n > IN_FLIGHT_BYTES {
            used = self.freed.wait(used).unwrap_or_else(|p| p.into_inner());
        }
        *used += n;
        Held(self, n)
    }
}

/// Bytes of the budget held by one read; given back when dropped, however the read ends.
struct Held<'a>(&'a Budget, u64);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut used = self.0.used.lock().unwrap_or_else(|p| p.into_inner());
        *used = used.saturating_sub(self.1);
        self.0.freed.notify_all();
    }
}

/// A connection's place among [`MAX_CONNECTIONS`]; given back when dropped.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A failure to accept a connection: logged, and waited out a moment.
fn accept_failed(e: io::Error) {
    tracing::warn!("accepting an NBD client: {e}");
    std::thread::sleep(Duration::from_millis(100));
}

fn read_n<const N: usize, S: Read>(s: &mut S) -> Result<[u8; N], Error> {
    let mut b = [0u8; N];
    s.read_exact(&mut b).map_err(io_err)?;
    Ok(b)
}

fn io_err(source: io::Error) -> Error {
    Error::Io { server: "client".into(), source }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An export whose byte at offset `o` is `o % 251`, failing reads at 1 MiB.
    struct Pattern;

    impl ExportSource for Pattern {
        fn size(&self) -> u64 {
            8 << 20
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
            if offset == 1 << 20 {
                return Err("a damaged chunk".into());
            }
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((offset + i as u64) % 251) as u8;
            }
            Ok(())
        }
    }

    fn served() -> (Arc<Server>, std::path::PathBuf, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let server = Arc::new(Server::new("os", Arc::new(Pattern)));
        let s = Arc::clone(&server);
        std::thread::spawn(move || s.serve_unix(listener));
        (server, socket, dir)
    }

    #[test]
    fn our_client_reads_what_the_export_holds_and_errors_are_per_read() {
        let (_server, socket, _dir) = served();
        let mut client = crate::Client::connect_unix(&socket, "os", &[]).unwrap();
        assert_eq!(client.export().size, 8 << 20);
        let mut buf = vec![0u8; 70_000];
        client.read(5_000_000, &mut buf).unwrap();
        assert!(buf.iter().enumerate().all(|(i, b)| *b == ((5_000_000 + i as u64) % 251) as u8));
        let e = client.read(1 << 20, &mut buf).unwrap_err().to_string();
        assert!(e.contains("errno 5"), "{e}");
        // The connection goes on after a failed read; past the end is refused.
        client.read(0, &mut buf[..10]).unwrap();
        assert!(client.read((8 << 20) - 5, &mut buf[..10]).is_err());
        client.disconnect();
        assert!(crate::Client::connect_unix(&socket, "other", &[]).is_err());
    }

    #[test]
    fn a_private_server_answers_only_its_exact_name() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let server = Arc::new(Server::new("os-5eb1", Arc::new(Pattern)).private());
        std::thread::spawn(move || server.serve_unix(listener));
        assert!(crate::Client::connect_unix(&socket, "", &[]).is_err());
        assert!(crate::Client::connect_unix(&socket, "os", &[]).is_err());
        let mut client = crate::Client::connect_unix(&socket, "os-5eb1", &[]).unwrap();
        let mut buf = [0u8; 16];
        client.read(251, &mut buf).unwrap();
        assert_eq!(buf[0], 0);
    }

    #[test]
    fn a_client_that_leaves_mid_read_or_talks_nonsense_leaves_the_server_serving() {
        let (_server, socket, _dir) = served();
        // Handshake by hand, ask for 32 MiB... of an 8 MiB export, then a real read, and go.
        let mut s = UnixStream::connect(&socket).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut go = IHAVEOPT.to_be_bytes().to_vec();
        go.extend_from_slice(&OPT_GO.to_be_bytes());
        go.extend_from_slice(&8u32.to_be_bytes());
        go.extend_from_slice(&2u32.to_be_bytes());
        go.extend_from_slice(b"os");
        go.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&go).unwrap();
        let mut read = crate::proto::request(CMD_READ, 0, 1, 0, 4 << 20).to_vec();
        read.extend_from_slice(&crate::proto::request(CMD_READ, 0, 2, 4 << 20, 4 << 20));
        s.write_all(&read).unwrap();
        drop(s);
        // Garbage instead of a handshake.
        let mut s = UnixStream::connect(&socket).unwrap();
        s.write_all(&[0xff; 64]).unwrap();
        drop(s);
        let mut client = crate::Client::connect_unix(&socket, "", &[]).unwrap();
        let mut buf = vec![0u8; 4096];
        client.read(4096, &mut buf).unwrap();
        assert_eq!(buf[0], (4096 % 251) as u8);
    }
}
