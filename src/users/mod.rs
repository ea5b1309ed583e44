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
pub mod token;

pub use model::{User, UserType};
pub use store::{UserKey, UserStore};
pub use token::Token;

/// Asks the processor to start loading the cache line holding `p` into its caches, so that a
/// later read of it finds it there. A hint only: nothing is read, whatever `p` points to (a
/// dangling or null pointer included), and on targets other than x86-64 it does nothing.
///
/// Why: a request reads its user's data behind pointers (the entry's several lines, then the
/// count maps), and with thousands of users in turn none of it is cached. Read one after the
/// other, each miss waits for the previous one's (about 75 ns each on the benchmark's
/// processor); asked for together, the misses overlap (issue 18).
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `_mm_prefetch` is a hint that never dereferences its argument and cannot fault
    // (any address may be given); SSE, which it needs, is part of every x86-64 processor.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_is_harmless_for_any_address() {
        // A hint only: null, dangling and freed addresses must not fault.
        prefetch(std::ptr::null::<u8>());
        prefetch(std::ptr::dangling::<u64>());
        let freed = Box::into_raw(Box::new(7u64));
        // SAFETY: `freed` came from `Box::into_raw` just above and is released once.
        drop(unsafe { Box::from_raw(freed) });
        prefetch(freed);
        prefetch(usize::MAX as *const u8);
    }

    #[test]
    fn a_user_is_found_after_the_prefetching_look() {
        let store = UserStore::new();
        store.upsert(User::new(
            "tok-a".into(),
            UserType::Normal,
            Default::default(),
            0,
        ));
        let key = store.key("tok-a");
        assert_eq!(
            store
                .with_user_prefetched(key, "tok-a", b"10.0.0.1", |u, _| u.token.clone())
                .as_deref(),
            Some("tok-a")
        );
        assert!(store
            .with_user_prefetched(store.key("tok-b"), "tok-b", b"10.0.0.1", |_, _| ())
            .is_none());
    }
}
