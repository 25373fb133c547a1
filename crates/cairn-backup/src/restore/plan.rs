//! What a restore reads: each index page becomes ranged reads of adjacent frames, and each
//! read becomes checked blocks.

use std::fs::File;
use std::sync::Arc;

use cairn_format::index::{BlockEntry, PatchRef};
use cairn_format::{ChunkFrame, Digest, Name};
use cairn_vault::{ChunkLocation, Vault};

use super::Damage;
use crate::Error;

/// Frames adjacent in one pack are fetched with one ranged read of at most this many bytes.
const MAX_RUN_BYTES: u64 = 8 << 20;

/// How one disk is restored, as far as planning its reads goes.
pub(crate) struct Plan {
    /// Bytes per block, and the disk's size.
    pub block: u64,
    pub size: u64,
    /// The target has old contents: zero ranges must be written (a device, or in place).
    pub zeros: bool,
    /// In place: the target, read to find the blocks it already holds.
    pub existing: Option<Arc<File>>,
    /// Record damaged blocks and go on, instead of stopping at the first.
    pub keep_going: bool,
}

/// One block of data to restore, and where its chunk is stored.
pub(crate) struct Piece {
    at: u64,
    len: u64,
    /// The chunk read: the block, or the base of a patched block.
    id: Digest,
    loc: ChunkLocation,
    /// For a patched block: the entry whose patch goes over the base.
    patch: Option<PatchRef>,
}

/// One read that fills part of the disk.
pub(crate) enum Read {
    /// Blocks whose frames lie back to back in one pack: one ranged read.
    Run(Vec<Piece>),
    /// Zeros over a range of a target that had something there.
    Zeros { at: u64, len: u64 },
}

/// What one page comes to.
#[derive(Default)]
pub(crate) struct PagePlan {
    pub reads: Vec<Read>,
    /// Blocks the target already holds (in place).
    pub kept: u64,
    /// Blocks that cannot be restored (their chunk is missing), when going on regardless.
    pub damaged: Vec<Damage>,
}

/// Whether an error is damage to one block's data, which `--keep-going` records and steps
/// over; anything else (an unreachable backend, a full target) stops the restore.
pub(crate) fn is_damage(e: &Error) -> bool {
    matches!(
        e,
        Error::Corrupt { .. }
            | Error::Vault(
                cairn_vault::Error::Corrupt { .. }
                    | cairn_vault::Error::ChunkMissing { .. }
                    | cairn_vault::Error::ChunkTruncated { .. }
            )
    )
}

/// The reads for one page starting at disk offset `base`: data blocks grouped into runs of
/// frames that are adjacent in one pack. The page's frames are taken in pack and offset
/// order, not disk order: a full backup writes a disk's blocks into packs in disk order, and
/// an encrypted vault shuffles them within each pack, so pack order is what keeps reads
/// large either way. A patched block reads its base in the run (the base usually sits where
/// the full backup put the block) and its small patch on the side.
pub(crate) async fn plan_page(
    vault: &Vault,
    plan: &Plan,
    page: &cairn_format::index::IndexPage,
    base: u64,
) -> Result<PagePlan, Error> {
    let (block, size) = (plan.block, plan.size);
    let entries: Vec<BlockEntry> = page.entries().collect();
    let there = match &plan.existing {
        Some(target) => {
            let (target, crypto, entries) =
                (Arc::clone(target), vault.crypto().clone(), entries.clone());
            tokio::task::spawn_blocking(move || {
                super::in_place::already_there(&target, crypto.ids(), &entries, base, block, size)
            })
            .await?
            .map_err(|source| Error::Target { path: "the in-place target".into(), source })?
        }
        None => Vec::new(),
    };
    let mut out = PagePlan::default();
    let wanted = |i: usize| !there.get(i).copied().unwrap_or(false);
    let ids: Vec<Digest> = entries
        .iter()
        .enumerate()
        .filter(|(i, _)| wanted(*i))
        .filter_map(|(_, e)| match e {
            BlockEntry::Data { digest, .. } => Some(*digest),
            BlockEntry::Patch(p) => Some(p.base),
            BlockEntry::Hole | BlockEntry::Zero => None,
        })
        .collect();
    let mut places = vault.locate_chunks(&ids).await?.into_iter();
    let mut pieces: Vec<Piece> = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let at = base + i as u64 * block;
        let len = block.min(size.saturating_sub(at));
        if !wanted(i) {
            out.kept += 1;
            continue;
        }
        let (id, patch) = match entry {
            BlockEntry::Data { digest, .. } => (*digest, None),
            BlockEntry::Patch(p) => (p.base, Some(*p)),
            BlockEntry::Hole | BlockEntry::Zero => {
                if plan.zeros {
                    out.reads.push(Read::Zeros { at, len });
                }
                continue;
            }
        };
        match places.next().flatten() {
            Some(loc) => pieces.push(Piece { at, len, id, loc, patch }),
            None if plan.keep_going => {
                let e = cairn_vault::Error::ChunkMissing { id };
                out.damaged.push(Damage { offset: at, len, detail: e.to_string() });
                if plan.zeros {
                    // What the target held there is not the point's: it reads zeros.
                    out.reads.push(Read::Zeros { at, len });
                }
            }
            None => return Err(cairn_vault::Error::ChunkMissing { id }.into()),
        }
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
            out.reads.push(Read::Run(std::mem::take(&mut run)));
        }
        run.push(piece);
    }
    if !run.is_empty() {
        out.reads.push(Read::Run(run));
    }
    Ok(out)
}

