//! Carrying out a plan: copy the live chunks out of the packs to repack, index them and what
//! survives of the rewritten pack indexes, then delete the old indexes and the packs.

use std::collections::{BTreeSet, HashSet};

use cairn_format::pack::{IndexedPack, PackEntry, encode_pack_index, pack_header, pack_trailer_in};
use cairn_format::{ChunkFrame, Digest, PointId};
use rand::RngExt;

use super::analysis::{Analysis, copies_elsewhere, short};
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

/// New packs being filled with copied frames.
struct Repacker<'a> {
    vault: &'a Vault,
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
    written: Vec<IndexedPack>,
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
        Ok(())
    }
}

impl Vault {
    /// Deletes the packs of `to_do` (condemned by the plan and by a fresh analysis `a`), after
    /// copying out the live chunks that have no other copy. `id` names the pack index written.
    pub(crate) async fn execute(
        &self,
        a: &Analysis,
        to_do: &BTreeSet<Digest>,
        id: &PointId,
    ) -> Result<Executed, Error> {
        let elsewhere = copies_elsewhere(a, to_do);
        let mut r = Repacker {
            vault: self,
            buf: vec![],
            entries: vec![],
            written: vec![],
            done: Executed::default(),
        };
        let mut copied: HashSet<Digest> = HashSet::new();
        for name in a.repack.intersection(to_do) {
            let Some(entries) = a.packs.get(name).and_then(|f| f.entries.as_ref()) else {
                continue;
            };
            let needed: Vec<&PackEntry> = entries
                .iter()
                .filter(|e| {
                    a.live.contains(&short(&e.id))
                        && !a.quarantined.contains(&(e.id, *name))
                        && !elsewhere.contains(&e.id)
                        && !copied.contains(&e.id)
                })
                .collect();
            if needed.is_empty() {
                continue;
            }
            let path = layout::pack(name);
            let Some(bytes) = self.get_bytes(&path).await? else {
                return Err(Error::GcUnsafe {
                    detail: format!(
                        "pack {name} vanished while being repacked (another gc?); nothing of it \
                         was deleted by this run: run gc again"
                    ),
                });
            };
            for e in needed {
                let range = e.offset as usize..e.offset as usize + e.len as usize;
                let Some(frame) = bytes.get(range) else {
                    r.done.bad_copies.push((e.id, *name, "the pack ends before the frame".into()));
                    continue;
                };
                // Never carry a bad copy into a new pack: it would look good there.
                match ChunkFrame::decode_in(&self.crypto, frame, &e.id) {
                    Ok(_) => {
                        r.add(e.id, frame).await?;
                        copied.insert(e.id);
                    }
                    Err(why) => r.done.bad_copies.push((e.id, *name, why.to_string())),
                }
            }
        }
        r.seal().await?;
        self.barrier().await?;
        // Pack indexes that name a pack going away are replaced by one that names what
        // survives of them and the new packs, written and made durable before anything goes.
        let mut survivors: Vec<IndexedPack> = std::mem::take(&mut r.written);
        let mut named: HashSet<Digest> = survivors.iter().map(|p| p.pack).collect();
        let mut rewritten = vec![];
        for (path, packs) in &a.indexes {
            if !packs.iter().any(|p| to_do.contains(&p.pack)) {
                continue;
            }
            rewritten.push(path.clone());
            for p in packs {
                if !to_do.contains(&p.pack) && named.insert(p.pack) {
                    survivors.push(p.clone());
                }
            }
        }
        if !survivors.is_empty() {
            let path = layout::gc_pack_index(id);
            self.put_new(&path, encode_pack_index(&survivors), "write").await?;
            self.barrier().await?;
        }
        let mut done = r.done;
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
        self.reload_chunk_map().await?;
        Ok(done)
    }
}
