//! Upstreams: the providers, their key pools, and the streaming forwarder that relays a
//! client's request to OpenAI- or Anthropic-style APIs. Never reads the user store directly:
//! admission and accounting go through [`crate::quota`].
//!
//! (Skeleton: to be completed by the foundation work.)

pub mod api;

use axum::Router;

use crate::app::AppState;
use crate::config::Config;

/// Every configured provider with its key pool and HTTP client.
pub struct Upstreams {}

impl Upstreams {
    pub fn from_config(_config: &Config) -> Result<Upstreams, crate::config::ConfigError> {
        Ok(Upstreams {})
    }
}

/// The proxied routes (`/v1/...` and the `{PROXY_ENDPOINT_ROUTE}/...` aliases).
pub fn routes(_config: &Config) -> Router<AppState> {
    Router::new()
}
