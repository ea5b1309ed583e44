//! Claude (and Mistral) through the proxy to AWS Bedrock and GCP Vertex AI, against the fakes
//! of `tests/common/cloud.rs` (which verify SigV4 signatures and service-account JWTs as the
//! real services do): plain and streamed answers, usage counted exactly in the user's
//! `tokenCounts`, credential rotation on the clouds' errors, and the client's token never
//! reaching a cloud. The official SDKs drive the same routes in `e2e_cloud_sdks.rs`.

mod common;

use std::sync::atomic::Ordering;

use common::cloud::{
    gcp_credential, FakeBedrock, FakeVertex, BEDROCK_PLAIN_USAGE, BEDROCK_STREAM_USAGE,
    BEDROCK_TEXT, VERTEX_PLAIN_USAGE, VERTEX_STREAM_USAGE, VERTEX_TEXT,
};
use common::quota::{add_user, eventually, used};
use common::TestApp;
use llm_gatekeeper::users::UserType;
use serde_json::{json, Value};

const AK1: &str = "AKIAFAKEBEDROCK00001";
const SK1: &str = "fake/Secret+Key/One/For/The/Bedrock00001";
const AK2: &str = "AKIAFAKEBEDROCK00002";
const SK2: &str = "fake/Secret+Key/Two/For/The/Bedrock00002";
const EMAIL: &str = "proxy@test-project.iam.gserviceaccount.com";
const USER: &str = "user-token-for-cloud-tests";

async fn proxy(aws: &str, bedrock: &FakeBedrock, vertex: &FakeVertex) -> TestApp {
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

fn messages(model: &str, stream: bool, text: &str) -> Value {
    json!({"model": model, "max_tokens": 100, "stream": stream,
        "messages": [{"role": "user", "content": text}]})
}

async fn post(app: &TestApp, path: &str, body: &Value) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(format!("{}{path}", app.url))
        .bearer_auth(USER)
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .expect("request reaches the proxy");
    let status = r.status().as_u16();
    (status, r.text().await.expect("body"))
}

/// Concatenated `text_delta`s of an Anthropic SSE stream.
fn anthropic_stream_text(sse: &str) -> String {
    sse.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["delta"]["text"].as_str().map(str::to_string))
        .collect()
}

fn sum(a: (u64, u64)) -> u64 {
    a.0 + a.1
}

