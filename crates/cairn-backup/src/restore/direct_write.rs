//! Restore's writer: data goes to the target with `O_DIRECT`, around the page cache.
//!
//! A restore writes gigabytes nobody reads back soon. Through the page cache every byte is
//! first copied into a freshly allocated cache page, and on the development VM that copy was
//! most of a restore's time (13 of its 17 CPU-seconds for a 4 GiB disk, in the kernel's
//! `copy_folio_from_iter_atomic`; see docs/performance.md). Blocks that arrive back to back
//! are gathered in a 4096-aligned buffer and written with one direct `pwrite`. What cannot go
//! direct (a short last block, a file system that refuses `O_DIRECT`) is written the ordinary
//! way through a second handle on the same file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use cairn_vault::{AlignedBuf, DIRECT_IO_ALIGN, direct_io_refused};

/// Bytes gathered before a direct write.
const GATHER: usize = 1 << 20;

/// Writes blocks to a restore target, directly where it can.
pub(crate) struct TargetWriter {
    buffered: File,
    direct: Option<File>,
    gathered: AlignedBuf,
    /// Where the gathered bytes go.
    at: u64,
}

impl TargetWriter {
    /// Writes to `buffered` (opened for writing), and to a second, direct handle on the same
    /// file when the file system allows it. The second handle is opened through the first
    /// (`/proc/self/fd`), never by name: the name may have been replaced meanwhile.
    pub(crate) fn new(buffered: File) -> Self {
        let same_file = format!("/proc/self/fd/{}", buffered.as_raw_fd());
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(same_file)
            .ok();
        TargetWriter { buffered, direct, gathered: AlignedBuf::with_capacity(GATHER), at: 0 }
    }

    /// Writes `data` at `at`.
    pub(crate) fn write(&mut self, at: u64, data: &[u8]) -> io::Result<()> {
        let aligned =
            at.is_multiple_of(DIRECT_IO_ALIGN as u64) && data.len().is_multiple_of(DIRECT_IO_ALIGN);
        if self.direct.is_none() || !aligned || data.len() > GATHER {
            self.flush()?;
            return write_at(&mut self.direct, &self.buffered, at, data);
        }
        let held = self.gathered.len() as u64;
        if held > 0 && (self.at + held != at || self.gathered.room() < data.len()) {
            self.flush()?;
        }
        if self.gathered.is_empty() {
            self.at = at;
        }
        self.gathered.extend(data);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        let result = write_at(&mut self.direct, &self.buffered, self.at, self.gathered.data());
        self.gathered.clear();
        result
    }

    /// Writes what is gathered and makes everything durable.
    pub(crate) fn finish(mut self) -> io::Result<()> {
        self.flush()?;
        if let Some(direct) = &self.direct {
            direct.sync_all()?;
        }
        self.buffered.sync_all()
    }
}

/// Writes `data` at `at`: through `direct` when there is one and `data` is aligned, else (or
/// once the file system refuses) through `buffered`.
fn write_at(direct: &mut Option<File>, buffered: &File, at: u64, data: &[u8]) -> io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    let aligned = data.as_ptr().align_offset(DIRECT_IO_ALIGN) == 0
        && at.is_multiple_of(DIRECT_IO_ALIGN as u64)
        && data.len().is_multiple_of(DIRECT_IO_ALIGN);
    if let (Some(file), true) = (direct.as_ref(), aligned) {
        match file.write_all_at(data, at) {
            Ok(()) => return Ok(()),
            Err(e) if direct_io_refused(&e) => *direct = None,
            Err(e) => return Err(e),
        }
    }
    buffered.write_all_at(data, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_direct_writes_and_writes_the_rest_the_ordinary_way() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.raw");
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path).unwrap();
        file.set_len(8 << 20).unwrap();
        let mut w = TargetWriter::new(file);
        let block = |b: u8, n: usize| vec![b; n];
        // Out of order, adjacent, a short tail, and one write larger than the gather buffer.
        w.write(65536, &block(2, 65536)).unwrap();
        w.write(0, &block(1, 65536)).unwrap();
        w.write(131072, &block(3, 65536)).unwrap();
        w.write(2 << 20, &block(4, 3 << 20)).unwrap();
        w.write((8 << 20) - 100, &block(5, 100)).unwrap();
        w.finish().unwrap();
        let got = std::fs::read(&path).unwrap();
        assert_eq!(got.len(), 8 << 20);
        assert!(got[..65536].iter().all(|b| *b == 1));
        assert!(got[65536..131072].iter().all(|b| *b == 2));
        assert!(got[131072..196608].iter().all(|b| *b == 3));
        assert!(got[196608..2 << 20].iter().all(|b| *b == 0));
        assert!(got[2 << 20..5 << 20].iter().all(|b| *b == 4));
        assert!(got[(8 << 20) - 100..].iter().all(|b| *b == 5));
    }
}
