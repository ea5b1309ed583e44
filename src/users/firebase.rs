//! The Firebase Realtime Database backend (`GATEKEEPER_STORE=firebase_rtdb`), over the RTDB
//! REST API with our own `reqwest` client: loads `/{ref}.json` at startup and writes each batch
//! as multi-path `PATCH`es of whole user records (deleted users as `null`).
//!
//! Authentication is the service account's OAuth2 JWT-bearer grant at the key's own
//! `token_uri`, through [`crate::google_oauth`] (shared with the Vertex AI provider) with the
//! same `reqwest` client, so that timeouts apply and a rejection reaches the operator with its
//! HTTP status and body. With `FIREBASE_DATABASE_EMULATOR_HOST` there is no OAuth at all.

use std::time::Duration;

use base64::Engine;
use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Map, Value};
use url::Url;

use super::backend::{BackendError, Loaded, UserBackend};
use super::{fingerprint, User};
use crate::config::Config;
use crate::google_oauth::{chain, is_safe_url, snippet, ServiceAccount, TokenError};

/// How many users one `PATCH` carries; larger batches are split (each chunk is idempotent).
const CHUNK: usize = 500;
/// OAuth scopes the Realtime Database REST API accepts for a service account.
const SCOPES: &str =
    "https://www.googleapis.com/auth/firebase.database https://www.googleapis.com/auth/userinfo.email";
/// RTDB rejects keys longer than this many bytes.
const MAX_KEY_BYTES: usize = 768;

pub struct FirebaseBackend {
    client: reqwest::Client,
    /// `…/{ref}.json`, with `?ns=` for the emulator.
    users_url: Url,
    auth: Option<ServiceAccount>,
}

#[derive(Deserialize)]
struct KeyFile {
    client_email: Option<String>,
    token_uri: Option<String>,
}

/// Encodes a token as an RTDB key: `%`, the characters RTDB forbids in keys (`. $ # [ ] /`)
/// and control characters become `%XX`. UUID tokens (what the original issues) are unchanged,
/// so a database written by the original is read as is.
pub fn encode_key(token: &str) -> String {
    let mut out = String::with_capacity(token.len());
    for c in token.chars() {
        if matches!(c, '%' | '.' | '$' | '#' | '[' | ']' | '/') || c.is_control() {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The inverse of [`encode_key`]; a key that is not valid percent-encoding is taken literally.
pub fn decode_key(key: &str) -> String {
    if !key.contains('%') {
        return key.to_string();
    }
    let bytes = key.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| key.to_string())
}

/// Why RTDB would refuse this key, if it would.
fn bad_key(key: &str) -> Option<&'static str> {
    if key.is_empty() {
        Some("an empty key")
    } else if key.len() > MAX_KEY_BYTES {
        Some("a key longer than 768 bytes")
    } else if key
        .chars()
        .any(|c| matches!(c, '.' | '$' | '#' | '[' | ']' | '/') || c.is_control())
    {
        Some("a key containing . $ # [ ] / or a control character")
    } else {
        None
    }
}

/// Why RTDB would refuse this record (one bad field would fail the whole `PATCH`, blocking
/// every other user's changes), if it would.
fn bad_value(v: &Value) -> Option<&'static str> {
    match v {
        Value::Object(m) => m
            .iter()
            .find_map(|(k, v)| bad_key(k).or_else(|| bad_value(v))),
        Value::Array(a) => a.iter().find_map(bad_value),
        _ => None,
    }
}