#[tokio::test]
async fn claude_on_bedrock_plain_and_streamed_counts_exactly() {
    let bedrock = FakeBedrock::start(&[(AK1, SK1)]).await;
    let vertex = FakeVertex::start(&[("test-project", "us-east5", EMAIL)]).await;
    let app = proxy(&format!("{AK1}:{SK1}:us-east-1"), &bedrock, &vertex).await;

    let (status, body) = post(
        &app,
        "/proxy/aws/claude/v1/messages",
        &messages("claude-3-5-sonnet-20240620", false, "hi"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["content"][0]["text"], BEDROCK_TEXT);
    eventually("plain settlement", || {
        used(&app, USER, "aws-claude") == sum(BEDROCK_PLAIN_USAGE)
    })
    .await;

    let (status, body) = post(
        &app,
        "/proxy/aws/claude/v1/messages",
        &messages("claude-3-5-sonnet-20240620", true, "hi"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("event: message_start\n"), "{body}");
    assert_eq!(anthropic_stream_text(&body), BEDROCK_TEXT);
    assert!(body.contains("event: message_stop"), "{body}");
    eventually("stream settlement", || {
        used(&app, USER, "aws-claude") == sum(BEDROCK_PLAIN_USAGE) + sum(BEDROCK_STREAM_USAGE)
    })
    .await;

    // Opus counts in its own family; the Bedrock id went in the URL, signed.
    let (status, _) = post(
        &app,
        "/proxy/aws/claude/messages",
        &messages("claude-3-opus-20240229", false, "hi"),
    )
    .await;
    assert_eq!(status, 200);
    eventually("opus settlement", || {
        used(&app, USER, "aws-claude-opus") == sum(BEDROCK_PLAIN_USAGE)
    })
    .await;
    let reqs = bedrock.requests();
    assert_eq!(
        reqs[0].path,
        "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/invoke"
    );
    assert_eq!(
        reqs[1].path,
        "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/invoke-with-response-stream"
    );
    assert_eq!(
        reqs[0].json(),
        json!({"max_tokens": 100, "messages": [{"role": "user", "content": "hi"}],
            "anthropic_version": "bedrock-2023-05-31"})
    );
    assert_eq!(bedrock.refused(), 0);
    for r in &reqs {
        assert!(
            !r.everything().contains(USER),
            "the user's token reached Bedrock"
        );
        assert!(!r.everything().contains(SK1), "the secret key was sent");
    }
}

#[tokio::test]
async fn openai_clients_and_mistral_on_bedrock() {
    let bedrock = FakeBedrock::start(&[(AK1, SK1)]).await;
    let vertex = FakeVertex::start(&[("test-project", "us-east5", EMAIL)]).await;
    let app = proxy(&format!("{AK1}:{SK1}:us-east-1"), &bedrock, &vertex).await;
    let chat = |model: &str, stream: bool| {
        json!({"model": model, "stream": stream,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]})
    };

    let (status, body) = post(
        &app,
        "/proxy/aws/claude/v1/chat/completions",
        &chat("claude-3-5-sonnet-20240620", false),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], BEDROCK_TEXT);
    assert_eq!(v["usage"]["total_tokens"], sum(BEDROCK_PLAIN_USAGE));
    let sent = bedrock.requests()[0].json();
    assert_eq!(sent["system"], "Be brief.");
    assert_eq!(sent["anthropic_version"], "bedrock-2023-05-31");

    let (status, body) = post(
        &app,
        "/proxy/aws/claude/v1/chat/completions",
        &chat("claude-3-5-sonnet-20240620", true),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let text: String = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(text, BEDROCK_TEXT);
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    eventually("claude settlement", || {
        used(&app, USER, "aws-claude") == sum(BEDROCK_PLAIN_USAGE) + sum(BEDROCK_STREAM_USAGE)
    })
    .await;

    // Mistral: OpenAI chat in and out; usage from Bedrock's headers and stream metrics.
    let (status, body) = post(
        &app,
        "/proxy/aws/mistral/v1/chat/completions",
        &chat("mistral-large-latest", false),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["choices"][0]["message"]["content"], BEDROCK_TEXT);
    assert_eq!(v["usage"]["prompt_tokens"], BEDROCK_PLAIN_USAGE.0);
    let (status, body) = post(
        &app,
        "/proxy/aws/mistral/v1/chat/completions",
        &chat("mistral-large-latest", true),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"content\":\"Hello\""), "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    eventually("mistral settlement", || {
        used(&app, USER, "aws-mistral-large")
            == sum(BEDROCK_PLAIN_USAGE) + sum(BEDROCK_STREAM_USAGE)
    })
    .await;
    let mistral = bedrock
        .requests()
        .into_iter()
        .find(|r| r.path.contains("mistral"))
        .expect("a Mistral request");
    assert_eq!(
        mistral.path,
        "/model/mistral.mistral-large-2407-v1%3A0/invoke"
    );
    assert!(mistral.json().get("model").is_none());
    // An output cap in the newer field reaches Bedrock's Mistral as the `max_tokens` it knows.
    let mut capped = chat("mistral-large-latest", false);
    capped["max_completion_tokens"] = json!(42);
    let (status, body) = post(&app, "/proxy/aws/mistral/v1/chat/completions", &capped).await;
    assert_eq!(status, 200, "{body}");
    let sent = bedrock.requests().last().expect("request").json();
    assert_eq!(sent["max_tokens"], 42, "{sent}");
    assert!(sent.get("max_completion_tokens").is_none());

    // The model list.
    let list: Value = reqwest::Client::new()
        .get(format!("{}/proxy/aws/v1/models", app.url))
        .bearer_auth(USER)
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    assert!(list["data"]
        .as_array()
        .expect("list")
        .iter()
        .any(|m| m["id"] == "anthropic.claude-3-5-sonnet-20240620-v1:0"));
}

