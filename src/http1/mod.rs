//! HTTP/1.1 without I/O (issue 18), for both of a request's connections. Here, the upstream
//! side as `proxy::pool` speaks it: a request head written into a buffer, a response head read
//! with `httparse`, the answer's framing (RFC 9112 §6.3), and the chunked decoder (which the
//! server uses for request bodies too). [`server`]: the client side, as `crate::server` speaks
//! it. No I/O here: the callers read and write the connections and hand these functions their
//! bytes, so each rule is tested on fixtures.
//!
//! Why not hyper's client (what the pool used until issue 18's step 10): hyper drives each
//! connection from a task of its own, and a request crosses to it and back over channels.
//! Measured with callgrind on the benchmark, the same work done in the request's own task by
//! these functions costs about 8 000 instructions per request less (49 300 → 41 100, a sixth
//! of everything the proxy does for a request). What is hand-written is narrow: one
//! request per connection at a time (no pipelining, no upgrades, no HTTP/2), the answer's
//! bytes read by `httparse`, the body framed by the few rules below.

use std::io;

use axum::http::header::{self, HeaderName};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Version};
use bytes::{Buf, Bytes, BytesMut};

mod fields;
mod names;
mod reply;
pub mod server;

pub use fields::{FieldName, Fields, Lookup, Value};
pub use reply::Reply;

/// The largest head accepted, a client's request's or an upstream's answer's. Clients and
/// providers send about 2 KB of headers; anything near this is not an API call or answer.
pub const MAX_HEAD: usize = 64 * 1024;

/// The most header fields a head may have (hyper's default).
pub const MAX_HEADERS: usize = 100;

/// The longest line of a chunked body's framing (a size with its extensions, a trailer
/// field) and the most trailer bytes accepted.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;

/// Headers that belong to one connection, not to the message (RFC 9110 §7.6.1): never
/// copied from a request, and taken out of an answer's head once its framing is known (a
/// proxy must not pass them on, and nothing after the pool needs them).
fn hop_by_hop(name: &HeaderName) -> bool {
    hop_by_hop_named(name, name.as_str())
}

/// [`hop_by_hop`] for a name whose text the caller has already: `as_str` of a standard name
/// is a table lookup, which a walk that compares and then writes would otherwise repeat
/// (issue 18).
fn hop_by_hop_named(name: &HeaderName, text: &str) -> bool {
    name == header::TRANSFER_ENCODING
        || name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::UPGRADE
        || text == "keep-alive"
        || text == "proxy-connection"
}

/// Methods whose request carries no body unless it has one: an empty body gets no
/// `content-length` (as hyper writes them).
fn bodiless(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::CONNECT
    )
}

/// Writes one header field line into `out`.
fn write_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    // Room for the whole line first: each piece's own check then never grows the buffer.
    out.reserve(name.len() + value.len() + 4);
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Puts `headers` into a message just made (`Request::new`, `Response::new`); the map it
/// replaces goes to [`recycle_map`].
#[inline]
pub fn put_headers(slot: &mut HeaderMap, headers: HeaderMap) {
    recycle_map(std::mem::replace(slot, headers));
}

