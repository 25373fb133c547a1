//! `cairn-agent restore`.

use std::sync::Arc;

use anyhow::Context;
use cairn_backup::{ImageFormat, RestoreOptions};

use crate::cli::{FormatArg, RestoreArgs};
use crate::output::{Bars, Exit, print_json};
use crate::units::bytes;

pub async fn run(args: RestoreArgs, json: bool) -> anyhow::Result<Exit> {
    let (vault, manifest) = super::open_point(&args.from).await?;
    let options = RestoreOptions {
        force: args.force,
        format: match args.format {
            FormatArg::Raw => ImageFormat::Raw,
            FormatArg::Qcow2 => ImageFormat::Qcow2,
        },
        in_place: args.in_place,
        keep_going: args.keep_going,
    };
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
            .map(|(d, p, s)| {
                let damaged: Vec<_> = s
                    .damaged
                    .iter()
                    .map(|g| serde_json::json!({ "offset": g.offset, "len": g.len, "detail": g.detail }))
                    .collect();
                serde_json::json!({
                    "disk": d, "path": p, "size": s.size, "bytes_written": s.bytes_written,
                    "chunks": s.chunks, "blocks_kept": s.blocks_kept, "damaged": damaged,
                })
            })
            .collect();
        print_json(
            &serde_json::json!({ "vm": manifest.vm, "point": manifest.point, "disks": disks }),
        );
    } else {
        for (disk, path, stats) in &restored {
            let kept = if args.in_place {
                format!(", {} blocks already right", stats.blocks_kept)
            } else {
                String::new()
            };
            println!(
                "restored disk {disk} of point {} to {} ({}, {} of data written{kept})",
                manifest.point,
                path.display(),
                bytes(stats.size),
                bytes(stats.bytes_written)
            );
            for gap in &stats.damaged {
                println!(
                    "  DAMAGED: {} at offset {} left as zeros: {}",
                    bytes(gap.len),
                    gap.offset,
                    gap.detail
                );
            }
        }
    }
    let damaged: usize = restored.iter().map(|(_, _, s)| s.damaged.len()).sum();
    if damaged > 0 {
        eprintln!(
            "{damaged} block(s) could not be restored and read as zeros (listed above); the \
             rest of the point was restored. Verify the vault to see which points share them."
        );
        return Ok(Exit::Damaged);
    }
    Ok(Exit::Ok)
}
