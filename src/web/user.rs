//! User self-service at `/user`: a user enters their token (in a POST body, never in a URL)
//! and sees their type, usage and limits per model family, when quotas refresh, expiry and
//! their masked addresses; they may change their nickname when `ALLOW_NICKNAME_CHANGES` is
//! on. Every failed lookup counts toward the brute-force lockout.

use std::collections::BTreeSet;
use std::net::IpAddr;

use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use super::form::{check_csrf, FormData};
use super::templates::{html, with_cookies};
use crate::app::AppState;
use crate::auth::credentials::user_by_form_token;
use crate::auth::LockedOut;
use crate::users::{now_ms, User};

/// Who sent a public credential form: their address and, when it is locked out, the
/// [`LockedOut`] mark the gatekeeper set.
#[derive(Clone, Copy, Debug)]
pub struct FormClient {
    pub ip: IpAddr,
    pub locked: Option<LockedOut>,
}

/// The longest nickname a user may choose.
pub const NICKNAME_MAX: usize = 80;

/// Who fills in public forms, for the CSRF binding.
const PUBLIC: &str = "anon";

/// What the page shows about a user: never the token, addresses masked.
pub fn view(u: &User, now: i64) -> Value {
    let families: BTreeSet<&str> = u.token_counts.keys().chain(u.token_limits.keys()).collect();
    let families: Vec<Value> = families
        .into_iter()
        .map(|f| {
            let used = u.token_counts.get(f).copied().unwrap_or(0);
            let limit = u.token_limits.get(f).copied().unwrap_or(0);
            let cost = crate::quota::prices::format_usd(crate::quota::prices::cost_usd(f, used));
            json!({ "family": f, "used": used, "limit": limit, "left": limit.saturating_sub(used), "cost": cost })
        })
        .collect();
    json!({
        "nickname": u.nickname,
        "type": u.kind.as_str(),
        "promptCount": u.prompt_count,
        "createdAt": u.created_at,
        "lastUsedAt": u.last_used_at,
        "expiresAt": u.expires_at,
        "disabled": u.is_disabled(),
        "disabledReason": u.disabled_reason,
        "expired": u.is_expired(now),
        "ips": u.ip.iter().map(|ip| crate::net::mask(ip)).collect::<Vec<_>>(),
        "families": families,
    })
}

/// Checks a nickname a user chose: trimmed, at most [`NICKNAME_MAX`] characters, no control
/// characters; empty clears it.
pub fn clean_nickname(raw: &str) -> Result<Option<String>, String> {
    let n = raw.trim();
    if n.is_empty() {
        return Ok(None);
    }
    if n.chars().count() > NICKNAME_MAX {
        return Err(format!(
            "A nickname can be at most {NICKNAME_MAX} characters; yours has {}.",
            n.chars().count()
        ));
    }
    if n.chars().any(char::is_control) {
        return Err("A nickname cannot contain control characters (such as line breaks).".into());
    }
    Ok(Some(n.to_string()))
}

fn render(state: &AppState, headers: &HeaderMap, status: StatusCode, extra: Value) -> Response {
    let (binding, cookie) = state.sessions.csrf_binding(headers, PUBLIC);
    let mut ctx = json!({
        "csrf": state.sessions.csrf_token(&binding),
        "allow_nickname": state.config.cli.allow_nickname_changes,
        "nickname_max": NICKNAME_MAX,
        "refresh": super::info::refresh_description(state).0,
        "title": super::info::server_title(state),
        "show_costs": state.config.cli.show_token_costs,
        "captcha": state.pow.is_some(),
    });
    if let (Some(ctx), Value::Object(extra)) = (ctx.as_object_mut(), extra) {
        ctx.extend(extra);
    }
    with_cookies(html(status, "user.html", ctx), cookie)
}

/// `GET /user`: the lookup form.
pub fn form_page(state: &AppState, headers: &HeaderMap) -> Response {
    render(state, headers, StatusCode::OK, json!({}))
}

