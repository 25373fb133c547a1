//! The VM backup job: what `cairn-agent backup` does, callable in one step.
//!
//! ```text
//!  check images ─▶ reserve the point id ─▶ capture ─────────────────────▶ open sources ─▶ backup ─▶ commit
//!                                          quiesce                         (raw, qcow2         │
//!                                          start tracking + take views     over qemu-nbd)      ▼
//!                                          resume                                  release views, rotate bitmaps
//! ```
//!
//! The invariants it keeps, whoever calls it (the agent, a coordinator's agent, an embedding
//! program): a disk's format is what the configuration declares; the next dirty bitmap starts
//! in the same step as the view, before any data is read; the guest is resumed before anything
//! reads a view; views are released, and old bitmaps removed, only after the commit (or the
//! failure, which removes the new bitmaps instead).

mod check;
mod live;
mod quiesce;
mod sources;
mod tracking;

use std::sync::Arc;

use cairn_format::{Name, PointManifest};
use cairn_snapshot::freeze::Protected;
use cairn_snapshot::watchdog::WatchdogCommand;
use cairn_snapshot::{Capture, VmConfig, VmState};
use cairn_vault::Vault;

use crate::{BackupRequest, Cancel, Error, Progress};

pub use check::{Check, check};

/// How a job works the machine, and what it needs from its caller.
#[derive(Clone, Debug, Default)]
pub struct JobOptions {
    /// Hashing threads per disk (default: one per core).
    pub threads: Option<usize>,
    /// Disks read at once (default [`crate::DEFAULT_PARALLEL_DISKS`]).
    pub parallel_disks: Option<usize>,
    /// The program that thaws frozen file systems if this process dies (the agent's own
    /// executable in its `watchdog-thaw` role). Needed when the configuration freezes.
    pub watchdog: Option<WatchdogCommand>,
    /// What the caller writes to during the job besides the vault (its log file, say): never
    /// frozen. The process's temporary folder, working folder and log are always protected.
    pub protected: Vec<Protected>,
    /// Keep the point until then, whatever retention says (an on-demand backup's own
    /// retention), recorded in a note before the point is committed.
    pub retain_until: Option<jiff::Timestamp>,
    /// The coordinator's job this run is, recorded in the point's manifest.
    pub origin: Option<cairn_format::Origin>,
    /// Added to the clock for the point's id and capture time. Zero but in simulations,
    /// where days pass in seconds on an injected clock (the agent's hidden `--fake-clock`)
    /// and retention must see the simulated days.
    pub time_shift: jiff::SignedDuration,
}

impl JobOptions {
    /// The time as the point records it: the clock, shifted in simulations.
    pub(crate) fn shifted(&self, t: jiff::Timestamp) -> jiff::Timestamp {
        t.checked_add(self.time_shift).unwrap_or(t)
    }
}

/// A VM to back up: its configuration (disks, formats, views, freeze, scripts) and options.
#[derive(Clone, Debug)]
pub struct VmJob {
    config: VmConfig,
    options: JobOptions,
}

impl VmJob {
    /// The job a VM configuration describes.
    pub fn new(config: VmConfig, options: JobOptions) -> Self {
        VmJob { config, options }
    }

    /// The VM's name.
    pub fn vm(&self) -> &Name {
        &self.config.vm
    }

    /// Its configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Runs the job: checks the disks' images, captures the VM (quiesce; start the next dirty
    /// bitmaps and take the views; resume), backs the views up into `vault`, commits the
    /// point, then releases the views and rotates the bitmaps. `cancel` stops it at any point
    /// after the capture (a capture always finishes, so the guest is resumed); nothing is
    /// committed then, and earlier points are intact.
    pub async fn run(
        &self,
        vault: &Vault,
        progress: Arc<dyn Progress>,
        cancel: &Cancel,
    ) -> Result<PointManifest, Error> {
        let nobody = Box::new(|_: Captured| {});
        Ok(self.run_keeping(vault, progress, cancel, None, nobody).await?.0)
    }

