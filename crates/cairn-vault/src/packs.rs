//! Writing chunks: frames gathered into packs, uploaded as they fill, indexed at commit.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use cairn_format::pack::{
    IndexedPack, PACK_FOOTER_LEN, PACK_HEADER_LEN, PackEntry, pack_header, pack_trailer_in,
};
use cairn_format::{Digest, PointId, ResumeRecord, SizedPack, encode_chunk_in};
use object_store::{PutMode, PutOptions, PutPayload};
use rand::RngExt;
use tokio::task::JoinSet;

use crate::local_pack::{ALIGN, AlignedBuf, write_pack_file};
use crate::resume::Resumable;
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

/// The chunks of one backup job: which it claimed, which packs it wrote, and the packs of
/// interrupted backups it may adopt (see the resume module).
#[derive(Debug)]
pub(crate) struct JobChunks {
    state: Mutex<JobState>,
    open_writers: AtomicUsize,
    /// The point, for the resume records of the packs it uploads.
    point: PointId,
    resumable: Resumable,
    /// The adoption record was written at the start.
    recorded_adoption: bool,
    /// Packs a collector's pending plan condemns: chunks found only there are stored again.
    condemned: crate::gc::Condemned,
}

#[derive(Debug, Default)]
struct JobState {
    claimed: HashSet<Digest>,
    packs: Vec<IndexedPack>,
    /// Resumable packs used: indexes into `resumable.packs`.
    adopted: BTreeSet<usize>,
    /// Resume records written (a failed job then leaves its marker for the next one).
    recorded: bool,
}

impl JobChunks {
    pub(crate) fn new(
        point: PointId,
        resumable: Resumable,
        condemned: crate::gc::Condemned,
    ) -> Self {
        JobChunks {
            state: Mutex::default(),
            open_writers: AtomicUsize::new(0),
            point,
            recorded_adoption: !resumable.is_empty(),
            resumable,
            condemned,
        }
    }

    fn state(&self) -> MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// True if `id` is new to this job (the caller then stores it).
    fn claim(&self, id: &Digest) -> bool {
        self.state().claimed.insert(*id)
    }

    /// True if `id` is in a resumable pack; the pack is then adopted.
    fn adopt(&self, id: &Digest) -> bool {
        match self.resumable.by_chunk.get(id) {
            Some(n) => {
                self.state().adopted.insert(*n);
                true
            }
            None => false,
        }
    }

    fn wrote(&self, pack: IndexedPack) {
        self.state().packs.push(pack);
    }

    fn recorded(&self) {
        self.state().recorded = true;
    }

    /// True if a failed job leaves something for the next one to resume from.
    pub(crate) fn resumable_after_failure(&self) -> bool {
        self.recorded_adoption || self.state().recorded
    }

    /// The packs written and adopted, once every writer has finished.
    pub(crate) fn take_packs(&self) -> Result<Vec<IndexedPack>, Error> {
        let open = self.open_writers.load(Ordering::Acquire);
        if open != 0 {
            return Err(Error::Unfinished { writers: open });
        }
        let mut state = self.state();
        let mut packs = std::mem::take(&mut state.packs);
        packs.extend(state.adopted.iter().filter_map(|n| self.resumable.packs.get(*n)).cloned());
        Ok(packs)
    }

    /// What was resumed: packs adopted, their bytes, and the backups they came from.
    pub(crate) fn resumed(&self) -> (usize, u64, Vec<PointId>) {
        let state = self.state();
        let bytes = state.adopted.iter().filter_map(|n| self.resumable.sizes.get(*n)).sum();
        (state.adopted.len(), bytes, self.resumable.from.clone())
    }

    fn opened(&self) {
        self.open_writers.fetch_add(1, Ordering::AcqRel);
    }

    fn closed(&self) {
        self.open_writers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Writes one stream of chunks (one disk's) into packs. Get one from
/// [`crate::PointWriter::pack_writer`]; call [`PackWriter::finish`] before the commit.
///
/// A chunk is stored once per vault: one already in a committed pack index, or already stored
/// by this job, is [`Stored::Present`]. Packs are uploaded create-only as they fill, a bounded
/// number at a time (on a local vault with direct I/O, see the `local_pack` module); dropping
/// the writer aborts its uploads (the point then cannot commit).
pub struct PackWriter {
    vault: Vault,
    job: Arc<JobChunks>,
    buf: AlignedBuf,
    entries: Vec<PackEntry>,
    /// Encrypted vaults: the frames of `entries`, held until the pack is sealed and then
    /// written in a random order (see [`PackWriter::lay_out_held`]).
    held: Vec<Bytes>,
    held_bytes: usize,
    uploads: JoinSet<Result<Uploaded, Error>>,
    /// Buffers of finished uploads, reused: fresh memory is slow to touch the first time.
    spare: Vec<AlignedBuf>,
}

impl std::fmt::Debug for PackWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackWriter").field("chunks", &self.entries.len()).finish_non_exhaustive()
    }
}

/// A finished upload: the pack, its buffer to reuse (local vaults), and whether its resume
/// record was written.
type Uploaded = (IndexedPack, Option<AlignedBuf>, bool);

/// Room for the trailer entry of one more chunk.
const ENTRY_ROOM: usize = cairn_format::pack::PACK_ENTRY_LEN;

impl PackWriter {
    pub(crate) fn new(vault: Vault, job: Arc<JobChunks>) -> Self {
        job.opened();
        let buf = AlignedBuf::with_capacity(pack_capacity(&vault, 0));
        PackWriter {
            vault,
            job,
            buf,
            entries: Vec::new(),
            held: Vec::new(),
            held_bytes: 0,
            uploads: JoinSet::new(),
            spare: Vec::new(),
        }
    }

