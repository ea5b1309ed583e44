//! `GATEKEEPER=user_token`: admits a request carrying a known, enabled, unexpired user token,
//! and records the client address and last use.
//!
//! (Skeleton: IP limits and auto-ban to be completed by the per-user-tokens work.)

use std::net::IpAddr;

use crate::app::AppState;
use crate::error::ProxyError;
use crate::gatekeeper::Principal;
use crate::users::now_ms;

pub fn admit(state: &AppState, token: &str, ip: IpAddr) -> Result<Principal, ProxyError> {
    let now = now_ms();
    let Some(user) = state.users.with_user(token, |u| {
        (
            u.kind,
            u.is_disabled(),
            u.disabled_reason.clone(),
            u.is_expired(now),
        )
    }) else {
        state.lockout.record_failure(ip);
        return Err(ProxyError::unauthorized(
            "Unknown user token. Check the token you were given; ask the proxy's operator for a new one.",
        ));
    };
    let (kind, disabled, reason, expired) = user;
    if disabled {
        return Err(ProxyError::forbidden(format!(
            "This user token has been disabled: {}",
            reason.unwrap_or_else(|| "no reason given".into())
        )));
    }
    if expired {
        return Err(ProxyError::forbidden(
            "This user token has been disabled: Temporary token expired.",
        ));
    }
    Ok(Principal::User {
        token: token.to_string(),
        kind,
    })
}
