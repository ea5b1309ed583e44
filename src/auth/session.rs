//! Admin web sessions: the signed session cookie issued at `/admin/login`, CSRF tokens for
//! every form, and the client of the external session service (`ADMIN_SESSION_VALIDATE_URL`).
//! Knows nothing of pages or of the user store.
//!
//! A session is a random id kept in a server-side table (so that signing out really ends it)
//! and sent to the browser as `id.signature`, the signature being HMAC-SHA256 over the id with
//! `SIGNING_KEY`. A forged or tampered cookie is refused before the table is consulted.
//!
//! CSRF tokens are HMAC-SHA256 over a *binding*: the session id for signed-in admins, or a
//! random per-browser nonce (the `gk_csrf` cookie) plus who is acting for everyone else. A form
//! token therefore only works for the browser it was rendered for; `SameSite=Strict` cookies
//! are a second line of defence.

use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use dashmap::DashMap;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use url::Url;

use crate::auth::secret_eq;
use crate::config::{Config, ConfigError};

/// The admin session cookie.
pub const SESSION_COOKIE: &str = "gk_session";
/// The per-browser CSRF nonce cookie (for forms shown without an admin session).
pub const CSRF_COOKIE: &str = "gk_csrf";
/// The form field that carries the CSRF token.
pub const CSRF_FIELD: &str = "_csrf";
/// How long a session lasts after sign-in.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// How long the external session service may take before the session is refused.
pub const VALIDATE_TIMEOUT: Duration = Duration::from_secs(5);
/// The most sessions kept at once; the table never grows past it.
const MAX_SESSIONS: usize = 10_000;
/// How long an answer of the session service (valid or rejected) is reused for the same
/// session: a page with a dozen admin requests costs the service one call, and a browser
/// sending a rejected cookie again is not asked about (nor counted) again at once.
pub const VALIDATE_CACHE_TTL: Duration = Duration::from_secs(10);
/// The most calls to the session service at once; a request beyond them is refused at once
/// (as if the service were unavailable) instead of piling up.
pub const MAX_VALIDATE_IN_FLIGHT: usize = 8;
/// The most cached answers kept.
const MAX_CACHED_ANSWERS: usize = 10_000;
/// The largest answer read from the external session service.
const MAX_VALIDATE_BODY: usize = 64 * 1024;

type HmacSha256 = Hmac<Sha256>;

/// One signed-in administrator.
#[derive(Clone, Debug)]
struct Session {
    who: String,
    expires: Instant,
}

/// A valid session found in a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRef {
    pub id: String,
    /// Who signed in (`admin-key`).
    pub who: String,
}

/// What the external session service said about a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum External {
    /// `ADMIN_SESSION_VALIDATE_URL` is not set.
    NotConfigured,
    /// The request carries neither a `Cookie` nor an `X-Session-Token` header to check.
    NoCredential,
    /// `200` with `{"valid": true, "user": "…"}`.
    Valid(String),
    /// The service said no (`valid: false`, or a 4xx): the presented session is wrong.
    Rejected(String),
    /// The service could not give a usable answer (timeout, unreachable, 5xx, malformed body).
    Unavailable(String),
}

/// Sessions, CSRF and the external session client; one per process, in `AppState`.
pub struct Sessions {
    mac: HmacSha256,
    secure: bool,
    table: DashMap<String, Session>,
    validate_url: Option<Url>,
    http: reqwest::Client,
    /// Recent answers of the session service, by a hash of the session presented.
    validate_cache: DashMap<[u8; 32], (External, Instant)>,
    /// Bounds the calls to the session service in flight.
    validate_slots: tokio::sync::Semaphore,
    /// Data waiting for a second, confirming form (an import preview), by random id.
    stash: DashMap<String, Stashed>,
}

/// One stashed value, usable only by the browser (CSRF binding) that stashed it.
struct Stashed {
    owner: String,
    expires: Instant,
    value: serde_json::Value,
}

/// The most stashed values kept at once.
const MAX_STASHED: usize = 8;

