//! Restore: a point's disks written back, holes kept, every chunk checked as it is written.
//!
//! A disk goes to a new raw file (sparse, published by rename once complete), a block device
//! (zero ranges zeroed with `BLKZEROOUT`), or a new qcow2 image; or, in place, over the
//! disk it came from, writing only the blocks that differ ([`in_place`]). Every disk of a
//! point is restored at once, up to [`PARALLEL_DISKS`].

mod direct_write;
mod in_place;
mod plan;
mod sink;
mod sys;
pub(crate) mod target;

use std::fs::File;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_format::{Name, PointManifest};
use cairn_nbd::qcow2_write::Qcow2Writer;
use cairn_vault::Vault;
use futures::{StreamExt, TryStreamExt};

pub(crate) use self::plan::is_damage;
use self::plan::{Plan, read_blocks};
use self::sink::{Sink, Write};
use crate::{DiskProgress, Error, Progress};

/// The image format a disk is restored to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImageFormat {
    /// The disk's bytes as they are (a file or a block device).
    #[default]
    Raw,
    /// A qcow2 image (version 3), sparse: blocks that are holes or zeros are not allocated.
    Qcow2,
}

/// How to restore.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Overwrite an existing non-empty target (needed for a device, and for `in_place`).
    pub force: bool,
    /// The format of a new target.
    pub format: ImageFormat,
    /// Over the disk the point came from, writing only the blocks that differ. Not atomic.
    pub in_place: bool,
    /// Record blocks whose data is damaged or missing in the vault, leave zeros there, and go
    /// on with the rest (the stats list them), instead of stopping at the first.
    pub keep_going: bool,
}

/// A range of a disk that could not be restored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// Where it starts in the disk.
    pub offset: u64,
    /// Its length.
    pub len: u64,
    /// Why.
    pub detail: String,
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
    /// In place: blocks the target already held, neither fetched nor written.
    pub blocks_kept: u64,
    /// Ranges left as zeros because their data is damaged or missing (with `keep_going`).
    pub damaged: Vec<Damage>,
}

/// Disks of one point restored at once.
pub const PARALLEL_DISKS: usize = 4;

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
    let disks: Vec<(Name, PathBuf)> =
        point.disks.keys().map(|name| (name.clone(), to.join(name.as_str()))).collect();
    futures::stream::iter(disks)
        .map(|(name, target)| {
            let progress = Arc::clone(&progress);
            async move {
                let stats = restore_disk(vault, point, &name, &target, options, progress).await?;
                Ok::<_, Error>((name, target, stats))
            }
        })
        .buffered(PARALLEL_DISKS)
        .try_collect()
        .await
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
    if options.in_place && !options.force {
        return Err(Error::InvalidRequest(format!(
            "restoring disk {disk} in place over {} overwrites it and is not atomic (a restore \
             that stops halfway leaves it part old, part new): say --force to go ahead",
            target.display()
        )));
    }
    if options.in_place && options.format != ImageFormat::Raw {
        return Err(Error::InvalidRequest(
            "an in-place restore writes over a raw disk (a file or a device); it does not \
             write qcow2: restore to a new file instead"
                .into(),
        ));
    }
    // What other hosts committed or quarantined since this handle last looked: a copy
    // quarantined elsewhere is read from its good copy, not from the bad one. The whole map,
    // not a point's part of it (as exports load): a restore reads every block anyway, and
    // reads each chunk where verify does.
    vault.refresh_chunk_map().await?;
    let io = |source| Error::Target { path: target.to_owned(), source };
    let qcow2 = options.format == ImageFormat::Qcow2;
    let (file, kind) = if options.in_place {
        target::open_in_place(target, record.size)?
    } else {
        target::open(target, record.size, options.force, qcow2)?
    };
    if qcow2 && kind.is_device() {
        return Err(io(std::io::Error::other(
            "it is a block device, and a qcow2 image is a file: restore raw to a device",
        )));
    }
    // Removed unless published, even when this future is dropped halfway (another disk of
    // the point failed, or the caller gave up).
    let partial = match &kind {
        target::Kind::File { partial } => Some(target::PartialFile::new(partial.clone())),
        _ => None,
    };
    let stats = write_disk(vault, record, disk, target, file, &kind, options, progress).await?;
    if let Some(partial) = partial {
        partial.publish(target).map_err(io)?;
    }
    Ok(stats)
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

/// Reads (and fetches) a few runs ahead of the writer.
const RUNS_IN_FLIGHT: usize = 4;

