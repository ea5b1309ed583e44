//! Helpers for the quota tests: a proxy in `user_token` mode in front of a fake upstream, users
//! created straight in the store, and reads of their counts and reservations.
#![allow(dead_code)]

use llm_gatekeeper::users::{User, UserType};
use serde_json::Value;

use super::upstream::FakeUpstream;
use super::TestApp;

pub const ADMIN_KEY: &str = "quota-test-admin-key";

/// The proxy in `user_token` mode with both upstreams pointed at `fake`, plus `extra` flags
/// and `vars` (`TOKEN_QUOTA_*`).
pub async fn proxy(fake: &FakeUpstream, extra: &[&str], vars: &[(&str, &str)]) -> TestApp {
    let mut args = vec![
        "--gatekeeper",
        "user_token",
        "--admin-key",
        ADMIN_KEY,
        "--openai-key",
        "sk-operator-openai",
        "--anthropic-key",
        "sk-ant-operator",
        "--openai-base-url",
        &fake.url,
        "--anthropic-base-url",
        &fake.url,
    ];
    args.extend_from_slice(extra);
    super::spawn(&args, vars).await
}

/// Creates (or replaces) a user with the given limits.
pub fn add_user(app: &TestApp, token: &str, kind: UserType, limits: &[(&str, u64)]) {
    let limits = limits.iter().map(|(f, n)| (f.to_string(), *n)).collect();
    app.state
        .users
        .upsert(User::new(token.to_string(), kind, limits, 0));
}

/// `tokenCounts[family]` of a user.
pub fn used(app: &TestApp, token: &str, family: &str) -> u64 {
    app.state
        .users
        .get(token)
        .expect("user exists")
        .token_counts
        .get(family)
        .copied()
        .unwrap_or(0)
}

/// Tokens reserved by a user's requests still running, in `family`.
pub fn reserved(app: &TestApp, token: &str, family: &str) -> u64 {
    app.state
        .users
        .update_entry(token, |e| {
            (e.reserved.get(family).copied().unwrap_or(0), false)
        })
        .expect("user exists")
}

/// POSTs `body` to `path` with the user's token.
pub async fn post(
    client: &reqwest::Client,
    app: &TestApp,
    path: &str,
    token: &str,
    body: &Value,
) -> reqwest::Response {
    client
        .post(format!("{}{path}", app.url))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .expect("request reaches the proxy")
}

/// Waits (up to 20 s, only so that a broken test cannot hang) until `f` holds.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Sends a chat request as user `token` that the upstream (`fake`) holds for a minute, and
/// hangs up once the upstream has it: a client gone before the upstream answered.
pub async fn hang_up_before_the_answer(
    app: &TestApp,
    fake: &FakeUpstream,
    token: &str,
    body: &serde_json::Value,
) {
    fake.push(
        super::upstream::Reply::json(
            200,
            serde_json::json!({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}),
        )
        .delayed(std::time::Duration::from_secs(60)),
    );
    let (url, token, body) = (
        format!("{}/v1/chat/completions", app.url),
        token.to_string(),
        body.clone(),
    );
    let task = tokio::spawn(async move {
        let _ = reqwest::Client::new()
            .post(url)
            .bearer_auth(token)
            .json(&body)
            .send()
            .await;
    });
    let before = fake.request_count();
    eventually("the upstream got the request", || {
        fake.request_count() > before
    })
    .await;
    task.abort();
}
