//! Prometheus metrics (issue 16): the one recorder behind the `metrics` facade, installed once
//! per process when `METRICS_KEY` is set, and the small recording functions the modules that
//! own a fact call (the forwarder: requests, latency, time to first byte; `quota`: tokens;
//! `auth` and the forwarder: refusals; `users::persist`: flush failures). [`scrape`] is the
//! `GET /metrics` handler; it adds the gauges computed when scraped (key states, store lag).
//!
//! Labels are only ever bounded sets written in this crate (`&'static str`): provider, model
//! family (from the family table; anything else is `other`), HTTP status code, token kind,
//! refusal reason. Never a token, key, user, model name or address. `docs/metrics.md` lists
//! every metric.
//!
//! Without `METRICS_KEY` no recorder is installed: the facade's macros do nothing and every
//! function here returns after one relaxed atomic load. With it, the request path pays a
//! thread-local lookup and an atomic add per counter (handles are cached per thread, so there is
//! no label `Vec`, no registry hash and no lock per request).
//!
//! Knows nothing of users, keys or HTTP requests beyond a response's status and body timing.

pub mod scrape;

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::StatusCode;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;
use crate::error::ProxyError;
use crate::http1::Reply;
use crate::providers::families::FAMILIES;
use crate::providers::Provider;

/// Proxied requests sent upstream, by `provider`, `family` and final `status` code.
pub const REQUESTS: &str = "gatekeeper_requests_total";
/// Seconds from sending a request upstream until its response ended, by `provider`.
pub const UPSTREAM_LATENCY: &str = "gatekeeper_upstream_latency_seconds";
/// Seconds from sending a request upstream until the first body bytes went to the client.
pub const UPSTREAM_TTFB: &str = "gatekeeper_upstream_ttfb_seconds";
/// Tokens counted against users, by `family` and `kind` (`input`, `output`).
pub const TOKENS: &str = "gatekeeper_tokens_total";
/// Requests refused by the proxy itself, by `reason` ([`Reason`]).
pub const REFUSALS: &str = "gatekeeper_refusals_total";
/// Requests waiting in the fair queue, by `family` (emitted by the queue).
pub const QUEUE_LENGTH: &str = "gatekeeper_queue_length";
/// Seconds requests waited in the fair queue, by `family` (emitted by the queue).
pub const QUEUE_WAIT: &str = "gatekeeper_queue_wait_seconds";
/// Upstream keys by `provider` and `state`, computed at scrape time.
pub const KEYS: &str = "gatekeeper_keys";
/// Seconds since the moment up to which every user change is known stored.
pub const STORE_FLUSH_LAG: &str = "gatekeeper_store_flush_lag_seconds";
/// User changes not yet written to the store.
pub const STORE_PENDING: &str = "gatekeeper_store_pending_changes";
/// Flushes of the user store that failed (and will be retried), by `backend`.
pub const STORE_FLUSH_FAILURES: &str = "gatekeeper_store_flush_failures_total";

/// Histogram buckets (seconds) for every histogram: LLM answers take from tens of milliseconds
/// (a cached model list, a first token) to minutes (a long generation).
pub const BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
];

/// Set once the recorder is installed; until then every recording function returns at once.
static ENABLED: AtomicBool = AtomicBool::new(false);
/// The process's one recorder handle (the global recorder can be installed only once, so
/// every server of the process — tests start several — renders from the same one).
static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Whether metrics are recorded in this process.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Installs the Prometheus recorder as the process's global recorder (once; later calls return
/// the same handle) and describes every metric. Called by `AppState::build` when `METRICS_KEY`
/// is set.
pub fn install() -> Result<PrometheusHandle, ConfigError> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .map_err(|e| format!("metrics buckets: {e}"))?;
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|_| {
                "METRICS_KEY is set but another metrics recorder is already installed in this process"
                    .to_string()
            })?;
            describe();
            refusal_counters();
            ENABLED.store(true, Ordering::Relaxed);
            Ok(handle)
        })
        .clone()
        .map_err(ConfigError)
}

