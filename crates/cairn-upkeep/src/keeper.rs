//! [`VaultSet`]: the vaults of the vaults file, opened with full rights for each operation.

use std::collections::BTreeMap;

use async_trait::async_trait;
use cairn_backup::{Action, PruneOptions};
use cairn_format::Name;
use cairn_policy::{Retention, Schedule};
use cairn_protocol::PointReport;
use cairn_scheduler::{Fate, FoundPoint, PointFate, UpkeepReport, VaultKeeper};
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
        Vault::open_with(&entry.url, &options)
            .await
            .map_err(|e| format!("opening vault {vault} ({}): {e}", entry.url))
    }
}

fn fate_of(action: &Action) -> (Fate, String) {
    match action {
        Action::Keep(why) => (Fate::Kept, why.join(", ")),
        Action::Expire => (Fate::Expired, "no retention rule keeps it".into()),
        Action::InGrace(until) => (Fate::InGrace, format!("soft-deleted, purged after {until}")),
        Action::Purge => (Fate::Purged, "soft-deleted and past its grace".into()),
        Action::Locked(until) => (Fate::Locked, format!("locked until {until}")),
        Action::Unknown(e) => (Fate::Unknown, e.clone()),
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

    async fn upkeep(
        &self,
        vault: &str,
        rules: &[(String, Retention)],
        now: Timestamp,
    ) -> Result<UpkeepReport, String> {
        let v = self.open(vault).await?;
        let mut report = UpkeepReport::default();
        for (vm, retention) in rules {
            let Ok(name) = vm.parse::<Name>() else {
                report.skipped.push(format!("{vm:?} is not a VM name a vault holds"));
                continue;
            };
            let options = PruneOptions {
                retention: retention.clone(),
                vm: Some(name),
                grace: self.grace,
                dry_run: false,
                now,
            };
            let pruned = cairn_backup::prune(&v, &options)
                .await
                .map_err(|e| format!("pruning VM {vm} in vault {vault}: {e}"))?;
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
            report
                .skipped
                .extend(pruned.skipped_vms.into_iter().map(|(vm, why)| format!("{vm}: {why}")));
        }
        let say = |s: &str| tracing::info!(vault, "gc: {s}");
        // Never wait for running backups: the plan stays pending and a later upkeep
        // finishes it, so a long backup cannot hold the vault's upkeep.
        let gc = v
            .gc(&GcOptions { wait: false, ..GcOptions::default() }, &say)
            .await
            .map_err(|e| format!("collecting vault {vault}: {e}"))?;
        report.packs_deleted = gc.packs_dead;
        report.packs_repacked = gc.packs_repacked;
        report.bytes_freed = gc.bytes_deleted.saturating_sub(gc.bytes_written);
        for plan in &gc.pending {
            report.skipped.push(format!(
                "gc plan {plan} waits for backups that were running; the next upkeep finishes it"
            ));
        }
        if !gc.bad_copies.is_empty() {
            report.skipped.push(format!(
                "gc found {} damaged chunk(s) it could not copy: run `cairn-agent verify` on vault {vault}",
                gc.bad_copies.len()
            ));
        }
        Ok(report)
    }

    async fn scan(&self, vault: &str) -> Result<Vec<FoundPoint>, String> {
        let v = self.open(vault).await?;
        let failed = |e: cairn_vault::Error| format!("reading the points of vault {vault}: {e}");
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
