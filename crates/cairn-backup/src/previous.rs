//! The previous point, as the (synchronous) engine needs it: its index streamed page by page,
//! and its chunks read back when a patch over one must be checked.

use std::sync::{Arc, Mutex};

use cairn_delta::PreviousIndex;
use cairn_format::index::{BlockEntry, IndexPage, IndexRoot};
use cairn_format::{Digest, DiskRecord};
use cairn_vault::Vault;
use futures::StreamExt;
use tokio::sync::mpsc;

/// Reads pages ahead in a task; the engine's reader thread takes entries one by one. If the
/// previous index cannot be read, the rest of the disk is compared against nothing (a full
/// scan from there) and the reason is kept for the point's evidence.
///
/// A run of identical pages (the root names it once, with a count: the holes of a sparse
/// disk) is read once and skipped whole, so a sparse disk's previous index costs time and
/// memory by its runs, not by its size.
pub(crate) struct VaultPrevious {
    runs: mpsc::Receiver<Result<PageRun, String>>,
    /// The current run's page, expanded, and the position in it.
    entries: Vec<BlockEntry>,
    pos: usize,
    /// Times the current page repeats after this one.
    repeats: u64,
    block: u64,
    failure: Arc<Mutex<Option<String>>>,
    done: bool,
}

/// One page of the root and how many times in a row it comes (kept as read, runs and all:
/// only the page in use is expanded, whatever the vault's page size).
struct PageRun {
    page: IndexPage,
    times: u64,
}

impl VaultPrevious {
    /// Starts reading the pages of `disk`'s index from `vault`. The root must describe the
    /// disk the manifest records, and each page cover its place: a tracked scan carries
    /// entries unread, so an entry shifted onto another block would be silent damage.
    pub(crate) async fn start(
        vault: &Vault,
        disk: &DiskRecord,
    ) -> Result<(Self, Arc<Mutex<Option<String>>>), cairn_vault::Error> {
        let root = Arc::new(vault.read_disk_index(disk).await?);
        let (tx, rx) = mpsc::channel(4);
        let vault = vault.clone();
        tokio::spawn(async move {
            let mut first = 0u64;
            let runs: Vec<(u64, Digest, u64)> = root
                .pages
                .iter()
                .map(|&(digest, times)| {
                    let run = (first, digest, times);
                    first += times;
                    run
                })
                .collect();
            let mut pages = futures::stream::iter(runs)
                .map(|(first, digest, times)| {
                    let (vault, root) = (vault.clone(), Arc::clone(&root));
                    async move { read_run(&vault, &root, first, &digest, times).await }
                })
                .buffered(4);
            while let Some(run) = pages.next().await {
                let failed = run.is_err();
                if tx.send(run).await.is_err() || failed {
                    return;
                }
            }
        });
        let failure = Arc::new(Mutex::new(None));
        let me = VaultPrevious {
            runs: rx,
            entries: Vec::new(),
            pos: 0,
            repeats: 0,
            block: 0,
            failure: Arc::clone(&failure),
            done: false,
        };
        Ok((me, failure))
    }

    /// Moves to the next page: the current one again if it repeats, else the next run's.
    /// False once there are no more.
    fn next_page(&mut self) -> bool {
        loop {
            if self.repeats > 0 {
                self.repeats -= 1;
                self.pos = 0;
                return true;
            }
            if self.done {
                return false;
            }
            match self.runs.blocking_recv() {
                Some(Ok(run)) => {
                    self.entries = run.page.entries().collect();
                    (self.pos, self.repeats) = (0, run.times.saturating_sub(1));
                    if !self.entries.is_empty() {
                        return true;
                    }
                    self.repeats = 0;
                }
                Some(Err(e)) => {
                    self.done = true;
                    let why =
                        format!("the previous index is unreadable from block {}: {e}", self.block);
                    if let Ok(mut f) = self.failure.lock() {
                        *f = Some(why);
                    }
                }
                None => self.done = true,
            }
        }
    }
}

/// Reads the page that comes `times` times from page `first` on, checked at both ends of the
/// run (the disk's last page may be the short one).
async fn read_run(
    vault: &Vault,
    root: &IndexRoot,
    first: u64,
    digest: &Digest,
    times: u64,
) -> Result<PageRun, String> {
    let page = vault.read_page_of(root, first, digest).await.map_err(|e| e.to_string())?;
    // A decoded root repeats every page at least once.
    let last = first + times.saturating_sub(1);
    root.check_page(last, &page).map_err(|e| format!("page {digest}: {e}"))?;
    Ok(PageRun { page, times })
}

impl PreviousIndex for VaultPrevious {
    fn next_entry(
        &mut self,
    ) -> Result<Option<BlockEntry>, Box<dyn std::error::Error + Send + Sync>> {
        loop {
            if let Some(entry) = self.entries.get(self.pos) {
                self.pos += 1;
                self.block += 1;
                return Ok(Some(*entry));
            }
            if !self.next_page() {
                return Ok(None);
            }
        }
    }

    /// Skips whole repeats of a page without expanding them.
    fn skip_entries(
        &mut self,
        mut count: u64,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        while count > 0 {
            let len = self.entries.len() as u64;
            let here = (len - self.pos as u64).min(count);
            self.pos += here as usize;
            self.block += here;
            count -= here;
            if count == 0 {
                break;
            }
            // The current page is used up: skip the repeats the count covers whole.
            let whole = self.repeats.min(count / len.max(1));
            self.repeats -= whole;
            self.block += whole * len;
            count -= whole * len;
            if count == 0 || !self.next_page() {
                break;
            }
        }
        Ok(())
    }
}

/// Bases of patches read back from the vault, for the engine's worker threads (which are not
/// the runtime's: they may block).
pub(crate) struct VaultBases(cairn_vault::FrameReader, cairn_format::Crypto);

impl VaultBases {
    /// Reads from `vault` (call it within the runtime).
    pub(crate) fn new(vault: &Vault) -> Self {
        VaultBases(vault.frame_reader(), vault.crypto().clone())
    }
}

impl cairn_delta::Bases for VaultBases {
    /// The bases' plaintexts, each frame's CRC checked (and in an encrypted vault its tag).
    /// Their id is not: the engine compares each with the new block byte for byte, so a
    /// damaged copy can only fail that comparison (and the block is stored whole).
    fn bases(&self, ids: &[Digest]) -> Vec<Result<Vec<u8>, cairn_delta::BoxError>> {
        self.0
            .read(ids)
            .into_iter()
            .zip(ids)
            .map(|(frame, id)| {
                Ok(cairn_format::ChunkFrame::open_in(&self.1, &frame?, id)?.plaintext)
            })
            .collect()
    }

    fn expect(&self, id: &Digest) {
        self.0.expect(std::slice::from_ref(id));
    }
}
