//! `cairn-agent bench`: how fast this machine can run each stage of a backup, and how long a
//! backup window that makes.
//!
//! In the spirit of `proxmox-backup-client benchmark`. Each CPU stage runs on one core over
//! the same seeded sample data (holes, zeros, random, log text), then the figure is scaled
//! by the cores the engine would use. The vault is measured with real puts and gets through
//! `object_store`; a disk, when given, with sequential reads.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use anyhow::Context;
use bytes::Bytes;
use cairn_delta::{BlockSource, RawFile};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, path::Path as StorePath};
use serde_json::json;
use sha2::Digest as _;

use crate::cli::BenchArgs;
use crate::output::{Exit, print_json, table};
use crate::units::bytes as human;

/// Block size of the CPU stages (the default index block).
const BLOCK: usize = 64 << 10;
/// Sample data for the CPU stages.
const SAMPLE: u64 = 64 << 20;
/// How long each CPU stage runs, at least.
const STAGE_TIME: Duration = Duration::from_millis(700);
/// Objects put and got to measure the vault's throughput (8 MiB each, like packs).
const PACKS: usize = 8;
const PACK: usize = 8 << 20;
/// Small objects put to measure latency.
const SMALL: usize = 32;

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

    let mut figures = vec![
        cpu("SHA-256", &blocks, |b| {
            std::hint::black_box(sha2::Sha256::digest(b));
        }),
        cpu("zstd level 1 (chunk frames)", &blocks, |b| {
            std::hint::black_box(cairn_format::encode_chunk(b, Some(1)).ok());
        }),
        cpu("CRC-32", &blocks, |b| {
            std::hint::black_box(crc32fast::hash(b));
        }),
        aead(&blocks),
    ];
    let (put, get, latency) = vault(&args, dir.path().join("vault")).await?;
    figures.push(put);
    figures.push(get);
    let disk = match &args.disk {
        Some(path) => Some(disk_read(path, args.read_limit)?),
        None => None,
    };
    if let Some(d) = &disk {
        figures.push(Figure { name: "disk read", bytes_per_sec: d.0, note: d.1.clone() });
    }

    // The projection: a full backup is bound by the slowest of reading, hashing (on every
    // core), compressing (on every core) and storing (counted at plaintext size, which is
    // pessimistic where data compresses); an incremental without changed-block tracking reads and hashes
    // everything and compresses and stores only what changed.
    let rate =
        |name: &str| figures.iter().find(|f| f.name == name).map_or(f64::MAX, |f| f.bytes_per_sec);
    let hash = rate("SHA-256") * cores as f64;
    let compress = rate("zstd level 1 (chunk frames)") * cores as f64;
    let store = rate("vault put");
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

/// AES-256-GCM in place, the AEAD chunk encryption will use. Encrypting in place changes
/// the data, not the rate, so one owned copy serves every round.
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
    Figure { name: "AES-256-GCM", bytes_per_sec: rate, note: "one core".into() }
}

/// Puts and gets 8 MiB objects, then times small puts, under `bench/` in the vault (a
/// local folder in the temporary directory unless `--vault` names one); removes them.
async fn vault(args: &BenchArgs, local: PathBuf) -> anyhow::Result<(Figure, Figure, Duration)> {
    let mut leftover = Some(local.join("bench"));
    let (store, where_): (Arc<dyn ObjectStore>, String) = match &args.vault {
        Some(url) => {
            let vault = super::open_vault(url).await?;
            leftover = vault.local_path().map(|p| p.join("bench"));
            (Arc::clone(vault.store()), url.clone())
        }
        None => {
            std::fs::create_dir_all(&local)?;
            let fs = object_store::local::LocalFileSystem::new_with_prefix(&local)?;
            (Arc::new(fs), "a local folder in the temporary directory".into())
        }
    };
    let payload = Bytes::from((0..PACK).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>());
    let name = |i: usize| StorePath::from(format!("bench/{}-{i}", std::process::id()));
    let start = Instant::now();
    for i in 0..PACKS {
        store.put(&name(i), PutPayload::from(payload.clone())).await.context("vault put")?;
    }
    let put_secs = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for i in 0..PACKS {
        let got = store.get(&name(i)).await.context("vault get")?.bytes().await?;
        anyhow::ensure!(got.len() == PACK, "vault get returned {} bytes, not {PACK}", got.len());
    }
    let get_secs = start.elapsed().as_secs_f64();
    let small = Bytes::from(vec![5u8; 4096]);
    let start = Instant::now();
    for i in 0..SMALL {
        store.put(&name(PACKS + i), PutPayload::from(small.clone())).await.context("vault put")?;
    }
    let latency = start.elapsed() / SMALL as u32;
    for i in 0..PACKS + SMALL {
        let _ = store.delete(&name(i)).await;
    }
    // A local store leaves the emptied folder behind.
    if let Some(dir) = leftover {
        let _ = std::fs::remove_dir(dir);
    }
    let total = (PACKS * PACK) as f64;
    let note = format!("{PACKS} objects of 8 MiB, one at a time, {where_} (page cache)");
    Ok((
        Figure { name: "vault put", bytes_per_sec: total / put_secs, note: note.clone() },
        Figure { name: "vault get", bytes_per_sec: total / get_secs, note },
        latency,
    ))
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
