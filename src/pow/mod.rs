//! Proof-of-work challenges for temporary user tokens (`CAPTCHA_MODE=proof_of_work`), as the
//! original's `pow-captcha`: the server hands out a signed Argon2id challenge; the visitor's
//! browser searches for a solution whose hash is at most the challenge's target; a valid,
//! unexpired, unused solution earns (or refreshes) a temporary token. Knows no HTTP types and
//! no user store: the web handlers issue the token.
//!
//! Differences from the original: the target travels as a fixed-width hex string rather than
//! a decimal BigInt (the page that solves it is ours), and a challenge is bound to the
//! difficulty epoch, so changing the difficulty at run time invalidates outstanding ones.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use argon2::{Algorithm, Argon2, Params, Version};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use constant_time_eq::constant_time_eq;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::config::{CaptchaMode, Config, ConfigError};

type HmacSha256 = Hmac<Sha256>;

/// How long an address waits between verification attempts (the original's 60 s).
pub const ATTEMPT_LOCKOUT_MS: i64 = 60_000;
/// How long an address that sent a wrong solution waits (the original's 6 hours).
pub const BOGUS_LOCKOUT_MS: i64 = 6 * 3600 * 1000;
/// Addresses and used signatures remembered at most; bounds memory under a flood.
const MAX_TRACKED: usize = 100_000;

/// `POW_DIFFICULTY_LEVEL`: the expected number of hashes a solution takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Difficulty {
    Low,
    Medium,
    High,
    Extreme,
    /// A custom expected number of hashes.
    Custom(u64),
}

impl Difficulty {
    /// Parses `low|medium|high|extreme` or a positive whole number.
    pub fn parse(s: &str) -> Option<Difficulty> {
        match s.trim().to_ascii_lowercase().as_str() {
            "low" => Some(Difficulty::Low),
            "medium" => Some(Difficulty::Medium),
            "high" => Some(Difficulty::High),
            "extreme" => Some(Difficulty::Extreme),
            n => n
                .parse::<u64>()
                .ok()
                .filter(|&n| n > 0)
                .map(Difficulty::Custom),
        }
    }

    /// The expected number of hashes (the original's work factors).
    pub fn work_factor(self) -> u64 {
        match self {
            Difficulty::Low => 200,
            Difficulty::Medium => 900,
            Difficulty::High => 1900,
            Difficulty::Extreme => 4000,
            Difficulty::Custom(n) => n,
        }
    }

    pub fn label(self) -> String {
        match self {
            Difficulty::Low => "low".into(),
            Difficulty::Medium => "medium".into(),
            Difficulty::High => "high".into(),
            Difficulty::Extreme => "extreme".into(),
            Difficulty::Custom(n) => n.to_string(),
        }
    }
}

/// The Argon2id parameters of every challenge (`ARGON2_*`, the original's names and defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HashParams {
    pub time_cost: u32,
    pub memory_kb: u32,
    pub parallelism: u32,
    pub hash_len: usize,
}

impl HashParams {
    /// Checks that Argon2 accepts these parameters, naming the variable that is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=16).contains(&self.parallelism) {
            return Err(ConfigError(
                "ARGON2_PARALLELISM must be between 1 and 16".into(),
            ));
        }
        if !(2..=10).contains(&self.time_cost) {
            return Err(ConfigError(
                "ARGON2_TIME_COST must be between 2 and 10".into(),
            ));
        }
        if self.memory_kb < 8 * self.parallelism || self.memory_kb > 2 * 1024 * 1024 {
            return Err(ConfigError(format!(
                "ARGON2_MEMORY_KB must be between {} (8 × ARGON2_PARALLELISM) and 2097152",
                8 * self.parallelism
            )));
        }
        if !(8..=64).contains(&self.hash_len) {
            return Err(ConfigError(
                "ARGON2_HASH_LENGTH must be between 8 and 64 (bytes)".into(),
            ));
        }
        Ok(())
    }
}

