//! `GATEKEEPER=user_token` as users notice it: unknown tokens 401, disabled and expired users
//! 403 with the reason, addresses recorded and limited (`MAX_IPS_PER_USER`, `maxIps`, special
//! users exempt, `MAX_IPS_AUTO_BAN`), temporary users refused at expiry, disabled by the sweep
//! and purged later, and an export from the original imported and used at once.

mod common;

use std::time::Duration;

use common::admin::{
    admin, admitted, create_user, get_user, proxied, proxy_message, put_user, send, user_token_app,
    ADMIN_KEY,
};
use common::client_from;
use llm_gatekeeper::users::now_ms;
use llm_gatekeeper::users::sweep::{sweep_once, EXPIRED_REASON};
use reqwest::{Client, Method};
use serde_json::{json, Value};

#[tokio::test]
async fn unknown_token_401_and_known_token_is_admitted_and_recorded() {
    let app = user_token_app(&[]).await;
    let c = client_from("127.0.0.2");
    let token = create_user(&c, &app, json!({})).await;

    let (status, v) = proxied(&c, &app, "not-a-user").await;
    assert_eq!(status, 401, "{v}");
    assert!(proxy_message(&v).contains("Unknown user token"), "{v}");

    let (status, v) = send(c.get(format!("{}/v1/models", app.url))).await;
    assert_eq!(status, 401, "no token at all: {v}");

    let (status, v) = proxied(&c, &app, &token).await;
    assert!(
        admitted(status),
        "a known token passes the gatekeeper: {status} {v}"
    );
    // x-api-key works too (Anthropic clients).
    let resp = c
        .get(format!("{}/v1/models", app.url))
        .header("x-api-key", &token)
        .send()
        .await
        .expect("sent");
    assert!(admitted(resp.status()));

    let (_, user) = get_user(&c, &app, &token).await;
    assert_eq!(user["ip"], json!(["127.0.0.2"]), "address recorded once");
    assert!(user["lastUsedAt"].as_i64().expect("lastUsedAt set") > 0);
    assert_eq!(
        user["promptCount"], 0,
        "promptCount is counted by generation requests only"
    );

    // The admin key passes proxied routes in every mode, as in the original.
    let (status, _) = proxied(&c, &app, ADMIN_KEY).await;
    assert!(admitted(status));
}

#[tokio::test]
async fn disabled_user_gets_403_with_the_reason() {
    let app = user_token_app(&[]).await;
    let c = Client::new();
    let token = create_user(&c, &app, json!({})).await;
    send(admin(
        &c,
        &app,
        Method::DELETE,
        &format!("/admin/users/{token}?disabledReason=Abuse%20reported"),
    ))
    .await;
    let (status, v) = proxied(&c, &app, &token).await;
    assert_eq!(status, 403);
    assert!(proxy_message(&v).contains("Abuse reported"), "{v}");
}

#[tokio::test]
async fn ip_limit_refuses_one_address_too_many_and_special_users_are_exempt() {
    let app = user_token_app(&["--max-ips-per-user", "1"]).await;
    let admin_client = Client::new();
    let token = create_user(&admin_client, &app, json!({})).await;
    let (a, b) = (client_from("127.0.0.2"), client_from("127.0.0.3"));

    assert!(admitted(proxied(&a, &app, &token).await.0));
    let (status, v) = proxied(&b, &app, &token).await;
    assert_eq!(status, 403);
    assert_eq!(
        proxy_message(&v),
        "no more IP addresses allowed for this user token"
    );
    // The first address still works, and the refused one was not recorded.
    assert!(admitted(proxied(&a, &app, &token).await.0));
    let (_, user) = get_user(&admin_client, &app, &token).await;
    assert_eq!(user["ip"], json!(["127.0.0.2"]));
    assert!(user.get("disabledAt").is_none(), "refused, not banned");

    // A user's own maxIps overrides MAX_IPS_PER_USER.
    put_user(&admin_client, &app, &token, json!({"maxIps": 2})).await;
    assert!(admitted(proxied(&b, &app, &token).await.0));

    // Special users have no limit.
    let special = create_user(&admin_client, &app, json!({"type": "special"})).await;
    put_user(&admin_client, &app, &special, json!({"maxIps": 1})).await;
    assert!(admitted(proxied(&a, &app, &special).await.0));
    assert!(admitted(proxied(&b, &app, &special).await.0));
}

