//! The `llm-gatekeeper` binary: parses configuration, sets up logging, binds the port and
//! hands over to [`llm_gatekeeper::serve`]. Everything else lives in the library.

/// mimalloc, not glibc's malloc: about 2 000 instructions less per proxied request (the ~22
/// allocations of one request, callgrind) and a faster `GET /admin/users`, at the same resident
/// memory with its arenas committed as used (`.cargo/config.toml`) and freed memory returned at
/// once ([`tune_allocator`]); docs/performance.md, step 6.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::process::ExitCode;

use llm_gatekeeper::{AppState, Config};

fn main() -> ExitCode {
    tune_allocator();
    // Every client connection is a file: use all the process may have (the connection caps
    // are derived from it, see `llm_gatekeeper::server`).
    llm_gatekeeper::server::raise_nofile_limit();
    // Configuration is read before the runtime exists: it may edit the process environment,
    // which is only sound while a single thread runs.
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "llm-gatekeeper: configuration error: {}",
                e.0.trim_end().trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    // The main thread's runtime runs startup, the background tasks and the shutdown; requests
    // are served by `WORKERS` threads with runtimes of their own (`app::serve_workers`).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("llm-gatekeeper: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config))
}

/// `mi_option_purge_delay` of mimalloc 3's `mi_option_e` (libmimalloc-sys names only mimalloc 2's).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Makes mimalloc hand freed memory back to the system at once: after a bulk import or a
/// listing of 100 000 users, the process returns to its size before (`bench/store-mem`).
fn tune_allocator() {
    // SAFETY: mi_option_set only sets allocator parameters; no other thread exists yet.
    unsafe {
        // Freed memory goes back to the system at once (mimalloc 3 waits a second), so that a
        // bulk import's temporary memory does not stay resident. (The arenas' commit policy is
        // read before `main` runs: `.cargo/config.toml` sets its default.)
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
    }
}

async fn run(config: Config) -> ExitCode {
    // Held until `run` returns: dropping it writes out the last queued lines.
    let _log = llm_gatekeeper::logging::init(&config.cli.log_level, config.cli.log_format);

    let addr = SocketAddr::new(config.cli.bind_address, config.cli.port);
    llm_gatekeeper::app::log_startup_summary(&config);
    let state = match AppState::build(config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("llm-gatekeeper: startup error: {}", e.0);
            return ExitCode::from(2);
        }
    };
    let workers = state.config.workers();
    let listeners = match llm_gatekeeper::server::bind_listeners(addr, workers) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("llm-gatekeeper: cannot listen on {addr} ({e}); change PORT or BIND_ADDRESS");
            return ExitCode::from(2);
        }
    };
    let local = listeners
        .first()
        .and_then(|l| l.local_addr().ok())
        .unwrap_or(addr);
    // Before the "listening" line: from then on SIGTERM means a graceful shutdown.
    let shutdown = llm_gatekeeper::shutdown_signal();
    tracing::info!(workers, "llm-gatekeeper listening on http://{local}");
    match llm_gatekeeper::app::serve_workers(state, listeners, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llm-gatekeeper: server error: {e}");
            ExitCode::FAILURE
        }
    }
}
