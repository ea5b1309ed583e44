//! The forwarder: one proxied request, top to bottom, as named phases over a per-request
//! context (in the manner of Pingora):
//!
//! 0. [`check_origin`]: `BLOCKED_ORIGINS` refuses before the body is read.
//! 1. [`check_body`] (after [`read_streamed`] for a body still to come): the body within
//!    `MAX_REQUEST_BODY_MB` (413); other JSON routes are checked for valid JSON here (400).
//! 2. [`admit`]: for generation APIs, read the request facts through the provider — from the
//!    body's bytes where the provider has such a reader (OpenAI-format chat), else from its
//!    JSON tree ([`Tree`], built only when needed; a body that is not a JSON object is a 400),
//!    translated first when the route says so —, apply the operator's policy ([`apply_policy`]:
//!    families, images, tools, rejected phrases, output and context caps), ask
//!    [`crate::quota::Quotas::admit`] (it may refuse),
//!    and let the provider ask for stream usage; the body is re-serialised only when changed
//!    (otherwise the client's bytes go up untouched).
//! 3. [`upstream_headers`]: build the upstream request headers from an allowlist.
//! 4. [`send`]: pick a key, let the provider authorize the final request (header, signature
//!    or token) and send; 401/403 takes the key out, 429 rests it, and the request is retried
//!    on the next free key.
//! 5. [`relay`]: stream the upstream response back chunk by chunk — through the provider's
//!    stream decoder (if its stream is not SSE), the quota [`Ticket`] and its meter, and the
//!    route's translation back to the client's format; dropping the body (client gone) drops
//!    the upstream request too.
//!
//! Every failure becomes a [`ProxyError`] in [`fail_to_proxy`], the one place that decides how
//! upstream failures look to clients (502 unreachable, 504 timeout, ...).

use std::error::Error as StdError;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use tokio::time::Sleep;

use std::sync::Arc;

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::ProxyError;
use crate::http1::{Fields, Reply};
use crate::net::ClientIp;
use crate::providers::key_errors::{self, KeyVerdict};
use crate::providers::{
    Api, KeyUse, Meter, PathModel, Provider, StreamTransform, Translation, UpstreamRequest,
};
use crate::proxy::keys::{rest_duration, ChosenKey, NoKey};
use crate::proxy::pool::{Answer, PooledBody};
use crate::proxy::queue::{self, Enter, SseErrorFormat, Turn};
use crate::proxy::{AuthFailure, ProviderUpstream};
use crate::quota::{AdmitRequest, Ticket};

/// Client request headers forwarded to every upstream (each provider adds a few of its own,
/// [`Provider::forwarded_headers`]). Everything else is dropped: above all the client's
/// `authorization`, `x-api-key` and `cookie`, hop-by-hop headers, `host` and `content-length`
/// (recomputed by the client library), but also `accept-encoding` (so that usage accounting
/// can read the response) and `openai-organization`/`openai-project` (the operator's key
/// decides those).
const FORWARDED_HEADERS: &[HeaderName] = &[header::CONTENT_TYPE, header::ACCEPT];

/// Upstream response headers not relayed to the client: hop-by-hop headers, cookies and
/// transport hints that belong to the upstream's host, and headers that describe the
/// operator's account rather than the client's request.
const DROPPED_RESPONSE_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "set-cookie",
    "alt-svc",
    "strict-transport-security",
    "openai-organization",
    "openai-project",
    "anthropic-organization-id",
];
/// Prefixes of dropped response headers (the operator's key's rate-limit state).
const DROPPED_RESPONSE_PREFIXES: &[&str] = &["x-ratelimit-", "anthropic-ratelimit-"];

/// What a route tells the forwarder: where the request goes and in which format.
pub struct Route {
    /// The provider that serves the request.
    pub provider: Provider,
    /// The upstream API (its wire format; after translation, when the route translates).
    pub api: Api,
    /// The normalised upstream path (`/v1/...`); the client's path when `None`.
    pub upstream_path: Option<Arc<str>>,
    /// The client speaks another format than the upstream.
    pub translation: Option<Arc<dyn Translation>>,
}

impl Route {
    /// A route to `provider`'s `api` at `upstream_path`, in the client's own format.
    pub fn to(provider: Provider, api: Api, upstream_path: &str) -> Route {
        Route {
            provider,
            api,
            upstream_path: Some(Arc::from(upstream_path)),
            translation: None,
        }
    }
}

/// Everything the phases share about one request.
struct Ctx {
    provider: Provider,
    api: Api,
    translation: Option<Arc<dyn Translation>>,
    method: Method,
    /// The route template the client's path matched (`/v1/models/{id}`), for the log line: a
    /// raw path may carry anything a client puts in it, a token included, and is never logged.
    client_path: Arc<str>,
    /// The normalised upstream path (`/v1/...`).
    upstream_path: Arc<str>,
    query: Option<String>,
    headers: Fields,
    principal: Principal,
    ip: IpAddr,
    /// The model named by the path ([`PathModel`], Gemini), for the request facts.
    path_model: Option<String>,
}

/// Handles one proxied request of `api` to its usual provider. `upstream_path` is set by the
/// alias routes (normalised `/v1/...`); otherwise the client's path is used as is.
pub async fn proxy(
    state: AppState,
    api: Api,
    upstream_path: Option<Arc<str>>,
    req: Request,
) -> Response {
    let route = Route {
        provider: api.provider(),
        api,
        upstream_path,
        translation: None,
    };
    forward(state, route, req).await
}

/// Who is calling, as the gate decided ([`crate::auth::admit_proxied`]), and the route
/// template the client's path matched (for the log line).
pub struct Caller {
    pub principal: Principal,
    pub ip: IpAddr,
    pub client_path: Arc<str>,
}

/// Handles one proxied request along a [`Route`], as the router hands it on (the guard's
/// findings in its extensions).
pub async fn forward(state: AppState, route: Route, req: Request) -> Response {
    let (mut parts, body) = req.into_parts();
    // Taken out rather than cloned: nothing after the forwarder reads it (one allocation less).
    let Some(principal) = parts.extensions.remove::<Principal>() else {
        // The gatekeeper inserts a principal on every proxied route; without one, deny.
        return ProxyError::unauthorized("No credential was checked for this request.")
            .into_response();
    };
    let ip = parts
        .extensions
        .get::<ClientIp>()
        .map(|c| c.0)
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let client_path = parts
        .extensions
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| Arc::from("-"), |m| Arc::from(m.as_str()));
    let path_model = parts.extensions.get::<PathModel>().map(|m| m.0.clone());
    let caller = Caller {
        principal,
        ip,
        client_path,
    };
    let head = ClientHead {
        headers: Fields::from_map(std::mem::take(&mut parts.headers)),
        method: parts.method,
        uri: parts.uri,
    };
    forward_parts(
        state,
        route,
        caller,
        head,
        path_model,
        ClientBody::Streamed(body),
    )
    .await
    .into_response()
}

