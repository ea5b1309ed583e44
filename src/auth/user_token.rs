//! `GATEKEEPER=user_token`: admits a request carrying a known, enabled, unexpired user token;
//! records the client address (enforcing `MAX_IPS_PER_USER` / `maxIps`, with optional
//! auto-ban) and the time of last use.
//!
//! The hot path is cheap: a shard read lock decides most requests; the write lock is taken
//! (and the user marked dirty for persistence) only when something changes — a new address,
//! or `lastUsedAt` older than [`LAST_USED_RESOLUTION_MS`]. `promptCount` is counted by the
//! quota module on generation requests, not here.

use std::net::IpAddr;

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::ProxyError;
use crate::users::{fingerprint, now_ms, Token, UserType};

/// `lastUsedAt` is rewritten at most once per this many milliseconds per user (it is "last used"
/// to the minute), so a busy user does not take a write lock and a persistence write on every
/// request: with many active users a one-second resolution meant a write on nearly every one.
pub const LAST_USED_RESOLUTION_MS: i64 = 60_000;

/// The reason recorded when `MAX_IPS_AUTO_BAN` disables a user.
pub const IP_LIMIT_BAN_REASON: &str = "IP address limit exceeded.";

/// The message of the refusal when a user is over their address limit.
pub const IP_LIMIT_MESSAGE: &str = "no more IP addresses allowed for this user token";

/// What the read-only look at the user decided.
enum Look {
    Refused(ProxyError),
    /// Admitted, nothing to write.
    Pass(UserType),
    /// Admitted if the write path agrees (a new address or a stale `lastUsedAt`).
    NeedsWrite,
}

/// The IP limit that applies to a user: their `maxIps`, else `MAX_IPS_PER_USER`; 0 and
/// `special` users mean unlimited.
fn ip_limit(kind: UserType, max_ips: Option<u32>, global: u32) -> Option<usize> {
    if kind == UserType::Special {
        return None;
    }
    match max_ips.unwrap_or(global) {
        0 => None,
        n => Some(n as usize),
    }
}

fn disabled_error(reason: Option<&str>) -> ProxyError {
    ProxyError::forbidden(format!(
        "This user token has been disabled: {}",
        reason.unwrap_or("no reason given")
    ))
}

fn expired_error() -> ProxyError {
    ProxyError::forbidden("This user token has been disabled: Temporary token expired.")
}

/// Admits `token` from `ip`, or says why not (401 unknown, 403 disabled/expired/over the IP
/// limit). An unknown token counts as a failed attempt for the brute-force lockout.
pub fn admit(state: &AppState, token: &str, ip: IpAddr) -> Result<Principal, ProxyError> {
    let now = now_ms();
    // The address as text on the stack: the usual request only compares it with the user's
    // known addresses, and only the write path below keeps a copy (one allocation less).
    let mut ip_buf = [0u8; 64];
    let ip_s = ip_text(ip, &mut ip_buf);
    let global_limit = state.config.cli.max_ips_per_user;

    // The one lookup of the token for this request: its key goes on in the `Principal`.
    let key = state.users.key(token);
    // The request's first look at its user, which starts loading the rest of it (issue 18).
    let look = state
        .users
        .with_user_prefetched(key, token, &ip_s, |u, known_ip| {
            if u.is_disabled() {
                return Look::Refused(disabled_error(u.disabled_reason.as_deref()));
            }
            if u.is_expired(now) {
                return Look::Refused(expired_error());
            }
            let fresh = u
                .last_used_at
                .is_some_and(|t| now.saturating_sub(t) < LAST_USED_RESOLUTION_MS);
            if known_ip && fresh {
                Look::Pass(u.kind)
            } else {
                Look::NeedsWrite
            }
        });
    let look = match look {
        Some(l) => l,
        None => {
            state.lockout.record_failure(ip);
            return Err(ProxyError::unauthorized(
                "Unknown user token. Check the token you were given; ask the proxy's operator for a new one.",
            ));
        }
    };
    match look {
        Look::Refused(e) => return Err(e),
        Look::Pass(kind) => {
            return Ok(Principal::User {
                token: Token::new(token),
                kind,
                key: Some(key),
            })
        }
        Look::NeedsWrite => {}
    }

    // The write path: everything is checked again under the entry's lock, since the user may
    // have changed between the two looks.
    let auto_ban = state.config.cli.max_ips_auto_ban;
    let outcome = state.users.update_entry_at(key, token, |e| {
        let u = &mut e.user;
        if u.is_disabled() {
            return (Err(disabled_error(u.disabled_reason.as_deref())), false);
        }
        if u.is_expired(now) {
            return (Err(expired_error()), false);
        }
        let mut changed = false;
        if !u.ip.iter().any(|known| known.as_bytes() == &*ip_s) {
            let limit = ip_limit(u.kind, u.max_ips, global_limit);
            if limit.is_some_and(|max| u.ip.len() >= max) {
                if auto_ban {
                    u.ip.push(String::from_utf8_lossy(&ip_s).into_owned());
                    u.disabled_at = Some(now);
                    u.disabled_reason = Some(IP_LIMIT_BAN_REASON.into());
                    tracing::warn!(
                        user = %fingerprint(token),
                        %ip,
                        "user disabled: IP address limit exceeded (MAX_IPS_AUTO_BAN)"
                    );
                    return (Err(disabled_error(Some(IP_LIMIT_BAN_REASON))), true);
                }
                return (Err(ProxyError::forbidden(IP_LIMIT_MESSAGE)), false);
            }
            u.ip.push(String::from_utf8_lossy(&ip_s).into_owned());
            changed = true;
        }
        if u.last_used_at
            .is_none_or(|t| now.saturating_sub(t) >= LAST_USED_RESOLUTION_MS)
        {
            u.last_used_at = Some(now);
            changed = true;
        }
        (Ok(u.kind), changed)
    });
    match outcome {
        Some(Ok(kind)) => Ok(Principal::User {
            token: Token::new(token),
            kind,
            key: Some(key),
        }),
        Some(Err(e)) => Err(e),
        // Removed between the two looks (a purge): as unknown as any other token.
        None => {
            state.lockout.record_failure(ip);
            Err(ProxyError::unauthorized(
                "Unknown user token. Check the token you were given; ask the proxy's operator for a new one.",
            ))
        }
    }
}

