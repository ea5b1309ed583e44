//! The upstream connection pool: per worker thread (a `thread_local!`, no lock, no background
//! task), idle HTTP/1.1 connections to the upstreams keyed by scheme, host and port, over
//! hyper's low-level `client::conn::http1` and the rustls connector; the rules for reusing,
//! expiring and retrying them. Knows nothing of providers, keys or users: it sends one ready
//! request and hands back the response, whose body returns the connection when it ends.
//!
//! Why not hyper-util's legacy pooled client (what we used before): its pool is shared by all
//! threads behind a mutex, and every response spawns a task that waits for the connection to
//! become ready again. Measured on this machine (issue 18), a hyper forwarder costs 16.0 µs of
//! CPU per request with it and 13.5 µs with this design. The server runs one current-thread
//! runtime per worker (`WORKERS`), so a pool per thread needs no synchronisation, and each
//! connection's driver task runs on the worker that made it.
//!
//! The rules are the legacy client's: idle connections expire after [`IDLE_TIMEOUT`] (checked
//! when a connection is taken or given back, not by a timer); at most [`MAX_IDLE_PER_HOST`]
//! idle per host and thread; a connection goes back only when its response body was read to the
//! end and it is still open; a request that a reused connection could not even start to send
//! (closed by the upstream while idle) is sent once more on a new connection. Unlike the legacy
//! client there is no reaper timer: an expired connection is closed when its thread next takes
//! or gives back a connection to that host; until then (a worker with no more traffic to that
//! host) it stays open until the upstream closes it, which providers do after a minute or so.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::error::Error as StdError;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::uri::{Authority, Parts, PathAndQuery, Scheme};
use axum::http::{header, HeaderValue, Request, Response, Uri};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use tower::Service;

use crate::config::{Config, ConfigError};

/// How long an idle connection may wait for its next request before it is closed: the legacy
/// client's default, which we had until now. Upstreams close idle connections on their side
/// after a minute or so; this keeps us from handing out ones that likely are.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The most idle connections kept per upstream host on one worker thread. A worker needs as
/// many as it has requests in flight to that host at once (HTTP/1.1: one request per
/// connection), so this is the burst a worker can absorb without new TLS handshakes. Each idle
/// connection holds a socket, hyper's buffers and a TLS session (some tens of KB) and a slot
/// on the upstream's side; beyond 64 per worker a burst costs handshakes rather than memory.
pub const MAX_IDLE_PER_HOST: usize = 64;

/// The request body type of every upstream call: the whole body, already read.
type ReqBody = Full<Bytes>;

/// The connector of new connections: TCP (with `TCP_NODELAY` and the connect timeout) and,
/// for `https`, rustls with the platform's certificate verifier, ALPN `http/1.1`.
pub type Connector = HttpsConnector<HttpConnector>;

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

/// One idle connection.
struct Idle {
    tx: SendRequest<ReqBody>,
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

/// Takes an idle connection to the target if this thread has a usable one (open, ready for a
/// request, not idle too long); also returns the target's key and `Host` header.
fn checkout(
    https: bool,
    authority: &Authority,
) -> Option<(Arc<Target>, HeaderValue, Option<SendRequest<ReqBody>>)> {
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
            let now = Instant::now();
            while let Some(c) = h.idle.pop_back() {
                if now.saturating_duration_since(c.since) > IDLE_TIMEOUT {
                    // The newest is too old: all the others are older still.
                    h.idle.clear();
                    break;
                }
                // Closed: the upstream hung up, or the runtime that drove it is gone.
                if !c.tx.is_closed() && c.tx.is_ready() {
                    found = Some(c.tx);
                    break;
                }
            }
        }
        Some((h.target.clone(), h.host_header.clone(), found))
    })
}

/// Gives a connection whose response has ended back to this thread's pool, unless it closed.
fn checkin(target: &Arc<Target>, tx: SendRequest<ReqBody>) {
    if tx.is_closed() {
        return;
    }
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
        let now = Instant::now();
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
        h.idle.push_back(Idle { tx, since: now });
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
    /// this thread, or a new one. A reused connection that could not start sending (it closed
    /// while idle) gets the request once more on a new connection. Dropping the future drops
    /// the request (and its connection).
    pub async fn send(
        &self,
        mut req: Request<ReqBody>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let Parts {
            scheme,
            authority,
            path_and_query,
            ..
        } = std::mem::take(req.uri_mut()).into_parts();
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
        let path = path_and_query.unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(path);
        req.headers_mut().entry(header::HOST).or_insert(host);
        if let Some(mut tx) = idle {
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok(PooledBody::wrap(resp, target, tx)),
                Err(mut e) => match e.take_message() {
                    // Nothing was written: as the legacy client's `retry_canceled_requests`,
                    // once more on a new connection.
                    Some(unsent) => {
                        tracing::debug!(error = %e.error(), "reused upstream connection closed before the request; retrying on a new one");
                        req = unsent;
                    }
                    None => return Err(UpstreamError::Send(e.into_error())),
                },
            }
        }
        // Boxed: the connect and TLS handshake futures are large and rarely run; inline, they
        // would make every request's future (moved and copied per request) that much larger.
        let mut tx = Box::pin(self.connect(scheme, authority)).await?;
        let resp = tx.send_request(req).await.map_err(UpstreamError::Send)?;
        Ok(PooledBody::wrap(resp, target, tx))
    }

    /// A new connection, its driver spawned on this thread's runtime.
    async fn connect(
        &self,
        scheme: Scheme,
        authority: Authority,
    ) -> Result<SendRequest<ReqBody>, UpstreamError> {
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
        let (tx, conn) = http1::handshake(io).await.map_err(UpstreamError::Send)?;
        // The driver ends with the connection (closed by either side, or dropped from the
        // pool); nothing needs to wait for it at shutdown.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(tx)
    }
}

