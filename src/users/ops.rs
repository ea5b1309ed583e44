//! The domain operations on users that administrators perform — create, partial update
//! (upsert), bulk upsert, disable, re-enable, clear addresses, reset usage, list sorted —
//! shared by the `/admin/users` REST API and the admin web UI. Input arrives as JSON values and
//! is validated here, field by field, with errors that name the field and the problem.
//! Knows nothing of HTTP.
//!
//! Validation choices:
//! - Types are strict (a string where a number belongs is an error), but values follow the
//!   original's export: integers may be written as `5.0`, `maxIps` may be a numeric string.
//! - Unknown fields are accepted and ignored (reported in [`UserPatch::ignored`] so callers can
//!   log them): exports from forks of the original carry extra fields, and refusing them would
//!   make migration fail on records that are otherwise fine. The deprecated `tokenCount` is
//!   ignored silently.
//! - `null` removes an optional field; `null` on a field every user has is an error.
//! - Every check happens before anything is changed, so a rejected request changes nothing.

use std::collections::BTreeMap;

use std::fmt::{Display, Write as _};

use serde_json::{Map, Value};
use smallvec::SmallVec;

use super::counts::Counts;
use super::model::TokenCounts;
use super::{now_ms, User, UserStore, UserType};

/// The largest integer accepted anywhere (JavaScript's `Number.MAX_SAFE_INTEGER`, what the
/// original could represent exactly).
pub const MAX_INT: u64 = 9_007_199_254_740_991;
/// Longest accepted nickname, in characters (as the original).
pub const MAX_NICKNAME_CHARS: usize = 80;
/// Longest accepted token, in bytes.
pub const MAX_TOKEN_LEN: usize = 256;
/// Most records accepted in one bulk upsert.
pub const MAX_BULK_USERS: usize = 100_000;

/// Why an operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpsError {
    /// The input is invalid; the message names the field and the problem.
    #[error("{0}")]
    Invalid(String),
    /// No user has that token.
    #[error("Not found")]
    NotFound,
}

/// A field name, `prefix` then `name`, formatted only when an error shows it.
#[derive(Clone, Copy)]
struct FieldName<'a>(&'a str, &'a str);

impl Display for FieldName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)?;
        f.write_str(self.1)
    }
}

fn invalid(field: impl Display, problem: impl Display) -> OpsError {
    OpsError::Invalid(format!("{field}: {problem}"))
}

/// Checks that a token can be used as a credential: 1–256 visible ASCII characters.
pub fn validate_token(field: impl Display + Copy, token: &str) -> Result<(), OpsError> {
    if token.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(invalid(
            field,
            format!("must be at most {MAX_TOKEN_LEN} characters"),
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            field,
            "must contain only visible ASCII characters (no spaces or control characters), since clients send it in a header",
        ));
    }
    Ok(())
}

// ----- field parsers -----

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A non-negative integer ≤ [`MAX_INT`]; `5.0` is accepted as 5.
fn as_count(field: impl Display + Copy, v: &Value) -> Result<u64, OpsError> {
    let problem = || {
        invalid(
            field,
            format!("must be a whole number between 0 and {MAX_INT}, got {v}"),
        )
    };
    let Value::Number(n) = v else {
        return Err(invalid(
            field,
            format!(
                "must be a whole number between 0 and {MAX_INT}, got {}",
                type_name(v)
            ),
        ));
    };
    let n = if let Some(u) = n.as_u64() {
        u
    } else if let Some(f) = n.as_f64() {
        if f.fract() != 0.0 || !(0.0..=MAX_INT as f64).contains(&f) {
            return Err(problem());
        }
        f as u64
    } else {
        return Err(problem());
    };
    if n > MAX_INT {
        return Err(problem());
    }
    Ok(n)
}

/// An epoch-millisecond time.
fn as_time(field: impl Display + Copy, v: &Value) -> Result<i64, OpsError> {
    as_count(field, v)
        .map_err(|_| {
            invalid(
                field,
                format!(
                    "must be a time in epoch milliseconds (a whole number ≥ 0), got {}",
                    if v.is_number() {
                        v.to_string()
                    } else {
                        type_name(v).to_string()
                    }
                ),
            )
        })
        .map(|n| n as i64)
}

fn as_string(field: impl Display + Copy, v: &Value) -> Result<String, OpsError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        other => Err(invalid(
            field,
            format!("must be a string, got {}", type_name(other)),
        )),
    }
}

fn as_kind(field: impl Display + Copy, v: &Value) -> Result<UserType, OpsError> {
    match v.as_str() {
        Some("normal") => Ok(UserType::Normal),
        Some("special") => Ok(UserType::Special),
        Some("temporary") => Ok(UserType::Temporary),
        _ => Err(invalid(
            field,
            format!(
                "must be one of \"normal\", \"special\", \"temporary\", got {}",
                if v.is_string() {
                    v.to_string()
                } else {
                    type_name(v).to_string()
                }
            ),
        )),
    }
}

fn as_counts(field: impl Display + Copy, v: &Value) -> Result<TokenCounts, OpsError> {
    let Value::Object(map) = v else {
        return Err(invalid(
            field,
            format!(
                "must be an object of model family to token count, e.g. {{\"turbo\": 0}}, got {}",
                type_name(v)
            ),
        ));
    };
    let mut out = Counts::with_capacity(map.len());
    for (family, n) in map {
        out.insert(family, as_count(format_args!("{field}.{family}"), n)?);
    }
    Ok(out.into())
}

