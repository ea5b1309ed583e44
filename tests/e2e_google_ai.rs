//! Google AI (Gemini) end to end with the official `google-genai` Python SDK: first against
//! the fake upstream directly (so the fake is known to speak the real protocol), then through
//! the proxy's `/google-ai` routes.
//!
//! Needs `.venv/bin/python` with `google-genai` (tests/requirements.txt). Without it the tests
//! are skipped with a note, except under CI (`CI` set), where they fail.

mod common;

use std::path::{Path, PathBuf};

use common::google_ai::FakeGoogleAi;

fn python() -> Option<PathBuf> {
    common::python::venv_python("google.genai")
}

/// Runs `tests/python/<script>` with `env`; panics with its output on failure.
async fn run_script(python: &Path, script: &str, env: &[(&str, &str)]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = tokio::process::Command::new(python);
    cmd.arg(root.join("tests/python").join(script))
        .env_remove("GOOGLE_API_KEY")
        .env_remove("GEMINI_API_KEY")
        .env_remove("GOOGLE_GENAI_API_VERSION")
        .env_remove("GOOGLE_GEMINI_BASE_URL")
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env("NO_PROXY", "127.0.0.1,localhost");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    stdout
}

#[tokio::test]
async fn the_fake_speaks_the_real_protocol() {
    let Some(python) = python() else { return };
    let fake = FakeGoogleAi::start(&["AIza-operator"]).await;
    let out = run_script(
        &python,
        "google_ai_sdk.py",
        &[
            ("BASE_URL", &fake.url),
            ("API_KEY", "AIza-operator"),
            ("BAD_STATUS", "400"),
        ],
    )
    .await;
    assert!(out.contains("all google-genai checks passed"), "{out}");
    let requests = fake.requests();
    let paths: Vec<String> = requests
        .iter()
        .map(|r| match &r.query {
            Some(q) => format!("{} {}?{q}", r.method, r.path),
            None => format!("{} {}", r.method, r.path),
        })
        .collect();
    // The SDK's own requests are what the fake (and so the proxy) must serve.
    for want in [
        "POST /v1beta/models/gemini-2.5-flash:generateContent",
        "POST /v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        "POST /v1/models/gemini-2.5-flash:generateContent",
        "POST /v1/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
    ] {
        assert!(paths.iter().any(|p| p == want), "{want} not in {paths:#?}");
    }
    assert!(
        paths.iter().any(|p| p.starts_with("GET /v1beta/models")),
        "{paths:#?}"
    );
}

/// Through the proxy in user_token mode: google-genai (v1beta and v1, plain and streamed, a
/// wrong key refused with 401) and the OpenAI SDK on the translated routes to Gemini and to
/// Claude; the user's tokenCounts equal what the fakes reported.
#[tokio::test]
async fn sdks_through_the_proxy_count_exact_usage() {
    use common::google_ai::TOTAL_TOKENS;
    use common::quota::{add_user, used, ADMIN_KEY};
    use common::upstream::FakeUpstream;
    use llm_gatekeeper::users::UserType;

    let Some(python) = python() else { return };
    let gemini = FakeGoogleAi::start(&["AIza-op-1", "AIza-op-2"]).await;
    let anthropic = FakeUpstream::start().await;
    let app = common::spawn(
        &[
            "--gatekeeper",
            "user_token",
            "--admin-key",
            ADMIN_KEY,
            "--google-ai-key",
            "AIza-op-1,AIza-op-2",
            "--google-ai-base-url",
            &gemini.url,
            "--anthropic-key",
            "sk-ant-operator",
            "--anthropic-base-url",
            &anthropic.url,
            "--text-model-rate-limit",
            "0",
        ],
        &[],
    )
    .await;
    let token = "user-google-e2e";
    add_user(&app, token, UserType::Normal, &[]);
    let base = format!("{}/proxy/google-ai", app.url);
    let out = run_script(
        &python,
        "google_ai_sdk.py",
        &[
            ("BASE_URL", &base),
            ("API_KEY", token),
            ("BAD_STATUS", "401"),
        ],
    )
    .await;
    assert!(out.contains("all google-genai checks passed"), "{out}");
    let out = run_script(
        &python,
        "openai_translated.py",
        &[("PROXY_URL", &app.url), ("API_KEY", token)],
    )
    .await;
    assert!(out.contains("all translated-route checks passed"), "{out}");

    let requests = gemini.requests();
    for r in &requests {
        let key = r.header("x-goog-api-key").unwrap_or_default();
        assert!(
            key == "AIza-op-1" || key == "AIza-op-2",
            "upstream saw {key:?}"
        );
        assert!(
            r.query.as_deref().is_none_or(|q| !q.contains("key=")),
            "{r:?}"
        );
        assert!(r.header("authorization").is_none(), "{r:?}");
    }
    let generations = requests
        .iter()
        .filter(|r| r.method == "POST" && r.path.contains("gemini-2.5-flash:"))
        .count() as u64;
    // google-genai: 2 plain + 2 streamed; OpenAI SDK: 1 plain + 2 streamed.
    assert_eq!(generations, 7, "{requests:#?}");
    assert!(requests.iter().any(|r| r.path
        == "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
        && r.query.as_deref() == Some("alt=sse")));
    // Every generation reported the same usage; the stream's running totals count once.
    assert_eq!(
        used(&app, token, "gemini-flash"),
        generations * TOTAL_TOKENS
    );
    // Claude via the OpenAI format: 15 plain, 13 per stream (two streams).
    assert_eq!(used(&app, token, "claude"), 15 + 13 + 13);
    for r in anthropic.requests() {
        assert_eq!(r.path, "/v1/messages");
        assert_eq!(r.credential().as_deref(), Some("sk-ant-operator"));
    }
}
