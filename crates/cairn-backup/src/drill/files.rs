//! Drills with no room for a copy: each disk read straight from the vault through the file
//! reader. A sample of blocks is read (each chunk checked against its digest on the way), and
//! every ext2/3/4 volume is read whole: every folder, every link, every byte of file data
//! ([`cairn_files::Volume::scan`], its data bounded by the volume's size). No checker runs: a
//! volume passes when all of it reads back. That proves less than `e2fsck` on a copy (the
//! reader does not cross-check bitmaps and link counts) and needs no local room at all.

use std::sync::Arc;

use cairn_files::{FsKind, Located, ReadAt, Volume};
use cairn_format::{Name, PointManifest};
use cairn_vault::Vault;
use futures::StreamExt;

use super::volumes::{self, Step};
use super::{CheckOutcome, DiskDrill, VolumeCheck};
use crate::{BlockingReader, Error, PointReader, ReaderOptions, RestoreStats};

/// Blocks read at once while sampling.
const PARALLEL_SAMPLES: usize = 16;

/// The reader's cache: a scan reads each file once, so a small cache does (and a host short
/// of room is often short of memory too).
const CACHE_BYTES: u64 = 64 << 20;

/// Read-ahead for files read in order: short, since most files are small and each read ahead
/// is a fetch (on object storage, a paid request).
const READ_AHEAD: u64 = 2 << 20;

/// The longest a volume's scan may take (as long as `e2fsck` may): past it the volume is not
/// checked, not failed.
const SCAN_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(3600);

/// File data read per volume at most, in volume sizes: hard links are read once per name and
/// sparse files' holes read as zeros, so a sound volume may need more than its size, but not
/// without bound.
const DATA_BUDGET: u64 = 2;

/// Drills disk `disk` of `point` by reading it; see the module docs. Damage is the report's;
/// an error that is not the point's (the backend is unreachable) is an `Err`.
pub(super) async fn drill_disk(
    vault: &Vault,
    point: &PointManifest,
    disk: &Name,
    sample_blocks: u64,
) -> Result<DiskDrill, Error> {
    let mut out = DiskDrill::new(disk);
    let options = ReaderOptions {
        cache_bytes: CACHE_BYTES,
        read_ahead: READ_AHEAD,
        ..ReaderOptions::default()
    };
    let reader = match PointReader::open(vault.clone(), point, disk, options).await {
        Ok(r) => r,
        Err(e) if super::is_point_damage(&e) => {
            out.restore = Err(e.to_string());
            return Ok(out);
        }
        Err(e) => return Err(e),
    };
    let chosen =
        super::choose_blocks(reader.size().div_ceil(u64::from(reader.block_size())), sample_blocks);
    out.sampled = chosen.len() as u64;
    out.mismatched = sample(&reader, chosen).await?;
    let bridge = Arc::new(reader.blocking());
    // A drill dropped (Ctrl-C) stops the thread reading for it at its next read or entry.
    let _stop_when_dropped = CancelOnDrop(Arc::clone(&bridge));
    let disk_reader = Arc::clone(&bridge);
    out.volumes = tokio::task::spawn_blocking(move || scan_volumes(disk_reader))
        .await
        .map_err(|e| Error::Internal(format!("reading the volumes of disk {disk}: {e}")))??;
    // A read that failed for the host's or the backend's sake says nothing of the point.
    if let Some(trouble) = bridge.take_trouble() {
        return Err(trouble);
    }
    let stats = reader.stats();
    out.restore = Ok(RestoreStats {
        size: reader.size(),
        chunks: stats.chunks_fetched,
        ..RestoreStats::default()
    });
    Ok(out)
}

/// Reads the blocks `chosen` (block numbers); the disk offsets of those whose data is
/// damaged or missing.
async fn sample(reader: &PointReader, chosen: Vec<u64>) -> Result<Vec<u64>, Error> {
    let block = u64::from(reader.block_size());
    let size = reader.size();
    let mut reads = futures::stream::iter(chosen)
        .map(|b| async move {
            let offset = b * block;
            let mut buf = vec![0u8; block.min(size - offset) as usize];
            (offset, reader.read(offset, &mut buf).await)
        })
        .buffered(PARALLEL_SAMPLES);
    let mut bad = Vec::new();
    while let Some((offset, read)) = reads.next().await {
        match read {
            Ok(()) => {}
            Err(e) if super::is_point_damage(&e) => bad.push(offset),
            Err(e) => return Err(e),
        }
    }
    Ok(bad)
}

/// Reads every ext2/3/4 volume of the disk whole (on a thread that may block).
fn scan_volumes(disk: Arc<BlockingReader>) -> Result<Vec<VolumeCheck>, Error> {
    let size = disk.size();
    // Which read errors were the host's is sorted after the scan (`take_trouble`).
    let steps = volumes::plan(disk.as_ref(), size, &Ok)?;
    let mut out = Vec::new();
    for step in steps {
        let v = match step {
            Step::Settled(check) => {
                out.push(check);
                continue;
            }
            Step::Check(v) => v,
        };
        let at = Located { partition: v.partition, start: v.start, len: v.len, fs: FsKind::Ext4 };
        let read: Arc<dyn ReadAt> = Arc::clone(&disk) as Arc<dyn ReadAt>;
        let deadline = std::time::Instant::now() + SCAN_TIME_LIMIT;
        let stop = || {
            if disk.is_cancelled() {
                Some("the drill was stopped".to_owned())
            } else if std::time::Instant::now() > deadline {
                Some(format!("reading it took longer than {} s", SCAN_TIME_LIMIT.as_secs()))
            } else {
                None
            }
        };
        let budget = v.len.saturating_mul(DATA_BUDGET);
        let outcome = match Volume::open(read, &at).and_then(|vol| vol.scan(budget, &stop)) {
            Ok(r) => {
                tracing::info!(
                    volume = %v.name,
                    folders = r.folders,
                    files = r.files,
                    bytes = r.bytes,
                    cut = r.files_cut,
                    skipped = r.skipped,
                    "read"
                );
                if r.files_cut > 0 || r.skipped > 0 {
                    CheckOutcome::NotChecked(format!(
                        "{} file(s) left unread (larger than what was left of twice the \
                         volume's size: sparse files or hard links) and {} encrypted \
                         entr(ies); drill without --read-files",
                        r.files_cut, r.skipped
                    ))
                } else {
                    CheckOutcome::Clean
                }
            }
            Err(e) => outcome_of(e),
        };
        out.push(VolumeCheck { volume: v.name, fs: FsKind::Ext4.name().into(), outcome });
    }
    Ok(out)
}

/// What a scan's error says of the volume: damage fails it; what the reader cannot do (a
/// journal or feature it does not know, encryption, its own limits, a time limit) leaves it
/// not checked, so a sound point is never noted failed for the reader's sake.
fn outcome_of(e: cairn_files::Error) -> CheckOutcome {
    use cairn_files::Error as E;
    match e {
        E::Unsupported { .. } | E::TooMany(_) | E::Stopped(_) | E::BadPath(_) => {
            CheckOutcome::NotChecked(format!("{e}; drill without --read-files to check it"))
        }
        e => CheckOutcome::Failed(e.to_string()),
    }
}

/// Cancels the bridge when dropped, so the blocking scan it feeds ends soon.
struct CancelOnDrop(Arc<BlockingReader>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}