fn as_ips(field: impl Display + Copy, v: &Value) -> Result<Vec<String>, OpsError> {
    let Value::Array(items) = v else {
        return Err(invalid(
            field,
            format!("must be an array of address strings, got {}", type_name(v)),
        ));
    };
    let mut out: Vec<String> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let s = as_string(format_args!("{field}[{i}]"), item)?;
        // Duplicates would count twice toward the address limit.
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out)
}

/// `maxIps`: a whole number ≥ 0; the original coerced numeric strings, so "5" is accepted too.
fn as_max_ips(field: impl Display + Copy, v: &Value) -> Result<u32, OpsError> {
    let n = match v {
        Value::String(s) => s
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| s.parse::<u64>().ok())
            .flatten()
            .ok_or_else(|| {
                invalid(
                    field,
                    format!("must be a whole number ≥ 0, got the string {v}"),
                )
            })?,
        other => as_count(field, other)?,
    };
    u32::try_from(n).map_err(|_| invalid(field, format!("must be at most {}", u32::MAX)))
}

/// Longest model-family name accepted in `allowedFamilies`.
pub const MAX_FAMILY_CHARS: usize = 64;

/// True for a model-family name: lowercase letters, digits, `-`, `_` or `.`.
pub fn is_family_name(f: &str) -> bool {
    !f.is_empty()
        && f.len() <= MAX_FAMILY_CHARS
        && f.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
}

/// `allowedFamilies`: an array of family names (duplicates dropped). A name that no model
/// maps to is accepted (it simply never matches), so a list written for a newer proxy with
/// more families still imports.
fn as_families(field: impl Display + Copy, v: &Value) -> Result<Vec<String>, OpsError> {
    let Value::Array(items) = v else {
        return Err(invalid(
            field,
            format!(
                "must be an array of model-family names, e.g. [\"turbo\", \"claude\"], got {}",
                type_name(v)
            ),
        ));
    };
    let mut out: Vec<String> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let s = as_string(format_args!("{field}[{i}]"), item)?;
        if !is_family_name(&s) {
            return Err(invalid(
                format_args!("{field}[{i}]"),
                format!(
                    "{s:?} is not a model-family name; use lowercase letters, digits, '-', '_' or '.' (at most {MAX_FAMILY_CHARS}), e.g. \"gpt4o\""
                ),
            ));
        }
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out)
}

fn as_object(field: impl Display + Copy, v: &Value) -> Result<Map<String, Value>, OpsError> {
    match v {
        Value::Object(m) => Ok(m.clone()),
        other => Err(invalid(
            field,
            format!("must be an object, got {}", type_name(other)),
        )),
    }
}

// ----- partial updates -----

/// A validated partial update. For an optional field, `Some(None)` removes it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UserPatch {
    pub ip: Option<Vec<String>>,
    pub nickname: Option<Option<String>>,
    pub kind: Option<UserType>,
    pub prompt_count: Option<u64>,
    pub token_counts: Option<TokenCounts>,
    pub token_limits: Option<TokenCounts>,
    pub created_at: Option<i64>,
    pub last_used_at: Option<Option<i64>>,
    pub disabled_at: Option<Option<i64>>,
    pub disabled_reason: Option<Option<String>>,
    pub expires_at: Option<Option<i64>>,
    pub max_ips: Option<Option<u32>>,
    pub admin_note: Option<Option<String>>,
    pub allowed_families: Option<Option<Vec<String>>>,
    pub meta: Option<Option<Map<String, Value>>>,
    /// Unknown fields that were ignored.
    pub ignored: Vec<String>,
}

/// Fields every user has: they can be changed but not removed.
const REQUIRED: &[&str] = &[
    "ip",
    "type",
    "promptCount",
    "tokenCounts",
    "tokenLimits",
    "createdAt",
];

impl UserPatch {
    /// Validates a JSON object of user fields. `prefix` is put before field names in errors
    /// (e.g. `users[3].`). The `token` field is not read here: the caller decides where the
    /// token comes from.
    pub fn parse(v: &Value, prefix: &str) -> Result<UserPatch, OpsError> {
        let Value::Object(map) = v else {
            let what = if prefix.is_empty() {
                "the request body".to_string()
            } else {
                prefix.trim_end_matches('.').to_string()
            };
            return Err(OpsError::Invalid(format!(
                "{what}: must be a JSON object of user fields, got {}",
                type_name(v)
            )));
        };
        let mut p = UserPatch::default();
        for (key, val) in map {
            // Only an error shows the name, so it is not formatted unless needed.
            let f = FieldName(prefix, key);
            if val.is_null() && REQUIRED.contains(&key.as_str()) {
                return Err(invalid(
                    f,
                    "cannot be removed (null); every user has it. Leave it out to keep it unchanged",
                ));
            }
            match key.as_str() {
                // The caller decides which token counts (the path wins in a single upsert),
                // but a token of the wrong type is still a mistake worth reporting.
                "token" => {
                    as_string(f, val)?;
                }
                "tokenCount" => {}
                "ip" => p.ip = Some(as_ips(f, val)?),
                "type" => p.kind = Some(as_kind(f, val)?),
                "promptCount" => p.prompt_count = Some(as_count(f, val)?),
                "tokenCounts" => p.token_counts = Some(as_counts(f, val)?),
                "tokenLimits" => p.token_limits = Some(as_counts(f, val)?),
                "createdAt" => p.created_at = Some(as_time(f, val)?),
                "nickname" => {
                    p.nickname = Some(nullable(val, |v| {
                        let s = as_string(f, v)?;
                        if s.chars().count() > MAX_NICKNAME_CHARS {
                            return Err(invalid(
                                f,
                                format!("must be at most {MAX_NICKNAME_CHARS} characters"),
                            ));
                        }
                        Ok(s)
                    })?)
                }
                "lastUsedAt" => p.last_used_at = Some(nullable(val, |v| as_time(f, v))?),
                "disabledAt" => p.disabled_at = Some(nullable(val, |v| as_time(f, v))?),
                "expiresAt" => p.expires_at = Some(nullable(val, |v| as_time(f, v))?),
                "disabledReason" => p.disabled_reason = Some(nullable(val, |v| as_string(f, v))?),
                "adminNote" => p.admin_note = Some(nullable(val, |v| as_string(f, v))?),
                "maxIps" => p.max_ips = Some(nullable(val, |v| as_max_ips(f, v))?),
                "allowedFamilies" => {
                    p.allowed_families = Some(nullable(val, |v| as_families(f, v))?)
                }
                "meta" => p.meta = Some(nullable(val, |v| as_object(f, v))?),
                _ => p.ignored.push(format!("{prefix}{key}")),
            }
        }
        Ok(p)
    }

