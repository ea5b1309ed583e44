//! Operator policy over proxied requests: which model families may be used (globally and per
//! user), context and output caps per service, image inputs, tool definitions, rejected phrases
//! and blocked origins. Pure decisions over provider-neutral request facts: knows no HTTP
//! types, no provider wire format and no user store.
//!
//! Names and defaults follow the original `oai-reverse-proxy` (its `config.ts` and the request
//! preprocessors `validate-model-family`, `validate-context-size`, `validate-vision`,
//! `language-filter` and `check-origin`); `docs/policy.md` documents every switch.

pub mod origin;
pub mod phrases;
pub mod settings;

use std::collections::BTreeMap;

pub use origin::{BlockedOrigins, OriginBlock};
pub use phrases::{RejectPhrases, Rejections};
pub use settings::{parse_csv, FamilyAllowList, Settings};

/// The facts about one generation request that the rules look at, as the provider layer
/// reads them from the body.
#[derive(Debug, Clone, Default)]
pub struct RequestFacts<'a> {
    /// The service the request goes to, as named in `ALLOWED_VISION_SERVICES` and the
    /// `MAX_*_TOKENS_<SERVICE>` variables: `openai`, `anthropic`, `google-ai`, ….
    pub service: &'a str,
    /// The `model` the client asked for.
    pub model: &'a str,
    /// The model family the model resolves to (unknown names: the service's default family).
    pub family: &'a str,
    /// The prompt carries an image.
    pub has_images: bool,
    /// The request defines tools or functions.
    pub has_tools: bool,
    /// The tools rule covers this API (OpenAI-style chat, as the original's
    /// `ALLOW_OPENAI_TOOL_USAGE`).
    pub openai_tools_api: bool,
}

/// Who sends the request, as far as policy cares.
#[derive(Debug, Clone, Copy, Default)]
pub struct Caller<'a> {
    /// A special user (exempt from the context cap and the vision rule, as in the original).
    pub special: bool,
    /// The user's own `allowedFamilies`; `None` = the proxy's list.
    pub allowed_families: Option<&'a [Box<str>]>,
}

