//! The vault: where recovery points live.
//!
//! A vault is an [`object_store::ObjectStore`] given meaning: content-addressed chunks (blocks
//! and index pages, each stored once) gathered into packs of a few MiB, pack indexes that say
//! where each chunk is (loaded into a [chunk map](ChunkLocation)), recovery-point manifests
//! (written last and create-only, so that a point is visible only once complete), in-flight
//! markers for a future garbage collector, damage records and a quarantine for chunks that
//! verify found bad. Backends are chosen by URL ([`Vault::open`]); anything that implements
//! `ObjectStore` can be used directly ([`Vault::open_store`]), with the same behaviour.
//!
//! Durability is explicit: before a manifest is written, [`Vault::barrier`] makes everything
//! written so far stable (one `syncfs` on a local vault instead of an fsync per chunk; a no-op
//! on object stores, where an acknowledged PUT is durable).

mod backend;
mod chunk_map;
mod chunks;
mod error;
pub mod faults;
mod frame_reader;
pub(crate) mod gc;
mod keys;
mod layout;
mod lifecycle;
mod local_pack;
mod local_store;
mod notes;
mod open;
mod packs;
mod place_table;
mod points;
mod repair;
mod resume;
mod retry;
mod secret_file;
mod upload_limit;
mod verdicts;
mod verify;

use std::sync::Arc;

use cairn_format::patch::PieceKey;
use cairn_format::{Crypto, MasterKey, VaultConfig};
use object_store::ObjectStore;

pub use backend::StoreOptions;
pub use chunk_map::ChunkLocation;
pub use error::Error;
pub use frame_reader::FrameReader;
pub use gc::{DEFAULT_REPACK_BELOW, DEFAULT_STALE_AFTER, GcOptions, GcReport};
pub use keys::Credential;
pub use lifecycle::DEFAULT_GRACE;
pub use local_pack::{ALIGN as DIRECT_IO_ALIGN, AlignedBuf, direct_io_refused};
pub use notes::PointStates;
pub use open::{CreateOptions, Durability, EARLY_FLUSH_BYTES, LocalSync, OpenOptions};
pub use packs::{PackWriter, Stored};
pub use points::{PointListing, PointWriter, UnreadablePoint};
pub use repair::RepairReport;
pub use retry::{RetryPolicy, RetryingStore};
pub use secret_file::read_key_file;
pub use upload_limit::UploadLimit;
pub use verify::{BadChunk, VerifyProgress, VerifyReport, VerifyScope};

/// An open vault. Cheap to clone; safe to share between tasks.
#[derive(Clone, Debug)]
pub struct Vault {
    /// The store as given, for [`Vault::store`] and to change the retry policy.
    raw: Arc<dyn ObjectStore>,
    /// The store with the vault's retries around it: every operation goes through it.
    store: Arc<dyn ObjectStore>,
    config: Arc<VaultConfig>,
    /// What the vault does to its bytes: keyed ids and encryption, or plain SHA-256.
    crypto: Crypto,
    /// The master key of an encrypted vault (to add key slots).
    master: Option<Arc<MasterKey>>,
    /// The key slot this handle was opened with.
    unlocked_by: Option<Arc<str>>,
    url: Arc<str>,
    durability: Durability,
    /// Deletes and overwrites are refused (an append-only agent).
    append_only: bool,
    chunk_map: Arc<chunk_map::SharedChunkMap>,
    /// Packs wait for this host-wide bandwidth limit, if any.
    upload_limit: Option<Arc<UploadLimit>>,
}

impl Vault {
    /// The vault's config.
    pub fn config(&self) -> &VaultConfig {
        &self.config
    }

    /// What the vault does to its bytes (ids, frames, sealed objects).
    pub fn crypto(&self) -> &Crypto {
        &self.crypto
    }

    /// True if the vault is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.crypto.is_encrypted()
    }

    /// The key of the vault's piece sums.
    pub fn piece_key(&self) -> PieceKey {
        self.crypto.piece_key().unwrap_or_else(|| self.config.piece_key())
    }

    /// The URL it was opened with (for messages).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The folder of a local vault (`None` for object storage): the agent must never freeze
    /// the file system it is on.
    pub fn local_path(&self) -> Option<&std::path::Path> {
        self.durability.local_root()
    }

    /// The underlying store, as it was given (without the vault's retries).
    #[allow(clippy::misnamed_getters, reason = "the store as given, not the retrying one")]
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.raw
    }

    /// This vault handle, append-only: it adds chunks, points and notes, and refuses every
    /// delete (prune, gc, undone markers are left in place and treated as done).
    pub fn into_append_only(mut self) -> Vault {
        self.append_only = true;
        self
    }

    /// This handle with its packs sent under `limit` (shared with other handles).
    pub fn with_upload_limit(mut self, limit: Arc<UploadLimit>) -> Vault {
        self.upload_limit = Some(limit);
        self
    }

    /// True if this handle refuses deletes.
    pub fn is_append_only(&self) -> bool {
        self.append_only
    }

    /// Refuses `what` (a deleting operation, for the message) on an append-only handle.
    pub fn check_may_delete(&self, what: impl Into<String>) -> Result<(), Error> {
        match self.append_only {
            true => Err(Error::AppendOnly { url: self.url.to_string(), what: what.into() }),
            false => Ok(()),
        }
    }

    /// The largest pack this vault's writers make: a full pack, one more frame of the largest
    /// block, and its table. Anything bigger in `packs/` is not loaded whole.
    pub(crate) fn max_pack_bytes(&self) -> u64 {
        2 * u64::from(self.config.pack_size) + u64::from(cairn_format::MAX_BLOCK_SIZE) + (1 << 20)
    }

    /// This vault with another retry policy (tests of faults use short timeouts).
    pub fn with_retry_policy(mut self, policy: RetryPolicy) -> Vault {
        self.store = Arc::new(RetryingStore::new(Arc::clone(&self.raw), policy));
        self
    }
}
