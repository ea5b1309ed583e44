//! The upstream connection pool: per worker thread (a `thread_local!`, no lock, no background
//! task), idle HTTP/1.1 connections to the upstreams keyed by scheme, host and port, over the
//! rustls connector; the rules for reusing, expiring and retrying them. Knows nothing of
//! providers, keys or users: it sends one ready request and hands back the response, whose
//! body returns the connection when it ends.
//!
//! A request is written and its answer read by the request's own task ([`crate::http1`] holds the
//! wire format): no task per connection, no channel between the request and its connection.
//! The response body reads straight from the socket when the client's connection asks for
//! the next bytes. (Issue 18: hyper's client, with a driver task per connection, cost about
//! 8 000 instructions per request more; before it, hyper-util's legacy client, with a pool
//! shared by all threads behind a mutex, more still.) The server runs one current-thread
//! runtime per worker (`WORKERS`), so a pool per thread needs no synchronisation.
//!
//! The rules are the legacy client's: idle connections expire after [`IDLE_TIMEOUT`] (checked
//! when a connection is taken or given back, not by a timer); at most [`MAX_IDLE_PER_HOST`]
//! idle per host and thread; a connection goes back only when its response body was read to the
//! end, its framing allows another request, and nothing more was sent on it. An idle connection
//! is looked at before it is used (without waiting, and without a system call unless the socket
//! has news): one the upstream closed, or that has bytes nobody asked for, is dropped. A
//! request that a reused connection could not write (closed by the upstream under our feet) is
//! sent once more on a new connection; one that was written is never sent twice. Unlike the
//! legacy client there is no reaper timer: an expired connection is closed when its thread next
//! takes or gives back a connection to that host; until then (a worker with no more traffic to
//! that host) it stays open until the upstream closes it, which providers do after a minute or
//! so.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::error::Error as StdError;
use std::fmt;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::sock::outbox::Deferred;

use axum::http::uri::{Authority, Parts, PathAndQuery, Scheme};
use axum::http::{HeaderValue, Method, StatusCode, Uri};
use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tower::Service;

use crate::config::{Config, ConfigError};
use crate::http1::{self as h1, Fields, Framing, Parsed, Step};

/// How long an idle connection may wait for its next request before it is closed: the legacy
/// client's default, which we had until now. Upstreams close idle connections on their side
/// after a minute or so; this keeps us from handing out ones that likely are.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The most idle connections kept per upstream host on one worker thread. A worker needs as
/// many as it has requests in flight to that host at once (HTTP/1.1: one request per
/// connection), so this is the burst a worker can absorb without new TLS handshakes. Each idle
/// connection holds a socket, its buffers and a TLS session (some tens of KB) and a slot
/// on the upstream's side; beyond 64 per worker a burst costs handshakes rather than memory.
pub const MAX_IDLE_PER_HOST: usize = 64;

/// The first read of a connection's answers; reads that fill it grow it (to [`MAX_READ`]), so
/// a large body comes in large pieces.
const READ_SIZE: usize = 8 * 1024;
const MAX_READ: usize = 64 * 1024;

/// A request body up to this size is written together with its head (one write); a larger one
/// is written after it, from its own memory.
const COALESCE: usize = 16 * 1024;

/// An upstream request as the pool sends it: the method, an absolute `http://` or `https://`
/// URI, the fields (the head writer adds `host` and `content-length`, and leaves out the
/// connection's own ones), and the whole body, already read.
pub struct Outgoing {
    pub method: Method,
    pub uri: Uri,
    pub headers: Fields,
    pub body: Bytes,
}

/// An upstream's answer as the pool reads it: status, the fields of its head (without the
/// connection's own ones, which the pool has read), and its body, read as it is polled.
/// Generic over the body for the forwarder, which keeps an error answer's body read.
pub struct Answer<B = PooledBody> {
    pub status: StatusCode,
    pub headers: Fields,
    pub body: B,
}

impl<B> fmt::Debug for Answer<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Answer")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

impl<B> Answer<B> {
    /// The same answer with its body made into another.
    pub fn map_body<C>(self, f: impl FnOnce(B) -> C) -> Answer<C> {
        Answer {
            status: self.status,
            headers: self.headers,
            body: f(self.body),
        }
    }
}

#[cfg(test)]
impl Outgoing {
    /// A request without fields.
    pub fn new(method: Method, uri: Uri, body: Bytes) -> Outgoing {
        Outgoing {
            method,
            uri,
            headers: Fields::new(),
            body,
        }
    }
}

/// The connector of new connections: TCP (with `TCP_NODELAY` and the connect timeout) and,
/// for `https`, rustls with the platform's certificate verifier, ALPN `http/1.1`.
pub type Connector = HttpsConnector<HttpConnector>;

/// A connection's byte stream (TLS or plain TCP), as tokio's `AsyncRead`/`AsyncWrite`.
type Io = TokioIo<MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>>;

