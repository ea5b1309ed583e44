//! One client connection, served by our own HTTP/1.1 loop (issue 18, step 11): a request head
//! read and parsed ([`crate::http1::server`]), the request handed to the [`Front`] with its
//! body, the response written, and again for the next request on the connection — all in the
//! connection's one task, polling the socket directly.
//!
//! Why not hyper's server (what served connections until step 11): its dispatcher is a
//! general state machine (a body channel between it and the service, an encoder queue, the
//! service polled through `poll_ready`), which cost about 11 000 instructions per proxied
//! request on the benchmark; this loop does the same work in a straight line (the figures are
//! in `docs/performance.md`). What it serves: HTTP/1.1 and HTTP/1.0, keep-alive and pipelined
//! requests (answered in order), `content-length` and chunked request bodies,
//! `expect: 100-continue`, responses with a length, chunked (HTTP/1.1) or until close
//! (HTTP/1.0). No upgrades and no HTTP/2 (nothing here uses them).
//!
//! The rules hyper kept, kept here:
//! - a client that closes its connection while its request is being served cancels the
//!   request (the handler's future is dropped), as soon as the close is seen;
//! - a malformed head is answered with a 4xx (JSON, like every error of ours) and the
//!   connection closed; so is a request body that is not read to its end (the client would
//!   otherwise have its next request read from the middle of that body);
//! - the connection closes after a response when the client asked so (`connection: close`,
//!   HTTP/1.0 without keep-alive), when the response's length is unknown to an HTTP/1.0 client,
//!   and after the response in flight once the server stops.

use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::http::{header, Method, Version};
use axum::response::IntoResponse;
use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::head::HeadTimer;
use super::stop::Watch;
use super::{Front, ReadTimeout};
use crate::http1::server::{
    self as h1s, BodyFraming, RequestHead, ResponseFraming, CONTINUE, LAST_CHUNK,
};
use crate::http1::{Chunked, Reply, Step, MAX_HEAD};
use crate::sock::outbox::Deferred;

/// How much is read from the socket at a time.
const READ_SIZE: usize = 8 * 1024;

/// Body pieces at least this large are written from their own buffer instead of being copied
/// behind the head or the chunk framing.
const COPY_LIMIT: usize = 16 * 1024;

/// What a request body not read to its end may still send before the connection is closed
/// anyway, and for how long (so that the client reads our answer instead of a reset).
const LINGER_BYTES: usize = 1024 * 1024;
const LINGER: Duration = Duration::from_secs(2);

/// The reading side of a connection with what was read and not yet used.
pub(super) struct Reader {
    half: OwnedReadHalf,
    buf: BytesMut,
}

impl Reader {
    /// Reads what the socket has into the buffer: `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_SIZE);
        }
        crate::sock::poll_recv(self.half.as_ref(), cx, &mut self.buf)
    }

    /// Ready when the client has closed the connection (or it failed). Reads what arrives
    /// meanwhile (a pipelined request) into the buffer, up to a head's size.
    ///
    /// Waits for the socket to be readable before it makes room to read into: the request in
    /// hand holds slices of the buffer (its head's fields, its body), so room made now would
    /// be a new allocation every few requests, and under load the allocator hands the old ones'
    /// pages back and faults them in again (about 0.02 page faults a request, each several µs
    /// of system time on a virtual machine). Made after the request, the room is the same
    /// allocation, reused once nothing holds slices of it any more.
    fn poll_closed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.buf.len() >= MAX_HEAD {
                // Enough waiting to be read; the close is noticed at the next write.
                return Poll::Pending;
            }
            if ready!(self.half.as_ref().poll_read_ready(cx)).is_err() {
                return Poll::Ready(());
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) | Err(_) => return Poll::Ready(()),
                Ok(_) => {}
            }
        }
    }
}

