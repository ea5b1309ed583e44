//! The provider layer: one module per upstream API, each owning everything about its wire
//! format — the request facts admission needs, its output-cap field, usage in its JSON bodies
//! and streams, its stream framing, its auth, its URL scheme and its model → family mapping.
//! Everything outside this module works on the provider-neutral types defined here
//! ([`RequestFacts`], [`ReportedUsage`], [`Meter`]); `quota` never parses a provider's JSON and
//! the forwarder (`crate::proxy`) asks the provider for everything wire-specific. Knows nothing
//! of users, quotas or HTTP routing.
//!
//! # How to add a provider
//!
//! 1. **The module.** Add `src/providers/<name>.rs` and a [`Provider`] variant. The module
//!    implements, as plain functions over `serde_json::Value` and typed structs:
//!    - `request_facts(api, body) -> Result<RequestFacts, BadRequest>`: model, output cap (the
//!      client's own field, refusing a string or float with [`BadRequest`]), stream flag,
//!      prompt text for estimates, images and tools present. Reuse [`openai`] or [`anthropic`]
//!      when the provider speaks that format (Mistral and Azure speak OpenAI chat).
//!    - `set_output_cap(api, body, cap)`: writes the provider's own output-cap field
//!      (`max_tokens`, `max_completion_tokens`, `maxOutputTokens`, ...).
//!    - `ask_stream_usage(api, body) -> bool`: makes a stream report its usage when the
//!      provider only does so on request (OpenAI's `stream_options.include_usage`), returning
//!      true when the proxy asked on the client's behalf (the usage-only event is then hidden
//!      from the client). Providers whose streams always carry usage return false.
//!    - `observe(api, json, seen) -> bool`: reads one whole JSON response or one stream event
//!      into [`Seen`] (typed usage: a `XxxUsage` struct beside its `into_usage()`, as in
//!      [`anthropic::AnthropicUsage`]; generated text for estimates); returns true for a
//!      usage-only event the proxy may hide. `usage_key()` names the top-level usage field of
//!      its JSON responses (the meter's fast path reads only that field).
//!    - `family(model)`: the quota family (see [`families`], the one table of model names).
//!    - `authorize(endpoint, request, key)`: puts the operator's credential on an [`UpstreamRequest`]
//!      (a header, or a signature over method, URL, headers and body for SigV4 — the request is
//!      final at that point — or a bearer token the provider fetched and caches itself;
//!      `authorize` is async for that reason).
//!    - the URL scheme ([`Provider::upstream_url`]): how a client path becomes the upstream
//!      URL (a deployment path, an `api-version` query, a model in the path, ...). State a
//!      provider needs for URLs or auth (Azure's deployments, a region, a token cache) lives in
//!      an [`Endpoint`] variant of its own, built in `crate::proxy::Upstreams::from_config`.
//!    - headers forwarded from the client ([`Provider::forwarded_headers`]) and defaults
//!      ([`Provider::default_headers`]).
//! 2. **Dispatch.** Add the variant's arm to each `match` in `impl Provider` below.
//! 3. **Streams that are not SSE.** Return a decoder from [`Provider::stream_decoder`]: a
//!    [`StreamTransform`] that turns the provider's frames (e.g. Bedrock's binary event stream)
//!    into SSE events before the meter sees them, and says the content type it produces.
//! 4. **Translated routes.** A route whose client speaks another format than the upstream
//!    passes a [`Translation`] to the forwarder: it turns the client's JSON into the upstream's
//!    (before facts are read, so admission sees the upstream request) and supplies a
//!    [`StreamTransform`] that turns the upstream's response (JSON or SSE, after the meter has
//!    read its usage) back into the client's format.
//! 5. **Configuration and routes.** Its variables in `crate::config` and `.env.example`, its
//!    key pool and base URL in `crate::proxy::Upstreams`, its routes in `crate::proxy::routes`,
//!    its line on the info page (`crate::web::info`), and `docs/proxy.md`.
//! 6. **Tests.** A fake upstream in `tests/common` that checks what the real one checks (key
//!    header, path, query, signature), validated once with the provider's official client, and
//!    end-to-end tests through the proxy with that client, plain and streaming.