    /// Applies the update to `u`. Cannot fail: everything was checked by [`UserPatch::parse`].
    pub fn apply(&self, u: &mut User) {
        self.clone().apply_owned(u)
    }

    /// [`UserPatch::apply`], moving the new values into the user instead of copying them.
    pub fn apply_owned(self, u: &mut User) {
        if let Some(v) = self.ip {
            u.ip = v.into();
        }
        if let Some(v) = self.nickname {
            u.nickname = v.map(String::into_boxed_str);
        }
        if let Some(v) = self.kind {
            u.kind = v;
        }
        if let Some(v) = self.prompt_count {
            u.prompt_count = v;
        }
        if let Some(v) = self.token_counts {
            u.token_counts = v;
        }
        if let Some(v) = self.token_limits {
            u.token_limits = v;
        }
        if let Some(v) = self.created_at {
            u.created_at = v;
        }
        if let Some(v) = self.last_used_at {
            u.last_used_at = v;
        }
        if let Some(v) = self.disabled_at {
            u.disabled_at = v;
        }
        if let Some(v) = self.disabled_reason {
            u.disabled_reason = v.map(String::into_boxed_str);
        }
        if let Some(v) = self.expires_at {
            u.expires_at = v;
        }
        if let Some(v) = self.max_ips {
            u.max_ips = v;
        }
        if let Some(v) = self.admin_note {
            u.admin_note = v.map(String::into_boxed_str);
        }
        if let Some(v) = self.allowed_families {
            u.allowed_families =
                v.map(|list| list.into_iter().map(String::into_boxed_str).collect());
        }
        if let Some(v) = self.meta {
            u.meta = v.map(Box::new);
        }
    }
}

fn nullable<T>(
    v: &Value,
    parse: impl FnOnce(&Value) -> Result<T, OpsError>,
) -> Result<Option<T>, OpsError> {
    if v.is_null() {
        Ok(None)
    } else {
        parse(v).map(Some)
    }
}

/// The operations, over one store and the configured default quotas.
pub struct UserOps<'a> {
    pub users: &'a UserStore,
    /// `TOKEN_QUOTA_*`: the `tokenLimits` of every new user.
    pub default_limits: &'a BTreeMap<String, u64>,
}

/// What `POST /admin/users` may ask for.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateRequest {
    pub kind: UserType,
    pub expires_at: Option<i64>,
    pub token_limits: Option<TokenCounts>,
}

impl CreateRequest {
    /// Validates `{}`, `{"type":"normal"|"special"}` or
    /// `{"type":"temporary","expiresAt":…,"tokenLimits":{…}}` (both required for temporary).
    /// Other fields are ignored, as the original did.
    pub fn parse(v: &Value) -> Result<CreateRequest, OpsError> {
        let Value::Object(map) = v else {
            return Err(OpsError::Invalid(format!(
                "the request body: must be a JSON object such as {{\"type\":\"normal\"}}, got {}",
                type_name(v)
            )));
        };
        let kind = match map.get("type") {
            None => UserType::Normal,
            Some(t) => as_kind("type", t)?,
        };
        if kind != UserType::Temporary {
            return Ok(CreateRequest {
                kind,
                expires_at: None,
                token_limits: None,
            });
        }
        let expires_at = match map.get("expiresAt") {
            None | Some(Value::Null) => {
                return Err(invalid(
                    "expiresAt",
                    "is required for a temporary user (epoch milliseconds)",
                ))
            }
            Some(v) => as_time("expiresAt", v)?,
        };
        let token_limits = match map.get("tokenLimits") {
            None | Some(Value::Null) => {
                return Err(invalid(
                    "tokenLimits",
                    "is required for a temporary user, e.g. {\"turbo\": 100000}",
                ))
            }
            Some(v) => as_counts("tokenLimits", v)?,
        };
        Ok(CreateRequest {
            kind,
            expires_at: Some(expires_at),
            token_limits: Some(token_limits),
        })
    }
}

