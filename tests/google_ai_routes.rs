//! The Google AI routes without an SDK: the client key in `?key=` (moved out of the URL, never
//! forwarded), a stream without `alt=sse` (Google's JSON array: its last running usage counts
//! once), bad paths and untranslatable requests refused with a JSON error that says what to
//! send.

mod common;

use common::google_ai::{FakeGoogleAi, TEXT, TOTAL_TOKENS};
use common::quota::{add_user, used, ADMIN_KEY};
use llm_gatekeeper::users::UserType;
use serde_json::{json, Value};

async fn app(fake: &FakeGoogleAi) -> common::TestApp {
    common::spawn(
        &[
            "--gatekeeper",
            "user_token",
            "--admin-key",
            ADMIN_KEY,
            "--google-ai-key",
            "AIza-operator",
            "--google-ai-base-url",
            &fake.url,
            "--text-model-rate-limit",
            "0",
        ],
        &[],
    )
    .await
}

const BODY: &str = r#"{"contents":[{"role":"user","parts":[{"text":"Say hello"}]}]}"#;

#[tokio::test]
async fn a_query_key_is_a_credential_and_never_leaves() {
    let fake = FakeGoogleAi::start(&["AIza-operator"]).await;
    let app = app(&fake).await;
    add_user(&app, "tok-query", UserType::Normal, &[]);
    let client = reqwest::Client::new();
    let resp = client
        .post(format!(
            "{}/proxy/google-ai/v1beta/models/gemini-2.5-pro:generateContent?key=tok-query",
            app.url
        ))
        .header("content-type", "application/json")
        .body(BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["candidates"][0]["content"]["parts"][0]["text"], TEXT);
    let r = fake.last_request();
    assert_eq!(r.path, "/v1beta/models/gemini-2.5-pro:generateContent");
    assert_eq!(r.query, None);
    assert_eq!(r.header("x-goog-api-key"), Some("AIza-operator"));
    assert_eq!(used(&app, "tok-query", "gemini-pro"), TOTAL_TOKENS);

    // A wrong query key is refused by the proxy, not sent on.
    let resp = client
        .post(format!(
            "{}/proxy/google-ai/v1beta/models/gemini-2.5-pro:generateContent?key=nope",
            app.url
        ))
        .body(BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn a_stream_without_alt_sse_counts_its_last_usage_once() {
    let fake = FakeGoogleAi::start(&["AIza-operator"]).await;
    let app = app(&fake).await;
    add_user(&app, "tok-array", UserType::Normal, &[]);
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/proxy/google-ai/v1/models/gemini-2.0-flash:streamGenerateContent",
            app.url
        ))
        .header("x-goog-api-key", "tok-array")
        .body(BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(3));
    assert_eq!(used(&app, "tok-array", "gemini-flash"), TOTAL_TOKENS);
}

#[tokio::test]
async fn bad_requests_say_what_to_send() {
    let fake = FakeGoogleAi::start(&["AIza-operator"]).await;
    let app = app(&fake).await;
    add_user(&app, "tok-bad", UserType::Normal, &[]);
    let client = reqwest::Client::new();
    let post = |path: &str, body: Value| {
        client
            .post(format!("{}/proxy/google-ai{path}", app.url))
            .bearer_auth("tok-bad")
            .json(&body)
            .send()
    };
    let cases = [
        (
            "/v1beta/models/gemini-2.5-pro:countTokens",
            json!({"contents": []}),
            400,
            "streamGenerateContent",
        ),
        (
            "/v1beta/models/gemini%20pro%3F:generateContent",
            json!({"contents": []}),
            400,
            "not a Gemini model id",
        ),
        // A decoded `/` makes another path, never part of the upstream path.
        (
            "/v1beta/models/..%2F..%2Fv1beta%2Ffiles:generateContent",
            json!({"contents": []}),
            404,
            "not a Google AI route",
        ),
        (
            "/v2/models/gemini-2.5-pro:generateContent",
            json!({"contents": []}),
            404,
            "use v1beta or v1",
        ),
        ("/v1/files", json!({}), 404, "not a Google AI route"),
        (
            "/v1beta/models/gemini-2.5-pro:generateContent",
            json!({"contents": [], "generationConfig": {"maxOutputTokens": "lots"}}),
            400,
            "generationConfig.`maxOutputTokens`",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "gemini-2.5-flash", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}),
            400,
            "data:<type>;base64",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "gemini-2.5-flash"}),
            400,
            "messages",
        ),
    ];
    for (path, body, status, needle) in cases {
        let resp = post(path, body).await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{path}");
        let v: Value = resp.json().await.unwrap();
        let msg = v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(msg.contains(needle), "{path}: {msg}");
    }
    assert!(fake.requests().is_empty(), "{:?}", fake.requests());
    assert_eq!(used(&app, "tok-bad", "gemini-pro"), 0);
}

#[tokio::test]
async fn a_user_near_the_limit_gets_the_cap_in_generation_config() {
    let fake = FakeGoogleAi::start(&["AIza-operator"]).await;
    let app = app(&fake).await;
    add_user(&app, "tok-cap", UserType::Normal, &[("gemini-flash", 200)]);
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/proxy/google-ai/v1beta/models/gemini-2.5-flash:generateContent",
            app.url
        ))
        .header("x-goog-api-key", "tok-cap")
        .body(BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let cap = fake.last_request().json()["generationConfig"]["maxOutputTokens"]
        .as_u64()
        .expect("the proxy set maxOutputTokens");
    assert!(cap > 0 && cap < 200, "{cap}");
    assert_eq!(used(&app, "tok-cap", "gemini-flash"), TOTAL_TOKENS);
}
