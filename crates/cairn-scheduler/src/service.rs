//! The coordinator as a service: the API on a listener, and every quarter second a pass that plans
//! what policies make due and dispatches what may start.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_policy::Limits;
pub use cairn_protocol::{Clock, FileClock, SystemClock};

use crate::api::{Shared, router};
use crate::{Catalogue, Error, dispatch, plan};

/// How often the planning and dispatch pass runs: a job starts at most this late (plus the
/// pass's own work; benches/coordinator_scale.sh measures it), and a pass with nothing due
/// reads two indexes.
pub const PASS_EVERY: Duration = Duration::from_millis(250);

/// How the service runs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Backups at once per host, datastore and vault.
    pub limits: Limits,
    /// A running job whose agent is silent this long fails (and raises an alert).
    pub agent_timeout: Duration,
    /// Alerts are POSTed here as JSON, each once.
    pub webhook: Option<String>,
    /// The coordinator's hands on its vaults (prune, gc, rescan, deletion); none: it holds
    /// no vault keys, and those calls are refused.
    pub keeper: Option<crate::Keeper>,
    /// The local user file people log in from (none: tokens only).
    pub users: Option<crate::UsersFile>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            limits: Limits::default(),
            agent_timeout: Duration::from_secs(600),
            webhook: None,
            keeper: None,
            users: None,
        }
    }
}

/// Serves the API on `listener` and runs the planning pass every [`PASS_EVERY`] until `shutdown`.
pub async fn serve<L>(
    catalogue: Catalogue,
    listener: L,
    clock: Arc<dyn Clock>,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let shared = Arc::new(Shared {
        catalogue: Mutex::new(catalogue),
        clock,
        wakeup: tokio::sync::Notify::new(),
        settings,
        vault_locks: Default::default(),
        login_failures: Default::default(),
    });
    let ticker = shared.clone();
    let pass = tokio::spawn(async move {
        let mut every = tokio::time::interval(PASS_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            every.tick().await;
            let started = {
                let mut catalogue = ticker.catalogue.lock().unwrap_or_else(|p| p.into_inner());
                one_pass(&mut catalogue, &ticker)
            };
            if started {
                ticker.wakeup.notify_waiters();
            }
        }
    });
    // Alerts go out on their own loop: a slow receiver must not delay a dispatch.
    let sender = shared.clone();
    let hook = tokio::spawn(async move {
        let Some(url) = sender.settings.webhook.clone() else { return };
        let mut every = tokio::time::interval(Duration::from_secs(2));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            every.tick().await;
            crate::webhook::send(&sender, &url).await;
        }
    });
    // Upkeep and the RPO check: slow vault work, apart from the planning pass.
    let upkeep = tokio::spawn(crate::vault_api::upkeep_loop(shared.clone()));
    let served = axum::serve(listener, router(shared))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::Serve(e.to_string()));
    pass.abort();
    hook.abort();
    upkeep.abort();
    served
}

/// Plans, dispatches and fails the jobs of silent agents; true if jobs started.
fn one_pass(catalogue: &mut Catalogue, shared: &Shared) -> bool {
    let now = shared.clock.now();
    let timeout = jiff::SignedDuration::try_from(shared.settings.agent_timeout)
        .unwrap_or(jiff::SignedDuration::from_secs(600));
    let silent_since = now.checked_sub(timeout).unwrap_or(jiff::Timestamp::MIN);
    let result = plan(catalogue, now).and_then(|p| {
        let d = dispatch(catalogue, &shared.settings.limits, now)?;
        let failed = catalogue.fail_silent(silent_since, now)?;
        Ok((p, d, failed))
    });
    match result {
        Ok((p, d, failed)) => {
            if p.jobs_added + d.started.len() + failed.len() > 0 {
                tracing::info!(
                    queued = p.jobs_added,
                    missed = p.missed,
                    started = d.started.len(),
                    waiting = d.waiting.len(),
                    failed_silent = failed.len(),
                    "planning pass"
                );
            }
            !d.started.is_empty()
        }
        Err(e) => {
            tracing::error!("planning pass: {e}");
            false
        }
    }
}
