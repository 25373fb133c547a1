//! The agents' side of the API. An agent has no inbound port: it calls the coordinator.
//!
//! | call | body | answer |
//! |---|---|---|
//! | `POST /api/v1/agents/enroll` | `{"token": ENROLLMENT}` | `{"name", "token"}`: the agent's own token |
//! | `POST /api/v1/agents/poll` | `{"running": [ids], "wait_seconds": n}` | [`Orders`], as soon as there are jobs or after the wait |
//! | `POST /api/v1/agents/jobs/ID` | [`Report`] | `{}`; 409 for a second point, 410 for a job that ended |
//! | `POST /api/v1/agents/offline` | [`OfflineRun`] | `{}` |
//!
//! Every call but `enroll` carries `Authorization: Bearer AGENT_TOKEN`: unknown or revoked is
//! 401 with nothing done; a job or VM of another host is 403.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::agents::{OfflineRun, Orders, Report, ReportOutcome};
use crate::api::{Api, ApiError, lock, refuse};

/// The most jobs an agent may say it runs (its `max-jobs` is at most 64).
const MAX_RUNNING: usize = 1024;
/// The most bytes of an agent's progress report kept.
const MAX_PROGRESS: usize = 64 << 10;
/// The most characters of a failure's reason kept.
const MAX_REASON: usize = 2000;

fn bad(message: String) -> ApiError {
    refuse(StatusCode::BAD_REQUEST, &message)
}

/// A point as an agent reports it, checked: a real point id, sane strings.
fn check_point(p: &cairn_protocol::PointReport) -> Result<(), ApiError> {
    p.id.parse::<cairn_format::PointId>().map_err(|e| bad(format!("point {:?}: {e}", p.id)))?;
    if !["none", "crash", "file_system", "application"].contains(&p.consistency.as_str()) {
        return Err(bad(format!(
            "consistency {:?}: none, crash, file_system or application",
            p.consistency
        )));
    }
    Ok(())
}

/// A capture time ahead of the coordinator's clock (past a few minutes of drift) is recorded
/// as the clock's time: it would read as fresh and silence RPO alerts (the vault's manifest
/// keeps what the host said).
fn not_ahead(p: &mut cairn_protocol::PointReport, now: jiff::Timestamp) {
    let drift = jiff::SignedDuration::from_mins(5);
    if p.captured_at > now.checked_add(drift).unwrap_or(now) {
        tracing::warn!(point = %p.id, captured = %p.captured_at, %now, "a point dated ahead of the coordinator's clock: recorded at the clock's time");
        p.captured_at = now;
    }
}

/// A report as kept: bounded, its point checked.
fn checked_report(mut r: Report, now: jiff::Timestamp) -> Result<Report, ApiError> {
    if let Some(p) = &mut r.point {
        check_point(p)?;
        not_ahead(p, now);
    }
    if r.phase.as_ref().is_some_and(|p| p.len() > 32) {
        return Err(bad("a phase is at most 32 characters".into()));
    }
    if let Some(reason) = &mut r.reason
        && reason.chars().count() > MAX_REASON
    {
        *reason = reason.chars().take(MAX_REASON).collect::<String>() + "...";
    }
    if r.progress.as_ref().is_some_and(|p| p.to_string().len() > MAX_PROGRESS) {
        r.progress = None;
    }
    if let Some(restored) = &r.restored
        && (restored.disks.len() > 256
            || restored.disks.iter().any(|d| d.path.len() > 4096 || d.disk.len() > 64))
    {
        return Err(bad("a restore report names at most 256 disks, by paths of 4096 bytes".into()));
    }
    Ok(r)
}

/// The longest an agent's poll is held open.
pub const MAX_POLL_WAIT: Duration = Duration::from_secs(60);

pub(crate) fn router() -> Router<Api> {
    Router::new()
        .route("/api/v1/agents/enroll", post(enroll))
        .route("/api/v1/agents/poll", post(poll))
        .route("/api/v1/agents/jobs/{id}", post(report))
        .route("/api/v1/agents/offline", post(offline))
}