impl Sessions {
    /// Builds from `SIGNING_KEY` (or a random key), `USE_INSECURE_COOKIES` and
    /// `ADMIN_SESSION_VALIDATE_URL`.
    pub fn from_config(config: &Config) -> Result<Sessions, ConfigError> {
        let key: Vec<u8> = match config.cli.signing_key.as_ref() {
            Some(k) if !k.expose().is_empty() => k.expose().as_bytes().to_vec(),
            // The warning about it is part of the startup summary (`app::startup_summary`).
            _ => rand::random::<[u8; 32]>().to_vec(),
        };
        let mac = HmacSha256::new_from_slice(&key)
            .map_err(|e| ConfigError(format!("SIGNING_KEY cannot be used as a key: {e}")))?;
        if let Some(url) = &config.cli.admin_session_validate_url {
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                return Err(ConfigError(format!(
                    "ADMIN_SESSION_VALIDATE_URL={url} must be an http:// or https:// URL with a host, e.g. http://auth:5000/session/validate"
                )));
            }
        }
        let http = reqwest::Client::builder()
            .timeout(VALIDATE_TIMEOUT)
            .connect_timeout(VALIDATE_TIMEOUT)
            // A redirect is not a 200: refuse it rather than follow it somewhere else.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ConfigError(format!("cannot build the session-service client: {e}")))?;
        Ok(Sessions {
            mac,
            secure: !config.cli.use_insecure_cookies,
            table: DashMap::new(),
            validate_url: config.cli.admin_session_validate_url.clone(),
            validate_cache: DashMap::new(),
            validate_slots: tokio::sync::Semaphore::new(MAX_VALIDATE_IN_FLIGHT),
            http,
            stash: DashMap::new(),
        })
    }

    fn sign(&self, parts: &[&str]) -> String {
        let mut mac = self.mac.clone();
        for p in parts {
            mac.update(p.as_bytes());
            // A separator that cannot occur inside base64url or a session id keeps parts apart.
            mac.update(b"\x1f");
        }
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    /// Starts a session for `who` and returns its `Set-Cookie` value.
    pub fn create(&self, who: &str) -> String {
        self.make_room();
        let id = random_id();
        self.table.insert(
            id.clone(),
            Session {
                who: who.to_string(),
                expires: Instant::now() + SESSION_TTL,
            },
        );
        let value = format!("{id}.{}", self.sign(&["session", &id]));
        // Only the admin pages and API need it; no other route ever sees it.
        self.cookie(SESSION_COOKIE, &value, "/admin", SESSION_TTL.as_secs())
    }

    /// Drops expired sessions and, if the table is still full, the one closest to expiry.
    fn make_room(&self) {
        if self.table.len() < MAX_SESSIONS {
            return;
        }
        let now = Instant::now();
        self.table.retain(|_, s| s.expires > now);
        if self.table.len() >= MAX_SESSIONS {
            let oldest = self
                .table
                .iter()
                .min_by_key(|e| e.value().expires)
                .map(|e| e.key().clone());
            if let Some(id) = oldest {
                self.table.remove(&id);
            }
        }
    }

    /// The valid, unexpired session of this request, if any.
    pub fn lookup(&self, headers: &HeaderMap) -> Option<SessionRef> {
        let value = cookie(headers, SESSION_COOKIE)?;
        let (id, sig) = value.split_once('.')?;
        if !secret_eq(sig, &self.sign(&["session", id])) {
            return None;
        }
        let session = self.table.get(id)?.clone();
        if session.expires <= Instant::now() {
            self.table.remove(id);
            return None;
        }
        Some(SessionRef {
            id: id.to_string(),
            who: session.who,
        })
    }

    /// Ends a session (sign-out).
    pub fn destroy(&self, id: &str) {
        self.table.remove(id);
    }

    /// How many sessions are open (for tests and status).
    pub fn open_sessions(&self) -> usize {
        self.table.len()
    }

    /// The `Set-Cookie` value that removes the session cookie from the browser.
    pub fn clear_cookie(&self) -> String {
        self.cookie(SESSION_COOKIE, "", "/admin", 0)
    }

    /// A cookie with the flags every cookie of ours carries: `HttpOnly`, `SameSite=Strict`,
    /// and `Secure` unless `USE_INSECURE_COOKIES=true`.
    fn cookie(&self, name: &str, value: &str, path: &str, max_age: u64) -> String {
        let secure = if self.secure { "; Secure" } else { "" };
        format!("{name}={value}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}")
    }

    /// The CSRF binding of a request: the admin session when there is one, else the browser's
    /// nonce cookie and `who` (creating a nonce, to be set with the returned cookie, if the
    /// browser has none yet).
    pub fn csrf_binding(&self, headers: &HeaderMap, who: &str) -> (String, Option<String>) {
        if let Some(s) = self.lookup(headers) {
            return (format!("session:{}", s.id), None);
        }
        match cookie(headers, CSRF_COOKIE).filter(|n| is_id(n)) {
            Some(nonce) => (format!("nonce:{nonce}|{who}"), None),
            None => {
                let nonce = random_id();
                let set = self.cookie(CSRF_COOKIE, &nonce, "/", SESSION_TTL.as_secs());
                (format!("nonce:{nonce}|{who}"), Some(set))
            }
        }
    }

    /// The CSRF token to put in forms for `binding`.
    pub fn csrf_token(&self, binding: &str) -> String {
        self.sign(&["csrf", binding])
    }

    /// True when `presented` is the CSRF token for this request. A request without a binding
    /// cookie never passes (no nonce is created here).
    pub fn verify_csrf(&self, headers: &HeaderMap, who: &str, presented: Option<&str>) -> bool {
        let Some(presented) = presented.filter(|p| !p.is_empty()) else {
            return false;
        };
        let binding = if let Some(s) = self.lookup(headers) {
            format!("session:{}", s.id)
        } else {
            match cookie(headers, CSRF_COOKIE).filter(|n| is_id(n)) {
                Some(nonce) => format!("nonce:{nonce}|{who}"),
                None => return false,
            }
        };
        secret_eq(presented, &self.csrf_token(&binding))
    }

    /// Keeps `value` for `ttl_secs` for the browser with CSRF binding `owner`; returns its id.
    /// At most a few values are kept: the oldest is dropped to make room.
    pub fn stash(&self, owner: &str, value: serde_json::Value, ttl_secs: u64) -> String {
        let now = Instant::now();
        self.stash.retain(|_, s| s.expires > now);
        while self.stash.len() >= MAX_STASHED {
            let oldest = self
                .stash
                .iter()
                .min_by_key(|e| e.value().expires)
                .map(|e| e.key().clone());
            match oldest {
                Some(id) => {
                    self.stash.remove(&id);
                }
                None => break,
            }
        }
        let id = random_id();
        self.stash.insert(
            id.clone(),
            Stashed {
                owner: owner.to_string(),
                expires: now + Duration::from_secs(ttl_secs),
                value,
            },
        );
        id
    }

    /// Takes a stashed value back, if it exists, has not expired and belongs to `owner`.
    pub fn take_stash(&self, owner: &str, id: &str) -> Option<serde_json::Value> {
        let (_, s) = self
            .stash
            .remove_if(id, |_, s| secret_eq(&s.owner, owner))?;
        (s.expires > Instant::now()).then_some(s.value)
    }

    /// True when `ADMIN_SESSION_VALIDATE_URL` is set.
    pub fn external_configured(&self) -> bool {
        self.validate_url.is_some()
    }

    /// Asks the external session service about this request. Only `200` with
    /// `{"valid": true, "user": "<non-empty string>"}` admits; everything else is a refusal.
    /// Our own cookies are removed from the forwarded `Cookie` header: they are credentials
    /// for this proxy, not for the session service. A valid or rejected answer is reused for
    /// [`VALIDATE_CACHE_TTL`]; the second value is true when the service was asked now (so
    /// that a rejection is counted once for the lockout, not on every reuse).
    pub async fn validate_external(&self, headers: &HeaderMap) -> (External, bool) {
        let Some(url) = &self.validate_url else {
            return (External::NotConfigured, false);
        };
        let cookies = forwarded_cookies(headers);
        let token = headers
            .get("x-session-token")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty());
        if cookies.is_none() && token.is_none() {
            return (External::NoCredential, false);
        }
        let key = cache_key(cookies.as_ref().map(HeaderValue::as_bytes), token);
        let now = Instant::now();
        if let Some(hit) = self.validate_cache.get(&key) {
            if now.duration_since(hit.1) < VALIDATE_CACHE_TTL {
                return (hit.0.clone(), false);
            }
        }
        let Ok(_slot) = self.validate_slots.try_acquire() else {
            return (
                External::Unavailable(format!(
                    "{MAX_VALIDATE_IN_FLIGHT} session checks are already in flight; try again"
                )),
                false,
            );
        };
        let answer = self.ask(url, cookies.as_ref(), token).await;
        if matches!(answer, External::Valid(_) | External::Rejected(_)) {
            if self.validate_cache.len() >= MAX_CACHED_ANSWERS {
                self.validate_cache
                    .retain(|_, (_, at)| now.duration_since(*at) < VALIDATE_CACHE_TTL);
                if self.validate_cache.len() >= MAX_CACHED_ANSWERS {
                    self.validate_cache.clear();
                }
            }
            self.validate_cache.insert(key, (answer.clone(), now));
        }
        (answer, true)
    }

    async fn ask(&self, url: &Url, cookies: Option<&HeaderValue>, token: Option<&str>) -> External {
        let mut req = self
            .http
            .get(url.clone())
            .header(header::ACCEPT, "application/json");
        if let Some(c) = cookies {
            req = req.header(header::COOKIE, c);
        }
        if let Some(t) = token {
            req = req.header("x-session-token", t);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return External::Unavailable(format!(
                    "the session service did not answer within {} s",
                    VALIDATE_TIMEOUT.as_secs()
                ))
            }
            Err(e) => {
                return External::Unavailable(format!(
                    "the session service is unreachable: {}",
                    without_url(&e)
                ))
            }
        };
        let status = resp.status();
        let body = match read_limited(resp).await {
            Ok(b) => b,
            Err(why) => return External::Unavailable(why),
        };
        interpret(status, &body)
    }
}

