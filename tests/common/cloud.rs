//! Fakes of the two clouds' Claude endpoints, each checking what the real one checks:
//!
//! - [`FakeBedrock`]: the Bedrock runtime (`POST /model/{id}/invoke` and
//!   `/invoke-with-response-stream`). Every request's SigV4 signature is recomputed from the
//!   secret of its access key (with `aws-sigv4`) and refused on mismatch as AWS does (403,
//!   `x-amzn-ErrorType`, a JSON `message`); an unknown key gets `UnrecognizedClientException`.
//!   Streams are real `application/vnd.amazon.eventstream` frames.
//! - [`FakeVertex`]: a token endpoint that verifies the service account's RS256 JWT assertion
//!   with the public half of the test key (`tests/fixtures`) and issues access tokens, and the
//!   Vertex `rawPredict`/`streamRawPredict` endpoint, which checks the bearer token.
//!
//! Both were validated against the official clients (boto3's `bedrock-runtime`, the Anthropic
//! SDK's `AnthropicVertex`) in `tests/cloud_fakes_official_clients.rs`.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use llm_gatekeeper::providers::aws::{encode_chunk_frame, encode_exception_frame};
use serde_json::{json, Value};

/// Token counts the fakes report, so tests can assert exact accounting.
pub const BEDROCK_PLAIN_USAGE: (u64, u64) = (13, 7);
pub const BEDROCK_STREAM_USAGE: (u64, u64) = (17, 9);
pub const VERTEX_PLAIN_USAGE: (u64, u64) = (21, 5);
pub const VERTEX_STREAM_USAGE: (u64, u64) = (23, 6);
pub const BEDROCK_TEXT: &str = "Hello from Bedrock";
pub const VERTEX_TEXT: &str = "Hello from Vertex";

/// One request as a fake cloud received it.
#[derive(Clone, Debug)]
pub struct CloudRecorded {
    pub method: String,
    /// The path as sent (percent-encoding kept).
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl CloudRecorded {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    /// Every header value and the body as one string, to search for leaked credentials.
    pub fn everything(&self) -> String {
        let mut s = format!("{} {}\n", self.method, self.path);
        for (k, v) in &self.headers {
            s.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
        }
        s.push_str(&String::from_utf8_lossy(&self.body));
        s
    }
}

async fn listen(app: axum::Router) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind fake cloud");
    let addr = listener.local_addr().expect("addr");
    let handle = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), handle)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Bedrock

#[derive(Default)]
pub struct BedrockState {
    /// accessKeyId → secretAccessKey of the keys this "account" knows.
    keys: Mutex<HashMap<String, String>>,
    pub requests: Mutex<Vec<CloudRecorded>>,
    /// Requests refused for their signature or key.
    pub refused: AtomicUsize,
    /// Answer this many of the next requests with `ThrottlingException`.
    pub throttle_next: AtomicUsize,
    /// (accessKeyId, model id) pairs answered with `AccessDeniedException`.
    pub denied: Mutex<HashSet<(String, String)>>,
    /// The next stream fails after its first delta with this exception type.
    pub stream_exception: Mutex<Option<String>>,
    /// Successful (signed, admitted) requests by accessKeyId.
    pub served_by: Mutex<Vec<String>>,
    /// accessKeyIds whose account has model invocation logging on (text delivery).
    pub logging: Mutex<HashSet<String>>,
    /// accessKeyIds that may not read the logging configuration (AccessDeniedException).
    pub logging_denied: Mutex<HashSet<String>>,
    /// Answer this many of the next STS calls with `Throttling`.
    pub sts_throttle_next: AtomicUsize,
}

/// A running fake Bedrock runtime. Stops when dropped.
pub struct FakeBedrock {
    /// `http://127.0.0.1:PORT` (as `AWS_BEDROCK_BASE_URL`, or boto3's `endpoint_url`).
    pub url: String,
    pub state: Arc<BedrockState>,
    handle: tokio::task::JoinHandle<()>,
}