/// Drains the recorder's histogram samples into their buckets every few seconds, so that
/// memory does not grow between scrapes (the exporter leaves this to its user). Spawned by
/// `app::serve` when metrics are on.
pub async fn run_upkeep(handle: PrometheusHandle, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => handle.run_upkeep(),
        }
    }
}

fn describe() {
    use metrics::{describe_counter, describe_histogram};
    describe_counter!(
        REQUESTS,
        "Proxied requests sent upstream, by provider, model family and final HTTP status code."
    );
    describe_histogram!(
        UPSTREAM_LATENCY,
        "Seconds from sending a request upstream until its response ended (or the client left), by provider."
    );
    describe_histogram!(
        UPSTREAM_TTFB,
        "Seconds from sending a request upstream until the first body bytes were relayed, by provider."
    );
    describe_counter!(
        TOKENS,
        "Tokens counted against users' quotas, by model family and kind (input, output)."
    );
    describe_counter!(REFUSALS, "Requests refused by the proxy itself, by reason.");
    describe_histogram!(
        QUEUE_WAIT,
        "Seconds requests waited in the fair queue, by model family."
    );
    describe_counter!(
        STORE_FLUSH_FAILURES,
        "Flushes of the user store that failed (the changes stay pending and are retried), by backend."
    );
}

/// Why the proxy refused a request (the `reason` label of [`REFUSALS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Reason {
    /// A missing or wrong credential (proxy key, user token, admin key, `METRICS_KEY`), a
    /// disabled or expired token, a token over its IP limit, a missing CSRF token.
    Auth,
    /// The address is locked out after too many wrong credentials.
    Lockout,
    /// `IP_BLACKLIST`.
    Blacklist,
    /// `ADMIN_WHITELIST` (admin routes and `/metrics`).
    Whitelist,
    /// The user's token quota for the family is spent.
    Quota,
    /// The prompt rate limit (`TEXT_MODEL_RATE_LIMIT`), or every key resting after a 429.
    RateLimit,
    /// The operator's policy: model family, images, tools, context length, blocked origin.
    Policy,
    /// A malformed or too large request, a bad `X-Forwarded-For` hop.
    BadRequest,
    /// No usable upstream key (none configured, all revoked or over quota).
    NoKey,
    /// Anything else the proxy refused before sending upstream.
    Other,
}

impl Reason {
    /// Every reason, in label order.
    pub const ALL: [Reason; 10] = [
        Reason::Auth,
        Reason::Lockout,
        Reason::Blacklist,
        Reason::Whitelist,
        Reason::Quota,
        Reason::RateLimit,
        Reason::Policy,
        Reason::BadRequest,
        Reason::NoKey,
        Reason::Other,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Auth => "auth",
            Reason::Lockout => "lockout",
            Reason::Blacklist => "blacklist",
            Reason::Whitelist => "whitelist",
            Reason::Quota => "quota",
            Reason::RateLimit => "rate_limit",
            Reason::Policy => "policy",
            Reason::BadRequest => "bad_request",
            Reason::NoKey => "no_key",
            Reason::Other => "other",
        }
    }

    /// The reason of an error the forwarder answers without sending upstream, from its
    /// OpenAI error type (each refusal has its own) and status.
    pub fn of(e: &ProxyError) -> Reason {
        match e.kind {
            "insufficient_quota" => Reason::Quota,
            "rate_limit_error" => Reason::RateLimit,
            "authentication_error" => Reason::Auth,
            "vision_not_allowed"
            | "tools_not_allowed"
            | "model_family_not_allowed"
            | "context_too_long"
            | "blocked_origin" => Reason::Policy,
            _ if e.status == StatusCode::SERVICE_UNAVAILABLE => Reason::NoKey,
            _ if e.status == StatusCode::FORBIDDEN => Reason::Policy,
            _ if e.status == StatusCode::BAD_REQUEST
                || e.status == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Reason::BadRequest
            }
            _ => Reason::Other,
        }
    }
}

