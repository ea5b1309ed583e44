//! OpenAI chat ⇄ Gemini `generateContent`: the request (`contents` with roles `user`/`model`,
//! `systemInstruction`, `generationConfig`, simple function tools), the whole answer and the
//! `streamGenerateContent?alt=sse` chunks turned into `chat.completion.chunk`s. In a stream,
//! `usageMetadata` is a running total repeated in chunks: the last one counts.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::openai::{
    self, AssistantMessage, ChatCompletion, ChatRequest, Choice, ChunkFactory, Content, Delta,
    FunctionCall, FunctionDelta, Part as OpenAiPart, Role, StreamError, StreamErrorBody, StreamOut,
    ToolCall, ToolCallDelta, ToolChoice,
};
use super::{split_data_url, TranslateError};

// ---- The request ----

/// The body of `models/{model}:generateContent` (the model goes in the path).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GenerateContentRequest {
    pub contents: Vec<GeminiContent>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_instruction: Option<GeminiContent>,
    pub generation_config: GenerationConfig,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<ToolSet>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_config: Option<Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GeminiContent {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    pub parts: Vec<RequestPart>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RequestPart {
    Text(String),
    InlineData {
        #[serde(rename = "mimeType")]
        mime_type: String,
        data: String,
    },
    FunctionCall {
        name: String,
        args: Value,
    },
    FunctionResponse {
        name: String,
        response: Value,
    },
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GenerationConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_sequences: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolSet {
    pub function_declarations: Vec<FunctionDeclaration>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FunctionDeclaration {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
}

/// The Gemini model id of an OpenAI `model` field (`models/` prefix dropped).
pub fn model_id(model: &str) -> &str {
    model.strip_prefix("models/").unwrap_or(model)
}

/// Translates an OpenAI chat request to a Gemini `generateContent` body.
pub fn request(req: &ChatRequest) -> Result<GenerateContentRequest, TranslateError> {
    if req.n.is_some_and(|n| n != 1) {
        return Err(TranslateError::new(
            "`n` must be 1 on this route: the proxy asks Gemini for one candidate.",
        ));
    }
    let mut system: Vec<RequestPart> = Vec::new();
    let mut contents: Vec<GeminiContent> = Vec::new();
    for (i, m) in req.messages.iter().enumerate() {
        let (role, parts) = match m.role {
            Role::System | Role::Developer => {
                let text = openai::content_text(&m.content);
                if !text.is_empty() {
                    system.push(RequestPart::Text(text));
                }
                continue;
            }
            Role::User => ("user", parts(&m.content, i)?),
            Role::Assistant => {
                let mut parts = parts(&m.content, i)?;
                for call in m.tool_calls.iter().flatten() {
                    let args = if call.function.arguments.trim().is_empty() {
                        serde_json::json!({})
                    } else {
                        serde_json::from_str(&call.function.arguments).map_err(|_| {
                            TranslateError::new(format!(
                                "messages[{i}].tool_calls: `function.arguments` must be a JSON \
                                 object text."
                            ))
                        })?
                    };
                    parts.push(RequestPart::FunctionCall {
                        name: call.function.name.clone(),
                        args,
                    });
                }
                ("model", parts)
            }
            Role::Tool => {
                // Gemini names the function a response answers; OpenAI names the call id.
                let name = m
                    .tool_call_id
                    .as_deref()
                    .and_then(|id| tool_name(req, id))
                    .ok_or_else(|| {
                        TranslateError::new(format!(
                            "messages[{i}]: `tool_call_id` must name a tool call of an earlier \
                             assistant message."
                        ))
                    })?;
                let text = openai::content_text(&m.content);
                let response = match serde_json::from_str::<Value>(&text) {
                    Ok(v @ Value::Object(_)) => v,
                    _ => serde_json::json!({ "content": text }),
                };
                (
                    "user",
                    vec![RequestPart::FunctionResponse { name, response }],
                )
            }
            Role::Function => {
                return Err(TranslateError::new(format!(
                    "messages[{i}]: the `function` role is not supported; send `tool` messages."
                )))
            }
        };
        if parts.is_empty() {
            continue;
        }
        match contents.last_mut() {
            Some(last) if last.role == Some(role) => last.parts.extend(parts),
            _ => contents.push(GeminiContent {
                role: Some(role),
                parts,
            }),
        }
    }
    if contents.is_empty() {
        return Err(TranslateError::new(
            "`messages` must contain at least one user or assistant message.",
        ));
    }
    let tools = match &req.tools {
        None => None,
        Some(tools) if tools.is_empty() => None,
        Some(tools) => {
            let declarations = tools
                .iter()
                .map(|t| {
                    if t.kind != "function" {
                        return Err(TranslateError::new(format!(
                            "tools: type `{}` is not supported; only `function` tools translate.",
                            t.kind
                        )));
                    }
                    Ok(FunctionDeclaration {
                        name: t.function.name.clone(),
                        description: t.function.description.clone(),
                        parameters: t.function.parameters.clone(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Some(vec![ToolSet {
                function_declarations: declarations,
            }])
        }
    };
    let tool_config = match &req.tool_choice {
        None => None,
        Some(ToolChoice::Mode(m)) => {
            let mode = match m.as_str() {
                "auto" => "AUTO",
                "required" => "ANY",
                "none" => "NONE",
                other => {
                    return Err(TranslateError::new(format!(
                        "tool_choice: `{other}` is not one of none, auto, required."
                    )))
                }
            };
            Some(serde_json::json!({ "functionCallingConfig": { "mode": mode } }))
        }
        Some(ToolChoice::Named { function }) => Some(serde_json::json!({
            "functionCallingConfig": { "mode": "ANY", "allowedFunctionNames": [function.name] }
        })),
    };
    Ok(GenerateContentRequest {
        contents,
        system_instruction: (!system.is_empty()).then_some(GeminiContent {
            role: None,
            parts: system,
        }),
        generation_config: GenerationConfig {
            max_output_tokens: req.output_cap(),
            temperature: req.temperature,
            top_p: req.top_p,
            stop_sequences: req.stop_sequences(),
        },
        tools,
        tool_config,
    })
}

fn tool_name(req: &ChatRequest, id: &str) -> Option<String> {
    req.messages
        .iter()
        .flat_map(|m| m.tool_calls.iter().flatten())
        .find(|c| c.id == id)
        .map(|c| c.function.name.clone())
}

fn parts(content: &Option<Content>, i: usize) -> Result<Vec<RequestPart>, TranslateError> {
    match content {
        None => Ok(Vec::new()),
        Some(Content::Text(t)) if t.is_empty() => Ok(Vec::new()),
        Some(Content::Text(t)) => Ok(vec![RequestPart::Text(t.clone())]),
        Some(Content::Parts(parts)) => parts
            .iter()
            .map(|p| match p {
                OpenAiPart::Text { text } => Ok(RequestPart::Text(text.clone())),
                OpenAiPart::ImageUrl { image_url } => match split_data_url(&image_url.url) {
                    Some((mime_type, data)) => Ok(RequestPart::InlineData {
                        mime_type: mime_type.to_owned(),
                        data: data.to_owned(),
                    }),
                    None => Err(TranslateError::new(format!(
                        "messages[{i}]: Gemini takes images inline only: send image_url.url as \
                         a data:<type>;base64,<data> URL."
                    ))),
                },
                OpenAiPart::Unsupported => Err(TranslateError::new(format!(
                    "messages[{i}]: only `text` and `image_url` content parts can be sent to \
                     this model."
                ))),
            })
            .collect(),
    }
}

// ---- The answer (whole, or one stream chunk: the same shape) ----

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GenerateContentResponse {
    #[serde(default)]
    pub candidates: Vec<Candidate>,
    #[serde(default)]
    pub usage_metadata: Option<UsageMetadata>,
    #[serde(default)]
    pub model_version: Option<String>,
    #[serde(default)]
    pub prompt_feedback: Option<PromptFeedback>,
    /// An error reported inside a stream.
    #[serde(default)]
    pub error: Option<GeminiError>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    #[serde(default)]
    pub content: Option<CandidateContent>,
    #[serde(default)]
    pub finish_reason: Option<String>,
    #[serde(default)]
    pub index: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct CandidateContent {
    #[serde(default)]
    pub parts: Vec<ResponsePart>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResponsePart {
    #[serde(default)]
    pub text: Option<String>,
    /// A thought summary, not part of the answer.
    #[serde(default)]
    pub thought: Option<bool>,
    #[serde(default)]
    pub function_call: Option<GeminiFunctionCall>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GeminiFunctionCall {
    pub name: String,
    #[serde(default)]
    pub args: Value,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PromptFeedback {
    #[serde(default)]
    pub block_reason: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct GeminiError {
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub status: String,
}

/// `usageMetadata`. Thinking tokens are billed as output; tool-use prompt tokens as input.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UsageMetadata {
    #[serde(default)]
    pub prompt_token_count: u64,
    #[serde(default)]
    pub candidates_token_count: u64,
    #[serde(default)]
    pub thoughts_token_count: u64,
    #[serde(default)]
    pub tool_use_prompt_token_count: u64,
    #[serde(default)]
    pub total_token_count: u64,
}

impl UsageMetadata {
    pub fn prompt(&self) -> u64 {
        self.prompt_token_count
            .saturating_add(self.tool_use_prompt_token_count)
    }
    pub fn completion(&self) -> u64 {
        self.candidates_token_count
            .saturating_add(self.thoughts_token_count)
    }
    pub fn to_openai(self) -> openai::Usage {
        openai::Usage::new(self.prompt(), self.completion())
    }
}

/// Gemini's `finishReason` as an OpenAI `finish_reason`.
pub fn finish_reason(reason: &str) -> &'static str {
    match reason {
        "MAX_TOKENS" => "length",
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
            "content_filter"
        }
        // STOP, OTHER, LANGUAGE, MALFORMED_FUNCTION_CALL and anything newer.
        _ => "stop",
    }
}

/// The answer text (thoughts left out) and function calls of one candidate. Function calls
/// get ids `call_<n>` (Gemini has none), numbered from `first_call`.
fn candidate_output(candidate: &Candidate, first_call: usize) -> (String, Vec<ToolCall>) {
    let mut text = String::new();
    let mut calls = Vec::new();
    for part in candidate.content.iter().flat_map(|c| &c.parts) {
        if part.thought == Some(true) {
            continue;
        }
        if let Some(t) = &part.text {
            text.push_str(t);
        }
        if let Some(call) = &part.function_call {
            calls.push(ToolCall {
                id: format!("call_{}", first_call + calls.len()),
                kind: "function".to_owned(),
                function: FunctionCall {
                    name: call.name.clone(),
                    arguments: call.args.to_string(),
                },
            });
        }
    }
    (text, calls)
}

/// Translates a whole `generateContent` answer to a `chat.completion`. `model` is the one the
/// client asked for, used when the answer names none.
pub fn response(
    resp: &GenerateContentResponse,
    id: &str,
    created: u64,
    model: &str,
) -> ChatCompletion {
    let choices = if resp.candidates.is_empty() {
        // A blocked prompt: no candidates, only `promptFeedback.blockReason`.
        vec![Choice {
            index: 0,
            message: AssistantMessage {
                role: "assistant",
                content: Some(String::new()),
                tool_calls: Vec::new(),
            },
            finish_reason: Some("content_filter"),
        }]
    } else {
        resp.candidates
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (text, tool_calls) = candidate_output(c, 0);
                let finish = match c.finish_reason.as_deref() {
                    Some("STOP") if !tool_calls.is_empty() => Some("tool_calls"),
                    Some(r) => Some(finish_reason(r)),
                    None => None,
                };
                Choice {
                    index: c.index.unwrap_or(i as u32),
                    message: AssistantMessage {
                        role: "assistant",
                        content: (!text.is_empty() || tool_calls.is_empty()).then_some(text),
                        tool_calls,
                    },
                    finish_reason: finish,
                }
            })
            .collect()
    };
    ChatCompletion {
        id: id.to_owned(),
        object: "chat.completion",
        created,
        model: resp
            .model_version
            .clone()
            .unwrap_or_else(|| model_id(model).to_owned()),
        choices,
        usage: resp.usage_metadata.unwrap_or_default().to_openai(),
    }
}

// ---- The stream ----

/// Turns `streamGenerateContent?alt=sse` chunks into a `chat.completion.chunk` stream. A
/// Gemini stream has no end event: call [`StreamTranslator::finish`] when the upstream body
/// ended.
#[derive(Debug)]
pub struct StreamTranslator {
    chunks: ChunkFactory,
    include_usage: bool,
    started: bool,
    finished: bool,
    ended: bool,
    tool_calls: usize,
    usage: Option<UsageMetadata>,
}

impl StreamTranslator {
    pub fn new(id: String, created: u64, model: String, include_usage: bool) -> Self {
        StreamTranslator {
            chunks: ChunkFactory {
                id,
                created,
                model: model_id(&model).to_owned(),
            },
            include_usage,
            started: false,
            finished: false,
            ended: false,
            tool_calls: 0,
            usage: None,
        }
    }

    /// The last usage the stream reported (a running total, not a delta).
    pub fn usage(&self) -> Option<UsageMetadata> {
        self.usage
    }

    pub fn on_event(&mut self, event: GenerateContentResponse) -> Vec<StreamOut> {
        if self.ended {
            return Vec::new();
        }
        if let Some(error) = event.error {
            self.ended = true;
            return vec![StreamOut::Error(StreamError {
                error: StreamErrorBody {
                    message: error.message,
                    kind: error.status,
                },
            })];
        }
        if let Some(usage) = event.usage_metadata {
            self.usage = Some(usage);
        }
        if let Some(version) = event.model_version {
            self.chunks.model = version;
        }
        let mut out = Vec::new();
        if !self.started {
            self.started = true;
            let delta = Delta {
                role: Some("assistant"),
                content: Some(String::new()),
                tool_calls: None,
            };
            out.push(self.chunks.chunk(delta, None));
        }
        let Some(candidate) = event.candidates.first() else {
            if event
                .prompt_feedback
                .is_some_and(|f| f.block_reason.is_some())
            {
                self.finished = true;
                out.push(self.chunks.chunk(Delta::default(), Some("content_filter")));
            }
            return out;
        };
        let (text, calls) = candidate_output(candidate, self.tool_calls);
        if !text.is_empty() {
            let delta = Delta {
                content: Some(text),
                ..Delta::default()
            };
            out.push(self.chunks.chunk(delta, None));
        }
        if !calls.is_empty() {
            let deltas = calls
                .into_iter()
                .enumerate()
                .map(|(i, call)| ToolCallDelta {
                    index: (self.tool_calls + i) as u32,
                    id: Some(call.id),
                    kind: Some("function"),
                    function: FunctionDelta {
                        name: Some(call.function.name),
                        arguments: call.function.arguments,
                    },
                })
                .collect::<Vec<_>>();
            self.tool_calls += deltas.len();
            let delta = Delta {
                tool_calls: Some(deltas),
                ..Delta::default()
            };
            out.push(self.chunks.chunk(delta, None));
        }
        if let Some(reason) = candidate.finish_reason.as_deref() {
            self.finished = true;
            let finish = if reason == "STOP" && self.tool_calls > 0 {
                "tool_calls"
            } else {
                finish_reason(reason)
            };
            out.push(self.chunks.chunk(Delta::default(), Some(finish)));
        }
        out
    }

    /// The upstream body ended: the usage chunk (when asked for) and `[DONE]`, if the stream
    /// really finished (a cut stream is not dressed up as a complete one).
    pub fn finish(&mut self) -> Vec<StreamOut> {
        if self.ended || !self.finished {
            self.ended = true;
            return Vec::new();
        }
        self.ended = true;
        let mut out = Vec::new();
        if self.include_usage {
            let usage = self.usage.unwrap_or_default().to_openai();
            out.push(self.chunks.usage_chunk(usage));
        }
        out.push(StreamOut::Done);
        out
    }
}
