//! The requester side of the Volume Shadow Copy Service, as a state machine.
//!
//! On Windows, app-consistent backup means asking VSS for a shadow copy: VSS tells each
//! writer (SQL Server, Exchange, the registry...) to bring its data to a consistent state
//! and freeze, flushes and holds the file systems (for at most 10 seconds), snapshots the
//! volumes, and thaws. The requester drives it:
//!
//! 1. gather writer metadata;
//! 2. set the backup state (full by default: writers may then truncate their logs once the
//!    backup is complete; copy leaves them alone), start a snapshot set, add the volumes;
//! 3. prepare for backup;
//! 4. do the snapshot set (freeze, the 10-second flush-and-hold window, snapshot, thaw);
//! 5. gather writer status: a writer that failed, timed out or vanished is named;
//! 6. after the recovery point commits, backup complete; on any failure, abort.
//!
//! The fallback ladder: writers all stable gives **application** consistency; a writer that
//! failed or timed out gives **file-system** consistency and is named; when the snapshot
//! with writers cannot be made at all (metadata, prepare or the snapshot failed, the
//! flush-and-hold window passed), a second snapshot set without writers is tried, which VSS
//! still flushes: **file-system**. When that fails too, [`run`] returns the error, and the
//! caller falls back to a crash-consistent view from the host or fails the job.
//!
//! Every call into Windows is a method of [`VssBackend`]; the Windows implementation is the
//! thin `cfg(windows)` module, the one part of Cairn that cannot run on these Linux machines.
//! [`simulated`] implements the same trait with scripted writers, so the ladder is tested here.

mod session;
pub mod simulated;
#[cfg(windows)]
pub mod windows;

pub use session::{VssSession, VssViews};

use std::collections::BTreeMap;
use std::time::Duration;

use cairn_format::{Consistency, Evidence};
use serde_json::json;

use crate::{Error, Record};

/// An HRESULT from VSS (values from `vsserror.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HResult(pub u32);

impl HResult {
    /// A writer did not respond in time.
    pub const WRITER_TIMEOUT: HResult = HResult(0x8004_23F2);
    /// A writer failed, retrying may help.
    pub const WRITER_RETRYABLE: HResult = HResult(0x8004_23F3);
    /// A writer failed for good.
    pub const WRITER_NONRETRYABLE: HResult = HResult(0x8004_23F4);
    /// The file systems could not be flushed within the window.
    pub const FLUSH_WRITES_TIMEOUT: HResult = HResult(0x8004_2313);
    /// Writes could not be held for the whole window (10 seconds).
    pub const HOLD_WRITES_TIMEOUT: HResult = HResult(0x8004_2314);
    /// Another snapshot set is being created.
    pub const SNAPSHOT_SET_IN_PROGRESS: HResult = HResult(0x8004_2316);
    /// Not enough shadow storage.
    pub const INSUFFICIENT_STORAGE: HResult = HResult(0x8004_231F);
    /// The requester's own wait ran out (`HRESULT_FROM_WIN32(ERROR_TIMEOUT)`).
    pub const TIMED_OUT: HResult = HResult(0x8007_05B4);
    /// VSS's catch-all.
    pub const UNEXPECTED: HResult = HResult(0x8004_2302);

    /// The symbolic name, when known.
    pub fn name(self) -> &'static str {
        match self {
            HResult::WRITER_TIMEOUT => "VSS_E_WRITERERROR_TIMEOUT",
            HResult::WRITER_RETRYABLE => "VSS_E_WRITERERROR_RETRYABLE",
            HResult::WRITER_NONRETRYABLE => "VSS_E_WRITERERROR_NONRETRYABLE",
            HResult::FLUSH_WRITES_TIMEOUT => "VSS_E_FLUSH_WRITES_TIMEOUT",
            HResult::HOLD_WRITES_TIMEOUT => "VSS_E_HOLD_WRITES_TIMEOUT",
            HResult::SNAPSHOT_SET_IN_PROGRESS => "VSS_E_SNAPSHOT_SET_IN_PROGRESS",
            HResult::INSUFFICIENT_STORAGE => "VSS_E_INSUFFICIENT_STORAGE",
            HResult::TIMED_OUT => "ERROR_TIMEOUT",
            HResult::UNEXPECTED => "VSS_E_UNEXPECTED",
            _ => "HRESULT",
        }
    }
}

