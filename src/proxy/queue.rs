//! The fair request queue (issue 16): per-caller concurrency (`USER_CONCURRENCY_LIMIT`) and,
//! while every key that can serve a model family rests after a 429, a FIFO queue per family
//! instead of an error. Owns the waiting, the heartbeats of a waiting stream and the queue's
//! numbers (info page, metrics); knows nothing of providers' wire formats beyond the one SSE
//! error event a waiting stream may have to end with, and never reads the user store.
//!
//! How a request passes (see `docs/keys.md`, "Fair queue"):
//!
//! 1. **Caller's turn.** A caller (a user token, or the client address for anonymous and
//!    proxy-key callers) holds at most `USER_CONCURRENCY_LIMIT` slots; a slot is held for the
//!    whole upstream request, streamed body included, and released by [`Turn`]'s `Drop`
//!    (completion, error or client gone). Further requests wait in the caller's own FIFO.
//!    Special users and administrators are exempt.
//! 2. **A free key.** When no key of the family is free (all rest), or others already wait
//!    for this family, the request joins the family's FIFO. When a key is free again, the head
//!    of the queue goes alone as a *probe*; only when the upstream has answered it without a
//!    429 does the rest of the queue follow (in order). A probe that gets a 429 rests the key
//!    again and keeps its place at the head. Positions in the family queue are taken after the
//!    caller's turn, so two callers hammering one key are served alternately.
//!
//! Nothing polls: a waiter sleeps until the earliest rest end of the family's keys, a key
//! check ([`KeyPool::changed`]), the family's own notification (the head left, a probe was
//! answered) or its deadline (`QUEUE_TIMEOUT_SECS`), all inside the request's own task.
//!
//! **Zero cost when keys are free**: a request whose family has no waiter and whose caller is
//! under the limit takes one `DashMap` shard lock (its caller's counter, inserted and removed
//! in place, no heap allocation), a relaxed atomic load (`key_waiting`) and the pool's
//! [`KeyPool::may_rest`] (an atomic load and a clock read; the pool is scanned only while a key
//! may rest); it creates no timer, no task, no `Notify` and no allocation for the queue, and
//! takes no lock of the family queues. Requests without a family (model lists, token counting) skip the queue.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use http_body::Frame;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use crate::auth::Principal;
use crate::config::Config;
use crate::error::ProxyError;
use crate::http1::{Fields, Reply};
use crate::proxy::keys::{KeyPool, NoKey};
use crate::quota::Ticket;
use crate::users::UserType;

/// The queue's settings, from `USER_CONCURRENCY_LIMIT`, `HEARTBEAT_INTERVAL_SEC` and
/// `QUEUE_TIMEOUT_SECS`.
#[derive(Debug, Clone, Copy)]
pub struct QueueSettings {
    /// Slots per caller; 0 = no limit.
    pub user_limit: u32,
    /// Between two heartbeats of a waiting stream.
    pub heartbeat: Duration,
    /// How long a request may wait in all.
    pub timeout: Duration,
}

impl QueueSettings {
    pub fn from_config(config: &Config) -> QueueSettings {
        QueueSettings {
            user_limit: config.cli.user_concurrency_limit,
            heartbeat: Duration::from_secs(config.cli.heartbeat_interval_sec.max(1)),
            timeout: Duration::from_secs(config.cli.queue_timeout_secs.max(1)),
        }
    }
}

impl Default for QueueSettings {
    fn default() -> QueueSettings {
        QueueSettings {
            user_limit: 1,
            heartbeat: Duration::from_secs(5),
            timeout: Duration::from_secs(60),
        }
    }
}

/// Who a concurrency slot belongs to. A user is known by a hash of the token (never the token
/// itself, so the map holds no secret and needs no allocation per caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    User(u64),
    Addr(IpAddr),
}

/// A user is hashed as its number ([`CallerHasher::write_u64`]), an address as its bytes
/// ([`CallerHasher::write`]).
impl std::hash::Hash for Caller {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        match self {
            Caller::User(n) => state.write_u64(*n),
            Caller::Addr(IpAddr::V4(a)) => state.write(&a.octets()),
            Caller::Addr(IpAddr::V6(a)) => state.write(&a.octets()),
        }
    }
}

/// The hashes of the callers table. An address, which a client chooses among those it holds
/// (an IPv6 /64 is 2^64 of them), goes through SipHash with a random key, as std's maps do, so
/// that nobody can aim addresses at one bucket. A user's number is already a keyed hash of its
/// token (the user store's, random per process, of tokens the server issued), so one multiply
/// mixes it: SipHash on every table operation cost about 450 instructions per request
/// (callgrind, issue 18).
#[derive(Clone, Default)]
struct CallerHashState {
    sip: std::hash::RandomState,
}

impl std::hash::BuildHasher for CallerHashState {
    type Hasher = CallerHasher;
    fn build_hasher(&self) -> CallerHasher {
        CallerHasher {
            sip: self.sip.build_hasher(),
            user: None,
        }
    }
}

struct CallerHasher {
    sip: std::hash::DefaultHasher,
    user: Option<u64>,
}

