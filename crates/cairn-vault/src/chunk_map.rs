//! Where each chunk lives: the vault's pack indexes, loaded into memory.
//!
//! The map is the union of the committed pack indexes, minus the places verify quarantined.
//! It answers two questions: "does the vault hold this chunk?" (so a backup stores it once)
//! and "where?" (so a reader fetches its frame with one ranged read). It grows by 44 bytes
//! per distinct chunk in the vault, about 0.07% of the data at 64 KiB blocks: places are held
//! in a `PlaceTable`, sorted arrays with no hash-map slack.
//!
//! Only committed pack indexes are loaded, so a chunk is never "present" because of a backup
//! that is still running or that failed: a point can reference only chunks whose place is
//! durable in a pack index written before its manifest.
//!
//! A reader of one point need not wait for the whole map: [`Vault::focus_on_point`] makes
//! lookups try that point's own pack index first, then those of its VM's earlier points, and
//! load the whole map (afresh) only for a chunk found in none of them (one deduplicated
//! against another VM, or moved by a collector). Each stage honours quarantine as the whole
//! map does. Where a chunk has two good copies, a focused map may pick the other one than the
//! whole map (which keeps the oldest index's, the copy verify reads): a chunk read from a
//! focused map's place that turns out bad is read again where the whole map places it before
//! it counts as damaged ([`Vault::read_chunk`]).
//!
//! Every load runs as a task of its own: a lookup inside a buffered stream waits for the
//! task, never holds the load lock itself, so a future its stream no longer polls cannot
//! block the loads the others wait for.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::PoisonError;
use std::sync::atomic::Ordering;

use cairn_format::pack::{IndexedPack, decode_pack_index};
use cairn_format::{Digest, Name, PointId};
use futures::StreamExt;
use object_store::ObjectStoreExt;
use object_store::path::Path;

use crate::place_table::{Keep, Place, PlaceTable};
use crate::{Error, Vault, layout};

/// Where a chunk's frame is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLocation {
    /// The pack that holds it.
    pub pack: Digest,
    /// Offset of the frame in the pack.
    pub offset: u32,
    /// Length of the frame.
    pub len: u32,
}

/// The in-memory map; see the module docs.
#[derive(Debug, Default)]
pub(crate) struct ChunkMap {
    loaded: HashSet<String>,
    packs: Vec<Digest>,
    pack_numbers: HashMap<Digest, u32>,
    /// One place per chunk, settled (sorted) whenever the map is shared.
    places: PlaceTable,
    quarantined: HashSet<(Digest, Digest)>,
    unreadable: Vec<(String, String)>,
}

impl ChunkMap {
    fn pack_number(&mut self, pack: Digest) -> u32 {
        *self.pack_numbers.entry(pack).or_insert_with(|| {
            self.packs.push(pack);
            (self.packs.len() - 1) as u32
        })
    }

    /// Adds the chunks of `packs`; a chunk already placed keeps its first place.
    pub(crate) fn add(&mut self, name: String, packs: &[IndexedPack]) {
        self.push(name, packs);
        self.places.settle(Keep::First);
    }

    /// `add` without sorting: a bulk load pushes every index, then settles once.
    fn push(&mut self, name: String, packs: &[IndexedPack]) {
        self.loaded.insert(name);
        for p in packs {
            let pack = self.pack_number(p.pack);
            for e in &p.entries {
                if self.quarantined.contains(&(e.id, p.pack)) {
                    continue;
                }
                self.places.push(Place { id: e.id, pack, offset: e.offset, len: e.len });
            }
        }
    }

    /// Moves what `new` loaded into this map; chunks this map places keep their place.
    fn absorb(&mut self, mut new: ChunkMap) {
        let numbers: Vec<u32> = new.packs.iter().map(|p| self.pack_number(*p)).collect();
        new.places.renumber(|n| numbers[n as usize]);
        self.places.append(new.places);
        self.places.settle(Keep::First);
        self.loaded.extend(new.loaded);
        self.unreadable.extend(new.unreadable);
    }

    /// The bad copies the map leaves out: (chunk, pack).
    pub(crate) fn quarantined(&self) -> &HashSet<(Digest, Digest)> {
        &self.quarantined
    }

