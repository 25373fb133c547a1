//! Files and folders of a volume written under a host folder, never following a link there.
//!
//! Each file is created relative to its parent folder's descriptor, with `O_EXCL` and
//! `O_NOFOLLOW`, from one checked name: nothing that exists is overwritten, no guest symlink
//! (recreated as a symlink) and no link someone else plants meanwhile is followed, and no
//! name leaves the folder. Folders are made private (0700) while they are filled and get
//! their own mode, owner and times last, so a read-only guest folder can still be filled.
//! Device nodes, pipes and sockets are listed as skipped, never created: a guest could name
//! a host device in one.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps};

use crate::Error;
use crate::text::escape;
use crate::volume::{Entry, Kind, Volume, too_many};

/// How files are extracted.
#[derive(Clone, Debug)]
pub struct ExtractOptions {
    /// Give files the guest's owner and group (what root wants; others cannot).
    pub same_owner: bool,
    /// Keep set-user-ID and set-group-ID bits (dropped by default: a guest's set-user-ID
    /// root program must not become one on the host by being restored).
    pub keep_setid: bool,
    /// Entries extracted at most: a crafted file system can reach one folder many times.
    pub max_entries: u64,
    /// Bytes of data written at most: a crafted file system can map one block into a file
    /// many times and fill the host. A volume's own size is a sound bound.
    pub max_bytes: u64,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            same_owner: false,
            keep_setid: false,
            max_entries: 50_000_000,
            max_bytes: u64::MAX,
        }
    }
}

/// Something not extracted, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// Its guest path (escaped for display).
    pub path: String,
    /// Why.
    pub why: String,
}

/// What an extraction wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtractReport {
    /// Regular files written.
    pub files: u64,
    /// Folders made.
    pub dirs: u64,
    /// Symlinks made.
    pub symlinks: u64,
    /// Bytes of the files (their sizes).
    pub bytes: u64,
    /// Bytes actually written (holes and zero runs are left unallocated).
    pub written: u64,
    /// Files whose set-user-ID or set-group-ID bit was dropped.
    pub setid_dropped: u64,
    /// What was not extracted.
    pub skipped: Vec<Skipped>,
}

/// Folders nested deeper than this are refused (each open folder holds a descriptor).
const MAX_DEPTH: usize = 400;

/// Bytes read from the volume at once.
const READ_BYTES: usize = 1 << 20;

/// Runs of zeros at least this long, aligned, are left as holes.
const HOLE: usize = 4096;

/// A folder being filled: its descriptor, its entry (applied when it is done; None for the
/// destination itself), and the entries still to extract into it.
struct Frame {
    fd: OwnedFd,
    host: PathBuf,
    entry: Option<Entry>,
    children: std::vec::IntoIter<Entry>,
    /// The name extracted last: the children come sorted, so a name that comes twice (a
    /// damaged folder) comes right after itself.
    last: Vec<u8>,
}

impl Volume {
    /// Extracts `path` (a file, a symlink, or a folder and all it holds) into the host folder
    /// `to`, made (private) if it does not exist: `/etc/hosts` becomes `to/hosts`, `/etc`
    /// becomes `to/etc/...`, and `/` fills `to` itself. Stops at the first error; what was
    /// extracted until then stays, but for the file being written then, which is removed.
    ///
    /// `to` is reached without following a symbolic link in any of its components (an
    /// earlier extraction may have recreated a guest's link there), and an existing `to` that
    /// other users may write into is refused: they could swap what is being extracted.
    pub fn extract(
        &self,
        path: &[u8],
        to: &Path,
        options: &ExtractOptions,
    ) -> Result<ExtractReport, Error> {
        let path = normalize(path)?;
        let top = self.entry(&path)?;
        let dest = open_destination(to)?;
        let mut report = ExtractReport::default();
        let mut stack = Vec::new();
        if path == b"/" {
            let children = self.children(b"/")?.into_iter();
            let host = to.to_path_buf();
            stack.push(Frame { fd: dest, host, entry: None, children, last: vec![] });
        } else {
            let name = path.rsplit(|b| *b == b'/').next().unwrap_or_default().to_vec();
            let host = to.join(OsStr::from_bytes(&name));
            match self.place(&dest, &host, &name, top, options, &mut report)? {
                Some(frame) => stack.push(frame),
                None => return Ok(report),
            }
        }
        let mut count = 1u64;
        while let Some(frame) = stack.last_mut() {
            let Some(child) = frame.children.next() else {
                let done = stack.pop().expect("a frame");
                if let Some(entry) = &done.entry {
                    finish(&done.fd, &done.host, entry, options, &mut report)?;
                }
                continue;
            };
            count += 1;
            if count > options.max_entries {
                return Err(too_many(options.max_entries));
            }
            let name = child.path.rsplit(|b| *b == b'/').next().unwrap_or_default().to_vec();
            if name == frame.last {
                report.skipped.push(Skipped {
                    path: child.display_path(),
                    why: "a second entry of the same name in its folder (the file system is \
                          damaged): the first was extracted"
                        .into(),
                });
                continue;
            }
            frame.last.clone_from(&name);
            let host = frame.host.join(OsStr::from_bytes(&name));
            let placed = self.place(&frame.fd, &host, &name, child, options, &mut report)?;
            if let Some(next) = placed {
                if stack.len() >= MAX_DEPTH {
                    return Err(Error::TooMany(format!(
                        "{}: folders nested more than {MAX_DEPTH} deep",
                        escape(&next.entry.as_ref().expect("a folder").path)
                    )));
                }
                stack.push(next);
            }
        }
        Ok(report)
    }