impl std::hash::Hasher for CallerHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.sip.write(bytes);
    }

    fn write_u64(&mut self, n: u64) {
        self.user = Some(n);
    }

    fn finish(&self) -> u64 {
        match self.user {
            // The high bits pick the shard and the control bytes: spread the low ones there.
            Some(n) => (n ^ (n >> 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            None => self.sip.finish(),
        }
    }
}

/// One caller's slots: how many of its requests are in flight, and its requests waiting for
/// a slot, oldest first.
#[derive(Default)]
struct CallerState {
    in_flight: u32,
    waiters: VecDeque<(u64, Arc<Notify>)>,
}

/// One model family's queue and waiting statistics.
struct FamilyState {
    /// Requests waiting for a free key: (position, since), by position.
    waiters: VecDeque<(u64, Instant)>,
    /// Requests of this family waiting for their caller's turn (shown as queued too).
    caller_waiting: usize,
    /// The request sent alone to see whether the upstream takes requests again (its position,
    /// and when it went).
    probe: Option<(u64, Instant)>,
    /// The last probe was answered without a 429: the waiters may all go, in order.
    open: bool,
    /// Woken when the head may have changed (a waiter left, a probe was answered).
    notify: Arc<Notify>,
    /// Exponential moving average of finished waits, in milliseconds.
    avg_wait_ms: f64,
    /// When the last wait ended (the average is forgotten 5 minutes later, as the original).
    last_wait_end: Option<Instant>,
}

impl FamilyState {
    fn new() -> FamilyState {
        FamilyState {
            waiters: VecDeque::new(),
            caller_waiting: 0,
            probe: None,
            open: false,
            notify: Arc::new(Notify::new()),
            avg_wait_ms: 0.0,
            last_wait_end: None,
        }
    }

    fn queued(&self) -> usize {
        self.waiters.len() + self.caller_waiting
    }
}

/// How long the queue waits for its probe's answer. Upstreams refuse a rate-limited request at
/// once; a probe without an answer after this long was taken (a long generation before its
/// headers), so the others follow rather than wait for the whole answer.
const PROBE_GRACE: Duration = Duration::from_secs(2);

/// Weight of the newest wait in the moving average.
const WAIT_AVERAGE_ALPHA: f64 = 0.3;
/// A wait older than this no longer counts for the estimate (the original's 5 minutes).
const WAIT_MEMORY: Duration = Duration::from_secs(300);

/// The fair queue of the whole proxy (one per process, on [`crate::proxy::Upstreams`]).
pub struct FairQueue {
    settings: QueueSettings,
    callers: DashMap<Caller, CallerState, CallerHashState>,
    /// Hashes user tokens into [`Caller::User`] (random per process).
    hasher: std::hash::RandomState,
    /// Positions in the queues, in arrival order.
    seq: AtomicU64,
    /// Requests waiting for a key in any family: while 0, no request needs the lock.
    key_waiting: AtomicUsize,
    families: Mutex<HashMap<Box<str>, FamilyState>>,
}

/// What [`FairQueue::enter`] decided.
pub enum Enter {
    /// Go now (the fast path): the turn holds the caller's slot.
    Go(Turn),
    /// Wait: for the caller's turn, a free key, or both ([`Waiting::turn`]).
    Wait(Waiting),
}

/// Why a request left the queue without its turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueRefusal {
    /// `QUEUE_TIMEOUT_SECS` passed while every key of the family rested.
    KeyTimeout { family: String, retry_after: u64 },
    /// `QUEUE_TIMEOUT_SECS` passed while the caller's other requests were in flight.
    CallerTimeout,
}

impl FairQueue {
    pub fn new(settings: QueueSettings) -> FairQueue {
        FairQueue {
            settings,
            callers: DashMap::default(),
            hasher: std::hash::RandomState::new(),
            seq: AtomicU64::new(1),
            key_waiting: AtomicUsize::new(0),
            families: Mutex::new(HashMap::new()),
        }
    }

    pub fn settings(&self) -> QueueSettings {
        self.settings
    }

    fn families(&self) -> MutexGuard<'_, HashMap<Box<str>, FamilyState>> {
        // A poisoned lock only means a panic elsewhere while it was held; the counts are
        // still consistent enough to go on.
        self.families.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// The caller whose slots a request takes; `None` when it is exempt (special users,
    /// administrators) or there is no limit.
    fn caller_of(&self, principal: &Principal, ip: IpAddr) -> Option<Caller> {
        if self.settings.user_limit == 0 {
            return None;
        }
        match principal {
            Principal::Admin
            | Principal::User {
                kind: UserType::Special,
                ..
            } => None,
            // The store's hash of the token, made once by the gatekeeper (a principal made
            // without the store, in tests, has its token hashed here).
            Principal::User { key: Some(key), .. } => Some(Caller::User(key.as_u64())),
            Principal::User { token, .. } => {
                Some(Caller::User(self.hasher.hash_one(token.as_str())))
            }
            Principal::Anonymous | Principal::ProxyKey => Some(Caller::Addr(ip)),
        }
    }

    /// The gate of one request of `family` (`None`: not a generation request, which never
    /// waits). Decides at once and without waiting: [`Enter::Go`] when the caller has a free
    /// slot and a key of the family is free with nobody queued before it; [`Enter::Wait`]
    /// otherwise (the request then already holds its place).
    pub fn enter(
        self: &Arc<Self>,
        principal: &Principal,
        ip: IpAddr,
        pool: &KeyPool,
        family: Option<&str>,
        eligible: Option<&[usize]>,
    ) -> Enter {
        let Some(family) = family else {
            return Enter::Go(Turn::outside());
        };
        let caller = self.caller_of(principal, ip);
        let mut turn = Turn {
            queue: Some(self.clone()),
            caller: None,
            seq: None,
            probe: None,
            deadline: None,
            head_pending: false,
        };
        if let Some(c) = caller {
            if !self.try_slot(c) {
                let seq = self.next_seq();
                let position = self.join_callers(c, seq, family);
                return Enter::Wait(Waiting {
                    turn,
                    pending_caller: Some((c, seq)),
                    family: family.into(),
                    eligible: eligible.map(<[usize]>::to_vec),
                    position,
                    registered: false,
                });
            }
            turn.caller = Some(c);
        }
        let resting = |pool: &KeyPool| {
            matches!(
                pool.available(Some(family), |i| eligible.is_none_or(|s| s.contains(&i))),
                Err(NoKey::AllResting(_))
            )
        };
        if self.key_waiting.load(Ordering::Relaxed) == 0 && (!pool.may_rest() || !resting(pool)) {
            return Enter::Go(turn);
        }
        // Slow path: somebody waits somewhere, or every key of this family rests.
        let mut families = self.families();
        let queue_empty = families
            .get(family)
            .is_none_or(|s| s.waiters.is_empty() && s.probe.is_none());
        if queue_empty && !resting(pool) {
            return Enter::Go(turn);
        }
        let seq = self.next_seq();
        turn.seq = Some(seq);
        let position = Self::register_key_locked(
            &mut families,
            &self.key_waiting,
            family,
            seq,
            Instant::now(),
        );
        drop(families);
        Enter::Wait(Waiting {
            turn,
            pending_caller: None,
            family: family.into(),
            eligible: eligible.map(<[usize]>::to_vec),
            position,
            registered: true,
        })
    }

    /// Takes a slot of `caller` when one is free and nobody of the caller waits.
    fn try_slot(&self, caller: Caller) -> bool {
        let mut entry = self.callers.entry(caller).or_default();
        if entry.in_flight < self.settings.user_limit && entry.waiters.is_empty() {
            entry.in_flight += 1;
            true
        } else {
            false
        }
    }

