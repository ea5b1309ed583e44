//! End to end with a real third-party client: the `async-openai` crate streams a chat
//! completion through the running server (proxy_key mode) from the fake upstream, and gets an
//! authentication error with a readable message when its key is wrong.

mod common;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs,
};
use async_openai::Client;
use common::upstream::FakeUpstream;
use futures::StreamExt;

fn request() -> CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model("gpt-4o-mini")
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("Say hello")
            .build()
            .expect("message")
            .into()])
        .build()
        .expect("request")
}

fn client(url: &str, key: &str) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{url}/v1"))
            .with_api_key(key),
    )
}

#[tokio::test]
async fn async_openai_streams_and_completes_through_the_proxy() {
    let fake = FakeUpstream::start().await;
    let app = common::spawn(
        &[
            "--gatekeeper",
            "proxy_key",
            "--proxy-key",
            "pk-e2e",
            "--openai-key",
            "sk-operator",
            "--openai-base-url",
            &fake.url,
        ],
        &[],
    )
    .await;
    let openai = client(&app.url, "pk-e2e");

    let mut stream = openai
        .chat()
        .create_stream(request())
        .await
        .expect("stream starts");
    let mut text = String::new();
    let mut events = 0;
    while let Some(event) = stream.next().await {
        let event = event.expect("stream event");
        events += 1;
        for choice in event.choices {
            if let Some(t) = choice.delta.content {
                text.push_str(&t);
            }
        }
    }
    assert_eq!(text, "Hello from the fake upstream");
    assert!(events >= 3, "expected several events, got {events}");
    let seen = fake.last_request();
    assert_eq!(seen.credential().as_deref(), Some("sk-operator"));
    assert_eq!(seen.json()["stream"], true);

    let plain = openai.chat().create(request()).await.expect("completion");
    assert_eq!(
        plain.choices[0].message.content.as_deref(),
        Some("Hello from the fake upstream")
    );
}

#[tokio::test]
async fn async_openai_sees_a_readable_auth_error_for_a_wrong_key() {
    let fake = FakeUpstream::start().await;
    let app = common::spawn(
        &[
            "--gatekeeper",
            "proxy_key",
            "--proxy-key",
            "pk-e2e",
            "--openai-key",
            "sk-operator",
            "--openai-base-url",
            &fake.url,
        ],
        &[],
    )
    .await;
    let err = client(&app.url, "wrong")
        .chat()
        .create(request())
        .await
        .expect_err("must be refused");
    match err {
        OpenAIError::ApiError(api) => {
            assert!(
                api.api_error.message.contains("Invalid proxy key"),
                "{}",
                api.api_error.message
            );
        }
        other => panic!("expected an API error, got {other:?}"),
    }
    assert_eq!(fake.request_count(), 0);
}
