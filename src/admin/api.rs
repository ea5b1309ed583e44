//! The `/admin/users` REST API, compatible with the original's admin scripts. Handlers are
//! thin: they extract arguments (with extractors whose rejections are [`AdminError`] JSON, not
//! axum's plain text), call [`crate::users::ops`], log who did what (never a full token), and
//! ask for a flush after every write.

use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, RawQuery, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::AdminIdentity;
use crate::app::AppState;
use crate::error::AdminError;
use crate::users::fingerprint;
use crate::users::ops::{parse_bulk, parse_sort, CreateRequest, OpsError, UserOps, UserPatch};

/// The `/admin/users` routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/admin/users",
            get(list_users).post(create_user).put(upsert_users),
        )
        .route(
            "/admin/users/{token}",
            get(get_user).put(upsert_user).delete(disable_user),
        )
}

impl From<OpsError> for AdminError {
    fn from(e: OpsError) -> AdminError {
        match e {
            OpsError::NotFound => AdminError::not_found(),
            OpsError::Invalid(m) => AdminError::bad_request(m),
        }
    }
}

fn ops(state: &AppState) -> UserOps<'_> {
    UserOps {
        users: &state.users,
        default_limits: &state.config.token_quotas,
    }
}

// ----- extractors -----

/// The administrator the gatekeeper admitted (it inserts [`AdminIdentity`] on every `/admin`
/// route); refuses with 401 if it is somehow missing, so a routing mistake fails closed.
pub struct Admin(pub AdminIdentity);

impl<S: Send + Sync> FromRequestParts<S> for Admin {
    type Rejection = AdminError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, AdminError> {
        parts
            .extensions
            .get::<AdminIdentity>()
            .cloned()
            .map(Admin)
            .ok_or_else(|| AdminError::unauthorized("Admin authentication required."))
    }
}

/// A JSON request body whose problems become 400 `{"error":…}`. An empty body reads as `{}`
/// (as the original's `express.json()` left it), so `POST /admin/users` needs no body.
pub struct AdminJson(pub Value);

impl<S: Send + Sync> FromRequest<S> for AdminJson {
    type Rejection = AdminError;
    async fn from_request(req: Request, state: &S) -> Result<Self, AdminError> {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("").to_ascii_lowercase());
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            let status = e.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                AdminError::new(
                    status,
                    "The request body is too large (limit: MAX_REQUEST_BODY_MB); split a bulk import into several requests.",
                )
            } else {
                AdminError::bad_request(format!("Could not read the request body: {}", e.body_text()))
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(AdminJson(Value::Object(Map::new())));
        }
        let is_json = content_type.as_deref().is_some_and(|ct| {
            let essence = ct.split(';').next().unwrap_or("").trim();
            essence == "application/json" || essence.ends_with("+json")
        });
        if !is_json {
            return Err(AdminError::bad_request(format!(
                "The request body must be JSON sent with 'Content-Type: application/json' (got {}).",
                content_type.as_deref().map_or("no Content-Type".to_string(), |c| format!("{c:?}"))
            )));
        }
        serde_json::from_slice(&bytes).map(AdminJson).map_err(|e| {
            AdminError::bad_request(format!("The request body is not valid JSON: {e}"))
        })
    }
}

/// The `{token}` path segment, refused with a JSON 400 when it cannot be decoded.
fn path_token(p: Result<Path<String>, PathRejection>) -> Result<String, AdminError> {
    p.map(|Path(t)| t)
        .map_err(|e| AdminError::bad_request(format!("token (in the path): {}", e.body_text())))
}

/// The values of one query parameter (`?sort=a,b&sort=c` gives two).
fn query_values(q: &Option<String>, name: &str) -> Vec<String> {
    q.as_deref()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn log_ignored(who: &str, ignored: &[String]) {
    if !ignored.is_empty() {
        tracing::warn!(
            admin = who,
            fields = ?ignored,
            "admin user update: unknown fields were ignored"
        );
    }
}

// ----- handlers -----

/// `GET /admin/users[?sort=field,field]` → `{"users":[…],"count":n}`.
async fn list_users(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
) -> Result<Response, AdminError> {
    let sort = parse_sort(&query_values(&q, "sort").join(","))?;
    let users = ops(&state).list(&sort);
    // Serialised straight from the users: a `json!` tree of 100 000 users would cost more
    // than the copy of the users itself.
    let resp = Json(UserList {
        count: users.len(),
        users: &users,
    })
    .into_response();
    drop(users);
    crate::app::return_freed_memory();
    Ok(resp)
}

#[derive(serde::Serialize)]
struct UserList<'a> {
    users: &'a [crate::users::User],
    count: usize,
}

