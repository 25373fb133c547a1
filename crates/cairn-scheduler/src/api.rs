//! The HTTP/JSON API, versioned under `/api/v1/`. Every call but `health` and `login` carries
//! `Authorization: Bearer TOKEN` (a user's token, or a session's from a login); a missing,
//! unknown, revoked or ended token is 401 with nothing done, a role too low for the call is
//! 403. Changes and restores go to the audit log with who made them.
//!
//! | call | role |
//! |---|---|
//! | `GET /api/v1/health`, `GET /` and `/dashboard` (the dashboard page, which holds no data) | none |
//! | `POST /api/v1/login` (`{"name", "password"}` of the users file: a session's token for 12 h), `POST /api/v1/logout` | none; the session's |
//! | `GET /api/v1/policies`, `/vms`, `/jobs[?vm=NAME]`, `/points[?vm=NAME]`, `/alerts`, `/audit`, `/agents`, `/metrics` | viewer |
//! | `PUT /api/v1/vms/NAME` (protect, change, stop protection) | operator |
//! | `POST /api/v1/vms/NAME/backup` (back up now, `{"retain_until": TIME}`) | operator |
//! | `POST /api/v1/vms/NAME/restore` (`{"point"?, "disk"?, "to"}`: a restore job for its host's agent) | operator |
//! | `PUT /api/v1/policies/NAME` (TOML body) | admin |
//! | `GET /api/v1/users`, `POST /api/v1/users` (`{"name", "role"}`), `POST /api/v1/users/NAME/revoke` | admin |
//! | `POST /api/v1/enrollments` (`{"host"}`: a one-time token for that host's agent) | admin |
//! | `DELETE /api/v1/agents/NAME` (revoke an agent's token) | admin |
//!
//! Agents' calls (`/api/v1/agents/enroll`, `/poll`, `/jobs/ID`, `/offline`) are in
//! [`crate::agent_api`]; agents' tokens open nothing here, users' tokens nothing there.

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::catalogue::Role;
use crate::service::{Clock, Settings};
use crate::{Catalogue, Error, VmRecord};

/// What every handler shares.
pub struct Shared {
    /// The catalogue (one connection: SQLite serves one writer).
    pub catalogue: Mutex<Catalogue>,
    /// The coordinator's clock (injected in tests).
    pub clock: Arc<dyn Clock>,
    /// Woken when the dispatcher starts jobs, so that agents' long polls answer at once.
    pub wakeup: tokio::sync::Notify,
    /// How the service runs.
    pub settings: Settings,
    /// One lock per vault for prune, gc and deletions.
    pub vault_locks: crate::vault_api::VaultLocks,
    /// Failed logins per name.
    pub login_failures: crate::sessions::Failures,
}

/// An error as the API answers it: a status and `{"error": ..., "field": ...}`.
pub struct ApiError(pub(crate) StatusCode, pub(crate) Value);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        let status = match &e {
            Error::Policy(_) => StatusCode::BAD_REQUEST,
            Error::Unknown { .. } => StatusCode::NOT_FOUND,
            Error::Refused(_) => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let field = match &e {
            Error::Policy(cairn_policy::Error::Field { field, .. }) => Some(field.clone()),
            _ => None,
        };
        ApiError(status, json!({ "error": e.to_string(), "field": field }))
    }
}

pub(crate) fn refuse(status: StatusCode, message: &str) -> ApiError {
    ApiError(status, json!({ "error": message }))
}

pub(crate) type Api = Arc<Shared>;