    /// Puts a request at the end of its caller's waiters; returns how many requests of the
    /// family wait in all (its position, for the stream's first comment).
    fn join_callers(&self, caller: Caller, seq: u64, family: &str) -> usize {
        self.callers
            .entry(caller)
            .or_default()
            .waiters
            .push_back((seq, Arc::new(Notify::new())));
        let mut families = self.families();
        let state = Self::family_entry(&mut families, family);
        state.caller_waiting += 1;
        state.queued()
    }

    fn family_entry<'a>(
        families: &'a mut HashMap<Box<str>, FamilyState>,
        family: &str,
    ) -> &'a mut FamilyState {
        if !families.contains_key(family) {
            families.insert(family.into(), FamilyState::new());
        }
        // Inserted just above when missing.
        families
            .get_mut(family)
            .unwrap_or_else(|| unreachable!("family state inserted above"))
    }

    /// Puts a request into the family's key queue at its position (a request coming back
    /// after a 429 keeps the place it had).
    fn register_key_locked(
        families: &mut HashMap<Box<str>, FamilyState>,
        key_waiting: &AtomicUsize,
        family: &str,
        seq: u64,
        since: Instant,
    ) -> usize {
        let state = Self::family_entry(families, family);
        let at = state.waiters.partition_point(|(s, _)| *s < seq);
        state.waiters.insert(at, (seq, since));
        key_waiting.fetch_add(1, Ordering::Relaxed);
        state.queued()
    }

    /// Removes a request from the family's key queue (it goes, or it left).
    fn unregister_key_locked(
        families: &mut HashMap<Box<str>, FamilyState>,
        key_waiting: &AtomicUsize,
        family: &str,
        seq: u64,
    ) {
        let Some(state) = families.get_mut(family) else {
            return;
        };
        if let Some(at) = state.waiters.iter().position(|(s, _)| *s == seq) {
            state.waiters.remove(at);
            key_waiting.fetch_sub(1, Ordering::Relaxed);
            if at == 0 {
                // The head changed: the next one may go.
                state.notify.notify_waiters();
            }
        }
        if state.waiters.is_empty() && state.probe.is_none() {
            state.open = false;
        }
    }

    /// Waits for a slot of `caller` (its waiter is already queued with `seq`).
    async fn caller_turn(
        &self,
        caller: Caller,
        seq: u64,
        family: &str,
        deadline: Instant,
    ) -> Result<(), QueueRefusal> {
        let mut guard = CallerWaiter {
            queue: self,
            caller,
            seq,
            family,
            active: true,
        };
        let Some(notify) = self.callers.get(&caller).and_then(|e| {
            e.waiters
                .iter()
                .find(|(s, _)| *s == seq)
                .map(|w| w.1.clone())
        }) else {
            return Err(QueueRefusal::CallerTimeout);
        };
        loop {
            // `notify_one` stores a permit, so a wake-up between this check and the await
            // below is not lost.
            let granted = {
                let mut entry = self.callers.entry(caller).or_default();
                let front = entry.waiters.front().map(|w| w.0);
                if entry.in_flight < self.settings.user_limit && front == Some(seq) {
                    entry.in_flight += 1;
                    entry.waiters.pop_front();
                    if entry.in_flight < self.settings.user_limit {
                        if let Some(next) = entry.waiters.front() {
                            next.1.notify_one();
                        }
                    }
                    true
                } else {
                    false
                }
            };
            if granted {
                guard.active = false;
                self.leave_callers(family);
                return Ok(());
            }
            tokio::select! {
                _ = notify.notified() => {}
                _ = tokio::time::sleep_until(deadline) => return Err(QueueRefusal::CallerTimeout),
            }
        }
    }

    fn leave_callers(&self, family: &str) {
        let mut families = self.families();
        if let Some(state) = families.get_mut(family) {
            state.caller_waiting = state.caller_waiting.saturating_sub(1);
        }
    }

    /// Gives a slot of `caller` back and hands the turn to its next waiter.
    fn release_slot(&self, caller: Caller) {
        // One lookup, under the shard's lock: the entry goes when this was its last slot.
        self.callers.remove_if_mut(&caller, |_, entry| {
            entry.in_flight = entry.in_flight.saturating_sub(1);
            if let Some(next) = entry.waiters.front() {
                next.1.notify_one();
            }
            entry.in_flight == 0 && entry.waiters.is_empty()
        });
    }

    /// Waits until the request at `seq` (already in the family's queue) may go: a key of the
    /// family is free and it is the head (then it goes alone as the probe), or the last probe
    /// was answered (then the queue follows in order). Returns whether it goes as the probe.
    async fn key_turn(
        &self,
        pool: &KeyPool,
        family: &str,
        eligible: Option<&[usize]>,
        seq: u64,
        deadline: Instant,
    ) -> Result<bool, QueueRefusal> {
        let mut guard = KeyWaiter {
            queue: self,
            family,
            seq,
            active: true,
        };
        let notify = Self::family_entry(&mut self.families(), family)
            .notify
            .clone();
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let changed = pool.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let available =
                pool.available(Some(family), |i| eligible.is_none_or(|s| s.contains(&i)));
            let rest = {
                let mut families = self.families();
                let state = Self::family_entry(&mut families, family);
                match available {
                    Err(NoKey::AllResting(d)) => {
                        state.open = false;
                        Some(d)
                    }
                    // No key can ever serve it (revoked, over quota while it waited): it goes,
                    // and the send phase answers with the usual error.
                    Err(_) => {
                        guard.go(&mut families, false);
                        return Ok(false);
                    }
                    Ok(()) => {
                        let head = state.waiters.front().map(|w| w.0) == Some(seq);
                        let now = Instant::now();
                        if let Some((_, sent)) = state.probe {
                            if now.duration_since(sent) >= PROBE_GRACE {
                                // No 429 in time: the upstream took it.
                                state.probe = None;
                                state.open = true;
                            }
                        }
                        if state.open {
                            guard.go(&mut families, false);
                            return Ok(false);
                        }
                        match state.probe {
                            None if head => {
                                state.probe = Some((seq, now));
                                guard.go(&mut families, true);
                                return Ok(true);
                            }
                            // Look again when the probe's grace ends.
                            Some((_, sent)) => Some((sent + PROBE_GRACE).duration_since(now)),
                            None => None,
                        }
                    }
                }
            };
            // The earliest rest end (or the probe's grace end): a key may be free then.
            let rest_end = rest.map(|d| Instant::now() + d + Duration::from_millis(1));
            tokio::select! {
                _ = &mut notified => {}
                _ = &mut changed => {}
                _ = sleep_until_opt(rest_end) => {}
                _ = tokio::time::sleep_until(deadline) => {
                    let retry_after = rest.map_or(1, |d| d.as_secs() + 1);
                    return Err(QueueRefusal::KeyTimeout { family: family.to_string(), retry_after });
                }
            }
        }
    }

    /// A probe was answered: with a 429 the queue stays closed (the key rests again), with
    /// anything else the waiters follow in order.
    fn report_probe(&self, family: &str, seq: u64, rate_limited: Option<bool>) {
        let mut families = self.families();
        let Some(state) = families.get_mut(family) else {
            return;
        };
        if state.probe.map(|p| p.0) != Some(seq) {
            return;
        }
        state.probe = None;
        // Unknown (the probe failed before an answer): the next head probes again.
        state.open = rate_limited == Some(false) && !state.waiters.is_empty();
        state.notify.notify_waiters();
    }

    /// Requests of `family` waiting now (for a key or for their caller's turn).
    pub fn queued(&self, family: &str) -> usize {
        self.families().get(family).map_or(0, FamilyState::queued)
    }

    /// Every family that has had a queue since the start, with how many requests wait in it
    /// now (for `/metrics`, read at scrape time: nothing on the request path keeps a gauge).
    pub fn lengths(&self) -> Vec<(Box<str>, usize)> {
        self.families()
            .iter()
            .map(|(f, state)| (f.clone(), state.queued()))
            .collect()
    }

    /// The estimated wait of `family` in milliseconds: the moving average of recent waits,
    /// averaged with the longest current wait while requests wait (as the original).
    pub fn estimated_wait_ms(&self, family: &str) -> u64 {
        let now = Instant::now();
        let families = self.families();
        let Some(state) = families.get(family) else {
            return 0;
        };
        let recent = match state.last_wait_end {
            Some(end) if now.duration_since(end) < WAIT_MEMORY => state.avg_wait_ms,
            _ => 0.0,
        };
        let longest = state
            .waiters
            .iter()
            .map(|(_, since)| now.duration_since(*since).as_secs_f64() * 1000.0)
            .fold(0.0, f64::max);
        let ms = if state.waiters.is_empty() {
            recent
        } else {
            (recent + longest) / 2.0
        };
        ms.max(0.0) as u64
    }

    /// The estimate as the original's info page shows it (`estimatedQueueTime`).
    pub fn estimated_wait_text(&self, family: &str) -> String {
        format_wait(self.estimated_wait_ms(family))
    }
}