type BoxError = Box<dyn StdError + Send + Sync>;

/// Why an upstream call produced no response.
#[derive(Debug)]
pub enum UpstreamError {
    /// No connection: refused, unreachable, DNS, TLS, or the connect timeout.
    Connect(BoxError),
    /// The connection failed after it was made (reset, closed before the answer).
    Send(hyper::Error),
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

/// An upstream response body. When it has been read to the end, its connection goes back to
/// this thread's pool; dropped before that (client gone, deadline, error), the connection is
/// closed with it, so the upstream stops generating.
pub struct PooledBody {
    inner: Incoming,
    /// The connection, until it is given back.
    home: Option<(Arc<Target>, SendRequest<ReqBody>)>,
    /// The body has ended (`None` read, or the last frame of a known length).
    done: bool,
}

impl PooledBody {
    fn wrap(
        resp: Response<Incoming>,
        target: Arc<Target>,
        tx: SendRequest<ReqBody>,
    ) -> Response<PooledBody> {
        resp.map(|inner| PooledBody {
            inner,
            home: Some((target, tx)),
            done: false,
        })
    }

    fn give_back(&mut self) {
        self.done = true;
        if let Some((target, tx)) = self.home.take() {
            checkin(&target, tx);
        }
    }
}

impl fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledBody")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.give_back(),
            // The last frame of a body of known length: a reader may stop here.
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.give_back(),
            // A broken body: its connection is not reused.
            Poll::Ready(Some(Err(_))) => this.home = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // An empty body (204, `content-length: 0`) may never be polled.
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
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

    fn get(url: &str) -> Request<ReqBody> {
        Request::get(url).body(Full::new(Bytes::new())).unwrap()
    }

    async fn fetch(pool: &Pool, url: &str) -> Bytes {
        let resp = pool.send(get(url)).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    /// The idle connections to `port` on this thread that are still open.
    fn idle_open(port: u16) -> usize {
        IDLE.with_borrow(|hosts| {
            hosts
                .iter()
                .filter(|h| h.target.port == port)
                .map(|h| h.idle.iter().filter(|c| !c.tx.is_closed()).count())
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

    /// A reused connection that closes before it could send the request (the upstream hung up
    /// while it was idle, and this side learns it only when sending): the request goes once
    /// more, on a new connection.
    #[tokio::test]
    async fn a_request_the_reused_connection_could_not_send_is_retried() {
        let fake = fake(Mode::KeepAlive).await;
        let pool = pool();
        // An idle connection to the fake's address that really is a pipe whose far end is
        // about to close. Its driver has run once, so it is ready.
        let (near, far) = tokio::io::duplex(1024);
        let (mut tx, conn) = http1::handshake(hyper_util::rt::TokioIo::new(near))
            .await
            .unwrap();
        tokio::spawn(conn);
        tx.ready().await.unwrap();
        let authority = Authority::try_from(format!("127.0.0.1:{}", fake.port)).unwrap();
        let (target, _, none) = checkout(false, &authority).unwrap();
        assert!(none.is_none());
        checkin(&target, tx);
        // Closing the far end wakes the driver, which runs only when this task waits: in
        // `send`, after the request was queued on the idle connection.
        drop(far);
        assert_eq!(fetch(&pool, &fake.url()).await, "ok");
        assert_eq!(fake.accepted(), 1, "the retry went on a new connection");
        assert_eq!(idle_open(fake.port), 1);
    }

    #[tokio::test]
    async fn a_body_not_read_to_the_end_closes_its_connection() {
        let fake = fake(Mode::Big).await;
        let pool = pool();
        let resp = pool.send(get(&fake.url())).await.unwrap();
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        drop(body);
        assert_eq!(idle_open(fake.port), 0);
        let resp = pool.send(get(&fake.url())).await.unwrap();
        let all = resp.into_body().collect().await.unwrap().to_bytes();
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
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        assert_eq!(req.uri(), "/v1/x?y=1");
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    });
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
