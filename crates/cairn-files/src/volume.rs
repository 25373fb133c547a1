//! An ext2/3/4 volume of a disk, opened read-only: entries looked up and listed.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use ext4_view::{Ext4, Ext4Error, Ext4Read, FileType, Metadata};

use crate::detect::{FsKind, detect};
use crate::partition::{Partition, TableKind, read_table};
use crate::text::escape;
use crate::{Error, ReadAt};

/// Where on a disk the volume to read is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    /// The partition (None: the whole disk, which has no table).
    pub partition: Option<Partition>,
    /// Its first byte on the disk.
    pub start: u64,
    /// Its length.
    pub len: u64,
    /// Its file system.
    pub fs: FsKind,
}

impl Located {
    /// "partition 2" or "the whole disk".
    pub fn describe(&self) -> String {
        match &self.partition {
            Some(p) => format!("partition {}", p.number),
            None => "the whole disk".to_owned(),
        }
    }
}

/// Finds the volume to read: partition `number`, or, when none is given, the disk's only
/// ext2/3/4 partition (or the whole disk when it has no table).
pub fn locate(disk: &dyn ReadAt, number: Option<u32>) -> Result<Located, Error> {
    let table = read_table(disk)?;
    if table.kind == TableKind::None {
        if let Some(n) = number {
            return Err(Error::Partition(format!(
                "--partition {n}: the disk has no partition table (its file system starts at \
                 its first byte); leave --partition out"
            )));
        }
        let fs = detect(disk, 0, disk.size())?;
        return Ok(Located { partition: None, start: 0, len: disk.size(), fs });
    }
    let mut found = Vec::new();
    for p in &table.partitions {
        found.push((p.clone(), detect(disk, p.start, p.len)?));
    }
    let listing = || {
        found
            .iter()
            .map(|(p, fs)| format!("  {} {} {}", p.number, fs.name(), p.kind))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let chosen = match number {
        Some(n) => found.iter().find(|(p, _)| p.number == n).ok_or_else(|| {
            Error::Partition(format!(
                "--partition {n}: the disk has no such partition; it has:\n{}",
                listing()
            ))
        })?,
        None => {
            let ext: Vec<_> = found.iter().filter(|(_, fs)| *fs == FsKind::Ext4).collect();
            match ext.as_slice() {
                [one] => *one,
                _ => {
                    return Err(Error::Partition(format!(
                        "the disk has {} partitions{}; choose one with --partition N:\n{}",
                        found.len(),
                        if ext.is_empty() { ", none of them ext2/3/4" } else { "" },
                        listing()
                    )));
                }
            }
        }
    };
    let (p, fs) = chosen.clone();
    Ok(Located { start: p.start, len: p.len, partition: Some(p), fs })
}

/// A file's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A folder.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A character device node.
    CharDevice,
    /// A block device node.
    BlockDevice,
    /// A named pipe.
    Fifo,
    /// A unix socket.
    Socket,
}

impl Kind {
    fn of(t: FileType) -> Kind {
        if t.is_dir() {
            Kind::Dir
        } else if t.is_symlink() {
            Kind::Symlink
        } else if t.is_char_dev() {
            Kind::CharDevice
        } else if t.is_block_dev() {
            Kind::BlockDevice
        } else if t.is_fifo() {
            Kind::Fifo
        } else if t.is_socket() {
            Kind::Socket
        } else {
            Kind::File
        }
    }

    /// The letter `ls -l` shows for it.
    pub fn letter(self) -> char {
        match self {
            Kind::File => '-',
            Kind::Dir => 'd',
            Kind::Symlink => 'l',
            Kind::CharDevice => 'c',
            Kind::BlockDevice => 'b',
            Kind::Fifo => 'p',
            Kind::Socket => 's',
        }
    }

    /// Its name, for JSON.
    pub fn name(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
            Kind::CharDevice => "char-device",
            Kind::BlockDevice => "block-device",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
        }
    }
}

/// One file of a volume, as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its absolute path in the volume (bytes: names need not be UTF-8).
    pub path: Vec<u8>,
    /// Its kind.
    pub kind: Kind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits, with set-user-ID, set-group-ID and sticky (`mode & 0o7777`).
    pub mode: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Last change of its data: seconds since 1970 and nanoseconds.
    pub modified: (i64, u32),
    /// Last access.
    pub accessed: (i64, u32),
    /// A symlink's target, as stored.
    pub target: Option<Vec<u8>>,
}

impl Entry {
    fn new(path: Vec<u8>, meta: &Metadata, target: Option<Vec<u8>>) -> Entry {
        let (m, a) = (meta.modified(), meta.accessed());
        Entry {
            path,
            kind: Kind::of(meta.file_type()),
            size: meta.len(),
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            modified: (m.seconds(), m.nanoseconds()),
            accessed: (a.seconds(), a.nanoseconds()),
            target,
        }
    }

