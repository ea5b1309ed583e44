//! The key pools of Mistral AI and Azure follow the same rules as OpenAI's and Anthropic's:
//! used in turn, a key the provider rejects (401) is taken out and the request retried on the
//! next, a rate-limited key (429) rests; the info page counts them; an unset variable is a
//! clear 503 naming it; the client's credential never reaches the provider.

mod common;

use common::providers::{fake_azure, fake_mistral, AzureDeployment};
use common::upstream::Reply;
use llm_gatekeeper::providers::Provider;
use serde_json::{json, Value};

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

async fn post(url: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .bearer_auth("client-credential")
        .json(body)
        .send()
        .await
        .expect("request")
}

#[tokio::test]
async fn mistral_keys_rotate_rest_and_drop_out() {
    let fake = fake_mistral("good-key").await;
    let app = common::spawn(
        &[
            "--mistral-ai-key",
            "bad-key,good-key,limited-key",
            "--mistral-ai-base-url",
            &fake.url,
            "--text-model-rate-limit",
            "0",
        ],
        &[],
    )
    .await;
    fake.on_key("limited-key", Reply::rate_limited("60"));
    let url = format!("{}/proxy/mistral-ai/v1/chat/completions", app.url);
    for _ in 0..4 {
        let r = post(&url, &chat("mistral-small-latest")).await;
        assert_eq!(r.status(), 200);
    }
    let creds: Vec<String> = fake
        .requests()
        .iter()
        .map(|r| r.header("authorization").expect("auth").to_string())
        .collect();
    assert!(creds.iter().all(|c| c != "Bearer client-credential"));
    assert_eq!(
        creds.iter().filter(|c| *c == "Bearer bad-key").count(),
        1,
        "a rejected key is tried once, then out: {creds:?}"
    );
    assert_eq!(
        creds.iter().filter(|c| *c == "Bearer limited-key").count(),
        1,
        "a rate-limited key rests: {creds:?}"
    );
    let c = app.state.upstreams.key_counts(Provider::MistralAi);
    assert_eq!((c.total, c.working, c.resting, c.invalid), (3, 1, 1, 1));
    let info: Value = reqwest::Client::new()
        .get(format!("{}/", app.url))
        .header("accept", "application/json")
        .send()
        .await
        .expect("info")
        .json()
        .await
        .expect("json");
    let providers = info["providers"].as_array().expect("providers");
    assert!(providers
        .iter()
        .any(|p| p["name"] == "mistral-ai" && p["keys"] == 3 && p["working"] == 1));
}

#[tokio::test]
async fn azure_credentials_rotate_and_a_rejected_one_drops_out() {
    let deployment = |resource, key| AzureDeployment {
        resource,
        deployment: "chat",
        key,
        model: "gpt-4o-mini-2024-07-18",
    };
    let fake = fake_azure(
        vec![
            deployment("east", "east-key"),
            deployment("west", "west-key"),
        ],
        "2024-10-21",
    )
    .await;
    let app = common::spawn(
        &[
            "--azure-credentials",
            "east:chat:east-key,west:chat:stale-key,west:chat:west-key",
            "--azure-base-url",
            &format!("{}/{{resource}}", fake.url),
            "--text-model-rate-limit",
            "0",
        ],
        &[],
    )
    .await;
    let url = format!("{}/proxy/azure/openai/v1/chat/completions", app.url);
    for _ in 0..4 {
        assert_eq!(post(&url, &chat("chat")).await.status(), 200);
    }
    let c = app.state.upstreams.key_counts(Provider::Azure);
    assert_eq!((c.total, c.working, c.invalid), (3, 2, 1));
    for r in fake.requests() {
        assert!(r.header("authorization").is_none(), "no client credential");
    }
}

#[tokio::test]
async fn unset_provider_variables_are_named() {
    let app = common::spawn(&["--text-model-rate-limit", "0"], &[]).await;
    for (path, var) in [
        ("/proxy/mistral-ai/v1/chat/completions", "MISTRAL_AI_KEY"),
        (
            "/proxy/azure/openai/v1/chat/completions",
            "AZURE_CREDENTIALS",
        ),
    ] {
        let r = post(&format!("{}{path}", app.url), &chat("m")).await;
        assert_eq!(r.status(), 503, "{path}");
        let e: Value = r.json().await.expect("json");
        assert!(
            e["error"]["message"].as_str().expect("msg").contains(var),
            "{e}"
        );
    }
}
