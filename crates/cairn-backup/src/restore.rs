//! Restore: a point's disks written back, holes kept, every chunk checked as it is written.

use std::fs::File;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_format::index::{BlockEntry, PatchRef};
use cairn_format::{ChunkFrame, Digest, Name, PointManifest};
use cairn_vault::{ChunkLocation, Vault};
use futures::{StreamExt, TryStreamExt};

use crate::direct_write::TargetWriter;
use crate::target;
use crate::{DiskProgress, Error, Progress};

/// How to restore.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Overwrite an existing non-empty target.
    pub force: bool,
}

/// What a restore wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Disk size.
    pub size: u64,
    /// Bytes of data written (holes and zeros excluded on files).
    pub bytes_written: u64,
    /// Chunks read and checked.
    pub chunks: u64,
}

/// Restores every disk of `point` into the folder `to`, one file per disk named after the disk.
/// A folder the restore creates is private (0700).
pub async fn restore_point(
    vault: &Vault,
    point: &PointManifest,
    to: &Path,
    options: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<Vec<(Name, PathBuf, RestoreStats)>, Error> {
    let folder_error = |source| Error::Target { path: to.to_owned(), source };
    match std::fs::symlink_metadata(to) {
        Ok(meta) if meta.is_dir() => {}
        Ok(meta) if meta.file_type().is_symlink() => {
            return Err(folder_error(std::io::Error::other(
                "it is a symbolic link; a restore writes into the folder it is given, never \
                 through a link: give the real path",
            )));
        }
        Ok(_) => {
            return Err(folder_error(std::io::Error::other(
                "restoring every disk of a point needs a folder, and this is not one; name one \
                 disk to restore it to a file",
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(PRIVATE_FOLDER)
                .create(to)
                .map_err(folder_error)?;
        }
        Err(e) => return Err(folder_error(e)),
    }
    let mut out = Vec::new();
    for name in point.disks.keys() {
        let target = to.join(name.as_str());
        let stats =
            restore_disk(vault, point, name, &target, options, Arc::clone(&progress)).await?;
        out.push((name.clone(), target, stats));
    }
    Ok(out)
}

/// Restores disk `disk` of `point` to `target`: a file (created sparse and private, 0600), or
/// a block device. A file is written as `TARGET.cairn-partial-PID-RANDOM`, this restore's own,
/// and renamed over the target only once complete and synced; the folder is synced after the
/// rename, so a finished restore survives a power cut. A target that is a symbolic link is
/// refused unless it leads to a block device (`/dev/disk/by-id/...`) from a folder only root
/// may change.
pub async fn restore_disk(
    vault: &Vault,
    point: &PointManifest,
    disk: &Name,
    target: &Path,
    options: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<RestoreStats, Error> {
    let record = disk_of(point, disk)?;
    // What other hosts committed or quarantined since this handle last looked: a copy
    // quarantined elsewhere is read from its good copy, not from the bad one.
    vault.refresh_chunk_map().await?;
    let io = |source| Error::Target { path: target.to_owned(), source };
    let (file, kind) = target::open(target, record.size, options.force)?;
    let result = write_disk(vault, record, disk, target, file, kind.is_device(), progress).await;
    if let target::Kind::File { partial } = &kind {
        match &result {
            Ok(_) => target::publish(partial, target).map_err(io)?,
            Err(_) => {
                let _ = std::fs::remove_file(partial);
            }
        }
    }
    result
}

/// Disk `disk` of `point`, or an error listing the disks it has.
pub(crate) fn disk_of<'a>(
    point: &'a PointManifest,
    disk: &Name,
) -> Result<&'a cairn_format::DiskRecord, Error> {
    point.disks.get(disk).ok_or_else(|| Error::DiskNotInPoint {
        disk: disk.clone(),
        point: point.point.clone(),
        available: point.disks.keys().map(|n| n.as_str()).collect::<Vec<_>>().join(", "),
    })
}

/// Mode of a folder a restore creates.
const PRIVATE_FOLDER: u32 = 0o700;

async fn write_disk(
    vault: &Vault,
    record: &cairn_format::DiskRecord,
    disk: &Name,
    target: &Path,
    file: File,
    is_device: bool,
    progress: Arc<dyn Progress>,
) -> Result<RestoreStats, Error> {
    let file = Arc::new(file);
    // Checked against the manifest: a crafted root cannot make restore walk past the disk.
    let root = vault.read_disk_index(record).await?;
    let block = u64::from(root.block_size);
    let size = root.disk_size;
    let page_bytes = u64::from(root.blocks_per_page) * block;

    // Pages are read a few ahead (the root's runs expanded lazily, never into a list); each
    // becomes the reads that fill its part of the disk.
    let root = &root;
    let pages = futures::stream::iter(root.page_digests().enumerate())
        .map(|(i, id)| async move {
            let page = vault.read_page_of(root, i as u64, &id).await?;
            plan_page(vault, &page, i as u64 * page_bytes, block, size, is_device).await
        })
        .buffered(4);

    // One thread writes, in whatever order blocks arrive: concurrent pwrites to one file only
    // fight over its inode lock. Reads and checks run concurrently ahead of it.
    let (to_writer, mut writes) = tokio::sync::mpsc::channel::<(u64, Vec<u8>)>(64);
    let writer_file = Arc::clone(&file);
    let writer_path = target.to_owned();
    let writer = tokio::task::spawn_blocking(move || -> Result<(), Error> {
        let io = |source| Error::Target { path: writer_path.clone(), source };
        let file = writer_file.try_clone().map_err(io)?;
        let mut out = TargetWriter::new(file);
        while let Some((at, data)) = writes.blocking_recv() {
            out.write(at, &data).map_err(io)?;
        }
        out.finish().map_err(io)
    });

    let mut stats = RestoreStats { size, ..Default::default() };
    let mut report = DiskProgress { disk: Some(disk.clone()), size, ..Default::default() };
    let blocks = pages
        .map_ok(|reads| futures::stream::iter(reads.into_iter().map(Ok::<_, Error>)))
        .try_flatten()
        .map_ok(|read| read_blocks(vault, disk, read))
        .try_buffer_unordered(RUNS_IN_FLIGHT);
    futures::pin_mut!(blocks);
    let mut since_report = 0u64;
    let mut outcome = Ok(());
    'reads: loop {
        let (filled, chunks) = match blocks.try_next().await {
            Ok(Some(next)) => next,
            Ok(None) => break,
            Err(e) => {
                outcome = Err(e);
                break;
            }
        };
        stats.chunks += chunks;
        for (at, data) in filled {
            let written = data.len() as u64;
            if to_writer.send((at, data)).await.is_err() {
                break 'reads; // the writer failed; its error is reported below
            }
            stats.bytes_written += written;
            report.position = report.position.max((at + block).min(size));
            report.bytes_sent += written;
        }
        since_report += 1;
        if since_report >= 8 {
            since_report = 0;
            progress.disk(&report);
        }
    }
    drop(to_writer);
    writer.await??;
    outcome?;
    report.done = true;
    report.position = size;
    progress.disk(&report);
    Ok(stats)
}

/// Frames adjacent in one pack are fetched with one ranged read of at most this many bytes.
const MAX_RUN_BYTES: u64 = 8 << 20;
/// Ranged reads (runs) in flight at once.
const RUNS_IN_FLIGHT: usize = 4;

/// One block of data to restore, and where its chunk is stored.
struct Piece {
    at: u64,
    len: u64,
    /// The chunk read: the block, or the base of a patched block.
    id: Digest,
    loc: ChunkLocation,
    /// For a patched block: the entry whose patch goes over the base.
    patch: Option<PatchRef>,
}

/// One read that fills part of the disk.
enum Read {
    /// Blocks whose frames lie back to back in one pack: one ranged read.
    Run(Vec<Piece>),
    /// Zeros for a device (a file keeps holes instead).
    Zeros { at: u64, len: u64 },
}

/// The reads for one page starting at disk offset `base`: data blocks grouped into runs of
/// frames that are adjacent in one pack. The page's frames are taken in pack and offset
/// order, not disk order: a full backup writes a disk's blocks into packs in disk order, and
/// an encrypted vault shuffles them within each pack, so pack order is what keeps reads
/// large either way. A patched block reads its base in the run (the base usually sits where
/// the full backup put the block) and its small patch on the side.
async fn plan_page(
    vault: &Vault,
    page: &cairn_format::index::IndexPage,
    base: u64,
    block: u64,
    size: u64,
    is_device: bool,
) -> Result<Vec<Read>, Error> {
    let ids: Vec<Digest> = page
        .entries()
        .filter_map(|e| match e {
            BlockEntry::Data { digest, .. } => Some(digest),
            BlockEntry::Patch(p) => Some(p.base),
            BlockEntry::Hole | BlockEntry::Zero => None,
        })
        .collect();
    let mut places = vault.locate_chunks(&ids).await?.into_iter();
    let mut reads = Vec::new();
    let mut pieces: Vec<Piece> = Vec::new();
    for (i, entry) in page.entries().enumerate() {
        let at = base + i as u64 * block;
        let len = block.min(size.saturating_sub(at));
        let (id, patch) = match entry {
            BlockEntry::Data { digest, .. } => (digest, None),
            BlockEntry::Patch(p) => (p.base, Some(p)),
            BlockEntry::Hole | BlockEntry::Zero => {
                if is_device {
                    reads.push(Read::Zeros { at, len });
                }
                continue;
            }
        };
        let loc = places.next().flatten().ok_or(cairn_vault::Error::ChunkMissing { id })?;
        pieces.push(Piece { at, len, id, loc, patch });
    }
    pieces.sort_by_key(|p| (p.loc.pack, p.loc.offset));
    let mut run: Vec<Piece> = Vec::new();
    for piece in pieces {
        let loc = piece.loc;
        let end = u64::from(loc.offset) + u64::from(loc.len);
        let extends = run.first().zip(run.last()).is_some_and(|(first, last)| {
            last.loc.pack == loc.pack
                && u64::from(last.loc.offset) + u64::from(last.loc.len) == u64::from(loc.offset)
                && end - u64::from(first.loc.offset) <= MAX_RUN_BYTES
        });
        if !extends && !run.is_empty() {
            reads.push(Read::Run(std::mem::take(&mut run)));
        }
        run.push(piece);
    }
    if !run.is_empty() {
        reads.push(Read::Run(run));
    }
    Ok(reads)
}

/// Performs one read: the blocks it fills (offset, bytes) and how many chunks it checked.
async fn read_blocks(
    vault: &Vault,
    disk: &Name,
    read: Read,
) -> Result<(Vec<(u64, Vec<u8>)>, u64), Error> {
    let run = match read {
        Read::Zeros { at, len } => return Ok((vec![(at, vec![0u8; len as usize])], 0)),
        Read::Run(run) => run,
    };
    // Patches are small: fetched (and checked) beside the run, all at once.
    let patches = futures::future::try_join_all(run.iter().filter_map(|p| {
        let entry = p.patch?;
        Some(async move {
            vault.read_chunk(&entry.patch).await.map_err(|e| match e {
                cairn_vault::Error::Corrupt { .. } => Error::Corrupt {
                    disk: disk.clone(),
                    offset: p.at,
                    id: entry.patch,
                    detail: e.to_string(),
                },
                e => e.into(),
            })
        })
    }))
    .await?;
    let (Some(first), Some(last)) = (run.first(), run.last()) else { return Ok((Vec::new(), 0)) };
    let start = first.loc.offset;
    let span = ChunkLocation {
        pack: first.loc.pack,
        offset: start,
        len: (u64::from(last.loc.offset) + u64::from(last.loc.len) - u64::from(start)) as u32,
    };
    let frames: Vec<bytes::Bytes> = match vault.read_frame(&first.id, &span).await {
        Ok(bytes) => run
            .iter()
            .map(|p| {
                let from = (p.loc.offset - start) as usize;
                bytes.slice(from.min(bytes.len())..(from + p.loc.len as usize).min(bytes.len()))
            })
            .collect(),
        // The pack went away under the restore (a collector repacked it): each chunk is read
        // again from the place a fresh chunk map gives.
        Err(cairn_vault::Error::ChunkMissing { .. }) => {
            let mut frames = Vec::with_capacity(run.len());
            for p in &run {
                frames.push(vault.read_chunk_raw(&p.id).await?);
            }
            frames
        }
        Err(e) => return Err(e.into()),
    };
    let disk = disk.clone();
    let crypto = vault.crypto().clone();
    tokio::task::spawn_blocking(move || {
        let chunks = (run.len() + patches.len()) as u64;
        let mut out = Vec::with_capacity(run.len());
        let mut patches = patches.into_iter();
        for (p, raw) in run.into_iter().zip(frames) {
            let corrupt = |detail: String| Error::Corrupt {
                disk: disk.clone(),
                offset: p.at,
                id: p.id,
                detail,
            };
            let frame =
                ChunkFrame::decode_in(&crypto, &raw, &p.id).map_err(|e| corrupt(e.to_string()))?;
            let block = match &p.patch {
                Some(entry) => {
                    // One patch was fetched per patched piece, in order.
                    let patch = patches.next().unwrap_or_default();
                    cairn_format::patch::rebuild(
                        &frame.plaintext,
                        &patch,
                        &entry.digest,
                        crypto.ids(),
                    )
                    .map_err(|e| corrupt(format!("with patch {}: {e}", entry.patch)))?
                }
                None => frame.plaintext,
            };
            if block.len() as u64 != p.len {
                return Err(corrupt(format!(
                    "it holds {} bytes, the block has {}",
                    block.len(),
                    p.len
                )));
            }
            out.push((p.at, block));
        }
        // In disk order, so that the writer gathers neighbours into large writes.
        out.sort_unstable_by_key(|(at, _)| *at);
        Ok((out, chunks))
    })
    .await?
}
