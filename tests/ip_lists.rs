//! Client addresses and address lists on every route: `IP_BLACKLIST` (403 everywhere but
//! `/health`), `ADMIN_WHITELIST` (403 on `/admin/*`), IPv6 entries, and `X-Forwarded-For`
//! ignored with `TRUSTED_PROXIES=0` but honoured hop-wise with `TRUSTED_PROXIES=1`.

mod common;

use common::admin::{admitted, create_user, proxied, send, user_token_app, ADMIN_KEY};
use common::client_from;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

async fn admin_status(c: &Client, url: &str, xff: Option<&str>) -> (StatusCode, Value) {
    let mut req = c.get(format!("{url}/admin/users")).bearer_auth(ADMIN_KEY);
    if let Some(x) = xff {
        req = req.header("x-forwarded-for", x);
    }
    send(req).await
}

#[tokio::test]
async fn blacklisted_address_is_refused_everywhere_but_health() {
    let app = user_token_app(&["--ip-blacklist", "10.0.0.0/8, 127.0.0.3"]).await;
    let ok = client_from("127.0.0.2");
    let banned = client_from("127.0.0.3");
    let token = create_user(&ok, &app, json!({})).await;

    assert!(admitted(proxied(&ok, &app, &token).await.0));
    let (status, v) = proxied(&banned, &app, &token).await;
    assert_eq!(status, 403, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .expect("message")
        .contains("IP_BLACKLIST"));

    let (status, v) = admin_status(&banned, &app.url, None).await;
    assert_eq!(status, 403, "admin routes too: {v}");
    assert!(v["error"]
        .as_str()
        .expect("admin error shape")
        .contains("IP_BLACKLIST"));

    let resp = banned
        .get(format!("{}/health", app.url))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200, "/health is never blocked");
}

#[tokio::test]
async fn admin_whitelist_refuses_other_addresses_with_the_originals_message() {
    let app = user_token_app(&["--admin-whitelist", "127.0.0.2/32"]).await;
    let (status, _) = admin_status(&client_from("127.0.0.2"), &app.url, None).await;
    assert_eq!(status, 200);
    let outsider = client_from("127.0.0.3");
    let (status, v) = admin_status(&outsider, &app.url, None).await;
    assert_eq!(status, 403);
    assert_eq!(v, json!({"error": "Forbidden (by ADMIN_WHITELIST)"}));

    // The whitelist guards /admin only: proxied routes still work from elsewhere.
    let token = create_user(&client_from("127.0.0.2"), &app, json!({})).await;
    assert!(admitted(proxied(&outsider, &app, &token).await.0));
}

#[tokio::test]
async fn forwarded_for_cannot_be_spoofed_with_zero_trusted_proxies() {
    // user_token_app sets TRUSTED_PROXIES=0.
    let app = user_token_app(&[
        "--admin-whitelist",
        "127.0.0.2",
        "--ip-blacklist",
        "127.0.0.4",
    ])
    .await;
    let outsider = client_from("127.0.0.3");
    let (status, _) = admin_status(&outsider, &app.url, Some("127.0.0.2")).await;
    assert_eq!(
        status, 403,
        "a forged X-Forwarded-For does not get past the whitelist"
    );

    // Nor can a blacklisted client escape by claiming another address.
    let banned = client_from("127.0.0.4");
    let (status, _) = admin_status(&banned, &app.url, Some("127.0.0.2")).await;
    assert_eq!(status, 403);

    // And the address recorded for a user is the socket's, not the header's.
    let token = create_user(&client_from("127.0.0.2"), &app, json!({})).await;
    let resp = outsider
        .get(format!("{}/v1/models", app.url))
        .bearer_auth(&token)
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .expect("sent");
    assert!(admitted(resp.status()));
    let ips = app.state.users.get(&token).expect("user").ip;
    assert_eq!(ips, vec!["127.0.0.3".to_string()]);
}

#[tokio::test]
async fn forwarded_for_is_honoured_behind_one_trusted_proxy() {
    let app = common::spawn(
        &[
            "--gatekeeper",
            "user_token",
            "--admin-key",
            ADMIN_KEY,
            "--trusted-proxies",
            "1",
            "--admin-whitelist",
            "192.0.2.10",
        ],
        &[],
    )
    .await;
    let c = Client::new();
    // The nearest hop (the right-most entry) is the client our one proxy saw.
    let (status, _) = admin_status(&c, &app.url, Some("198.51.100.1, 192.0.2.10")).await;
    assert_eq!(status, 200);
    // A client-supplied entry further left is not trusted.
    let (status, _) = admin_status(&c, &app.url, Some("192.0.2.10, 198.51.100.1")).await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn ipv6_entries_match_ipv6_clients() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipping: this machine has no IPv6 loopback");
        return;
    }
    let cfg = |list_args: &[&str]| {
        let mut args = vec![
            "--gatekeeper",
            "user_token",
            "--admin-key",
            ADMIN_KEY,
            "--trusted-proxies",
            "0",
        ];
        args.extend_from_slice(list_args);
        common::config(&args, &[])
    };
    let c = client_from("::1");

    // An IPv4-only whitelist keeps an IPv6 admin out; an IPv6 entry lets it in.
    let app = common::spawn_with(cfg(&["--admin-whitelist", "127.0.0.0/8"]), "[::1]").await;
    assert_eq!(admin_status(&c, &app.url, None).await.0, 403);
    let app = common::spawn_with(cfg(&["--admin-whitelist", "127.0.0.1,::1/128"]), "[::1]").await;
    assert_eq!(admin_status(&c, &app.url, None).await.0, 200);

    // IPv6 blacklist entries: a CIDR elsewhere does not match, one covering ::1 does.
    let app = common::spawn_with(cfg(&["--ip-blacklist", "2001:db8::/32"]), "[::1]").await;
    assert_eq!(admin_status(&c, &app.url, None).await.0, 200);
    let app = common::spawn_with(cfg(&["--ip-blacklist", "::/127"]), "[::1]").await;
    assert_eq!(admin_status(&c, &app.url, None).await.0, 403);
    let resp = c
        .get(format!("{}/health", app.url))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
}

#[test]
fn an_unparseable_entry_stops_startup_naming_variable_and_entry() {
    let err = llm_gatekeeper::Config::from_args(
        [
            "llm-gatekeeper",
            "--ip-blacklist",
            "10.0.0.0/8,2001:db8::/33x",
        ],
        Vec::<(String, String)>::new(),
    )
    .expect_err("must refuse");
    assert!(
        err.0.contains("IP_BLACKLIST") && err.0.contains("2001:db8::/33x"),
        "{}",
        err.0
    );
}

#[test]
fn the_binary_refuses_to_start_with_a_bad_admin_whitelist() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llm-gatekeeper"))
        .env_clear()
        .env("ADMIN_WHITELIST", "10.0.0.0/8,everyone")
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("PORT", "0")
        .output()
        .expect("binary runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ADMIN_WHITELIST") && stderr.contains("everyone"),
        "{stderr}"
    );
}
