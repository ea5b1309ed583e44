//! Public web pages: the service info page at `/` (HTML, or JSON for `Accept:
//! application/json`) and user self-service at `/user`. Also home of the template engine and
//! form helpers the admin pages use. Handlers are thin: they read the request and call the
//! page functions of [`info`] and [`user`].

pub mod captcha;
pub mod form;
pub mod info;
pub mod templates;
pub mod user;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};

use crate::app::AppState;
use crate::auth::{ClientIp, LockedOut};
use form::read_form;
use user::FormClient;

/// The public page routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(index).post(unlock_info))
        .route("/user", get(user_form).post(user_lookup))
        .route("/user/nickname", post(user_nickname))
        .merge(captcha::routes())
}

/// The form that asks for `SERVICE_INFO_PASSWORD`.
fn unlock_page(
    state: &AppState,
    headers: &HeaderMap,
    status: StatusCode,
    error: Option<&str>,
) -> Response {
    let (binding, cookie) = state.sessions.csrf_binding(headers, "anon");
    let page = templates::html(
        status,
        "info_unlock.html",
        serde_json::json!({
            "csrf": state.sessions.csrf_token(&binding),
            "title": info::server_title(state),
            "error": error,
        }),
    );
    templates::with_cookies(page, cookie)
}

/// `GET /`: the service info page, a bare 200 with `STATIC_SERVICE_INFO=true`; behind
/// `SERVICE_INFO_PASSWORD` when it is set.
async fn index(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if state.config.cli.static_service_info {
        return StatusCode::OK.into_response();
    }
    if let Some(lock) = &state.info_lock {
        if !lock.unlocked(&headers) {
            if info::wants_json(&headers) {
                return (
                    StatusCode::UNAUTHORIZED,
                    Json(serde_json::json!({
                        "error": "The service info is password-protected (SERVICE_INFO_PASSWORD): open / in a browser and enter the password."
                    })),
                )
                    .into_response();
            }
            return unlock_page(&state, &headers, StatusCode::OK, None);
        }
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

/// `POST /`: the `SERVICE_INFO_PASSWORD` form. A wrong password counts toward the lockout.
async fn unlock_info(
    State(state): State<AppState>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    locked: Option<Extension<LockedOut>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(lock) = state.info_lock.clone() else {
        return axum::response::Redirect::to("/").into_response();
    };
    let form = match read_form(body).await {
        Ok(f) => f,
        Err(refusal) => return refusal,
    };
    if let Some(r) = form::check_csrf(&state, &headers, "anon", &form) {
        return r;
    }
    if let Some(Extension(LockedOut(secs))) = locked {
        let msg = format!("Too many failed attempts from your address; try again in {secs} s.");
        return unlock_page(&state, &headers, StatusCode::TOO_MANY_REQUESTS, Some(&msg));
    }
    if !lock.check(form.get("password").unwrap_or("")) {
        crate::auth::credentials::form_credential_failed(&state, ip);
        return unlock_page(
            &state,
            &headers,
            StatusCode::FORBIDDEN,
            Some("Incorrect password."),
        );
    }
    templates::with_cookies(
        axum::response::Redirect::to("/").into_response(),
        [lock.set_cookie()],
    )
}

async fn user_form(State(state): State<AppState>, headers: HeaderMap) -> Response {
    user::form_page(&state, &headers)
}

async fn user_lookup(
    State(state): State<AppState>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    locked: Option<Extension<LockedOut>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let client = FormClient {
        ip,
        locked: locked.map(|Extension(l)| l),
    };
    match read_form(body).await {
        Ok(form) => user::lookup(&state, &headers, client, &form).await,
        Err(refusal) => refusal,
    }
}

async fn user_nickname(
    State(state): State<AppState>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    locked: Option<Extension<LockedOut>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let client = FormClient {
        ip,
        locked: locked.map(|Extension(l)| l),
    };
    match read_form(body).await {
        Ok(form) => user::change_nickname(&state, &headers, client, &form).await,
        Err(refusal) => refusal,
    }
}
