//! `GET /metrics` through the running server (issue 16): the exposition is parsed with a real
//! Prometheus parser (`prometheus-parse`) after proxied requests — served, refused for a bad
//! credential, refused for quota — and shows request counts by status, tokens by family,
//! refusal reasons and key states, with no token, key or address in any label. Also: no
//! `METRICS_KEY`, no route; a wrong key is a 401 in JSON that counts for the lockout;
//! `ADMIN_WHITELIST` applies; failed store flushes are counted (Firebase behind a failing relay).
//!
//! All tests of this file share one process and so one global recorder: counts other tests of
//! the file also produce (refusals) are asserted as lower bounds; counts only one test produces
//! (requests, tokens) and the per-server gauges (keys) exactly.

mod common;

use common::quota::{add_user, eventually, post, ADMIN_KEY};
use common::upstream::{FakeUpstream, Reply};
use llm_gatekeeper::users::UserType;
use prometheus_parse::{Sample, Scrape, Value as PromValue};
use serde_json::{json, Value};

const METRICS_KEY: &str = "metrics-test-key-0123456789abcdef";
const USER: &str = "metrics-user-token-aaaa1111";
const POOR: &str = "metrics-poor-token-bbbb2222";
const KEYS: &str = "sk-metrics-spent-1,sk-metrics-revoked-2,sk-metrics-good-3";

fn chat() -> Value {
    json!({"model": "gpt-4o-mini", "max_tokens": 20,
        "messages": [{"role": "user", "content": "hi"}]})
}

/// The proxy in `user_token` mode with three OpenAI keys (one will be over quota, one
/// revoked) and metrics on.
async fn app(fake: &FakeUpstream, extra: &[&str]) -> common::TestApp {
    let mut args = vec![
        "--gatekeeper",
        "user_token",
        "--admin-key",
        ADMIN_KEY,
        "--openai-key",
        KEYS,
        "--openai-base-url",
        &fake.url,
        "--text-model-rate-limit",
        "0",
        "--metrics-key",
        METRICS_KEY,
    ];
    args.extend_from_slice(extra);
    common::spawn(&args, &[]).await
}

async fn scrape_raw(client: &reqwest::Client, app: &common::TestApp) -> reqwest::Response {
    client
        .get(format!("{}/metrics", app.url))
        .bearer_auth(METRICS_KEY)
        .send()
        .await
        .expect("scrape reaches the proxy")
}

/// Scrapes `/metrics` and parses it.
async fn scrape(app: &common::TestApp) -> (String, Scrape) {
    let r = scrape_raw(&reqwest::Client::new(), app).await;
    assert_eq!(r.status(), 200);
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let text = r.text().await.expect("body");
    let parsed = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parses");
    (text, parsed)
}

fn find<'a>(s: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    s.samples
        .iter()
        .find(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
}

/// The value of a counter or gauge sample (0 when absent).
fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match find(s, metric, labels).map(|x| &x.value) {
        Some(PromValue::Counter(v) | PromValue::Gauge(v) | PromValue::Untyped(v)) => *v,
        Some(other) => panic!("{metric} is not a counter or gauge: {other:?}"),
        None => 0.0,
    }
}

/// The number of observations of a histogram (0 when absent).
fn histogram_count(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match find(s, metric, labels).map(|x| &x.value) {
        Some(PromValue::Histogram(buckets)) => buckets
            .iter()
            .find(|b| b.less_than.is_infinite())
            .map_or(0.0, |b| b.count),
        Some(other) => panic!("{metric} is not a histogram: {other:?}"),
        None => 0.0,
    }
}

