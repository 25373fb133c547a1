//! Reading chunks: located through the chunk map, fetched with one ranged read, verified.

use bytes::Bytes;
use cairn_format::index::{IndexPage, IndexRoot, PatchRef};
use cairn_format::{ChunkFrame, Digest, DiskRecord};
use object_store::{ObjectStoreExt, PutMode, PutOptions};
use rand::RngExt;

use crate::{ChunkLocation, Error, Vault, layout};

impl Vault {
    /// The stored bytes (the frame) of chunk `id`, unchecked.
    pub async fn read_chunk_raw(&self, id: &Digest) -> Result<Bytes, Error> {
        let loc = self.locate_chunk(id).await?.ok_or(Error::ChunkMissing { id: *id })?;
        match self.read_frame(id, &loc).await {
            Err(Error::ChunkMissing { .. }) => self.read_moved(id, &loc).await,
            result => result,
        }
    }

    /// Reads chunk `id` again after its pack at `was` turned out to be gone: a collector may
    /// have repacked it, and a fresh chunk map knows its new place.
    pub async fn read_moved(&self, id: &Digest, was: &ChunkLocation) -> Result<Bytes, Error> {
        self.reload_chunk_map().await?;
        match self.locate_chunk(id).await? {
            Some(loc) if loc != *was => self.read_frame(id, &loc).await,
            _ => Err(Error::ChunkMissing { id: *id }),
        }
    }

    /// The frame at `loc`, which should hold chunk `id`.
    pub async fn read_frame(&self, id: &Digest, loc: &ChunkLocation) -> Result<Bytes, Error> {
        let path = layout::pack(&loc.pack);
        let start = u64::from(loc.offset);
        let end = start + u64::from(loc.len);
        match self.store.get_range(&path, start..end).await {
            Ok(bytes) if bytes.len() as u64 == end - start => Ok(bytes),
            Ok(_) => Err(Error::ChunkTruncated { id: *id, pack: loc.pack }),
            Err(object_store::Error::NotFound { .. }) => Err(Error::ChunkMissing { id: *id }),
            Err(e) => {
                // A range past the end of a pack is a truncated pack, not a broken store.
                match self.store.head(&path).await {
                    Ok(meta) if meta.size < end => {
                        Err(Error::ChunkTruncated { id: *id, pack: loc.pack })
                    }
                    Err(object_store::Error::NotFound { .. }) => {
                        Err(Error::ChunkMissing { id: *id })
                    }
                    _ => Err(Error::storage("read", &path, e)),
                }
            }
        }
    }

    /// The plaintext of chunk `id`, its CRC and SHA-256 checked.
    pub async fn read_chunk(&self, id: &Digest) -> Result<Vec<u8>, Error> {
        let partial = self.chunk_map_is_partial();
        let loc = self.locate_chunk(id).await?.ok_or(Error::ChunkMissing { id: *id })?;
        let read = match self.read_frame(id, &loc).await {
            Err(Error::ChunkMissing { .. }) => self.read_moved(id, &loc).await,
            read => read,
        };
        let opened = match read {
            Ok(raw) => self.open_chunk(id, raw).await,
            Err(e) => Err(e),
        };
        match opened {
            Err(e @ (Error::Corrupt { .. } | Error::ChunkTruncated { .. })) if partial => {
                self.read_where_the_whole_map_says(id, &loc, e).await
            }
            opened => opened,
        }
    }

    /// A focused map may place a chunk at another good copy than the whole map, which
    /// places it where verify reads it (see the chunk map's docs): before chunk `id`, read at
    /// `was`, counts as damaged (`damage`), the copy the whole map places is read, if it is
    /// another.
    async fn read_where_the_whole_map_says(
        &self,
        id: &Digest,
        was: &ChunkLocation,
        damage: Error,
    ) -> Result<Vec<u8>, Error> {
        // Once: a damaged point's many bad chunks find the map whole after the first.
        if self.chunk_map_is_partial() {
            self.reload_chunk_map().await?;
        }
        match self.placed(id) {
            Some(loc) if loc != *was => {
                tracing::warn!(chunk = %id, pack = %loc.pack, "a copy of a chunk was damaged; another copy read");
                self.read_chunk_at(id, &loc).await
            }
            _ => Err(damage),
        }
    }