/// The socket of a connection without TLS, which `sock` reads and writes directly.
fn plain(io: &Io) -> Option<&tokio::net::TcpStream> {
    match io.inner() {
        MaybeHttpsStream::Http(tcp) => Some(tcp.inner()),
        MaybeHttpsStream::Https(_) => None,
    }
}

/// Writes all of `data`: by `sock` on a plain connection, through TLS otherwise.
async fn write_all(io: &mut Io, data: &[u8]) -> io::Result<()> {
    match plain(io) {
        Some(tcp) => crate::sock::send_all(tcp, data).await,
        None => io.write_all(data).await,
    }
}

/// Where a connection goes: the pool's key.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    https: bool,
    host: Box<str>,
    port: u16,
}

impl Target {
    fn is(&self, https: bool, host: &str, port: u16) -> bool {
        self.https == https && self.port == port && *self.host == *host
    }
}

/// One upstream connection and its buffers (boxed, so that taking it from the pool and handing
/// it to a body moves a pointer).
struct Conn {
    /// A plain connection's place in the thread's outbox (`sock::outbox`), where its requests
    /// are written. Before `io`: dropped first, as `Deferred` requires.
    held: Option<Deferred>,
    io: Io,
    /// Bytes read and not yet taken (the answer's head or body). The answers' pieces are split
    /// off it and share its memory.
    read: BytesMut,
    /// The size of the next read.
    read_size: usize,
    /// The next request's head (kept, so that its memory is reused).
    write: Vec<u8>,
}

impl Conn {
    fn new(io: Io) -> Box<Conn> {
        Box::new(Conn {
            held: plain(&io).map(Deferred::new),
            io,
            read: BytesMut::new(),
            read_size: READ_SIZE,
            write: Vec::new(),
        })
    }

    /// Reads what the connection has into `read`: how many bytes (0: the upstream closed it).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let spare = self.read.capacity() - self.read.len();
        if spare < self.read_size / 4 {
            self.read.reserve(self.read_size);
        }
        let spare = self.read.capacity() - self.read.len();
        let polled = match plain(&self.io) {
            Some(tcp) => {
                // The request, when the flusher could not send it all, or failed to.
                if let Some(held) = &self.held {
                    if let Err(e) = held.progress(tcp, cx) {
                        return Poll::Ready(Err(not_written(e)));
                    }
                }
                crate::sock::poll_recv(tcp, cx, &mut self.read)
            }
            None => tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read),
        };
        if let Poll::Ready(Ok(n)) = polled {
            if n == spare && self.read_size < MAX_READ {
                self.read_size *= 2;
            }
        }
        polled
    }

    /// Whether an idle connection can carry a request: not closed by the upstream and with
    /// nothing to read (an answer nobody asked for makes it unusable). Looks without waiting:
    /// tokio knows from the last read whether the socket has news, so this makes a system call
    /// only when it has.
    fn usable(&mut self) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        matches!(self.poll_fill(&mut cx), Poll::Pending)
    }

    /// Writes the request whose head is in `write`, and its body.
    async fn write_request(&mut self, body: &Bytes) -> io::Result<()> {
        if let (Some(held), Some(tcp)) = (&self.held, plain(&self.io)) {
            // Whatever an earlier request left held goes first (none does normally: its answer came).
            held.settle(tcp).await?;
        }
        if body.len() <= COALESCE {
            self.write.extend_from_slice(body);
            // A plain connection's request goes out with the other tasks' writes; the answer's
            // read finishes or reports it ([`Conn::poll_fill`]).
            if let Some(held) = &self.held {
                if held.send_later(&mut self.write).await {
                    return Ok(());
                }
            }
            write_all(&mut self.io, &self.write).await?;
        } else {
            write_all(&mut self.io, &self.write).await?;
            write_all(&mut self.io, body).await?;
        }
        self.io.flush().await
    }

    /// Reads the answer's head (after any interim 1xx answers).
    async fn read_head(&mut self, method: &Method) -> io::Result<h1::Head> {
        loop {
            if !self.read.is_empty() {
                match h1::parse_head_without(&mut self.read, method, &LEFT_OUT)? {
                    Parsed::Done(head) => return Ok(head),
                    Parsed::Interim => continue,
                    Parsed::Partial => {}
                }
            }
            if poll_fn(|cx| self.poll_fill(cx)).await? == 0 {
                let what = if self.read.is_empty() {
                    "the upstream closed the connection before it answered"
                } else {
                    "the upstream closed the connection in the middle of its answer's head"
                };
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, what));
            }
        }
    }
}

/// An upstream answer's headers that are not kept, as nginx's proxy does not pass them: the
/// client gets our own `date` (the server writes one for a response without) and not the
/// upstream's `server`, which names the upstream's software or its CDN. Nothing reads either,
/// and each kept field cost about 250 instructions a request (read, kept, written again).
static LEFT_OUT: [axum::http::HeaderName; 2] =
    [axum::http::header::SERVER, axum::http::header::DATE];

/// One idle connection.
struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

