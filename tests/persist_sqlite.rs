//! `GATEKEEPER_STORE=sqlite`: users survive restarts, graceful shutdowns and SIGTERM flush
//! everything, `kill -9` loses at most one flush interval of usage, bad records are left alone.

mod common;

use common::persist::{eventually, last_ack, persist_status, usage_child, usage_child_main, Proc};
use llm_gatekeeper::users::sqlite::{read_raw, SqliteBackend};
use llm_gatekeeper::users::{fingerprint, User, UserType};
use serde_json::Value;

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

fn args(path: &std::path::Path, flush_secs: u64) -> Vec<String> {
    vec![
        "--gatekeeper-store".into(),
        "sqlite".into(),
        "--sqlite-path".into(),
        path.display().to_string(),
        "--gatekeeper-store-flush-secs".into(),
        flush_secs.to_string(),
    ]
}

fn env(path: &std::path::Path, flush_secs: u64, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v = vec![
        ("GATEKEEPER_STORE".to_string(), "sqlite".to_string()),
        ("SQLITE_PATH".to_string(), path.display().to_string()),
        (
            "GATEKEEPER_STORE_FLUSH_SECS".to_string(),
            flush_secs.to_string(),
        ),
    ];
    v.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    v
}

/// The stored user, read straight from the file.
fn stored(path: &std::path::Path, token: &str) -> Option<User> {
    read_raw(path, token)
        .expect("read the database")
        .map(|json| serde_json::from_str(&json).expect("stored record parses"))
}

fn stored_prompts(path: &std::path::Path, token: &str) -> u64 {
    stored(path, token).map_or(0, |u| u.prompt_count)
}

#[tokio::test]
async fn usage_is_stored_within_the_interval_and_a_restart_reloads_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The data directory does not exist yet: it is created.
    let path = dir.path().join("data/users.sqlite");
    let app = common::persist::spawn_args(&args(&path, 1)).await;
    let mut special = user("special", 0);
    special.kind = UserType::Special;
    app.state.users.upsert(special);
    app.state.users.upsert(user("purged", 0));
    app.state.users.update("special", |u| {
        u.prompt_count = 12;
        u.token_counts.insert("claude", 3456);
    });
    eventually(15, "usage in the file", || async {
        (stored_prompts(&path, "special") == 12).then_some(())
    })
    .await;
    assert!(stored(&path, "purged").is_some());
    app.state.users.remove("purged");
    app.state
        .users
        .update("special", |u| u.disabled_at = Some(1_700_000_000_001));
    let status = persist_status(&app.url).await;
    assert_eq!(status["backend"], "sqlite");
    let expected = app.state.users.get("special");
    app.shutdown().await.expect("clean shutdown");
    assert!(
        stored(&path, "purged").is_none(),
        "purged users are deleted"
    );

    let again = common::persist::spawn_args(&args(&path, 1)).await;
    assert_eq!(again.state.users.get("special"), expected);
    assert_eq!(again.state.users.len(), 1);
    again.shutdown().await.expect("clean shutdown");

    // The real binary loads the same file and exits 0 on SIGTERM.
    let mut bin = Proc::binary(&env(&path, 1, &[]));
    let url = bin.wait_listening().await;
    let v: Value = reqwest::get(format!("{url}/health?verbose"))
        .await
        .expect("health")
        .json()
        .await
        .expect("json");
    assert_eq!(v["users"], 1, "{v}");
    let status = bin.term().await;
    assert!(status.success(), "{status}\n{}", bin.output());
}

#[tokio::test]
async fn unparseable_records_are_reported_and_left_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("users.sqlite");
    drop(SqliteBackend::open(&path).expect("create the database"));
    let bad = r#"{"token":"broken","promptCount":"many"}"#;
    {
        let conn = rusqlite::Connection::open(&path).expect("open");
        conn.execute(
            "INSERT INTO users (token, record, updated_at) VALUES ('broken', ?1, 0)",
            [bad],
        )
        .expect("insert");
    }
    let app = common::persist::spawn_args(&args(&path, 1)).await;
    assert!(!app.state.users.contains("broken"));
    let status = persist_status(&app.url).await;
    assert!(
        status["skippedRecords"]
            .to_string()
            .contains(&fingerprint("broken")),
        "{status}"
    );
    app.state.users.upsert(user("fine", 1));
    app.shutdown().await.expect("clean shutdown");
    assert_eq!(stored_prompts(&path, "fine"), 1);
    assert_eq!(
        read_raw(&path, "broken").expect("read").as_deref(),
        Some(bad)
    );
}

#[tokio::test]
async fn sigterm_flushes_pending_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("users.sqlite");
    let mut child = usage_child(
        "persist_usage_child",
        &env(
            &path,
            3600,
            &[("PERSIST_CHILD_TOKEN", "t1"), ("PERSIST_CHILD_STEPS", "40")],
        ),
    );
    child.wait_for("DONE 40").await;
    assert_eq!(stored_prompts(&path, "t1"), 0, "nothing flushed yet");
    let status = child.term().await;
    let out = child.output();
    assert!(status.success(), "{status}\n{out}");
    assert!(out.contains("every user change is stored"), "{out}");
    assert_eq!(stored_prompts(&path, "t1"), 40);
}

/// `kill -9` gives no chance to flush: what was acknowledged since the last flush is lost,
/// which is at most one flush interval (plus the flush itself) of usage.
#[tokio::test]
async fn kill_9_loses_at_most_one_flush_interval() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("users.sqlite");
    let mut child = usage_child(
        "persist_usage_child",
        &env(&path, 1, &[("PERSIST_CHILD_TOKEN", "t9")]),
    );
    child.wait_listening().await;
    // Let a few flushes happen while usage keeps growing (one increment per ≥ 10 ms).
    eventually(20, "a few flushes", || async {
        (stored_prompts(&path, "t9") >= 150).then_some(())
    })
    .await;
    child.kill9();
    // Every ACK the child printed before it died has been read.
    child.drained().await;
    let acked = last_ack(&child.output());
    let kept = stored_prompts(&path, "t9");
    assert!(kept <= acked + 1, "kept {kept}, acknowledged {acked}");
    // At most 100 increments per second happen, so one interval of 1 s plus a 1 s margin for
    // the flush itself bounds the loss at 200.
    let lost = acked.saturating_sub(kept);
    assert!(lost <= 200, "lost {lost} of {acked} increments");
    eprintln!("kill -9: acknowledged {acked}, stored {kept}, lost {lost} (flush interval 1 s)");

    // The file is consistent and loads.
    let app = common::persist::spawn_args(&args(&path, 1)).await;
    assert_eq!(
        app.state.users.get("t9").map(|u| u.prompt_count),
        Some(kept)
    );
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn an_unwritable_path_fails_startup_naming_sqlite_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").expect("write");
    let path = file.join("users.sqlite");
    let mut bin = Proc::binary(&env(&path, 1, &[]));
    let status = bin.wait_exit().await;
    let out = bin.output();
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains("SQLITE_PATH"), "{out}");
}

/// Not a test: the child process for the SIGTERM and kill -9 tests.
#[tokio::test]
#[ignore = "child process of other tests"]
async fn persist_usage_child() {
    usage_child_main().await;
}
