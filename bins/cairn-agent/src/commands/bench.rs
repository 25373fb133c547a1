//! `cairn-agent bench`: how fast this machine can run each stage of a backup, and how long a
//! backup window that makes.
//!
//! In the spirit of `proxmox-backup-client benchmark`, but timing Cairn's own code paths: its
//! chunk ids, piece sums and chunk frame encoder and decoder, each on one core over the same
//! seeded sample data (holes, zeros, random, log text), then scaled by the cores the engine
//! would use; its vault writes (pack writer, commit with durability) and verified chunk reads,
//! in a scratch vault; a disk, when given, with sequential reads. The raw rate of a primitive
//! Cairn does not use yet (an AEAD) is shown too, and labelled so.

use std::time::{Duration, Instant};

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use anyhow::Context;
use bytes::Bytes;
use cairn_delta::{BlockSource, RawFile};
use cairn_format::PointManifest;
use cairn_format::patch::{PieceKey, PieceSums};
use cairn_vault::Vault;
use futures::StreamExt;
use object_store::{ObjectStoreExt, PutPayload, path::Path as StorePath};
use serde_json::json;

use crate::cli::BenchArgs;
use crate::output::{Exit, print_json, table};
use crate::units::bytes as human;

/// Block size of the CPU stages (the default index block).
const BLOCK: usize = 64 << 10;
/// Sample data for the CPU stages.
const SAMPLE: u64 = 64 << 20;
/// How long each CPU stage runs, at least.
const STAGE_TIME: Duration = Duration::from_millis(700);
/// Chunks written and read back to measure the vault: 64 MiB of distinct 64 KiB blocks,
/// eight packs.
const VAULT_CHUNKS: usize = 1024;
/// Small objects put to measure latency.
const SMALL: usize = 32;
/// Stage names the projection reads.
const CHUNK_IDS: &str = "chunk ids (SHA-256)";
const FRAME_ENCODE: &str = "chunk frame encode (zstd 1 + CRC)";
const VAULT_WRITES: &str = "vault pack writes";

/// One measured figure.
struct Figure {
    name: &'static str,
    bytes_per_sec: f64,
    note: String,
}

pub async fn run(args: BenchArgs, json: bool) -> anyhow::Result<Exit> {
    let dir = tempfile::tempdir().context("a temporary folder for the sample data")?;
    let sample_path = dir.path().join("sample.img");
    cairn_sample::create_disk(&sample_path, SAMPLE, 1).context("writing sample data")?;
    let sample = std::fs::read(&sample_path).context("reading sample data")?;
    let blocks: Vec<&[u8]> = sample.chunks(BLOCK).filter(|b| b.iter().any(|&x| x != 0)).collect();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let key = PieceKey::from_key(&[7; 32]);
    let frames: Vec<Vec<u8>> =
        blocks.iter().map(|b| cairn_format::encode_chunk(b, Some(1))).collect::<Result<_, _>>()?;
    let frame_refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();

    // Cairn's own code paths, on the bytes a backup handles.
    let mut figures = vec![
        cpu(CHUNK_IDS, &blocks, |b| {
            std::hint::black_box(cairn_format::Digest::of(b));
        }),
        cpu("piece sums (keyed XXH3)", &blocks, |b| {
            std::hint::black_box(PieceSums::of(b, 4096, &key));
        }),
        cpu(FRAME_ENCODE, &blocks, |b| {
            std::hint::black_box(cairn_format::encode_chunk(b, Some(1)).ok());
        }),
        cpu("chunk frame decode (CRC + zstd)", &frame_refs, |f| {
            std::hint::black_box(cairn_format::decode_chunk(f).ok());
        }),
        aead(&blocks),
    ];
    let (write, read, latency) = vault(&args, dir.path()).await?;
    figures.push(write);
    figures.push(read);
    let disk = match &args.disk {
        Some(path) => Some(disk_read(path, args.read_limit)?),
        None => None,
    };
    if let Some(d) = &disk {
        figures.push(Figure { name: "disk read", bytes_per_sec: d.0, note: d.1.clone() });
    }

    // The projection: a full backup is bound by the slowest of reading, hashing (on every
    // core), compressing (on every core) and storing (counted at plaintext size, which is
    // pessimistic where data compresses); an incremental without changed-block tracking reads
    // and hashes everything and compresses and stores only what changed.
    let rate =
        |name: &str| figures.iter().find(|f| f.name == name).map_or(f64::MAX, |f| f.bytes_per_sec);
    let hash = rate(CHUNK_IDS) * cores as f64;
    let compress = rate(FRAME_ENCODE) * cores as f64;
    let store = rate(VAULT_WRITES);
    let read = disk.as_ref().map_or(f64::MAX, |d| d.0);
    let allocated = args.size as f64 * args.allocated;
    let changed = args.size as f64 * args.change;
    let scan = read.min(hash);
    let full_secs = allocated / scan.min(compress).min(store);
    let incr_secs = allocated / scan + changed / compress.min(store);

    if json {
        let list: Vec<_> = figures
            .iter()
            .map(|f| json!({ "stage": f.name, "bytes_per_sec": f.bytes_per_sec, "note": f.note }))
            .collect();
        print_json(&json!({
            "cores": cores,
            "stages": list,
            "vault_put_latency_ms": latency.as_secs_f64() * 1000.0,
            "projection": {
                "disk_size": args.size, "allocated_fraction": args.allocated,
                "daily_change_fraction": args.change,
                "full_backup_seconds": full_secs, "incremental_seconds": incr_secs,
                "disk_read_measured": disk.is_some(),
            },
        }));
        return Ok(Exit::Ok);
    }
    let rows: Vec<Vec<String>> = figures
        .iter()
        .map(|f| {
            vec![f.name.to_string(), format!("{}/s", human(f.bytes_per_sec as u64)), f.note.clone()]
        })
        .collect();
    println!("{}", table(&["STAGE", "RATE", "NOTE"], &rows));
    println!(
        "vault put latency: {:.2} ms per small object ({SMALL} puts of 4 KiB)",
        latency.as_secs_f64() * 1000.0
    );
    let read_note = if disk.is_some() { "" } else { " (no --disk given: reading not counted)" };
    println!(
        "\nprojected window for a {} disk, {:.0}% allocated, {:.1}% changed per day, {cores} cores{read_note}:",
        human(args.size),
        args.allocated * 100.0,
        args.change * 100.0
    );
    println!("  full backup          {}", duration(full_secs));
    println!(
        "  daily incremental    {} (a full read and hash; changed-block tracking would skip it)",
        duration(incr_secs)
    );
    Ok(Exit::Ok)
}

