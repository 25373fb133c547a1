//! Opening and creating vaults by URL, and the durability barrier.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use cairn_format::VaultConfig;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions};
use rand::RngExt;

use crate::{Error, Vault, layout};

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
#[derive(Debug)]
pub struct LocalSync {
    root: PathBuf,
    pending: AtomicU64,
    flushing: AtomicBool,
}

/// Bytes written between two background flushes of a local vault.
pub const EARLY_FLUSH_BYTES: u64 = 256 << 20;

impl LocalSync {
    fn new(root: PathBuf) -> Arc<Self> {
        Arc::new(LocalSync { root, pending: AtomicU64::new(0), flushing: AtomicBool::new(false) })
    }

    fn syncfs(&self) -> Result<(), Error> {
        let io =
            |source: std::io::Error| Error::Io { path: self.root.display().to_string(), source };
        let dir = std::fs::File::open(&self.root).map_err(io)?;
        rustix::fs::syncfs(&dir).map_err(|e| io(e.into()))
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
        tokio::task::spawn_blocking(move || {
            if let Err(e) = local.syncfs() {
                tracing::debug!(error = %e, "background flush failed; the commit barrier will retry");
            }
            local.flushing.store(false, Ordering::Release);
        });
    }
}

enum Location {
    Local(PathBuf),
    Memory,
}

fn locate(url: &str) -> Result<Location, Error> {
    let bad = |detail: &str| Error::Url { url: url.into(), detail: detail.into() };
    if !url.contains("://") {
        // A plain path: the friendliest way to name a local vault.
        let path = std::path::absolute(url).map_err(|e| bad(&e.to_string()))?;
        return Ok(Location::Local(path));
    }
    let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    match parsed.scheme() {
        "file" => parsed
            .to_file_path()
            .map(Location::Local)
            .map_err(|()| bad("a file URL needs an absolute path, like file:///srv/vault")),
        "memory" => Ok(Location::Memory),
        "s3" | "s3a" | "az" | "azure" | "abfs" | "abfss" | "gs" => Err(bad(
            "object-store vaults (s3, az, gs) are recognised but not built into this version yet; \
             use a file:// vault",
        )),
        other => Err(bad(&format!("unknown scheme {other:?}; use file:///path or a plain path"))),
    }
}

fn local_store(path: &FsPath, url: &str) -> Result<Arc<dyn ObjectStore>, Error> {
    LocalFileSystem::new_with_prefix(path)
        .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
        .map_err(|e| Error::Url { url: url.into(), detail: e.to_string() })
}

impl Vault {
    /// Creates a vault at `url` with `block_size`-byte blocks (refuses if one exists).
    pub async fn create(url: &str, block_size: u32) -> Result<Vault, Error> {
        let (store, durability) = match locate(url)? {
            Location::Local(path) => {
                std::fs::create_dir_all(&path)
                    .map_err(|source| Error::Io { path: path.display().to_string(), source })?;
                (local_store(&path, url)?, Durability::SyncFs(LocalSync::new(path)))
            }
            Location::Memory => {
                (Arc::new(InMemory::new()) as Arc<dyn ObjectStore>, Durability::OnAck)
            }
        };
        Vault::create_in(store, url, durability, block_size).await
    }

    /// Creates a vault in any object store.
    pub async fn create_in(
        store: Arc<dyn ObjectStore>,
        url: &str,
        durability: Durability,
        block_size: u32,
    ) -> Result<Vault, Error> {
        let id = format!("{:032x}", rand::rng().random::<u128>());
        let config = VaultConfig::new(id, jiff::Timestamp::now(), block_size)?;
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        let path = layout::config();
        match store.put_opts(&path, config.encode().into(), opts).await {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                return Err(Error::AlreadyExists { url: url.into() });
            }
            Err(e) => return Err(Error::storage("write", &path, e)),
        }
        let vault = Vault::assemble(store, config, url, durability);
        vault.barrier().await?;
        Ok(vault)
    }

    /// Opens the vault at `url`: a plain path, `file:///path` or `memory://`.
    pub async fn open(url: &str) -> Result<Vault, Error> {
        match locate(url)? {
            Location::Local(path) => {
                if !path.is_dir() {
                    return Err(Error::NoVault { url: url.into() });
                }
                let store = local_store(&path, url)?;
                Vault::open_store(store, url, Durability::SyncFs(LocalSync::new(path))).await
            }
            // A fresh memory store never holds a vault; embedders use `open_store`.
            Location::Memory => Err(Error::NoVault { url: url.into() }),
        }
    }

    /// Opens a vault in any object store.
    pub async fn open_store(
        store: Arc<dyn ObjectStore>,
        url: &str,
        durability: Durability,
    ) -> Result<Vault, Error> {
        let path = layout::config();
        let bytes = match store.get(&path).await {
            Ok(r) => r.bytes().await.map_err(|e| Error::storage("read", &path, e))?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(Error::NoVault { url: url.into() });
            }
            Err(e) => return Err(Error::storage("read", &path, e)),
        };
        let config = VaultConfig::decode(&bytes)
            .map_err(|source| Error::Corrupt { path: format!("{url}/{path}"), source })?;
        Ok(Vault::assemble(store, config, url, durability))
    }

    fn assemble(
        store: Arc<dyn ObjectStore>,
        config: VaultConfig,
        url: &str,
        durability: Durability,
    ) -> Vault {
        Vault {
            store,
            config: Arc::new(config),
            url: url.into(),
            durability,
            chunk_map: Arc::default(),
        }
    }

    /// Makes every write so far durable. Called before a manifest commits and after.
    pub async fn barrier(&self) -> Result<(), Error> {
        match &self.durability {
            Durability::OnAck => Ok(()),
            Durability::SyncFs(local) => {
                let local = Arc::clone(local);
                local.pending.store(0, Ordering::Relaxed);
                tokio::task::spawn_blocking(move || local.syncfs()).await.map_err(|e| {
                    Error::Io { path: "syncfs".into(), source: std::io::Error::other(e) }
                })?
            }
        }
    }
}