    /// Reads chunk `id` from the copy at `loc`, not where the chunk map places it (the
    /// collector knows every copy and loads no map).
    pub(crate) async fn read_chunk_at(
        &self,
        id: &Digest,
        loc: &ChunkLocation,
    ) -> Result<Vec<u8>, Error> {
        let raw = self.read_frame(id, loc).await?;
        self.open_chunk(id, raw).await
    }

    /// An index root read from the copy at `loc`.
    pub(crate) async fn read_index_root_at(
        &self,
        id: &Digest,
        loc: &ChunkLocation,
    ) -> Result<IndexRoot, Error> {
        let plain = self.read_chunk_at(id, loc).await?;
        IndexRoot::decode(&plain).map_err(|source| Error::Corrupt { path: chunk_name(id), source })
    }

    /// An index page read from the copy at `loc`.
    pub(crate) async fn read_index_page_at(
        &self,
        id: &Digest,
        loc: &ChunkLocation,
    ) -> Result<IndexPage, Error> {
        let plain = self.read_chunk_at(id, loc).await?;
        IndexPage::decode(&plain).map_err(|source| Error::Corrupt { path: chunk_name(id), source })
    }

    /// Decodes and checks a chunk's frame, off the async threads.
    async fn open_chunk(&self, id: &Digest, raw: Bytes) -> Result<Vec<u8>, Error> {
        let id = *id;
        let crypto = self.crypto.clone();
        let frame = tokio::task::spawn_blocking(move || ChunkFrame::decode_in(&crypto, &raw, &id))
            .await
            .map_err(|e| Error::Io {
                path: "chunk decode".into(),
                source: std::io::Error::other(e),
            })?;
        frame
            .map(|f| f.plaintext)
            .map_err(|source| Error::Corrupt { path: chunk_name(&id), source })
    }

    /// The block a patch entry names, rebuilt from its base and patch chunks and checked
    /// against the block's SHA-256.
    pub async fn rebuild_patched(&self, p: &PatchRef) -> Result<Vec<u8>, Error> {
        let base = self.read_chunk(&p.base).await?;
        let patch = self.read_chunk(&p.patch).await?;
        let digest = p.digest;
        let ids = self.crypto.ids().clone();
        tokio::task::spawn_blocking(move || {
            cairn_format::patch::rebuild(&base, &patch, &digest, &ids)
        })
        .await
        .map_err(|e| Error::Io { path: "patch rebuild".into(), source: std::io::Error::other(e) })?
        .map_err(|source| Error::Corrupt { path: chunk_name(&p.patch), source })
    }

    /// Reads an index root.
    pub async fn read_index_root(&self, id: &Digest) -> Result<IndexRoot, Error> {
        let plain = self.read_chunk(id).await?;
        IndexRoot::decode(&plain).map_err(|source| Error::Corrupt { path: chunk_name(id), source })
    }

    /// Reads the index root of a point's disk, checked against what the point's manifest
    /// says of the disk (its size and block size): readers expand a root page by page, and a
    /// crafted root must not make them walk more than the disk.
    pub async fn read_disk_index(&self, disk: &DiskRecord) -> Result<IndexRoot, Error> {
        let root = self.read_index_root(&disk.index_root).await?;
        root.check_geometry(disk.size, disk.block_size)
            .map_err(|source| Error::Corrupt { path: chunk_name(&disk.index_root), source })?;
        Ok(root)
    }

