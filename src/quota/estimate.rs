//! Token estimates: what a request asks for before it is forwarded (prompt tokens plus its
//! `max_tokens`), and the fallback count of text seen in a response when the upstream never
//! reported usage. Estimates are only used for admission and for responses whose real usage is
//! unknown; accounting otherwise uses the upstream's own numbers.
//!
//! Two prompt estimates exist. [`RequestFacts::prompt_bound`] is free: the prompt's length in
//! bytes, a true upper bound of its token count (every token of a byte-level BPE covers at least
//! one byte). [`RequestFacts::prompt_tokens`] runs the tokenizer. Admission reserves the bound
//! while a user is far from the limit and tokenizes only near it, so a busy gateway whose users
//! have room never tokenizes a prompt, and never loads the tokenizer's ≈45 MB vocabulary.

use std::sync::OnceLock;

use serde_json::Value;
use tiktoken_rs::CoreBPE;

use crate::upstream::api::Api;

/// Text longer than this is not tokenized whole: three samples of [`SAMPLE_BYTES`] (start,
/// middle, end) are, and the count is extrapolated. The estimate stays close while a
/// multi-megabyte prompt cannot hold up the request path (tokenizing runs on the async worker).
const EXACT_COUNT_BYTES: usize = 128 * 1024;
const SAMPLE_BYTES: usize = 32 * 1024;

/// Tokens charged for one image part (OpenAI's low-detail price); images are not tokenized.
const IMAGE_TOKENS: u64 = 85;

/// Per-message overhead of chat formats (role and separators), as OpenAI documents it.
const MESSAGE_OVERHEAD: u64 = 4;

/// Text up to this size is tokenized on the async worker once the tokenizer is loaded (a few
/// microseconds); larger text, and the first use (loading takes a few hundred milliseconds),
/// go to the blocking pool in [`count_tokens_async`].
const INLINE_COUNT_BYTES: usize = 16 * 1024;

static BPE: OnceLock<Option<CoreBPE>> = OnceLock::new();

/// The tokenizer, loaded on first use. `o200k_base` is the vocabulary of current OpenAI models;
/// for Claude it is a close enough estimate (Anthropic publishes no local tokenizer).
fn bpe() -> Option<&'static CoreBPE> {
    BPE.get_or_init(|| {
        let b = tiktoken_rs::o200k_base();
        match b {
            Ok(b) => {
                tracing::info!("tokenizer loaded (a user came near a token quota, or a response had no usage)");
                Some(b)
            }
            Err(e) => {
                tracing::error!(error = %e, "tokenizer failed to load; estimating 4 bytes per token");
                None
            }
        }
    })
    .as_ref()
}

/// Whether the tokenizer has been loaded (for tests and the benchmark's memory notes).
pub fn tokenizer_loaded() -> bool {
    BPE.get().is_some()
}

/// [`count_tokens`] without holding up an async worker: text that is large, or a first count
/// that has to load the tokenizer, is counted on the blocking pool.
pub async fn count_tokens_async(text: String) -> u64 {
    if tokenizer_loaded() && text.len() <= INLINE_COUNT_BYTES {
        return count_tokens(&text);
    }
    let bound = text.len() as u64;
    match tokio::task::spawn_blocking(move || count_tokens(&text)).await {
        Ok(n) => n,
        // The runtime is shutting down: the upper bound is a safe answer.
        Err(_) => bound,
    }
}

/// Estimated tokens of `text`.
pub fn count_tokens(text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    let Some(bpe) = bpe() else {
        return (text.len() as u64).div_ceil(4);
    };
    if text.len() <= EXACT_COUNT_BYTES {
        return bpe.count_ordinary(text) as u64;
    }
    let len = text.len();
    let mut sampled_bytes = 0u64;
    let mut sampled_tokens = 0u64;
    for start in [0, len / 2 - SAMPLE_BYTES / 2, len - SAMPLE_BYTES] {
        let sample = char_slice(text, start, start + SAMPLE_BYTES);
        sampled_bytes += sample.len() as u64;
        sampled_tokens += bpe.count_ordinary(sample) as u64;
    }
    sampled_tokens.saturating_mul(len as u64) / sampled_bytes.max(1)
}

/// `text[start..end]`, with both ends moved back to character boundaries.
fn char_slice(text: &str, mut start: usize, mut end: usize) -> &str {
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[start..end]
}

/// What admission needs to know about a generation request body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestFacts {
    /// The `model` field ("" when absent).
    pub model: String,
    /// The prompt's text (messages, system prompt, tools), as the tokenizer would count it.
    pub prompt_text: String,
    /// Prompt tokens that are not text: images, pre-tokenized input, per-message overhead.
    pub prompt_fixed: u64,
    /// The most completion tokens the request may produce: `max_completion_tokens` or
    /// `max_tokens` (0 when absent), times `n` choices.
    pub max_completion: u64,
    /// `"stream": true`.
    pub stream: bool,
    /// The client itself asked for stream usage (`stream_options.include_usage`).
    pub include_usage: bool,
}

