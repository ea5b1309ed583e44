//! GCP Vertex AI (Claude): `GCP_CREDENTIALS`, one service account and access token per
//! credential (through [`crate::google_oauth`], the same grant the Firebase backend uses),
//! Anthropic model names → Vertex names, and the `rawPredict`/`streamRawPredict` URL and body.
//! Vertex answers in Anthropic's own JSON and SSE, so responses need no translation. Knows
//! nothing of users, quotas or routing.

use std::fmt;

use base64::Engine;
use serde_json::{json, Map, Value};

use crate::google_oauth::ServiceAccount;

/// The variable holding the credentials, for messages.
pub const VAR: &str = "GCP_CREDENTIALS";
/// The default `GCP_VERTEX_BASE_URL`; `{region}` is replaced by the credential's region.
pub const DEFAULT_BASE_URL: &str = "https://{region}-aiplatform.googleapis.com";
/// The default `GCP_TOKEN_URL`.
pub const DEFAULT_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
/// The OAuth scope Vertex AI accepts.
pub const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
/// The `anthropic_version` Vertex wants in Claude request bodies.
pub const ANTHROPIC_VERSION: &str = "vertex-2023-10-16";

/// One `projectId:clientEmail:region:privateKey` entry of `GCP_CREDENTIALS`.
#[derive(Clone)]
pub struct GcpCredential {
    pub project_id: String,
    pub client_email: String,
    pub region: String,
    /// The private key as a PEM document with real newlines.
    private_key_pem: String,
    /// `gcp-` and the fingerprint of the whole entry: what logs and the info page show.
    pub fingerprint: String,
}

impl fmt::Debug for GcpCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GcpCredential")
            .field("fingerprint", &self.fingerprint)
            .field("project_id", &self.project_id)
            .field("client_email", &self.client_email)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl GcpCredential {
    /// The private key (PEM), only for signing token requests.
    pub fn private_key_pem(&self) -> &str {
        &self.private_key_pem
    }

    /// The service account of this credential, exchanging its assertions at `token_url`.
    pub fn service_account(&self, token_url: &str) -> Result<ServiceAccount, String> {
        ServiceAccount::from_pem(
            &self.private_key_pem,
            &self.client_email,
            token_url,
            "GCP_TOKEN_URL",
            SCOPE,
            format!("{VAR} ({})", self.fingerprint),
        )
    }
}

/// A private key as written in `GCP_CREDENTIALS` (PEM with `\n` escapes, real newlines, or the
/// bare base64 body) → a PEM document, or why not.
fn normalise_pem(raw: &str) -> Result<String, &'static str> {
    let body: String = raw
        .replace("\\n", "\n")
        .replace("-----BEGIN PRIVATE KEY-----", "")
        .replace("-----END PRIVATE KEY-----", "")
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    if raw.contains("BEGIN RSA PRIVATE KEY") {
        return Err("is a PKCS#1 key (BEGIN RSA PRIVATE KEY); use the PKCS#8 key (BEGIN PRIVATE KEY) from the service account's JSON key file");
    }
    if body.is_empty() {
        return Err("has an empty privateKey");
    }
    if base64::engine::general_purpose::STANDARD
        .decode(&body)
        .is_err()
    {
        return Err("has a privateKey that is not a PEM key (base64 between BEGIN/END PRIVATE KEY, newlines written as \\n)");
    }
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    Ok(pem)
}

