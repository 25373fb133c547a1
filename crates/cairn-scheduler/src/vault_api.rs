//! What the coordinator does on its vaults, through the [`VaultKeeper`] it was given: upkeep
//! (prune from each VM's policy, then gc) on the vaults file's schedule or on request,
//! `rescan`, and stop protection with deletion. One operation at a time per vault: a prune,
//! a gc and a deletion never overlap on one vault (backups may run meanwhile: the vault's gc
//! protects what they write).
//!
//! | call | role |
//! |---|---|
//! | `GET /api/v1/upkeep` (the runs, newest first), `GET /api/v1/upkeep/ID` (one, with each point's fate) | viewer |
//! | `POST /api/v1/vms/NAME/stop` (`{"delete_data": bool}`) | operator; admin to delete data |
//! | `POST /api/v1/upkeep` (`{"vault": NAME}` or every vault; answers when done) | admin |
//! | `POST /api/v1/rescan` (`{"vault": NAME, "force": bool}` or every vault) | admin |
//!
//! [`VaultKeeper`]: crate::VaultKeeper

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use jiff::Timestamp;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{Api, ApiError, Shared, authorize, lock, refuse};
use crate::catalogue::Role;
use crate::keeper::Keeper;

/// One lock per vault: whoever holds it may prune, collect or delete there.
#[derive(Default)]
pub struct VaultLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl VaultLocks {
    fn of(&self, vault: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(vault.to_owned()).or_default().clone()
    }
}

pub(crate) fn router() -> Router<Api> {
    Router::new()
        .route("/api/v1/upkeep", get(runs).post(upkeep_now))
        .route("/api/v1/upkeep/{id}", get(run))
        .route("/api/v1/rescan", post(rescan))
        .route("/api/v1/vms/{name}/stop", post(stop))
}

fn keeper(api: &Shared) -> Result<&Keeper, ApiError> {
    api.settings.keeper.as_ref().ok_or_else(|| {
        refuse(
            StatusCode::CONFLICT,
            "this coordinator holds no vaults: start it with --vaults FILE to prune, collect, \
             rescan and delete data",
        )
    })
}

/// The vaults a call names: the one given (which the keeper must hold), or all.
fn chosen(keeper: &Keeper, vault: Option<String>) -> Result<Vec<String>, ApiError> {
    let all = keeper.0.vaults();
    match vault {
        None => Ok(all),
        Some(v) if all.contains(&v) => Ok(vec![v]),
        Some(v) => Err(refuse(
            StatusCode::NOT_FOUND,
            &format!("vault {v} is not in the coordinator's vaults file (it has {all:?})"),
        )),
    }
}

/// Runs the upkeep of `vault` (waiting for the vault's lock), records it, and returns its
/// run id and outcome. The run is recorded whatever happens after it started.
pub(crate) async fn run_upkeep(
    api: &Shared,
    keeper: &Keeper,
    vault: &str,
    scheduled_at: Timestamp,
    who: &str,
    scheduled: bool,
) -> Result<(u64, Result<crate::UpkeepReport, String>), crate::Error> {
    let vault_lock = api.vault_locks.of(vault);
    let _held = vault_lock.lock().await;
    let now = api.clock.now();
    let schedule = keeper.0.schedule();
    let (id, rules) = {
        let mut catalogue = api.catalogue.lock().unwrap_or_else(|p| p.into_inner());
        let rules = catalogue.upkeep_rules(vault, keeper.0.grace(), now);
        let id = catalogue.start_upkeep(
            vault,
            scheduled_at,
            who,
            scheduled.then_some(&schedule),
            now,
        )?;
        match rules {
            Ok(rules) => (id, rules),
            Err(e) => {
                let outcome = Err(format!("reading the VMs' rules: {e}"));
                catalogue.finish_upkeep(id, vault, &outcome, now)?;
                return Ok((id, outcome));
            }
        }
    };
    tracing::info!(vault, run = id, vms = rules.len(), "upkeep starts");
    let outcome = keeper.0.upkeep(vault, &rules, now).await;
    let ended = api.clock.now();
    let mut catalogue = api.catalogue.lock().unwrap_or_else(|p| p.into_inner());
    catalogue.finish_upkeep(id, vault, &outcome, ended)?;
    match &outcome {
        Ok(r) => tracing::info!(
            vault,
            run = id,
            expired = r.count(&crate::Fate::Expired),
            purged = r.count(&crate::Fate::Purged),
            bytes_freed = r.bytes_freed,
            errors = r.errors.len(),
            "upkeep ended"
        ),
        Err(e) => tracing::error!(vault, run = id, "upkeep failed: {e}"),
    }
    Ok((id, outcome))
}

