//! `LOG_FORMAT`: with `json` every line the real binary writes to stdout is one JSON object —
//! the access line of a proxied request with its route template, method and status as fields,
//! and no secret —, the last lines are written out on SIGTERM, and an unknown format stops
//! startup naming the variable.

mod common;

use std::process::Stdio;

use common::binary::{command, wait_exit, RunningBinary};
use common::upstream::FakeUpstream;
use serde_json::Value;

/// A chat request with the proxy key, answered 200 and read to its end.
async fn chat(c: &reqwest::Client, url: &str) {
    let resp = c
        .post(url)
        .bearer_auth("pk-XYZZY")
        .json(&serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("proxied request");
    assert_eq!(resp.status(), 200);
    let _ = resp.bytes().await.expect("body");
}

#[tokio::test]
async fn json_log_is_one_object_per_line_with_the_access_fields_and_no_secret() {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = RunningBinary::start(
        dir.path(),
        &[
            ("LOG_FORMAT", "json"),
            ("OPENAI_KEY", "sk-operator-XYZZY"),
            ("OPENAI_BASE_URL", &fake.url),
            ("GATEKEEPER", "proxy_key"),
            ("PROXY_KEY", "pk-XYZZY"),
        ],
    );
    let c = reqwest::Client::new();
    chat(
        &c,
        &format!("{}/v1/chat/completions?key=q-XYZZY", server.url),
    )
    .await;
    // A token in a proxied path is logged as the route template only.
    let resp = c
        .get(format!("{}/v1/models/tok-XYZZY", server.url))
        .bearer_auth("pk-XYZZY")
        .send()
        .await
        .expect("model request");
    let _ = resp.bytes().await;

    server.sigterm();
    let (status, log) = tokio::task::spawn_blocking(move || server.wait())
        .await
        .expect("join");
    assert!(status.success(), "exit {status:?}; log:\n{log}");
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for line in &lines {
        for field in ["timestamp", "level", "target", "message"] {
            assert!(line.get(field).is_some(), "no {field}: {line}");
        }
        assert!(
            line.get("spans").is_none() && line.get("span").is_none(),
            "{line}"
        );
    }
    let access: Vec<&Value> = lines.iter().filter(|l| l.get("path").is_some()).collect();
    let chat = access
        .iter()
        .find(|l| l["path"] == "/v1/chat/completions")
        .unwrap_or_else(|| panic!("no access line for the chat route:\n{log}"));
    assert_eq!(chat["message"], "proxied");
    assert_eq!(chat["level"], "INFO");
    assert_eq!(chat["method"], "POST");
    assert_eq!(chat["status"], 200);
    assert!(chat["upstream_ms"].is_u64(), "{chat}");
    assert!(
        access.iter().any(|l| l["path"] == "/v1/models/{id}"),
        "the model route is logged by its template:\n{log}"
    );
    assert_eq!(
        lines.last().map(|l| l["message"].clone()),
        Some(Value::from("shutdown complete")),
        "the last line is written out on SIGTERM:\n{log}"
    );
    assert!(!log.contains("XYZZY"), "a secret was logged:\n{log}");
}

#[tokio::test]
async fn text_access_lines_have_the_subscriber_format_and_every_request_gets_one() {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = RunningBinary::start(
        dir.path(),
        &[
            ("OPENAI_KEY", "sk-operator-XYZZY"),
            ("OPENAI_BASE_URL", &fake.url),
            ("GATEKEEPER", "proxy_key"),
            ("PROXY_KEY", "pk-XYZZY"),
            ("TEXT_MODEL_RATE_LIMIT", "0"),
        ],
    );
    let c = reqwest::Client::new();
    // Several requests, spread over the workers (each writes its access lines into its batch).
    for _ in 0..6 {
        chat(&c, &format!("{}/v1/chat/completions", server.url)).await;
    }
    server.sigterm();
    let (status, log) = tokio::task::spawn_blocking(move || server.wait())
        .await
        .expect("join");
    assert!(status.success(), "exit {status:?}; log:\n{log}");
    let access: Vec<&str> = log.lines().filter(|l| l.contains(" proxied ")).collect();
    assert_eq!(access.len(), 6, "one access line per request:\n{log}");
    for line in access {
        // 2026-12-01T15:40:28.955146Z  INFO llm_gatekeeper::proxy::forward: proxied method=POST ...
        let (ts, rest) = line.split_at(27);
        let b = ts.as_bytes();
        assert!(
            ts.ends_with('Z') && b[10] == b'T' && b[19] == b'.' && b[4] == b'-',
            "timestamp {ts:?} in {line}"
        );
        assert!(
            ts[..4].parse::<u32>().is_ok_and(|y| y >= 2024) && ts[20..26].parse::<u32>().is_ok(),
            "timestamp {ts:?} in {line}"
        );
        let rest = rest
            .strip_prefix("  INFO llm_gatekeeper::proxy::forward: proxied method=POST path=/v1/chat/completions status=200 upstream_ms=")
            .unwrap_or_else(|| panic!("not the access line's format: {line}"));
        let (ms, key) = rest.split_once(" key=").expect("key field");
        assert!(ms.parse::<u64>().is_ok(), "{line}");
        assert!(!key.is_empty() && !key.contains(' '), "{line}");
    }
    assert!(!log.contains("XYZZY"), "a secret was logged:\n{log}");
}

#[test]
fn an_unknown_log_format_stops_startup_naming_the_variable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = command(dir.path(), &[("LOG_FORMAT", "bogus")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn binary");
    let status = wait_exit(&mut child);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert_eq!(status.code(), Some(2), "{stderr}");
    for word in ["LOG_FORMAT", "bogus", "text", "json"] {
        assert!(
            stderr.contains(word),
            "stderr does not name {word}: {stderr}"
        );
    }
}
