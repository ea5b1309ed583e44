//! The OpenAI wire format (chat completions, legacy completions, embeddings): request facts,
//! the output-cap fields, `stream_options.include_usage`, usage in JSON bodies and stream
//! chunks (a typed [`OpenAiUsage`]), the `Authorization: Bearer` credential, and the family of
//! OpenAI model names. Other providers that speak this format (Mistral, Azure) reuse these
//! functions. Knows nothing of users, quotas or HTTP routing.

use axum::http::{header, HeaderName};
use serde_json::Value;

use super::families::{family_for, OPENAI_FALLBACK};
use super::{
    collect_content, push_json, push_str, push_text, raw, uint_field, Api, BadRequest,
    ReportedUsage, RequestFacts, Seen, MESSAGE_OVERHEAD,
};

/// Extra client headers forwarded to an OpenAI upstream.
pub static FORWARDED_HEADERS: [HeaderName; 1] = [HeaderName::from_static("openai-beta")];

/// The header that carries the operator's key.
pub const AUTH_HEADER: HeaderName = header::AUTHORIZATION;

/// The header naming which of its organisations an OpenAI key acts for (`OPENAI_KEY`'s
/// `key:org` entries).
pub const ORGANIZATION_HEADER: HeaderName = HeaderName::from_static("openai-organization");

/// `Bearer <key>`.
pub fn key_credential(key: &str) -> String {
    format!("Bearer {key}")
}

/// The quota family of a model sent to an OpenAI-style upstream (unknown models: `gpt4`).
pub fn family(model: &str) -> &'static str {
    family_for(model).unwrap_or(OPENAI_FALLBACK)
}

/// Prompt tokens every chat request is charged for the reply's priming, as OpenAI documents.
const REPLY_PRIMING: u64 = 3;

/// Reads the facts admission needs from a request body of an OpenAI-format API.
pub fn request_facts(api: Api, body: &Value) -> Result<RequestFacts, BadRequest> {
    if api == Api::OpenAiImages {
        // An image is counted by its price, not its prompt (as the original).
        return Ok(RequestFacts {
            model: body
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or(super::images::DEFAULT_MODEL)
                .to_string(),
            prompt_fixed: super::images::cost_tokens(body)?,
            choices: 1,
            ..RequestFacts::default()
        });
    }
    let mut facts = RequestFacts {
        model: body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        include_usage: body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        choices: 1,
        ..RequestFacts::default()
    };
    match api {
        Api::OpenAiChat | Api::OpenAiCompletions => {
            // Both fields are read (and checked) so that a bad one is never silently ignored;
            // `max_completion_tokens` is the newer name and wins.
            let newer = uint_field(body, "max_completion_tokens")?;
            let older = uint_field(body, "max_tokens")?;
            facts.max_output = newer.or(older);
            facts.capped_output = true;
            // `n` choices each may use the cap; a silly `n` is the upstream's to refuse.
            facts.choices = body
                .get("n")
                .and_then(Value::as_u64)
                .unwrap_or(1)
                .clamp(1, 128);
        }
        _ => {}
    }
    match api {
        Api::OpenAiChat => {
            // Every reply is primed with a few tokens (`<|start|>assistant<|message|>`).
            facts.prompt_fixed += REPLY_PRIMING;
            for m in body
                .get("messages")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                facts.prompt_fixed += MESSAGE_OVERHEAD;
                for k in ["role", "name"] {
                    push_str(&mut facts.prompt_text, m.get(k));
                }
                collect_content(m.get("content"), &mut facts);
                if let Some(calls) = m.get("tool_calls") {
                    push_json(&mut facts.prompt_text, calls);
                }
            }
            for k in ["tools", "functions", "response_format"] {
                if let Some(v) = body.get(k) {
                    push_json(&mut facts.prompt_text, v);
                    if k != "response_format" {
                        facts.has_tools = true;
                    }
                }
            }
        }
        Api::OpenAiCompletions => collect_input(body.get("prompt"), &mut facts),
        Api::OpenAiEmbeddings => collect_input(body.get("input"), &mut facts),
        _ => {}
    }
    Ok(facts)
}

