//! The glue between the pure translations of this module and the forwarder's
//! [`Translation`] hook: one object per request that turns the client's OpenAI chat body into
//! the upstream's (remembering what the client asked: model, stream, usage chunk), and the
//! [`StreamTransform`]s that turn the upstream's answer — one JSON body, or SSE events split
//! anywhere across chunks — back into an OpenAI completion or `chat.completion.chunk` stream.
//! Supplies the id and timestamp the pure functions take.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::HeaderValue;
use bytes::{Bytes, BytesMut};
use serde_json::Value;

use super::openai::{ChatRequest, StreamOut};
use super::{anthropic, gemini, TranslateError};
use crate::providers::google_ai::{self, Method, Version};
use crate::providers::{BadRequest, StreamTransform, Translation};

/// The output cap sent to Anthropic when an OpenAI client set none (Anthropic requires one;
/// the original proxy defaulted to the same 4096).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// What the client asked for, remembered from its request for the response.
#[derive(Debug, Clone, Default)]
struct ClientAsk {
    model: String,
    stream: bool,
    include_usage: bool,
}

/// The upstream format a route translates to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Anthropic,
    Gemini,
}

/// OpenAI chat in, Anthropic Messages or Gemini `generateContent` up, OpenAI chat back.
/// Built per request (it remembers the client's request for the response).
pub struct OpenAiChatTo {
    target: Target,
    ask: Mutex<Option<ClientAsk>>,
}

impl OpenAiChatTo {
    /// To Anthropic Messages (`POST /v1/messages`).
    pub fn anthropic() -> OpenAiChatTo {
        OpenAiChatTo {
            target: Target::Anthropic,
            ask: Mutex::new(None),
        }
    }

    /// To Gemini (`POST /v1beta/models/{model}:generateContent` or `:streamGenerateContent`).
    pub fn gemini() -> OpenAiChatTo {
        OpenAiChatTo {
            target: Target::Gemini,
            ask: Mutex::new(None),
        }
    }

    fn ask(&self) -> ClientAsk {
        self.ask
            .lock()
            .map(|a| a.clone().unwrap_or_default())
            .unwrap_or_default()
    }
}

fn bad(e: TranslateError) -> BadRequest {
    BadRequest(e.0)
}

impl Translation for OpenAiChatTo {
    fn request(&self, body: Value) -> Result<Value, BadRequest> {
        let req: ChatRequest = serde_json::from_value(body).map_err(|e| {
            BadRequest(format!(
                "The request body is not a valid OpenAI chat completion request: {e}."
            ))
        })?;
        let out = match self.target {
            Target::Anthropic => {
                serde_json::to_value(anthropic::request(&req, DEFAULT_MAX_TOKENS).map_err(bad)?)
            }
            Target::Gemini => {
                google_ai::check_model(gemini::model_id(&req.model)).map_err(BadRequest)?;
                serde_json::to_value(gemini::request(&req).map_err(bad)?)
            }
        }
        .map_err(|e| BadRequest(format!("The request cannot be translated: {e}.")))?;
        if let Ok(mut ask) = self.ask.lock() {
            *ask = Some(ClientAsk {
                model: req.model.clone(),
                stream: req.is_stream(),
                include_usage: req.include_usage(),
            });
        }
        Ok(out)
    }

    fn model(&self) -> Option<String> {
        let ask = self.ask();
        match self.target {
            Target::Anthropic => None,
            Target::Gemini => Some(gemini::model_id(&ask.model).to_owned()),
        }
    }

    fn upstream_path(&self) -> Option<String> {
        let ask = self.ask();
        match self.target {
            Target::Anthropic => None,
            Target::Gemini => {
                let method = if ask.stream {
                    Method::StreamGenerateContent
                } else {
                    Method::GenerateContent
                };
                Some(google_ai::generate_path(
                    Version::V1Beta,
                    gemini::model_id(&ask.model),
                    method,
                ))
            }
        }
    }

    fn response(&self, _stream: bool) -> Box<dyn StreamTransform> {
        let ask = self.ask();
        let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if !ask.stream {
            return Box::new(JsonBack {
                target: self.target,
                body: BytesMut::new(),
                id,
                created,
                model: ask.model,
            });
        }
        let translator = match self.target {
            Target::Anthropic => Translator::Anthropic(anthropic::StreamTranslator::new(
                id,
                created,
                ask.model,
                ask.include_usage,
            )),
            Target::Gemini => Translator::Gemini(gemini::StreamTranslator::new(
                id,
                created,
                ask.model,
                ask.include_usage,
            )),
        };
        Box::new(SseBack {
            decoder: SseDecoder::default(),
            translator,
        })
    }
}

/// A whole JSON answer, kept until the end and translated at once.
struct JsonBack {
    target: Target,
    body: BytesMut,
    id: String,
    created: u64,
    model: String,
}

impl StreamTransform for JsonBack {
    fn chunk(&mut self, chunk: Bytes) -> Bytes {
        self.body.extend_from_slice(&chunk);
        Bytes::new()
    }

    fn end(&mut self) -> Bytes {
        let body = std::mem::take(&mut self.body);
        let out = match self.target {
            Target::Anthropic => serde_json::from_slice::<anthropic::MessagesResponse>(&body)
                .map(|r| anthropic::response(&r, &self.id, self.created, &self.model))
                .and_then(|c| serde_json::to_vec(&c)),
            Target::Gemini => serde_json::from_slice::<gemini::GenerateContentResponse>(&body)
                .map(|r| gemini::response(&r, &self.id, self.created, &self.model))
                .and_then(|c| serde_json::to_vec(&c)),
        };
        match out {
            Ok(v) => Bytes::from(v),
            Err(e) => {
                // A 2xx body that is not the upstream's format: pass it on as it came rather
                // than inventing an answer.
                tracing::warn!(error = %e, "an upstream answer could not be translated");
                body.freeze()
            }
        }
    }