    /// True if a loaded pack index names `pack`.
    pub(crate) fn has_pack(&self, pack: &Digest) -> bool {
        self.pack_numbers.contains_key(pack)
    }

    /// How many places `keep` accepts in each pack.
    pub(crate) fn count_by_pack(&self, keep: impl Fn(&Digest) -> bool) -> HashMap<Digest, u64> {
        let mut counts = vec![0u64; self.packs.len()];
        for p in self.places.shards().iter().flatten().filter(|p| keep(&p.id)) {
            counts[p.pack as usize] += 1;
        }
        counts
            .into_iter()
            .enumerate()
            .filter(|(_, n)| *n > 0)
            .map(|(i, n)| (self.packs[i], n))
            .collect()
    }

    /// The first chunk placed in `pack` that `keep` accepts.
    pub(crate) fn first_in_pack(
        &self,
        pack: &Digest,
        keep: impl Fn(&Digest) -> bool,
    ) -> Option<Digest> {
        let n = *self.pack_numbers.get(pack)?;
        self.places.shards().iter().flatten().find(|p| p.pack == n && keep(&p.id)).map(|p| p.id)
    }

    pub(crate) fn locate(&self, id: &Digest) -> Option<ChunkLocation> {
        let place = self.places.places(id).first()?;
        let pack = *self.packs.get(place.pack as usize)?;
        Some(ChunkLocation { pack, offset: place.offset, len: place.len })
    }
}

/// How much of the map to load.
enum Load {
    /// Pack indexes not loaded yet.
    New,
    /// Everything afresh, unless the map was loaded whole before.
    IfNever,
    /// Everything again, from scratch.
    All,
}

/// Pack indexes tried before the whole map, for a reader of one point.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Stage {
    /// The pack index the point wrote.
    Own(PointId),
    /// The pack indexes of the VM's points before `upto` (its chain, and its siblings).
    Earlier { vm: Name, upto: PointId },
}

/// The focus stages still to load, and those loaded (never queued twice).
#[derive(Debug, Default)]
struct Focus {
    pending: VecDeque<Stage>,
    done: Vec<Stage>,
}

/// The map and whether it was ever loaded.
#[derive(Debug, Default)]
pub(crate) struct SharedChunkMap {
    map: std::sync::RwLock<ChunkMap>,
    /// Serialises loads.
    refreshing: tokio::sync::Mutex<()>,
    /// True once the map was loaded. Readers check it without the lock: they run inside
    /// buffered streams, where a future that was granted an async lock may not be polled
    /// again until the futures waiting behind it finish, a deadlock.
    loaded: std::sync::atomic::AtomicBool,
    /// Stages to load before the whole map, in order (see the module docs).
    focus: std::sync::Mutex<Focus>,
}

impl SharedChunkMap {
    pub(crate) fn read<T>(&self, f: impl FnOnce(&ChunkMap) -> T) -> T {
        f(&self.map.read().unwrap_or_else(PoisonError::into_inner))
    }

    pub(crate) fn write<T>(&self, f: impl FnOnce(&mut ChunkMap) -> T) -> T {
        f(&mut self.map.write().unwrap_or_else(PoisonError::into_inner))
    }
}

impl Vault {
    /// Loads the pack indexes committed since the last call (all of them the first time) and
    /// the quarantine markers. Backups call this as they start, so that they deduplicate
    /// against everything committed before them.
    pub async fn refresh_chunk_map(&self) -> Result<(), Error> {
        self.load_chunk_map(Load::New).await
    }

    /// Until the whole map is needed, lookups try the pack index `point` of `vm` wrote, then
    /// those of the VM's earlier points, before loading every pack index: an export or a file
    /// read of one point starts after reading a few small objects, not the vault's every
    /// index. Calls for other points add their stages after these. Nothing changes once the
    /// whole map is loaded (a backup's handle).
    pub fn focus_on_point(&self, vm: &Name, point: &PointId) {
        if self.chunk_map.loaded.load(Ordering::Acquire) {
            return;
        }
        let mut focus = self.chunk_map.focus.lock().unwrap_or_else(PoisonError::into_inner);
        for stage in
            [Stage::Own(point.clone()), Stage::Earlier { vm: vm.clone(), upto: point.clone() }]
        {
            if !focus.pending.contains(&stage) && !focus.done.contains(&stage) {
                focus.pending.push_back(stage);
            }
        }
    }