impl Drop for FakeBedrock {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

impl FakeBedrock {
    /// A fake that knows the given `(accessKeyId, secretAccessKey)` pairs.
    pub async fn start(keys: &[(&str, &str)]) -> FakeBedrock {
        let state = Arc::new(BedrockState::default());
        {
            let mut k = state.keys.lock().expect("lock");
            for (id, secret) in keys {
                k.insert(id.to_string(), secret.to_string());
            }
        }
        let app = axum::Router::new()
            .fallback(bedrock_handler)
            .with_state(state.clone());
        let (url, handle) = listen(app).await;
        FakeBedrock { url, state, handle }
    }

    pub fn requests(&self) -> Vec<CloudRecorded> {
        self.state.requests.lock().expect("lock").clone()
    }

    pub fn refused(&self) -> usize {
        self.state.refused.load(Ordering::SeqCst)
    }

    pub fn served_by(&self) -> Vec<String> {
        self.state.served_by.lock().expect("lock").clone()
    }
}

/// AWS's error answer: status, `x-amzn-ErrorType`, `{"message": …}`.
fn aws_error(status: u16, error_type: &str, message: &str) -> Response {
    let mut resp = (
        StatusCode::from_u16(status).expect("status"),
        axum::Json(json!({ "message": message })),
    )
        .into_response();
    let full = format!("{error_type}:http://internal.amazon.com/coral/com.amazon.bedrock/");
    resp.headers_mut()
        .insert("x-amzn-ErrorType", full.parse().expect("header"));
    resp
}

/// Parses `AWS4-HMAC-SHA256 Credential=AK/date/region/service/aws4_request,
/// SignedHeaders=a;b, Signature=hex`.
fn parse_authorization(v: &str) -> Option<(String, Vec<String>, Vec<String>, String)> {
    let rest = v.strip_prefix("AWS4-HMAC-SHA256 ")?;
    let mut cred = None;
    let mut signed = None;
    let mut sig = None;
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(c) = part.strip_prefix("Credential=") {
            cred = Some(c.to_string());
        } else if let Some(s) = part.strip_prefix("SignedHeaders=") {
            signed = Some(s.split(';').map(str::to_string).collect::<Vec<_>>());
        } else if let Some(s) = part.strip_prefix("Signature=") {
            sig = Some(s.to_string());
        }
    }
    let cred = cred?;
    let scope: Vec<String> = cred.split('/').map(str::to_string).collect();
    if scope.len() != 5 {
        return None;
    }
    Some((scope[0].clone(), scope[1..].to_vec(), signed?, sig?))
}

/// Recomputes the request's SigV4 signature from the secret of its access key. `Ok(key id)`
/// or the error AWS would answer.
#[allow(clippy::result_large_err)] // a test fake: the error is the answer itself
fn verify_sigv4(
    state: &BedrockState,
    method: &str,
    path_and_query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<String, Response> {
    verify_sigv4_for(state, "bedrock", method, path_and_query, headers, body)
}

/// [`verify_sigv4`] for the signing service `expected_service` (`bedrock`, `sts`).
#[allow(clippy::result_large_err)] // a test fake: the error is the answer itself
fn verify_sigv4_for(
    state: &BedrockState,
    expected_service: &str,
    method: &str,
    path_and_query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<String, Response> {
    let missing = || {
        aws_error(
            403,
            "MissingAuthenticationTokenException",
            "Missing Authentication Token",
        )
    };
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(missing)?;
    let (key_id, scope, signed_headers, signature) = parse_authorization(auth).ok_or_else(|| {
        aws_error(
            403,
            "IncompleteSignatureException",
            "Authorization header requires 'Credential', 'Signature' and 'SignedHeaders' parameters.",
        )
    })?;
    let Some(secret) = state.keys.lock().expect("lock").get(&key_id).cloned() else {
        return Err(aws_error(
            403,
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
        ));
    };
    let bad_sig = || {
        aws_error(
            403,
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.",
        )
    };
    let (date, region, service, terminator) = (&scope[0], &scope[1], &scope[2], &scope[3]);
    if service != expected_service || terminator != "aws4_request" {
        return Err(bad_sig());
    }
    let amz_date = headers
        .get("x-amz-date")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(bad_sig)?;
    if !amz_date.starts_with(date.as_str()) || !signed_headers.iter().any(|h| h == "host") {
        return Err(bad_sig());
    }
    let time = chrono::NaiveDateTime::parse_from_str(amz_date, "%Y%m%dT%H%M%SZ")
        .map_err(|_| bad_sig())?
        .and_utc();
    let skew = (chrono::Utc::now() - time).num_seconds().abs();
    if skew > 15 * 60 {
        return Err(aws_error(
            403,
            "InvalidSignatureException",
            "Signature expired",
        ));
    }
    let time: SystemTime = time.into();
    let host = headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(bad_sig)?;
    // Only the headers the client signed take part, minus those the signer adds itself.
    let mut signed: Vec<(String, String)> = Vec::new();
    for name in &signed_headers {
        if name == "x-amz-date" || name == "host" {
            continue;
        }
        let values: Vec<&str> = headers
            .get_all(name.as_str())
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if values.is_empty() {
            return Err(bad_sig());
        }
        signed.push((name.clone(), values.join(",")));
    }
    let identity = Credentials::new(&key_id, &secret, None, None, "fake").into();
    let mut settings = SigningSettings::default();
    settings.excluded_headers = None;
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(expected_service)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|_| bad_sig())?
        .into();
    let url = format!("http://{host}{path_and_query}");
    let signable = SignableRequest::new(
        method,
        url.as_str(),
        signed.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        SignableBody::Bytes(body),
    )
    .map_err(|_| bad_sig())?;
    let (instructions, expected) = sign(signable, &params).map_err(|_| bad_sig())?.into_parts();
    // The client must have signed exactly the headers we recomputed with.
    let ours = instructions
        .headers()
        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.to_string())
        .unwrap_or_default();
    let theirs = format!("SignedHeaders={}", signed_headers.join(";"));
    if expected != signature || !ours.contains(&theirs) {
        return Err(bad_sig());
    }
    Ok(key_id)
}

