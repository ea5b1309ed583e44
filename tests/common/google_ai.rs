//! A fake Google AI (Gemini API) upstream: an axum server on 127.0.0.1:0 that checks what the
//! real one checks — the key in `x-goog-api-key` (and never in the URL), the path
//! `/{v1|v1beta}/models/{model}:{generateContent|streamGenerateContent}`, `alt=sse` for SSE —
//! and answers real-shaped JSON, SSE (`data: …\r\n\r\n`, running `usageMetadata` in every
//! chunk) or Google's error shape. It records every request.
//!
//! Validated against the official `google-genai` Python SDK talking to it directly
//! (`tests/e2e_google_ai.rs`, `tests/python/google_ai_sdk.py`).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{json, Value};

/// The answer text of every generation.
pub const TEXT: &str = "Hello from the fake Gemini";
/// The usage the fake reports (final totals): prompt, candidates and thoughts.
pub const PROMPT_TOKENS: u64 = 11;
pub const CANDIDATE_TOKENS: u64 = 7;
pub const THOUGHT_TOKENS: u64 = 3;
/// What the proxy must charge: prompt + candidates + thoughts.
pub const TOTAL_TOKENS: u64 = PROMPT_TOKENS + CANDIDATE_TOKENS + THOUGHT_TOKENS;

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Default)]
struct Inner {
    keys: Vec<String>,
    requests: Mutex<Vec<Recorded>>,
}

pub struct FakeGoogleAi {
    pub url: String,
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    _server: tokio::task::JoinHandle<()>,
}

