//! Errors of the delta engine and its block sources.

use std::io;
use std::path::PathBuf;

/// What went wrong while reading or diffing a disk.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The disk could not be opened.
    #[error("cannot open disk {path}: {source}{hint}", path = path.display())]
    Open {
        /// The path given.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
        /// What to do about it, starting with "; ".
        hint: &'static str,
    },
    /// The path is not something a disk can be read from.
    #[error("{path} is not a disk: {detail}", path = path.display())]
    NotADisk {
        /// The path given.
        path: PathBuf,
        /// What it is instead.
        detail: String,
    },
    /// A read failed.
    #[error("reading disk {disk} at offset {offset}: {source}")]
    Read {
        /// The disk's description.
        disk: String,
        /// Where.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The previous index could not be read.
    #[error("reading the previous point's index: {0}")]
    Previous(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The engine was configured wrongly.
    #[error("invalid engine configuration: {0}")]
    Config(String),
    /// Changed-block tracking called a block clean, but its content differs from the previous
    /// point's: the tracking cannot be trusted for this scan.
    #[error(
        "changed-block tracking missed a write on disk {disk}: block {block} is called clean but differs from the previous point"
    )]
    TrackingMismatch {
        /// The disk's description.
        disk: String,
        /// The block.
        block: u64,
    },
    /// The caller's sink asked the scan to stop (cancellation or a downstream failure, which the
    /// caller holds).
    #[error("the scan was stopped")]
    Stopped,
}

impl Error {
    /// Whether trying again may help (a passing read error may; a missing disk will not).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Read { .. } | Error::Previous(_))
    }
}
