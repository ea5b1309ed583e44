//! The client address of a request: the socket peer, or with `TRUSTED_PROXIES` hops the
//! entry of `X-Forwarded-For` the outermost trusted proxy appended, read from the right.
//! Decided once per request by [`crate::auth::guard`]. Knows nothing of users.

use std::net::{IpAddr, SocketAddr};

use crate::http1::Lookup;
use crate::net::normalize;

/// The client's address as decided once per request by [`crate::auth::guard`]; read it from the
/// request extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

/// Why `X-Forwarded-For` could not be trusted: one of the entries our trusted proxies appended
/// is not an address. The request is refused rather than guessed at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadForwardedFor {
    /// The offending entry, cut to a few characters for the error message.
    pub entry: String,
}

impl BadForwardedFor {
    fn new(entry: &str) -> BadForwardedFor {
        BadForwardedFor {
            entry: entry.chars().take(40).collect(),
        }
    }
}

static X_FORWARDED_FOR: axum::http::HeaderName =
    axum::http::HeaderName::from_static("x-forwarded-for");

/// The client address: the socket peer, or with `trusted_proxies = n > 0` the `n`-th entry of
/// `X-Forwarded-For` **counted from the right** — the one the outermost trusted proxy appended
/// (with fewer entries, the left-most one: every entry was then written by a trusted proxy).
/// Nothing left of that entry counts, whatever it contains, since the client wrote it; an entry
/// among the `n` right-most that is not an address (`unknown`, an empty `,,`, garbage) makes
/// the header untrustworthy, and the request is refused. With 0 the header is ignored, so it
/// cannot be forged.
pub fn client_ip<H: Lookup + ?Sized>(
    peer: IpAddr,
    headers: &H,
    trusted_proxies: usize,
) -> Result<IpAddr, BadForwardedFor> {
    let peer = normalize(peer);
    if trusted_proxies == 0 {
        return Ok(peer);
    }
    // Every X-Forwarded-For header in order, every comma-separated entry; walked from the
    // right (the nearest hop) and only as far as the trusted hops reach.
    let values: Vec<&[u8]> = headers
        .each(&X_FORWARDED_FOR)
        .map(|v| v.as_bytes())
        .collect();
    let mut chosen = None;
    let mut seen = 0usize;
    'outer: for value in values.iter().rev() {
        for part in value.rsplit(|b| *b == b',') {
            let text = std::str::from_utf8(part).unwrap_or("\u{fffd}").trim();
            let ip = parse_forwarded_entry(text).ok_or_else(|| BadForwardedFor::new(text))?;
            chosen = Some(normalize(ip));
            seen += 1;
            if seen == trusted_proxies {
                break 'outer;
            }
        }
    }
    Ok(chosen.unwrap_or(peer))
}

fn parse_forwarded_entry(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    // "1.2.3.4:5678" or "[::1]:5678"
    s.parse::<SocketAddr>().ok().map(|sa| sa.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue};

    fn h(xff: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(
            "x-forwarded-for",
            HeaderValue::from_str(xff).expect("valid header"),
        );
        m
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().expect("valid ip")
    }

    fn xff(peer: &str, header: &str, n: usize) -> Result<IpAddr, BadForwardedFor> {
        client_ip(ip(peer), &h(header), n)
    }

    #[test]
    fn zero_trusted_ignores_header() {
        assert_eq!(xff("127.0.0.1", "9.9.9.9", 0), Ok(ip("127.0.0.1")));
        assert_eq!(xff("127.0.0.1", "garbage", 0), Ok(ip("127.0.0.1")));
    }

    #[test]
    fn n_trusted_takes_the_nth_entry_from_the_right() {
        assert_eq!(xff("127.0.0.1", "6.6.6.6, 9.9.9.9", 1), Ok(ip("9.9.9.9")));
        assert_eq!(xff("127.0.0.1", "6.6.6.6, 9.9.9.9", 2), Ok(ip("6.6.6.6")));
        assert_eq!(xff("127.0.0.1", "9.9.9.9", 5), Ok(ip("9.9.9.9")));
        assert_eq!(
            client_ip(ip("127.0.0.1"), &HeaderMap::new(), 1),
            Ok(ip("127.0.0.1"))
        );
        assert_eq!(xff("127.0.0.1", "[::1]:80, 1.2.3.4:5", 2), Ok(ip("::1")));
        // Several headers read as one list, in order.
        let mut m = h("6.6.6.6");
        m.append("x-forwarded-for", HeaderValue::from_static("7.7.7.7"));
        assert_eq!(client_ip(ip("127.0.0.1"), &m, 1), Ok(ip("7.7.7.7")));
        assert_eq!(client_ip(ip("127.0.0.1"), &m, 2), Ok(ip("6.6.6.6")));
    }

    /// The attack strings of issue 12: whatever the client writes left of the entry the
    /// trusted proxy appended does not count; the left-to-right parser stopped at the first
    /// bad entry and took the client's choice.
    #[test]
    fn client_written_entries_left_of_the_trusted_ones_do_not_count() {
        for forged in [
            "10.9.9.9, x, 127.0.0.77",
            "10.9.9.9,,127.0.0.77",
            "10.9.9.9, unknown, 127.0.0.77",
            "garbage, 127.0.0.77",
            "10.9.9.9, 127.0.0.77",
        ] {
            assert_eq!(
                xff("127.0.0.1", forged, 1),
                Ok(ip("127.0.0.77")),
                "{forged}"
            );
        }
    }

    #[test]
    fn a_bad_entry_among_the_trusted_ones_is_refused() {
        for bad in ["10.9.9.9, unknown", "10.9.9.9,", "garbage", ""] {
            assert!(xff("127.0.0.1", bad, 1).is_err(), "{bad:?}");
        }
        assert_eq!(
            xff("127.0.0.1", "10.9.9.9, x, 127.0.0.77", 2),
            Err(BadForwardedFor { entry: "x".into() })
        );
        let mut m = HeaderMap::new();
        m.insert(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"1.2.3.4\xff").expect("opaque header"),
        );
        assert!(client_ip(ip("127.0.0.1"), &m, 1).is_err());
    }

    #[test]
    fn mapped_v6_is_normalised() {
        assert_eq!(
            client_ip(ip("::ffff:10.1.2.3"), &HeaderMap::new(), 0),
            Ok(ip("10.1.2.3"))
        );
        assert_eq!(xff("127.0.0.1", "::ffff:10.1.2.3", 1), Ok(ip("10.1.2.3")));
    }
}
