//! The contract between the coordinator and its agents: the JSON bodies of the agents' calls
//! under `/api/v1/agents/` (the coordinator's `cairn-scheduler` serves them, the agent's
//! `cairn-worker` calls them). Only data: both sides decode what the other sends as untrusted,
//! so every type here is plain, bounded by what serde accepts, and fuzzed.

mod clock;

pub use clock::{Clock, FileClock, SystemClock};

use std::collections::BTreeMap;
use std::path::PathBuf;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// A job as its agent receives it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobOrder {
    /// The job id, to be recorded in the point's manifest.
    pub id: u64,
    /// The coordinator's catalogue, by its id: with the job id, what names the job in a point.
    pub catalogue: String,
    /// The VM, as named on the agent's host.
    pub vm: String,
    /// `backup` or `restore`.
    pub kind: String,
    /// The vault, by the name the agent's configuration gives it.
    pub vault: String,
    /// The policy's time the job is for.
    pub scheduled_at: Timestamp,
    /// The policy (none for a back-up-now).
    pub policy: Option<String>,
    /// Keep the point until then (a back-up-now's own retention).
    pub retain_until: Option<Timestamp>,
    /// 1 for the first hand-out, more for a job handed out again.
    pub attempt: u32,
    /// Hours the point's views are kept on the host for instant restores (the policy's
    /// instant-restore days; 0: released after the transfer).
    #[serde(default)]
    pub keep_views_hours: u32,
    /// What a `restore` job restores, and where.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreOrder>,
}

/// A restore job's order: a point's disks, from the job's vault, into a new folder of the
/// agent's restore folder. The coordinator names the folder, never a path: only the agent's
/// configuration says where restores go on its host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreOrder {
    /// The point's id.
    pub point: String,
    /// One disk only (none: every disk of the point).
    #[serde(default)]
    pub disk: Option<String>,
    /// The folder's name inside the agent's restore folder (a vault name: 1 to 64 of
    /// A-Z a-z 0-9 . _ -, not starting with . or -).
    pub to: String,
}

impl RestoreOrder {
    /// Why the order cannot be carried out as written (names that are not names), if so.
    pub fn problem(&self) -> Option<String> {
        let name = |what: &str, s: &str| {
            s.parse::<cairn_format::Name>().err().map(|e| format!("{what}: {e}"))
        };
        name("the restore's folder", &self.to)
            .or_else(|| self.disk.as_deref().and_then(|d| name("the disk", d)))
            .or_else(|| {
                self.point.parse::<cairn_format::PointId>().err().map(|e| format!("the point: {e}"))
            })
    }
}

/// What a restore job wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreReport {
    /// The point restored.
    pub point: String,
    /// Each disk's file on the agent's host.
    pub disks: Vec<RestoredDisk>,
}

/// One restored disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoredDisk {
    /// The disk's name.
    pub disk: String,
    /// The file it was restored to, on the agent's host.
    pub path: String,
    /// Its size.
    pub size: u64,
    /// Bytes of data written (holes and zeros are not).
    pub bytes_written: u64,
}

/// What an agent reports about one job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// `running`, `done` or `failed`.
    pub state: String,
    /// Where a running job is: `snapshot`, `transfer`, `commit`.
    #[serde(default)]
    pub phase: Option<String>,
    /// Per-disk progress, as the agent shows it (kept as given, for people).
    #[serde(default)]
    pub progress: Option<serde_json::Value>,
    /// The point a `done` job committed.
    #[serde(default)]
    pub point: Option<PointReport>,
    /// Why a `failed` job failed.
    #[serde(default)]
    pub reason: Option<String>,
    /// What a `done` restore job wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored: Option<RestoreReport>,
}

/// A committed point, as its agent reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointReport {
    /// The point id.
    pub id: String,
    /// When the disks were captured.
    pub captured_at: Timestamp,
    /// `none`, `crash`, `file_system`, `application`.
    pub consistency: String,
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
    /// Its views are kept on the host until then (tier snapshot and vault); before the
    /// transfer committed, a running job's point is in the snapshot tier alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_until: Option<Timestamp>,
}

impl PointReport {
    /// The figures of a committed point, from its manifest.
    pub fn of(m: &cairn_format::PointManifest) -> PointReport {
        let sum = |f: fn(&cairn_format::DiskRecord) -> u64| m.disks.values().map(f).sum::<u64>();
        PointReport {
            id: m.point.to_string(),
            captured_at: m.captured_at,
            consistency: m.consistency.as_str().to_owned(),
            size: sum(|d| d.size),
            bytes_scanned: sum(|d| d.stats.bytes_scanned),
            bytes_changed: sum(|d| d.stats.bytes_changed),
            bytes_stored: sum(|d| d.stats.bytes_sent),
            duration_ms: m.finished_at.duration_since(m.started_at).as_millis().max(0) as u64,
            held_until: None,
        }
    }
}

