//! The clouds' key checkers against the fakes of `tests/common/cloud.rs`, which verify every
//! SigV4 signature (service `sts` for STS, `bedrock` for Bedrock), `X-Amz-Date` and path as AWS
//! does, and every Vertex bearer token and service-account JWT as Google does: AWS credentials
//! come out working (with the families of the models they may invoke), revoked (unknown key,
//! wrong secret) or `logging` (prompts logged; not used unless `ALLOW_AWS_LOGGING=true`), and
//! the same in the Mistral pool; GCP credentials working, revoked (refused grant) or
//! rate-limited (429). Requests are then served only by usable credentials of the family.

mod common;

use std::time::Duration;

use common::cloud::{gcp_credential, FakeBedrock, FakeVertex};
use llm_gatekeeper::providers::Provider;
use llm_gatekeeper::proxy::keys::KeyView;
use serde_json::{json, Value};

const AK_GOOD: &str = "AKIAFAKECHECKGOOD001";
const SK_GOOD: &str = "fake/Secret/Good/Checker/Bedrock000001";
const AK_LOGGED: &str = "AKIAFAKECHECKLOGGED1";
const SK_LOGGED: &str = "fake/Secret/Logged/Checker/Bedrock0001";
const AK_NO_OPUS: &str = "AKIAFAKECHECKNOOPUS1";
const SK_NO_OPUS: &str = "fake/Secret/NoOpus/Checker/Bedrock0001";
const AK_UNKNOWN: &str = "AKIAFAKECHECKUNKNOWN";
const SK_UNKNOWN: &str = "fake/Secret/Unknown/Checker/Bedrock001";
const AK_WRONG: &str = "AKIAFAKECHECKWRONG01";
const SK_WRONG: &str = "fake/Secret/Wrong/Checker/Bedrock00001";

const OPUS_IDS: &[&str] = &[
    "anthropic.claude-3-opus-20240229-v1:0",
    "us.anthropic.claude-3-opus-20240229-v1:0",
    "anthropic.claude-opus-4-20250514-v1:0",
    "us.anthropic.claude-opus-4-20250514-v1:0",
];

async fn bedrock() -> FakeBedrock {
    let fake = FakeBedrock::start(&[
        (AK_GOOD, SK_GOOD),
        (AK_LOGGED, SK_LOGGED),
        (AK_NO_OPUS, SK_NO_OPUS),
        // The account knows this key with another secret: every signature is wrong.
        (AK_WRONG, "the/real/secret/is/another/one/entirely0"),
    ])
    .await;
    fake.state
        .logging
        .lock()
        .expect("lock")
        .insert(AK_LOGGED.into());
    for id in OPUS_IDS {
        fake.state
            .denied
            .lock()
            .expect("lock")
            .insert((AK_NO_OPUS.into(), id.to_string()));
    }
    fake
}

fn aws_credentials() -> String {
    [
        (AK_GOOD, SK_GOOD),
        (AK_LOGGED, SK_LOGGED),
        (AK_NO_OPUS, SK_NO_OPUS),
        (AK_UNKNOWN, SK_UNKNOWN),
        (AK_WRONG, SK_WRONG),
    ]
    .iter()
    .map(|(a, s)| format!("{a}:{s}:us-east-1"))
    .collect::<Vec<_>>()
    .join(",")
}

async fn aws_app(fake: &FakeBedrock, allow_logging: bool) -> common::TestApp {
    aws_app_with(fake, &aws_credentials(), allow_logging).await
}

/// A proxy with `AWS_CREDENTIALS=credentials`, checked at once against the fake.
async fn aws_app_with(
    fake: &FakeBedrock,
    credentials: &str,
    allow_logging: bool,
) -> common::TestApp {
    aws_app_at(fake, credentials, allow_logging, &fake.url).await
}

/// [`aws_app_with`] with Bedrock's control plane (the logging check) at `control_url`.
async fn aws_app_at(
    fake: &FakeBedrock,
    credentials: &str,
    allow_logging: bool,
    control_url: &str,
) -> common::TestApp {
    let allow = allow_logging.to_string();
    common::spawn(
        &[
            "--check-keys",
            "true",
            "--key-check-interval-ms",
            "1",
            "--text-model-rate-limit",
            "0",
            "--aws-credentials",
            credentials,
            "--aws-bedrock-base-url",
            &fake.url,
            "--aws-sts-base-url",
            &fake.url,
            "--aws-bedrock-control-base-url",
            control_url,
            "--allow-aws-logging",
            &allow,
            "--admin-key",
            "clouds-admin-key",
        ],
        &[],
    )
    .await
}

