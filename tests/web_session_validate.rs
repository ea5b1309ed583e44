//! `ADMIN_SESSION_VALIDATE_URL`: the proxy asks an external session service about the
//! request's `Cookie` and `X-Session-Token`; only `200` with `{"valid":true,"user":"…"}`
//! admits. Refused (fail closed): `valid:false`, 401, timeout, unreachable, malformed bodies.

mod common;

use common::web::{fake_session_service, unreachable_url, Browser, ADMIN_KEY};

async fn app(validate_url: &str) -> common::TestApp {
    common::spawn(
        &[
            "--gatekeeper",
            "user_token",
            "--admin-key",
            ADMIN_KEY,
            "--admin-session-validate-url",
            validate_url,
        ],
        &[],
    )
    .await
}

#[tokio::test]
async fn a_valid_session_is_admitted_to_the_api_and_the_pages() {
    let (url, seen) = fake_session_service().await;
    let app = app(&url).await;
    let b = Browser::new(&app.url);
    let api = b
        .get_with("/admin/users", &[("x-session-token", "good")])
        .await;
    assert_eq!(api.status, 200, "{}", api.body);
    assert_eq!(seen.lock().expect("lock").token.as_deref(), Some("good"));

    // A browser with the session service's cookie sees the pages, signed in as its user.
    b.set_cookie("session", "good");
    b.set_cookie("gk_csrf", "A".repeat(43).as_str());
    let page = b.get("/admin/manage/users").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("alice"));
    let forwarded = seen
        .lock()
        .expect("lock")
        .cookie
        .clone()
        .expect("cookie forwarded");
    assert_eq!(
        forwarded, "session=good",
        "our own cookies are not forwarded"
    );

    // Its forms work with the CSRF token rendered for it.
    let csrf = b.get("/admin/manage/users/new").await.csrf();
    let r = b
        .post_form(
            "/admin/manage/users/new",
            &[("_csrf", &csrf), ("type", "normal")],
        )
        .await;
    assert_eq!(r.status, 303);
    assert_eq!(app.state.users.len(), 1);
}

#[tokio::test]
async fn invalid_sessions_are_refused() {
    let (url, _seen) = fake_session_service().await;
    let app = app(&url).await;
    let b = Browser::new(&app.url);
    for token in ["bad", "falsy", "malformed", "nouser", "stringy"] {
        let r = b
            .get_with("/admin/users", &[("x-session-token", token)])
            .await;
        assert_eq!(r.status, 401, "{token} is refused");
        assert!(r.body.starts_with('{'));
    }
    b.set_cookie("session", "falsy");
    let page = b.get("/admin/manage/users").await;
    assert_eq!(page.status, 303);
    assert_eq!(page.location(), Some("/admin/login"));
    // The admin key still works beside the session service.
    let r = Browser::new(&app.url)
        .get_with(
            "/admin/users",
            &[("authorization", &format!("Bearer {ADMIN_KEY}"))],
        )
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn a_session_service_that_takes_too_long_is_a_refusal() {
    let (url, _seen) = fake_session_service().await;
    let app = app(&url).await;
    let started = std::time::Instant::now();
    let r = Browser::new(&app.url)
        .get_with("/admin/users", &[("x-session-token", "slow")])
        .await;
    assert_eq!(r.status, 401);
    // The service answers after 30 s; the proxy gave up long before (its limit is 5 s).
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
}

#[tokio::test]
async fn an_unreachable_session_service_is_a_refusal() {
    let (url, _held) = unreachable_url();
    let app = app(&url).await;
    let b = Browser::new(&app.url);
    let r = b
        .get_with("/admin/users", &[("x-session-token", "good")])
        .await;
    assert_eq!(r.status, 401);
    b.set_cookie("session", "good");
    assert_eq!(b.get("/admin/manage/users").await.status, 303);
}

#[tokio::test]
async fn without_any_session_the_service_is_not_called() {
    let (url, seen) = fake_session_service().await;
    let app = app(&url).await;
    let r = Browser::new(&app.url).get("/admin/users").await;
    assert_eq!(r.status, 401);
    assert_eq!(seen.lock().expect("lock").calls, 0);
}
