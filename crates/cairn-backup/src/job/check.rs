//! What a job would refuse, found before anything runs.

use cairn_snapshot::scripts::Scripts;
use cairn_snapshot::{DiskFormat, VmConfig, VmState};

use super::{JobOptions, quiesce};
use crate::Error;

/// One check of a configuration: what was checked, and what was found or what is wrong.
#[derive(Clone, Debug)]
pub struct Check {
    /// What was checked ("disk os (view Reflink)", "freeze", ...).
    pub what: String,
    /// `Ok(detail)` or `Err(problem)`.
    pub result: Result<String, String>,
}

/// Refuses two disks of one name (`--disk` names a disk after its file when no name is given):
/// before anything starts, so no bitmap is added for a disk the backup would refuse.
pub(super) fn names(config: &VmConfig) -> Result<(), Error> {
    let mut seen = std::collections::BTreeSet::new();
    for d in &config.disks {
        if !seen.insert(&d.spec.name) {
            return Err(Error::InvalidRequest(format!(
                "two disks are named {}; name them apart (NAME=PATH)",
                d.spec.name
            )));
        }
    }
    Ok(())
}

/// Checks the images of a configuration before anything touches them: every qcow2 image's
/// header (no backing file unless allowed, no `json:` backing, no external data file), and,
/// for a stopped VM, that no process or loop device has a disk open for writing.
pub(super) async fn images(config: &VmConfig) -> Result<(), Error> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        for d in &config.disks {
            if d.format == DiskFormat::Qcow2 {
                cairn_nbd::qcow2::check_image(&d.spec.path, d.allow_backing_file)
                    .map_err(|source| Error::Image { disk: d.spec.name.clone(), source })?;
            }
            if config.state == VmState::Stopped {
                cairn_snapshot::views::check_not_in_use(&d.spec)?;
            }
        }
        Ok(())
    })
    .await?
}

/// Everything a backup of `config` would refuse, checked without backing anything up: the
/// views, the images' formats, a stopped VM's disks, the scripts (modes, owners) and the
/// freeze (mount points, what must not be frozen). The vault is not known here; a backup
/// checks it as well.
pub fn check(config: &VmConfig, options: &JobOptions) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut add =
        |what: String, result: Result<String, String>| checks.push(Check { what, result });
    let state = match config.state {
        VmState::Running => "running",
        VmState::Stopped => "stopped",
    };
    add("vm".into(), Ok(format!("{} ({state})", config.vm)));
    if let Some(qemu) = &config.qemu {
        super::live::check(config, qemu, options, &mut add);
        return checks;
    }
    for d in &config.disks {
        let what =
            format!("disk {} (view {:?}, format {})", d.spec.name, d.view, d.format.as_str());
        let mut result =
            cairn_snapshot::views::preflight(d.view, &d.spec).map_err(|e| e.to_string());
        if d.format == DiskFormat::Qcow2 {
            result = result.and_then(|detail| {
                cairn_nbd::qcow2::check_image(&d.spec.path, d.allow_backing_file)
                    .map(|h| {
                        let backing = h.backing_file.map(|b| format!(", backing file {b}"));
                        format!("{detail}; qcow2 v{}{}", h.version, backing.unwrap_or_default())
                    })
                    .map_err(|e| e.to_string())
            });
        }
        add(what, result);
    }
    if config.state == VmState::Stopped {
        for d in &config.disks {
            let result = cairn_snapshot::views::check_not_in_use(&d.spec)
                .map(|()| {
                    "not open for writing by any process the agent can see, nor by a loop device"
                        .to_string()
                })
                .map_err(|e| e.to_string());
            add(format!("disk {} (VM stopped)", d.spec.name), result);
        }
        return checks;
    }
    if let Some(scripts) = &config.scripts {
        let result = Scripts::load(scripts).map(|s| {
            let s = s.config();
            format!(
                "pre {}, post {}, timeout {} s, continueBackupOnFailure {}, fsFreezeEnabled {}",
                s.pre_script.display(),
                s.post_script.display(),
                s.timeout_seconds,
                s.continue_on_failure,
                s.fs_freeze
            )
        });
        add(format!("scripts {}", scripts.display()), result.map_err(|e| e.to_string()));
    }
    if !config.freeze_mounts.is_empty() {
        let protected = quiesce::protected(config, None, options);
        let result = quiesce::quiescer(config, &protected, options.watchdog.as_ref())
            .map(|_| {
                let mounts: Vec<String> =
                    config.freeze_mounts.iter().map(|m| m.display().to_string()).collect();
                format!(
                    "{} (watchdog thaws after {} s)",
                    mounts.join(", "),
                    config.watchdog_deadline.as_secs()
                )
            })
            .map_err(|e| e.to_string());
        add("freeze".into(), result);
    }
    checks
}
