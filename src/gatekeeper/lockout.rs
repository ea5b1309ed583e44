//! Brute-force protection: failed credential attempts counted per client address; an address
//! with too many failures inside the window is refused (even with a correct key) until the
//! window passes. The table is bounded and expires its entries.
//!
//! (Skeleton: to be completed by the per-user-tokens work.)

use std::net::IpAddr;
use std::time::Duration;

pub struct Lockout {
    pub max_failures: u32,
    pub ttl: Duration,
}

impl Lockout {
    pub fn new(max_failures: u32, ttl: Duration) -> Lockout {
        Lockout { max_failures, ttl }
    }

    /// Seconds until `ip` may try again, when it is locked out.
    pub fn locked_for(&self, _ip: IpAddr) -> Option<u64> {
        None
    }

    /// Counts one failed attempt from `ip`.
    pub fn record_failure(&self, _ip: IpAddr) {}
}
