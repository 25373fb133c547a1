//! `cairn-agent quickstart`: the whole path on generated disks, in one command.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use cairn_backup::{JobOptions, RestoreOptions, VmJob};
use cairn_format::Name;
use cairn_snapshot::{DiskConfig, DiskFormat, VmConfig};
use cairn_vault::{CreateOptions, Vault, VerifyScope};

use crate::cli::QuickstartArgs;
use crate::output::{Bars, Exit, print_json, table};
use crate::units::{bytes, rate};

struct Step {
    name: &'static str,
    scanned: u64,
    changed: u64,
    stored: u64,
    secs: f64,
}

pub async fn run(args: QuickstartArgs, json: bool) -> anyhow::Result<Exit> {
    let temp;
    let dir: PathBuf = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("cairn-quickstart-")
                .tempdir()
                .context("creating a temp folder")?;
            temp.path().to_owned()
        }
    };
    let say = |line: String| {
        if !json {
            eprintln!("{line}");
        }
    };
    let disks_dir = dir.join("disks");
    let vault_dir = dir.join("vault");
    let restore_dir = dir.join("restored");
    std::fs::create_dir_all(&disks_dir)?;
    if vault_dir.exists() || restore_dir.exists() || dir.join("vault.key").exists() {
        bail!("{} already holds a quickstart; remove it or choose another --dir", dir.display());
    }
    let disks: Vec<(Name, PathBuf)> = vec![
        ("os.raw".parse()?, disks_dir.join("os.raw")),
        ("data.raw".parse()?, disks_dir.join("data.raw")),
    ];
    let vm: Name = "quickstart-vm".parse()?;
    let live = disks
        .iter()
        .map(|(n, p)| DiskConfig::live(n.clone(), p.clone(), DiskFormat::Raw, false))
        .collect();
    let job = VmJob::new(VmConfig::live(vm, live), JobOptions::default());
    say(format!("1/6 writing two sample disks in {}", disks_dir.display()));
    cairn_sample::create_disk(&disks[0].1, args.size, args.seed)?;
    cairn_sample::create_disk(&disks[1].1, args.size / 2, args.seed + 1)?;

    // An encrypted vault, as every new vault is, with the quickstart's own key file: no prompt.
    let key_file = dir.join("vault.key");
    say(format!(
        "2/6 creating an encrypted vault in {} (its key: {})",
        vault_dir.display(),
        key_file.display()
    ));
    let key = crate::keys::create_key_file(&key_file)?;
    let vault = Vault::create_with(
        vault_dir.to_str().context("the folder's path is not UTF-8")?,
        &CreateOptions::encrypted(cairn_format::DEFAULT_BLOCK_SIZE, key),
    )
    .await?;

    say("3/6 full backup".into());
    let mut steps = Vec::new();
    steps.push(timed_backup("full backup", (&vault, &vault_dir), &job, json).await?.0);

    say(format!(
        "4/6 changing {:.1}% of the 4 KiB blocks of each disk, then an incremental backup",
        args.change * 100.0
    ));
    for (i, (_, path)) in disks.iter().enumerate() {
        cairn_sample::mutate_scattered(path, args.change, args.seed + 100 + i as u64)?;
    }
    let (incr_step, incr) = timed_backup("incremental", (&vault, &vault_dir), &job, json).await?;
    steps.push(incr_step);

    say(format!("5/6 restoring the incremental point to {} and comparing", restore_dir.display()));
    let clock = Instant::now();
    let restored = cairn_backup::restore_point(
        &vault,
        &incr,
        &restore_dir,
        &RestoreOptions::default(),
        Arc::new(Bars::new(json, "restore")),
    )
    .await?;
    let restore_secs = clock.elapsed().as_secs_f64();
    let mut restored_bytes = 0;
    for (name, target, stats) in &restored {
        let source =
            &disks.iter().find(|(n, _)| n == name).context("restore returned an unknown disk")?.1;
        ensure!(
            cairn_sample::same_content(source, target)?,
            "restored disk {name} differs from its source"
        );
        let allocated = std::fs::metadata(target)?.blocks() * 512;
        ensure!(allocated < stats.size, "restored disk {name} has no holes");
        restored_bytes += stats.bytes_written;
    }
    steps.push(Step {
        name: "restore",
        scanned: restored_bytes,
        changed: 0,
        stored: 0,
        secs: restore_secs,
    });

    say("6/6 verifying every chunk in the vault".into());
    let clock = Instant::now();
    let report = vault.verify(&VerifyScope::default(), &|_| {}).await?;
    ensure!(report.is_clean(), "verify found damage in a fresh vault");
    steps.push(Step {
        name: "verify",
        scanned: report.bytes_checked,
        changed: 0,
        stored: 0,
        secs: clock.elapsed().as_secs_f64(),
    });

    let full_stored = steps[0].stored.max(1);
    let growth = steps[1].stored as f64 / full_stored as f64 * 100.0;
    if json {
        let rows: Vec<_> = steps.iter().map(|s| serde_json::json!({ "step": s.name, "bytes_scanned": s.scanned, "bytes_changed": s.changed, "bytes_stored": s.stored, "seconds": s.secs })).collect();
        print_json(
            &serde_json::json!({ "dir": dir, "steps": rows, "incremental_growth_percent": growth, "restore_identical": true, "verify_clean": true }),
        );
    } else {
        let rows: Vec<Vec<String>> = steps
            .iter()
            .map(|s| {
                vec![
                    s.name.into(),
                    bytes(s.scanned),
                    bytes(s.changed),
                    bytes(s.stored),
                    format!("{:.2}s", s.secs),
                    rate(s.scanned, s.secs),
                ]
            })
            .collect();
        println!(
            "{}",
            table(&["STEP", "SCANNED", "CHANGED", "STORED", "TIME", "THROUGHPUT"], &rows)
        );
        println!(
            "the incremental grew the vault by {growth:.1}% of the full backup; restored disks are identical (holes kept); verify: clean"
        );
        if args.dir.is_some() {
            println!("disks, vault and restored disks are in {}", dir.display());
        }
    }
    Ok(Exit::Ok)
}

/// Backs up `disks` and measures it: time, and what the vault really grew by.
async fn timed_backup(
    name: &'static str,
    (vault, root): (&Vault, &Path),
    job: &VmJob,
    json: bool,
) -> anyhow::Result<(Step, cairn_format::PointManifest)> {
    let before = dir_size(root)?;
    let clock = Instant::now();
    let bars = Arc::new(Bars::new(json, "backup"));
    let cancel = cairn_backup::Cancel::new();
    super::cancel_on_signal(cancel.clone());
    let m = job.run(vault, bars, &cancel).await?;
    Ok((step(name, &m, dir_size(root)? - before, clock), m))
}

fn step(name: &'static str, m: &cairn_format::PointManifest, stored: u64, clock: Instant) -> Step {
    Step {
        name,
        scanned: m.disks.values().map(|d| d.stats.bytes_scanned).sum(),
        changed: m.disks.values().map(|d| d.stats.bytes_changed).sum(),
        stored,
        secs: clock.elapsed().as_secs_f64(),
    }
}

/// Bytes of all files under `dir` (what the vault really occupies, manifests included).
pub fn dir_size(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    Ok(total)
}
