//! Retention and space on schedule: which rules apply to which VM of a vault, when each
//! vault's upkeep is due, and what the catalogue learns from an upkeep, a rescan or a deletion.
//! The vault stays the source of truth: the catalogue only mirrors what a [`VaultKeeper`] did
//! or found.
//!
//! [`VaultKeeper`]: crate::VaultKeeper

use std::collections::HashSet;

use cairn_policy::{Retention, Schedule};
use jiff::Timestamp;
use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use crate::catalogue::{parse_ts, ts};
use crate::keeper::{Fate, FoundPoint, UpkeepReport, VmRule};
use crate::{Catalogue, Error};

/// The rule for a VM that no policy prunes (protection stopped, keeping its data): every live
/// point is kept, and only points already soft-deleted are purged once their grace is over.
pub fn keep_everything() -> Retention {
    Retention { keep_last: Some(u32::MAX), ..Retention::default() }
}

/// One upkeep run as the catalogue records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UpkeepRun {
    /// Its id.
    pub id: u64,
    /// The vault.
    pub vault: String,
    /// The upkeep time it was for (or when it was asked for).
    pub scheduled_at: Timestamp,
    /// When it started.
    pub started_at: Timestamp,
    /// When it ended.
    pub finished_at: Option<Timestamp>,
    /// `running`, `done` or `failed`.
    pub state: String,
    /// `schedule`, or the user who asked.
    pub who: String,
    /// One line: what it did, or why it failed.
    pub summary: Option<String>,
    /// Every point's fate and what the collector freed.
    pub report: Option<serde_json::Value>,
}

/// What a rescan changed in the catalogue.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RescanSummary {
    /// The vault.
    pub vault: String,
    /// Points the vault holds.
    pub found: u64,
    /// Points added to the catalogue.
    pub added: u64,
    /// Points whose state (soft-deleted or not) changed.
    pub updated: u64,
    /// Points the catalogue listed and the vault no longer holds.
    pub removed: u64,
}

fn meta_key(vault: &str) -> String {
    format!("upkeep-next:{vault}")
}

impl Catalogue {
    /// Each VM of `vault` with the rule that prunes it: its policy's retention when
    /// protected, keep-everything when its protection is stopped; and the points it may purge:
    /// those this catalogue marked expired at least `grace` before `now`.
    pub fn upkeep_rules(
        &self,
        vault: &str,
        grace: jiff::SignedDuration,
        now: Timestamp,
    ) -> Result<Vec<VmRule>, Error> {
        let what = format!("reading the VMs of vault {vault}");
        let mut stmt = self
            .conn
            .prepare("SELECT name, policy, protected FROM vms WHERE vault = ?1 ORDER BY name")
            .map_err(Error::sql(what.clone()))?;
        let rows: Vec<(String, Option<String>, bool)> = stmt
            .query_map([vault], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(Error::sql(what.clone()))?
            .collect::<Result<_, _>>()
            .map_err(Error::sql(what.clone()))?;
        let ripe = now.checked_sub(grace).unwrap_or(Timestamp::MIN);
        let mut purgeable = self
            .conn
            .prepare(
                "SELECT point FROM points
                 WHERE vm = ?1 AND vault = ?2 AND expired_at IS NOT NULL AND expired_at <= ?3",
            )
            .map_err(Error::sql(what.clone()))?;
        let mut out = Vec::with_capacity(rows.len());
        for (vm, policy, protected) in rows {
            let retention = match (protected, policy) {
                (true, Some(policy)) => self.policy(&policy)?.spec.retention,
                _ => keep_everything(),
            };
            let points = purgeable
                .query_map(params![vm, vault, ts(ripe)], |r| r.get(0))
                .map_err(Error::sql(what.clone()))?
                .collect::<Result<_, _>>()
                .map_err(Error::sql(what.clone()))?;
            out.push(VmRule { vm, retention, purgeable: points });
        }
        Ok(out)
    }

    /// The upkeep time of `vault` that is due at `now`, if any. The first call only records
    /// the next time; times missed while the coordinator was down make one run.
    pub fn upkeep_due(
        &mut self,
        vault: &str,
        schedule: &Schedule,
        now: Timestamp,
    ) -> Result<Option<Timestamp>, Error> {
        let what = format!("reading the upkeep time of vault {vault}");
        let next: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [meta_key(vault)], |r| r.get(0))
            .optional()
            .map_err(Error::sql(what.clone()))?;
        let next = next.and_then(|s| s.parse::<Timestamp>().ok());
        match next {
            Some(at) if at <= now => {
                // The latest upkeep time passed stands for every one missed.
                let latest = schedule.between(at, now).into_iter().last().unwrap_or(at);
                Ok(Some(latest))
            }
            // A stored time past the schedule's next one (the clock was once ahead) would
            // stop upkeep until then: the schedule wins.
            Some(at) if schedule.next_after(now).is_some_and(|next| at > next) => {
                self.set_upkeep_next(vault, schedule.next_after(now))?;
                Ok(None)
            }
            Some(_) => Ok(None),
            None => {
                self.set_upkeep_next(vault, schedule.next_after(now))?;
                Ok(None)
            }
        }
    }

