//! `GATEKEEPER_STORE=firebase_rtdb` against a real RTDB-compatible server (npm
//! `firebase-server`) behind a relay that records requests and can fail on demand, with a local
//! OAuth token endpoint named by the test key's `token_uri`. Skipped (with a note) when
//! firebase-server is not installed, unless `CI` is set.

mod common;

use std::sync::atomic::Ordering;

use common::persist::{
    eventually, last_ack, persist_status, spawn_args, usage_child, usage_child_main, Firebase,
    FirebaseServer, Proc, ACCESS_TOKEN, CLIENT_EMAIL,
};
use llm_gatekeeper::users::{fingerprint, User, UserType};
use serde_json::{json, Value};

const UUID: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";

fn user(token: &str, prompts: u64) -> User {
    let mut u = User::new(
        token.into(),
        UserType::Normal,
        Default::default(),
        1_700_000_000_000,
    );
    u.prompt_count = prompts;
    u
}

fn s(v: &[(String, String)], extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut out = v.to_vec();
    out.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    out
}

/// Waits until the database holds `value` at `path`.
async fn db_has(fb: &Firebase, path: &str, value: Value) {
    eventually(15, &format!("{path} = {value}"), || async {
        (fb.db.get(path).await == value).then_some(())
    })
    .await
}

