//! Carrying out a plan: copy the live chunks out of the packs to repack, index them and what
//! survives of the rewritten pack indexes, then delete the old indexes and the packs.

use std::collections::{BTreeSet, HashSet};

use cairn_format::pack::{
    IndexedPack, PackEntry, decode_pack_index, encode_pack_index, pack_header, pack_trailer_in,
};
use cairn_format::{ChunkFrame, Digest, PointId};
use rand::RngExt;

use super::analysis::{Analysis, to_copy};
use crate::{Error, Vault, layout};

/// What a run did to the store.
#[derive(Clone, Debug, Default)]
pub(crate) struct Executed {
    pub(crate) packs_deleted: u64,
    pub(crate) bytes_deleted: u64,
    pub(crate) packs_written: u64,
    pub(crate) bytes_written: u64,
    pub(crate) chunks_copied: u64,
    pub(crate) indexes_rewritten: u64,
    /// Live chunks whose only copy was bad when read to be copied: (chunk, pack, why).
    pub(crate) bad_copies: Vec<(Digest, Digest, String)>,
}

/// New packs being filled with copied frames, indexed as they accumulate.
struct Repacker<'a> {
    vault: &'a Vault,
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
    /// Packs written and not yet in a pack index.
    written: Vec<IndexedPack>,
    /// The run's id, which names its first pack index.
    run: &'a PointId,
    /// Pack indexes this run wrote so far.
    indexes: usize,
    entries_per_index: usize,
    done: Executed,
}

impl Repacker<'_> {
    async fn add(&mut self, id: Digest, frame: &[u8]) -> Result<(), Error> {
        if self.buf.is_empty() {
            self.buf.extend_from_slice(&pack_header(&self.vault.crypto));
        }
        self.entries.push(PackEntry { id, offset: self.buf.len() as u32, len: frame.len() as u32 });
        self.buf.extend_from_slice(frame);
        self.done.chunks_copied += 1;
        if self.buf.len() as u64 >= u64::from(self.vault.config.pack_size) {
            self.seal().await?;
        }
        Ok(())
    }

    async fn seal(&mut self) -> Result<(), Error> {
        if self.entries.is_empty() {
            return Ok(());
        }
        let name = Digest(rand::rng().random());
        let path = layout::pack(&name);
        let entries = std::mem::take(&mut self.entries);
        let mut buf = std::mem::take(&mut self.buf);
        buf.extend(pack_trailer_in(
            &self.vault.crypto,
            path.as_ref(),
            &entries,
            rand::rng().random(),
        ));
        self.done.bytes_written += buf.len() as u64;
        self.done.packs_written += 1;
        self.vault.put_raw_new(&path, buf, "write").await?;
        self.written.push(IndexedPack { pack: name, entries });
        if self.written.iter().map(|p| p.entries.len()).sum::<usize>() >= self.entries_per_index {
            self.index_written().await?;
        }
        Ok(())
    }

    /// Indexes the packs written so far, once they are durable: a collection that copies
    /// millions of chunks holds at most one index's worth of their entries.
    async fn index_written(&mut self) -> Result<(), Error> {
        self.vault.barrier().await?;
        let packs = std::mem::take(&mut self.written);
        self.vault.write_gc_index(self.run, self.indexes, &packs).await?;
        self.indexes += 1;
        Ok(())
    }
}

