//! The proxied routes' straight line (`app::Front`, issue 18): a `POST` to a proxied route at a
//! fixed path skips the router and its middleware, so these tests check that a client cannot
//! tell the difference. The same gate decides on both paths (missing and wrong credentials,
//! `IP_BLACKLIST`, a spoofed `X-Forwarded-For`, the lockout shared with the router's routes), a
//! client key in the query still leaves the URL before anything is forwarded, and another
//! method on the same path still gets the router's JSON 405.

mod common;

use common::admin::{create_user, user_token_app, ADMIN_KEY};
use common::client_from;
use common::upstream::FakeUpstream;
use reqwest::{Client, Response, StatusCode};
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";

fn chat_body() -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
}

/// A `POST` on the straight line, with an optional bearer token and `X-Forwarded-For`.
async fn chat(c: &Client, url: &str, token: Option<&str>, xff: Option<&str>) -> Response {
    let mut req = c.post(format!("{url}{CHAT}")).json(&chat_body());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(x) = xff {
        req = req.header("x-forwarded-for", x);
    }
    req.send().await.expect("sent")
}

/// A `GET` of the model list, which takes the router.
async fn models(c: &Client, url: &str, token: Option<&str>) -> Response {
    let mut req = c.get(format!("{url}/v1/models"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.expect("sent")
}

async fn status_and_json(resp: Response) -> (StatusCode, Value) {
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn app_with_upstream(extra: &[&str]) -> (common::TestApp, FakeUpstream) {
    let fake = FakeUpstream::start().await;
    let mut args = vec![
        "--openai-key",
        "sk-operator-key",
        "--openai-base-url",
        fake.url.as_str(),
    ];
    args.extend_from_slice(extra);
    let app = user_token_app(&args).await;
    (app, fake)
}

#[tokio::test]
async fn the_straight_line_and_the_router_refuse_alike() {
    let (app, fake) = app_with_upstream(&["--ip-blacklist", "127.0.0.3"]).await;
    let ok = client_from("127.0.0.2");
    let banned = client_from("127.0.0.3");
    let token = create_user(&ok, &app, json!({})).await;

    // No credential, and a token nobody has: the same 401 on both paths.
    for token in [None, Some("not-a-user-token")] {
        let (s1, v1) = status_and_json(chat(&ok, &app.url, token, None).await).await;
        let (s2, v2) = status_and_json(models(&ok, &app.url, token).await).await;
        assert_eq!(s1, StatusCode::UNAUTHORIZED, "{v1}");
        assert_eq!((s1, &v1["error"]["message"]), (s2, &v2["error"]["message"]));
    }
    // A blocked address, whatever its token.
    let (s1, v1) = status_and_json(chat(&banned, &app.url, Some(&token), None).await).await;
    let (s2, v2) = status_and_json(models(&banned, &app.url, Some(&token)).await).await;
    assert_eq!(s1, StatusCode::FORBIDDEN, "{v1}");
    assert!(v1["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("IP_BLACKLIST")));
    assert_eq!((s1, &v1["error"]["message"]), (s2, &v2["error"]["message"]));
    // `X-Forwarded-For` is not believed without trusted proxies: a blocked address cannot
    // hide behind it, and an allowed one is not blocked by naming a blocked one.
    let (s, v) =
        status_and_json(chat(&banned, &app.url, Some(&token), Some("127.0.0.2")).await).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) = status_and_json(chat(&ok, &app.url, Some(&token), Some("127.0.0.3")).await).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Nothing refused reached the upstream; the one admitted request did, with the
    // operator's key and not the user's token.
    assert_eq!(fake.request_count(), 1);
    assert_eq!(
        fake.last_request().credential().as_deref(),
        Some("sk-operator-key")
    );
}

#[tokio::test]
async fn failures_on_the_straight_line_lock_the_address_out_of_the_router_too() {
    let (app, fake) = app_with_upstream(&["--brute-force-max-failed-attempts", "2"]).await;
    let guesser = client_from("127.0.0.2");
    let other = client_from("127.0.0.3");
    let token = create_user(&other, &app, json!({})).await;
    for guess in ["guess-1", "guess-2"] {
        assert_eq!(
            chat(&guesser, &app.url, Some(guess), None).await.status(),
            401
        );
    }
    // Locked out now, even with a valid token, on both paths.
    let resp = chat(&guesser, &app.url, Some(&token), None).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers().contains_key("retry-after"));
    assert_eq!(
        models(&guesser, &app.url, Some(&token)).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // Another address is not.
    assert_eq!(
        chat(&other, &app.url, Some(&token), None).await.status(),
        200
    );
    assert_eq!(fake.request_count(), 1);
}

#[tokio::test]
async fn a_key_in_the_query_is_moved_out_of_the_url_before_forwarding() {
    let (app, fake) = app_with_upstream(&[]).await;
    let c = client_from("127.0.0.2");
    let token = create_user(&c, &app, json!({})).await;
    let resp = c
        .post(format!("{}{CHAT}?key={token}&trace=1", app.url))
        .json(&chat_body())
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200, "the query key is the credential");
    let seen = fake.last_request();
    assert_eq!(seen.path, CHAT);
    assert_eq!(
        seen.query.as_deref(),
        Some("trace=1"),
        "the key left the URL"
    );
    assert_eq!(seen.credential().as_deref(), Some("sk-operator-key"));
    assert!(
        !format!("{:?}", seen.headers).contains(&token),
        "the user's token is not forwarded"
    );
}

#[tokio::test]
async fn another_method_on_a_straight_route_gets_the_routers_json_405() {
    let (app, fake) = app_with_upstream(&[]).await;
    let c = client_from("127.0.0.2");
    let resp = c
        .get(format!("{}{CHAT}", app.url))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        resp.headers().get("allow").and_then(|v| v.to_str().ok()),
        Some("POST")
    );
    let v: Value = resp.json().await.expect("JSON error");
    assert!(v["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("use POST")));
    assert_eq!(fake.request_count(), 0);
}
