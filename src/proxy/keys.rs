//! The upstream key pool of one provider: round-robin over the operator's keys, taking a key
//! out of rotation when the upstream says it is invalid (401/403) and resting it when the
//! upstream says it is rate-limited (429). Lock-free: a request touches only atomics.
//!
//! Keys are only ever logged by [`crate::users::fingerprint`], never in clear.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::HeaderValue;
use serde::Serialize;

use crate::config::{ConfigError, Secret};
use crate::users::fingerprint;

/// One operator key with its state.
struct PoolKey {
    /// The ready-made credential header value (`Bearer <key>` or the bare key), marked
    /// sensitive so that no HTTP-level debug output prints it.
    header: HeaderValue,
    fingerprint: String,
    /// Set once when the upstream answered 401/403 for this key; never cleared (the operator
    /// must replace the key and restart).
    invalid: AtomicBool,
    /// Milliseconds since the pool's epoch until which the key rests after a 429.
    rest_until_ms: AtomicU64,
}

/// Why no key could be chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoKey {
    /// The variable is empty or unset.
    NoneConfigured,
    /// Every key was rejected by the upstream as invalid.
    AllInvalid,
    /// Every usable key is resting after a 429; the first one is free again after this long.
    AllResting(Duration),
}

/// A chosen key: its position in the pool, the credential header value and its fingerprint.
#[derive(Debug, Clone)]
pub struct ChosenKey {
    pub index: usize,
    pub header: HeaderValue,
    pub fingerprint: String,
}

/// How many keys a provider has and in what state (shown on the service info page).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyCounts {
    /// Every configured key.
    pub total: usize,
    /// Keys that may be used right now.
    pub working: usize,
    /// Keys resting after a 429.
    pub resting: usize,
    /// Keys the upstream rejected as invalid (out of rotation until restart).
    pub invalid: usize,
}

/// The key pool of one provider.
pub struct KeyPool {
    /// The environment variable the keys came from, for messages (`OPENAI_KEY`).
    var: &'static str,
    keys: Box<[PoolKey]>,
    next: AtomicUsize,
    epoch: Instant,
}

impl KeyPool {
    /// Builds a pool; `bearer` decides whether the header value is `Bearer <key>` (OpenAI) or
    /// the bare key (Anthropic's `x-api-key`).
    pub fn new(var: &'static str, keys: &[Secret], bearer: bool) -> Result<KeyPool, ConfigError> {
        if bearer {
            KeyPool::with_credential(var, keys, |k| format!("Bearer {k}"))
        } else {
            KeyPool::with_credential(var, keys, str::to_string)
        }
    }

    /// Builds a pool whose credential value for a key is `credential(key)` (the provider
    /// decides: `Bearer <key>`, the bare key, ...).
    pub fn with_credential(
        var: &'static str,
        keys: &[Secret],
        credential: impl Fn(&str) -> String,
    ) -> Result<KeyPool, ConfigError> {
        let mut pool = Vec::with_capacity(keys.len());
        for key in keys {
            let fp = fingerprint(key.expose());
            let raw = credential(key.expose());
            let mut header = HeaderValue::from_str(&raw).map_err(|_| {
                ConfigError(format!(
                    "{var} contains a key (fingerprint {fp}) with characters that are not allowed in an HTTP header; check for quotes, spaces or line breaks"
                ))
            })?;
            header.set_sensitive(true);
            pool.push(PoolKey {
                header,
                fingerprint: fp,
                invalid: AtomicBool::new(false),
                rest_until_ms: AtomicU64::new(0),
            });
        }
        Ok(KeyPool {
            var,
            keys: pool.into_boxed_slice(),
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
        })
    }

