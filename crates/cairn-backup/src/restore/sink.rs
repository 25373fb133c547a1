//! Where restored bytes go: a raw file or block device, or a qcow2 image.
//!
//! One thread writes (see `write_disk`); it receives [`Write`]s in any order. Zero ranges
//! matter only where something was there before: on a block device, and on a file restored
//! in place. A device gets them as `BLKZEROOUT`, which leaves zeros where a discard may leave
//! whatever the device likes; a file gets a punched hole. Neighbouring zero ranges are
//! gathered into one call. Where neither call is supported, zeros are written.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use cairn_nbd::qcow2_write::Qcow2Writer;

use super::direct_write::TargetWriter;

/// One thing for the writer to do.
pub(crate) enum Write {
    /// Bytes at an offset.
    Data { at: u64, data: Vec<u8> },
    /// Zeros over a range.
    Zero { at: u64, len: u64 },
}

/// A restore's output.
pub(crate) enum Sink {
    /// A raw file or a block device.
    Raw { out: TargetWriter, file: File, device: bool, zeros: Option<(u64, u64)> },
    /// A qcow2 image (always a new file: zero ranges are left unallocated).
    Qcow2(Qcow2Writer),
}

/// Largest range zeroed with one call: the kernel may hold a device's queue for the whole of
/// one `BLKZEROOUT`.
const MAX_ZERO_RUN: u64 = 256 << 20;

impl Sink {
    /// A raw sink on `file` (a device when `device`).
    pub(crate) fn raw(file: File, device: bool) -> io::Result<Sink> {
        let out = TargetWriter::new(file.try_clone()?);
        Ok(Sink::Raw { out, file, device, zeros: None })
    }

    pub(crate) fn apply(&mut self, write: Write) -> io::Result<()> {
        match (self, write) {
            (Sink::Qcow2(q), Write::Data { at, data }) => q.write(at, &data),
            (Sink::Qcow2(_), Write::Zero { .. }) => Ok(()),
            (Sink::Raw { out, file, device, zeros }, Write::Data { at, data }) => {
                if let Some((z_at, z_len)) = zeros.take() {
                    zero_range(file, *device, z_at, z_len)?;
                }
                out.write(at, &data)
            }
            (Sink::Raw { file, device, zeros, .. }, Write::Zero { at, len }) => {
                match zeros {
                    Some((z_at, z_len)) if *z_at + *z_len == at && *z_len + len <= MAX_ZERO_RUN => {
                        *z_len += len;
                    }
                    _ => {
                        if let Some((z_at, z_len)) = zeros.replace((at, len)) {
                            zero_range(file, *device, z_at, z_len)?;
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// Writes what is pending and makes it durable.
    pub(crate) fn finish(self) -> io::Result<()> {
        match self {
            Sink::Qcow2(q) => q.finish().map(drop),
            Sink::Raw { out, file, device, zeros } => {
                if let Some((at, len)) = zeros {
                    zero_range(&file, device, at, len)?;
                }
                out.finish()
            }
        }
    }
}

/// Zeros `len` bytes at `at`: `BLKZEROOUT` on a device, a punched hole in a file, written
/// zeros where the call is refused.
fn zero_range(file: &File, device: bool, at: u64, len: u64) -> io::Result<()> {
    let done = if device {
        super::sys::blkzeroout(file, at, len)
    } else {
        rustix::fs::fallocate(
            file,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            at,
            len,
        )
        .map_err(io::Error::from)
    };
    match done {
        Ok(()) => Ok(()),
        Err(e) if unsupported(&e) => write_zeros(file, at, len),
        Err(e) => Err(e),
    }
}

/// The call is not there for this device or file system (the range itself was fine).
fn unsupported(e: &io::Error) -> bool {
    matches!(
        rustix::io::Errno::from_io_error(e),
        Some(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOTTY | rustix::io::Errno::INVAL)
    )
}

fn write_zeros(file: &File, at: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_ranges_on_a_file_become_holes_and_data_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.raw");
        std::fs::write(&path, vec![0xaau8; 4 << 20]).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let mut sink = Sink::raw(file, false).unwrap();
        sink.apply(Write::Zero { at: 0, len: 65536 }).unwrap();
        sink.apply(Write::Zero { at: 65536, len: 65536 }).unwrap();
        sink.apply(Write::Data { at: 1 << 20, data: vec![1u8; 65536] }).unwrap();
        sink.apply(Write::Zero { at: 3 << 20, len: 1 << 20 }).unwrap();
        sink.finish().unwrap();
        let got = std::fs::read(&path).unwrap();
        assert!(got[..131072].iter().all(|b| *b == 0));
        assert!(got[131072..1 << 20].iter().all(|b| *b == 0xaa));
        assert!(got[1 << 20..(1 << 20) + 65536].iter().all(|b| *b == 1));
        assert!(got[3 << 20..].iter().all(|b| *b == 0));
        assert_eq!(got.len(), 4 << 20);
    }
}