impl Vault {
    /// Deletes the packs of `to_do` (condemned by the plan and by a fresh analysis `a`), after
    /// copying out the live chunks that have no other copy. `id` names the first pack index
    /// written.
    pub(crate) async fn execute(
        &self,
        a: &Analysis,
        to_do: &BTreeSet<Digest>,
        id: &PointId,
        entries_per_index: usize,
    ) -> Result<Executed, Error> {
        let mut r = Repacker {
            vault: self,
            buf: vec![],
            entries: vec![],
            written: vec![],
            run: id,
            indexes: 0,
            entries_per_index,
            done: Executed::default(),
        };
        // Only chunks that several repacked packs hold are remembered once copied.
        let mut copied: HashSet<Digest> = HashSet::new();
        let plan = to_copy(a, to_do);
        for needed in plan.places.chunk_by(|x, y| x.pack == y.pack) {
            let name = a.copies.pack(needed[0].pack);
            let path = layout::pack(&name);
            let Some(bytes) = self.get_bytes(&path).await? else {
                return Err(Error::GcUnsafe {
                    detail: format!(
                        "pack {name} vanished while being repacked (another gc?); nothing of it \
                         was deleted by this run: run gc again"
                    ),
                });
            };
            for p in needed {
                let e = PackEntry { id: p.id, offset: p.offset, len: p.len };
                let alternatives = plan.shared.contains(&e.id);
                if alternatives && copied.contains(&e.id) {
                    continue;
                }
                let range = e.offset as usize..e.offset as usize + e.len as usize;
                let Some(frame) = bytes.get(range) else {
                    r.done.bad_copies.push((e.id, name, "the pack ends before the frame".into()));
                    continue;
                };
                // Never carry a bad copy into a new pack: it would look good there.
                match ChunkFrame::decode_in(&self.crypto, frame, &e.id) {
                    Ok(_) => {
                        r.add(e.id, frame).await?;
                        if alternatives {
                            copied.insert(e.id);
                        }
                    }
                    Err(why) => r.done.bad_copies.push((e.id, name, why.to_string())),
                }
            }
        }
        r.seal().await?;
        self.barrier().await?;
        // Bad copies of a chunk that had a good one elsewhere in the repacked packs are not
        // losses.
        r.done.bad_copies.retain(|(id, _, _)| !copied.contains(id));
        drop(plan);
        let mut done = std::mem::take(&mut r.done);
        let (new_packs, wrote) = (std::mem::take(&mut r.written), r.indexes);
        let rewritten =
            self.replace_indexes(a, to_do, id, new_packs, wrote, entries_per_index).await?;
        done.indexes_rewritten = rewritten.len() as u64;
        self.delete_all(&rewritten).await?;
        for name in to_do {
            self.delete_all(&[layout::pack(name)]).await?;
            done.packs_deleted += 1;
            done.bytes_deleted += a.packs.get(name).map(|f| f.size).unwrap_or(0);
        }
        let stale_quarantine: Vec<_> = self
            .list_paths(&layout::quarantine())
            .await?
            .into_iter()
            .filter(|p| layout::parse_quarantined(p).is_some_and(|(_, pack)| to_do.contains(&pack)))
            .collect();
        self.delete_all(&stale_quarantine).await?;
        self.reload_chunk_map_if_loaded().await?;
        Ok(done)
    }

    /// Writes pack indexes that name the new packs and what survives of the indexes that name
    /// a pack of `to_do`, and makes them durable; returns the indexes they replace, for the
    /// caller to delete. The old indexes are read again one at a time, and the new ones are
    /// cut at `entries_per_index` entries (the indexes replaced may name most of the vault),
    /// so memory follows one index, not the vault.
    async fn replace_indexes(
        &self,
        a: &Analysis,
        to_do: &BTreeSet<Digest>,
        id: &PointId,
        new_packs: Vec<IndexedPack>,
        mut wrote: usize,
        entries_per_index: usize,
    ) -> Result<Vec<object_store::path::Path>, Error> {
        let mut named: HashSet<Digest> = new_packs.iter().map(|p| p.pack).collect();
        let mut group = new_packs;
        let mut rewritten = vec![];
        for (path, packs) in &a.indexes {
            if !packs.iter().any(|p| to_do.contains(p)) {
                continue;
            }
            rewritten.push(path.clone());
            if packs.iter().all(|p| to_do.contains(p) || named.contains(p)) {
                continue;
            }
            let Some(bytes) = self.get_bytes(path).await? else {
                return Err(Error::GcUnsafe {
                    detail: format!(
                        "pack index {path} vanished while being rewritten (another gc?); \
                         nothing was deleted by this run: run gc again"
                    ),
                });
            };
            let packs = self
                .crypto
                .open("pack index", path.as_ref(), &bytes)
                .and_then(|plain| decode_pack_index(&plain))
                .map_err(|e| Error::GcUnsafe {
                    detail: format!("pack index {path} cannot be read again ({e}); run gc again"),
                })?;
            for p in packs {
                if !to_do.contains(&p.pack) && named.insert(p.pack) {
                    group.push(p);
                }
            }
            if !group.is_empty()
                && group.iter().map(|p| p.entries.len()).sum::<usize>() >= entries_per_index
            {
                self.write_gc_index(id, wrote, &std::mem::take(&mut group)).await?;
                wrote += 1;
            }
        }
        if !group.is_empty() {
            self.write_gc_index(id, wrote, &group).await?;
        }
        self.barrier().await?;
        Ok(rewritten)
    }

    /// Writes the `n`th pack index of a collector run.
    async fn write_gc_index(
        &self,
        id: &PointId,
        n: usize,
        packs: &[IndexedPack],
    ) -> Result<(), Error> {
        let run = if n == 0 {
            id.clone()
        } else {
            PointId::new(jiff::Timestamp::now(), rand::rng().random())
        };
        self.put_new(&layout::gc_pack_index(&run), encode_pack_index(packs), "write").await
    }
}
