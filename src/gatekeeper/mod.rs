//! The gatekeeper: decides who may pass, for every route, in one default-deny middleware
//! ([`guard`]). Public routes are listed in [`UNAUTHENTICATED_ROUTES`]; `/admin` routes need an
//! admin identity; every other route is a proxied route and needs a client credential under the
//! configured `GATEKEEPER` mode.
//!
//! The outcome is stored in the request extensions as a [`Principal`] (proxied routes) or an
//! [`crate::admin::AdminIdentity`] (admin routes). Handlers never look at credentials.

pub mod lockout;
pub mod user_token;

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::app::AppState;
use crate::config::GatekeeperMode;
use crate::error::{AdminError, ProxyError};
use crate::net::{client_ip, in_list, ClientIp};
use crate::users::UserType;

/// Routes that need no credential. `/health` also bypasses the IP blacklist. (`/admin/login`
/// needs no credential either, but it stays in the admin zone so that `ADMIN_WHITELIST`
/// covers it; [`crate::admin::authorize`] lets it through.)
pub const UNAUTHENTICATED_ROUTES: &[&str] = &["/health", "/", "/user"];

/// Who is making a proxied request, as decided by the gatekeeper.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// `GATEKEEPER=none`: anyone, known only by address.
    Anonymous,
    /// Holder of `PROXY_KEY`.
    ProxyKey,
    /// Holder of `ADMIN_KEY` (passes in every mode, as in the original).
    Admin,
    /// A user of the user store.
    User { token: String, kind: UserType },
}

impl Principal {
    /// The user token, when the caller is a user.
    pub fn user_token(&self) -> Option<&str> {
        match self {
            Principal::User { token, .. } => Some(token),
            _ => None,
        }
    }
}

/// Constant-time comparison of a presented secret with the configured one.
pub fn secret_eq(presented: &str, expected: &str) -> bool {
    presented.as_bytes().ct_eq(expected.as_bytes()).into()
}

/// The client credential: `Authorization: Bearer …`, else `x-api-key` (Anthropic clients),
/// else `x-goog-api-key` (Google's SDKs; a `?key=` has been moved there by
/// [`move_query_key`]).
pub fn client_credential(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        let token = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .unwrap_or(v)
            .trim();
        if !token.is_empty() {
            return Some(token);
        }
    }
    ["x-api-key", GOOGLE_KEY_HEADER]
        .into_iter()
        .find_map(|name| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|s| !s.is_empty())
        })
}

/// The header Google's SDKs send their key in.
const GOOGLE_KEY_HEADER: &str = crate::providers::google_ai::KEY_HEADER;

