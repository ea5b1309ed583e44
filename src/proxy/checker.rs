//! Key checkers: one background task per provider that probes each operator key in the
//! cheapest way its provider allows, at startup and then every period, and records the result
//! in the provider's [`KeyPool`] (working, trial, over quota, revoked, rate-limited, the
//! families it serves). Checks are spaced (`KEY_CHECK_INTERVAL_MS` between any two, so no
//! burst at startup), back off on network errors, never block requests (they only write the
//! pool's atomics), and stop on shutdown. `CHECK_KEYS=false` turns them off.
//!
//! Probes (after the original's `src/shared/key-management/*/checker.ts`):
//! - OpenAI: `GET /v1/models` (which families the key serves) and a chat completion with
//!   `max_tokens: -1`, which a live key answers with a free 400 while a revoked or spent key
//!   gets 401/429; `x-ratelimit-limit-requests` ≤ 250 marks a trial key; `GET
//!   /v1/organizations` lists its organisations, and each non-default one becomes an entry of
//!   its own (`KeyPool::add_organization`) whose requests carry `OpenAI-Organization`.
//! - Anthropic: a one-token Messages call; the tier comes from `anthropic-ratelimit-*`.
//! - Google AI and Mistral AI: their model lists (free; only a valid key gets one).
//! - Azure: the deployment's chat completion with `max_tokens: -1` (a free 400 when alive).
//! - AWS (`clouds`): STS caller identity, Bedrock's invocation-logging setting, and a free
//!   invalid invoke per model (which families the credential may use). One checker serves
//!   both AWS pools (Claude and Mistral hold the same credentials): each result is recorded in
//!   both, and a recheck asked of either runs it.
//! - GCP (`clouds`): the service account's token grant, then a one-token call per family.
//!
//! To add a provider: write `probe_<provider>` returning a [`CheckResult`], add it to
//! [`probe`], [`has_probe`] and [`checked_providers`], and give it a period in [`Schedule`].

mod clouds;

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderValue, Method};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http1::Fields;
use crate::providers::families::family_for;
use crate::providers::key_errors::{judge, KeyVerdict};
use crate::providers::{KeyUse, Provider, UpstreamRequest};
use crate::proxy::keys::{rest_duration, CheckResult, KeyPool, KeyStatus};
use crate::proxy::{ProviderUpstream, Upstreams};

/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// The first retry after a network error; doubled on each further error, up to the period.
const FIRST_RETRY: Duration = Duration::from_secs(60);
/// The most of a probe's answer that is read.
const PROBE_BODY_LIMIT: usize = 4 * 1024 * 1024;
/// OpenAI's request limit at or below which a key is a trial key (the original's threshold).
const OPENAI_TRIAL_RPM: u64 = 250;
/// The model of the Anthropic probe: the cheapest current model.
const ANTHROPIC_PROBE_MODEL: &str = "claude-3-5-haiku-latest";
/// The model of the OpenAI liveness probe (the request is invalid anyway: `max_tokens: -1`).
const OPENAI_PROBE_MODEL: &str = "gpt-4o-mini";

/// When and how often one provider's keys are checked, and the settings of its probes.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Between two checks of the same key; `None`: only at startup (and on a recheck).
    pub period: Option<Duration>,
    /// Between any two checks of this provider.
    pub spacing: Duration,
    /// What the cloud probes need from the configuration.
    pub clouds: Arc<clouds::Settings>,
}

impl Schedule {
    /// The schedule of `provider` from the configuration.
    pub fn from_config(config: &Config, provider: Provider) -> Schedule {
        let secs = match provider {
            Provider::OpenAi => config.cli.openai_key_check_period_secs,
            Provider::Anthropic => config.cli.anthropic_key_check_period_secs,
            Provider::GoogleAi => config.cli.google_ai_key_check_period_secs,
            Provider::MistralAi => config.cli.mistral_ai_key_check_period_secs,
            Provider::Azure => config.cli.azure_key_check_period_secs,
            Provider::Aws | Provider::AwsMistral => config.cli.aws_key_check_period_secs,
            Provider::Gcp => config.cli.gcp_key_check_period_secs,
        };
        Schedule {
            period: (secs > 0).then(|| Duration::from_secs(secs)),
            spacing: Duration::from_millis(config.cli.key_check_interval_ms),
            clouds: Arc::new(clouds::Settings::from_config(config)),
        }
    }
}

