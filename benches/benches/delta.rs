//! The delta engine's throughput at 0%, 1% and 100% change, hashing only and with compression,
//! with and without sub-block patches for the 1% scattered change (each patch checked against
//! its base, read back from the chunks of the full backup held in memory), and with changed-block
//! tracking (a 16 MiB dirty range: the rest is carried, a 1-in-256 sample re-hashed).
//!
//! `cargo bench -p cairn-benches --bench delta`; throughput is in bytes of disk per second.

use cairn_benches::{mutate, sample_disk};
use std::collections::HashMap;

use cairn_delta::{
    BlockEncoder, BlockEvent, EngineConfig, Extent, NoBases, NoPrevious, Tracked, scan,
};
use cairn_format::Digest;
use cairn_format::index::BlockEntry;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const SIZE: u64 = 256 << 20;
const BLOCK: u32 = 64 * 1024;

struct Zstd1;
impl BlockEncoder for Zstd1 {
    type Output = usize;
    fn encode(&self, _: &Digest, block: &[u8]) -> usize {
        cairn_format::encode_chunk(block, Some(1)).map(|f| f.len()).unwrap_or(0)
    }
}

/// Keeps changed blocks as they are: the chunks a vault would hold, for patches' bases.
struct Plain;
impl BlockEncoder for Plain {
    type Output = Vec<u8>;
    fn encode(&self, _: &Digest, block: &[u8]) -> Vec<u8> {
        block.to_vec()
    }
}

/// The index of a full backup of `disk`, and its chunks (in memory: the base reads of the
/// patch checks cost a memory copy here, a ranged read in a vault).
fn full_backup(disk: &cairn_delta::MemSource) -> (Vec<BlockEntry>, HashMap<Digest, Vec<u8>>) {
    let (mut entries, mut chunks) = (Vec::new(), HashMap::new());
    scan(disk, NoPrevious, &NoBases, &Plain, &EngineConfig::new(BLOCK), |b| {
        let holes = b.trailing_holes as usize;
        for e in b.events {
            entries.push(e.entry());
            if let BlockEvent::Changed { chunk, payload, .. } = e {
                chunks.insert(chunk, payload);
            }
        }
        entries.extend(std::iter::repeat_n(BlockEntry::Hole, holes));
        Ok(())
    })
    .unwrap_or_default();
    (entries, chunks)
}

fn engine(c: &mut Criterion) {
    let base = sample_disk(SIZE, 1);
    let (previous, bases) = full_backup(&base);
    let mut changed = base.clone();
    mutate(&mut changed, 0.01, 7);
    let config = EngineConfig::new(BLOCK);

    let mut group = c.benchmark_group("scan");
    group.throughput(Throughput::Bytes(SIZE));
    group.sample_size(10);
    group.bench_function("0% changed", |b| {
        b.iter(|| {
            scan(&base, previous.clone().into_iter(), &bases, &Zstd1, &config, |_| Ok(()))
                .unwrap_or_default()
        })
    });
    group.bench_function("1% changed (zstd, patches)", |b| {
        b.iter(|| {
            scan(&changed, previous.clone().into_iter(), &bases, &Zstd1, &config, |_| Ok(()))
                .unwrap_or_default()
        })
    });
    let whole = EngineConfig { patch_generations: 0, ..config.clone() };
    group.bench_function("1% changed (zstd, whole blocks)", |b| {
        b.iter(|| {
            scan(&changed, previous.clone().into_iter(), &bases, &Zstd1, &whole, |_| Ok(()))
                .unwrap_or_default()
        })
    });
    group.bench_function("100% changed (hash only)", |b| {
        b.iter(|| scan(&base, NoPrevious, &NoBases, &(), &config, |_| Ok(())).unwrap_or_default())
    });
    group.bench_function("100% changed (zstd)", |b| {
        b.iter(|| {
            scan(&base, NoPrevious, &NoBases, &Zstd1, &config, |_| Ok(())).unwrap_or_default()
        })
    });
    let mut contiguous = base.clone();
    contiguous.data_mut()[64 << 20..80 << 20].fill(0x5a);
    let tracked = EngineConfig {
        tracking: Some(Tracked {
            dirty: vec![Extent { offset: 64 << 20, len: 16 << 20 }].into(),
            sample_one_in: 256,
            seed: 1,
        }),
        ..config.clone()
    };
    group.bench_function("16 MiB changed, tracked (zstd)", |b| {
        b.iter(|| {
            scan(&contiguous, previous.clone().into_iter(), &bases, &Zstd1, &tracked, |_| Ok(()))
                .unwrap_or_default()
        })
    });
    group.finish();
}

criterion_group!(benches, engine);
criterion_main!(benches);
