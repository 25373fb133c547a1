//! The disk index: which content each block of a disk had at a recovery point.
//!
//! An index is paged and content-addressed. A *page* lists the blocks of a fixed run of
//! `blocks_per_page` blocks (the last page may be shorter), with runs of holes and zero blocks
//! run-length encoded; each page is stored as an ordinary chunk, named by the SHA-256 of its
//! bytes. A page holds no position, so a page whose blocks did not change since the previous
//! point has the same bytes, the same name, and is not stored again; all-hole pages of a sparse
//! disk are one chunk. The *root* names the pages in order, with repeated pages run-length
//! encoded, and is itself a chunk, referenced from the manifest.
//!
//! Writing is a stream ([`IndexWriter`]: one page in memory), and so is reading (one page at a
//! time), so memory stays flat in disk size.
//!
//! Page bytes:
//! ```text
//!  0  4  magic "CIXP"
//!  4  1  version: 1, or 2 when some item has tag 3 or 4 (and only then)
//!  5  3  reserved, 0
//!  8  4  blocks covered, u32 LE
//! 12  4  item count, u32 LE
//! 16  …  items: tag u8, then
//!          0 hole run:  varint count (>= 1)
//!          1 zero run:  varint count (>= 1)
//!          2 data:      32-byte SHA-256 of the block's plaintext (one block, no piece sums)
//!          3 patch:     32-byte SHA-256 of the block, 32-byte base chunk id, 32-byte patch
//!                       chunk id, generation u8 (>= 1), piece count n u8 (2..=16), n base
//!                       piece sums u64 LE (one block)
//!          4 data+sums: 32-byte SHA-256 of the block, piece count n u8 (2..=16), n piece
//!                       sums u64 LE (one block)
//! ```
//! See [`crate::patch`] for pieces, sums and patches.
//! Root bytes:
//! ```text
//!  0  4  magic "CIXR"
//!  4  1  version (1)
//!  5  3  reserved, 0
//!  8  8  disk size in bytes, u64 LE
//! 16  4  block size, u32 LE
//! 20  4  blocks per page, u32 LE
//! 24  4  run count, u32 LE
//! 28  …  runs: varint repeat (>= 1), 32-byte page digest
//! ```

use crate::codec::{Reader, put_varint};
use crate::patch::{MAX_PIECES, PieceSums};
use crate::{Digest, Error, check_block_size};

const PAGE_MAGIC: &[u8; 4] = b"CIXP";
const ROOT_MAGIC: &[u8; 4] = b"CIXR";
const VERSION: u8 = 1;
/// Pages with piece sums or patches (tags 3 and 4): a reader that predates them refuses the
/// page as a newer version ("upgrade Cairn") instead of calling it corrupt.
const PAGE_VERSION_PIECES: u8 = 2;
const PAGE: &str = "index page";
const ROOT: &str = "index root";
/// Pages cover this many blocks unless the vault config says otherwise (64 MiB of disk at
/// 64 KiB blocks, at most about 33 KiB of page).
pub const DEFAULT_BLOCKS_PER_PAGE: u32 = 1024;
/// The most blocks one page may cover.
pub const MAX_BLOCKS_PER_PAGE: u32 = 65536;

/// What one block of a disk held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockEntry {
    /// Not allocated in the source (read as zeros); restored as a hole.
    Hole,
    /// Allocated but all zeros; never stored, restored as a hole.
    Zero,
    /// Stored whole as the chunk `digest` (the SHA-256 of the block), with the sums of its
    /// pieces when they were recorded.
    Data {
        /// The block's SHA-256, which is also its chunk id.
        digest: Digest,
        /// Its piece sums ([`PieceSums::NONE`] in indexes written before sub-block deltas).
        sums: PieceSums,
    },
    /// Stored as a patch over an earlier version of the block.
    Patch(PatchRef),
}

/// A block stored as a patch: rebuilt by applying chunk `patch` over chunk `base`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PatchRef {
    /// The SHA-256 of the whole rebuilt block: what restore and verify check.
    pub digest: Digest,
    /// The whole block the patch applies to (a chunk in the vault, kept alive by this entry).
    pub base: Digest,
    /// The patch chunk (see [`crate::patch`]).
    pub patch: Digest,
    /// How many points in a row have stored this block as a patch over `base` (1 for the
    /// first); a writer stores the block whole again when this reaches its bound.
    pub generation: u8,
    /// The piece sums of `base`: the next backup compares the new block's sums with them.
    pub base_sums: PieceSums,
}

