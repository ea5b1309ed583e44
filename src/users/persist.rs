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
use super::{now_ms, UserStore};
use crate::config::{Config, ConfigError, StoreKind};

/// The longest the final flush at shutdown may take before the process exits anyway.
pub const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// The first retry after a failed flush comes this soon; each further failure doubles it.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Retries never wait longer than this.
const MAX_RETRY: Duration = Duration::from_secs(30);
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
    /// When a flush last succeeded (epoch ms): every change made before it is stored.
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
                    "check that the database is reachable and the variable named above is right"
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
            match self.flush_once().await {
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
        let batch = self.users.take_batch();
        let n = batch.changed.len() + batch.deleted.len();
        if n == 0 {
            // Nothing pending and nothing in flight: everything is stored as of now.
            let mut s = self.status_mut();
            s.consecutive_failures = 0;
            s.last_flush_ok_ms = Some(now_ms());
            return Ok(0);
        }
        self.status_mut().in_flight = n;
        let result = self.backend.write(&batch.changed, &batch.deleted).await;
        let mut s = self.status_mut();
        s.in_flight = 0;
        match result {
            Ok(()) => {
                if s.consecutive_failures > 0 {
                    tracing::info!(
                        failures = s.consecutive_failures,
                        changes = n,
                        "flush succeeded again; every pending change is stored"
                    );
                }
                s.consecutive_failures = 0;
                s.last_flush_ok_ms = Some(now_ms());
                tracing::debug!(changes = n, store = self.backend.name(), "flushed users");
                Ok(n)
            }
            Err(e) => {
                drop(s);
                self.users.restore_batch(batch);
                let mut s = self.status_mut();
                s.consecutive_failures += 1;
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
        let lost = self.users.pending() + self.status_mut().in_flight;
        tracing::error!(
            lost,
            timeout_secs = FINAL_FLUSH_TIMEOUT.as_secs(),
            "shutdown: the final flush did not complete in time; these user changes were not stored"
        );
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
}
