//! A point's disk read from threads that may block (the NBD server's, the ext4 reader's):
//! each read is driven on the runtime the reader was made in.
//!
//! The readers it serves see only `std::io::Error`s, and the ext4 reader turns them into
//! text: which errors were damage to the point and which were the host's or the backend's is
//! lost on the way. The bridge keeps that for its caller: [`BlockingReader::take_trouble`]
//! gives the first read error that was not damage (an unreachable backend), so a drill notes
//! nothing rather than calling a sound point damaged.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::{Error, PointReader};

/// The reader, for a thread that may block (never a runtime worker).
pub struct BlockingReader {
    reader: PointReader,
    runtime: tokio::runtime::Handle,
    trouble: Mutex<Option<Error>>,
    cancelled: AtomicBool,
}

impl PointReader {
    /// The reader for threads that may block. Call it within the runtime that is to drive
    /// the reads.
    pub fn blocking(&self) -> BlockingReader {
        BlockingReader {
            reader: self.clone(),
            runtime: tokio::runtime::Handle::current(),
            trouble: Mutex::new(None),
            cancelled: AtomicBool::new(false),
        }
    }
}

impl BlockingReader {
    /// The first read error that was not damage to the point, if any (see the module docs).
    pub fn take_trouble(&self) -> Option<Error> {
        self.trouble.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    /// Makes every later read fail at once (its caller was dropped: Ctrl-C), so a thread
    /// reading through this bridge ends soon.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    /// True once [`BlockingReader::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Reads through the runtime; an error is returned as text (what the readers served take)
    /// and kept if it was not damage. A panic under the read (the vault's, the runtime's as it
    /// shuts down) is kept as trouble too: the reader it is handed to would take it for damage.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        if self.is_cancelled() {
            return Err(self.keep(Error::Internal("the read was cancelled".into())));
        }
        let read = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.runtime.block_on(self.reader.read(offset, buf))
        }));
        match read {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) if crate::restore::is_damage(&e) => Err(e.to_string()),
            Ok(Err(e)) => Err(self.keep(e)),
            Err(_) => {
                Err(self.keep(Error::Internal(format!("a read at offset {offset} panicked"))))
            }
        }
    }

    /// Keeps `e` as the trouble if it is the first; returns its text.
    fn keep(&self, e: Error) -> String {
        let shown = e.to_string();
        self.trouble.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(e);
        shown
    }
}

impl cairn_files::ReadAt for BlockingReader {
    fn size(&self) -> u64 {
        self.reader.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.read(offset, buf).map_err(std::io::Error::other)
    }
}

impl cairn_nbd::server::ExportSource for BlockingReader {
    fn size(&self) -> u64 {
        self.reader.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        self.read(offset, buf)
    }

    fn preferred_block(&self) -> u32 {
        self.reader.block_size()
    }
}
