//! The admin web UI under `/admin`: sign-in and sign-out (`/admin/login`, `/admin/logout`) and
//! the pages under `/admin/manage/...` (users list, create, detail and edit, import and export,
//! anti-abuse, upstream keys). Server-rendered, no JavaScript; every form carries a CSRF token that is checked
//! before anything changes. Handlers are thin: user changes go through [`crate::users`].
//!
//! Who may see these pages is decided by [`crate::auth::guard`] (the same `ADMIN_WHITELIST`
//! and lockout as the API); a browser without a session is redirected to the sign-in page.

mod list;

use std::collections::BTreeMap;
use std::net::IpAddr;

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde_json::{json, Value};

use super::AdminIdentity;
use crate::app::AppState;
use crate::auth::credentials::{sign_in_with_key, SignIn};
use crate::auth::{ClientIp, LockedOut};
use crate::users::ops::{parse_bulk, CreateRequest, OpsError, UserOps, UserPatch};
use crate::users::{fingerprint, now_ms, User, UserType};
use crate::web::form::{check_csrf, read_form, FormData};
use crate::web::templates::{html, message, pathseg, with_cookies};

/// Who fills in the sign-in form (there is no identity yet), for the CSRF binding.
const ANONYMOUS: &str = "anon";

/// True for paths that are admin *pages* (kept for callers of its old place).
pub fn is_page(path: &str) -> bool {
    crate::auth::routes::is_admin_page(path)
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
        .route("/admin/manage/users/new", get(new_form).post(create))
        .route("/admin/manage/users/{token}", get(user_detail).post(edit))
        .route("/admin/manage/users/{token}/{action}", post(user_action))
        .route(
            "/admin/manage/import",
            get(import_page).post(import_preview),
        )
        .route("/admin/manage/import/apply", post(import_apply))
        .route("/admin/manage/export", get(export))
        .route("/admin/manage/abuse", get(abuse))
        .route("/admin/manage/abuse/unlock", post(unlock))
        .route("/admin/manage/abuse/difficulty", post(set_difficulty))
        .route("/admin/manage/keys", get(keys_page))
        .route("/admin/manage/keys/recheck", post(keys_recheck))
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
        "key_configured": state.config.admin_key().is_some(),
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
    locked: Option<Extension<LockedOut>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let form = match read_form(body).await {
        Ok(form) => form,
        Err(refusal) => return refusal,
    };
    if let Some(r) = check_csrf(&state, &headers, ANONYMOUS, &form) {
        return r;
    }
    if let Some(Extension(LockedOut(secs))) = locked {
        return login_page(
            &state,
            &headers,
            StatusCode::TOO_MANY_REQUESTS,
            json!({ "locked_for": secs }),
        );
    }
    match sign_in_with_key(&state, ip, &headers, form.get("key").unwrap_or("")) {
        SignIn::SignedIn(cookie) => with_cookies(
            Redirect::to("/admin/manage/users").into_response(),
            [cookie],
        ),
        SignIn::Disabled => login_page(
            &state,
            &headers,
            StatusCode::FORBIDDEN,
            json!({ "error": "Sign-in with a key is disabled: set ADMIN_KEY on the server." }),
        ),
        SignIn::WrongKey => login_page(
            &state,
            &headers,
            StatusCode::UNAUTHORIZED,
            json!({ "error": "Wrong admin key. Check it and try again (repeated failures lock your address out for a while).", "locked_for": state.lockout.locked_for(ip) }),
        ),
    }
}

async fn logout(
    State(state): State<AppState>,
    Extension(id): Extension<AdminIdentity>,
    headers: HeaderMap,
    // Only its CSRF check matters: signing out takes no fields.
    CheckedForm(_): CheckedForm,
) -> Response {
    if let Some(s) = state.sessions.lookup(&headers) {
        state.sessions.destroy(&s.id);
    }
    tracing::info!(admin = id.who(), "admin signed out");
    with_cookies(
        Redirect::to("/admin/login?signed_out=1").into_response(),
        [state.sessions.clear_cookie()],
    )
}

/// A submitted admin form whose CSRF token has been checked for the signed-in admin; a
/// handler that takes it cannot forget the check. The rejection is the refusal page.
struct CheckedForm(FormData);

