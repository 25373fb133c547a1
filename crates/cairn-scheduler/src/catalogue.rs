//! The catalogue: the coordinator's state in one SQLite database.
//!
//! Schema changes are numbered migrations applied in order inside one transaction each, the
//! number kept in SQLite's `user_version`; a database from a newer coordinator is refused. One
//! coordinator holds the database at a time: the connection takes SQLite's exclusive lock at
//! open and keeps it (`locking_mode = EXCLUSIVE`), so a second coordinator is refused at once,
//! saying so. Timestamps are stored as Unix milliseconds (integers compare and index in time
//! order).

use std::path::Path;
use std::str::FromStr;

use jiff::Timestamp;
use rusqlite::{Connection, OptionalExtension, params};

use crate::Error;

/// The migrations, in order: migration N takes the schema from version N to N+1.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE policies (
         name TEXT PRIMARY KEY,
         spec TEXT NOT NULL,          -- the policy file (TOML) as given
         updated_at INTEGER NOT NULL
     );
     CREATE TABLE vms (
         name TEXT PRIMARY KEY,
         host TEXT NOT NULL,          -- the agent that backs it up
         datastore TEXT NOT NULL,
         vault TEXT NOT NULL,
         policy TEXT REFERENCES policies(name),
         protected INTEGER NOT NULL DEFAULT 1,
         planned_until INTEGER NOT NULL, -- scheduled times up to here have become jobs
         next_at INTEGER                 -- its next scheduled time, when protected
     );
     CREATE INDEX vms_by_next ON vms (next_at);
     CREATE TABLE jobs (
         id INTEGER PRIMARY KEY,
         vm TEXT NOT NULL REFERENCES vms(name),
         kind TEXT NOT NULL,          -- backup, prune, gc, restore
         scheduled_at INTEGER NOT NULL,  -- the policy's time, before jitter
         start_at INTEGER NOT NULL,      -- with the VM's jitter
         state TEXT NOT NULL,         -- queued, running, done, failed
         phase TEXT,
         attempt INTEGER NOT NULL DEFAULT 0,
         reason TEXT,
         created_at INTEGER NOT NULL,
         updated_at INTEGER NOT NULL,
         UNIQUE (vm, kind, scheduled_at)
     );
     CREATE INDEX jobs_by_state ON jobs (state, start_at);
     CREATE TABLE points (
         vm TEXT NOT NULL,
         point TEXT NOT NULL,
         job INTEGER UNIQUE REFERENCES jobs(id),  -- one point per job, whatever the retries
         tier TEXT NOT NULL,          -- snapshot, vault, snapshot-and-vault
         captured_at INTEGER NOT NULL,
         consistency TEXT,
         PRIMARY KEY (vm, point)
     );
     CREATE TABLE agents (
         id INTEGER PRIMARY KEY,
         name TEXT UNIQUE NOT NULL,
         token_hash TEXT NOT NULL,
         revoked INTEGER NOT NULL DEFAULT 0,
         enrolled_at INTEGER NOT NULL,
         last_seen INTEGER
     );
     CREATE TABLE alerts (
         id INTEGER PRIMARY KEY,
         kind TEXT NOT NULL,          -- failed-job, late-transfer, missed-schedule, rpo
         vm TEXT,
         message TEXT NOT NULL,
         raised_at INTEGER NOT NULL,
         cleared_at INTEGER
     );
     CREATE TABLE audit (
         id INTEGER PRIMARY KEY,
         at INTEGER NOT NULL,
         who TEXT NOT NULL,
         action TEXT NOT NULL,
         details TEXT NOT NULL
     );",
    // 2: the users of the API and the dashboard.
    "CREATE TABLE users (
         name TEXT PRIMARY KEY,
         role TEXT NOT NULL,          -- viewer, operator, admin
         token_hash TEXT UNIQUE NOT NULL,
         created_at INTEGER NOT NULL,
         revoked INTEGER NOT NULL DEFAULT 0
     );",
    // 3: agents at work: enrollment, jobs handed out and reported, points with their figures,
    // alerts sent to the webhook.
    "CREATE TABLE enrollments (
         token_hash TEXT PRIMARY KEY,
         host TEXT NOT NULL,
         created_at INTEGER NOT NULL,
         expires_at INTEGER NOT NULL,
         used_at INTEGER
     );
     ALTER TABLE jobs ADD COLUMN claimed_at INTEGER;   -- handed to its agent (NULL: not yet)
     ALTER TABLE jobs ADD COLUMN progress TEXT;        -- the agent's last report (JSON)
     ALTER TABLE jobs ADD COLUMN retain_until INTEGER; -- a back-up-now's own retention
     ALTER TABLE jobs ADD COLUMN finished_at INTEGER;
     ALTER TABLE points ADD COLUMN vault TEXT NOT NULL DEFAULT '';
     ALTER TABLE points ADD COLUMN size INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE points ADD COLUMN bytes_scanned INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE points ADD COLUMN bytes_changed INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE points ADD COLUMN bytes_stored INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE points ADD COLUMN duration_ms INTEGER NOT NULL DEFAULT 0;
     CREATE INDEX points_by_time ON points (vm, captured_at);
     ALTER TABLE alerts ADD COLUMN notified_at INTEGER;",
    // 4: the catalogue's own id (written into every point's origin with the job id, so that a
    // catalogue made again cannot mistake an old point for its job's), which agent claimed a
    // job, the policy a job was planned from (none for a back-up-now), when it started.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     INSERT INTO meta (key, value) VALUES ('catalogue-id', lower(hex(randomblob(16))));
     ALTER TABLE jobs ADD COLUMN started_at INTEGER;
     ALTER TABLE jobs ADD COLUMN claimed_by TEXT;
     ALTER TABLE jobs ADD COLUMN policy TEXT;
     UPDATE jobs SET policy = (SELECT policy FROM vms WHERE vms.name = jobs.vm)
         WHERE retain_until IS NULL;",
    // 5: retention and space on schedule: points soft-deleted in their vault, upkeep runs.
    "ALTER TABLE points ADD COLUMN expired_at INTEGER; -- soft-deleted in the vault (NULL: live)
     CREATE TABLE upkeep_runs (
         id INTEGER PRIMARY KEY,
         vault TEXT NOT NULL,
         scheduled_at INTEGER NOT NULL,
         started_at INTEGER NOT NULL,
         finished_at INTEGER,
         state TEXT NOT NULL,         -- running, done, failed
         who TEXT NOT NULL,           -- schedule, or the user who asked
         summary TEXT,                -- what it did, or why it failed
         report TEXT                  -- JSON: each point's fate, what gc freed
     );",
    // 6: two phases: a point's views kept on its host, a transfer past its deadline.
    "ALTER TABLE points ADD COLUMN held_until INTEGER; -- views kept on the host until then
     ALTER TABLE jobs ADD COLUMN late_at INTEGER;      -- late-transfer alert raised then",
    // 7: restores through the coordinator: a restore job's order, and what it wrote.
    "ALTER TABLE jobs ADD COLUMN restore TEXT;        -- JSON: the point, disk, folder
     ALTER TABLE jobs ADD COLUMN restored TEXT;       -- JSON: the files its agent wrote",
    // 8: sessions opened by logging in from the local user file.
    "CREATE TABLE sessions (
         token_hash TEXT PRIMARY KEY,
         name TEXT NOT NULL,
         role TEXT NOT NULL,          -- the user's role at login
         created_at INTEGER NOT NULL,
         expires_at INTEGER NOT NULL
     );",
    // 9: restore drills: the last drill's outcome noted on each point in its vault.
    "ALTER TABLE points ADD COLUMN drilled_at INTEGER;  -- the last drill (NULL: never drilled)
     ALTER TABLE points ADD COLUMN drill_passed INTEGER; -- 1: it restored; 0: it failed",
];

