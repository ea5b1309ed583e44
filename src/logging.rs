//! The process's log output: the `tracing` subscriber the binary installs (`LOG_LEVEL` filter,
//! `LOG_FORMAT` text or JSON lines) and the writer thread that keeps writing to stdout off the
//! request path. Knows nothing of requests or of what is logged; `main` calls [`init`] once and
//! holds the returned [`LogGuard`] until the process ends.
//!
//! A request thread formats its line (tracing-subscriber formats into a reused per-thread
//! buffer) and hands it to a bounded queue; one writer thread (`tracing-appender`'s
//! non-blocking writer) writes the queue to stdout in batches. When the queue is full — stdout
//! blocked (a stalled pipe, a log collector that stopped reading) or slower than the lines
//! arrive — new lines are dropped and counted rather than making requests wait: serving
//! requests matters more than a complete log, and a collector that stops reading must not stop
//! the gateway. (The original proxy wrote with pino's synchronous stdout writer, so there a
//! blocked stdout blocked requests.) How many lines were dropped is logged as a warning every
//! [`DROP_REPORT_EVERY`] while it happens, and printed to stderr at exit.

use std::io::{BufWriter, IsTerminal};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter};

use crate::config::LogFormat;

/// Lines the queue between request threads and the writer holds (a few hundred kB when full:
/// the queue's slots are allocated up front, the lines themselves only while queued). At
/// 30 000 logged requests per second that is half a second of a stalled stdout.
pub const BUFFERED_LINES: usize = 16 * 1024;

/// How often the count of dropped lines is checked (and reported when it grew).
pub const DROP_REPORT_EVERY: Duration = Duration::from_secs(10);

/// The writer thread's batch buffer: the lines queued at one wake-up go out in few writes.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// Keeps the writer thread alive; dropping it writes out every queued line (so the last lines,
/// "shutdown complete" among them, reach stdout) and prints the count of dropped lines, if any,
/// to stderr.
pub struct LogGuard {
    worker: Option<WorkerGuard>,
    dropped: ErrorCounter,
    reporter: Option<(mpsc::Sender<()>, JoinHandle<usize>)>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let mut reported = 0;
        if let Some((stop, handle)) = self.reporter.take() {
            drop(stop);
            reported = handle.join().unwrap_or(0);
        }
        // Flushes the queue (tracing-appender waits up to about a second for the writer).
        drop(self.worker.take());
        let dropped = self.dropped.dropped_lines();
        if dropped > 0 {
            // The writer is gone: stderr, written directly, is the one place left.
            eprintln!(
                "llm-gatekeeper: {dropped} log lines were dropped because stdout could not keep \
                 up ({} reported while running)",
                reported
            );
        }
    }
}

/// Installs the global subscriber: `level` is `LOG_LEVEL` (an invalid filter falls back to
/// `info` with a message on stderr), `format` is `LOG_FORMAT`. Colours only when stdout is a
/// terminal (and never in JSON). Call once, before anything logs.
pub fn init(level: &str, format: LogFormat) -> LogGuard {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| {
        eprintln!("llm-gatekeeper: LOG_LEVEL={level:?} is not a valid level; using info");
        EnvFilter::new("info")
    });
    let ansi = std::io::stdout().is_terminal();
    let (writer, worker) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(BUFFERED_LINES)
        .thread_name("log-writer")
        .finish(BufWriter::with_capacity(
            WRITE_BUFFER_BYTES,
            std::io::stdout(),
        ));
    let dropped = writer.error_counter();
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_ansi(ansi).with_writer(writer))
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(writer),
            )
            .try_init(),
    };
    if let Err(e) = installed {
        eprintln!("llm-gatekeeper: logging was already set up ({e})");
    }
    let reporter = spawn_drop_reporter(dropped.clone());
    LogGuard {
        worker: Some(worker),
        dropped,
        reporter,
    }
}

/// A thread that logs a warning whenever lines were dropped since its last look, until its
/// sender is dropped; returns the count it reported. A plain thread, not a task: logging is
/// set up before any runtime, and the thread ends with the guard.
fn spawn_drop_reporter(dropped: ErrorCounter) -> Option<(mpsc::Sender<()>, JoinHandle<usize>)> {
    let (stop, stopped) = mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("log-drops".into())
        .spawn(move || {
            let mut reported = 0;
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(DROP_REPORT_EVERY)
            {
                let now = dropped.dropped_lines();
                if now > reported {
                    tracing::warn!(
                        dropped = now - reported,
                        dropped_total = now,
                        "log lines dropped: stdout could not keep up with the log (queue of {BUFFERED_LINES} lines full)"
                    );
                    reported = now;
                }
            }
            reported
        })
        .ok()?;
    Some((stop, handle))
}
