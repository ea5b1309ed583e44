//! AWS Bedrock: `AWS_CREDENTIALS`, model names → Bedrock model ids, the request body and URL
//! of `InvokeModel`/`InvokeModelWithResponseStream`, SigV4 signing (AWS's own `aws-sigv4`), and
//! the decoder from Bedrock's binary event stream to Anthropic SSE. Knows nothing of users,
//! quotas or HTTP routing: the forwarder calls these pieces.

use std::fmt;
use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use aws_smithy_eventstream::frame::{DecodedFrame, MessageFrameDecoder};
use aws_smithy_types::event_stream::{HeaderValue as EsHeaderValue, Message};
use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use serde_json::{json, Map, Value};

use super::{AuthError, StreamTransform, UpstreamRequest};
use crate::config::Secret;
use crate::http1::Fields;

/// The variable holding the credentials, for messages.
pub const VAR: &str = "AWS_CREDENTIALS";
/// The default `AWS_BEDROCK_BASE_URL`; `{region}` is replaced by the credential's region.
pub const DEFAULT_BASE_URL: &str = "https://bedrock-runtime.{region}.amazonaws.com";
/// The `anthropic_version` Bedrock wants in Claude request bodies.
pub const ANTHROPIC_VERSION: &str = "bedrock-2023-05-31";
/// The SigV4 service name of the Bedrock runtime.
pub const SERVICE: &str = "bedrock";

/// One `accessKeyId:secretAccessKey:region` entry of `AWS_CREDENTIALS`.
#[derive(Clone)]
pub struct AwsCredential {
    pub access_key_id: String,
    secret_access_key: Secret,
    pub region: String,
    /// `aws-` and the fingerprint of the whole entry: what logs and the info page show.
    pub fingerprint: String,
}

impl fmt::Debug for AwsCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsCredential")
            .field("fingerprint", &self.fingerprint)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl AwsCredential {
    /// A credential from its parts (tests and the parser).
    pub fn new(access_key_id: &str, secret_access_key: &str, region: &str) -> AwsCredential {
        let whole = format!("{access_key_id}:{secret_access_key}:{region}");
        AwsCredential {
            access_key_id: access_key_id.to_string(),
            secret_access_key: Secret::new(secret_access_key),
            region: region.to_string(),
            fingerprint: format!("aws-{}", crate::users::fingerprint(&whole)),
        }
    }

    /// The secret key, only for signing.
    pub fn secret_access_key(&self) -> &str {
        self.secret_access_key.expose()
    }
}

/// Parses `AWS_CREDENTIALS`: a comma list of `accessKeyId:secretAccessKey:region`. Blank
/// entries are skipped and repeated entries kept once (as the original does). Errors name the
/// variable and the entry's position, never its secret.
pub fn parse_credentials(raw: &str) -> Result<Vec<AwsCredential>, String> {
    let entries: Vec<&str> = raw
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    let total = entries.len();
    let mut out: Vec<AwsCredential> = Vec::with_capacity(total);
    for (i, entry) in entries.iter().enumerate() {
        let pos = i + 1;
        let parts: Vec<&str> = entry.split(':').map(str::trim).collect();
        if parts.len() != 3 {
            return Err(format!(
                "{VAR}: entry {pos} of {total} has {} colon-separated fields; each entry must be accessKeyId:secretAccessKey:region, e.g. AKIA...:wJalr...:us-east-1",
                parts.len()
            ));
        }
        let (id, secret, region) = (parts[0], parts[1], parts[2]);
        if id.is_empty() || secret.is_empty() || region.is_empty() {
            let which = if id.is_empty() {
                "accessKeyId"
            } else if secret.is_empty() {
                "secretAccessKey"
            } else {
                "region"
            };
            return Err(format!(
                "{VAR}: entry {pos} of {total} has an empty {which}; each entry must be accessKeyId:secretAccessKey:region"
            ));
        }
        if !region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(format!(
                "{VAR}: entry {pos} of {total} has the region {region:?}; a region looks like us-east-1"
            ));
        }
        if !id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(format!(
                "{VAR}: entry {pos} of {total} has an accessKeyId that is not letters and digits; each entry must be accessKeyId:secretAccessKey:region"
            ));
        }
        let cred = AwsCredential::new(id, secret, region);
        if !out.iter().any(|c| c.fingerprint == cred.fingerprint) {
            out.push(cred);
        }
    }
    Ok(out)
}

/// The runtime base URL for a region: `{region}` in the template replaced, no trailing `/`.
pub fn base_url(template: &str, region: &str) -> String {
    template
        .replace("{region}", region)
        .trim_end_matches('/')
        .to_string()
}

/// `{base}/model/{modelId}/invoke` or `…/invoke-with-response-stream`. The model id is
/// percent-encoded as AWS's SDKs send it (`:` → `%3A`); SigV4 then signs the encoded path.
pub fn invoke_url(base: &str, model_id: &str, stream: bool) -> String {
    let id: String = url::form_urlencoded::byte_serialize(model_id.as_bytes()).collect();
    let action = if stream {
        "invoke-with-response-stream"
    } else {
        "invoke"
    };
    format!("{base}/model/{id}/{action}")
}

