//! The meter: reads a response's usage as it streams past, for any provider. It owns the
//! generic framing (SSE lines and events, a whole JSON body or its tail) and hands each JSON
//! object to the provider's `observe`, which knows the provider's usage fields. Removes the
//! usage-only event the proxy asked for on a client's behalf, and keeps the generated text so
//! that a response whose usage never arrives can be estimated. Streams that are not SSE are
//! decoded into SSE before they reach the meter ([`super::Provider::stream_decoder`]). Knows
//! nothing of users or the store, and nothing of any provider's JSON fields.

use bytes::{Buf, Bytes, BytesMut};
use serde_json::value::RawValue;
use serde_json::Value;

use super::{Api, Provider, Seen, Usage};

/// A non-streamed body is kept whole up to this size to read its `usage`; past it, only the
/// tail is kept (`usage` is the last field of every provider's response).
const JSON_BODY_CAP: usize = 16 * 1024 * 1024;
const JSON_TAIL: usize = 64 * 1024;

/// Observes one upstream response.
#[derive(Debug)]
pub struct Meter {
    provider: Provider,
    api: Api,
    /// Remove the usage-only SSE chunk (the client did not ask for it).
    hide_usage_chunk: bool,
    /// `None` until the response started.
    success: Option<bool>,
    is_sse: bool,
    /// SSE: bytes of a line that has not ended yet.
    partial_line: BytesMut,
    /// SSE: the data so far ended with a `\r` (a `\n` may follow, completing `\r\n`).
    after_cr: bool,
    /// SSE: whether the last complete line was forwarded to the client.
    last_line_forwarded: bool,
    /// SSE: data lines of the current event that did not parse on their own.
    event_data: String,
    /// SSE: the current event is the hidden usage chunk; its remaining lines are dropped.
    dropping_event: bool,
    /// JSON: the first chunk, kept as it came (shared, not copied): most answers are one
    /// chunk. Moved into `body` when a second one comes.
    first_chunk: Option<Bytes>,
    /// JSON: the body so far (or its tail once it outgrew [`JSON_BODY_CAP`]).
    body: Vec<u8>,
    body_truncated: bool,
    /// Usage and text seen so far.
    seen: Seen,
}

impl Meter {
    /// A meter for a response of `api` from `provider`; `hide_usage_chunk` removes the
    /// usage-only event the proxy asked for ([`Provider::ask_stream_usage`]).
    pub fn new(provider: Provider, api: Api, hide_usage_chunk: bool) -> Meter {
        Meter {
            provider,
            api,
            hide_usage_chunk,
            success: None,
            is_sse: false,
            partial_line: BytesMut::new(),
            after_cr: false,
            last_line_forwarded: true,
            event_data: String::new(),
            dropping_event: false,
            first_chunk: None,
            body: Vec::new(),
            body_truncated: false,
            seen: Seen::default(),
        }
    }

    pub fn on_response_start(&mut self, success: bool, is_sse: bool) {
        self.success = Some(success);
        self.is_sse = is_sse;
    }

    /// True once the upstream answered (whatever the status).
    pub fn started(&self) -> bool {
        self.success.is_some()
    }

    /// True when the response started with a 2xx status.
    pub fn succeeded(&self) -> bool {
        self.success == Some(true)
    }

    /// Observes a body chunk and returns what the client gets. Error responses and responses
    /// that need no rewriting pass through untouched (the same `Bytes`, no copy).
    pub fn on_chunk(&mut self, chunk: Bytes) -> Bytes {
        if !self.succeeded() {
            return chunk;
        }
        if !self.is_sse {
            self.keep_body(&chunk);
            return chunk;
        }
        if !self.hide_usage_chunk {
            self.scan_sse(&chunk, None);
            return chunk;
        }
        let mut out = BytesMut::with_capacity(chunk.len());
        self.scan_sse(&chunk, Some(&mut out));
        out.freeze()
    }

    /// Called when the body ended (normally or not): reads what is still buffered. A final
    /// line without a line ending can only be read here, not forwarded any more, when usage
    /// chunks are being hidden; SSE servers end every line, so this never happens in practice.
    pub fn end(&mut self) {
        if !self.succeeded() {
            return;
        }
        if self.is_sse {
            if !self.partial_line.is_empty() {
                let line = std::mem::take(&mut self.partial_line);
                self.sse_line(&line, None);
            }
            self.end_event();
        } else {
            self.read_json_body();
        }
    }

    /// The usage to charge, with `prompt_estimate` standing in for a prompt count the upstream
    /// never reported and `count` estimating the tokens of generated text when the upstream's
    /// completion count is missing or not final. `None` when nothing is charged (the upstream
    /// answered with an error or never answered).
    pub fn usage(&self, prompt_estimate: u64, count: impl Fn(&str) -> u64) -> Option<Usage> {
        if !self.succeeded() {
            return None;
        }
        let s = &self.seen;
        let prompt = s.prompt.unwrap_or(prompt_estimate);
        let completion = if !self.api.has_output() {
            0
        } else if s.completion_final {
            s.completion.unwrap_or(0)
        } else {
            let seen = count(&s.text).saturating_add(s.text_overflow_bytes / 4);
            seen.max(s.completion.unwrap_or(0))
        };
        Some(Usage { prompt, completion })
    }

