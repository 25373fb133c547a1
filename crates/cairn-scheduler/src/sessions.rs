//! Sessions: what a login from the local user file opens. A session's token is random, shown
//! once and kept as its SHA-256, like every token; it lasts [`SESSION_HOURS`] or until logout,
//! and holds the lower of the user's role at login and in the file now (a user taken out of
//! the file, or revoked, has none). Five failed logins for one name in a row make that name
//! wait half a minute, and two passwords are checked at a time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use jiff::Timestamp;
use rusqlite::{OptionalExtension, params};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{Api, ApiError, bearer, lock, refuse};
use crate::catalogue::{parse_ts, ts};
use crate::{Catalogue, Error, Role, SESSION_HOURS};

/// Failed logins in a row before a name waits.
const MAX_FAILURES: u32 = 5;
/// How long it waits.
const LOCKOUT: Duration = Duration::from_secs(30);

impl Catalogue {
    /// Opens a session for `name` with `role`: its token (returned once) and its end. Ended
    /// sessions are dropped meanwhile.
    pub fn open_session(
        &mut self,
        name: &str,
        role: Role,
        now: Timestamp,
    ) -> Result<(String, Timestamp), Error> {
        let what = format!("opening a session for {name}");
        let token = crate::auth::new_token();
        let until = now + jiff::SignedDuration::from_hours(SESSION_HOURS);
        self.conn
            .execute("DELETE FROM sessions WHERE expires_at <= ?1", [ts(now)])
            .map_err(Error::sql(what.clone()))?;
        self.conn
            .execute(
                "INSERT INTO sessions (token_hash, name, role, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![crate::auth::hash(&token), name, role.as_str(), ts(now), ts(until)],
            )
            .map_err(Error::sql(what))?;
        Ok((token, until))
    }

    /// The user of an open session's token, with their role at login.
    pub fn session_of(&self, token: &str, now: Timestamp) -> Result<Option<(String, Role)>, Error> {
        let row: Option<(String, String, i64)> = self
            .conn
            .query_row(
                "SELECT name, role, expires_at FROM sessions WHERE token_hash = ?1",
                [crate::auth::hash(token)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(Error::sql("checking a session"))?;
        Ok(row.and_then(|(name, role, until)| {
            let open = parse_ts(until).is_ok_and(|u| u > now);
            open.then(|| role.parse().ok().map(|role| (name, role))).flatten()
        }))
    }

    /// Ends the session of `token`; false if there was none.
    pub fn close_session(&mut self, token: &str) -> Result<bool, Error> {
        self.conn
            .execute("DELETE FROM sessions WHERE token_hash = ?1", [crate::auth::hash(token)])
            .map(|n| n > 0)
            .map_err(Error::sql("ending a session"))
    }
}

/// Password checks at once: each costs an Argon2 hash (memory and a core), so more wait
/// their turn or are told to come back.
const CHECKS_AT_ONCE: usize = 2;

/// Logins in progress and failed ones per name (how many in a row, and when the last was).
pub struct Failures {
    failures: Mutex<HashMap<String, (u32, Instant)>>,
    checks: tokio::sync::Semaphore,
}

impl Default for Failures {
    fn default() -> Failures {
        Failures { failures: Mutex::default(), checks: tokio::sync::Semaphore::new(CHECKS_AT_ONCE) }
    }
}

impl Failures {
    /// Whether `name` must wait before trying again.
    fn waiting(&self, name: &str) -> bool {
        let map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        map.get(name).is_some_and(|(n, last)| *n >= MAX_FAILURES && last.elapsed() < LOCKOUT)
    }

    fn failed(&self, name: &str) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        // Names made up by the thousand do not grow the map without end.
        if map.len() > 10_000 {
            map.retain(|_, (_, last)| last.elapsed() < LOCKOUT);
        }
        let entry = map.entry(name.to_owned()).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= LOCKOUT {
            entry.0 = 0;
        }
        entry.0 += 1;
        entry.1 = Instant::now();
    }

    fn succeeded(&self, name: &str) {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoginBody {
    name: String,
    password: String,
}

/// `POST /api/v1/login` `{name, password}`: a session's token for a user of the users file.
pub(crate) async fn login(
    State(api): State<Api>,
    Json(body): Json<LoginBody>,
) -> Result<Json<Value>, ApiError> {
    let Some(users) = api.settings.users.clone() else {
        return Err(refuse(
            StatusCode::CONFLICT,
            "this coordinator has no users file (serve --users FILE): use a token",
        ));
    };
    if body.name.len() > 64 || body.password.len() > 1024 {
        return Err(refuse(StatusCode::BAD_REQUEST, "a name is at most 64 bytes, a password 1024"));
    }
    let Ok(_check) = api.login_failures.checks.try_acquire() else {
        return Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "other logins are being checked: try again",
        ));
    };
    if api.login_failures.waiting(&body.name) {
        return Err(refuse(
            StatusCode::TOO_MANY_REQUESTS,
            &format!("too many failed logins for {}: wait half a minute", body.name),
        ));
    }
    // Counted as failed until it succeeds: logins at once cannot pass the count together.
    api.login_failures.failed(&body.name);
    let (name, password) = (body.name.clone(), body.password);
    let checked = tokio::task::spawn_blocking(move || {
        users.reload().map(|file| file.check(&name, &password))
    })
    .await
    .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()))?;
    let role = match checked {
        Ok(role) => role,
        Err(e) => {
            // The detail (which may quote the file) is for the coordinator's log only.
            tracing::error!("login: {e}");
            return Err(refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the coordinator cannot read its users file: see its log",
            ));
        }
    };
    let Some(role) = role else {
        tracing::warn!(user = %body.name, "failed login");
        return Err(refuse(StatusCode::UNAUTHORIZED, "unknown user or wrong password"));
    };
    api.login_failures.succeeded(&body.name);
    let now = api.clock.now();
    let mut catalogue = lock(&api)?;
    let (token, until) = catalogue.open_session(&body.name, role, now)?;
    catalogue.audit(&body.name, "login", &format!("as {}, until {until}", role.as_str()), now)?;
    Ok(Json(
        json!({ "name": body.name, "role": role.as_str(), "token": token, "expires_at": until }),
    ))
}

