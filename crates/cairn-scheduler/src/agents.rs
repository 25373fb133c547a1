//! Agents in the catalogue: enrollment, the jobs handed to each agent, and what agents report.
//!
//! An agent is named after its host and sees only the jobs of the VMs placed on that host. A
//! job the dispatcher started is *claimed* when its agent's poll takes it; every poll lists
//! what the agent is running, so a claimed job the agent no longer runs (it restarted, or the
//! answer carrying the job was lost) is handed out again as a new attempt of the same job:
//! the job id goes into the point's manifest, and the agent looks for its point before backing
//! up, so a retry never commits a second point. A running job whose agent has not been heard
//! from for the agent timeout fails, saying so.

use jiff::Timestamp;
use rusqlite::{OptionalExtension, params};
use serde::Serialize;

pub use cairn_protocol::{JobOrder, OfflineRun, Orders, PointReport, Report, ScheduleEntry};

use crate::catalogue::{parse_ts, ts};
use crate::{Catalogue, Error};

/// An agent as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AgentRecord {
    /// Its name (its host's).
    pub name: String,
    /// When it enrolled.
    pub enrolled_at: Timestamp,
    /// Its last poll or report.
    pub last_seen: Option<Timestamp>,
    /// Its token no longer works.
    pub revoked: bool,
}

/// How long an enrollment token is valid.
const ENROLLMENT_HOURS: i64 = 24;

fn unknown_job(id: u64) -> Error {
    Error::Unknown { kind: "job", name: id.to_string(), hint: "list jobs with `jobs`" }
}

impl Catalogue {
    /// A one-time token with which the agent of `host` enrolls (valid for a day).
    pub fn new_enrollment(&mut self, host: &str, now: Timestamp) -> Result<String, Error> {
        let token = crate::auth::new_token();
        let expires = now + jiff::SignedDuration::from_hours(ENROLLMENT_HOURS);
        self.conn
            .execute(
                "INSERT INTO enrollments (token_hash, host, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4)",
                params![crate::auth::hash(&token), host, ts(now), ts(expires)],
            )
            .map_err(Error::sql(format!("adding an enrollment for host {host}")))?;
        Ok(token)
    }

    /// Enrolls the agent an enrollment token was made for: the enrollment is used up, and the
    /// agent gets its own token (returned once; kept hashed). An agent enrolling again (a
    /// reinstalled host) replaces its token. `None`: unknown, used or expired.
    pub fn enroll(
        &mut self,
        enrollment: &str,
        now: Timestamp,
    ) -> Result<Option<(String, String)>, Error> {
        let what = "enrolling an agent";
        let tx = self.conn.transaction().map_err(Error::sql(what))?;
        let host: Option<String> = tx
            .query_row(
                "UPDATE enrollments SET used_at = ?2
                 WHERE token_hash = ?1 AND used_at IS NULL AND expires_at > ?2 RETURNING host",
                params![crate::auth::hash(enrollment), ts(now)],
                |r| r.get(0),
            )
            .optional()
            .map_err(Error::sql(what))?;
        let Some(host) = host else { return Ok(None) };
        let token = crate::auth::new_token();
        tx.execute(
            "INSERT INTO agents (name, token_hash, enrolled_at, last_seen) VALUES (?1, ?2, ?3, ?3)
             ON CONFLICT (name) DO UPDATE SET token_hash = excluded.token_hash,
                 revoked = 0, enrolled_at = excluded.enrolled_at, last_seen = excluded.last_seen",
            params![host, crate::auth::hash(&token), ts(now)],
        )
        .map_err(Error::sql(what))?;
        tx.commit().map_err(Error::sql(what))?;
        Ok(Some((host, token)))
    }

    /// The agent a token belongs to (`None`: unknown or revoked), noting that it was seen.
    pub fn agent_of(&mut self, token: &str, now: Timestamp) -> Result<Option<String>, Error> {
        self.conn
            .query_row(
                "UPDATE agents SET last_seen = ?2 WHERE token_hash = ?1 AND revoked = 0
                 RETURNING name",
                params![crate::auth::hash(token), ts(now)],
                |r| r.get(0),
            )
            .optional()
            .map_err(Error::sql("checking an agent's token"))
    }

