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
    /// Files not read (or read in part) because they are larger than what was left of the
    /// budget (a sparse file may be larger than its volume, and reading its holes proves
    /// nothing).
    pub files_cut: u64,
    /// Files and folders the reader cannot open (encrypted with fscrypt), left unread.
    pub skipped: u64,
}

/// Entries a scan visits at most: a crafted folder that lists an ancestor would walk forever.
const MAX_ENTRIES: u64 = 50_000_000;

/// Bytes of folder paths waiting to be listed, at most (the same crafted folder, deep).
const MAX_PENDING_BYTES: usize = 256 << 20;

/// Bytes asked of the reader at once.
const READ_BYTES: usize = 1 << 20;

impl Volume {
    /// Reads everything in the volume: each folder's entries, each link's target and each
    /// regular file's bytes (at most `budget` bytes of file data in all; a file larger than
    /// what is left is not read, and counted as cut). `stop` is asked before each entry: a reason it gives ends the scan
    /// with [`Error::Stopped`]. Any entry that cannot be read is an error naming it, except
    /// encrypted ones, counted as skipped.
    pub fn scan(
        &self,
        budget: u64,
        stop: &dyn Fn() -> Option<String>,
    ) -> Result<ScanReport, Error> {
        let mut report = ScanReport::default();
        let mut buf = vec![0u8; READ_BYTES];
        let mut pending = vec![b"/".to_vec()];
        let mut pending_bytes = 1usize;
        let mut seen = 0u64;
        while let Some(dir) = pending.pop() {
            pending_bytes -= dir.len();
            report.folders += 1;
            let children = match self.children(&dir) {
                Err(Error::Unsupported { .. }) => {
                    report.skipped += 1;
                    continue;
                }
                listed => listed?,
            };
            // Names are unique in a real folder; a crafted one repeats them to multiply work.
            if let Some(w) = children.windows(2).find(|w| w[0].path == w[1].path) {
                return Err(Error::Damaged {
                    path: crate::escape(&w[0].path),
                    detail: "its folder lists the name twice".into(),
                });
            }
            for child in children {
                if let Some(why) = stop() {
                    return Err(Error::Stopped(why));
                }
                seen += 1;
                if seen > MAX_ENTRIES {
                    return Err(too_many(MAX_ENTRIES));
                }
                match child.kind {
                    Kind::Dir => {
                        pending_bytes += child.path.len();
                        if pending_bytes > MAX_PENDING_BYTES {
                            return Err(Error::TooMany(format!(
                                "more than {} MiB of folder paths to list: the file system may \
                                 be crafted (a folder reached twice)",
                                MAX_PENDING_BYTES >> 20
                            )));
                        }
                        pending.push(child.path);
                    }
                    // Its target was read with the folder's entries.
                    Kind::Symlink => report.links += 1,
                    // A file larger than what is left of the budget is not read at all, so one
                    // huge sparse file does not leave every file after it unread.
                    Kind::File if child.size > budget.saturating_sub(report.bytes) => {
                        report.files += 1;
                        report.files_cut += 1;
                    }
                    Kind::File => {
                        let left = budget.saturating_sub(report.bytes);
                        match self.read_through(&child.path, child.size, left, &mut buf) {
                            Err(Error::Unsupported { .. }) => report.skipped += 1,
                            read => {
                                let read = read?;
                                report.files += 1;
                                report.bytes += read;
                                if read < child.size {
                                    report.files_cut += 1;
                                }
                            }
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
