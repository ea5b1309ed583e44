//! The server side of HTTP/1.1 without I/O: a client's request head read with `httparse`
//! (RFC 9112 §2–§6), its body's framing, and a response head written. `crate::server` reads
//! and writes the client's connection and hands these functions its bytes.

use std::io;

use axum::http::header;
use axum::http::{Method, StatusCode, Uri, Version};
use bytes::{Bytes, BytesMut};

use super::{
    version_of, write_field, BadDelimiter, Delimiters, Fields, Spans, MAX_HEAD, MAX_HEADERS,
};

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// `content-length` bytes (0: no body).
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
}

/// A request head read from the front of a buffer.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    /// Every field as sent (hop-by-hop ones included, as hyper hands them to a service).
    pub headers: Fields,
    pub body: BodyFraming,
    /// The client lets the connection carry another request after this one.
    pub keep_alive: bool,
    /// `expect: 100-continue`: the client waits for an interim answer before its body.
    pub expect_continue: bool,
}

/// Why a request head was refused: answered with this status, then the connection closes.
#[derive(Debug, PartialEq, Eq)]
pub struct BadRequest {
    pub status: StatusCode,
    pub message: String,
}

fn bad(message: impl Into<String>) -> BadRequest {
    BadRequest {
        status: StatusCode::BAD_REQUEST,
        message: message.into(),
    }
}

/// A request target as a [`Uri`] (`target` within `head`). Clients call the same few paths
/// again and again, and checking a target's bytes costs about 300 instructions (callgrind): a
/// copy of the last target this thread read (up to [`CACHED_TARGET`] bytes, kept in its own
/// small buffer) shares its parts instead. A longer target shares the head's memory.
fn target_uri(head: &Bytes, target: std::ops::Range<usize>) -> Option<Uri> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(Bytes, Uri)>> = const { std::cell::RefCell::new(None) };
    }
    if target.len() > CACHED_TARGET {
        return Uri::from_maybe_shared(head.slice(target)).ok();
    }
    let text = &head[target.clone()];
    LAST.with(|last| {
        let Ok(mut last) = last.try_borrow_mut() else {
            return Uri::from_maybe_shared(head.slice(target)).ok();
        };
        if let Some((t, uri)) = last.as_ref() {
            if t[..] == *text {
                return Some(uri.clone());
            }
        }
        let bytes = Bytes::copy_from_slice(text);
        let uri = Uri::from_maybe_shared(bytes.clone()).ok()?;
        *last = Some((bytes, uri.clone()));
        Some(uri)
    })
}

/// The longest request target [`target_uri`] remembers.
const CACHED_TARGET: usize = 256;

