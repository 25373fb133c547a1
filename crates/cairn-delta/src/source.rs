//! Block sources: what the engine reads from.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use cairn_format::PointId;

use crate::Error;

/// A byte range of a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Start, in bytes.
    pub offset: u64,
    /// Length, in bytes.
    pub len: u64,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// A disk the engine can read: a raw image file, a block device, a snapshot view, an NBD export.
pub trait BlockSource: Send + Sync {
    /// How to name this disk in errors and logs (its path or URL).
    fn describe(&self) -> String;

    /// Size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` from `offset`; the range lies within the disk.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error>;

    /// The allocated extents within `[offset, offset + len)`, in order. Everything outside them
    /// reads as zeros and is skipped without reading. The default: all of it is allocated.
    fn allocated(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Error> {
        Ok(vec![Extent { offset, len }])
    }

    /// What the source knows about which ranges changed since an earlier recovery point
    /// (changed-block tracking). The default: nothing, every block is read and hashed.
    fn change_tracking(&self) -> ChangeTracking {
        ChangeTracking::NotTracked
    }
}

/// What a source knows about the ranges written since an earlier recovery point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeTracking {
    /// The source does not track writes (raw files, devices): every block is hashed.
    NotTracked,
    /// Every byte written since point `since` was captured lies within `dirty`.
    Since {
        /// The point whose capture started the tracking.
        since: PointId,
        /// The ranges written since, sorted and not overlapping.
        dirty: Vec<Extent>,
        /// What tracked them, for the point's evidence (a bitmap's name and granularity).
        tracker: String,
    },
    /// The source tracks writes but cannot vouch for them this time; why.
    Unusable(String),
}

/// A raw disk image file or a block device, read with `pread`; holes in sparse files are found
/// with `SEEK_DATA`/`SEEK_HOLE` and never read.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    path: PathBuf,
    size: u64,
    seekable_holes: bool,
}

impl RawFile {
    /// Opens `path` read-only, refusing folders and other things that are not disks.
    pub fn open(path: &Path) -> Result<RawFile, Error> {
        let open_err = |source: io::Error| {
            let hint = match source.kind() {
                io::ErrorKind::NotFound => "; check the path, or the disk's NAME=PATH mapping",
                io::ErrorKind::PermissionDenied => "; run as a user that may read it (often root)",
                _ => "",
            };
            Error::Open { path: path.to_owned(), source, hint }
        };
        let meta = std::fs::metadata(path).map_err(open_err)?;
        let kind = meta.file_type();
        if kind.is_dir() {
            return Err(Error::NotADisk {
                path: path.to_owned(),
                detail: "it is a folder; give a disk image file or a block device".into(),
            });
        }
        if !(kind.is_file() || kind.is_block_device()) {
            return Err(Error::NotADisk {
                path: path.to_owned(),
                detail: "it is neither a regular file nor a block device".into(),
            });
        }
        let file = File::open(path).map_err(open_err)?;
        let size = if kind.is_block_device() {
            rustix::fs::seek(&file, rustix::fs::SeekFrom::End(0)).map_err(|e| Error::Read {
                disk: path.display().to_string(),
                offset: 0,
                source: e.into(),
            })?
        } else {
            meta.len()
        };
        Ok(RawFile { file, path: path.to_owned(), size, seekable_holes: kind.is_file() })
    }

    fn read_err(&self, offset: u64, source: io::Error) -> Error {
        Error::Read { disk: self.describe(), offset, source }
    }
}

impl BlockSource for RawFile {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                self.read_err(
                    offset,
                    io::Error::new(e.kind(), "the disk shrank while it was being read"),
                )
            } else {
                self.read_err(offset, e)
            }
        })
    }

    fn allocated(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Error> {
        let end = offset.saturating_add(len).min(self.size);
        if !self.seekable_holes {
            return Ok(vec![Extent { offset, len: end.saturating_sub(offset) }]);
        }
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Data(pos)) {
                Ok(d) => d,
                // ENXIO: no data at or after `pos`.
                Err(rustix::io::Errno::NXIO) => break,
                // A file system without SEEK_DATA: treat everything as data.
                Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => {
                    out.push(Extent { offset: pos, len: end - pos });
                    break;
                }
                Err(e) => return Err(self.read_err(pos, e.into())),
            };
            if data >= end {
                break;
            }
            let hole = match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Hole(data)) {
                Ok(h) => h.min(end),
                Err(e) => return Err(self.read_err(data, e.into())),
            };
            out.push(Extent { offset: data, len: hole - data });
            pos = hole;
        }
        Ok(out)
    }
}

/// A disk in memory: for tests, benchmarks and embedding. Ranges listed as holes read as zeros
/// and are reported unallocated.
#[derive(Clone, Debug, Default)]
pub struct MemSource {
    data: Vec<u8>,
    holes: Vec<Extent>,
    name: String,
}

impl MemSource {
    /// A fully allocated disk holding `data`.
    pub fn new(name: impl Into<String>, data: Vec<u8>) -> Self {
        MemSource { data, holes: Vec::new(), name: name.into() }
    }

    /// Marks `[offset, offset + len)` as a hole (zeroing it); holes must be added in order and
    /// not overlap.
    pub fn with_hole(mut self, offset: u64, len: u64) -> Self {
        let end = (offset + len).min(self.data.len() as u64);
        if let Some(range) = self.data.get_mut(offset as usize..end as usize) {
            range.fill(0);
        }
        self.holes.push(Extent { offset, len: end.saturating_sub(offset) });
        self
    }

    /// The disk's bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The disk's bytes, to change them between scans.
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }
}

impl BlockSource for MemSource {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match self.data.get(start..).and_then(|d| d.get(..buf.len())) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(Error::Read {
                disk: self.name.clone(),
                offset,
                source: io::ErrorKind::UnexpectedEof.into(),
            }),
        }
    }

    fn allocated(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Error> {
        let end = (offset + len).min(self.size());
        let mut out = Vec::new();
        let mut pos = offset;
        for hole in &self.holes {
            if hole.end() <= pos || hole.offset >= end {
                continue;
            }
            if hole.offset > pos {
                out.push(Extent { offset: pos, len: hole.offset - pos });
            }
            pos = hole.end().min(end);
        }
        if pos < end {
            out.push(Extent { offset: pos, len: end - pos });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn raw_file_finds_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let mut f = File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(&[1u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        let src = RawFile::open(&path).unwrap();
        assert_eq!(src.size(), 64 << 20);
        let ext = src.allocated(0, 64 << 20).unwrap();
        // File systems may round extents; the data must be covered and most of the file not.
        let covered: u64 = ext.iter().map(|e| e.len).sum();
        assert!(ext.iter().any(|e| e.offset <= 8 << 20 && e.end() >= 9 << 20), "{ext:?}");
        assert!(covered < 32 << 20, "{ext:?}");
    }

    #[test]
    fn refuses_folders_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let err = RawFile::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("is a folder"), "{err}");
        let err = RawFile::open(&dir.path().join("nope")).unwrap_err();
        assert!(err.to_string().contains("check the path"), "{err}");
    }

    #[test]
    fn mem_source_reports_holes() {
        let src = MemSource::new("m", vec![1; 100]).with_hole(10, 20).with_hole(50, 10);
        assert_eq!(
            src.allocated(0, 100).unwrap(),
            vec![
                Extent { offset: 0, len: 10 },
                Extent { offset: 30, len: 20 },
                Extent { offset: 60, len: 40 }
            ]
        );
        assert_eq!(src.allocated(15, 10).unwrap(), vec![]);
    }
}