/// Runs `stage` over every block on one core, round after round, for at least
/// [`STAGE_TIME`].
fn cpu(name: &'static str, blocks: &[&[u8]], stage: impl Fn(&[u8])) -> Figure {
    let round: u64 = blocks.iter().map(|b| b.len() as u64).sum();
    let rate = rounds(round, || blocks.iter().for_each(|b| stage(b)));
    Figure { name, bytes_per_sec: rate, note: "one core".into() }
}

/// Repeats `round` (which processes `bytes`) for at least [`STAGE_TIME`]; bytes per second.
fn rounds(bytes: u64, mut round: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut done = 0u64;
    while done == 0 || start.elapsed() < STAGE_TIME {
        round();
        done += bytes;
    }
    done as f64 / start.elapsed().as_secs_f64()
}

/// AES-256-GCM in place: the raw rate of a primitive Cairn does not use yet (chunk encryption
/// is still to come), shown as such. Encrypting in place changes the data, not the rate, so
/// one owned copy serves every round.
fn aead(blocks: &[&[u8]]) -> Figure {
    let cipher = Aes256Gcm::new(&[7u8; 32].into());
    let nonce = Nonce::from([1u8; 12]);
    let mut owned: Vec<Vec<u8>> = blocks.iter().map(|b| b.to_vec()).collect();
    let round: u64 = owned.iter().map(|b| b.len() as u64).sum();
    let rate = rounds(round, || {
        for block in &mut owned {
            let tag = cipher.encrypt_inout_detached(&nonce, b"", block.as_mut_slice().into());
            std::hint::black_box(tag.ok());
        }
    });
    Figure {
        name: "AES-256-GCM (primitive)",
        bytes_per_sec: rate,
        note: "one core; not used by Cairn yet: encryption at rest is still to come".into(),
    }
}

