//! Errors as clients see them: the one place that turns a failure into an HTTP response.
//!
//! Proxy routes answer in the OpenAI shape `{"error":{"message","type","code"}}` (with a
//! top-level `"type":"error"` so Anthropic SDKs read it too); admin routes answer
//! `{"error":"…"}` as the original's admin API does. Internal causes go to the log, never to
//! the client.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error on a proxied (`/v1/...`) route.
#[derive(Debug, Clone)]
pub struct ProxyError {
    pub status: StatusCode,
    /// OpenAI error type, e.g. `invalid_request_error`, `authentication_error`,
    /// `permission_error`, `rate_limit_error`, `insufficient_quota`, `upstream_error`.
    pub kind: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
    /// Extra response headers (the rate-limit headers of a rate-limit refusal); boxed so that
    /// `Result<_, ProxyError>` stays small.
    pub headers: Option<Box<HeaderMap>>,
}

impl ProxyError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ProxyError {
            status,
            kind,
            message: message.into(),
            retry_after: None,
            headers: None,
        }
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", message)
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
    pub fn too_many(kind: &'static str, message: impl Into<String>, retry_after: u64) -> Self {
        ProxyError {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, kind, message)
        }
    }
    pub fn with_headers(mut self, headers: HeaderMap) -> Self {
        self.headers = Some(Box::new(headers));
        self
    }
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.kind,
            self.message
        )
    }
}

impl std::error::Error for ProxyError {}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let body = json!({
            "type": "error",
            "error": { "message": self.message, "type": self.kind, "code": self.kind },
        });
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(extra) = self.headers {
            for (name, value) in extra.iter() {
                resp.headers_mut().insert(name.clone(), value.clone());
            }
        }
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}

/// An error on an `/admin` API route: `{"error":"…"}`.
#[derive(Debug, Clone)]
pub struct AdminError {
    pub status: StatusCode,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl AdminError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        AdminError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "Not found")
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }
    /// 405 for a method the route does not have; `allow` lists those it has.
    pub fn method_not_allowed(allow: &'static str) -> Response {
        let mut resp = Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("Method not allowed here; this route accepts {allow}."),
        )
        .into_response();
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allow));
        resp
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(json!({ "error": self.message }))).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}
