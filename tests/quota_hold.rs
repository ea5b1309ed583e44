//! Quotas hold in every case (issue 12): requests without `max_tokens` (or with a larger one
//! than the user has left) get the provider's own output cap set to what is left, in parallel
//! too; too little left is a 429 that says how much; a string or float `max_tokens` is a 400;
//! a vendor-prefixed model name counts in the bare name's family. The fake upstream generates
//! as many tokens as the request's cap allows, or 16 000 without one, like a real model.

mod common;

use common::quota::{add_user, eventually, post, proxy, reserved, used};
use common::upstream::{FakeUpstream, GENERATED_PROMPT_TOKENS, UNCAPPED_OUTPUT};
use llm_gatekeeper::users::UserType;
use serde_json::{json, Value};

const NO_RATE: &[&str] = &["--text-model-rate-limit", "0"];

/// A chat request without an output cap; the prompt is long enough that the proxy's estimate
/// is above the fake's reported [`GENERATED_PROMPT_TOKENS`].
fn uncapped(model: &str) -> Value {
    json!({"model": model, "messages": [
        {"role": "user", "content": "Write as much as you can about the history of the bicycle."}
    ]})
}

#[tokio::test]
async fn fifty_parallel_uncapped_requests_never_end_above_the_limit() {
    let fake = FakeUpstream::start().await;
    fake.generate_to_cap();
    let app = proxy(&fake, NO_RATE, &[]).await;
    add_user(&app, "u", UserType::Normal, &[("gpt4o", 1_000)]);
    let client = reqwest::Client::new();
    let calls = (0..50).map(|i| {
        let client = client.clone();
        let app = &app;
        async move {
            let mut body = uncapped("gpt-4o");
            if i % 2 == 1 {
                body["stream"] = json!(true);
            }
            let r = post(&client, app, "/v1/chat/completions", "u", &body).await;
            let status = r.status().as_u16();
            let text = r.text().await.expect("body");
            (status, text)
        }
    });
    let results = futures::future::join_all(calls).await;
    let ok = results.iter().filter(|(s, _)| *s == 200).count();
    assert!(ok >= 1, "at least one request fits");
    for (s, text) in &results {
        assert!(*s == 200 || *s == 429, "status {s}: {text}");
        if *s == 429 {
            assert!(text.contains("left"), "{text}");
        }
    }
    eventually("every reservation settled", || {
        reserved(&app, "u", "gpt4o") == 0
    })
    .await;
    let total = used(&app, "u", "gpt4o");
    assert!(total <= 1_000, "the user ended at {total} of 1000");
    assert!(total > 500, "the admitted answers used the quota: {total}");
    // Every request that reached the upstream carried a cap the user could afford.
    for r in fake.requests() {
        let b = r.json();
        let cap = b["max_completion_tokens"]
            .as_u64()
            .expect("the proxy set the cap");
        assert!(cap < 1_000, "cap {cap}");
        assert!(b.get("max_tokens").is_none());
    }
}

#[tokio::test]
async fn a_cap_larger_than_what_is_left_is_lowered_and_a_fitting_one_is_kept() {
    let fake = FakeUpstream::start().await;
    fake.generate_to_cap();
    let app = proxy(&fake, NO_RATE, &[]).await;
    add_user(&app, "u", UserType::Normal, &[("gpt4o", 500)]);
    let c = reqwest::Client::new();

    let mut body = uncapped("gpt-4o");
    body["max_tokens"] = json!(50);
    let r = post(&c, &app, "/v1/chat/completions", "u", &body).await;
    assert_eq!(r.status(), 200);
    r.text().await.expect("body");
    assert_eq!(fake.last_request().json()["max_tokens"], 50, "kept as sent");
    eventually("settled", || reserved(&app, "u", "gpt4o") == 0).await;
    assert_eq!(used(&app, "u", "gpt4o"), GENERATED_PROMPT_TOKENS + 50);

    let mut body = uncapped("gpt-4o");
    body["max_tokens"] = json!(100_000);
    let r = post(&c, &app, "/v1/chat/completions", "u", &body).await;
    assert_eq!(r.status(), 200);
    r.text().await.expect("body");
    let cap = fake.last_request().json()["max_tokens"]
        .as_u64()
        .expect("the client's field, lowered");
    assert!(cap < 500 - 60, "lowered to what is left: {cap}");
    eventually("settled", || reserved(&app, "u", "gpt4o") == 0).await;
    let total = used(&app, "u", "gpt4o");
    assert!(total <= 500, "ended at {total}");

    // Now too little is left for an answer: 429 saying how much is left.
    let r = post(&c, &app, "/v1/chat/completions", "u", &uncapped("gpt-4o")).await;
    assert_eq!(r.status(), 429);
    let e: Value = r.json().await.expect("json");
    assert_eq!(e["error"]["type"], "insufficient_quota");
    let msg = e["error"]["message"].as_str().expect("message");
    assert!(msg.contains("left"), "{msg}");
    assert_eq!(fake.request_count(), 2);
}

