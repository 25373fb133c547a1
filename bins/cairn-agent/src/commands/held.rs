//! `cairn-agent held`: the points this host keeps views of, and instant restores from them.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

use anyhow::{Context, bail};
use cairn_worker::AgentConfig;
use serde_json::json;

use crate::cli::HeldCommand;
use crate::held::Registry;
use crate::output::{Exit, print_json, table};

pub fn run(cmd: HeldCommand, json: bool) -> anyhow::Result<Exit> {
    match cmd {
        HeldCommand::List { agent_config } => {
            let config = AgentConfig::load(&agent_config)?;
            let points = Registry::in_dir(&config.state_dir).load()?;
            if json {
                print_json(&json!({ "held": points }));
            } else {
                let rows: Vec<Vec<String>> = points
                    .iter()
                    .map(|p| {
                        let disks: Vec<String> =
                            p.views.iter().map(|v| v.disk.to_string()).collect();
                        vec![
                            p.vm.clone(),
                            p.point.clone(),
                            p.captured_at.to_string(),
                            p.until.to_string(),
                            disks.join(","),
                        ]
                    })
                    .collect();
                table(&["VM", "POINT", "CAPTURED", "RELEASED AT", "DISKS"], &rows);
            }
            Ok(Exit::Ok)
        }
        HeldCommand::Restore { agent_config, vm, point, disk, to } => {
            let config = AgentConfig::load(&agent_config)?;
            let points = Registry::in_dir(&config.state_dir).load()?;
            let held = points
                .iter()
                .filter(|p| p.vm == vm && point.as_ref().is_none_or(|id| &p.point == id))
                .max_by_key(|p| p.captured_at)
                .with_context(|| match &point {
                    Some(id) => format!(
                        "VM {vm} has no held point {id} on this host: restore it from its vault"
                    ),
                    None => {
                        format!("VM {vm} has no held point on this host: restore from its vault")
                    }
                })?;
            let view =
                held.views.iter().find(|v| v.disk.as_str() == disk).with_context(|| {
                    format!("point {} of VM {vm} has no disk {disk}", held.point)
                })?;
            let started = std::time::Instant::now();
            let how = copy_view(&view.path, &to)?;
            let secs = started.elapsed().as_secs_f64();
            // A running QEMU's kept view is a clone of its image, in the image's format.
            let format = view.format.clone();
            if json {
                print_json(
                    &json!({ "vm": vm, "point": held.point, "disk": disk, "to": to, "how": how, "seconds": secs, "format": format }),
                );
            } else {
                let image = match &format {
                    Some(f) => format!(", a {f} image"),
                    None => String::new(),
                };
                println!(
                    "restored disk {disk} of VM {vm} at point {} ({}) to {}{image} from this host's kept view ({how}, {secs:.2} s)",
                    held.point,
                    held.captured_at,
                    to.display()
                );
            }
            Ok(Exit::Ok)
        }
    }
}

/// Copies the view at `from` to a new file `to`: a reflink clone where the file system
/// shares blocks, else a sparse-unaware byte copy. Never over an existing file.
fn copy_view(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<&'static str> {
    // Never through a link, never blocking on a FIFO: a kept view is a regular file or
    // nothing.
    let flags = rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK;
    let source = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(from)
        .with_context(|| format!("opening the kept view {}", from.display()))?;
    if !source.metadata()?.is_file() {
        bail!("the kept view {} is not a regular file", from.display());
    }
    let mut target = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .with_context(|| format!("creating {} (it must not exist)", to.display()))?;
    if rustix::fs::ioctl_ficlone(&target, &source).is_ok() {
        return Ok("reflink clone");
    }
    let mut reader = std::io::BufReader::with_capacity(1 << 20, source);
    std::io::copy(&mut reader, &mut target)
        .with_context(|| format!("copying into {}", to.display()))?;
    target.flush()?;
    target.sync_all()?;
    Ok("copy")
}
