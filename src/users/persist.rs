//! The persistence task: loads users from the configured backend at startup, flushes pending
//! changes in batches, retries failures without losing anything, and flushes once more at
//! shutdown. Its [`PersistStatus`] is shown on `/health?verbose`.
//!
//! (Skeleton: to be completed by the persistence work.)

use std::sync::Arc;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::backend::{MemoryBackend, UserBackend};
use super::UserStore;
use crate::config::{Config, ConfigError};

/// What `/health?verbose` shows about persistence.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PersistStatus {
    pub backend: &'static str,
    pub pending: usize,
    pub last_flush_ok_ms: Option<i64>,
    pub last_error: Option<String>,
}

pub struct Persistence {
    pub backend: Arc<dyn UserBackend>,
    pub users: Arc<UserStore>,
}

impl Persistence {
    /// Opens the configured backend and loads every user into `users`.
    pub async fn open(_config: &Config, users: Arc<UserStore>) -> Result<Persistence, ConfigError> {
        Ok(Persistence {
            backend: Arc::new(MemoryBackend),
            users,
        })
    }

    pub fn status(&self) -> PersistStatus {
        PersistStatus {
            backend: self.backend.name(),
            pending: self.users.pending(),
            ..PersistStatus::default()
        }
    }

    /// Flushes periodically (and on request) until `shutdown`, then flushes a last time.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        shutdown.cancelled().await;
    }
}
