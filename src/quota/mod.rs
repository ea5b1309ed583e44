//! Quotas and accounting: per-user token quotas with atomic reservations, settling to the
//! usage the provider layer read from upstream responses, quota refresh, and the prompt rate
//! limit. Works only on provider-neutral facts ([`RequestFacts`], [`Meter`], [`Usage`]): it
//! never parses a provider's JSON.
//!
//! The forwarder reads a request's facts through its provider, calls [`Quotas::admit`] for
//! every generation request before forwarding it, and feeds the response through the returned
//! [`Ticket`] (which holds the provider's [`Meter`]); dropping a ticket without
//! [`Ticket::finish`] (client disconnected) still charges what was seen, estimated where the
//! upstream did not report it. Knows nothing of HTTP beyond status codes and header maps.
//!
//! Admission is check-and-reserve in one step under the user's store entry lock
//! ([`UserStore::update_entry`]): a request is admitted only if
//! `tokenCounts[f] + reserved[f] + requested < tokenLimits[f]`, and its `requested` tokens are
//! reserved in the same step, so concurrent requests can never all pass one check. When the
//! response ends, the reservation is released and the real usage added to `tokenCounts[f]`.

pub mod estimate;
pub mod prices;
pub mod ratelimit;
pub mod refresh;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use chrono::{DateTime, Local};

use crate::auth::Principal;
use crate::config::{Config, ConfigError};
use crate::error::ProxyError;
use crate::providers::{Meter, RequestFacts, Usage};
use crate::users::model::TokenCounts;
use crate::users::{Token, UserKey, UserStore, UserType};

use self::ratelimit::{PromptLimiter, RateKey};
use self::refresh::Schedule;

/// The time source for quota refresh; tests drive it.
pub type Clock = Arc<dyn Fn() -> DateTime<Local> + Send + Sync>;

/// How often the background task wakes at most (to forget idle rate-limit keys and to notice
/// a changed wall clock).
const HOUSEKEEPING: Duration = Duration::from_secs(60);

pub struct Quotas {
    users: Arc<UserStore>,
    /// `TOKEN_QUOTA_*` by family; only non-zero quotas are refreshed.
    quotas: BTreeMap<String, u64>,
    schedule: Option<Schedule>,
    next_refresh: Mutex<Option<DateTime<Local>>>,
    limiter: Option<PromptLimiter>,
    clock: Clock,
}

/// What the forwarder knows about a request when it asks for admission.
pub struct AdmitRequest<'a> {
    pub principal: &'a Principal,
    pub ip: IpAddr,
    /// A generation request (counted, rate-limited); other requests pass without a ticket
    /// that charges anyone.
    pub generation: bool,
}

/// An admitted request.
pub struct Admitted {
    /// Headers to add to the client's response (rate-limit headers).
    pub headers: HeaderMap,
    pub ticket: Ticket,
    /// The output cap (per choice) the forwarder must write into the provider's own field:
    /// set when the client gave none, or a larger one than the user has left after the prompt.
    pub output_cap: Option<u64>,
}

/// Observes one response and settles the request's reservation when it ends.
pub struct Ticket {
    /// The provider's meter, set by the forwarder ([`Ticket::observe_with`]) for tickets that
    /// charge a user.
    ///
    /// Boxed: the meter is about 220 bytes, and the ticket moves with the request through
    /// admission, the queue and the relay (each move a copy of the whole ticket).
    meter: Option<Box<Meter>>,
    /// `None` for requests with no user to charge, and once settled.
    settlement: Option<Settlement>,
}

/// What settling a user's request needs.
struct Settlement {
    users: Arc<UserStore>,
    key: UserKey,
    /// The principal's token (inline: a copy costs no allocation).
    token: Token,
    family: &'static str,
    reserved: u64,
    prompt: PromptEstimate,
}

/// The prompt's estimated tokens, charged only when the upstream does not report them, and so
/// counted only then.
enum PromptEstimate {
    Counted(u64),
    Uncounted { text: String, fixed: u64 },
}