impl BlockEntry {
    /// A block stored whole, without piece sums.
    pub fn data(digest: Digest) -> BlockEntry {
        BlockEntry::Data { digest, sums: PieceSums::NONE }
    }

    /// The SHA-256 of the block's content, if it has stored content.
    pub fn content(&self) -> Option<&Digest> {
        match self {
            BlockEntry::Data { digest, .. } | BlockEntry::Patch(PatchRef { digest, .. }) => {
                Some(digest)
            }
            BlockEntry::Hole | BlockEntry::Zero => None,
        }
    }

    /// The chunks this block needs: none, its data chunk, or a patch's base and patch. Whatever
    /// removes chunks from a vault must keep every chunk some kept point's entry names here.
    pub fn chunks(&self) -> impl Iterator<Item = Digest> + use<> {
        let (a, b) = match self {
            BlockEntry::Hole | BlockEntry::Zero => (None, None),
            BlockEntry::Data { digest, .. } => (Some(*digest), None),
            BlockEntry::Patch(p) => (Some(p.base), Some(p.patch)),
        };
        a.into_iter().chain(b)
    }

    /// What a new version of this block could be patched against: the base chunk, its piece
    /// sums and the generation so far (0 for a block stored whole).
    pub fn patch_base(&self) -> Option<(Digest, PieceSums, u8)> {
        match self {
            BlockEntry::Data { digest, sums } if !sums.is_empty() => Some((*digest, *sums, 0)),
            BlockEntry::Patch(p) => Some((p.base, p.base_sums, p.generation)),
            _ => None,
        }
    }
}

/// One run of a page: either a run of identical hole/zero entries or a single stored block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[expect(
    clippy::large_enum_variant,
    reason = "a page is mostly stored blocks; boxing them would allocate once per block"
)]
pub enum PageItem {
    /// `count` consecutive holes.
    Holes(u64),
    /// `count` consecutive zero blocks.
    Zeros(u64),
    /// One stored block ([`BlockEntry::Data`] or [`BlockEntry::Patch`]).
    Stored(BlockEntry),
}

impl PageItem {
    fn blocks(&self) -> u64 {
        match self {
            PageItem::Holes(n) | PageItem::Zeros(n) => *n,
            PageItem::Stored(_) => 1,
        }
    }
}

/// A decoded page.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct IndexPage {
    items: Vec<PageItem>,
    blocks: u64,
}

impl IndexPage {
    /// The runs, in block order.
    pub fn items(&self) -> &[PageItem] {
        &self.items
    }

    /// How many blocks the page covers.
    pub fn block_count(&self) -> u64 {
        self.blocks
    }

    /// Appends one block's entry, merging runs.
    pub fn push(&mut self, entry: BlockEntry) {
        self.blocks += 1;
        match (entry, self.items.last_mut()) {
            (BlockEntry::Hole, Some(PageItem::Holes(n))) => *n += 1,
            (BlockEntry::Zero, Some(PageItem::Zeros(n))) => *n += 1,
            (BlockEntry::Hole, _) => self.items.push(PageItem::Holes(1)),
            (BlockEntry::Zero, _) => self.items.push(PageItem::Zeros(1)),
            (stored, _) => self.items.push(PageItem::Stored(stored)),
        }
    }

    /// Appends `count` holes, merging runs.
    fn push_holes(&mut self, count: u64) {
        if count == 0 {
            return;
        }
        self.blocks += count;
        match self.items.last_mut() {
            Some(PageItem::Holes(n)) => *n += count,
            _ => self.items.push(PageItem::Holes(count)),
        }
    }

