//! `GET /metrics`: the catalogue in the OpenMetrics text format, for Prometheus and its peers
//! (a scraper carries a viewer's bearer token).

use std::fmt::Write;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::api::{Api, ApiError, authorize, lock};
use crate::catalogue::Role;

/// The content type OpenMetrics asks for.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub(crate) async fn metrics(
    State(api): State<Api>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&api, &headers, Role::Viewer)?;
    let now = api.clock.now();
    let text = {
        let catalogue = lock(&api)?;
        render(&catalogue, now)?
    };
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response())
}

/// One VM's figures over its points.
#[derive(Default)]
struct VmTotals {
    points: u64,
    scanned: u64,
    changed: u64,
    stored: u64,
    last_duration_ms: u64,
    last_stored: u64,
}

/// A label value, escaped as the format says.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The metrics text.
pub fn render(catalogue: &crate::Catalogue, now: jiff::Timestamp) -> Result<String, crate::Error> {
    let mut out = String::new();
    let counts = catalogue.job_counts()?;
    let _ = writeln!(out, "# TYPE cairn_jobs gauge");
    let _ = writeln!(out, "# HELP cairn_jobs Jobs in the catalogue by kind and state.");
    for (kind, state, n) in &counts.by_state {
        let _ =
            writeln!(out, "cairn_jobs{{kind=\"{}\",state=\"{}\"}} {n}", label(kind), label(state));
    }
    let points = catalogue.points(None)?;
    let mut per_vm: std::collections::BTreeMap<&str, VmTotals> = Default::default();
    for p in &points {
        let e = per_vm.entry(&p.vm).or_default();
        e.points += 1;
        e.scanned = e.scanned.saturating_add(p.bytes_scanned);
        e.changed = e.changed.saturating_add(p.bytes_changed);
        e.stored = e.stored.saturating_add(p.bytes_stored);
        // Points come oldest first: the last one seen is the VM's latest.
        e.last_duration_ms = p.duration_ms;
        e.last_stored = p.bytes_stored;
    }
    type Value = fn(&VmTotals) -> f64;
    let series: [(&str, &str, Value); 6] = [
        ("cairn_points", "Recovery points in the catalogue.", |e| e.points as f64),
        (
            "cairn_points_scanned_bytes",
            "Bytes read and hashed by the backups of the points kept.",
            |e| e.scanned as f64,
        ),
        ("cairn_points_changed_bytes", "Bytes of changed blocks in the points kept.", |e| {
            e.changed as f64
        }),
        ("cairn_points_stored_bytes", "Bytes the points kept wrote to vaults.", |e| {
            e.stored as f64
        }),
        ("cairn_last_backup_duration_seconds", "Duration of the VM's last backup.", |e| {
            e.last_duration_ms as f64 / 1000.0
        }),
        ("cairn_last_backup_stored_bytes", "Bytes the VM's last backup stored.", |e| {
            e.last_stored as f64
        }),
    ];
    for (name, help, value) in series {
        let _ = writeln!(out, "# TYPE {name} gauge");
        let _ = writeln!(out, "# HELP {name} {help}");
        for (vm, e) in &per_vm {
            let _ = writeln!(out, "{name}{{vm=\"{}\"}} {}", label(vm), value(e));
        }
    }
    let _ = writeln!(out, "# TYPE cairn_rpo_seconds gauge");
    let _ = writeln!(out, "# HELP cairn_rpo_seconds Age of the VM's newest recovery point.");
    for s in catalogue.standings(now)? {
        if let Some(rpo) = s.rpo_seconds {
            let _ = writeln!(out, "cairn_rpo_seconds{{vm=\"{}\"}} {rpo}", label(&s.vm));
        }
    }
    let _ = writeln!(out, "# TYPE cairn_open_alerts gauge");
    let _ = writeln!(out, "# HELP cairn_open_alerts Alerts not cleared.");
    let _ = writeln!(out, "cairn_open_alerts {}", catalogue.alerts()?.len());
    out.push_str("# EOF\n");
    Ok(out)
}
