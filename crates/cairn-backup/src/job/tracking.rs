//! Starting the next change-tracking epoch and taking the views, as one step.
//!
//! For each qcow2 disk, in the capture's one step (while the guest is quiesced): the bitmap
//! of the disk's previous point is judged, this point's bitmap is added to the image
//! (`cairn:VM:DISK:POINT`), and then the disk's view is taken. A write before the view is in
//! the view; a write after it is in the new bitmap. After the commit the older bitmaps go;
//! after a failure the new one does, and the previous one, still recording, serves the next
//! try. Raw disks have no tracking here: their incrementals are hash scans.

use std::collections::BTreeMap;

use cairn_format::{Name, PointId, PointManifest};
use cairn_nbd::{Previous, Rotation};
use cairn_snapshot::{DiskConfig, DiskFormat, DiskSpec, DiskViews, Record, View, VmConfig};

/// Whether a disk's changes are tracked (its image can hold dirty bitmaps).
pub(super) fn is_tracked(disk: &DiskConfig) -> bool {
    disk.format == DiskFormat::Qcow2
}

/// The views of a VM's disks, with their tracking started in the same step.
pub(super) struct TrackedViews {
    vm: Name,
    disks: Vec<DiskConfig>,
    point: PointId,
    /// For each disk: the point its previous bitmap should have been started by.
    since: BTreeMap<Name, PointId>,
    /// Bytes per bitmap bit: the vault's block size (a finer bitmap marks no fewer blocks).
    granularity: u64,
    rotations: Rotations,
}

impl TrackedViews {
    pub(super) fn new(
        config: &VmConfig,
        point: PointId,
        previous: Option<&PointManifest>,
        granularity: u64,
    ) -> Self {
        let since = config
            .disks
            .iter()
            .filter_map(|d| {
                let p = previous.filter(|m| m.disks.contains_key(&d.spec.name))?;
                Some((d.spec.name.clone(), p.point.clone()))
            })
            .collect();
        TrackedViews {
            vm: config.vm.clone(),
            disks: config.disks.clone(),
            point,
            since,
            granularity,
            rotations: Rotations::default(),
        }
    }

    /// The rotations started, for after the commit (or the failure).
    pub(super) fn into_rotations(self) -> Rotations {
        self.rotations
    }

    fn begin(&self, disk: &DiskConfig) -> Result<Rotation, cairn_snapshot::Error> {
        let name = &disk.spec.name;
        Rotation::begin(
            &disk.spec.path,
            &self.vm,
            name,
            self.since.get(name),
            &self.point,
            self.granularity,
        )
        .map_err(|e| cairn_snapshot::Error::Tracking {
            disk: name.to_string(),
            detail: e.to_string(),
        })
    }
}

impl DiskViews for TrackedViews {
    fn disks(&self) -> Vec<DiskSpec> {
        self.disks.iter().map(|d| d.spec.clone()).collect()
    }

    fn take(&mut self, record: &mut Record) -> Result<Vec<View>, cairn_snapshot::Error> {
        let mut views = Vec::with_capacity(self.disks.len());
        for disk in &self.disks {
            if is_tracked(disk) {
                match self.begin(disk) {
                    Ok(rotation) => self.rotations.0.insert(disk.spec.name.clone(), rotation),
                    Err(e) => {
                        self.rotations.abandon_now();
                        return Err(e);
                    }
                };
            }
            match cairn_snapshot::take_noted(disk.view.provider(), &disk.spec, record) {
                Ok(view) => views.push(view),
                Err(e) => {
                    self.rotations.abandon_now();
                    return Err(e);
                }
            }
        }
        Ok(views)
    }
}

/// The bitmap rotations of one job, by disk.
#[derive(Debug, Default)]
pub(super) struct Rotations(BTreeMap<Name, Rotation>);

impl Rotations {
    /// What disk `name`'s previous bitmap can tell (`None`: the disk is not tracked).
    pub(super) fn previous(&self, name: &Name) -> Option<&Previous> {
        self.0.get(name).map(Rotation::previous)
    }

    /// After the job: a committed point drops the disks' older bitmaps, a failed one its own.
    /// A failure here costs only a full scan next time, so it is a warning.
    pub(super) async fn finish(self, committed: bool) {
        let done = tokio::task::spawn_blocking(move || self.finish_now(committed)).await;
        if let Err(e) = done {
            tracing::warn!("rotating dirty bitmaps: {e}");
        }
    }

    fn finish_now(self, committed: bool) {
        for (name, rotation) in self.0 {
            let done = if committed { rotation.committed() } else { rotation.abandoned() };
            if let Err(e) = done {
                tracing::warn!("dirty bitmaps of disk {name}: {e}");
            }
        }
    }

    /// Undoes every rotation begun (inside a failed capture step).
    fn abandon_now(&mut self) {
        std::mem::take(self).finish_now(false);
    }
}