/// The idle connections of one host on this thread.
struct HostIdle {
    target: Arc<Target>,
    /// The URL authority (`host:port`) this entry was made for, as written: a request to the
    /// same text finds its entry without parsing host and port out of it again (which cost
    /// about 700 instructions per request, callgrind). Empty for an entry made by `checkin`.
    authority: Box<str>,
    /// The `Host` header for this target, built once per thread and host.
    host_header: HeaderValue,
    /// Oldest at the front; connections are taken from the back (the most recently used is
    /// the least likely to have been closed by the upstream).
    idle: VecDeque<Idle>,
}

thread_local! {
    /// This thread's idle connections, one entry per upstream host. A list rather than a map:
    /// a gateway talks to a handful of hosts, and comparing a few short strings costs less
    /// than hashing one. Entries are never removed, so it is bounded by the configured hosts.
    static IDLE: RefCell<Vec<HostIdle>> = const { RefCell::new(Vec::new()) };
}

/// Takes an idle connection to the target if this thread has a usable one (open, with nothing
/// unasked to read, not idle too long); also returns the target's key and `Host` header.
fn checkout(
    https: bool,
    authority: &Authority,
) -> Option<(Arc<Target>, HeaderValue, Option<Box<Conn>>)> {
    IDLE.with_borrow_mut(|hosts| {
        let text = authority.as_str();
        let known = hosts
            .iter()
            .position(|h| h.target.https == https && *h.authority == *text);
        let i = match known {
            Some(i) => i,
            None => {
                let (host, port) = (authority.host(), authority.port_u16());
                let port = port.unwrap_or(default_port(https));
                match hosts.iter().position(|h| h.target.is(https, host, port)) {
                    // The same target written another way (`Example.com`, a default port).
                    Some(i) => i,
                    None => {
                        hosts.push(HostIdle {
                            target: Arc::new(Target {
                                https,
                                host: host.into(),
                                port,
                            }),
                            authority: text.into(),
                            host_header: host_header(https, host, port)?,
                            idle: VecDeque::new(),
                        });
                        hosts.len() - 1
                    }
                }
            }
        };
        let h = &mut hosts[i];
        let mut found = None;
        if !h.idle.is_empty() {
            let now = crate::timer::now();
            while let Some(mut c) = h.idle.pop_back() {
                if now.saturating_duration_since(c.since) > IDLE_TIMEOUT {
                    // The newest is too old: all the others are older still.
                    h.idle.clear();
                    break;
                }
                // Closed: the upstream hung up, or the runtime its socket belongs to is gone.
                if c.conn.usable() {
                    found = Some(c.conn);
                    break;
                }
            }
        }
        Some((h.target.clone(), h.host_header.clone(), found))
    })
}

/// Gives a connection whose answer has ended back to this thread's pool.
fn checkin(target: &Arc<Target>, conn: Box<Conn>) {
    // `try_with`: a body dropped while the thread's locals are being destroyed just closes
    // its connection.
    let _ = IDLE.try_with(|cell| {
        let Ok(mut hosts) = cell.try_borrow_mut() else {
            return;
        };
        let i = match hosts
            .iter()
            .position(|h| Arc::ptr_eq(&h.target, target) || h.target == *target)
        {
            Some(i) => i,
            // The body ended on another thread than the one that sent the request (possible
            // on a multi-thread runtime): the connection joins this thread's pool.
            None => {
                let Some(host_header) = host_header(target.https, &target.host, target.port) else {
                    return;
                };
                hosts.push(HostIdle {
                    target: target.clone(),
                    authority: Box::default(),
                    host_header,
                    idle: VecDeque::new(),
                });
                hosts.len() - 1
            }
        };
        let h = &mut hosts[i];
        let now = crate::timer::now();
        while h
            .idle
            .front()
            .is_some_and(|c| now.saturating_duration_since(c.since) > IDLE_TIMEOUT)
        {
            h.idle.pop_front();
        }
        if h.idle.len() >= MAX_IDLE_PER_HOST {
            h.idle.pop_front();
        }
        h.idle.push_back(Idle { conn, since: now });
    });
}

fn default_port(https: bool) -> u16 {
    if https {
        443
    } else {
        80
    }
}

/// The `Host` header: `host`, or `host:port` when the port is not the scheme's default (as
/// the legacy client sent it). `None` only for a host that is no valid header value, which a
/// parsed URI cannot hold.
fn host_header(https: bool, host: &str, port: u16) -> Option<HeaderValue> {
    if port == default_port(https) {
        HeaderValue::from_str(host).ok()
    } else {
        HeaderValue::from_str(&format!("{host}:{port}")).ok()
    }
}

/// The upstream client: the connector for new connections; the idle ones live in the
/// per-thread pool. Cheap to share: built once at startup, in `Upstreams`.
pub struct Pool {
    connector: Connector,
}

impl Pool {
    /// The client as `UPSTREAM_CONNECT_TIMEOUT_SECS` and the platform's certificates make it.
    /// Fails when the system's TLS certificates cannot be loaded.
    pub fn from_config(config: &Config) -> Result<Pool, ConfigError> {
        Pool::with_connect_timeout(config.upstream_connect_timeout())
    }

