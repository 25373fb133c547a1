//! Restore drills: proving that a point restores before the day it is needed.
//!
//! A drill restores each disk of a point to a sparse temporary copy (every chunk checked on
//! the way, as any restore does), compares a random sample of the copy's blocks with the
//! digests the point's index records (so the bytes that landed on the disk are the ones
//! backed up), finds the disk's partitions and checks every ext2/3/4 file system on it with
//! `e2fsck` ([`fsck`]), then removes the copy before the next disk, so a drill needs room for
//! its largest disk only. The outcome is written on the point as a note
//! ([`cairn_format::Drill`]), which retention reads (the newest point a drill passed on is
//! always kept) and the coordinator's rescan shows.
//!
//! The copy holds guest bytes: the checker reads them, never the agent's own code. As root,
//! `e2fsck` runs as `nobody` with no new privileges, on a copy handed to it alone.

mod files;
mod fsck;
mod volumes;

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_format::index::BlockEntry;
use cairn_format::{Change, Drill, Name, PointId, PointManifest};
use cairn_vault::Vault;
use jiff::Timestamp;

use crate::{Error, Progress, RestoreOptions, RestoreStats};

pub use fsck::find_e2fsck;

/// How to run a drill.
#[derive(Clone, Debug)]
pub struct DrillOptions {
    /// A folder on a file system with room for the largest disk's data (its copy is sparse):
    /// the drill makes a private folder inside it and removes it when done.
    pub work_dir: PathBuf,
    /// Blocks per disk whose restored bytes are compared with their digests.
    pub sample_blocks: u64,
    /// The `e2fsck` to run ([`find_e2fsck`] finds Debian's).
    pub e2fsck: PathBuf,
    /// Write the outcome on the point as a note.
    pub record: bool,
    /// Restore a copy and run `e2fsck` on it, or read every file from the vault.
    pub method: DrillMethod,
}

/// How a drill checks a point's file systems.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DrillMethod {
    /// Restore each disk to a sparse copy in the work folder and check it with `e2fsck`.
    #[default]
    Restore,
    /// Read every folder, link and file of each volume straight from the vault, keeping
    /// nothing: no room needed, no checker run (see [`files`]).
    ReadFiles,
}

impl DrillMethod {
    /// Its name in the note (`drill.method`).
    pub fn name(self) -> &'static str {
        match self {
            DrillMethod::Restore => "restore",
            DrillMethod::ReadFiles => "read-files",
        }
    }
}

/// What a drill found on one volume (a partition, or a disk with no table).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeCheck {
    /// "partition 1", or "the whole disk".
    pub volume: String,
    /// Its file system, as detected.
    pub fs: String,
    /// The check's outcome.
    pub outcome: CheckOutcome,
}

/// A file system check's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckOutcome {
    /// The checker found nothing wrong (after replaying the journal on the copy).
    Clean,
    /// The checker found damage, or could not finish: what it said.
    Failed(String),
    /// No checker for this file system (or nothing to check): why.
    NotChecked(String),
}

/// What a drill found on one disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskDrill {
    /// The disk.
    pub disk: Name,
    /// The restore's figures, or why it failed.
    pub restore: Result<RestoreStats, String>,
    /// Blocks compared with their digests.
    pub sampled: u64,
    /// Disk offsets of sampled blocks whose restored bytes did not match.
    pub mismatched: Vec<u64>,
    /// Its file systems.
    pub volumes: Vec<VolumeCheck>,
}

impl DiskDrill {
    /// A disk about to be drilled: nothing read yet.
    fn new(disk: &Name) -> DiskDrill {
        DiskDrill {
            disk: disk.clone(),
            restore: Err(String::new()),
            sampled: 0,
            mismatched: vec![],
            volumes: vec![],
        }
    }

    /// True if the disk restored whole, every sampled block matched and no check failed.
    pub fn passed(&self) -> bool {
        self.restore.as_ref().is_ok_and(|s| s.damaged.is_empty())
            && self.mismatched.is_empty()
            && !self.volumes.iter().any(|v| matches!(v.outcome, CheckOutcome::Failed(_)))
    }
}

/// A drill's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrillReport {
    /// The VM.
    pub vm: Name,
    /// The point drilled.
    pub point: PointId,
    /// How it was drilled.
    pub method: DrillMethod,
    /// Each disk.
    pub disks: Vec<DiskDrill>,
    /// True if every disk passed.
    pub passed: bool,
    /// One line: what was checked, or what failed (the note's summary).
    pub summary: String,
    /// The outcome was written on the point.
    pub recorded: bool,
}

