//! The admin web UI over HTTP: sign-in, session cookies and their flags, CSRF on every form,
//! redirects for browsers without a session, the lockout and whitelist, and the user lifecycle
//! (create, edit, disable, re-enable, import, export).

mod common;

use common::web::{field_value, Browser, ADMIN_KEY};
use llm_gatekeeper::users::UserType;

async fn app(extra: &[&str]) -> common::TestApp {
    let mut args = vec!["--gatekeeper", "user_token", "--admin-key", ADMIN_KEY];
    args.extend_from_slice(extra);
    common::spawn(&args, &[("TOKEN_QUOTA_TURBO", "1000")]).await
}

fn session_cookie(set_cookies: &[String]) -> String {
    set_cookies
        .iter()
        .find(|c| c.starts_with("gk_session="))
        .cloned()
        .expect("a session cookie is set")
}

#[tokio::test]
async fn sign_in_sets_a_secure_httponly_strict_session_cookie() {
    let app = app(&[]).await;
    let b = Browser::new(&app.url);
    let r = b.login(ADMIN_KEY).await;
    assert_eq!(r.status, 303);
    assert_eq!(r.location(), Some("/admin/manage/users"));
    let c = session_cookie(&r.set_cookies());
    assert!(c.contains("HttpOnly"), "{c}");
    assert!(c.contains("SameSite=Strict"), "{c}");
    assert!(c.contains("; Secure"), "{c}");
    assert!(c.contains("Max-Age="), "sessions expire: {c}");
    assert!(c.contains("Path=/admin;"), "only admin routes see it: {c}");
    let page = b.get("/admin/manage/users").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("admin-key"));
}

#[tokio::test]
async fn insecure_cookies_setting_drops_the_secure_flag() {
    let app = app(&["--use-insecure-cookies", "true"]).await;
    let b = Browser::new(&app.url);
    let r = b.login(ADMIN_KEY).await;
    let c = session_cookie(&r.set_cookies());
    assert!(!c.contains("Secure"), "{c}");
    assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict"));
}

#[tokio::test]
async fn wrong_key_shows_the_form_again_without_echoing_the_key() {
    let app = app(&[]).await;
    let b = Browser::new(&app.url);
    let r = b.login("wrong-key-that-must-not-be-echoed").await;
    assert_eq!(r.status, 401);
    assert!(r.body.contains("Wrong admin key"));
    assert!(!r.body.contains("wrong-key-that-must-not-be-echoed"));
    assert!(r.body.contains("name=\"key\""), "the form is shown again");
    assert!(r
        .set_cookies()
        .iter()
        .all(|c| !c.starts_with("gk_session=")));
    assert_eq!(b.get("/admin/manage/users").await.status, 303);
}

#[tokio::test]
async fn browsers_without_a_session_are_sent_to_sign_in_and_api_clients_get_json() {
    let app = app(&[]).await;
    let b = Browser::new(&app.url);
    for path in [
        "/admin",
        "/admin/manage/users",
        "/admin/manage/abuse",
        "/admin/manage/export",
        "/admin/manage/keys",
    ] {
        let r = b.get(path).await;
        assert_eq!(r.status, 303, "{path}");
        assert_eq!(r.location(), Some("/admin/login"), "{path}");
    }
    let api = b.get("/admin/users").await;
    assert_eq!(api.status, 401);
    assert!(api.body.starts_with('{'), "JSON error: {}", api.body);
    // The session cookie also works for the REST API.
    b.login(ADMIN_KEY).await;
    assert_eq!(b.get("/admin/users").await.status, 200);
}

#[tokio::test]
async fn sign_out_ends_the_session_even_for_a_copied_cookie() {
    let app = app(&[]).await;
    let b = Browser::new(&app.url);
    b.login(ADMIN_KEY).await;
    let stolen = b.cookie_header();
    let page = b.get("/admin/manage/users").await;
    let csrf = page.csrf();
    let out = b.post_form("/admin/logout", &[("_csrf", &csrf)]).await;
    assert_eq!(out.status, 303);
    assert!(out.location().unwrap_or("").starts_with("/admin/login"));
    assert!(out
        .set_cookies()
        .iter()
        .any(|c| c.starts_with("gk_session=;") && c.contains("Max-Age=0")));
    assert_eq!(b.get("/admin/manage/users").await.status, 303);
    let replay = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
        .get(format!("{}/admin/manage/users", app.url))
        .header("cookie", stolen)
        .send()
        .await
        .expect("request");
    assert_eq!(
        replay.status(),
        303,
        "a signed-out session cannot be replayed"
    );
}

