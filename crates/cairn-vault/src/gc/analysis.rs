//! What a collector finds: every pack, every pack index, the chunks live points need, and
//! from those the packs to delete or repack.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use cairn_format::Digest;
use cairn_format::index::{IndexPage, IndexRoot};
use cairn_format::pack::decode_pack_index;
use cairn_format::{PointId, ResumeRecord};
use futures::StreamExt;
use jiff::Timestamp;
use object_store::ObjectStoreExt;
use object_store::path::Path;

use super::copies::Copies;
use super::markers::{MarkerInfo, MarkerKind};
use crate::chunk_map::ChunkLocation;
use crate::place_table::Place;
use crate::{Error, Vault, layout};

/// One pack object.
#[derive(Clone, Debug, Default)]
pub(crate) struct PackFacts {
    pub(crate) size: u64,
    /// When the store wrote it (`None`: a pack index names it, the store does not hold it).
    pub(crate) written: Option<Timestamp>,
    /// A pack index names it.
    pub(crate) indexed: bool,
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
    pub(crate) indexes: Vec<(Path, Vec<Digest>)>,
    /// Every copy of every chunk, with what live points need marked.
    pub(crate) copies: Copies,
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

    /// True if the copy at `p` is in a pack the store holds and verify did not find it bad.
    pub(crate) fn readable(&self, p: &Place) -> bool {
        let pack = self.copies.pack(p.pack);
        self.packs.get(&pack).is_some_and(|f| f.written.is_some())
            && (self.quarantined.is_empty() || !self.quarantined.contains(&(p.id, pack)))
    }

