//! Opening and creating vaults by URL, and the durability barrier.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cairn_format::keyslot::Argon2Costs;
use cairn_format::{Crypto, VaultConfig};
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use rand::RngExt;

use crate::backend::{Location, StoreOptions, locate};
use crate::keys::{self, Credential};
use crate::local_store::PrivateLocal;
use crate::{Error, RetryPolicy, RetryingStore, Vault, layout};

/// How writes to a store become durable.
#[derive(Clone, Debug)]
pub enum Durability {
    /// Writes are durable once acknowledged (object stores) or never (memory).
    OnAck,
    /// A local file system: chunks are written without fsync, and the barrier calls `syncfs`
    /// on the vault's file system once, before the manifest commits.
    SyncFs(Arc<LocalSync>),
}

/// Batched durability for a local vault.
///
/// Writeback is also started early, in the background, every [`EARLY_FLUSH_BYTES`] written,
/// so the disk writes while the CPUs hash and compress and the barrier at commit finds little
/// left to do. Early flushes are an optimisation only; the barrier is the guarantee.
///
/// A failed write-back must fail the commit of every job whose writes it may have lost. The
/// kernel reports a write-back error to `syncfs` once per open file, so every flush goes
/// through one descriptor opened with the vault (an error after that is seen by the next
/// flush, whichever it is), and every failed flush is counted: a job remembers the count
/// when it begins, and its commit barrier fails if the count moved.
#[derive(Debug)]
pub struct LocalSync {
    root: PathBuf,
    /// The vault's root folder, open for as long as the vault is: `syncfs` goes through it.
    dir: std::fs::File,
    pending: AtomicU64,
    flushing: AtomicBool,
    /// Flushes that failed, and the last failure's message.
    failures: AtomicU64,
    last_failure: Mutex<Option<String>>,
    /// Held across each `syncfs` and the counting of its failure: a barrier that follows a
    /// background flush which took the kernel's error then sees it counted.
    flush: Mutex<()>,
}

/// Bytes written between two background flushes of a local vault.
pub const EARLY_FLUSH_BYTES: u64 = 256 << 20;

impl LocalSync {
    fn new(root: PathBuf) -> Result<Arc<Self>, Error> {
        let dir = std::fs::File::open(&root).map_err(|e| Error::local_io(&root, e))?;
        Ok(Arc::new(LocalSync {
            root,
            dir,
            pending: AtomicU64::new(0),
            flushing: AtomicBool::new(false),
            failures: AtomicU64::new(0),
            last_failure: Mutex::new(None),
            flush: Mutex::new(()),
        }))
    }

    /// Flushes the vault's file system; a failure is counted before it is returned.
    fn syncfs(&self) -> Result<(), Error> {
        let _one_at_a_time = self.flush.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        rustix::fs::syncfs(&self.dir).map_err(|e| {
            let e = std::io::Error::from(e);
            if let Ok(mut last) = self.last_failure.lock() {
                *last = Some(e.to_string());
            }
            self.failures.fetch_add(1, Ordering::AcqRel);
            Error::local_io(&self.root, e)
        })
    }

    /// An early flush. Its failure is not returned to anyone, but it is counted: the commit
    /// barrier of every job running meanwhile fails.
    fn background_flush(&self) {
        if let Err(e) = self.syncfs() {
            tracing::warn!(error = %e, "background flush of the vault failed");
        }
        self.flushing.store(false, Ordering::Release);
    }

    /// Fails if any flush failed since `epoch` (a value of [`LocalSync::epoch`]).
    fn check_since(&self, epoch: u64) -> Result<(), Error> {
        let failures = self.failures.load(Ordering::Acquire);
        if failures == epoch {
            return Ok(());
        }
        let last = self.last_failure.lock().ok().and_then(|l| l.clone()).unwrap_or_default();
        Err(Error::WriteBack {
            path: self.root.display().to_string(),
            failures: failures.saturating_sub(epoch),
            last,
        })
    }

    fn epoch(&self) -> u64 {
        self.failures.load(Ordering::Acquire)
    }
}

impl Durability {
    /// The root folder of a local vault.
    pub(crate) fn local_root(&self) -> Option<&FsPath> {
        match self {
            Durability::SyncFs(local) => Some(&local.root),
            Durability::OnAck => None,
        }
    }

    /// Notes `bytes` written; on a local vault, starts a background flush now and then.
    pub(crate) fn wrote(&self, bytes: u64) {
        let Durability::SyncFs(local) = self else { return };
        if local.pending.fetch_add(bytes, Ordering::Relaxed) + bytes < EARLY_FLUSH_BYTES {
            return;
        }
        if local.flushing.swap(true, Ordering::AcqRel) {
            return;
        }
        local.pending.store(0, Ordering::Relaxed);
        let local = Arc::clone(local);
        tokio::task::spawn_blocking(move || local.background_flush());
    }