impl FirebaseBackend {
    /// Builds the backend from `FIREBASE_*` variables; every error names the variable.
    pub fn from_config(config: &Config) -> Result<FirebaseBackend, BackendError> {
        let cli = &config.cli;
        let reference = cli.firebase_users_ref_name.trim_matches('/');
        if reference.is_empty() || reference.split('/').any(|s| bad_key(s).is_some()) {
            return Err(BackendError::Config(format!(
                "FIREBASE_USERS_REF_NAME={:?} is not a valid database path; use a name such as `users` (no . $ # [ ])",
                cli.firebase_users_ref_name
            )));
        }
        let Some(db_url) = cli.firebase_rtdb_url.clone() else {
            return Err(BackendError::Config(
                "GATEKEEPER_STORE=firebase_rtdb needs FIREBASE_RTDB_URL, e.g. https://my-project-default-rtdb.firebaseio.com".into(),
            ));
        };
        let Some(host) = db_url.host_str().map(str::to_string) else {
            return Err(BackendError::Config(format!(
                "FIREBASE_RTDB_URL={db_url} has no host; use e.g. https://my-project-default-rtdb.firebaseio.com"
            )));
        };

        let (mut base, auth) = match &cli.firebase_database_emulator_host {
            Some(emulator) => {
                // The SDKs' convention: plain HTTP to the emulator, the database named by `ns`.
                let mut url = Url::parse(&format!("http://{emulator}/")).map_err(|e| {
                    BackendError::Config(format!(
                        "FIREBASE_DATABASE_EMULATOR_HOST={emulator} is not a host:port ({e})"
                    ))
                })?;
                let ns = host.split('.').next().unwrap_or(&host).to_string();
                url.query_pairs_mut().append_pair("ns", &ns);
                (url, None)
            }
            None => {
                if !is_safe_url(&db_url) {
                    return Err(BackendError::Config(format!(
                        "FIREBASE_RTDB_URL={db_url} must use https:// (plain http only to a loopback address); for an emulator set FIREBASE_DATABASE_EMULATOR_HOST"
                    )));
                }
                let mut url = db_url.clone();
                url.set_query(None);
                url.set_fragment(None);
                (url, Some(service_account(config)?))
            }
        };
        {
            let mut segments = base.path_segments_mut().map_err(|_| {
                BackendError::Config(format!("FIREBASE_RTDB_URL={db_url} cannot have a path"))
            })?;
            segments.pop_if_empty();
            let parts: Vec<&str> = reference.split('/').collect();
            let (last, first) = parts.split_last().unwrap_or((&"users", &[]));
            segments.extend(first);
            segments.push(&format!("{last}.json"));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| BackendError::Config(format!("cannot build an HTTP client: {e}")))?;
        Ok(FirebaseBackend {
            client,
            users_url: base,
            auth,
        })
    }

    /// The users URL without the query, for messages.
    fn shown_url(&self) -> String {
        let mut u = self.users_url.clone();
        u.set_query(None);
        u.to_string()
    }

    async fn request(
        &self,
        method: reqwest::Method,
        body: Option<&Value>,
    ) -> Result<String, BackendError> {
        let mut req = self.client.request(method.clone(), self.users_url.clone());
        if let Some(auth) = &self.auth {
            req = req.bearer_auth(auth.token(&self.client).await.map_err(|e| match e {
                TokenError::Rejected(m) => BackendError::Config(m),
                TokenError::Unavailable(m) => BackendError::Unavailable(m),
            })?);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        // Messages name only the path: they reach the public `/health?verbose`, and the
        // original treats the database URL as a secret. Startup errors add the URL.
        let url = self.users_url.path().to_string();
        let resp = req.send().await.map_err(|e| {
            BackendError::Unavailable(format!(
                "FIREBASE_RTDB_URL: {method} {url} failed: {}",
                chain(&e.without_url())
            ))
        })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| {
            BackendError::Unavailable(format!(
                "FIREBASE_RTDB_URL: {method} {url}: cannot read the response: {}",
                chain(&e.without_url())
            ))
        })?;
        if status.is_success() {
            return Ok(text);
        }
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            // A rejected token is renewed on the next call rather than reused until it expires.
            if let Some(auth) = &self.auth {
                auth.forget().await;
            }
            return Err(BackendError::Config(format!(
                "FIREBASE_KEY: the database refused the service account's access token ({method} {url}: HTTP {status}: {}); check that FIREBASE_KEY belongs to the project of FIREBASE_RTDB_URL",
                snippet(&text)
            )));
        }
        Err(BackendError::Unavailable(format!(
            "FIREBASE_RTDB_URL: {method} {url}: HTTP {status}: {}",
            snippet(&text)
        )))
    }
}

