//! The policy's variables, read from the environment list (as `TOKEN_QUOTA_*`: the
//! `MAX_*_TOKENS_<SERVICE>` names are open-ended) with the original's names and defaults.
//! An empty variable counts as unset. Errors name the variable and the value.

use std::collections::BTreeMap;

use crate::config::ConfigError;

use super::origin::BlockedOrigins;
use super::phrases::RejectPhrases;

/// The original's default `MAX_CONTEXT_TOKENS_OPENAI` / `_ANTHROPIC`.
pub const DEFAULT_MAX_CONTEXT: u64 = 32768;
/// The original's default `MAX_OUTPUT_TOKENS_OPENAI` / `_ANTHROPIC` (and `MAX_OUTPUT_TOKENS`).
pub const DEFAULT_MAX_OUTPUT: u64 = 1024;
/// The original's default `REJECT_MESSAGE`.
pub const DEFAULT_REJECT_MESSAGE: &str = "This content violates /aicg/'s acceptable use policy.";
/// The original's default `BLOCK_MESSAGE`.
pub const DEFAULT_BLOCK_MESSAGE: &str =
    "You must be over the age of majority in your country to use this service.";
/// The original's default `BLOCK_REDIRECT`.
pub const DEFAULT_BLOCK_REDIRECT: &str = "https://www.9gag.com";

/// Which model families may be used when a user has no list of their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FamilyAllowList {
    /// The default: every family except image generation (`dall-e`, `azure-dall-e`, …), so
    /// families added later (new providers) are allowed without editing the variable.
    AllButImages,
    /// `ALLOWED_MODEL_FAMILIES` as set.
    Only(Vec<String>),
}

impl FamilyAllowList {
    pub fn allows(&self, family: &str) -> bool {
        match self {
            FamilyAllowList::AllButImages => !is_image_family(family),
            FamilyAllowList::Only(list) => list.iter().any(|f| f == family),
        }
    }
}

/// Image-generation families (the original's `dall-e` and its Azure twin).
pub fn is_image_family(family: &str) -> bool {
    family.contains("dall-e")
}

/// Every policy setting, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub allowed_families: FamilyAllowList,
    /// `MAX_CONTEXT_TOKENS_<SERVICE>` by service name (`openai`, `anthropic`, `google-ai`, …).
    pub max_context: BTreeMap<String, u64>,
    /// `MAX_OUTPUT_TOKENS_<SERVICE>` by service name.
    pub max_output: BTreeMap<String, u64>,
    /// `ALLOWED_VISION_SERVICES`.
    pub vision_services: Vec<String>,
    /// `ALLOW_OPENAI_TOOL_USAGE`.
    pub allow_openai_tools: bool,
    pub reject_phrases: RejectPhrases,
    pub blocked_origins: BlockedOrigins,
}

/// `OPENAI` → `openai`, `GOOGLE_AI` → `google-ai`: a variable suffix as a service name.
fn service_of(suffix: &str) -> String {
    suffix.to_ascii_lowercase().replace('_', "-")
}

/// The variable for a service: `("MAX_CONTEXT_TOKENS_", "google-ai")` → `MAX_CONTEXT_TOKENS_GOOGLE_AI`.
pub fn var_name(prefix: &str, service: &str) -> String {
    format!("{prefix}{}", service.to_ascii_uppercase().replace('-', "_"))
}

/// Splits a comma-separated list as the original's `parseCsv` does: items may be quoted
/// (`"a, b"` keeps its comma), surrounding spaces are trimmed, empty items are dropped.
pub fn parse_csv(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(std::mem::take(&mut cur));
            }
            c => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn parse_bool(name: &str, v: &str) -> Result<bool, ConfigError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(ConfigError(format!(
            "{name}={v:?} is invalid: use true or false"
        ))),
    }
}

fn parse_count(name: &str, v: &str) -> Result<u64, ConfigError> {
    v.trim().parse().map_err(|_| {
        ConfigError(format!(
            "{name}={v:?} is not a whole number of tokens; use 0 (no cap) or a positive integer"
        ))
    })
}

