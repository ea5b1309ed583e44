//! Unit tests of admission, settlement and refresh, feeding tickets directly (no HTTP).

use std::sync::atomic::{AtomicI64, Ordering};

use chrono::TimeZone;
use serde_json::json;

use super::*;
use crate::providers::Api;
use crate::users::User;

fn config(args: &[&str], vars: &[(&str, &str)]) -> Config {
    let mut argv = vec!["llm-gatekeeper".to_string()];
    argv.extend(args.iter().map(|s| s.to_string()));
    Config::from_args(
        argv,
        vars.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .expect("valid test config")
}

fn quotas(args: &[&str], vars: &[(&str, &str)]) -> (Quotas, Arc<UserStore>) {
    let users = UserStore::new();
    let q = Quotas::from_config(&config(args, vars), users.clone()).expect("builds");
    (q, users)
}

fn add_user(users: &UserStore, token: &str, kind: UserType, limits: &[(&str, u64)]) {
    let limits = limits.iter().map(|(f, n)| (f.to_string(), *n)).collect();
    users.upsert(User::new(token.to_string(), kind, limits, 0));
}

fn user(token: &str, kind: UserType) -> Principal {
    Principal::User {
        token: token.into(),
        kind,
        key: None,
    }
}

fn ip() -> IpAddr {
    "127.0.0.1".parse().expect("ip")
}

/// Admission as the forwarder runs it: facts through the provider, admission, then the
/// provider's stream-usage request and meter.
fn admit(
    q: &Quotas,
    p: &Principal,
    api: Api,
    body: &mut serde_json::Value,
) -> Result<Admitted, ProxyError> {
    // Admission is async only to count large prompts on the blocking pool; a small runtime
    // per call lets the tests below run it from plain threads.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let provider = api.provider();
    let mut facts = provider
        .request_facts(api, body)
        .map_err(|e| ProxyError::bad_request(e.0))?;
    let mut a = rt.block_on(q.admit(
        &AdmitRequest {
            principal: p,
            ip: ip(),
            generation: api.is_generation(),
        },
        Some(&mut facts),
    ))?;
    if let Some(cap) = a.output_cap {
        provider.set_output_cap(api, body, cap);
    }
    if a.ticket.charges() {
        let hide = provider.ask_stream_usage(api, body, &facts);
        a.ticket.observe_with(Meter::new(provider, api, hide));
    }
    Ok(a)
}

/// The facts of an OpenAI chat body.
fn facts(body: &serde_json::Value) -> RequestFacts {
    Api::OpenAiChat
        .provider()
        .request_facts(Api::OpenAiChat, body)
        .expect("facts")
}

fn chat(max_tokens: u64) -> serde_json::Value {
    json!({"model": "gpt-4o", "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": "hi"}]})
}

fn json_response(t: &mut Ticket, prompt: u64, completion: u64) {
    t.on_response_start(StatusCode::OK, false);
    let body = json!({"choices": [{"message": {"content": "ok"}}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion}});
    let out = t.on_chunk(Bytes::from(body.to_string()));
    assert_eq!(out, Bytes::from(body.to_string()));
}

fn counts(users: &UserStore, token: &str, family: &str) -> (u64, u64) {
    users
        .update_entry(token, |e| {
            (
                (
                    e.user.token_counts.get(family).copied().unwrap_or(0),
                    e.reserved.get(family).copied().unwrap_or(0),
                ),
                false,
            )
        })
        .expect("user exists")
}

const NO_RATE: &[&str] = &["--text-model-rate-limit", "0"];

#[test]
fn admission_reserves_and_settlement_charges_real_usage() {
    let (q, users) = quotas(NO_RATE, &[]);
    add_user(&users, "u", UserType::Normal, &[("gpt4o", 10_000)]);
    let mut body = chat(100);
    let a = admit(&q, &user("u", UserType::Normal), Api::OpenAiChat, &mut body).expect("admitted");
    let (used, reserved) = counts(&users, "u", "gpt4o");
    assert_eq!(used, 0);
    assert!(
        reserved > 100,
        "prompt estimate + max_tokens reserved: {reserved}"
    );
    let mut t = a.ticket;
    json_response(&mut t, 12, 30);
    t.finish();
    assert_eq!(counts(&users, "u", "gpt4o"), (42, 0));
    assert_eq!(users.get("u").expect("user").prompt_count, 1);
    // The family's reservation stays at zero and the next request reserves in place; a second
    // request while one runs adds to it.
    let a = admit(
        &q,
        &user("u", UserType::Normal),
        Api::OpenAiChat,
        &mut chat(100),
    )
    .expect("a");
    let b = admit(
        &q,
        &user("u", UserType::Normal),
        Api::OpenAiChat,
        &mut chat(100),
    )
    .expect("b");
    let both = counts(&users, "u", "gpt4o").1;
    assert!(both > 200, "{both}");
    for mut t in [a.ticket, b.ticket] {
        json_response(&mut t, 12, 30);
        t.finish();
    }
    assert_eq!(counts(&users, "u", "gpt4o"), (126, 0));
    let entries = users
        .update_entry("u", |e| (e.reserved.len(), false))
        .expect("user");
    assert_eq!(entries, 1);
}

