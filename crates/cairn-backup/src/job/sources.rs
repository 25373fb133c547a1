//! Opening a captured disk as a block source, in the format its configuration declares.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_delta::{BlockSource, RawFile};
use cairn_format::Evidence;
use cairn_nbd::{NbdSource, Previous};
use cairn_snapshot::{DiskConfig, DiskFormat};

use crate::{DiskInput, Error};

/// Opens `disk`, captured at `path` (its view, or the image itself): a raw disk as it is, a
/// qcow2 image through `qemu-nbd` with its format given, never guessed, and with the dirty
/// ranges of its previous bitmap when tracking can use them. A raw disk whose first bytes
/// look like a qcow2 header comes with a warning for the point's evidence.
pub(super) async fn open(
    disk: &DiskConfig,
    path: &Path,
    previous: Option<&Previous>,
) -> Result<(DiskInput, Option<Evidence>), Error> {
    let (name, format, path, previous) =
        (disk.spec.name.clone(), disk.format, path.to_path_buf(), previous.cloned());
    let allow_backing = disk.allow_backing_file;
    let for_disk = name.clone();
    tokio::task::spawn_blocking(move || {
        let (source, warning): (Arc<dyn BlockSource>, _) = match format {
            DiskFormat::Qcow2 => {
                let image_error = |source| Error::Image { disk: for_disk.clone(), source };
                // The view is what qemu-nbd opens: its header is checked as the image's was
                // (a relative backing name resolves from the view's folder).
                cairn_nbd::qcow2::check_image(&path, allow_backing).map_err(image_error)?;
                let source = NbdSource::serve(&path, DiskFormat::Qcow2.as_str(), previous.as_ref())
                    .map_err(image_error)?;
                (Arc::new(source), None)
            }
            DiskFormat::Raw => {
                let source = RawFile::open(&path)
                    .map_err(|source| Error::Disk { disk: for_disk.clone(), source })?;
                (Arc::new(source), qcow2_lookalike(&for_disk, &path))
            }
        };
        Ok((DiskInput { name: for_disk, source }, warning))
    })
    .await?
    .map(|(input, warning)| {
        if let Some(w) = &warning {
            tracing::warn!(disk = %name, "{}", w.message);
        }
        (input, warning)
    })
}

/// A warning when a disk read as raw starts like a qcow2 image: its bytes are backed up as
/// they are (a guest can write such a header), and a real qcow2 image must be declared to be
/// read as one and keep its changed-block tracking.
fn qcow2_lookalike(disk: &cairn_format::Name, path: &PathBuf) -> Option<Evidence> {
    let mut magic = [0u8; 4];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic));
    if read.is_err() || !cairn_nbd::qcow2::looks_like_qcow2(&magic) {
        return None;
    }
    Some(Evidence::new(
        "disk_format",
        Some(disk),
        format!(
            "disk {disk} ({}) starts with a qcow2 header but is read as raw, its bytes as they \
             are: a guest can write such a header into a raw disk. If it is a qcow2 image, \
             declare its format as qcow2 to read the guest's disk and keep its changed-block \
             tracking",
            path.display()
        ),
    ))
}
