//! In-flight markers as a collector sees them, and the fate record that settles, once, whether
//! a backup commits or is reaped.

use cairn_format::{Fate, FateKind, InflightMarker, PointId};
use jiff::{SignedDuration, Timestamp};
use object_store::ObjectStoreExt;
use object_store::path::Path;

use crate::{Error, Vault, layout};

/// What a marker means to a collector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MarkerKind {
    /// Its backup may be running: the collector waits for it before it deletes anything.
    Running,
    /// Its backup's process is known to be gone (this host): nothing to wait for, but its
    /// uploads stay protected for a resume until the marker is stale.
    Dead,
    /// Its manifest exists: the backup committed (an append-only agent leaves its marker).
    Done,
    /// Older than the stale age: a crashed backup; reaped, with its leftovers.
    Stale,
}

/// A marker, its kind, and the point it is for.
#[derive(Clone, Debug)]
pub(crate) struct MarkerInfo {
    pub(crate) point: PointId,
    pub(crate) marker: Option<InflightMarker>,
    pub(crate) kind: MarkerKind,
}

impl Vault {
    /// Every in-flight marker, classified at `now`. A marker's age is its object's time in
    /// the store (one clock for every writer); one that cannot be read is judged by its age
    /// alone (running until stale).
    pub(crate) async fn classify_markers(
        &self,
        now: Timestamp,
        stale_after: SignedDuration,
    ) -> Result<Vec<MarkerInfo>, Error> {
        let prefix = Path::from("inflight");
        let metas = self.list_metas(&prefix).await?;
        let mut out = vec![];
        for meta in metas.into_iter().filter(|m| layout::is_marker(&m.location)) {
            let Some(point) = meta
                .location
                .filename()
                .and_then(|f| f.strip_suffix(".json"))
                .and_then(|p| p.parse::<PointId>().ok())
            else {
                continue;
            };
            let marker = match self.get_opened("in-flight marker", &meta.location).await {
                Ok(Some(bytes)) => InflightMarker::decode(&bytes).ok(),
                Ok(None) => continue,
                Err(Error::Corrupt { .. }) => None,
                Err(e) => return Err(e),
            };
            let age = now.duration_since(super::store_time(&meta));
            let done = match &marker {
                Some(m) => self.head_exists(&layout::manifest(&m.vm, &point)).await?,
                None => false,
            };
            let kind = if done {
                MarkerKind::Done
            } else if age > stale_after {
                MarkerKind::Stale
            } else if self.marker_is_dead(&point).await {
                MarkerKind::Dead
            } else {
                MarkerKind::Running
            };
            out.push(MarkerInfo { point, marker, kind });
        }
        Ok(out)
    }

    /// Reaps the stale backup of `point`: writes its fate, `reaped`, create-only, then removes
    /// its resume records and marker. Returns false, and touches nothing, if the backup won the
    /// fate first (it is committing).
    pub(crate) async fn reap(&self, point: &PointId) -> Result<bool, Error> {
        let path = layout::fate(point);
        let fate = Fate::new(FateKind::Reaped, Timestamp::now());
        match self.put_new(&path, fate.encode(), "write").await {
            Ok(()) => {}
            Err(Error::Storage { source: object_store::Error::AlreadyExists { .. }, .. }) => {
                if self.read_fate(point).await? == Some(FateKind::Commit) {
                    return Ok(false);
                }
            }
            Err(e) => return Err(e),
        }
        self.remove_marker_and_records(point).await?;
        Ok(true)
    }

    /// Removes a marker that is done or reaped, and everything below it.
    pub(crate) async fn remove_marker_and_records(&self, point: &PointId) -> Result<(), Error> {
        let mut records = self.list_paths(&layout::resume_records(point)).await?;
        // The fate record last: while it says "reaped" a late commit is refused, and once
        // the marker is gone a commit that wins a fresh fate finds no marker and stops.
        records.sort_by_key(layout::is_fate);
        let fate: Vec<Path> = records.iter().filter(|p| layout::is_fate(p)).cloned().collect();
        records.retain(|p| !layout::is_fate(p));
        self.delete_all(&records).await?;
        self.delete_all(&[layout::inflight(point)]).await?;
        self.delete_all(&fate).await
    }

    /// The fate of `point`'s backup. One that cannot be read counts as `reaped`: its backup
    /// then refuses to commit, and a collector may remove it.
    async fn read_fate(&self, point: &PointId) -> Result<Option<FateKind>, Error> {
        let path = layout::fate(point);
        match self.get_opened("fate record", &path).await {
            Ok(None) => Ok(None),
            Ok(Some(bytes)) => {
                Ok(Some(Fate::decode(&bytes).map(|f| f.fate).unwrap_or(FateKind::Reaped)))
            }
            Err(Error::Corrupt { .. }) => Ok(Some(FateKind::Reaped)),
            Err(e) => Err(e),
        }
    }

    /// Claims the commit of the backup of `point`: its fate becomes `commit`, create-only.
    /// Refused when a collector reaped it first, or when its marker is gone (reaped, and the
    /// fate record already cleaned up): chunks it needs may have been freed.
    pub(crate) async fn claim_commit(&self, point: &PointId) -> Result<(), Error> {
        let path = layout::fate(point);
        let fate = Fate::new(FateKind::Commit, Timestamp::now());
        match self.put_new(&path, fate.encode(), "write").await {
            Ok(()) => {}
            Err(Error::Storage { source: object_store::Error::AlreadyExists { .. }, .. }) => {
                if self.read_fate(point).await? != Some(FateKind::Commit) {
                    return Err(Error::Reaped { point: point.clone() });
                }
            }
            Err(e) => return Err(e),
        }
        if !self.head_exists(&layout::inflight(point)).await? {
            return Err(Error::Reaped { point: point.clone() });
        }
        Ok(())
    }

    /// True if the backup of `point` claimed its commit longer than `age` ago (by the store's
    /// clock): a commit takes milliseconds, so that backup died between its claim and its
    /// manifest, and will not write one.
    pub(crate) async fn commit_claim_older_than(
        &self,
        point: &PointId,
        age: SignedDuration,
    ) -> Result<bool, Error> {
        let path = layout::fate(point);
        match self.store.head(&path).await {
            Ok(meta) => {
                let at = super::store_time(&meta);
                Ok(Timestamp::now().duration_since(at) > age)
            }
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(Error::storage("read", &path, e)),
        }
    }
}