    /// Creates `entry` as `name` in the folder `parent`; a folder comes back as a frame to fill.
    fn place(
        &self,
        parent: &OwnedFd,
        host: &Path,
        name: &[u8],
        entry: Entry,
        options: &ExtractOptions,
        report: &mut ExtractReport,
    ) -> Result<Option<Frame>, Error> {
        if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
            return Err(Error::Damaged {
                path: entry.display_path(),
                detail: "its name cannot be a file name".into(),
            });
        }
        let name = OsStr::from_bytes(name);
        let created = |e: rustix::io::Errno| match e {
            rustix::io::Errno::EXIST => Error::Exists(host.to_path_buf()),
            e => Error::host(host, e.into()),
        };
        match entry.kind {
            Kind::Dir => {
                rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700)).map_err(created)?;
                let fd = rustix::fs::openat(
                    parent,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| Error::host(host, e.into()))?;
                report.dirs += 1;
                let children = self.children(&entry.path)?.into_iter();
                let host = host.to_path_buf();
                Ok(Some(Frame { fd, host, entry: Some(entry), children, last: vec![] }))
            }
            Kind::File => {
                let fd = rustix::fs::openat(
                    parent,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(created)?;
                let file = File::from(fd);
                let budget = options.max_bytes.saturating_sub(report.written);
                let copied = self.copy_file(&entry, &file, host, budget).and_then(|written| {
                    report.written += written;
                    finish(&file.into(), host, &entry, options, report)
                });
                if let Err(e) = copied {
                    // No partial file stays behind, looking whole (a full disk, damage).
                    let _ = rustix::fs::unlinkat(parent, name, AtFlags::empty());
                    return Err(e);
                }
                report.files += 1;
                report.bytes += entry.size;
                Ok(None)
            }
            Kind::Symlink => {
                let target = entry.target.as_deref().unwrap_or_default();
                rustix::fs::symlinkat(OsStr::from_bytes(target), parent, name).map_err(created)?;
                let nofollow = AtFlags::SYMLINK_NOFOLLOW;
                if options.same_owner {
                    rustix::fs::chownat(parent, name, uid(entry.uid), gid(entry.gid), nofollow)
                        .map_err(|e| Error::host(host, e.into()))?;
                }
                rustix::fs::utimensat(parent, name, &times(&entry), nofollow)
                    .map_err(|e| Error::host(host, e.into()))?;
                report.symlinks += 1;
                Ok(None)
            }
            other => {
                report.skipped.push(Skipped {
                    path: entry.display_path(),
                    why: format!(
                        "a {}: not created (only files, folders and symlinks are extracted)",
                        other.name()
                    ),
                });
                Ok(None)
            }
        }
    }

    /// Copies the file's bytes, leaving aligned zero runs as holes; returns the bytes written,
    /// at most `budget`.
    fn copy_file(&self, entry: &Entry, out: &File, host: &Path, budget: u64) -> Result<u64, Error> {
        self.with_file(&entry.path, |file| {
            let mut buf = vec![0u8; READ_BYTES];
            let (mut at, mut written) = (0u64, 0u64);
            loop {
                let n = file
                    .read_bytes(&mut buf)
                    .map_err(|e| crate::volume::fs_error(&entry.display_path(), e))?;
                if n == 0 {
                    break;
                }
                let mut offset = 0;
                for piece in buf[..n].chunks(HOLE) {
                    if piece.iter().any(|b| *b != 0) {
                        if written + piece.len() as u64 > budget {
                            return Err(Error::TooMany(format!(
                                "{}: extracting it would write more data than the volume \
                                 holds; the file system may be crafted (one block mapped many \
                                 times)",
                                entry.display_path()
                            )));
                        }
                        out.write_all_at(piece, at + offset as u64)
                            .map_err(|e| Error::host(host, e))?;
                        written += piece.len() as u64;
                    }
                    offset += piece.len();
                }
                at += n as u64;
            }
            if at != entry.size {
                return Err(Error::Damaged {
                    path: entry.display_path(),
                    detail: format!("{at} bytes read of its {} bytes", entry.size),
                });
            }
            out.set_len(entry.size).map_err(|e| Error::host(host, e))?;
            Ok(written)
        })
    }
}

