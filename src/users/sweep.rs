//! The background sweep over users: disables temporary users whose expiry passed (reason
//! "Temporary token expired.") and purges them `POW_TOKEN_PURGE_HOURS` after they were
//! disabled. The request path already refuses an expired user from the moment of expiry; the
//! sweep only makes that visible in the record and cleans up.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{fingerprint, now_ms, UserStore, UserType};

/// How often the sweep runs.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The reason recorded on a temporary user disabled by the sweep.
pub const EXPIRED_REASON: &str = "Temporary token expired.";

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    pub disabled: usize,
    pub purged: usize,
}

/// One pass at `now_ms`: disables expired temporary users, then deletes temporary users
/// disabled more than `purge_after` ago.
pub fn sweep_once(users: &UserStore, now_ms: i64, purge_after: Duration) -> SweepReport {
    let disabled = users.update_all(|u| {
        if u.is_expired(now_ms) && !u.is_disabled() {
            u.disabled_at = Some(now_ms);
            u.disabled_reason = Some(EXPIRED_REASON.into());
            true
        } else {
            false
        }
    });
    let mut report = SweepReport {
        disabled,
        purged: 0,
    };
    let purge_ms = i64::try_from(purge_after.as_millis()).unwrap_or(i64::MAX);
    let mut doomed = Vec::new();
    users.for_each(|u| {
        if u.kind == UserType::Temporary
            && u.disabled_at
                .is_some_and(|d| d.saturating_add(purge_ms) <= now_ms)
        {
            doomed.push(u.token.clone());
        }
    });
    for token in doomed {
        // Checked again at removal time: an administrator may have re-enabled the user since.
        let still_due = users
            .with_user(&token, |u| {
                u.kind == UserType::Temporary
                    && u.disabled_at
                        .is_some_and(|d| d.saturating_add(purge_ms) <= now_ms)
            })
            .unwrap_or(false);
        if still_due && users.remove(&token).is_some() {
            tracing::info!(user = %fingerprint(&token), "purged expired temporary user");
            report.purged += 1;
        }
    }
    if report.disabled > 0 || report.purged > 0 {
        tracing::info!(
            disabled = report.disabled,
            purged = report.purged,
            "temporary user sweep"
        );
        users.request_flush();
    }
    report
}

/// Runs the sweep every [`SWEEP_INTERVAL`] until `shutdown`.
pub async fn run(users: Arc<UserStore>, purge_after_hours: u64, shutdown: CancellationToken) {
    run_every(
        users,
        Duration::from_secs(purge_after_hours.saturating_mul(3600)),
        SWEEP_INTERVAL,
        shutdown,
    )
    .await
}

/// Runs the sweep every `interval` until `shutdown` (tests pick a short interval).
pub async fn run_every(
    users: Arc<UserStore>,
    purge_after: Duration,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                sweep_once(&users, now_ms(), purge_after);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::users::model::TokenCounts;
    use crate::users::User;

    const HOUR: i64 = 3_600_000;

    fn temp(token: &str, expires_at: i64) -> User {
        let mut u = User::new(token.into(), UserType::Temporary, TokenCounts::new(), 0);
        u.expires_at = Some(expires_at);
        u
    }

    #[test]
    fn disables_then_purges() {
        let s = UserStore::new();
        s.load(vec![
            temp("t1", 1_000),
            temp("t2", 10 * HOUR),
            User::new("n".into(), UserType::Normal, TokenCounts::new(), 0),
        ]);
        let purge = Duration::from_secs(48 * 3600);
        let r = sweep_once(&s, 2_000, purge);
        assert_eq!(
            r,
            SweepReport {
                disabled: 1,
                purged: 0
            }
        );
        let t1 = s.get("t1").expect("still there");
        assert_eq!(t1.disabled_at, Some(2_000));
        assert_eq!(t1.disabled_reason.as_deref(), Some(EXPIRED_REASON));
        assert!(s.get("t2").expect("t2").disabled_at.is_none());

        // Not yet 48 h after being disabled.
        let r = sweep_once(&s, 2_000 + 47 * HOUR, purge);
        assert_eq!(r.purged, 0);
        let r = sweep_once(&s, 2_000 + 48 * HOUR, purge);
        assert_eq!(r.purged, 1);
        assert!(s.get("t1").is_none());
        assert!(s.get("n").is_some(), "normal users are never purged");
        // t2 expired meanwhile and was disabled in the same pass.
        assert!(s.get("t2").expect("t2").disabled_at.is_some());
    }

    #[test]
    fn disabled_normal_users_are_kept() {
        let s = UserStore::new();
        let mut u = User::new("n".into(), UserType::Normal, TokenCounts::new(), 0);
        u.disabled_at = Some(0);
        s.load(vec![u]);
        let r = sweep_once(&s, 1000 * HOUR, Duration::from_secs(3600));
        assert_eq!(r.purged, 0);
    }

    #[tokio::test]
    async fn loop_runs_on_its_interval_and_stops() {
        let s = UserStore::new();
        s.load(vec![temp("t1", 1)]);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_every(
            s.clone(),
            Duration::from_secs(3600),
            Duration::from_millis(10),
            stop.clone(),
        ));
        // Polls rather than sleeping a fixed time, so a busy machine cannot make it flaky.
        for _ in 0..500 {
            if s.get("t1").expect("t1").is_disabled() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(s.get("t1").expect("t1").is_disabled());
        stop.cancel();
        task.await.expect("sweep task ends");
    }
}
