//! Points in the catalogue, backups on demand, and what the dashboard and `/metrics` read.

use jiff::Timestamp;
use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use crate::catalogue::{parse_ts, ts};
use crate::{Catalogue, Error};

/// A recovery point as the catalogue knows it (the vault holds the point itself).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PointRecord {
    /// The VM.
    pub vm: String,
    /// The point id.
    pub point: String,
    /// The job that made it.
    pub job: Option<u64>,
    /// `vault` (the snapshot tiers come with two-phase jobs).
    pub tier: String,
    /// The vault.
    pub vault: String,
    /// When the disks were captured.
    pub captured_at: Timestamp,
    /// The consistency reached.
    pub consistency: Option<String>,
    /// Bytes of disk.
    pub size: u64,
    /// Bytes read and hashed.
    pub bytes_scanned: u64,
    /// Bytes of changed blocks.
    pub bytes_changed: u64,
    /// Bytes written to the vault.
    pub bytes_stored: u64,
    /// How long the job took.
    pub duration_ms: u64,
    /// Soft-deleted in the vault then (retention expired it, or its VM's data was deleted);
    /// purged once its grace has passed.
    pub expired_at: Option<Timestamp>,
    /// Its views are kept on its host until then (instant restores).
    pub held_until: Option<Timestamp>,
    /// When a restore drill last ran over it (as of the last rescan of its vault).
    pub drilled_at: Option<Timestamp>,
    /// Whether that drill passed: the point is known to restore.
    pub drill_passed: Option<bool>,
}

/// A VM's standing: its last good point and how old that is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VmStanding {
    /// The VM.
    pub vm: String,
    /// Its policy.
    pub policy: Option<String>,
    /// Protected or not.
    pub protected: bool,
    /// Its newest point's capture.
    pub last_point_at: Option<Timestamp>,
    /// Its newest point.
    pub last_point: Option<String>,
    /// Seconds since then (the recovery point objective actually met).
    pub rpo_seconds: Option<i64>,
    /// Its live points (not soft-deleted).
    pub points: u64,
    /// Its newest live point a restore drill passed on (known to restore).
    pub known_good: Option<String>,
    /// Its last drill (over any live point): when, and whether it passed.
    pub last_drill: Option<(Timestamp, bool)>,
    /// State of its latest job.
    pub last_job_state: Option<String>,
}

/// Jobs counted per state and kind, for `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct JobCounts {
    /// (kind, state, count).
    pub by_state: Vec<(String, String, u64)>,
}