#[tokio::test]
async fn forged_or_tampered_session_cookies_are_refused() {
    let app = app(&[]).await;
    let b = Browser::new(&app.url);
    b.set_cookie("gk_session", "AAAA.BBBB");
    assert_eq!(b.get("/admin/manage/users").await.status, 303);
    let b2 = Browser::new(&app.url);
    b2.login(ADMIN_KEY).await;
    let real = b2
        .cookies
        .lock()
        .expect("lock")
        .get("gk_session")
        .cloned()
        .expect("cookie");
    let (id, _sig) = real.split_once('.').expect("signed");
    b.set_cookie("gk_session", &format!("{id}.{}", "x".repeat(43)));
    assert_eq!(b.get("/admin/manage/users").await.status, 303);
}

#[tokio::test]
async fn forms_without_the_right_csrf_token_change_nothing() {
    let app = app(&[]).await;
    let b = Browser::new(&app.url);
    // The sign-in form itself needs its token.
    let no_token = b.post_form("/admin/login", &[("key", ADMIN_KEY)]).await;
    assert_eq!(no_token.status, 403);
    assert!(no_token
        .set_cookies()
        .iter()
        .all(|c| !c.starts_with("gk_session=")));
    b.login(ADMIN_KEY).await;
    let before = app.state.users.len();
    let missing = b
        .post_form("/admin/manage/users/new", &[("type", "normal")])
        .await;
    assert_eq!(missing.status, 403);
    assert!(missing.body.contains("Reload the page"));
    let wrong = b
        .post_form(
            "/admin/manage/users/new",
            &[("type", "normal"), ("_csrf", "not-the-token")],
        )
        .await;
    assert_eq!(wrong.status, 403);
    assert_eq!(app.state.users.len(), before);
    // A token rendered for another browser does not work here either.
    let other = Browser::new(&app.url);
    other.login(ADMIN_KEY).await;
    let foreign = other.get("/admin/manage/users/new").await.csrf();
    let r = b
        .post_form(
            "/admin/manage/users/new",
            &[("type", "normal"), ("_csrf", &foreign)],
        )
        .await;
    assert_eq!(r.status, 403);
    let logout = b.post_form("/admin/logout", &[]).await;
    assert_eq!(logout.status, 403, "sign-out needs the token too");
    assert_eq!(app.state.users.len(), before);
}

#[tokio::test]
async fn repeated_wrong_keys_lock_the_address_out_even_with_the_right_key() {
    let app = app(&["--brute-force-max-failed-attempts", "2"]).await;
    let b = Browser::new(&app.url);
    assert_eq!(b.login("nope-1").await.status, 401);
    assert_eq!(b.login("nope-2").await.status, 401);
    let r = b.login(ADMIN_KEY).await;
    assert_eq!(r.status, 429);
    assert!(r.body.contains("Try again in"));
    assert_eq!(b.get("/admin/manage/users").await.status, 303);
}

#[tokio::test]
async fn the_admin_whitelist_covers_the_sign_in_page() {
    let app = app(&["--admin-whitelist", "10.0.0.0/8"]).await;
    let b = Browser::new(&app.url);
    assert_eq!(b.get("/admin/login").await.status, 403);
    assert_eq!(b.get("/admin/manage/users").await.status, 403);
}

