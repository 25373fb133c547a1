//! The coordinator's keeper on a real local vault: retention applied per VM, deletions by
//! other writers reported and never purged, a VM with a point dated ahead of the clock left
//! alone (the others pruned), gc run after prune, and scans that carry origin and tier.

use std::sync::Arc;

use cairn_backup::{BackupRequest, Cancel, DiskInput, NoProgress};
use cairn_delta::MemSource;
use cairn_format::{Change, Name, PointManifest, SnapshotTier};
use cairn_policy::Retention;
use cairn_scheduler::{Fate, VaultKeeper, VmRule};
use cairn_upkeep::{VaultSet, VaultsFile};
use cairn_vault::Vault;
use jiff::{SignedDuration, Timestamp};

fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

async fn point(vault: &Vault, vm: &str, when: &str, seed: u8) -> PointManifest {
    let name: Name = vm.parse().unwrap();
    let data: Vec<u8> = (0..1u32 << 18).map(|i| (i as u8).wrapping_mul(seed) ^ seed).collect();
    let disk =
        DiskInput { name: "d".parse().unwrap(), source: Arc::new(MemSource::new("d", data)) };
    let mut request = BackupRequest::new(name.clone(), vec![disk]);
    request.captured_at = Some(at(when));
    request.point = Some(vault.reserve_point_id(&name, at(when)).await.unwrap());
    cairn_backup::backup(vault, request, Arc::new(NoProgress), &Cancel::new()).await.unwrap()
}

fn keep_last(n: u32) -> Retention {
    Retention { keep_last: Some(n), ..Retention::default() }
}

#[tokio::test]
async fn upkeep_trusts_only_its_own_deletions_and_skips_a_vm_dated_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("vault").to_str().unwrap().to_owned();
    std::fs::create_dir(&url).unwrap();
    let vault = Vault::create(&url, 65536).await.unwrap();
    let mut a = vec![];
    for (day, seed) in [("2026-06-01", 1), ("2026-06-02", 2), ("2026-06-03", 3)] {
        a.push(point(&vault, "vm-a", &format!("{day}T02:00:00Z"), seed).await);
    }
    let b1 = point(&vault, "vm-b", "2026-06-01T02:00:00Z", 9).await;
    // A host with the vault's credentials soft-deletes vm-b's point with a grace already over.
    let forged = cairn_format::Deletion {
        at: at("2026-06-01T03:00:00Z"),
        purge_after: at("2026-06-01T03:00:00Z"),
        reason: "forged".into(),
    };
    vault.write_note(&b1.vm, &b1.point, "test", &[Change::Delete(forged)]).await.unwrap();
    // vm-c has a point dated years ahead.
    point(&vault, "vm-c", "2026-06-01T02:00:00Z", 5).await;
    point(&vault, "vm-c", "2099-01-01T00:00:00Z", 6).await;

    let file =
        VaultsFile::parse(&format!("[upkeep]\ngrace-hours = 1\n[vaults.main]\nurl = {url:?}\n"))
            .unwrap();
    let keeper = VaultSet::new(&file, std::path::Path::new("vaults.toml")).unwrap();
    assert_eq!(keeper.grace(), SignedDuration::from_hours(1));
    let rules = |purgeable: Vec<String>| {
        vec![
            VmRule { vm: "vm-a".into(), retention: keep_last(1), purgeable },
            VmRule { vm: "vm-b".into(), retention: keep_last(5), purgeable: vec![] },
            VmRule { vm: "vm-c".into(), retention: keep_last(1), purgeable: vec![] },
        ]
    };
    let now = at("2026-06-04T03:00:00Z");
    let report = keeper.upkeep("main", &rules(vec![]), now).await.unwrap();
    let fate = |report: &cairn_scheduler::UpkeepReport, p: &PointManifest| {
        report.points.iter().find(|f| f.point == p.point.to_string()).map(|f| f.fate.clone())
    };
    assert_eq!(fate(&report, &a[0]), Some(Fate::Expired));
    assert_eq!(fate(&report, &a[1]), Some(Fate::Expired));
    assert_eq!(fate(&report, &a[2]), Some(Fate::Kept));
    // The forged deletion is reported and not acted on.
    assert_eq!(fate(&report, &b1), Some(Fate::Unknown));
    assert!(vault.list_points(Some(&b1.vm)).await.unwrap().points.len() == 1);
    // vm-c is left alone, saying why; the run's other VMs went on.
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert!(
        report.errors[0].contains("vm-c") && report.errors[0].contains("2099"),
        "{:?}",
        report.errors
    );
    assert_eq!(vault.list_points(Some(&"vm-c".parse().unwrap())).await.unwrap().points.len(), 2);

    // Two hours later, with the coordinator's own expiries named: they are purged, and the
    // collector frees what only they used.
    let own: Vec<String> = a[..2].iter().map(|m| m.point.to_string()).collect();
    let later = at("2026-06-04T05:00:00Z");
    let report = keeper.upkeep("main", &rules(own), later).await.unwrap();
    assert_eq!(fate(&report, &a[0]), Some(Fate::Purged));
    assert_eq!(fate(&report, &a[1]), Some(Fate::Purged));
    assert!(report.bytes_freed > 0, "{report:?}");
    assert_eq!(vault.list_points(Some(&a[0].vm)).await.unwrap().points.len(), 1);

    // The scan carries what rescan needs: deletion, origin and tier.
    let held = SnapshotTier { host: "kvm-1".into(), until: at("2026-06-10T00:00:00Z") };
    vault.write_note(&a[2].vm, &a[2].point, "test", &[Change::Snapshot(Some(held))]).await.unwrap();
    let found = keeper.scan("main").await.unwrap();
    assert_eq!(found.len(), 4);
    let b = found.iter().find(|f| f.vm == "vm-b").unwrap();
    assert!(b.deleted);
    let newest = found.iter().find(|f| f.point.id == a[2].point.to_string()).unwrap();
    assert_eq!(newest.held_until, Some(at("2026-06-10T00:00:00Z")));
    // Deleting a VM's data: every live point soft-deleted, none twice.
    let deleted = keeper.delete_vm("main", "vm-c", later).await.unwrap();
    assert_eq!(deleted.len(), 2);
    assert!(keeper.delete_vm("main", "vm-c", later).await.unwrap().is_empty());
    // A vault that cannot be opened: an error naming it.
    let file = VaultsFile::parse("[vaults.gone]\nurl = \"/nonexistent/cairn-vault\"\n").unwrap();
    let keeper = VaultSet::new(&file, std::path::Path::new("vaults.toml")).unwrap();
    let e = keeper.upkeep("gone", &[], later).await.unwrap_err();
    assert!(e.contains("opening vault gone") && e.contains("create one there first"), "{e}");
}