#[tokio::test]
async fn anthropic_max_tokens_is_lowered_to_what_is_left() {
    let fake = FakeUpstream::start().await;
    fake.generate_to_cap();
    let app = proxy(&fake, NO_RATE, &[]).await;
    add_user(&app, "u", UserType::Normal, &[("claude", 300)]);
    let c = reqwest::Client::new();
    let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 4096,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]});
    let r = post(&c, &app, "/v1/messages", "u", &body).await;
    assert_eq!(r.status(), 200);
    r.text().await.expect("body");
    let cap = fake.last_request().json()["max_tokens"]
        .as_u64()
        .expect("set");
    assert!(cap < 300, "cap {cap}");
    eventually("settled", || reserved(&app, "u", "claude") == 0).await;
    assert!(used(&app, "u", "claude") <= 300);
}

#[tokio::test]
async fn users_with_room_and_unlimited_users_are_not_capped() {
    let fake = FakeUpstream::start().await;
    fake.generate_to_cap();
    // The operator's output cap (MAX_OUTPUT_TOKENS_OPENAI, 1024 by default as in the original,
    // tests/policy_rules.rs) is off here: this test is about the quota's own cap.
    let app = proxy(&fake, NO_RATE, &[("MAX_OUTPUT_TOKENS_OPENAI", "0")]).await;
    add_user(&app, "rich", UserType::Normal, &[("gpt4o", 10_000_000)]);
    add_user(&app, "free", UserType::Normal, &[]);
    add_user(&app, "vip", UserType::Special, &[("gpt4o", 10)]);
    let c = reqwest::Client::new();
    for token in ["rich", "free", "vip"] {
        let r = post(&c, &app, "/v1/chat/completions", token, &uncapped("gpt-4o")).await;
        assert_eq!(r.status(), 200, "{token}");
        r.text().await.expect("body");
        let b = fake.last_request().json();
        assert!(
            b.get("max_tokens").is_none() && b.get("max_completion_tokens").is_none(),
            "{token}: the body went up as sent: {b}"
        );
        eventually("settled", || reserved(&app, token, "gpt4o") == 0).await;
        assert_eq!(
            used(&app, token, "gpt4o"),
            GENERATED_PROMPT_TOKENS + UNCAPPED_OUTPUT
        );
    }
}

#[tokio::test]
async fn string_or_float_max_tokens_is_a_400() {
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake, NO_RATE, &[]).await;
    add_user(&app, "u", UserType::Normal, &[("gpt4o", 1_000)]);
    let c = reqwest::Client::new();
    for (path, field, value) in [
        ("/v1/chat/completions", "max_tokens", json!("100")),
        ("/v1/chat/completions", "max_tokens", json!(100.5)),
        ("/v1/chat/completions", "max_completion_tokens", json!("7")),
        ("/v1/messages", "max_tokens", json!("100")),
        ("/v1/messages", "max_tokens", json!(1.5)),
    ] {
        let mut body = uncapped("gpt-4o");
        body[field] = value;
        let r = post(&c, &app, path, "u", &body).await;
        assert_eq!(r.status(), 400, "{path} {field}");
        let e: Value = r.json().await.expect("json");
        let msg = e["error"]["message"].as_str().expect("message");
        assert!(msg.contains(field), "{msg}");
    }
    assert_eq!(fake.request_count(), 0);
}

#[tokio::test]
async fn vendor_prefixed_models_count_in_the_bare_family() {
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake, NO_RATE, &[]).await;
    add_user(
        &app,
        "u",
        UserType::Normal,
        &[("gpt4o", 1_000), ("claude", 1_000)],
    );
    let c = reqwest::Client::new();
    let mut body = uncapped("openai/gpt-4o");
    body["max_tokens"] = json!(20);
    let r = post(&c, &app, "/v1/chat/completions", "u", &body).await;
    assert_eq!(r.status(), 200);
    r.text().await.expect("body");
    eventually("counted", || used(&app, "u", "gpt4o") == 15).await;

    let body = json!({"model": "anthropic/claude-3-5-haiku", "max_tokens": 20,
        "messages": [{"role": "user", "content": "hi"}]});
    let r = post(&c, &app, "/v1/messages", "u", &body).await;
    assert_eq!(r.status(), 200);
    r.text().await.expect("body");
    eventually("counted", || used(&app, "u", "claude") == 15).await;

    // At the limit, the prefixed name is refused like the bare one.
    app.state.users.update("u", |u| {
        u.token_counts.insert("gpt4o", 1_000);
    });
    let r = post(
        &c,
        &app,
        "/v1/chat/completions",
        "u",
        &body_for("openai/gpt-4o"),
    )
    .await;
    assert_eq!(r.status(), 429);
}

fn body_for(model: &str) -> Value {
    json!({"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
}