#[tokio::test]
async fn user_lifecycle_through_the_forms() {
    let app = app(&[]).await;
    let b = Browser::new(&app.url);
    b.login(ADMIN_KEY).await;

    // Create a temporary user with an expiry and a limit.
    let form = b.get("/admin/manage/users/new").await;
    assert!(
        form.body
            .contains("name=\"limit.turbo\" type=\"number\" min=\"0\" value=\"1000\""),
        "defaults prefilled"
    );
    let csrf = form.csrf();
    let bad = b
        .post_form(
            "/admin/manage/users/new",
            &[
                ("_csrf", &csrf),
                ("type", "temporary"),
                ("nickname", "temp"),
            ],
        )
        .await;
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("temporary user needs an expiry"));
    assert!(
        bad.body.contains("value=\"temp\""),
        "entered values are kept"
    );
    let created = b
        .post_form(
            "/admin/manage/users/new",
            &[
                ("_csrf", &csrf),
                ("type", "temporary"),
                ("nickname", "temp"),
                ("expiresInHours", "24"),
                ("limit.turbo", "500"),
            ],
        )
        .await;
    assert_eq!(created.status, 303);
    let href = created
        .location()
        .expect("redirect to the user")
        .to_string();
    let token = href
        .trim_start_matches("/admin/manage/users/")
        .split('?')
        .next()
        .expect("token")
        .to_string();
    let u = app.state.users.get(&token).expect("created");
    assert_eq!(u.kind, UserType::Temporary);
    assert_eq!(u.nickname.as_deref(), Some("temp"));
    assert_eq!(u.token_limits.get("turbo"), Some(&500));
    assert!(u.expires_at.is_some());

    // Detail page, then edit.
    let detail = b.get(&href).await;
    assert_eq!(detail.status, 200);
    assert!(detail.body.contains("User created."));
    assert!(detail.body.contains(&token));
    let csrf = detail.csrf();
    let action = format!("/admin/manage/users/{token}");
    let saved = b
        .post_form(
            &action,
            &[
                ("_csrf", &csrf),
                ("type", "special"),
                ("nickname", "vip"),
                ("maxIps", "3"),
                ("adminNote", "friend"),
                ("limit.turbo", "0"),
                ("newFamily", "claude"),
                ("newLimit", "42"),
            ],
        )
        .await;
    assert_eq!(saved.status, 303, "{}", saved.body);
    let u = app.state.users.get(&token).expect("user");
    assert_eq!(u.kind, UserType::Special);
    assert_eq!(u.nickname.as_deref(), Some("vip"));
    assert_eq!(u.max_ips, Some(3));
    assert_eq!(u.admin_note.as_deref(), Some("friend"));
    assert_eq!(u.token_limits.get("claude"), Some(&42));
    assert_eq!(u.expires_at, None, "only temporary users expire");
    let invalid = b
        .post_form(
            &action,
            &[("_csrf", &csrf), ("type", "normal"), ("maxIps", "lots")],
        )
        .await;
    assert_eq!(invalid.status, 400);
    assert!(invalid.body.contains("maxIps"));
    assert_eq!(
        app.state.users.get(&token).expect("user").kind,
        UserType::Special,
        "nothing changed"
    );

    // Disable with a reason, then re-enable.
    let r = b
        .post_form(
            &format!("{action}/disable"),
            &[("_csrf", &csrf), ("reason", "shared publicly")],
        )
        .await;
    assert_eq!(r.status, 303);
    let u = app.state.users.get(&token).expect("user");
    assert!(u.is_disabled());
    assert_eq!(u.disabled_reason.as_deref(), Some("shared publicly"));
    let list = b.get("/admin/manage/users?status=disabled").await;
    assert!(list.body.contains(&token) && list.body.contains("badge disabled"));
    let r = b
        .post_form(&format!("{action}/enable"), &[("_csrf", &csrf)])
        .await;
    assert_eq!(r.status, 303);
    assert!(!app.state.users.get(&token).expect("user").is_disabled());

    // Clear IPs and reset usage.
    app.state.users.update(&token, |u| {
        u.ip = ["1.2.3.4".to_string()].into();
        u.token_counts.insert("claude", 40);
    });
    assert_eq!(
        b.post_form(&format!("{action}/clear-ips"), &[("_csrf", &csrf)])
            .await
            .status,
        303
    );
    assert_eq!(
        b.post_form(&format!("{action}/reset-usage"), &[("_csrf", &csrf)])
            .await
            .status,
        303
    );
    let u = app.state.users.get(&token).expect("user");
    assert!(u.ip.is_empty());
    assert_eq!(u.token_counts.get("claude"), Some(&0));
    // Refresh quota: each family with a default quota (TOKEN_QUOTA_TURBO=1000) allows that many
    // more tokens than used so far.
    app.state.users.update(&token, |u| {
        u.token_counts.insert("turbo", 300);
    });
    assert_eq!(
        b.post_form(&format!("{action}/refresh-quota"), &[("_csrf", &csrf)])
            .await
            .status,
        303
    );
    assert_eq!(
        app.state
            .users
            .get(&token)
            .expect("user")
            .token_limits
            .get("turbo"),
        Some(&1300)
    );
    // Unknown actions and users are refused.
    assert_eq!(
        b.post_form(&format!("{action}/explode"), &[("_csrf", &csrf)])
            .await
            .status,
        404
    );
    assert_eq!(b.get("/admin/manage/users/no-such-user").await.status, 404);
}

