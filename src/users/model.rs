//! The user record, in the JSON shape the original `oai-reverse-proxy` exports (camelCase,
//! epoch-millisecond timestamps), so exported users import unchanged.

use serde::{Deserialize, Serialize};
use thin_vec::ThinVec;

pub use super::counts::TokenCounts;
use super::token::Token;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UserType {
    /// Subject to quotas and IP limits.
    #[default]
    Normal,
    /// Exempt from quotas, IP limits and rate limits.
    Special,
    /// Expires at `expiresAt`, then is disabled and later purged.
    Temporary,
}

impl UserType {
    pub fn as_str(self) -> &'static str {
        match self {
            UserType::Normal => "normal",
            UserType::Special => "special",
            UserType::Temporary => "temporary",
        }
    }
}

/// One user, as stored, exported and imported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    /// Inline when short ([`Token`]): the gate compares it on every request.
    pub token: Token,
    /// A `ThinVec` (one pointer) rather than a `Vec` (three): most users have few addresses.
    #[serde(default)]
    pub ip: ThinVec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nickname: Option<Box<str>>,
    #[serde(rename = "type", default)]
    pub kind: UserType,
    #[serde(default)]
    pub prompt_count: u64,
    #[serde(default)]
    pub token_counts: TokenCounts,
    #[serde(default)]
    pub token_limits: TokenCounts,
    #[serde(default)]
    pub created_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<Box<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ips: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_note: Option<Box<str>>,
    /// The model families this user may use; `None` means the proxy's `ALLOWED_MODEL_FAMILIES`.
    /// A `ThinVec` inside the `Option` costs one pointer for the many users without a list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_families: Option<ThinVec<Box<str>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Boxed: rarely present, and a map takes 72 bytes even when empty.
    pub meta: Option<Box<serde_json::Map<String, serde_json::Value>>>,
}

impl User {
    /// A fresh user with the given token and limits, created now.
    pub fn new(token: String, kind: UserType, token_limits: TokenCounts, now_ms: i64) -> User {
        User {
            token: Token::from(token),
            ip: ThinVec::new(),
            nickname: None,
            kind,
            prompt_count: 0,
            token_counts: TokenCounts::new(),
            token_limits,
            created_at: now_ms,
            last_used_at: None,
            disabled_at: None,
            disabled_reason: None,
            expires_at: None,
            max_ips: None,
            admin_note: None,
            allowed_families: None,
            meta: None,
        }
    }

    pub fn is_disabled(&self) -> bool {
        self.disabled_at.is_some()
    }

    /// A temporary user whose expiry has passed is refused from that very moment, before the
    /// background sweep marks it disabled.
    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.kind == UserType::Temporary && self.expires_at.is_some_and(|e| e <= now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_export_round_trips() {
        let json = r#"{"token":"abc","ip":["1.2.3.4"],"type":"special","promptCount":3,
            "tokenCount":12,"tokenCounts":{"turbo":5,"gpt4":0,"claude":7},
            "tokenLimits":{"turbo":0,"gpt4":0,"claude":0},"createdAt":1690000000000,
            "lastUsedAt":1690000001000,"nickname":"bob"}"#;
        let u: User = serde_json::from_str(json).expect("original export parses");
        assert_eq!(u.kind, UserType::Special);
        assert_eq!(u.token_counts.get("claude"), Some(&7));
        let back = serde_json::to_value(&u).expect("serialises");
        assert_eq!(back["promptCount"], 3);
        assert!(back.get("tokenCount").is_none());
        assert!(back.get("allowedFamilies").is_none());
    }

    #[test]
    fn allowed_families_round_trip() {
        let json = r#"{"token":"abc","allowedFamilies":["turbo","claude"]}"#;
        let u: User = serde_json::from_str(json).expect("parses");
        let list: Vec<&str> = u
            .allowed_families
            .as_deref()
            .expect("present")
            .iter()
            .map(|f| &**f)
            .collect();
        assert_eq!(list, ["turbo", "claude"]);
        let back = serde_json::to_value(&u).expect("serialises");
        assert_eq!(
            back["allowedFamilies"],
            serde_json::json!(["turbo", "claude"])
        );
    }
}
