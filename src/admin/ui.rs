//! The admin web UI under `/admin`: sign-in and sign-out (`/admin/login`, `/admin/logout`) and
//! the pages under `/admin/manage/...` (users list, create, detail and edit, import and export,
//! anti-abuse). Server-rendered, no JavaScript; every form carries a CSRF token that is checked
//! before anything changes. Handlers are thin: user changes go through [`crate::users`].
//!
//! Who may see these pages is decided by [`crate::admin::authorize`] in the gatekeeper (the
//! same `ADMIN_WHITELIST` and lockout as the API); a browser without a session is redirected
//! to the sign-in page.

mod list;

use std::collections::BTreeMap;
use std::net::IpAddr;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde_json::{json, Value};

use super::AdminIdentity;
use crate::app::AppState;
use crate::gatekeeper::secret_eq;
use crate::net::ClientIp;
use crate::users::{fingerprint, now_ms, User, UserType};
use crate::web::form::{check_csrf, FormData};
use crate::web::templates::{html, message, pathseg, with_cookies};

/// Who fills in the sign-in form (there is no identity yet), for the CSRF binding.
const ANONYMOUS: &str = "anon";

/// True for paths that are admin *pages* (a browser without a session is redirected to the
/// sign-in page instead of getting JSON).
pub fn is_page(path: &str) -> bool {
    path == "/admin"
        || path == "/admin/"
        || path == "/admin/logout"
        || path == "/admin/manage"
        || path.starts_with("/admin/manage/")
}

/// The admin UI routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin", get(home))
        .route("/admin/", get(home))
        .route("/admin/manage", get(home))
        .route("/admin/login", get(login_form).post(login))
        .route("/admin/logout", post(logout))
        .route("/admin/manage/users", get(users_list))
        .route("/admin/manage/users/{token}", get(user_detail))
        .route("/admin/manage/export", get(export))
        .route("/admin/manage/abuse", get(abuse))
}

async fn home() -> Redirect {
    Redirect::to("/admin/manage/users")
}

/// Renders an admin page: adds who is signed in and the CSRF token for this browser.
fn page(
    state: &AppState,
    headers: &HeaderMap,
    id: &AdminIdentity,
    status: StatusCode,
    template: &str,
    extra: Value,
) -> Response {
    let (binding, cookie) = state.sessions.csrf_binding(headers, id.who());
    let mut ctx = json!({ "who": id.who(), "csrf": state.sessions.csrf_token(&binding) });
    if let (Some(ctx), Value::Object(extra)) = (ctx.as_object_mut(), extra) {
        ctx.extend(extra);
    }
    with_cookies(html(status, template, ctx), cookie)
}

// ----- sign-in and sign-out -----

fn login_page(state: &AppState, headers: &HeaderMap, status: StatusCode, extra: Value) -> Response {
    let (binding, cookie) = state.sessions.csrf_binding(headers, ANONYMOUS);
    let mut ctx = json!({
        "csrf": state.sessions.csrf_token(&binding),
        "key_configured": state.config.cli.admin_key.as_ref().is_some_and(|k| !k.expose().is_empty()),
        "external": state.sessions.external_configured(),
    });
    if let (Some(ctx), Value::Object(extra)) = (ctx.as_object_mut(), extra) {
        ctx.extend(extra);
    }
    with_cookies(html(status, "login.html", ctx), cookie)
}

async fn login_form(
    State(state): State<AppState>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    if state.sessions.lookup(&headers).is_some() {
        return Redirect::to("/admin/manage/users").into_response();
    }
    let q = FormData::parse(query.unwrap_or_default().as_bytes());
    let mut extra = json!({ "locked_for": state.lockout.locked_for(ip) });
    if q.get("signed_out").is_some() {
        extra["notice"] = json!("You are signed out.");
    }
    login_page(&state, &headers, StatusCode::OK, extra)
}