    /// One entry per block, in order.
    pub fn entries(&self) -> impl Iterator<Item = BlockEntry> + '_ {
        self.items.iter().flat_map(|item| {
            let (entry, n) = match item {
                PageItem::Holes(n) => (BlockEntry::Hole, *n),
                PageItem::Zeros(n) => (BlockEntry::Zero, *n),
                PageItem::Stored(e) => (*e, 1),
            };
            std::iter::repeat_n(entry, n as usize)
        })
    }

    /// The page's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.items.len() * 33);
        out.extend_from_slice(PAGE_MAGIC);
        let version = if self.items.iter().any(has_pieces) { PAGE_VERSION_PIECES } else { VERSION };
        out.extend_from_slice(&[version, 0, 0, 0]);
        out.extend_from_slice(&(self.blocks as u32).to_le_bytes());
        out.extend_from_slice(&(self.items.len() as u32).to_le_bytes());
        for item in &self.items {
            match item {
                PageItem::Holes(n) => {
                    out.push(0);
                    put_varint(&mut out, *n);
                }
                PageItem::Zeros(n) => {
                    out.push(1);
                    put_varint(&mut out, *n);
                }
                PageItem::Stored(BlockEntry::Data { digest, sums }) if sums.is_empty() => {
                    out.push(2);
                    out.extend_from_slice(digest.as_bytes());
                }
                PageItem::Stored(BlockEntry::Data { digest, sums }) => {
                    out.push(4);
                    out.extend_from_slice(digest.as_bytes());
                    put_sums(&mut out, sums);
                }
                PageItem::Stored(BlockEntry::Patch(p)) => {
                    out.push(3);
                    out.extend_from_slice(p.digest.as_bytes());
                    out.extend_from_slice(p.base.as_bytes());
                    out.extend_from_slice(p.patch.as_bytes());
                    out.push(p.generation);
                    put_sums(&mut out, &p.base_sums);
                }
                // `push` never makes a stored item of a hole or a zero block.
                PageItem::Stored(BlockEntry::Hole) => {
                    out.push(0);
                    put_varint(&mut out, 1);
                }
                PageItem::Stored(BlockEntry::Zero) => {
                    out.push(1);
                    put_varint(&mut out, 1);
                }
            }
        }
        out
    }

    /// Decodes and checks a page.
    pub fn decode(bytes: &[u8]) -> Result<IndexPage, Error> {
        let mut r = Reader::new(bytes, PAGE);
        let version = r.header_of(PAGE_MAGIC, &[VERSION, PAGE_VERSION_PIECES])?;
        let blocks = u64::from(r.u32()?);
        if blocks == 0 || blocks > u64::from(MAX_BLOCKS_PER_PAGE) {
            return Err(Error::corrupt(PAGE, format!("covers {blocks} blocks")));
        }
        let count = r.u32()? as usize;
        if count as u64 > blocks {
            return Err(Error::corrupt(PAGE, format!("{count} items for {blocks} blocks")));
        }
        // Every item takes at least two bytes: never reserve more than the input can hold.
        let mut items = Vec::with_capacity(count.min(r.remaining() / 2));
        let mut seen: u64 = 0;
        for _ in 0..count {
            let item = match r.u8()? {
                0 => PageItem::Holes(run_len(&mut r)?),
                1 => PageItem::Zeros(run_len(&mut r)?),
                2 => PageItem::Stored(BlockEntry::data(Digest(r.array()?))),
                3 => {
                    let digest = Digest(r.array()?);
                    let base = Digest(r.array()?);
                    let patch = Digest(r.array()?);
                    let generation = r.u8()?;
                    if generation == 0 {
                        return Err(Error::corrupt(PAGE, "patch of generation 0"));
                    }
                    let base_sums = sums(&mut r)?;
                    PageItem::Stored(BlockEntry::Patch(PatchRef {
                        digest,
                        base,
                        patch,
                        generation,
                        base_sums,
                    }))
                }
                4 => {
                    let digest = Digest(r.array()?);
                    PageItem::Stored(BlockEntry::Data { digest, sums: sums(&mut r)? })
                }
                tag => return Err(Error::corrupt(PAGE, format!("unknown item tag {tag}"))),
            };
            seen = seen.saturating_add(item.blocks());
            if seen > blocks {
                return Err(Error::corrupt(PAGE, format!("items cover more than {blocks} blocks")));
            }
            items.push(item);
        }
        r.expect_end()?;
        if seen != blocks {
            return Err(Error::corrupt(PAGE, format!("items cover {seen} of {blocks} blocks")));
        }
        // One encoding per page: version 2 exactly when some item needs it.
        let needs = items.iter().any(has_pieces);
        if needs != (version == PAGE_VERSION_PIECES) {
            return Err(Error::corrupt(
                PAGE,
                format!("version {version} with{} piece sums", if needs { "" } else { "out" }),
            ));
        }
        Ok(IndexPage { items, blocks })
    }
}

