//! OpenAI image generation (`/v1/images/generations`, `{route}/openai-image/...`, the alias
//! `{route}/openai/...`): counted in the `dall-e` family at the original's rate (US$1 of image
//! cost = 100 000 tokens, priced per model, size and quality), refused when the price does not
//! fit the user's quota, and a bad `n` is a 400.

mod common;

use common::quota::{add_user, eventually, post, proxy, reserved, used};
use common::upstream::FakeUpstream;
use llm_gatekeeper::users::UserType;
use serde_json::{json, Value};

const NO_RATE: &[&str] = &["--text-model-rate-limit", "0"];
/// Image generation is off by default (ALLOWED_MODEL_FAMILIES, as in the original).
const IMAGES_ON: &[(&str, &str)] = &[("ALLOWED_MODEL_FAMILIES", "dall-e")];

#[tokio::test]
async fn images_are_counted_by_their_price_on_every_route() {
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake, NO_RATE, IMAGES_ON).await;
    add_user(&app, "u", UserType::Normal, &[("dall-e", 100_000)]);
    let c = reqwest::Client::new();
    let mut expected = 0;
    for (path, body, cost) in [
        (
            "/v1/images/generations",
            json!({"model": "dall-e-3", "prompt": "a cat", "quality": "hd", "size": "1792x1024"}),
            12_000,
        ),
        (
            "/proxy/openai-image/v1/images/generations",
            json!({"model": "dall-e-3", "prompt": "a cat", "n": 2}),
            8_000,
        ),
        (
            "/proxy/openai/v1/images/generations",
            json!({"prompt": "a dog", "size": "256x256"}),
            1_600,
        ),
    ] {
        let r = post(&c, &app, path, "u", &body).await;
        assert_eq!(r.status(), 200, "{path}");
        let v: Value = r.json().await.expect("json");
        assert!(v["data"][0]["url"].is_string());
        let req = fake.last_request();
        assert_eq!(req.path, "/v1/images/generations");
        assert_eq!(req.credential().as_deref(), Some("sk-operator-openai"));
        expected += cost;
        eventually("settled", || reserved(&app, "u", "dall-e") == 0).await;
        assert_eq!(used(&app, "u", "dall-e"), expected, "{path}");
    }
}

#[tokio::test]
async fn an_image_that_does_not_fit_is_refused_and_a_bad_n_is_a_400() {
    let fake = FakeUpstream::start().await;
    let app = proxy(&fake, NO_RATE, IMAGES_ON).await;
    add_user(&app, "u", UserType::Normal, &[("dall-e", 5_000)]);
    let c = reqwest::Client::new();
    let body = json!({"model": "dall-e-3", "prompt": "a cat", "quality": "hd"});
    let r = post(&c, &app, "/v1/images/generations", "u", &body).await;
    assert_eq!(r.status(), 429, "8 000 tokens do not fit in 5 000");
    let body = json!({"model": "dall-e-3", "prompt": "a cat", "n": "2"});
    let r = post(&c, &app, "/v1/images/generations", "u", &body).await;
    assert_eq!(r.status(), 400);
    let body = json!({"model": "dall-e-3", "prompt": "a cat", "size": "256x256"});
    let r = post(&c, &app, "/v1/images/generations", "u", &body).await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.expect("json");
    assert!(e["error"]["message"]
        .as_str()
        .expect("msg")
        .contains("size"));
    assert_eq!(fake.request_count(), 0);
}