/// [`request_facts`] for a chat request, read from the body's bytes without building its tree
/// (issue 18: the tree of a small chat body costs more allocations than the rest of the
/// request's admission). The top-level fields and each message are borrowed from the body; the
/// rare parts whose text the facts keep as JSON (`tool_calls`, `tools`, `functions`,
/// `response_format`) or that may hold images (a `content` array) are read into a `Value` and
/// handed to the same functions as on the tree path, so both paths give the same facts.
///
/// `None` when the body is anything this reader does not take as a plain JSON object (not an
/// object, invalid JSON, a duplicated field, an escaped key, nesting deeper than
/// [`raw::Reader`] goes): the caller then reads the tree, which answers those cases as before.
pub fn chat_facts_from_bytes(body: &[u8]) -> Option<Result<RequestFacts, BadRequest>> {
    // Each field as its JSON text, borrowed from the body (a present `null` is told from an
    // absent field); each message's fields likewise.
    let (
        [model, stream, stream_options, max_completion_tokens, max_tokens, n, tools, functions, response_format],
        messages,
    ) = raw::request_body(
        body,
        [
            "model",
            "stream",
            "stream_options",
            "max_completion_tokens",
            "max_tokens",
            "n",
            "tools",
            "functions",
            "response_format",
        ],
        |r| raw::fields(r, ["role", "name", "content", "tool_calls"]),
    )?;
    let include_usage = match stream_options {
        Some(o) if raw::first_byte(o) == Some(b'{') => {
            let [include_usage] = raw::fields(&mut raw::Reader::of(o), ["include_usage"])?;
            include_usage
        }
        _ => None,
    };
    let mut facts = RequestFacts {
        model: raw::model(model),
        stream: stream.and_then(raw::boolean).unwrap_or(false),
        include_usage: include_usage.and_then(raw::boolean).unwrap_or(false),
        choices: n.and_then(raw::unsigned).unwrap_or(1).clamp(1, 128),
        capped_output: true,
        prompt_fixed: REPLY_PRIMING,
        // The prompt's text is read out of the body: sized once for a usual prompt rather
        // than grown string by string (each growth is a reallocation). Capped: the text is
        // kept while the request runs, and a large body is mostly images.
        prompt_text: String::with_capacity(body.len().min(4096)),
        ..RequestFacts::default()
    };
    let newer = match raw::uint_field(max_completion_tokens, "max_completion_tokens") {
        Ok(n) => n,
        Err(e) => return Some(Err(e)),
    };
    let older = match raw::uint_field(max_tokens, "max_tokens") {
        Ok(n) => n,
        Err(e) => return Some(Err(e)),
    };
    facts.max_output = newer.or(older);
    for m in messages {
        facts.prompt_fixed += MESSAGE_OVERHEAD;
        let Some([role, name, content, tool_calls]) = m else {
            continue;
        };
        for field in [role, name] {
            if let Some(s) = field.and_then(raw::string) {
                push_text(&mut facts.prompt_text, &s);
            }
        }
        raw::collect(content, &mut facts)?;
        if let Some(calls) = tool_calls {
            raw::push(&mut facts.prompt_text, calls)?;
        }
    }
    for (field, tools) in [(tools, true), (functions, true), (response_format, false)] {
        if let Some(v) = field {
            raw::push(&mut facts.prompt_text, v)?;
            facts.has_tools |= tools;
        }
    }
    Some(Ok(facts))
}

