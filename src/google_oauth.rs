//! Google service-account access tokens by the OAuth2 JWT-bearer grant, shared by the Firebase
//! backend (`FIREBASE_KEY`) and the Vertex AI provider (`GCP_CREDENTIALS`): `gcp_auth` parses
//! the key and signs the RS256 assertion; we exchange it at the token endpoint with the
//! caller's `reqwest` client (its timeouts apply, and a refusal reaches the operator with its
//! HTTP status and body), and cache the token until shortly before it expires. Knows nothing
//! of what the token is used for.

use std::time::{Duration, Instant};

use base64::Engine;
use serde::Deserialize;
use url::Url;

const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// An access token is renewed this long before it expires.
const RENEW_BEFORE: Duration = Duration::from_secs(300);

/// Why no access token could be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token endpoint refused the key (4xx) or the key cannot sign: the operator must fix
    /// the key.
    #[error("{0}")]
    Rejected(String),
    /// The token endpoint could not be reached or failed (5xx, bad answer): may pass.
    #[error("{0}")]
    Unavailable(String),
}

/// One service account and its cached access token.
pub struct ServiceAccount {
    account: gcp_auth::CustomServiceAccount,
    client_email: String,
    token_uri: String,
    /// Space-separated OAuth scopes.
    scopes: String,
    /// Names the configuration the key came from, at the start of messages (`FIREBASE_KEY`).
    label: String,
    /// Where `token_uri` came from, for messages (`the key's token_uri`, `GCP_TOKEN_URL`).
    token_uri_source: &'static str,
    cached: tokio::sync::Mutex<Option<(String, Instant)>>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default = "default_expiry")]
    expires_in: u64,
}

fn default_expiry() -> u64 {
    3600
}

/// A message for an error with its whole cause chain (reqwest hides "connection refused" in a
/// source).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        // Some errors repeat their source in their own message; say it once.
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

/// At most 300 characters of a response body, for error messages.
pub fn snippet(body: &str) -> String {
    let t = body.trim();
    match t.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &t[..i]),
        None => t.to_string(),
    }
}

/// `https://`, or plain `http://` to a loopback address (local emulators and tests): where a
/// bearer credential may be sent.
pub fn is_safe_url(url: &Url) -> bool {
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    url.scheme() == "https" || (url.scheme() == "http" && loopback)
}

impl ServiceAccount {
    /// A service account from its key's JSON (as Google issues it), with the token endpoint
    /// given separately. Errors are the reason alone; callers add what to do.
    pub fn new(
        key_json: &str,
        client_email: String,
        token_uri: String,
        token_uri_source: &'static str,
        scopes: &str,
        label: String,
    ) -> Result<ServiceAccount, String> {
        let parsed = Url::parse(&token_uri).map_err(|e| format!("token_uri is not a URL ({e})"))?;
        // The signed assertion is a credential: it may cross a network only encrypted.
        if !is_safe_url(&parsed) {
            return Err(format!(
                "token_uri {token_uri} must use https:// (plain http only to a loopback address)"
            ));
        }
        let account = gcp_auth::CustomServiceAccount::from_json(key_json).map_err(|e| chain(&e))?;
        Ok(ServiceAccount {
            account,
            client_email,
            token_uri,
            scopes: scopes.to_string(),
            label,
            token_uri_source,
            cached: tokio::sync::Mutex::new(None),
        })
    }

    /// A service account from a PEM private key (PKCS#8) and its e-mail.
    pub fn from_pem(
        private_key_pem: &str,
        client_email: &str,
        token_uri: &str,
        token_uri_source: &'static str,
        scopes: &str,
        label: String,
    ) -> Result<ServiceAccount, String> {
        let key = serde_json::json!({
            "type": "service_account",
            "private_key": private_key_pem,
            "client_email": client_email,
            "token_uri": token_uri,
        });
        ServiceAccount::new(
            &key.to_string(),
            client_email.to_string(),
            token_uri.to_string(),
            token_uri_source,
            scopes,
            label,
        )
    }

    /// A valid access token: the cached one, or a new one from the token endpoint. The lock is
    /// held during renewal so that concurrent callers wait for one exchange.
    pub async fn token(&self, client: &reqwest::Client) -> Result<String, TokenError> {
        let mut cached = self.cached.lock().await;
        if let Some((token, expires)) = cached.as_ref() {
            if Instant::now() + RENEW_BEFORE < *expires {
                return Ok(token.clone());
            }
        }
        let (token, lifetime) = self.exchange(client).await?;
        *cached = Some((token.clone(), Instant::now() + lifetime));
        Ok(token)
    }

    /// Forgets the cached token (after the API refused it), so that the next call renews it.
    pub async fn forget(&self) {
        *self.cached.lock().await = None;
    }

    /// The JWT-bearer grant: an RS256 assertion signed with the key, posted to `token_uri`.
    async fn exchange(&self, client: &reqwest::Client) -> Result<(String, Duration), TokenError> {
        let label = &self.label;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let iat = chrono::Utc::now().timestamp();
        let claims = serde_json::json!({
            "iss": self.client_email,
            "scope": self.scopes,
            "aud": self.token_uri,
            "iat": iat,
            "exp": iat + 3600,
        });
        let mut jwt = b64.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        jwt.push('.');
        jwt.push_str(&b64.encode(claims.to_string()));
        let signature = self.account.signer().sign(jwt.as_bytes()).map_err(|e| {
            TokenError::Rejected(format!("{label}: cannot sign with the key: {}", chain(&e)))
        })?;
        jwt.push('.');
        jwt.push_str(&b64.encode(signature));

        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", GRANT_TYPE)
            .append_pair("assertion", &jwt)
            .finish();
        let uri = &self.token_uri;
        let source = self.token_uri_source;
        let resp = client
            .post(uri)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(form)
            .send()
            .await
            .map_err(|e| {
                TokenError::Unavailable(format!(
                    "{label}: cannot reach the token endpoint {uri} ({source}): {}",
                    chain(&e)
                ))
            })?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if status.is_client_error() {
            return Err(TokenError::Rejected(format!(
                "{label}: the token endpoint {uri} rejected the service account {} (HTTP {status}: {}); check that the key is current and not revoked",
                self.client_email,
                snippet(&text)
            )));
        }
        if !status.is_success() {
            return Err(TokenError::Unavailable(format!(
                "{label}: the token endpoint {uri} failed (HTTP {status}: {})",
                snippet(&text)
            )));
        }
        let parsed: TokenResponse = serde_json::from_str(&text).map_err(|e| {
            TokenError::Unavailable(format!(
                "{label}: the token endpoint {uri} answered without an access_token ({e})"
            ))
        })?;
        Ok((parsed.access_token, Duration::from_secs(parsed.expires_in)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_go_only_over_https_or_loopback() {
        let ok = |s: &str| is_safe_url(&Url::parse(s).expect("url"));
        assert!(ok("https://oauth2.googleapis.com/token"));
        assert!(ok("http://127.0.0.1:9/token"));
        assert!(ok("http://localhost:9/token"));
        assert!(!ok("http://example.com/token"));
    }
}
