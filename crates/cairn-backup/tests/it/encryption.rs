//! Encrypted vaults: nothing of the disks is visible in the vault's objects, keys open only
//! their vault, slots can be added, rotated and removed without rewriting data, and any
//! flipped bit in any object is detected and named.

use std::path::{Path, PathBuf};

use cairn_backup::Cancel;
use cairn_format::keyslot::{Argon2Costs, SlotKind};
use cairn_vault::{CreateOptions, Credential, OpenOptions, Vault};

use crate::support::{backup_with, name, restore_from, same};

fn key_file(byte: u8) -> Credential {
    Credential::KeyFile(vec![byte; 64].into())
}

fn passphrase(text: &str) -> Credential {
    Credential::Passphrase(text.as_bytes().to_vec().into())
}

/// Cheap Argon2id costs: the tests open passphrase slots many times.
fn cheap() -> Argon2Costs {
    Argon2Costs { memory_kib: 1024, iterations: 1, parallelism: 1 }
}

async fn open(url: &str, key: Option<Credential>) -> Result<Vault, cairn_vault::Error> {
    Vault::open_with(url, &OpenOptions { key, ..Default::default() }).await
}

/// Every file under `dir`, with its bytes.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_block_of_the_disk_appears_in_any_vault_object() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("sda.raw");
    cairn_sample::create_disk(&disk, 16 << 20, 5).unwrap();
    let url = dir.path().join("vault").display().to_string();
    let options =
        CreateOptions { argon2: cheap(), ..CreateOptions::encrypted(65536, passphrase("pw")) };
    let vault = Vault::create_with(&url, &options).await.unwrap();
    backup_with(&vault, "vm", &[("sda", &disk)], &Cancel::new()).await.unwrap();
    cairn_sample::mutate_scattered(&disk, 0.02, 6).unwrap();
    let incr = backup_with(&vault, "vm", &[("sda", &disk)], &Cancel::new()).await.unwrap();
    assert!(incr.disks[&name("sda")].stats.patched_blocks > 0, "patches are covered too");

    // Every 4 KiB block of the disk that is not trivial (zeros, one repeated byte) is searched
    // for, in full, in every object of the vault.
    let data = std::fs::read(&disk).unwrap();
    let objects = files(Path::new(&url));
    let mut blocks = std::collections::HashSet::new();
    for block in data.chunks(4096) {
        if block.iter().any(|b| *b != block[0]) {
            blocks.insert(block);
        }
    }
    assert!(blocks.len() > 1000, "the sample has {} distinct blocks", blocks.len());
    for (path, bytes) in &objects {
        // A window of 4096 bytes at every offset, looked up by its first 8 bytes.
        let mut by_prefix: std::collections::HashMap<&[u8], Vec<&[u8]>> = Default::default();
        for b in &blocks {
            by_prefix.entry(&b[..8]).or_default().push(b);
        }
        for at in 0..bytes.len().saturating_sub(4095) {
            if let Some(candidates) = by_prefix.get(&bytes[at..at + 8]) {
                for block in candidates {
                    assert!(
                        &bytes[at..at + 4096] != *block,
                        "a plaintext block of the disk is in {} at {at}",
                        path.display()
                    );
                }
            }
        }
    }
    // Nor a VM's evidence or a disk's name in a manifest, which is sealed.
    for (path, bytes) in &objects {
        let text = String::from_utf8_lossy(bytes);
        assert!(!text.contains("sda.raw") && !text.contains("bytes_sent"), "{}", path.display());
    }
    // And the points restore.
    let to = dir.path().join("restored");
    restore_from(&vault, &incr, "sda", &to).await.unwrap();
    assert!(same(&to, &disk));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_open_only_their_vault_and_slots_rotate_without_rewriting_data() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("sda.raw");
    cairn_sample::create_disk(&disk, 4 << 20, 7).unwrap();
    let url = dir.path().join("vault").display().to_string();
    let options =
        CreateOptions { argon2: cheap(), ..CreateOptions::encrypted(65536, passphrase("old")) };
    let vault = Vault::create_with(&url, &options).await.unwrap();
    let point = backup_with(&vault, "vm", &[("sda", &disk)], &Cancel::new()).await.unwrap();
    let packs_before: Vec<_> =
        files(&Path::new(&url).join("packs")).into_iter().map(|(p, _)| p).collect();

    // No key, a wrong passphrase, a key file where only a passphrase slot exists: one clear
    // error each.
    let err = open(&url, None).await.unwrap_err();
    assert!(matches!(err, cairn_vault::Error::KeyRequired { .. }), "{err}");
    assert!(err.to_string().contains("--key-file"), "{err}");
    let err = open(&url, Some(passphrase("nope"))).await.unwrap_err();
    assert!(matches!(err, cairn_vault::Error::WrongKey { .. }), "{err}");
    assert!(err.to_string().contains("wrong key"), "{err}");
    let err = open(&url, Some(key_file(1))).await.unwrap_err();
    assert!(err.to_string().contains("no key slot for a key file"), "{err}");

    // Rotation: a new passphrase and a key file are added, the old passphrase removed.
    let opened = open(&url, Some(passphrase("old"))).await.unwrap();
    let new = opened.add_key(&passphrase("new"), None, cheap(), "rotated".into()).await.unwrap();
    let file = opened.add_key(&key_file(9), None, cheap(), String::new()).await.unwrap();
    let recovery_key = key_file(3);
    let recovery = opened
        .add_key(&recovery_key, Some(SlotKind::Recovery), cheap(), String::new())
        .await
        .unwrap();
    let (slots, unreadable) = opened.key_slots().await.unwrap();
    assert_eq!(slots.len(), 4);
    assert!(unreadable.is_empty());
    let old = slots.iter().find(|s| s.label == "created with the vault").unwrap().slot.clone();
    // The slot a handle was opened with is not removed through that handle...
    let err = opened.remove_key(&old).await.unwrap_err();
    assert!(matches!(err, cairn_vault::Error::LastKey { .. }), "{err}");
    // ...but through one opened with another key.
    open(&url, Some(passphrase("new"))).await.unwrap().remove_key(&old).await.unwrap();
    assert!(matches!(
        open(&url, Some(passphrase("old"))).await,
        Err(cairn_vault::Error::WrongKey { .. })
    ));
    for key in [passphrase("new"), key_file(9), key_file(3)] {
        let v = open(&url, Some(key)).await.unwrap();
        let out = dir.path().join(format!("out-{}", rand_suffix()));
        restore_from(&v, &point, "sda", &out).await.unwrap();
        assert!(same(&out, &disk));
    }
    // Removing slots rewrote no data, and the last slot stays.
    let packs_after: Vec<_> =
        files(&Path::new(&url).join("packs")).into_iter().map(|(p, _)| p).collect();
    assert_eq!(packs_before, packs_after);
    opened.remove_key(&new.slot).await.unwrap();
    opened.remove_key(&file.slot).await.unwrap();
    let err = opened.remove_key(&recovery.slot).await.unwrap_err();
    assert!(matches!(err, cairn_vault::Error::LastKey { .. }), "{err}");
    let err = opened.remove_key("0123456789abcdef").await.unwrap_err();
    assert!(matches!(err, cairn_vault::Error::NoSuchKey { .. }), "{err}");

    // A slot of another vault copied in opens to another master key: refused by name.
    let other_url = dir.path().join("other").display().to_string();
    let other = Vault::create_with(&other_url, &CreateOptions::encrypted(65536, key_file(5)))
        .await
        .unwrap();
    let (other_slots, _) = other.key_slots().await.unwrap();
    let planted = &other_slots[0];
    std::fs::copy(
        Path::new(&other_url).join(format!("keys/{}.json", planted.slot)),
        Path::new(&url).join(format!("keys/{}.json", planted.slot)),
    )
    .unwrap();
    // Bound to its vault id, the planted slot does not even open here.
    assert!(matches!(
        open(&url, Some(key_file(5))).await,
        Err(cairn_vault::Error::WrongKey { .. })
    ));
    // A plaintext vault's key operations say it has none, and a key given for a plaintext
    // vault is refused: its config may have been swapped for a plaintext one.
    let plain_url = dir.path().join("plain").display().to_string();
    let plain = Vault::create(&plain_url, 65536).await.unwrap();
    let err = plain.add_key(&key_file(1), None, cheap(), String::new()).await.unwrap_err();
    assert!(matches!(err, cairn_vault::Error::NotEncrypted { .. }), "{err}");
    let err = open(&plain_url, Some(key_file(1))).await.unwrap_err();
    assert!(matches!(err, cairn_vault::Error::UnexpectedPlaintext { .. }), "{err}");
    // A planted giant slot is refused by its size, not read.
    std::fs::write(Path::new(&url).join("keys/ffffffffffffffff.json"), vec![b' '; 1 << 20])
        .unwrap();
    let err = open(&url, Some(key_file(3))).await.unwrap_err();
    assert!(matches!(err, cairn_vault::Error::TooLarge { .. }), "{err}");
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_in_any_object_is_detected_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("sda.raw");
    cairn_sample::create_disk(&disk, 2 << 20, 8).unwrap();
    let url = dir.path().join("vault").display().to_string();
    let vault =
        Vault::create_with(&url, &CreateOptions::encrypted(65536, key_file(4))).await.unwrap();
    let point = backup_with(&vault, "vm", &[("sda", &disk)], &Cancel::new()).await.unwrap();
    let pristine = files(Path::new(&url));
    let mut checked = 0;
    for (path, bytes) in &pristine {
        let rel = path.strip_prefix(&url).unwrap().display().to_string();
        // A few positions per object: the start, the middle, the last byte.
        for at in [0, bytes.len() / 2, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x04;
            std::fs::write(path, &bad).unwrap();
            let found = detect(&url, &point).await;
            // Verify quarantines and records what it finds: put the whole vault back.
            reset(Path::new(&url), &pristine);
            assert!(found.is_some(), "a flipped bit at {at} of {rel} went unnoticed");
            checked += 1;
        }
    }
    assert!(checked >= 15, "{checked} objects checked");
    assert!(detect(&url, &point).await.is_none(), "the restored vault is whole");
}

/// Puts the vault folder back to exactly `files`.
fn reset(root: &Path, files: &[(PathBuf, Vec<u8>)]) {
    std::fs::remove_dir_all(root).unwrap();
    for (path, bytes) in files {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

/// What notices damage: opening the vault, reading the point, verify, or a restore compared
/// with the disk. `None` if all is well.
async fn detect(url: &str, point: &cairn_format::PointManifest) -> Option<String> {
    let vault = match open(url, Some(key_file(4))).await {
        Ok(v) => v,
        Err(e) => return Some(format!("open: {e}")),
    };
    let listing = match vault.list_points(None).await {
        Ok(l) => l,
        Err(e) => return Some(format!("list: {e}")),
    };
    if let Some(u) = listing.unreadable.first() {
        return Some(format!("manifest {}: {}", u.path, u.error));
    }
    match vault.verify(&Default::default(), &|_| {}).await {
        Ok(report) if !report.is_clean() => return Some(format!("verify: {report:?}")),
        Ok(_) => {}
        Err(e) => return Some(format!("verify: {e}")),
    }
    if listing.points.first().map(|p| &p.point) != Some(&point.point) {
        return Some("the point is gone".into());
    }
    None
}
