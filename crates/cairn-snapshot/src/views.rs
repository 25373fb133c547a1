//! View providers for disks kept as image files: reflink clones (XFS, btrfs), btrfs
//! read-only snapshots, and the live disk.
//!
//! LVM and device-mapper snapshots would be further [`ViewProvider`]s; the kernels these
//! tests run on have neither, so they are not written yet.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::capture::{DiskSpec, View, ViewProvider};
use crate::{Error, loops, sys};

const XFS_MAGIC: u64 = 0x5846_5342;
const BTRFS_MAGIC: u64 = 0x9123_683e;
const EXT4_MAGIC: u64 = 0xef53;
const TMPFS_MAGIC: u64 = 0x0102_1994;
/// The inode number of every btrfs subvolume's root directory.
const BTRFS_SUBVOL_ROOT_INO: u64 = 256;

/// The file-system type of `path`, for messages.
fn fs_name(path: &Path) -> String {
    match rustix::fs::statfs(path) {
        Ok(s) => match s.f_type as u64 {
            XFS_MAGIC => "xfs".into(),
            BTRFS_MAGIC => "btrfs".into(),
            EXT4_MAGIC => "ext4".into(),
            TMPFS_MAGIC => "tmpfs".into(),
            other => format!("file system type {other:#x}"),
        },
        Err(_) => "an unknown file system".into(),
    }
}

/// Checks, without taking anything, that `kind` can view `disk`: the image exists and lies on
/// a file system that supports the view. Returns a description for people.
pub fn preflight(kind: crate::ViewKind, disk: &DiskSpec) -> Result<String, Error> {
    let no = |reason| no_snapshot(disk, reason);
    let meta = stat_disk(disk)?;
    let dir = disk.path.parent().unwrap_or(Path::new("/"));
    let fs = fs_name(dir);
    match kind {
        crate::ViewKind::Reflink if !meta.is_file() => {
            Err(no("a reflink clone needs an image file, and this is not a regular file".into()))
        }
        crate::ViewKind::Reflink if fs != "xfs" && fs != "btrfs" => {
            Err(no(format!("{} is on {fs}, which cannot make reflink clones", dir.display())))
        }
        crate::ViewKind::BtrfsSnapshot if fs != "btrfs" => {
            Err(no(format!("{} is on {fs}, not btrfs", dir.display())))
        }
        _ => Ok(format!("{} on {fs}", disk.path.display())),
    }
}

/// Refuses a disk of a VM declared stopped that something still has open for writing: a
/// process (the VM itself, most likely) or a loop device. Reading it would be a torn read,
/// not the crash-consistent point a stopped VM promises. Processes of other users are seen
/// only when the agent runs as root.
pub fn check_not_in_use(disk: &DiskSpec) -> Result<(), Error> {
    let target = disk
        .path
        .canonicalize()
        .map_err(|e| Error::io(format!("disk {}: {}", disk.name, disk.path.display()), e))?;
    let in_use = |holder: String| Error::DiskInUse { path: disk.path.clone(), holder };
    if let Some(device) = loops::devices_backed_by(&target).first() {
        return Err(in_use(format!("the loop device {device}")));
    }
    let Ok(processes) = std::fs::read_dir("/proc") else { return Ok(()) };
    for process in processes.flatten() {
        let Some(pid) = process.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(process.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).ok().as_deref() != Some(target.as_path()) {
                continue;
            }
            let info = process.path().join("fdinfo").join(fd.file_name());
            let flags = std::fs::read_to_string(info).ok().and_then(|text| {
                let line = text.lines().find(|l| l.starts_with("flags:"))?;
                u32::from_str_radix(line.trim_start_matches("flags:").trim(), 8).ok()
            });
            // O_WRONLY = 1, O_RDWR = 2.
            if flags.is_some_and(|f| f & 3 != 0) {
                let command =
                    std::fs::read_to_string(process.path().join("comm")).unwrap_or_default();
                return Err(in_use(format!("process {pid} ({})", command.trim())));
            }
        }
    }
    Ok(())
}

/// "No snapshot possible" for `disk`, with the reason.
fn no_snapshot(disk: &DiskSpec, reason: String) -> Error {
    Error::NoSnapshot { disk: disk.name.to_string(), path: disk.path.clone(), reason }
}

/// A failure while taking or releasing `disk`'s view.
fn view_error(disk: &DiskSpec, detail: String, source: std::io::Error) -> Error {
    Error::View { disk: disk.name.to_string(), detail, source }
}

/// The disk's image or device, which must exist.
fn stat_disk(disk: &DiskSpec) -> Result<std::fs::Metadata, Error> {
    std::fs::metadata(&disk.path).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound => " (check the path, or the disk's NAME=PATH mapping)",
            std::io::ErrorKind::PermissionDenied => " (run as a user that may read it, often root)",
            _ => "",
        };
        Error::io(format!("disk {}: {}{hint}", disk.name, disk.path.display()), e)
    })
}

/// A name for a view that is unique on this host and says who made it.
fn view_name(stem: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{stem}.cairn-view-{}-{nanos}", std::process::id())
}

