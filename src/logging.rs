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
//!
//! The server's worker threads batch (issue 18): on a thread that called
//! [`batch_this_thread`], a line goes into that thread's buffer, and the buffer goes to the
//! queue as one message when it holds [`BATCH_BYTES`] or when the thread's runtime is about to
//! wait for work ([`flush_thread`], the runtime's park hook) — so a line is handed on within one
//! turn of the worker's loop, and under load the queue and the writer thread see one message per
//! few dozen requests instead of one per request. On a full queue a whole batch is dropped, and
//! each of its lines is counted. Other threads (the main thread's background tasks, tests) queue each line.

use std::cell::RefCell;
use std::io::{BufWriter, IsTerminal, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter};

use crate::config::LogFormat;

/// Entries the queue between request threads and the writer holds: single lines from threads
/// that do not batch, or a worker's batch of up to [`BATCH_BYTES`] plus one line. Bounded in
/// entries, so at most about 9 MB wait while stdout is stalled (the queue's slots are
/// allocated up front, the lines only while queued). At 30 000 logged requests per second
/// (batches of about 50 access lines) that is well over a second of a stalled stdout.
pub const QUEUED_ENTRIES: usize = 1024;

/// How often the count of dropped lines is checked (and reported when it grew).
pub const DROP_REPORT_EVERY: Duration = Duration::from_secs(10);

/// The writer thread's batch buffer: the lines queued at one wake-up go out in few writes.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// A batching thread's buffer goes to the queue once it holds this much (a few dozen access
/// lines), even while the thread has more work.
pub const BATCH_BYTES: usize = 8 * 1024;

/// The lines of a batching thread not yet queued, and the queue they go to (known from the
/// first line written).
struct Batch {
    buf: Vec<u8>,
    /// The lines in `buf`.
    lines: usize,
    to: Option<Queue>,
}

impl Batch {
    fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        if let Some(to) = &mut self.to {
            // One entry for the whole batch. A full queue drops it and counts one line; the
            // batch's other lines are counted here (the counter moved during our write: another
            // thread's line dropped at that very moment would be taken for ours, which only
            // ever overstates a loss that is happening anyway).
            let before = to.dropped.counter.dropped_lines();
            let _ = to.queue.write(&self.buf);
            if self.lines > 1 && to.dropped.counter.dropped_lines() > before {
                to.dropped
                    .batched
                    .fetch_add(self.lines - 1, Ordering::Relaxed);
            }
        }
        self.buf.clear();
        self.lines = 0;
    }
}

/// The queue to the writer thread, and its count of dropped lines.
#[derive(Clone)]
struct Queue {
    queue: NonBlocking,
    dropped: Dropped,
}

/// Lines dropped on a full queue: the queue counts one per entry; a batch's further lines are
/// counted beside it.
#[derive(Clone)]
struct Dropped {
    counter: ErrorCounter,
    batched: Arc<AtomicUsize>,
}

impl Dropped {
    fn lines(&self) -> usize {
        self.counter
            .dropped_lines()
            .saturating_add(self.batched.load(Ordering::Relaxed))
    }
}

thread_local! {
    /// `Some` on threads that batch their lines ([`batch_this_thread`]).
    static BATCH: RefCell<Option<Batch>> = const { RefCell::new(None) };
}

/// Makes this thread's log lines go through a per-thread buffer (see the module documentation).
/// The thread must call [`flush_thread`] whenever it is about to wait, and before it ends.
pub fn batch_this_thread() {
    BATCH.with(|b| {
        *b.borrow_mut() = Some(Batch {
            buf: Vec::with_capacity(BATCH_BYTES + 1024),
            lines: 0,
            to: None,
        })
    });
}

/// Hands this thread's buffered lines to the writer thread (nothing on a thread that does not
/// batch).
pub fn flush_thread() {
    BATCH.with(|b| {
        if let Ok(mut b) = b.try_borrow_mut() {
            if let Some(batch) = b.as_mut() {
                batch.flush();
            }
        }
    });
}

/// The subscriber's writer: into the thread's batch where there is one, else straight to the
/// queue.
struct Lines(Queue);

impl<'a> MakeWriter<'a> for Lines {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> LineWriter<'a> {
        LineWriter(&self.0)
    }
}