/// The coordinator's database, held exclusively.
pub struct Catalogue {
    pub(crate) conn: Connection,
    path: String,
    id: String,
}

/// What a planning pass decided for one VM.
pub(crate) struct VmPlan {
    pub(crate) vm: String,
    /// Its policy.
    pub(crate) policy: String,
    /// The job to queue: its scheduled time and its jittered start.
    pub(crate) job: Option<(Timestamp, Timestamp)>,
    /// Scheduled times missed.
    pub(crate) missed: Vec<Timestamp>,
    /// Planned up to here.
    pub(crate) until: Timestamp,
    /// The next scheduled time after that.
    pub(crate) next_at: Option<Timestamp>,
}

/// A protected (or formerly protected) VM.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VmRecord {
    /// Its name.
    pub name: String,
    /// The agent (host) that backs it up.
    pub host: String,
    /// The datastore its disks are on.
    pub datastore: String,
    /// The vault its points go to.
    pub vault: String,
    /// Its policy, if protected by one.
    pub policy: Option<String>,
    /// Whether its schedule runs.
    pub protected: bool,
    /// Scheduled times up to here have become jobs (or missed-schedule alerts).
    pub planned_until: Timestamp,
}

/// What a user of the API may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Read everything.
    Viewer,
    /// Also protect VMs, back up now, restore.
    Operator,
    /// Also change policies, users and agents.
    Admin,
}

