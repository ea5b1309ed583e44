//! The model-family table: which quota bucket (`tokenCounts`/`tokenLimits` key) a model name
//! belongs to. This is the only place that knows model names; `docs/quotas.md` documents it.
//!
//! The original proxy's family names and mapping are kept (`turbo`, `gpt4`, `gpt4-32k`,
//! `gpt4-turbo`, `gpt4o`, `dall-e`, `claude`, `claude-opus`, `gemini-pro`, `mistral-*`,
//! `aws-*`, `gcp-*`, `azure-*`), so exported users and `TOKEN_QUOTA_*` variables keep their
//! meaning. Newer OpenAI models get families of their own so that a cheap model never eats a
//! premium budget and a premium model never hides in a cheap one. Any model name, known or
//! not, maps to some family: an unknown OpenAI-style model is `gpt4` and an unknown
//! Anthropic-style model is `claude`, as in the original.

/// The family of an unknown model sent to an OpenAI-style upstream (the original's default).
pub const OPENAI_FALLBACK: &str = "gpt4";
/// The family of an unknown model sent to an Anthropic-style upstream.
pub const ANTHROPIC_FALLBACK: &str = "claude";
/// The family of an unknown model sent to Google AI (the original's default).
pub const GEMINI_FALLBACK: &str = "gemini-pro";

/// Every family this table can produce, for documentation and tests. Azure families are
/// `azure-` followed by an OpenAI family and are not repeated here.
pub const FAMILIES: &[&str] = &[
    "turbo",
    "gpt4",
    "gpt4-32k",
    "gpt4-turbo",
    "gpt4o",
    "gpt41",
    "gpt41-mini",
    "gpt41-nano",
    "gpt45",
    "gpt5",
    "gpt5-mini",
    "gpt5-nano",
    "gpt5-pro",
    "o1",
    "o1-mini",
    "o1-pro",
    "o3",
    "o3-mini",
    "o3-pro",
    "o4-mini",
    "dall-e",
    "claude",
    "claude-opus",
    "gemini-flash",
    "gemini-pro",
    "gemini-ultra",
    "mistral-tiny",
    "mistral-small",
    "mistral-medium",
    "mistral-large",
    "aws-claude",
    "aws-claude-opus",
    "aws-mistral-tiny",
    "aws-mistral-small",
    "aws-mistral-medium",
    "aws-mistral-large",
    "gcp-claude",
    "gcp-claude-opus",
];

/// The family a request for `model` is counted in, when its name says it.
///
/// The model name decides first (so a `claude-*` model behind an OpenAI-compatible upstream is
/// still counted as Claude, and the original's Azure/AWS/GCP naming conventions are honoured);
/// only a name that says nothing (`None`) falls back to the provider's default family, which
/// each provider module applies.
///
/// Names are `&'static`: the table's, or interned ([`Family`]) for the few that are built
/// (`azure-…`), so that a request's family is copied, never allocated.
pub fn family_for(model: &str) -> Option<&'static str> {
    // A request's model is looked up more than once (admission, the settlement's metrics) and
    // most requests name one of a few models: the last few answers of this thread are kept.
    // A hit costs a few string comparisons instead of the table's substring searches (about
    // 1 000 instructions per lookup, measured with callgrind).
    const KEPT: usize = 4;
    type Recent = [Option<(Box<str>, Option<&'static str>)>; KEPT];
    thread_local! {
        static RECENT: std::cell::RefCell<(Recent, usize)> =
            const { std::cell::RefCell::new(([None, None, None, None], 0)) };
    }
    // Names of any length arrive from clients; only usual ones are kept.
    const KEPT_LEN: usize = 128;
    if model.len() > KEPT_LEN {
        return family_of(model);
    }
    RECENT.with(|recent| {
        let Ok(mut recent) = recent.try_borrow_mut() else {
            return family_of(model);
        };
        let (kept, next) = &mut *recent;
        if let Some((_, family)) = kept.iter().flatten().find(|(m, _)| **m == *model) {
            return *family;
        }
        let family = family_of(model);
        kept[*next] = Some((model.into(), family));
        *next = (*next + 1) % KEPT;
        family
    })
}

/// [`family_for`] without the thread's memory of recent answers.
fn family_of(model: &str) -> Option<&'static str> {
    let m = bare_model(model);
    // The original's service conventions: Azure deployments carry "azure" in the model name,
    // AWS Bedrock model ids start with "anthropic.", and GCP Vertex names are `claude-…@date`.
    if m.contains("azure") {
        let bare = m
            .replace("azure-", "")
            .replace("gpt-35-turbo", "gpt-3.5-turbo");
        let inner = openai_family(&bare).unwrap_or(OPENAI_FALLBACK);
        return Some(azure_family(inner));
    }
    if m.contains("anthropic.") {
        return Some(claude_variant(&m, "aws-claude", "aws-claude-opus"));
    }
    if m.starts_with("claude-") && m.contains('@') {
        return Some(claude_variant(&m, "gcp-claude", "gcp-claude-opus"));
    }
    if m.starts_with("claude") {
        return Some(claude_variant(&m, "claude", "claude-opus"));
    }
    if m.starts_with("gemini") {
        // As the original's getGoogleAIModelFamily: ultra and flash by name, else pro.
        let family = if m.contains("ultra") {
            "gemini-ultra"
        } else if m.contains("flash") {
            "gemini-flash"
        } else {
            GEMINI_FALLBACK
        };
        return Some(family);
    }
    mistral_family(&m).or_else(|| openai_family(&m))
}