/// `ip` as text (as `to_string` writes it) in `buf`, without allocating: an address is at
/// most 45 characters. Should it ever not fit, it is allocated instead. The text's bytes, as
/// the usual request only compares them (checking them as UTF-8 cost 80 instructions).
fn ip_text(ip: IpAddr, buf: &mut [u8; 64]) -> std::borrow::Cow<'_, [u8]> {
    use std::io::Write;
    // IPv4 by hand: `fmt`'s machinery cost about 1 000 instructions per request here
    // (callgrind), the digits a few dozen.
    if let IpAddr::V4(v4) = ip {
        let mut len = 0;
        for (i, octet) in v4.octets().into_iter().enumerate() {
            if i > 0 {
                buf[len] = b'.';
                len += 1;
            }
            if octet >= 100 {
                buf[len] = b'0' + octet / 100;
                len += 1;
            }
            if octet >= 10 {
                buf[len] = b'0' + octet / 10 % 10;
                len += 1;
            }
            buf[len] = b'0' + octet % 10;
            len += 1;
        }
        return std::borrow::Cow::Borrowed(&buf[..len]);
    }
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    if write!(cursor, "{ip}").is_ok() {
        let len = usize::try_from(cursor.position()).unwrap_or(0);
        return std::borrow::Cow::Borrowed(&buf[..len]);
    }
    std::borrow::Cow::Owned(ip.to_string().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::users::model::TokenCounts;

    #[test]
    fn addresses_are_written_as_to_string_writes_them() {
        let mut buf = [0u8; 64];
        for ip in [
            "127.0.0.1",
            "2001:db8::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:255.255.255.255",
            "0.0.0.0",
            "255.255.255.255",
            "10.0.100.9",
            "1.20.199.250",
        ] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(&*ip_text(ip, &mut buf), ip.to_string().as_bytes());
        }
        // Every octet value, in every position.
        for n in 0..=255u8 {
            let ip = IpAddr::from([n, 255 - n, n / 3, n.wrapping_mul(7)]);
            assert_eq!(&*ip_text(ip, &mut buf), ip.to_string().as_bytes());
        }
    }
    use crate::users::User;

    async fn state(args: &[&str]) -> AppState {
        let mut argv = vec![
            "llm-gatekeeper",
            "--gatekeeper",
            "user_token",
            "--admin-key",
            "k",
        ];
        argv.extend_from_slice(args);
        let config = Config::from_args(argv, Vec::<(String, String)>::new()).expect("config");
        AppState::build(config).await.expect("state")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[tokio::test]
    async fn repeated_requests_do_not_mark_the_user_dirty() {
        let st = state(&[]).await;
        st.users.load(vec![User::new(
            "t".into(),
            UserType::Normal,
            TokenCounts::new(),
            0,
        )]);
        admit(&st, "t", ip("10.0.0.1")).expect("admitted");
        assert_eq!(
            st.users.pending(),
            1,
            "new address and first use are recorded"
        );
        let _ = st.users.take_batch();
        admit(&st, "t", ip("10.0.0.1")).expect("admitted");
        assert_eq!(
            st.users.pending(),
            0,
            "same address within a second: nothing to write"
        );
        admit(&st, "t", ip("10.0.0.2")).expect("admitted");
        assert_eq!(st.users.pending(), 1, "a new address is written at once");
        let u = st.users.get("t").expect("user");
        assert_eq!(u.ip, vec!["10.0.0.1".to_string(), "10.0.0.2".to_string()]);
    }

    #[tokio::test]
    async fn refusals_do_not_change_the_user() {
        let st = state(&["--max-ips-per-user", "1"]).await;
        let mut u = User::new("t".into(), UserType::Normal, TokenCounts::new(), 0);
        u.ip = ["10.0.0.1".to_string()].into();
        st.users.load(vec![u.clone()]);
        let e = admit(&st, "t", ip("10.0.0.2")).expect_err("over the limit");
        assert_eq!(e.status, axum::http::StatusCode::FORBIDDEN);
        assert_eq!(e.message, IP_LIMIT_MESSAGE);
        assert_eq!(st.users.pending(), 0);
        assert_eq!(st.users.get("t"), Some(u));
        let e = admit(&st, "nope", ip("10.0.0.2")).expect_err("unknown");
        assert_eq!(e.status, axum::http::StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn special_users_and_zero_are_unlimited() {
        assert_eq!(ip_limit(UserType::Special, Some(1), 1), None);
        assert_eq!(ip_limit(UserType::Normal, None, 0), None);
        assert_eq!(ip_limit(UserType::Normal, Some(0), 3), None);
        assert_eq!(ip_limit(UserType::Normal, Some(2), 3), Some(2));
        assert_eq!(ip_limit(UserType::Temporary, None, 3), Some(3));
    }
}
