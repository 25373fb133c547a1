//! Verify: re-read every chunk the chosen points reference, check CRC and SHA-256, rebuild every
//! patched block and check it against its full SHA-256, name each bad chunk and every point it
//! damages, quarantine it and record the damage.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use cairn_format::index::{BlockEntry, IndexRoot, PatchRef};
use cairn_format::{ChunkFrame, DamageRecord, Digest, Name, PointId, PointManifest};
use futures::StreamExt;

use crate::chunks::PackTable;
use crate::verdicts::Verdicts;
use crate::{Error, UnreadablePoint, Vault, layout};

/// Which points to verify.
#[derive(Clone, Debug, Default)]
pub struct VerifyScope {
    /// Only this VM's points.
    pub vm: Option<Name>,
    /// Only this point.
    pub point: Option<PointId>,
}

/// A chunk that failed verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadChunk {
    /// The chunk.
    pub id: Digest,
    /// What is wrong ("missing", a CRC or digest mismatch...).
    pub reason: String,
    /// Every point in the vault that references it.
    pub points: Vec<(Name, PointId)>,
}

/// Counters reported while verify runs.
#[derive(Clone, Debug, Default)]
pub struct VerifyProgress {
    /// Points finished.
    pub points_done: u64,
    /// Points to check.
    pub points_total: u64,
    /// Distinct chunks read so far.
    pub chunks_checked: u64,
    /// Their stored bytes.
    pub bytes_checked: u64,
}

/// What verify found.
#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    /// Points checked.
    pub points_checked: u64,
    /// Distinct chunks read (blocks and index pages).
    pub chunks_checked: u64,
    /// Their stored bytes.
    pub bytes_checked: u64,
    /// Bad chunks, each with the points it damages.
    pub bad_chunks: Vec<BadChunk>,
    /// Points that reference a bad chunk (in scope or not), or whose index does not fit them.
    pub damaged_points: Vec<(Name, PointId)>,
    /// Points whose index does not fit their manifest (a root of another disk size, a page
    /// that does not cover its place), with why. Their chunks may be sound and shared with
    /// other points, so nothing is quarantined for them: only the point is damaged.
    pub inconsistent: Vec<(Name, PointId, String)>,
    /// Manifests that could not be read.
    pub unreadable: Vec<UnreadablePoint>,
    /// Pack indexes that could not be read: `(object, reason)`. Their chunks count as missing.
    pub unreadable_pack_indexes: Vec<(String, String)>,
    /// Packs whose header or table is damaged, or whose table disagrees with the pack index:
    /// `(object, reason)`. Their chunks are checked one by one above (the pack index locates
    /// them); the pack's own table, which would rebuild a lost index, is what is bad.
    pub damaged_packs: Vec<(String, String)>,
}

impl VerifyReport {
    /// True when nothing is damaged.
    pub fn is_clean(&self) -> bool {
        self.bad_chunks.is_empty()
            && self.damaged_points.is_empty()
            && self.unreadable.is_empty()
            && self.unreadable_pack_indexes.is_empty()
            && self.damaged_packs.is_empty()
    }
}

/// Patched blocks already rebuilt and checked: (block digest, base, patch). Kept small, as
/// verify holds one per distinct patched block of the vault.
type Rebuilt = HashSet<(Digest, Digest, Digest)>;

