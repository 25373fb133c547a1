//! Restores through the coordinator: an operator asks for a point of a VM; the catalogue
//! queues a `restore` job for the agent of the VM's host, which reads the point from the VM's
//! vault and writes its disks into a new folder of its own restore folder. The request is in
//! the audit log (by the API), and the job shows what its agent wrote.
//!
//! Only points in a vault are restored this way: a point in the snapshot tier alone is
//! restored on its host (`cairn-agent held restore`).

use cairn_protocol::{Report, RestoreOrder};
use jiff::Timestamp;
use rusqlite::{OptionalExtension, params};

use crate::catalogue::ts;
use crate::{Catalogue, Error, ReportOutcome};

impl Catalogue {
    /// Queues a restore of `vm`'s point `point` (none: its newest in a vault), one disk or
    /// all, into the folder `to` of its host's restore folder. Returns the job id and the
    /// order its agent gets.
    pub fn restore(
        &mut self,
        vm: &str,
        point: Option<&str>,
        disk: Option<&str>,
        to: &str,
        now: Timestamp,
    ) -> Result<(u64, RestoreOrder), Error> {
        let what = format!("queueing a restore of VM {vm}");
        let host: Option<String> = self
            .conn
            .query_row("SELECT host FROM vms WHERE name = ?1", [vm], |r| r.get(0))
            .optional()
            .map_err(Error::sql(what.clone()))?;
        let Some(host) = host else {
            return Err(Error::Unknown {
                kind: "VM",
                name: vm.into(),
                hint: "list VMs with `vms`",
            });
        };
        let point = match point {
            Some(p) => {
                let found: Option<(String, Option<i64>)> = self
                    .conn
                    .query_row(
                        "SELECT tier, expired_at FROM points WHERE vm = ?1 AND point = ?2",
                        params![vm, p],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()
                    .map_err(Error::sql(what.clone()))?;
                match found {
                    None => {
                        return Err(Error::Unknown {
                            kind: "point",
                            name: p.into(),
                            hint: "list the VM's points with `points --vm NAME`",
                        });
                    }
                    Some((_, Some(_))) => {
                        return Err(Error::Refused(format!(
                            "point {p} of VM {vm} has expired (deleted in its vault): restore \
                             another point"
                        )));
                    }
                    Some((tier, None)) if tier == "snapshot" => {
                        return Err(Error::Refused(format!(
                            "point {p} of VM {vm} is not in its vault yet (tier snapshot): \
                             restore it on host {host} with `cairn-agent held restore`, or \
                             wait for its transfer"
                        )));
                    }
                    Some(_) => p.to_owned(),
                }
            }
            None => self
                .conn
                .query_row(
                    "SELECT point FROM points WHERE vm = ?1 AND expired_at IS NULL
                         AND tier != 'snapshot' ORDER BY captured_at DESC LIMIT 1",
                    [vm],
                    |r| r.get(0),
                )
                .optional()
                .map_err(Error::sql(what.clone()))?
                .ok_or_else(|| {
                    Error::Refused(format!(
                        "VM {vm} has no point in a vault yet: nothing to restore"
                    ))
                })?,
        };
        let order = RestoreOrder { point, disk: disk.map(str::to_owned), to: to.to_owned() };
        if let Some(problem) = order.problem() {
            return Err(Error::Refused(problem));
        }
        // Each restore gets a new folder: one another restore on the same host took (or is
        // taking) is refused here, before the agent refuses it.
        let taken: Option<i64> = self
            .conn
            .query_row(
                "SELECT j.id FROM jobs j JOIN vms v ON v.name = j.vm
                 WHERE j.kind = 'restore' AND v.host = ?1 AND j.state != 'failed'
                   AND json_extract(j.restore, '$.to') = ?2",
                params![host, to],
                |r| r.get(0),
            )
            .optional()
            .map_err(Error::sql(what.clone()))?;
        if let Some(other) = taken {
            return Err(Error::Refused(format!(
                "restore job {other} already writes to folder {to} on host {host}: give \
                 another folder name"
            )));
        }
        let json = serde_json::to_string(&order).map_err(|e| Error::Refused(e.to_string()))?;
        let id: i64 = self
            .conn
            .query_row(
                "INSERT INTO jobs (vm, kind, scheduled_at, start_at, state, restore, created_at,
                     updated_at)
                 VALUES (?1, 'restore', ?2, ?2, 'queued', ?3, ?2, ?2) RETURNING id",
                params![vm, ts(now), json],
                |r| r.get(0),
            )
            .map_err(|e| same_instant(e, vm, &what))?;
        Ok((id.unsigned_abs(), order))
    }
}

/// A job of the same VM and kind queued in the same millisecond is refused by the jobs'
/// uniqueness: said so, rather than as a database failure.
pub(crate) fn same_instant(e: rusqlite::Error, vm: &str, what: &str) -> Error {
    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) {
        return Error::Refused(format!(
            "another job of VM {vm} was queued at the same instant: ask again"
        ));
    }
    Error::Sql { what: what.to_owned(), source: e }
}

