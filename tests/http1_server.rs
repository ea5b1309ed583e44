//! The server's own HTTP/1.1 (issue 18, step 11: `server::conn` instead of hyper's server):
//! what a client on a raw connection sees — pipelined requests answered in order, chunked and
//! `expect: 100-continue` request bodies, HTTP/1.0, `HEAD`, and malformed heads answered with a
//! JSON 4xx before the connection closes. Every wait is bounded; nothing depends on timing.

mod common;

use std::time::Duration;

use common::upstream::FakeUpstream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BOUND: Duration = Duration::from_secs(20);

/// Reads until the server closes the connection; fails the test if it stays open.
async fn read_until_closed(s: &mut TcpStream) -> String {
    String::from_utf8_lossy(&common::read_until_closed(s).await).into_owned()
}

/// Reads until `got` holds `needle` `times` times.
async fn read_until(s: &mut TcpStream, needle: &str, times: usize) -> String {
    let mut got = Vec::new();
    tokio::time::timeout(BOUND, async {
        let mut buf = [0u8; 4096];
        while String::from_utf8_lossy(&got).matches(needle).count() < times {
            let n = s.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the expected answer within the bound");
    String::from_utf8_lossy(&got).into_owned()
}

async fn proxy(fake: &FakeUpstream) -> common::TestApp {
    common::spawn(
        &[
            "--openai-key",
            "sk-op",
            "--openai-base-url",
            &fake.url,
            "--text-model-rate-limit",
            "0",
        ],
        &[],
    )
    .await
}

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let app = common::spawn(&[], &[]).await;
    let mut s = TcpStream::connect(app.addr).await.expect("connect");
    s.write_all(
        b"GET /health HTTP/1.1\r\nHost: t\r\n\r\nGET /nope HTTP/1.1\r\nHost: t\r\n\r\nGET /health HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .await
    .expect("three requests in one write");
    let got = read_until(&mut s, "HTTP/1.1 ", 3).await;
    let statuses: Vec<&str> = got
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &got[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "404", "200"], "{got}");
}

#[tokio::test]
async fn a_request_sent_while_the_one_before_waits_for_its_upstream_is_answered_after_it() {
    // While a proxied request waits for its upstream, the server watches the connection for a
    // hang-up; a next request arriving meanwhile is kept, not taken for one, and answered after.
    let fake = FakeUpstream::start().await;
    fake.push(
        common::upstream::Reply::json(200, serde_json::json!({"first": true}))
            .delayed(Duration::from_secs(2)),
    );
    let app = proxy(&fake).await;
    let mut s = TcpStream::connect(app.addr).await.expect("connect");
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{CHAT}",
        CHAT.len()
    );
    s.write_all(request.as_bytes())
        .await
        .expect("first request");
    let deadline = std::time::Instant::now() + BOUND;
    while fake.request_count() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.write_all(request.as_bytes())
        .await
        .expect("second request");
    let got = read_until(&mut s, "\"usage\"", 1).await;
    let first = got.find("\"first\"").expect("the first answer");
    let second = got.find("\"usage\"").expect("the second answer");
    assert!(first < second, "{got}");
    assert_eq!(got.matches("HTTP/1.1 200").count(), 2, "{got}");
    assert_eq!(fake.request_count(), 2);
}

#[tokio::test]
async fn a_chunked_request_body_sent_in_pieces_reaches_the_upstream_whole() {
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake).await;
    let mut s = TcpStream::connect(app.addr).await.expect("connect");
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .await
    .expect("head");
    let (a, b) = CHAT.split_at(20);
    for piece in [a, b] {
        s.write_all(format!("{:x};ext=1\r\n{piece}\r\n", piece.len()).as_bytes())
            .await
            .expect("chunk");
        s.flush().await.expect("flush");
    }
    s.write_all(b"0\r\nx-trailer: 1\r\n\r\n")
        .await
        .expect("last chunk");
    let got = read_until(&mut s, "\"usage\"", 1).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert_eq!(fake.last_request().json()["messages"][0]["content"], "hi");
    // The connection carries the next request.
    s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("next request");
    assert!(read_until(&mut s, "OK", 1).await.contains("HTTP/1.1 200"));
}