impl Vault {
    /// Verifies the points in `scope`; see the module docs. Returns an error only when the
    /// vault cannot be read at all; damage is in the report.
    pub async fn verify(
        &self,
        scope: &VerifyScope,
        on_progress: &(dyn Fn(&VerifyProgress) + Sync),
    ) -> Result<VerifyReport, Error> {
        self.refresh_chunk_map().await?;
        let mut listing = self.list_points(scope.vm.as_ref()).await?;
        if let Some(point) = &scope.point {
            listing.points.retain(|m| &m.point == point);
            listing.unreadable.retain(|u| &u.point == point);
            if listing.points.is_empty() && listing.unreadable.is_empty() {
                return Err(match &scope.vm {
                    Some(vm) => Error::PointNotFound { vm: vm.clone(), point: point.clone() },
                    None => Error::Url {
                        url: self.url().into(),
                        detail: format!("no point {point} in this vault"),
                    },
                });
            }
        }
        let mut verdicts = Verdicts::default();
        let mut rebuilt = HashSet::new();
        let mut progress =
            VerifyProgress { points_total: listing.points.len() as u64, ..Default::default() };
        let mut report = VerifyReport { unreadable: listing.unreadable, ..Default::default() };
        let mut refs: BTreeMap<Digest, BTreeSet<(Name, PointId)>> = BTreeMap::new();
        let mut clean_points = Vec::new();
        let mut misfits: BTreeMap<(Name, PointId), BTreeMap<Digest, String>> = BTreeMap::new();
        for m in &listing.points {
            let mut misfit = BTreeMap::new();
            let bad = self
                .verify_point(
                    m,
                    &mut verdicts,
                    &mut misfit,
                    &mut rebuilt,
                    &mut progress,
                    on_progress,
                )
                .await?;
            for id in &bad {
                refs.entry(*id).or_default().insert((m.vm.clone(), m.point.clone()));
            }
            if bad.is_empty() && misfit.is_empty() {
                clean_points.push((m.vm.clone(), m.point.clone()));
            }
            if !misfit.is_empty() {
                misfits.insert((m.vm.clone(), m.point.clone()), misfit);
            }
            progress.points_done += 1;
            on_progress(&progress);
        }
        report.points_checked = listing.points.len() as u64;
        report.chunks_checked = progress.chunks_checked;
        report.bytes_checked = progress.bytes_checked;

        report.damaged_packs = self.check_packs(&verdicts).await?;
        let bad: BTreeMap<Digest, String> = verdicts.into_bad();
        if !bad.is_empty() {
            // Points outside the scope may reference the same chunks: find them from indexes.
            let everything = self.list_points(None).await?;
            for m in &everything.points {
                let key = (m.vm.clone(), m.point.clone());
                if refs.values().any(|s| s.contains(&key)) {
                    continue;
                }
                for id in self.referenced_among(m, &bad).await? {
                    refs.entry(id).or_default().insert(key.clone());
                }
            }
            for (id, reason) in &bad {
                tracing::warn!(chunk = %id, %reason, "bad chunk; moving it to quarantine");
                self.quarantine_chunk(id, reason).await?;
            }
        }
        let mut damaged: BTreeMap<(Name, PointId), BTreeMap<Digest, String>> = BTreeMap::new();
        for (id, points) in &refs {
            let reason = bad.get(id).cloned().unwrap_or_default();
            for p in points {
                damaged.entry(p.clone()).or_default().insert(*id, reason.clone());
            }
            report.bad_chunks.push(BadChunk {
                id: *id,
                reason,
                points: points.iter().cloned().collect(),
            });
        }
        for (point, reasons) in misfits {
            for (id, reason) in &reasons {
                report.inconsistent.push((point.0.clone(), point.1.clone(), reason.clone()));
                damaged.entry(point.clone()).or_default().insert(*id, reason.clone());
            }
        }
        for ((vm, point), bad_chunks) in &damaged {
            let record = DamageRecord {
                format: 1,
                point: point.clone(),
                vm: vm.clone(),
                found_at: jiff::Timestamp::now(),
                bad_chunks: bad_chunks.clone(),
            };
            self.write_damage(&record).await?;
        }
        let states = self.point_states(scope.vm.as_ref()).await?;
        let now = jiff::Timestamp::now();
        for (vm, point) in clean_points {
            self.clear_damage(&vm, &point).await?;
            self.note_verification(&states, &vm, &point, now, true).await?;
        }
        for (vm, point) in damaged.keys() {
            self.note_verification(&states, vm, point, now, false).await?;
        }
        report.damaged_points = damaged.into_keys().collect();
        report.unreadable_pack_indexes = self.unreadable_pack_indexes();
        self.quarantine_pack_indexes().await?;
        Ok(report)
    }