/// The process id in a view name made by [`view_name`], if it is one.
fn view_owner(name: &str, stem: &str) -> Option<u32> {
    let rest = name.strip_prefix(stem)?.strip_prefix(".cairn-view-")?;
    rest.split('-').next()?.parse().ok()
}

/// True when no process with this id exists: its views were left behind by a crash. Agents
/// in different PID namespaces (containers) sharing one image folder would see each other's
/// processes as dead: give them separate folders.
fn is_dead(pid: u32) -> bool {
    pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
}

/// Reflink clones: a copy-on-write clone of the image file next to it, sharing every block
/// until the VM writes again. Needs XFS (reflink=1) or btrfs; release deletes the clone.
pub struct ReflinkClone;

impl ViewProvider for ReflinkClone {
    fn kind(&self) -> &'static str {
        "reflink"
    }

    fn take(&self, disk: &DiskSpec) -> Result<View, Error> {
        let no = |reason| no_snapshot(disk, reason);
        let meta = stat_disk(disk)?;
        if !meta.is_file() {
            return Err(no("a reflink clone needs an image file, and this is not a regular file (device snapshots through LVM or device-mapper are not built in)".into()));
        }
        remove_stale_clones_of(&disk.path);
        let source = File::open(&disk.path)
            .map_err(|e| view_error(disk, format!("opening {}", disk.path.display()), e))?;
        clone_view(disk, &source, clone_name(&disk.path))
    }
}

/// The name a running agent gives a clone of `image`: `.<image name>.cairn-view-<pid>-<nanos>`
/// beside it (removed by a later agent once that process is gone).
pub fn clone_name(image: &Path) -> PathBuf {
    let dir = image.parent().unwrap_or(Path::new("/"));
    dir.join(view_name(&clone_stem(image)))
}

fn clone_stem(image: &Path) -> String {
    format!(".{}", image.file_name().map(|n| n.to_string_lossy()).unwrap_or_default())
}

/// Removes the clones of `image` whose agent process no longer exists.
pub fn remove_stale_clones_of(image: &Path) {
    remove_stale_clones(image.parent().unwrap_or(Path::new("/")), &clone_stem(image));
}

/// A reflink clone of `source` (the open image of `disk`) made at `clone`, a new file beside
/// the image (see [`clone_name`]), as a keepable view: release deletes it, keeping renames it
/// to `.<image name>.cairn-held-<point id>`.
pub fn clone_view(disk: &DiskSpec, source: &File, clone: PathBuf) -> Result<View, Error> {
    let no = |reason| no_snapshot(disk, reason);
    let view_err = |detail, source| view_error(disk, detail, source);
    let dir = disk.path.parent().unwrap_or(Path::new("/")).to_path_buf();
    let stem = clone_stem(&disk.path);
    if clone.parent() != Some(dir.as_path())
        || view_owner(
            &clone.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            &stem,
        ) != Some(std::process::id())
    {
        return Err(no(format!("{} is not a clone name of this agent's", clone.display())));
    }
    let target = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&clone)
        .map_err(|e| view_err(format!("creating {}", clone.display()), e))?;
    if let Err(e) = rustix::fs::ioctl_ficlone(&target, source) {
        let _ = std::fs::remove_file(&clone);
        let e = std::io::Error::from(e);
        return Err(match e.raw_os_error() {
            // EOPNOTSUPP, EXDEV, EINVAL, ENOTTY: this file system cannot clone.
            Some(95 | 18 | 22 | 25) => no(format!(
                "{} is on {}, which cannot make reflink clones ({e})",
                dir.display(),
                fs_name(&dir)
            )),
            _ => view_err(format!("cloning into {}", clone.display()), e),
        });
    }
    let path = clone.clone();
    let (from, name) = (clone.clone(), disk.name.clone());
    Ok(View::snapshot(
        disk,
        "reflink",
        clone,
        Box::new(move |_| {
            std::fs::remove_file(&path)
                .map_err(|e| Error::io(format!("removing view {}", path.display()), e))
        }),
    )
    .keepable(Box::new(move |tag| {
        crate::held::check_tag(tag)?;
        let held = dir.join(format!("{stem}{}{tag}", crate::held::HELD));
        std::fs::rename(&from, &held).map_err(|e| {
            Error::io(format!("keeping view {} as {}", from.display(), held.display()), e)
        })?;
        Ok(crate::KeptView {
            disk: name,
            kind: "reflink".into(),
            path: held.clone(),
            handle: held,
            format: None,
        })
    })))
}

/// Whether the folder `dir` is on a file system that shares blocks between files (XFS or
/// btrfs; whether this XFS was made with reflinks shows only when cloning).
pub fn shares_blocks(dir: &Path) -> bool {
    matches!(rustix::fs::statfs(dir).map(|s| s.f_type as u64), Ok(XFS_MAGIC | BTRFS_MAGIC))
}

/// How many extents the open file `file` has: what a reflink clone of it copies, one record
/// each (about 20 µs an extent on XFS: a 1 GiB image fragmented into 36,000 extents clones in
/// 0.7 s).
pub fn extent_count(file: &File) -> std::io::Result<u32> {
    sys::extent_count(file)
}