/// The Claude names Bedrock knows: Anthropic's name (and its aliases) → Bedrock model id.
/// Newer models than the original knew are included with their published Bedrock ids.
const CLAUDE_IDS: &[(&str, &str)] = &[
    ("claude-instant-1", "anthropic.claude-instant-v1"),
    ("claude-instant-1.2", "anthropic.claude-instant-v1"),
    ("claude-instant-v1", "anthropic.claude-instant-v1"),
    ("claude-2", "anthropic.claude-v2"),
    ("claude-2.0", "anthropic.claude-v2"),
    ("claude-v2", "anthropic.claude-v2"),
    ("claude-2.1", "anthropic.claude-v2:1"),
    ("claude-3-sonnet", "anthropic.claude-3-sonnet-20240229-v1:0"),
    (
        "claude-3-sonnet-20240229",
        "anthropic.claude-3-sonnet-20240229-v1:0",
    ),
    ("claude-3-haiku", "anthropic.claude-3-haiku-20240307-v1:0"),
    (
        "claude-3-haiku-20240307",
        "anthropic.claude-3-haiku-20240307-v1:0",
    ),
    ("claude-3-opus", "anthropic.claude-3-opus-20240229-v1:0"),
    (
        "claude-3-opus-latest",
        "anthropic.claude-3-opus-20240229-v1:0",
    ),
    (
        "claude-3-opus-20240229",
        "anthropic.claude-3-opus-20240229-v1:0",
    ),
    (
        "claude-3-5-sonnet-20240620",
        "anthropic.claude-3-5-sonnet-20240620-v1:0",
    ),
    (
        "claude-3-5-sonnet-20241022",
        "anthropic.claude-3-5-sonnet-20241022-v2:0",
    ),
    (
        "claude-3-5-sonnet-latest",
        "anthropic.claude-3-5-sonnet-20241022-v2:0",
    ),
    (
        "claude-3-5-sonnet",
        "anthropic.claude-3-5-sonnet-20241022-v2:0",
    ),
    (
        "claude-3-5-haiku-20241022",
        "anthropic.claude-3-5-haiku-20241022-v1:0",
    ),
    (
        "claude-3-5-haiku-latest",
        "anthropic.claude-3-5-haiku-20241022-v1:0",
    ),
    (
        "claude-3-5-haiku",
        "anthropic.claude-3-5-haiku-20241022-v1:0",
    ),
    (
        "claude-3-7-sonnet-20250219",
        "anthropic.claude-3-7-sonnet-20250219-v1:0",
    ),
    (
        "claude-3-7-sonnet-latest",
        "anthropic.claude-3-7-sonnet-20250219-v1:0",
    ),
    (
        "claude-sonnet-4-20250514",
        "anthropic.claude-sonnet-4-20250514-v1:0",
    ),
    (
        "claude-sonnet-4-0",
        "anthropic.claude-sonnet-4-20250514-v1:0",
    ),
    (
        "claude-opus-4-20250514",
        "anthropic.claude-opus-4-20250514-v1:0",
    ),
    ("claude-opus-4-0", "anthropic.claude-opus-4-20250514-v1:0"),
];

/// Prefixes of Bedrock ids (and cross-region inference profile ids) sent unchanged.
const BEDROCK_PREFIXES: &[&str] = &[
    "anthropic.",
    "mistral.",
    "us.",
    "eu.",
    "apac.",
    "us-gov.",
    "global.",
    "arn:aws:bedrock:",
];

fn is_bedrock_id(model: &str) -> bool {
    BEDROCK_PREFIXES.iter().any(|p| model.starts_with(p))
}

/// The Bedrock model id for a Claude model name. Bedrock ids and cross-region profile ids
/// (`us.anthropic.…`) pass through; Anthropic names are looked up in the table.
pub fn claude_model_id(model: &str) -> Result<String, String> {
    let m = model.trim();
    if is_bedrock_id(m) {
        return Ok(m.to_string());
    }
    let lower = m.to_ascii_lowercase();
    CLAUDE_IDS
        .iter()
        .find(|(name, _)| *name == lower)
        .map(|(_, id)| id.to_string())
        .ok_or_else(|| {
            format!(
                "the model {m:?} has no known AWS Bedrock id; use a Bedrock model id such as anthropic.claude-3-5-sonnet-20240620-v1:0 (or a us./eu. inference profile), or an Anthropic name such as claude-3-5-sonnet-20240620"
            )
        })
}

/// The Bedrock model id for a Mistral model name (the original's mapping, with `8x7b`
/// checked before `7b` so that Mixtral is not taken for Mistral 7B).
pub fn mistral_model_id(model: &str) -> Result<String, String> {
    let m = model.trim();
    if is_bedrock_id(m) {
        return Ok(m.to_string());
    }
    let lower = m.to_ascii_lowercase();
    let id = if lower.contains("8x7b") {
        "mistral.mixtral-8x7b-instruct-v0:1"
    } else if lower.contains("7b") {
        "mistral.mistral-7b-instruct-v0:2"
    } else if lower.contains("large-2402") {
        "mistral.mistral-large-2402-v1:0"
    } else if lower.contains("large") {
        "mistral.mistral-large-2407-v1:0"
    } else if lower.contains("small") {
        "mistral.mistral-small-2402-v1:0"
    } else {
        return Err(format!(
            "the model {m:?} has no known AWS Bedrock id; use a Mistral model Bedrock serves, e.g. mistral-large-2407 or mistral.mistral-large-2407-v1:0"
        ));
    };
    Ok(id.to_string())
}

/// The quota family of a Bedrock model id, as the original names them: `aws-claude`,
/// `aws-claude-opus`, `aws-mistral-{tiny,small,medium,large}`.
pub fn family(model_id: &str) -> &'static str {
    let m = model_id.to_ascii_lowercase();
    if m.contains("claude") || m.contains("anthropic") {
        return if m.contains("opus") {
            "aws-claude-opus"
        } else {
            "aws-claude"
        };
    }
    if m.contains("mistral") || m.contains("mixtral") {
        // The original strips vendor and version and maps the rest like Mistral's own API,
        // where only the named tiers are recognised and everything else is "small".
        return if m.contains("mistral-large") {
            "aws-mistral-large"
        } else if m.contains("mistral-medium") {
            "aws-mistral-medium"
        } else if m.contains("mistral-tiny") {
            "aws-mistral-tiny"
        } else {
            "aws-mistral-small"
        };
    }
    "aws-claude"
}

/// The Claude request body for Bedrock: the Anthropic Messages body without `model` and
/// `stream` (Bedrock takes them from the URL) and without `metadata` (Bedrock refuses keys it
/// does not know), plus `anthropic_version`. An `anthropic-beta` header goes in the body.
pub fn claude_body(mut body: Map<String, Value>, anthropic_beta: Option<&str>) -> Vec<u8> {
    body.remove("model");
    body.remove("stream");
    body.remove("metadata");
    body.insert("anthropic_version".into(), json!(ANTHROPIC_VERSION));
    if let Some(beta) = anthropic_beta {
        let list: Vec<Value> = beta
            .split(',')
            .map(str::trim)
            .filter(|b| !b.is_empty())
            .map(|b| json!(b))
            .collect();
        if !list.is_empty() {
            body.insert("anthropic_beta".into(), Value::Array(list));
        }
    }
    serde_json::to_vec(&Value::Object(body)).unwrap_or_default()
}

