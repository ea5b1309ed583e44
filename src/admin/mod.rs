//! Administration: the `/admin/users` REST API and the admin web UI. Handlers are thin: they
//! extract arguments and call domain code in [`crate::users`].
//!
//! (Skeleton: to be completed by the per-user-tokens and web-side work.)

use std::net::IpAddr;

use axum::http::{HeaderMap, Method};
use axum::response::{IntoResponse, Response};
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

/// Decides whether a request to an `/admin` route comes from an administrator.
pub async fn authorize(
    state: &AppState,
    ip: IpAddr,
    _method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Result<AdminIdentity, Response> {
    if path == "/admin/login" {
        return Ok(AdminIdentity::AdminKey);
    }
    if let Some(secs) = state.lockout.locked_for(ip) {
        return Err(admin_lockout_error(secs).into_response());
    }
    let Some(expected) = state
        .config
        .cli
        .admin_key
        .as_ref()
        .filter(|k| !k.expose().is_empty())
    else {
        return Err(AdminError::unauthorized(
            "The admin API is disabled: set ADMIN_KEY on the server to enable it.",
        )
        .into_response());
    };
    match client_credential(headers) {
        Some(c) if secret_eq(c, expected.expose()) => Ok(AdminIdentity::AdminKey),
        Some(_) => {
            state.lockout.record_failure(ip);
            Err(AdminError::unauthorized("Invalid admin key.").into_response())
        }
        None => Err(AdminError::unauthorized(
            "Admin authentication required: send 'Authorization: Bearer <ADMIN_KEY>'.",
        )
        .into_response()),
    }
}

/// The `/admin` routes.
pub fn routes() -> Router<AppState> {
    Router::new()
}