async fn bedrock_handler(State(s): State<Arc<BedrockState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 10 << 20)
        .await
        .unwrap_or_default();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    s.requests.lock().expect("lock").push(CloudRecorded {
        method: parts.method.to_string(),
        path: path_and_query.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    // STS (`GetCallerIdentity`) and Bedrock's control plane (the logging configuration) are
    // other hosts in AWS; tests point AWS_STS_BASE_URL and AWS_BEDROCK_CONTROL_BASE_URL here.
    if parts.uri.path() == "/" {
        return sts_handler(&s, &parts, &path_and_query, &body);
    }
    if parts.uri.path() == "/logging/modelinvocations" {
        return logging_handler(&s, &parts, &path_and_query, &body);
    }
    let key_id = match verify_sigv4(
        &s,
        parts.method.as_str(),
        &path_and_query,
        &parts.headers,
        &body,
    ) {
        Ok(k) => k,
        Err(resp) => {
            s.refused.fetch_add(1, Ordering::SeqCst);
            return resp;
        }
    };
    let segments: Vec<&str> = parts.uri.path().split('/').collect();
    let (model, stream) = match segments.as_slice() {
        ["", "model", id, "invoke"] => (percent_decode(id), false),
        ["", "model", id, "invoke-with-response-stream"] => (percent_decode(id), true),
        _ => {
            return aws_error(
                404,
                "UnknownOperationException",
                "The requested operation is not recognized by the service.",
            )
        }
    };
    if parts.method != axum::http::Method::POST {
        return aws_error(
            404,
            "UnknownOperationException",
            "The requested operation is not recognized by the service.",
        );
    }
    if s.throttle_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return aws_error(
            429,
            "ThrottlingException",
            "Too many requests, please wait before trying again.",
        );
    }
    if s.denied
        .lock()
        .expect("lock")
        .contains(&(key_id.clone(), model.clone()))
    {
        return aws_error(
            403,
            "AccessDeniedException",
            "You don't have access to the model with the specified model ID.",
        );
    }
    let Ok(Value::Object(json)) = serde_json::from_slice::<Value>(&body) else {
        return aws_error(
            400,
            "ValidationException",
            "Malformed input request, please reformat your input and try again.",
        );
    };
    let is_claude = model.contains("anthropic.");
    if is_claude {
        for key in ["model", "stream", "metadata"] {
            if json.contains_key(key) {
                return aws_error(
                    400,
                    "ValidationException",
                    &format!("Malformed input request: #: extraneous key [{key}] is not permitted, please reformat your input and try again."),
                );
            }
        }
        if json.get("anthropic_version").and_then(Value::as_str) != Some("bedrock-2023-05-31") {
            return aws_error(
                400,
                "ValidationException",
                "Malformed input request: #: required key [anthropic_version] not found, please reformat your input and try again.",
            );
        }
        if !json.contains_key("max_tokens") || !json.contains_key("messages") {
            return aws_error(
                400,
                "ValidationException",
                "Malformed input request: #: required key [max_tokens] not found, please reformat your input and try again.",
            );
        }
    } else if !model.starts_with("mistral.") {
        return aws_error(
            400,
            "ValidationException",
            "The provided model identifier is invalid.",
        );
    }
    if json
        .get("max_tokens")
        .and_then(Value::as_i64)
        .is_some_and(|n| n < 1)
    {
        return aws_error(
            400,
            "ValidationException",
            &format!(
                "Malformed input request: #/max_tokens: {} is not greater or equal to 1, please reformat your input and try again.",
                json["max_tokens"]
            ),
        );
    }
    s.served_by.lock().expect("lock").push(key_id);
    match (is_claude, stream) {
        (true, false) => claude_invoke(&model),
        (true, true) => {
            // A test asks for a failure mid-stream with state, an official client (which
            // cannot add headers) with the prompt "please fail mid-stream".
            let asked = body
                .windows(b"please fail mid-stream".len())
                .any(|w| w == b"please fail mid-stream");
            let mut exception = s.stream_exception.lock().expect("lock").take();
            if asked && exception.is_none() {
                exception = Some("modelStreamErrorException".into());
            }
            claude_stream(&model, exception)
        }
        (false, false) => mistral_invoke(),
        (false, true) => mistral_stream(),
    }
}

