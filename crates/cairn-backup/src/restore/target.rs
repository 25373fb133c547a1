//! Restore targets: what a restore may open, and how a restored file is published.
//!
//! The agent runs as root, and a restore target may sit in a folder others can write to.
//! Nothing here follows a link or truncates a file that was already there: each restore's
//! partial file has a name of its own (`TARGET.cairn-partial-PID-RANDOM`, so two restores to
//! one target never share one), created with `O_CREAT|O_EXCL|O_NOFOLLOW`; data goes only
//! through the descriptor that create returned, and the finished file is renamed over the
//! target (a rename replaces a name, it does not write through it). Partial files of restores
//! whose process is gone are unlinked, which never touches what a link points to. A target
//! that is itself a symbolic link is accepted only when it leads to a block device and lies in
//! a folder only root (or the agent's user) may change, so `/dev/disk/by-id/...` names keep
//! working and a link planted in a shared folder does not.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::Error;

/// Mode of a restored disk image: it holds a whole VM disk.
pub(crate) const IMAGE_MODE: u32 = 0o600;

/// What a restore writes to.
#[derive(Debug)]
pub(crate) enum Kind {
    /// A block device, written in place.
    Device,
    /// A new file at `partial`, renamed over the target when complete.
    File {
        /// The partial file.
        partial: PathBuf,
    },
    /// An existing file of the disk's size, written in place.
    InPlace,
}

impl Kind {
    pub(crate) fn is_device(&self) -> bool {
        matches!(self, Kind::Device)
    }
}

/// Opens the target of a disk of `size` bytes; `force` allows overwriting a non-empty file or
/// a device. A new file is made `size` bytes long (sparse) unless `empty`, for an image
/// format that grows as it is written.
pub(crate) fn open(
    target: &Path,
    size: u64,
    force: bool,
    empty: bool,
) -> Result<(File, Kind), Error> {
    let io_err = |source| Error::Target { path: target.to_owned(), source };
    let refuse = |why: String| io_err(io::Error::other(why));
    let meta = match std::fs::symlink_metadata(target) {
        Ok(meta) => Some(meta),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(e)),
    };
    match meta {
        Some(m) if m.file_type().is_symlink() => {
            open_device(target, &device_behind_link(target)?, size, force)
        }
        Some(m) if m.file_type().is_block_device() => open_device(target, target, size, force),
        Some(m) if m.is_dir() => Err(refuse("it is a folder; give a file path".into())),
        Some(m) if !m.is_file() => {
            Err(refuse("it is neither a regular file nor a block device".into()))
        }
        Some(m) if m.len() > 0 && !force => Err(Error::TargetExists { path: target.to_owned() }),
        Some(_) | None => {
            remove_stale_partials(target);
            let partial = partial_path(target);
            let file = create_partial(&partial, if empty { 0 } else { size })
                .map_err(|source| Error::Target { path: partial.clone(), source })?;
            Ok((file, Kind::File { partial }))
        }
    }
}

/// Opens block device `device` (the target, or where its link leads) for writing.
fn open_device(
    target: &Path,
    device: &Path,
    size: u64,
    force: bool,
) -> Result<(File, Kind), Error> {
    let io_err = |source| Error::Target { path: target.to_owned(), source };
    if !force {
        return Err(Error::TargetExists { path: target.to_owned() });
    }
    // O_EXCL on a block device: the kernel refuses it while the device is mounted, or held
    // by anything else that opened it so (a RAID, a device mapper, another restore).
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::EXCL).bits() as i32)
        .open(device)
        .map_err(|e| {
            if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) {
                io_err(io::Error::other(format!(
                    "the device is in use (mounted, or held by a RAID, a device mapper or \
                     another restore): unmount or release {} first",
                    device.display()
                )))
            } else {
                io_err(e)
            }
        })?;
    // What was opened is what was checked: a device, whatever happened to the name meanwhile.
    let opened = file.metadata().map_err(io_err)?;
    if !opened.file_type().is_block_device() {
        return Err(io_err(io::Error::other("it stopped being a block device while opened")));
    }
    let dev_size = device_size(&file).map_err(io_err)?;
    if dev_size < size {
        return Err(io_err(io::Error::other(format!(
            "the device holds {dev_size} bytes, the disk needs {size}"
        ))));
    }
    Ok((file, Kind::Device))
}