    /// Its path as text a terminal shows safely.
    pub fn display_path(&self) -> String {
        escape(&self.path)
    }
}

/// The volume's bytes, as the ext4 reader asks for them: a window of the disk.
struct Window {
    disk: Arc<dyn ReadAt>,
    start: u64,
    len: u64,
}

impl Ext4Read for Window {
    fn read(
        &mut self,
        at: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let end = at.checked_add(dst.len() as u64).filter(|e| *e <= self.len);
        if end.is_none() {
            return Err(format!(
                "a read of {} bytes at {at} goes past the volume's end ({} bytes)",
                dst.len(),
                self.len
            )
            .into());
        }
        Ok(self.disk.read_at(self.start + at, dst)?)
    }
}

/// An ext2/3/4 volume, read-only. Not `Send`: use it on one thread.
pub struct Volume {
    pub(crate) fs: Ext4,
}

impl Volume {
    /// Opens the volume `at` of `disk`; any other file system is refused, naming it.
    pub fn open(disk: Arc<dyn ReadAt>, at: &Located) -> Result<Volume, Error> {
        if let Some(reason) = at.fs.unsupported_reason() {
            return Err(Error::Unsupported { volume: at.describe(), reason });
        }
        let window = Window { disk, start: at.start, len: at.len };
        let fs = guarded("the volume's superblock", || Ext4::load(Box::new(window)))?
            .map_err(|e| fs_error("the volume's superblock", e))?;
        Ok(Volume { fs })
    }

    /// The entry at `path` (a symlink itself, not its target).
    pub fn entry(&self, path: &[u8]) -> Result<Entry, Error> {
        let p = guest_path(path)?;
        let meta = guarded(&escape(path), || self.fs.symlink_metadata(p))?
            .map_err(|e| fs_error(&escape(path), e))?;
        let target = if meta.is_symlink() {
            check_link_size(&escape(path), meta.len())?;
            let link = guarded(&escape(path), || self.fs.read_link(p))?
                .map_err(|e| fs_error(&escape(path), e))?;
            Some(link.as_ref().to_vec())
        } else {
            None
        };
        Ok(Entry::new(path.to_vec(), &meta, target))
    }

    /// The entries of the folder `path`, sorted by name (`.` and `..` left out). Each entry's
    /// inode is read from its directory entry, not looked up by path again.
    pub fn children(&self, path: &[u8]) -> Result<Vec<Entry>, Error> {
        let p = guest_path(path)?;
        let shown = escape(path);
        let found = guarded(&shown, || -> Result<Option<Vec<Named>>, Ext4Error> {
            let mut found = Vec::new();
            // The paths made of the names below, in bytes: bounded as well as their count.
            let mut held = 0usize;
            for entry in self.fs.read_dir(p)? {
                let entry = entry?;
                let name = entry.file_name().as_ref().to_vec();
                if name != b"." && name != b".." {
                    held += path.len() + 1 + name.len();
                    if found.len() >= MAX_FOLDER_ENTRIES || held > MAX_FOLDER_BYTES {
                        return Ok(None);
                    }
                    found.push((name, entry.metadata()?));
                }
            }
            Ok(Some(found))
        })?
        .map_err(|e| fs_error(&shown, e))?
        .ok_or_else(|| Error::Damaged {
            path: shown.clone(),
            detail: format!(
                "the folder lists more than {MAX_FOLDER_ENTRIES} entries or {} MiB of names; \
                 the file system may be crafted (one block mapped many times)",
                MAX_FOLDER_BYTES >> 20
            ),
        })?;
        let mut entries = Vec::with_capacity(found.len());
        for (name, meta) in found {
            if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
                return Err(Error::Damaged { path: shown, detail: "a name is malformed".into() });
            }
            let mut child = path.to_vec();
            if child.last() != Some(&b'/') {
                child.push(b'/');
            }
            child.extend_from_slice(&name);
            let target = if meta.is_symlink() {
                check_link_size(&escape(&child), meta.len())?;
                let c = guest_path(&child)?;
                let link = guarded(&shown, || self.fs.read_link(c))?
                    .map_err(|e| fs_error(&escape(&child), e))?;
                Some(link.as_ref().to_vec())
            } else {
                None
            };
            entries.push(Entry::new(child, &meta, target));
        }
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(entries)
    }

    /// Calls `each` for `path` (when it is not a folder) or for what the folder holds, and
    /// with `recursive`, for everything under it, parents first. At most `limit` entries.
    pub fn list(
        &self,
        path: &[u8],
        recursive: bool,
        limit: u64,
        each: &mut dyn FnMut(&Entry),
    ) -> Result<u64, Error> {
        let top = self.entry(path)?;
        if top.kind != Kind::Dir {
            each(&top);
            return Ok(1);
        }
        let mut count = 0u64;
        let mut pending = vec![top.path];
        while let Some(dir) = pending.pop() {
            let children = self.children(&dir)?;
            let mut dirs = Vec::new();
            for child in children {
                count += 1;
                if count > limit {
                    return Err(too_many(limit));
                }
                each(&child);
                if recursive && child.kind == Kind::Dir {
                    dirs.push(child.path);
                }
            }
            // Depth first, in name order.
            pending.extend(dirs.into_iter().rev());
        }
        Ok(count)
    }

    /// Runs `read` on the file at `path`, opened for reading.
    pub(crate) fn with_file<T>(
        &self,
        path: &[u8],
        read: impl FnOnce(&mut ext4_view::File) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let p = guest_path(path)?;
        let shown = escape(path);
        let mut file = guarded(&shown, || self.fs.open(p))?.map_err(|e| fs_error(&shown, e))?;
        guarded(&shown, || read(&mut file))?
    }
}

