//! `cairn-agent points`.

use cairn_format::{PointManifest, PointState};
use cairn_vault::PointStates;

use crate::cli::PointsArgs;
use crate::output::{Exit, print_json, table};
use crate::units::{bytes, when};

pub async fn run(args: PointsArgs, json: bool) -> anyhow::Result<Exit> {
    let vault = super::open_vault(&args.vault).await?;
    let vm = args.vm.as_deref().map(super::vm_name).transpose()?;
    let listing = vault.list_points(vm.as_ref()).await?;
    let states = vault.point_states(vm.as_ref()).await?;
    let state = |m: &PointManifest| states.get(&m.vm, &m.point);
    let is_deleted = |m: &PointManifest| state(m).is_ok_and(|s| s.deleted.is_some());
    let (deleted, live): (Vec<&PointManifest>, Vec<&PointManifest>) =
        listing.points.iter().partition(|m| is_deleted(m));
    let shown = if args.deleted { &deleted } else { &live };
    if json {
        let unreadable: Vec<_> = listing
            .unreadable
            .iter()
            .map(|u| serde_json::json!({ "vm": u.vm, "point": u.point, "path": u.path, "error": u.error }))
            .collect();
        let points: Vec<_> = shown
            .iter()
            .map(|m| {
                let mut v = serde_json::to_value(m).unwrap_or_default();
                v["state"] = state_json(&states, m);
                v
            })
            .collect();
        print_json(&serde_json::json!({ "points": points, "unreadable": unreadable }));
        return Ok(Exit::Ok);
    }
    let rows: Vec<Vec<String>> = shown
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
                state_words(state(m)),
            ]
        })
        .collect();
    let whose = vm.as_ref().map(|v| format!(" for VM {v}")).unwrap_or_default();
    if rows.is_empty() && listing.unreadable.is_empty() {
        match args.deleted {
            true => println!("no soft-deleted recovery points{whose}"),
            false => println!("no recovery points{whose}"),
        }
    } else {
        println!(
            "{}",
            table(&["VM", "POINT", "CONSISTENCY", "KIND", "DISKS", "SIZE", "SENT", "STATE"], &rows)
        );
    }
    if !args.deleted {
        for m in shown {
            for e in &m.evidence {
                let disk = e.disk.as_ref().map(|d| format!(" disk {d}")).unwrap_or_default();
                println!("  {} {}{disk}: {}", m.point, e.kind, e.message);
            }
        }
        if !deleted.is_empty() {
            println!(
                "{} soft-deleted point(s) not shown: `cairn-agent points --deleted` lists them",
                deleted.len()
            );
        }
    }
    for u in &listing.unreadable {
        println!("UNREADABLE {} {}: {}", u.vm, u.point, u.error);
    }
    Ok(Exit::Ok)
}

/// The STATE column: deleted (until when), locked, retained, verified, drilled.
fn state_words(state: Result<PointState, cairn_vault::Error>) -> String {
    let state = match state {
        Ok(s) => s,
        Err(_) => return "notes unreadable".into(),
    };
    let now = jiff::Timestamp::now();
    let mut words = vec![];
    if let Some(d) = &state.deleted {
        words.push(format!("deleted, purge after {}", when(d.purge_after)));
    }
    if let Some(until) = state.locked_until.filter(|u| *u > now) {
        words.push(format!("locked until {}", when(until)));
    }
    if let Some(until) = state.retain_until.filter(|u| *u > now) {
        words.push(format!("retained until {}", when(until)));
    }
    match &state.verified {
        Some(v) if v.clean => words.push("verified".into()),
        Some(_) => words.push("DAMAGED".into()),
        None => {}
    }
    match &state.drill {
        Some(d) if d.passed => words.push(format!("drill passed {}", when(d.at))),
        Some(d) => words.push(format!("DRILL FAILED {}", when(d.at))),
        None => {}
    }
    words.join("; ")
}

fn state_json(states: &PointStates, m: &PointManifest) -> serde_json::Value {
    match states.get(&m.vm, &m.point) {
        Err(e) => serde_json::json!({ "error": e.to_string() }),
        Ok(s) => serde_json::json!({
            "deleted": s.deleted,
            "locked_until": s.locked_until,
            "retain_until": s.retain_until,
            "verified": s.verified,
            "snapshot": s.snapshot,
            "drill": s.drill,
            "boot_reads": s.boot_reads.as_ref().map(|r| serde_json::json!({
                "at": r.at,
                "runs": r.runs.len(),
                "blocks": r.runs.iter().map(|(_, n)| *n).fold(0u64, u64::saturating_add),
            })),
            "other": s.other,
        }),
    }
}
