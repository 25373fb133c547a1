//! The backup job.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use cairn_delta::{
    Batch, BlockEncoder, BlockEvent, BlockSource, ChangeTracking, EngineConfig, NoPrevious,
    PreviousIndex, Tracked,
};
use cairn_format::index::{EncodedPage, IndexWriter};
use cairn_format::{
    Consistency, Digest, DiskRecord, DiskStats, Evidence, Name, PointId, PointManifest,
    encode_chunk_in,
};
use cairn_vault::{PackWriter, Stored, Vault};
use futures::StreamExt;
use jiff::Timestamp;
use rand::RngExt;
use tokio::sync::mpsc;

use crate::previous::{VaultBases, VaultPrevious};
use crate::{Cancel, DiskProgress, Error, Progress};

/// One disk to back up: its stable name within the VM, and where to read it.
pub struct DiskInput {
    /// The disk's identity in the VM (never derived from the path read).
    pub name: Name,
    /// What to read: an image file, a device, a snapshot view.
    pub source: Arc<dyn BlockSource>,
}

/// A backup to run.
pub struct BackupRequest {
    /// The VM.
    pub vm: Name,
    /// Its disks.
    pub disks: Vec<DiskInput>,
    /// The consistency the caller reached before reading (`None` for a live read).
    pub consistency: Consistency,
    /// When the disks were captured, if earlier than the job start (a snapshot).
    pub captured_at: Option<Timestamp>,
    /// Evidence gathered before the read (scripts, freeze), recorded on the point.
    pub evidence: Vec<Evidence>,
    /// Hashing threads per disk (default: one per core).
    pub threads: Option<usize>,
    /// The point's id, if chosen before the capture (from `Vault::reserve_point_id`), so that
    /// what the capture started (dirty bitmaps) is named for it; `None`: chosen now.
    pub point: Option<PointId>,
    /// Disks read at once (default [`DEFAULT_PARALLEL_DISKS`]); each costs about 50 MiB of
    /// buffers and packs in flight, so this bounds the job's memory whatever the disk count.
    pub parallel_disks: Option<usize>,
    /// Keep the point until then whatever retention says; written as a note before the
    /// manifest, so that no prune sees the point without it.
    pub retain_until: Option<Timestamp>,
    /// The VM's definition as its hypervisor reported it, recorded on the point.
    pub machine: Option<cairn_format::MachineRecord>,
    /// The coordinator's job that asked for the point, recorded in its manifest.
    pub origin: Option<cairn_format::Origin>,
    /// The point's snapshot tier (its views kept on a host), recorded in a note before the
    /// commit.
    pub snapshot: Option<cairn_format::SnapshotTier>,
}

/// Disks read at once by default: on 2 cores two disks already keep both busy, and the job's
/// peak memory stays near 100 MiB however many disks the VM has.
pub const DEFAULT_PARALLEL_DISKS: usize = 2;

impl BackupRequest {
    /// A live read of `disks` of `vm` (consistency `none`), with every option at its default.
    pub fn new(vm: Name, disks: Vec<DiskInput>) -> Self {
        BackupRequest {
            vm,
            disks,
            consistency: Consistency::None,
            captured_at: None,
            evidence: Vec::new(),
            threads: None,
            point: None,
            parallel_disks: None,
            retain_until: None,
            machine: None,
            origin: None,
            snapshot: None,
        }
    }
}

