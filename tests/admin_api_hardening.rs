//! The admin REST API against cross-site requests and odd credentials (issue 12): it reads only
//! `application/json` bodies (415 otherwise), a change signed in by cookie alone needs the admin
//! pages' CSRF token in `X-CSRF-Token` (the shape of a cross-site form post — cookie only,
//! `text/plain`, empty body — created a user), an empty `Authorization: Bearer ` does not hide an
//! `x-api-key`, the scheme is case-insensitive, and an unsupported method is a JSON 405.

mod common;

use common::web::{Browser, ADMIN_KEY};
use reqwest::{Client, Method};
use serde_json::Value;

async fn app() -> common::TestApp {
    common::spawn(
        &["--gatekeeper", "user_token", "--admin-key", ADMIN_KEY],
        &[],
    )
    .await
}

async fn status_and_json(req: reqwest::RequestBuilder) -> (u16, Value) {
    let r = req.send().await.expect("sent");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_cookie_only_cross_site_post_creates_no_user() {
    let app = app().await;
    let b = Browser::new(&app.url);
    assert_eq!(b.login(ADMIN_KEY).await.status, 303);
    let cookie = b.cookie_header();
    let c = Client::new();
    let users = format!("{}/admin/users", app.url);

    // What a cross-site <form enctype="text/plain"> or fetch(no-cors) can send.
    for (ct, body) in [
        ("text/plain", ""),
        ("text/plain", "{}"),
        ("application/x-www-form-urlencoded", "a=b"),
        ("multipart/form-data; boundary=x", "--x--\r\n"),
    ] {
        let (status, v) = status_and_json(
            c.post(&users)
                .header("cookie", &cookie)
                .header("content-type", ct)
                .body(body),
        )
        .await;
        assert_eq!(status, 403, "{ct}: {v}");
        assert!(
            v["error"]
                .as_str()
                .is_some_and(|m| m.contains("X-CSRF-Token") || m.contains("x-csrf-token")),
            "{v}"
        );
    }
    // JSON with the cookie alone is refused too; reads still work with the cookie.
    let (status, v) = status_and_json(
        c.post(&users)
            .header("cookie", &cookie)
            .header("content-type", "application/json")
            .body("{}"),
    )
    .await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(app.state.users.len(), 0, "no user was created");
    assert_eq!(b.get("/admin/users").await.status, 200);

    // With the admin pages' CSRF token (as a page's script would send it) the change is made.
    let csrf = b.get("/admin/manage/users/new").await.csrf();
    let (status, v) = status_and_json(
        c.post(&users)
            .header("cookie", &cookie)
            .header("x-csrf-token", &csrf)
            .header("content-type", "application/json")
            .body("{}"),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    // A wrong token is not enough.
    let (status, _) = status_and_json(
        c.post(&users)
            .header("cookie", &cookie)
            .header("x-csrf-token", "forged")
            .json(&serde_json::json!({})),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(app.state.users.len(), 1);
}

#[tokio::test]
async fn json_endpoints_read_only_json_bodies() {
    let app = app().await;
    let c = Client::new();
    let users = format!("{}/admin/users", app.url);
    for (ct, body) in [
        ("text/plain", ""),
        ("text/plain", "{\"type\":\"normal\"}"),
        ("application/x-www-form-urlencoded", "type=normal"),
    ] {
        let (status, v) = status_and_json(
            c.post(&users)
                .bearer_auth(ADMIN_KEY)
                .header("content-type", ct)
                .body(body),
        )
        .await;
        assert_eq!(status, 415, "{ct}: {v}");
        assert!(
            v["error"]
                .as_str()
                .is_some_and(|m| m.contains("application/json")),
            "{v}"
        );
    }
    // A JSON body without a Content-Type is refused the same way.
    let (status, _) =
        status_and_json(c.put(&users).bearer_auth(ADMIN_KEY).body("{\"users\":[]}")).await;
    assert_eq!(status, 415);
    assert_eq!(app.state.users.len(), 0);
    // Scripts are unaffected: a bearer POST with no body, or with JSON, creates a user.
    let (status, v) = status_and_json(c.post(&users).bearer_auth(ADMIN_KEY)).await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = status_and_json(
        c.post(&users)
            .bearer_auth(ADMIN_KEY)
            .json(&serde_json::json!({"type": "normal"})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test]
async fn empty_bearer_does_not_hide_x_api_key_and_the_scheme_is_case_insensitive() {
    let app = app().await;
    let c = Client::new();
    let users = format!("{}/admin/users", app.url);
    let (status, v) = status_and_json(
        c.get(&users)
            .header("authorization", "Bearer ")
            .header("x-api-key", ADMIN_KEY),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    for scheme in ["BEARER", "bearer", "BeArEr"] {
        let (status, v) = status_and_json(
            c.get(&users)
                .header("authorization", format!("{scheme} {ADMIN_KEY}")),
        )
        .await;
        assert_eq!(status, 200, "{scheme}: {v}");
    }
}

#[tokio::test]
async fn an_unsupported_method_is_a_json_405() {
    let app = app().await;
    let c = Client::new();
    for path in ["/admin/users", "/admin/users/some-token"] {
        let r = c
            .request(Method::PATCH, format!("{}{path}", app.url))
            .bearer_auth(ADMIN_KEY)
            .json(&serde_json::json!({}))
            .send()
            .await
            .expect("sent");
        assert_eq!(r.status(), 405, "{path}");
        assert!(r.headers().contains_key("allow"), "{path}");
        let v: Value = r.json().await.expect("a JSON body");
        assert!(v["error"].as_str().is_some(), "{v}");
    }
    // Without credentials the gatekeeper answers first.
    let r = c
        .request(Method::PATCH, format!("{}/admin/users", app.url))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 401);
}