/// Whether an item is written with tag 3 or 4 (and so needs a version 2 page).
fn has_pieces(item: &PageItem) -> bool {
    match item {
        PageItem::Stored(BlockEntry::Data { sums, .. }) => !sums.is_empty(),
        PageItem::Stored(BlockEntry::Patch(_)) => true,
        _ => false,
    }
}

fn put_sums(out: &mut Vec<u8>, sums: &PieceSums) {
    out.push(sums.as_slice().len() as u8);
    for s in sums.as_slice() {
        out.extend_from_slice(&s.to_le_bytes());
    }
}

fn sums(r: &mut Reader<'_>) -> Result<PieceSums, Error> {
    let n = usize::from(r.u8()?);
    let mut values = [0u64; MAX_PIECES];
    let Some(slots) = values.get_mut(..n) else {
        return Err(Error::corrupt(PAGE, format!("{n} piece sums; at most {MAX_PIECES}")));
    };
    for v in slots.iter_mut() {
        *v = r.u64()?;
    }
    PieceSums::from_slice(slots)
        .ok_or_else(|| Error::corrupt(PAGE, format!("{n} piece sums; at least 2")))
}

fn run_len(r: &mut Reader<'_>) -> Result<u64, Error> {
    match r.varint()? {
        0 => Err(Error::corrupt(PAGE, "empty run")),
        n => Ok(n),
    }
}

/// The root of one disk's index: its geometry and its pages in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexRoot {
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Block size in bytes (a power of two, 4 KiB to 4 MiB).
    pub block_size: u32,
    /// Blocks per page (the last page may have fewer).
    pub blocks_per_page: u32,
    /// `(page digest, how many times in a row)`, in disk order.
    pub pages: Vec<(Digest, u64)>,
}

impl IndexRoot {
    /// Number of blocks: the disk size divided by the block size, rounded up.
    pub fn block_count(&self) -> u64 {
        self.disk_size.div_ceil(u64::from(self.block_size))
    }

    /// Number of pages the geometry implies.
    pub fn page_count(&self) -> u64 {
        self.block_count().div_ceil(u64::from(self.blocks_per_page.max(1)))
    }