#[tokio::test]
async fn users_list_filters_sorts_and_pages() {
    let app = app(&[]).await;
    let users: Vec<_> = (0..120)
        .map(|i| {
            let mut u = llm_gatekeeper::users::User::new(
                format!("tok-{i:04}"),
                UserType::Normal,
                Default::default(),
                i,
            );
            u.nickname = Some(format!("nick{i}").into());
            u
        })
        .collect();
    app.state.users.load(users);
    let b = Browser::new(&app.url);
    b.login(ADMIN_KEY).await;
    let p = b.get("/admin/manage/users?sort=token&dir=asc").await;
    assert!(
        p.body.contains("tok-0000") && p.body.contains("tok-0049") && !p.body.contains("tok-0050")
    );
    assert!(p.body.contains("page 1 of 3"));
    let p2 = b.get("/admin/manage/users?sort=token&dir=asc&page=3").await;
    assert!(p2.body.contains("tok-0119") && !p2.body.contains("tok-0000"));
    app.state.users.update("tok-0000", |u| {
        u.nickname = Some("<script>alert(1)</script>".into())
    });
    let p = b.get("/admin/manage/users?sort=token&dir=asc").await;
    assert!(
        !p.body.contains("<script>alert(1)"),
        "nicknames are escaped"
    );
    assert!(p.body.contains("&lt;script&gt;alert(1)"));
    let f = b.get("/admin/manage/users?q=NICK11").await;
    assert!(
        f.body.contains("tok-0011") && f.body.contains("tok-0119") && !f.body.contains("tok-0012")
    );
}

#[tokio::test]
async fn import_previews_then_applies_all_or_nothing_and_export_round_trips() {
    let app = app(&[]).await;
    app.state.users.load(vec![llm_gatekeeper::users::User::new(
        "existing".into(),
        UserType::Normal,
        Default::default(),
        1,
    )]);
    let b = Browser::new(&app.url);
    b.login(ADMIN_KEY).await;
    let csrf = b.get("/admin/manage/import").await.csrf();

    // Errors: nothing is offered for applying, nothing changes.
    let bad = br#"{"users":[{"token":"new-1"},{"token":"new-2","promptCount":"many"}]}"#;
    let r = b
        .post_multipart(
            "/admin/manage/import",
            &[("_csrf", &csrf)],
            ("file", "users.json", bad),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("promptCount"), "{}", r.body);
    assert!(!r.body.contains("Apply import"));
    assert!(!app.state.users.contains("new-1"));

    // Missing CSRF.
    let r = b
        .post_multipart("/admin/manage/import", &[], ("file", "users.json", b"[]"))
        .await;
    assert_eq!(r.status, 403);

    // A bare array: preview, then apply.
    let good = br#"[{"token":"new-1","nickname":"one"},{"token":"existing","promptCount":7}]"#;
    let r = b
        .post_multipart(
            "/admin/manage/import",
            &[("_csrf", &csrf)],
            ("file", "users.json", good),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("New users</dt><dd>1</dd>"), "{}", r.body);
    assert!(r.body.contains("Updated users</dt><dd>1</dd>"));
    assert!(
        !app.state.users.contains("new-1"),
        "a preview changes nothing"
    );
    let id = field_value(&r.body, "id").expect("an import id");
    let applied = b
        .post_form(
            "/admin/manage/import/apply",
            &[("_csrf", &csrf), ("id", &id)],
        )
        .await;
    assert_eq!(applied.status, 200);
    assert!(applied.body.contains("Imported 2 users (1 new)"));
    assert_eq!(
        app.state.users.get("existing").expect("user").prompt_count,
        7
    );
    assert_eq!(
        app.state
            .users
            .get("new-1")
            .expect("user")
            .nickname
            .as_deref(),
        Some("one")
    );
    // The same preview cannot be applied twice.
    let again = b
        .post_form(
            "/admin/manage/import/apply",
            &[("_csrf", &csrf), ("id", &id)],
        )
        .await;
    assert_eq!(again.status, 410);

    // Export downloads {"users":[...]} that imports again.
    let export = b.get("/admin/manage/export").await;
    assert_eq!(export.status, 200);
    assert!(export
        .headers
        .get("content-disposition")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .starts_with("attachment"));
    let v: serde_json::Value = serde_json::from_str(&export.body).expect("JSON");
    assert_eq!(v["users"].as_array().map(Vec::len), Some(2));
    let r = b
        .post_multipart(
            "/admin/manage/import",
            &[("_csrf", &csrf)],
            ("file", "export.json", export.body.as_bytes()),
        )
        .await;
    assert!(r.body.contains("Updated users</dt><dd>2</dd>"));
}