/// `azure-` and an OpenAI family: the table does not repeat these names, so they are interned
/// ([`Family`](crate::users::counts::Family)) to be `&'static` like the others.
pub fn azure_family(inner: &str) -> &'static str {
    crate::users::counts::Family::intern(&format!("azure-{inner}")).as_str()
}

/// The lower-cased model name without a vendor prefix: OpenRouter-style clients send
/// `openai/gpt-4o` or `anthropic/claude-3.5-sonnet`, which must count in the same family as
/// the bare name (else a prefix would escape the user's quota). Everything up to the last `/`
/// is dropped (a Vertex or Bedrock resource path keeps its model name at the end too).
/// Borrowed when the name is already bare and lower-case (the usual case: no allocation on the
/// request path).
fn bare_model(model: &str) -> std::borrow::Cow<'_, str> {
    use std::borrow::Cow;
    let trimmed = model.trim();
    let name = match trimmed.rsplit_once('/') {
        Some((_, name)) if !name.is_empty() => name,
        _ => trimmed,
    };
    if !name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Cow::Borrowed(name);
    }
    Cow::Owned(name.to_ascii_lowercase())
}

/// The most output tokens a response of `model` can hold per choice, an upper bound of what
/// each model family documents (a response without `max_tokens` is reserved at this much;
/// when a user has less left, the proxy sets the output cap instead). Unknown models get a
/// generous bound.
pub fn max_output_tokens(model: &str) -> u64 {
    let family = family_for(model).unwrap_or_default();
    let family = family
        .strip_prefix("azure-")
        .or_else(|| family.strip_prefix("aws-"))
        .or_else(|| family.strip_prefix("gcp-"))
        .unwrap_or(family);
    match family {
        "turbo" | "gpt4o" | "gpt45" => 16_384,
        "gpt4" => 8_192,
        "gpt4-32k" => 32_768,
        "gpt4-turbo" => 4_096,
        "gpt41" | "gpt41-mini" | "gpt41-nano" => 32_768,
        "o1-mini" => 65_536,
        "o1" | "o1-pro" | "o3" | "o3-mini" | "o3-pro" | "o4-mini" => 100_000,
        "gpt5" | "gpt5-mini" | "gpt5-nano" | "gpt5-pro" => 128_000,
        // Claude 3.7 Sonnet streams up to 128k with its beta header; others stay below.
        "claude" | "claude-opus" => 128_000,
        "gemini-pro" | "gemini-flash" | "gemini-ultra" => 65_536,
        // Mistral documents no output limit below its context window.
        f if f.starts_with("mistral-") => 128_000,
        _ => 128_000,
    }
}

