//! A simulated VSS with scripted writers, to test the requester on machines without Windows.
//!
//! Time is simulated, not slept: each writer's behaviour says how long its steps take, and
//! the simulation applies VSS's own limits (the 10-second flush-and-hold window, the
//! writers' 60-second freeze-to-thaw timeout, the requester's step timeout) to those
//! durations. Every call is logged, so tests can assert the order of calls too.

use std::collections::VecDeque;
use std::time::Duration;

use super::{BackupType, HResult, VssBackend, WriterInfo, WriterState, WriterStatus};

/// VSS's limit for flushing and holding the file systems.
pub const FLUSH_HOLD_WINDOW: Duration = Duration::from_secs(10);
/// How long a writer stays frozen before it gives up and thaws on its own.
pub const WRITER_FREEZE_TIMEOUT: Duration = Duration::from_secs(60);

/// What a simulated writer does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Everything on time.
    Healthy,
    /// Takes this long to freeze (fails with a timeout past 60 s).
    SlowFreeze(Duration),
    /// Takes this long to report its metadata.
    SlowIdentify(Duration),
    /// Fails in this step.
    FailsAt(WriterState),
    /// Its process dies after the freeze, before the thaw: it is missing from the status.
    CrashesBeforeThaw,
}

/// A simulated writer.
#[derive(Clone, Debug)]
pub struct SimWriter {
    /// Its name.
    pub name: String,
    /// What it does.
    pub behaviour: Behaviour,
}

impl SimWriter {
    /// A writer named `name` doing `behaviour`.
    pub fn new(name: &str, behaviour: Behaviour) -> SimWriter {
        SimWriter { name: name.into(), behaviour }
    }
}

/// The simulated service.
#[derive(Debug, Default)]
pub struct SimulatedVss {
    /// The writers on the machine.
    pub writers: Vec<SimWriter>,
    /// How long each successive `DoSnapshotSet` takes to flush and hold the file systems
    /// (default 0.3 s once the list runs out).
    pub flush_times: VecDeque<Duration>,
    /// Successive results of `StartSnapshotSet` before it succeeds.
    pub start_results: VecDeque<HResult>,
    /// The volume provider fails every snapshot with this.
    pub provider_failure: Option<HResult>,
    /// Every call made, in order, e.g. `"do_snapshot_set(writers)"`.
    pub calls: Vec<String>,
    with_writers: bool,
    kind: Option<BackupType>,
    statuses: Vec<WriterStatus>,
    volumes: Vec<String>,
}

impl SimulatedVss {
    /// A service with these writers.
    pub fn with_writers(writers: Vec<SimWriter>) -> SimulatedVss {
        SimulatedVss { writers, ..Default::default() }
    }

    /// The backup type last set.
    pub fn backup_type(&self) -> Option<BackupType> {
        self.kind
    }

    fn id(i: usize) -> String {
        format!("{{00000000-0000-0000-0000-{i:012}}}")
    }

    fn set_state(&mut self, i: usize, state: WriterState, failure: Option<HResult>) {
        if let Some(s) = self.statuses.get_mut(i)
            && s.state.is_good()
        {
            s.state = state;
            s.failure = failure;
        }
    }

    fn fails_at(&self, i: usize, state: WriterState) -> bool {
        self.writers[i].behaviour == Behaviour::FailsAt(state)
    }
}

impl VssBackend for SimulatedVss {
    fn gather_writer_metadata(&mut self, timeout: Duration) -> Result<Vec<WriterInfo>, HResult> {
        self.calls.push("gather_writer_metadata".into());
        let slowest = self
            .writers
            .iter()
            .filter_map(|w| match w.behaviour {
                Behaviour::SlowIdentify(d) => Some(d),
                _ => None,
            })
            .max()
            .unwrap_or_default();
        if slowest > timeout {
            return Err(HResult::TIMED_OUT);
        }
        self.statuses = (0..self.writers.len())
            .map(|i| WriterStatus {
                name: self.writers[i].name.clone(),
                id: Self::id(i),
                state: WriterState::Stable,
                failure: None,
            })
            .collect();
        for i in 0..self.writers.len() {
            if self.fails_at(i, WriterState::FailedAtIdentify) {
                self.set_state(
                    i,
                    WriterState::FailedAtIdentify,
                    Some(HResult::WRITER_NONRETRYABLE),
                );
            }
        }
        Ok(self
            .writers
            .iter()
            .enumerate()
            .map(|(i, w)| WriterInfo { name: w.name.clone(), id: Self::id(i) })
            .collect())
    }