thread_local! {
    /// Header maps given back once their message is done with, cleared, for the next head
    /// read or request built on this thread.
    static SPARE_MAPS: std::cell::RefCell<Vec<HeaderMap>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// How many spare maps a thread keeps, and the largest it keeps (in entries it has room
/// for): a map that grew for an unusual head is dropped rather than kept.
const SPARE_MAPS_MAX: usize = 8;
const SPARE_MAP_ROOM: usize = 64;

/// An empty header map with room for at least `capacity` fields: a spare one of this thread
/// when there is one, else a new one. A request builds three maps (its head, the upstream
/// request, the upstream's answer); each new one costs two allocations and, dropped, two
/// frees, about 250 instructions (callgrind) that a cleared map given back does not.
pub fn header_map(capacity: usize) -> HeaderMap {
    match take_spare(&SPARE_MAPS) {
        Some(mut map) => {
            // Empty: room for `capacity` more is room for `capacity` (nothing when it has it).
            map.reserve(capacity);
            map
        }
        None => HeaderMap::with_capacity(capacity),
    }
}

/// Gives a header map back for [`header_map`] to hand out again, cleared (its fields are
/// dropped now). A map with more room than [`SPARE_MAP_ROOM`] is dropped. A map without room
/// was made by `HeaderMap::new`, which does not allocate, so it holds no memory and is
/// forgotten: its drop glue cost about 60 instructions (callgrind), for each message made
/// with an empty map and each request without quota headers.
pub fn recycle_map(mut map: HeaderMap) {
    let room = map.capacity();
    if room == 0 {
        std::mem::forget(map);
        return;
    }
    if room > SPARE_MAP_ROOM {
        return;
    }
    map.clear();
    keep_spare(&SPARE_MAPS, map, SPARE_MAPS_MAX);
}

/// A thread's list of emptied values of one kind (header maps, field lists), for the next
/// head read or request built on that thread.
type Spares<T> = std::thread::LocalKey<std::cell::RefCell<Vec<T>>>;

/// One of `spares`, if the thread has one.
fn take_spare<T: 'static>(spares: &'static Spares<T>) -> Option<T> {
    spares.with(|s| s.try_borrow_mut().ok().and_then(|mut s| s.pop()))
}

/// Keeps `spare` (emptied by the caller) in `spares`, unless they hold `max` already.
fn keep_spare<T: 'static>(spares: &'static Spares<T>, spare: T, max: usize) {
    spares.with(|s| {
        if let Ok(mut s) = s.try_borrow_mut() {
            if s.len() < max {
                s.push(spare);
            }
        }
    });
}

/// The version of a head whose version line `httparse` read as `HTTP/1.<minor>`.
fn version_of(minor: u8) -> Version {
    if minor == 1 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    }
}

/// Writes a request head into `out`: the request line, `host` (unless the headers have one),
/// the headers but the connection's own ones, and `content-length` for `body_len` bytes.
pub fn encode_head(
    out: &mut Vec<u8>,
    method: &Method,
    path: &str,
    host: &HeaderValue,
    headers: &Fields,
    body_len: usize,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // A walk of the few names, cheaper than a hashed lookup (about 100 instructions).
    if !headers.iter().any(|(n, _)| n == header::HOST) {
        write_field(out, b"host", host.as_bytes());
    }
    for (name, value) in headers {
        // The request headers the head writer sets itself, or drops: never copied.
        let text = name.as_str();
        if !(name == header::CONTENT_LENGTH || hop_by_hop_named(name, text)) {
            write_field(out, text.as_bytes(), value.as_bytes());
        }
    }
    if body_len > 0 || !bodiless(method) {
        write_field(
            out,
            b"content-length",
            itoa::Buffer::new().format(body_len).as_bytes(),
        );
    }
    out.extend_from_slice(b"\r\n");
}

/// How the answer's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (`HEAD`, 1xx, 204, 304, `content-length: 0`).
    Empty,
    /// `content-length` bytes.
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
    /// Until the upstream closes the connection.
    UntilClose,
}

/// A response head read from the front of a buffer.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub headers: Fields,
    pub framing: Framing,
    /// The connection may carry another request after this answer's body.
    pub keep_alive: bool,
}

/// What the front of the read buffer holds.
#[derive(Debug)]
pub enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// An interim (1xx) answer, taken off the buffer: the real one follows.
    Interim,
    /// The answer's head, taken off the buffer (what follows is its body).
    Done(Head),
}

fn invalid(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the upstream's answer is not valid HTTP/1.1: {what}"),
    )
}

/// Where each header field's name and value lie in a head, as offsets into its buffer:
/// httparse borrows the buffer, which must be split before the values can share it.
pub(crate) struct Spans {
    /// Written by [`Spans::record`] up to `len`; the rest is never read. Left unwritten
    /// rather than zeroed: zeroing the 1.6 KB table cost about 100 instructions per head.
    at: [std::mem::MaybeUninit<(u32, u32, u32, u32)>; MAX_HEADERS],
    len: usize,
}

impl Spans {
    /// No fields yet. (Declared before the parse, so that its table is written in place.)
    #[inline]
    pub(crate) fn new() -> Spans {
        Spans {
            at: [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS],
            len: 0,
        }
    }

