//! `REJECT_PHRASES` / `REJECT_MESSAGE`: prompts that contain a rejected phrase are refused,
//! and repeated rejections from one address are slowed down (bounded), as the original's
//! `language-filter` does: the n-th rejection in a row waits `min(60 s, 2^(n-1) s)`, and an
//! address's count halves every 30 s.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use regex::{RegexSet, RegexSetBuilder};

use crate::config::ConfigError;

/// The longest slow-down of a rejection (the original's 60 s).
pub const MAX_DELAY: Duration = Duration::from_secs(60);
/// How often an address's rejection count halves (the original's 30 s).
const HALF_LIFE: Duration = Duration::from_secs(30);
/// Addresses remembered at most; beyond that the oldest half is forgotten. Bounds memory
/// under a flood of rejected prompts from many addresses.
const MAX_TRACKED: usize = 10_000;

/// The compiled phrases and the message.
#[derive(Debug, Clone)]
pub struct RejectPhrases {
    /// The phrases are regular expressions matched case-insensitively, as in the original
    /// (`new RegExp(phrase, "i")`); a plain phrase is its own pattern.
    set: Option<RegexSet>,
    phrases: Vec<String>,
    pub message: String,
}

impl RejectPhrases {
    pub fn new(phrases: &[String], message: &str) -> Result<RejectPhrases, ConfigError> {
        let set = if phrases.is_empty() {
            None
        } else {
            Some(
                RegexSetBuilder::new(phrases)
                    .case_insensitive(true)
                    .build()
                    .map_err(|e| {
                        ConfigError(format!(
                            "REJECT_PHRASES: a phrase is not a valid pattern ({e}); escape special characters such as ( [ * + ? with a backslash"
                        ))
                    })?,
            )
        };
        Ok(RejectPhrases {
            set,
            phrases: phrases.to_vec(),
            message: message.to_string(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_none()
    }

    /// The first phrase the prompt contains, if any.
    pub fn find(&self, prompt: &str) -> Option<&str> {
        let set = self.set.as_ref()?;
        let i = set.matches(prompt).iter().next()?;
        self.phrases.get(i).map(String::as_str)
    }
}

/// Rejection counts per address, for the slow-down.
#[derive(Debug, Default)]
pub struct Rejections {
    by_ip: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl Rejections {
    /// Records one more rejection from `ip` at `now` and returns how long to hold the answer.
    pub fn record(&self, ip: IpAddr, now: Instant) -> Duration {
        let mut map = self.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_TRACKED && !map.contains_key(&ip) {
            // Forget the addresses whose last rejection is oldest.
            let mut times: Vec<Instant> = map.values().map(|(_, t)| *t).collect();
            times.sort_unstable();
            if let Some(&cutoff) = times.get(times.len() / 2) {
                map.retain(|_, (_, t)| *t > cutoff);
            }
        }
        let entry = map.entry(ip).or_insert((0, now));
        let halvings = now.saturating_duration_since(entry.1).as_secs() / HALF_LIFE.as_secs();
        let decayed = entry.0.checked_shr(halvings.min(31) as u32).unwrap_or(0);
        let count = decayed.saturating_add(1);
        *entry = (count, now);
        delay_for(count)
    }
}

/// `min(60 s, 2^(n-1) s)` for the n-th rejection.
pub fn delay_for(n: u32) -> Duration {
    let exp = n.saturating_sub(1).min(6);
    Duration::from_secs(1u64 << exp).min(MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phrases_match_case_insensitively_as_patterns() {
        let p = RejectPhrases::new(&["forbidden fruit".into(), "bad\\s+word".into()], "no")
            .expect("valid");
        assert_eq!(
            p.find("I want the FORBIDDEN Fruit"),
            Some("forbidden fruit")
        );
        assert_eq!(p.find("a bad   word here"), Some("bad\\s+word"));
        assert_eq!(p.find("all fine"), None);
        assert!(RejectPhrases::new(&[], "no")
            .expect("valid")
            .find("x")
            .is_none());
        let e = RejectPhrases::new(&["(unclosed".into()], "no").expect_err("invalid");
        assert!(e.0.contains("REJECT_PHRASES"));
    }

    #[test]
    fn repeated_rejections_wait_longer_up_to_a_bound_and_decay() {
        let r = Rejections::default();
        let ip = IpAddr::from([10, 0, 0, 1]);
        let t0 = Instant::now();
        let delays: Vec<u64> = (0..9).map(|_| r.record(ip, t0).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
        // Another address starts from the beginning.
        assert_eq!(r.record(IpAddr::from([10, 0, 0, 2]), t0).as_secs(), 1);
        // After 30 s of quiet the count has halved (9 → 4), so the next is the 5th: 16 s.
        let later = t0 + Duration::from_secs(30);
        assert_eq!(r.record(ip, later).as_secs(), 16);
        // Long quiet forgets it entirely.
        let much_later = later + Duration::from_secs(3600);
        assert_eq!(r.record(ip, much_later).as_secs(), 1);
    }

    #[test]
    fn memory_is_bounded() {
        let r = Rejections::default();
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 10) {
            let ip = IpAddr::from(i.to_be_bytes());
            r.record(ip, t0 + Duration::from_millis(u64::from(i)));
        }
        let len = r.by_ip.lock().expect("lock").len();
        assert!(len <= MAX_TRACKED, "{len}");
    }
}