/// Formats a wait as the original's info page: `no wait` up to 2 s, `12sec` under a minute,
/// else `3min, 5sec` (whole minutes; the original rounds the minutes, which shows 90 s as
/// `2min, 30sec`).
pub fn format_wait(ms: u64) -> String {
    if ms <= 2000 {
        return "no wait".to_string();
    }
    if ms < 60_000 {
        return format!("{}sec", (ms + 500) / 1000);
    }
    format!("{}min, {}sec", ms / 60_000, (ms % 60_000 + 500) / 1000)
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Removes a caller-stage waiter that leaves without its turn (timeout, client gone).
struct CallerWaiter<'a> {
    queue: &'a FairQueue,
    caller: Caller,
    seq: u64,
    family: &'a str,
    active: bool,
}

impl Drop for CallerWaiter<'_> {
    fn drop(&mut self) {
        if !self.active {
            return;
        }
        let q = self.queue;
        let empty = match q.callers.get_mut(&self.caller) {
            Some(mut entry) => {
                if let Some(at) = entry.waiters.iter().position(|w| w.0 == self.seq) {
                    entry.waiters.remove(at);
                    if at == 0 && entry.in_flight < q.settings.user_limit {
                        if let Some(next) = entry.waiters.front() {
                            next.1.notify_one();
                        }
                    }
                }
                entry.in_flight == 0 && entry.waiters.is_empty()
            }
            None => false,
        };
        if empty {
            q.callers.remove_if(&self.caller, |_, s| {
                s.in_flight == 0 && s.waiters.is_empty()
            });
        }
        q.leave_callers(self.family);
    }
}

/// Removes a key-stage waiter that leaves without its turn; records the wait of one that goes.
struct KeyWaiter<'a> {
    queue: &'a FairQueue,
    family: &'a str,
    seq: u64,
    active: bool,
}

impl KeyWaiter<'_> {
    /// The request goes: out of the queue, its wait counted.
    fn go(&mut self, families: &mut HashMap<Box<str>, FamilyState>, probe: bool) {
        self.active = false;
        let now = Instant::now();
        let since = families
            .get(self.family)
            .and_then(|s| s.waiters.iter().find(|w| w.0 == self.seq).map(|w| w.1));
        FairQueue::unregister_key_locked(families, &self.queue.key_waiting, self.family, self.seq);
        let Some(state) = families.get_mut(self.family) else {
            return;
        };
        if !probe && state.open {
            // The head left: the next one follows.
            state.notify.notify_waiters();
        }
        if let Some(since) = since {
            let waited = now.duration_since(since);
            let ms = waited.as_secs_f64() * 1000.0;
            state.avg_wait_ms = match state.last_wait_end {
                Some(end) if now.duration_since(end) < WAIT_MEMORY => {
                    WAIT_AVERAGE_ALPHA * ms + (1.0 - WAIT_AVERAGE_ALPHA) * state.avg_wait_ms
                }
                _ => ms,
            };
            state.last_wait_end = Some(now);
            crate::metrics::queue_waited(self.family, waited);
        }
    }
}

impl Drop for KeyWaiter<'_> {
    fn drop(&mut self) {
        if self.active {
            // It gave up (timeout, client gone): its wait counts in the histogram too.
            let since = self.queue.families().get(self.family).and_then(|s| {
                s.waiters
                    .iter()
                    .find(|w| w.0 == self.seq)
                    .map(|w| w.1.elapsed())
            });
            if let Some(waited) = since {
                crate::metrics::queue_waited(self.family, waited);
            }
            let mut families = self.queue.families();
            FairQueue::unregister_key_locked(
                &mut families,
                &self.queue.key_waiting,
                self.family,
                self.seq,
            );
        }
    }
}

