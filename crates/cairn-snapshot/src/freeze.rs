//! Linux file-system freeze: FIFREEZE on each configured mount point, FITHAW after, under a
//! watchdog that thaws even if the agent dies.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::watchdog::{Watchdog, WatchdogCommand};
use crate::{Error, loops, sys};

/// The watchdog's default deadline: a freeze only spans taking the views (milliseconds for
/// reflink clones and btrfs snapshots), so this is a ceiling for a wedged agent, not a budget.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);
/// The longest deadline accepted: applications stall for as long as the freeze lasts.
pub const MAX_DEADLINE: Duration = Duration::from_secs(600);

/// Something the agent needs to write to while the file systems are frozen.
#[derive(Clone, Debug)]
pub struct Protected {
    /// What it is, for the error: "the vault", "temporary files", "the log file".
    pub what: String,
    /// Where it is.
    pub path: PathBuf,
}

impl Protected {
    /// `what` at `path`.
    pub fn new(what: impl Into<String>, path: impl Into<PathBuf>) -> Protected {
        Protected { what: what.into(), path: path.into() }
    }

    /// What every agent process writes to: temporary files, its working folder, and its log
    /// (standard error) when that is a file.
    pub fn of_this_process() -> Vec<Protected> {
        let mut list = vec![Protected::new("temporary files", std::env::temp_dir())];
        if let Ok(cwd) = std::env::current_dir() {
            list.push(Protected::new("the agent's working folder", cwd));
        }
        for (fd, what) in [(1, "standard output"), (2, "the log (standard error)")] {
            let link = PathBuf::from(format!("/proc/self/fd/{fd}"));
            if std::fs::metadata(&link).map(|m| m.is_file()).unwrap_or(false) {
                let target = std::fs::read_link(&link).unwrap_or(link);
                list.push(Protected::new(what, target));
            }
        }
        list
    }
}

/// A mount point checked and opened.
struct FreezeMount {
    path: PathBuf,
    dir: File,
    /// The superblock's device, `major:minor`.
    device: String,
    /// The device it is mounted from, e.g. `/dev/loop1`.
    source: String,
    /// The image file behind it, when it is a loop device.
    image: Option<PathBuf>,
}

/// Mount points checked and opened, ready to freeze.
pub struct Freezer {
    mounts: Vec<FreezeMount>,
    deadline: Duration,
    watchdog: WatchdogCommand,
}

impl Freezer {
    /// Checks `mounts`: each must be a mount point, not the root file system, and not hold
    /// anything in `protected`. File systems are compared by the device of their superblock
    /// (from `/proc/self/mountinfo`), not by `stat`'s `st_dev`: FIFREEZE freezes a whole file
    /// system, and on btrfs every subvolume has an `st_dev` of its own.
    pub fn new(
        mounts: &[PathBuf],
        deadline: Duration,
        watchdog: WatchdogCommand,
        protected: &[Protected],
    ) -> Result<Freezer, Error> {
        let table = MountTable::read()?;
        let root = table.file_system_of(Path::new("/")).map(|m| m.device.clone());
        let mut opened: Vec<FreezeMount> = Vec::new();
        for (i, mount) in mounts.iter().enumerate() {
            let canonical = mount
                .canonicalize()
                .map_err(|e| Error::io(format!("freeze.mounts[{i}] {}", mount.display()), e))?;
            let entry = table
                .mount_at(&canonical)
                .ok_or_else(|| Error::NotAMountPoint { path: mount.clone() })?;
            if canonical == Path::new("/") || Some(&entry.device) == root.as_ref() {
                return Err(Error::FreezeRefused {
                    mount: canonical,
                    what: "the root file system, which the agent and the system need".into(),
                    path: "/".into(),
                });
            }
            for p in protected {
                // A path whose file system cannot be told might be on this one: refuse.
                let holder = nearest_existing(&p.path).and_then(|q| table.file_system_of(&q));
                if holder.is_none_or(|h| h.device == entry.device) {
                    return Err(Error::FreezeRefused {
                        mount: canonical,
                        what: p.what.clone(),
                        path: p.path.clone(),
                    });
                }
            }
            if opened.iter().any(|m| m.device == entry.device) {
                return Err(Error::config(
                    "the VM configuration",
                    format!("freeze.mounts[{i}]"),
                    format!(
                        "{} is the same file system as an earlier entry; list it once",
                        mount.display()
                    ),
                ));
            }
            let dir = File::open(&canonical)
                .map_err(|e| Error::io(format!("opening {}", canonical.display()), e))?;
            let image = loops::backing_file(&entry.source);
            opened.push(FreezeMount {
                path: canonical,
                dir,
                device: entry.device.clone(),
                source: entry.source.clone(),
                image,
            });
        }
        Ok(Freezer { mounts: opened, deadline, watchdog })
    }

