//! Repair: rebuild lost or damaged pack indexes from the packs' own tables.
//!
//! Every pack ends with a table of its chunks (sealed in an encrypted vault). A pack that no
//! readable pack index names (its index was lost, damaged and moved aside by verify, or its
//! backup died before committing) is read whole, each frame its table lists is decoded and
//! checked against its chunk id, and the good ones are listed in one new pack index,
//! `pack-index/<run>.repair`. A table is never trusted on its own: an entry whose frame does
//! not check is left out, so no backup ever deduplicates against it.

use std::collections::HashSet;

use cairn_format::pack::{IndexedPack, decode_pack_index, encode_pack_index};
use cairn_format::{ChunkFrame, Digest, PointId};
use jiff::Timestamp;
use rand::RngExt;

use crate::chunks::PackTable;
use crate::{Error, Vault, layout};

/// What `repair index` found and did.
#[derive(Clone, Debug, Default)]
pub struct RepairReport {
    /// Packs in the vault.
    pub packs: u64,
    /// Packs no readable pack index named.
    pub unindexed: u64,
    /// Of those, packs whose good chunks were indexed again.
    pub recovered_packs: u64,
    /// Chunks indexed again.
    pub recovered_chunks: u64,
    /// Packs or chunks left out, with why: `(pack, why)`.
    pub left_out: Vec<(Digest, String)>,
    /// The pack index written (none in a dry run or when nothing was found).
    pub index: Option<String>,
}

impl Vault {
    /// Rebuilds the pack index of every pack no readable pack index names; see the module
    /// docs. In a dry run, reads and checks but writes nothing.
    pub async fn repair_index(&self, dry_run: bool) -> Result<RepairReport, Error> {
        if dry_run {
            return self.repair_unlocked(true).await;
        }
        self.check_may_delete("repair")?;
        self.take_lease("repair", crate::DEFAULT_STALE_AFTER).await?;
        let result = self.repair_unlocked(false).await;
        self.release_lease().await;
        result
    }

    async fn repair_unlocked(&self, dry_run: bool) -> Result<RepairReport, Error> {
        let mut report = RepairReport::default();
        let packs: Vec<Digest> = self
            .list_paths(&layout::packs())
            .await?
            .iter()
            .filter_map(layout::parse_pack_path)
            .collect();
        report.packs = packs.len() as u64;
        let mut indexed: HashSet<Digest> = HashSet::new();
        for path in self.list_paths(&layout::pack_indexes()).await? {
            let Some(bytes) = self.get_bytes(&path).await? else { continue };
            let decoded = self
                .crypto
                .open("pack index", path.as_ref(), &bytes)
                .and_then(|plain| decode_pack_index(&plain));
            match decoded {
                Ok(list) => indexed.extend(list.iter().map(|p| p.pack)),
                Err(e) => {
                    tracing::warn!(%path, "unreadable pack index, its packs are re-read: {e}")
                }
            }
        }
        // A collector is about to delete these: indexing them again would name dying packs.
        let condemned = self.condemned_packs().await?;
        let mut rebuilt: Vec<IndexedPack> = vec![];
        for pack in packs.into_iter().filter(|p| !indexed.contains(p) && !condemned.contains(p)) {
            report.unindexed += 1;
            let (size, entries) = match self.read_pack_table(&pack).await? {
                PackTable::Gone => continue,
                PackTable::Bad(why) => {
                    report.left_out.push((pack, format!("its table cannot be read: {why}")));
                    continue;
                }
                PackTable::Read(size, entries) => (size, entries),
            };
            if size > self.max_pack_bytes() {
                report
                    .left_out
                    .push((pack, format!("{size} bytes: larger than any pack Cairn writes")));
                continue;
            }
            let Some(bytes) = self.get_bytes(&layout::pack(&pack)).await? else { continue };
            let mut good = vec![];
            for e in entries {
                let frame = bytes.get(e.offset as usize..e.offset as usize + e.len as usize);
                match frame.map(|f| ChunkFrame::decode_in(&self.crypto, f, &e.id)) {
                    Some(Ok(_)) => good.push(e),
                    Some(Err(why)) => {
                        report.left_out.push((pack, format!("chunk {}: {why}", e.id)))
                    }
                    None => report.left_out.push((pack, format!("chunk {}: past the end", e.id))),
                }
            }
            if !good.is_empty() {
                report.recovered_packs += 1;
                report.recovered_chunks += good.len() as u64;
                rebuilt.push(IndexedPack { pack, entries: good });
            }
        }
        if !rebuilt.is_empty() && !dry_run {
            let run = PointId::new(Timestamp::now(), rand::rng().random());
            let path = layout::repair_pack_index(&run);
            self.put_new(&path, encode_pack_index(&rebuilt), "write").await?;
            self.barrier().await?;
            self.reload_chunk_map().await?;
            report.index = Some(path.to_string());
        }
        Ok(report)
    }
}
