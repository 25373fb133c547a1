//! Garbage collection, safe beside running backups, with no lock.
//!
//! A run:
//! 1. Classifies the in-flight markers: running, dead (this host, process gone), done
//!    (manifest exists: an append-only agent leaves its marker), stale (older than the stale
//!    age). A stale backup is *reaped*: its fate record says `reaped` (create-only, so a
//!    backup that claimed its commit first wins and is left alone), then its records and
//!    marker go. Done markers are removed.
//! 2. Finishes the plans of earlier runs that were interrupted or told not to wait.
//! 3. Analyses the vault: every manifest, live or soft-deleted, makes its chunks live (index
//!    roots, pages, data and both chunks of a patch, so patch chains stay whole); packs with
//!    no live chunk, and unindexed packs no resume record of a live marker names, are dead;
//!    packs whose live bytes are under the repack threshold are to be repacked.
//! 4. Writes its plan (`gc/<run>.json`, create-only) naming those packs, *before* deleting
//!    anything. A backup reads the pending plans right after writing its marker, and from
//!    then on neither deduplicates against nor adopts a condemned pack: it stores those chunks
//!    again.
//! 5. Waits for every backup running at its first look after the plan was written: those may
//!    have looked before the plan existed. Later backups see it. (Both sides write, then list:
//!    with a store that lists what it acknowledged, one of them sees the other.)
//! 6. Analyses again (the backups it waited for have committed or failed), and carries out
//!    the plan only for packs that are still condemned: copies live chunks that have no other
//!    copy out of packs to repack, writes pack indexes for the new packs and what survives
//!    of the pack indexes it replaces, makes them durable, deletes those indexes, then the
//!    packs; then deletes the plan.
//!
//! A backup that runs longer than the stale age is reaped, and its commit is refused (its
//! fate says `reaped`, or its marker is gone). With no backup running, one run frees
//! everything; with backups running it waits only for those that started before its plan.

mod analysis;
mod copies;
mod execute;
mod lease;
mod markers;

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use cairn_format::{Digest, GcPlan, Name, PointId};
use jiff::{SignedDuration, Timestamp};
use rand::RngExt;

use crate::{Error, Vault, layout};
use markers::MarkerKind;

/// When the store wrote an object, as a timestamp.
pub(crate) fn store_time(meta: &object_store::ObjectMeta) -> Timestamp {
    let t = &meta.last_modified;
    Timestamp::new(t.timestamp(), t.timestamp_subsec_nanos() as i32)
        .unwrap_or(Timestamp::UNIX_EPOCH)
}

/// How a collector run works.
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Analyse and report; write and delete nothing.
    pub dry_run: bool,
    /// A backup whose marker is older than this is taken for dead and reaped (and its commit
    /// refused, should it still be running). Must exceed the longest backup.
    pub stale_after: SignedDuration,
    /// Repack a pack whose live bytes are under this fraction of its size.
    pub repack_below: f64,
    /// Wait for the backups that started before the plan; `false`: leave the plan pending
    /// for a later run when any is running.
    pub wait: bool,
    /// How often to look while waiting.
    pub poll: Duration,
    /// Most chunk entries in one pack index the collector writes (it cuts the rest into
    /// more): bounds its memory when it rewrites indexes that name most of the vault.
    pub entries_per_index: usize,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            dry_run: false,
            stale_after: DEFAULT_STALE_AFTER,
            repack_below: DEFAULT_REPACK_BELOW,
            wait: true,
            poll: Duration::from_secs(5),
            entries_per_index: DEFAULT_ENTRIES_PER_INDEX,
        }
    }
}

/// Packs a backup must not rely on: those pending collector plans condemn.
#[derive(Debug, Default)]
pub(crate) enum Condemned {
    /// These packs.
    Packs(HashSet<Digest>),
    /// Every pack (a plan could not be read).
    #[default]
    All,
}

impl Condemned {
    /// True if `pack` is off limits.
    pub(crate) fn contains(&self, pack: &Digest) -> bool {
        match self {
            Condemned::Packs(packs) => packs.contains(pack),
            Condemned::All => true,
        }
    }
}

/// Markers older than this are stale: two days, well past a daily backup's 24-hour budget.
pub const DEFAULT_STALE_AFTER: SignedDuration = SignedDuration::from_hours(48);

/// A pack index the collector writes holds at most this many entries (about 12 MiB in
/// memory while it is written).
pub const DEFAULT_ENTRIES_PER_INDEX: usize = 1 << 18;