/// Google's REST examples pass the key as `?key=` on proxied routes: this moves it out of the
/// URL into the `x-goog-api-key` header (unless one was sent) before anything else sees the
/// request, so that it is never logged with the URL nor forwarded, and is read like any
/// other credential header. Runs outside the trace layer (see `app::router`).
pub async fn move_query_key(mut req: Request) -> Request {
    let Some(query) = req.uri().query() else {
        return req;
    };
    if !matches!(zone(req.uri().path()), Zone::Proxy)
        || !url::form_urlencoded::parse(query.as_bytes())
            .any(|(k, _)| k == crate::providers::google_ai::KEY_QUERY)
    {
        return req;
    }
    let (key, rest) = crate::providers::google_ai::take_query_key(query);
    let path_and_query = match rest {
        Some(rest) => format!("{}?{rest}", req.uri().path()),
        None => req.uri().path().to_owned(),
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    match axum::http::Uri::from_parts(parts) {
        Ok(uri) => *req.uri_mut() = uri,
        // Cannot happen (the path came from a valid URI); refuse to keep the key in the URL.
        Err(_) => *req.uri_mut() = axum::http::Uri::from_static("/"),
    }
    if let Some(key) = key.and_then(|k| axum::http::HeaderValue::from_str(&k).ok()) {
        if !req.headers().contains_key(GOOGLE_KEY_HEADER) {
            req.headers_mut().insert(GOOGLE_KEY_HEADER, key);
        }
    }
    req
}

enum Zone {
    Health,
    Public,
    Admin,
    Proxy,
}

fn zone(path: &str) -> Zone {
    if path == "/health" {
        Zone::Health
    } else if UNAUTHENTICATED_ROUTES.contains(&path)
        || path.starts_with("/user/")
        || path.starts_with("/static/")
    {
        Zone::Public
    } else if path == "/admin" || path.starts_with("/admin/") {
        Zone::Admin
    } else {
        Zone::Proxy
    }
}

/// The default-deny middleware over the whole router. It first decides the client address
/// (the socket peer, or `TRUSTED_PROXIES` hops back in `X-Forwarded-For`) and stores it as
/// [`ClientIp`] for everything after it.
pub async fn guard(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request,
    next: Next,
) -> Response {
    let ip = client_ip(peer.ip(), req.headers(), state.config.cli.trusted_proxies);
    req.extensions_mut().insert(ClientIp(ip));
    let zone = zone(req.uri().path());
    if matches!(zone, Zone::Health) {
        return next.run(req).await;
    }
    if in_list(&state.config.ip_blacklist, ip) {
        let msg = "Forbidden: your address is blocked by this proxy (IP_BLACKLIST)";
        return match zone {
            Zone::Admin => AdminError::forbidden(msg).into_response(),
            _ => ProxyError::forbidden(msg).into_response(),
        };
    }
    match zone {
        Zone::Health | Zone::Public => next.run(req).await,
        Zone::Admin => {
            if !in_list(&state.config.admin_whitelist, ip) {
                return AdminError::forbidden("Forbidden (by ADMIN_WHITELIST)").into_response();
            }
            // Copies, because a `&Request` (its body is not `Sync`) cannot be held across an await.
            let (method, path, headers) = (
                req.method().clone(),
                req.uri().path().to_string(),
                req.headers().clone(),
            );
            match crate::admin::authorize(&state, ip, &method, &path, &headers).await {
                Ok(identity) => {
                    req.extensions_mut().insert(identity);
                    next.run(req).await
                }
                Err(resp) => resp,
            }
        }
        Zone::Proxy => match admit_client(&state, ip, req.headers()).await {
            Ok(principal) => {
                req.extensions_mut().insert(principal);
                next.run(req).await
            }
            Err(e) => e.into_response(),
        },
    }
}

/// Decides whether a proxied request may pass, counting failures toward the lockout.
async fn admit_client(
    state: &AppState,
    ip: std::net::IpAddr,
    headers: &HeaderMap,
) -> Result<Principal, ProxyError> {
    let mode = state.config.mode();
    let credential = client_credential(headers);
    if mode == GatekeeperMode::None && credential.is_none() {
        return Ok(Principal::Anonymous);
    }
    if let Some(secs) = state.lockout.refusal(ip).await {
        return Err(lockout_error(secs));
    }
    if let (Some(c), Some(admin)) = (credential, state.config.admin_key()) {
        if secret_eq(c, admin) {
            return Ok(Principal::Admin);
        }
    }
    match mode {
        // A credential that is not the admin key is simply ignored when nobody needs one.
        GatekeeperMode::None => Ok(Principal::Anonymous),
        GatekeeperMode::ProxyKey => {
            let expected = state.config.proxy_key().unwrap_or_default();
            match credential {
                Some(c) if secret_eq(c, expected) => Ok(Principal::ProxyKey),
                Some(_) => {
                    state.lockout.record_failure(ip);
                    Err(ProxyError::unauthorized(
                        "Invalid proxy key. Send the proxy's PROXY_KEY as 'Authorization: Bearer <key>' (or 'x-api-key').",
                    ))
                }
                None => Err(ProxyError::unauthorized(
                    "This proxy requires a key. Send it as 'Authorization: Bearer <key>' (or 'x-api-key').",
                )),
            }
        }
        GatekeeperMode::UserToken => match credential {
            Some(c) => user_token::admit(state, c, ip),
            None => Err(ProxyError::unauthorized(
                "This proxy requires a user token. Send it as 'Authorization: Bearer <token>' (or 'x-api-key').",
            )),
        },
    }
}

/// The refusal for a locked-out address.
pub fn lockout_error(retry_after_secs: u64) -> ProxyError {
    ProxyError::too_many(
        "rate_limit_error",
        format!(
            "Too many failed authentication attempts from your address; try again in {retry_after_secs} s."
        ),
        retry_after_secs,
    )
}

/// The same refusal for admin routes.
pub fn admin_lockout_error(retry_after_secs: u64) -> AdminError {
    AdminError {
        retry_after: Some(retry_after_secs),
        ..AdminError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "Too many failed authentication attempts from your address; try again in {retry_after_secs} s."
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn reads_bearer_then_x_api_key() {
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("k2"));
        assert_eq!(client_credential(&h), Some("k2"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k1"));
        assert_eq!(client_credential(&h), Some("k1"));
    }

    #[test]
    fn reads_google_key_header_last() {
        let mut h = HeaderMap::new();
        h.insert("x-goog-api-key", HeaderValue::from_static("g"));
        assert_eq!(client_credential(&h), Some("g"));
        h.insert("x-api-key", HeaderValue::from_static("k2"));
        assert_eq!(client_credential(&h), Some("k2"));
    }

    #[tokio::test]
    async fn query_key_moves_to_a_header() {
        let req = Request::builder()
            .uri("/proxy/google-ai/v1beta/models/g:streamGenerateContent?alt=sse&key=sec%2Bret")
            .body(axum::body::Body::empty())
            .unwrap();
        let req = move_query_key(req).await;
        assert_eq!(
            req.uri(),
            "/proxy/google-ai/v1beta/models/g:streamGenerateContent?alt=sse"
        );
        assert_eq!(req.headers()["x-goog-api-key"], "sec+ret");
        let req = Request::builder()
            .uri("/v1/models?key=k")
            .body(axum::body::Body::empty())
            .unwrap();
        let req = move_query_key(req).await;
        assert_eq!(req.uri(), "/v1/models");
        // Public and admin routes are left alone.
        let req = Request::builder()
            .uri("/user/lookup?key=k")
            .body(axum::body::Body::empty())
            .unwrap();
        assert_eq!(move_query_key(req).await.uri(), "/user/lookup?key=k");
    }

    #[test]
    fn secret_eq_compares_exactly() {
        assert!(secret_eq("abc", "abc"));
        assert!(!secret_eq("abc", "abd"));
        assert!(!secret_eq("ab", "abc"));
    }
}