/// The service account of `FIREBASE_KEY` (base64 of the key's JSON, or the JSON itself).
fn service_account(config: &Config) -> Result<ServiceAccount, BackendError> {
    let Some(key) = &config.cli.firebase_key else {
        return Err(BackendError::Config(
            "GATEKEEPER_STORE=firebase_rtdb needs FIREBASE_KEY: the service-account JSON from Firebase (Project settings → Service accounts → Generate new private key), base64-encoded (`base64 -w0 key.json`)".into(),
        ));
    };
    let raw = key.expose().trim();
    // The original wants base64; a pasted JSON document is accepted too.
    let json = if raw.starts_with('{') {
        raw.to_string()
    } else {
        let cleaned: String = raw.chars().filter(|c| !c.is_whitespace()).collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&cleaned)
            .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(&cleaned))
            .map_err(|e| {
                BackendError::Config(format!(
                    "FIREBASE_KEY is not valid base64 ({e}); set it to the output of `base64 -w0 key.json`"
                ))
            })?;
        String::from_utf8(bytes).map_err(|_| {
            BackendError::Config(
                "FIREBASE_KEY does not decode to text; set it to the base64 of the service-account JSON file".into(),
            )
        })?
    };
    let malformed = |why: String| {
        BackendError::Config(format!(
            "FIREBASE_KEY is not a usable service-account key: {why}; download a new key in Firebase (Project settings → Service accounts)"
        ))
    };
    let fields: KeyFile =
        serde_json::from_str(&json).map_err(|e| malformed(format!("not JSON ({e})")))?;
    let client_email = fields
        .client_email
        .ok_or_else(|| malformed("no client_email".into()))?;
    let token_uri = fields
        .token_uri
        .ok_or_else(|| malformed("no token_uri".into()))?;
    ServiceAccount::new(
        &json,
        client_email,
        token_uri,
        "the key's token_uri",
        SCOPES,
        "FIREBASE_KEY".into(),
    )
    .map_err(|why| {
        // gcp_auth also builds an HTTPS client here, which needs the system's CA
        // certificates; that is not the key's fault.
        if why.contains("root certificates") {
            BackendError::Config(format!(
                "FIREBASE_KEY: cannot prepare HTTPS for the service account ({why}); install the system CA certificates (ca-certificates)"
            ))
        } else {
            malformed(why)
        }
    })
}

/// Parses one stored record; the key is the (encoded) token.
fn parse_record(key: &str, value: Value) -> Result<User, (String, String)> {
    let token = decode_key(key);
    let fp = fingerprint(&token);
    let mut value = value;
    if let Value::Object(m) = &mut value {
        // Records written by hand may omit the token; the key is the token.
        m.entry("token")
            .or_insert_with(|| Value::String(token.clone()));
    }
    match serde_json::from_value::<User>(value) {
        Ok(u) if u.token == token => Ok(u),
        Ok(_) => Err((fp, "the record's token field differs from its key".into())),
        Err(e) => Err((fp, e.to_string())),
    }
}

