//! Bad input of every kind: a clear error or the right fallback, and a vault that stays valid.

use std::path::PathBuf;
use std::sync::Arc;

use cairn_backup::{Cancel, DiskProgress, NoProgress, Progress, RestoreOptions};
use cairn_format::{Digest, PointManifest};
use cairn_vault::Vault;

use crate::support::*;

/// Where a chunk is stored: its pack file and its frame's place in it.
#[derive(Clone, Debug)]
struct Stored {
    id: Digest,
    pack: PathBuf,
    offset: u64,
    len: u64,
}

/// Stored chunks of one disk of a point: (index pages, data chunks).
async fn chunks_of(f: &Fixture, m: &PointManifest, disk: &str) -> (Vec<Stored>, Vec<Stored>) {
    let place = |id: Digest| async move {
        let loc = f.vault.locate_chunk(&id).await.unwrap().expect("a located chunk");
        let hex = loc.pack.to_hex();
        let pack = f.vault_dir().join("packs").join(&hex[..2]).join(hex);
        Stored { id, pack, offset: u64::from(loc.offset), len: u64::from(loc.len) }
    };
    let root = f.vault.read_index_root(&m.disks[&name(disk)].index_root).await.unwrap();
    let mut pages = Vec::new();
    let mut data = Vec::new();
    for page_id in root.page_digests() {
        pages.push(place(page_id).await);
        let page = f.vault.read_index_page(&page_id).await.unwrap();
        for id in page.entries().flat_map(|e| e.chunks()) {
            data.push(place(id).await);
        }
    }
    (pages, data)
}

/// Flips one bit of a stored chunk's frame, `at` bytes into it (clamped to the frame).
fn flip_byte(c: &Stored, at: u64) {
    let mut bytes = std::fs::read(&c.pack).unwrap();
    let at = (c.offset + at.min(c.len - 1)) as usize;
    bytes[at] ^= 0x40;
    std::fs::write(&c.pack, bytes).unwrap();
}

#[tokio::test]
async fn a_missing_vault_says_how_to_create_one() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("nope");
    let err = Vault::open(url.to_str().unwrap()).await.unwrap_err();
    assert!(err.to_string().contains("create one there first"), "{err}");
    // An existing folder without a vault is no vault either.
    let err = Vault::open(dir.path().to_str().unwrap()).await.unwrap_err();
    assert!(matches!(err, cairn_vault::Error::NoVault { .. }), "{err}");
    let err = Vault::open("ftp://host/x").await.unwrap_err();
    assert!(err.to_string().contains("unknown scheme"), "{err}");
    let err = Vault::open("s3:///x").await.unwrap_err();
    assert!(err.to_string().contains("names no bucket"), "{err}");
}