impl FromRequest<AppState> for CheckedForm {
    type Rejection = Response;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let who = req
            .extensions()
            .get::<AdminIdentity>()
            .map(|id| id.who().to_string());
        let headers = req.headers().clone();
        let form = read_form(req.into_body()).await?;
        // Admin pages always run behind `auth::guard`; without an identity nothing is accepted.
        let Some(who) = who else {
            return Err(crate::web::form::csrf_refusal());
        };
        match check_csrf(state, &headers, &who, &form) {
            Some(refusal) => Err(refusal),
            None => Ok(CheckedForm(form)),
        }
    }
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
        descending: f
            .get("dir")
            .map(|d| d == "desc")
            .unwrap_or(sort == list::SortBy::Created),
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
        m.insert(
            "allowedFamilies".into(),
            json!(u.allowed_families.as_ref().map(|l| l.join(", "))),
        );
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
    user_page(
        &state,
        &headers,
        &id,
        &token,
        StatusCode::OK,
        json!({ "notice": notice }),
    )
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

async fn export(
    State(state): State<AppState>,
    Extension(id): Extension<AdminIdentity>,
) -> Response {
    let mut users = state.users.list();
    users.sort_by(|a, b| {
        a.created_at
            .cmp(&b.created_at)
            .then_with(|| a.token.cmp(&b.token))
    });
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
    tracing::info!(
        admin = id.who(),
        users = users.len(),
        "admin exported users"
    );
    let name = format!(
        "attachment; filename=\"users-{}.json\"",
        chrono::Utc::now().format("%Y%m%d-%H%M%S")
    );
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
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
            "trustedProxies": c.trusted_proxies(),
            "maxIps": c.cli.max_ips_per_user,
            "autoBan": c.cli.max_ips_auto_ban,
            "pow": state.pow.as_ref().map(|p| json!({
                "difficulty": p.difficulty().label(),
                "work": p.difficulty().work_factor(),
            })),
        }),
    )
}

/// Changes `POW_DIFFICULTY_LEVEL` until the next restart; outstanding challenges stop working.
async fn set_difficulty(
    State(state): State<AppState>,
    Extension(id): Extension<AdminIdentity>,
    CheckedForm(form): CheckedForm,
) -> Response {
    let back = Some("/admin/manage/abuse");
    let Some(pow) = &state.pow else {
        return message(
            StatusCode::BAD_REQUEST,
            "Proof of work is off",
            "CAPTCHA_MODE is not proof_of_work, so there is no difficulty to change.",
            back,
        );
    };
    let chosen = match form.text("difficulty") {
        Some("custom") => form.text("custom").unwrap_or(""),
        Some(v) => v,
        None => "",
    };
    match crate::pow::Difficulty::parse(chosen) {
        Some(d) => {
            pow.set_difficulty(d);
            tracing::info!(admin = id.who(), difficulty = %d.label(), "admin changed the proof-of-work difficulty");
            Redirect::to("/admin/manage/abuse").into_response()
        }
        None => message(
            StatusCode::BAD_REQUEST,
            "Not a difficulty",
            &format!("{chosen:?} is not a difficulty: choose low, medium, high, extreme, or enter a positive whole number of hashes."),
            back,
        ),
    }
}

async fn unlock(
    State(state): State<AppState>,
    Extension(id): Extension<AdminIdentity>,
    CheckedForm(form): CheckedForm,
) -> Response {
    match form.text("ip").and_then(|ip| ip.parse::<IpAddr>().ok()) {
        Some(ip) => {
            state.lockout.unlock(ip);
            tracing::info!(admin = id.who(), %ip, "admin unlocked a locked-out address");
            Redirect::to("/admin/manage/abuse").into_response()
        }
        None => message(
            StatusCode::BAD_REQUEST,
            "Not an address",
            "The address to unlock is missing or is not an IP address.",
            Some("/admin/manage/abuse"),
        ),
    }
}

// ----- upstream keys -----

