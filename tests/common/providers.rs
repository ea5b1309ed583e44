//! Fakes of the providers beyond OpenAI and Anthropic, each checking what the real service
//! checks, built on [`FakeUpstream::start_with`] (so requests are recorded and replies can be
//! scripted as usual). Each fake is validated once with the provider's official client talking
//! to it directly (`tests/e2e_providers.rs`).
//!
//! - [`fake_mistral`]: Mistral AI — `Authorization: Bearer <key>` (else 401), only
//!   `/v1/chat/completions` and `/v1/models`, a body with fields Mistral does not know
//!   (`stream_options`, `max_completion_tokens`, ...) refused with 422 as Mistral does, usage
//!   in the last stream chunk without being asked.
#![allow(dead_code)]

use std::sync::Arc;

use serde_json::{json, Value};

use super::upstream::{FakeUpstream, Recorded, Reply};

/// What the Mistral fake reports: prompt tokens, and one completion token per text piece.
pub const MISTRAL_PROMPT_TOKENS: u64 = 21;
/// The text pieces of a Mistral fake answer (streamed one per chunk).
pub const MISTRAL_TEXTS: &[&str] = &["Bonjour", " from", " the", " Mistral", " fake"];

/// The fields of Mistral's chat completion request (its API refuses any other with 422).
const MISTRAL_CHAT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "temperature",
    "top_p",
    "max_tokens",
    "stream",
    "stop",
    "random_seed",
    "response_format",
    "tools",
    "tool_choice",
    "presence_penalty",
    "frequency_penalty",
    "n",
    "prediction",
    "parallel_tool_calls",
    "prompt_mode",
    "safe_prompt",
    "metadata",
];

/// A fake Mistral AI accepting `key`.
pub async fn fake_mistral(key: &str) -> FakeUpstream {
    let key = key.to_string();
    FakeUpstream::start_with(Arc::new(move |req: &Recorded| mistral_reply(req, &key))).await
}

fn mistral_error(status: u16, message: Value, kind: &str) -> Reply {
    Reply::json(
        status,
        json!({"object": "error", "message": message, "type": kind, "param": null, "code": null}),
    )
}

fn mistral_reply(req: &Recorded, key: &str) -> Reply {
    let bearer = req.header("authorization").unwrap_or_default();
    if bearer != format!("Bearer {key}") {
        return Reply::json(
            401,
            json!({"message": "Unauthorized", "request_id": "fake"}),
        );
    }
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/v1/models") => Reply::json(
            200,
            json!({"object": "list", "data": [
                {"id": "mistral-large-latest", "object": "model", "created": 1700000000,
                 "owned_by": "mistralai", "type": "base", "max_context_length": 131072,
                 "capabilities": {"completion_chat": true}},
                {"id": "mistral-small-latest", "object": "model", "created": 1700000000,
                 "owned_by": "mistralai", "type": "base", "max_context_length": 131072,
                 "capabilities": {"completion_chat": true}}
            ]}),
        ),
        ("POST", "/v1/chat/completions") => mistral_chat(req),
        _ => Reply::json(404, json!({"detail": "Not Found"})),
    }
}

fn mistral_chat(req: &Recorded) -> Reply {
    let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
        return mistral_error(400, json!("Invalid JSON body"), "invalid_request_error");
    };
    let Some(obj) = body.as_object() else {
        return mistral_error(
            422,
            json!("Body must be an object"),
            "invalid_request_error",
        );
    };
    // Mistral's request model forbids extra fields.
    let extra: Vec<Value> = obj
        .keys()
        .filter(|k| !MISTRAL_CHAT_FIELDS.contains(&k.as_str()))
        .map(|k| {
            json!({"type": "extra_forbidden", "loc": ["body", k],
                   "msg": "Extra inputs are not permitted", "input": obj[k]})
        })
        .collect();
    if !extra.is_empty() {
        return mistral_error(
            422,
            json!({"detail": extra}),
            "invalid_request_message_error",
        );
    }
    if let Some(m) = obj.get("max_tokens") {
        if !m.is_u64() {
            return mistral_error(
                422,
                json!({"detail": [{"type": "int_type", "loc": ["body", "max_tokens"],
                    "msg": "Input should be a valid integer"}]}),
                "invalid_request_message_error",
            );
        }
    }
    let model = body["model"].as_str().unwrap_or("mistral-small-latest");
    let prompt = MISTRAL_PROMPT_TOKENS;
    let completion = MISTRAL_TEXTS.len() as u64;
    let usage = json!({"prompt_tokens": prompt, "completion_tokens": completion,
                       "total_tokens": prompt + completion});
    if body["stream"].as_bool().unwrap_or(false) {
        let chunk = |delta: Value, finish: Value, usage: Option<&Value>| {
            let mut v = json!({"id": "cmpl-fake-mistral", "object": "chat.completion.chunk",
                "created": 1700000000, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
            if let Some(u) = usage {
                v["usage"] = u.clone();
            }
            format!("data: {v}\n\n")
        };
        let mut events = vec![chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
            None,
        )];
        let last = MISTRAL_TEXTS.len() - 1;
        for (i, t) in MISTRAL_TEXTS.iter().enumerate() {
            if i == last {
                // Mistral puts the usage on the chunk that finishes the answer.
                events.push(chunk(json!({"content": t}), json!("stop"), Some(&usage)));
            } else {
                events.push(chunk(json!({"content": t}), Value::Null, None));
            }
        }
        events.push("data: [DONE]\n\n".into());
        return Reply::sse(events);
    }
    Reply::json(
        200,
        json!({"id": "cmpl-fake-mistral", "object": "chat.completion", "created": 1700000000,
            "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": MISTRAL_TEXTS.concat(),
                            "tool_calls": null, "prefix": false}}],
            "usage": usage}),
    )
}
