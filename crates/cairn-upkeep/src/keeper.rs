//! [`VaultSet`]: the vaults of the vaults file, opened with full rights for each operation.

use std::collections::BTreeMap;

use async_trait::async_trait;
use cairn_backup::{Action, PruneOptions};
use cairn_format::Name;
use cairn_policy::Schedule;
use cairn_protocol::PointReport;
use cairn_scheduler::{Fate, FoundPoint, PointFate, UpkeepReport, VaultKeeper, VmRule};
use cairn_vault::{Credential, GcOptions, OpenOptions, StoreOptions, Vault};
use jiff::{SignedDuration, Timestamp};

use crate::{Error, VaultEntry, VaultsFile};

/// The coordinator's vaults, as its vaults file names them.
pub struct VaultSet {
    vaults: BTreeMap<String, (VaultEntry, Option<Credential>)>,
    schedule: Schedule,
    grace: SignedDuration,
}

impl VaultSet {
    /// The vaults of `file`, with their keys read now (a missing key file is an error at
    /// start, not at the first upkeep). The vaults themselves are opened for each operation,
    /// so one unreachable at start does not stop the coordinator.
    pub fn new(file: &VaultsFile, path: &std::path::Path) -> Result<VaultSet, Error> {
        let invalid =
            |message: String| Error::Invalid { path: path.display().to_string(), message };
        let mut vaults = BTreeMap::new();
        for (name, entry) in &file.vaults {
            let key =
                Credential::from_files(entry.key_file.as_deref(), entry.passphrase_file.as_deref())
                    .map_err(|e| invalid(format!("[vaults.{name}]: {e}")))?;
            vaults.insert(name.clone(), (entry.clone(), key));
        }
        let schedule = file.schedule().map_err(|e| invalid(format!("[upkeep] {e}")))?;
        Ok(VaultSet { vaults, schedule, grace: file.grace() })
    }

    /// Opens `vault` with the rights to delete.
    async fn open(&self, vault: &str) -> Result<Vault, String> {
        let (entry, key) = self
            .vaults
            .get(vault)
            .ok_or_else(|| format!("vault {vault} is not in the vaults file"))?;
        let options = OpenOptions {
            store: StoreOptions(entry.options.clone().into_iter().collect()),
            key: key.clone(),
            append_only: false,
        };
        // The URL stays out of the message: it may hold a credential, and messages reach
        // viewers, alerts and the webhook.
        Vault::open_with(&entry.url, &options)
            .await
            .map_err(|e| format!("opening vault {vault}: {e}"))
    }
}

/// How far ahead of the coordinator's clock a point may be dated (hosts' clocks drift).
const MAX_SKEW: SignedDuration = SignedDuration::from_hours(24);

/// Prunes one VM by its rule into `report`. A VM with a point dated ahead of the clock is
/// left alone: such a point would take the newest slots of every rule and expire the real ones.
async fn prune_vm(
    v: &Vault,
    rule: &VmRule,
    grace: SignedDuration,
    now: Timestamp,
    report: &mut UpkeepReport,
) -> Result<(), String> {
    let name: Name = rule.vm.parse().map_err(|e| format!("not a VM name a vault holds: {e}"))?;
    let listing = v.list_points(Some(&name)).await.map_err(|e| e.to_string())?;
    let limit = now.checked_add(MAX_SKEW).unwrap_or(now);
    if let Some(m) = listing.points.iter().find(|m| m.captured_at > limit) {
        return Err(format!(
            "point {} is dated {}, ahead of the coordinator's clock: not pruned until it is \
             checked (a host's clock, or a forged manifest); delete it with `cairn-agent delete` \
             if it is not genuine",
            m.point, m.captured_at
        ));
    }
    let purge_only = rule.purgeable.iter().filter_map(|p| p.parse().ok()).collect();
    let options = PruneOptions {
        retention: rule.retention.clone(),
        vm: Some(name),
        grace,
        dry_run: false,
        now,
        purge_only: Some(purge_only),
    };
    let pruned = cairn_backup::prune(v, &options).await.map_err(|e| e.to_string())?;
    for p in pruned.points {
        let (fate, why) = fate_of(&p.action);
        report.points.push(PointFate {
            vm: p.vm.to_string(),
            point: p.point.to_string(),
            captured_at: p.time,
            fate,
            why,
        });
    }
    for (vm, why) in pruned.skipped_vms {
        report.errors.push(format!("VM {vm}: {why}"));
    }
    Ok(())
}

