//! The accept loop: takes TCP connections, applies the connection caps, and serves each one
//! with our HTTP/1.1 connection loop (`conn.rs`) under the client timers, handing each request
//! to a [`Front`]
//! (the application's front, `app::Front`, or a bare axum `Router`) with the socket peer.
//! Knows nothing of routes, users or upstreams.
//!
//! Our own loop instead of `axum::serve`, which has no timers and no caps: with it, 50
//! connections trickling header bytes, a slow body and an idle keep-alive were all still open
//! after a minute, and 1 100 half-open connections from one address exhausted a 1 024-file
//! limit so that every other client failed. Here:
//! - the request head must arrive within `CLIENT_HEADER_TIMEOUT_SECS`, which also closes a
//!   keep-alive connection idle for as long (`head.rs`: the connection's deadline, from its
//!   start and from the end of each response, up to a tenth of a second late); the request body may pause at most `CLIENT_BODY_TIMEOUT_SECS`
//!   between reads ([`ReadTimeout`], whose timer runs only while a handler waits for data). Neither timer
//!   runs while a response is being written, so a long stream is never cut;
//! - `MAX_CONNECTIONS_PER_IP` per socket peer (not with `TRUSTED_PROXIES > 0`, where the peer
//!   is the front proxy) and `MAX_CONNECTIONS` in all (by default derived from the open-file
//!   limit, see [`derived_max_connections`]). A connection over a cap is closed at once, before
//!   anything is read from it; everyone else keeps being served.
//!
//!
//! Thread per core (issue 18): the binary runs `WORKERS` threads, each with its own
//! current-thread runtime and its own listening socket on the same address
//! ([`bind_listeners`], `SO_REUSEPORT`: the kernel spreads new connections over them), as
//! nginx does with its worker processes. Each thread runs [`run_shared`]; the connection caps
//! are counted once for all of them ([`ConnectionCounts`]). Tests and embedders that pass one
//! listener use [`run`] on their own runtime.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use axum::extract::ConnectInfo;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::http1::{Fields, Reply};

mod body;
mod conn;
mod head;
pub mod spare;
mod stop;
pub use body::{BodyTimeout, ReadTimeout};
pub use conn::RequestBody;

/// File descriptors kept out of the connection budget: the listener, log files, the SQLite
/// database, the runtime's own descriptors, and headroom.
pub const RESERVED_FDS: u64 = 64;

/// The timers and caps of the accept loop.
#[derive(Clone, Debug)]
pub struct Limits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    /// 0 = no per-address cap.
    pub max_per_ip: usize,
    pub max_connections: usize,
}

impl Limits {
    /// From the configuration: the per-address cap only applies without trusted proxies; the
    /// global cap is `MAX_CONNECTIONS` or derived from the current open-file limit.
    pub fn from_config(config: &crate::config::Config) -> Limits {
        let max_per_ip = if config.trusted_proxies() > 0 {
            0
        } else {
            config.cli.max_connections_per_ip
        };
        let max_connections = match config.cli.max_connections {
            0 => derived_max_connections(nofile_limit()),
            n => n,
        };
        Limits {
            header_timeout: Duration::from_secs(config.cli.client_header_timeout_secs),
            body_timeout: Duration::from_secs(config.cli.client_body_timeout_secs),
            max_per_ip,
            max_connections,
        }
    }
}

/// The global connection cap for an open-file limit: every client connection may need one
/// upstream connection too, and [`RESERVED_FDS`] stay free for everything else. 1 024 → 480.
pub fn derived_max_connections(nofile: u64) -> usize {
    let per_pair = nofile.saturating_sub(RESERVED_FDS) / 2;
    usize::try_from(per_pair.max(16)).unwrap_or(usize::MAX)
}

/// The soft open-file limit of the process (1 024 when it cannot be read).
pub fn nofile_limit() -> u64 {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct we pass.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            return lim.rlim_cur;
        }
    }
    1024
}

/// Raises the soft open-file limit to the hard one (called once at startup) and returns the
/// soft limit in effect afterwards.
pub fn raise_nofile_limit() -> u64 {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: lim.rlim_max,
                    rlim_max: lim.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                    tracing::warn!(
                        soft = lim.rlim_cur,
                        hard = lim.rlim_max,
                        "could not raise the open-file limit to the hard limit"
                    );
                }
            }
        }
    }
    nofile_limit()
}

/// Open connections, in all and per address, shared by every worker thread: an atomic for
/// the total and a sharded map (`DashMap`) per address, so that workers accepting at the same
/// time rarely wait for each other.
#[derive(Default)]
pub struct ConnectionCounts {
    total: AtomicUsize,
    per_ip: dashmap::DashMap<IpAddr, usize>,
}

