//! The life of a vault: months of daily backups pruned by a GFS policy on an injected clock,
//! garbage collection beside two writers, reaping, locks and append-only handles.
//!
//! The collector loop runs a seeded 6 rounds on the local store and 3 on S3 (moto) in CI;
//! `CAIRN_SOAK=1` runs 100 on each.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use cairn_backup::{Action, Cancel, DiskInput, NoProgress, PruneOptions, prune};
use cairn_delta::RawFile;
use cairn_format::{Digest, Name, PointId, PointManifest};
use cairn_policy::Retention;
use cairn_vault::{CreateOptions, Credential, GcOptions, OpenOptions, Vault};
use jiff::{SignedDuration, Timestamp};
use rand::{RngExt, SeedableRng};

use crate::support::{Fixture, name, request, restore_from};

fn rounds(ci: usize) -> usize {
    if std::env::var_os("CAIRN_SOAK").is_some() { 100 } else { ci }
}

/// The SHA-256 of a file.
fn digest_of(p: &Path) -> Digest {
    Digest::of(&std::fs::read(p).unwrap())
}

/// A backup of `vm`'s disk `d` at `disk`, captured at `at` (the injected clock).
async fn backup_at(vault: &Vault, vm: &str, disk: &Path, at: Option<Timestamp>) -> PointManifest {
    let source = Arc::new(RawFile::open(disk).unwrap());
    let mut req = request(vm, vec![DiskInput { name: name("d"), source }], 1);
    if let Some(at) = at {
        req.captured_at = Some(at);
        req.point = Some(vault.reserve_point_id(&name(vm), at).await.unwrap());
    }
    cairn_backup::backup(vault, req, Arc::new(NoProgress), &Cancel::new()).await.unwrap()
}

fn fast_gc() -> GcOptions {
    // Tiny pack indexes: every collector run in these tests cuts what it rewrites into many.
    GcOptions {
        poll: std::time::Duration::from_millis(20),
        entries_per_index: 3,
        ..GcOptions::default()
    }
}

/// Restores every point in `expected` and checks it against the digest recorded at backup.
async fn restores_identically(vault: &Vault, dir: &Path, expected: &BTreeMap<PointId, Digest>) {
    for (point, want) in expected {
        let vm = vault.list_points(None).await.unwrap().points;
        let m = vm.iter().find(|m| &m.point == point).unwrap_or_else(|| panic!("{point} gone"));
        let to = dir.join(format!("r-{point}"));
        restore_from(vault, m, "d", &to).await.unwrap();
        assert_eq!(&digest_of(&to), want, "point {point} restores what was backed up");
        std::fs::remove_file(&to).unwrap();
    }
}

