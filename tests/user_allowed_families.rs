//! A user's `allowedFamilies` list: set through `PUT /admin/users/{token}` and the bulk
//! import, exported unchanged by `GET /admin/users`, removed with `null`, and kept across a
//! restart by every persistent backend (SQLite, Firebase RTDB).

mod common;

use common::admin::{admin, get_user, put_user, send, ADMIN_KEY};
use common::persist::{spawn_args, Firebase};
use reqwest::{Client, Method};
use serde_json::{json, Value};

fn user_token_args(store: Vec<String>) -> Vec<String> {
    let mut args: Vec<String> = [
        "--gatekeeper",
        "user_token",
        "--admin-key",
        ADMIN_KEY,
        "--trusted-proxies",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(store);
    args
}

/// Sets lists through the single and the bulk upsert, checks the export, and returns.
async fn set_lists(client: &Client, app: &common::TestApp) {
    let (status, v) = put_user(
        client,
        app,
        "fam-one",
        json!({"allowedFamilies": ["turbo", "claude", "turbo"]}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["allowedFamilies"], json!(["turbo", "claude"]));

    let (status, v) = send(admin(client, app, Method::PUT, "/admin/users").json(
        &json!({"users": [
            {"token": "fam-two", "allowedFamilies": ["gpt4o"]},
            {"token": "fam-three", "nickname": "no list"},
        ]}),
    ))
    .await;
    assert_eq!(status, 200, "{v}");

    let (status, v) = send(admin(client, app, Method::GET, "/admin/users")).await;
    assert_eq!(status, 200);
    let users = v["users"].as_array().expect("users").clone();
    let by_token = |t: &str| -> Value {
        users
            .iter()
            .find(|u| u["token"] == t)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(by_token("fam-two")["allowedFamilies"], json!(["gpt4o"]));
    // Absent means "the proxy's list": the export leaves the field out.
    assert!(by_token("fam-three").get("allowedFamilies").is_none());

    // An export imports back unchanged.
    let (status, again) =
        send(admin(client, app, Method::PUT, "/admin/users").json(&json!({"users": users}))).await;
    assert_eq!(status, 200, "{again}");
    let (_, v) = get_user(client, app, "fam-two").await;
    assert_eq!(v["allowedFamilies"], json!(["gpt4o"]));
}

async fn check_after_restart(client: &Client, app: &common::TestApp) {
    let (status, v) = get_user(client, app, "fam-one").await;
    assert_eq!(status, 200);
    assert_eq!(v["allowedFamilies"], json!(["turbo", "claude"]));
    let (_, v) = get_user(client, app, "fam-two").await;
    assert_eq!(v["allowedFamilies"], json!(["gpt4o"]));
    let (_, v) = get_user(client, app, "fam-three").await;
    assert!(v.get("allowedFamilies").is_none(), "{v}");
}

#[tokio::test]
async fn invalid_lists_are_refused_with_the_field_named() {
    let app = common::admin::user_token_app(&[]).await;
    let client = Client::new();
    for (body, field) in [
        (json!({"allowedFamilies": "turbo"}), "allowedFamilies"),
        (json!({"allowedFamilies": ["GPT 4"]}), "allowedFamilies[0]"),
        (json!({"allowedFamilies": [3]}), "allowedFamilies[0]"),
    ] {
        let (status, v) = put_user(&client, &app, "someone", body).await;
        assert_eq!(status, 400, "{v}");
        assert!(v["error"].as_str().unwrap_or("").contains(field), "{v}");
    }
    // null removes the list again.
    put_user(
        &client,
        &app,
        "someone",
        json!({"allowedFamilies": ["turbo"]}),
    )
    .await;
    let (status, v) = put_user(&client, &app, "someone", json!({"allowedFamilies": null})).await;
    assert_eq!(status, 200);
    assert!(v.get("allowedFamilies").is_none(), "{v}");
}

#[tokio::test]
async fn lists_survive_a_restart_with_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("users.sqlite");
    let store = vec![
        "--gatekeeper-store".to_string(),
        "sqlite".to_string(),
        "--sqlite-path".to_string(),
        path.display().to_string(),
    ];
    let client = Client::new();
    let app = spawn_args(&user_token_args(store.clone())).await;
    set_lists(&client, &app).await;
    // A graceful shutdown flushes every change.
    app.shutdown().await.expect("clean shutdown");
    let app = spawn_args(&user_token_args(store)).await;
    check_after_restart(&client, &app).await;
}

#[tokio::test]
async fn lists_survive_a_restart_with_firebase() {
    let Some(fb) = Firebase::start().await else {
        eprintln!("firebase-server is not installed; skipping");
        return;
    };
    let client = Client::new();
    let app = spawn_args(&user_token_args(fb.args(1))).await;
    set_lists(&client, &app).await;
    app.shutdown().await.expect("clean shutdown");
    let stored = fb.db.get("users/fam-one").await;
    assert_eq!(stored["allowedFamilies"], json!(["turbo", "claude"]));
    let app = spawn_args(&user_token_args(fb.args(1))).await;
    check_after_restart(&client, &app).await;
}