/// Packs with less than this fraction of live bytes are repacked (docs/performance.md).
pub const DEFAULT_REPACK_BELOW: f64 = 0.5;

/// What a collector run found and did.
#[derive(Clone, Debug, Default)]
pub struct GcReport {
    /// The run's id (its plan's name).
    pub run: Option<PointId>,
    /// Points whose chunks were kept (every manifest, soft-deleted ones included).
    pub points: usize,
    /// Packs in the vault before the run, and their bytes.
    pub packs_before: u64,
    /// Their bytes.
    pub bytes_before: u64,
    /// Packs with no live chunk (deleted, or to be deleted in a dry run).
    pub packs_dead: u64,
    /// Packs repacked (or to be).
    pub packs_repacked: u64,
    /// Bytes the condemned packs hold.
    pub bytes_condemned: u64,
    /// Bytes of packs deleted.
    pub bytes_deleted: u64,
    /// Bytes of new packs written by repacking.
    pub bytes_written: u64,
    /// Chunks copied by repacking.
    pub chunks_copied: u64,
    /// Pack indexes replaced.
    pub indexes_rewritten: u64,
    /// Stale backups reaped.
    pub reaped: Vec<PointId>,
    /// Markers of committed backups removed.
    pub done_markers_removed: u64,
    /// Backups waited for.
    pub waited_for: Vec<PointId>,
    /// How long the run waited for them.
    pub waited: Duration,
    /// Plans left pending (backups running and `wait` off).
    pub pending: Vec<PointId>,
    /// Notes of points that do not exist (a backup that failed after writing them) removed.
    pub orphan_notes_removed: u64,
    /// Stray staging files removed.
    pub strays_removed: u64,
    /// Live chunks whose only copy was bad when read to be repacked: (chunk, pack, why).
    pub bad_copies: Vec<(Digest, Digest, String)>,
    /// Packs pack indexes named that the store does not hold (lost; dropped from the indexes).
    pub missing_packs: Vec<Digest>,
    /// Packs no pack index names that hold live chunks: kept; run `repair index`.
    pub unindexed_live: Vec<Digest>,
}

impl Vault {
    /// Runs the collector; see the module docs. `say` receives progress for people.
    pub async fn gc(
        &self,
        options: &GcOptions,
        say: &(dyn Fn(&str) + Sync),
    ) -> Result<GcReport, Error> {
        if options.dry_run {
            return self.collect(options, say).await;
        }
        self.check_may_delete("garbage collection")?;
        self.take_lease("gc", options.stale_after).await?;
        let result = self.collect(options, say).await;
        self.release_lease().await;
        result
    }

    async fn collect(
        &self,
        options: &GcOptions,
        say: &(dyn Fn(&str) + Sync),
    ) -> Result<GcReport, Error> {
        let mut report = GcReport::default();
        let now = Timestamp::now();
        let markers = self.classify_markers(now, options.stale_after).await?;
        if !options.dry_run {
            for m in &markers {
                match m.kind {
                    MarkerKind::Stale => {
                        if self.reap(&m.point).await? {
                            say(&format!(
                                "reaped the stale backup {} (its marker is older than {:#})",
                                m.point, options.stale_after
                            ));
                            report.reaped.push(m.point.clone());
                        }
                    }
                    MarkerKind::Done => {
                        self.remove_marker_and_records(&m.point).await?;
                        report.done_markers_removed += 1;
                    }
                    MarkerKind::Running | MarkerKind::Dead => {}
                }
            }
            for plan in self.pending_plans().await? {
                say(&format!("finishing the plan of an earlier gc run, {}", plan.run));
                self.carry_out(&plan, options, &mut report, say).await?;
            }
        }
        let markers = self.classify_markers(Timestamp::now(), options.stale_after).await?;
        let a = self.analyse(&markers, options.repack_below, now, options.stale_after).await?;
        report.points = a.points;
        report.packs_before = a.packs.len() as u64;
        report.bytes_before = a.packs.values().map(|f| f.size).sum();
        report.packs_dead = a.dead.len() as u64;
        report.packs_repacked = a.repack.len() as u64;
        report.missing_packs = a.missing.iter().copied().collect();
        report.unindexed_live = a.unindexed_live.iter().copied().collect();
        if !a.unindexed_live.is_empty() {
            say(&format!(
                "{} pack(s) that no pack index names hold chunks points need: kept; run \
                 `cairn-agent repair index` to index them again",
                a.unindexed_live.len()
            ));
        }
        if !a.missing.is_empty() {
            say(&format!(
                "{} pack(s) that pack indexes name are missing from the store: the points that \
                 need them are damaged (run `cairn-agent verify`); their entries are dropped",
                a.missing.len()
            ));
        }
        let condemned = a.condemned();
        report.bytes_condemned =
            condemned.iter().filter_map(|p| a.packs.get(p)).map(|f| f.size).sum();
        if options.dry_run {
            return Ok(report);
        }
        self.delete_all(&a.strays).await?;
        report.strays_removed = a.strays.len() as u64;
        // Carrying the plan out analyses the vault again: two analyses at once would double
        // the collector's memory.
        drop(a);
        if !condemned.is_empty() {
            let run = PointId::new(Timestamp::now(), rand::rng().random());
            let plan = GcPlan {
                format: 1,
                run: run.clone(),
                started_at: now,
                condemned: condemned.into_iter().collect(),
            };
            self.put_new(&layout::gc_plan(&run), plan.encode(), "write").await?;
            report.run = Some(run);
            // The counts above were the analysis; what is done comes from the second one.
            report.packs_dead = 0;
            report.packs_repacked = 0;
            self.carry_out(&plan, options, &mut report, say).await?;
        }
        report.orphan_notes_removed = self.remove_orphan_notes().await?;
        Ok(report)
    }