async fn login(
    State(state): State<AppState>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = FormData::parse(&body);
    if let Err(r) = check_csrf(&state, &headers, ANONYMOUS, &form) {
        return r;
    }
    if let Some(secs) = state.lockout.locked_for(ip) {
        return login_page(
            &state,
            &headers,
            StatusCode::TOO_MANY_REQUESTS,
            json!({ "locked_for": secs }),
        );
    }
    let Some(expected) = state
        .config
        .cli
        .admin_key
        .as_ref()
        .filter(|k| !k.expose().is_empty())
    else {
        return login_page(
            &state,
            &headers,
            StatusCode::FORBIDDEN,
            json!({ "error": "Sign-in with a key is disabled: set ADMIN_KEY on the server." }),
        );
    };
    let presented = form.get("key").unwrap_or("");
    if presented.is_empty() || !secret_eq(presented, expected.expose()) {
        state.lockout.record_failure(ip);
        tracing::warn!(%ip, "admin sign-in with a wrong key");
        return login_page(
            &state,
            &headers,
            StatusCode::UNAUTHORIZED,
            json!({ "error": "Wrong admin key. Check it and try again (repeated failures lock your address out for a while).", "locked_for": state.lockout.locked_for(ip) }),
        );
    }
    if let Some(old) = state.sessions.lookup(&headers) {
        state.sessions.destroy(&old.id);
    }
    let cookie = state.sessions.create(AdminIdentity::AdminKey.who());
    tracing::info!(admin = "admin-key", %ip, "admin signed in");
    with_cookies(
        Redirect::to("/admin/manage/users").into_response(),
        [cookie],
    )
}

async fn logout(
    State(state): State<AppState>,
    Extension(id): Extension<AdminIdentity>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = FormData::parse(&body);
    if let Err(r) = check_csrf(&state, &headers, id.who(), &form) {
        return r;
    }
    if let Some(s) = state.sessions.lookup(&headers) {
        state.sessions.destroy(&s.id);
    }
    tracing::info!(admin = id.who(), "admin signed out");
    with_cookies(
        Redirect::to("/admin/login?signed_out=1").into_response(),
        [state.sessions.clear_cookie()],
    )
}

// ----- users list -----

fn user_row(u: &User, now: i64) -> Value {
    json!({
        "token": u.token,
        "href": format!("/admin/manage/users/{}", pathseg(&u.token)),
        "nickname": u.nickname,
        "type": u.kind.as_str(),
        "promptCount": u.prompt_count,
        "tokens": u.token_counts.values().fold(0u64, |a, b| a.saturating_add(*b)),
        "createdAt": u.created_at,
        "lastUsedAt": u.last_used_at,
        "disabled": u.is_disabled(),
        "expired": u.is_expired(now),
    })
}

fn parse_kind(s: &str) -> Option<UserType> {
    match s {
        "normal" => Some(UserType::Normal),
        "special" => Some(UserType::Special),
        "temporary" => Some(UserType::Temporary),
        _ => None,
    }
}

/// A users-list link with the current filter and some parameters changed.
fn list_href(q: &list::Query, sort: list::SortBy, descending: bool, page: usize) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    if !q.text.is_empty() {
        s.append_pair("q", &q.text);
    }
    if let Some(k) = q.kind {
        s.append_pair("type", k.as_str());
    }
    if !q.status.is_empty() {
        s.append_pair("status", &q.status);
    }
    s.append_pair("sort", sort.as_str());
    s.append_pair("dir", if descending { "desc" } else { "asc" });
    if q.per_page != list::DEFAULT_PER_PAGE {
        s.append_pair("per", &q.per_page.to_string());
    }
    s.append_pair("page", &page.to_string());
    format!("/admin/manage/users?{}", s.finish())
}

