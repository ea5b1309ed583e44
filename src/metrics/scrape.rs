//! `GET /metrics`: the recorder's exposition plus the gauges computed at scrape time from this
//! server's state — upstream keys by provider and state, and the user store's flush lag and
//! pending changes — so that nothing on the request path keeps them up to date. Who may scrape
//! is decided by `auth` (`METRICS_KEY`, `ADMIN_WHITELIST`) before this runs.

use std::fmt::Write as _;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::{KEYS, PROVIDERS, STORE_FLUSH_LAG, STORE_PENDING};
use crate::app::AppState;
use crate::proxy::Upstreams;
use crate::users::persist::PersistStatus;

/// The content type of the Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Key states always listed (with 0 when no key is in them), in this order; a state not
/// listed here is added after them.
const KEY_STATES: &[&str] = &[
    "working",
    "unchecked",
    "trial",
    "rate_limited",
    "over_quota",
    "revoked",
    "logging",
];

/// The `/metrics` route when metrics are on; no route at all otherwise, so that `/metrics` is
/// then an unknown path like any other.
pub fn routes(enabled: bool) -> axum::Router<AppState> {
    let router = axum::Router::new();
    if enabled {
        router.route("/metrics", axum::routing::get(metrics))
    } else {
        router
    }
}

/// The `/metrics` handler (the route exists only when `METRICS_KEY` is set).
pub async fn metrics(State(state): State<AppState>) -> Response {
    let Some(handle) = state.metrics.as_ref() else {
        return axum::http::StatusCode::NOT_FOUND.into_response();
    };
    let mut out = handle.render();
    render_keys(&mut out, &state.upstreams);
    let status = state.persistence.status();
    let lag_from = status
        .last_flush_ok_ms
        .unwrap_or_else(|| started_ms(state.started_at));
    render_store(&mut out, &status, crate::users::now_ms(), lag_from);
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], out).into_response()
}

/// The Unix milliseconds of the server's start (the store was loaded then).
fn started_ms(started: std::time::Instant) -> i64 {
    let ago = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
    crate::users::now_ms().saturating_sub(ago)
}

/// Appends `gatekeeper_keys{provider,state}` for every provider that has keys. Written here
/// rather than through the facade: the values belong to this server's pools (a process may run
/// several servers, as tests do, and the global recorder is shared), and the labels are our
/// own constants, so no escaping is needed.
pub fn render_keys(out: &mut String, upstreams: &Upstreams) {
    let _ = writeln!(
        out,
        "# HELP {KEYS} Upstream keys by provider and state (computed at scrape time)."
    );
    let _ = writeln!(out, "# TYPE {KEYS} gauge");
    for (provider, label) in PROVIDERS {
        let pool = &upstreams.provider(provider).keys;
        if pool.is_empty() {
            continue;
        }
        let mut counts: Vec<(&'static str, usize)> = KEY_STATES.iter().map(|s| (*s, 0)).collect();
        for view in pool.views() {
            match counts.iter_mut().find(|(s, _)| *s == view.state) {
                Some((_, n)) => *n += 1,
                None => counts.push((view.state, 1)),
            }
        }
        for (state, n) in counts {
            let _ = writeln!(out, "{KEYS}{{provider=\"{label}\",state=\"{state}\"}} {n}");
        }
    }
}

/// Appends the store's flush lag (seconds since `lag_from_ms`, the moment up to which every
/// change is known stored) and its pending changes.
pub fn render_store(out: &mut String, status: &PersistStatus, now_ms: i64, lag_from_ms: i64) {
    let backend = status.backend;
    let lag = now_ms.saturating_sub(lag_from_ms).max(0) as f64 / 1000.0;
    let _ = writeln!(
        out,
        "# HELP {STORE_FLUSH_LAG} Seconds since the moment up to which every user change is known stored (the last successful flush began then)."
    );
    let _ = writeln!(out, "# TYPE {STORE_FLUSH_LAG} gauge");
    let _ = writeln!(out, "{STORE_FLUSH_LAG}{{backend=\"{backend}\"}} {lag}");
    let _ = writeln!(
        out,
        "# HELP {STORE_PENDING} User changes not yet written to the store (a batch being written included)."
    );
    let _ = writeln!(out, "# TYPE {STORE_PENDING} gauge");
    let _ = writeln!(
        out,
        "{STORE_PENDING}{{backend=\"{backend}\"}} {}",
        status.pending + status.in_flight
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_lines() {
        let status = PersistStatus {
            backend: "sqlite",
            pending: 3,
            in_flight: 2,
            ..PersistStatus::default()
        };
        let mut out = String::new();
        render_store(&mut out, &status, 12_500, 10_000);
        assert!(out.contains("gatekeeper_store_flush_lag_seconds{backend=\"sqlite\"} 2.5\n"));
        assert!(out.contains("gatekeeper_store_pending_changes{backend=\"sqlite\"} 5\n"));
        assert!(out.contains("# TYPE gatekeeper_store_flush_lag_seconds gauge\n"));
    }
}