/// Whether a provider has a probe (its keys are checked).
pub fn has_probe(provider: Provider) -> bool {
    match provider {
        Provider::OpenAi
        | Provider::Anthropic
        | Provider::GoogleAi
        | Provider::MistralAi
        | Provider::Azure
        | Provider::Aws
        | Provider::Gcp => true,
        // The same credentials as `Aws`: its checker probes them once and records the result
        // in both pools.
        Provider::AwsMistral => false,
    }
}

/// The providers whose keys are checked, with their schedules (empty when `CHECK_KEYS=false`).
pub fn checked_providers(config: &Config, upstreams: &Upstreams) -> Vec<(Provider, Schedule)> {
    if !config.cli.check_keys {
        return Vec::new();
    }
    Provider::ALL
        .into_iter()
        .filter(|p| has_probe(*p) && !upstreams.provider(*p).keys.is_empty())
        .map(|p| (p, Schedule::from_config(config, p)))
        .collect()
}

/// Why a probe said nothing about the key: the network failed or the upstream had an error of
/// its own (5xx). The key is checked again later, with back-off.
#[derive(Debug)]
pub struct Transient(pub String);

/// Runs the checker of one provider until `cancel`: every key first (spaced), then each key
/// again when its period is over; everything at once (still spaced) on a recheck request.
pub async fn run(
    upstreams: std::sync::Arc<Upstreams>,
    provider: Provider,
    schedule: Schedule,
    cancel: CancellationToken,
) {
    let upstream = upstreams.provider(provider);
    let pool = &upstream.keys;
    // AWS: the Mistral pool holds the same credentials; it takes the same results, and a
    // recheck asked of it is this checker's to run.
    let linked =
        (provider == Provider::Aws).then(|| &upstreams.provider(Provider::AwsMistral).keys);
    let n = pool.len();
    tracing::info!(
        var = pool.var(),
        keys = n,
        period_secs = schedule.period.map(|p| p.as_secs()),
        "key checker started"
    );
    let now = Instant::now();
    // When each key is due next (`None`: not scheduled), and how many checks failed in a row.
    let mut due: Vec<Option<Instant>> = vec![Some(now); n];
    let mut failures: Vec<u32> = vec![0; n];
    let mut last_check: Option<Instant> = None;
    loop {
        // A check may have added entries (an OpenAI key's other organisations): check them
        // too, from now on.
        while due.len() < pool.len() {
            due.push(Some(Instant::now()));
            failures.push(0);
        }
        let next = due
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.map(|d| (i, d)))
            .min_by_key(|(_, d)| *d);
        let wait_until = next.map(|(_, d)| match last_check {
            Some(l) => d.max(l + schedule.spacing),
            None => d,
        });
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = recheck_requested(pool, linked) => {
                tracing::info!(var = pool.var(), "rechecking every key");
                let now = Instant::now();
                due.iter_mut().for_each(|d| *d = Some(now));
                failures.iter_mut().for_each(|f| *f = 0);
                continue;
            }
            _ = sleep_until_opt(wait_until) => {}
        }
        let Some((index, _)) = next else { continue };
        let outcome = tokio::select! {
            _ = cancel.cancelled() => break,
            r = tokio::time::timeout(probe_timeout(provider), probe(&upstreams, upstream, index, &schedule.clouds)) => r,
        };
        let now = Instant::now();
        last_check = Some(now);
        let outcome = outcome.unwrap_or_else(|_| Err(Transient("the probe timed out".into())));
        match outcome {
            Ok(result) => {
                failures[index] = 0;
                // A rate-limited key is looked at again when its rest is over (at most a
                // period later); others after a period.
                let again = match (result.rest, schedule.period) {
                    (Some(r), Some(p)) => Some(r.min(p)),
                    (Some(r), None) => Some(r),
                    (None, p) => p,
                };
                due[index] = again.map(|d| now + d);
                if let Some((_, fp)) = pool.secret(index) {
                    tracing::info!(
                        var = pool.var(),
                        key = fp,
                        state = result.status.as_str(),
                        families = result.families.as_ref().map(|f| f.join(",")),
                        detail = result.detail.as_deref(),
                        "checked key"
                    );
                }
                if let Some(other) = linked {
                    other.apply_check(index, result.clone());
                }
                pool.apply_check(index, result);
            }
            Err(Transient(why)) => {
                failures[index] = failures[index].saturating_add(1);
                let backoff = FIRST_RETRY
                    .saturating_mul(1u32 << failures[index].saturating_sub(1).min(10))
                    .min(schedule.period.unwrap_or(Duration::from_secs(3600)));
                due[index] = Some(now + backoff);
                if let Some((_, fp)) = pool.secret(index) {
                    tracing::warn!(
                        var = pool.var(),
                        key = fp,
                        error = %why,
                        retry_secs = backoff.as_secs(),
                        "could not check key; trying again later"
                    );
                }
            }
        }
    }
    tracing::debug!(var = pool.var(), "key checker stopped");
}

