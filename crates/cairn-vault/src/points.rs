//! Recovery points: listing, choosing the base of an incremental, and the atomic commit.

use std::collections::BTreeSet;
use std::sync::Arc;

use cairn_format::pack::encode_pack_index;
use cairn_format::{DamageRecord, Evidence, InflightMarker, Name, PointId, PointManifest};
use futures::{StreamExt, TryStreamExt};
use jiff::Timestamp;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions};
use rand::RngExt;

use crate::packs::JobChunks;
use crate::{Error, PackWriter, Vault, layout};

/// A manifest that exists but cannot be read.
#[derive(Clone, Debug)]
pub struct UnreadablePoint {
    /// Its object path.
    pub path: String,
    /// The VM and point its path names.
    pub vm: Name,
    /// The point its path names.
    pub point: PointId,
    /// What is wrong.
    pub error: String,
}

/// The points of a vault (or of one VM), oldest first, and the manifests that could not be read.
#[derive(Clone, Debug, Default)]
pub struct PointListing {
    /// Readable points, ordered by VM then id (that is, time).
    pub points: Vec<PointManifest>,
    /// Manifests that exist but are damaged.
    pub unreadable: Vec<UnreadablePoint>,
}

impl Vault {
    pub(crate) async fn list_paths(&self, prefix: &Path) -> Result<Vec<Path>, Error> {
        let mut paths: Vec<Path> =
            self.list_metas(prefix).await?.into_iter().map(|meta| meta.location).collect();
        paths.sort();
        Ok(paths)
    }

    /// The objects under `prefix`, with their sizes and store times.
    pub(crate) async fn list_metas(
        &self,
        prefix: &Path,
    ) -> Result<Vec<object_store::ObjectMeta>, Error> {
        self.store
            .list(Some(prefix))
            .try_collect()
            .await
            .map_err(|e| Error::storage("list", prefix, e))
    }

    /// Writes a new object, sealed (in an encrypted vault), create-only: an existing one is
    /// an error, never overwritten.
    pub(crate) async fn put_new(
        &self,
        path: &Path,
        bytes: Vec<u8>,
        op: &'static str,
    ) -> Result<(), Error> {
        let sealed = self.crypto.seal(path.as_ref(), bytes, rand::rng().random());
        self.put_raw_new(path, sealed, op).await
    }

    /// Writes a new object as it is (the config, key slots), create-only.
    pub(crate) async fn put_raw_new(
        &self,
        path: &Path,
        bytes: Vec<u8>,
        op: &'static str,
    ) -> Result<(), Error> {
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        self.store
            .put_opts(path, bytes.into(), opts)
            .await
            .map(|_| ())
            .map_err(|e| Error::storage(op, path, e))
    }

    /// The bytes of the sealed object `path` (a `what`: a manifest, a marker, a record, at most
    /// [`MAX_METADATA_BYTES`]), opened: in an encrypted vault an object that does not
    /// authenticate is corrupt.
    pub(crate) async fn get_opened(
        &self,
        what: &'static str,
        path: &Path,
    ) -> Result<Option<Vec<u8>>, Error> {
        let Some(raw) = self.get_small(path, MAX_METADATA_BYTES).await? else { return Ok(None) };
        self.crypto
            .open(what, path.as_ref(), &raw)
            .map(Some)
            .map_err(|source| Error::Corrupt { path: path.to_string(), source })
    }

    /// The bytes of `path` if it is at most `max` bytes: see [`get_small`].
    pub(crate) async fn get_small(
        &self,
        path: &Path,
        max: u64,
    ) -> Result<Option<bytes::Bytes>, Error> {
        get_small(self.store.as_ref(), path, max).await
    }

