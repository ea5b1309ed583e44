//! Brute-force protection: failed credential attempts (admin key, proxy key, user token) are
//! counted per client address; an address that reaches `BRUTE_FORCE_MAX_FAILED_ATTEMPTS`
//! failures inside `BRUTE_FORCE_TTL_SECONDS` is refused — even with a correct key — until the
//! window passes. Other addresses are unaffected. The table is bounded and expires its entries.
//!
//! Knows nothing of HTTP: [`crate::auth::guard`] asks [`Lockout::refusal`] once per request
//! that presents a credential, before it is checked; [`crate::auth::credentials`] calls
//! [`Lockout::record_failure`] after a wrong one.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde::Serialize;

/// The most addresses tracked at once. At 100 000 entries of a few dozen bytes each the table
/// stays below ~10 MB, whatever an attacker does.
pub const MAX_TRACKED_ADDRESSES: usize = 100_000;

/// How long a locked-out address waits for its refusal (a tarpit). A guessing client that waits
/// for each answer — as brute-force tools and load generators do — is slowed from thousands of
/// guesses per second to a few per connection, and so stops eating the CPU that other users'
/// requests need; waiting costs the proxy one timer. A person who mistyped a key does not notice.
pub const TARPIT: Duration = Duration::from_millis(250);

/// How often (at most) a failure triggers a sweep of expired entries.
const PRUNE_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
struct Failures {
    /// Failures counted in the current window.
    count: u32,
    /// When the current window opened (the first failure of it).
    window_start: Instant,
    /// Set when `count` reached the maximum: the address is refused until then.
    locked_until: Option<Instant>,
}

impl Failures {
    /// True when nothing about this entry matters any more at `now`.
    fn expired(&self, now: Instant, ttl: Duration) -> bool {
        match self.locked_until {
            Some(until) => now >= until,
            None => now.duration_since(self.window_start) >= ttl,
        }
    }
}

/// One locked-out address, for the admin UI's anti-abuse page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LockedAddress {
    pub ip: IpAddr,
    pub failures: u32,
    /// Whole seconds until the address may try again.
    pub retry_after_secs: u64,
    /// When the address may try again, in epoch milliseconds.
    pub unlocks_at: i64,
}

/// The failure table.
///
/// A `DashMap` with timestamps and opportunistic pruning rather than a cache crate: the only
/// operations are "count one more" and "is it locked", both O(1) on one shard; expiry is a
/// cheap `retain` at most every [`PRUNE_EVERY`] (driven by failures, so an idle server does no
/// work), and the hard cap [`MAX_TRACKED_ADDRESSES`] keeps memory bounded even when an
/// attacker rotates addresses faster than entries expire.
pub struct Lockout {
    pub max_failures: u32,
    pub ttl: Duration,
    table: DashMap<IpAddr, Failures>,
    cap: usize,
    /// Reference point for `last_prune_ms`.
    epoch: Instant,
    /// Milliseconds after `epoch` of the last prune.
    last_prune_ms: AtomicU64,
    /// Serialises pruning (never held on the request path: `try_lock` only).
    pruning: Mutex<()>,
    /// Milliseconds after `epoch` (rounded up) at which the latest lock ever set ends; 0 while
    /// none was ever set. Every request asks whether its address is locked: while no lock is
    /// running, one atomic load answers, without a clock read, a hash or a shard lock.
    locks_end_ms: AtomicU64,
}

impl Lockout {
    /// `max_failures = 0` disables the protection.
    pub fn new(max_failures: u32, ttl: Duration) -> Lockout {
        Lockout::with_capacity(max_failures, ttl, MAX_TRACKED_ADDRESSES)
    }

    /// Like [`Lockout::new`] with a chosen cap on tracked addresses (tests use a small one).
    pub fn with_capacity(max_failures: u32, ttl: Duration, cap: usize) -> Lockout {
        Lockout {
            max_failures,
            ttl,
            table: DashMap::new(),
            cap: cap.max(1),
            epoch: Instant::now(),
            last_prune_ms: AtomicU64::new(0),
            pruning: Mutex::new(()),
            locks_end_ms: AtomicU64::new(0),
        }
    }

    fn enabled(&self) -> bool {
        self.max_failures > 0 && !self.ttl.is_zero()
    }

    /// Seconds until `ip` may try again, when it is locked out.
    pub fn locked_for(&self, ip: IpAddr) -> Option<u64> {
        if self.locks_end_ms.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.locked_for_at(ip, Instant::now())
    }

