//! Copy: points from one vault into another (a second copy off site; the way from a
//! plaintext vault into an encrypted one), each under its own id, uploading only the chunks
//! the target lacks.
//!
//! Between two plaintext vaults chunk ids are the same (SHA-256), so a chunk the target holds
//! is neither read nor sent, and an unchanged disk index copies page for page. Into or out of
//! an encrypted vault the ids differ (they are keyed per vault): every block of the point is
//! read from the source and named again, and only those the target lacks are uploaded.
//! Patched blocks are stored whole in the target unless both vaults share ids and piece-sum
//! keys. A point copied is committed in the target like a backup (marker, packs, pack index,
//! manifest), with `copy` evidence naming where it came from.

use cairn_format::index::{BlockEntry, IndexWriter};
use cairn_format::patch::PieceSums;
use cairn_format::{DiskRecord, Evidence, Name, PointId, PointManifest};
use cairn_vault::{PackWriter, Vault};

use crate::Error;

/// Which points to copy.
#[derive(Clone, Debug, Default)]
pub struct CopyOptions {
    /// Only this VM's points.
    pub vm: Option<Name>,
    /// Only this point (copied even if soft-deleted in the source).
    pub point: Option<PointId>,
}

/// What a copy did.
#[derive(Clone, Debug, Default)]
pub struct CopyReport {
    /// Points copied.
    pub copied: Vec<(Name, PointId)>,
    /// Points the target holds already.
    pub present: Vec<(Name, PointId)>,
    /// Chunks read from the source.
    pub chunks_read: u64,
    /// Chunks the target lacked, uploaded.
    pub chunks_sent: u64,
    /// Their stored bytes.
    pub bytes_sent: u64,
}