    /// Makes ready to read point `point` of `vm`: a handle whose map is loaded refreshes it
    /// (what other hosts committed or quarantined since it last looked); one that never
    /// loaded it focuses on the point ([`Vault::focus_on_point`]) instead of loading it all.
    pub async fn prepare_to_read(&self, vm: &Name, point: &PointId) -> Result<(), Error> {
        if self.chunk_map.loaded.load(Ordering::Acquire) {
            return self.refresh_chunk_map().await;
        }
        self.focus_on_point(vm, point);
        Ok(())
    }

    /// Where each of `ids` is, through the focus stages while the whole map is not loaded:
    /// stages are loaded in turn until every id is placed, then the whole map if one is not.
    async fn locate_focused(&self, ids: &[Digest]) -> Result<Vec<Option<ChunkLocation>>, Error> {
        loop {
            // Whether the map was whole is read before the map: a map made whole between the
            // two reads would otherwise pass a partial answer off as final.
            let whole = self.chunk_map.loaded.load(Ordering::Acquire);
            let found: Vec<Option<ChunkLocation>> =
                self.chunk_map.read(|m| ids.iter().map(|id| m.locate(id)).collect());
            if whole || found.iter().all(Option::is_some) {
                return Ok(found);
            }
            let (vault, wanted) = (self.clone(), ids.to_vec());
            in_own_task(async move {
                if !vault.load_focus_stage(&wanted).await? {
                    vault.load_chunk_map_now(Load::IfNever).await?;
                }
                Ok(())
            })
            .await?;
        }
    }

    /// Loads the next focus stage; false when none is left (the whole map is then needed).
    async fn load_focus_stage(&self, wanted: &[Digest]) -> Result<bool, Error> {
        let _one_at_a_time = self.chunk_map.refreshing.lock().await;
        // Another reader may have loaded what this one misses while it waited.
        if self.chunk_map.loaded.load(Ordering::Acquire)
            || self.chunk_map.read(|m| wanted.iter().all(|id| m.locate(id).is_some()))
        {
            return Ok(true);
        }
        let next =
            self.chunk_map.focus.lock().unwrap_or_else(PoisonError::into_inner).pending.pop_front();
        let Some(stage) = next else { return Ok(false) };
        let loaded = self.load_stage(&stage).await;
        let mut focus = self.chunk_map.focus.lock().unwrap_or_else(PoisonError::into_inner);
        match loaded {
            // Tried again by the next lookup.
            Err(e) => {
                focus.pending.push_front(stage);
                Err(e)
            }
            Ok(true) => {
                // A copy this map placed was quarantined meanwhile: only a whole, fresh map is
                // sure to find the good one.
                focus.pending.clear();
                Ok(false)
            }
            Ok(false) => {
                focus.done.push(stage);
                Ok(true)
            }
        }
    }

    /// Loads the pack indexes of `stage` into the shared map; true if the map went stale.
    async fn load_stage(&self, stage: &Stage) -> Result<bool, Error> {
        let names = match stage {
            Stage::Own(point) => vec![layout::pack_index(point)],
            Stage::Earlier { vm, upto } => {
                // Only indexes that exist: after a collector folded old ones into its own,
                // most earlier points have none.
                let indexes: HashSet<Path> =
                    self.list_paths(&layout::pack_indexes()).await?.into_iter().collect();
                self.list_paths(&layout::points(Some(vm)))
                    .await?
                    .iter()
                    .filter_map(layout::parse_point_path)
                    // Ids begin with their start time to the millisecond (a guide, not a
                    // rule: a point missed here is found by the whole map).
                    .filter(|(_, id)| id != upto && id.as_str()[..19] <= upto.as_str()[..19])
                    .map(|(_, id)| layout::pack_index(&id))
                    .filter(|p| indexes.contains(p))
                    .collect()
            }
        };
        self.load_indexes_into(None, Some(names)).await
    }

    /// Forgets the map and loads it again (after a quarantine changed which places count).
    pub(crate) async fn reload_chunk_map(&self) -> Result<(), Error> {
        self.load_chunk_map(Load::All).await
    }

