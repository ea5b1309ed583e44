//! Azure OpenAI: OpenAI chat and images in Azure's URL scheme. Each operator credential is one
//! deployment (`resource:deployment:apikey`, the original's `AZURE_CREDENTIALS` format): the
//! request goes to `{base}/openai/deployments/{deployment}/{operation}?api-version=...` with
//! the key in an `api-key` header, and the deployment — not the request's `model` — decides
//! the model, so usage is counted in `azure-` + the OpenAI family of the model the response
//! names. Request facts, usage and the stream-usage request are [`super::openai`]'s (Azure
//! reports a stream's usage only when asked). Knows nothing of users, quotas or routes.

use axum::http::HeaderName;

use super::families::{azure_family, family_for, OPENAI_FALLBACK};

/// The header that carries the operator's key (the bare key).
pub const AUTH_HEADER: HeaderName = HeaderName::from_static("api-key");

/// The default `AZURE_API_VERSION`: the latest GA version of the deployment-path inference
/// API (chat with `stream_options` and `max_completion_tokens`, images).
pub const DEFAULT_API_VERSION: &str = "2024-10-21";

/// The default `AZURE_BASE_URL`; `{resource}` is replaced by each credential's resource.
pub const DEFAULT_BASE_URL: &str = "https://{resource}.openai.azure.com";

/// One credential's resource and deployment (its key lives in the key pool, same index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    pub resource: String,
    pub deployment: String,
}

/// Where Azure requests go: the base URL template, the API version, and the deployment of
/// each key of the pool (by index).
#[derive(Debug, Clone)]
pub struct Deployments {
    pub base_template: String,
    pub api_version: String,
    pub deployments: Vec<Deployment>,
}

impl Deployments {
    /// The URL of a client path (`/v1/chat/completions`, `/v1/images/generations`) on the
    /// deployment of key `index`. The client's query string is not forwarded: `api-version` is
    /// the operator's choice.
    pub fn url(&self, index: usize, path: &str) -> String {
        let Some(d) = self.deployments.get(index) else {
            // The pool and the deployments are built from the same list; an index outside it
            // cannot be chosen. An unroutable URL makes the request fail rather than misroute.
            return String::new();
        };
        let base = self
            .base_template
            .replace("{resource}", &d.resource)
            .trim_end_matches('/')
            .to_string();
        let operation = path.strip_prefix("/v1").unwrap_or(path);
        format!(
            "{base}/openai/deployments/{}{operation}?api-version={}",
            urlencoding_segment(&d.deployment),
            urlencoding_segment(&self.api_version)
        )
    }

    /// The distinct deployment names (what clients send as `model`), for the model list.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .deployments
            .iter()
            .map(|d| d.deployment.as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

/// Percent-encodes what is not allowed in a path segment or query value (deployment names
/// are letters, digits, `-` and `_` in practice; anything else is encoded, not trusted).
fn urlencoding_segment(s: &str) -> String {
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

/// Parses `AZURE_CREDENTIALS` entries (`resource:deployment:apikey`); returns the deployments
/// and the keys in the same order. The error names the entry by position, never its text (it
/// holds a key).
pub fn parse_credentials(entries: &[&str]) -> Result<(Vec<Deployment>, Vec<String>), String> {
    let mut deployments = Vec::with_capacity(entries.len());
    let mut keys = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let parts: Vec<&str> = entry.split(':').map(str::trim).collect();
        match parts.as_slice() {
            [resource, deployment, key]
                if !resource.is_empty() && !deployment.is_empty() && !key.is_empty() =>
            {
                deployments.push(Deployment {
                    resource: resource.to_string(),
                    deployment: deployment.to_string(),
                });
                keys.push(key.to_string());
            }
            _ => {
                return Err(format!(
                    "AZURE_CREDENTIALS entry {} is not in the form resource:deployment:apikey (three non-empty parts separated by ':'); entries are separated by ','",
                    i + 1
                ))
            }
        }
    }
    Ok((deployments, keys))
}

/// The quota family of an Azure model: `azure-` + its OpenAI family (Azure writes
/// `gpt-35-turbo` for `gpt-3.5-turbo`); unknown models (a deployment name) are `azure-gpt4`,
/// as in the original.
pub fn family(model: &str) -> &'static str {
    let m = model.trim().to_ascii_lowercase();
    let m = m
        .replace("azure-", "")
        .replace("gpt-35-turbo", "gpt-3.5-turbo");
    let inner = family_for(&m)
        .filter(|f| is_openai_family(f))
        .unwrap_or(OPENAI_FALLBACK);
    azure_family(inner)
}

/// Whether a family is one of OpenAI's (not Claude, Gemini, Mistral...).
fn is_openai_family(f: &str) -> bool {
    !(f.starts_with("claude")
        || f.starts_with("gemini")
        || f.starts_with("mistral")
        || f.starts_with("aws-")
        || f.starts_with("gcp-")
        || f.starts_with("azure-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployments() -> Deployments {
        let (d, keys) =
            parse_credentials(&["contoso:gpt4o-prod:k1", "north:my dep:k2"]).expect("valid");
        assert_eq!(keys, vec!["k1", "k2"]);
        Deployments {
            base_template: DEFAULT_BASE_URL.to_string(),
            api_version: DEFAULT_API_VERSION.to_string(),
            deployments: d,
        }
    }

    #[test]
    fn urls_name_the_deployment_and_the_version() {
        let d = deployments();
        assert_eq!(
            d.url(0, "/v1/chat/completions"),
            "https://contoso.openai.azure.com/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            d.url(1, "/v1/images/generations"),
            "https://north.openai.azure.com/openai/deployments/my%20dep/images/generations?api-version=2024-10-21"
        );
        let local = Deployments {
            base_template: "http://127.0.0.1:9/{resource}/".into(),
            ..d
        };
        assert_eq!(
            local.url(0, "/v1/chat/completions"),
            "http://127.0.0.1:9/contoso/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
        );
    }

    #[test]
    fn bad_credentials_are_named_by_position_only() {
        let e = parse_credentials(&["a:b:c", "secret-key-only"]).expect_err("bad");
        assert!(e.contains("entry 2"), "{e}");
        assert!(!e.contains("secret"), "{e}");
        assert!(parse_credentials(&["a::c"]).is_err());
    }

    #[test]
    fn families() {
        assert_eq!(family("gpt-4o-2024-08-06"), "azure-gpt4o");
        assert_eq!(family("gpt-35-turbo"), "azure-turbo");
        assert_eq!(family("azure-gpt-4"), "azure-gpt4");
        assert_eq!(family("my-deployment"), "azure-gpt4");
        assert_eq!(family("dall-e-3"), "azure-dall-e");
        assert_eq!(family("claude-3-opus"), "azure-gpt4");
    }
}