/// How often the RPO check runs (it reads every VM's newest point).
const RPO_EVERY: Duration = Duration::from_secs(60);
/// How often running transfers are checked against their deadline, and kept views' tiers
/// against their time (they read only running jobs and held points).
const TRANSFERS_EVERY: Duration = Duration::from_secs(5);

/// Runs `check` on the catalogue when `every` has passed since `last`, logging what it names.
fn periodic(
    api: &Shared,
    last: &mut Option<tokio::time::Instant>,
    every: Duration,
    what: &str,
    check: impl FnOnce(&mut crate::Catalogue) -> Result<Vec<String>, crate::Error>,
) {
    if last.is_some_and(|t| t.elapsed() < every) {
        return;
    }
    *last = Some(tokio::time::Instant::now());
    let found = check(&mut api.catalogue.lock().unwrap_or_else(|p| p.into_inner()));
    match found {
        Ok(names) if !names.is_empty() => tracing::warn!(?names, "{what}"),
        Ok(_) => {}
        Err(e) => tracing::error!("{e}"),
    }
}

/// Every second: the upkeep of each vault whose time has come, each in its own task (a long
/// gc on one vault holds up no other); every 5 s, transfer deadlines and kept views' tiers;
/// every minute, the RPO check.
pub(crate) async fn upkeep_loop(api: Api) {
    {
        let now = api.clock.now();
        let mut catalogue = api.catalogue.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = catalogue.fail_interrupted_upkeeps(now) {
            tracing::error!("{e}");
        }
    }
    let running: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_rpo: Option<tokio::time::Instant> = None;
    let mut last_transfers: Option<tokio::time::Instant> = None;
    loop {
        every.tick().await;
        let now = api.clock.now();
        periodic(
            &api,
            &mut last_transfers,
            TRANSFERS_EVERY,
            "transfers past their deadline",
            |c| c.check_transfers(now).map(|jobs| jobs.iter().map(u64::to_string).collect()),
        );
        periodic(&api, &mut last_rpo, RPO_EVERY, "RPO exceeded", |c| c.check_rpo(now));
        let Some(keeper) = api.settings.keeper.clone() else { continue };
        let schedule = keeper.0.schedule();
        for vault in keeper.0.vaults() {
            if running.lock().unwrap_or_else(|p| p.into_inner()).contains(&vault) {
                continue;
            }
            let due = {
                let mut catalogue = api.catalogue.lock().unwrap_or_else(|p| p.into_inner());
                catalogue.upkeep_due(&vault, &schedule, now)
            };
            match due {
                Ok(Some(at)) => {
                    running.lock().unwrap_or_else(|p| p.into_inner()).insert(vault.clone());
                    let (api, keeper, running) = (api.clone(), keeper.clone(), running.clone());
                    tokio::spawn(async move {
                        if let Err(e) =
                            run_upkeep(&api, &keeper, &vault, at, "schedule", true).await
                        {
                            tracing::error!(vault, "upkeep: {e}");
                        }
                        running.lock().unwrap_or_else(|p| p.into_inner()).remove(&vault);
                    });
                }
                Ok(None) => {}
                Err(e) => tracing::error!(vault, "upkeep: {e}"),
            }
        }
    }
}

