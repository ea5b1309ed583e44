//! The real binary: each invalid configuration stops startup with a non-zero exit and one
//! line naming the variable; SIGTERM on a running server lets an in-flight stream finish and
//! exits 0.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::upstream::{FakeUpstream, Reply};

const BIN: &str = env!("CARGO_BIN_EXE_llm-gatekeeper");

/// The binary with a clean environment, run in an empty directory (no `.env` to pick up),
/// listening on a free loopback port.
fn command(dir: &std::path::Path, vars: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .current_dir(dir)
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("PORT", "0")
        .env("NO_COLOR", "1");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd
}

/// Waits for the process to exit (killing it after a generous bound so a test cannot hang).
fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the process did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn each_invalid_config_exits_non_zero_naming_the_variable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("GATEKEEPER", "bogus")], "GATEKEEPER"),
        (&[("GATEKEEPER", "proxy_key")], "PROXY_KEY"),
        (&[("GATEKEEPER", "user_token")], "ADMIN_KEY"),
        (&[("PORT", "abc")], "PORT"),
        (&[("OPENAI_BASE_URL", "not a url")], "OPENAI_BASE_URL"),
        (&[("ANTHROPIC_BASE_URL", "ftp://example.com")], "ANTHROPIC_BASE_URL"),
        (&[("ADMIN_WHITELIST", "10.0.0.0/8,nonsense")], "ADMIN_WHITELIST"),
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
        assert!(stderr.contains(name), "{vars:?}: stderr does not name {name}: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{vars:?}: expected one line, got {stderr}"
        );
        assert!(!stderr.contains("sk-a"), "a key was printed: {stderr}");
    }
}

/// Reads the server's log until the "listening on" line and returns the base URL.
fn wait_listening(child: &mut Child) -> (String, std::thread::JoinHandle<String>) {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    // The log keeps being drained so the server never blocks on a full pipe.
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !sent {
                if let Some(i) = line.find("listening on http://") {
                    let rest = &line[i + "listening on ".len()..];
                    let url: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
                    let _ = tx.send(url);
                    sent = true;
                }
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let url = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the server logged its address");
    (url, reader)
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_stream_finish_and_exits_zero() {
    let fake = FakeUpstream::start().await;
    let (reply, gate) = Reply::gated();
    fake.push(reply);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = command(
        dir.path(),
        &[
            ("OPENAI_KEY", "sk-operator"),
            ("OPENAI_BASE_URL", &fake.url),
            ("GATEKEEPER", "proxy_key"),
            ("PROXY_KEY", "pk"),
            ("SHUTDOWN_GRACE_SECS", "30"),
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .expect("spawn binary");
    let (url, log) = wait_listening(&mut child);

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

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(kill.success());

    // The stream in flight still completes after the signal.
    gate.send("data: two\n\n");
    let second = resp.chunk().await.expect("chunk").expect("second chunk");
    assert_eq!(&second[..], b"data: two\n\n");
    gate.end();
    assert!(resp.chunk().await.expect("end").is_none());
    drop(resp);

    let status = tokio::task::spawn_blocking(move || wait_exit(&mut child))
        .await
        .expect("join");
    let log = log.join().expect("log reader");
    assert!(status.success(), "exit status {status:?}; log:\n{log}");
    assert!(!log.contains("sk-operator"), "the upstream key was logged:\n{log}");
    assert!(!log.contains("Bearer pk"), "the client key was logged:\n{log}");
}
