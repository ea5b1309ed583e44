//! The process's log output: the `tracing` subscriber the binary installs (`LOG_LEVEL` filter,
//! `LOG_FORMAT` text or JSON lines) and the writer thread that keeps writing to stdout off the
//! request path. Knows nothing of requests or of what is logged; `main` calls [`init`] once and
//! holds the returned [`LogGuard`] until the process ends.
//!
//! A request thread formats its line (tracing-subscriber formats into a reused per-thread
//! buffer) and hands it to a bounded queue; one writer thread writes the queue to
//! stdout in batches ([`write_queue`]). When the queue is full — stdout
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
//!
//! The writer thread is ours rather than `tracing-appender`'s non-blocking writer, for one
//! behaviour that writer lacks: after a wake-up it waits [`LINGER`] before it writes, so that
//! under load it takes the queue's entries a few dozen at a time, about `1 / LINGER` times a
//! second, and the worker threads never have to wake it. (Woken per entry, it cost a `futex`
//! wake on the worker and a dozen `sched_yield` spins of its own per wake, on the core the
//! worker runs on: about 0.4 µs per request of a benchmark whose gateway costs 16.)

use std::cell::RefCell;
use std::io::{BufWriter, IsTerminal, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

/// The format [`info_line`] writes in and the queue its batches go to, set when the binary's
/// subscriber is installed without colours; unset (no fast lines) otherwise.
static FAST: OnceLock<(LogFormat, Queue)> = OnceLock::new();

/// How often the count of dropped lines is checked (and reported when it grew).
pub const DROP_REPORT_EVERY: Duration = Duration::from_secs(10);

/// The writer thread's batch buffer: the lines queued at one wake-up go out in few writes.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// How long the writer thread, woken by a first entry, lets more arrive before it writes:
/// a line reaches stdout at most this much later, and under load the writer wakes about
/// `1 / LINGER` times a second whatever the rate of lines.
const LINGER: Duration = Duration::from_millis(10);

/// How long dropping the [`LogGuard`] waits for the writer thread to write out the queue.
const DRAIN_WAIT: Duration = Duration::from_secs(1);

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
        if let Some(to) = &self.to {
            // One entry for the whole batch; a full queue drops it and counts its lines. A
            // full batch goes as it is, the buffer replaced by a spare; a few lines (a worker
            // about to wait) go as a copy of their size, the buffer kept.
            let buf = if self.buf.len() >= BATCH_BYTES / 2 {
                std::mem::replace(&mut self.buf, to.spares.take())
            } else {
                let copy = self.buf.clone();
                self.buf.clear();
                copy
            };
            to.send(buf, self.lines);
        } else {
            self.buf.clear();
        }
        self.lines = 0;
    }
}

/// An entry of the queue to the writer thread.
enum Entry {
    /// One line, or a worker's batch of lines.
    Lines(Vec<u8>),
    /// Write out what is queued and end ([`LogGuard`]'s drop).
    Stop,
}

/// The bounded queue to the writer thread, and its count of dropped lines.
#[derive(Clone)]
struct Queue {
    tx: SyncSender<Entry>,
    dropped: Dropped,
    spares: Spares,
}

