//! Who may pass: the one place that decides, for every request, who the client is and whether
//! it may reach the route. [`guard`] is a default-deny middleware over the whole router:
//!
//! 1. the route's [`Access`] from the one route table ([`routes::ROUTES`], matched by route
//!    template);
//! 2. the client address ([`client_addr`]: socket peer or trusted `X-Forwarded-For` hops);
//! 3. `IP_BLACKLIST`, then `ADMIN_WHITELIST` for the admin zone (and `/metrics`);
//! 4. the brute-force lockout ([`lockout`]), asked once, for every request that presents a
//!    credential;
//! 5. the credential itself ([`credentials`]: proxy key, user token ([`user_token`]), admin
//!    key, admin sessions and CSRF ([`session`]), the external session service, the
//!    `METRICS_KEY` bearer on `/metrics`).
//!
//! Every refusal here is counted once in `gatekeeper_refusals_total` by its reason
//! ([`crate::metrics::refused`]).
//!
//! The outcome is stored in the request extensions: [`ClientIp`] always, then a [`Principal`]
//! (proxied routes), an [`AdminIdentity`] (admin routes) or a [`LockedOut`] mark (credential
//! forms). Handlers never look at credentials headers themselves. Knows nothing of upstreams.

pub mod client_addr;
pub mod credentials;
pub mod lockout;
pub mod routes;
pub mod session;
pub mod user_token;

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};

use crate::app::AppState;
use crate::config::GatekeeperMode;
use crate::error::{AdminError, ProxyError};
use crate::metrics::Reason as Refused;
use crate::net::in_list;
use crate::users::{Token, UserKey, UserType};

pub use client_addr::{client_ip, BadForwardedFor, ClientIp};
pub use credentials::{client_credential, secret_eq};
pub use routes::{Access, ROUTES};

/// Who is making a proxied request, as decided by the gatekeeper.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// `GATEKEEPER=none`: anyone, known only by address.
    Anonymous,
    /// Holder of `PROXY_KEY`.
    ProxyKey,
    /// Holder of `ADMIN_KEY` (passes in every mode, as in the original).
    Admin,
    /// A user of the user store, with the key the gatekeeper looked the token up by: the
    /// quotas reach the same entry with it, without looking the token up again (`None` only
    /// for a principal made without the store, as unit tests do).
    ///
    /// The token is held as the user record holds it (inline: no allocation per request).
    User {
        token: Token,
        kind: UserType,
        key: Option<UserKey>,
    },
}

impl Principal {
    /// The user token, when the caller is a user.
    pub fn user_token(&self) -> Option<&str> {
        match self {
            Principal::User { token, .. } => Some(token),
            _ => None,
        }
    }
}

/// Who is acting on an admin route, for the audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminIdentity {
    /// Authenticated with `ADMIN_KEY`.
    AdminKey,
    /// Authenticated by the external session service; holds its `user`.
    Session(String),
}

impl AdminIdentity {
    pub fn who(&self) -> &str {
        match self {
            AdminIdentity::AdminKey => "admin-key",
            AdminIdentity::Session(u) => u,
        }
    }
}

/// The header that carries the CSRF token on a cookie-authenticated admin API change.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// Inserted on a credential form's `POST` ([`Access::CredentialForm`], [`Access::AdminSignIn`])
/// when the address is locked out: the handler shows the refusal (with these seconds to wait)
/// instead of checking the credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockedOut(pub u64);