/// The upstream keys: every pool, each key by fingerprint (never in full) with its state.
async fn keys_page(
    State(state): State<AppState>,
    Extension(id): Extension<AdminIdentity>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let q = FormData::parse(query.unwrap_or_default().as_bytes());
    let fmt = crate::web::templates::format_ms;
    let with_keys = super::keys::providers_with_keys(&state);
    let mut providers: Vec<&str> = with_keys.iter().map(|p| p.service_name()).collect();
    providers.dedup();
    let pools: Vec<Value> = with_keys
        .into_iter()
        .map(|p| {
            let keys = &state.upstreams.provider(p).keys;
            let rows: Vec<Value> = keys
                .views()
                .into_iter()
                .map(|k| {
                    json!({
                        "fingerprint": k.fingerprint,
                        "state": k.state,
                        "until": k.rate_limited_until.map(fmt),
                        "families": k.families.map(|f| f.join(", ")),
                        "checked": k.last_checked.map(fmt),
                        "detail": k.detail,
                    })
                })
                .collect();
            json!({
                "label": super::keys::pool_label(p),
                "variable": keys.var(),
                "counts": keys.counts(),
                "keys": rows,
            })
        })
        .collect();
    page(
        &state,
        &headers,
        &id,
        StatusCode::OK,
        "admin_keys.html",
        json!({
            "pools": pools,
            "providers": providers,
            "checks": state.config.cli.check_keys,
            "notice": q.get("rechecking").map(|p| format!("Rechecking the keys of: {p}. States change as each check completes (checks are spaced); reload to see them.")),
        }),
    )
}

/// The "Recheck keys" button: the same action as `POST /admin/keys/recheck`.
async fn keys_recheck(
    State(state): State<AppState>,
    Extension(id): Extension<AdminIdentity>,
    CheckedForm(form): CheckedForm,
) -> Response {
    match super::keys::request_recheck(&state, form.text("provider")) {
        Ok(rechecking) => {
            tracing::info!(admin = id.who(), providers = ?rechecking, "asked for a key recheck");
            let mut s = url::form_urlencoded::Serializer::new(String::new());
            s.append_pair("rechecking", &rechecking.join(", "));
            Redirect::to(&format!("/admin/manage/keys?{}", s.finish())).into_response()
        }
        Err(e) => message(
            e.status,
            "Cannot recheck keys",
            &e.message,
            Some("/admin/manage/keys"),
        ),
    }
}

// ----- create and edit -----

fn ops(state: &AppState) -> UserOps<'_> {
    UserOps {
        users: &state.users,
        default_limits: &state.config.token_quotas,
    }
}

/// A user form, validated.
struct UserForm {
    kind: UserType,
    expires_at: Option<i64>,
    patch: UserPatch,
}

/// Longest family name accepted from the form.
const MAX_FAMILY_LEN: usize = 64;

fn valid_family(f: &str) -> bool {
    !f.is_empty()
        && f.len() <= MAX_FAMILY_LEN
        && f.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
}

/// Reads `<input type="datetime-local">` (taken as UTC) into epoch milliseconds.
fn parse_datetime_local(s: &str) -> Option<i64> {
    ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"]
        .iter()
        .find_map(|f| chrono::NaiveDateTime::parse_from_str(s, f).ok())
        .map(|d| d.and_utc().timestamp_millis())
}