#[tokio::test]
async fn scrape_shows_requests_tokens_refusals_and_key_states_without_secrets() {
    let fake = FakeUpstream::start().await;
    let app = app(&fake, &[]).await;
    fake.on_key(
        "sk-metrics-spent-1",
        Reply::json(
            429,
            json!({"error": {"message": "You exceeded your current quota, please check your plan and billing details.", "type": "insufficient_quota", "param": null, "code": "insufficient_quota"}}),
        ),
    );
    fake.on_key(
        "sk-metrics-revoked-2",
        Reply::error(401, "Incorrect API key provided"),
    );
    add_user(&app, USER, UserType::Normal, &[("turbo", 1_000_000)]);
    add_user(&app, POOR, UserType::Normal, &[("turbo", 10)]);
    app.state.users.update(POOR, |u| {
        u.token_counts.insert("turbo", 10);
    });
    let c = reqwest::Client::new();

    // Served (after the over-quota and the revoked key were tried and taken out).
    let r = post(&c, &app, "/v1/chat/completions", USER, &chat()).await;
    assert_eq!(r.status(), 200);
    r.text().await.expect("body");
    eventually("settlement", || {
        common::quota::used(&app, USER, "turbo") > 0
    })
    .await;
    let charged = common::quota::used(&app, USER, "turbo") as f64;
    // A wrong user token, and a user over quota.
    let r = post(
        &c,
        &app,
        "/v1/chat/completions",
        "metrics-wrong-token-cccc",
        &chat(),
    )
    .await;
    assert_eq!(r.status(), 401);
    let r = post(&c, &app, "/v1/chat/completions", POOR, &chat()).await;
    assert_eq!(r.status(), 429);

    // The response's end is recorded when the server drops its body, which may come just
    // after the client has read it: wait for it.
    let (mut text, mut s) = scrape(&app).await;
    let latency = [("provider", "openai")];
    for _ in 0..500 {
        if histogram_count(&s, "gatekeeper_upstream_latency_seconds", &latency) >= 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        (text, s) = scrape(&app).await;
    }

    let req = |status| {
        value(
            &s,
            "gatekeeper_requests_total",
            &[
                ("provider", "openai"),
                ("family", "turbo"),
                ("status", status),
            ],
        )
    };
    assert_eq!(req("200"), 1.0, "{text}");
    // The refused requests never went upstream: they are refusals, not requests.
    assert_eq!(req("401"), 0.0);
    assert_eq!(req("429"), 0.0);
    let tokens = |kind| {
        value(
            &s,
            "gatekeeper_tokens_total",
            &[("family", "turbo"), ("kind", kind)],
        )
    };
    assert!(tokens("input") > 0.0 && tokens("output") > 0.0, "{text}");
    assert_eq!(tokens("input") + tokens("output"), charged, "{text}");
    assert!(value(&s, "gatekeeper_refusals_total", &[("reason", "auth")]) >= 1.0);
    assert!(value(&s, "gatekeeper_refusals_total", &[("reason", "quota")]) >= 1.0);
    assert_eq!(
        histogram_count(&s, "gatekeeper_upstream_latency_seconds", &latency),
        1.0
    );
    assert_eq!(
        histogram_count(&s, "gatekeeper_upstream_ttfb_seconds", &latency),
        1.0
    );

    let keys = |state| {
        value(
            &s,
            "gatekeeper_keys",
            &[("provider", "openai"), ("state", state)],
        )
    };
    assert_eq!(
        (
            keys("working"),
            keys("over_quota"),
            keys("revoked"),
            keys("rate_limited")
        ),
        (1.0, 1.0, 1.0, 0.0),
        "{text}"
    );
    assert!(find(&s, "gatekeeper_keys", &[("provider", "anthropic")]).is_none());
    assert!(find(
        &s,
        "gatekeeper_store_flush_lag_seconds",
        &[("backend", "memory")]
    )
    .is_some());
    assert!(find(&s, "gatekeeper_store_pending_changes", &[]).is_some());
    assert!(s.docs.contains_key("gatekeeper_requests_total"));

    // No label carries a token, key or address.
    for sample in &s.samples {
        for (k, v) in sample.labels.iter() {
            for secret in [
                USER,
                POOR,
                "metrics-wrong-token",
                "sk-metrics",
                METRICS_KEY,
                ADMIN_KEY,
                "127.0.0.1",
            ] {
                assert!(
                    !v.contains(secret),
                    "{}{{{k}={v}}} holds {secret}",
                    sample.metric
                );
            }
        }
    }
    assert!(!text.contains("sk-metrics") && !text.contains(USER));
}

#[tokio::test]
async fn without_metrics_key_the_route_does_not_exist() {
    let fake = FakeUpstream::start().await;
    let app = common::spawn(
        &["--openai-key", "sk-x", "--openai-base-url", &fake.url],
        &[],
    )
    .await;
    let c = reqwest::Client::new();
    let unknown = c
        .get(format!("{}/no-such-page", app.url))
        .send()
        .await
        .expect("reaches");
    assert_eq!(unknown.status(), 404);
    for auth in [None, Some(METRICS_KEY)] {
        let mut req = c.get(format!("{}/metrics", app.url));
        if let Some(k) = auth {
            req = req.bearer_auth(k);
        }
        let r = req.send().await.expect("reaches");
        assert_eq!(r.status(), 404, "like any unknown path");
    }
    assert_eq!(fake.request_count(), 0);
}

#[tokio::test]
async fn a_wrong_or_missing_key_is_a_json_401_and_wrong_keys_lock_the_address_out() {
    let fake = FakeUpstream::start().await;
    let app = app(&fake, &["--brute-force-max-failed-attempts", "3"]).await;
    let c = reqwest::Client::new();
    let url = format!("{}/metrics", app.url);

    let r = c.get(&url).send().await.expect("reaches");
    assert_eq!(r.status(), 401);
    let e: Value = r.json().await.expect("json error");
    assert!(e["error"]
        .as_str()
        .expect("message")
        .contains("METRICS_KEY"));

    // Other credentials do not open it, and a wrong key counts like any wrong credential.
    for wrong in [ADMIN_KEY, "not-the-metrics-key", "still-not-it"] {
        let r = c
            .get(&url)
            .bearer_auth(wrong)
            .send()
            .await
            .expect("reaches");
        assert_eq!(r.status(), 401, "{wrong}");
        let e: Value = r.json().await.expect("json error");
        assert!(e["error"]
            .as_str()
            .expect("message")
            .contains("Invalid metrics key"));
    }
    // Three failures: the address is locked out, even with the right key now.
    let r = scrape_raw(&c, &app).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let e: Value = r.json().await.expect("json error");
    assert!(e["error"]
        .as_str()
        .expect("message")
        .contains("Too many failed"));
}

