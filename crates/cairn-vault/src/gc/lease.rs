//! One collector or repair run at a time: a create-only lease, taken over only from a process
//! known dead (this host) or after the stale age.

use cairn_format::Lease;
use jiff::{SignedDuration, Timestamp};
use object_store::ObjectStoreExt;

use crate::points::{marker_owner, owner_is_dead};
use crate::{Error, Vault, layout};

impl Vault {
    /// Takes the vault's lease for `what` (`gc`, `repair`).
    pub(crate) async fn take_lease(
        &self,
        what: &str,
        stale_after: SignedDuration,
    ) -> Result<(), Error> {
        // Credentials that cannot delete (an append-only SAS) must not take a lease they could
        // never give back: a probe object is written and deleted first.
        let probe = object_store::path::Path::from(format!(
            "lease/probe-{}.json",
            cairn_format::PointId::new(Timestamp::now(), rand::RngExt::random(&mut rand::rng()))
        ));
        self.put_new(&probe, b"{}".to_vec(), "write").await?;
        self.delete_all(std::slice::from_ref(&probe)).await?;
        let path = layout::gc_lease();
        let lease =
            Lease { format: 1, owner: marker_owner(), what: what.into(), at: Timestamp::now() };
        for _ in 0..2 {
            match self.put_new(&path, lease.encode(), "write").await {
                Ok(()) => return Ok(()),
                Err(Error::Storage {
                    source: object_store::Error::AlreadyExists { .. }, ..
                }) => {}
                Err(e) => return Err(e),
            }
            let held = match self.get_opened("lease", &path).await {
                Ok(Some(bytes)) => Lease::decode(&bytes).ok(),
                Ok(None) => continue,
                Err(Error::Corrupt { .. }) => None,
                Err(e) => return Err(e),
            };
            let age = match self.store.head(&path).await {
                Ok(meta) => Timestamp::now().duration_since(super::store_time(&meta)),
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(Error::storage("read", &path, e)),
            };
            let dead = held.as_ref().is_some_and(|l| owner_is_dead(&l.owner));
            if !dead && age <= stale_after {
                let who = held
                    .map(|l| format!("a {} run of {} since {}", l.what, l.owner, l.at))
                    .unwrap_or_else(|| "an unreadable lease".into());
                return Err(Error::GcUnsafe {
                    detail: format!(
                        "{who} holds the vault's lease ({path}): one gc or repair at a time. Wait \
                         for it; if it died on another host, its lease expires after the stale \
                         age ({:#}), or delete {path} once you are sure it is gone",
                        stale_after
                    ),
                });
            }
            tracing::warn!(%path, "taking over the lease of a gc or repair run that is gone");
            self.delete_all(std::slice::from_ref(&path)).await?;
        }
        Err(Error::GcUnsafe {
            detail: format!("another run took the lease {path} meanwhile; try again"),
        })
    }

    /// Gives the lease back; a failure is logged (the lease then waits for the stale age, or
    /// for a run on this host to find this process gone).
    pub(crate) async fn release_lease(&self) {
        if let Err(e) = self.delete_all(&[layout::gc_lease()]).await {
            tracing::warn!("could not release the gc lease: {e}");
        }
    }
}
