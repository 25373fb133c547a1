//! Resuming: a backup that died leaves its uploads usable by the next backup of its VM.
//!
//! Each pack a backup uploads is recorded, create-only, beside its in-flight marker
//! (`inflight/<point>/<pack>.json`, with the pack's size), and a failed backup leaves its marker
//! and records in place. The next backup of the same VM reads the records of every marker of
//! that VM, checks each pack that no pack index names yet (its size as recorded, its table
//! readable and, in an encrypted vault, authentic), and may then use the chunks those tables
//! list without uploading them again. A pack it uses is *adopted*: listed in its own pack index
//! at commit, so its point never depends on an unindexed pack. Before it uses any, it records
//! them all (`inflight/<point>/adopted.json`), so that a collector sees them protected by a
//! live marker for as long as the adopting backup runs.
//!
//! The rule a collector must keep: a pack named by a record under a marker that is not stale
//! is live, however old the pack.

use std::collections::{BTreeMap, HashMap};

use cairn_format::pack::IndexedPack;
use cairn_format::{Digest, InflightMarker, Name, PointId, ResumeRecord, SizedPack};
use futures::StreamExt;
use object_store::path::Path;

use crate::chunks::PackTable;
use crate::{Error, Vault, layout};

/// Packs of interrupted backups that a new backup may adopt.
#[derive(Debug, Default)]
pub(crate) struct Resumable {
    /// Each chunk those packs hold, and which pack (index into `packs`).
    pub(crate) by_chunk: HashMap<Digest, usize>,
    /// The packs, with their tables.
    pub(crate) packs: Vec<IndexedPack>,
    /// Their sizes.
    pub(crate) sizes: Vec<u64>,
    /// The interrupted backups they come from.
    pub(crate) from: Vec<PointId>,
}

impl Resumable {
    pub(crate) fn is_empty(&self) -> bool {
        self.packs.is_empty()
    }

    /// The record that protects them while the adopting backup runs.
    pub(crate) fn record(&self) -> ResumeRecord {
        let packs = self
            .packs
            .iter()
            .zip(&self.sizes)
            .map(|(p, size)| SizedPack { pack: p.pack, size: *size })
            .collect();
        ResumeRecord { format: 1, packs }
    }
}

impl Vault {
    /// The packs that interrupted backups of `vm` (other than `ours`) uploaded or adopted and
    /// that no pack index names, each checked; a pack that fails a check is left alone.
    pub(crate) async fn resumable(
        &self,
        vm: &Name,
        ours: &PointId,
        condemned: &crate::gc::Condemned,
    ) -> Result<Resumable, Error> {
        let all = self.list_paths(&Path::from("inflight")).await?;
        let mut records: BTreeMap<PointId, Vec<Path>> = BTreeMap::new();
        for path in all.iter().filter(|p| !layout::is_marker(p) && !layout::is_side_record(p)) {
            let mut parts = path.parts().skip(1);
            if let Some(point) = parts.next().and_then(|p| p.as_ref().parse::<PointId>().ok()) {
                records.entry(point).or_default().push(path.clone());
            }
        }
        let mut from = Vec::new();
        let mut wanted: BTreeMap<Digest, u64> = BTreeMap::new();
        for (point, paths) in records {
            if &point == ours {
                continue;
            }
            match self.get_opened("in-flight marker", &layout::inflight(&point)).await {
                Ok(Some(bytes)) => match InflightMarker::decode(&bytes) {
                    Ok(m) if &m.vm == vm => {}
                    _ => continue,
                },
                // Records without a marker: their backup is being collected.
                _ => continue,
            }
            from.push(point);
            for path in paths {
                let record = match self.get_opened("resume record", &path).await {
                    Ok(Some(bytes)) => ResumeRecord::decode(&bytes),
                    _ => continue,
                };
                match record {
                    Ok(r) => wanted.extend(r.packs.iter().map(|p| (p.pack, p.size))),
                    Err(e) => tracing::warn!(%path, "unreadable resume record: {e}"),
                }
            }
        }
        let indexed = self
            .chunk_map
            .read(|m| wanted.keys().filter(|p| m.has_pack(p)).copied().collect::<Vec<_>>());
        for pack in indexed {
            wanted.remove(&pack);
        }
        // A collector is about to delete these: adopting one would reference a dying pack.
        wanted.retain(|pack, _| !condemned.contains(pack));
        let checked: Vec<_> = futures::stream::iter(wanted)
            .map(
                |(pack, size)| async move { (pack, size, self.check_resumable(&pack, size).await) },
            )
            .buffer_unordered(8)
            .collect()
            .await;
        let mut out = Resumable { from, ..Default::default() };
        for (pack, size, result) in checked {
            // A store error on one pack costs only that pack's resume, never the backup.
            let result = result.unwrap_or_else(|e| Err(e.to_string()));
            match result {
                Ok(entries) => {
                    let n = out.packs.len();
                    for e in &entries {
                        out.by_chunk.entry(e.id).or_insert(n);
                    }
                    out.packs.push(IndexedPack { pack, entries });
                    out.sizes.push(size);
                }
                Err(why) => tracing::info!(%pack, "not resuming from pack: {why}"),
            }
        }
        Ok(out)
    }

    /// The table of pack `pack` if it is `size` bytes and its table reads; `Ok(Err(why))` if
    /// not (gone, cut short, damaged), `Err` if the store cannot answer.
    async fn check_resumable(
        &self,
        pack: &Digest,
        size: u64,
    ) -> Result<Result<Vec<cairn_format::pack::PackEntry>, String>, Error> {
        Ok(match self.read_pack_table(pack).await? {
            PackTable::Gone => Err("gone".into()),
            PackTable::Bad(why) => Err(why),
            PackTable::Read(found, _) if found != size => {
                Err(format!("{found} bytes, its record says {size}"))
            }
            PackTable::Read(_, entries) => Ok(entries),
        })
    }
}