/// Signs a request for Bedrock with SigV4 in place: adds `x-amz-date` and `authorization`.
/// The request's URI must be absolute; every header already on it is signed (callers add
/// `content-type` and `accept` before). `now` is the signing time.
pub fn sign_request<B>(
    cred: &AwsCredential,
    req: &mut http::Request<B>,
    body: &[u8],
    now: SystemTime,
) -> Result<(), String> {
    sign_request_for(cred, SERVICE, &cred.region, req, body, now)
}

/// [`sign_request`] for another AWS service and region (the key checker's STS call is signed
/// for `sts`, Bedrock's control plane for `bedrock`).
pub fn sign_request_for<B>(
    cred: &AwsCredential,
    service: &str,
    region: &str,
    req: &mut http::Request<B>,
    body: &[u8],
    now: SystemTime,
) -> Result<(), String> {
    let identity = Credentials::new(
        &cred.access_key_id,
        cred.secret_access_key(),
        None,
        None,
        "AWS_CREDENTIALS",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(now)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| format!("cannot prepare SigV4 signing: {e}"))?
        .into();
    let uri = req.uri().to_string();
    let headers: Vec<(&str, &str)> = req
        .headers()
        .iter()
        .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str(), v)))
        .collect();
    let signable = SignableRequest::new(
        req.method().as_str(),
        uri.as_str(),
        headers.into_iter(),
        SignableBody::Bytes(body),
    )
    .map_err(|e| format!("cannot sign the request to {uri}: {e}"))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| format!("cannot sign the request to {uri}: {e}"))?
        .into_parts();
    instructions.apply_to_request_http1x(req);
    Ok(())
}

/// How Bedrock's error types (the `x-amzn-ErrorType` header or an exception frame's type)
/// affect the credential that met them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The credential is invalid (unknown key, wrong secret): take it out of rotation.
    BadCredential,
    /// The credential is rate-limited: rest it and retry with another.
    Throttled,
    /// This credential may not use this model: try another credential.
    ModelDenied,
    /// The request itself is wrong: pass the error to the client.
    Client,
    /// Anything else: a server-side failure.
    Server,
}

/// Classifies an AWS error type name (`UnrecognizedClientException`,
/// `ThrottlingException:http://internal.amazon.com/…`, `throttlingException`, …).
pub fn classify_error(error_type: &str) -> ErrorKind {
    let t = error_type
        .split(':')
        .next()
        .unwrap_or(error_type)
        .to_ascii_lowercase();
    match t.as_str() {
        "unrecognizedclientexception"
        | "invalidsignatureexception"
        | "signaturedoesnotmatch"
        | "incompletesignatureexception"
        | "missingauthenticationtokenexception"
        | "invalidclienttokenid"
        | "expiredtokenexception" => ErrorKind::BadCredential,
        "throttlingexception" | "toomanyrequestsexception" | "servicequotaexceededexception" => {
            ErrorKind::Throttled
        }
        "accessdeniedexception" => ErrorKind::ModelDenied,
        "validationexception" | "resourcenotfoundexception" | "modelerrorexception" => {
            ErrorKind::Client
        }
        _ => ErrorKind::Server,
    }
}

/// The Anthropic error type a client sees for an AWS error type.
pub fn anthropic_error_type(error_type: &str) -> &'static str {
    let t = error_type
        .split(':')
        .next()
        .unwrap_or(error_type)
        .to_ascii_lowercase();
    match t.as_str() {
        "throttlingexception" | "toomanyrequestsexception" | "servicequotaexceededexception" => {
            "rate_limit_error"
        }
        "validationexception" => "invalid_request_error",
        "resourcenotfoundexception" => "not_found_error",
        "accessdeniedexception" => "permission_error",
        "modelnotreadyexception" | "serviceunavailableexception" => "overloaded_error",
        _ => {
            if matches!(classify_error(error_type), ErrorKind::BadCredential) {
                "authentication_error"
            } else {
                "api_error"
            }
        }
    }
}

/// One SSE `error` event in Anthropic's shape.
pub fn sse_error(error_type: &str, message: &str) -> Bytes {
    let data = json!({
        "type": "error",
        "error": {"type": error_type, "message": message},
    });
    Bytes::from(format!("event: error\ndata: {data}\n\n"))
}

/// One decoded event-stream frame.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// A `chunk` event: the JSON its base64 `bytes` carried.
    Chunk(Value),
    /// An exception (or error) frame, or a frame that could not be read; the stream ends
    /// after it. `error_type` is AWS's name (`throttlingException`, …).
    Exception { error_type: String, message: String },
}

/// Decodes Bedrock's `application/vnd.amazon.eventstream` response body frame by frame as
/// bytes arrive. Frames (prelude, headers, payload, CRCs) are read by AWS's own
/// `aws-smithy-eventstream`.
#[derive(Default)]
pub struct EventStreamDecoder {
    decoder: MessageFrameDecoder,
    buf: BytesMut,
    failed: bool,
}

impl EventStreamDecoder {
    pub fn new() -> EventStreamDecoder {
        EventStreamDecoder::default()
    }

    /// Feeds response bytes; returns every frame completed by them. After a corrupt frame
    /// the stream ends with one exception and further input is ignored.
    pub fn push(&mut self, data: &[u8]) -> Vec<Frame> {
        let mut out = Vec::new();
        if self.failed {
            return out;
        }
        self.buf.extend_from_slice(data);
        loop {
            match self.decoder.decode_frame(&mut self.buf) {
                Ok(DecodedFrame::Complete(msg)) => out.push(read_frame(&msg)),
                Ok(DecodedFrame::Incomplete) => break,
                Err(e) => {
                    self.failed = true;
                    self.buf.clear();
                    out.push(Frame::Exception {
                        error_type: "corruptFrame".into(),
                        message: format!("the event stream was corrupt: {e}"),
                    });
                    break;
                }
            }
        }
        out
    }