/// STS's XML error answer.
fn sts_error(status: u16, code: &str, message: &str) -> Response {
    let body = format!(
        "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\n  <Error>\n    <Type>Sender</Type>\n    <Code>{code}</Code>\n    <Message>{message}</Message>\n  </Error>\n  <RequestId>00000000-0000-0000-0000-000000000000</RequestId>\n</ErrorResponse>\n"
    );
    let mut resp = (StatusCode::from_u16(status).expect("status"), body).into_response();
    resp.headers_mut()
        .insert("content-type", "text/xml".parse().expect("header"));
    resp
}

/// STS `GetCallerIdentity` (the query API: `GET /?Action=GetCallerIdentity&Version=…`,
/// signed for the service `sts`), answered in XML as STS does.
fn sts_handler(
    s: &BedrockState,
    parts: &axum::http::request::Parts,
    path_and_query: &str,
    body: &[u8],
) -> Response {
    // The query API takes its parameters in the query string (GET) or a form body (POST,
    // as boto3 sends them).
    let mut query: HashMap<String, String> =
        url::form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    if parts.method == axum::http::Method::POST {
        query.extend(url::form_urlencoded::parse(body).into_owned());
    }
    if query.get("Action").map(String::as_str) != Some("GetCallerIdentity")
        || query.get("Version").map(String::as_str) != Some("2011-06-15")
    {
        return sts_error(400, "InvalidAction", "Could not find operation");
    }
    let key_id = match verify_sigv4_for(
        s,
        "sts",
        parts.method.as_str(),
        path_and_query,
        &parts.headers,
        body,
    ) {
        Ok(k) => k,
        Err(resp) => {
            s.refused.fetch_add(1, Ordering::SeqCst);
            let aws_type = resp
                .headers()
                .get("x-amzn-ErrorType")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .split(':')
                .next()
                .unwrap_or("")
                .to_string();
            return match aws_type.as_str() {
                "UnrecognizedClientException" => sts_error(
                    403,
                    "InvalidClientTokenId",
                    "The security token included in the request is invalid.",
                ),
                "MissingAuthenticationTokenException" => sts_error(
                    403,
                    "MissingAuthenticationToken",
                    "Request is missing Authentication Token",
                ),
                "IncompleteSignatureException" => sts_error(
                    403,
                    "IncompleteSignature",
                    "Request must contain a signature that conforms to AWS standards",
                ),
                _ => sts_error(
                    403,
                    "SignatureDoesNotMatch",
                    "The request signature we calculated does not match the signature you provided.",
                ),
            };
        }
    };
    if s.sts_throttle_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return sts_error(400, "Throttling", "Rate exceeded");
    }
    let xml = format!(
        "<GetCallerIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\n  <GetCallerIdentityResult>\n    <Arn>arn:aws:iam::123456789012:user/{key_id}</Arn>\n    <UserId>AIDAFAKE{key_id}</UserId>\n    <Account>123456789012</Account>\n  </GetCallerIdentityResult>\n  <ResponseMetadata>\n    <RequestId>00000000-0000-0000-0000-000000000001</RequestId>\n  </ResponseMetadata>\n</GetCallerIdentityResponse>\n"
    );
    let mut resp = xml.into_response();
    resp.headers_mut()
        .insert("content-type", "text/xml".parse().expect("header"));
    resp
}

