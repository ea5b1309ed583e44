//! Client addresses and address lists: which IP a request comes from (honouring
//! `TRUSTED_PROXIES` hops of `X-Forwarded-For`, as Express's `trust proxy` does) and CIDR
//! membership. Knows nothing of users.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;
use ipnet::IpNet;

/// The client's address as decided once per request by [`crate::gatekeeper::guard`]; read it from the
/// request extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

/// Maps `::ffff:a.b.c.d` to `a.b.c.d`, so one client has one address whatever the socket.
pub fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The client address: the socket peer, or with `trusted_proxies = n > 0` the address `n` hops
/// back through `X-Forwarded-For` (the farthest one when the header has fewer entries). With 0
/// the header is ignored, so it cannot be spoofed.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted_proxies: usize) -> IpAddr {
    let peer = normalize(peer);
    if trusted_proxies == 0 {
        return peer;
    }
    // Every X-Forwarded-For header, every comma-separated entry, right-most = nearest hop.
    let mut hops: Vec<IpAddr> = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let Ok(s) = value.to_str() else { return peer };
        for part in s.split(',') {
            match parse_forwarded_entry(part.trim()) {
                Some(ip) => hops.push(normalize(ip)),
                // An unparseable entry ends what we can trust.
                None => return hops.last().copied().unwrap_or(peer),
            }
        }
    }
    // addrs = [peer, nearest XFF, ..., farthest XFF]; trust `trusted_proxies` of them.
    let idx = trusted_proxies.min(hops.len());
    if idx == 0 {
        peer
    } else {
        hops[hops.len() - idx]
    }
}

fn parse_forwarded_entry(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    // "1.2.3.4:5678" or "[::1]:5678"
    s.parse::<SocketAddr>().ok().map(|sa| sa.ip())
}

/// True when `ip` falls in any of `list`.
pub fn in_list(list: &[IpNet], ip: IpAddr) -> bool {
    let ip = normalize(ip);
    list.iter().any(|net| net.contains(&ip))
}

/// Masks an address for showing it to its user: `127.0.xxx.xxx`, `2001:db8:xxxx:…`.
pub fn mask(ip: &str) -> String {
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => {
            let o = v4.octets();
            format!("{}.{}.xxx.xxx", o[0], o[1])
        }
        Ok(IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("{:x}:{:x}:xxxx:xxxx:xxxx:xxxx:xxxx:xxxx", s[0], s[1])
        }
        Err(_) => "xxx".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

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

    #[test]
    fn zero_trusted_ignores_header() {
        assert_eq!(
            client_ip(ip("127.0.0.1"), &h("9.9.9.9"), 0),
            ip("127.0.0.1")
        );
    }

    #[test]
    fn one_trusted_takes_last_entry() {
        assert_eq!(
            client_ip(ip("127.0.0.1"), &h("6.6.6.6, 9.9.9.9"), 1),
            ip("9.9.9.9")
        );
        assert_eq!(
            client_ip(ip("127.0.0.1"), &h("6.6.6.6, 9.9.9.9"), 2),
            ip("6.6.6.6")
        );
        assert_eq!(client_ip(ip("127.0.0.1"), &h("9.9.9.9"), 5), ip("9.9.9.9"));
        assert_eq!(
            client_ip(ip("127.0.0.1"), &HeaderMap::new(), 1),
            ip("127.0.0.1")
        );
    }

    #[test]
    fn mapped_v6_is_normalised() {
        assert_eq!(
            client_ip(ip("::ffff:10.1.2.3"), &HeaderMap::new(), 0),
            ip("10.1.2.3")
        );
    }

    #[test]
    fn masks() {
        assert_eq!(mask("127.0.0.1"), "127.0.xxx.xxx");
    }
}
