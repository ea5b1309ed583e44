//! `BLOCKED_ORIGINS` / `BLOCK_MESSAGE` / `BLOCK_REDIRECT`: requests whose `Origin` or
//! `Referer` host is a blocked site (or a subdomain of one) are refused, as the original's
//! `check-origin`. Matching is on the host, not on a substring of the header as the original
//! did, so `example.com` does not block `notexample.com` or `?ref=example.com`.

use url::Url;

use crate::config::ConfigError;

/// The blocked sites and what to tell their users.
#[derive(Debug, Clone)]
pub struct BlockedOrigins {
    hosts: Vec<String>,
    pub message: String,
    pub redirect: String,
}

/// A refused request: the message, and where a browser is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginBlock<'a> {
    pub message: &'a str,
    pub redirect: &'a str,
}

/// The host an entry or header names: `https://Site.example/x` and `site.example` both give
/// `site.example`.
fn host_of(s: &str) -> Option<String> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let parsed = if s.contains("://") {
        Url::parse(s).ok()
    } else {
        Url::parse(&format!("http://{s}")).ok()
    };
    parsed
        .and_then(|u| {
            u.host_str()
                .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
        })
        .filter(|h| !h.is_empty())
}

impl BlockedOrigins {
    pub fn new(
        entries: &[String],
        message: &str,
        redirect: &str,
    ) -> Result<BlockedOrigins, ConfigError> {
        let mut hosts = Vec::with_capacity(entries.len());
        for e in entries {
            let h = host_of(e).ok_or_else(|| {
                ConfigError(format!(
                    "BLOCKED_ORIGINS: {e:?} is not a host name; list sites such as janitorai.com,example.org"
                ))
            })?;
            hosts.push(h);
        }
        match Url::parse(redirect) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => {
                return Err(ConfigError(format!(
                    "BLOCK_REDIRECT={redirect:?} must be an http:// or https:// URL, e.g. https://www.9gag.com"
                )))
            }
        }
        Ok(BlockedOrigins {
            hosts,
            message: message.to_string(),
            redirect: redirect.to_string(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Whether a request with these `Origin` / `Referer` header values is refused.
    pub fn check(&self, origin: Option<&str>, referer: Option<&str>) -> Option<OriginBlock<'_>> {
        if self.hosts.is_empty() {
            return None;
        }
        let blocked = [origin, referer].into_iter().flatten().any(|v| {
            host_of(v).is_some_and(|host| {
                self.hosts.iter().any(|b| {
                    host == *b
                        || (host.len() > b.len()
                            && host.ends_with(b.as_str())
                            && host.as_bytes()[host.len() - b.len() - 1] == b'.')
                })
            })
        });
        blocked.then_some(OriginBlock {
            message: &self.message,
            redirect: &self.redirect,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocked(list: &[&str]) -> BlockedOrigins {
        let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        BlockedOrigins::new(&list, "go away", "https://example.net/").expect("valid")
    }

    #[test]
    fn hosts_and_subdomains_match_substrings_do_not() {
        let b = blocked(&["janitorai.com", "https://Bad.Example/"]);
        assert!(b.check(Some("https://janitorai.com"), None).is_some());
        assert!(b
            .check(None, Some("https://www.janitorai.com/chat?x=1"))
            .is_some());
        assert!(b.check(Some("http://bad.example:8080"), None).is_some());
        assert!(b.check(Some("https://notjanitorai.com"), None).is_none());
        assert!(b
            .check(None, Some("https://ok.example/?ref=janitorai.com"))
            .is_none());
        assert!(b.check(None, None).is_none());
        assert!(b.check(Some("null"), None).is_none());
        let hit = b
            .check(Some("https://janitorai.com"), None)
            .expect("blocked");
        assert_eq!(hit.message, "go away");
        assert_eq!(hit.redirect, "https://example.net/");
    }

    #[test]
    fn nothing_is_blocked_by_default() {
        let b = blocked(&[]);
        assert!(b.is_empty());
        assert!(b.check(Some("https://janitorai.com"), None).is_none());
    }
}
