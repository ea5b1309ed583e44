//! Bodies of unauthenticated requests are bounded where they are read (issue 12): a form that
//! anyone may post (`/user`, `/user/nickname`, `/admin/login`) is refused with 413 once it
//! passes a few KB, and a request with no credential is refused before its body is read. Each
//! test declares a 100 MB body, sends only the first few KB and gets its answer: the server did
//! not wait for (or buffer) the rest. Before, `/user` read the whole body before any check.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DECLARED: usize = 100 * 1024 * 1024;

/// Sends a request head declaring `DECLARED` bytes of body, then `sent` bytes of it, and returns
/// the status of the answer (bounded wait: the test fails rather than hangs).
async fn post_partial(addr: SocketAddr, path: &str, extra: &str, sent: usize) -> u16 {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {DECLARED}\r\n{extra}\r\n"
    );
    s.write_all(head.as_bytes()).await.expect("head sent");
    let mut body = b"token=".to_vec();
    body.resize(sent, b'a');
    s.write_all(&body).await.expect("start of body sent");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "{path}: no answer before the body was complete"
    );
    let text = String::from_utf8_lossy(&buf);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{path}: no status line in {text:?}"))
}

#[tokio::test]
async fn public_forms_refuse_a_large_body_early() {
    let app = common::spawn(
        &[
            "--gatekeeper",
            "user_token",
            "--admin-key",
            common::web::ADMIN_KEY,
        ],
        &[],
    )
    .await;
    for path in ["/user", "/user/nickname", "/admin/login"] {
        assert_eq!(
            post_partial(app.addr, path, "", 20 * 1024).await,
            413,
            "{path}"
        );
    }
    // A normal form still gets through to its checks (here: the CSRF token is missing).
    let r = reqwest::Client::new()
        .post(format!("{}/user", app.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("token=x")
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 403);
}

#[tokio::test]
async fn a_request_without_credential_is_refused_before_its_body_is_read() {
    let app = common::spawn(
        &[
            "--gatekeeper",
            "user_token",
            "--admin-key",
            common::web::ADMIN_KEY,
        ],
        &[],
    )
    .await;
    assert_eq!(
        post_partial(app.addr, "/v1/chat/completions", "", 20 * 1024).await,
        401
    );
    assert_eq!(
        post_partial(app.addr, "/admin/users", "", 20 * 1024).await,
        401
    );
    assert_eq!(
        post_partial(
            app.addr,
            "/v1/chat/completions",
            "Authorization: Bearer not-a-user\r\n",
            20 * 1024
        )
        .await,
        401
    );
}