    pub(crate) async fn get_bytes(&self, path: &Path) -> Result<Option<bytes::Bytes>, Error> {
        match self.store.get(path).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(|e| Error::storage("read", path, e))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::storage("read", path, e)),
        }
    }

    /// Lists points, of one VM or of all.
    pub async fn list_points(&self, vm: Option<&Name>) -> Result<PointListing, Error> {
        let paths = self.list_paths(&layout::points(vm)).await?;
        let named: Vec<(Path, Name, PointId)> = paths
            .into_iter()
            .filter_map(|p| layout::parse_point_path(&p).map(|(vm, id)| (p, vm, id)))
            .collect();
        let loaded: Vec<_> = futures::stream::iter(named)
            .map(|(path, vm, id)| async move {
                let result = self.read_manifest_at(&path, &vm, &id).await;
                (path, vm, id, result)
            })
            .buffered(16)
            .collect()
            .await;
        let mut listing = PointListing::default();
        for (path, vm, point, result) in loaded {
            match result {
                Ok(m) => listing.points.push(m),
                // Listed, then purged before it could be read: it is gone.
                Err(Error::PointNotFound { .. }) => {}
                Err(e @ (Error::Corrupt { .. } | Error::Format(_))) => {
                    listing.unreadable.push(UnreadablePoint {
                        path: path.to_string(),
                        vm,
                        point,
                        error: e.to_string(),
                    })
                }
                Err(e) => return Err(e),
            }
        }
        listing.points.sort_by(|a, b| (&a.vm, &a.point).cmp(&(&b.vm, &b.point)));
        Ok(listing)
    }

    async fn read_manifest_at(
        &self,
        path: &Path,
        vm: &Name,
        id: &PointId,
    ) -> Result<PointManifest, Error> {
        let bytes = self
            .get_opened("manifest", path)
            .await?
            .ok_or_else(|| Error::PointNotFound { vm: vm.clone(), point: id.clone() })?;
        let corrupt = |source| Error::Corrupt { path: path.to_string(), source };
        let m = PointManifest::decode(&bytes).map_err(corrupt)?;
        if &m.vm != vm || &m.point != id {
            return Err(corrupt(cairn_format::Error::Corrupt {
                what: "manifest",
                detail: format!("it describes {}/{}, not the point its name says", m.vm, m.point),
            }));
        }
        Ok(m)
    }

    /// Reads one point's manifest.
    pub async fn read_point(&self, vm: &Name, id: &PointId) -> Result<PointManifest, Error> {
        self.read_manifest_at(&layout::manifest(vm, id), vm, id).await
    }

    /// Reads the point `id` (soft-deleted or not), or the newest readable point that is not
    /// soft-deleted when `id` is `None`.
    pub async fn resolve_point(
        &self,
        vm: &Name,
        id: Option<&PointId>,
    ) -> Result<PointManifest, Error> {
        match id {
            Some(id) => self.read_point(vm, id).await,
            None => {
                let states = self.point_states(Some(vm)).await?;
                let deleted = |m: &PointManifest| {
                    states.get(&m.vm, &m.point).map(|s| s.deleted.is_some()).unwrap_or(false)
                };
                let points = self.list_points(Some(vm)).await?.points;
                points
                    .into_iter()
                    .rev()
                    .find(|m| !deleted(m))
                    .ok_or_else(|| Error::NoPoints { vm: vm.clone() })
            }
        }
    }

    /// Points of `vm` that verify found damaged.
    pub async fn damaged_points(&self, vm: &Name) -> Result<BTreeSet<PointId>, Error> {
        let paths = self.list_paths(&layout::damage(vm, None)).await?;
        Ok(paths.iter().filter_map(layout::parse_damage_path).map(|(_, p, _)| p).collect())
    }

    /// The base for `vm`'s next incremental: the newest complete point that verify has not
    /// found damaged. The evidence says which newer points were passed over, and why.
    pub async fn previous_point(
        &self,
        vm: &Name,
    ) -> Result<(Option<PointManifest>, Vec<Evidence>), Error> {
        let listing = self.list_points(Some(vm)).await?;
        let damaged = self.damaged_points(vm).await?;
        let states = self.point_states(Some(vm)).await?;
        let mut evidence = Vec::new();
        let mut chosen = None;
        for m in listing.points.into_iter().rev() {
            if states.get(vm, &m.point).is_ok_and(|s| s.deleted.is_some()) {
                evidence.push(Evidence::new(
                    "previous_point_skipped",
                    None,
                    format!("point {} is soft-deleted; not used as a base", m.point),
                ));
                continue;
            }
            if damaged.contains(&m.point) {
                evidence.push(Evidence::new(
                    "previous_point_skipped",
                    None,
                    format!(
                        "point {} references chunks verify found bad; not used as a base",
                        m.point
                    ),
                ));
                continue;
            }
            chosen = Some(m);
            break;
        }
        for u in listing.unreadable {
            if chosen.as_ref().is_none_or(|c| u.point > c.point) {
                evidence.push(Evidence::new(
                    "previous_point_skipped",
                    None,
                    format!(
                        "manifest of point {} is unreadable ({}); not used as a base",
                        u.point, u.error
                    ),
                ));
            }
        }
        Ok((chosen, evidence))
    }

    /// The newest point id of `vm` in the vault, committed or not.
    async fn last_point_id(&self, vm: &Name) -> Result<Option<PointId>, Error> {
        let existing = self.list_paths(&layout::points(Some(vm))).await?;
        Ok(existing.last().and_then(layout::parse_point_path).map(|(_, p)| p))
    }

    /// An id for a point of `vm` started at `at`, sorting after the VM's existing points even
    /// if the clock went back. Chosen before a capture, it lets what the capture starts (dirty
    /// bitmaps) be named after the point it belongs to.
    pub async fn reserve_point_id(&self, vm: &Name, at: Timestamp) -> Result<PointId, Error> {
        Ok(id_after(self.last_point_id(vm).await?.as_ref(), at))
    }

    /// Starts a point for `vm`: picks its id and writes the in-flight marker.
    pub async fn begin_point(
        &self,
        vm: &Name,
        started_at: Timestamp,
    ) -> Result<PointWriter, Error> {
        self.begin_point_as(vm, started_at, None).await
    }

    /// Starts a point for `vm` with id `reserved` (from [`Vault::reserve_point_id`]) if it
    /// still sorts after the VM's points, else with a new id; writes the in-flight marker.
    pub async fn begin_point_as(
        &self,
        vm: &Name,
        started_at: Timestamp,
        reserved: Option<PointId>,
    ) -> Result<PointWriter, Error> {
        let last = self.last_point_id(vm).await?;
        let point = match reserved {
            Some(r) if last.as_ref().is_none_or(|l| r > *l) => r,
            _ => id_after(last.as_ref(), started_at),
        };
        self.begin_exact(vm, started_at, point).await
    }

    async fn begin_exact(
        &self,
        vm: &Name,
        started_at: Timestamp,
        point: PointId,
    ) -> Result<PointWriter, Error> {
        let epoch = self.durability.epoch();
        let marker = InflightMarker {
            format: 1,
            point: point.clone(),
            vm: vm.clone(),
            started_at,
            owner: marker_owner(),
        };
        // Create-only: two writers that picked the same id (the same reserved id, or a
        // collision of the clock and 32 random bits) cannot both go on.
        let path = layout::inflight(&point);
        self.put_new(&path, marker.encode(), "write").await.map_err(|e| e.concurrent(&path))?;
        // Deduplicate against everything committed before this backup started, and against
        // what interrupted backups of this VM uploaded (recorded before any of it is used).
        self.refresh_chunk_map().await?;
        // Read after the marker exists: a collector that condemned packs before it is seen
        // here, and one that condemns packs later waits for this backup (the gc module).
        let condemned = self.condemned_packs().await?;
        let resumable = self.resumable(vm, &point, &condemned).await?;
        if !resumable.is_empty() {
            let path = layout::adopted_record(&point);
            self.put_new(&path, resumable.record().encode(), "write").await?;
        }
        let quarantined = self.chunk_map.read(|m| m.quarantined().clone());
        Ok(PointWriter {
            vault: self.clone(),
            vm: vm.clone(),
            job: Arc::new(JobChunks::new(point.clone(), resumable, condemned)),
            point,
            started_at,
            epoch,
            quarantined,
        })
    }

    /// Starts a point of `vm` under exactly the id `point` (a copy from another vault keeps
    /// its id); refused if the vault holds that point already.
    pub async fn begin_point_with_id(
        &self,
        vm: &Name,
        started_at: Timestamp,
        point: &PointId,
    ) -> Result<PointWriter, Error> {
        let path = layout::manifest(vm, point);
        if self.head_exists(&path).await? {
            return Err(Error::Concurrent { path: path.to_string() });
        }
        self.begin_exact(vm, started_at, point.clone()).await
    }

    /// In-flight markers: backups started and not yet committed or abandoned.
    pub async fn inflight(&self) -> Result<Vec<InflightMarker>, Error> {
        let mut out = Vec::new();
        for path in self.list_paths(&Path::from("inflight")).await? {
            if !layout::is_marker(&path) {
                continue;
            }
            if let Some(bytes) = self.get_opened("in-flight marker", &path).await? {
                let m = InflightMarker::decode(&bytes)
                    .map_err(|source| Error::Corrupt { path: path.to_string(), source })?;
                out.push(m);
            }
        }
        Ok(out)
    }

    /// Records that verify found `record.point` damaged. Records are create-only: each run
    /// that finds the point's damage changed writes a new one, named by the run, then removes
    /// the older ones; the point is damaged for as long as any record remains.
    pub(crate) async fn write_damage(&self, record: &DamageRecord) -> Result<(), Error> {
        let older = self.damage_records(&record.vm, &record.point).await?;
        if let Some(newest) = older.last()
            && let Ok(Some(bytes)) = self.get_opened("damage record", newest).await
            && DamageRecord::decode(&bytes).is_ok_and(|d| d.bad_chunks == record.bad_chunks)
        {
            return Ok(());
        }
        let run = PointId::new(record.found_at, rand::rng().random());
        let path = layout::damage_record(&record.vm, &record.point, &run);
        self.put_new(&path, record.encode(), "write").await?;
        self.delete_all(&older).await
    }

    /// Removes every damage record of `point` (verify found it clean).
    pub(crate) async fn clear_damage(&self, vm: &Name, point: &PointId) -> Result<(), Error> {
        let records = self.damage_records(vm, point).await?;
        self.delete_all(&records).await
    }

    /// The damage records of `point`, oldest first (a legacy record first of all).
    async fn damage_records(&self, vm: &Name, point: &PointId) -> Result<Vec<Path>, Error> {
        let mut records = vec![];
        let legacy = layout::legacy_damage(vm, point);
        if self.head_exists(&legacy).await? {
            records.push(legacy);
        }
        records.extend(self.list_paths(&layout::damage(vm, Some(point))).await?);
        Ok(records)
    }

    pub(crate) async fn head_exists(&self, path: &Path) -> Result<bool, Error> {
        match self.store.head(path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(Error::storage("read", path, e)),
        }
    }

    /// Deletes `paths`; one already gone is fine. Refused on an append-only handle.
    pub(crate) async fn delete_all(&self, paths: &[Path]) -> Result<(), Error> {
        if let Some(first) = paths.first() {
            self.check_may_delete(format!("delete {first}"))?;
        }
        for path in paths {
            match self.store.delete(path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(Error::storage("delete", path, e)),
            }
        }
        Ok(())
    }
}