/// Batch buffers the writer thread wrote out, for the workers' next batches: a buffer
/// allocated per batch and freed by the writer came from pages the allocator handed back to
/// the system and faulted in again under load (issue 18).
#[derive(Clone, Default)]
struct Spares(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

/// Spare batch buffers kept at most (about 300 KB).
const SPARE_BATCHES: usize = 32;

impl Spares {
    /// An empty buffer with room for a batch.
    fn take(&self) -> Vec<u8> {
        let spare = self.0.lock().unwrap_or_else(|p| p.into_inner()).pop();
        spare.unwrap_or_else(|| Vec::with_capacity(BATCH_BYTES + 1024))
    }

    /// Keeps `buf` for [`Spares::take`] if it is a batch's buffer and there is room.
    fn give_back(&self, mut buf: Vec<u8>) {
        if buf.capacity() < BATCH_BYTES || buf.capacity() > 4 * BATCH_BYTES {
            return;
        }
        buf.clear();
        let mut spares = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if spares.len() < SPARE_BATCHES {
            spares.push(buf);
        }
    }
}

impl Queue {
    /// Queues `buf` (`lines` lines) without waiting; on a full queue (stdout blocked or slower
    /// than the lines) or a writer that ended, the lines are dropped and counted.
    fn send(&self, buf: Vec<u8>, lines: usize) {
        if self.tx.try_send(Entry::Lines(buf)).is_err() {
            self.dropped.0.fetch_add(lines, Ordering::Relaxed);
        }
    }
}

/// Lines dropped on a full queue.
#[derive(Clone, Default)]
struct Dropped(Arc<AtomicUsize>);

impl Dropped {
    fn lines(&self) -> usize {
        self.0.load(Ordering::Relaxed)
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

/// A field's value in an [`info_line`]: text (written as `Display` would, a JSON string in
/// JSON) or a number.
#[derive(Debug, Clone, Copy)]
pub enum Field<'a> {
    Text(&'a str),
    Number(u64),
}

/// Writes an `INFO` event of `target` — `message` and `fields`, exactly as the installed
/// subscriber formats `tracing::info!(f1 = %v1, f2 = n2, …, "message")` — straight into this
/// worker thread's batch, without `tracing`'s per-event machinery: the access line of every
/// proxied request costs about a microsecond less. The caller checks
/// `tracing::enabled!(Level::INFO)` at its own call site first (the filter stays
/// `LOG_LEVEL`'s). Returns `false`, writing nothing, where it cannot: a thread that does not
/// batch, with colours on, or without the binary's subscriber ([`init`]; tests); the caller
/// then logs through `tracing::info!` with the same fields.
pub fn info_line(target: &str, message: &str, fields: &[(&str, Field<'_>)]) -> bool {
    let Some((format, queue)) = FAST.get() else {
        return false;
    };
    BATCH.with(|b| {
        let Ok(mut b) = b.try_borrow_mut() else {
            return false;
        };
        let Some(batch) = b.as_mut() else {
            return false;
        };
        if batch.to.is_none() {
            batch.to = Some(queue.clone());
        }
        let now = crate::timer::system_now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        match *format {
            LogFormat::Text => write_text_line(&mut batch.buf, now, target, message, fields),
            LogFormat::Json => write_json_line(&mut batch.buf, now, target, message, fields),
        }
        batch.lines += 1;
        if batch.buf.len() >= BATCH_BYTES {
            batch.flush();
        }
        true
    })
}

/// `tracing-subscriber`'s full text format without colours:
/// `2026-12-01T15:40:28.955146Z  INFO target: message f1=v1 f2=2`.
fn write_text_line(
    buf: &mut Vec<u8>,
    now: Duration,
    target: &str,
    message: &str,
    fields: &[(&str, Field<'_>)],
) {
    write_timestamp(buf, now);
    buf.extend_from_slice(b"  INFO ");
    buf.extend_from_slice(target.as_bytes());
    buf.extend_from_slice(b": ");
    buf.extend_from_slice(message.as_bytes());
    for (name, value) in fields {
        buf.push(b' ');
        buf.extend_from_slice(name.as_bytes());
        buf.push(b'=');
        match value {
            Field::Text(t) => buf.extend_from_slice(t.as_bytes()),
            Field::Number(n) => write_number(buf, *n),
        }
    }
    buf.push(b'\n');
}

/// `tracing-subscriber`'s JSON format as [`install`] sets it up (event fields flattened, no
/// spans): `{"timestamp":…,"level":"INFO","message":…,"f1":…,"target":…}`.
fn write_json_line(
    buf: &mut Vec<u8>,
    now: Duration,
    target: &str,
    message: &str,
    fields: &[(&str, Field<'_>)],
) {
    buf.extend_from_slice(b"{\"timestamp\":\"");
    write_timestamp(buf, now);
    buf.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":");
    write_json_str(buf, message);
    for (name, value) in fields {
        buf.push(b',');
        write_json_str(buf, name);
        buf.push(b':');
        match value {
            Field::Text(t) => write_json_str(buf, t),
            Field::Number(n) => write_number(buf, *n),
        }
    }
    buf.extend_from_slice(b",\"target\":");
    write_json_str(buf, target);
    buf.extend_from_slice(b"}\n");
}

fn write_json_str(buf: &mut Vec<u8>, s: &str) {
    // Writing a `&str` into a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut *buf, s);
}

fn write_number(buf: &mut Vec<u8>, n: u64) {
    buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

thread_local! {
    /// The last second [`write_timestamp`] wrote, and its text up to the seconds.
    static SECOND: std::cell::Cell<(u64, [u8; 19])> = const { std::cell::Cell::new((u64::MAX, [0; 19])) };
}

/// `now` (since the Unix epoch) as `tracing-subscriber` writes it: RFC 3339 in UTC with
/// microseconds, `2026-12-01T15:40:28.955146Z`. The date and time up to the second are
/// computed once per second per thread.
fn write_timestamp(buf: &mut Vec<u8>, now: Duration) {
    let secs = now.as_secs();
    let (cached, mut text) = SECOND.get();
    if cached != secs {
        text = civil_text(secs);
        SECOND.set((secs, text));
    }
    buf.extend_from_slice(&text);
    // The microseconds, zero-padded to six digits: 1 000 000 more, its first digit dropped.
    let mut digits = itoa::Buffer::new();
    let padded = digits.format(1_000_000 + now.subsec_micros()).as_bytes();
    buf.push(b'.');
    buf.extend_from_slice(&padded[1..]);
    buf.push(b'Z');
}

/// `YYYY-MM-DDTHH:MM:SS` of a Unix time in UTC (years 1970–9999), by the days-to-civil
/// algorithm of H. Hinnant (<https://howardhinnant.github.io/date_algorithms.html>).
fn civil_text(secs: u64) -> [u8; 19] {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (hour, minute, second) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let mut t = *b"0000-00-00T00:00:00";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            t[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, hour);
    put(14, 2, minute);
    put(17, 2, second);
    t
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
            self.0.send(line.to_vec(), 1);
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
    worker: Option<Writer>,
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
        // Writes out the queue (waiting up to DRAIN_WAIT for the writer).
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
    if !ansi {
        let _ = FAST.set((format, writer.clone()));
    }
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

/// The bounded, lossy queue of `entries` entries in front of `out`, and its writer thread.
fn queue<W: Write + Send + 'static>(out: W, entries: usize) -> (Queue, Writer) {
    let (tx, rx) = mpsc::sync_channel(entries);
    let (done_tx, done) = mpsc::channel();
    let spares = Spares::default();
    let given_back = spares.clone();
    let spawned = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || {
            write_queue(rx, out, &given_back);
            let _ = done_tx.send(());
        });
    if let Err(e) = spawned {
        // Without a writer every line is dropped (and counted); requests are served anyway.
        eprintln!(
            "llm-gatekeeper: could not start the log writer thread ({e}); log lines are dropped"
        );
    }
    let queue = Queue {
        tx: tx.clone(),
        dropped: Dropped::default(),
        spares,
    };
    (queue, Writer { tx, done })
}

/// The writer thread: waits for an entry, lets more arrive for [`LINGER`], writes all that is
/// queued, and again, until [`Entry::Stop`] (or every sender is gone).
fn write_queue<W: Write>(rx: Receiver<Entry>, mut out: W, spares: &Spares) {
    while let Ok(first) = rx.recv() {
        if matches!(first, Entry::Lines(_)) {
            // Sleeping rather than waiting on the queue: entries arriving now need no wake-up.
            std::thread::sleep(LINGER);
        }
        let mut stop = false;
        for entry in std::iter::once(first).chain(rx.try_iter()) {
            match entry {
                Entry::Lines(buf) => {
                    let _ = out.write_all(&buf);
                    spares.give_back(buf);
                }
                Entry::Stop => stop = true,
            }
        }
        let _ = out.flush();
        if stop {
            return;
        }
    }
    let _ = out.flush();
}

/// The writer thread's handle: dropping it writes out what is queued, waiting up to
/// [`DRAIN_WAIT`] (a stalled stdout must not hold up the process's exit for longer).
struct Writer {
    tx: SyncSender<Entry>,
    done: Receiver<()>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        let deadline = Instant::now() + DRAIN_WAIT;
        // The queue may be full for a moment: retry until the writer takes the stop.
        loop {
            match self.tx.try_send(Entry::Stop) {
                Ok(()) => break,
                Err(TrySendError::Full(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return,
            }
        }
        let _ = self
            .done
            .recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
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

    /// A writer collecting what the subscriber wrote.
    #[derive(Clone, Default)]
    struct Collect(Arc<Mutex<Vec<u8>>>);

    impl Write for Collect {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("collect").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Collect {
        type Writer = Collect;
        fn make_writer(&'a self) -> Collect {
            self.clone()
        }
    }

    const TS_LEN: usize = "2026-12-01T15:40:28.955146Z".len();

    /// The line `tracing-subscriber` writes for the access event, in `format`.
    fn subscriber_line(format: LogFormat, path: &str) -> String {
        let out = Collect::default();
        let registry = tracing_subscriber::registry();
        let emit = || {
            tracing::info!(
                target: "llm_gatekeeper::proxy::forward",
                method = %"POST",
                path = %path,
                status = 200u16,
                upstream_ms = 1234u64,
                key = %"c00397de",
                "proxied"
            )
        };
        match format {
            LogFormat::Text => tracing::subscriber::with_default(
                registry.with(fmt::layer().with_ansi(false).with_writer(out.clone())),
                emit,
            ),
            LogFormat::Json => tracing::subscriber::with_default(
                registry.with(
                    fmt::layer()
                        .json()
                        .flatten_event(true)
                        .with_current_span(false)
                        .with_span_list(false)
                        .with_writer(out.clone()),
                ),
                emit,
            ),
        }
        let bytes = out.0.lock().expect("collect").clone();
        String::from_utf8(bytes).expect("utf-8")
    }

    fn fast_line(format: LogFormat, path: &str, now: Duration) -> String {
        let fields = [
            ("method", Field::Text("POST")),
            ("path", Field::Text(path)),
            ("status", Field::Number(200)),
            ("upstream_ms", Field::Number(1234)),
            ("key", Field::Text("c00397de")),
        ];
        let mut buf = Vec::new();
        let target = "llm_gatekeeper::proxy::forward";
        match format {
            LogFormat::Text => write_text_line(&mut buf, now, target, "proxied", &fields),
            LogFormat::Json => write_json_line(&mut buf, now, target, "proxied", &fields),
        }
        String::from_utf8(buf).expect("utf-8")
    }

    /// The line with its timestamp (at `at`) replaced by a fixed one.
    fn without_timestamp(line: &str, at: usize) -> String {
        format!("{}<ts>{}", &line[..at], &line[at + TS_LEN..])
    }

    #[test]
    fn the_fast_access_line_is_byte_for_byte_what_the_subscriber_writes() {
        let now = Duration::from_micros(1_796_140_828_955_146);
        for path in ["/v1/chat/completions", "/proxy/weird \"path\"\\ é\t"] {
            let text = subscriber_line(LogFormat::Text, path);
            let fast = fast_line(LogFormat::Text, path, now);
            assert_eq!(without_timestamp(&fast, 0), without_timestamp(&text, 0));
            let json = subscriber_line(LogFormat::Json, path);
            let fast = fast_line(LogFormat::Json, path, now);
            let at = json.find("\"timestamp\":\"").expect("timestamp") + 13;
            assert_eq!(without_timestamp(&fast, at), without_timestamp(&json, at));
            let parsed: serde_json::Value = serde_json::from_str(&fast).expect("one JSON object");
            assert_eq!(parsed["path"], path);
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds_as_the_subscriber_writes_them() {
        // Leap days, ends of years and months, the epoch, and one second after another on
        // the same thread (the cached date and time must move on).
        let mut secs: Vec<u64> = vec![
            0,
            59,
            951_782_400,
            951_868_799,
            1_709_164_800,
            4_102_444_799,
        ];
        secs.extend((0..2000).map(|i| 1_700_000_000 + i * 86_399 + i % 7));
        secs.extend(1_796_140_828..1_796_140_832);
        for s in secs {
            let now = Duration::new(s, 955_146_789);
            let mut buf = Vec::new();
            write_timestamp(&mut buf, now);
            let ours = String::from_utf8(buf).expect("utf-8");
            let expected = chrono::DateTime::from_timestamp(s as i64, 955_146_789)
                .expect("in range")
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            assert_eq!(ours, expected, "{s}");
        }
    }

    #[test]
    fn numbers_are_written_in_decimal() {
        for n in [0, 7, 10, 99, 1234, u64::MAX] {
            let mut buf = Vec::new();
            write_number(&mut buf, n);
            assert_eq!(String::from_utf8(buf).expect("utf-8"), n.to_string());
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