/// Why a request is refused. The caller turns it into its error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not allowed at all (family, images, tools): 403.
    Forbidden { kind: &'static str, message: String },
    /// The request must change (too long, rejected content): 400.
    BadRequest { kind: &'static str, message: String },
}

impl Refusal {
    pub fn message(&self) -> &str {
        match self {
            Refusal::Forbidden { message, .. } | Refusal::BadRequest { message, .. } => message,
        }
    }
}

/// The policy, built once from [`Settings`].
#[derive(Debug)]
pub struct Policy {
    families: FamilyAllowList,
    max_context: BTreeMap<String, u64>,
    max_output: BTreeMap<String, u64>,
    vision_services: Vec<String>,
    allow_openai_tools: bool,
    pub phrases: RejectPhrases,
    pub origins: BlockedOrigins,
    /// Recent rejections per address, for the slow-down of `REJECT_PHRASES`.
    pub rejections: Rejections,
}

impl Policy {
    pub fn new(s: &Settings) -> Policy {
        Policy {
            families: s.allowed_families.clone(),
            max_context: s.max_context.clone(),
            max_output: s.max_output.clone(),
            vision_services: s.vision_services.clone(),
            allow_openai_tools: s.allow_openai_tools,
            phrases: s.reject_phrases.clone(),
            origins: s.blocked_origins.clone(),
            rejections: Rejections::default(),
        }
    }

    /// The rules that need only the request's shape, not its size: family, images, tools.
    pub fn check_request(&self, req: &RequestFacts<'_>, caller: Caller<'_>) -> Result<(), Refusal> {
        self.check_family(req, caller)?;
        if req.has_images
            && !caller.special
            && !self.vision_services.iter().any(|s| s == req.service)
        {
            return Err(Refusal::Forbidden {
                kind: "vision_not_allowed",
                message: format!(
                    "Prompts containing images are not permitted on this proxy's {} service (ALLOWED_VISION_SERVICES). Remove the images (disable inline images in your client) and try again.",
                    req.service
                ),
            });
        }
        if req.has_tools && req.openai_tools_api && !self.allow_openai_tools {
            return Err(Refusal::Forbidden {
                kind: "tools_not_allowed",
                message: "Tool and function definitions are not permitted on this proxy (ALLOW_OPENAI_TOOL_USAGE is off). Remove `tools`/`functions` from the request and try again.".into(),
            });
        }
        Ok(())
    }

    /// The family rule alone: the user's own list if they have one, else the proxy's.
    pub fn check_family(&self, req: &RequestFacts<'_>, caller: Caller<'_>) -> Result<(), Refusal> {
        let (allowed, whose) = match caller.allowed_families {
            Some(list) => (
                list.iter().any(|f| &**f == req.family),
                "your token's allowed families",
            ),
            None => (self.families.allows(req.family), "ALLOWED_MODEL_FAMILIES"),
        };
        if allowed {
            return Ok(());
        }
        Err(Refusal::Forbidden {
            kind: "model_family_not_allowed",
            message: format!(
                "Model '{}' belongs to model family '{}', which is not enabled on this proxy for you ({whose}). Use a model of an allowed family.",
                req.model, req.family
            ),
        })
    }

    /// Whether the proxy's own list (`ALLOWED_MODEL_FAMILIES`) allows `family`.
    pub fn family_allowed(&self, family: &str) -> bool {
        self.families.allows(family)
    }

    /// The output cap of a service (`MAX_OUTPUT_TOKENS_<SERVICE>`), `None` when uncapped.
    pub fn output_cap(&self, service: &str) -> Option<u64> {
        self.max_output.get(service).copied().filter(|&n| n > 0)
    }

    /// The context cap of a service (`MAX_CONTEXT_TOKENS_<SERVICE>`), `None` when uncapped or
    /// for special users.
    pub fn context_cap(&self, service: &str, caller: Caller<'_>) -> Option<u64> {
        if caller.special {
            return None;
        }
        self.max_context.get(service).copied().filter(|&n| n > 0)
    }

    /// The context rule: `prompt + output` tokens must fit the service's cap.
    pub fn check_context(
        &self,
        service: &str,
        caller: Caller<'_>,
        prompt: u64,
        output: u64,
    ) -> Result<(), Refusal> {
        let Some(max) = self.context_cap(service, caller) else {
            return Ok(());
        };
        let total = prompt.saturating_add(output);
        if total <= max {
            return Ok(());
        }
        let var = settings::var_name("MAX_CONTEXT_TOKENS_", service);
        Err(Refusal::BadRequest {
            kind: "context_too_long",
            message: format!(
                "Your request exceeds the context size limit of this proxy (max: {max} tokens, set by {var}; requested: {prompt} prompt + {output} output = {total} context tokens). Shorten the prompt or lower max_tokens."
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(vars: &[(&str, &str)]) -> Policy {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Policy::new(&Settings::from_vars(&vars).expect("valid settings"))
    }

    fn facts<'a>(service: &'a str, model: &'a str, family: &'a str) -> RequestFacts<'a> {
        RequestFacts {
            service,
            model,
            family,
            ..Default::default()
        }
    }

    #[test]
    fn default_families_allow_everything_but_image_generation() {
        let p = policy(&[]);
        let ok = |m, f| p.check_request(&facts("openai", m, f), Caller::default());
        assert!(ok("gpt-4o", "gpt4o").is_ok());
        assert!(ok("o3", "o3").is_ok());
        assert!(ok("claude-3", "claude").is_ok());
        let e = ok("dall-e-3", "dall-e").expect_err("image generation is off by default");
        assert!(e.message().contains("'dall-e-3'") && e.message().contains("'dall-e'"));
        assert!(ok("dall-e-3", "azure-dall-e").is_err());
    }

    #[test]
    fn the_configured_list_and_a_users_list_decide() {
        let p = policy(&[("ALLOWED_MODEL_FAMILIES", "turbo, claude")]);
        let c = Caller::default();
        assert!(p
            .check_family(&facts("openai", "gpt-3.5-turbo", "turbo"), c)
            .is_ok());
        let e = p
            .check_family(&facts("openai", "my-custom-model", "gpt4"), c)
            .expect_err("gpt4 is not listed");
        assert!(matches!(e, Refusal::Forbidden { .. }));
        assert!(e.message().contains("ALLOWED_MODEL_FAMILIES"));
        // A user's own list replaces the proxy's.
        let own: Vec<Box<str>> = vec!["gpt4".into()];
        let user = Caller {
            special: false,
            allowed_families: Some(&own),
        };
        assert!(p
            .check_family(&facts("openai", "gpt-4", "gpt4"), user)
            .is_ok());
        let e = p
            .check_family(&facts("openai", "gpt-3.5-turbo", "turbo"), user)
            .expect_err("not on the user's list");
        assert!(e.message().contains("your token"));
        let none: Vec<Box<str>> = vec![];
        let nobody = Caller {
            special: false,
            allowed_families: Some(&none),
        };
        assert!(p
            .check_family(&facts("openai", "gpt-4", "gpt4"), nobody)
            .is_err());
    }

    #[test]
    fn context_cap_counts_prompt_and_output_and_spares_special_users() {
        let p = policy(&[("MAX_CONTEXT_TOKENS_OPENAI", "100")]);
        let c = Caller::default();
        assert!(p.check_context("openai", c, 60, 40).is_ok());
        let e = p.check_context("openai", c, 61, 40).expect_err("too long");
        assert!(matches!(e, Refusal::BadRequest { .. }));
        assert!(
            e.message().contains("61 prompt + 40 output = 101"),
            "{}",
            e.message()
        );
        assert!(e.message().contains("MAX_CONTEXT_TOKENS_OPENAI"));
        let special = Caller {
            special: true,
            allowed_families: None,
        };
        assert!(p.check_context("openai", special, 1_000_000, 0).is_ok());
        // The original's default for Anthropic; 0 means no cap; other services have none.
        assert_eq!(p.context_cap("anthropic", c), Some(32768));
        assert!(policy(&[("MAX_CONTEXT_TOKENS_OPENAI", "0")])
            .check_context("openai", c, u64::MAX, 1)
            .is_ok());
        assert_eq!(p.context_cap("google-ai", c), None);
    }

    #[test]
    fn output_caps_follow_the_originals_names_and_defaults() {
        let p = policy(&[]);
        assert_eq!(p.output_cap("openai"), Some(1024));
        assert_eq!(p.output_cap("anthropic"), Some(1024));
        assert_eq!(p.output_cap("mistral-ai"), None);
        let p = policy(&[
            ("MAX_OUTPUT_TOKENS", "300"),
            ("MAX_OUTPUT_TOKENS_ANTHROPIC", "500"),
        ]);
        assert_eq!(p.output_cap("openai"), Some(300));
        assert_eq!(p.output_cap("anthropic"), Some(500));
        let p = policy(&[
            ("MAX_OUTPUT_TOKENS_GOOGLE_AI", "77"),
            ("MAX_OUTPUT_TOKENS_OPENAI", "0"),
        ]);
        assert_eq!(p.output_cap("google-ai"), Some(77));
        assert_eq!(p.output_cap("openai"), None);
    }

    #[test]
    fn images_need_an_allowed_service_unless_special() {
        let p = policy(&[("ALLOWED_VISION_SERVICES", "anthropic")]);
        let mut f = facts("openai", "gpt-4o", "gpt4o");
        f.has_images = true;
        let e = p
            .check_request(&f, Caller::default())
            .expect_err("no vision on openai");
        assert!(e.message().contains("ALLOWED_VISION_SERVICES"));
        let special = Caller {
            special: true,
            allowed_families: None,
        };
        assert!(p.check_request(&f, special).is_ok());
        f.service = "anthropic";
        assert!(p.check_request(&f, Caller::default()).is_ok());
        // The original's deprecated switch enables both.
        let p = policy(&[("ALLOW_IMAGE_PROMPTS", "true")]);
        f.service = "openai";
        assert!(p.check_request(&f, Caller::default()).is_ok());
    }

    #[test]
    fn tools_need_the_switch() {
        let mut f = facts("openai", "gpt-4o", "gpt4o");
        f.has_tools = true;
        f.openai_tools_api = true;
        let e = policy(&[])
            .check_request(&f, Caller::default())
            .expect_err("off by default");
        assert!(e.message().contains("ALLOW_OPENAI_TOOL_USAGE"));
        assert!(policy(&[("ALLOW_OPENAI_TOOL_USAGE", "true")])
            .check_request(&f, Caller::default())
            .is_ok());
        // Anthropic tools were never covered by the switch.
        f.openai_tools_api = false;
        assert!(policy(&[]).check_request(&f, Caller::default()).is_ok());
    }
}
