//! Errors of backup and restore jobs.

use std::path::PathBuf;

use cairn_format::{Name, PointId};

/// What went wrong in a job.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The vault failed.
    #[error(transparent)]
    Vault(#[from] cairn_vault::Error),
    /// A disk could not be read.
    #[error("disk {disk}: {source}")]
    Disk {
        /// The disk's name.
        disk: Name,
        /// What went wrong.
        #[source]
        source: cairn_delta::Error,
    },
    /// The VM could not be captured (quiesced and viewed); the guest was resumed.
    #[error("capturing the disks of VM {vm}: {source}")]
    Capture {
        /// The VM.
        vm: Name,
        /// What failed.
        #[source]
        source: cairn_snapshot::Error,
    },
    /// A VM in QEMU could not be prepared for a backup (QMP, its disks, fleecing).
    #[error("running VM {vm} in QEMU: {source}")]
    Live {
        /// The VM.
        vm: Name,
        /// What failed.
        #[source]
        source: cairn_qemu::Error,
    },
    /// A configuration, script or disk was refused before anything ran.
    #[error(transparent)]
    Snapshot(#[from] cairn_snapshot::Error),
    /// A disk image is not what its configuration declares, or would make qemu open other
    /// files, or qemu could not serve it.
    #[error("disk {disk}: {source}")]
    Image {
        /// The disk.
        disk: Name,
        /// What is wrong.
        #[source]
        source: cairn_nbd::Error,
    },
    /// The job was cancelled before it committed.
    #[error(
        "the backup was cancelled; no recovery point was committed and earlier points are intact"
    )]
    Cancelled,
    /// A retention policy is wrong.
    #[error(transparent)]
    Policy(#[from] cairn_policy::Error),
    /// The request itself is wrong.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The point has no disk of that name.
    #[error("point {point} has no disk {disk}; its disks are: {available}")]
    DiskNotInPoint {
        /// The disk asked for.
        disk: Name,
        /// The point.
        point: PointId,
        /// The disks it has.
        available: String,
    },
    /// Restore would overwrite something.
    #[error("restore target {path} exists and is not empty; nothing was written (overwriting it must be asked for)", path = path.display())]
    TargetExists {
        /// The target.
        path: PathBuf,
    },
    /// Writing the restore target failed.
    #[error("writing restore target {path}: {source}", path = path.display())]
    Target {
        /// The target.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A chunk's content is not what the index says.
    #[error(
        "chunk {id} for disk {disk} at offset {offset} is damaged: {detail}; verify the vault to find the points it damages"
    )]
    Corrupt {
        /// The disk.
        disk: Name,
        /// Where it belongs.
        offset: u64,
        /// The chunk.
        id: cairn_format::Digest,
        /// What is wrong.
        detail: String,
    },
    /// A value could not be encoded (a bug, or a limit exceeded).
    #[error(transparent)]
    Format(#[from] cairn_format::Error),
    /// A worker task died (a bug).
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Whether running the job again may help.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Vault(e) => e.is_retryable(),
            Error::Disk { source, .. } => source.is_retryable(),
            _ => false,
        }
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Internal(e.to_string())
    }
}