/// The router of the API.
pub fn router(shared: Api) -> Router {
    Router::new()
        .route("/api/v1/health", get(health))
        .route("/api/v1/login", axum::routing::post(crate::sessions::login))
        .route("/api/v1/logout", axum::routing::post(crate::sessions::logout))
        .route("/api/v1/policies", get(policies))
        .route("/api/v1/policies/{name}", axum::routing::put(put_policy))
        .route("/api/v1/vms", get(vms))
        .route("/api/v1/vms/{name}", axum::routing::put(put_vm))
        .route("/api/v1/jobs", get(jobs))
        .route("/api/v1/alerts", get(alerts))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/points", get(points))
        .route("/api/v1/vms/{name}/backup", axum::routing::post(back_up_now))
        .route("/api/v1/vms/{name}/restore", axum::routing::post(restore))
        .route("/api/v1/users", get(users).post(add_user))
        .route("/api/v1/users/{name}/revoke", axum::routing::post(revoke_user))
        .route("/api/v1/enrollments", axum::routing::post(new_enrollment))
        .route("/api/v1/agents", get(agents))
        .route("/api/v1/agents/{name}", axum::routing::delete(revoke_agent))
        .route("/metrics", get(crate::metrics::metrics))
        .route("/", get(dashboard))
        .route("/dashboard", get(dashboard))
        .merge(crate::agent_api::router())
        .merge(crate::vault_api::router())
        .with_state(shared)
}

/// The user behind the request's bearer token, if their role reaches `needed`.
pub(crate) fn authorize(
    api: &Shared,
    headers: &HeaderMap,
    needed: Role,
) -> Result<String, ApiError> {
    let token = bearer(headers)?;
    let (user, session) = {
        let catalogue = lock(api)?;
        match catalogue.user_of(token)? {
            Some(user) => (Some(user), false),
            None => (catalogue.session_of(token, api.clock.now())?, true),
        }
    };
    // A session holds no more than its user's role in the users file now.
    let user = match user {
        Some((name, role)) if session => {
            let now = api.settings.users.as_ref().and_then(|f| f.reload().ok()?.role_of(&name));
            now.map(|current| (name, role.min(current)))
        }
        other => other,
    };
    let (name, role) =
        user.ok_or_else(|| refuse(StatusCode::UNAUTHORIZED, "unknown or revoked token"))?;
    if role < needed {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            &format!("user {name} is {}; this needs {}", role.as_str(), needed.as_str()),
        ));
    }
    Ok(name)
}

/// The request's bearer token.
pub(crate) fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| refuse(StatusCode::UNAUTHORIZED, "give Authorization: Bearer TOKEN"))
}

pub(crate) fn lock(api: &Shared) -> Result<std::sync::MutexGuard<'_, Catalogue>, ApiError> {
    // A panic while the lock was held rolled its transaction back (rusqlite's transactions
    // roll back when dropped): the catalogue is consistent, and the service goes on.
    Ok(api.catalogue.lock().unwrap_or_else(|p| p.into_inner()))
}