    /// Records verify's outcome on a point in a note, when it differs from the last one
    /// recorded (a vault verified daily does not gain a note per point per day). A point
    /// whose manifest is gone (purged meanwhile) gets none.
    async fn note_verification(
        &self,
        states: &crate::PointStates,
        vm: &Name,
        point: &PointId,
        at: jiff::Timestamp,
        clean: bool,
    ) -> Result<(), Error> {
        let known = states.get(vm, point).ok().and_then(|s| s.verified).map(|v| v.clean);
        if known == Some(clean) {
            return Ok(());
        }
        let change = cairn_format::Change::Verified(cairn_format::Verification { at, clean });
        match self.read_point(vm, point).await {
            Ok(_) => match self.write_note(vm, point, "verify", &[change]).await {
                // The check itself is done and reported (and damage is recorded apart): a
                // full store costs only the note, which the next verify writes.
                Err(Error::StorageFull { path }) => {
                    tracing::warn!(
                        %vm, %point,
                        "the store is full: verify's outcome could not be noted on the point ({path})"
                    );
                    Ok(())
                }
                other => other.map(|_| ()),
            },
            Err(Error::PointNotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Checks every chunk of one point; returns the bad ones. An index that does not fit the
    /// point (its chunks sound) goes into `misfit`, by the chunk that does not fit.
    async fn verify_point(
        &self,
        m: &PointManifest,
        verdicts: &mut Verdicts,
        misfit: &mut BTreeMap<Digest, String>,
        rebuilt: &mut Rebuilt,
        progress: &mut VerifyProgress,
        on_progress: &(dyn Fn(&VerifyProgress) + Sync),
    ) -> Result<BTreeSet<Digest>, Error> {
        let mut bad = BTreeSet::new();
        for disk in m.disks.values() {
            if !self.check_all(&[disk.index_root], verdicts, progress).await? {
                bad.insert(disk.index_root);
                continue;
            }
            let root = match self.read_disk_index(disk).await {
                Ok(root) => root,
                // The root is a sound chunk (checked above) that does not describe this disk.
                Err(Error::Corrupt { source, .. }) => {
                    misfit.insert(disk.index_root, source.to_string());
                    continue;
                }
                Err(e) => return Err(e),
            };
            for (page_id, first, last) in page_runs(&root) {
                if !self.check_all(&[page_id], verdicts, progress).await? {
                    bad.insert(page_id);
                    continue;
                }
                let page = self.read_index_page(&page_id).await?;
                // A page that does not cover its place would shift every later block.
                let misplaced =
                    [first, last].into_iter().find_map(|at| root.check_page(at, &page).err());
                if let Some(e) = misplaced {
                    misfit.insert(page_id, e.to_string());
                    continue;
                }
                let mut ids: Vec<Digest> = page.entries().flat_map(|e| e.chunks()).collect();
                ids.sort();
                ids.dedup();
                self.check_all(&ids, verdicts, progress).await?;
                for entry in page.entries() {
                    if let BlockEntry::Patch(p) = entry {
                        self.check_rebuild(&p, verdicts, rebuilt).await?;
                    }
                }
                bad.extend(ids.iter().filter(|id| verdicts.bad(id)));
                on_progress(progress);
            }
        }
        Ok(bad)
    }

    /// Checks the chunks not checked yet, a few at a time; true when all of `ids` are good.
    async fn check_all(
        &self,
        ids: &[Digest],
        verdicts: &mut Verdicts,
        progress: &mut VerifyProgress,
    ) -> Result<bool, Error> {
        let todo: Vec<Digest> = ids.iter().filter(|id| !verdicts.known(id)).copied().collect();
        let mut results = futures::stream::iter(todo)
            .map(|id| async move { (id, self.check_chunk(&id).await) })
            .buffer_unordered(32);
        while let Some((id, result)) = results.next().await {
            let verdict = match result? {
                Ok(len) => {
                    progress.bytes_checked += len;
                    None
                }
                Err(reason) => Some(reason),
            };
            progress.chunks_checked += 1;
            verdicts.set(id, verdict);
        }
        Ok(ids.iter().all(|id| verdicts.good(id)))
    }

    /// Rebuilds a patched block whose base and patch chunks are good, once per entry; when it
    /// does not hash to the entry's digest, the patch chunk is bad.
    async fn check_rebuild(
        &self,
        p: &PatchRef,
        verdicts: &mut Verdicts,
        rebuilt: &mut Rebuilt,
    ) -> Result<(), Error> {
        if !verdicts.good(&p.base)
            || !verdicts.good(&p.patch)
            || !rebuilt.insert((p.digest, p.base, p.patch))
        {
            return Ok(());
        }
        match self.rebuild_patched(p).await {
            Ok(_) => Ok(()),
            Err(Error::Corrupt { source, .. }) => {
                let reason = format!(
                    "over base {} it does not rebuild block {}: {source}",
                    p.base, p.digest
                );
                verdicts.set(p.patch, Some(reason));
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Checks the header and table of every pack that holds a chunk verify read (as the
    /// chunk map places it), and that the table places those chunks as the pack index does.
    /// Memory follows the packs, not the chunks: the map's places are counted per pack, and
    /// each pack's table must match that many of them.
    async fn check_packs(&self, verdicts: &Verdicts) -> Result<Vec<(String, String)>, Error> {
        let counts = self.chunk_map.read(|m| m.count_by_pack(|id| verdicts.known(id)));
        let checked: Vec<_> = futures::stream::iter(counts)
            .map(|(pack, count)| async move {
                (layout::pack(&pack).to_string(), self.check_pack(&pack, count, verdicts).await)
            })
            .buffer_unordered(8)
            .collect()
            .await;
        let mut damaged = Vec::new();
        for (path, result) in checked {
            if let Some(reason) = result? {
                tracing::warn!(%path, %reason, "damaged pack table");
                damaged.push((path, reason));
            }
        }
        damaged.sort();
        Ok(damaged)
    }

    /// `Ok(Some(reason))` if pack `pack` has a bad header or table, or a table that does not
    /// place the `count` chunks verify read there as the chunk map does; `Ok(None)` if it is
    /// sound or gone (its chunks are then reported missing).
    async fn check_pack(
        &self,
        pack: &Digest,
        count: u64,
        verdicts: &Verdicts,
    ) -> Result<Option<String>, Error> {
        let entries = match self.read_pack_table(pack).await? {
            PackTable::Gone => return Ok(None),
            PackTable::Bad(why) => return Ok(Some(why)),
            PackTable::Read(_, entries) => entries,
        };
        // Each chunk once: a table that lists one chunk twice does not make up for another.
        let matched: HashSet<Digest> = self.chunk_map.read(|m| {
            entries
                .iter()
                .filter(|e| verdicts.known(&e.id))
                .filter(|e| {
                    m.locate(&e.id).is_some_and(|loc| {
                        loc.pack == *pack && loc.offset == e.offset && loc.len == e.len
                    })
                })
                .map(|e| e.id)
                .collect()
        });
        if matched.len() as u64 >= count {
            return Ok(None);
        }
        let unlisted = self
            .chunk_map
            .read(|m| m.first_in_pack(pack, |id| verdicts.known(id) && !matched.contains(id)));
        Ok(Some(match unlisted {
            Some(id) => format!("its table does not list chunk {id} where its pack index does"),
            None => "its table does not list every chunk where its pack index does".into(),
        }))
    }

    /// `Ok(Ok(stored bytes))` for a good chunk, `Ok(Err(reason))` for a bad or missing one, and
    /// `Err` when the store cannot answer.
    async fn check_chunk(&self, id: &Digest) -> Result<Result<u64, String>, Error> {
        let raw = match self.read_chunk_raw(id).await {
            Ok(raw) => raw,
            Err(Error::ChunkMissing { .. }) => return Ok(Err("missing".into())),
            Err(Error::ChunkTruncated { pack, .. }) => {
                return Ok(Err(format!("truncated (pack {pack} ends before it)")));
            }
            Err(e) => return Err(e),
        };
        let id = *id;
        let len = raw.len() as u64;
        let crypto = self.crypto.clone();
        let checked = tokio::task::spawn_blocking(move || {
            ChunkFrame::decode_in(&crypto, &raw, &id).map(|_| ())
        })
        .await
        .map_err(|e| Error::Io { path: "chunk check".into(), source: std::io::Error::other(e) })?;
        Ok(checked.map(|()| len).map_err(|e| e.to_string()))
    }

    /// Which of `bad` point `m` references, from its indexes alone (unreadable indexes count
    /// as referencing nothing here: their own chunks are in `bad` if verify saw them).
    async fn referenced_among(
        &self,
        m: &PointManifest,
        bad: &BTreeMap<Digest, String>,
    ) -> Result<BTreeSet<Digest>, Error> {
        let mut found = BTreeSet::new();
        for disk in m.disks.values() {
            if bad.contains_key(&disk.index_root) {
                found.insert(disk.index_root);
                continue;
            }
            let Ok(root) = self.read_disk_index(disk).await else { continue };
            for (page_id, _, _) in page_runs(&root) {
                if bad.contains_key(&page_id) {
                    found.insert(page_id);
                    continue;
                }
                let Ok(page) = self.read_index_page(&page_id).await else { continue };
                found.extend(
                    page.entries().flat_map(|e| e.chunks()).filter(|d| bad.contains_key(d)),
                );
            }
        }
        Ok(found)
    }
}

/// The distinct pages of an index in order, each with the first and last page number it is
/// at (consecutive repeats of one page are one run; a page may recur further on).
pub(crate) fn page_runs(root: &IndexRoot) -> Vec<(Digest, u64, u64)> {
    let mut runs: Vec<(Digest, u64, u64)> = Vec::new();
    let mut at = 0u64;
    for (digest, repeat) in &root.pages {
        let last = at + repeat.saturating_sub(1);
        match runs.last_mut() {
            Some(run) if run.0 == *digest => run.2 = last,
            _ => runs.push((*digest, at, last)),
        }
        at = last + 1;
    }
    runs
}