    /// [`VmJob::run`], keeping the views past the commit under `keep` (the point's snapshot
    /// tier, recorded in its notes before the commit) when every disk's view can be kept: a
    /// reflink clone or btrfs snapshot, or for a running QEMU VM a reflink clone of each image
    /// made at the instant. `captured` is told the point once the disks are captured, before
    /// anything is read. Returns the kept views, for their later release.
    pub async fn run_keeping(
        &self,
        vault: &Vault,
        progress: Arc<dyn Progress>,
        cancel: &Cancel,
        keep: Option<cairn_format::SnapshotTier>,
        captured: Box<dyn FnOnce(Captured) + Send>,
    ) -> Result<(PointManifest, Vec<cairn_snapshot::KeptView>), Error> {
        if let Some(qemu) = &self.config.qemu {
            return live::run(self, qemu, vault, progress, cancel, keep, captured).await;
        }
        let snapshot = self.snapshot(vault, cancel).await?;
        captured(Captured {
            point: snapshot.point().clone(),
            captured_at: snapshot.captured_at(),
            level: snapshot.level(),
            keeps_views: keep.is_some() && snapshot.can_keep(),
        });
        snapshot.transfer(vault, progress, cancel, keep).await
    }

    /// The job's first phase on its own: checks the images and captures the VM, holding the
    /// views; nothing is sent yet. [`Snapshot::transfer`] is the second phase. A running
    /// QEMU VM's views are QEMU's own and are not held apart from a transfer: use
    /// [`VmJob::run`] for it.
    pub async fn snapshot(&self, vault: &Vault, cancel: &Cancel) -> Result<Snapshot, Error> {
        let config = &self.config;
        if config.qemu.is_some() {
            return Err(Error::InvalidRequest(format!(
                "VM {} runs in QEMU: its views are QEMU's own and its job runs in one phase",
                config.vm
            )));
        }
        check::names(config)?;
        check::images(config).await?;
        let point = vault
            .reserve_point_id(&config.vm, self.options.shifted(jiff::Timestamp::now()))
            .await?;
        let previous = match config.disks.iter().any(tracking::is_tracked) {
            true => vault.previous_point(&config.vm).await?.0,
            false => None,
        };
        let views = tracking::TrackedViews::new(
            config,
            point.clone(),
            previous.as_ref(),
            u64::from(vault.config().block_size),
        );
        let protected = quiesce::protected(config, Some(vault), &self.options);
        let quiescer = quiesce::quiescer(config, &protected, self.options.watchdog.as_ref())?;
        let (capture, rotations) =
            capture(config.vm.clone(), config.state, quiescer, views).await?;
        if cancel.is_cancelled() {
            finish(capture, rotations, false).await;
            return Err(Error::Cancelled);
        }
        Ok(Snapshot { job: self.clone(), capture, rotations, point })
    }

    /// Reads the captured views into the vault and commits the point.
    #[allow(clippy::too_many_arguments)]
    async fn back_up(
        &self,
        vault: &Vault,
        capture: &Capture,
        rotations: &tracking::Rotations,
        point: cairn_format::PointId,
        snapshot: Option<cairn_format::SnapshotTier>,
        progress: Arc<dyn Progress>,
        cancel: &Cancel,
    ) -> Result<PointManifest, Error> {
        let mut evidence = capture.record().evidence().to_vec();
        let mut disks = Vec::new();
        for (view, disk) in capture.views().iter().zip(&self.config.disks) {
            let previous = rotations.previous(&disk.spec.name);
            let (input, warning) = sources::open(disk, view.path(), previous).await?;
            evidence.extend(warning);
            disks.push(input);
        }
        let request = BackupRequest {
            vm: self.config.vm.clone(),
            disks,
            consistency: capture.level(),
            captured_at: Some(self.options.shifted(capture.captured_at())),
            evidence,
            threads: self.options.threads,
            point: Some(point),
            parallel_disks: self.options.parallel_disks,
            retain_until: self.options.retain_until,
            machine: None,
            origin: self.options.origin.clone(),
            snapshot,
        };
        crate::backup(vault, request, progress, cancel).await
    }
}

/// A job's disks, captured: what [`VmJob::run_keeping`] tells its caller before the transfer.
#[derive(Clone, Debug)]
pub struct Captured {
    /// The point's id, reserved in the vault.
    pub point: cairn_format::PointId,
    /// When the disks were captured (as the point records it).
    pub captured_at: jiff::Timestamp,
    /// The consistency reached.
    pub level: cairn_format::Consistency,
    /// Whether every disk's view will be kept (the point is restorable from this host's
    /// views as soon as it commits, and meanwhile from the views themselves).
    pub keeps_views: bool,
}

/// A captured VM whose views are held: the first phase of a job done, the second to come.
/// Drop it only through [`Snapshot::transfer`] or [`Snapshot::abandon`] (dropped otherwise,
/// its views are released and its dirty bitmaps left for the next backup to settle).
pub struct Snapshot {
    job: VmJob,
    capture: Capture,
    rotations: tracking::Rotations,
    point: cairn_format::PointId,
}