/// A completions `prompt` or embeddings `input`: a string, an array of strings, an array of
/// token ids, or an array of such arrays.
fn collect_input(input: Option<&Value>, facts: &mut RequestFacts) {
    match input {
        Some(Value::String(s)) => push_text(&mut facts.prompt_text, s),
        Some(Value::Array(items)) => {
            for item in items {
                match item {
                    Value::String(s) => push_text(&mut facts.prompt_text, s),
                    Value::Number(_) => facts.prompt_fixed += 1,
                    Value::Array(ids) => facts.prompt_fixed += ids.len() as u64,
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

/// Sets the output cap. Chat: the field the client used (a model that accepted the client's
/// request accepts that field), else `max_completion_tokens`, the field current models
/// require (`max_tokens` is deprecated and refused by reasoning models); legacy completions:
/// `max_tokens`. The other field is removed so that the two cannot disagree.
pub fn set_output_cap(api: Api, body: &mut Value, cap: u64) {
    let Some(obj) = body.as_object_mut() else {
        return;
    };
    let only_old = obj.contains_key("max_tokens") && !obj.contains_key("max_completion_tokens");
    let (field, other) = match api {
        Api::OpenAiCompletions => ("max_tokens", "max_completion_tokens"),
        _ if only_old => ("max_tokens", "max_completion_tokens"),
        _ => ("max_completion_tokens", "max_tokens"),
    };
    obj.remove(other);
    obj.insert(field.into(), Value::from(cap));
}

/// As [`set_output_cap`], always in `max_tokens` (for OpenAI-compatible upstreams that know
/// only that field, such as Mistral).
pub fn set_max_tokens(body: &mut Value, cap: u64) {
    if let Some(obj) = body.as_object_mut() {
        obj.remove("max_completion_tokens");
        obj.insert("max_tokens".into(), Value::from(cap));
    }
}

/// Asks a chat or completions stream for its usage (`stream_options.include_usage`) when the
/// client did not; true when the proxy asked (the usage-only chunk is then hidden).
pub fn ask_stream_usage(api: Api, body: &mut Value, facts: &RequestFacts) -> bool {
    if !wants_stream_usage(api, facts) {
        return false;
    }
    let Some(obj) = body.as_object_mut() else {
        return false;
    };
    let opts = obj
        .entry("stream_options")
        .or_insert_with(|| serde_json::json!({}));
    if !opts.is_object() {
        *opts = serde_json::json!({});
    }
    if let Some(o) = opts.as_object_mut() {
        o.insert("include_usage".into(), Value::Bool(true));
    }
    true
}

/// Whether [`ask_stream_usage`] changes the body: a chat or completions stream whose client
/// did not ask for usage itself.
pub fn wants_stream_usage(api: Api, facts: &RequestFacts) -> bool {
    facts.stream && !facts.include_usage && matches!(api, Api::OpenAiChat | Api::OpenAiCompletions)
}

/// OpenAI's `usage` object (chat, completions, embeddings; Mistral and Azure alike).
/// Read from the response's bytes or from a `Value` through the same derived type; the
/// fields leniently ([`super::lenient`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
pub struct OpenAiUsage {
    /// Includes cached prompt tokens.
    #[serde(default, deserialize_with = "super::lenient::u64")]
    pub prompt_tokens: Option<u64>,
    #[serde(default, deserialize_with = "super::lenient::u64")]
    pub completion_tokens: Option<u64>,
    #[serde(default, deserialize_with = "super::lenient::u64")]
    pub total_tokens: Option<u64>,
}

impl OpenAiUsage {
    /// Reads the fields leniently: a missing or non-integer field is absent. `None` when the
    /// value is not an object or carries no prompt count.
    pub fn from_json(v: &Value) -> Option<OpenAiUsage> {
        let u = <OpenAiUsage as serde::Deserialize>::deserialize(v).ok()?;
        u.prompt_tokens.is_some().then_some(u)
    }

    /// Read from a usage object's JSON text, as the derived reader reads it, without serde
    /// (issue 18: about 900 instructions per answer): `None` when the text is not an object
    /// this reader takes (an escaped key, a duplicated field, not an object), left to serde.
    pub fn from_text(text: &str) -> Option<OpenAiUsage> {
        let mut r = raw::Reader::of(text);
        let [prompt, completion, total] = raw::fields(
            &mut r,
            ["prompt_tokens", "completion_tokens", "total_tokens"],
        )?;
        r.end()?;
        // `lenient::u64`: a non-negative integer (serde reads `-0` as a float).
        Some(OpenAiUsage {
            prompt_tokens: prompt.and_then(raw::unsigned),
            completion_tokens: completion.and_then(raw::unsigned),
            total_tokens: total.and_then(raw::unsigned),
        })
    }

    /// OpenAI reports usage once, final; a missing completion count is `total - prompt`.
    pub fn into_usage(self) -> ReportedUsage {
        let prompt = self.prompt_tokens.unwrap_or(0);
        ReportedUsage {
            prompt: Some(prompt),
            completion: Some(
                self.completion_tokens
                    .or_else(|| self.total_tokens.map(|t| t.saturating_sub(prompt)))
                    .unwrap_or(0),
            ),
            completion_final: true,
        }
    }
}

/// Reads usage and generated text from a whole response or one stream chunk; true for the
/// usage-only chunk (no choices) that `stream_options.include_usage` adds.
pub fn observe(v: &Value, seen: &mut Seen) -> bool {
    if let Some(m) = v.get("model").and_then(Value::as_str) {
        seen.model(m);
    }
    let usage = v.get("usage").and_then(OpenAiUsage::from_json);
    if let Some(u) = usage {
        seen.usage(u.into_usage());
    }
    let choices = v.get("choices").and_then(Value::as_array);
    for c in choices.into_iter().flatten() {
        for k in [
            "/text",
            "/delta/content",
            "/delta/reasoning_content",
            "/delta/refusal",
            "/message/content",
            "/message/refusal",
        ] {
            if let Some(s) = c.pointer(k).and_then(Value::as_str) {
                seen.text(s);
            }
        }
        for calls in ["/delta/tool_calls", "/message/tool_calls"] {
            for call in c
                .pointer(calls)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(a) = call.pointer("/function/arguments").and_then(Value::as_str) {
                    seen.text(a);
                }
            }
        }
    }
    v.get("usage").is_some_and(Value::is_object) && choices.is_some_and(|c| c.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The facts read from a body's bytes are the facts read from its tree, for every shape a
    /// chat body takes (and the reader leaves to the tree exactly the bodies it cannot read).
    #[test]
    fn chat_facts_from_bytes_equal_the_trees() {
        let bodies = [
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one word."}],"max_tokens":16}"#,
            r#" { "model" : "gpt-4o" , "stream" : true , "messages" : [ ] } "#,
            r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#,
            r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":"yes"},"messages":[]}"#,
            r#"{"model":"gpt-4o","stream":"true","stream_options":[1],"messages":[]}"#,
            r#"{"model":"o3","max_completion_tokens":100,"max_tokens":5,"n":3,"messages":[]}"#,
            r#"{"model":"o3","max_completion_tokens":null,"max_tokens":7,"n":0,"messages":[]}"#,
            r#"{"model":"o3","n":1000,"messages":[]}"#,
            r#"{"model":"o3","n":2.5,"messages":[]}"#,
            r#"{"model":"o3","max_tokens":"16","messages":[]}"#,
            r#"{"model":"o3","max_tokens":1.5,"messages":[]}"#,
            r#"{"model":"o3","max_completion_tokens":-1,"max_tokens":"x","messages":[]}"#,
            r#"{"model":"o3","max_tokens":{"a": [1, 2]},"messages":[]}"#,
            r#"{"model":42,"messages":"not a list"}"#,
            r#"{"messages":null,"model":null}"#,
            r#"{"model":"gpt-4o","messages":[{"role":"system","name":"bot","content":"be "brief"
é"},{"role":"user","content":[{"type":"text","text":"look"},{"type":"image_url","image_url":{"url":"data:x"}}]},{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"tool","content":"42"},"stray string",7,null]}"#,
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":{"odd":"object"}}],"tools":[ {"type": "function", "function": {"name": "f"}} ],"functions":null,"response_format":{"type":"json_object"}}"#,
            r#"{"model":"gpt-4o","messages":[],"tools":null}"#,
            r#"{"model":"gpt-4o","messages":[],"unknown":{"deep":[1,{"x":null}]},"temperature":0.2}"#,
            r#"{"model":"gpt-4o","model":"gpt-3.5-turbo","messages":[]}"#,
            r#"{"model":"gpt-4o","messages":[{"role":"user","role":"system","content":"x"}]}"#,
            r#"{"model":"gpt-4o","messages":[["user","hi"]]}"#,
            r#"{"model":"gpt-4o","messages":{"role":"user","content":"an object, not a list"}}"#,
            r#"{"model":"gpt-4o","messages":3.5,"max_tokens":2}"#,
            r#"{"model":"gpt-4o","messages":[true,{"content":"a\"b"},[{"x":[]}],{}],"n":2}"#,
            r#"["gpt-4o",[]]"#,
            r#"{"model":"gpt-4o","messages":[}"#,
            r#""just a string""#,
        ];
        for body in bodies {
            let from_bytes = chat_facts_from_bytes(body.as_bytes());
            let tree: Result<Value, _> = serde_json::from_str(body);
            match (from_bytes, tree) {
                (Some(got), Ok(tree)) => {
                    assert!(tree.is_object(), "read a non-object from its bytes: {body}");
                    let want = request_facts(Api::OpenAiChat, &tree);
                    assert_eq!(got, want, "{body}");
                }
                // Left to the tree: duplicated fields, invalid JSON, not an object, a
                // message that is a list.
                (None, _) => assert!(
                    body.matches("\"model\"").count() > 1
                        || body.matches("\"role\"").count() > 1
                        || body.contains("[[")
                        || !body.trim_start().starts_with('{')
                        || serde_json::from_str::<Value>(body).is_err(),
                    "{body} was left to the tree"
                ),
                (Some(got), Err(e)) => panic!("read invalid JSON {body} ({e}) as {got:?}"),
            }
        }
    }

    /// On every text one byte away from the fixtures, the reader of bytes either leaves the
    /// body to the tree or reads what the tree reads: it never reads facts from a body serde
    /// refuses, nor other facts than the tree's.
    #[test]
    fn chat_facts_from_bytes_never_differ_from_the_tree_on_near_bodies() {
        let fixtures = [
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one word."}],"max_tokens":16}"#,
            r#"{"model":"o3","stream":true,"stream_options":{"include_usage":true},"n":2,"max_completion_tokens":9,"messages":[{"role":"system","name":"b","content":"x\"y"},{"role":"user","content":[{"type":"text","text":"t"}]},7],"tools":[{"type":"function"}]}"#,
        ];
        let mut read = 0;
        for body in crate::providers::raw::tests::near_texts(&fixtures) {
            let Some(got) = chat_facts_from_bytes(body.as_bytes()) else {
                continue;
            };
            let tree: Value = match serde_json::from_str(&body) {
                Ok(v) => v,
                Err(e) => panic!("read invalid JSON {body} ({e}) as {got:?}"),
            };
            assert!(tree.is_object(), "{body}");
            assert_eq!(got, request_facts(Api::OpenAiChat, &tree), "{body}");
            read += 1;
        }
        assert!(read > 100, "{read}");
    }

    /// The usage read without serde is the derived reader's, on usage objects and on every
    /// text one byte away from them (or left to serde).
    #[test]
    fn usage_from_text_equals_serdes_reading() {
        let fixtures = [
            r#"{"prompt_tokens":14,"completion_tokens":2,"total_tokens":16}"#,
            r#"{ "prompt_tokens" : 9 , "total_tokens" : 20, "prompt_tokens_details": {"cached_tokens": 3, "x": [1, "2"]}, "completion_tokens_details": null }"#,
            r#"{"prompt_tokens":-0,"completion_tokens":1.5,"total_tokens":"7","extra":true}"#,
        ];
        let read = OpenAiUsage::from_text(fixtures[0]).expect("read");
        assert_eq!(read.into_usage().completion, Some(2));
        let mut compared = 0;
        for text in crate::providers::raw::tests::near_texts(&fixtures) {
            let Some(ours) = OpenAiUsage::from_text(&text) else {
                continue;
            };
            let serde: OpenAiUsage = match serde_json::from_str(&text) {
                Ok(u) => u,
                Err(e) => panic!("read {text} ({e}) as {ours:?}"),
            };
            assert_eq!(ours, serde, "{text}");
            compared += 1;
        }
        assert!(compared > 100, "{compared}");
    }

    #[test]
    fn chat_request_facts() {
        let body = json!({
            "model": "gpt-4o", "max_tokens": 100, "n": 2, "stream": true,
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": [
                    {"type": "text", "text": "Describe this picture"},
                    {"type": "image_url", "image_url": {"url": "data:..."}}
                ]}
            ]
        });
        let f = request_facts(Api::OpenAiChat, &body).expect("facts");
        assert_eq!(f.model, "gpt-4o");
        assert_eq!(f.max_output, Some(100));
        assert_eq!(f.max_completion(), 200);
        assert!(f.stream && !f.include_usage);
        assert!(f.has_images && f.has_tools);
        assert!(f.prompt_fixed >= super::super::IMAGE_TOKENS + 2 * MESSAGE_OVERHEAD);
    }

    #[test]
    fn max_completion_tokens_wins_and_absent_is_none() {
        let b = json!({"model":"o3","max_completion_tokens":7,"max_tokens":99,"messages":[]});
        assert_eq!(
            request_facts(Api::OpenAiChat, &b).expect("ok").max_output,
            Some(7)
        );
        let b = json!({"model":"o3","messages":[],"stream":true,
            "stream_options":{"include_usage":true}});
        let f = request_facts(Api::OpenAiChat, &b).expect("ok");
        assert_eq!(f.max_output, None);
        assert_eq!(f.max_completion(), 0);
        assert!(f.include_usage);
    }

    #[test]
    fn string_or_float_caps_are_refused() {
        for bad in [json!("100"), json!(100.5), json!(-1), json!(true)] {
            for field in ["max_tokens", "max_completion_tokens"] {
                let b = json!({"model":"gpt-4o","messages":[], field: bad.clone()});
                let e = request_facts(Api::OpenAiChat, &b).expect_err("refused");
                assert!(e.0.contains(field), "{}", e.0);
            }
        }
    }

    #[test]
    fn output_cap_is_written_in_the_current_field() {
        let mut b = json!({"model":"gpt-4o","messages":[]});
        set_output_cap(Api::OpenAiChat, &mut b, 300);
        assert_eq!(b["max_completion_tokens"], 300);
        assert!(b.get("max_tokens").is_none());
        let mut b = json!({"model":"gpt-4o","max_tokens":5000,"messages":[]});
        set_output_cap(Api::OpenAiChat, &mut b, 300);
        assert_eq!(b["max_tokens"], 300);
        assert!(b.get("max_completion_tokens").is_none());
        let mut b = json!({"model":"o3","max_tokens":1,"max_completion_tokens":5000});
        set_output_cap(Api::OpenAiChat, &mut b, 300);
        assert_eq!(b["max_completion_tokens"], 300);
        assert!(b.get("max_tokens").is_none());
        let mut b = json!({"model":"gpt-3.5-turbo-instruct","prompt":"x"});
        set_output_cap(Api::OpenAiCompletions, &mut b, 20);
        assert_eq!(b["max_tokens"], 20);
    }

    #[test]
    fn usage_only_chunk_is_recognised() {
        let mut s = Seen::default();
        let v = json!({"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}});
        assert!(observe(&v, &mut s));
        assert_eq!((s.prompt, s.completion), (Some(3), Some(4)));
        let v = json!({"choices":[{"delta":{"content":"hi"}}]});
        assert!(!observe(&v, &mut s));
        assert_eq!(s.text, "hi");
    }
}
