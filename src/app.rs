//! The application: shared state built once at startup, the router with its layers in one
//! place, and [`serve`], which runs the server on a given listener until a given shutdown
//! future resolves (tests pass port 0 and their own shutdown).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{middleware, Json, Router};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::TraceLayer;

use crate::auth::lockout::Lockout;
use crate::config::{Config, ConfigError};
use crate::http1::Reply;
use crate::proxy::Upstreams;
use crate::quota::Quotas;
use crate::users::persist::Persistence;
use crate::users::UserStore;

/// Everything a handler may need: one `Arc`, so that the several clones each request makes
/// (extractors, middleware) cost one reference count, not one per component.
#[derive(Clone)]
pub struct AppState(Arc<AppParts>);

impl std::ops::Deref for AppState {
    type Target = AppParts;

    fn deref(&self) -> &AppParts {
        &self.0
    }
}

/// The components behind [`AppState`]; each is also an `Arc` of its own, for background tasks
/// that need just one of them.
pub struct AppParts {
    pub config: Arc<Config>,
    pub users: Arc<UserStore>,
    pub persistence: Arc<Persistence>,
    pub upstreams: Arc<Upstreams>,
    pub quotas: Arc<Quotas>,
    pub lockout: Arc<Lockout>,
    /// Operator policy over proxied requests (issue 17).
    pub policy: Arc<crate::policy::Policy>,
    /// Proof-of-work challenges, when `CAPTCHA_MODE=proof_of_work` (issue 17).
    pub pow: Option<Arc<crate::pow::Pow>>,
    /// `SERVICE_INFO_PASSWORD`, when set (issue 17).
    pub info_lock: Option<Arc<crate::web::info::InfoLock>>,
    /// Admin web sessions, CSRF and the external session client (issue 7).
    pub sessions: Arc<crate::auth::session::Sessions>,
    pub started_at: Instant,
    /// The Prometheus recorder's handle, when `METRICS_KEY` is set (issue 16): `/metrics`
    /// renders from it.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

impl AppState {
    /// Builds every component from the configuration and loads users from the store.
    pub async fn build(config: Config) -> Result<AppState, ConfigError> {
        let config = Arc::new(config);
        let users = UserStore::new();
        let persistence = Arc::new(Persistence::open(&config, users.clone()).await?);
        let upstreams = Arc::new(Upstreams::from_config(&config)?);
        let quotas = Arc::new(Quotas::from_config(&config, users.clone())?);
        let lockout = Arc::new(Lockout::new(
            config.cli.brute_force_max_failed_attempts,
            std::time::Duration::from_secs(config.cli.brute_force_ttl_seconds),
        ));
        let sessions = Arc::new(crate::auth::session::Sessions::from_config(&config)?);
        let policy = Arc::new(crate::policy::Policy::new(&config.policy));
        let pow = crate::pow::from_config(&config)?.map(Arc::new);
        let info_lock = crate::web::info::InfoLock::from_config(&config)?.map(Arc::new);
        let metrics = match config.metrics_key() {
            Some(_) => Some(crate::metrics::install()?),
            None => None,
        };
        Ok(AppState(Arc::new(AppParts {
            policy,
            pow,
            info_lock,
            sessions,
            config,
            users,
            persistence,
            upstreams,
            quotas,
            lockout,
            started_at: Instant::now(),
            metrics,
        })))
    }
}

/// The router with every layer. Layers, outermost first:
/// 0. `auth::credentials::move_query_key`: on proxied routes, a client key sent as `?key=`
///    (Google's REST style) moves into the `x-goog-api-key` header, so that no URL forwarded
///    holds it.
/// 1. Only when `LOG_LEVEL` enables debug logging: `SetSensitiveRequestHeaders` marks
///    `authorization`, `x-api-key`, `x-goog-api-key`, `cookie` and `x-session-token` sensitive, so that
///    `TraceLayer` logs each request and response with those redacted; its span names the
///    route template (`request_span`), never the path or query, which may carry a token. At
///    other levels the pair is left out of the request path entirely (the forwarder logs every
///    request itself).
/// 2. `auth::guard`, default-deny, by the route table `auth::ROUTES` (it runs inside the
///    router, after the route is matched, so it sees `MatchedPath`): decides the client address
///    once and inserts [`crate::auth::ClientIp`] (read by the quotas and handlers), then
///    inserts [`crate::auth::Principal`] (proxied routes), [`crate::auth::AdminIdentity`]
///    (admin routes) or [`crate::auth::LockedOut`] (credential forms), or refuses.
/// 3. The routes: proxied (`upstream`), admin (`admin`), public pages (`web`), `/health`, and
///    `/metrics` when `METRICS_KEY` is set.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config.max_request_body_bytes();
    let router = Router::new()
        .route("/health", get(health))
        .merge(crate::proxy::routes(&state.config))
        .merge(crate::admin::routes())
        .merge(crate::web::routes())
        .merge(crate::metrics::scrape::routes(state.metrics.is_some()))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::auth::guard,
        ));
    let router = if tracing::enabled!(target: "tower_http::trace", tracing::Level::DEBUG) {
        router
            .layer(TraceLayer::new_for_http().make_span_with(request_span))
            .layer(SetSensitiveRequestHeadersLayer::new([
                header::AUTHORIZATION,
                header::COOKIE,
                header::HeaderName::from_static("x-api-key"),
                header::HeaderName::from_static("x-session-token"),
                header::HeaderName::from_static("x-goog-api-key"),
            ]))
    } else {
        router
    };
    // Outermost: a client key sent as `?key=` leaves the URL before anything else sees it.
    router
        .layer(middleware::map_request(
            crate::auth::credentials::move_query_key,
        ))
        .with_state(state)
}

