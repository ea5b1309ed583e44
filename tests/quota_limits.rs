//! Limits through the running server: quota refusals (and what they say), refresh on a driven
//! tick, the prompt rate limit with its headers and `Retry-After`, and special-user exemptions.

mod common;

use common::quota::{add_user, eventually, post, proxy, used};
use common::upstream::FakeUpstream;
use llm_gatekeeper::users::UserType;
use serde_json::{json, Value};

const NO_RATE: &[&str] = &["--text-model-rate-limit", "0"];

fn chat() -> Value {
    json!({"model": "gpt-4o-mini", "max_tokens": 20,
        "messages": [{"role": "user", "content": "hi"}]})
}

fn header(r: &reqwest::Response, name: &str) -> Option<u64> {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn user_at_limit_is_refused_until_the_refresh_tick() {
    let fake = FakeUpstream::start().await;
    let app = proxy(
        &fake,
        &[
            "--text-model-rate-limit",
            "0",
            "--quota-refresh-period",
            "hourly",
        ],
        &[("TOKEN_QUOTA_TURBO", "100")],
    )
    .await;
    add_user(&app, "u", UserType::Normal, &[("turbo", 100)]);
    app.state.users.update("u", |u| {
        u.token_counts.insert("turbo", 95);
    });
    let c = reqwest::Client::new();
    let r = post(&c, &app, "/v1/chat/completions", "u", &chat()).await;
    assert_eq!(r.status(), 429);
    assert!(
        r.headers().get("retry-after").is_none(),
        "a quota refusal is not a rate limit"
    );
    let e: Value = r.json().await.expect("json");
    assert_eq!(e["error"]["type"], "insufficient_quota");
    let msg = e["error"]["message"].as_str().expect("message");
    for needle in ["turbo", "95", "100", "refreshes at"] {
        assert!(msg.contains(needle), "{needle} in {msg}");
    }
    assert_eq!(
        fake.request_count(),
        0,
        "a refused request never reaches the upstream"
    );
    assert_eq!(app.state.users.get("u").expect("user").prompt_count, 0);

    // Drive the clock to the scheduled tick: tokenLimits = tokenCounts + quota.
    let tick = app.state.quotas.next_refresh().expect("scheduled");
    assert!(!app
        .state
        .quotas
        .refresh_due(tick - chrono::Duration::seconds(1)));
    assert!(app.state.quotas.refresh_due(tick));
    let user = app.state.users.get("u").expect("user");
    assert_eq!(user.token_limits.get("turbo"), Some(&195));

    let r = post(&c, &app, "/v1/chat/completions", "u", &chat()).await;
    assert_eq!(r.status(), 200);
    r.text().await.expect("body");
    eventually("settlement", || used(&app, "u", "turbo") == 95 + 15).await;
}

#[tokio::test]
async fn refusal_without_refresh_says_so() {
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake, NO_RATE, &[]).await;
    add_user(&app, "u", UserType::Temporary, &[("turbo", 10)]);
    let r = post(
        &reqwest::Client::new(),
        &app,
        "/v1/chat/completions",
        "u",
        &chat(),
    )
    .await;
    assert_eq!(r.status(), 429);
    let e: Value = r.json().await.expect("json");
    assert!(e["error"]["message"]
        .as_str()
        .expect("message")
        .contains("do not refresh"));
}

#[tokio::test]
async fn invalid_refresh_period_stops_startup() {
    let config = common::config(&["--quota-refresh-period", "every tuesday"], &[]);
    let err = llm_gatekeeper::AppState::build(config)
        .await
        .err()
        .expect("startup refused");
    assert!(err.to_string().contains("QUOTA_REFRESH_PERIOD"), "{err}");
}

#[tokio::test]
async fn rate_limit_headers_and_retry_after() {
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake, &["--text-model-rate-limit", "2"], &[]).await;
    add_user(&app, "u", UserType::Normal, &[]);
    add_user(&app, "other", UserType::Normal, &[]);
    let c = reqwest::Client::new();
    for remaining in [1, 0] {
        let r = post(&c, &app, "/v1/chat/completions", "u", &chat()).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-limit"), Some(2));
        assert_eq!(header(&r, "x-ratelimit-remaining"), Some(remaining));
        let reset = header(&r, "x-ratelimit-reset").expect("reset header");
        assert!((1..=60).contains(&reset), "reset {reset}");
        r.text().await.expect("body");
    }
    let r = post(&c, &app, "/v1/chat/completions", "u", &chat()).await;
    assert_eq!(r.status(), 429);
    let retry = header(&r, "retry-after").expect("Retry-After");
    assert_eq!(header(&r, "x-ratelimit-limit"), Some(2));
    assert_eq!(header(&r, "x-ratelimit-remaining"), Some(0));
    assert!(header(&r, "x-ratelimit-reset").is_some_and(|s| s >= retry));
    assert!((1..=30).contains(&retry), "retry after {retry}");
    let e: Value = r.json().await.expect("json");
    assert_eq!(e["error"]["type"], "rate_limit_error");
    assert_eq!(fake.request_count(), 2);
    // The limit is per user.
    let r = post(&c, &app, "/v1/chat/completions", "other", &chat()).await;
    assert_eq!(r.status(), 200);
    // A quota refusal carries the rate-limit headers too.
    add_user(&app, "poor", UserType::Normal, &[("turbo", 1)]);
    let r = post(&c, &app, "/v1/chat/completions", "poor", &chat()).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-ratelimit-limit"), Some(2));
    assert_eq!(header(&r, "x-ratelimit-remaining"), Some(1));
    // Requests that are not prompts are not limited.
    let r = c
        .get(format!("{}/v1/models", app.url))
        .bearer_auth("u")
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn without_users_the_rate_limit_is_per_address() {
    let fake = FakeUpstream::start().await;
    let app = common::spawn(
        &[
            "--text-model-rate-limit",
            "1",
            "--openai-key",
            "sk-op",
            "--openai-base-url",
            &fake.url,
        ],
        &[],
    )
    .await;
    let url = format!("{}/v1/chat/completions", app.url);
    let a = common::client_from("127.0.0.2");
    let b = common::client_from("127.0.0.3");
    assert_eq!(
        a.post(&url)
            .json(&chat())
            .send()
            .await
            .expect("sent")
            .status(),
        200
    );
    assert_eq!(
        a.post(&url)
            .json(&chat())
            .send()
            .await
            .expect("sent")
            .status(),
        429
    );
    assert_eq!(
        b.post(&url)
            .json(&chat())
            .send()
            .await
            .expect("sent")
            .status(),
        200
    );
}

#[tokio::test]
async fn special_users_pass_quotas_and_rate_limits_but_are_counted() {
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake, &["--text-model-rate-limit", "1"], &[]).await;
    add_user(&app, "vip", UserType::Special, &[("turbo", 1)]);
    let c = reqwest::Client::new();
    for _ in 0..4 {
        let r = post(&c, &app, "/v1/chat/completions", "vip", &chat()).await;
        assert_eq!(r.status(), 200);
        assert!(r.headers().get("x-ratelimit-limit").is_none());
        r.text().await.expect("body");
    }
    eventually("settlement", || used(&app, "vip", "turbo") == 4 * 15).await;
    assert_eq!(app.state.users.get("vip").expect("user").prompt_count, 4);
}