type Counts = ConnectionCounts;

/// One admitted connection; gives its places back when dropped.
struct Slot {
    counts: Arc<Counts>,
    ip: Option<IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.counts.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.ip {
            // Removed under the shard's lock when it reaches zero, so that a concurrent admit
            // of the same address either sees the entry or inserts a fresh one.
            self.counts.per_ip.remove_if_mut(&ip, |_, n| {
                *n = n.saturating_sub(1);
                *n == 0
            });
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, PartialEq, Eq)]
enum Refused {
    Total,
    PerIp,
}

impl Counts {
    /// Takes a place for a connection from `ip`, or says which cap it is over.
    fn admit(self: &Arc<Self>, ip: IpAddr, limits: &Limits) -> Result<Slot, Refused> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Total);
        }
        if limits.max_per_ip == 0 {
            return Ok(Slot {
                counts: self.clone(),
                ip: None,
            });
        }
        let mut n = self.per_ip.entry(ip).or_insert(0);
        if *n >= limits.max_per_ip {
            // `n` is at least 1 here (the cap is not 0): the entry stays for its connections.
            drop(n);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::PerIp);
        }
        *n += 1;
        drop(n);
        Ok(Slot {
            counts: self.clone(),
            ip: Some(ip),
        })
    }
}

/// Logs the client timers and caps in effect (once per server, not once per worker).
pub fn log_limits(limits: &Limits) {
    tracing::info!(
        header_timeout_secs = limits.header_timeout.as_secs(),
        body_timeout_secs = limits.body_timeout.as_secs(),
        max_connections = limits.max_connections,
        max_connections_per_ip = limits.max_per_ip,
        "client limits (CLIENT_HEADER_TIMEOUT_SECS, CLIENT_BODY_TIMEOUT_SECS, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_IP; 0 = none)"
    );
}

/// Binds `workers` listening sockets to `addr`, all with `SO_REUSEPORT` (the kernel hashes each
/// new connection to one of them), non-blocking, for one worker thread each. With port 0 the
/// first socket's port is taken for the others. Errors are the first bind's (address in use,
/// permission), for `main` to report.
///
/// `SO_REUSEPORT` lets another socket of the same user bind the same port too, as with nginx's
/// `reuseport`; the first bind still fails when a process of another user holds the port.
pub fn bind_listeners(
    addr: SocketAddr,
    workers: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut out = Vec::with_capacity(workers.max(1));
    let mut addr = addr;
    for _ in 0..workers.max(1) {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        #[cfg(unix)]
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        // The backlog nginx uses on Linux (`listen ... backlog=`, default 511) rounded up: a
        // burst of connections waits in the kernel rather than being refused.
        socket.listen(1024)?;
        let listener: std::net::TcpListener = socket.into();
        if addr.port() == 0 {
            addr = listener.local_addr()?;
        }
        out.push(listener);
    }
    Ok(out)
}

/// The request a [`Front`] gets: its head as read, its fields as a [`Fields`] list (the
/// straight path reads a few of them once; a `HeaderMap` is built only for the router,
/// [`FrontRequest::into_http`]), and its body under the `CLIENT_BODY_TIMEOUT_SECS` timer
/// between reads.
pub struct FrontRequest {
    pub method: axum::http::Method,
    pub uri: axum::http::Uri,
    pub version: axum::http::Version,
    pub headers: Fields,
    pub body: ReadTimeout<RequestBody>,
}

impl FrontRequest {
    /// The same request as an `http::Request`, for the router.
    pub fn into_http(self) -> axum::http::Request<ReadTimeout<RequestBody>> {
        let mut req = axum::http::Request::new(self.body);
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        crate::http1::put_headers(req.headers_mut(), self.headers.into_header_map());
        req
    }
}

/// What the accept loop serves: each request with the connection's socket peer (which the
/// front uses to decide the client address). One value for the whole server, cloned once per
/// connection.
pub trait Front: Clone + Send + Sync + 'static {
    type Future: Future<Output = Reply> + Send + Unpin + 'static;
    fn serve(&self, req: FrontRequest, peer: SocketAddr) -> Self::Future;
}

/// A bare router as the front: every request goes through it, with [`ConnectInfo`] inserted.
impl Front for Router {
    type Future = Pin<Box<dyn Future<Output = Reply> + Send>>;

    fn serve(&self, req: FrontRequest, peer: SocketAddr) -> Self::Future {
        let mut req = req.into_http().map(axum::body::Body::new);
        req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
        let router = self.clone();
        Box::pin(async move {
            match tower::ServiceExt::oneshot(router, req).await {
                Ok(resp) => resp.into(),
                Err(never) => match never {},
            }
        })
    }
}

