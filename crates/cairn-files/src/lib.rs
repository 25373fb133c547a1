//! File-level recovery: single files and folders out of a disk image, without restoring it.
//!
//! The disk is anything that reads bytes at an offset ([`ReadAt`]): a recovery point read
//! straight from its vault, a raw file. [`read_table`] finds its GPT or MBR partitions,
//! [`detect`] tells the file system of one, and [`Volume`] opens an ext2/3/4 one read-only
//! (through the `ext4-view` crate, which replays the journal in memory and writes nothing),
//! lists it, and extracts files and folders under a host folder with [`Volume::extract`]:
//! mode, owner, times, symlinks and holes kept; [`Volume::scan`] reads it all and keeps
//! nothing (a drill with no room for a copy).
//!
//! Every byte here comes from a guest. Tables and names are checked before use; the guest's
//! symlinks are recreated, never followed on the host (each file is created relative to its
//! parent folder's descriptor, refusing links and anything that exists); device nodes are
//! never created; set-user-ID bits are dropped unless asked for; and a panic of the reader on
//! crafted bytes surfaces as an error naming the volume as damaged. The crate does no I/O
//! beyond the reader it is handed and the folder it extracts into.

mod detect;
mod error;
mod extract;
mod partition;
mod scan;
mod text;
mod volume;

pub use detect::{FsKind, detect, detect_head, ext4_size};
pub use error::Error;
pub use extract::{ExtractOptions, ExtractReport, Skipped};
pub use partition::{
    GptLayout, MbrEntry, Partition, Table, TableKind, gpt_entries, gpt_header, mbr_entries,
    read_table,
};
pub use scan::ScanReport;
pub use text::escape;
pub use volume::{Entry, Kind, Located, Volume, locate};

/// A disk read at any offset.
pub trait ReadAt {
    /// The disk's size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `offset`; a read past the end is an error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
}

impl ReadAt for std::fs::File {
    fn size(&self) -> u64 {
        self.metadata().map(|m| m.len()).unwrap_or(0)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let start = usize::try_from(offset).ok().filter(|s| *s <= self.len());
        let end = start.and_then(|s| s.checked_add(buf.len())).filter(|e| *e <= self.len());
        match (start, end) {
            (Some(s), Some(e)) => {
                buf.copy_from_slice(&self[s..e]);
                Ok(())
            }
            _ => Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "past the end")),
        }
    }
}
