//! The upstream key pool as the upstream sees it: keys used in turn, a rate-limited key rests
//! while the request is retried on another, an invalid key is taken out of rotation, and the
//! client gets a clear error when no key is left.

mod common;

use common::upstream::{FakeUpstream, Reply};
use llm_gatekeeper::providers::Provider;
use llm_gatekeeper::proxy::keys::KeyCounts;
use serde_json::{json, Value};

fn chat() -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
}

async fn app(fake: &FakeUpstream, openai_keys: &str) -> common::TestApp {
    common::spawn(
        &[
            "--openai-key",
            openai_keys,
            "--anthropic-key",
            "ant-1,ant-2",
            "--openai-base-url",
            &fake.url,
            "--anthropic-base-url",
            &fake.url,
            // These tests send more prompts than the default 4 per minute.
            "--text-model-rate-limit",
            "0",
        ],
        &[],
    )
    .await
}

async fn post_chat(app: &common::TestApp) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", app.url))
        .json(&chat())
        .send()
        .await
        .expect("request")
}

fn creds(fake: &FakeUpstream) -> Vec<String> {
    fake.credentials()
        .into_iter()
        .map(|c| c.expect("credential"))
        .collect()
}

#[tokio::test]
async fn keys_are_used_in_turn() {
    let fake = FakeUpstream::start().await;
    let app = app(&fake, "k1, k2,k3").await;
    for _ in 0..6 {
        assert_eq!(post_chat(&app).await.status(), 200);
    }
    assert_eq!(creds(&fake), ["k1", "k2", "k3", "k1", "k2", "k3"]);
    for _ in 0..2 {
        let resp = reqwest::Client::new()
            .post(format!("{}/v1/messages", app.url))
            .json(&chat())
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200);
    }
    let all = creds(&fake);
    assert_eq!(&all[6..], ["ant-1", "ant-2"]);
}

#[tokio::test]
async fn rate_limited_key_rests_and_the_request_is_retried_on_another() {
    let fake = FakeUpstream::start().await;
    let app = app(&fake, "k1,k2").await;
    fake.on_key("k1", Reply::rate_limited("30"));
    let resp = post_chat(&app).await;
    assert_eq!(
        resp.status(),
        200,
        "the client never sees the 429 of one key"
    );
    assert_eq!(creds(&fake), ["k1", "k2"]);
    // k1 rests: every following request goes to k2, without touching k1.
    for _ in 0..3 {
        assert_eq!(post_chat(&app).await.status(), 200);
    }
    assert_eq!(creds(&fake), ["k1", "k2", "k2", "k2", "k2"]);
    assert_eq!(
        app.state.upstreams.key_counts(Provider::OpenAi),
        KeyCounts {
            total: 2,
            working: 1,
            resting: 1,
            invalid: 0,
            ..KeyCounts::default()
        }
    );
}

#[tokio::test]
async fn when_every_key_is_rate_limited_requests_wait_then_get_503_or_429() {
    let fake = FakeUpstream::start().await;
    let app = common::spawn(
        &[
            "--openai-key",
            "k1",
            "--openai-base-url",
            &fake.url,
            "--text-model-rate-limit",
            "0",
            // The fair queue (docs/keys.md): a generation request waits this long for a key.
            "--queue-timeout-secs",
            "1",
        ],
        &[],
    )
    .await;
    let date = (chrono::Utc::now() + chrono::Duration::seconds(120)).to_rfc2822();
    fake.on_key("k1", Reply::rate_limited(&date));
    // The last key's own 429 rests it; the request waits in the queue, then gets 503 with
    // Retry-After (when the key is free again) and what to do.
    let resp = post_chat(&app).await;
    assert_eq!(resp.status(), 503);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=121).contains(&retry), "retry-after {retry}");
    let body: Value = resp.json().await.expect("json");
    let msg = body["error"]["message"].as_str().expect("message");
    assert!(
        msg.contains("OPENAI_KEY")
            && msg.contains("rate-limited")
            && msg.contains("QUEUE_TIMEOUT_SECS"),
        "{msg}"
    );
    // While it rests, other requests are answered by the proxy itself, with Retry-After,
    // without calling upstream: 429 for those that do not queue (the model list).
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/models", app.url))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=120).contains(&retry), "retry-after {retry}");
    let body: Value = resp.json().await.expect("json");
    let msg = body["error"]["message"].as_str().expect("message");
    assert!(
        msg.contains("OPENAI_KEY") && msg.contains("rate-limited"),
        "{msg}"
    );
    assert_eq!(post_chat(&app).await.status(), 503);
    assert_eq!(fake.request_count(), 1);
}

