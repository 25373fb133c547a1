//! Errors of the QMP and guest-agent clients and of the live views built on them.

use std::io;
use std::path::PathBuf;

/// What went wrong talking to a running QEMU or its guest agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A socket could not be reached, or the connection failed or timed out.
    #[error("{what} {}: {source}", socket.display())]
    Io {
        /// `QMP socket` or `guest agent socket`.
        what: &'static str,
        /// The socket.
        socket: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// QEMU or the guest agent sent something the protocol does not allow.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A command failed.
    #[error("{what} refused {command}: {desc} ({class})")]
    Command {
        /// `QEMU` or `the guest agent`.
        what: &'static str,
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// The VM does not have what the configuration names, or QEMU cannot do what is needed.
    #[error("{0}")]
    Vm(String),
    /// A fleecing image could not be made or removed.
    #[error("fleecing image {}: {detail}", path.display())]
    Fleece {
        /// The image.
        path: PathBuf,
        /// What happened.
        detail: String,
    },
}

impl Error {
    pub(crate) fn io(
        what: &'static str,
        socket: &std::path::Path,
    ) -> impl FnOnce(io::Error) -> Error {
        let socket = socket.to_path_buf();
        move |source| Error::Io { what, socket, source }
    }
}
