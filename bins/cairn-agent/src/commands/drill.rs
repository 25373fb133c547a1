//! `cairn-agent drill`.

use std::sync::Arc;

use anyhow::Context;
use std::path::PathBuf;

use cairn_backup::{CheckOutcome, DrillMethod, DrillOptions, DrillReport};

use crate::cli::DrillArgs;
use crate::output::{Bars, Exit, print_json};
use crate::units::bytes;

pub async fn run(args: DrillArgs, json: bool) -> anyhow::Result<Exit> {
    let method = if args.read_files { DrillMethod::ReadFiles } else { DrillMethod::Restore };
    // Only a drill that restores runs the checker.
    let e2fsck = match (method, args.e2fsck) {
        (DrillMethod::ReadFiles, _) => PathBuf::new(),
        (DrillMethod::Restore, Some(path)) => path,
        (DrillMethod::Restore, None) => cairn_backup::find_e2fsck().context(
            "e2fsck was not found in /usr/sbin or /sbin: install e2fsprogs, or give --e2fsck \
             PATH (or drill with --read-files, which runs no checker)",
        )?,
    };
    if method == DrillMethod::Restore && !e2fsck.is_file() {
        anyhow::bail!(
            "the file system checker {} does not exist: install e2fsprogs, or give --e2fsck PATH",
            e2fsck.display()
        );
    }
    let (vault, manifest) = super::open_point(&args.from).await?;
    let options = DrillOptions {
        work_dir: args.work_dir,
        sample_blocks: args.sample_blocks,
        e2fsck,
        record: !args.no_record,
        method,
    };
    let bars = Arc::new(Bars::new(json, "drill"));
    // Ctrl-C or SIGTERM drops the drill, which removes its copy and stops the checker.
    let stop = super::stop_signal();
    let report = tokio::select! {
        report = cairn_backup::drill(&vault, &manifest, &options, bars) => report?,
        why = stop => anyhow::bail!("drill {why}: its copy was removed, nothing noted"),
    };
    if json {
        print_json(&report_json(&report));
    } else {
        print_report(&report);
    }
    Ok(if report.passed { Exit::Ok } else { Exit::Damaged })
}

fn report_json(r: &DrillReport) -> serde_json::Value {
    let disks: Vec<_> = r
        .disks
        .iter()
        .map(|d| {
            let volumes: Vec<_> = d
                .volumes
                .iter()
                .map(|v| {
                    let (outcome, detail) = match &v.outcome {
                        CheckOutcome::Clean => ("clean", String::new()),
                        CheckOutcome::Failed(why) => ("failed", why.clone()),
                        CheckOutcome::NotChecked(why) => ("not-checked", why.clone()),
                    };
                    serde_json::json!({
                        "volume": v.volume, "fs": v.fs, "outcome": outcome, "detail": detail,
                    })
                })
                .collect();
            let (restored, error, damaged) = match &d.restore {
                Ok(s) => (Some(s.bytes_written), None, s.damaged.len()),
                Err(e) => (None, Some(e.clone()), 0),
            };
            serde_json::json!({
                "disk": d.disk, "passed": d.passed(), "bytes_restored": restored,
                "restore_error": error, "damaged_ranges": damaged, "sampled_blocks": d.sampled,
                "mismatched_offsets": d.mismatched, "volumes": volumes,
            })
        })
        .collect();
    serde_json::json!({
        "vm": r.vm, "point": r.point, "method": r.method.name(), "passed": r.passed,
        "summary": r.summary,
        "recorded": r.recorded, "disks": disks,
    })
}

fn print_report(r: &DrillReport) {
    for d in &r.disks {
        let read = match r.method {
            DrillMethod::Restore => "restored",
            DrillMethod::ReadFiles => "read from the vault",
        };
        match &d.restore {
            Ok(s) => println!(
                "disk {}: {read} ({}{} chunks), {} sampled block(s) compared, {} differ",
                d.disk,
                match r.method {
                    DrillMethod::Restore => format!("{} of data, ", bytes(s.bytes_written)),
                    DrillMethod::ReadFiles => String::new(),
                },
                s.chunks,
                d.sampled,
                d.mismatched.len()
            ),
            Err(e) => println!("disk {}: NOT {}: {e}", d.disk, read.to_uppercase()),
        }
        if let Ok(s) = &d.restore {
            for gap in &s.damaged {
                println!("  DAMAGED: {} at offset {}: {}", bytes(gap.len), gap.offset, gap.detail);
            }
        }
        for v in &d.volumes {
            match &v.outcome {
                CheckOutcome::Clean => match r.method {
                    DrillMethod::Restore => println!("  {} ({}): e2fsck clean", v.volume, v.fs),
                    DrillMethod::ReadFiles => {
                        println!("  {} ({}): every file read back", v.volume, v.fs)
                    }
                },
                CheckOutcome::Failed(why) => println!("  {} ({}): FAILED: {why}", v.volume, v.fs),
                CheckOutcome::NotChecked(why) => {
                    println!("  {} ({}): not checked: {why}", v.volume, v.fs)
                }
            }
        }
    }
    let verdict = if r.passed { "PASSED" } else { "FAILED" };
    let noted = if r.recorded { "noted on the point" } else { "not noted (--no-record)" };
    println!("drill of point {} of VM {}: {verdict} ({}); {noted}", r.point, r.vm, r.summary);
}
