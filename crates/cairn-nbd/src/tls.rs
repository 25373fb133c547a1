//! TLS for exports reached over the network (NBD's `STARTTLS`), with rustls.
//!
//! The server's transmission phase reads requests on one thread while workers write replies
//! on others, each through its own handle on the connection. A TLS connection is one state
//! for both directions, so [`TlsStream`] shares it behind a lock, and a reader never holds
//! that lock while it waits: it waits for the socket to be readable first, then takes the lock
//! only to pull what arrived through the TLS layer. Writers take the lock, seal their bytes and
//! write them out (bounded by the socket's write timeout).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rustls::ServerConnection;

use crate::server::Stream;

/// A server's TLS connection over TCP; cloned handles share it.
pub struct TlsStream {
    shared: Arc<Mutex<(ServerConnection, TcpStream)>>,
    /// The same socket, to wait on without the lock, time out and shut.
    sock: TcpStream,
}

impl TlsStream {
    /// Completes the server's side of the handshake on `sock` (within its timeouts).
    pub fn accept(config: Arc<rustls::ServerConfig>, mut sock: TcpStream) -> io::Result<TlsStream> {
        let mut conn = ServerConnection::new(config).map_err(io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        let waiter = sock.try_clone()?;
        Ok(TlsStream { shared: Arc::new(Mutex::new((conn, sock))), sock: waiter })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (ServerConnection, TcpStream)> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until the socket has bytes to read (or the read timeout passes).
    fn wait_readable(&self) -> io::Result<()> {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let timeout = self.sock.read_timeout()?;
        let limit =
            timeout.map(|t| Timespec { tv_sec: t.as_secs() as _, tv_nsec: t.subsec_nanos() as _ });
        loop {
            let mut fds = [PollFd::new(&self.sock, PollFlags::IN)];
            match poll(&mut fds, limit.as_ref()) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::TimedOut, "no data in time")),
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // Bytes the TLS layer has decrypted already.
            match self.lock().0.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            self.wait_readable()?;
            let mut guard = self.lock();
            let (conn, sock) = &mut *guard;
            if conn.read_tls(sock)? == 0 {
                // The peer closed the socket without a close_notify.
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if let Err(e) = conn.process_new_packets() {
                // The alert that says why goes out before the connection ends.
                let _ = conn.write_tls(sock);
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            // Whatever the TLS layer must answer (an alert, a key update) goes out now.
            while conn.wants_write() {
                conn.write_tls(sock)?;
            }
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut guard = self.lock();
        let (conn, sock) = &mut *guard;
        let mut rest = buf;
        while !rest.is_empty() {
            // The TLS layer takes a bounded amount of plaintext at a time: sealed and sent,
            // it takes more.
            let n = conn.writer().write(rest)?;
            rest = &rest[n..];
            while conn.wants_write() {
                conn.write_tls(sock)?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut guard = self.lock();
        let (conn, sock) = &mut *guard;
        while conn.wants_write() {
            conn.write_tls(sock)?;
        }
        sock.flush()
    }
}

impl Stream for TlsStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        Ok(TlsStream { shared: Arc::clone(&self.shared), sock: self.sock.try_clone()? })
    }

    fn shut(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    /// Says goodbye (`close_notify`), as a client that disconnects must be answered, then shuts.
    fn close(&self) {
        {
            let mut guard = self.lock();
            let (conn, sock) = &mut *guard;
            conn.send_close_notify();
            while conn.wants_write() {
                if conn.write_tls(sock).is_err() {
                    break;
                }
            }
        }
        self.shut();
    }

    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(read)?;
        self.sock.set_write_timeout(write)
    }
}