    /// The family the response's model is counted in, for providers whose response decides
    /// it ([`Provider::family_from_response`]); `None` otherwise or when it named no model.
    pub fn response_family(&self) -> Option<&'static str> {
        if !self.provider.family_from_response() || !self.succeeded() {
            return None;
        }
        self.seen.model.as_deref().map(|m| self.provider.family(m))
    }

    /// True when [`Meter::usage`] would use its prompt estimate (the upstream answered but did
    /// not report the prompt's tokens), so that the caller counts the prompt only then.
    pub fn needs_prompt_estimate(&self) -> bool {
        self.succeeded() && self.seen.prompt.is_none()
    }

    /// True when the upstream reported both counts (no estimate is involved).
    pub fn exact(&self) -> bool {
        self.seen.prompt.is_some() && (self.seen.completion_final || !self.api.has_output())
    }

    fn keep_body(&mut self, chunk: &Bytes) {
        if self.first_chunk.is_none() && self.body.is_empty() && chunk.len() <= JSON_BODY_CAP {
            self.first_chunk = Some(chunk.clone());
            return;
        }
        if let Some(first) = self.first_chunk.take() {
            self.body.extend_from_slice(&first);
        }
        self.body.extend_from_slice(chunk);
        if self.body.len() > JSON_BODY_CAP {
            let cut = self.body.len() - JSON_TAIL;
            self.body.drain(..cut);
            self.body_truncated = true;
        }
    }

    fn read_json_body(&mut self) {
        let first = self.first_chunk.take();
        let kept = std::mem::take(&mut self.body);
        let body: &[u8] = first.as_deref().unwrap_or(&kept);
        let key = self.provider.usage_key();
        if !self.body_truncated {
            // Fast path: read only the top-level usage field, found by a scan of the body's
            // structure that builds nothing. When it holds both counts nothing else in the
            // body matters. The model matters only where the response decides the family
            // (Azure); without it the usage is found from the body's end, where providers put it.
            let fields = if self.provider.family_from_response() {
                top_level_fields(body, [key, "model"])
            } else {
                let count_keys = self.provider.usage_count_keys(self.api);
                let found = field_from_end(body, key, count_keys);
                if let FromEnd::Found(Some(_), Some(counts)) = found {
                    // The usage object was a flat one the walk read as it went.
                    if let Some(r) = self.provider.usage_from_counts(self.api, counts) {
                        self.seen.usage(r);
                        if self.seen.prompt.is_some() && self.seen.completion_final {
                            return;
                        }
                    }
                }
                match found {
                    FromEnd::Found(None, _) => Some([None, None]),
                    FromEnd::Found(Some(usage), _) => match std::str::from_utf8(usage) {
                        Ok(usage) => Some([Some(usage), None]),
                        Err(_) => top_level_fields(body, [key, "model"]),
                    },
                    FromEnd::Unsure => top_level_fields(body, [key, "model"]),
                }
            };
            if let Some([Some(u), model]) = fields {
                if self.provider.family_from_response() {
                    let model = model
                        .and_then(|m| serde_json::from_str::<&RawValue>(m).ok())
                        .map(RawValue::get);
                    if let Some(m) = model.and_then(super::raw::string) {
                        self.seen.model(&m);
                    }
                }
                if let Some(r) = self.provider.usage_from_raw(self.api, u) {
                    self.seen.usage(r);
                    if self.seen.prompt.is_some() && self.seen.completion_final {
                        return;
                    }
                }
            }
            // Otherwise the whole body: the text seen stands in for a missing count.
            if let Ok(v) = serde_json::from_slice::<Value>(body) {
                self.observe_json(&v);
                return;
            }
        }
        // A body too large to keep whole: the usage is near its end. A key inside a string
        // would be escaped (`\"usage\"`), so an unescaped key is the real one.
        if let Some(v) = field_from_tail(body, key) {
            if let Some(r) = self.provider.usage_from(self.api, &v) {
                self.seen.usage(r);
            }
        }
    }

    /// Splits SSE bytes into lines (ended by `\n`, `\r\n` or a lone `\r`, as the SSE format
    /// allows); complete lines are handled (and, when `out` is given, forwarded unless hidden)
    /// at once, a partial line waits for the rest. A `\r` at the very end of the data ends its
    /// line at once; a `\n` that then starts the next chunk completes that `\r\n` and follows
    /// the fate (forwarded or hidden) of its line.
    fn scan_sse(&mut self, chunk: &[u8], mut out: Option<&mut BytesMut>) {
        let mut buf = std::mem::take(&mut self.partial_line);
        buf.extend_from_slice(chunk);
        let mut start = 0;
        if self.after_cr {
            if let Some(&first) = buf.first() {
                self.after_cr = false;
                if first == b'\n' {
                    if let (true, Some(out)) = (self.last_line_forwarded, out.as_deref_mut()) {
                        out.extend_from_slice(b"\n");
                    }
                    start = 1;
                }
            }
        }
        while let Some(i) = buf[start..].iter().position(|&b| b == b'\n' || b == b'\r') {
            let i = start + i;
            let end = match (buf[i], buf.get(i + 1)) {
                (b'\n', _) => i + 1,
                (_, Some(b'\n')) => i + 2,
                (_, Some(_)) => i + 1,
                (_, None) => {
                    self.after_cr = true;
                    i + 1
                }
            };
            self.last_line_forwarded = self.sse_line(&buf[start..end], out.as_deref_mut());
            start = end;
        }
        buf.advance(start);
        self.partial_line = buf;
    }

    /// Handles one complete SSE line (with its line ending); returns whether it was forwarded.
    fn sse_line(&mut self, raw: &[u8], out: Option<&mut BytesMut>) -> bool {
        let line = trim_eol(raw);
        if line.is_empty() {
            let hidden = self.dropping_event;
            self.end_event();
            if !hidden {
                if let Some(out) = out {
                    out.extend_from_slice(raw);
                }
            }
            return !hidden;
        }
        if let Some(data) = line.strip_prefix(b"data:") {
            let data = data.strip_prefix(b" ").unwrap_or(data);
            let text = String::from_utf8_lossy(data);
            if text.trim() == "[DONE]" {
                // Nothing to read.
            } else if let Ok(v) = serde_json::from_str::<Value>(&text) {
                if self.observe_json(&v) && out.is_some() {
                    self.dropping_event = true;
                }
            } else {
                // A JSON payload split over several `data:` lines is joined at the event end.
                if !self.event_data.is_empty() {
                    self.event_data.push('\n');
                }
                self.event_data.push_str(&text);
            }
        }
        if self.dropping_event {
            return false;
        }
        if let Some(out) = out {
            out.extend_from_slice(raw);
        }
        true
    }

    fn end_event(&mut self) {
        self.dropping_event = false;
        if self.event_data.is_empty() {
            return;
        }
        let data = std::mem::take(&mut self.event_data);
        if let Ok(v) = serde_json::from_str::<Value>(&data) {
            self.observe_json(&v);
        }
    }

    /// Hands one JSON object (a whole response or one SSE event) to the provider; true for a
    /// usage-only event.
    fn observe_json(&mut self, v: &Value) -> bool {
        self.provider.observe(self.api, v, &mut self.seen)
    }
}

