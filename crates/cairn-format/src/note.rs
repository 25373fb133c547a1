//! Point notes: the state of a recovery point that changes after its commit.
//!
//! A manifest is immutable, yet a point is soft-deleted and brought back, locked, verified,
//! kept until a date. Each change is a *note*: a small JSON object written create-only beside
//! the point (`notes/<vm>/<point>/<note id>.json`, sealed in an encrypted vault) and never
//! modified. A note sets some keys of the point's state; folding every note of a point in
//! note-id order (the ids sort by time) gives its state: a later note supersedes an earlier one
//! key by key, except `locked_until`, which only ever grows, so that no note, late or early,
//! can shorten a lock. Keys this build does not know are kept as they are, so a newer writer's
//! notes (a coordinator's tier, a drill's outcome) pass through an older reader unharmed.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::manifest::decode_json;
use crate::{Error, Name, PointId};

/// The note format this build writes and reads.
pub const NOTE_FORMAT: u32 = 1;

/// One note on one point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PointNote {
    /// Note format (1).
    pub format: u32,
    /// The point's VM.
    pub vm: Name,
    /// The point.
    pub point: PointId,
    /// When it was written (informational: the order is the note id's).
    pub written_at: Timestamp,
    /// Who wrote it: program and operation, e.g. `cairn 0.1.0 prune`.
    #[serde(default)]
    pub writer: String,
    /// The keys it sets; `null` clears a key.
    pub set: BTreeMap<String, Value>,
}

/// A point's soft deletion: it still restores by id until `purge_after`, then prune removes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deletion {
    /// When it was deleted.
    pub at: Timestamp,
    /// The earliest time its manifest may be removed.
    pub purge_after: Timestamp,
    /// Why, for people: the rule or the command.
    #[serde(default)]
    pub reason: String,
}

/// A point's snapshot tier: its disks' views are kept on the host that took them, so it
/// restores from there at once, until the policy's instant-restore time is over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotTier {
    /// The agent (host) that keeps the views.
    pub host: String,
    /// When the views are released (the point is then in the vault alone).
    pub until: Timestamp,
}

/// The outcome of a verify run over a point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    /// When the run finished with the point.
    pub at: Timestamp,
    /// True if every chunk the point needs was found whole.
    pub clean: bool,
}

/// The outcome of a restore drill over a point: restored (or read through the file reader),
/// its file systems checked, a sample of its blocks compared with their digests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drill {
    /// When the drill finished.
    pub at: Timestamp,
    /// True if the point restored, every file system found was checked clean and every
    /// sampled block matched its digest.
    pub passed: bool,
    /// How: `restore` (to a temporary copy) or `files` (read through the file reader).
    pub method: String,
    /// One line for people: what was checked, or what failed.
    #[serde(default)]
    pub summary: String,
}

/// The blocks a client of an export read first (a guest booting from it), in the order it
/// first read them, as runs of consecutive blocks: a later export of the VM fetches them
/// before they are asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootReads {
    /// When the export that recorded them stopped.
    pub at: Timestamp,
    /// The block size they are counted in.
    pub block_size: u32,
    /// `(first block, count)`, in the order first read.
    pub runs: Vec<(u64, u64)>,
}

/// Runs a boot record may hold: a few thousand in practice.
pub const MAX_BOOT_RUNS: usize = 65_536;

impl BootReads {
    /// The record of `blocks` (in the order first read), cut at [`MAX_BOOT_RUNS`] runs.
    pub fn of(at: Timestamp, block_size: u32, blocks: &[u64]) -> Self {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &b in blocks {
            if let Some((first, n)) = runs.last_mut()
                && first.checked_add(*n) == Some(b)
            {
                *n += 1;
            } else if runs.len() == MAX_BOOT_RUNS {
                break;
            } else {
                runs.push((b, 1));
            }
        }
        BootReads { at, block_size, runs }
    }

    /// The blocks, in order, below `block_count`, at most `limit` of them.
    pub fn blocks(&self, block_count: u64, limit: usize) -> Vec<u64> {
        let mut out = Vec::new();
        for &(first, n) in &self.runs {
            let end = first.saturating_add(n).min(block_count);
            for b in first..end {
                if out.len() >= limit {
                    return out;
                }
                out.push(b);
            }
        }
        out
    }
}

