//! What an upstream's error answer says about the key that was used: revoked, over quota, or
//! merely rate-limited. Read by the forwarder (to take a key out of rotation) and by the key
//! checkers; knows only the providers' error bodies, nothing of pools or requests.

use serde::Deserialize;

use super::Provider;

/// What an error answer says about the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyVerdict {
    /// The key is invalid, revoked, or its organisation is disabled.
    Revoked,
    /// The key's quota or credit is spent (`insufficient_quota`, "credit balance is too low").
    OverQuota(&'static str),
    /// A passing rate limit.
    RateLimited,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorField,
}

#[derive(Deserialize)]
struct ErrorField {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// Whether an error status needs its body read to judge the key (the forwarder reads such
/// bodies, bounded, before deciding).
pub fn body_matters(provider: Provider, status: u16) -> bool {
    match status {
        429 => true,
        // Google answers an invalid key with 400 `API_KEY_INVALID`, not 401/403.
        400 => matches!(provider, Provider::Anthropic | Provider::GoogleAi),
        _ => false,
    }
}

/// Judges an error answer (`status` and its body) for the key that was used; `None` when the
/// answer says nothing about the key (a bad request, a server error).
pub fn judge(provider: Provider, status: u16, body: &[u8]) -> Option<KeyVerdict> {
    if status == 401 || status == 403 {
        return Some(KeyVerdict::Revoked);
    }
    if status != 429 && status != 400 {
        return None;
    }
    if provider == Provider::GoogleAi {
        // Google's error body is `{"error":{"code":400,"status":"INVALID_ARGUMENT",
        // "details":[{"reason":"API_KEY_INVALID",...}]}}`: its numeric `code` does not fit the
        // shape below, and the reason sits in `details`, so look for the reason itself.
        if status == 400 {
            let invalid = contains_bytes(body, b"API_KEY_INVALID");
            return invalid.then_some(KeyVerdict::Revoked);
        }
        return Some(KeyVerdict::RateLimited);
    }
    let err = serde_json::from_slice::<ErrorBody>(body)
        .ok()
        .map(|b| b.error);
    let field = |f: fn(&ErrorField) -> &Option<String>| {
        err.as_ref()
            .and_then(|e| f(e).as_deref())
            .unwrap_or("")
            .to_ascii_lowercase()
    };
    let (kind, code, message) = (
        field(|e| &e.kind),
        field(|e| &e.code),
        field(|e| &e.message),
    );
    if provider == Provider::OpenAi {
        if status != 429 {
            return None;
        }
        // OpenAI puts the reason in `type` (older answers) or `code` (newer ones).
        for reason in [kind.as_str(), code.as_str()] {
            match reason {
                "insufficient_quota" => return Some(KeyVerdict::OverQuota("insufficient_quota")),
                "billing_not_active" => return Some(KeyVerdict::OverQuota("billing_not_active")),
                "access_terminated" => return Some(KeyVerdict::Revoked),
                _ => {}
            }
        }
        return Some(KeyVerdict::RateLimited);
    }
    if provider == Provider::Anthropic {
        if message.contains("credit balance is too low") {
            return Some(KeyVerdict::OverQuota("credit balance is too low"));
        }
        if message.contains("usage blocked until") {
            return Some(KeyVerdict::OverQuota("usage blocked"));
        }
        if message.contains("organization has been disabled") {
            return Some(KeyVerdict::Revoked);
        }
        return (status == 429).then_some(KeyVerdict::RateLimited);
    }
    (status == 429).then_some(KeyVerdict::RateLimited)
}

/// Whether `needle` occurs in `haystack`.
fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn google_invalid_keys_are_revoked_but_bad_requests_are_not() {
        let invalid = br#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com"}]}}"#;
        assert!(body_matters(Provider::GoogleAi, 400));
        assert_eq!(
            judge(Provider::GoogleAi, 400, invalid),
            Some(KeyVerdict::Revoked)
        );
        let bad_request = br#"{"error":{"code":400,"message":"Invalid JSON payload received.","status":"INVALID_ARGUMENT"}}"#;
        assert_eq!(judge(Provider::GoogleAi, 400, bad_request), None);
        assert_eq!(
            judge(Provider::GoogleAi, 429, b"{}"),
            Some(KeyVerdict::RateLimited)
        );
    }

    #[test]
    fn openai_quota_and_rate_limits() {
        let quota = br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
        assert_eq!(
            judge(Provider::OpenAi, 429, quota),
            Some(KeyVerdict::OverQuota("insufficient_quota"))
        );
        let limited = br#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#;
        assert_eq!(
            judge(Provider::OpenAi, 429, limited),
            Some(KeyVerdict::RateLimited)
        );
        assert_eq!(
            judge(Provider::OpenAi, 429, b"not json"),
            Some(KeyVerdict::RateLimited)
        );
        assert_eq!(judge(Provider::OpenAi, 401, b""), Some(KeyVerdict::Revoked));
        assert_eq!(judge(Provider::OpenAi, 400, quota), None);
    }

    #[test]
    fn anthropic_billing_errors() {
        let credit = br#"{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access the Anthropic API."}}"#;
        assert!(matches!(
            judge(Provider::Anthropic, 400, credit),
            Some(KeyVerdict::OverQuota(_))
        ));
        let bad = br#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: field required"}}"#;
        assert_eq!(judge(Provider::Anthropic, 400, bad), None);
        let limited =
            br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#;
        assert_eq!(
            judge(Provider::Anthropic, 429, limited),
            Some(KeyVerdict::RateLimited)
        );
    }
}
