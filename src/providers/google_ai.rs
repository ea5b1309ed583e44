//! Google AI (the Gemini API at generativelanguage.googleapis.com): everything about its wire.
//! Client paths (`/{v1|v1beta}/models/{model}:{method}`), the upstream URL (the operator key
//! goes in the `x-goog-api-key` header, never in a URL: URLs end up in logs), the facts
//! admission needs (model from the path, `generationConfig.maxOutputTokens`, prompt text),
//! the output cap, usage from `usageMetadata` (a stream repeats running totals: the last one
//! counts), the client key Google's SDKs send in `x-goog-api-key` or `?key=`, the model list
//! (served in both Gemini's and OpenAI's shape) and the model → family map. Knows nothing of
//! users, quotas or HTTP plumbing.

use axum::http::HeaderName;
use serde_json::{json, Map, Value};

use super::families::{family_for, GEMINI_FALLBACK};
use super::translate::gemini::UsageMetadata;
use super::{uint_field, Api, BadRequest, ReportedUsage, RequestFacts, Seen, MESSAGE_OVERHEAD};

/// The header Google AI reads the API key from (the operator's key upstream, and one of the
/// places a client may send its proxy credential).
pub const KEY_HEADER: &str = "x-goog-api-key";
/// [`KEY_HEADER`] as the header that carries the operator's key (the bare key).
pub const AUTH_HEADER: HeaderName = HeaderName::from_static(KEY_HEADER);
/// The query parameter Google's REST examples put the key in: read as a client credential,
/// and always removed before the request goes upstream.
pub const KEY_QUERY: &str = "key";
pub const DEFAULT_BASE_URL: &str = "https://generativelanguage.googleapis.com";

/// Prompt tokens counted per inline image or file (Gemini: 258 per image up to 384 px).
const MEDIA_TOKENS: u64 = 258;

/// An API version Google serves the Gemini methods under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V1Beta,
}

impl Version {
    pub fn parse(s: &str) -> Option<Version> {
        match s {
            "v1" => Some(Version::V1),
            "v1beta" => Some(Version::V1Beta),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V1Beta => "v1beta",
        }
    }
}

/// The generation methods the proxy forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    GenerateContent,
    StreamGenerateContent,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::GenerateContent => "generateContent",
            Method::StreamGenerateContent => "streamGenerateContent",
        }
    }
    pub fn is_stream(self) -> bool {
        self == Method::StreamGenerateContent
    }
}

/// Splits the last path segment `{model}:{method}` (e.g. `gemini-2.5-flash:generateContent`).
/// The model must be a plain Gemini model id, so that it cannot change the upstream path.
pub fn parse_model_method(segment: &str) -> Result<(String, Method), String> {
    let Some((model, method)) = segment.rsplit_once(':') else {
        return Err(format!(
            "The path must end in models/{{model}}:generateContent or \
             models/{{model}}:streamGenerateContent, not `{segment}`."
        ));
    };
    let method = match method {
        "generateContent" => Method::GenerateContent,
        "streamGenerateContent" => Method::StreamGenerateContent,
        other => {
            return Err(format!(
                "The method `{other}` is not served here: use generateContent or \
                 streamGenerateContent."
            ))
        }
    };
    let model = model.strip_prefix("models/").unwrap_or(model);
    check_model(model)?;
    Ok((model.to_owned(), method))
}