/// One change a note makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Soft-delete the point.
    Delete(Deletion),
    /// Bring a soft-deleted point back.
    Undelete,
    /// Keep the point until this time whatever the retention rules say (`None`: no longer).
    RetainUntil(Option<Timestamp>),
    /// Refuse to delete the point before this time (a lock only grows).
    LockUntil(Timestamp),
    /// A verify run's outcome.
    Verified(Verification),
    /// The views kept on a host for instant restores (`None`: released early).
    Snapshot(Option<SnapshotTier>),
    /// A restore drill's outcome.
    Drilled(Drill),
    /// The blocks a guest booting from an export read first.
    BootReads(BootReads),
}

/// The state of a point: the fold of its notes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PointState {
    /// Set while the point is soft-deleted.
    pub deleted: Option<Deletion>,
    /// Kept until then, whatever the rules say.
    pub retain_until: Option<Timestamp>,
    /// Nothing may delete it before then.
    pub locked_until: Option<Timestamp>,
    /// The last verify run's outcome.
    pub verified: Option<Verification>,
    /// Its snapshot tier: where its views are kept, until when.
    pub snapshot: Option<SnapshotTier>,
    /// The last restore drill's outcome.
    pub drill: Option<Drill>,
    /// The blocks a guest booting from an export of the point read first.
    pub boot_reads: Option<BootReads>,
    /// Keys this build does not know, with their latest value.
    pub other: BTreeMap<String, Value>,
}

const DELETED: &str = "deleted";
const RETAIN_UNTIL: &str = "retain_until";
const LOCKED_UNTIL: &str = "locked_until";
const VERIFIED: &str = "verified";
const SNAPSHOT: &str = "snapshot";
const DRILL: &str = "drill";
const BOOT_READS: &str = "boot_reads";

impl PointNote {
    /// A note on `vm`/`point` making `changes`.
    pub fn new(
        vm: Name,
        point: PointId,
        written_at: Timestamp,
        writer: String,
        changes: &[Change],
    ) -> Self {
        let mut set = BTreeMap::new();
        for change in changes {
            let (key, value) = match change {
                Change::Delete(d) => (DELETED, serde_json::to_value(d)),
                Change::Undelete => (DELETED, Ok(Value::Null)),
                Change::RetainUntil(t) => (RETAIN_UNTIL, serde_json::to_value(t)),
                Change::LockUntil(t) => (LOCKED_UNTIL, serde_json::to_value(t)),
                Change::Verified(v) => (VERIFIED, serde_json::to_value(v)),
                Change::Snapshot(t) => (SNAPSHOT, serde_json::to_value(t)),
                Change::Drilled(d) => (DRILL, serde_json::to_value(d)),
                Change::BootReads(r) => (BOOT_READS, serde_json::to_value(r)),
            };
            set.insert(key.to_string(), value.unwrap_or(Value::Null));
        }
        PointNote { format: NOTE_FORMAT, vm, point, written_at, writer, set }
    }

    /// The note's bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Decodes a note, checking the type of every key this build knows.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let note: PointNote = decode_json(bytes, "point note", NOTE_FORMAT)?;
        PointState::default().apply(&note)?;
        Ok(note)
    }
}

impl PointState {
    /// Applies `note`, a later one than any applied before.
    pub fn apply(&mut self, note: &PointNote) -> Result<(), Error> {
        for (key, value) in &note.set {
            let bad = |e: serde_json::Error| Error::Corrupt {
                what: "point note",
                detail: format!("key {key:?}: {e}"),
            };
            match key.as_str() {
                DELETED => self.deleted = serde_json::from_value(value.clone()).map_err(bad)?,
                RETAIN_UNTIL => {
                    self.retain_until = serde_json::from_value(value.clone()).map_err(bad)?
                }
                LOCKED_UNTIL => {
                    let until: Option<Timestamp> =
                        serde_json::from_value(value.clone()).map_err(bad)?;
                    self.locked_until = self.locked_until.max(until);
                }
                VERIFIED => self.verified = serde_json::from_value(value.clone()).map_err(bad)?,
                SNAPSHOT => self.snapshot = serde_json::from_value(value.clone()).map_err(bad)?,
                DRILL => self.drill = serde_json::from_value(value.clone()).map_err(bad)?,
                BOOT_READS => {
                    let reads: Option<BootReads> =
                        serde_json::from_value(value.clone()).map_err(bad)?;
                    if reads.as_ref().is_some_and(|r| r.runs.len() > MAX_BOOT_RUNS) {
                        return Err(Error::Corrupt {
                            what: "point note",
                            detail: format!("key {key:?}: more than {MAX_BOOT_RUNS} runs"),
                        });
                    }
                    self.boot_reads = reads;
                }
                _ => {
                    self.other.insert(key.clone(), value.clone());
                }
            }
        }
        Ok(())
    }