    /// The client with the platform's certificates and this connect timeout.
    pub fn with_connect_timeout(connect_timeout: Duration) -> Result<Pool, ConfigError> {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        // Without this the connector refuses `https://` URLs before TLS gets a chance.
        http.enforce_http(false);
        let https = HttpsConnectorBuilder::new()
            .try_with_platform_verifier()
            .map_err(|e| {
                ConfigError(format!(
                    "cannot load the system's TLS certificates for upstream connections ({e}); install the ca-certificates package"
                ))
            })?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Pool::with_connector(https))
    }

    /// A client over the given connector (tests: a TLS configuration trusting a test CA).
    pub fn with_connector(connector: Connector) -> Pool {
        Pool { connector }
    }

    /// Sends a request with an absolute `http://` or `https://` URI on an idle connection of
    /// this thread, or a new one, and reads the answer's head. A reused connection that could
    /// not take the request (it closed while idle) gets it once more on a new connection.
    /// Dropping the future drops the request (and its connection).
    pub async fn send(&self, req: Outgoing) -> Result<Answer, UpstreamError> {
        let Outgoing {
            method,
            uri,
            headers,
            body,
        } = req;
        let Parts {
            scheme,
            authority,
            path_and_query,
            ..
        } = uri.into_parts();
        let (Some(scheme), Some(authority)) = (scheme, authority) else {
            return Err(UpstreamError::BadUri(
                "the upstream URL has no scheme or host",
            ));
        };
        let https = if scheme == Scheme::HTTPS {
            true
        } else if scheme == Scheme::HTTP {
            false
        } else {
            return Err(UpstreamError::BadUri(
                "the upstream URL's scheme is neither http nor https",
            ));
        };
        let (target, host, idle) = checkout(https, &authority).ok_or(UpstreamError::BadUri(
            "the upstream URL's host is not valid",
        ))?;
        // HTTP/1.1 to an origin server: the request line carries the path only.
        let path = path_and_query.as_ref().map_or("/", PathAndQuery::as_str);
        let head = |conn: &mut Conn| {
            conn.write.clear();
            h1::encode_head(&mut conn.write, &method, path, &host, &headers, body.len());
        };
        let mut written = None;
        if let Some(mut conn) = idle {
            head(&mut conn);
            match conn.write_request(&body).await {
                Ok(()) => written = Some(conn),
                // Nothing of the request can have been processed (a request that was not
                // written whole is never answered): as the legacy client's
                // `retry_canceled_requests`, once more on a new connection.
                Err(e) => {
                    tracing::debug!(error = %e, "reused upstream connection closed before the request; retrying on a new one");
                }
            }
        }
        // A new connection with the request written on it.
        let fresh = |scheme, authority| async {
            // Boxed: the connect and TLS handshake futures are large and rarely run; inline,
            // they would make every request's future (moved and copied per request) that much
            // larger.
            let mut conn = Box::pin(self.connect(scheme, authority)).await?;
            head(&mut conn);
            conn.write_request(&body)
                .await
                .map_err(UpstreamError::Send)?;
            Ok::<_, UpstreamError>(conn)
        };
        let reused = written.is_some();
        let conn = match written {
            Some(conn) => conn,
            None => fresh(scheme.clone(), authority.clone()).await?,
        };
        match answer(conn, &method, target).await {
            Ok(answer) => Ok(answer),
            // A held request that a reused connection could not write: as above.
            Err((e, target)) if reused && is_not_written(&e) => {
                tracing::debug!(error = %e, "reused upstream connection closed before the request; retrying on a new one");
                let conn = fresh(scheme, authority).await?;
                answer(conn, &method, target).await.map_err(|(e, _)| e)
            }
            Err((e, _)) => Err(e),
        }
    }

    /// A new connection (TCP, and TLS for `https`).
    async fn connect(
        &self,
        scheme: Scheme,
        authority: Authority,
    ) -> Result<Box<Conn>, UpstreamError> {
        let mut parts = Parts::default();
        parts.scheme = Some(scheme);
        parts.authority = Some(authority);
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
        let uri = Uri::from_parts(parts).map_err(|_| UpstreamError::BadUri("bad upstream URL"))?;
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(UpstreamError::Connect)?;
        let io = connector.call(uri).await.map_err(UpstreamError::Connect)?;
        Ok(Conn::new(TokioIo::new(io)))
    }
}

/// A request held for the outbox that could not be written (`sock::outbox`): as a write that
/// failed at once, the request was not sent.
#[derive(Debug)]
struct NotWritten(io::Error);

impl fmt::Display for NotWritten {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the request could not be written: {}", self.0)
    }
}

impl StdError for NotWritten {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.0)
    }
}

fn not_written(e: io::Error) -> io::Error {
    io::Error::new(e.kind(), NotWritten(e))
}