/// The largest manifest, marker or record read (the largest real ones are a few KiB).
pub(crate) const MAX_METADATA_BYTES: u64 = 16 << 20;

/// The bytes of `path` in `store` if it is at most `max` bytes; one ranged read of `max + 1`
/// bytes, so that an object planted in the bucket cannot make a reader allocate without bound.
pub(crate) async fn get_small(
    store: &dyn object_store::ObjectStore,
    path: &Path,
    max: u64,
) -> Result<Option<bytes::Bytes>, Error> {
    let options =
        object_store::GetOptions { range: Some((0..max + 1).into()), ..Default::default() };
    let result = match store.get_opts(path, options).await {
        Ok(r) => r,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(Error::storage("read", path, e)),
    };
    let size = result.meta.size;
    if size > max {
        return Err(Error::TooLarge { path: path.to_string(), what: "metadata object", size, max });
    }
    result.bytes().await.map(Some).map_err(|e| Error::storage("read", path, e))
}

/// Points this process gave up while leaving their markers for a resume.
fn abandoned_here() -> std::sync::MutexGuard<'static, BTreeSet<PointId>> {
    static ABANDONED: std::sync::Mutex<BTreeSet<PointId>> = std::sync::Mutex::new(BTreeSet::new());
    ABANDONED.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Who runs a backup, for people reading an in-flight marker: `HOST pid PID`.