/// Serves `app` on `listener` until `stop` is cancelled; then stops accepting, lets every open
/// connection finish its request (streams included) within `grace`, and closes what is left.
pub async fn run(
    listener: TcpListener,
    app: impl Front,
    limits: Limits,
    stop: CancellationToken,
    grace: Duration,
) {
    log_limits(&limits);
    run_shared(
        listener,
        app,
        limits,
        Arc::new(ConnectionCounts::default()),
        stop,
        grace,
    )
    .await
}

/// [`run`] for one of several workers: the caps count `counts`, shared by all of them.
pub async fn run_shared(
    listener: TcpListener,
    app: impl Front,
    limits: Limits,
    counts: Arc<ConnectionCounts>,
    stop: CancellationToken,
    grace: Duration,
) {
    let connections = TaskTracker::new();
    // Graceful: no new request on a connection. Forced: connections closed where they are.
    let stopping = Arc::new(stop::StopSignal::default());
    let force_close = Arc::new(stop::StopSignal::default());
    let settings = conn::Settings {
        header_timeout: limits.header_timeout,
        body_timeout: limits.body_timeout,
    };
    let mut refused_logged = false;

    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors (or a connection reset before it was taken): wait a
                    // little rather than spin; the caps keep this from happening in the
                    // first place.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let ip = crate::net::normalize(peer.ip());
        let slot = match counts.admit(ip, &limits) {
            Ok(slot) => slot,
            Err(why) => {
                // Closed at once: nothing is read from it and nothing is written.
                drop(tcp);
                if !refused_logged {
                    refused_logged = true;
                    tracing::warn!(
                        %ip,
                        cap = ?why,
                        "connection refused: over MAX_CONNECTIONS_PER_IP or MAX_CONNECTIONS (logged once)"
                    );
                }
                continue;
            }
        };
        // Nagle's algorithm would hold back small writes (an SSE event, a short JSON answer)
        // for up to ~40 ms waiting for the client's delayed ACK: every chunk must leave at once.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on a client connection");
        }
        let conn = conn::serve(tcp, peer, app.clone(), settings, stopping.watch());
        let mut forced = force_close.watch();
        connections.spawn(async move {
            let _slot = slot;
            let mut conn = std::pin::pin!(conn);
            std::future::poll_fn(|cx| {
                // One clock reading for everything this poll times (`timer::now`).
                let _now = crate::timer::freeze();
                if conn.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(());
                }
                // Dropping the connection's future closes it.
                forced.poll_stopped(cx)
            })
            .await;
        });
    }
    // The loop ends only when `stop` is cancelled: now the connections hear it.
    stopping.trigger();
    drop(listener);
    connections.close();
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "in-flight requests did not finish within SHUTDOWN_GRACE_SECS; closing them"
        );
        force_close.trigger();
        connections.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_ip: usize) -> Limits {
        Limits {
            header_timeout: Duration::from_secs(1),
            body_timeout: Duration::from_secs(1),
            max_per_ip: per_ip,
            max_connections: total,
        }
    }

    #[test]
    fn a_1024_file_limit_leaves_room_for_upstreams_and_files() {
        assert_eq!(derived_max_connections(1024), 480);
        assert!(derived_max_connections(1024) * 2 + RESERVED_FDS as usize <= 1024);
        assert_eq!(derived_max_connections(10), 16);
    }

    #[test]
    fn every_worker_listens_on_the_first_ones_port() {
        let ls = bind_listeners("127.0.0.1:0".parse().expect("addr"), 3).expect("bind");
        assert_eq!(ls.len(), 3);
        let port = ls[0].local_addr().expect("addr").port();
        assert_ne!(port, 0);
        for l in &ls {
            assert_eq!(l.local_addr().expect("addr").port(), port);
        }
        // Each socket accepts connections the kernel hands to it.
        let _c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    }

    #[test]
    fn caps_count_and_give_back() {
        let c = Arc::new(Counts::default());
        let l = limits(3, 2);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let s1 = c.admit(a, &l).expect("first");
        let _s2 = c.admit(a, &l).expect("second");
        assert_eq!(c.admit(a, &l).err(), Some(Refused::PerIp));
        let _s3 = c.admit(b, &l).expect("another address");
        assert_eq!(c.admit(b, &l).err(), Some(Refused::Total));
        drop(s1);
        let _s4 = c
            .admit(a, &l)
            .expect("a closed connection gives its place back");
        assert_eq!(c.total.load(Ordering::Acquire), 3);
    }
}