impl Role {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        Ok(match s {
            "viewer" => Role::Viewer,
            "operator" => Role::Operator,
            "admin" => Role::Admin,
            other => {
                return Err(format!("{other:?} is not a role: give viewer, operator or admin"));
            }
        })
    }
}

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for its start time or for room (admission).
    Queued,
    /// Handed to its agent.
    Running,
    /// Finished with a committed point.
    Done,
    /// Finished without one.
    Failed,
}

impl JobState {
    /// Its name in the database and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
        }
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<JobState, String> {
        Ok(match s {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "done" => JobState::Done,
            "failed" => JobState::Failed,
            other => return Err(format!("unknown job state {other:?}")),
        })
    }
}

/// A job as the catalogue keeps it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct JobRecord {
    /// Its id, recorded with the point it commits.
    pub id: u64,
    /// The VM.
    pub vm: String,
    /// `backup`, `prune`, `gc`, `restore`.
    pub kind: String,
    /// The policy's time.
    pub scheduled_at: Timestamp,
    /// When it may start (with the VM's jitter).
    pub start_at: Timestamp,
    /// Where it is.
    pub state: JobState,
    /// Why it waits or failed.
    pub reason: Option<String>,
    /// Where a running job is (`snapshot`, `transfer`, `commit`, `done`), as its agent said.
    pub phase: Option<String>,
    /// Hand-outs so far (more than 1: handed out again after its agent lost it).
    pub attempt: u32,
    /// The agent's last progress report (per disk).
    pub progress: Option<serde_json::Value>,
    /// When the dispatcher started it.
    pub started_at: Option<Timestamp>,
    /// When it ended.
    pub finished_at: Option<Timestamp>,
    /// A restore job's order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore: Option<cairn_protocol::RestoreOrder>,
    /// What a done restore job wrote.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restored: Option<cairn_protocol::RestoreReport>,
}

pub(crate) fn ts(t: Timestamp) -> i64 {
    t.as_millisecond()
}

pub(crate) fn parse_ts(ms: i64) -> rusqlite::Result<Timestamp> {
    Timestamp::from_millisecond(ms).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Integer, Box::new(e))
    })
}