/// A client's request body as the forwarder gets it: already whole (the server had it with the
/// request's head, the usual case on the straight path), or to be read.
pub enum ClientBody {
    Whole(Bytes),
    Streamed(Body),
}

/// What the forwarder reads of a client's request head.
pub struct ClientHead {
    pub method: Method,
    pub uri: Uri,
    pub headers: Fields,
}

/// Handles one proxied request along a [`Route`] from its parts: the forwarder proper, called
/// by [`forward`] and by the proxied routes' straight path (`app::Front`).
pub async fn forward_parts(
    state: AppState,
    route: Route,
    caller: Caller,
    parts: ClientHead,
    path_model: Option<String>,
    body: ClientBody,
) -> Reply {
    let Route {
        provider,
        api,
        upstream_path,
        translation,
    } = route;
    let Caller {
        principal,
        ip,
        client_path,
    } = caller;
    let ctx = Ctx {
        provider,
        api,
        translation,
        upstream_path: upstream_path.unwrap_or_else(|| Arc::from(parts.uri.path())),
        client_path,
        query: parts.uri.query().map(str::to_string),
        method: parts.method,
        headers: parts.headers,
        principal,
        ip,
        path_model,
    };
    let upstream = state.upstreams.provider(provider);

    // Phase 0: a blocked Origin/Referer is refused before the body is read.
    if let Some(resp) = check_origin(&state, &ctx) {
        return resp.into();
    }
    // Phase 1: the body within the size limit, JSON routes validated. A body that came whole
    // with the request's head is checked without waiting; one still to come is read first,
    // boxed, so that the straight path's future carries no reader state (issue 18).
    let limit = state.config.max_request_body_bytes();
    let read = match body {
        ClientBody::Whole(bytes) => check_body(&ctx, bytes, limit),
        ClientBody::Streamed(body) => Box::pin(read_streamed(&ctx, body, limit)).await,
    };
    let body = match read {
        Ok(b) => b,
        Err(e) => return log_refusal(&ctx, e),
    };
    // A request that cannot possibly be served must not be admitted (and charged).
    if upstream.keys.is_empty() {
        return log_refusal(&ctx, no_key_error(upstream, NoKey::NoneConfigured));
    }
    // Phase 2: admission.
    // Built where it is decided: each move of its ticket is a copy of some 300 bytes.
    let req = match admit(&state, &ctx, body).await {
        Ok(v) => v,
        Err(e) => return log_refusal(&ctx, e),
    };
    // Phase 2b: the fair queue (queue.rs): the caller's slot, and a place in the family's queue
    // while every key rests; free capacity goes straight on. A waiting stream gets its head
    // and heartbeats now, and the rest of the request runs inside its body.
    let queue = &state.upstreams.queue;
    let turn = match queue.enter(
        &ctx.principal,
        ctx.ip,
        &upstream.keys,
        req.family,
        req.eligible.as_deref(),
    ) {
        Enter::Go(turn) => turn.stream_head_pending(req.stream),
        Enter::Wait(wait) => {
            let (settings, position) = (queue.settings(), wait.position());
            let format = sse_error_format(&ctx);
            let stream = req.stream;
            let run = async move {
                let mut req = req;
                let unsent = queue::Unsent(req.ticket.take());
                let keys = &state.upstreams.provider(ctx.provider).keys;
                match wait.turn(keys).await {
                    Ok(turn) => {
                        req.ticket = unsent.take();
                        dispatch(state, ctx, req, turn).await
                    }
                    Err(e) => log_refusal(&ctx, e.into_error(settings, keys.var())),
                }
            };
            return if stream {
                queue::waiting_stream(run, format, settings.heartbeat, position)
            } else {
                // Boxed: a wait is rare, and its future (a whole dispatch) would enlarge every request's.
                Box::pin(run).await
            };
        }
    };
    dispatch(state, ctx, req, turn).await
}

/// What admission hands on to [`dispatch`]: the body to send and what the request was
/// admitted with.
struct Admitted {
    body: Bytes,
    /// The quota ticket; held as [`queue::Unsent`] while the request waits for its turn.
    ticket: Option<Ticket>,
    /// The quota's response headers.
    extra_headers: HeaderMap,
    stream: bool,
    /// The keys that may serve the request's model (`None`: all).
    eligible: Option<Vec<usize>>,
    family: Option<&'static str>,
}

/// [`dispatch`] boxed, for the second attempt of a stream that had to wait after its first
/// (the only place it calls itself).
fn dispatch_boxed(
    state: AppState,
    ctx: Ctx,
    req: Admitted,
    turn: Turn,
) -> Pin<Box<dyn Future<Output = Reply> + Send>> {
    Box::pin(dispatch(state, ctx, req, turn))
}

/// The error event format of the client's stream, for a stream that waits in the queue.
fn sse_error_format(ctx: &Ctx) -> SseErrorFormat {
    match (&ctx.translation, ctx.api) {
        (None, Api::AnthropicMessages) => SseErrorFormat::Anthropic,
        _ => SseErrorFormat::Data,
    }
}

/// Phases 3 to 5 of a request that has its turn: build the upstream request, send it, relay.
async fn dispatch(state: AppState, ctx: Ctx, req: Admitted, mut turn: Turn) -> Reply {
    let (provider, api) = (ctx.provider, ctx.api);
    let upstream = state.upstreams.provider(provider);
    // Phases 3 and 4: build the upstream request and send it.
    let headers = upstream_headers(&ctx);
    let started = crate::timer::now();
    let deadline = tokio::time::Instant::from_std(started) + state.upstreams.timeout;
    let sent = send(
        &state,
        upstream,
        &ctx,
        headers,
        req.body.clone(),
        deadline,
        req.eligible.as_deref(),
        req.family,
        &mut turn,
    )
    .await;
    // A stream whose own 429 rested the last key: its head and heartbeats now, and the wait for
    // a key and the next attempt inside its body (queue.rs).
    let status = sent
        .as_ref()
        .map_or_else(|f| f.error.status, |r| r.0.status);
    if turn.requeue_stream(status, &upstream.keys, req.family, req.eligible.as_deref()) {
        drop(sent);
        let (settings, position) = (state.upstreams.queue.settings(), 1);
        let format = sse_error_format(&ctx);
        let run = async move {
            let mut req = req;
            let unsent = queue::Unsent(req.ticket.take());
            let keys = &state.upstreams.provider(ctx.provider).keys;
            match turn
                .wait_for_key(keys, req.family, req.eligible.as_deref())
                .await
            {
                Ok(()) => {
                    req.ticket = unsent.take();
                    dispatch_boxed(state, ctx, req, turn).await
                }
                Err(e) => log_refusal(&ctx, e),
            }
        };
        return queue::waiting_stream(run, format, settings.heartbeat, position);
    }
    let Admitted {
        mut ticket,
        extra_headers,
        stream,
        family,
        ..
    } = req;
    match sent {
        Ok((resp, key)) => {
            let latency = crate::timer::now().saturating_duration_since(started);
            log_proxied(&ctx, resp.status, latency, &key.fingerprint);
            // Phase 5: relay.
            let transforms = Transforms {
                decode: provider.stream_decoder(api, resp.status, &resp.headers),
                translate: match &ctx.translation {
                    Some(t) if resp.status.is_success() => Some(t.response(stream)),
                    _ => None,
                },
            };
            let resp = relay(resp, ticket, extra_headers, deadline, transforms, turn);
            crate::metrics::proxied(resp, provider, family, started)
        }
        Err(Failure {
            error: e,
            key,
            cause,
        }) => {
            tracing::warn!(
                method = %ctx.method,
                path = %ctx.client_path,
                status = e.status.as_u16(),
                upstream_ms = crate::timer::now()
                    .saturating_duration_since(started)
                    .as_millis() as u64,
                key = key.as_deref().unwrap_or("-"),
                error = %e.message,
                cause = cause.as_deref().map(|c| c as &dyn StdError),
                "proxy failed"
            );
            // The ticket learns that the request ended with our own error, so that quota
            // accounting can release the reservation instead of charging an estimate.
            if let Some(mut t) = ticket.take() {
                t.on_response_start(e.status, false);
                t.finish();
            }
            crate::metrics::count_request(provider, family, e.status);
            let mut resp = Reply::from(e.into_response());
            extend_headers(&mut resp.headers, extra_headers);
            resp
        }
    }
}

