//! Cooperative cancellation shared by a job's tasks and threads.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A flag a job polls between batches: once set, the job stops, commits nothing and returns
/// [`crate::Error::Cancelled`].
#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// A flag not yet set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every holder to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether cancellation was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}
