//! Connecting to QEMU's unix sockets without hanging on one that accepts no one.
//!
//! QEMU's character-device sockets (the monitor, the guest agent's port) take one client at a
//! time and listen with a backlog of one: while libvirt or another tool holds the socket,
//! further connections queue and then block in `connect` for good. A send timeout set before
//! `connect` bounds that wait (Linux applies `SO_SNDTIMEO` to a unix socket's connect).

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType, sockopt};

/// Connects to the unix socket at `path`, waiting at most `timeout` for it to accept.
pub fn connect(path: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    sockopt::set_socket_timeout(&fd, sockopt::Timeout::Send, Some(timeout))?;
    let addr = SocketAddrUnix::new(path)?;
    match rustix::net::connect(&fd, &addr) {
        Ok(()) => {}
        Err(Errno::AGAIN | Errno::INPROGRESS) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "it accepted no connection within {} s: another client (libvirt, a second \
                     backup) may hold it, and it serves one at a time",
                    timeout.as_secs()
                ),
            ));
        }
        Err(e) => return Err(e.into()),
    }
    sockopt::set_socket_timeout(&fd, sockopt::Timeout::Send, None)?;
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_that_accepts_no_one_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        // Backlog as small as the kernel allows, never accepted: later connects block.
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut held = Vec::new();
        let started = std::time::Instant::now();
        let err = loop {
            match connect(&path, Duration::from_millis(200)) {
                Ok(s) => held.push(s),
                Err(e) => break e,
            }
            assert!(held.len() < 10_000, "the backlog never filled");
        };
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        assert!(started.elapsed() < Duration::from_secs(30));
        drop(listener);
        assert!(connect(&dir.path().join("absent"), Duration::from_secs(1)).is_err());
    }
}