#[test]
fn parallel_admissions_never_overrun_the_budget() {
    // Each request reserves its prompt estimate + 100; a budget of 350 fits 3.
    let (q, users) = quotas(NO_RATE, &[]);
    let q = Arc::new(q);
    let facts = facts(&chat(100));
    let requested = facts.requested(estimate::prompt_tokens(&facts));
    add_user(
        &users,
        "u",
        UserType::Normal,
        &[("gpt4o", 3 * requested + 1)],
    );
    let p = user("u", UserType::Normal);
    let tickets: Vec<Option<Ticket>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..50)
            .map(|_| {
                let q = q.clone();
                let p = p.clone();
                s.spawn(move || {
                    admit(&q, &p, Api::OpenAiChat, &mut chat(100))
                        .ok()
                        .map(|a| a.ticket)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let admitted: Vec<Ticket> = tickets.into_iter().flatten().collect();
    assert_eq!(admitted.len(), 3);
    let mut expected = 0;
    for (i, mut t) in admitted.into_iter().enumerate() {
        let (p, c) = (10 + i as u64, 20 + i as u64);
        expected += p + c;
        json_response(&mut t, p, c);
        t.finish();
    }
    assert_eq!(counts(&users, "u", "gpt4o"), (expected, 0));
    assert_eq!(users.get("u").expect("user").prompt_count, 3);
}

#[test]
fn refusal_says_family_limit_usage_and_refresh() {
    let (q, users) = quotas(
        &[
            "--text-model-rate-limit",
            "0",
            "--quota-refresh-period",
            "daily",
        ],
        &[],
    );
    add_user(&users, "u", UserType::Normal, &[("claude-opus", 1000)]);
    users.update("u", |u| {
        u.token_counts.insert("claude-opus", 990);
    });
    let mut body = json!({"model": "claude-opus-4-1", "max_tokens": 50,
        "messages": [{"role": "user", "content": "hi"}]});
    let err = admit(
        &q,
        &user("u", UserType::Normal),
        Api::AnthropicMessages,
        &mut body,
    )
    .err()
    .expect("refused");
    assert_eq!(err.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(err.kind, "insufficient_quota");
    for needle in ["claude-opus", "990", "1000", "refreshes at"] {
        assert!(err.message.contains(needle), "{needle} in {}", err.message);
    }
    // A refusal changes nothing.
    assert_eq!(counts(&users, "u", "claude-opus"), (990, 0));
    assert_eq!(users.get("u").expect("user").prompt_count, 0);

    let (q, users) = quotas(NO_RATE, &[]);
    add_user(&users, "u", UserType::Normal, &[("gpt4o", 1)]);
    let err = admit(
        &q,
        &user("u", UserType::Normal),
        Api::OpenAiChat,
        &mut chat(0),
    )
    .err()
    .expect("refused");
    assert!(err.message.contains("do not refresh"), "{}", err.message);
}

#[test]
fn special_users_are_exempt_but_counted() {
    let (q, users) = quotas(&["--text-model-rate-limit", "1"], &[]);
    add_user(&users, "s", UserType::Special, &[("gpt4o", 1)]);
    for _ in 0..3 {
        let a = admit(
            &q,
            &user("s", UserType::Special),
            Api::OpenAiChat,
            &mut chat(100),
        )
        .expect("special users pass quotas and the rate limit");
        assert!(a.headers.is_empty());
        let mut t = a.ticket;
        json_response(&mut t, 5, 5);
        t.finish();
    }
    assert_eq!(counts(&users, "s", "gpt4o"), (30, 0));
}

#[test]
fn zero_limit_is_unlimited_and_other_families_are_separate() {
    let (q, users) = quotas(NO_RATE, &[]);
    add_user(&users, "u", UserType::Normal, &[("gpt4o", 0), ("turbo", 1)]);
    let a = admit(
        &q,
        &user("u", UserType::Normal),
        Api::OpenAiChat,
        &mut chat(1_000_000),
    );
    assert!(a.is_ok());
    let mut mini = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    assert!(admit(&q, &user("u", UserType::Normal), Api::OpenAiChat, &mut mini).is_err());
}

#[test]
fn upstream_errors_charge_nothing_and_release_the_reservation() {
    let (q, users) = quotas(NO_RATE, &[]);
    add_user(&users, "u", UserType::Normal, &[]);
    let mut t = admit(
        &q,
        &user("u", UserType::Normal),
        Api::OpenAiChat,
        &mut chat(10),
    )
    .expect("admitted")
    .ticket;
    t.on_response_start(StatusCode::TOO_MANY_REQUESTS, false);
    let body = Bytes::from_static(br#"{"error":{"message":"slow down"}}"#);
    assert_eq!(t.on_chunk(body.clone()), body);
    t.finish();
    assert_eq!(counts(&users, "u", "gpt4o"), (0, 0));

    // The forwarder's own error (upstream unreachable) is reported as a status: no charge.
    let mut t = admit(
        &q,
        &user("u", UserType::Normal),
        Api::OpenAiChat,
        &mut chat(10),
    )
    .expect("admitted")
    .ticket;
    t.on_response_start(StatusCode::BAD_GATEWAY, false);
    t.finish();
    assert_eq!(counts(&users, "u", "gpt4o"), (0, 0));
}

#[test]
fn client_gone_before_the_upstream_answered_pays_the_prompt() {
    let (q, users) = quotas(NO_RATE, &[]);
    add_user(&users, "u", UserType::Normal, &[]);
    let body = chat(10);
    let prompt = estimate::prompt_tokens(&facts(&body));
    drop(
        admit(
            &q,
            &user("u", UserType::Normal),
            Api::OpenAiChat,
            &mut body.clone(),
        )
        .expect("admitted"),
    );
    assert_eq!(counts(&users, "u", "gpt4o"), (prompt, 0));
    assert!(prompt > 0);
}

#[test]
fn stream_without_include_usage_asks_for_it_and_hides_the_chunk() {
    let (q, users) = quotas(NO_RATE, &[]);
    add_user(&users, "u", UserType::Normal, &[]);
    let mut body = chat(10);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"other": 1});
    let a = admit(&q, &user("u", UserType::Normal), Api::OpenAiChat, &mut body).expect("ok");
    assert_eq!(
        body["stream_options"],
        json!({"other": 1, "include_usage": true})
    );
    let mut t = a.ticket;
    t.on_response_start(StatusCode::OK, true);
    let content = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n";
    let usage =
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\n";
    let done = "data: [DONE]\n\n";
    let mut seen = Vec::new();
    for part in [content, usage, done] {
        seen.extend_from_slice(&t.on_chunk(Bytes::from(part)));
    }
    t.finish();
    assert_eq!(
        String::from_utf8(seen).expect("utf8"),
        format!("{content}{done}")
    );
    assert_eq!(counts(&users, "u", "gpt4o"), (11, 0));

    // A client that asked for usage gets the body unchanged and the chunk kept.
    let mut body = chat(10);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let before = body.clone();
    let a = admit(&q, &user("u", UserType::Normal), Api::OpenAiChat, &mut body).expect("ok");
    assert_eq!(body, before);
    let mut t = a.ticket;
    t.on_response_start(StatusCode::OK, true);
    assert_eq!(t.on_chunk(Bytes::from(usage)), Bytes::from(usage));
    t.finish();
    assert_eq!(counts(&users, "u", "gpt4o"), (22, 0));
}

#[test]
fn client_disconnect_mid_stream_is_still_charged() {
    let (q, users) = quotas(NO_RATE, &[]);
    add_user(&users, "u", UserType::Normal, &[]);
    let mut body = chat(500);
    body["stream"] = json!(true);
    let prompt_estimate = estimate::prompt_tokens(&facts(&body));
    let mut t = admit(&q, &user("u", UserType::Normal), Api::OpenAiChat, &mut body)
        .expect("ok")
        .ticket;
    t.on_response_start(StatusCode::OK, true);
    t.on_chunk(Bytes::from_static(
        b"data: {\"choices\":[{\"delta\":{\"content\":\"one two three\"}}]}\n\ndata: {\"choi",
    ));
    drop(t);
    let expected = prompt_estimate + estimate::count_tokens("one two three");
    assert_eq!(counts(&users, "u", "gpt4o"), (expected, 0));
    assert!(expected > 0);
}

#[test]
fn embeddings_count_prompt_tokens_and_prompts() {
    let (q, users) = quotas(NO_RATE, &[]);
    add_user(&users, "u", UserType::Normal, &[]);
    let mut body = json!({"model": "text-embedding-3-small", "input": "hello"});
    let mut t = admit(
        &q,
        &user("u", UserType::Normal),
        Api::OpenAiEmbeddings,
        &mut body,
    )
    .expect("ok")
    .ticket;
    t.on_response_start(StatusCode::OK, false);
    t.on_chunk(Bytes::from_static(
        br#"{"data":[{"embedding":[0.5]}],"usage":{"prompt_tokens":4,"total_tokens":4}}"#,
    ));
    t.finish();
    assert_eq!(counts(&users, "u", "turbo"), (4, 0));
    assert_eq!(users.get("u").expect("user").prompt_count, 1);
}

#[test]
fn non_users_are_rate_limited_by_address_but_not_counted() {
    let (q, _users) = quotas(&["--text-model-rate-limit", "2"], &[]);
    let p = Principal::ProxyKey;
    let mut body = chat(10);
    body["stream"] = json!(true);
    let before = body.clone();
    let a = admit(&q, &p, Api::OpenAiChat, &mut body).expect("first");
    assert_eq!(body, before);
    assert_eq!(
        a.headers.get(ratelimit::REMAINING).map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert!(admit(&q, &Principal::Anonymous, Api::OpenAiChat, &mut chat(1)).is_ok());
    let err = admit(&q, &p, Api::OpenAiChat, &mut chat(1))
        .err()
        .expect("limited");
    assert_eq!(err.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(err.kind, "rate_limit_error");
    assert!(err.retry_after.is_some_and(|s| s >= 1));
    let extra = err.headers.as_deref().expect("rate-limit headers");
    assert_eq!(
        extra.get(ratelimit::REMAINING).map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );
    // The admin is exempt; non-generation requests are not limited.
    assert!(admit(&q, &Principal::Admin, Api::OpenAiChat, &mut chat(1)).is_ok());
    assert!(admit(&q, &p, Api::OpenAiOther, &mut json!({})).is_ok());
}

#[test]
fn users_are_rate_limited_by_token() {
    let (q, users) = quotas(&["--text-model-rate-limit", "1"], &[]);
    add_user(&users, "a", UserType::Normal, &[]);
    add_user(&users, "b", UserType::Temporary, &[]);
    assert!(admit(
        &q,
        &user("a", UserType::Normal),
        Api::OpenAiChat,
        &mut chat(1)
    )
    .is_ok());
    assert!(admit(
        &q,
        &user("b", UserType::Temporary),
        Api::OpenAiChat,
        &mut chat(1)
    )
    .is_ok());
    let err = admit(
        &q,
        &user("a", UserType::Normal),
        Api::OpenAiChat,
        &mut chat(1),
    )
    .err()
    .expect("limited");
    assert!(err.message.contains("TEXT_MODEL_RATE_LIMIT"));
    // A rate-limited request reserves and counts nothing.
    assert_eq!(users.get("a").expect("a").prompt_count, 1);
}

#[test]
fn refresh_on_a_driven_clock() {
    let t0 = Local
        .with_ymd_and_hms(2026, 5, 4, 10, 30, 0)
        .single()
        .expect("local time");
    let now = Arc::new(AtomicI64::new(t0.timestamp()));
    let clock_now = now.clone();
    let clock: Clock = Arc::new(move || {
        Local
            .timestamp_opt(clock_now.load(Ordering::SeqCst), 0)
            .single()
            .expect("valid")
    });
    let users = UserStore::new();
    let cfg = config(
        &["--quota-refresh-period", "hourly"],
        &[("TOKEN_QUOTA_GPT4O", "1000"), ("TOKEN_QUOTA_CLAUDE", "0")],
    );
    let q = Quotas::with_clock(&cfg, users.clone(), clock).expect("builds");
    assert_eq!(q.initial_limits().get("gpt4o"), Some(&1000));
    let next = q.next_refresh().expect("scheduled");
    assert_eq!(next, t0 + chrono::Duration::minutes(30));

    add_user(
        &users,
        "n",
        UserType::Normal,
        &[("gpt4o", 1000), ("claude", 77)],
    );
    add_user(&users, "t", UserType::Temporary, &[("gpt4o", 1000)]);
    for t in ["n", "t"] {
        users.update(t, |u| {
            u.token_counts.insert("gpt4o", 900);
        });
    }

    assert!(!q.refresh_due(t0 + chrono::Duration::minutes(29)));
    assert!(q.refresh_due(next));
    let n = users.get("n").expect("n");
    assert_eq!(n.token_limits.get("gpt4o"), Some(&1900));
    // A family without a configured quota keeps the limit an admin set.
    assert_eq!(n.token_limits.get("claude"), Some(&77));
    // Temporary users are not refreshed.
    assert_eq!(
        users.get("t").expect("t").token_limits.get("gpt4o"),
        Some(&1000)
    );
    // The next tick is an hour later, and the same tick does not fire twice.
    assert_eq!(q.next_refresh(), Some(next + chrono::Duration::hours(1)));
    assert!(!q.refresh_due(next));
    now.store(
        (next + chrono::Duration::hours(1)).timestamp(),
        Ordering::SeqCst,
    );
    assert!(q.refresh_due((q.clock)()));
}

#[test]
fn invalid_refresh_period_is_a_startup_error() {
    let users = UserStore::new();
    let err = Quotas::from_config(
        &config(&["--quota-refresh-period", "fortnightly"], &[]),
        users,
    )
    .err()
    .expect("refused");
    assert!(err.to_string().contains("QUOTA_REFRESH_PERIOD"));
}

#[tokio::test]
async fn refresh_task_stops_on_shutdown() {
    let (q, _users) = quotas(&["--quota-refresh-period", "hourly"], &[]);
    let q = Arc::new(q);
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(q.clone().run_refresh(stop.clone()));
    tokio::task::yield_now().await;
    stop.cancel();
    task.await.expect("task ends");
}

#[tokio::test]
async fn background_task_refreshes_when_the_driven_clock_reaches_the_tick() {
    let t0 = Local
        .with_ymd_and_hms(2026, 5, 4, 23, 59, 0)
        .single()
        .expect("local time");
    let now = Arc::new(AtomicI64::new(t0.timestamp()));
    let clock_now = now.clone();
    let clock: Clock = Arc::new(move || {
        Local
            .timestamp_opt(clock_now.load(Ordering::SeqCst), 0)
            .single()
            .expect("valid")
    });
    let users = UserStore::new();
    let cfg = config(
        &["--quota-refresh-period", "daily"],
        &[("TOKEN_QUOTA_CLAUDE", "500")],
    );
    let q = Arc::new(Quotas::with_clock(&cfg, users.clone(), clock).expect("builds"));
    add_user(&users, "n", UserType::Normal, &[("claude", 10)]);
    let tick = q.next_refresh().expect("scheduled");
    // The clock jumps to the tick: the task notices without waiting for real time to pass.
    now.store(tick.timestamp(), Ordering::SeqCst);
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(q.clone().run_refresh(stop.clone()));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while users
        .get("n")
        .and_then(|u| u.token_limits.get("claude").copied())
        != Some(500)
    {
        assert!(std::time::Instant::now() < deadline, "refresh did not run");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(q.next_refresh(), Some(tick + chrono::Duration::days(1)));
    stop.cancel();
    task.await.expect("task ends");
}

#[test]
fn far_from_the_limit_the_bound_is_reserved_and_near_it_the_counted_prompt() {
    let (q, users) = quotas(NO_RATE, &[]);
    let body = chat(100);
    let facts = facts(&body);
    let bound = facts.requested(facts.prompt_bound());
    let exact = facts.requested(estimate::prompt_tokens(&facts));
    assert!(
        bound > exact,
        "the test needs a prompt whose bytes exceed its tokens"
    );

    // Plenty of room: the upper bound is reserved, nothing is tokenized.
    add_user(&users, "far", UserType::Normal, &[("gpt4o", 1_000_000)]);
    let far = admit(
        &q,
        &user("far", UserType::Normal),
        Api::OpenAiChat,
        &mut chat(100),
    )
    .expect("admitted");
    assert_eq!(counts(&users, "far", "gpt4o"), (0, bound));
    drop(far);

    // Room for two requests only: the prompt is counted, and exactly two fit.
    add_user(
        &users,
        "near",
        UserType::Normal,
        &[("gpt4o", 2 * exact + 1)],
    );
    let p = user("near", UserType::Normal);
    let a = admit(&q, &p, Api::OpenAiChat, &mut chat(100)).expect("first fits");
    assert_eq!(counts(&users, "near", "gpt4o"), (0, exact));
    let b = admit(&q, &p, Api::OpenAiChat, &mut chat(100)).expect("second fits");
    assert!(admit(&q, &p, Api::OpenAiChat, &mut chat(100)).is_err());
    drop((a, b));
}