/// Resolves when a recheck was asked of `pool` or of the pool `linked` to it.
async fn recheck_requested(pool: &KeyPool, linked: Option<&KeyPool>) {
    match linked {
        Some(other) => {
            tokio::select! {
                _ = pool.recheck_requested() => {}
                _ = other.recheck_requested() => {}
            }
        }
        None => pool.recheck_requested().await,
    }
}

/// How long one check may take: the clouds' checks are several calls in a row.
fn probe_timeout(provider: Provider) -> Duration {
    match provider {
        Provider::Aws | Provider::AwsMistral | Provider::Gcp => PROBE_TIMEOUT * 4,
        _ => PROBE_TIMEOUT,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Probes key `index` of `upstream` with its provider's probe.
pub async fn probe(
    upstreams: &Upstreams,
    upstream: &ProviderUpstream,
    index: usize,
    settings: &clouds::Settings,
) -> Result<CheckResult, Transient> {
    match upstream.provider {
        Provider::OpenAi => probe_openai(upstreams, upstream, index).await,
        Provider::Anthropic => probe_anthropic(upstreams, upstream, index).await,
        Provider::GoogleAi => probe_model_list(upstreams, upstream, index, "/v1beta/models").await,
        Provider::MistralAi => probe_model_list(upstreams, upstream, index, "/v1/models").await,
        Provider::Azure => probe_azure(upstreams, upstream, index).await,
        Provider::Aws | Provider::AwsMistral => {
            clouds::probe_aws(upstreams, upstream, index, settings).await
        }
        Provider::Gcp => clouds::probe_gcp(upstreams, upstream, index).await,
    }
}

/// An answer to a probe.
pub(super) struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

/// Sends one probe request with key `index`, authorized by the provider as a proxied request
/// would be, through the proxy's own upstream client.
async fn call(
    upstreams: &Upstreams,
    upstream: &ProviderUpstream,
    index: usize,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<Answer, Transient> {
    let pool: &KeyPool = &upstream.keys;
    let credential = pool
        .credential(index)
        .ok_or_else(|| Transient("no such key".into()))?;
    let mut headers = Fields::with_capacity(6);
    headers.insert(header::USER_AGENT, upstreams.user_agent.clone());
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    let body = match body {
        Some(v) => {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Bytes::from(v.to_string())
        }
        None => Bytes::new(),
    };
    upstream.provider.default_headers(&mut headers);
    let mut out = UpstreamRequest {
        method,
        url: upstream.url(path, None, index),
        headers,
        body,
    };
    upstream
        .provider
        .authorize(upstream.endpoint(), &mut out, &KeyUse { index, credential })
        .map_err(|e| Transient(e.0))?;
    if let Some(org) = pool.organization(index) {
        out.headers
            .insert(crate::providers::openai::ORGANIZATION_HEADER, org.clone());
    }
    let answer = send(upstreams, out).await?;
    if answer.status >= 500 {
        return Err(Transient(format!(
            "the upstream answered {}",
            answer.status
        )));
    }
    Ok(answer)
}

/// Sends a ready (authorized or signed) probe request through the proxy's upstream client
/// and reads its answer (bounded), whatever its status.
async fn send(upstreams: &Upstreams, out: UpstreamRequest) -> Result<Answer, Transient> {
    let uri = axum::http::Uri::try_from(out.url.as_str())
        .map_err(|e| Transient(format!("bad probe URL: {e}")))?;
    let req = crate::proxy::pool::Outgoing {
        method: out.method,
        uri,
        headers: out.headers,
        body: out.body,
    };
    let resp = upstreams
        .pool()
        .send(req)
        .await
        .map_err(|e| Transient(format!("network error: {e}")))?;
    let crate::proxy::pool::Answer {
        status,
        headers,
        body,
    } = resp;
    let body = Limited::new(body, PROBE_BODY_LIMIT)
        .collect()
        .await
        .map_err(|e| Transient(format!("reading the answer failed: {e}")))?
        .to_bytes();
    Ok(Answer {
        status: status.as_u16(),
        // The probes' readers ask a map (rare: a key check).
        headers: headers.into_header_map(),
        body,
    })
}

/// What an error answer of a probe says, when it says the key is bad or rate-limited.
fn verdict(provider: Provider, a: &Answer) -> Option<CheckResult> {
    match judge(provider, a.status, &a.body)? {
        KeyVerdict::Revoked => Some(CheckResult::status(KeyStatus::Revoked)),
        KeyVerdict::OverQuota(_) => Some(CheckResult::status(KeyStatus::OverQuota)),
        KeyVerdict::RateLimited => Some(CheckResult {
            rest: Some(rest_duration(&a.headers)),
            ..CheckResult::status(KeyStatus::Working)
        }),
    }
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<ModelEntry>,
}

#[derive(Deserialize)]
struct ModelEntry {
    id: String,
}

/// `GET /v1/organizations`: the organisations a key belongs to.
#[derive(Deserialize)]
struct OrganizationList {
    data: Vec<Organization>,
}

#[derive(Deserialize)]
struct Organization {
    id: String,
    #[serde(default)]
    is_default: bool,
}

/// OpenAI: the organisations of key `index` (the original's probe). The key itself serves
/// its default organisation; every other one gets an entry of its own in the pool, whose
/// requests carry `OpenAI-Organization`. Returns the default organisation's id. Keys that
/// may not list organisations (project and service-account keys) are left as they are.
async fn openai_organizations(
    upstreams: &Upstreams,
    upstream: &ProviderUpstream,
    index: usize,
) -> Option<String> {
    let pool = &upstream.keys;
    if pool.is_organization_entry(index) {
        return None;
    }
    let a = call(
        upstreams,
        upstream,
        index,
        Method::GET,
        "/v1/organizations",
        None,
    )
    .await
    .ok()?;
    if a.status != 200 {
        return None;
    }
    let list: OrganizationList = serde_json::from_slice(&a.body).ok()?;
    let default = list
        .data
        .iter()
        .find(|o| o.is_default)
        .or(list.data.first())
        .map(|o| o.id.clone());
    if list.data.len() > 1 {
        for org in list.data.iter().filter(|o| Some(&o.id) != default.as_ref()) {
            pool.add_organization(index, &org.id);
        }
    }
    default
}

/// OpenAI: the model list (families), then the free invalid request (alive, quota, trial).
async fn probe_openai(
    upstreams: &Upstreams,
    upstream: &ProviderUpstream,
    index: usize,
) -> Result<CheckResult, Transient> {
    let p = Provider::OpenAi;
    let models = call(upstreams, upstream, index, Method::GET, "/v1/models", None).await?;
    if let Some(bad) = verdict(p, &models) {
        if bad.status != KeyStatus::Working {
            return Ok(bad);
        }
    }
    let families = (models.status == 200)
        .then(|| serde_json::from_slice::<ModelList>(&models.body).ok())
        .flatten()
        .map(|list| {
            let mut f: Vec<String> = list
                .data
                .iter()
                .filter_map(|m| family_for(&m.id))
                .map(str::to_string)
                .collect();
            f.sort();
            f.dedup();
            f
        })
        .filter(|f| !f.is_empty());
    let live = call(
        upstreams,
        upstream,
        index,
        Method::POST,
        "/v1/chat/completions",
        Some(serde_json::json!({
            "model": OPENAI_PROBE_MODEL,
            "max_tokens": -1,
            "messages": [{"role": "user", "content": ""}],
        })),
    )
    .await?;
    let trial = header_u64(&live.headers, "x-ratelimit-limit-requests")
        .is_some_and(|rpm| rpm <= OPENAI_TRIAL_RPM);
    let working = if trial {
        KeyStatus::Trial
    } else {
        KeyStatus::Working
    };
    let mut result = match verdict(p, &live) {
        Some(r) if r.status != KeyStatus::Working => return Ok(r),
        Some(limited) => CheckResult {
            status: working,
            ..limited
        },
        // 400 is the expected answer (the request is invalid on purpose); anything else that
        // is not a verdict on the key means it was accepted too.
        None => CheckResult::status(working),
    };
    result.families = families.map(|mut f| {
        if trial {
            // Trial keys cannot generate images (the original drops dall-e for them).
            f.retain(|x| x != "dall-e");
        }
        f
    });
    let org = openai_organizations(upstreams, upstream, index).await;
    result.detail = match (trial, org) {
        (true, Some(o)) => Some(format!("trial key (low request limit); organisation {o}")),
        (true, None) => Some("trial key (low request limit)".into()),
        (false, Some(o)) => Some(format!("organisation {o}")),
        (false, None) => None,
    };
    Ok(result)
}

/// Google AI and Mistral: the model list, which answers only a valid key (free).
async fn probe_model_list(
    upstreams: &Upstreams,
    upstream: &ProviderUpstream,
    index: usize,
    path: &str,
) -> Result<CheckResult, Transient> {
    let a = call(upstreams, upstream, index, Method::GET, path, None).await?;
    if let Some(r) = verdict(upstream.provider, &a) {
        return Ok(r);
    }
    match a.status {
        200 => Ok(CheckResult::status(KeyStatus::Working)),
        // Google answers an invalid key with 400 `API_KEY_INVALID`.
        400 if String::from_utf8_lossy(&a.body).contains("API_KEY_INVALID") => {
            Ok(CheckResult::status(KeyStatus::Revoked))
        }
        s => Err(Transient(format!(
            "unexpected answer {s} to the model list"
        ))),
    }
}

/// Azure: the deployment's chat completion with `max_tokens: -1` (a free 400 when the
/// deployment and its key work; 401 for a bad key, 404 for a deployment that does not exist).
async fn probe_azure(
    upstreams: &Upstreams,
    upstream: &ProviderUpstream,
    index: usize,
) -> Result<CheckResult, Transient> {
    let a = call(
        upstreams,
        upstream,
        index,
        Method::POST,
        "/v1/chat/completions",
        Some(serde_json::json!({
            "max_tokens": -1,
            "messages": [{"role": "user", "content": ""}],
        })),
    )
    .await?;
    if let Some(r) = verdict(Provider::Azure, &a) {
        return Ok(r);
    }
    Ok(match a.status {
        404 => CheckResult {
            detail: Some("the deployment does not exist".into()),
            ..CheckResult::status(KeyStatus::Revoked)
        },
        _ => CheckResult::status(KeyStatus::Working),
    })
}

/// Anthropic's tier from the token limit of `anthropic-ratelimit-*` (the original's scale).
pub fn anthropic_tier(headers: &HeaderMap) -> &'static str {
    let limit = header_u64(headers, "anthropic-ratelimit-tokens-limit")
        .or_else(|| header_u64(headers, "anthropic-ratelimit-input-tokens-limit"));
    match limit {
        None => "unknown",
        Some(l) if l <= 25_000 => "free",
        Some(l) if l <= 50_000 => "build_1",
        Some(l) if l <= 100_000 => "build_2",
        Some(l) if l <= 200_000 => "build_3",
        Some(l) if l <= 400_000 => "build_4",
        Some(_) => "scale",
    }
}

/// Anthropic: a one-token Messages call.
async fn probe_anthropic(
    upstreams: &Upstreams,
    upstream: &ProviderUpstream,
    index: usize,
) -> Result<CheckResult, Transient> {
    let a = call(
        upstreams,
        upstream,
        index,
        Method::POST,
        "/v1/messages",
        Some(serde_json::json!({
            "model": ANTHROPIC_PROBE_MODEL,
            "max_tokens": 1,
            "messages": [{"role": "user", "content": "hi"}],
        })),
    )
    .await?;
    let tier = anthropic_tier(&a.headers);
    let mut result = verdict(Provider::Anthropic, &a)
        // Any other answer (200, or a 400/404 about the request) means the key was accepted.
        .unwrap_or_else(|| CheckResult::status(KeyStatus::Working));
    if result.status == KeyStatus::Working {
        result.detail = Some(format!("tier: {tier}"));
        result.status = if tier == "free" {
            KeyStatus::Trial
        } else {
            KeyStatus::Working
        };
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anthropic_tiers() {
        let mut h = HeaderMap::new();
        assert_eq!(anthropic_tier(&h), "unknown");
        h.insert(
            "anthropic-ratelimit-tokens-limit",
            HeaderValue::from_static("80000"),
        );
        assert_eq!(anthropic_tier(&h), "build_2");
        h.insert(
            "anthropic-ratelimit-tokens-limit",
            HeaderValue::from_static("20000"),
        );
        assert_eq!(anthropic_tier(&h), "free");
        h.insert(
            "anthropic-ratelimit-tokens-limit",
            HeaderValue::from_static("9000000"),
        );
        assert_eq!(anthropic_tier(&h), "scale");
    }
}
