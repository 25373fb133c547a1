//! Full and incremental backups restore bit for bit, and incrementals send only changes.

use std::sync::Arc;

use cairn_backup::{NoProgress, RestoreOptions};
use cairn_vault::Vault;
use object_store::memory::InMemory;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_and_incremental_restore_identically_with_holes() {
    let f = Fixture::new(4096).await;
    let a = f.sample("a.raw", 24 << 20, 1);
    let b = f.sample("b.raw", 12 << 20, 2);
    let full = f.backup("vm1", &[("sda", &a), ("sdb", &b)]).await.unwrap();
    let pristine = f.path("a.orig");
    std::fs::copy(&a, &pristine).unwrap();

    cairn_sample::mutate_scattered(&a, 0.01, 9).unwrap();
    cairn_sample::mutate_scattered(&b, 0.01, 10).unwrap();
    let incr = f.backup("vm1", &[("sda", &a), ("sdb", &b)]).await.unwrap();
    assert_eq!(incr.disks[&name("sda")].previous_point.as_ref(), Some(&full.point));

    f.restore(&full, "sda", &f.path("r-full.raw")).await.unwrap();
    assert!(same(&pristine, &f.path("r-full.raw")));
    f.restore(&incr, "sda", &f.path("r-incr.raw")).await.unwrap();
    assert!(same(&a, &f.path("r-incr.raw")));
    assert!(allocated(&f.path("r-incr.raw")) < 24 << 20, "zero regions must come back as holes");

    let all = cairn_backup::restore_point(
        &f.vault,
        &incr,
        &f.path("all"),
        &RestoreOptions::default(),
        Arc::new(NoProgress),
    )
    .await
    .unwrap();
    assert_eq!(all.len(), 2);
    assert!(same(&b, &f.path("all").join("sdb")));
    assert!(f.verify_clean().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_sends_only_changed_blocks() {
    let f = Fixture::new(65536).await;
    let a = f.sample("a.raw", 64 << 20, 3);
    let before = dir_size(&f.vault_dir());
    let full = f.backup("vm", &[("sda", &a)]).await.unwrap();
    let full_growth = dir_size(&f.vault_dir()) - before;

    // Unchanged: only a manifest is added (the index pages and root are the same chunks).
    let before = dir_size(&f.vault_dir());
    let same_again = f.backup("vm", &[("sda", &a)]).await.unwrap();
    let growth = dir_size(&f.vault_dir()) - before;
    assert!(growth < 64 * 1024, "an unchanged disk grew the vault by {growth} bytes");
    assert_eq!(same_again.disks[&name("sda")].index_root, full.disks[&name("sda")].index_root);
    assert_eq!(same_again.disks[&name("sda")].stats.bytes_changed, 0);

    cairn_sample::mutate_scattered(&a, 0.01, 4).unwrap();
    let before = dir_size(&f.vault_dir());
    let incr = f.backup("vm", &[("sda", &a)]).await.unwrap();
    let incr_growth = dir_size(&f.vault_dir()) - before;
    assert!(
        incr_growth * 5 < full_growth,
        "1% scattered change grew the vault by {incr_growth} after a full of {full_growth}"
    );
    let stats = &incr.disks[&name("sda")].stats;
    assert!(stats.bytes_changed > 0 && stats.bytes_changed < (64 << 20) / 4, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_disks_are_stored_once() {
    let f = Fixture::new(65536).await;
    let a = f.sample("a.raw", 16 << 20, 5);
    let b = f.path("b.raw");
    std::fs::copy(&a, &b).unwrap();
    let m = f.backup("vm", &[("one", &a)]).await.unwrap();
    let other = f.backup("other-vm", &[("copy", &b)]).await.unwrap();
    let first = &m.disks[&name("one")].stats;
    let second = &other.disks[&name("copy")].stats;
    assert!(first.bytes_sent > 0);
    assert_eq!(second.bytes_deduplicated, first.bytes_changed, "{second:?}");
    assert!(second.bytes_sent < 64 * 1024, "{second:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_changed_size_gets_a_full_scan_not_an_error() {
    let f = Fixture::new(4096).await;
    let a = f.sample("a.raw", 8 << 20, 6);
    f.backup("vm", &[("sda", &a)]).await.unwrap();
    std::fs::OpenOptions::new().write(true).open(&a).unwrap().set_len(10 << 20).unwrap();
    let m = f.backup("vm", &[("sda", &a)]).await.unwrap();
    let disk = &m.disks[&name("sda")];
    assert!(disk.previous_point.is_none());
    assert!(
        m.evidence.iter().any(|e| e.kind == "full_scan" && e.message.contains("size changed")),
        "{:?}",
        m.evidence
    );
    f.restore(&m, "sda", &f.path("r.raw")).await.unwrap();
    assert!(same(&a, &f.path("r.raw")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_memory_store_behaves_like_the_local_one() {
    let store = Arc::new(InMemory::new());
    let vault =
        Vault::create_in(store.clone(), "memory://test", cairn_vault::Durability::OnAck, 4096)
            .await
            .unwrap();
    let reopened =
        Vault::open_store(store, "memory://test", cairn_vault::Durability::OnAck).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    cairn_sample::create_disk(&a, 4 << 20, 7).unwrap();
    let m =
        backup_with(&reopened, "vm", &[("sda", &a)], &cairn_backup::Cancel::new()).await.unwrap();
    let out = dir.path().join("r.raw");
    restore_from(&vault, &m, "sda", &out).await.unwrap();
    assert!(same(&a, &out));
    assert!(vault.verify(&Default::default(), &|_| {}).await.unwrap().is_clean());
}