/// Finds the user for a submitted token, or the page explaining why not (lockout, unknown
/// token — which counts as a failed attempt).
fn find(
    state: &AppState,
    headers: &HeaderMap,
    client: FormClient,
    form: &FormData,
) -> Result<(String, User), Box<Response>> {
    if let Some(LockedOut(secs)) = client.locked {
        return Err(Box::new(render(
            state,
            headers,
            StatusCode::TOO_MANY_REQUESTS,
            json!({ "error": format!("Too many failed attempts from your address; try again in {secs} s.") }),
        )));
    }
    let token = form.text("token").unwrap_or("");
    match user_by_form_token(state, client.ip, token) {
        Some(u) => Ok((token.to_string(), u)),
        None => Err(Box::new(render(
            state,
            headers,
            StatusCode::UNAUTHORIZED,
            json!({ "error": "No user has this token. Check it and try again (repeated failures lock your address out for a while)." }),
        ))),
    }
}

/// `POST /user`: shows the user whose token was submitted.
pub async fn lookup(
    state: &AppState,
    headers: &HeaderMap,
    client: FormClient,
    form: &FormData,
) -> Response {
    if let Some(r) = check_csrf(state, headers, PUBLIC, form) {
        return r;
    }
    match find(state, headers, client, form) {
        Ok((token, u)) => render(
            state,
            headers,
            StatusCode::OK,
            json!({ "u": view(&u, now_ms()), "token": token }),
        ),
        Err(r) => *r,
    }
}

/// `POST /user/nickname`: changes the nickname of the user whose token was submitted.
pub async fn change_nickname(
    state: &AppState,
    headers: &HeaderMap,
    client: FormClient,
    form: &FormData,
) -> Response {
    if let Some(r) = check_csrf(state, headers, PUBLIC, form) {
        return r;
    }
    let (token, user) = match find(state, headers, client, form) {
        Ok(found) => found,
        Err(r) => return *r,
    };
    let now = now_ms();
    let page = |status, user: &User, msg: Value| {
        let mut extra = json!({ "u": view(user, now), "token": token });
        if let (Some(e), Value::Object(m)) = (extra.as_object_mut(), msg) {
            e.extend(m);
        }
        render(state, headers, status, extra)
    };
    if !state.config.cli.allow_nickname_changes {
        return page(
            StatusCode::FORBIDDEN,
            &user,
            json!({ "error": "Nickname changes are turned off on this proxy (ALLOW_NICKNAME_CHANGES=false)." }),
        );
    }
    if user.is_disabled() {
        return page(
            StatusCode::FORBIDDEN,
            &user,
            json!({ "error": "This token is disabled, so its nickname cannot be changed." }),
        );
    }
    let nickname = match clean_nickname(form.get("nickname").unwrap_or("")) {
        Ok(n) => n,
        Err(msg) => return page(StatusCode::BAD_REQUEST, &user, json!({ "error": msg })),
    };
    let updated = state.users.update(&token, |u| {
        u.nickname = nickname.as_deref().map(Box::from);
        u.clone()
    });
    state.users.request_flush();
    match updated {
        Some(u) => {
            tracing::info!(user = %crate::users::fingerprint(&token), "user changed their nickname at /user");
            page(StatusCode::OK, &u, json!({ "notice": "Nickname saved." }))
        }
        None => page(
            StatusCode::NOT_FOUND,
            &user,
            json!({ "error": "This user was deleted meanwhile." }),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nicknames() {
        assert_eq!(clean_nickname("  bob "), Ok(Some("bob".into())));
        assert_eq!(clean_nickname("  "), Ok(None));
        assert!(clean_nickname(&"x".repeat(81)).is_err());
        assert!(clean_nickname("a\nb").is_err());
    }

    #[test]
    fn view_masks_addresses_and_hides_token() {
        let mut u = User::new(
            "secret-token".into(),
            crate::users::UserType::Normal,
            Default::default(),
            0,
        );
        u.ip = ["10.20.30.40".to_string()].into();
        u.token_counts.insert("claude", 70);
        u.token_limits.insert("claude", 100);
        let v = view(&u, 0);
        assert_eq!(v["ips"][0], "10.20.xxx.xxx");
        assert_eq!(v["families"][0]["left"], 30);
        assert_eq!(v["families"][0]["cost"], "$0.0006");
        assert!(!v.to_string().contains("secret-token"));
    }
}
