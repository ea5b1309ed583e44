//! The first settlement that needs the tokenizer (a client gone before the upstream answered:
//! its prompt is charged by estimate) loads it on the blocking pool, not on the thread serving
//! requests, whose other requests would wait about 200 ms; the charge is still exact. A test
//! binary of its own: the tokenizer is loaded once per process.

mod common;

use common::quota::{add_user, eventually, hang_up_before_the_answer, proxy, reserved, used};
use common::upstream::FakeUpstream;
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
    let body = json!({"model": "gpt-4o", "max_tokens": 50,
        "messages": [{"role": "user", "content": "Say hello to the gateway, please"}]});
    hang_up_before_the_answer(&app, &fake, "u", &body).await;
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