    /// Revokes an agent's token: its next call is refused.
    pub fn revoke_agent(&mut self, name: &str) -> Result<(), Error> {
        let changed = self
            .conn
            .execute("UPDATE agents SET revoked = 1 WHERE name = ?1", [name])
            .map_err(Error::sql(format!("revoking agent {name}")))?;
        match changed {
            0 => Err(Error::Unknown {
                kind: "agent",
                name: name.into(),
                hint: "list them with `agents`",
            }),
            _ => Ok(()),
        }
    }

    /// Every agent, by name.
    pub fn agents(&self) -> Result<Vec<AgentRecord>, Error> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, enrolled_at, last_seen, revoked FROM agents ORDER BY name")
            .map_err(Error::sql("listing agents"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(AgentRecord {
                    name: r.get(0)?,
                    enrolled_at: parse_ts(r.get(1)?)?,
                    last_seen: r.get::<_, Option<i64>>(2)?.map(parse_ts).transpose()?,
                    revoked: r.get(3)?,
                })
            })
            .map_err(Error::sql("listing agents"))?;
        rows.collect::<Result<_, _>>().map_err(Error::sql("listing agents"))
    }

    /// What the agent of `host`, running `running`, is to do: the started jobs of its VMs that
    /// it does not run yet (claimed now, or again as a new attempt), the jobs it runs that
    /// ended meanwhile, and its VMs' schedules.
    /// An agent that does not list a job's kind in `kinds` (besides `backup`) is not handed
    /// the job: it fails, saying so.
    pub fn claim(
        &mut self,
        host: &str,
        running: &[u64],
        kinds: &[String],
        now: Timestamp,
    ) -> Result<Orders, Error> {
        let what = format!("handing jobs to agent {host}");
        let catalogue_id = self.id().to_owned();
        let tx = self.conn.transaction().map_err(Error::sql(what.clone()))?;
        let mut orders = Orders::default();
        {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT j.id, j.vm, j.kind,
                            -- a restore reads the point's own vault (the VM may have moved)
                            CASE WHEN j.kind = 'restore' THEN coalesce((SELECT p.vault FROM points p
                                WHERE p.vm = j.vm AND p.point = json_extract(j.restore, '$.point')
                                  AND p.vault != ''), v.vault)
                            ELSE v.vault END,
                            j.scheduled_at, j.policy, j.retain_until,
                            j.attempt, j.claimed_at, j.claimed_by, j.restore
                     FROM jobs j JOIN vms v ON v.name = j.vm
                     WHERE j.state = 'running' AND v.host = ?1",
                )
                .map_err(Error::sql(what.clone()))?;
            let rows = stmt
                .query_map([host], |r| {
                    Ok((
                        JobOrder {
                            id: r.get::<_, i64>(0)?.unsigned_abs(),
                            catalogue: catalogue_id.clone(),
                            vm: r.get(1)?,
                            kind: r.get(2)?,
                            vault: r.get(3)?,
                            scheduled_at: parse_ts(r.get(4)?)?,
                            policy: r.get(5)?,
                            retain_until: r.get::<_, Option<i64>>(6)?.map(parse_ts).transpose()?,
                            attempt: r.get(7)?,
                            keep_views_hours: 0,
                            restore: r
                                .get::<_, Option<String>>(10)?
                                .and_then(|o| serde_json::from_str(&o).ok()),
                        },
                        r.get::<_, Option<i64>>(8)?.is_some(),
                        r.get::<_, Option<String>>(9)?,
                    ))
                })
                .map_err(Error::sql(what.clone()))?;
            let mut claim = tx
                .prepare_cached(
                    "UPDATE jobs SET claimed_at = ?2, claimed_by = ?3, updated_at = ?2,
                         attempt = attempt + (CASE WHEN claimed_at IS NULL THEN 0 ELSE 1 END)
                     WHERE id = ?1",
                )
                .map_err(Error::sql(what.clone()))?;
            for row in rows {
                let (mut order, claimed, by) = row.map_err(Error::sql(what.clone()))?;
                // A job another agent took (its VM moved here meanwhile) stays that agent's
                // until it ends: two hosts never back one VM up at once.
                if running.contains(&order.id) || by.as_deref().is_some_and(|b| b != host) {
                    continue;
                }
                let unfit = match order.kind.as_str() {
                    "backup" => None,
                    kind if !kinds.iter().any(|k| k == kind) => Some(format!(
                        "the agent of host {host} does not run {kind} jobs: upgrade it"
                    )),
                    "restore" if order.restore.is_none() => {
                        Some("the restore job's order is damaged in the catalogue".into())
                    }
                    _ => None,
                };
                if let Some(reason) = unfit {
                    fail_job(&tx, order.id, &order.kind, &order.vm, &reason, true, now)
                        .map_err(Error::sql(what.clone()))?;
                    continue;
                }
                claim
                    .execute(params![order.id as i64, ts(now), host])
                    .map_err(Error::sql(what.clone()))?;
                if claimed {
                    order.attempt += 1;
                    tracing::warn!(
                        job = order.id,
                        host,
                        "the agent no longer runs job: handed out again"
                    );
                }
                orders.jobs.push(order);
            }
            let mut state = tx
                .prepare_cached("SELECT state, claimed_by FROM jobs WHERE id = ?1")
                .map_err(Error::sql(what.clone()))?;
            for id in running {
                let s: Option<(String, Option<String>)> = state
                    .query_row([*id as i64], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
                    .map_err(Error::sql(what.clone()))?;
                let mine = matches!(&s, Some((state, by)) if state == "running"
                    && by.as_deref().is_none_or(|b| b == host));
                if !mine {
                    orders.cancel.push(*id);
                }
            }
            let mut schedule = tx
                .prepare_cached(
                    "SELECT v.name, v.vault, p.name, p.spec FROM vms v JOIN policies p
                     ON p.name = v.policy WHERE v.host = ?1 AND v.protected = 1 ORDER BY v.name",
                )
                .map_err(Error::sql(what.clone()))?;
            let rows = schedule
                .query_map([host], |r| {
                    Ok(ScheduleEntry {
                        vm: r.get(0)?,
                        vault: r.get(1)?,
                        policy: r.get(2)?,
                        spec: r.get(3)?,
                    })
                })
                .map_err(Error::sql(what.clone()))?;
            orders.schedule = rows.collect::<Result<_, _>>().map_err(Error::sql(what.clone()))?;
        }
        tx.commit().map_err(Error::sql(what))?;
        for order in &mut orders.jobs {
            if let Some(policy) = order.policy.as_deref().and_then(|p| self.policy(p).ok()) {
                order.keep_views_hours =
                    u32::try_from(policy.instant_restore.as_hours()).unwrap_or(0);
            }
        }
        Ok(orders)
    }

    /// Records `report` on job `id` from the agent of `host`: progress, or its end. A `done`
    /// report records the point, once: a second, different point for the same job is refused
    /// (and alerted), the same point again is accepted (a report retried after a lost answer).
    /// A job of another host's VM is refused.
    pub fn report(
        &mut self,
        host: &str,
        id: u64,
        report: &Report,
        now: Timestamp,
    ) -> Result<ReportOutcome, Error> {
        let what = format!("recording agent {host}'s report on job {id}");
        // The transfer's deadline, from the job's policy: a transfer that ends after it is late.
        let deadline = {
            let row: Option<(Option<String>, i64)> = self
                .conn
                .query_row(
                    "SELECT policy, scheduled_at FROM jobs WHERE id = ?1",
                    [id as i64],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(Error::sql(what.clone()))?;
            match row {
                Some((Some(policy), at)) => self
                    .policy(&policy)
                    .ok()
                    .and_then(|p| parse_ts(at).ok()?.checked_add(p.transfer_deadline).ok()),
                _ => None,
            }
        };
        let tx = self.conn.transaction().map_err(Error::sql(what.clone()))?;
        type Row = (String, String, String, String, Option<String>, String);
        let job: Option<Row> = tx
            .query_row(
                "SELECT j.vm, v.host, j.state, v.vault, j.claimed_by, j.kind FROM jobs j
                 JOIN vms v ON v.name = j.vm WHERE j.id = ?1",
                [id as i64],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
            )
            .optional()
            .map_err(Error::sql(what.clone()))?;
        let Some((vm, owner, state, vault, by, kind)) = job else { return Err(unknown_job(id)) };
        // The agent that claimed the job, or the VM's host's when none did yet.
        if by.as_deref().unwrap_or(&owner) != host {
            return Ok(ReportOutcome::NotYours);
        }
        if kind == "restore" {
            let outcome = crate::restores::record(&tx, id, &vm, &state, report, now)
                .map_err(Error::sql(what.clone()))?;
            tx.commit().map_err(Error::sql(what))?;
            return Ok(outcome);
        }
        let progress = report.progress.as_ref().map(|p| p.to_string());
        match report.state.as_str() {
            "running" => {
                if state != "running" {
                    return Ok(ReportOutcome::Ended);
                }
                record_progress(&tx, id, report, now).map_err(Error::sql(what.clone()))?;
                // The snapshot phase's point, restorable from the host's views before its
                // transfer: recorded in the snapshot tier, once, while the job has no point.
                if let Some(point) = report.point.as_ref().filter(|p| p.held_until.is_some()) {
                    // A new attempt's snapshot replaces an earlier attempt's.
                    tx.execute(
                        "DELETE FROM points WHERE job = ?1 AND tier = 'snapshot' AND point != ?2",
                        params![id as i64, point.id],
                    )
                    .map_err(Error::sql(what.clone()))?;
                    let has: bool = tx
                        .query_row(
                            "SELECT EXISTS (SELECT 1 FROM points WHERE job = ?1)",
                            [id as i64],
                            |r| r.get(0),
                        )
                        .map_err(Error::sql(what.clone()))?;
                    if !has {
                        insert_point_as(&tx, &vm, &vault, Some(id), point, "snapshot")
                            .map_err(Error::sql(what.clone()))?;
                    }
                }
            }
            "done" => {
                let Some(point) = &report.point else {
                    return Ok(ReportOutcome::Invalid("a done report names its point".into()));
                };
                // A point another job made is not this one's.
                let owner: Option<Option<i64>> = tx
                    .query_row(
                        "SELECT job FROM points WHERE vm = ?1 AND point = ?2",
                        params![vm, point.id],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(Error::sql(what.clone()))?;
                if let Some(Some(other)) = owner.filter(|o| o.is_some_and(|j| j != id as i64)) {
                    return Ok(ReportOutcome::Invalid(format!(
                        "point {} is job {other}'s, not job {id}'s",
                        point.id
                    )));
                }
                // An earlier attempt's snapshot that never reached the vault is not a point.
                tx.execute(
                    "DELETE FROM points WHERE job = ?1 AND tier = 'snapshot' AND point != ?2",
                    params![id as i64, point.id],
                )
                .map_err(Error::sql(what.clone()))?;
                let existing: Option<String> = tx
                    .query_row("SELECT point FROM points WHERE job = ?1", [id as i64], |r| r.get(0))
                    .optional()
                    .map_err(Error::sql(what.clone()))?;
                match existing {
                    Some(p) if p == point.id => insert_point(&tx, &vm, &vault, Some(id), point)
                        .map_err(Error::sql(what.clone()))?,
                    Some(p) => {
                        let message = format!(
                            "job {id} of VM {vm} reported a second point {} after {p}: the second \
                             is not recorded; check the vault for a duplicate",
                            point.id
                        );
                        tx.execute(
                            "INSERT INTO alerts (kind, vm, message, raised_at) VALUES ('failed-job', ?1, ?2, ?3)",
                            params![vm, message, ts(now)],
                        )
                        .map_err(Error::sql(what.clone()))?;
                        tx.commit().map_err(Error::sql(what))?;
                        return Ok(ReportOutcome::Duplicate(p));
                    }
                    None => insert_point(&tx, &vm, &vault, Some(id), point)
                        .map_err(Error::sql(what.clone()))?,
                }
                if let Some(deadline) = deadline.filter(|d| now > *d) {
                    let message = format!(
                        "the transfer of VM {vm}'s backup (job {id}) ended at {now}, after its \
                         deadline {deadline}: check the host's transfer queue, its bandwidth \
                         and the vault"
                    );
                    crate::points::raise_late(&tx, id as i64, &vm, &message, now)
                        .map_err(Error::sql(what.clone()))?;
                }
                // Done whatever the job's state: a late report of a job failed for silence
                // still has its point in the vault, which the catalogue follows.
                tx.execute(
                    "UPDATE jobs SET state = 'done', phase = 'done', reason = NULL,
                         progress = coalesce(?2, progress), finished_at = ?3, updated_at = ?3
                     WHERE id = ?1",
                    params![id as i64, progress, ts(now)],
                )
                .map_err(Error::sql(what.clone()))?;
            }
            "failed" => {
                if state == "done" {
                    return Ok(ReportOutcome::Ended);
                }
                let reason = report.reason.clone().unwrap_or_else(|| "no reason given".into());
                fail_job(&tx, id, "backup", &vm, &reason, state != "failed", now)
                    .map_err(Error::sql(what.clone()))?;
                // A snapshot whose transfer failed was never committed: its views are gone.
                tx.execute("DELETE FROM points WHERE job = ?1 AND tier = 'snapshot'", [id as i64])
                    .map_err(Error::sql(what.clone()))?;
            }
            other => {
                return Ok(ReportOutcome::Invalid(format!(
                    "state {other:?}: give running, done or failed"
                )));
            }
        }
        tx.commit().map_err(Error::sql(what))?;
        Ok(ReportOutcome::Recorded)
    }

    /// Records a backup the agent of `host` ran from its cached schedule: the job for that VM
    /// and time is done with the point, whether the coordinator had planned it meanwhile or not.
    pub fn record_offline(
        &mut self,
        host: &str,
        run: &OfflineRun,
        now: Timestamp,
    ) -> Result<ReportOutcome, Error> {
        let what = format!("recording agent {host}'s offline backup of VM {}", run.vm);
        let policy: Option<Option<String>> = self
            .conn
            .query_row("SELECT policy FROM vms WHERE name = ?1", [&run.vm], |r| r.get(0))
            .optional()
            .map_err(Error::sql(what.clone()))?;
        // Only a time of the VM's own schedule, and not one ahead of the coordinator's clock:
        // an agent cannot fill the catalogue with jobs of its choosing.
        let at = run.scheduled_at;
        let Some(policy) = policy else {
            return Err(Error::Unknown {
                kind: "VM",
                name: run.vm.clone(),
                hint: "list VMs with `vms`",
            });
        };
        let on_schedule = match policy {
            Some(name) => {
                let schedule = self.policy(&name)?.schedule;
                let just_before =
                    at.checked_sub(jiff::SignedDuration::from_millis(1)).unwrap_or(at);
                schedule.next_after(just_before) == Some(at)
            }
            None => false,
        };
        if !on_schedule || at > now {
            return Ok(ReportOutcome::Invalid(format!(
                "{at} is not a past scheduled time of VM {}'s policy",
                run.vm
            )));
        }
        let tx = self.conn.transaction().map_err(Error::sql(what.clone()))?;
        let vm: Option<(String, String)> = tx
            .query_row("SELECT host, vault FROM vms WHERE name = ?1", [&run.vm], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(Error::sql(what.clone()))?;
        let Some((owner, vault)) = vm else {
            return Err(Error::Unknown {
                kind: "VM",
                name: run.vm.clone(),
                hint: "list VMs with `vms`",
            });
        };
        if owner != host {
            return Ok(ReportOutcome::NotYours);
        }
        let at = ts(run.scheduled_at);
        let id: i64 = tx
            .query_row(
                "INSERT INTO jobs (vm, kind, scheduled_at, start_at, state, phase, attempt,
                     created_at, updated_at, claimed_at, finished_at)
                 VALUES (?1, 'backup', ?2, ?2, 'done', 'done', 1, ?3, ?3, ?3, ?3)
                 ON CONFLICT (vm, kind, scheduled_at) DO UPDATE SET state = 'done', phase = 'done',
                     reason = 'run by the agent from its cached schedule', finished_at = ?3,
                     updated_at = ?3
                 RETURNING id",
                params![run.vm, at, ts(now)],
                |r| r.get(0),
            )
            .map_err(Error::sql(what.clone()))?;
        let existing: Option<String> = tx
            .query_row("SELECT point FROM points WHERE job = ?1", [id], |r| r.get(0))
            .optional()
            .map_err(Error::sql(what.clone()))?;
        if existing.is_none() {
            insert_point(&tx, &run.vm, &vault, Some(id.unsigned_abs()), &run.point)
                .map_err(Error::sql(what.clone()))?;
        }
        tx.commit().map_err(Error::sql(what))?;
        Ok(ReportOutcome::Recorded)
    }

    /// Fails the running jobs whose agent has not been heard from since `silent_since` (or
    /// that no agent claimed by then), each with an alert saying so. Returns them.
    pub fn fail_silent(
        &mut self,
        silent_since: Timestamp,
        now: Timestamp,
    ) -> Result<Vec<u64>, Error> {
        let what = "failing the jobs of silent agents";
        let tx = self.conn.transaction().map_err(Error::sql(what))?;
        let silent: Vec<(i64, String, String, Option<i64>, String)> = {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT j.id, j.vm, v.host, a.last_seen, j.kind FROM jobs j
                     JOIN vms v ON v.name = j.vm LEFT JOIN agents a ON a.name = v.host
                     WHERE j.state = 'running' AND j.updated_at < ?1
                       AND (a.last_seen IS NULL OR a.last_seen < ?1 OR a.revoked = 1)",
                )
                .map_err(Error::sql(what))?;
            let rows = stmt
                .query_map([ts(silent_since)], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })
                .map_err(Error::sql(what))?;
            rows.collect::<Result<_, _>>().map_err(Error::sql(what))?
        };
        for (id, vm, host, seen, kind) in &silent {
            let since = match seen.map(parse_ts).transpose().ok().flatten() {
                Some(t) => format!("has not been heard from since {t}"),
                None => "has never enrolled".into(),
            };
            let reason = format!(
                "the agent of host {host} {since}: check that cairn-agent runs there \
                 (systemctl status cairn-agent) and reaches the coordinator"
            );
            fail_job(&tx, id.unsigned_abs(), kind, vm, &reason, true, now)
                .map_err(Error::sql(what))?;
            // Its snapshot, if any, was not committed by the job (a late report brings the
            // point back if it was).
            tx.execute("DELETE FROM points WHERE job = ?1 AND tier = 'snapshot'", [id])
                .map_err(Error::sql(what))?;
            if kind == "restore" {
                tx.execute(
                    "INSERT INTO audit (at, who, action, details) VALUES (?1, 'coordinator', 'restore-ended', ?2)",
                    params![ts(now), format!("VM {vm}, job {id}: failed: {reason}")],
                )
                .map_err(Error::sql(what))?;
            }
        }
        tx.commit().map_err(Error::sql(what))?;
        Ok(silent.iter().map(|s| s.0.unsigned_abs()).collect())
    }
}

