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

/// One deployment of the Azure fake: resource, deployment, key, and the model it serves.
#[derive(Clone, Debug)]
pub struct AzureDeployment {
    pub resource: &'static str,
    pub deployment: &'static str,
    pub key: &'static str,
    pub model: &'static str,
}

/// What the Azure fake reports: prompt tokens, and one completion token per text piece.
pub const AZURE_PROMPT_TOKENS: u64 = 17;
/// The text pieces of an Azure fake answer (streamed one per chunk).
pub const AZURE_TEXTS: &[&str] = &["Hello", " from", " Azure", " fake"];

/// A fake Azure OpenAI serving `deployments` under `http://127.0.0.1:PORT/{resource}` (so use
/// `AZURE_BASE_URL=http://127.0.0.1:PORT/{resource}`), checking what Azure checks: the
/// resource and deployment in the path (404 `DeploymentNotFound`), `api-version` equal to
/// `api_version` (404), the deployment's key in `api-key` (401). Answers carry Azure's
/// content-filter annotations (`prompt_filter_results`, `content_filter_results`, a first
/// stream chunk without choices or model) and report stream usage only when asked.
pub async fn fake_azure(deployments: Vec<AzureDeployment>, api_version: &str) -> FakeUpstream {
    let version = api_version.to_string();
    FakeUpstream::start_with(Arc::new(move |req: &Recorded| {
        azure_reply(req, &deployments, &version)
    }))
    .await
}

fn azure_error(status: u16, code: &str, message: &str) -> Reply {
    Reply::json(status, json!({"error": {"code": code, "message": message}}))
}

fn azure_reply(req: &Recorded, deployments: &[AzureDeployment], version: &str) -> Reply {
    // /{resource}/openai/deployments/{deployment}/{operation...}
    let parts: Vec<&str> = req.path.trim_start_matches('/').splitn(5, '/').collect();
    let (resource, deployment, operation) = match parts.as_slice() {
        [r, "openai", "deployments", d, op] => (*r, *d, *op),
        _ => return azure_error(404, "404", "Resource not found"),
    };
    let api_version = req
        .query
        .as_deref()
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix("api-version="));
    if api_version != Some(version) {
        return azure_error(
            404,
            "404",
            "Resource not found (missing or unsupported api-version)",
        );
    }
    let Some(d) = deployments
        .iter()
        .find(|d| d.resource == resource && d.deployment == deployment)
    else {
        return azure_error(
            404,
            "DeploymentNotFound",
            "The API deployment for this resource does not exist.",
        );
    };
    if req.header("api-key") != Some(d.key) {
        return azure_error(
            401,
            "401",
            "Access denied due to invalid subscription key or wrong API endpoint.",
        );
    }
    match (req.method.as_str(), operation) {
        ("POST", "chat/completions") => azure_chat(req, d.model),
        ("POST", "images/generations") => azure_image(req),
        _ => azure_error(404, "404", "Resource not found"),
    }
}

fn content_filter() -> Value {
    json!({"hate": {"filtered": false, "severity": "safe"},
           "self_harm": {"filtered": false, "severity": "safe"},
           "sexual": {"filtered": false, "severity": "safe"},
           "violence": {"filtered": false, "severity": "safe"}})
}

fn azure_chat(req: &Recorded, model: &str) -> Reply {
    let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
        return azure_error(400, "BadRequest", "Invalid JSON");
    };
    let prompt = AZURE_PROMPT_TOKENS;
    let completion = AZURE_TEXTS.len() as u64;
    let usage = json!({"prompt_tokens": prompt, "completion_tokens": completion,
                       "total_tokens": prompt + completion});
    let prompt_filter = json!([{"prompt_index": 0, "content_filter_results": content_filter()}]);
    if body["stream"].as_bool().unwrap_or(false) {
        let include_usage = body["stream_options"]["include_usage"]
            .as_bool()
            .unwrap_or(false);
        let mut events = vec![format!(
            "data: {}\n\n",
            json!({"choices": [], "created": 0, "id": "", "model": "", "object": "",
                   "prompt_filter_results": prompt_filter})
        )];
        let chunk = |delta: Value, finish: Value, filter: Value| {
            let mut v = json!({"id": "chatcmpl-fake-azure", "object": "chat.completion.chunk",
                "created": 1700000000, "model": model, "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                             "logprobs": null, "content_filter_results": filter}]});
            if include_usage {
                v["usage"] = Value::Null;
            }
            format!("data: {v}\n\n")
        };
        events.push(chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
            json!({}),
        ));
        for t in AZURE_TEXTS {
            events.push(chunk(json!({"content": t}), Value::Null, content_filter()));
        }
        events.push(chunk(json!({}), json!("stop"), json!({})));
        if include_usage {
            events.push(format!(
                "data: {}\n\n",
                json!({"id": "chatcmpl-fake-azure", "object": "chat.completion.chunk",
                    "created": 1700000000, "model": model, "choices": [], "usage": usage})
            ));
        }
        events.push("data: [DONE]\n\n".into());
        return Reply::sse(events);
    }
    Reply::json(
        200,
        json!({"id": "chatcmpl-fake-azure", "object": "chat.completion", "created": 1700000000,
            "model": model, "system_fingerprint": "fp_fake",
            "prompt_filter_results": prompt_filter,
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": null,
                "content_filter_results": content_filter(),
                "message": {"role": "assistant", "content": AZURE_TEXTS.concat(), "refusal": null}}],
            "usage": usage}),
    )
}

fn azure_image(req: &Recorded) -> Reply {
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let n = body["n"].as_u64().unwrap_or(1);
    let data: Vec<Value> = (0..n)
        .map(|i| {
            json!({"url": format!("https://fake.blob.core.windows.net/img{i}.png"),
                   "revised_prompt": "A fake picture",
                   "content_filter_results": content_filter(),
                   "prompt_filter_results": content_filter()})
        })
        .collect();
    Reply::json(200, json!({"created": 1700000000, "data": data}))
}