/// One challenge, as sent to the browser and signed. Field names follow the original.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// Salt, hex.
    pub s: String,
    /// Hash length in bytes.
    pub hl: usize,
    /// Argon2 time cost.
    pub t: u32,
    /// Argon2 memory cost in KiB.
    pub m: u32,
    /// Argon2 parallelism.
    pub p: u32,
    /// The target: a solution's hash, read as a big-endian number, must be at most this
    /// (hex, `hl` bytes).
    pub d: String,
    /// Expiry, epoch milliseconds.
    pub e: i64,
    /// The address the challenge was issued to.
    pub ip: String,
    /// The token being refreshed, for a refresh challenge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// Why a solution is refused; each message tells the visitor what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PowError {
    #[error("Wait a minute before trying again (one verification per minute per address).")]
    RateLimited,
    #[error("Invalid signature: the server may have restarted or the difficulty changed since the challenge was issued. Request a new challenge.")]
    BadSignature,
    #[error("The solution must be sent from the address that requested the challenge. Request a new challenge.")]
    WrongAddress,
    #[error("This challenge was already used. Request a new challenge.")]
    Reused,
    #[error("The challenge expired before it was solved (POW_CHALLENGE_TIMEOUT). Request a new challenge.")]
    Expired,
    #[error("The solution failed verification.")]
    WrongSolution,
    #[error("The challenge is malformed. Request a new challenge.")]
    Malformed,
}

/// The challenge service when `CAPTCHA_MODE=proof_of_work`, else `None`.
pub fn from_config(config: &Config) -> Result<Option<Pow>, ConfigError> {
    let c = &config.cli;
    if c.captcha_mode != CaptchaMode::ProofOfWork {
        return Ok(None);
    }
    let difficulty = Difficulty::parse(&c.pow_difficulty_level).ok_or_else(|| {
        ConfigError(format!(
            "POW_DIFFICULTY_LEVEL={:?} is invalid: use low, medium, high, extreme or a positive whole number",
            c.pow_difficulty_level
        ))
    })?;
    let params = HashParams {
        time_cost: c.argon2_time_cost,
        memory_kb: c.argon2_memory_kb,
        parallelism: c.argon2_parallelism,
        hash_len: c.argon2_hash_length,
    };
    let key = c.signing_key.as_ref().map(|k| k.expose());
    Pow::new(key, difficulty, params, c.pow_challenge_timeout).map(Some)
}

/// The challenge service: difficulty (changeable at run time), signing, single use.
pub struct Pow {
    mac: HmacSha256,
    params: HashParams,
    timeout_ms: i64,
    state: Mutex<State>,
}

struct State {
    difficulty: Difficulty,
    /// Changes with the difficulty; part of every signature.
    epoch: [u8; 16],
    /// Signatures already used, with their challenge's expiry.
    used: HashMap<String, i64>,
    /// Per address: not before this time (epoch ms).
    locked_until: HashMap<IpAddr, i64>,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `floor(2^(8·len) / work)` as `len` big-endian bytes (all ones for a work factor of 1).
/// Written out because it is one long division and a big-integer crate would be a dependency
/// for these few lines.
pub fn target_bytes(len: usize, work: u64) -> Vec<u8> {
    let work = u128::from(work.max(1));
    if work == 1 {
        return vec![0xff; len];
    }
    // Dividend: 1 followed by `len` zero bytes; the quotient's first byte is 0 for work ≥ 2.
    let mut out = Vec::with_capacity(len);
    let mut rem: u128 = 1;
    for _ in 0..len {
        let cur = rem << 8;
        out.push((cur / work) as u8);
        rem = cur % work;
    }
    out
}

/// Argon2id of `solution` with the challenge's parameters. `None` when the challenge's
/// parameters are unusable.
pub fn hash(ch: &Challenge, solution: &str) -> Option<Vec<u8>> {
    let salt = hex::decode(&ch.s).ok()?;
    let params = Params::new(ch.m, ch.t, ch.p, Some(ch.hl)).ok()?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let mut out = vec![0u8; ch.hl];
    argon
        .hash_password_into(solution.as_bytes(), &salt, &mut out)
        .ok()?;
    Some(out)
}

/// True when the hash of `solution` is at most the target.
pub fn solves(ch: &Challenge, solution: &str) -> bool {
    let Ok(target) = hex::decode(&ch.d) else {
        return false;
    };
    match hash(ch, solution) {
        Some(h) => h.len() == target.len() && h <= target,
        None => false,
    }
}

impl Pow {
    /// `signing_key`: `SIGNING_KEY` (the key the admin sessions use); random when unset.
    pub fn new(
        signing_key: Option<&str>,
        difficulty: Difficulty,
        params: HashParams,
        timeout_minutes: u64,
    ) -> Result<Pow, ConfigError> {
        params.validate()?;
        let key: Vec<u8> = match signing_key.filter(|k| !k.is_empty()) {
            Some(k) => k.as_bytes().to_vec(),
            None => rand::random::<[u8; 32]>().to_vec(),
        };
        let mut mac = HmacSha256::new_from_slice(&key)
            .map_err(|e| ConfigError(format!("SIGNING_KEY cannot be used as a key: {e}")))?;
        // Domain separation: a challenge signature is never valid as anything else.
        mac.update(b"llm-gatekeeper proof-of-work challenge\x1f");
        Ok(Pow {
            mac,
            params,
            timeout_ms: i64::try_from(timeout_minutes.saturating_mul(60_000)).unwrap_or(i64::MAX),
            state: Mutex::new(State {
                difficulty,
                epoch: rand::random(),
                used: HashMap::new(),
                locked_until: HashMap::new(),
            }),
        })
    }