/// The upstream URL as a [`Uri`]. The same few URLs come back request after request (one per
/// route and upstream), and parsing one costs about 1 000 instructions (callgrind), a copy of
/// the last one this thread parsed shares its parts instead.
fn upstream_uri(url: String) -> Result<Uri, axum::http::uri::InvalidUri> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(String, Uri)>> = const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let Ok(mut last) = last.try_borrow_mut() else {
            return Uri::try_from(url);
        };
        if let Some((u, uri)) = last.as_ref() {
            if *u == url {
                return Ok(uri.clone());
            }
        }
        let uri = Uri::try_from(url.as_str())?;
        *last = Some((url, uri.clone()));
        Ok(uri)
    })
}

/// The access line of a request the upstream answered: straight into the worker's batch
/// ([`crate::logging::info_line`]), or through `tracing` with the same fields where that cannot.
fn log_proxied(ctx: &Ctx, status: StatusCode, latency: std::time::Duration, key: &str) {
    use crate::logging::Field;
    if !tracing::enabled!(tracing::Level::INFO) {
        return;
    }
    let upstream_ms = latency.as_millis() as u64;
    let fields = [
        ("method", Field::Text(ctx.method.as_str())),
        ("path", Field::Text(&ctx.client_path)),
        ("status", Field::Number(status.as_u16().into())),
        ("upstream_ms", Field::Number(upstream_ms)),
        ("key", Field::Text(key)),
    ];
    if !crate::logging::info_line(module_path!(), "proxied", &fields) {
        tracing::info!(
            method = %ctx.method,
            path = %ctx.client_path,
            status = status.as_u16(),
            upstream_ms,
            key = %key,
            "proxied"
        );
    }
}

/// Logs a request refused before anything was sent upstream, and answers it.
fn log_refusal(ctx: &Ctx, e: ProxyError) -> Reply {
    crate::metrics::refused_with(&e);
    tracing::info!(
        method = %ctx.method,
        path = %ctx.client_path,
        status = e.status.as_u16(),
        error = %e.message,
        "refused"
    );
    e.into_response().into()
}

/// The body as read.
struct Incoming {
    bytes: Bytes,
    /// A generation request (what admission looks at); its JSON is checked there.
    generation: bool,
}

/// Why a request body could not be read.
#[derive(Debug, PartialEq)]
enum BodyError {
    TooLarge,
    Broken,
}

/// The whole body, at most `limit` bytes. A small request usually arrives in one frame, which
/// is taken as it is; the general collector (a list of frames, then one copy) cost about
/// 1 800 instructions per request for that case (callgrind).
async fn read_body(mut body: Body, limit: usize) -> Result<Bytes, BodyError> {
    let first = match body.frame().await {
        None => return Ok(Bytes::new()),
        Some(Err(_)) => return Err(BodyError::Broken),
        // Trailers first: nothing to keep, the rest as usual.
        Some(Ok(frame)) => frame.into_data().unwrap_or_default(),
    };
    if first.len() > limit {
        return Err(BodyError::TooLarge);
    }
    if http_body::Body::is_end_stream(&body) {
        return Ok(first);
    }
    let rest = match Limited::new(body, limit - first.len()).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(BodyError::TooLarge)
        }
        Err(_) => return Err(BodyError::Broken),
    };
    if first.is_empty() {
        return Ok(rest);
    }
    if rest.is_empty() {
        return Ok(first);
    }
    let mut whole = bytes::BytesMut::with_capacity(first.len() + rest.len());
    whole.extend_from_slice(&first);
    whole.extend_from_slice(&rest);
    Ok(whole.freeze())
}

/// The refusal of a body above `MAX_REQUEST_BODY_MB`.
fn too_large(limit: usize) -> ProxyError {
    ProxyError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        format!(
            "The request body is larger than this proxy accepts ({} MB, set by MAX_REQUEST_BODY_MB); send a smaller request.",
            limit / (1024 * 1024)
        ),
    )
}

/// Phase 1 for a body still to come: refused by its declared size before it is read,
/// then read within the limit.
async fn read_streamed(ctx: &Ctx, body: Body, limit: usize) -> Result<Incoming, ProxyError> {
    if ctx.method == Method::GET || ctx.method == Method::HEAD {
        return check_body(ctx, Bytes::new(), limit);
    }
    let declared = ctx
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    match read_body(body, limit).await {
        Ok(bytes) => check_body(ctx, bytes, limit),
        Err(BodyError::TooLarge) => Err(too_large(limit)),
        Err(BodyError::Broken) => Err(ProxyError::bad_request(
            "The request body could not be read completely; send it again.",
        )),
    }
}

/// Phase 1 for a body in hand: its size, and JSON for the routes that are not
/// generations (a generation's JSON is checked in [`admit`], by the first reader of the body).
fn check_body(ctx: &Ctx, bytes: Bytes, limit: usize) -> Result<Incoming, ProxyError> {
    if ctx.method == Method::GET || ctx.method == Method::HEAD {
        return Ok(Incoming {
            bytes: Bytes::new(),
            generation: false,
        });
    }
    if bytes.len() > limit {
        return Err(too_large(limit));
    }
    if ctx.api.is_generation() {
        Ok(Incoming {
            bytes,
            generation: true,
        })
    } else {
        // Other JSON routes (count_tokens) are validated without building a tree.
        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
            .map_err(|e| not_json(e.to_string()))?;
        Ok(Incoming {
            bytes,
            generation: false,
        })
    }
}

/// The refusal of a body that is not a JSON object.
fn not_json(detail: String) -> ProxyError {
    ProxyError::bad_request(format!(
        "The request body must be a JSON object ({detail}); check the Content-Type and the JSON you send."
    ))
}