    /// True when bytes of an incomplete frame are left over (a cut stream).
    pub fn has_partial_frame(&self) -> bool {
        !self.failed && self.buf.has_remaining()
    }
}

/// What one frame of a Claude stream became.
#[derive(Debug, PartialEq)]
pub enum StreamItem {
    /// An Anthropic SSE event (`event: …\ndata: …\n\n`), ready to relay.
    Event(Bytes),
    /// An exception frame, already turned into an SSE `error` event; the stream ends after it.
    /// `error_type` is AWS's name (`throttlingException`, …).
    Exception { error_type: String, sse: Bytes },
}

/// Turns a Claude event stream into Anthropic SSE: each `chunk` carries one Anthropic stream
/// event; an exception becomes an SSE `error` event (not a cut connection).
#[derive(Default)]
pub struct EventStreamToSse {
    frames: EventStreamDecoder,
}

impl EventStreamToSse {
    pub fn new() -> EventStreamToSse {
        EventStreamToSse::default()
    }

    /// Feeds response bytes; returns every complete frame's translation.
    pub fn push(&mut self, data: &[u8]) -> Vec<StreamItem> {
        self.frames
            .push(data)
            .into_iter()
            .map(|f| match f {
                Frame::Chunk(event) => {
                    let name = event
                        .get("type")
                        .and_then(Value::as_str)
                        .unwrap_or("message")
                        .to_string();
                    StreamItem::Event(Bytes::from(format!("event: {name}\ndata: {event}\n\n")))
                }
                Frame::Exception {
                    error_type,
                    message,
                } => StreamItem::Exception {
                    sse: sse_error(
                        anthropic_error_type(&error_type),
                        &format!("AWS Bedrock: {error_type}: {message}"),
                    ),
                    error_type,
                },
            })
            .collect()
    }

    /// True when bytes of an incomplete frame are left over (a cut stream).
    pub fn has_partial_frame(&self) -> bool {
        self.frames.has_partial_frame()
    }
}

fn header_str<'a>(msg: &'a Message, name: &str) -> Option<&'a str> {
    msg.headers()
        .iter()
        .find(|h| h.name().as_str() == name)
        .and_then(|h| match h.value() {
            EsHeaderValue::String(s) => Some(s.as_str()),
            _ => None,
        })
}