/// A user field the list can be sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortField {
    Token,
    Ip,
    Nickname,
    Type,
    PromptCount,
    CreatedAt,
    LastUsedAt,
    DisabledAt,
    DisabledReason,
    ExpiresAt,
    MaxIps,
    AdminNote,
}

/// The sortable field names, as accepted by `?sort=`.
pub const SORT_FIELDS: &[(&str, SortField)] = &[
    ("token", SortField::Token),
    ("ip", SortField::Ip),
    ("nickname", SortField::Nickname),
    ("type", SortField::Type),
    ("promptCount", SortField::PromptCount),
    ("createdAt", SortField::CreatedAt),
    ("lastUsedAt", SortField::LastUsedAt),
    ("disabledAt", SortField::DisabledAt),
    ("disabledReason", SortField::DisabledReason),
    ("expiresAt", SortField::ExpiresAt),
    ("maxIps", SortField::MaxIps),
    ("adminNote", SortField::AdminNote),
];

/// The default order: most prompts first, then most recently used.
pub const DEFAULT_SORT: &[SortField] = &[SortField::PromptCount, SortField::LastUsedAt];

/// Parses `promptCount,lastUsedAt` into sort fields; an empty string means the default order.
pub fn parse_sort(s: &str) -> Result<Vec<SortField>, OpsError> {
    let mut out = Vec::new();
    if s.is_empty() {
        out.extend_from_slice(DEFAULT_SORT);
        return Ok(out);
    }
    for name in s.split(',') {
        let Some((_, f)) = SORT_FIELDS.iter().find(|(n, _)| *n == name) else {
            let names: Vec<&str> = SORT_FIELDS.iter().map(|(n, _)| *n).collect();
            return Err(invalid(
                "sort",
                format!(
                    "unknown field {name:?}; use a comma-separated list of {}",
                    names.join(", ")
                ),
            ));
        };
        out.push(*f);
    }
    Ok(out)
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Key<'a> {
    Num(i128),
    Str(&'a str),
}

fn key(u: &User, f: SortField) -> Option<Key<'_>> {
    match f {
        SortField::Token => Some(Key::Str(&u.token)),
        SortField::Ip => Some(Key::Num(u.ip.len() as i128)),
        SortField::Nickname => u.nickname.as_deref().map(Key::Str),
        SortField::Type => Some(Key::Str(u.kind.as_str())),
        SortField::PromptCount => Some(Key::Num(i128::from(u.prompt_count))),
        SortField::CreatedAt => Some(Key::Num(i128::from(u.created_at))),
        SortField::LastUsedAt => u.last_used_at.map(|v| Key::Num(i128::from(v))),
        SortField::DisabledAt => u.disabled_at.map(|v| Key::Num(i128::from(v))),
        SortField::DisabledReason => u.disabled_reason.as_deref().map(Key::Str),
        SortField::ExpiresAt => u.expires_at.map(|v| Key::Num(i128::from(v))),
        SortField::MaxIps => u.max_ips.map(|v| Key::Num(i128::from(v))),
        SortField::AdminNote => u.admin_note.as_deref().map(Key::Str),
    }
}

/// A sort key copied out of a user, so that sorting does not hold the store's locks.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum OwnedKey {
    Num(i128),
    Str(Box<str>),
}

/// One user's place in a sorted listing: its keys and its token.
pub struct SortRow {
    keys: SmallVec<[Option<OwnedKey>; 2]>,
    /// The token's first 16 bytes, big-endian and zero-padded: it orders as the token does
    /// wherever it differs, and saves a pointer chase per comparison of equal keys.
    prefix: u128,
    pub token: Box<str>,
}

impl SortRow {
    pub fn new(u: &User, fields: &[SortField]) -> SortRow {
        let keys = fields
            .iter()
            .map(|f| {
                key(u, *f).map(|k| match k {
                    Key::Num(n) => OwnedKey::Num(n),
                    Key::Str(s) => OwnedKey::Str(s.into()),
                })
            })
            .collect();
        let mut prefix = [0u8; 16];
        let n = u.token.len().min(16);
        prefix[..n].copy_from_slice(&u.token.as_bytes()[..n]);
        SortRow {
            keys,
            prefix: u128::from_be_bytes(prefix),
            token: u.token.as_str().into(),
        }
    }
}

/// Sorts descending by each field in turn, missing values last (as the original), then by
/// token so the order is stable between calls.
pub fn sort_rows(rows: &mut [SortRow]) {
    // Tokens are unique, so no two rows are equal and an unstable sort is deterministic.
    rows.sort_unstable_by(|a, b| {
        for (x, y) in a.keys.iter().zip(&b.keys) {
            let ord = match (x, y) {
                (None, None) => std::cmp::Ordering::Equal,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(_), None) => std::cmp::Ordering::Less,
                (Some(x), Some(y)) => y.cmp(x),
            };
            if ord.is_ne() {
                return ord;
            }
        }
        a.prefix.cmp(&b.prefix).then_with(|| a.token.cmp(&b.token))
    });
}

/// One record of a bulk upsert, validated.
#[derive(Debug, Clone)]
pub struct BulkRecord {
    pub token: String,
    pub patch: UserPatch,
}

