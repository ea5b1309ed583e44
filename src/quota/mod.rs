//! Quotas and accounting: model families, per-user token quotas with atomic reservations,
//! exact usage read from upstream responses, quota refresh, and the prompt rate limit.
//!
//! The forwarder calls [`Quotas::admit`] for every generation request before forwarding it, and
//! feeds the response through the returned [`Ticket`]; dropping a ticket without
//! [`Ticket::finish`] (client disconnected) still charges an estimate.
//!
//! (Skeleton: to be completed by the quotas work.)

use std::net::IpAddr;
use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;

use crate::config::{Config, ConfigError};
use crate::error::ProxyError;
use crate::gatekeeper::Principal;
use crate::upstream::api::Api;
use crate::users::UserStore;

pub struct Quotas {
    #[allow(dead_code)]
    users: Arc<UserStore>,
}

/// What the forwarder knows about a generation request when it asks for admission.
pub struct AdmitRequest<'a> {
    pub principal: &'a Principal,
    pub ip: IpAddr,
    pub api: Api,
}

/// An admitted request.
pub struct Admitted {
    /// True when `admit` changed the body (e.g. asked the upstream for stream usage); the
    /// forwarder re-serialises it only then.
    pub body_changed: bool,
    /// Headers to add to the client's response (rate-limit headers).
    pub headers: HeaderMap,
    pub ticket: Ticket,
}

/// Observes one response and settles the request's reservation when it ends.
pub struct Ticket {}

impl Ticket {
    /// Called once with the upstream's status and whether the body is an SSE stream.
    pub fn on_response_start(&mut self, _status: StatusCode, _is_sse: bool) {}

    /// Called with every body chunk as it arrives; returns what the client should get
    /// (usually the chunk itself; a usage-only chunk the client did not ask for is removed).
    pub fn on_chunk(&mut self, chunk: Bytes) -> Bytes {
        chunk
    }

    /// Called when the upstream body ended normally.
    pub fn finish(self) {}
}

impl Quotas {
    pub fn from_config(_config: &Config, users: Arc<UserStore>) -> Result<Quotas, ConfigError> {
        Ok(Quotas { users })
    }

    /// Admits (or refuses) a generation request; may rewrite `body`.
    pub fn admit(
        &self,
        _req: &AdmitRequest<'_>,
        _body: &mut serde_json::Value,
    ) -> Result<Admitted, ProxyError> {
        Ok(Admitted {
            body_changed: false,
            headers: HeaderMap::new(),
            ticket: Ticket {},
        })
    }
}

impl Quotas {
    /// Refreshes quotas on the `QUOTA_REFRESH_PERIOD` schedule until `shutdown`.
    pub async fn run_refresh(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        shutdown.cancelled().await;
    }
}