    /// A mark of the flush failures so far; a barrier since it fails if any came after.
    pub(crate) fn epoch(&self) -> u64 {
        match self {
            Durability::SyncFs(local) => local.epoch(),
            Durability::OnAck => 0,
        }
    }
}

fn local_store(path: &FsPath, url: &str) -> Result<Arc<dyn ObjectStore>, Error> {
    LocalFileSystem::new_with_prefix(path)
        .map(|s| Arc::new(PrivateLocal::new(s)) as Arc<dyn ObjectStore>)
        .map_err(|e| Error::Url { url: url.into(), detail: e.to_string() })
}

/// The largest config read: a config is under a kilobyte.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Mode of a local vault's root folder: the vault holds every VM's disks.
const ROOT_MODE: u32 = 0o700;

/// Creates a local vault's root 0700 (whatever the umask), or warns when an existing one lets
/// others in.
fn make_root(path: &FsPath) -> Result<(), Error> {
    let io = |source| Error::Io { path: path.display().to_string(), source };
    if path.is_dir() {
        warn_if_open(path);
        return Ok(());
    }
    std::fs::DirBuilder::new().recursive(true).mode(ROOT_MODE).create(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(ROOT_MODE)).map_err(io)
}

/// Warns when others may enter a local vault's root, or when it belongs to someone else.
fn warn_if_open(path: &FsPath) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else { return };
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        tracing::warn!(
            "vault folder {} belongs to uid {}, not to this process's user (uid {me}): whoever \
             owns it may change the vault under Cairn",
            path.display(),
            meta.uid()
        );
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            "vault folder {} has mode {mode:o}: other users of this host may read the VMs' disks \
             in it; `chmod 700 {}` closes it",
            path.display(),
            path.display()
        );
    }
}

/// How to create a vault.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Block size of disk indexes.
    pub block_size: u32,
    /// Options of the object store.
    pub store: StoreOptions,
    /// The first key of an encrypted vault; `None` creates a plaintext vault.
    pub key: Option<Credential>,
    /// Argon2id costs of a passphrase slot.
    pub argon2: Argon2Costs,
}

impl CreateOptions {
    /// A plaintext vault with `block_size`-byte blocks.
    pub fn plain(block_size: u32) -> Self {
        CreateOptions {
            block_size,
            store: StoreOptions::default(),
            key: None,
            argon2: Argon2Costs::default(),
        }
    }

    /// An encrypted vault with `block_size`-byte blocks, opened by `key`.
    pub fn encrypted(block_size: u32, key: Credential) -> Self {
        CreateOptions { key: Some(key), ..CreateOptions::plain(block_size) }
    }
}

/// How to open a vault.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Options of the object store.
    pub store: StoreOptions,
    /// The key of an encrypted vault (ignored, with a note in the log, by a plaintext one).
    pub key: Option<Credential>,
    /// Open append-only: see [`Vault::into_append_only`].
    pub append_only: bool,
}

impl Vault {
    /// Creates a plaintext vault at `url` with `block_size`-byte blocks (refuses if one
    /// exists).
    pub async fn create(url: &str, block_size: u32) -> Result<Vault, Error> {
        Vault::create_with(url, &CreateOptions::plain(block_size)).await
    }

    /// Creates a vault at `url` as `options` say (refuses if one exists).
    pub async fn create_with(url: &str, options: &CreateOptions) -> Result<Vault, Error> {
        let (store, durability) = match locate(url, &options.store)? {
            Location::Local(path) => {
                make_root(&path)?;
                (local_store(&path, url)?, Durability::SyncFs(LocalSync::new(path)?))
            }
            Location::Memory => {
                (Arc::new(InMemory::new()) as Arc<dyn ObjectStore>, Durability::OnAck)
            }
            Location::Remote(store) => (store, Durability::OnAck),
        };
        Vault::create_in_with(store, url, durability, options).await
    }

    /// Creates a plaintext vault in any object store.
    pub async fn create_in(
        store: Arc<dyn ObjectStore>,
        url: &str,
        durability: Durability,
        block_size: u32,
    ) -> Result<Vault, Error> {
        Vault::create_in_with(store, url, durability, &CreateOptions::plain(block_size)).await
    }

