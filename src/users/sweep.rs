//! The background sweep over users: disables temporary users whose expiry passed and purges
//! them `POW_TOKEN_PURGE_HOURS` after they were disabled.
//!
//! (Skeleton: to be completed by the per-user-tokens work.)

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::UserStore;

/// Runs the sweep every few seconds until `shutdown`.
pub async fn run(_users: Arc<UserStore>, _purge_after_hours: u64, shutdown: CancellationToken) {
    shutdown.cancelled().await;
}