/// Bedrock's `GetModelInvocationLoggingConfiguration` (`GET /logging/modelinvocations`).
fn logging_handler(
    s: &BedrockState,
    parts: &axum::http::request::Parts,
    path_and_query: &str,
    body: &[u8],
) -> Response {
    if parts.method != axum::http::Method::GET {
        return aws_error(
            404,
            "UnknownOperationException",
            "The requested operation is not recognized by the service.",
        );
    }
    let key_id = match verify_sigv4(s, "GET", path_and_query, &parts.headers, body) {
        Ok(k) => k,
        Err(resp) => {
            s.refused.fetch_add(1, Ordering::SeqCst);
            return resp;
        }
    };
    if s.logging_denied.lock().expect("lock").contains(&key_id) {
        return aws_error(
            403,
            "AccessDeniedException",
            "User is not authorized to perform: bedrock:GetModelInvocationLoggingConfiguration",
        );
    }
    if s.logging.lock().expect("lock").contains(&key_id) {
        axum::Json(json!({"loggingConfig": {
            "cloudWatchConfig": {"logGroupName": "bedrock-prompts", "roleArn": "arn:aws:iam::123456789012:role/log"},
            "textDataDeliveryEnabled": true, "imageDataDeliveryEnabled": true,
            "embeddingDataDeliveryEnabled": false}}))
        .into_response()
    } else {
        // No configuration: Bedrock answers without `loggingConfig`.
        axum::Json(json!({})).into_response()
    }
}

fn with_token_headers(mut resp: Response, usage: (u64, u64)) -> Response {
    let h = resp.headers_mut();
    h.insert(
        "x-amzn-bedrock-input-token-count",
        usage.0.to_string().parse().expect("header"),
    );
    h.insert(
        "x-amzn-bedrock-output-token-count",
        usage.1.to_string().parse().expect("header"),
    );
    h.insert(
        "x-amzn-bedrock-invocation-latency",
        "42".parse().expect("header"),
    );
    resp
}

fn claude_invoke(model: &str) -> Response {
    let (input, output) = BEDROCK_PLAIN_USAGE;
    let body = json!({
        "id": "msg_bdrk_01FAKE",
        "type": "message",
        "role": "assistant",
        "model": model.trim_start_matches("us.").trim_start_matches("anthropic."),
        "content": [{"type": "text", "text": BEDROCK_TEXT}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {"input_tokens": input, "output_tokens": output},
    });
    with_token_headers(axum::Json(body).into_response(), BEDROCK_PLAIN_USAGE)
}

fn eventstream_response(frames: Vec<Vec<u8>>) -> Response {
    let chunks = frames
        .into_iter()
        .map(|f| Ok::<_, std::io::Error>(Bytes::from(f)));
    let mut resp = Response::new(Body::from_stream(futures::stream::iter(chunks)));
    let h = resp.headers_mut();
    h.insert(
        "content-type",
        "application/vnd.amazon.eventstream"
            .parse()
            .expect("header"),
    );
    h.insert(
        "x-amzn-bedrock-content-type",
        "application/json".parse().expect("header"),
    );
    resp
}

fn claude_stream(model: &str, exception: Option<String>) -> Response {
    let (input, output) = BEDROCK_STREAM_USAGE;
    let mut frames = vec![
        encode_chunk_frame(&json!({"type": "message_start", "message": {
            "id": "msg_bdrk_01STREAM", "type": "message", "role": "assistant",
            "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": 1}}})),
        encode_chunk_frame(&json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}})),
    ];
    let words = ["Hello", " from", " Bedrock"];
    for (i, w) in words.iter().enumerate() {
        frames.push(encode_chunk_frame(
            &json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": w}}),
        ));
        if i == 0 {
            if let Some(ex) = &exception {
                frames.push(encode_exception_frame(
                    ex,
                    "The system encountered an unexpected error during processing. Try your request again.",
                ));
                return eventstream_response(frames);
            }
        }
    }
    frames.push(encode_chunk_frame(
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    frames.push(encode_chunk_frame(&json!({"type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": null},
        "usage": {"output_tokens": output}})));
    frames.push(encode_chunk_frame(&json!({"type": "message_stop",
        "amazon-bedrock-invocationMetrics": {"inputTokenCount": input,
            "outputTokenCount": output, "invocationLatency": 420, "firstByteLatency": 120}})));
    eventstream_response(frames)
}

