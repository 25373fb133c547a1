//! Alerts to a webhook: each alert is POSTed once as JSON
//! (`{"id", "kind", "vm", "message", "raised_at"}`); one that fails to go out is sent again on
//! the next pass, so a receiver may see an alert twice but never miss one.

use std::time::Duration;

use serde_json::json;

use crate::api::Shared;

/// Sends the alerts not sent yet; stops at the first failure (the rest go next time).
pub(crate) async fn send(shared: &Shared, url: &str) {
    let unsent = match shared.catalogue.lock() {
        Ok(c) => c.unsent_alerts(),
        Err(_) => return,
    };
    let unsent = match unsent {
        Ok(list) => list,
        Err(e) => {
            tracing::error!("webhook: {e}");
            return;
        }
    };
    if unsent.is_empty() {
        return;
    }
    let client = match reqwest::Client::builder().timeout(Duration::from_secs(10)).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("webhook: cannot make an HTTP client: {e}");
            return;
        }
    };
    for (id, kind, vm, message, raised_at) in unsent {
        let body =
            json!({ "id": id, "kind": kind, "vm": vm, "message": message, "raised_at": raised_at });
        match client.post(url).json(&body).send().await {
            Ok(r) if r.status().is_success() => {
                let now = shared.clock.now();
                if let Ok(mut c) = shared.catalogue.lock()
                    && let Err(e) = c.alert_sent(id, now)
                {
                    tracing::error!("webhook: {e}");
                }
            }
            Ok(r) => {
                tracing::warn!(status = %r.status(), "webhook {url} refused alert {id}: retried next pass");
                return;
            }
            Err(e) => {
                tracing::warn!("webhook {url} unreachable ({e}): alert {id} retried next pass");
                return;
            }
        }
    }
}
