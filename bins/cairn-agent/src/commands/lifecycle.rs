//! `cairn-agent prune`, `delete`, `undelete` and `lock`: the life of points after their commit.

use anyhow::Context;
use cairn_backup::{Action, PruneOptions, PruneReport};
use jiff::Timestamp;

use crate::cli::{DeleteArgs, LockArgs, PointArg, PruneArgs, UndeleteArgs};
use crate::output::{Exit, print_json, table};
use crate::units::when;

pub async fn prune(args: PruneArgs, json: bool) -> anyhow::Result<Exit> {
    let retention = args.retention.retention();
    retention.check()?;
    let vault = super::open_vault(&args.vault).await?;
    let options = PruneOptions {
        retention,
        vm: args.vm.as_deref().map(super::vm_name).transpose()?,
        grace: args.grace,
        dry_run: args.dry_run,
        now: Timestamp::now(),
        purge_only: None,
    };
    let report = cairn_backup::prune(&vault, &options)
        .await
        .with_context(|| format!("pruning {}", vault.url()))?;
    if json {
        print_json(&report_json(&report, args.dry_run));
    } else {
        print_report(&report, args.dry_run, args.grace);
    }
    Ok(if report.skipped_vms.is_empty() { Exit::Ok } else { Exit::Damaged })
}

fn action_words(action: &Action, dry_run: bool) -> (&'static str, String) {
    let would = |done: &'static str, would: &'static str| if dry_run { would } else { done };
    match action {
        Action::Keep(reasons) => ("keep", reasons.join(", ")),
        Action::Expire => (would("expired", "would expire"), "no rule keeps it".into()),
        Action::InGrace(until) => {
            ("in grace", format!("soft-deleted; purged after {}", when(*until)))
        }
        Action::Purge => (would("purged", "would purge"), "its grace time has passed".into()),
        Action::Locked(until) => {
            ("in grace", format!("soft-deleted, locked until {}", when(*until)))
        }
        Action::Unknown(why) => ("keep", format!("state unknown: {why}")),
        Action::Unconfirmed => ("keep", "soft-deleted by another writer: not purged here".into()),
    }
}

fn print_report(report: &PruneReport, dry_run: bool, grace: jiff::SignedDuration) {
    let rows: Vec<Vec<String>> = report
        .points
        .iter()
        .map(|p| {
            let (what, why) = action_words(&p.action, dry_run);
            vec![p.vm.to_string(), p.point.to_string(), what.into(), why]
        })
        .collect();
    if rows.is_empty() {
        println!("no recovery points");
    } else {
        println!("{}", table(&["VM", "POINT", "ACTION", "WHY"], &rows));
    }
    let expired = report.count(|a| *a == Action::Expire);
    let purged = report.count(|a| *a == Action::Purge);
    let kept = report.count(|a| matches!(a, Action::Keep(_) | Action::Unknown(_)));
    let verb = if dry_run { "would be" } else { "were" };
    println!(
        "{kept} point(s) kept; {expired} {verb} soft-deleted (restorable by id, `undelete` brings \
         them back, purged after {}); {purged} {verb} purged (`gc` frees their space)",
        crate::units::duration(grace)
    );
    for (vm, why) in &report.skipped_vms {
        println!("VM {vm} left alone: {why}");
    }
}

fn report_json(report: &PruneReport, dry_run: bool) -> serde_json::Value {
    let points: Vec<_> = report
        .points
        .iter()
        .map(|p| {
            let (what, why) = action_words(&p.action, dry_run);
            serde_json::json!({ "vm": p.vm, "point": p.point, "time": p.time, "action": what, "why": why })
        })
        .collect();
    let skipped: Vec<_> = report
        .skipped_vms
        .iter()
        .map(|(vm, why)| serde_json::json!({ "vm": vm, "why": why }))
        .collect();
    serde_json::json!({ "dry_run": dry_run, "points": points, "skipped_vms": skipped })
}

/// The vault, VM and point an argument names.
async fn target(
    arg: &PointArg,
) -> anyhow::Result<(cairn_vault::Vault, cairn_format::Name, cairn_format::PointId)> {
    let vm = super::vm_name(&arg.vm)?;
    let point = arg.point.parse().with_context(|| {
        format!("--point {:?} (give a point id from `cairn-agent points`)", arg.point)
    })?;
    Ok((super::open_vault(&arg.vault).await?, vm, point))
}

pub async fn delete(args: DeleteArgs, json: bool) -> anyhow::Result<Exit> {
    let (vault, vm, point) = target(&args.target).await?;
    let deletion = vault
        .soft_delete(
            &vm,
            &point,
            "deleted by hand (cairn-agent delete)",
            args.grace,
            Timestamp::now(),
        )
        .await?;
    if json {
        print_json(&serde_json::json!({ "vm": vm, "point": point, "deleted": deletion }));
    } else {
        println!(
            "point {point} of VM {vm} is soft-deleted: it still restores by id, `cairn-agent \
             undelete` brings it back, and a prune after {} purges it",
            when(deletion.purge_after)
        );
    }
    Ok(Exit::Ok)
}

pub async fn undelete(args: UndeleteArgs, json: bool) -> anyhow::Result<Exit> {
    let (vault, vm, point) = target(&args.target).await?;
    let was_deleted = vault.undelete(&vm, &point, args.retain_until).await?;
    if json {
        print_json(&serde_json::json!({ "vm": vm, "point": point, "was_deleted": was_deleted }));
    } else if was_deleted {
        let kept =
            args.retain_until.map(|t| format!(", kept until {}", when(t))).unwrap_or_default();
        println!("point {point} of VM {vm} is back{kept}");
        if args.retain_until.is_none() {
            println!(
                "note: the next prune with the same rules expires it again; give --retain-until \
                 TIME to keep it"
            );
        }
    } else {
        println!("point {point} of VM {vm} was not deleted; nothing to do");
    }
    Ok(Exit::Ok)
}

pub async fn lock(args: LockArgs, json: bool) -> anyhow::Result<Exit> {
    let (vault, vm, point) = target(&args.target).await?;
    let state = vault.lock_point(&vm, &point, args.until).await?;
    let until = state.locked_until.unwrap_or(args.until);
    if json {
        print_json(&serde_json::json!({ "vm": vm, "point": point, "locked_until": until }));
    } else {
        println!("point {point} of VM {vm} is locked until {}", when(until));
        if until > args.until {
            println!("(an earlier lock runs longer; a lock is never shortened)");
        }
    }
    Ok(Exit::Ok)
}
