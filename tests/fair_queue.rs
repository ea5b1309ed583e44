//! The fair queue as users notice it (issue 16): two users hammering one rate-limited key are
//! served in turn; a user's second request waits while another user's goes
//! (`USER_CONCURRENCY_LIMIT`); a waiting stream gets heartbeat comments and then its answer;
//! `QUEUE_TIMEOUT_SECS` ends a wait with 503 and `Retry-After`; a client that leaves is out
//! of the queue at once; special users are exempt from the concurrency limit.
//!
//! The fake OpenAI upstream allows one request per window on its one key (like a real
//! requests-per-minute limit, scaled down) and answers the rest 429 with `retry-after-ms`;
//! it checks the operator's key like the real one.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use common::quota::{add_user, eventually, ADMIN_KEY};
use common::TestApp;
use futures::StreamExt;
use llm_gatekeeper::users::UserType;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

const KEY: &str = "sk-queue-operator";
const MODEL: &str = "gpt-3.5-turbo";
const FAMILY: &str = "turbo";

struct Fake {
    /// Milliseconds of one rate-limit window (0: no limit).
    window_ms: AtomicU64,
    /// While set, every request is answered 429 (the key is spent for a long time).
    always_429: AtomicBool,
    /// While set, every request is answered OpenAI's 429 `insufficient_quota`.
    spent: AtomicBool,
    /// When the current window started.
    window_start: Mutex<Option<tokio::time::Instant>>,
    /// The `user` of every request answered 200, in order.
    served: Mutex<Vec<String>>,
    /// The `user` of every request that arrived, in order.
    arrived: Mutex<Vec<String>>,
    /// Requests whose prompt is "hold" wait for a permit here.
    hold: Semaphore,
}

impl Fake {
    fn served(&self) -> Vec<String> {
        self.served.lock().expect("lock").clone()
    }
    fn arrived(&self, user: &str) -> usize {
        self.arrived
            .lock()
            .expect("lock")
            .iter()
            .filter(|u| *u == user)
            .count()
    }
}

async fn chat(State(f): State<Arc<Fake>>, h: HeaderMap, Json(body): Json<Value>) -> Response {
    if h.get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {KEY}")) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}})),
        )
            .into_response();
    }
    let user = body["user"].as_str().unwrap_or("-").to_string();
    f.arrived.lock().expect("lock").push(user.clone());
    let limited = |retry_ms: u64| {
        (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after-ms", retry_ms.to_string())],
            Json(json!({"error": {"message": "Rate limit reached for requests", "type": "requests", "code": "rate_limit_exceeded"}})),
        )
            .into_response()
    };
    if f.spent.load(Ordering::SeqCst) {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            Json(json!({"error": {"message": "You exceeded your current quota, please check your plan and billing details.", "type": "insufficient_quota", "param": null, "code": "insufficient_quota"}})),
        )
            .into_response();
    }
    if f.always_429.load(Ordering::SeqCst) {
        return limited(60_000);
    }
    let window = Duration::from_millis(f.window_ms.load(Ordering::SeqCst));
    if !window.is_zero() {
        let now = tokio::time::Instant::now();
        let mut start = f.window_start.lock().expect("lock");
        match *start {
            Some(s) if now < s + window => {
                return limited((s + window - now).as_millis() as u64 + 1);
            }
            _ => *start = Some(now),
        }
    }
    if body["messages"][0]["content"] == "hold" {
        if let Ok(permit) = f.hold.acquire().await {
            permit.forget();
        }
    }
    f.served.lock().expect("lock").push(user.clone());
    if body["stream"] == true {
        let chunk = json!({"id": "c1", "object": "chat.completion.chunk", "model": MODEL,
            "choices": [{"index": 0, "delta": {"content": format!("hi {user}")}, "finish_reason": null}]});
        let sse = format!("data: {chunk}\n\ndata: [DONE]\n\n");
        return ([("content-type", "text/event-stream")], sse).into_response();
    }
    Json(common::upstream::openai_chat_json(
        MODEL,
        &format!("hi {user}"),
    ))
    .into_response()
}

