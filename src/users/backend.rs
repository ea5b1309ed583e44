//! The persistence seam: a [`UserBackend`] loads every user at startup and writes batches of
//! changed and deleted users. The memory backend does nothing; Firebase RTDB and SQLite
//! backends live beside it. Backends never see HTTP requests from clients.

use futures::future::BoxFuture;

use super::User;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The store could not be reached or refused the request; the batch stays pending.
    #[error("{0}")]
    Unavailable(String),
    /// The backend is misconfigured (bad URL, bad key); fatal at startup.
    #[error("{0}")]
    Config(String),
}

/// What a load found: users that parsed, and records that did not (left untouched in the store).
#[derive(Debug, Default)]
pub struct Loaded {
    pub users: Vec<User>,
    /// (token fingerprint, reason) for every stored record that could not be parsed.
    pub skipped: Vec<(String, String)>,
}

/// A persistent home for users. Implementations must make `write` all-or-nothing where the
/// store allows it, and must be safe to call again with the same batch after a failure.
pub trait UserBackend: Send + Sync + 'static {
    /// Short name for logs and the status endpoint (`memory`, `sqlite`, `firebase_rtdb`).
    fn name(&self) -> &'static str;
    /// Whether written users outlive the process. When not, pending changes are discarded
    /// instead of being copied into batches that are written nowhere.
    fn is_durable(&self) -> bool {
        true
    }
    /// Reads every stored user.
    fn load_all(&self) -> BoxFuture<'_, Result<Loaded, BackendError>>;
    /// Writes `changed` users (full records) and deletes `deleted` tokens.
    fn write<'a>(
        &'a self,
        changed: &'a [User],
        deleted: &'a [String],
    ) -> BoxFuture<'a, Result<(), BackendError>>;
}

/// Keeps nothing: users live only in memory.
pub struct MemoryBackend;

impl UserBackend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }
    fn is_durable(&self) -> bool {
        false
    }
    fn load_all(&self) -> BoxFuture<'_, Result<Loaded, BackendError>> {
        Box::pin(async { Ok(Loaded::default()) })
    }
    fn write<'a>(
        &'a self,
        _changed: &'a [User],
        _deleted: &'a [String],
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async { Ok(()) })
    }
}
