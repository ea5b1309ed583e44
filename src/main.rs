//! The `llm-gatekeeper` binary: parses configuration, sets up logging, binds the port and
//! hands over to [`llm_gatekeeper::serve`]. Everything else lives in the library.

/// mimalloc, not glibc's malloc (`llm_gatekeeper::allocator`).
#[global_allocator]
static GLOBAL: llm_gatekeeper::allocator::MiMalloc = llm_gatekeeper::allocator::MiMalloc;

use std::net::SocketAddr;
use std::process::ExitCode;

use llm_gatekeeper::{AppState, Config};

fn main() -> ExitCode {
    llm_gatekeeper::allocator::tune();
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
