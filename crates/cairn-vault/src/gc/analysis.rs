//! What a collector finds: every pack, every pack index, the chunks live points need, and
//! from those the packs to delete or repack.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use cairn_format::Digest;
use cairn_format::pack::{IndexedPack, PackEntry, decode_pack_index};
use cairn_format::{PointId, ResumeRecord};
use futures::{StreamExt, TryStreamExt};
use jiff::Timestamp;
use object_store::path::Path;

use super::markers::{MarkerInfo, MarkerKind};
use crate::{Error, Vault, layout};

/// A chunk id cut to 16 bytes: the live set holds millions. Two ids that share them make a
/// dead chunk look live (it is kept), never the other way round.
pub(crate) type ShortId = u128;

pub(crate) fn short(id: &Digest) -> ShortId {
    let mut b = [0u8; 16];
    b.copy_from_slice(&id.0[..16]);
    u128::from_le_bytes(b)
}

/// One pack object.
#[derive(Clone, Debug, Default)]
pub(crate) struct PackFacts {
    pub(crate) size: u64,
    /// When the store wrote it.
    pub(crate) written: Option<Timestamp>,
    /// Its chunks, as the pack indexes that name it list them (`None`: unindexed).
    pub(crate) entries: Option<Vec<PackEntry>>,
    /// A resume record under a marker that is not stale names it.
    pub(crate) protected: bool,
    /// Bytes of its frames that live points need.
    pub(crate) live_bytes: u64,
}

/// The vault as the collector sees it.
#[derive(Debug, Default)]
pub(crate) struct Analysis {
    pub(crate) packs: BTreeMap<Digest, PackFacts>,
    /// Every pack index and the packs it names.
    pub(crate) indexes: Vec<(Path, Vec<IndexedPack>)>,
    /// Chunks that live points need (short ids).
    pub(crate) live: HashSet<ShortId>,
    /// Copies verify found bad: (chunk, pack).
    pub(crate) quarantined: HashSet<(Digest, Digest)>,
    /// Points read (live and soft-deleted: every manifest).
    pub(crate) points: usize,
    /// Condemned packs with no live chunk: deleted.
    pub(crate) dead: BTreeSet<Digest>,
    /// Condemned packs with live chunks below the repack threshold: copied out, then deleted.
    pub(crate) repack: BTreeSet<Digest>,
    /// Stray files under `packs/` (staging files a crash left), older than the stale age.
    pub(crate) strays: Vec<Path>,
    /// Packs a pack index names that the store does not hold (lost): condemned, so that the
    /// indexes stop naming them and no backup deduplicates against their chunks.
    pub(crate) missing: BTreeSet<Digest>,
    /// Packs no pack index names that hold live chunks (their index was lost or set aside):
    /// kept; `repair index` indexes them again.
    pub(crate) unindexed_live: BTreeSet<Digest>,
}

impl Analysis {
    /// Every condemned pack.
    pub(crate) fn condemned(&self) -> BTreeSet<Digest> {
        self.dead.union(&self.repack).chain(&self.missing).copied().collect()
    }
}

impl Vault {
    /// Reads the vault and decides what is garbage. `markers` are classified beforehand;
    /// the resume records under those that are not stale protect the packs they name.
    /// Packs whose live bytes are below `repack_below` of their size are repacked.
    pub(crate) async fn analyse(
        &self,
        markers: &[MarkerInfo],
        repack_below: f64,
        now: Timestamp,
        stale_after: jiff::SignedDuration,
    ) -> Result<Analysis, Error> {
        let mut a = Analysis::default();
        self.list_packs(&mut a, now, stale_after).await?;
        self.read_pack_indexes(&mut a).await?;
        self.protect_resumable(&mut a, markers).await?;
        a.quarantined = self
            .list_paths(&layout::quarantine())
            .await?
            .iter()
            .filter_map(layout::parse_quarantined)
            .collect();
        self.mark_live(&mut a).await?;
        self.mark_bases_live(&mut a, markers).await?;
        for (name, facts) in &mut a.packs {
            let Some(entries) = &facts.entries else {
                if !facts.protected {
                    // Unindexed and unclaimed: dead, unless its own table says it holds a
                    // chunk a point needs (its pack index lost, or set aside by verify).
                    match self.read_pack_table(name).await? {
                        crate::chunks::PackTable::Read(_, entries)
                            if entries.iter().any(|e| a.live.contains(&short(&e.id))) =>
                        {
                            a.unindexed_live.insert(*name);
                        }
                        crate::chunks::PackTable::Read(..) | crate::chunks::PackTable::Gone => {
                            a.dead.insert(*name);
                        }
                        crate::chunks::PackTable::Bad(_) => {
                            let old =
                                facts.written.is_some_and(|w| now.duration_since(w) > stale_after);
                            if old {
                                a.dead.insert(*name);
                            }
                        }
                    }
                }
                continue;
            };
            facts.live_bytes = entries
                .iter()
                .filter(|e| {
                    a.live.contains(&short(&e.id)) && !a.quarantined.contains(&(e.id, *name))
                })
                .map(|e| u64::from(e.len))
                .sum();
            if facts.live_bytes == 0 {
                a.dead.insert(*name);
            } else if (facts.live_bytes as f64) < repack_below * facts.size as f64 {
                a.repack.insert(*name);
            }
        }
        Ok(a)
    }