/// The writing side of a connection: the socket's half, and its place in the thread's outbox
/// (`sock::outbox`), where the last piece of a kept-alive response is written. `held` first:
/// dropped before the socket, as `Deferred` requires.
struct Writer {
    held: Deferred,
    half: OwnedWriteHalf,
}

/// Where a streaming request body gives the reader back: with `true` once it was read to its
/// end, with `false` when it was dropped before.
#[derive(Default)]
struct Home(Mutex<Option<(Box<Reader>, bool)>>);

impl Home {
    fn put(&self, reader: Box<Reader>, finished: bool) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((reader, finished));
    }

    /// The reader, however its body ended.
    fn take(&self) -> Option<Box<Reader>> {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        slot.take().map(|(r, _)| r)
    }

    /// The reader, when its body was read to its end.
    fn take_finished(&self) -> Option<Box<Reader>> {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match *slot {
            Some((_, true)) => slot.take().map(|(r, _)| r),
            _ => None,
        }
    }
}

/// A request's body as a [`Front`] gets it. Most requests' bodies arrive with their head and
/// are handed over whole; a longer one is read from the socket as the handler asks for it.
pub struct RequestBody(Kind);

enum Kind {
    Whole(Bytes),
    Stream(Box<Streaming>),
}

struct Streaming {
    /// `None` once given back.
    reader: Option<Box<Reader>>,
    left: Left,
    home: Arc<Home>,
}

enum Left {
    Length(u64),
    Chunked(Chunked),
    Done,
}

impl RequestBody {
    fn whole(bytes: Bytes) -> RequestBody {
        RequestBody(Kind::Whole(bytes))
    }

    /// The bytes of a body that arrived whole with its head; the body itself otherwise.
    pub fn into_whole(self) -> Result<Bytes, RequestBody> {
        match self.0 {
            Kind::Whole(bytes) => Ok(bytes),
            other => Err(RequestBody(other)),
        }
    }
}

