//! Accounting through the running server and a fake upstream: a user's `tokenCounts` equals
//! exactly what the upstream reported, for every response shape, streamed or not, in parallel;
//! the usage chunk the proxy asks for is hidden; a client that disconnects is still charged;
//! upstream errors cost nothing.

mod common;

use std::time::Duration;

use common::quota::{add_user, eventually, hang_up_before_the_answer, post, proxy, reserved, used};
use common::upstream::{anthropic_event, anthropic_text_delta, FakeUpstream, Reply};
use futures::FutureExt;
use llm_gatekeeper::providers::Api;
use llm_gatekeeper::providers::RequestFacts;
use llm_gatekeeper::quota::estimate::{count_tokens, prompt_tokens};
use llm_gatekeeper::users::UserType;
use serde_json::{json, Value};

const NO_RATE: &[&str] = &["--text-model-rate-limit", "0"];

fn chat(model: &str, stream: Option<bool>, include_usage: Option<bool>) -> Value {
    let mut b = json!({"model": model, "max_tokens": 50,
        "messages": [{"role": "user", "content": "Say hello"}]});
    if let Some(s) = stream {
        b["stream"] = json!(s);
    }
    if let Some(u) = include_usage {
        b["stream_options"] = json!({"include_usage": u});
    }
    b
}

fn sse_event(v: Value) -> String {
    format!("data: {v}\n\n")
}

fn openai_stream(prompt: u64, completion: u64, with_usage: bool) -> Vec<String> {
    let mut events = vec![
        sse_event(json!({"object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": "Hello"}}]})),
        sse_event(json!({"object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})),
    ];
    if with_usage {
        events.push(sse_event(
            json!({"object": "chat.completion.chunk", "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion}}),
        ));
    }
    events.push("data: [DONE]\n\n".into());
    events
}

#[tokio::test]
async fn openai_json_usage_is_counted_exactly() {
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake, NO_RATE, &[]).await;
    add_user(&app, "u", UserType::Normal, &[]);
    fake.push(Reply::json(
        200,
        json!({"choices": [{"message": {"role": "assistant", "content": "Hi"}}],
               "usage": {"prompt_tokens": 123, "completion_tokens": 45, "total_tokens": 168}}),
    ));
    let c = reqwest::Client::new();
    let r = post(
        &c,
        &app,
        "/v1/chat/completions",
        "u",
        &chat("gpt-4o", None, None),
    )
    .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["usage"]["total_tokens"], 168);
    eventually("settlement", || used(&app, "u", "gpt4o") == 168).await;
    assert_eq!(reserved(&app, "u", "gpt4o"), 0);
    let user = app.state.users.get("u").expect("user");
    assert_eq!(user.prompt_count, 1);
    // The proxy did not change the body of a non-streamed request.
    assert!(fake.last_request().json().get("stream_options").is_none());
}

#[tokio::test]
async fn openai_stream_with_client_include_usage_keeps_the_usage_chunk() {
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake, NO_RATE, &[]).await;
    add_user(&app, "u", UserType::Normal, &[]);
    let events = openai_stream(31, 7, true);
    fake.push(Reply::sse(events.clone()));
    let c = reqwest::Client::new();
    let r = post(
        &c,
        &app,
        "/v1/chat/completions",
        "u",
        &chat("gpt-4.1", Some(true), Some(true)),
    )
    .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("body");
    assert_eq!(text, events.concat());
    eventually("settlement", || used(&app, "u", "gpt41") == 38).await;
    assert_eq!(reserved(&app, "u", "gpt41"), 0);
}

#[tokio::test]
async fn openai_stream_without_include_usage_asks_upstream_and_hides_the_chunk() {
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake, NO_RATE, &[]).await;
    add_user(&app, "u", UserType::Normal, &[]);
    let events = openai_stream(50, 9, true);
    fake.push(Reply::sse(events.clone()));
    let c = reqwest::Client::new();
    let r = post(
        &c,
        &app,
        "/v1/chat/completions",
        "u",
        &chat("gpt-5", Some(true), None),
    )
    .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("body");
    // The client sees every event but the usage chunk it did not ask for.
    let expected: String = events
        .iter()
        .filter(|e| !e.contains("\"usage\""))
        .cloned()
        .collect();
    assert_eq!(text, expected);
    assert!(!text.contains("prompt_tokens"));
    // The upstream was asked for usage.
    assert_eq!(
        fake.last_request().json()["stream_options"]["include_usage"],
        json!(true)
    );
    eventually("settlement", || used(&app, "u", "gpt5") == 59).await;

    // The same with an explicit include_usage: false.
    fake.push(Reply::sse(openai_stream(1, 2, true)));
    let r = post(
        &c,
        &app,
        "/v1/chat/completions",
        "u",
        &chat("gpt-5", Some(true), Some(false)),
    )
    .await;
    let text = r.text().await.expect("body");
    assert!(!text.contains("prompt_tokens"));
    eventually("settlement", || used(&app, "u", "gpt5") == 62).await;
}

