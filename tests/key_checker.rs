//! Key checkers against a fake OpenAI and Anthropic that judge keys as the real ones do: the
//! operator's keys come out working, trial, over quota, revoked or rate-limited, with the
//! families each serves, and requests are served only by usable keys of the right family.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use common::upstream::{anthropic_json, openai_chat_json};
use llm_gatekeeper::providers::Provider;
use llm_gatekeeper::proxy::keys::KeyView;
use serde_json::{json, Value};

#[derive(Default)]
struct Fake {
    /// Keys of real (non-probe) requests, in order.
    served: Mutex<Vec<String>>,
    /// Keys whose behaviour was changed by the test (key → behaviour name).
    overrides: Mutex<HashMap<String, String>>,
    /// Real chat requests: the key and the `OpenAI-Organization` they carried.
    served_orgs: Mutex<Vec<(String, Option<String>)>>,
    /// Every model-list call: the key and its `OpenAI-Organization`.
    model_lists: Mutex<Vec<(String, Option<String>)>>,
}

/// The organisations of a key: a `multi-…` key belongs to two, others to one.
fn orgs_of(key: &str) -> &'static [&'static str] {
    if key.starts_with("multi") {
        &["org-home", "org-team"]
    } else {
        &["org-solo"]
    }
}

fn org_header(h: &HeaderMap) -> Option<String> {
    h.get("openai-organization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// OpenAI refuses a request whose `OpenAI-Organization` the key does not belong to.
fn wrong_org(key: &str, h: &HeaderMap) -> Option<Response> {
    let org = org_header(h)?;
    (!orgs_of(key).contains(&org.as_str()))
        .then(|| openai_error(401, "invalid_request_error", "mismatched_organization"))
}

async fn organizations(State(f): State<Arc<Fake>>, h: HeaderMap) -> Response {
    let key = bearer(&h);
    match f.behaviour(&key).as_str() {
        "revoked" | "" => openai_error(401, "invalid_request_error", "invalid_api_key"),
        _ => {
            let data: Vec<Value> = orgs_of(&key)
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    json!({"object": "organization", "id": id, "is_default": i == 0,
                    "title": "fake", "personal": i == 0})
                })
                .collect();
            Json(json!({"object": "list", "data": data})).into_response()
        }
    }
}

impl Fake {
    fn behaviour(&self, key: &str) -> String {
        self.overrides
            .lock()
            .expect("lock")
            .get(key)
            .cloned()
            .unwrap_or_else(|| key.split('-').next().unwrap_or("").to_string())
    }
}

fn openai_error(status: u16, kind: &str, code: &str) -> Response {
    (
        StatusCode::from_u16(status).expect("status"),
        Json(json!({"error": {"message": format!("fake {kind}"), "type": kind, "param": null, "code": code}})),
    )
        .into_response()
}

fn bearer(h: &HeaderMap) -> String {
    h.get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_string()
}

async fn models(State(f): State<Arc<Fake>>, h: HeaderMap) -> Response {
    let key = bearer(&h);
    if let Some(refused) = wrong_org(&key, &h) {
        return refused;
    }
    f.model_lists
        .lock()
        .expect("lock")
        .push((key.clone(), org_header(&h)));
    match f.behaviour(&key).as_str() {
        "revoked" => openai_error(401, "invalid_request_error", "invalid_api_key"),
        "trial" => Json(json!({"object": "list", "data": [
            {"id": "gpt-3.5-turbo", "object": "model"}, {"id": "dall-e-3", "object": "model"}
        ]}))
        .into_response(),
        "" => openai_error(401, "invalid_request_error", "missing key"),
        _ => Json(json!({"object": "list", "data": [
            {"id": "gpt-3.5-turbo", "object": "model"}, {"id": "gpt-4o", "object": "model"},
            {"id": "whisper-1", "object": "model"}
        ]}))
        .into_response(),
    }
}

