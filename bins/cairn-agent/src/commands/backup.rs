//! `cairn-agent backup`: arguments in, a [`VmJob`] run, a table out.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use cairn_backup::{Cancel, JobOptions, VmJob};
use cairn_format::PointManifest;
use cairn_snapshot::watchdog::WatchdogCommand;
use cairn_snapshot::{DiskConfig, DiskFormat, VmConfig};

use crate::cli::BackupArgs;
use crate::output::{Bars, Exit, print_json, table};
use crate::units::{bytes, rate};

/// Parses `--disk [NAME=]PATH[,format=raw|qcow2][,backing=allow]`: a disk read live, named
/// after its file when no name is given, raw unless declared otherwise.
pub fn parse_disk(spec: &str) -> anyhow::Result<DiskConfig> {
    let mut parts = spec.split(',');
    let place = parts.next().unwrap_or_default();
    let (mut format, mut backing) = (DiskFormat::Raw, false);
    for option in parts {
        match option.split_once('=') {
            Some(("format", f)) => {
                format = f.parse().map_err(|e| anyhow::anyhow!("--disk {spec:?}: format {e}"))?
            }
            Some(("backing", "allow")) => backing = true,
            _ => bail!(
                "--disk {spec:?}: unknown option {option:?}; give [NAME=]PATH[,format=raw|qcow2][,backing=allow]"
            ),
        }
    }
    if backing && format != DiskFormat::Qcow2 {
        bail!("--disk {spec:?}: backing=allow needs format=qcow2");
    }
    let (name, path) = match place.split_once('=') {
        Some((name, path)) => (name.to_string(), PathBuf::from(path)),
        None => {
            let path = PathBuf::from(place);
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .with_context(|| format!("--disk {spec:?} has no file name; use NAME=PATH"))?;
            (name, path)
        }
    };
    let name =
        name.parse().with_context(|| format!("--disk {spec:?}: bad disk name; use NAME=PATH"))?;
    Ok(DiskConfig::live(name, path, format, backing))
}

/// The agent's own executable in its watchdog role: what thaws frozen file systems if the
/// agent dies.
pub fn watchdog_command() -> anyhow::Result<WatchdogCommand> {
    let program =
        std::env::current_exe().context("finding the agent's executable for the thaw watchdog")?;
    Ok(WatchdogCommand { program, args: vec!["watchdog-thaw".into()] })
}

/// The job's options from the command line.
pub fn job_options(
    threads: Option<usize>,
    parallel_disks: Option<usize>,
) -> anyhow::Result<JobOptions> {
    Ok(JobOptions {
        threads,
        parallel_disks,
        watchdog: Some(watchdog_command()?),
        protected: vec![],
        retain_until: None,
        origin: None,
        time_shift: jiff::SignedDuration::ZERO,
    })
}

pub async fn run(args: BackupArgs, config: Option<PathBuf>, json: bool) -> anyhow::Result<Exit> {
    let vault = super::open_vault(&args.vault).await?;
    let mut options = job_options(args.threads, args.parallel_disks)?;
    options.retain_until = args.retain_until;
    let config = match (&config, &args.vm) {
        (Some(file), None) if args.disks.is_empty() => VmConfig::load(file)?,
        (None, Some(vm)) if !args.disks.is_empty() => {
            let disks = args.disks.iter().map(|d| parse_disk(d)).collect::<anyhow::Result<_>>()?;
            VmConfig::live(super::vm_name(vm)?, disks)
        }
        _ => bail!(
            "give either --config FILE (the VM and its disks come from it) or --vm with --disk"
        ),
    };
    let job = VmJob::new(config, options);
    let bars = Arc::new(Bars::new(json, "backup"));
    let cancel = Cancel::new();
    super::cancel_on_signal(cancel.clone());
    let manifest = job
        .run(&vault, bars, &cancel)
        .await
        .with_context(|| format!("backing up VM {} to {}", job.vm(), vault.url()))?;
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