impl Catalogue {
    /// The points of `vm` (every VM's when `None`), oldest first.
    pub fn points(&self, vm: Option<&str>) -> Result<Vec<PointRecord>, Error> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT vm, point, job, tier, vault, captured_at, consistency, size,
                        bytes_scanned, bytes_changed, bytes_stored, duration_ms, expired_at,
                        held_until, drilled_at, drill_passed
                 FROM points WHERE ?1 IS NULL OR vm = ?1 ORDER BY captured_at, vm",
            )
            .map_err(Error::sql("listing points"))?;
        let rows = stmt
            .query_map([vm], |r| {
                Ok(PointRecord {
                    vm: r.get(0)?,
                    point: r.get(1)?,
                    job: r.get::<_, Option<i64>>(2)?.map(i64::unsigned_abs),
                    tier: r.get(3)?,
                    vault: r.get(4)?,
                    captured_at: parse_ts(r.get(5)?)?,
                    consistency: r.get(6)?,
                    size: r.get::<_, i64>(7)?.unsigned_abs(),
                    bytes_scanned: r.get::<_, i64>(8)?.unsigned_abs(),
                    bytes_changed: r.get::<_, i64>(9)?.unsigned_abs(),
                    bytes_stored: r.get::<_, i64>(10)?.unsigned_abs(),
                    duration_ms: r.get::<_, i64>(11)?.unsigned_abs(),
                    expired_at: r.get::<_, Option<i64>>(12)?.map(parse_ts).transpose()?,
                    held_until: r.get::<_, Option<i64>>(13)?.map(parse_ts).transpose()?,
                    drilled_at: r.get::<_, Option<i64>>(14)?.map(parse_ts).transpose()?,
                    drill_passed: r.get(15)?,
                })
            })
            .map_err(Error::sql("listing points"))?;
        rows.collect::<Result<_, _>>().map_err(Error::sql("listing points"))
    }

    /// Queues a backup of `vm` now, with its own retention (`retain_until`), outside its
    /// schedule. Returns the job id.
    pub fn back_up_now(
        &mut self,
        vm: &str,
        retain_until: Option<Timestamp>,
        now: Timestamp,
    ) -> Result<u64, Error> {
        let known: Option<String> = self
            .conn
            .query_row("SELECT name FROM vms WHERE name = ?1", [vm], |r| r.get(0))
            .optional()
            .map_err(Error::sql(format!("finding VM {vm}")))?;
        if known.is_none() {
            return Err(Error::Unknown {
                kind: "VM",
                name: vm.into(),
                hint: "protect it first (`protect`), or list VMs with `vms`",
            });
        }
        let id: i64 = self
            .conn
            .query_row(
                "INSERT INTO jobs (vm, kind, scheduled_at, start_at, state, retain_until,
                     created_at, updated_at)
                 VALUES (?1, 'backup', ?2, ?2, 'queued', ?3, ?2, ?2) RETURNING id",
                params![vm, ts(now), retain_until.map(ts)],
                |r| r.get(0),
            )
            .map_err(|e| {
                crate::restores::same_instant(e, vm, &format!("queueing a backup of VM {vm}"))
            })?;
        Ok(id.unsigned_abs())
    }

    /// Each VM with its last point and RPO at `now`.
    pub fn standings(&self, now: Timestamp) -> Result<Vec<VmStanding>, Error> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT v.name, v.policy, v.protected,
                        (SELECT max(captured_at) FROM points p
                             WHERE p.vm = v.name AND p.expired_at IS NULL AND p.tier != 'snapshot'),
                        (SELECT point FROM points p WHERE p.vm = v.name AND p.expired_at IS NULL AND p.tier != 'snapshot'
                             ORDER BY captured_at DESC LIMIT 1),
                        (SELECT count(*) FROM points p
                             WHERE p.vm = v.name AND p.expired_at IS NULL AND p.tier != 'snapshot'),
                        (SELECT state FROM jobs j WHERE j.vm = v.name AND j.kind = 'backup'
                             ORDER BY scheduled_at DESC, id DESC LIMIT 1),
                        (SELECT point FROM points p WHERE p.vm = v.name AND p.expired_at IS NULL
                             AND p.drill_passed = 1 ORDER BY captured_at DESC LIMIT 1),
                        (SELECT drilled_at FROM points p WHERE p.vm = v.name AND p.expired_at IS NULL
                             AND p.drilled_at IS NOT NULL ORDER BY drilled_at DESC LIMIT 1),
                        (SELECT drill_passed FROM points p WHERE p.vm = v.name AND p.expired_at IS NULL
                             AND p.drilled_at IS NOT NULL ORDER BY drilled_at DESC LIMIT 1)
                 FROM vms v ORDER BY v.name",
            )
            .map_err(Error::sql("reading the VMs' standing"))?;
        let rows = stmt
            .query_map([], |r| {
                let last: Option<Timestamp> =
                    r.get::<_, Option<i64>>(3)?.map(parse_ts).transpose()?;
                Ok(VmStanding {
                    vm: r.get(0)?,
                    policy: r.get(1)?,
                    protected: r.get(2)?,
                    last_point_at: last,
                    last_point: r.get(4)?,
                    // A point stamped ahead of the coordinator's clock (skew) counts as fresh.
                    rpo_seconds: last.map(|t| now.duration_since(t).as_secs().max(0)),
                    points: r.get::<_, i64>(5)?.unsigned_abs(),
                    last_job_state: r.get(6)?,
                    known_good: r.get(7)?,
                    last_drill: match (r.get::<_, Option<i64>>(8)?, r.get::<_, Option<bool>>(9)?) {
                        (Some(at), Some(passed)) => Some((parse_ts(at)?, passed)),
                        _ => None,
                    },
                })
            })
            .map_err(Error::sql("reading the VMs' standing"))?;
        rows.collect::<Result<_, _>>().map_err(Error::sql("reading the VMs' standing"))
    }

    /// Raises an `rpo` alert for each protected VM whose newest live point is older than its
    /// policy allows (one schedule interval plus the transfer deadline), once until a newer
    /// point clears it. Returns the VMs newly alerted. A VM with no point yet is left to the
    /// failed-job and missed-schedule alerts.
    pub fn check_rpo(&mut self, now: Timestamp) -> Result<Vec<String>, Error> {
        let what = "checking the VMs' recovery point objectives";
        let rows: Vec<(String, String, Option<i64>, bool)> = {
            let mut stmt = self
                .conn
                .prepare(
                    "SELECT v.name, v.policy,
                        (SELECT max(captured_at) FROM points p
                             WHERE p.vm = v.name AND p.expired_at IS NULL AND p.tier != 'snapshot'),
                        EXISTS (SELECT 1 FROM alerts a
                             WHERE a.vm = v.name AND a.kind = 'rpo' AND a.cleared_at IS NULL)
                     FROM vms v WHERE v.protected = 1 AND v.policy IS NOT NULL",
                )
                .map_err(Error::sql(what))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .map_err(Error::sql(what))?;
            rows.collect::<Result<_, _>>().map_err(Error::sql(what))?
        };
        let mut raised = vec![];
        let mut policies: std::collections::HashMap<String, Option<jiff::SignedDuration>> =
            Default::default();
        for (vm, policy, last, alerted) in rows {
            let Some(last) = last.map(parse_ts).transpose().map_err(Error::sql(what))? else {
                continue;
            };
            if !policies.contains_key(&policy) {
                let allowed = self.policy(&policy).ok().and_then(|p| {
                    let a = p.schedule.next_after(now)?;
                    let b = p.schedule.next_after(a)?;
                    b.duration_since(a).checked_add(p.transfer_deadline)
                });
                policies.insert(policy.clone(), allowed);
            }
            let Some(allowed) = policies[&policy] else { continue };
            let age = now.duration_since(last);
            if age > allowed && !alerted {
                let message = format!(
                    "VM {vm}'s newest point is {} h old; policy {policy} allows {} h (one \
                     interval of its schedule plus its transfer deadline)",
                    age.as_hours(),
                    allowed.as_hours()
                );
                self.conn
                    .execute(
                        "INSERT INTO alerts (kind, vm, message, raised_at) VALUES ('rpo', ?1, ?2, ?3)",
                        params![vm, message, ts(now)],
                    )
                    .map_err(Error::sql(what))?;
                raised.push(vm);
            } else if age <= allowed && alerted {
                self.conn
                    .execute(
                        "UPDATE alerts SET cleared_at = ?2
                         WHERE vm = ?1 AND kind = 'rpo' AND cleared_at IS NULL",
                        params![vm, ts(now)],
                    )
                    .map_err(Error::sql(what))?;
            }
        }
        Ok(raised)
    }

    /// The two phases' bookkeeping at `now`: points whose views' time is over leave the
    /// snapshot tier, and each running backup past its policy's transfer deadline raises one
    /// `late-transfer` alert. Returns the jobs newly late.
    pub fn check_transfers(&mut self, now: Timestamp) -> Result<Vec<u64>, Error> {
        let what = "checking transfers against their deadlines";
        self.conn
            .execute(
                "UPDATE points SET tier = 'vault'
                 WHERE tier = 'snapshot-and-vault' AND held_until <= ?1",
                [ts(now)],
            )
            .map_err(Error::sql(what))?;
        let running: Vec<(i64, String, i64, String)> = {
            let mut stmt = self
                .conn
                .prepare(
                    "SELECT id, vm, scheduled_at, policy FROM jobs
                     WHERE state = 'running' AND kind = 'backup' AND late_at IS NULL
                         AND policy IS NOT NULL",
                )
                .map_err(Error::sql(what))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .map_err(Error::sql(what))?;
            rows.collect::<Result<_, _>>().map_err(Error::sql(what))?
        };
        let mut late = vec![];
        for (id, vm, scheduled, policy) in running {
            let Ok(p) = self.policy(&policy) else { continue };
            let scheduled = parse_ts(scheduled).map_err(Error::sql(what))?;
            let Ok(deadline) = scheduled.checked_add(p.transfer_deadline) else { continue };
            if now <= deadline {
                continue;
            }
            let message = format!(
                "the transfer of VM {vm}'s backup of {scheduled} (job {id}) has not ended by its \
                 deadline {deadline} (policy {policy}): check the host's transfer queue, its \
                 bandwidth and the vault"
            );
            let tx = self.conn.transaction().map_err(Error::sql(what))?;
            raise_late(&tx, id, &vm, &message, now).map_err(Error::sql(what))?;
            tx.commit().map_err(Error::sql(what))?;
            late.push(id.unsigned_abs());
        }
        Ok(late)
    }

    /// Jobs counted per kind and state.
    pub fn job_counts(&self) -> Result<JobCounts, Error> {
        let mut stmt = self
            .conn
            .prepare("SELECT kind, state, count(*) FROM jobs GROUP BY kind, state ORDER BY 1, 2")
            .map_err(Error::sql("counting jobs"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)?.unsigned_abs())))
            .map_err(Error::sql("counting jobs"))?;
        Ok(JobCounts {
            by_state: rows.collect::<Result<_, _>>().map_err(Error::sql("counting jobs"))?,
        })
    }

    /// Alerts not yet sent to the webhook: id, kind, VM, message, raised.
    #[allow(clippy::type_complexity)]
    pub(crate) fn unsent_alerts(
        &self,
    ) -> Result<Vec<(u64, String, Option<String>, String, Timestamp)>, Error> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, kind, vm, message, raised_at FROM alerts
                 WHERE notified_at IS NULL ORDER BY id LIMIT 100",
            )
            .map_err(Error::sql("listing unsent alerts"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?.unsigned_abs(),
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    parse_ts(r.get(4)?)?,
                ))
            })
            .map_err(Error::sql("listing unsent alerts"))?;
        rows.collect::<Result<_, _>>().map_err(Error::sql("listing unsent alerts"))
    }

    /// Notes that alert `id` reached the webhook.
    pub(crate) fn alert_sent(&mut self, id: u64, now: Timestamp) -> Result<(), Error> {
        self.conn
            .execute(
                "UPDATE alerts SET notified_at = ?2 WHERE id = ?1",
                params![id as i64, ts(now)],
            )
            .map(|_| ())
            .map_err(Error::sql("noting a sent alert"))
    }
}

/// Raises job `id`'s `late-transfer` alert, once (`jobs.late_at` remembers it).
pub(crate) fn raise_late(
    tx: &rusqlite::Transaction<'_>,
    id: i64,
    vm: &str,
    message: &str,
    now: Timestamp,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO alerts (kind, vm, message, raised_at)
         SELECT 'late-transfer', ?1, ?2, ?3 FROM jobs WHERE id = ?4 AND late_at IS NULL",
        params![vm, message, ts(now), id],
    )?;
    tx.execute(
        "UPDATE jobs SET late_at = coalesce(late_at, ?2) WHERE id = ?1",
        params![id, ts(now)],
    )?;
    Ok(())
}
