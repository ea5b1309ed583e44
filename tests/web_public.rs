//! The public pages: the service info page at `/` (HTML, JSON, static) and user
//! self-service at `/user` (lookup by token in a POST body, masked addresses, nickname changes,
//! lockout on failed lookups, CSRF).

mod common;

use common::web::{Browser, ADMIN_KEY};
use llm_gatekeeper::users::{User, UserType};

const OPENAI_SECRET: &str = "sk-never-show-this-key-1234567890";

#[tokio::test]
async fn info_page_shows_how_to_connect_and_never_a_key() {
    let app = common::spawn(
        &[
            "--gatekeeper",
            "proxy_key",
            "--proxy-key",
            "pk-secret-shared",
            "--openai-key",
            OPENAI_SECRET,
            "--text-model-rate-limit",
            "7",
        ],
        &[("TOKEN_QUOTA_TURBO", "123456")],
    )
    .await;
    let b = Browser::new(&app.url);
    let p = b.get("/").await;
    assert_eq!(p.status, 200);
    assert!(p
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .starts_with("text/html"));
    let host = app.url.trim_start_matches("http://");
    assert!(
        p.body.contains(&format!("http:&#x2f;&#x2f;{host}&#x2f;v1")),
        "OpenAI base URL shown"
    );
    assert!(p.body.contains("proxy&#x2f;anthropic"), "alias shown");
    assert!(p.body.contains("Shared password"));
    assert!(p.body.contains("7 prompts per minute"));
    assert!(p.body.contains("turbo") && p.body.contains("123\u{202f}456"));
    assert!(!p.body.contains(OPENAI_SECRET) && !p.body.contains("pk-secret-shared"));

    let j = b.get_with("/", &[("accept", "application/json")]).await;
    assert_eq!(j.status, 200);
    let v: serde_json::Value = serde_json::from_str(&j.body).expect("JSON");
    assert_eq!(v["gatekeeper"], "proxy_key");
    assert_eq!(v["endpoints"][0]["url"], format!("http://{host}/v1"));
    assert_eq!(v["providers"][0]["name"], "openai");
    assert_eq!(v["providers"][0]["keys"], 1);
    assert_eq!(v["providers"][1]["keys"], 0);
    assert_eq!(v["rateLimit"]["promptsPerMinute"], 7);
    assert!(v["uptime"].is_u64());
    let turbo = v["modelFamilies"]
        .as_array()
        .expect("families")
        .iter()
        .find(|f| f["family"] == "turbo")
        .cloned();
    assert_eq!(turbo.expect("turbo listed")["quota"], 123456);
    assert!(!j.body.contains(OPENAI_SECRET));
}

#[tokio::test]
async fn static_service_info_is_a_bare_200() {
    let app = common::spawn(
        &[
            "--static-service-info",
            "true",
            "--openai-key",
            OPENAI_SECRET,
        ],
        &[],
    )
    .await;
    let p = Browser::new(&app.url).get("/").await;
    assert_eq!(p.status, 200);
    assert!(p.body.is_empty());
}

fn user_with_usage(token: &str) -> User {
    let mut u = User::new(
        token.into(),
        UserType::Normal,
        Default::default(),
        1_700_000_000_000,
    );
    u.nickname = Some("alice".into());
    u.prompt_count = 12;
    u.ip = vec!["10.20.30.40".to_string(), "192.168.1.77".to_string()].into();
    u.token_counts.insert("turbo", 250);
    u.token_limits.insert("turbo", 1000);
    u
}

async fn user_app(extra: &[&str]) -> common::TestApp {
    let mut args = vec![
        "--gatekeeper",
        "user_token",
        "--admin-key",
        ADMIN_KEY,
        "--quota-refresh-period",
        "daily",
    ];
    args.extend_from_slice(extra);
    let app = common::spawn(&args, &[]).await;
    app.state
        .users
        .load(vec![user_with_usage("user-token-abc")]);
    app
}