/// What became of a report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReportOutcome {
    /// Recorded.
    Recorded,
    /// The job is not one of this agent's VMs'.
    NotYours,
    /// The job ended already (progress on it is ignored; the agent should stop it).
    Ended,
    /// The job already has this other point.
    Duplicate(String),
    /// The report does not make sense.
    Invalid(String),
}

/// Fails job `id`, a `kind` job of `vm`, for `reason`; `alert`: with a `failed-job` alert
/// (not when it had failed already).
pub(crate) fn fail_job(
    tx: &rusqlite::Transaction<'_>,
    id: u64,
    kind: &str,
    vm: &str,
    reason: &str,
    alert: bool,
    now: Timestamp,
) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE jobs SET state = 'failed', reason = ?2, finished_at = ?3, updated_at = ?3
         WHERE id = ?1",
        params![id as i64, reason, ts(now)],
    )?;
    if alert {
        tx.execute(
            "INSERT INTO alerts (kind, vm, message, raised_at) VALUES ('failed-job', ?1, ?2, ?3)",
            params![vm, format!("{kind} job {id} of VM {vm} failed: {reason}"), ts(now)],
        )?;
    }
    Ok(())
}

/// A running job's phase and progress, as its agent reported them.
pub(crate) fn record_progress(
    tx: &rusqlite::Transaction<'_>,
    id: u64,
    report: &Report,
    now: Timestamp,
) -> rusqlite::Result<()> {
    let progress = report.progress.as_ref().map(|p| p.to_string());
    tx.execute(
        "UPDATE jobs SET phase = ?2, progress = coalesce(?3, progress), updated_at = ?4
         WHERE id = ?1",
        params![id as i64, report.phase, progress, ts(now)],
    )
    .map(|_| ())
}