/// Reads a request head from the front of `buf`, taking it off the buffer when whole;
/// `Ok(None)` while it is not whole yet. Empty lines before the request line are skipped
/// (RFC 9112 §2.2). The header values and the URI share the buffer's memory (no copy).
pub fn parse_request(buf: &mut BytesMut) -> Result<Option<RequestHead>, BadRequest> {
    let mut spans = Spans::new();
    let (len, method, path, version) = {
        let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(
            &mut req,
            buf,
            &mut fields,
        );
        let (len, whole) = match parsed {
            Ok(httparse::Status::Complete(len)) => (len, true),
            Ok(httparse::Status::Partial) => (buf.len(), false),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(BadRequest {
                    status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    message: format!(
                        "The request has more than {MAX_HEADERS} header fields; send fewer."
                    ),
                })
            }
            Err(httparse::Error::Version) => {
                return Err(BadRequest {
                    status: StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                    message: "Only HTTP/1.1 and HTTP/1.0 are served here; connect with HTTP/1.1."
                        .into(),
                })
            }
            Err(e) => {
                return Err(bad(format!(
                    "The request is not valid HTTP/1.1 ({e}); check what your client sends."
                )))
            }
        };
        if len > MAX_HEAD {
            return Err(BadRequest {
                status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                message: format!(
                    "The request's head is larger than {} KiB; send smaller headers.",
                    MAX_HEAD / 1024
                ),
            });
        }
        if !whole {
            return Ok(None);
        }
        spans.record(buf.as_ptr(), req.headers);
        let base = buf.as_ptr() as usize;
        let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
            .map_err(|_| bad("The request's method is not valid; send a standard method."))?;
        let path = req.path.unwrap_or("");
        let p0 = path.as_ptr() as usize - base;
        (len, method, (p0, p0 + path.len()), req.version.unwrap_or(1))
    };
    let head = buf.split_to(len).freeze();
    let uri = target_uri(&head, path.0..path.1)
        .ok_or_else(|| bad("The request's target is not a valid URI; check the path you call."))?;
    let version = version_of(version);
    let mut headers = Fields::with_capacity(spans.len());
    let mut delimiters = Delimiters::new(version);
    let mut expect_continue = false;
    for i in 0..spans.len() {
        let name = spans.name(&head, i).ok_or_else(|| {
            bad("A request header's name or value is not valid; check your headers.")
        })?;
        let value = spans.bytes(&head, i);
        delimiters.see(&name, value).map_err(|e| match e {
            BadDelimiter::LengthNotANumber => {
                bad("The request's content-length is not a number; send the body's size in bytes.")
            }
            BadDelimiter::TwoLengths => {
                bad("The request has two different content-lengths; send one.")
            }
        })?;
        if name == header::EXPECT {
            if value.eq_ignore_ascii_case(b"100-continue") {
                expect_continue = version == Version::HTTP_11;
            } else {
                return Err(BadRequest {
                    status: StatusCode::EXPECTATION_FAILED,
                    message:
                        "Only `expect: 100-continue` is understood; leave out the expect header."
                            .into(),
                });
            }
        }
        let (v0, v1) = spans.value_span(i);
        headers.append_span(name, v0, v1);
    }
    headers.set_head(head);
    let Delimiters {
        length,
        chunked,
        close,
        ..
    } = delimiters;
    let body = match chunked {
        // RFC 9112 §6.1: a request whose last coding is not chunked cannot be delimited; one
        // with both framings is how requests are smuggled past another server.
        Some(_) if length.is_some() => {
            return Err(bad(
                "The request has both transfer-encoding and content-length; send one.",
            ))
        }
        Some(_) if version != Version::HTTP_11 => {
            return Err(bad(
                "transfer-encoding is not allowed in an HTTP/1.0 request; send a content-length.",
            ))
        }
        Some(true) => BodyFraming::Chunked,
        Some(false) => {
            return Err(bad(
                "The request's transfer-encoding does not end with chunked; send chunked or a content-length.",
            ))
        }
        None => BodyFraming::Length(length.unwrap_or(0)),
    };
    Ok(Some(RequestHead {
        method,
        uri,
        version,
        headers,
        body,
        keep_alive: !close,
        expect_continue,
    }))
}

/// How a response's body is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    /// No body bytes follow the head (a `HEAD` request, 1xx, 204, 304).
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client and a body of unknown length).
    UntilClose,
}

/// Writes a response head into `out`: the status line (always `HTTP/1.1`, RFC 9110 §6.2),
/// the response's headers but the connection's own ones, `date` (unless it has one), the
/// framing, and `connection` when it is not the version's default. With
/// [`ResponseFraming::None`] a `content-length` the response has is kept (the size a `HEAD`
/// request asked about); otherwise `content-length` is written by the framing. Returns
/// whether the connection stays open: `keep_alive`, unless the response says
/// `connection: close` (noted while its headers are walked rather than looked up before:
/// a hashed lookup costs about 65 instructions, issue 18).
#[must_use]
pub fn encode_response_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &Fields,
    framing: ResponseFraming,
    version: Version,
    mut keep_alive: bool,
    date: &[u8],
) -> bool {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let keep_length = framing == ResponseFraming::None;
    // Noted while writing rather than looked up after (a hashed lookup cost about 120
    // instructions, callgrind).
    let mut has_date = false;
    for (name, value) in headers {
        // The name's text once: for a standard name it is a table lookup (`as_str`), which
        // the comparisons and the write below would otherwise each repeat.
        let text = name.as_str();
        // The response headers the head writer decides itself: never copied.
        if name == header::CONNECTION {
            keep_alive &= !value.as_bytes().eq_ignore_ascii_case(b"close");
            continue;
        }
        if name == header::TRANSFER_ENCODING
            || text == "keep-alive"
            || (!keep_length && name == header::CONTENT_LENGTH)
        {
            continue;
        }
        write_field(out, text.as_bytes(), value.as_bytes());
        has_date |= name == header::DATE;
    }
    if !has_date {
        write_field(out, b"date", date);
    }
    match framing {
        ResponseFraming::Length(n) => write_field(
            out,
            b"content-length",
            itoa::Buffer::new().format(n).as_bytes(),
        ),
        ResponseFraming::Chunked => write_field(out, b"transfer-encoding", b"chunked"),
        ResponseFraming::None | ResponseFraming::UntilClose => {}
    }
    if !keep_alive && version == Version::HTTP_11 {
        write_field(out, b"connection", b"close");
    } else if keep_alive && version == Version::HTTP_10 {
        write_field(out, b"connection", b"keep-alive");
    }
    out.extend_from_slice(b"\r\n");
    keep_alive
}

