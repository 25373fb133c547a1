//! Linux file-system freeze: FIFREEZE on each configured mount point, FITHAW after, under a
//! watchdog that thaws even if the agent dies.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::watchdog::{Watchdog, WatchdogCommand};
use crate::{Error, sys};

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

/// Mount points checked and opened, ready to freeze.
pub struct Freezer {
    mounts: Vec<(PathBuf, File)>,
    deadline: Duration,
    watchdog: WatchdogCommand,
}

impl Freezer {
    /// Checks `mounts`: each must be a mount point, not `/`, and not hold anything in
    /// `protected`.
    pub fn new(
        mounts: &[PathBuf],
        deadline: Duration,
        watchdog: WatchdogCommand,
        protected: &[Protected],
    ) -> Result<Freezer, Error> {
        let table = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| Error::io("reading /proc/self/mountinfo", e))?;
        let mount_points: Vec<PathBuf> = table.lines().filter_map(mount_point).collect();
        let mut opened = Vec::new();
        for mount in mounts {
            let canonical = mount
                .canonicalize()
                .map_err(|e| Error::io(format!("freeze mount point {}", mount.display()), e))?;
            if canonical == Path::new("/") {
                return Err(Error::FreezeRefused {
                    mount: canonical,
                    what: "the root file system, which the agent and the system need".into(),
                    path: "/".into(),
                });
            }
            if !mount_points.contains(&canonical) {
                return Err(Error::NotAMountPoint { path: mount.clone() });
            }
            let dev = device_of(&canonical)?;
            for p in protected {
                if nearest_existing(&p.path).and_then(|q| device_of(&q).ok()) == Some(dev) {
                    return Err(Error::FreezeRefused {
                        mount: canonical,
                        what: p.what.clone(),
                        path: p.path.clone(),
                    });
                }
            }
            if opened.iter().any(|(m, _): &(PathBuf, File)| device_of(m).ok() == Some(dev)) {
                return Err(Error::config(
                    "<vm config>",
                    "freeze.mounts",
                    format!(
                        "{} is listed twice (or is the same file system as another entry)",
                        mount.display()
                    ),
                ));
            }
            let dir = File::open(&canonical)
                .map_err(|e| Error::io(format!("opening {}", canonical.display()), e))?;
            opened.push((canonical, dir));
        }
        Ok(Freezer { mounts: opened, deadline, watchdog })
    }

    /// The mount points.
    pub fn mounts(&self) -> impl Iterator<Item = &Path> {
        self.mounts.iter().map(|(p, _)| p.as_path())
    }

    /// Arms the watchdog and freezes every mount point, in order. If one fails, those already
    /// frozen are thawed before the error returns.
    pub fn freeze(self: &Arc<Self>) -> Result<Frozen, Error> {
        // Write back what is dirty while applications still run: FIFREEZE then only has to
        // flush what was written since, and the stall it causes stays short.
        for (path, dir) in &self.mounts {
            if let Err(e) = rustix::fs::syncfs(dir) {
                tracing::warn!(mount = %path.display(), "syncfs before the freeze failed: {e}");
            }
        }
        let paths: Vec<PathBuf> = self.mounts.iter().map(|(p, _)| p.clone()).collect();
        let watchdog = Watchdog::arm(&self.watchdog, self.deadline, &paths)?;
        let started = Instant::now();
        let mut frozen = Frozen {
            freezer: Arc::clone(self),
            count: 0,
            started,
            frozen: started,
            watchdog: Some(watchdog),
        };
        for (path, dir) in &self.mounts {
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

impl Frozen {
    /// Thaws every frozen mount point (all are tried even if one fails) and disarms the
    /// watchdog. Returns how long the file systems were frozen and how long of that the
    /// freeze calls themselves took.
    pub fn thaw(mut self) -> Result<(Duration, Duration), Error> {
        let calls = self.frozen.duration_since(self.started);
        self.thaw_all().map(|total| (total, calls))
    }

    fn thaw_all(&mut self) -> Result<Duration, Error> {
        let mut first = Ok(());
        for (path, dir) in self.freezer.mounts[..self.count].iter().rev() {
            if let Err(source) = sys::thaw(dir) {
                tracing::error!(mount = %path.display(), "thaw failed: {source}");
                if first.is_ok() {
                    first = Err(Error::Freeze { action: "thaw", mount: path.clone(), source });
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
        first.map(|()| duration)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if self.count > 0 || self.watchdog.is_some() {
            let _ = self.thaw_all();
        }
    }
}

/// The mount point (fifth field, octal escapes undone) of a `/proc/self/mountinfo` line.
fn mount_point(line: &str) -> Option<PathBuf> {
    let field = line.split(' ').nth(4)?;
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
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
    Some(PathBuf::from(std::ffi::OsString::from_vec(out)))
}

fn device_of(path: &Path) -> Result<u64, Error> {
    std::fs::metadata(path)
        .map(|m| m.dev())
        .map_err(|e| Error::io(format!("stat {}", path.display()), e))
}

/// `path`, or its closest ancestor that exists (a vault folder not yet created lies on the
/// file system of its parent).
fn nearest_existing(path: &Path) -> Option<PathBuf> {
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
    fn mountinfo_fields_are_unescaped() {
        let line = "36 35 98:0 / /mnt/my\\040disk rw,noatime master:1 - ext4 /dev/loop1 rw";
        assert_eq!(mount_point(line), Some(PathBuf::from("/mnt/my disk")));
        assert_eq!(mount_point("short line"), None);
        // A trailing backslash with no digits is kept as it is.
        assert_eq!(mount_point("1 2 3 / /a\\ x"), Some(PathBuf::from("/a\\")));
    }
}