    /// Whether freezing holds the disk image at `image` still: a frozen file system is
    /// mounted from it through a loop device, and every loop device on that image is one of
    /// the frozen ones (an image with two partitions mounted from two loop devices is held
    /// still only if both are frozen). Images the agent cannot see behind a loop device are
    /// not held still.
    pub fn holds_image(&self, image: &Path) -> bool {
        let Ok(image) = image.canonicalize() else { return false };
        let same = |p: &Path| p.canonicalize().is_ok_and(|p| p == image);
        if !self.mounts.iter().any(|m| m.image.as_deref().is_some_and(same)) {
            return false;
        }
        let frozen: Vec<&str> = self.mounts.iter().map(|m| m.source.as_str()).collect();
        loops::devices_backed_by(&image).iter().all(|dev| frozen.contains(&dev.as_str()))
    }

    /// The mount points.
    pub fn mounts(&self) -> impl Iterator<Item = &Path> {
        self.mounts.iter().map(|m| m.path.as_path())
    }

    /// Arms the watchdog and freezes every mount point, in order. If one fails, those already
    /// frozen are thawed before the error returns.
    pub fn freeze(self: &Arc<Self>) -> Result<Frozen, Error> {
        // Write back what is dirty while applications still run: FIFREEZE then only has to
        // flush what was written since, and the stall it causes stays short.
        for FreezeMount { path, dir, .. } in &self.mounts {
            if let Err(e) = rustix::fs::syncfs(dir) {
                tracing::warn!(mount = %path.display(), "syncfs before the freeze failed: {e}");
            }
        }
        let paths: Vec<PathBuf> = self.mounts.iter().map(|m| m.path.clone()).collect();
        let watchdog = Watchdog::arm(&self.watchdog, self.deadline, &paths)?;
        let started = Instant::now();
        let mut frozen = Frozen {
            freezer: Arc::clone(self),
            count: 0,
            started,
            frozen: started,
            watchdog: Some(watchdog),
        };
        for FreezeMount { path, dir, .. } in &self.mounts {
            sys::freeze(dir).map_err(|source| Error::Freeze {
                action: "freeze",
                mount: path.clone(),
                source,
            })?;
            frozen.count += 1;
            tracing::info!(mount = %path.display(), "file system frozen");
        }
        frozen.frozen = Instant::now();
        Ok(frozen)
    }
}

/// Frozen file systems; thawed by [`Frozen::thaw`] or, on any other path, when dropped.
pub struct Frozen {
    freezer: Arc<Freezer>,
    count: usize,
    started: Instant,
    /// When the last FIFREEZE returned: the freeze calls flush what is dirty, and take most
    /// of the stall.
    frozen: Instant,
    watchdog: Option<Watchdog>,
}

/// How a freeze ended.
#[derive(Clone, Debug)]
pub struct Thawed {
    /// From the first FIFREEZE call to the last FITHAW.
    pub duration: Duration,
    /// How long of that the FIFREEZE calls took (they write back what is dirty).
    pub freeze_calls: Duration,
    /// Mount points found already thawed: the watchdog's deadline passed first, so the
    /// views may have been taken after they thawed.
    pub thawed_early: Vec<PathBuf>,
}

impl Frozen {
    /// Thaws every frozen mount point (all are tried even if one fails) and disarms the
    /// watchdog.
    pub fn thaw(mut self) -> Result<Thawed, Error> {
        let freeze_calls = self.frozen.duration_since(self.started);
        self.thaw_all().map(|(duration, thawed_early)| Thawed {
            duration,
            freeze_calls,
            thawed_early,
        })
    }