/// Runs a backup: every disk in parallel through the delta engine into `vault`, then the
/// commit. On any error or cancellation nothing is committed and earlier points are untouched.
pub async fn backup(
    vault: &Vault,
    request: BackupRequest,
    progress: Arc<dyn Progress>,
    cancel: &Cancel,
) -> Result<PointManifest, Error> {
    let names: BTreeSet<&Name> = request.disks.iter().map(|d| &d.name).collect();
    if request.disks.is_empty() {
        return Err(Error::InvalidRequest("a backup needs at least one disk".into()));
    }
    if names.len() != request.disks.len() {
        return Err(Error::InvalidRequest(
            "two disks have the same name; name them with NAME=PATH".into(),
        ));
    }
    let started_at = Timestamp::now();
    // The marker first, then the base: a collector that condemns chunks after this marker
    // exists waits for this backup, and one that condemned them before is seen by it (the
    // gc module of cairn-vault), so the base chosen now stays whole until the commit.
    let writer = vault.begin_point_as(&request.vm, started_at, request.point).await?;
    let (mut previous, mut evidence) = match vault.previous_point(&request.vm).await {
        Ok(found) => found,
        Err(e) => {
            writer.abandon().await;
            return Err(e.into());
        }
    };
    if let Some(base) = &previous {
        match writer.protect_base(base).await {
            Ok(true) => {}
            Ok(false) => {
                evidence.push(Evidence::new(
                    "previous_point_skipped",
                    None,
                    format!(
                        "point {} was purged as this backup began; not used as a base",
                        base.point
                    ),
                ));
                previous = None;
            }
            Err(e) => {
                writer.abandon().await;
                return Err(e.into());
            }
        }
    }
    evidence.extend(request.evidence);
    let point = writer.point().clone();
    tracing::info!(vm = %request.vm, %point, disks = request.disks.len(), "backup started");

    let jobs = request.disks.into_iter().map(|disk| {
        let prev = previous
            .as_ref()
            .and_then(|p| p.disks.get(&disk.name).map(|d| (p.point.clone(), d.clone())));
        let packs = writer.pack_writer();
        backup_disk(vault, packs, disk, prev, request.threads, Arc::clone(&progress), cancel)
    });
    // Disks start in order as earlier ones finish: memory is bounded by the disks in flight.
    let parallel = request.parallel_disks.unwrap_or(DEFAULT_PARALLEL_DISKS).max(1);
    let results: Vec<_> = futures::stream::iter(jobs).buffer_unordered(parallel).collect().await;
    let mut disks = BTreeMap::new();
    let mut first_error = None;
    for result in results {
        match result {
            Ok((name, record, mut ev)) => {
                disks.insert(name, record);
                evidence.append(&mut ev);
            }
            Err(e) => {
                // Keep the most telling error: a real failure over the cancellations it caused.
                if first_error.is_none() || matches!(first_error, Some(Error::Cancelled)) {
                    first_error = Some(e);
                }
            }
        }
    }
    if cancel.is_cancelled() && first_error.is_none() {
        first_error = Some(Error::Cancelled);
    }
    if let Some(e) = first_error {
        writer.abandon().await;
        return Err(e);
    }
    evidence.extend(writer.resume_evidence());
    let manifest = PointManifest {
        format: cairn_format::MANIFEST_FORMAT,
        point,
        vm: request.vm,
        started_at,
        captured_at: request.captured_at.unwrap_or(started_at),
        finished_at: Timestamp::now(),
        consistency: request.consistency,
        disks,
        evidence,
        writer: format!("cairn {}", env!("CARGO_PKG_VERSION")),
        machine: request.machine,
        origin: request.origin,
    };
    let mut changes = vec![];
    if let Some(until) = request.retain_until {
        changes.push(cairn_format::Change::RetainUntil(Some(until)));
    }
    if let Some(tier) = request.snapshot {
        changes.push(cairn_format::Change::Snapshot(Some(tier)));
    }
    if !changes.is_empty()
        && let Err(e) = vault.write_note(&manifest.vm, &manifest.point, "backup", &changes).await
    {
        writer.abandon().await;
        return Err(e.into());
    }
    writer.commit(&manifest).await?;
    tracing::info!(vm = %manifest.vm, point = %manifest.point, "recovery point committed");
    Ok(manifest)
}

/// Compresses (and in an encrypted vault encrypts) changed blocks into chunk frames on the
/// engine's worker threads.
struct FrameEncoder {
    zstd_level: Option<i32>,
    crypto: cairn_format::Crypto,
}

