//! Progress of a job, per disk.

use cairn_format::Name;

/// Where one disk's backup or restore stands.
#[derive(Clone, Debug, Default)]
pub struct DiskProgress {
    /// The disk.
    pub disk: Option<Name>,
    /// Its size in bytes.
    pub size: u64,
    /// How far the scan has gone, in bytes of disk (holes included).
    pub position: u64,
    /// Bytes read and hashed.
    pub bytes_scanned: u64,
    /// Bytes of changed blocks.
    pub bytes_changed: u64,
    /// Bytes written to the vault.
    pub bytes_sent: u64,
    /// Bytes of changed blocks the vault already held.
    pub bytes_deduplicated: u64,
    /// The disk is done.
    pub done: bool,
}

/// Receives progress; called from the job's tasks, so it must be cheap.
pub trait Progress: Send + Sync {
    /// One disk moved on.
    fn disk(&self, update: &DiskProgress);
}

/// Ignores progress.
#[derive(Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn disk(&self, _: &DiskProgress) {}
}
