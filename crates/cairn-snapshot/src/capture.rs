//! The capture lifecycle, in types: quiesce -> take the views -> resume -> read -> commit ->
//! release.
//!
//! [`capture`] is the only way to get a [`Capture`], and the only way to get at views is
//! through a `Capture`; `capture` resumes the guest before it returns, on every path. So
//! reading before the views exist does not compile, and a quiesced guest that is never
//! resumed cannot happen: errors resume explicitly, and a panic resumes through a guard's
//! `Drop` while unwinding. (A killed process cannot run any code: the freeze's watchdog,
//! another process, covers that case.)

use std::path::{Path, PathBuf};
use std::time::Instant;

use cairn_format::{Consistency, Name};
use jiff::Timestamp;

use crate::{Error, Record, failpoint};

/// One disk to capture: its name in the VM and the image or device that holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    /// The disk's stable name.
    pub name: Name,
    /// Its image file or device, as the host sees it.
    pub path: PathBuf,
}

/// Inside the VM: brings applications and file systems to a consistent state and back.
pub trait Quiescer: Send {
    /// Quiesces, setting in `record` the level reached (with [`Record::reached`]) and
    /// any fallback. The returned hold is resumed exactly once, on every path.
    fn quiesce(&mut self, record: &mut Record) -> Result<Box<dyn Hold>, Error>;

    /// After quiescing: whether `disk` was held still while the views were taken (a frozen
    /// file system lives on it; VSS snapshots its volumes at one instant). A level of
    /// `file_system` needs every disk held still; views of several disks that were not are
    /// not one instant.
    fn holds_still(&self, disk: &DiskSpec) -> bool {
        let _ = disk;
        true
    }
}

/// A quiesced guest, waiting to be resumed.
pub trait Hold: Send {
    /// Resumes the guest (thaw, post-scripts), noting what happened in `record`.
    fn resume(self: Box<Self>, record: &mut Record) -> Result<(), Error>;
}

/// Where the disks live: takes and releases point-in-time views of them.
pub trait ViewProvider: Send + Sync {
    /// A short name for evidence and errors, e.g. `reflink`.
    fn kind(&self) -> &'static str;

    /// Takes a view of `disk`. Called while the guest is quiesced: must be quick.
    fn take(&self, disk: &DiskSpec) -> Result<View, Error>;
}

/// Where a VM's disks live, for all of them at once: takes a point-in-time view of every disk
/// in one step, while the guest is quiesced. A provider that tracks changes starts the next
/// tracking epoch in the same step (a running QEMU does both in one QMP transaction), so a
/// write is in the view or recorded for the next backup, never in neither.
pub trait DiskViews: Send {
    /// The disks, in order.
    fn disks(&self) -> Vec<DiskSpec>;

    /// Takes every disk's view, in order, noting each in `record`. On error, views already
    /// taken are released (dropped) and whatever tracking was started is undone.
    fn take(&mut self, record: &mut Record) -> Result<Vec<View>, Error>;

    /// Whether `take` views every disk at one instant by itself (a running QEMU pauses the
    /// VM for it), so disks nothing quiesced are still one point in time.
    fn one_instant(&self) -> bool {
        false
    }
}

/// Each disk's view taken by its own [`ViewProvider`], one after another.
pub struct EachDisk<'a>(pub Vec<(DiskSpec, &'a dyn ViewProvider)>);

impl DiskViews for EachDisk<'_> {
    fn disks(&self) -> Vec<DiskSpec> {
        self.0.iter().map(|(d, _)| d.clone()).collect()
    }

    fn take(&mut self, record: &mut Record) -> Result<Vec<View>, Error> {
        let mut views = Vec::with_capacity(self.0.len());
        for (disk, provider) in &self.0 {
            views.push(take_noted(*provider, disk, record)?);
        }
        Ok(views)
    }
}

/// Takes one disk's view with `provider` and notes it (and how long it took) in `record`.
pub fn take_noted(
    provider: &dyn ViewProvider,
    disk: &DiskSpec,
    record: &mut Record,
) -> Result<View, Error> {
    let started = Instant::now();
    let view = provider.take(disk)?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    record.note_disk(
        "view",
        &disk.name,
        format!("{} view of {} taken in {ms:.1} ms", view.kind(), disk.path.display()),
    );
    Ok(view)
}