    /// Page digests in order, repeats expanded lazily: a root naming millions of identical
    /// pages (a sparse disk) costs no memory to walk.
    pub fn page_digests(&self) -> impl Iterator<Item = Digest> + '_ {
        self.pages.iter().flat_map(|(d, n)| std::iter::repeat_n(*d, *n as usize))
    }

    /// [`IndexRoot::page_digests`], owning the root (for readers that move it to a task).
    pub fn into_page_digests(self) -> impl Iterator<Item = Digest> + Send + 'static {
        self.pages.into_iter().flat_map(|(d, n)| std::iter::repeat_n(d, n as usize))
    }

    /// The blocks page `page` (0-based) must cover.
    pub fn blocks_in_page(&self, page: u64) -> u64 {
        let bpp = u64::from(self.blocks_per_page);
        self.block_count().saturating_sub(page * bpp).min(bpp)
    }

    /// Checks that this root describes a disk of `disk_size` bytes in `block_size`-byte
    /// blocks (what the point's manifest says). A root is expanded page by page only after
    /// this check, so a crafted root cannot make a reader walk more than the disk.
    pub fn check_geometry(&self, disk_size: u64, block_size: u32) -> Result<(), Error> {
        if self.disk_size != disk_size || self.block_size != block_size {
            return Err(Error::corrupt(
                ROOT,
                format!(
                    "describes a disk of {} bytes in {}-byte blocks, the point's manifest one of \
                     {disk_size} bytes in {block_size}-byte blocks",
                    self.disk_size, self.block_size
                ),
            ));
        }
        Ok(())
    }

    /// Checks that `page`, read as page `page_no` (0-based) of this index, covers exactly the
    /// blocks the geometry gives that page, so entries never shift onto other blocks.
    pub fn check_page(&self, page_no: u64, page: &IndexPage) -> Result<(), Error> {
        let expected = self.blocks_in_page(page_no);
        if page.block_count() != expected {
            return Err(Error::corrupt(
                PAGE,
                format!(
                    "page {page_no} covers {} blocks, the index root gives it {expected}",
                    page.block_count()
                ),
            ));
        }
        Ok(())
    }

    /// The root's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(28 + self.pages.len() * 34);
        out.extend_from_slice(ROOT_MAGIC);
        out.extend_from_slice(&[VERSION, 0, 0, 0]);
        out.extend_from_slice(&self.disk_size.to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&self.blocks_per_page.to_le_bytes());
        out.extend_from_slice(&(self.pages.len() as u32).to_le_bytes());
        for (digest, repeat) in &self.pages {
            put_varint(&mut out, *repeat);
            out.extend_from_slice(digest.as_bytes());
        }
        out
    }

    /// Decodes and checks a root.
    pub fn decode(bytes: &[u8]) -> Result<IndexRoot, Error> {
        let mut r = Reader::new(bytes, ROOT);
        r.header(ROOT_MAGIC, VERSION)?;
        let disk_size = r.u64()?;
        let block_size = r.u32()?;
        check_block_size(block_size).map_err(|e| Error::corrupt(ROOT, e.to_string()))?;
        let blocks_per_page = r.u32()?;
        if blocks_per_page == 0 || blocks_per_page > MAX_BLOCKS_PER_PAGE {
            return Err(Error::corrupt(ROOT, format!("{blocks_per_page} blocks per page")));
        }
        let runs = r.u32()? as usize;
        // Each run takes at least 33 bytes: refuse counts the input cannot hold.
        if runs > r.remaining() / 33 {
            return Err(Error::corrupt(ROOT, format!("{runs} runs in {} bytes", r.remaining())));
        }
        let mut pages = Vec::with_capacity(runs);
        let mut total: u64 = 0;
        for _ in 0..runs {
            let repeat = r.varint()?;
            if repeat == 0 {
                return Err(Error::corrupt(ROOT, "empty page run"));
            }
            total = total.saturating_add(repeat);
            pages.push((Digest(r.array()?), repeat));
        }
        r.expect_end()?;
        let root = IndexRoot { disk_size, block_size, blocks_per_page, pages };
        if total != root.page_count() {
            return Err(Error::corrupt(
                ROOT,
                format!("names {total} pages, the geometry needs {}", root.page_count()),
            ));
        }
        Ok(root)
    }
}

/// A page ready to be stored: its bytes and their digest.
#[derive(Clone, Debug)]
pub struct EncodedPage {
    /// SHA-256 of `bytes`: the chunk id to store it under.
    pub digest: Digest,
    /// The page's bytes.
    pub bytes: Vec<u8>,
}

/// Builds an index as a stream: push one entry per block, in order; full pages come out as
/// they fill, and [`IndexWriter::finish`] returns the last page and the root.
#[derive(Debug)]
pub struct IndexWriter {
    disk_size: u64,
    block_size: u32,
    blocks_per_page: u32,
    page: IndexPage,
    pages: Vec<(Digest, u64)>,
    pushed: u64,
    ids: crate::ChunkIds,
}

impl IndexWriter {
    /// Names pages and the root with `ids` (an encrypted vault's keyed ids) instead of SHA-256.
    pub fn with_ids(mut self, ids: crate::ChunkIds) -> Self {
        self.ids = ids;
        self
    }

    /// A writer for a disk of `disk_size` bytes.
    pub fn new(disk_size: u64, block_size: u32, blocks_per_page: u32) -> Result<Self, Error> {
        check_block_size(block_size)?;
        if blocks_per_page == 0 || blocks_per_page > MAX_BLOCKS_PER_PAGE {
            return Err(Error::Invalid {
                what: "blocks per page",
                detail: format!("{blocks_per_page}; use 1 to {MAX_BLOCKS_PER_PAGE}"),
            });
        }
        Ok(IndexWriter {
            disk_size,
            block_size,
            blocks_per_page,
            page: IndexPage::default(),
            pages: Vec::new(),
            pushed: 0,
            ids: crate::ChunkIds::Sha256,
        })
    }

