//! Credentials: reading the client's credential from its headers, comparing secrets in constant
//! time, and every check of one — the proxy key, a user token, the admin key (bearer or the
//! sign-in form), a session of the external service. Each wrong credential counts one failure
//! for the lockout, here and nowhere else; whether an address is locked out is asked once, by
//! [`crate::auth::guard`], before any of these runs.

use std::net::IpAddr;

use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Redirect, Response};
use constant_time_eq::constant_time_eq;

use super::session::External;
use super::{user_token, AdminIdentity, Principal};
use crate::app::AppState;
use crate::config::GatekeeperMode;
use crate::error::{AdminError, ProxyError};
use crate::http1::Lookup;
use crate::users::User;

/// Constant-time comparison of a presented secret with the configured one.
pub fn secret_eq(presented: &str, expected: &str) -> bool {
    constant_time_eq(presented.as_bytes(), expected.as_bytes())
}

/// The client credential: `Authorization: Bearer …` (the scheme in any case; a bare value
/// without a scheme is taken as is), else `x-api-key` (Anthropic clients), else
/// `x-goog-api-key` (Google's SDKs; a `?key=` has been moved there by [`move_query_key`]). An
/// `Authorization` header without a value (`Bearer `) does not hide an `x-api-key`.
pub fn client_credential<H: Lookup + ?Sized>(headers: &H) -> Option<&str> {
    if let Some(v) = headers
        .first(&header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        // `to_str` let through visible ASCII and tabs only, so the ASCII trim is the whole
        // trim (and, unlike `str::trim`, does not decode characters).
        let v = v.trim_ascii();
        // The scheme ends at the first ASCII whitespace, found by bytes (a split by `char`
        // decoded the value character by character).
        let token = match v.bytes().position(|b| b.is_ascii_whitespace()) {
            Some(i) if v[..i].eq_ignore_ascii_case("bearer") => v[i..].trim_ascii(),
            None if v.eq_ignore_ascii_case("bearer") => "",
            _ => v,
        };
        if !token.is_empty() {
            return Some(token);
        }
    }
    [
        &crate::providers::anthropic::AUTH_HEADER,
        &crate::providers::google_ai::AUTH_HEADER,
    ]
    .into_iter()
    .find_map(|name| {
        headers
            .first(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim_ascii)
            .filter(|s| !s.is_empty())
    })
}

/// The header Google's SDKs send their key in.
const GOOGLE_KEY_HEADER: &str = crate::providers::google_ai::KEY_HEADER;

