//! Upstream providers: one module per upstream API, owning its wire format. `translate` holds
//! the pure conversions between formats (OpenAI chat ⇄ Anthropic Messages ⇄ Gemini).

pub mod google_ai;
pub mod translate;