    async fn list_packs(
        &self,
        a: &mut Analysis,
        now: Timestamp,
        stale_after: jiff::SignedDuration,
    ) -> Result<(), Error> {
        let prefix = layout::packs();
        let metas = self.list_metas(&prefix).await?;
        for meta in metas {
            let written = super::store_time(&meta);
            match layout::parse_pack_path(&meta.location) {
                Some(name) => {
                    let facts =
                        PackFacts { size: meta.size, written: Some(written), ..Default::default() };
                    a.packs.insert(name, facts);
                }
                None if now.duration_since(written) > stale_after => a.strays.push(meta.location),
                None => {}
            }
        }
        Ok(())
    }

    /// Reads every pack index. One that cannot be read stops the collector: the chunks it
    /// places are unknown, and a pack it names might look unindexed.
    async fn read_pack_indexes(&self, a: &mut Analysis) -> Result<(), Error> {
        let paths = self.list_paths(&layout::pack_indexes()).await?;
        let read: Vec<_> = futures::stream::iter(paths)
            .map(|path| async move {
                let bytes = self.get_bytes(&path).await?;
                Ok::<_, Error>((path, bytes))
            })
            .buffered(16)
            .try_collect()
            .await?;
        for (path, bytes) in read {
            let Some(bytes) = bytes else { continue };
            let packs = self
                .crypto
                .open("pack index", path.as_ref(), &bytes)
                .and_then(|plain| decode_pack_index(&plain))
                .map_err(|e| Error::GcUnsafe {
                    detail: format!(
                        "pack index {path} cannot be read ({e}); run `cairn-agent verify` (it \
                         moves it aside) and `cairn-agent repair index`, then gc again"
                    ),
                })?;
            for p in &packs {
                let facts = a.packs.entry(p.pack).or_default();
                match &mut facts.entries {
                    None => facts.entries = Some(p.entries.clone()),
                    Some(known) => {
                        let have: HashSet<Digest> = known.iter().map(|e| e.id).collect();
                        known.extend(p.entries.iter().filter(|e| !have.contains(&e.id)).copied());
                    }
                }
            }
            a.indexes.push((path, packs));
        }
        // A pack an index names and the store does not hold: lost. Its entries go from the
        // indexes (the points that need it are damaged either way; verify names them).
        let missing: Vec<Digest> =
            a.packs.iter().filter(|(_, f)| f.written.is_none()).map(|(n, _)| *n).collect();
        for name in missing {
            a.packs.remove(&name);
            a.missing.insert(name);
        }
        Ok(())
    }

    /// Packs named by the resume records of markers that are not stale or done are kept for
    /// a resume, however old. A record that cannot be read protects every unindexed pack.
    async fn protect_resumable(
        &self,
        a: &mut Analysis,
        markers: &[MarkerInfo],
    ) -> Result<(), Error> {
        let keep: BTreeSet<&PointId> = markers
            .iter()
            .filter(|m| matches!(m.kind, MarkerKind::Running | MarkerKind::Dead))
            .map(|m| &m.point)
            .collect();
        for point in keep {
            for path in self.list_paths(&layout::resume_records(point)).await? {
                if layout::is_side_record(&path) {
                    continue;
                }
                let record = match self.get_opened("resume record", &path).await {
                    Ok(Some(bytes)) => ResumeRecord::decode(&bytes).ok(),
                    Ok(None) => continue,
                    Err(Error::Corrupt { .. }) => None,
                    Err(e) => return Err(e),
                };
                match record {
                    Some(r) => {
                        for p in r.packs {
                            if let Some(f) = a.packs.get_mut(&p.pack) {
                                f.protected = true;
                            }
                        }
                    }
                    None => {
                        tracing::warn!(%path, "unreadable resume record: every unindexed pack is kept");
                        a.packs.values_mut().for_each(|f| f.protected = true);
                    }
                }
            }
        }
        Ok(())
    }