impl BlockEncoder for FrameEncoder {
    type Output = Result<Bytes, cairn_format::Error>;
    fn encode(&self, id: &Digest, block: &[u8]) -> Self::Output {
        let salt = rand::rng().random();
        encode_chunk_in(&self.crypto, id, block, self.zstd_level, salt).map(Bytes::from)
    }
}

async fn backup_disk(
    vault: &Vault,
    packs: PackWriter,
    disk: DiskInput,
    previous: Option<(PointId, DiskRecord)>,
    threads: Option<usize>,
    progress: Arc<dyn Progress>,
    cancel: &Cancel,
) -> Result<(Name, DiskRecord, Vec<Evidence>), Error> {
    let clock = Instant::now();
    let name = disk.name.clone();
    let size = disk.source.size();
    let block_size = vault.config().block_size;
    let mut evidence = Vec::new();
    let full = |why: String| Evidence::new("full_scan", Some(&name), why);
    let base = match previous {
        None => {
            evidence.push(full("no earlier point of this VM has this disk".into()));
            None
        }
        Some((point, rec)) if rec.size != size => {
            evidence.push(full(format!(
                "the disk's size changed from {} to {size} bytes since point {point}",
                rec.size
            )));
            None
        }
        Some((point, rec)) if rec.block_size != block_size => {
            evidence.push(full(format!(
                "point {point} used {}-byte blocks, the vault now uses {block_size}",
                rec.block_size
            )));
            None
        }
        Some(base) => Some(base),
    };
    let mut tracking = match &base {
        Some((point, _)) => tracking_for(&name, point, disk.source.as_ref(), &mut evidence),
        None => None,
    };
    let mut state = DiskState {
        vault,
        packs,
        progress: DiskProgress { disk: Some(name.clone()), size, ..Default::default() },
        chunks_written: 0,
        block_size: u64::from(block_size),
    };
    let (index_root, summary) = loop {
        let mut config = match threads {
            Some(t) => EngineConfig::with_threads(block_size, t),
            None => EngineConfig::new(block_size),
        };
        config.tracking = tracking.clone();
        config.piece_key = vault.piece_key();
        config.ids = vault.crypto().ids().clone();
        let scanned =
            scan_disk(&mut state, &disk, base.as_ref(), config, progress.as_ref(), cancel).await;
        match scanned {
            Err(Error::Disk {
                source: e @ cairn_delta::Error::TrackingMismatch { .. }, ..
            }) if tracking.is_some() => {
                // The tracker lied about a block: nothing it says about this disk is trusted.
                // What the first pass stored stays in the packs and deduplicates the second.
                tracing::warn!(disk = %name, "{e}; scanning every block again");
                evidence.push(Evidence::new(
                    "cbt_fallback",
                    Some(&name),
                    format!("{e}; every block was hashed instead"),
                ));
                tracking = None;
                state.progress.bytes_scanned = 0;
                state.progress.bytes_changed = 0;
            }
            Err(e) => return Err(e),
            Ok((root, summary, failure)) => {
                if let Some(failure) = failure {
                    evidence.push(full(failure));
                }
                break (root, summary);
            }
        }
    };
    state.packs.finish().await?;
    if summary.patches_refused > 0 {
        evidence.push(Evidence::new(
            "patch_refused",
            Some(&name),
            format!(
                "{} changed blocks were stored whole: their piece sums chose a patch, and their \
                 base read back from the vault did not rebuild them with it (a piece-sum \
                 collision, or a damaged base)",
                summary.patches_refused
            ),
        ));
    }
    if tracking.is_some() {
        evidence.push(Evidence::new(
            "cbt",
            Some(&name),
            format!(
                "{} blocks taken unread from the base point as the tracker calls them clean; {} \
                 others it calls clean sampled and re-hashed, all matching",
                summary.carried, summary.sampled
            ),
        ));
    }
    let stats = DiskStats {
        blocks: summary.blocks,
        bytes_scanned: summary.bytes_scanned,
        bytes_changed: summary.bytes_changed,
        bytes_sent: state.progress.bytes_sent,
        bytes_deduplicated: state.progress.bytes_deduplicated,
        chunks_written: state.chunks_written,
        hole_blocks: summary.holes,
        zero_blocks: summary.zeros,
        patched_blocks: summary.patched,
        duration_ms: clock.elapsed().as_millis() as u64,
    };
    state.progress.done = true;
    progress.disk(&state.progress);
    let record = DiskRecord {
        size,
        block_size,
        index_root,
        previous_point: base.map(|(p, _)| p),
        source: disk.source.describe(),
        stats,
    };
    Ok((name, record, evidence))
}