struct LineWriter<'a>(&'a Queue);

impl Write for LineWriter<'_> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let batched = BATCH.with(|b| {
            let Ok(mut b) = b.try_borrow_mut() else {
                return false;
            };
            let Some(batch) = b.as_mut() else {
                return false;
            };
            if batch.to.is_none() {
                batch.to = Some(self.0.clone());
            }
            batch.buf.extend_from_slice(line);
            batch.lines += 1;
            if batch.buf.len() >= BATCH_BYTES {
                batch.flush();
            }
            true
        });
        if !batched {
            self.0.queue.clone().write_all(line)?;
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Keeps the writer thread alive; dropping it writes out every queued line (so the last lines,
/// "shutdown complete" among them, reach stdout) and prints the count of dropped lines, if any,
/// to stderr.
pub struct LogGuard {
    worker: Option<WorkerGuard>,
    dropped: Dropped,
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
        let dropped = self.dropped.lines();
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
/// terminal and `NO_COLOR` is unset (and never in JSON). Call once, before anything logs.
pub fn init(level: &str, format: LogFormat) -> LogGuard {
    // Colours only on a terminal, and not when NO_COLOR (https://no-color.org) is set.
    let ansi = std::io::stdout().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    install(
        level,
        format,
        ansi,
        BufWriter::with_capacity(WRITE_BUFFER_BYTES, std::io::stdout()),
    )
}

/// [`init`] writing to `out` instead of stdout, without colours (the allocation audit logs as
/// the binary does, into a sink).
pub fn init_to<W: Write + Send + 'static>(level: &str, format: LogFormat, out: W) -> LogGuard {
    install(level, format, false, out)
}

fn install<W: Write + Send + 'static>(
    level: &str,
    format: LogFormat,
    ansi: bool,
    out: W,
) -> LogGuard {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| {
        eprintln!("llm-gatekeeper: LOG_LEVEL={level:?} is not a valid level; using info");
        EnvFilter::new("info")
    });
    let (writer, worker) = queue(out, QUEUED_ENTRIES);
    let dropped = writer.dropped.clone();
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_ansi(ansi).with_writer(Lines(writer)))
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(Lines(writer)),
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

/// The bounded, lossy queue of `lines` lines in front of `out`, and its writer thread.
fn queue<W: Write + Send + 'static>(out: W, entries: usize) -> (Queue, WorkerGuard) {
    let (queue, worker) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(entries)
        .thread_name("log-writer")
        .finish(out);
    let dropped = Dropped {
        counter: queue.error_counter(),
        batched: Arc::default(),
    };
    (Queue { queue, dropped }, worker)
}