    /// Where to read chunk `id` from.
    fn locate(&self, id: &Digest) -> Option<ChunkLocation> {
        self.copies.locate(id, |p| self.readable(p))
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
        // Manifests, then pack indexes, then packs: each is durable before the next is
        // written, so every point listed finds its chunks in the indexes read, and a pack an
        // index names that the listing lacks is lost, not merely new. What commits later was
        // written by a backup that the plan and the wait keep off condemned packs.
        let listing = self.list_points(None).await?;
        // Markers again, after the manifests: a backup whose marker was written after the
        // caller looked may have picked a base that is purged before the listing above; its
        // base record, written before it checked that base, is found here.
        let mut markers = markers.to_vec();
        for m in self.classify_markers(Timestamp::now(), stale_after).await? {
            if !markers.iter().any(|k| k.point == m.point) {
                markers.push(m);
            }
        }
        let markers = &markers[..];
        self.read_pack_indexes(&mut a).await?;
        self.list_packs(&mut a, now, stale_after).await?;
        // A pack an index names and the listing lacks: lost, once the store confirms it (a
        // listing that silently left one out must not condemn it). Its entries go from the
        // indexes (the points that need it are damaged either way; verify names them).
        let unlisted: Vec<Digest> =
            a.packs.iter().filter(|(_, f)| f.written.is_none()).map(|(n, _)| *n).collect();
        for name in unlisted {
            match self.store.head(&layout::pack(&name)).await {
                Ok(meta) => {
                    let facts = a.packs.entry(name).or_default();
                    facts.size = meta.size;
                    facts.written = Some(super::store_time(&meta));
                }
                Err(object_store::Error::NotFound { .. }) => {
                    a.packs.remove(&name);
                    a.missing.insert(name);
                }
                Err(e) => return Err(Error::storage("read", &layout::pack(&name), e)),
            }
        }
        self.protect_resumable(&mut a, markers).await?;
        a.quarantined = self
            .list_paths(&layout::quarantine())
            .await?
            .iter()
            .filter_map(layout::parse_quarantined)
            .collect();
        // Unindexed packs no running backup claims are dead, unless their own tables say
        // they hold a chunk a point needs (their pack index lost, or set aside by verify):
        // those tables join the copy table before anything is marked.
        let unclaimed: Vec<Digest> = a
            .packs
            .iter()
            .filter(|(_, f)| !f.indexed && !f.protected)
            .map(|(name, _)| *name)
            .collect();
        for name in unclaimed {
            match self.read_pack_table(&name).await? {
                crate::chunks::PackTable::Read(_, entries) => a.copies.push(name, &entries),
                crate::chunks::PackTable::Gone => {
                    a.dead.insert(name);
                }
                crate::chunks::PackTable::Bad(_) => {
                    let written = a.packs.get(&name).and_then(|f| f.written);
                    if written.is_some_and(|w| now.duration_since(w) > stale_after) {
                        a.dead.insert(name);
                    }
                }
            }
        }
        a.copies.settle();
        self.mark_live(&mut a, &listing).await?;
        self.mark_bases_live(&mut a, markers).await?;
        // Live bytes, without the copies verify quarantined; and whether a pack holds a live
        // chunk at all (a quarantine marker is only a name: it never gets an unindexed pack
        // deleted).
        let mut live_bytes = vec![0u64; a.copies.pack_count()];
        let mut holds_live = vec![false; a.copies.pack_count()];
        for group in a.copies.live_groups() {
            for p in group {
                holds_live[p.pack as usize] = true;
                let pack = a.copies.pack(p.pack);
                if a.quarantined.is_empty() || !a.quarantined.contains(&(p.id, pack)) {
                    live_bytes[p.pack as usize] += u64::from(p.len);
                }
            }
        }
        let mut unindexed_live = BTreeSet::new();
        for (n, bytes) in live_bytes.into_iter().enumerate() {
            let name = a.copies.pack(n as u32);
            if let Some(f) = a.packs.get_mut(&name) {
                f.live_bytes = bytes;
                if !f.indexed && holds_live[n] {
                    unindexed_live.insert(name);
                }
            }
        }
        for (name, facts) in &a.packs {
            if facts.protected || a.dead.contains(name) {
                continue;
            }
            if !facts.indexed {
                if unindexed_live.contains(name) {
                    a.unindexed_live.insert(*name);
                } else if a.copies.has_pack(name) {
                    // Its table was read and names nothing a point needs.
                    a.dead.insert(*name);
                }
                continue;
            }
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
                    let facts = a.packs.entry(name).or_default();
                    facts.size = meta.size;
                    facts.written = Some(written);
                }
                None if now.duration_since(written) > stale_after => a.strays.push(meta.location),
                None => {}
            }
        }
        Ok(())
    }

    /// Reads every pack index, one at a time into the copy table. One that cannot be read
    /// stops the collector: the chunks it places are unknown, and a pack it names might look
    /// unindexed.
    async fn read_pack_indexes(&self, a: &mut Analysis) -> Result<(), Error> {
        let paths = self.list_paths(&layout::pack_indexes()).await?;
        let mut read = futures::stream::iter(paths)
            .map(|path| async move {
                let bytes = self.get_bytes(&path).await?;
                Ok::<_, Error>((path, bytes))
            })
            .buffered(4);
        while let Some(next) = read.next().await {
            let (path, bytes) = next?;
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
            drop(bytes);
            for p in &packs {
                let facts = a.packs.entry(p.pack).or_default();
                facts.indexed = true;
                // A pack named twice (a collector stopped between writing an index and
                // deleting the ones it replaces) is one pack: its places are kept once each
                // (the table keeps distinct places), and a place only one index lists counts.
                a.copies.push(p.pack, &p.entries);
            }
            a.indexes.push((path, packs.iter().map(|p| p.pack).collect()));
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
    async fn mark_live(
        &self,
        a: &mut Analysis,
        listing: &crate::PointListing,
    ) -> Result<(), Error> {
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
        let mut pages_seen: HashSet<Digest> = HashSet::new();
        for m in &listing.points {
            let unsafe_point = |what: String, e: Error| Error::GcUnsafe {
                detail: format!(
                    "point {} of VM {}: {what} cannot be read ({e}); what it needs is unknown. \
                     Run `cairn-agent verify`",
                    m.point, m.vm
                ),
            };
            for (disk, record) in &m.disks {
                a.copies.mark_live(&record.index_root);
                let root = self
                    .read_root(a, &record.index_root)
                    .await
                    .and_then(|root| {
                        root.check_geometry(record.size, record.block_size).map(|()| root).map_err(
                            |source| Error::Corrupt {
                                path: format!("chunk {}", record.index_root),
                                source,
                            },
                        )
                    })
                    .map_err(|e| unsafe_point(format!("the index of disk {disk}"), e))?;
                let todo: Vec<(Digest, Option<ChunkLocation>)> = crate::verify::page_runs(&root)
                    .into_iter()
                    .map(|(page, _, _)| page)
                    .filter(|p| pages_seen.insert(*p))
                    .map(|p| (p, a.locate(&p)))
                    .collect();
                let mut pages = futures::stream::iter(todo)
                    .map(|(id, loc)| async move { (id, self.read_page(&id, loc).await) })
                    .buffer_unordered(16);
                while let Some((id, page)) = pages.next().await {
                    let page = page.map_err(|e| unsafe_point(format!("index page {id}"), e))?;
                    a.copies.mark_live(&id);
                    page.entries().flat_map(|e| e.chunks()).for_each(|c| a.copies.mark_live(&c));
                }
            }
        }
        Ok(())
    }

    async fn read_root(&self, a: &Analysis, id: &Digest) -> Result<IndexRoot, Error> {
        let loc = a.locate(id).ok_or(Error::ChunkMissing { id: *id })?;
        self.read_index_root_at(id, &loc).await
    }

    async fn read_page(&self, id: &Digest, loc: Option<ChunkLocation>) -> Result<IndexPage, Error> {
        let loc = loc.ok_or(Error::ChunkMissing { id: *id })?;
        self.read_index_page_at(id, &loc).await
    }
}

impl Vault {
    /// What the bases of backups still in flight reach is live too: such a backup carries
    /// chunks of its base into its point even if the base is purged meanwhile. A base whose
    /// index cannot be read any more is skipped (nothing of it is left to keep).
    async fn mark_bases_live(&self, a: &mut Analysis, markers: &[MarkerInfo]) -> Result<(), Error> {
        let mut pages_seen: HashSet<Digest> = HashSet::new();
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
                a.copies.mark_live(&root_id);
                let root = match self.read_root(a, &root_id).await {
                    Ok(root) => root,
                    Err(Error::ChunkMissing { .. } | Error::Corrupt { .. }) => continue,
                    Err(e) => return Err(e),
                };
                for (page, _, _) in crate::verify::page_runs(&root) {
                    if !pages_seen.insert(page) {
                        continue;
                    }
                    a.copies.mark_live(&page);
                    match self.read_page(&page, a.locate(&page)).await {
                        Ok(page) => page
                            .entries()
                            .flat_map(|e| e.chunks())
                            .for_each(|c| a.copies.mark_live(&c)),
                        Err(Error::ChunkMissing { .. } | Error::Corrupt { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(())
    }
}

/// The live chunks to copy out of the packs being repacked.
pub(crate) struct ToCopy {
    /// Their places, sorted by pack and offset: 44 bytes a chunk, so that a collection that
    /// copies most of a large vault costs no more than its table of copies.
    pub(crate) places: Vec<Place>,
    /// Chunks that several repacked packs hold good copies of: the first that reads well is
    /// copied, the others are skipped (rare: a pack named twice, or repaired).
    pub(crate) shared: HashSet<Digest>,
}

/// The live chunks to copy out of the packs of `to_do` that are repacked: those with no good
/// copy in a pack that is indexed and not condemned.
pub(crate) fn to_copy(a: &Analysis, to_do: &BTreeSet<Digest>) -> ToCopy {
    // What each pack number is, looked up once per pack rather than once per copy.
    let kinds: Vec<(bool, bool)> = (0..a.copies.pack_count() as u32)
        .map(|n| {
            let pack = a.copies.pack(n);
            let indexed = a.packs.get(&pack).is_some_and(|f| f.indexed);
            let survives = indexed && !to_do.contains(&pack);
            let repacked = a.repack.contains(&pack) && to_do.contains(&pack);
            (survives, repacked)
        })
        .collect();
    // Two passes: the first counts, so the list is allocated once at its size.
    let sources = |group: &'_ [Place]| -> Option<Vec<Place>> {
        let good = |p: &&Place| a.readable(p);
        if group.iter().filter(good).any(|p| kinds[p.pack as usize].0) {
            return None;
        }
        Some(group.iter().filter(good).filter(|p| kinds[p.pack as usize].1).copied().collect())
    };
    let count: usize = a.copies.live_groups().filter_map(sources).map(|from| from.len()).sum();
    let mut out = ToCopy { places: Vec::with_capacity(count), shared: HashSet::new() };
    for from in a.copies.live_groups().filter_map(sources) {
        if from.len() > 1 {
            out.shared.insert(from[0].id);
        }
        out.places.extend(from);
    }
    out.places.sort_unstable_by_key(|p| (p.pack, p.offset));
    out
}
