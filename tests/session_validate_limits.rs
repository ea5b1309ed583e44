//! `ADMIN_SESSION_VALIDATE_URL` is metered (issue 12): a session the service rejects counts as a
//! failed attempt for the lockout (cookie or token), answers are reused briefly per session,
//! and the calls in flight are bounded. Today every `/admin` request with any cookie triggered
//! an unmetered call. The fake service counts its calls and can hold them open on a gate.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use axum::routing::get;
use axum::Router;
use common::web::ADMIN_KEY;
use llm_gatekeeper::auth::session::MAX_VALIDATE_IN_FLIGHT;
use reqwest::Client;
use tokio::sync::Semaphore;

/// A session service: `session=good` is alice, `session=hold-*` waits for the gate then is
/// alice, anything else is rejected with 401. Counts calls, and calls in flight.
struct Fake {
    url: String,
    calls: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
}

async fn fake() -> Fake {
    let calls = Arc::new(AtomicUsize::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let (c, f, g) = (calls.clone(), in_flight.clone(), gate.clone());
    let app = Router::new().route(
        "/v",
        get(move |headers: HeaderMap| {
            let (c, f, g) = (c.clone(), f.clone(), g.clone());
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                let cookie = headers
                    .get("cookie")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                if cookie.starts_with("session=hold-") {
                    f.fetch_add(1, Ordering::SeqCst);
                    let _ = g.acquire().await.map(|p| p.forget());
                    f.fetch_sub(1, Ordering::SeqCst);
                }
                if cookie == "session=good" || cookie.starts_with("session=hold-") {
                    (
                        axum::http::StatusCode::OK,
                        r#"{"valid":true,"user":"alice"}"#,
                    )
                } else {
                    (axum::http::StatusCode::UNAUTHORIZED, r#"{"valid":false}"#)
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Fake {
        url: format!("http://{addr}/v"),
        calls,
        in_flight,
        gate,
    }
}

async fn app(url: &str, extra: &[&str]) -> common::TestApp {
    let mut args = vec![
        "--gatekeeper",
        "user_token",
        "--admin-key",
        ADMIN_KEY,
        "--admin-session-validate-url",
        url,
    ];
    args.extend_from_slice(extra);
    common::spawn(&args, &[]).await
}

async fn with_cookie(c: &Client, app: &common::TestApp, cookie: &str) -> u16 {
    c.get(format!("{}/admin/users", app.url))
        .header("cookie", cookie)
        .send()
        .await
        .expect("sent")
        .status()
        .as_u16()
}

#[tokio::test]
async fn rejected_sessions_count_toward_the_lockout() {
    let f = fake().await;
    let app = app(&f.url, &["--brute-force-max-failed-attempts", "2"]).await;
    let c = Client::new();
    assert_eq!(with_cookie(&c, &app, "session=guess-1").await, 401);
    assert_eq!(with_cookie(&c, &app, "session=guess-2").await, 401);
    // Locked out: even the admin key is refused now, and the service is not asked again.
    let calls = f.calls.load(Ordering::SeqCst);
    let r = c
        .get(format!("{}/admin/users", app.url))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 429);
    assert_eq!(with_cookie(&c, &app, "session=guess-3").await, 429);
    assert_eq!(f.calls.load(Ordering::SeqCst), calls);
}

#[tokio::test]
async fn answers_are_reused_briefly_per_session() {
    let f = fake().await;
    let app = app(&f.url, &[]).await;
    let c = Client::new();
    for _ in 0..5 {
        assert_eq!(with_cookie(&c, &app, "session=good").await, 200);
    }
    assert_eq!(
        f.calls.load(Ordering::SeqCst),
        1,
        "one call for five requests"
    );
    for _ in 0..3 {
        assert_eq!(with_cookie(&c, &app, "session=nope").await, 401);
    }
    assert_eq!(
        f.calls.load(Ordering::SeqCst),
        2,
        "a rejection is reused too"
    );
    // ... and counted once: three requests with one rejected cookie are one failure.
    let ip = "127.0.0.1".parse().expect("ip");
    assert_eq!(app.state.lockout.locked_for(ip), None);
    assert_eq!(app.state.lockout.tracked(), 1);
}

#[tokio::test]
async fn calls_in_flight_are_bounded() {
    let f = fake().await;
    let app = app(&f.url, &[]).await;
    let c = Client::new();
    // Fill every slot with a call the service holds open.
    let mut held = Vec::new();
    for i in 0..MAX_VALIDATE_IN_FLIGHT {
        let (c, url) = (c.clone(), format!("{}/admin/users", app.url));
        held.push(tokio::spawn(async move {
            c.get(url)
                .header("cookie", format!("session=hold-{i}"))
                .send()
                .await
                .expect("sent")
                .status()
                .as_u16()
        }));
    }
    let mut filled = false;
    for _ in 0..500 {
        if f.in_flight.load(Ordering::SeqCst) == MAX_VALIDATE_IN_FLIGHT {
            filled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(filled, "the service saw every held call");
    // More sessions are refused at once, without a call, while the slots are taken.
    for i in 0..5 {
        assert_eq!(
            with_cookie(&c, &app, &format!("session=more-{i}")).await,
            401
        );
    }
    assert_eq!(f.calls.load(Ordering::SeqCst), MAX_VALIDATE_IN_FLIGHT);
    // The admin key does not need the service and still works.
    let r = c
        .get(format!("{}/admin/users", app.url))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    f.gate.add_permits(MAX_VALIDATE_IN_FLIGHT);
    for h in held {
        assert_eq!(h.await.expect("joined"), 200);
    }
}