/// Removes clones named for `stem` whose agent process no longer exists.
fn remove_stale_clones(dir: &Path, stem: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if view_owner(&name, stem).is_some_and(is_dead) {
            tracing::warn!(path = %entry.path().display(), "removing a view left by an agent that died");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// btrfs read-only snapshots of the subvolume that holds the image, one per disk (each
/// disk's snapshot is one instant for that disk; several disks are snapshotted one after
/// another). The snapshot goes into `.cairn-views` at the subvolume's root; release deletes it.
pub struct BtrfsSnapshot;

impl ViewProvider for BtrfsSnapshot {
    fn kind(&self) -> &'static str {
        "btrfs-snapshot"
    }

    fn take(&self, disk: &DiskSpec) -> Result<View, Error> {
        let no = |reason| no_snapshot(disk, reason);
        let view_err = |detail, source| view_error(disk, detail, source);
        stat_disk(disk)?;
        let image =
            disk.path.canonicalize().map_err(|e| view_err("resolving its path".into(), e))?;
        let dir = image.parent().unwrap_or(Path::new("/"));
        if rustix::fs::statfs(dir).map(|s| s.f_type as u64).ok() != Some(BTRFS_MAGIC) {
            return Err(no(format!("{} is on {}, not btrfs", dir.display(), fs_name(dir))));
        }
        let subvolume = subvolume_root(dir)
            .map_err(|e| view_err(format!("finding the subvolume of {}", dir.display()), e))?;
        let relative = image.strip_prefix(&subvolume).unwrap_or(&image).to_path_buf();
        let views = subvolume.join(".cairn-views");
        match std::fs::create_dir(&views) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(view_err(format!("creating {}", views.display()), e)),
        }
        let stem = "snapshot";
        let parent =
            File::open(&views).map_err(|e| view_err(format!("opening {}", views.display()), e))?;
        if let Ok(entries) = std::fs::read_dir(&views) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if view_owner(&name, stem).is_some_and(is_dead) {
                    tracing::warn!(path = %entry.path().display(), "deleting a snapshot left by an agent that died");
                    let _ = sys::btrfs_delete(&parent, &name);
                }
            }
        }
        let name = view_name(stem);
        let source = File::open(&subvolume)
            .map_err(|e| view_err(format!("opening {}", subvolume.display()), e))?;
        sys::btrfs_snapshot(&parent, &source, &name).map_err(|e| {
            view_err(format!("snapshotting {} into {}", subvolume.display(), views.display()), e)
        })?;
        let path = views.join(&name).join(&relative);
        let (from, disk_name, views_dir) = (views.join(&name), disk.name.clone(), views.clone());
        Ok(View::snapshot(
            disk,
            "btrfs-snapshot",
            path,
            Box::new(move |_| {
                sys::btrfs_delete(&parent, &name).map_err(|e| {
                    Error::io(format!("deleting snapshot {}", views.join(&name).display()), e)
                })
            }),
        )
        .keepable(Box::new(move |tag| {
            crate::held::check_tag(tag)?;
            // One snapshot per disk, so the disk's name is in the kept name too.
            let held = views_dir.join(format!("{}{tag}-{disk_name}", &crate::held::HELD[1..]));
            std::fs::rename(&from, &held).map_err(|e| {
                Error::io(format!("keeping snapshot {} as {}", from.display(), held.display()), e)
            })?;
            Ok(crate::KeptView {
                disk: disk_name,
                kind: "btrfs-snapshot".into(),
                path: held.join(&relative),
                handle: held,
                format: None,
            })
        })))
    }
}

/// The directory at the root of the btrfs subvolume that holds `dir`.
fn subvolume_root(dir: &Path) -> std::io::Result<PathBuf> {
    let dev = std::fs::metadata(dir)?.dev();
    let mut here = dir.to_path_buf();
    loop {
        let meta = std::fs::metadata(&here)?;
        if meta.ino() == BTRFS_SUBVOL_ROOT_INO && meta.dev() == dev {
            return Ok(here);
        }
        match here.parent() {
            Some(up) if std::fs::metadata(up)?.dev() == dev => here = up.to_path_buf(),
            _ => return Ok(here),
        }
    }
}

/// No view: the disk is read as it is. Point-in-time only when nothing writes to it (a
/// stopped VM); for a running VM the point's consistency is "none".
pub struct LiveRead;

impl ViewProvider for LiveRead {
    fn kind(&self) -> &'static str {
        "live"
    }

    fn take(&self, disk: &DiskSpec) -> Result<View, Error> {
        stat_disk(disk)?;
        Ok(View::live(disk))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_names_carry_their_owner() {
        let name = view_name(".disk.img");
        assert_eq!(view_owner(&name, ".disk.img"), Some(std::process::id()));
        assert_eq!(view_owner(".disk.img", ".disk.img"), None);
        assert_eq!(view_owner(".other.cairn-view-1-2", ".disk.img"), None);
        assert!(!is_dead(std::process::id()));
    }
}