/// The server's front (issue 18): the proxied `POST` routes at fixed paths
/// ([`crate::proxy::fixed_routes`]) go in a straight line — the gate
/// ([`crate::auth::admit_proxied`]), then the forwarder — without the router, its middleware
/// and their per-request boxes and clones; every other request goes to the [`router`]. The
/// straight line does what the router's layers do for these routes: a client key in the query
/// (`?key=`) sends the request through the router instead (its outermost layer moves the key to a
/// header), and with debug logging on (`TraceLayer`) every request takes the router, so that the
/// trace sees all of them.
#[derive(Clone)]
pub struct Front(Arc<FrontParts>);

struct FrontParts {
    state: AppState,
    router: Router,
    /// `None` with debug logging on.
    fixed: Option<crate::proxy::FixedRoutes>,
}

/// Builds the server's front over [`router`].
pub fn front(state: AppState) -> Front {
    let traced = tracing::enabled!(target: "tower_http::trace", tracing::Level::DEBUG);
    let fixed =
        (!traced).then(|| crate::proxy::FixedRoutes::new(&state.config.proxy_endpoint_route));
    Front(Arc::new(FrontParts {
        router: router(state.clone()),
        state,
        fixed,
    }))
}

impl crate::server::Front for Front {
    type Future = std::pin::Pin<Box<dyn Future<Output = Reply> + Send>>;

    fn serve(&self, req: crate::server::FrontRequest, peer: SocketAddr) -> Self::Future {
        let parts = &*self.0;
        let fixed = parts.fixed.as_ref().and_then(|f| {
            let query_key = req.uri.query().is_some_and(|q| q.contains("key"));
            f.get(&req.method, req.uri.path()).filter(|_| !query_key)
        });
        match fixed {
            Some(route) => {
                // In a block kept per thread (`server::spare`): a new box for this several-KB
                // future emptied and refilled an allocator page per request, a page fault each
                // time. The small box around it shares its page with many others. Built in its
                // block (`Recycled::build`), not on the stack and copied there.
                let (state, path) = (parts.state.clone(), route.path.clone());
                let route = route.route();
                Box::pin(crate::server::spare::Recycled::build(move || {
                    straight(state, route, path, req, peer)
                }))
            }
            None => parts.router.serve(req, peer),
        }
    }
}

