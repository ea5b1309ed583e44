//! The service info page at `/`: what a client needs to connect (endpoint base URLs, how to
//! authenticate, providers and how many keys work, model families and default quotas, the
//! rate limit, uptime), as HTML for people and JSON for programs. Never shows a key.

use std::str::FromStr;

use axum::http::{header, HeaderMap};
use serde::Serialize;
use serde_json::{json, Value};

use crate::app::AppState;
use crate::config::GatekeeperMode;

/// One endpoint family and how to use it.
#[derive(Serialize)]
pub struct Endpoint {
    pub name: &'static str,
    pub url: String,
    pub usage: &'static str,
}

/// One provider: how many keys are configured and how many currently work.
#[derive(Serialize)]
pub struct ProviderInfo {
    pub name: &'static str,
    pub keys: usize,
    pub working: usize,
}

/// The public base URL of this proxy as the client sees it: the `Host` header, and the
/// scheme from `X-Forwarded-Proto` when a trusted reverse proxy is in front.
pub fn base_url(state: &AppState, headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b))
        })
        .unwrap_or("localhost");
    let proto = if state.config.cli.trusted_proxies > 0 {
        headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(str::trim)
            .filter(|p| matches!(*p, "http" | "https"))
            .unwrap_or("http")
    } else {
        "http"
    };
    format!("{proto}://{host}")
}

/// How a client authenticates in the configured mode.
pub fn auth_description(mode: GatekeeperMode) -> &'static str {
    match mode {
        GatekeeperMode::None => "Open: no key is needed.",
        GatekeeperMode::ProxyKey => {
            "Shared password: send the proxy key as 'Authorization: Bearer <key>' (or 'x-api-key: <key>' for Anthropic clients)."
        }
        GatekeeperMode::UserToken => {
            "Personal token: send your user token as 'Authorization: Bearer <token>' (or 'x-api-key: <token>' for Anthropic clients)."
        }
    }
}

fn mode_name(mode: GatekeeperMode) -> &'static str {
    match mode {
        GatekeeperMode::None => "none",
        GatekeeperMode::ProxyKey => "proxy_key",
        GatekeeperMode::UserToken => "user_token",
    }
}

/// Providers with their key counts. Until the forwarder reports key health, every configured
/// key counts as working.
pub fn providers(state: &AppState) -> Vec<ProviderInfo> {
    vec![
        ProviderInfo {
            name: "openai",
            keys: state.config.openai_keys.len(),
            working: state.config.openai_keys.len(),
        },
        ProviderInfo {
            name: "anthropic",
            keys: state.config.anthropic_keys.len(),
            working: state.config.anthropic_keys.len(),
        },
    ]
}

/// Describes `QUOTA_REFRESH_PERIOD` and, when it is a schedule, when it next fires.
pub fn refresh_description(period: &str) -> (String, Option<i64>) {
    let period = period.trim();
    let (what, pattern) = match period.to_ascii_lowercase().as_str() {
        "" => {
            return (
                "never: quotas are only reset by the administrator".to_string(),
                None,
            )
        }
        "hourly" => ("every hour".to_string(), "0 * * * *".to_string()),
        "daily" => ("every day at midnight UTC".to_string(), "0 0 * * *".to_string()),
        _ => (format!("on the schedule '{period}' (UTC)"), period.to_string()),
    };
    let next = croner::Cron::from_str(&pattern)
        .ok()
        .and_then(|c| c.find_next_occurrence(&chrono::Utc::now(), false).ok())
        .map(|t| t.timestamp_millis());
    match next {
        Some(ms) => (
            format!("{what}; next at {}", super::templates::format_ms(ms)),
            Some(ms),
        ),
        None => (what, None),
    }
}

/// The whole page as one JSON value (the HTML page renders the same data).
pub fn service_info(state: &AppState, headers: &HeaderMap) -> Value {
    let base = base_url(state, headers);
    let route = &state.config.proxy_endpoint_route;
    let endpoints = vec![
        Endpoint {
            name: "OpenAI-compatible",
            url: format!("{base}/v1"),
            usage: "base URL for OpenAI SDKs (POST /chat/completions, /completions, /embeddings; GET /models)",
        },
        Endpoint {
            name: "OpenAI-compatible (alias)",
            url: format!("{base}{route}/openai/v1"),
            usage: "the same, under the compatibility prefix",
        },
        Endpoint {
            name: "Anthropic",
            url: base.clone(),
            usage: "base URL for Anthropic SDKs (POST /v1/messages)",
        },
        Endpoint {
            name: "Anthropic (alias)",
            url: format!("{base}{route}/anthropic"),
            usage: "the same, under the compatibility prefix",
        },
    ];
    let families: Vec<Value> = state
        .config
        .token_quotas
        .iter()
        .map(|(family, quota)| json!({ "family": family, "quota": quota }))
        .collect();
    let uptime = state.started_at.elapsed().as_secs();
    let (refresh, next) = refresh_description(&state.config.cli.quota_refresh_period);
    json!({
        "uptime": uptime,
        "uptimeHuman": super::templates::human_duration(uptime),
        "gatekeeper": mode_name(state.config.mode()),
        "auth": auth_description(state.config.mode()),
        "endpoints": endpoints,
        "providers": providers(state),
        "modelFamilies": families,
        "rateLimit": { "promptsPerMinute": state.config.cli.text_model_rate_limit },
        "quotaRefresh": {
            "period": state.config.cli.quota_refresh_period,
            "description": refresh,
            "nextAt": next,
        },
    })
}

/// True when the client prefers JSON (`Accept: application/json` before any HTML type).
pub fn wants_json(headers: &HeaderMap) -> bool {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let json = accept.find("application/json");
    let html = accept.find("text/html");
    match (json, html) {
        (Some(j), Some(h)) => j < h,
        (Some(_), None) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_periods() {
        assert!(refresh_description("").0.starts_with("never"));
        let (d, next) = refresh_description("hourly");
        assert!(d.starts_with("every hour; next at"));
        assert!(next.is_some());
        assert!(refresh_description("0 0 * * 1").1.is_some());
    }

    #[test]
    fn accept_negotiation() {
        let mut h = HeaderMap::new();
        assert!(!wants_json(&h));
        h.insert(header::ACCEPT, "application/json".parse().expect("hv"));
        assert!(wants_json(&h));
        h.insert(
            header::ACCEPT,
            "text/html,application/xhtml+xml,application/json;q=0.9"
                .parse()
                .expect("hv"),
        );
        assert!(!wants_json(&h));
    }
}