impl Catalogue {
    /// Opens (creating if needed) the catalogue at `path`, migrates it, and holds it: a second
    /// coordinator on the same file is refused.
    pub fn open(path: &Path) -> Result<Catalogue, Error> {
        let name = path.display().to_string();
        let conn = Connection::open(path).map_err(Error::sql(format!("opening {name}")))?;
        let busy = |e: rusqlite::Error| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                Error::Held { path: name.clone() }
            }
            _ => Error::Sql { what: format!("locking {name}"), source: e },
        };
        // Refused at once rather than after SQLite's default wait of 5 s.
        conn.busy_timeout(std::time::Duration::ZERO).map_err(busy)?;
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE").map_err(busy)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(busy)?;
        // WAL with NORMAL sync: a crash of the process loses nothing; a power cut may lose the
        // last transactions, which the vaults (the source of truth for points) and the next
        // planning pass make good.
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(busy)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(busy)?;
        // A write transaction takes the exclusive lock, kept until the connection closes.
        conn.execute_batch("BEGIN EXCLUSIVE; COMMIT;").map_err(busy)?;
        let mut catalogue = Catalogue { conn, path: name, id: String::new() };
        catalogue.migrate()?;
        catalogue.id = catalogue
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'catalogue-id'", [], |r| r.get(0))
            .map_err(Error::sql("reading the catalogue's id"))?;
        Ok(catalogue)
    }

    fn migrate(&mut self) -> Result<(), Error> {
        let path = self.path.clone();
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(Error::sql("reading the schema version"))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(Error::TooNew { path, found: version, known });
        }
        for (n, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = self.conn.transaction().map_err(Error::sql("starting a migration"))?;
            tx.execute_batch(sql).map_err(Error::sql(format!("migration {}", n + 1)))?;
            tx.pragma_update(None, "user_version", n as i64 + 1)
                .map_err(Error::sql("recording the schema version"))?;
            tx.commit().map_err(Error::sql(format!("committing migration {}", n + 1)))?;
            tracing::info!(version = n + 1, "catalogue migrated");
        }
        Ok(())
    }

    /// The catalogue's id, random, made with it: points record it with their job id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The schema version.
    pub fn schema_version(&self) -> Result<i64, Error> {
        self.conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(Error::sql("reading the schema version"))
    }

    /// Adds or replaces a policy (its TOML, checked first).
    pub fn put_policy(&mut self, text: &str, now: Timestamp) -> Result<String, Error> {
        let policy = cairn_policy::Policy::parse(text)?;
        let name = policy.spec.name.clone();
        self.conn
            .execute(
                "INSERT INTO policies (name, spec, updated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at",
                params![name, text, ts(now)],
            )
            .map_err(Error::sql(format!("saving policy {name}")))?;
        Ok(name)
    }

    /// The policy named `name`, checked.
    pub fn policy(&self, name: &str) -> Result<cairn_policy::Policy, Error> {
        let text: Option<String> = self
            .conn
            .query_row("SELECT spec FROM policies WHERE name = ?1", [name], |r| r.get(0))
            .optional()
            .map_err(Error::sql(format!("reading policy {name}")))?;
        let text = text.ok_or_else(|| Error::Unknown {
            kind: "policy",
            name: name.into(),
            hint: "list them with `policies`",
        })?;
        Ok(cairn_policy::Policy::parse(&text)?)
    }

    /// Protects `vm` with `policy` from `now` on (its first backup is the policy's next
    /// scheduled time), adding the VM if it is new.
    pub fn protect(&mut self, vm: &VmRecord, now: Timestamp) -> Result<(), Error> {
        let next_at = match (&vm.policy, vm.protected) {
            (Some(policy), true) => self.policy(policy)?.schedule.next_after(now).map(ts),
            (Some(policy), false) => {
                self.policy(policy)?;
                None
            }
            (None, _) => None,
        };
        self.conn
            .execute(
                "INSERT INTO vms (name, host, datastore, vault, policy, protected, planned_until, next_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (name) DO UPDATE SET host = excluded.host,
                     datastore = excluded.datastore, vault = excluded.vault,
                     policy = excluded.policy, protected = excluded.protected,
                     planned_until = max(vms.planned_until, excluded.planned_until),
                     next_at = excluded.next_at",
                params![
                    vm.name,
                    vm.host,
                    vm.datastore,
                    vm.vault,
                    vm.policy,
                    vm.protected,
                    ts(now),
                    next_at
                ],
            )
            .map_err(Error::sql(format!("protecting VM {}", vm.name)))?;
        Ok(())
    }

    /// The protected VMs whose next scheduled time has come by `now`.
    pub(crate) fn due_vms(&self, now: Timestamp) -> Result<Vec<VmRecord>, Error> {
        self.query_vms("WHERE protected = 1 AND policy IS NOT NULL AND next_at <= ?1", ts(now))
    }

    /// Every VM, by name.
    pub fn vms(&self) -> Result<Vec<VmRecord>, Error> {
        self.query_vms("WHERE ?1 IS NOT NULL", 0)
    }

    fn query_vms(&self, filter: &str, arg: i64) -> Result<Vec<VmRecord>, Error> {
        let sql = format!(
            "SELECT name, host, datastore, vault, policy, protected, planned_until
             FROM vms {filter} ORDER BY name"
        );
        let mut stmt = self.conn.prepare_cached(&sql).map_err(Error::sql("listing VMs"))?;
        let rows = stmt
            .query_map([arg], |r| {
                Ok(VmRecord {
                    name: r.get(0)?,
                    host: r.get(1)?,
                    datastore: r.get(2)?,
                    vault: r.get(3)?,
                    policy: r.get(4)?,
                    protected: r.get(5)?,
                    planned_until: parse_ts(r.get(6)?)?,
                })
            })
            .map_err(Error::sql("listing VMs"))?;
        rows.collect::<Result<_, _>>().map_err(Error::sql("listing VMs"))
    }

    /// Records what one planning pass decided, for every VM at once, in one transaction: a
    /// pass interrupted anywhere has done nothing. A job already planned for the same VM and
    /// time is not planned twice. Returns how many jobs were added.
    pub(crate) fn record_plans(
        &mut self,
        plans: &[VmPlan],
        now: Timestamp,
    ) -> Result<usize, Error> {
        let what = "recording a planning pass";
        let tx = self.conn.transaction().map_err(Error::sql(what))?;
        let mut added = 0;
        {
            let mut job = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO jobs
                         (vm, kind, scheduled_at, start_at, state, created_at, updated_at, policy)
                     VALUES (?1, 'backup', ?2, ?3, 'queued', ?4, ?4, ?5)",
                )
                .map_err(Error::sql(what))?;
            let mut alert = tx
                .prepare_cached(
                    "INSERT INTO alerts (kind, vm, message, raised_at)
                     VALUES ('missed-schedule', ?1, ?2, ?3)",
                )
                .map_err(Error::sql(what))?;
            let mut vm = tx
                .prepare_cached("UPDATE vms SET planned_until = ?2, next_at = ?3 WHERE name = ?1")
                .map_err(Error::sql(what))?;
            for p in plans {
                if let Some((scheduled, start)) = p.job {
                    added += job
                        .execute(params![p.vm, ts(scheduled), ts(start), ts(now), p.policy])
                        .map_err(Error::sql(what))?;
                }
                if let (Some(first), Some(last)) = (p.missed.first(), p.missed.last()) {
                    let message = format!(
                        "{} scheduled backup(s) of VM {} were missed while the coordinator was \
                         down ({first} to {last}): the latest is run now",
                        p.missed.len(),
                        p.vm
                    );
                    alert.execute(params![p.vm, message, ts(now)]).map_err(Error::sql(what))?;
                }
                vm.execute(params![p.vm, ts(p.until), p.next_at.map(ts)])
                    .map_err(Error::sql(what))?;
            }
        }
        tx.commit().map_err(Error::sql(what))?;
        Ok(added)
    }

    /// Where the running jobs run.
    pub(crate) fn running_placements(&self) -> Result<Vec<cairn_policy::Placement>, Error> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT v.host, v.datastore, v.vault FROM jobs j JOIN vms v ON v.name = j.vm
                 WHERE j.state = 'running'",
            )
            .map_err(Error::sql("listing running jobs"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(cairn_policy::Placement {
                    host: r.get(0)?,
                    datastore: r.get(1)?,
                    vault: r.get(2)?,
                })
            })
            .map_err(Error::sql("listing running jobs"))?;
        rows.collect::<Result<_, _>>().map_err(Error::sql("listing running jobs"))
    }

    /// Queued jobs whose start time has come: id, start, placement.
    pub(crate) fn due_jobs(
        &self,
        now: Timestamp,
    ) -> Result<Vec<(u64, Timestamp, cairn_policy::Placement)>, Error> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT j.id, j.start_at, v.host, v.datastore, v.vault
                 FROM jobs j JOIN vms v ON v.name = j.vm
                 WHERE j.state = 'queued' AND j.start_at <= ?1",
            )
            .map_err(Error::sql("listing due jobs"))?;
        let rows = stmt
            .query_map([ts(now)], |r| {
                Ok((
                    r.get::<_, i64>(0)?.unsigned_abs(),
                    parse_ts(r.get(1)?)?,
                    cairn_policy::Placement {
                        host: r.get(2)?,
                        datastore: r.get(3)?,
                        vault: r.get(4)?,
                    },
                ))
            })
            .map_err(Error::sql("listing due jobs"))?;
        rows.collect::<Result<_, _>>().map_err(Error::sql("listing due jobs"))
    }

    /// Marks `started` running (one more attempt each) and notes why `waiting` wait, in one
    /// transaction.
    pub(crate) fn record_dispatch(
        &mut self,
        started: &[u64],
        waiting: &[(u64, String)],
        now: Timestamp,
    ) -> Result<(), Error> {
        let what = "recording a dispatch";
        let tx = self.conn.transaction().map_err(Error::sql(what))?;
        {
            let mut start = tx
                .prepare_cached(
                    "UPDATE jobs SET state = 'running', attempt = attempt + 1, reason = NULL,
                         started_at = ?2, updated_at = ?2 WHERE id = ?1 AND state = 'queued'",
                )
                .map_err(Error::sql(what))?;
            for id in started {
                start.execute(params![*id as i64, ts(now)]).map_err(Error::sql(what))?;
            }
            let mut wait = tx
                .prepare_cached("UPDATE jobs SET reason = ?2, updated_at = ?3 WHERE id = ?1")
                .map_err(Error::sql(what))?;
            for (id, why) in waiting {
                wait.execute(params![*id as i64, why, ts(now)]).map_err(Error::sql(what))?;
            }
        }
        tx.commit().map_err(Error::sql(what))
    }

    /// Ends a running job as `state` (done or failed), with a reason for a failure.
    pub fn finish_job(
        &mut self,
        id: u64,
        state: JobState,
        reason: Option<&str>,
        now: Timestamp,
    ) -> Result<(), Error> {
        let changed = self
            .conn
            .execute(
                "UPDATE jobs SET state = ?2, reason = ?3, updated_at = ?4
                 WHERE id = ?1 AND state = 'running'",
                params![id as i64, state.as_str(), reason, ts(now)],
            )
            .map_err(Error::sql(format!("ending job {id}")))?;
        if changed == 0 {
            return Err(Error::Unknown {
                kind: "running job",
                name: id.to_string(),
                hint: "list jobs with `jobs`",
            });
        }
        Ok(())
    }

    /// Adds a user with `role` and a new token, returned once (only its hash is kept).
    pub fn add_user(&mut self, name: &str, role: Role, now: Timestamp) -> Result<String, Error> {
        let token = crate::auth::new_token();
        self.conn
            .execute(
                "INSERT INTO users (name, role, token_hash, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![name, role.as_str(), crate::auth::hash(&token), ts(now)],
            )
            .map_err(Error::sql(format!("adding user {name}")))?;
        Ok(token)
    }

    /// Revokes a user's token and ends their sessions: their next call is refused.
    pub fn revoke_user(&mut self, name: &str) -> Result<(), Error> {
        let what = format!("revoking user {name}");
        let changed = self
            .conn
            .execute("UPDATE users SET revoked = 1 WHERE name = ?1", [name])
            .map_err(Error::sql(what.clone()))?
            + self
                .conn
                .execute("DELETE FROM sessions WHERE name = ?1", [name])
                .map_err(Error::sql(what))?;
        match changed {
            0 => Err(Error::Unknown {
                kind: "user",
                name: name.into(),
                hint: "list them with `users`",
            }),
            _ => Ok(()),
        }
    }

    /// Every user: name, role, revoked.
    pub fn users(&self) -> Result<Vec<(String, String, bool)>, Error> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, role, revoked FROM users ORDER BY name")
            .map_err(Error::sql("listing users"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(Error::sql("listing users"))?;
        rows.collect::<Result<_, _>>().map_err(Error::sql("listing users"))
    }

    /// How many users there are (none: the first start makes an admin).
    pub fn user_count(&self) -> Result<u64, Error> {
        self.conn
            .query_row("SELECT count(*) FROM users", [], |r| r.get::<_, i64>(0))
            .map(i64::unsigned_abs)
            .map_err(Error::sql("counting users"))
    }

    /// The user a token belongs to, with their role; `None` for an unknown or revoked token.
    pub fn user_of(&self, token: &str) -> Result<Option<(String, Role)>, Error> {
        let row: Option<(String, String)> = self
            .conn
            .query_row(
                "SELECT name, role FROM users WHERE token_hash = ?1 AND revoked = 0",
                [crate::auth::hash(token)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(Error::sql("checking a token"))?;
        Ok(row.and_then(|(name, role)| role.parse().ok().map(|role| (name, role))))
    }

    /// Notes a change or a restore in the audit log.
    pub fn audit(
        &mut self,
        who: &str,
        action: &str,
        details: &str,
        now: Timestamp,
    ) -> Result<(), Error> {
        self.conn
            .execute(
                "INSERT INTO audit (at, who, action, details) VALUES (?1, ?2, ?3, ?4)",
                params![ts(now), who, action, details],
            )
            .map(|_| ())
            .map_err(Error::sql("writing the audit log"))
    }

    /// The audit log, oldest first: (time, who, action, details).
    pub fn audit_log(&self) -> Result<Vec<(Timestamp, String, String, String)>, Error> {
        let mut stmt = self
            .conn
            .prepare("SELECT at, who, action, details FROM audit ORDER BY id")
            .map_err(Error::sql("reading the audit log"))?;
        let rows = stmt
            .query_map([], |r| Ok((parse_ts(r.get(0)?)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .map_err(Error::sql("reading the audit log"))?;
        rows.collect::<Result<_, _>>().map_err(Error::sql("reading the audit log"))
    }

    /// Every policy: name and file.
    pub fn policies(&self) -> Result<Vec<(String, String)>, Error> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, spec FROM policies ORDER BY name")
            .map_err(Error::sql("listing policies"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(Error::sql("listing policies"))?;
        rows.collect::<Result<_, _>>().map_err(Error::sql("listing policies"))
    }

    /// The jobs of `vm` (all VMs when `None`), oldest first.
    pub fn jobs(&self, vm: Option<&str>) -> Result<Vec<JobRecord>, Error> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, vm, kind, scheduled_at, start_at, state, reason, phase, attempt,
                        progress, started_at, finished_at, restore, restored FROM jobs
                 WHERE ?1 IS NULL OR vm = ?1 ORDER BY scheduled_at, id",
            )
            .map_err(Error::sql("listing jobs"))?;
        let rows = stmt
            .query_map([vm], |r| {
                let state: String = r.get(5)?;
                Ok(JobRecord {
                    id: r.get::<_, i64>(0)?.unsigned_abs(),
                    vm: r.get(1)?,
                    kind: r.get(2)?,
                    scheduled_at: parse_ts(r.get(3)?)?,
                    start_at: parse_ts(r.get(4)?)?,
                    state: state.parse().map_err(|e: String| {
                        rusqlite::Error::FromSqlConversionFailure(
                            5,
                            rusqlite::types::Type::Text,
                            e.into(),
                        )
                    })?,
                    reason: r.get(6)?,
                    phase: r.get(7)?,
                    attempt: r.get(8)?,
                    progress: r
                        .get::<_, Option<String>>(9)?
                        .and_then(|p| serde_json::from_str(&p).ok()),
                    started_at: r.get::<_, Option<i64>>(10)?.map(parse_ts).transpose()?,
                    finished_at: r.get::<_, Option<i64>>(11)?.map(parse_ts).transpose()?,
                    restore: r
                        .get::<_, Option<String>>(12)?
                        .and_then(|p| serde_json::from_str(&p).ok()),
                    restored: r
                        .get::<_, Option<String>>(13)?
                        .and_then(|p| serde_json::from_str(&p).ok()),
                })
            })
            .map_err(Error::sql("listing jobs"))?;
        rows.collect::<Result<_, _>>().map_err(Error::sql("listing jobs"))
    }

    /// Open alerts (kind, VM, message), oldest first.
    pub fn alerts(&self) -> Result<Vec<(String, Option<String>, String)>, Error> {
        let mut stmt = self
            .conn
            .prepare("SELECT kind, vm, message FROM alerts WHERE cleared_at IS NULL ORDER BY id")
            .map_err(Error::sql("listing alerts"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(Error::sql("listing alerts"))?;
        rows.collect::<Result<_, _>>().map_err(Error::sql("listing alerts"))
    }
}