/// The cache key of a presented session: a SHA-256 of what is forwarded, so the cache holds
/// no session secret in the clear.
fn cache_key(cookies: Option<&[u8]>, token: Option<&str>) -> [u8; 32] {
    use sha2::Digest;
    let mut h = Sha256::new();
    h.update(cookies.unwrap_or_default());
    h.update(b"\x1f");
    h.update(token.unwrap_or_default().as_bytes());
    h.finalize().into()
}

/// Decides what an answer of the session service means (kept apart from the I/O so the
/// contract is unit-tested).
fn interpret(status: StatusCode, body: &[u8]) -> External {
    if status.is_client_error() {
        return External::Rejected(format!("the session service answered {status}"));
    }
    if status != StatusCode::OK {
        return External::Unavailable(format!("the session service answered {status}"));
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return External::Unavailable("the session service's answer is not JSON".into());
    };
    match v.get("valid") {
        Some(serde_json::Value::Bool(true)) => {}
        Some(serde_json::Value::Bool(false)) => {
            return External::Rejected("the session service said valid: false".into())
        }
        _ => {
            return External::Unavailable(
                "the session service's answer has no boolean \"valid\"".into(),
            )
        }
    }
    match v.get("user").and_then(|u| u.as_str()).map(clean_user) {
        Some(u) if !u.is_empty() => External::Valid(u),
        _ => External::Unavailable(
            "the session service said valid: true without a non-empty \"user\"".into(),
        ),
    }
}