impl RequestFacts {
    /// An upper bound of the prompt's tokens, without tokenizing: its length in bytes.
    pub fn prompt_bound(&self) -> u64 {
        (self.prompt_text.len() as u64).saturating_add(self.prompt_fixed)
    }

    /// The prompt's tokens, counted with the tokenizer (loads it on first use).
    pub fn prompt_tokens(&self) -> u64 {
        count_tokens(&self.prompt_text).saturating_add(self.prompt_fixed)
    }

    /// Tokens a request may use at most, with the prompt counted as `prompt`.
    pub fn requested(&self, prompt: u64) -> u64 {
        prompt.saturating_add(self.max_completion)
    }
}

/// Reads the facts admission needs from a request body of the given API.
pub fn request_facts(api: Api, body: &Value) -> RequestFacts {
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let uint = |k: &str| body.get(k).and_then(Value::as_u64);
    let max_tokens = match api {
        Api::OpenAiChat | Api::OpenAiCompletions => uint("max_completion_tokens")
            .or_else(|| uint("max_tokens"))
            .unwrap_or(0),
        Api::AnthropicMessages => uint("max_tokens").unwrap_or(0),
        _ => 0,
    };
    // `n` choices each may use `max_tokens`; a silly `n` is the upstream's to refuse.
    let n = match api {
        Api::OpenAiChat | Api::OpenAiCompletions => uint("n").unwrap_or(1).clamp(1, 128),
        _ => 1,
    };
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut text = String::new();
    let mut fixed = 0u64;
    collect_prompt(api, body, &mut text, &mut fixed);
    RequestFacts {
        model,
        prompt_text: text,
        prompt_fixed: fixed,
        max_completion: max_tokens.saturating_mul(n),
        stream,
        include_usage,
    }
}

/// Gathers the prompt text of a request into `text`, and tokens that are not text (images,
/// pre-tokenized input, message overhead) into `fixed`.
fn collect_prompt(api: Api, body: &Value, text: &mut String, fixed: &mut u64) {
    match api {
        Api::OpenAiChat => {
            for m in body
                .get("messages")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                *fixed += MESSAGE_OVERHEAD;
                for k in ["role", "name"] {
                    push_str(text, m.get(k));
                }
                collect_content(m.get("content"), text, fixed);
                if let Some(calls) = m.get("tool_calls") {
                    push_json(text, calls);
                }
            }
            for k in ["tools", "functions", "response_format"] {
                if let Some(v) = body.get(k) {
                    push_json(text, v);
                }
            }
        }
        Api::OpenAiCompletions => collect_input(body.get("prompt"), text, fixed),
        Api::OpenAiEmbeddings => collect_input(body.get("input"), text, fixed),
        Api::AnthropicMessages => {
            collect_content(body.get("system"), text, fixed);
            for m in body
                .get("messages")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                *fixed += MESSAGE_OVERHEAD;
                collect_content(m.get("content"), text, fixed);
            }
            if let Some(v) = body.get("tools") {
                push_json(text, v);
            }
        }
        Api::OpenAiOther | Api::AnthropicOther => {}
    }
}