/// Validates `{"users":[…]}`: every record must be valid and carry a token. Errors of up to
/// five records are reported together.
pub fn parse_bulk(body: &Value) -> Result<Vec<BulkRecord>, OpsError> {
    let users = match body {
        Value::Object(m) => match m.get("users") {
            Some(Value::Array(a)) => a,
            Some(other) => {
                return Err(invalid(
                    "users",
                    format!("must be an array of users, got {}", type_name(other)),
                ))
            }
            None => {
                return Err(invalid(
                    "users",
                    "is required: send {\"users\": [ {\"token\": \"…\", …}, … ]}",
                ))
            }
        },
        other => {
            return Err(OpsError::Invalid(format!(
                "the request body: must be a JSON object {{\"users\": […]}}, got {}",
                type_name(other)
            )))
        }
    };
    if users.len() > MAX_BULK_USERS {
        return Err(too_many_users());
    }
    parse_records(users.len(), users.iter().map(Ok))
}

/// Validates `{"users":[…]}` given as the bytes of a request body, as [`parse_bulk`] does but
/// without building a JSON tree of the whole body (for 100 000 users that tree is several
/// times the size of the body): each record is parsed on its own, validated and dropped.
/// `Err(None)` when the body is not of that shape (or not JSON): parse it whole with
/// [`parse_bulk`], whose errors say what is wrong.
pub fn parse_bulk_bytes(body: &[u8]) -> Result<Vec<BulkRecord>, Option<OpsError>> {
    #[derive(serde::Deserialize)]
    struct Body<'a> {
        #[serde(borrow)]
        users: &'a serde_json::value::RawValue,
    }
    let Ok(body) = serde_json::from_slice::<Body>(body) else {
        return Err(None);
    };
    let Ok(users) = serde_json::from_str::<Vec<&serde_json::value::RawValue>>(body.users.get())
    else {
        return Err(None);
    };
    if users.len() > MAX_BULK_USERS {
        return Err(Some(too_many_users()));
    }
    parse_records(
        users.len(),
        users
            .iter()
            .map(|raw| serde_json::from_str::<Value>(raw.get())),
    )
    .map_err(Some)
}

fn too_many_users() -> OpsError {
    invalid(
        "users",
        format!(
            "at most {MAX_BULK_USERS} users per request; split the import into several requests"
        ),
    )
}

/// Validates the records of a bulk upsert; errors of up to five records are reported together.
fn parse_records<V: std::borrow::Borrow<Value>>(
    n: usize,
    records: impl Iterator<Item = serde_json::Result<V>>,
) -> Result<Vec<BulkRecord>, OpsError> {
    let mut out = Vec::with_capacity(n);
    let mut errors = Vec::new();
    // One buffer for every record's prefix: allocations that outlive a record (its values,
    // which become the user's) should not have a freed one between each pair of them.
    let mut prefix = String::new();
    for (i, rec) in records.enumerate() {
        prefix.clear();
        let _ = write!(prefix, "users[{i}].");
        let parsed = rec
            .map_err(|e| invalid(format_args!("users[{i}]"), e))
            .and_then(|rec| parse_record(rec.borrow(), &prefix));
        match parsed {
            Ok(r) => out.push(r),
            Err(OpsError::Invalid(m)) => errors.push(m),
            Err(e) => errors.push(e.to_string()),
        }
        if errors.len() >= 5 {
            break;
        }
    }
    if !errors.is_empty() {
        return Err(OpsError::Invalid(format!(
            "nothing was changed: {}",
            errors.join("; ")
        )));
    }
    Ok(out)
}

fn parse_record(rec: &Value, prefix: &str) -> Result<BulkRecord, OpsError> {
    let field = FieldName(prefix, "token");
    let token = match rec.get("token") {
        Some(Value::String(t)) => {
            validate_token(field, t)?;
            t.clone()
        }
        Some(other) => {
            return Err(invalid(
                field,
                format!("must be a string, got {}", type_name(other)),
            ))
        }
        None if rec.is_object() => return Err(invalid(field, "is required in a bulk upsert")),
        // Not an object at all: `UserPatch::parse` says so.
        None => String::new(),
    };
    let patch = UserPatch::parse(rec, prefix)?;
    Ok(BulkRecord { token, patch })
}

