//! `X-Forwarded-For` behind `TRUSTED_PROXIES=1` cannot be forged (issue 12): the client is the
//! entry the trusted proxy appended (the right-most), whatever the client wrote to its left —
//! `x`, an empty `,,`, `unknown`, garbage. The attack strings of the issue defeated the admin
//! whitelist, `IP_BLACKLIST`, the brute-force lockout, the per-address rate limit and
//! `MAX_IPS_PER_USER`; each has its test here. A non-address among the trusted entries is a 400.
//!
//! The tests play the trusted proxy themselves: they connect from 127.0.0.1 and append the
//! "real" client address as the right-most entry, after what the attacker sent.

mod common;

use common::admin::{admitted, create_user, proxied, send, ADMIN_KEY};
use common::upstream::FakeUpstream;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

/// The attacker (real address 127.0.0.77, appended by the proxy) claims to be 10.9.9.9.
const FORGED: &[&str] = &[
    "10.9.9.9, x, 127.0.0.77",
    "10.9.9.9,,127.0.0.77",
    "10.9.9.9, unknown, 127.0.0.77",
    "10.9.9.9, 127.0.0.77",
];

async fn behind_one_proxy(extra: &[&str]) -> common::TestApp {
    let mut args = vec![
        "--gatekeeper",
        "user_token",
        "--admin-key",
        ADMIN_KEY,
        "--trusted-proxies",
        "1",
    ];
    args.extend_from_slice(extra);
    common::spawn(&args, &[]).await
}

async fn admin_with(c: &Client, url: &str, xff: &str, key: &str) -> (StatusCode, Value) {
    send(
        c.get(format!("{url}/admin/users"))
            .bearer_auth(key)
            .header("x-forwarded-for", xff),
    )
    .await
}

async fn proxied_with(c: &Client, url: &str, xff: &str, token: &str) -> (StatusCode, Value) {
    send(
        c.get(format!("{url}/v1/models"))
            .bearer_auth(token)
            .header("x-forwarded-for", xff),
    )
    .await
}

#[tokio::test]
async fn forged_entries_do_not_pass_the_admin_whitelist() {
    let app = behind_one_proxy(&["--admin-whitelist", "10.9.9.9/32"]).await;
    let c = Client::new();
    for xff in FORGED {
        let (status, v) = admin_with(&c, &app.url, xff, ADMIN_KEY).await;
        assert_eq!(status, 403, "{xff}: {v}");
    }
    // The real 10.9.9.9 (as its proxy reports it) still gets in.
    let (status, v) = admin_with(&c, &app.url, "garbage, 10.9.9.9", ADMIN_KEY).await;
    assert_eq!(status, 200, "{v}");

    // A bad entry left of the client's used to fall back to the socket peer (the proxy).
    let app = behind_one_proxy(&["--admin-whitelist", "127.0.0.1/32"]).await;
    let (status, v) = admin_with(&c, &app.url, "garbage, 203.0.113.5", ADMIN_KEY).await;
    assert_eq!(status, 403, "{v}");
}

#[tokio::test]
async fn forged_entries_do_not_escape_the_blacklist() {
    let app = behind_one_proxy(&["--ip-blacklist", "127.0.0.77"]).await;
    let c = Client::new();
    let token = create_user(&c, &app, json!({})).await;
    for xff in FORGED {
        let (status, v) = proxied_with(&c, &app.url, xff, &token).await;
        assert_eq!(status, 403, "{xff}: {v}");
    }
    let (status, v) = admin_with(&c, &app.url, "garbage, 127.0.0.77", ADMIN_KEY).await;
    assert_eq!(status, 403, "{v}");
    assert!(admitted(
        proxied_with(&c, &app.url, "127.0.0.77, 127.0.0.78", &token)
            .await
            .0
    ));
}

#[tokio::test]
async fn forged_entries_do_not_reset_the_lockout() {
    let app = behind_one_proxy(&["--brute-force-max-failed-attempts", "2"]).await;
    let c = Client::new();
    // Each guess claims another address; all of them come from 127.0.0.77.
    for (i, xff) in FORGED.iter().take(2).enumerate() {
        let (status, v) = admin_with(&c, &app.url, xff, &format!("guess-{i}")).await;
        assert_eq!(status, 401, "{xff}: {v}");
    }
    for xff in FORGED {
        let (status, v) = admin_with(&c, &app.url, xff, ADMIN_KEY).await;
        assert_eq!(status, 429, "locked out whatever it claims ({xff}): {v}");
    }
    // Another client behind the same proxy is not affected.
    let (status, v) = admin_with(&c, &app.url, "10.9.9.9, 127.0.0.78", ADMIN_KEY).await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test]
async fn forged_entries_do_not_reset_the_rate_limit() {
    let fake = FakeUpstream::start().await;
    let app = common::spawn(
        &[
            "--trusted-proxies",
            "1",
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
    let c = Client::new();
    let chat = json!({"model": "gpt-4o-mini", "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}]});
    let post = |xff: &str| {
        c.post(format!("{}/v1/chat/completions", app.url))
            .header("x-forwarded-for", xff)
            .json(&chat)
            .send()
    };
    assert_eq!(
        post("10.0.0.1, 127.0.0.77").await.expect("sent").status(),
        200
    );
    for xff in FORGED {
        let status = post(xff).await.expect("sent").status();
        assert_eq!(status, 429, "{xff}");
    }
    assert_eq!(post("127.0.0.78").await.expect("sent").status(), 200);
}

#[tokio::test]
async fn forged_entries_do_not_pass_max_ips_per_user() {
    let app = behind_one_proxy(&["--max-ips-per-user", "1"]).await;
    let c = Client::new();
    let token = create_user(&c, &app, json!({})).await;
    // The token's owner uses it from 10.9.9.9.
    let (status, v) = proxied_with(&c, &app.url, "10.9.9.9", &token).await;
    assert!(admitted(status), "{v}");
    // Someone else, at 127.0.0.77, claims the owner's address.
    for xff in FORGED {
        let (status, v) = proxied_with(&c, &app.url, xff, &token).await;
        assert_eq!(status, 403, "{xff}: {v}");
    }
    let ips = app.state.users.get(&token).expect("user").ip;
    assert_eq!(ips, vec!["10.9.9.9".to_string()]);
}

#[tokio::test]
async fn a_bad_trusted_entry_is_refused_with_400_and_health_still_answers() {
    let app = behind_one_proxy(&[]).await;
    let c = Client::new();
    let token = create_user(&c, &app, json!({})).await;
    for bad in [
        "10.9.9.9, unknown",
        "10.9.9.9,",
        "garbage",
        "1.2.3.4, 5.6.7.8:x",
    ] {
        let (status, v) = proxied_with(&c, &app.url, bad, &token).await;
        assert_eq!(status, 400, "{bad}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("TRUSTED_PROXIES=1"), "{msg}");
        let (status, v) = admin_with(&c, &app.url, bad, ADMIN_KEY).await;
        assert_eq!(status, 400, "{bad}: {v}");
        assert!(v["error"].as_str().is_some(), "admin error shape: {v}");
    }
    let resp = c
        .get(format!("{}/health", app.url))
        .header("x-forwarded-for", "garbage")
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    // Without the header, the socket peer is the client.
    assert!(admitted(proxied(&c, &app, &token).await.0));
}