impl UserBackend for FirebaseBackend {
    fn name(&self) -> &'static str {
        "firebase_rtdb"
    }

    fn load_all(&self) -> BoxFuture<'_, Result<Loaded, BackendError>> {
        Box::pin(async move {
            let shown = self.shown_url();
            let text = self
                .request(reqwest::Method::GET, None)
                .await
                .map_err(|e| match e {
                    BackendError::Config(m) => {
                        BackendError::Config(format!("{m} (database {shown})"))
                    }
                    BackendError::Unavailable(m) => {
                        BackendError::Unavailable(format!("{m} (database {shown})"))
                    }
                })?;
            let value: Value = serde_json::from_str(&text).map_err(|e| {
                BackendError::Unavailable(format!(
                    "FIREBASE_RTDB_URL: {} did not return JSON ({e})",
                    self.shown_url()
                ))
            })?;
            // RTDB returns an object of records, `null` when empty, and an array when every
            // key happens to be a small integer.
            let records: Vec<(String, Value)> = match value {
                Value::Null => Vec::new(),
                Value::Object(m) => m.into_iter().collect(),
                Value::Array(a) => a
                    .into_iter()
                    .enumerate()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(i, v)| (i.to_string(), v))
                    .collect(),
                other => {
                    return Err(BackendError::Unavailable(format!(
                        "FIREBASE_RTDB_URL: {} holds a {} instead of an object of users; check FIREBASE_USERS_REF_NAME",
                        self.shown_url(),
                        if other.is_string() { "string" } else { "scalar" }
                    )))
                }
            };
            let mut loaded = Loaded::default();
            for (key, value) in records {
                match parse_record(&key, value) {
                    Ok(u) => loaded.users.push(u),
                    Err(skip) => loaded.skipped.push(skip),
                }
            }
            Ok(loaded)
        })
    }

    fn write<'a>(
        &'a self,
        changed: &'a [User],
        deleted: &'a [String],
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let mut entries: Vec<(String, Value)> =
                Vec::with_capacity(changed.len() + deleted.len());
            for user in changed {
                let key = encode_key(&user.token);
                let value = serde_json::to_value(user).map_err(|e| {
                    BackendError::Unavailable(format!(
                        "cannot serialise user {}: {e}",
                        fingerprint(&user.token)
                    ))
                })?;
                // RTDB refuses a whole PATCH for one bad key; such a user stays in memory only
                // rather than blocking everyone else's changes forever.
                if let Some(why) = bad_key(&key).or_else(|| bad_value(&value)) {
                    tracing::error!(
                        user = %fingerprint(&user.token),
                        "cannot store this user in Firebase: its record has {why}; it is kept in memory only"
                    );
                    continue;
                }
                entries.push((key, value));
            }
            for token in deleted {
                let key = encode_key(token);
                if bad_key(&key).is_none() {
                    entries.push((key, Value::Null));
                }
            }
            for chunk in entries.chunks(CHUNK) {
                let body: Map<String, Value> = chunk.iter().cloned().collect();
                self.request(reqwest::Method::PATCH, Some(&Value::Object(body)))
                    .await?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_uuids_are_unchanged() {
        let uuid = "0f8fad5b-d9cb-469f-a165-70867728950e";
        assert_eq!(encode_key(uuid), uuid);
        for t in ["a.b", "x$y#z[1]/2", "100%", "tab\there", "é.ü"] {
            let k = encode_key(t);
            assert!(bad_key(&k).is_none(), "{k}");
            assert_eq!(decode_key(&k), t);
        }
        assert_eq!(encode_key("a.b"), "a%2Eb");
        assert_eq!(decode_key("50%"), "50%");
    }

    #[test]
    fn credentials_go_only_over_https_or_loopback() {
        let ok = |u: &str| is_safe_url(&Url::parse(u).expect("url"));
        assert!(ok("https://x-default-rtdb.firebaseio.com"));
        assert!(ok("http://127.0.0.1:9000"));
        assert!(ok("http://[::1]:9000"));
        assert!(ok("http://localhost:9000"));
        assert!(!ok("http://x-default-rtdb.firebaseio.com"));
        assert!(!ok("http://10.0.0.1:9000"));
    }

    #[test]
    fn bad_nested_keys_are_found() {
        let v = serde_json::json!({"token":"a","meta":{"x.y":1}});
        assert!(bad_value(&v).is_some());
        let v = serde_json::json!({"token":"a","tokenCounts":{"gpt4":1}});
        assert!(bad_value(&v).is_none());
    }

    #[test]
    fn records_without_token_take_the_key() {
        let u = parse_record("abc", serde_json::json!({"promptCount": 2})).expect("parses");
        assert_eq!(u.token, "abc");
        assert_eq!(u.prompt_count, 2);
        let (fp, _) =
            parse_record("abc", serde_json::json!({"promptCount": "x"})).expect_err("fails");
        assert_eq!(fp, fingerprint("abc"));
    }
}