/// Notes a restore job's end in the audit log, as its agent's host's doing.
fn audit(
    tx: &rusqlite::Transaction<'_>,
    vm: &str,
    id: i64,
    details: &str,
    now: Timestamp,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO audit (at, who, action, details)
         SELECT ?1, coalesce(j.claimed_by, v.host), 'restore-ended', ?2
         FROM jobs j JOIN vms v ON v.name = j.vm WHERE j.id = ?3",
        params![ts(now), format!("VM {vm}, job {id}: {details}"), id],
    )
    .map(|_| ())
}

/// Records `report` on restore job `id` of `vm`, whose state is `state`.
pub(crate) fn record(
    tx: &rusqlite::Transaction<'_>,
    id: u64,
    vm: &str,
    state: &str,
    report: &Report,
    now: Timestamp,
) -> rusqlite::Result<ReportOutcome> {
    if report.state == "running" {
        if state != "running" {
            return Ok(ReportOutcome::Ended);
        }
        crate::agents::record_progress(tx, id, report, now)?;
        return Ok(ReportOutcome::Recorded);
    }
    let id = id as i64;
    let progress = report.progress.as_ref().map(|p| p.to_string());
    match report.state.as_str() {
        "done" => {
            let Some(restored) = &report.restored else {
                return Ok(ReportOutcome::Invalid(
                    "a done restore report says what it wrote".into(),
                ));
            };
            let order: Option<String> =
                tx.query_row("SELECT restore FROM jobs WHERE id = ?1", [id], |r| r.get(0))?;
            let order: Option<RestoreOrder> = order.and_then(|o| serde_json::from_str(&o).ok());
            if order.is_none_or(|o| o.point != restored.point) {
                return Ok(ReportOutcome::Invalid(format!(
                    "job {id} restores another point than {}",
                    restored.point
                )));
            }
            let json = serde_json::to_string(restored).unwrap_or_default();
            if state != "done" {
                let files: Vec<&str> = restored.disks.iter().map(|d| d.path.as_str()).collect();
                audit(
                    tx,
                    vm,
                    id,
                    &format!("point {} to {}", restored.point, files.join(", ")),
                    now,
                )?;
            }
            tx.execute(
                "UPDATE jobs SET state = 'done', phase = 'done', reason = NULL, restored = ?2,
                     progress = coalesce(?3, progress), finished_at = ?4, updated_at = ?4
                 WHERE id = ?1",
                params![id, json, progress, ts(now)],
            )?;
        }
        "failed" => {
            if state == "done" {
                return Ok(ReportOutcome::Ended);
            }
            let reason = report.reason.clone().unwrap_or_else(|| "no reason given".into());
            let first = state != "failed";
            crate::agents::fail_job(tx, id.unsigned_abs(), "restore", vm, &reason, first, now)?;
            if first {
                audit(tx, vm, id, &format!("failed: {reason}"), now)?;
            }
        }
        other => {
            return Ok(ReportOutcome::Invalid(format!(
                "state {other:?}: give running, done or failed"
            )));
        }
    }
    Ok(ReportOutcome::Recorded)
}

#[cfg(test)]
mod tests {
    use cairn_protocol::{PointReport, RestoreReport, RestoredDisk};

    use super::*;
    use crate::testing::{at, catalogue, restores};
    use crate::{JobState, dispatch};

    fn done(point: &str) -> Report {
        Report {
            state: "done".into(),
            point: Some(PointReport {
                id: point.into(),
                captured_at: at("2026-06-01T02:01:00Z"),
                consistency: "crash".into(),
                ..PointReport::default()
            }),
            ..Report::default()
        }
    }

    #[test]
    fn a_restore_is_checked_queued_handed_to_the_vms_host_and_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = catalogue(&dir, &[("web-1", true)], "v");
        let now = at("2026-06-01T03:00:00Z");
        // No point yet: nothing to restore.
        let e = c.restore("web-1", None, None, "drill-1", now).unwrap_err();
        assert!(e.to_string().contains("no point"), "{e}");
        let backup = c.back_up_now("web-1", None, now).unwrap();
        let limits = cairn_policy::Limits { per_host: 4, per_datastore: 4, per_vault: 4 };
        dispatch(&mut c, &limits, now).unwrap();
        c.claim("kvm-1", &[], &restores(), now).unwrap();
        let point = "20260601T020100.000Z-0123abcd";
        assert_eq!(c.report("kvm-1", backup, &done(point), now).unwrap(), ReportOutcome::Recorded);

        // Bad requests name what is wrong.
        type Case<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a str, &'a str);
        let cases: [Case; 4] = [
            ("web-9", None, None, "d", "no VM"),
            ("web-1", Some("20260101T000000.000Z-0123abce"), None, "d", "no point"),
            ("web-1", None, None, "../etc", "folder"),
            ("web-1", None, Some("a/b"), "d", "disk"),
        ];
        for (vm, p, disk, to, says) in cases {
            let e = c.restore(vm, p, disk, to, now).unwrap_err().to_string();
            assert!(e.contains(says), "{says}: {e}");
        }

