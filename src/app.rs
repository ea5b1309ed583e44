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
        })))
    }
}

/// The router with every layer. Layers, outermost first:
/// 1. Only when `LOG_LEVEL` enables debug logging: `SetSensitiveRequestHeaders` marks
///    `authorization`, `x-api-key`, `cookie` and `x-session-token` sensitive, so that
///    `TraceLayer` logs each request and response with those redacted; its span names the
///    route template (`request_span`), never the path or query, which may carry a token. At
///    other levels the pair is left out of the request path entirely (the forwarder logs every
///    request itself).
/// 2. `auth::guard`, default-deny, by the route table `auth::ROUTES` (it runs inside the
///    router, after the route is matched, so it sees `MatchedPath`): decides the client address
///    once and inserts [`crate::auth::ClientIp`] (read by the quotas and handlers), then
///    inserts [`crate::auth::Principal`] (proxied routes), [`crate::auth::AdminIdentity`]
///    (admin routes) or [`crate::auth::LockedOut`] (credential forms), or refuses.
/// 3. The routes: proxied (`upstream`), admin (`admin`), public pages (`web`), `/health`.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config.max_request_body_bytes();
    let router = Router::new()
        .route("/health", get(health))
        .merge(crate::proxy::routes(&state.config))
        .merge(crate::admin::routes())
        .merge(crate::web::routes())
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
            ]))
    } else {
        router
    };
    router.with_state(state)
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

/// Serves on `listener` until `shutdown` resolves; then stops accepting, lets in-flight
/// requests (streams included) finish within `SHUTDOWN_GRACE_SECS`, stops the background
/// tasks and flushes pending user changes.
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let background = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(state.persistence.clone().run(background.clone()));
    tasks.spawn(crate::users::sweep::run(
        state.users.clone(),
        state.config.cli.pow_token_purge_hours,
        background.clone(),
    ));
    tasks.spawn(state.quotas.clone().run_refresh(background.clone()));
    tasks.close();

    let grace = state.config.shutdown_grace();
    tracing::info!(
        trusted_proxies = state.config.trusted_proxies(),
        "client addresses: {}",
        match state.config.trusted_proxies() {
            0 => "the TCP peer; X-Forwarded-For is ignored (TRUSTED_PROXIES=0)".to_string(),
            n => format!("entry {n} from the right of X-Forwarded-For (TRUSTED_PROXIES={n})"),
        }
    );
    let stop_accepting = CancellationToken::new();
    let app = router(state);
    // Nagle's algorithm would hold back small writes (an SSE event, a short JSON answer) for
    // up to ~40 ms waiting for the client's delayed ACK: every chunk must leave at once.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on a client connection");
        }
    });
    let server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(stop_accepting.clone().cancelled_owned());
    let mut server = tokio::spawn(async move { server.await });

    tokio::select! {
        res = &mut server => {
            background.cancel();
            tasks.wait().await;
            return res.map_err(std::io::Error::other)?;
        }
        _ = shutdown => {}
    }
    tracing::info!(
        grace_secs = grace.as_secs(),
        "shutting down: no new connections, waiting for in-flight requests"
    );
    stop_accepting.cancel();
    match tokio::time::timeout(grace, &mut server).await {
        Ok(res) => res.map_err(std::io::Error::other)??,
        Err(_) => {
            tracing::warn!(
                "in-flight requests did not finish within SHUTDOWN_GRACE_SECS; closing them"
            );
            server.abort();
        }
    }
    background.cancel();
    tasks.wait().await;
    tracing::info!("shutdown complete");
    Ok(())
}

/// Hands memory freed by a large operation (a bulk import, a listing of every user) back to
/// the system. glibc's allocator keeps freed heap mapped, so without this the process would
/// stay at its peak size; elsewhere this does nothing.
pub fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's own heap.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