#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake).await;
    let mut s = TcpStream::connect(app.addr).await.expect("connect");
    s.write_all(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            CHAT.len()
        )
        .as_bytes(),
    )
    .await
    .expect("head");
    let interim = read_until(&mut s, "\r\n\r\n", 1).await;
    assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(CHAT.as_bytes()).await.expect("body");
    let got = read_until(&mut s, "\"usage\"", 1).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert_eq!(fake.request_count(), 1);
}

#[tokio::test]
async fn malformed_heads_get_a_json_4xx_and_the_connection_closes() {
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake).await;
    for (head, status) in [
        (
            "POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "400",
        ),
        (
            "POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "400",
        ),
        ("GET /health HTTP/1.1\r\nBad Name: x\r\n\r\n", "400"),
        ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "505"),
    ] {
        let mut s = TcpStream::connect(app.addr).await.expect("connect");
        s.write_all(head.as_bytes()).await.expect("head");
        let got = read_until_closed(&mut s).await;
        assert!(got.starts_with(&format!("HTTP/1.1 {status}")), "{head:?}: {got}");
        assert!(got.contains("content-type: application/json"), "{got}");
        assert!(got.contains("\"error\""), "{got}");
        assert!(got.contains("connection: close"), "{got}");
    }
    assert_eq!(fake.request_count(), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn an_http_1_0_client_gets_its_answer_then_the_close() {
    let app = common::spawn(&[], &[]).await;
    let mut s = TcpStream::connect(app.addr).await.expect("connect");
    s.write_all(b"GET /health HTTP/1.0\r\n\r\n")
        .await
        .expect("request");
    let got = read_until_closed(&mut s).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.ends_with("\r\n\r\nOK"), "{got}");
    // With keep-alive asked for, the connection stays for a second request.
    let mut s = TcpStream::connect(app.addr).await.expect("connect");
    for _ in 0..2 {
        s.write_all(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await
            .expect("request");
        let got = read_until(&mut s, "OK", 1).await;
        assert!(got.contains("connection: keep-alive"), "{got}");
    }
}

#[tokio::test]
async fn head_gets_the_length_without_a_body_and_the_connection_goes_on() {
    let app = common::spawn(&[], &[]).await;
    let mut s = TcpStream::connect(app.addr).await.expect("connect");
    s.write_all(b"HEAD /health HTTP/1.1\r\nHost: t\r\n\r\nGET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("requests");
    let got = read_until(&mut s, "HTTP/1.1 200", 2).await;
    let got = if got.ends_with("OK") {
        got
    } else {
        got + &read_until(&mut s, "OK", 1).await
    };
    let (head_answer, get_answer) = got.split_at(got.rfind("HTTP/1.1 200").expect("two answers"));
    assert!(head_answer.contains("content-length: 2"), "{head_answer}");
    assert!(
        head_answer.ends_with("\r\n\r\n"),
        "no body after HEAD: {head_answer:?}"
    );
    assert!(get_answer.ends_with("\r\n\r\nOK"), "{get_answer:?}");
}

#[tokio::test]
async fn a_request_body_left_unread_closes_the_connection_after_the_answer() {
    let app = common::spawn(&[], &[]).await;
    let mut s = TcpStream::connect(app.addr).await.expect("connect");
    // The health route takes no body: most of this one is never read.
    s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\nabc")
        .await
        .expect("head and part of the body");
    let got = read_until_closed(&mut s).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.contains("connection: close"), "{got}");
    assert!(got.ends_with("\r\n\r\nOK"), "{got}");
}

#[tokio::test]
async fn large_pieces_of_a_stream_and_of_a_whole_answer_arrive_intact() {
    use common::upstream::{openai_chat_json, openai_chat_sse, Reply};
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake).await;
    let big: String = (0..40_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    // A stream with one event far larger than a socket write: chunked, written as it comes.
    fake.push(Reply::sse(openai_chat_sse(
        "gpt-4o-mini",
        &["x", &big, "y"],
        true,
    )));
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", app.url))
        .json(&serde_json::json!({
            "model": "gpt-4o-mini", "stream": true,
            "messages": [{"role": "user", "content": "hi"}]
        }))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("transfer-encoding")
            .and_then(|v| v.to_str().ok()),
        Some("chunked")
    );
    let text = resp.text().await.expect("whole stream");
    assert!(text.contains(&big), "the large event arrived whole");
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "{}",
        &text[text.len() - 50..]
    );
    // A whole answer larger than a socket write: with its length.
    fake.push(Reply::json(200, openai_chat_json("gpt-4o-mini", &big)));
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", app.url))
        .json(&serde_json::json!({
            "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]
        }))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    let declared = resp.content_length();
    let body = resp.bytes().await.expect("whole answer");
    assert_eq!(declared, Some(body.len() as u64));
    let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(v["choices"][0]["message"]["content"], big.as_str());
}