/// A generation request's body as a JSON tree, built on first use: admission reads most
/// bodies from their bytes (`Provider::request_facts_from_bytes`), and only a translation, a
/// provider without such a reader, or a change to the body needs the tree.
struct Tree<'b> {
    bytes: &'b Bytes,
    value: Option<serde_json::Value>,
}

impl Tree<'_> {
    /// Parses the body as a JSON object (a 400 otherwise).
    fn parse(bytes: &[u8]) -> Result<serde_json::Value, ProxyError> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| not_json(e.to_string()))?;
        if !value.is_object() {
            return Err(not_json("got another JSON value".into()));
        }
        Ok(value)
    }

    fn get(&mut self) -> Result<&mut serde_json::Value, ProxyError> {
        let value = match self.value.take() {
            Some(v) => v,
            None => Tree::parse(self.bytes)?,
        };
        Ok(self.value.insert(value))
    }
}

/// Phase 2: admission for generation requests; what it hands on is the bytes to send (the
/// client's original bytes unless the body was changed), the quota's ticket and headers,
/// whether the client asked for a stream, the keys that may serve the model, and its family.
async fn admit(state: &AppState, ctx: &Ctx, incoming: Incoming) -> Result<Admitted, ProxyError> {
    let Incoming { bytes, generation } = incoming;
    let upstream = state.upstreams.provider(ctx.provider);
    if !generation {
        return Ok(Admitted {
            body: bytes,
            ticket: None,
            extra_headers: HeaderMap::new(),
            stream: false,
            eligible: upstream.eligible_keys(None),
            family: None,
        });
    }
    let mut changed = false;
    let mut tree = Tree {
        bytes: &bytes,
        value: None,
    };
    let from_bytes = match &ctx.translation {
        None => ctx.provider.request_facts_from_bytes(ctx.api, &bytes),
        Some(_) => None,
    };
    let mut facts = match from_bytes {
        Some(facts) => facts.map_err(|e| ProxyError::bad_request(e.0))?,
        None => {
            let json = tree.get()?;
            if let Some(t) = &ctx.translation {
                *json = t
                    .request(std::mem::take(json))
                    .map_err(|e| ProxyError::bad_request(e.0))?;
                changed = true;
            }
            ctx.provider
                .request_facts(ctx.api, json)
                .map_err(|e| ProxyError::bad_request(e.0))?
        }
    };
    // The model of an upstream that takes it in the path (Gemini) is not in the body.
    let path_model = ctx
        .path_model
        .clone()
        .or_else(|| ctx.translation.as_ref().and_then(|t| t.model()));
    if let Some(model) = path_model {
        facts.family = ctx.provider.family(&model);
        facts.model = model;
    }
    // Phase 2a: the operator's policy, before quotas (which take the prompt text).
    changed |= apply_policy(state, ctx, &mut tree, &mut facts).await?;
    let mut admitted = state
        .quotas
        .admit(
            &AdmitRequest {
                principal: &ctx.principal,
                ip: ctx.ip,
                generation: ctx.api.is_generation(),
            },
            Some(&mut facts),
        )
        .await?;
    if let Some(cap) = admitted.output_cap {
        // The user has less left than the request could produce: the provider's own output
        // cap field says so, and the upstream stops there.
        ctx.provider.set_output_cap(ctx.api, tree.get()?, cap);
        changed = true;
    }
    if admitted.ticket.charges() {
        // Streams that report usage only on request are asked to; the usage-only event is
        // then hidden from the client, who did not ask for it.
        let hide = ctx.provider.asks_stream_usage(ctx.api, &facts)
            && ctx.provider.ask_stream_usage(ctx.api, tree.get()?, &facts);
        changed |= hide;
        admitted
            .ticket
            .observe_with(Meter::new(ctx.provider, ctx.api, hide));
    }
    let changed_tree = tree.value.take().filter(|_| changed);
    let bytes = if let Some(json) = changed_tree {
        serde_json::to_vec(&json).map(Bytes::from).map_err(|_| {
            ProxyError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "The proxy could not prepare the request body.",
            )
        })?
    } else {
        bytes
    };
    Ok(Admitted {
        body: bytes,
        eligible: upstream.eligible_keys(Some(&facts.model)),
        ticket: Some(admitted.ticket),
        extra_headers: admitted.headers,
        stream: facts.stream,
        family: Some(facts.family),
    })
}

/// Phase 0: `BLOCKED_ORIGINS`. A browser (it accepts HTML and sends no JSON) gets a page that
/// redirects to `BLOCK_REDIRECT`; an API client gets the JSON error, as the original.
fn check_origin(state: &AppState, ctx: &Ctx) -> Option<Response> {
    if state.policy.origins.is_empty() {
        // Nothing blocked: the headers need not be looked up.
        return None;
    }
    let h = |name| ctx.headers.get(name).and_then(|v| v.to_str().ok());
    let block = state
        .policy
        .origins
        .check(h(header::ORIGIN), h(header::REFERER))?;
    tracing::info!(
        method = %ctx.method,
        path = %ctx.client_path,
        origin = h(header::ORIGIN).unwrap_or("-"),
        referer = h(header::REFERER).unwrap_or("-"),
        "refused: blocked origin"
    );
    crate::metrics::refused(crate::metrics::Reason::Policy);
    let json_body = h(header::CONTENT_TYPE).is_some_and(|v| v.contains("application/json"));
    let wants_html = h(header::ACCEPT).is_some_and(|v| v.contains("text/html"));
    if wants_html && !json_body {
        return Some(crate::web::templates::blocked_page(
            StatusCode::FORBIDDEN,
            block.message,
            block.redirect,
        ));
    }
    Some(ProxyError::new(StatusCode::FORBIDDEN, "blocked_origin", block.message).into_response())
}