/// The JSON text of two top-level fields of a JSON object (borrowed from `body`), skipping
/// every other field without building it. `None` when the body is not a JSON object; a missing
/// field is `None` inside. The usual body goes through [`scan_fields`]; what that leaves (a key
/// with an escape) goes through serde.
fn top_level_fields<'b>(body: &'b [u8], keys: [&str; 2]) -> Option<[Option<&'b str>; 2]> {
    let text = std::str::from_utf8(body).ok()?;
    match scan_fields(text, keys) {
        Scan::Found(found) => Some(found),
        Scan::NotAnObject => None,
        Scan::AskSerde => serde_fields(body, keys).map(|f| f.map(|v| v.map(RawValue::get))),
    }
}

/// What [`field_from_end`] made of a body.
#[derive(Debug, PartialEq)]
enum FromEnd<'b> {
    /// The field's JSON text (not yet checked to be UTF-8), or `None`: the whole object was
    /// walked without it. With the counts the walk read from it when it was the body's last
    /// field and a flat object ([`counts_back`]).
    Found(Option<&'b [u8]>, Option<Counts>),
    /// Not an object this walk reads (cut short, a key with an escape, text that is not
    /// UTF-8): [`top_level_fields`] decides.
    Unsure,
}

/// The top-level field `key` of a JSON object, found by walking the object backwards from its
/// closing brace: value, colon, key, comma, and so on. Providers put a response's `usage` after
/// its generated content, so the walk usually stops after the last few dozen bytes, where
/// [`scan_fields`] walks the whole answer (issue 18). JSON reads the same backwards: a string
/// ends at a quote that follows an even number of backslashes, and containers nest. As
/// forwards, the last of duplicated keys wins and the values skipped are not checked.
///
/// With `count_keys`, a last field whose value is an object is first read as a flat object of
/// counts ([`counts_back`]), which finds its start as [`value_start_back`] does and reads the
/// counts on the way: the usage object is read once instead of walked back and read again.
fn field_from_end<'b>(b: &'b [u8], key: &str, count_keys: Option<CountKeys>) -> FromEnd<'b> {
    field_from_end_inner(b, key, count_keys).unwrap_or(FromEnd::Unsure)
}

fn field_from_end_inner<'b>(
    b: &'b [u8],
    key: &str,
    count_keys: Option<CountKeys>,
) -> Option<FromEnd<'b>> {
    let close = skip_ws_back(b, b.len().checked_sub(1)?)?;
    if b[close] != b'}' {
        return None;
    }
    // The object's opening brace, which must be the body's first byte but for whitespace.
    let opens_body = |i: usize| b[..i].iter().all(|c| c.is_ascii_whitespace());
    let mut i = skip_ws_back(b, close.checked_sub(1)?)?;
    if b[i] == b'{' {
        return opens_body(i).then_some(FromEnd::Found(None, None));
    }
    let mut counts = None;
    if let (Some(keys), b'}') = (count_keys, b[i]) {
        counts = counts_back(b, i, keys);
    }
    loop {
        // `i` is the last byte of a value.
        let value_start = match counts {
            Some((start, _)) => start,
            None => value_start_back(b, i)?,
        };
        let key_end = key_end_back(b, value_start)?;
        let key_start = string_start_back(b, key_end)?;
        let found = &b[key_start + 1..key_end];
        if found == key.as_bytes() {
            let value = &b[value_start..=i];
            return Some(FromEnd::Found(Some(value), counts.map(|(_, c)| c)));
        }
        counts = None;
        if found.contains(&b'\\') {
            // An escaped key may spell `key`: serde decodes it.
            return None;
        }
        let before = skip_ws_back(b, key_start.checked_sub(1)?)?;
        match b[before] {
            b',' => i = skip_ws_back(b, before.checked_sub(1)?)?,
            b'{' => return opens_body(before).then_some(FromEnd::Found(None, None)),
            _ => return None,
        }
    }
}

/// The closing quote of the key of the member whose value starts at `value_start`: back over
/// the colon and the whitespace around it. `None` when that is not what precedes the value.
fn key_end_back(b: &[u8], value_start: usize) -> Option<usize> {
    let colon = skip_ws_back(b, value_start.checked_sub(1)?)?;
    if b[colon] != b':' {
        return None;
    }
    let key_end = skip_ws_back(b, colon.checked_sub(1)?)?;
    (b[key_end] == b'"').then_some(key_end)
}

