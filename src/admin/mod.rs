//! Administration: the `/admin/users` REST API, the upstream keys (`keys`) and the admin web UI. Handlers are thin: they
//! extract arguments and call domain code in [`crate::users`].
//!
//! Who is an administrator is decided by [`crate::auth`] before any handler here runs; it
//! inserts the [`AdminIdentity`] the handlers read.

pub mod api;
pub mod keys;
pub mod ui;

use axum::Router;

use crate::app::AppState;
/// Kept at their old paths for code that names them there.
pub use crate::auth::{session, AdminIdentity};

/// The `/admin` routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .merge(api::routes())
        .merge(ui::routes())
        .merge(keys::routes())
}
