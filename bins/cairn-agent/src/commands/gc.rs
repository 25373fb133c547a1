//! `cairn-agent gc` and `repair index`: the vault's upkeep.

use anyhow::{Context, bail};
use cairn_vault::{GcOptions, GcReport};

use crate::cli::{GcArgs, RepairIndexArgs};
use crate::output::{Exit, print_json};
use crate::units::bytes;

pub async fn run(args: GcArgs, json: bool) -> anyhow::Result<Exit> {
    if !(0.0..=100.0).contains(&args.repack_below) {
        bail!("--repack-below {} is not a percentage from 0 to 100", args.repack_below);
    }
    let vault = super::open_vault(&args.vault).await?;
    let options = GcOptions {
        dry_run: args.dry_run,
        stale_after: args.stale_after,
        repack_below: args.repack_below / 100.0,
        wait: !args.no_wait,
        ..GcOptions::default()
    };
    let say = |s: &str| {
        if !json {
            eprintln!("{s}");
        }
    };
    let clock = std::time::Instant::now();
    let report =
        vault.gc(&options, &say).await.with_context(|| format!("collecting {}", vault.url()))?;
    let secs = clock.elapsed().as_secs_f64();
    if json {
        print_json(&report_json(&report, args.dry_run, secs));
    } else {
        print_report(&report, args.dry_run, secs);
    }
    Ok(if report.bad_copies.is_empty() { Exit::Ok } else { Exit::Damaged })
}

fn print_report(r: &GcReport, dry_run: bool, secs: f64) {
    println!(
        "{} point(s) keep their chunks; the vault held {} pack(s), {}",
        r.points,
        r.packs_before,
        bytes(r.bytes_before)
    );
    if dry_run {
        println!(
            "would delete {} dead pack(s) and repack {} mostly-dead one(s): {} in condemned packs",
            r.packs_dead,
            r.packs_repacked,
            bytes(r.bytes_condemned)
        );
        return;
    }
    println!(
        "deleted {} dead pack(s), repacked {} ({} chunk(s) copied into {}): {} freed in {secs:.1}s",
        r.packs_dead,
        r.packs_repacked,
        r.chunks_copied,
        bytes(r.bytes_written),
        bytes(r.bytes_deleted.saturating_sub(r.bytes_written)),
    );
    if !r.reaped.is_empty() {
        println!("reaped {} stale backup(s): {:?}", r.reaped.len(), r.reaped);
    }
    if !r.waited_for.is_empty() {
        println!(
            "waited {:.1}s for {} backup(s) that started before the plan",
            r.waited.as_secs_f64(),
            r.waited_for.len()
        );
    }
    for p in &r.pending {
        println!("plan {p} is pending: a later gc run finishes it");
    }
    for (chunk, pack, why) in &r.bad_copies {
        println!(
            "BAD: chunk {chunk} in pack {pack} was damaged ({why}) and not copied: the points \
             that need it are damaged until a backup stores that block again; run `cairn-agent \
             verify` to name them"
        );
    }
}

fn report_json(r: &GcReport, dry_run: bool, secs: f64) -> serde_json::Value {
    serde_json::json!({
        "dry_run": dry_run,
        "run": r.run,
        "points": r.points,
        "packs_before": r.packs_before,
        "bytes_before": r.bytes_before,
        "packs_dead": r.packs_dead,
        "packs_repacked": r.packs_repacked,
        "bytes_condemned": r.bytes_condemned,
        "bytes_deleted": r.bytes_deleted,
        "bytes_written": r.bytes_written,
        "chunks_copied": r.chunks_copied,
        "indexes_rewritten": r.indexes_rewritten,
        "reaped": r.reaped,
        "done_markers_removed": r.done_markers_removed,
        "waited_for": r.waited_for,
        "waited_seconds": r.waited.as_secs_f64(),
        "pending": r.pending,
        "orphan_notes_removed": r.orphan_notes_removed,
        "strays_removed": r.strays_removed,
        "bad_copies": r.bad_copies.iter().map(|(c, p, w)| serde_json::json!({"chunk": c, "pack": p, "why": w})).collect::<Vec<_>>(),
        "seconds": secs,
    })
}

pub async fn repair_index(args: RepairIndexArgs, json: bool) -> anyhow::Result<Exit> {
    let vault = super::open_vault(&args.vault).await?;
    let r = vault
        .repair_index(args.dry_run)
        .await
        .with_context(|| format!("repairing the pack indexes of {}", vault.url()))?;
    if json {
        let left: Vec<_> = r
            .left_out
            .iter()
            .map(|(p, why)| serde_json::json!({ "pack": p, "why": why }))
            .collect();
        print_json(&serde_json::json!({
            "dry_run": args.dry_run, "packs": r.packs, "unindexed": r.unindexed,
            "recovered_packs": r.recovered_packs, "recovered_chunks": r.recovered_chunks,
            "left_out": left, "index": r.index,
        }));
    } else {
        println!(
            "{} pack(s), {} named by no readable pack index; {} {} ({} chunk(s)){}",
            r.packs,
            r.unindexed,
            if args.dry_run { "would index" } else { "indexed" },
            r.recovered_packs,
            r.recovered_chunks,
            r.index.as_ref().map(|i| format!(" in {i}")).unwrap_or_default()
        );
        for (pack, why) in &r.left_out {
            println!("left out of pack {pack}: {why}");
        }
    }
    Ok(if r.left_out.is_empty() { Exit::Ok } else { Exit::Damaged })
}