/// A thread that logs a warning whenever lines were dropped since its last look, until its
/// sender is dropped; returns the count it reported. A plain thread, not a task: logging is
/// set up before any runtime, and the thread ends with the guard.
fn spawn_drop_reporter(dropped: Dropped) -> Option<(mpsc::Sender<()>, JoinHandle<usize>)> {
    let (stop, stopped) = mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("log-drops".into())
        .spawn(move || {
            let mut reported = 0;
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(DROP_REPORT_EVERY)
            {
                let now = dropped.lines();
                if now > reported {
                    tracing::warn!(
                        dropped = now - reported,
                        dropped_total = now,
                        "log lines dropped: stdout could not keep up with the log (queue of {QUEUED_ENTRIES} entries full)"
                    );
                    reported = now;
                }
            }
            reported
        })
        .ok()?;
    Some((stop, handle))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Condvar, Mutex};

    use super::*;

    /// A stdout whose reader stopped: every write waits until the gate opens.
    #[derive(Clone, Default)]
    struct Stalled {
        gate: Arc<(Mutex<bool>, Condvar)>,
        out: Arc<Mutex<Vec<u8>>>,
    }

    impl Stalled {
        fn open(&self) {
            let (open, cv) = &*self.gate;
            *open.lock().expect("gate") = true;
            cv.notify_all();
        }
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (open, cv) = &*self.gate;
            let mut is_open = open.lock().expect("gate");
            while !*is_open {
                is_open = cv.wait(is_open).expect("gate");
            }
            self.out.lock().expect("out").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What the writer thread wrote so far, as lines containing `needle`.
    fn lines_with(out: &Arc<Mutex<Vec<u8>>>, needle: &str) -> Vec<String> {
        let out = out.lock().expect("out");
        String::from_utf8_lossy(&out)
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn a_batching_thread_hands_its_lines_on_when_flushed_or_full_in_order() {
        let stdout = Stalled::default();
        stdout.open();
        let (writer, worker) = queue(stdout.clone(), 1024);
        let subscriber = tracing_subscriber::registry()
            .with(fmt::layer().with_ansi(false).with_writer(Lines(writer)));
        let out = stdout.out.clone();
        std::thread::spawn(move || {
            batch_this_thread();
            tracing::subscriber::with_default(subscriber, || {
                for i in 0..3 {
                    tracing::info!(i, "batched line");
                }
                // Held in the thread's buffer: nothing was queued yet.
                BATCH.with(|b| {
                    let b = b.borrow();
                    let batch = b.as_ref().expect("batching");
                    assert_eq!(String::from_utf8_lossy(&batch.buf).lines().count(), 3);
                });
                flush_thread();
                // Enough lines to fill a batch: they go on without a flush.
                for i in 3..1000 {
                    tracing::info!(i, "batched line");
                }
                flush_thread();
            });
        })
        .join()
        .expect("the batching thread");
        // Dropping the guard writes out everything queued.
        drop(worker);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while lines_with(&out, "batched line").len() < 1000 && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let lines = lines_with(&out, "batched line");
        assert_eq!(lines.len(), 1000, "every line is written once");
        for (i, line) in lines.iter().enumerate() {
            assert!(
                line.contains(&format!("i={i} ")) || line.ends_with(&format!("i={i}")),
                "{line}"
            );
        }
    }

    #[test]
    fn a_stalled_stdout_drops_whole_batches_and_counts_every_line_of_them() {
        let stdout = Stalled::default();
        // Four entries: a few batches wait, the rest are dropped.
        let (writer, worker) = queue(stdout.clone(), 4);
        let dropped = writer.dropped.clone();
        let subscriber = tracing_subscriber::registry()
            .with(fmt::layer().with_ansi(false).with_writer(Lines(writer)));
        std::thread::spawn(move || {
            batch_this_thread();
            tracing::subscriber::with_default(subscriber, || {
                for i in 0..3000 {
                    tracing::info!(i, "batched access line");
                }
                flush_thread();
            });
        })
        .join()
        .expect("the batching thread");
        let queued_at_most = 5 * (BATCH_BYTES / 60 + 1);
        assert!(
            dropped.lines() >= 3000 - queued_at_most,
            "the lines of dropped batches are counted, not only the batches: {}",
            dropped.lines()
        );
        stdout.open();
        drop(worker);
        let out = stdout.out.clone();
        let written = || lines_with(&out, "batched access line").len();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while written() + dropped.lines() < 3000 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(written() > 0);
        assert_eq!(
            written() + dropped.lines(),
            3000,
            "every line is either written or counted as dropped"
        );
    }

    #[test]
    fn a_stalled_stdout_drops_and_counts_lines_instead_of_blocking_the_caller() {
        let stdout = Stalled::default();
        let (writer, worker) = queue(stdout.clone(), 8);
        let dropped = writer.dropped.clone();
        let subscriber = tracing_subscriber::registry()
            .with(fmt::layer().with_ansi(false).with_writer(Lines(writer)));
        // All 100 events return while nothing can be written: none waits for stdout.
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..100 {
                tracing::info!(i, "access line");
            }
        });
        // The queue holds 8 lines and the writer one more, stuck in its write.
        assert!(dropped.lines() >= 91, "{}", dropped.lines());
        stdout.open();
        // Dropping the guard writes out what was queued (waiting a bounded time for the
        // writer thread; the loop below only keeps a busy machine from failing the test).
        drop(worker);
        let written = || {
            let out = stdout.out.lock().expect("out");
            String::from_utf8_lossy(&out)
                .lines()
                .filter(|l| l.contains("access line"))
                .count()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while written() + dropped.lines() < 100 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(written() >= 1);
        assert_eq!(
            written() + dropped.lines(),
            100,
            "every line is either written or counted as dropped"
        );
    }
}