    /// [`Lockout::locked_for`] for a refusal about to be sent: when the address is locked out,
    /// it answers only after the [`TARPIT`] pause. Every place that refuses a locked-out address
    /// asks this, so that none of them answers a guessing client at full speed.
    pub async fn refusal(&self, ip: IpAddr) -> Option<u64> {
        let secs = self.locked_for(ip)?;
        tokio::time::sleep(TARPIT).await;
        Some(secs)
    }

    /// [`Lockout::locked_for`] at a given instant (for tests).
    pub fn locked_for_at(&self, ip: IpAddr, now: Instant) -> Option<u64> {
        if !self.enabled() {
            return None;
        }
        let end = self.locks_end_ms.load(Ordering::Relaxed);
        if end == 0 || self.ms_since_epoch(now) >= end {
            // No lock was ever set, or every lock set has ended.
            return None;
        }
        let ip = crate::net::normalize(ip);
        let until = self.table.get(&ip)?.locked_until?;
        remaining_secs(until, now)
    }

    /// Counts one failed attempt from `ip`.
    pub fn record_failure(&self, ip: IpAddr) {
        self.record_failure_at(ip, Instant::now());
    }

    /// [`Lockout::record_failure`] at a given instant (for tests).
    pub fn record_failure_at(&self, ip: IpAddr, now: Instant) {
        if !self.enabled() {
            return;
        }
        let ip = crate::net::normalize(ip);
        self.maybe_prune(now);
        if !self.table.contains_key(&ip) && self.table.len() >= self.cap {
            // Make room from expired entries first; if the table is still full of live
            // entries, this address goes uncounted rather than growing the table without
            // bound. (An attacker holding that many addresses gains little: each address
            // could make `max_failures - 1` attempts unnoticed anyway.)
            self.prune(now);
            if self.table.len() >= self.cap {
                tracing::warn!(
                    cap = self.cap,
                    "brute-force table is full; a failed attempt from a new address was not counted"
                );
                return;
            }
        }
        let (max, ttl) = (self.max_failures, self.ttl);
        let mut entry = self.table.entry(ip).or_insert(Failures {
            count: 0,
            window_start: now,
            locked_until: None,
        });
        let f = entry.value_mut();
        if f.expired(now, ttl) {
            *f = Failures {
                count: 0,
                window_start: now,
                locked_until: None,
            };
        }
        if f.locked_until.is_some() {
            // Already locked: further attempts do not extend the lock, so a client that keeps
            // retrying gets in once the window passes, as its Retry-After promised.
            return;
        }
        f.count = f.count.saturating_add(1);
        if f.count >= max {
            let until = now + ttl;
            f.locked_until = Some(until);
            let end = until
                .saturating_duration_since(self.epoch)
                .as_micros()
                .div_ceil(1000);
            self.locks_end_ms.fetch_max(
                u64::try_from(end).unwrap_or(u64::MAX).max(1),
                Ordering::Relaxed,
            );
            let failures = f.count;
            drop(entry);
            tracing::warn!(
                %ip,
                failures,
                lock_secs = ttl.as_secs(),
                "too many failed authentication attempts; address locked out"
            );
        }
    }

    /// Forgets everything about `ip` (an administrator lifting a lockout).
    pub fn unlock(&self, ip: IpAddr) -> bool {
        self.table.remove(&crate::net::normalize(ip)).is_some()
    }

    /// Addresses locked out right now, soonest to unlock first.
    pub fn locked(&self) -> Vec<LockedAddress> {
        let now = Instant::now();
        let now_ms = crate::users::now_ms();
        let mut out: Vec<LockedAddress> = self
            .table
            .iter()
            .filter_map(|e| {
                let until = e.value().locked_until?;
                let left = until.checked_duration_since(now)?;
                if left.is_zero() {
                    return None;
                }
                let left_ms = i64::try_from(left.as_millis()).unwrap_or(i64::MAX);
                Some(LockedAddress {
                    ip: *e.key(),
                    failures: e.value().count,
                    retry_after_secs: ceil_secs(left),
                    unlocks_at: now_ms.saturating_add(left_ms),
                })
            })
            .collect();
        out.sort_by_key(|l| (l.unlocks_at, l.ip));
        out
    }

    /// How many addresses are tracked (locked or with recent failures).
    pub fn tracked(&self) -> usize {
        self.table.len()
    }

    /// Whole milliseconds from `epoch` to `now` (rounded down; 0 before it).
    fn ms_since_epoch(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    fn maybe_prune(&self, now: Instant) {
        let now_ms = self.ms_since_epoch(now);
        let last = self.last_prune_ms.load(Ordering::Relaxed);
        let every = u64::try_from(PRUNE_EVERY.as_millis()).unwrap_or(u64::MAX);
        if now_ms.saturating_sub(last) < every {
            return;
        }
        if self
            .last_prune_ms
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.prune(now);
        }
    }

