//! Public web pages: the service info page at `/` and user self-service at `/user`.
//!
//! (Skeleton: to be completed by the web-side work.)

use axum::Router;

use crate::app::AppState;

/// The public page routes.
pub fn routes() -> Router<AppState> {
    Router::new()
}
