//! The Anthropic Messages wire format: request facts, the `max_tokens` output cap, usage in
//! JSON bodies and in `message_start` / `message_delta` stream events (a typed
//! [`AnthropicUsage`]), the `x-api-key` credential, the `anthropic-version` default, and the
//! family of Claude model names. Knows nothing of users, quotas or HTTP routing.

use axum::http::{HeaderName, HeaderValue};
use serde_json::Value;

use super::families::{family_for, ANTHROPIC_FALLBACK};
use super::{
    collect_content, push_json, raw, uint_field, Api, BadRequest, ReportedUsage, RequestFacts,
    Seen, MESSAGE_OVERHEAD,
};
use crate::http1::Fields;

/// The `anthropic-version` sent when the client sends none.
pub const DEFAULT_VERSION: &str = "2023-06-01";

/// Extra client headers forwarded to the Anthropic upstream (`anthropic-version` is always
/// set, see [`default_headers`]).
pub static FORWARDED_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("anthropic-beta"),
    HeaderName::from_static("anthropic-version"),
];

/// The header that carries the operator's key (the bare key).
pub const AUTH_HEADER: HeaderName = HeaderName::from_static("x-api-key");

/// Adds `anthropic-version` when the client sent none.
pub fn default_headers(headers: &mut Fields) {
    if !headers.contains_key("anthropic-version") {
        headers.append(
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_static(DEFAULT_VERSION),
        );
    }
}

/// The quota family of a model sent to an Anthropic-style upstream (unknown: `claude`).
pub fn family(model: &str) -> &'static str {
    family_for(model).unwrap_or(ANTHROPIC_FALLBACK)
}

/// Reads the facts admission needs from a Messages request body.
pub fn request_facts(api: Api, body: &Value) -> Result<RequestFacts, BadRequest> {
    let mut facts = RequestFacts {
        model: body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        choices: 1,
        ..RequestFacts::default()
    };
    if api != Api::AnthropicMessages {
        return Ok(facts);
    }
    facts.max_output = uint_field(body, "max_tokens")?;
    facts.capped_output = true;
    collect_content(body.get("system"), &mut facts);
    for m in body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        facts.prompt_fixed += MESSAGE_OVERHEAD;
        collect_content(m.get("content"), &mut facts);
    }
    if let Some(v) = body.get("tools") {
        push_json(&mut facts.prompt_text, v);
        facts.has_tools = true;
    }
    Ok(facts)
}

/// [`request_facts`] for a Messages request, read from the body's bytes without building its
/// tree (as [`super::openai::chat_facts_from_bytes`]; `None` leaves the body to the tree).
pub fn messages_facts_from_bytes(body: &[u8]) -> Option<Result<RequestFacts, BadRequest>> {
    // Each field as its JSON text, borrowed; each message's `content` (`None` for an item
    // that is not an object).
    let ([model, stream, max_tokens, system, tools], messages) = raw::request_body(
        body,
        ["model", "stream", "max_tokens", "system", "tools"],
        |r| raw::fields(r, ["content"]).map(|[content]| content),
    )?;
    let mut facts = RequestFacts {
        model: raw::model(model),
        stream: stream.and_then(raw::boolean).unwrap_or(false),
        choices: 1,
        capped_output: true,
        ..RequestFacts::default()
    };
    facts.max_output = match raw::uint_field(max_tokens, "max_tokens") {
        Ok(n) => n,
        Err(e) => return Some(Err(e)),
    };
    raw::collect(system, &mut facts)?;
    for content in messages {
        facts.prompt_fixed += MESSAGE_OVERHEAD;
        let Some(content) = content else {
            continue;
        };
        raw::collect(content, &mut facts)?;
    }
    if let Some(tools) = tools {
        raw::push(&mut facts.prompt_text, tools)?;
        facts.has_tools = true;
    }
    Some(Ok(facts))
}

/// Sets `max_tokens` (required by the Messages API).
pub fn set_output_cap(body: &mut Value, cap: u64) {
    if let Some(obj) = body.as_object_mut() {
        obj.insert("max_tokens".into(), Value::from(cap));
    }
}

/// Anthropic's `usage` object, in a whole message and in stream events.
/// Read from the response's bytes or from a `Value` through the same derived type; the
/// fields leniently ([`super::lenient`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
pub struct AnthropicUsage {
    /// Excludes cache reads and writes, which are prompt tokens too.
    #[serde(default, deserialize_with = "super::lenient::u64")]
    pub input_tokens: Option<u64>,
    #[serde(default, deserialize_with = "super::lenient::u64")]
    pub cache_creation_input_tokens: Option<u64>,
    #[serde(default, deserialize_with = "super::lenient::u64")]
    pub cache_read_input_tokens: Option<u64>,
    #[serde(default, deserialize_with = "super::lenient::u64")]
    pub output_tokens: Option<u64>,
}

impl AnthropicUsage {
    /// Reads the fields leniently; `None` when the value is not an object.
    pub fn from_json(v: &Value) -> Option<AnthropicUsage> {
        v.as_object()?;
        <AnthropicUsage as serde::Deserialize>::deserialize(v).ok()
    }

    /// `final_output`: the output count is final (everything but `message_start`, whose
    /// `output_tokens` is a placeholder).
    pub fn into_usage(self, final_output: bool) -> ReportedUsage {
        let cache = self
            .cache_creation_input_tokens
            .unwrap_or(0)
            .saturating_add(self.cache_read_input_tokens.unwrap_or(0));
        let prompt = (self.input_tokens.is_some() || cache > 0)
            .then(|| self.input_tokens.unwrap_or(0).saturating_add(cache));
        ReportedUsage {
            prompt,
            completion: self.output_tokens,
            completion_final: final_output && self.output_tokens.is_some(),
        }
    }
}