impl PromptEstimate {
    fn tokens(&mut self) -> u64 {
        match self {
            PromptEstimate::Counted(n) => *n,
            PromptEstimate::Uncounted { text, fixed } => {
                let n = estimate::count_tokens(text).saturating_add(*fixed);
                *self = PromptEstimate::Counted(n);
                n
            }
        }
    }
}

/// How much room a user must have left, in multiples of a request's upper bound, for admission
/// to reserve that bound instead of tokenizing the prompt. Near the limit every prompt is
/// tokenized, so the last requests that fit are admitted on their real size; the bounds that
/// requests admitted earlier still hold can only make admission stricter, never looser.
const BOUND_HEADROOM: u64 = 8;

/// The fewest output tokens worth sending a request for: when a user has less than this left
/// after the prompt, the request is refused (429) rather than capped to a useless answer.
pub const MIN_OUTPUT_TOKENS: u64 = 16;

impl Ticket {
    /// A ticket that observes nothing and charges nobody.
    fn passthrough() -> Ticket {
        Ticket {
            meter: None,
            settlement: None,
        }
    }

    /// Whether this ticket charges a user (and so needs a meter).
    pub fn charges(&self) -> bool {
        self.settlement.is_some()
    }

    /// Gives the ticket the provider's meter for the response.
    pub fn observe_with(&mut self, meter: Meter) {
        if self.settlement.is_some() {
            self.meter = Some(Box::new(meter));
        }
    }

    /// Called once with the upstream's status and whether the body is an SSE stream.
    pub fn on_response_start(&mut self, status: StatusCode, is_sse: bool) {
        if let Some(m) = self.meter.as_mut() {
            m.on_response_start(status.is_success(), is_sse);
        }
    }

    /// Called with every body chunk as it arrives; returns what the client should get
    /// (usually the chunk itself; a usage-only chunk the client did not ask for is removed).
    pub fn on_chunk(&mut self, chunk: Bytes) -> Bytes {
        match (&self.settlement, self.meter.as_mut()) {
            (Some(_), Some(m)) => m.on_chunk(chunk),
            _ => chunk,
        }
    }

    /// Called when the upstream body ended normally.
    pub fn finish(mut self) {
        self.settle(false);
    }

    /// The usage this ticket would charge now (for tests and logs).
    pub fn usage_so_far(&mut self) -> Option<Usage> {
        let meter = self.meter.as_ref()?;
        let needs = meter.needs_prompt_estimate();
        let s = self.settlement.as_mut()?;
        let prompt = if needs { s.prompt.tokens() } else { 0 };
        meter.usage(prompt, estimate::count_tokens)
    }

    /// Releases the reservation and charges the real (or, failing that, estimated) usage.
    /// `abandoned`: the ticket was dropped unfinished.
    fn settle(&mut self, abandoned: bool) {
        let Some(s) = self.settlement.take() else {
            return;
        };
        let Some(mut meter) = self.meter.take() else {
            // Admitted but never sent (the forwarder gave no meter): release the reservation.
            s.users.update_usage_at(s.key, &s.token, |e| {
                release(e, s.family, s.reserved);
                ((), false)
            });
            return;
        };
        meter.end();
        // An estimate may need the tokenizer. Its first load takes about 200 ms, and settling
        // runs on the server's worker thread, where every other request of the worker would
        // wait for it (measured: a 207 ms gap in the access log when the first client hung up
        // mid-request). Until it is loaded, such a settlement runs on the blocking pool; the
        // reservation holds until then, and a worker's runtime waits for it at shutdown.
        let may_estimate = !meter.exact() || (abandoned && !meter.started());
        if may_estimate && !estimate::tokenizer_loaded() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn_blocking(move || charge(s, meter, abandoned));
                return;
            }
        }
        charge(s, meter, abandoned);
    }
}

