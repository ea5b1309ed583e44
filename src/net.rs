//! Addresses and address lists: normalising an IP, CIDR membership, masking an address for
//! display. Knows nothing of requests or users; which address a request comes from is decided
//! in [`crate::auth::client_addr`].

use std::net::IpAddr;

use ipnet::IpNet;

/// Kept here for modules that name it by its old path.
pub use crate::auth::client_addr::ClientIp;

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

    #[test]
    fn masks() {
        assert_eq!(mask("127.0.0.1"), "127.0.xxx.xxx");
    }
}