pub(crate) fn marker_owner() -> String {
    let uname = rustix::system::uname();
    let host = uname.nodename().to_string_lossy();
    format!("{host} pid {} ns {} boot {}", std::process::id(), pid_namespace(), boot_id())
}

/// This boot's id: host names and the root pid namespace's inode repeat across cloned hosts,
/// a boot id does not.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// True if `owner` (as [`marker_owner`] writes it) is a process of this host, pid namespace
/// and boot that no longer exists. Anything else, an owner of an older format included, is
/// not judged dead.
pub(crate) fn owner_is_dead(owner: &str) -> bool {
    let Some((host, rest)) = owner.split_once(" pid ") else { return false };
    let Some((pid, rest)) = rest.split_once(" ns ") else { return false };
    let Some((ns, boot)) = rest.split_once(" boot ") else { return false };
    let Ok(pid) = pid.parse::<i32>() else { return false };
    let here = rustix::system::uname();
    if host != here.nodename().to_string_lossy()
        || ns != pid_namespace()
        || ns == "unknown"
        || boot != boot_id()
        || boot == "unknown"
    {
        return false;
    }
    // No such process: kill(pid, 0) fails with ESRCH.
    match rustix::process::Pid::from_raw(pid) {
        Some(pid) => {
            rustix::process::test_kill_process(pid).is_err_and(|e| e == rustix::io::Errno::SRCH)
        }
        None => false,
    }
}

