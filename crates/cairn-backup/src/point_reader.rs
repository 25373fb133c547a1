//! A point's disk read in place, straight from its vault: what an instant restore exports.
//!
//! Nothing is copied ahead of the reader. A read looks up its blocks in the point's index (the
//! root once, pages as they are needed, a few kept), then fetches each block's chunk (a
//! patched block: its base and its patch) with one ranged get each, several at once, and
//! checks it as a restore does. A block asked for twice at once is fetched once. Blocks are
//! kept in a cache bounded in bytes (the least recently used go first), index pages in one
//! bounded in entries; holes and zero blocks cost nothing. A reader that goes through the
//! disk in order gets the blocks after its read fetched ahead of it. The vault is only read.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cairn_format::index::{BlockEntry, IndexRoot};
use cairn_format::{Digest, Name, PointId, PointManifest};
use cairn_vault::Vault;
use futures::{StreamExt, TryStreamExt};

use crate::Error;

/// How a reader caches and fetches.
#[derive(Clone, Debug)]
pub struct ReaderOptions {
    /// Bytes of blocks kept (default 256 MiB).
    pub cache_bytes: u64,
    /// Bytes fetched ahead of a reader that reads in order (default 16 MiB).
    pub read_ahead: u64,
    /// Chunks fetched at once for one read (default 8).
    pub parallel: usize,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        ReaderOptions { cache_bytes: 256 << 20, read_ahead: 16 << 20, parallel: 8 }
    }
}

/// What a reader has fetched so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReaderStats {
    /// Chunks fetched from the vault (blocks, bases and patches).
    pub chunks_fetched: u64,
    /// Their bytes, as read back (plaintext).
    pub bytes_fetched: u64,
    /// Blocks found in the cache.
    pub cache_hits: u64,
}

/// A point's disk, readable at any offset (cheap to clone: clones share the cache).
#[derive(Clone)]
pub struct PointReader(Arc<Inner>);

struct Inner {
    vault: Vault,
    disk: Name,
    point: PointId,
    root: IndexRoot,
    /// Per run of identical pages: the number of its first page, and the page's digest.
    page_runs: Vec<(u64, Digest)>,
    block: u64,
    options: ReaderOptions,
    blocks: Mutex<Lru<Arc<Vec<u8>>>>,
    pages: Mutex<Lru<Arc<Vec<BlockEntry>>>>,
    /// Blocks being fetched: a second reader of one waits for the first fetch.
    fetching: Mutex<HashMap<u64, Fetch>>,
    zeros: Arc<Vec<u8>>,
    /// Where the last read ended, to see a reader going in order.
    last_end: AtomicU64,
    /// The block up to which blocks were asked ahead.
    ahead_until: AtomicU64,
    chunks: AtomicU64,
    bytes: AtomicU64,
    hits: AtomicU64,
    /// While recording: the blocks clients read, in the order first read.
    first_reads: Mutex<Option<FirstReads>>,
    /// True while first reads are noted: reads check it before taking `first_reads`'s lock.
    recording: std::sync::atomic::AtomicBool,
}

/// Blocks in the order clients first read them, at most `limit`.
struct FirstReads {
    order: Vec<u64>,
    seen: std::collections::HashSet<u64>,
    limit: usize,
}

/// A block's fetch under way, shared by whoever asks for the block meanwhile.
type Fetch = Arc<tokio::sync::OnceCell<Arc<Vec<u8>>>>;

/// Index page entries kept (one per block; about 20 MiB of them).
const PAGE_ENTRIES_KEPT: u64 = 256 * 1024;