#[derive(serde::Serialize)]
struct Upserted<'a> {
    upserted_users: &'a [crate::users::User],
    count: usize,
}

/// `GET /admin/users/{token}` → the user, or 404.
async fn get_user(
    State(state): State<AppState>,
    token: Result<Path<String>, PathRejection>,
) -> Result<Response, AdminError> {
    let token = path_token(token)?;
    Ok(Json(ops(&state).get(&token)?).into_response())
}

/// `POST /admin/users` → `{"token":"<uuid>"}`.
async fn create_user(
    State(state): State<AppState>,
    Admin(who): Admin,
    AdminJson(body): AdminJson,
) -> Result<Response, AdminError> {
    let req = CreateRequest::parse(&body)?;
    let user = ops(&state).create(&req);
    state.users.request_flush();
    tracing::info!(
        admin = who.who(),
        user = %fingerprint(&user.token),
        kind = user.kind.as_str(),
        "admin created a user"
    );
    Ok(Json(json!({ "token": user.token })).into_response())
}

/// `PUT /admin/users/{token}` → partial update (creating the user if absent); the path's token
/// wins over one in the body.
async fn upsert_user(
    State(state): State<AppState>,
    Admin(who): Admin,
    token: Result<Path<String>, PathRejection>,
    AdminJson(body): AdminJson,
) -> Result<Response, AdminError> {
    let token = path_token(token)?;
    let patch = UserPatch::parse(&body, "")?;
    let user = ops(&state).upsert(&token, &patch)?;
    state.users.request_flush();
    log_ignored(who.who(), &patch.ignored);
    tracing::info!(admin = who.who(), user = %fingerprint(&token), "admin upserted a user");
    Ok(Json(user).into_response())
}

/// `PUT /admin/users` with `{"users":[…]}` → all-or-nothing bulk upsert.
async fn upsert_users(
    State(state): State<AppState>,
    Admin(who): Admin,
    AdminJson(body): AdminJson,
) -> Result<Response, AdminError> {
    let records = parse_bulk(&body)?;
    let users = ops(&state).upsert_bulk(&records)?;
    state.users.request_flush();
    let ignored: Vec<String> = records
        .iter()
        .flat_map(|r| r.patch.ignored.iter().cloned())
        .take(20)
        .collect();
    log_ignored(who.who(), &ignored);
    tracing::info!(
        admin = who.who(),
        count = users.len(),
        "admin bulk-upserted users"
    );
    let resp = Json(Upserted {
        count: users.len(),
        upserted_users: &users,
    })
    .into_response();
    // A large import parses into far more memory than the users it creates; give it back.
    drop((users, records, body));
    crate::app::return_freed_memory();
    Ok(resp)
}

/// `DELETE /admin/users/{token}[?disabledReason=…]` → disables (does not delete) the user.
async fn disable_user(
    State(state): State<AppState>,
    Admin(who): Admin,
    token: Result<Path<String>, PathRejection>,
    RawQuery(q): RawQuery,
) -> Result<Response, AdminError> {
    let token = path_token(token)?;
    let reasons = query_values(&q, "disabledReason");
    if reasons.len() > 1 {
        return Err(AdminError::bad_request(
            "disabledReason: give it at most once",
        ));
    }
    let user = ops(&state).disable(&token, reasons.first().map(String::as_str))?;
    state.users.request_flush();
    tracing::info!(
        admin = who.who(),
        user = %fingerprint(&token),
        reason = user.disabled_reason.as_deref().unwrap_or(""),
        "admin disabled a user"
    );
    Ok(Json(user).into_response())
}
