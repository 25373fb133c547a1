//! `cairn-agent install`, `uninstall` and `run`: the agent as the coordinator's extension on
//! a host. The loop, the transport and the install live in `cairn-worker`; this module hands
//! the worker its runner, the backup of one VM into one vault.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use async_trait::async_trait;
use cairn_backup::{Cancel, DiskProgress, Progress, VmJob};
use cairn_format::Origin;
use cairn_protocol::{Clock, FileClock, PointReport, RestoreOrder, RestoreReport, SystemClock};
use cairn_snapshot::VmConfig;
use cairn_vault::{OpenOptions, StoreOptions, UploadLimit, Vault};
use cairn_worker::{
    AgentConfig, HttpTransport, InstallOptions, JobProgress, Runner, State, Step, Stop, Task,
    Worker,
};
use serde_json::json;

use crate::cli::{InstallArgs, RunArgs, UninstallArgs};
use crate::output::{Exit, print_json, table};

fn print_steps(steps: &[Step], json: bool) {
    if json {
        print_json(&json!({ "changes": steps }));
        return;
    }
    let rows: Vec<Vec<String>> = steps
        .iter()
        .map(|s| vec![s.action.clone(), s.path.clone(), s.note.clone().unwrap_or_default()])
        .collect();
    println!("{}", table(&["ACTION", "PATH", "NOTE"], &rows));
}

pub fn install(args: InstallArgs, json: bool) -> anyhow::Result<Exit> {
    let host = match args.host {
        Some(h) => h,
        // Under another root, this machine's name is not the host's.
        None if args.root != std::path::Path::new("/") => {
            anyhow::bail!("--root {} needs --host NAME", args.root.display())
        }
        None => rustix::system::uname().nodename().to_string_lossy().into_owned(),
    };
    let enroll_token = match &args.enroll_token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading the enrollment token {}", f.display()))?,
        ),
        None => None,
    };
    let executable = match args.executable {
        Some(p) => p,
        None => std::env::current_exe().context("finding this executable")?,
    };
    let options = InstallOptions { coordinator: args.coordinator, host, enroll_token, executable };
    let steps = cairn_worker::install(&args.root, &options)?;
    print_steps(&steps, json);
    Ok(Exit::Ok)
}

pub fn uninstall(args: UninstallArgs, json: bool) -> anyhow::Result<Exit> {
    let steps = cairn_worker::uninstall(&args.root)?;
    print_steps(&steps, json);
    Ok(Exit::Ok)
}

pub async fn run(args: RunArgs) -> anyhow::Result<Exit> {
    // reqwest's TLS has no crypto provider of its own here (docs/ARCHITECTURE.md, "TLS").
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = AgentConfig::load(&args.agent_config)?;
    let state = State::open(&config.state_dir)?;
    let transport =
        Arc::new(HttpTransport::new(&config.coordinator, config.coordinator_ca.as_deref())?);
    let clock: Arc<dyn Clock> = match &args.fake_clock {
        Some(path) => Arc::new(FileClock::new(path.clone())),
        None => Arc::new(SystemClock),
    };
    let runner = Arc::new(BackupRunner {
        transfers: Arc::new(tokio::sync::Semaphore::new(config.max_transfers)),
        upload_limit: config
            .transfer_mib_per_second
            .map(|mib| Arc::new(UploadLimit::new(mib.saturating_mul(1 << 20)))),
        held: crate::held::Registry::in_dir(&config.state_dir),
        held_lock: tokio::sync::Mutex::new(()),
        config: config.clone(),
        file: args.agent_config,
        simulated: args.fake_clock.is_some().then(|| clock.clone()),
    });
    tracing::info!(host = %config.host, coordinator = %config.coordinator, "agent running");
    let worker = Worker::new(config, state, transport, runner, clock);
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        eprintln!("stopping: running backups stop without committing");
    };
    worker.run(shutdown).await?;
    Ok(Exit::Ok)
}