/// Parses `GCP_CREDENTIALS`: a comma list of `projectId:clientEmail:region:privateKey`.
/// Blank entries are skipped and repeated ones kept once. Errors name the variable and the
/// entry's position, never the key.
pub fn parse_credentials(raw: &str) -> Result<Vec<GcpCredential>, String> {
    let entries: Vec<&str> = raw
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    let total = entries.len();
    let mut out: Vec<GcpCredential> = Vec::with_capacity(total);
    for (i, entry) in entries.iter().enumerate() {
        let pos = i + 1;
        let parts: Vec<&str> = entry.splitn(4, ':').map(str::trim).collect();
        let bad = |why: &str| {
            format!(
                "{VAR}: entry {pos} of {total} {why}; each entry must be projectId:clientEmail:region:privateKey, with the PEM key's newlines written as \\n"
            )
        };
        if parts.len() != 4 {
            return Err(bad(&format!(
                "has {} colon-separated fields instead of 4",
                parts.len()
            )));
        }
        let (project, email, region, key) = (parts[0], parts[1], parts[2], parts[3]);
        if project.is_empty() {
            return Err(bad("has an empty projectId"));
        }
        if !email.contains('@') {
            return Err(bad(&format!(
                "has the clientEmail {email:?}, which is not an e-mail address"
            )));
        }
        if region.is_empty()
            || !region
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(bad(&format!(
                "has the region {region:?}; a region looks like us-east5"
            )));
        }
        if !project
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(bad(&format!("has the projectId {project:?}")));
        }
        let pem = normalise_pem(key).map_err(bad)?;
        let cred = GcpCredential {
            project_id: project.to_string(),
            client_email: email.to_string(),
            region: region.to_string(),
            fingerprint: format!("gcp-{}", crate::users::fingerprint(entry)),
            private_key_pem: pem,
        };
        if !out.iter().any(|c| c.fingerprint == cred.fingerprint) {
            out.push(cred);
        }
    }
    Ok(out)
}

/// `{base}/v1/projects/{project}/locations/{region}/publishers/anthropic/models/{model}:rawPredict`
/// (or `:streamRawPredict`); `{region}` in the base template is replaced.
pub fn predict_url(base_template: &str, cred: &GcpCredential, model: &str, stream: bool) -> String {
    let base = base_template
        .replace("{region}", &cred.region)
        .trim_end_matches('/')
        .to_string();
    let model: String = url::form_urlencoded::byte_serialize(model.as_bytes())
        .collect::<String>()
        // `@` is legal in a path segment and is how Vertex writes versions.
        .replace("%40", "@");
    let action = if stream {
        "streamRawPredict"
    } else {
        "rawPredict"
    };
    format!(
        "{base}/v1/projects/{}/locations/{}/publishers/anthropic/models/{model}:{action}",
        cred.project_id, cred.region
    )
}

/// Anthropic names whose Vertex name is not simply `name@date`.
const SPECIAL: &[(&str, &str)] = &[
    (
        "claude-3-5-sonnet-20241022",
        "claude-3-5-sonnet-v2@20241022",
    ),
    ("claude-3-5-sonnet-latest", "claude-3-5-sonnet-v2@20241022"),
    ("claude-3-5-sonnet", "claude-3-5-sonnet-v2@20241022"),
    ("claude-3-5-haiku-latest", "claude-3-5-haiku@20241022"),
    ("claude-3-5-haiku", "claude-3-5-haiku@20241022"),
    ("claude-3-7-sonnet-latest", "claude-3-7-sonnet@20250219"),
    ("claude-3-opus-latest", "claude-3-opus@20240229"),
    ("claude-3-opus", "claude-3-opus@20240229"),
    ("claude-3-sonnet", "claude-3-sonnet@20240229"),
    ("claude-3-haiku", "claude-3-haiku@20240307"),
    ("claude-sonnet-4-0", "claude-sonnet-4@20250514"),
    ("claude-opus-4-0", "claude-opus-4@20250514"),
];

