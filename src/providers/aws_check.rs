//! What the AWS key checker sends and how it reads AWS's answers, as pure functions: the STS
//! `GetCallerIdentity` call (is the credential valid, whose account is it), Bedrock's
//! model-invocation-logging configuration (are prompts logged), and the per-model probe — a
//! deliberately invalid `InvokeModel` (`max_tokens: -1`) that costs nothing and tells "may
//! invoke this model" (a validation error) from "may not" (access denied, not in this region).
//! After the original's `src/shared/key-management/aws/checker.ts`. The I/O (signing and
//! sending) is the checker's (`crate::proxy::checker`); knows nothing of pools or users.

use serde::Deserialize;
use serde_json::json;

use super::aws::{classify_error, ErrorKind, ANTHROPIC_VERSION};

/// The default `AWS_STS_BASE_URL`; `{region}` is replaced by the credential's region (the
/// regional STS endpoint, as current AWS SDKs use). Without `{region}` the call is signed for
/// `us-east-1`, the region of the global endpoint `https://sts.amazonaws.com`.
pub const DEFAULT_STS_BASE_URL: &str = "https://sts.{region}.amazonaws.com";
/// The default `AWS_BEDROCK_CONTROL_BASE_URL` (Bedrock's control plane, where the logging
/// configuration is read); `{region}` is replaced by the credential's region.
pub const DEFAULT_CONTROL_BASE_URL: &str = "https://bedrock.{region}.amazonaws.com";
/// The SigV4 service name of STS.
pub const STS_SERVICE: &str = "sts";

/// The Bedrock model ids probed for access, one per model (the original's list). A key may
/// serve a family when it may invoke at least one of the family's models.
pub const PROBE_MODELS: &[&str] = &[
    "anthropic.claude-3-haiku-20240307-v1:0",
    "anthropic.claude-3-5-haiku-20241022-v1:0",
    "anthropic.claude-3-sonnet-20240229-v1:0",
    "anthropic.claude-3-5-sonnet-20240620-v1:0",
    "anthropic.claude-3-5-sonnet-20241022-v2:0",
    "anthropic.claude-3-7-sonnet-20250219-v1:0",
    "anthropic.claude-sonnet-4-20250514-v1:0",
    "anthropic.claude-v2",
    "anthropic.claude-instant-v1",
    "anthropic.claude-3-opus-20240229-v1:0",
    "anthropic.claude-opus-4-20250514-v1:0",
    "mistral.mistral-7b-instruct-v0:2",
    "mistral.mixtral-8x7b-instruct-v0:1",
    "mistral.mistral-large-2402-v1:0",
    "mistral.mistral-large-2407-v1:0",
    "mistral.mistral-small-2402-v1:0",
];

/// The `GetCallerIdentity` URL and the region its signature names.
pub fn sts_url(template: &str, region: &str) -> (String, String) {
    let signing_region = if template.contains("{region}") {
        region.to_string()
    } else {
        "us-east-1".to_string()
    };
    (
        format!(
            "{}/?Action=GetCallerIdentity&Version=2011-06-15",
            super::aws::base_url(template, region)
        ),
        signing_region,
    )
}

/// The `GetModelInvocationLoggingConfiguration` URL of a region.
pub fn logging_url(template: &str, region: &str) -> String {
    format!(
        "{}/logging/modelinvocations",
        super::aws::base_url(template, region)
    )
}

/// The cross-region inference profile id of a Claude model for a credential's region
/// (`us.anthropic.…`, `eu.…`, `apac.…`): newer Claude models are only served through one.
pub fn inference_profile(model_id: &str, region: &str) -> Option<String> {
    if !model_id.starts_with("anthropic.") {
        return None;
    }
    let geo = if region.starts_with("us-gov-") {
        "us-gov"
    } else if region.starts_with("us-") || region.starts_with("ca-") {
        "us"
    } else if region.starts_with("eu-") {
        "eu"
    } else if region.starts_with("ap-") {
        "apac"
    } else {
        return None;
    };
    Some(format!("{geo}.{model_id}"))
}

/// The body of the access probe of a model: invalid on purpose (`max_tokens: -1`), so that a
/// credential that may invoke the model gets a free validation error.
pub fn probe_body(model_id: &str) -> Vec<u8> {
    let body = if model_id.contains("anthropic.") {
        json!({
            "max_tokens": -1,
            "messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello!"}],
            "anthropic_version": ANTHROPIC_VERSION,
        })
    } else {
        json!({"max_tokens": -1, "prompt": "<s>[INST] Hi! [/INST]"})
    };
    body.to_string().into_bytes()
}

/// What an AWS answer says about the credential itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialVerdict {
    /// Unknown key, wrong secret, expired: out of rotation (the AWS error code).
    Invalid(String),
    /// Throttled: try again later.
    Throttled,
}

