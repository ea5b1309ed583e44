//! `floor`: the minimal forwarder `bench/run` measures next to nginx and llm-gatekeeper, so a
//! report shows how far the gateway is above the least this stack (tokio + hyper) can cost,
//! not only how it compares with nginx. It forwards every request to one upstream and its
//! answer back, and does nothing else:
//!
//! - hyper's HTTP/1 server, one current-thread runtime per thread (`--threads`, default 1),
//!   all threads accepting on one listener;
//! - hyper's low-level client (`client::conn::http1`) with a per-thread keep-alive pool of
//!   connections to the upstream (a connection goes back to the pool when the answer's body has
//!   been relayed);
//! - with `--tokens N --token-seed X` (the "auth" variant): the bearer token is looked up in a
//!   map of the N benchmark users' tokens (401 when unknown), and every response chunk is scanned
//!   with `memchr` for `"total_tokens":`, whose number is added to the user's counter — the
//!   least that authentication and usage accounting can cost.
//!
//! `GET /ready` answers 200 itself (the readiness probe).
//!
//! Usage: `floor --port P --upstream 127.0.0.1:U [--threads N] [--tokens N --token-seed HEX]`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

type Upstream = SendRequest<Full<Bytes>>;
type Users = HashMap<Box<str>, Arc<AtomicU64>>;

thread_local! {
    /// Idle upstream connections of this thread (each runtime is one thread, so tasks never
    /// move between pools).
    static POOL: RefCell<Vec<Upstream>> = const { RefCell::new(Vec::new()) };
}

struct Setup {
    upstream: SocketAddr,
    users: Option<Users>,
}

static SETUP: OnceLock<Setup> = OnceLock::new();

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("floor: {e}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), String> {
    let mut port = None;
    let mut upstream = None;
    let mut threads = 1usize;
    let mut tokens = 0u64;
    let mut seed = None;
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        let value = argv.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = || format!("{flag} {value:?} is not a valid value");
        match flag.as_str() {
            "--port" => port = Some(value.parse::<u16>().map_err(|_| bad())?),
            "--upstream" => upstream = Some(value.parse::<SocketAddr>().map_err(|_| bad())?),
            "--threads" => threads = value.parse().map_err(|_| bad())?,
            "--tokens" => tokens = value.parse().map_err(|_| bad())?,
            "--token-seed" => seed = Some(u32::from_str_radix(&value, 16).map_err(|_| bad())?),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    let port = port.ok_or("--port is required")?;
    let upstream = upstream.ok_or("--upstream is required (host:port)")?;
    let users = match (tokens, seed) {
        (0, _) => None,
        (n, Some(seed)) => Some(
            (0..n)
                .map(|i| {
                    // The same tokens as `loadgen gen-users` and the wrk script.
                    let t = format!("{seed:08x}-0000-4000-8000-{i:012x}");
                    (t.into_boxed_str(), Arc::new(AtomicU64::new(0)))
                })
                .collect(),
        ),
        (_, None) => return Err("--tokens needs --token-seed".into()),
    };
    let _ = SETUP.set(Setup { upstream, users });
    let listener = std::net::TcpListener::bind(("127.0.0.1", port))
        .map_err(|e| format!("cannot listen on 127.0.0.1:{port}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut handles = Vec::new();
    for _ in 0..threads.max(1) {
        let l = listener.try_clone().map_err(|e| e.to_string())?;
        handles.push(std::thread::spawn(move || serve(l)));
    }
    for h in handles {
        h.join().map_err(|_| "a server thread panicked")??;
    }
    Ok(())
}

fn serve(listener: std::net::TcpListener) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(handle))
                    .await;
            });
        }
    })
}

async fn handle(req: Request<Incoming>) -> Result<Response<Relay>, Infallible> {
    let Some(setup) = SETUP.get() else {
        return Ok(plain(StatusCode::INTERNAL_SERVER_ERROR));
    };
    // The readiness probe of `bench/run` (`loadgen wait-ready`), answered here.
    if req.uri().path() == "/ready" {
        return Ok(plain(StatusCode::OK));
    }
    let counter = match &setup.users {
        None => None,
        Some(users) => {
            let token = req
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            match token.and_then(|t| users.get(t)) {
                Some(c) => Some(c.clone()),
                None => return Ok(plain(StatusCode::UNAUTHORIZED)),
            }
        }
    };
    let (parts, body) = req.into_parts();
    // Read whole (the gateway reads a request body whole too), so a request can be retried on
    // a fresh connection when a pooled one was closed by the upstream.
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return Ok(plain(StatusCode::BAD_REQUEST));
    };
    for attempt in 0..2 {
        let Some(mut conn) = connection(setup.upstream, attempt > 0).await else {
            break;
        };
        let mut up = Request::new(Full::new(body.clone()));
        *up.method_mut() = parts.method.clone();
        *up.uri_mut() = parts.uri.clone();
        *up.headers_mut() = parts.headers.clone();
        match conn.send_request(up).await {
            Ok(resp) => {
                let (head, inner) = resp.into_parts();
                let relay = Relay {
                    inner: Some(inner),
                    conn: Some(conn),
                    counter: counter.clone(),
                };
                return Ok(Response::from_parts(head, relay));
            }
            Err(_) => continue,
        }
    }
    Ok(plain(StatusCode::BAD_GATEWAY))
}

/// An idle pooled connection (unless `fresh`), or a new one.
async fn connection(upstream: SocketAddr, fresh: bool) -> Option<Upstream> {
    if !fresh {
        while let Some(mut c) = POOL.with(|p| p.borrow_mut().pop()) {
            if c.ready().await.is_ok() {
                return Some(c);
            }
        }
    }
    let stream = tokio::net::TcpStream::connect(upstream).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(sender)
}

fn plain(status: StatusCode) -> Response<Relay> {
    let mut r = Response::new(Relay {
        inner: None,
        conn: None,
        counter: None,
    });
    *r.status_mut() = status;
    r
}

/// The upstream's body relayed to the client; scans it for usage when it has a counter, and
/// gives the connection back to the pool when dropped (a connection whose body was not read to
/// its end is closed by hyper and fails `ready()` when next taken).
struct Relay {
    inner: Option<Incoming>,
    conn: Option<Upstream>,
    counter: Option<Arc<AtomicU64>>,
}

impl Body for Relay {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(frame))), Some(counter)) = (&polled, &this.counter) {
            if let Some(data) = frame.data_ref() {
                count_usage(data, counter);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            let _ = POOL.try_with(|p| p.borrow_mut().push(c));
        }
    }
}

/// Adds every `"total_tokens":N` in `chunk` to `counter` (a usage object split across two
/// chunks is missed: the floor only needs the scan's cost).
fn count_usage(chunk: &[u8], counter: &AtomicU64) {
    static FINDER: OnceLock<memchr::memmem::Finder<'static>> = OnceLock::new();
    let finder = FINDER.get_or_init(|| memchr::memmem::Finder::new(b"\"total_tokens\":"));
    for at in finder.find_iter(chunk) {
        let digits = &chunk[at + finder.needle().len()..];
        let n = digits
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .fold(0u64, |n, b| n * 10 + u64::from(b - b'0'));
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