/// A proxied request on the straight line: the gate, then the forwarder.
async fn straight(
    state: AppState,
    route: crate::proxy::forward::Route,
    template: Arc<str>,
    req: crate::server::FrontRequest,
    peer: SocketAddr,
) -> Reply {
    let crate::server::FrontRequest {
        method,
        uri,
        headers,
        body,
        ..
    } = req;
    // The gate decides without waiting; only a locked-out address's answer waits (boxed, so
    // that every request's future does not carry the pause's state).
    let (ip, principal) = match crate::auth::gate_proxied(&state, peer.ip(), &headers) {
        crate::auth::Gate::Pass(ip, principal) => (ip, principal),
        crate::auth::Gate::Refused(refusal) => return refusal.into(),
        crate::auth::Gate::LockedOut(secs) => {
            return Box::pin(crate::auth::locked_out(secs)).await.into()
        }
    };
    let caller = crate::proxy::forward::Caller {
        principal,
        ip,
        client_path: template,
    };
    // A body that came whole with the head goes on as it is, without a boxed body around it.
    let body = match body.into_whole() {
        Ok(bytes) => crate::proxy::forward::ClientBody::Whole(bytes),
        Err(body) => crate::proxy::forward::ClientBody::Streamed(axum::body::Body::new(body)),
    };
    let head = crate::proxy::forward::ClientHead {
        method,
        uri,
        headers,
    };
    crate::proxy::forward::forward_parts(state, route, caller, head, None, body).await
}

/// The span of one request in the debug trace: its method and route *template*
/// (`/admin/users/{token}`), never the path or query it was called with, which may carry a
/// user token, a key or anything else a client put there.
fn request_span(req: &axum::extract::Request) -> tracing::Span {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("(no route)", |m| m.as_str());
    tracing::debug_span!("request", method = %req.method(), route, version = ?req.version())
}

#[derive(Deserialize)]
struct HealthQuery {
    verbose: Option<String>,
}

/// `GET /health`: 200 while serving; `?verbose` adds persistence status (never a secret).
async fn health(State(state): State<AppState>, Query(q): Query<HealthQuery>) -> Response {
    if q.verbose.is_none() {
        return (StatusCode::OK, "OK").into_response();
    }
    Json(serde_json::json!({
        "status": "ok",
        "uptimeSecs": state.started_at.elapsed().as_secs(),
        "users": state.users.len(),
        "persistence": state.persistence.status(),
    }))
    .into_response()
}

/// Serves on `listener` (through [`crate::server::run`], with its client timers and
/// connection caps) until `shutdown` resolves; then stops accepting, lets in-flight requests
/// (streams included) finish within `SHUTDOWN_GRACE_SECS`, stops the background tasks and
/// flushes pending user changes.
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (background, tasks) = start_background(&state);

    let grace = state.config.shutdown_grace();
    let limits = crate::server::Limits::from_config(&state.config);
    let app = front(state);
    let stop_accepting = CancellationToken::new();
    let server = tokio::spawn(crate::server::run(
        listener,
        app,
        limits,
        stop_accepting.clone(),
        grace,
    ));
    shutdown.await;
    tracing::info!(
        grace_secs = grace.as_secs(),
        "shutting down: no new connections, waiting for in-flight requests"
    );
    stop_accepting.cancel();
    // `server::run` closes what is left after the grace period itself.
    if let Err(e) = server.await {
        tracing::error!(error = %e, "the accept loop ended abnormally");
    }
    background.cancel();
    tasks.wait().await;
    tracing::info!("shutdown complete");
    Ok(())
}