    /// Stores an encoded chunk frame under `id` unless the vault or this job already holds it.
    pub async fn store(&mut self, id: &Digest, frame: Bytes) -> Result<Stored, Error> {
        if !self.claim_new(id) {
            return Ok(Stored::Present);
        }
        self.store_claimed(id, frame).await
    }

    /// True if the vault (its committed pack indexes) or this job holds `id` already: a
    /// copy need not fetch it from elsewhere.
    pub fn holds(&self, id: &Digest) -> bool {
        self.vault
            .chunk_map
            .read(|m| m.locate(id))
            .is_some_and(|l| !self.job.condemned.contains(&l.pack))
            || self.job.state().claimed.contains(id)
    }

    /// True if neither the vault nor this job holds `id` (nor a pack of an interrupted backup
    /// this job may adopt); the caller must then store it.
    fn claim_new(&mut self, id: &Digest) -> bool {
        let known = self
            .vault
            .chunk_map
            .read(|m| m.locate(id))
            .is_some_and(|loc| !self.job.condemned.contains(&loc.pack));
        !known && self.job.claim(id) && !self.job.adopt(id)
    }

    async fn store_claimed(&mut self, id: &Digest, frame: Bytes) -> Result<Stored, Error> {
        let len = frame.len() as u64;
        if self.vault.crypto.is_encrypted() {
            // Laid out when the pack is sealed, in a random order.
            self.entries.push(PackEntry { id: *id, offset: 0, len: len as u32 });
            self.held_bytes += frame.len();
            self.held.push(frame);
            if (PACK_HEADER_LEN + self.held_bytes) as u64 >= u64::from(self.vault.config.pack_size)
            {
                self.seal().await?;
            }
            return Ok(Stored::Written(len));
        }
        // The frame, its table entry, the table's footer and the padding must fit without
        // moving the buffer; otherwise close this pack first, or take a bigger buffer.
        let need = frame.len()
            + (self.entries.len() + 1) * ENTRY_ROOM
            + PACK_FOOTER_LEN
            + cairn_format::crypto::SEAL_OVERHEAD
            + 4
            + ALIGN;
        if self.buf.room() < need && !self.entries.is_empty() {
            self.seal().await?;
        }
        if self.buf.room() < need + PACK_HEADER_LEN {
            self.buf = AlignedBuf::with_capacity(pack_capacity(&self.vault, need));
        }
        if self.buf.is_empty() {
            self.buf.extend(&pack_header(&self.vault.crypto));
        }
        let offset = self.buf.len() as u32;
        self.entries.push(PackEntry { id: *id, offset, len: len as u32 });
        self.buf.extend(&frame);
        if self.buf.len() as u64 >= u64::from(self.vault.config.pack_size) {
            self.seal().await?;
        }
        Ok(Stored::Written(len))
    }

    /// Stores `plaintext` (its id is computed by the vault's [`cairn_format::ChunkIds`]) if
    /// absent, encoding it only then: most index pages of an incremental are unchanged, and
    /// compressing them to find that out was waste.
    pub async fn store_plain(&mut self, plaintext: &[u8]) -> Result<(Digest, Stored), Error> {
        let id = self.vault.crypto.ids().of(plaintext);
        if !self.claim_new(&id) {
            return Ok((id, Stored::Present));
        }
        let frame = self.vault.encode_chunk(&id, plaintext)?;
        Ok((id, self.store_claimed(&id, frame.into()).await?))
    }

