//! The users list of the admin UI: filtering, sorting and paging straight over the store.
//! Only the sort key and token of matching users are collected; full records are copied for
//! the one page shown, so a page stays fast with 100 000 users.

use std::cmp::Ordering;

use serde::Serialize;

use crate::users::{User, UserStore, UserType};

/// The most rows one page may show.
pub const MAX_PER_PAGE: usize = 500;
/// Rows per page when the query does not say.
pub const DEFAULT_PER_PAGE: usize = 50;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SortBy {
    Token,
    Nickname,
    Type,
    Prompts,
    Tokens,
    #[default]
    Created,
    LastUsed,
}

impl SortBy {
    pub fn parse(s: &str) -> SortBy {
        match s {
            "token" => SortBy::Token,
            "nickname" => SortBy::Nickname,
            "type" => SortBy::Type,
            "prompts" => SortBy::Prompts,
            "tokens" => SortBy::Tokens,
            "lastUsed" => SortBy::LastUsed,
            _ => SortBy::Created,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            SortBy::Token => "token",
            SortBy::Nickname => "nickname",
            SortBy::Type => "type",
            SortBy::Prompts => "prompts",
            SortBy::Tokens => "tokens",
            SortBy::Created => "created",
            SortBy::LastUsed => "lastUsed",
        }
    }
}

/// Which users to show and in which order.
#[derive(Clone, Debug, Default)]
pub struct Query {
    /// Case-insensitive substring of the token or nickname.
    pub text: String,
    pub kind: Option<UserType>,
    /// `active`, `disabled` or `expired`; anything else means all.
    pub status: String,
    pub sort: SortBy,
    pub descending: bool,
    /// 1-based.
    pub page: usize,
    pub per_page: usize,
}

/// One page of users.
#[derive(Debug, Serialize)]
pub struct Page {
    pub users: Vec<User>,
    /// Users matching the filter.
    pub matched: usize,
    /// Users in the store.
    pub total: usize,
    pub page: usize,
    pub pages: usize,
}

enum Key {
    Num(i64),
    Text(String),
}

fn key_cmp(a: &Key, b: &Key) -> Ordering {
    match (a, b) {
        (Key::Num(x), Key::Num(y)) => x.cmp(y),
        (Key::Text(x), Key::Text(y)) => x.cmp(y),
        (Key::Num(_), Key::Text(_)) => Ordering::Less,
        (Key::Text(_), Key::Num(_)) => Ordering::Greater,
    }
}

fn matches(u: &User, q: &Query, needle: &str, now: i64) -> bool {
    if q.kind.is_some_and(|k| k != u.kind) {
        return false;
    }
    let ok = match q.status.as_str() {
        "active" => !u.is_disabled() && !u.is_expired(now),
        "disabled" => u.is_disabled(),
        "expired" => u.is_expired(now),
        _ => true,
    };
    if !ok {
        return false;
    }
    needle.is_empty()
        || u.token.to_lowercase().contains(needle)
        || u.nickname
            .as_deref()
            .is_some_and(|n| n.to_lowercase().contains(needle))
}

fn key(u: &User, sort: SortBy) -> Key {
    match sort {
        SortBy::Token => Key::Text(u.token.to_string()),
        SortBy::Nickname => Key::Text(u.nickname.clone().unwrap_or_default().to_lowercase()),
        SortBy::Type => Key::Text(u.kind.as_str().to_string()),
        SortBy::Prompts => Key::Num(i64::try_from(u.prompt_count).unwrap_or(i64::MAX)),
        SortBy::Tokens => Key::Num(
            i64::try_from(
                u.token_counts
                    .values()
                    .fold(0u64, |a, b| a.saturating_add(*b)),
            )
            .unwrap_or(i64::MAX),
        ),
        SortBy::Created => Key::Num(u.created_at),
        SortBy::LastUsed => Key::Num(u.last_used_at.unwrap_or(0)),
    }
}

/// Filters, sorts and pages the store. Ties are broken by token so pages are stable.
pub fn page(store: &UserStore, q: &Query, now: i64) -> Page {
    let needle = q.text.trim().to_lowercase();
    let mut hits: Vec<(Key, String)> = Vec::new();
    store.for_each(|u| {
        if matches(u, q, &needle, now) {
            hits.push((key(u, q.sort), u.token.to_string()));
        }
    });
    hits.sort_unstable_by(|a, b| {
        let o = key_cmp(&a.0, &b.0).then_with(|| a.1.cmp(&b.1));
        if q.descending {
            o.reverse()
        } else {
            o
        }
    });
    let per = q.per_page.clamp(1, MAX_PER_PAGE);
    let matched = hits.len();
    let pages = matched.div_ceil(per).max(1);
    let page = q.page.clamp(1, pages);
    let users = hits
        .iter()
        .skip((page - 1) * per)
        .take(per)
        .filter_map(|(_, token)| store.get(token))
        .collect();
    Page {
        users,
        matched,
        total: store.len(),
        page,
        pages,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(n: usize) -> std::sync::Arc<UserStore> {
        let s = UserStore::new();
        let users = (0..n)
            .map(|i| {
                let mut u = User::new(
                    format!("tok-{i:06}"),
                    UserType::Normal,
                    Default::default(),
                    i as i64,
                );
                u.prompt_count = (i % 7) as u64;
                if i % 10 == 0 {
                    u.kind = UserType::Special;
                    u.nickname = Some(format!("Special {i}").into());
                }
                if i % 25 == 0 {
                    u.disabled_at = Some(1);
                }
                u
            })
            .collect();
        s.load(users);
        s
    }

    #[test]
    fn pages_through_many_users() {
        let s = store(100_000);
        let q = Query {
            per_page: 50,
            page: 3,
            ..Default::default()
        };
        let p = page(&s, &q, 0);
        assert_eq!(p.matched, 100_000);
        assert_eq!(p.pages, 2000);
        assert_eq!(p.users.len(), 50);
        assert_eq!(p.users[0].token, "tok-000100");
    }

    #[test]
    fn filters_and_sorts() {
        let s = store(1000);
        let q = Query {
            kind: Some(UserType::Special),
            status: "disabled".into(),
            sort: SortBy::Token,
            descending: true,
            per_page: 10,
            page: 1,
            ..Default::default()
        };
        let p = page(&s, &q, 0);
        // Every 50th user is special and disabled.
        assert_eq!(p.matched, 20);
        assert_eq!(p.users[0].token, "tok-000950");
        let q = Query {
            text: "SPECIAL 99".into(),
            per_page: 10,
            page: 1,
            ..Default::default()
        };
        let p = page(&s, &q, 0);
        assert_eq!(p.matched, 1);
        assert_eq!(p.users[0].token, "tok-000990");
    }

    #[test]
    fn out_of_range_page_is_clamped() {
        let s = store(5);
        let q = Query {
            per_page: 2,
            page: 99,
            ..Default::default()
        };
        let p = page(&s, &q, 0);
        assert_eq!(p.page, 3);
        assert_eq!(p.users.len(), 1);
    }
}