/// How a view is released: told whether the recovery point was committed.
pub type Release = Box<dyn FnOnce(bool) -> Result<(), Error> + Send + Sync>;

/// How a view is kept past its backup (renamed out of the agent's own, removed-on-crash
/// names), given a tag (the point's id): what the kept view is, for its later release.
pub type Keep = Box<dyn FnOnce(&str) -> Result<crate::KeptView, Error> + Send + Sync>;

/// A disk as it was at the capture: what the backup reads.
pub struct View {
    disk: Name,
    path: PathBuf,
    kind: &'static str,
    point_in_time: bool,
    release: Option<Release>,
    keep: Option<Keep>,
}

impl View {
    /// A point-in-time view readable at `path`; `release` removes it.
    pub fn snapshot(disk: &DiskSpec, kind: &'static str, path: PathBuf, release: Release) -> View {
        View {
            disk: disk.name.clone(),
            path,
            kind,
            point_in_time: true,
            release: Some(release),
            keep: None,
        }
    }

    /// This view, which may be kept past its backup by `keep` (a view that costs nothing
    /// until the disk is written again: a reflink clone, a btrfs snapshot).
    pub fn keepable(mut self, keep: Keep) -> View {
        self.keep = Some(keep);
        self
    }

    /// True if the view can be kept for instant restores.
    pub fn can_keep(&self) -> bool {
        self.keep.is_some()
    }

    /// The disk itself, read as it is: no point in time unless nothing writes to it.
    pub fn live(disk: &DiskSpec) -> View {
        View {
            disk: disk.name.clone(),
            path: disk.path.clone(),
            kind: "live",
            point_in_time: false,
            release: None,
            keep: None,
        }
    }

    /// The disk's name.
    pub fn disk(&self) -> &Name {
        &self.disk
    }

    /// Where to read the view.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The provider that made it.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// True when the view is a point in time (not the live disk).
    pub fn is_point_in_time(&self) -> bool {
        self.point_in_time
    }

    fn release(&mut self, committed: bool) -> Result<(), Error> {
        match self.release.take() {
            Some(release) => release(committed),
            None => Ok(()),
        }
    }
}

impl Drop for View {
    fn drop(&mut self) {
        if let Err(e) = self.release(false) {
            tracing::warn!(disk = %self.disk, "cannot release view: {e}");
        }
    }
}

/// Whether the VM is running: a stopped VM's disks need no quiescing and no view to be
/// crash-consistent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Running: something may write to the disks while they are read.
    Running,
    /// Stopped: nothing writes to the disks.
    Stopped,
}

/// The captured disks, ready to read; released after the commit.
pub struct Capture {
    views: Vec<View>,
    record: Record,
    captured_at: Timestamp,
}

impl Capture {
    /// The views, one per disk, in the order asked for.
    pub fn views(&self) -> &[View] {
        &self.views
    }

    /// The consistency reached.
    pub fn level(&self) -> Consistency {
        self.record.level()
    }

    /// The account of how the capture went.
    pub fn record(&self) -> &Record {
        &self.record
    }

    /// When the disks were captured.
    pub fn captured_at(&self) -> Timestamp {
        self.captured_at
    }

    /// True if every view can be kept (the point can have a snapshot tier).
    pub fn can_keep(&self) -> bool {
        !self.views.is_empty() && self.views.iter().all(View::can_keep)
    }

    /// Keeps every view under `tag` (after a committed point) instead of releasing it; a view
    /// that cannot be kept is released. On a failure the views not yet kept are released and
    /// those kept are released too: a snapshot tier is whole or absent.
    pub fn keep(mut self, tag: &str) -> Result<Vec<crate::KeptView>, Error> {
        let mut kept = vec![];
        let mut failure = None;
        for view in &mut self.views {
            if failure.is_some() {
                let _ = view.release(true);
                continue;
            }
            match view.keep.take() {
                Some(keep) => match keep(tag) {
                    Ok(k) => {
                        // The view now lives under its kept name: nothing to release.
                        view.release = None;
                        kept.push(k);
                    }
                    Err(e) => {
                        let _ = view.release(true);
                        failure = Some(e);
                    }
                },
                None => {
                    let _ = view.release(true);
                }
            }
        }
        match failure {
            None => Ok(kept),
            Some(e) => {
                for k in &kept {
                    if let Err(e) = k.release() {
                        tracing::warn!("releasing a kept view after a failure: {e}");
                    }
                }
                Err(e)
            }
        }
    }

