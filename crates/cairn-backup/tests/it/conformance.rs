//! One vault conformance suite, run on every backend: a local folder, memory, S3 (moto) and
//! Azure Blob (Azurite), the emulators started by `scripts/object-stores.sh`, each encrypted
//! and in plaintext. Each goes through init, a full backup, an incremental, restores of both, verify, a damaged
//! chunk found, quarantined and stored again, two writers at once, and a concurrent writer
//! detected.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use cairn_backup::Cancel;
use cairn_format::{Digest, PointManifest};
use cairn_vault::{CreateOptions, Credential, Durability, OpenOptions, Vault};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::support::{backup_with, name, restore_from, same};

/// A backend under test: how to create its vault, and how a second host opens it.
struct Backend {
    name: String,
    url: String,
    /// The key of an encrypted vault.
    key: Option<Credential>,
    /// The memory store is only reachable through the first handle's store.
    shared: Option<Arc<dyn ObjectStore>>,
}

impl Backend {
    fn options(&self) -> CreateOptions {
        CreateOptions { key: self.key.clone(), ..CreateOptions::plain(65536) }
    }

    async fn create(&mut self) -> Vault {
        let vault = Vault::create_with(&self.url, &self.options())
            .await
            .unwrap_or_else(|e| panic!("{}: create {}: {e}", self.name, self.url));
        if self.url.starts_with("memory:") {
            self.shared = Some(Arc::clone(vault.store()));
        }
        vault
    }

    /// The same vault opened again, as another host would.
    async fn reopen(&self) -> Vault {
        let key = self.key.as_ref();
        match &self.shared {
            Some(store) => {
                Vault::open_store_with(Arc::clone(store), &self.url, Durability::OnAck, key)
                    .await
                    .unwrap()
            }
            None => {
                let options = OpenOptions { key: key.cloned(), ..Default::default() };
                Vault::open_with(&self.url, &options).await.unwrap()
            }
        }
    }
}

fn backends(dir: &Path) -> Vec<Backend> {
    let mut places = vec![
        ("local", dir.join("vault").display().to_string()),
        ("memory", "memory://conformance".to_string()),
    ];
    places.extend(cairn_testkit::object_store_urls());
    let mut all = Vec::new();
    for (name, url) in places {
        for encrypted in [true, false] {
            let key = encrypted.then(|| Credential::KeyFile(vec![b'k'; 64].into()));
            let (suffix, mode) =
                if encrypted { ("enc", "encrypted") } else { ("plain", "plaintext") };
            let url =
                if url.starts_with("memory:") { url.clone() } else { format!("{url}-{suffix}") };
            all.push(Backend { name: format!("{name} {mode}"), url, key, shared: None });
        }
    }
    all
}

async fn backup(vault: &Vault, vm: &str, disks: &[(&str, &Path)]) -> PointManifest {
    backup_with(vault, vm, disks, &Cancel::new()).await.unwrap()
}

fn sent(m: &PointManifest) -> u64 {
    m.disks.values().map(|d| d.stats.bytes_sent).sum()
}

/// The data chunks a point's disk needs.
async fn chunks_of(vault: &Vault, m: &PointManifest, disk: &str) -> HashSet<Digest> {
    let root = vault.read_disk_index(&m.disks[&name(disk)]).await.unwrap();
    let mut chunks = HashSet::new();
    for (n, page) in root.page_digests().enumerate() {
        let page = vault.read_page_of(&root, n as u64, &page).await.unwrap();
        chunks.extend(page.entries().flat_map(|e| e.chunks()));
    }
    chunks
}

