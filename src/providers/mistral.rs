//! Mistral AI (`api.mistral.ai`): OpenAI chat format with three differences this module
//! owns — the output cap is `max_tokens` only, `stream_options` is refused (422) because its
//! streams always carry usage in their last chunk, and every model maps to a `mistral-*`
//! family (the original's mapping). Request facts and usage reading are [`super::openai`]'s.
//! Knows nothing of users, quotas or HTTP routing.

use serde_json::Value;

use super::families::mistral_ai_family;
use super::openai;
use super::{Api, BadRequest, RequestFacts};

/// The quota family of a model sent to Mistral AI.
pub fn family(model: &str) -> &'static str {
    mistral_ai_family(model)
}

/// The facts of an OpenAI-format chat body.
pub fn request_facts(api: Api, body: &Value) -> Result<RequestFacts, BadRequest> {
    openai::request_facts(api, body)
}

/// Mistral knows only `max_tokens`.
pub fn set_output_cap(body: &mut Value, cap: u64) {
    openai::set_max_tokens(body, cap);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cap_goes_in_max_tokens() {
        let mut b = json!({"model":"mistral-large-latest","max_completion_tokens":9000});
        set_output_cap(&mut b, 100);
        assert_eq!(b, json!({"model":"mistral-large-latest","max_tokens":100}));
        assert_eq!(family("mistral-large-latest"), "mistral-large");
    }
}
