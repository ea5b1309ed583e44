//! The upstream key pool of one provider: every operator key with its state (working, trial,
//! over quota, revoked, rate-limited until a time) and the model families it can serve, and
//! the choice of a key for a request. An OpenAI key of several organisations has one entry per
//! organisation, added by its checker ([`KeyPool::add_organization`]). The state is fed by the
//! forwarder (what the upstream answered) and by the key checkers
//! ([`crate::proxy::checker`]); the pool itself does no I/O.
//! A request touches only atomics and one uncontended read lock per key.
//!
//! Keys are only ever logged by [`crate::users::fingerprint`], never in clear.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::http::HeaderValue;
use serde::Serialize;

use crate::config::{ConfigError, Secret};
use crate::users::fingerprint;

/// What is known about a key, apart from a temporary rate limit (which is kept as a time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum KeyStatus {
    /// Not checked yet; used as if working.
    Unchecked = 0,
    /// The last check or request showed it works.
    Working = 1,
    /// Works, but its provider limits it as a trial key (low request limits).
    Trial = 2,
    /// The provider says its quota or credit is spent: out of rotation until a recheck.
    OverQuota = 3,
    /// The provider rejects it (invalid, revoked, organisation disabled): out of rotation
    /// until a recheck shows it works again.
    Revoked = 4,
    /// It works but the provider logs prompts (AWS model-invocation logging) and the operator
    /// did not allow that: out of rotation.
    Logging = 5,
}

impl KeyStatus {
    fn from_u8(v: u8) -> KeyStatus {
        match v {
            1 => KeyStatus::Working,
            2 => KeyStatus::Trial,
            3 => KeyStatus::OverQuota,
            4 => KeyStatus::Revoked,
            5 => KeyStatus::Logging,
            _ => KeyStatus::Unchecked,
        }
    }

    /// Whether a key in this state may be chosen for requests.
    pub fn usable(self) -> bool {
        matches!(
            self,
            KeyStatus::Unchecked | KeyStatus::Working | KeyStatus::Trial
        )
    }

    /// The state's name as shown on `/admin` and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Unchecked => "unchecked",
            KeyStatus::Working => "working",
            KeyStatus::Trial => "trial",
            KeyStatus::OverQuota => "over_quota",
            KeyStatus::Revoked => "revoked",
            KeyStatus::Logging => "logging",
        }
    }
}

/// One operator key with its state.
struct PoolKey {
    /// The ready-made credential header value (`Bearer <key>` or the bare key), marked
    /// sensitive so that no HTTP-level debug output prints it.
    header: HeaderValue,
    /// The key itself, for the checkers' probes (never logged or shown).
    secret: Secret,
    fingerprint: String,
    /// A [`KeyStatus`]. Shared with the same credential's entry in another pool when the
    /// pools were linked with [`KeyPool::share_status_with`] (AWS: Claude and Mistral).
    status: Arc<AtomicU8>,
    /// Milliseconds since the pool's epoch until which the key rests after a 429.
    rest_until_ms: AtomicU64,
    /// The pool's use counter when the key was last chosen (smaller is less recently used).
    last_used: AtomicU64,
    /// Unix milliseconds of the last completed check (0: never).
    last_checked_ms: AtomicI64,
    /// The families the key can serve, once a check has listed them (`None`: any).
    families: RwLock<Option<Arc<[Box<str>]>>>,
    /// Free-form details of the last check (tier, organisation), for `/admin`.
    detail: RwLock<Option<Arc<str>>>,
    /// For an OpenAI key's entry of one of its non-default organisations: the organisation
    /// id and its `OpenAI-Organization` header value (see [`KeyPool::add_organization`]).
    org: Option<(Box<str>, HeaderValue)>,
    /// The position of the key this entry was made from, for an organisation's entry.
    parent: Option<usize>,
}

