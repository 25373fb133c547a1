//! A point's life after its commit: soft deletion, undeletion, locks and the final purge.
//!
//! Deleting is two steps, as Azure Backup does it: a soft delete writes a note that hides the
//! point from listings and retention but keeps everything (it still restores by id, and
//! `undelete` brings it back); once its grace time has passed, a purge removes its manifest,
//! then its damage records and notes. Only then can the collector free the chunks it alone
//! needed. A lock ("immutable until") refuses both steps until it ends, and cannot be
//! shortened; an append-only handle refuses both steps always.

use cairn_format::{Change, Deletion, Name, PointId, PointState};
use jiff::{SignedDuration, Timestamp};

use crate::{Error, Vault, layout};

/// The grace time of a soft-deleted point before a purge may remove it, unless chosen
/// otherwise: 14 days, as Azure Backup keeps soft-deleted items.
pub const DEFAULT_GRACE: SignedDuration = SignedDuration::from_hours(14 * 24);

impl Vault {
    /// Soft-deletes `vm`/`point` at `now`: it may be purged after `now + grace`. Refused for a
    /// point that does not exist, a locked one, and on an append-only handle. Deleting a
    /// point already deleted keeps its first deletion.
    pub async fn soft_delete(
        &self,
        vm: &Name,
        point: &PointId,
        reason: &str,
        grace: SignedDuration,
        now: Timestamp,
    ) -> Result<Deletion, Error> {
        self.check_may_delete(format!("delete point {point} of VM {vm}"))?;
        self.read_point(vm, point).await?;
        let state = self.point_state(vm, point).await?;
        if let Some(d) = state.deleted {
            return Ok(d);
        }
        let purge_after = now.checked_add(grace).unwrap_or(Timestamp::MAX);
        let deletion = Deletion { at: now, purge_after, reason: reason.into() };
        self.write_note(vm, point, "delete", &[Change::Delete(deletion.clone())]).await?;
        Ok(deletion)
    }

    /// Brings a soft-deleted point back (optionally keeping it until `retain_until`, so that
    /// the next prune does not expire it again). Returns false if it was not deleted.
    pub async fn undelete(
        &self,
        vm: &Name,
        point: &PointId,
        retain_until: Option<Timestamp>,
    ) -> Result<bool, Error> {
        self.read_point(vm, point).await?;
        let state = self.point_state(vm, point).await?;
        let mut changes = vec![];
        if state.deleted.is_some() {
            changes.push(Change::Undelete);
        }
        if retain_until.is_some() {
            changes.push(Change::RetainUntil(retain_until));
        }
        if !changes.is_empty() {
            self.write_note(vm, point, "undelete", &changes).await?;
        }
        Ok(state.deleted.is_some())
    }

    /// Locks `vm`/`point` until `until`: no prune, purge or delete may remove it before then.
    /// A lock only grows: an earlier `until` than the current lock changes nothing.
    pub async fn lock_point(
        &self,
        vm: &Name,
        point: &PointId,
        until: Timestamp,
    ) -> Result<PointState, Error> {
        self.read_point(vm, point).await?;
        self.write_note(vm, point, "lock", &[Change::LockUntil(until)]).await
    }

    /// Keeps `vm`/`point` until `until` whatever retention says (`None`: no longer).
    pub async fn retain_until(
        &self,
        vm: &Name,
        point: &PointId,
        until: Option<Timestamp>,
    ) -> Result<PointState, Error> {
        self.read_point(vm, point).await?;
        self.write_note(vm, point, "retain", &[Change::RetainUntil(until)]).await
    }

    /// Removes a soft-deleted point whose grace time has passed at `now`: its manifest first
    /// (the point is gone from then on), then its damage records and notes. Refused for a
    /// point that is not soft-deleted, still in its grace time, or locked.
    pub async fn purge(&self, vm: &Name, point: &PointId, now: Timestamp) -> Result<(), Error> {
        self.check_may_delete(format!("purge point {point} of VM {vm}"))?;
        let state = self.point_state(vm, point).await?;
        if let Some(until) = state.locked_until.filter(|_| state.is_locked(now)) {
            return Err(Error::Locked { vm: vm.clone(), point: point.clone(), until });
        }
        match &state.deleted {
            Some(d) if d.purge_after <= now => {}
            Some(d) => {
                return Err(Error::InGrace {
                    vm: vm.clone(),
                    point: point.clone(),
                    purge_after: d.purge_after,
                });
            }
            None => return Err(Error::NotDeleted { vm: vm.clone(), point: point.clone() }),
        }
        self.delete_all(&[layout::manifest(vm, point)]).await?;
        let mut damage = self.list_paths(&layout::damage(vm, Some(point))).await?;
        damage.push(layout::legacy_damage(vm, point));
        self.delete_all(&damage).await?;
        self.remove_notes(vm, point).await
    }
}
