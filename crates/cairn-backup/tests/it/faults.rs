//! Backups through a store that fails on purpose (errors, lost answers, stalls past the
//! attempt timeout, cut reads) at 5%, and every fourth through one that fails nine times in ten:
//! each backup completes or fails with a clean error,
//! every point that became visible restores identically, and the vault verifies clean.
//!
//! CI runs a seeded 12 rounds on memory and on S3 (moto); `CAIRN_SOAK=1` runs 100 on each.

use std::sync::Arc;
use std::time::Duration;

use cairn_backup::Cancel;
use cairn_format::Digest;
use cairn_vault::faults::{Faults, FaultyStore};
use cairn_vault::{CreateOptions, Credential, Durability, RetryPolicy, Vault};

use crate::support::{backup_with, name, restore_from};

fn rounds() -> u64 {
    if std::env::var_os("CAIRN_SOAK").is_some() { 100 } else { 12 }
}

/// Short timeouts and backoff, so stalls and retries cost the test little time.
fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        attempts: 5,
        first_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(100),
        attempt_timeout: Duration::from_millis(1500),
    }
}

fn digest_of(path: &std::path::Path) -> Digest {
    Digest::of(&std::fs::read(path).unwrap())
}

async fn faulty_backups_on(label: &str, clean: Vault, key: Option<Credential>, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("sda.raw");
    cairn_sample::create_disk(&disk, 8 << 20, seed).unwrap();
    let faults = Faults {
        rate: 0.05,
        seed,
        latency: Duration::from_millis(2),
        stall: Duration::from_secs(4),
    };
    let faulty = Arc::new(FaultyStore::new(Arc::clone(clean.store()), faults));
    let counts = faulty.counts();
    let vault = Vault::open_store_with(
        Arc::clone(&faulty) as _,
        clean.url(),
        Durability::OnAck,
        key.as_ref(),
    )
    .await
    .unwrap()
    .with_retry_policy(quick_retries());
    let vm = name("vm");
    // What the disk held at each point that became visible.
    let mut expected: Vec<(cairn_format::PointId, Digest)> = Vec::new();
    let (mut completed, mut failed) = (0, 0);
    for round in 0..rounds() {
        cairn_sample::mutate_scattered(&disk, 0.02, seed * 1000 + round).unwrap();
        let content = digest_of(&disk);
        // Every fourth round the store fails nine times in ten: retries cannot save those
        // backups, and they must fail cleanly.
        faulty.set_rate(if round % 4 == 3 { 0.9 } else { 0.05 });
        let result = backup_with(&vault, "vm", &[("sda", &disk)], &Cancel::new()).await;
        faulty.set_rate(0.05);
        match result {
            Ok(m) => {
                completed += 1;
                expected.push((m.point, content));
            }
            Err(e) => {
                failed += 1;
                // A clean failure names the store operation that failed for good.
                let text = e.to_string();
                assert!(
                    matches!(e, cairn_backup::Error::Vault(_)) || text.contains("injected fault"),
                    "{label} round {round}: not a clean failure: {text}"
                );
                // A failure whose commit landed (every answer to it lost) left a whole point.
                let now = clean.list_points(Some(&vm)).await.unwrap().points;
                if let Some(newer) =
                    now.last().filter(|p| expected.last().is_none_or(|(q, _)| p.point > *q))
                {
                    expected.push((newer.point.clone(), content));
                }
            }
        }
    }
    eprintln!(
        "{label}: {completed} backups completed, {failed} failed cleanly, {} faults injected",
        counts.total()
    );
    assert!(counts.total() > 0, "{label}: no fault was injected");
    assert!(completed > 0, "{label}: no backup completed");
    assert!(failed > 0, "{label}: no backup failed, the failure path was not tested");
    // Exactly the points expected are visible, each restores to what the disk held.
    let points = clean.list_points(Some(&vm)).await.unwrap();
    assert!(points.unreadable.is_empty(), "{label}: {:?}", points.unreadable);
    let visible: Vec<_> = points.points.iter().map(|p| p.point.clone()).collect();
    let wanted: Vec<_> = expected.iter().map(|(p, _)| p.clone()).collect();
    assert_eq!(visible, wanted, "{label}: visible points");
    for (m, (_, content)) in points.points.iter().zip(&expected) {
        let to = dir.path().join(format!("restored-{}", m.point));
        restore_from(&clean, m, "sda", &to).await.unwrap();
        assert_eq!(digest_of(&to), *content, "{label}: point {}", m.point);
        std::fs::remove_file(&to).unwrap();
    }
    let report = clean.verify(&Default::default(), &|_| {}).await.unwrap();
    assert!(report.is_clean(), "{label}: {report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_percent_faults_in_memory_fail_cleanly_or_commit_whole_points() {
    let clean = Vault::create("memory://faults", 65536).await.unwrap();
    faulty_backups_on("memory", clean, None, 11).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_percent_faults_on_s3_fail_cleanly_or_commit_whole_points() {
    for (backend, url) in cairn_testkit::object_store_urls() {
        if backend != "s3" {
            continue;
        }
        // Encrypted, as an S3 vault should be: sealed objects under faults too.
        let key = Credential::KeyFile(vec![b'f'; 64].into());
        let clean =
            Vault::create_with(&url, &CreateOptions::encrypted(65536, key.clone())).await.unwrap();
        faulty_backups_on(backend, clean, Some(key), 12).await;
    }
}