/// The dashboard: one static page that reads the API with the user's token (it holds no data
/// itself, so it needs none to be served). Its script builds the page from text nodes only.
async fn dashboard() -> Response {
    let headers = [
        (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (
            axum::http::header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; frame-ancestors 'none'",
        ),
        (axum::http::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    (headers, include_str!("dashboard.html")).into_response()
}

async fn health(State(api): State<Api>) -> Result<Json<Value>, ApiError> {
    let version = lock(&api)?.schema_version()?;
    Ok(Json(json!({ "status": "ok", "schema": version })))
}

async fn policies(State(api): State<Api>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    authorize(&api, &headers, Role::Viewer)?;
    let list = lock(&api)?.policies()?;
    let list: Vec<Value> = list.into_iter().map(|(n, s)| json!({ "name": n, "spec": s })).collect();
    Ok(Json(json!({ "policies": list })))
}

async fn put_policy(
    State(api): State<Api>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Result<Json<Value>, ApiError> {
    let who = authorize(&api, &headers, Role::Admin)?;
    let now = api.clock.now();
    let mut catalogue = lock(&api)?;
    let policy = cairn_policy::Policy::parse(&body).map_err(Error::from)?;
    if policy.spec.name != name {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            json!({ "error": format!("the file names policy {:?}, the URL {name:?}", policy.spec.name), "field": "name" }),
        ));
    }
    catalogue.put_policy(&body, now)?;
    catalogue.audit(&who, "put-policy", &name, now)?;
    Ok(Json(json!({ "name": name })))
}

async fn vms(State(api): State<Api>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    authorize(&api, &headers, Role::Viewer)?;
    let now = api.clock.now();
    let catalogue = lock(&api)?;
    let standings = catalogue.standings(now)?;
    let list: Vec<Value> = catalogue
        .vms()?
        .into_iter()
        .map(|vm| {
            let standing = standings.iter().find(|s| s.vm == vm.name);
            let mut v = json!(vm);
            if let (Some(s), Some(o)) = (standing, v.as_object_mut()) {
                o.insert("last_point".into(), json!(s.last_point));
                o.insert("last_point_at".into(), json!(s.last_point_at));
                o.insert("rpo_seconds".into(), json!(s.rpo_seconds));
                o.insert("points".into(), json!(s.points));
                o.insert("last_job_state".into(), json!(s.last_job_state));
                o.insert("known_good".into(), json!(s.known_good));
                o.insert(
                    "last_drill".into(),
                    json!(s.last_drill.map(|(at, passed)| json!({ "at": at, "passed": passed }))),
                );
            }
            v
        })
        .collect();
    Ok(Json(json!({ "vms": list })))
}

/// A VM as a client protects it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmBody {
    host: String,
    datastore: String,
    vault: String,
    policy: Option<String>,
    #[serde(default = "yes")]
    protected: bool,
}

fn yes() -> bool {
    true
}

async fn put_vm(
    State(api): State<Api>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Json(body): Json<VmBody>,
) -> Result<Json<Value>, ApiError> {
    let who = authorize(&api, &headers, Role::Operator)?;
    if cairn_format_name_ok(&name).is_err() {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "a VM name is 1 to 64 letters, digits, '-', '_' or '.'",
        ));
    }
    let now = api.clock.now();
    let vm = VmRecord {
        name: name.clone(),
        host: body.host,
        datastore: body.datastore,
        vault: body.vault,
        policy: body.policy,
        protected: body.protected,
        planned_until: now,
    };
    let mut catalogue = lock(&api)?;
    catalogue.protect(&vm, now)?;
    let action = if vm.protected { "protect" } else { "stop-protection" };
    catalogue.audit(&who, action, &name, now)?;
    Ok(Json(json!({ "name": name, "protected": vm.protected })))
}

/// A name the vaults accept (`cairn_format::Name`: VMs, hosts, users alike).
fn cairn_format_name_ok(name: &str) -> Result<cairn_format::Name, cairn_format::Error> {
    name.parse()
}

async fn jobs(
    State(api): State<Api>,
    headers: HeaderMap,
    Query(q): Query<VmQuery>,
) -> Result<Json<Value>, ApiError> {
    authorize(&api, &headers, Role::Viewer)?;
    Ok(Json(json!({ "jobs": lock(&api)?.jobs(q.vm.as_deref())? })))
}

async fn alerts(State(api): State<Api>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    authorize(&api, &headers, Role::Viewer)?;
    let list: Vec<Value> = lock(&api)?
        .alerts()?
        .into_iter()
        .map(|(kind, vm, message)| json!({ "kind": kind, "vm": vm, "message": message }))
        .collect();
    Ok(Json(json!({ "alerts": list })))
}

async fn audit(State(api): State<Api>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    authorize(&api, &headers, Role::Viewer)?;
    let list: Vec<Value> = lock(&api)?
        .audit_log()?
        .into_iter()
        .map(|(at, who, action, details)| {
            json!({ "at": at, "who": who, "action": action, "details": details })
        })
        .collect();
    Ok(Json(json!({ "audit": list })))
}

#[derive(Deserialize)]
struct VmQuery {
    vm: Option<String>,
}

