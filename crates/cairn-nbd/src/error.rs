//! Errors of the NBD client and of the qemu tools it drives.

use std::io;

/// What went wrong talking to an NBD server or running `qemu-img` / `qemu-nbd`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The connection failed (refused, closed, timed out).
    #[error("NBD server {server}: {source}")]
    Io {
        /// The socket or image served.
        server: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The server sent something the protocol does not allow.
    #[error("NBD protocol error: {0}")]
    Protocol(String),
    /// The server refused an option during negotiation.
    #[error("NBD server refused {option}: {message}")]
    Refused {
        /// The option.
        option: &'static str,
        /// The server's reason.
        message: String,
    },
    /// A command failed on the server.
    #[error("NBD {command} at offset {offset} failed: errno {errno}{message}")]
    Command {
        /// The command.
        command: &'static str,
        /// Where.
        offset: u64,
        /// The server's errno.
        errno: u32,
        /// The server's message, starting with ": ", or empty.
        message: String,
    },
    /// An image declared qcow2 is not one, or would make qemu open files besides itself.
    #[error("qcow2 image {detail}")]
    Image {
        /// Which image, what is wrong and what to do.
        detail: String,
    },
    /// A qcow2 image has a backing file, and backing files were not allowed for its disk.
    #[error(
        "qcow2 image {image} has a backing file ({backing}); allow backing files for this disk \
         (its allow_backing_file setting) if you trust them, or flatten it with `qemu-img \
         convert -O qcow2`", image = image.display()
    )]
    BackingRefused {
        /// The image.
        image: std::path::PathBuf,
        /// Its backing file, as named in its header.
        backing: String,
    },
    /// A qemu tool failed or could not be run.
    #[error("{tool} {detail}")]
    Qemu {
        /// `qemu-img` or `qemu-nbd`.
        tool: &'static str,
        /// What happened and what to do.
        detail: String,
    },
}

impl Error {
    pub(crate) fn io(server: &str) -> impl FnOnce(io::Error) -> Error + '_ {
        move |source| Error::Io { server: server.to_owned(), source }
    }
}
