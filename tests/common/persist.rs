//! Helpers for the persistence tests: a real RTDB-compatible server (npm `firebase-server`),
//! a relay in front of it that records requests and can fail on demand, a local OAuth token
//! endpoint, a test-only service-account key, and ways to run the server as a child process
//! (the real binary, or this test binary re-executed to generate usage) for SIGTERM/kill -9.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine;
use serde_json::{json, Value};

/// The access token the fake token endpoint issues and the relay requires.
pub const ACCESS_TOKEN: &str = "test-access-token-1234";
pub const CLIENT_EMAIL: &str = "gatekeeper-test@test-project.iam.gserviceaccount.com";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Polls `f` every 100 ms until it returns `Some`, for at most `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// firebase-server

/// A running `firebase-server` (killed on drop).
pub struct FirebaseServer {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
}

impl FirebaseServer {
    /// Starts firebase-server on a free port, or returns `None` (after printing why) when it is
    /// not installed and `CI` is unset. With `CI` set a missing install fails the test.
    pub fn start() -> Option<FirebaseServer> {
        let script = repo().join("node_modules/firebase-server/bin/firebase-server.js");
        if !script.exists() {
            let msg = "node_modules/firebase-server is missing: run `npm install` (package.json) at the repository root";
            if std::env::var_os("CI").is_some() {
                panic!("{msg}");
            }
            eprintln!("SKIPPED: {msg}");
            return None;
        }
        for _ in 0..5 {
            let port = super::child_port();
            let mut child = Command::new("node")
                .arg(&script)
                .args(["-e", "-p", &port.to_string(), "-a", "127.0.0.1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start node (is Node.js installed?)");
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // Port taken meanwhile: try another.
                }
                // Listening, and still running (not another process on its port).
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                    && matches!(child.try_wait(), Ok(None))
                {
                    return Some(FirebaseServer {
                        child,
                        url: format!("http://127.0.0.1:{port}"),
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("firebase-server did not start");
    }

    /// Reads a path directly from the database (not through the relay).
    pub async fn get(&self, path: &str) -> Value {
        reqwest::get(format!("{}/{path}.json", self.url))
            .await
            .expect("GET firebase-server")
            .json()
            .await
            .expect("JSON from firebase-server")
    }

    /// Writes a path directly.
    pub async fn put(&self, path: &str, value: &Value) {
        let resp = reqwest::Client::new()
            .put(format!("{}/{path}.json", self.url))
            .json(value)
            .send()
            .await
            .expect("PUT firebase-server");
        assert!(resp.status().is_success(), "PUT {path}: {}", resp.status());
    }
}

impl Drop for FirebaseServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// relay

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub authorization: Option<String>,
    pub body: String,
}

#[derive(Default)]
pub struct RelayState {
    target: String,
    /// Answer 503 to everything (a simulated outage).
    pub fail: AtomicBool,
    /// Hold each PATCH this long before forwarding it (a slow flush).
    pub patch_delay_ms: AtomicU64,
    /// When set, refuse requests without `Authorization: Bearer <this>` with 401, like RTDB.
    pub require_bearer: Mutex<Option<String>>,
    pub log: Mutex<Vec<Recorded>>,
    client: reqwest::Client,
}

impl RelayState {
    pub fn requests(&self) -> Vec<Recorded> {
        self.log.lock().expect("lock").clone()
    }
    pub fn patches(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "PATCH")
            .collect()
    }
}

pub struct Relay {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub addr: SocketAddr,
    pub state: Arc<RelayState>,
}

async fn relay_handler(State(s): State<Arc<RelayState>>, req: Request) -> Response {
    let method = req.method().clone();
    let uri = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let authorization = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = axum::body::to_bytes(req.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    s.log.lock().expect("lock").push(Recorded {
        method: method.to_string(),
        uri: uri.clone(),
        authorization: authorization.clone(),
        body: String::from_utf8_lossy(&body).into_owned(),
    });
    if s.fail.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "relay: simulated outage").into_response();
    }
    let required = s.require_bearer.lock().expect("lock").clone();
    if let Some(token) = required {
        if authorization.as_deref() != Some(&format!("Bearer {token}")) {
            return (
                StatusCode::UNAUTHORIZED,
                r#"{"error" : "Unauthorized request."}"#,
            )
                .into_response();
        }
    }
    if method == "PATCH" {
        let delay = s.patch_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
    }
    let resp = s
        .client
        .request(method, format!("{}{uri}", s.target))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    match resp {
        Ok(r) => {
            let status =
                StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let bytes = r.bytes().await.unwrap_or_default();
            (status, Body::from(bytes)).into_response()
        }
        Err(e) => (StatusCode::BAD_GATEWAY, format!("relay: {e}")).into_response(),
    }
}

/// Starts a relay on port 0 forwarding to `target`.
pub async fn relay(target: &str) -> Relay {
    let state = Arc::new(RelayState {
        target: target.to_string(),
        ..RelayState::default()
    });
    let app = Router::new()
        .fallback(relay_handler)
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind relay");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Relay {
        url: format!("http://{addr}"),
        addr,
        state,
    }
}

// ---------------------------------------------------------------------------------------------
// OAuth token endpoint

/// One grant request received by the token endpoint.
#[derive(Clone, Debug)]
pub struct Grant {
    pub grant_type: String,
    pub jwt_header: Value,
    pub claims: Value,
}

#[derive(Default)]
pub struct TokenState {
    pub grants: Mutex<Vec<Grant>>,
    /// Answer 400 invalid_grant (a revoked or unknown key).
    pub reject: AtomicBool,
    pub calls: AtomicUsize,
    /// `expires_in` of issued tokens (0 = the usual 3599 s).
    pub expires_in: AtomicU64,
}

pub struct TokenEndpoint {
    /// The `token_uri` to put in the key.
    pub uri: String,
    pub state: Arc<TokenState>,
}

fn decode_part(part: &str) -> Value {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .expect("JWT part is base64url");
    serde_json::from_slice(&bytes).expect("JWT part is JSON")
}

async fn token_handler(State(s): State<Arc<TokenState>>, body: String) -> Response {
    s.calls.fetch_add(1, Ordering::SeqCst);
    let form: Vec<(String, String)> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let assertion = field("assertion");
    let parts: Vec<&str> = assertion.split('.').collect();
    if parts.len() != 3 {
        return (StatusCode::BAD_REQUEST, "assertion is not a JWT").into_response();
    }
    s.grants.lock().expect("lock").push(Grant {
        grant_type: field("grant_type"),
        jwt_header: decode_part(parts[0]),
        claims: decode_part(parts[1]),
    });
    if s.reject.load(Ordering::SeqCst) {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(
                json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}),
            ),
        )
            .into_response();
    }
    let expires_in = match s.expires_in.load(Ordering::SeqCst) {
        0 => 3599,
        n => n,
    };
    axum::Json(
        json!({"access_token": ACCESS_TOKEN, "expires_in": expires_in, "token_type": "Bearer"}),
    )
    .into_response()
}

pub async fn token_endpoint() -> TokenEndpoint {
    let state = Arc::new(TokenState::default());
    let app = Router::new()
        .route("/token", axum::routing::post(token_handler))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind token endpoint");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    TokenEndpoint {
        uri: format!("http://{addr}/token"),
        state,
    }
}

/// A base64-encoded service-account key (test-only RSA key) whose `token_uri` is `token_uri`.
pub fn service_account_key_b64(token_uri: &str) -> String {
    let pem = std::fs::read_to_string(
        repo().join("tests/fixtures/TEST-ONLY-firebase-service-account-key.pem"),
    )
    .expect("test key fixture");
    let key = json!({
        "type": "service_account",
        "project_id": "test-project",
        "private_key_id": "test-only",
        "private_key": pem,
        "client_email": CLIENT_EMAIL,
        "client_id": "1",
        "token_uri": token_uri,
    });
    base64::engine::general_purpose::STANDARD.encode(key.to_string())
}

// ---------------------------------------------------------------------------------------------
// the whole Firebase fixture

pub struct Firebase {
    pub db: FirebaseServer,
    pub relay: Relay,
    pub tokens: TokenEndpoint,
    pub key_b64: String,
}

impl Firebase {
    /// firebase-server + relay (requiring our access token) + token endpoint, or `None` to skip.
    pub async fn start() -> Option<Firebase> {
        let db = FirebaseServer::start()?;
        let relay = relay(&db.url).await;
        *relay.state.require_bearer.lock().expect("lock") = Some(ACCESS_TOKEN.to_string());
        let tokens = token_endpoint().await;
        let key_b64 = service_account_key_b64(&tokens.uri);
        Some(Firebase {
            db,
            relay,
            tokens,
            key_b64,
        })
    }

    /// Server flags for this fixture with the given flush interval.
    pub fn args(&self, flush_secs: u64) -> Vec<String> {
        vec![
            "--gatekeeper-store".into(),
            "firebase_rtdb".into(),
            "--firebase-rtdb-url".into(),
            self.relay.url.clone(),
            "--firebase-key".into(),
            self.key_b64.clone(),
            "--gatekeeper-store-flush-secs".into(),
            flush_secs.to_string(),
        ]
    }

    /// The same as environment variables, for child processes.
    pub fn env(&self, flush_secs: u64) -> Vec<(String, String)> {
        vec![
            ("GATEKEEPER_STORE".into(), "firebase_rtdb".into()),
            ("FIREBASE_RTDB_URL".into(), self.relay.url.clone()),
            ("FIREBASE_KEY".into(), self.key_b64.clone()),
            ("GATEKEEPER_STORE_FLUSH_SECS".into(), flush_secs.to_string()),
        ]
    }
}

/// Starts the in-process server with owned argument strings.
pub async fn spawn_args(args: &[String]) -> super::TestApp {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    super::spawn(&refs, &[]).await
}

/// `GET /health?verbose` → the `persistence` object.
pub async fn persist_status(app_url: &str) -> Value {
    let v: Value = reqwest::get(format!("{app_url}/health?verbose"))
        .await
        .expect("health")
        .json()
        .await
        .expect("health JSON");
    v["persistence"].clone()
}

// ---------------------------------------------------------------------------------------------
// child processes

/// A server running as a child process, with its output collected.
pub struct Proc {
    child: Child,
    output: Arc<Mutex<String>>,
    /// The threads reading stdout and stderr; they finish when the child has exited and
    /// everything it wrote has been collected.
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Proc {
    /// Starts `program args` with a clean environment plus `env`, collecting stdout+stderr.
    pub fn start(program: &std::path::Path, args: &[&str], env: &[(String, String)]) -> Proc {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("NO_COLOR", "1")
            .env("PORT", "0")
            .env("BIND_ADDRESS", "127.0.0.1")
            .env("LOG_LEVEL", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start child process");
        let output = Arc::new(Mutex::new(String::new()));
        let pipes: Vec<Box<dyn std::io::Read + Send>> = vec![
            Box::new(child.stdout.take().expect("stdout")),
            Box::new(child.stderr.take().expect("stderr")),
        ];
        let mut readers = Vec::new();
        for pipe in pipes {
            let out = output.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut o = out.lock().expect("lock");
                    o.push_str(&line);
                    o.push('\n');
                }
            }));
        }
        Proc {
            child,
            output,
            readers,
        }
    }

    /// The real `llm-gatekeeper` binary.
    pub fn binary(env: &[(String, String)]) -> Proc {
        Proc::start(
            std::path::Path::new(env!("CARGO_BIN_EXE_llm-gatekeeper")),
            &[],
            env,
        )
    }

    pub fn output(&self) -> String {
        self.output.lock().expect("lock").clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (without blocking the test's runtime, which may serve the relay) until the output
    /// contains `needle`; panics (with the output) if the process
    /// exits first or 30 s pass.
    pub async fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.output();
            if let Some(i) = out.find(needle) {
                return out[i + needle.len()..].to_string();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.drained().await;
                panic!(
                    "child exited ({status}) before printing {needle:?}; output:\n{}",
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} within 30 s; output:\n{out}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the binary's "listening on http://…" line and returns the base URL.
    pub async fn wait_listening(&mut self) -> String {
        let rest = self.wait_for("listening on http://").await;
        let addr: String = rest
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect();
        format!("http://{addr}")
    }

    /// Waits for the process to exit (at most 30 s) and returns its status.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.drained().await;
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("child did not exit within 30 s; output:\n{}", self.output());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (at most 10 s, without blocking the test's runtime) until the reader threads
    /// have collected everything the exited child wrote, so that [`Proc::output`] is complete.
    pub async fn drained(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.readers.iter().all(|r| r.is_finished()) {
            assert!(
                Instant::now() < deadline,
                "the child's output pipes were not closed within 10 s of its exit"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends SIGTERM (`kill -TERM <pid>`) without waiting.
    pub fn signal_term(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(ok.success(), "kill -TERM failed");
    }

    /// Sends SIGTERM and waits for the exit.
    pub async fn term(&mut self) -> ExitStatus {
        self.signal_term();
        self.wait_exit().await
    }

    /// SIGKILL: no chance to flush.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Re-runs this test binary as a child that serves with the given environment and keeps
/// incrementing one user's prompt count (see [`usage_child_main`]).
pub fn usage_child(child_test: &str, env: &[(String, String)]) -> Proc {
    let exe = std::env::current_exe().expect("current test binary");
    Proc::start(
        &exe,
        &[
            child_test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ],
        env,
    )
}

/// The body of the child process started by [`usage_child`]: builds the app from its
/// environment exactly as `main` does, serves until SIGTERM, and meanwhile increments the
/// prompt count of user `PERSIST_CHILD_TOKEN` every 10 ms, printing `ACK n` after each
/// increment (the change is in memory, as acknowledged as a proxied request's usage is), and
/// `DONE n` after `PERSIST_CHILD_STEPS` increments (0 = forever).
pub async fn usage_child_main() {
    let Ok(token) = std::env::var("PERSIST_CHILD_TOKEN") else {
        return; // Run directly by `cargo test -- --ignored`: nothing to do.
    };
    let steps: u64 = std::env::var("PERSIST_CHILD_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_ansi(false)
        .try_init();
    // The process arguments are the test harness's, so the configuration comes from the
    // environment alone, as for the binary started without flags.
    let config = llm_gatekeeper::Config::from_args(["llm-gatekeeper"], std::env::vars())
        .expect("child config");
    let state = llm_gatekeeper::AppState::build(config)
        .await
        .expect("child state");
    if !state.users.contains(&token) {
        state.users.upsert(llm_gatekeeper::users::User::new(
            token.clone(),
            llm_gatekeeper::users::UserType::Normal,
            Default::default(),
            1,
        ));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    // Installed before the "listening" line, after which the test may send SIGTERM.
    let shutdown = llm_gatekeeper::shutdown_signal();
    println!(
        "listening on http://{}",
        listener.local_addr().expect("addr")
    );
    let users = state.users.clone();
    tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            let count = users
                .update(&token, |u| {
                    u.prompt_count += 1;
                    u.prompt_count
                })
                .expect("user exists");
            n += 1;
            println!("ACK {count}");
            if steps > 0 && n >= steps {
                println!("DONE {count}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    llm_gatekeeper::serve(state, listener, shutdown)
        .await
        .expect("serve");
    println!("CHILD EXITED CLEANLY");
}

/// The last `ACK n` a child printed.
pub fn last_ack(output: &str) -> u64 {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("ACK "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}