/// The binary's server (issue 18): one worker thread per listener (from
/// [`crate::server::bind_listeners`]), each with its own current-thread runtime serving its
/// own listener through [`crate::server::run_shared`] — no task moves between threads, and a
/// request is served start to end on the thread that accepted it. The connection caps are
/// counted across all workers. The background tasks and `shutdown` run on the caller's runtime
/// (the main thread), so that nothing long-lived depends on a worker's runtime. On `shutdown`
/// every worker stops accepting and drains within `SHUTDOWN_GRACE_SECS`; then the background
/// tasks stop and pending user changes are flushed, as in [`serve`].
pub async fn serve_workers(
    state: AppState,
    listeners: Vec<std::net::TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grace = state.config.shutdown_grace();
    let limits = crate::server::Limits::from_config(&state.config);
    crate::server::log_limits(&limits);
    let counts = Arc::new(crate::server::ConnectionCounts::default());
    let stop_accepting = CancellationToken::new();
    // Every worker reports when it has drained (`drained`) and keeps its runtime running until
    // all have (`release`). This dates from when upstream connections were shared by all
    // workers (a connection's task lives on the runtime that opened it); with `proxy::pool`
    // each worker uses only its own, so the wait is no longer needed for them, and it costs
    // nothing at shutdown.
    let release = CancellationToken::new();
    let app = front(state.clone());
    let mut workers = Vec::with_capacity(listeners.len());
    let mut drained_all = Vec::with_capacity(listeners.len());
    for (i, listener) in listeners.into_iter().enumerate() {
        // Built here so that a failure is reported before anything is served.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name(format!("gk-worker-{i}-blocking"))
            // The worker's log lines are batched; they go to the log's writer thread whenever
            // the worker is about to wait for work (`logging`).
            .on_thread_park(crate::logging::flush_thread)
            .build()?;
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        let (drained, drained_rx) = tokio::sync::oneshot::channel::<()>();
        let (app, limits, counts, stop, release) = (
            app.clone(),
            limits.clone(),
            counts.clone(),
            stop_accepting.clone(),
            release.clone(),
        );
        std::thread::Builder::new()
            .name(format!("gk-worker-{i}"))
            .spawn(move || {
                crate::logging::batch_this_thread();
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(l) => {
                            crate::server::run_shared(l, app, limits, counts, stop, grace).await
                        }
                        Err(e) => tracing::error!(worker = i, error = %e, "worker cannot use its listener"),
                    }
                    let _ = drained.send(());
                    release.cancelled().await;
                });
                // Tasks a request left behind are dropped with the runtime; blocking work (a
                // settlement waiting for the tokenizer to load, `quota::Ticket`) gets time to
                // finish, so that its charge is in the store before the final flush. The wait
                // ends as soon as that work does.
                runtime.shutdown_timeout(std::time::Duration::from_secs(5));
                crate::logging::flush_thread();
                let _ = done.send(());
            })?;
        workers.push(finished);
        drained_all.push(drained_rx);
    }
    let (background, tasks) = start_background(&state);
    drop(state);
    shutdown.await;
    tracing::info!(
        grace_secs = grace.as_secs(),
        "shutting down: no new connections, waiting for in-flight requests"
    );
    stop_accepting.cancel();
    for drained in drained_all {
        // An error means the worker thread ended early (a panic); the others are still awaited.
        let _ = drained.await;
    }
    release.cancel();
    for finished in workers {
        // An error means the worker thread panicked; the others are still awaited.
        if finished.await.is_err() {
            tracing::error!("a worker thread ended abnormally");
        }
    }
    background.cancel();
    tasks.wait().await;
    tracing::info!("shutdown complete");
    Ok(())
}