    fn thaw_all(&mut self) -> Result<(Duration, Vec<PathBuf>), Error> {
        let mut first = Ok(());
        let mut early = Vec::new();
        for FreezeMount { path, dir, .. } in self.freezer.mounts[..self.count].iter().rev() {
            match sys::thaw(dir) {
                Ok(()) => {}
                // EINVAL: not frozen any more; only the watchdog thaws behind our back.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => early.push(path.clone()),
                Err(source) => {
                    tracing::error!(mount = %path.display(), "thaw failed: {source}");
                    if first.is_ok() {
                        first = Err(Error::Freeze { action: "thaw", mount: path.clone(), source });
                    }
                }
            }
        }
        let duration = self.started.elapsed();
        if self.count > 0 {
            tracing::info!(
                mounts = self.count,
                ms = duration.as_secs_f64() * 1000.0,
                "file systems thawed"
            );
        }
        self.count = 0;
        match (&first, self.watchdog.take()) {
            // Everything is thawed: the watchdog may stand down.
            (Ok(()), Some(w)) => w.disarm(),
            // Dropping it without "thawed" makes it try the thaw once more itself.
            (Err(_), Some(w)) => drop(w),
            _ => {}
        }
        first.map(|()| (duration, early))
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if self.count > 0 || self.watchdog.is_some() {
            let _ = self.thaw_all();
        }
    }
}

/// One line of `/proc/self/mountinfo`.
struct MountEntry {
    point: PathBuf,
    device: String,
    source: String,
}

/// The mount table of this process's mount namespace.
struct MountTable(Vec<MountEntry>);

impl MountTable {
    fn read() -> Result<MountTable, Error> {
        let text = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| Error::io("reading /proc/self/mountinfo", e))?;
        Ok(MountTable(text.lines().filter_map(parse_mountinfo).collect()))
    }

    /// The mount at exactly `path` (the last one, if several are stacked there).
    fn mount_at(&self, path: &Path) -> Option<&MountEntry> {
        self.0.iter().rev().find(|m| m.point == path)
    }

    /// The mount whose file system holds `path` (the longest mount point above it).
    fn file_system_of(&self, path: &Path) -> Option<&MountEntry> {
        let path = path.canonicalize().ok()?;
        // `max_by_key` keeps the last of equal maxima: the top of mounts stacked on one
        // point, the one that is visible.
        self.0
            .iter()
            .filter(|m| path.starts_with(&m.point))
            .max_by_key(|m| m.point.components().count())
    }
}

/// A `/proc/self/mountinfo` line: mount point (fifth field, octal escapes undone), the
/// superblock's `major:minor` (third) and the source after the ` - ` separator.
fn parse_mountinfo(line: &str) -> Option<MountEntry> {
    let fields: Vec<&str> = line.split(' ').collect();
    let device = fields.get(2)?.to_string();
    let point = unescape(fields.get(4)?);
    let dash = fields.iter().position(|f| *f == "-")?;
    let source = unescape(fields.get(dash + 2)?).to_string_lossy().into_owned();
    Some(MountEntry { point, device, source })
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// `path`, or its closest ancestor that exists (a vault folder not yet created lies on the
/// file system of its parent).
fn nearest_existing(path: &Path) -> Option<PathBuf> {
    let absolute;
    let path = if path.is_absolute() {
        path
    } else {
        absolute = std::env::current_dir().ok()?.join(path);
        &absolute
    };
    let mut p = Some(path);
    while let Some(q) = p {
        if q.exists() {
            return Some(q.to_path_buf());
        }
        p = q.parent();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_visible_mount_of_a_stacked_point_holds_its_paths() {
        let entry = |point: &str, device: &str| MountEntry {
            point: point.into(),
            device: device.into(),
            source: String::new(),
        };
        // An automount point, then the real file system mounted over it.
        let table =
            MountTable(vec![entry("/", "8:1"), entry("/tmp", "0:50"), entry("/tmp", "7:3")]);
        assert_eq!(table.file_system_of(Path::new("/tmp")).unwrap().device, "7:3");
        assert_eq!(table.mount_at(Path::new("/tmp")).unwrap().device, "7:3");
        assert_eq!(table.file_system_of(Path::new("/usr")).unwrap().device, "8:1");
    }

    #[test]
    fn mountinfo_lines_are_parsed_and_unescaped() {
        let line = "36 35 98:0 / /mnt/my\\040disk rw,noatime master:1 - ext4 /dev/loop1 rw";
        let m = parse_mountinfo(line).unwrap();
        assert_eq!(m.point, PathBuf::from("/mnt/my disk"));
        assert_eq!((m.device.as_str(), m.source.as_str()), ("98:0", "/dev/loop1"));
        assert!(parse_mountinfo("short line").is_none());
        assert!(parse_mountinfo("1 2 3:4 / /a rw").is_none(), "no separator");
        // A trailing backslash with no digits is kept as it is.
        assert_eq!(unescape("/a\\"), PathBuf::from("/a\\"));
    }
}
