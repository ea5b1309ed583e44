//! A fake OpenAI/Anthropic upstream for integration tests: an axum server on 127.0.0.1:0 that
//! records every request it receives (method, path, query, headers, body) and answers from a
//! script, or by default with a plausible answer for the path.
//!
//! ```ignore
//! let fake = FakeUpstream::start().await;
//! let app = common::spawn(&["--openai-base-url", &fake.url, "--openai-key", "sk-op"], &[]).await;
//! fake.push(Reply::json(500, json!({"error": {"message": "boom"}})));   // next request only
//! fake.on_key("sk-bad", Reply::json(401, json!({"error": {"message": "invalid"}}))); // by key
//! let (reply, gate) = Reply::gated();   // a stream the test drives chunk by chunk
//! fake.push(reply);
//! gate.send("data: {...}\n\n"); gate.end();  // or: gate.dropped().await (client went away)
//! assert_eq!(fake.last_request().credential().as_deref(), Some("sk-op"));
//! ```
//!
//! Which reply a request gets: a rule set with [`FakeUpstream::on_key`] for the request's
//! credential, else the next reply queued with [`FakeUpstream::push`], else the default for
//! the path ([`default_reply`]): OpenAI chat/completions/embeddings/models, Anthropic
//! messages/count_tokens, JSON or SSE depending on the body's `"stream": true`, with usage.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

/// One request as the fake upstream received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    /// The body parsed as JSON (panics if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("upstream received a JSON body")
    }

    /// A header as a string, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The credential the upstream was called with: the `Bearer` token, else `x-api-key`.
    pub fn credential(&self) -> Option<String> {
        credential(&self.headers)
    }
}

fn credential(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        return Some(v.strip_prefix("Bearer ").unwrap_or(v).to_string());
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// What the body of a [`Reply`] is.
#[derive(Clone)]
enum ReplyBody {
    /// Sent in one piece.
    Full(Bytes),
    /// Sent as separate chunks, one after another, as fast as possible.
    Chunks(Vec<Bytes>),
    /// Sent chunk by chunk as the test releases them through a [`StreamGate`].
    Gated(Arc<Mutex<Option<GateBody>>>),
}

/// A scripted answer of the fake upstream.
#[derive(Clone)]
pub struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: ReplyBody,
    delay: Option<Duration>,
}

impl Reply {
    /// A JSON answer with `status`.
    pub fn json(status: u16, body: Value) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: ReplyBody::Full(Bytes::from(body.to_string())),
            delay: None,
        }
    }

    /// An OpenAI-style error body (`{"error":{"message","type"}}`) with `status`.
    pub fn error(status: u16, message: &str) -> Reply {
        Reply::json(
            status,
            json!({"error": {"message": message, "type": "upstream_test_error", "code": null}}),
        )
    }

    /// A 429 with a `retry-after` header of `retry_after` (seconds or an HTTP date).
    pub fn rate_limited(retry_after: &str) -> Reply {
        Reply::error(429, "Rate limit reached (fake upstream)").header("retry-after", retry_after)
    }

    /// An SSE stream (`text/event-stream`) whose events are sent as separate chunks. Each
    /// event is a complete block such as `"data: {...}\n\n"` (see [`openai_chat_sse`]).
    pub fn sse(events: Vec<String>) -> Reply {
        Reply {
            status: 200,
            headers: vec![
                ("content-type".into(), "text/event-stream".into()),
                ("cache-control".into(), "no-cache".into()),
            ],
            body: ReplyBody::Chunks(events.into_iter().map(Bytes::from).collect()),
            delay: None,
        }
    }

    /// Any status, content type and body.
    pub fn raw(status: u16, content_type: &str, body: impl Into<Bytes>) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), content_type.into())],
            body: ReplyBody::Full(body.into()),
            delay: None,
        }
    }

    /// A 200 SSE stream driven by the test: nothing is sent until [`StreamGate::send`], and
    /// the body ends at [`StreamGate::end`] (or when the gate is dropped).
    pub fn gated() -> (Reply, StreamGate) {
        Reply::gated_with_heartbeat(None)
    }

    /// Like [`Reply::gated`], but while waiting for the test it sends an SSE comment
    /// (`": ping\n\n"`) every `heartbeat`. Writing is how a server notices that its client went
    /// away, so use this to observe cancellation with [`StreamGate::dropped`].
    pub fn gated_with_heartbeat(heartbeat: Option<Duration>) -> (Reply, StreamGate) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (dropped_tx, dropped_rx) = watch::channel(false);
        let (started_tx, started_rx) = watch::channel(false);
        let body = GateBody {
            rx,
            heartbeat,
            dropped: dropped_tx,
            started: started_tx,
        };
        let reply = Reply {
            status: 200,
            headers: vec![
                ("content-type".into(), "text/event-stream".into()),
                ("cache-control".into(), "no-cache".into()),
            ],
            body: ReplyBody::Gated(Arc::new(Mutex::new(Some(body)))),
            delay: None,
        };
        let gate = StreamGate {
            tx,
            dropped: dropped_rx,
            started: started_rx,
        };
        (reply, gate)
    }

    /// Adds a response header.
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Waits `delay` before answering (before the status line is sent).
    pub fn delayed(mut self, delay: Duration) -> Reply {
        self.delay = Some(delay);
        self
    }
}