async fn users_list(
    State(state): State<AppState>,
    Extension(id): Extension<AdminIdentity>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let f = FormData::parse(query.unwrap_or_default().as_bytes());
    let sort = list::SortBy::parse(f.get("sort").unwrap_or("created"));
    let q = list::Query {
        text: f.get("q").unwrap_or("").trim().to_string(),
        kind: f.get("type").and_then(parse_kind),
        status: f.get("status").unwrap_or("").to_string(),
        sort,
        // Newest first unless asked otherwise.
        descending: f.get("dir").map(|d| d == "desc").unwrap_or(sort == list::SortBy::Created),
        page: f.get("page").and_then(|p| p.parse().ok()).unwrap_or(1),
        per_page: f
            .get("per")
            .and_then(|p| p.parse().ok())
            .unwrap_or(list::DEFAULT_PER_PAGE)
            .clamp(1, list::MAX_PER_PAGE),
    };
    let now = now_ms();
    let result = list::page(&state.users, &q, now);
    let columns: Vec<Value> = [
        (list::SortBy::Token, "Token", false),
        (list::SortBy::Nickname, "Nickname", false),
        (list::SortBy::Type, "Type", false),
        (list::SortBy::Prompts, "Prompts", true),
        (list::SortBy::Tokens, "Tokens", true),
        (list::SortBy::Created, "Created", false),
        (list::SortBy::LastUsed, "Last used", false),
    ]
    .into_iter()
    .map(|(col, label, numeric)| {
        let active = col == q.sort;
        let next_desc = if active { !q.descending } else { numeric };
        json!({
            "label": label,
            "href": list_href(&q, col, next_desc, 1),
            "numeric": numeric,
            "arrow": if active { if q.descending { "▼" } else { "▲" } } else { "" },
        })
    })
    .collect();
    let rows: Vec<Value> = result.users.iter().map(|u| user_row(u, now)).collect();
    page(
        &state,
        &headers,
        &id,
        StatusCode::OK,
        "admin_users.html",
        json!({
            "rows": rows,
            "columns": columns,
            "matched": result.matched,
            "total": result.total,
            "page": result.page,
            "pages": result.pages,
            "prev": (result.page > 1).then(|| list_href(&q, q.sort, q.descending, result.page - 1)),
            "next": (result.page < result.pages).then(|| list_href(&q, q.sort, q.descending, result.page + 1)),
            "f": { "q": q.text, "type": q.kind.map(|k| k.as_str()), "status": q.status,
                   "sort": q.sort.as_str(), "dir": if q.descending { "desc" } else { "asc" }, "per": q.per_page },
        }),
    )
}

// ----- one user -----

/// Every family the form should offer: the user's own plus the configured defaults.
fn families_of(state: &AppState, u: &User) -> Vec<Value> {
    let mut fams: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for f in state.config.token_quotas.keys() {
        fams.entry(f).or_default();
    }
    for (f, used) in &u.token_counts {
        fams.entry(f).or_default().0 = *used;
    }
    for (f, limit) in &u.token_limits {
        fams.entry(f).or_default().1 = *limit;
    }
    fams.into_iter()
        .map(|(f, (used, limit))| json!({ "family": f, "used": used, "limit": limit }))
        .collect()
}

fn user_view(state: &AppState, u: &User, now: i64) -> Value {
    let mut v = user_row(u, now);
    if let Some(m) = v.as_object_mut() {
        m.insert("ips".into(), json!(u.ip));
        m.insert("maxIps".into(), json!(u.max_ips));
        m.insert("adminNote".into(), json!(u.admin_note));
        m.insert("disabledAt".into(), json!(u.disabled_at));
        m.insert("disabledReason".into(), json!(u.disabled_reason));
        m.insert("expiresAt".into(), json!(u.expires_at));
        m.insert(
            "expiresLocal".into(),
            json!(u.expires_at.and_then(to_datetime_local)),
        );
        m.insert("families".into(), json!(families_of(state, u)));
        m.insert(
            "action".into(),
            json!(format!("/admin/manage/users/{}", pathseg(&u.token))),
        );
    }
    v
}

