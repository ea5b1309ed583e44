//! The real binary: each invalid configuration stops startup with a non-zero exit and one
//! line naming the variable; SIGTERM on a running server lets an in-flight stream finish and
//! exits 0.

mod common;

use std::process::Stdio;

use common::binary::{command, wait_exit, RunningBinary};
use common::upstream::{FakeUpstream, Reply};

#[test]
fn each_invalid_config_exits_non_zero_naming_the_variable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("GATEKEEPER", "bogus")], "GATEKEEPER"),
        (&[("GATEKEEPER", "proxy_key")], "PROXY_KEY"),
        (&[("GATEKEEPER", "user_token")], "ADMIN_KEY"),
        (&[("PORT", "abc")], "PORT"),
        (&[("OPENAI_BASE_URL", "not a url")], "OPENAI_BASE_URL"),
        (
            &[("ANTHROPIC_BASE_URL", "ftp://example.com")],
            "ANTHROPIC_BASE_URL",
        ),
        (
            &[("ADMIN_WHITELIST", "10.0.0.0/8,nonsense")],
            "ADMIN_WHITELIST",
        ),
        (&[("UPSTREAM_TIMEOUT_SECS", "0")], "UPSTREAM_TIMEOUT_SECS"),
        (&[("MAX_REQUEST_BODY_MB", "lots")], "MAX_REQUEST_BODY_MB"),
        (&[("OPENAI_KEY", "sk-a,sk-\u{1}b")], "OPENAI_KEY"),
    ];
    for (vars, name) in cases {
        let mut child = command(dir.path(), vars)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn binary");
        let status = wait_exit(&mut child);
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
            .expect("read stderr");
        assert!(!status.success(), "{vars:?} started anyway");
        assert!(
            stderr.contains(name),
            "{vars:?}: stderr does not name {name}: {stderr}"
        );
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{vars:?}: expected one line, got {stderr}"
        );
        assert!(!stderr.contains("sk-a"), "a key was printed: {stderr}");
    }
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_stream_finish_and_exits_zero() {
    sigterm_with_a_stream_in_flight(&[]).await;
}

/// The same with three worker threads, each with its own listening socket (issue 18): every
/// one stops accepting, the stream in flight on one of them completes, the process exits 0.
#[tokio::test]
async fn sigterm_with_several_workers_lets_the_stream_finish_and_exits_zero() {
    sigterm_with_a_stream_in_flight(&[("WORKERS", "3")]).await;
}

async fn sigterm_with_a_stream_in_flight(extra: &[(&str, &str)]) {
    let fake = FakeUpstream::start().await;
    let (reply, gate) = Reply::gated();
    fake.push(reply);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut vars = vec![
        ("OPENAI_KEY", "sk-operator"),
        ("OPENAI_BASE_URL", fake.url.as_str()),
        ("GATEKEEPER", "proxy_key"),
        ("PROXY_KEY", "pk"),
        ("SHUTDOWN_GRACE_SECS", "30"),
    ];
    vars.extend_from_slice(extra);
    let server = RunningBinary::start(dir.path(), &vars);
    let url = server.url.clone();

    let health = reqwest::get(format!("{url}/health")).await.expect("health");
    assert_eq!(health.status(), 200);

    gate.send("data: one\n\n");
    let mut resp = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth("pk")
        .json(&serde_json::json!({"model": "m", "stream": true, "messages": []}))
        .send()
        .await
        .expect("stream request");
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.expect("chunk").expect("first chunk");
    assert_eq!(&first[..], b"data: one\n\n");

    server.sigterm();
    // Wait until the server stops accepting connections, so the rest of the stream is
    // certainly sent during the shutdown. (The bound only keeps a broken test from hanging.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while reqwest::Client::new()
        .get(format!("{url}/health"))
        .send()
        .await
        .is_ok()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "still accepting after SIGTERM"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // The stream in flight still completes after the signal.
    gate.send("data: two\n\n");
    let second = resp.chunk().await.expect("chunk").expect("second chunk");
    assert_eq!(&second[..], b"data: two\n\n");
    gate.end();
    assert!(resp.chunk().await.expect("end").is_none());
    drop(resp);

    let (status, log) = tokio::task::spawn_blocking(move || server.wait())
        .await
        .expect("join");
    assert!(status.success(), "exit status {status:?}; log:\n{log}");
    assert!(
        !log.contains("sk-operator"),
        "the upstream key was logged:\n{log}"
    );
    assert!(
        !log.contains("Bearer pk"),
        "the client key was logged:\n{log}"
    );
}
