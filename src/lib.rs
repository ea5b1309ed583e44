//! llm-gatekeeper: a gateway in front of OpenAI- and Anthropic-style LLM APIs that decides
//! who may use them. See `ARCHITECTURE.md` for the map of modules.

pub mod admin;
pub mod allocator;
pub mod app;
pub mod auth;
pub mod config;
pub mod error;
/// The old name of [`auth`], kept while other branches move over to it.
pub mod gatekeeper {
    pub use crate::auth::*;
}
pub mod google_oauth;
pub mod http1;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod policy;
pub mod pow;
pub mod providers;
pub mod proxy;
pub mod quota;
pub mod server;
pub mod sock;
pub mod timer;
pub mod users;
pub mod web;

pub use app::{router, serve, shutdown_signal, AppState};
pub use config::Config;
