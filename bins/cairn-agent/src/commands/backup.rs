//! `cairn-agent backup`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use cairn_backup::{BackupRequest, Cancel, DiskInput};
use cairn_format::{Consistency, Evidence, Name, PointManifest};

use super::cbt::Tracker;
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

/// How hard a backup works the machine.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tuning {
    /// Hashing threads per disk (default: one per core).
    pub threads: Option<usize>,
    /// Disks read at once (default: `cairn_backup::DEFAULT_PARALLEL_DISKS`).
    pub parallel_disks: Option<usize>,
}

/// How the disks were captured, for the backup request.
pub struct Captured {
    /// The consistency reached.
    pub consistency: Consistency,
    /// When the disks were captured, if before the job started.
    pub captured_at: Option<jiff::Timestamp>,
    /// How the capture went.
    pub evidence: Vec<Evidence>,
}

impl Captured {
    /// Disks read live, with no snapshot.
    pub fn live() -> Captured {
        Captured {
            consistency: Consistency::None,
            captured_at: None,
            evidence: vec![Evidence::new(
                "consistency",
                None,
                "disks were read live, with no snapshot: consistency none",
            )],
        }
    }
}

/// Opens the disks and runs the backup; `cancel` stops it (ctrl-C, see `cancel_on_signal`).
/// `tracker` opens qcow2 disks with their dirty bitmaps; it must have begun before the disks
/// were captured.
#[allow(clippy::too_many_arguments)]
pub async fn backup_disks(
    vault: &cairn_vault::Vault,
    vm: Name,
    disks: &[(Name, PathBuf)],
    tracker: &Tracker,
    captured: Captured,
    tuning: Tuning,
    progress: Arc<dyn cairn_backup::Progress>,
    cancel: &Cancel,
) -> anyhow::Result<PointManifest> {
    let mut inputs = Vec::new();
    for (name, path) in disks {
        let source = tracker.open(name, path).with_context(|| format!("disk {name} of VM {vm}"))?;
        inputs.push(DiskInput { name: name.clone(), source });
    }
    let request = BackupRequest {
        vm: vm.clone(),
        disks: inputs,
        consistency: captured.consistency,
        captured_at: captured.captured_at,
        evidence: captured.evidence,
        threads: tuning.threads,
        point: Some(tracker.point().clone()),
        parallel_disks: tuning.parallel_disks,
    };
    cairn_backup::backup(vault, request, progress, cancel)
        .await
        .with_context(|| format!("backing up VM {vm} to {}", vault.url()))
}

/// Live-reads `disks` of `vm`: the bitmap rotation around one backup.
pub async fn backup_live(
    vault: &cairn_vault::Vault,
    vm: Name,
    disks: &[(Name, PathBuf)],
    tuning: Tuning,
    progress: Arc<dyn cairn_backup::Progress>,
    cancel: &Cancel,
) -> anyhow::Result<PointManifest> {
    let tracker = Tracker::begin(vault, &vm, disks).await?;
    let result =
        backup_disks(vault, vm, disks, &tracker, Captured::live(), tuning, progress, cancel).await;
    tracker.finish(result.is_ok()).await;
    result
}

/// Backs up the VM a configuration describes: capture, read the views, commit, release.
async fn backup_configured(
    vault: &cairn_vault::Vault,
    file: &std::path::Path,
    tuning: Tuning,
    progress: Arc<dyn cairn_backup::Progress>,
    cancel: &Cancel,
) -> anyhow::Result<PointManifest> {
    let config = cairn_snapshot::VmConfig::load(file)?;
    let images: Vec<(Name, PathBuf)> =
        config.disks.iter().map(|d| (d.spec.name.clone(), d.spec.path.clone())).collect();
    // The next dirty bitmaps start before the views: a write in between is read twice, never
    // missed.
    let tracker = Tracker::begin(vault, &config.vm, &images).await?;
    // A ctrl-C during the capture waits for it to finish: the guest must be thawed and its
    // post-script run before the agent stops. Only then is the backup cancelled.
    let capture =
        match super::snapshot::capture(&config, vault.local_path().map(PathBuf::from)).await {
            Ok(capture) => capture,
            Err(e) => {
                tracker.finish(false).await;
                return Err(e);
            }
        };
    if cancel.is_cancelled() {
        let _ = tokio::task::spawn_blocking(move || capture.release(false)).await;
        tracker.finish(false).await;
        return Err(cairn_backup::Error::Cancelled.into());
    }
    let disks: Vec<(Name, PathBuf)> =
        capture.views().iter().map(|v| (v.disk().clone(), v.path().to_path_buf())).collect();
    let captured = Captured {
        consistency: capture.level(),
        captured_at: Some(capture.captured_at()),
        evidence: capture.record().evidence().to_vec(),
    };
    let result = backup_disks(
        vault,
        config.vm.clone(),
        &disks,
        &tracker,
        captured,
        tuning,
        progress,
        cancel,
    )
    .await;
    // The views go only after the commit (or the failure): VSS full backups tell writers
    // to truncate their logs at this point, and only for a committed point.
    let committed = result.is_ok();
    if let Err(e) = tokio::task::spawn_blocking(move || capture.release(committed)).await? {
        tracing::warn!("releasing the views of VM {}: {e}", config.vm);
    }
    tracker.finish(committed).await;
    result
}

pub async fn run(args: BackupArgs, config: Option<PathBuf>, json: bool) -> anyhow::Result<Exit> {
    let vault = super::open_vault(&args.vault.vault).await?;
    let tuning = Tuning { threads: args.threads, parallel_disks: args.parallel_disks };
    let bars = Arc::new(Bars::new(json, "backup"));
    let cancel = Cancel::new();
    super::cancel_on_signal(cancel.clone());
    let manifest = match (&config, &args.vm) {
        (Some(file), None) if args.disks.is_empty() => {
            backup_configured(&vault, file, tuning, bars, &cancel).await?
        }
        (None, Some(vm)) if !args.disks.is_empty() => {
            let vm = super::vm_name(vm)?;
            let disks =
                args.disks.iter().map(|d| parse_disk(d)).collect::<anyhow::Result<Vec<_>>>()?;
            backup_live(&vault, vm, &disks, tuning, bars, &cancel).await?
        }
        _ => anyhow::bail!(
            "give either --config FILE (the VM and its disks come from it) or --vm with --disk"
        ),
    };
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
                d.stats.patched_blocks.to_string(),
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
        table(
            &["DISK", "SIZE", "SCANNED", "CHANGED", "PATCHED", "SENT", "DEDUP", "TIME", "RATE"],
            &rows
        ),
        m.point,
        m.vm,
        m.consistency.as_str()
    )
}