    /// Adds the next block's entry; returns a page when one fills up.
    pub fn push(&mut self, entry: BlockEntry) -> Option<EncodedPage> {
        self.page.push(entry);
        self.pushed += 1;
        if self.page.block_count() == u64::from(self.blocks_per_page) { self.flush() } else { None }
    }

    /// Adds `count` holes at once (a sparse region costs a step per page, not per block);
    /// returns the pages that fill up.
    pub fn push_holes(&mut self, count: u64) -> Vec<EncodedPage> {
        let mut full = Vec::new();
        // Never past the disk's end (finish then reports the count as wrong): a bad count
        // cannot make the writer encode pages without end.
        let blocks = self.disk_size.div_ceil(u64::from(self.block_size));
        let mut count = count.min(blocks.saturating_sub(self.pushed) + 1);
        let per_page = u64::from(self.blocks_per_page);
        while count > 0 {
            let n = count.min(per_page - self.page.block_count());
            self.page.push_holes(n);
            self.pushed += n;
            count -= n;
            if self.page.block_count() == per_page {
                full.extend(self.flush());
            }
        }
        full
    }

    fn flush(&mut self) -> Option<EncodedPage> {
        if self.page.block_count() == 0 {
            return None;
        }
        let bytes = std::mem::take(&mut self.page).encode();
        let digest = self.ids.of(&bytes);
        match self.pages.last_mut() {
            Some((last, n)) if *last == digest => *n += 1,
            _ => self.pages.push((digest, 1)),
        }
        Some(EncodedPage { digest, bytes })
    }

