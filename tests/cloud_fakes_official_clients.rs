//! Validates the fake clouds of `tests/common/cloud.rs` once against the official clients
//! talking to them directly (no proxy): boto3's `bedrock-runtime` client signs with SigV4 and
//! parses real event-stream frames, and the Anthropic SDK's `AnthropicVertex` gets its access
//! token from the fake token endpoint with google-auth's JWT grant. If these pass, the fakes
//! check what AWS and Google check, so the proxy's own tests against them mean something.
//!
//! Needs `.venv/bin/python` with boto3, google-auth and anthropic (tests/requirements.txt);
//! skipped with a note without it, except under CI (`CI` set), where it fails.

mod common;

use std::path::Path;

use common::cloud::{FakeBedrock, FakeVertex, BEDROCK_TEXT, VERTEX_TEXT};

const KEY_ID: &str = "AKIAFAKEBEDROCK00001";
const SECRET: &str = "fake/Secret+Key/For/The/Bedrock/Fake000";

#[tokio::test]
async fn official_clients_accept_the_fake_clouds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let Some(python) = common::python::venv_python("boto3") else {
        return;
    };
    let bedrock = FakeBedrock::start(&[(KEY_ID, SECRET)]).await;
    let email = "proxy@test-project.iam.gserviceaccount.com";
    let vertex = FakeVertex::start(&[("test-project", "us-east5", email)]).await;

    // Another RSA key: its assertions must be refused by the token endpoint.
    let dir = tempfile::tempdir().expect("tempdir");
    let wrong_key = dir.path().join("wrong.pem");
    let status = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&wrong_key)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run openssl");
    assert!(status.success(), "openssl genpkey failed");

    let out = tokio::process::Command::new(&python)
        .arg(root.join("tests/python/cloud_fakes.py"))
        .env("BEDROCK_URL", &bedrock.url)
        .env("AWS_REGION_NAME", "us-east-1")
        .env("AWS_KEY_ID", KEY_ID)
        .env("AWS_SECRET", SECRET)
        .env("BEDROCK_TEXT", BEDROCK_TEXT)
        .env("GCP_VERTEX_URL", &vertex.url)
        .env("GCP_TOKEN_URL", &vertex.token_url)
        .env("GCP_PROJECT", "test-project")
        .env("GCP_REGION", "us-east5")
        .env("GCP_EMAIL", email)
        .env(
            "GCP_KEY_PATH",
            root.join("tests/fixtures/TEST-ONLY-firebase-service-account-key.pem"),
        )
        .env("WRONG_KEY_PATH", &wrong_key)
        .env("VERTEX_TEXT", VERTEX_TEXT)
        // No credentials, proxies or endpoints from the developer's environment.
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
        .env_remove("ANTHROPIC_VERTEX_BASE_URL")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .output()
        .await
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("all cloud fake checks passed"),
        "cloud_fakes.py failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    // The wrong secret and the unknown key (Bedrock and STS) were refused by signature checking.
    assert_eq!(bedrock.refused(), 3);
    assert_eq!(
        vertex
            .state
            .refused_grants
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}