#[tokio::test]
async fn the_admin_whitelist_applies() {
    let fake = FakeUpstream::start().await;
    let app = app(&fake, &["--admin-whitelist", "127.0.0.2/32"]).await;
    let r = scrape_raw(&common::client_from("127.0.0.1"), &app).await;
    assert_eq!(r.status(), 403);
    let e: Value = r.json().await.expect("json error");
    assert!(e["error"]
        .as_str()
        .expect("message")
        .contains("ADMIN_WHITELIST"));
    let r = scrape_raw(&common::client_from("127.0.0.2"), &app).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("body");
    assert!(text.contains("gatekeeper_keys{provider=\"openai\",state=\"working\"}"));
}

#[test]
fn a_short_metrics_key_is_refused_at_startup() {
    let e = llm_gatekeeper::Config::from_args(
        ["llm-gatekeeper", "--metrics-key", "short"],
        Vec::<(String, String)>::new(),
    )
    .expect_err("too short");
    let msg = e.to_string();
    assert!(msg.contains("METRICS_KEY") && msg.contains("16"), "{msg}");
    assert!(!msg.contains("short\""), "the secret is not printed: {msg}");
}

#[tokio::test]
async fn failed_store_flushes_are_counted_and_the_lag_shows_pending_changes() {
    let Some(fb) = common::persist::Firebase::start().await else {
        return;
    };
    let mut args = fb.args(1);
    args.extend(["--metrics-key".to_string(), METRICS_KEY.to_string()]);
    let app = common::persist::spawn_args(&args).await;
    fb.relay
        .state
        .fail
        .store(true, std::sync::atomic::Ordering::SeqCst);
    add_user(&app, "metrics-store-user-dddd", UserType::Normal, &[]);

    let backend = [("backend", "firebase_rtdb")];
    let mut s = scrape(&app).await.1;
    for _ in 0..1500 {
        if value(&s, "gatekeeper_store_flush_failures_total", &backend) >= 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        s = scrape(&app).await.1;
    }
    assert!(value(&s, "gatekeeper_store_flush_failures_total", &backend) >= 1.0);
    assert_eq!(value(&s, "gatekeeper_store_pending_changes", &backend), 1.0);
    assert!(find(&s, "gatekeeper_store_flush_lag_seconds", &backend).is_some());

    // After recovery nothing is pending.
    fb.relay
        .state
        .fail
        .store(false, std::sync::atomic::Ordering::SeqCst);
    common::quota::eventually("the change stored", || {
        app.state.persistence.status().consecutive_failures == 0
            && app.state.persistence.status().pending == 0
            && app.state.persistence.status().in_flight == 0
    })
    .await;
    let s = scrape(&app).await.1;
    assert_eq!(value(&s, "gatekeeper_store_pending_changes", &backend), 0.0);
}

#[tokio::test]
async fn queue_metrics_have_bounded_family_labels_and_latency_buckets() {
    let fake = FakeUpstream::start().await;
    let app = app(&fake, &[]).await;
    // What the fair queue reports (it calls these as requests wait and leave).
    llm_gatekeeper::metrics::queue_length("claude-opus", 3);
    llm_gatekeeper::metrics::queue_waited("claude-opus", std::time::Duration::from_millis(700));
    llm_gatekeeper::metrics::queue_length("sk-not-a-family-0000", 1);

    let (text, s) = scrape(&app).await;
    let family = [("family", "claude-opus")];
    assert_eq!(value(&s, "gatekeeper_queue_length", &family), 3.0, "{text}");
    assert_eq!(
        value(&s, "gatekeeper_queue_length", &[("family", "other")]),
        1.0
    );
    assert!(!text.contains("sk-not-a-family"));
    match find(&s, "gatekeeper_queue_wait_seconds", &family).map(|x| &x.value) {
        Some(PromValue::Histogram(buckets)) => {
            let le = |bound: f64| {
                buckets
                    .iter()
                    .find(|b| b.less_than == bound)
                    .map(|b| b.count)
            };
            // 0.7 s falls in the (0.5, 1] bucket of the shared LLM buckets.
            assert_eq!(
                (le(0.5), le(1.0), le(120.0)),
                (Some(0.0), Some(1.0), Some(1.0))
            );
        }
        other => panic!("no queue wait histogram: {other:?}\n{text}"),
    }
}
