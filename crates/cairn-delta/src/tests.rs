//! The engine's tests: classification, ordering, holes, tracking, patches and their checks.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use cairn_format::Digest;
use cairn_format::index::BlockEntry;
use cairn_format::patch::{PieceKey, PieceSums};
use proptest::prelude::*;

use crate::*;

struct Copy;
impl BlockEncoder for Copy {
    type Output = Vec<u8>;
    fn encode(&self, _: &Digest, block: &[u8]) -> Vec<u8> {
        block.to_vec()
    }
}

fn config(threads: usize) -> EngineConfig {
    EngineConfig {
        block_size: 4096,
        threads,
        batch_bytes: 16384,
        buffers: 3,
        tracking: None,
        patch_generations: DEFAULT_PATCH_GENERATIONS,
        piece_key: PieceKey::UNKEYED,
        ids: cairn_format::ChunkIds::Sha256,
    }
}

fn run(
    src: &MemSource,
    prev: Vec<BlockEntry>,
    threads: usize,
) -> (ScanSummary, Vec<BlockEvent<Vec<u8>>>) {
    let mut events = Vec::new();
    let mut expected_first = 0;
    let summary = scan(src, prev.into_iter(), &NoBases, &Copy, &config(threads), |b| {
        assert_eq!(b.first_block, expected_first);
        expected_first += b.block_count();
        let holes = b.trailing_holes as usize;
        events.extend(b.events);
        events.extend(std::iter::repeat_with(|| BlockEvent::Hole).take(holes));
        Ok(())
    })
    .unwrap();
    (summary, events)
}

#[test]
fn classifies_blocks() {
    let mut data = vec![0u8; 4096 * 10 + 100];
    data[4096..8192].fill(1); // block 1: data
    data[4096 * 3 + 5] = 9; // block 3: data
    data[4096 * 10..].fill(2); // block 10: short tail
    let src = MemSource::new("m", data).with_hole(4096 * 5, 4096 * 3);
    let (s, events) = run(&src, vec![], 2);
    let kinds: String = events
        .iter()
        .map(|e| match e {
            BlockEvent::Hole => 'h',
            BlockEvent::Zero => '0',
            BlockEvent::Unchanged(_) => 'u',
            BlockEvent::Changed { .. } => 'c',
        })
        .collect();
    assert_eq!(kinds, "0c0c0hhh00c");
    assert_eq!(s.changed, 3);
    assert_eq!(s.bytes_changed, 4096 * 2 + 100);
    assert_eq!(s.bytes_scanned, 4096 * 7 + 100);
}

#[test]
fn only_changed_blocks_come_with_payload() {
    let data: Vec<u8> = (0..4096 * 8).map(|i| (i / 4096 + 1) as u8).collect();
    let mut src = MemSource::new("m", data);
    let (_, first) = run(&src, vec![], 1);
    let prev: Vec<BlockEntry> = first.iter().map(|e| e.entry()).collect();
    src.data_mut()[4096 * 6] = 0xff;
    let (s, second) = run(&src, prev, 3);
    assert_eq!((s.unchanged, s.changed), (7, 1));
    assert!(matches!(&second[6], BlockEvent::Changed { payload, .. } if payload[0] == 0xff));
}

#[test]
fn a_failing_sink_stops_the_scan() {
    let src = MemSource::new("m", vec![1u8; 4096 * 64]);
    let mut calls = 0;
    let err = scan(&src, NoPrevious, &NoBases, &(), &config(2), |_| {
        calls += 1;
        Err(Error::Stopped)
    })
    .unwrap_err();
    assert!(matches!(err, Error::Stopped));
    assert_eq!(calls, 1);
}

#[test]
fn bad_config_is_refused() {
    let src = MemSource::new("m", vec![1u8; 4096]);
    let mut c = config(1);
    c.batch_bytes = 5000;
    assert!(scan(&src, NoPrevious, &NoBases, &(), &c, |_| Ok(())).is_err());
}

/// Counts the bytes read, to show what tracking spares.
struct Counting {
    inner: MemSource,
    read: std::sync::atomic::AtomicU64,
}
impl BlockSource for Counting {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.read_at(offset, buf)
    }
}

fn tracked(dirty: Vec<Extent>, sample_one_in: u64) -> EngineConfig {
    EngineConfig {
        tracking: Some(Tracked { dirty: dirty.into(), sample_one_in, seed: 7 }),
        ..config(2)
    }
}