/// 120 daily backups at 02:30 in Amsterdam (across the spring DST change, month ends and a
/// 29-day February... of 2028, a leap year), pruned every day by keep-daily 7, keep-weekly 4,
/// keep-monthly 3: exactly the points a plain reading of those rules names are left, and each
/// restores to the disk as it was that day.
#[tokio::test]
async fn months_of_daily_backups_keep_exactly_what_the_policy_says() {
    let f = Fixture::new(65536).await;
    let disk = f.sample("disk.img", 1 << 20, 1);
    let tz = cairn_policy::time_zone(Some("Europe/Amsterdam")).unwrap();
    let retention = Retention {
        keep_daily: Some(7),
        keep_weekly: Some(4),
        keep_monthly: Some(3),
        time_zone: Some("Europe/Amsterdam".into()),
        ..Default::default()
    };
    let first = jiff::civil::date(2028, 1, 1).at(2, 30, 0, 0);
    let mut digests: BTreeMap<PointId, Digest> = BTreeMap::new();
    let mut days: BTreeMap<PointId, jiff::civil::Date> = BTreeMap::new();
    for day in 0..120 {
        let local = first.checked_add(jiff::Span::new().days(day)).unwrap();
        let at = local.to_zoned(tz.clone()).unwrap().timestamp();
        cairn_sample::mutate_range(&disk, (day as u64 % 16) * 65536, 4096, day as u64).unwrap();
        let m = backup_at(&f.vault, "vm", &disk, Some(at)).await;
        digests.insert(m.point.clone(), digest_of(&disk));
        days.insert(m.point, local.date());
        let options = PruneOptions {
            retention: retention.clone(),
            vm: None,
            grace: cairn_vault::DEFAULT_GRACE,
            dry_run: false,
            now: at,
            purge_only: None,
        };
        prune(&f.vault, &options).await.unwrap();
        if day % 30 == 29 {
            f.vault.gc(&fast_gc(), &|_| {}).await.unwrap();
        }
    }
    // The last day's prune, 15 days on: every point expired so far is past its grace.
    let last = *days.values().last().unwrap();
    let later = last.at(12, 0, 0, 0).to_zoned(tz.clone()).unwrap().timestamp()
        + SignedDuration::from_hours(15 * 24);
    let options = PruneOptions {
        retention,
        vm: None,
        grace: cairn_vault::DEFAULT_GRACE,
        dry_run: false,
        now: later,
        purge_only: None,
    };
    let report = prune(&f.vault, &options).await.unwrap();
    let unsettled = |a: &Action| !matches!(a, Action::Keep(_) | Action::Purge);
    assert_eq!(report.count(unsettled), 0, "{report:?}");
    f.vault.gc(&fast_gc(), &|_| {}).await.unwrap();

    // The rules read plainly: the last 7 days; the newest day of each of the last 4 ISO
    // weeks; the newest day of each of the last 3 months.
    let all: Vec<jiff::civil::Date> = days.values().copied().collect();
    let mut want: BTreeSet<jiff::civil::Date> = all.iter().rev().take(7).copied().collect();
    let newest_per = |key: &dyn Fn(&jiff::civil::Date) -> (i16, i8), n: usize| {
        let mut seen = vec![];
        let mut out = vec![];
        for d in all.iter().rev() {
            if !seen.contains(&key(d)) && seen.len() < n {
                seen.push(key(d));
                out.push(*d);
            }
        }
        out
    };
    want.extend(newest_per(&|d| (d.iso_week_date().year(), d.iso_week_date().week()), 4));
    want.extend(newest_per(&|d| (d.year(), d.month()), 3));
    let left = f.vault.list_points(None).await.unwrap().points;
    let left_days: BTreeSet<jiff::civil::Date> = left.iter().map(|m| days[&m.point]).collect();
    assert_eq!(left_days, want, "the points left are exactly the policy's");
    assert_eq!(left.len(), want.len());
    assert!(f.vault.verify(&Default::default(), &|_| {}).await.unwrap().is_clean());
    let kept: BTreeMap<PointId, Digest> =
        left.iter().map(|m| (m.point.clone(), digests[&m.point])).collect();
    restores_identically(&f.vault, f.dir.path(), &kept).await;
}

