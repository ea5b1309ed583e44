//! `/user/captcha` (`CAPTCHA_MODE=proof_of_work`): the page where a visitor's browser solves
//! an Argon2id challenge, its scripts (served from the binary, no CDN), and the JSON endpoints
//! `POST /user/captcha/challenge` and `POST /user/captcha/verify`, which issue or refresh a
//! temporary user token. The challenge rules live in [`crate::pow`].

use std::net::IpAddr;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::templates::html;
use crate::app::AppState;
use crate::auth::{secret_eq, ClientIp, LockedOut};
use crate::pow::{Challenge, Pow, PowError};
use crate::users::ops::{CreateRequest, UserOps};
use crate::users::{fingerprint, now_ms, UserType};

/// hash-wasm's Argon2 UMD build: npm `hash-wasm` 4.13.0, file `dist/argon2.umd.min.js`
/// (MIT, © Dani Biro; licence in `static/vendor/hash-wasm-LICENSE`), copied unchanged.
/// It defines `hashwasm.argon2id`, which the solver calls.
const ARGON2_JS: &str = include_str!("../../static/vendor/hash-wasm-argon2.umd.min.js");
/// Our solver: asks for a challenge, searches for a solution, sends it, shows the token.
const SOLVER_JS: &str = include_str!("../../static/captcha.js");

/// The captcha page runs our two scripts and compiles hash-wasm's WebAssembly; nothing else.
const CAPTCHA_CSP: &str = "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; connect-src 'self'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/user/captcha", get(page))
        .route("/user/captcha/argon2.js", get(argon2_js))
        .route("/user/captcha/solver.js", get(solver_js))
        .route("/user/captcha/challenge", post(challenge))
        .route("/user/captcha/verify", post(verify))
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn not_enabled() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "Proof-of-work tokens are not enabled on this proxy (CAPTCHA_MODE is not proof_of_work).",
    )
}

fn script(body: &'static str) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/javascript; charset=utf-8"),
            ),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=3600"),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response()
}

async fn argon2_js(State(state): State<AppState>) -> Response {
    if state.pow.is_none() {
        return not_enabled();
    }
    script(ARGON2_JS)
}

async fn solver_js(State(state): State<AppState>) -> Response {
    if state.pow.is_none() {
        return not_enabled();
    }
    script(SOLVER_JS)
}

async fn page(State(state): State<AppState>) -> Response {
    let Some(pow) = &state.pow else {
        return not_enabled();
    };
    let c = &state.config.cli;
    let mut resp = html(
        StatusCode::OK,
        "captcha.html",
        json!({
            "difficulty": pow.difficulty().label(),
            "work": pow.difficulty().work_factor(),
            "tokenHours": c.pow_token_hours,
            "maxIps": c.pow_token_max_ips,
            "timeoutMinutes": c.pow_challenge_timeout,
            "keyRequired": state.config.proxy_key().is_some(),
            "title": super::info::server_title(&state),
        }),
    );
    resp.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CAPTCHA_CSP),
    );
    resp
}

/// The largest challenge or verification body read (they are a few hundred bytes).
const BODY_LIMIT: usize = 16 * 1024;

/// Reads and parses a JSON body of at most [`BODY_LIMIT`] bytes; a non-JSON content type is
/// refused, which also refuses cross-site form posts (they cannot send JSON).
async fn parse<T: for<'de> Deserialize<'de>>(
    headers: &HeaderMap,
    body: Body,
) -> Result<T, Box<Response>> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return Err(Box::new(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Send the request as JSON (Content-Type: application/json).",
        )));
    }
    let body = axum::body::to_bytes(body, BODY_LIMIT).await.map_err(|_| {
        Box::new(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "The request body must be at most {} KB of JSON.",
                BODY_LIMIT / 1024
            ),
        ))
    })?;
    serde_json::from_slice(&body).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("Invalid request: {e}."),
        ))
    })
}

