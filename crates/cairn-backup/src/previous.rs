//! The previous point, as the (synchronous) engine needs it: its index streamed page by page,
//! and its chunks read back when a patch over one must be checked.

use std::sync::{Arc, Mutex};

use cairn_delta::PreviousIndex;
use cairn_format::index::{BlockEntry, IndexPage};
use cairn_format::{Digest, DiskRecord};
use cairn_vault::Vault;
use futures::StreamExt;
use tokio::sync::mpsc;

/// Reads pages ahead in a task; the engine's reader thread takes entries one by one. If the
/// previous index cannot be read, the rest of the disk is compared against nothing (a full
/// scan from there) and the reason is kept for the point's evidence.
pub(crate) struct VaultPrevious {
    pages: mpsc::Receiver<Result<IndexPage, String>>,
    current: std::vec::IntoIter<BlockEntry>,
    block: u64,
    failure: Arc<Mutex<Option<String>>>,
    done: bool,
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
            let digests = root.as_ref().clone().into_page_digests().enumerate();
            let mut pages = futures::stream::iter(digests)
                .map(|(i, d)| {
                    let (vault, root) = (vault.clone(), Arc::clone(&root));
                    async move {
                        vault.read_page_of(&root, i as u64, &d).await.map_err(|e| e.to_string())
                    }
                })
                .buffered(4);
            while let Some(page) = pages.next().await {
                let failed = page.is_err();
                if tx.send(page).await.is_err() || failed {
                    return;
                }
            }
        });
        let failure = Arc::new(Mutex::new(None));
        let me = VaultPrevious {
            pages: rx,
            current: Vec::new().into_iter(),
            block: 0,
            failure: Arc::clone(&failure),
            done: false,
        };
        Ok((me, failure))
    }
}

impl PreviousIndex for VaultPrevious {
    fn next_entry(
        &mut self,
    ) -> Result<Option<BlockEntry>, Box<dyn std::error::Error + Send + Sync>> {
        loop {
            if let Some(entry) = self.current.next() {
                self.block += 1;
                return Ok(Some(entry));
            }
            if self.done {
                return Ok(None);
            }
            match self.pages.blocking_recv() {
                Some(Ok(page)) => self.current = page.entries().collect::<Vec<_>>().into_iter(),
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
