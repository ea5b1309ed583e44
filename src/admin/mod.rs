//! Administration: the `/admin/users` REST API and the admin web UI. Handlers are thin: they
//! extract arguments and call domain code in [`crate::users`].
//!
//! [`authorize`] is the one place that decides who is an administrator; it is called by the
//! gatekeeper for every `/admin` route: the bearer `ADMIN_KEY` ([`check_admin_key`]), the
//! admin UI's session cookie ([`session`]) and the external session service.

pub mod api;
pub mod session;
pub mod ui;

use std::net::IpAddr;

use axum::http::{HeaderMap, Method};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Router;

use crate::app::AppState;
use crate::error::AdminError;
use crate::gatekeeper::{admin_lockout_error, client_credential, secret_eq};

/// Who is acting on an admin route, for the audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminIdentity {
    /// Authenticated with `ADMIN_KEY`.
    AdminKey,
    /// Authenticated by the external session service; holds its `user`.
    Session(String),
}

impl AdminIdentity {
    pub fn who(&self) -> &str {
        match self {
            AdminIdentity::AdminKey => "admin-key",
            AdminIdentity::Session(u) => u,
        }
    }
}

/// Decides whether a request to an `/admin` route comes from an administrator: the
/// `ADMIN_KEY` as a Bearer credential ([`check_admin_key`]), a signed-in session cookie
/// (`/admin/login`), or a session accepted by `ADMIN_SESSION_VALIDATE_URL`. A locked-out
/// address is refused (429) before any credential is looked at, even a correct one. A browser
/// without a session asking for an admin page is sent to the sign-in page; API clients get
/// JSON.
pub async fn authorize(
    state: &AppState,
    ip: IpAddr,
    _method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Result<AdminIdentity, Response> {
    if path == "/admin/login" {
        // The sign-in form checks the key, the lockout and CSRF itself.
        return Ok(AdminIdentity::AdminKey);
    }
    let page = ui::is_page(path);
    if let Some(secs) = state.lockout.refusal(ip).await {
        if page {
            return Err(Redirect::to("/admin/login").into_response());
        }
        return Err(admin_lockout_error(secs).into_response());
    }
    if client_credential(headers).is_some() {
        return check_admin_key(state, ip, headers).map_err(IntoResponse::into_response);
    }
    if let Some(s) = state.sessions.lookup(headers) {
        return Ok(if s.who == AdminIdentity::AdminKey.who() {
            AdminIdentity::AdminKey
        } else {
            AdminIdentity::Session(s.who)
        });
    }
    match state.sessions.validate_external(headers).await {
        session::External::Valid(user) => return Ok(AdminIdentity::Session(user)),
        session::External::Rejected(why) => {
            // Only an explicit session token counts as a guess: browsers send cookies unasked.
            if headers.contains_key("x-session-token") {
                state.lockout.record_failure(ip);
            }
            tracing::info!(%ip, reason = %why, "admin session refused by ADMIN_SESSION_VALIDATE_URL");
        }
        session::External::Unavailable(why) => {
            tracing::warn!(%ip, reason = %why, "admin session refused: ADMIN_SESSION_VALIDATE_URL gave no usable answer");
        }
        session::External::NotConfigured | session::External::NoCredential => {}
    }
    if page {
        return Err(Redirect::to("/admin/login").into_response());
    }
    if state.sessions.external_configured() {
        return Err(AdminError::unauthorized(
            "Admin authentication required: send 'Authorization: Bearer <ADMIN_KEY>' or a session accepted by ADMIN_SESSION_VALIDATE_URL (its cookie or 'X-Session-Token').",
        )
        .into_response());
    }
    check_admin_key(state, ip, headers).map_err(IntoResponse::into_response)
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

/// The `/admin` routes.
pub fn routes() -> Router<AppState> {
    Router::new().merge(api::routes()).merge(ui::routes())
}