async fn fake(window_ms: u64) -> (Arc<Fake>, String, tokio::task::JoinHandle<()>) {
    let f = Arc::new(Fake {
        window_ms: AtomicU64::new(window_ms),
        always_429: AtomicBool::new(false),
        spent: AtomicBool::new(false),
        window_start: Mutex::new(None),
        served: Mutex::new(Vec::new()),
        arrived: Mutex::new(Vec::new()),
        hold: Semaphore::new(0),
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .with_state(f.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let handle = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (f, url, handle)
}

async fn proxy(url: &str, extra: &[&str]) -> TestApp {
    let mut args = vec![
        "--gatekeeper",
        "user_token",
        "--admin-key",
        ADMIN_KEY,
        "--openai-key",
        KEY,
        "--openai-base-url",
        url,
    ];
    args.extend_from_slice(extra);
    let app = common::spawn(&args, &[]).await;
    for u in ["alice", "bob"] {
        add_user(&app, u, UserType::Normal, &[]);
    }
    add_user(&app, "vip", UserType::Special, &[]);
    app
}

fn chat_body(user: &str, prompt: &str, stream: bool) -> Value {
    json!({"model": MODEL, "user": user, "stream": stream,
        "messages": [{"role": "user", "content": prompt}]})
}

async fn ask(c: &reqwest::Client, app: &TestApp, user: &str, prompt: &str) -> reqwest::Response {
    c.post(format!("{}/v1/chat/completions", app.url))
        .bearer_auth(user)
        .json(&chat_body(user, prompt, false))
        .send()
        .await
        .expect("request reaches the proxy")
}

/// The info page's numbers of the family (`proomptersInQueue`, `estimatedQueueTime`).
async fn info(c: &reqwest::Client, app: &TestApp) -> Value {
    let v: Value = c
        .get(format!("{}/", app.url))
        .header("accept", "application/json")
        .send()
        .await
        .expect("info")
        .json()
        .await
        .expect("json");
    v[FAMILY].clone()
}

/// Waits (bounded) until the info page shows `n` requests of the family waiting.
async fn queued(c: &reqwest::Client, app: &TestApp, n: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let v = info(c, app).await;
        if v["proomptersInQueue"] == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {n} queued: {v}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads a response stream until its text contains `needle`; returns the text so far.
async fn read_until(
    body: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    needle: &str,
) -> String {
    let mut text = String::new();
    while !text.contains(needle) {
        let chunk = body.next().await.expect("stream open").expect("chunk");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    text
}

/// Reads the rest of a response stream into `text`.
async fn read_to_end(
    body: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    text: &mut String,
) {
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
    }
}

/// The fake stops answering 429 and a check marks its one key working again.
fn free_the_key(fake: &Fake, app: &TestApp) {
    fake.always_429.store(false, Ordering::SeqCst);
    app.state
        .upstreams
        .provider(llm_gatekeeper::providers::Provider::OpenAi)
        .keys
        .apply_check(
            0,
            llm_gatekeeper::proxy::keys::CheckResult::status(
                llm_gatekeeper::proxy::keys::KeyStatus::Working,
            ),
        );
}

#[tokio::test]
async fn two_users_hammering_one_rate_limited_key_are_served_in_turn() {
    // One request per 400 ms on the one key; both users send 3 requests, one after the other.
    let (fake, url, _h) = fake(400).await;
    let app = proxy(&url, &[]).await;
    let c = reqwest::Client::new();
    let run = |user: &'static str| {
        let (c, url) = (c.clone(), app.url.clone());
        tokio::spawn(async move {
            for i in 0..3 {
                let r = c
                    .post(format!("{url}/v1/chat/completions"))
                    .bearer_auth(user)
                    .json(&chat_body(user, &format!("q{i}"), false))
                    .send()
                    .await
                    .expect("sent");
                let status = r.status();
                let v: Value = r.json().await.expect("json");
                assert_eq!(
                    status, 200,
                    "{user} request {i} waits for the key, not fails: {v}"
                );
                assert_eq!(v["choices"][0]["message"]["content"], format!("hi {user}"));
            }
        })
    };
    let (a, b) = (run("alice"), run("bob"));
    a.await.expect("alice");
    b.await.expect("bob");
    let served = fake.served();
    assert_eq!(served.len(), 6, "{served:?}");
    for pair in served.windows(2) {
        assert_ne!(
            pair[0], pair[1],
            "served in turn, never twice in a row: {served:?}"
        );
    }
    // The waits were measured: the info page shows a moving average of them.
    let v = info(&c, &app).await;
    assert_eq!(v["proomptersInQueue"], 0, "{v}");
    assert!(v["estimatedQueueTime"].is_string(), "{v}");
}

#[tokio::test]
async fn a_users_second_request_waits_while_another_users_goes() {
    let (fake, url, _h) = fake(0).await;
    let app = proxy(&url, &["--user-concurrency-limit", "1"]).await;
    let c = reqwest::Client::new();
    let first = tokio::spawn({
        let (c, app_url) = (c.clone(), app.url.clone());
        async move {
            c.post(format!("{app_url}/v1/chat/completions"))
                .bearer_auth("alice")
                .json(&chat_body("alice", "hold", false))
                .send()
                .await
                .expect("sent")
                .status()
        }
    });
    eventually("alice's first request at the upstream", || {
        fake.arrived("alice") == 1
    })
    .await;
    let second = tokio::spawn({
        let (c, app_url) = (c.clone(), app.url.clone());
        async move {
            c.post(format!("{app_url}/v1/chat/completions"))
                .bearer_auth("alice")
                .json(&chat_body("alice", "second", false))
                .send()
                .await
                .expect("sent")
                .status()
        }
    });
    queued(&c, &app, 1).await;
    // Bob is not held up by Alice's requests.
    let r = ask(&c, &app, "bob", "hello").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        fake.arrived("alice"),
        1,
        "alice's second request waits for her first"
    );
    assert_eq!(info(&c, &app).await["proomptersInQueue"], 1);
    // Her first ends: the second goes.
    fake.hold.add_permits(1);
    assert_eq!(first.await.expect("first"), 200);
    assert_eq!(second.await.expect("second"), 200);
    assert_eq!(fake.arrived("alice"), 2);
    queued(&c, &app, 0).await;
}

#[tokio::test]
async fn special_users_are_exempt_from_the_concurrency_limit() {
    let (fake, url, _h) = fake(0).await;
    let app = proxy(&url, &[]).await;
    let c = reqwest::Client::new();
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (c, app_url) = (c.clone(), app.url.clone());
            tokio::spawn(async move {
                c.post(format!("{app_url}/v1/chat/completions"))
                    .bearer_auth("vip")
                    .json(&chat_body("vip", "hold", false))
                    .send()
                    .await
                    .expect("sent")
                    .status()
            })
        })
        .collect();
    eventually(
        "both of the special user's requests at the upstream",
        || fake.arrived("vip") == 2,
    )
    .await;
    fake.hold.add_permits(2);
    for h in held {
        assert_eq!(h.await.expect("request"), 200);
    }
}