/// The agent behind the request's token.
fn agent(api: &Api, headers: &HeaderMap) -> Result<String, ApiError> {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            refuse(StatusCode::UNAUTHORIZED, "give Authorization: Bearer AGENT_TOKEN")
        })?;
    let now = api.clock.now();
    lock(api)?.agent_of(token.trim(), now)?.ok_or_else(|| {
        refuse(
            StatusCode::UNAUTHORIZED,
            "unknown or revoked agent token: enroll the agent again with a new enrollment token",
        )
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollBody {
    token: String,
}

async fn enroll(
    State(api): State<Api>,
    Json(body): Json<EnrollBody>,
) -> Result<Json<Value>, ApiError> {
    let now = api.clock.now();
    let mut catalogue = lock(&api)?;
    let Some((name, token)) = catalogue.enroll(body.token.trim(), now)? else {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "unknown, used or expired enrollment token: ask an admin for a new one \
             (cairn-coordinator enroll HOST)",
        ));
    };
    catalogue.audit(&name, "enroll", &format!("agent {name}"), now)?;
    Ok(Json(json!(cairn_protocol::Enrolled { name, token })))
}

async fn poll(
    State(api): State<Api>,
    headers: HeaderMap,
    Json(body): Json<cairn_protocol::Poll>,
) -> Result<Json<Orders>, ApiError> {
    let host = agent(&api, &headers)?;
    if body.running.len() > MAX_RUNNING {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            &format!("{} running jobs listed: at most {MAX_RUNNING}", body.running.len()),
        ));
    }
    let wait = Duration::from_secs(body.wait_seconds).min(MAX_POLL_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // Registered before looking, so that a dispatch between the look and the wait wakes it.
        let woken = api.wakeup.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        // Checked again on every round: a token revoked while its poll waits takes nothing.
        let host_now = agent(&api, &headers)?;
        if host_now != host {
            return Err(refuse(StatusCode::UNAUTHORIZED, "the agent's token changed hands"));
        }
        let now = api.clock.now();
        let orders = lock(&api)?.claim(&host, &body.running, &body.kinds, now)?;
        if !orders.jobs.is_empty() || !orders.cancel.is_empty() {
            return Ok(Json(orders));
        }
        if tokio::time::timeout_at(deadline, woken).await.is_err() {
            return Ok(Json(orders));
        }
    }
}

async fn report(
    State(api): State<Api>,
    Path(id): Path<u64>,
    headers: HeaderMap,
    Json(body): Json<Report>,
) -> Result<Json<Value>, ApiError> {
    let host = agent(&api, &headers)?;
    let body = checked_report(body, api.clock.now())?;
    let now = api.clock.now();
    let outcome = lock(&api)?.report(&host, id, &body, now)?;
    answer(outcome, &format!("job {id}"))
}

async fn offline(
    State(api): State<Api>,
    headers: HeaderMap,
    Json(body): Json<OfflineRun>,
) -> Result<Json<Value>, ApiError> {
    let host = agent(&api, &headers)?;
    let mut body = body;
    check_point(&body.point)?;
    let now = api.clock.now();
    not_ahead(&mut body.point, now);
    let mut catalogue = lock(&api)?;
    let outcome = catalogue.record_offline(&host, &body, now)?;
    if outcome == ReportOutcome::Recorded {
        let details = format!("VM {} point {} for {}", body.vm, body.point.id, body.scheduled_at);
        catalogue.audit(&host, "offline-backup", &details, now)?;
    }
    answer(outcome, &format!("VM {}", body.vm))
}

fn answer(outcome: ReportOutcome, what: &str) -> Result<Json<Value>, ApiError> {
    match outcome {
        ReportOutcome::Recorded => Ok(Json(json!({}))),
        ReportOutcome::NotYours => {
            Err(refuse(StatusCode::FORBIDDEN, &format!("{what} is not on this agent's host")))
        }
        ReportOutcome::Ended => {
            Err(refuse(StatusCode::GONE, &format!("{what} has ended: stop it")))
        }
        ReportOutcome::Duplicate(point) => {
            Err(refuse(StatusCode::CONFLICT, &format!("{what} already committed point {point}")))
        }
        ReportOutcome::Invalid(why) => Err(refuse(StatusCode::BAD_REQUEST, &why)),
    }
}