fn scan_all(
    src: &dyn BlockSource,
    prev: Vec<BlockEntry>,
    config: &EngineConfig,
) -> Result<(ScanSummary, Vec<BlockEntry>), Error> {
    let mut entries = Vec::new();
    let summary = scan(src, prev.into_iter(), &NoBases, &(), config, |b| {
        entries.extend(b.entries());
        Ok(())
    })?;
    Ok((summary, entries))
}

#[test]
fn tracking_reads_only_dirty_blocks() {
    let data: Vec<u8> = (0..4096 * 64).map(|i| (i / 4096 + 1) as u8).collect();
    let old = MemSource::new("m", data).with_hole(4096 * 40, 4096 * 8);
    let (_, prev) = scan_all(&old, vec![], &config(2)).unwrap();
    let mut new = old.clone();
    new.data_mut()[4096 * 10 + 7] = 0xee;
    new.data_mut()[4096 * 33..4096 * 35].fill(0x42);
    let (plain, want) = scan_all(&new, prev.clone(), &config(2)).unwrap();
    let counting = Counting { inner: new, read: 0.into() };
    let dirty =
        vec![Extent { offset: 4096 * 10, len: 4096 }, Extent { offset: 4096 * 33, len: 8192 }];
    let (s, got) = scan_all(&counting, prev, &tracked(dirty, 0)).unwrap();
    assert_eq!(got, want);
    assert_eq!((s.changed, plain.changed), (3, 3));
    assert_eq!(s.carried, 61);
    assert_eq!(counting.read.load(Ordering::Relaxed), 3 * 4096);
}

#[test]
fn a_sampled_clean_block_that_changed_stops_the_scan() {
    let data: Vec<u8> = (0..4096 * 16).map(|i| (i / 4096 + 1) as u8).collect();
    let old = MemSource::new("m", data);
    let (_, prev) = scan_all(&old, vec![], &config(1)).unwrap();
    let mut new = old.clone();
    new.data_mut()[4096 * 5] = 0;
    // The tracker says nothing changed; sampling every clean block catches the lie.
    let err = scan_all(&new, prev.clone(), &tracked(vec![], 1)).unwrap_err();
    assert!(matches!(err, Error::TrackingMismatch { block: 5, .. }), "{err}");
    // Without sampling the lie would pass: which is why every tracked scan samples.
    let (s, _) = scan_all(&new, prev.clone(), &tracked(vec![], 0)).unwrap();
    assert_eq!((s.changed, s.carried), (0, 16));
    // Samples of blocks that did not change pass, and are counted.
    let (s, _) = scan_all(&old, prev, &tracked(vec![], 1)).unwrap();
    assert_eq!((s.sampled, s.carried, s.bytes_scanned), (16, 0, 16 * 4096));
}