/// Rests the key: a request answered 429 while the fake is spent. Returns its task (it waits
/// in the queue itself until `QUEUE_TIMEOUT_SECS`).
async fn rest_the_key(
    fake: &Fake,
    c: &reqwest::Client,
    app: &TestApp,
) -> tokio::task::JoinHandle<reqwest::Response> {
    fake.always_429.store(true, Ordering::SeqCst);
    let task = tokio::spawn({
        let (c, app_url) = (c.clone(), app.url.clone());
        async move {
            c.post(format!("{app_url}/v1/chat/completions"))
                .bearer_auth("bob")
                .json(&chat_body("bob", "rest", false))
                .send()
                .await
                .expect("sent")
        }
    });
    queued(c, app, 1).await;
    task
}

#[tokio::test]
async fn a_waiting_stream_gets_heartbeats_then_its_answer() {
    let (fake, url, _h) = fake(0).await;
    let app = proxy(&url, &["--heartbeat-interval-sec", "1"]).await;
    let c = reqwest::Client::new();
    let resting = rest_the_key(&fake, &c, &app).await;
    let resp = c
        .post(format!("{}/v1/chat/completions", app.url))
        .bearer_auth("alice")
        .json(&chat_body("alice", "stream me", true))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200, "the head comes at once");
    assert!(resp.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .starts_with("text/event-stream"));
    let mut body = resp.bytes_stream();
    let mut text = read_until(&mut body, ": queue heartbeat").await;
    assert!(text.starts_with(": joining queue at position 2"), "{text}");
    assert_eq!(fake.arrived("alice"), 0, "still waiting");
    // The key works again: the waiting requests go (the resting one probes first).
    free_the_key(&fake, &app);
    read_to_end(&mut body, &mut text).await;
    assert!(text.contains("hi alice"), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(resting.await.expect("resting").status(), 200);
}

