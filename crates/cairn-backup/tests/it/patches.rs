//! Sub-block deltas end to end: scattered writes stored as patches, restored and verified,
//! chains rebased at their bound, and a damaged base found.

use std::os::unix::fs::FileExt;

use cairn_format::PointManifest;
use cairn_format::index::BlockEntry;
use cairn_vault::Vault;

use crate::support::*;

/// Every block entry of one disk of a point, in order.
async fn entries(vault: &Vault, m: &PointManifest, disk: &str) -> Vec<BlockEntry> {
    let root = vault.read_index_root(&m.disks[&name(disk)].index_root).await.unwrap();
    let mut out = Vec::new();
    for page_id in root.page_digests() {
        out.extend(vault.read_index_page(&page_id).await.unwrap().entries());
    }
    out
}

/// A 1 MiB disk with no zero block, as a file in the fixture.
fn patterned_disk(f: &Fixture) -> std::path::PathBuf {
    let disk = f.path("d.raw");
    let content: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8 | 1).collect();
    std::fs::write(&disk, &content).unwrap();
    disk
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scattered_writes_are_stored_as_patches_and_restore_identically() {
    let f = Fixture::new(65536).await;
    let disk = f.sample("d.raw", 64 << 20, 5);
    let pristine = f.path("d.orig");
    std::fs::copy(&disk, &pristine).unwrap();
    let full = f.backup("vm", &[("sda", &disk)]).await.unwrap();

    let written = cairn_sample::mutate_scattered(&disk, 0.01, 6).unwrap() * 4096;
    let before = dir_size(&f.vault_dir());
    let incr = f.backup("vm", &[("sda", &disk)]).await.unwrap();
    let growth = dir_size(&f.vault_dir()) - before;
    let stats = &incr.disks[&name("sda")].stats;
    assert!(stats.patched_blocks > 0, "{stats:?}");
    // Patches, the rewritten index page, the pack index and the manifest: at most twice what
    // was written (whole 64 KiB blocks would be about 10x).
    assert!(growth <= 2 * written, "{growth} bytes stored for {written} written");

    let patched = entries(&f.vault, &incr, "sda").await;
    let patches = patched.iter().filter(|e| matches!(e, BlockEntry::Patch(_))).count() as u64;
    assert_eq!(patches, stats.patched_blocks);

    f.restore(&incr, "sda", &f.path("r-incr.raw")).await.unwrap();
    assert!(same(&disk, &f.path("r-incr.raw")));
    f.restore(&full, "sda", &f.path("r-full.raw")).await.unwrap();
    assert!(same(&pristine, &f.path("r-full.raw")));

    // A hash-scan backup of the same disk into a fresh vault restores to the same bytes, and
    // names the same content for every block.
    let g = Fixture::new(65536).await;
    let plain = g.backup("vm", &[("sda", &disk)]).await.unwrap();
    g.restore(&plain, "sda", &g.path("r-plain.raw")).await.unwrap();
    assert!(same(&f.path("r-incr.raw"), &g.path("r-plain.raw")));
    let contents = |es: &[BlockEntry]| es.iter().map(|e| e.content().copied()).collect::<Vec<_>>();
    assert_eq!(contents(&patched), contents(&entries(&g.vault, &plain, "sda").await));

    let report = f.verify().await;
    assert!(report.is_clean(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_chain_at_its_bound_is_rebased() {
    let f = Fixture::new(65536).await;
    let disk = patterned_disk(&f);
    let first = f.backup("vm", &[("sda", &disk)]).await.unwrap();
    let first_base = *entries(&f.vault, &first, "sda").await[0].content().unwrap();

    let file = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    let bound = cairn_delta::DEFAULT_PATCH_GENERATIONS;
    let mut generations = Vec::new();
    let mut points = Vec::new();
    for round in 0..=u32::from(bound) + 1 {
        // The same 4 KiB piece of block 0 changes every time.
        file.write_all_at(&[round as u8 + 7; 4096], 8192).unwrap();
        let m = f.backup("vm", &[("sda", &disk)]).await.unwrap();
        let copy = f.path(&format!("d.{round}"));
        std::fs::copy(&disk, &copy).unwrap();
        generations.push(match entries(&f.vault, &m, "sda").await[0] {
            BlockEntry::Patch(p) => {
                assert_eq!(p.base == first_base, round < u32::from(bound), "round {round}");
                p.generation
            }
            _ => 0,
        });
        points.push((m, copy));
    }
    // Patches over the first base up to the bound, then the block whole, then a patch over it.
    let expected: Vec<u8> = (1..=bound).chain([0, 1]).collect();
    assert_eq!(generations, expected);

    // Every point of the chain restores to the disk as it was.
    for (i, (m, copy)) in points.iter().enumerate().step_by(4) {
        let to = f.path(&format!("r.{i}"));
        f.restore(m, "sda", &to).await.unwrap();
        assert!(same(copy, &to), "point {i}");
    }
    assert!(f.verify_clean().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_base_damages_every_point_patched_over_it() {
    let f = Fixture::new(65536).await;
    let disk = patterned_disk(&f);
    let full = f.backup("vm", &[("sda", &disk)]).await.unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    file.write_all_at(&[9u8; 4096], 65536 * 3).unwrap();
    let incr = f.backup("vm", &[("sda", &disk)]).await.unwrap();
    let BlockEntry::Patch(p) = entries(&f.vault, &incr, "sda").await[3] else {
        panic!("block 3 should be a patch");
    };

    // Flip one byte of the base's stored frame.
    let loc = f.vault.locate_chunk(&p.base).await.unwrap().unwrap();
    let hex = loc.pack.to_hex();
    let pack = f.vault_dir().join("packs").join(&hex[..2]).join(hex);
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[loc.offset as usize + 40] ^= 0x40;
    std::fs::write(&pack, bytes).unwrap();

    let err = f.restore(&incr, "sda", &f.path("r.raw")).await.unwrap_err();
    assert!(err.to_string().contains(&p.base.to_hex()[..12]), "{err}");
    let report = f.verify().await;
    let bad: Vec<_> = report.bad_chunks.iter().map(|b| b.id).collect();
    assert_eq!(bad, vec![p.base]);
    let damaged: Vec<_> = report.damaged_points.iter().map(|(_, point)| point.clone()).collect();
    assert_eq!(damaged, vec![full.point.clone(), incr.point.clone()]);
}

/// A patch entry whose block digest does not match what base and patch rebuild: what a
/// piece-sum collision would leave. Written by hand through the vault's own API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_that_does_not_rebuild_its_block_is_caught() {
    use cairn_format::Digest;
    use cairn_format::index::{IndexWriter, PatchRef};
    use cairn_format::patch::{PieceSums, encode_patch};

    let f = Fixture::new(65536).await;
    let base = vec![5u8; 65536];
    let mut new = base.clone();
    new[..4096].fill(6);
    let patch = encode_patch(&new, 4096, 1);
    let (base_id, patch_id) = (Digest::of(&base), Digest::of(&patch));
    let mut index = IndexWriter::new(65536, 65536, 1024).unwrap();
    let wrong = Digest::of(b"not the rebuilt block");
    assert!(
        index
            .push(BlockEntry::Patch(PatchRef {
                digest: wrong,
                base: base_id,
                patch: patch_id,
                generation: 1,
                base_sums: PieceSums::of(&base, 4096, &f.vault.config().piece_key()),
            }))
            .is_none()
    );
    let (last, root) = index.finish().unwrap();
    let page = last.unwrap().bytes;
    let manifest = commit_by_hand(&f, "vm", 65536, &[&base, &patch, &page], &root.bytes).await;
    let vm = name("vm");

    let err = f.restore(&manifest, "sda", &f.path("r.raw")).await.unwrap_err();
    assert!(err.to_string().contains(&wrong.to_hex()), "{err}");
    assert!(!f.path("r.raw").exists(), "a failed restore must not leave the target");
    let report = f.verify().await;
    let bad: Vec<_> = report.bad_chunks.iter().map(|b| (b.id, b.reason.clone())).collect();
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(bad[0].0, patch_id);
    assert!(bad[0].1.contains("does not rebuild"), "{}", bad[0].1);
    assert_eq!(report.damaged_points, vec![(vm, manifest.point.clone())]);
}
