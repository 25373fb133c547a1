//! From a VM configuration to a capture: the quiescer, the view providers, the watchdog and
//! what the agent must never freeze.

use std::path::PathBuf;

use anyhow::Context;
use cairn_snapshot::freeze::{Freezer, Protected};
use cairn_snapshot::scripts::ScriptConfig;
use cairn_snapshot::watchdog::WatchdogCommand;
use cairn_snapshot::{
    Capture, DiskSpec, GuestQuiescer, NoQuiescer, Quiescer, ViewProvider, VmConfig, VmState,
};

/// The agent's own executable, in its watchdog role.
fn watchdog_command() -> anyhow::Result<WatchdogCommand> {
    let program =
        std::env::current_exe().context("finding the agent's executable for the thaw watchdog")?;
    Ok(WatchdogCommand { program, args: vec!["watchdog-thaw".into()] })
}

/// Everything the agent writes to during a backup: freezing any of these would hang it.
pub fn protected(config: &VmConfig, vault: Option<PathBuf>) -> Vec<Protected> {
    let mut list = Protected::of_this_process();
    if let Some(vault) = vault {
        list.push(Protected::new("the vault", vault));
    }
    list.push(Protected::new("the VM configuration", config.file.clone()));
    for d in &config.disks {
        // Views (reflink clones, btrfs snapshots) are written next to the images.
        list.push(Protected::new(
            format!("disk {} and its views", d.spec.name),
            d.spec.path.clone(),
        ));
    }
    list
}

/// The quiescer the configuration asks for, checked (scripts' modes and owners, mount
/// points, protected file systems) before anything runs.
pub fn quiescer(config: &VmConfig, protected: &[Protected]) -> anyhow::Result<Box<dyn Quiescer>> {
    if config.state == VmState::Stopped {
        return Ok(Box::new(NoQuiescer));
    }
    let scripts = config.scripts.as_deref().map(ScriptConfig::load).transpose()?;
    let freezer = if config.freeze_mounts.is_empty() {
        None
    } else {
        Some(Freezer::new(
            &config.freeze_mounts,
            config.watchdog_deadline,
            watchdog_command()?,
            protected,
        )?)
    };
    Ok(Box::new(GuestQuiescer::new(scripts, freezer)))
}

/// Runs the capture on a blocking thread (scripts may run for minutes).
pub async fn capture(config: &VmConfig, vault: Option<PathBuf>) -> anyhow::Result<Capture> {
    if config.state == VmState::Stopped {
        for d in &config.disks {
            cairn_snapshot::views::check_not_in_use(&d.spec)?;
        }
    }
    let mut quiescer = quiescer(config, &protected(config, vault))?;
    let disks: Vec<(DiskSpec, &'static dyn ViewProvider)> =
        config.disks.iter().map(|d| (d.spec.clone(), d.view.provider())).collect();
    let state = config.state;
    let vm = config.vm.clone();
    tokio::task::spawn_blocking(move || cairn_snapshot::capture(quiescer.as_mut(), &disks, state))
        .await
        .context("the capture thread failed")?
        .with_context(|| format!("capturing the disks of VM {vm}"))
}