/// One clean block in this many is read and re-hashed on every tracked backup (0.4%): enough
/// to catch a tracker that misses writes without costing what tracking saves.
const SAMPLE_ONE_IN: u64 = 256;

/// The change tracking this disk's scan may use against base point `base`, with the reason in
/// the evidence when the source tracks writes but cannot be trusted this time.
fn tracking_for(
    name: &Name,
    base: &PointId,
    source: &dyn BlockSource,
    evidence: &mut Vec<Evidence>,
) -> Option<Tracked> {
    let fallback = |why: String| Evidence::new("cbt_fallback", Some(name), why);
    match source.change_tracking() {
        ChangeTracking::NotTracked => None,
        ChangeTracking::Unusable(why) => {
            evidence.push(fallback(format!("{why}; every block was hashed")));
            None
        }
        ChangeTracking::Since { since, tracker, .. } if since != *base => {
            evidence.push(fallback(format!(
                "{tracker} records writes since point {since}, but this backup's base is point \
                 {base}; every block was hashed"
            )));
            None
        }
        ChangeTracking::Since { dirty, tracker, .. } => {
            let bytes: u64 = dirty.iter().map(|e| e.len).sum();
            evidence.push(Evidence::new(
                "cbt",
                Some(name),
                format!(
                    "{tracker}: {bytes} bytes in {} ranges written since point {base}",
                    dirty.len()
                ),
            ));
            Some(Tracked {
                dirty: dirty.into(),
                sample_one_in: SAMPLE_ONE_IN,
                seed: rand::random(),
            })
        }
    }
}

/// One pass over a disk: the engine on its own thread, the consumer here. Returns the index
/// root, the scan's totals and, if the previous index failed part-way, why.
async fn scan_disk(
    state: &mut DiskState<'_>,
    disk: &DiskInput,
    base: Option<&(PointId, DiskRecord)>,
    config: EngineConfig,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<(Digest, cairn_delta::ScanSummary, Option<String>), Error> {
    let name = &disk.name;
    let size = disk.source.size();
    // An unreadable previous index means comparing against nothing: every block is read and
    // hashed (tracking carries only blocks that have a previous entry).
    let (prev_index, prev_failure): (Box<dyn PreviousIndex>, _) = match base {
        Some((point, rec)) => match VaultPrevious::start(state.vault, rec).await {
            Ok((p, failure)) => (Box::new(p), failure),
            Err(e) => {
                let why = format!("the index of point {point} is unreadable ({e})");
                (Box::new(NoPrevious), Arc::new(std::sync::Mutex::new(Some(why))))
            }
        },
        None => (Box::new(NoPrevious), Arc::default()),
    };
    let (tx, rx) = mpsc::channel::<Batch<<FrameEncoder as BlockEncoder>::Output>>(2);
    let encoder = FrameEncoder {
        zstd_level: state.vault.config().zstd_level(),
        crypto: state.vault.crypto().clone(),
    };
    let source = Arc::clone(&disk.source);
    let bases = VaultBases::new(state.vault);
    let scan_cancel = cancel.clone();
    // The scan gets its own thread, not one of the runtime's blocking threads: it runs for the
    // whole disk, and the vault's file operations need those threads meanwhile.
    let (done_tx, scan) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("scan-{name}"))
        .spawn(move || {
            let result = cairn_delta::scan(
                source.as_ref(),
                prev_index,
                &bases,
                &encoder,
                &config,
                |batch| {
                    if scan_cancel.is_cancelled() {
                        return Err(cairn_delta::Error::Stopped);
                    }
                    tx.blocking_send(batch).map_err(|_| cairn_delta::Error::Stopped)
                },
            );
            let _ = done_tx.send(result);
        })
        .map_err(|e| Error::Internal(format!("cannot start a scan thread: {e}")))?;

    let consumed = consume(state, rx, size, progress, cancel).await;
    let scanned = scan.await.map_err(|_| Error::Internal("the scan thread died".into()))?;
    // The scan's own failure is the real cause when it has one; a consumer error stops the scan
    // (which then reports `Stopped`), and cancellation stops both.
    let (root, summary) = match (consumed, scanned) {
        _ if cancel.is_cancelled() => return Err(Error::Cancelled),
        (Err(e), Err(cairn_delta::Error::Stopped)) => return Err(e),
        (_, Err(source)) => return Err(Error::Disk { disk: name.clone(), source }),
        (Err(e), Ok(_)) => return Err(e),
        (Ok(root), Ok(summary)) => (root, summary),
    };
    let failure = prev_failure.lock().ok().and_then(|mut f| f.take());
    Ok((root, summary, failure))
}