/// A message `content`: a string, or an array of parts (OpenAI `text`/`image_url` parts,
/// Anthropic `text`/`image`/`tool_use`/`tool_result`/`thinking` blocks).
fn collect_content(content: Option<&Value>, text: &mut String, fixed: &mut u64) {
    match content {
        Some(Value::String(s)) => push(text, s),
        Some(Value::Array(parts)) => {
            for p in parts {
                match p {
                    Value::String(s) => push(text, s),
                    Value::Object(o) => {
                        let kind = o.get("type").and_then(Value::as_str).unwrap_or("");
                        if kind.contains("image") || kind == "document" {
                            *fixed += IMAGE_TOKENS;
                            continue;
                        }
                        for k in ["text", "thinking"] {
                            push_str(text, o.get(k));
                        }
                        if let Some(input) = o.get("input") {
                            push_json(text, input);
                        }
                        if o.contains_key("content") {
                            collect_content(o.get("content"), text, fixed);
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

/// A completions `prompt` or embeddings `input`: a string, an array of strings, an array of
/// token ids, or an array of such arrays.
fn collect_input(input: Option<&Value>, text: &mut String, fixed: &mut u64) {
    match input {
        Some(Value::String(s)) => push(text, s),
        Some(Value::Array(items)) => {
            for item in items {
                match item {
                    Value::String(s) => push(text, s),
                    Value::Number(_) => *fixed += 1,
                    Value::Array(ids) => *fixed += ids.len() as u64,
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

fn push(text: &mut String, s: &str) {
    if !text.is_empty() {
        text.push('\n');
    }
    text.push_str(s);
}

fn push_str(text: &mut String, v: Option<&Value>) {
    if let Some(s) = v.and_then(Value::as_str) {
        push(text, s);
    }
}

fn push_json(text: &mut String, v: &Value) {
    push(text, &v.to_string());
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_text_with_the_tokenizer() {
        assert_eq!(count_tokens(""), 0);
        assert_eq!(count_tokens("hello world"), 2);
        let long = "word ".repeat(300_000);
        let n = count_tokens(&long);
        assert!(
            (250_000..=350_000).contains(&n),
            "extrapolated count {n} is close"
        );
        // Multi-byte characters at the sample edges are fine.
        let wide = "héllo wörld ünïcode ".repeat(20_000);
        let exact = bpe().expect("tokenizer").count_ordinary(&wide) as u64;
        let n = count_tokens(&wide);
        assert!(n.abs_diff(exact) * 10 < exact, "{n} vs exact {exact}");
    }

    #[test]
    fn chat_request_facts() {
        let body = json!({
            "model": "gpt-4o", "max_tokens": 100, "n": 2, "stream": true,
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": [
                    {"type": "text", "text": "Describe this picture"},
                    {"type": "image_url", "image_url": {"url": "data:..."}}
                ]}
            ]
        });
        let f = request_facts(Api::OpenAiChat, &body);
        assert_eq!(f.model, "gpt-4o");
        assert_eq!(f.max_completion, 200);
        assert!(f.stream && !f.include_usage);
        let tokens = f.prompt_tokens();
        assert!(tokens > IMAGE_TOKENS + 2 * MESSAGE_OVERHEAD);
        assert!(tokens < IMAGE_TOKENS + 40);
        assert!(f.prompt_bound() >= tokens, "the bound bounds the count");
        assert_eq!(f.requested(tokens), tokens + 200);
    }

    #[test]
    fn max_completion_tokens_wins_and_absent_is_zero() {
        let b = json!({"model":"o3","max_completion_tokens":7,"max_tokens":99,"messages":[]});
        assert_eq!(request_facts(Api::OpenAiChat, &b).max_completion, 7);
        let b = json!({"model":"o3","messages":[],"stream":true,
            "stream_options":{"include_usage":true}});
        let f = request_facts(Api::OpenAiChat, &b);
        assert_eq!(f.max_completion, 0);
        assert!(f.include_usage);
    }

    #[test]
    fn anthropic_and_embeddings_and_completions() {
        let b = json!({"model":"claude-sonnet-4-5","max_tokens":50,
            "system":[{"type":"text","text":"Be kind."}],
            "messages":[{"role":"user","content":"hello there"},
                {"role":"assistant","content":[{"type":"tool_use","id":"t","name":"f","input":{"q":"x"}}]},
                {"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":"result text"}]}]});
        let f = request_facts(Api::AnthropicMessages, &b);
        assert_eq!(f.max_completion, 50);
        assert!(f.prompt_tokens() >= 3 * MESSAGE_OVERHEAD + 6);
        assert!(f.prompt_bound() >= f.prompt_tokens());

        let b = json!({"model":"text-embedding-3-small","input":["one two","three"]});
        let f = request_facts(Api::OpenAiEmbeddings, &b);
        assert_eq!(f.max_completion, 0);
        assert!(f.prompt_tokens() >= 3);
        let b = json!({"model":"text-embedding-3-small","input":[[1,2,3],[4,5]]});
        assert_eq!(request_facts(Api::OpenAiEmbeddings, &b).prompt_tokens(), 5);
        assert_eq!(request_facts(Api::OpenAiEmbeddings, &b).prompt_bound(), 5);

        let b = json!({"model":"gpt-3.5-turbo-instruct","prompt":"Say hi","max_tokens":5});
        let f = request_facts(Api::OpenAiCompletions, &b);
        assert_eq!(f.max_completion, 5);
        assert!(f.prompt_tokens() >= 2);
    }

    #[test]
    fn the_byte_bound_is_never_below_the_token_count() {
        for text in [
            "hello world",
            "  spaces   and\ttabs\n\n",
            "héllo wörld ünïcode 日本語のテキスト 🎉🎉🎉",
            "a",
            "1234567890 0987654321",
            "{\"type\":\"function\",\"name\":\"f\"}",
        ] {
            assert!(count_tokens(text) <= text.len() as u64, "{text}");
        }
    }

    #[test]
    fn malformed_bodies_estimate_zero_without_panicking() {
        for b in [
            json!(null),
            json!([]),
            json!({"messages": 5}),
            json!({"max_tokens": -1}),
        ] {
            for api in [
                Api::OpenAiChat,
                Api::OpenAiCompletions,
                Api::OpenAiEmbeddings,
                Api::AnthropicMessages,
            ] {
                let f = request_facts(api, &b);
                assert_eq!(f.max_completion, 0);
            }
        }
    }
}