#[tokio::test]
async fn a_head_sent_a_byte_at_a_time_is_answered() {
    let app = common::spawn(&[], &[]).await;
    let mut s = TcpStream::connect(app.addr).await.expect("connect");
    for b in b"GET /health HTTP/1.1\r\nHost: t\r\nX-Long: 0123456789\r\n\r\n" {
        s.write_all(&[*b]).await.expect("one byte");
        s.flush().await.expect("flush");
    }
    assert!(read_until(&mut s, "OK", 1)
        .await
        .starts_with("HTTP/1.1 200"));
}

/// Reads one response with a `content-length` from `s` (whatever follows stays unread in
/// `pending`): its head and its body.
async fn read_response(s: &mut TcpStream, pending: &mut Vec<u8>) -> (String, String) {
    tokio::time::timeout(BOUND, async {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&pending[..end]).into_owned();
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().ok())?
                    })
                    .expect("a content-length");
                if pending.len() >= end + 4 + length {
                    let body =
                        String::from_utf8_lossy(&pending[end + 4..end + 4 + length]).into_owned();
                    pending.drain(..end + 4 + length);
                    return (head, body);
                }
            }
            let n = s.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(pending));
            pending.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("a whole response within the bound")
}

#[tokio::test]
async fn many_kept_alive_connections_at_once_each_get_their_own_answers_whole() {
    // The last write of a kept-alive response and the upstream request are held to the end of
    // the worker's batch of ready tasks (`sock::outbox`): with many connections ready at once,
    // every answer still reaches its own connection, whole and in order.
    let responder: common::upstream::Responder = std::sync::Arc::new(|req| {
        let body = req.json();
        let text = body["messages"][0]["content"].as_str().unwrap_or("?");
        common::upstream::Reply::json(
            200,
            common::upstream::openai_chat_json("gpt-4o-mini", &format!("echo {text}")),
        )
    });
    let fake = FakeUpstream::start_with(responder).await;
    let app = proxy(&fake).await;
    const CONNECTIONS: usize = 16;
    const REQUESTS: usize = 8;
    let mut clients = Vec::new();
    for c in 0..CONNECTIONS {
        let addr = app.addr;
        clients.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let mut pending = Vec::new();
            for r in 0..REQUESTS {
                let body = format!(
                    r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"c{c} r{r}"}}]}}"#
                );
                let request = format!(
                    "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(request.as_bytes()).await.expect("request");
                let (head, body) = read_response(&mut s, &mut pending).await;
                assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
                let json: serde_json::Value = serde_json::from_str(&body).expect("a whole JSON body");
                assert_eq!(
                    json["choices"][0]["message"]["content"],
                    format!("echo c{c} r{r}"),
                    "connection {c} got another's answer"
                );
            }
            assert!(pending.is_empty(), "bytes nobody asked for");
        }));
    }
    for client in clients {
        client.await.expect("client");
    }
    assert_eq!(fake.request_count(), CONNECTIONS * REQUESTS);
}
