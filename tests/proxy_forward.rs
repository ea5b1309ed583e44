//! The forwarder relays OpenAI- and Anthropic-shaped requests to the fake upstream with the
//! operator's key only, streams SSE chunk by chunk, keeps upstream errors, and serves the
//! compatibility aliases.

mod common;

use std::time::Duration;

use common::upstream::{
    anthropic_text_delta, openai_chat_chunk, openai_chat_json, FakeUpstream, Reply,
};
use serde_json::{json, Value};

const PROXY_KEY: &str = "client-proxy-key";
const OPENAI_OP_KEY: &str = "sk-operator-openai";
const ANTHROPIC_OP_KEY: &str = "sk-ant-operator";

/// The proxy in proxy_key mode with both upstreams pointed at `fake`.
async fn proxy_for(fake: &FakeUpstream, extra: &[&str]) -> common::TestApp {
    let mut args = vec![
        "--gatekeeper",
        "proxy_key",
        "--proxy-key",
        PROXY_KEY,
        "--openai-key",
        OPENAI_OP_KEY,
        "--anthropic-key",
        ANTHROPIC_OP_KEY,
        "--openai-base-url",
        &fake.url,
        "--anthropic-base-url",
        &fake.url,
    ];
    args.extend_from_slice(extra);
    common::spawn(&args, &[]).await
}

/// Reads the response body until `buf` contains `needle`; fails if the body ends first. The
/// timeout only guards against a hanging test; it asserts nothing about speed.
async fn read_until(resp: &mut reqwest::Response, buf: &mut String, needle: &str) {
    tokio::time::timeout(Duration::from_secs(20), async {
        while !buf.contains(needle) {
            match resp.chunk().await.expect("body chunk") {
                Some(c) => buf.push_str(std::str::from_utf8(&c).expect("utf-8")),
                None => panic!("body ended before {needle:?} arrived; got {buf:?}"),
            }
        }
    })
    .await
    .expect("chunk arrived");
}

/// The upstream's own headers reach the client, but not its `Server` (which names its software
/// or CDN) nor its `Date`: the client gets the gateway's date, as nginx's proxy does it.
#[tokio::test]
async fn upstream_server_and_date_are_replaced_other_headers_pass() {
    let fake = FakeUpstream::start().await;
    let app = proxy_for(&fake, &[]).await;
    let old_date = "Mon, 01 Jan 2001 00:00:00 GMT";
    fake.push(
        Reply::json(200, openai_chat_json("gpt-4o-mini", "hi"))
            .header("server", "cloudflare")
            .header("date", old_date)
            .header("x-request-id", "req-42"),
    );
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", app.url))
        .bearer_auth(PROXY_KEY)
        .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(
        h.get("x-request-id").map(|v| v.as_bytes()),
        Some(&b"req-42"[..])
    );
    assert!(h.get("server").is_none(), "{h:?}");
    let dates: Vec<_> = h.get_all("date").iter().collect();
    assert_eq!(dates.len(), 1, "{h:?}");
    assert_ne!(dates[0], old_date);
    assert!(dates[0].to_str().expect("date").ends_with(" GMT"));
}

#[tokio::test]
async fn openai_chat_non_streaming_forwards_original_bytes_with_operator_key() {
    let fake = FakeUpstream::start().await;
    let app = proxy_for(&fake, &[]).await;
    // Odd spacing and key order: the upstream must receive exactly these bytes (the request is
    // within every policy cap, so nothing needs changing: `max_tokens` is below
    // MAX_OUTPUT_TOKENS_OPENAI's default of 1024).
    let body = r#"{ "model":"gpt-4o-mini",  "messages":[{"role":"user","content":"hi"}], "temperature": 0.5, "max_tokens": 100 }"#;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", app.url))
        .bearer_auth(PROXY_KEY)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let got: Value = resp.json().await.expect("json");
    assert_eq!(
        got,
        openai_chat_json("gpt-4o-mini", "Hello from the fake upstream")
    );

    let seen = fake.last_request();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.body.as_ref(), body.as_bytes());
    assert_eq!(seen.credential().as_deref(), Some(OPENAI_OP_KEY));
    assert_eq!(seen.header("content-type"), Some("application/json"));
}

