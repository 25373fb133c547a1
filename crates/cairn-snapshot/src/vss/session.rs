//! VSS in the capture lifecycle.
//!
//! VSS is both roles at once: it quiesces the writers and it makes the view (the shadow
//! copy), and it thaws inside `DoSnapshotSet`, before the backup reads anything. A
//! [`VssSession`] is the quiescer (the ladder, up to the shadow copy); its [`VssViews`] is
//! the view provider (each volume's shadow-copy device). The session finishes, with
//! backup-complete for a committed point or abort otherwise, when its last view is released.

use std::sync::{Arc, Mutex, MutexGuard};

use cairn_format::Consistency;

use super::{VssBackend, VssOptions, VssSnapshot};
use crate::capture::{DiskSpec, Hold, Quiescer, View, ViewProvider};
use crate::{Error, Record};

struct Shared<B> {
    backend: B,
    snapshot: Option<VssSnapshot>,
    views_out: usize,
}

/// A VSS backup of some volumes: the quiescer half.
pub struct VssSession<B: VssBackend> {
    shared: Arc<Mutex<Shared<B>>>,
    volumes: Vec<String>,
    options: VssOptions,
}

/// The view-provider half of a [`VssSession`]: a disk's `path` is its volume (`C:\`).
pub struct VssViews<B> {
    shared: Arc<Mutex<Shared<B>>>,
}

fn lock<B>(shared: &Mutex<Shared<B>>) -> MutexGuard<'_, Shared<B>> {
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<B: VssBackend + Send + 'static> VssSession<B> {
    /// A session over `backend` for `volumes`.
    pub fn new(backend: B, volumes: Vec<String>, options: VssOptions) -> VssSession<B> {
        let shared = Shared { backend, snapshot: None, views_out: 0 };
        VssSession { shared: Arc::new(Mutex::new(shared)), volumes, options }
    }

    /// The view provider sharing this session's shadow copies.
    pub fn views(&self) -> VssViews<B> {
        VssViews { shared: Arc::clone(&self.shared) }
    }

    /// Runs `f` on the backend (for inspection in tests and logs).
    pub fn with_backend<T>(&self, f: impl FnOnce(&B) -> T) -> T {
        f(&lock(&self.shared).backend)
    }
}

impl<B: VssBackend + Send + 'static> Quiescer for VssSession<B> {
    fn quiesce(&mut self, record: &mut Record) -> Result<Box<dyn Hold>, Error> {
        let mut shared = lock(&self.shared);
        let snapshot = super::run(&mut shared.backend, &self.volumes, &self.options, record)?;
        shared.snapshot = Some(snapshot);
        Ok(Box::new(Thawed))
    }
}

impl<B: VssBackend> Drop for VssSession<B> {
    fn drop(&mut self) {
        // A capture that failed before any view was taken leaves the snapshot set behind.
        let mut shared = lock(&self.shared);
        if shared.views_out == 0 && shared.snapshot.take().is_some() {
            shared.backend.abort_backup();
        }
    }
}

/// VSS thawed the writers inside `DoSnapshotSet`: nothing is left to resume.
struct Thawed;

impl Hold for Thawed {
    fn resume(self: Box<Self>, _: &mut Record) -> Result<(), Error> {
        Ok(())
    }
}

impl<B: VssBackend + Send + 'static> ViewProvider for VssViews<B> {
    fn kind(&self) -> &'static str {
        "vss"
    }

    fn take(&self, disk: &DiskSpec) -> Result<View, Error> {
        let volume = disk.path.to_string_lossy().into_owned();
        let mut shared = lock(&self.shared);
        let device =
            shared.snapshot.as_ref().and_then(|s| s.devices.get(&volume).cloned()).ok_or_else(
                || {
                    Error::Vss(format!(
                        "disk {}: volume {volume} is not in the VSS snapshot set; add it to the session's volumes",
                        disk.name
                    ))
                },
            )?;
        shared.views_out += 1;
        let shared = Arc::clone(&self.shared);
        let release = move |committed: bool| {
            let mut guard = lock(&shared);
            guard.views_out -= 1;
            if guard.views_out == 0
                && let Some(snapshot) = guard.snapshot.take()
            {
                let mut after = Record::new(Consistency::None);
                snapshot.finish(&mut guard.backend, committed, &mut after);
                for e in after.evidence() {
                    tracing::info!("{}", e.message);
                }
            }
            Ok(())
        };
        Ok(View::snapshot(disk, "vss", device.into(), Box::new(release)))
    }
}