impl PointReader {
    /// A reader of disk `disk` of `point` in `vault`: reads the index root, nothing else.
    pub async fn open(
        vault: Vault,
        point: &PointManifest,
        disk: &Name,
        options: ReaderOptions,
    ) -> Result<PointReader, Error> {
        let record = crate::restore::disk_of(point, disk)?;
        vault.prepare_to_read(&point.vm, &point.point).await?;
        // Checked against the manifest: a crafted root cannot make a read walk past the disk.
        let root = vault.read_disk_index(record).await?;
        let mut page_runs = Vec::with_capacity(root.pages.len());
        let mut next = 0u64;
        for (digest, n) in &root.pages {
            page_runs.push((next, *digest));
            next = next.saturating_add(*n);
        }
        let block = u64::from(root.block_size);
        // A cache that cannot hold one read's blocks, or read-ahead that evicts what it
        // fetched, would fetch everything twice.
        let parallel = options.parallel.clamp(1, 64);
        let cache_bytes = options.cache_bytes.max(4 * parallel as u64 * block);
        let read_ahead = options.read_ahead.min(cache_bytes / 2);
        let options = ReaderOptions { parallel, cache_bytes, read_ahead };
        let per_page = u64::from(root.blocks_per_page.max(1));
        Ok(PointReader(Arc::new(Inner {
            disk: disk.clone(),
            point: point.point.clone(),
            page_runs,
            block,
            blocks: Mutex::new(Lru::new(options.cache_bytes)),
            pages: Mutex::new(Lru::new(PAGE_ENTRIES_KEPT.max(per_page))),
            fetching: Mutex::new(HashMap::new()),
            zeros: Arc::new(vec![0u8; block as usize]),
            options,
            root,
            vault,
            last_end: AtomicU64::new(u64::MAX),
            ahead_until: AtomicU64::new(0),
            chunks: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            first_reads: Mutex::new(None),
            recording: std::sync::atomic::AtomicBool::new(false),
        })))
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.0.root.disk_size
    }

    /// The point read.
    pub fn point(&self) -> &PointId {
        &self.0.point
    }

    /// The vault's block size: the size reads should come in.
    pub fn block_size(&self) -> u32 {
        self.0.root.block_size
    }

    /// Starts noting the blocks clients read, in the order first read, up to `limit` blocks
    /// (reads ahead and prefetches are not clients' reads and are not noted).
    pub fn record_first_reads(&self, limit: usize) {
        let record = FirstReads { order: Vec::new(), seen: Default::default(), limit };
        *self.0.first_reads.lock().unwrap_or_else(|p| p.into_inner()) = Some(record);
        self.0.recording.store(true, Ordering::Release);
    }

    /// The blocks noted since [`PointReader::record_first_reads`], in the order first read.
    pub fn first_reads(&self) -> Vec<u64> {
        let noted = self.0.first_reads.lock().unwrap_or_else(|p| p.into_inner());
        noted.as_ref().map(|r| r.order.clone()).unwrap_or_default()
    }

    /// Fetches `blocks` into the cache, in their order, `parallel` at a time, as many as the
    /// cache holds (more would evict the first before they are read); returns how many were
    /// asked for. A block that cannot be fetched is skipped: its reader gets the error.
    pub async fn prefetch(&self, blocks: &[u64]) -> u64 {
        let inner = &self.0;
        let room = usize::try_from(inner.options.cache_bytes / inner.block).unwrap_or(usize::MAX);
        let count = inner.root.block_count();
        let wanted: Vec<u64> = blocks.iter().copied().filter(|b| *b < count).take(room).collect();
        let n = wanted.len() as u64;
        futures::stream::iter(wanted)
            .map(|i| async move {
                if let Err(e) = self.block(i).await {
                    tracing::debug!("prefetching block {i}: {e}");
                }
            })
            .buffered(inner.options.parallel)
            .collect::<Vec<()>>()
            .await;
        n
    }

    /// What has been fetched so far.
    pub fn stats(&self) -> ReaderStats {
        ReaderStats {
            chunks_fetched: self.0.chunks.load(Ordering::Relaxed),
            bytes_fetched: self.0.bytes.load(Ordering::Relaxed),
            cache_hits: self.0.hits.load(Ordering::Relaxed),
        }
    }