    /// Records where `fields`, parsed from the buffer starting at `base`, lie; the head is at
    /// most [`MAX_HEAD`] long, so each offset fits.
    #[inline(always)]
    pub(crate) fn record(&mut self, base: *const u8, fields: &[httparse::Header<'_>]) {
        let base = base as usize;
        self.len = 0;
        for (slot, h) in self.at.iter_mut().zip(fields) {
            let name = h.name.as_ptr() as usize - base;
            let value = h.value.as_ptr() as usize - base;
            slot.write((
                name as u32,
                (name + h.name.len()) as u32,
                value as u32,
                (value + h.value.len()) as u32,
            ));
            self.len += 1;
        }
    }

    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The offsets of field `i`'s name and value.
    #[inline(always)]
    fn at(&self, i: usize) -> (usize, usize, usize, usize) {
        // SAFETY: the slots below `len` were written by `record` (the slice panics beyond).
        let (n0, n1, v0, v1) = unsafe { self.at[..self.len][i].assume_init() };
        (n0 as usize, n1 as usize, v0 as usize, v1 as usize)
    }

    /// Field `i`'s name; `None` for one that is not valid.
    #[inline(always)]
    pub(crate) fn name(&self, head: &Bytes, i: usize) -> Option<HeaderName> {
        let (n0, n1, _, _) = self.at(i);
        names::name(&head[n0..n1])
    }

    /// Field `i`'s value as bytes (not kept: no count of the head's buffer taken).
    #[inline(always)]
    pub(crate) fn bytes<'h>(&self, head: &'h Bytes, i: usize) -> &'h [u8] {
        let (_, _, v0, v1) = self.at(i);
        &head[v0..v1]
    }

    /// Where field `i`'s value lies in the head.
    #[inline(always)]
    pub(crate) fn value_span(&self, i: usize) -> (usize, usize) {
        let (_, _, v0, v1) = self.at(i);
        (v0, v1)
    }
}

/// The fields that delimit a message and decide its connection's reuse, as a head's fields
/// are read (the same rules for a request and an answer, RFC 9112 §6 and §9.3).
pub(crate) struct Delimiters {
    /// `content-length`, when given (a list of equal values counts once).
    pub length: Option<u64>,
    /// `transfer-encoding`, when given: whether its last coding is `chunked`.
    pub chunked: Option<bool>,
    /// The connection closes after this message.
    pub close: bool,
    version: Version,
}

/// A delimiting field that cannot be read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BadDelimiter {
    LengthNotANumber,
    TwoLengths,
}

impl Delimiters {
    pub(crate) fn new(version: Version) -> Delimiters {
        Delimiters {
            length: None,
            chunked: None,
            close: version != Version::HTTP_11,
            version,
        }
    }

