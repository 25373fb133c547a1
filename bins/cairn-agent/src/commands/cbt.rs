//! Changed-block tracking for qcow2 disks: the dirty-bitmap rotation around one backup.
//!
//! Before the view, every qcow2 disk's previous bitmap is judged and this point's bitmap is
//! started; the disk is then read through `qemu-nbd`, its dirty ranges with it; after the
//! commit the old bitmaps go, after a failure the new one does. Raw disks pass through.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use cairn_delta::{BlockSource, RawFile};
use cairn_format::{Name, PointId};
use cairn_nbd::{NbdSource, Rotation, qemu};
use cairn_vault::Vault;

/// The bitmap rotations of one backup, and the point id they are named for.
pub struct Tracker {
    point: PointId,
    rotations: BTreeMap<Name, Rotation>,
}

impl Tracker {
    /// Reserves the point's id and, for every qcow2 image among `disks` (name, image path),
    /// judges the bitmap of the disk's previous point and starts this point's bitmap. Call it
    /// at the moment of the view, before any data is read.
    pub async fn begin(
        vault: &Vault,
        vm: &Name,
        disks: &[(Name, PathBuf)],
    ) -> anyhow::Result<Self> {
        let point = vault.reserve_point_id(vm, jiff::Timestamp::now()).await?;
        let mut tracker = Tracker { point, rotations: BTreeMap::new() };
        let qcow2: Vec<&(Name, PathBuf)> =
            disks.iter().filter(|(_, p)| qemu::is_qcow2(p)).collect();
        if qcow2.is_empty() {
            return Ok(tracker);
        }
        let (previous, _) = vault.previous_point(vm).await?;
        // One bitmap per vault block: a finer one would mark no fewer blocks to read.
        let granularity = u64::from(vault.config().block_size);
        for (name, path) in qcow2 {
            let since =
                previous.as_ref().filter(|m| m.disks.contains_key(name)).map(|m| m.point.clone());
            let (vm, name2, path2, point) =
                (vm.clone(), name.clone(), path.clone(), tracker.point.clone());
            let begun = tokio::task::spawn_blocking(move || {
                Rotation::begin(&path2, &vm, &name2, since.as_ref(), &point, granularity)
            })
            .await?
            .with_context(|| format!("starting the dirty bitmap of disk {name}"));
            match begun {
                Ok(rotation) => {
                    tracker.rotations.insert(name.clone(), rotation);
                }
                Err(e) => {
                    tracker.finish(false).await;
                    return Err(e);
                }
            }
        }
        Ok(tracker)
    }

    /// The id the point will have.
    pub fn point(&self) -> &PointId {
        &self.point
    }

    /// Opens disk `name` at `path` (the image, or its view): qcow2 through `qemu-nbd` with
    /// the previous bitmap's dirty ranges, anything else as a raw image.
    pub fn open(&self, name: &Name, path: &Path) -> anyhow::Result<Arc<dyn BlockSource>> {
        if qemu::is_qcow2(path) {
            let previous = self.rotations.get(name).map(|r| r.previous());
            let source = NbdSource::serve(path, "qcow2", previous)
                .with_context(|| format!("serving qcow2 disk {name} with qemu-nbd"))?;
            return Ok(Arc::new(source));
        }
        Ok(Arc::new(RawFile::open(path)?))
    }

    /// After the backup: a committed point drops the disks' older bitmaps, a failed one its
    /// own. A failure here costs only a full scan next time, so it is a warning.
    pub async fn finish(self, committed: bool) {
        for (name, rotation) in self.rotations {
            let done = tokio::task::spawn_blocking(move || {
                if committed { rotation.committed() } else { rotation.abandoned() }
            })
            .await;
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("dirty bitmaps of disk {name}: {e}"),
                Err(e) => tracing::warn!("dirty bitmaps of disk {name}: {e}"),
            }
        }
    }
}