impl std::fmt::Display for HResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({:#010x})", self.name(), self.0)
    }
}

/// Full or copy: a full backup lets writers truncate their logs after backup-complete.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackupType {
    /// `VSS_BT_FULL`: the default.
    #[default]
    Full,
    /// `VSS_BT_COPY`: for backups that must not disturb another backup product's chain.
    Copy,
}

/// A writer's state, as `VSS_WRITER_STATE` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriterState {
    /// `VSS_WS_STABLE`: done, no error.
    Stable,
    /// Waiting for backup-complete: fine before it.
    WaitingForBackupComplete,
    /// Failed while reporting its metadata.
    FailedAtIdentify,
    /// Failed in prepare-for-backup.
    FailedAtPrepareBackup,
    /// Failed preparing for the snapshot.
    FailedAtPrepareSnapshot,
    /// Failed to freeze.
    FailedAtFreeze,
    /// Failed to thaw (often: it timed out while frozen).
    FailedAtThaw,
    /// Failed after the snapshot.
    FailedAtPostSnapshot,
    /// Failed in backup-complete.
    FailedAtBackupComplete,
    /// Unknown: gathering writer status failed.
    Unknown,
    /// Any other state.
    Other(u32),
}

impl WriterState {
    /// True for the states that mean the writer's data is consistent in the snapshot.
    pub fn is_good(self) -> bool {
        matches!(self, WriterState::Stable | WriterState::WaitingForBackupComplete)
    }
}

/// A writer, from its metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriterInfo {
    /// Its name, e.g. `SqlServerWriter`.
    pub name: String,
    /// Its writer *instance* id (a GUID): writers of one class (Exchange's, say) share a
    /// writer id, so instances are what status is matched on.
    pub id: String,
}

/// A writer's status after the snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriterStatus {
    /// Its name.
    pub name: String,
    /// Its writer instance id.
    pub id: String,
    /// Its state.
    pub state: WriterState,
    /// Its failure code, when it failed.
    pub failure: Option<HResult>,
}

/// The calls a requester makes; one method per `IVssBackupComponents` call (the async ones
/// wait for completion, up to `timeout`, and return [`HResult::TIMED_OUT`] past it).
pub trait VssBackend {
    /// `InitializeForBackup` + `GatherWriterMetadata` + `GetWriterMetadata`.
    fn gather_writer_metadata(&mut self, timeout: Duration) -> Result<Vec<WriterInfo>, HResult>;
    /// `SetContext` + `SetBackupState`; `with_writers` false asks for a snapshot no writer
    /// takes part in.
    fn set_backup_state(&mut self, kind: BackupType, with_writers: bool) -> Result<(), HResult>;
    /// `StartSnapshotSet`.
    fn start_snapshot_set(&mut self) -> Result<(), HResult>;
    /// `AddToSnapshotSet` for a volume (e.g. `C:\`).
    fn add_to_snapshot_set(&mut self, volume: &str) -> Result<(), HResult>;
    /// `PrepareForBackup`.
    fn prepare_for_backup(&mut self, timeout: Duration) -> Result<(), HResult>;
    /// `DoSnapshotSet`: freeze, flush and hold (10 s at most), snapshot, thaw.
    fn do_snapshot_set(&mut self, timeout: Duration) -> Result<(), HResult>;
    /// `GatherWriterStatus` + `GetWriterStatus`.
    fn gather_writer_status(&mut self, timeout: Duration) -> Result<Vec<WriterStatus>, HResult>;
    /// `GetSnapshotProperties`: the shadow copy's device for a volume.
    fn snapshot_device(&mut self, volume: &str) -> Result<String, HResult>;
    /// `BackupComplete`: writers of a full backup may now truncate logs.
    fn backup_complete(&mut self, timeout: Duration) -> Result<(), HResult>;
    /// `AbortBackup`: the backup failed; writers keep everything.
    fn abort_backup(&mut self);
}

