//! The agent's loop: enroll once, then poll the coordinator for jobs, run them (at most
//! `max-jobs` at once), report their phases and progress, and deliver every final report, even
//! across restarts of the agent (a report is on disk before it is sent).
//!
//! While the coordinator cannot be reached, the agent retries with backoff and keeps the
//! schedule it last received: a VM's backup whose time comes runs anyway, and is reported when
//! the coordinator is back, which then does not run it again.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cairn_protocol::{
    Clock, JobOrder, OfflineRun, Orders, PointReport, Poll, Report, RestoreOrder, RestoreReport,
};
use jiff::Timestamp;
use tokio::sync::{Semaphore, watch};

use crate::state::OfflineRecord;
use crate::{AgentConfig, Error, State, Transport};

/// A job to run: a coordinator's backup or restore, or a backup at a time of the cached
/// schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    /// The coordinator's job id (`None`: run from the cached schedule).
    pub job: Option<u64>,
    /// The coordinator's catalogue, by its id (job ids are numbered per catalogue).
    pub catalogue: Option<String>,
    /// The VM, by the coordinator's name (the agent's configuration says what it is).
    pub vm: String,
    /// The vault, by the coordinator's name.
    pub vault: String,
    /// The policy's time.
    pub scheduled_at: Timestamp,
    /// The policy.
    pub policy: Option<String>,
    /// Keep the point until then.
    pub retain_until: Option<Timestamp>,
    /// Hand-outs of the job so far.
    pub attempt: u32,
    /// Hours its views are kept on the host for instant restores (0: none).
    pub keep_views_hours: u32,
    /// `backup` or `restore` (the coordinator's job kind).
    pub kind: String,
    /// A restore job's order.
    pub restore: Option<RestoreOrder>,
}

impl From<&JobOrder> for Task {
    fn from(o: &JobOrder) -> Task {
        Task {
            job: Some(o.id),
            catalogue: Some(o.catalogue.clone()),
            vm: o.vm.clone(),
            vault: o.vault.clone(),
            scheduled_at: o.scheduled_at,
            policy: o.policy.clone(),
            retain_until: o.retain_until,
            attempt: o.attempt,
            keep_views_hours: o.keep_views_hours,
            kind: o.kind.clone(),
            restore: o.restore.clone(),
        }
    }
}

/// How a task ended well.
enum Done {
    /// A backup's point.
    Point(PointReport),
    /// What a restore wrote.
    Restored(RestoreReport),
}

/// Where a running task is, for the reports: a phase and the per-disk progress.
#[derive(Clone)]
pub struct JobProgress(watch::Sender<Progressed>);

/// What a running task reports: its phase, per-disk progress, and its point once the
/// snapshot phase made one (tier snapshot until the transfer commits).
#[derive(Clone, Debug, Default)]
struct Progressed {
    phase: Option<String>,
    value: Option<serde_json::Value>,
    point: Option<PointReport>,
}

impl JobProgress {
    fn new() -> JobProgress {
        JobProgress(watch::channel(Progressed::default()).0)
    }

    /// The task entered `phase` (`snapshot`, `queued`, `transfer`).
    pub fn phase(&self, phase: &str) {
        self.0.send_modify(|p| p.phase = Some(phase.to_owned()));
    }

    /// The per-disk progress now.
    pub fn progress(&self, value: serde_json::Value) {
        self.0.send_modify(|p| p.value = Some(value));
    }

    /// The snapshot phase made `point`: restorable from the host's views before its transfer.
    pub fn snapshot_taken(&self, point: PointReport) {
        self.0.send_modify(|p| p.point = Some(point));
    }
}

/// Tells a task to stop (the coordinator no longer wants it, or the agent stops).
#[derive(Clone)]
pub struct Stop(watch::Receiver<bool>);

impl Stop {
    /// Whether the task was told to stop.
    pub fn is_stopped(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits until the task is told to stop.
    pub async fn stopped(&mut self) {
        let _ = self.0.wait_for(|s| *s).await;
    }
}

/// Aborts a task when dropped (the loop's helpers end with it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What runs a task: the agent's backup of one VM into one vault.
#[async_trait]
pub trait Runner: Send + Sync {
    /// Backs the task's VM up, unless the same job already committed a point (a retried
    /// job: that point is returned, and nothing is backed up again). An error is the reason
    /// for the job's failure, for people.
    async fn run(
        &self,
        task: &Task,
        progress: &JobProgress,
        stop: Stop,
    ) -> Result<PointReport, String>;

