//! The allocation audit of issue 18: how many heap allocations one proxied request costs the
//! server, in the benchmark's configuration (`GATEKEEPER=user_token`, quotas on, accounting
//! from the upstream's `usage`, a small chat completion). A counting global allocator counts
//! only on the server's own thread: the server runs on a current-thread runtime of its own, the
//! fake upstream and the client on other threads. The log is set up as the binary sets it up
//! at `LOG_LEVEL=info`, writing into a sink, so the access line's formatting counts.
//!
//! It asserts only that the count works; the figure is printed, and written as `key value`
//! lines to the file named by `ALLOC_AUDIT_OUT` (`bench/run` puts it in the report). Debug
//! build: the count of allocations does not depend on optimisation.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use common::upstream::FakeUpstream;
use llm_gatekeeper::users::{User, UserType};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static REALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Set on the server's thread only.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn counting() -> bool {
    COUNTING.try_with(Cell::get).unwrap_or(false)
}

// SAFETY: every call is passed on to the system allocator unchanged; counting only reads a
// thread-local flag and bumps atomics, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if counting() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
            BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if counting() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
            BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        }
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if counting() {
            REALLOCS.fetch_add(1, Ordering::Relaxed);
            BYTES.fetch_add(
                new_size.saturating_sub(layout.size()) as u64,
                Ordering::Relaxed,
            );
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const USERS: u64 = 100;
const MEASURED: u64 = 300;
/// The wrk script's body (bench/wrk/chat.lua).
const BODY: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one word."}],"max_tokens":16}"#;

fn token(i: u64) -> String {
    format!("0000beef-0000-4000-8000-{:012x}", i % USERS)
}

#[test]
fn one_proxied_request_allocates_a_counted_number_of_times() {
    // The binary's logging at its default level (the access line included), into a sink.
    let _log = llm_gatekeeper::logging::init_to(
        "info",
        llm_gatekeeper::config::LogFormat::Text,
        std::io::sink(),
    );
    let driver = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("driver runtime");
    let fake = driver.block_on(FakeUpstream::start());
    let quota = "1000000000000";
    let config = common::config(
        &[
            "--gatekeeper",
            "user_token",
            "--admin-key",
            "alloc-audit-admin-key",
            "--openai-key",
            "sk-operator-openai",
            "--openai-base-url",
            &fake.url,
            "--text-model-rate-limit",
            "0",
        ],
        &[
            ("TOKEN_QUOTA_TURBO", quota),
            ("TOKEN_QUOTA_GPT4", quota),
            ("TOKEN_QUOTA_GPT4O", quota),
        ],
    );

    // The server: its own thread and current-thread runtime, where allocations are counted.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("server runtime");
        rt.block_on(async move {
            let state = llm_gatekeeper::AppState::build(config)
                .await
                .expect("state builds");
            for i in 0..USERS {
                let limits = [("gpt4o", 1_000_000_000u64), ("turbo", 1_000_000_000)]
                    .iter()
                    .map(|(f, n)| (f.to_string(), *n))
                    .collect();
                state
                    .users
                    .upsert(User::new(token(i), UserType::Normal, limits, 0));
            }
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let _ = ready_tx.send(addr);
            COUNTING.with(|c| c.set(true));
            let _ = llm_gatekeeper::serve(state, listener, async move {
                let _ = stop_rx.await;
            })
            .await;
            COUNTING.with(|c| c.set(false));
        });
    });
    let addr = ready_rx.recv().expect("server started");
    let url = format!("http://{addr}/v1/chat/completions");

    let (allocs, reallocs, bytes) = driver.block_on(async {
        // One keep-alive connection, as a benchmark client holds.
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()
            .expect("client");
        let send = |i: u64| {
            let client = client.clone();
            let url = url.clone();
            async move {
                let resp = client
                    .post(url)
                    .bearer_auth(token(i))
                    .header("content-type", "application/json")
                    .body(BODY)
                    .send()
                    .await
                    .expect("proxied request");
                assert_eq!(resp.status(), 200);
                let body = resp.bytes().await.expect("body");
                assert!(body.windows(7).any(|w| w == b"\"usage\""));
            }
        };
        // Warm-up: pools, lazy tables and every user's first request.
        for i in 0..2 * USERS {
            send(i).await;
        }
        let a0 = ALLOCS.load(Ordering::Relaxed);
        let r0 = REALLOCS.load(Ordering::Relaxed);
        let b0 = BYTES.load(Ordering::Relaxed);
        for i in 0..MEASURED {
            send(i).await;
        }
        (
            ALLOCS.load(Ordering::Relaxed) - a0,
            REALLOCS.load(Ordering::Relaxed) - r0,
            BYTES.load(Ordering::Relaxed) - b0,
        )
    });
    let _ = stop_tx.send(());
    server.join().expect("server thread");

    let per = |n: u64| n as f64 / MEASURED as f64;
    let report = format!(
        "allocations_per_request {:.1}\nreallocations_per_request {:.1}\nbytes_per_request {:.0}\nrequests {MEASURED}\n",
        per(allocs),
        per(reallocs),
        per(bytes)
    );
    println!("{report}");
    if let Ok(path) = std::env::var("ALLOC_AUDIT_OUT") {
        std::fs::write(&path, &report).expect("write ALLOC_AUDIT_OUT");
    }
    assert!(allocs > 0, "the counting allocator saw nothing");
}