#[allow(clippy::too_many_arguments)]
async fn write_disk(
    vault: &Vault,
    record: &cairn_format::DiskRecord,
    disk: &Name,
    target: &Path,
    file: File,
    kind: &target::Kind,
    options: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<RestoreStats, Error> {
    let io = |source| Error::Target { path: target.to_owned(), source };
    // Checked against the manifest: a crafted root cannot make restore walk past the disk.
    let root = vault.read_disk_index(record).await?;
    let block = u64::from(root.block_size);
    let size = root.disk_size;
    let page_bytes = u64::from(root.blocks_per_page) * block;
    let in_place = matches!(kind, target::Kind::InPlace) || (kind.is_device() && options.in_place);
    let plan = Plan {
        block,
        size,
        zeros: kind.is_device() || in_place,
        existing: if in_place { Some(Arc::new(file.try_clone().map_err(io)?)) } else { None },
        keep_going: options.keep_going,
    };
    let sink = match options.format {
        ImageFormat::Raw => Sink::raw(file, kind.is_device()).map_err(io)?,
        ImageFormat::Qcow2 => Sink::Qcow2(
            Qcow2Writer::new(file, size, Qcow2Writer::cluster_bits_for(root.block_size))
                .map_err(io)?,
        ),
    };

    // Pages are read a few ahead (the root's runs expanded lazily, never into a list); each
    // becomes the reads that fill its part of the disk.
    let (root, plan) = (&root, &plan);
    let pages = futures::stream::iter(root.page_digests().enumerate())
        .map(|(i, id)| async move {
            let page = vault.read_page_of(root, i as u64, &id).await?;
            plan::plan_page(vault, plan, &page, i as u64 * page_bytes).await
        })
        .buffered(4);

    // One thread writes, in whatever order blocks arrive: concurrent pwrites to one file only
    // fight over its inode lock. Reads and checks run concurrently ahead of it.
    let (to_writer, mut writes) = tokio::sync::mpsc::channel::<Write>(64);
    let writer_path = target.to_owned();
    let writer = tokio::task::spawn_blocking(move || -> Result<(), Error> {
        let io = |source| Error::Target { path: writer_path.clone(), source };
        let mut sink = sink;
        while let Some(write) = writes.blocking_recv() {
            sink.apply(write).map_err(io)?;
        }
        sink.finish().map_err(io)
    });

    let mut stats = RestoreStats { size, ..Default::default() };
    let mut report = DiskProgress { disk: Some(disk.clone()), size, ..Default::default() };
    // What the pages say (blocks kept, chunks missing), gathered as the stream runs.
    let from_pages = std::sync::Mutex::new((0u64, Vec::<Damage>::new()));
    let blocks = pages
        .map_ok(|page| {
            let mut noted = from_pages.lock().unwrap_or_else(|e| e.into_inner());
            noted.0 += page.kept;
            noted.1.extend(page.damaged);
            futures::stream::iter(page.reads.into_iter().map(Ok::<_, Error>))
        })
        .try_flatten()
        .map_ok(|read| read_blocks(vault, disk, read, options.keep_going))
        .try_buffer_unordered(RUNS_IN_FLIGHT);
    // Boxed so that dropping it below stops the reads still in flight.
    let mut blocks = Box::pin(blocks);
    let mut damaged = Vec::new();
    let mut since_report = 0u64;
    let mut outcome = Ok(());
    'reads: loop {
        let filled = match blocks.try_next().await {
            Ok(Some(next)) => next,
            Ok(None) => break,
            Err(e) => {
                outcome = Err(e);
                break;
            }
        };
        let mut writes: Vec<Write> = Vec::new();
        if let Some((at, len)) = filled.zeros {
            writes.push(Write::Zero { at, len });
        }
        for gap in &filled.damaged {
            // Where the target held something, a damaged block reads zeros, not stale data.
            if plan.zeros {
                writes.push(Write::Zero { at: gap.offset, len: gap.len });
            }
        }
        damaged.extend(filled.damaged);
        stats.chunks += filled.chunks;
        for (at, data) in filled.blocks {
            stats.bytes_written += data.len() as u64;
            report.bytes_sent += data.len() as u64;
            report.position = report.position.max((at + block).min(size));
            writes.push(Write::Data { at, data });
        }
        for write in writes {
            if to_writer.send(write).await.is_err() {
                break 'reads; // the writer failed; its error is reported below
            }
        }
        since_report += 1;
        if since_report >= 8 {
            since_report = 0;
            progress.disk(&report);
        }
    }
    drop(blocks);
    drop(to_writer);
    writer.await??;
    outcome?;
    let (kept, missing) =
        std::mem::take(&mut *from_pages.lock().unwrap_or_else(|e| e.into_inner()));
    stats.blocks_kept = kept;
    damaged.extend(missing);
    for gap in &damaged {
        tracing::warn!(%disk, offset = gap.offset, len = gap.len, detail = %gap.detail,
            "left zeros where the vault's data is damaged or missing");
    }
    damaged.sort_by_key(|d| d.offset);
    stats.damaged = damaged;
    report.done = true;
    report.position = size;
    progress.disk(&report);
    Ok(stats)
}