#[tokio::test]
async fn bedrock_errors_rotate_credentials_and_reach_the_client_clearly() {
    let bedrock = FakeBedrock::start(&[(AK1, SK1), (AK2, SK2)]).await;
    let vertex = FakeVertex::start(&[("test-project", "us-east5", EMAIL)]).await;

    // A wrong secret: the fake refuses the signature; with no other key, the client is told
    // that the operator's AWS_CREDENTIALS were rejected.
    let wrong = proxy(
        &format!("{AK1}:not-the-secret:us-east-1"),
        &bedrock,
        &vertex,
    )
    .await;
    let (status, body) = post(
        &wrong,
        "/proxy/aws/claude/v1/messages",
        &messages("claude-3-5-sonnet-20240620", false, "hi"),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("AWS_CREDENTIALS"), "{body}");
    assert!(!body.contains("not-the-secret"), "{body}");
    assert_eq!(bedrock.refused(), 1);
    eventually("nothing charged", || used(&wrong, USER, "aws-claude") == 0).await;

    let app = proxy(
        &format!("{AK1}:{SK1}:us-east-1,{AK2}:{SK2}:us-west-2"),
        &bedrock,
        &vertex,
    )
    .await;
    // AK1 lacks the model: the request is served with AK2, and AK1 stays in rotation.
    bedrock.state.denied.lock().expect("lock").insert((
        AK1.to_string(),
        "anthropic.claude-3-haiku-20240307-v1:0".to_string(),
    ));
    for _ in 0..2 {
        let (status, body) = post(
            &app,
            "/proxy/aws/claude/v1/messages",
            &messages("claude-3-haiku-20240307", false, "hi"),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let served = bedrock.served_by();
    assert!(served.iter().all(|k| k == AK2), "{served:?}");
    let (status, _) = post(
        &app,
        "/proxy/aws/claude/v1/messages",
        &messages("claude-3-5-sonnet-20240620", false, "hi"),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = post(
        &app,
        "/proxy/aws/claude/v1/messages",
        &messages("claude-3-5-sonnet-20240620", false, "hi"),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        bedrock.served_by().iter().any(|k| k == AK1),
        "AK1 is still used for models it has"
    );

    // Throttling rests one credential; the other serves.
    bedrock.state.throttle_next.store(1, Ordering::SeqCst);
    let (status, body) = post(
        &app,
        "/proxy/aws/claude/v1/messages",
        &messages("claude-3-5-sonnet-20240620", false, "hi"),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // An exception in the middle of a stream reaches the client as an SSE error event.
    *bedrock.state.stream_exception.lock().expect("lock") =
        Some("modelStreamErrorException".into());
    let (status, body) = post(
        &app,
        "/proxy/aws/claude/v1/messages",
        &messages("claude-3-5-sonnet-20240620", true, "hi"),
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.contains("event: error\ndata: "), "{body}");
    assert!(body.contains("modelStreamErrorException"), "{body}");

    // A model Bedrock does not know is refused before anything is sent or charged.
    let before = bedrock.requests().len();
    let (status, body) = post(
        &app,
        "/proxy/aws/claude/v1/messages",
        &messages("gpt-4o", false, "hi"),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("anthropic.claude"), "{body}");
    assert_eq!(bedrock.requests().len(), before);
}

#[tokio::test]
async fn claude_on_vertex_with_cached_service_account_tokens() {
    let bedrock = FakeBedrock::start(&[(AK1, SK1)]).await;
    let vertex = FakeVertex::start(&[("test-project", "us-east5", EMAIL)]).await;
    let app = proxy(&format!("{AK1}:{SK1}:us-east-1"), &bedrock, &vertex).await;

    let (status, body) = post(
        &app,
        "/proxy/gcp/claude/v1/messages",
        &messages("claude-3-5-sonnet-20240620", false, "hi"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["content"][0]["text"], VERTEX_TEXT);
    let (status, body) = post(
        &app,
        "/proxy/gcp/claude/v1/messages",
        &messages("claude-3-opus-20240229", true, "hi"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(anthropic_stream_text(&body), VERTEX_TEXT);
    let (status, body) = post(
        &app,
        "/proxy/gcp/claude/v1/chat/completions",
        &json!({"model": "claude-3-5-sonnet-v2@20241022",
            "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["choices"][0]["message"]["content"], VERTEX_TEXT);
    eventually("vertex settlement", || {
        used(&app, USER, "gcp-claude") == 2 * sum(VERTEX_PLAIN_USAGE)
            && used(&app, USER, "gcp-claude-opus") == sum(VERTEX_STREAM_USAGE)
    })
    .await;

    let reqs = vertex.requests();
    assert_eq!(
        reqs[0].path,
        "/v1/projects/test-project/locations/us-east5/publishers/anthropic/models/claude-3-5-sonnet@20240620:rawPredict"
    );
    assert!(reqs[1]
        .path
        .ends_with("/claude-3-opus@20240229:streamRawPredict"));
    assert!(reqs[2]
        .path
        .ends_with("/claude-3-5-sonnet-v2@20241022:rawPredict"));
    assert_eq!(reqs[0].json()["anthropic_version"], "vertex-2023-10-16");
    assert!(reqs[0].json().get("model").is_none());
    // The service info page lists both clouds and their base URLs, never a secret.
    let info = reqwest::Client::new()
        .get(format!("{}/", app.url))
        .header("accept", "application/json")
        .send()
        .await
        .expect("info")
        .text()
        .await
        .expect("body");
    let v: Value = serde_json::from_str(&info).expect("json");
    let names: Vec<&str> = v["providers"]
        .as_array()
        .expect("providers")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(
        names.contains(&"aws") && names.contains(&"gcp"),
        "{names:?}"
    );
    assert!(info.contains("/proxy/aws/claude") && info.contains("/proxy/gcp/claude"));
    assert!(!info.contains(SK1) && !info.contains("PRIVATE KEY"));

    // One token for the three requests: cached.
    assert_eq!(vertex.state.grants.load(Ordering::SeqCst), 1);
    for r in &reqs {
        assert!(
            !r.everything().contains(USER),
            "the user's token reached Vertex"
        );
    }

    // Vertex revokes the token: the proxy fetches a new one and the request still succeeds.
    vertex.revoke_tokens();
    let (status, body) = post(
        &app,
        "/proxy/gcp/claude/v1/messages",
        &messages("claude-3-5-sonnet-20240620", false, "hi"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(vertex.state.grants.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_gcp_key_the_token_endpoint_refuses_gives_a_clear_error() {
    let bedrock = FakeBedrock::start(&[(AK1, SK1)]).await;
    // The fake does not know this service account.
    let vertex = FakeVertex::start(&[("test-project", "us-east5", "someone@else.example")]).await;
    let app = proxy(&format!("{AK1}:{SK1}:us-east-1"), &bedrock, &vertex).await;
    let (status, body) = post(
        &app,
        "/proxy/gcp/claude/v1/messages",
        &messages("claude-3-5-sonnet-20240620", false, "hi"),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("GCP_CREDENTIALS"), "{body}");
    assert!(vertex.requests().is_empty());
    eventually("nothing charged", || used(&app, USER, "gcp-claude") == 0).await;
}

#[test]
fn malformed_cloud_credentials_stop_startup_naming_the_variable_not_the_secret() {
    let err = |args: &[&str]| {
        let mut argv = vec!["llm-gatekeeper"];
        argv.extend_from_slice(args);
        match llm_gatekeeper::Config::from_args(argv, Vec::<(String, String)>::new()) {
            Ok(_) => panic!("{args:?} was accepted"),
            Err(e) => e.0,
        }
    };
    let e = err(&[
        "--aws-credentials",
        "AKIA1:s3cr3t-one:us-east-1,AKIA2:s3cr3t-two",
    ]);
    assert!(e.contains("AWS_CREDENTIALS: entry 2 of 2"), "{e}");
    assert!(!e.contains("s3cr3t"), "{e}");
    let e = err(&[
        "--gcp-credentials",
        "proj:sa@proj.iam.gserviceaccount.com:us-east5",
    ]);
    assert!(e.contains("GCP_CREDENTIALS: entry 1 of 1"), "{e}");
    let e = err(&["--aws-bedrock-base-url", "bedrock.local"]);
    assert!(e.contains("AWS_BEDROCK_BASE_URL"), "{e}");
    let e = err(&["--gcp-token-url", "ftp://x/token"]);
    assert!(e.contains("GCP_TOKEN_URL"), "{e}");
}