pub mod anthropic;
pub mod aws;
pub mod aws_check;
pub mod azure;
pub mod families;
pub mod gcp;
pub mod google_ai;
pub mod images;
pub mod key_errors;
pub mod lenient;
pub mod meter;
pub mod mistral;
pub mod openai;
pub mod raw;
pub mod translate;

use axum::http::{HeaderValue, Method};
use bytes::Bytes;
use serde_json::Value;

use crate::http1::Fields;

pub use meter::Meter;

/// The provider (upstream service) a request goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Provider {
    OpenAi,
    Anthropic,
    /// Google AI, the Gemini API ([`google_ai`]).
    GoogleAi,
    /// Mistral AI (OpenAI chat format).
    MistralAi,
    /// Azure OpenAI (OpenAI chat and images, one deployment per credential).
    Azure,
    /// Claude on AWS Bedrock (`AWS_CREDENTIALS`, SigV4), Anthropic Messages in.
    Aws,
    /// Mistral on AWS Bedrock, OpenAI chat in.
    AwsMistral,
    /// Claude on GCP Vertex AI (`GCP_CREDENTIALS`, service-account tokens).
    Gcp,
}

/// The kind of endpoint a proxied request targets, by wire format. The same format may be
/// served by several providers (OpenAI chat by OpenAI, Mistral and Azure).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Api {
    /// `POST /v1/chat/completions`
    OpenAiChat,
    /// `POST /v1/completions`
    OpenAiCompletions,
    /// `POST /v1/embeddings`
    OpenAiEmbeddings,
    /// `POST /v1/images/generations` (counted by its price, [`images`]).
    OpenAiImages,
    /// `GET /v1/models` and anything else on an OpenAI-style upstream that is not a generation.
    OpenAiOther,
    /// `POST /v1/messages`
    AnthropicMessages,
    /// `POST /v1/messages/count_tokens` and anything else on the Anthropic upstream.
    AnthropicOther,
    /// `POST /{v1,v1beta}/models/{model}:generateContent` (Google AI).
    GoogleAiGenerate,
    /// `POST /{v1,v1beta}/models/{model}:streamGenerateContent` (Google AI; the stream flag is
    /// the method, not a body field).
    GoogleAiStream,
    /// `GET /{v1,v1beta}/models` (Google AI).
    GoogleAiOther,
}

impl Api {
    /// The provider this API is served by on the main routes.
    pub fn provider(self) -> Provider {
        match self {
            Api::OpenAiChat
            | Api::OpenAiCompletions
            | Api::OpenAiEmbeddings
            | Api::OpenAiImages
            | Api::OpenAiOther => Provider::OpenAi,
            Api::AnthropicMessages | Api::AnthropicOther => Provider::Anthropic,
            Api::GoogleAiGenerate | Api::GoogleAiStream | Api::GoogleAiOther => Provider::GoogleAi,
        }
    }

    /// A generation request: counted as a prompt, subject to quotas and the rate limit.
    pub fn is_generation(self) -> bool {
        matches!(
            self,
            Api::OpenAiChat
                | Api::OpenAiCompletions
                | Api::OpenAiEmbeddings
                | Api::OpenAiImages
                | Api::AnthropicMessages
                | Api::GoogleAiGenerate
                | Api::GoogleAiStream
        )
    }

    /// Whether the API produces output tokens (embeddings count their input only, images
    /// their price).
    pub fn has_output(self) -> bool {
        !matches!(self, Api::OpenAiEmbeddings | Api::OpenAiImages)
    }
}

/// A request body the proxy refuses with 400; the message says which field is wrong and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest(pub String);