/// Releases a settled request's reservation and charges its real (or, failing that,
/// estimated) usage.
fn charge(mut s: Settlement, meter: Box<Meter>, abandoned: bool) {
    let usage = if abandoned && !meter.started() {
        // The client went away while the upstream was working on the request (before it
        // answered): the upstream got the prompt, so the prompt is charged.
        Some(Usage {
            prompt: s.prompt.tokens(),
            completion: 0,
        })
    } else {
        let prompt = if meter.needs_prompt_estimate() {
            s.prompt.tokens()
        } else {
            0
        };
        meter.usage(prompt, estimate::count_tokens)
    };
    let charge = usage.map(Usage::total).unwrap_or(0);
    // Where the response's model decides the family (Azure deployments), usage is counted
    // there; the reservation is released where it was made.
    let from_response = meter.response_family();
    let charged_family: &str = from_response.unwrap_or(s.family);
    if let Some(u) = usage {
        crate::metrics::tokens(charged_family, u.prompt, u.completion);
    }
    let found = s.users.update_usage_at(s.key, &s.token, |e| {
        release(e, s.family, s.reserved);
        if charge == 0 {
            return ((), false);
        }
        let count = e.user.token_counts.entry(charged_family).or_insert(0);
        *count = count.saturating_add(charge);
        ((), true)
    });
    if found.is_none() {
        tracing::debug!(family = %charged_family, "user deleted while its request ran; usage dropped");
    }
    tracing::debug!(
        family = %charged_family,
        prompt = usage.map(|u| u.prompt),
        completion = usage.map(|u| u.completion),
        exact = meter.exact(),
        "request settled"
    );
}

/// Releases `reserved` tokens of `family` held by a user's running request.
fn release(e: &mut crate::users::store::Entry, family: &str, reserved: u64) {
    // A count back at zero keeps its entry: the user's next request of the family adds to it
    // in place, where a removed one is inserted again (the family interned, the list shifted:
    // about 200 instructions a request, callgrind). At most one entry per family.
    if let Some(r) = e.reserved.get_mut(family) {
        *r = r.saturating_sub(reserved);
    }
}

impl Drop for Ticket {
    /// A ticket dropped before `finish` is a response cut short (usually the client went
    /// away): what was seen is still charged, estimated where the upstream did not report it.
    fn drop(&mut self) {
        self.settle(true);
    }
}

/// Why a request was refused for quota (numbers read under the entry lock).
struct Refusal {
    limit: u64,
    used: u64,
    reserved: u64,
    /// The output cap the request would have had (too small to be useful), when the proxy
    /// tried to cap it.
    capped: Option<u64>,
}

/// What one reservation attempt asks for.
#[derive(Clone, Copy)]
struct Want {
    /// The prompt's tokens (its bound or its count).
    prompt: u64,
    /// The client's output cap per choice, if any.
    max_output: Option<u64>,
    choices: u64,
    /// The request produces output whose cap the proxy may set.
    capped_output: bool,
    /// The most a response of this model can produce per choice (`families::max_output_tokens`).
    model_max: u64,
    /// `prompt` is the free upper bound, not a count (see [`BOUND_HEADROOM`]).
    is_bound: bool,
}

impl Want {
    /// The most output the request can produce as sent.
    fn natural_output(&self) -> u64 {
        if !self.capped_output {
            return 0;
        }
        self.max_output
            .unwrap_or(self.model_max)
            .saturating_mul(self.choices.max(1))
    }
}

/// The outcome of one reservation attempt under the entry lock.
enum Reservation {
    /// Reserved `requested` tokens; `cap` is the output cap per choice to set, if any.
    Reserved {
        requested: u64,
        cap: Option<u64>,
    },
    /// Not enough room for the upper bound: count the prompt and try again.
    NeedsCount,
    Refused(Refusal),
}

impl Quotas {
    pub fn from_config(config: &Config, users: Arc<UserStore>) -> Result<Quotas, ConfigError> {
        Quotas::with_clock(config, users, Arc::new(Local::now))
    }