/// Waits (bounded) until every key of `provider` has been checked; returns the views.
async fn checked(app: &common::TestApp, provider: Provider) -> Vec<KeyView> {
    let keys = &app.state.upstreams.provider(provider).keys;
    for _ in 0..1500 {
        let views = keys.views();
        if views.iter().all(|v| v.last_checked.is_some()) {
            return views;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("keys were never all checked: {:?}", keys.views());
}

fn states(views: &[KeyView]) -> Vec<&str> {
    views.iter().map(|v| v.state).collect()
}

fn families(v: &KeyView) -> Vec<String> {
    v.families.clone().unwrap_or_default()
}

/// The public info page as JSON.
async fn info_page(app: &common::TestApp) -> Value {
    reqwest::Client::new()
        .get(format!("{}/", app.url))
        .header("accept", "application/json")
        .send()
        .await
        .expect("info page")
        .json()
        .await
        .expect("info json")
}

async fn post(app: &common::TestApp, path: &str, body: Value) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(format!("{}{path}", app.url))
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .expect("request");
    (r.status().as_u16(), r.text().await.expect("body"))
}

/// A short Claude Sonnet request on a Messages route (`/proxy/aws/...` or `/proxy/gcp/...`).
async fn sonnet(app: &common::TestApp, path: &str) -> (u16, String) {
    post(
        app,
        path,
        json!({"model": "claude-3-5-sonnet-20240620", "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
}

#[tokio::test]
async fn aws_credentials_are_checked_by_identity_logging_and_model_access() {
    let fake = bedrock().await;
    let app = aws_app(&fake, false).await;
    let views = checked(&app, Provider::Aws).await;
    assert_eq!(
        states(&views),
        ["working", "logging", "working", "revoked", "revoked"],
        "{views:?}"
    );
    let all = families(&views[0]);
    for f in [
        "aws-claude",
        "aws-claude-opus",
        "aws-mistral-large",
        "aws-mistral-small",
    ] {
        assert!(all.contains(&f.to_string()), "{all:?}");
    }
    let no_opus = families(&views[2]);
    assert!(no_opus.contains(&"aws-claude".to_string()), "{no_opus:?}");
    assert!(
        !no_opus.contains(&"aws-claude-opus".to_string()),
        "{no_opus:?}"
    );
    let logged = views[1].detail.as_deref().unwrap_or("");
    assert!(logged.contains("ALLOW_AWS_LOGGING"), "{logged}");
    assert!(
        views[0]
            .detail
            .as_deref()
            .unwrap_or("")
            .contains("account 123456789012"),
        "{views:?}"
    );
    assert!(views[3]
        .detail
        .as_deref()
        .unwrap_or("")
        .contains("InvalidClientTokenId"));
    assert!(views[4]
        .detail
        .as_deref()
        .unwrap_or("")
        .contains("SignatureDoesNotMatch"));

    // The operator sees it on /admin/keys: a state of its own, never a secret.
    let text = reqwest::Client::new()
        .get(format!("{}/admin/keys", app.url))
        .bearer_auth("clouds-admin-key")
        .send()
        .await
        .expect("admin keys")
        .text()
        .await
        .expect("body");
    let listing: Value = serde_json::from_str(&text).expect("json");
    let pools: Vec<&str> = listing["providers"]
        .as_array()
        .expect("providers")
        .iter()
        .map(|p| p["pool"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(pools, ["aws (Claude)", "aws (Mistral)"]);
    assert_eq!(listing["providers"][0]["keys"][1]["state"], "logging");
    assert_eq!(listing["providers"][0]["counts"]["logging"], 1);
    // The public info page tells users why a key is out (the original's `privacy` line).
    let info = info_page(&app).await;
    let privacy = info["aws-claude"]["privacy"].as_str().unwrap_or("");
    assert!(
        privacy.starts_with("1 keys are potentially logged")
            && privacy.contains("ALLOW_AWS_LOGGING"),
        "{info}"
    );
    for secret in [SK_GOOD, SK_LOGGED, SK_NO_OPUS, SK_UNKNOWN, SK_WRONG] {
        assert!(!text.contains(secret));
    }

    // The Mistral pool holds the same credentials and knows the same.
    let mistral = checked(&app, Provider::AwsMistral).await;
    assert_eq!(
        states(&mistral),
        ["working", "logging", "working", "revoked", "revoked"]
    );

    // What the fake received: every call signed (it verified each signature), STS asked once
    // per credential on its query path, the logging configuration read by the three valid ones.
    let requests = fake.requests();
    let sts: Vec<_> = requests
        .iter()
        .filter(|r| r.path.starts_with("/?"))
        .collect();
    assert_eq!(sts.len(), 5);
    for r in &sts {
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/?Action=GetCallerIdentity&Version=2011-06-15");
        let auth = r.headers["authorization"].to_str().expect("ascii");
        assert!(auth.starts_with("AWS4-HMAC-SHA256 Credential="), "{auth}");
        assert!(auth.contains("/us-east-1/sts/aws4_request"), "{auth}");
        assert!(r.headers.contains_key("x-amz-date"));
    }
    let logging_reads = requests
        .iter()
        .filter(|r| r.path == "/logging/modelinvocations")
        .count();
    assert_eq!(logging_reads, 3);
    // Only the two bad credentials' identity calls were refused; no probe was unsigned.
    assert_eq!(fake.refused(), 2);
    // No secret ever travels.
    for r in &requests {
        let all = r.everything();
        for secret in [SK_GOOD, SK_LOGGED, SK_NO_OPUS, SK_UNKNOWN, SK_WRONG] {
            assert!(!all.contains(secret));
        }
    }
    // The probes cost nothing: none was served.
    assert!(fake.served_by().is_empty(), "{:?}", fake.served_by());

    // Opus: only the credential with access to it; never the logged one.
    for _ in 0..3 {
        let (status, body) = post(
            &app,
            "/proxy/aws/claude/v1/messages",
            json!({"model": "claude-3-opus-20240229", "max_tokens": 10,
                "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(fake.served_by(), [AK_GOOD, AK_GOOD, AK_GOOD]);
    // Sonnet: the two working credentials take turns.
    for _ in 0..4 {
        let (status, body) = sonnet(&app, "/proxy/aws/claude/v1/messages").await;
        assert_eq!(status, 200, "{body}");
    }
    let served = fake.served_by();
    assert!(
        served[3..].iter().all(|k| k == AK_GOOD || k == AK_NO_OPUS),
        "{served:?}"
    );
    assert!(served[3..].contains(&AK_NO_OPUS.to_string()), "{served:?}");
    // Mistral too is served by a working credential only.
    let (status, body) = post(
        &app,
        "/proxy/aws/mistral/v1/chat/completions",
        json!({"model": "mistral-large-2407", "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let last = fake.served_by().last().cloned().unwrap_or_default();
    assert!(last == AK_GOOD || last == AK_NO_OPUS, "{last}");
}

#[tokio::test]
async fn allow_aws_logging_uses_a_logged_credential_and_says_so() {
    let fake = bedrock().await;
    let app = aws_app(&fake, true).await;
    let views = checked(&app, Provider::Aws).await;
    assert_eq!(
        states(&views),
        ["working", "working", "working", "revoked", "revoked"]
    );
    let detail = views[1].detail.as_deref().unwrap_or("");
    assert!(
        detail.contains("prompts are logged (allowed by ALLOW_AWS_LOGGING)"),
        "{detail}"
    );
    let info = info_page(&app).await;
    let privacy = info["aws-claude"]["privacy"].as_str().unwrap_or("");
    assert!(privacy.contains("Prompts could be logged"), "{info}");
}

#[tokio::test]
async fn a_credential_found_invalid_by_a_request_is_out_of_both_aws_pools() {
    let fake = FakeBedrock::start(&[(AK_GOOD, SK_GOOD)]).await;
    let app = common::spawn(
        &[
            "--text-model-rate-limit",
            "0",
            "--aws-credentials",
            &format!("{AK_UNKNOWN}:{SK_UNKNOWN}:us-east-1,{AK_GOOD}:{SK_GOOD}:us-east-1"),
            "--aws-bedrock-base-url",
            &fake.url,
        ],
        &[],
    )
    .await;
    // Without checks: a Claude request finds the unknown credential out.
    let (status, body) = sonnet(&app, "/proxy/aws/claude/v1/messages").await;
    assert_eq!(status, 200, "{body}");
    let mistral = app
        .state
        .upstreams
        .provider(Provider::AwsMistral)
        .keys
        .views();
    assert_eq!(states(&mistral), ["revoked", "working"]);
    // So a Mistral request goes straight to the good one.
    let refused = fake.refused();
    let (status, body) = post(
        &app,
        "/proxy/aws/mistral/v1/chat/completions",
        json!({"model": "mistral-large-2407", "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(fake.refused(), refused, "the revoked credential was tried");
}

const EMAIL_GOOD: &str = "proxy@good-project.iam.gserviceaccount.com";
const EMAIL_LIMITED: &str = "proxy@limited-project.iam.gserviceaccount.com";
const EMAIL_UNKNOWN: &str = "proxy@gone-project.iam.gserviceaccount.com";

#[tokio::test]
async fn gcp_credentials_are_checked_by_token_grant_and_a_probe_per_family() {
    let vertex = FakeVertex::start(&[
        ("good-project", "us-east5", EMAIL_GOOD),
        ("limited-project", "us-east5", EMAIL_LIMITED),
    ])
    .await;
    vertex
        .state
        .throttled_projects
        .lock()
        .expect("lock")
        .insert("limited-project".into());
    // Claude 3 Haiku is not served: the checker tries the family's next model.
    vertex
        .state
        .missing_models
        .lock()
        .expect("lock")
        .insert("claude-3-haiku@20240307".into());
    let creds = [
        gcp_credential("good-project", EMAIL_GOOD, "us-east5"),
        // The token endpoint does not know this service account: the grant is refused.
        gcp_credential("gone-project", EMAIL_UNKNOWN, "us-east5"),
        gcp_credential("limited-project", EMAIL_LIMITED, "us-east5"),
    ]
    .join(",");
    let app = common::spawn(
        &[
            "--check-keys",
            "true",
            "--key-check-interval-ms",
            "1",
            "--text-model-rate-limit",
            "0",
            "--gcp-credentials",
            &creds,
            "--gcp-vertex-base-url",
            &vertex.url,
            "--gcp-token-url",
            &vertex.token_url,
        ],
        &[],
    )
    .await;
    let views = checked(&app, Provider::Gcp).await;
    assert_eq!(
        states(&views),
        ["working", "revoked", "rate_limited"],
        "{views:?}"
    );
    assert_eq!(
        families(&views[0]),
        ["gcp-claude".to_string(), "gcp-claude-opus".to_string()]
    );
    assert!(views[2].rate_limited_until.is_some());
    assert!(views[1]
        .detail
        .as_deref()
        .unwrap_or("")
        .contains("token grant was refused"));
    // Every probe carried a bearer token the fake had issued (it refuses any other).
    assert_eq!(
        vertex
            .state
            .refused_calls
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    let probes = vertex.requests();
    assert!(probes.iter().any(|r| r
        .path
        .ends_with("/models/claude-3-5-haiku@20241022:rawPredict")));
    assert!(probes.iter().all(|r| r.json()["max_tokens"] == 1));

    // Requests go to the working credential only.
    let before = vertex.requests().len();
    for _ in 0..3 {
        let (status, body) = sonnet(&app, "/proxy/gcp/claude/v1/messages").await;
        assert_eq!(status, 200, "{body}");
    }
    let after = vertex.requests();
    assert!(after[before..]
        .iter()
        .all(|r| r.path.contains("/projects/good-project/")));
}

#[tokio::test]
async fn a_network_error_during_a_check_changes_nothing_and_requests_go_on() {
    let fake = FakeBedrock::start(&[(AK_GOOD, SK_GOOD)]).await;
    // Bedrock's control plane is unreachable: a port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let app = aws_app_at(
        &fake,
        &format!("{AK_GOOD}:{SK_GOOD}:us-east-1"),
        false,
        &closed,
    )
    .await;
    common::cloud::until(20, "the identity call", || {
        fake.requests().iter().any(|r| r.path.starts_with("/?"))
    })
    .await;
    // The request is served whatever the checker is doing.
    let (status, body) = sonnet(&app, "/proxy/aws/claude/v1/messages").await;
    assert_eq!(status, 200, "{body}");
    // The failed check left no verdict: the key is as a request left it, never checked.
    let v = &app.state.upstreams.provider(Provider::Aws).keys.views()[0];
    assert_eq!(v.state, "working");
    assert_eq!(v.last_checked, None);
    // And it is retried after a back-off, not at once: one identity call so far.
    let sts = fake
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/?"))
        .count();
    assert_eq!(sts, 1);
}

#[tokio::test]
async fn a_throttled_check_rests_the_key_without_judging_it() {
    let fake = FakeBedrock::start(&[(AK_GOOD, SK_GOOD)]).await;
    fake.state
        .sts_throttle_next
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let app = aws_app_with(&fake, &format!("{AK_GOOD}:{SK_GOOD}:us-east-1"), false).await;
    let views = checked(&app, Provider::Aws).await;
    // STS said `Throttling`: the key rests (and is checked again after it), not revoked.
    assert_eq!(states(&views), ["rate_limited"]);
    assert!(views[0].rate_limited_until.is_some());
    assert_eq!(
        views[0].families, None,
        "nothing was learnt about its models"
    );
}

#[tokio::test]
async fn with_only_a_logged_credential_requests_are_refused_and_told_why() {
    let fake = bedrock().await;
    let app = aws_app_with(&fake, &format!("{AK_LOGGED}:{SK_LOGGED}:us-east-1"), false).await;
    assert_eq!(states(&checked(&app, Provider::Aws).await), ["logging"]);
    let (status, body) = sonnet(&app, "/proxy/aws/claude/v1/messages").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("ALLOW_AWS_LOGGING=true"), "{body}");
    // No prompt reached the logging account.
    assert!(
        !fake
            .requests()
            .iter()
            .any(|r| r.path.ends_with("/invoke")
                && String::from_utf8_lossy(&r.body).contains("\"hi\"")),
        "a prompt was sent with a logging credential"
    );
}