async fn points(
    State(api): State<Api>,
    headers: HeaderMap,
    Query(q): Query<VmQuery>,
) -> Result<Json<Value>, ApiError> {
    authorize(&api, &headers, Role::Viewer)?;
    Ok(Json(json!({ "points": lock(&api)?.points(q.vm.as_deref())? })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BackupBody {
    retain_until: Option<jiff::Timestamp>,
}

async fn back_up_now(
    State(api): State<Api>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Option<Json<BackupBody>>,
) -> Result<Json<Value>, ApiError> {
    let who = authorize(&api, &headers, Role::Operator)?;
    let body = body.map(|b| b.0).unwrap_or_default();
    let now = api.clock.now();
    let mut catalogue = lock(&api)?;
    let id = catalogue.back_up_now(&name, body.retain_until, now)?;
    catalogue.audit(&who, "back-up-now", &format!("VM {name}, job {id}"), now)?;
    Ok(Json(json!({ "job": id })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreBody {
    /// None: the newest point in a vault.
    point: Option<String>,
    disk: Option<String>,
    to: String,
}

async fn restore(
    State(api): State<Api>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Json(body): Json<RestoreBody>,
) -> Result<Json<Value>, ApiError> {
    let who = authorize(&api, &headers, Role::Operator)?;
    let now = api.clock.now();
    let mut catalogue = lock(&api)?;
    let (id, order) =
        catalogue.restore(&name, body.point.as_deref(), body.disk.as_deref(), &body.to, now)?;
    let disk = order.disk.as_deref().unwrap_or("every disk");
    let details =
        format!("VM {name}, point {}, {disk}, to folder {}, job {id}", order.point, order.to);
    catalogue.audit(&who, "restore", &details, now)?;
    Ok(Json(json!({ "job": id, "point": order.point, "disk": order.disk, "to": order.to })))
}

async fn users(State(api): State<Api>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    authorize(&api, &headers, Role::Admin)?;
    let list: Vec<Value> = lock(&api)?
        .users()?
        .into_iter()
        .map(|(name, role, revoked)| json!({ "name": name, "role": role, "revoked": revoked }))
        .collect();
    Ok(Json(json!({ "users": list })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserBody {
    name: String,
    role: String,
}

async fn add_user(
    State(api): State<Api>,
    headers: HeaderMap,
    Json(body): Json<UserBody>,
) -> Result<Json<Value>, ApiError> {
    let who = authorize(&api, &headers, Role::Admin)?;
    let role: Role = body.role.parse().map_err(|e: String| refuse(StatusCode::BAD_REQUEST, &e))?;
    if cairn_format_name_ok(&body.name).is_err() {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "a user name is 1 to 64 letters, digits, '-', '_' or '.'",
        ));
    }
    let now = api.clock.now();
    let mut catalogue = lock(&api)?;
    if catalogue.users()?.iter().any(|u| u.0 == body.name) {
        return Err(refuse(StatusCode::CONFLICT, &format!("user {} exists", body.name)));
    }
    let token = catalogue.add_user(&body.name, role, now)?;
    catalogue.audit(&who, "add-user", &format!("{} as {}", body.name, role.as_str()), now)?;
    Ok(Json(json!({ "name": body.name, "role": role.as_str(), "token": token })))
}

async fn revoke_user(
    State(api): State<Api>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = authorize(&api, &headers, Role::Admin)?;
    let now = api.clock.now();
    let mut catalogue = lock(&api)?;
    catalogue.revoke_user(&name)?;
    catalogue.audit(&who, "revoke-user", &name, now)?;
    Ok(Json(json!({ "name": name, "revoked": true })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollmentBody {
    host: String,
}

async fn new_enrollment(
    State(api): State<Api>,
    headers: HeaderMap,
    Json(body): Json<EnrollmentBody>,
) -> Result<Json<Value>, ApiError> {
    let who = authorize(&api, &headers, Role::Admin)?;
    if cairn_format_name_ok(&body.host).is_err() {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "a host name is 1 to 64 letters, digits, '-', '_' or '.'",
        ));
    }
    let now = api.clock.now();
    let mut catalogue = lock(&api)?;
    let token = catalogue.new_enrollment(&body.host, now)?;
    catalogue.audit(&who, "new-enrollment", &body.host, now)?;
    Ok(Json(json!({ "host": body.host, "token": token })))
}

async fn agents(State(api): State<Api>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    authorize(&api, &headers, Role::Viewer)?;
    Ok(Json(json!({ "agents": lock(&api)?.agents()? })))
}

async fn revoke_agent(
    State(api): State<Api>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let who = authorize(&api, &headers, Role::Admin)?;
    let now = api.clock.now();
    let mut catalogue = lock(&api)?;
    catalogue.revoke_agent(&name)?;
    catalogue.audit(&who, "revoke-agent", &name, now)?;
    Ok(Json(json!({ "name": name, "revoked": true })))
}