/// Epoch milliseconds as the value of an `<input type="datetime-local">` (UTC).
fn to_datetime_local(ms: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms).map(|d| d.format("%Y-%m-%dT%H:%M").to_string())
}

fn user_page(
    state: &AppState,
    headers: &HeaderMap,
    id: &AdminIdentity,
    token: &str,
    status: StatusCode,
    extra: Value,
) -> Response {
    let Some(u) = state.users.get(token) else {
        return not_found(state, headers, id);
    };
    let mut ctx = json!({ "u": user_view(state, &u, now_ms()) });
    if let (Some(ctx), Value::Object(extra)) = (ctx.as_object_mut(), extra) {
        ctx.extend(extra);
    }
    page(state, headers, id, status, "admin_user.html", ctx)
}

fn not_found(state: &AppState, headers: &HeaderMap, id: &AdminIdentity) -> Response {
    page(
        state,
        headers,
        id,
        StatusCode::NOT_FOUND,
        "admin_users.html",
        json!({ "error": "No user has this token; it may have been deleted.", "rows": [], "matched": 0, "total": state.users.len(), "page": 1, "pages": 1, "columns": [], "f": {} }),
    )
}

async fn user_detail(
    State(state): State<AppState>,
    Extension(id): Extension<AdminIdentity>,
    Path(token): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let q = FormData::parse(query.unwrap_or_default().as_bytes());
    let notice = q.get("done").map(done_message);
    user_page(&state, &headers, &id, &token, StatusCode::OK, json!({ "notice": notice }))
}

/// The confirmation shown after a redirect (`?done=...`), from a fixed list so that a link
/// cannot put arbitrary text on the page.
fn done_message(what: &str) -> &'static str {
    match what {
        "created" => "User created.",
        "saved" => "Changes saved.",
        "disabled" => "User disabled.",
        "enabled" => "User re-enabled.",
        "ips" => "IP addresses cleared.",
        "usage" => "Usage reset.",
        "quota" => "Quota refreshed.",
        _ => "Done.",
    }
}

// ----- export and anti-abuse -----

async fn export(State(state): State<AppState>, Extension(id): Extension<AdminIdentity>) -> Response {
    let mut users = state.users.list();
    users.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.token.cmp(&b.token)));
    let body = match serde_json::to_vec_pretty(&json!({ "users": users })) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "exporting users failed");
            return message(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Export failed",
                "The users could not be exported; the server log has the details.",
                Some("/admin/manage/import"),
            );
        }
    };
    tracing::info!(admin = id.who(), users = users.len(), "admin exported users");
    let name = format!(
        "attachment; filename=\"users-{}.json\"",
        chrono::Utc::now().format("%Y%m%d-%H%M%S")
    );
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&name) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    resp
}

async fn abuse(
    State(state): State<AppState>,
    Extension(id): Extension<AdminIdentity>,
    headers: HeaderMap,
) -> Response {
    let c = &state.config;
    let list = |l: &[ipnet::IpNet]| l.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    let locked: Vec<Value> = locked_addresses(&state)
        .into_iter()
        .map(|(ip, secs)| json!({ "ip": ip.to_string(), "secs": secs, "until": crate::web::templates::format_ms(now_ms() + (secs as i64) * 1000) }))
        .collect();
    page(
        &state,
        &headers,
        &id,
        StatusCode::OK,
        "admin_abuse.html",
        json!({
            "whitelist": list(&c.admin_whitelist),
            "blacklist": list(&c.ip_blacklist),
            "locked": locked,
            "maxFailures": c.cli.brute_force_max_failed_attempts,
            "ttl": c.cli.brute_force_ttl_seconds,
            "trustedProxies": c.cli.trusted_proxies,
            "maxIps": c.cli.max_ips_per_user,
            "autoBan": c.cli.max_ips_auto_ban,
        }),
    )
}

/// Locked-out addresses and the seconds until each unlocks.
fn locked_addresses(_state: &AppState) -> Vec<(IpAddr, u64)> {
    Vec::new()
}