#[tokio::test]
async fn invalid_key_is_taken_out_of_rotation() {
    let fake = FakeUpstream::start().await;
    let app = app(&fake, "bad-key,good-key").await;
    fake.on_key(
        "bad-key",
        Reply::error(401, "Incorrect API key provided: bad-key"),
    );
    for _ in 0..3 {
        assert_eq!(post_chat(&app).await.status(), 200);
    }
    assert_eq!(
        creds(&fake),
        ["bad-key", "good-key", "good-key", "good-key"]
    );
    assert_eq!(app.state.upstreams.key_counts(Provider::OpenAi).invalid, 1);

    // When the last key goes bad too, the client gets the proxy's own error, which names the
    // variable and never echoes the upstream's message (it may quote part of a key).
    fake.on_key("good-key", Reply::error(403, "Forbidden: good-key"));
    let resp = post_chat(&app).await;
    assert_eq!(resp.status(), 503);
    let text = resp.text().await.expect("body");
    assert!(text.contains("OPENAI_KEY"), "{text}");
    assert!(
        !text.contains("good-key") && !text.contains("bad-key"),
        "{text}"
    );
    assert_eq!(
        app.state.upstreams.key_counts(Provider::OpenAi),
        KeyCounts {
            total: 2,
            working: 0,
            resting: 0,
            invalid: 2,
            ..KeyCounts::default()
        }
    );
}

#[tokio::test]
async fn over_quota_and_revoked_keys_leave_rotation_and_only_the_working_key_serves() {
    let fake = FakeUpstream::start().await;
    let app = app(&fake, "spent,revoked,good").await;
    fake.on_key(
        "spent",
        Reply::json(
            429,
            json!({"error": {"message": "You exceeded your current quota, please check your plan and billing details.", "type": "insufficient_quota", "param": null, "code": "insufficient_quota"}}),
        ),
    );
    fake.on_key("revoked", Reply::error(401, "Incorrect API key provided"));
    for _ in 0..4 {
        assert_eq!(post_chat(&app).await.status(), 200);
    }
    // Each bad key was tried once; from then on only the working key is used, and the
    // over-quota key does not come back when a rate limit would have passed.
    assert_eq!(
        creds(&fake),
        ["spent", "revoked", "good", "good", "good", "good"]
    );
    let counts = app.state.upstreams.key_counts(Provider::OpenAi);
    assert_eq!(
        (counts.working, counts.over_quota, counts.invalid),
        (1, 1, 1)
    );
    let views = app.state.upstreams.provider(Provider::OpenAi).keys.views();
    let states: Vec<&str> = views.iter().map(|v| v.state).collect();
    assert_eq!(states, ["over_quota", "revoked", "working"]);
}

#[tokio::test]
async fn anthropic_credit_errors_take_the_key_out_but_bad_requests_do_not() {
    let fake = FakeUpstream::start().await;
    let app = app(&fake, "k1").await;
    fake.on_key(
        "ant-1",
        Reply::json(
            400,
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."}}),
        ),
    );
    let send = || async {
        reqwest::Client::new()
            .post(format!("{}/v1/messages", app.url))
            .json(&json!({"model": "claude-3-5-haiku-latest", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .expect("request")
    };
    for _ in 0..3 {
        assert_eq!(send().await.status(), 200);
    }
    let counts = app.state.upstreams.key_counts(Provider::Anthropic);
    assert_eq!((counts.working, counts.over_quota), (1, 1));
    // A client's own bad request (400) is relayed as is and leaves the key alone.
    fake.on_key(
        "ant-2",
        Reply::json(
            400,
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: field required"}}),
        ),
    );
    let resp = send().await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["message"], "max_tokens: field required");
    assert_eq!(
        app.state.upstreams.key_counts(Provider::Anthropic).working,
        1
    );
}
