//! Which upstream API a proxied request speaks. Shared by the forwarder and by quota
//! accounting, which parse request and response bodies differently per API.

/// The provider a request goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Provider {
    OpenAi,
    Anthropic,
}

/// The kind of endpoint a proxied request targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Api {
    /// `POST /v1/chat/completions`
    OpenAiChat,
    /// `POST /v1/completions`
    OpenAiCompletions,
    /// `POST /v1/embeddings`
    OpenAiEmbeddings,
    /// `GET /v1/models` and anything else on the OpenAI upstream that is not a generation.
    OpenAiOther,
    /// `POST /v1/messages`
    AnthropicMessages,
    /// `POST /v1/messages/count_tokens` and anything else on the Anthropic upstream.
    AnthropicOther,
}

impl Api {
    pub fn provider(self) -> Provider {
        match self {
            Api::OpenAiChat | Api::OpenAiCompletions | Api::OpenAiEmbeddings | Api::OpenAiOther => {
                Provider::OpenAi
            }
            Api::AnthropicMessages | Api::AnthropicOther => Provider::Anthropic,
        }
    }

    /// A generation request: counted as a prompt, subject to quotas and the rate limit.
    pub fn is_generation(self) -> bool {
        matches!(
            self,
            Api::OpenAiChat
                | Api::OpenAiCompletions
                | Api::OpenAiEmbeddings
                | Api::AnthropicMessages
        )
    }
}