/// Reads one frame: a `chunk` event's JSON, or an exception.
fn read_frame(msg: &Message) -> Frame {
    let exception = |error_type: &str, message: &str| Frame::Exception {
        error_type: error_type.to_string(),
        message: message.to_string(),
    };
    let message_type = header_str(msg, ":message-type").unwrap_or("event");
    match message_type {
        "event" => {
            let event_type = header_str(msg, ":event-type").unwrap_or("");
            if event_type != "chunk" {
                return exception(
                    "unknownEvent",
                    &format!("unexpected AWS Bedrock event {event_type:?}"),
                );
            }
            match chunk_json(msg.payload()) {
                Some(event) => Frame::Chunk(event),
                None => exception(
                    "invalidChunk",
                    "an AWS Bedrock stream chunk was not base64 JSON",
                ),
            }
        }
        "exception" => {
            let error_type = header_str(msg, ":exception-type").unwrap_or("unknownException");
            let message = serde_json::from_slice::<Value>(msg.payload())
                .ok()
                .and_then(|v| {
                    v.get("message")
                        .or_else(|| v.get("Message"))
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .unwrap_or_else(|| String::from_utf8_lossy(msg.payload()).into_owned());
            exception(error_type, &message)
        }
        _ => {
            // `:message-type: error` carries `:error-code` and `:error-message` headers.
            let code = header_str(msg, ":error-code").unwrap_or("InternalError");
            let message = header_str(msg, ":error-message").unwrap_or("AWS Bedrock stream error");
            exception(code, message)
        }
    }
}

/// `{"bytes": "<base64 JSON>"}` → the JSON object.
fn chunk_json(payload: &[u8]) -> Option<Value> {
    let outer: Value = serde_json::from_slice(payload).ok()?;
    let b64 = outer.get("bytes")?.as_str()?;
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    let inner: Value = serde_json::from_slice(&raw).ok()?;
    inner.is_object().then_some(inner)
}

/// Encodes one `chunk` event frame as Bedrock sends it (for tests and fakes).
pub fn encode_chunk_frame(event: &Value) -> Vec<u8> {
    use aws_smithy_types::event_stream::Header;
    let b64 = base64::engine::general_purpose::STANDARD.encode(event.to_string());
    let payload = json!({"bytes": b64, "p": "abcdefghij"}).to_string();
    let msg = Message::new_from_parts(
        vec![
            Header::new(":event-type", EsHeaderValue::String("chunk".into())),
            Header::new(
                ":content-type",
                EsHeaderValue::String("application/json".into()),
            ),
            Header::new(":message-type", EsHeaderValue::String("event".into())),
        ],
        payload.into_bytes(),
    );
    let mut out = Vec::new();
    let _ = aws_smithy_eventstream::frame::write_message_to(&msg, &mut out);
    out
}

/// Encodes one exception frame as Bedrock sends it (for tests and fakes).
pub fn encode_exception_frame(exception_type: &str, message: &str) -> Vec<u8> {
    use aws_smithy_types::event_stream::Header;
    let msg = Message::new_from_parts(
        vec![
            Header::new(
                ":exception-type",
                EsHeaderValue::String(exception_type.to_string().into()),
            ),
            Header::new(
                ":content-type",
                EsHeaderValue::String("application/json".into()),
            ),
            Header::new(":message-type", EsHeaderValue::String("exception".into())),
        ],
        json!({ "message": message }).to_string().into_bytes(),
    );
    let mut out = Vec::new();
    let _ = aws_smithy_eventstream::frame::write_message_to(&msg, &mut out);
    out
}

/// Reads an error answer of the Bedrock runtime: the type from `x-amzn-ErrorType` (or the
/// body's `__type`) and the body's `message`.
pub fn error_from_response(error_type_header: Option<&str>, body: &[u8]) -> (String, String) {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let ty = error_type_header
        .map(str::to_string)
        .or_else(|| v.get("__type").and_then(Value::as_str).map(str::to_string))
        .map(|t| t.rsplit('#').next().unwrap_or(&t).to_string())
        .unwrap_or_else(|| "UnknownError".into());
    let ty = ty.split(':').next().unwrap_or("UnknownError").to_string();
    let message = v
        .get("message")
        .or_else(|| v.get("Message"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(300).collect());
    (ty, message)
}

// ---- The upstream: authorizing requests and decoding responses ----

/// The Bedrock upstream as the forwarder uses it: the credentials (in key-pool order) and
/// the base URL template (`AWS_BEDROCK_BASE_URL`).
pub struct Bedrock {
    base_template: String,
    creds: Vec<AwsCredential>,
}

/// Request body fields Bedrock's Mistral chat API accepts (it refuses unknown keys).
const MISTRAL_FIELDS: &[&str] = &[
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "tools",
    "tool_choice",
    "response_format",
];

impl Bedrock {
    pub fn new(base_template: &str, creds: Vec<AwsCredential>) -> Bedrock {
        Bedrock {
            base_template: base_template.to_string(),
            creds,
        }
    }

    /// The credential at `index` (the key checker signs its probes with it).
    pub fn credential(&self, index: usize) -> Option<&AwsCredential> {
        self.creds.get(index)
    }

    /// The non-streaming `InvokeModel` URL of `model_id` in the region of credential `index`.
    pub fn invoke_url_for(&self, index: usize, model_id: &str) -> Option<String> {
        let cred = self.creds.get(index)?;
        Some(invoke_url(
            &base_url(&self.base_template, &cred.region),
            model_id,
            false,
        ))
    }

    /// The credentials as key-pool entries (`accessKeyId:secretAccessKey:region`), in order.
    pub fn pool_entries(&self) -> Vec<Secret> {
        self.creds
            .iter()
            .map(|c| {
                Secret::new(format!(
                    "{}:{}:{}",
                    c.access_key_id,
                    c.secret_access_key(),
                    c.region
                ))
            })
            .collect()
    }

    /// Turns the forwarder's request (the client's body, model and `stream` inside) into
    /// Bedrock's: the URL from the model id and the credential's region, the body Bedrock
    /// wants, the headers it reads, and the SigV4 signature over all of it.
    pub fn authorize(
        &self,
        req: &mut UpstreamRequest,
        index: usize,
        mistral: bool,
    ) -> Result<(), AuthError> {
        let cred = self
            .creds
            .get(index)
            .ok_or_else(|| AuthError(format!("{VAR}: no credential at position {index}")))?;
        let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&req.body) else {
            return Err(AuthError("the request body is not a JSON object".into()));
        };
        let model = body.get("model").and_then(Value::as_str).unwrap_or("");
        let id = if mistral {
            mistral_model_id(model)
        } else {
            claude_model_id(model)
        }
        .map_err(AuthError)?;
        let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
        let beta = req
            .headers
            .get("anthropic-beta")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = if mistral {
            let mut body = body;
            // Bedrock's Mistral knows only `max_tokens`; a client's newer field must not be
            // dropped (it is the output cap quotas rely on).
            if let Some(cap) = body.remove("max_completion_tokens") {
                body.entry("max_tokens").or_insert(cap);
            }
            let kept: Map<String, Value> = body
                .into_iter()
                .filter(|(k, _)| MISTRAL_FIELDS.contains(&k.as_str()))
                .collect();
            serde_json::to_vec(&Value::Object(kept)).unwrap_or_default()
        } else {
            claude_body(body, beta.as_deref())
        };
        req.url = invoke_url(&base_url(&self.base_template, &cred.region), &id, stream);
        req.body = Bytes::from(bytes);
        let h = &mut req.headers;
        for name in ["anthropic-beta", "anthropic-version", "accept"] {
            h.remove(name);
        }
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        if stream {
            h.insert(
                http::HeaderName::from_static("x-amzn-bedrock-accept"),
                http::HeaderValue::from_static("application/json"),
            );
            h.insert(
                http::header::ACCEPT,
                http::HeaderValue::from_static("application/vnd.amazon.eventstream"),
            );
        } else {
            h.insert(
                http::header::ACCEPT,
                http::HeaderValue::from_static("application/json"),
            );
        }
        let mut signed = http::Request::builder()
            .method(req.method.clone())
            .uri(req.url.as_str())
            .body(())
            .map_err(|e| AuthError(format!("cannot build the Bedrock request: {e}")))?;
        // The signer reads and writes a `HeaderMap`: the fields go there and back.
        *signed.headers_mut() = std::mem::take(&mut req.headers).into_header_map();
        let result = sign_request(cred, &mut signed, &req.body, SystemTime::now());
        req.headers = Fields::from_map(std::mem::take(signed.headers_mut()));
        result.map_err(AuthError)
    }
}

/// The decoder of a Bedrock response for the forwarder: event streams become SSE (Anthropic
/// events for Claude, OpenAI chunks for Mistral), error answers become the client's error
/// shape, and Mistral's whole answers become OpenAI chat completions with their usage.
pub fn response_decoder(
    mistral: bool,
    status: http::StatusCode,
    headers: &Fields,
) -> Option<Box<dyn StreamTransform>> {
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !status.is_success() {
        let error_type = headers
            .get("x-amzn-errortype")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        return Some(Box::new(ErrorAnswer {
            buf: Vec::new(),
            error_type,
            openai: mistral,
        }));
    }
    let header_count = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let created = chrono::Utc::now().timestamp().max(0) as u64;
    let id = format!("chatcmpl-aws-{}", uuid::Uuid::new_v4().simple());
    match (
        content_type.starts_with("application/vnd.amazon.eventstream"),
        mistral,
    ) {
        (true, false) => Some(Box::new(ClaudeStream {
            inner: EventStreamToSse::new(),
            ended_with_error: false,
        })),
        (true, true) => Some(Box::new(MistralStream {
            frames: EventStreamDecoder::new(),
            id,
            created,
            done: false,
        })),
        (false, true) => Some(Box::new(MistralAnswer {
            buf: Vec::new(),
            id,
            created,
            usage: (
                header_count("x-amzn-bedrock-input-token-count"),
                header_count("x-amzn-bedrock-output-token-count"),
            ),
        })),
        (false, false) => None,
    }
}

/// Bedrock Claude event stream → Anthropic SSE.
struct ClaudeStream {
    inner: EventStreamToSse,
    ended_with_error: bool,
}

impl StreamTransform for ClaudeStream {
    fn chunk(&mut self, chunk: Bytes) -> Bytes {
        let mut out = BytesMut::new();
        for item in self.inner.push(&chunk) {
            match item {
                StreamItem::Event(b) => out.extend_from_slice(&b),
                StreamItem::Exception { error_type, sse } => {
                    tracing::warn!(error_type = %error_type, "AWS Bedrock stream exception");
                    self.ended_with_error = true;
                    out.extend_from_slice(&sse);
                }
            }
        }
        out.freeze()
    }

    fn end(&mut self) -> Bytes {
        if self.inner.has_partial_frame() && !self.ended_with_error {
            return sse_error(
                "api_error",
                "AWS Bedrock: the stream ended in the middle of an event",
            );
        }
        Bytes::new()
    }

    fn content_type(&self) -> Option<http::HeaderValue> {
        Some(http::HeaderValue::from_static("text/event-stream"))
    }
}

/// A Bedrock error answer (`{"message": …}` with `x-amzn-ErrorType`) in the client's shape:
/// Anthropic's error object, or OpenAI's for the Mistral route.
struct ErrorAnswer {
    buf: Vec<u8>,
    error_type: Option<String>,
    openai: bool,
}

impl StreamTransform for ErrorAnswer {
    fn chunk(&mut self, chunk: Bytes) -> Bytes {
        if self.buf.len() < 64 * 1024 {
            self.buf.extend_from_slice(&chunk);
        }
        Bytes::new()
    }

    fn end(&mut self) -> Bytes {
        let (ty, message) = error_from_response(self.error_type.as_deref(), &self.buf);
        let message = format!("AWS Bedrock: {ty}: {message}");
        let kind = anthropic_error_type(&ty);
        let body = if self.openai {
            json!({"error": {"message": message, "type": kind, "code": ty}})
        } else {
            json!({"type": "error", "error": {"type": kind, "message": message}})
        };
        Bytes::from(body.to_string())
    }

    fn content_type(&self) -> Option<http::HeaderValue> {
        Some(http::HeaderValue::from_static("application/json"))
    }
}

/// Mistral's `stop_reason` as an OpenAI `finish_reason`.
fn mistral_finish(reason: Option<&str>) -> Value {
    match reason {
        None => Value::Null,
        Some("length" | "model_length") => json!("length"),
        Some("tool_calls") => json!("tool_calls"),
        Some(_) => json!("stop"),
    }
}

/// A whole Bedrock Mistral answer → an OpenAI chat completion, with the usage Bedrock
/// reports in its `x-amzn-bedrock-*-token-count` headers.
struct MistralAnswer {
    buf: Vec<u8>,
    id: String,
    created: u64,
    usage: (Option<u64>, Option<u64>),
}

impl StreamTransform for MistralAnswer {
    fn chunk(&mut self, chunk: Bytes) -> Bytes {
        self.buf.extend_from_slice(&chunk);
        Bytes::new()
    }

    fn end(&mut self) -> Bytes {
        let v: Value = serde_json::from_slice(&self.buf).unwrap_or(Value::Null);
        let choices: Vec<Value> = v
            .get("choices")
            .and_then(Value::as_array)
            .map(|cs| {
                cs.iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let mut message = c.get("message").cloned().unwrap_or(json!({}));
                        if let Value::Object(m) = &mut message {
                            m.entry("role").or_insert(json!("assistant"));
                        }
                        json!({
                            "index": c.get("index").cloned().unwrap_or(json!(i)),
                            "message": message,
                            "finish_reason": mistral_finish(c.get("stop_reason").and_then(Value::as_str)),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut out = json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": "aws-mistral",
            "choices": choices,
        });
        if let (Some(p), Some(c)) = self.usage {
            out["usage"] =
                json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c});
        }
        Bytes::from(out.to_string())
    }

    fn content_type(&self) -> Option<http::HeaderValue> {
        Some(http::HeaderValue::from_static("application/json"))
    }
}

/// A Bedrock Mistral event stream → OpenAI `chat.completion.chunk` SSE; the usage of the
/// final chunk's `amazon-bedrock-invocationMetrics` goes into a last usage chunk.
struct MistralStream {
    frames: EventStreamDecoder,
    id: String,
    created: u64,
    done: bool,
}

impl MistralStream {
    fn sse(&self, choices: Value, usage: Option<Value>) -> String {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": "aws-mistral",
            "choices": choices,
        });
        if let Some(u) = usage {
            chunk["usage"] = u;
        }
        format!("data: {chunk}\n\n")
    }
}

