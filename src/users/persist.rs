//! The persistence task: loads users from the configured backend at startup, flushes pending
//! changes in batches, retries failures without losing anything, and flushes once more at
//! shutdown. Its [`PersistStatus`] is shown on `/health?verbose`.
//!
//! Nothing is lost because a batch is taken from the store before it is written and handed
//! back on failure ([`UserStore::take_batch`] / [`UserStore::restore_batch`]); a change made
//! while a batch is in flight marks its user dirty again and goes out with the next flush.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::backend::{BackendError, MemoryBackend, UserBackend};
use super::firebase::FirebaseBackend;
use super::sqlite::SqliteBackend;
use super::store::Batch;
use super::{now_ms, UserStore};
use crate::config::{Config, ConfigError, StoreKind};

/// The longest the final flush at shutdown may take before the process exits anyway.
pub const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// The first retry after a failed flush comes this soon; each further failure doubles it.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Retries never wait longer than this.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// After a flush of at least this many changes, freed memory is handed back to the system.
const LARGE_FLUSH: usize = 10_000;
/// At most this many unparseable records are listed on the status endpoint.
const MAX_SKIPPED_SHOWN: usize = 20;

/// What `/health?verbose` shows about persistence.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PersistStatus {
    pub backend: &'static str,
    /// Changes not yet written (excluding a batch being written right now).
    pub pending: usize,
    /// Changes in the batch being written right now.
    pub in_flight: usize,
    pub flush_interval_secs: u64,
    /// When the last successful flush began (epoch ms): every change made before it is stored.
    pub last_flush_ok_ms: Option<i64>,
    /// The most recent flush error, kept after recovery for diagnosis.
    pub last_error: Option<String>,
    pub last_error_ms: Option<i64>,
    /// Flushes that failed since the last success.
    pub consecutive_failures: u32,
    /// Stored records skipped at startup because they did not parse: "fingerprint: reason".
    pub skipped_records: Vec<String>,
}

pub struct Persistence {
    pub backend: Arc<dyn UserBackend>,
    pub users: Arc<UserStore>,
    flush_every: Duration,
    status: Mutex<PersistStatus>,
}

impl Persistence {
    /// Opens the configured backend and loads every user into `users`. Any failure is fatal
    /// at startup, with a message naming the variable to fix.
    pub async fn open(config: &Config, users: Arc<UserStore>) -> Result<Persistence, ConfigError> {
        let cli = &config.cli;
        let backend: Arc<dyn UserBackend> = match cli.gatekeeper_store {
            StoreKind::Memory => Arc::new(MemoryBackend),
            StoreKind::Sqlite => {
                let path = cli.sqlite_path.clone();
                let opened = tokio::task::spawn_blocking(move || SqliteBackend::open(&path))
                    .await
                    .map_err(|e| {
                        ConfigError(format!("SQLITE_PATH: opening the database failed: {e}"))
                    })?;
                Arc::new(opened.map_err(|e| ConfigError(e.to_string()))?)
            }
            StoreKind::FirebaseRtdb => Arc::new(
                FirebaseBackend::from_config(config).map_err(|e| ConfigError(e.to_string()))?,
            ),
        };
        let loaded = backend.load_all().await.map_err(|e| {
            let hint = match &e {
                BackendError::Config(_) => "fix the variable named above",
                BackendError::Unavailable(_) => {
                    "check that the address named above is reachable and the variable is right"
                }
            };
            ConfigError(format!(
                "GATEKEEPER_STORE={}: cannot load users: {e}; {hint}",
                backend.name()
            ))
        })?;
        for (fp, reason) in &loaded.skipped {
            tracing::warn!(
                user = %fp,
                %reason,
                "skipping a stored user record that does not parse; it is left untouched in the store, fix or delete it there"
            );
        }
        tracing::info!(
            store = backend.name(),
            users = loaded.users.len(),
            skipped = loaded.skipped.len(),
            "users loaded"
        );
        users.load(loaded.users);
        let status = PersistStatus {
            backend: backend.name(),
            flush_interval_secs: cli.gatekeeper_store_flush_secs,
            skipped_records: loaded
                .skipped
                .iter()
                .take(MAX_SKIPPED_SHOWN)
                .map(|(fp, reason)| format!("{fp}: {reason}"))
                .collect(),
            ..PersistStatus::default()
        };
        Ok(Persistence {
            backend,
            users,
            flush_every: Duration::from_secs(cli.gatekeeper_store_flush_secs.max(1)),
            status: Mutex::new(status),
        })
    }