    fn set_upkeep_next(&mut self, vault: &str, next: Option<Timestamp>) -> Result<(), Error> {
        let what = format!("recording the next upkeep time of vault {vault}");
        let Some(next) = next else {
            return Ok(());
        };
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![meta_key(vault), next.to_string()],
            )
            .map(|_| ())
            .map_err(Error::sql(what))
    }

    /// Records the start of an upkeep of `vault` for `scheduled_at`; a scheduled one also
    /// moves the vault's next upkeep time past `now`. Returns the run's id.
    pub fn start_upkeep(
        &mut self,
        vault: &str,
        scheduled_at: Timestamp,
        who: &str,
        schedule: Option<&Schedule>,
        now: Timestamp,
    ) -> Result<u64, Error> {
        if let Some(schedule) = schedule {
            self.set_upkeep_next(vault, schedule.next_after(now.max(scheduled_at)))?;
        }
        let id: i64 = self
            .conn
            .query_row(
                "INSERT INTO upkeep_runs (vault, scheduled_at, started_at, state, who)
                 VALUES (?1, ?2, ?3, 'running', ?4) RETURNING id",
                params![vault, ts(scheduled_at), ts(now), who],
                |r| r.get(0),
            )
            .map_err(Error::sql(format!("recording an upkeep of vault {vault}")))?;
        Ok(id.unsigned_abs())
    }

    /// Records how upkeep `id` ended and mirrors what it did: expired points are marked,
    /// purged ones leave the catalogue, even when part of the run failed. A failure raises an
    /// alert, and the vault's next upkeep comes within the hour.
    pub fn finish_upkeep(
        &mut self,
        id: u64,
        vault: &str,
        outcome: &Result<UpkeepReport, String>,
        now: Timestamp,
    ) -> Result<(), Error> {
        let what = format!("recording the end of upkeep {id} of vault {vault}");
        let empty = UpkeepReport::default();
        let (report, failure) = match outcome {
            Ok(r) if r.errors.is_empty() => (r, None),
            Ok(r) => (r, Some(r.errors.join("; "))),
            Err(e) => (&empty, Some(e.clone())),
        };
        let tx = self.conn.transaction().map_err(Error::sql(what.clone()))?;
        for p in &report.points {
            let keys = params![p.vm, p.point, vault];
            let done = match p.fate {
                Fate::Expired | Fate::InGrace | Fate::Locked => tx.execute(
                    "UPDATE points SET expired_at = coalesce(expired_at, ?4)
                     WHERE vm = ?1 AND point = ?2 AND vault = ?3",
                    params![p.vm, p.point, vault, ts(now)],
                ),
                Fate::Purged => tx
                    .execute("DELETE FROM points WHERE vm = ?1 AND point = ?2 AND vault = ?3", keys),
                Fate::Kept => tx.execute(
                    "UPDATE points SET expired_at = NULL WHERE vm = ?1 AND point = ?2 AND vault = ?3",
                    keys,
                ),
                Fate::Unknown => continue,
            };
            done.map_err(Error::sql(what.clone()))?;
        }
        let mut summary = format!(
            "{} point(s) kept, {} expired, {} purged, {} in grace, {} locked; {} pack(s) deleted \
             and {} repacked, {} byte(s) freed",
            report.count(&Fate::Kept),
            report.count(&Fate::Expired),
            report.count(&Fate::Purged),
            report.count(&Fate::InGrace),
            report.count(&Fate::Locked),
            report.packs_deleted,
            report.packs_repacked,
            report.bytes_freed
        );
        if let Some(failure) = &failure {
            summary = format!("{failure} ({summary})");
            tx.execute(
                "INSERT INTO alerts (kind, vm, message, raised_at)
                 VALUES ('failed-upkeep', NULL, ?1, ?2)",
                params![format!("upkeep of vault {vault} failed: {failure}"), ts(now)],
            )
            .map_err(Error::sql(what.clone()))?;
        }
        let json = serde_json::to_string(report).unwrap_or_default();
        tx.execute(
            "UPDATE upkeep_runs SET state = ?2, finished_at = ?3, summary = ?4, report = ?5
             WHERE id = ?1",
            params![
                id as i64,
                if failure.is_some() { "failed" } else { "done" },
                ts(now),
                summary,
                json
            ],
        )
        .map_err(Error::sql(what.clone()))?;
        tx.commit().map_err(Error::sql(what))?;
        if failure.is_some() {
            let soon = now.checked_add(jiff::SignedDuration::from_hours(1)).ok();
            let next: Option<Timestamp> = self
                .conn
                .query_row("SELECT value FROM meta WHERE key = ?1", [meta_key(vault)], |r| {
                    r.get::<_, String>(0)
                })
                .optional()
                .map_err(Error::sql("reading the next upkeep time"))?
                .and_then(|s| s.parse().ok());
            if let Some(soon) = soon.filter(|s| next.is_none_or(|n| *s < n)) {
                self.set_upkeep_next(vault, Some(soon))?;
            }
        }
        Ok(())
    }

    /// Marks upkeeps a stopped coordinator left running as failed (the vault's own
    /// operations are safe to cut; the next upkeep finishes the work).
    pub(crate) fn fail_interrupted_upkeeps(&mut self, now: Timestamp) -> Result<(), Error> {
        self.conn
            .execute(
                "UPDATE upkeep_runs SET state = 'failed', finished_at = ?1,
                     summary = 'the coordinator stopped during the run; the next upkeep goes on'
                 WHERE state = 'running'",
                [ts(now)],
            )
            .map(|_| ())
            .map_err(Error::sql("closing interrupted upkeeps"))
    }

    /// Upkeep runs, newest first (at most `limit`), without their reports.
    pub fn upkeep_runs(&self, limit: u32) -> Result<Vec<UpkeepRun>, Error> {
        self.runs_where("1 ORDER BY id DESC LIMIT ?1", limit.into(), false)
    }

    /// One upkeep run with its report.
    pub fn upkeep_run(&self, id: u64) -> Result<Option<UpkeepRun>, Error> {
        Ok(self.runs_where("id = ?1", id as i64, true)?.pop())
    }

    fn runs_where(&self, filter: &str, arg: i64, report: bool) -> Result<Vec<UpkeepRun>, Error> {
        let sql = format!(
            "SELECT id, vault, scheduled_at, started_at, finished_at, state, who, summary,
                    CASE WHEN {report} THEN report END
             FROM upkeep_runs WHERE {filter}"
        );
        let mut stmt = self.conn.prepare(&sql).map_err(Error::sql("listing upkeep runs"))?;
        let rows = stmt
            .query_map([arg], |r| {
                Ok(UpkeepRun {
                    id: r.get::<_, i64>(0)?.unsigned_abs(),
                    vault: r.get(1)?,
                    scheduled_at: parse_ts(r.get(2)?)?,
                    started_at: parse_ts(r.get(3)?)?,
                    finished_at: r.get::<_, Option<i64>>(4)?.map(parse_ts).transpose()?,
                    state: r.get(5)?,
                    who: r.get(6)?,
                    summary: r.get(7)?,
                    report: r
                        .get::<_, Option<String>>(8)?
                        .and_then(|s| serde_json::from_str(&s).ok()),
                })
            })
            .map_err(Error::sql("listing upkeep runs"))?;
        rows.collect::<Result<_, _>>().map_err(Error::sql("listing upkeep runs"))
    }

    /// The catalogue's points of `vault`, as (VM, point): what a rescan may remove, read
    /// before the vault is scanned so that points reported meanwhile stay.
    pub fn points_of_vault(&self, vault: &str) -> Result<HashSet<(String, String)>, Error> {
        let what = format!("listing the points of vault {vault}");
        let mut stmt = self
            .conn
            // A snapshot-tier point is not in the vault yet: a rescan leaves it be.
            .prepare("SELECT vm, point FROM points WHERE vault = ?1 AND tier != 'snapshot'")
            .map_err(Error::sql(what.clone()))?;
        let rows = stmt
            .query_map([vault], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(Error::sql(what.clone()))?;
        rows.collect::<Result<_, _>>().map_err(Error::sql(what))
    }

    /// Makes the catalogue's points of `vault` what the vault holds: adds the points it
    /// lacks, marks soft-deleted ones and the tier, and drops those of `known_before` the
    /// vault no longer has. A point is linked to a job only when this catalogue's done backup
    /// job for that VM and scheduled time has no point. A vault that lists nothing while the
    /// catalogue had points there is refused unless `force` (a wrong URL would empty it).
    pub fn rescan(
        &mut self,
        vault: &str,
        known_before: &HashSet<(String, String)>,
        found: &[FoundPoint],
        now: Timestamp,
        force: bool,
    ) -> Result<RescanSummary, Error> {
        if found.is_empty() && !known_before.is_empty() && !force {
            return Err(Error::Refused(format!(
                "vault {vault} lists no point while the catalogue has {} there: check its URL in \
                 the vaults file, or rescan with --force to empty the catalogue's list",
                known_before.len()
            )));
        }
        let what = format!("rescanning vault {vault} into the catalogue");
        let id = self.id().to_owned();
        let tx = self.conn.transaction().map_err(Error::sql(what.clone()))?;
        let mut summary =
            RescanSummary { vault: vault.into(), found: found.len() as u64, ..Default::default() };
        let mut gone = known_before.clone();
        for f in found {
            gone.remove(&(f.vm.clone(), f.point.id.clone()));
            let tier =
                if f.held_until.is_some_and(|t| t > now) { "snapshot-and-vault" } else { "vault" };
            // When it was deleted is not in the vault's listing: the rescan's time stands for it.
            let deleted_at = f.deleted.then(|| ts(now));
            let known: Option<(Option<i64>, String)> = tx
                .query_row(
                    "SELECT expired_at, tier FROM points WHERE vm = ?1 AND point = ?2",
                    params![f.vm, f.point.id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(Error::sql(what.clone()))?;
            match known {
                Some((was, old_tier)) => {
                    if was.is_some() != f.deleted || old_tier != tier {
                        tx.execute(
                            "UPDATE points SET expired_at = CASE WHEN ?3 IS NULL THEN NULL
                                 ELSE coalesce(expired_at, ?3) END, tier = ?4, vault = ?5
                             WHERE vm = ?1 AND point = ?2",
                            params![f.vm, f.point.id, deleted_at, tier, vault],
                        )
                        .map_err(Error::sql(what.clone()))?;
                        summary.updated += 1;
                    }
                }
                None => {
                    let job = match (f.catalogue.as_deref(), f.job, f.scheduled_at) {
                        (Some(c), Some(job), Some(at)) if c == id => tx
                            .query_row(
                                "SELECT id FROM jobs WHERE id = ?1 AND vm = ?2 AND kind = 'backup'
                                     AND state = 'done' AND scheduled_at = ?3 AND NOT EXISTS
                                     (SELECT 1 FROM points WHERE points.job = jobs.id)",
                                params![job as i64, f.vm, ts(at)],
                                |r| r.get::<_, i64>(0),
                            )
                            .optional()
                            .map_err(Error::sql(what.clone()))?
                            .map(i64::unsigned_abs),
                        _ => None,
                    };
                    crate::agents::insert_point(&tx, &f.vm, vault, job, &f.point)
                        .map_err(Error::sql(what.clone()))?;
                    tx.execute(
                        "UPDATE points SET expired_at = ?3, tier = ?4 WHERE vm = ?1 AND point = ?2",
                        params![f.vm, f.point.id, deleted_at, tier],
                    )
                    .map_err(Error::sql(what.clone()))?;
                    summary.added += 1;
                }
            }
            // The last drill's outcome, noted on the point in the vault since the last look.
            let (drilled_at, passed) = match f.drill {
                Some((at, passed)) => (Some(ts(at)), Some(passed)),
                None => (None, None),
            };
            tx.execute(
                "UPDATE points SET drilled_at = ?3, drill_passed = ?4
                 WHERE vm = ?1 AND point = ?2 AND (drilled_at IS NOT ?3 OR drill_passed IS NOT ?4)",
                params![f.vm, f.point.id, drilled_at, passed],
            )
            .map_err(Error::sql(what.clone()))?;
        }
        for (vm, point) in gone {
            summary.removed += tx
                .execute(
                    "DELETE FROM points WHERE vm = ?1 AND point = ?2 AND vault = ?3",
                    params![vm, point, vault],
                )
                .map_err(Error::sql(what.clone()))? as u64;
        }
        tx.commit().map_err(Error::sql(what))?;
        Ok(summary)
    }

    /// Marks `points` of `vm` soft-deleted (stop protection, deleting data).
    pub fn mark_deleted(
        &mut self,
        vm: &str,
        points: &[String],
        now: Timestamp,
    ) -> Result<(), Error> {
        let what = format!("marking the points of VM {vm} deleted");
        let tx = self.conn.transaction().map_err(Error::sql(what.clone()))?;
        for p in points {
            tx.execute(
                "UPDATE points SET expired_at = coalesce(expired_at, ?3) WHERE vm = ?1 AND point = ?2",
                params![vm, p, ts(now)],
            )
            .map_err(Error::sql(what.clone()))?;
        }
        tx.commit().map_err(Error::sql(what))
    }

    /// Stops the protection of `vm`: its schedule no longer runs and its queued jobs are
    /// cancelled (a running one ends as it will); its points stay. Returns its vault.
    pub fn stop_protection(&mut self, vm: &str, now: Timestamp) -> Result<String, Error> {
        let what = format!("stopping the protection of VM {vm}");
        let tx = self.conn.transaction().map_err(Error::sql(what.clone()))?;
        let vault: Option<String> = tx
            .query_row(
                "UPDATE vms SET protected = 0, next_at = NULL WHERE name = ?1 RETURNING vault",
                [vm],
                |r| r.get(0),
            )
            .optional()
            .map_err(Error::sql(what.clone()))?;
        let Some(vault) = vault else {
            return Err(Error::Unknown {
                kind: "VM",
                name: vm.into(),
                hint: "list VMs with `vms`",
            });
        };
        tx.execute(
            "UPDATE jobs SET state = 'failed', reason = 'cancelled: the VM''s protection stopped',
                 finished_at = ?2, updated_at = ?2
             WHERE vm = ?1 AND state = 'queued'",
            params![vm, ts(now)],
        )
        .map_err(Error::sql(what.clone()))?;
        tx.commit().map_err(Error::sql(what))?;
        Ok(vault)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PointReport;
    use crate::keeper::PointFate;

    use crate::testing::{at, catalogue};

    fn setup(dir: &tempfile::TempDir) -> Catalogue {
        catalogue(dir, &[("web-1", true), ("old-1", false)], "main")
    }

    fn found(
        vm: &str,
        id: &str,
        day: &str,
        catalogue: Option<&str>,
        job: Option<u64>,
    ) -> FoundPoint {
        FoundPoint {
            vm: vm.into(),
            point: PointReport {
                id: id.into(),
                captured_at: at(&format!("{day}T02:01:00Z")),
                consistency: "crash".into(),
                ..PointReport::default()
            },
            deleted: false,
            catalogue: catalogue.map(Into::into),
            job,
            scheduled_at: None,
            held_until: None,
            drill: None,
        }
    }

    #[test]
    fn a_rescan_brings_drill_outcomes_and_the_newest_point_known_to_restore() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = setup(&dir);
        let now = at("2026-06-10T03:00:00Z");
        let drilled = |id: &str, day: &str, passed: bool| FoundPoint {
            drill: Some((at(&format!("{day}T05:00:00Z")), passed)),
            ..found("web-1", id, day, None, None)
        };
        // p1 passed, p2 failed, p3 never drilled.
        let points = [
            drilled("p1", "2026-06-01", true),
            drilled("p2", "2026-06-02", false),
            found("web-1", "p3", "2026-06-03", None, None),
        ];
        rescan(&mut c, &points, now);
        let listed = c.points(Some("web-1")).unwrap();
        let drill = |id: &str| {
            let p = listed.iter().find(|p| p.point == id).unwrap();
            (p.drilled_at.is_some(), p.drill_passed)
        };
        assert_eq!(drill("p1"), (true, Some(true)));
        assert_eq!(drill("p2"), (true, Some(false)));
        assert_eq!(drill("p3"), (false, None));
        let web = c.standings(now).unwrap().into_iter().find(|s| s.vm == "web-1").unwrap();
        assert_eq!(web.known_good.as_deref(), Some("p1"));
        assert_eq!(web.last_drill, Some((at("2026-06-02T05:00:00Z"), false)));
        // A later drill of p2 passes: it becomes the newest known to restore.
        let again = [
            drilled("p1", "2026-06-01", true),
            FoundPoint {
                drill: Some((at("2026-06-09T00:00:00Z"), true)),
                ..found("web-1", "p2", "2026-06-02", None, None)
            },
            found("web-1", "p3", "2026-06-03", None, None),
        ];
        rescan(&mut c, &again, now);
        let web = c.standings(now).unwrap().into_iter().find(|s| s.vm == "web-1").unwrap();
        assert_eq!(web.known_good.as_deref(), Some("p2"));
        assert_eq!(web.last_drill, Some((at("2026-06-09T00:00:00Z"), true)));
    }

    fn rescan(c: &mut Catalogue, found: &[FoundPoint], now: Timestamp) -> RescanSummary {
        let known = c.points_of_vault("main").unwrap();
        c.rescan("main", &known, found, now, false).unwrap()
    }

    fn upkeep_schedule() -> Schedule {
        cairn_policy::ScheduleSpec {
            kind: "daily".into(),
            times: vec!["03:00".into()],
            ..Default::default()
        }
        .check()
        .unwrap()
    }

    #[test]
    fn rules_follow_protection() {
        let dir = tempfile::tempdir().unwrap();
        let c = setup(&dir);
        let grace = jiff::SignedDuration::from_hours(1);
        let now = at("2026-06-10T03:00:00Z");
        let rules = c.upkeep_rules("main", grace, now).unwrap();
        assert_eq!(rules.len(), 2);
        let rule = |vm: &str| rules.iter().find(|r| r.vm == vm).unwrap().retention.clone();
        assert_eq!(rule("web-1").keep_daily, Some(7));
        // Protection stopped: everything live is kept, only deleted points are purged.
        assert_eq!(rule("old-1"), keep_everything());
        assert!(c.upkeep_rules("other", grace, now).unwrap().is_empty());
    }

    #[test]
    fn upkeep_times_are_recorded_and_missed_ones_make_one_run() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = setup(&dir);
        let s = upkeep_schedule();
        // The first look only records the next time.
        assert_eq!(c.upkeep_due("main", &s, at("2026-06-01T04:00:00Z")).unwrap(), None);
        assert_eq!(c.upkeep_due("main", &s, at("2026-06-02T02:59:00Z")).unwrap(), None);
        // Down for three days: one run, for the latest time missed.
        let due = c.upkeep_due("main", &s, at("2026-06-05T01:00:00Z")).unwrap();
        assert_eq!(due, Some(at("2026-06-04T03:00:00Z")));
        let id = c
            .start_upkeep("main", due.unwrap(), "schedule", Some(&s), at("2026-06-05T01:00:00Z"))
            .unwrap();
        assert_eq!(c.upkeep_due("main", &s, at("2026-06-05T02:00:00Z")).unwrap(), None);
        assert_eq!(
            c.upkeep_due("main", &s, at("2026-06-05T03:00:00Z")).unwrap(),
            Some(at("2026-06-05T03:00:00Z"))
        );
        // A clock once far ahead left a time the schedule would not give now: reset.
        c.set_upkeep_next("main", Some(at("2027-01-01T03:00:00Z"))).unwrap();
        assert_eq!(c.upkeep_due("main", &s, at("2026-06-05T04:00:00Z")).unwrap(), None);
        assert_eq!(
            c.upkeep_due("main", &s, at("2026-06-06T03:00:00Z")).unwrap(),
            Some(at("2026-06-06T03:00:00Z"))
        );
        // A failed run comes back within the hour, not the next day.
        let failed = c
            .start_upkeep(
                "main",
                at("2026-06-06T03:00:00Z"),
                "schedule",
                Some(&s),
                at("2026-06-06T03:00:00Z"),
            )
            .unwrap();
        c.finish_upkeep(failed, "main", &Err("unreachable".into()), at("2026-06-06T03:00:00Z"))
            .unwrap();
        assert_eq!(
            c.upkeep_due("main", &s, at("2026-06-06T04:00:00Z")).unwrap(),
            Some(at("2026-06-06T04:00:00Z"))
        );
        // A run the coordinator's stop cut is closed as failed at the next start.
        c.fail_interrupted_upkeeps(at("2026-06-05T03:00:00Z")).unwrap();
        let run = c.upkeep_run(id).unwrap().unwrap();
        assert_eq!(run.state, "failed");
    }

    #[test]
    fn an_upkeep_is_mirrored_point_by_point_and_a_failure_alerts() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = setup(&dir);
        let now = at("2026-06-10T03:00:00Z");
        let points = [
            found("web-1", "p1", "2026-06-01", None, None),
            found("web-1", "p2", "2026-06-02", None, None),
            found("web-1", "p3", "2026-06-03", None, None),
        ];
        rescan(&mut c, &points, now);
        let fate = |id: &str, fate: Fate| PointFate {
            vm: "web-1".into(),
            point: id.into(),
            captured_at: now,
            fate,
            why: String::new(),
        };
        let report = UpkeepReport {
            points: vec![
                fate("p1", Fate::Purged),
                fate("p2", Fate::Expired),
                fate("p3", Fate::Kept),
            ],
            ..UpkeepReport::default()
        };
        let id = c.start_upkeep("main", now, "admin", None, now).unwrap();
        c.finish_upkeep(id, "main", &Ok(report), now).unwrap();
        let listed = c.points(Some("web-1")).unwrap();
        let ids: Vec<(&str, bool)> =
            listed.iter().map(|p| (p.point.as_str(), p.expired_at.is_some())).collect();
        assert_eq!(ids, [("p2", true), ("p3", false)]);
        // p2 may be purged once a grace has passed since this catalogue expired it.
        let grace = jiff::SignedDuration::from_hours(1);
        let rules = c.upkeep_rules("main", grace, at("2026-06-10T03:59:00Z")).unwrap();
        assert!(rules.iter().all(|r| r.purgeable.is_empty()), "{rules:?}");
        let rules = c.upkeep_rules("main", grace, at("2026-06-10T04:00:00Z")).unwrap();
        let web = rules.iter().find(|r| r.vm == "web-1").unwrap();
        assert_eq!(web.purgeable, ["p2"]);
        let standing = c.standings(now).unwrap().into_iter().find(|s| s.vm == "web-1").unwrap();
        assert_eq!(standing.points, 1, "expired points are not counted as live");
        let run = &c.upkeep_runs(1).unwrap()[0];
        assert_eq!(run.state, "done");
        assert!(
            run.summary.as_deref().unwrap().starts_with("1 point(s) kept, 1 expired, 1 purged")
        );
        let id = c.start_upkeep("main", now, "schedule", None, now).unwrap();
        c.finish_upkeep(id, "main", &Err("vault main is unreachable".into()), now).unwrap();
        assert_eq!(c.upkeep_runs(1).unwrap()[0].state, "failed");
        // A run that failed part way: what it did is mirrored all the same.
        let partial = UpkeepReport {
            points: vec![fate("p2", Fate::Purged)],
            errors: vec!["VM web-2: its manifest cannot be read".into()],
            ..UpkeepReport::default()
        };
        let id = c.start_upkeep("main", now, "schedule", None, now).unwrap();
        c.finish_upkeep(id, "main", &Ok(partial), now).unwrap();
        assert_eq!(c.points(Some("web-1")).unwrap().len(), 1);
        let run = c.upkeep_run(id).unwrap().unwrap();
        assert_eq!(run.state, "failed");
        assert!(run.summary.unwrap().starts_with("VM web-2"));
        assert!(run.report.is_some() && c.upkeep_runs(1).unwrap()[0].report.is_none());
        let alerts = c.alerts().unwrap();
        assert!(
            alerts.iter().any(|a| a.0 == "failed-upkeep" && a.2.contains("unreachable")),
            "{alerts:?}"
        );
    }

    #[test]
    fn a_rescan_makes_the_catalogue_what_the_vault_holds() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = setup(&dir);
        let now = at("2026-06-10T03:00:00Z");
        let own = c.id().to_owned();
        let job = c.back_up_now("web-1", None, now).unwrap();
        let first = [
            FoundPoint {
                scheduled_at: Some(now),
                ..found("web-1", "p1", "2026-06-01", Some(&own), Some(job))
            },
            FoundPoint {
                scheduled_at: Some(now),
                ..found("web-1", "p2", "2026-06-02", Some("another-catalogue"), Some(job))
            },
            found("gone-vm", "p9", "2026-06-02", None, None),
        ];
        c.conn.execute("UPDATE jobs SET state = 'done'", []).unwrap();
        let s = rescan(&mut c, &first, now);
        assert_eq!((s.found, s.added, s.updated, s.removed), (3, 3, 0, 0));
        let listed = c.points(None).unwrap();
        let job_of = |id: &str| listed.iter().find(|p| p.point == id).unwrap().job;
        // This catalogue's job is linked; another catalogue's job number means nothing here.
        assert_eq!(job_of("p1"), Some(job));
        assert_eq!(job_of("p2"), None);
        // Again, with p2 soft-deleted and p9 gone from the vault.
        let mut second = first.to_vec();
        second[1].deleted = true;
        second.pop();
        let s = rescan(&mut c, &second, now);
        assert_eq!((s.found, s.added, s.updated, s.removed), (2, 0, 1, 1));
        let listed = c.points(None).unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed.iter().find(|p| p.point == "p2").unwrap().expired_at.is_some());
        // Points of another vault are not touched.
        let known = c.points_of_vault("other").unwrap();
        let s = c.rescan("other", &known, &[], now, false).unwrap();
        assert_eq!(s.removed, 0);
        assert_eq!(c.points(None).unwrap().len(), 2);
        // A vault that lists nothing while the catalogue had points there: refused, unless
        // forced.
        let known = c.points_of_vault("main").unwrap();
        let e = c.rescan("main", &known, &[], now, false).unwrap_err().to_string();
        assert!(e.contains("--force"), "{e}");
        assert_eq!(c.points(None).unwrap().len(), 2);
        assert_eq!(c.rescan("main", &known, &[], now, true).unwrap().removed, 2);
    }

    #[test]
    fn stopping_protection_cancels_queued_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = setup(&dir);
        let now = at("2026-06-10T03:00:00Z");
        c.back_up_now("web-1", None, now).unwrap();
        assert_eq!(c.stop_protection("web-1", now).unwrap(), "main");
        let jobs = c.jobs(Some("web-1")).unwrap();
        assert_eq!(jobs[0].state, crate::JobState::Failed);
        assert!(jobs[0].reason.as_deref().unwrap().contains("protection stopped"));
        assert!(c.stop_protection("nobody", now).is_err());
    }

    #[test]
    fn rpo_alerts_are_raised_once_and_cleared_by_a_newer_point() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = setup(&dir);
        // No point yet: nothing to say (failed jobs and missed schedules alert for that).
        assert!(c.check_rpo(at("2026-06-10T00:00:00Z")).unwrap().is_empty());
        rescan(
            &mut c,
            &[found("web-1", "p1", "2026-06-01", None, None)],
            at("2026-06-01T03:00:00Z"),
        );
        // Daily schedule, 24 h transfer deadline: 48 h allowed.
        assert!(c.check_rpo(at("2026-06-03T02:00:00Z")).unwrap().is_empty());
        assert_eq!(c.check_rpo(at("2026-06-03T03:00:00Z")).unwrap(), ["web-1"]);
        assert!(c.check_rpo(at("2026-06-03T04:00:00Z")).unwrap().is_empty(), "raised once");
        assert_eq!(c.alerts().unwrap().iter().filter(|a| a.0 == "rpo").count(), 1);
        rescan(
            &mut c,
            &[
                found("web-1", "p1", "2026-06-01", None, None),
                found("web-1", "p2", "2026-06-03", None, None),
            ],
            at("2026-06-03T03:00:00Z"),
        );
        c.check_rpo(at("2026-06-03T05:00:00Z")).unwrap();
        assert_eq!(c.alerts().unwrap().iter().filter(|a| a.0 == "rpo").count(), 0, "cleared");
        // A VM whose protection stopped raises none (old-1 has a week-old point).
        rescan(
            &mut c,
            &[
                found("web-1", "p2", "2026-06-03", None, None),
                found("old-1", "o1", "2026-05-20", None, None),
            ],
            at("2026-06-03T05:00:00Z"),
        );
        assert!(c.check_rpo(at("2026-06-03T06:00:00Z")).unwrap().is_empty());
    }
}
