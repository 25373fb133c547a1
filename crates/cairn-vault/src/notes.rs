//! Point notes: reading and writing the changing state of points (see `cairn_format::note`).
//!
//! Notes live at `notes/<vm>/<point>/<note id>.json`, create-only and sealed like every
//! other object. A note id is a point id (a time and random digits) chosen to sort after the
//! point's existing notes even if the clock went back, so note order is write order.

use std::collections::BTreeMap;

use cairn_format::{Change, Name, PointId, PointNote, PointState};
use futures::StreamExt;
use jiff::Timestamp;
use object_store::path::Path;

use crate::{Error, Vault, layout};

/// The states of many points, read from their notes.
#[derive(Clone, Debug, Default)]
pub struct PointStates {
    /// Each point that has notes, with its state.
    pub states: BTreeMap<(Name, PointId), PointState>,
    /// Points with a note that cannot be read or decoded: their state is unknown.
    pub unreadable: BTreeMap<(Name, PointId), String>,
}

impl PointStates {
    /// The state of `vm`/`point` (the default state if it has no notes); an error if its notes
    /// cannot be read.
    pub fn get(&self, vm: &Name, point: &PointId) -> Result<PointState, Error> {
        let key = (vm.clone(), point.clone());
        if let Some(detail) = self.unreadable.get(&key) {
            return Err(Error::UnreadableNotes {
                vm: vm.clone(),
                point: point.clone(),
                detail: detail.clone(),
            });
        }
        Ok(self.states.get(&key).cloned().unwrap_or_default())
    }
}

impl Vault {
    /// Reads the notes of every point (of `vm`, or of all VMs) and folds them into states.
    pub async fn point_states(&self, vm: Option<&Name>) -> Result<PointStates, Error> {
        self.states_under(&layout::notes(vm, None)).await
    }

    /// The state of one point.
    pub async fn point_state(&self, vm: &Name, point: &PointId) -> Result<PointState, Error> {
        self.states_under(&layout::notes(Some(vm), Some(point))).await?.get(vm, point)
    }

    async fn states_under(&self, prefix: &Path) -> Result<PointStates, Error> {
        let paths = self.list_paths(prefix).await?;
        // Sorted paths: per point, notes in id order.
        let named: Vec<_> = paths
            .into_iter()
            .filter_map(|p| layout::parse_note_path(&p).map(|(vm, point, _)| (p, vm, point)))
            .collect();
        let mut read = futures::stream::iter(named)
            .map(|(path, vm, point)| async move {
                let note = match self.get_opened("point note", &path).await {
                    Ok(Some(bytes)) => PointNote::decode(&bytes)
                        .map_err(|e| e.to_string())
                        .and_then(|n| match n.vm == vm && n.point == point {
                            true => Ok(Some(n)),
                            false => Err(format!("{path} describes another point")),
                        }),
                    // Listed, then removed with its point.
                    Ok(None) => Ok(None),
                    Err(e @ Error::Corrupt { .. }) => Err(e.to_string()),
                    Err(e) => return Err(e),
                };
                Ok((vm, point, note))
            })
            .buffered(16);
        let mut out = PointStates::default();
        while let Some(next) = read.next().await {
            let (vm, point, note) = next?;
            let key = (vm, point);
            match note {
                Ok(Some(note)) => {
                    let state = out.states.entry(key.clone()).or_default();
                    if let Err(e) = state.apply(&note) {
                        out.unreadable.insert(key, e.to_string());
                    }
                }
                Ok(None) => {}
                Err(detail) => {
                    out.unreadable.insert(key, detail);
                }
            }
        }
        Ok(out)
    }

    /// Writes a note on `vm`/`point` making `changes`, as operation `op` (for people reading
    /// it). A soft deletion is refused on an append-only handle and on a locked point.
    pub async fn write_note(
        &self,
        vm: &Name,
        point: &PointId,
        op: &str,
        changes: &[Change],
    ) -> Result<PointState, Error> {
        let now = Timestamp::now();
        let existing = self.list_paths(&layout::notes(Some(vm), Some(point))).await?;
        let mut state = self.point_state(vm, point).await?;
        if changes.iter().any(|c| matches!(c, Change::Delete(_))) {
            self.check_may_delete(format!("delete point {point} of VM {vm}"))?;
            if let Some(until) = state.locked_until.filter(|_| state.is_locked(now)) {
                return Err(Error::Locked { vm: vm.clone(), point: point.clone(), until });
            }
        }
        let last = existing.last().and_then(layout::parse_note_path).map(|(_, _, id)| id);
        let id = crate::points::id_after(last.as_ref(), now);
        let writer = format!("cairn {} {op}", env!("CARGO_PKG_VERSION"));
        let note = PointNote::new(vm.clone(), point.clone(), now, writer, changes);
        let path = layout::note(vm, point, &id);
        self.put_new(&path, note.encode(), "write").await?;
        state.apply(&note)?;
        Ok(state)
    }

    /// Removes every note of `vm`/`point` (its manifest is gone).
    pub(crate) async fn remove_notes(&self, vm: &Name, point: &PointId) -> Result<(), Error> {
        let paths = self.list_paths(&layout::notes(Some(vm), Some(point))).await?;
        self.delete_all(&paths).await
    }
}