/// A request's passage through the queue, held until its response ends: the caller's slot
/// (released on drop), its place for a return to the queue after a 429, and the probe it may
/// be. Held by the response body, so a slot is freed when the stream ends or the client leaves.
pub struct Turn {
    queue: Option<Arc<FairQueue>>,
    caller: Option<Caller>,
    /// The request's position in the queues (kept when it comes back after a 429).
    seq: Option<u64>,
    /// The family whose queue waits for this request's answer (it was sent alone).
    probe: Option<Box<str>>,
    /// The end of its waiting budget (`QUEUE_TIMEOUT_SECS` from its first wait).
    deadline: Option<Instant>,
    /// A stream whose response head is not sent yet: it must not wait silently (its client
    /// would see nothing), so it waits in a [`waiting_stream`] instead ([`Turn::requeue_stream`]).
    head_pending: bool,
}

impl Turn {
    /// A turn outside the queue (requests without a model family).
    pub fn outside() -> Turn {
        Turn {
            queue: None,
            caller: None,
            seq: None,
            probe: None,
            deadline: None,
            head_pending: false,
        }
    }

    /// The upstream answered the request with `status`: tells the queue whether a probe got
    /// through. A few instructions when this request is not a probe.
    pub fn answered(&mut self, status: StatusCode) {
        if let (Some(family), Some(queue), Some(seq)) = (self.probe.take(), &self.queue, self.seq) {
            queue.report_probe(&family, seq, Some(status == StatusCode::TOO_MANY_REQUESTS));
        }
    }

    /// Marks the turn of a stream whose head is not sent yet (`stream`): such a request does
    /// not wait inside the send phase, see [`Turn::requeue_stream`].
    pub fn stream_head_pending(mut self, stream: bool) -> Turn {
        self.head_pending = stream;
        self
    }

    /// Whether this request may wait for a key right where it is ([`Turn::wait_for_key`]): it
    /// is a generation request of a model family, and not a stream without its head.
    pub fn may_wait(&self, family: Option<&str>) -> bool {
        self.queue.is_some() && family.is_some() && !self.head_pending
    }

    /// A stream without its head got a 429 (`status`) and now every key of its family rests:
    /// true when it should wait in the queue inside a [`waiting_stream`] (then call
    /// [`Turn::wait_for_key`] there) instead of relaying the 429.
    pub fn requeue_stream(
        &mut self,
        status: StatusCode,
        pool: &KeyPool,
        family: Option<&str>,
        eligible: Option<&[usize]>,
    ) -> bool {
        if !self.head_pending
            || status != StatusCode::TOO_MANY_REQUESTS
            || self.queue.is_none()
            || family.is_none()
        {
            return false;
        }
        let resting = matches!(
            pool.available(family, |i| eligible.is_none_or(|s| s.contains(&i))),
            Err(NoKey::AllResting(_))
        );
        if resting {
            self.head_pending = false;
        }
        resting
    }

    /// Every key of `family` rests (a 429 just rested the last one): waits in the family's
    /// queue, keeping this request's place, until a key is free again. Fails with the 503 the
    /// client gets when `QUEUE_TIMEOUT_SECS` (counted from its first wait) runs out. Call it
    /// only when [`Turn::may_wait`].
    pub async fn wait_for_key(
        &mut self,
        pool: &KeyPool,
        family: Option<&str>,
        eligible: Option<&[usize]>,
    ) -> Result<(), ProxyError> {
        let settings = self
            .queue
            .as_ref()
            .map_or_else(QueueSettings::default, |q| q.settings);
        let (Some(queue), Some(family)) = (self.queue.clone(), family) else {
            return Err(QueueRefusal::KeyTimeout {
                family: family.unwrap_or("-").to_string(),
                retry_after: 1,
            }
            .into_error(settings, pool.var()));
        };
        if let Some(probe) = self.probe.take() {
            // Answered by now (a 429); make sure the queue does not wait for it.
            if let Some(seq) = self.seq {
                queue.report_probe(&probe, seq, Some(true));
            }
        }
        let seq = *self.seq.get_or_insert_with(|| queue.next_seq());
        let deadline = *self
            .deadline
            .get_or_insert_with(|| Instant::now() + settings.timeout);
        FairQueue::register_key_locked(
            &mut queue.families(),
            &queue.key_waiting,
            family,
            seq,
            Instant::now(),
        );
        match queue.key_turn(pool, family, eligible, seq, deadline).await {
            Ok(probe) => {
                if probe {
                    self.probe = Some(family.into());
                }
                Ok(())
            }
            Err(e) => Err(e.into_error(settings, pool.var())),
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let Some(queue) = &self.queue else {
            return;
        };
        if let (Some(family), Some(seq)) = (self.probe.take(), self.seq) {
            queue.report_probe(&family, seq, None);
        }
        if let Some(caller) = self.caller.take() {
            queue.release_slot(caller);
        }
    }
}

/// A request that must wait (it already holds its place); [`Waiting::turn`] waits.
pub struct Waiting {
    turn: Turn,
    /// The caller's queue entry, while it waits for a slot.
    pending_caller: Option<(Caller, u64)>,
    family: Box<str>,
    eligible: Option<Vec<usize>>,
    /// How many requests of the family waited when it joined (itself included).
    position: usize,
    /// Whether it is in the family's key queue already.
    registered: bool,
}

impl Waiting {
    /// How many requests of the family waited when this one joined (itself included).
    pub fn position(&self) -> usize {
        self.position
    }