impl Settings {
    /// Reads the policy variables from `vars` (the process environment, or a test's list).
    pub fn from_vars(vars: &[(String, String)]) -> Result<Settings, ConfigError> {
        let get = |name: &str| -> Option<&str> {
            vars.iter()
                .rev()
                .find(|(k, v)| k == name && !v.trim().is_empty())
                .map(|(_, v)| v.as_str())
        };

        let allowed_families = match get("ALLOWED_MODEL_FAMILIES") {
            None => FamilyAllowList::AllButImages,
            Some(v) => {
                let list: Vec<String> = parse_csv(v)
                    .into_iter()
                    .map(|f| f.to_ascii_lowercase())
                    .collect();
                if let Some(bad) = list.iter().find(|f| !crate::users::ops::is_family_name(f)) {
                    return Err(ConfigError(format!(
                        "ALLOWED_MODEL_FAMILIES: {bad:?} is not a model-family name; list families such as turbo,gpt4o,claude (see docs/quotas.md)"
                    )));
                }
                FamilyAllowList::Only(list)
            }
        };

        let mut max_context = BTreeMap::from([
            ("openai".to_string(), DEFAULT_MAX_CONTEXT),
            ("anthropic".to_string(), DEFAULT_MAX_CONTEXT),
        ]);
        // MAX_OUTPUT_TOKENS is the original's fallback for both of its services.
        let output_default = match get("MAX_OUTPUT_TOKENS") {
            Some(v) => parse_count("MAX_OUTPUT_TOKENS", v)?,
            None => DEFAULT_MAX_OUTPUT,
        };
        let mut max_output = BTreeMap::from([
            ("openai".to_string(), output_default),
            ("anthropic".to_string(), output_default),
        ]);
        for (name, value) in vars {
            if value.trim().is_empty() {
                continue;
            }
            if let Some(s) = name.strip_prefix("MAX_CONTEXT_TOKENS_") {
                max_context.insert(service_of(s), parse_count(name, value)?);
            } else if let Some(s) = name.strip_prefix("MAX_OUTPUT_TOKENS_") {
                max_output.insert(service_of(s), parse_count(name, value)?);
            }
        }

        let mut vision_services: Vec<String> = get("ALLOWED_VISION_SERVICES")
            .map(parse_csv)
            .unwrap_or_default()
            .into_iter()
            .map(|s| service_of(&s))
            .collect();
        // The original's deprecated switch: images on both of its services.
        if vision_services.is_empty()
            && get("ALLOW_IMAGE_PROMPTS")
                .map(|v| parse_bool("ALLOW_IMAGE_PROMPTS", v))
                .transpose()?
                .unwrap_or(false)
        {
            vision_services = vec!["openai".into(), "anthropic".into()];
        }

        let allow_openai_tools = get("ALLOW_OPENAI_TOOL_USAGE")
            .map(|v| parse_bool("ALLOW_OPENAI_TOOL_USAGE", v))
            .transpose()?
            .unwrap_or(false);

        let reject_phrases = RejectPhrases::new(
            &parse_csv(get("REJECT_PHRASES").unwrap_or("")),
            get("REJECT_MESSAGE").unwrap_or(DEFAULT_REJECT_MESSAGE),
        )?;
        let blocked_origins = BlockedOrigins::new(
            &parse_csv(get("BLOCKED_ORIGINS").unwrap_or("")),
            get("BLOCK_MESSAGE").unwrap_or(DEFAULT_BLOCK_MESSAGE),
            get("BLOCK_REDIRECT").unwrap_or(DEFAULT_BLOCK_REDIRECT),
        )?;

        Ok(Settings {
            allowed_families,
            max_context,
            max_output,
            vision_services,
            allow_openai_tools,
            reject_phrases,
            blocked_origins,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn csv_keeps_quoted_commas_and_trims() {
        assert_eq!(
            parse_csv(r#"foo, "bar, baz" ,qux,,"#),
            vec!["foo", "bar, baz", "qux"]
        );
        assert!(parse_csv("").is_empty());
    }

    #[test]
    fn defaults_are_the_originals() {
        let s = Settings::from_vars(&[]).expect("defaults");
        assert_eq!(s.allowed_families, FamilyAllowList::AllButImages);
        assert_eq!(s.max_context.get("openai"), Some(&32768));
        assert_eq!(s.max_output.get("anthropic"), Some(&1024));
        assert!(s.vision_services.is_empty());
        assert!(!s.allow_openai_tools);
        assert!(s.reject_phrases.is_empty());
        assert!(s.blocked_origins.is_empty());
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (k, v) in [
            ("MAX_CONTEXT_TOKENS_OPENAI", "lots"),
            ("MAX_OUTPUT_TOKENS", "-1"),
            ("ALLOW_OPENAI_TOOL_USAGE", "maybe"),
            ("ALLOWED_MODEL_FAMILIES", "turbo,GPT 4"),
            ("BLOCK_REDIRECT", "not a url"),
        ] {
            let e = Settings::from_vars(&vars(&[(k, v)])).expect_err("invalid");
            assert!(e.0.contains(k), "{k}: {}", e.0);
        }
    }

    #[test]
    fn empty_values_count_as_unset() {
        let s = Settings::from_vars(&vars(&[
            ("ALLOWED_MODEL_FAMILIES", ""),
            ("MAX_CONTEXT_TOKENS_OPENAI", " "),
        ]))
        .expect("valid");
        assert_eq!(s.allowed_families, FamilyAllowList::AllButImages);
        assert_eq!(s.max_context.get("openai"), Some(&32768));
    }

    #[test]
    fn service_names_come_from_the_suffix() {
        let s = Settings::from_vars(&vars(&[
            ("MAX_CONTEXT_TOKENS_GOOGLE_AI", "1000"),
            ("ALLOWED_VISION_SERVICES", "openai,google_ai"),
        ]))
        .expect("valid");
        assert_eq!(s.max_context.get("google-ai"), Some(&1000));
        assert_eq!(s.vision_services, vec!["openai", "google-ai"]);
        assert_eq!(
            var_name("MAX_CONTEXT_TOKENS_", "google-ai"),
            "MAX_CONTEXT_TOKENS_GOOGLE_AI"
        );
    }
}
