//! `cairn-agent backup`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use cairn_backup::{BackupRequest, Cancel, DiskInput};
use cairn_delta::RawFile;
use cairn_format::{Consistency, Evidence, Name, PointManifest};

use crate::cli::BackupArgs;
use crate::output::{Bars, Exit, print_json, table};
use crate::units::{bytes, rate};

/// Parses `NAME=PATH` or `PATH` (named after the file name).
pub fn parse_disk(spec: &str) -> anyhow::Result<(Name, PathBuf)> {
    let (name, path) = match spec.split_once('=') {
        Some((name, path)) => (name.to_string(), PathBuf::from(path)),
        None => {
            let path = PathBuf::from(spec);
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .with_context(|| format!("--disk {spec:?} has no file name; use NAME=PATH"))?;
            (name, path)
        }
    };
    let name =
        name.parse().with_context(|| format!("--disk {spec:?}: bad disk name; use NAME=PATH"))?;
    Ok((name, path))
}

/// Opens the disks and runs the backup, with ctrl-C cancelling it.
pub async fn backup_disks(
    vault: &cairn_vault::Vault,
    vm: Name,
    disks: &[(Name, PathBuf)],
    threads: Option<usize>,
    progress: Arc<dyn cairn_backup::Progress>,
) -> anyhow::Result<PointManifest> {
    let mut inputs = Vec::new();
    for (name, path) in disks {
        let source = RawFile::open(path).with_context(|| format!("disk {name} of VM {vm}"))?;
        inputs.push(DiskInput { name: name.clone(), source: Arc::new(source) });
    }
    let cancel = Cancel::new();
    super::cancel_on_signal(cancel.clone());
    let request = BackupRequest {
        vm: vm.clone(),
        disks: inputs,
        consistency: Consistency::None,
        captured_at: None,
        evidence: vec![Evidence::new(
            "consistency",
            None,
            "disks were read live, with no snapshot: consistency none",
        )],
        threads,
    };
    cairn_backup::backup(vault, request, progress, &cancel)
        .await
        .with_context(|| format!("backing up VM {vm} to {}", vault.url()))
}

pub async fn run(args: BackupArgs, json: bool) -> anyhow::Result<Exit> {
    let vault = super::open_vault(&args.vault.vault).await?;
    let vm = super::vm_name(&args.vm)?;
    let disks = args.disks.iter().map(|d| parse_disk(d)).collect::<anyhow::Result<Vec<_>>>()?;
    let bars = Arc::new(Bars::new(json, "backup"));
    let manifest = backup_disks(&vault, vm, &disks, args.threads, bars).await?;
    if json {
        print_json(&serde_json::to_value(&manifest)?);
    } else {
        println!("{}", summary(&manifest));
    }
    Ok(Exit::Ok)
}

/// A table of what a backup did, per disk, and the point it made.
pub fn summary(m: &PointManifest) -> String {
    let rows: Vec<Vec<String>> = m
        .disks
        .iter()
        .map(|(name, d)| {
            let secs = d.stats.duration_ms as f64 / 1000.0;
            vec![
                name.to_string(),
                bytes(d.size),
                bytes(d.stats.bytes_scanned),
                bytes(d.stats.bytes_changed),
                bytes(d.stats.bytes_sent),
                bytes(d.stats.bytes_deduplicated),
                format!("{secs:.2}s"),
                rate(d.stats.bytes_scanned, secs),
            ]
        })
        .collect();
    let kind =
        if m.disks.values().all(|d| d.previous_point.is_some()) { "incremental" } else { "full" };
    format!(
        "{}\npoint {} of VM {} committed ({kind}, consistency {})",
        table(&["DISK", "SIZE", "SCANNED", "CHANGED", "SENT", "DEDUP", "TIME", "RATE"], &rows),
        m.point,
        m.vm,
        m.consistency.as_str()
    )
}
