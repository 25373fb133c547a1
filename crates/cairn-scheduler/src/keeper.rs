//! The coordinator's hands on its vaults: prune and collect, list what a vault holds, delete a
//! VM's data. The scheduler opens no vault itself; the coordinator's binary hands it a
//! [`VaultKeeper`] (the `cairn-upkeep` crate's, over the vaults file) and the scheduler decides
//! when each call runs: on the upkeep schedule, on an admin's request, and never two at once
//! on one vault.

use std::sync::Arc;

use async_trait::async_trait;
use cairn_policy::{Retention, Schedule};
use cairn_protocol::PointReport;
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

/// Prune, collect, scan and delete on the vaults the coordinator holds the keys of. Errors
/// are sentences naming the vault and what to do.
#[async_trait]
pub trait VaultKeeper: Send + Sync {
    /// The vaults it opens, by the names VMs are protected into.
    fn vaults(&self) -> Vec<String>;
    /// When upkeep runs on each vault.
    fn schedule(&self) -> Schedule;
    /// How long an expired point waits before it is purged.
    fn grace(&self) -> SignedDuration;
    /// Applies each VM's rule at `now` (VMs not named are left alone), then collects the
    /// space of purged points. A VM that fails is an error in the report and the others go
    /// on; `Err` means nothing was done (the vault could not be opened).
    async fn upkeep(
        &self,
        vault: &str,
        rules: &[VmRule],
        now: Timestamp,
    ) -> Result<UpkeepReport, String>;
    /// Every point the vault holds, for `rescan`.
    async fn scan(&self, vault: &str) -> Result<Vec<FoundPoint>, String>;
    /// Soft-deletes every point of `vm` (stop protection, deleting its data); a later upkeep
    /// purges them once their grace has passed. Returns the points deleted.
    async fn delete_vm(&self, vault: &str, vm: &str, now: Timestamp)
    -> Result<Vec<String>, String>;
}

/// What an upkeep does to one VM.
#[derive(Clone, Debug, PartialEq)]
pub struct VmRule {
    /// The VM.
    pub vm: String,
    /// Its retention (its policy's, or keep-everything once its protection stopped).
    pub retention: Retention,
    /// The soft-deleted points that may be purged: those this coordinator expired at least a
    /// grace time ago. A deletion note from anyone else is reported, never acted on.
    pub purgeable: Vec<String>,
}

/// A keeper as the service's settings hold it.
#[derive(Clone)]
pub struct Keeper(pub Arc<dyn VaultKeeper>);

impl std::fmt::Debug for Keeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keeper({:?})", self.0.vaults())
    }
}

/// What became of one point in an upkeep.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fate {
    /// A rule keeps it.
    Kept,
    /// No rule keeps it: soft-deleted now.
    Expired,
    /// Soft-deleted earlier, waiting for its grace to pass.
    InGrace,
    /// Soft-deleted and past its grace: removed from the vault.
    Purged,
    /// Soft-deleted and past its grace, but locked.
    Locked,
    /// Its state cannot be read: kept.
    Unknown,
}

/// One point's line in an upkeep report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointFate {
    /// The VM.
    pub vm: String,
    /// The point.
    pub point: String,
    /// Its capture time.
    pub captured_at: Timestamp,
    /// What became of it.
    pub fate: Fate,
    /// Why (the rules that keep it, the grace, the lock).
    pub why: String,
}

/// What an upkeep did on one vault.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpkeepReport {
    /// Every point of the VMs it pruned.
    pub points: Vec<PointFate>,
    /// VMs left alone, with why.
    pub skipped: Vec<String>,
    /// Packs the collector deleted whole.
    pub packs_deleted: u64,
    /// Packs it rewrote without their dead chunks.
    pub packs_repacked: u64,
    /// Bytes freed in the vault.
    pub bytes_freed: u64,
    /// What failed (a VM that could not be pruned, the collector): the run is failed, with
    /// an alert, and what did happen is still mirrored.
    #[serde(default)]
    pub errors: Vec<String>,
}

impl UpkeepReport {
    /// Points with this fate.
    pub fn count(&self, fate: &Fate) -> usize {
        self.points.iter().filter(|p| &p.fate == fate).count()
    }
}

/// A point a vault holds, as `rescan` reads it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FoundPoint {
    /// The VM.
    pub vm: String,
    /// The point and its figures.
    pub point: PointReport,
    /// Soft-deleted (in its grace time).
    pub deleted: bool,
    /// The catalogue whose job made it (`origin` in its manifest).
    pub catalogue: Option<String>,
    /// That job.
    pub job: Option<u64>,
    /// The scheduled time that job was for.
    pub scheduled_at: Option<Timestamp>,
    /// Its views are kept on a host until then (tier snapshot and vault).
    pub held_until: Option<Timestamp>,
    /// Its last restore drill: when, and whether it passed.
    #[serde(default)]
    pub drill: Option<(Timestamp, bool)>,
}