    /// Waits for the backups that may not have seen `plan`, analyses again, and carries the
    /// plan out for the packs still condemned; then deletes it. Leaves it pending when
    /// backups run and `options.wait` is off.
    async fn carry_out(
        &self,
        plan: &GcPlan,
        options: &GcOptions,
        report: &mut GcReport,
        say: &(dyn Fn(&str) + Sync),
    ) -> Result<(), Error> {
        let path = layout::gc_plan(&plan.run);
        if !self.head_exists(&path).await? {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let mut announced = HashSet::new();
        // The backups running at the first look after the plan exists: a backup that writes
        // its marker after that look reads the plan after it, and keeps away from its packs.
        // Store times are not used to tell them apart: a marker's time is when its upload
        // began, not when it became visible.
        let mut waiting: Option<HashSet<PointId>> = None;
        let markers = loop {
            let markers = self.classify_markers(Timestamp::now(), options.stale_after).await?;
            let running = |m: &&markers::MarkerInfo| m.kind == MarkerKind::Running;
            // Stale ones too: one that claimed its commit cannot be reaped, and is waited for.
            let first = waiting.get_or_insert_with(|| {
                markers
                    .iter()
                    .filter(|m| matches!(m.kind, MarkerKind::Running | MarkerKind::Stale))
                    .map(|m| m.point.clone())
                    .collect()
            });
            // One waited for that went stale meanwhile is reaped, never just dropped: once
            // reaped it cannot commit; if it claimed its commit first, it is still waited for.
            let mut committing = vec![];
            for m in
                markers.iter().filter(|m| m.kind == MarkerKind::Stale && first.contains(&m.point))
            {
                if self.reap(&m.point).await? {
                    say(&format!("reaped the stale backup {}", m.point));
                    report.reaped.push(m.point.clone());
                } else if !self.commit_claim_older_than(&m.point, options.stale_after).await? {
                    committing.push(m);
                }
            }
            let mut before: Vec<&markers::MarkerInfo> =
                markers.iter().filter(running).filter(|m| first.contains(&m.point)).collect();
            before.extend(committing);
            if before.is_empty() {
                break markers;
            }
            if !options.wait {
                say(&format!(
                    "{} backup(s) started before this gc's plan are running: the plan stays \
                     pending, and a later gc run finishes it",
                    before.len()
                ));
                report.pending.push(plan.run.clone());
                return Ok(());
            }
            for m in before {
                if announced.insert(m.point.clone()) {
                    let who = m.marker.as_ref().map(|k| format!(" of VM {} ({})", k.vm, k.owner));
                    say(&format!(
                        "waiting for backup {}{}, which started before this gc's plan",
                        m.point,
                        who.unwrap_or_default()
                    ));
                    report.waited_for.push(m.point.clone());
                }
            }
            tokio::time::sleep(options.poll).await;
        };
        report.waited += started.elapsed();
        let now = Timestamp::now();
        let a = self.analyse(&markers, options.repack_below, now, options.stale_after).await?;
        let planned: BTreeSet<Digest> = plan.condemned.iter().copied().collect();
        let mut to_do: BTreeSet<Digest> = a.condemned().intersection(&planned).copied().collect();
        // A pack to repack is read whole: one larger than any pack Cairn writes is not
        // Cairn's doing, is not loaded, and is kept.
        let max = self.max_pack_bytes();
        let oversized: Vec<Digest> = a
            .repack
            .iter()
            .filter(|p| a.packs.get(p).is_some_and(|f| f.size > max))
            .copied()
            .collect();
        for p in oversized {
            if to_do.remove(&p) {
                say(&format!("pack {p} is larger than any pack Cairn writes: kept, not repacked"));
            }
        }
        report.packs_dead += a.dead.intersection(&to_do).count() as u64;
        report.packs_repacked += a.repack.intersection(&to_do).count() as u64;
        if !to_do.is_empty() {
            let id = PointId::new(now, rand::rng().random());
            let done = self.execute(&a, &to_do, &id, options.entries_per_index).await?;
            report.bytes_deleted += done.bytes_deleted;
            report.bytes_written += done.bytes_written;
            report.chunks_copied += done.chunks_copied;
            report.indexes_rewritten += done.indexes_rewritten;
            report.bad_copies.extend(done.bad_copies);
        }
        self.delete_all(&[path]).await
    }

    /// The plans of collector runs not finished yet; one that cannot be read is `Err` (its
    /// path and why).
    async fn read_plans(&self) -> Result<Vec<Result<GcPlan, String>>, Error> {
        let mut plans = vec![];
        for path in self.list_paths(&layout::gc_plans()).await? {
            let plan = match self.get_opened("gc plan", &path).await {
                Ok(Some(bytes)) => GcPlan::decode(&bytes).map_err(|e| format!("{path}: {e}")),
                Ok(None) => continue,
                Err(e @ (Error::Corrupt { .. } | Error::TooLarge { .. })) => Err(e.to_string()),
                Err(e) => return Err(e),
            };
            plans.push(plan);
        }
        Ok(plans)
    }

    /// The plans a collector can carry out; unreadable ones are left for people (and keep
    /// backups from deduplicating at all while they exist).
    async fn pending_plans(&self) -> Result<Vec<GcPlan>, Error> {
        let mut plans = vec![];
        for plan in self.read_plans().await? {
            match plan {
                Ok(plan) => plans.push(plan),
                Err(why) => tracing::warn!("an unreadable gc plan is left alone: {why}"),
            }
        }
        Ok(plans)
    }

    /// What pending collector plans condemn. A backup reads this once its marker exists and
    /// then neither deduplicates against nor adopts those packs. An unreadable plan might
    /// name any pack: then every pack is off limits for this backup (it stores everything).
    pub(crate) async fn condemned_packs(&self) -> Result<Condemned, Error> {
        let mut packs = HashSet::new();
        for plan in self.read_plans().await? {
            match plan {
                Ok(plan) => packs.extend(plan.condemned),
                Err(why) => {
                    tracing::warn!(
                        "an unreadable gc plan ({why}): this backup deduplicates against nothing"
                    );
                    return Ok(Condemned::All);
                }
            }
        }
        Ok(Condemned::Packs(packs))
    }

    /// Removes the notes of points that have no manifest and no in-flight marker: written by
    /// a backup (its retain-until) that then failed, or left by an interrupted purge.
    async fn remove_orphan_notes(&self) -> Result<u64, Error> {
        let paths = self.list_paths(&layout::notes(None, None)).await?;
        let mut points: std::collections::BTreeMap<(Name, PointId), Vec<object_store::path::Path>> =
            Default::default();
        for path in paths {
            if let Some((vm, point, _)) = layout::parse_note_path(&path) {
                points.entry((vm, point)).or_default().push(path);
            }
        }
        let mut removed = 0;
        for ((vm, point), paths) in points {
            let manifest = layout::manifest(&vm, &point);
            // Manifest, marker, manifest: a commit writes its manifest before it removes its
            // marker, so a point committing meanwhile is seen by the second look.
            if self.head_exists(&manifest).await?
                || self.head_exists(&layout::inflight(&point)).await?
                || self.head_exists(&manifest).await?
            {
                continue;
            }
            self.delete_all(&paths).await?;
            removed += paths.len() as u64;
        }
        // Damage records of points that are gone (a purge interrupted after the manifest).
        let mut gone = vec![];
        for path in self.list_paths(&object_store::path::Path::from("damage")).await? {
            let Some((vm, point, _)) = layout::parse_damage_path(&path) else { continue };
            if !self.head_exists(&layout::manifest(&vm, &point)).await? {
                gone.push(path);
            }
        }
        self.delete_all(&gone).await?;
        Ok(removed)
    }
}