    /// Fills `buf` with the disk's bytes at `offset`; a block that cannot be read or does not
    /// check is an error naming it.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let inner = &self.0;
        let end = offset.checked_add(buf.len() as u64).filter(|e| *e <= self.size());
        let Some(end) = end else {
            return Err(Error::InvalidRequest(format!(
                "a read of {} bytes at {offset} is past the end of disk {} ({} bytes)",
                buf.len(),
                inner.disk,
                self.size()
            )));
        };
        if buf.is_empty() {
            return Ok(());
        }
        let (first, last) = (offset / inner.block, (end - 1) / inner.block);
        if inner.recording.load(Ordering::Acquire) {
            self.note_first_reads(first, last);
        }
        if inner.last_end.swap(end, Ordering::Relaxed) == offset {
            self.read_ahead(last + 1);
        }
        let blocks: Vec<(u64, Arc<Vec<u8>>)> = futures::stream::iter(first..=last)
            .map(|i| async move { self.block(i).await.map(|b| (i, b)) })
            .buffered(inner.options.parallel)
            .try_collect()
            .await?;
        for (i, data) in blocks {
            let at = i * inner.block;
            let from = offset.max(at);
            let to = end.min(at.saturating_add(inner.block));
            let src = &data[(from - at) as usize..(to - at) as usize];
            buf[(from - offset) as usize..(to - offset) as usize].copy_from_slice(src);
        }
        Ok(())
    }

    /// Notes blocks `first..=last` as read, those not read before, up to the recording's limit.
    fn note_first_reads(&self, first: u64, last: u64) {
        let mut noted = self.0.first_reads.lock().unwrap_or_else(|p| p.into_inner());
        let Some(r) = noted.as_mut() else { return };
        for i in first..=last {
            if r.order.len() >= r.limit {
                break;
            }
            if r.seen.insert(i) {
                r.order.push(i);
            }
        }
    }

    /// After an in-order read ending before block `next`: the blocks of the next
    /// `read_ahead` bytes not asked for yet are fetched in the background.
    fn read_ahead(&self, next: u64) {
        let inner = &self.0;
        let count = (inner.options.read_ahead / inner.block).max(1);
        let until = next.saturating_add(count).min(inner.root.block_count());
        // Continue the window this reader is in; a reader elsewhere starts its own.
        let asked = inner.ahead_until.load(Ordering::Relaxed);
        let from = if (next..until).contains(&asked) { asked } else { next };
        if from >= until || asked == until {
            return;
        }
        inner.ahead_until.store(until, Ordering::Relaxed);
        self.fetch_in_background(from, until - 1);
    }

    fn fetch_in_background(&self, first: u64, last: u64) {
        if first > last || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let reader = self.clone();
        tokio::spawn(async move {
            let parallel = reader.0.options.parallel;
            let fetched = futures::stream::iter(first..=last)
                .map(|i| {
                    let reader = reader.clone();
                    async move { reader.block(i).await.map(|_| ()) }
                })
                .buffer_unordered(parallel)
                .try_collect::<Vec<()>>()
                .await;
            if let Err(e) = fetched {
                // The reader that asks for the block gets the error itself.
                tracing::debug!("reading ahead: {e}");
            }
        });
    }

    /// Block `i`, whole (the last block of a disk may be shorter): from the cache, from a
    /// fetch of it already under way, or fetched now.
    async fn block(&self, i: u64) -> Result<Arc<Vec<u8>>, Error> {
        let inner = &self.0;
        if let Some(b) = inner.blocks.lock().unwrap_or_else(|p| p.into_inner()).get(i) {
            inner.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(b);
        }
        let cell = {
            let mut fetching = inner.fetching.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(fetching.entry(i).or_default())
        };
        let fetched = cell.get_or_try_init(|| self.fetch(i)).await.cloned();
        let mut fetching = inner.fetching.lock().unwrap_or_else(|p| p.into_inner());
        if fetching.get(&i).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            fetching.remove(&i);
        }
        fetched
    }

    /// Fetches block `i` and puts it in the cache.
    async fn fetch(&self, i: u64) -> Result<Arc<Vec<u8>>, Error> {
        let inner = &self.0;
        let per_page = u64::from(inner.root.blocks_per_page.max(1));
        let page = self.page(i / per_page).await?;
        let at = i * inner.block;
        let len = inner.block.min(self.size().saturating_sub(at));
        let entry = page.get((i % per_page) as usize).copied().ok_or_else(|| Error::Corrupt {
            disk: inner.disk.clone(),
            offset: at,
            id: self.page_digest(i / per_page).unwrap_or_else(|| Digest::of(&[])),
            detail: "its index page has no entry for it".into(),
        })?;
        let corrupt = |id: Digest, detail: String| Error::Corrupt {
            disk: inner.disk.clone(),
            offset: at,
            id,
            detail,
        };
        let id = match entry {
            BlockEntry::Data { digest, .. } => digest,
            BlockEntry::Patch(p) => p.digest,
            BlockEntry::Hole | BlockEntry::Zero => return Ok(Arc::clone(&inner.zeros)),
        };
        let data = match entry {
            BlockEntry::Hole | BlockEntry::Zero => return Ok(Arc::clone(&inner.zeros)),
            BlockEntry::Data { digest, .. } => self.chunk(&digest, at).await?,
            BlockEntry::Patch(p) => {
                let (base, patch) =
                    futures::try_join!(self.chunk(&p.base, at), self.chunk(&p.patch, at))?;
                let ids = inner.vault.crypto().ids().clone();
                tokio::task::spawn_blocking(move || {
                    cairn_format::patch::rebuild(&base, &patch, &p.digest, &ids)
                })
                .await?
                .map_err(|e| corrupt(p.digest, format!("with patch {}: {e}", p.patch)))?
            }
        };
        if data.len() as u64 != len {
            return Err(corrupt(id, format!("it holds {} bytes, the block has {len}", data.len())));
        }
        let data = Arc::new(data);
        let mut cache = inner.blocks.lock().unwrap_or_else(|p| p.into_inner());
        cache.put(i, Arc::clone(&data), len);
        Ok(data)
    }

    /// Chunk `id`, checked, for the block at `at`.
    async fn chunk(&self, id: &Digest, at: u64) -> Result<Vec<u8>, Error> {
        let inner = &self.0;
        let data = inner.vault.read_chunk(id).await.map_err(|e| match e {
            cairn_vault::Error::Corrupt { .. } | cairn_vault::Error::ChunkMissing { .. } => {
                Error::Corrupt {
                    disk: inner.disk.clone(),
                    offset: at,
                    id: *id,
                    detail: e.to_string(),
                }
            }
            e => e.into(),
        })?;
        inner.chunks.fetch_add(1, Ordering::Relaxed);
        inner.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(data)
    }

    /// Page `n` of the index, its entries one per block.
    async fn page(&self, n: u64) -> Result<Arc<Vec<BlockEntry>>, Error> {
        let inner = &self.0;
        if let Some(p) = inner.pages.lock().unwrap_or_else(|p| p.into_inner()).get(n) {
            return Ok(p);
        }
        let digest = self.page_digest(n).ok_or_else(|| {
            Error::InvalidRequest(format!("disk {} has no index page {n}", inner.disk))
        })?;
        let page = inner.vault.read_page_of(&inner.root, n, &digest).await?;
        let entries = Arc::new(page.entries().collect::<Vec<_>>());
        let weight = entries.len() as u64;
        inner.pages.lock().unwrap_or_else(|p| p.into_inner()).put(n, Arc::clone(&entries), weight);
        Ok(entries)
    }
}