/// Validates the create/edit form; errors name the field and say what to enter. The patch is
/// checked by [`UserPatch::parse`], the same validation as the REST API.
/// `creating`: a new temporary user must expire in the future; an existing one may keep a
/// past expiry (so an expired user can still be edited, e.g. given a note).
fn parse_user_form(form: &FormData, now: i64, creating: bool) -> Result<UserForm, String> {
    let kind = parse_kind(form.get("type").unwrap_or("normal"))
        .ok_or("type: choose normal, special or temporary")?;
    let mut expires_at = match form.text("expiresAt") {
        Some(s) => Some(
            parse_datetime_local(s)
                .ok_or("expiresAt: enter a date and time such as 2030-01-31T18:00 (UTC)")?,
        ),
        None => None,
    };
    if let Some(h) = form.text("expiresInHours") {
        let hours: i64 = h
            .parse()
            .ok()
            .filter(|h| (1..=24 * 365 * 10).contains(h))
            .ok_or("expires in (hours): enter a whole number of hours between 1 and 87600")?;
        expires_at = Some(now + hours * 3_600_000);
    }
    if kind == UserType::Temporary {
        match expires_at {
            None => return Err(
                "expiresAt: a temporary user needs an expiry; enter a date or a number of hours"
                    .into(),
            ),
            Some(e) if creating && e <= now => {
                return Err(
                    "expiresAt: the expiry of a temporary user must be in the future".into(),
                )
            }
            _ => {}
        }
    } else {
        // Only temporary users expire; a leftover date would only confuse.
        expires_at = None;
    }
    let mut limits = serde_json::Map::new();
    for (k, v) in form.pairs() {
        let Some(family) = k.strip_prefix("limit.") else {
            continue;
        };
        let v = v.trim();
        if v.is_empty() {
            continue;
        }
        let n: u64 = v.parse().map_err(|_| {
            format!(
                "tokenLimits.{family}: enter a whole number of tokens (0 = unlimited), not {v:?}"
            )
        })?;
        limits.insert(family.to_string(), json!(n));
    }
    if let Some(family) = form.text("newFamily") {
        let family = family.to_ascii_lowercase();
        if !valid_family(&family) {
            return Err(format!(
                "new family: {family:?} is not a family name; use lowercase letters, digits, '-', '_' or '.' (at most {MAX_FAMILY_LEN})"
            ));
        }
        let n: u64 = form
            .text("newLimit")
            .and_then(|v| v.parse().ok())
            .ok_or(format!(
                "tokenLimits.{family}: enter a whole number of tokens for the new family"
            ))?;
        limits.insert(family, json!(n));
    }
    let max_ips = match form.text("maxIps") {
        Some(v) => json!(v.parse::<u32>().map_err(|_| format!(
            "maxIps: enter a whole number of addresses, or leave it empty, not {v:?}"
        ))?),
        None => Value::Null,
    };
    let mut body = json!({
        "type": kind.as_str(),
        "nickname": form.text("nickname"),
        "adminNote": form.text("adminNote"),
        "maxIps": max_ips,
        "expiresAt": expires_at,
        "tokenLimits": limits,
    });
    // Only the edit page has the field; the new-user form leaves the list absent.
    if form.get("allowedFamilies").is_some() {
        let list: Option<Vec<String>> = form.text("allowedFamilies").map(|v| {
            v.split(',')
                .map(|f| f.trim().to_ascii_lowercase())
                .filter(|f| !f.is_empty())
                .collect()
        });
        body["allowedFamilies"] = json!(list);
    }
    let patch = UserPatch::parse(&body, "").map_err(|e| e.to_string())?;
    Ok(UserForm {
        kind,
        expires_at,
        patch,
    })
}

async fn new_form(
    State(state): State<AppState>,
    Extension(id): Extension<AdminIdentity>,
    headers: HeaderMap,
) -> Response {
    new_page(&state, &headers, &id, StatusCode::OK, json!({}))
}

fn new_page(
    state: &AppState,
    headers: &HeaderMap,
    id: &AdminIdentity,
    status: StatusCode,
    extra: Value,
) -> Response {
    let families: Vec<Value> = state
        .config
        .token_quotas
        .iter()
        .map(|(f, q)| json!({ "family": f, "limit": q }))
        .collect();
    let mut ctx = json!({ "families": families, "v": {} });
    if let (Some(ctx), Value::Object(extra)) = (ctx.as_object_mut(), extra) {
        ctx.extend(extra);
    }
    page(state, headers, id, status, "admin_user_new.html", ctx)
}

async fn create(
    State(state): State<AppState>,
    Extension(id): Extension<AdminIdentity>,
    headers: HeaderMap,
    CheckedForm(form): CheckedForm,
) -> Response {
    let parsed = match parse_user_form(&form, now_ms(), true) {
        Ok(p) => p,
        Err(msg) => {
            // Show the form again with what was entered, so nothing has to be retyped.
            let v: serde_json::Map<String, Value> = form
                .pairs()
                .iter()
                .filter(|(k, _)| !k.starts_with('_'))
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect();
            return new_page(
                &state,
                &headers,
                &id,
                StatusCode::BAD_REQUEST,
                json!({ "error": msg, "v": v }),
            );
        }
    };
    let ops = ops(&state);
    let user = ops.create(&CreateRequest {
        kind: parsed.kind,
        expires_at: parsed.expires_at,
        token_limits: None,
    });
    let user = match ops.upsert(&user.token, &parsed.patch) {
        Ok(u) => u,
        Err(e) => {
            tracing::error!(error = %e, "applying the new user's settings failed");
            user
        }
    };
    state.users.request_flush();
    tracing::info!(admin = id.who(), action = "create", user = %fingerprint(&user.token), kind = user.kind.as_str(), "admin created a user");
    Redirect::to(&format!(
        "/admin/manage/users/{}?done=created",
        pathseg(&user.token)
    ))
    .into_response()
}