impl FakeGoogleAi {
    /// Starts the fake; it accepts exactly `keys` in `x-goog-api-key`.
    pub async fn start(keys: &[&str]) -> FakeGoogleAi {
        let inner = Arc::new(Inner {
            keys: keys.iter().map(|k| k.to_string()).collect(),
            requests: Mutex::new(Vec::new()),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake google ai");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeGoogleAi {
            url: format!("http://{addr}"),
            addr,
            inner,
            _server: server,
        }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.requests.lock().expect("requests lock").clone()
    }

    pub fn last_request(&self) -> Recorded {
        self.requests().pop().expect("the fake received a request")
    }
}

fn error(status: StatusCode, grpc: &str, message: &str) -> Response {
    let body = json!({"error": {"code": status.as_u16(), "message": message, "status": grpc}});
    Response::builder()
        .status(status)
        .header("content-type", "application/json; charset=UTF-8")
        .body(Body::from(body.to_string()))
        .expect("a fixed response")
}

fn usage(candidates: u64, thoughts: u64) -> Value {
    let mut u = json!({
        "promptTokenCount": PROMPT_TOKENS,
        "candidatesTokenCount": candidates,
        "totalTokenCount": PROMPT_TOKENS + candidates + thoughts,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": PROMPT_TOKENS}],
    });
    if thoughts > 0 {
        u["thoughtsTokenCount"] = json!(thoughts);
    }
    u
}

fn chunk(model: &str, text: &str, finish: Option<&str>, usage: Value) -> Value {
    let mut candidate =
        json!({"content": {"parts": [{"text": text}], "role": "model"}, "index": 0});
    if let Some(f) = finish {
        candidate["finishReason"] = json!(f);
    }
    json!({
        "candidates": [candidate],
        "usageMetadata": usage,
        "modelVersion": model,
        "responseId": "fake-response-1",
    })
}

/// The stream's chunks: the text in three pieces, each with the running usage.
fn stream_chunks(model: &str) -> Vec<Value> {
    let (a, rest) = TEXT.split_at(5);
    let (b, c) = rest.split_at(9);
    vec![
        chunk(model, a, None, usage(2, THOUGHT_TOKENS)),
        chunk(model, b, None, usage(5, THOUGHT_TOKENS)),
        chunk(
            model,
            c,
            Some("STOP"),
            usage(CANDIDATE_TOKENS, THOUGHT_TOKENS),
        ),
    ]
}

async fn handle(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().map(str::to_string);
    inner
        .requests
        .lock()
        .expect("requests lock")
        .push(Recorded {
            method: parts.method.to_string(),
            path: path.clone(),
            query: query.clone(),
            headers: parts.headers.clone(),
            body: body.clone(),
        });
    let params: Vec<(String, String)> =
        url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    // The proxy must never put a key in a URL (the real API would accept it there).
    if params.iter().any(|(k, _)| k == "key") {
        return error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "fake: the key must not be sent in the URL",
        );
    }
    match parts
        .headers
        .get("x-goog-api-key")
        .and_then(|v| v.to_str().ok())
    {
        None => {
            return error(
                StatusCode::FORBIDDEN,
                "PERMISSION_DENIED",
                "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.",
            )
        }
        Some(k) if !inner.keys.iter().any(|ok| ok == k) => {
            return error(
                StatusCode::BAD_REQUEST,
                "INVALID_ARGUMENT",
                "API key not valid. Please pass a valid API key.",
            )
        }
        Some(_) => {}
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let version_ok = matches!(segments.first(), Some(&"v1") | Some(&"v1beta"));
    if !version_ok {
        return error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "fake: unknown API version",
        );
    }
    if parts.method == "GET" && segments.len() == 2 && segments[1] == "models" {
        let body = json!({"models": [
            {"name": "models/gemini-2.5-flash", "version": "001", "displayName": "Gemini 2.5 Flash",
             "inputTokenLimit": 1048576, "outputTokenLimit": 65536,
             "supportedGenerationMethods": ["generateContent", "countTokens"]},
            {"name": "models/gemini-2.5-pro", "version": "2.5", "displayName": "Gemini 2.5 Pro",
             "inputTokenLimit": 1048576, "outputTokenLimit": 65536,
             "supportedGenerationMethods": ["generateContent", "countTokens"]},
        ]});
        return Response::builder()
            .header("content-type", "application/json; charset=UTF-8")
            .body(Body::from(body.to_string()))
            .expect("a fixed response");
    }
    if parts.method != "POST" || segments.len() != 3 || segments[1] != "models" {
        return error(StatusCode::NOT_FOUND, "NOT_FOUND", "fake: unknown path");
    }
    let Some((model, method)) = segments[2].split_once(':') else {
        return error(StatusCode::NOT_FOUND, "NOT_FOUND", "fake: no method");
    };
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "Invalid JSON payload received.",
        );
    };
    if !request.get("contents").is_some_and(Value::is_array) {
        return error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "* GenerateContentRequest.contents: contents is not specified",
        );
    }
    let sse = params.iter().any(|(k, v)| k == "alt" && v == "sse");
    match method {
        "generateContent" => {
            let body = chunk(
                model,
                TEXT,
                Some("STOP"),
                usage(CANDIDATE_TOKENS, THOUGHT_TOKENS),
            );
            Response::builder()
                .header("content-type", "application/json; charset=UTF-8")
                .body(Body::from(body.to_string()))
                .expect("a fixed response")
        }
        "streamGenerateContent" if sse => {
            let chunks: Vec<Result<Bytes, std::io::Error>> = stream_chunks(model)
                .into_iter()
                .map(|c| Ok(Bytes::from(format!("data: {c}\r\n\r\n"))))
                .collect();
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(futures::stream::iter(chunks)))
                .expect("a fixed response")
        }
        "streamGenerateContent" => {
            // Without alt=sse the real API streams one JSON array.
            let body = Value::Array(stream_chunks(model));
            Response::builder()
                .header("content-type", "application/json; charset=UTF-8")
                .body(Body::from(body.to_string()))
                .expect("a fixed response")
        }
        _ => error(StatusCode::NOT_FOUND, "NOT_FOUND", "fake: unknown method"),
    }
}
