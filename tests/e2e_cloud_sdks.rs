//! End to end with the official Python SDKs through the proxy to the fake clouds
//! (`tests/python/cloud_sdks.py`): the Anthropic SDK with `base_url=http://HOST/proxy/aws/claude`
//! and `.../gcp/claude`, the OpenAI SDK on the translated chat routes and on Mistral, plain and
//! streamed; then the user's `tokenCounts` must hold exactly what the fakes reported, and no
//! fake may have seen the user's token.
//!
//! Needs `.venv/bin/python` with openai and anthropic; skipped with a note without it, except
//! under CI (`CI` set), where it fails.

mod common;

use std::path::Path;

use common::cloud::{gcp_credential, FakeBedrock, FakeVertex};
use common::quota::{add_user, eventually, used};
use llm_gatekeeper::users::UserType;

const AK: &str = "AKIAFAKEBEDROCK00001";
const SK: &str = "fake/Secret+Key/One/For/The/Bedrock00001";
const EMAIL: &str = "proxy@test-project.iam.gserviceaccount.com";
const USER: &str = "sdk-user-token-0001";

async fn proxy(aws: &str, bedrock: &FakeBedrock, vertex: &FakeVertex) -> common::TestApp {
    let gcp = gcp_credential("test-project", EMAIL, "us-east5");
    let app = common::spawn(
        &[
            "--gatekeeper",
            "user_token",
            "--admin-key",
            "cloud-admin-key",
            "--text-model-rate-limit",
            "0",
            "--aws-credentials",
            aws,
            "--aws-bedrock-base-url",
            &bedrock.url,
            "--gcp-credentials",
            &gcp,
            "--gcp-vertex-base-url",
            &vertex.url,
            "--gcp-token-url",
            &vertex.token_url,
        ],
        &[],
    )
    .await;
    add_user(&app, USER, UserType::Normal, &[]);
    app
}

#[tokio::test]
async fn official_sdks_reach_claude_on_both_clouds_and_mistral() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let Some(python) = common::python::venv_python("anthropic") else {
        return;
    };
    let bedrock = FakeBedrock::start(&[(AK, SK)]).await;
    let vertex = FakeVertex::start(&[("test-project", "us-east5", EMAIL)]).await;
    let app = proxy(&format!("{AK}:{SK}:us-east-1"), &bedrock, &vertex).await;
    let wrong = proxy(&format!("{AK}:wrong-secret:us-east-1"), &bedrock, &vertex).await;

    let out = tokio::process::Command::new(&python)
        .arg(root.join("tests/python/cloud_sdks.py"))
        .env("PROXY_URL", &app.url)
        .env("WRONG_PROXY_URL", &wrong.url)
        .env("USER_TOKEN", USER)
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
        out.status.success() && stdout.contains("all cloud SDK checks passed"),
        "cloud_sdks.py failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );

    // Exactly what the fakes reported: Bedrock 13+7 plain and 17+9 streamed, Vertex 21+5 and
    // 23+6, each twice for Claude (Anthropic and OpenAI clients), once for Mistral.
    eventually("settlement", || {
        used(&app, USER, "aws-claude") == 2 * (20 + 26)
            && used(&app, USER, "gcp-claude") == 2 * (26 + 29)
            && used(&app, USER, "aws-mistral-large") == 20 + 26
    })
    .await;
    assert_eq!(used(&wrong, USER, "aws-claude"), 0);
    assert!(
        bedrock.refused() >= 1,
        "the wrong secret was refused by signature"
    );
    let seen: Vec<String> = bedrock
        .requests()
        .iter()
        .chain(vertex.requests().iter())
        .map(|r| r.everything())
        .collect();
    assert!(seen.len() >= 10);
    for s in seen {
        assert!(!s.contains(USER), "a fake cloud saw the user's token:\n{s}");
    }
}