impl Snapshot {
    /// The point's id, reserved in the vault.
    pub fn point(&self) -> &cairn_format::PointId {
        &self.point
    }

    /// When the disks were captured (as the point records it).
    pub fn captured_at(&self) -> jiff::Timestamp {
        self.job.options.shifted(self.capture.captured_at())
    }

    /// The consistency reached.
    pub fn level(&self) -> cairn_format::Consistency {
        self.capture.level()
    }

    /// True if every view can be kept past the transfer (reflink clones, btrfs snapshots):
    /// the point can have a snapshot tier.
    pub fn can_keep(&self) -> bool {
        self.capture.can_keep()
    }

    /// Each disk's view: where the disk reads as it was at the capture.
    pub fn views(&self) -> Vec<(Name, std::path::PathBuf)> {
        self.capture.views().iter().map(|v| (v.disk().clone(), v.path().to_owned())).collect()
    }

    /// The second phase: reads the views into the vault and commits the point, then rotates
    /// the dirty bitmaps. With `keep` (and views that can be kept), the point's notes record
    /// its snapshot tier before the commit and the views are kept under the point's id
    /// afterwards, returned for their later release; otherwise they are released.
    pub async fn transfer(
        self,
        vault: &Vault,
        progress: Arc<dyn Progress>,
        cancel: &Cancel,
        keep: Option<cairn_format::SnapshotTier>,
    ) -> Result<(PointManifest, Vec<cairn_snapshot::KeptView>), Error> {
        let keep = keep.filter(|_| self.capture.can_keep());
        let Snapshot { job, capture, rotations, point } = self;
        let result = job
            .back_up(vault, &capture, &rotations, point.clone(), keep.clone(), progress, cancel)
            .await;
        let manifest = match result {
            Ok(m) => m,
            Err(e) => {
                finish(capture, rotations, false).await;
                return Err(e);
            }
        };
        let mut kept = vec![];
        if keep.is_some() {
            kept = keep_views(capture, vault, &manifest).await;
            rotations.finish(true).await;
        } else {
            finish(capture, rotations, true).await;
        }
        Ok((manifest, kept))
    }

    /// Gives the snapshot up: views released, bitmaps rolled back; nothing was committed.
    pub async fn abandon(self) {
        finish(self.capture, self.rotations, false).await;
    }
}

/// After a commit whose notes give it a snapshot tier: keeps every view under the point's id.
/// Views that cannot all be kept are released, and a note says the point is in its vault
/// alone (a snapshot tier is whole or absent).
async fn keep_views(
    capture: Capture,
    vault: &Vault,
    manifest: &PointManifest,
) -> Vec<cairn_snapshot::KeptView> {
    let point = manifest.point.clone();
    let tag = point.to_string();
    let why = match tokio::task::spawn_blocking(move || capture.keep(&tag)).await {
        Ok(Ok(kept)) => return kept,
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    tracing::warn!(point = %point, "the views could not be kept ({why}): the point is in the vault alone");
    let gone = cairn_format::Change::Snapshot(None);
    if let Err(e) = vault.write_note(&manifest.vm, &point, "backup", &[gone]).await {
        tracing::warn!(point = %point, "recording that its views are gone: {e}");
    }
    vec![]
}

/// Runs the capture on a blocking thread (scripts may run for minutes); a capture that fails
/// after tracking began undoes the tracking.
async fn capture(
    vm: Name,
    state: VmState,
    mut quiescer: Box<dyn cairn_snapshot::Quiescer>,
    mut views: tracking::TrackedViews,
) -> Result<(Capture, tracking::Rotations), Error> {
    let joined = tokio::task::spawn_blocking(move || {
        let captured = cairn_snapshot::capture_with(quiescer.as_mut(), &mut views, state);
        (captured, views.into_rotations())
    })
    .await?;
    match joined {
        (Ok(capture), rotations) => Ok((capture, rotations)),
        (Err(source), rotations) => {
            rotations.finish(false).await;
            Err(Error::Capture { vm, source })
        }
    }
}

/// After the job: views released (told whether the point committed), then bitmaps rotated.
/// Neither can lose data any more, so failures here are warnings.
async fn finish(capture: Capture, rotations: tracking::Rotations, committed: bool) {
    match tokio::task::spawn_blocking(move || capture.release(committed)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("releasing the views: {e}"),
        Err(e) => tracing::warn!("releasing the views: {e}"),
    }
    rotations.finish(committed).await;
}