        let later = at("2026-06-01T03:05:00Z");
        let (id, order) = c.restore("web-1", None, Some("root"), "drill-1", later).unwrap();
        assert_eq!((order.point.as_str(), order.disk.as_deref()), (point, Some("root")));
        // The same folder on the same host again: refused while that job stands.
        let e = c.restore("web-1", Some(point), None, "drill-1", later).unwrap_err();
        assert!(e.to_string().contains("already writes to folder drill-1"), "{e}");

        dispatch(&mut c, &limits, later).unwrap();
        assert!(
            c.claim("kvm-2", &[], &restores(), later).unwrap().jobs.is_empty(),
            "another host's"
        );
        let orders = c.claim("kvm-1", &[], &restores(), later).unwrap();
        assert_eq!(orders.jobs.len(), 1);
        assert_eq!(
            (orders.jobs[0].kind.as_str(), orders.jobs[0].restore.as_ref()),
            ("restore", Some(&order))
        );

        // Another host's report is not taken; a done report must say what it wrote.
        let running =
            Report { state: "running".into(), phase: Some("restore".into()), ..Report::default() };
        assert_eq!(c.report("kvm-2", id, &running, later).unwrap(), ReportOutcome::NotYours);
        assert_eq!(c.report("kvm-1", id, &running, later).unwrap(), ReportOutcome::Recorded);
        let bare = Report { state: "done".into(), ..Report::default() };
        assert!(matches!(c.report("kvm-1", id, &bare, later).unwrap(), ReportOutcome::Invalid(_)));
        let restored = RestoreReport {
            point: point.into(),
            disks: vec![RestoredDisk {
                disk: "root".into(),
                path: "/var/lib/cairn/restores/drill-1/root".into(),
                size: 8 << 20,
                bytes_written: 1 << 20,
            }],
        };
        let wrong =
            RestoreReport { point: "20260101T000000.000Z-0123abce".into(), ..restored.clone() };
        let report = |r: RestoreReport| Report {
            state: "done".into(),
            restored: Some(r),
            ..Report::default()
        };
        assert!(matches!(
            c.report("kvm-1", id, &report(wrong), later).unwrap(),
            ReportOutcome::Invalid(_)
        ));
        assert_eq!(
            c.report("kvm-1", id, &report(restored.clone()), later).unwrap(),
            ReportOutcome::Recorded
        );
        let job = c.jobs(Some("web-1")).unwrap().into_iter().find(|j| j.id == id).unwrap();
        assert_eq!(job.state, JobState::Done);
        assert_eq!(job.restored, Some(restored));
        // No point was added by the restore, and the end is in the audit log.
        assert_eq!(c.points(Some("web-1")).unwrap().len(), 1);
        let log = c.audit_log().unwrap();
        assert!(
            log.iter().any(|(_, who, action, d)| who == "kvm-1"
                && action == "restore-ended"
                && d.contains("drill-1/root")),
            "{log:?}"
        );
    }

    #[test]
    fn a_failed_restore_raises_an_alert_and_frees_its_folder_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = catalogue(&dir, &[("web-1", true)], "v");
        let now = at("2026-06-01T03:00:00Z");
        let backup = c.back_up_now("web-1", None, now).unwrap();
        let limits = cairn_policy::Limits { per_host: 4, per_datastore: 4, per_vault: 4 };
        dispatch(&mut c, &limits, now).unwrap();
        c.claim("kvm-1", &[], &restores(), now).unwrap();
        let point = "20260601T020100.000Z-0123abcd";
        c.report("kvm-1", backup, &done(point), now).unwrap();
        let (id, _) = c.restore("web-1", Some(point), None, "drill-2", now).unwrap();
        dispatch(&mut c, &limits, now).unwrap();
        c.claim("kvm-1", &[], &restores(), now).unwrap();
        let failed =
            Report { state: "failed".into(), reason: Some("no space".into()), ..Report::default() };
        assert_eq!(c.report("kvm-1", id, &failed, now).unwrap(), ReportOutcome::Recorded);
        let alerts = c.alerts().unwrap();
        assert!(
            alerts
                .iter()
                .any(|a| a.2.contains(&format!("restore job {id}")) && a.2.contains("no space")),
            "{alerts:?}"
        );
        // The standing of the VM still follows its backups.
        assert_eq!(c.standings(now).unwrap()[0].last_job_state.as_deref(), Some("done"));
        // The name may be used again; an agent that does not say it restores is not handed
        // the job, which fails saying why.
        let later = at("2026-06-01T03:00:01Z");
        let (old, _) = c.restore("web-1", Some(point), None, "drill-2", later).unwrap();
        dispatch(&mut c, &limits, later).unwrap();
        assert!(c.claim("kvm-1", &[], &[], later).unwrap().jobs.is_empty());
        let job = c.jobs(Some("web-1")).unwrap().into_iter().find(|j| j.id == old).unwrap();
        assert_eq!(job.state, JobState::Failed);
        assert!(job.reason.unwrap().contains("does not run restore jobs"));
    }
}
