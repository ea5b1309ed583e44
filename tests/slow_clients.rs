//! Slow and greedy clients cannot starve the others (issue 12). With `axum::serve` there were
//! no timers and no caps: connections trickling header bytes, a slow body or an idle keep-alive
//! stayed open for good, and one address could open connections until the process ran out of
//! files. Each test configures small limits, waits for conditions in bounded loops (never for
//! a fixed time), and checks that a long streamed response is never cut by a client timer.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::upstream::{openai_chat_chunk, FakeUpstream, Reply};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The longest any single wait may take before the test fails (never reached when it passes).
const BOUND: Duration = Duration::from_secs(20);

async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(source.parse().expect("ip"), 0))
        .expect("bind source address");
    socket.connect(to).await.expect("connect")
}

/// Sends one request on `s` and reads its answer head; returns the status.
async fn request_on(s: &mut TcpStream, path: &str) -> u16 {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .await
        .expect("request sent");
    let mut got = Vec::new();
    tokio::time::timeout(BOUND, async {
        let mut buf = [0u8; 1024];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed before an answer");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("an answer");
    let text = String::from_utf8_lossy(&got);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status")
}

async fn streaming_proxy(fake: &FakeUpstream, extra: &[&str]) -> common::TestApp {
    let mut args = vec![
        "--openai-key",
        "sk-op",
        "--openai-base-url",
        &fake.url,
        "--text-model-rate-limit",
        "0",
    ];
    args.extend_from_slice(extra);
    common::spawn(&args, &[]).await
}

#[tokio::test]
async fn trickled_headers_are_cut_while_a_longer_stream_completes() {
    let fake = FakeUpstream::start().await;
    let app = streaming_proxy(&fake, &["--client-header-timeout-secs", "1"]).await;

    // A streamed response starts first, and lives on past the header deadline.
    let (reply, gate) = Reply::gated();
    fake.push(reply);
    let first = openai_chat_chunk("gpt-4o-mini", "first");
    gate.send(first.clone());
    let mut stream = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", app.url))
        .json(
            &json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .expect("stream starts");
    assert_eq!(stream.status(), 200);
    let mut got = String::new();
    while !got.contains(&first) {
        let c = tokio::time::timeout(BOUND, stream.chunk())
            .await
            .expect("first chunk")
            .expect("chunk")
            .expect("not ended");
        got.push_str(&String::from_utf8_lossy(&c));
    }

    // A slowloris client: a request head that never ends, one byte at a time.
    let mut slow = TcpStream::connect(app.addr).await.expect("connect");
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        .await
        .expect("start of head");
    let (mut rd, mut wr) = slow.into_split();
    let trickle = tokio::spawn(async move {
        loop {
            if wr.write_all(b"a").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let cut = tokio::time::timeout(BOUND, async {
        let mut buf = [0u8; 256];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        cut.is_ok(),
        "a head still incomplete after the deadline was not cut"
    );
    trickle.abort();

    // The stream, older than the deadline that just cut the slow client, goes on to its end.
    for word in ["second", "third"] {
        let chunk = openai_chat_chunk("gpt-4o-mini", word);
        gate.send(chunk.clone());
        while !got.contains(&chunk) {
            let c = tokio::time::timeout(BOUND, stream.chunk())
                .await
                .expect("later chunk")
                .expect("the stream was not cut")
                .expect("not ended");
            got.push_str(&String::from_utf8_lossy(&c));
        }
    }
    gate.send("data: [DONE]\n\n");
    gate.end();
    while let Some(c) = tokio::time::timeout(BOUND, stream.chunk())
        .await
        .expect("end")
        .expect("clean end")
    {
        got.push_str(&String::from_utf8_lossy(&c));
    }
    assert!(got.contains("[DONE]"), "{got}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let app = common::spawn(&["--client-header-timeout-secs", "1"], &[]).await;
    let mut s = TcpStream::connect(app.addr).await.expect("connect");
    assert_eq!(request_on(&mut s, "/health").await, 200);
    // Nothing more is sent: the server closes the idle connection.
    common::read_until_closed(&mut s).await;
}

#[tokio::test]
async fn a_keep_alive_connection_that_keeps_asking_is_not_cut() {
    // The header timeout counts from the end of each response, not from the connection's
    // start: requests 0.3 s apart over 4.5 s, with a 2 s timeout, all get their answer on the
    // same connection.
    let app = common::spawn(&["--client-header-timeout-secs", "2"], &[]).await;
    let mut s = TcpStream::connect(app.addr).await.expect("connect");
    for _ in 0..15 {
        assert_eq!(request_on(&mut s, "/health").await, 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(request_on(&mut s, "/health").await, 200);
}

#[tokio::test]
async fn a_stalled_request_body_is_dropped() {
    let app = common::spawn(
        &[
            "--client-body-timeout-secs",
            "1",
            "--client-header-timeout-secs",
            "60",
        ],
        &[],
    )
    .await;
    let mut s = TcpStream::connect(app.addr).await.expect("connect");
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\":",
    )
    .await
    .expect("head and start of body");
    // The rest never comes; the server gives up on the body and closes the connection.
    common::read_until_closed(&mut s).await;
}

#[tokio::test]
async fn connections_over_the_per_address_cap_are_closed_while_others_are_served() {
    let app = common::spawn(
        &[
            "--max-connections-per-ip",
            "3",
            "--client-header-timeout-secs",
            "60",
        ],
        &[],
    )
    .await;
    // Three keep-alive connections from 127.0.0.2, each served once and then left open.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = connect_from("127.0.0.2", app.addr).await;
        assert_eq!(request_on(&mut s, "/health").await, 200);
        held.push(s);
    }
    // A fourth from the same address is closed at once, without an answer.
    let mut extra = connect_from("127.0.0.2", app.addr).await;
    let _ = extra
        .write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    assert!(common::read_until_closed(&mut extra).await.is_empty());
    // Another address is served, and so are the held connections.
    let mut other = connect_from("127.0.0.3", app.addr).await;
    assert_eq!(request_on(&mut other, "/health").await, 200);
    assert_eq!(request_on(&mut held[0], "/health").await, 200);
    // When one of the three closes, its place is given back.
    drop(held.pop());
    let mut served = false;
    for _ in 0..200 {
        let mut s = connect_from("127.0.0.2", app.addr).await;
        if s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .is_ok()
        {
            let mut buf = [0u8; 64];
            if let Ok(Ok(n)) = tokio::time::timeout(BOUND, s.read(&mut buf)).await {
                if n > 0 && buf.starts_with(b"HTTP/1.1 200") {
                    served = true;
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(served, "a freed place is not given back");
}

#[tokio::test]
async fn the_global_cap_closes_the_excess_and_frees_places() {
    let app = common::spawn(
        &[
            "--max-connections",
            "2",
            "--max-connections-per-ip",
            "0",
            "--client-header-timeout-secs",
            "60",
        ],
        &[],
    )
    .await;
    let mut a = connect_from("127.0.0.4", app.addr).await;
    assert_eq!(request_on(&mut a, "/health").await, 200);
    let mut b = connect_from("127.0.0.5", app.addr).await;
    assert_eq!(request_on(&mut b, "/health").await, 200);
    let mut c = connect_from("127.0.0.6", app.addr).await;
    let _ = c
        .write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    assert!(common::read_until_closed(&mut c).await.is_empty());
    assert_eq!(request_on(&mut a, "/health").await, 200);
}