pub(crate) fn insert_point(
    tx: &rusqlite::Transaction<'_>,
    vm: &str,
    vault: &str,
    job: Option<u64>,
    p: &PointReport,
) -> rusqlite::Result<()> {
    insert_point_as(
        tx,
        vm,
        vault,
        job,
        p,
        if p.held_until.is_some() { "snapshot-and-vault" } else { "vault" },
    )
}

/// Records a point in `tier`; a point recorded before (its snapshot tier, a report sent
/// again) takes the newer figures and tier.
pub(crate) fn insert_point_as(
    tx: &rusqlite::Transaction<'_>,
    vm: &str,
    vault: &str,
    job: Option<u64>,
    p: &PointReport,
    tier: &str,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO points (vm, point, job, tier, captured_at, consistency, vault, size,
             bytes_scanned, bytes_changed, bytes_stored, duration_ms, held_until)
         VALUES (?1, ?2, ?3, ?12, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?13)
         ON CONFLICT (vm, point) DO UPDATE SET job = coalesce(points.job, excluded.job),
             tier = excluded.tier, size = excluded.size, bytes_scanned = excluded.bytes_scanned,
             bytes_changed = excluded.bytes_changed, bytes_stored = excluded.bytes_stored,
             duration_ms = excluded.duration_ms, held_until = excluded.held_until
         WHERE points.job IS NULL OR points.job = excluded.job",
        params![
            vm,
            p.id,
            job.map(|j| j as i64),
            ts(p.captured_at),
            p.consistency,
            vault,
            p.size as i64,
            p.bytes_scanned as i64,
            p.bytes_changed as i64,
            p.bytes_stored as i64,
            p.duration_ms as i64,
            tier,
            p.held_until.map(ts)
        ],
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{dispatch, plan};

    use crate::testing::{at, catalogue, restores};

    fn setup(dir: &tempfile::TempDir) -> Catalogue {
        catalogue(dir, &[("web-1", true)], "v")
    }

    fn point(id: &str) -> PointReport {
        PointReport {
            id: id.into(),
            captured_at: at("2026-06-01T02:01:00Z"),
            consistency: "crash".into(),
            ..PointReport::default()
        }
    }

    #[test]
    fn a_job_stays_with_the_agent_that_claimed_it_when_its_vm_moves() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = setup(&dir);
        let now = at("2026-06-01T03:00:00Z");
        plan(&mut c, now).unwrap();
        dispatch(&mut c, &cairn_policy::Limits::default(), now).unwrap();
        let job = c.claim("kvm-1", &[], &restores(), now).unwrap().jobs[0].clone();
        assert_eq!(job.catalogue, c.id());
        // The VM moves to kvm-2 while kvm-1 runs its job.
        let mut moved = c.vms().unwrap()[0].clone();
        moved.host = "kvm-2".into();
        c.protect(&moved, now).unwrap();
        let other = c.claim("kvm-2", &[], &restores(), now).unwrap();
        assert!(other.jobs.is_empty(), "not handed to a second host: {other:?}");
        let running = Report { state: "running".into(), ..Report::default() };
        assert_eq!(c.report("kvm-2", job.id, &running, now).unwrap(), ReportOutcome::NotYours);
        // kvm-1 still owns it: its report is taken, and its poll is not told to stop.
        assert_eq!(c.report("kvm-1", job.id, &running, now).unwrap(), ReportOutcome::Recorded);
        assert!(c.claim("kvm-1", &[job.id], &restores(), now).unwrap().cancel.is_empty());
        let done = Report { state: "done".into(), point: Some(point("p1")), ..Report::default() };
        assert_eq!(c.report("kvm-1", job.id, &done, now).unwrap(), ReportOutcome::Recorded);
    }

    #[test]
    fn a_point_stays_its_own_jobs_and_a_snapshot_gives_way_to_the_committed_point() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = setup(&dir);
        let now = at("2026-06-01T03:00:00Z");
        let first = c.back_up_now("web-1", None, now).unwrap();
        let second = c.back_up_now("web-1", None, at("2026-06-01T03:00:01Z")).unwrap();
        let now = at("2026-06-01T03:00:02Z");
        let limits = cairn_policy::Limits { per_host: 4, per_datastore: 4, per_vault: 4 };
        dispatch(&mut c, &limits, now).unwrap();
        c.claim("kvm-1", &[], &restores(), now).unwrap();
        let done =
            |p: PointReport| Report { state: "done".into(), point: Some(p), ..Report::default() };
        assert_eq!(
            c.report("kvm-1", first, &done(point("p1")), now).unwrap(),
            ReportOutcome::Recorded
        );
        // Another job naming p1: refused, and p1 stays the first job's.
        let outcome = c.report("kvm-1", second, &done(point("p1")), now).unwrap();
        assert!(matches!(outcome, ReportOutcome::Invalid(_)), "{outcome:?}");
        let held = PointReport { held_until: Some(at("2026-06-02T03:00:00Z")), ..point("p1") };
        let running = Report { state: "running".into(), point: Some(held), ..Report::default() };
        c.report("kvm-1", second, &running, now).unwrap();
        let points = c.points(Some("web-1")).unwrap();
        assert_eq!(
            (points.len(), points[0].job, points[0].tier.as_str()),
            (1, Some(first), "vault")
        );
        // The second job's own snapshot is in the snapshot tier, then gives way to its
        // committed point (a new attempt's snapshot would have replaced it).
        let snap = PointReport { held_until: Some(at("2026-06-02T03:00:00Z")), ..point("p2") };
        let running =
            Report { state: "running".into(), point: Some(snap.clone()), ..Report::default() };
        c.report("kvm-1", second, &running, now).unwrap();
        let tier = |c: &Catalogue, id: &str| {
            c.points(Some("web-1")).unwrap().into_iter().find(|p| p.point == id).map(|p| p.tier)
        };
        assert_eq!(tier(&c, "p2").as_deref(), Some("snapshot"));
        assert_eq!(c.report("kvm-1", second, &done(snap), now).unwrap(), ReportOutcome::Recorded);
        assert_eq!(tier(&c, "p2").as_deref(), Some("snapshot-and-vault"));
        // Its views' time over: the vault alone.
        c.check_transfers(at("2026-06-02T03:00:00Z")).unwrap();
        assert_eq!(tier(&c, "p2").as_deref(), Some("vault"));
    }

    #[test]
    fn an_offline_backup_is_taken_only_for_a_past_time_of_the_vms_schedule() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = setup(&dir);
        let now = at("2026-06-03T03:00:00Z");
        let run =
            |t: &str| OfflineRun { vm: "web-1".into(), scheduled_at: at(t), point: point("p") };
        for bad in ["2026-06-02T02:00:01Z", "2026-06-02T13:00:00Z", "2026-06-04T02:00:00Z"] {
            let outcome = c.record_offline("kvm-1", &run(bad), now).unwrap();
            assert!(matches!(outcome, ReportOutcome::Invalid(_)), "{bad}: {outcome:?}");
        }
        assert_eq!(
            c.record_offline("kvm-2", &run("2026-06-02T02:00:00Z"), now).unwrap(),
            ReportOutcome::NotYours
        );
        assert_eq!(
            c.record_offline("kvm-1", &run("2026-06-02T02:00:00Z"), now).unwrap(),
            ReportOutcome::Recorded
        );
        let jobs = c.jobs(Some("web-1")).unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].state, crate::JobState::Done);
        assert_eq!(c.points(Some("web-1")).unwrap().len(), 1);
        // Reported again (a lost answer): nothing doubles.
        c.record_offline("kvm-1", &run("2026-06-02T02:00:00Z"), now).unwrap();
        assert_eq!(c.points(Some("web-1")).unwrap().len(), 1);
    }
}