#[tokio::test]
async fn loads_existing_users_over_oauth_and_leaves_bad_records_untouched() {
    let Some(fb) = Firebase::start().await else {
        return;
    };
    let bad = json!({"token": "bad-record", "promptCount": "lots"});
    fb.db
        .put(
            "users",
            &json!({
                UUID: {"token": UUID, "type": "special", "promptCount": 3, "ip": ["1.2.3.4"],
                       "tokenCounts": {"claude": 7}, "createdAt": 1690000000000u64, "nickname": "bob"},
                "bad-record": bad,
            }),
        )
        .await;
    let app = spawn_args(&fb.args(1)).await;

    let loaded = app.state.users.get(UUID).expect("existing user loaded");
    assert_eq!(loaded.kind, UserType::Special);
    assert_eq!(loaded.prompt_count, 3);
    assert_eq!(loaded.token_counts.get("claude"), Some(&7));
    assert_eq!(loaded.nickname.as_deref(), Some("bob"));
    assert!(!app.state.users.contains("bad-record"));
    let status = persist_status(&app.url).await;
    assert_eq!(status["backend"], "firebase_rtdb");
    let skipped = status["skippedRecords"].to_string();
    assert!(skipped.contains(&fingerprint("bad-record")), "{skipped}");
    assert!(
        !skipped.contains("bad-record"),
        "the token itself is not shown"
    );

    // The service account's JWT-bearer grant went to the key's token_uri.
    let grants = fb.tokens.state.grants.lock().expect("lock").clone();
    assert!(!grants.is_empty(), "the token endpoint was called");
    let g = &grants[0];
    assert_eq!(g.grant_type, "urn:ietf:params:oauth:grant-type:jwt-bearer");
    assert_eq!(g.jwt_header["alg"], "RS256");
    assert_eq!(g.claims["iss"], CLIENT_EMAIL);
    assert_eq!(g.claims["aud"], fb.tokens.uri.as_str());
    let scope = g.claims["scope"].as_str().expect("scope");
    assert!(scope.contains("https://www.googleapis.com/auth/firebase.database"));
    assert!(scope.contains("https://www.googleapis.com/auth/userinfo.email"));
    // …and its access token reached the database.
    let get = fb.relay.state.requests()[0].clone();
    assert_eq!(
        (get.method.as_str(), get.uri.as_str()),
        ("GET", "/users.json")
    );
    assert_eq!(
        get.authorization.as_deref(),
        Some(format!("Bearer {ACCESS_TOKEN}").as_str())
    );

    // A flush of another user never touches the record that did not parse.
    app.state.users.update(UUID, |u| u.prompt_count += 1);
    db_has(&fb, &format!("users/{UUID}/promptCount"), json!(4)).await;
    assert_eq!(fb.db.get("users/bad-record").await, bad);
    assert!(fb
        .relay
        .state
        .patches()
        .iter()
        .all(|p| !p.body.contains("bad-record")));
    // The access token is cached, not fetched per request.
    assert_eq!(fb.tokens.state.calls.load(Ordering::SeqCst), 1);
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn new_user_and_usage_appear_within_the_flush_interval() {
    let Some(fb) = Firebase::start().await else {
        return;
    };
    let app = spawn_args(&fb.args(1)).await;
    app.state.users.upsert(user("new-user", 0));
    db_has(&fb, "users/new-user/token", json!("new-user")).await;

    app.state.users.update("new-user", |u| {
        u.prompt_count = 5;
        u.token_counts.insert("claude", 1234);
    });
    db_has(&fb, "users/new-user/promptCount", json!(5)).await;
    assert_eq!(
        fb.db.get("users/new-user/tokenCounts/claude").await,
        json!(1234)
    );

    let patches = fb.relay.state.patches();
    assert!(!patches.is_empty());
    for p in &patches {
        assert_eq!(
            p.uri, "/users.json",
            "one multi-path PATCH on the users node"
        );
        assert_eq!(
            p.authorization.as_deref(),
            Some(format!("Bearer {ACCESS_TOKEN}").as_str())
        );
    }
    let status = persist_status(&app.url).await;
    assert!(status["lastFlushOkMs"].is_i64(), "{status}");
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn an_access_token_near_expiry_is_renewed_before_use() {
    let Some(fb) = Firebase::start().await else {
        return;
    };
    // Tokens valid for 5 minutes are within the renewal margin: each use fetches a new one.
    fb.tokens.state.expires_in.store(300, Ordering::SeqCst);
    let app = spawn_args(&fb.args(3600)).await;
    assert_eq!(fb.tokens.state.calls.load(Ordering::SeqCst), 1);
    app.state.users.upsert(user("renewed", 1));
    app.state.users.request_flush();
    db_has(&fb, "users/renewed/promptCount", json!(1)).await;
    assert_eq!(fb.tokens.state.calls.load(Ordering::SeqCst), 2);
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn admin_writes_are_flushed_immediately() {
    let Some(fb) = Firebase::start().await else {
        return;
    };
    // An hour between periodic flushes: only the flush request can write within the test.
    let app = spawn_args(&fb.args(3600)).await;
    app.state.users.upsert(user("admin-made", 0));
    app.state.users.request_flush();
    db_has(&fb, "users/admin-made/token", json!("admin-made")).await;
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn changes_made_during_an_outage_all_arrive_afterwards() {
    let Some(fb) = Firebase::start().await else {
        return;
    };
    fb.db
        .put(
            "users",
            &json!({"old": {"token": "old", "promptCount": 1}, "gone": {"token": "gone"}}),
        )
        .await;
    let app = spawn_args(&fb.args(1)).await;
    fb.relay.state.fail.store(true, Ordering::SeqCst);

    app.state.users.upsert(user("during-1", 1));
    app.state.users.upsert(user("during-2", 2));
    for _ in 0..9 {
        app.state.users.update("old", |u| u.prompt_count += 1);
    }
    app.state.users.remove("gone");

    // The failure is visible, the changes wait, and the proxy keeps serving.
    let status = eventually(15, "a failed flush in the status", || async {
        let s = persist_status(&app.url).await;
        (s["consecutiveFailures"].as_u64() >= Some(1)).then_some(s)
    })
    .await;
    assert!(
        status["lastError"]
            .as_str()
            .expect("lastError")
            .contains("503"),
        "{status}"
    );
    // The public status names the variable, not the database's address.
    assert!(
        !status.to_string().contains(&fb.relay.addr.to_string()),
        "{status}"
    );
    let waiting =
        status["pending"].as_u64().unwrap_or(0) + status["inFlight"].as_u64().unwrap_or(0);
    assert_eq!(waiting, 4, "{status}");
    assert_eq!(fb.db.get("users/during-1").await, Value::Null);
    let health = reqwest::get(format!("{}/health", app.url))
        .await
        .expect("health");
    assert_eq!(health.status(), 200);

    // More changes while still down, then recovery.
    app.state.users.update("during-1", |u| u.prompt_count = 11);
    fb.relay.state.fail.store(false, Ordering::SeqCst);
    db_has(&fb, "users/during-1/promptCount", json!(11)).await;
    db_has(&fb, "users/during-2/promptCount", json!(2)).await;
    db_has(&fb, "users/old/promptCount", json!(10)).await;
    db_has(&fb, "users/gone", Value::Null).await;
    let status = eventually(15, "recovery in the status", || async {
        let s = persist_status(&app.url).await;
        (s["consecutiveFailures"] == 0 && s["pending"] == 0).then_some(s)
    })
    .await;
    assert!(
        status["lastError"].is_string(),
        "the last error stays for diagnosis"
    );
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_change_made_while_a_flush_is_in_flight_is_not_lost() {
    let Some(fb) = Firebase::start().await else {
        return;
    };
    let app = spawn_args(&fb.args(3600)).await;
    fb.relay.state.patch_delay_ms.store(1500, Ordering::SeqCst);
    app.state.users.upsert(user("racer", 1));
    app.state.users.request_flush();
    // The relay records the PATCH as it arrives, then holds it for 1.5 s.
    eventually(15, "the first PATCH to be in flight", || async {
        (!fb.relay.state.patches().is_empty()).then_some(())
    })
    .await;
    app.state.users.update("racer", |u| u.prompt_count = 2);
    app.state.users.request_flush();
    db_has(&fb, "users/racer/promptCount", json!(2)).await;
    let patches = fb.relay.state.patches();
    assert!(
        patches[0].body.contains(r#""promptCount":1"#),
        "{}",
        patches[0].body
    );
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn graceful_shutdown_flushes_pending_changes() {
    let Some(fb) = Firebase::start().await else {
        return;
    };
    let app = spawn_args(&fb.args(3600)).await;
    app.state.users.upsert(user("at-shutdown", 0));
    for _ in 0..7 {
        app.state
            .users
            .update("at-shutdown", |u| u.prompt_count += 1);
    }
    assert_eq!(fb.db.get("users/at-shutdown").await, Value::Null);
    app.shutdown().await.expect("clean shutdown");
    assert_eq!(fb.db.get("users/at-shutdown/promptCount").await, json!(7));
}

#[tokio::test]
async fn sigterm_flushes_pending_changes() {
    let Some(fb) = Firebase::start().await else {
        return;
    };
    let env = s(
        &fb.env(3600),
        &[
            ("PERSIST_CHILD_TOKEN", "sigterm-user"),
            ("PERSIST_CHILD_STEPS", "40"),
        ],
    );
    let mut child = usage_child("persist_usage_child", &env);
    child.wait_for("DONE 40").await;
    assert_eq!(
        fb.db.get("users/sigterm-user").await,
        Value::Null,
        "nothing flushed yet"
    );
    let status = child.term().await;
    let out = child.output();
    assert!(status.success(), "exit after SIGTERM: {status}\n{out}");
    assert!(out.contains("CHILD EXITED CLEANLY"), "{out}");
    assert_eq!(last_ack(&out), 40);
    assert_eq!(fb.db.get("users/sigterm-user/promptCount").await, json!(40));
}

#[tokio::test]
async fn the_binary_stores_admin_changes_even_when_sigterm_comes_during_an_outage() {
    let Some(fb) = Firebase::start().await else {
        return;
    };
    const ADMIN_KEY: &str = "persist-test-admin-key-0123456789";
    let env = s(
        &fb.env(3600),
        &[("GATEKEEPER", "user_token"), ("ADMIN_KEY", ADMIN_KEY)],
    );
    let mut bin = Proc::binary(&env);
    let url = bin.wait_listening().await;
    let client = reqwest::Client::new();
    let create = || async {
        let v: Value = client
            .post(format!("{url}/admin/users"))
            .bearer_auth(ADMIN_KEY)
            .json(&json!({"type": "special"}))
            .send()
            .await
            .expect("create user")
            .json()
            .await
            .expect("json");
        v["token"].as_str().expect("token").to_string()
    };

    // Admin writes reach the database at once, although the interval is an hour.
    let first = create().await;
    db_has(&fb, &format!("users/{first}/type"), json!("special")).await;
    let resp = client
        .delete(format!("{url}/admin/users/{first}?disabledReason=abuse"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .expect("disable");
    assert_eq!(resp.status(), 200);
    db_has(
        &fb,
        &format!("users/{first}/disabledReason"),
        json!("abuse"),
    )
    .await;

    // During an outage an admin creates a user; the flush fails and the change waits.
    fb.relay.state.fail.store(true, Ordering::SeqCst);
    let second = create().await;
    eventually(15, "a failed flush", || async {
        let s = persist_status(&url).await;
        (s["consecutiveFailures"].as_u64() >= Some(1)).then_some(())
    })
    .await;
    // SIGTERM while the database is still down; it comes back within the final flush's 10 s.
    bin.signal_term();
    // Once the shutdown has begun, a flush has tried (and failed) while the database is down.
    eventually(15, "a failed flush after SIGTERM", || async {
        let out = bin.output();
        let after = &out[out.find("shutting down")?..];
        after.contains("flushing users failed").then_some(())
    })
    .await;
    fb.relay.state.fail.store(false, Ordering::SeqCst);
    let status = bin.wait_exit().await;
    let out = bin.output();
    assert!(status.success(), "{status}\n{out}");
    assert_eq!(
        fb.db.get(&format!("users/{second}/token")).await,
        json!(second),
        "{out}"
    );
    assert!(out.contains("every user change is stored"), "{out}");
}

/// Not a test: the child process for [`sigterm_flushes_pending_changes`].
#[tokio::test]
#[ignore = "child process of other tests"]
async fn persist_usage_child() {
    usage_child_main().await;
}

#[tokio::test]
async fn a_restart_reloads_everything() {
    let Some(fb) = Firebase::start().await else {
        return;
    };
    let app = spawn_args(&fb.args(1)).await;
    let mut special = user("keep-special", 3);
    special.kind = UserType::Special;
    special.token_counts.insert("gpt4", 99);
    app.state.users.upsert(special.clone());
    let mut disabled = user("keep-disabled", 1);
    disabled.disabled_at = Some(1_700_000_000_500);
    disabled.disabled_reason = Some("abuse".into());
    app.state.users.upsert(disabled.clone());
    app.state.users.upsert(user("purged", 0));
    db_has(&fb, "users/purged/token", json!("purged")).await;
    app.state.users.remove("purged");
    app.shutdown().await.expect("clean shutdown");
    assert_eq!(
        fb.db.get("users/purged").await,
        Value::Null,
        "deleted as null"
    );

    let again = spawn_args(&fb.args(1)).await;
    assert_eq!(again.state.users.get("keep-special"), Some(special));
    assert_eq!(again.state.users.get("keep-disabled"), Some(disabled));
    assert!(!again.state.users.contains("purged"));
    again.shutdown().await.expect("clean shutdown");

    // The real binary loads the same users and exits 0 on SIGTERM.
    let mut bin = Proc::binary(&fb.env(1));
    let url = bin.wait_listening().await;
    let v: Value = reqwest::get(format!("{url}/health?verbose"))
        .await
        .expect("health")
        .json()
        .await
        .expect("json");
    assert_eq!(v["users"], 2, "{v}");
    let status = bin.term().await;
    assert!(status.success(), "{status}\n{}", bin.output());
}

#[tokio::test]
async fn large_batches_are_chunked_and_any_token_round_trips() {
    let Some(fb) = Firebase::start().await else {
        return;
    };
    let app = spawn_args(&fb.args(3600)).await;
    for i in 0..1200 {
        app.state.users.upsert(user(&format!("bulk-{i:04}"), i));
    }
    let odd = "odd.token/with$#[chars]%";
    app.state.users.upsert(user(odd, 42));
    app.shutdown().await.expect("clean shutdown");
    let patches = fb.relay.state.patches();
    assert_eq!(patches.len(), 3, "1201 users in chunks of 500");
    // The odd token is stored under an escaped key and read back as itself.
    let stored = fb
        .db
        .get("users/odd%2Etoken%2Fwith%24%23%5Bchars%5D%25")
        .await;
    assert_eq!(stored["token"], odd);

    let again = spawn_args(&fb.args(3600)).await;
    assert_eq!(again.state.users.len(), 1201);
    assert_eq!(again.state.users.get(odd).map(|u| u.prompt_count), Some(42));
    assert_eq!(
        again.state.users.get("bulk-1199").map(|u| u.prompt_count),
        Some(1199)
    );
    again.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn the_emulator_host_gets_ns_and_no_oauth() {
    let Some(db) = FirebaseServer::start() else {
        return;
    };
    let relay = common::persist::relay(&db.url).await;
    let args = [
        "--gatekeeper-store",
        "firebase_rtdb",
        "--firebase-rtdb-url",
        "https://my-db-default-rtdb.firebaseio.com",
        "--firebase-database-emulator-host",
        &relay.addr.to_string(),
        "--gatekeeper-store-flush-secs",
        "1",
    ];
    let app = common::spawn(&args, &[]).await;
    app.state.users.upsert(user("emu", 1));
    eventually(15, "the user in the emulator", || async {
        (db.get("users/emu/token").await == json!("emu")).then_some(())
    })
    .await;
    app.shutdown().await.expect("clean shutdown");
    let reqs = relay.state.requests();
    assert!(reqs.iter().any(|r| r.method == "PATCH"));
    for r in reqs {
        assert_eq!(r.uri, "/users.json?ns=my-db-default-rtdb");
        assert_eq!(r.authorization, None);
    }
}

#[tokio::test]
async fn startup_fails_when_the_database_is_unreachable() {
    let Some(fb) = Firebase::start().await else {
        return;
    };
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut env = fb.env(1);
    env[1].1 = format!("http://127.0.0.1:{closed}");
    let mut bin = Proc::binary(&env);
    let status = bin.wait_exit().await;
    let out = bin.output();
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains("FIREBASE_RTDB_URL"), "{out}");
    assert!(out.to_lowercase().contains("connection refused"), "{out}");
}

#[tokio::test]
async fn startup_fails_when_credentials_are_rejected() {
    let Some(fb) = Firebase::start().await else {
        return;
    };
    // The token endpoint refuses the key (a revoked key).
    fb.tokens.state.reject.store(true, Ordering::SeqCst);
    let mut bin = Proc::binary(&fb.env(1));
    let status = bin.wait_exit().await;
    let out = bin.output();
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains("FIREBASE_KEY"), "{out}");
    assert!(
        out.contains("400") && out.contains("invalid_grant"),
        "{out}"
    );

    // The database refuses the access token (a key of another project).
    fb.tokens.state.reject.store(false, Ordering::SeqCst);
    *fb.relay.state.require_bearer.lock().expect("lock") = Some("another".into());
    let args: Vec<String> = fb.args(1);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = llm_gatekeeper::AppState::build(common::config(&refs, &[]))
        .await
        .err()
        .expect("startup fails");
    assert!(
        err.0.contains("FIREBASE_KEY") && err.0.contains("401"),
        "{}",
        err.0
    );
}

#[tokio::test]
async fn missing_or_malformed_settings_name_the_variable() {
    let build = |args: Vec<&'static str>| async move {
        let mut all = vec!["--gatekeeper-store", "firebase_rtdb"];
        all.extend(args);
        llm_gatekeeper::AppState::build(common::config(&all, &[]))
            .await
            .err()
            .expect("startup fails")
            .0
    };
    let e = build(vec!["--firebase-key", "e30="]).await;
    assert!(e.contains("FIREBASE_RTDB_URL"), "{e}");
    let e = build(vec![
        "--firebase-rtdb-url",
        "https://x-default-rtdb.firebaseio.com",
    ])
    .await;
    assert!(e.contains("FIREBASE_KEY"), "{e}");
    let e = build(vec![
        "--firebase-rtdb-url",
        "https://x-default-rtdb.firebaseio.com",
        "--firebase-key",
        "not base64 at all!",
    ])
    .await;
    assert!(e.contains("FIREBASE_KEY") && e.contains("base64"), "{e}");
    let e = build(vec![
        "--firebase-rtdb-url",
        "https://x-default-rtdb.firebaseio.com",
        "--firebase-key",
        "eyJ0eXBlIjoic2VydmljZV9hY2NvdW50In0=",
    ])
    .await;
    assert!(
        e.contains("FIREBASE_KEY") && e.contains("client_email"),
        "{e}"
    );
    let e = build(vec![
        "--firebase-rtdb-url",
        "http://db.example.com",
        "--firebase-key",
        "e30=",
    ])
    .await;
    assert!(
        e.contains("FIREBASE_RTDB_URL") && e.contains("https"),
        "{e}"
    );
}