/// The block device a symbolic link `target` leads to, if it lies in a folder only root may
/// change and leads to a block device; an error saying why not otherwise.
fn device_behind_link(target: &Path) -> Result<PathBuf, Error> {
    let refuse =
        |why: String| Error::Target { path: target.to_owned(), source: io::Error::other(why) };
    cairn_snapshot::trusted::check_folders(target).map_err(|e| {
        refuse(format!("it is a symbolic link in a folder others may change ({e})"))
    })?;
    let resolved = std::fs::canonicalize(target).map_err(|e| {
        refuse(format!("it is a symbolic link that leads nowhere ({e}); give a real path"))
    })?;
    let leads_to_device =
        std::fs::metadata(&resolved).is_ok_and(|m| m.file_type().is_block_device());
    if !leads_to_device {
        return Err(refuse(format!(
            "it is a symbolic link to {}, not to a block device; a restore never writes \
             through a link to a file: give the real path",
            resolved.display()
        )));
    }
    Ok(resolved)
}

/// Opens the target of an in-place restore of a disk of `size` bytes: the existing file the
/// disk came from (exactly `size` bytes) or a block device at least that large, for reading
/// and writing, refused while anything else holds it open for writing.
pub(crate) fn open_in_place(target: &Path, size: u64) -> Result<(File, Kind), Error> {
    let io_err = |source| Error::Target { path: target.to_owned(), source };
    let refuse = |why: String| io_err(io::Error::other(why));
    let meta = std::fs::symlink_metadata(target).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            refuse(
                "it does not exist; an in-place restore goes over the disk the point came \
                 from: restore without --in-place to make a new one"
                    .into(),
            )
        } else {
            io_err(e)
        }
    })?;
    let (file, kind) = if meta.file_type().is_symlink() {
        open_device(target, &device_behind_link(target)?, size, true)?
    } else if meta.file_type().is_block_device() {
        open_device(target, target, size, true)?
    } else if meta.is_file() {
        let file =
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(
                    (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC).bits() as i32
                )
                .open(target)
                .map_err(io_err)?;
        (file, Kind::InPlace)
    } else {
        return Err(refuse("it is neither a regular file nor a block device".into()));
    };
    // What was opened, not what the name says now.
    let opened = file.metadata().map_err(io_err)?;
    if opened.is_file() && opened.len() != size {
        return Err(refuse(format!(
            "it holds {} bytes and the disk {size}: an in-place restore goes over the disk the \
             point came from, which has the disk's size",
            opened.len()
        )));
    }
    super::in_place::refuse_if_written(target, &opened).map_err(io_err)?;
    Ok((file, kind))
}

/// What every partial file of `target` is named after: `TARGET.cairn-partial`.
fn partial_stem(target: &Path) -> std::ffi::OsString {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(".cairn-partial");
    name
}

/// `TARGET.cairn-partial-PID-RANDOM`, beside the target: this restore's own.
fn partial_path(target: &Path) -> PathBuf {
    let mut name = partial_stem(target);
    name.push(format!("-{}-{:08x}", std::process::id(), rand::random::<u32>()));
    target.with_file_name(name)
}

/// Unlinks the partial files of `target` whose restore's process is gone (and one of the
/// name earlier versions used), never opening them: unlinking a link leaves what it points to
/// alone.
fn remove_stale_partials(target: &Path) {
    let stem = partial_stem(target);
    let stem = stem.to_string_lossy();
    let folder = folder_of(target);
    let Ok(entries) = std::fs::read_dir(folder) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(stem.as_ref()) else { continue };
        let owner = rest.strip_prefix('-').and_then(|r| r.split('-').next()?.parse::<u32>().ok());
        let stale = match owner {
            Some(pid) => pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists(),
            None => rest.is_empty(),
        };
        if stale && std::fs::remove_file(entry.path()).is_ok() {
            tracing::info!(path = %entry.path().display(), "removed a partial restore left behind");
        }
    }
}