async fn edit(
    State(state): State<AppState>,
    Extension(id): Extension<AdminIdentity>,
    Path(token): Path<String>,
    headers: HeaderMap,
    CheckedForm(form): CheckedForm,
) -> Response {
    if !state.users.contains(&token) {
        return not_found(&state, &headers, &id);
    }
    let parsed = match parse_user_form(&form, now_ms(), false) {
        Ok(p) => p,
        Err(msg) => {
            return user_page(
                &state,
                &headers,
                &id,
                &token,
                StatusCode::BAD_REQUEST,
                json!({ "error": msg }),
            )
        }
    };
    // An edit never creates: the user must still exist when the change is applied.
    let applied = state.users.update(&token, |u| parsed.patch.apply(u));
    if applied.is_none() {
        return not_found(&state, &headers, &id);
    }
    state.users.request_flush();
    tracing::info!(admin = id.who(), action = "edit", user = %fingerprint(&token), "admin edited a user");
    Redirect::to(&format!(
        "/admin/manage/users/{}?done=saved",
        pathseg(&token)
    ))
    .into_response()
}

/// For one user, what a scheduled refresh does for every user
/// ([`crate::quota::Quotas::refresh_limits`]).
fn refresh_user_quota(state: &AppState, token: &str) -> Result<User, OpsError> {
    state
        .users
        .update(token, |u| {
            state.quotas.refresh_limits(u);
            u.clone()
        })
        .ok_or(OpsError::NotFound)
}

async fn user_action(
    State(state): State<AppState>,
    Extension(id): Extension<AdminIdentity>,
    Path((token, action)): Path<(String, String)>,
    headers: HeaderMap,
    CheckedForm(form): CheckedForm,
) -> Response {
    let ops = ops(&state);
    let reason: Option<String> = form
        .text("reason")
        .map(|r| r.chars().filter(|c| !c.is_control()).take(500).collect());
    let (result, done) = match action.as_str() {
        "disable" => (ops.disable(&token, reason.as_deref()), "disabled"),
        "enable" => (ops.enable(&token), "enabled"),
        "clear-ips" => (ops.clear_ips(&token), "ips"),
        "reset-usage" => (ops.reset_usage(&token), "usage"),
        "refresh-quota" => (refresh_user_quota(&state, &token), "quota"),
        _ => {
            return message(
                StatusCode::NOT_FOUND,
                "Unknown action",
                "This action does not exist. Use the buttons on the user's page.",
                Some("/admin/manage/users"),
            )
        }
    };
    match result {
        Ok(_) => {
            state.users.request_flush();
            tracing::info!(admin = id.who(), action = %action, user = %fingerprint(&token), reason = reason.as_deref().unwrap_or(""), "admin action");
            Redirect::to(&format!(
                "/admin/manage/users/{}?done={done}",
                pathseg(&token)
            ))
            .into_response()
        }
        Err(_) => not_found(&state, &headers, &id),
    }
}

// ----- import -----

/// How long an uploaded import waits for "Apply" before it is forgotten.
const IMPORT_TTL_SECS: u64 = 15 * 60;

async fn import_page(
    State(state): State<AppState>,
    Extension(id): Extension<AdminIdentity>,
    headers: HeaderMap,
) -> Response {
    page(
        &state,
        &headers,
        &id,
        StatusCode::OK,
        "admin_import.html",
        json!({}),
    )
}