/// Two writers back up their VMs over and over while a third task prunes to the last two
/// points of each and collects, `rounds` times: no chunk is ever lost (every point left
/// verifies and restores identically), and the space of expired points is freed.
async fn gc_beside_two_writers(vault: Vault, dir: &Path, rounds: usize, seed: u64) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let backups = Arc::new(AtomicUsize::new(0));
    let mut writers = vec![];
    for (i, vm) in ["vm-a", "vm-b"].into_iter().enumerate() {
        let disk = dir.join(format!("{vm}.img"));
        cairn_sample::create_disk(&disk, 2 << 20, seed + i as u64).unwrap();
        let (vault, stop, backups) = (vault.clone(), Arc::clone(&stop), Arc::clone(&backups));
        writers.push(tokio::spawn(async move {
            let mut made: BTreeMap<PointId, Digest> = BTreeMap::new();
            let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed * 7 + i as u64);
            while !stop.load(Ordering::Relaxed) {
                // Few places, rewritten often: most blocks a purged point held are dead soon.
                let at = rng.random_range(0..4u64) * 65536;
                cairn_sample::mutate_range(&disk, at, 65536, rng.random()).unwrap();
                let m = backup_at(&vault, vm, &disk, None).await;
                made.insert(m.point, digest_of(&disk));
                backups.fetch_add(1, Ordering::Relaxed);
            }
            made
        }));
    }
    let retention = Retention { keep_last: Some(2), ..Default::default() };
    let mut freed = 0;
    for round in 0..rounds {
        // Each round, the writers have made new points (and new garbage) since the last.
        while backups.load(Ordering::Relaxed) < 3 * (round + 1) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let options = PruneOptions {
            retention: retention.clone(),
            vm: None,
            grace: SignedDuration::ZERO,
            dry_run: false,
            now: Timestamp::now(),
            purge_only: None,
        };
        prune(&vault, &options).await.unwrap();
        let report = vault.gc(&fast_gc(), &|_| {}).await.unwrap();
        freed += report.bytes_deleted.saturating_sub(report.bytes_written);
        assert!(report.bad_copies.is_empty(), "{:?}", report.bad_copies);
    }
    stop.store(true, Ordering::Relaxed);
    let mut made = BTreeMap::new();
    for w in writers {
        made.extend(w.await.unwrap());
    }
    let left = vault.list_points(None).await.unwrap();
    assert!(left.unreadable.is_empty());
    let verified = vault.verify(&Default::default(), &|_| {}).await.unwrap();
    assert!(verified.is_clean(), "no chunk lost: {verified:?}");
    let kept: BTreeMap<PointId, Digest> =
        left.points.iter().map(|m| (m.point.clone(), made[&m.point])).collect();
    restores_identically(&vault, dir, &kept).await;
    assert!(made.len() > kept.len(), "points were expired");
    assert!(freed > 0, "space was freed");
    // With no backup running, one more prune and gc leave only what the kept points need.
    let options = PruneOptions {
        retention,
        vm: None,
        grace: SignedDuration::ZERO,
        dry_run: false,
        now: Timestamp::now(),
        purge_only: None,
    };
    prune(&vault, &options).await.unwrap();
    vault.gc(&fast_gc(), &|_| {}).await.unwrap();
    let dry = vault.gc(&GcOptions { dry_run: true, ..fast_gc() }, &|_| {}).await.unwrap();
    assert_eq!(dry.packs_dead, 0, "one run freed every dead pack");
    assert!(vault.verify(&Default::default(), &|_| {}).await.unwrap().is_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_beside_two_writers_local() {
    let f = Fixture::new(65536).await;
    gc_beside_two_writers(f.vault.clone(), f.dir.path(), rounds(6), 11).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_beside_two_writers_object_stores() {
    for (store, url) in cairn_testkit::object_store_urls() {
        let key = Credential::KeyFile(vec![b'g'; 64].into());
        let url = format!("{url}-gc-{}", rand::rng().random::<u32>());
        let vault = Vault::create_with(&url, &CreateOptions::encrypted(65536, key.clone()))
            .await
            .unwrap_or_else(|e| panic!("{store}: {e}"));
        let dir = tempfile::tempdir().unwrap();
        gc_beside_two_writers(vault, dir.path(), rounds(3), 23).await;
        // A second host sees the same vault whole.
        let other = Vault::open_with(&url, &OpenOptions { key: Some(key), ..Default::default() })
            .await
            .unwrap();
        assert!(other.verify(&Default::default(), &|_| {}).await.unwrap().is_clean(), "{store}");
    }
}

/// A backup whose marker a collector found stale is reaped, and its commit is refused.
#[tokio::test]
async fn a_reaped_backup_cannot_commit() {
    let f = Fixture::new(65536).await;
    let writer = f.vault.begin_point(&name("vm"), Timestamp::now()).await.unwrap();
    let mut packs = writer.pack_writer();
    packs.store_plain(b"a chunk of a backup that will be reaped").await.unwrap();
    packs.finish().await.unwrap();
    let stale = GcOptions { stale_after: SignedDuration::ZERO, ..fast_gc() };
    std::thread::sleep(std::time::Duration::from_millis(20));
    let report = f.vault.gc(&stale, &|_| {}).await.unwrap();
    assert_eq!(report.reaped, vec![writer.point().clone()]);
    let manifest = PointManifest {
        format: 1,
        point: writer.point().clone(),
        vm: name("vm"),
        started_at: writer.started_at(),
        captured_at: writer.started_at(),
        finished_at: Timestamp::now(),
        consistency: cairn_format::Consistency::None,
        disks: Default::default(),
        evidence: vec![],
        writer: "test".into(),
        machine: None,
        origin: None,
    };
    let e = writer.commit(&manifest).await.unwrap_err();
    assert!(matches!(e, cairn_vault::Error::Reaped { .. }), "{e}");
    assert!(e.to_string().contains("reaped"), "{e}");
    assert!(f.vault.list_points(None).await.unwrap().points.is_empty());
}

/// Locks, append-only handles and unknown points are refused, each naming what is wrong.
#[tokio::test]
async fn locks_and_append_only_refuse_deletion() {
    let f = Fixture::new(65536).await;
    let disk = f.sample("d.img", 1 << 20, 3);
    let m = backup_at(&f.vault, "vm", &disk, None).await;
    let vm = name("vm");
    let until = Timestamp::now() + SignedDuration::from_hours(24);
    f.vault.lock_point(&vm, &m.point, until).await.unwrap();
    // An earlier lock does not shorten it.
    let state = f
        .vault
        .lock_point(&vm, &m.point, Timestamp::now() + SignedDuration::from_hours(1))
        .await
        .unwrap();
    assert_eq!(state.locked_until, Some(until));
    let e =
        f.vault.soft_delete(&vm, &m.point, "test", SignedDuration::ZERO, Timestamp::now()).await;
    let e = e.unwrap_err();
    assert!(matches!(e, cairn_vault::Error::Locked { .. }), "{e}");
    assert!(e.to_string().contains(&m.point.to_string()), "{e}");
    // Prune keeps it, saying why.
    let options = PruneOptions {
        retention: Retention { keep_last: Some(1), ..Default::default() },
        vm: None,
        grace: SignedDuration::ZERO,
        dry_run: false,
        now: Timestamp::now(),
        purge_only: None,
    };
    let _second = backup_at(&f.vault, "vm", &disk, None).await;
    let report = prune(&f.vault, &options).await.unwrap();
    let locked = report.points.iter().find(|p| p.point == m.point).unwrap();
    assert!(matches!(&locked.action, Action::Keep(r) if r.iter().any(|r| r.contains("locked"))));

    let append_only = f.vault.clone().into_append_only();
    let e = prune(&append_only, &options).await.unwrap_err();
    assert!(e.to_string().contains("append-only"), "{e}");
    let e = append_only.gc(&fast_gc(), &|_| {}).await.unwrap_err();
    assert!(e.to_string().contains("append-only"), "{e}");
    let e = append_only
        .soft_delete(&vm, &_second.point, "x", SignedDuration::ZERO, Timestamp::now())
        .await
        .unwrap_err();
    assert!(matches!(e, cairn_vault::Error::AppendOnly { .. }), "{e}");
    // An append-only agent's backup commits and leaves its marker, treated as done.
    let third = backup_at(&append_only, "vm", &disk, None).await;
    let markers = f.vault.inflight().await.unwrap();
    assert!(markers.iter().any(|k| k.point == third.point), "its marker stays");
    let report = f.vault.gc(&fast_gc(), &|_| {}).await.unwrap();
    assert_eq!(report.done_markers_removed, 1);
    assert!(report.waited_for.is_empty(), "a done marker is not waited for");

    let missing: PointId = "20261122T021720.123Z-0123abcd".parse().unwrap();
    let e = f.vault.soft_delete(&vm, &missing, "x", SignedDuration::ZERO, Timestamp::now()).await;
    assert!(matches!(e, Err(cairn_vault::Error::PointNotFound { .. })));
    let e = f.vault.undelete(&vm, &missing, None).await;
    assert!(matches!(e, Err(cairn_vault::Error::PointNotFound { .. })));
    let e = f.vault.purge(&vm, &third.point, Timestamp::now()).await.unwrap_err();
    assert!(matches!(e, cairn_vault::Error::NotDeleted { .. }), "{e}");
}

/// A soft-deleted point restores by id, is listed apart, comes back with undelete, and a
/// point's notes survive a purge of another.
#[tokio::test]
async fn soft_deleted_points_restore_by_id_and_come_back() {
    let f = Fixture::new(65536).await;
    let disk = f.sample("d.img", 1 << 20, 5);
    let first = backup_at(&f.vault, "vm", &disk, None).await;
    let want = digest_of(&disk);
    cairn_sample::mutate_range(&disk, 0, 65536, 9).unwrap();
    let second = backup_at(&f.vault, "vm", &disk, None).await;
    let vm: Name = name("vm");
    let now = Timestamp::now();
    let d = f
        .vault
        .soft_delete(&vm, &first.point, "test", cairn_vault::DEFAULT_GRACE, now)
        .await
        .unwrap();
    assert_eq!(d.purge_after, now + cairn_vault::DEFAULT_GRACE);
    // Still there by id; the newest live point is the default.
    let back = f.vault.resolve_point(&vm, Some(&first.point)).await.unwrap();
    let to = f.path("r");
    restore_from(&f.vault, &back, "d", &to).await.unwrap();
    assert_eq!(digest_of(&to), want);
    assert_eq!(f.vault.resolve_point(&vm, None).await.unwrap().point, second.point);
    // Purging before the grace ends is refused; a gc keeps its chunks.
    let e = f.vault.purge(&vm, &first.point, now).await.unwrap_err();
    assert!(matches!(e, cairn_vault::Error::InGrace { .. }), "{e}");
    f.vault.gc(&fast_gc(), &|_| {}).await.unwrap();
    assert!(f.vault.verify(&Default::default(), &|_| {}).await.unwrap().is_clean());
    assert!(f.vault.undelete(&vm, &first.point, None).await.unwrap());
    assert!(f.vault.point_state(&vm, &first.point).await.unwrap().deleted.is_none());
    // The newest deleted point is not the default any more... and the latest is the latest.
    f.vault.soft_delete(&vm, &second.point, "t", SignedDuration::ZERO, now).await.unwrap();
    assert_eq!(f.vault.resolve_point(&vm, None).await.unwrap().point, first.point);
    f.vault.purge(&vm, &second.point, Timestamp::now()).await.unwrap();
    assert!(matches!(
        f.vault.read_point(&vm, &second.point).await,
        Err(cairn_vault::Error::PointNotFound { .. })
    ));
    assert!(f.vault.point_state(&vm, &first.point).await.unwrap().deleted.is_none());
}

/// A chunk verify quarantines while a backup runs, which the backup's point would need and
/// which has no good copy left, stops that commit.
#[tokio::test]
async fn a_backup_does_not_commit_over_a_chunk_quarantined_under_it() {
    let f = Fixture::new(65536).await;
    let disk = f.sample("d.img", 1 << 20, 7);
    let first = backup_at(&f.vault, "vm", &disk, None).await;
    let writer = f.vault.begin_point(&name("vm"), Timestamp::now()).await.unwrap();
    // Verify, on another handle, finds the disk's index root bad meanwhile.
    let other = Vault::open(f.vault_dir().to_str().unwrap()).await.unwrap();
    let root = first.disks[&name("d")].index_root;
    other.quarantine_chunk(&root, "test: found bad").await.unwrap();
    // The new point reuses the first one's index whole, as an unchanged disk does.
    let manifest = PointManifest { point: writer.point().clone(), ..first.clone() };
    let e = writer.commit(&manifest).await.unwrap_err();
    assert!(
        matches!(e, cairn_vault::Error::QuarantinedUnderBackup { chunk } if chunk == root),
        "{e}"
    );
    assert_eq!(f.vault.list_points(None).await.unwrap().points.len(), 1);
}

/// Lost pack indexes are rebuilt from the packs' own tables; a frame that does not check is
/// left out rather than indexed.
#[tokio::test]
async fn repair_rebuilds_lost_pack_indexes() {
    let f = Fixture::new(65536).await;
    let disk = f.sample("d.img", 2 << 20, 8);
    let mut made = BTreeMap::new();
    for i in 0..3 {
        cairn_sample::mutate_range(&disk, i * 65536, 65536, i).unwrap();
        let m = backup_at(&f.vault, "vm", &disk, None).await;
        made.insert(m.point, digest_of(&disk));
    }
    let indexes = f.vault_dir().join("pack-index");
    let lost: Vec<_> = std::fs::read_dir(&indexes).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(lost.len(), 3);
    // One index lost outright, the others too: every chunk is then unplaced.
    for p in &lost {
        std::fs::remove_file(p).unwrap();
    }
    let vault = Vault::open(f.vault_dir().to_str().unwrap()).await.unwrap();
    assert!(!vault.verify(&Default::default(), &|_| {}).await.unwrap().is_clean());
    let dry = vault.repair_index(true).await.unwrap();
    assert_eq!(dry.unindexed, dry.packs);
    assert!(dry.index.is_none());
    let report = vault.repair_index(false).await.unwrap();
    assert!(report.left_out.is_empty(), "{:?}", report.left_out);
    assert_eq!(report.recovered_packs, report.packs);
    assert!(report.index.as_deref().is_some_and(|i| i.ends_with(".repair")));
    let fresh = Vault::open(f.vault_dir().to_str().unwrap()).await.unwrap();
    let verified = fresh.verify(&Default::default(), &|_| {}).await.unwrap();
    assert!(verified.is_clean(), "{verified:?}");
    restores_identically(&fresh, f.dir.path(), &made).await;
    // Nothing is left to repair.
    assert_eq!(fresh.repair_index(false).await.unwrap().unindexed, 0);
}

/// Points copied from a plaintext vault into an encrypted one (on every backend), and back
/// into a plaintext one, restore identically; a second copy sends nothing.
#[tokio::test]
async fn copies_between_vaults_restore_identically_and_send_only_what_is_missing() {
    let f = Fixture::new(65536).await;
    let disk = f.sample("d.img", 2 << 20, 12);
    let mut made = BTreeMap::new();
    for i in 0..3 {
        cairn_sample::mutate_range(&disk, i * 3 * 65536, 65536, 40 + i).unwrap();
        let m = backup_at(&f.vault, "vm", &disk, None).await;
        made.insert(m.point, digest_of(&disk));
    }
    let mut targets = vec![("local".to_string(), f.path("copy").display().to_string())];
    targets.extend(
        cairn_testkit::object_store_urls()
            .into_iter()
            .map(|(n, u)| (n.to_string(), format!("{u}-copy-{}", rand::rng().random::<u32>()))),
    );
    for (backend, url) in targets {
        let key = Credential::KeyFile(vec![b'c'; 64].into());
        let encrypted =
            Vault::create_with(&url, &CreateOptions::encrypted(65536, key)).await.unwrap();
        let options = cairn_backup::CopyOptions::default();
        let report = cairn_backup::copy_points(&f.vault, &encrypted, &options).await.unwrap();
        assert_eq!(report.copied.len(), 3, "{backend}");
        let again = cairn_backup::copy_points(&f.vault, &encrypted, &options).await.unwrap();
        assert_eq!((again.copied.len(), again.present.len(), again.chunks_sent), (0, 3, 0));
        assert!(encrypted.verify(&Default::default(), &|_| {}).await.unwrap().is_clean());
        restores_identically(&encrypted, f.dir.path(), &made).await;
        // And out again into a plaintext vault, keeping the point ids.
        let plain_url = f.path(&format!("plain-{backend}")).display().to_string();
        let plain = Vault::create(&plain_url, 65536).await.unwrap();
        cairn_backup::copy_points(&encrypted, &plain, &options).await.unwrap();
        restores_identically(&plain, f.dir.path(), &made).await;
    }
    // Between plaintext vaults, an incremental point sends only its new chunks.
    let second = Vault::create(f.path("second").to_str().unwrap(), 65536).await.unwrap();
    cairn_backup::copy_points(&f.vault, &second, &Default::default()).await.unwrap();
    cairn_sample::mutate_range(&disk, 0, 65536, 99).unwrap();
    let m = backup_at(&f.vault, "vm", &disk, None).await;
    let report = cairn_backup::copy_points(&f.vault, &second, &Default::default()).await.unwrap();
    assert_eq!(report.copied, vec![(name("vm"), m.point.clone())]);
    assert!(
        report.chunks_sent <= 4,
        "a one-block change sends its block, page and root: {report:?}"
    );
    // Naming a point that does not exist is an error that names it.
    let missing = cairn_backup::CopyOptions {
        vm: Some(name("vm")),
        point: Some("20261122T021720.123Z-0123abcd".parse().unwrap()),
    };
    let e = cairn_backup::copy_points(&f.vault, &second, &missing).await.unwrap_err();
    assert!(e.to_string().contains("0123abcd"), "{e}");
}

/// A container SAS of Azurite's well-known account with every right but delete.
fn sas_without_delete(container: &str) -> String {
    let script = format!(
        "from datetime import datetime, timedelta, timezone\n\
         from azure.storage.blob import generate_container_sas, ContainerSasPermissions\n\
         key = 'Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=='\n\
         p = ContainerSasPermissions(read=True, add=True, create=True, write=True, list=True)\n\
         print(generate_container_sas('devstoreaccount1', '{container}', account_key=key, \
         permission=p, expiry=datetime.now(timezone.utc) + timedelta(hours=1)))\n"
    );
    let out = std::process::Command::new("python3").args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// An agent that holds only an Azure SAS without delete rights backs up (append-only), and
/// whatever tries to delete with it is refused by the store (Azurite checks SAS rights),
/// losing nothing.
#[tokio::test]
async fn an_azure_sas_without_delete_makes_the_agent_append_only() {
    let Some((_, url)) =
        cairn_testkit::object_store_urls().into_iter().find(|(b, _)| *b == "azure")
    else {
        return;
    };
    let key = Credential::KeyFile(vec![b's'; 64].into());
    let admin =
        Vault::create_with(&url, &CreateOptions::encrypted(65536, key.clone())).await.unwrap();
    let container = url.trim_start_matches("az://").split('/').next().unwrap().to_string();
    let store = cairn_vault::StoreOptions(vec![(
        "azure_storage_sas_key".into(),
        sas_without_delete(&container),
    )]);
    let open =
        |append_only| OpenOptions { store: store.clone(), key: Some(key.clone()), append_only };
    let agent = Vault::open_with(&url, &open(true)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.img");
    cairn_sample::create_disk(&disk, 1 << 20, 13).unwrap();
    let first = backup_at(&agent, "vm", &disk, None).await;
    cairn_sample::mutate_range(&disk, 0, 65536, 14).unwrap();
    let second = backup_at(&agent, "vm", &disk, None).await;
    // The same SAS without Cairn's append-only flag: the store itself refuses the deletes.
    let careless = Vault::open_with(&url, &open(false)).await.unwrap();
    careless
        .soft_delete(&name("vm"), &first.point, "test", SignedDuration::ZERO, Timestamp::now())
        .await
        .unwrap();
    let e = careless.purge(&name("vm"), &first.point, Timestamp::now()).await.unwrap_err();
    assert!(e.to_string().contains("not authorized"), "Azurite refused the delete: {e}");
    let e = careless.gc(&fast_gc(), &|_| {}).await.unwrap_err();
    assert!(e.to_string().contains("delete"), "{e}");
    // Nothing was lost: both points are there and whole, and the admin (with delete rights)
    // purges and collects normally.
    let points = admin.list_points(None).await.unwrap().points;
    assert_eq!(points.len(), 2);
    assert!(admin.verify(&Default::default(), &|_| {}).await.unwrap().is_clean());
    admin.purge(&name("vm"), &first.point, Timestamp::now()).await.unwrap();
    admin.gc(&fast_gc(), &|_| {}).await.unwrap();
    let left = admin.list_points(None).await.unwrap().points;
    assert_eq!(left.iter().map(|m| &m.point).collect::<Vec<_>>(), vec![&second.point]);
    assert!(admin.verify(&Default::default(), &|_| {}).await.unwrap().is_clean());
}

/// A backup's base stays whole while the backup runs, even if the base is purged and a
/// collector runs meanwhile: the backup recorded it before reading it.
#[tokio::test]
async fn a_base_purged_under_a_running_backup_keeps_its_chunks() {
    let f = Fixture::new(65536).await;
    let disk = f.sample("d.img", 1 << 20, 21);
    let base = backup_at(&f.vault, "vm", &disk, None).await;
    let want = digest_of(&disk);
    let writer = f.vault.begin_point(&name("vm"), Timestamp::now()).await.unwrap();
    assert!(writer.protect_base(&base).await.unwrap());
    let vm = name("vm");
    f.vault
        .soft_delete(&vm, &base.point, "t", SignedDuration::ZERO, Timestamp::now())
        .await
        .unwrap();
    f.vault.purge(&vm, &base.point, Timestamp::now()).await.unwrap();
    let other = Vault::open(f.vault_dir().to_str().unwrap()).await.unwrap();
    // The writer's process is this one, alive: the collector waits for it unless told not
    // to; with --no-wait the plan stays pending and nothing goes.
    let report = other.gc(&GcOptions { wait: false, ..fast_gc() }, &|_| {}).await.unwrap();
    assert!(report.bytes_deleted == 0, "{report:?}");
    // The backup carries its base's disk whole (an unchanged disk) and commits.
    let manifest = PointManifest { point: writer.point().clone(), ..base.clone() };
    writer.commit(&manifest).await.unwrap();
    other.gc(&fast_gc(), &|_| {}).await.unwrap();
    assert!(other.verify(&Default::default(), &|_| {}).await.unwrap().is_clean());
    let m = other.read_point(&vm, &manifest.point).await.unwrap();
    let to = f.path("r");
    restore_from(&other, &m, "d", &to).await.unwrap();
    assert_eq!(digest_of(&to), want);
}

/// A lost pack index does not let the collector delete the packs it named: their own tables
/// show live chunks, so they are kept until `repair index` indexes them again. One gc or
/// repair at a time: a lease held by a live process is respected, one of a dead process taken.
#[tokio::test]
async fn gc_keeps_packs_whose_index_is_lost_and_holds_a_lease() {
    let f = Fixture::new(65536).await;
    let disk = f.sample("d.img", 1 << 20, 22);
    cairn_sample::mutate_range(&disk, 0, 1 << 20, 25).unwrap();
    let first = backup_at(&f.vault, "vm", &disk, None).await;
    cairn_sample::mutate_range(&disk, 0, 65536, 23).unwrap();
    let m = backup_at(&f.vault, "vm", &disk, None).await;
    let want = digest_of(&disk);
    let vm = name("vm");
    f.vault
        .soft_delete(&vm, &first.point, "t", SignedDuration::ZERO, Timestamp::now())
        .await
        .unwrap();
    f.vault.purge(&vm, &first.point, Timestamp::now()).await.unwrap();
    // The first point's pack index is lost: the second point's root and pages are in its
    // own packs, the blocks it shares with the first only in packs no index names now.
    let index = f.vault_dir().join(format!("pack-index/{}", first.point));
    let lost = cairn_format::pack::decode_pack_index(&std::fs::read(&index).unwrap()).unwrap();
    std::fs::remove_file(&index).unwrap();
    // Quarantine markers naming every copy in those packs (a marker is only a name; anyone
    // who can write one must not get the only copy of a live chunk deleted by it).
    let markers = f.vault_dir().join("quarantine");
    std::fs::create_dir_all(&markers).unwrap();
    for p in &lost {
        for e in &p.entries {
            std::fs::write(markers.join(format!("{}.{}", e.id.to_hex(), p.pack.to_hex())), b"")
                .unwrap();
        }
    }
    let vault = Vault::open(f.vault_dir().to_str().unwrap()).await.unwrap();
    let report = vault.gc(&fast_gc(), &|_| {}).await.unwrap();
    assert_eq!(report.bytes_deleted, 0, "{report:?}");
    assert!(!report.unindexed_live.is_empty());
    for p in &lost {
        let name = p.pack.to_hex();
        assert!(f.vault_dir().join(format!("packs/{}/{name}", &name[..2])).exists());
    }
    std::fs::remove_dir_all(&markers).unwrap();
    let vault = Vault::open(f.vault_dir().to_str().unwrap()).await.unwrap();
    vault.repair_index(false).await.unwrap();
    assert!(vault.verify(&Default::default(), &|_| {}).await.unwrap().is_clean());
    let to = f.path("r");
    restore_from(&vault, &m, "d", &to).await.unwrap();
    assert_eq!(digest_of(&to), want);

    // A lease of a live process (this one) is respected...
    let host = cairn_testkit::sh("uname", &["-n"]).trim().to_string();
    let ns = std::fs::read_link("/proc/self/ns/pid").unwrap().display().to_string();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let lease = |pid: u32| {
        let owner = format!("{host} pid {pid} ns {ns} boot {}", boot.trim());
        let lease =
            cairn_format::Lease { format: 1, owner, what: "gc".into(), at: Timestamp::now() };
        lease.encode()
    };
    std::fs::create_dir_all(f.vault_dir().join("lease")).unwrap();
    let path = f.vault_dir().join("lease/gc.json");
    std::fs::write(&path, lease(std::process::id())).unwrap();
    let e = vault.gc(&fast_gc(), &|_| {}).await.unwrap_err();
    assert!(e.to_string().contains("lease"), "{e}");
    // ... one of a process that is gone is taken over.
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, lease(4_000_000)).unwrap();
    vault.gc(&fast_gc(), &|_| {}).await.unwrap();
    assert!(!path.exists(), "the lease is given back");
}
