//! Allocation audit of one proxied request (issue 18): how many heap allocations the server
//! makes for one `POST /v1/chat/completions` under `GATEKEEPER=user_token` with quotas and
//! accounting, counted by a global allocator on the server's own thread only (the fake
//! upstream and the client run on other threads and are not counted). Not a timing test: the
//! count does not depend on the machine's speed. Run with `--nocapture` to see the figure that
//! `docs/benchmarks.md` quotes; the assertion is a ceiling against regressions.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use common::quota::{add_user, proxy};
use common::upstream::FakeUpstream;
use llm_gatekeeper::users::UserType;

/// Counts allocations (not frees) made by threads that switched counting on.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counter is a side
// effect that allocates nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTED.try_with(Cell::get).unwrap_or(false) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if COUNTED.try_with(Cell::get).unwrap_or(false) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTED.try_with(Cell::get).unwrap_or(false) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract is passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// What wrk sends in `bench/run`: the same body and headers.
const BODY: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one word."}],"max_tokens":16}"#;

#[test]
fn allocations_of_one_proxied_request() {
    // The fake upstream and the client: their own runtime, on other threads (not counted).
    let outside = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let fake = outside.block_on(FakeUpstream::start());
    let (url_tx, url_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::scope(|s| {
        let fake = &fake;
        // The server: one current-thread runtime on this thread, as a worker of the binary.
        s.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let app = proxy(fake, &["--text-model-rate-limit", "0"], &[]).await;
                add_user(
                    &app,
                    "alloc-user",
                    UserType::Normal,
                    &[("gpt4o", 1_000_000_000), ("turbo", 1_000_000_000)],
                );
                COUNTED.with(|c| c.set(true));
                url_tx.send(app.url.clone()).expect("send url");
                let _ = stop_rx.await;
                COUNTED.with(|c| c.set(false));
                drop(app);
            });
        });
        let url = url_rx.recv().expect("server url");
        let per_request = outside.block_on(async move {
            let client = reqwest::Client::new();
            let send = || async {
                let r = client
                    .post(format!("{url}/v1/chat/completions"))
                    .bearer_auth("alloc-user")
                    .header("content-type", "application/json")
                    .body(BODY)
                    .send()
                    .await
                    .expect("request");
                assert_eq!(r.status(), 200);
                let body = r.bytes().await.expect("body");
                assert!(body.windows(7).any(|w| w == b"\"usage\""));
            };
            // Warm-up: the connection pools, lazily built tables, the first-use record.
            for _ in 0..20 {
                send().await;
            }
            const N: u64 = 200;
            let before = ALLOCATIONS.load(Ordering::Relaxed);
            for _ in 0..N {
                send().await;
            }
            (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / N as f64
        });
        let _ = stop_tx.send(());
        eprintln!("allocations per proxied request (server thread): {per_request:.1}");
        // A ceiling against regressions, well above today's count (docs/benchmarks.md).
        assert!(per_request < 200.0, "{per_request} allocations per request");
    });
}