impl StreamTransform for MistralStream {
    fn chunk(&mut self, chunk: Bytes) -> Bytes {
        let mut out = String::new();
        for frame in self.frames.push(&chunk) {
            if self.done {
                break;
            }
            match frame {
                Frame::Chunk(v) => {
                    let choices: Vec<Value> = v
                        .get("choices")
                        .and_then(Value::as_array)
                        .map(|cs| {
                            cs.iter()
                                .enumerate()
                                .map(|(i, c)| {
                                    let msg = c.get("message").or_else(|| c.get("delta"));
                                    let content = msg
                                        .and_then(|m| m.get("content"))
                                        .cloned()
                                        .unwrap_or(json!(""));
                                    json!({
                                        "index": c.get("index").cloned().unwrap_or(json!(i)),
                                        "delta": {"role": "assistant", "content": content},
                                        "finish_reason": mistral_finish(c.get("stop_reason").and_then(Value::as_str)),
                                    })
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    out.push_str(&self.sse(Value::Array(choices), None));
                    if let Some(m) = v.get("amazon-bedrock-invocationMetrics") {
                        let p = m.get("inputTokenCount").and_then(Value::as_u64);
                        let c = m.get("outputTokenCount").and_then(Value::as_u64);
                        if let (Some(p), Some(c)) = (p, c) {
                            let usage = json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c});
                            out.push_str(&self.sse(json!([]), Some(usage)));
                        }
                        out.push_str("data: [DONE]\n\n");
                        self.done = true;
                    }
                }
                Frame::Exception {
                    error_type,
                    message,
                } => {
                    let e = json!({"error": {"message": format!("AWS Bedrock: {error_type}: {message}"),
                        "type": anthropic_error_type(&error_type), "code": error_type}});
                    out.push_str(&format!("data: {e}\n\n"));
                    self.done = true;
                }
            }
        }
        Bytes::from(out)
    }

    fn content_type(&self) -> Option<http::HeaderValue> {
        Some(http::HeaderValue::from_static("text/event-stream"))
    }
}

/// The model list of `GET {PROXY_ENDPOINT_ROUTE}/aws/v1/models` (OpenAI's shape), the
/// original's list; `vendor` (`anthropic`, `mistral`) narrows it.
pub fn models(vendor: Option<&str>) -> Value {
    const IDS: &[&str] = &[
        "anthropic.claude-v2",
        "anthropic.claude-v2:1",
        "anthropic.claude-3-haiku-20240307-v1:0",
        "anthropic.claude-3-5-haiku-20241022-v1:0",
        "anthropic.claude-3-sonnet-20240229-v1:0",
        "anthropic.claude-3-5-sonnet-20240620-v1:0",
        "anthropic.claude-3-5-sonnet-20241022-v2:0",
        "anthropic.claude-3-7-sonnet-20250219-v1:0",
        "anthropic.claude-3-opus-20240229-v1:0",
        "anthropic.claude-sonnet-4-20250514-v1:0",
        "anthropic.claude-opus-4-20250514-v1:0",
        "mistral.mistral-7b-instruct-v0:2",
        "mistral.mixtral-8x7b-instruct-v0:1",
        "mistral.mistral-large-2402-v1:0",
        "mistral.mistral-large-2407-v1:0",
        "mistral.mistral-small-2402-v1:0",
    ];
    let data: Vec<Value> = IDS
        .iter()
        .filter_map(|id| {
            let owner = id.split('.').next().unwrap_or("");
            (vendor.is_none() || vendor == Some(owner)).then(|| {
                json!({"id": id, "object": "model", "created": 0, "owned_by": owner,
                    "permission": [], "root": owner, "parent": null})
            })
        })
        .collect();
    json!({"object": "list", "data": data})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_parse_dedupe_and_errors_name_the_entry_not_the_secret() {
        let creds = parse_credentials(
            " AKIA1:sec/ret+1:us-east-1 , AKIA2:s2:eu-west-3,,AKIA1:sec/ret+1:us-east-1",
        )
        .expect("valid");
        assert_eq!(creds.len(), 2);
        assert_eq!(creds[0].access_key_id, "AKIA1");
        assert_eq!(creds[0].secret_access_key(), "sec/ret+1");
        assert_eq!(creds[1].region, "eu-west-3");
        assert!(creds[0].fingerprint.starts_with("aws-"));
        assert!(!format!("{:?}", creds[0]).contains("sec/ret"));

        let e = parse_credentials("AKIA1:s1:us-east-1,AKIA2:topsecret").unwrap_err();
        assert!(
            e.contains("AWS_CREDENTIALS") && e.contains("entry 2 of 2"),
            "{e}"
        );
        assert!(!e.contains("topsecret"), "{e}");
        let e = parse_credentials("AKIA1::us-east-1").unwrap_err();
        assert!(e.contains("empty secretAccessKey"), "{e}");
        let e = parse_credentials("AKIA1:hush:US East").unwrap_err();
        assert!(e.contains("region") && !e.contains("hush"), "{e}");
        assert!(parse_credentials("  ").expect("empty").is_empty());
    }

    #[test]
    fn claude_names_map_to_bedrock_ids() {
        for (name, id) in [
            (
                "claude-3-5-sonnet-20240620",
                "anthropic.claude-3-5-sonnet-20240620-v1:0",
            ),
            (
                "claude-3-5-sonnet-20241022",
                "anthropic.claude-3-5-sonnet-20241022-v2:0",
            ),
            (
                "claude-3-5-sonnet-latest",
                "anthropic.claude-3-5-sonnet-20241022-v2:0",
            ),
            (
                "claude-3-haiku-20240307",
                "anthropic.claude-3-haiku-20240307-v1:0",
            ),
            (
                "claude-3-opus-20240229",
                "anthropic.claude-3-opus-20240229-v1:0",
            ),
            ("claude-2.1", "anthropic.claude-v2:1"),
            ("claude-instant-1.2", "anthropic.claude-instant-v1"),
            (
                "anthropic.claude-3-sonnet-20240229-v1:0",
                "anthropic.claude-3-sonnet-20240229-v1:0",
            ),
            (
                "us.anthropic.claude-3-5-sonnet-20241022-v2:0",
                "us.anthropic.claude-3-5-sonnet-20241022-v2:0",
            ),
            (
                "eu.anthropic.claude-3-7-sonnet-20250219-v1:0",
                "eu.anthropic.claude-3-7-sonnet-20250219-v1:0",
            ),
            (
                "apac.anthropic.claude-3-haiku-20240307-v1:0",
                "apac.anthropic.claude-3-haiku-20240307-v1:0",
            ),
        ] {
            assert_eq!(claude_model_id(name).as_deref(), Ok(id), "{name}");
        }
        let e = claude_model_id("gpt-4o").unwrap_err();
        assert!(e.contains("gpt-4o") && e.contains("anthropic."), "{e}");
    }

    #[test]
    fn mistral_names_map_to_bedrock_ids() {
        assert_eq!(
            mistral_model_id("open-mixtral-8x7b").as_deref(),
            Ok("mistral.mixtral-8x7b-instruct-v0:1")
        );
        assert_eq!(
            mistral_model_id("open-mistral-7b").as_deref(),
            Ok("mistral.mistral-7b-instruct-v0:2")
        );
        assert_eq!(
            mistral_model_id("mistral-large-latest").as_deref(),
            Ok("mistral.mistral-large-2407-v1:0")
        );
        assert_eq!(
            mistral_model_id("mistral-large-2402").as_deref(),
            Ok("mistral.mistral-large-2402-v1:0")
        );
        assert_eq!(
            mistral_model_id("mistral.mistral-small-2402-v1:0").as_deref(),
            Ok("mistral.mistral-small-2402-v1:0")
        );
        assert!(mistral_model_id("codestral").is_err());
    }

    #[test]
    fn families_are_the_originals() {
        assert_eq!(
            family("anthropic.claude-3-5-sonnet-20240620-v1:0"),
            "aws-claude"
        );
        assert_eq!(
            family("us.anthropic.claude-3-opus-20240229-v1:0"),
            "aws-claude-opus"
        );
        assert_eq!(
            family("mistral.mistral-large-2407-v1:0"),
            "aws-mistral-large"
        );
        assert_eq!(
            family("mistral.mixtral-8x7b-instruct-v0:1"),
            "aws-mistral-small"
        );
        assert_eq!(
            family("mistral.mistral-7b-instruct-v0:2"),
            "aws-mistral-small"
        );
    }

    #[test]
    fn urls_and_bodies() {
        let base = base_url(DEFAULT_BASE_URL, "us-west-2");
        assert_eq!(base, "https://bedrock-runtime.us-west-2.amazonaws.com");
        assert_eq!(
            invoke_url(&base, "anthropic.claude-v2:1", false),
            "https://bedrock-runtime.us-west-2.amazonaws.com/model/anthropic.claude-v2%3A1/invoke"
        );
        assert_eq!(
            invoke_url("http://127.0.0.1:9", "x", true),
            "http://127.0.0.1:9/model/x/invoke-with-response-stream"
        );
        let body = json!({"model":"claude-3-5-sonnet-20240620","stream":true,"max_tokens":5,
            "metadata":{"user_id":"u"},"messages":[{"role":"user","content":"hi"}]});
        let Value::Object(m) = body else {
            unreachable!()
        };
        let out: Value = serde_json::from_slice(&claude_body(m, Some("a-1, b-2"))).expect("json");
        assert_eq!(
            out,
            json!({"max_tokens":5,"messages":[{"role":"user","content":"hi"}],
                "anthropic_version":"bedrock-2023-05-31","anthropic_beta":["a-1","b-2"]})
        );
    }

    #[test]
    fn signing_matches_the_aws_test_suite_shape() {
        let cred = AwsCredential::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            "us-east-1",
        );
        let mut req = http::Request::builder()
            .method("POST")
            .uri("https://bedrock-runtime.us-east-1.amazonaws.com/model/anthropic.claude-v2%3A1/invoke")
            .header("content-type", "application/json")
            .body(())
            .expect("request");
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        sign_request(&cred, &mut req, b"{}", t).expect("signs");
        let auth = req.headers()["authorization"].to_str().expect("ascii");
        assert!(
            auth.starts_with(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20231114/us-east-1/bedrock/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature="
            ),
            "{auth}"
        );
        assert_eq!(req.headers()["x-amz-date"], "20231114T221320Z");
        assert!(!auth.contains("wJalr"));
    }

    #[test]
    fn event_stream_frames_become_anthropic_sse_in_any_split() {
        let start = json!({"type":"message_start","message":{"id":"m","usage":{"input_tokens":7,"output_tokens":1}}});
        let delta = json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}});
        let mut wire = encode_chunk_frame(&start);
        wire.extend(encode_chunk_frame(&delta));
        wire.extend(encode_exception_frame(
            "throttlingException",
            "Too many requests",
        ));
        // Byte by byte: frames come out exactly when complete.
        let mut dec = EventStreamToSse::new();
        let mut items = Vec::new();
        for b in &wire {
            items.extend(dec.push(std::slice::from_ref(b)));
        }
        assert!(!dec.has_partial_frame());
        assert_eq!(items.len(), 3);
        assert_eq!(
            items[0],
            StreamItem::Event(Bytes::from(format!(
                "event: message_start\ndata: {start}\n\n"
            )))
        );
        assert_eq!(
            items[1],
            StreamItem::Event(Bytes::from(format!(
                "event: content_block_delta\ndata: {delta}\n\n"
            )))
        );
        let StreamItem::Exception { error_type, sse } = &items[2] else {
            panic!("exception expected")
        };
        assert_eq!(error_type, "throttlingException");
        let text = std::str::from_utf8(sse).expect("utf8");
        assert!(text.starts_with("event: error\ndata: "), "{text}");
        assert!(text.contains("rate_limit_error") && text.contains("Too many requests"));
        assert_eq!(classify_error(error_type), ErrorKind::Throttled);

        // A corrupt frame (bad CRC) ends the stream with an error event.
        let mut bad = encode_chunk_frame(&start);
        let n = bad.len();
        bad[n - 1] ^= 0xff;
        let mut dec = EventStreamToSse::new();
        let items = dec.push(&bad);
        assert!(matches!(&items[..], [StreamItem::Exception { .. }]));
        assert!(dec.push(&encode_chunk_frame(&start)).is_empty());
    }

    #[test]
    fn errors_classify() {
        assert_eq!(
            classify_error("UnrecognizedClientException"),
            ErrorKind::BadCredential
        );
        assert_eq!(
            classify_error("InvalidSignatureException:http://internal.amazon.com/coral/"),
            ErrorKind::BadCredential
        );
        assert_eq!(classify_error("ThrottlingException"), ErrorKind::Throttled);
        assert_eq!(
            classify_error("AccessDeniedException"),
            ErrorKind::ModelDenied
        );
        assert_eq!(classify_error("ValidationException"), ErrorKind::Client);
        let (t, m) = error_from_response(
            Some("ValidationException:http://internal.amazon.com/coral/com.amazon.bedrock/"),
            br#"{"message":"max_tokens: field required"}"#,
        );
        assert_eq!(
            (t.as_str(), m.as_str()),
            ("ValidationException", "max_tokens: field required")
        );
    }
}