/// Counts one refusal.
#[inline]
pub fn refused(reason: Reason) {
    if !enabled() {
        return;
    }
    refusal_counters()[reason as usize].increment(1);
}

/// The refusal counters, one per [`Reason`]; registered when the recorder is installed, so
/// that every reason is listed (with 0) from the first scrape.
fn refusal_counters() -> &'static [Counter; 10] {
    static COUNTERS: OnceLock<[Counter; 10]> = OnceLock::new();
    COUNTERS
        .get_or_init(|| Reason::ALL.map(|r| metrics::counter!(REFUSALS, "reason" => r.as_str())))
}

/// Counts a refusal the forwarder answers with `e` (see [`Reason::of`]).
#[inline]
pub fn refused_with(e: &ProxyError) {
    if enabled() {
        refused(Reason::of(e));
    }
}

/// Every provider with its label, in [`provider_slot`] order.
pub const PROVIDERS: [(Provider, &str); 8] = [
    (Provider::OpenAi, "openai"),
    (Provider::Anthropic, "anthropic"),
    (Provider::GoogleAi, "google-ai"),
    (Provider::MistralAi, "mistral-ai"),
    (Provider::Azure, "azure"),
    (Provider::Aws, "aws"),
    (Provider::AwsMistral, "aws-mistral"),
    (Provider::Gcp, "gcp"),
];

/// The provider's position in [`PROVIDERS`].
fn provider_slot(p: Provider) -> usize {
    match p {
        Provider::OpenAi => 0,
        Provider::Anthropic => 1,
        Provider::GoogleAi => 2,
        Provider::MistralAi => 3,
        Provider::Azure => 4,
        Provider::Aws => 5,
        Provider::AwsMistral => 6,
        Provider::Gcp => 7,
    }
}

/// The label of a provider.
pub fn provider_label(p: Provider) -> &'static str {
    PROVIDERS[provider_slot(p)].1
}

/// The family labels: every family of the family table and its `azure-` variant, after
/// `other` (index 0, for anything not in the table and for requests without a family).
struct FamilyLabels {
    /// A fixed table, only read after it is built: the fast hash cannot be flooded.
    index: HashMap<&'static str, u16, BuildHasherDefault<IntHasher>>,
    labels: Vec<&'static str>,
}

fn family_labels() -> &'static FamilyLabels {
    static TABLE: OnceLock<FamilyLabels> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut labels: Vec<&'static str> = vec!["other"];
        labels.extend(FAMILIES.iter().copied());
        // The `azure-` names are made once per process and live as long as it (a few hundred
        // bytes), so that labels stay `&'static str` and no request allocates one.
        labels.extend(
            FAMILIES
                .iter()
                .map(|f| &*Box::leak(format!("azure-{f}").into_boxed_str())),
        );
        let index = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (*l, u16::try_from(i).unwrap_or(0)))
            .collect();
        FamilyLabels { index, labels }
    })
}

/// The label index of a family (0, `other`, when it is not in the table).
fn family_slot(family: Option<&str>) -> u16 {
    family
        .and_then(|f| family_labels().index.get(f).copied())
        .unwrap_or(0)
}

/// The label of a family: itself when the family table knows it, else `other`.
pub fn family_label(family: Option<&str>) -> &'static str {
    let t = family_labels();
    t.labels[usize::from(family_slot(family))]
}

/// The status code as a `&'static str` label (`"200"`), `"other"` outside 100–599.
fn status_label(status: StatusCode) -> &'static str {
    // Every code 100..=599 as three digits, sliced: no allocation per request.
    static DIGITS: OnceLock<String> = OnceLock::new();
    let code = status.as_u16();
    if !(100..=599).contains(&code) {
        return "other";
    }
    let digits = DIGITS.get_or_init(|| (100..=599).map(|c: u16| c.to_string()).collect());
    let at = usize::from(code - 100) * 3;
    digits.get(at..at + 3).unwrap_or("other")
}