async fn chat(State(f): State<Arc<Fake>>, h: HeaderMap, Json(body): Json<Value>) -> Response {
    let key = bearer(&h);
    if let Some(refused) = wrong_org(&key, &h) {
        return refused;
    }
    let probe = body["max_tokens"] == json!(-1);
    let behaviour = f.behaviour(&key);
    let limit = if behaviour == "trial" { "200" } else { "10000" };
    let mut resp = match behaviour.as_str() {
        "revoked" => openai_error(401, "invalid_request_error", "invalid_api_key"),
        "spent" => openai_error(429, "insufficient_quota", "insufficient_quota"),
        "limited" => {
            let mut r = openai_error(429, "tokens", "rate_limit_exceeded");
            r.headers_mut()
                .insert("retry-after", "120".parse().expect("value"));
            r
        }
        _ if probe => openai_error(400, "invalid_request_error", "integer_below_min_value"),
        _ => {
            f.served.lock().expect("lock").push(key.clone());
            f.served_orgs
                .lock()
                .expect("lock")
                .push((key.clone(), org_header(&h)));
            let model = body["model"].as_str().unwrap_or("m");
            Json(openai_chat_json(model, "hi")).into_response()
        }
    };
    resp.headers_mut()
        .insert("x-ratelimit-limit-requests", limit.parse().expect("value"));
    resp
}

async fn messages(State(f): State<Arc<Fake>>, h: HeaderMap, Json(body): Json<Value>) -> Response {
    assert!(
        h.contains_key("anthropic-version"),
        "anthropic-version is sent"
    );
    let key = h
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let err = |status: u16, kind: &str, msg: &str| {
        (
            StatusCode::from_u16(status).expect("status"),
            Json(json!({"type": "error", "error": {"type": kind, "message": msg}})),
        )
            .into_response()
    };
    let mut resp = match f.behaviour(&key).as_str() {
        "revoked" => err(401, "authentication_error", "invalid x-api-key"),
        "spent" => err(
            400,
            "invalid_request_error",
            "Your credit balance is too low to access the Anthropic API.",
        ),
        "" => err(401, "authentication_error", "missing key"),
        _ => {
            if body["max_tokens"] != json!(1) {
                f.served.lock().expect("lock").push(key.clone());
            }
            Json(anthropic_json(body["model"].as_str().unwrap_or("m"), "hi")).into_response()
        }
    };
    resp.headers_mut().insert(
        "anthropic-ratelimit-tokens-limit",
        "80000".parse().expect("value"),
    );
    resp
}

async fn google_models(State(f): State<Arc<Fake>>, h: HeaderMap) -> Response {
    let key = h
        .get("x-goog-api-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match f.behaviour(key).as_str() {
        "good" => Json(json!({"models": [{"name": "models/gemini-2.5-pro"}]})).into_response(),
        _ => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.", "status": "INVALID_ARGUMENT", "details": [{"reason": "API_KEY_INVALID"}]}})),
        )
            .into_response(),
    }
}

async fn start_fake() -> (Arc<Fake>, String) {
    let fake = Arc::new(Fake::default());
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/organizations", get(organizations))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/messages", post(messages))
        .route("/v1beta/models", get(google_models))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (fake, url)
}

async fn app(url: &str, openai: &str, anthropic: &str) -> common::TestApp {
    common::spawn(
        &[
            "--check-keys",
            "true",
            "--key-check-interval-ms",
            "1",
            "--openai-key",
            openai,
            "--anthropic-key",
            anthropic,
            "--openai-base-url",
            url,
            "--anthropic-base-url",
            url,
            "--text-model-rate-limit",
            "0",
        ],
        &[],
    )
    .await
}