    fn set_backup_state(&mut self, kind: BackupType, with_writers: bool) -> Result<(), HResult> {
        self.calls.push(format!("set_backup_state({kind:?}, writers={with_writers})"));
        self.kind = Some(kind);
        self.with_writers = with_writers;
        Ok(())
    }

    fn start_snapshot_set(&mut self) -> Result<(), HResult> {
        self.calls.push("start_snapshot_set".into());
        self.volumes.clear();
        match self.start_results.pop_front() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn add_to_snapshot_set(&mut self, volume: &str) -> Result<(), HResult> {
        self.calls.push(format!("add_to_snapshot_set({volume})"));
        self.volumes.push(volume.into());
        Ok(())
    }

    fn prepare_for_backup(&mut self, _: Duration) -> Result<(), HResult> {
        self.calls.push("prepare_for_backup".into());
        if self.with_writers {
            for i in 0..self.writers.len() {
                if self.fails_at(i, WriterState::FailedAtPrepareBackup) {
                    self.set_state(
                        i,
                        WriterState::FailedAtPrepareBackup,
                        Some(HResult::WRITER_RETRYABLE),
                    );
                }
            }
        }
        Ok(())
    }

    fn do_snapshot_set(&mut self, timeout: Duration) -> Result<(), HResult> {
        let label = if self.with_writers { "writers" } else { "no writers" };
        self.calls.push(format!("do_snapshot_set({label})"));
        if self.with_writers {
            for i in 0..self.writers.len() {
                for state in [WriterState::FailedAtPrepareSnapshot, WriterState::FailedAtFreeze] {
                    if self.fails_at(i, state) {
                        self.set_state(i, state, Some(HResult::WRITER_RETRYABLE));
                    }
                }
                if let Behaviour::SlowFreeze(d) = self.writers[i].behaviour
                    && d > WRITER_FREEZE_TIMEOUT
                {
                    // VSS gives up on the writer; the snapshot goes ahead without it.
                    self.set_state(i, WriterState::FailedAtFreeze, Some(HResult::WRITER_TIMEOUT));
                }
            }
        }
        let flush = self.flush_times.pop_front().unwrap_or(Duration::from_millis(300));
        if flush > timeout {
            return Err(HResult::TIMED_OUT);
        }
        if flush > FLUSH_HOLD_WINDOW {
            return Err(HResult::HOLD_WRITES_TIMEOUT);
        }
        if let Some(e) = self.provider_failure {
            return Err(e);
        }
        if self.with_writers {
            for i in 0..self.writers.len() {
                for state in [WriterState::FailedAtThaw, WriterState::FailedAtPostSnapshot] {
                    if self.fails_at(i, state) {
                        self.set_state(i, state, Some(HResult::WRITER_RETRYABLE));
                    }
                }
            }
            // A writer that crashed while frozen is no longer there to report a status.
            let crashed: Vec<String> = self
                .writers
                .iter()
                .enumerate()
                .filter(|(_, w)| w.behaviour == Behaviour::CrashesBeforeThaw)
                .map(|(i, _)| Self::id(i))
                .collect();
            self.statuses.retain(|s| !crashed.contains(&s.id));
        }
        Ok(())
    }

    fn gather_writer_status(&mut self, _: Duration) -> Result<Vec<WriterStatus>, HResult> {
        self.calls.push("gather_writer_status".into());
        Ok(self.statuses.clone())
    }

    fn snapshot_device(&mut self, volume: &str) -> Result<String, HResult> {
        let n = self.volumes.iter().position(|v| v == volume).ok_or(HResult::UNEXPECTED)?;
        Ok(format!("\\\\?\\GLOBALROOT\\Device\\HarddiskVolumeShadowCopy{}", n + 1))
    }

    fn backup_complete(&mut self, _: Duration) -> Result<(), HResult> {
        self.calls.push("backup_complete".into());
        Ok(())
    }

    fn abort_backup(&mut self) {
        self.calls.push("abort_backup".into());
    }
}
