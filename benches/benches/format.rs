//! Per-stage costs: SHA-256, chunk encode (zstd 1) and decode, piece sums, patch encode and
//! apply (sub-block deltas), index page encode and decode.
//!
//! `cargo bench -p cairn-benches --bench format`.

use cairn_benches::sample_disk;
use cairn_format::index::{BlockEntry, IndexPage};
use cairn_format::patch::{Patch, PieceKey, PieceSums, encode_patch};
use cairn_format::{Digest, decode_chunk, encode_chunk};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn stages(c: &mut Criterion) {
    let disk = sample_disk(16 << 20, 3);
    let data = disk.data();
    // A log-text block and a random block from the sample: find them by compressibility.
    let blocks: Vec<&[u8]> = data.chunks(65536).collect();
    let text = blocks
        .iter()
        .copied()
        .find(|b| b.iter().filter(|x| **x == b'\n').count() > 300)
        .unwrap_or(blocks[0]);
    let random = blocks
        .iter()
        .copied()
        .find(|b| encode_chunk(b, Some(1)).map(|f| f.len() > 65536).unwrap_or(false))
        .unwrap_or(blocks[0]);

    let mut g = c.benchmark_group("block");
    g.throughput(Throughput::Bytes(65536));
    g.bench_function("sha256", |b| b.iter(|| Digest::of(text)));
    g.bench_function("crc32", |b| b.iter(|| crc32fast::hash(text)));
    g.bench_function("encode text (zstd 1)", |b| b.iter(|| encode_chunk(text, Some(1))));
    g.bench_function("encode random (probe skips zstd)", |b| {
        b.iter(|| encode_chunk(random, Some(1)))
    });
    let frame = encode_chunk(text, Some(1)).unwrap_or_default();
    g.bench_function("decode text", |b| b.iter(|| decode_chunk(&frame)));
    g.finish();

    // Sub-block deltas: the sums every stored block gets, and a one-piece patch.
    let mut changed = text.to_vec();
    changed[5 * 4096..6 * 4096].copy_from_slice(&random[..4096]);
    let key = PieceKey::from_key(&[1; 32]);
    let (old_sums, new_sums) =
        (PieceSums::of(text, 4096, &key), PieceSums::of(&changed, 4096, &key));
    let mask = new_sums.differing(&old_sums).unwrap_or(1);
    let patch = encode_patch(&changed, 4096, mask);
    let mut g = c.benchmark_group("patch");
    g.throughput(Throughput::Bytes(65536));
    g.bench_function("piece sums (keyed xxh3, 16 x 4 KiB)", |b| {
        b.iter(|| PieceSums::of(text, 4096, &key))
    });
    g.bench_function("piece sums (plain xxh3, 16 x 4 KiB)", |b| {
        b.iter(|| PieceSums::of(text, 4096, &PieceKey::UNKEYED))
    });
    g.bench_function("diff sums", |b| b.iter(|| new_sums.differing(&old_sums)));
    g.bench_function("encode one-piece patch", |b| b.iter(|| encode_patch(&changed, 4096, mask)));
    g.bench_function("apply one-piece patch", |b| {
        b.iter(|| Patch::decode(&patch).and_then(|p| p.apply(text)))
    });
    g.finish();

    let mut page = IndexPage::default();
    for i in 0..1024u32 {
        page.push(if i % 5 == 0 {
            BlockEntry::Zero
        } else {
            BlockEntry::Data { digest: Digest::of(&i.to_le_bytes()), sums: old_sums }
        });
    }
    let bytes = page.encode();
    let mut g = c.benchmark_group("index page (1024 blocks)");
    g.bench_function("encode", |b| b.iter(|| page.encode()));
    g.bench_function("decode", |b| b.iter(|| IndexPage::decode(&bytes)));
    g.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