/// The test's handle on a [`Reply::gated`] stream.
pub struct StreamGate {
    tx: mpsc::UnboundedSender<GateMsg>,
    dropped: watch::Receiver<bool>,
    started: watch::Receiver<bool>,
}

enum GateMsg {
    Chunk(Bytes),
    End,
}

impl StreamGate {
    /// Sends one chunk to the client now.
    pub fn send(&self, chunk: impl Into<Bytes>) {
        let _ = self.tx.send(GateMsg::Chunk(chunk.into()));
    }

    /// Ends the body normally.
    pub fn end(&self) {
        let _ = self.tx.send(GateMsg::End);
    }

    /// Resolves when the response body was dropped before [`StreamGate::end`]: the
    /// connection to the fake upstream was closed by its client (the proxy).
    pub async fn dropped(&self) {
        let mut rx = self.dropped.clone();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Whether the body was dropped before it ended.
    pub fn was_dropped(&self) -> bool {
        *self.dropped.borrow()
    }

    /// Resolves when the fake upstream has started answering with this stream.
    pub async fn started(&self) {
        let mut rx = self.started.clone();
        let _ = rx.wait_for(|d| *d).await;
    }
}

struct GateBody {
    rx: mpsc::UnboundedReceiver<GateMsg>,
    heartbeat: Option<Duration>,
    dropped: watch::Sender<bool>,
    started: watch::Sender<bool>,
}

/// Marks the gate dropped unless the body ended normally.
struct DropFlag {
    dropped: watch::Sender<bool>,
    ended: bool,
}

impl DropFlag {
    /// The body ended normally: dropping it now is not a cancellation.
    fn disarm(&mut self) {
        self.ended = true;
    }
}

impl Drop for DropFlag {
    fn drop(&mut self) {
        if !self.ended {
            self.dropped.send_replace(true);
        }
    }
}

fn gated_body(gate: GateBody) -> Body {
    let GateBody {
        rx,
        heartbeat,
        dropped,
        started,
    } = gate;
    started.send_replace(true);
    let flag = DropFlag {
        dropped,
        ended: false,
    };
    let stream = futures::stream::unfold((rx, flag), move |(mut rx, mut flag)| async move {
        let msg = match heartbeat {
            Some(every) => match tokio::time::timeout(every, rx.recv()).await {
                Ok(m) => m,
                Err(_) => {
                    let ping = Bytes::from_static(b": ping\n\n");
                    return Some((Ok::<Bytes, std::io::Error>(ping), (rx, flag)));
                }
            },
            None => rx.recv().await,
        };
        match msg {
            Some(GateMsg::Chunk(b)) => Some((Ok(b), (rx, flag))),
            Some(GateMsg::End) | None => {
                flag.disarm();
                None
            }
        }
    });
    Body::from_stream(stream)
}

#[derive(Default)]
struct Inner {
    /// Requests whose handler was dropped before the response head was ready (the client
    /// closed the connection while the fake upstream was "thinking", see [`Reply::delayed`]).
    abandoned: std::sync::atomic::AtomicUsize,
    requests: Mutex<Vec<Recorded>>,
    queue: Mutex<VecDeque<Reply>>,
    by_key: Mutex<HashMap<String, Reply>>,
    /// Chat answers generate as many tokens as the request's output cap allows (see
    /// [`FakeUpstream::generate_to_cap`]).
    generate_to_cap: std::sync::atomic::AtomicBool,
    /// Answers unscripted requests instead of [`default_reply`] (a provider's fake, see
    /// [`FakeUpstream::start_with`]).
    responder: Option<Responder>,
}

/// A provider fake's answer to an unscripted request.
pub type Responder = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

/// A running fake upstream. Stops when dropped.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT` (use as `--openai-base-url` / `--anthropic-base-url`).
    pub url: String,
    inner: Arc<Inner>,
    handle: tokio::task::JoinHandle<()>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

impl FakeUpstream {
    /// Starts a fake upstream on 127.0.0.1:0.
    pub async fn start() -> FakeUpstream {
        FakeUpstream::start_inner(Inner::default()).await
    }

