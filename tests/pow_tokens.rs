//! Proof-of-work temporary tokens through the HTTP API (`CAPTCHA_MODE=proof_of_work`): a
//! solved challenge earns a `temporary` token with `POW_TOKEN_MAX_IPS` and the default quotas
//! that works on the proxy; challenges are single-use, address-bound and tamper-proof; an
//! expired token is refreshed with an easier challenge; the admin anti-abuse page changes the
//! difficulty at run time. Solutions are found here with the server's own Argon2id (small
//! `ARGON2_*` costs); `tests/browser_captcha.rs` solves in Chromium.

mod common;

use common::upstream::FakeUpstream;
use common::web::Browser;
use llm_gatekeeper::pow::{solves, target_bytes, Challenge};
use llm_gatekeeper::users::UserType;
use reqwest::Client;
use serde_json::{json, Value};

const ADMIN_KEY: &str = "test-admin-key-0123456789";

async fn app(fake: &FakeUpstream) -> common::TestApp {
    common::spawn(
        &[
            "--gatekeeper",
            "user_token",
            "--admin-key",
            ADMIN_KEY,
            "--trusted-proxies",
            "0",
            "--use-insecure-cookies",
            "true",
            "--openai-key",
            "sk-operator-openai",
            "--openai-base-url",
            &fake.url,
            "--captcha-mode",
            "proof_of_work",
            "--pow-difficulty-level",
            "low",
            "--argon2-time-cost",
            "2",
            "--argon2-memory-kb",
            "64",
            "--pow-token-hours",
            "5",
        ],
        &[("TOKEN_QUOTA_TURBO", "5000")],
    )
    .await
}