async fn runs(State(api): State<Api>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    authorize(&api, &headers, Role::Viewer)?;
    Ok(Json(json!({ "runs": lock(&api)?.upkeep_runs(200)? })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct VaultBody {
    vault: Option<String>,
}

async fn run(
    State(api): State<Api>,
    Path(id): Path<u64>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&api, &headers, Role::Viewer)?;
    let run = lock(&api)?.upkeep_run(id)?;
    let run = run.ok_or_else(|| refuse(StatusCode::NOT_FOUND, &format!("no upkeep run {id}")))?;
    Ok(Json(json!(run)))
}

async fn upkeep_now(
    State(api): State<Api>,
    headers: HeaderMap,
    body: Option<Json<VaultBody>>,
) -> Result<Json<Value>, ApiError> {
    let who = authorize(&api, &headers, Role::Admin)?;
    let keeper = keeper(&api)?.clone();
    let mut out = vec![];
    for vault in chosen(&keeper, body.and_then(|b| b.0.vault))? {
        let now = api.clock.now();
        lock(&api)?.audit(&who, "upkeep", &format!("vault {vault}"), now)?;
        // Its own task: a client that hangs up does not cut the run half way.
        let task = {
            let (api, keeper, vault, who) =
                (api.clone(), keeper.clone(), vault.clone(), who.clone());
            tokio::spawn(async move { run_upkeep(&api, &keeper, &vault, now, &who, false).await })
        };
        let (id, outcome) = task
            .await
            .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, &format!("upkeep: {e}")))??;
        let run = lock(&api)?.upkeep_run(id)?;
        let ok = outcome.is_ok_and(|r| r.errors.is_empty());
        out.push(json!({ "vault": vault, "ok": ok, "run": run }));
    }
    Ok(Json(json!({ "upkeep": out })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RescanBody {
    vault: Option<String>,
    #[serde(default)]
    force: bool,
}

async fn rescan(
    State(api): State<Api>,
    headers: HeaderMap,
    body: Option<Json<RescanBody>>,
) -> Result<Json<Value>, ApiError> {
    let who = authorize(&api, &headers, Role::Admin)?;
    let keeper = keeper(&api)?.clone();
    let body = body.map(|b| b.0).unwrap_or_default();
    let mut out = vec![];
    for vault in chosen(&keeper, body.vault.clone())? {
        // No upkeep or deletion meanwhile; points agents report meanwhile are kept, since
        // only the points known before the scan may be removed.
        let vault_lock = api.vault_locks.of(&vault);
        let _held = vault_lock.lock().await;
        let known = lock(&api)?.points_of_vault(&vault)?;
        let found = keeper.0.scan(&vault).await.map_err(|e| {
            refuse(StatusCode::BAD_GATEWAY, &format!("rescanning vault {vault}: {e}"))
        })?;
        let now = api.clock.now();
        let mut catalogue = lock(&api)?;
        let summary = catalogue.rescan(&vault, &known, &found, now, body.force)?;
        catalogue.audit(
            &who,
            "rescan",
            &format!(
                "vault {vault}: {} found, {} added, {} updated, {} removed",
                summary.found, summary.added, summary.updated, summary.removed
            ),
            now,
        )?;
        out.push(json!(summary));
    }
    Ok(Json(json!({ "rescan": out })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StopBody {
    #[serde(default)]
    delete_data: bool,
}

async fn stop(
    State(api): State<Api>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Option<Json<StopBody>>,
) -> Result<Json<Value>, ApiError> {
    let delete_data = body.is_some_and(|b| b.0.delete_data);
    let who = authorize(&api, &headers, if delete_data { Role::Admin } else { Role::Operator })?;
    // Without a keeper, deleting data is refused before anything changes.
    let keeper = if delete_data { Some(keeper(&api)?.clone()) } else { None };
    let vault = {
        let now = api.clock.now();
        let mut catalogue = lock(&api)?;
        let vault = catalogue.stop_protection(&name, now)?;
        let action = if delete_data { "stop-protection-delete-data" } else { "stop-protection" };
        catalogue.audit(&who, action, &format!("VM {name}"), now)?;
        vault
    };
    let Some(keeper) = keeper else {
        return Ok(Json(json!({ "vm": name, "protected": false, "deleted": [] })));
    };
    if !keeper.0.vaults().contains(&vault) {
        return Err(refuse(
            StatusCode::CONFLICT,
            &format!(
                "VM {name}'s vault {vault} is not in the coordinator's vaults file; its \
                 protection is stopped and its data kept"
            ),
        ));
    }
    let vault_lock = api.vault_locks.of(&vault);
    let _held = vault_lock.lock().await;
    let now = api.clock.now();
    let deleted = keeper.0.delete_vm(&vault, &name, now).await.map_err(|e| {
        refuse(
            StatusCode::BAD_GATEWAY,
            &format!(
                "VM {name}'s protection is stopped, but deleting its data failed: {e}; run the \
                 same command again (points already deleted stay so)"
            ),
        )
    })?;
    let mut catalogue = lock(&api)?;
    catalogue.mark_deleted(&name, &deleted, now)?;
    catalogue.audit(
        &who,
        "delete-data",
        &format!("VM {name}: {} point(s) soft-deleted in vault {vault}", deleted.len()),
        now,
    )?;
    Ok(Json(json!({ "vm": name, "protected": false, "deleted": deleted })))
}
