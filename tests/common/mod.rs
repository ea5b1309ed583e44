//! Shared test harness: starts the real server on 127.0.0.1:0 with a given configuration and
//! stops it when the [`TestApp`] is dropped (or on [`TestApp::shutdown`]).
//!
//! Each area keeps its own helpers in a submodule here (`pub mod <area>;`).
#![allow(dead_code)]

pub mod admin;
pub mod binary;
pub mod cloud;
pub mod google_ai;
pub mod providers;
pub mod python;
pub mod quota;
pub mod upstream;
pub mod web;

use std::net::SocketAddr;

use llm_gatekeeper::{AppState, Config};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub mod persist;

pub struct TestApp {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub state: AppState,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestApp {
    /// Triggers a graceful shutdown and waits for the server to finish.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.handle.take() {
            Some(h) => h.await.map_err(std::io::Error::other)?,
            None => Ok(()),
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Builds a config from `--flag value` arguments and extra `(NAME, value)` variables (for
/// `TOKEN_QUOTA_*`). `--bind-address`/`--port` are irrelevant: the test binds its own listener.
pub fn config(args: &[&str], vars: &[(&str, &str)]) -> Config {
    let mut argv = vec!["llm-gatekeeper".to_string()];
    // Key checkers would call the fake upstreams on their own; tests that want them say so.
    if !args.contains(&"--check-keys") {
        argv.extend(["--check-keys".to_string(), "false".to_string()]);
    }
    argv.extend(args.iter().map(|s| s.to_string()));
    Config::from_args(
        argv,
        vars.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .expect("test config is valid")
}

/// Starts the server on 127.0.0.1:0 (or `bind_ip`:0) with `config`.
pub async fn spawn_with(config: Config, bind_ip: &str) -> TestApp {
    let state = AppState::build(config).await.expect("state builds");
    let listener = tokio::net::TcpListener::bind(format!("{bind_ip}:0"))
        .await
        .expect("bind test listener");
    let addr = listener.local_addr().expect("local addr");
    let (tx, rx) = oneshot::channel::<()>();
    let st = state.clone();
    let handle = tokio::spawn(async move {
        llm_gatekeeper::serve(st, listener, async move {
            let _ = rx.await;
        })
        .await
    });
    TestApp {
        addr,
        url: format!("http://{addr}"),
        state,
        stop: Some(tx),
        handle: Some(handle),
    }
}

/// Starts the server on 127.0.0.1:0 with flags and extra variables.
pub async fn spawn(args: &[&str], vars: &[(&str, &str)]) -> TestApp {
    spawn_with(config(args, vars), "127.0.0.1").await
}

/// A reqwest client that connects from a chosen loopback source address (127.0.0.2, …), for
/// per-IP tests.
pub fn client_from(source_ip: &str) -> reqwest::Client {
    let ip: std::net::IpAddr = source_ip.parse().expect("valid source ip");
    reqwest::Client::builder()
        .local_address(ip)
        .build()
        .expect("client builds")
}

/// A port for a child process that must be told its port before it binds (firebase-server,
/// chromedriver). A port learned from `bind(0)` and released could be handed by the kernel to
/// any other server of a parallel test before the child binds it, and the child's caller would
/// then talk to that server (seen: firebase-server's URL answered by another test's server
/// with a 404). So the port is drawn from below the kernel's ephemeral range, from which every
/// `bind(0)` draws, never twice in one test process, and checked free when drawn.
pub fn child_port() -> u16 {
    use rand::Rng;
    static TAKEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = (10_000u16, ephemeral_low.max(10_001));
    let mut taken = TAKEN.lock().expect("ports lock");
    loop {
        let port = rand::rng().random_range(from..to);
        if taken.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return port;
        }
    }
}

/// Reads from `s` until the server closes the connection (end of stream or reset) and returns
/// what was read; fails the test if the connection is still open after 20 s.
pub async fn read_until_closed(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let closed = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server kept the connection open");
    out
}
