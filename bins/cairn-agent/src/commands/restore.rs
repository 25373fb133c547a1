//! `cairn-agent restore`.

use std::sync::Arc;

use anyhow::Context;
use cairn_backup::RestoreOptions;

use crate::cli::RestoreArgs;
use crate::output::{Bars, Exit, print_json};
use crate::units::bytes;

pub async fn run(args: RestoreArgs, json: bool) -> anyhow::Result<Exit> {
    let vault = super::open_vault(&args.vault).await?;
    let vm = super::vm_name(&args.vm)?;
    let point = super::point_id(&args.point)?;
    let manifest = vault.resolve_point(&vm, point.as_ref()).await?;
    let options = RestoreOptions { force: args.force };
    let bars = Arc::new(Bars::new(json, "restore"));
    let restored = match &args.disk {
        Some(disk) => {
            let disk = disk.parse().with_context(|| format!("--disk {disk:?}"))?;
            let stats =
                cairn_backup::restore_disk(&vault, &manifest, &disk, &args.to, &options, bars)
                    .await?;
            vec![(disk, args.to.clone(), stats)]
        }
        None => cairn_backup::restore_point(&vault, &manifest, &args.to, &options, bars).await?,
    };
    if json {
        let disks: Vec<_> = restored
            .iter()
            .map(|(d, p, s)| serde_json::json!({ "disk": d, "path": p, "size": s.size, "bytes_written": s.bytes_written, "chunks": s.chunks }))
            .collect();
        print_json(&serde_json::json!({ "vm": vm, "point": manifest.point, "disks": disks }));
    } else {
        for (disk, path, stats) in &restored {
            println!(
                "restored disk {disk} of point {} to {} ({}, {} of data)",
                manifest.point,
                path.display(),
                bytes(stats.size),
                bytes(stats.bytes_written)
            );
        }
    }
    Ok(Exit::Ok)
}