/// The default-deny middleware over the whole router (see the module documentation for its
/// steps).
pub async fn guard(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request,
    next: Next,
) -> Response {
    let access = routes::access(
        req.extensions()
            .get::<MatchedPath>()
            .map(MatchedPath::as_str),
        req.uri().path(),
    );
    if access == Access::Open {
        // `/health` answers whoever asks, whatever their headers say.
        return next.run(req).await;
    }
    if access == Access::Proxy {
        return match admit_proxied(&state, peer.ip(), req.headers()).await {
            Ok((ip, principal)) => {
                req.extensions_mut().insert(ClientIp(ip));
                req.extensions_mut().insert(principal);
                next.run(req).await
            }
            Err(refusal) => refusal,
        };
    }
    let admin_zone = matches!(
        access,
        Access::Admin | Access::AdminSignIn | Access::Metrics
    );
    let trusted = state.config.trusted_proxies();
    let ip = match client_ip(peer.ip(), req.headers(), trusted) {
        Ok(ip) => ip,
        Err(bad) => {
            crate::metrics::refused(Refused::BadRequest);
            let msg = bad_forwarded_for(&bad, trusted);
            return if admin_zone {
                AdminError::bad_request(msg).into_response()
            } else {
                ProxyError::bad_request(msg).into_response()
            };
        }
    };
    req.extensions_mut().insert(ClientIp(ip));
    if in_list(&state.config.ip_blacklist, ip) {
        crate::metrics::refused(Refused::Blacklist);
        let msg = BLACKLISTED;
        return if admin_zone {
            AdminError::forbidden(msg).into_response()
        } else {
            ProxyError::forbidden(msg).into_response()
        };
    }
    if admin_zone && !in_list(&state.config.admin_whitelist, ip) {
        crate::metrics::refused(Refused::Whitelist);
        return AdminError::forbidden("Forbidden (by ADMIN_WHITELIST)").into_response();
    }

    // The one lockout check: every request that presents (or may present) a credential.
    let presents_credential = match access {
        Access::Open | Access::Public => false,
        Access::CredentialForm | Access::AdminSignIn => req.method() == Method::POST,
        Access::Admin | Access::Metrics => true,
        // Decided by `admit_proxied`, above.
        Access::Proxy => false,
    };
    let locked = if presents_credential {
        state.lockout.refusal(ip).await
    } else {
        None
    };

    match access {
        // `Access::Open` and `Access::Proxy` returned above.
        Access::Open | Access::Public | Access::Proxy => next.run(req).await,
        Access::CredentialForm | Access::AdminSignIn => {
            if let Some(secs) = locked {
                req.extensions_mut().insert(LockedOut(secs));
            }
            next.run(req).await
        }
        Access::Admin => {
            if let Some(secs) = locked {
                crate::metrics::refused(Refused::Lockout);
                if routes::is_admin_page(req.uri().path()) {
                    return Redirect::to("/admin/login").into_response();
                }
                return admin_lockout_error(secs).into_response();
            }
            // Copies, because a `&Request` (its body is not `Sync`) cannot be held across an await.
            let (path, headers) = (req.uri().path().to_string(), req.headers().clone());
            match credentials::admit_admin(&state, ip, &path, &headers).await {
                Ok((identity, via)) => {
                    if via == credentials::AdminVia::Cookie
                        && !req.method().is_safe()
                        && !routes::is_admin_page(&path)
                        && !state.sessions.verify_csrf(
                            &headers,
                            identity.who(),
                            headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()),
                        )
                    {
                        // The admin pages' forms check their own token (`CheckedForm`); the
                        // JSON API takes it in a header.
                        crate::metrics::refused(Refused::Auth);
                        return AdminError::forbidden(format!(
                            "A change through the admin API signed in by cookie needs the CSRF token of the admin pages in the '{CSRF_HEADER}' header; scripts should send 'Authorization: Bearer <ADMIN_KEY>' instead."
                        ))
                        .into_response();
                    }
                    req.extensions_mut().insert(identity);
                    next.run(req).await
                }
                Err(resp) => {
                    crate::metrics::refused(Refused::Auth);
                    resp
                }
            }
        }
        Access::Metrics => {
            if let Some(secs) = locked {
                crate::metrics::refused(Refused::Lockout);
                return admin_lockout_error(secs).into_response();
            }
            match credentials::admit_metrics(&state, ip, req.headers()) {
                Ok(()) => next.run(req).await,
                Err(e) => {
                    crate::metrics::refused(Refused::Auth);
                    e.into_response()
                }
            }
        }
    }
}