/// What one disk's consumer has done so far; `progress` doubles as the running totals.
struct DiskState<'a> {
    vault: &'a Vault,
    packs: PackWriter,
    progress: DiskProgress,
    chunks_written: u64,
    block_size: u64,
}

/// Takes the engine's batches in order: builds the index, stores changed blocks (into packs,
/// uploaded in the background as they fill) and index pages; returns the index root's chunk id.
async fn consume(
    state: &mut DiskState<'_>,
    mut rx: mpsc::Receiver<Batch<Result<Bytes, cairn_format::Error>>>,
    size: u64,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<Digest, Error> {
    let config = state.vault.config();
    let mut index = IndexWriter::new(size, config.block_size, config.blocks_per_page)?
        .with_ids(state.vault.crypto().ids().clone());
    while let Some(batch) = rx.recv().await {
        if cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        state.progress.bytes_scanned += batch.bytes_scanned;
        state.progress.position =
            ((batch.first_block + batch.block_count()) * state.block_size).min(size);
        for event in batch.events {
            if let Some(page) = index.push(event.entry()) {
                store_page(state, page).await?;
            }
            if let BlockEvent::Changed { chunk, len, payload, .. } = event {
                state.progress.bytes_changed += u64::from(len);
                let stored = state.packs.store(&chunk, payload?).await?;
                note_stored(state, stored, u64::from(len));
            }
        }
        for page in index.push_holes(batch.trailing_holes) {
            store_page(state, page).await?;
        }
        progress.disk(&state.progress);
    }
    drop(rx);
    if cancel.is_cancelled() {
        return Err(Error::Cancelled);
    }
    let (last, root) = index.finish()?;
    if let Some(page) = last {
        store_page(state, page).await?;
    }
    let root_id = root.digest;
    store_page(state, root).await?;
    Ok(root_id)
}

/// Counts one stored chunk of `len` plaintext bytes: sent if written, deduplicated if present.
fn note_stored(state: &mut DiskState<'_>, stored: Stored, len: u64) {
    match stored {
        Stored::Written(bytes) => {
            state.chunks_written += 1;
            state.progress.bytes_sent += bytes;
        }
        Stored::Present => state.progress.bytes_deduplicated += len,
    }
}

/// Stores an index page or root. A page the vault already holds is the normal case for an
/// unchanged region, not deduplicated disk data, so only writes are counted.
async fn store_page(state: &mut DiskState<'_>, page: EncodedPage) -> Result<(), Error> {
    let (_, stored) = state.packs.store_plain(&page.bytes).await?;
    if let Stored::Written(_) = stored {
        note_stored(state, stored, 0);
    }
    Ok(())
}