    /// Waits for the caller's turn, then for a free key of the family, within
    /// `QUEUE_TIMEOUT_SECS`. Dropping the future leaves both queues at once.
    pub async fn turn(mut self, pool: &KeyPool) -> Result<Turn, QueueRefusal> {
        let Some(queue) = self.turn.queue.clone() else {
            return Ok(std::mem::replace(&mut self.turn, Turn::outside()));
        };
        let deadline = Instant::now() + queue.settings.timeout;
        self.turn.deadline = Some(deadline);
        let family = &*self.family;
        if let Some((caller, seq)) = self.pending_caller.take() {
            queue.caller_turn(caller, seq, family, deadline).await?;
            self.turn.caller = Some(caller);
            // With its turn, the request stands in the family's queue behind those already
            // there, or goes at once when a key is free and nobody waits.
            let eligible = self.eligible.as_deref();
            let mut families = queue.families();
            let queue_empty = families
                .get(family)
                .is_none_or(|s| s.waiters.is_empty() && s.probe.is_none());
            let free = pool
                .available(Some(family), |i| eligible.is_none_or(|s| s.contains(&i)))
                .is_ok();
            if queue_empty && free {
                return Ok(std::mem::replace(&mut self.turn, Turn::outside()));
            }
            let seq = queue.next_seq();
            self.turn.seq = Some(seq);
            FairQueue::register_key_locked(
                &mut families,
                &queue.key_waiting,
                family,
                seq,
                Instant::now(),
            );
            self.registered = true;
        }
        let (Some(seq), true) = (self.turn.seq, self.registered) else {
            return Ok(std::mem::replace(&mut self.turn, Turn::outside()));
        };
        // The key waiter's guard takes over the registration from here.
        self.registered = false;
        let probe = queue
            .key_turn(pool, family, self.eligible.as_deref(), seq, deadline)
            .await?;
        if probe {
            self.turn.probe = Some(self.family.clone());
        }
        Ok(std::mem::replace(&mut self.turn, Turn::outside()))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        // Left before `turn` ran (the client went away early): give the places back.
        let Some(queue) = self.turn.queue.clone() else {
            return;
        };
        if let Some((caller, seq)) = self.pending_caller.take() {
            drop(CallerWaiter {
                queue: &queue,
                caller,
                seq,
                family: &self.family,
                active: true,
            });
        }
        if self.registered {
            if let Some(seq) = self.turn.seq {
                let mut families = queue.families();
                FairQueue::unregister_key_locked(
                    &mut families,
                    &queue.key_waiting,
                    &self.family,
                    seq,
                );
            }
        }
    }
}

impl QueueRefusal {
    /// The client's answer: 503 with `Retry-After` and what to do.
    pub fn into_error(self, settings: QueueSettings, var: &str) -> ProxyError {
        let timeout = settings.timeout.as_secs();
        match self {
            QueueRefusal::KeyTimeout {
                family,
                retry_after,
            } => ProxyError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "queue_timeout",
                format!(
                    "Every {var} key that serves '{family}' is rate-limited by the upstream, and this request waited in the proxy's queue for QUEUE_TIMEOUT_SECS={timeout} s without a free key; try again in {retry_after} s, or use another model family."
                ),
            )
            .with_retry_after(retry_after.max(1)),
            QueueRefusal::CallerTimeout => ProxyError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "queue_timeout",
                format!(
                    "Your other requests were still in progress for QUEUE_TIMEOUT_SECS={timeout} s (this proxy serves at most USER_CONCURRENCY_LIMIT={} at a time per user token or address); wait for them to finish before you send more.",
                    settings.user_limit
                ),
            )
            .with_retry_after(settings.heartbeat.as_secs().max(1)),
        }
    }
}

/// How a waiting stream reports an error once its `200 text/event-stream` head is sent: the
/// error event of the format the client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SseErrorFormat {
    /// Anthropic Messages: `event: error` with `{"type":"error","error":{…}}`.
    Anthropic,
    /// OpenAI-style and Gemini clients: a `data:` line with the `{"error":{…}}` object.
    Data,
}

/// The SSE comment a waiting stream gets every `HEARTBEAT_INTERVAL_SEC` (the original's
/// text, without its padding).
pub const HEARTBEAT: &[u8] = b": queue heartbeat\n\n";

/// The answer to a streaming request that must wait: the `200 text/event-stream` head now,
/// then a comment with its place, heartbeats while `run` (the wait and the upstream request)
/// is pending, then the upstream's stream — or, when `run` ends in an error response, that
/// error as one SSE error event. Dropping the body (the client left) drops `run`, which
/// leaves the queue.
pub fn waiting_stream(
    run: impl Future<Output = Reply> + Send + 'static,
    format: SseErrorFormat,
    heartbeat: Duration,
    position: usize,
) -> Reply {
    let body = QueuedStream {
        run: Some(Box::pin(run)),
        state: StreamState::Joining(position),
        heartbeat,
        timer: Box::pin(tokio::time::sleep(heartbeat)),
        format,
    };
    let mut h = Fields::with_capacity(3);
    h.append(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.append(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.append(X_ACCEL_BUFFERING, HeaderValue::from_static("no"));
    Reply::new(StatusCode::OK, h, Body::new(body))
}

/// Asks a buffering reverse proxy in front of us (nginx) to pass a stream's events through.
pub const X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The most of an error body kept for the error event.
const ERROR_BODY_LIMIT: usize = 64 * 1024;

enum StreamState {
    /// The first comment is still to be sent.
    Joining(usize),
    /// Waiting (heartbeats).
    Waiting,
    /// The upstream's stream is relayed.
    Relaying(Body),
    /// An error response is read, to be sent as one event.
    Failing(StatusCode, Body, BytesMut),
    Done,
}

struct QueuedStream {
    run: Option<Pin<Box<dyn Future<Output = Reply> + Send>>>,
    state: StreamState,
    heartbeat: Duration,
    timer: Pin<Box<Sleep>>,
    format: SseErrorFormat,
}

impl http_body::Body for QueuedStream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                StreamState::Joining(position) => {
                    let text = format!(": joining queue at position {position}\n\n");
                    this.state = StreamState::Waiting;
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(text)))));
                }
                StreamState::Waiting => {
                    let Some(run) = this.run.as_mut() else {
                        this.state = StreamState::Done;
                        continue;
                    };
                    if let Poll::Ready(resp) = run.as_mut().poll(cx) {
                        this.run = None;
                        let Reply { status, body, .. } = resp;
                        this.state = if status.is_success() {
                            StreamState::Relaying(body)
                        } else {
                            StreamState::Failing(status, body, BytesMut::new())
                        };
                        continue;
                    }
                    if this.timer.as_mut().poll(cx).is_ready() {
                        let next = Instant::now() + this.heartbeat;
                        this.timer.as_mut().reset(next);
                        // Registers the timer's waker for the next heartbeat.
                        let _ = this.timer.as_mut().poll(cx);
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(HEARTBEAT)))));
                    }
                    return Poll::Pending;
                }
                StreamState::Relaying(body) => {
                    return match Pin::new(body).poll_frame(cx) {
                        Poll::Ready(None) => {
                            this.state = StreamState::Done;
                            Poll::Ready(None)
                        }
                        Poll::Ready(Some(Err(e))) => {
                            this.state = StreamState::Done;
                            Poll::Ready(Some(Err(Box::new(e))))
                        }
                        other => other.map(|f| f.map(|r| r.map_err(|e| Box::new(e) as BoxError))),
                    };
                }
                StreamState::Failing(status, body, buf) => match Pin::new(body).poll_frame(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data() {
                            let room = ERROR_BODY_LIMIT.saturating_sub(buf.len());
                            buf.extend_from_slice(&data[..data.len().min(room)]);
                        }
                        continue;
                    }
                    Poll::Ready(Some(Err(_))) | Poll::Ready(None) => {
                        let event = error_event(this.format, *status, buf);
                        this.state = StreamState::Done;
                        return Poll::Ready(Some(Ok(Frame::data(event))));
                    }
                },
                StreamState::Done => return Poll::Ready(None),
            }
        }
    }
}