/// Google's REST examples pass the key as `?key=`: on proxied routes this moves it out of the
/// URL into the `x-goog-api-key` header (unless one was sent) before anything else sees the
/// request, so that it is read like any other credential header and never forwarded with the
/// query. Runs outermost, before routing (see `app::router`).
pub async fn move_query_key(mut req: axum::extract::Request) -> axum::extract::Request {
    use crate::providers::google_ai::{take_query_key, KEY_QUERY};
    let Some(query) = req.uri().query() else {
        return req;
    };
    let path = req.uri().path();
    if super::routes::access(Some(path), path) != super::Access::Proxy
        || !url::form_urlencoded::parse(query.as_bytes()).any(|(k, _)| k == KEY_QUERY)
    {
        return req;
    }
    let (key, rest) = take_query_key(query);
    let path_and_query = match rest {
        Some(rest) => format!("{path}?{rest}"),
        None => path.to_owned(),
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    match axum::http::Uri::from_parts(parts) {
        Ok(uri) => *req.uri_mut() = uri,
        // Cannot happen (the path came from a valid URI); never keep the key in the URL.
        Err(_) => *req.uri_mut() = axum::http::Uri::from_static("/"),
    }
    if let Some(key) = key.and_then(|k| axum::http::HeaderValue::from_str(&k).ok()) {
        if !req.headers().contains_key(GOOGLE_KEY_HEADER) {
            req.headers_mut().insert(GOOGLE_KEY_HEADER, key);
        }
    }
    req
}

/// Decides whether a scraper may read `/metrics`: `Authorization: Bearer <METRICS_KEY>`,
/// compared in constant time. A wrong key counts toward the lockout (a missing one does not,
/// as with the proxy key).
pub fn admit_metrics(state: &AppState, ip: IpAddr, headers: &HeaderMap) -> Result<(), AdminError> {
    let Some(expected) = state.config.metrics_key() else {
        return Err(AdminError::not_found());
    };
    match bearer(headers) {
        Some(presented) if secret_eq(presented, expected) => Ok(()),
        Some(_) => {
            state.lockout.record_failure(ip);
            Err(AdminError::unauthorized(
                "Invalid metrics key. Scrapers send METRICS_KEY as 'Authorization: Bearer <METRICS_KEY>'.",
            ))
        }
        None => Err(AdminError::unauthorized(
            "/metrics needs the metrics key: send METRICS_KEY as 'Authorization: Bearer <METRICS_KEY>'.",
        )),
    }
}

/// The token of an `Authorization: Bearer …` header (the scheme in any case).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = v.split_once(|c: char| c.is_ascii_whitespace())?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Decides whether a proxied request may pass under the `GATEKEEPER` mode, counting wrong
/// credentials toward the lockout.
pub fn admit_client<H: Lookup + ?Sized>(
    state: &AppState,
    ip: IpAddr,
    headers: &H,
) -> Result<Principal, ProxyError> {
    let mode = state.config.mode();
    let credential = client_credential(headers);
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

/// Decides whether a request to an `/admin` route comes from an administrator: the
/// `ADMIN_KEY` as a Bearer credential ([`check_admin_key`]), a signed-in session cookie
/// (`/admin/login`), or a session accepted by `ADMIN_SESSION_VALIDATE_URL`. A browser
/// without a session asking for an admin page is sent to the sign-in page; API clients get
/// JSON.
pub async fn admit_admin(
    state: &AppState,
    ip: IpAddr,
    path: &str,
    headers: &HeaderMap,
) -> Result<(AdminIdentity, AdminVia), Response> {
    if client_credential(headers).is_some() {
        return check_admin_key(state, ip, headers)
            .map(|id| (id, AdminVia::Header))
            .map_err(IntoResponse::into_response);
    }
    if let Some(s) = state.sessions.lookup(headers) {
        let id = if s.who == AdminIdentity::AdminKey.who() {
            AdminIdentity::AdminKey
        } else {
            AdminIdentity::Session(s.who)
        };
        return Ok((id, AdminVia::Cookie));
    }
    let (answer, asked_now) = state.sessions.validate_external(headers).await;
    match answer {
        External::Valid(user) => {
            // The service was asked with the cookie only when no session token was sent.
            let via = if headers.contains_key("x-session-token") {
                AdminVia::Header
            } else {
                AdminVia::Cookie
            };
            return Ok((AdminIdentity::Session(user), via));
        }
        External::Rejected(why) => {
            // A session the service refuses is a wrong credential like a wrong key (once per
            // answer: a reused, cached rejection is not counted again).
            if asked_now {
                state.lockout.record_failure(ip);
            }
            tracing::info!(%ip, reason = %why, "admin session refused by ADMIN_SESSION_VALIDATE_URL");
        }
        External::Unavailable(why) => {
            tracing::warn!(%ip, reason = %why, "admin session refused: ADMIN_SESSION_VALIDATE_URL gave no usable answer");
        }
        External::NotConfigured | External::NoCredential => {}
    }
    if super::routes::is_admin_page(path) {
        return Err(Redirect::to("/admin/login").into_response());
    }
    if state.sessions.external_configured() {
        return Err(AdminError::unauthorized(
            "Admin authentication required: send 'Authorization: Bearer <ADMIN_KEY>' or a session accepted by ADMIN_SESSION_VALIDATE_URL (its cookie or 'X-Session-Token').",
        )
        .into_response());
    }
    check_admin_key(state, ip, headers)
        .map(|id| (id, AdminVia::Header))
        .map_err(IntoResponse::into_response)
}

/// How an administrator was recognised. A browser sends cookies to every site's requests on
/// its own, so a state change authenticated by a cookie alone must also prove it comes from
/// our pages (a CSRF token); a credential in a header cannot be sent by another site's form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminVia {
    /// `Authorization`/`x-api-key` or `X-Session-Token`.
    Header,
    /// Our session cookie, or the session service's cookie.
    Cookie,
}

/// The bearer check: `Authorization: Bearer <ADMIN_KEY>` (or `x-api-key`), compared in constant
/// time. A wrong key counts toward the brute-force lockout; a missing one does not (it is not
/// a guess). With no `ADMIN_KEY` configured every request is refused.
pub fn check_admin_key(
    state: &AppState,
    ip: IpAddr,
    headers: &HeaderMap,
) -> Result<AdminIdentity, AdminError> {
    let Some(expected) = state.config.admin_key() else {
        return Err(AdminError::unauthorized(
            "The admin API is disabled: set ADMIN_KEY on the server to enable it.",
        ));
    };
    match client_credential(headers) {
        Some(c) if secret_eq(c, expected) => Ok(AdminIdentity::AdminKey),
        Some(_) => {
            state.lockout.record_failure(ip);
            Err(AdminError::unauthorized(
                "Invalid admin key: send 'Authorization: Bearer <ADMIN_KEY>' with the server's ADMIN_KEY.",
            ))
        }
        None => Err(AdminError::unauthorized(
            "Admin authentication required: send 'Authorization: Bearer <ADMIN_KEY>'.",
        )),
    }
}

/// What the sign-in form's key check decided.
pub enum SignIn {
    /// The key is right: the `Set-Cookie` value of the new session.
    SignedIn(String),
    /// `ADMIN_KEY` is not set: sign-in with a key is off.
    Disabled,
    /// A wrong (or empty) key, counted for the lockout.
    WrongKey,
}

/// Checks the key typed into `/admin/login`; on success ends the browser's old session (if any)
/// and opens a new one.
pub fn sign_in_with_key(
    state: &AppState,
    ip: IpAddr,
    headers: &HeaderMap,
    presented: &str,
) -> SignIn {
    let Some(expected) = state.config.admin_key() else {
        return SignIn::Disabled;
    };
    if presented.is_empty() || !secret_eq(presented, expected) {
        state.lockout.record_failure(ip);
        tracing::warn!(%ip, "admin sign-in with a wrong key");
        return SignIn::WrongKey;
    }
    if let Some(old) = state.sessions.lookup(headers) {
        state.sessions.destroy(&old.id);
    }
    tracing::info!(admin = "admin-key", %ip, "admin signed in");
    SignIn::SignedIn(state.sessions.create(AdminIdentity::AdminKey.who()))
}

/// Counts a wrong credential typed into a form whose check lives with its page (the info
/// page's password, a captcha token to refresh): the forms feed the lockout only through here.
pub fn wrong_form_credential(state: &AppState, ip: IpAddr) {
    state.lockout.record_failure(ip);
}

/// The user of a token typed into a public form (`/user`); an unknown token counts as a failed
/// attempt for the lockout (an empty one does not: it is not a guess).
pub fn user_by_form_token(state: &AppState, ip: IpAddr, token: &str) -> Option<User> {
    if token.is_empty() {
        return None;
    }
    let user = state.users.get(token);
    if user.is_none() {
        state.lockout.record_failure(ip);
    }
    user
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn reads_bearer_then_x_api_key() {
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("\t k2 "));
        assert_eq!(client_credential(&h), Some("k2"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k1"));
        assert_eq!(client_credential(&h), Some("k1"));
    }

    #[test]
    fn empty_bearer_does_not_hide_x_api_key_and_scheme_case_does_not_matter() {
        let with = |auth: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("x-api-key", HeaderValue::from_static("k2"));
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(auth));
            h
        };
        for empty in ["Bearer ", "Bearer", "bearer   ", "BEARER"] {
            assert_eq!(client_credential(&with(empty)), Some("k2"), "{empty:?}");
        }
        for k1 in [
            "BEARER k1",
            "bearer k1",
            "BeArEr  k1 ",
            "Bearer\tk1",
            "k1",
            "\tBearer \t k1\t ",
            " k1\t",
        ] {
            assert_eq!(client_credential(&with(k1)), Some("k1"), "{k1:?}");
        }
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
        let req = |uri: &str| {
            axum::extract::Request::builder()
                .uri(uri)
                .body(axum::body::Body::empty())
                .unwrap()
        };
        let r = move_query_key(req(
            "/proxy/google-ai/v1beta/models/g:streamGenerateContent?alt=sse&key=sec%2Bret",
        ))
        .await;
        assert_eq!(
            r.uri(),
            "/proxy/google-ai/v1beta/models/g:streamGenerateContent?alt=sse"
        );
        assert_eq!(r.headers()["x-goog-api-key"], "sec+ret");
        let r = move_query_key(req("/v1/models?key=k")).await;
        assert_eq!(r.uri(), "/v1/models");
        // A header already sent wins; the query key still leaves the URL.
        let mut with_header = req("/v1/models?key=q");
        with_header
            .headers_mut()
            .insert("x-goog-api-key", HeaderValue::from_static("h"));
        let r = move_query_key(with_header).await;
        assert_eq!(r.uri().query(), None);
        assert_eq!(r.headers()["x-goog-api-key"], "h");
        // Public and admin routes are left alone.
        assert_eq!(
            move_query_key(req("/user?key=k")).await.uri(),
            "/user?key=k"
        );
        assert_eq!(
            move_query_key(req("/admin/users?key=k")).await.uri(),
            "/admin/users?key=k"
        );
    }

    #[test]
    fn secret_eq_compares_exactly() {
        assert!(secret_eq("abc", "abc"));
        assert!(!secret_eq("abc", "abd"));
        assert!(!secret_eq("ab", "abc"));
    }
}
