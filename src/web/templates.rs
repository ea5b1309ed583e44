//! Server-rendered HTML: the minijinja environment with every template embedded at compile
//! time (`templates/*.html`, HTML auto-escaping on), the filters they use, and [`html`], which
//! turns a template and its context into a response with the security headers every page
//! carries.

use std::sync::OnceLock;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use minijinja::{Environment, Value};
use serde::Serialize;

/// Every template, by name. Names end in `.html`, which turns auto-escaping on.
const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("../../templates/base.html")),
    (
        "admin_base.html",
        include_str!("../../templates/admin_base.html"),
    ),
    ("message.html", include_str!("../../templates/message.html")),
    ("login.html", include_str!("../../templates/login.html")),
    ("index.html", include_str!("../../templates/index.html")),
    ("user.html", include_str!("../../templates/user.html")),
    (
        "admin_users.html",
        include_str!("../../templates/admin_users.html"),
    ),
    (
        "admin_user_new.html",
        include_str!("../../templates/admin_user_new.html"),
    ),
    (
        "admin_user.html",
        include_str!("../../templates/admin_user.html"),
    ),
    (
        "admin_import.html",
        include_str!("../../templates/admin_import.html"),
    ),
    (
        "admin_abuse.html",
        include_str!("../../templates/admin_abuse.html"),
    ),
    (
        "admin_keys.html",
        include_str!("../../templates/admin_keys.html"),
    ),
    ("blocked.html", include_str!("../../templates/blocked.html")),
    ("captcha.html", include_str!("../../templates/captcha.html")),
    (
        "info_unlock.html",
        include_str!("../../templates/info_unlock.html"),
    ),
];

/// The content security policy of every page: no scripts at all, inline styles only, forms
/// post only to us, and no framing (clickjacking).
const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

fn env() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        for (name, source) in TEMPLATES {
            if let Err(e) = env.add_template(name, source) {
                tracing::error!(template = name, error = %e, "a built-in template does not parse");
            }
        }
        env.add_filter("datetime", datetime);
        env.add_filter("num", num);
        env.add_filter("pathseg", pathseg);
        env
    })
}

/// Renders `name` with `ctx`. A rendering failure is a bug: it is logged and the client gets a
/// plain 500.
pub fn html(status: StatusCode, name: &str, ctx: impl Serialize) -> Response {
    let rendered = env()
        .get_template(name)
        .and_then(|t| match serde_json::to_value(&ctx) {
            Ok(v) => t.render(to_template_value(v)),
            Err(e) => Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                e.to_string(),
            )),
        });
    match rendered {
        Ok(body) => {
            let mut resp = (status, body).into_response();
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            h.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            );
            h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
            h.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            h.insert(
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            );
            resp
        }
        Err(e) => {
            tracing::error!(template = name, error = %e, "rendering a page failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "Internal error while rendering this page; the server log has the details.",
            )
                .into_response()
        }
    }
}

/// Converts JSON into a template value (minijinja is built without its `serde` feature).
fn to_template_value(v: serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(0.0))
            }
        }
        serde_json::Value::String(s) => Value::from(s),
        serde_json::Value::Array(a) => a.into_iter().map(to_template_value).collect(),
        serde_json::Value::Object(o) => {
            Value::from_pairs(o.into_iter().map(|(k, v)| (k, to_template_value(v))))
        }
    }
}

/// A simple page with a title and one message (errors, confirmations).
pub fn message(status: StatusCode, title: &str, message: &str, back: Option<&str>) -> Response {
    html(
        status,
        "message.html",
        serde_json::json!({ "title": title, "message": message, "back": back }),
    )
}

/// The page a browser from a `BLOCKED_ORIGINS` site gets: the message, then a redirect.
pub fn blocked_page(status: StatusCode, message: &str, redirect: &str) -> Response {
    html(
        status,
        "blocked.html",
        serde_json::json!({ "message": message, "redirect": redirect }),
    )
}

/// Adds `Set-Cookie` headers to a response.
pub fn with_cookies(mut resp: Response, cookies: impl IntoIterator<Item = String>) -> Response {
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(&c) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    resp
}

/// Epoch milliseconds as `2026-11-22 21:30 UTC`; nothing as "never".
pub fn datetime(v: Value) -> String {
    match i64::try_from(v.clone()) {
        Ok(ms) => format_ms(ms),
        Err(_) => "never".to_string(),
    }
}

/// Epoch milliseconds as `2026-11-22 21:30 UTC`.
pub fn format_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|d| d.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_else(|| "never".to_string())
}

/// A number with thousands separators: `1 234 567`.
fn num(v: Value) -> String {
    let Ok(n) = i64::try_from(v.clone()) else {
        return v.to_string();
    };
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push('\u{202f}');
        }
        out.push(c);
    }
    if n < 0 {
        out.insert(0, '-');
    }
    out
}

/// Percent-encodes a string for use as one URL path segment (user tokens in admin links).
pub fn pathseg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Formats a duration in seconds as `3d 4h 5m`.
pub fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h {m}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_parses() {
        let env = env();
        for (name, _) in TEMPLATES {
            assert!(env.get_template(name).is_ok(), "{name} parses");
        }
    }

    #[test]
    fn escapes_html() {
        let r = html(
            StatusCode::OK,
            "message.html",
            serde_json::json!({"title": "t", "message": "<script>x</script>"}),
        );
        assert_eq!(r.status(), StatusCode::OK);
        let rendered = env()
            .get_template("message.html")
            .and_then(|t| {
                t.render(to_template_value(
                    serde_json::json!({"title": "t", "message": "<script>x</script>"}),
                ))
            })
            .expect("renders");
        assert!(!rendered.contains("<script>"));
        assert!(rendered.contains("&lt;script&gt;"));
    }

    #[test]
    fn filters() {
        assert_eq!(pathseg("a b/c"), "a%20b%2Fc");
        assert_eq!(num(Value::from(1234567)), "1\u{202f}234\u{202f}567");
        assert_eq!(num(Value::from(12)), "12");
        assert_eq!(datetime(Value::from(())), "never");
        assert_eq!(format_ms(0), "1970-01-01 00:00 UTC");
        assert_eq!(human_duration(90061), "1d 1h 1m");
    }
}
