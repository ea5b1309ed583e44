//! Public web pages: the service info page at `/` (HTML, or JSON for `Accept:
//! application/json`) and user self-service at `/user`. Also home of the template engine and
//! form helpers the admin pages use. Handlers are thin: they read the request and call the
//! page functions of [`info`] and [`user`].

pub mod captcha;
pub mod form;
pub mod info;
pub mod templates;
pub mod user;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};

use crate::app::AppState;
use crate::net::ClientIp;
use form::FormData;

/// The public page routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/user", get(user_form).post(user_lookup))
        .route("/user/nickname", post(user_nickname))
        .merge(captcha::routes())
}

/// `GET /`: the service info page, a bare 200 with `STATIC_SERVICE_INFO=true`.
async fn index(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if state.config.cli.static_service_info {
        return StatusCode::OK.into_response();
    }
    let info = info::service_info(&state, &headers);
    if info::wants_json(&headers) {
        return Json(info).into_response();
    }
    templates::html(
        StatusCode::OK,
        "index.html",
        serde_json::json!({ "info": info }),
    )
}

async fn user_form(State(state): State<AppState>, headers: HeaderMap) -> Response {
    user::form_page(&state, &headers)
}

async fn user_lookup(
    State(state): State<AppState>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    user::lookup(&state, &headers, ip, &FormData::parse(&body)).await
}

async fn user_nickname(
    State(state): State<AppState>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    user::change_nickname(&state, &headers, ip, &FormData::parse(&body)).await
}
