//! What the operator policy needs from a request body, per upstream API: images present,
//! tools present, and where the output cap goes. The provider-specific half of
//! [`crate::policy`]; the rules themselves know no wire format.

use serde_json::Value;

use crate::upstream::api::{Api, Provider};

/// The service name a provider has in `ALLOWED_VISION_SERVICES` and `MAX_*_TOKENS_<SERVICE>`.
pub fn service_name(provider: Provider) -> &'static str {
    match provider {
        Provider::OpenAi => "openai",
        Provider::Anthropic => "anthropic",
    }
}

/// True when a content part is an image (OpenAI `image_url`, Anthropic `image`, and the
/// documents both accept as attachments).
fn is_image_part(part: &Value) -> bool {
    part.get("type")
        .and_then(Value::as_str)
        .is_some_and(|t| t.contains("image") || t == "document" || t == "file")
}

/// True when any message's content (or a tool result's nested content) carries an image.
pub fn has_images(api: Api, body: &Value) -> bool {
    if !matches!(api, Api::OpenAiChat | Api::AnthropicMessages) {
        return false;
    }
    fn content_has_image(content: Option<&Value>) -> bool {
        match content {
            Some(Value::Array(parts)) => parts
                .iter()
                .any(|p| is_image_part(p) || content_has_image(p.get("content"))),
            _ => false,
        }
    }
    body.get("messages")
        .and_then(Value::as_array)
        .is_some_and(|ms| ms.iter().any(|m| content_has_image(m.get("content"))))
}

/// True when the request defines tools or (legacy) functions.
pub fn has_tools(body: &Value) -> bool {
    ["tools", "functions"].iter().any(|k| match body.get(*k) {
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Null) | None => false,
        Some(_) => true,
    })
}

/// Caps the output tokens the request may ask for at `cap`, on the API's own field; returns
/// whether the body changed. A field above the cap is lowered; an absent field is set to the
/// cap, as the original did (otherwise leaving the field out would escape the cap). OpenAI
/// chat gets `max_completion_tokens` (the current field, required by reasoning models) unless
/// the client used `max_tokens`.
pub fn clamp_output(api: Api, body: &mut Value, cap: u64) -> bool {
    let Some(obj) = body.as_object_mut() else {
        return false;
    };
    let fields: &[&str] = match api {
        Api::OpenAiChat => &["max_completion_tokens", "max_tokens"],
        Api::OpenAiCompletions | Api::AnthropicMessages => &["max_tokens"],
        _ => return false,
    };
    let mut present = false;
    let mut changed = false;
    for f in fields {
        match obj.get(*f) {
            None | Some(Value::Null) => {}
            Some(v) => {
                present = true;
                if v.as_u64().is_none_or(|n| n > cap) && v.as_f64().is_none_or(|n| n > cap as f64) {
                    obj.insert((*f).to_string(), Value::from(cap));
                    changed = true;
                }
            }
        }
    }
    if !present {
        obj.insert(fields[0].to_string(), Value::from(cap));
        changed = true;
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn images_are_found_in_both_apis() {
        let openai = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]});
        assert!(has_images(Api::OpenAiChat, &openai));
        let anthropic = json!({"messages": [{"role": "user", "content": [
            {"type": "tool_result", "content": [{"type": "image", "source": {}}]}]}]});
        assert!(has_images(Api::AnthropicMessages, &anthropic));
        let text = json!({"messages": [{"role": "user", "content": "an image_url"}]});
        assert!(!has_images(Api::OpenAiChat, &text));
    }

    #[test]
    fn tools_and_functions_count_when_not_empty() {
        assert!(has_tools(&json!({"tools": [{"type": "function"}]})));
        assert!(has_tools(&json!({"functions": [{"name": "f"}]})));
        assert!(!has_tools(&json!({"tools": []})));
        assert!(!has_tools(&json!({"messages": []})));
    }

    #[test]
    fn output_is_clamped_on_the_apis_field() {
        let mut b = json!({"max_tokens": 5000});
        assert!(clamp_output(Api::AnthropicMessages, &mut b, 1024));
        assert_eq!(b["max_tokens"], 1024);
        let mut b = json!({"max_tokens": 10});
        assert!(!clamp_output(Api::AnthropicMessages, &mut b, 1024));
        assert_eq!(b["max_tokens"], 10);
        let mut b = json!({"messages": []});
        assert!(clamp_output(Api::OpenAiChat, &mut b, 300));
        assert_eq!(b["max_completion_tokens"], 300);
        assert!(b.get("max_tokens").is_none());
        let mut b = json!({"max_tokens": 9999, "max_completion_tokens": 50});
        assert!(clamp_output(Api::OpenAiChat, &mut b, 300));
        assert_eq!(b, json!({"max_tokens": 300, "max_completion_tokens": 50}));
        let mut b = json!({"input": "x"});
        assert!(!clamp_output(Api::OpenAiEmbeddings, &mut b, 300));
    }
}
