//! Resume: a backup that failed half-way leaves its uploads to the next backup of the VM,
//! which checks them and does not send them again.

use std::sync::Arc;

use cairn_backup::{Cancel, DiskInput, DiskProgress, Progress};
use cairn_delta::RawFile;
use cairn_vault::{CreateOptions, Credential, Vault};

use crate::support::{name, request, restore_from, same};

/// Cancels the job once `after` bytes were sent.
struct CancelAfter {
    after: u64,
    cancel: Cancel,
}

impl Progress for CancelAfter {
    fn disk(&self, update: &DiskProgress) {
        if update.bytes_sent >= self.after {
            self.cancel.cancel();
        }
    }
}

fn sent(m: &cairn_format::PointManifest) -> u64 {
    m.disks.values().map(|d| d.stats.bytes_sent).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_backup_leaves_its_uploads_to_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("sda.raw");
    cairn_sample::create_disk(&disk, 96 << 20, 21).unwrap();
    let url = dir.path().join("vault").display().to_string();
    let key = Credential::KeyFile(vec![b'r'; 64].into());
    let vault = Vault::create_with(&url, &CreateOptions::encrypted(65536, key)).await.unwrap();

    // A reference: what a full backup of this disk sends, in another vault.
    let other =
        Vault::create(&dir.path().join("other").display().to_string(), 65536).await.unwrap();
    let full =
        crate::support::backup_with(&other, "vm", &[("sda", &disk)], &Cancel::new()).await.unwrap();

    // The first attempt is stopped once about half of it was sent.
    let cancel = Cancel::new();
    let progress = Arc::new(CancelAfter { after: sent(&full) / 2, cancel: cancel.clone() });
    let input = DiskInput { name: name("sda"), source: Arc::new(RawFile::open(&disk).unwrap()) };
    let err = cairn_backup::backup(&vault, request("vm", vec![input], 2), progress, &cancel)
        .await
        .unwrap_err();
    assert!(matches!(err, cairn_backup::Error::Cancelled), "{err}");
    assert!(vault.list_points(None).await.unwrap().points.is_empty(), "nothing was committed");
    assert_eq!(vault.inflight().await.unwrap().len(), 1, "the marker stays, to resume from");

    // The next backup sends only what the first did not.
    let next =
        crate::support::backup_with(&vault, "vm", &[("sda", &disk)], &Cancel::new()).await.unwrap();
    let resent = sent(&next);
    eprintln!("full {} bytes; after an interrupted half, the next sent {resent}", sent(&full));
    assert!(resent * 10 < sent(&full) * 7, "sent {resent} of {}", sent(&full));
    assert!(next.evidence.iter().any(|e| e.kind == "resume"), "{:?}", next.evidence);
    // It restores, verifies, and the interrupted backup's marker and records are gone.
    let to = dir.path().join("restored");
    restore_from(&vault, &next, "sda", &to).await.unwrap();
    assert!(same(&to, &disk));
    assert!(vault.verify(&Default::default(), &|_| {}).await.unwrap().is_clean());
    assert!(vault.inflight().await.unwrap().is_empty(), "{:?}", vault.inflight().await);
}
