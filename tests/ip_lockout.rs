//! Brute-force lockout per client address: after `BRUTE_FORCE_MAX_FAILED_ATTEMPTS` failures
//! (admin key, user token or proxy key) the address gets 429 with `Retry-After` even with a
//! correct credential, while other addresses are unaffected.

mod common;

use common::admin::{admitted, create_user, proxied, send, user_token_app, ADMIN_KEY};
use common::client_from;
use reqwest::{Client, StatusCode};
use serde_json::json;

async fn admin_list(c: &Client, url: &str, key: &str) -> reqwest::Response {
    c.get(format!("{url}/admin/users"))
        .bearer_auth(key)
        .send()
        .await
        .expect("sent")
}

#[tokio::test]
async fn wrong_admin_keys_lock_out_one_address_while_another_still_works() {
    let app = user_token_app(&[
        "--brute-force-max-failed-attempts",
        "3",
        "--brute-force-ttl-seconds",
        "600",
    ])
    .await;
    let attacker = client_from("127.0.0.2");
    let admin = client_from("127.0.0.3");
    let token = create_user(&admin, &app, json!({})).await;

    for _ in 0..3 {
        assert_eq!(admin_list(&attacker, &app.url, "guess").await.status(), 401);
    }
    // Locked: even the right key is refused, with a Retry-After within the window.
    let resp = admin_list(&attacker, &app.url, ADMIN_KEY).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp
        .headers()
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=600).contains(&retry), "{retry}");
    let body: serde_json::Value = resp.json().await.expect("JSON");
    assert!(body["error"].is_string());
    // ...on proxied routes too, even with a valid user token, and only after the tarpit's pause
    // (a guessing tool that waits for its answers is slowed down).
    let started = std::time::Instant::now();
    let (status, _) = proxied(&attacker, &app, &token).await;
    assert_eq!(status, 429);
    assert!(started.elapsed() >= llm_gatekeeper::auth::lockout::TARPIT);

    // Another address is unaffected.
    assert_eq!(admin_list(&admin, &app.url, ADMIN_KEY).await.status(), 200);
    assert!(admitted(proxied(&admin, &app, &token).await.0));

    // The admin UI can list who is locked out and until when.
    let locked = app.state.lockout.locked();
    assert_eq!(locked.len(), 1);
    assert_eq!(locked[0].ip.to_string(), "127.0.0.2");
    assert!(locked[0].unlocks_at > llm_gatekeeper::users::now_ms());
}

#[tokio::test]
async fn unknown_user_tokens_count_as_failures() {
    let app = user_token_app(&["--brute-force-max-failed-attempts", "2"]).await;
    let guesser = client_from("127.0.0.2");
    let other = client_from("127.0.0.3");
    let token = create_user(&other, &app, json!({})).await;
    assert_eq!(proxied(&guesser, &app, "guess-1").await.0, 401);
    assert_eq!(proxied(&guesser, &app, "guess-2").await.0, 401);
    let resp = guesser
        .get(format!("{}/v1/models", app.url))
        .bearer_auth(&token)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    assert!(admitted(proxied(&other, &app, &token).await.0));
}

#[tokio::test]
async fn wrong_proxy_keys_count_as_failures() {
    let app = common::spawn(
        &[
            "--gatekeeper",
            "proxy_key",
            "--proxy-key",
            "the-proxy-key",
            "--trusted-proxies",
            "0",
            "--brute-force-max-failed-attempts",
            "2",
        ],
        &[],
    )
    .await;
    let guesser = client_from("127.0.0.2");
    for _ in 0..2 {
        assert_eq!(proxied(&guesser, &app, "nope").await.0, 401);
    }
    assert_eq!(proxied(&guesser, &app, "the-proxy-key").await.0, 429);
    assert!(admitted(
        proxied(&client_from("127.0.0.3"), &app, "the-proxy-key")
            .await
            .0
    ));
}

#[tokio::test]
async fn missing_credentials_and_the_lockout_window_passing() {
    let app = user_token_app(&[
        "--brute-force-max-failed-attempts",
        "1",
        "--brute-force-ttl-seconds",
        "1",
    ])
    .await;
    let c = client_from("127.0.0.2");
    // Asking without any credential is not a guess and does not count.
    for _ in 0..3 {
        let (status, _) = send(c.get(format!("{}/admin/users", app.url))).await;
        assert_eq!(status, 401);
    }
    assert_eq!(admin_list(&c, &app.url, ADMIN_KEY).await.status(), 200);

    let guessed = std::time::Instant::now();
    assert_eq!(admin_list(&c, &app.url, "guess").await.status(), 401);
    let status = admin_list(&c, &app.url, ADMIN_KEY).await.status();
    // Locked, unless this (possibly busy) machine took longer than the 1 s window to get here.
    if guessed.elapsed() < std::time::Duration::from_secs(1) {
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    }
    // Once the window has passed the right key works again (the bound only stops a hang).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut status = status;
    while status != StatusCode::OK {
        assert!(
            std::time::Instant::now() < deadline,
            "still {status} long after the window"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        status = admin_list(&c, &app.url, ADMIN_KEY).await.status();
    }
}