/// 64 GiB of holes around two MiB of data, without the bytes behind it.
struct Sparse;
impl BlockSource for Sparse {
    fn describe(&self) -> String {
        "sparse".into()
    }
    fn size(&self) -> u64 {
        64 << 30
    }
    fn read_at(&self, _: u64, buf: &mut [u8]) -> Result<(), Error> {
        buf.fill(7);
        Ok(())
    }
    fn allocated(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Error> {
        let data =
            [Extent { offset: 5 << 30, len: 1 << 20 }, Extent { offset: 40 << 30, len: 1 << 20 }];
        let end = offset + len;
        Ok(data
            .iter()
            .filter(|d| d.offset < end && d.end() > offset)
            .map(|d| {
                let from = d.offset.max(offset);
                Extent { offset: from, len: d.end().min(end) - from }
            })
            .collect())
    }
}

#[test]
fn a_hole_run_stops_where_tracking_carries_data() {
    let data: Vec<u8> = (0..4096 * 64).map(|i| (i / 4096 + 1) as u8).collect();
    let old = MemSource::new("m", data);
    let (_, prev) = scan_all(&old, vec![], &config(2)).unwrap();
    // The source now has a hole over blocks 8..56, but the tracker saw writes to 8..30 only.
    let new = old.clone().with_hole(4096 * 8, 4096 * 48);
    let dirty = vec![Extent { offset: 4096 * 8, len: 4096 * 22 }];
    let (s, got) = scan_all(&new, prev.clone(), &tracked(dirty.clone(), 0)).unwrap();
    // Tracking decides what is unchanged: blocks 30..56 keep their entries, each in its place.
    assert_eq!(got.len(), 64);
    assert!(got[8..30].iter().all(|e| *e == BlockEntry::Hole));
    assert_eq!(got[30..], prev[30..]);
    assert_eq!(got[..8], prev[..8]);
    assert_eq!((s.holes, s.carried), (22, 42));
    // Sampling every clean block finds the first block the tracker missed.
    let err = scan_all(&new, prev, &tracked(dirty, 1)).unwrap_err();
    assert!(matches!(err, Error::TrackingMismatch { block: 30, .. }), "{err}");
}

#[test]
fn long_holes_are_few_batches() {
    let mut batches = 0;
    let mut entries = Vec::new();
    let config = EngineConfig::with_threads(65536, 2);
    let most_events = config.batch_bytes / 65536;
    let s = scan(&Sparse, NoPrevious, &NoBases, &(), &config, |b| {
        batches += 1;
        // A hole batch is a count: memory follows the data, not the disk's size.
        assert!(b.events.len() <= most_events, "{} events in one batch", b.events.len());
        entries.extend(b.entries());
        Ok(())
    })
    .unwrap();
    assert_eq!(s.blocks, 1 << 20);
    assert_eq!((s.changed, s.bytes_scanned), (32, 2 << 20));
    assert_eq!(s.holes, (1 << 20) - 32);
    // 64 one-GiB hole batches and the two data batches, give or take the edges.
    assert!(batches < 80, "{batches} batches");
    let data_block = |e: &BlockEntry| matches!(e, BlockEntry::Data { .. });
    assert!(entries[(5 << 30) / 65536..][..16].iter().all(data_block));
    assert!(entries[(40 << 30) / 65536..][..16].iter().all(data_block));
    assert!(!data_block(&entries[(5 << 30) / 65536 + 16]));
}

/// Engine settings for patch tests: 16 KiB blocks of four 4 KiB pieces.
fn patch_config(generations: u8) -> EngineConfig {
    EngineConfig {
        block_size: 16384,
        batch_bytes: 65536,
        patch_generations: generations,
        ..config(2)
    }
}

/// Scans `disk` against `prev`, keeping every chunk stored in `store`; returns the entries.
fn backup_into(
    store: &mut HashMap<Digest, Vec<u8>>,
    disk: &[u8],
    prev: Vec<BlockEntry>,
    config: &EngineConfig,
) -> (ScanSummary, Vec<BlockEntry>) {
    let mut entries = Vec::new();
    // What the vault held before this backup: where patches' bases are read back.
    let bases = store.clone();
    let summary =
        scan(&MemSource::new("d", disk.to_vec()), prev.into_iter(), &bases, &Copy, config, |b| {
            let holes = b.trailing_holes as usize;
            for e in b.events {
                entries.push(e.entry());
                if let BlockEvent::Changed { chunk, payload, .. } = e {
                    assert_eq!(Digest::of(&payload), chunk);
                    store.insert(chunk, payload);
                }
            }
            entries.extend(std::iter::repeat_n(BlockEntry::Hole, holes));
            Ok(())
        })
        .unwrap();
    (summary, entries)
}

/// The disk as restore would rebuild it from `entries` and the chunks in `store`.
fn rebuild(
    store: &HashMap<Digest, Vec<u8>>,
    entries: &[BlockEntry],
    block: usize,
    size: usize,
) -> Vec<u8> {
    let mut out = vec![0u8; size];
    for (i, e) in entries.iter().enumerate() {
        let range = i * block..((i + 1) * block).min(size);
        let bytes = match e {
            BlockEntry::Hole | BlockEntry::Zero => continue,
            BlockEntry::Data { digest, .. } => store[digest].clone(),
            BlockEntry::Patch(p) => cairn_format::patch::Patch::decode(&store[&p.patch])
                .unwrap()
                .apply(&store[&p.base])
                .unwrap(),
        };
        assert_eq!(Digest::of(&bytes), *e.content().unwrap(), "block {i}");
        out[range].copy_from_slice(&bytes);
    }
    out
}

#[test]
fn scattered_writes_become_patches() {
    let mut store = HashMap::new();
    let mut disk: Vec<u8> = (0..16384 * 8).map(|i| (i % 251) as u8 | 1).collect();
    let config = patch_config(DEFAULT_PATCH_GENERATIONS);
    let (_, prev) = backup_into(&mut store, &disk, vec![], &config);
    disk[16384 * 2 + 5] ^= 0xff; // one piece of block 2
    disk[16384 * 5..16384 * 5 + 8192].fill(9); // two pieces of block 5: stored whole
    let (s, entries) = backup_into(&mut store, &disk, prev, &config);
    assert_eq!((s.changed, s.patched), (2, 1));
    let BlockEntry::Patch(p) = entries[2] else { panic!("{:?}", entries[2]) };
    assert_eq!(p.generation, 1);
    assert_eq!(cairn_format::patch::Patch::decode(&store[&p.patch]).unwrap().mask(), 1);
    assert!(matches!(entries[5], BlockEntry::Data { .. }));
    assert_eq!(rebuild(&store, &entries, 16384, disk.len()), disk);
}

#[test]
fn a_patch_chain_at_its_bound_is_rebased() {
    let mut store = HashMap::new();
    let mut disk = vec![3u8; 16384 * 2];
    let config = patch_config(3);
    let (_, mut prev) = backup_into(&mut store, &disk, vec![], &config);
    let first_base = *prev[0].content().unwrap();
    let mut generations = Vec::new();
    for round in 0..5u8 {
        disk[100] = round + 10; // always the same piece of block 0
        let (_, entries) = backup_into(&mut store, &disk, prev, &config);
        assert_eq!(rebuild(&store, &entries, 16384, disk.len()), disk);
        generations.push(match entries[0] {
            BlockEntry::Patch(p) => {
                assert_eq!(p.base == first_base, round < 3, "round {round}");
                p.generation
            }
            _ => 0,
        });
        prev = entries;
    }
    // Three patches over the first base, then whole again, then patches over the new base.
    assert_eq!(generations, [1, 2, 3, 0, 1]);
    assert_ne!(prev[0].patch_base().unwrap().0, first_base);
}

/// The attack of a guest that knows how piece sums are computed: block 1 changed in two
/// pieces, and its previous entry's sums (as a collision would make them) match the new
/// block everywhere but in piece 0. The sums alone would store a patch of piece 0 that
/// rebuilds the wrong block; the base read back shows piece 1 differs, so the block is
/// stored whole and the point restores.
#[test]
fn a_patch_its_base_does_not_support_is_refused() {
    let mut store = HashMap::new();
    let mut disk: Vec<u8> = (0..16384 * 2).map(|i| (i % 253) as u8 | 1).collect();
    let config = patch_config(DEFAULT_PATCH_GENERATIONS);
    let (_, mut prev) = backup_into(&mut store, &disk, vec![], &config);
    disk[16384] ^= 0xff; // piece 0 of block 1
    disk[16384 + 4096] ^= 0xff; // piece 1 of block 1
    let new_sums = PieceSums::of(&disk[16384..], 4096, &PieceKey::UNKEYED);
    let mut forged = new_sums.as_slice().to_vec();
    forged[0] ^= 1;
    let BlockEntry::Data { digest, .. } = prev[1] else { panic!("{:?}", prev[1]) };
    prev[1] = BlockEntry::Data { digest, sums: PieceSums::from_slice(&forged).unwrap() };

    let (s, entries) = backup_into(&mut store, &disk, prev.clone(), &config);
    assert_eq!((s.changed, s.patched, s.patches_refused), (1, 0, 1));
    assert!(matches!(entries[1], BlockEntry::Data { .. }), "{:?}", entries[1]);
    assert_eq!(rebuild(&store, &entries, 16384, disk.len()), disk);

    // Without the base to read back, nothing is patched at all.
    let mut bare = HashMap::new();
    let summary =
        scan(&MemSource::new("d", disk.clone()), prev.into_iter(), &NoBases, &Copy, &config, |b| {
            for e in b.events {
                if let BlockEvent::Changed { chunk, payload, .. } = e {
                    bare.insert(chunk, payload);
                }
            }
            Ok(())
        })
        .unwrap();
    assert_eq!((summary.patched, summary.patches_refused), (0, 1));
}

#[test]
fn piece_sums_use_the_vaults_key() {
    let key = PieceKey::from_key(&[5; 32]);
    let config = EngineConfig { piece_key: key.clone(), ..patch_config(DEFAULT_PATCH_GENERATIONS) };
    let disk: Vec<u8> = (0..16384).map(|i| (i % 249) as u8 | 1).collect();
    let (_, entries) = backup_into(&mut HashMap::new(), &disk, vec![], &config);
    let BlockEntry::Data { sums, .. } = entries[0] else { panic!("{:?}", entries[0]) };
    assert_eq!(sums, PieceSums::of(&disk, 4096, &key));
    assert_ne!(sums, PieceSums::of(&disk, 4096, &PieceKey::UNKEYED));
}

#[test]
fn patches_can_be_turned_off() {
    let mut store = HashMap::new();
    let mut disk = vec![3u8; 16384];
    let (_, prev) = backup_into(&mut store, &disk, vec![], &patch_config(0));
    disk[0] = 1;
    let (s, entries) = backup_into(&mut store, &disk, prev, &patch_config(0));
    assert_eq!((s.changed, s.patched), (1, 0));
    assert!(matches!(entries[0], BlockEntry::Data { .. }));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Diff then apply: patching the old disk with the changed blocks gives the new disk.
    #[test]
    fn diff_then_apply_reproduces_the_disk(
        seed in proptest::collection::vec(0u8..4, 1..40),
        edits in proptest::collection::vec((0usize..40 * 4096, any::<u8>()), 0..20),
        threads in 1usize..4,
    ) {
        let old: Vec<u8> = seed.iter().flat_map(|b| vec![*b; 4096]).collect();
        let mut new = old.clone();
        for (pos, byte) in &edits {
            if let Some(b) = new.get_mut(*pos) { *b = *byte; }
        }
        let (_, first) = run(&MemSource::new("old", old.clone()), vec![], threads);
        let prev: Vec<BlockEntry> = first.iter().map(|e| e.entry()).collect();
        let (_, events) = run(&MemSource::new("new", new.clone()), prev, threads);
        let mut applied = old.clone();
        for (i, e) in events.iter().enumerate() {
            let range = i * 4096..((i + 1) * 4096).min(applied.len());
            match e {
                BlockEvent::Changed { payload, .. } => applied[range].copy_from_slice(payload),
                BlockEvent::Zero | BlockEvent::Hole => applied[range].fill(0),
                BlockEvent::Unchanged(_) => {}
            }
        }
        prop_assert_eq!(applied, new);
    }

    /// Backups of a disk edited between each: rebuilding any point from its entries and the
    /// stored chunks (whole blocks and patches) gives that point's disk.
    #[test]
    fn patched_points_rebuild_their_disk(
        seed in proptest::collection::vec(0u8..4, 1..12),
        rounds in proptest::collection::vec(
            proptest::collection::vec((0usize..12 * 16384, any::<u8>()), 0..6), 1..5),
        generations in 0u8..4,
    ) {
        let mut disk: Vec<u8> = seed.iter().flat_map(|b| vec![*b; 16384]).collect();
        let config = patch_config(generations);
        let mut store = HashMap::new();
        let (_, mut prev) = backup_into(&mut store, &disk, vec![], &config);
        for edits in rounds {
            for (pos, byte) in edits {
                if let Some(b) = disk.get_mut(pos) { *b = byte; }
            }
            let (_, entries) = backup_into(&mut store, &disk, prev, &config);
            prop_assert_eq!(rebuild(&store, &entries, 16384, disk.len()), disk.clone());
            prev = entries;
        }
    }

    /// With dirty ranges that cover every write, a tracked scan finds what a full one does.
    #[test]
    fn tracked_scan_equals_full_scan(
        seed in proptest::collection::vec(0u8..4, 1..40),
        edits in proptest::collection::vec((0usize..40 * 4096, 1u8..), 0..20),
        extra in proptest::collection::vec(0u64..40, 0..5),
        sample in 0u64..4,
        kept_holes in proptest::collection::vec((0u64..40, 1u64..12), 0..3),
        punched in proptest::collection::vec((0u64..40, 1u64..12), 0..3),
    ) {
        let old: Vec<u8> = seed.iter().flat_map(|b| vec![*b; 4096]).collect();
        let mut new = old.clone();
        let mut dirty: Vec<Extent> = Vec::new();
        for (pos, byte) in &edits {
            if let Some(b) = new.get_mut(*pos) {
                *b = *byte;
                dirty.push(Extent { offset: *pos as u64, len: 1 });
            }
        }
        // Trackers round up: whole granules may be marked dirty without a change.
        dirty.extend(extra.iter().map(|b| Extent { offset: b * 4096, len: 4096 }));
        // Holes in both versions, and holes punched since (a discard is a write).
        let hole = |(b, n): &(u64, u64)| Extent { offset: b * 4096, len: n * 4096 };
        dirty.extend(punched.iter().map(hole));
        dirty.sort_by_key(|e| e.offset);
        let mut merged: Vec<Extent> = Vec::new();
        for d in dirty {
            match merged.last_mut() {
                Some(m) if d.offset <= m.end() => m.len = m.len.max(d.end() - m.offset),
                _ => merged.push(d),
            }
        }
        let with_holes = |mut src: MemSource, holes: &[(u64, u64)]| {
            for h in holes.iter().map(hole) {
                src = src.with_hole(h.offset, h.len);
            }
            src
        };
        let old = with_holes(MemSource::new("old", old), &kept_holes);
        let (_, prev) = scan_all(&old, vec![], &config(2)).unwrap();
        let new = with_holes(with_holes(MemSource::new("new", new), &kept_holes), &punched);
        let (_, want) = scan_all(&new, prev.clone(), &config(2)).unwrap();
        let (_, got) = scan_all(&new, prev, &tracked(merged, sample)).unwrap();
        prop_assert_eq!(got, want);
    }
}