/// Backs a VM up into a vault, both named by the coordinator and mapped by the agent's own
/// configuration.
pub(crate) struct BackupRunner {
    pub(crate) config: AgentConfig,
    pub(crate) file: PathBuf,
    /// The injected clock of a simulation: points are stamped with its time.
    simulated: Option<Arc<dyn Clock>>,
    /// Transfers at once on this host (`max-transfers`): snapshots queue for a permit.
    transfers: Arc<tokio::sync::Semaphore>,
    /// The host's upload bandwidth, shared by every transfer (`transfer-mib-per-second`).
    upload_limit: Option<Arc<UploadLimit>>,
    /// The points whose views this host keeps.
    held: crate::held::Registry,
    /// One writer of the registry at a time.
    held_lock: tokio::sync::Mutex<()>,
}

impl BackupRunner {
    async fn open(&self, task: &Task) -> Result<(VmConfig, Vault), String> {
        let file = self.file.display();
        let entry = self.config.vms.get(&task.vm).ok_or_else(|| {
            format!(
                "VM {} is not in this agent's configuration: add [vms.{}] to {file}",
                task.vm, task.vm
            )
        })?;
        let vault_entry = self.config.vaults.get(&task.vault).ok_or_else(|| {
            format!(
                "vault {} is not in this agent's configuration: add [vaults.{}] to {file}",
                task.vault, task.vault
            )
        })?;
        let vm = VmConfig::load(&entry.config).map_err(|e| format!("{e:#}"))?;
        if vm.vm.as_str() != task.vm {
            return Err(format!(
                "{} describes VM {}, not {}: fix [vms.{}] in {file}",
                entry.config.display(),
                vm.vm,
                task.vm,
                task.vm
            ));
        }
        Ok((vm, self.open_vault(task, vault_entry).await?))
    }

    pub(crate) async fn open_vault(
        &self,
        task: &Task,
        vault_entry: &cairn_worker::VaultEntry,
    ) -> Result<Vault, String> {
        let key = crate::keys::given(
            vault_entry.key_file.as_deref(),
            vault_entry.passphrase_file.as_deref(),
        )
        .map_err(|e| format!("vault {}: {e:#}", task.vault))?;
        let options = OpenOptions {
            store: StoreOptions(vault_entry.options.clone().into_iter().collect()),
            key,
            // Agents add to vaults; only the coordinator prunes and collects.
            append_only: true,
        };
        let vault = Vault::open_with(&vault_entry.url, &options)
            .await
            .map_err(|e| format!("vault {} ({}): {e}", task.vault, vault_entry.url))?;
        Ok(match &self.upload_limit {
            Some(limit) => vault.with_upload_limit(limit.clone()),
            None => vault,
        })
    }
}

#[async_trait]
impl Runner for BackupRunner {
    async fn run(
        &self,
        task: &Task,
        progress: &JobProgress,
        stop: Stop,
    ) -> Result<PointReport, String> {
        progress.phase("snapshot");
        let (config, vault) = self.open(task).await?;
        // A retried job: the point an earlier attempt committed is the job's, not a new one.
        if let Some(job) = task.job {
            let listing = vault.list_points(Some(&config.vm)).await.map_err(|e| e.to_string())?;
            let same_job = |o: &Origin| {
                o.job == Some(job)
                    && o.catalogue == task.catalogue
                    && o.scheduled_at == Some(task.scheduled_at)
            };
            if let Some(m) = listing.points.iter().find(|m| m.origin.as_ref().is_some_and(same_job))
            {
                tracing::info!(job, point = %m.point, "the job committed its point in an earlier attempt");
                return Ok(PointReport::of(m));
            }
        }
        let cancel = Cancel::new();
        let stopper = {
            let cancel = cancel.clone();
            let mut stop = stop.clone();
            tokio::spawn(async move {
                stop.stopped().await;
                cancel.cancel();
            })
        };
        let result = self.two_phases(task, config, &vault, progress, stop, &cancel).await;
        stopper.abort();
        result
    }

    async fn restore(
        &self,
        task: &Task,
        order: &RestoreOrder,
        progress: &JobProgress,
        stop: Stop,
    ) -> Result<RestoreReport, String> {
        progress.phase("restore");
        super::restore_job::run(self, task, order, progress, stop).await
    }

