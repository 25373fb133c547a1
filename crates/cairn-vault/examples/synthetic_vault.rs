//! Builds a large plaintext vault quickly, to measure prune, gc and the chunk map at scale.
//!
//! ```text
//! cargo run --release -p cairn-vault --example synthetic_vault -- PATH VMS POINTS BLOCKS CHURN [DISKS]
//! ```
//! Each of `VMS` VMs gets `POINTS` daily points (the newest today) of `DISKS` disks (one by
//! default) of `BLOCKS` 64 KiB blocks each. The first point's blocks are all new; each later point changes a `CHURN`
//! fraction of them (0.03 is 3%). Chunks are tiny (a block's number and version, not 64 KiB
//! of data), so ten million of them take a minute and a gigabyte, but every one is a real
//! chunk in a real pack, named by real pack indexes and index pages, committed through the
//! vault's own point writer: what prune, gc and a backup's chunk map read is what they read
//! in a vault of that many 64 KiB blocks. (Verify is measured on real data instead: it checks
//! each chunk against its block, which these are not.)
//! Unique chunks: about `VMS * DISKS * BLOCKS * (1 + CHURN * (POINTS - 1))`.

use std::collections::BTreeMap;

use cairn_format::index::{BlockEntry, IndexWriter};
use cairn_format::{Consistency, DiskRecord, MANIFEST_FORMAT, Name, PointManifest};
use cairn_vault::{PackWriter, Vault};
use rand::{RngExt, SeedableRng};

const BLOCK: u32 = 65536;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (path, vms, points, blocks, churn, disks) = match args.as_slice() {
        [path, vms, points, blocks, churn] => (path, vms, points, blocks, churn, "1"),
        [path, vms, points, blocks, churn, disks] => (path, vms, points, blocks, churn, &**disks),
        _ => return Err("usage: synthetic_vault PATH VMS POINTS BLOCKS CHURN [DISKS]".into()),
    };
    let (vms, points, blocks): (u32, u32, u64) = (vms.parse()?, points.parse()?, blocks.parse()?);
    let (churn, disks): (f64, usize) = (churn.parse()?, disks.parse()?);
    let disk_names: Vec<Name> = (0..disks)
        .map(|d| format!("sd{}", (b'a' + (d % 26) as u8) as char).parse())
        .collect::<Result<_, _>>()?;
    let vault = Vault::create(path, BLOCK).await?;
    let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(1);
    let today = jiff::Timestamp::now();
    let mut chunks = 0u64;
    for vm in 0..vms {
        let name: Name = format!("vm-{vm:04}").parse()?;
        // Each disk's blocks' current versions; a changed block gets the next one.
        let mut versions = vec![vec![0u32; blocks as usize]; disks];
        for p in 0..points {
            if p > 0 {
                for v in versions.iter_mut().flatten() {
                    if rng.random_bool(churn) {
                        *v += 1;
                    }
                }
            }
            let at = today - jiff::SignedDuration::from_hours(24 * i64::from(points - 1 - p));
            chunks += commit(&vault, &name, at, &disk_names, &versions).await?;
        }
        eprintln!("{name}: {points} points, {chunks} chunks so far");
    }
    println!("{vms} VMs x {points} points, {blocks} blocks each: {chunks} unique data chunks");
    Ok(())
}

/// Commits one point whose disk `d`'s block `i` holds version `versions[d][i]`; stores the
/// blocks that are new (all of them in a first point). Returns how many it stored.
async fn commit(
    vault: &Vault,
    vm: &Name,
    at: jiff::Timestamp,
    disk_names: &[Name],
    versions: &[Vec<u32>],
) -> Result<u64, Box<dyn std::error::Error>> {
    let writer = vault.begin_point(vm, at).await?;
    let mut packs = writer.pack_writer();
    let mut disks = BTreeMap::new();
    let mut stored = 0u64;
    for (disk, versions) in disk_names.iter().zip(versions) {
        let (record, n) = store_disk(&mut packs, vm, disk, versions).await?;
        disks.insert(disk.clone(), record);
        stored += n;
    }
    packs.finish().await?;
    let manifest = PointManifest {
        format: MANIFEST_FORMAT,
        point: writer.point().clone(),
        vm: vm.clone(),
        started_at: at,
        captured_at: at,
        finished_at: at,
        consistency: Consistency::None,
        disks,
        evidence: vec![],
        writer: "synthetic_vault example".into(),
        machine: None,
        origin: None,
    };
    writer.commit(&manifest).await?;
    Ok(stored)
}

/// Stores one disk's new blocks, its index pages and root; returns its record and how many
/// blocks it stored.
async fn store_disk(
    packs: &mut PackWriter,
    vm: &Name,
    disk: &Name,
    versions: &[u32],
) -> Result<(DiskRecord, u64), Box<dyn std::error::Error>> {
    let size = versions.len() as u64 * u64::from(BLOCK);
    let mut index = IndexWriter::new(size, BLOCK, cairn_format::index::DEFAULT_BLOCKS_PER_PAGE)?;
    let mut stored = 0u64;
    for (i, v) in versions.iter().enumerate() {
        // Stored once: the pack writer skips what the vault already holds.
        let block = format!("{vm} {disk} block {i} version {v}");
        let (id, written) = packs.store_plain(block.as_bytes()).await?;
        stored += u64::from(matches!(written, cairn_vault::Stored::Written(_)));
        if let Some(page) = index.push(BlockEntry::data(id)) {
            packs.store_plain(&page.bytes).await?;
        }
    }
    let (last, root) = index.finish()?;
    if let Some(page) = last {
        packs.store_plain(&page.bytes).await?;
    }
    packs.store_plain(&root.bytes).await?;
    let record = DiskRecord {
        size,
        block_size: BLOCK,
        index_root: root.digest,
        previous_point: None,
        source: "synthetic".into(),
        stats: Default::default(),
    };
    Ok((record, stored))
}