    /// Starts a fake upstream whose unscripted answers come from `responder` (a provider's
    /// fake that checks what the real provider checks; see `tests/common/providers.rs`).
    pub async fn start_with(responder: Responder) -> FakeUpstream {
        FakeUpstream::start_inner(Inner {
            responder: Some(responder),
            ..Inner::default()
        })
        .await
    }

    async fn start_inner(inner: Inner) -> FakeUpstream {
        let inner = Arc::new(inner);
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake upstream");
        let addr = listener.local_addr().expect("fake upstream addr");
        let handle = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeUpstream {
            addr,
            url: format!("http://{addr}"),
            inner,
            handle,
        }
    }

    /// Queues a reply for the next request not matched by an [`FakeUpstream::on_key`] rule.
    pub fn push(&self, reply: Reply) {
        self.inner.queue.lock().expect("lock").push_back(reply);
    }

    /// Answers every request presenting `key` (Bearer or x-api-key) with `reply`.
    pub fn on_key(&self, key: &str, reply: Reply) {
        self.inner
            .by_key
            .lock()
            .expect("lock")
            .insert(key.to_string(), reply);
    }

    /// From now on, unscripted chat answers (OpenAI and Anthropic, JSON and SSE) generate as
    /// many tokens as the request's `max_completion_tokens`/`max_tokens` allows, or
    /// [`UNCAPPED_OUTPUT`] when it sets none, as a real model that writes until stopped; usage
    /// reports [`GENERATED_PROMPT_TOKENS`] prompt tokens and that many completion tokens.
    pub fn generate_to_cap(&self) {
        self.inner
            .generate_to_cap
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Removes the rule for `key`.
    pub fn clear_key(&self, key: &str) {
        self.inner.by_key.lock().expect("lock").remove(key);
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.requests.lock().expect("lock").clone()
    }

    /// How many requests were received.
    pub fn request_count(&self) -> usize {
        self.inner.requests.lock().expect("lock").len()
    }

    /// The latest request (panics if none was received).
    pub fn last_request(&self) -> Recorded {
        self.inner
            .requests
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .expect("the fake upstream received a request")
    }

    /// How many requests were abandoned by their client before the fake upstream answered
    /// (observable with [`Reply::delayed`]).
    pub fn abandoned_count(&self) -> usize {
        self.inner
            .abandoned
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The credentials of every request so far, in order.
    pub fn credentials(&self) -> Vec<Option<String>> {
        self.requests().iter().map(Recorded::credential).collect()
    }
}

async fn handle(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let rec = Recorded {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: parts.headers,
        body,
    };
    let key = rec.credential();
    let scripted = key
        .and_then(|k| inner.by_key.lock().expect("lock").get(&k).cloned())
        .or_else(|| inner.queue.lock().expect("lock").pop_front());
    let generate = inner
        .generate_to_cap
        .load(std::sync::atomic::Ordering::SeqCst);
    let reply = scripted.unwrap_or_else(|| {
        if let Some(r) = &inner.responder {
            r(&rec)
        } else if generate {
            generated_reply(&rec).unwrap_or_else(|| default_reply(&rec))
        } else {
            default_reply(&rec)
        }
    });
    inner.requests.lock().expect("lock").push(rec);
    if let Some(d) = reply.delay {
        let guard = Abandoned(Some(inner.clone()));
        tokio::time::sleep(d).await;
        guard.disarm();
    }
    let body = match reply.body {
        ReplyBody::Full(b) => Body::from(b),
        ReplyBody::Chunks(chunks) => Body::from_stream(futures::stream::iter(
            chunks.into_iter().map(Ok::<Bytes, std::io::Error>),
        )),
        ReplyBody::Gated(slot) => match slot.lock().expect("lock").take() {
            Some(gate) => gated_body(gate),
            None => Body::empty(),
        },
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(reply.status).expect("valid status");
    for (k, v) in reply.headers {
        resp.headers_mut().append(
            HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            HeaderValue::from_str(&v).expect("header value"),
        );
    }
    resp
}

/// Counts a handler dropped while it was still waiting (its client went away).
struct Abandoned(Option<Arc<Inner>>);

impl Abandoned {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        if let Some(inner) = self.0.take() {
            inner
                .abandoned
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// The answer when nothing is scripted: a plausible response for the path, echoing the
/// request's `model`, as SSE when the body asks for `"stream": true`.
pub fn default_reply(req: &Recorded) -> Reply {
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let model = body["model"].as_str().unwrap_or("test-model").to_string();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let include_usage = body["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/v1/chat/completions") if stream => Reply::sse(openai_chat_sse(
            &model,
            &["Hello", " from", " the fake upstream"],
            include_usage,
        )),
        ("POST", "/v1/chat/completions") => Reply::json(
            200,
            openai_chat_json(&model, "Hello from the fake upstream"),
        ),
        ("POST", "/v1/completions") => Reply::json(
            200,
            json!({
                "id": "cmpl-fake", "object": "text_completion", "created": 1700000000,
                "model": model,
                "choices": [{"text": "Hello", "index": 0, "logprobs": null, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
            }),
        ),
        ("POST", "/v1/embeddings") => Reply::json(
            200,
            json!({
                "object": "list", "model": model,
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                "usage": {"prompt_tokens": 4, "total_tokens": 4}
            }),
        ),
        ("POST", "/v1/images/generations") => {
            let n = body["n"].as_u64().unwrap_or(1);
            let data: Vec<Value> = (0..n)
                .map(|i| json!({"url": format!("https://fake.example/img{i}.png"), "revised_prompt": "A picture"}))
                .collect();
            Reply::json(200, json!({"created": 1700000000, "data": data}))
        }
        ("GET", "/v1/models") => Reply::json(
            200,
            json!({"object": "list", "data": [
                {"id": "gpt-4o-mini", "object": "model", "created": 1700000000, "owned_by": "fake"},
                {"id": "claude-3-5-haiku-latest", "object": "model", "created": 1700000000, "owned_by": "fake"}
            ]}),
        ),
        ("GET", p) if p.starts_with("/v1/models/") => Reply::json(
            200,
            json!({"id": &p["/v1/models/".len()..], "object": "model", "created": 1700000000, "owned_by": "fake"}),
        ),
        ("POST", "/v1/messages") if stream => Reply::sse(anthropic_sse(
            &model,
            &["Hello", " from", " the fake upstream"],
        )),
        ("POST", "/v1/messages") => {
            Reply::json(200, anthropic_json(&model, "Hello from the fake upstream"))
        }
        ("POST", "/v1/messages/count_tokens") => Reply::json(200, json!({"input_tokens": 12})),
        _ => Reply::error(404, "unknown path on the fake upstream"),
    }
}

/// Output tokens generated by [`FakeUpstream::generate_to_cap`] when a request sets no cap.
pub const UNCAPPED_OUTPUT: u64 = 16_000;
/// Prompt tokens reported by [`FakeUpstream::generate_to_cap`] answers.
pub const GENERATED_PROMPT_TOKENS: u64 = 10;

/// An answer of [`FakeUpstream::generate_to_cap`]: `cap` tokens (`"tok "` each), for chat
/// paths; `None` for other paths.
fn generated_reply(req: &Recorded) -> Option<Reply> {
    let body: Value = serde_json::from_slice(&req.body).ok()?;
    let model = body["model"].as_str().unwrap_or("test-model").to_string();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let include_usage = body["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    let cap = body["max_completion_tokens"]
        .as_u64()
        .or_else(|| body["max_tokens"].as_u64())
        .unwrap_or(UNCAPPED_OUTPUT);
    let piece = "tok ".repeat(100);
    let mut texts: Vec<String> = vec![piece.clone(); (cap / 100) as usize];
    if !cap.is_multiple_of(100) {
        texts.push("tok ".repeat((cap % 100) as usize));
    }
    let prompt = GENERATED_PROMPT_TOKENS;
    match req.path.as_str() {
        "/v1/chat/completions" if stream => {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let mut events = openai_chat_sse(&model, &refs, false);
            if include_usage {
                let usage = json!({
                    "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000,
                    "model": model, "choices": [],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": cap, "total_tokens": prompt + cap}
                });
                let done = events.pop().expect("[DONE]");
                events.push(format!("data: {usage}\n\n"));
                events.push(done);
            }
            Some(Reply::sse(events))
        }
        "/v1/chat/completions" => {
            let mut v = openai_chat_json(&model, &texts.concat());
            v["usage"] = json!({"prompt_tokens": prompt, "completion_tokens": cap, "total_tokens": prompt + cap});
            Some(Reply::json(200, v))
        }
        "/v1/messages" => {
            let mut v = anthropic_json(&model, &texts.concat());
            v["usage"] = json!({"input_tokens": prompt, "output_tokens": cap});
            Some(Reply::json(200, v))
        }
        _ => None,
    }
}

/// An OpenAI chat completion (`object: chat.completion`) answering `text`, with usage
/// (10 prompt tokens, 5 completion tokens).
pub fn openai_chat_json(model: &str, text: &str) -> Value {
    json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": null},
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    })
}

/// One OpenAI chat stream event carrying `text` as a delta, as an SSE block.
pub fn openai_chat_chunk(model: &str, text: &str) -> String {
    let v = json!({
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null}]
    });
    format!("data: {v}\n\n")
}

/// A whole OpenAI chat stream: a role chunk, one chunk per text, a finish chunk, a usage
/// chunk (`choices: []`) when `include_usage`, and `data: [DONE]`.
pub fn openai_chat_sse(model: &str, texts: &[&str], include_usage: bool) -> Vec<String> {
    let mut out = Vec::new();
    let first = json!({
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]
    });
    out.push(format!("data: {first}\n\n"));
    out.extend(texts.iter().map(|t| openai_chat_chunk(model, t)));
    let last = json!({
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}]
    });
    out.push(format!("data: {last}\n\n"));
    if include_usage {
        let usage = json!({
            "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000,
            "model": model, "choices": [],
            "usage": {"prompt_tokens": 10, "completion_tokens": texts.len(), "total_tokens": 10 + texts.len()}
        });
        out.push(format!("data: {usage}\n\n"));
    }
    out.push("data: [DONE]\n\n".to_string());
    out
}

/// An Anthropic message (`type: message`) answering `text`, with usage (10 in, 5 out).
pub fn anthropic_json(model: &str, text: &str) -> Value {
    json!({
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {"input_tokens": 10, "output_tokens": 5}
    })
}

/// One Anthropic SSE event block (`event: NAME\ndata: JSON\n\n`).
pub fn anthropic_event(name: &str, data: &Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

/// One Anthropic text delta event.
pub fn anthropic_text_delta(text: &str) -> String {
    anthropic_event(
        "content_block_delta",
        &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
    )
}

/// A whole Anthropic message stream: `message_start` (10 input tokens), a text block with one
/// delta per text, `message_delta` (output tokens = number of texts) and `message_stop`.
pub fn anthropic_sse(model: &str, texts: &[&str]) -> Vec<String> {
    let mut out = vec![
        anthropic_event(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 10, "output_tokens": 1}
            }}),
        ),
        anthropic_event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
    ];
    out.extend(texts.iter().map(|t| anthropic_text_delta(t)));
    out.push(anthropic_event(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    out.push(anthropic_event(
        "message_delta",
        &json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                "usage": {"output_tokens": texts.len()}}),
    ));
    out.push(anthropic_event(
        "message_stop",
        &json!({"type": "message_stop"}),
    ));
    out
}
