//! The [`Translation`] of an OpenAI chat route onto a Claude upstream (Bedrock, Vertex): the
//! request through `translate::anthropic::request`, the answer (whole, or the SSE stream event
//! by event) back through `translate::anthropic`. One instance per request: it remembers what
//! the client asked for (model, `stream_options.include_usage`) for the answer. Owns only the
//! glue; the conversions are `translate`'s.

use std::sync::Mutex;

use axum::http::HeaderValue;
use bytes::{Bytes, BytesMut};
use serde_json::Value;

use super::translate::{self, anthropic as ta};
use super::{BadRequest, StreamTransform, Translation};

/// The output cap sent when an OpenAI client gives none (Anthropic requires one).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

#[derive(Default)]
struct Asked {
    model: String,
    include_usage: bool,
}

/// OpenAI chat in, Anthropic Messages to the upstream.
#[derive(Default)]
pub struct OpenAiToClaude {
    asked: Mutex<Asked>,
}

impl OpenAiToClaude {
    pub fn new() -> OpenAiToClaude {
        OpenAiToClaude::default()
    }
}

fn id_and_time() -> (String, u64) {
    (
        format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        chrono::Utc::now().timestamp().max(0) as u64,
    )
}

impl Translation for OpenAiToClaude {
    fn request(&self, body: Value) -> Result<Value, BadRequest> {
        let req: translate::openai::ChatRequest = serde_json::from_value(body).map_err(|e| {
            BadRequest(format!(
                "The request body is not a valid OpenAI chat completion request: {e}."
            ))
        })?;
        if let Ok(mut a) = self.asked.lock() {
            a.model = req.model.clone();
            a.include_usage = req.include_usage();
        }
        let out = ta::request(&req, DEFAULT_MAX_TOKENS).map_err(|e| BadRequest(e.0))?;
        serde_json::to_value(out).map_err(|e| BadRequest(format!("cannot translate: {e}")))
    }

    fn response(&self, stream: bool) -> Box<dyn StreamTransform> {
        let (model, include_usage) = match self.asked.lock() {
            Ok(a) => (a.model.clone(), a.include_usage),
            Err(_) => (String::new(), false),
        };
        let (id, created) = id_and_time();
        if stream {
            Box::new(SseToOpenAi {
                buf: BytesMut::new(),
                translator: ta::StreamTranslator::new(id, created, model, include_usage),
            })
        } else {
            Box::new(JsonToOpenAi {
                buf: Vec::new(),
                id,
                created,
                model,
            })
        }
    }
}

/// A whole Messages answer → a `chat.completion`.
struct JsonToOpenAi {
    buf: Vec<u8>,
    id: String,
    created: u64,
    model: String,
}

impl StreamTransform for JsonToOpenAi {
    fn chunk(&mut self, chunk: Bytes) -> Bytes {
        self.buf.extend_from_slice(&chunk);
        Bytes::new()
    }

    fn end(&mut self) -> Bytes {
        match serde_json::from_slice::<ta::MessagesResponse>(&self.buf) {
            Ok(resp) => {
                let out = ta::response(&resp, &self.id, self.created, &self.model);
                Bytes::from(serde_json::to_vec(&out).unwrap_or_default())
            }
            // Not a Messages answer: pass it on as it came.
            Err(_) => Bytes::from(std::mem::take(&mut self.buf)),
        }
    }

    fn content_type(&self) -> Option<HeaderValue> {
        Some(HeaderValue::from_static("application/json"))
    }
}

/// A Messages SSE stream → `chat.completion.chunk` SSE, event by event.
struct SseToOpenAi {
    buf: BytesMut,
    translator: ta::StreamTranslator,
}

impl SseToOpenAi {
    /// Translates every complete event (ended by a blank line) in the buffer.
    fn drain(&mut self) -> Bytes {
        let mut out = String::new();
        while let Some(end) = find_event_end(&self.buf) {
            let event = self.buf.split_to(end.0 + end.1);
            let text = String::from_utf8_lossy(&event[..end.0]);
            let data: String = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect::<Vec<_>>()
                .join("\n");
            if data.is_empty() {
                continue;
            }
            if let Ok(ev) = serde_json::from_str::<ta::StreamEvent>(&data) {
                for o in self.translator.on_event(ev) {
                    out.push_str(&o.to_sse());
                }
            }
        }
        Bytes::from(out)
    }
}

/// The position of the first blank line (`\n\n` or `\r\n\r\n`) and its length.
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

impl StreamTransform for SseToOpenAi {
    fn chunk(&mut self, chunk: Bytes) -> Bytes {
        self.buf.extend_from_slice(&chunk);
        self.drain()
    }

    fn end(&mut self) -> Bytes {
        if !self.buf.is_empty() {
            self.buf.extend_from_slice(b"\n\n");
        }
        self.drain()
    }

    fn content_type(&self) -> Option<HeaderValue> {
        Some(HeaderValue::from_static("text/event-stream"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_claude_stream_split_anywhere_becomes_openai_chunks() {
        let t = OpenAiToClaude::new();
        let req = t
            .request(
                json!({"model": "claude-3-5-sonnet-20240620", "stream": true,
                "stream_options": {"include_usage": true},
                "messages": [{"role": "user", "content": "hi"}]}),
            )
            .expect("translates");
        assert_eq!(req["max_tokens"], DEFAULT_MAX_TOKENS);
        assert_eq!(req["stream"], true);
        let sse = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"m\",\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":3}}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let mut tr = t.response(true);
        let mut out = Vec::new();
        for b in sse.as_bytes().chunks(7) {
            out.extend_from_slice(&tr.chunk(Bytes::copy_from_slice(b)));
        }
        out.extend_from_slice(&tr.end());
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.contains("\"content\":\"Hi\""), "{text}");
        assert!(text.contains("\"prompt_tokens\":5"), "{text}");
        assert!(text.contains("\"completion_tokens\":3"), "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }
}
