//! The `/admin/users` REST API as an operator's curl scripts use it: listing and sorting,
//! creating (with default quotas), partial updates, bulk import (all-or-nothing), disabling,
//! and JSON errors that name the field for every kind of bad input.

mod common;

use common::admin::{admin, create_user, get_user, put_user, send, user_token_app, ADMIN_KEY};
use reqwest::{Client, Method};
use serde_json::{json, Value};

#[tokio::test]
async fn create_uses_default_quotas_and_temporary_needs_expiry_and_limits() {
    let app = common::admin::user_token_app_with(
        &[],
        &[("TOKEN_QUOTA_TURBO", "5000"), ("TOKEN_QUOTA_GPT4_32K", "7")],
    )
    .await;
    let c = Client::new();

    // An empty body is `{}`.
    let (status, v) = send(admin(&c, &app, Method::POST, "/admin/users")).await;
    assert_eq!(status, 200, "{v}");
    let token = v["token"].as_str().expect("token");
    assert!(uuid::Uuid::parse_str(token).is_ok(), "a UUID: {token}");
    let (_, user) = get_user(&c, &app, token).await;
    assert_eq!(user["type"], "normal");
    assert_eq!(user["tokenLimits"], json!({"gpt4-32k": 7, "turbo": 5000}));
    assert_eq!(user["promptCount"], 0);
    assert!(user["createdAt"].as_i64().expect("createdAt") > 0);

    let special = create_user(&c, &app, json!({"type": "special"})).await;
    assert_eq!(get_user(&c, &app, &special).await.1["type"], "special");

    let (status, v) = send(
        admin(&c, &app, Method::POST, "/admin/users")
            .json(&json!({"type": "temporary", "tokenLimits": {"turbo": 1}})),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        v["error"].as_str().expect("error").contains("expiresAt"),
        "{v}"
    );
    let (status, v) = send(
        admin(&c, &app, Method::POST, "/admin/users")
            .json(&json!({"type": "temporary", "expiresAt": 4102444800000u64})),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        v["error"].as_str().expect("error").contains("tokenLimits"),
        "{v}"
    );

    let temp = create_user(
        &c,
        &app,
        json!({"type": "temporary", "expiresAt": 4102444800000u64, "tokenLimits": {"claude": 9}}),
    )
    .await;
    let (_, user) = get_user(&c, &app, &temp).await;
    assert_eq!(user["expiresAt"], 4102444800000u64);
    assert_eq!(user["tokenLimits"], json!({"claude": 9}));

    let (status, v) =
        send(admin(&c, &app, Method::POST, "/admin/users").json(&json!({"type": "admin"}))).await;
    assert_eq!(status, 400);
    assert!(
        v["error"].as_str().expect("error").starts_with("type:"),
        "{v}"
    );
    assert_eq!(
        app.state.users.len(),
        3,
        "rejected requests created nothing"
    );
}