/// What one read gave.
#[derive(Default)]
pub(crate) struct Filled {
    /// Checked blocks (offset, bytes), in disk order.
    pub blocks: Vec<(u64, Vec<u8>)>,
    /// Zero ranges to write.
    pub zeros: Option<(u64, u64)>,
    /// Chunks read and checked.
    pub chunks: u64,
    /// Blocks stepped over, when going on regardless.
    pub damaged: Vec<Damage>,
}

/// Performs one read.
pub(crate) async fn read_blocks(
    vault: &Vault,
    disk: &Name,
    read: Read,
    keep_going: bool,
) -> Result<Filled, Error> {
    let run = match read {
        Read::Zeros { at, len } => {
            return Ok(Filled { zeros: Some((at, len)), ..Default::default() });
        }
        Read::Run(run) => run,
    };
    // Patches are small: fetched (and checked) beside the run, all at once.
    let patches: Vec<Result<Vec<u8>, Error>> =
        futures::future::join_all(run.iter().filter_map(|p| {
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
        .await;
    if !keep_going && let Some(Err(_)) = patches.iter().find(|p| p.is_err()) {
        let first = patches.into_iter().find_map(Result::err);
        return Err(first.unwrap_or_else(|| Error::Internal("a patch read failed".into())));
    }
    let (Some(first), Some(last)) = (run.first(), run.last()) else {
        return Ok(Filled::default());
    };
    let start = first.loc.offset;
    let span = ChunkLocation {
        pack: first.loc.pack,
        offset: start,
        len: (u64::from(last.loc.offset) + u64::from(last.loc.len) - u64::from(start)) as u32,
    };
    let frames: Vec<Result<bytes::Bytes, Error>> = match vault.read_frame(&first.id, &span).await {
        Ok(bytes) => run
            .iter()
            .map(|p| {
                let from = (p.loc.offset - start) as usize;
                Ok(bytes.slice(from.min(bytes.len())..(from + p.loc.len as usize).min(bytes.len())))
            })
            .collect(),
        // The pack went away under the restore (a collector repacked it), or part of it is
        // damaged: each chunk is read again, from the place a fresh chunk map gives.
        Err(e @ cairn_vault::Error::ChunkMissing { .. })
        | Err(e @ cairn_vault::Error::Corrupt { .. })
            if keep_going || matches!(e, cairn_vault::Error::ChunkMissing { .. }) =>
        {
            let mut frames = Vec::with_capacity(run.len());
            for p in &run {
                match vault.read_chunk_raw(&p.id).await.map_err(Error::from) {
                    Err(e) if !keep_going || !is_damage(&e) => return Err(e),
                    got => frames.push(got),
                }
            }
            frames
        }
        Err(e) => return Err(e.into()),
    };
    let disk = disk.clone();
    let crypto = vault.crypto().clone();
    tokio::task::spawn_blocking(move || {
        let mut out = Filled { chunks: (run.len() + patches.len()) as u64, ..Default::default() };
        let mut patches = patches.into_iter();
        for (p, raw) in run.into_iter().zip(frames) {
            let corrupt = |detail: String| Error::Corrupt {
                disk: disk.clone(),
                offset: p.at,
                id: p.id,
                detail,
            };
            // One patch was fetched per patched piece, in order.
            let patch = p.patch.map(|entry| (entry, patches.next()));
            let block = raw.and_then(|raw| {
                let frame = ChunkFrame::decode_in(&crypto, &raw, &p.id)
                    .map_err(|e| corrupt(e.to_string()))?;
                let block = match patch {
                    Some((entry, patch)) => {
                        let patch = patch.unwrap_or_else(|| Ok(Vec::new()))?;
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
                Ok(block)
            });
            match block {
                Ok(block) => out.blocks.push((p.at, block)),
                Err(e) if keep_going && is_damage(&e) => {
                    out.damaged.push(Damage { offset: p.at, len: p.len, detail: e.to_string() });
                }
                Err(e) => return Err(e),
            }
        }
        // In disk order, so that the writer gathers neighbours into large writes.
        out.blocks.sort_unstable_by_key(|(at, _)| *at);
        Ok(out)
    })
    .await?
}