    /// Takes note of one field (any field: the others are ignored).
    #[inline(always)]
    pub(crate) fn see(&mut self, name: &HeaderName, value: &[u8]) -> Result<(), BadDelimiter> {
        if name == header::CONTENT_LENGTH {
            for part in value.split(|&b| b == b',') {
                let n = digits(part.trim_ascii()).ok_or(BadDelimiter::LengthNotANumber)?;
                if self.length.is_some_and(|l| l != n) {
                    return Err(BadDelimiter::TwoLengths);
                }
                self.length = Some(n);
            }
        } else if name == header::TRANSFER_ENCODING {
            // The last coding decides: chunked, or the body cannot be delimited by it.
            let last = value.rsplit(|&b| b == b',').next().unwrap_or(b"");
            self.chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == header::CONNECTION {
            for t in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if t.eq_ignore_ascii_case(b"close") {
                    self.close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") && self.version == Version::HTTP_10
                {
                    self.close = false;
                }
            }
        }
        Ok(())
    }
}

/// Reads a response head from the front of `buf` (an answer to `method`), taking it off the
/// buffer when whole. The header values share the buffer's memory (no copy).
pub fn parse_head(buf: &mut BytesMut, method: &Method) -> io::Result<Parsed> {
    parse_head_without(buf, method, &[])
}

/// [`parse_head`], leaving the headers named in `left_out` out of the head (they are still
/// checked as the others are).
pub fn parse_head_without(
    buf: &mut BytesMut,
    method: &Method,
    left_out: &[HeaderName],
) -> io::Result<Parsed> {
    let mut spans = Spans::new();
    let (len, code, version) = {
        // Uninitialised slots: httparse fills the ones it uses (a hundred empty headers
        // written first would be work for nothing).
        let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut res,
            buf,
            &mut fields,
        );
        // A partial head counts with all that was read of it.
        let (len, whole) = match parsed {
            Ok(httparse::Status::Complete(len)) => (len, true),
            Ok(httparse::Status::Partial) => (buf.len(), false),
            Err(e) => return Err(invalid(e)),
        };
        if len > MAX_HEAD {
            return Err(invalid(format_args!(
                "its head is larger than {} KiB",
                MAX_HEAD / 1024
            )));
        }
        if !whole {
            return Ok(Parsed::Partial);
        }
        spans.record(buf.as_ptr(), res.headers);
        (len, res.code.unwrap_or(0), res.version.unwrap_or(1))
    };
    let head = buf.split_to(len).freeze();
    let status = StatusCode::from_u16(code).map_err(invalid)?;
    if status.is_informational() {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(invalid("it switched protocols, which was not asked for"));
        }
        return Ok(Parsed::Interim);
    }
    let version = version_of(version);
    let mut headers = Fields::with_capacity(spans.len());
    let mut delimiters = Delimiters::new(version);
    for i in 0..spans.len() {
        let name = spans
            .name(&head, i)
            .ok_or_else(|| invalid("a header field is not valid"))?;
        delimiters.see(&name, spans.bytes(&head, i)).map_err(|e| {
            invalid(match e {
                BadDelimiter::LengthNotANumber => "its content-length is not a number",
                BadDelimiter::TwoLengths => "it has two different content-lengths",
            })
        })?;
        if !hop_by_hop(&name) && !left_out.contains(&name) {
            let (v0, v1) = spans.value_span(i);
            headers.append_span(name, v0, v1);
        }
    }
    headers.set_head(head);
    let Delimiters {
        length,
        chunked,
        mut close,
        ..
    } = delimiters;
    let framing = if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else if let Some(chunked) = chunked {
        // Both framings in one answer (RFC 9112 §6.3: transfer-encoding wins) hint at a
        // broken or hostile upstream: the connection is not used again.
        if length.is_some() || version != Version::HTTP_11 {
            close = true;
        }
        if chunked {
            Framing::Chunked
        } else {
            close = true;
            Framing::UntilClose
        }
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => {
                close = true;
                Framing::UntilClose
            }
        }
    };
    Ok(Parsed::Done(Head {
        status,
        headers,
        framing,
        keep_alive: !close,
    }))
}

/// A decimal number of at most 19 digits (no sign, no spaces).
fn digits(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 19 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0, |n, &d| n * 10 + u64::from(d - b'0')))
}

/// What the chunked decoder found at the front of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Body bytes (taken off the buffer).
    Data(Bytes),
    /// More bytes are needed.
    More,
    /// The last chunk and the trailers were read: the body has ended.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A chunk-size line comes next.
    Size,
    /// This many bytes of a chunk's data are left.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer fields until an empty line; how many bytes of them so far.
    Trailers(usize),
    End,
}

/// The decoder of a `transfer-encoding: chunked` body (RFC 9112 §7.1): chunk extensions and
/// trailer fields are read and dropped (the relay passes neither on).
#[derive(Debug)]
pub struct Chunked {
    state: State,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked::new()
    }
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("a chunked body is malformed: {what}"),
    )
}

/// One CRLF-ended line at the front of `buf`, without its CRLF, taken off the buffer; `None`
/// while it is not whole.
fn line(buf: &mut BytesMut) -> io::Result<Option<BytesMut>> {
    let Some(lf) = memchr::memchr(b'\n', buf) else {
        if buf.len() > MAX_CHUNK_LINE {
            return Err(malformed("a line is too long"));
        }
        return Ok(None);
    };
    if lf == 0 || buf[lf - 1] != b'\r' {
        return Err(malformed("a line does not end with CRLF"));
    }
    if lf > MAX_CHUNK_LINE {
        return Err(malformed("a line is too long"));
    }
    let mut l = buf.split_to(lf + 1);
    l.truncate(lf - 1);
    Ok(Some(l))
}