#[tokio::test]
async fn queue_timeout_answers_503_with_retry_after() {
    let (fake, url, _h) = fake(0).await;
    let app = proxy(&url, &["--queue-timeout-secs", "1"]).await;
    let c = reqwest::Client::new();
    fake.always_429.store(true, Ordering::SeqCst);
    // Its own 429 rested the only key; it waited, then got the 503.
    let r = ask(&c, &app, "alice", "hello").await;
    assert_eq!(r.status(), 503);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!(retry >= 1);
    let v: Value = r.json().await.expect("json");
    let msg = v["error"]["message"].as_str().expect("message");
    assert!(
        msg.contains("QUEUE_TIMEOUT_SECS") && msg.contains("try again"),
        "{msg}"
    );
    // A request arriving while the key rests waits in the queue, then gets the same answer.
    let r = ask(&c, &app, "bob", "hello").await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(fake.arrived("bob"), 0, "never sent: every key rests");
    // A waiting stream ends with the error as an SSE event in the client's format.
    let r = c
        .post(format!("{}/v1/chat/completions", app.url))
        .bearer_auth("bob")
        .json(&chat_body("bob", "stream", true))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("body");
    let event = text
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("an error event");
    let v: Value = serde_json::from_str(event).expect("json event");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("QUEUE_TIMEOUT_SECS")),
        "{text}"
    );
    queued(&c, &app, 0).await;
}

#[tokio::test]
async fn a_client_that_leaves_is_out_of_the_queue_at_once() {
    let (fake, url, _h) = fake(0).await;
    let app = proxy(&url, &["--queue-timeout-secs", "600"]).await;
    let c = reqwest::Client::new();
    let resting = rest_the_key(&fake, &c, &app).await;
    // A plain request waiting for its answer, and a stream reading its heartbeats.
    let leaving = tokio::spawn({
        let (c, app_url) = (c.clone(), app.url.clone());
        async move {
            let _ = c
                .post(format!("{app_url}/v1/chat/completions"))
                .bearer_auth("alice")
                .json(&chat_body("alice", "hello", false))
                .send()
                .await;
        }
    });
    queued(&c, &app, 2).await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let leaving_stream = tokio::spawn({
        let (c, app_url) = (c.clone(), app.url.clone());
        async move {
            let r = c
                .post(format!("{app_url}/v1/chat/completions"))
                .bearer_auth("vip")
                .json(&chat_body("vip", "hello", true))
                .send()
                .await
                .expect("sent");
            let mut body = r.bytes_stream();
            let _ = body.next().await;
            let _ = tx.send(());
            std::future::pending::<()>().await;
            drop(body);
        }
    });
    rx.await.expect("the stream joined the queue");
    queued(&c, &app, 3).await;
    leaving.abort();
    queued(&c, &app, 2).await;
    leaving_stream.abort();
    queued(&c, &app, 1).await;
    resting.abort();
    queued(&c, &app, 0).await;
    assert_eq!(fake.arrived("alice") + fake.arrived("vip"), 0);
    // Nothing is left behind: both users are served at once when the key works again.
    free_the_key(&fake, &app);
    assert_eq!(ask(&c, &app, "alice", "again").await.status(), 200);
    assert_eq!(ask(&c, &app, "bob", "again").await.status(), 200);
}

