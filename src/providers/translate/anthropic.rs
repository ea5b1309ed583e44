//! OpenAI chat ⇄ Anthropic Messages: the request (`messages`, `system`, content parts with
//! images, simple tools, `max_tokens`, `stop_sequences`, sampling, `stream`), the whole answer
//! and the event stream (`message_start` … `message_stop`) turned into `chat.completion.chunk`s.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::openai::{
    self, AssistantMessage, ChatCompletion, ChatRequest, Choice, ChunkFactory, Content, Delta,
    FunctionCall, FunctionDelta, Part, Role, StreamError, StreamErrorBody, StreamOut, ToolCall,
    ToolCallDelta, ToolChoice,
};
use super::{split_data_url, TranslateError};

// ---- The request ----

/// `POST /v1/messages` as translation writes it.
#[derive(Debug, Clone, Serialize)]
pub struct MessagesRequest {
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    pub max_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_sequences: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Metadata {
    pub user_id: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub role: &'static str,
    pub content: Vec<Block>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Block {
    Text {
        text: String,
    },
    Image {
        source: ImageSource,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        content: String,
    },
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ImageSource {
    Base64 { media_type: String, data: String },
    Url { url: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct Tool {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub input_schema: Value,
}

/// Translates an OpenAI chat request to Anthropic Messages. `default_max_tokens` is used when
/// the client gave no output cap (Anthropic requires one).
pub fn request(
    req: &ChatRequest,
    default_max_tokens: u64,
) -> Result<MessagesRequest, TranslateError> {
    if req.n.is_some_and(|n| n != 1) {
        return Err(TranslateError::new(
            "`n` must be 1 on this route: Claude answers with one choice.",
        ));
    }
    let mut system: Vec<String> = Vec::new();
    let mut messages: Vec<Message> = Vec::new();
    for (i, m) in req.messages.iter().enumerate() {
        let (role, blocks) = match m.role {
            Role::System | Role::Developer => {
                let text = openai::content_text(&m.content);
                if !text.is_empty() {
                    system.push(text);
                }
                continue;
            }
            Role::User => ("user", content_blocks(&m.content, i)?),
            Role::Assistant => {
                let mut blocks = content_blocks(&m.content, i)?;
                for call in m.tool_calls.iter().flatten() {
                    let input = tool_input(&call.function.arguments, i)?;
                    blocks.push(Block::ToolUse {
                        id: call.id.clone(),
                        name: call.function.name.clone(),
                        input,
                    });
                }
                ("assistant", blocks)
            }
            Role::Tool => {
                let Some(id) = m.tool_call_id.clone() else {
                    return Err(TranslateError::new(format!(
                        "messages[{i}]: a `tool` message needs `tool_call_id`."
                    )));
                };
                let content = openai::content_text(&m.content);
                (
                    "user",
                    vec![Block::ToolResult {
                        tool_use_id: id,
                        content,
                    }],
                )
            }
            Role::Function => {
                return Err(TranslateError::new(format!(
                    "messages[{i}]: the `function` role is not supported; send `tool` messages."
                )))
            }
        };
        if blocks.is_empty() {
            continue;
        }
        // Anthropic wants alternating turns: consecutive messages of one role become one.
        match messages.last_mut() {
            Some(last) if last.role == role => last.content.extend(blocks),
            _ => messages.push(Message {
                role,
                content: blocks,
            }),
        }
    }
    if messages.is_empty() {
        return Err(TranslateError::new(
            "`messages` must contain at least one user or assistant message.",
        ));
    }
    let tools = match &req.tools {
        None => None,
        Some(tools) if tools.is_empty() => None,
        Some(tools) => Some(
            tools
                .iter()
                .map(|t| {
                    if t.kind != "function" {
                        return Err(TranslateError::new(format!(
                            "tools: type `{}` is not supported; only `function` tools translate.",
                            t.kind
                        )));
                    }
                    Ok(Tool {
                        name: t.function.name.clone(),
                        description: t.function.description.clone(),
                        input_schema: t
                            .function
                            .parameters
                            .clone()
                            .unwrap_or_else(|| serde_json::json!({"type": "object"})),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let tool_choice = match &req.tool_choice {
        None => None,
        Some(ToolChoice::Mode(m)) => Some(match m.as_str() {
            "auto" => serde_json::json!({"type": "auto"}),
            "required" => serde_json::json!({"type": "any"}),
            "none" => serde_json::json!({"type": "none"}),
            other => {
                return Err(TranslateError::new(format!(
                    "tool_choice: `{other}` is not one of none, auto, required."
                )))
            }
        }),
        Some(ToolChoice::Named { function }) => {
            Some(serde_json::json!({"type": "tool", "name": function.name}))
        }
    };
    Ok(MessagesRequest {
        model: req.model.clone(),
        messages,
        system: (!system.is_empty()).then(|| system.join("\n\n")),
        max_tokens: req.output_cap().unwrap_or(default_max_tokens),
        stop_sequences: req.stop_sequences(),
        temperature: req.temperature,
        top_p: req.top_p,
        stream: req.is_stream().then_some(true),
        tools,
        tool_choice,
        metadata: req.user.clone().map(|user_id| Metadata { user_id }),
    })
}

fn content_blocks(content: &Option<Content>, i: usize) -> Result<Vec<Block>, TranslateError> {
    match content {
        None => Ok(Vec::new()),
        Some(Content::Text(t)) if t.is_empty() => Ok(Vec::new()),
        Some(Content::Text(t)) => Ok(vec![Block::Text { text: t.clone() }]),
        Some(Content::Parts(parts)) => parts
            .iter()
            .map(|p| match p {
                Part::Text { text } => Ok(Block::Text { text: text.clone() }),
                Part::ImageUrl { image_url } => {
                    let url = &image_url.url;
                    let source = if let Some((media_type, data)) = split_data_url(url) {
                        ImageSource::Base64 {
                            media_type: media_type.to_owned(),
                            data: data.to_owned(),
                        }
                    } else if url.starts_with("https://") || url.starts_with("http://") {
                        ImageSource::Url { url: url.clone() }
                    } else {
                        return Err(TranslateError::new(format!(
                            "messages[{i}]: image_url.url must be an https URL or a \
                             data:<type>;base64,<data> URL."
                        )));
                    };
                    Ok(Block::Image { source })
                }
                Part::Unsupported => Err(TranslateError::new(format!(
                    "messages[{i}]: only `text` and `image_url` content parts can be sent to \
                     this model."
                ))),
            })
            .collect(),
    }
}

fn tool_input(arguments: &str, i: usize) -> Result<Value, TranslateError> {
    if arguments.trim().is_empty() {
        return Ok(serde_json::json!({}));
    }
    serde_json::from_str(arguments).map_err(|_| {
        TranslateError::new(format!(
            "messages[{i}].tool_calls: `function.arguments` must be a JSON object text."
        ))
    })
}

// ---- The answer ----

/// A whole Messages answer.
#[derive(Debug, Clone, Deserialize)]
pub struct MessagesResponse {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub content: Vec<ResponseBlock>,
    #[serde(default)]
    pub stop_reason: Option<String>,
    #[serde(default)]
    pub usage: AnthropicUsage,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseBlock {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    /// Thinking blocks and anything newer: not part of an OpenAI answer.
    #[serde(other)]
    Other,
}

/// Anthropic's `usage`: the prompt is split into uncached, cache-written and cache-read
/// tokens; OpenAI's `prompt_tokens` counts all three.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct AnthropicUsage {
    #[serde(default)]
    pub input_tokens: Option<u64>,
    #[serde(default)]
    pub output_tokens: Option<u64>,
    #[serde(default)]
    pub cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    pub cache_read_input_tokens: Option<u64>,
}

impl AnthropicUsage {
    /// Prompt tokens, or `None` when this report carries no input count.
    pub fn prompt(&self) -> Option<u64> {
        let input = self.input_tokens?;
        Some(
            input
                .saturating_add(self.cache_creation_input_tokens.unwrap_or(0))
                .saturating_add(self.cache_read_input_tokens.unwrap_or(0)),
        )
    }
}

/// Anthropic's `stop_reason` as an OpenAI `finish_reason`.
pub fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        // end_turn, stop_sequence, pause_turn and anything newer.
        _ => "stop",
    }
}

/// Translates a whole Messages answer to a `chat.completion`. `model` is the one the client
/// asked for, used when the answer names none.
pub fn response(resp: &MessagesResponse, id: &str, created: u64, model: &str) -> ChatCompletion {
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for block in &resp.content {
        match block {
            ResponseBlock::Text { text: t } => text.push_str(t),
            ResponseBlock::ToolUse { id, name, input } => tool_calls.push(ToolCall {
                id: id.clone(),
                kind: "function".to_owned(),
                function: FunctionCall {
                    name: name.clone(),
                    arguments: input.to_string(),
                },
            }),
            ResponseBlock::Other => {}
        }
    }
    let content = (!text.is_empty() || tool_calls.is_empty()).then_some(text);
    ChatCompletion {
        id: id.to_owned(),
        object: "chat.completion",
        created,
        model: resp.model.clone().unwrap_or_else(|| model.to_owned()),
        choices: vec![Choice {
            index: 0,
            message: AssistantMessage {
                role: "assistant",
                content,
                tool_calls,
            },
            finish_reason: resp.stop_reason.as_deref().map(finish_reason),
        }],
        usage: openai::Usage::new(
            resp.usage.prompt().unwrap_or(0),
            resp.usage.output_tokens.unwrap_or(0),
        ),
    }
}

// ---- The stream ----

/// One event of a Messages stream (the JSON of its `data:` line; the `type` field repeats the
/// SSE `event:` name).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamEvent {
    MessageStart {
        message: StartMessage,
    },
    ContentBlockStart {
        index: u32,
        content_block: StartBlock,
    },
    ContentBlockDelta {
        index: u32,
        delta: BlockDelta,
    },
    ContentBlockStop {
        #[serde(default)]
        index: u32,
    },
    MessageDelta {
        delta: MessageDeltaBody,
        #[serde(default)]
        usage: AnthropicUsage,
    },
    MessageStop,
    Ping,
    Error {
        error: ErrorBody,
    },
    /// Event types added after this was written are skipped, as Anthropic asks clients to.
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StartMessage {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub usage: AnthropicUsage,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StartBlock {
    Text {
        #[serde(default)]
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BlockDelta {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    /// Thinking and signature deltas: not part of an OpenAI stream.
    #[serde(other)]
    Other,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MessageDeltaBody {
    #[serde(default)]
    pub stop_reason: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ErrorBody {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub message: String,
}

/// Turns a Messages event stream into a `chat.completion.chunk` stream, one event at a time.
#[derive(Debug)]
pub struct StreamTranslator {
    chunks: ChunkFactory,
    include_usage: bool,
    prompt: u64,
    completion: u64,
    /// Anthropic content-block index → OpenAI tool-call index.
    tool_indexes: Vec<(u32, u32)>,
    ended: bool,
}

impl StreamTranslator {
    /// `include_usage`: the client asked for `stream_options.include_usage`.
    pub fn new(id: String, created: u64, model: String, include_usage: bool) -> Self {
        StreamTranslator {
            chunks: ChunkFactory { id, created, model },
            include_usage,
            prompt: 0,
            completion: 0,
            tool_indexes: Vec::new(),
            ended: false,
        }
    }

    /// The usage reported so far.
    pub fn usage(&self) -> openai::Usage {
        openai::Usage::new(self.prompt, self.completion)
    }

    /// Feeds one event; returns what the client gets for it (possibly nothing).
    pub fn on_event(&mut self, event: StreamEvent) -> Vec<StreamOut> {
        if self.ended {
            return Vec::new();
        }
        match event {
            StreamEvent::MessageStart { message } => {
                if let Some(model) = message.model {
                    self.chunks.model = model;
                }
                self.absorb_usage(&message.usage);
                let delta = Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                    tool_calls: None,
                };
                vec![self.chunks.chunk(delta, None)]
            }
            StreamEvent::ContentBlockStart {
                index,
                content_block,
            } => match content_block {
                StartBlock::Text { text } if !text.is_empty() => vec![self.text(text)],
                StartBlock::ToolUse { id, name } => {
                    let tool_index = self.tool_indexes.len() as u32;
                    self.tool_indexes.push((index, tool_index));
                    let delta = Delta {
                        tool_calls: Some(vec![ToolCallDelta {
                            index: tool_index,
                            id: Some(id),
                            kind: Some("function"),
                            function: FunctionDelta {
                                name: Some(name),
                                arguments: String::new(),
                            },
                        }]),
                        ..Delta::default()
                    };
                    vec![self.chunks.chunk(delta, None)]
                }
                _ => Vec::new(),
            },
            StreamEvent::ContentBlockDelta { index, delta } => match delta {
                BlockDelta::TextDelta { text } => vec![self.text(text)],
                BlockDelta::InputJsonDelta { partial_json } if !partial_json.is_empty() => {
                    let Some(&(_, tool_index)) =
                        self.tool_indexes.iter().find(|(block, _)| *block == index)
                    else {
                        return Vec::new();
                    };
                    let delta = Delta {
                        tool_calls: Some(vec![ToolCallDelta {
                            index: tool_index,
                            id: None,
                            kind: None,
                            function: FunctionDelta {
                                name: None,
                                arguments: partial_json,
                            },
                        }]),
                        ..Delta::default()
                    };
                    vec![self.chunks.chunk(delta, None)]
                }
                BlockDelta::InputJsonDelta { .. } | BlockDelta::Other => Vec::new(),
            },
            StreamEvent::MessageDelta { delta, usage } => {
                self.absorb_usage(&usage);
                match delta.stop_reason {
                    Some(reason) => {
                        vec![self
                            .chunks
                            .chunk(Delta::default(), Some(finish_reason(&reason)))]
                    }
                    None => Vec::new(),
                }
            }
            StreamEvent::MessageStop => {
                self.ended = true;
                let mut out = Vec::new();
                if self.include_usage {
                    out.push(self.chunks.usage_chunk(self.usage()));
                }
                out.push(StreamOut::Done);
                out
            }
            StreamEvent::Error { error } => {
                self.ended = true;
                vec![StreamOut::Error(StreamError {
                    error: StreamErrorBody {
                        message: error.message,
                        kind: error.kind,
                    },
                })]
            }
            StreamEvent::ContentBlockStop { .. } | StreamEvent::Ping | StreamEvent::Unknown => {
                Vec::new()
            }
        }
    }

    fn text(&self, text: String) -> StreamOut {
        let delta = Delta {
            content: Some(text),
            ..Delta::default()
        };
        self.chunks.chunk(delta, None)
    }

    /// `message_start` carries the prompt (and a placeholder output count); `message_delta`
    /// carries the cumulative output count (and, on some platforms, the prompt again).
    fn absorb_usage(&mut self, usage: &AnthropicUsage) {
        if let Some(prompt) = usage.prompt() {
            self.prompt = prompt;
        }
        if let Some(output) = usage.output_tokens {
            self.completion = output;
        }
    }
}
