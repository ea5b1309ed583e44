//! Administration: the `/admin/users` REST API and the admin web UI. Handlers are thin: they
//! extract arguments and call domain code in [`crate::users`].
//!
//! (Skeleton: to be completed by the per-user-tokens and web-side work.)

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
/// `ADMIN_KEY` as a Bearer credential, a signed-in session cookie (`/admin/login`), or a
/// session accepted by `ADMIN_SESSION_VALIDATE_URL`. A browser without any of them asking for
/// an admin page is sent to the sign-in page; API clients get JSON.
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
    if let Some(secs) = state.lockout.locked_for(ip) {
        if page {
            return Err(Redirect::to("/admin/login").into_response());
        }
        return Err(admin_lockout_error(secs).into_response());
    }
    let admin_key = state
        .config
        .cli
        .admin_key
        .as_ref()
        .filter(|k| !k.expose().is_empty());
    if let Some(c) = client_credential(headers) {
        return match admin_key {
            Some(expected) if secret_eq(c, expected.expose()) => Ok(AdminIdentity::AdminKey),
            None => Err(AdminError::unauthorized(
                "Admin keys are disabled: set ADMIN_KEY on the server to use one.",
            )
            .into_response()),
            Some(_) => {
                state.lockout.record_failure(ip);
                Err(AdminError::unauthorized("Invalid admin key.").into_response())
            }
        };
    }
    if let Some(s) = state.sessions.lookup(headers) {
        return Ok(if s.who == "admin-key" {
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
    if admin_key.is_none() && !state.sessions.external_configured() {
        return Err(AdminError::unauthorized(
            "The admin API is disabled: set ADMIN_KEY on the server to enable it.",
        )
        .into_response());
    }
    Err(AdminError::unauthorized(
        "Admin authentication required: send 'Authorization: Bearer <ADMIN_KEY>' (or a session accepted by ADMIN_SESSION_VALIDATE_URL).",
    )
    .into_response())
}

/// The `/admin` routes.
pub fn routes() -> Router<AppState> {
    Router::new().merge(ui::routes())
}