/// Reads usage and generated text from a whole message or one stream event. Anthropic streams
/// always carry usage, so no event is ever hidden.
pub fn observe(v: &Value, seen: &mut Seen) -> bool {
    let usage = |u: Option<&Value>, final_output: bool, seen: &mut Seen| {
        if let Some(u) = u.and_then(AnthropicUsage::from_json) {
            seen.usage(u.into_usage(final_output));
        }
    };
    match v.get("type").and_then(Value::as_str) {
        Some("message_start") => usage(v.pointer("/message/usage"), false, seen),
        Some("message_delta") => usage(v.get("usage"), true, seen),
        Some("content_block_start") => {
            if let Some(b) = v.get("content_block") {
                observe_block(b, seen);
            }
        }
        Some("content_block_delta") => {
            if let Some(d) = v.get("delta") {
                observe_block(d, seen);
            }
        }
        _ => {
            usage(v.get("usage"), true, seen);
            for b in v
                .get("content")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                observe_block(b, seen);
            }
        }
    }
    false
}

/// A content block or delta: text, thinking, or tool input.
fn observe_block(b: &Value, seen: &mut Seen) {
    for k in ["text", "thinking", "partial_json"] {
        if let Some(s) = b.get(k).and_then(Value::as_str) {
            seen.text(s);
        }
    }
    if let Some(input) = b
        .get("input")
        .filter(|i| i.as_object().is_some_and(|o| !o.is_empty()))
    {
        seen.text(&input.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// As for OpenAI chat: the facts read from a Messages body's bytes are the tree's.
    #[test]
    fn messages_facts_from_bytes_equal_the_trees() {
        let bodies = [
            r#"{"model":"claude-sonnet-4-5","max_tokens":1024,"messages":[{"role":"user","content":"Hello"}]}"#,
            r#" { "model" : "claude-3-5-haiku-latest" , "stream" : true , "max_tokens" : 16 , "messages" : [ ] } "#,
            r#"{"model":"claude-opus-4-1","max_tokens":null,"system":"be "brief"
é","messages":[]}"#,
            r#"{"model":"claude-opus-4-1","max_tokens":"16","messages":[]}"#,
            r#"{"model":"claude-opus-4-1","max_tokens":16.5,"messages":[]}"#,
            r#"{"model":"claude-opus-4-1","system":[{"type":"text","text":"sys","cache_control":{"type":"ephemeral"}}],"messages":[{"role":"user","content":[{"type":"text","text":"look"},{"type":"image","source":{"type":"base64","media_type":"image/png","data":"AAAA"}},{"type":"document","source":{}}]},{"role":"assistant","content":[{"type":"thinking","thinking":"hmm"},{"type":"tool_use","id":"t1","name":"f","input":{"q":1}}]},{"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":[{"type":"text","text":"42"}]}]},"stray",3,null,["list"]],"tools":[{"name":"f","input_schema":{"type":"object"}}]}"#,
            r#"{"model":7,"stream":"yes","messages":"none","tools":null}"#,
            r#"{"model":"claude-opus-4-1","messages":[{"role":"user","content":{"odd":1}}],"metadata":{"user_id":"u"}}"#,
            r#"{"model":"a","model":"b","messages":[]}"#,
            r#"{"model":"a","messages":[{"content":"x","content":"y"}]}"#,
            r#"[1,2]"#,
            r#"{"model":"a","messages":[}"#,
        ];
        for body in bodies {
            let from_bytes = messages_facts_from_bytes(body.as_bytes());
            let tree: Result<Value, _> = serde_json::from_str(body);
            match (from_bytes, tree) {
                (Some(got), Ok(tree)) => {
                    assert!(tree.is_object(), "read a non-object from its bytes: {body}");
                    assert_eq!(got, request_facts(Api::AnthropicMessages, &tree), "{body}");
                }
                (None, tree) => assert!(
                    body.matches("\"model\"").count() > 1
                        || body.matches("\"content\"").count() > 1
                        || tree.map_or(true, |t| !t.is_object()),
                    "{body} was left to the tree"
                ),
                (Some(got), Err(e)) => panic!("read invalid JSON {body} ({e}) as {got:?}"),
            }
        }
    }

    #[test]
    fn messages_request_facts() {
        let b = json!({"model":"claude-sonnet-4-5","max_tokens":50,
            "system":[{"type":"text","text":"Be kind."}],
            "messages":[{"role":"user","content":"hello there"},
                {"role":"assistant","content":[{"type":"tool_use","id":"t","name":"f","input":{"q":"x"}}]},
                {"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":"result text"}]}]});
        let f = request_facts(Api::AnthropicMessages, &b).expect("ok");
        assert_eq!(f.max_output, Some(50));
        assert_eq!(f.prompt_fixed, 3 * MESSAGE_OVERHEAD);
        assert!(f.prompt_text.contains("result text"));
        let b = json!({"model":"claude-sonnet-4-5","max_tokens":"50","messages":[]});
        assert!(request_facts(Api::AnthropicMessages, &b).is_err());
    }

    #[test]
    fn usage_counts_cache_tokens() {
        let u = AnthropicUsage::from_json(&json!({"input_tokens":9,"output_tokens":4,
            "cache_read_input_tokens":1}))
        .expect("object");
        assert_eq!(
            u.into_usage(true),
            ReportedUsage {
                prompt: Some(10),
                completion: Some(4),
                completion_final: true
            }
        );
    }
}