/// Drills `point`: restores each disk, samples its blocks, checks its file systems, and (with
/// `options.record`) notes the outcome on the point. An `Err` means the drill could not run
/// (no room, no vault): nothing is recorded then. A point that fails its drill is an `Ok`
/// report that says so.
pub async fn drill(
    vault: &Vault,
    point: &PointManifest,
    options: &DrillOptions,
    progress: Arc<dyn Progress>,
) -> Result<DrillReport, Error> {
    let mut disks = Vec::new();
    if options.method == DrillMethod::ReadFiles {
        for disk in point.disks.keys() {
            disks.push(files::drill_disk(vault, point, disk, options.sample_blocks).await?);
        }
    } else {
        // The checker must run, and run unprivileged, before anything is restored.
        fsck::preflight(&options.e2fsck).await?;
        let work = WorkFolder::create(&options.work_dir)?;
        for disk in point.disks.keys() {
            let copy = work.path.join(disk.as_str());
            let result =
                drill_disk(vault, point, disk, &copy, options, Arc::clone(&progress)).await;
            // The copy goes before the next disk is restored: room for the largest disk is
            // enough.
            let _ = std::fs::remove_file(&copy);
            disks.push(result?);
        }
    }
    // A point is known to restore only if something in it was checked: a point none of whose
    // file systems could be checked (XFS alone, LVM, no table) restored, but proves no more.
    let checked = disks.iter().flat_map(|d| &d.volumes).any(|v| v.outcome == CheckOutcome::Clean);
    let passed = checked && disks.iter().all(DiskDrill::passed);
    let summary = summarize(&disks, options.method);
    let mut report = DrillReport {
        vm: point.vm.clone(),
        point: point.point.clone(),
        method: options.method,
        disks,
        passed,
        summary,
        recorded: false,
    };
    if options.record {
        let change = Change::Drilled(Drill {
            at: Timestamp::now(),
            passed,
            method: options.method.name().into(),
            summary: report.summary.clone(),
        });
        vault.write_note(&point.vm, &point.point, "drill", &[change]).await?;
        report.recorded = true;
    }
    Ok(report)
}

/// One disk: restore, sample, check. Errors that say nothing of the point (the work folder
/// is full, the vault is unreachable) stop the drill; damage in the point is the report's.
async fn drill_disk(
    vault: &Vault,
    point: &PointManifest,
    disk: &Name,
    copy: &Path,
    options: &DrillOptions,
    progress: Arc<dyn Progress>,
) -> Result<DiskDrill, Error> {
    let mut out = DiskDrill::new(disk);
    let restore_options = RestoreOptions { keep_going: true, ..RestoreOptions::default() };
    match crate::restore_disk(vault, point, disk, copy, &restore_options, progress).await {
        Ok(stats) => out.restore = Ok(stats),
        Err(e) if is_point_damage(&e) => {
            out.restore = Err(e.to_string());
            return Ok(out);
        }
        Err(e) => return Err(e),
    }
    let record = crate::restore::disk_of(point, disk)?;
    let (sampled, mismatched) = sample_blocks(vault, record, copy, options.sample_blocks).await?;
    out.sampled = sampled;
    out.mismatched = mismatched;
    out.volumes = fsck::check_volumes(copy, &options.e2fsck).await?;
    Ok(out)
}

/// Whether a restore error is the point's fault (damaged or missing data, a corrupt index)
/// rather than the drill's surroundings (a full work folder, an unreachable backend).
fn is_point_damage(e: &Error) -> bool {
    matches!(e, Error::Format(_)) || crate::restore::is_damage(e)
}

/// Blocks sampled per disk at most (the choice is held in memory).
const MAX_SAMPLE: u64 = 1 << 20;

/// Up to `count` of the `blocks` block numbers (at most [`MAX_SAMPLE`]), at random, sorted.
fn choose_blocks(blocks: u64, count: u64) -> Vec<u64> {
    let amount = count.min(blocks).min(MAX_SAMPLE);
    let mut rng = rand::rng();
    let total = usize::try_from(blocks).unwrap_or(usize::MAX);
    let amount = usize::try_from(amount).unwrap_or(usize::MAX);
    let mut chosen: Vec<u64> =
        rand::seq::index::sample(&mut rng, total, amount).into_iter().map(|i| i as u64).collect();
    chosen.sort_unstable();
    chosen
}