impl PoolKey {
    /// A key never checked, used or rested, of no organisation.
    fn fresh(header: HeaderValue, secret: Secret, fingerprint: String) -> PoolKey {
        PoolKey {
            header,
            secret,
            fingerprint,
            status: Arc::new(AtomicU8::new(KeyStatus::Unchecked as u8)),
            rest_until_ms: AtomicU64::new(0),
            last_used: AtomicU64::new(0),
            last_checked_ms: AtomicI64::new(0),
            families: RwLock::new(None),
            detail: RwLock::new(None),
            org: None,
            parent: None,
        }
    }

    fn status(&self) -> KeyStatus {
        KeyStatus::from_u8(self.status.load(Ordering::Relaxed))
    }

    fn serves(&self, family: Option<&str>) -> bool {
        let Some(family) = family else {
            return true;
        };
        match self.families.read() {
            Ok(g) => g
                .as_ref()
                .is_none_or(|list| list.iter().any(|f| &**f == family)),
            // A poisoned lock only means a writer panicked; the key is not excluded for it.
            Err(_) => true,
        }
    }
}

/// Why no key could be chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoKey {
    /// The variable is empty or unset.
    NoneConfigured,
    /// Every key was rejected by the upstream as invalid.
    AllInvalid,
    /// Every key that could serve the request is over quota (or revoked, or logging).
    AllOverQuota,
    /// No usable key can serve this model family.
    NoneForFamily(String),
    /// Every usable key is resting after a 429; the first one is free again after this long.
    AllResting(Duration),
}

/// A chosen key: its position in the pool, the credential header value and its fingerprint.
#[derive(Debug, Clone)]
pub struct ChosenKey {
    pub index: usize,
    pub header: HeaderValue,
    pub fingerprint: String,
}

/// How many keys a provider has and in what state (shown on the service info page).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyCounts {
    /// Every configured key.
    pub total: usize,
    /// Keys that may be used right now.
    pub working: usize,
    /// Keys resting after a 429.
    pub resting: usize,
    /// Keys the upstream rejected as invalid or revoked (out of rotation until a recheck).
    pub invalid: usize,
    /// Keys whose quota is spent (out of rotation until a recheck).
    pub over_quota: usize,
    /// Usable keys that are trial keys (counted in `working` or `resting` too).
    pub trial: usize,
    /// Keys out of rotation because their provider logs prompts.
    pub logging: usize,
}

/// One key as `/admin` shows it: never the key, only its fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyView {
    pub fingerprint: String,
    /// `working`, `trial`, `over_quota`, `revoked`, `logging`, `unchecked` or `rate_limited`.
    pub state: &'static str,
    /// Unix milliseconds until which the key is rate-limited, when it is.
    pub rate_limited_until: Option<i64>,
    /// The families the key serves (`None`: not listed yet, any).
    pub families: Option<Vec<String>>,
    /// Unix milliseconds of the last check.
    pub last_checked: Option<i64>,
    pub detail: Option<String>,
}

/// The result of a check, applied with [`KeyPool::apply_check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub status: KeyStatus,
    /// The families the key can serve, when the check listed them (`None`: keep what is known).
    pub families: Option<Vec<String>>,
    /// Details for `/admin` (tier, organisation); `None` keeps what is known.
    pub detail: Option<String>,
    /// The key is rate-limited right now for this long (it works otherwise).
    pub rest: Option<Duration>,
}

impl CheckResult {
    /// A check that says only the key's status.
    pub fn status(status: KeyStatus) -> CheckResult {
        CheckResult {
            status,
            families: None,
            detail: None,
            rest: None,
        }
    }
}

/// The key pool of one provider.
pub struct KeyPool {
    /// The environment variable the keys came from, for messages (`OPENAI_KEY`).
    var: &'static str,
    keys: Box<[PoolKey]>,
    /// Entries added after startup, numbered after `keys`: an OpenAI key's other
    /// organisations. Append-only and lock-free (`boxcar`), so that a request's choice never
    /// waits for the checker that adds them and positions never move.
    clones: boxcar::Vec<PoolKey>,
    /// Counts key choices: a key's `last_used` is the counter's value when it was chosen.
    uses: AtomicU64,
    /// The latest rest end of any key (pool milliseconds; never lowered): while it is past,
    /// no key rests, which the fair queue reads with one atomic load instead of a scan.
    rest_until_max: AtomicU64,
    epoch: Instant,
    /// Woken whenever a key may have become usable (rest set shorter, a recheck), so that the
    /// request queue can look again without polling.
    changed: tokio::sync::Notify,
    /// An operator asked for every key to be checked again (the checker takes the permit).
    recheck: tokio::sync::Notify,
}

