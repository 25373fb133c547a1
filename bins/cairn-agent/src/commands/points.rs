//! `cairn-agent points`.

use crate::cli::PointsArgs;
use crate::output::{Exit, print_json, table};
use crate::units::bytes;

pub async fn run(args: PointsArgs, json: bool) -> anyhow::Result<Exit> {
    let vault = super::open_vault(&args.vault).await?;
    let vm = args.vm.as_deref().map(super::vm_name).transpose()?;
    let listing = vault.list_points(vm.as_ref()).await?;
    if json {
        let unreadable: Vec<_> = listing
            .unreadable
            .iter()
            .map(|u| serde_json::json!({ "vm": u.vm, "point": u.point, "path": u.path, "error": u.error }))
            .collect();
        print_json(&serde_json::json!({ "points": listing.points, "unreadable": unreadable }));
        return Ok(Exit::Ok);
    }
    let rows: Vec<Vec<String>> = listing
        .points
        .iter()
        .map(|m| {
            let size: u64 = m.disks.values().map(|d| d.size).sum();
            let full = m.disks.values().any(|d| d.previous_point.is_none());
            vec![
                m.vm.to_string(),
                m.point.to_string(),
                m.consistency.as_str().to_string(),
                if full { "full" } else { "incremental" }.to_string(),
                m.disks.len().to_string(),
                bytes(size),
                bytes(m.bytes_sent()),
            ]
        })
        .collect();
    if rows.is_empty() && listing.unreadable.is_empty() {
        println!("no recovery points{}", vm.map(|v| format!(" for VM {v}")).unwrap_or_default());
    } else {
        println!(
            "{}",
            table(&["VM", "POINT", "CONSISTENCY", "KIND", "DISKS", "SIZE", "SENT"], &rows)
        );
    }
    for m in &listing.points {
        for e in &m.evidence {
            let disk = e.disk.as_ref().map(|d| format!(" disk {d}")).unwrap_or_default();
            println!("  {} {}{disk}: {}", m.point, e.kind, e.message);
        }
    }
    for u in &listing.unreadable {
        println!("UNREADABLE {} {}: {}", u.vm, u.point, u.error);
    }
    Ok(Exit::Ok)
}
