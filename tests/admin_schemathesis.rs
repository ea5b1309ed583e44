//! Runs `schemathesis` (from `.venv` in the repository root) against the real binary with
//! `openapi-admin-users.yaml`: every operation, positive and negative data, and every
//! schemathesis check except `use_after_free` (our DELETE disables a user rather than deleting
//! it, as the original's does, so the user is still there afterwards by design). That covers
//! "no 5xx", "every response conforms to the spec", "invalid input is refused" and "no access
//! without the admin key".
//!
//! Without `.venv/bin/schemathesis` the test fails when `CI` is set and is skipped (with a
//! note) otherwise. Install it with `python3 -m venv .venv && .venv/bin/pip install schemathesis`.
//! The run is bounded (`--max-examples 20`) and seeded (override with `SCHEMATHESIS_SEED`, or
//! `SCHEMATHESIS_SEED=random`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Kills the server when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local addr").port()
}

#[tokio::test]
async fn schemathesis_finds_no_problem_with_the_admin_api() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let st = root.join(".venv/bin/schemathesis");
    if !st.exists() {
        let msg = format!(
            "{} is missing: run `python3 -m venv .venv && .venv/bin/pip install schemathesis` in the repository root",
            st.display()
        );
        if std::env::var_os("CI").is_some() {
            panic!("{msg}");
        }
        eprintln!("SKIPPED schemathesis_finds_no_problem_with_the_admin_api: {msg}");
        return;
    }

    // A scratch directory for the server (so a developer's .env is not read) and for
    // schemathesis's own caches (.hypothesis, .schemathesis).
    let scratch = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let admin_key = format!("schemathesis-{}", uuid::Uuid::new_v4());
    let server = Command::new(env!("CARGO_BIN_EXE_llm-gatekeeper"))
        .current_dir(scratch.path())
        .env_clear()
        .env("GATEKEEPER", "user_token")
        .env("ADMIN_KEY", &admin_key)
        .env("PORT", port.to_string())
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("TRUSTED_PROXIES", "0")
        // Schemathesis deliberately sends wrong credentials (its ignored_auth check); a real
        // lockout would turn the rest of the run into 429s.
        .env("BRUTE_FORCE_MAX_FAILED_ATTEMPTS", "1000000")
        .env("TOKEN_QUOTA_TURBO", "100000")
        .env("LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the server binary starts");
    let _server = Server(server);

    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let mut up = false;
    for _ in 0..300 {
        if let Ok(r) = client.get(format!("{url}/health")).send().await {
            if r.status().is_success() {
                up = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "the server did not answer /health on {url}");

    let seed = std::env::var("SCHEMATHESIS_SEED").unwrap_or_else(|_| "20261122".into());
    let mut cmd = tokio::process::Command::new(&st);
    cmd.current_dir(scratch.path())
        .arg("run")
        .arg(root.join("openapi-admin-users.yaml"))
        .args(["--url", &url])
        .args(["-H", &format!("Authorization: Bearer {admin_key}")])
        .args(["--checks", "all", "--exclude-checks", "use_after_free"])
        .args(["--max-examples", "20"])
        .args(["--request-timeout", "30"])
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    if seed != "random" {
        cmd.args(["--seed", &seed]);
    }
    let out = tokio::time::timeout(Duration::from_secs(900), cmd.output())
        .await
        .expect("schemathesis finished within 15 minutes")
        .expect("schemathesis runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "schemathesis found problems (exit {:?}):\n{stdout}\n{stderr}",
        out.status.code()
    );
}
