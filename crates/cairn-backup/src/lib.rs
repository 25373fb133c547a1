//! Agent-side jobs, end to end.
//!
//! [`backup`] takes a VM's disks (each a [`cairn_delta::BlockSource`] under a stable name),
//! finds the previous point to compare against, runs every disk through the delta engine in
//! parallel, stores changed blocks and index pages in the vault, and commits the recovery point.
//! [`restore_disk`] and [`restore_point`] write a point's disks back, holes kept and every
//! chunk checked. [`drill()`] proves a point restores (a temporary copy, sampled digests,
//! `e2fsck`) and notes the outcome on it. [`prune`] applies a retention policy: expired points are soft-deleted,
//! then purged after their grace time. Data flows one way: source -> engine -> vault ->
//! manifest.

mod backup;
mod blocking_reader;
mod cancel;
mod copy;
mod drill;
mod error;
mod job;
mod point_reader;
mod previous;
mod progress;
mod prune;
mod restore;

pub use backup::{BackupRequest, DEFAULT_PARALLEL_DISKS, DiskInput, backup};
pub use blocking_reader::BlockingReader;
pub use cancel::Cancel;
pub use copy::{CopyOptions, CopyReport, copy_points};
pub use drill::{
    CheckOutcome, DiskDrill, DrillMethod, DrillOptions, DrillReport, VolumeCheck, drill,
    find_e2fsck,
};
pub use error::Error;
pub use job::{Captured, Check, JobOptions, Snapshot, VmJob, check};
pub use point_reader::{PointReader, ReaderOptions, ReaderStats};
pub use progress::{DiskProgress, NoProgress, Progress};
pub use prune::{Action, PointDecision, PruneOptions, PruneReport, prune};
pub use restore::{
    Damage, ImageFormat, PARALLEL_DISKS, RestoreOptions, RestoreStats, restore_disk, restore_point,
};

/// The README's examples compile: this runs them as doc tests.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