#[tokio::test]
async fn anti_abuse_page_lists_locked_addresses() {
    let app = app(&["--ip-blacklist", "203.0.113.0/24"]).await;
    app.state
        .lockout
        .record_failure("198.51.100.7".parse().expect("ip"));
    for _ in 0..10 {
        app.state
            .lockout
            .record_failure("198.51.100.9".parse().expect("ip"));
    }
    let b = Browser::new(&app.url);
    b.login(ADMIN_KEY).await;
    let p = b.get("/admin/manage/abuse").await;
    assert_eq!(p.status, 200);
    assert!(p.body.contains("203.0.113.0"), "the blacklist is shown");
    assert!(p.body.contains("198.51.100.9"));
    assert!(
        !p.body.contains("198.51.100.7"),
        "one failure is not a lockout"
    );
    let csrf = p.csrf();
    let r = b
        .post_form(
            "/admin/manage/abuse/unlock",
            &[("_csrf", &csrf), ("ip", "198.51.100.9")],
        )
        .await;
    assert_eq!(r.status, 303);
    assert!(app
        .state
        .lockout
        .locked_for("198.51.100.9".parse().expect("ip"))
        .is_none());
}

/// A fake upstream that only counts what reaches it and answers 503 (a check that says
/// nothing about the key: states set by the test stay).
async fn counting_upstream() -> (std::sync::Arc<std::sync::atomic::AtomicUsize>, String) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (hits, url)
}

#[tokio::test]
async fn keys_page_shows_every_key_by_fingerprint_and_rechecks_with_a_csrf_token() {
    use llm_gatekeeper::providers::Provider;
    use llm_gatekeeper::proxy::keys::{CheckResult, KeyStatus};
    use std::sync::atomic::Ordering;

    const GOOD: &str = "sk-keys-page-good-secret-0001";
    const BAD: &str = "sk-keys-page-revoked-secret-02";
    const CLAUDE: &str = "sk-ant-keys-page-secret-0003";
    let (hits, url) = counting_upstream().await;
    let keys = format!("{GOOD},{BAD}");
    let app = app(&[
        "--check-keys",
        "true",
        "--openai-key",
        &keys,
        "--openai-base-url",
        &url,
        "--anthropic-key",
        CLAUDE,
        "--anthropic-base-url",
        &url,
        "--key-check-interval-ms",
        "1",
    ])
    .await;
    let openai = &app.state.upstreams.provider(Provider::OpenAi).keys;
    openai.apply_check(
        0,
        CheckResult {
            families: Some(vec!["gpt4o".into(), "turbo".into()]),
            detail: Some("checked by the test".into()),
            ..CheckResult::status(KeyStatus::Working)
        },
    );
    openai.mark_invalid(1, 401);

    let b = Browser::new(&app.url);
    b.login(ADMIN_KEY).await;
    let p = b.get("/admin/manage/keys").await;
    assert_eq!(p.status, 200);
    assert!(p.body.contains("href=\"/admin/manage/keys\""), "in the nav");
    for v in openai.views() {
        assert!(p.body.contains(&v.fingerprint), "{}", p.body);
    }
    assert!(p.body.contains("working") && p.body.contains("revoked"));
    assert!(p.body.contains("gpt4o, turbo"));
    assert!(p.body.contains("checked by the test"));
    assert!(p.body.contains("OPENAI_KEY") && p.body.contains("ANTHROPIC_KEY"));
    for secret in [GOOD, BAD, CLAUDE] {
        assert!(!p.body.contains(secret), "a key appears in full");
    }

    // Without the CSRF token nothing happens.
    let startup = hits.load(Ordering::SeqCst);
    let r = b
        .post_form("/admin/manage/keys/recheck", &[("provider", "openai")])
        .await;
    assert_eq!(r.status, 403);

    // With it: the checkers run again (the same action as POST /admin/keys/recheck).
    let csrf = p.csrf();
    let r = b
        .post_form(
            "/admin/manage/keys/recheck",
            &[("_csrf", &csrf), ("provider", "openai")],
        )
        .await;
    assert_eq!(r.status, 303);
    assert_eq!(
        r.location(),
        Some("/admin/manage/keys?rechecking=openai"),
        "{}",
        r.body
    );
    // Every key was probed at startup, and the OpenAI keys again after the recheck: both
    // waits are bounded, on what the fake received.
    common::cloud::until(20, "the startup checks", || {
        hits.load(Ordering::SeqCst) >= startup.max(3)
    })
    .await;
    let before = hits.load(Ordering::SeqCst);
    let r = b
        .post_form(
            "/admin/manage/keys/recheck",
            &[("_csrf", &csrf), ("provider", "openai")],
        )
        .await;
    assert_eq!(r.status, 303);
    common::cloud::until(20, "the recheck's probes", || {
        hits.load(Ordering::SeqCst) >= before + 2
    })
    .await;
    let notice = b.get("/admin/manage/keys?rechecking=openai").await;
    assert!(notice.body.contains("Rechecking the keys of: openai"));
    let r = b
        .post_form(
            "/admin/manage/keys/recheck",
            &[("_csrf", &csrf), ("provider", "nope")],
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("Unknown provider"));
}
