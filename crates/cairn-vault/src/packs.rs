//! Writing chunks: frames gathered into packs, uploaded as they fill, indexed at commit.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use cairn_format::pack::{IndexedPack, PACK_HEADER, PackEntry, pack_trailer};
use cairn_format::{Digest, encode_chunk};
use object_store::{PutMode, PutOptions, PutPayload};
use rand::RngExt;
use tokio::task::JoinSet;

use crate::{Error, Vault, layout};

/// What storing a chunk did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// The chunk is new; its frame of this many bytes goes into a pack.
    Written(u64),
    /// The vault (or this backup, from another disk) already holds it.
    Present,
}

/// Packs being uploaded at once, per writer. Two keep the disk busy while the next fills;
/// each holds up to one pack of memory.
const PACKS_IN_FLIGHT: usize = 2;

/// The chunks of one backup job: which it claimed, which packs it wrote.
#[derive(Debug, Default)]
pub(crate) struct JobChunks {
    state: Mutex<JobState>,
    open_writers: AtomicUsize,
}

#[derive(Debug, Default)]
struct JobState {
    claimed: HashSet<Digest>,
    packs: Vec<IndexedPack>,
}

impl JobChunks {
    /// True if `id` is new to this job (the caller then stores it).
    fn claim(&self, id: &Digest) -> bool {
        match self.state.lock() {
            Ok(mut s) => s.claimed.insert(*id),
            Err(p) => p.into_inner().claimed.insert(*id),
        }
    }

    fn wrote(&self, pack: IndexedPack) {
        match self.state.lock() {
            Ok(mut s) => s.packs.push(pack),
            Err(p) => p.into_inner().packs.push(pack),
        }
    }

    /// The packs written, once every writer has finished.
    pub(crate) fn take_packs(&self) -> Result<Vec<IndexedPack>, Error> {
        let open = self.open_writers.load(Ordering::Acquire);
        if open != 0 {
            return Err(Error::Unfinished { writers: open });
        }
        Ok(match self.state.lock() {
            Ok(mut s) => std::mem::take(&mut s.packs),
            Err(p) => std::mem::take(&mut p.into_inner().packs),
        })
    }

    pub(crate) fn opened(&self) {
        self.open_writers.fetch_add(1, Ordering::AcqRel);
    }
}

/// Writes one stream of chunks (one disk's) into packs. Get one from
/// [`crate::PointWriter::pack_writer`]; call [`PackWriter::finish`] before the commit.
///
/// A chunk is stored once per vault: one already in a committed pack index, or already stored
/// by this job, is [`Stored::Present`]. Packs are uploaded create-only as they fill, a bounded
/// number at a time; dropping the writer aborts its uploads (the point then cannot commit).
pub struct PackWriter {
    vault: Vault,
    job: std::sync::Arc<JobChunks>,
    parts: Vec<Bytes>,
    entries: Vec<PackEntry>,
    size: u64,
    uploads: JoinSet<Result<IndexedPack, Error>>,
    finished: bool,
}

impl std::fmt::Debug for PackWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackWriter").field("chunks", &self.entries.len()).finish_non_exhaustive()
    }
}

impl PackWriter {
    pub(crate) fn new(vault: Vault, job: std::sync::Arc<JobChunks>) -> Self {
        job.opened();
        PackWriter {
            vault,
            job,
            parts: Vec::new(),
            entries: Vec::new(),
            size: 0,
            uploads: JoinSet::new(),
            finished: false,
        }
    }

    /// Stores an encoded chunk frame under `id` unless the vault or this job already holds it.
    pub async fn store(&mut self, id: &Digest, frame: Bytes) -> Result<Stored, Error> {
        let known = self.vault.chunk_map.read(|m| m.contains(id));
        if known || !self.job.claim(id) {
            return Ok(Stored::Present);
        }
        let len = frame.len() as u64;
        if self.parts.is_empty() {
            self.parts.push(Bytes::from_static(&PACK_HEADER));
            self.size = PACK_HEADER.len() as u64;
        }
        self.entries.push(PackEntry { id: *id, offset: self.size as u32, len: len as u32 });
        self.parts.push(frame);
        self.size += len;
        if self.size >= u64::from(self.vault.config.pack_size) {
            self.seal().await?;
        }
        Ok(Stored::Written(len))
    }

    /// Encodes `plaintext` (its id is its SHA-256) and stores it if absent.
    pub async fn store_plain(&mut self, plaintext: &[u8]) -> Result<(Digest, Stored), Error> {
        let id = Digest::of(plaintext);
        let frame = encode_chunk(plaintext, self.vault.config.zstd_level())?;
        Ok((id, self.store(&id, frame.into()).await?))
    }

    /// Closes the current pack and starts its upload, after waiting for room.
    async fn seal(&mut self) -> Result<(), Error> {
        if self.entries.is_empty() {
            return Ok(());
        }
        while self.uploads.len() >= PACKS_IN_FLIGHT {
            self.collect_one().await?;
        }
        let entries = std::mem::take(&mut self.entries);
        let mut parts = std::mem::take(&mut self.parts);
        parts.push(Bytes::from(pack_trailer(&entries)));
        self.size = 0;
        // A fresh random name: see the pack module of cairn-format for why not a content hash.
        let name = Digest(rand::rng().random());
        let vault = self.vault.clone();
        self.uploads.spawn(async move {
            let path = layout::pack(&name);
            let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
            let payload: PutPayload = parts.into_iter().collect();
            let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
            vault
                .store
                .put_opts(&path, payload, opts)
                .await
                .map_err(|e| Error::storage("write", &path, e))?;
            vault.durability.wrote(len);
            Ok(IndexedPack { pack: name, entries })
        });
        Ok(())
    }

    async fn collect_one(&mut self) -> Result<(), Error> {
        match self.uploads.join_next().await {
            Some(Ok(result)) => {
                self.job.wrote(result?);
                Ok(())
            }
            Some(Err(e)) => Err(Error::Io {
                path: "pack upload".into(),
                source: std::io::Error::other(e.to_string()),
            }),
            None => Ok(()),
        }
    }

    /// Uploads the last pack and waits for every upload; the packs are then part of the job.
    pub async fn finish(mut self) -> Result<(), Error> {
        self.seal().await?;
        while !self.uploads.is_empty() {
            self.collect_one().await?;
        }
        self.finished = true;
        self.job.open_writers.fetch_sub(1, Ordering::AcqRel);
        Ok(())
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        // An unfinished writer keeps the job from committing: its chunks have no pack index.
        if !self.finished {
            tracing::debug!(chunks = self.entries.len(), "pack writer dropped before finish");
        }
    }
}