#[tokio::test]
async fn ip_limit_with_auto_ban_disables_the_user() {
    let app = user_token_app(&["--max-ips-per-user", "1", "--max-ips-auto-ban", "true"]).await;
    let admin_client = Client::new();
    let token = create_user(&admin_client, &app, json!({})).await;
    let (a, b) = (client_from("127.0.0.2"), client_from("127.0.0.3"));
    assert!(admitted(proxied(&a, &app, &token).await.0));
    let (status, v) = proxied(&b, &app, &token).await;
    assert_eq!(status, 403);
    assert!(
        proxy_message(&v).contains("IP address limit exceeded"),
        "{v}"
    );
    let (_, user) = get_user(&admin_client, &app, &token).await;
    assert!(user["disabledAt"].as_i64().is_some(), "banned: {user}");
    // Now refused from every address.
    assert_eq!(proxied(&a, &app, &token).await.0, 403);
}

#[tokio::test]
async fn temporary_user_is_refused_at_expiry_then_disabled_by_the_sweep_and_purged() {
    let app = user_token_app(&[]).await;
    let c = Client::new();
    let expires_at = now_ms() + 3_000;
    let token = create_user(
        &c,
        &app,
        json!({"type": "temporary", "expiresAt": expires_at, "tokenLimits": {"turbo": 1000}}),
    )
    .await;
    let (status, _) = proxied(&c, &app, &token).await;
    // Only meaningful if this machine answered before the expiry.
    if now_ms() < expires_at {
        assert!(admitted(status), "valid before expiry");
    }

    // Refused from the moment of expiry, before any sweep ran.
    while now_ms() <= expires_at {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, v) = proxied(&c, &app, &token).await;
    assert_eq!(status, 403);
    assert!(proxy_message(&v).contains(EXPIRED_REASON), "{v}");

    // The background sweep (every few seconds) records it as disabled.
    let mut user = Value::Null;
    for _ in 0..300 {
        user = get_user(&c, &app, &token).await.1;
        if user.get("disabledAt").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(user["disabledReason"], EXPIRED_REASON, "{user}");

    // POW_TOKEN_PURGE_HOURS (48) after being disabled it is deleted; the sweep's clock is
    // injected to get there.
    let disabled_at = user["disabledAt"].as_i64().expect("disabledAt");
    let purge_after = Duration::from_secs(48 * 3600);
    let report = sweep_once(&app.state.users, disabled_at + 47 * 3_600_000, purge_after);
    assert_eq!(report.purged, 0);
    let report = sweep_once(&app.state.users, disabled_at + 48 * 3_600_000, purge_after);
    assert_eq!(report.purged, 1);
    assert_eq!(get_user(&c, &app, &token).await.0, 404);
    assert_eq!(proxied(&c, &app, &token).await.0, 401);
}

#[tokio::test]
async fn original_export_imports_with_one_put_and_its_tokens_work() {
    let app = user_token_app(&[]).await;
    let c = Client::new();
    let export: Value = serde_json::from_str(include_str!("fixtures/original_users.json"))
        .expect("fixture is JSON");
    let (status, v) = send(admin(&c, &app, Method::PUT, "/admin/users").json(&export)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["count"], 4);

    // Imported unchanged (the deprecated tokenCount is dropped).
    for original in export["users"].as_array().expect("users") {
        let token = original["token"].as_str().expect("token");
        let (status, stored) = get_user(&c, &app, token).await;
        assert_eq!(status, 200);
        let mut expected = original.clone();
        expected
            .as_object_mut()
            .expect("object")
            .remove("tokenCount");
        assert_eq!(stored, expected, "user {token} imported unchanged");
    }

    let alice = "3f9a1c2e-8b7d-4e6f-9a1b-2c3d4e5f6a7b";
    let special = "0b6e2f4a-1c3d-4b5e-8f7a-9d0c1b2a3e4f";
    let mallory = "9c8b7a6d-5e4f-4a3b-b2c1-d0e9f8a7b6c5";
    let temporary = "5d4c3b2a-1f0e-4d9c-8b7a-6f5e4d3c2b1a";
    for token in [alice, special, temporary] {
        let (status, v) = proxied(&c, &app, token).await;
        assert!(admitted(status), "{token}: {status} {v}");
    }
    let (status, v) = proxied(&c, &app, mallory).await;
    assert_eq!(status, 403);
    assert!(
        proxy_message(&v).contains("Sharing the token publicly."),
        "{v}"
    );
    assert_eq!(
        proxied(&c, &app, "3f9a1c2e-0000-0000-0000-000000000000")
            .await
            .0,
        401
    );

    // The new address joined the imported ones.
    let (_, stored) = get_user(&c, &app, alice).await;
    assert_eq!(
        stored["ip"],
        json!(["203.0.113.7", "198.51.100.23", "127.0.0.1"])
    );
}