    /// After a collector moved chunks: a map this process loaded is loaded again; one it
    /// never loaded stays unloaded (the collector itself needs none).
    pub(crate) async fn reload_chunk_map_if_loaded(&self) -> Result<(), Error> {
        if self.chunk_map.loaded.load(Ordering::Acquire) {
            self.reload_chunk_map().await?;
        }
        Ok(())
    }

    /// Loads the map as `how` says, in a task of its own (see the module docs).
    async fn load_chunk_map(&self, how: Load) -> Result<(), Error> {
        let vault = self.clone();
        in_own_task(async move { vault.load_chunk_map_now(how).await }).await
    }

    async fn load_chunk_map_now(&self, how: Load) -> Result<(), Error> {
        let _one_at_a_time = self.chunk_map.refreshing.lock().await;
        match how {
            Load::IfNever if self.chunk_map.loaded.load(Ordering::Acquire) => return Ok(()),
            // A map never loaded whole is loaded afresh: a focused map's places give way to
            // the whole map's.
            Load::All | Load::IfNever => {
                let mut fresh = ChunkMap::default();
                self.load_indexes_into(Some(&mut fresh), None).await?;
                // Swapped whole, so that readers never see a half-loaded map.
                self.chunk_map.write(|m| *m = fresh);
            }
            Load::New => {
                if self.load_indexes_into(None, None).await? {
                    // Another host quarantined a copy this map points to: the good copy may
                    // be in an index loaded long ago, and only a fresh map finds it.
                    let mut fresh = ChunkMap::default();
                    self.load_indexes_into(Some(&mut fresh), None).await?;
                    self.chunk_map.write(|m| *m = fresh);
                }
            }
        }
        let mut focus = self.chunk_map.focus.lock().unwrap_or_else(PoisonError::into_inner);
        *focus = Focus::default();
        self.chunk_map.loaded.store(true, Ordering::Release);
        Ok(())
    }

    /// Loads pack indexes not loaded yet into `local`, or into the shared map when `None`:
    /// all those listed, or only those of `only` (a focus stage; one that does not exist is
    /// skipped). Returns true if a quarantine marker that is new to the map names a copy the
    /// map uses, or a pack index the map loaded is gone (known only from a whole listing):
    /// the map must then be loaded again from scratch.
    async fn load_indexes_into(
        &self,
        mut local: Option<&mut ChunkMap>,
        only: Option<Vec<Path>>,
    ) -> Result<bool, Error> {
        let mut apply = |f: &mut dyn FnMut(&mut ChunkMap)| match local.as_deref_mut() {
            Some(m) => f(m),
            None => self.chunk_map.write(|m| f(m)),
        };
        let quarantined: HashSet<(Digest, Digest)> = self
            .list_paths(&layout::quarantine())
            .await?
            .iter()
            .filter_map(layout::parse_quarantined)
            .collect();
        let whole = only.is_none();
        let mut names = match only {
            Some(names) => names,
            None => self.list_paths(&layout::pack_indexes()).await?,
        };
        let listed: HashSet<String> = names.iter().map(ToString::to_string).collect();
        apply(&mut |m| names.retain(|p| !m.loaded.contains(p.as_ref())));
        // New indexes go into a map of their own, settled once and absorbed whole: the shared
        // map is never seen half sorted.
        let mut incoming = ChunkMap { quarantined, ..ChunkMap::default() };
        let mut fetched = futures::stream::iter(names)
            .map(|path| async move {
                let bytes = self.get_bytes(&path).await;
                (path, bytes)
            })
            .buffered(16);
        while let Some((path, bytes)) = fetched.next().await {
            let decoded = match bytes? {
                // Listed a moment ago and gone now: a collector removed it; nothing to load.
                None => continue,
                Some(bytes) => self
                    .crypto
                    .open("pack index", path.as_ref(), &bytes)
                    .and_then(|plain| decode_pack_index(&plain)),
            };
            match decoded {
                Ok(packs) => incoming.push(path.to_string(), &packs),
                Err(e) => {
                    // Its chunks stay unknown: backups store them again, verify reports the
                    // points that need them. The packs themselves still say what they hold.
                    tracing::warn!(%path, error = %e, "unreadable pack index; its chunks are treated as missing");
                    incoming.loaded.insert(path.to_string());
                    incoming.unreadable.push((path.to_string(), e.to_string()));
                }
            }
        }
        // The map learns of new quarantine markers only with the indexes, all loaded: a load
        // that failed half-way leaves them new to the next, which then sees the map is stale.
        let mut stale = false;
        apply(&mut |m| {
            // A pack index loaded before and gone now was rewritten by a collector: the
            // packs it named may be gone, and only a fresh map forgets them.
            let removed = whole && m.loaded.iter().any(|l| !listed.contains(l));
            stale = removed
                || incoming.quarantined.iter().any(|(id, pack)| {
                    !m.quarantined.contains(&(*id, *pack))
                        && m.locate(id).is_some_and(|loc| loc.pack == *pack)
                });
            m.quarantined.extend(incoming.quarantined.iter().copied());
            m.absorb(std::mem::take(&mut incoming));
        });
        Ok(stale)
    }