    /// Creates a vault in any object store, as `options` say.
    ///
    /// An encrypted vault's first key slot is written before its config: a vault whose config
    /// exists always has a way in. A slot left by a create that lost its race for the config
    /// is removed again.
    pub async fn create_in_with(
        store: Arc<dyn ObjectStore>,
        url: &str,
        durability: Durability,
        options: &CreateOptions,
    ) -> Result<Vault, Error> {
        let id = format!("{:032x}", rand::rng().random::<u128>());
        let now = jiff::Timestamp::now();
        let (config, crypto, master) = match &options.key {
            None => {
                // The piece-sum key: a secret of the vault, never derived from anything a
                // guest sees.
                let piece_key: [u8; 32] = rand::rng().random();
                (VaultConfig::new(id, now, options.block_size, piece_key)?, Crypto::none(), None)
            }
            Some(_) => {
                let master = keys::new_master_key();
                let crypto = Crypto::from_master(&master);
                let config = VaultConfig::new_encrypted(id, now, options.block_size, &crypto)?;
                (config, crypto, Some(Arc::new(master)))
            }
        };
        let mut vault = Vault::assemble(store, config, url, durability);
        vault.crypto = crypto;
        vault.master = master;
        let mut first_slot = None;
        if let (Some(key), Some(master)) = (&options.key, &vault.master) {
            let slot = keys::new_slot(
                &vault.config.vault_id,
                master,
                key,
                None,
                options.argon2,
                "created with the vault".into(),
            )?;
            let path = layout::key_slot(&slot.slot);
            vault.put_raw_new(&path, slot.encode(), "write").await?;
            first_slot = Some(path);
        }
        let path = layout::config();
        match vault.put_raw_new(&path, vault.config.encode(), "write").await {
            Ok(()) => {
                // Every commit rests on create-only writes: a store that ignores them (some
                // S3-compatible servers do) is refused before anything else is written.
                let again = vault.put_raw_new(&path, vault.config.encode(), "write").await;
                if again.is_ok() {
                    return Err(Error::NoCreateOnly { url: url.into() });
                }
            }
            Err(e) => {
                if let Some(slot) = &first_slot {
                    let _ = vault.delete_all(std::slice::from_ref(slot)).await;
                }
                return Err(match e {
                    Error::Storage {
                        source: object_store::Error::AlreadyExists { .. }, ..
                    } => Error::AlreadyExists { url: url.into() },
                    e => e,
                });
            }
        }
        vault.barrier().await?;
        Ok(vault)
    }

    /// Opens the plaintext vault at `url`: a plain path, `file:///path`, `s3://bucket/prefix`,
    /// `az://container/prefix` or `gs://bucket/prefix` (the store configured by its usual
    /// environment variables). An encrypted vault needs [`Vault::open_with`] and its key.
    pub async fn open(url: &str) -> Result<Vault, Error> {
        Vault::open_with(url, &OpenOptions::default()).await
    }

    /// Opens the vault at `url` as `options` say.
    pub async fn open_with(url: &str, options: &OpenOptions) -> Result<Vault, Error> {
        let vault = Vault::open_located(url, options).await?;
        Ok(if options.append_only { vault.into_append_only() } else { vault })
    }

    async fn open_located(url: &str, options: &OpenOptions) -> Result<Vault, Error> {
        let key = options.key.as_ref();
        match locate(url, &options.store)? {
            Location::Local(path) => {
                if !path.is_dir() {
                    return Err(Error::NoVault { url: url.into() });
                }
                warn_if_open(&path);
                let store = local_store(&path, url)?;
                let durability = Durability::SyncFs(LocalSync::new(path)?);
                Vault::open_store_with(store, url, durability, key).await
            }
            // A fresh memory store never holds a vault; embedders use `open_store`.
            Location::Memory => Err(Error::NoVault { url: url.into() }),
            Location::Remote(store) => {
                Vault::open_store_with(store, url, Durability::OnAck, key).await
            }
        }
    }

    /// Opens a plaintext vault in any object store.
    pub async fn open_store(
        store: Arc<dyn ObjectStore>,
        url: &str,
        durability: Durability,
    ) -> Result<Vault, Error> {
        Vault::open_store_with(store, url, durability, None).await
    }

    /// Opens a vault in any object store, with `key` if it is encrypted.
    pub async fn open_store_with(
        store: Arc<dyn ObjectStore>,
        url: &str,
        durability: Durability,
        key: Option<&Credential>,
    ) -> Result<Vault, Error> {
        let path = layout::config();
        let retrying = RetryingStore::new(Arc::clone(&store), RetryPolicy::default());
        let bytes = match crate::points::get_small(&retrying, &path, MAX_CONFIG_BYTES).await? {
            Some(bytes) => bytes,
            None => return Err(Error::NoVault { url: url.into() }),
        };
        let config =
            VaultConfig::decode(&bytes).map_err(|source| match source {
                // Not damage: a vault of another version, whose error says what to do.
                e @ (cairn_format::Error::Unsupported { .. }
                | cairn_format::Error::Obsolete { .. }) => Error::Format(e),
                source => Error::Corrupt { path: format!("{url}/{path}"), source },
            })?;
        let mut vault = Vault::assemble(store, config, url, durability);
        if vault.config.is_encrypted() {
            let key = key.ok_or_else(|| Error::KeyRequired { url: url.into() })?;
            let (master, crypto, slot) = keys::unlock(&vault, key).await?;
            vault.crypto = crypto;
            vault.master = Some(Arc::new(master));
            vault.unlocked_by = Some(slot.into());
        } else if key.is_some() {
            return Err(Error::UnexpectedPlaintext { url: url.into() });
        }
        Ok(vault)
    }