    fn content_type(&self) -> Option<HeaderValue> {
        Some(HeaderValue::from_static("application/json"))
    }
}

enum Translator {
    Anthropic(anthropic::StreamTranslator),
    Gemini(gemini::StreamTranslator),
}

/// An SSE answer, translated event by event.
struct SseBack {
    decoder: SseDecoder,
    translator: Translator,
}

impl SseBack {
    fn events(&mut self, data: Vec<String>) -> Bytes {
        let mut out = String::new();
        for d in data {
            let outs: Vec<StreamOut> = match &mut self.translator {
                Translator::Anthropic(t) => match serde_json::from_str(&d) {
                    Ok(event) => t.on_event(event),
                    Err(_) => continue,
                },
                Translator::Gemini(t) => match serde_json::from_str(&d) {
                    Ok(event) => t.on_event(event),
                    Err(_) => continue,
                },
            };
            for o in outs {
                out.push_str(&o.to_sse());
            }
        }
        Bytes::from(out)
    }
}

impl StreamTransform for SseBack {
    fn chunk(&mut self, chunk: Bytes) -> Bytes {
        let data = self.decoder.feed(&chunk);
        self.events(data)
    }

    fn end(&mut self) -> Bytes {
        let data = self.decoder.finish();
        let mut out = BytesMut::from(&self.events(data)[..]);
        if let Translator::Gemini(t) = &mut self.translator {
            for o in t.finish() {
                out.extend_from_slice(o.to_sse().as_bytes());
            }
        }
        out.freeze()
    }

    fn content_type(&self) -> Option<HeaderValue> {
        Some(HeaderValue::from_static("text/event-stream"))
    }
}

/// Splits SSE bytes into events' `data` (lines ended by `\n`, `\r\n` or `\r`; several `data:`
/// lines of one event joined by `\n`; other fields ignored). Written here rather than taken
/// from a crate because the SSE crates parse from a byte stream they own, while the forwarder
/// hands us chunks.
#[derive(Debug, Default)]
pub struct SseDecoder {
    line: Vec<u8>,
    /// The last byte seen was a `\r` (a `\n` right after it belongs to the same line end).
    after_cr: bool,
    data: Option<String>,
}

impl SseDecoder {
    /// Feeds bytes; returns the data of every event they completed.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut events = Vec::new();
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    self.on_line(&line, &mut events);
                }
                _ => self.line.push(b),
            }
        }
        events
    }

    /// The end of the stream: an event not closed by a blank line still counts.
    pub fn finish(&mut self) -> Vec<String> {
        let mut events = Vec::new();
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.on_line(&line, &mut events);
        }
        if let Some(d) = self.data.take() {
            events.push(d);
        }
        events
    }

    fn on_line(&mut self, line: &[u8], events: &mut Vec<String>) {
        if line.is_empty() {
            if let Some(d) = self.data.take() {
                events.push(d);
            }
            return;
        }
        if let Some(v) = line.strip_prefix(b"data:") {
            let v = v.strip_prefix(b" ").unwrap_or(v);
            let v = String::from_utf8_lossy(v);
            match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(&v);
                }
                None => self.data = Some(v.into_owned()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_split_anywhere() {
        let text =
            "event: a\r\ndata: {\"x\":1}\r\n\r\ndata: one\ndata: two\n\n: comment\n\ndata: last";
        for split in 0..text.len() {
            let mut d = SseDecoder::default();
            let mut got = d.feed(&text.as_bytes()[..split]);
            got.extend(d.feed(&text.as_bytes()[split..]));
            got.extend(d.finish());
            assert_eq!(
                got,
                vec!["{\"x\":1}", "one\ntwo", "last"],
                "split at {split}"
            );
        }
    }

    #[test]
    fn anthropic_stream_back_to_openai() {
        let t = OpenAiChatTo::anthropic();
        let up = t
            .request(serde_json::json!({"model": "claude-x", "stream": true,
                "messages": [{"role": "user", "content": "hi"}]}))
            .unwrap();
        assert_eq!(up["max_tokens"], DEFAULT_MAX_TOKENS);
        let mut back = t.response(true);
        let upstream = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-x\",\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":2}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        let (a, b) = upstream.split_at(100);
        let mut out = String::from_utf8(back.chunk(Bytes::from(a)).to_vec()).unwrap();
        out.push_str(std::str::from_utf8(&back.chunk(Bytes::from(b))).unwrap());
        out.push_str(std::str::from_utf8(&back.end()).unwrap());
        assert!(out.contains("\"content\":\"Hi\""), "{out}");
        assert!(out.contains("\"finish_reason\":\"stop\""), "{out}");
        assert!(out.ends_with("data: [DONE]\n\n"), "{out}");
    }

    #[test]
    fn gemini_target_path_and_model() {
        let t = OpenAiChatTo::gemini();
        t.request(
            serde_json::json!({"model": "models/gemini-2.5-flash", "stream": true,
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .unwrap();
        assert_eq!(t.model().as_deref(), Some("gemini-2.5-flash"));
        assert_eq!(
            t.upstream_path().as_deref(),
            Some("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse")
        );
        let e = OpenAiChatTo::gemini()
            .request(serde_json::json!({"model": "../x",
                "messages": [{"role": "user", "content": "hi"}]}))
            .unwrap_err();
        assert!(e.0.contains("not a Gemini model id"), "{}", e.0);
    }
}