/// Compares up to `count` random blocks of the restored `copy` with the digests the index
/// records: (blocks compared, offsets that differ).
async fn sample_blocks(
    vault: &Vault,
    record: &cairn_format::DiskRecord,
    copy: &Path,
    count: u64,
) -> Result<(u64, Vec<u64>), Error> {
    let root = vault.read_disk_index(record).await?;
    let blocks = root.block_count();
    let per_page = u64::from(root.blocks_per_page).max(1);
    let block = u64::from(root.block_size);
    let chosen = choose_blocks(blocks, count);
    let amount = chosen.len() as u64;
    let file = std::fs::File::open(copy)
        .map_err(|source| Error::Target { path: copy.to_owned(), source })?;
    let file = Arc::new(file);
    let ids = vault.crypto().ids().clone();
    let pages: Vec<(u64, cairn_format::Digest)> =
        root.page_digests().enumerate().map(|(i, d)| (i as u64, d)).collect();
    let mut mismatched = Vec::new();
    let mut at = 0usize;
    while at < chosen.len() {
        let page_no = chosen[at] / per_page;
        let end = chosen[at..]
            .iter()
            .position(|b| b / per_page != page_no)
            .map_or(chosen.len(), |n| at + n);
        // A page or entry the root promises and does not give is a mismatch, not a skip.
        let entries: Vec<BlockEntry> = match pages.get(page_no as usize) {
            Some((_, id)) => vault.read_page_of(&root, page_no, id).await?.entries().collect(),
            None => Vec::new(),
        };
        let mut wanted: Vec<(u64, Option<cairn_format::Digest>)> = Vec::new();
        for b in &chosen[at..end] {
            match entries.get((b - page_no * per_page) as usize) {
                Some(entry) => wanted.push((b * block, entry.content().copied())),
                None => mismatched.push(b * block),
            }
        }
        let (file, ids, size) = (Arc::clone(&file), ids.clone(), record.size);
        let bad = tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; block as usize];
            let mut bad = Vec::new();
            for (offset, digest) in wanted {
                let len = block.min(size.saturating_sub(offset)) as usize;
                let bytes = &mut buf[..len];
                file.read_exact_at(bytes, offset)?;
                let same = match digest {
                    Some(d) => ids.of(bytes) == d,
                    None => bytes.iter().all(|b| *b == 0),
                };
                if !same {
                    bad.push(offset);
                }
            }
            Ok::<_, std::io::Error>(bad)
        })
        .await
        .map_err(|e| Error::Internal(format!("sampling blocks: {e}")))?
        .map_err(|source| Error::Target { path: copy.to_owned(), source })?;
        mismatched.extend(bad);
        at = end;
    }
    Ok((amount, mismatched))
}

/// The note's line: what passed, or the first things that failed.
fn summarize(disks: &[DiskDrill], method: DrillMethod) -> String {
    let done = match method {
        DrillMethod::Restore => "restored",
        DrillMethod::ReadFiles => "read from the vault",
    };
    let checked = match method {
        DrillMethod::Restore => "checked clean",
        DrillMethod::ReadFiles => "read whole",
    };
    let mut failures = Vec::new();
    let (mut clean, mut unchecked, mut sampled) = (0, 0, 0u64);
    for d in disks {
        sampled += d.sampled;
        match &d.restore {
            Err(e) => failures.push(format!("disk {} was not {done}: {e}", d.disk)),
            Ok(s) if !s.damaged.is_empty() => failures.push(format!(
                "disk {}: {} damaged range(s), first at offset {}",
                d.disk,
                s.damaged.len(),
                s.damaged[0].offset
            )),
            Ok(_) => {}
        }
        if let Some(first) = d.mismatched.first() {
            failures.push(format!(
                "disk {}: {} sampled block(s) differ from their digests, first at offset {first}",
                d.disk,
                d.mismatched.len()
            ));
        }
        for v in &d.volumes {
            match &v.outcome {
                CheckOutcome::Clean => clean += 1,
                CheckOutcome::NotChecked(_) => unchecked += 1,
                CheckOutcome::Failed(why) => failures.push(format!(
                    "disk {} {} ({}): {}",
                    d.disk,
                    v.volume,
                    v.fs,
                    why.lines().last().unwrap_or("the check failed")
                )),
            }
        }
    }
    let mut line = if !failures.is_empty() {
        failures.join("; ")
    } else if clean == 0 {
        format!(
            "{} disk(s) {done} and {sampled} sampled block(s) matched, but no file system \
             could be checked ({unchecked} not checkable): not known to restore",
            disks.len()
        )
    } else {
        format!(
            "{} disk(s) {done}, {sampled} sampled block(s) matched, {clean} file system(s) \
             {checked}, {unchecked} not checkable",
            disks.len()
        )
    };
    // The line is a note's: bounded whatever the checker printed.
    if line.len() > MAX_SUMMARY {
        let mut cut = MAX_SUMMARY;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push_str(" ...");
    }
    line
}

/// Bytes of a drill's summary line at most.
const MAX_SUMMARY: usize = 2000;

/// The drill's private folder, removed with everything in it when dropped.
struct WorkFolder {
    path: PathBuf,
}

impl WorkFolder {
    fn create(parent: &Path) -> Result<Self, Error> {
        let bad = |detail: &str| {
            Error::InvalidRequest(format!("drill work folder {}: {detail}", parent.display()))
        };
        let meta = std::fs::metadata(parent)
            .map_err(|source| Error::Target { path: parent.to_owned(), source })?;
        if !meta.is_dir() {
            return Err(bad("it is not a folder"));
        }
        // Nobody else may change the folders on the way: a copy of a guest's disk is made
        // there and handed to the checker.
        cairn_snapshot::trusted::check_folders(&parent.join("cairn-drill"))
            .map_err(|e| bad(&format!("{e}; give a folder only root (or this user) may change")))?;
        remove_stale(parent);
        let path = parent.join(format!(
            "cairn-drill-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| Error::Target { path: path.clone(), source })?;
        Ok(WorkFolder { path })
    }
}

/// Removes the work folders of drills whose process is gone (killed before it could).
fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("cairn-drill-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!(folder = %entry.path().display(), "removing a dead drill's work folder");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl Drop for WorkFolder {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), "the drill's work folder could not be removed: {e}");
        }
    }
}