#[tokio::test]
async fn put_is_a_partial_update_where_null_removes_and_the_path_wins() {
    let app = user_token_app(&[]).await;
    let c = Client::new();
    let (status, user) = put_user(
        &c,
        &app,
        "tok-1",
        json!({"token": "other", "nickname": "bob", "adminNote": "vip", "maxIps": "2"}),
    )
    .await;
    assert_eq!(status, 200, "{user}");
    assert_eq!(user["token"], "tok-1");
    assert_eq!(user["maxIps"], 2);
    assert!(app.state.users.get("other").is_none());

    let (status, user) = put_user(
        &c,
        &app,
        "tok-1",
        json!({"adminNote": null, "promptCount": 4}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(user.get("adminNote").is_none(), "null removed it: {user}");
    assert_eq!(user["nickname"], "bob", "untouched fields stay");
    assert_eq!(user["promptCount"], 4);

    for (body, field) in [
        (json!({"nickname": "n".repeat(81)}), "nickname"),
        (json!({"promptCount": -1}), "promptCount"),
        (json!({"promptCount": "3"}), "promptCount"),
        (json!({"tokenCounts": {"turbo": "x"}}), "tokenCounts.turbo"),
        (json!({"type": "root"}), "type"),
        (json!({"ip": null}), "ip"),
        (json!({"ip": [1]}), "ip[0]"),
        (json!({"createdAt": 1.5}), "createdAt"),
        (json!({"meta": []}), "meta"),
        (json!([1, 2]), "request body"),
    ] {
        let (status, v) = put_user(&c, &app, "tok-1", body.clone()).await;
        assert_eq!(status, 400, "{body} must be refused");
        let msg = v["error"].as_str().expect("JSON error");
        assert!(msg.contains(field), "{body}: {msg:?} should name {field}");
    }
    let (_, after) = get_user(&c, &app, "tok-1").await;
    assert_eq!(after, user, "rejected updates changed nothing");

    let (status, v) = put_user(&c, &app, "has%20space", json!({})).await;
    assert_eq!(status, 400, "{v}");
}

#[tokio::test]
async fn malformed_json_and_wrong_content_type_get_json_400s() {
    let app = user_token_app(&[]).await;
    let c = Client::new();
    let (status, v) = send(
        admin(&c, &app, Method::PUT, "/admin/users/t")
            .header("content-type", "application/json")
            .body("{\"nickname\": "),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        v["error"]
            .as_str()
            .expect("JSON error")
            .contains("not valid JSON"),
        "{v}"
    );

    let (status, v) = send(
        admin(&c, &app, Method::PUT, "/admin/users")
            .header("content-type", "text/plain")
            .body("{\"users\": []}"),
    )
    .await;
    assert_eq!(
        status, 415,
        "a body that is not declared JSON is refused (issue 12)"
    );
    assert!(
        v["error"]
            .as_str()
            .expect("JSON error")
            .contains("Content-Type"),
        "{v}"
    );

    let (status, v) =
        send(admin(&c, &app, Method::PUT, "/admin/users").json(&json!({"users": "all"}))).await;
    assert_eq!(status, 400);
    assert!(
        v["error"].as_str().expect("error").starts_with("users:"),
        "{v}"
    );
    assert!(app.state.users.is_empty());
}

#[tokio::test]
async fn list_sorts_by_prompt_count_then_last_use_by_default() {
    let app = user_token_app(&[]).await;
    let c = Client::new();
    let body = json!({"users": [
        {"token": "a", "promptCount": 1},
        {"token": "b", "promptCount": 5, "lastUsedAt": 10},
        {"token": "c", "promptCount": 5, "lastUsedAt": 20},
        {"token": "d", "promptCount": 0, "nickname": "zed"},
    ]});
    let (status, _) = send(admin(&c, &app, Method::PUT, "/admin/users").json(&body)).await;
    assert_eq!(status, 200);
    let order = |v: &Value| -> Vec<String> {
        v["users"]
            .as_array()
            .expect("users")
            .iter()
            .map(|u| u["token"].as_str().expect("token").to_string())
            .collect()
    };
    let (status, v) = send(admin(&c, &app, Method::GET, "/admin/users")).await;
    assert_eq!(status, 200);
    assert_eq!(v["count"], 4);
    assert_eq!(order(&v), ["c", "b", "a", "d"]);

    let (_, v) = send(admin(
        &c,
        &app,
        Method::GET,
        "/admin/users?sort=nickname,token",
    ))
    .await;
    assert_eq!(
        order(&v),
        ["d", "c", "b", "a"],
        "users without a nickname last"
    );

    let (status, v) = send(admin(&c, &app, Method::GET, "/admin/users?sort=password")).await;
    assert_eq!(status, 400);
    assert!(v["error"].as_str().expect("error").contains("sort"), "{v}");
}

#[tokio::test]
async fn delete_disables_with_a_reason_and_404s_for_unknown_tokens() {
    let app = user_token_app(&[]).await;
    let c = Client::new();
    let token = create_user(&c, &app, json!({})).await;
    let (status, user) = send(admin(
        &c,
        &app,
        Method::DELETE,
        &format!("/admin/users/{token}?disabledReason=Too%20many%20requests"),
    ))
    .await;
    assert_eq!(status, 200, "{user}");
    assert_eq!(user["disabledReason"], "Too many requests");
    assert!(user["disabledAt"].as_i64().is_some());
    assert!(app.state.users.contains(&token), "disabled, not deleted");

    let (status, v) = send(admin(&c, &app, Method::DELETE, "/admin/users/nobody")).await;
    assert_eq!(status, 404);
    assert_eq!(v, json!({"error": "Not found"}));
    let (status, v) = get_user(&c, &app, "nobody").await;
    assert_eq!(status, 404);
    assert_eq!(v, json!({"error": "Not found"}));

    // Re-enabling is a partial update.
    let (_, user) = put_user(
        &c,
        &app,
        &token,
        json!({"disabledAt": null, "disabledReason": null}),
    )
    .await;
    assert!(user.get("disabledAt").is_none());
}

#[tokio::test]
async fn bulk_import_with_one_bad_record_changes_nothing() {
    let app = user_token_app(&[]).await;
    let c = Client::new();
    put_user(&c, &app, "existing", json!({"nickname": "before"})).await;
    let before = app.state.users.list();
    let body = json!({"users": [
        {"token": "existing", "nickname": "after"},
        {"token": "new-1", "promptCount": 3},
        {"token": "new-2", "tokenCounts": {"turbo": -5}},
    ]});
    let (status, v) = send(admin(&c, &app, Method::PUT, "/admin/users").json(&body)).await;
    assert_eq!(status, 400);
    let msg = v["error"].as_str().expect("error");
    assert!(msg.contains("users[2].tokenCounts.turbo"), "{msg}");
    assert_eq!(app.state.users.list(), before, "nothing was applied");

    let (status, v) = send(
        admin(&c, &app, Method::PUT, "/admin/users").json(&json!({"users": [{"nickname": "x"}]})),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        v["error"]
            .as_str()
            .expect("error")
            .contains("users[0].token"),
        "{v}"
    );
}

#[tokio::test]
async fn admin_api_refuses_everyone_else() {
    let app = user_token_app(&[]).await;
    let c = Client::new();
    let url = format!("{}/admin/users", app.url);

    let resp = c.get(&url).send().await.expect("sent");
    assert_eq!(resp.status(), 401);
    let v: Value = resp.json().await.expect("JSON");
    assert!(v["error"].is_string());

    let resp = c.get(&url).bearer_auth("wrong").send().await.expect("sent");
    assert_eq!(resp.status(), 401);

    // A user token is not an admin key.
    let token = create_user(&c, &app, json!({})).await;
    let resp = c.get(&url).bearer_auth(&token).send().await.expect("sent");
    assert_eq!(resp.status(), 401);

    // x-api-key works as well as Bearer.
    let resp = c
        .get(&url)
        .header("x-api-key", ADMIN_KEY)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn without_admin_key_every_admin_request_is_refused() {
    let app = common::spawn(&["--gatekeeper", "none"], &[]).await;
    let c = Client::new();
    let resp = c
        .get(format!("{}/admin/users", app.url))
        .bearer_auth("anything")
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 401);
    let v: Value = resp.json().await.expect("JSON");
    assert!(
        v["error"].as_str().expect("error").contains("ADMIN_KEY"),
        "{v}"
    );
}
