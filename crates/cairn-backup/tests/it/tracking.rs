//! Changed-block tracking as the job uses it: trusted only against the right base, sampled,
//! and dropped for a full hash scan (with the reason in the evidence) whenever in doubt.

use std::path::Path;
use std::sync::Arc;

use cairn_backup::{Cancel, DiskInput, NoProgress};
use cairn_delta::{BlockSource, ChangeTracking, Extent, RawFile};
use cairn_format::{PointId, PointManifest};

use crate::support::*;

/// A raw image whose change tracking is whatever the test says.
struct Tracked {
    raw: RawFile,
    tracking: ChangeTracking,
}

impl BlockSource for Tracked {
    fn describe(&self) -> String {
        self.raw.describe()
    }
    fn size(&self) -> u64 {
        self.raw.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), cairn_delta::Error> {
        self.raw.read_at(offset, buf)
    }
    fn allocated(&self, offset: u64, len: u64) -> Result<Vec<Extent>, cairn_delta::Error> {
        self.raw.allocated(offset, len)
    }
    fn change_tracking(&self) -> ChangeTracking {
        self.tracking.clone()
    }
}

async fn backup_tracked(fx: &Fixture, path: &Path, tracking: ChangeTracking) -> PointManifest {
    let source = Tracked { raw: RawFile::open(path).unwrap(), tracking };
    let disks = vec![DiskInput { name: name("os"), source: Arc::new(source) }];
    cairn_backup::backup(&fx.vault, request("vm", disks, 2), Arc::new(NoProgress), &Cancel::new())
        .await
        .unwrap()
}

fn evidence(m: &PointManifest, kind: &str) -> Vec<String> {
    m.evidence.iter().filter(|e| e.kind == kind).map(|e| e.message.clone()).collect()
}

fn since(point: &PointId, dirty: Vec<Extent>) -> ChangeTracking {
    ChangeTracking::Since { since: point.clone(), dirty, tracker: "test tracker".into() }
}

async fn restores_to(fx: &Fixture, m: &PointManifest, disk: &Path) {
    let out = fx.path("restored.raw");
    let _ = std::fs::remove_file(&out);
    fx.restore(m, "os", &out).await.unwrap();
    assert!(same(&out, disk), "the restore differs from the disk");
}

#[tokio::test]
async fn an_honest_tracker_reads_only_what_changed() {
    let fx = Fixture::new(65536).await;
    let disk = fx.sample("os.raw", 64 << 20, 1);
    let first = fx.backup("vm", &[("os", &disk)]).await.unwrap();
    cairn_sample::mutate_range(&disk, 8 << 20, 1 << 20, 2).unwrap();
    let dirty = vec![Extent { offset: 8 << 20, len: 1 << 20 }];
    let m = backup_tracked(&fx, &disk, since(&first.point, dirty)).await;
    let stats = &m.disks[&name("os")].stats;
    assert_eq!(stats.bytes_changed, 1 << 20);
    // The dirty MiB and a 1-in-256 sample of the rest, not the disk's allocated ~45 MiB.
    assert!(stats.bytes_scanned < 4 << 20, "scanned {}", stats.bytes_scanned);
    assert!(
        evidence(&m, "cbt").iter().any(|d| d.contains("1048576 bytes in 1 ranges")),
        "{:?}",
        m.evidence
    );
    restores_to(&fx, &m, &disk).await;
    assert!(fx.verify_clean().await);
}

#[tokio::test]
async fn a_tracker_that_misses_writes_is_caught_by_sampling() {
    // 4 KiB blocks: 4096 of them all change, so the 1-in-256 sample cannot miss them all.
    let fx = Fixture::new(4096).await;
    let disk = fx.sample("os.raw", 16 << 20, 3);
    let first = fx.backup("vm", &[("os", &disk)]).await.unwrap();
    std::fs::write(&disk, vec![0x5a; 16 << 20]).unwrap();
    let m = backup_tracked(&fx, &disk, since(&first.point, vec![])).await;
    let why = evidence(&m, "cbt_fallback");
    assert!(why.iter().any(|d| d.contains("missed a write")), "{:?}", m.evidence);
    restores_to(&fx, &m, &disk).await;
    assert!(fx.verify_clean().await);
}

#[tokio::test]
async fn tracking_from_another_point_or_unusable_means_a_full_scan() {
    let fx = Fixture::new(65536).await;
    let disk = fx.sample("os.raw", 32 << 20, 4);
    let first = fx.backup("vm", &[("os", &disk)]).await.unwrap();
    cairn_sample::mutate_range(&disk, 0, 1 << 20, 5).unwrap();
    let other: PointId = "20200101T000000.000Z-00000000".parse().unwrap();
    // Claims nothing changed, since a point that is not the base: must not be believed.
    let m = backup_tracked(&fx, &disk, since(&other, vec![])).await;
    let why = evidence(&m, "cbt_fallback");
    assert!(why.iter().any(|d| d.contains(&format!("base is point {}", first.point))), "{why:?}");
    assert_eq!(m.disks[&name("os")].stats.bytes_changed, 1 << 20);
    restores_to(&fx, &m, &disk).await;

    cairn_sample::mutate_range(&disk, 4 << 20, 1 << 20, 6).unwrap();
    let m = backup_tracked(&fx, &disk, ChangeTracking::Unusable("bitmap is in-use".into())).await;
    assert!(evidence(&m, "cbt_fallback").iter().any(|d| d.contains("bitmap is in-use")));
    assert_eq!(m.disks[&name("os")].stats.bytes_changed, 1 << 20);
    restores_to(&fx, &m, &disk).await;
}

/// A sparse disk's previous index is mostly one all-hole page repeated: the scan skips those
/// runs whole, and every entry it carries must still land on its own block.
#[tokio::test]
async fn a_sparse_disk_keeps_every_entry_in_place() {
    let fx = Fixture::new(4096).await;
    let disk = fx.path("sparse.raw");
    std::fs::File::create(&disk).unwrap().set_len(256 << 20).unwrap();
    for (at, seed) in [(10u64 << 20, 1), (100 << 20, 2), (250 << 20, 3)] {
        cairn_sample::mutate_range(&disk, at, 1 << 20, seed).unwrap();
    }
    let first = fx.backup("vm", &[("os", &disk)]).await.unwrap();
    assert_eq!(first.disks[&name("os")].stats.hole_blocks, (253 << 20) / 4096);

    // One block changes in the data, one is written in a long hole.
    cairn_sample::mutate_range(&disk, (100 << 20) + 8192, 4096, 4).unwrap();
    cairn_sample::mutate_range(&disk, 180 << 20, 4096, 5).unwrap();
    let dirty = vec![
        Extent { offset: (100 << 20) + 8192, len: 4096 },
        Extent { offset: 180 << 20, len: 4096 },
    ];
    let m = backup_tracked(&fx, &disk, since(&first.point, dirty)).await;
    let stats = &m.disks[&name("os")].stats;
    assert_eq!((stats.bytes_changed, stats.hole_blocks), (8192, (253 << 20) / 4096 - 1));
    restores_to(&fx, &m, &disk).await;

    // Untracked, the previous entries are compared, not carried: still exactly the change.
    cairn_sample::mutate_range(&disk, (250 << 20) + 4096, 4096, 6).unwrap();
    let m = backup_tracked(&fx, &disk, ChangeTracking::NotTracked).await;
    assert_eq!(m.disks[&name("os")].stats.bytes_changed, 4096);
    restores_to(&fx, &m, &disk).await;
    assert!(fx.verify_clean().await);
}
