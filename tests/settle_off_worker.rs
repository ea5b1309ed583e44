//! The first settlement that needs the tokenizer (a client gone before the upstream answered:
//! its prompt is charged by estimate) loads it on the blocking pool, not on the thread serving
//! requests, whose other requests would wait about 200 ms; the charge is still exact. A test
//! binary of its own: the tokenizer is loaded once per process.

mod common;

use std::time::Duration;

use common::quota::{add_user, eventually, proxy, reserved, used};
use common::upstream::{FakeUpstream, Reply};
use llm_gatekeeper::quota::estimate::{loaded_on, prompt_tokens, tokenizer_loaded};
use llm_gatekeeper::users::UserType;
use serde_json::json;

// A current-thread runtime: the server's requests are served on this test's thread.
#[tokio::test]
async fn the_first_estimate_loads_the_tokenizer_off_the_serving_thread() {
    assert!(!tokenizer_loaded(), "nothing loaded the tokenizer yet");
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake, &["--text-model-rate-limit", "0"], &[]).await;
    add_user(&app, "u", UserType::Normal, &[]);
    fake.push(
        Reply::json(
            200,
            json!({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}),
        )
        .delayed(Duration::from_secs(60)),
    );
    let body = json!({"model": "gpt-4o", "max_tokens": 50,
        "messages": [{"role": "user", "content": "Say hello to the gateway, please"}]});
    let url = format!("{}/v1/chat/completions", app.url);
    let sent = body.clone();
    let task = tokio::spawn(async move {
        let _ = reqwest::Client::new()
            .post(url)
            .bearer_auth("u")
            .json(&sent)
            .send()
            .await;
    });
    eventually("the upstream got the request", || fake.request_count() == 1).await;
    task.abort();
    eventually("the prompt is charged", || used(&app, "u", "gpt4o") > 0).await;
    assert_eq!(reserved(&app, "u", "gpt4o"), 0);
    let serving = std::thread::current().id();
    assert!(
        loaded_on().is_some_and(|t| t != serving),
        "the tokenizer was loaded by the thread serving requests"
    );
    // Exact: what the tokenizer counts for the prompt.
    let facts = llm_gatekeeper::providers::Api::OpenAiChat
        .provider()
        .request_facts(llm_gatekeeper::providers::Api::OpenAiChat, &body)
        .expect("facts");
    assert_eq!(used(&app, "u", "gpt4o"), prompt_tokens(&facts));
}