    /// Releases every view, telling providers whether the point was committed (VSS tells
    /// writers a full backup succeeded only then). Returns the first failure.
    pub fn release(mut self, committed: bool) -> Result<(), Error> {
        let mut first = Ok(());
        for view in &mut self.views {
            let result = view.release(committed);
            if first.is_ok() {
                first = result;
            }
        }
        first
    }
}

/// Resumes a hold when dropped, so a panic between quiesce and resume still resumes.
struct ResumeGuard(Option<Box<dyn Hold>>);

impl ResumeGuard {
    fn resume(mut self, record: &mut Record) -> Result<(), Error> {
        match self.0.take() {
            Some(hold) => hold.resume(record),
            None => Ok(()),
        }
    }
}

impl Drop for ResumeGuard {
    fn drop(&mut self) {
        if let Some(hold) = self.0.take() {
            let mut scratch = Record::new(Consistency::None);
            if let Err(e) = hold.resume(&mut scratch) {
                tracing::error!("resuming after a failure: {e}");
            }
        }
    }
}

/// Captures `disks`, each viewed by its own provider: see [`capture_with`].
pub fn capture(
    quiescer: &mut dyn Quiescer,
    disks: &[(DiskSpec, &dyn ViewProvider)],
    state: VmState,
) -> Result<Capture, Error> {
    capture_with(quiescer, &mut EachDisk(disks.to_vec()), state)
}

/// Captures a VM's disks: quiesces, takes every disk's view in one step, resumes, and returns
/// the views with the level reached. On error the guest has been resumed and every view taken
/// released.
pub fn capture_with(
    quiescer: &mut dyn Quiescer,
    views: &mut dyn DiskViews,
    state: VmState,
) -> Result<Capture, Error> {
    let disks = views.disks();
    let one_instant = views.one_instant();
    let mut record = Record::new(Consistency::Crash);
    let guard = ResumeGuard(Some(quiescer.quiesce(&mut record)?));
    let captured_at = Timestamp::now();
    let clock = Instant::now();
    let taken = views.take(&mut record);
    let spread = clock.elapsed();
    failpoint::hit(failpoint::WHILE_QUIESCED);
    let resumed = guard.resume(&mut record);
    if let (Err(_), Err(e)) = (&taken, &resumed) {
        tracing::error!("resuming after a failed view also failed: {e}");
    }
    let views = taken?;
    resumed?;
    // Disks nothing held still: all of them when the level is crash already.
    let quiesced_any = record.level() > Consistency::Crash;
    let uncovered: Vec<&DiskSpec> = disks
        .iter()
        .filter(|d| !one_instant && (!quiesced_any || !quiescer.holds_still(d)))
        .collect();
    if record.level() == Consistency::FileSystem && state == VmState::Running {
        for disk in &uncovered {
            record.fall_back(
                Consistency::Crash,
                format!(
                    "disk {} ({}) holds none of the frozen file systems: it is only crash-consistent",
                    disk.name,
                    disk.path.display()
                ),
            );
        }
    }
    judge_views(&mut record, &views, state, spread, uncovered.len());
    Ok(Capture { views, record, captured_at })
}

/// Lowers the level where the views cannot support it: a live read of a running VM has no
/// instant, and separate views of several disks of a running VM that nothing held still are
/// not one instant either (one such disk among frozen ones is: the others did not change).
fn judge_views(
    record: &mut Record,
    views: &[View],
    state: VmState,
    spread: std::time::Duration,
    uncovered: usize,
) {
    if state == VmState::Stopped {
        record.reached(
            Consistency::Crash,
            "the VM is stopped: its disks were read as they are, with nothing to quiesce",
        );
        return;
    }
    if let Some(live) = views.iter().find(|v| !v.is_point_in_time()) {
        // Asked for (live_read, or disks named on a command line): recorded, not warned about.
        record.settle(
            Consistency::None,
            format!(
                "disk {} was read live, with no snapshot: blocks may come from different instants",
                live.disk()
            ),
        );
    } else if uncovered > 1 {
        record.fall_back(
            Consistency::None,
            format!(
                "{uncovered} disks were captured one after another over {:.1} ms with nothing quiescing them: each disk is crash-consistent, but not all at one instant",
                spread.as_secs_f64() * 1000.0
            ),
        );
    }
}