/// A chunk-size line's size: hex digits, then optional spaces and `;` extensions.
fn chunk_size(l: &[u8]) -> io::Result<u64> {
    let hex = l.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let rest = l[hex..].trim_ascii_start();
    if !(rest.is_empty() || rest[0] == b';') {
        return Err(malformed("a chunk size is followed by something else"));
    }
    // Leading zeros are allowed (`1*HEXDIG`); the value must fit in 64 bits.
    std::str::from_utf8(&l[..hex])
        .ok()
        .and_then(|digits| u64::from_str_radix(digits, 16).ok())
        .ok_or_else(|| malformed("a chunk size is not a hex number of at most 64 bits"))
}

impl Chunked {
    pub fn new() -> Chunked {
        Chunked { state: State::Size }
    }

    /// Decodes from the front of `buf` until body bytes, the end, or the need for more.
    pub fn step(&mut self, buf: &mut BytesMut) -> io::Result<Step> {
        loop {
            match self.state {
                State::Size => {
                    let Some(l) = line(buf)? else {
                        return Ok(Step::More);
                    };
                    self.state = match chunk_size(&l)? {
                        0 => State::Trailers(0),
                        n => State::Data(n),
                    };
                }
                State::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::DataEnd
                    } else {
                        State::Data(left)
                    };
                    return Ok(Step::Data(buf.split_to(n).freeze()));
                }
                State::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Step::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(malformed("a chunk's data does not end with CRLF"));
                    }
                    buf.advance(2);
                    self.state = State::Size;
                }
                State::Trailers(seen) => {
                    let Some(l) = line(buf)? else {
                        return Ok(Step::More);
                    };
                    if l.is_empty() {
                        self.state = State::End;
                        return Ok(Step::End);
                    }
                    let seen = seen + l.len() + 2;
                    if seen > MAX_TRAILERS {
                        return Err(malformed("its trailers are too large"));
                    }
                    self.state = State::Trailers(seen);
                }
                State::End => return Ok(Step::End),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_of(text: &str, method: &Method) -> Head {
        let mut buf = BytesMut::from(text.as_bytes());
        match parse_head(&mut buf, method).unwrap() {
            Parsed::Done(h) => h,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_request_head_carries_host_the_headers_and_the_length() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        // The request's own framing and connection headers never go upstream as they are.
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        let mut out = Vec::new();
        let host = HeaderValue::from_static("api.example:8443");
        let headers = Fields::from_map(headers.clone());
        encode_head(&mut out, &Method::POST, "/v1/x?y=1", &host, &headers, 12);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /v1/x?y=1 HTTP/1.1\r\nhost: api.example:8443\r\nauthorization: Bearer k\r\n\
             x-a: 1\r\nx-a: 2\r\ncontent-length: 12\r\n\r\n"
        );
        // A GET without a body has no length; a POST without one says 0; a host header of
        // the request's own is kept instead of the target's.
        let mut out = Vec::new();
        encode_head(&mut out, &Method::GET, "/", &host, &Fields::new(), 0);
        assert_eq!(out, b"GET / HTTP/1.1\r\nhost: api.example:8443\r\n\r\n");
        let mut own = Fields::new();
        own.insert(header::HOST, HeaderValue::from_static("other"));
        let mut out = Vec::new();
        encode_head(&mut out, &Method::POST, "/", &host, &own, 0);
        assert_eq!(
            out,
            b"POST / HTTP/1.1\r\nhost: other\r\ncontent-length: 0\r\n\r\n"
        );
    }

    #[test]
    fn response_heads_are_framed_as_rfc_9112_says() {
        let post = Method::POST;
        let h = head_of(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nX-Request-Id: abc\r\n\r\n",
            &post,
        );
        assert_eq!(h.status, 200);
        assert_eq!(h.framing, Framing::Length(2));
        assert!(h.keep_alive);
        assert_eq!(h.headers.get("content-type").unwrap(), "application/json");
        assert_eq!(h.headers.get("x-request-id").unwrap(), "abc");
        // The connection's own headers are read for the framing, then left out.
        let h = head_of(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\
             Keep-Alive: timeout=5\r\nX-Kept: 1\r\n\r\n",
            &post,
        );
        assert_eq!(h.framing, Framing::Chunked);
        let names: Vec<&str> = h.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
        let cases: &[(&str, Framing, bool)] = &[
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                Framing::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n",
                Framing::Chunked,
                true,
            ),
            // Both: chunked wins, and the connection is not trusted again.
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
                Framing::Chunked,
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
                Framing::UntilClose,
                false,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", Framing::UntilClose, false),
            (
                "HTTP/1.1 204 No Content\r\ncontent-length: 7\r\n\r\n",
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\ncontent-length: 3\r\n\r\n",
                Framing::Length(3),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: Close\r\n\r\n",
                Framing::Length(2),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n",
                Framing::Length(2),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 2\r\nconnection: keep-alive\r\n\r\n",
                Framing::Length(2),
                true,
            ),
        ];
        for (text, framing, keep) in cases {
            let h = head_of(text, &post);
            assert_eq!((h.framing, h.keep_alive), (*framing, *keep), "{text:?}");
        }
        let h = head_of(
            "HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n",
            &Method::HEAD,
        );
        assert_eq!(h.framing, Framing::Empty);
    }

    #[test]
    fn a_head_is_read_across_reads_after_any_interim_answer() {
        let text =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 4\r\n\r\nbody";
        let mut buf = BytesMut::new();
        let mut interim = 0;
        let mut head = None;
        for &b in text {
            buf.extend_from_slice(&[b]);
            loop {
                match parse_head(&mut buf, &Method::POST).unwrap() {
                    Parsed::Partial => break,
                    Parsed::Interim => interim += 1,
                    Parsed::Done(h) => {
                        head = Some(h);
                        break;
                    }
                }
            }
            if head.is_some() {
                break;
            }
        }
        assert_eq!(interim, 1);
        assert_eq!(head.unwrap().status, 201);
        assert!(
            buf.is_empty(),
            "the body's bytes stay in the buffer as they come"
        );
    }

    #[test]
    fn broken_or_hostile_heads_are_errors() {
        for text in [
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 1 2\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            "SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(text.as_bytes());
            let e = parse_head(&mut buf, &Method::POST).unwrap_err();
            assert!(
                e.to_string().contains("not valid HTTP/1.1"),
                "{text:?}: {e}"
            );
        }
        let mut many = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("x-{i}: 1\r\n"));
        }
        many.push_str("\r\n");
        assert!(parse_head(&mut BytesMut::from(many.as_bytes()), &Method::POST).is_err());
        let mut huge = BytesMut::from(&b"HTTP/1.1 200 OK\r\nx-big: "[..]);
        huge.resize(MAX_HEAD + 10, b'a');
        assert!(parse_head(&mut huge, &Method::POST).is_err());
    }

    /// Fields left out of a response head are not in it, but still frame its body.
    #[test]
    fn headers_left_out_of_a_response_head_are_still_checked() {
        let text =
            "HTTP/1.1 200 OK\r\nServer: up\r\nDate: then\r\nX-Id: 1\r\nContent-Length: 2\r\n\r\nok";
        let left_out = [header::SERVER, header::DATE];
        let Parsed::Done(head) =
            parse_head_without(&mut BytesMut::from(text), &Method::GET, &left_out).unwrap()
        else {
            panic!("a whole head");
        };
        let names: Vec<_> = head.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["x-id", "content-length"]);
        // A left-out field still counts where it frames the body.
        let two = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok";
        let left_out = [header::CONTENT_LENGTH];
        assert!(parse_head_without(&mut BytesMut::from(two), &Method::GET, &left_out).is_err());
    }

    /// A map given back comes out again empty, with its room; one grown past the limit is not
    /// kept; the spares are bounded.
    #[test]
    fn header_maps_given_back_come_out_empty() {
        let mut m = header_map(4);
        m.insert(header::SERVER, HeaderValue::from_static("x"));
        let room = m.capacity();
        recycle_map(m);
        let again = header_map(2);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), room);
        let mut big = HeaderMap::with_capacity(4 * SPARE_MAP_ROOM);
        big.insert(header::DATE, HeaderValue::from_static("y"));
        recycle_map(big);
        assert!(header_map(1).capacity() <= SPARE_MAP_ROOM);
        for _ in 0..2 * SPARE_MAPS_MAX {
            recycle_map(HeaderMap::with_capacity(4));
        }
        assert_eq!(SPARE_MAPS.with(|s| s.borrow().len()), SPARE_MAPS_MAX);
        assert!(header_map(32).capacity() >= 32);
    }

    #[test]
    fn headers_put_into_a_new_message_replace_its_empty_map() {
        let mut resp = axum::http::Response::new(());
        let mut headers = HeaderMap::new();
        headers.insert(header::SERVER, HeaderValue::from_static("x"));
        put_headers(resp.headers_mut(), headers);
        assert_eq!(resp.headers()[header::SERVER], "x");
        // A map with room of its own is dropped, not forgotten (nothing to see but no leak).
        let mut other = HeaderMap::with_capacity(4);
        other.insert(header::DATE, HeaderValue::from_static("y"));
        put_headers(resp.headers_mut(), other);
        assert_eq!(resp.headers().len(), 1);
        assert_eq!(HeaderMap::<HeaderValue>::new().capacity(), 0);
    }

    /// Every byte value inside a header value, in a head long enough for `httparse`'s vector
    /// paths: the value is read only when `HeaderValue` itself would accept its bytes (what
    /// the unchecked construction in `Spans::field` relies on).
    #[test]
    fn a_value_httparse_accepts_is_a_valid_header_value() {
        for byte in 0..=255u8 {
            let mut value = vec![b'v'; 40];
            value[20] = byte;
            let mut text = b"HTTP/1.1 200 OK\r\nx-v: ".to_vec();
            text.extend_from_slice(&value);
            text.extend_from_slice(b"\r\ncontent-length: 0\r\n\r\n");
            let read = match parse_head(&mut BytesMut::from(&text[..]), &Method::GET) {
                Ok(Parsed::Done(h)) => h.headers.get("x-v").map(|v| v.as_bytes().to_vec()),
                _ => None,
            };
            let valid = HeaderValue::from_bytes(&value).is_ok();
            assert_eq!(read.is_some(), valid, "byte {byte:#04x}");
            if let Some(read) = read {
                assert_eq!(read, value, "byte {byte:#04x}");
            }
        }
    }

    /// Decodes `wire` fed `step` bytes at a time; the body, or the error.
    fn dechunk(wire: &[u8], step: usize) -> io::Result<(Vec<u8>, usize)> {
        let mut d = Chunked::new();
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut fed = 0;
        loop {
            match d.step(&mut buf)? {
                Step::Data(b) => body.extend_from_slice(&b),
                Step::End => return Ok((body, buf.len() + wire.len() - fed)),
                Step::More => {
                    if fed == wire.len() {
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "cut"));
                    }
                    let n = step.min(wire.len() - fed);
                    buf.extend_from_slice(&wire[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_however_the_bytes_arrive() {
        let wire = b"5\r\nhello\r\n1;ext=\"a b\"\r\n \r\nA  \r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, wire.len()] {
            let (body, left) = dechunk(wire, step).unwrap();
            assert_eq!(body, b"hello 0123456789", "step {step}");
            assert_eq!(left, 4, "the bytes after the body are not taken");
        }
        assert_eq!(dechunk(b"0\r\n\r\n", 1).unwrap().0, b"");
        assert_eq!(
            dechunk(b"00000000000000000003\r\nabc\r\n000\r\n\r\n", 5)
                .unwrap()
                .0,
            b"abc"
        );
        assert_eq!(
            dechunk(b"FFFFFFFFFFFFFFFF\r\nab", 64).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for wire in [
            &b"x\r\nhello\r\n0\r\n\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
            b"10000000000000000\r\n",
            b"-1\r\n",
        ] {
            let e = dechunk(wire, 3).unwrap_err();
            assert_eq!(
                e.kind(),
                io::ErrorKind::InvalidData,
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let mut long = b"5;".to_vec();
        long.resize(MAX_CHUNK_LINE + 10, b'a');
        assert!(dechunk(&long, 1000).is_err());
        let mut trailers = b"0\r\n".to_vec();
        for _ in 0..2000 {
            trailers.extend_from_slice(b"x-t: 0123456789\r\n");
        }
        assert!(dechunk(&trailers, 4096).is_err());
    }
}