/// A user name from the session service, made safe for logs and pages: no control
/// characters, at most 100 characters.
fn clean_user(u: &str) -> String {
    u.chars()
        .filter(|c| !c.is_control())
        .take(100)
        .collect::<String>()
        .trim()
        .to_string()
}

async fn read_limited(mut resp: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_VALIDATE_BODY {
                    return Err("the session service's answer is too large".into());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) if e.is_timeout() => {
                return Err(format!(
                    "the session service did not answer within {} s",
                    VALIDATE_TIMEOUT.as_secs()
                ))
            }
            Err(e) => {
                return Err(format!(
                    "reading the session service's answer failed: {}",
                    without_url(&e)
                ))
            }
        }
    }
}

/// A reqwest error without its URL (which could carry credentials in a query string).
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), "ADMIN_SESSION_VALIDATE_URL");
    }
    s
}

/// Every value of `name` in the request's `Cookie` headers; the first one wins.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| k.trim() == name)
        .map(|(_, v)| v.trim())
}

/// The request's cookies minus ours, joined into one header value.
fn forwarded_cookies(headers: &HeaderMap) -> Option<HeaderValue> {
    let kept: Vec<&str> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .filter(|pair| {
            let name = pair.split_once('=').map(|(k, _)| k.trim()).unwrap_or(pair);
            name != SESSION_COOKIE && name != CSRF_COOKIE
        })
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join("; ")).ok()
}

/// 32 random bytes, base64url: an unguessable id.
fn random_id() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