fn fate_of(action: &Action) -> (Fate, String) {
    match action {
        Action::Keep(why) => (Fate::Kept, why.join(", ")),
        Action::Expire => (Fate::Expired, "no retention rule keeps it".into()),
        Action::InGrace(until) => (Fate::InGrace, format!("soft-deleted, purged after {until}")),
        Action::Purge => (Fate::Purged, "soft-deleted and past its grace".into()),
        Action::Locked(until) => (Fate::Locked, format!("locked until {until}")),
        Action::Unknown(e) => (Fate::Unknown, e.clone()),
        Action::Unconfirmed => (
            Fate::Unknown,
            "soft-deleted by another writer, not by this coordinator: not purged (undelete it, \
             or purge it by hand)"
                .into(),
        ),
    }
}

#[async_trait]
impl VaultKeeper for VaultSet {
    fn vaults(&self) -> Vec<String> {
        self.vaults.keys().cloned().collect()
    }

    fn schedule(&self) -> Schedule {
        self.schedule.clone()
    }

    fn grace(&self) -> SignedDuration {
        self.grace
    }

    async fn upkeep(
        &self,
        vault: &str,
        rules: &[VmRule],
        now: Timestamp,
    ) -> Result<UpkeepReport, String> {
        let v = self.open(vault).await?;
        let mut report = UpkeepReport::default();
        for rule in rules {
            if let Err(e) = prune_vm(&v, rule, self.grace, now, &mut report).await {
                report.errors.push(format!("VM {}: {e}", rule.vm));
            }
        }
        let say = |s: &str| tracing::info!(vault, "gc: {s}");
        // Never wait for running backups: the plan stays pending and a later upkeep
        // finishes it, so a long backup cannot hold the vault's upkeep.
        match v.gc(&GcOptions { wait: false, ..GcOptions::default() }, &say).await {
            Ok(gc) => {
                report.packs_deleted = gc.packs_dead;
                report.packs_repacked = gc.packs_repacked;
                report.bytes_freed = gc.bytes_deleted.saturating_sub(gc.bytes_written);
                for plan in &gc.pending {
                    report.skipped.push(format!(
                        "gc plan {plan} waits for backups that were running; the next upkeep finishes it"
                    ));
                }
                if !gc.bad_copies.is_empty() {
                    report.errors.push(format!(
                        "gc found {} damaged chunk(s) it could not copy: run `cairn-agent verify` on the vault",
                        gc.bad_copies.len()
                    ));
                }
            }
            Err(e) => report.errors.push(format!("collecting: {e}")),
        }
        Ok(report)
    }

    async fn scan(&self, vault: &str) -> Result<Vec<FoundPoint>, String> {
        let v = self.open(vault).await?;
        let failed = |e: cairn_vault::Error| format!("reading its points: {e}");
        let listing = v.list_points(None).await.map_err(failed)?;
        let states = v.point_states(None).await.map_err(failed)?;
        for u in &listing.unreadable {
            tracing::warn!(vault, vm = %u.vm, point = %u.point, "unreadable manifest left out of the rescan: {}", u.error);
        }
        Ok(listing
            .points
            .iter()
            .map(|m| FoundPoint {
                vm: m.vm.to_string(),
                point: PointReport::of(m),
                // A point whose notes cannot be read is listed as live (retention keeps it too).
                deleted: states.get(&m.vm, &m.point).is_ok_and(|s| s.deleted.is_some()),
                catalogue: m.origin.as_ref().and_then(|o| o.catalogue.clone()),
                job: m.origin.as_ref().and_then(|o| o.job),
                scheduled_at: m.origin.as_ref().and_then(|o| o.scheduled_at),
                held_until: states
                    .get(&m.vm, &m.point)
                    .ok()
                    .and_then(|s| s.snapshot.map(|t| t.until)),
                drill: states
                    .get(&m.vm, &m.point)
                    .ok()
                    .and_then(|s| s.drill.map(|d| (d.at, d.passed))),
            })
            .collect())
    }

    async fn delete_vm(
        &self,
        vault: &str,
        vm: &str,
        now: Timestamp,
    ) -> Result<Vec<String>, String> {
        let v = self.open(vault).await?;
        let name: Name = vm.parse().map_err(|e| format!("VM {vm:?}: {e}"))?;
        let failed =
            |e: cairn_vault::Error| format!("deleting VM {vm}'s points in vault {vault}: {e}");
        let listing = v.list_points(Some(&name)).await.map_err(failed)?;
        let states = v.point_states(Some(&name)).await.map_err(failed)?;
        let mut deleted = vec![];
        for m in &listing.points {
            if states.get(&name, &m.point).is_ok_and(|s| s.deleted.is_some()) {
                continue;
            }
            let reason = format!("protection of VM {vm} stopped with its data deleted at {now}");
            match v.soft_delete(&name, &m.point, &reason, self.grace, now).await {
                Ok(_) => deleted.push(m.point.to_string()),
                // A locked point stays, as its lock says; the others go on.
                Err(e @ cairn_vault::Error::Locked { .. }) => {
                    tracing::warn!(vm, point = %m.point, "kept: {e}");
                }
                Err(e) => return Err(failed(e)),
            }
        }
        Ok(deleted)
    }
}
