//! The price table of image generation, the one place that knows it: OpenAI's images API
//! (and Azure's) is billed per image by model, size and quality, not by token, so a request is
//! counted as its cost converted to tokens at the original proxy's rate (US$1 = 100 000
//! tokens, in the `dall-e` family). Knows nothing of users, quotas or HTTP.

use serde_json::Value;

use super::{uint_field, BadRequest};

/// Tokens counted per US dollar of image cost (the original's `DALLE_TOKENS_PER_DOLLAR`).
pub const TOKENS_PER_DOLLAR: u64 = 100_000;

/// The model OpenAI uses when a request names none.
pub const DEFAULT_MODEL: &str = "dall-e-2";

/// The price of one image, in hundredths of a cent (US$0.0001), so the table is exact.
fn price_per_image(model: &str, size: &str, quality: &str) -> Result<u64, BadRequest> {
    let bad_size = |sizes: &str| {
        BadRequest(format!(
            "`size` {size:?} is not offered for {model}; use one of {sizes}."
        ))
    };
    // Azure deployment names often drop the dashes (`dalle3`): compare without them.
    let m: String = model
        .trim()
        .to_ascii_lowercase()
        .chars()
        .filter(|c| !matches!(c, '-' | '_' | '.' | ' '))
        .collect();
    if m.contains("dalle2") {
        return match size {
            "256x256" => Ok(160),
            "512x512" => Ok(180),
            "1024x1024" => Ok(200),
            _ => Err(bad_size("256x256, 512x512, 1024x1024")),
        };
    }
    if m.contains("dalle") {
        let hd = quality == "hd";
        return match size {
            "1024x1024" => Ok(if hd { 800 } else { 400 }),
            "1024x1792" | "1792x1024" => Ok(if hd { 1200 } else { 800 }),
            _ => Err(bad_size("1024x1024, 1024x1792, 1792x1024")),
        };
    }
    if m.contains("gptimage") {
        // `auto` quality and size are billed as what the model picks: count the dearest.
        let square = size == "1024x1024";
        return Ok(match (quality, square) {
            ("low", true) => 110,
            ("low", false) => 160,
            ("medium", true) => 420,
            ("medium", false) => 630,
            (_, true) => 1670,
            (_, false) => 2500,
        });
    }
    // A model this table does not know: the dearest image it knows, so that a quota holds.
    Ok(2500)
}

/// The tokens an images request counts: its price per image times `n`, at
/// [`TOKENS_PER_DOLLAR`]. Defaults as OpenAI's: `dall-e-2`, `1024x1024`, `standard`, `n` 1.
pub fn cost_tokens(body: &Value) -> Result<u64, BadRequest> {
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_MODEL);
    let size = body
        .get("size")
        .and_then(Value::as_str)
        .unwrap_or("1024x1024");
    let quality = body
        .get("quality")
        .and_then(Value::as_str)
        .unwrap_or("standard");
    let n = uint_field(body, "n")?.unwrap_or(1).clamp(1, 10);
    let price = price_per_image(model, size, quality)?;
    // Hundredths of a cent → dollars → tokens: price / 10 000 × 100 000 = price × 10.
    Ok(price
        .saturating_mul(TOKENS_PER_DOLLAR / 10_000)
        .saturating_mul(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_original_prices() {
        let t = |b: Value| cost_tokens(&b).expect("priced");
        assert_eq!(t(json!({"model": "dall-e-3", "prompt": "x"})), 4_000);
        assert_eq!(
            t(json!({"model": "dall-e-3", "quality": "hd", "size": "1792x1024"})),
            12_000
        );
        assert_eq!(
            t(json!({"model": "dall-e-3", "size": "1024x1792", "n": 1})),
            8_000
        );
        assert_eq!(
            t(json!({"model": "dall-e-2", "size": "256x256", "n": 3})),
            4_800
        );
        assert_eq!(t(json!({"prompt": "x"})), 2_000, "dall-e-2 by default");
        assert_eq!(t(json!({"model": "gpt-image-1", "quality": "low"})), 1_100);
        assert_eq!(t(json!({"model": "gpt-image-1"})), 16_700);
        assert!(cost_tokens(&json!({"model": "dall-e-3", "size": "256x256"})).is_err());
        assert!(cost_tokens(&json!({"model": "dall-e-3", "n": "2"})).is_err());
        assert_eq!(
            t(json!({"model": "dalle3"})),
            4_000,
            "an Azure deployment name"
        );
        assert_eq!(
            t(json!({"model": "some-new-image-model"})),
            25_000,
            "the dearest"
        );
    }
}