/// With `PROXY_KEY` set, the original also asked for it here.
fn key_ok(state: &AppState, presented: Option<&str>) -> bool {
    match state.config.proxy_key() {
        None => true,
        Some(k) => presented.is_some_and(|p| secret_eq(p, k)),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ChallengeRequest {
    action: String,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    proxy_key: Option<String>,
}

/// Whether `token` may be refreshed from `ip`: a refreshable temporary user (one that earned
/// its token by proof of work) whose addresses include `ip` or have room for it (then `ip` is
/// added).
fn refreshable(state: &AppState, token: &str, ip: IpAddr) -> bool {
    let ip = ip.to_string();
    state
        .users
        .update(token, |u| {
            let ok_kind = u.kind == UserType::Temporary
                && u.meta
                    .as_ref()
                    .and_then(|m| m.get("refreshable"))
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false);
            if !ok_kind {
                return false;
            }
            if u.ip.contains(&ip) {
                return true;
            }
            let limit = u.max_ips.unwrap_or(0) as usize;
            if limit == 0 || u.ip.len() < limit {
                u.ip.push(ip);
                return true;
            }
            false
        })
        .unwrap_or(false)
}

async fn challenge(
    State(state): State<AppState>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    locked: Option<Extension<LockedOut>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(pow) = state.pow.clone() else {
        return not_enabled();
    };
    let req: ChallengeRequest = match parse(&headers, body).await {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    if !key_ok(&state, req.proxy_key.as_deref()) {
        return error(StatusCode::UNAUTHORIZED, "Invalid proxy password.");
    }
    let token = match req.action.as_str() {
        "new" => None,
        "refresh" => {
            if let Some(Extension(LockedOut(secs))) = locked {
                return error(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("Too many failed attempts from your address; try again in {secs} s."),
                );
            }
            match req.refresh_token {
                Some(t) if refreshable(&state, &t, ip) => Some(t),
                _ => {
                    crate::auth::credentials::wrong_form_credential(&state, ip);
                    return error(
                        StatusCode::BAD_REQUEST,
                        "That token cannot be refreshed (unknown, not a proof-of-work token, purged, or its address limit is reached); request a new one.",
                    );
                }
            }
        }
        other => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("action must be \"new\" or \"refresh\", not {other:?}."),
            )
        }
    };
    let (challenge, signature) = pow.challenge(ip, token, now_ms());
    Json(json!({ "challenge": challenge, "signature": signature })).into_response()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VerifyRequest {
    challenge: Challenge,
    signature: String,
    solution: String,
    #[serde(default)]
    proxy_key: Option<String>,
}

async fn verify(
    State(state): State<AppState>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(pow) = state.pow.clone() else {
        return not_enabled();
    };
    let req: VerifyRequest = match parse(&headers, body).await {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    if req.solution.is_empty() || req.solution.len() > 64 {
        return error(
            StatusCode::BAD_REQUEST,
            "solution must be 1 to 64 characters.",
        );
    }
    if !key_ok(&state, req.proxy_key.as_deref()) {
        return error(StatusCode::UNAUTHORIZED, "Invalid proxy password.");
    }
    let now = now_ms();
    if let Err(e) = pow.precheck(&req.challenge, &req.signature, ip, now) {
        let status = if e == PowError::RateLimited {
            StatusCode::TOO_MANY_REQUESTS
        } else {
            StatusCode::BAD_REQUEST
        };
        return error(status, e.to_string());
    }
    if let Some(t) = &req.challenge.token {
        if !refreshable(&state, t, ip) {
            return error(
                StatusCode::BAD_REQUEST,
                "That token cannot be refreshed any more; request a new one.",
            );
        }
    }
    // Argon2id with the challenge's memory cost: off the async workers.
    let (challenge, solution) = (req.challenge, req.solution);
    let checked =
        tokio::task::spawn_blocking(move || (crate::pow::solves(&challenge, &solution), challenge))
            .await;
    let challenge = match checked {
        Ok((true, ch)) => ch,
        Ok((false, _)) => {
            pow.punish(ip, now);
            tracing::warn!(%ip, "wrong proof-of-work solution; address blocked for six hours");
            return error(StatusCode::BAD_REQUEST, PowError::WrongSolution.to_string());
        }
        Err(e) => {
            tracing::error!(error = %e, "proof-of-work verification task failed");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Internal error; try again.",
            );
        }
    };
    issue(&state, &pow, challenge, ip)
}

/// Refreshes the challenge's token, or creates a new temporary user.
fn issue(state: &AppState, _pow: &Pow, challenge: Challenge, ip: IpAddr) -> Response {
    let c = &state.config.cli;
    let hours_ms = i64::try_from(c.pow_token_hours.saturating_mul(3_600_000)).unwrap_or(i64::MAX);
    let expires = now_ms().saturating_add(hours_ms);
    if let Some(token) = challenge.token {
        let found = state.users.update(&token, |u| {
            u.expires_at = Some(expires);
            u.disabled_at = None;
            u.disabled_reason = None;
        });
        if found.is_none() {
            return error(
                StatusCode::BAD_REQUEST,
                "That token was purged meanwhile; request a new one.",
            );
        }
        tracing::info!(token = %fingerprint(&token), "proof-of-work token refreshed");
        return Json(json!({ "success": true, "token": token, "expiresAt": expires }))
            .into_response();
    }
    let ops = UserOps {
        users: &state.users,
        default_limits: &state.config.token_quotas,
    };
    let user = ops.create(&CreateRequest {
        kind: UserType::Temporary,
        expires_at: Some(expires),
        token_limits: None,
    });
    let max_ips = c.pow_token_max_ips;
    state.users.update(&user.token, |u| {
        u.ip = std::iter::once(ip.to_string()).collect();
        u.max_ips = Some(max_ips);
        let mut meta = serde_json::Map::new();
        meta.insert("refreshable".into(), json!(true));
        u.meta = Some(Box::new(meta));
    });
    tracing::info!(%ip, token = %fingerprint(&user.token), "proof-of-work token issued");
    Json(json!({ "success": true, "token": user.token, "expiresAt": expires })).into_response()
}