/// Reads the upload: the CSRF field and the file's bytes.
async fn read_upload(
    mut mp: Multipart,
) -> Result<(Option<String>, Option<String>, Vec<u8>), String> {
    let (mut csrf, mut name, mut data) = (None, None, Vec::new());
    loop {
        match mp.next_field().await {
            Ok(Some(field)) => match field.name() {
                Some(crate::admin::session::CSRF_FIELD) => {
                    csrf = field.text().await.ok();
                }
                Some("file") => {
                    name = field.file_name().map(|n| n.chars().take(200).collect());
                    data = field
                        .bytes()
                        .await
                        .map_err(|e| format!("The upload could not be read ({e}); try again."))?
                        .to_vec();
                }
                _ => {}
            },
            Ok(None) => return Ok((csrf, name, data)),
            Err(e) => {
                return Err(format!(
                    "The upload could not be read ({e}). Choose a JSON file and try again."
                ))
            }
        }
    }
}

/// Normalises an upload to `{"users": [...]}`: the API's export, or a bare array.
fn normalise_import(data: &[u8]) -> Result<Value, String> {
    let v: Value = serde_json::from_slice(data).map_err(|e| {
        format!("The file is not valid JSON ({e}). Upload the file the export produced.")
    })?;
    match v {
        Value::Array(users) => Ok(json!({ "users": users })),
        Value::Object(ref m) if m.contains_key("users") => Ok(v),
        _ => {
            Err("The file must be {\"users\": [...]} as exported, or a JSON array of users.".into())
        }
    }
}

async fn import_preview(
    State(state): State<AppState>,
    Extension(id): Extension<AdminIdentity>,
    headers: HeaderMap,
    mp: Multipart,
) -> Response {
    let upload = read_upload(mp).await;
    let csrf = upload.as_ref().ok().and_then(|(c, _, _)| c.clone());
    if !state
        .sessions
        .verify_csrf(&headers, id.who(), csrf.as_deref())
    {
        return crate::web::form::csrf_refusal();
    }
    let show = |status, preview: Value| {
        page(
            &state,
            &headers,
            &id,
            status,
            "admin_import.html",
            json!({ "preview": preview }),
        )
    };
    let (_, filename, data) = match upload {
        Ok(u) => u,
        Err(msg) => {
            return page(
                &state,
                &headers,
                &id,
                StatusCode::BAD_REQUEST,
                "admin_import.html",
                json!({ "error": msg }),
            )
        }
    };
    let body = match normalise_import(&data) {
        Ok(b) => b,
        Err(msg) => {
            return show(
                StatusCode::BAD_REQUEST,
                json!({ "filename": filename, "new": 0, "updated": 0, "errors": [msg] }),
            )
        }
    };
    let records = match parse_bulk(&body) {
        Ok(r) => r,
        Err(e) => {
            return show(
                StatusCode::BAD_REQUEST,
                json!({ "filename": filename, "new": 0, "updated": 0, "errors": [e.to_string()] }),
            )
        }
    };
    let mut seen = std::collections::HashSet::new();
    let (mut new, mut updated) = (0usize, 0usize);
    for r in &records {
        if seen.insert(r.token.as_str()) {
            if state.users.contains(&r.token) {
                updated += 1;
            } else {
                new += 1;
            }
        }
    }
    let (binding, _) = state.sessions.csrf_binding(&headers, id.who());
    let import_id = state.sessions.stash(&binding, body, IMPORT_TTL_SECS);
    show(
        StatusCode::OK,
        json!({ "id": import_id, "filename": filename, "new": new, "updated": updated, "errors": [] }),
    )
}

async fn import_apply(
    State(state): State<AppState>,
    Extension(id): Extension<AdminIdentity>,
    headers: HeaderMap,
    CheckedForm(form): CheckedForm,
) -> Response {
    let (binding, _) = state.sessions.csrf_binding(&headers, id.who());
    let Some(body) = form
        .text("id")
        .and_then(|i| state.sessions.take_stash(&binding, i))
    else {
        return page(
            &state,
            &headers,
            &id,
            StatusCode::GONE,
            "admin_import.html",
            json!({ "error": "This import preview has expired or was already applied. Upload the file again." }),
        );
    };
    // Validated again: the data is the same, but the rules must hold at the moment of change.
    let result = parse_bulk(&body).and_then(|records| {
        let new = records
            .iter()
            .filter(|r| !state.users.contains(&r.token))
            .count();
        ops(&state).upsert_bulk(records, |_| {}).map(|n| (n, new))
    });
    match result {
        Ok((n, new)) => {
            state.users.request_flush();
            tracing::info!(
                admin = id.who(),
                action = "import",
                users = n,
                new,
                "admin imported users"
            );
            page(
                &state,
                &headers,
                &id,
                StatusCode::OK,
                "admin_import.html",
                json!({ "notice": format!("Imported {n} users ({new} new).") }),
            )
        }
        Err(e) => page(
            &state,
            &headers,
            &id,
            StatusCode::BAD_REQUEST,
            "admin_import.html",
            json!({ "error": format!("Nothing was imported: {e}") }),
        ),
    }
}