/// Flips one byte inside the stored frame of chunk `id`, through the store itself.
async fn damage_chunk(vault: &Vault, id: &Digest) {
    let loc = vault.locate_chunk(id).await.unwrap().expect("the chunk is stored");
    let pack = ObjectPath::from(format!("packs/{}/{}", &loc.pack.to_hex()[..2], loc.pack));
    let store = vault.store();
    let mut bytes = store.get(&pack).await.unwrap().bytes().await.unwrap().to_vec();
    bytes[loc.offset as usize + 20] ^= 0x55;
    store.put(&pack, bytes.into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_backs_up_restores_verifies_and_quarantines_alike() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    for mut backend in backends(dir.path()) {
        let label = backend.name.clone();
        let label = label.as_str();
        eprintln!("backend {label}: {}", backend.url);
        cairn_sample::create_disk(&a, 12 << 20, 1).unwrap();
        cairn_sample::create_disk(&b, 6 << 20, 2).unwrap();
        let vault = backend.create().await;
        // Creating it twice is refused, on every backend.
        let again = Vault::create_with(&backend.url, &backend.options()).await;
        if backend.shared.is_none() {
            assert!(matches!(again, Err(cairn_vault::Error::AlreadyExists { .. })), "{label}");
        }

        let full = backup(&vault, "vm", &[("sda", &a), ("sdb", &b)]).await;
        let a_then = dir.path().join("a.then");
        std::fs::copy(&a, &a_then).unwrap();
        cairn_sample::mutate_scattered(&a, 0.02, 9).unwrap();
        let incr = backup(&vault, "vm", &[("sda", &a), ("sdb", &b)]).await;
        assert!(sent(&incr) * 4 < sent(&full), "{label}: {} after {}", sent(&incr), sent(&full));

        // Both points restore identically, from another handle on the vault.
        let other = backend.reopen().await;
        let points = other.list_points(Some(&name("vm"))).await.unwrap().points;
        assert_eq!(points.len(), 2, "{label}");
        let mut n = 0;
        let mut out = || {
            n += 1;
            dir.path().join(format!("{label}.{n}.out"))
        };
        let to = out();
        restore_from(&other, &points[0], "sda", &to).await.unwrap();
        assert!(same(&to, &a_then), "{label}: full point");
        let to = out();
        restore_from(&other, &points[1], "sda", &to).await.unwrap();
        assert!(same(&to, &a), "{label}: incremental point");
        let to = out();
        restore_from(&other, &points[1], "sdb", &to).await.unwrap();
        assert!(same(&to, &b), "{label}: second disk");
        let report = other.verify(&Default::default(), &|_| {}).await.unwrap();
        assert!(report.is_clean(), "{label}: {report:?}");

        // A damaged chunk of the incremental: found, quarantined, the point that needs it
        // marked, and stored again by the next backup of that content, after which
        // everything verifies.
        let only_new =
            &chunks_of(&vault, &incr, "sda").await - &chunks_of(&vault, &full, "sda").await;
        damage_chunk(&vault, only_new.iter().next().expect("the incremental stored chunks")).await;
        let report = other.verify(&Default::default(), &|_| {}).await.unwrap();
        assert!(!report.bad_chunks.is_empty(), "{label}: the flipped byte was not found");
        assert!(!other.damaged_points(&name("vm")).await.unwrap().is_empty(), "{label}");
        cairn_sample::mutate_scattered(&b, 0.01, 10).unwrap();
        let mended = backup(&other, "vm", &[("sda", &a), ("sdb", &b)]).await;
        let report = other.verify(&Default::default(), &|_| {}).await.unwrap();
        assert!(report.is_clean(), "{label}: after the repair: {report:?}");
        assert!(other.damaged_points(&name("vm")).await.unwrap().is_empty(), "{label}");
        let to = out();
        restore_from(&vault, &mended, "sda", &to).await.unwrap();
        assert!(same(&to, &a), "{label}: mended point");
        let to = out();
        restore_from(&vault, &points[1], "sda", &to).await.unwrap();
        assert!(same(&to, &a), "{label}: the damaged point is whole again");

        // Two writers at once, as two hosts: both commit, both restore.
        let (disk_one, disk_two) = ([("sda", a.as_path())], [("sda", b.as_path())]);
        let (one, two) =
            tokio::join!(backup(&vault, "vm-one", &disk_one), backup(&other, "vm-two", &disk_two),);
        let to = out();
        restore_from(&other, &one, "sda", &to).await.unwrap();
        assert!(same(&to, &a), "{label}: first writer");
        let to = out();
        restore_from(&vault, &two, "sda", &to).await.unwrap();
        assert!(same(&to, &b), "{label}: second writer");

        // Two writers that chose one point id: the second is stopped at its start, and a
        // commit that races past that is refused rather than overwriting the first.
        let vm = name("vm-race");
        let id = vault.reserve_point_id(&vm, jiff::Timestamp::now()).await.unwrap();
        let first = vault.begin_point_as(&vm, jiff::Timestamp::now(), Some(id.clone())).await;
        let first = first.unwrap();
        let second = other.begin_point_as(&vm, jiff::Timestamp::now(), Some(id.clone())).await;
        assert!(matches!(second, Err(cairn_vault::Error::Concurrent { .. })), "{label}");
        let manifest = PointManifest { point: id.clone(), vm: vm.clone(), ..points[0].clone() };
        let manifest = PointManifest { disks: Default::default(), ..manifest };
        let path = ObjectPath::from(format!("points/{vm}/{id}.json"));
        vault.store().put(&path, b"{}".to_vec().into()).await.unwrap();
        let err = first.commit(&manifest).await.unwrap_err();
        assert!(matches!(err, cairn_vault::Error::Concurrent { .. }), "{label}: {err}");
        let raced = vault.store().get(&path).await.unwrap().bytes().await.unwrap();
        assert_eq!(&raced[..], b"{}", "{label}: the first commit stands");
    }
}
