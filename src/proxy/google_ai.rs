//! The Google AI (Gemini) routes under `{PROXY_ENDPOINT_ROUTE}/google-ai`: the native
//! `models/{model}:generateContent` / `:streamGenerateContent` (under `v1beta` and `v1`), the
//! model list, and `v1/chat/completions` for OpenAI-format clients (translated). Parses the
//! path into a [`Route`] and hands it to the forwarder; the wire details are
//! [`crate::providers::google_ai`]'s.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use bytes::{Bytes, BytesMut};
use serde_json::Value;

use super::forward::{self, Route};
use crate::app::AppState;
use crate::error::ProxyError;
use crate::providers::google_ai::{self, Version};
use crate::providers::translate::adapter::OpenAiChatTo;
use crate::providers::{Api, BadRequest, PathModel, Provider, StreamTransform, Translation};

/// One route for everything under `…/google-ai/`, dispatched by [`dispatch`] (a Gemini path
/// segment holds `{model}:{method}`, which the router's patterns do not separate, and one
/// catch-all keeps every unknown path a JSON 404).
pub fn routes(prefix: &str) -> Router<AppState> {
    Router::new().route(&format!("{prefix}/google-ai/{{*rest}}"), any(dispatch))
}

async fn dispatch(
    State(state): State<AppState>,
    Path(rest): Path<String>,
    req: Request,
) -> Response {
    let segments: Vec<&str> = rest.split('/').collect();
    let method = req.method().clone();
    match segments.as_slice() {
        ["v1", "chat", "completions"] if method == Method::POST => {
            chat_completions(state, req).await
        }
        [v, "models"] if method == Method::GET => models(state, v, req).await,
        [v, "models", model_method] if method == Method::POST => {
            generate(state, v, model_method, req).await
        }
        _ => unknown(req).await,
    }
}

fn version(v: &str) -> Result<Version, ProxyError> {
    Version::parse(v).ok_or_else(|| {
        ProxyError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("Unknown Gemini API version `{v}`: use v1beta or v1."),
        )
    })
}

/// `POST …/google-ai/{v1beta|v1}/models/{model}:{generateContent|streamGenerateContent}`.
async fn generate(state: AppState, v: &str, model_method: &str, mut req: Request) -> Response {
    let version = match version(v) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let (model, method) = match google_ai::parse_model_method(model_method) {
        Ok(m) => m,
        Err(msg) => return ProxyError::bad_request(msg).into_response(),
    };
    // The client's query (alt=sse) follows the path; its `key`, if any, is already gone.
    let path = format!("/{}/models/{model}:{}", version.as_str(), method.as_str());
    req.extensions_mut().insert(PathModel(model));
    let route = Route {
        provider: Provider::GoogleAi,
        api: if method.is_stream() {
            Api::GoogleAiStream
        } else {
            Api::GoogleAiGenerate
        },
        upstream_path: Some(Arc::from(path)),
        translation: None,
    };
    forward::forward(state, route, req).await
}

/// `GET …/google-ai/{v1beta|v1}/models`: the upstream's list, with an OpenAI-style `data`
/// beside Google's `models` so that both kinds of clients read it.
async fn models(state: AppState, v: &str, req: Request) -> Response {
    let version = match version(v) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let path = google_ai::models_path(version, req.uri().query());
    let route = Route {
        provider: Provider::GoogleAi,
        api: Api::GoogleAiOther,
        upstream_path: Some(Arc::from(path.as_str())),
        translation: Some(Arc::new(ModelList { path })),
    };
    forward::forward(state, route, req).await
}

/// `POST …/google-ai/v1/chat/completions`: OpenAI chat in, Gemini up, OpenAI chat back.
async fn chat_completions(state: AppState, req: Request) -> Response {
    let route = Route {
        provider: Provider::GoogleAi,
        api: Api::GoogleAiGenerate,
        upstream_path: None,
        translation: Some(Arc::new(OpenAiChatTo::gemini())),
    };
    forward::forward(state, route, req).await
}

async fn unknown(req: Request) -> Response {
    ProxyError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!(
            "{} {} is not a Google AI route of this proxy: use …/google-ai/v1beta/models/{{model}}:generateContent (or :streamGenerateContent), …/google-ai/v1beta/models, or …/google-ai/v1/chat/completions.",
            req.method(),
            req.uri().path()
        ),
    )
    .into_response()
}

/// The model list's rewrite (a [`Translation`] only for its response side).
struct ModelList {
    path: String,
}

impl Translation for ModelList {
    fn request(&self, body: Value) -> Result<Value, BadRequest> {
        Ok(body)
    }
    fn upstream_path(&self) -> Option<String> {
        Some(self.path.clone())
    }
    fn response(&self, _stream: bool) -> Box<dyn StreamTransform> {
        Box::new(ModelListBack(BytesMut::new()))
    }
}

struct ModelListBack(BytesMut);

impl StreamTransform for ModelListBack {
    fn chunk(&mut self, chunk: Bytes) -> Bytes {
        self.0.extend_from_slice(&chunk);
        Bytes::new()
    }
    fn end(&mut self) -> Bytes {
        let body = std::mem::take(&mut self.0);
        match serde_json::from_slice::<Value>(&body) {
            Ok(v) => Bytes::from(google_ai::models_list(&v).to_string()),
            Err(_) => body.freeze(),
        }
    }
}
