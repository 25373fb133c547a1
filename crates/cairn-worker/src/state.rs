//! The agent's state folder (mode 700): its token, the schedule last received, when each VM
//! was last planned, backups run offline and not yet reported, and final job reports not yet
//! delivered. Every file is written whole (a temporary file renamed over), mode 600, so a
//! crash leaves the old version or the new one, never half of one; a file that does not
//! decode is set aside (renamed `*.bad`) and reported, never trusted.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use cairn_protocol::{PointReport, Report, ScheduleEntry};
use jiff::Timestamp;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::Error;

/// A backup run from the cached schedule, kept until the coordinator has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfflineRecord {
    /// The VM.
    pub vm: String,
    /// The policy's time it was for.
    pub scheduled_at: Timestamp,
    /// The point it committed.
    pub point: PointReport,
    /// The coordinator has it.
    pub delivered: bool,
}

/// The state folder.
#[derive(Clone, Debug)]
pub struct State {
    dir: PathBuf,
}

const TOKEN: &str = "agent-token";
const SCHEDULE: &str = "schedule.json";
const PLANNED: &str = "planned.json";
const OFFLINE: &str = "offline.json";
const REPORTS: &str = "reports";

impl State {
    /// Opens (creating, mode 700) the state folder `dir`.
    pub fn open(dir: &Path) -> Result<State, Error> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.join(REPORTS))
            .map_err(Error::io("creating the state folder", dir))?;
        Ok(State { dir: dir.to_owned() })
    }

    /// Its path.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<(), Error> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            // The state folder is the agent's own: a link planted in it is refused.
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(Error::io("writing", &tmp))?;
        file.write_all(bytes).map_err(Error::io("writing", &tmp))?;
        file.sync_all().map_err(Error::io("syncing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(Error::io("replacing", &path))?;
        // The rename itself made durable: a power cut after it keeps the new file.
        if let Some(dir) = path.parent()
            && let Ok(dir) = std::fs::File::open(dir)
        {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    fn read<T: DeserializeOwned + Default>(&self, name: &str) -> T {
        let path = self.dir.join(name);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return T::default(),
            Err(e) => {
                tracing::warn!("cannot read {}: {e}; starting without it", path.display());
                return T::default();
            }
        };
        match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => {
                let aside = self.dir.join(format!("{name}.bad"));
                tracing::warn!(
                    "{} does not decode ({e}): set aside as {} and not trusted",
                    path.display(),
                    aside.display()
                );
                let _ = std::fs::rename(&path, &aside);
                T::default()
            }
        }
    }

    fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<(), Error> {
        let bytes = serde_json::to_vec_pretty(value).unwrap_or_default();
        self.write(name, &bytes)
    }

    /// The agent's token, if enrolled.
    pub fn token(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.dir.join(TOKEN)).ok()?;
        let token = text.trim();
        (!token.is_empty()).then(|| token.to_owned())
    }

    /// Keeps the agent's token (mode 600).
    pub fn save_token(&self, token: &str) -> Result<(), Error> {
        self.write(TOKEN, token.as_bytes())
    }

    /// The schedule last received.
    pub fn schedule(&self) -> Vec<ScheduleEntry> {
        self.read(SCHEDULE)
    }

    /// Keeps the schedule received.
    pub fn save_schedule(&self, schedule: &[ScheduleEntry]) -> Result<(), Error> {
        self.write_json(SCHEDULE, &schedule)
    }

    /// Up to when each VM's schedule has been planned (by the coordinator while it answered,
    /// by the agent while it did not).
    pub fn planned(&self) -> BTreeMap<String, Timestamp> {
        self.read(PLANNED)
    }

    /// Keeps the planned times.
    pub fn save_planned(&self, planned: &BTreeMap<String, Timestamp>) -> Result<(), Error> {
        self.write_json(PLANNED, planned)
    }

    /// Backups run offline.
    pub fn offline(&self) -> Vec<OfflineRecord> {
        self.read(OFFLINE)
    }

    /// Keeps the backups run offline.
    pub fn save_offline(&self, runs: &[OfflineRecord]) -> Result<(), Error> {
        self.write_json(OFFLINE, &runs)
    }

    /// Keeps a job's final report until the coordinator has it.
    pub fn save_report(&self, job: u64, report: &Report) -> Result<(), Error> {
        self.write_json(&format!("{REPORTS}/{job}.json"), report)
    }

    /// The final reports not yet delivered, by job.
    pub fn pending_reports(&self) -> BTreeMap<u64, Report> {
        let mut out = BTreeMap::new();
        let Ok(entries) = std::fs::read_dir(self.dir.join(REPORTS)) else { return out };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".json").and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            let report: Option<Report> = self.read(&format!("{REPORTS}/{name}"));
            if let Some(report) = report {
                out.insert(id, report);
            }
        }
        out
    }

    /// Forgets a delivered report.
    pub fn report_delivered(&self, job: u64) {
        let _ = std::fs::remove_file(self.dir.join(REPORTS).join(format!("{job}.json")));
    }
}

/// Removes the worker's own files from the state folder `dir` (never anything else); returns
/// how many.
pub(crate) fn remove_own_files(dir: &Path) -> usize {
    let mut removed = 0;
    let own = |name: &str| {
        [TOKEN, SCHEDULE, PLANNED, OFFLINE]
            .iter()
            .any(|f| name == *f || name == format!("{f}.tmp") || name == format!("{f}.bad"))
    };
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if own(&name) && std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
    }
    let reports = dir.join(REPORTS);
    if let Ok(entries) = std::fs::read_dir(&reports) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let report = name.strip_suffix(".json").or_else(|| name.strip_suffix(".json.tmp"));
            if report.is_some_and(|n| n.parse::<u64>().is_ok())
                && std::fs::remove_file(entry.path()).is_ok()
            {
                removed += 1;
            }
        }
    }
    let _ = std::fs::remove_dir(&reports);
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_round_trip_and_a_damaged_one_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        assert_eq!(state.token(), None);
        state.save_token("cairn_abc").unwrap();
        assert_eq!(state.token().as_deref(), Some("cairn_abc"));
        let report = Report { state: "done".into(), ..Default::default() };
        state.save_report(7, &report).unwrap();
        assert_eq!(state.pending_reports().get(&7), Some(&report));
        state.report_delivered(7);
        assert!(state.pending_reports().is_empty());
        std::fs::write(dir.path().join(SCHEDULE), b"{not json").unwrap();
        assert!(state.schedule().is_empty());
        assert!(dir.path().join("schedule.json.bad").exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(TOKEN)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