/// How the requester runs.
#[derive(Clone, Debug)]
pub struct VssOptions {
    /// Full (default) or copy.
    pub backup_type: BackupType,
    /// The longest wait for any one asynchronous step.
    pub step_timeout: Duration,
    /// Attempts to start a snapshot set while another is in progress.
    pub start_attempts: u32,
    /// The wait between those attempts.
    pub start_retry_delay: Duration,
}

impl Default for VssOptions {
    fn default() -> Self {
        VssOptions {
            backup_type: BackupType::Full,
            step_timeout: Duration::from_secs(120),
            start_attempts: 3,
            start_retry_delay: Duration::from_secs(5),
        }
    }
}

/// A shadow copy set, to read and then finish.
#[derive(Debug)]
pub struct VssSnapshot {
    /// The consistency reached.
    pub level: Consistency,
    /// Each volume's shadow-copy device.
    pub devices: BTreeMap<String, String>,
    /// Writers that failed, timed out or vanished.
    pub failed_writers: Vec<String>,
    with_writers: bool,
    backup_type: BackupType,
    step_timeout: Duration,
}

impl VssSnapshot {
    /// After the recovery point: backup-complete when it committed (writers of a full
    /// backup may truncate their logs only now), abort when it did not.
    pub fn finish(self, backend: &mut dyn VssBackend, committed: bool, record: &mut Record) {
        if !committed {
            backend.abort_backup();
            return;
        }
        if let Err(e) = backend.backup_complete(self.step_timeout) {
            record.note(Evidence::new(
                "vss",
                None,
                format!("backup-complete failed ({e}): writers were not told the backup succeeded, and keep their logs"),
            ));
        } else if self.with_writers && self.backup_type == BackupType::Full {
            record.note(Evidence::new(
                "vss",
                None,
                "full backup complete: writers were told the backup succeeded (those that keep logs until a full backup may truncate them)",
            ));
        }
    }
}

/// Runs the ladder for `volumes`, noting every step that lowered the level in `record`.
pub fn run(
    backend: &mut dyn VssBackend,
    volumes: &[String],
    options: &VssOptions,
    record: &mut Record,
) -> Result<VssSnapshot, Error> {
    record.aim(Consistency::Application);
    let with_writers = match attempt(backend, volumes, options, true) {
        Ok(statuses) => Some(statuses),
        Err(why) => {
            backend.abort_backup();
            record.fall_back(
                Consistency::FileSystem,
                format!("VSS could not snapshot with writers ({why}); trying a snapshot no writer takes part in"),
            );
            None
        }
    };
    let mut failed = Vec::new();
    let used_writers = with_writers.is_some();
    match with_writers {
        Some((writers, statuses)) => {
            // Every status that is not good counts, listed in the metadata or not (a writer
            // that failed at identify may be missing from it); a writer with no status vanished.
            for s in statuses.iter().filter(|s| !s.state.is_good()) {
                writer_failed(record, &mut failed, &s.name, format!("{:?}", s.state), s.failure);
            }
            for w in writers.iter().filter(|w| !statuses.iter().any(|s| s.id == w.id)) {
                let state = "vanished (the writer stopped responding or crashed)".to_string();
                writer_failed(record, &mut failed, &w.name, state, None);
            }
            if writers.is_empty() && statuses.is_empty() {
                record.fall_back(
                    Consistency::FileSystem,
                    "no VSS writer on this machine: nothing application-level took part, VSS flushed the file systems",
                );
            } else if failed.is_empty() {
                record.reached(
                    Consistency::Application,
                    format!(
                        "VSS {:?} backup: all {} writers stable",
                        options.backup_type,
                        writers.len().max(statuses.len())
                    ),
                );
            } else {
                record.fall_back(
                    Consistency::FileSystem,
                    format!(
                        "VSS writer(s) {} failed: their data is only file-system consistent",
                        failed.join(", ")
                    ),
                );
            }
        }
        None => {
            if let Err(why) = attempt(backend, volumes, options, false) {
                backend.abort_backup();
                return Err(Error::Vss(format!(
                    "no shadow copy could be made, with writers or without ({why}); fall back to a crash-consistent view of the disks"
                )));
            }
            record.note(Evidence::new(
                "vss",
                None,
                "shadow copy made without writers: file systems flushed by VSS",
            ));
        }
    }
    let mut devices = BTreeMap::new();
    for v in volumes {
        match backend.snapshot_device(v) {
            Ok(d) => {
                devices.insert(v.clone(), d);
            }
            Err(e) => {
                backend.abort_backup();
                return Err(Error::Vss(format!("the shadow copy of {v} has no device ({e})")));
            }
        }
    }
    Ok(VssSnapshot {
        level: record.level(),
        devices,
        failed_writers: failed,
        with_writers: used_writers,
        backup_type: options.backup_type,
        step_timeout: options.step_timeout,
    })
}

