//! The info page's and self-service options: `SERVER_TITLE`, `SERVICE_INFO_PASSWORD` (the
//! page behind a password, JSON clients told so), `SHOW_TOKEN_COSTS` (US$ per family on `/`
//! and `/user`), `ALLOWED_MODEL_FAMILIES` shown, and the captcha link; `STATIC_SERVICE_INFO`
//! still wins over the password.

mod common;

use common::web::{Browser, ADMIN_KEY};
use llm_gatekeeper::users::{User, UserType};
use serde_json::Value;

#[tokio::test]
async fn the_title_and_costs_are_shown_on_both_pages() {
    let app = common::spawn(
        &[
            "--gatekeeper",
            "user_token",
            "--admin-key",
            ADMIN_KEY,
            "--trusted-proxies",
            "0",
            "--use-insecure-cookies",
            "true",
            "--server-title",
            "Lighthouse Proxy",
            "--show-token-costs",
            "true",
        ],
        &[("ALLOWED_MODEL_FAMILIES", "turbo,claude")],
    )
    .await;
    let mut u = User::new("cost-user".into(), UserType::Normal, Default::default(), 0);
    u.token_counts.insert("claude", 2_000_000);
    app.state.users.upsert(u);

    let b = Browser::new(&app.url);
    let p = b.get("/").await;
    assert_eq!(p.status, 200);
    assert!(
        p.body
            .contains("<title>Service info · Lighthouse Proxy</title>"),
        "{}",
        p.body
    );
    // claude: the original's rate, 8 US$ per million tokens.
    assert!(p.body.contains("$16.00"), "{}", p.body);
    assert!(p.body.contains("Not enabled on this proxy: ") && p.body.contains("gpt4o"));
    let j = b.get_with("/", &[("accept", "application/json")]).await;
    let v: Value = serde_json::from_str(&j.body).expect("JSON");
    assert_eq!(v["title"], "Lighthouse Proxy");
    let claude = v["modelFamilies"]
        .as_array()
        .expect("families")
        .iter()
        .find(|f| f["family"] == "claude")
        .cloned()
        .expect("claude listed");
    assert_eq!(claude["usageUsd"], 16.0);
    assert_eq!(claude["usdPerMillion"], 8.0);
    assert_eq!(claude["allowed"], true);

    let csrf = b.get("/user").await.csrf();
    let p = b
        .post_form("/user", &[("_csrf", &csrf), ("token", "cost-user")])
        .await;
    assert_eq!(p.status, 200);
    assert!(
        p.body.contains("Cost (US$)") && p.body.contains("$16.00"),
        "{}",
        p.body
    );
    assert!(p.body.contains("Lighthouse Proxy"));
}

#[tokio::test]
async fn costs_are_hidden_by_default() {
    let app = common::spawn(&[], &[]).await;
    let b = Browser::new(&app.url);
    let p = b.get("/").await;
    assert!(!p.body.contains("US$"));
    assert!(p.body.contains("llm-gatekeeper"));
    let j = b.get_with("/", &[("accept", "application/json")]).await;
    let v: Value = serde_json::from_str(&j.body).expect("JSON");
    assert!(v["modelFamilies"][0].get("usageUsd").is_none());
}

#[tokio::test]
async fn the_info_page_needs_the_password() {
    let app = common::spawn(
        &[
            "--use-insecure-cookies",
            "true",
            "--trusted-proxies",
            "0",
            "--service-info-password",
            "open sesame",
        ],
        &[],
    )
    .await;
    let b = Browser::new(&app.url);
    let p = b.get("/").await;
    assert_eq!(p.status, 200);
    assert!(p.body.contains("Unlock service info"));
    assert!(
        !p.body.contains("Endpoints"),
        "nothing is shown before unlocking"
    );
    let j = b.get_with("/", &[("accept", "application/json")]).await;
    assert_eq!(j.status, 401);
    assert!(j.body.contains("SERVICE_INFO_PASSWORD"));

    let csrf = p.csrf();
    let wrong = b
        .post_form("/", &[("_csrf", &csrf), ("password", "guess")])
        .await;
    assert_eq!(wrong.status, 403);
    assert!(wrong.body.contains("Incorrect password"));
    let ok = b
        .post_form("/", &[("_csrf", &csrf), ("password", "open sesame")])
        .await;
    assert_eq!(ok.status, 303);
    assert_eq!(ok.location(), Some("/"));
    let p = b.get("/").await;
    assert!(p.body.contains("Endpoints"), "{}", p.body);
    let j = b.get_with("/", &[("accept", "application/json")]).await;
    assert_eq!(j.status, 200);

    // Another browser is still locked out; a forged cookie does not help.
    let other = Browser::new(&app.url);
    other.set_cookie("info_unlock", "forged");
    assert!(other.get("/").await.body.contains("Unlock service info"));
}

#[tokio::test]
async fn static_service_info_still_wins() {
    let app = common::spawn(
        &[
            "--static-service-info",
            "true",
            "--service-info-password",
            "pw",
        ],
        &[],
    )
    .await;
    let p = Browser::new(&app.url).get("/").await;
    assert_eq!(p.status, 200);
    assert!(p.body.is_empty());
}

#[tokio::test]
async fn the_captcha_is_linked_when_enabled() {
    let app = common::spawn(
        &[
            "--gatekeeper",
            "user_token",
            "--admin-key",
            ADMIN_KEY,
            "--captcha-mode",
            "proof_of_work",
        ],
        &[],
    )
    .await;
    let b = Browser::new(&app.url);
    assert!(b
        .get("/")
        .await
        .body
        .contains("href=\"&#x2f;user&#x2f;captcha\""));
    assert!(b
        .get("/user")
        .await
        .body
        .contains("Request a temporary token"));
}