impl KeyPool {
    /// Builds a pool; `bearer` decides whether the header value is `Bearer <key>` (OpenAI) or
    /// the bare key (Anthropic's `x-api-key`).
    pub fn new(var: &'static str, keys: &[Secret], bearer: bool) -> Result<KeyPool, ConfigError> {
        if bearer {
            KeyPool::with_credential(var, keys, |k| format!("Bearer {k}"))
        } else {
            KeyPool::with_credential(var, keys, str::to_string)
        }
    }

    /// Builds a pool whose credential value for a key is `credential(key)` (the provider
    /// decides: `Bearer <key>`, the bare key, ...).
    pub fn with_credential(
        var: &'static str,
        keys: &[Secret],
        credential: impl Fn(&str) -> String,
    ) -> Result<KeyPool, ConfigError> {
        let mut pool = Vec::with_capacity(keys.len());
        for key in keys {
            let fp = fingerprint(key.expose());
            let raw = credential(key.expose());
            let mut header = HeaderValue::from_str(&raw).map_err(|_| {
                ConfigError(format!(
                    "{var} contains a key (fingerprint {fp}) with characters that are not allowed in an HTTP header; check for quotes, spaces or line breaks"
                ))
            })?;
            header.set_sensitive(true);
            pool.push(PoolKey::fresh(header, key.clone(), fp));
        }
        Ok(KeyPool {
            var,
            keys: pool.into_boxed_slice(),
            clones: boxcar::Vec::new(),
            uses: AtomicU64::new(1),
            rest_until_max: AtomicU64::new(0),
            epoch: Instant::now(),
            changed: tokio::sync::Notify::new(),
            recheck: tokio::sync::Notify::new(),
        })
    }

    /// Makes each key share its state (working, revoked, over quota, logging, ...) with the
    /// key at the same position of `other`: both pools hold the same credentials (AWS's Claude
    /// and Mistral pools, both from `AWS_CREDENTIALS`), so a credential found invalid through
    /// one is out of the other too. Rate limits, families and use order stay per pool. Does
    /// nothing when the pools differ in length.
    pub fn share_status_with(&mut self, other: &KeyPool) {
        if self.keys.len() != other.keys.len() {
            return;
        }
        for (mine, theirs) in self.keys.iter_mut().zip(other.keys.iter()) {
            mine.status = theirs.status.clone();
        }
    }