    /// Restores what `order` names from the task's VM and vault into the host's restore
    /// folder. An error is the reason for the job's failure, for people.
    async fn restore(
        &self,
        _task: &Task,
        _order: &RestoreOrder,
        _progress: &JobProgress,
        _stop: Stop,
    ) -> Result<RestoreReport, String> {
        Err("this agent does not restore".into())
    }

    /// Whether it runs restore jobs (told to the coordinator with every poll).
    fn restores(&self) -> bool {
        false
    }

    /// Called every few seconds with the agent's clock: the runner's own upkeep on the host
    /// (releasing views whose instant-restore time is over).
    async fn housekeeping(&self, _now: Timestamp) {}
}

/// The long-running agent.
pub struct Worker {
    config: AgentConfig,
    state: State,
    transport: Arc<dyn Transport>,
    runner: Arc<dyn Runner>,
    clock: Arc<dyn Clock>,
    /// Running tasks by job id (coordinator jobs) with their stop switch.
    running: Arc<Mutex<HashMap<u64, watch::Sender<bool>>>>,
    /// Jobs the coordinator ended while they still run here: not listed in polls any more
    /// (the coordinator would answer at once, again and again, until they stop).
    cancelled: Arc<Mutex<std::collections::HashSet<u64>>>,
    /// VMs with a task running (one at a time per VM).
    busy: Arc<Mutex<Vec<String>>>,
    /// Held while `offline.json` is read, changed and written.
    offline: Mutex<()>,
    slots: Arc<Semaphore>,
}

/// Retry delays: 1 s doubling to 60 s, each within ±20 %.
struct Backoff(Duration);

impl Backoff {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(60);

    fn next(&mut self) -> Duration {
        let base = self.0;
        self.0 = (self.0 * 2).min(Backoff::MAX);
        base.mul_f64(rand::random_range(0.8..1.2))
    }

    fn reset(&mut self) {
        self.0 = Backoff::FIRST;
    }
}

impl Worker {
    /// A worker with its configuration, state folder, transport, runner and clock.
    pub fn new(
        config: AgentConfig,
        state: State,
        transport: Arc<dyn Transport>,
        runner: Arc<dyn Runner>,
        clock: Arc<dyn Clock>,
    ) -> Worker {
        let slots = Arc::new(Semaphore::new(config.max_jobs));
        Worker {
            config,
            state,
            transport,
            runner,
            clock,
            running: Arc::default(),
            cancelled: Arc::default(),
            busy: Arc::default(),
            offline: Mutex::new(()),
            slots,
        }
    }

    /// The agent's token: kept from an earlier enrollment, or got now with the enrollment
    /// token (retried with backoff while the coordinator cannot be reached).
    pub async fn token(&self) -> Result<String, Error> {
        let file = self
            .config
            .enroll_token_file
            .clone()
            .unwrap_or_else(|| self.state.dir().join("enroll-token"));
        // An enrollment token present means (re-)enroll: it is removed once used.
        let saved = self.state.token();
        let enrollment = match (std::fs::read_to_string(&file), saved) {
            (Ok(e), _) if !e.trim().is_empty() => e,
            (_, Some(token)) => return Ok(token),
            _ => {
                return Err(Error::NotEnrolled { host: self.config.host.clone(), path: file });
            }
        };
        let mut backoff = Backoff(Backoff::FIRST);
        let enrolled = loop {
            match self.transport.enroll(enrollment.trim()).await {
                Ok(e) => break e,
                Err(e) if e.is_transient() => {
                    tracing::warn!("enrolling: {e}; retrying");
                    tokio::time::sleep(backoff.next()).await;
                }
                Err(e) => match self.state.token() {
                    // A used or expired enrollment left behind, and a token of our own.
                    Some(token) => {
                        tracing::warn!(
                            "{e}: {} is set aside, the agent's own token is used",
                            file.display()
                        );
                        let _ = std::fs::remove_file(&file);
                        return Ok(token);
                    }
                    None => return Err(e),
                },
            }
        };
        if enrolled.name != self.config.host {
            tracing::warn!(
                "the enrollment token was made for host {}, this agent's configuration says {}: \
                 the coordinator knows this agent as {}",
                enrolled.name,
                self.config.host,
                enrolled.name
            );
        }
        self.state.save_token(&enrolled.token)?;
        // Used up: nothing more to keep secret.
        let _ = std::fs::remove_file(&file);
        tracing::info!(agent = %enrolled.name, "enrolled");
        Ok(enrolled.token)
    }