#[tokio::test]
async fn a_user_sees_their_quota_with_masked_addresses() {
    let app = user_app(&[]).await;
    let b = Browser::new(&app.url);
    let form = b.get("/user").await;
    assert_eq!(form.status, 200);
    let csrf = form.csrf();
    let p = b
        .post_form("/user", &[("_csrf", &csrf), ("token", "user-token-abc")])
        .await;
    assert_eq!(p.status, 200);
    for expected in [
        "alice",
        "normal",
        "12",
        "250",
        "1\u{202f}000",
        "750",
        "10.20.xxx.xxx",
        "192.168.xxx.xxx",
        "every day",
    ] {
        assert!(p.body.contains(expected), "page shows {expected:?}");
    }
    assert!(!p.body.contains("10.20.30.40"));
    assert_eq!(
        p.headers.get("cache-control").and_then(|v| v.to_str().ok()),
        Some("no-store")
    );
}

#[tokio::test]
async fn failed_lookups_count_toward_the_lockout() {
    let app = user_app(&["--brute-force-max-failed-attempts", "2"]).await;
    let b = Browser::new(&app.url);
    let csrf = b.get("/user").await.csrf();
    for guess in ["guess-1", "guess-2"] {
        let r = b
            .post_form("/user", &[("_csrf", &csrf), ("token", guess)])
            .await;
        assert_eq!(r.status, 401);
        assert!(r.body.contains("No user has this token"));
        assert!(!r.body.contains(guess), "the guess is not echoed");
    }
    let r = b
        .post_form("/user", &[("_csrf", &csrf), ("token", "user-token-abc")])
        .await;
    assert_eq!(r.status, 429, "locked out even with the right token");
}

#[tokio::test]
async fn user_forms_need_their_csrf_token() {
    let app = user_app(&[]).await;
    let b = Browser::new(&app.url);
    b.get("/user").await;
    let r = b.post_form("/user", &[("token", "user-token-abc")]).await;
    assert_eq!(r.status, 403);
    let r = b
        .post_form(
            "/user/nickname",
            &[
                ("token", "user-token-abc"),
                ("nickname", "x"),
                ("_csrf", "forged"),
            ],
        )
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(
        app.state
            .users
            .get("user-token-abc")
            .expect("user")
            .nickname
            .as_deref(),
        Some("alice")
    );
}

#[tokio::test]
async fn a_user_can_change_their_nickname_unless_disallowed() {
    let app = user_app(&[]).await;
    let b = Browser::new(&app.url);
    let csrf = b.get("/user").await.csrf();
    let r = b
        .post_form(
            "/user/nickname",
            &[
                ("_csrf", &csrf),
                ("token", "user-token-abc"),
                ("nickname", "  Bob  "),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("Nickname saved."));
    assert_eq!(
        app.state
            .users
            .get("user-token-abc")
            .expect("user")
            .nickname
            .as_deref(),
        Some("Bob")
    );
    let long = "x".repeat(81);
    let r = b
        .post_form(
            "/user/nickname",
            &[
                ("_csrf", &csrf),
                ("token", "user-token-abc"),
                ("nickname", &long),
            ],
        )
        .await;
    assert_eq!(r.status, 400);

    let off = user_app(&["--allow-nickname-changes", "false"]).await;
    let b = Browser::new(&off.url);
    let csrf = b.get("/user").await.csrf();
    let shown = b
        .post_form("/user", &[("_csrf", &csrf), ("token", "user-token-abc")])
        .await;
    assert!(!shown.body.contains("Change nickname"));
    let r = b
        .post_form(
            "/user/nickname",
            &[
                ("_csrf", &csrf),
                ("token", "user-token-abc"),
                ("nickname", "Eve"),
            ],
        )
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(
        off.state
            .users
            .get("user-token-abc")
            .expect("user")
            .nickname
            .as_deref(),
        Some("alice")
    );
}