/// True when `e` says the request was not written ([`NotWritten`]).
fn is_not_written(e: &UpstreamError) -> bool {
    matches!(e, UpstreamError::Send(io) if io.get_ref().is_some_and(|inner| inner.is::<NotWritten>()))
}

/// Reads the answer's head on a connection that carries the request; its body reads on. The
/// target comes back with an error, for a retry.
async fn answer(
    mut conn: Box<Conn>,
    method: &Method,
    target: Arc<Target>,
) -> Result<Answer, (UpstreamError, Arc<Target>)> {
    let head = match conn.read_head(method).await {
        Ok(head) => head,
        Err(e) => return Err((UpstreamError::Send(e), target)),
    };
    let body = PooledBody::new(conn, target, head.framing, head.keep_alive);
    Ok(Answer {
        status: head.status,
        headers: head.headers,
        body,
    })
}

type BoxError = Box<dyn StdError + Send + Sync>;

/// Why an upstream call produced no response.
#[derive(Debug)]
pub enum UpstreamError {
    /// No connection: refused, unreachable, DNS, TLS, or the connect timeout.
    Connect(BoxError),
    /// The connection failed after it was made (reset, closed before the answer, an answer
    /// that is not HTTP/1.1).
    Send(io::Error),
    /// The URL cannot be sent (not `http`/`https`, no host).
    BadUri(&'static str),
}

impl UpstreamError {
    /// True when no connection could be made.
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_))
    }

    /// True when connecting took longer than `UPSTREAM_CONNECT_TIMEOUT_SECS` (the connector's
    /// timeout is an I/O `TimedOut` error in the cause chain).
    pub fn is_connect_timeout(&self) -> bool {
        let UpstreamError::Connect(e) = self else {
            return false;
        };
        let mut cur: Option<&(dyn StdError + 'static)> = Some(e.as_ref());
        while let Some(err) = cur {
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::TimedOut {
                    return true;
                }
            }
            cur = err.source();
        }
        false
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::Connect(e) => write!(f, "cannot connect to the upstream: {e}"),
            UpstreamError::Send(e) => write!(f, "upstream connection failed: {e}"),
            UpstreamError::BadUri(m) => f.write_str(m),
        }
    }
}

impl StdError for UpstreamError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            UpstreamError::Connect(e) => Some(e.as_ref()),
            UpstreamError::Send(e) => Some(e),
            UpstreamError::BadUri(_) => None,
        }
    }
}

/// Where an answer's body stands.
enum Reading {
    /// This many bytes are left (`content-length`).
    Length(u64),
    Chunked(h1::Chunked),
    /// Until the upstream closes the connection.
    UntilClose,
    /// Ended (or failed): nothing more comes.
    Done,
}

/// An upstream response body, read from its connection as it is polled. When it has been
/// read to the end, its connection goes back to this thread's pool (if it may carry another
/// request); dropped before that (client gone, deadline, error), the connection is closed
/// with it, so the upstream stops generating.
pub struct PooledBody {
    /// The connection, until the body ends.
    conn: Option<Box<Conn>>,
    target: Arc<Target>,
    reading: Reading,
    keep_alive: bool,
}

/// What the buffered bytes gave.
enum Got {
    Data(Bytes),
    /// The body ended with these bytes (which may be empty).
    Last(Bytes),
    /// More must be read.
    More,
}

impl PooledBody {
    fn new(conn: Box<Conn>, target: Arc<Target>, framing: Framing, keep_alive: bool) -> PooledBody {
        let reading = match framing {
            Framing::Empty => Reading::Done,
            Framing::Length(n) => Reading::Length(n),
            Framing::Chunked => Reading::Chunked(h1::Chunked::new()),
            Framing::UntilClose => Reading::UntilClose,
        };
        let mut body = PooledBody {
            conn: Some(conn),
            target,
            reading,
            keep_alive,
        };
        if matches!(body.reading, Reading::Done) {
            body.give_back();
        }
        body
    }

    /// The body has ended: its connection goes back to the pool, when its answer allows
    /// another request and nothing was sent after the body.
    fn give_back(&mut self) {
        self.reading = Reading::Done;
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && conn.read.is_empty() {
                checkin(&self.target, conn);
            }
        }
    }

    /// A broken body: the error, and the connection closed.
    fn fail(&mut self, e: io::Error) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.reading = Reading::Done;
        self.conn = None;
        Poll::Ready(Some(Err(e)))
    }

    /// The body's next bytes from what is already read.
    fn take(&mut self) -> io::Result<Got> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Got::Last(Bytes::new()));
        };
        let buf = &mut conn.read;
        Ok(match &mut self.reading {
            Reading::Done => Got::Last(Bytes::new()),
            Reading::Length(left) => {
                if buf.is_empty() {
                    return Ok(Got::More);
                }
                let n = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= n as u64;
                let data = buf.split_to(n).freeze();
                if *left == 0 {
                    Got::Last(data)
                } else {
                    Got::Data(data)
                }
            }
            Reading::Chunked(d) => match d.step(buf)? {
                Step::Data(data) => Got::Data(data),
                Step::End => Got::Last(Bytes::new()),
                Step::More => Got::More,
            },
            Reading::UntilClose if buf.is_empty() => Got::More,
            Reading::UntilClose => Got::Data(buf.split().freeze()),
        })
    }
}

