//! What a scan is handed besides its source: the previous point's index, the previous
//! point's chunks (to check a patch before it is stored), and the encoder of changed blocks.
//! The engine does no I/O of its own: whatever these read, their implementor reads.

use cairn_format::Digest;
use cairn_format::index::BlockEntry;

/// The previous point's index for this disk, read block by block in order.
pub trait PreviousIndex: Send {
    /// The entry for the next block, or `None` when there is none (no previous point).
    fn next_entry(
        &mut self,
    ) -> Result<Option<BlockEntry>, Box<dyn std::error::Error + Send + Sync>>;

    /// Passes over the next `count` entries unread (a run of holes in the source, where the
    /// previous entries do not matter). An implementation that holds runs skips them whole;
    /// this default reads them one by one.
    fn skip_entries(&mut self, count: u64) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        for _ in 0..count {
            if self.next_entry()?.is_none() {
                break;
            }
        }
        Ok(())
    }
}

impl<P: PreviousIndex + ?Sized> PreviousIndex for Box<P> {
    fn next_entry(
        &mut self,
    ) -> Result<Option<BlockEntry>, Box<dyn std::error::Error + Send + Sync>> {
        (**self).next_entry()
    }

    fn skip_entries(&mut self, count: u64) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        (**self).skip_entries(count)
    }
}

/// A previous index held in memory, one entry per block (tests, benchmarks, embedders).
impl PreviousIndex for std::vec::IntoIter<BlockEntry> {
    fn next_entry(
        &mut self,
    ) -> Result<Option<BlockEntry>, Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.next())
    }
}

/// No previous point: every allocated non-zero block is changed.
#[derive(Debug, Default)]
pub struct NoPrevious;

impl PreviousIndex for NoPrevious {
    fn next_entry(
        &mut self,
    ) -> Result<Option<BlockEntry>, Box<dyn std::error::Error + Send + Sync>> {
        Ok(None)
    }

    fn skip_entries(&mut self, _: u64) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(())
    }
}

/// Turns a changed block into what the caller will store; runs on the worker threads.
pub trait BlockEncoder: Sync {
    /// What a changed block becomes.
    type Output: Send;
    /// Encodes the bytes to store under chunk id `id` (their id under the config's
    /// [`cairn_format::ChunkIds`]): a changed block, or the patch that rebuilds it.
    fn encode(&self, id: &Digest, bytes: &[u8]) -> Self::Output;
}

/// Hash only: changed blocks carry no payload (benchmarks, dry runs).
impl BlockEncoder for () {
    type Output = ();
    fn encode(&self, _: &Digest, _: &[u8]) {}
}

/// The chunks a patch would be applied over, read back for one purpose: to check, before a
/// patch is stored, that it rebuilds the block. Called on the worker threads, once per batch,
/// with the bases of every block of the batch that would become a patch, so that an
/// implementation can read them all at once.
pub trait Bases: Sync {
    /// The plaintext of each base chunk in `ids`, in order. An error for one means that
    /// block is stored whole.
    fn bases(&self, ids: &[Digest]) -> Vec<Result<Vec<u8>, BoxError>>;

    /// Base `id` will be asked for soon (the worker found a block that needs it and goes on
    /// hashing the rest of its batch): a reader may start fetching it. Does nothing unless
    /// implemented.
    fn expect(&self, id: &Digest) {
        let _ = id;
    }
}

/// An error a [`Bases`] reader gives for one base.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// No bases to read: no block is ever stored as a patch.
#[derive(Debug, Default)]
pub struct NoBases;

impl Bases for NoBases {
    fn bases(&self, ids: &[Digest]) -> Vec<Result<Vec<u8>, BoxError>> {
        ids.iter()
            .map(|id| Err(format!("base {id} cannot be read back: patches are off").into()))
            .collect()
    }
}

/// Bases held in memory by chunk id (tests, benchmarks, embedders).
impl<S: std::hash::BuildHasher + Sync> Bases for std::collections::HashMap<Digest, Vec<u8>, S> {
    fn bases(&self, ids: &[Digest]) -> Vec<Result<Vec<u8>, BoxError>> {
        ids.iter()
            .map(|id| self.get(id).cloned().ok_or_else(|| format!("no chunk {id}").into()))
            .collect()
    }
}