async fn post(c: &Client, app: &common::TestApp, path: &str, body: &Value) -> (u16, Value) {
    let resp = c
        .post(format!("{}{path}", app.url))
        .json(body)
        .send()
        .await
        .expect("sent");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn solve(ch: &Challenge) -> String {
    (0u64..)
        .map(|n| n.to_string())
        .find(|s| solves(ch, s))
        .expect("a solution exists")
}

async fn new_challenge(c: &Client, app: &common::TestApp, body: Value) -> (Challenge, String) {
    let (status, v) = post(c, app, "/user/captcha/challenge", &body).await;
    assert_eq!(status, 200, "{v}");
    let ch: Challenge = serde_json::from_value(v["challenge"].clone()).expect("challenge");
    (ch, v["signature"].as_str().expect("signature").to_string())
}

#[tokio::test]
async fn a_solved_challenge_earns_a_temporary_token_that_works_and_refreshes() {
    let fake = FakeUpstream::start().await;
    let app = app(&fake).await;
    let c = Client::new();

    // The page and both scripts are served by the proxy itself.
    let page = c
        .get(format!("{}/user/captcha", app.url))
        .send()
        .await
        .expect("page");
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .expect("csp")
        .to_string();
    assert!(
        csp.contains("script-src 'self' 'wasm-unsafe-eval'"),
        "{csp}"
    );
    let js = c
        .get(format!("{}/user/captcha/argon2.js", app.url))
        .send()
        .await
        .expect("script");
    assert!(js.text().await.expect("text").contains("argon2id"));

    let (ch, sig) = new_challenge(&c, &app, json!({"action": "new"})).await;
    assert_eq!(ch.d, hex::encode(target_bytes(32, 200)), "low = 200 hashes");
    // A tampered (easier) challenge is refused.
    let mut easier = ch.clone();
    easier.d = "ff".repeat(32);
    let (status, v) = post(
        &c,
        &app,
        "/user/captcha/verify",
        &json!({"challenge": easier, "signature": sig, "solution": "0"}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        v["error"].as_str().unwrap_or("").contains("signature"),
        "{v}"
    );

    let solution = solve(&ch);
    let body = json!({"challenge": ch, "signature": sig, "solution": solution});
    let (status, v) = post(&c, &app, "/user/captcha/verify", &body).await;
    assert_eq!(status, 200, "{v}");
    let token = v["token"].as_str().expect("token").to_string();
    let user = app.state.users.get(&token).expect("user created");
    assert_eq!(user.kind, UserType::Temporary);
    assert_eq!(user.max_ips, Some(2));
    assert_eq!(user.token_limits.get("turbo"), Some(&5000));
    let hours = (user.expires_at.expect("expires") - user.created_at) / 3_600_000;
    assert!((4..=5).contains(&hours), "POW_TOKEN_HOURS=5: {hours}");

    // Single use (another address, so that the per-address pause is not what refuses it).
    let other = common::client_from("127.0.0.2");
    let (status, v) = post(&other, &app, "/user/captcha/verify", &body).await;
    assert_eq!(status, 400, "{v}");
    // And the address that just verified waits a minute.
    let (status, _) = post(&c, &app, "/user/captcha/verify", &body).await;
    assert_eq!(status, 429);

    // The token works on the proxy.
    let resp = c
        .post(format!("{}/v1/chat/completions", app.url))
        .bearer_auth(&token)
        .json(&json!({"model": "gpt-3.5-turbo", "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);

    // Expired: refused on the proxy, then refreshed with an easier challenge from a second
    // address (which joins the token's two allowed addresses).
    app.state.users.update(&token, |u| {
        u.expires_at = Some(1);
        u.disabled_at = Some(2);
    });
    let resp = c
        .get(format!("{}/v1/models", app.url))
        .bearer_auth(&token)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 403);
    let (ch, sig) = new_challenge(
        &other,
        &app,
        json!({"action": "refresh", "refreshToken": token}),
    )
    .await;
    assert_eq!(
        ch.d,
        hex::encode(target_bytes(32, 100)),
        "refresh = half the work"
    );
    let solution = solve(&ch);
    let (status, v) = post(
        &other,
        &app,
        "/user/captcha/verify",
        &json!({"challenge": ch, "signature": sig, "solution": solution}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["token"], token.as_str());
    let user = app.state.users.get(&token).expect("user");
    assert!(user.disabled_at.is_none());
    assert!(user.expires_at.expect("expiry") > user.created_at);
    assert_eq!(user.ip.len(), 2);

    // A third address has no room left; an unknown token is not refreshable.
    let third = common::client_from("127.0.0.3");
    let (status, _) = post(
        &third,
        &app,
        "/user/captcha/challenge",
        &json!({"action": "refresh", "refreshToken": token}),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = post(
        &other,
        &app,
        "/user/captcha/challenge",
        &json!({"action": "refresh", "refreshToken": "not-a-token"}),
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn a_wrong_solution_is_refused_and_the_address_waits() {
    let fake = FakeUpstream::start().await;
    let app = app(&fake).await;
    let c = Client::new();
    let (ch, sig) = new_challenge(&c, &app, json!({"action": "new"})).await;
    let wrong = (0u64..)
        .map(|n| n.to_string())
        .find(|s| !solves(&ch, s))
        .expect("a non-solution exists");
    let (status, v) = post(
        &c,
        &app,
        "/user/captcha/verify",
        &json!({"challenge": ch, "signature": sig, "solution": wrong}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("failed verification"),
        "{v}"
    );
    let (ch, sig) = new_challenge(&c, &app, json!({"action": "new"})).await;
    let (status, _) = post(
        &c,
        &app,
        "/user/captcha/verify",
        &json!({"challenge": ch, "signature": sig, "solution": "1"}),
    )
    .await;
    assert_eq!(status, 429);
}

#[tokio::test]
async fn the_admin_changes_the_difficulty_at_run_time() {
    let fake = FakeUpstream::start().await;
    let app = app(&fake).await;
    let c = Client::new();
    let (old, old_sig) = new_challenge(&c, &app, json!({"action": "new"})).await;

    let b = Browser::new(&app.url);
    b.login(ADMIN_KEY).await;
    let p = b.get("/admin/manage/abuse").await;
    assert!(
        p.body.contains("Current difficulty: <strong>low</strong>"),
        "{}",
        p.body
    );
    let csrf = p.csrf();
    let r = b
        .post_form(
            "/admin/manage/abuse/difficulty",
            &[("_csrf", &csrf), ("difficulty", "custom"), ("custom", "7")],
        )
        .await;
    assert_eq!(r.status, 303);
    let (ch, _) = new_challenge(&c, &app, json!({"action": "new"})).await;
    assert_eq!(ch.d, hex::encode(target_bytes(32, 7)));
    // The challenge issued before the change is no longer accepted.
    let solution = solve(&old);
    let (status, v) = post(
        &c,
        &app,
        "/user/captcha/verify",
        &json!({"challenge": old, "signature": old_sig, "solution": solution}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        v["error"].as_str().unwrap_or("").contains("difficulty"),
        "{v}"
    );
    let r = b
        .post_form(
            "/admin/manage/abuse/difficulty",
            &[("_csrf", &csrf), ("difficulty", "impossible")],
        )
        .await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn off_by_default_and_refused_without_user_tokens() {
    let app = common::admin::user_token_app(&[]).await;
    let resp = reqwest::get(format!("{}/user/captcha", app.url))
        .await
        .expect("sent");
    assert_eq!(resp.status(), 404);
    let e = llm_gatekeeper::Config::from_args(
        ["llm-gatekeeper", "--captcha-mode", "proof_of_work"],
        Vec::<(String, String)>::new(),
    )
    .expect_err("needs user_token");
    assert!(e.0.contains("GATEKEEPER=user_token"), "{}", e.0);
}