/// What admission (and content rules) know about a generation request, whatever its provider.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestFacts {
    /// The `model` field as the client sent it ("" when absent).
    pub model: String,
    /// The quota family of the model on this provider.
    pub family: &'static str,
    /// The prompt's text (messages, system prompt, tools), as the tokenizer would count it.
    pub prompt_text: String,
    /// Prompt tokens that are not text: images, pre-tokenized input, per-message overhead.
    pub prompt_fixed: u64,
    /// The client's output cap per choice (`max_tokens`, `max_completion_tokens`, ...), if any.
    pub max_output: Option<u64>,
    /// How many choices the request asks for (`n`), at least 1.
    pub choices: u64,
    /// Whether the output cap can be set by the proxy (generation APIs with output).
    pub capped_output: bool,
    /// `"stream": true`.
    pub stream: bool,
    /// The client itself asked for stream usage (`stream_options.include_usage`).
    pub include_usage: bool,
    /// The prompt holds an image (or document) part.
    pub has_images: bool,
    /// The request declares tools or functions.
    pub has_tools: bool,
}

impl RequestFacts {
    /// An upper bound of the prompt's tokens, without tokenizing: its length in bytes (every
    /// token of a byte-level BPE covers at least one byte).
    pub fn prompt_bound(&self) -> u64 {
        (self.prompt_text.len() as u64).saturating_add(self.prompt_fixed)
    }

    /// The most output tokens the request may produce as sent: the cap times the choices (0
    /// when the client set no cap).
    pub fn max_completion(&self) -> u64 {
        self.max_output
            .unwrap_or(0)
            .saturating_mul(self.choices.max(1))
    }

    /// Tokens a request may use at most, with the prompt counted as `prompt`.
    pub fn requested(&self, prompt: u64) -> u64 {
        prompt.saturating_add(self.max_completion())
    }
}

/// Usage as one provider report states it, converted from the provider's typed usage struct.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReportedUsage {
    /// Prompt tokens, cached ones included.
    pub prompt: Option<u64>,
    pub completion: Option<u64>,
    /// The completion count is the upstream's final word (not a running placeholder such as
    /// Anthropic's `message_start`).
    pub completion_final: bool,
}

/// Token usage of one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
}

impl Usage {
    pub fn total(self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// Generated text kept for a fallback estimate; beyond it, only bytes are counted.
const TEXT_CAP: usize = 4 * 1024 * 1024;

/// What a response said so far: reported usage (merged over events) and generated text.
#[derive(Debug, Default)]
pub struct Seen {
    /// The model the response names (the first non-empty `model`), for providers whose
    /// response decides the family ([`Provider::family_from_response`]).
    pub model: Option<String>,
    pub prompt: Option<u64>,
    pub completion: Option<u64>,
    pub completion_final: bool,
    pub text: String,
    pub text_overflow_bytes: u64,
}

impl Seen {
    /// Merges one report. Counts are cumulative in every provider's streams, so a count never
    /// goes below what was seen, except that a final completion count replaces a placeholder.
    pub fn usage(&mut self, u: ReportedUsage) {
        if let Some(p) = u.prompt {
            self.prompt = Some(self.prompt.unwrap_or(0).max(p));
        }
        if let Some(c) = u.completion {
            self.completion = Some(if u.completion_final {
                c
            } else {
                self.completion.unwrap_or(0).max(c)
            });
            if u.completion_final {
                self.completion_final = true;
            }
        }
    }

    /// Notes the model a response names (the first non-empty one wins).
    pub fn model(&mut self, m: &str) {
        if self.model.is_none() && !m.is_empty() {
            self.model = Some(m.to_string());
        }
    }

    /// Keeps generated text for an estimate when no usage arrives.
    pub fn text(&mut self, s: &str) {
        if self.text.len() + s.len() <= TEXT_CAP {
            self.text.push_str(s);
        } else {
            self.text_overflow_bytes += s.len() as u64;
        }
    }
}

/// A rewrite of a response body as it streams: a decoder of a provider's own stream framing
/// into SSE, or the translation of a response back into the client's format. `chunk` may
/// return nothing (buffering); `end` flushes what is left.
pub trait StreamTransform: Send {
    fn chunk(&mut self, chunk: Bytes) -> Bytes;
    fn end(&mut self) -> Bytes {
        Bytes::new()
    }
    /// The content type of what this transform produces, when it differs from its input.
    fn content_type(&self) -> Option<HeaderValue> {
        None
    }
}

/// A route whose client speaks another format than its upstream.
pub trait Translation: Send + Sync {
    /// The client's JSON body turned into the upstream's.
    fn request(&self, body: Value) -> Result<Value, BadRequest>;
    /// The rewrite of the upstream's response (JSON or SSE, `stream` says which the client
    /// asked for) into the client's format.
    fn response(&self, stream: bool) -> Box<dyn StreamTransform>;
    /// The model, when the upstream takes it in the path rather than the body (Gemini):
    /// asked after [`Translation::request`], for the request facts (family, quota).
    fn model(&self) -> Option<String> {
        None
    }
    /// The upstream path (with its query, which then replaces the client's), when it depends
    /// on the client's request (Gemini: the model and the stream method); asked after
    /// [`Translation::request`].
    fn upstream_path(&self) -> Option<String> {
        None
    }
}

/// The model of a request whose path names it (Gemini's `models/{model}:generateContent`),
/// inserted in the request extensions by its route for the request facts.
#[derive(Debug, Clone)]
pub struct PathModel(pub String);

/// The upstream request as it will be sent, for [`Provider::authorize`] to sign or complete.
pub struct UpstreamRequest {
    pub method: Method,
    pub url: String,
    pub headers: Fields,
    pub body: Bytes,
}

/// The operator key chosen for one attempt: its position in the pool and its ready-made
/// credential value.
pub struct KeyUse<'a> {
    pub index: usize,
    pub credential: &'a HeaderValue,
}

/// Why [`Provider::authorize`] could not complete a request (a token fetch that failed, ...).
#[derive(Debug)]
pub struct AuthError(pub String);

impl Provider {
    /// Every provider, in the order listings show them.
    pub const ALL: [Provider; 8] = [
        Provider::OpenAi,
        Provider::Anthropic,
        Provider::GoogleAi,
        Provider::MistralAi,
        Provider::Azure,
        Provider::Aws,
        Provider::AwsMistral,
        Provider::Gcp,
    ];