/// The gate of a proxied route (every route of [`Access::Proxy`]), in the guard's order: the
/// client address, `IP_BLACKLIST`, the lockout (asked only when a credential is presented or
/// required), then the client credential under `GATEKEEPER`. The one home of that rule: the
/// [`guard`] calls it for proxied routes the router matched, and so does the proxied routes'
/// straight path (`app::Front`), which skips the router. Refusals are counted here.
pub async fn admit_proxied<H: crate::http1::Lookup + ?Sized>(
    state: &AppState,
    peer: IpAddr,
    headers: &H,
) -> Result<(IpAddr, Principal), Response> {
    match gate_proxied(state, peer, headers) {
        Gate::Pass(ip, principal) => Ok((ip, principal)),
        Gate::Refused(refusal) => Err(refusal),
        Gate::LockedOut(secs) => Err(locked_out(secs).await),
    }
}

/// What [`gate_proxied`] decided.
pub enum Gate {
    /// The client's address and who it is.
    Pass(IpAddr, Principal),
    /// Refused now, with this answer.
    Refused(Response),
    /// The address is locked out for these seconds: answer with [`locked_out`], which holds
    /// the answer for the [`lockout::TARPIT`] pause first.
    LockedOut(u64),
}

/// [`admit_proxied`] without waiting: the gate decides at once, and only a locked-out address
/// needs a pause before its answer ([`Gate::LockedOut`]). The straight path calls this, so
/// that a request's future carries no state for a pause it almost never takes (issue 18).
pub fn gate_proxied<H: crate::http1::Lookup + ?Sized>(
    state: &AppState,
    peer: IpAddr,
    headers: &H,
) -> Gate {
    let trusted = state.config.trusted_proxies();
    let ip = match client_ip(peer, headers, trusted) {
        Ok(ip) => ip,
        Err(bad) => {
            crate::metrics::refused(Refused::BadRequest);
            return Gate::Refused(
                ProxyError::bad_request(bad_forwarded_for(&bad, trusted)).into_response(),
            );
        }
    };
    if in_list(&state.config.ip_blacklist, ip) {
        crate::metrics::refused(Refused::Blacklist);
        return Gate::Refused(ProxyError::forbidden(BLACKLISTED).into_response());
    }
    let presents_credential =
        state.config.mode() != GatekeeperMode::None || client_credential(headers).is_some();
    if presents_credential {
        if let Some(secs) = state.lockout.locked_for(ip) {
            crate::metrics::refused(Refused::Lockout);
            return Gate::LockedOut(secs);
        }
    }
    match credentials::admit_client(state, ip, headers) {
        Ok(principal) => Gate::Pass(ip, principal),
        Err(e) => {
            crate::metrics::refused(Refused::Auth);
            Gate::Refused(e.into_response())
        }
    }
}

/// The answer to a locked-out address on a proxied route, after the [`lockout::TARPIT`] pause.
pub async fn locked_out(secs: u64) -> Response {
    tokio::time::sleep(lockout::TARPIT).await;
    lockout_error(secs).into_response()
}

/// The refusal of an address in `IP_BLACKLIST`.
const BLACKLISTED: &str = "Forbidden: your address is blocked by this proxy (IP_BLACKLIST)";

/// The 400 for an `X-Forwarded-For` entry that is not an address among the trusted hops.
fn bad_forwarded_for(bad: &BadForwardedFor, trusted: usize) -> String {
    format!(
        "X-Forwarded-For entry {:?} is not an IP address. This server trusts the last {trusted} entr{} of X-Forwarded-For (TRUSTED_PROXIES={trusted}); they must be addresses written by your reverse proxies.",
        bad.entry,
        if trusted == 1 { "y" } else { "ies" }
    )
}

/// The refusal for a locked-out address.
pub fn lockout_error(retry_after_secs: u64) -> ProxyError {
    ProxyError::too_many(
        "rate_limit_error",
        format!(
            "Too many failed authentication attempts from your address; try again in {retry_after_secs} s."
        ),
        retry_after_secs,
    )
}

/// The same refusal for admin routes.
pub fn admin_lockout_error(retry_after_secs: u64) -> AdminError {
    AdminError {
        retry_after: Some(retry_after_secs),
        ..AdminError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "Too many failed authentication attempts from your address; try again in {retry_after_secs} s."
            ),
        )
    }
}
