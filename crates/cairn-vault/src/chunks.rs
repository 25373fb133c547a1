//! Chunks: content-addressed, written only if absent, read back verified.

use bytes::Bytes;
use cairn_format::index::{IndexPage, IndexRoot};
use cairn_format::{ChunkFrame, Digest, encode_chunk};
use object_store::{ObjectStoreExt, PutMode, PutOptions};

use crate::{Error, Vault, layout};

/// What storing a chunk did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// The chunk was written; this many bytes went to the vault.
    Written(u64),
    /// The vault already held it (another disk, VM or point stored it).
    Present,
}

impl Vault {
    /// Stores an encoded chunk frame under `id` unless the vault already holds that chunk.
    ///
    /// The write is create-only, so two agents racing on the same chunk both succeed and store
    /// it once. On remote stores a HEAD request comes first, so that a chunk the vault already
    /// holds is not uploaded again; on a local vault the create-only write is itself the cheap
    /// check (a failed link), and a stat first would only slow down the common case of new data.
    pub async fn store_chunk(&self, id: &Digest, frame: Bytes) -> Result<Stored, Error> {
        let path = layout::chunk(id);
        if self.durability.is_remote() {
            match self.store.head(&path).await {
                Ok(_) => return Ok(Stored::Present),
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(Error::storage("check", &path, e)),
            }
        }
        let len = frame.len() as u64;
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.store.put_opts(&path, frame.into(), opts).await {
            Ok(_) => {
                self.durability.wrote(len);
                Ok(Stored::Written(len))
            }
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Stored::Present),
            Err(e) => Err(Error::storage("write", &path, e)),
        }
    }

    /// Encodes `plaintext` (its id is its SHA-256) and stores it if absent.
    pub async fn store_plain(&self, plaintext: &[u8]) -> Result<(Digest, Stored), Error> {
        let id = Digest::of(plaintext);
        let frame = encode_chunk(plaintext, self.config.zstd_level())?;
        Ok((id, self.store_chunk(&id, frame.into()).await?))
    }

    /// The stored bytes of chunk `id`, unchecked.
    pub async fn read_chunk_raw(&self, id: &Digest) -> Result<Bytes, Error> {
        let path = layout::chunk(id);
        match self.store.get(&path).await {
            Ok(r) => r.bytes().await.map_err(|e| Error::storage("read", &path, e)),
            Err(object_store::Error::NotFound { .. }) => Err(Error::ChunkMissing { id: *id }),
            Err(e) => Err(Error::storage("read", &path, e)),
        }
    }

    /// The plaintext of chunk `id`, its CRC and SHA-256 checked.
    pub async fn read_chunk(&self, id: &Digest) -> Result<Vec<u8>, Error> {
        let raw = self.read_chunk_raw(id).await?;
        let id = *id;
        let frame = tokio::task::spawn_blocking(move || ChunkFrame::decode_verified(&raw, &id))
            .await
            .map_err(|e| Error::Io {
                path: "chunk decode".into(),
                source: std::io::Error::other(e),
            })?;
        frame
            .map(|f| f.plaintext)
            .map_err(|source| Error::Corrupt { path: layout::chunk(&id).to_string(), source })
    }

    /// Reads an index root.
    pub async fn read_index_root(&self, id: &Digest) -> Result<IndexRoot, Error> {
        let plain = self.read_chunk(id).await?;
        IndexRoot::decode(&plain)
            .map_err(|source| Error::Corrupt { path: layout::chunk(id).to_string(), source })
    }

    /// Reads an index page.
    pub async fn read_index_page(&self, id: &Digest) -> Result<IndexPage, Error> {
        let plain = self.read_chunk(id).await?;
        IndexPage::decode(&plain)
            .map_err(|source| Error::Corrupt { path: layout::chunk(id).to_string(), source })
    }

    /// Moves a bad chunk out of the way so the next backup stores that block again rather than
    /// deduplicating against a corrupt copy. A missing chunk has nothing to move.
    pub async fn quarantine_chunk(&self, id: &Digest) -> Result<(), Error> {
        let from = layout::chunk(id);
        let to = layout::quarantined(id);
        match self.store.copy(&from, &to).await {
            Ok(()) => {}
            Err(object_store::Error::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(Error::storage("quarantine", &from, e)),
        }
        match self.store.delete(&from).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::storage("delete", &from, e)),
        }
    }
}