    /// The service name operators use for this provider in `ALLOWED_VISION_SERVICES` and the
    /// `MAX_CONTEXT_TOKENS_<SERVICE>` / `MAX_OUTPUT_TOKENS_<SERVICE>` variables (the
    /// original's `LLMService` names: `openai`, `anthropic`, `google-ai`, `mistral-ai`, `aws`,
    /// `gcp`, `azure`).
    pub fn service_name(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
            Provider::GoogleAi => "google-ai",
            Provider::MistralAi => "mistral-ai",
            Provider::Azure => "azure",
            Provider::Aws | Provider::AwsMistral => "aws",
            Provider::Gcp => "gcp",
        }
    }

    /// The request facts of a body of `api` sent to this provider.
    pub fn request_facts(self, api: Api, body: &Value) -> Result<RequestFacts, BadRequest> {
        let facts = match (self, api) {
            (_, Api::AnthropicMessages | Api::AnthropicOther) => {
                anthropic::request_facts(api, body)?
            }
            (_, Api::GoogleAiGenerate | Api::GoogleAiStream | Api::GoogleAiOther) => {
                google_ai::request_facts_for(api, body)?
            }
            (Provider::MistralAi, _) => mistral::request_facts(api, body)?,
            // Azure speaks OpenAI's format.
            _ => openai::request_facts(api, body)?,
        };
        self.finish_facts(api, facts)
    }

    /// [`Provider::request_facts`] read from the body's bytes, without building its tree, for
    /// the requests that have such a reader (OpenAI-format chat to OpenAI and Azure, and
    /// Anthropic Messages to Anthropic, Bedrock and Vertex AI: the bulk of the traffic); `None` for the others and for a body the reader leaves to the tree
    /// (then call [`Provider::request_facts`] on the tree). Both give the same facts.
    pub fn request_facts_from_bytes(
        self,
        api: Api,
        body: &[u8],
    ) -> Option<Result<RequestFacts, BadRequest>> {
        match (self, api) {
            (Provider::OpenAi | Provider::Azure, Api::OpenAiChat) => {
                Some(openai::chat_facts_from_bytes(body)?.and_then(|f| self.finish_facts(api, f)))
            }
            // Anthropic, and Claude on Bedrock and Vertex AI (the same Messages format).
            (_, Api::AnthropicMessages) => Some(
                anthropic::messages_facts_from_bytes(body)?.and_then(|f| self.finish_facts(api, f)),
            ),
            _ => None,
        }
    }

