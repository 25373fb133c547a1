//! The attacks of a hostile guest, a hostile vault and a careless host, each reproduced.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use cairn_backup::{NoProgress, RestoreOptions};
use cairn_format::index::{IndexPage, IndexRoot};
use cairn_format::{Digest, PointManifest};

use crate::support::*;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o777
}

/// Restore never writes through a link planted at its partial file's name, nor through a
/// target that is a link to a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_link_never_makes_restore_overwrite_another_file() {
    let f = Fixture::new(65536).await;
    let a = f.sample("a.raw", 2 << 20, 1);
    let m = f.backup("vm", &[("sda", &a)]).await.unwrap();
    let victim = f.path("shadow");
    std::fs::write(&victim, b"root:secret").unwrap();

    let target = f.path("restored.raw");
    std::os::unix::fs::symlink(&victim, f.path("restored.raw.cairn-partial")).unwrap();
    f.restore(&m, "sda", &target).await.unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"root:secret");
    assert!(same(&a, &target));
    assert!(!f.path("restored.raw.cairn-partial").exists());

    let link = f.path("link.raw");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let opts = RestoreOptions { force: true, ..Default::default() };
    let err =
        cairn_backup::restore_disk(&f.vault, &m, &name("sda"), &link, &opts, Arc::new(NoProgress))
            .await
            .unwrap_err();
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"root:secret");
}

/// A vault's root is 0700, everything in it 0600, and restored images 0600, whatever the
/// umask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vaults_and_restored_images_are_private_whatever_the_umask() {
    let old = rustix::process::umask(rustix::fs::Mode::empty());
    let f = Fixture::new(65536).await;
    let a = f.sample("a.raw", 4 << 20, 2);
    let m = f.backup("vm", &[("sda", &a)]).await.unwrap();
    f.restore(&m, "sda", &f.path("r.raw")).await.unwrap();
    let all = f.path("all");
    cairn_backup::restore_point(
        &f.vault,
        &m,
        &all,
        &RestoreOptions::default(),
        Arc::new(NoProgress),
    )
    .await
    .unwrap();
    rustix::process::umask(old);

    assert_eq!(mode(&f.vault_dir()), 0o700);
    let mut files = 0;
    let mut stack = vec![f.vault_dir()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files += 1;
                assert_eq!(mode(&path), 0o600, "{}", path.display());
            }
        }
    }
    assert!(files >= 4, "config, pack, pack index and manifest at least: {files}");
    assert_eq!(mode(&f.path("r.raw")), 0o600);
    assert_eq!(mode(&all), 0o700);
    assert_eq!(mode(&all.join("sda")), 0o600);
}

/// Commits a point whose disk `sda` is `size` bytes by its manifest and has `root` as its
/// index root (a page of one hole is stored too), as a hostile writer of the vault could.
async fn commit_crafted(f: &Fixture, vm: &str, size: u64, root: &IndexRoot) -> PointManifest {
    let mut page = IndexPage::default();
    page.push(cairn_format::index::BlockEntry::Hole);
    commit_by_hand(f, vm, size, &[&page.encode()], &root.encode()).await
}

/// An index root that claims an enormous disk of one repeated page is refused by restore and
/// by the next backup's previous-index reader, instead of being expanded in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crafted_index_root_cannot_exhaust_memory() {
    let f = Fixture::new(65536).await;
    let mut page = IndexPage::default();
    page.push(cairn_format::index::BlockEntry::Hole);
    let huge = 1u64 << 60;
    let root = IndexRoot {
        disk_size: huge,
        block_size: 65536,
        blocks_per_page: 1,
        pages: vec![(Digest::of(&page.encode()), huge / 65536)],
    };
    let m = commit_crafted(&f, "vm", 1 << 20, &root).await;
    let err = f.restore(&m, "sda", &f.path("r.raw")).await.unwrap_err();
    assert!(err.to_string().contains("describes a disk of"), "{err}");
    let left: Vec<_> = std::fs::read_dir(f.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("r.raw"))
        .collect();
    assert!(left.is_empty(), "a failed restore leaves nothing behind: {left:?}");

    // The next backup of a 1 MiB disk takes the crafted point as its base, refuses its index,
    // and scans in full.
    let a = f.sample("a.raw", 1 << 20, 3);
    let next = f.backup("vm", &[("sda", &a)]).await.unwrap();
    let why: Vec<&str> = next
        .evidence
        .iter()
        .filter(|e| e.kind == "full_scan")
        .map(|e| e.message.as_str())
        .collect();
    assert!(why.iter().any(|w| w.contains("describes a disk of")), "{why:?}");
    f.restore(&next, "sda", &f.path("r2.raw")).await.unwrap();
    assert!(same(&a, &f.path("r2.raw")));

    // Verify calls the crafted point damaged, and only it; its chunks are sound and may be
    // shared, so nothing is quarantined.
    let report = f.verify().await;
    assert_eq!(report.damaged_points, vec![(name("vm"), m.point.clone())]);
    assert!(report.bad_chunks.is_empty(), "{:?}", report.bad_chunks);
    assert_eq!(report.inconsistent.len(), 1, "{:?}", report.inconsistent);
    assert!(!f.vault_dir().join("quarantine").exists());
}

