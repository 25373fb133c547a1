//! From a VM configuration to its quiescer: scripts, the freeze, and what must never freeze.

use cairn_snapshot::freeze::{Freezer, Protected};
use cairn_snapshot::scripts::Scripts;
use cairn_snapshot::watchdog::WatchdogCommand;
use cairn_snapshot::{GuestQuiescer, NoQuiescer, Quiescer, VmConfig, VmState};
use cairn_vault::Vault;

use super::JobOptions;
use crate::Error;

/// Everything the job writes to: freezing any of these would hang it. Without a vault (a
/// configuration checked on its own) the vault is left out; a backup checks it as well.
pub(super) fn protected(
    config: &VmConfig,
    vault: Option<&Vault>,
    options: &JobOptions,
) -> Vec<Protected> {
    let mut list = Protected::of_this_process();
    list.extend(options.protected.iter().cloned());
    if let Some(root) = vault.and_then(Vault::local_path) {
        list.push(Protected::new("the vault", root));
    }
    if let Some(file) = &config.file {
        list.push(Protected::new("the VM configuration", file.clone()));
    }
    for d in &config.disks {
        // Views (reflink clones, btrfs snapshots) are written next to the images.
        list.push(Protected::new(
            format!("disk {} and its views", d.spec.name),
            d.spec.path.clone(),
        ));
    }
    list
}

/// The quiescer the configuration asks for, checked (scripts' modes and owners, mount points,
/// protected file systems) before anything runs.
pub(super) fn quiescer(
    config: &VmConfig,
    protected: &[Protected],
    watchdog: Option<&WatchdogCommand>,
) -> Result<Box<dyn Quiescer>, Error> {
    if config.state == VmState::Stopped {
        return Ok(Box::new(NoQuiescer));
    }
    let scripts = config.scripts.as_deref().map(Scripts::load).transpose()?;
    let freezer = if config.freeze_mounts.is_empty() {
        None
    } else {
        let watchdog = watchdog.ok_or_else(|| {
            Error::InvalidRequest(
                "the configuration freezes file systems, and the job was given no thaw \
                 watchdog program to start"
                    .into(),
            )
        })?;
        Some(Freezer::new(
            &config.freeze_mounts,
            config.watchdog_deadline,
            watchdog.clone(),
            protected,
        )?)
    };
    Ok(Box::new(GuestQuiescer::new(scripts, freezer)))
}