    /// What every provider's facts get alike: the clouds' model check and the family.
    fn finish_facts(self, api: Api, mut facts: RequestFacts) -> Result<RequestFacts, BadRequest> {
        // The clouds know only some model names: refuse the others before admission.
        match self {
            Provider::Aws => aws::claude_model_id(&facts.model).map(drop),
            Provider::AwsMistral => aws::mistral_model_id(&facts.model).map(drop),
            Provider::Gcp => gcp::vertex_model(&facts.model).map(drop),
            _ => Ok(()),
        }
        .map_err(|e| BadRequest(format!("{e}.")))?;
        facts.family = if api == Api::OpenAiImages {
            // The images endpoint serves only image models, whatever `model` names (on Azure,
            // a deployment).
            match self {
                Provider::Azure => "azure-dall-e",
                _ => "dall-e",
            }
        } else {
            self.family(&facts.model)
        };
        Ok(facts)
    }

    /// Sets the provider's own output-cap field of a generation request to `cap`.
    pub fn set_output_cap(self, api: Api, body: &mut Value, cap: u64) {
        match (self, api) {
            (_, Api::AnthropicMessages) => anthropic::set_output_cap(body, cap),
            (_, Api::GoogleAiGenerate | Api::GoogleAiStream) => {
                google_ai::set_output_cap(body, cap);
            }
            (Provider::MistralAi, Api::OpenAiChat) => mistral::set_output_cap(body, cap),
            // Bedrock's Mistral knows only `max_tokens`.
            (Provider::AwsMistral, Api::OpenAiChat) => openai::set_max_tokens(body, cap),
            (_, Api::OpenAiChat | Api::OpenAiCompletions) => openai::set_output_cap(api, body, cap),
            _ => {}
        }
    }

    /// Makes a stream report its usage when the provider only does so on request; true when
    /// the proxy asked on the client's behalf (the usage-only event is then hidden).
    pub fn ask_stream_usage(self, api: Api, body: &mut Value, facts: &RequestFacts) -> bool {
        self.asks_stream_usage(api, facts) && openai::ask_stream_usage(api, body, facts)
    }

    /// Whether [`Provider::ask_stream_usage`] would change the body (without changing it).
    pub fn asks_stream_usage(self, api: Api, facts: &RequestFacts) -> bool {
        match self {
            // Azure reports a stream's usage only when asked, as OpenAI.
            Provider::OpenAi | Provider::Azure => openai::wants_stream_usage(api, facts),
            // Anthropic, Gemini and Mistral streams always carry usage (Mistral refuses
            // `stream_options` with 422), and so do Bedrock's and Vertex's.
            Provider::Anthropic
            | Provider::GoogleAi
            | Provider::MistralAi
            | Provider::Aws
            | Provider::AwsMistral
            | Provider::Gcp => false,
        }
    }