    pub fn difficulty(&self) -> Difficulty {
        lock(&self.state).difficulty
    }

    /// Changes the difficulty; challenges issued before are no longer accepted.
    pub fn set_difficulty(&self, d: Difficulty) {
        let mut s = lock(&self.state);
        s.difficulty = d;
        s.epoch = rand::random();
    }

    pub fn params(&self) -> HashParams {
        self.params
    }

    fn sign_with(&self, epoch: &[u8; 16], ch: &Challenge) -> String {
        let mut mac = self.mac.clone();
        mac.update(epoch);
        // serde_json writes the struct's fields in declaration order: a stable encoding.
        mac.update(serde_json::to_string(ch).unwrap_or_default().as_bytes());
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    /// A new challenge for `ip` (a refresh challenge for `token`: half the work), and its
    /// signature.
    pub fn challenge(&self, ip: IpAddr, token: Option<String>, now_ms: i64) -> (Challenge, String) {
        let (difficulty, epoch) = {
            let s = lock(&self.state);
            (s.difficulty, s.epoch)
        };
        let mut work = difficulty.work_factor();
        if token.is_some() {
            work = (work / 2).max(1);
        }
        let ch = Challenge {
            s: hex::encode(rand::random::<[u8; 32]>()),
            hl: self.params.hash_len,
            t: self.params.time_cost,
            m: self.params.memory_kb,
            p: self.params.parallelism,
            d: hex::encode(target_bytes(self.params.hash_len, work)),
            e: now_ms.saturating_add(self.timeout_ms),
            ip: ip.to_string(),
            token,
        };
        let sig = self.sign_with(&epoch, &ch);
        (ch, sig)
    }

    /// The checks that come before hashing: rate limit, signature, address, single use,
    /// expiry. On success the address is locked for a minute and the signature is spent, so
    /// the (costly) hash runs at most once per challenge and per address per minute.
    pub fn precheck(
        &self,
        ch: &Challenge,
        signature: &str,
        ip: IpAddr,
        now_ms: i64,
    ) -> Result<(), PowError> {
        let mut s = lock(&self.state);
        if s.locked_until.get(&ip).is_some_and(|&t| t > now_ms) {
            return Err(PowError::RateLimited);
        }
        let expected = self.sign_with(&s.epoch, ch);
        if !constant_time_eq(expected.as_bytes(), signature.as_bytes()) {
            return Err(PowError::BadSignature);
        }
        if ch.ip != ip.to_string() {
            return Err(PowError::WrongAddress);
        }
        if s.used.contains_key(signature) {
            return Err(PowError::Reused);
        }
        if now_ms > ch.e {
            return Err(PowError::Expired);
        }
        if ch.hl != self.params.hash_len || ch.d.len() != 2 * ch.hl {
            return Err(PowError::Malformed);
        }
        if s.used.len() >= MAX_TRACKED {
            s.used.retain(|_, e| *e >= now_ms);
        }
        if s.locked_until.len() >= MAX_TRACKED {
            s.locked_until.retain(|_, t| *t > now_ms);
        }
        s.used.insert(signature.to_string(), ch.e);
        s.locked_until
            .insert(ip, now_ms.saturating_add(ATTEMPT_LOCKOUT_MS));
        Ok(())
    }

    /// Records a wrong solution: the address waits six hours, as in the original.
    pub fn punish(&self, ip: IpAddr, now_ms: i64) {
        lock(&self.state)
            .locked_until
            .insert(ip, now_ms.saturating_add(BOGUS_LOCKOUT_MS));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: HashParams = HashParams {
        time_cost: 2,
        memory_kb: 64,
        parallelism: 1,
        hash_len: 32,
    };

    fn pow(difficulty: Difficulty) -> Pow {
        Pow::new(Some("test-key"), difficulty, FAST, 30).expect("valid")
    }

    fn solve(ch: &Challenge) -> String {
        (0u64..)
            .map(|n| n.to_string())
            .find(|s| solves(ch, s))
            .expect("some solution")
    }

    #[test]
    fn difficulty_levels_are_the_originals() {
        assert_eq!(
            Difficulty::parse("low").map(Difficulty::work_factor),
            Some(200)
        );
        assert_eq!(
            Difficulty::parse("Extreme").map(Difficulty::work_factor),
            Some(4000)
        );
        assert_eq!(Difficulty::parse("1234"), Some(Difficulty::Custom(1234)));
        assert_eq!(Difficulty::parse("0"), None);
        assert_eq!(Difficulty::parse("hard"), None);
    }

    #[test]
    fn targets_divide_the_hash_space() {
        assert_eq!(target_bytes(2, 2), vec![0x80, 0x00]);
        assert_eq!(target_bytes(2, 256), vec![0x01, 0x00]);
        assert_eq!(target_bytes(2, 3), vec![0x55, 0x55]);
        assert_eq!(target_bytes(2, 1), vec![0xff, 0xff]);
    }

    #[test]
    fn argon2id_matches_the_reference_vector() {
        // The expected values are hash-wasm 4.13.0's argon2id (what the browser runs) for the
        // same inputs, computed with node: server and browser agree.
        let ch = Challenge {
            s: hex::encode([2u8; 16]),
            hl: 32,
            t: 3,
            m: 32,
            p: 4,
            d: String::new(),
            e: 0,
            ip: String::new(),
            token: None,
        };
        let h = hash(&ch, &String::from_utf8(vec![1u8; 32]).expect("ascii")).expect("hash");
        assert_eq!(
            hex::encode(h),
            "03aab965c12001c9d7d0d2de33192c0494b684bb148196d73c1df1acaf6d0c2e"
        );
        let ch = Challenge {
            s: "00112233445566778899aabbccddeeff".into(),
            t: 2,
            m: 64,
            p: 1,
            ..ch
        };
        assert_eq!(
            hex::encode(hash(&ch, "12345").expect("hash")),
            "6d7648038faf3b14fb9c4ae1b429268780354f6b74d9a62969c4e5f329de699b"
        );
    }

    #[test]
    fn a_solved_challenge_passes_once_from_its_address() {
        let p = pow(Difficulty::Custom(4));
        let ip: IpAddr = [127, 0, 0, 1].into();
        let (ch, sig) = p.challenge(ip, None, 1_000);
        let solution = solve(&ch);
        assert!(solves(&ch, &solution));
        assert_eq!(p.precheck(&ch, &sig, ip, 2_000), Ok(()));
        // Single use, and the address waits a minute.
        assert_eq!(p.precheck(&ch, &sig, ip, 2_000), Err(PowError::RateLimited));
        assert_eq!(
            p.precheck(&ch, &sig, ip, 2_000 + ATTEMPT_LOCKOUT_MS),
            Err(PowError::Reused)
        );
    }

    #[test]
    fn tampered_expired_foreign_and_stale_challenges_are_refused() {
        let p = pow(Difficulty::Low);
        let ip: IpAddr = [127, 0, 0, 1].into();
        let other: IpAddr = [127, 0, 0, 2].into();
        let (ch, sig) = p.challenge(ip, None, 0);
        let mut easier = ch.clone();
        easier.d = "ff".repeat(32);
        assert_eq!(
            p.precheck(&easier, &sig, ip, 1),
            Err(PowError::BadSignature)
        );
        assert_eq!(p.precheck(&ch, &sig, other, 1), Err(PowError::WrongAddress));
        assert_eq!(p.precheck(&ch, &sig, ip, ch.e + 1), Err(PowError::Expired));
        // A difficulty change invalidates outstanding challenges.
        let (ch, sig) = p.challenge(other, None, 0);
        p.set_difficulty(Difficulty::High);
        assert_eq!(p.precheck(&ch, &sig, other, 1), Err(PowError::BadSignature));
        assert_eq!(p.difficulty(), Difficulty::High);
    }

    #[test]
    fn refresh_challenges_are_easier_and_bound_to_the_token() {
        let p = pow(Difficulty::Custom(1000));
        let ip: IpAddr = [127, 0, 0, 1].into();
        let (new, _) = p.challenge(ip, None, 0);
        let (refresh, _) = p.challenge(ip, Some("tok".into()), 0);
        assert_eq!(new.d, hex::encode(target_bytes(32, 1000)));
        assert_eq!(refresh.d, hex::encode(target_bytes(32, 500)));
        assert_eq!(refresh.token.as_deref(), Some("tok"));
    }

    #[test]
    fn bad_parameters_name_the_variable() {
        let mut bad = FAST;
        bad.memory_kb = 4;
        let e = Pow::new(None, Difficulty::Low, bad, 30)
            .err()
            .expect("invalid");
        assert!(e.0.contains("ARGON2_MEMORY_KB"));
    }
}