/// Phase 2a: the operator's policy over a generation request (families, images, tools,
/// rejected phrases, output and context caps), over the facts the provider read. Returns
/// whether the body changed (the output cap was set on the provider's field).
async fn apply_policy(
    state: &AppState,
    ctx: &Ctx,
    tree: &mut Tree<'_>,
    facts: &mut crate::providers::RequestFacts,
) -> Result<bool, ProxyError> {
    use crate::policy::{Caller, Refusal, RequestFacts as PolicyFacts};

    let policy = &state.policy;
    let service = ctx.provider.service_name();
    let refuse = |r: Refusal| match r {
        Refusal::Forbidden { kind, message } => {
            ProxyError::new(StatusCode::FORBIDDEN, kind, message)
        }
        Refusal::BadRequest { kind, message } => {
            ProxyError::new(StatusCode::BAD_REQUEST, kind, message)
        }
    };
    let special = matches!(ctx.principal, Principal::Admin)
        || matches!(
            ctx.principal,
            Principal::User {
                kind: crate::users::UserType::Special,
                ..
            }
        );
    let req = PolicyFacts {
        service,
        model: &facts.model,
        family: facts.family,
        has_images: facts.has_images,
        has_tools: facts.has_tools,
        openai_tools_api: matches!(ctx.api, Api::OpenAiChat),
    };
    let shape = match &ctx.principal {
        Principal::User { token, key, .. } => state
            .quotas
            .with_allowed_families(token, *key, |own| {
                policy.check_request(
                    &req,
                    Caller {
                        special,
                        allowed_families: own,
                    },
                )
            })
            .unwrap_or(Ok(())),
        _ => policy.check_request(
            &req,
            Caller {
                special,
                allowed_families: None,
            },
        ),
    };
    shape.map_err(refuse)?;

    if let Some(phrase) = policy.phrases.find(&facts.prompt_text) {
        let delay = policy.rejections.record(ctx.ip, std::time::Instant::now());
        tracing::warn!(
            phrase,
            delay_ms = delay.as_millis() as u64,
            "prompt contains a rejected phrase"
        );
        // Held, bounded: repeated rejections from one address are slowed down.
        tokio::time::sleep(delay).await;
        return Err(ProxyError::bad_request(policy.phrases.message.clone()));
    }

    let mut changed = false;
    if let (Some(cap), true) = (policy.output_cap(service), facts.capped_output) {
        // Lowered when above the cap, set when absent (leaving it out must not escape it).
        if facts.max_output.is_none_or(|n| n > cap) {
            ctx.provider.set_output_cap(ctx.api, tree.get()?, cap);
            facts.max_output = Some(cap);
            changed = true;
        }
    }
    if !ctx.api.has_output() {
        return Ok(changed);
    }
    let caller = Caller {
        special,
        allowed_families: None,
    };
    if let Some(max) = policy.context_cap(service, caller) {
        // The byte length bounds the token count from above: only a prompt that might not
        // fit is tokenized.
        let output = facts.max_completion();
        if facts.prompt_bound().saturating_add(output) > max {
            let prompt = crate::quota::estimate::count_tokens_async(facts.prompt_text.clone())
                .await
                .saturating_add(facts.prompt_fixed);
            policy
                .check_context(service, caller, prompt, output)
                .map_err(refuse)?;
        }
    }
    Ok(changed)
}

/// Phase 3: the upstream request headers, from an allowlist of the client's headers. The
/// credential is added per attempt in [`send`].
fn upstream_headers(ctx: &Ctx) -> Fields {
    let mut out = Fields::with_capacity(6);
    let provider_headers = ctx.provider.forwarded_headers();
    // One pass over the client's few headers, comparing names (a standard name compares as
    // one byte), instead of a hashed lookup per allowed name (issue 18).
    let mut has_type = false;
    for (name, v) in &ctx.headers {
        if FORWARDED_HEADERS.contains(name) || provider_headers.contains(name) {
            has_type |= name == header::CONTENT_TYPE;
            out.append(name.clone(), v.to_value());
        }
    }
    if ctx.method == Method::POST && !has_type {
        // The body was validated as JSON; say so even when the client did not.
        out.append(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    ctx.provider.default_headers(&mut out);
    out
}

/// Phase 4: picks a key of the request's family and sends; on 401/403 (or an answer that says
/// revoked) the key is taken out, on an answer that says its quota is spent it leaves rotation
/// until a recheck, on 429 it rests, and the request goes again on the next usable key. When
/// no key is left after a 429, that 429 is relayed as the upstream sent it.
#[allow(clippy::too_many_arguments)]
async fn send(
    state: &AppState,
    upstream: &ProviderUpstream,
    ctx: &Ctx,
    mut headers: Fields,
    body: Bytes,
    deadline: tokio::time::Instant,
    eligible: Option<&[usize]>,
    family: Option<&str>,
    turn: &mut Turn,
) -> Result<(Answer<UpstreamBody>, ChosenKey), Failure> {
    let bad_url = |e: axum::http::uri::InvalidUri| Failure {
        error: ProxyError::bad_request(
            "The request path or query cannot be sent upstream; check the URL you call.",
        ),
        key: None,
        cause: Some(Box::new(e)),
    };
    headers.insert(header::USER_AGENT, state.upstreams.user_agent.clone());
    // The first attempt takes these headers; a retry builds them again (the same way) rather
    // than every attempt paying for a copy.
    let mut first_headers = Some(headers);
    // A translation may choose the upstream path (and query) from the client's request.
    let translated_path = ctx.translation.as_ref().and_then(|t| t.upstream_path());
    let (path, query) = match &translated_path {
        Some(p) => (p.as_str(), None),
        None => (&*ctx.upstream_path, ctx.query.as_deref()),
    };
    // Boxed, as the answer kept below: they are rare, and held inline they would enlarge the
    // future of every request (a future's moves copy its whole size; issue 18).
    let mut last_429: Option<Box<(Answer<UpstreamBody>, ChosenKey)>> = None;
    // Cloud credentials that cannot serve this request's model (Bedrock's
    // AccessDeniedException), and the last such answer, relayed when no other key can.
    let mut skip: Vec<usize> = Vec::new();
    let mut last_denied: Option<Box<(Answer<UpstreamBody>, ChosenKey)>> = None;
    // Keys whose cached access token Vertex refused once (renewed, then tried again).
    let mut renewed: Vec<usize> = Vec::new();
    loop {
        let picked = match eligible {
            Some(set) => upstream
                .keys
                .pick_where(family, |i| set.contains(&i) && !skip.contains(&i)),
            None => upstream.keys.pick_except(family, &skip),
        };
        let key = match picked {
            Ok(k) => k,
            // Every key rests (a 429 just rested the last one): wait in the family's queue.
            Err(NoKey::AllResting(_)) if turn.may_wait(family) => {
                // Boxed: waiting is rare, and its future would enlarge every request's.
                match Box::pin(turn.wait_for_key(&upstream.keys, family, eligible)).await {
                    Ok(()) => continue,
                    Err(error) => {
                        return Err(Failure {
                            error,
                            key: None,
                            cause: None,
                        })
                    }
                }
            }
            Err(no) => {
                return match last_429.or(last_denied) {
                    Some(r) => Ok(*r),
                    None => Err(Failure {
                        error: no_key_error(upstream, no),
                        key: None,
                        cause: None,
                    }),
                }
            }
        };
        let url = upstream.url(path, query, key.index);
        let mut out = UpstreamRequest {
            method: ctx.method.clone(),
            url,
            headers: first_headers.take().unwrap_or_else(|| {
                let mut h = upstream_headers(ctx);
                h.insert(header::USER_AGENT, state.upstreams.user_agent.clone());
                h
            }),
            body: body.clone(),
        };
        let key_use = KeyUse {
            index: key.index,
            credential: &key.header,
        };
        if let Err(e) = upstream.authorize(&mut out, &key_use).await {
            let e = match e {
                AuthFailure::BadKey(m) => {
                    tracing::error!(key = %key.fingerprint, error = %m, "credential refused");
                    upstream.keys.mark_invalid(key.index, 401);
                    continue;
                }
                AuthFailure::Other(m) => m,
            };
            return Err(Failure {
                error: ProxyError::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream_error",
                    "The proxy could not obtain credentials for the upstream; try again later.",
                ),
                key: Some(key.fingerprint),
                cause: Some(e.into()),
            });
        }
        let uri = upstream_uri(out.url).map_err(bad_url)?;
        let req = crate::proxy::pool::Outgoing {
            method: out.method,
            uri,
            headers: out.headers,
            body: out.body,
        };
        // A coarse deadline (`timer`): tokio's timer cost about a thousand instructions for a
        // timeout that almost never fires.
        let sent =
            crate::timer::timeout_at(deadline.into_std(), state.upstreams.pool().send(req)).await;
        let resp = match sent {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                let kind = if e.is_connect() {
                    if e.is_connect_timeout() {
                        SendError::ConnectTimeout
                    } else {
                        SendError::Connect
                    }
                } else {
                    SendError::Other
                };
                return Err(Failure {
                    error: fail_to_proxy(state, upstream, kind),
                    key: Some(key.fingerprint),
                    cause: Some(Box::new(e)),
                });
            }
            Err(_elapsed) => {
                return Err(Failure {
                    error: fail_to_proxy(state, upstream, SendError::Timeout),
                    key: Some(key.fingerprint),
                    cause: None,
                })
            }
        };
        turn.answered(resp.status);
        let status = resp.status.as_u16();
        // Only Bedrock names its errors in a header (a lookup by text parses the name).
        let aws_error = matches!(ctx.provider, Provider::Aws | Provider::AwsMistral)
            .then(|| resp.headers.get("x-amzn-errortype"))
            .flatten()
            .and_then(|v| v.to_str().ok())
            .map(crate::providers::aws::classify_error);
        if status == 403 && aws_error == Some(crate::providers::aws::ErrorKind::ModelDenied) {
            // This credential lacks the model; another may have it.
            tracing::warn!(key = %key.fingerprint, "AWS Bedrock: this credential has no access to the model; trying another");
            skip.push(key.index);
            last_denied = Some(Box::new((resp.map_body(UpstreamBody::Live), key)));
            continue;
        }
        if status == 401 && !renewed.contains(&key.index) && upstream.forget_token(key.index).await
        {
            // An access token expired or revoked early: fetch a new one and try again.
            renewed.push(key.index);
            continue;
        }
        if status == 401 || status == 403 {
            upstream.keys.mark_invalid(key.index, status);
            continue;
        }
        if (200..300).contains(&status) {
            upstream.keys.note_success(key.index);
        }
        if !key_errors::body_matters(ctx.provider, status) {
            return Ok((resp.map_body(UpstreamBody::Live), key));
        }
        // An error answer whose body tells whether the key is spent: read it (bounded, it is
        // small) and keep it to relay.
        let Answer {
            status: answered,
            headers: fields,
            body: incoming,
        } = resp;
        let limited = Limited::new(incoming, ERROR_BODY_LIMIT);
        let bytes = match tokio::time::timeout_at(deadline, limited.collect()).await {
            Ok(Ok(b)) => b.to_bytes(),
            _ => Bytes::new(),
        };
        let verdict = key_errors::judge(ctx.provider, status, &bytes);
        let resp = Answer {
            status: answered,
            headers: fields,
            body: UpstreamBody::Buffered(Full::new(bytes)),
        };
        match verdict {
            Some(KeyVerdict::Revoked) => upstream.keys.mark_invalid(key.index, status),
            Some(KeyVerdict::OverQuota(reason)) => upstream.keys.mark_over_quota(key.index, reason),
            Some(KeyVerdict::RateLimited) => {
                upstream.keys.rest(key.index, rest_duration(&resp.headers));
                last_429 = Some(Box::new((resp, key)));
            }
            None => return Ok((resp, key)),
        }
    }
}