#[tokio::test]
async fn creating_a_vault_twice_is_refused() {
    let f = Fixture::new(65536).await;
    let err = Vault::create(f.vault_dir().to_str().unwrap(), 65536).await.unwrap_err();
    assert!(matches!(err, cairn_vault::Error::AlreadyExists { .. }), "{err}");
    let err = Vault::create(f.path("v2").to_str().unwrap(), 3000).await.unwrap_err();
    assert!(err.to_string().contains("power of two"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_folder_disks_are_refused_before_anything_is_written() {
    let f = Fixture::new(65536).await;
    let err = f.backup("vm", &[("sda", &f.path("missing.raw"))]).await.unwrap_err();
    assert!(
        err.to_string().contains("missing.raw") && err.to_string().contains("check the path"),
        "{err}"
    );
    let err = f.backup("vm", &[("sda", f.dir.path())]).await.unwrap_err();
    assert!(err.to_string().contains("is a folder"), "{err}");
    assert!(f.vault.list_points(None).await.unwrap().points.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_points_and_disks_are_named() {
    let f = Fixture::new(65536).await;
    let a = f.sample("a.raw", 2 << 20, 1);
    let m = f.backup("vm", &[("sda", &a)]).await.unwrap();
    let bogus = "20200101T000000.000Z-00000000".parse().unwrap();
    let err = f.vault.read_point(&name("vm"), &bogus).await.unwrap_err();
    assert!(err.to_string().contains("list its points"), "{err}");
    let err = f.vault.resolve_point(&name("other"), None).await.unwrap_err();
    assert!(err.to_string().contains("no recovery points"), "{err}");
    let err = f.restore(&m, "sdz", &f.path("out.raw")).await.unwrap_err();
    assert!(err.to_string().contains("has no disk sdz; its disks are: sda"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_never_overwrites_without_force() {
    let f = Fixture::new(65536).await;
    let a = f.sample("a.raw", 2 << 20, 1);
    let m = f.backup("vm", &[("sda", &a)]).await.unwrap();
    let target = f.path("existing.raw");
    std::fs::write(&target, b"precious").unwrap();
    let err = f.restore(&m, "sda", &target).await.unwrap_err();
    assert!(matches!(err, cairn_backup::Error::TargetExists { .. }), "{err}");
    assert_eq!(std::fs::read(&target).unwrap(), b"precious");
    let opts = RestoreOptions { force: true, ..Default::default() };
    cairn_backup::restore_disk(&f.vault, &m, &name("sda"), &target, &opts, Arc::new(NoProgress))
        .await
        .unwrap();
    assert!(same(&a, &target));
    // An empty file is fine to fill.
    std::fs::write(f.path("empty.raw"), b"").unwrap();
    f.restore(&m, "sda", &f.path("empty.raw")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_chunk_is_found_quarantined_and_stored_again() {
    let f = Fixture::new(4096).await;
    let a = f.sample("a.raw", 4 << 20, 2);
    let m = f.backup("vm", &[("sda", &a)]).await.unwrap();
    let (_, data) = chunks_of(&f, &m, "sda").await;
    let victim = data[data.len() / 2].clone();
    flip_byte(&victim, 40);

    let report = f.verify().await;
    assert!(!report.is_clean());
    assert_eq!(report.bad_chunks.len(), 1);
    assert!(report.bad_chunks[0].reason.contains("CRC"), "{:?}", report.bad_chunks);
    assert_eq!(report.bad_chunks[0].points, vec![(name("vm"), m.point.clone())]);
    let marker = f.vault_dir().join("quarantine").join(format!(
        "{}.{}",
        victim.id,
        victim.pack.file_name().unwrap().to_str().unwrap()
    ));
    assert!(marker.exists(), "the bad copy must be marked quarantined");

    let err = f.restore(&m, "sda", &f.path("r.raw")).await.unwrap_err();
    assert!(err.to_string().contains("missing") && err.to_string().contains("verify"), "{err}");

    // The damaged point is no base: the next backup compares against nothing and stores the
    // block again instead of trusting the lost copy.
    let m2 = f.backup("vm", &[("sda", &a)]).await.unwrap();
    assert!(m2.disks[&name("sda")].previous_point.is_none());
    assert!(m2.evidence.iter().any(|e| e.kind == "previous_point_skipped"), "{:?}", m2.evidence);
    let again = f.vault.locate_chunk(&victim.id).await.unwrap().expect("stored again");
    assert_ne!(again.pack.to_hex(), victim.pack.file_name().unwrap().to_str().unwrap());
    // Now both points are whole again, and verify says so.
    assert!(f.verify_clean().await);
    f.restore(&m, "sda", &f.path("r.raw")).await.unwrap();
    assert!(same(&a, &f.path("r.raw")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_chunk_is_found() {
    let f = Fixture::new(4096).await;
    let a = f.sample("a.raw", 2 << 20, 3);
    let m = f.backup("vm", &[("sda", &a)]).await.unwrap();
    let (_, data) = chunks_of(&f, &m, "sda").await;
    // Cut the pack holding the last data chunk in the middle of that chunk.
    let victim = data.last().unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&victim.pack).unwrap();
    file.set_len(victim.offset + victim.len / 2).unwrap();
    let report = f.verify().await;
    assert_eq!(report.bad_chunks.len(), 1);
    assert!(report.bad_chunks[0].reason.contains("truncated"), "{:?}", report.bad_chunks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_index_page_damages_its_point_and_the_next_backup_uses_an_older_base() {
    let f = Fixture::new(4096).await;
    let a = f.sample("a.raw", 8 << 20, 4);
    let first = f.backup("vm", &[("sda", &a)]).await.unwrap();
    cairn_sample::mutate_scattered(&a, 0.05, 5).unwrap();
    let second = f.backup("vm", &[("sda", &a)]).await.unwrap();
    let (pages, _) = chunks_of(&f, &second, "sda").await;
    flip_byte(&pages[0], 100);

    let report = f.verify().await;
    assert_eq!(report.damaged_points, vec![(name("vm"), second.point.clone())]);
    let third = f.backup("vm", &[("sda", &a)]).await.unwrap();
    assert_eq!(third.disks[&name("sda")].previous_point.as_ref(), Some(&first.point));
    f.restore(&third, "sda", &f.path("r.raw")).await.unwrap();
    assert!(same(&a, &f.path("r.raw")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_manifest_is_reported_and_other_points_still_restore() {
    let f = Fixture::new(65536).await;
    let a = f.sample("a.raw", 2 << 20, 6);
    let first = f.backup("vm", &[("sda", &a)]).await.unwrap();
    let pristine = f.path("a.orig");
    std::fs::copy(&a, &pristine).unwrap();
    cairn_sample::mutate_scattered(&a, 0.05, 7).unwrap();
    let second = f.backup("vm", &[("sda", &a)]).await.unwrap();
    let manifest = f.vault_dir().join("points/vm").join(format!("{}.json", second.point));
    let text = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, &text[..text.len() / 2]).unwrap();

    let listing = f.vault.list_points(None).await.unwrap();
    assert_eq!(listing.points.len(), 1);
    assert_eq!(listing.unreadable.len(), 1);
    assert!(listing.unreadable[0].error.contains("manifest"), "{:?}", listing.unreadable);
    assert!(!f.verify_clean().await);
    f.restore(&first, "sda", &f.path("r.raw")).await.unwrap();
    assert!(same(&pristine, &f.path("r.raw")));
    let third = f.backup("vm", &[("sda", &a)]).await.unwrap();
    assert_eq!(third.disks[&name("sda")].previous_point.as_ref(), Some(&first.point));
    assert!(
        third.evidence.iter().any(|e| e.message.contains("unreadable")),
        "{:?}",
        third.evidence
    );
}

/// Cancels the job at its first progress report.
struct CancelOnFirstReport(Cancel);
impl Progress for CancelOnFirstReport {
    fn disk(&self, _: &DiskProgress) {
        self.0.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_backup_commits_nothing_and_leaves_the_vault_valid() {
    let f = Fixture::new(4096).await;
    let a = f.sample("a.raw", 16 << 20, 8);
    let first = f.backup("vm", &[("sda", &a)]).await.unwrap();
    let pristine = f.path("a.orig");
    std::fs::copy(&a, &pristine).unwrap();
    cairn_sample::mutate_scattered(&a, 0.2, 9).unwrap();

    let cancel = Cancel::new();
    let request = request(
        "vm",
        vec![cairn_backup::DiskInput {
            name: name("sda"),
            source: Arc::new(cairn_delta::RawFile::open(&a).unwrap()),
        }],
        1,
    );
    let progress = Arc::new(CancelOnFirstReport(cancel.clone()));
    let err = cairn_backup::backup(&f.vault, request, progress, &cancel).await.unwrap_err();
    assert!(matches!(err, cairn_backup::Error::Cancelled), "{err}");
    assert_eq!(f.vault.list_points(None).await.unwrap().points.len(), 1);
    assert!(f.vault.inflight().await.unwrap().is_empty());
    assert!(f.verify_clean().await);
    f.restore(&first, "sda", &f.path("r.raw")).await.unwrap();
    assert!(same(&pristine, &f.path("r.raw")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_a_full_file_system_fails_the_backup_cleanly() {
    if !root_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "cairn-test", mnt.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success(), "mounting a small tmpfs failed");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());

    let url = mnt.join("vault");
    let vault = Vault::create(url.to_str().unwrap(), 65536).await.unwrap();
    let small = dir.path().join("small.raw");
    cairn_sample::create_disk(&small, 1 << 20, 1).unwrap();
    let first = backup_with(&vault, "vm", &[("sda", &small)], &Cancel::new()).await.unwrap();
    let big = dir.path().join("big.raw");
    cairn_sample::mutate_range(&big, 0, 16 << 20, 2).unwrap_or_else(|_| {
        std::fs::File::create(&big).unwrap();
        cairn_sample::mutate_range(&big, 0, 16 << 20, 2).unwrap();
    });
    let err = backup_with(&vault, "vm", &[("sdb", &big)], &Cancel::new()).await.unwrap_err();
    assert!(err.to_string().contains("storage is full"), "{err}");
    assert!(err.to_string().contains("no recovery point was committed"), "{err}");
    let listing = vault.list_points(None).await.unwrap();
    assert_eq!(listing.points.len(), 1);
    assert!(vault.verify(&Default::default(), &|_| {}).await.unwrap().is_clean());
    let out = dir.path().join("r.raw");
    restore_from(&vault, &first, "sda", &out).await.unwrap();
    assert!(same(&small, &out));
}

/// A disk whose reads fail part-way, like a failing device or a file truncated under us.
struct FailingDisk {
    fail_at: u64,
}

impl cairn_delta::BlockSource for FailingDisk {
    fn describe(&self) -> String {
        "failing-disk".into()
    }
    fn size(&self) -> u64 {
        64 << 20
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), cairn_delta::Error> {
        if offset + buf.len() as u64 > self.fail_at {
            return Err(cairn_delta::Error::Read {
                disk: self.describe(),
                offset,
                source: std::io::Error::from_raw_os_error(5),
            });
        }
        buf.fill(0xab);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_disk_fails_the_job_and_commits_nothing() {
    let f = Fixture::new(65536).await;
    let good = f.sample("good.raw", 2 << 20, 1);
    let request = request(
        "vm",
        vec![
            cairn_backup::DiskInput {
                name: name("good"),
                source: Arc::new(cairn_delta::RawFile::open(&good).unwrap()),
            },
            cairn_backup::DiskInput {
                name: name("bad"),
                source: Arc::new(FailingDisk { fail_at: 40 << 20 }),
            },
        ],
        2,
    );
    let err = cairn_backup::backup(&f.vault, request, Arc::new(NoProgress), &Cancel::new())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("disk bad") && text.contains("failing-disk") && text.contains("offset"),
        "{text}"
    );
    assert!(f.vault.list_points(None).await.unwrap().points.is_empty());
    assert!(f.verify_clean().await);
    // What it uploaded is left for a resume: the next backup of the VM takes it over, then
    // no in-flight state remains.
    assert!(f.vault.inflight().await.unwrap().len() <= 1);
    f.backup("vm", &[("good", &good)]).await.unwrap();
    assert!(f.vault.inflight().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_meeting_a_corrupt_chunk_fails_and_leaves_no_target() {
    let f = Fixture::new(4096).await;
    let a = f.sample("a.raw", 4 << 20, 11);
    let m = f.backup("vm", &[("sda", &a)]).await.unwrap();
    let (_, data) = chunks_of(&f, &m, "sda").await;
    // A chunk in the middle of a run of adjacent frames: the whole run is one read.
    let victim = &data[data.len() / 2];
    flip_byte(victim, 30);
    let target = f.path("r.raw");
    let err = f.restore(&m, "sda", &target).await.unwrap_err();
    match &err {
        cairn_backup::Error::Corrupt { id, .. } => assert_eq!(*id, victim.id),
        other => panic!("expected a corrupt chunk, got {other}"),
    }
    assert!(!target.exists(), "a failed restore must not leave a target");
    assert!(!f.path("r.raw.cairn-partial").exists());
}
