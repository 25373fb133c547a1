//! The block-diff engine.
//!
//! A [`BlockSource`] is a disk: a size, positional reads, which ranges are allocated, and, when
//! it tracks writes, which ranges changed since an earlier point. [`scan`] cuts it into fixed-size blocks, skips holes without
//! reading them, recognises zero blocks, hashes the rest with SHA-256 on all cores, compares
//! each block with the previous point's index entry for the same block, and hands the caller,
//! in block order, batches of one [`BlockEvent`] per block, except that a batch's trailing run
//! of holes is a count ([`Batch::trailing_holes`]; [`Batch::entries`] lists every block's
//! entry, holes included); changed blocks come with the output of the
//! caller's [`BlockEncoder`] (in Cairn: the compressed chunk frame), computed on the worker
//! threads so that compression scales with hashing.
//!
//! With changed-block tracking ([`Tracked`]), blocks outside the dirty ranges are taken from
//! the previous index unread, except a random sample of them that is read and hashed anyway:
//! a sampled block that differs from its previous entry stops the scan with
//! [`Error::TrackingMismatch`], and the caller scans again without tracking.
//!
//! The engine is synchronous and does no I/O beyond the block source it is handed: the previous
//! index arrives through the [`PreviousIndex`] trait and the results leave through a callback.
//! Memory is bounded by a fixed pool of read buffers, so it is flat in disk size.

mod config;
mod decide;
mod error;
mod events;
mod holes;
mod inputs;
mod scan;
mod source;
#[cfg(test)]
mod tests;
mod tracking;

pub use config::{DEFAULT_PATCH_GENERATIONS, EngineConfig};
pub use error::Error;
pub use events::{Batch, BlockEvent, ScanSummary};
pub use inputs::{Bases, BlockEncoder, BoxError, NoBases, NoPrevious, PreviousIndex};
pub use scan::scan;
pub use source::{BlockSource, ChangeTracking, Extent, MemSource, RawFile};
pub use tracking::Tracked;