/// How much of an upstream error body is read to judge the key (error bodies are small).
const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// An upstream response body: streamed as it arrives, or an error body already read (to judge
/// the key) and relayed from memory.
enum UpstreamBody {
    Live(PooledBody),
    Buffered(Full<Bytes>),
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            UpstreamBody::Live(b) => Pin::new(b).poll_frame(cx),
            UpstreamBody::Buffered(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|never| match never {}))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Live(b) => b.is_end_stream(),
            UpstreamBody::Buffered(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Live(b) => b.size_hint(),
            UpstreamBody::Buffered(b) => b.size_hint(),
        }
    }
}

type BoxError = Box<dyn StdError + Send + Sync>;

/// Why [`send`] produced no upstream response: the client's error, the key in use (by
/// fingerprint) and the underlying cause, for the one log line of the request.
struct Failure {
    error: ProxyError,
    key: Option<String>,
    cause: Option<BoxError>,
}

/// How an upstream call failed before a response arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SendError {
    /// No connection within `UPSTREAM_CONNECT_TIMEOUT_SECS`.
    ConnectTimeout,
    /// No response within `UPSTREAM_TIMEOUT_SECS`.
    Timeout,
    /// The connection could not be made (refused, unreachable, TLS, DNS).
    Connect,
    /// The connection failed after it was made (reset, closed early).
    Other,
}

/// The client-facing error when no key can be used.
fn no_key_error(upstream: &ProviderUpstream, no: NoKey) -> ProxyError {
    let var = upstream.keys.var();
    match no {
        NoKey::NoneConfigured => ProxyError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_error",
            format!("No {var} configured: this proxy has no key for that upstream. The operator must set {var}."),
        ),
        NoKey::AllInvalid => ProxyError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_error",
            format!("Every {var} key was rejected by the upstream as invalid (401/403). The operator must replace them in {var}."),
        ),
        NoKey::AllOverQuota => ProxyError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_error",
            format!(
                "Every usable {var} key is over its quota or revoked at the upstream{}. The operator must add credit or keys in {var}, then recheck the keys on /admin.",
                // AWS keys whose invocation logging would store prompts are out too.
                if var == "AWS_CREDENTIALS" { ", or logs prompts (such keys are used only with ALLOW_AWS_LOGGING=true)" } else { "" }
            ),
        ),
        NoKey::NoneForFamily(family) => ProxyError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_error",
            format!("No {var} key of this proxy can serve the model family '{family}'; use another model, or the operator must add a key with access to it in {var}."),
        ),
        NoKey::AllResting(d) => {
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            ProxyError::too_many(
                "rate_limit_error",
                format!("Every {var} key is rate-limited by the upstream right now; try again in {secs} s."),
                secs,
            )
        }
    }
}

/// Decides how a failed upstream call looks to the client: timeouts 504, everything else
/// (refused, unreachable, reset) 502. The cause goes to the log only.
fn fail_to_proxy(state: &AppState, upstream: &ProviderUpstream, e: SendError) -> ProxyError {
    let var = upstream.base_url_var;
    let timeout = |which: &str, secs: u64| {
        ProxyError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_error",
            format!("The upstream did not answer in time ({which}={secs} s); try again later."),
        )
    };
    match e {
        SendError::ConnectTimeout => timeout(
            "UPSTREAM_CONNECT_TIMEOUT_SECS",
            state.upstreams.connect_timeout_secs,
        ),
        SendError::Timeout => timeout("UPSTREAM_TIMEOUT_SECS", state.upstreams.timeout_secs),
        SendError::Connect => ProxyError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            format!("The upstream is unreachable (cannot connect to {var}); try again later."),
        ),
        SendError::Other => ProxyError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "The upstream connection failed before it answered; try again later.",
        ),
    }
}