#[tokio::test]
async fn anthropic_json_and_stream_count_input_output_and_cache_tokens() {
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake, NO_RATE, &[]).await;
    add_user(&app, "u", UserType::Normal, &[]);
    let c = reqwest::Client::new();
    let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 100,
        "messages": [{"role": "user", "content": "Hello"}]});

    fake.push(Reply::json(
        200,
        json!({"type": "message", "role": "assistant",
        "content": [{"type": "text", "text": "Hi"}],
        "usage": {"input_tokens": 20, "output_tokens": 8,
                  "cache_creation_input_tokens": 3, "cache_read_input_tokens": 100}}),
    ));
    let r = post(&c, &app, "/v1/messages", "u", &body).await;
    assert_eq!(r.status(), 200);
    r.text().await.expect("body");
    eventually("json settlement", || used(&app, "u", "claude") == 131).await;

    let events = vec![
        anthropic_event(
            "message_start",
            &json!({"type": "message_start", "message": {
            "id": "m", "type": "message", "role": "assistant", "content": [],
            "usage": {"input_tokens": 40, "cache_read_input_tokens": 60, "output_tokens": 1}}}),
        ),
        anthropic_text_delta("Hello"),
        anthropic_text_delta(" world"),
        anthropic_event(
            "message_delta",
            &json!({"type": "message_delta",
            "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 17}}),
        ),
        anthropic_event("message_stop", &json!({"type": "message_stop"})),
    ];
    fake.push(Reply::sse(events.clone()));
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["model"] = json!("claude-opus-4-1");
    let r = post(&c, &app, "/v1/messages", "u", &sbody).await;
    assert_eq!(r.text().await.expect("body"), events.concat());
    eventually("stream settlement", || {
        used(&app, "u", "claude-opus") == 117
    })
    .await;
    assert_eq!(used(&app, "u", "claude"), 131);
    assert_eq!(reserved(&app, "u", "claude-opus"), 0);
    assert_eq!(app.state.users.get("u").expect("user").prompt_count, 2);
}

#[tokio::test]
async fn embeddings_and_completions_are_counted() {
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake, NO_RATE, &[]).await;
    add_user(&app, "u", UserType::Normal, &[]);
    let c = reqwest::Client::new();
    // The fake's defaults: embeddings report 4 prompt tokens, completions 5 + 1.
    let r = post(
        &c,
        &app,
        "/v1/embeddings",
        "u",
        &json!({"model": "text-embedding-3-small", "input": "hello"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    r.text().await.expect("body");
    let r = post(
        &c,
        &app,
        "/v1/completions",
        "u",
        &json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Say", "max_tokens": 3}),
    )
    .await;
    assert_eq!(r.status(), 200);
    r.text().await.expect("body");
    eventually("settlement", || used(&app, "u", "turbo") == 10).await;
}

#[tokio::test]
async fn upstream_errors_charge_nothing() {
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake, NO_RATE, &[]).await;
    add_user(&app, "u", UserType::Normal, &[]);
    fake.push(Reply::error(400, "bad request"));
    let c = reqwest::Client::new();
    let r = post(
        &c,
        &app,
        "/v1/chat/completions",
        "u",
        &chat("gpt-4o", None, None),
    )
    .await;
    assert_eq!(r.status(), 400);
    r.text().await.expect("body");
    eventually("release", || reserved(&app, "u", "gpt4o") == 0).await;
    assert_eq!(used(&app, "u", "gpt4o"), 0);
}

#[tokio::test]
async fn client_disconnect_mid_stream_is_still_charged() {
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake, NO_RATE, &[]).await;
    add_user(&app, "u", UserType::Normal, &[]);
    let (reply, gate) = Reply::gated_with_heartbeat(Some(Duration::from_millis(50)));
    fake.push(reply);
    let c = reqwest::Client::new();
    let body = json!({"model": "claude-haiku-4-5", "max_tokens": 1000, "stream": true,
        "messages": [{"role": "user", "content": "Tell me a long story"}]});
    let mut r = post(&c, &app, "/v1/messages", "u", &body).await;
    assert_eq!(r.status(), 200);
    gate.send(anthropic_event(
        "message_start",
        &json!({"type": "message_start", "message": {
        "id": "m", "type": "message", "role": "assistant", "content": [],
        "usage": {"input_tokens": 25, "output_tokens": 1}}}),
    ));
    gate.send(anthropic_text_delta(
        "Once upon a time, there was a gateway",
    ));
    let mut seen = String::new();
    while !seen.contains("gateway") {
        let chunk = r.chunk().await.expect("chunk").expect("more body");
        seen.push_str(std::str::from_utf8(&chunk).expect("utf8"));
    }
    assert!(reserved(&app, "u", "claude") > 0, "reserved while running");
    drop(r);
    drop(c);
    gate.dropped().await;
    // Input is what message_start reported; output is estimated from the text streamed.
    let expected = 25 + count_tokens("Once upon a time, there was a gateway");
    eventually("settlement after disconnect", || {
        used(&app, "u", "claude") == expected
    })
    .await;
    assert_eq!(reserved(&app, "u", "claude"), 0);
}

#[tokio::test]
async fn openai_disconnect_before_usage_charges_an_estimate() {
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake, NO_RATE, &[]).await;
    add_user(&app, "u", UserType::Normal, &[]);
    let (reply, gate) = Reply::gated_with_heartbeat(Some(Duration::from_millis(50)));
    fake.push(reply);
    let c = reqwest::Client::new();
    let body = chat("gpt-4o", Some(true), None);
    let prompt_estimate = prompt_tokens(&request_facts(Api::OpenAiChat, &body));
    let mut r = post(&c, &app, "/v1/chat/completions", "u", &body).await;
    gate.send(sse_event(
        json!({"choices": [{"index": 0, "delta": {"content": "alpha beta gamma"}}]}),
    ));
    let chunk = r.chunk().await.expect("chunk").expect("body");
    assert!(std::str::from_utf8(&chunk).expect("utf8").contains("alpha"));
    drop(r);
    drop(c);
    gate.dropped().await;
    let expected = prompt_estimate + count_tokens("alpha beta gamma");
    eventually("estimate charged", || used(&app, "u", "gpt4o") == expected).await;
    assert!(expected > 0);
}