/// Spawns every background task (persistence, sweeps, quota refresh, key checkers) on the
/// current runtime, on a tracker that [`serve`] and [`serve_workers`] join on shutdown.
fn start_background(state: &AppState) -> (CancellationToken, TaskTracker) {
    let background = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(state.persistence.clone().run(background.clone()));
    tasks.spawn(crate::users::sweep::run(
        state.users.clone(),
        state.config.cli.pow_token_purge_hours,
        background.clone(),
    ));
    tasks.spawn(state.quotas.clone().run_refresh(background.clone()));
    if let Some(handle) = state.metrics.clone() {
        tasks.spawn(crate::metrics::run_upkeep(handle, background.clone()));
    }
    for (provider, schedule) in
        crate::proxy::checker::checked_providers(&state.config, &state.upstreams)
    {
        tasks.spawn(crate::proxy::checker::run(
            state.upstreams.clone(),
            provider,
            schedule,
            background.clone(),
        ));
    }
    tasks.close();
    (background, tasks)
}

/// Hands memory freed by a large operation (a bulk import, a listing of every user) back to
/// the system from glibc's heap, which keeps freed memory mapped: the heap of everything when
/// the library runs under the system allocator (tests, embedders), of the C code (SQLite)
/// under the binary's mimalloc, which returns its own at once ([`crate::allocator`]).
/// Elsewhere this does nothing.
pub fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's own heap.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C). The handlers are installed when this is called,
/// not when the future is first polled: call it before announcing that the server listens, so
/// that a SIGTERM sent right after that line still shuts down gracefully.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let signals = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::terminate()).ok(),
            signal(SignalKind::interrupt()).ok(),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let (mut term, mut int) = signals;
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = wait(term.take()) => {},
                _ = wait(int.take()) => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// How important a startup line is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartupLevel {
    Info,
    Warn,
}

