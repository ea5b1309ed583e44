//! The prompt rate limit (`TEXT_MODEL_RATE_LIMIT` prompts per minute), keyed by user token or,
//! without a user, by client address. Built on `governor`'s keyed GCRA limiter: a key may send
//! a burst of `limit` prompts, then one more every `60 / limit` seconds. Its memory is bounded
//! by [`PromptLimiter::retain_recent`], which the background task calls every minute.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

/// Who a prompt is counted against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RateKey {
    User(String),
    Ip(IpAddr),
}

type Limiter<C> = RateLimiter<RateKey, DashMapStateStore<RateKey>, C, StateInformationMiddleware>;

/// The limiter over a clock (the real one in the server, a fake one in tests).
pub struct PromptLimiter<C: Clock = DefaultClock> {
    limiter: Limiter<C>,
    clock: C,
    limit: u32,
    interval: Duration,
}

/// The outcome of one check: the headers every generation response carries, and, when
/// refused, the seconds to wait.
#[derive(Debug)]
pub struct RateDecision {
    pub headers: HeaderMap,
    pub retry_after: Option<u64>,
}

pub const LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
pub const REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
pub const RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

impl PromptLimiter {
    /// `None` when `per_minute` is 0 (the limit is disabled).
    pub fn new(per_minute: u32) -> Option<PromptLimiter> {
        PromptLimiter::with_clock(per_minute, DefaultClock::default())
    }
}

impl<C: Clock + Clone> PromptLimiter<C> {
    /// As [`PromptLimiter::new`], over `clock`.
    pub fn with_clock(per_minute: u32, clock: C) -> Option<PromptLimiter<C>> {
        let limit = NonZeroU32::new(per_minute)?;
        let quota = Quota::per_minute(limit);
        Some(PromptLimiter {
            limiter: RateLimiter::dashmap_with_clock(quota, clock.clone())
                .with_middleware::<StateInformationMiddleware>(),
            interval: quota.replenish_interval(),
            clock,
            limit: limit.get(),
        })
    }

    /// Counts one prompt for `key` if the key has room.
    pub fn check(&self, key: &RateKey) -> RateDecision {
        match self.limiter.check_key(key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                // The bucket refills one prompt per interval, so it is full again once every
                // prompt used so far has been replenished.
                let used = self.limit.saturating_sub(remaining);
                let reset = ceil_secs(self.interval.saturating_mul(used));
                RateDecision {
                    headers: self.headers(remaining, reset),
                    retry_after: None,
                }
            }
            Err(not_until) => {
                let wait = ceil_secs(not_until.wait_time_from(self.clock.now())).max(1);
                let reset = ceil_secs(self.interval.saturating_mul(self.limit)).max(wait);
                RateDecision {
                    headers: self.headers(0, reset),
                    retry_after: Some(wait),
                }
            }
        }
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Forgets keys whose bucket is full again (they would behave as new keys anyway).
    pub fn retain_recent(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// How many keys are tracked.
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }

    fn headers(&self, remaining: u32, reset_secs: u64) -> HeaderMap {
        let mut h = HeaderMap::with_capacity(3);
        h.insert(LIMIT, HeaderValue::from(self.limit));
        h.insert(REMAINING, HeaderValue::from(remaining));
        h.insert(RESET, HeaderValue::from(reset_secs));
        h
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn header(d: &RateDecision, name: &HeaderName) -> u64 {
        d.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("header present")
    }

    #[test]
    fn zero_disables() {
        assert!(PromptLimiter::new(0).is_none());
    }

    #[test]
    fn refill_retry_after_reset_and_forgetting_on_a_driven_clock() {
        let clock = FakeRelativeClock::default();
        let l = PromptLimiter::with_clock(4, clock.clone()).expect("enabled");
        let k = RateKey::User("u".into());
        let first = l.check(&k);
        // One prompt used; it is back after 15 s.
        assert_eq!(header(&first, &RESET), 15);
        for _ in 0..3 {
            assert!(l.check(&k).retry_after.is_none());
        }
        let refused = l.check(&k);
        assert_eq!(refused.retry_after, Some(15));
        assert_eq!(header(&refused, &RESET), 60);
        clock.advance(Duration::from_secs(15));
        let d = l.check(&k);
        assert!(d.retry_after.is_none(), "one prompt refilled after 15 s");
        assert_eq!(header(&d, &REMAINING), 0);
        assert_eq!(l.check(&k).retry_after, Some(15));
        // Once its bucket is full again (plus one interval), the key is forgotten, so memory
        // stays bounded by the callers of the last minute or so.
        clock.advance(Duration::from_secs(80));
        l.retain_recent();
        assert!(l.is_empty());
        assert_eq!(header(&l.check(&k), &REMAINING), 3);
    }

    #[test]
    fn burst_then_refusal_with_retry_after() {
        let l = PromptLimiter::new(4).expect("enabled");
        let k = RateKey::User("u".into());
        for expected_remaining in [3, 2, 1, 0] {
            let d = l.check(&k);
            assert!(d.retry_after.is_none());
            assert_eq!(header(&d, &LIMIT), 4);
            assert_eq!(header(&d, &REMAINING), expected_remaining);
            assert!(header(&d, &RESET) <= 60);
        }
        let d = l.check(&k);
        let wait = d.retry_after.expect("refused");
        assert!(
            (1..=15).contains(&wait),
            "one prompt refills in 15 s, got {wait}"
        );
        assert_eq!(header(&d, &REMAINING), 0);
        // Another key is independent.
        assert!(l
            .check(&RateKey::Ip("127.0.0.1".parse().expect("ip")))
            .retry_after
            .is_none());
        assert_eq!(l.len(), 2);
    }
}