/// A folder entry's name and inode, as read from the folder.
type Named = (Vec<u8>, Metadata);

/// Entries one folder may list: ext4 folders hold a few million at most, and a crafted one
/// that maps one block many times must not fill the agent's memory.
const MAX_FOLDER_ENTRIES: usize = 4_000_000;

/// Bytes of paths one folder's listing may hold (its entries' full paths): long paths times
/// millions of entries must not fill the agent's memory either.
const MAX_FOLDER_BYTES: usize = 1 << 30;

/// The longest symbolic link target a file system may hold (Linux's PATH_MAX, less its NUL).
const MAX_LINK: u64 = 4095;

/// Refuses a symlink whose size is larger than any link can be, before it is read: the
/// reader would allocate that size at once.
fn check_link_size(path: &str, len: u64) -> Result<(), Error> {
    if len > MAX_LINK {
        return Err(Error::Damaged {
            path: path.to_owned(),
            detail: format!("a symbolic link of {len} bytes (a link holds at most {MAX_LINK})"),
        });
    }
    Ok(())
}

pub(crate) fn too_many(limit: u64) -> Error {
    Error::TooMany(format!(
        "more than {limit} entries: the file system may be damaged or crafted (a folder \
         reached twice); raise --max-entries if it really holds that many"
    ))
}

fn guest_path(path: &[u8]) -> Result<ext4_view::Path<'_>, Error> {
    if path.first() != Some(&b'/') {
        return Err(Error::BadPath(format!(
            "{}: give an absolute path in the point's file system (starting with /)",
            escape(path)
        )));
    }
    ext4_view::Path::try_from(path).map_err(|e| Error::BadPath(format!("{}: {e}", escape(path))))
}

pub(crate) fn fs_error(path: &str, e: Ext4Error) -> Error {
    match e {
        Ext4Error::NotFound => Error::NotFound(path.to_owned()),
        Ext4Error::Io(inner) => Error::Read {
            what: format!("{path} from the disk"),
            source: std::io::Error::other(inner.to_string()),
        },
        Ext4Error::Incompatible(why) => Error::Unsupported {
            volume: "the volume".into(),
            reason: format!("its ext4 features are not supported by the reader: {why}"),
        },
        Ext4Error::Encrypted => Error::Unsupported {
            volume: path.to_owned(),
            reason: "it is encrypted with fscrypt".into(),
        },
        Ext4Error::NotADirectory | Ext4Error::IsADirectory | Ext4Error::IsASpecialFile => {
            Error::BadPath(format!("{path}: {e}"))
        }
        other => Error::Damaged { path: path.to_owned(), detail: other.to_string() },
    }
}

/// Runs `f`, turning a panic of the ext4 reader (a bug it has on crafted bytes) into an error
/// naming `what` as damaged: a guest must not be able to crash the agent.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, Error> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|panic| {
        let detail = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "the reader failed".into());
        Error::Damaged {
            path: what.to_owned(),
            detail: format!("the ext4 reader gave up ({})", escape(detail.as_bytes())),
        }
    })
}

impl Volume {
    /// The first `max` bytes (at most) of the file at `path`.
    pub fn read(&self, path: &[u8], max: usize) -> Result<Vec<u8>, Error> {
        self.with_file(path, |file| {
            let len = file.metadata().len().min(max as u64) as usize;
            let mut out = vec![0u8; len];
            let mut n = 0;
            while n < out.len() {
                let got = file.read_bytes(&mut out[n..]).map_err(|e| fs_error(&escape(path), e))?;
                if got == 0 {
                    break;
                }
                n += got;
            }
            out.truncate(n);
            Ok(out)
        })
    }
}
