//! The one route table of the gatekeeper: how each route is admitted, looked up by the route
//! *template* axum matched (`MatchedPath`, e.g. `/admin/users/{token}`), as TensorZero matches
//! its `UNAUTHENTICATED_ROUTES`. A route that is not listed needs a credential: an `/admin`
//! route an administrator, every other route a client credential under `GATEKEEPER`. So a new
//! route is protected unless someone adds it here on purpose.

/// How a route is admitted by [`crate::auth::guard`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Everyone, whatever their address or headers (`/health`).
    Open,
    /// No credential; `IP_BLACKLIST` applies.
    Public,
    /// A public form whose body carries a credential (the user token at `/user`): no credential
    /// is needed to reach it, but a `POST` from a locked-out address is marked
    /// [`crate::auth::LockedOut`] and the handler must not check the credential.
    CredentialForm,
    /// `/admin/login`: in the admin zone (`ADMIN_WHITELIST` applies) but without a credential;
    /// its `POST` is a [`Access::CredentialForm`].
    AdminSignIn,
    /// An administrator: the `ADMIN_KEY` bearer, our session cookie, or a session accepted by
    /// `ADMIN_SESSION_VALIDATE_URL`.
    Admin,
    /// A client credential under the `GATEKEEPER` mode (every proxied route).
    Proxy,
    /// `/metrics`: the `METRICS_KEY` bearer only (no other credential), from an address
    /// `ADMIN_WHITELIST` allows; a wrong key counts for the lockout. The route exists only
    /// when `METRICS_KEY` is set.
    Metrics,
}

/// Every route that is not simply "`/admin` → [`Access::Admin`], the rest → [`Access::Proxy`]",
/// by route template.
pub const ROUTES: &[(&str, Access)] = &[
    ("/health", Access::Open),
    // `POST /` is the SERVICE_INFO_PASSWORD form.
    ("/", Access::CredentialForm),
    ("/user", Access::CredentialForm),
    ("/user/nickname", Access::CredentialForm),
    // CAPTCHA_MODE=proof_of_work; a refresh challenge names a user token.
    ("/user/captcha", Access::Public),
    ("/user/captcha/argon2.js", Access::Public),
    ("/user/captcha/solver.js", Access::Public),
    ("/user/captcha/challenge", Access::CredentialForm),
    ("/user/captcha/verify", Access::Public),
    ("/admin/login", Access::AdminSignIn),
    ("/metrics", Access::Metrics),
];

/// The routes that need no credential (for documentation and tests).
pub fn unauthenticated_routes() -> impl Iterator<Item = &'static str> {
    ROUTES
        .iter()
        .filter(|(_, a)| !matches!(a, Access::Admin | Access::Proxy | Access::Metrics))
        .map(|(path, _)| *path)
}

/// How a request is admitted: by its matched route template, or — when no route matched and
/// the answer will be a 404 — by its path, which then decides only the shape of the refusal
/// (admin or proxy), since both need a credential.
pub fn access(matched: Option<&str>, path: &str) -> Access {
    if let Some(template) = matched {
        if let Some((_, access)) = ROUTES.iter().find(|(t, _)| *t == template) {
            return *access;
        }
    }
    let p = matched.unwrap_or(path);
    if is_admin(p) {
        Access::Admin
    } else {
        Access::Proxy
    }
}

/// True for paths in the admin zone.
pub fn is_admin(path: &str) -> bool {
    path == "/admin" || path.starts_with("/admin/")
}

/// True for paths that are admin *pages*: a browser without a session is sent to the sign-in
/// page instead of getting JSON.
pub fn is_admin_page(path: &str) -> bool {
    path == "/admin"
        || path == "/admin/"
        || path == "/admin/logout"
        || path == "/admin/manage"
        || path.starts_with("/admin/manage/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_templates_and_defaults() {
        assert_eq!(access(Some("/health"), "/health"), Access::Open);
        assert_eq!(access(Some("/user"), "/user"), Access::CredentialForm);
        assert_eq!(
            access(Some("/admin/login"), "/admin/login"),
            Access::AdminSignIn
        );
        assert_eq!(
            access(Some("/admin/users/{token}"), "/admin/users/abc"),
            Access::Admin
        );
        assert_eq!(
            access(Some("/v1/chat/completions"), "/v1/chat/completions"),
            Access::Proxy
        );
        assert_eq!(access(Some("/metrics"), "/metrics"), Access::Metrics);
        // Without METRICS_KEY the route does not exist: like any unknown path.
        assert_eq!(access(None, "/metrics"), Access::Proxy);
        // Unmatched paths need a credential, whatever they look like.
        assert_eq!(access(None, "/user/../admin"), Access::Proxy);
        assert_eq!(access(None, "/admin/nope"), Access::Admin);
        assert_eq!(access(None, "/health/x"), Access::Proxy);
        assert_eq!(
            unauthenticated_routes().collect::<Vec<_>>(),
            [
                "/health",
                "/",
                "/user",
                "/user/nickname",
                "/user/captcha",
                "/user/captcha/argon2.js",
                "/user/captcha/solver.js",
                "/user/captcha/challenge",
                "/user/captcha/verify",
                "/admin/login"
            ]
        );
    }
}
