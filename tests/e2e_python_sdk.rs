//! End to end with the official Python SDKs: `tests/python/sdk_smoke.py` drives the OpenAI SDK
//! (plain and `stream=True`) and the Anthropic SDK (plain and streamed) against the real binary
//! in proxy_key mode, with the fake upstream behind it.
//!
//! Needs `.venv/bin/python` in the repository root with `openai` and `anthropic` installed
//! (`python3 -m venv .venv && .venv/bin/pip install openai anthropic`). Without it the test is
//! skipped with a note, except under CI (`CI` set), where it fails.

mod common;

use std::path::Path;

use common::binary::RunningBinary;
use common::upstream::FakeUpstream;

#[tokio::test]
async fn official_python_sdks_work_through_the_binary() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let Some(python) = common::python::venv_python("openai") else {
        return;
    };
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = RunningBinary::start(
        dir.path(),
        &[
            ("GATEKEEPER", "proxy_key"),
            ("PROXY_KEY", "pk-python"),
            ("OPENAI_KEY", "sk-operator"),
            ("ANTHROPIC_KEY", "sk-ant-operator"),
            ("OPENAI_BASE_URL", &fake.url),
            ("ANTHROPIC_BASE_URL", &fake.url),
            // The script sends more prompts than the default 4 per minute.
            ("TEXT_MODEL_RATE_LIMIT", "0"),
        ],
    );
    // tokio's process API, so the fake upstream keeps answering while the script runs.
    let out = tokio::process::Command::new(&python)
        .arg(root.join("tests/python/sdk_smoke.py"))
        .env("PROXY_URL", &server.url)
        .env("PROXY_KEY", "pk-python")
        // The SDKs must not pick up a proxy or key from the developer's environment.
        .env_remove("OPENAI_API_KEY")
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("ANTHROPIC_BASE_URL")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .output()
        .await
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "sdk_smoke.py failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("all SDK checks passed"), "{stdout}");
    let requests = fake.requests();
    assert!(
        requests.len() >= 6,
        "only {} upstream requests",
        requests.len()
    );
    for request in requests {
        let cred = request.credential().expect("credential");
        assert!(
            cred == "sk-operator" || cred == "sk-ant-operator",
            "the upstream saw {cred:?}"
        );
    }
}