    /// The quota family of a model on this provider.
    pub fn family(self, model: &str) -> &'static str {
        match self {
            Provider::OpenAi => openai::family(model),
            Provider::Anthropic => anthropic::family(model),
            Provider::GoogleAi => google_ai::family(model),
            Provider::MistralAi => mistral::family(model),
            Provider::Azure => azure::family(model),
            Provider::Aws => {
                aws::family(&aws::claude_model_id(model).unwrap_or_else(|_| model.to_string()))
            }
            Provider::AwsMistral => {
                aws::family(&aws::mistral_model_id(model).unwrap_or_else(|_| model.to_string()))
            }
            Provider::Gcp => gcp::family(model),
        }
    }

    /// Whether the response's model decides the family usage is counted in (Azure: the
    /// deployment decides the model, whatever the request's `model` says).
    pub fn family_from_response(self) -> bool {
        self == Provider::Azure
    }

    /// Reads one whole JSON response or one stream event; true for a usage-only event.
    pub fn observe(self, api: Api, v: &Value, seen: &mut Seen) -> bool {
        match api {
            Api::AnthropicMessages | Api::AnthropicOther => anthropic::observe(v, seen),
            Api::GoogleAiGenerate | Api::GoogleAiStream | Api::GoogleAiOther => {
                google_ai::observe(v, seen)
            }
            _ => openai::observe(v, seen),
        }
    }

    /// The usage object found under [`Provider::usage_key`] of a JSON response, typed.
    pub fn usage_from(self, api: Api, usage: &Value) -> Option<ReportedUsage> {
        match api {
            Api::AnthropicMessages | Api::AnthropicOther => {
                Some(anthropic::AnthropicUsage::from_json(usage)?.into_usage(true))
            }
            Api::GoogleAiGenerate | Api::GoogleAiStream | Api::GoogleAiOther => {
                google_ai::usage_from_json(usage)
            }
            _ => Some(openai::OpenAiUsage::from_json(usage)?.into_usage()),
        }
    }

    /// [`Provider::usage_from`] from the usage object's JSON text (borrowed from the response
    /// body; read without building a tree).
    pub fn usage_from_raw(self, api: Api, usage: &str) -> Option<ReportedUsage> {
        match api {
            Api::AnthropicMessages | Api::AnthropicOther => {
                let u: anthropic::AnthropicUsage = serde_json::from_str(usage).ok()?;
                Some(u.into_usage(true))
            }
            Api::GoogleAiGenerate | Api::GoogleAiStream | Api::GoogleAiOther => {
                let u: translate::gemini::UsageMetadata = serde_json::from_str(usage).ok()?;
                Some(u.into_usage())
            }
            _ => {
                let u = match openai::OpenAiUsage::from_text(usage) {
                    Some(u) => u,
                    None => serde_json::from_str(usage).ok()?,
                };
                u.prompt_tokens.is_some().then(|| u.into_usage())
            }
        }
    }

    /// The integer fields of this API's usage object that [`Provider::usage_from_counts`]
    /// reads, for the meter's one backward reading of a flat usage object
    /// (`meter::counts_back`); `None` where the usage is read only from its text.
    pub fn usage_count_keys(self, api: Api) -> Option<meter::CountKeys> {
        match api {
            Api::AnthropicMessages
            | Api::AnthropicOther
            | Api::GoogleAiGenerate
            | Api::GoogleAiStream
            | Api::GoogleAiOther => None,
            _ => Some(["prompt_tokens", "completion_tokens", "total_tokens", ""]),
        }
    }

    /// [`Provider::usage_from_raw`] from the counts of [`Provider::usage_count_keys`]'s fields
    /// (`None` for a field the object does not have), as that reads the same object.
    pub fn usage_from_counts(self, api: Api, counts: meter::Counts) -> Option<ReportedUsage> {
        self.usage_count_keys(api)?;
        let [prompt_tokens, completion_tokens, total_tokens, _] = counts;
        let u = openai::OpenAiUsage {
            prompt_tokens,
            completion_tokens,
            total_tokens,
        };
        u.prompt_tokens.is_some().then(|| u.into_usage())
    }

    /// The top-level field of a JSON response that holds its usage.
    pub fn usage_key(self) -> &'static str {
        match self {
            Provider::GoogleAi => "usageMetadata",
            _ => "usage",
        }
    }

    /// A decoder of this provider's response into what the meter and the client read, from
    /// the response's status and headers: Bedrock's binary event streams become SSE, its error
    /// answers the client's error shape.
    pub fn stream_decoder(
        self,
        _api: Api,
        status: axum::http::StatusCode,
        headers: &crate::http1::Fields,
    ) -> Option<Box<dyn StreamTransform>> {
        match self {
            Provider::Aws => aws::response_decoder(false, status, headers),
            Provider::AwsMistral => aws::response_decoder(true, status, headers),
            _ => None,
        }
    }

    /// Client request headers forwarded to this provider, besides `content-type` and `accept`.
    pub fn forwarded_headers(self) -> &'static [http::HeaderName] {
        match self {
            Provider::OpenAi => &openai::FORWARDED_HEADERS,
            // Bedrock takes `anthropic-beta` in the body; Vertex as a header.
            Provider::Anthropic | Provider::Aws | Provider::Gcp => &anthropic::FORWARDED_HEADERS,
            Provider::GoogleAi | Provider::MistralAi | Provider::Azure | Provider::AwsMistral => {
                &[]
            }
        }
    }

    /// Adds the headers this provider needs when the client sent none.
    pub fn default_headers(self, headers: &mut Fields) {
        if self == Provider::Anthropic {
            anthropic::default_headers(headers);
        }
    }

    /// The credential value of an operator key as its header carries it.
    pub fn key_credential(self, key: &str) -> String {
        match self {
            Provider::OpenAi | Provider::MistralAi => openai::key_credential(key),
            Provider::Anthropic | Provider::GoogleAi | Provider::Azure => key.to_string(),
            // Cloud credentials are not sent as a header: the request is signed, or carries an
            // access token, in `crate::proxy::ProviderUpstream::authorize`.
            Provider::Aws | Provider::AwsMistral | Provider::Gcp => String::new(),
        }
    }

    /// The upstream URL for a client path (`/v1/...`) and query string, sent with the key at
    /// `key_index` of the pool (Azure: each key is a deployment of its own).
    pub fn upstream_url(
        self,
        endpoint: &Endpoint,
        path: &str,
        query: Option<&str>,
        key_index: usize,
    ) -> String {
        match endpoint {
            Endpoint::Base(base) => base.join(path, query),
            Endpoint::Azure(d) => d.url(key_index, path),
        }
    }

    /// Puts the operator's credential on the final request. `endpoint` carries the provider's
    /// own state where it has some (a region, a token cache: add an [`Endpoint`] variant);
    /// `key.credential` is what [`Provider::key_credential`] made of the operator's key (a
    /// provider whose key has several parts, such as `accessKey:secret:region`, keeps them
    /// there and parses them here).
    pub fn authorize(
        self,
        endpoint: &Endpoint,
        req: &mut UpstreamRequest,
        key: &KeyUse<'_>,
    ) -> Result<(), AuthError> {
        let _ = endpoint;
        let name = match self {
            Provider::OpenAi | Provider::MistralAi => openai::AUTH_HEADER,
            Provider::Anthropic => anthropic::AUTH_HEADER,
            Provider::GoogleAi => google_ai::AUTH_HEADER,
            Provider::Azure => azure::AUTH_HEADER,
            Provider::Aws | Provider::AwsMistral | Provider::Gcp => {
                return Err(AuthError(
                    "cloud requests are authorized by their upstream's state".into(),
                ))
            }
        };
        req.headers.insert(name, key.credential.clone());
        Ok(())
    }
}