/// The rewrites a response body passes through besides the ticket.
struct Transforms {
    /// The provider's decoder of a stream that is not SSE (before the ticket).
    decode: Option<Box<dyn StreamTransform>>,
    /// The route's translation back to the client's format (after the ticket; 2xx only).
    translate: Option<Box<dyn StreamTransform>>,
}

/// Phase 5: relays status, headers and the body, chunk by chunk, through the ticket.
fn relay(
    resp: Answer<UpstreamBody>,
    mut ticket: Option<Ticket>,
    extra: HeaderMap,
    deadline: tokio::time::Instant,
    transforms: Transforms,
    turn: Turn,
) -> Reply {
    let Answer {
        status,
        mut headers,
        body: upstream_body,
    } = resp;
    let decoded_type = transforms.decode.as_ref().and_then(|d| d.content_type());
    let is_sse = decoded_type
        .as_ref()
        .map(crate::http1::Value::of)
        .or_else(|| headers.get(header::CONTENT_TYPE))
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
    let client_type = transforms
        .translate
        .as_ref()
        .and_then(|t| t.content_type())
        .or(decoded_type);
    let rewritten = transforms.decode.is_some() || transforms.translate.is_some();
    if let Some(t) = ticket.as_mut() {
        t.on_response_start(status, is_sse);
    }
    // The upstream's fields, kept, with the dropped ones taken out (no copy of the rest).
    // A ticket may remove an SSE event, so a stream's length is only known without one.
    // Other bodies pass through the ticket unchanged and keep their length, which lets the
    // server send headers and body in one write instead of chunking them.
    let length_changes = (ticket.is_some() && is_sse) || rewritten;
    headers.retain(|name, _| {
        !(dropped_response_header(name) || (length_changes && name == header::CONTENT_LENGTH))
    });
    if let Some(t) = client_type {
        headers.insert(header::CONTENT_TYPE, t);
    }
    if is_sse {
        // Tells a buffering reverse proxy in front of us (nginx) to pass events through.
        headers.insert(queue::X_ACCEL_BUFFERING, HeaderValue::from_static("no"));
    }
    extend_headers(&mut headers, extra);
    let body = Relay {
        upstream: upstream_body,
        same_length: !length_changes,
        ticket,
        transforms,
        ended: false,
        deadline,
        timer: None,
        _turn: turn,
    };
    Reply::new(status, headers, Body::new(body))
}

/// Whether an upstream response header is kept from the client ([`DROPPED_RESPONSE_HEADERS`],
/// [`DROPPED_RESPONSE_PREFIXES`]).
fn dropped_response_header(name: &HeaderName) -> bool {
    let n = name.as_str();
    DROPPED_RESPONSE_HEADERS.contains(&n)
        || DROPPED_RESPONSE_PREFIXES.iter().any(|p| n.starts_with(p))
}

/// Adds the quota's headers, replacing any of the same name.
fn extend_headers(headers: &mut Fields, extra: HeaderMap) {
    // Most requests have none (no rate limit configured): walking an empty map as an
    // iterator costs about 200 instructions (callgrind).
    if extra.is_empty() {
        crate::http1::recycle_map(extra);
        return;
    }
    let mut last: Option<HeaderName> = None;
    for (name, value) in extra {
        match name {
            Some(n) => {
                headers.insert(n.clone(), value);
                last = Some(n);
            }
            None => {
                if let Some(n) = &last {
                    headers.append(n.clone(), value);
                }
            }
        }
    }
}

/// The response body: the upstream's chunks as they arrive, each passed through the ticket.
/// Dropping it (the client went away) drops the upstream response, which closes that
/// connection and so cancels the upstream request, and drops the ticket unfinished.
struct Relay {
    upstream: UpstreamBody,
    /// Neither the ticket (an SSE body's hidden usage event) nor a transform changes the
    /// body's length: the upstream's size is the client's.
    same_length: bool,
    ticket: Option<Ticket>,
    transforms: Transforms,
    /// The upstream body ended (what the transforms still held has been sent).
    ended: bool,
    /// The end of `UPSTREAM_TIMEOUT_SECS`: a body still streaming then is cut off.
    deadline: tokio::time::Instant,
    /// Armed the first time the upstream has nothing ready, so that a body that arrives with
    /// its headers (most non-streaming answers) never creates a timer.
    timer: Option<Pin<Box<Sleep>>>,
    /// The request's turn in the fair queue: its caller's slot is held until the body ends
    /// or is dropped.
    _turn: Turn,
}

impl Relay {
    /// Ends the body with an error: the client sees the connection end abruptly (not a clean
    /// end), so that it knows the answer is incomplete; the ticket is dropped unfinished.
    fn fail(&mut self, e: BoxError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        tracing::warn!(error = %e, "upstream body failed mid-stream");
        self.ticket = None;
        Poll::Ready(Some(Err(e)))
    }

    /// One upstream chunk through the decoder, the ticket and the translation.
    fn pass(&mut self, mut chunk: Bytes) -> Bytes {
        if let Some(d) = self.transforms.decode.as_mut() {
            chunk = d.chunk(chunk);
        }
        if let Some(t) = self.ticket.as_mut() {
            chunk = t.on_chunk(chunk);
        }
        if let Some(t) = self.transforms.translate.as_mut() {
            chunk = t.chunk(chunk);
        }
        chunk
    }

    /// The end of the upstream body: flushes the transforms, settles the ticket, and returns
    /// what is left for the client.
    fn finish(&mut self) -> Bytes {
        self.ended = true;
        let mut rest = match self.transforms.decode.as_mut() {
            Some(d) => d.end(),
            None => Bytes::new(),
        };
        if let Some(t) = self.ticket.as_mut() {
            if !rest.is_empty() {
                rest = t.on_chunk(rest);
            }
        }
        if let Some(t) = self.ticket.take() {
            t.finish();
        }
        if let Some(t) = self.transforms.translate.as_mut() {
            let mut out = if rest.is_empty() { rest } else { t.chunk(rest) };
            let tail = t.end();
            if !tail.is_empty() {
                let mut joined = bytes::BytesMut::from(&out[..]);
                joined.extend_from_slice(&tail);
                out = joined.freeze();
            }
            rest = out;
        }
        rest
    }
}