/// What an operator needs to know at startup, one line each: the address and access mode, the
/// user store and where it lives, which providers have keys (a warning for each whose routes
/// would refuse every request), the effective `TRUSTED_PROXIES`, and the warnings about
/// `GATEKEEPER=none` on a public address and an unset `SIGNING_KEY`. Never a secret.
pub fn startup_summary(config: &Config) -> Vec<(StartupLevel, String)> {
    use crate::config::{GatekeeperMode, StoreKind};
    use StartupLevel::{Info, Warn};
    let cli = &config.cli;
    let mut lines = Vec::new();

    let addr = SocketAddr::new(cli.bind_address, cli.port);
    let mode = match config.mode() {
        GatekeeperMode::None => "none (anyone who reaches the port may use it)",
        GatekeeperMode::ProxyKey => "proxy_key (clients send PROXY_KEY)",
        GatekeeperMode::UserToken => "user_token (clients send their user token)",
    };
    lines.push((Info, format!("access: GATEKEEPER={mode}")));
    if config.mode() == GatekeeperMode::None && !addr.ip().is_loopback() {
        lines.push((
            Warn,
            format!("GATEKEEPER=none on a non-loopback address ({addr}): anyone who can reach this port can spend your upstream keys. Set GATEKEEPER=proxy_key or user_token, or BIND_ADDRESS=127.0.0.1."),
        ));
    }

    lines.push((
        Info,
        match cli.gatekeeper_store {
            StoreKind::Memory => "user store: memory (GATEKEEPER_STORE=memory): users are lost when the server stops; set GATEKEEPER_STORE=sqlite to keep them".to_string(),
            StoreKind::Sqlite => {
                let path = std::path::absolute(&cli.sqlite_path)
                    .unwrap_or_else(|_| cli.sqlite_path.clone());
                format!("user store: sqlite, file {} (SQLITE_PATH)", path.display())
            }
            StoreKind::FirebaseRtdb => match (&cli.firebase_database_emulator_host, &cli.firebase_rtdb_url) {
                (Some(host), _) => format!("user store: firebase_rtdb, emulator at http://{host} (FIREBASE_DATABASE_EMULATOR_HOST)"),
                (None, Some(url)) => format!("user store: firebase_rtdb, database {} (FIREBASE_RTDB_URL)", url_without_secrets(url)),
                (None, None) => "user store: firebase_rtdb, FIREBASE_RTDB_URL is not set".to_string(),
            },
        },
    ));

    let route = &config.proxy_endpoint_route;
    for (name, var, keys, base, paths) in [
        (
            "OpenAI",
            "OPENAI_KEY",
            config.openai_keys.len(),
            &cli.openai_base_url,
            format!("/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, {route}/openai/..."),
        ),
        (
            "Anthropic",
            "ANTHROPIC_KEY",
            config.anthropic_keys.len(),
            &cli.anthropic_base_url,
            format!("/v1/messages, /v1/messages/count_tokens, {route}/anthropic/..."),
        ),
    ] {
        let base = url_without_secrets(base);
        if keys == 0 {
            lines.push((
                Warn,
                format!("provider {name}: no key ({var} is not set): requests to {paths} will be refused with 503; set {var} to use {base}"),
            ));
        } else {
            let s = if keys == 1 { "" } else { "s" };
            lines.push((
                Info,
                format!("provider {name}: {keys} key{s} ({var}), upstream {base}"),
            ));
        }
    }

    // The other providers are optional: one line for those with keys each, and one warning that
    // names every provider without (its routes answer 503 until its variable is set).
    let mut unconfigured = Vec::new();
    for (name, var, keys, paths) in [
        (
            "Google AI",
            "GOOGLE_AI_KEY",
            config.google_ai_keys.len(),
            format!("{route}/google-ai/..."),
        ),
        (
            "Mistral AI",
            "MISTRAL_AI_KEY",
            config.mistral_ai_keys.len(),
            format!("{route}/mistral-ai/..."),
        ),
        (
            "Azure OpenAI",
            "AZURE_CREDENTIALS",
            config.azure_deployments.len(),
            format!("{route}/azure/openai/..."),
        ),
        (
            "AWS Bedrock",
            "AWS_CREDENTIALS",
            config.aws_credentials.len(),
            format!("{route}/aws/..."),
        ),
        (
            "GCP Vertex AI",
            "GCP_CREDENTIALS",
            config.gcp_credentials.len(),
            format!("{route}/gcp/..."),
        ),
    ] {
        if keys == 0 {
            unconfigured.push(format!("{name} ({var}; {paths})"));
        } else {
            let s = if keys == 1 { "" } else { "s" };
            lines.push((Info, format!("provider {name}: {keys} key{s} ({var})")));
        }
    }
    if !unconfigured.is_empty() {
        lines.push((
            Warn,
            format!(
                "providers without keys, whose routes answer 503 until the variable is set: {}",
                unconfigured.join(", ")
            ),
        ));
    }

    lines.push((
        Info,
        match config.trusted_proxies() {
            0 => "client addresses: the TCP peer; X-Forwarded-For is ignored (TRUSTED_PROXIES=0)".to_string(),
            n => format!("client addresses: entry {n} from the right of X-Forwarded-For (TRUSTED_PROXIES={n}); right only if exactly {n} proxies of yours sit in front of this server"),
        },
    ));

    // Without a way to sign in, no admin session cookie is ever signed: nothing to warn about.
    let admin_ui = config.admin_key().is_some() || cli.admin_session_validate_url.is_some();
    let signing_key_set = cli
        .signing_key
        .as_ref()
        .is_some_and(|k| !k.expose().is_empty());
    if admin_ui && !signing_key_set {
        lines.push((
            Warn,
            "SIGNING_KEY is not set: admin session cookies are signed with a random key generated at start, so every admin is signed out when the server restarts. Set SIGNING_KEY to a long random secret to keep sessions across restarts.".to_string(),
        ));
    }
    if config.metrics_key().is_some() {
        lines.push((
            Info,
            "metrics: GET /metrics with 'Authorization: Bearer <METRICS_KEY>', from addresses ADMIN_WHITELIST allows (docs/metrics.md)".to_string(),
        ));
    }
    lines
}

/// Logs [`startup_summary`], one event per line.
pub fn log_startup_summary(config: &Config) {
    for (level, line) in startup_summary(config) {
        match level {
            StartupLevel::Info => tracing::info!("{line}"),
            StartupLevel::Warn => tracing::warn!("{line}"),
        }
    }
}