/// The result of `GetCallerIdentity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// The credential is valid; the account it belongs to.
    Valid { account: String },
    /// AWS judged the credential.
    Verdict(CredentialVerdict),
    /// Any other answer (with its status and error code), which says nothing about the key.
    Unexpected(String),
}

/// The text of the first `<tag>…</tag>` of an XML document. STS answers in XML; the two
/// elements we read (`Account`, `Code`) hold plain text, so a search is enough and saves an
/// XML parser dependency for two fields.
fn xml_text<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&close)? + start;
    Some(xml[start..end].trim())
}

/// Reads STS's answer to `GetCallerIdentity`.
pub fn caller_identity(status: u16, body: &[u8]) -> Identity {
    let text = String::from_utf8_lossy(body);
    if status == 200 {
        return match xml_text(&text, "Account") {
            Some(account) => Identity::Valid {
                account: account.to_string(),
            },
            None => Identity::Unexpected("STS answered 200 without an Account".into()),
        };
    }
    let code = xml_text(&text, "Code").unwrap_or("").to_string();
    match code.as_str() {
        "InvalidClientTokenId"
        | "SignatureDoesNotMatch"
        | "ExpiredToken"
        | "IncompleteSignature"
        | "MissingAuthenticationToken"
            if status == 403 =>
        {
            Identity::Verdict(CredentialVerdict::Invalid(code))
        }
        "Throttling" | "ThrottlingException" | "RequestLimitExceeded" => {
            Identity::Verdict(CredentialVerdict::Throttled)
        }
        // `AccessDenied` (a policy that denies even this call) and anything else say nothing
        // certain about the key: the model probes decide.
        _ => Identity::Unexpected(format!("STS answered {status} {code}")),
    }
}

/// Whether Bedrock logs the prompts of a credential's account in its region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Logging {
    /// Model invocation logging delivers prompts (text, images, audio or video) somewhere.
    Enabled,
    /// No logging configuration, or one that delivers no prompt data.
    Disabled,
    /// Could not be read (no permission, unexpected answer): why. Such a key is used, as the
    /// original does.
    Unknown(String),
}

#[derive(Deserialize)]
struct LoggingAnswer {
    #[serde(rename = "loggingConfig")]
    logging_config: Option<LoggingConfig>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct LoggingConfig {
    #[serde(default)]
    text_data_delivery_enabled: bool,
    #[serde(default)]
    image_data_delivery_enabled: bool,
    #[serde(default)]
    audio_data_delivery_enabled: bool,
    #[serde(default)]
    video_data_delivery_enabled: bool,
}

/// Reads the answer to `GetModelInvocationLoggingConfiguration`. `error_type` is the
/// `x-amzn-ErrorType` header of an error answer.
pub fn logging(status: u16, error_type: Option<&str>, body: &[u8]) -> Logging {
    if status != 200 {
        let t = error_type
            .and_then(|t| t.split(':').next())
            .unwrap_or("no error type");
        return Logging::Unknown(format!("HTTP {status} {t}"));
    }
    match serde_json::from_slice::<LoggingAnswer>(body) {
        Ok(LoggingAnswer {
            logging_config: Some(c),
        }) if c.text_data_delivery_enabled
            || c.image_data_delivery_enabled
            || c.audio_data_delivery_enabled
            || c.video_data_delivery_enabled =>
        {
            Logging::Enabled
        }
        Ok(_) => Logging::Disabled,
        Err(e) => Logging::Unknown(format!("unreadable answer: {e}")),
    }
}

/// What a model probe says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelAccess {
    /// The credential may invoke the model.
    Available,
    /// It may not (access denied, not served in its region, refused for another reason).
    Unavailable,
    /// AWS judged the credential itself.
    Verdict(CredentialVerdict),
}