/// This process's pid namespace (`pid:[4026531836]`): a pid means a process only within it.
fn pid_namespace() -> String {
    std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// A new id for a point started at `at` that sorts after `last`, even if the clock went back.
pub(crate) fn id_after(last: Option<&PointId>, at: Timestamp) -> PointId {
    let mut at = at;
    if let Some(last) = last {
        while PointId::new(at, u32::MAX) <= *last {
            at += jiff::SignedDuration::from_millis(1);
        }
    }
    PointId::new(at, rand::rng().random())
}

/// A point being written. [`PointWriter::commit`] makes it visible; until then it does not exist.
#[derive(Debug)]
pub struct PointWriter {
    vault: Vault,
    vm: Name,
    point: PointId,
    started_at: Timestamp,
    job: Arc<JobChunks>,
    /// The vault's write-back failure count when the job began: see `Vault::barrier_since`.
    epoch: u64,
    /// The bad copies known when the job began; one verify finds later may be a copy this
    /// job deduplicated against.
    quarantined: std::collections::HashSet<(cairn_format::Digest, cairn_format::Digest)>,
}

impl PointWriter {
    /// A writer for one stream of this point's chunks (one per disk); finish every one before
    /// [`PointWriter::commit`].
    pub fn pack_writer(&self) -> PackWriter {
        PackWriter::new(self.vault.clone(), Arc::clone(&self.job))
    }

    /// The point's id.
    pub fn point(&self) -> &PointId {
        &self.point
    }

    /// When the job started.
    pub fn started_at(&self) -> Timestamp {
        self.started_at
    }

    /// Commits: makes the packs durable, writes their pack index and makes it durable, writes
    /// the manifest create-only and makes it durable, then removes the in-flight marker. Each
    /// barrier orders one step before the next: a crash leaves a manifest only over a durable
    /// index of durable packs.
    pub async fn commit(self, manifest: &PointManifest) -> Result<(), Error> {
        if manifest.point != self.point || manifest.vm != self.vm {
            return Err(Error::Format(cairn_format::Error::Invalid {
                what: "manifest",
                detail: format!(
                    "it names {}/{}, the writer is for {}/{}",
                    manifest.vm, manifest.point, self.vm, self.point
                ),
            }));
        }
        let packs = self.job.take_packs()?;
        self.vault.barrier_since(self.epoch).await?;
        if !packs.is_empty() {
            let path = layout::pack_index(&self.point);
            self.vault.put_new(&path, encode_pack_index(&packs), "write").await?;
            self.vault.barrier_since(self.epoch).await?;
            self.vault.chunk_map.write(|m| m.add(path.to_string(), &packs));
        }
        self.check_quarantine(manifest).await?;
        // Decided once, create-only: a collector that took this backup for dead and reaped
        // it has written "reaped" first, and may have freed chunks this point needs.
        self.vault.claim_commit(&self.point).await?;
        let path = layout::manifest(&self.vm, &self.point);
        self.vault
            .put_new(&path, manifest.encode(), "commit")
            .await
            .map_err(|e| e.concurrent(&path))?;
        self.vault.barrier_since(self.epoch).await?;
        self.vault.remove_inflight(&self.point).await;
        // The interrupted backups this one resumed from, if they died on this host: their
        // packs that mattered are indexed now.
        let (adopted, _, from) = self.job.resumed();
        if adopted > 0 {
            for point in from {
                if self.vault.marker_is_dead(&point).await {
                    self.vault.remove_inflight(&point).await;
                }
            }
        }
        Ok(())
    }

    /// Records `base` as the point this backup compares against, before anything of it is
    /// read, then checks it still exists. While the record and the marker exist a collector
    /// keeps what the base's index reaches, purged or not. Returns false (use no base) when
    /// the base was purged before the record was written.
    pub async fn protect_base(&self, base: &PointManifest) -> Result<bool, Error> {
        let record = cairn_format::BaseRecord {
            format: 1,
            point: base.point.clone(),
            roots: base.disks.values().map(|d| d.index_root).collect(),
        };
        let path = layout::base_record(&self.point);
        self.vault.put_new(&path, record.encode(), "write").await?;
        self.vault.head_exists(&layout::manifest(&base.vm, &base.point)).await
    }

    /// Refuses to commit a point that needs a chunk verify quarantined while this job ran
    /// and that has no good copy left: the job may have deduplicated against the bad copy.
    /// Quarantines are rare; only then is the point's index read back to look.
    async fn check_quarantine(&self, manifest: &PointManifest) -> Result<(), Error> {
        let new: Vec<(cairn_format::Digest, cairn_format::Digest)> = self
            .vault
            .list_paths(&layout::quarantine())
            .await?
            .iter()
            .filter_map(layout::parse_quarantined)
            .filter(|q| !self.quarantined.contains(q))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        self.vault.reload_chunk_map().await?;
        let mut lost = std::collections::HashSet::new();
        for (chunk, _) in new {
            // Stored again since (by this job, whose pack index is in the map now, or another):
            // a good copy serves the point.
            if self.vault.locate_chunk(&chunk).await?.is_none() {
                lost.insert(chunk);
            }
        }
        if lost.is_empty() {
            return Ok(());
        }
        if let Some(chunk) = self.vault.references_any(manifest, &lost).await? {
            return Err(Error::QuarantinedUnderBackup { chunk });
        }
        Ok(())
    }

    /// What this backup took over from interrupted ones: evidence for its manifest, or `None`
    /// when it resumed nothing.
    pub fn resume_evidence(&self) -> Option<Evidence> {
        let (packs, bytes, from) = self.job.resumed();
        (packs > 0).then(|| {
            let from: Vec<String> = from.iter().map(ToString::to_string).collect();
            Evidence::new(
                "resume",
                None,
                format!(
                    "resumed: {packs} pack(s), {bytes} bytes, uploaded by interrupted backup(s) \
                     {} were checked (size, table) and used instead of uploading their chunks again",
                    from.join(", ")
                ),
            )
        })
    }

    /// Gives the point up and removes its marker and records whatever it uploaded (a copy
    /// between vaults: nothing to resume, and a retry must be able to start under the same id).
    pub async fn discard(self) {
        if !self.vault.append_only {
            self.vault.remove_inflight(&self.point).await;
        }
    }

    /// Gives the point up: nothing becomes visible. Packs already written stay, unindexed,
    /// and so do the in-flight marker and its resume records when there are any: the next
    /// backup of the VM checks those packs and uses their chunks (see the resume module).
    pub async fn abandon(self) {
        if self.job.resumable_after_failure() {
            abandoned_here().insert(self.point.clone());
        } else {
            self.vault.remove_inflight(&self.point).await;
        }
    }
}

impl Vault {
    /// Removes the resume records of `point`, then its in-flight marker; failures are logged
    /// (a collector removes what is left).
    async fn remove_inflight(&self, point: &PointId) {
        if self.append_only {
            // Left in place; a marker whose manifest exists is done (see the gc module).
            return;
        }
        let records = self.list_paths(&layout::resume_records(point)).await.unwrap_or_default();
        let failed = futures::stream::iter(records)
            .map(|path| async move { self.store.delete(&path).await.err().map(|e| (path, e)) })
            .buffer_unordered(32)
            .filter_map(|r| async move { r })
            .collect::<Vec<_>>()
            .await;
        for (path, e) in failed {
            tracing::warn!(%path, error = %e, "could not remove a resume record");
        }
        let path = layout::inflight(point);
        if let Err(e) = self.store.delete(&path).await {
            tracing::warn!(%path, error = %e, "could not remove the in-flight marker");
        }
    }

    /// True if the backup of marker `point` ran on this host and its process is gone, or was
    /// given up by this process.
    pub(crate) async fn marker_is_dead(&self, point: &PointId) -> bool {
        if abandoned_here().contains(point) {
            return true;
        }
        let Ok(Some(bytes)) = self.get_opened("in-flight marker", &layout::inflight(point)).await
        else {
            return false;
        };
        let Ok(marker) = InflightMarker::decode(&bytes) else { return false };
        owner_is_dead(&marker.owner)
    }
}

impl Vault {
    /// The first of `ids` that `manifest`'s disks reference (roots, pages, page entries).
    pub(crate) async fn references_any(
        &self,
        manifest: &PointManifest,
        ids: &std::collections::HashSet<cairn_format::Digest>,
    ) -> Result<Option<cairn_format::Digest>, Error> {
        for disk in manifest.disks.values() {
            if ids.contains(&disk.index_root) {
                return Ok(Some(disk.index_root));
            }
            let root = self.read_disk_index(disk).await?;
            let mut seen = std::collections::HashSet::new();
            for (page_id, _, _) in crate::verify::page_runs(&root) {
                if !seen.insert(page_id) {
                    continue;
                }
                if ids.contains(&page_id) {
                    return Ok(Some(page_id));
                }
                let page = self.read_index_page(&page_id).await?;
                if let Some(hit) = page.entries().flat_map(|e| e.chunks()).find(|c| ids.contains(c))
                {
                    return Ok(Some(hit));
                }
            }
        }
        Ok(None)
    }
}