    fn restores(&self) -> bool {
        true
    }

    async fn housekeeping(&self, now: jiff::Timestamp) {
        let _held = self.held_lock.lock().await;
        let registry = self.held.clone();
        match tokio::task::spawn_blocking(move || registry.release_due(now)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("releasing held views: {e:#}"),
            Err(e) => tracing::warn!("releasing held views: {e}"),
        }
    }
}

impl BackupRunner {
    /// The job in its two phases: the snapshot (views held; the point restorable from them
    /// at once when they can be kept), then, with a transfer permit, the transfer to the vault
    /// under the host's bandwidth. A running QEMU VM runs both in one go under a transfer
    /// permit (its fleecing image grows with every guest write until the transfer ends); its
    /// kept views are reflink clones of its images made at the instant.
    async fn two_phases(
        &self,
        task: &Task,
        config: VmConfig,
        vault: &Vault,
        progress: &JobProgress,
        mut stop: Stop,
        cancel: &Cancel,
    ) -> Result<PointReport, String> {
        let vm = task.vm.clone();
        let failed = |e: cairn_backup::Error| format!("backing up VM {vm} to {}: {e}", vault.url());
        let reporter = Reporter::new(progress, "transfer");
        let options = self.options(task)?;
        let time_shift = options.time_shift;
        let job = VmJob::new(config, options);
        let hours = i64::from(task.keep_views_hours);
        let tier_from = |at: jiff::Timestamp| cairn_format::SnapshotTier {
            host: self.config.host.clone(),
            until: at
                .checked_add(jiff::SignedDuration::from_hours(hours))
                .unwrap_or(jiff::Timestamp::MAX),
        };
        if job.config().qemu.is_some() {
            let _permit = self.transfer_permit(progress, &mut stop).await?;
            // The instant comes within seconds: the views are kept from about now.
            let now = jiff::Timestamp::now().checked_add(time_shift).unwrap_or_default();
            let keep = (hours > 0).then(|| tier_from(now));
            let until = keep.as_ref().map(|t| t.until);
            let taken = progress.clone();
            let on_captured = Box::new(move |c: cairn_backup::Captured| {
                if c.keeps_views {
                    taken.snapshot_taken(PointReport {
                        id: c.point.to_string(),
                        captured_at: c.captured_at,
                        consistency: c.level.as_str().to_owned(),
                        held_until: until,
                        ..PointReport::default()
                    });
                }
            });
            let (manifest, kept) = job
                .run_keeping(vault, reporter, cancel, keep.clone(), on_captured)
                .await
                .map_err(failed)?;
            return Ok(self.hold(task, vault, &manifest, keep, kept).await);
        }
        let snapshot = job.snapshot(vault, cancel).await.map_err(failed)?;
        let keep = (hours > 0 && snapshot.can_keep()).then(|| tier_from(snapshot.captured_at()));
        if let Some(tier) = &keep {
            // Restorable from this host's views from now on; the vault follows.
            progress.snapshot_taken(PointReport {
                id: snapshot.point().to_string(),
                captured_at: snapshot.captured_at(),
                consistency: snapshot.level().as_str().to_owned(),
                held_until: Some(tier.until),
                ..PointReport::default()
            });
        }
        let permit = match self.transfer_permit(progress, &mut stop).await {
            Ok(p) => p,
            Err(e) => {
                snapshot.abandon().await;
                return Err(e);
            }
        };
        tokio::task::spawn_blocking(|| {
            cairn_snapshot::failpoint::hit(cairn_snapshot::failpoint::BEFORE_TRANSFER)
        })
        .await
        .ok();
        progress.phase("transfer");
        let (manifest, kept) =
            snapshot.transfer(vault, reporter, cancel, keep.clone()).await.map_err(failed)?;
        drop(permit);
        Ok(self.hold(task, vault, &manifest, keep, kept).await)
    }