/// `POST /api/v1/logout`: ends the caller's session.
pub(crate) async fn logout(
    State(api): State<Api>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let token = bearer(&headers)?;
    let now = api.clock.now();
    let mut catalogue = lock(&api)?;
    let who = catalogue.session_of(token, now)?.map(|(name, _)| name);
    if !catalogue.close_session(token)? {
        return Err(refuse(StatusCode::NOT_FOUND, "no session has this token"));
    }
    if let Some(who) = who {
        catalogue.audit(&who, "logout", "", now)?;
    }
    Ok(Json(json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::at;

    #[test]
    fn a_session_lasts_until_its_end_or_logout() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Catalogue::open(&dir.path().join("c.db")).unwrap();
        let now = at("2026-06-01T00:00:00Z");
        let (token, until) = c.open_session("alice", Role::Operator, now).unwrap();
        assert_eq!(until, at("2026-06-01T12:00:00Z"));
        assert_eq!(c.session_of(&token, now).unwrap(), Some(("alice".into(), Role::Operator)));
        assert_eq!(c.session_of(&token, until).unwrap(), None, "ended");
        assert_eq!(c.session_of("cairn_00", now).unwrap(), None);
        assert_eq!(c.user_of(&token).unwrap(), None, "a session is not a user token");
        assert!(c.close_session(&token).unwrap());
        assert_eq!(c.session_of(&token, now).unwrap(), None);
        assert!(!c.close_session(&token).unwrap());
    }

    #[test]
    fn five_failures_in_a_row_make_a_name_wait() {
        let f = Failures::default();
        for _ in 0..MAX_FAILURES {
            assert!(!f.waiting("bob"));
            assert!(f.checks.try_acquire().is_ok());
            f.failed("bob");
        }
        assert!(f.waiting("bob"));
        assert!(!f.waiting("alice"));
        f.succeeded("bob");
        assert!(!f.waiting("bob"));
    }
}