fn mistral_invoke() -> Response {
    let body = json!({"choices": [{"index": 0,
        "message": {"role": "assistant", "content": BEDROCK_TEXT}, "stop_reason": "stop"}]});
    with_token_headers(axum::Json(body).into_response(), BEDROCK_PLAIN_USAGE)
}

fn mistral_stream() -> Response {
    let (input, output) = BEDROCK_STREAM_USAGE;
    let mut frames = Vec::new();
    let words = ["Hello", " from", " Bedrock"];
    for w in words {
        frames.push(encode_chunk_frame(&json!({"choices": [{"index": 0,
            "message": {"role": "assistant", "content": w}, "stop_reason": null}]})));
    }
    frames.push(encode_chunk_frame(&json!({"choices": [{"index": 0,
        "message": {"role": "assistant", "content": ""}, "stop_reason": "stop"}],
        "amazon-bedrock-invocationMetrics": {"inputTokenCount": input,
            "outputTokenCount": output, "invocationLatency": 420, "firstByteLatency": 120}})));
    eventstream_response(frames)
}

// ---------------------------------------------------------------------------------------------
// Vertex AI

/// The public half of the test service-account key (PKCS#1 DER).
fn test_public_key() -> Vec<u8> {
    let pem = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/TEST-ONLY-service-account-public-key.pem"
    ))
    .expect("public key fixture");
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("public key is base64")
}

/// The private key of the test service account, as a PEM document.
pub fn test_private_key_pem() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/TEST-ONLY-firebase-service-account-key.pem"
    ))
    .expect("private key fixture")
}

/// The test key written as a `GCP_CREDENTIALS` entry (newlines as `\n`).
pub fn gcp_credential(project: &str, client_email: &str, region: &str) -> String {
    let key = test_private_key_pem().trim().replace('\n', "\\n");
    format!("{project}:{client_email}:{region}:{key}")
}

#[derive(Default)]
pub struct VertexState {
    /// The token endpoint's own URL: the `aud` an assertion must carry.
    pub token_url: Mutex<String>,
    /// Service-account e-mails the token endpoint accepts.
    pub accounts: Mutex<HashSet<String>>,
    /// Project → region served.
    pub projects: Mutex<HashMap<String, String>>,
    /// Access tokens issued and not revoked.
    pub issued: Mutex<HashSet<String>>,
    pub grants: AtomicUsize,
    pub refused_grants: AtomicUsize,
    pub refused_calls: AtomicUsize,
    pub requests: Mutex<Vec<CloudRecorded>>,
    /// Projects whose calls are answered 429 `RESOURCE_EXHAUSTED` (quota per minute).
    pub throttled_projects: Mutex<HashSet<String>>,
    /// Models answered 404 (not enabled in the Model Garden for any project).
    pub missing_models: Mutex<HashSet<String>>,
}

/// A running fake Vertex AI (token endpoint at `/token`, API under `/v1/`). Stops when
/// dropped.
pub struct FakeVertex {
    /// `http://127.0.0.1:PORT` (as `GCP_VERTEX_BASE_URL`).
    pub url: String,
    /// `http://127.0.0.1:PORT/token` (as `GCP_TOKEN_URL`).
    pub token_url: String,
    pub state: Arc<VertexState>,
    handle: tokio::task::JoinHandle<()>,
}

