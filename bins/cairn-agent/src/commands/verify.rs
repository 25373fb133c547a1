//! `cairn-agent verify`.

use cairn_vault::{VerifyReport, VerifyScope};

use crate::cli::VerifyArgs;
use crate::output::{Exit, print_json};
use crate::units::bytes;

pub async fn run(args: VerifyArgs, json: bool) -> anyhow::Result<Exit> {
    let vault = super::open_vault(&args.vault).await?;
    let scope = VerifyScope {
        vm: args.vm.as_deref().map(super::vm_name).transpose()?,
        point: match args.point.as_deref() {
            Some(p) => super::point_id(p)?,
            None => None,
        },
    };
    let report = vault.verify(&scope, &|_| {}).await?;
    if json {
        print_json(&report_json(&report));
    } else {
        print_report(&report);
    }
    Ok(if report.is_clean() { Exit::Ok } else { Exit::Damaged })
}

pub fn report_json(r: &VerifyReport) -> serde_json::Value {
    let bad: Vec<_> = r
        .bad_chunks
        .iter()
        .map(|b| {
            let points: Vec<_> = b.points.iter().map(|(vm, p)| format!("{vm}/{p}")).collect();
            serde_json::json!({ "chunk": b.id, "reason": b.reason, "points": points })
        })
        .collect();
    let damaged: Vec<_> = r.damaged_points.iter().map(|(vm, p)| format!("{vm}/{p}")).collect();
    let unreadable: Vec<_> = r
        .unreadable
        .iter()
        .map(|u| serde_json::json!({ "path": u.path, "error": u.error }))
        .collect();
    serde_json::json!({
        "clean": r.is_clean(),
        "points_checked": r.points_checked,
        "chunks_checked": r.chunks_checked,
        "bytes_checked": r.bytes_checked,
        "bad_chunks": bad,
        "damaged_points": damaged,
        "inconsistent_points": r
            .inconsistent
            .iter()
            .map(|(vm, p, why)| serde_json::json!({ "point": format!("{vm}/{p}"), "reason": why }))
            .collect::<Vec<_>>(),
        "unreadable_manifests": unreadable,
        "unreadable_pack_indexes": r
            .unreadable_pack_indexes
            .iter()
            .map(|(path, error)| serde_json::json!({ "path": path, "error": error }))
            .collect::<Vec<_>>(),
    })
}

pub fn print_report(r: &VerifyReport) {
    println!(
        "checked {} points, {} chunks ({})",
        r.points_checked,
        r.chunks_checked,
        bytes(r.bytes_checked)
    );
    for b in &r.bad_chunks {
        println!("BAD chunk {}: {} (quarantined)", b.id, b.reason);
        for (vm, p) in &b.points {
            println!("    damages point {p} of VM {vm}");
        }
    }
    for (vm, p, why) in &r.inconsistent {
        println!("INCONSISTENT point {p} of VM {vm}: its index does not fit it: {why}");
    }
    for u in &r.unreadable {
        println!("UNREADABLE manifest {}: {}", u.path, u.error);
    }
    for (path, error) in &r.unreadable_pack_indexes {
        println!("UNREADABLE pack index {path}: {error} (moved to quarantine/pack-index)");
    }
    if r.is_clean() {
        println!("vault OK");
    } else {
        println!(
            "vault DAMAGED: {} bad chunks, {} damaged points; the next backup of an affected VM stores the lost blocks again",
            r.bad_chunks.len(),
            r.damaged_points.len()
        );
    }
}