/// A hasher for the small integer keys of the per-thread handle caches and the fixed family
/// table: the std SipHash would cost more than the counter it finds (measured: 49 → 33 ns per
/// request count with the family looked up by this hash). Integer keys are already distinct;
/// one multiply spreads them over the table (Fibonacci hashing).
#[derive(Default)]
struct IntHasher(u64);

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type HandleCache = RefCell<HashMap<u64, Counter, BuildHasherDefault<IntHasher>>>;

thread_local! {
    /// This thread's request counters by (provider, family, status).
    static REQUEST_COUNTERS: HandleCache = RefCell::default();
    /// This thread's token counters by (family, kind).
    static TOKEN_COUNTERS: HandleCache = RefCell::default();
}

/// Adds `n` to the counter `key` of a per-thread cache, registering it with `make` once.
fn add(
    cache: &'static std::thread::LocalKey<HandleCache>,
    key: u64,
    n: u64,
    make: impl FnOnce() -> Counter,
) {
    // `try_with`: a thread being torn down has no cache; the count is then dropped.
    let _ = cache.try_with(|c| {
        if let Ok(mut c) = c.try_borrow_mut() {
            c.entry(key).or_insert_with(make).increment(n);
        }
    });
}

/// Counts one proxied request that reached the upstream phase with its final status.
#[inline]
pub fn count_request(provider: Provider, family: Option<&str>, status: StatusCode) {
    if !enabled() {
        return;
    }
    let p = provider_slot(provider);
    let f = family_slot(family);
    let key = (p as u64) << 32 | u64::from(f) << 16 | u64::from(status.as_u16());
    add(&REQUEST_COUNTERS, key, 1, || {
        metrics::counter!(
            REQUESTS,
            "provider" => PROVIDERS[p].1,
            "family" => family_labels().labels[usize::from(f)],
            "status" => status_label(status),
        )
    });
}

/// Counts the tokens charged to a user for one response.
#[inline]
pub fn tokens(family: &str, input: u64, output: u64) {
    if !enabled() {
        return;
    }
    let f = family_slot(Some(family));
    for (kind, n, label) in [(0u64, input, "input"), (1, output, "output")] {
        if n > 0 {
            add(&TOKEN_COUNTERS, u64::from(f) << 1 | kind, n, || {
                metrics::counter!(
                    TOKENS,
                    "family" => family_labels().labels[usize::from(f)],
                    "kind" => label,
                )
            });
        }
    }
}

/// Records how long a request waited in the fair queue for `family`.
pub fn queue_waited(family: &str, waited: Duration) {
    if !enabled() {
        return;
    }
    let f = family_slot(Some(family));
    queue_wait_handle(f).record(waited.as_secs_f64());
}

/// The queue's wait histogram of a family label, registered on first use.
fn queue_wait_handle(family_slot: u16) -> Histogram {
    let label = family_labels().labels[usize::from(family_slot)];
    // Rare (once per queued request): the facade's lookup is cheap enough here.
    metrics::histogram!(QUEUE_WAIT, "family" => label)
}

/// Counts a failed flush of the user store.
pub fn store_flush_failed(backend: &'static str) {
    if enabled() {
        metrics::counter!(STORE_FLUSH_FAILURES, "backend" => backend).increment(1);
    }
}

/// The latency and time-to-first-byte histograms of a provider.
fn timings(provider: Provider) -> &'static [Histogram; 2] {
    // Registered on a provider's first response, so that providers never used show no series.
    static HISTOGRAMS: [OnceLock<[Histogram; 2]>; 8] = [const { OnceLock::new() }; 8];
    let slot = provider_slot(provider);
    HISTOGRAMS[slot].get_or_init(|| {
        let label = PROVIDERS[slot].1;
        [
            metrics::histogram!(UPSTREAM_LATENCY, "provider" => label),
            metrics::histogram!(UPSTREAM_TTFB, "provider" => label),
        ]
    })
}

