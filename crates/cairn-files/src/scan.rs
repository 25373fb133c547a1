//! Reading a whole volume and keeping nothing, as a drill does when there is no room for a
//! copy: every folder listed, every link read, every byte of every regular file read and
//! dropped. The first error stops it and names the file.

use crate::volume::{fs_error, too_many};
use crate::{Error, Kind, Volume};

/// What a scan read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// Folders listed (the root included).
    pub folders: u64,
    /// Regular files read.
    pub files: u64,
    /// Symbolic links read.
    pub links: u64,
    /// Device nodes, pipes and sockets (nothing to read).
    pub others: u64,
    /// Bytes of file data read.
    pub bytes: u64,
    /// Files read only in part because the budget ran out (a sparse file may be larger than
    /// its volume, and reading its holes proves nothing).
    pub files_cut: u64,
}

/// Entries a scan visits at most: a crafted folder that lists an ancestor would walk forever.
const MAX_ENTRIES: u64 = 50_000_000;

/// Bytes asked of the reader at once.
const READ_BYTES: usize = 1 << 20;

impl Volume {
    /// Reads everything in the volume: each folder's entries, each link's target and each
    /// regular file's bytes (at most `budget` bytes of file data in all; the files past it are
    /// counted as cut). Any entry that cannot be read is an error naming it.
    pub fn scan(&self, budget: u64) -> Result<ScanReport, Error> {
        let mut report = ScanReport::default();
        let mut buf = vec![0u8; READ_BYTES];
        let mut pending = vec![b"/".to_vec()];
        let mut seen = 0u64;
        while let Some(dir) = pending.pop() {
            report.folders += 1;
            for child in self.children(&dir)? {
                seen += 1;
                if seen > MAX_ENTRIES {
                    return Err(too_many(MAX_ENTRIES));
                }
                match child.kind {
                    Kind::Dir => pending.push(child.path),
                    // Its target was read with the folder's entries.
                    Kind::Symlink => report.links += 1,
                    Kind::File => {
                        report.files += 1;
                        let left = budget.saturating_sub(report.bytes);
                        let read = self.read_through(&child.path, child.size, left, &mut buf)?;
                        report.bytes += read;
                        if read < child.size {
                            report.files_cut += 1;
                        }
                    }
                    _ => report.others += 1,
                }
            }
        }
        Ok(report)
    }

    /// Reads the first `max` bytes of the file at `path` (of `size` bytes) into `buf` and
    /// drops them; returns how many were read. A file that ends before its size is damaged.
    fn read_through(&self, path: &[u8], size: u64, max: u64, buf: &mut [u8]) -> Result<u64, Error> {
        let want = size.min(max);
        self.with_file(path, |file| {
            let mut at = 0u64;
            while at < want {
                let ask = (want - at).min(buf.len() as u64) as usize;
                let n = file
                    .read_bytes(&mut buf[..ask])
                    .map_err(|e| fs_error(&crate::escape(path), e))?;
                if n == 0 {
                    return Err(Error::Damaged {
                        path: crate::escape(path),
                        detail: format!("{at} bytes read of its {size} bytes"),
                    });
                }
                at += n as u64;
            }
            Ok(at)
        })
    }
}