/// Notes a writer that failed, timed out or vanished.
fn writer_failed(
    record: &mut Record,
    failed: &mut Vec<String>,
    name: &str,
    state: String,
    failure: Option<HResult>,
) {
    let code = failure.map(|f| format!(", {f}")).unwrap_or_default();
    let mut ev = Evidence::new("vss_writer", None, format!("writer {name} failed: {state}{code}"));
    ev.details.insert("writer".into(), json!(name));
    ev.details.insert("state".into(), json!(state));
    ev.details.insert("failure".into(), json!(failure.map(|f| f.to_string())));
    record.note(ev);
    failed.push(name.to_string());
}

/// One snapshot set, with or without writers; returns the writers and their status.
fn attempt(
    backend: &mut dyn VssBackend,
    volumes: &[String],
    options: &VssOptions,
    with_writers: bool,
) -> Result<(Vec<WriterInfo>, Vec<WriterStatus>), String> {
    let step = |name: &str, e: HResult| format!("{name} failed: {e}");
    let timeout = options.step_timeout;
    let writers = if with_writers {
        backend.gather_writer_metadata(timeout).map_err(|e| step("gathering writer metadata", e))?
    } else {
        Vec::new()
    };
    let kind = if with_writers { options.backup_type } else { BackupType::Copy };
    backend
        .set_backup_state(kind, with_writers)
        .map_err(|e| step("setting the backup state", e))?;
    let mut tries = 0;
    loop {
        tries += 1;
        match backend.start_snapshot_set() {
            Ok(()) => break,
            Err(HResult::SNAPSHOT_SET_IN_PROGRESS) if tries < options.start_attempts => {
                std::thread::sleep(options.start_retry_delay);
            }
            Err(e) => return Err(step("starting the snapshot set", e)),
        }
    }
    for v in volumes {
        backend.add_to_snapshot_set(v).map_err(|e| step(&format!("adding volume {v}"), e))?;
    }
    backend.prepare_for_backup(timeout).map_err(|e| step("preparing for backup", e))?;
    backend.do_snapshot_set(timeout).map_err(|e| match e {
        HResult::FLUSH_WRITES_TIMEOUT | HResult::HOLD_WRITES_TIMEOUT => {
            format!(
                "the file systems could not be flushed and held within VSS's 10-second window: {e}"
            )
        }
        e => step("the snapshot", e),
    })?;
    if !with_writers {
        return Ok((writers, Vec::new()));
    }
    // Unknown status is not success: every writer counts as failed.
    let statuses = backend.gather_writer_status(timeout).unwrap_or_else(|e| {
        let unknown = |w: &WriterInfo| WriterStatus {
            name: w.name.clone(),
            id: w.id.clone(),
            state: WriterState::Unknown,
            failure: Some(e),
        };
        writers.iter().map(unknown).collect()
    });
    Ok((writers, statuses))
}
