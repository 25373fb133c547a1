//! What file-level recovery can fail with.

use std::path::PathBuf;

/// An error of file-level recovery, naming what it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The disk could not be read (the vault, a damaged chunk).
    #[error("reading {what} failed: {source}")]
    Read {
        /// What was being read.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// A partition table is inconsistent.
    #[error("the disk's partition table is damaged or crafted: {0}")]
    BadTable(String),
    /// `--partition` names none of the disk's partitions.
    #[error("{0}")]
    Partition(String),
    /// The volume holds a file system Cairn cannot read yet.
    #[error("cannot read the files of {volume}: {reason}")]
    Unsupported {
        /// The volume.
        volume: String,
        /// Which file system, and what to do instead.
        reason: String,
    },
    /// No such file or folder in the volume.
    #[error("{0}: no such file or folder in the point's file system")]
    NotFound(String),
    /// A path given is not usable.
    #[error("{0}")]
    BadPath(String),
    /// The file system is damaged (or crafted) where it was read.
    #[error("the file system is damaged at {path}: {detail}")]
    Damaged {
        /// The guest path.
        path: String,
        /// What the reader said.
        detail: String,
    },
    /// Writing on the host failed (a full disk, a permission).
    #[error("writing {} failed: {source}", shown(path))]
    Host {
        /// The host path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Something is already where a file would be extracted.
    #[error(
        "{} exists already: extraction never overwrites; choose an empty --to folder or \
         move it away",
        shown(.0)
    )]
    Exists(PathBuf),
    /// A walk went past its limit (a directory reached twice in a crafted file system).
    #[error("{0}")]
    TooMany(String),
    /// A scan was stopped by its caller (a time limit, Ctrl-C): why.
    #[error("{0}")]
    Stopped(String),
}

/// A host path made of guest names, shown without its control characters.
fn shown(path: &std::path::Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    crate::text::escape(path.as_os_str().as_bytes())
}

impl Error {
    pub(crate) fn read(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Read { what: what.into(), source }
    }

    pub(crate) fn host(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Host { path: path.into(), source }
    }
}