    /// After a commit: records the point's kept views in the host's registry, for their
    /// release when `keep` says. Views that cannot be recorded would never be released: they
    /// are released now, and a note says the point has no snapshot tier.
    async fn hold(
        &self,
        task: &Task,
        vault: &Vault,
        manifest: &cairn_format::PointManifest,
        keep: Option<cairn_format::SnapshotTier>,
        kept: Vec<cairn_snapshot::KeptView>,
    ) -> PointReport {
        let mut report = PointReport::of(manifest);
        if let (Some(tier), false) = (&keep, kept.is_empty()) {
            let held = crate::held::HeldPoint {
                vm: task.vm.clone(),
                point: manifest.point.to_string(),
                captured_at: manifest.captured_at,
                until: tier.until,
                views: kept.clone(),
            };
            let _held = self.held_lock.lock().await;
            let registry = self.held.clone();
            let added = tokio::task::spawn_blocking(move || registry.add(held))
                .await
                .map_err(anyhow::Error::from)
                .and_then(|r| r);
            match added {
                Ok(()) => report.held_until = Some(tier.until),
                Err(e) => {
                    // Unrecorded views would never be released: release them now, and say
                    // in the point's notes that none are kept.
                    tracing::warn!(point = %manifest.point, "recording the kept views: {e:#}; releasing them");
                    for v in &kept {
                        if let Err(e) = v.release() {
                            tracing::warn!(point = %manifest.point, "releasing {}: {e}", v.handle.display());
                        }
                    }
                    let gone = cairn_format::Change::Snapshot(None);
                    if let Err(e) =
                        vault.write_note(&manifest.vm, &manifest.point, "backup", &[gone]).await
                    {
                        tracing::warn!(point = %manifest.point, "recording that its views are gone: {e}");
                    }
                }
            }
        }
        report
    }

    /// Waits in the host's transfer queue.
    async fn transfer_permit(
        &self,
        progress: &JobProgress,
        stop: &mut Stop,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, String> {
        progress.phase("queued");
        tokio::select! {
            permit = self.transfers.clone().acquire_owned() => {
                permit.map_err(|_| "the agent is stopping".to_owned())
            }
            _ = stop.stopped() => Err("stopped while queued for transfer".into()),
        }
    }

    fn options(&self, task: &Task) -> Result<cairn_backup::JobOptions, String> {
        let mut options = super::backup::job_options(None, None).map_err(|e| format!("{e:#}"))?;
        options.retain_until = task.retain_until;
        if let Some(clock) = &self.simulated {
            // An unreadable clock file reads as 1970: no shift rather than points 56 years old.
            let simulated = clock.now();
            if simulated > jiff::Timestamp::UNIX_EPOCH {
                options.time_shift = simulated.duration_since(jiff::Timestamp::now());
            }
        }
        options.origin = Some(Origin {
            catalogue: task.catalogue.clone(),
            job: task.job,
            scheduled_at: Some(task.scheduled_at),
            policy: task.policy.clone(),
        });
        Ok(options)
    }
}

/// Per-disk progress, passed on to the worker's reports: once the first disk moves the job is
/// in its `phase` (`transfer`, `restore`).
pub(crate) struct Reporter {
    progress: JobProgress,
    phase: &'static str,
    disks: Mutex<BTreeMap<String, DiskProgress>>,
}

impl Reporter {
    pub(crate) fn new(progress: &JobProgress, phase: &'static str) -> Arc<Reporter> {
        Arc::new(Reporter { progress: progress.clone(), phase, disks: Mutex::default() })
    }
}

impl Progress for Reporter {
    fn disk(&self, update: &DiskProgress) {
        let Some(name) = &update.disk else { return };
        let mut disks = self.disks.lock().unwrap_or_else(|p| p.into_inner());
        let first = disks.is_empty();
        disks.insert(name.to_string(), update.clone());
        let value: serde_json::Map<String, serde_json::Value> = disks
            .iter()
            .map(|(n, d)| {
                (
                    n.clone(),
                    json!({
                        "size": d.size,
                        "position": d.position,
                        "scanned": d.bytes_scanned,
                        "changed": d.bytes_changed,
                        "sent": d.bytes_sent,
                        "done": d.done,
                    }),
                )
            })
            .collect();
        drop(disks);
        if first {
            self.progress.phase(self.phase);
        }
        self.progress.progress(serde_json::Value::Object(value));
    }
}