/// Gives a made file or folder its owner, mode and times (in that order: a change of owner
/// clears set-ID bits).
fn finish(
    fd: &OwnedFd,
    host: &Path,
    entry: &Entry,
    options: &ExtractOptions,
    report: &mut ExtractReport,
) -> Result<(), Error> {
    let fail = |e: rustix::io::Errno| Error::host(host, e.into());
    if options.same_owner {
        rustix::fs::fchown(fd.as_fd(), uid(entry.uid), gid(entry.gid)).map_err(fail)?;
    }
    let mut mode = u32::from(entry.mode);
    if !options.keep_setid && mode & 0o6000 != 0 && entry.kind == Kind::File {
        mode &= !0o6000;
        report.setid_dropped += 1;
    }
    rustix::fs::fchmod(fd.as_fd(), Mode::from_raw_mode(mode)).map_err(fail)?;
    rustix::fs::futimens(fd.as_fd(), &times(entry)).map_err(fail)?;
    Ok(())
}

fn times(entry: &Entry) -> Timestamps {
    let at = |(s, ns): (i64, u32)| Timespec { tv_sec: s, tv_nsec: i64::from(ns.min(999_999_999)) };
    Timestamps { last_access: at(entry.accessed), last_modification: at(entry.modified) }
}

/// Who owns what the guest's id `u32::MAX` owns: that id means "leave unchanged" to the
/// host's chown, which would leave the file root's.
const NOBODY: u32 = 65534;

fn uid(raw: u32) -> Option<rustix::fs::Uid> {
    Some(rustix::fs::Uid::from_raw(if raw == u32::MAX { NOBODY } else { raw }))
}

fn gid(raw: u32) -> Option<rustix::fs::Gid> {
    Some(rustix::fs::Gid::from_raw(if raw == u32::MAX { NOBODY } else { raw }))
}

/// Opens (making what is missing, private) the destination folder `to`, one component at a
/// time, never following a symbolic link; an existing folder that group or others may write
/// into is refused.
fn open_destination(to: &Path) -> Result<OwnedFd, Error> {
    use std::path::Component;
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let start = if to.is_absolute() { Path::new("/") } else { Path::new(".") };
    let mut fd = rustix::fs::openat(rustix::fs::CWD, start, dir_flags, Mode::empty())
        .map_err(|e| Error::host(start, e.into()))?;
    let mut made = false;
    let mut reached = PathBuf::from(start);
    for component in to.components() {
        let name: &OsStr = match component {
            Component::RootDir | Component::CurDir => continue,
            Component::ParentDir => OsStr::new(".."),
            Component::Normal(n) => n,
            Component::Prefix(_) => {
                return Err(Error::host(to, std::io::Error::other("not a Unix path")));
            }
        };
        reached.push(name);
        match rustix::fs::mkdirat(&fd, name, Mode::from_raw_mode(0o700)) {
            Ok(()) => made = true,
            Err(rustix::io::Errno::EXIST) => made = false,
            Err(e) => return Err(Error::host(&reached, e.into())),
        }
        fd = rustix::fs::openat(&fd, name, dir_flags, Mode::empty()).map_err(|e| match e {
            rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => Error::host(
                &reached,
                std::io::Error::other(
                    "it is a symbolic link or not a folder; extraction never follows a link \
                     on its way to --to (a guest's link may have been restored there): give \
                     the real path of a folder",
                ),
            ),
            e => Error::host(&reached, e.into()),
        })?;
    }
    if !made {
        let stat = rustix::fs::fstat(&fd).map_err(|e| Error::host(to, e.into()))?;
        if stat.st_mode & 0o022 != 0 {
            return Err(Error::host(
                to,
                std::io::Error::other(format!(
                    "it is a folder others may write into (mode {:o}): they could swap what \
                     is extracted; give a private folder, or a new one (it is made 0700)",
                    stat.st_mode & 0o7777
                )),
            ));
        }
    }
    Ok(fd)
}

/// `path` without trailing slashes; `.` and `..` components are refused (the last one would
/// name nothing to extract).
fn normalize(path: &[u8]) -> Result<Vec<u8>, Error> {
    let mut p = path.to_vec();
    while p.len() > 1 && p.last() == Some(&b'/') {
        p.pop();
    }
    if p.split(|b| *b == b'/').any(|c| c == b"." || c == b"..") {
        return Err(Error::BadPath(format!(
            "{}: give the path without . or .. components",
            escape(path)
        )));
    }
    Ok(p)
}