/// Opus is the premium Claude tier; every other Claude (Sonnet, Haiku, Instant, 2.x) shares the
/// base family, as in the original.
fn claude_variant<'a>(m: &str, base: &'a str, opus: &'a str) -> &'a str {
    if m.contains("opus") {
        opus
    } else {
        base
    }
}

/// True when `rest` (what follows a model prefix) is empty or a date/version suffix such as
/// `-2024-08-06`, `-0613`, `-preview` or `-latest`, i.e. not another model's name.
fn is_snapshot_suffix(rest: &str) -> bool {
    if rest.is_empty() {
        return true;
    }
    let Some(tail) = rest.strip_prefix('-') else {
        return false;
    };
    tail.split('-').all(|part| {
        part.chars().all(|c| c.is_ascii_digit()) || matches!(part, "preview" | "latest")
    })
}

/// The OpenAI family of a lower-cased model name, or `None` when the name is not an OpenAI
/// model this table knows.
fn openai_family(m: &str) -> Option<&'static str> {
    // Embeddings were `turbo` in the original (text-embedding-ada-002); the newer embedding
    // models are priced alike and stay there.
    if m.starts_with("text-embedding-") {
        return Some("turbo");
    }
    if m.starts_with("dall-e") || m.starts_with("gpt-image") {
        return Some("dall-e");
    }
    if m.starts_with("gpt-3.5-turbo") {
        return Some("turbo");
    }
    // gpt-4o-mini replaced gpt-3.5-turbo at a similar price: counting it as `gpt4o` would let
    // a cheap model drain a premium budget.
    if m.starts_with("gpt-4o-mini") {
        return Some("turbo");
    }
    if m.starts_with("gpt-4o") || m.starts_with("chatgpt-4o") {
        return Some("gpt4o");
    }
    if let Some(rest) = m.strip_prefix("gpt-4.1") {
        return Some(if rest.starts_with("-mini") {
            "gpt41-mini"
        } else if rest.starts_with("-nano") {
            "gpt41-nano"
        } else {
            "gpt41"
        });
    }
    if m.starts_with("gpt-4.5") {
        return Some("gpt45");
    }
    if let Some(rest) = m.strip_prefix("gpt-5") {
        // `gpt-5`, `gpt-5.1`, `gpt-5-2025-08-07`, `gpt-5-chat-latest`, `gpt-5-codex`, …
        let rest = rest.trim_start_matches(|c: char| c == '.' || c.is_ascii_digit());
        return Some(if rest.starts_with("-mini") {
            "gpt5-mini"
        } else if rest.starts_with("-nano") {
            "gpt5-nano"
        } else if rest.starts_with("-pro") {
            "gpt5-pro"
        } else {
            "gpt5"
        });
    }
    if let Some(rest) = m.strip_prefix("gpt-4-32k") {
        return is_snapshot_suffix(rest).then_some("gpt4-32k");
    }
    if m.starts_with("gpt-4-turbo") || (m.starts_with("gpt-4") && m.contains("vision")) {
        return Some("gpt4-turbo");
    }
    if let Some(rest) = m.strip_prefix("gpt-4-") {
        if rest.starts_with("0125") || rest.starts_with("1106") {
            return Some("gpt4-turbo");
        }
    }
    if let Some(rest) = m.strip_prefix("gpt-4") {
        if is_snapshot_suffix(rest) {
            return Some("gpt4");
        }
    }
    o_series_family(m)
}

/// The reasoning models: `o1`, `o1-mini`, `o1-pro`, `o3`, `o3-mini`, `o3-pro`, `o4-mini`.
fn o_series_family(m: &str) -> Option<&'static str> {
    for (prefix, base, mini, pro) in [
        ("o1", Some("o1"), "o1-mini", Some("o1-pro")),
        ("o3", Some("o3"), "o3-mini", Some("o3-pro")),
        ("o4", None, "o4-mini", None),
    ] {
        let Some(rest) = m.strip_prefix(prefix) else {
            continue;
        };
        if rest.starts_with("-mini") {
            return Some(mini);
        }
        if rest.starts_with("-pro") {
            return pro;
        }
        if is_snapshot_suffix(rest) {
            return base;
        }
    }
    None
}

