//! Exact percentiles (every sample kept and sorted: a run has at most a few million).

use serde_json::{json, Value};

/// Summary of latencies given in nanoseconds, reported in microseconds.
pub fn summary_us(samples: &mut [u64]) -> Value {
    if samples.is_empty() {
        return json!({"count": 0});
    }
    samples.sort_unstable();
    let us = |ns: u64| (ns as f64 / 1000.0 * 10.0).round() / 10.0;
    let sum: u128 = samples.iter().map(|&s| u128::from(s)).sum();
    json!({
        "count": samples.len(),
        "mean_us": us((sum / samples.len() as u128) as u64),
        "p50_us": us(pct(samples, 0.50)),
        "p90_us": us(pct(samples, 0.90)),
        "p99_us": us(pct(samples, 0.99)),
        "p999_us": us(pct(samples, 0.999)),
        "max_us": us(samples[samples.len() - 1]),
    })
}

/// The `p` quantile of sorted samples (nearest rank).
pub fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Same for signed values (differences can be negative).
pub fn pct_i(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