/// The Vertex name of a Claude model: names already in Vertex form (`claude-…@date`) pass
/// through; `claude-3-5-sonnet-20240620` becomes `claude-3-5-sonnet@20240620`, with the few
/// exceptions Vertex makes (`claude-3-5-sonnet-v2@20241022`) and undated aliases looked up.
pub fn vertex_model(model: &str) -> Result<String, String> {
    let m = model.trim();
    if m.starts_with("claude-") && m.contains('@') {
        return Ok(m.to_string());
    }
    let lower = m.to_ascii_lowercase();
    if let Some((_, v)) = SPECIAL.iter().find(|(n, _)| *n == lower) {
        return Ok(v.to_string());
    }
    if let Some((name, date)) = lower.rsplit_once('-') {
        if name.starts_with("claude-")
            && date.len() == 8
            && date.bytes().all(|b| b.is_ascii_digit())
        {
            return Ok(format!("{name}@{date}"));
        }
    }
    Err(format!(
        "the model {m:?} has no known Vertex AI name; use a Claude model such as claude-3-5-sonnet-20240620 or a Vertex name such as claude-3-5-sonnet-v2@20241022"
    ))
}

/// The quota family of a Vertex Claude model: `gcp-claude` or `gcp-claude-opus`.
pub fn family(model: &str) -> &'static str {
    if model.to_ascii_lowercase().contains("opus") {
        "gcp-claude-opus"
    } else {
        "gcp-claude"
    }
}

/// The request body for Vertex: the Anthropic Messages body without `model` (it is in the
/// URL), plus `anthropic_version`. `stream` stays: Vertex reads it as Anthropic does.
pub fn claude_body(mut body: Map<String, Value>) -> Vec<u8> {
    body.remove("model");
    body.insert("anthropic_version".into(), json!(ANTHROPIC_VERSION));
    serde_json::to_vec(&Value::Object(body)).unwrap_or_default()
}

// ---- The upstream: tokens and requests ----

/// Why a Vertex request could not be authorized.
#[derive(Debug)]
pub enum VertexAuthError {
    /// The token endpoint refused the credential's key: take it out of rotation.
    KeyRejected(String),
    /// Anything else (token endpoint unreachable, bad body): this request fails.
    Other(String),
}

/// The Vertex upstream as the forwarder uses it: each credential with its service account
/// (and cached access token), the base URL template and the token endpoint's client.
pub struct Vertex {
    base_template: String,
    creds: Vec<(GcpCredential, ServiceAccount)>,
    client: reqwest::Client,
}

impl Vertex {
    /// Prepares one service account per credential; errors name the variable and the
    /// credential's fingerprint.
    pub fn new(
        base_template: &str,
        token_url: &str,
        creds: Vec<GcpCredential>,
    ) -> Result<Vertex, String> {
        let mut out = Vec::with_capacity(creds.len());
        for c in creds {
            let account = c.service_account(token_url).map_err(|why| {
                format!(
                    "{VAR}: the credential {} (project {}) is not usable: {why}; GCP_TOKEN_URL={token_url}",
                    c.fingerprint, c.project_id
                )
            })?;
            out.push((c, account));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| format!("cannot build the HTTP client for GCP_TOKEN_URL: {e}"))?;
        Ok(Vertex {
            base_template: base_template.to_string(),
            creds: out,
            client,
        })
    }

    /// The credentials as key-pool entries (the whole entry), in order.
    pub fn pool_entries(&self) -> Vec<crate::config::Secret> {
        self.creds
            .iter()
            .map(|(c, _)| {
                crate::config::Secret::new(format!(
                    "{}:{}:{}:{}",
                    c.project_id,
                    c.client_email,
                    c.region,
                    c.private_key_pem()
                ))
            })
            .collect()
    }

    /// Forgets the access token of a credential (Vertex refused it), so the next request
    /// fetches a new one.
    pub async fn forget_token(&self, index: usize) {
        if let Some((_, account)) = self.creds.get(index) {
            account.forget().await;
        }
    }