/// Reads the answer to a model probe. `error_type` is the `x-amzn-ErrorType` header.
pub fn model_access(status: u16, error_type: Option<&str>, body: &[u8]) -> ModelAccess {
    let kind = error_type.map(classify_error);
    let short = error_type
        .and_then(|t| t.split(':').next())
        .unwrap_or("")
        .to_ascii_lowercase();
    if kind == Some(ErrorKind::BadCredential) {
        return ModelAccess::Verdict(CredentialVerdict::Invalid(
            error_type
                .and_then(|t| t.split(':').next())
                .unwrap_or("")
                .to_string(),
        ));
    }
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("message")
                .or_else(|| v.get("Message"))
                .and_then(|m| m.as_str())
                .map(str::to_ascii_lowercase)
        })
        .unwrap_or_default();
    match status {
        // The probe was accepted (a model that ignores the bad field): it may invoke it.
        200..=299 => ModelAccess::Available,
        // The request reached the model and only its body was refused. Other validation
        // errors ("the provided model identifier is invalid", "on-demand throughput isn't
        // supported") mean this id cannot be invoked.
        400 if short == "validationexception"
            && (message.contains("max_tokens") || message.contains("validation error")) =>
        {
            ModelAccess::Available
        }
        // Throttled or temporarily unavailable: only a credential with access gets that far.
        429 if short == "throttlingexception" => ModelAccess::Available,
        503 if short == "serviceunavailableexception" => ModelAccess::Available,
        _ => ModelAccess::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            sts_url(DEFAULT_STS_BASE_URL, "eu-west-1"),
            (
                "https://sts.eu-west-1.amazonaws.com/?Action=GetCallerIdentity&Version=2011-06-15"
                    .to_string(),
                "eu-west-1".to_string()
            )
        );
        assert_eq!(
            sts_url("https://sts.amazonaws.com/", "eu-west-1").1,
            "us-east-1"
        );
        assert_eq!(
            logging_url(DEFAULT_CONTROL_BASE_URL, "us-west-2"),
            "https://bedrock.us-west-2.amazonaws.com/logging/modelinvocations"
        );
        assert_eq!(
            inference_profile("anthropic.claude-3-haiku-20240307-v1:0", "ap-northeast-1")
                .as_deref(),
            Some("apac.anthropic.claude-3-haiku-20240307-v1:0")
        );
        assert_eq!(
            inference_profile("mistral.mistral-7b-instruct-v0:2", "us-east-1"),
            None
        );
    }

    #[test]
    fn caller_identity_answers() {
        let ok = br#"<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <GetCallerIdentityResult>
    <Arn>arn:aws:iam::123456789012:user/proxy</Arn>
    <UserId>AIDAEXAMPLE</UserId>
    <Account>123456789012</Account>
  </GetCallerIdentityResult>
</GetCallerIdentityResponse>"#;
        assert_eq!(
            caller_identity(200, ok),
            Identity::Valid {
                account: "123456789012".into()
            }
        );
        let bad = br#"<ErrorResponse><Error><Type>Sender</Type><Code>InvalidClientTokenId</Code><Message>The security token included in the request is invalid.</Message></Error></ErrorResponse>"#;
        assert_eq!(
            caller_identity(403, bad),
            Identity::Verdict(CredentialVerdict::Invalid("InvalidClientTokenId".into()))
        );
        let throttled = br#"<ErrorResponse><Error><Code>Throttling</Code></Error></ErrorResponse>"#;
        assert_eq!(
            caller_identity(400, throttled),
            Identity::Verdict(CredentialVerdict::Throttled)
        );
        assert!(matches!(
            caller_identity(400, b"nonsense"),
            Identity::Unexpected(_)
        ));
    }

    #[test]
    fn logging_answers() {
        let on = br#"{"loggingConfig":{"s3Config":{"bucketName":"b"},"textDataDeliveryEnabled":true,"imageDataDeliveryEnabled":false,"embeddingDataDeliveryEnabled":false}}"#;
        assert_eq!(logging(200, None, on), Logging::Enabled);
        let embeddings_only = br#"{"loggingConfig":{"textDataDeliveryEnabled":false,"embeddingDataDeliveryEnabled":true}}"#;
        assert_eq!(logging(200, None, embeddings_only), Logging::Disabled);
        assert_eq!(logging(200, None, b"{}"), Logging::Disabled);
        assert!(matches!(
            logging(403, Some("AccessDeniedException:http://x"), b"{}"),
            Logging::Unknown(_)
        ));
    }

    #[test]
    fn model_probe_answers() {
        let msg = |m: &str| serde_json::to_vec(&json!({ "message": m })).expect("json");
        assert_eq!(
            model_access(
                400,
                Some("ValidationException"),
                &msg("Malformed input request: #/max_tokens: -1 is not greater or equal to 1")
            ),
            ModelAccess::Available
        );
        assert_eq!(
            model_access(
                400,
                Some("ValidationException"),
                &msg("The provided model identifier is invalid.")
            ),
            ModelAccess::Unavailable
        );
        assert_eq!(
            model_access(
                403,
                Some("AccessDeniedException:http://internal.amazon.com/coral/"),
                &msg("You don't have access to the model with the specified model ID.")
            ),
            ModelAccess::Unavailable
        );
        assert_eq!(
            model_access(404, Some("ResourceNotFoundException"), &msg("x")),
            ModelAccess::Unavailable
        );
        assert_eq!(
            model_access(429, Some("ThrottlingException"), &msg("slow down")),
            ModelAccess::Available
        );
        assert_eq!(
            model_access(403, Some("UnrecognizedClientException"), &msg("invalid")),
            ModelAccess::Verdict(CredentialVerdict::Invalid(
                "UnrecognizedClientException".into()
            ))
        );
    }
}