impl PointReader {
    /// The digest of index page `n`.
    fn page_digest(&self, n: u64) -> Option<Digest> {
        let runs = &self.0.page_runs;
        let run = runs.partition_point(|(first, _)| *first <= n);
        run.checked_sub(1).map(|r| runs[r].1)
    }
}

/// A cache bounded by a total weight, least recently used out first.
struct Lru<V> {
    entries: HashMap<u64, (u64, V, u64)>,
    by_use: BTreeMap<u64, u64>,
    tick: u64,
    weight: u64,
    max: u64,
}

impl<V: Clone> Lru<V> {
    fn new(max: u64) -> Self {
        Lru { entries: HashMap::new(), by_use: BTreeMap::new(), tick: 0, weight: 0, max }
    }

    fn get(&mut self, key: u64) -> Option<V> {
        self.tick += 1;
        let (used, value, _) = self.entries.get_mut(&key)?;
        self.by_use.remove(used);
        *used = self.tick;
        self.by_use.insert(self.tick, key);
        Some(value.clone())
    }

    fn put(&mut self, key: u64, value: V, weight: u64) {
        if weight > self.max {
            return;
        }
        self.tick += 1;
        if let Some((used, _, w)) = self.entries.remove(&key) {
            self.by_use.remove(&used);
            self.weight -= w;
        }
        while self.weight + weight > self.max {
            let Some((_, old)) = self.by_use.pop_first() else { break };
            if let Some((_, _, w)) = self.entries.remove(&old) {
                self.weight -= w;
            }
        }
        self.entries.insert(key, (self.tick, value, weight));
        self.by_use.insert(self.tick, key);
        self.weight += weight;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_keeps_the_recently_used_within_its_weight() {
        let mut lru = Lru::new(10);
        lru.put(1, "a", 4);
        lru.put(2, "b", 4);
        assert_eq!(lru.get(1), Some("a"));
        lru.put(3, "c", 4);
        assert_eq!(lru.get(2), None, "the least recently used went");
        assert_eq!((lru.get(1), lru.get(3)), (Some("a"), Some("c")));
        lru.put(4, "d", 11);
        assert_eq!(lru.get(4), None, "heavier than the whole cache: not kept");
        lru.put(1, "a2", 2);
        assert_eq!(lru.get(1), Some("a2"));
        assert!(lru.weight <= 10);
    }
}
