//! The service info page at `/`: what a client needs to connect (endpoint base URLs, how to
//! authenticate, providers and how many keys work, model families and default quotas, the
//! rate limit, uptime), as HTML for people and JSON for programs. Never shows a key.

use axum::http::{header, HeaderMap};
use serde::Serialize;
use serde_json::{json, Value};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::app::AppState;
use crate::auth::secret_eq;
use crate::config::{Config, ConfigError, GatekeeperMode};
use crate::providers::Provider;

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
    let proto = if state.config.trusted_proxies() > 0 {
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

/// The cookie that says a browser entered `SERVICE_INFO_PASSWORD`.
pub const UNLOCK_COOKIE: &str = "info_unlock";

/// `SERVICE_INFO_PASSWORD`: the password and the cookie a browser gets once it entered it.
/// The cookie is an HMAC (keyed by `SIGNING_KEY`, or a key made at start) over the password,
/// so that changing the password locks every browser out again.
pub struct InfoLock {
    password: String,
    cookie_value: String,
    secure: bool,
}

impl InfoLock {
    /// `None` when no password is set (the page is public).
    pub fn from_config(config: &Config) -> Result<Option<InfoLock>, ConfigError> {
        let Some(password) = config
            .cli
            .service_info_password
            .as_ref()
            .map(|p| p.expose().to_string())
            .filter(|p| !p.is_empty())
        else {
            return Ok(None);
        };
        let key: Vec<u8> = match config.cli.signing_key.as_ref() {
            Some(k) if !k.expose().is_empty() => k.expose().as_bytes().to_vec(),
            _ => rand::random::<[u8; 32]>().to_vec(),
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(&key)
            .map_err(|e| ConfigError(format!("SIGNING_KEY cannot be used as a key: {e}")))?;
        mac.update(b"llm-gatekeeper service info unlocked\x1f");
        mac.update(password.as_bytes());
        Ok(Some(InfoLock {
            password,
            cookie_value: URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()),
            secure: !config.cli.use_insecure_cookies,
        }))
    }

    /// True when the request carries the unlock cookie.
    pub fn unlocked(&self, headers: &HeaderMap) -> bool {
        crate::auth::session::cookie(headers, UNLOCK_COOKIE)
            .is_some_and(|v| secret_eq(v, &self.cookie_value))
    }

    /// True when `presented` is the password (compared in constant time).
    pub fn check(&self, presented: &str) -> bool {
        secret_eq(presented, &self.password)
    }

    /// The `Set-Cookie` value that unlocks the page for a week.
    pub fn set_cookie(&self) -> String {
        let secure = if self.secure { "; Secure" } else { "" };
        format!(
            "{UNLOCK_COOKIE}={}; Path=/; Max-Age=604800; HttpOnly; SameSite=Lax{secure}",
            self.cookie_value
        )
    }
}

/// The name on the public pages: `SERVER_TITLE`, or the product's name.
pub fn server_title(state: &AppState) -> String {
    state
        .config
        .cli
        .server_title
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .unwrap_or("llm-gatekeeper")
        .to_string()
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

/// Providers with their key counts as the forwarder sees them right now (keys resting after a
/// 429 or rejected by the upstream do not count as working).
pub fn providers(state: &AppState) -> Vec<ProviderInfo> {
    [
        ("openai", Provider::OpenAi),
        ("anthropic", Provider::Anthropic),
        ("aws", Provider::Aws),
        ("gcp", Provider::Gcp),
        ("google-ai", Provider::GoogleAi),
        ("mistral-ai", Provider::MistralAi),
        ("azure", Provider::Azure),
    ]
    .into_iter()
    // The clouds are listed only when configured (the original shows them the same way).
    .filter(|(_, p)| {
        !matches!(p, Provider::Aws | Provider::Gcp) || !state.upstreams.provider(*p).keys.is_empty()
    })
    .map(|(name, p)| {
        let c = state.upstreams.key_counts(p);
        ProviderInfo {
            name,
            keys: c.total,
            working: c.working,
        }
    })
    .collect()
}

/// Describes `QUOTA_REFRESH_PERIOD` and when quotas next refresh (epoch milliseconds).
pub fn refresh_description(state: &AppState) -> (String, Option<i64>) {
    let period = state.config.cli.quota_refresh_period.trim();
    let what = match period.to_ascii_lowercase().as_str() {
        "" => {
            return (
                "never: only the administrator resets quotas".to_string(),
                None,
            )
        }
        "hourly" => "every hour".to_string(),
        "daily" => "every day at midnight (server time)".to_string(),
        _ => format!("on the schedule '{period}' (server time)"),
    };
    match state.quotas.next_refresh().map(|t| t.timestamp_millis()) {
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
        Endpoint {
            name: "OpenAI images",
            url: format!("{base}{route}/openai-image/v1"),
            usage: "base URL for OpenAI SDKs (POST /images/generations; also at /v1/images/generations), counted in dall-e by price",
        },
        Endpoint {
            name: "Azure OpenAI",
            url: format!("{base}{route}/azure/openai/v1"),
            usage: "base URL for OpenAI SDKs (POST /chat/completions, /images/generations; GET /models); the operator's deployments decide the model",
        },
        Endpoint {
            name: "Claude for OpenAI clients",
            url: format!("{base}{route}/anthropic/v1"),
            usage: "base URL for OpenAI SDKs (POST /chat/completions), translated to Claude",
        },
        Endpoint {
            name: "Google AI (Gemini)",
            url: format!("{base}{route}/google-ai"),
            usage: "base URL for Google's google-genai SDKs (v1beta and v1: models/{model}:generateContent, :streamGenerateContent, models); key in x-goog-api-key",
        },
        Endpoint {
            name: "Gemini for OpenAI clients",
            url: format!("{base}{route}/google-ai/v1"),
            usage: "base URL for OpenAI SDKs (POST /chat/completions, GET /models), translated to Gemini",
        },
        Endpoint {
            name: "Mistral AI",
            url: format!("{base}{route}/mistral-ai"),
            usage: "server_url for the mistralai SDK (POST /v1/chat/completions; GET /v1/models)",
        },
    ];
    let mut endpoints = endpoints;
    if !state.upstreams.provider(Provider::Aws).keys.is_empty() {
        endpoints.push(Endpoint {
            name: "AWS Bedrock Claude",
            url: format!("{base}{route}/aws/claude"),
            usage: "base URL for Anthropic SDKs; add /v1 for OpenAI SDKs",
        });
        endpoints.push(Endpoint {
            name: "AWS Bedrock Mistral",
            url: format!("{base}{route}/aws/mistral/v1"),
            usage: "base URL for OpenAI SDKs",
        });
    }
    if !state.upstreams.provider(Provider::Gcp).keys.is_empty() {
        endpoints.push(Endpoint {
            name: "GCP Vertex AI Claude",
            url: format!("{base}{route}/gcp/claude"),
            usage: "base URL for Anthropic SDKs; add /v1 for OpenAI SDKs",
        });
    }
    // Every known family, with its default quota (0: unlimited), plus any family that only
    // appears in a `TOKEN_QUOTA_*` variable.
    let quotas = &state.config.token_quotas;
    let mut names: Vec<&str> = crate::providers::families::FAMILIES.to_vec();
    names.extend(
        quotas
            .keys()
            .map(String::as_str)
            .filter(|f| !crate::providers::families::FAMILIES.contains(f)),
    );
    let show_costs = state.config.cli.show_token_costs;
    // With SHOW_TOKEN_COSTS, what every user used so far, per family (one pass over the users).
    let mut usage: std::collections::BTreeMap<String, u64> = Default::default();
    if show_costs {
        state.users.for_each(|u| {
            for (f, n) in &u.token_counts {
                let e = usage.entry(f.to_string()).or_insert(0);
                *e = e.saturating_add(*n);
            }
        });
    }
    let families: Vec<Value> = names
        .into_iter()
        .map(|f| {
            let mut v = json!({
                "family": f,
                "quota": quotas.get(f).copied().unwrap_or(0),
                "allowed": state.policy.family_allowed(f),
            });
            if show_costs {
                let used = usage.get(f).copied().unwrap_or(0);
                let cost = crate::quota::prices::cost_usd(f, used);
                v["usdPerMillion"] = json!(crate::quota::prices::per_million_usd(f));
                v["usage"] = json!(used);
                v["usageUsd"] = json!((cost * 100.0).round() / 100.0);
                v["usageCost"] = json!(crate::quota::prices::format_usd(cost));
            }
            v
        })
        .collect();
    let uptime = state.started_at.elapsed().as_secs();
    let (refresh, next) = refresh_description(state);
    let per_family = family_keys(state, show_costs.then_some(&usage));
    let mut page = json!({
        "title": server_title(state),
        "showTokenCosts": show_costs,
        "captcha": state.pow.is_some().then_some("/user/captcha"),
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
    });
    if let Some(obj) = page.as_object_mut() {
        for (family, v) in per_family {
            obj.entry(family).or_insert(v);
        }
    }
    page
}

/// The provider whose keys serve a family, by the family's name (the original's naming).
fn family_provider(family: &str) -> Option<Provider> {
    if family.starts_with("azure-") {
        Some(Provider::Azure)
    } else if family.starts_with("aws-mistral") {
        Some(Provider::AwsMistral)
    } else if family.starts_with("aws-") {
        Some(Provider::Aws)
    } else if family.starts_with("gcp-") {
        Some(Provider::Gcp)
    } else if family.starts_with("claude") {
        Some(Provider::Anthropic)
    } else if family.starts_with("gemini") {
        Some(Provider::GoogleAi)
    } else if family.starts_with("mistral") {
        Some(Provider::MistralAi)
    } else {
        Some(Provider::OpenAi)
    }
}

/// Per model family served by at least one configured key, the original's fields under the
/// family's name: `activeKeys`, `revokedKeys`, `overQuotaKeys`, `trialKeys`,
/// `proomptersInQueue`, `estimatedQueueTime`, and `usage` when usage is shown. Keys appear only
/// as counts.
fn family_keys(
    state: &AppState,
    usage: Option<&std::collections::BTreeMap<String, u64>>,
) -> Vec<(String, Value)> {
    let mut names: Vec<String> = crate::providers::families::FAMILIES
        .iter()
        .map(|f| f.to_string())
        .collect();
    if !state.upstreams.provider(Provider::Azure).keys.is_empty() {
        names.extend(
            crate::providers::families::FAMILIES
                .iter()
                .filter(|f| family_provider(f) == Some(Provider::OpenAi))
                .map(|f| format!("azure-{f}")),
        );
    }
    names
        .into_iter()
        .filter_map(|f| {
            let pool = &state.upstreams.provider(family_provider(&f)?).keys;
            if pool.is_empty() {
                return None;
            }
            let c = pool.counts_for(Some(&f));
            if c.total == 0 {
                return None;
            }
            let mut v = json!({
                "activeKeys": c.working + c.resting,
                "revokedKeys": c.invalid,
                "overQuotaKeys": c.over_quota,
                "trialKeys": c.trial,
                // The fair queue's numbers (proxy::queue): waiting now, and the moving
                // average of the wait in the original's format.
                "proomptersInQueue": state.upstreams.queue.queued(&f),
                "estimatedQueueTime": state.upstreams.queue.estimated_wait_text(&f),
            });
            // AWS keys that log prompts (the original's `privacy` line): users are told
            // whether their prompts could reach an invocation log.
            let provider = family_provider(&f);
            if matches!(provider, Some(Provider::Aws | Provider::AwsMistral)) {
                if state.config.cli.allow_aws_logging {
                    v["privacy"] = json!(
                        "AWS logging verification inactive (ALLOW_AWS_LOGGING=true). Prompts could be logged."
                    );
                } else if c.logging > 0 {
                    v["privacy"] = json!(format!(
                        "{} keys are potentially logged and can't be used. Set ALLOW_AWS_LOGGING=true to override.",
                        c.logging
                    ));
                }
            }
            if let Some(u) = usage {
                let used = u.get(&f).copied().unwrap_or(0);
                v["usage"] = json!(format!("{used} tokens"));
            }
            Some((f, v))
        })
        .collect()
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