/// The names of up to four integer fields of a provider's usage object
/// ([`Provider::usage_count_keys`]); unused slots are empty.
pub type CountKeys = [&'static str; 4];
/// Their values, in the same order: `None` for a field the object does not have.
pub type Counts = [Option<u64>; 4];

/// Reads the flat JSON object that ends at `close` backwards: the index of its opening brace
/// and the values of `keys`, each a non-negative integer. Other fields' values are skipped as
/// [`value_start_back`] skips them. `None` for anything this walk does not settle the way the
/// forward reading ([`Provider::usage_from_raw`]) would: a wanted field that is not a plain
/// integer (a float, a string, a leading zero, past `u64::MAX`) or that comes twice, a key
/// with an escape, or text that is not an object. The caller then walks and reads as before,
/// so a `None` changes only the cost.
fn counts_back(b: &[u8], close: usize, keys: CountKeys) -> Option<(usize, Counts)> {
    let mut counts: Counts = [None; 4];
    let mut i = skip_ws_back(b, close.checked_sub(1)?)?;
    if b[i] == b'{' {
        return Some((i, counts));
    }
    loop {
        // `i` is the last byte of a value: a plain integer is read here, anything else
        // skipped.
        let mut start = i;
        while start > 0 && b[start - 1].is_ascii_digit() {
            start -= 1;
        }
        let digits = &b[start..=i];
        let number = (digits[0].is_ascii_digit()
            && (digits[0] != b'0' || digits.len() == 1)
            && start > 0
            && matches!(b[start - 1], b':' | b' ' | b'\t' | b'\n' | b'\r'))
        .then(|| plain_integer(digits))
        .flatten();
        if number.is_none() {
            start = value_start_back(b, i)?;
        }
        let key_end = key_end_back(b, start)?;
        // The key: one of `keys` where its text and an opening quote end at `key_end`, or
        // else found back to its opening quote. An escaped quote (`\"`) ends either early,
        // and the backslash before it then fails the check for `,` or `{` below.
        let wanted = keys.iter().position(|k| {
            let k = k.as_bytes();
            !k.is_empty()
                && key_end > k.len()
                && b[key_end - k.len() - 1] == b'"'
                && &b[key_end - k.len()..key_end] == k
        });
        let key_start = match wanted {
            Some(k) => {
                if counts[k].is_some() {
                    return None;
                }
                counts[k] = Some(number?);
                key_end - keys[k].len() - 1
            }
            None => {
                let mut q = key_end;
                loop {
                    q = q.checked_sub(1)?;
                    match b[q] {
                        b'"' => break q,
                        b'\\' => return None,
                        _ => {}
                    }
                }
            }
        };
        let before = skip_ws_back(b, key_start.checked_sub(1)?)?;
        match b[before] {
            b',' => i = skip_ws_back(b, before.checked_sub(1)?)?,
            b'{' => return Some((before, counts)),
            _ => return None,
        }
    }
}

/// The value of a JSON integer's digits (no sign, no leading zero); `None` past `u64::MAX`.
fn plain_integer(digits: &[u8]) -> Option<u64> {
    const SAFE: usize = 19; // 19 digits never pass u64::MAX
    if digits.len() <= SAFE {
        return Some(
            digits
                .iter()
                .fold(0, |n, &d| n * 10 + u64::from(d.wrapping_sub(b'0'))),
        );
    }
    digits.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?
            .checked_add(u64::from(d.wrapping_sub(b'0')))
    })
}

/// The last index at or before `i` that is not JSON whitespace.
fn skip_ws_back(b: &[u8], mut i: usize) -> Option<usize> {
    while matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i = i.checked_sub(1)?;
    }
    Some(i)
}

/// The index of the first byte of the value whose last byte is at `end`.
fn value_start_back(b: &[u8], end: usize) -> Option<usize> {
    match b[end] {
        b'"' => string_start_back(b, end),
        b'}' | b']' => {
            let mut depth = 0usize;
            let mut j = end;
            loop {
                match b[j] {
                    b'"' => j = string_start_back(b, j)?,
                    b'}' | b']' => depth += 1,
                    b'{' | b'[' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j);
                        }
                    }
                    _ => {}
                }
                j = j.checked_sub(1)?;
            }
        }
        _ => {
            let len = b[..=end].iter().rev().position(|c| {
                matches!(c, b',' | b':' | b'{' | b'[' | b' ' | b'\t' | b'\n' | b'\r')
            })?;
            (len > 0).then(|| end + 1 - len)
        }
    }
}

/// The index of the opening quote of the string whose closing quote is at `close`: the
/// nearest quote before it that follows an even number of backslashes.
fn string_start_back(b: &[u8], close: usize) -> Option<usize> {
    let mut end = close;
    loop {
        let q = quote_back(&b[..end])?;
        let backslashes = b[..q].iter().rev().take_while(|&&c| c == b'\\').count();
        if backslashes % 2 == 0 {
            return Some(q);
        }
        end = q;
    }
}

/// The last `"` of `b`: a plain loop over a short tail, `memrchr` beyond (as
/// [`quote_or_escape`] forwards).
fn quote_back(b: &[u8]) -> Option<usize> {
    const SHORT: usize = 32;
    let split = b.len().saturating_sub(SHORT);
    if let Some(i) = b[split..].iter().rposition(|&c| c == b'"') {
        return Some(split + i);
    }
    memchr::memrchr(b'"', &b[..split])
}

/// What [`scan_fields`] made of a body.
#[derive(Debug, PartialEq)]
enum Scan<'b> {
    Found([Option<&'b str>; 2]),
    /// Not a JSON object (or cut short): serde would not read it either.
    NotAnObject,
    /// A key with an escape: serde decodes it.
    AskSerde,
}

/// The top-level fields of a JSON object by a scan of its structure: strings are skipped by
/// their quotes, objects and arrays by their brackets, scalars by the byte that ends them;
/// nothing is parsed or built. serde's `IgnoredAny` does the same walk while also checking the
/// grammar of everything it skips, which was most of the cost of reading a response's usage
/// (issue 18). The values found are parsed by their readers afterwards; the skipped ones are
/// not checked (a body that is broken only outside the wanted fields is still read).
fn scan_fields<'b>(body: &'b str, keys: [&str; 2]) -> Scan<'b> {
    let b = body.as_bytes();
    let mut found = [None, None];
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return Scan::NotAnObject;
    }
    i = skip_ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        return Scan::Found(found);
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return Scan::NotAnObject;
        }
        let Some((key_end, escaped)) = string_end_escaped(b, i) else {
            return Scan::NotAnObject;
        };
        let key = &body[i + 1..key_end - 1];
        if escaped {
            return Scan::AskSerde;
        }
        i = skip_ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return Scan::NotAnObject;
        }
        i = skip_ws(b, i + 1);
        let Some(value_end) = value_end(b, i) else {
            return Scan::NotAnObject;
        };
        // The first byte before the whole key: most keys are not wanted.
        let wanted = |k: &&str| k.as_bytes().first() == key.as_bytes().first() && *k == key;
        if let Some(k) = keys.iter().position(wanted) {
            found[k] = Some(&body[i..value_end]);
        }
        i = skip_ws(b, value_end);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b'}') => return Scan::Found(found),
            _ => return Scan::NotAnObject,
        }
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// The index after the closing quote of the string that opens at `start`.
fn string_end(b: &[u8], start: usize) -> Option<usize> {
    string_end_escaped(b, start).map(|(end, _)| end)
}