/// A URL for the log: scheme, host, port and path only (no user, password, query or fragment,
/// where a credential could hide).
fn url_without_secrets(url: &url::Url) -> String {
    let mut clean = url.clone();
    let _ = clean.set_username("");
    let _ = clean.set_password(None);
    clean.set_query(None);
    clean.set_fragment(None);
    clean.to_string()
}

#[cfg(test)]
mod startup_summary_tests {
    use super::*;

    fn summary(args: &[&str]) -> Vec<(StartupLevel, String)> {
        let mut argv = vec!["llm-gatekeeper".to_string()];
        argv.extend(args.iter().map(|s| s.to_string()));
        let config = Config::from_args(argv, std::iter::empty()).expect("valid config");
        startup_summary(&config)
    }

    fn warnings(lines: &[(StartupLevel, String)]) -> Vec<&str> {
        lines
            .iter()
            .filter(|(l, _)| *l == StartupLevel::Warn)
            .map(|(_, s)| s.as_str())
            .collect()
    }

    #[test]
    fn gatekeeper_none_on_a_public_address_warns_once() {
        let lines = summary(&["--bind-address", "0.0.0.0", "--openai-key", "sk-a"]);
        let w = warnings(&lines);
        assert_eq!(
            w.iter().filter(|l| l.contains("GATEKEEPER=none")).count(),
            1,
            "{w:?}"
        );
        let lines = summary(&["--bind-address", "127.0.0.1", "--openai-key", "sk-a"]);
        assert!(!warnings(&lines)
            .iter()
            .any(|l| l.contains("GATEKEEPER=none")));
        let lines = summary(&["--bind-address", "::1", "--openai-key", "sk-a"]);
        assert!(!warnings(&lines)
            .iter()
            .any(|l| l.contains("GATEKEEPER=none")));
    }

    #[test]
    fn firebase_url_is_shown_without_credentials() {
        let lines = summary(&[
            "--gatekeeper-store",
            "firebase_rtdb",
            "--firebase-rtdb-url",
            "https://user:hunter2@db.example.firebaseio.com/?auth=secret-token#x",
        ]);
        let store = lines
            .iter()
            .find(|(_, l)| l.starts_with("user store:"))
            .map(|(_, l)| l.as_str())
            .unwrap_or_default();
        assert!(
            store.contains("database https://db.example.firebaseio.com/ (FIREBASE_RTDB_URL)"),
            "{store}"
        );
        assert!(!store.contains("hunter2") && !store.contains("secret-token"));
    }

    #[test]
    fn signing_key_warning_only_when_admins_can_sign_in() {
        let signing = |args: &[&str]| {
            warnings(&summary(args))
                .iter()
                .any(|l| l.starts_with("SIGNING_KEY is not set"))
        };
        assert!(!signing(&[]));
        assert!(signing(&["--admin-key", "k"]));
        assert!(signing(&[
            "--admin-session-validate-url",
            "http://auth.internal/validate"
        ]));
        assert!(!signing(&["--admin-key", "k", "--signing-key", "s"]));
    }

    #[test]
    fn no_secret_appears_in_any_line() {
        let lines = summary(&[
            "--gatekeeper",
            "user_token",
            "--admin-key",
            "admin-secret-1",
            "--openai-key",
            "sk-secret-2,sk-secret-3",
            "--signing-key",
            "signing-secret-4",
            "--metrics-key",
            "metrics-secret-5-long-enough",
        ]);
        for (_, l) in &lines {
            assert!(!l.contains("secret"), "{l}");
        }
        assert!(lines
            .iter()
            .any(|(_, l)| l.contains("provider OpenAI: 2 keys (OPENAI_KEY)")));
        assert!(lines
            .iter()
            .any(|(_, l)| l.starts_with("metrics: GET /metrics")));
    }
}
