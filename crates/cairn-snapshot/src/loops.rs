//! Loop devices, from sysfs: which image file backs a device, and which devices an image
//! backs. The freezer uses it to tell which disks a freeze holds still; the stopped-VM check
//! to tell whether a disk is still in use.

use std::path::{Path, PathBuf};

/// The image file behind a loop device given as its source (`/dev/loop3`).
pub(crate) fn backing_file(source: &str) -> Option<PathBuf> {
    let name = source.strip_prefix("/dev/")?;
    if !name.starts_with("loop") {
        return None;
    }
    let file = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(file.trim()))
}

/// Every loop device (`/dev/loopN`) whose backing file is `image` (canonical).
pub(crate) fn devices_backed_by(image: &Path) -> Vec<String> {
    let Ok(devices) = std::fs::read_dir("/sys/block") else { return Vec::new() };
    devices
        .flatten()
        .filter_map(|dev| {
            let name = dev.file_name().to_string_lossy().into_owned();
            let file = std::fs::read_to_string(dev.path().join("loop/backing_file")).ok()?;
            (Path::new(file.trim()) == image).then(|| format!("/dev/{name}"))
        })
        .collect()
}
