//! Shared helpers: vaults in temp folders, sample disks, backups in one call.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_backup::{BackupRequest, Cancel, DiskInput, NoProgress, RestoreOptions};
use cairn_delta::RawFile;
use cairn_format::{Consistency, Name, PointManifest};
pub use cairn_testkit::root_or_skip;
use cairn_vault::Vault;

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub vault: Vault,
}

impl Fixture {
    pub async fn new(block_size: u32) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().join("vault");
        let vault = Vault::create(url.to_str().unwrap(), block_size).await.unwrap();
        Fixture { dir, vault }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn vault_dir(&self) -> PathBuf {
        self.dir.path().join("vault")
    }

    pub fn sample(&self, name: &str, size: u64, seed: u64) -> PathBuf {
        let p = self.path(name);
        cairn_sample::create_disk(&p, size, seed).unwrap();
        p
    }

    pub async fn backup(
        &self,
        vm: &str,
        disks: &[(&str, &Path)],
    ) -> Result<PointManifest, cairn_backup::Error> {
        backup_with(&self.vault, vm, disks, &Cancel::new()).await
    }

    pub async fn restore(
        &self,
        m: &PointManifest,
        disk: &str,
        to: &Path,
    ) -> Result<(), cairn_backup::Error> {
        let opts = RestoreOptions::default();
        cairn_backup::restore_disk(&self.vault, m, &name(disk), to, &opts, Arc::new(NoProgress))
            .await
            .map(|_| ())
    }

    /// Verifies the whole vault.
    pub async fn verify(&self) -> cairn_vault::VerifyReport {
        self.vault.verify(&Default::default(), &|_| {}).await.unwrap()
    }

    pub async fn verify_clean(&self) -> bool {
        self.verify().await.is_clean()
    }
}

pub async fn backup_with(
    vault: &Vault,
    vm: &str,
    disks: &[(&str, &Path)],
    cancel: &Cancel,
) -> Result<PointManifest, cairn_backup::Error> {
    let inputs = disks
        .iter()
        .map(|(n, p)| Ok(DiskInput { name: name(n), source: Arc::new(RawFile::open(p)?) }))
        .collect::<Result<Vec<_>, cairn_delta::Error>>()
        .map_err(|source| cairn_backup::Error::Disk { disk: name(disks[0].0), source })?;
    cairn_backup::backup(vault, request(vm, inputs, 2), Arc::new(NoProgress), cancel).await
}

/// Restores one disk with default options and no progress.
pub async fn restore_from(
    vault: &Vault,
    m: &PointManifest,
    disk: &str,
    to: &Path,
) -> Result<(), cairn_backup::Error> {
    let opts = RestoreOptions::default();
    cairn_backup::restore_disk(vault, m, &name(disk), to, &opts, Arc::new(NoProgress))
        .await
        .map(|_| ())
}

/// A live-read backup request for `vm` with `threads` hashing threads per disk.
pub fn request(vm: &str, disks: Vec<DiskInput>, threads: usize) -> BackupRequest {
    BackupRequest {
        vm: name(vm),
        disks,
        consistency: Consistency::None,
        captured_at: None,
        evidence: vec![],
        threads: Some(threads),
        point: None,
        parallel_disks: None,
        retain_until: None,
        machine: None,
        origin: None,
        snapshot: None,
    }
}

pub fn name(s: &str) -> Name {
    s.parse().unwrap()
}

pub fn same(a: &Path, b: &Path) -> bool {
    cairn_sample::same_content(a, b).unwrap()
}

/// Bytes the file system really allocated for `p`.
pub fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// Total size of the files under `dir`.
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() { dir_size(&entry.path()) } else { meta.len() };
    }
    total
}

/// Commits a point of `vm`, written by hand as a hostile (or a test's) writer of the vault
/// could: `chunks` (plaintexts: blocks, pages) are stored, then `root` as the index root of
/// its one disk `sda`, which its manifest says is `size` bytes in 64 KiB blocks.
pub async fn commit_by_hand(
    f: &Fixture,
    vm: &str,
    size: u64,
    chunks: &[&[u8]],
    root: &[u8],
) -> PointManifest {
    let now = jiff::Timestamp::now();
    let writer = f.vault.begin_point(&name(vm), now).await.unwrap();
    let mut packs = writer.pack_writer();
    for chunk in chunks {
        packs.store_plain(chunk).await.unwrap();
    }
    let (root_id, _) = packs.store_plain(root).await.unwrap();
    packs.finish().await.unwrap();
    let disk = cairn_format::DiskRecord {
        size,
        block_size: 65536,
        index_root: root_id,
        previous_point: None,
        source: "by hand".into(),
        stats: Default::default(),
    };
    let manifest = PointManifest {
        format: cairn_format::MANIFEST_FORMAT,
        point: writer.point().clone(),
        vm: name(vm),
        started_at: now,
        captured_at: now,
        finished_at: now,
        consistency: Consistency::None,
        disks: [(name("sda"), disk)].into_iter().collect(),
        evidence: vec![],
        writer: "by hand".into(),
        machine: None,
        origin: None,
    };
    writer.commit(&manifest).await.unwrap();
    manifest
}
