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
use crate::users::ops::{
    parse_bulk, parse_bulk_bytes, parse_sort, CreateRequest, OpsError, UserOps, UserPatch,
};
use crate::users::{fingerprint, User};

/// The `/admin/users` routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/admin/users",
            get(list_users)
                .post(create_user)
                .put(upsert_users)
                .fallback(|| async { AdminError::method_not_allowed("GET, HEAD, POST, PUT") }),
        )
        .route(
            "/admin/users/{token}",
            get(get_user)
                .put(upsert_user)
                .delete(disable_user)
                .fallback(|| async { AdminError::method_not_allowed("GET, HEAD, PUT, DELETE") }),
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
        let AdminBody(bytes) = AdminBody::from_request(req, state).await?;
        let Some(bytes) = bytes else {
            return Ok(AdminJson(Value::Object(Map::new())));
        };
        serde_json::from_slice(&bytes)
            .map(AdminJson)
            .map_err(not_json)
    }
}

fn not_json(e: serde_json::Error) -> AdminError {
    AdminError::bad_request(format!("The request body is not valid JSON: {e}"))
}

/// The bytes of a request body sent as JSON (checked as [`AdminJson`] checks it, but not
/// parsed); `None` when it is empty or blank.
pub struct AdminBody(pub Option<Bytes>);

impl<S: Send + Sync> FromRequest<S> for AdminBody {
    type Rejection = AdminError;
    async fn from_request(req: Request, state: &S) -> Result<Self, AdminError> {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("").to_ascii_lowercase());
        let is_json = content_type.as_deref().map(|ct| {
            let essence = ct.split(';').next().unwrap_or("").trim();
            essence == "application/json" || essence.ends_with("+json")
        });
        let unsupported = || {
            AdminError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "The request body must be JSON sent with 'Content-Type: application/json' (got {}).",
                    content_type
                        .as_deref()
                        .map_or("no Content-Type".to_string(), |c| format!("{c:?}"))
                ),
            )
        };
        // A body declared as something else (a cross-site form sends text/plain,
        // x-www-form-urlencoded or multipart) is refused before it is read, even when empty.
        if is_json == Some(false) {
            return Err(unsupported());
        }
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
            // No body at all reads as none (`POST /admin/users` needs none).
            return Ok(AdminBody(None));
        }
        if is_json.is_none() {
            return Err(unsupported());
        }
        Ok(AdminBody(Some(bytes)))
    }
}

/// `{"<name>":[user,…],"count":n}`, written user by user into one buffer: no copy of the
/// users and no JSON tree, which for 100 000 users cost more time than the JSON itself.
struct UserListJson {
    buf: Vec<u8>,
    count: usize,
}

impl UserListJson {
    fn new(name: &str, capacity: usize) -> UserListJson {
        let mut buf = Vec::with_capacity(capacity);
        buf.extend_from_slice(b"{\"");
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(b"\":[");
        UserListJson { buf, count: 0 }
    }

    fn push(&mut self, u: &User) -> Result<(), serde_json::Error> {
        if self.count > 0 {
            self.buf.push(b',');
        }
        serde_json::to_writer(&mut self.buf, u)?;
        self.count += 1;
        Ok(())
    }

    fn finish(mut self) -> Response {
        self.buf
            .extend_from_slice(format!("],\"count\":{}}}", self.count).as_bytes());
        let body = if self.buf.len() >= LARGE_BODY {
            Bytes::from_owner(TrimOnDrop(self.buf))
        } else {
            Bytes::from(self.buf)
        };
        ([(header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}

/// From this size on, a response's buffer is returned to the system once it has been sent.
const LARGE_BODY: usize = 1 << 20;

/// A response body that, once sent and dropped, hands freed memory back to the system (with
/// [`crate::app::return_freed_memory`]). Trimming in the handler would come too early: the
/// largest allocation of a listing is its answer, freed only after the handler returned, and
/// glibc keeps a freed block of that size in the heap rather than unmapping it.
struct TrimOnDrop(Vec<u8>);

impl AsRef<[u8]> for TrimOnDrop {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for TrimOnDrop {
    fn drop(&mut self) {
        self.0 = Vec::new();
        crate::app::return_freed_memory();
    }
}

fn not_serialised(e: serde_json::Error) -> AdminError {
    tracing::error!(error = %e, "serialising users failed");
    AdminError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "The users could not be serialised; the server log has the details.",
    )
}

/// Roughly the JSON size of one user, to size a listing's buffer in one go.
const USER_JSON_BYTES: usize = 320;

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
    let tokens = ops(&state).sorted_tokens(&sort);
    let mut out = UserListJson::new("users", tokens.len() * USER_JSON_BYTES);
    for token in &tokens {
        // A user deleted since the tokens were taken is left out (and not counted).
        state
            .users
            .with_user(token, |u| out.push(u))
            .transpose()
            .map_err(not_serialised)?;
    }
    drop(tokens);
    // Memory is handed back once the answer has been sent (see `TrimOnDrop`).
    Ok(out.finish())
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

/// `PUT /admin/users` with `{"users":[…]}` → all-or-nothing bulk upsert, answered with
/// `{"upserted_users":[…],"count":n}`.
async fn upsert_users(
    State(state): State<AppState>,
    Admin(who): Admin,
    AdminBody(body): AdminBody,
) -> Result<Response, AdminError> {
    let body_len = body.as_ref().map_or(0, Bytes::len);
    let records = match body.as_deref().map(parse_bulk_bytes) {
        Some(Ok(records)) => records,
        Some(Err(Some(e))) => return Err(e.into()),
        // Not `{"users":[…]}` (or not JSON): parsed whole, to say what is wrong.
        Some(Err(None)) => {
            let v: Value =
                serde_json::from_slice(body.as_deref().unwrap_or(b"{}")).map_err(not_json)?;
            parse_bulk(&v)?
        }
        None => parse_bulk(&Value::Object(Map::new()))?,
    };
    drop(body);
    let ignored: Vec<String> = records
        .iter()
        .flat_map(|r| r.patch.ignored.iter().cloned())
        .take(20)
        .collect();
    // The answer is about as large as the request.
    let mut out = UserListJson::new("upserted_users", body_len + 64);
    let mut failed = None;
    let count = ops(&state).upsert_bulk(records, |u| {
        if let Err(e) = out.push(u) {
            failed.get_or_insert(e);
        }
    })?;
    state.users.request_flush();
    log_ignored(who.who(), &ignored);
    tracing::info!(admin = who.who(), count, "admin bulk-upserted users");
    if let Some(e) = failed {
        return Err(not_serialised(e));
    }
    // A large import parses into more memory than the users it creates: it is handed back
    // once the answer (as large as the request) has been sent (see `TrimOnDrop`).
    Ok(out.finish())
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