/// A page that covers fewer blocks than its place in the index would shift every later entry
/// onto the wrong block: refused by restore and by the next backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_that_does_not_cover_its_place_is_refused() {
    let f = Fixture::new(65536).await;
    let mut short = IndexPage::default();
    short.push(cairn_format::index::BlockEntry::Hole);
    // 16 blocks of 64 KiB, two pages of 8 blocks: the first page covers only one.
    let root = IndexRoot {
        disk_size: 1 << 20,
        block_size: 65536,
        blocks_per_page: 8,
        pages: vec![(Digest::of(&short.encode()), 2)],
    };
    let m = commit_crafted(&f, "vm", 1 << 20, &root).await;
    let err = f.restore(&m, "sda", &f.path("r.raw")).await.unwrap_err();
    assert!(err.to_string().contains("covers 1 blocks"), "{err}");
}

/// A guest that can make piece sums collide writes a block whose changed pieces keep their
/// base's sums: here the previous point's entry carries such sums (as a collision would make
/// them). The backup reads the base back, sees the patch would not rebuild the block, stores
/// the block whole and says so; the point restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_piece_sum_collision_cannot_damage_a_point() {
    use cairn_format::index::{BlockEntry, IndexWriter};
    use cairn_format::patch::PieceSums;

    let f = Fixture::new(65536).await;
    assert!(f.vault.config().piece_key().is_keyed(), "a new vault keys its piece sums");
    let key = f.vault.config().piece_key();
    let old: Vec<u8> = (0..65536u32).map(|i| (i % 241) as u8 | 1).collect();
    let mut new = old.clone();
    new[..4096].fill(0x11); // piece 0
    new[4096..8192].fill(0x22); // piece 1
    // The previous point: block 0 stored whole as `old`, with sums that agree with `new`
    // everywhere but in piece 0.
    let mut forged = PieceSums::of(&new, 4096, &key).as_slice().to_vec();
    forged[0] ^= 1;
    let mut index = IndexWriter::new(65536, 65536, 1024).unwrap();
    let sums = PieceSums::from_slice(&forged).unwrap();
    assert!(index.push(BlockEntry::Data { digest: Digest::of(&old), sums }).is_none());
    let (last, root) = index.finish().unwrap();
    let first = commit_by_hand(&f, "vm", 65536, &[&old, &last.unwrap().bytes], &root.bytes).await;

    let image = f.path("guest.raw");
    std::fs::write(&image, &new).unwrap();
    let m = f.backup("vm", &[("sda", &image)]).await.unwrap();
    assert_eq!(m.disks[&name("sda")].previous_point.as_ref(), Some(&first.point));
    assert_eq!(m.disks[&name("sda")].stats.patched_blocks, 0);
    assert!(m.evidence.iter().any(|e| e.kind == "patch_refused"), "{:?}", m.evidence);
    f.restore(&m, "sda", &f.path("r.raw")).await.unwrap();
    assert_eq!(std::fs::read(f.path("r.raw")).unwrap(), new);
    assert!(f.verify().await.is_clean());
}

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() { out.extend(files_under(&p)) } else { out.push(p) }
    }
    out
}

#[tokio::test]
async fn a_pack_table_that_misplaces_a_chunk_is_reported_by_verify() {
    use cairn_format::pack::{PACK_ENTRY_LEN, PACK_FOOTER_LEN, PackEntry, pack_trailer};
    let f = Fixture::new(65536).await;
    let disk = f.sample("d.img", 1 << 20, 3);
    f.backup("vm", &[("d", &disk)]).await.unwrap();
    let pack = files_under(&f.vault_dir().join("packs")).into_iter().next().unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    let n = bytes.len();
    let count = u32::from_le_bytes(bytes[n - 12..n - 8].try_into().unwrap()) as usize;
    let at = n - PACK_FOOTER_LEN - count * PACK_ENTRY_LEN;
    let mut entries: Vec<PackEntry> = bytes[at..at + count * PACK_ENTRY_LEN]
        .chunks(PACK_ENTRY_LEN)
        .map(|e| PackEntry {
            id: Digest(e[..32].try_into().unwrap()),
            offset: u32::from_le_bytes(e[32..36].try_into().unwrap()),
            len: u32::from_le_bytes(e[36..40].try_into().unwrap()),
        })
        .collect();
    // The table names another chunk where the first one is; the pack index still places the
    // first right, so it reads well and only the table is wrong (a rebuilt index would be too).
    let id = entries[0].id.to_string();
    entries[0].id = Digest([7; 32]);
    bytes.truncate(at);
    bytes.extend(pack_trailer(&entries));
    std::fs::write(&pack, bytes).unwrap();
    let report = f.verify().await;
    let name = pack.file_name().unwrap().to_str().unwrap().to_string();
    assert!(
        report.damaged_packs.iter().any(|(p, why)| p.contains(&name) && why.contains(&id)),
        "{:?}",
        report.damaged_packs
    );
    assert!(report.bad_chunks.is_empty(), "the chunks themselves are sound");
}