/// Where a provider's requests go.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// One base URL for every key.
    Base(BaseUrl),
    /// Azure: a resource and deployment per key.
    Azure(azure::Deployments),
}

/// A provider's base URL, normalised once at startup.
#[derive(Debug, Clone)]
pub struct BaseUrl {
    /// Without a trailing `/`, query or fragment (`https://api.openai.com`).
    base: String,
    /// True when the base URL already ends in `/v1` (as OpenAI-compatible servers are often
    /// written, e.g. `https://openrouter.ai/api/v1`), so that the client's `/v1` is not
    /// doubled.
    has_v1: bool,
}

impl BaseUrl {
    pub fn new(url: &url::Url) -> BaseUrl {
        let mut base = url.as_str().trim_end_matches('/').to_string();
        // A query or fragment on a base URL has no meaning here; dropping it keeps URL
        // building a plain concatenation.
        if let Some(i) = base.find(['?', '#']) {
            base.truncate(i);
            base = base.trim_end_matches('/').to_string();
        }
        let has_v1 = base.ends_with("/v1");
        BaseUrl { base, has_v1 }
    }

    /// The base as a string (no trailing `/`).
    pub fn as_str(&self) -> &str {
        &self.base
    }

    /// `base + path (+ ?query)`, without doubling `/v1`.
    pub fn join(&self, path: &str, query: Option<&str>) -> String {
        let path = if self.has_v1 {
            path.strip_prefix("/v1").unwrap_or(path)
        } else {
            path
        };
        let mut url = String::with_capacity(self.base.len() + path.len() + 64);
        url.push_str(&self.base);
        url.push_str(path);
        if let Some(q) = query.filter(|q| !q.is_empty()) {
            url.push('?');
            url.push_str(q);
        }
        url
    }
}