/// A vault as a configuration names it: an agent's `[vaults.NAME]` (which it opens
/// append-only) and the coordinator's vaults file (which it opens to prune and collect).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VaultEntry {
    /// Its URL, as `cairn-agent --vault` takes it.
    pub url: String,
    /// The key file of an encrypted vault.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// A file holding the passphrase of an encrypted vault.
    #[serde(default)]
    pub passphrase_file: Option<PathBuf>,
    /// object_store options (KEY = VALUE).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

/// A backup an agent ran from its cached schedule while the coordinator was away.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfflineRun {
    /// The VM.
    pub vm: String,
    /// The policy's time it was for.
    pub scheduled_at: Timestamp,
    /// The point it committed.
    pub point: PointReport,
}

/// One VM's schedule as an agent caches it, to keep backing up while the coordinator is down.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleEntry {
    /// The VM.
    pub vm: String,
    /// Its vault.
    pub vault: String,
    /// Its policy's name.
    pub policy: String,
    /// The policy file (TOML).
    pub spec: String,
}

/// What a poll hands an agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Orders {
    /// Jobs to run.
    pub jobs: Vec<JobOrder>,
    /// Jobs the agent runs that are no longer wanted (failed meanwhile): stop them.
    pub cancel: Vec<u64>,
    /// Its VMs' schedules.
    pub schedule: Vec<ScheduleEntry>,
}

/// What the coordinator answers to an enrollment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    /// The agent's name (its host's).
    pub name: String,
    /// Its own token, for every later call; shown once.
    pub token: String,
}

/// What an agent sends when it polls for jobs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Poll {
    /// The jobs it is running.
    #[serde(default)]
    pub running: Vec<u64>,
    /// How long the coordinator may hold the poll open when there is nothing to do.
    #[serde(default)]
    pub wait_seconds: u64,
    /// The job kinds it runs besides `backup` (`restore`): an agent that does not list a
    /// kind is never handed a job of it.
    #[serde(default)]
    pub kinds: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn point() -> impl Strategy<Value = PointReport> {
        ("[a-z0-9.-]{0,30}", 0i64..4_000_000_000, "[a-z_]{0,12}", any::<[u64; 5]>(), any::<bool>())
            .prop_map(|(id, secs, consistency, n, held)| PointReport {
                id,
                captured_at: Timestamp::from_second(secs).unwrap(),
                consistency,
                size: n[0],
                bytes_scanned: n[1],
                bytes_changed: n[2],
                bytes_stored: n[3],
                duration_ms: n[4],
                held_until: held.then(|| Timestamp::from_second(secs).unwrap()),
            })
    }

    proptest! {
        #[test]
        fn reports_and_offline_runs_round_trip(
            p in point(),
            state in "[a-z]{0,10}",
            reason in proptest::option::of(".{0,40}"),
            vm in "[a-z0-9-]{1,20}",
        ) {
            let restored = Some(RestoreReport {
                point: p.id.clone(),
                disks: vec![RestoredDisk { disk: vm.clone(), path: reason.clone().unwrap_or_default(), size: p.size, bytes_written: p.bytes_stored }],
            });
            let report = Report { state, phase: None, progress: None, point: Some(p.clone()), reason, restored };
            let again: Report = serde_json::from_slice(&serde_json::to_vec(&report).unwrap()).unwrap();
            prop_assert_eq!(again, report);
            let run = OfflineRun { vm, scheduled_at: p.captured_at, point: p };
            let again: OfflineRun = serde_json::from_slice(&serde_json::to_vec(&run).unwrap()).unwrap();
            prop_assert_eq!(again, run);
        }

        #[test]
        fn any_bytes_decode_or_are_refused(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = serde_json::from_slice::<Orders>(&data);
            let _ = serde_json::from_slice::<Report>(&data);
            let _ = serde_json::from_slice::<OfflineRun>(&data);
            let _ = serde_json::from_slice::<Poll>(&data);
            if let Ok(order) = serde_json::from_slice::<RestoreOrder>(&data) {
                let _ = order.problem();
            }
        }
    }

    #[test]
    fn a_report_with_an_unknown_field_is_refused() {
        let err = serde_json::from_str::<Report>(r#"{"state":"done","pont":{}}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `pont`"), "{err}");
    }
}