/// The family of a lower-cased model name that looks like a Mistral model (`mistral-*`,
/// `open-mistral-*`, `open-mixtral-*`, `codestral-*`, `ministral-*`, ...), or `None`.
fn mistral_family(m: &str) -> Option<&'static str> {
    let is_mistral = [
        "mistral",
        "open-mistral",
        "open-mixtral",
        "open-codestral",
        "codestral",
        "ministral",
        "magistral",
        "pixtral",
        "devstral",
    ]
    .iter()
    .any(|p| m.starts_with(p));
    is_mistral.then(|| mistral_ai_family(m))
}

/// The original's Mistral mapping, applied to every model sent to Mistral AI: `-latest` or a
/// `-NNNN` version suffix is pruned; `mistral-tiny|small|medium|large` are their own family;
/// `open-mistral-7b` is tiny; `open-mistral-nemo`, `open-mixtral-8x7b` and codestral models
/// are small; `open-mixtral-8x22b` is medium; any other model is small.
pub fn mistral_ai_family(model: &str) -> &'static str {
    let m = bare_model(model);
    let pruned = m
        .strip_suffix("-latest")
        .or_else(|| {
            m.rsplit_once('-').and_then(|(head, tail)| {
                (tail.len() == 4 && tail.chars().all(|c| c.is_ascii_digit())).then_some(head)
            })
        })
        .unwrap_or(&m);
    match pruned {
        "mistral-tiny" => "mistral-tiny",
        "mistral-small" => "mistral-small",
        "mistral-medium" => "mistral-medium",
        "mistral-large" => "mistral-large",
        "open-mistral-7b" => "mistral-tiny",
        "open-mixtral-8x22b" => "mistral-medium",
        _ => "mistral-small",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oa(m: &str) -> &'static str {
        crate::providers::openai::family(m)
    }
    fn an(m: &str) -> &'static str {
        crate::providers::anthropic::family(m)
    }

    #[test]
    fn original_openai_mapping_is_kept() {
        for (model, family) in [
            ("gpt-3.5-turbo", "turbo"),
            ("gpt-3.5-turbo-0125", "turbo"),
            ("gpt-3.5-turbo-instruct", "turbo"),
            ("text-embedding-ada-002", "turbo"),
            ("gpt-4", "gpt4"),
            ("gpt-4-0613", "gpt4"),
            ("gpt-4-32k", "gpt4-32k"),
            ("gpt-4-32k-0613", "gpt4-32k"),
            ("gpt-4-turbo", "gpt4-turbo"),
            ("gpt-4-turbo-2024-04-09", "gpt4-turbo"),
            ("gpt-4-turbo-preview", "gpt4-turbo"),
            ("gpt-4-1106-preview", "gpt4-turbo"),
            ("gpt-4-0125-preview", "gpt4-turbo"),
            ("gpt-4-vision-preview", "gpt4-turbo"),
            ("gpt-4-1106-vision-preview", "gpt4-turbo"),
            ("gpt-4o", "gpt4o"),
            ("gpt-4o-2024-08-06", "gpt4o"),
            ("chatgpt-4o-latest", "gpt4o"),
            ("dall-e-3", "dall-e"),
            ("dall-e-2", "dall-e"),
        ] {
            assert_eq!(oa(model), family, "{model}");
        }
    }

    #[test]
    fn current_openai_models_get_their_own_families() {
        for (model, family) in [
            ("gpt-4o-mini", "turbo"),
            ("gpt-4o-mini-2024-07-18", "turbo"),
            ("gpt-4.1", "gpt41"),
            ("gpt-4.1-2025-04-14", "gpt41"),
            ("gpt-4.1-mini", "gpt41-mini"),
            ("gpt-4.1-nano-2025-04-14", "gpt41-nano"),
            ("gpt-4.5-preview", "gpt45"),
            ("gpt-5", "gpt5"),
            ("gpt-5-2025-08-07", "gpt5"),
            ("gpt-5-chat-latest", "gpt5"),
            ("gpt-5.1", "gpt5"),
            ("gpt-5-mini", "gpt5-mini"),
            ("gpt-5.1-mini", "gpt5-mini"),
            ("gpt-5-nano", "gpt5-nano"),
            ("gpt-5-pro", "gpt5-pro"),
            ("o1", "o1"),
            ("o1-2024-12-17", "o1"),
            ("o1-preview", "o1"),
            ("o1-mini", "o1-mini"),
            ("o1-pro", "o1-pro"),
            ("o3", "o3"),
            ("o3-2025-04-16", "o3"),
            ("o3-mini", "o3-mini"),
            ("o3-pro", "o3-pro"),
            ("o4-mini", "o4-mini"),
            ("o4-mini-2025-04-16", "o4-mini"),
            ("text-embedding-3-small", "turbo"),
            ("text-embedding-3-large", "turbo"),
            ("gpt-image-1", "dall-e"),
            ("GPT-4O", "gpt4o"),
        ] {
            assert_eq!(oa(model), family, "{model}");
        }
    }

    #[test]
    fn claude_models_split_on_opus() {
        for (model, family) in [
            ("claude-3-opus-20240229", "claude-opus"),
            ("claude-opus-4-20250514", "claude-opus"),
            ("claude-opus-4-1", "claude-opus"),
            ("claude-4-opus", "claude-opus"),
            ("claude-3-5-sonnet-20241022", "claude"),
            ("claude-3-7-sonnet-latest", "claude"),
            ("claude-sonnet-4-20250514", "claude"),
            ("claude-sonnet-4-5", "claude"),
            ("claude-3-haiku-20240307", "claude"),
            ("claude-3-5-haiku-latest", "claude"),
            ("claude-haiku-4-5", "claude"),
            ("claude-2.1", "claude"),
            ("claude-instant-1.2", "claude"),
        ] {
            assert_eq!(an(model), family, "{model}");
            // The name decides, whichever upstream style carries it.
            assert_eq!(oa(model), family, "{model} via an OpenAI-style upstream");
        }
    }

    #[test]
    fn cloud_conventions_of_the_original() {
        assert_eq!(oa("azure-gpt-35-turbo"), "azure-turbo");
        assert_eq!(oa("azure-gpt-4"), "azure-gpt4");
        assert_eq!(oa("azure-gpt-4o"), "azure-gpt4o");
        assert_eq!(oa("azure-gpt-4-32k"), "azure-gpt4-32k");
        assert_eq!(oa("azure-something-new"), "azure-gpt4");
        assert_eq!(an("anthropic.claude-3-sonnet-20240229-v1:0"), "aws-claude");
        assert_eq!(
            an("anthropic.claude-3-opus-20240229-v1:0"),
            "aws-claude-opus"
        );
        assert_eq!(an("claude-3-5-sonnet@20240620"), "gcp-claude");
        assert_eq!(an("claude-3-opus@20240229"), "gcp-claude-opus");
        assert_eq!(oa("gemini-1.5-pro"), "gemini-pro");
        assert_eq!(oa("gemini-2.5-flash"), "gemini-flash");
        assert_eq!(oa("gemini-ultra"), "gemini-ultra");
    }

    #[test]
    fn mistral_mapping_of_the_original() {
        assert_eq!(oa("mistral-large-latest"), "mistral-large");
        assert_eq!(oa("mistral-small-2402"), "mistral-small");
        assert_eq!(oa("mistral-medium"), "mistral-medium");
        assert_eq!(oa("mistral-tiny"), "mistral-tiny");
        assert_eq!(oa("open-mistral-7b"), "mistral-tiny");
        assert_eq!(oa("open-mixtral-8x7b"), "mistral-small");
        assert_eq!(oa("codestral-latest"), "mistral-small");
        assert_eq!(oa("open-mistral-nemo"), "mistral-small");
        assert_eq!(oa("open-mixtral-8x22b"), "mistral-medium");
        assert_eq!(oa("mistral-large-2411"), "mistral-large");
        // On Mistral AI every model has a Mistral family; unknown ones are small.
        assert_eq!(mistral_ai_family("pixtral-large-latest"), "mistral-small");
        assert_eq!(
            mistral_ai_family("mistralai/mistral-large-latest"),
            "mistral-large"
        );
        assert_eq!(mistral_ai_family("gpt-4o"), "mistral-small");
    }

    #[test]
    fn unknown_models_get_the_provider_fallback() {
        assert_eq!(oa("some-new-model"), OPENAI_FALLBACK);
        assert_eq!(oa(""), OPENAI_FALLBACK);
        assert_eq!(oa("gpt-4x"), OPENAI_FALLBACK);
        assert_eq!(oa("o5-ultra"), OPENAI_FALLBACK);
        assert_eq!(oa("o4"), OPENAI_FALLBACK);
        assert_eq!(oa("o1x"), OPENAI_FALLBACK);
        assert_eq!(an("mystery"), ANTHROPIC_FALLBACK);
        assert_eq!(an(""), ANTHROPIC_FALLBACK);
        // Odd input never panics.
        for m in [
            "-",
            "@",
            "azure",
            "anthropic.",
            "o1-",
            "gpt-5.",
            "mistral--",
            "é",
        ] {
            let _ = oa(m);
            let _ = an(m);
        }
    }

    #[test]
    fn every_family_is_a_valid_token_quota_suffix() {
        // TOKEN_QUOTA_<FAMILY>: upper-cased, `-` → `_`; the config maps it back.
        for f in FAMILIES {
            let var = f.to_ascii_uppercase().replace('-', "_");
            assert_eq!(var.to_ascii_lowercase().replace('_', "-"), *f);
        }
    }

    #[test]
    fn vendor_prefixes_count_as_the_bare_name() {
        for (prefixed, bare) in [
            ("openai/gpt-4o", "gpt-4o"),
            ("OpenAI/GPT-4o-mini", "gpt-4o-mini"),
            ("anthropic/claude-3-opus", "claude-3-opus"),
            ("anthropic/claude-sonnet-4-5", "claude-sonnet-4-5"),
            ("mistralai/mistral-large-latest", "mistral-large-latest"),
            ("openai/o3-mini", "o3-mini"),
        ] {
            assert_eq!(oa(prefixed), oa(bare), "{prefixed}");
            assert_eq!(an(prefixed), an(bare), "{prefixed}");
        }
        assert_eq!(oa("openai/gpt-4o"), "gpt4o");
        assert_eq!(oa("anthropic/claude-3-opus"), "claude-opus");
    }

    #[test]
    fn max_output_bounds() {
        assert_eq!(max_output_tokens("gpt-4o"), 16_384);
        assert_eq!(max_output_tokens("openai/gpt-4o-mini"), 16_384);
        assert_eq!(max_output_tokens("o3"), 100_000);
        assert_eq!(max_output_tokens("something-else"), 128_000);
    }

    #[test]
    fn the_remembered_answers_are_the_table_s_answers() {
        let models = [
            "gpt-4o-mini",
            "openai/GPT-4o",
            "claude-3-5-sonnet@20240620",
            "anthropic.claude-3-opus-20240229-v1:0",
            "azure-gpt-35-turbo",
            "gemini-1.5-flash",
            "mistral-large-latest",
            "",
            "something-unknown",
        ];
        // Round after round, in orders that make the thread's few remembered answers turn over.
        for round in 0..5 {
            for i in 0..models.len() {
                let m = models[(i * (round + 1)) % models.len()];
                assert_eq!(family_for(m), family_of(m), "{m}");
            }
        }
        let long = "gpt-4o-".repeat(100);
        assert_eq!(family_for(&long), family_of(&long));
    }
}