    /// Reads page `page_no` of `root`, checked to cover the blocks the root gives it.
    pub async fn read_page_of(
        &self,
        root: &IndexRoot,
        page_no: u64,
        id: &Digest,
    ) -> Result<IndexPage, Error> {
        let page = self.read_index_page(id).await?;
        root.check_page(page_no, &page)
            .map_err(|source| Error::Corrupt { path: chunk_name(id), source })?;
        Ok(page)
    }

    /// Reads an index page.
    pub async fn read_index_page(&self, id: &Digest) -> Result<IndexPage, Error> {
        let plain = self.read_chunk(id).await?;
        IndexPage::decode(&plain).map_err(|source| Error::Corrupt { path: chunk_name(id), source })
    }

    /// Marks the stored copy of a bad chunk as quarantined, so the next backup stores that
    /// block again rather than deduplicating against it. The pack is left alone (its other
    /// chunks are fine); the marker `quarantine/<chunk>.<pack>` says which copy is bad and why.
    /// A chunk the vault does not locate has nothing to mark.
    pub async fn quarantine_chunk(&self, id: &Digest, reason: &str) -> Result<(), Error> {
        let Some(loc) = self.locate_chunk(id).await? else { return Ok(()) };
        let path = layout::quarantined(id, &loc.pack);
        // Create-only, as every vault object: a marker already there says the same thing.
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        let reason =
            self.crypto.seal(path.as_ref(), reason.as_bytes().to_vec(), rand::rng().random());
        match self.store.put_opts(&path, Bytes::from(reason).into(), opts).await {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {}
            Err(e) => return Err(Error::storage("quarantine", &path, e)),
        }
        self.reload_chunk_map().await
    }
}

/// What reading a pack's own table found.
pub(crate) enum PackTable {
    /// No such pack.
    Gone,
    /// Its header or table is bad: why.
    Bad(String),
    /// Its size and table.
    Read(u64, Vec<cairn_format::pack::PackEntry>),
}

impl Vault {
    /// Reads the table of pack `pack` from its header and tail (a head and three ranged
    /// reads, not the whole pack), checked: header version, CRC, and in an encrypted vault
    /// the sealed table's tag. `Err` only when the store cannot answer.
    pub(crate) async fn read_pack_table(&self, pack: &Digest) -> Result<PackTable, Error> {
        use cairn_format::pack::{
            PACK_FOOTER_LEN, PACK_HEADER_LEN, decode_pack_tail_in, pack_table_len,
        };
        let path = layout::pack(pack);
        let size = match self.store.head(&path).await {
            Ok(meta) => meta.size,
            Err(object_store::Error::NotFound { .. }) => return Ok(PackTable::Gone),
            Err(e) => return Err(Error::storage("read", &path, e)),
        };
        let range = |r: std::ops::Range<u64>| {
            let path = &path;
            async move {
                self.store.get_range(path, r).await.map_err(|e| Error::storage("read", path, e))
            }
        };
        let (header_len, footer_len) = (PACK_HEADER_LEN as u64, PACK_FOOTER_LEN as u64);
        if size < header_len + footer_len {
            return Ok(PackTable::Bad(format!("{size} bytes is too short for a pack")));
        }
        let header = range(0..header_len).await?;
        let footer = range(size - footer_len..size).await?;
        let table_len = match pack_table_len(&self.crypto, &footer) {
            Ok(len) => len as u64,
            Err(e) => return Ok(PackTable::Bad(e.to_string())),
        };
        let Some(table_at) =
            (size - footer_len).checked_sub(table_len).filter(|at| *at >= header_len)
        else {
            return Ok(PackTable::Bad(format!(
                "a table of {table_len} bytes does not fit in {size}"
            )));
        };
        let tail = range(table_at..size).await?;
        Ok(match decode_pack_tail_in(&self.crypto, path.as_ref(), &header, &tail, table_at) {
            Ok(entries) => PackTable::Read(size, entries),
            Err(e) => PackTable::Bad(e.to_string()),
        })
    }
}

/// How messages name a chunk.
fn chunk_name(id: &Digest) -> String {
    format!("chunk {id}")
}