    /// Turns the forwarder's request into Vertex's: the `rawPredict`/`streamRawPredict` URL of
    /// the model, the body without `model` plus `anthropic_version`, and the credential's
    /// access token (fetched, or cached until shortly before it expires).
    pub async fn authorize(
        &self,
        req: &mut super::UpstreamRequest,
        index: usize,
    ) -> Result<(), VertexAuthError> {
        let Some((cred, account)) = self.creds.get(index) else {
            return Err(VertexAuthError::Other(format!(
                "{VAR}: no credential at position {index}"
            )));
        };
        let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&req.body) else {
            return Err(VertexAuthError::Other(
                "the request body is not a JSON object".into(),
            ));
        };
        let model = body.get("model").and_then(Value::as_str).unwrap_or("");
        let model = vertex_model(model).map_err(VertexAuthError::Other)?;
        let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
        let token = account.token(&self.client).await.map_err(|e| match e {
            crate::google_oauth::TokenError::Rejected(m) => VertexAuthError::KeyRejected(m),
            crate::google_oauth::TokenError::Unavailable(m) => VertexAuthError::Other(m),
        })?;
        req.url = predict_url(&self.base_template, cred, &model, stream);
        req.body = bytes::Bytes::from(claude_body(body));
        let bearer = http::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            VertexAuthError::Other("the token endpoint issued an unusable access token".into())
        })?;
        let h = &mut req.headers;
        h.remove("anthropic-version");
        h.insert(http::header::AUTHORIZATION, {
            let mut b = bearer;
            b.set_sensitive(true);
            b
        });
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        Ok(())
    }
}

/// The models the key checker tries, per family, cheapest first: a credential serves a family
/// when one of them answers (the original probes haiku, sonnet, 3.5 sonnet and opus).
pub const PROBE_MODELS: &[(&str, &[&str])] = &[
    (
        "gcp-claude",
        &[
            "claude-3-haiku@20240307",
            "claude-3-5-haiku@20241022",
            "claude-3-5-sonnet@20240620",
            "claude-3-5-sonnet-v2@20241022",
            "claude-3-7-sonnet@20250219",
            "claude-sonnet-4@20250514",
        ],
    ),
    (
        "gcp-claude-opus",
        &["claude-3-opus@20240229", "claude-opus-4@20250514"],
    ),
];

/// The key checker's probe of a model: a one-token Messages call (Vertex has no free invalid
/// request that still tells whether the model may be used).
pub fn probe_body(model: &str) -> Vec<u8> {
    json!({
        "model": model,
        "max_tokens": 1,
        "messages": [{"role": "user", "content": "Hi!"}],
    })
    .to_string()
    .into_bytes()
}