/// A model id safe to put in an upstream path: letters, digits, `-`, `.`, `_`.
pub fn check_model(model: &str) -> Result<(), String> {
    let ok = !model.is_empty()
        && model.len() <= 128
        && model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{model}` is not a Gemini model id (letters, digits, `-`, `.` and `_` only), e.g. \
             gemini-2.5-flash."
        ))
    }
}

/// The upstream path and query of a generation call: `alt=sse` for streams, so that the
/// answer is a server-sent event stream rather than a JSON array; no key.
pub fn generate_path(version: Version, model: &str, method: Method) -> String {
    let mut path = format!("/{}/models/{model}:{}", version.as_str(), method.as_str());
    if method.is_stream() {
        path.push_str("?alt=sse");
    }
    path
}

/// The upstream path of the model list, with the client's paging parameters (only those).
pub fn models_path(version: Version, query: Option<&str>) -> String {
    let mut path = format!("/{}/models", version.as_str());
    let keep: Vec<(String, String)> = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(|(k, _)| k == "pageSize" || k == "pageToken")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if !keep.is_empty() {
        path.push('?');
        path.push_str(
            &url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(keep)
                .finish(),
        );
    }
    path
}

/// The client's `?key=` credential (the first one), and the query without any `key`
/// parameter (`None` when nothing else is left). Query keys are only ever read here.
pub fn take_query_key(query: &str) -> (Option<String>, Option<String>) {
    let mut key = None;
    let mut rest = url::form_urlencoded::Serializer::new(String::new());
    let mut any = false;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        if k == KEY_QUERY {
            if key.is_none() {
                key = Some(v.into_owned());
            }
        } else {
            rest.append_pair(&k, &v);
            any = true;
        }
    }
    (key, any.then(|| rest.finish()))
}

/// The quota family of a model sent to Google AI (see [`super::families`]: `gemini-flash`,
/// `gemini-pro`, `gemini-ultra` as the original; any other model `gemini-pro`).
pub fn family(model: &str) -> &'static str {
    family_for(model).unwrap_or(GEMINI_FALLBACK)
}

/// Reads the facts admission needs from a Google AI request body. The model is in the path,
/// not the body: the route supplies it. The stream flag is the method
/// ([`Api::GoogleAiStream`]).
pub fn request_facts_for(api: Api, body: &Value) -> Result<RequestFacts, BadRequest> {
    let mut facts = RequestFacts {
        stream: api == Api::GoogleAiStream,
        choices: 1,
        ..RequestFacts::default()
    };
    if !matches!(api, Api::GoogleAiGenerate | Api::GoogleAiStream) {
        return Ok(facts);
    }
    let config = generation_config(body);
    if let Some(c) = config {
        facts.max_output = uint_field(c, "maxOutputTokens")
            .map_err(|e| BadRequest(format!("generationConfig.{}", e.0)))?;
        facts.choices = uint_field(c, "candidateCount")
            .map_err(|e| BadRequest(format!("generationConfig.{}", e.0)))?
            .unwrap_or(1)
            .clamp(1, 8);
    }
    facts.capped_output = true;
    for k in ["systemInstruction", "system_instruction"] {
        if let Some(c) = body.get(k) {
            collect_content(c, &mut facts);
        }
    }
    for c in body
        .get("contents")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        facts.prompt_fixed += MESSAGE_OVERHEAD;
        collect_content(c, &mut facts);
    }
    if let Some(tools) = body.get("tools") {
        facts.has_tools = true;
        push(&mut facts.prompt_text, &tools.to_string());
    }
    Ok(facts)
}

/// `generationConfig` (SDKs that write snake case send `generation_config`, which Google also
/// accepts).
fn generation_config(body: &Value) -> Option<&Value> {
    body.get("generationConfig")
        .or_else(|| body.get("generation_config"))
}

fn collect_content(content: &Value, facts: &mut RequestFacts) {
    // `parts` may be one object instead of a list.
    let parts = match content.get("parts") {
        Some(Value::Array(parts)) => parts.iter().collect::<Vec<_>>(),
        Some(p @ Value::Object(_)) => vec![p],
        _ => Vec::new(),
    };
    for p in parts {
        if let Some(t) = p.get("text").and_then(Value::as_str) {
            push(&mut facts.prompt_text, t);
        }
        for k in ["inlineData", "inline_data", "fileData", "file_data"] {
            if p.get(k).is_some() {
                facts.prompt_fixed += MEDIA_TOKENS;
                facts.has_images = true;
            }
        }
        for k in [
            "functionCall",
            "function_call",
            "functionResponse",
            "function_response",
        ] {
            if let Some(v) = p.get(k) {
                push(&mut facts.prompt_text, &v.to_string());
            }
        }
    }
}

fn push(text: &mut String, s: &str) {
    if !text.is_empty() {
        text.push('\n');
    }
    text.push_str(s);
}

/// Caps `generationConfig.maxOutputTokens` at `cap` (sets it when absent, lowers it when
/// higher). Returns whether the body changed.
pub fn set_output_cap(body: &mut Value, cap: u64) -> bool {
    let Some(obj) = body.as_object_mut() else {
        return false;
    };
    let key = if obj.contains_key("generation_config") && !obj.contains_key("generationConfig") {
        "generation_config"
    } else {
        "generationConfig"
    };
    let config = obj.entry(key).or_insert_with(|| Value::Object(Map::new()));
    let Some(config) = config.as_object_mut() else {
        return false;
    };
    match config.get("maxOutputTokens").and_then(Value::as_u64) {
        Some(current) if current <= cap => false,
        _ => {
            config.insert("maxOutputTokens".to_owned(), json!(cap));
            true
        }
    }
}

impl UsageMetadata {
    /// Reads a `usageMetadata` object.
    pub fn from_json(v: &Value) -> Option<UsageMetadata> {
        v.is_object()
            .then(|| serde_json::from_value(v.clone()).ok())
            .flatten()
    }

    /// Every report is a running total that the next one replaces, so each is final as far
    /// as it goes: a stream cut short is charged what it reported last.
    pub fn into_usage(self) -> ReportedUsage {
        ReportedUsage {
            prompt: Some(self.prompt()),
            completion: Some(self.completion()),
            completion_final: true,
        }
    }
}

/// A `usageMetadata` object (the meter's fast path reads only that field).
pub fn usage_from_json(u: &Value) -> Option<ReportedUsage> {
    Some(UsageMetadata::from_json(u)?.into_usage())
}

/// Reads one whole answer, one stream event, or a non-SSE stream (a JSON array of answers)
/// into `seen`. Never a usage-only event to hide.
pub fn observe(v: &Value, seen: &mut Seen) -> bool {
    if let Some(u) = usage(v) {
        seen.usage(u.into_usage());
    }
    generated_text(v, |t| seen.text(t));
    false
}

/// Usage in a whole answer, one stream event, or a non-SSE stream (a JSON array of answers,
/// whose last `usageMetadata` is the total).
pub fn usage(v: &Value) -> Option<UsageMetadata> {
    match v {
        Value::Array(items) => items.iter().rev().find_map(usage),
        _ => v.get("usageMetadata").and_then(UsageMetadata::from_json),
    }
}

/// The generated text of an answer or stream event (thoughts included: they are billed as
/// output), for the fallback estimate when no usage arrives.
pub fn generated_text(v: &Value, mut push_text: impl FnMut(&str)) {
    let events: Vec<&Value> = match v {
        Value::Array(items) => items.iter().collect(),
        _ => vec![v],
    };
    for e in events {
        for c in e
            .get("candidates")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            for p in c
                .pointer("/content/parts")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(t) = p.get("text").and_then(Value::as_str) {
                    push_text(t);
                }
                if let Some(f) = p.get("functionCall") {
                    push_text(&f.to_string());
                }
            }
        }
    }
}

/// The upstream's model list (`{"models":[…],"nextPageToken"}`) with an OpenAI-style
/// `{"object":"list","data":[…]}` beside it, so that Google's SDKs and OpenAI clients pointed at
/// `…/google-ai/v1` both read it.
pub fn models_list(upstream: &Value) -> Value {
    let mut out = match upstream {
        Value::Object(o) => o.clone(),
        _ => Map::new(),
    };
    let data: Vec<Value> = upstream
        .get("models")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| m.get("name").and_then(Value::as_str))
        .map(|name| {
            json!({
                "id": name.strip_prefix("models/").unwrap_or(name),
                "object": "model",
                "created": 0,
                "owned_by": "google",
            })
        })
        .collect();
    out.insert("object".to_owned(), json!("list"));
    out.insert("data".to_owned(), Value::Array(data));
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_and_method_from_the_path() {
        assert_eq!(
            parse_model_method("gemini-2.5-flash:generateContent"),
            Ok(("gemini-2.5-flash".to_owned(), Method::GenerateContent))
        );
        assert_eq!(
            parse_model_method("gemini-1.5-pro-latest:streamGenerateContent"),
            Ok((
                "gemini-1.5-pro-latest".to_owned(),
                Method::StreamGenerateContent
            ))
        );
        for bad in [
            "gemini:countTokens",
            "gemini-2.5-flash",
            "..%2F..:generateContent",
            "a/b:generateContent",
            ":generateContent",
        ] {
            assert!(parse_model_method(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn upstream_paths_carry_no_key() {
        assert_eq!(
            generate_path(
                Version::V1Beta,
                "gemini-2.5-pro",
                Method::StreamGenerateContent
            ),
            "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse"
        );
        assert_eq!(
            generate_path(Version::V1, "gemini-2.5-pro", Method::GenerateContent),
            "/v1/models/gemini-2.5-pro:generateContent"
        );
        assert_eq!(
            models_path(Version::V1Beta, Some("key=SECRET&pageSize=5&x=1")),
            "/v1beta/models?pageSize=5"
        );
        assert_eq!(models_path(Version::V1, Some("key=SECRET")), "/v1/models");
    }

    #[test]
    fn query_key_is_taken_out() {
        assert_eq!(
            take_query_key("alt=sse&key=abc%2B1&key=second"),
            (Some("abc+1".to_owned()), Some("alt=sse".to_owned()))
        );
        assert_eq!(take_query_key("key=abc"), (Some("abc".to_owned()), None));
        assert_eq!(
            take_query_key("alt=sse"),
            (None, Some("alt=sse".to_owned()))
        );
    }

    #[test]
    fn families_as_the_original() {
        assert_eq!(family("gemini-2.5-flash"), "gemini-flash");
        assert_eq!(family("gemini-2.0-flash-lite"), "gemini-flash");
        assert_eq!(family("gemini-2.5-pro"), "gemini-pro");
        assert_eq!(family("gemini-ultra"), "gemini-ultra");
        assert_eq!(family("gemma-3-27b-it"), "gemini-pro");
    }

    #[test]
    fn a_bad_cap_is_refused() {
        let body = json!({"contents": [], "generationConfig": {"maxOutputTokens": "100"}});
        let e = request_facts_for(Api::GoogleAiGenerate, &body).unwrap_err();
        assert!(
            e.0.starts_with("generationConfig.`maxOutputTokens`"),
            "{}",
            e.0
        );
    }

    #[test]
    fn facts_and_output_cap() {
        let mut body = json!({
            "systemInstruction": {"parts": [{"text": "Be brief."}]},
            "contents": [
                {"role": "user", "parts": [{"text": "Hi"}, {"inlineData": {"mimeType": "image/png", "data": "AA"}}]},
                {"role": "model", "parts": {"text": "Hello"}}
            ],
            "generationConfig": {"maxOutputTokens": 500, "candidateCount": 2}
        });
        let facts = request_facts_for(Api::GoogleAiStream, &body).unwrap();
        assert_eq!(facts.prompt_text, "Be brief.\nHi\nHello");
        assert_eq!(facts.prompt_fixed, 4 + 4 + MEDIA_TOKENS);
        assert_eq!(facts.max_output, Some(500));
        assert_eq!(facts.choices, 2);
        assert!(facts.stream && facts.has_images && facts.capped_output);
        assert!(!set_output_cap(&mut body, 800));
        assert!(set_output_cap(&mut body, 100));
        assert_eq!(body["generationConfig"]["maxOutputTokens"], 100);
        let mut bare = json!({"contents": []});
        let facts = request_facts_for(Api::GoogleAiGenerate, &bare).unwrap();
        assert_eq!(facts.max_output, None);
        assert!(!facts.stream);
        assert!(set_output_cap(&mut bare, 64));
        assert_eq!(bare["generationConfig"]["maxOutputTokens"], 64);
    }

    #[test]
    fn usage_takes_the_last_running_total() {
        let one = json!({"usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 5,
            "thoughtsTokenCount": 6, "totalTokenCount": 20}});
        let u = usage(&one).unwrap();
        assert_eq!((u.prompt(), u.completion()), (9, 11));
        let array = json!([
            {"usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 1}},
            {"candidates": []},
            {"usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 3}},
        ]);
        assert_eq!(usage(&array).unwrap().completion(), 3);
        assert_eq!(usage(&json!({"candidates": []})), None);
    }

    #[test]
    fn model_list_in_both_shapes() {
        let up = json!({"models": [{"name": "models/gemini-2.5-flash", "version": "001"}],
            "nextPageToken": "t"});
        let out = models_list(&up);
        assert_eq!(out["models"][0]["name"], "models/gemini-2.5-flash");
        assert_eq!(out["nextPageToken"], "t");
        assert_eq!(out["object"], "list");
        assert_eq!(out["data"][0]["id"], "gemini-2.5-flash");
    }
}