    fn assemble(
        store: Arc<dyn ObjectStore>,
        config: VaultConfig,
        url: &str,
        durability: Durability,
    ) -> Vault {
        Vault {
            store: Arc::new(RetryingStore::new(Arc::clone(&store), RetryPolicy::default())),
            raw: store,
            config: Arc::new(config),
            crypto: Crypto::none(),
            master: None,
            unlocked_by: None,
            url: url.into(),
            durability,
            append_only: false,
            chunk_map: Arc::default(),
            upload_limit: None,
        }
    }

    /// Makes every write so far durable; fails if any write since the vault was opened was
    /// lost.
    pub async fn barrier(&self) -> Result<(), Error> {
        self.barrier_since(0).await
    }

    /// Makes every write so far durable; fails if a write-back failed after `epoch` (from
    /// the vault's failure count when a job began), so a job whose writes may be lost cannot
    /// commit, even when the failure was seen by an earlier background flush.
    pub(crate) async fn barrier_since(&self, epoch: u64) -> Result<(), Error> {
        match &self.durability {
            Durability::OnAck => Ok(()),
            Durability::SyncFs(local) => {
                let local = Arc::clone(local);
                local.pending.store(0, Ordering::Relaxed);
                tokio::task::spawn_blocking(move || {
                    local.syncfs()?;
                    local.check_since(epoch)
                })
                .await
                .map_err(|e| Error::Io {
                    path: "syncfs".into(),
                    source: std::io::Error::other(e),
                })?
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_testkit::{Loop, Mount, root_or_skip, sh};

    /// A write-back error seen by a background flush still fails the commit of the job whose
    /// data it lost, although `syncfs` reports such an error only once: on a vault whose
    /// disk (an ext4 loop device over a file on a small tmpfs) runs out of room under it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn root_a_write_back_error_seen_by_a_background_flush_fails_the_commit() {
        if !root_or_skip() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let _tmpfs =
            Mount::new("tmpfs", &dir.path().join("tmpfs"), &["-t", "tmpfs", "-o", "size=24m"]);
        let backing = dir.path().join("tmpfs/disk.img");
        sh("truncate", &["-s", "256M", backing.to_str().unwrap()]);
        sh("mkfs.ext4", &["-q", backing.to_str().unwrap()]);
        let device = Loop::attach(&backing);
        let mount = dir.path().join("mnt");
        let _ext4 = Mount::new(&device.0, &mount, &["-o", "errors=continue"]);

        let url = mount.join("vault");
        let vault = Vault::create(url.to_str().unwrap(), 65536).await.unwrap();
        let vm: cairn_format::Name = "vm".parse().unwrap();
        let writer = vault.begin_point(&vm, jiff::Timestamp::now()).await.unwrap();
        // 64 MiB written through the page cache: more than the tmpfs under the disk holds.
        let junk: Vec<u8> =
            (0..64u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        std::fs::write(url.join("lost"), &junk).unwrap();
        let Durability::SyncFs(local) = &vault.durability else { panic!("a local vault") };
        local.background_flush();
        assert_eq!(local.epoch(), 1, "the background flush saw the write-back error");
        // The kernel reports each write-back error once: once the failed pages are dropped, a
        // flush through a new descriptor (what the barrier used to open) succeeds...
        let clean = (0..20).any(|_| rustix::fs::syncfs(std::fs::File::open(&url).unwrap()).is_ok());
        assert!(clean, "write-back errors never stopped");
        // ...but the job whose data was lost cannot commit.
        let manifest = cairn_format::PointManifest {
            format: cairn_format::MANIFEST_FORMAT,
            point: writer.point().clone(),
            vm: vm.clone(),
            started_at: writer.started_at(),
            captured_at: writer.started_at(),
            finished_at: writer.started_at(),
            consistency: cairn_format::Consistency::None,
            disks: Default::default(),
            evidence: vec![],
            writer: "test".into(),
            machine: None,
            origin: None,
        };
        let err = writer.commit(&manifest).await.unwrap_err();
        assert!(matches!(err, Error::WriteBack { .. }), "{err}");
        assert!(err.to_string().contains("no recovery point was committed"), "{err}");
        assert!(vault.list_points(Some(&vm)).await.unwrap().points.is_empty());
    }
}