impl http_body::Body for Relay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        loop {
            return match Pin::new(&mut this.upstream).poll_frame(cx) {
                Poll::Pending => {
                    let deadline = this.deadline;
                    let timer = this
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                    if timer.as_mut().poll(cx).is_ready() {
                        return this
                            .fail("the upstream response exceeded UPSTREAM_TIMEOUT_SECS".into());
                    }
                    Poll::Pending
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(chunk) = frame.into_data() else {
                        // Trailers: HTTP/1.1 chat APIs send none, and we relay none.
                        continue;
                    };
                    let chunk = this.pass(chunk);
                    if chunk.is_empty() {
                        continue;
                    }
                    Poll::Ready(Some(Ok(Frame::data(chunk))))
                }
                Poll::Ready(Some(Err(e))) => this.fail(Box::new(e)),
                Poll::Ready(None) => {
                    let rest = this.finish();
                    if rest.is_empty() {
                        Poll::Ready(None)
                    } else {
                        Poll::Ready(Some(Ok(Frame::data(rest))))
                    }
                }
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        // With a ticket or a transform the body must be polled to its end, where the ticket
        // settles and the transforms flush.
        self.ended
            || (self.ticket.is_none()
                && self.transforms.decode.is_none()
                && self.transforms.translate.is_none()
                && self.upstream.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        // A ticket may shorten an SSE body (it hides the usage event it asked for) and a
        // transform rewrites it; any other body keeps the upstream's length, which the
        // server then writes without reading the `content-length` header again.
        if self.same_length {
            self.upstream.size_hint()
        } else {
            SizeHint::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body of `chunks` frames.
    fn chunked(chunks: &[&'static [u8]]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        Body::new(http_body_util::StreamBody::new(futures::stream::iter(
            frames,
        )))
    }

    #[tokio::test]
    async fn a_body_is_read_whole_in_one_frame_or_many_within_its_limit() {
        let one = Body::from(Bytes::from_static(b"{\"model\":\"x\"}"));
        assert_eq!(
            read_body(one, 100).await,
            Ok(Bytes::from_static(b"{\"model\":\"x\"}"))
        );
        assert_eq!(read_body(Body::empty(), 100).await, Ok(Bytes::new()));
        let many = chunked(&[b"ab", b"", b"cd", b"e"]);
        assert_eq!(read_body(many, 5).await, Ok(Bytes::from_static(b"abcde")));
        assert_eq!(
            read_body(chunked(&[b"ab", b"cd", b"e"]), 4).await,
            Err(BodyError::TooLarge)
        );
        assert_eq!(
            read_body(chunked(&[b"abcdef"]), 5).await,
            Err(BodyError::TooLarge)
        );
        assert_eq!(
            read_body(Body::from(Bytes::from_static(b"abcdef")), 5).await,
            Err(BodyError::TooLarge)
        );
        assert_eq!(
            read_body(chunked(&[b"", b"xy"]), 5).await,
            Ok(Bytes::from_static(b"xy"))
        );
        let broken = Body::new(http_body_util::StreamBody::new(futures::stream::iter(
            vec![
                Ok(Frame::data(Bytes::from_static(b"ab"))),
                Err(std::io::Error::other("reset")),
            ],
        )));
        assert_eq!(read_body(broken, 100).await, Err(BodyError::Broken));
    }

    #[test]
    fn a_remembered_upstream_uri_is_the_parsed_one() {
        let urls = [
            "http://127.0.0.1:8080/v1/chat/completions",
            "https://api.openai.com/v1/chat/completions",
            "https://api.openai.com/v1/chat/completions",
            "https://api.openai.com/v1/models?limit=5",
            "http://127.0.0.1:8080/v1/chat/completions",
        ];
        for url in urls.iter().chain(urls.iter()) {
            let uri = upstream_uri(url.to_string()).expect("valid");
            assert_eq!(uri, Uri::try_from(*url).expect("valid"));
            assert_eq!(uri.to_string(), *url);
        }
        assert!(upstream_uri("http://bad host/".into()).is_err());
        assert!(upstream_uri("http://bad host/".into()).is_err());
    }

    fn ctx(headers: &[(&str, &str)]) -> Ctx {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        Ctx {
            provider: Provider::OpenAi,
            api: Api::OpenAiChat,
            translation: None,
            method: Method::POST,
            client_path: "/v1/chat/completions".into(),
            upstream_path: "/v1/chat/completions".into(),
            query: None,
            headers: Fields::from_map(h.clone()),
            principal: Principal::Anonymous,
            ip: IpAddr::from([127, 0, 0, 1]),
            path_model: None,
        }
    }

    #[test]
    fn hop_by_hop_account_and_rate_limit_headers_are_not_relayed() {
        for dropped in [
            "connection",
            "Keep-Alive",
            "transfer-encoding",
            "set-cookie",
            "strict-transport-security",
            "openai-organization",
            "anthropic-organization-id",
            "x-ratelimit-remaining-tokens",
            "anthropic-ratelimit-requests-limit",
        ] {
            let name = HeaderName::try_from(dropped).expect("name");
            assert!(dropped_response_header(&name), "{dropped} was relayed");
        }
        for kept in [
            "content-type",
            "content-length",
            "date",
            "server",
            "x-request-id",
            "openai-processing-ms",
            "retry-after",
            "x-ratelimit",
            "anthropic-ratelimit",
        ] {
            let name = HeaderName::try_from(kept).expect("name");
            assert!(!dropped_response_header(&name), "{kept} was dropped");
        }
    }

    #[test]
    fn only_allowlisted_headers_go_upstream() {
        let c = ctx(&[
            ("authorization", "Bearer client"),
            ("x-api-key", "client"),
            ("cookie", "a=b"),
            ("host", "proxy"),
            ("content-length", "3"),
            ("connection", "keep-alive"),
            ("accept-encoding", "gzip"),
            ("openai-organization", "org-x"),
            ("openai-beta", "assistants=v2"),
            ("anthropic-beta", "tools-2024"),
            ("accept", "text/event-stream"),
        ]);
        let o = upstream_headers(&c);
        let mut names: Vec<&str> = o.iter().map(|(k, _)| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, vec!["accept", "content-type", "openai-beta"]);
        let mut c = c;
        c.provider = Provider::Anthropic;
        let a = upstream_headers(&c);
        assert_eq!(a.get("anthropic-version").expect("set"), "2023-06-01");
        assert_eq!(a.get("anthropic-beta").expect("set"), "tools-2024");
        assert!(a.get("openai-beta").is_none());
    }

    #[test]
    fn a_repeated_allowed_header_goes_upstream_with_its_values_in_order() {
        let c = ctx(&[
            ("accept", "text/event-stream"),
            ("cookie", "a=b"),
            ("accept", "application/json"),
        ]);
        let o = upstream_headers(&c);
        let values: Vec<&str> = o
            .get_all(header::ACCEPT)
            .map(|v| v.to_str().expect("text"))
            .collect();
        assert_eq!(values, vec!["text/event-stream", "application/json"]);
        assert!(o.get(header::COOKIE).is_none());
    }

    #[test]
    fn client_anthropic_version_wins() {
        let mut c = ctx(&[("anthropic-version", "2024-01-01")]);
        c.provider = Provider::Anthropic;
        let a = upstream_headers(&c);
        assert_eq!(a.get("anthropic-version").expect("set"), "2024-01-01");
    }
}