    /// Ends the index: the last partial page (if any) and the root, encoded.
    pub fn finish(mut self) -> Result<(Option<EncodedPage>, EncodedPage), Error> {
        let expected = self.disk_size.div_ceil(u64::from(self.block_size));
        if self.pushed != expected {
            return Err(Error::Invalid {
                what: "index",
                detail: format!("{} entries pushed for {expected} blocks", self.pushed),
            });
        }
        let last = self.flush();
        let root = IndexRoot {
            disk_size: self.disk_size,
            block_size: self.block_size,
            blocks_per_page: self.blocks_per_page,
            pages: self.pages,
        };
        let bytes = root.encode();
        Ok((last, EncodedPage { digest: self.ids.of(&bytes), bytes }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry() -> impl Strategy<Value = BlockEntry> {
        prop_oneof![
            Just(BlockEntry::Hole),
            Just(BlockEntry::Zero),
            any::<[u8; 32]>().prop_map(|d| BlockEntry::data(Digest(d))),
            // Repeated digests make realistic runs.
            Just(BlockEntry::data(Digest([7; 32]))),
            (any::<[u8; 32]>(), proptest::collection::vec(any::<u64>(), 2..=16)).prop_map(
                |(d, s)| BlockEntry::Data {
                    digest: Digest(d),
                    sums: PieceSums::from_slice(&s).unwrap()
                }
            ),
            (
                any::<[u8; 32]>(),
                any::<[u8; 32]>(),
                1u8..,
                proptest::collection::vec(any::<u64>(), 2..=16)
            )
                .prop_map(|(d, b, generation, s)| BlockEntry::Patch(PatchRef {
                    digest: Digest(d),
                    base: Digest(b),
                    patch: Digest([9; 32]),
                    generation,
                    base_sums: PieceSums::from_slice(&s).unwrap(),
                })),
        ]
    }

    fn build(entries: &[BlockEntry], bpp: u32) -> (Vec<EncodedPage>, IndexRoot) {
        let size = entries.len() as u64 * 4096;
        let mut w = IndexWriter::new(size, 4096, bpp).unwrap();
        let mut pages: Vec<EncodedPage> = entries.iter().filter_map(|e| w.push(*e)).collect();
        let (last, root) = w.finish().unwrap();
        pages.extend(last);
        (pages, IndexRoot::decode(&root.bytes).unwrap())
    }

    #[test]
    fn a_sparse_terabyte_has_a_tiny_root() {
        let size = 1u64 << 40;
        let mut w = IndexWriter::new(size, 65536, DEFAULT_BLOCKS_PER_PAGE).unwrap();
        let mut distinct = std::collections::HashSet::new();
        for p in w.push_holes(size / 65536) {
            distinct.insert(p.digest);
        }
        let (last, root) = w.finish().unwrap();
        assert!(last.is_none());
        assert_eq!(distinct.len(), 1);
        assert!(root.bytes.len() < 100, "{}", root.bytes.len());
    }

    #[test]
    fn too_many_holes_are_refused_not_written_forever() {
        let mut w = IndexWriter::new(10 * 4096, 4096, 4).unwrap();
        assert_eq!(w.push_holes(u64::MAX).len(), 2);
        assert!(w.finish().is_err());
    }

    #[test]
    fn unknown_tags_and_bad_sums_are_refused() {
        let mut page = IndexPage::default();
        page.push(BlockEntry::Hole);
        let mut bytes = page.encode();
        bytes[16] = 5;
        assert!(IndexPage::decode(&bytes).is_err());
        let mut page = IndexPage::default();
        let sums = PieceSums::from_slice(&[1, 2, 3]).unwrap();
        page.push(BlockEntry::Data { digest: Digest([1; 32]), sums });
        let good = page.encode();
        assert!(IndexPage::decode(&good).is_ok());
        let mut old = good.clone();
        old[4] = 1;
        assert!(IndexPage::decode(&old).is_err(), "tag 4 in a version 1 page");
        for n in [0u8, 1, 17] {
            let mut bad = good.clone();
            bad[16 + 1 + 32] = n;
            assert!(IndexPage::decode(&bad).is_err(), "{n} sums");
        }
    }

    proptest! {
        #[test]
        fn index_round_trips(entries in proptest::collection::vec(entry(), 0..300), bpp in 1u32..64) {
            let (pages, root) = build(&entries, bpp);
            let by_digest: std::collections::HashMap<_, _> =
                pages.iter().map(|p| (p.digest, p.bytes.clone())).collect();
            let mut back = Vec::new();
            for (i, d) in root.page_digests().enumerate() {
                let page = IndexPage::decode(&by_digest[&d]).unwrap();
                prop_assert_eq!(page.block_count(), root.blocks_in_page(i as u64));
                back.extend(page.entries());
            }
            prop_assert_eq!(back, entries);
        }

        #[test]
        fn hole_runs_write_what_single_holes_write(
            runs in proptest::collection::vec((entry(), 0u64..200), 0..40),
            bpp in 1u32..64,
        ) {
            // One writer takes each run of holes in one call, the other block by block.
            let entries: Vec<BlockEntry> = runs
                .iter()
                .flat_map(|(e, holes)| {
                    std::iter::once(*e).chain(std::iter::repeat_n(BlockEntry::Hole, *holes as usize))
                })
                .collect();
            let size = entries.len() as u64 * 4096;
            let mut runs_writer = IndexWriter::new(size, 4096, bpp).unwrap();
            let mut by_runs = Vec::new();
            for (e, holes) in &runs {
                by_runs.extend(runs_writer.push(*e));
                by_runs.extend(runs_writer.push_holes(*holes));
            }
            let (last, root) = runs_writer.finish().unwrap();
            by_runs.extend(last);
            let (pages, single_root) = build(&entries, bpp);
            let digests = |p: &[EncodedPage]| p.iter().map(|p| p.digest).collect::<Vec<_>>();
            prop_assert_eq!(digests(&by_runs), digests(&pages));
            prop_assert_eq!(root.bytes, single_root.encode());
        }

        #[test]
        fn page_decode_never_panics(bytes: Vec<u8>) {
            let _ = IndexPage::decode(&bytes);
        }

        #[test]
        fn root_decode_never_panics(bytes: Vec<u8>) {
            let _ = IndexRoot::decode(&bytes);
        }

        #[test]
        fn mutated_pages_never_panic(entries in proptest::collection::vec(entry(), 1..50), pos: usize, byte: u8) {
            let mut page = IndexPage::default();
            entries.iter().for_each(|e| page.push(*e));
            let mut bytes = page.encode();
            let i = pos % bytes.len();
            bytes[i] = byte;
            let _ = IndexPage::decode(&bytes);
            bytes.truncate(i);
            prop_assert!(IndexPage::decode(&bytes).is_err());
        }
    }
}