    /// Where chunk `id` is stored, if the vault holds it.
    pub async fn locate_chunk(&self, id: &Digest) -> Result<Option<ChunkLocation>, Error> {
        Ok(self.locate_chunks(std::slice::from_ref(id)).await?.pop().flatten())
    }

    /// Where each of `ids` is stored: one lookup under one lock for a page's worth of chunks.
    pub async fn locate_chunks(&self, ids: &[Digest]) -> Result<Vec<Option<ChunkLocation>>, Error> {
        if !self.chunk_map.loaded.load(Ordering::Acquire) {
            return self.locate_focused(ids).await;
        }
        Ok(self.chunk_map.read(|m| ids.iter().map(|id| m.locate(id)).collect()))
    }

    /// True while the map holds only a focused reader's pack indexes (see the module docs).
    pub(crate) fn chunk_map_is_partial(&self) -> bool {
        !self.chunk_map.loaded.load(Ordering::Acquire)
    }

    /// Where the map places `id` now, without loading anything.
    pub(crate) fn placed(&self, id: &Digest) -> Option<ChunkLocation> {
        self.chunk_map.read(|m| m.locate(id))
    }

    /// How many pack indexes the chunk map holds, and whether it holds them all (false while
    /// a focused reader has loaded only its point's).
    pub fn pack_indexes_loaded(&self) -> (usize, bool) {
        let n = self.chunk_map.read(|m| m.loaded.len());
        (n, self.chunk_map.loaded.load(Ordering::Acquire))
    }

    /// Pack indexes that could not be read, with the reason.
    pub fn unreadable_pack_indexes(&self) -> Vec<(String, String)> {
        self.chunk_map.read(|m| m.unreadable.clone())
    }

    /// Moves unreadable pack indexes to `quarantine/pack-index/`, so that they are reported
    /// once: their chunks are then simply missing (the points that need them are damaged until
    /// a backup stores those blocks again), and the packs still hold their own tables.
    pub(crate) async fn quarantine_pack_indexes(&self) -> Result<(), Error> {
        if self.is_append_only() {
            // Reported by verify; moved aside by an agent allowed to delete.
            return Ok(());
        }
        let unreadable = self.chunk_map.write(|m| std::mem::take(&mut m.unreadable));
        for (path, _) in unreadable {
            let from = object_store::path::Path::from(path.as_str());
            let to = layout::quarantined_pack_index(&from);
            match self.store.copy(&from, &to).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(Error::storage("quarantine", &from, e)),
            }
            match self.store.delete(&from).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(Error::storage("delete", &from, e)),
            }
        }
        Ok(())
    }
}

/// Runs `load` as a task of its own and waits for it (see the module docs). A load that
/// panicked panics here; one the runtime dropped as it shut down is an error.
async fn in_own_task(
    load: impl std::future::Future<Output = Result<(), Error>> + Send + 'static,
) -> Result<(), Error> {
    match tokio::spawn(load).await {
        Ok(done) => done,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(Error::Io {
            path: "pack-index".into(),
            source: std::io::Error::other(format!("loading the chunk map stopped: {e}")),
        }),
    }
}