/// [`string_end`], and whether the string holds an escape.
#[inline]
fn string_end_escaped(b: &[u8], start: usize) -> Option<(usize, bool)> {
    let mut escaped = false;
    let mut j = start + 1;
    loop {
        let k = j + quote_or_escape(b.get(j..)?)?;
        if b[k] == b'"' {
            return Some((k + 1, escaped));
        }
        // An escape: the next byte is escaped (a `\uXXXX`'s hex digits need no care).
        escaped = true;
        j = k + 2;
    }
}

/// The first `"` or `\\` of `b`. Most strings of a response are short (keys, ids, a role), for
/// which a plain loop is cheapest; a generated answer can be kilobytes, for which `memchr`'s
/// vector search is (measured with callgrind: `memchr` on every string cost more than it saved
/// on the benchmark's short answer).
fn quote_or_escape(b: &[u8]) -> Option<usize> {
    const SHORT: usize = 32;
    let head = &b[..b.len().min(SHORT)];
    if let Some(i) = head.iter().position(|&c| c == b'"' || c == b'\\') {
        return Some(i);
    }
    if b.len() <= SHORT {
        return None;
    }
    memchr::memchr2(b'"', b'\\', &b[SHORT..]).map(|i| SHORT + i)
}

/// The index after the value that starts at `start`.
fn value_end(b: &[u8], start: usize) -> Option<usize> {
    match *b.get(start)? {
        b'"' => string_end(b, start),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = start;
            while let Some(&c) = b.get(j) {
                match c {
                    b'"' => {
                        j = string_end(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let len = b[start..]
                .iter()
                .position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                .unwrap_or(b.len() - start);
            (len > 0).then_some(start + len)
        }
    }
}

/// [`top_level_fields`] by serde.
fn serde_fields<'b>(body: &'b [u8], keys: [&str; 2]) -> Option<[Option<&'b RawValue>; 2]> {
    use serde::de::{Deserializer, MapAccess, Visitor};
    struct Fields<'k>([&'k str; 2]);
    impl<'de> Visitor<'de> for Fields<'_> {
        type Value = [Option<&'de RawValue>; 2];
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut found = [None, None];
            while let Some(super::raw::Key(k)) = map.next_key()? {
                match self.0.iter().position(|key| *key == k) {
                    Some(i) => found[i] = Some(map.next_value::<&'de RawValue>()?),
                    None => {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
            }
            Ok(found)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    de.deserialize_map(Fields(keys)).ok()
}

fn trim_eol(raw: &[u8]) -> &[u8] {
    let l = raw.strip_suffix(b"\n").unwrap_or(raw);
    l.strip_suffix(b"\r").unwrap_or(l)
}

/// Finds the last unescaped `"<key>":` in `body` and parses the object after it.
fn field_from_tail(body: &[u8], key: &str) -> Option<Value> {
    let key = format!("\"{key}\"");
    let key = key.as_bytes();
    let mut end = body.len();
    while let Some(pos) = body[..end].windows(key.len()).rposition(|w| w == key) {
        end = pos;
        if pos > 0 && body[pos - 1] == b'\\' {
            continue;
        }
        let after = &body[pos + key.len()..];
        let colon = after.iter().position(|&b| !b.is_ascii_whitespace())?;
        if after[colon] != b':' {
            continue;
        }
        let mut values =
            serde_json::Deserializer::from_slice(&after[colon + 1..]).into_iter::<Value>();
        if let Some(Ok(v)) = values.next() {
            if v.is_object() {
                return Some(v);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::estimate::count_tokens;

    /// A usage object read backwards as the body's last field gives what the forward reading
    /// of its text gives, and the usual flat shapes are read that way.
    #[test]
    fn usage_counts_read_backwards_agree_with_the_forward_reading() {
        let (provider, api) = (Provider::OpenAi, Api::OpenAiChat);
        let keys = provider.usage_count_keys(api).expect("OpenAI reads counts");
        // (usage object, read backwards in one go)
        let usages = [
            (
                r#"{"prompt_tokens":14,"completion_tokens":2,"total_tokens":16}"#,
                true,
            ),
            (
                "{ \"prompt_tokens\" : 7 ,\n\"completion_tokens\":\r\n8\t}",
                true,
            ),
            (r#"{}"#, true),
            (r#"{ }"#, true),
            (r#"{"total_tokens":16}"#, true),
            (r#"{"prompt_tokens":0,"completion_tokens":10}"#, true),
            (r#"{"prompt_tokens":18446744073709551615}"#, true),
            (r#"{"a":-1,"b":1.5,"c":1e3,"prompt_tokens":5}"#, true),
            (
                r#"{"x":true,"prompt_tokens":5,"y":false,"z":null,"w":"s\"}{,"}"#,
                true,
            ),
            (
                r#"{"prompt_tokens":5,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":2,"audio_tokens":0}}"#,
                true,
            ),
            (
                r#"{"prompt_tokens":5,"completion_tokens_details":{"reasoning_tokens":0,"x":[1,{"a":"}"}]},"completion_tokens":3}"#,
                true,
            ),
            (r#"{"prompt_tokens":18446744073709551616}"#, false),
            (r#"{"prompt_tokens":100000000000000000000000}"#, false),
            (r#"{"prompt_tokens":1.0}"#, false),
            (r#"{"prompt_tokens":-0}"#, false),
            (r#"{"prompt_tokens":1e3}"#, false),
            (r#"{"prompt_tokens":"14"}"#, false),
            (r#"{"prompt_tokens":null}"#, false),
            (r#"{"prompt_tokens":1,"prompt_tokens":2}"#, false),
            (r#"{"prompt_t\u006fkens":5}"#, false),
            (r#"{"a\"prompt_tokens":5}"#, false),
            (r#"{"prompt_tokens":5,"a\"b":1}"#, false),
            (r#"{"prompt_tokens":5,"a\\":1}"#, false),
            (r#"{"completion_tokens":2,"prompt_tokens":014}"#, false),
        ];
        for (usage, in_one_go) in usages {
            for body in [
                format!(
                    r#"{{"id":"x","choices":[{{"message":{{"content":"}}"}}}}],"usage":{usage}}}"#
                ),
                format!("{{\"usage\" :\n{usage}\n}}\n"),
            ] {
                let plain = field_from_end(body.as_bytes(), "usage", None);
                match field_from_end(body.as_bytes(), "usage", Some(keys)) {
                    FromEnd::Found(Some(text), counts) => {
                        let text = std::str::from_utf8(text).unwrap();
                        assert_eq!(text, usage, "{body}");
                        assert!(
                            matches!(plain, FromEnd::Found(Some(t), None) if t == text.as_bytes())
                        );
                        assert_eq!(counts.is_some(), in_one_go, "{body}");
                        if let Some(c) = counts {
                            assert_eq!(
                                provider.usage_from_counts(api, c),
                                provider.usage_from_raw(api, text),
                                "{body}"
                            );
                        }
                    }
                    other => panic!("{body}: {other:?}"),
                }
            }
        }
        // Usage that is not the last field is found as before, without counts.
        let body = r#"{"usage":{"prompt_tokens":1},"x":{"prompt_tokens":2}}"#;
        assert!(matches!(
            field_from_end(body.as_bytes(), "usage", Some(keys)),
            FromEnd::Found(Some(br#"{"prompt_tokens":1}"#), None)
        ));
        // Every cut of a body is read backwards with counts as without them.
        let full =
            r#"{"model":"m","usage":{"prompt_tokens":12,"x":{"y":[2]},"completion_tokens":3}}"#;
        for start in 0..full.len() {
            for end in start..=full.len() {
                let cut = &full.as_bytes()[start..end];
                let with = field_from_end(cut, "usage", Some(keys));
                let without = field_from_end(cut, "usage", None);
                match (&with, &without) {
                    (FromEnd::Found(a, _), FromEnd::Found(b, None)) => assert_eq!(a, b),
                    (FromEnd::Unsure, FromEnd::Unsure) => {}
                    _ => panic!("{}: {with:?} / {without:?}", &full[start..end]),
                }
            }
        }
    }

    /// Valid JSON bodies of many shapes: the scan finds exactly what serde finds.
    #[test]
    fn the_structural_scan_finds_what_serde_finds() {
        let bodies = [
            r#"{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":14,"completion_tokens":2,"total_tokens":16}}"#,
            r#"{}"#,
            r#"  { }  "#,
            "{\n  \"usage\" : { \"prompt_tokens\" : 1 } ,\n  \"model\"\t:\r\n \"m\"\n}\n",
            r#"{"model":null,"usage":null}"#,
            r#"{"model":"a\"b\\","usage":[1,2,{"x":"}]"}]}"#,
            r#"{"content":"text with \"usage\": {} and } and ] and \\","usage":{"input_tokens":3}}"#,
            r#"{"a":{"usage":{"nested":1}},"model":"top"}"#,
            r#"{"a":[[],[{}],"[{"],"usage":true,"n":-1.5e10,"f":false}"#,
            r#"{"usage":1,"usage":2}"#,
            r#"{"s":"\u0022usage\u0022","usage":{"k":"\ud83d\ude00"}}"#,
            r#"{"model":"é ü 日本","usage":{}}"#,
            r#"{"x":"\\","model":"\\\""}"#,
            r#"[{"usage":1}]"#,
            r#""usage""#,
            r#"42"#,
            r#"null"#,
            r#"{"usage":{"prompt_tokens":1},"choices":[{"text":"\\\"}"}],"n":[-0.5,true,null]}"#,
            r#"{"usage":{"a":"\\"},"t":"\\\\"}"#,
            r#"{"usag\u0065":{"prompt_tokens":5},"model":"m"}"#,
            r#"{"usage":{"prompt_tokens":5},"mod\u0065l":"m"}"#,
            r#"{"x":"{\"usage\":1}"}"#,
            r#"{"choices":[],"usage"  :  {"k":[{},[]]}  ,  "z":1e3  }"#,
        ];
        // Strings around the length where the scan switches from a loop to `memchr`, with
        // escapes and structural characters inside, before and after that point.
        let long: Vec<String> = [31, 32, 33, 64, 3000]
            .iter()
            .map(|&n| {
                let text = format!("{}\\\"}}]{}\\\\", "x".repeat(n), "y".repeat(n));
                format!(r#"{{"model":"{text}","choices":[{{"content":"{text}"}}],"usage":{{"k":"{text}"}}}}"#)
            })
            .collect();
        let bodies = bodies
            .iter()
            .copied()
            .chain(long.iter().map(String::as_str));
        for body in bodies {
            let serde = serde_fields(body.as_bytes(), ["usage", "model"])
                .map(|f| f.map(|v| v.map(RawValue::get)));
            match scan_fields(body, ["usage", "model"]) {
                Scan::Found(found) => assert_eq!(Some(found), serde, "{body}"),
                Scan::NotAnObject => assert_eq!(serde, None, "{body}"),
                Scan::AskSerde => assert!(body.contains("\\u0065"), "no escaped key in {body}"),
            }
            // Backwards: the same usage, or left to the forward reading.
            match field_from_end(body.as_bytes(), "usage", None) {
                FromEnd::Found(usage, _) => assert_eq!(
                    serde.map(|f| f[0]),
                    Some(usage.map(|u| std::str::from_utf8(u).unwrap())),
                    "{body}"
                ),
                FromEnd::Unsure => assert!(
                    serde.is_none() || body.contains("\\u0065"),
                    "{body} was left to the forward reading"
                ),
            }
        }
    }

    /// A body cut short is left to the forward reading, or read backwards as the reading of a
    /// cut body's tail ([`field_from_tail`]) reads it.
    #[test]
    fn a_body_cut_short_is_read_backwards_as_its_tail() {
        let full = r#"{"model":"m","choices":[{"message":{"content":"a \" b } \\"}}],"usage":{"prompt_tokens":1,"x":{"y":[2]}},"n":3}"#;
        for start in 0..full.len() {
            for end in start..=full.len() {
                let cut = &full[start..end];
                if let FromEnd::Found(Some(v), _) = field_from_end(cut.as_bytes(), "usage", None) {
                    let want = field_from_tail(cut.as_bytes(), "usage");
                    let got: Value = serde_json::from_slice(v).expect("a found value is JSON");
                    assert_eq!(Some(got), want, "{cut}");
                }
            }
        }
    }

    #[test]
    fn a_key_with_an_escape_is_left_to_serde_and_read_the_same() {
        let body = r#"{"usag\u0065":{"prompt_tokens":5},"model":"m"}"#;
        assert_eq!(scan_fields(body, ["usage", "model"]), Scan::AskSerde);
        assert_eq!(
            top_level_fields(body.as_bytes(), ["usage", "model"]),
            Some([Some(r#"{"prompt_tokens":5}"#), Some(r#""m""#)])
        );
    }

    #[test]
    fn a_body_cut_short_is_not_an_object_for_the_scan() {
        let full = r#"{"model":"m","choices":[{"message":{"content":"a \" b"}}],"usage":{"prompt_tokens":1}}"#;
        for end in 0..full.len() {
            let cut = &full[..end];
            assert_ne!(
                scan_fields(cut, ["usage", "model"]),
                Scan::AskSerde,
                "{cut}"
            );
            if let Scan::Found(f) = scan_fields(cut, ["usage", "model"]) {
                panic!("a cut body was read whole: {cut} -> {f:?}");
            }
        }
    }

    fn sse(events: &[&str]) -> String {
        events.iter().map(|e| format!("data: {e}\n\n")).collect()
    }

    /// Feeds `body` in chunks of `size` bytes and returns what the client got.
    fn feed(m: &mut Meter, body: &str, size: usize) -> String {
        let mut out = Vec::new();
        for piece in body.as_bytes().chunks(size.max(1)) {
            out.extend_from_slice(&m.on_chunk(Bytes::copy_from_slice(piece)));
        }
        m.end();
        String::from_utf8(out).expect("utf8")
    }

    const OPENAI_CHUNK: &str = r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hello there"}}]}"#;
    const OPENAI_DONE_CHUNK: &str =
        r#"{"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;
    const OPENAI_USAGE_CHUNK: &str = r#"{"id":"c","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}"#;

    #[test]
    fn openai_json_usage() {
        let mut m = Meter::new(Provider::OpenAi, Api::OpenAiChat, false);
        m.on_response_start(true, false);
        let body = r#"{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#;
        assert_eq!(feed(&mut m, body, 7), body);
        assert_eq!(
            m.usage(999, count_tokens),
            Some(Usage {
                prompt: 12,
                completion: 30
            })
        );
        assert!(m.exact());
    }

    #[test]
    fn openai_stream_with_client_requested_usage_is_untouched() {
        let body = sse(&[
            OPENAI_CHUNK,
            OPENAI_DONE_CHUNK,
            OPENAI_USAGE_CHUNK,
            "[DONE]",
        ]);
        for size in [1, 3, 17, 10_000] {
            let mut m = Meter::new(Provider::OpenAi, Api::OpenAiChat, false);
            m.on_response_start(true, true);
            assert_eq!(feed(&mut m, &body, size), body);
            assert_eq!(
                m.usage(0, count_tokens),
                Some(Usage {
                    prompt: 11,
                    completion: 7
                })
            );
        }
    }

    #[test]
    fn usage_chunk_is_hidden_from_a_client_that_did_not_ask() {
        let body = sse(&[
            OPENAI_CHUNK,
            OPENAI_DONE_CHUNK,
            OPENAI_USAGE_CHUNK,
            "[DONE]",
        ]);
        let expected = sse(&[OPENAI_CHUNK, OPENAI_DONE_CHUNK, "[DONE]"]);
        for size in [1, 2, 5, 64, 10_000] {
            let mut m = Meter::new(Provider::OpenAi, Api::OpenAiChat, true);
            m.on_response_start(true, true);
            assert_eq!(feed(&mut m, &body, size), expected, "chunk size {size}");
            assert_eq!(
                m.usage(0, count_tokens),
                Some(Usage {
                    prompt: 11,
                    completion: 7
                })
            );
        }
    }

    #[test]
    fn complete_events_are_never_held_back() {
        let mut m = Meter::new(Provider::OpenAi, Api::OpenAiChat, true);
        m.on_response_start(true, true);
        let first = format!("data: {OPENAI_CHUNK}\n\ndata: {{\"cho");
        let got = m.on_chunk(Bytes::from(first));
        assert_eq!(got, Bytes::from(format!("data: {OPENAI_CHUNK}\n\n")));
        let got = m.on_chunk(Bytes::from_static(b"ices\":[]}\n\n"));
        assert_eq!(got, Bytes::from_static(b"data: {\"choices\":[]}\n\n"));
    }

    #[test]
    fn crlf_and_multiline_data_events() {
        let body = "event: x\r\ndata: {\"choices\":[],\r\ndata: \"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\r\n\r\n";
        let mut m = Meter::new(Provider::OpenAi, Api::OpenAiChat, true);
        m.on_response_start(true, true);
        // A multi-line payload is not recognised as the usage chunk line by line, so it is
        // forwarded; its usage is still read.
        assert_eq!(feed(&mut m, body, 5), body);
        assert_eq!(
            m.usage(0, count_tokens),
            Some(Usage {
                prompt: 3,
                completion: 4
            })
        );
    }

    #[test]
    fn every_sse_line_ending_is_understood() {
        for eol in ["\n", "\r\n", "\r"] {
            let body: String = [OPENAI_CHUNK, OPENAI_USAGE_CHUNK, "[DONE]"]
                .iter()
                .map(|e| format!("data: {e}{eol}{eol}"))
                .collect();
            let expected = format!("data: {OPENAI_CHUNK}{eol}{eol}data: [DONE]{eol}{eol}");
            for size in [1, 2, 3, 7, 10_000] {
                let mut m = Meter::new(Provider::OpenAi, Api::OpenAiChat, true);
                m.on_response_start(true, true);
                assert_eq!(feed(&mut m, &body, size), expected, "{eol:?} size {size}");
                assert_eq!(
                    m.usage(0, count_tokens),
                    Some(Usage {
                        prompt: 11,
                        completion: 7
                    })
                );
            }
        }
    }

    #[test]
    fn stream_without_usage_is_estimated_from_text_seen() {
        let mut m = Meter::new(Provider::OpenAi, Api::OpenAiChat, true);
        m.on_response_start(true, true);
        let chunk = r#"{"choices":[{"delta":{"content":"one two three four"}}]}"#;
        let body = sse(&[chunk, chunk]);
        feed(&mut m, &body, 9);
        let u = m.usage(50, count_tokens).expect("charged");
        assert_eq!(u.prompt, 50);
        assert_eq!(u.completion, 2 * count_tokens("one two three four"));
        assert!(!m.exact());
    }

    #[test]
    fn error_responses_charge_nothing_and_pass_through() {
        let mut m = Meter::new(Provider::OpenAi, Api::OpenAiChat, true);
        m.on_response_start(false, false);
        let body = r#"{"error":{"message":"bad"},"usage":{"prompt_tokens":5}}"#;
        assert_eq!(feed(&mut m, body, 4), body);
        assert_eq!(m.usage(10, count_tokens), None);
        // Never answered at all: nothing charged either.
        let m = Meter::new(Provider::OpenAi, Api::OpenAiChat, false);
        assert_eq!(m.usage(10, count_tokens), None);
    }

    const ANTHROPIC_STREAM: &[&str] = &[
        r#"{"type":"message_start","message":{"id":"m","content":[],"usage":{"input_tokens":20,"cache_creation_input_tokens":5,"cache_read_input_tokens":100,"output_tokens":1}}}"#,
        r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello, how are you doing today?"}}"#,
        r#"{"type":"content_block_stop","index":0}"#,
        r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15}}"#,
        r#"{"type":"message_stop"}"#,
    ];

    fn anthropic_sse(events: &[&str]) -> String {
        events
            .iter()
            .map(|e| {
                let v: Value = serde_json::from_str(e).expect("json");
                format!(
                    "event: {}\ndata: {e}\n\n",
                    v["type"].as_str().expect("type")
                )
            })
            .collect()
    }

    #[test]
    fn anthropic_stream_usage_counts_cache_tokens() {
        let body = anthropic_sse(ANTHROPIC_STREAM);
        for size in [1, 13, 10_000] {
            let mut m = Meter::new(Provider::Anthropic, Api::AnthropicMessages, false);
            m.on_response_start(true, true);
            assert_eq!(feed(&mut m, &body, size), body);
            assert_eq!(
                m.usage(0, count_tokens),
                Some(Usage {
                    prompt: 125,
                    completion: 15
                })
            );
            assert!(m.exact());
        }
    }

    #[test]
    fn anthropic_stream_cut_after_message_start_keeps_exact_prompt() {
        let body = anthropic_sse(&ANTHROPIC_STREAM[..3]);
        let mut m = Meter::new(Provider::Anthropic, Api::AnthropicMessages, false);
        m.on_response_start(true, true);
        feed(&mut m, &body, 8);
        let u = m.usage(999, count_tokens).expect("charged");
        assert_eq!(u.prompt, 125);
        assert_eq!(
            u.completion,
            count_tokens("Hello, how are you doing today?")
        );
    }

    #[test]
    fn anthropic_json_usage() {
        let body = r#"{"id":"m","type":"message","content":[{"type":"text","text":"Hi"}],"usage":{"input_tokens":9,"output_tokens":4,"cache_read_input_tokens":1}}"#;
        let mut m = Meter::new(Provider::Anthropic, Api::AnthropicMessages, false);
        m.on_response_start(true, false);
        feed(&mut m, body, 3);
        assert_eq!(
            m.usage(0, count_tokens),
            Some(Usage {
                prompt: 10,
                completion: 4
            })
        );
    }

    #[test]
    fn embeddings_count_prompt_tokens_only() {
        let body =
            r#"{"data":[{"embedding":[0.1,0.2]}],"usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        let mut m = Meter::new(Provider::OpenAi, Api::OpenAiEmbeddings, false);
        m.on_response_start(true, false);
        feed(&mut m, body, 100);
        assert_eq!(
            m.usage(0, count_tokens),
            Some(Usage {
                prompt: 8,
                completion: 0
            })
        );
    }

    #[test]
    fn truncated_or_non_reporting_json_falls_back() {
        let mut m = Meter::new(Provider::OpenAi, Api::OpenAiChat, false);
        m.on_response_start(true, false);
        feed(
            &mut m,
            r#"{"choices":[{"message":{"content":"a b c"}}]}"#,
            100,
        );
        assert_eq!(
            m.usage(7, count_tokens),
            Some(Usage {
                prompt: 7,
                completion: count_tokens("a b c")
            })
        );
        let mut m = Meter::new(Provider::OpenAi, Api::OpenAiChat, false);
        m.on_response_start(true, false);
        feed(&mut m, r#"{"choices":[{"message":{"content":"a b"#, 100);
        assert_eq!(
            m.usage(7, count_tokens),
            Some(Usage {
                prompt: 7,
                completion: 0
            })
        );
    }

    #[test]
    fn usage_is_found_in_the_tail_of_a_huge_body() {
        let body = format!(
            "{{\"data\":\"{}\\\"usage\\\": {{}}\",\"usage\":{{\"prompt_tokens\":3,\"total_tokens\":3}}}}",
            "x".repeat(100)
        );
        let v = field_from_tail(body.as_bytes(), "usage").expect("found");
        assert_eq!(v["prompt_tokens"], 3);
        assert!(field_from_tail(b"{\"a\":1}", "usage").is_none());
        assert!(field_from_tail(b"\"usage\"", "usage").is_none());
    }
}
