//! Users: the user model, the in-memory store every request reads, and the persistence
//! backends behind the [`backend::UserBackend`] trait. Knows nothing of HTTP.

pub mod backend;
pub mod counts;
pub mod firebase;
pub mod model;
pub mod ops;
pub mod persist;
pub mod sqlite;
pub mod store;
pub mod sweep;

pub use model::{User, UserType};
pub use store::{UserKey, UserStore};

/// Milliseconds since the Unix epoch, the unit of every timestamp in the user model.
pub fn now_ms() -> i64 {
    // The clock straight, not through chrono's calendar types; within a connection's poll, the
    // poll's reading (`timer::system_now`).
    match crate::timer::system_now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

/// A short, non-reversible fingerprint of a secret for logs (first 8 hex chars of SHA-256).
pub fn fingerprint(secret: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(secret.as_bytes());
    hex::encode(&digest[..4])
}