/// Locked-out addresses and the seconds until each unlocks.
fn locked_addresses(state: &AppState) -> Vec<(IpAddr, u64)> {
    state
        .lockout
        .locked()
        .into_iter()
        .map(|l| (l.ip, l.retry_after_secs))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> FormData {
        FormData::from_pairs(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn temporary_users_need_a_future_expiry() {
        let now = 1_000_000;
        assert!(parse_user_form(&form(&[("type", "temporary")]), now, true).is_err());
        let f = parse_user_form(
            &form(&[("type", "temporary"), ("expiresInHours", "2")]),
            now,
            true,
        )
        .expect("valid");
        assert_eq!(f.expires_at, Some(now + 7_200_000));
        let past = form(&[("type", "temporary"), ("expiresAt", "1970-01-01T00:00")]);
        assert!(parse_user_form(&past, now, true).is_err());
        // An existing, expired temporary user can still be edited.
        assert_eq!(
            parse_user_form(&past, now, false)
                .expect("valid")
                .expires_at,
            Some(0)
        );
        // A normal user never keeps an expiry.
        let f = parse_user_form(
            &form(&[("type", "normal"), ("expiresInHours", "2")]),
            now,
            true,
        )
        .expect("valid");
        assert_eq!(f.expires_at, None);
    }

    #[test]
    fn limits_and_fields_are_validated() {
        let f = parse_user_form(
            &form(&[
                ("type", "special"),
                ("limit.turbo", "100"),
                ("limit.gpt4", ""),
                ("newFamily", "Claude"),
                ("newLimit", "5"),
                ("maxIps", "3"),
            ]),
            0,
            true,
        )
        .expect("valid");
        let limits = f.patch.token_limits.expect("limits");
        assert_eq!(limits.get("turbo"), Some(&100));
        assert_eq!(limits.get("claude"), Some(&5));
        assert!(!limits.contains_key("gpt4"));
        assert_eq!(f.patch.max_ips, Some(Some(3)));
        assert_eq!(f.patch.allowed_families, None);
        let f = parse_user_form(&form(&[("allowedFamilies", "Turbo, claude,")]), 0, true)
            .expect("valid");
        assert_eq!(
            f.patch.allowed_families,
            Some(Some(vec!["turbo".to_string(), "claude".to_string()]))
        );
        let f = parse_user_form(&form(&[("allowedFamilies", " ")]), 0, true).expect("valid");
        assert_eq!(f.patch.allowed_families, Some(None));
        assert!(parse_user_form(&form(&[("allowedFamilies", "gpt 4")]), 0, true).is_err());
        let e = parse_user_form(&form(&[("limit.turbo", "-1")]), 0, true)
            .err()
            .expect("error");
        assert!(e.contains("tokenLimits.turbo"));
        assert!(parse_user_form(&form(&[("maxIps", "many")]), 0, true).is_err());
        assert!(parse_user_form(&form(&[("type", "admin")]), 0, true).is_err());
        assert!(parse_user_form(&form(&[("nickname", &"x".repeat(81))]), 0, true).is_err());
    }

    #[test]
    fn imports_accept_export_or_array() {
        assert!(normalise_import(br#"{"users":[]}"#).is_ok());
        assert_eq!(
            normalise_import(br#"[{"token":"a"}]"#).expect("array")["users"][0]["token"],
            "a"
        );
        assert!(normalise_import(b"{}").is_err());
        assert!(normalise_import(b"nope").is_err());
    }
}
