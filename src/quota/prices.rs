//! The one price table: US$ per million tokens for each model family, for `SHOW_TOKEN_COSTS`
//! (the info page and `/user`). Counts are not split into prompt and completion tokens, so a
//! family has one blended rate, as in the original (its `getTokenCostUsd`, whose rates are kept
//! for its families); families the original did not have are priced at their provider's list
//! price for input tokens as of 2026. Estimates for display only: nothing is billed from here.

/// US$ per million tokens by family (`azure-`, `aws-` and `gcp-` variants use their base).
const PER_MILLION_USD: &[(&str, f64)] = &[
    ("turbo", 1.0),
    ("gpt4", 30.0),
    ("gpt4-32k", 60.0),
    ("gpt4-turbo", 10.0),
    ("gpt4o", 5.0),
    ("gpt41", 2.0),
    ("gpt41-mini", 0.4),
    ("gpt41-nano", 0.1),
    ("gpt45", 75.0),
    ("gpt5", 1.25),
    ("gpt5-mini", 0.25),
    ("gpt5-nano", 0.05),
    ("gpt5-pro", 15.0),
    ("o1", 20.0),
    ("o1-mini", 5.0),
    ("o1-pro", 150.0),
    ("o3", 2.0),
    ("o3-mini", 1.1),
    ("o3-pro", 20.0),
    ("o4-mini", 1.1),
    ("dall-e", 10.0),
    ("claude", 8.0),
    ("claude-opus", 15.0),
    ("gemini-flash", 0.3),
    ("gemini-pro", 1.25),
    // Google lists no API price for Ultra models; priced as Gemini Pro's dearest tier.
    ("gemini-ultra", 2.5),
    ("mistral-tiny", 0.25),
    ("mistral-small", 0.3),
    ("mistral-medium", 2.75),
    ("mistral-large", 3.0),
];

/// The rate of a family in US$ per million tokens, `None` when the table has no price for it.
pub fn per_million_usd(family: &str) -> Option<f64> {
    let base = ["azure-", "aws-", "gcp-"]
        .iter()
        .find_map(|p| family.strip_prefix(p))
        .unwrap_or(family);
    PER_MILLION_USD
        .iter()
        .find(|(f, _)| *f == base)
        .map(|(_, usd)| *usd)
}

/// What `tokens` of `family` cost, in US$ (0 when the family has no price).
pub fn cost_usd(family: &str, tokens: u64) -> f64 {
    per_million_usd(family).unwrap_or(0.0) * tokens as f64 / 1_000_000.0
}

/// A cost for display: `$0.0042`, `$1.23`, `$1,234.50`.
pub fn format_usd(usd: f64) -> String {
    if usd > 0.0 && usd < 0.01 {
        return format!("${usd:.4}");
    }
    let cents = (usd * 100.0).round() as u64;
    let whole = (cents / 100).to_string();
    let mut grouped = String::new();
    for (i, c) in whole.chars().enumerate() {
        if i > 0 && (whole.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!("${grouped}.{:02}", cents % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_originals_rates_and_cloud_variants() {
        assert_eq!(per_million_usd("gpt4"), Some(30.0));
        assert_eq!(per_million_usd("azure-gpt4o"), Some(5.0));
        assert_eq!(per_million_usd("aws-claude-opus"), Some(15.0));
        assert_eq!(per_million_usd("nobody-knows"), None);
        assert!((cost_usd("claude", 1_000_000) - 8.0).abs() < 1e-9);
        assert_eq!(cost_usd("nobody-knows", 5), 0.0);
    }

    #[test]
    fn every_family_has_a_price() {
        for f in crate::providers::families::FAMILIES {
            assert!(per_million_usd(f).is_some(), "{f} has no price");
        }
    }

    #[test]
    fn formatting() {
        assert_eq!(format_usd(0.0), "$0.00");
        assert_eq!(format_usd(0.0042), "$0.0042");
        assert_eq!(format_usd(1.234), "$1.23");
        assert_eq!(format_usd(1234.5), "$1,234.50");
    }
}