/// Writes the size line of a chunk of `len` bytes (not 0) into `out`; the data and a CRLF
/// follow it.
pub fn encode_chunk_size(out: &mut Vec<u8>, len: usize) {
    let mut hex = [0u8; 16];
    let mut n = len;
    let mut i = hex.len();
    loop {
        i -= 1;
        hex[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&hex[i..]);
    out.extend_from_slice(b"\r\n");
}

/// Writes one chunk of a chunked body (a non-empty `data`) into `out`.
pub fn encode_chunk(out: &mut Vec<u8>, data: &[u8]) {
    encode_chunk_size(out, data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The end of a chunked body (no trailers).
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// The interim answer to `expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The response framing for a status, whether the request was a `HEAD`, and what is known of
/// the body's size.
pub fn response_framing(
    head_request: bool,
    status: StatusCode,
    exact_len: Option<u64>,
    version: Version,
) -> ResponseFraming {
    if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        ResponseFraming::None
    } else if let Some(n) = exact_len {
        ResponseFraming::Length(n)
    } else if version == Version::HTTP_11 {
        ResponseFraming::Chunked
    } else {
        ResponseFraming::UntilClose
    }
}

/// The `date` header's value for `now`, formatted once per second per thread.
pub fn date_now(now: std::time::SystemTime) -> [u8; 29] {
    use std::cell::Cell;
    use std::time::UNIX_EPOCH;
    thread_local! {
        static CACHED: Cell<(u64, [u8; 29])> = const { Cell::new((u64::MAX, [0; 29])) };
    }
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|c| {
        let (at, text) = c.get();
        if at == secs {
            return text;
        }
        let mut text = [0u8; 29];
        let formatted = httpdate::fmt_http_date(now);
        let n = formatted.len().min(29);
        text[..n].copy_from_slice(&formatted.as_bytes()[..n]);
        c.set((secs, text));
        text
    })
}

/// An I/O error for a client whose request body is broken.
pub fn body_error(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the client's request body is broken: {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue};

    fn parse(s: &str) -> Result<Option<RequestHead>, BadRequest> {
        parse_request(&mut BytesMut::from(s))
    }

    fn head(s: &str) -> RequestHead {
        parse(s).expect("valid").expect("whole")
    }

    #[test]
    fn a_request_head_is_read_and_taken_off_the_buffer() {
        let mut buf = BytesMut::from(
            "\r\nPOST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nX-Two: 1\r\nx-two: 2\r\n\r\nhello",
        );
        let h = parse_request(&mut buf).expect("valid").expect("whole");
        assert_eq!(h.method, Method::POST);
        assert_eq!(h.uri.path(), "/v1/chat/completions");
        assert_eq!(h.uri.query(), Some("x=1"));
        assert_eq!(h.version, Version::HTTP_11);
        assert_eq!(h.body, BodyFraming::Length(5));
        assert!(h.keep_alive && !h.expect_continue);
        assert_eq!(h.headers.get_all("x-two").count(), 2);
        assert_eq!(h.headers.get("host").unwrap(), "a");
        assert_eq!(&buf[..], b"hello");
        // Byte by byte: partial until the last one.
        let whole = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut buf = BytesMut::new();
        for (i, b) in whole.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            let got = parse_request(&mut buf).expect("valid");
            assert_eq!(got.is_some(), i == whole.len() - 1);
        }
        assert!(buf.is_empty());
    }

    /// The remembered last target changes nothing a request sees: the same path twice, then
    /// others (a query, one too long to remember, a form `Uri` refuses) read as if new.
    #[test]
    fn each_target_is_read_as_sent_whatever_came_before() {
        let long = format!("/v1/{}?q=1", "a".repeat(CACHED_TARGET));
        for target in [
            "/v1/chat/completions",
            "/v1/chat/completions",
            "/v1/chat/completions?x=1",
            "/v1/messages",
            long.as_str(),
            "/v1/chat/completions",
            "*",
        ] {
            let h = head(&format!("GET {target} HTTP/1.1\r\n\r\n"));
            assert_eq!(h.uri, target.parse::<Uri>().expect("valid"), "{target}");
        }
        assert_eq!(
            parse("GET http://[::1 HTTP/1.1\r\n\r\n")
                .expect_err("refused")
                .status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(head("GET / HTTP/1.1\r\n\r\n").uri, "/");
    }

    #[test]
    fn keep_alive_expect_and_framing_follow_the_rfc() {
        assert!(!head("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n").keep_alive);
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
        let h = head(
            "POST / HTTP/1.1\r\nExpect: 100-Continue\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        );
        assert!(h.expect_continue);
        assert_eq!(h.body, BodyFraming::Chunked);
        assert_eq!(
            head("POST / HTTP/1.1\r\nContent-Length: 7, 7\r\n\r\n").body,
            BodyFraming::Length(7)
        );
        assert_eq!(head("GET / HTTP/1.1\r\n\r\n").body, BodyFraming::Length(0));
    }

    #[test]
    fn hostile_heads_are_refused_with_a_status_that_says_why() {
        let status = |s: &str| parse(s).expect_err("refused").status;
        for s in [
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GET http://[bad/ HTTP/1.1\r\n\r\n",
            "GE\x01T / HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(status(s), StatusCode::BAD_REQUEST, "{s:?}");
        }
        assert_eq!(
            status("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            StatusCode::HTTP_VERSION_NOT_SUPPORTED
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nExpect: something\r\n\r\n"),
            StatusCode::EXPECTATION_FAILED
        );
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert_eq!(
            status(&format!("GET / HTTP/1.1\r\n{many}\r\n")),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        let big = "a".repeat(MAX_HEAD);
        assert_eq!(
            status(&format!("GET / HTTP/1.1\r\nx-big: {big}")),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "a partial head over the limit is refused without waiting for its end"
        );
    }

    #[test]
    fn response_heads_carry_the_framing_and_the_connection() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert("content-length", HeaderValue::from_static("999"));
        headers.insert("connection", HeaderValue::from_static("upgrade"));
        let date = b"Wed, 02 Dec 2026 10:00:00 GMT";
        let mut out = Vec::new();
        assert!(encode_response_head(
            &mut out,
            StatusCode::OK,
            &Fields::from_map(headers.clone()),
            ResponseFraming::Length(2),
            Version::HTTP_11,
            true,
            date,
        ));
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ndate: Wed, 02 Dec 2026 10:00:00 GMT\r\ncontent-length: 2\r\n\r\n"
        );
        out.clear();
        assert!(!encode_response_head(
            &mut out,
            StatusCode::OK,
            &Fields::from_map(headers.clone()),
            ResponseFraming::None,
            Version::HTTP_11,
            false,
            date,
        ));
        let s = String::from_utf8_lossy(&out);
        assert!(s.contains("content-length: 999\r\n"), "{s}");
        assert!(s.ends_with("connection: close\r\n\r\n"), "{s}");
        out.clear();
        assert!(encode_response_head(
            &mut out,
            StatusCode::OK,
            &Fields::new(),
            ResponseFraming::UntilClose,
            Version::HTTP_10,
            true,
            date,
        ));
        assert!(String::from_utf8_lossy(&out).ends_with("connection: keep-alive\r\n\r\n"));
        // A response that says `connection: close` ends the connection, and says so once.
        let mut closing = HeaderMap::new();
        closing.insert("connection", HeaderValue::from_static("Close"));
        closing.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        out.clear();
        assert!(!encode_response_head(
            &mut out,
            StatusCode::OK,
            &Fields::from_map(closing.clone()),
            ResponseFraming::Length(0),
            Version::HTTP_11,
            true,
            date,
        ));
        let s = String::from_utf8_lossy(&out);
        assert_eq!(s.matches("connection").count(), 1, "{s}");
        assert!(s.ends_with("connection: close\r\n\r\n"), "{s}");
        assert!(!s.contains("keep-alive"), "{s}");
        out.clear();
        encode_chunk(&mut out, &[b'x'; 26]);
        assert_eq!(&out[..4], b"1a\r\n");
        assert_eq!(
            response_framing(false, StatusCode::OK, None, Version::HTTP_11),
            ResponseFraming::Chunked
        );
        assert_eq!(
            response_framing(false, StatusCode::OK, None, Version::HTTP_10),
            ResponseFraming::UntilClose
        );
        assert_eq!(
            response_framing(true, StatusCode::OK, Some(3), Version::HTTP_11),
            ResponseFraming::None
        );
        assert_eq!(
            response_framing(false, StatusCode::NO_CONTENT, Some(0), Version::HTTP_11),
            ResponseFraming::None
        );
        let now = std::time::SystemTime::now();
        assert_eq!(date_now(now).len(), 29);
        assert!(date_now(now).ends_with(b" GMT"));
    }
}