#[tokio::test]
async fn parallel_burst_admits_only_what_fits_and_counts_exactly() {
    let fake = FakeUpstream::start().await;
    // One user's parallel requests reach admission at once only without the fair queue's
    // per-user limit (USER_CONCURRENCY_LIMIT, default 1).
    let app = proxy(
        &fake,
        &[NO_RATE, &["--user-concurrency-limit", "0"]].concat(),
        &[],
    )
    .await;
    let body = chat("gpt-4o", Some(true), Some(true));
    let facts = request_facts(Api::OpenAiChat, &body);
    let requested = facts.requested(prompt_tokens(&facts));
    add_user(&app, "u", UserType::Normal, &[("gpt4o", 3 * requested + 1)]);
    // Every admitted request hangs on a gate until the whole burst has been decided.
    let gates: Vec<_> = (0..50)
        .map(|_| {
            let (reply, gate) = Reply::gated();
            fake.push(reply);
            gate
        })
        .collect();
    let c = reqwest::Client::new();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let c = c.clone();
            let url = format!("{}/v1/chat/completions", app.url);
            let body = body.clone();
            tokio::spawn(async move {
                c.post(url)
                    .bearer_auth("u")
                    .json(&body)
                    .send()
                    .await
                    .expect("sent")
            })
        })
        .collect();
    let mut admitted = Vec::new();
    let mut refused = 0;
    for t in tasks {
        let r = t.await.expect("task");
        match r.status().as_u16() {
            200 => admitted.push(r),
            429 => {
                let e: Value = r.json().await.expect("json");
                assert_eq!(e["error"]["type"], "insufficient_quota");
                refused += 1;
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!(admitted.len(), 3);
    assert_eq!(refused, 47);
    assert_eq!(fake.request_count(), 3);
    let mut expected = 0;
    for (i, gate) in gates.iter().enumerate() {
        if gate.started().now_or_never().is_none() {
            continue;
        }
        let (p, c) = (100 + i as u64, 10 + i as u64);
        expected += p + c;
        for e in openai_stream(p, c, true) {
            gate.send(e);
        }
        gate.end();
    }
    for r in admitted {
        r.text().await.expect("body");
    }
    eventually("settlement", || used(&app, "u", "gpt4o") == expected).await;
    assert_eq!(reserved(&app, "u", "gpt4o"), 0);
    assert_eq!(app.state.users.get("u").expect("user").prompt_count, 3);
}

#[tokio::test]
async fn mixed_parallel_traffic_counts_exactly_what_the_upstream_reported() {
    // The fake's defaults: OpenAI JSON 10 + 5, OpenAI stream 10 + 3 (usage chunk requested by
    // the client or by the proxy), Anthropic JSON 10 + 5, Anthropic stream 10 + 3.
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake, NO_RATE, &[]).await;
    add_user(&app, "u", UserType::Normal, &[("gpt4o", 1_000_000)]);
    let c = reqwest::Client::new();
    let shapes: Vec<(&str, Value, u64, &str)> = vec![
        (
            "/v1/chat/completions",
            chat("gpt-4o", None, None),
            15,
            "gpt4o",
        ),
        (
            "/v1/chat/completions",
            chat("gpt-4o", Some(true), None),
            13,
            "gpt4o",
        ),
        (
            "/v1/chat/completions",
            chat("gpt-4o", Some(true), Some(true)),
            13,
            "gpt4o",
        ),
        (
            "/v1/messages",
            json!({"model": "claude-sonnet-4-5", "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}]}),
            15,
            "claude",
        ),
        (
            "/v1/messages",
            json!({"model": "claude-sonnet-4-5", "max_tokens": 10, "stream": true,
            "messages": [{"role": "user", "content": "hi"}]}),
            13,
            "claude",
        ),
    ];
    let mut tasks = Vec::new();
    let mut expected = std::collections::BTreeMap::<&str, u64>::new();
    for i in 0..40 {
        let (path, body, cost, family) = shapes[i % shapes.len()].clone();
        *expected.entry(family).or_default() += cost;
        let c = c.clone();
        let url = format!("{}{path}", app.url);
        tasks.push(tokio::spawn(async move {
            let r = c
                .post(url)
                .bearer_auth("u")
                .json(&body)
                .send()
                .await
                .expect("sent");
            assert_eq!(r.status(), 200);
            let text = r.text().await.expect("body");
            // A client that did not ask for stream usage never sees it.
            if body["stream"] == json!(true)
                && body.get("stream_options").is_none()
                && path.contains("chat")
            {
                assert!(!text.contains("prompt_tokens"), "{text}");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    for (family, total) in expected {
        eventually(family, || used(&app, "u", family) == total).await;
        assert_eq!(reserved(&app, "u", family), 0);
    }
    assert_eq!(app.state.users.get("u").expect("user").prompt_count, 40);
}

#[tokio::test]
async fn split_events_are_reassembled_and_complete_ones_are_not_held_back() {
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake, NO_RATE, &[]).await;
    add_user(&app, "u", UserType::Normal, &[]);
    let (reply, gate) = Reply::gated();
    fake.push(reply);
    let c = reqwest::Client::new();
    let mut r = post(
        &c,
        &app,
        "/v1/chat/completions",
        "u",
        &chat("o3", Some(true), None),
    )
    .await;
    assert_eq!(r.status(), 200);
    let first = sse_event(json!({"choices": [{"index": 0, "delta": {"content": "First"}}]}));
    let usage = sse_event(json!({"choices": [],
        "usage": {"prompt_tokens": 70, "completion_tokens": 30, "total_tokens": 100}}));
    // One complete event plus the start of the usage chunk in the same upstream chunk.
    gate.send(format!("{first}{}", &usage[..20]));
    let mut seen = String::new();
    while !seen.contains("First") {
        let chunk = r.chunk().await.expect("chunk").expect("more body");
        seen.push_str(std::str::from_utf8(&chunk).expect("utf8"));
    }
    assert_eq!(
        seen, first,
        "the complete event arrives before the rest is sent"
    );
    gate.send(usage[20..].to_string());
    gate.send("data: [DONE]\n\n");
    gate.end();
    let rest = r.text().await.expect("body");
    assert_eq!(rest, "data: [DONE]\n\n");
    eventually("settlement", || used(&app, "u", "o3") == 100).await;
}

#[tokio::test]
async fn client_gone_before_the_upstream_answered_pays_the_prompt() {
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake, NO_RATE, &[]).await;
    add_user(&app, "u", UserType::Normal, &[]);
    let body = chat("gpt-4o", None, None);
    let prompt_estimate = prompt_tokens(&request_facts(Api::OpenAiChat, &body));
    hang_up_before_the_answer(&app, &fake, "u", &body).await;
    eventually("prompt charged", || {
        used(&app, "u", "gpt4o") == prompt_estimate
    })
    .await;
    assert_eq!(reserved(&app, "u", "gpt4o"), 0);
}

/// The facts the proxy reads from a request body of `api`.
fn request_facts(api: Api, body: &serde_json::Value) -> RequestFacts {
    api.provider().request_facts(api, body).expect("facts")
}