impl Drop for FakeVertex {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

impl FakeVertex {
    /// A fake serving `(project, region, service-account e-mail)` triples.
    pub async fn start(accounts: &[(&str, &str, &str)]) -> FakeVertex {
        let state = Arc::new(VertexState::default());
        for (project, region, email) in accounts {
            state
                .projects
                .lock()
                .expect("lock")
                .insert(project.to_string(), region.to_string());
            state
                .accounts
                .lock()
                .expect("lock")
                .insert(email.to_string());
        }
        let app = axum::Router::new()
            .route("/token", axum::routing::post(vertex_token))
            .fallback(vertex_predict)
            .with_state(state.clone());
        let (url, handle) = listen(app).await;
        let token_url = format!("{url}/token");
        *state.token_url.lock().expect("lock") = token_url.clone();
        FakeVertex {
            url,
            token_url,
            state,
            handle,
        }
    }

    pub fn requests(&self) -> Vec<CloudRecorded> {
        self.state.requests.lock().expect("lock").clone()
    }

    /// Revokes every issued access token (the next API call with one is refused).
    pub fn revoke_tokens(&self) {
        self.state.issued.lock().expect("lock").clear();
    }
}

fn invalid_grant(s: &VertexState, why: &str) -> Response {
    s.refused_grants.fetch_add(1, Ordering::SeqCst);
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"error": "invalid_grant", "error_description": why})),
    )
        .into_response()
}

async fn vertex_token(State(s): State<Arc<VertexState>>, body: String) -> Response {
    let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    if form.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        return invalid_grant(&s, "Invalid grant_type");
    }
    let assertion = form.get("assertion").cloned().unwrap_or_default();
    let parts: Vec<&str> = assertion.split('.').collect();
    if parts.len() != 3 {
        return invalid_grant(&s, "Invalid JWT");
    }
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let decode = |p: &str| -> Option<Value> {
        serde_json::from_slice(&b64.decode(p.trim_end_matches('=')).ok()?).ok()
    };
    let (Some(header), Some(claims), Ok(sig)) = (
        decode(parts[0]),
        decode(parts[1]),
        b64.decode(parts[2].trim_end_matches('=')),
    ) else {
        return invalid_grant(&s, "Invalid JWT");
    };
    if header["alg"] != "RS256" {
        return invalid_grant(&s, "Invalid JWT: alg must be RS256");
    }
    let key = aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
        test_public_key(),
    );
    let signed = format!("{}.{}", parts[0], parts[1]);
    if key.verify(signed.as_bytes(), &sig).is_err() {
        return invalid_grant(&s, "Invalid JWT Signature.");
    }
    let now = chrono::Utc::now().timestamp();
    let email = claims["iss"].as_str().unwrap_or_default();
    if !s.accounts.lock().expect("lock").contains(email) {
        return invalid_grant(&s, "Invalid grant: account not found");
    }
    // Google's audience; google-auth always sends it, whatever the token URL. A client
    // configured with this fake's URL may name the fake instead.
    let aud = claims["aud"].as_str().unwrap_or_default();
    if aud != "https://oauth2.googleapis.com/token"
        && aud != s.token_url.lock().expect("lock").as_str()
    {
        return invalid_grant(&s, "Invalid JWT: aud is not this token endpoint");
    }
    let scope = claims["scope"].as_str().unwrap_or_default();
    if !scope
        .split(' ')
        .any(|sc| sc == "https://www.googleapis.com/auth/cloud-platform")
    {
        return invalid_grant(&s, "Invalid JWT: scope lacks cloud-platform");
    }
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap_or(0),
        claims["exp"].as_i64().unwrap_or(0),
    );
    if exp <= now || iat > now + 60 || exp - iat > 3600 {
        return invalid_grant(
            &s,
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe.",
        );
    }
    let n = s.grants.fetch_add(1, Ordering::SeqCst);
    let token = format!("ya29.fake-{n}-{}", uuid::Uuid::new_v4().simple());
    s.issued.lock().expect("lock").insert(token.clone());
    axum::Json(json!({"access_token": token, "expires_in": 3599, "token_type": "Bearer"}))
        .into_response()
}

fn google_error(status: u16, message: &str, code: &str) -> Response {
    (
        StatusCode::from_u16(status).expect("status"),
        axum::Json(json!({"error": {"code": status, "message": message, "status": code}})),
    )
        .into_response()
}