/// Cairn's own vault paths: chunk frames written into packs by the vault's pack writer and
/// committed (durable), read back verified eight at a time (as restore does), then small
/// puts timed. It all happens in a scratch vault: inside the vault folder `--vault` names
/// (same file system), or in the temporary folder; the scratch vault is removed after.
async fn vault(
    args: &BenchArgs,
    temp: &std::path::Path,
) -> anyhow::Result<(Figure, Figure, Duration)> {
    let scratch_name = format!(".cairn-bench-{}", std::process::id());
    let (root, where_) = match &args.vault {
        Some(url) => {
            // Only the folder matters (an encrypted vault need not be opened): the scratch
            // vault goes beside the vault's objects, on the same file system.
            let root = local_vault_folder(url).context("bench measures local vaults only")?;
            (root.join(scratch_name), url.clone())
        }
        None => (temp.join(scratch_name), "a temporary local vault".to_string()),
    };
    let measured = measure_vault(&root).await;
    let _ = std::fs::remove_dir_all(&root);
    let (write, read, latency) = measured?;
    let note = format!("{VAULT_CHUNKS} chunks of 64 KiB, {where_}");
    Ok((
        Figure {
            name: VAULT_WRITES,
            bytes_per_sec: write,
            note: format!("{note}; committed, durable"),
        },
        Figure { name: "vault chunk reads", bytes_per_sec: read, note: format!("{note}; checked") },
        latency,
    ))
}

async fn measure_vault(root: &std::path::Path) -> anyhow::Result<(f64, f64, Duration)> {
    let url = root.to_str().context("the vault's path is not UTF-8")?;
    let vault = Vault::create(url, BLOCK as u32).await?;
    // Distinct, incompressible blocks: every one is stored, none compresses.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let chunks: Vec<(cairn_format::Digest, Bytes)> = (0..VAULT_CHUNKS)
        .map(|_| {
            let block: Vec<u8> = (0..BLOCK / 8)
                .flat_map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()
                })
                .collect();
            let frame = cairn_format::encode_chunk(&block, Some(1))?;
            Ok((cairn_format::Digest::of(&block), Bytes::from(frame)))
        })
        .collect::<anyhow::Result<_>>()?;
    let total = (VAULT_CHUNKS * BLOCK) as f64;
    let vm: cairn_format::Name = "bench".parse()?;
    let started = jiff::Timestamp::now();
    let clock = Instant::now();
    let writer = vault.begin_point(&vm, started).await?;
    let mut packs = writer.pack_writer();
    for (id, frame) in &chunks {
        packs.store(id, frame.clone()).await?;
    }
    packs.finish().await?;
    let manifest = PointManifest {
        format: cairn_format::MANIFEST_FORMAT,
        point: writer.point().clone(),
        vm,
        started_at: started,
        captured_at: started,
        finished_at: jiff::Timestamp::now(),
        consistency: cairn_format::Consistency::None,
        disks: Default::default(),
        evidence: vec![],
        writer: "cairn-agent bench".into(),
        machine: None,
        origin: None,
    };
    writer.commit(&manifest).await?;
    let write = total / clock.elapsed().as_secs_f64();

    let clock = Instant::now();
    let mut reads = futures::stream::iter(chunks.iter().map(|(id, _)| vault.read_chunk(id)))
        .buffer_unordered(8);
    while let Some(block) = reads.next().await {
        anyhow::ensure!(block?.len() == BLOCK, "a chunk read back has the wrong size");
    }
    let read = total / clock.elapsed().as_secs_f64();

    let small = Bytes::from(vec![5u8; 4096]);
    let clock = Instant::now();
    for i in 0..SMALL {
        let path = StorePath::from(format!("bench/{i}"));
        vault.store().put(&path, PutPayload::from(small.clone())).await.context("vault put")?;
    }
    Ok((write, read, clock.elapsed() / SMALL as u32))
}

/// Reads the disk sequentially (holes included) up to `limit` bytes, 4 MiB at a time.
fn disk_read(path: &std::path::Path, limit: u64) -> anyhow::Result<(f64, String)> {
    let source = RawFile::open(path).with_context(|| format!("--disk {}", path.display()))?;
    let len = source.size().min(limit);
    let mut buf = vec![0u8; 4 << 20];
    let start = Instant::now();
    let mut offset = 0;
    while offset < len {
        let n = (len - offset).min(buf.len() as u64) as usize;
        source.read_at(offset, &mut buf[..n])?;
        offset += n as u64;
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    Ok((
        len as f64 / secs,
        format!("{} of {} sequentially (cache as it is)", human(len), path.display()),
    ))
}

fn duration(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{secs:.1} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

/// The folder of a local vault URL (a path or file://), if it holds a vault.
fn local_vault_folder(url: &str) -> Option<std::path::PathBuf> {
    let path = match url.strip_prefix("file://") {
        Some(rest) => std::path::PathBuf::from(rest),
        None if !url.contains("://") => std::path::PathBuf::from(url),
        None => return None,
    };
    path.join("config.json").is_file().then_some(path)
}