    /// The variable name the keys came from.
    pub fn var(&self) -> &'static str {
        self.var
    }

    /// Whether any key is configured at all.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// How many keys are configured (with their organisations' entries).
    pub fn len(&self) -> usize {
        self.keys.len() + self.clones.count()
    }

    /// The entry at `index`: a configured key, or an organisation's entry after them.
    fn key(&self, index: usize) -> Option<&PoolKey> {
        match index.checked_sub(self.keys.len()) {
            None => self.keys.get(index),
            Some(i) => self.clones.get(i),
        }
    }

    /// Every entry in position order. Most pools have no organisation entries, and walking an
    /// empty `boxcar::Vec` still visits its bucket table (about 600 instructions per request,
    /// callgrind): it is walked only when it holds something.
    fn all(&self) -> impl Iterator<Item = &PoolKey> {
        let clones = (self.clones.count() > 0).then(|| self.clones.iter().map(|(_, k)| k));
        self.keys.iter().chain(clones.into_iter().flatten())
    }

    /// Adds an entry for the key at `parent` used with the organisation `org` (a non-default
    /// organisation of an OpenAI key: requests with it carry `OpenAI-Organization: org`, and
    /// it is checked and chosen as a key of its own). Its fingerprint is the key's with
    /// `/org` appended. Returns its position, or `None` when it exists already or `org` cannot
    /// be a header value.
    pub fn add_organization(&self, parent: usize, org: &str) -> Option<usize> {
        let base = self.key(parent)?;
        if base.parent.is_some()
            || self.all().any(|k| {
                k.parent == Some(parent) && k.org.as_ref().is_some_and(|(o, _)| &**o == org)
            })
        {
            return None;
        }
        let header = HeaderValue::from_str(org).ok()?;
        let entry = PoolKey {
            org: Some((org.into(), header)),
            parent: Some(parent),
            ..PoolKey::fresh(
                base.header.clone(),
                base.secret.clone(),
                format!("{}/{org}", base.fingerprint),
            )
        };
        let index = self.keys.len() + self.clones.push(entry);
        tracing::info!(
            var = self.var,
            key = %base.fingerprint,
            organization = org,
            "this key belongs to several organisations; it is used once per organisation"
        );
        self.changed.notify_waiters();
        Some(index)
    }

    /// The `OpenAI-Organization` header value of the entry at `index`, for an organisation's
    /// entry.
    pub fn organization(&self, index: usize) -> Option<&HeaderValue> {
        self.key(index)?.org.as_ref().map(|(_, h)| h)
    }

    /// Whether the entry at `index` is an organisation's entry of another key.
    pub fn is_organization_entry(&self, index: usize) -> bool {
        self.key(index).is_some_and(|k| k.parent.is_some())
    }

    fn now_ms(&self) -> u64 {
        let since = crate::timer::now().saturating_duration_since(self.epoch);
        u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
    }

    /// Chooses a key for a request of `family` (`None`: any key): only usable keys that can
    /// serve the family, preferring keys that are not rate-limited, then the least recently
    /// used one.
    pub fn pick(&self, family: Option<&str>) -> Result<ChosenKey, NoKey> {
        self.pick_where(family, |_| true)
    }

    /// Like [`KeyPool::pick`], skipping the keys at `skip` (keys that cannot serve this one
    /// request, e.g. a cloud credential without access to the model); when only skipped keys
    /// are usable, answers [`NoKey::AllInvalid`].
    pub fn pick_except(&self, family: Option<&str>, skip: &[usize]) -> Result<ChosenKey, NoKey> {
        self.pick_where(family, |i| !skip.contains(&i))
    }

    /// As [`KeyPool::pick`], among the keys whose index `eligible` accepts (Azure: the
    /// credentials of the deployment the client named).
    pub fn pick_where(
        &self,
        family: Option<&str>,
        eligible: impl Fn(usize) -> bool,
    ) -> Result<ChosenKey, NoKey> {
        let index = self.choose(family, eligible)?;
        let Some(key) = self.key(index) else {
            return Err(NoKey::AllInvalid);
        };
        key.last_used
            .store(self.uses.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        Ok(ChosenKey {
            index,
            header: key.header.clone(),
            fingerprint: key.fingerprint.clone(),
        })
    }

    /// Whether [`KeyPool::pick_where`] would find a key now, without choosing it (the fair
    /// queue asks this before it lets a request go): `Err(NoKey::AllResting(_))` means every
    /// usable key rests, any other error that no key can serve the request at all.
    pub fn available(
        &self,
        family: Option<&str>,
        eligible: impl Fn(usize) -> bool,
    ) -> Result<(), NoKey> {
        self.choose(family, eligible).map(|_| ())
    }

    /// Whether a key may be resting now (false: certainly none is). One atomic load and a
    /// clock read, for the fair queue's fast path.
    pub fn may_rest(&self) -> bool {
        self.rest_until_max.load(Ordering::Relaxed) > self.now_ms()
    }

    /// The selection behind [`KeyPool::pick_where`] and [`KeyPool::available`]: the index of
    /// the key to use, without marking it used.
    fn choose(
        &self,
        family: Option<&str>,
        eligible: impl Fn(usize) -> bool,
    ) -> Result<usize, NoKey> {
        if self.keys.is_empty() {
            return Err(NoKey::NoneConfigured);
        }
        let now = self.now_ms();
        let mut best: Option<(usize, u64)> = None;
        let mut soonest: Option<u64> = None;
        let mut any_serves = false;
        let mut all_revoked = true;
        for (index, key) in self.all().enumerate() {
            if !eligible(index) {
                continue;
            }
            let status = key.status();
            if status != KeyStatus::Revoked {
                all_revoked = false;
            }
            if !key.serves(family) {
                continue;
            }
            // A revoked key's family list says nothing (it may never have been listed).
            any_serves |= status != KeyStatus::Revoked;
            if !status.usable() {
                continue;
            }
            let until = key.rest_until_ms.load(Ordering::Relaxed);
            if until > now {
                soonest = Some(soonest.map_or(until, |s| s.min(until)));
                continue;
            }
            let used = key.last_used.load(Ordering::Relaxed);
            if best.is_none_or(|(_, b)| used < b) {
                best = Some((index, used));
            }
        }
        if let Some((index, _)) = best {
            return Ok(index);
        }
        if let Some(until) = soonest {
            return Err(NoKey::AllResting(Duration::from_millis(until - now)));
        }
        if all_revoked {
            return Err(NoKey::AllInvalid);
        }
        match family {
            Some(f) if !any_serves => Err(NoKey::NoneForFamily(f.to_string())),
            _ => Err(NoKey::AllOverQuota),
        }
    }

    /// Takes a key out of rotation because the upstream rejected it (401/403, or a body that
    /// says revoked). Logs once; a recheck may bring it back.
    pub fn mark_invalid(&self, index: usize, status: u16) {
        if let Some(key) = self.key(index) {
            if key.status.swap(KeyStatus::Revoked as u8, Ordering::Relaxed)
                != KeyStatus::Revoked as u8
            {
                tracing::error!(
                    var = self.var,
                    key = %key.fingerprint,
                    status,
                    "the upstream rejected this key as invalid; it is out of rotation until a recheck shows it works (replace it in {})",
                    self.var
                );
            }
        }
    }

    /// Takes a key out of rotation because the upstream says its quota or credit is spent.
    /// Unlike a rate limit this does not pass by itself: the key stays out until a recheck.
    pub fn mark_over_quota(&self, index: usize, reason: &str) {
        if let Some(key) = self.key(index) {
            if key
                .status
                .swap(KeyStatus::OverQuota as u8, Ordering::Relaxed)
                != KeyStatus::OverQuota as u8
            {
                tracing::error!(
                    var = self.var,
                    key = %key.fingerprint,
                    reason,
                    "the upstream says this key is over its quota; it is out of rotation until a recheck"
                );
            }
        }
    }

    /// Records that the upstream answered a request with key `index` successfully: an
    /// unchecked key is then known to work (a single atomic compare-and-swap).
    pub fn note_success(&self, index: usize) {
        if let Some(key) = self.key(index) {
            let _ = key.status.compare_exchange(
                KeyStatus::Unchecked as u8,
                KeyStatus::Working as u8,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// Rests a key for `dur` because the upstream rate-limited it (429).
    pub fn rest(&self, index: usize, dur: Duration) {
        if let Some(key) = self.key(index) {
            let until = self
                .now_ms()
                .saturating_add(u64::try_from(dur.as_millis()).unwrap_or(u64::MAX));
            key.rest_until_ms.fetch_max(until, Ordering::Relaxed);
            self.rest_until_max.fetch_max(until, Ordering::Relaxed);
            tracing::warn!(
                var = self.var,
                key = %key.fingerprint,
                rest_secs = dur.as_secs_f64(),
                "the upstream rate-limited this key (429); resting it"
            );
        }
    }

    /// Records the result of a check of key `index`.
    pub fn apply_check(&self, index: usize, result: CheckResult) {
        let Some(key) = self.key(index) else {
            return;
        };
        let before = key.status.swap(result.status as u8, Ordering::Relaxed);
        if let Some(families) = result.families {
            let list: Arc<[Box<str>]> = families.into_iter().map(String::into_boxed_str).collect();
            if let Ok(mut g) = key.families.write() {
                *g = Some(list);
            }
        }
        if let Some(detail) = result.detail {
            if let Ok(mut g) = key.detail.write() {
                *g = Some(Arc::from(detail));
            }
        }
        match result.rest {
            Some(d) => self.rest(index, d),
            // A check that got through shows the key is not rate-limited any more.
            None if result.status.usable() => key.rest_until_ms.store(0, Ordering::Relaxed),
            None => {}
        }
        key.last_checked_ms
            .store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
        if before != result.status as u8 {
            tracing::info!(
                var = self.var,
                key = %key.fingerprint,
                from = KeyStatus::from_u8(before).as_str(),
                to = result.status.as_str(),
                "key state changed by a check"
            );
        }
        self.changed.notify_waiters();
    }

    /// The key of `index` and its fingerprint, for a checker's probe.
    pub fn secret(&self, index: usize) -> Option<(&Secret, &str)> {
        self.key(index).map(|k| (&k.secret, k.fingerprint.as_str()))
    }

    /// The credential header value of key `index`, for a checker's probe.
    pub fn credential(&self, index: usize) -> Option<&HeaderValue> {
        self.key(index).map(|k| &k.header)
    }

    /// Unix milliseconds of the last check of key `index` (0: never).
    pub fn last_checked_ms(&self, index: usize) -> i64 {
        self.key(index)
            .map_or(0, |k| k.last_checked_ms.load(Ordering::Relaxed))
    }

    /// The status of key `index`.
    pub fn status(&self, index: usize) -> Option<KeyStatus> {
        self.key(index).map(PoolKey::status)
    }

    /// Resolves when a key's state may have changed (a check ran).
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Asks this pool's checker to check every key again now (the `/admin` "recheck keys"
    /// action). Does nothing when key checks are off.
    pub fn request_recheck(&self) {
        self.recheck.notify_one();
    }

    /// Resolves when a recheck was asked for (used by the pool's one checker task).
    pub fn recheck_requested(&self) -> tokio::sync::futures::Notified<'_> {
        self.recheck.notified()
    }

    /// Every key as `/admin` shows it.
    pub fn views(&self) -> Vec<KeyView> {
        let now = self.now_ms();
        let wall = chrono::Utc::now().timestamp_millis();
        self.all()
            .map(|k| {
                let status = k.status();
                let until = k.rest_until_ms.load(Ordering::Relaxed);
                let limited = status.usable() && until > now;
                let checked = k.last_checked_ms.load(Ordering::Relaxed);
                KeyView {
                    fingerprint: k.fingerprint.clone(),
                    state: if limited {
                        "rate_limited"
                    } else {
                        status.as_str()
                    },
                    rate_limited_until: limited.then(|| {
                        wall.saturating_add(i64::try_from(until - now).unwrap_or(i64::MAX))
                    }),
                    families: k.families.read().ok().and_then(|g| {
                        g.as_ref()
                            .map(|l| l.iter().map(|f| f.to_string()).collect())
                    }),
                    last_checked: (checked > 0).then_some(checked),
                    detail: k
                        .detail
                        .read()
                        .ok()
                        .and_then(|g| g.as_ref().map(|d| d.to_string())),
                }
            })
            .collect()
    }

    /// Counts keys by state.
    pub fn counts(&self) -> KeyCounts {
        self.counts_for(None)
    }

    /// Counts the keys that serve `family` (`None`: every key) by state.
    pub fn counts_for(&self, family: Option<&str>) -> KeyCounts {
        let now = self.now_ms();
        let mut c = KeyCounts::default();
        for key in self.all().filter(|k| k.serves(family)) {
            c.total += 1;
            match key.status() {
                KeyStatus::Revoked => c.invalid += 1,
                KeyStatus::OverQuota => c.over_quota += 1,
                KeyStatus::Logging => c.logging += 1,
                s => {
                    if s == KeyStatus::Trial {
                        c.trial += 1;
                    }
                    if key.rest_until_ms.load(Ordering::Relaxed) > now {
                        c.resting += 1;
                    } else {
                        c.working += 1;
                    }
                }
            }
        }
        c
    }
}

/// How long a rate-limited key rests when the upstream does not say.
pub const DEFAULT_REST: Duration = Duration::from_secs(60);

/// Reads how long to rest a key from a 429's headers: `retry-after-ms`, then `retry-after`
/// (seconds or an HTTP date), else [`DEFAULT_REST`]. Capped at one hour so that a wrong header
/// cannot take a key out for good.
pub fn rest_duration(headers: &impl crate::http1::Lookup) -> Duration {
    const RETRY_AFTER_MS: axum::http::HeaderName =
        axum::http::HeaderName::from_static("retry-after-ms");
    let parsed = headers
        .first(&RETRY_AFTER_MS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
        .or_else(|| {
            headers
                .first(&axum::http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after)
        });
    parsed
        .unwrap_or(DEFAULT_REST)
        .min(Duration::from_secs(3600))
}

/// Parses a `Retry-After` value: delta-seconds (possibly fractional) or an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let date = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let delta = date.signed_duration_since(chrono::Utc::now());
    Some(delta.to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> KeyPool {
        let keys: Vec<Secret> = (0..n).map(|i| Secret::new(format!("key{i}"))).collect();
        KeyPool::new("OPENAI_KEY", &keys, true).expect("pool")
    }

    fn pick(p: &KeyPool) -> usize {
        p.pick(None).expect("key").index
    }

    #[test]
    fn least_recently_used_skips_invalid_and_resting() {
        let p = pool(3);
        let order: Vec<usize> = (0..6).map(|_| pick(&p)).collect();
        assert_eq!(order, vec![0, 1, 2, 0, 1, 2]);
        p.mark_invalid(1, 401);
        p.rest(2, Duration::from_secs(30));
        for _ in 0..4 {
            assert_eq!(pick(&p), 0);
        }
        assert_eq!(
            p.counts(),
            KeyCounts {
                total: 3,
                working: 1,
                resting: 1,
                invalid: 1,
                ..KeyCounts::default()
            }
        );
        p.rest(0, Duration::from_secs(10));
        match p.pick(None) {
            Err(NoKey::AllResting(d)) => assert!(d <= Duration::from_secs(10)),
            other => panic!("expected all resting, got {other:?}"),
        }
    }

    #[test]
    fn a_key_back_from_rest_is_used_first() {
        let p = pool(2);
        p.rest(0, Duration::from_secs(30));
        for _ in 0..3 {
            assert_eq!(pick(&p), 1);
        }
        // A check shows key 0 works again: it has been used least recently.
        p.apply_check(0, CheckResult::status(KeyStatus::Working));
        assert_eq!(pick(&p), 0);
        assert_eq!(pick(&p), 1);
    }

    #[test]
    fn over_quota_leaves_rotation_until_a_recheck() {
        let p = pool(2);
        p.mark_over_quota(0, "insufficient_quota");
        for _ in 0..3 {
            assert_eq!(pick(&p), 1);
        }
        let c = p.counts();
        assert_eq!((c.working, c.over_quota), (1, 1));
        p.mark_over_quota(1, "insufficient_quota");
        assert_eq!(p.pick(None).err(), Some(NoKey::AllOverQuota));
        p.apply_check(0, CheckResult::status(KeyStatus::Working));
        assert_eq!(pick(&p), 0);
        assert_eq!(p.views()[1].state, "over_quota");
        assert_eq!(p.views()[0].state, "working");
    }

    #[test]
    fn selection_uses_only_keys_of_the_family() {
        let p = pool(3);
        p.apply_check(
            0,
            CheckResult {
                families: Some(vec!["turbo".into()]),
                ..CheckResult::status(KeyStatus::Working)
            },
        );
        p.apply_check(
            1,
            CheckResult {
                families: Some(vec!["turbo".into(), "gpt4o".into()]),
                ..CheckResult::status(KeyStatus::Trial)
            },
        );
        p.apply_check(2, CheckResult::status(KeyStatus::Revoked));
        for _ in 0..3 {
            assert_eq!(p.pick(Some("gpt4o")).expect("key").index, 1);
        }
        assert_eq!(
            p.pick(Some("o3")).err(),
            Some(NoKey::NoneForFamily("o3".into()))
        );
        // The revoked key was never listed, so it counts in every family.
        let c = p.counts_for(Some("gpt4o"));
        assert_eq!((c.total, c.working, c.trial, c.invalid), (2, 1, 1, 1));
        p.rest(1, Duration::from_secs(5));
        assert!(matches!(p.pick(Some("gpt4o")), Err(NoKey::AllResting(_))));
        // Keys not rate-limited are preferred even when used more recently.
        assert_eq!(p.pick(Some("turbo")).expect("key").index, 0);
        assert_eq!(p.pick(Some("turbo")).expect("key").index, 0);
        let v = &p.views()[1];
        assert_eq!(v.state, "rate_limited");
        assert!(v.rate_limited_until.is_some());
    }

    #[test]
    fn an_organisation_entry_is_a_key_of_its_own() {
        let p = pool(2);
        assert_eq!(p.add_organization(0, "org-team"), Some(2));
        // Once per (key, organisation); never for an organisation's entry itself.
        assert_eq!(p.add_organization(0, "org-team"), None);
        assert_eq!(p.add_organization(2, "org-other"), None);
        assert_eq!(p.len(), 3);
        assert!(p.is_organization_entry(2) && !p.is_organization_entry(0));
        assert_eq!(
            p.organization(2).map(|h| h.to_str().expect("ascii")),
            Some("org-team")
        );
        assert!(p.organization(0).is_none());
        let order: Vec<usize> = (0..6).map(|_| pick(&p)).collect();
        assert_eq!(order, vec![0, 1, 2, 0, 1, 2]);
        // Its own state: revoking it leaves the key itself in rotation.
        p.mark_invalid(2, 401);
        assert_eq!(p.views()[2].state, "revoked");
        assert_eq!(p.views()[0].state, "unchecked");
        assert!(p.views()[2].fingerprint.ends_with("/org-team"));
        assert_eq!(p.counts().invalid, 1);
    }

    #[test]
    fn empty_and_all_invalid() {
        assert_eq!(pool(0).pick(None).err(), Some(NoKey::NoneConfigured));
        let p = pool(2);
        p.mark_invalid(0, 401);
        p.mark_invalid(1, 403);
        assert_eq!(p.pick(None).err(), Some(NoKey::AllInvalid));
    }

    #[test]
    fn views_never_hold_the_key() {
        let keys = [Secret::new("sk-very-secret-key")];
        let p = KeyPool::new("OPENAI_KEY", &keys, true).expect("pool");
        let json = serde_json::to_string(&p.views()).expect("json");
        assert!(!json.contains("sk-very-secret-key"));
        assert!(json.contains(&fingerprint("sk-very-secret-key")));
    }

    #[test]
    fn header_value_is_bearer_or_bare() {
        let keys = [Secret::new("sk-1")];
        let o = KeyPool::new("OPENAI_KEY", &keys, true).expect("pool");
        assert_eq!(o.pick(None).expect("key").header, "Bearer sk-1");
        let a = KeyPool::new("ANTHROPIC_KEY", &keys, false).expect("pool");
        assert_eq!(a.pick(None).expect("key").header, "sk-1");
    }

    #[test]
    fn bad_key_is_a_config_error_without_the_key() {
        let keys = [Secret::new("sk-secret\nvalue")];
        let e = KeyPool::new("OPENAI_KEY", &keys, true)
            .err()
            .expect("must fail");
        assert!(e.0.contains("OPENAI_KEY"));
        assert!(!e.0.contains("sk-secret"));
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        let future = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        let d = parse_retry_after(&future).expect("date parses");
        assert!(d > Duration::from_secs(25) && d <= Duration::from_secs(30));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
        let h = axum::http::HeaderMap::new();
        assert_eq!(rest_duration(&h), DEFAULT_REST);
    }
}