impl UserOps<'_> {
    fn fresh(&self, token: &str, kind: UserType, now: i64) -> User {
        User::new(
            token.to_string(),
            kind,
            self.default_limits.iter().collect(),
            now,
        )
    }

    /// Creates a user with a new UUIDv4 token; its limits are the configured default quotas
    /// unless the request (a temporary user) gives its own.
    pub fn create(&self, req: &CreateRequest) -> User {
        let token = uuid::Uuid::new_v4().to_string();
        let mut user = self.fresh(&token, req.kind, now_ms());
        if let Some(limits) = &req.token_limits {
            user.token_limits = limits.clone();
        }
        user.expires_at = req.expires_at;
        self.users.upsert(user.clone());
        user
    }

    /// Applies a validated partial update to the user `token`, creating it (with default
    /// limits) when absent. Returns the user as stored.
    pub fn upsert(&self, token: &str, patch: &UserPatch) -> Result<User, OpsError> {
        validate_token("token", token)?;
        let now = now_ms();
        Ok(self.users.upsert_with(
            token,
            || self.fresh(token, UserType::Normal, now),
            |u| {
                patch.apply(u);
                u.clone()
            },
        ))
    }

    /// Applies every record of a validated bulk upsert, in order, and shows each user as
    /// stored to `each` (under the user's lock, so without copying it). Returns how many
    /// records were applied.
    pub fn upsert_bulk(
        &self,
        records: Vec<BulkRecord>,
        mut each: impl FnMut(&User),
    ) -> Result<usize, OpsError> {
        // Tokens were validated by `parse_bulk`; re-checking here keeps this function safe to
        // call with hand-built records, before anything is changed.
        for (i, r) in records.iter().enumerate() {
            validate_token(format_args!("users[{i}].token"), &r.token)?;
        }
        let n = records.len();
        let now = now_ms();
        for BulkRecord { token, mut patch } in records {
            // The record's values (its token too) move into the user: nothing is copied, and no
            // default limits are made only to be replaced.
            let limits = std::cell::Cell::new(patch.token_limits.take());
            self.users.upsert_owned(
                token,
                |token| {
                    let limits = limits
                        .take()
                        .unwrap_or_else(|| self.default_limits.iter().collect());
                    User::new(token, UserType::Normal, limits, now)
                },
                |u| {
                    if let Some(l) = limits.take() {
                        u.token_limits = l;
                    }
                    patch.apply_owned(u);
                    each(u);
                },
            );
        }
        Ok(n)
    }

    /// Disables a user (it stays in the store). An already disabled user keeps its original
    /// `disabledAt`; a given reason replaces the old one.
    pub fn disable(&self, token: &str, reason: Option<&str>) -> Result<User, OpsError> {
        let now = now_ms();
        self.users
            .update(token, |u| {
                if u.disabled_at.is_none() {
                    u.disabled_at = Some(now);
                    u.disabled_reason = reason.map(Box::from);
                } else if let Some(r) = reason {
                    u.disabled_reason = Some(r.into());
                }
                u.clone()
            })
            .ok_or(OpsError::NotFound)
    }

    /// Re-enables a disabled user. (A temporary user past `expiresAt` stays refused until its
    /// `expiresAt` is moved.)
    pub fn enable(&self, token: &str) -> Result<User, OpsError> {
        self.users
            .update(token, |u| {
                u.disabled_at = None;
                u.disabled_reason = None;
                u.clone()
            })
            .ok_or(OpsError::NotFound)
    }

    /// Forgets the addresses a user was seen from (so they can connect from new ones).
    pub fn clear_ips(&self, token: &str) -> Result<User, OpsError> {
        self.users
            .update(token, |u| {
                u.ip.clear();
                u.clone()
            })
            .ok_or(OpsError::NotFound)
    }

    /// Sets every token count of a user back to 0 (the families are kept).
    pub fn reset_usage(&self, token: &str) -> Result<User, OpsError> {
        self.users
            .update(token, |u| {
                u.token_counts.values_mut().for_each(|n| *n = 0);
                u.clone()
            })
            .ok_or(OpsError::NotFound)
    }

    /// The tokens of every user, in the order of `sort` (see [`sort_rows`]). The store is
    /// only read-locked one shard at a time while the sort keys are copied out.
    pub fn sorted_tokens(&self, sort: &[SortField]) -> Vec<Box<str>> {
        let mut rows = Vec::with_capacity(self.users.len());
        self.users.for_each(|u| rows.push(SortRow::new(u, sort)));
        sort_rows(&mut rows);
        rows.into_iter().map(|r| r.token).collect()
    }

    /// One user.
    pub fn get(&self, token: &str) -> Result<User, OpsError> {
        self.users.get(token).ok_or(OpsError::NotFound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ops_fixture() -> (std::sync::Arc<UserStore>, BTreeMap<String, u64>) {
        let mut limits = BTreeMap::new();
        limits.insert("turbo".to_string(), 1000);
        (UserStore::new(), limits)
    }

    #[test]
    fn allowed_families_are_checked_and_removable() {
        let p = UserPatch::parse(
            &json!({"allowedFamilies": ["turbo", "claude", "turbo"]}),
            "",
        )
        .expect("valid");
        assert_eq!(
            p.allowed_families,
            Some(Some(vec!["turbo".to_string(), "claude".to_string()]))
        );
        let mut u = User::new("t".into(), UserType::Normal, TokenCounts::new(), 0);
        p.apply(&mut u);
        assert_eq!(u.allowed_families.as_ref().map(|l| l.len()), Some(2));
        UserPatch::parse(&json!({"allowedFamilies": null}), "")
            .expect("valid")
            .apply(&mut u);
        assert!(u.allowed_families.is_none());
        let e = UserPatch::parse(&json!({"allowedFamilies": ["GPT 4"]}), "users[1].")
            .expect_err("bad name");
        assert!(e.to_string().contains("users[1].allowedFamilies[0]"), "{e}");
        assert!(UserPatch::parse(&json!({"allowedFamilies": "turbo"}), "").is_err());
    }

    #[test]
    fn patch_null_removes_and_types_are_checked() {
        let p =
            UserPatch::parse(&json!({"nickname": null, "maxIps": "3", "x": 1}), "").expect("valid");
        assert_eq!(p.nickname, Some(None));
        assert_eq!(p.max_ips, Some(Some(3)));
        assert_eq!(p.ignored, vec!["x".to_string()]);

        let e = UserPatch::parse(&json!({"promptCount": "5"}), "").expect_err("string count");
        assert!(e.to_string().starts_with("promptCount:"), "{e}");
        let e = UserPatch::parse(&json!({"promptCount": -1}), "").expect_err("negative");
        assert!(e.to_string().contains("promptCount"), "{e}");
        let e = UserPatch::parse(&json!({"nickname": "x".repeat(81)}), "").expect_err("long");
        assert!(e.to_string().contains("nickname") && e.to_string().contains("80"));
        let e = UserPatch::parse(&json!({"type": "admin"}), "").expect_err("bad type");
        assert!(e.to_string().contains("type"));
        let e = UserPatch::parse(&json!({"ip": null}), "").expect_err("null required");
        assert!(e.to_string().contains("ip"));
        let e = UserPatch::parse(&json!({"tokenCounts": {"turbo": 1.5}}), "u.").expect_err("frac");
        assert!(e.to_string().starts_with("u.tokenCounts.turbo:"), "{e}");
        assert!(UserPatch::parse(&json!({"promptCount": 5.0}), "").is_ok());
        assert!(UserPatch::parse(&json!([]), "").is_err());
    }

    #[test]
    fn original_export_parses_unchanged() {
        let rec = json!({"token":"abc","ip":["1.2.3.4"],"type":"special","promptCount":3,
            "tokenCount":12,"tokenCounts":{"turbo":5,"gpt4":0,"claude":7},
            "tokenLimits":{"turbo":0,"gpt4":0,"claude":0},"createdAt":1690000000000u64,
            "lastUsedAt":1690000001000u64,"nickname":"bob","meta":{}});
        let p = UserPatch::parse(&rec, "").expect("valid");
        assert!(p.ignored.is_empty());
        let (store, limits) = ops_fixture();
        let ops = UserOps {
            users: &store,
            default_limits: &limits,
        };
        let u = ops.upsert("abc", &p).expect("upserts");
        assert_eq!(u.kind, UserType::Special);
        assert_eq!(u.token_limits.get("turbo"), Some(&0), "export's limits win");
        assert_eq!(u.created_at, 1_690_000_000_000);
    }

    #[test]
    fn upsert_creates_with_default_limits_and_keeps_other_fields() {
        let (store, limits) = ops_fixture();
        let ops = UserOps {
            users: &store,
            default_limits: &limits,
        };
        let p = UserPatch::parse(&json!({"nickname": "a"}), "").expect("valid");
        let u = ops.upsert("t", &p).expect("creates");
        assert_eq!(u.token_limits.get("turbo"), Some(&1000));
        let p = UserPatch::parse(&json!({"promptCount": 4}), "").expect("valid");
        let u = ops.upsert("t", &p).expect("updates");
        assert_eq!(u.nickname.as_deref(), Some("a"));
        assert_eq!(u.prompt_count, 4);
        assert!(ops.upsert("bad token", &p).is_err());
    }

    #[test]
    fn bulk_with_one_bad_record_is_refused_whole() {
        let body = json!({"users": [{"token": "a"}, {"token": "b", "promptCount": "x"}, {"nickname": "n"}]});
        let e = parse_bulk(&body).expect_err("invalid");
        let m = e.to_string();
        assert!(m.contains("users[1].promptCount"), "{m}");
        assert!(m.contains("users[2].token"), "{m}");
        assert!(parse_bulk(&json!({"users": {}})).is_err());
        assert!(parse_bulk(&json!({})).is_err());
        assert!(parse_bulk(&json!({"users": [1]})).is_err());
    }

    #[test]
    fn bulk_from_bytes_matches_bulk_from_a_tree() {
        let body = json!({"other": 1, "users": [
            {"token": "a", "nickname": "n", "tokenLimits": {"turbo": 5, "mine": 1}, "x": true},
            {"token": "b", "ip": ["1.1.1.1", "1.1.1.1"], "meta": {"k": [1]}}
        ]});
        let bytes = serde_json::to_vec(&body).expect("ser");
        let from_bytes = parse_bulk_bytes(&bytes).expect("valid");
        let from_tree = parse_bulk(&body).expect("valid");
        assert_eq!(from_bytes.len(), 2);
        for (x, y) in from_bytes.iter().zip(&from_tree) {
            assert_eq!((&x.token, &x.patch), (&y.token, &y.patch));
        }
        assert_eq!(from_bytes[0].patch.ignored, vec!["users[0].x".to_string()]);

        let bad = json!({"users": [{"token": "a"}, {"token": "b", "promptCount": "x"}, {"nickname": "n"}]});
        let e_bytes = parse_bulk_bytes(&serde_json::to_vec(&bad).expect("ser"))
            .err()
            .flatten()
            .expect("refused");
        assert_eq!(e_bytes, parse_bulk(&bad).expect_err("refused"));

        // Other shapes are left to `parse_bulk`, which says what is wrong.
        for other in [
            &b"[]"[..],
            b"{}",
            b"{\"users\": {}}",
            b"{\"users\": [1,]}",
            b"nope",
        ] {
            assert!(matches!(parse_bulk_bytes(other), Err(None)), "{other:?}");
        }
    }

    #[test]
    fn bulk_upsert_moves_records_into_users() {
        let (store, limits) = ops_fixture();
        let ops = UserOps {
            users: &store,
            default_limits: &limits,
        };
        ops.upsert(
            "old",
            &UserPatch::parse(&json!({"nickname": "keep"}), "").expect("valid"),
        )
        .expect("creates");
        let body = json!({"users": [
            {"token": "new", "tokenLimits": {"claude": 9}},
            {"token": "old", "promptCount": 4},
            {"token": "plain"}
        ]});
        let records = parse_bulk(&body).expect("valid");
        let mut seen = Vec::new();
        let n = ops
            .upsert_bulk(records, |u| seen.push(u.token.clone()))
            .expect("applies");
        assert_eq!(n, 3);
        assert_eq!(seen, vec!["new", "old", "plain"]);
        let new = store.get("new").expect("created");
        assert_eq!(new.token_limits.get("claude"), Some(&9));
        assert_eq!(
            new.token_limits.get("turbo"),
            None,
            "the record's limits replace the defaults"
        );
        assert_eq!(
            store
                .get("plain")
                .expect("created")
                .token_limits
                .get("turbo"),
            Some(&1000)
        );
        let old = store.get("old").expect("kept");
        assert_eq!(
            (old.nickname.as_deref(), old.prompt_count),
            (Some("keep"), 4)
        );
    }

    #[test]
    fn create_temporary_needs_expiry_and_limits() {
        assert!(CreateRequest::parse(&json!({})).is_ok());
        assert!(CreateRequest::parse(&json!({"type": "special"})).is_ok());
        let e = CreateRequest::parse(&json!({"type": "temporary", "tokenLimits": {}}))
            .expect_err("no expiry");
        assert!(e.to_string().starts_with("expiresAt"));
        let e = CreateRequest::parse(&json!({"type": "temporary", "expiresAt": 5}))
            .expect_err("no limits");
        assert!(e.to_string().starts_with("tokenLimits"));
        let r = CreateRequest::parse(
            &json!({"type": "temporary", "expiresAt": 5, "tokenLimits": {"turbo": 3}}),
        )
        .expect("valid");
        let (store, limits) = ops_fixture();
        let ops = UserOps {
            users: &store,
            default_limits: &limits,
        };
        let u = ops.create(&r);
        assert_eq!(u.token_limits.get("turbo"), Some(&3));
        assert_eq!(u.expires_at, Some(5));
        assert!(uuid::Uuid::parse_str(&u.token).is_ok());
    }

    #[test]
    fn sorts_descending_with_missing_last() {
        let mk = |t: &str, pc: u64, last: Option<i64>| {
            let mut u = User::new(t.into(), UserType::Normal, TokenCounts::new(), 0);
            u.prompt_count = pc;
            u.last_used_at = last;
            u
        };
        let (store, limits) = ops_fixture();
        let ops = UserOps {
            users: &store,
            default_limits: &limits,
        };
        store.load(vec![
            mk("a", 1, None),
            mk("b", 5, Some(1)),
            mk("c", 1, Some(9)),
            mk("d", 5, Some(3)),
            mk("e", 1, Some(9)),
        ]);
        let order = |sort: &[SortField]| -> Vec<String> {
            ops.sorted_tokens(sort)
                .iter()
                .map(|t| t.to_string())
                .collect()
        };
        assert_eq!(order(DEFAULT_SORT), vec!["d", "b", "c", "e", "a"]);
        // Ties (all keys equal) are broken by token, ascending.
        assert_eq!(
            order(&[SortField::CreatedAt]),
            vec!["a", "b", "c", "d", "e"]
        );
        assert_eq!(order(&[SortField::Token]), vec!["e", "d", "c", "b", "a"]);
        assert!(parse_sort("bogus").is_err());
        assert_eq!(parse_sort("").expect("default"), DEFAULT_SORT.to_vec());
    }

    #[test]
    fn tie_break_orders_tokens_bytewise_beyond_the_prefix() {
        let (store, limits) = ops_fixture();
        let ops = UserOps {
            users: &store,
            default_limits: &limits,
        };
        let mut tokens = vec![
            "0123456789abcdef-b",
            "0123456789abcdef",
            "0123456789abcdef-a",
            "0123456789abcde",
            "0123456789abcdeg",
            "~",
            "A",
            "a",
        ];
        for t in &tokens {
            store.load_one(User::new(
                t.to_string(),
                UserType::Normal,
                TokenCounts::new(),
                0,
            ));
        }
        tokens.sort();
        let got: Vec<String> = ops
            .sorted_tokens(DEFAULT_SORT)
            .iter()
            .map(|t| t.to_string())
            .collect();
        assert_eq!(got, tokens);
    }

    #[test]
    fn disable_enable_clear_reset() {
        let (store, limits) = ops_fixture();
        let ops = UserOps {
            users: &store,
            default_limits: &limits,
        };
        assert_eq!(ops.disable("nope", None), Err(OpsError::NotFound));
        let p = UserPatch::parse(&json!({"ip": ["1.1.1.1"], "tokenCounts": {"turbo": 9}}), "")
            .expect("valid");
        ops.upsert("t", &p).expect("creates");
        let u = ops.disable("t", Some("spam")).expect("disables");
        let at = u.disabled_at;
        assert!(at.is_some());
        let u = ops.disable("t", Some("abuse")).expect("again");
        assert_eq!(u.disabled_at, at);
        assert_eq!(u.disabled_reason.as_deref(), Some("abuse"));
        let u = ops.enable("t").expect("enables");
        assert!(u.disabled_at.is_none() && u.disabled_reason.is_none());
        assert!(ops.clear_ips("t").expect("clears").ip.is_empty());
        assert_eq!(
            ops.reset_usage("t")
                .expect("resets")
                .token_counts
                .get("turbo"),
            Some(&0)
        );
    }
}
