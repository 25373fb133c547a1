//! Writing a pack straight to a local vault's disk, around the page cache.
//!
//! A backup writes gigabytes that nobody reads back soon. Through the page cache each byte is
//! first copied into a freshly allocated cache page: measured on the development VM, that copy
//! was 20-30% of a full backup's CPU time (more right after large deletes, when the host had
//! reclaimed the guest's free pages). With `O_DIRECT` the disk reads our (reused) buffer
//! itself. A pack is assembled in a buffer whose data starts 4096-aligned, written padded to a
//! multiple of 4096, then cut to its length. Where `O_DIRECT` is refused (tmpfs, some FUSE
//! file systems) or the buffer is not aligned, the same bytes go through an ordinary write.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::RngExt;

use crate::Error;
use crate::local_store::FILE_MODE;

/// Alignment of direct I/O buffers, offsets and lengths.
pub const ALIGN: usize = 4096;

/// Whether `e` is a file system refusing `O_DIRECT` (at open, or at the first write): the
/// caller then writes the ordinary way.
pub fn direct_io_refused(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error())
}

/// Bytes appended to one buffer whose data starts 4096-aligned, for direct I/O: a pack being
/// assembled here, restore's gathered writes in `cairn-backup`. It never grows past its
/// capacity while [`AlignedBuf::room`] is respected, so it never moves and stays aligned.
#[derive(Debug)]
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    /// An empty buffer that can hold `capacity` bytes (plus alignment) without moving.
    pub fn with_capacity(capacity: usize) -> Self {
        let mut raw: Vec<u8> = Vec::with_capacity(capacity + 2 * ALIGN);
        let start = raw.as_ptr().align_offset(ALIGN).min(ALIGN);
        raw.resize(start, 0);
        AlignedBuf { raw, start }
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.raw.len() - self.start
    }

    /// Bytes that can still be appended without moving the buffer (which would lose alignment).
    pub fn room(&self) -> usize {
        (self.raw.capacity() - self.raw.len()).saturating_sub(ALIGN)
    }

    /// Appends `bytes` (within [`AlignedBuf::room`] to stay aligned).
    pub fn extend(&mut self, bytes: &[u8]) {
        self.raw.extend_from_slice(bytes);
    }

    /// The bytes held, starting at an aligned address.
    pub fn data(&self) -> &[u8] {
        self.raw.get(self.start..).unwrap_or_default()
    }

    /// Empties it, keeping its memory.
    pub fn clear(&mut self) {
        self.raw.truncate(self.start);
    }

    /// The bytes, for stores that take ownership.
    pub(crate) fn into_bytes(self) -> bytes::Bytes {
        let start = self.start;
        bytes::Bytes::from(self.raw).slice(start..)
    }

    /// The data padded with zeros to a multiple of [`ALIGN`], if the buffer is aligned and has
    /// the room; `None` means "write it the ordinary way".
    fn padded_for_direct_io(&mut self) -> Option<&[u8]> {
        let len = self.len();
        let padded = len.next_multiple_of(ALIGN);
        let aligned = self.data().as_ptr().align_offset(ALIGN) == 0;
        if !aligned || self.raw.capacity() < self.start + padded {
            return None;
        }
        self.raw.resize(self.start + padded, 0);
        self.raw.get(self.start..)
    }
}

/// Writes `buf` as the new file `root/rel`, create-only: to a staging file `<name>#<digits>`
/// (which readers ignore), renamed into place only if nothing has that name yet.
pub(crate) fn write_pack_file(root: &Path, rel: &str, buf: &mut AlignedBuf) -> Result<(), Error> {
    let path = root.join(rel);
    let io = |source: std::io::Error| Error::local_io(&path, source);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let staging = staging_path(&path);
    let result = write_staged(&staging, buf).and_then(|()| {
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            &staging,
            rustix::fs::CWD,
            &path,
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map_err(std::io::Error::from)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&staging);
    }
    result.map_err(io)
}

fn staging_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!("#{}", rand::rng().random::<u32>()));
    PathBuf::from(name)
}

fn write_staged(staging: &Path, buf: &mut AlignedBuf) -> std::io::Result<()> {
    let len = buf.len() as u64;
    let open = |direct: bool| {
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true).mode(FILE_MODE);
        if direct {
            opts.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
        }
        let file = opts.open(staging)?;
        // 0600 whatever the umask (which can only have narrowed it).
        file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
        Ok::<_, std::io::Error>(file)
    };
    if let Some(padded) = buf.padded_for_direct_io() {
        match open(true) {
            Ok(mut file) => {
                file.write_all(padded)?;
                file.set_len(len)?;
                return Ok(());
            }
            // O_DIRECT refused by this file system: fall through to an ordinary write.
            Err(e) if direct_io_refused(&e) => {}
            Err(e) => return Err(e),
        }
    }
    let data = buf.data().get(..len as usize).unwrap_or_default();
    let mut file = open(false)?;
    file.write_all(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pack_file_holds_exactly_its_bytes_and_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let mut buf = AlignedBuf::with_capacity(10_000);
        assert_eq!(buf.data().as_ptr().align_offset(ALIGN), 0);
        let bytes: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        buf.extend(&bytes);
        write_pack_file(dir.path(), "packs/ab/one", &mut buf).unwrap();
        assert_eq!(std::fs::read(dir.path().join("packs/ab/one")).unwrap(), bytes);
        let mode = std::fs::metadata(dir.path().join("packs/ab/one")).unwrap().permissions();
        assert_eq!(mode.mode() & 0o777, 0o600);

        let mut other = AlignedBuf::with_capacity(10);
        other.extend(b"other");
        assert!(write_pack_file(dir.path(), "packs/ab/one", &mut other).is_err());
        assert_eq!(std::fs::read(dir.path().join("packs/ab/one")).unwrap(), bytes);
        let names: Vec<_> = std::fs::read_dir(dir.path().join("packs/ab")).unwrap().collect();
        assert_eq!(names.len(), 1, "no staging file may be left behind");
    }

    #[test]
    fn an_unaligned_or_full_buffer_is_written_the_ordinary_way() {
        let dir = tempfile::tempdir().unwrap();
        let mut buf = AlignedBuf::with_capacity(0);
        buf.extend(&[7u8; 3 * ALIGN]); // grows past its capacity: no room to pad, maybe moved
        write_pack_file(dir.path(), "p", &mut buf).unwrap();
        assert_eq!(std::fs::read(dir.path().join("p")).unwrap(), vec![7u8; 3 * ALIGN]);
    }
}