    /// The chunks every manifest needs: each disk's index root, its pages, and every chunk a
    /// page entry names (a patch's base and patch both). Manifests or pages that cannot be
    /// read stop the collector: what they need is unknown.
    async fn mark_live(&self, a: &mut Analysis) -> Result<(), Error> {
        let listing = self.list_points(None).await?;
        if let Some(u) = listing.unreadable.first() {
            return Err(Error::GcUnsafe {
                detail: format!(
                    "the manifest of point {} of VM {} cannot be read ({}); what it needs is \
                     unknown. Verify the vault; remove the point only if it is beyond repair",
                    u.point, u.vm, u.error
                ),
            });
        }
        a.points = listing.points.len();
        let mut pages_seen: HashSet<ShortId> = HashSet::new();
        for m in &listing.points {
            let unsafe_point = |what: String, e: Error| Error::GcUnsafe {
                detail: format!(
                    "point {} of VM {}: {what} cannot be read ({e}); what it needs is unknown. \
                     Run `cairn-agent verify`",
                    m.point, m.vm
                ),
            };
            for (disk, record) in &m.disks {
                a.live.insert(short(&record.index_root));
                let root = self
                    .read_disk_index(record)
                    .await
                    .map_err(|e| unsafe_point(format!("the index of disk {disk}"), e))?;
                let todo: Vec<Digest> = crate::verify::page_runs(&root)
                    .into_iter()
                    .map(|(page, _, _)| page)
                    .filter(|p| pages_seen.insert(short(p)))
                    .collect();
                let mut pages = futures::stream::iter(todo)
                    .map(|id| async move { (id, self.read_index_page(&id).await) })
                    .buffer_unordered(16);
                while let Some((id, page)) = pages.next().await {
                    let page = page.map_err(|e| unsafe_point(format!("index page {id}"), e))?;
                    a.live.insert(short(&id));
                    a.live.extend(page.entries().flat_map(|e| e.chunks()).map(|c| short(&c)));
                }
            }
        }
        Ok(())
    }
}

impl Vault {
    /// What the bases of backups still in flight reach is live too: such a backup carries
    /// chunks of its base into its point even if the base is purged meanwhile. A base whose
    /// index cannot be read any more is skipped (nothing of it is left to keep).
    async fn mark_bases_live(&self, a: &mut Analysis, markers: &[MarkerInfo]) -> Result<(), Error> {
        let mut pages_seen: HashSet<ShortId> = HashSet::new();
        for m in markers {
            let path = layout::base_record(&m.point);
            let record = match self.get_opened("base record", &path).await {
                Ok(Some(bytes)) => cairn_format::BaseRecord::decode(&bytes).ok(),
                Ok(None) => continue,
                Err(Error::Corrupt { .. }) => None,
                Err(e) => return Err(e),
            };
            let Some(record) = record else {
                tracing::warn!(%path, "unreadable base record; its base is not protected");
                continue;
            };
            for root_id in record.roots {
                a.live.insert(short(&root_id));
                let Ok(root) = self.read_index_root(&root_id).await else { continue };
                for (page, _, _) in crate::verify::page_runs(&root) {
                    if !pages_seen.insert(short(&page)) {
                        continue;
                    }
                    a.live.insert(short(&page));
                    if let Ok(page) = self.read_index_page(&page).await {
                        a.live.extend(page.entries().flat_map(|e| e.chunks()).map(|c| short(&c)));
                    }
                }
            }
        }
        Ok(())
    }
}

/// For each live chunk of the `repack` packs, whether a copy survives elsewhere (in a pack
/// that is indexed and not condemned, and not quarantined there).
pub(crate) fn copies_elsewhere(a: &Analysis, condemned: &BTreeSet<Digest>) -> HashSet<Digest> {
    let wanted: HashSet<Digest> = a
        .repack
        .iter()
        .filter_map(|p| a.packs.get(p).and_then(|f| f.entries.as_ref()).map(|e| (p, e)))
        .flat_map(|(p, entries)| {
            entries
                .iter()
                .filter(|e| a.live.contains(&short(&e.id)) && !a.quarantined.contains(&(e.id, *p)))
                .map(|e| e.id)
        })
        .collect();
    let mut found = HashSet::new();
    let mut by_pack: HashMap<&Digest, &Vec<PackEntry>> = HashMap::new();
    for (name, f) in &a.packs {
        if let Some(entries) = &f.entries
            && !condemned.contains(name)
        {
            by_pack.insert(name, entries);
        }
    }
    for (name, entries) in by_pack {
        for e in entries {
            if wanted.contains(&e.id) && !a.quarantined.contains(&(e.id, *name)) {
                found.insert(e.id);
            }
        }
    }
    found
}