    /// Runs until `shutdown` (running tasks are told to stop; nothing half-done is committed,
    /// and the coordinator hands the jobs out again). Returns an error only when the
    /// coordinator refuses the agent (token revoked).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let token = self.token().await?;
        let worker = Arc::new(self);
        tokio::pin!(shutdown);
        let keeper = {
            let worker = worker.clone();
            tokio::spawn(async move {
                loop {
                    worker.runner.housekeeping(worker.clock.now()).await;
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            })
        };
        let _keeper = AbortOnDrop(keeper);
        let mut backoff = Backoff(Backoff::FIRST);
        loop {
            worker.deliver(&token).await;
            let poll = Poll {
                running: worker.running_ids(),
                wait_seconds: worker.config.poll_wait_seconds,
                kinds: if worker.runner.restores() { vec!["restore".into()] } else { vec![] },
            };
            let outcome = tokio::select! {
                _ = &mut shutdown => break,
                outcome = worker.transport.poll(&token, &poll) => outcome,
            };
            let pause = match outcome {
                Ok(orders) => {
                    backoff.reset();
                    worker.take(&token, orders);
                    None
                }
                Err(Error::Refused { status: 401, message, .. }) => {
                    worker.stop_all();
                    return Err(Error::Refused { call: "poll".into(), status: 401, message });
                }
                Err(e) => {
                    tracing::warn!("{e}; retrying, and keeping the cached schedule meanwhile");
                    if e.is_transient() {
                        worker.run_cached_schedule(&token);
                    }
                    Some(backoff.next())
                }
            };
            if let Some(pause) = pause {
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
        worker.stop_all();
        Ok(())
    }

    fn stop_all(&self) {
        for stop in lock(&self.running).values() {
            let _ = stop.send(true);
        }
    }

    /// The jobs the coordinator should count as this agent's: running, or ended with a
    /// report not yet delivered.
    fn running_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = lock(&self.running).keys().copied().collect();
        ids.extend(self.state.pending_reports().into_keys());
        let cancelled = lock(&self.cancelled);
        ids.retain(|id| !cancelled.contains(id));
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Acts on a poll's answer.
    fn take(self: &Arc<Self>, token: &str, orders: Orders) {
        let now = self.clock.now();
        if let Err(e) = self.state.save_schedule(&orders.schedule) {
            tracing::warn!("keeping the schedule: {e}");
        }
        // The coordinator plans while it answers: the cached schedule starts from now.
        let planned: BTreeMap<String, Timestamp> =
            orders.schedule.iter().map(|e| (e.vm.clone(), now)).collect();
        if let Err(e) = self.state.save_planned(&planned) {
            tracing::warn!("keeping the planned times: {e}");
        }
        for id in &orders.cancel {
            lock(&self.cancelled).insert(*id);
            if let Some(stop) = lock(&self.running).get(id) {
                tracing::warn!(job = id, "the coordinator ended the job: stopping it");
                let _ = stop.send(true);
            }
        }
        for order in &orders.jobs {
            if lock(&self.running).contains_key(&order.id) {
                continue;
            }
            self.start(token, Task::from(order));
        }
    }

    /// Starts a task in the background.
    fn start(self: &Arc<Self>, token: &str, task: Task) {
        let (stop_tx, stop_rx) = watch::channel(false);
        if let Some(id) = task.job {
            lock(&self.running).insert(id, stop_tx.clone());
        }
        let worker = self.clone();
        let token = token.to_owned();
        tokio::spawn(async move {
            let _stop_tx = stop_tx;
            worker.execute(&token, task, Stop(stop_rx)).await;
        });
    }

    async fn execute(&self, token: &str, task: Task, stop: Stop) {
        let Ok(_slot) = self.slots.acquire().await else { return };
        // One task per VM at a time: a second waits for the first.
        loop {
            {
                let mut busy = lock(&self.busy);
                if !busy.contains(&task.vm) {
                    busy.push(task.vm.clone());
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let result = self.outcome(token, &task, stop).await;
        match task.job {
            Some(id) => {
                let report = match result {
                    Ok(Done::Point(point)) => Report {
                        state: "done".into(),
                        phase: Some("done".into()),
                        point: Some(point),
                        ..Report::default()
                    },
                    Ok(Done::Restored(restored)) => Report {
                        state: "done".into(),
                        phase: Some("done".into()),
                        restored: Some(restored),
                        ..Report::default()
                    },
                    Err(reason) => {
                        Report { state: "failed".into(), reason: Some(reason), ..Report::default() }
                    }
                };
                if let Err(e) = self.state.save_report(id, &report) {
                    tracing::error!(job = id, "keeping the job's report: {e}");
                }
                lock(&self.running).remove(&id);
                self.deliver_report(token, id, &report).await;
            }
            None => match result {
                Ok(Done::Restored(_)) => {}
                Ok(Done::Point(point)) => {
                    let _held = lock(&self.offline);
                    let mut runs = self.state.offline();
                    runs.push(OfflineRecord {
                        vm: task.vm.clone(),
                        scheduled_at: task.scheduled_at,
                        point,
                        delivered: false,
                    });
                    // The newest hundred delivered ones are enough to recognise a job the
                    // coordinator plans later.
                    // Undelivered ones stay until delivered.
                    let delivered = runs.iter().filter(|r| r.delivered).count();
                    let mut excess = delivered.saturating_sub(100);
                    runs.retain(|r| {
                        let drop = r.delivered && excess > 0;
                        excess -= usize::from(drop);
                        !drop
                    });
                    if let Err(e) = self.state.save_offline(&runs) {
                        tracing::error!(vm = %task.vm, "keeping the offline backup's record: {e}");
                    }
                }
                Err(reason) => tracing::error!(vm = %task.vm, "offline backup failed: {reason}"),
            },
        }
        // The VM is free again only once its outcome is recorded, so that a job for the same
        // time waiting behind an offline backup finds its record.
        lock(&self.busy).retain(|v| v != &task.vm);
    }

    /// Runs the task, or answers from the offline backup already made for the same VM and
    /// time; reports progress every two seconds meanwhile.
    async fn outcome(&self, token: &str, task: &Task, stop: Stop) -> Result<Done, String> {
        if task.job.is_some()
            && task.kind == "backup"
            && let Some(run) = self
                .state
                .offline()
                .into_iter()
                .find(|r| r.vm == task.vm && r.scheduled_at == task.scheduled_at)
        {
            tracing::info!(vm = %task.vm, point = %run.point.id, "already backed up offline for this time");
            return Ok(Done::Point(run.point));
        }
        let progress = JobProgress::new();
        let reporter = task.job.map(|id| {
            let mut seen = progress.0.subscribe();
            let transport = self.transport.clone();
            let token = token.to_owned();
            let stop = lock(&self.running).get(&id).cloned();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    if !seen.has_changed().unwrap_or(false) {
                        continue;
                    }
                    let p = seen.borrow_and_update().clone();
                    let report = Report {
                        state: "running".into(),
                        phase: p.phase,
                        progress: p.value,
                        point: p.point,
                        ..Report::default()
                    };
                    // Ended (410) or no longer this agent's (403): stop.
                    if let Err(Error::Refused { status: 403 | 410, .. }) =
                        transport.report(&token, id, &report).await
                        && let Some(stop) = &stop
                    {
                        let _ = stop.send(true);
                    }
                }
            })
        });
        // By the job's kind: a restore without its order is not run as a backup.
        let result = match (task.kind.as_str(), &task.restore) {
            ("backup", None) => self.runner.run(task, &progress, stop).await.map(Done::Point),
            ("restore", Some(order)) => {
                self.runner.restore(task, order, &progress, stop).await.map(Done::Restored)
            }
            (kind, _) => Err(format!(
                "a {kind} job{} is not one this agent runs: upgrade the agent, or check the \
                 coordinator",
                if task.restore.is_some() { " with a restore order" } else { "" }
            )),
        };
        if let Some(r) = reporter {
            r.abort();
        }
        result
    }

    async fn deliver_report(&self, token: &str, id: u64, report: &Report) {
        match self.transport.report(token, id, report).await {
            Ok(()) => self.state.report_delivered(id),
            // The coordinator has its answer (the job is unknown, another agent's, has its
            // point, or ended): sending it again would change nothing.
            Err(e @ Error::Refused { status: 403 | 404 | 409 | 410, .. }) => {
                tracing::warn!(job = id, "{e}");
                self.state.report_delivered(id);
            }
            // Anything else (unreachable, refused for now): kept and sent again.
            Err(e) => tracing::warn!(job = id, "{e}: the report is kept and sent again"),
        }
    }

    /// Sends what the coordinator has not had yet: final reports, offline backups.
    async fn deliver(&self, token: &str) {
        let running: Vec<u64> = lock(&self.running).keys().copied().collect();
        for (id, report) in self.state.pending_reports() {
            if !running.contains(&id) {
                self.deliver_report(token, id, &report).await;
            }
        }
        let undelivered: Vec<OfflineRecord> = {
            let _held = lock(&self.offline);
            self.state.offline().into_iter().filter(|r| !r.delivered).collect()
        };
        let mut sent = Vec::new();
        for run in undelivered {
            let body = OfflineRun {
                vm: run.vm.clone(),
                scheduled_at: run.scheduled_at,
                point: run.point.clone(),
            };
            match self.transport.offline(token, &body).await {
                Ok(()) => sent.push((run.vm, run.scheduled_at)),
                Err(e @ Error::Refused { status: 403 | 404, .. }) => {
                    tracing::warn!(vm = %run.vm, "the coordinator refused the offline backup: {e}");
                    sent.push((run.vm, run.scheduled_at));
                }
                Err(e) => {
                    tracing::warn!(vm = %run.vm, "{e}: the offline backup is reported again later");
                    break;
                }
            }
        }
        if sent.is_empty() {
            return;
        }
        // Read again: a backup may have finished while the reports were on their way.
        let _held = lock(&self.offline);
        let mut runs = self.state.offline();
        for run in runs.iter_mut() {
            if sent.iter().any(|(vm, at)| *vm == run.vm && *at == run.scheduled_at) {
                run.delivered = true;
            }
        }
        if let Err(e) = self.state.save_offline(&runs) {
            tracing::warn!("{e}");
        }
    }

    /// While the coordinator is away: each VM of the cached schedule whose (jittered) time has
    /// come since it was last planned gets its backup, the latest time only.
    fn run_cached_schedule(self: &Arc<Self>, token: &str) {
        let now = self.clock.now();
        let mut planned = self.state.planned();
        let mut changed = false;
        for entry in self.state.schedule() {
            let Some(since) = planned.get(&entry.vm).copied() else {
                planned.insert(entry.vm.clone(), now);
                changed = true;
                continue;
            };
            let policy = match cairn_policy::Policy::parse(&entry.spec) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(vm = %entry.vm, "the cached policy does not parse: {e}");
                    continue;
                }
            };
            // The latest time only (as the coordinator does), once its jittered start has come.
            let Some(at) = policy.schedule.between(since, now).last().copied() else { continue };
            if policy.schedule.start_for(at, &entry.vm) > now
                || lock(&self.busy).contains(&entry.vm)
            {
                continue;
            }
            tracing::warn!(vm = %entry.vm, scheduled = %at, "the coordinator is away: backing up from the cached schedule");
            planned.insert(entry.vm.clone(), now);
            changed = true;
            self.start(
                token,
                Task {
                    job: None,
                    catalogue: None,
                    vm: entry.vm.clone(),
                    vault: entry.vault.clone(),
                    scheduled_at: at,
                    policy: Some(entry.policy.clone()),
                    retain_until: None,
                    attempt: 1,
                    keep_views_hours: u32::try_from(policy.instant_restore.as_hours()).unwrap_or(0),
                    kind: "backup".into(),
                    restore: None,
                },
            );
        }
        if changed && let Err(e) = self.state.save_planned(&planned) {
            tracing::warn!("{e}");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