/// Copies the chosen points of `from` into `to`, oldest first; see the module docs.
pub async fn copy_points(
    from: &Vault,
    to: &Vault,
    options: &CopyOptions,
) -> Result<CopyReport, Error> {
    let listing = from.list_points(options.vm.as_ref()).await?;
    if let Some(u) = listing.unreadable.first() {
        tracing::warn!(point = %u.point, "not copied: its manifest cannot be read ({})", u.error);
    }
    let states = from.point_states(options.vm.as_ref()).await?;
    let mut chosen: Vec<PointManifest> = match &options.point {
        Some(id) => {
            let vm = options.vm.as_ref().ok_or_else(|| {
                Error::InvalidRequest("copying one point needs its VM (--vm)".into())
            })?;
            vec![from.read_point(vm, id).await?]
        }
        None => listing
            .points
            .into_iter()
            .filter(|m| states.get(&m.vm, &m.point).is_ok_and(|s| s.deleted.is_none()))
            .collect(),
    };
    chosen.sort_by(|a, b| (&a.point, &a.vm).cmp(&(&b.point, &b.vm)));
    let mut report = CopyReport::default();
    for m in chosen {
        match to.read_point(&m.vm, &m.point).await {
            Ok(_) => {
                report.present.push((m.vm.clone(), m.point.clone()));
                continue;
            }
            Err(cairn_vault::Error::PointNotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        copy_point(from, to, &m, &mut report).await?;
        report.copied.push((m.vm.clone(), m.point.clone()));
    }
    Ok(report)
}

async fn copy_point(
    from: &Vault,
    to: &Vault,
    m: &PointManifest,
    report: &mut CopyReport,
) -> Result<(), Error> {
    let writer = to.begin_point_with_id(&m.vm, m.started_at, &m.point).await?;
    let mut disks = std::collections::BTreeMap::new();
    let mut failed = None;
    for (name, disk) in &m.disks {
        let mut packs = writer.pack_writer();
        let copied = copy_disk(from, to, disk, &mut packs, report).await;
        let finished = packs.finish().await;
        match copied.and_then(|root| finished.map(|()| root).map_err(Error::from)) {
            Ok(root) => {
                disks.insert(name.clone(), DiskRecord { index_root: root, ..disk.clone() });
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    if let Some(e) = failed {
        writer.discard().await;
        return Err(e);
    }
    let mut evidence = m.evidence.clone();
    evidence.push(Evidence::new(
        "copy",
        None,
        format!(
            "copied from {} by cairn {} at {}",
            from.url(),
            env!("CARGO_PKG_VERSION"),
            jiff::Timestamp::now()
        ),
    ));
    let manifest = PointManifest { disks, evidence, ..m.clone() };
    writer.commit(&manifest).await?;
    Ok(())
}

/// Copies one disk's index and the chunks it names; returns the target's index root.
async fn copy_disk(
    from: &Vault,
    to: &Vault,
    disk: &DiskRecord,
    packs: &mut PackWriter,
    report: &mut CopyReport,
) -> Result<cairn_format::Digest, Error> {
    let same_ids = !from.is_encrypted() && !to.is_encrypted();
    let same_sums = same_ids && from.piece_key() == to.piece_key();
    let root = from.read_disk_index(disk).await?;
    let mut index = IndexWriter::new(root.disk_size, root.block_size, root.blocks_per_page)?
        .with_ids(to.crypto().ids().clone());
    for (page_id, count) in &root.pages {
        let page = from.read_index_page(page_id).await?;
        let mut entries = Vec::with_capacity(page.block_count() as usize);
        for entry in page.entries() {
            entries.push(copy_entry(from, entry, packs, same_ids, same_sums, report).await?);
        }
        for _ in 0..*count {
            for entry in &entries {
                if let Some(page) = index.push(*entry) {
                    packs.store_plain(&page.bytes).await?;
                }
            }
        }
    }
    let (last, root) = index.finish()?;
    if let Some(page) = last {
        packs.store_plain(&page.bytes).await?;
    }
    let (id, _) = packs.store_plain(&root.bytes).await?;
    Ok(id)
}

/// One block's entry in the target, its chunks stored there if the target lacks them.
async fn copy_entry(
    from: &Vault,
    entry: BlockEntry,
    packs: &mut PackWriter,
    same_ids: bool,
    same_sums: bool,
    report: &mut CopyReport,
) -> Result<BlockEntry, Error> {
    match entry {
        BlockEntry::Hole | BlockEntry::Zero => Ok(entry),
        BlockEntry::Patch(p) if same_sums => {
            for id in [p.base, p.patch] {
                copy_chunk(from, &id, packs, report).await?;
            }
            Ok(entry)
        }
        BlockEntry::Data { digest, sums } if same_ids => {
            copy_chunk(from, &digest, packs, report).await?;
            let sums = if same_sums { sums } else { PieceSums::NONE };
            Ok(BlockEntry::Data { digest, sums })
        }
        BlockEntry::Data { digest, .. } => {
            let plain = from.read_chunk(&digest).await?;
            report.chunks_read += 1;
            Ok(BlockEntry::data(store(packs, &plain, report).await?))
        }
        BlockEntry::Patch(p) => {
            let plain = from.rebuild_patched(&p).await?;
            report.chunks_read += 2;
            Ok(BlockEntry::data(store(packs, &plain, report).await?))
        }
    }
}

/// Copies chunk `id` (same ids in both vaults) unless the target holds it.
async fn copy_chunk(
    from: &Vault,
    id: &cairn_format::Digest,
    packs: &mut PackWriter,
    report: &mut CopyReport,
) -> Result<(), Error> {
    if packs.holds(id) {
        return Ok(());
    }
    let plain = from.read_chunk(id).await?;
    report.chunks_read += 1;
    store(packs, &plain, report).await?;
    Ok(())
}

async fn store(
    packs: &mut PackWriter,
    plain: &[u8],
    report: &mut CopyReport,
) -> Result<cairn_format::Digest, Error> {
    let (id, stored) = packs.store_plain(plain).await?;
    if let cairn_vault::Stored::Written(bytes) = stored {
        report.chunks_sent += 1;
        report.bytes_sent += bytes;
    }
    Ok(id)
}