#[tokio::test]
async fn a_key_over_quota_leaves_rotation_and_never_makes_requests_wait() {
    let (fake, url, _h) = fake(0).await;
    let app = proxy(&url, &["--queue-timeout-secs", "600"]).await;
    let c = reqwest::Client::new();
    fake.spent.store(true, Ordering::SeqCst);
    // Bounded only so that a broken queue cannot hang the test: the answer comes at once.
    let r = tokio::time::timeout(Duration::from_secs(30), ask(&c, &app, "alice", "hello"))
        .await
        .expect("no wait for a key over quota");
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.expect("json");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("over its quota")),
        "{v}"
    );
    let r = tokio::time::timeout(Duration::from_secs(30), ask(&c, &app, "bob", "hello"))
        .await
        .expect("no wait");
    assert_eq!(r.status(), 503);
    assert_eq!(fake.arrived("bob"), 0, "the spent key is out of rotation");
    let v = info(&c, &app).await;
    assert_eq!(
        (v["overQuotaKeys"].clone(), v["proomptersInQueue"].clone()),
        (json!(1), json!(0)),
        "{v}"
    );
}

#[tokio::test]
async fn a_stream_rate_limited_on_its_own_attempt_waits_with_heartbeats() {
    let (fake, url, _h) = fake(0).await;
    let app = proxy(&url, &["--heartbeat-interval-sec", "1"]).await;
    let c = reqwest::Client::new();
    fake.always_429.store(true, Ordering::SeqCst);
    let resp = c
        .post(format!("{}/v1/chat/completions", app.url))
        .bearer_auth("alice")
        .json(&chat_body("alice", "stream me", true))
        .send()
        .await
        .expect("sent");
    assert_eq!(
        resp.status(),
        200,
        "not the 429: the stream waits for the key"
    );
    let mut body = resp.bytes_stream();
    let mut text = read_until(&mut body, ": queue heartbeat").await;
    assert_eq!(fake.arrived("alice"), 1);
    free_the_key(&fake, &app);
    read_to_end(&mut body, &mut text).await;
    assert!(text.contains("hi alice"), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(fake.arrived("alice"), 2, "sent again once the key was free");
    queued(&c, &app, 0).await;
}

#[tokio::test]
async fn queue_length_and_waits_are_in_the_metrics() {
    use prometheus_parse::{Scrape, Value as PromValue};
    const METRICS_KEY: &str = "queue-metrics-key-0123456789abcdef";
    let (fake, url, _h) = fake(0).await;
    let app = proxy(
        &url,
        &["--queue-timeout-secs", "600", "--metrics-key", METRICS_KEY],
    )
    .await;
    let c = reqwest::Client::new();
    let resting = rest_the_key(&fake, &c, &app).await;
    let scrape = || async {
        let text = c
            .get(format!("{}/metrics", app.url))
            .bearer_auth(METRICS_KEY)
            .send()
            .await
            .expect("scrape")
            .text()
            .await
            .expect("body");
        let parsed = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parses");
        (text, parsed)
    };
    let sample = |s: &Scrape, metric: &str| {
        s.samples
            .iter()
            .find(|x| x.metric == metric && x.labels.get("family") == Some(FAMILY))
            .map(|x| x.value.clone())
    };
    let (_, s) = scrape().await;
    assert!(
        matches!(sample(&s, "gatekeeper_queue_length"), Some(PromValue::Gauge(v)) if v == 1.0),
        "one request waits: {:?}",
        sample(&s, "gatekeeper_queue_length")
    );
    // Its client leaves: the queue is empty and its wait is recorded.
    resting.abort();
    queued(&c, &app, 0).await;
    let (text, s) = scrape().await;
    assert!(
        matches!(sample(&s, "gatekeeper_queue_length"), Some(PromValue::Gauge(v)) if v == 0.0),
        "{text}"
    );
    match sample(&s, "gatekeeper_queue_wait_seconds") {
        Some(PromValue::Histogram(buckets)) => {
            let count = buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .map_or(0.0, |b| b.count);
            assert!(count >= 1.0, "{text}");
        }
        other => panic!("no wait histogram: {other:?}\n{text}"),
    }
    for secret in [KEY, "alice", "bob", "127.0.0.1"] {
        assert!(!text.contains(secret), "{secret} in the metrics");
    }
}