/// True for something shaped like [`random_id`].
fn is_id(s: &str) -> bool {
    s.len() == 43
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions(args: &[&str]) -> Sessions {
        let mut argv = vec!["llm-gatekeeper"];
        argv.extend_from_slice(args);
        let config = Config::from_args(argv, Vec::new()).expect("config");
        Sessions::from_config(&config).expect("sessions")
    }

    fn with_cookie(c: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(c).expect("header"));
        h
    }

    fn cookie_pair(set_cookie: &str) -> String {
        set_cookie.split(';').next().expect("pair").to_string()
    }

    #[test]
    fn session_round_trip_and_sign_out() {
        let s = sessions(&[]);
        let set = s.create("admin-key");
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"));
        assert!(set.contains("; Secure"));
        let h = with_cookie(&format!("other=1; {}", cookie_pair(&set)));
        let found = s.lookup(&h).expect("session found");
        assert_eq!(found.who, "admin-key");
        s.destroy(&found.id);
        assert!(s.lookup(&h).is_none());
    }

    #[test]
    fn tampered_or_foreign_cookie_is_refused() {
        let s = sessions(&[]);
        let pair = cookie_pair(&s.create("admin-key"));
        let (name_id, sig) = pair.rsplit_once('.').expect("signed");
        let mut bad_sig = sig.to_string();
        bad_sig.replace_range(0..1, if sig.starts_with('A') { "B" } else { "A" });
        assert!(s
            .lookup(&with_cookie(&format!("{name_id}.{bad_sig}")))
            .is_none());
        // Another process (another random key) cannot read our cookies.
        let other = sessions(&[]);
        assert!(other.lookup(&with_cookie(&pair)).is_none());
    }

    #[test]
    fn same_signing_key_signs_alike() {
        let a = sessions(&["--signing-key", "k"]);
        let b = sessions(&["--signing-key", "k"]);
        assert_eq!(a.csrf_token("x"), b.csrf_token("x"));
        assert_ne!(a.csrf_token("x"), a.csrf_token("y"));
    }

    #[test]
    fn insecure_cookies_drop_secure_flag() {
        let s = sessions(&["--use-insecure-cookies", "true"]);
        assert!(!s.create("admin-key").contains("Secure"));
    }

    #[test]
    fn csrf_needs_the_browsers_nonce() {
        let s = sessions(&[]);
        let (binding, set) = s.csrf_binding(&HeaderMap::new(), "anon");
        let set = set.expect("a nonce cookie is issued");
        let token = s.csrf_token(&binding);
        let h = with_cookie(&cookie_pair(&set));
        assert!(s.verify_csrf(&h, "anon", Some(&token)));
        assert!(!s.verify_csrf(&h, "someone-else", Some(&token)));
        assert!(!s.verify_csrf(&h, "anon", Some("nope")));
        assert!(!s.verify_csrf(&h, "anon", None));
        assert!(!s.verify_csrf(&HeaderMap::new(), "anon", Some(&token)));
    }

    #[test]
    fn validate_url_must_be_http() {
        let config = Config::from_args(
            [
                "llm-gatekeeper",
                "--admin-session-validate-url",
                "ftp://auth/session",
            ],
            Vec::new(),
        )
        .expect("config");
        let err = Sessions::from_config(&config).err().expect("refused");
        assert!(err.0.contains("ADMIN_SESSION_VALIDATE_URL"));
    }

    #[test]
    fn forwards_only_foreign_cookies() {
        let h = with_cookie("gk_session=a.b; session=xyz; gk_csrf=n");
        let v = forwarded_cookies(&h).expect("kept");
        assert_eq!(v.to_str().expect("ascii"), "session=xyz");
        assert!(forwarded_cookies(&with_cookie("gk_session=a.b")).is_none());
    }

    #[test]
    fn validate_contract() {
        let ok = |b: &str| interpret(StatusCode::OK, b.as_bytes());
        assert_eq!(
            ok(r#"{"valid":true,"user":"alice"}"#),
            External::Valid("alice".into())
        );
        assert!(matches!(ok(r#"{"valid":false}"#), External::Rejected(_)));
        assert!(matches!(
            ok(r#"{"valid":"true","user":"a"}"#),
            External::Unavailable(_)
        ));
        assert!(matches!(ok(r#"{"valid":true}"#), External::Unavailable(_)));
        assert!(matches!(
            ok(r#"{"valid":true,"user":""}"#),
            External::Unavailable(_)
        ));
        assert!(matches!(ok("not json"), External::Unavailable(_)));
        assert!(matches!(
            interpret(StatusCode::UNAUTHORIZED, br#"{"valid":true,"user":"a"}"#),
            External::Rejected(_)
        ));
        assert!(matches!(
            interpret(StatusCode::FOUND, b""),
            External::Unavailable(_)
        ));
    }
}
