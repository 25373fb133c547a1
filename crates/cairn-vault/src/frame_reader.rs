//! Chunk frames read from threads that are not the runtime's: the engine's workers, which read
//! the bases of would-be patches back to check them.
//!
//! A base check reads one frame per patched block, thousands per incremental. Through the
//! store each read is a task hop and, on a local vault, an `open` of the pack (what
//! `LocalFileSystem` does per ranged get). On a local vault this reader `pread`s the packs
//! through descriptors it keeps open (a few dozen at a time); a caller announces the frames it
//! will want ([`FrameReader::expect`]) as soon as it knows them, and the kernel starts reading
//! them then (`POSIX_FADV_WILLNEED`): packs are written around the page cache, so bases are
//! read from the disk, and one at a time they would wait on it in turn.
//! On other stores the reads of one call go through the store together.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use cairn_format::Digest;

use crate::{ChunkLocation, Error, Vault, layout};

/// Pack files kept open at once.
const OPEN_PACKS: usize = 64;

/// Reads chunk frames synchronously; see the module docs.
#[derive(Debug)]
pub struct FrameReader {
    vault: Vault,
    runtime: tokio::runtime::Handle,
    open: Mutex<HashMap<Digest, Arc<File>>>,
}

impl Vault {
    /// A reader of this vault's chunk frames for threads that may block. Call it from within
    /// the runtime: reads that need the store are driven on it.
    pub fn frame_reader(&self) -> FrameReader {
        FrameReader {
            vault: self.clone(),
            runtime: tokio::runtime::Handle::current(),
            open: Mutex::new(HashMap::new()),
        }
    }
}

impl FrameReader {
    /// The stored frame of each chunk of `ids`, in order (unchecked: decode it). On a local
    /// vault, frames announced with [`FrameReader::expect`] are read from memory if the disk
    /// has delivered them by then.
    pub fn read(&self, ids: &[Digest]) -> Vec<Result<Vec<u8>, Error>> {
        let places: Vec<Option<ChunkLocation>> =
            self.vault.chunk_map.read(|m| ids.iter().map(|id| m.locate(id)).collect());
        match self.vault.durability.local_root() {
            Some(root) => ids
                .iter()
                .zip(places)
                .map(|(id, loc)| {
                    let loc = loc.ok_or(Error::ChunkMissing { id: *id })?;
                    match self.pread(root, id, &loc) {
                        Err(Error::ChunkMissing { .. }) => self
                            .runtime
                            .block_on(self.vault.read_moved(id, &loc))
                            .map(|b| b.to_vec()),
                        result => result,
                    }
                })
                .collect(),
            None => self.runtime.block_on(futures::future::join_all(ids.iter().zip(places).map(
                |(id, loc)| async move {
                    let loc = loc.ok_or(Error::ChunkMissing { id: *id })?;
                    match self.vault.read_frame(id, &loc).await {
                        Err(Error::ChunkMissing { .. }) => self.vault.read_moved(id, &loc).await,
                        result => result,
                    }
                    .map(|b| b.to_vec())
                },
            ))),
        }
    }

    /// Tells the reader that the frames of `ids` will be read soon: on a local vault the disk
    /// starts reading them now (`POSIX_FADV_WILLNEED`), while the caller does other work.
    pub fn expect(&self, ids: &[Digest]) {
        if let Some(root) = self.vault.durability.local_root() {
            let places: Vec<Option<ChunkLocation>> =
                self.vault.chunk_map.read(|m| ids.iter().map(|id| m.locate(id)).collect());
            self.advise_at(root, ids, &places);
        }
    }

    fn advise_at(&self, root: &Path, ids: &[Digest], places: &[Option<ChunkLocation>]) {
        for (id, loc) in ids.iter().zip(places) {
            let Some(loc) = loc else { continue };
            let path = root.join(layout::pack(&loc.pack).as_ref());
            if let Ok(file) = self.pack(&loc.pack, &path, id) {
                let len = std::num::NonZeroU64::new(u64::from(loc.len));
                let advice = rustix::fs::Advice::WillNeed;
                let _ = rustix::fs::fadvise(&*file, u64::from(loc.offset), len, advice);
            }
        }
    }

    fn pread(&self, root: &Path, id: &Digest, loc: &ChunkLocation) -> Result<Vec<u8>, Error> {
        let path = root.join(layout::pack(&loc.pack).as_ref());
        let file = self.pack(&loc.pack, &path, id)?;
        let mut frame = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut frame, u64::from(loc.offset)).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => Error::ChunkTruncated { id: *id, pack: loc.pack },
            _ => Error::local_io(&path, e),
        })?;
        Ok(frame)
    }

    /// Pack `name`, opened once (the cache is emptied when it grows past its bound); `id` is
    /// the chunk wanted from it, for the error when the pack is gone.
    fn pack(&self, name: &Digest, path: &Path, id: &Digest) -> Result<Arc<File>, Error> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(file) = open.get(name) {
            return Ok(Arc::clone(file));
        }
        let file = Arc::new(File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::ChunkMissing { id: *id },
            _ => Error::local_io(path, e),
        })?);
        if open.len() >= OPEN_PACKS {
            open.clear();
        }
        open.insert(*name, Arc::clone(&file));
        Ok(file)
    }
}
