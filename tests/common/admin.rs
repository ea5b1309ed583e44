//! Helpers for the user-token and `/admin/users` tests: a server in `GATEKEEPER=user_token`
//! mode, admin requests with the admin key, and a proxied request that tells whether a token
//! was admitted.
#![allow(dead_code)]

use reqwest::{Client, Method, RequestBuilder, StatusCode};
use serde_json::Value;

use super::TestApp;

pub const ADMIN_KEY: &str = "test-admin-key-0123456789";

/// `GATEKEEPER=user_token` with [`ADMIN_KEY`], X-Forwarded-For ignored (`TRUSTED_PROXIES=0`),
/// plus `extra` flags.
pub async fn user_token_app(extra: &[&str]) -> TestApp {
    user_token_app_with(extra, &[]).await
}

/// Like [`user_token_app`] with extra variables (e.g. `TOKEN_QUOTA_*`).
pub async fn user_token_app_with(extra: &[&str], vars: &[(&str, &str)]) -> TestApp {
    let mut args = vec![
        "--gatekeeper",
        "user_token",
        "--admin-key",
        ADMIN_KEY,
        "--trusted-proxies",
        "0",
    ];
    args.extend_from_slice(extra);
    super::spawn(&args, vars).await
}

/// An admin request with `Authorization: Bearer ADMIN_KEY`.
pub fn admin(client: &Client, app: &TestApp, method: Method, path: &str) -> RequestBuilder {
    client
        .request(method, format!("{}{}", app.url, path))
        .bearer_auth(ADMIN_KEY)
}

/// Sends a request and returns the status and the JSON body (`Value::Null` if not JSON).
pub async fn send(req: RequestBuilder) -> (StatusCode, Value) {
    let resp = req.send().await.expect("request is sent");
    let status = resp.status();
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

/// `POST /admin/users` with `body`; returns the new token.
pub async fn create_user(client: &Client, app: &TestApp, body: Value) -> String {
    let (status, v) = send(admin(client, app, Method::POST, "/admin/users").json(&body)).await;
    assert_eq!(status, 200, "create user: {v}");
    v["token"].as_str().expect("token in response").to_string()
}

/// `PUT /admin/users/{token}` with `body`; returns status and body.
pub async fn put_user(
    client: &Client,
    app: &TestApp,
    token: &str,
    body: Value,
) -> (StatusCode, Value) {
    send(admin(client, app, Method::PUT, &format!("/admin/users/{token}")).json(&body)).await
}

/// `GET /admin/users/{token}`.
pub async fn get_user(client: &Client, app: &TestApp, token: &str) -> (StatusCode, Value) {
    send(admin(
        client,
        app,
        Method::GET,
        &format!("/admin/users/{token}"),
    ))
    .await
}

/// A proxied request (`GET /v1/models`) with `token`; returns status and body. With no
/// upstream configured an admitted request fails with some status other than 401/403.
pub async fn proxied(client: &Client, app: &TestApp, token: &str) -> (StatusCode, Value) {
    send(
        client
            .get(format!("{}/v1/models", app.url))
            .bearer_auth(token),
    )
    .await
}

/// True when the gatekeeper let the request through.
pub fn admitted(status: StatusCode) -> bool {
    status != StatusCode::UNAUTHORIZED
        && status != StatusCode::FORBIDDEN
        && status != StatusCode::TOO_MANY_REQUESTS
}

/// The error message of a proxy-route error body.
pub fn proxy_message(v: &Value) -> String {
    v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}
