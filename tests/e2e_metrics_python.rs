//! End to end: `/metrics` of the real binary read by Prometheus's own Python parser
//! (`prometheus_client`, pinned in `tests/requirements.txt`), after a request through the
//! official OpenAI SDK and one with a wrong token (`tests/python/metrics_scrape.py`).
//!
//! Needs `.venv/bin/python` with `openai` and `prometheus_client`; without it the test is
//! skipped with a note, except under CI (`CI` set), where it fails.

mod common;

use std::path::Path;

use common::binary::RunningBinary;
use common::upstream::FakeUpstream;

const ADMIN_KEY: &str = "metrics-e2e-admin-key";
const METRICS_KEY: &str = "metrics-e2e-scrape-key-0123456789";
const UPSTREAM_KEY: &str = "sk-operator-metrics-e2e";

#[tokio::test]
async fn prometheus_client_parses_the_exposition() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let Some(python) = common::python::venv_python("prometheus_client") else {
        return;
    };
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = RunningBinary::start(
        dir.path(),
        &[
            ("GATEKEEPER", "user_token"),
            ("ADMIN_KEY", ADMIN_KEY),
            ("METRICS_KEY", METRICS_KEY),
            ("OPENAI_KEY", UPSTREAM_KEY),
            ("OPENAI_BASE_URL", &fake.url),
            ("CHECK_KEYS", "false"),
        ],
    );
    // tokio's process API, so the fake upstream keeps answering while the script runs.
    let out = tokio::process::Command::new(&python)
        .arg(root.join("tests/python/metrics_scrape.py"))
        .env("PROXY_URL", &server.url)
        .env("ADMIN_KEY", ADMIN_KEY)
        .env("METRICS_KEY", METRICS_KEY)
        .env("UPSTREAM_KEY", UPSTREAM_KEY)
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .output()
        .await
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "metrics_scrape.py failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("all metrics checks passed"), "{stdout}");
    assert_eq!(fake.request_count(), 1, "one request reached the upstream");
}