    /// The variable name the keys came from.
    pub fn var(&self) -> &'static str {
        self.var
    }

    /// Whether any key is configured at all.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Chooses the next usable key in round-robin order, skipping invalid and resting keys.
    pub fn pick(&self) -> Result<ChosenKey, NoKey> {
        self.pick_where(|_| true)
    }

    /// As [`KeyPool::pick`], among the keys whose index `eligible` accepts (Azure: the
    /// credentials of the deployment the client named).
    pub fn pick_where(&self, eligible: impl Fn(usize) -> bool) -> Result<ChosenKey, NoKey> {
        let n = self.keys.len();
        if n == 0 {
            return Err(NoKey::NoneConfigured);
        }
        let now = self.now_ms();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut soonest: Option<u64> = None;
        for off in 0..n {
            let index = (start.wrapping_add(off)) % n;
            let key = &self.keys[index];
            if !eligible(index) {
                continue;
            }
            if key.invalid.load(Ordering::Relaxed) {
                continue;
            }
            let until = key.rest_until_ms.load(Ordering::Relaxed);
            if until > now {
                soonest = Some(soonest.map_or(until, |s| s.min(until)));
                continue;
            }
            return Ok(ChosenKey {
                index,
                header: key.header.clone(),
                fingerprint: key.fingerprint.clone(),
            });
        }
        match soonest {
            Some(until) => Err(NoKey::AllResting(Duration::from_millis(until - now))),
            None => Err(NoKey::AllInvalid),
        }
    }

    /// Takes a key out of rotation because the upstream rejected it (401/403). Logs once.
    pub fn mark_invalid(&self, index: usize, status: u16) {
        if let Some(key) = self.keys.get(index) {
            if !key.invalid.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    var = self.var,
                    key = %key.fingerprint,
                    status,
                    "the upstream rejected this key as invalid; it is out of rotation until restart (replace it in {})",
                    self.var
                );
            }
        }
    }

    /// Rests a key for `dur` because the upstream rate-limited it (429).
    pub fn rest(&self, index: usize, dur: Duration) {
        if let Some(key) = self.keys.get(index) {
            let until = self
                .now_ms()
                .saturating_add(u64::try_from(dur.as_millis()).unwrap_or(u64::MAX));
            key.rest_until_ms.fetch_max(until, Ordering::Relaxed);
            tracing::warn!(
                var = self.var,
                key = %key.fingerprint,
                rest_secs = dur.as_secs_f64(),
                "the upstream rate-limited this key (429); resting it"
            );
        }
    }

    /// Counts keys by state.
    pub fn counts(&self) -> KeyCounts {
        let now = self.now_ms();
        let mut c = KeyCounts {
            total: self.keys.len(),
            ..KeyCounts::default()
        };
        for key in self.keys.iter() {
            if key.invalid.load(Ordering::Relaxed) {
                c.invalid += 1;
            } else if key.rest_until_ms.load(Ordering::Relaxed) > now {
                c.resting += 1;
            } else {
                c.working += 1;
            }
        }
        c
    }
}

/// How long a rate-limited key rests when the upstream does not say.
pub const DEFAULT_REST: Duration = Duration::from_secs(60);

/// Reads how long to rest a key from a 429's headers: `retry-after-ms`, then `retry-after`
/// (seconds or an HTTP date), else [`DEFAULT_REST`]. Capped at one hour so that a wrong header
/// cannot take a key out for good.
pub fn rest_duration(headers: &axum::http::HeaderMap) -> Duration {
    let parsed = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
        .or_else(|| {
            headers
                .get(axum::http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after)
        });
    parsed
        .unwrap_or(DEFAULT_REST)
        .min(Duration::from_secs(3600))
}

/// Parses a `Retry-After` value: delta-seconds (possibly fractional) or an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let date = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let delta = date.signed_duration_since(chrono::Utc::now());
    Some(delta.to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> KeyPool {
        let keys: Vec<Secret> = (0..n).map(|i| Secret::new(format!("key{i}"))).collect();
        KeyPool::new("OPENAI_KEY", &keys, true).expect("pool")
    }

    #[test]
    fn round_robin_skips_invalid_and_resting() {
        let p = pool(3);
        let order: Vec<usize> = (0..3).map(|_| p.pick().expect("key").index).collect();
        assert_eq!(order, vec![0, 1, 2]);
        p.mark_invalid(1, 401);
        p.rest(2, Duration::from_secs(30));
        for _ in 0..4 {
            assert_eq!(p.pick().expect("key").index, 0);
        }
        assert_eq!(
            p.counts(),
            KeyCounts {
                total: 3,
                working: 1,
                resting: 1,
                invalid: 1
            }
        );
        p.rest(0, Duration::from_secs(10));
        match p.pick() {
            Err(NoKey::AllResting(d)) => assert!(d <= Duration::from_secs(10)),
            other => panic!("expected all resting, got {other:?}"),
        }
    }

    #[test]
    fn empty_and_all_invalid() {
        assert_eq!(pool(0).pick().err(), Some(NoKey::NoneConfigured));
        let p = pool(2);
        p.mark_invalid(0, 401);
        p.mark_invalid(1, 403);
        assert_eq!(p.pick().err(), Some(NoKey::AllInvalid));
    }

    #[test]
    fn header_value_is_bearer_or_bare() {
        let keys = [Secret::new("sk-1")];
        let o = KeyPool::new("OPENAI_KEY", &keys, true).expect("pool");
        assert_eq!(o.pick().expect("key").header, "Bearer sk-1");
        let a = KeyPool::new("ANTHROPIC_KEY", &keys, false).expect("pool");
        assert_eq!(a.pick().expect("key").header, "sk-1");
    }

    #[test]
    fn bad_key_is_a_config_error_without_the_key() {
        let keys = [Secret::new("sk-secret\nvalue")];
        let e = KeyPool::new("OPENAI_KEY", &keys, true)
            .err()
            .expect("must fail");
        assert!(e.0.contains("OPENAI_KEY"));
        assert!(!e.0.contains("sk-secret"));
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        let future = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        let d = parse_retry_after(&future).expect("date parses");
        assert!(d > Duration::from_secs(25) && d <= Duration::from_secs(30));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
        let h = axum::http::HeaderMap::new();
        assert_eq!(rest_duration(&h), DEFAULT_REST);
    }
}