/// Creates this restore's partial file, private, `size` bytes long and sparse.
fn create_partial(partial: &Path, size: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(IMAGE_MODE)
        .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC).bits() as i32)
        .open(partial)?;
    // Exactly 0600 whatever the umask (which can only have narrowed it).
    file.set_permissions(std::fs::Permissions::from_mode(IMAGE_MODE))?;
    file.set_len(size)?;
    Ok(file)
}

/// A restore's partial file: removed when dropped, unless published.
pub(crate) struct PartialFile(Option<PathBuf>);

impl PartialFile {
    pub(crate) fn new(path: PathBuf) -> Self {
        PartialFile(Some(path))
    }

    /// Renames the complete partial file over the target and syncs the folder, so that the
    /// new name survives a power cut.
    pub(crate) fn publish(mut self, target: &Path) -> io::Result<()> {
        match self.0.take() {
            Some(partial) => publish(&partial, target),
            None => Ok(()),
        }
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if let Some(partial) = self.0.take() {
            let _ = std::fs::remove_file(partial);
        }
    }
}

fn publish(partial: &Path, target: &Path) -> io::Result<()> {
    std::fs::rename(partial, target)?;
    let folder = folder_of(target);
    File::open(folder).and_then(|f| f.sync_all()).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "the restored disk is complete and in place, but its folder could not be synced \
                 ({e}): run `sync` before relying on it after a power cut"
            ),
        )
    })
}

/// The folder a target lies in (`.` for a bare file name).
fn folder_of(target: &Path) -> &Path {
    match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A block device's size: where a seek to its end lands.
fn device_size(file: &File) -> io::Result<u64> {
    use std::io::Seek;
    let mut f = file;
    f.seek(io::SeekFrom::End(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn links_planted_at_partial_names_are_removed_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let target = dir.path().join("disk.raw");
        // At the name earlier versions used, and at one of a restore that is gone.
        let old = dir.path().join("disk.raw.cairn-partial");
        let dead = dir.path().join("disk.raw.cairn-partial-999999999-0badc0de");
        std::os::unix::fs::symlink(&victim, &old).unwrap();
        std::os::unix::fs::symlink(&victim, &dead).unwrap();
        let (file, kind) = open(&target, 4096, false, false).unwrap();
        drop(file);
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(std::fs::symlink_metadata(&old).is_err());
        assert!(std::fs::symlink_metadata(&dead).is_err());
        let Kind::File { partial } = kind else { panic!("{kind:?}") };
        let meta = std::fs::symlink_metadata(&partial).unwrap();
        assert!(meta.is_file() && meta.len() == 4096);
        assert_eq!(meta.mode() & 0o777, 0o600);
        // A second restore to the same target gets a partial file of its own.
        let (_, second) = open(&target, 4096, false, false).unwrap();
        let Kind::File { partial: other } = second else { panic!("{second:?}") };
        assert_ne!(partial, other);
        assert!(partial.exists(), "a live restore's partial file is left alone");
    }

    #[test]
    fn a_target_that_links_to_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"").unwrap();
        let target = dir.path().join("disk.raw");
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        let err = open(&target, 4096, true, false).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        // A link to a block device in a folder others may write to is refused too.
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let planted = shared.join("disk.raw");
        std::os::unix::fs::symlink("/dev/null", &planted).unwrap();
        let err = open(&planted, 4096, true, false).unwrap_err().to_string();
        assert!(err.contains("others may change"), "{err}");
        let dangling = dir.path().join("dangling.raw");
        std::os::unix::fs::symlink(dir.path().join("nothing"), &dangling).unwrap();
        let err = open(&dangling, 4096, true, false).unwrap_err().to_string();
        assert!(err.contains("leads nowhere"), "{err}");
        assert!(!dir.path().join("nothing").exists());
    }
}