/// One SSE error event from an error response's body: the body itself when it is a JSON
/// object with an `error` (ours, and OpenAI's and Anthropic's), else a wrapper that says which
/// status the upstream answered.
fn error_event(format: SseErrorFormat, status: StatusCode, body: &[u8]) -> Bytes {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body)
        .ok()
        .filter(|v: &serde_json::Value| v.get("error").is_some());
    let value = parsed.unwrap_or_else(|| {
        let text = String::from_utf8_lossy(body);
        let text: String = text.chars().take(500).collect();
        serde_json::json!({
            "type": "error",
            "error": {
                "type": "upstream_error",
                "message": format!("The upstream answered HTTP {}: {}", status.as_u16(), text.trim()),
            }
        })
    });
    let data = value.to_string();
    match format {
        SseErrorFormat::Anthropic => Bytes::from(format!("event: error\ndata: {data}\n\n")),
        SseErrorFormat::Data => Bytes::from(format!("data: {data}\n\n")),
    }
}

/// The quota ticket of a request that waits: if the request never leaves the queue (timeout,
/// client gone), nothing was sent upstream, so its reservation is released without a charge
/// (a ticket dropped unfinished would charge the prompt as a request cut short).
pub struct Unsent(pub Option<Ticket>);

impl Unsent {
    /// The ticket, for the request that now gets its turn.
    pub fn take(mut self) -> Option<Ticket> {
        self.0.take()
    }
}

impl Drop for Unsent {
    fn drop(&mut self) {
        if let Some(mut t) = self.0.take() {
            t.on_response_start(StatusCode::SERVICE_UNAVAILABLE, false);
            t.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use crate::proxy::keys::{CheckResult, KeyStatus};

    /// Users and addresses hash apart and steadily; an address's hash depends on the table's
    /// random key (SipHash), not only on the address.
    #[test]
    fn callers_hash_by_kind() {
        use std::hash::BuildHasher;
        let (a, b) = (CallerHashState::default(), CallerHashState::default());
        let user = Caller::User(0x1234_5678_9abc_def0);
        assert_eq!(a.hash_one(user), a.hash_one(user));
        assert_eq!(a.hash_one(user), b.hash_one(user));
        assert_ne!(
            a.hash_one(user),
            a.hash_one(Caller::User(0x1234_5678_9abc_def1))
        );
        let addrs: Vec<Caller> = (0..64u16)
            .map(|i| Caller::Addr(IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, i])))
            .collect();
        assert!(addrs.iter().all(|c| a.hash_one(c) == a.hash_one(c)));
        assert!(addrs.iter().any(|c| a.hash_one(c) != b.hash_one(c)));
        let q = FairQueue::new(QueueSettings::default());
        for c in addrs.iter().chain([&user]) {
            q.callers.entry(*c).or_default().in_flight += 1;
        }
        assert_eq!(q.callers.len(), 65);
        assert_eq!(q.callers.get(&user).map(|s| s.in_flight), Some(1));
    }

    fn pool() -> KeyPool {
        KeyPool::new("OPENAI_KEY", &[Secret::new("sk-1")], true).expect("pool")
    }

    fn user(token: &str) -> Principal {
        Principal::User {
            token: token.into(),
            kind: UserType::Normal,
            key: None,
        }
    }