impl fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledBody")
            .field("done", &self.is_end_stream())
            .finish_non_exhaustive()
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            match this.take() {
                Ok(Got::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Got::Last(data)) => {
                    this.give_back();
                    return Poll::Ready((!data.is_empty()).then(|| Ok(Frame::data(data))));
                }
                Ok(Got::More) => {}
                Err(e) => return this.fail(e),
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match conn.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) if matches!(this.reading, Reading::UntilClose) => {
                    this.reading = Reading::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => {
                    return this.fail(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the upstream closed the connection before the answer's body was complete",
                    ))
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return this.fail(e),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.reading, Reading::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.reading {
            Reading::Done => SizeHint::with_exact(0),
            Reading::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// How the fake upstream answers.
    #[derive(Clone, Copy, PartialEq)]
    enum Mode {
        /// `content-length`, connection kept open.
        KeepAlive,
        /// A chunked body, connection kept open.
        Chunked,
        /// Closes each connection after its first answer, without `Connection: close`.
        CloseAfterOne,
        /// A 1 MB body, written as the client reads it.
        Big,
    }

    /// A fake upstream that counts the TCP connections it accepted and the ones it closed.
    struct Fake {
        port: u16,
        accepted: Arc<AtomicUsize>,
        closed: Arc<AtomicUsize>,
    }

    impl Fake {
        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }
        fn url(&self) -> String {
            format!("http://127.0.0.1:{}/v1/x?y=1", self.port)
        }
    }

    async fn fake(mode: Mode) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (a, c) = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                a.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    while let Some(head) = read_request(&mut sock).await {
                        assert!(head.starts_with("GET /v1/x?y=1 HTTP/1.1\r\n"), "{head}");
                        let host = format!("host: 127.0.0.1:{port}\r\n");
                        assert!(head.to_ascii_lowercase().contains(&host), "{head}");
                        let answer: Vec<u8> = match mode {
                            Mode::KeepAlive | Mode::CloseAfterOne => {
                                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()
                            }
                            Mode::Chunked => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n".to_vec(),
                            Mode::Big => {
                                let mut a = b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n".to_vec();
                                a.resize(a.len() + 1_000_000, b'x');
                                a
                            }
                        };
                        if sock.write_all(&answer).await.is_err() {
                            break;
                        }
                        if mode == Mode::CloseAfterOne {
                            break;
                        }
                    }
                    drop(sock);
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Fake {
            port,
            accepted,
            closed,
        }
    }

    /// Reads one request head (the tests send no bodies); `None` at EOF.
    async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<String> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match sock.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return None,
            }
        }
        Some(String::from_utf8(head).unwrap())
    }

    fn pool() -> Pool {
        let config = crate::config::Config::from_args(
            ["llm-gatekeeper"],
            std::iter::empty::<(String, String)>(),
        )
        .unwrap();
        Pool::from_config(&config).unwrap()
    }

    fn get(url: &str) -> Outgoing {
        Outgoing::new(Method::GET, url.parse().unwrap(), Bytes::new())
    }

    async fn fetch(pool: &Pool, url: &str) -> Bytes {
        let resp = pool.send(get(url)).await.unwrap();
        assert_eq!(resp.status, 200);
        resp.body.collect().await.unwrap().to_bytes()
    }

    /// The idle connections to `port` on this thread that are still usable.
    fn idle_open(port: u16) -> usize {
        IDLE.with_borrow_mut(|hosts| {
            hosts
                .iter_mut()
                .filter(|h| h.target.port == port)
                .map(|h| {
                    h.idle
                        .iter_mut()
                        .map(|c| usize::from(c.conn.usable()))
                        .sum::<usize>()
                })
                .sum()
        })
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection() {
        for mode in [Mode::KeepAlive, Mode::Chunked] {
            let fake = fake(mode).await;
            let pool = pool();
            for _ in 0..20 {
                assert_eq!(fetch(&pool, &fake.url()).await, "ok");
            }
            assert_eq!(fake.accepted(), 1, "one TCP connection for 20 requests");
            assert_eq!(idle_open(fake.port), 1);
        }
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_handed_out() {
        let fake = fake(Mode::CloseAfterOne).await;
        let pool = pool();
        assert_eq!(fetch(&pool, &fake.url()).await, "ok");
        // Wait (bounded) until the upstream has hung up and this side has seen it.
        for _ in 0..1000 {
            if fake.closed.load(Ordering::SeqCst) == 1 && idle_open(fake.port) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(idle_open(fake.port), 0);
        assert_eq!(fetch(&pool, &fake.url()).await, "ok");
        assert_eq!(fake.accepted(), 2);
    }

    /// A target's entry is found by the authority's text; another text of the same target
    /// (the default port written out) finds the same entry.
    #[test]
    fn one_target_written_two_ways_has_one_entry() {
        let entry = |a: &str| {
            let (target, host, _) = checkout(false, &Authority::try_from(a).unwrap()).unwrap();
            (target, host)
        };
        let (first, host) = entry("127.0.0.9");
        assert_eq!(host, "127.0.0.9");
        let (again, _) = entry("127.0.0.9");
        let (with_port, _) = entry("127.0.0.9:80");
        assert!(Arc::ptr_eq(&first, &again));
        assert!(
            Arc::ptr_eq(&first, &with_port),
            "the default port is the same target"
        );
        let (other, host) = entry("127.0.0.9:8080");
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(host, "127.0.0.9:8080");
    }

    /// A reused connection that cannot take the request (here: its sending side already shut,
    /// as when the upstream reset it after the last look): the request goes once more, on a
    /// new connection.
    #[tokio::test]
    async fn a_request_the_reused_connection_could_not_send_is_retried() {
        let fake = fake(Mode::KeepAlive).await;
        let pool = pool();
        // An idle connection filed under the fake's address, to a listener that keeps it open
        // without ever answering; its sending side is shut, so writing the request fails.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = tokio::net::TcpStream::connect(silent.local_addr().unwrap())
            .await
            .unwrap();
        let (_far, _) = silent.accept().await.unwrap();
        let mut conn = Conn::new(TokioIo::new(MaybeHttpsStream::Http(TokioIo::new(stream))));
        conn.io.shutdown().await.unwrap();
        let authority = Authority::try_from(format!("127.0.0.1:{}", fake.port)).unwrap();
        let (target, _, none) = checkout(false, &authority).unwrap();
        assert!(none.is_none());
        checkin(&target, conn);
        assert_eq!(fetch(&pool, &fake.url()).await, "ok");
        assert_eq!(fake.accepted(), 1, "the retry went on a new connection");
        assert_eq!(idle_open(fake.port), 1);
    }

    /// The answers the pool reads itself: an interim answer before the real one, a body cut
    /// short, a body that runs until the connection closes, an answer nobody asked for.
    #[tokio::test]
    async fn answers_are_framed_and_broken_ones_are_errors() {
        async fn serve(answer: &'static [u8], then_close: bool) -> (String, u16) {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            tokio::spawn(async move {
                let (mut sock, _) = listener.accept().await.unwrap();
                let _ = read_request(&mut sock).await;
                sock.write_all(answer).await.unwrap();
                if then_close {
                    drop(sock);
                } else {
                    // Hold the connection open until the client is done.
                    let mut rest = Vec::new();
                    let _ = sock.read_to_end(&mut rest).await;
                }
            });
            (format!("http://127.0.0.1:{port}/v1/x?y=1"), port)
        }
        let pool = pool();
        let (url, _) = serve(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            false,
        )
        .await;
        assert_eq!(fetch(&pool, &url).await, "ok");
        let (url, _) = serve(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", true).await;
        assert_eq!(fetch(&pool, &url).await, "until the end");
        let (url, _) = serve(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", true).await;
        let resp = pool.send(get(&url)).await.unwrap();
        let err = resp.body.collect().await.unwrap_err();
        assert!(
            err.to_string()
                .contains("before the answer's body was complete"),
            "{err}"
        );
        let (url, _) = serve(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n",
            true,
        )
        .await;
        let resp = pool.send(get(&url)).await.unwrap();
        assert!(resp.body.collect().await.is_err(), "cut in the trailers");
        let (url, port) = serve(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA",
            false,
        )
        .await;
        assert_eq!(fetch(&pool, &url).await, "ok");
        assert_eq!(idle_open(port), 0, "bytes after the body: not used again");
        let (url, _) = serve(b"HTTP/1.1 200 OK\r\ncontent-len", true).await;
        let err = pool.send(get(&url)).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("in the middle of its answer's head"),
            "{err}"
        );
        let (url, _) = serve(b"", true).await;
        let err = pool.send(get(&url)).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("closed the connection before it answered"),
            "{err}"
        );
        assert!(!err.is_connect());
    }

    /// A request's body goes with its length, small or large; the fake upstream answers with
    /// what it received.
    #[tokio::test]
    async fn request_bodies_are_sent_whole() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            while let Some(head) = read_request(&mut sock).await {
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .unwrap()
                    .parse()
                    .unwrap();
                let mut body = vec![0u8; len];
                sock.read_exact(&mut body).await.unwrap();
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n");
                sock.write_all(answer.as_bytes()).await.unwrap();
                sock.write_all(&body).await.unwrap();
            }
        });
        let pool = pool();
        let url = format!("http://127.0.0.1:{port}/v1/x");
        for size in [3, COALESCE, COALESCE + 1, 1_000_000] {
            let body: Bytes = (0..size)
                .map(|i| (i % 251) as u8)
                .collect::<Vec<_>>()
                .into();
            let req = Outgoing::new(Method::POST, url.parse().unwrap(), body.clone());
            let resp = pool.send(req).await.unwrap();
            assert_eq!(resp.body.collect().await.unwrap().to_bytes(), body);
        }
    }

    #[tokio::test]
    async fn a_body_not_read_to_the_end_closes_its_connection() {
        let fake = fake(Mode::Big).await;
        let pool = pool();
        let resp = pool.send(get(&fake.url())).await.unwrap();
        let mut body = resp.body;
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        drop(body);
        assert_eq!(idle_open(fake.port), 0);
        let resp = pool.send(get(&fake.url())).await.unwrap();
        let all = resp.body.collect().await.unwrap().to_bytes();
        assert_eq!(all.len(), 1_000_000);
        assert_eq!(fake.accepted(), 2);
        // Read to the end, that one went back.
        assert_eq!(idle_open(fake.port), 1);
    }

    /// Tests build many runtimes on the same thread: a connection driven by a runtime that is
    /// gone is closed and never handed out.
    #[test]
    fn connections_of_a_runtime_that_is_gone_are_not_reused() {
        let upstream = tokio::runtime::Runtime::new().unwrap();
        let fake = upstream.block_on(fake(Mode::KeepAlive));
        let pool = pool();
        for _ in 0..2 {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                assert_eq!(fetch(&pool, &fake.url()).await, "ok");
                assert_eq!(fetch(&pool, &fake.url()).await, "ok");
            });
            drop(rt);
            assert_eq!(idle_open(fake.port), 0);
        }
        assert_eq!(fake.accepted(), 2, "one connection per runtime");
    }

    #[tokio::test]
    async fn connection_errors_are_classified() {
        // A port nothing listens on.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let err = pool()
            .send(get(&format!("http://127.0.0.1:{port}/")))
            .await
            .unwrap_err();
        assert!(err.is_connect(), "{err}");
        assert!(!err.is_connect_timeout(), "{err}");
        let err = pool().send(get("/no-host")).await.unwrap_err();
        assert!(!err.is_connect());
    }

    /// A connect that does not complete within the connect timeout is told apart (504 rather
    /// than 502 in the forwarder).
    #[tokio::test]
    async fn a_connect_that_does_not_complete_in_time_is_a_connect_timeout() {
        // A listener that never accepts, with its queue full: the kernel drops further SYNs
        // (`tcp_abort_on_overflow` is 0 by default), so connecting to it hangs.
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        sock.listen(0).unwrap();
        let addr = sock.local_addr().unwrap().as_socket().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..8 {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(s) => fillers.push(s),
                Err(_) => break,
            }
        }
        let pool = Pool::with_connect_timeout(Duration::from_millis(50)).unwrap();
        let err = pool
            .send(get(&format!("http://{addr}/")))
            .await
            .unwrap_err();
        assert!(err.is_connect() && err.is_connect_timeout(), "{err}");
    }

    /// A local TLS server (a test CA's certificate for `localhost`) answering `ok` over
    /// HTTP/1.1 keep-alive; counts the TCP connections it accepted.
    async fn tls_fake() -> (u16, Arc<AtomicUsize>) {
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use tokio_rustls::rustls::{crypto, ServerConfig};
        let cert =
            CertificateDer::from_pem_slice(include_bytes!("../../tests/fixtures/tls/server.pem"))
                .unwrap();
        let key =
            PrivateKeyDer::from_pem_slice(include_bytes!("../../tests/fixtures/tls/server.key"))
                .unwrap();
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(crypto::aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert], key)
                .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(sock).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(
                        |req: axum::http::Request<Incoming>| async move {
                            assert_eq!(req.uri(), "/v1/x?y=1");
                            Ok::<_, std::convert::Infallible>(axum::http::Response::new(Full::new(
                                Bytes::from_static(b"ok"),
                            )))
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        (port, accepted)
    }

    #[tokio::test]
    async fn https_upstreams_are_verified_and_reused() {
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::CertificateDer;
        use tokio_rustls::rustls::{crypto, ClientConfig, RootCertStore};
        let (port, accepted) = tls_fake().await;
        let url = format!("https://localhost:{port}/v1/x?y=1");

        // The production client verifies with the platform's roots: the test CA is not one.
        let err = pool().send(get(&url)).await.unwrap_err();
        assert!(err.is_connect(), "{err}");

        // A client that trusts the test CA (same connector otherwise).
        let mut roots = RootCertStore::empty();
        roots
            .add(
                CertificateDer::from_pem_slice(include_bytes!("../../tests/fixtures/tls/ca.pem"))
                    .unwrap(),
            )
            .unwrap();
        let tls =
            ClientConfig::builder_with_provider(Arc::new(crypto::aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        let pool = Pool::with_connector(
            HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_or_http()
                .enable_http1()
                .wrap_connector(http),
        );
        for _ in 0..5 {
            assert_eq!(fetch(&pool, &url).await, "ok");
        }
        // One refused handshake, then one connection for the five requests.
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}