    fn status_mut(&self) -> std::sync::MutexGuard<'_, PersistStatus> {
        // The status is plain data; a panic elsewhere cannot leave it inconsistent.
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self) -> PersistStatus {
        let mut s = self.status_mut().clone();
        s.pending = self.users.pending();
        s
    }

    /// Flushes periodically and whenever [`UserStore::request_flush`] is called, until
    /// `shutdown`; then flushes a last time, for at most [`FINAL_FLUSH_TIMEOUT`].
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut retry: Option<Duration> = None;
        loop {
            // While backing off after a failure, flush requests wait for the retry (the
            // request is remembered by the store's `Notify`), so an outage is not hammered.
            let wait = retry.unwrap_or(self.flush_every);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
                _ = self.users.flush_requested(), if retry.is_none() => {}
            }
            // A slow write (a hanging database) must not delay shutdown beyond the final
            // flush's bound: it is abandoned, its batch handed back and written again below.
            let result = tokio::select! {
                r = self.flush_once() => r,
                _ = shutdown.cancelled() => break,
            };
            match result {
                Ok(_) => retry = None,
                Err(_) => {
                    let next = retry.map_or(FIRST_RETRY, |d| (d * 2).min(MAX_RETRY));
                    retry = Some(next);
                }
            }
        }
        self.final_flush().await;
    }

    /// Writes every pending change once. On failure the batch is pending again.
    pub async fn flush_once(&self) -> Result<usize, BackendError> {
        // Every change made before the batch is taken is in it (or already stored), so this
        // is the moment a successful flush vouches for.
        let started = now_ms();
        if !self.backend.is_durable() {
            let n = self.users.discard_pending();
            let mut s = self.status_mut();
            s.consecutive_failures = 0;
            s.last_flush_ok_ms = Some(started);
            return Ok(n);
        }
        let batch = self.users.take_batch();
        let n = batch.changed.len() + batch.deleted.len();
        if n == 0 {
            // Nothing pending and nothing in flight: everything is stored as of now.
            let mut s = self.status_mut();
            s.consecutive_failures = 0;
            s.last_flush_ok_ms = Some(started);
            return Ok(0);
        }
        // If this future is dropped mid-write (shutdown cut a slow write short), the guard
        // hands the batch back so that the final flush writes it again.
        let mut guard = InFlight {
            persistence: self,
            batch: Some(batch),
        };
        self.status_mut().in_flight = n;
        let result = match &guard.batch {
            Some(b) => self.backend.write(&b.changed, &b.deleted).await,
            None => Ok(()),
        };
        match result {
            Ok(()) => {
                guard.batch = None;
                drop(guard);
                let mut s = self.status_mut();
                if s.consecutive_failures > 0 {
                    tracing::info!(
                        failures = s.consecutive_failures,
                        changes = n,
                        "flush succeeded again; every pending change is stored"
                    );
                }
                s.consecutive_failures = 0;
                s.last_flush_ok_ms = Some(started);
                drop(s);
                if n >= LARGE_FLUSH {
                    // The batch's copies and their serialised form are gone; give the memory
                    // back rather than keep the high-water mark of a bulk import.
                    crate::app::return_freed_memory();
                }
                tracing::debug!(changes = n, store = self.backend.name(), "flushed users");
                Ok(n)
            }
            Err(e) => {
                drop(guard);
                let mut s = self.status_mut();
                s.consecutive_failures += 1;
                crate::metrics::store_flush_failed(self.backend.name());
                s.last_error = Some(e.to_string());
                s.last_error_ms = Some(now_ms());
                tracing::warn!(
                    error = %e,
                    pending = self.users.pending(),
                    failures = s.consecutive_failures,
                    "flushing users failed; the changes stay pending and will be retried while the proxy keeps serving"
                );
                Err(e)
            }
        }
    }

    /// The last flush at shutdown: retried until everything is written or the time is up.
    async fn final_flush(&self) {
        if !self.backend.is_durable() {
            // Nothing outlives the process with the memory store; say nothing reassuring.
            return;
        }
        let deadline = tokio::time::Instant::now() + FINAL_FLUSH_TIMEOUT;
        loop {
            if self.users.pending() == 0 {
                tracing::info!("shutdown: every user change is stored");
                return;
            }
            match tokio::time::timeout_at(deadline, self.flush_once()).await {
                Ok(Ok(_)) => continue,
                Ok(Err(_)) => {
                    let pause = tokio::time::Instant::now() + Duration::from_millis(500);
                    if pause >= deadline {
                        break;
                    }
                    tokio::time::sleep_until(pause).await;
                }
                Err(_) => break,
            }
        }
        let lost = self.users.pending();
        tracing::error!(
            lost,
            timeout_secs = FINAL_FLUSH_TIMEOUT.as_secs(),
            "shutdown: the final flush did not complete in time; these user changes were not stored"
        );
    }
}