/// Waits (bounded) until every key of `provider` satisfies `done`, and returns the views.
async fn wait_for(
    app: &common::TestApp,
    provider: Provider,
    done: impl Fn(&KeyView) -> bool,
) -> Vec<KeyView> {
    let keys = &app.state.upstreams.provider(provider).keys;
    for _ in 0..1000 {
        let views = keys.views();
        if views.iter().all(&done) {
            return views;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("keys never reached the state: {:?}", keys.views());
}

fn states(views: &[KeyView]) -> Vec<&str> {
    views.iter().map(|v| v.state).collect()
}

async fn chat_request(app: &common::TestApp, model: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", app.url))
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("request")
}

#[tokio::test]
async fn openai_keys_are_judged_and_only_usable_keys_of_the_family_serve() {
    let (fake, url) = start_fake().await;
    let app = app(&url, "good-1,revoked-1,spent-1,trial-1,limited-1", "good-a").await;
    let views = wait_for(&app, Provider::OpenAi, |v| v.last_checked.is_some()).await;
    assert_eq!(
        states(&views),
        ["working", "revoked", "over_quota", "trial", "rate_limited"]
    );
    assert!(views[4].rate_limited_until.is_some());
    assert_eq!(
        views[0].families.as_deref(),
        Some(&["gpt4o".to_string(), "turbo".to_string()][..]),
        "whisper-1 is no chat family"
    );
    // The trial key serves turbo only, and not dall-e (trial keys cannot make images).
    assert_eq!(
        views[3].families.as_deref(),
        Some(&["turbo".to_string()][..])
    );
    // No key ever appears in full.
    let json = serde_json::to_string(&views).expect("json");
    for key in ["good-1", "revoked-1", "spent-1", "trial-1", "limited-1"] {
        assert!(!json.contains(key), "{json}");
    }

    // gpt-4o: only the working key has that family.
    for _ in 0..3 {
        assert_eq!(chat_request(&app, "gpt-4o").await.status(), 200);
    }
    // turbo: the working and the trial key take turns; the bad ones are never tried.
    for _ in 0..4 {
        assert_eq!(chat_request(&app, "gpt-3.5-turbo").await.status(), 200);
    }
    let served = fake.served.lock().expect("lock").clone();
    assert_eq!(
        served,
        ["good-1", "good-1", "good-1", "trial-1", "good-1", "trial-1", "good-1"]
    );
    let counts = app.state.upstreams.key_counts(Provider::OpenAi);
    assert_eq!(
        (
            counts.working,
            counts.invalid,
            counts.over_quota,
            counts.trial,
            counts.resting
        ),
        (2, 1, 1, 1, 1)
    );
}

#[tokio::test]
async fn a_recheck_brings_a_key_back_once_it_has_credit_again() {
    let (fake, url) = start_fake().await;
    let app = app(&url, "good-1", "good-a,spent-a,revoked-a").await;
    let views = wait_for(&app, Provider::Anthropic, |v| v.last_checked.is_some()).await;
    assert_eq!(states(&views), ["working", "over_quota", "revoked"]);
    assert_eq!(views[0].detail.as_deref(), Some("tier: build_2"));
    // The operator adds credit and asks for a recheck.
    fake.overrides
        .lock()
        .expect("lock")
        .insert("spent-a".into(), "good".into());
    let before = views[1].last_checked;
    app.state
        .upstreams
        .provider(Provider::Anthropic)
        .keys
        .request_recheck();
    let views = wait_for(&app, Provider::Anthropic, |v| {
        !v.fingerprint.is_empty() && v.last_checked > before
    })
    .await;
    assert_eq!(states(&views), ["working", "working", "revoked"]);
}

#[tokio::test]
async fn check_keys_false_sends_no_probe() {
    let (fake, url) = start_fake().await;
    let app = common::spawn(
        &[
            "--openai-key",
            "revoked-1,good-1",
            "--openai-base-url",
            &url,
            "--text-model-rate-limit",
            "0",
        ],
        &[],
    )
    .await;
    // Without checks the revoked key is only found out by a request.
    assert_eq!(chat_request(&app, "gpt-4o-mini").await.status(), 200);
    let views = app.state.upstreams.provider(Provider::OpenAi).keys.views();
    assert_eq!(states(&views), ["revoked", "working"]);
    assert!(views.iter().all(|v| v.last_checked.is_none()));
    assert_eq!(*fake.served.lock().expect("lock"), ["good-1"]);
}

#[tokio::test]
async fn google_ai_and_mistral_keys_are_checked_by_their_model_lists() {
    let (_fake, url) = start_fake().await;
    let app = common::spawn(
        &[
            "--check-keys",
            "true",
            "--key-check-interval-ms",
            "1",
            "--google-ai-key",
            "good-g,revoked-g",
            "--google-ai-base-url",
            &url,
            "--mistral-ai-key",
            "revoked-m,good-m",
            "--mistral-ai-base-url",
            &url,
        ],
        &[],
    )
    .await;
    let g = wait_for(&app, Provider::GoogleAi, |v| v.last_checked.is_some()).await;
    assert_eq!(states(&g), ["working", "revoked"]);
    let m = wait_for(&app, Provider::MistralAi, |v| v.last_checked.is_some()).await;
    assert_eq!(states(&m), ["revoked", "working"]);
}

#[tokio::test]
async fn the_operator_sees_every_key_state_on_the_info_page_and_admin_keys() {
    let (_fake, url) = start_fake().await;
    let app = common::spawn(
        &[
            "--check-keys",
            "true",
            "--key-check-interval-ms",
            "1",
            "--openai-key",
            "good-1,revoked-1,spent-1",
            "--openai-base-url",
            &url,
            "--admin-key",
            "admin-secret-key",
        ],
        &[],
    )
    .await;
    wait_for(&app, Provider::OpenAi, |v| v.last_checked.is_some()).await;
    let client = reqwest::Client::new();
    let info: Value = client
        .get(format!("{}/", app.url))
        .header("accept", "application/json")
        .send()
        .await
        .expect("info")
        .json()
        .await
        .expect("json");
    // The revoked key was never listed, so it counts in every OpenAI family.
    let turbo = &info["turbo"];
    assert_eq!(turbo["activeKeys"], 1, "{info}");
    assert_eq!(turbo["revokedKeys"], 1);
    assert_eq!(turbo["overQuotaKeys"], 1);
    assert_eq!(turbo["trialKeys"], 0);
    assert_eq!(turbo["proomptersInQueue"], 0);

    let admin = |req: reqwest::RequestBuilder| req.bearer_auth("admin-secret-key");
    let resp = admin(client.get(format!("{}/admin/keys", app.url)))
        .send()
        .await
        .expect("keys");
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.expect("body");
    for key in ["good-1", "revoked-1", "spent-1"] {
        assert!(!text.contains(key), "a key appears in full: {text}");
    }
    let keys: Value = serde_json::from_str(&text).expect("json");
    let states: Vec<&str> = keys["providers"][0]["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["state"].as_str().expect("state"))
        .collect();
    assert_eq!(states, ["working", "revoked", "over_quota"]);
    // Without the admin key: refused.
    let resp = client
        .get(format!("{}/admin/keys", app.url))
        .send()
        .await
        .expect("keys");
    assert_eq!(resp.status(), 401);
    let resp = admin(client.post(format!("{}/admin/keys/recheck?provider=openai", app.url)))
        .send()
        .await
        .expect("recheck");
    assert_eq!(resp.status(), 202);
    let resp = admin(client.post(format!("{}/admin/keys/recheck?provider=nope", app.url)))
        .send()
        .await
        .expect("recheck");
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn a_key_of_two_organisations_is_used_once_per_organisation() {
    let (fake, url) = start_fake().await;
    let app = app(&url, "multi-1", "good-a").await;
    let keys = &app.state.upstreams.provider(Provider::OpenAi).keys;
    // The check lists the key's organisations and adds an entry for the other one, which is
    // then checked in its turn.
    let mut views = keys.views();
    for _ in 0..1000 {
        views = keys.views();
        if views.len() == 2 && views.iter().all(|v| v.last_checked.is_some()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(views.len(), 2, "{views:?}");
    assert_eq!(states(&views), ["working", "working"]);
    assert_eq!(
        views[1].fingerprint,
        format!("{}/org-team", views[0].fingerprint)
    );
    assert_eq!(views[0].detail.as_deref(), Some("organisation org-home"));
    let json = serde_json::to_string(&views).expect("json");
    assert!(!json.contains("multi-1"), "{json}");
    // The new entry's own check carried its organisation.
    assert!(fake
        .model_lists
        .lock()
        .expect("lock")
        .contains(&("multi-1".to_string(), Some("org-team".to_string()))));

    for _ in 0..4 {
        assert_eq!(chat_request(&app, "gpt-4o").await.status(), 200);
    }
    let served = fake.served_orgs.lock().expect("lock").clone();
    let with_team = served
        .iter()
        .filter(|(_, o)| o.as_deref() == Some("org-team"))
        .count();
    let default = served.iter().filter(|(_, o)| o.is_none()).count();
    assert_eq!((default, with_team), (2, 2), "{served:?}");
    assert_eq!(app.state.upstreams.key_counts(Provider::OpenAi).working, 2);
}