async fn vertex_predict(State(s): State<Arc<VertexState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 10 << 20)
        .await
        .unwrap_or_default();
    s.requests.lock().expect("lock").push(CloudRecorded {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let token = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !s.issued.lock().expect("lock").contains(token) {
        s.refused_calls.fetch_add(1, Ordering::SeqCst);
        return google_error(
            401,
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
            "UNAUTHENTICATED",
        );
    }
    let path = parts.uri.path().to_string();
    let segs: Vec<&str> = path.split('/').collect();
    let ["", "v1", "projects", project, "locations", region, "publishers", "anthropic", "models", model_action] =
        segs.as_slice()
    else {
        return google_error(
            404,
            "The requested URL was not found on this server.",
            "NOT_FOUND",
        );
    };
    let Some((model, action)) = model_action.rsplit_once(':') else {
        return google_error(
            404,
            "The requested URL was not found on this server.",
            "NOT_FOUND",
        );
    };
    if s.projects
        .lock()
        .expect("lock")
        .get(*project)
        .map(String::as_str)
        != Some(*region)
    {
        return google_error(
            403,
            &format!("Permission denied on resource project {project} (or it may not exist) in {region}."),
            "PERMISSION_DENIED",
        );
    }
    if s.throttled_projects
        .lock()
        .expect("lock")
        .contains(*project)
    {
        let mut resp = google_error(
            429,
            "Quota exceeded for aiplatform.googleapis.com/online_prediction_requests_per_base_model with base model: anthropic-claude. Please submit a quota increase request.",
            "RESOURCE_EXHAUSTED",
        );
        resp.headers_mut()
            .insert("retry-after", "30".parse().expect("header"));
        return resp;
    }
    if !model.starts_with("claude-")
        || !model.contains('@')
        || s.missing_models.lock().expect("lock").contains(model)
    {
        return google_error(
            404,
            &format!("Publisher Model `projects/{project}/locations/{region}/publishers/anthropic/models/{model}` not found."),
            "NOT_FOUND",
        );
    }
    let Ok(Value::Object(json)) = serde_json::from_slice::<Value>(&body) else {
        return google_error(400, "Invalid JSON payload received.", "INVALID_ARGUMENT");
    };
    // Vertex wants `anthropic_version` in the body (`vertex-2023-10-16`; the current SDK's
    // AnthropicVertex sends its own API version there) and the model only in the URL.
    if json
        .get("anthropic_version")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
        || json.contains_key("model")
    {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"type": "error", "error": {"type": "invalid_request_error",
                "message": "anthropic_version is required (vertex-2023-10-16) and model must not be in the body"}})),
        )
            .into_response();
    }
    match action {
        "rawPredict" => {
            let (input, output) = VERTEX_PLAIN_USAGE;
            axum::Json(json!({
                "id": "msg_vrtx_01FAKE", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": VERTEX_TEXT}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": input, "output_tokens": output},
            }))
            .into_response()
        }
        "streamRawPredict" => {
            let (input, output) = VERTEX_STREAM_USAGE;
            let ev = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
            let mut events = vec![
                ev(
                    "message_start",
                    json!({"type": "message_start", "message": {
                    "id": "msg_vrtx_01STREAM", "type": "message", "role": "assistant",
                    "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": input, "output_tokens": 1}}}),
                ),
                ev("ping", json!({"type": "ping"})),
                ev(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}),
                ),
            ];
            for w in ["Hello", " from", " Vertex"] {
                events.push(ev(
                    "content_block_delta",
                    json!({"type": "content_block_delta",
                    "index": 0, "delta": {"type": "text_delta", "text": w}}),
                ));
            }
            events.push(ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ));
            events.push(ev(
                "message_delta",
                json!({"type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                "usage": {"output_tokens": output}}),
            ));
            events.push(ev("message_stop", json!({"type": "message_stop"})));
            let chunks = events
                .into_iter()
                .map(|e| Ok::<_, std::io::Error>(Bytes::from(e)));
            let mut resp = Response::new(Body::from_stream(futures::stream::iter(chunks)));
            resp.headers_mut().insert(
                "content-type",
                "text/event-stream; charset=utf-8".parse().expect("h"),
            );
            resp
        }
        _ => google_error(
            404,
            "The requested URL was not found on this server.",
            "NOT_FOUND",
        ),
    }
}

/// Waits until `f` holds, polling for at most `secs` seconds.
pub async fn until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