    /// As [`Quotas::from_config`], with a time source tests can drive.
    pub fn with_clock(
        config: &Config,
        users: Arc<UserStore>,
        clock: Clock,
    ) -> Result<Quotas, ConfigError> {
        let schedule = Schedule::parse(&config.cli.quota_refresh_period)?;
        let next = schedule.as_ref().and_then(|s| s.next_after(clock()));
        Ok(Quotas {
            users,
            quotas: config.token_quotas.clone(),
            schedule,
            next_refresh: Mutex::new(next),
            limiter: PromptLimiter::new(config.cli.text_model_rate_limit),
            clock,
        })
    }

    /// The `tokenLimits` a newly created user gets (`TOKEN_QUOTA_*`, as in the original).
    pub fn initial_limits(&self) -> TokenCounts {
        self.quotas.iter().collect()
    }

    /// When quotas refresh next (`None`: never, `QUOTA_REFRESH_PERIOD` is empty).
    pub fn next_refresh(&self) -> Option<DateTime<Local>> {
        *self
            .next_refresh
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` over a user's own `allowedFamilies` (`None`: the proxy's list applies), for the
    /// policy's family rule; `None` when the user is gone. Quotas is the one module on the
    /// request path that reads the user store, so the forwarder asks here.
    /// `key` is the one the gatekeeper looked the token up by (no second lookup).
    pub fn with_allowed_families<R>(
        &self,
        token: &str,
        key: Option<UserKey>,
        f: impl FnOnce(Option<&[Box<str>]>) -> R,
    ) -> Option<R> {
        let key = key.unwrap_or_else(|| self.users.key(token));
        self.users
            .with_user_at(key, token, |u| f(u.allowed_families.as_deref()))
    }

    /// Admits (or refuses) a request from the facts its provider read (`facts` is `None` for
    /// requests that are not generations). The prompt text is taken out of `facts`.
    pub async fn admit(
        &self,
        req: &AdmitRequest<'_>,
        facts: Option<&mut RequestFacts>,
    ) -> Result<Admitted, ProxyError> {
        let Some(facts) = facts.filter(|_| req.generation) else {
            return Ok(Admitted {
                headers: HeaderMap::new(),
                ticket: Ticket::passthrough(),
                output_cap: None,
            });
        };
        let (token, kind, key) = match req.principal {
            Principal::User { token, kind, key } => (Some(token), Some(*kind), *key),
            _ => (None, None, None),
        };

        // The prompt rate limit: special users and the admin are exempt, as in the original.
        let mut headers = HeaderMap::new();
        let exempt = matches!(req.principal, Principal::Admin) || kind == Some(UserType::Special);
        if let (Some(limiter), false) = (&self.limiter, exempt) {
            let key = match token {
                Some(t) => RateKey::User(t.to_string()),
                None => RateKey::Ip(req.ip),
            };
            let decision = limiter.check(&key);
            if let Some(wait) = decision.retry_after {
                return Err(ProxyError::too_many(
                    "rate_limit_error",
                    format!(
                        "You are sending prompts too fast: the limit is {} per minute \
                         (TEXT_MODEL_RATE_LIMIT). Retry in {wait} seconds.",
                        limiter.limit()
                    ),
                    wait,
                )
                .with_headers(decision.headers));
            }
            headers = decision.headers;
        }

        // Without a user there is nobody to count tokens for.
        let Some(token) = token else {
            return Ok(Admitted {
                headers,
                ticket: Ticket::passthrough(),
                output_cap: None,
            });
        };
        // The entry the gatekeeper found: no second lookup of the token.
        let key = key.unwrap_or_else(|| self.users.key(token));

        // The interned name: the user's counts find it by address (`users::counts`).
        let family = crate::users::counts::Family::intern_static(facts.family).as_str();
        let want = Want {
            prompt: facts.prompt_bound(),
            max_output: facts.max_output,
            choices: facts.choices,
            capped_output: facts.capped_output,
            model_max: crate::providers::families::max_output_tokens(&facts.model),
            is_bound: true,
        };
        // First try: reserve with the prompt's upper bound when the user has plenty of room,
        // without tokenizing; otherwise count the prompt and decide on its real size.
        let (prompt, outcome) = match self.reserve(key, token, family, want) {
            Some(Reservation::NeedsCount) => {
                let text = std::mem::take(&mut facts.prompt_text);
                let tokens = estimate::count_tokens_async(text)
                    .await
                    .saturating_add(facts.prompt_fixed);
                let outcome = self.reserve(
                    key,
                    token,
                    family,
                    Want {
                        prompt: tokens,
                        is_bound: false,
                        ..want
                    },
                );
                (PromptEstimate::Counted(tokens), outcome)
            }
            outcome => {
                let prompt = PromptEstimate::Uncounted {
                    text: std::mem::take(&mut facts.prompt_text),
                    fixed: facts.prompt_fixed,
                };
                (prompt, outcome)
            }
        };
        let (requested, output_cap) = match outcome {
            None => {
                return Err(ProxyError::unauthorized(
                    "Your user token no longer exists; ask the proxy operator for a new one.",
                ))
            }
            Some(Reservation::Refused(r)) => {
                return Err(self.quota_error(family, &r).with_headers(headers))
            }
            Some(Reservation::Reserved { requested, cap }) => (requested, cap),
            // A counted prompt never needs counting again.
            Some(Reservation::NeedsCount) => {
                return Err(ProxyError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "The proxy could not decide on your quota; try again.",
                ))
            }
        };

        Ok(Admitted {
            headers,
            output_cap,
            ticket: Ticket {
                meter: None,
                settlement: Some(Settlement {
                    users: self.users.clone(),
                    key,
                    token: token.clone(),
                    family,
                    reserved: requested,
                    prompt,
                }),
            },
        })
    }

    /// Checks and reserves a request's tokens of `family` for a user in one step under its
    /// entry lock, and counts the prompt. A request is admitted only while
    /// `used + reserved + requested < limit`; when its output as sent (the client's cap, or
    /// the model's most without one) does not fit, its output is capped to what the user has
    /// left after the prompt, and refused when that is under [`MIN_OUTPUT_TOKENS`]. With
    /// `want.is_bound` (the prompt's upper bound) it reserves only with [`BOUND_HEADROOM`] to
    /// spare, and otherwise answers `NeedsCount`. `None`: the user is gone.
    fn reserve(&self, key: UserKey, token: &str, family: &str, want: Want) -> Option<Reservation> {
        self.users.update_usage_at(key, token, |e| {
            // The stored type decides (an admin may have changed it since authentication).
            let special = e.user.kind == UserType::Special;
            let limit = e.user.token_limits.get(family).copied().unwrap_or(0);
            let used = e.user.token_counts.get(family).copied().unwrap_or(0);
            let reserved = e.reserved.get(family).copied().unwrap_or(0);
            let mut cap = None;
            let requested = if special || limit == 0 {
                // No limit to hold: reserve what the client asked for, as sent.
                want.prompt
                    .saturating_add(want.max_output.unwrap_or(0).saturating_mul(want.choices))
            } else {
                let natural = want.prompt.saturating_add(want.natural_output());
                // Tokens the request may use: `used + reserved + requested < limit`.
                let room = limit
                    .saturating_sub(used.saturating_add(reserved))
                    .saturating_sub(1);
                let refuse = |capped| {
                    Reservation::Refused(Refusal {
                        limit,
                        used,
                        reserved,
                        capped,
                    })
                };
                if want.is_bound {
                    if natural.saturating_mul(BOUND_HEADROOM) > room {
                        return (Reservation::NeedsCount, false);
                    }
                    natural
                } else if natural <= room {
                    natural
                } else if !want.capped_output || want.prompt >= room {
                    return (refuse(None), false);
                } else {
                    let per_choice = (room - want.prompt) / want.choices.max(1);
                    if per_choice < MIN_OUTPUT_TOKENS {
                        return (refuse(Some(per_choice)), false);
                    }
                    cap = Some(per_choice);
                    want.prompt
                        .saturating_add(per_choice.saturating_mul(want.choices.max(1)))
                }
            };
            match e.reserved.get_mut(family) {
                Some(r) => *r = r.saturating_add(requested),
                None => {
                    e.reserved.insert(family, requested);
                }
            }
            e.user.prompt_count = e.user.prompt_count.saturating_add(1);
            (Reservation::Reserved { requested, cap }, true)
        })
    }

    fn quota_error(&self, family: &str, r: &Refusal) -> ProxyError {
        let in_flight = if r.reserved > 0 {
            format!(
                " (plus {} reserved by your requests still running)",
                r.reserved
            )
        } else {
            String::new()
        };
        let left = r
            .limit
            .saturating_sub(r.used.saturating_add(r.reserved))
            .saturating_sub(1);
        let why = match r.capped {
            Some(n) => format!(
                "after this prompt only {n} tokens would be left for the answer, fewer than the \
                 {MIN_OUTPUT_TOKENS} this proxy sends a request for"
            ),
            None => "this request does not fit: its prompt plus its output cap (max_tokens) \
                     is more than that"
                .to_string(),
        };
        let refresh = match self.next_refresh() {
            Some(t) => format!(
                "Your quota refreshes at {}.",
                t.format("%Y-%m-%d %H:%M:%S %:z")
            ),
            None => "Quotas do not refresh automatically here; ask the proxy operator to raise \
                     your limit."
                .to_string(),
        };
        ProxyError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            format!(
                "You have used your token quota for the {family} model family: {} of {} tokens \
                 used{in_flight}, {left} tokens left; {why}. Send a shorter prompt or a smaller \
                 max_tokens, or wait. {refresh}",
                r.used, r.limit
            ),
        )
    }

    /// Refreshes every non-temporary user now: for each family with a non-zero configured
    /// quota, `tokenLimits[f] = tokenCounts[f] + quota` (families without one keep whatever
    /// limit an admin set). Returns how many users were refreshed.
    pub fn refresh_now(&self) -> usize {
        if !self.quotas.values().any(|q| *q > 0) {
            return 0;
        }
        let n = self.users.update_all(|u| {
            if u.kind == UserType::Temporary {
                return false;
            }
            self.refresh_limits(u);
            true
        });
        tracing::info!(refreshed = n, next = ?self.next_refresh(), "token quotas refreshed");
        n
    }

    /// The refresh rule for one user: each family with a configured quota gets
    /// `limit = used + quota`; other families are left alone.
    pub fn refresh_limits(&self, u: &mut crate::users::User) {
        for (family, quota) in self.quotas.iter().filter(|(_, q)| **q > 0) {
            let used = u.token_counts.get(family).copied().unwrap_or(0);
            u.token_limits
                .insert(family.clone(), used.saturating_add(*quota));
        }
    }

    /// Refreshes if the scheduled tick is at or before `now`, then schedules the next tick
    /// after `now` (ticks missed while the server slept are not replayed). Returns whether it
    /// refreshed.
    pub fn refresh_due(&self, now: DateTime<Local>) -> bool {
        let Some(schedule) = &self.schedule else {
            return false;
        };
        {
            let mut next = self
                .next_refresh
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match *next {
                Some(t) if t <= now => *next = schedule.next_after(now),
                _ => return false,
            }
        }
        self.refresh_now();
        true
    }

    /// Refreshes quotas on the `QUOTA_REFRESH_PERIOD` schedule and forgets idle rate-limit
    /// keys, until `shutdown`.
    pub async fn run_refresh(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        if let Some(s) = &self.schedule {
            tracing::info!(period = %s.source, next = ?self.next_refresh(), "quota refresh scheduled");
        }
        loop {
            let now = (self.clock)();
            let wait = self
                .next_refresh()
                .and_then(|t| (t - now).to_std().ok())
                .map_or(HOUSEKEEPING, |d| d.min(HOUSEKEEPING));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            self.refresh_due((self.clock)());
            if let Some(l) = &self.limiter {
                l.retain_recent();
            }
        }
    }
}

#[cfg(test)]
mod tests;
