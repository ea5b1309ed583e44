//! The operator's policy switches through the API, against the fake upstream:
//! `ALLOWED_MODEL_FAMILIES` and a user's `allowedFamilies` (403 naming model and family),
//! `MAX_CONTEXT_TOKENS_*` (400 with the counted size), `MAX_OUTPUT_TOKENS_*` (clamped, as the
//! upstream sees it), `ALLOWED_VISION_SERVICES`, `ALLOW_OPENAI_TOOL_USAGE`, `REJECT_PHRASES`
//! and `BLOCKED_ORIGINS` (JSON for API clients, a redirecting page for browsers).

mod common;

use common::quota::{add_user, post, proxy, ADMIN_KEY};
use common::upstream::FakeUpstream;
use llm_gatekeeper::users::UserType;
use reqwest::Client;
use serde_json::{json, Value};

fn chat(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 50})
}

async fn refusal(resp: reqwest::Response) -> (u16, String, String) {
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    (
        status,
        v["error"]["type"].as_str().unwrap_or_default().to_string(),
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

#[tokio::test]
async fn families_global_and_per_user() {
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake, &[], &[("ALLOWED_MODEL_FAMILIES", "turbo,claude")]).await;
    add_user(&app, "u", UserType::Normal, &[]);
    let c = Client::new();

    let ok = post(
        &c,
        &app,
        "/v1/chat/completions",
        "u",
        &chat("gpt-3.5-turbo", "hi"),
    )
    .await;
    assert_eq!(ok.status(), 200);
    // An unknown name resolves to the provider's default family (gpt4): refused too.
    for (model, family) in [("gpt-4o", "gpt4o"), ("totally-new-model", "gpt4")] {
        let resp = post(&c, &app, "/v1/chat/completions", "u", &chat(model, "hi")).await;
        let (status, _, message) = refusal(resp).await;
        assert_eq!(status, 403, "{message}");
        assert!(
            message.contains(model) && message.contains(&format!("'{family}'")),
            "{message}"
        );
    }
    let sent = fake.request_count();

    // The user's own list replaces the proxy's: gpt4o now passes, turbo no longer does.
    let (status, v) = common::admin::send(
        c.put(format!("{}/admin/users/u", app.url))
            .bearer_auth(ADMIN_KEY)
            .json(&json!({"allowedFamilies": ["gpt4o"]})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let resp = post(&c, &app, "/v1/chat/completions", "u", &chat("gpt-4o", "hi")).await;
    assert_eq!(resp.status(), 200);
    let resp = post(
        &c,
        &app,
        "/v1/chat/completions",
        "u",
        &chat("gpt-3.5-turbo", "hi"),
    )
    .await;
    let (status, _, message) = refusal(resp).await;
    assert_eq!(status, 403);
    assert!(message.contains("'turbo'"), "{message}");
    assert_eq!(
        fake.request_count(),
        sent + 1,
        "refused requests never go upstream"
    );
}

#[tokio::test]
async fn image_generation_is_off_by_default() {
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake, &[], &[]).await;
    add_user(&app, "u", UserType::Normal, &[]);
    let resp = post(
        &Client::new(),
        &app,
        "/v1/chat/completions",
        "u",
        &chat("dall-e-3", "a cat"),
    )
    .await;
    let (status, kind, message) = refusal(resp).await;
    assert_eq!(status, 403);
    assert_eq!(kind, "model_family_not_allowed");
    assert!(message.contains("'dall-e'"), "{message}");
    assert_eq!(fake.request_count(), 0);
}

#[tokio::test]
async fn context_cap_refuses_with_the_counted_size_and_spares_special_users() {
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake, &[], &[("MAX_CONTEXT_TOKENS_OPENAI", "200")]).await;
    add_user(&app, "u", UserType::Normal, &[]);
    add_user(&app, "vip", UserType::Special, &[]);
    let c = Client::new();
    let long = "word ".repeat(400);
    let resp = post(
        &c,
        &app,
        "/v1/chat/completions",
        "u",
        &chat("gpt-4o", &long),
    )
    .await;
    let (status, _, message) = refusal(resp).await;
    assert_eq!(status, 400);
    assert!(message.contains("max: 200 tokens"), "{message}");
    assert!(message.contains("+ 50 output"), "{message}");
    assert!(message.contains("MAX_CONTEXT_TOKENS_OPENAI"), "{message}");
    // A short prompt fits; a special user is exempt, as in the original.
    let resp = post(&c, &app, "/v1/chat/completions", "u", &chat("gpt-4o", "hi")).await;
    assert_eq!(resp.status(), 200);
    let resp = post(
        &c,
        &app,
        "/v1/chat/completions",
        "vip",
        &chat("gpt-4o", &long),
    )
    .await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn output_caps_are_clamped_on_the_providers_field() {
    let fake = FakeUpstream::start().await;
    let app = proxy(
        &fake,
        &[],
        &[
            ("MAX_OUTPUT_TOKENS_OPENAI", "300"),
            ("MAX_OUTPUT_TOKENS_ANTHROPIC", "400"),
        ],
    )
    .await;
    add_user(&app, "u", UserType::Normal, &[]);
    let c = Client::new();

    let mut body = chat("gpt-4o", "hi");
    body["max_tokens"] = json!(5000);
    assert_eq!(
        post(&c, &app, "/v1/chat/completions", "u", &body)
            .await
            .status(),
        200
    );
    assert_eq!(fake.last_request().json()["max_tokens"], 300);

    // Left out, the cap is set (OpenAI's current field), so leaving it out cannot escape it.
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(
        post(&c, &app, "/v1/chat/completions", "u", &body)
            .await
            .status(),
        200
    );
    assert_eq!(fake.last_request().json()["max_completion_tokens"], 300);

    let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 4096,
        "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(
        post(&c, &app, "/v1/messages", "u", &body).await.status(),
        200
    );
    assert_eq!(fake.last_request().json()["max_tokens"], 400);

    // Under the cap, nothing changes.
    let mut body = chat("gpt-4o", "hi");
    body["max_tokens"] = json!(20);
    assert_eq!(
        post(&c, &app, "/v1/chat/completions", "u", &body)
            .await
            .status(),
        200
    );
    assert_eq!(fake.last_request().json()["max_tokens"], 20);
}

fn with_image(model: &str) -> Value {
    json!({"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]})
}

#[tokio::test]
async fn images_and_tools_are_refused_unless_enabled() {
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake, &[], &[]).await;
    add_user(&app, "u", UserType::Normal, &[]);
    let c = Client::new();
    let (status, kind, message) =
        refusal(post(&c, &app, "/v1/chat/completions", "u", &with_image("gpt-4o")).await).await;
    assert_eq!(
        (status, kind.as_str()),
        (403, "vision_not_allowed"),
        "{message}"
    );
    let mut tools = chat("gpt-4o", "weather?");
    tools["tools"] =
        json!([{"type": "function", "function": {"name": "weather", "parameters": {}}}]);
    let (status, kind, message) =
        refusal(post(&c, &app, "/v1/chat/completions", "u", &tools).await).await;
    assert_eq!(
        (status, kind.as_str()),
        (403, "tools_not_allowed"),
        "{message}"
    );
    assert!(message.contains("ALLOW_OPENAI_TOOL_USAGE"));
    assert_eq!(fake.request_count(), 0);

    let fake = FakeUpstream::start().await;
    let app = proxy(
        &fake,
        &[],
        &[
            ("ALLOWED_VISION_SERVICES", "openai"),
            ("ALLOW_OPENAI_TOOL_USAGE", "true"),
        ],
    )
    .await;
    add_user(&app, "u", UserType::Normal, &[]);
    assert_eq!(
        post(&c, &app, "/v1/chat/completions", "u", &with_image("gpt-4o"))
            .await
            .status(),
        200
    );
    assert_eq!(
        post(&c, &app, "/v1/chat/completions", "u", &tools)
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn rejected_phrases_get_the_operators_message() {
    let fake = FakeUpstream::start().await;
    let app = proxy(
        &fake,
        &[],
        &[
            ("REJECT_PHRASES", r#"forbidden fruit,"apples, pears""#),
            ("REJECT_MESSAGE", "Not on this proxy."),
        ],
    )
    .await;
    add_user(&app, "u", UserType::Normal, &[]);
    let c = Client::new();
    let resp = post(
        &c,
        &app,
        "/v1/chat/completions",
        "u",
        &chat("gpt-4o", "I like Apples, Pears"),
    )
    .await;
    let (status, _, message) = refusal(resp).await;
    assert_eq!((status, message.as_str()), (400, "Not on this proxy."));
    assert_eq!(fake.request_count(), 0);
    let resp = post(
        &c,
        &app,
        "/v1/chat/completions",
        "u",
        &chat("gpt-4o", "apples and pears"),
    )
    .await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn blocked_origins_get_json_or_a_redirecting_page() {
    let fake = FakeUpstream::start().await;
    let app = proxy(
        &fake,
        &[],
        &[
            ("BLOCKED_ORIGINS", "janitorai.com"),
            ("BLOCK_MESSAGE", "Blocked here."),
            ("BLOCK_REDIRECT", "https://example.org/elsewhere"),
        ],
    )
    .await;
    add_user(&app, "u", UserType::Normal, &[]);
    let c = Client::new();
    let url = format!("{}/v1/chat/completions", app.url);
    let resp = c
        .post(&url)
        .bearer_auth("u")
        .header("origin", "https://www.janitorai.com")
        .json(&chat("gpt-4o", "hi"))
        .send()
        .await
        .expect("sent");
    let (status, kind, message) = refusal(resp).await;
    assert_eq!(
        (status, kind.as_str(), message.as_str()),
        (403, "blocked_origin", "Blocked here.")
    );

    // A browser navigating from the site gets a page that sends it elsewhere.
    let resp = c
        .get(format!("{}/v1/models", app.url))
        .bearer_auth("u")
        .header("referer", "https://janitorai.com/chats/1")
        .header("accept", "text/html,application/xhtml+xml")
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 403);
    let page = resp.text().await.expect("page");
    assert!(page.contains("Blocked here."), "{page}");
    assert!(page.contains(r#"http-equiv="refresh""#), "{page}");
    // The address is HTML-escaped in the attribute (`/` as `&#x2f;`), which browsers decode.
    assert!(
        page.replace("&#x2f;", "/")
            .contains("url=https://example.org/elsewhere"),
        "{page}"
    );

    // Other sites pass.
    let resp = c
        .post(&url)
        .bearer_auth("u")
        .header("origin", "https://notjanitorai.com")
        .json(&chat("gpt-4o", "hi"))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    assert_eq!(fake.request_count(), 1);
}
