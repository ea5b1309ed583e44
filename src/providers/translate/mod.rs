//! Translation between upstream formats: an OpenAI chat request to Anthropic Messages or to
//! Gemini `generateContent`, and their answers (whole or streamed) back to OpenAI chat
//! completions. Pure functions and small state machines over typed values (serde structs):
//! no HTTP types, no I/O, no clock, no randomness (ids and timestamps come from the caller), so
//! that every conversion is checked by the fixture tests in `tests/fixtures/translate/`.
//!
//! What does not translate is refused with a [`TranslateError`] that names the field, so a
//! client learns what to change rather than getting a silently different request.

pub mod adapter;
pub mod anthropic;
pub mod gemini;
pub mod openai;

#[cfg(test)]
mod fixtures;

/// A request that cannot be expressed in the target format. The message names the field and
/// says what to send instead; it becomes a 400 `invalid_request_error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TranslateError(pub String);

impl TranslateError {
    fn new(message: impl Into<String>) -> Self {
        TranslateError(message.into())
    }
}

/// Parses an OpenAI chat request body, with a message that names the field on failure.
pub fn parse_openai_chat(body: &[u8]) -> Result<openai::ChatRequest, TranslateError> {
    serde_json::from_slice(body).map_err(|e| {
        TranslateError::new(format!(
            "The request body is not a valid OpenAI chat completion request: {e}."
        ))
    })
}

/// A `data:` URL split into its media type and base64 payload; `None` for anything else.
fn split_data_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("data:")?;
    let (meta, data) = rest.split_once(',')?;
    let media_type = meta.strip_suffix(";base64")?;
    Some((media_type, data))
}

#[cfg(test)]
mod tests {
    use super::split_data_url;

    #[test]
    fn data_urls() {
        assert_eq!(
            split_data_url("data:image/png;base64,AAAA"),
            Some(("image/png", "AAAA"))
        );
        assert_eq!(split_data_url("data:image/png,AAAA"), None);
        assert_eq!(split_data_url("https://example.com/a.png"), None);
    }
}
