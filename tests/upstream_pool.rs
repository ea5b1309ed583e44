//! Upstream connections are kept alive and reused (issue 18, `proxy::pool`): what an operator
//! sees from the provider's side. Sequential requests through the real server reach the
//! upstream over one TCP connection, and when the upstream closes an idle connection (as
//! providers do after a while), the next request still succeeds on a new one.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const KEY: &str = "sk-op-pool";

/// A fake OpenAI chat endpoint on raw TCP, so that it can count connections and close them
/// the way an upstream does (after an answer, without announcing `Connection: close`).
struct RawUpstream {
    url: String,
    accepted: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

impl RawUpstream {
    async fn start(close_after_each: bool) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (a, c) = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    while let Some((head, body)) = read_request(&mut sock).await {
                        let answer = answer(&head, &body);
                        if sock.write_all(answer.as_bytes()).await.is_err() || close_after_each {
                            break;
                        }
                    }
                    drop(sock);
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        RawUpstream {
            url,
            accepted,
            closed,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Reads one request (head, and a `content-length` body); `None` when the connection ends.
async fn read_request(sock: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    Some((head, buf[head_end..head_end + len].to_vec()))
}

/// What OpenAI checks (path, the operator's key, a JSON body with a model), then a chat
/// completion with usage; a JSON 4xx otherwise.
fn answer(head: &str, body: &[u8]) -> String {
    let ok_path = head.starts_with("post /v1/chat/completions http/1.1\r\n");
    let ok_key = head.contains(&format!("authorization: bearer {}\r\n", KEY.to_lowercase()));
    let model = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["model"].as_str().map(str::to_string));
    let (status, body) = match (ok_path, ok_key, model) {
        (false, _, _) => (
            "404 Not Found",
            json!({"error": {"message": "unknown path"}}),
        ),
        (_, false, _) => (
            "401 Unauthorized",
            json!({"error": {"message": "bad key", "code": "invalid_api_key"}}),
        ),
        (_, _, None) => ("400 Bad Request", json!({"error": {"message": "no model"}})),
        (true, true, Some(model)) => (
            "200 OK",
            json!({
                "id": "chatcmpl-pool", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "pong"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
            }),
        ),
    };
    let body = body.to_string();
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// The server, with the per-address rate limit out of the way of 20 quick requests.
async fn app(upstream: &RawUpstream) -> common::TestApp {
    common::spawn(
        &[
            "--openai-key",
            KEY,
            "--openai-base-url",
            &upstream.url,
            "--text-model-rate-limit",
            "0",
        ],
        &[],
    )
    .await
}

async fn chat(client: &reqwest::Client, app: &common::TestApp) -> (u16, Value) {
    let resp = client
        .post(format!("{}/v1/chat/completions", app.url))
        .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "ping"}]}))
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("JSON answer"))
}

#[tokio::test]
async fn sequential_requests_reach_the_upstream_over_one_connection() {
    let upstream = RawUpstream::start(false).await;
    let app = app(&upstream).await;
    let client = reqwest::Client::new();
    for _ in 0..20 {
        let (status, body) = chat(&client, &app).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["message"]["content"], "pong");
    }
    assert_eq!(
        upstream.accepted(),
        1,
        "20 sequential requests should reuse one upstream connection"
    );
}

#[tokio::test]
async fn a_request_after_the_upstream_closed_its_idle_connection_succeeds() {
    let upstream = RawUpstream::start(true).await;
    let app = app(&upstream).await;
    let client = reqwest::Client::new();
    for round in 1..=3 {
        let (status, body) = chat(&client, &app).await;
        assert_eq!(status, 200, "round {round}: {body}");
        assert_eq!(body["choices"][0]["message"]["content"], "pong");
        // Wait (bounded) until the upstream has hung up on the connection it answered on.
        for _ in 0..2000 {
            if upstream.closed.load(Ordering::SeqCst) >= round {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(upstream.closed.load(Ordering::SeqCst), round);
    }
    assert_eq!(upstream.accepted(), 3, "one new connection per request");
}

/// An upstream that answers each request with `answer` and then closes the connection.
async fn fixed_upstream(answer: &'static [u8]) -> RawUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let accepted = Arc::new(AtomicUsize::new(0));
    let a = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if read_request(&mut sock).await.is_some() {
                    let _ = sock.write_all(answer).await;
                }
            });
        }
    });
    RawUpstream {
        url,
        accepted,
        closed: Arc::new(AtomicUsize::new(0)),
    }
}

/// An upstream whose answer is not valid HTTP/1.1 (two different lengths, a broken chunk
/// size, not HTTP at all): the client gets a 502 with a JSON error, not a half-read answer.
/// A chunked answer that is valid reaches the client whole.
#[tokio::test]
async fn an_answer_that_is_not_valid_http_is_a_502_with_a_json_error() {
    let client = reqwest::Client::new();
    for garbage in [
        &b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello"[..],
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n",
    ] {
        let upstream = fixed_upstream(garbage).await;
        let app = app(&upstream).await;
        let (status, body) = chat(&client, &app).await;
        assert_eq!(status, 502, "{}: {body}", String::from_utf8_lossy(garbage));
        assert!(
            body["error"]["message"].as_str().is_some_and(|m| m.contains("upstream")),
            "{body}"
        );
    }
    let chunked: &[u8] =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n\
        10\r\n{\"choices\":[{\"me\r\n\
        3d; ext=1\r\nssage\":{\"role\":\"assistant\",\"content\":\"pong\"}}],\"usage\":{\"prom\r\n\
        35\r\npt_tokens\":3,\"completion_tokens\":1,\"total_tokens\":4}}\r\n\
        0\r\n\r\n";
    let upstream = fixed_upstream(chunked).await;
    let app = app(&upstream).await;
    let (status, body) = chat(&client, &app).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "pong");
    assert_eq!(body["usage"]["total_tokens"], 4);
}