    /// Closes the current pack and starts its upload, after waiting for room.
    async fn seal(&mut self) -> Result<(), Error> {
        if self.entries.is_empty() {
            return Ok(());
        }
        while self.uploads.len() >= PACKS_IN_FLIGHT {
            self.collect_one().await?;
        }
        self.lay_out_held();
        let entries = std::mem::take(&mut self.entries);
        let next = match self.spare.pop() {
            Some(b) => b,
            None => AlignedBuf::with_capacity(pack_capacity(&self.vault, 0)),
        };
        let mut buf = std::mem::replace(&mut self.buf, next);
        // A fresh random name: see the pack module of cairn-format for why not a content hash.
        let name = Digest(rand::rng().random());
        let path = layout::pack(&name);
        let crypto = &self.vault.crypto;
        buf.extend(&pack_trailer_in(crypto, path.as_ref(), &entries, rand::rng().random()));
        let vault = self.vault.clone();
        let point = self.job.point.clone();
        self.uploads.spawn(async move {
            let path = layout::pack(&name);
            let len = buf.len() as u64;
            if let Some(limit) = &vault.upload_limit {
                limit.take(len).await;
            }
            let buf = match vault.durability.local_root() {
                Some(root) => {
                    let root = root.to_owned();
                    let rel = path.to_string();
                    let written = tokio::task::spawn_blocking(move || {
                        write_pack_file(&root, &rel, &mut buf).map(|()| buf)
                    })
                    .await
                    .map_err(|e| Error::Io {
                        path: path.to_string(),
                        source: std::io::Error::other(e.to_string()),
                    })??;
                    Some(written)
                }
                None => {
                    let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
                    vault
                        .store
                        .put_opts(&path, PutPayload::from_bytes(buf.into_bytes()), opts)
                        .await
                        .map_err(|e| Error::storage("write", &path, e))?;
                    None
                }
            };
            vault.durability.wrote(len);
            // Recorded for a resume should this job die; a failure costs only that.
            let record =
                ResumeRecord { format: 1, packs: vec![SizedPack { pack: name, size: len }] };
            let recorded = layout::uploaded_record(&point, &name);
            let recorded = match vault.put_new(&recorded, record.encode(), "write").await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(%recorded, "cannot record an uploaded pack for a resume: {e}");
                    false
                }
            };
            Ok((IndexedPack { pack: name, entries }, buf, recorded))
        });
        Ok(())
    }

    async fn collect_one(&mut self) -> Result<(), Error> {
        match self.uploads.join_next().await {
            Some(Ok(result)) => {
                let (pack, buf, recorded) = result?;
                self.job.wrote(pack);
                if recorded {
                    self.job.recorded();
                }
                if let Some(mut buf) = buf
                    && self.spare.len() < PACKS_IN_FLIGHT
                {
                    buf.clear();
                    self.spare.push(buf);
                }
                Ok(())
            }
            Some(Err(e)) => Err(Error::Io {
                path: "pack upload".into(),
                source: std::io::Error::other(e.to_string()),
            }),
            None => Ok(()),
        }
    }

    /// Encrypted vaults: writes the held frames into the buffer after the header, in a random
    /// order, so that the order inside a pack says nothing of where their blocks are on the
    /// disk (packs still fill in disk order: which pack a block lands in is coarse locality,
    /// `docs/formats.md`). One copy per frame, as in a plaintext vault.
    fn lay_out_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        use rand::seq::SliceRandom;
        let room = PACK_HEADER_LEN
            + self.held_bytes
            + self.entries.len() * ENTRY_ROOM
            + PACK_FOOTER_LEN
            + cairn_format::crypto::SEAL_OVERHEAD
            + 4
            + ALIGN;
        if self.buf.len() + self.buf.room() < room {
            self.buf = AlignedBuf::with_capacity(room);
        }
        self.buf.clear();
        self.buf.extend(&pack_header(&self.vault.crypto));
        let mut order: Vec<usize> = (0..self.held.len()).collect();
        order.shuffle(&mut rand::rng());
        let mut laid = Vec::with_capacity(order.len());
        for i in order {
            let (Some(entry), Some(frame)) = (self.entries.get(i), self.held.get(i)) else {
                continue;
            };
            laid.push(PackEntry { offset: self.buf.len() as u32, ..*entry });
            self.buf.extend(frame);
        }
        self.entries = laid;
        self.held.clear();
        self.held_bytes = 0;
    }

    /// Uploads the last pack and waits for every upload; the packs are then part of the job.
    pub async fn finish(mut self) -> Result<(), Error> {
        self.seal().await?;
        while !self.uploads.is_empty() {
            self.collect_one().await?;
        }
        self.job.closed();
        Ok(())
    }
}

impl Vault {
    /// The frame of chunk `id` (whose plaintext is `plaintext`) as this vault stores it:
    /// compressed when that pays, encrypted in an encrypted vault.
    pub fn encode_chunk(&self, id: &Digest, plaintext: &[u8]) -> Result<Vec<u8>, Error> {
        let level = self.config.zstd_level();
        Ok(encode_chunk_in(&self.crypto, id, plaintext, level, rand::rng().random())?)
    }
}

/// Capacity of a pack buffer: a full pack plus one more frame of `frame` bytes or of the
/// largest block, and the table of a pack of small chunks.
fn pack_capacity(vault: &Vault, frame: usize) -> usize {
    let pack = vault.config.pack_size as usize;
    let block = vault.config.block_size as usize + 64;
    pack + frame.max(block) + pack / 64 + 64 * 1024
}