    /// The state `notes` make, in the order given (note-id order).
    pub fn fold<'a>(notes: impl IntoIterator<Item = &'a PointNote>) -> Result<Self, Error> {
        let mut state = PointState::default();
        for note in notes {
            state.apply(note)?;
        }
        Ok(state)
    }

    /// True if a lock forbids deleting the point at `now`.
    pub fn is_locked(&self, now: Timestamp) -> bool {
        self.locked_until.is_some_and(|until| until > now)
    }

    /// True if a host still keeps the point's views at `now` (tier snapshot and vault).
    pub fn held_at(&self, now: Timestamp) -> bool {
        self.snapshot.as_ref().is_some_and(|s| s.until > now)
    }

    /// True if verify last found the point whole.
    pub fn verified_clean(&self) -> bool {
        self.verified.as_ref().is_some_and(|v| v.clean)
    }

    /// True if the last restore drill over the point passed: it is known to restore.
    pub fn drill_passed(&self) -> bool {
        self.drill.as_ref().is_some_and(|d| d.passed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn note(at: &str, changes: &[Change]) -> PointNote {
        PointNote::new(
            "web-01".parse().unwrap(),
            "20261122T021720.123Z-0123abcd".parse().unwrap(),
            ts(at),
            "test".into(),
            changes,
        )
    }

    #[test]
    fn later_notes_supersede_earlier_ones() {
        let deletion = Deletion {
            at: ts("2026-12-01T00:00:00Z"),
            purge_after: ts("2026-12-15T00:00:00Z"),
            reason: "daily rule".into(),
        };
        let notes = [
            note("2026-12-01T00:00:00Z", &[Change::Delete(deletion.clone())]),
            note("2026-12-02T00:00:00Z", &[Change::RetainUntil(Some(ts("2027-01-01T00:00:00Z")))]),
        ];
        let state = PointState::fold(&notes).unwrap();
        assert_eq!(state.deleted, Some(deletion));
        assert_eq!(state.retain_until, Some(ts("2027-01-01T00:00:00Z")));
        let undeleted = PointState::fold(notes.iter().chain([&note(
            "2026-12-03T00:00:00Z",
            &[Change::Undelete, Change::RetainUntil(None)],
        )]))
        .unwrap();
        assert_eq!(undeleted.deleted, None);
        assert_eq!(undeleted.retain_until, None);
    }

    #[test]
    fn a_lock_only_grows() {
        let notes = [
            note("2026-12-01T00:00:00Z", &[Change::LockUntil(ts("2027-06-01T00:00:00Z"))]),
            note("2026-12-02T00:00:00Z", &[Change::LockUntil(ts("2027-01-01T00:00:00Z"))]),
        ];
        let state = PointState::fold(&notes).unwrap();
        assert_eq!(state.locked_until, Some(ts("2027-06-01T00:00:00Z")));
        assert!(state.is_locked(ts("2027-05-31T23:59:59Z")));
        assert!(!state.is_locked(ts("2027-06-01T00:00:00Z")));
        // A cleared lock is no lock: null does not shorten it either.
        let mut raw = note("2026-12-03T00:00:00Z", &[]);
        raw.set.insert(LOCKED_UNTIL.into(), Value::Null);
        let state = PointState::fold(notes.iter().chain([&raw])).unwrap();
        assert_eq!(state.locked_until, Some(ts("2027-06-01T00:00:00Z")));
    }

    #[test]
    fn unknown_keys_pass_through_and_bad_known_keys_are_corrupt() {
        let mut n = note("2026-12-01T00:00:00Z", &[]);
        n.set.insert("tier".into(), Value::String("snapshot".into()));
        let back = PointNote::decode(&n.encode()).unwrap();
        assert_eq!(back, n);
        assert_eq!(PointState::fold([&back]).unwrap().other["tier"], "snapshot");

        n.set.insert(LOCKED_UNTIL.into(), Value::String("not a time".into()));
        let e = PointNote::decode(&n.encode()).unwrap_err();
        assert!(e.to_string().contains("locked_until"), "{e}");
    }

    #[test]
    fn a_snapshot_tier_is_held_until_its_time_or_released() {
        let tier = SnapshotTier { host: "kvm-1".into(), until: ts("2026-12-03T00:00:00Z") };
        let held = note("2026-12-01T00:00:00Z", &[Change::Snapshot(Some(tier.clone()))]);
        let back = PointNote::decode(&held.encode()).unwrap();
        let state = PointState::fold([&back]).unwrap();
        assert_eq!(state.snapshot, Some(tier));
        assert!(state.held_at(ts("2026-12-02T23:59:59Z")));
        assert!(!state.held_at(ts("2026-12-03T00:00:00Z")));
        let released = note("2026-12-02T00:00:00Z", &[Change::Snapshot(None)]);
        let state = PointState::fold([&back, &released]).unwrap();
        assert!(!state.held_at(ts("2026-12-02T01:00:00Z")));
        let mut bad = held.clone();
        bad.set.insert(SNAPSHOT.into(), serde_json::json!({ "host": 3 }));
        assert!(PointNote::decode(&bad.encode()).is_err());
    }

    #[test]
    fn the_last_drill_decides_whether_a_point_is_known_to_restore() {
        let drill = |at: &str, passed| Drill {
            at: ts(at),
            passed,
            method: "restore".into(),
            summary: "1 file system checked".into(),
        };
        let passed =
            note("2026-12-01T00:00:00Z", &[Change::Drilled(drill("2026-12-01T00:00:00Z", true))]);
        let back = PointNote::decode(&passed.encode()).unwrap();
        assert!(PointState::fold([&back]).unwrap().drill_passed());
        let failed =
            note("2026-12-02T00:00:00Z", &[Change::Drilled(drill("2026-12-02T00:00:00Z", false))]);
        let state = PointState::fold([&back, &failed]).unwrap();
        assert!(!state.drill_passed());
        assert_eq!(state.drill.unwrap().at, ts("2026-12-02T00:00:00Z"));
        let mut bad = passed.clone();
        bad.set.insert(DRILL.into(), serde_json::json!({ "passed": "yes" }));
        assert!(PointNote::decode(&bad.encode()).is_err());
    }

    #[test]
    fn boot_reads_are_runs_in_first_read_order() {
        let reads = BootReads::of(ts("2026-12-01T00:00:00Z"), 65536, &[7, 8, 9, 2, 3, 100]);
        assert_eq!(reads.runs, vec![(7, 3), (2, 2), (100, 1)]);
        assert_eq!(reads.blocks(1000, 100), vec![7, 8, 9, 2, 3, 100]);
        assert_eq!(reads.blocks(9, 4), vec![7, 8, 2, 3], "past the disk's end left out");
        let n = note("2026-12-01T00:00:00Z", &[Change::BootReads(reads.clone())]);
        let back = PointNote::decode(&n.encode()).unwrap();
        assert_eq!(PointState::fold([&back]).unwrap().boot_reads, Some(reads));
        // A crafted record of runs over the limit is refused, and huge runs expand bounded.
        let mut bad = n.clone();
        let runs: Vec<(u64, u64)> = (0..=MAX_BOOT_RUNS as u64).map(|i| (i * 2, 1)).collect();
        bad.set.insert(
            BOOT_READS.into(),
            serde_json::json!({ "at": "2026-12-01T00:00:00Z", "block_size": 65536, "runs": runs }),
        );
        assert!(PointNote::decode(&bad.encode()).is_err());
        let huge = BootReads {
            runs: vec![(0, u64::MAX)],
            ..BootReads::of(ts("2026-12-01T00:00:00Z"), 65536, &[])
        };
        assert_eq!(huge.blocks(u64::MAX, 5).len(), 5);
    }

    #[test]
    fn a_newer_format_is_refused() {
        let mut n = note("2026-12-01T00:00:00Z", &[]);
        n.format = 2;
        assert!(matches!(PointNote::decode(&n.encode()), Err(Error::Unsupported { .. })));
    }

    proptest! {
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = PointNote::decode(&bytes);
        }

        #[test]
        fn notes_round_trip(secs in 0i64..4_000_000_000, clean: bool, lock in 0i64..4_000_000_000) {
            let at = Timestamp::from_second(secs).unwrap();
            let n = PointNote::new(
                "vm".parse().unwrap(),
                PointId::new(at, 7),
                at,
                String::new(),
                &[
                    Change::Verified(Verification { at, clean }),
                    Change::LockUntil(Timestamp::from_second(lock).unwrap()),
                ],
            );
            prop_assert_eq!(PointNote::decode(&n.encode()).unwrap(), n);
        }
    }
}