impl Streaming {
    fn finish(&mut self) {
        self.left = Left::Done;
        if let Some(r) = self.reader.take() {
            self.home.put(r, true);
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        loop {
            let Some(reader) = self.reader.as_deref_mut() else {
                return Poll::Ready(None);
            };
            match &mut self.left {
                Left::Done => return Poll::Ready(None),
                Left::Length(n) if !reader.buf.is_empty() => {
                    let take = reader
                        .buf
                        .len()
                        .min(usize::try_from(*n).unwrap_or(usize::MAX));
                    let data = reader.buf.split_to(take).freeze();
                    *n -= take as u64;
                    if *n == 0 {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Left::Length(_) => {}
                Left::Chunked(decoder) => match decoder.step(&mut reader.buf) {
                    Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Step::End) => {
                        self.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Step::More) => {}
                    Err(e) => return Poll::Ready(Some(Err(e))),
                },
            }
            match ready!(reader.poll_fill(cx)) {
                Ok(0) => {
                    return Poll::Ready(Some(Err(h1s::body_error(
                        "the connection closed before its end",
                    ))))
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
        }
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        if let Some(r) = self.reader.take() {
            self.home.put(r, false);
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        match &mut self.0 {
            Kind::Whole(b) if b.is_empty() => Poll::Ready(None),
            Kind::Whole(b) => Poll::Ready(Some(Ok(Frame::data(std::mem::take(b))))),
            Kind::Stream(s) => s.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Whole(b) => b.is_empty(),
            Kind::Stream(s) => matches!(s.left, Left::Done),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Whole(b) => SizeHint::with_exact(b.len() as u64),
            Kind::Stream(s) => match s.left {
                Left::Length(n) => SizeHint::with_exact(n),
                Left::Done => SizeHint::with_exact(0),
                Left::Chunked(_) => SizeHint::default(),
            },
        }
    }
}

/// A connection's settings.
#[derive(Clone, Copy)]
pub(super) struct Settings {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
}

/// What the wait for a request head ended with.
enum Wait {
    Head(RequestHead),
    Bad(h1s::BadRequest),
    /// The client closed, the header timeout passed, or the server stops: close quietly.
    Close,
}

/// Serves requests on `tcp` until the client or the server ends the connection.
pub(super) async fn serve<F: Front>(
    tcp: TcpStream,
    peer: SocketAddr,
    front: F,
    settings: Settings,
    mut stop: Watch,
) {
    let (rd, half) = tcp.into_split();
    let mut reader = Some(Box::new(Reader {
        half: rd,
        buf: BytesMut::with_capacity(READ_SIZE),
    }));
    let mut wr = Writer {
        held: Deferred::new(half.as_ref()),
        half,
    };
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    let mut timer = HeadTimer::start(settings.header_timeout);
    loop {
        let Some(rd) = reader.as_deref_mut() else {
            let _ = wr.held.settle(wr.half.as_ref()).await;
            return;
        };
        // Bytes of the buffer already looked at without finding a whole head: a head ends
        // with a line feed, so it is parsed again only when one has arrived since (a head
        // trickled a byte at a time is parsed once per line, not once per byte), or when the
        // buffer has grown past the largest head (to refuse it).
        let mut seen = 0;
        let wait = poll_fn(|cx| loop {
            // The last response's bytes, when the flusher could not send them all.
            if wr.held.progress(wr.half.as_ref(), cx).is_err() {
                return Poll::Ready(Wait::Close);
            }
            let fresh = &rd.buf[seen.min(rd.buf.len())..];
            if memchr::memchr(b'\n', fresh).is_some() || rd.buf.len() > MAX_HEAD {
                match h1s::parse_request(&mut rd.buf) {
                    Ok(Some(h)) => return Poll::Ready(Wait::Head(h)),
                    Err(bad) => return Poll::Ready(Wait::Bad(bad)),
                    Ok(None) => {}
                }
            }
            seen = rd.buf.len();
            match rd.poll_fill(cx) {
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Wait::Close),
                Poll::Ready(Ok(_)) => continue,
                Poll::Pending => {}
            }
            if timer.poll_expired(cx).is_ready() {
                tracing::debug!(
                    "client connection closed: no request head within CLIENT_HEADER_TIMEOUT_SECS"
                );
                return Poll::Ready(Wait::Close);
            }
            // An idle connection closes at once when the server stops; one with part of a
            // head waits for the rest (within the header timeout) and is answered.
            if rd.buf.is_empty() && stop.poll_stopped(cx).is_ready() {
                return Poll::Ready(Wait::Close);
            }
            return Poll::Pending;
        })
        .await;
        let head = match wait {
            Wait::Head(h) => h,
            Wait::Close => {
                // The last response goes out before the connection closes.
                let _ = wr.held.settle(wr.half.as_ref()).await;
                return;
            }
            Wait::Bad(bad) => {
                tracing::debug!(status = %bad.status, reason = %bad.message, "malformed request head");
                let resp =
                    crate::error::ProxyError::new(bad.status, "invalid_request_error", bad.message)
                        .into_response()
                        .into();
                let _ = write_response(
                    &mut wr,
                    &mut out,
                    resp,
                    false,
                    Version::HTTP_11,
                    false,
                    &mut None,
                )
                .await;
                return linger(reader, wr).await;
            }
        };
        let RequestHead {
            method,
            uri,
            version,
            headers,
            body: framing,
            keep_alive,
            expect_continue,
        } = head;
        // The body: whole when it arrived with the head, else read as the handler asks.
        let mut home = None;
        let body = match framing {
            BodyFraming::Length(0) => RequestBody::whole(Bytes::new()),
            BodyFraming::Length(n) if (rd.buf.len() as u64) >= n => {
                RequestBody::whole(rd.buf.split_to(n as usize).freeze())
            }
            framing => {
                if expect_continue
                    && (wr.held.settle(wr.half.as_ref()).await.is_err()
                        || crate::sock::send_all(wr.half.as_ref(), CONTINUE)
                            .await
                            .is_err())
                {
                    return;
                }
                let h = Arc::new(Home::default());
                home = Some(h.clone());
                RequestBody(Kind::Stream(Box::new(Streaming {
                    reader: reader.take(),
                    left: match framing {
                        BodyFraming::Length(n) => Left::Length(n),
                        BodyFraming::Chunked => Left::Chunked(Chunked::new()),
                    },
                    home: h,
                })))
            }
        };
        let head_request = method == Method::HEAD;
        let req = super::FrontRequest {
            method,
            uri,
            version,
            headers,
            body: ReadTimeout::new(settings.body_timeout, body),
        };

        // The handler, cancelled if the client closes meanwhile.
        let mut fut = front.serve(req, peer);
        let resp = poll_fn(|cx| {
            if let Poll::Ready(resp) = Pin::new(&mut fut).poll(cx) {
                return Poll::Ready(Some(resp));
            }
            come_home(&mut reader, &home);
            if let Some(rd) = reader.as_deref_mut() {
                if rd.poll_closed(cx).is_ready() {
                    return Poll::Ready(None);
                }
            }
            Poll::Pending
        })
        .await;
        drop(fut);
        let Some(resp) = resp else {
            tracing::debug!("client closed its connection before the response");
            return;
        };
        come_home(&mut reader, &home);
        // Another request may follow when the client allows it, its body was read to the end,
        // and the server goes on.
        let keep_alive = keep_alive && reader.is_some() && !stop.stopped();
        let kept = write_response(
            &mut wr,
            &mut out,
            resp,
            head_request,
            version,
            keep_alive,
            &mut reader,
        )
        .await;
        match kept {
            Ok(true) => {}
            Ok(false) => {
                // The reader, also from a body dropped before its end, for the lingering close.
                let reader = reader.or_else(|| home.and_then(|h| h.take()));
                return linger(reader, wr).await;
            }
            Err(_) => return,
        }
        if out.capacity() > 64 * 1024 {
            out = Vec::with_capacity(4096);
        }
        // The wait for the next head starts now.
        timer.restart();
    }
}

/// Takes back the reader a streaming body gave back once read to its end. (One dropped
/// before its end stays out: the connection will close.)
fn come_home(reader: &mut Option<Box<Reader>>, home: &Option<Arc<Home>>) {
    if reader.is_some() {
        return;
    }
    if let Some(h) = home {
        *reader = h.take_finished();
    }
}

/// Closes a connection whose client may still be sending (a request body we did not read):
/// our side is shut first, then what the client sends is read and dropped for a while, so
/// that the client reads our answer before it sees the connection end.
async fn linger(reader: Option<Box<Reader>>, mut wr: Writer) {
    let _ = wr.half.shutdown().await;
    let Some(mut rd) = reader else {
        return;
    };
    let _ = tokio::time::timeout(LINGER, async {
        let mut seen = 0;
        while seen < LINGER_BYTES {
            rd.buf.clear();
            match poll_fn(|cx| rd.poll_fill(cx)).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen += n,
            }
        }
    })
    .await;
}

/// What waiting for the response body's next frame ended with.
enum Next {
    Frame(Frame<Bytes>),
    End,
    /// The body failed: what was sent stays incomplete and the connection closes.
    Failed,
    /// Nothing yet, and bytes are waiting to be written.
    Flush,
    /// The client closed its connection.
    Gone,
}

/// Writes `resp` (to a `HEAD` request or not, of `version`); `Ok(true)` when the connection
/// can carry another request. While the body has nothing to send, the reader (when home)
/// watches for the client's close, which ends the response.
async fn write_response(
    wr: &mut Writer,
    out: &mut Vec<u8>,
    resp: Reply,
    head_request: bool,
    version: Version,
    mut keep_alive: bool,
    reader: &mut Option<Box<Reader>>,
) -> io::Result<bool> {
    let Reply {
        status,
        headers,
        mut body,
    } = resp;
    let declared = if body.is_end_stream() {
        Some(0)
    } else {
        body.size_hint().exact().or_else(|| {
            headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
        })
    };
    let framing = h1s::response_framing(head_request, status, declared, version);
    // The previous response's bytes are out before any of this one's.
    wr.held.settle(wr.half.as_ref()).await?;
    out.clear();
    // The response's own `connection: close` is noted as its head is written.
    keep_alive = h1s::encode_response_head(
        out,
        status,
        &headers,
        framing,
        version,
        keep_alive && framing != ResponseFraming::UntilClose,
        &h1s::date_now(crate::timer::system_now()),
    );
    drop(headers);
    if framing == ResponseFraming::None {
        drop(body);
        crate::sock::send_all(wr.half.as_ref(), out).await?;
        return Ok(keep_alive);
    }
    let mut left = match framing {
        ResponseFraming::Length(n) => Some(n),
        _ => None,
    };
    loop {
        let next = poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Next::Frame(frame)),
            Poll::Ready(None) => Poll::Ready(Next::End),
            Poll::Ready(Some(Err(e))) => {
                tracing::debug!(error = %e, "a response body failed; closing the connection");
                Poll::Ready(Next::Failed)
            }
            Poll::Pending if !out.is_empty() => Poll::Ready(Next::Flush),
            Poll::Pending => match reader.as_deref_mut().map(|rd| rd.poll_closed(cx)) {
                Some(Poll::Ready(())) => Poll::Ready(Next::Gone),
                _ => Poll::Pending,
            },
        })
        .await;
        match next {
            Next::Frame(frame) => {
                let Ok(data) = frame.into_data() else {
                    continue; // trailers: not sent
                };
                if data.is_empty() {
                    continue;
                }
                let data = match &mut left {
                    Some(n) => {
                        let take = data.len().min(usize::try_from(*n).unwrap_or(usize::MAX));
                        *n -= take as u64;
                        if take < data.len() {
                            // More than the length said: the rest cannot be sent.
                            tracing::debug!("a response body is longer than its length");
                            keep_alive = false;
                            data.slice(..take)
                        } else {
                            // The whole piece, without a slice (a count taken and given back).
                            data
                        }
                    }
                    None => data,
                };
                let chunked = framing == ResponseFraming::Chunked;
                if data.len() >= COPY_LIMIT {
                    if chunked {
                        h1s::encode_chunk_size(out, data.len());
                    }
                    crate::sock::send_all(wr.half.as_ref(), out).await?;
                    out.clear();
                    crate::sock::send_all(wr.half.as_ref(), &data).await?;
                    if chunked {
                        out.extend_from_slice(b"\r\n");
                    }
                } else if chunked {
                    h1s::encode_chunk(out, &data);
                } else {
                    out.extend_from_slice(&data);
                }
                if left == Some(0) {
                    break;
                }
            }
            Next::End => {
                if framing == ResponseFraming::Chunked {
                    out.extend_from_slice(LAST_CHUNK);
                }
                if left.is_some_and(|n| n > 0) {
                    tracing::debug!("a response body ended before its length");
                    keep_alive = false;
                }
                break;
            }
            Next::Flush => {
                crate::sock::send_all(wr.half.as_ref(), out).await?;
                out.clear();
            }
            Next::Failed => {
                crate::sock::send_all(wr.half.as_ref(), out).await?;
                return Ok(false);
            }
            Next::Gone => return Err(io::ErrorKind::ConnectionAborted.into()),
        }
    }
    drop(body);
    // The last piece of a response after which the connection stays open goes out with the
    // other tasks' writes (`sock::outbox`); one that closes it, at once.
    if !(keep_alive && wr.held.send_later(out).await) {
        crate::sock::send_all(wr.half.as_ref(), out).await?;
    }
    out.clear();
    Ok(keep_alive)
}