#[tokio::test]
async fn openai_chat_stream_is_relayed_chunk_by_chunk() {
    let fake = FakeUpstream::start().await;
    let app = proxy_for(&fake, &[]).await;
    let (reply, gate) = Reply::gated();
    fake.push(reply);
    let first = openai_chat_chunk("gpt-4o-mini", "first");
    gate.send(first.clone());

    let mut resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", app.url))
        .bearer_auth(PROXY_KEY)
        .json(&json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().expect("ascii"),
        "text/event-stream"
    );
    let mut buf = String::new();
    read_until(&mut resp, &mut buf, &first).await;
    // Each later chunk is sent only after the previous one reached the client: if the proxy
    // buffered, the test would never see it.
    for word in ["second", "third"] {
        let chunk = openai_chat_chunk("gpt-4o-mini", word);
        gate.send(chunk.clone());
        read_until(&mut resp, &mut buf, &chunk).await;
    }
    gate.send("data: [DONE]\n\n");
    read_until(&mut resp, &mut buf, "data: [DONE]").await;
    gate.end();
    assert!(resp.chunk().await.expect("end").is_none());
}

#[tokio::test]
async fn anthropic_messages_non_streaming_uses_x_api_key_and_version() {
    let fake = FakeUpstream::start().await;
    let app = proxy_for(&fake, &[]).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/messages", app.url))
        .header("x-api-key", PROXY_KEY)
        .json(&json!({"model": "claude-3-5-haiku-latest", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let got: Value = resp.json().await.expect("json");
    assert_eq!(got["type"], "message");
    assert_eq!(got["content"][0]["text"], "Hello from the fake upstream");

    let seen = fake.last_request();
    assert_eq!(seen.path, "/v1/messages");
    assert_eq!(seen.header("x-api-key"), Some(ANTHROPIC_OP_KEY));
    assert_eq!(seen.header("authorization"), None);
    assert_eq!(seen.header("anthropic-version"), Some("2023-06-01"));
}

#[tokio::test]
async fn anthropic_stream_is_relayed_chunk_by_chunk_with_client_version_and_beta() {
    let fake = FakeUpstream::start().await;
    let app = proxy_for(&fake, &[]).await;
    let (reply, gate) = Reply::gated();
    fake.push(reply);
    let first = anthropic_text_delta("first");
    gate.send(first.clone());
    let mut resp = reqwest::Client::new()
        .post(format!("{}/v1/messages", app.url))
        .header("x-api-key", PROXY_KEY)
        .header("anthropic-version", "2024-10-22")
        .header("anthropic-beta", "prompt-caching-2024-07-31")
        .json(&json!({"model": "claude-3-5-haiku-latest", "max_tokens": 10, "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let mut buf = String::new();
    read_until(&mut resp, &mut buf, &first).await;
    for word in ["second", "third"] {
        let chunk = anthropic_text_delta(word);
        gate.send(chunk.clone());
        read_until(&mut resp, &mut buf, &chunk).await;
    }
    gate.end();
    assert!(resp.chunk().await.expect("end").is_none());
    let seen = fake.last_request();
    assert_eq!(seen.header("anthropic-version"), Some("2024-10-22"));
    assert_eq!(
        seen.header("anthropic-beta"),
        Some("prompt-caching-2024-07-31")
    );
}

#[tokio::test]
async fn default_streams_arrive_whole() {
    let fake = FakeUpstream::start().await;
    let app = proxy_for(&fake, &[]).await;
    let text = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", app.url))
        .bearer_auth(PROXY_KEY)
        .json(&json!({"model": "m", "stream": true, "messages": []}))
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("body");
    let expected: String =
        common::upstream::openai_chat_sse("m", &["Hello", " from", " the fake upstream"], false)
            .concat();
    assert_eq!(text, expected);
}

#[tokio::test]
async fn client_credentials_and_private_headers_never_reach_the_upstream() {
    let fake = FakeUpstream::start().await;
    let app = proxy_for(&fake, &[]).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", app.url))
        .bearer_auth(PROXY_KEY)
        .header("x-api-key", PROXY_KEY)
        .header("cookie", "session=abc")
        .header("openai-organization", "org-client")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-forwarded-for", "203.0.113.9")
        .header("openai-beta", "assistants=v2")
        .json(&json!({"model": "m", "messages": []}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let seen = fake.last_request();
    assert_eq!(
        seen.header("authorization"),
        Some("Bearer sk-operator-openai")
    );
    for (name, value) in &seen.headers {
        let v = value.to_str().unwrap_or("");
        assert!(
            !v.contains(PROXY_KEY),
            "the client's key leaked upstream in {name}"
        );
    }
    for absent in [
        "x-api-key",
        "cookie",
        "openai-organization",
        "proxy-authorization",
        "x-forwarded-for",
    ] {
        assert_eq!(seen.header(absent), None, "{absent} was forwarded");
    }
    assert_eq!(seen.header("openai-beta"), Some("assistants=v2"));
    assert_eq!(seen.header("host"), Some(fake.addr.to_string().as_str()));
}

#[tokio::test]
async fn upstream_errors_keep_status_and_json_body() {
    let fake = FakeUpstream::start().await;
    let app = proxy_for(&fake, &[]).await;
    let err = json!({"error": {"message": "The model `nope` does not exist", "type": "invalid_request_error", "code": "model_not_found"}});
    fake.push(Reply::json(404, err.clone()));
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", app.url))
        .bearer_auth(PROXY_KEY)
        .json(&json!({"model": "nope", "messages": []}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.json::<Value>().await.expect("json"), err);
}

#[tokio::test]
async fn aliases_reach_the_right_upstream_path_with_v1_added() {
    let fake = FakeUpstream::start().await;
    let app = proxy_for(&fake, &["--proxy-endpoint-route", "/compat/"]).await;
    let client = reqwest::Client::new();
    let cases = [
        (
            "POST",
            "/compat/openai/chat/completions",
            "/v1/chat/completions",
        ),
        (
            "POST",
            "/compat/openai/v1/chat/completions",
            "/v1/chat/completions",
        ),
        ("POST", "/compat/openai/embeddings", "/v1/embeddings"),
        ("GET", "/compat/openai/models", "/v1/models"),
        (
            "GET",
            "/compat/openai/v1/models/gpt-4o",
            "/v1/models/gpt-4o",
        ),
        ("POST", "/compat/anthropic/messages", "/v1/messages"),
        (
            "POST",
            "/compat/anthropic/v1/messages/count_tokens",
            "/v1/messages/count_tokens",
        ),
    ];
    for (method, path, upstream_path) in cases {
        let rb = if method == "GET" {
            client.get(format!("{}{path}", app.url))
        } else {
            client
                .post(format!("{}{path}", app.url))
                .json(&json!({"model": "m", "messages": [], "input": "x"}))
        };
        let resp = rb.bearer_auth(PROXY_KEY).send().await.expect("request");
        assert_eq!(resp.status(), 200, "{method} {path}");
        let seen = fake.last_request();
        assert_eq!(seen.path, upstream_path, "{method} {path}");
        let expected_key = if path.contains("/anthropic/") {
            ANTHROPIC_OP_KEY
        } else {
            OPENAI_OP_KEY
        };
        assert_eq!(seen.credential().as_deref(), Some(expected_key));
    }
    let resp = client
        .post(format!("{}/compat/openai/v1/files", app.url))
        .bearer_auth(PROXY_KEY)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.expect("json error");
    assert!(body["error"]["message"]
        .as_str()
        .expect("message")
        .contains("/compat/openai/v1/files"));
}

#[tokio::test]
async fn models_embeddings_and_count_tokens_with_query_strings() {
    let fake = FakeUpstream::start().await;
    let app = proxy_for(&fake, &[]).await;
    let client = reqwest::Client::new();
    let models: Value = client
        .get(format!("{}/v1/models", app.url))
        .bearer_auth(PROXY_KEY)
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(models["object"], "list");
    let one = client
        .get(format!("{}/v1/models/gpt-4o-mini", app.url))
        .bearer_auth(PROXY_KEY)
        .send()
        .await
        .expect("request");
    assert_eq!(one.status(), 200);
    assert_eq!(fake.last_request().path, "/v1/models/gpt-4o-mini");

    let emb = client
        .post(format!("{}/v1/embeddings", app.url))
        .bearer_auth(PROXY_KEY)
        .json(&json!({"model": "text-embedding-3-small", "input": "hello"}))
        .send()
        .await
        .expect("request");
    assert_eq!(emb.status(), 200);

    let count: Value = client
        .post(format!("{}/v1/messages/count_tokens?beta=true", app.url))
        .header("x-api-key", PROXY_KEY)
        .json(&json!({"model": "claude", "messages": []}))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(count["input_tokens"], 12);
    let seen = fake.last_request();
    assert_eq!(seen.query.as_deref(), Some("beta=true"));
    assert_eq!(seen.header("x-api-key"), Some(ANTHROPIC_OP_KEY));
}

#[tokio::test]
async fn unknown_paths_and_wrong_methods_get_json_errors() {
    let fake = FakeUpstream::start().await;
    let app = proxy_for(&fake, &[]).await;
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("{}/v1/files", app.url))
        .bearer_auth(PROXY_KEY)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.expect("json");
    let msg = body["error"]["message"].as_str().expect("message");
    assert!(msg.contains("/v1/files"), "{msg}");

    let resp = client
        .get(format!("{}/v1/chat/completions", app.url))
        .bearer_auth(PROXY_KEY)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "POST");
    let body: Value = resp.json().await.expect("json");
    let msg = body["error"]["message"].as_str().expect("message");
    assert!(msg.contains("use POST"), "{msg}");

    // Without the proxy key, an unknown path is refused like any other.
    let resp = client
        .post(format!("{}/v1/files", app.url))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 401);
    assert_eq!(fake.request_count(), 0);
}