/// Reads an optional non-negative integer field; a string, float, negative number or other
/// type is a [`BadRequest`] naming the field (a cap the proxy misread could overrun a quota).
pub fn uint_field(body: &Value, field: &str) -> Result<Option<u64>, BadRequest> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| uint_field_error(field, v)),
    }
}

/// The refusal of a token count that is not a whole number.
pub(crate) fn uint_field_error(field: &str, got: &Value) -> BadRequest {
    BadRequest(format!(
        "`{field}` must be a whole number of tokens (got {got}); send it as an integer such as 1024, not a string or a decimal."
    ))
}

/// Appends `s` to prompt text, separated by a newline.
pub(crate) fn push_text(text: &mut String, s: &str) {
    if !text.is_empty() {
        text.push('\n');
    }
    text.push_str(s);
}

/// Appends a string field of a JSON value, if it is one.
pub(crate) fn push_str(text: &mut String, v: Option<&Value>) {
    if let Some(s) = v.and_then(Value::as_str) {
        push_text(text, s);
    }
}

/// Appends a JSON value as its compact text.
pub(crate) fn push_json(text: &mut String, v: &Value) {
    push_text(text, &v.to_string());
}

/// Tokens charged for one image part (OpenAI's low-detail price); images are not tokenized.
pub const IMAGE_TOKENS: u64 = 85;

/// Per-message overhead of chat formats (role and separators), as OpenAI documents it.
pub const MESSAGE_OVERHEAD: u64 = 4;

/// A message `content`: a string, or an array of parts (OpenAI `text`/`image_url` parts,
/// Anthropic `text`/`image`/`tool_use`/`tool_result`/`thinking` blocks).
pub(crate) fn collect_content(content: Option<&Value>, facts: &mut RequestFacts) {
    match content {
        Some(Value::String(s)) => push_text(&mut facts.prompt_text, s),
        Some(Value::Array(parts)) => {
            for p in parts {
                match p {
                    Value::String(s) => push_text(&mut facts.prompt_text, s),
                    Value::Object(o) => {
                        let kind = o.get("type").and_then(Value::as_str).unwrap_or("");
                        if kind.contains("image") || kind == "document" {
                            facts.prompt_fixed += IMAGE_TOKENS;
                            facts.has_images = true;
                            continue;
                        }
                        for k in ["text", "thinking"] {
                            push_str(&mut facts.prompt_text, o.get(k));
                        }
                        if let Some(input) = o.get("input") {
                            push_json(&mut facts.prompt_text, input);
                        }
                        if o.contains_key("content") {
                            collect_content(o.get("content"), facts);
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_join_without_doubling_v1() {
        let b = |s: &str| BaseUrl::new(&s.parse().expect("url"));
        assert_eq!(
            b("https://api.openai.com").join("/v1/models", None),
            "https://api.openai.com/v1/models"
        );
        assert_eq!(
            b("https://openrouter.ai/api/v1/").join("/v1/chat/completions", Some("a=1")),
            "https://openrouter.ai/api/v1/chat/completions?a=1"
        );
        assert_eq!(
            b("http://127.0.0.1:8080/base").join("/v1/embeddings", Some("")),
            "http://127.0.0.1:8080/base/v1/embeddings"
        );
    }

    #[test]
    fn caps_must_be_integers() {
        let body = serde_json::json!({"a": 5, "b": "5", "c": 5.5, "d": -1, "e": null});
        assert_eq!(uint_field(&body, "a"), Ok(Some(5)));
        assert!(uint_field(&body, "b").is_err());
        assert!(uint_field(&body, "c").is_err());
        assert!(uint_field(&body, "d").is_err());
        assert_eq!(uint_field(&body, "e"), Ok(None));
        assert_eq!(uint_field(&body, "zz"), Ok(None));
    }
}