    /// Drops every entry that no longer matters.
    pub fn prune(&self, now: Instant) {
        // Only one pruner at a time; a request that finds another pruning simply goes on.
        let Ok(_guard) = self.pruning.try_lock() else {
            return;
        };
        let ttl = self.ttl;
        self.table.retain(|_, f| !f.expired(now, ttl));
    }
}

fn ceil_secs(d: Duration) -> u64 {
    let s = d.as_secs();
    if d.subsec_nanos() > 0 {
        s + 1
    } else {
        s
    }
}

fn remaining_secs(until: Instant, now: Instant) -> Option<u64> {
    let left = until.checked_duration_since(now)?;
    if left.is_zero() {
        None
    } else {
        Some(ceil_secs(left).max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("valid ip")
    }

    #[test]
    fn locks_after_max_failures_and_unlocks_after_ttl() {
        let l = Lockout::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        let a = ip("10.0.0.1");
        l.record_failure_at(a, t0);
        l.record_failure_at(a, t0);
        assert_eq!(l.locked_for_at(a, t0), None);
        l.record_failure_at(a, t0);
        assert_eq!(l.locked_for_at(a, t0), Some(60));
        assert_eq!(
            l.locked_for_at(a, t0 + Duration::from_secs(59)),
            Some(1),
            "still locked just before the window ends"
        );
        assert_eq!(l.locked_for_at(a, t0 + Duration::from_secs(60)), None);
        // Other addresses are unaffected.
        assert_eq!(l.locked_for_at(ip("10.0.0.2"), t0), None);
    }

    #[test]
    fn the_quick_answer_without_running_locks_agrees_with_the_table() {
        let l = Lockout::new(1, Duration::from_secs(10));
        let t0 = Instant::now();
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        assert_eq!(l.locked_for(a), None, "no lock was ever set");
        l.record_failure_at(a, t0);
        assert_eq!(
            l.locked_for_at(a, t0 + Duration::from_millis(9_999)),
            Some(1)
        );
        assert_eq!(l.locked_for_at(a, t0 + Duration::from_secs(10)), None);
        // A later lock of another address is seen, and keeps the earlier one's answers.
        l.record_failure_at(b, t0 + Duration::from_secs(5));
        assert_eq!(l.locked_for_at(a, t0 + Duration::from_secs(11)), None);
        assert_eq!(l.locked_for_at(b, t0 + Duration::from_secs(11)), Some(4));
        assert_eq!(l.locked_for_at(b, t0 + Duration::from_secs(15)), None);
        let now = Lockout::new(1, Duration::from_secs(10));
        now.record_failure(a);
        assert_eq!(
            now.locked_for(a),
            Some(10),
            "a lock set now is seen at once"
        );
        assert_eq!(now.locked_for(b), None);
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let l = Lockout::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        let a = ip("10.0.0.1");
        l.record_failure_at(a, t0);
        l.record_failure_at(a, t0 + Duration::from_secs(11));
        assert_eq!(l.locked_for_at(a, t0 + Duration::from_secs(11)), None);
    }

    #[test]
    fn mapped_v6_counts_as_v4() {
        let l = Lockout::new(1, Duration::from_secs(10));
        l.record_failure(ip("::ffff:10.0.0.1"));
        assert!(l.locked_for(ip("10.0.0.1")).is_some());
        assert_eq!(l.locked().len(), 1);
        assert_eq!(l.locked()[0].ip, ip("10.0.0.1"));
    }

    #[test]
    fn table_is_bounded_and_expired_entries_make_room() {
        let l = Lockout::with_capacity(5, Duration::from_secs(10), 3);
        let t0 = Instant::now();
        for i in 1..=5u8 {
            l.record_failure_at(IpAddr::from([10, 0, 0, i]), t0);
        }
        assert_eq!(l.tracked(), 3, "never more than the cap");
        let later = t0 + Duration::from_secs(11);
        l.record_failure_at(ip("10.0.1.1"), later);
        assert_eq!(l.tracked(), 1, "expired entries were pruned to make room");
    }

    #[test]
    fn zero_max_disables() {
        let l = Lockout::new(0, Duration::from_secs(10));
        for _ in 0..10 {
            l.record_failure(ip("10.0.0.1"));
        }
        assert_eq!(l.locked_for(ip("10.0.0.1")), None);
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn unlock_forgets() {
        let l = Lockout::new(1, Duration::from_secs(10));
        l.record_failure(ip("10.0.0.1"));
        assert!(l.unlock(ip("10.0.0.1")));
        assert_eq!(l.locked_for(ip("10.0.0.1")), None);
    }
}
