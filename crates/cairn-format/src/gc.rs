//! The collector's objects: its plan (`gc/<run>.json`) and the fate of a backup it may reap
//! (`inflight/<point>/fate.json`). See "Garbage collection" in `docs/formats.md`.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::manifest::json_document;
use crate::{Digest, Error, PointId};

/// A collector run's plan, written create-only before it deletes anything and deleted when
/// the run is over. While it exists, backups neither deduplicate against nor adopt the packs
/// it condemns: they store those chunks again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcPlan {
    /// Plan format (1).
    pub format: u32,
    /// The run (a point-id-shaped id: its start time and random digits).
    pub run: PointId,
    /// When the run started.
    pub started_at: Timestamp,
    /// Packs the run may delete (no live chunk) or repack (live chunks copied out first).
    pub condemned: Vec<Digest>,
}

json_document!(GcPlan, "gc plan");

/// How a backup's in-flight marker ends, decided once by a create-only write: the backup
/// writes `commit` just before its manifest; a collector that finds the marker stale writes
/// `reaped` before it deletes the marker. Whoever writes first wins: a reaped backup never
/// commits, and a committing backup is never reaped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FateKind {
    /// The backup is committing its manifest.
    Commit,
    /// A collector took the backup for dead (stale marker) and is removing its leftovers.
    Reaped,
}

/// The fate record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fate {
    /// Record format (1).
    pub format: u32,
    /// What was decided.
    pub fate: FateKind,
    /// When.
    pub at: Timestamp,
}

impl Fate {
    /// A fate decided now.
    pub fn new(fate: FateKind, at: Timestamp) -> Self {
        Fate { format: 1, fate, at }
    }
}

json_document!(Fate, "fate record");

/// The base a running backup compares against, recorded beside its marker before it reads
/// anything of it: a collector keeps everything those index roots reach alive while the
/// marker exists, even if the base point itself is purged meanwhile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseRecord {
    /// Record format (1).
    pub format: u32,
    /// The base point.
    pub point: PointId,
    /// The index roots of its disks.
    pub roots: Vec<Digest>,
}

json_document!(BaseRecord, "base record");

/// The lease one collector (or repair) run holds on a vault, `lease/gc.json`, create-only:
/// two runs at once would each trust pack indexes the other is rewriting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Record format (1).
    pub format: u32,
    /// Who holds it: `HOST pid PID ns NS boot BOOT`.
    pub owner: String,
    /// What runs: `gc` or `repair`.
    pub what: String,
    /// Since when.
    pub at: Timestamp,
}

json_document!(Lease, "lease");

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips() {
        let at: Timestamp = "2026-12-02T10:00:00Z".parse().unwrap();
        let plan = GcPlan {
            format: 1,
            run: PointId::new(at, 9),
            started_at: at,
            condemned: vec![Digest([7; 32])],
        };
        assert_eq!(GcPlan::decode(&plan.encode()).unwrap(), plan);
        let fate = Fate::new(FateKind::Reaped, at);
        assert_eq!(Fate::decode(&fate.encode()).unwrap(), fate);
        assert!(String::from_utf8(fate.encode()).unwrap().contains("\"reaped\""));
    }

    proptest! {
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = GcPlan::decode(&bytes);
            let _ = Fate::decode(&bytes);
            let _ = BaseRecord::decode(&bytes);
            let _ = Lease::decode(&bytes);
        }
    }
}