    fn queue(limit: u32) -> Arc<FairQueue> {
        Arc::new(FairQueue::new(QueueSettings {
            user_limit: limit,
            ..QueueSettings::default()
        }))
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn go(e: Enter) -> Turn {
        match e {
            Enter::Go(t) => t,
            Enter::Wait(_) => panic!("expected to go at once"),
        }
    }

    fn wait(e: Enter) -> Waiting {
        match e {
            Enter::Go(_) => panic!("expected to wait"),
            Enter::Wait(w) => w,
        }
    }

    /// Whether a future is still pending after being polled until it cannot progress.
    async fn pending<F: Future + Unpin>(f: &mut F) -> bool {
        futures::poll!(f).is_pending()
    }

    #[test]
    fn waits_are_shown_as_the_original_does() {
        assert_eq!(format_wait(0), "no wait");
        assert_eq!(format_wait(2000), "no wait");
        assert_eq!(format_wait(2600), "3sec");
        assert_eq!(format_wait(59_000), "59sec");
        assert_eq!(format_wait(90_000), "1min, 30sec");
        assert_eq!(format_wait(125_000), "2min, 5sec");
    }

    #[tokio::test]
    async fn free_capacity_leaves_no_trace() {
        let (q, p) = (queue(1), pool());
        for _ in 0..3 {
            let t = go(q.enter(&user("a"), IP, &p, Some("turbo"), None));
            assert_eq!(q.callers.len(), 1);
            drop(t);
        }
        // The fast path neither created a family queue nor kept the caller's entry.
        assert!(q.families().is_empty());
        assert!(q.callers.is_empty());
        // Requests without a family never touch the queue.
        let t = go(q.enter(&user("a"), IP, &p, None, None));
        assert!(t.queue.is_none() && q.callers.is_empty());
    }

    #[tokio::test]
    async fn a_callers_second_request_waits_for_the_first() {
        let (q, p) = (queue(1), pool());
        let first = go(q.enter(&user("a"), IP, &p, Some("turbo"), None));
        let second = wait(q.enter(&user("a"), IP, &p, Some("turbo"), None));
        assert_eq!(q.queued("turbo"), 1);
        // Another caller, an exempt one and another address go at once.
        drop(go(q.enter(&user("b"), IP, &p, Some("turbo"), None)));
        let special = Principal::User {
            token: "a".into(),
            kind: UserType::Special,
            key: None,
        };
        drop(go(q.enter(&special, IP, &p, Some("turbo"), None)));
        drop(go(q.enter(
            &Principal::Anonymous,
            IP,
            &p,
            Some("turbo"),
            None,
        )));
        let mut turn = Box::pin(second.turn(&p));
        assert!(pending(&mut turn).await);
        drop(first);
        let t = turn.await.expect("its turn");
        assert_eq!(q.queued("turbo"), 0);
        drop(t);
        assert!(q.callers.is_empty());
    }

    #[tokio::test]
    async fn a_waiter_that_leaves_gives_its_place_back() {
        let (q, p) = (queue(1), pool());
        let first = go(q.enter(&user("a"), IP, &p, Some("turbo"), None));
        let second = wait(q.enter(&user("a"), IP, &p, Some("turbo"), None));
        let third = wait(q.enter(&user("a"), IP, &p, Some("turbo"), None));
        assert_eq!(q.queued("turbo"), 2);
        let mut second = Box::pin(second.turn(&p));
        assert!(pending(&mut second).await);
        drop(second);
        drop(first);
        // The third is next now, without waiting for the one that left.
        let t = third.turn(&p).await.expect("turn");
        assert_eq!(q.queued("turbo"), 0);
        drop(t);
        assert!(q.callers.is_empty());
        // Leaving before ever being polled cleans up too.
        let t = go(q.enter(&user("a"), IP, &p, Some("turbo"), None));
        drop(wait(q.enter(&user("a"), IP, &p, Some("turbo"), None)));
        assert_eq!(q.queued("turbo"), 0);
        drop(t);
        assert!(q.callers.is_empty());
    }

    #[tokio::test]
    async fn when_the_key_rests_the_head_probes_alone_then_the_rest_follow() {
        let (q, p) = (queue(0), pool());
        p.rest(0, Duration::from_secs(60));
        let a = wait(q.enter(&user("a"), IP, &p, Some("turbo"), None));
        let b = wait(q.enter(&user("b"), IP, &p, Some("turbo"), None));
        assert_eq!((a.position(), b.position()), (1, 2));
        let mut a = Box::pin(a.turn(&p));
        let mut b = Box::pin(b.turn(&p));
        assert!(pending(&mut a).await && pending(&mut b).await);
        // A check shows the key works: the head goes alone.
        p.apply_check(0, CheckResult::status(KeyStatus::Working));
        let mut probe = a.await.expect("head goes");
        assert!(probe.probe.is_some());
        assert!(
            pending(&mut b).await,
            "the next waits for the probe's answer"
        );
        // Another family is not held up.
        drop(go(q.enter(&user("c"), IP, &p, Some("gpt4"), None)));
        probe.answered(StatusCode::OK);
        let t = b.await.expect("follows");
        assert!(t.probe.is_none());
        assert_eq!(q.queued("turbo"), 0);
        assert!(q.estimated_wait_ms("turbo") < 60_000);
    }

    #[tokio::test]
    async fn a_probe_answered_429_keeps_the_queue_closed() {
        let (q, p) = (queue(0), pool());
        p.rest(0, Duration::from_secs(60));
        let a = wait(q.enter(&user("a"), IP, &p, Some("turbo"), None));
        let b = wait(q.enter(&user("b"), IP, &p, Some("turbo"), None));
        let mut b = Box::pin(b.turn(&p));
        p.apply_check(0, CheckResult::status(KeyStatus::Working));
        let mut probe = a.turn(&p).await.expect("head goes");
        assert!(pending(&mut b).await);
        // The upstream says 429 again: the key rests, the probe goes back to the head.
        p.rest(0, Duration::from_secs(60));
        probe.answered(StatusCode::TOO_MANY_REQUESTS);
        assert!(pending(&mut b).await);
        let mut again = Box::pin(probe.wait_for_key(&p, Some("turbo"), None));
        assert!(pending(&mut again).await);
        assert_eq!(q.queued("turbo"), 2);
        p.apply_check(0, CheckResult::status(KeyStatus::Working));
        again.await.expect("the old head probes again first");
        assert!(pending(&mut b).await);
    }

    #[tokio::test]
    async fn a_probe_without_an_answer_lets_the_others_follow_after_its_grace() {
        let (q, p) = (queue(0), pool());
        p.rest(0, Duration::from_secs(60));
        let a = wait(q.enter(&user("a"), IP, &p, Some("turbo"), None));
        let b = wait(q.enter(&user("b"), IP, &p, Some("turbo"), None));
        let mut b = Box::pin(b.turn(&p));
        p.apply_check(0, CheckResult::status(KeyStatus::Working));
        // The probe's upstream is still generating (no answer yet).
        let _probe = a.turn(&p).await.expect("head goes");
        assert!(pending(&mut b).await);
        let t = b.await.expect("follows once the grace is over");
        assert!(t.probe.is_none());
    }

    #[tokio::test]
    async fn a_request_waits_at_most_the_queue_timeout() {
        let q = Arc::new(FairQueue::new(QueueSettings {
            timeout: Duration::from_millis(20),
            ..QueueSettings::default()
        }));
        let p = pool();
        p.rest(0, Duration::from_secs(60));
        let w = wait(q.enter(&user("a"), IP, &p, Some("turbo"), None));
        match w.turn(&p).await {
            Err(QueueRefusal::KeyTimeout { retry_after, .. }) => assert!(retry_after >= 59),
            other => panic!("expected a timeout, got {:?}", other.err()),
        }
        assert_eq!(q.queued("turbo"), 0);
        assert!(q.callers.is_empty());
    }

    #[tokio::test]
    async fn keys_that_can_never_serve_do_not_make_requests_wait() {
        let (q, p) = (queue(1), pool());
        p.mark_over_quota(0, "insufficient_quota");
        drop(go(q.enter(&user("a"), IP, &p, Some("turbo"), None)));
        p.mark_invalid(0, 401);
        drop(go(q.enter(&user("a"), IP, &p, Some("turbo"), None)));
    }

    #[test]
    fn error_events_keep_the_clients_format() {
        let ours = br#"{"type":"error","error":{"message":"m","type":"t"}}"#;
        let e = error_event(
            SseErrorFormat::Anthropic,
            StatusCode::SERVICE_UNAVAILABLE,
            ours,
        );
        assert_eq!(
            &e[..],
            b"event: error\ndata: {\"type\":\"error\",\"error\":{\"message\":\"m\",\"type\":\"t\"}}\n\n"
        );
        let e = error_event(SseErrorFormat::Data, StatusCode::BAD_GATEWAY, b"<html>oops");
        let text = std::str::from_utf8(&e).expect("utf8");
        assert!(text.starts_with("data: {"), "{text}");
        assert!(text.contains("HTTP 502: <html>oops"), "{text}");
    }
}
