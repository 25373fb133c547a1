//! The coordinator as a service: the API on a listener, and once a second a pass that plans
//! what policies make due and dispatches what may start.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_policy::Limits;
use jiff::Timestamp;

use crate::api::{Shared, router};
use crate::{Catalogue, Error, dispatch, plan};

/// Where the coordinator's time comes from.
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> Timestamp;
}

/// The system's clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock read from a file holding an RFC 3339 time, for tests that compress days into
/// seconds: whoever writes the file moves time. Unreadable: the last time read.
pub struct FileClock {
    path: PathBuf,
    last: Mutex<Timestamp>,
}

impl FileClock {
    /// A clock reading `path`.
    pub fn new(path: PathBuf) -> FileClock {
        FileClock { path, last: Mutex::new(Timestamp::UNIX_EPOCH) }
    }
}

impl Clock for FileClock {
    fn now(&self) -> Timestamp {
        let read = std::fs::read_to_string(&self.path).ok().and_then(|t| t.trim().parse().ok());
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = read {
            *last = t;
        }
        *last
    }
}

/// Serves the API on `listener` and runs the planning pass every second until `shutdown`.
pub async fn serve(
    catalogue: Catalogue,
    listener: tokio::net::TcpListener,
    clock: Arc<dyn Clock>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let shared = Arc::new(Shared { catalogue: Mutex::new(catalogue), clock });
    let ticker = shared.clone();
    let pass = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            every.tick().await;
            let now = ticker.clock.now();
            let Ok(mut catalogue) = ticker.catalogue.lock() else { return };
            let result = plan(&mut catalogue, now)
                .and_then(|p| dispatch(&mut catalogue, &limits, now).map(|d| (p, d)));
            match result {
                Ok((p, d)) if p.jobs_added + d.started.len() > 0 => tracing::info!(
                    queued = p.jobs_added,
                    missed = p.missed,
                    started = d.started.len(),
                    waiting = d.waiting.len(),
                    "planning pass"
                ),
                Ok(_) => {}
                Err(e) => tracing::error!("planning pass: {e}"),
            }
        }
    });
    let served = axum::serve(listener, router(shared))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::Serve(e.to_string()));
    pass.abort();
    served
}