/// The model list of `GET {PROXY_ENDPOINT_ROUTE}/gcp/claude/v1/models` (OpenAI's shape).
pub fn models() -> Value {
    const IDS: &[&str] = &[
        "claude-3-haiku@20240307",
        "claude-3-5-haiku@20241022",
        "claude-3-sonnet@20240229",
        "claude-3-5-sonnet@20240620",
        "claude-3-5-sonnet-v2@20241022",
        "claude-3-7-sonnet@20250219",
        "claude-3-opus@20240229",
        "claude-sonnet-4@20250514",
        "claude-opus-4@20250514",
    ];
    let data: Vec<Value> = IDS
        .iter()
        .map(|id| {
            json!({"id": id, "object": "model", "created": 0, "owned_by": "anthropic",
                "permission": [], "root": "claude", "parent": null})
        })
        .collect();
    json!({"object": "list", "data": data})
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM_BODY: &str = "MIIBVQIBADANBgkqhkiG9w0BAQEFAASCAT8wggE7AgEAAkEA";

    fn entry(project: &str, key: &str) -> String {
        format!("{project}:sa@{project}.iam.gserviceaccount.com:us-east5:{key}")
    }

    #[test]
    fn credentials_parse_with_escaped_newlines_and_errors_hide_the_key() {
        let key =
            format!("-----BEGIN PRIVATE KEY-----\\n{PEM_BODY}\\n-----END PRIVATE KEY-----\\n");
        let raw = format!("{},{}", entry("proj-1", &key), entry("proj-2", PEM_BODY));
        let creds = parse_credentials(&raw).expect("valid");
        assert_eq!(creds.len(), 2);
        assert_eq!(creds[0].project_id, "proj-1");
        assert_eq!(creds[0].client_email, "sa@proj-1.iam.gserviceaccount.com");
        assert_eq!(creds[0].region, "us-east5");
        assert_eq!(
            creds[0].private_key_pem(),
            format!("-----BEGIN PRIVATE KEY-----\n{PEM_BODY}\n-----END PRIVATE KEY-----\n")
        );
        assert_eq!(creds[0].private_key_pem(), creds[1].private_key_pem());
        assert!(!format!("{:?}", creds[0]).contains(PEM_BODY));

        let e = parse_credentials(&format!(
            "{},p:x@y:us-east5:%%notbase64%%",
            entry("a", PEM_BODY)
        ))
        .unwrap_err();
        assert!(e.contains("GCP_CREDENTIALS: entry 2 of 2"), "{e}");
        assert!(!e.contains("notbase64"), "{e}");
        let e = parse_credentials("p:x@y:us-east5").unwrap_err();
        assert!(e.contains("3 colon-separated fields"), "{e}");
        let e = parse_credentials(&format!("p:nobody:us-east5:{PEM_BODY}")).unwrap_err();
        assert!(e.contains("clientEmail"), "{e}");
    }

    #[test]
    fn model_names_map_to_vertex() {
        for (name, v) in [
            ("claude-3-5-sonnet-20240620", "claude-3-5-sonnet@20240620"),
            (
                "claude-3-5-sonnet-20241022",
                "claude-3-5-sonnet-v2@20241022",
            ),
            (
                "claude-3-5-sonnet-v2@20241022",
                "claude-3-5-sonnet-v2@20241022",
            ),
            ("claude-3-opus-20240229", "claude-3-opus@20240229"),
            ("claude-3-haiku-20240307", "claude-3-haiku@20240307"),
            ("claude-3-5-haiku-latest", "claude-3-5-haiku@20241022"),
            ("claude-sonnet-4-20250514", "claude-sonnet-4@20250514"),
        ] {
            assert_eq!(vertex_model(name).as_deref(), Ok(v), "{name}");
        }
        assert!(vertex_model("gpt-4o").is_err());
        assert_eq!(family("claude-3-opus@20240229"), "gcp-claude-opus");
        assert_eq!(family("claude-3-5-sonnet@20240620"), "gcp-claude");
    }

    #[test]
    fn urls_and_bodies() {
        let raw = entry("my-proj", PEM_BODY);
        let cred = &parse_credentials(&raw).expect("valid")[0];
        assert_eq!(
            predict_url(DEFAULT_BASE_URL, cred, "claude-3-5-sonnet@20240620", false),
            "https://us-east5-aiplatform.googleapis.com/v1/projects/my-proj/locations/us-east5/publishers/anthropic/models/claude-3-5-sonnet@20240620:rawPredict"
        );
        assert_eq!(
            predict_url("http://127.0.0.1:9/", cred, "claude-3-haiku@20240307", true),
            "http://127.0.0.1:9/v1/projects/my-proj/locations/us-east5/publishers/anthropic/models/claude-3-haiku@20240307:streamRawPredict"
        );
        let Value::Object(m) = json!({"model":"x","stream":true,"max_tokens":3}) else {
            unreachable!()
        };
        let out: Value = serde_json::from_slice(&claude_body(m)).expect("json");
        assert_eq!(
            out,
            json!({"stream":true,"max_tokens":3,"anthropic_version":"vertex-2023-10-16"})
        );
    }

    #[test]
    fn the_fixture_key_written_as_in_gcp_credentials_makes_a_service_account() {
        let pem = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/TEST-ONLY-firebase-service-account-key.pem"
        ))
        .expect("fixture");
        let raw = entry("p", &pem.trim().replace('\n', "\\n"));
        let cred = &parse_credentials(&raw).expect("valid")[0];
        cred.service_account("https://oauth2.googleapis.com/token")
            .expect("usable key");
        let e = match cred.service_account("http://example.com/token") {
            Err(e) => e,
            Ok(_) => panic!("plain http to a remote host must be refused"),
        };
        assert!(e.contains("https"), "{e}");
    }
}
