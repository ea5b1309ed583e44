//! Administration: the `/admin/users` REST API and the admin web UI. Handlers are thin: they
//! extract arguments and call domain code in [`crate::users`].
//!
//! [`authorize`] is the one place that decides who is an administrator; it is called by the
//! gatekeeper for every `/admin` route. Today it knows the bearer `ADMIN_KEY`
//! ([`check_admin_key`]); cookie sessions and an external session validator plug in beside it.

pub mod api;

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

/// Decides whether a request to an `/admin` route comes from an administrator. A locked-out
/// address is refused (429) before any credential is looked at, even a correct one.
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
    let Some(expected) = state
        .config
        .cli
        .admin_key
        .as_ref()
        .filter(|k| !k.expose().is_empty())
    else {
        return Err(AdminError::unauthorized(
            "The admin API is disabled: set ADMIN_KEY on the server to enable it.",
        ));
    };
    match client_credential(headers) {
        Some(c) if secret_eq(c, expected.expose()) => Ok(AdminIdentity::AdminKey),
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
    Router::new().merge(api::routes())
}