/// A proxied response from upstream on its way to the client: counts it (provider, family,
/// status) and times its body — the first bytes relayed ([`UPSTREAM_TTFB`]) and its end or
/// the client leaving ([`UPSTREAM_LATENCY`]), both from `sent`, when the request went
/// upstream. Without metrics the response is returned untouched.
pub fn proxied(mut resp: Reply, provider: Provider, family: Option<&str>, sent: Instant) -> Reply {
    if !enabled() {
        return resp;
    }
    count_request(provider, family, resp.status);
    let timed = Timed {
        inner: std::mem::take(&mut resp.body),
        histograms: timings(provider),
        sent,
        first_seen: false,
        ended: false,
    };
    resp.body = Body::new(timed);
    resp
}

/// Seconds since `sent` ([`crate::timer::now`]: the connection's poll's clock reading).
fn elapsed(sent: Instant) -> f64 {
    crate::timer::now()
        .saturating_duration_since(sent)
        .as_secs_f64()
}

/// A response body that records when its first data and its end went by.
struct Timed {
    inner: Body,
    histograms: &'static [Histogram; 2],
    sent: Instant,
    first_seen: bool,
    ended: bool,
}

impl Timed {
    fn end(&mut self) {
        if !self.ended {
            self.ended = true;
            self.histograms[0].record(elapsed(self.sent));
        }
    }
}

impl http_body::Body for Timed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if !this.first_seen && frame.data_ref().is_some_and(|d| !d.is_empty()) {
                    this.first_seen = true;
                    this.histograms[1].record(elapsed(this.sent));
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => this.end(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Timed {
    /// A body dropped before its end (the client left, or hyper saw `is_end_stream`) ends the
    /// measurement there.
    fn drop(&mut self) {
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded_and_static() {
        assert_eq!(status_label(StatusCode::OK), "200");
        assert_eq!(status_label(StatusCode::TOO_MANY_REQUESTS), "429");
        assert_eq!(status_label(StatusCode::from_u16(599).unwrap()), "599");
        assert_eq!(status_label(StatusCode::from_u16(100).unwrap()), "100");
        assert_eq!(status_label(StatusCode::from_u16(999).unwrap()), "other");
        assert_eq!(family_label(Some("gpt4o")), "gpt4o");
        assert_eq!(family_label(Some("azure-gpt4o")), "azure-gpt4o");
        assert_eq!(family_label(Some("sk-secret-looking-thing")), "other");
        assert_eq!(family_label(None), "other");
        assert_eq!(provider_label(Provider::AwsMistral), "aws-mistral");
        for (i, (p, _)) in PROVIDERS.iter().enumerate() {
            assert_eq!(provider_slot(*p), i);
        }
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }

    #[test]
    fn refusal_reasons_from_forwarder_errors() {
        let e = |status: u16, kind: &'static str| {
            Reason::of(&ProxyError::new(
                StatusCode::from_u16(status).unwrap(),
                kind,
                "m",
            ))
        };
        assert_eq!(e(429, "insufficient_quota"), Reason::Quota);
        assert_eq!(e(429, "rate_limit_error"), Reason::RateLimit);
        assert_eq!(e(403, "model_family_not_allowed"), Reason::Policy);
        assert_eq!(e(400, "context_too_long"), Reason::Policy);
        assert_eq!(e(403, "blocked_origin"), Reason::Policy);
        assert_eq!(e(401, "authentication_error"), Reason::Auth);
        assert_eq!(e(400, "invalid_request_error"), Reason::BadRequest);
        assert_eq!(e(413, "invalid_request_error"), Reason::BadRequest);
        assert_eq!(e(503, "upstream_error"), Reason::NoKey);
        assert_eq!(e(500, "server_error"), Reason::Other);
    }
}