/// A batch being written: unless it was stored (`batch` taken), dropping this hands the
/// batch back to the store, whether the write failed or was abandoned.
struct InFlight<'a> {
    persistence: &'a Persistence,
    batch: Option<Batch>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.persistence.status_mut().in_flight = 0;
        if let Some(batch) = self.batch.take() {
            self.persistence.users.restore_batch(batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::users::backend::Loaded;
    use crate::users::{User, UserType};
    use futures::future::BoxFuture;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A backend that records writes and can be made to fail.
    #[derive(Default)]
    struct Flaky {
        fail: AtomicBool,
        hang: AtomicBool,
        written: Mutex<Vec<User>>,
    }

    impl UserBackend for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        fn load_all(&self) -> BoxFuture<'_, Result<Loaded, BackendError>> {
            Box::pin(async { Ok(Loaded::default()) })
        }
        fn write<'a>(
            &'a self,
            changed: &'a [User],
            _deleted: &'a [String],
        ) -> BoxFuture<'a, Result<(), BackendError>> {
            Box::pin(async move {
                if self.hang.load(Ordering::SeqCst) {
                    std::future::pending::<()>().await;
                }
                if self.fail.load(Ordering::SeqCst) {
                    return Err(BackendError::Unavailable("down".into()));
                }
                self.written
                    .lock()
                    .expect("lock")
                    .extend(changed.iter().cloned());
                Ok(())
            })
        }
    }

    fn persistence(backend: Arc<Flaky>) -> Persistence {
        Persistence {
            backend,
            users: UserStore::new(),
            flush_every: Duration::from_secs(1),
            status: Mutex::new(PersistStatus::default()),
        }
    }

    #[tokio::test]
    async fn failed_flush_keeps_changes_and_reports() {
        let backend = Arc::new(Flaky::default());
        let p = persistence(backend.clone());
        p.users.upsert(User::new(
            "a".into(),
            UserType::Normal,
            Default::default(),
            0,
        ));
        backend.fail.store(true, Ordering::SeqCst);
        assert!(p.flush_once().await.is_err());
        let s = p.status();
        assert_eq!(s.pending, 1);
        assert_eq!(s.consecutive_failures, 1);
        assert_eq!(s.last_error.as_deref(), Some("down"));
        backend.fail.store(false, Ordering::SeqCst);
        assert_eq!(p.flush_once().await.expect("flushes"), 1);
        assert_eq!(p.status().pending, 0);
        assert!(p.status().last_flush_ok_ms.is_some());
        assert_eq!(backend.written.lock().expect("lock").len(), 1);
    }

    #[tokio::test]
    async fn an_abandoned_write_hands_its_batch_back() {
        let backend = Arc::new(Flaky::default());
        let p = persistence(backend.clone());
        p.users.upsert(User::new(
            "a".into(),
            UserType::Normal,
            Default::default(),
            0,
        ));
        backend.hang.store(true, Ordering::SeqCst);
        let cut = tokio::time::timeout(Duration::from_millis(50), p.flush_once()).await;
        assert!(cut.is_err(), "the write hangs");
        let s = p.status();
        assert_eq!((s.pending, s.in_flight), (1, 0));
        backend.hang.store(false, Ordering::SeqCst);
        assert_eq!(p.flush_once().await.expect("flushes"), 1);
    }
}
