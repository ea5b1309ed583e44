//! The upstream keys on `/admin`: `GET /admin/keys` lists every operator key by fingerprint
//! with its state, families and last check; `POST /admin/keys/recheck` (optionally
//! `?provider=openai`) asks the key checkers to check every key again now. No key ever
//! appears in full: the pool only hands out fingerprints.

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::api::Admin;
use crate::app::AppState;
use crate::error::AdminError;
use crate::providers::Provider;

/// Every provider, with the name used in `?provider=` and in the listing.
const PROVIDERS: &[Provider] = &Provider::ALL;

/// The `/admin/keys` routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin/keys", get(list_keys))
        .route("/admin/keys/recheck", post(recheck))
}

/// What the admin pages show for a pool: the provider's name, and which of AWS's two pools
/// (Claude, Mistral) it is, since both come from `AWS_CREDENTIALS`.
pub fn pool_label(p: Provider) -> &'static str {
    match p {
        Provider::Aws => "aws (Claude)",
        Provider::AwsMistral => "aws (Mistral)",
        other => other.service_name(),
    }
}

/// Every provider that has keys, in the listing's order.
pub fn providers_with_keys(state: &AppState) -> Vec<Provider> {
    PROVIDERS
        .iter()
        .copied()
        .filter(|p| !state.upstreams.provider(*p).keys.is_empty())
        .collect()
}

/// Asks the checkers to check every key again (of the provider named `name`, or of all):
/// the action behind `POST /admin/keys/recheck` and the admin page's button. Returns the
/// providers asked; refuses when checks are off or the name is unknown.
pub fn request_recheck(
    state: &AppState,
    name: Option<&str>,
) -> Result<Vec<&'static str>, AdminError> {
    if !state.config.cli.check_keys {
        return Err(AdminError::new(
            StatusCode::CONFLICT,
            "Key checks are off (CHECK_KEYS=false); set CHECK_KEYS=true to check keys.",
        ));
    }
    let chosen: Vec<Provider> = match name {
        None | Some("") => PROVIDERS.to_vec(),
        Some(name) => {
            let p = PROVIDERS
                .iter()
                .find(|p| p.service_name() == name)
                .ok_or_else(|| {
                    let names: Vec<&str> = PROVIDERS.iter().map(|p| p.service_name()).collect();
                    AdminError::bad_request(format!(
                        "Unknown provider '{name}' in ?provider=; use one of: {}.",
                        names.join(", ")
                    ))
                })?;
            vec![*p]
        }
    };
    let mut rechecking = Vec::new();
    // AWS's Mistral pool is checked by the AWS checker, with the Claude pool.
    for p in chosen.into_iter().filter(|p| *p != Provider::AwsMistral) {
        let u = state.upstreams.provider(p);
        if !u.keys.is_empty() {
            u.keys.request_recheck();
            rechecking.push(p.service_name());
        }
    }
    Ok(rechecking)
}

/// `GET /admin/keys`: every provider that has keys, each key by fingerprint.
async fn list_keys(State(state): State<AppState>, _admin: Admin) -> Response {
    let providers: Vec<_> = PROVIDERS
        .iter()
        .map(|p| state.upstreams.provider(*p))
        .filter(|u| !u.keys.is_empty())
        .map(|u| {
            json!({
                "provider": u.provider.service_name(),
                "pool": pool_label(u.provider),
                "variable": u.keys.var(),
                "checked": state.config.cli.check_keys,
                "counts": u.keys.counts(),
                "keys": u.keys.views(),
            })
        })
        .collect();
    Json(json!({ "providers": providers })).into_response()
}

/// `POST /admin/keys/recheck[?provider=NAME]`: asks the checkers to check every key again.
async fn recheck(
    State(state): State<AppState>,
    Admin(id): Admin,
    RawQuery(query): RawQuery,
) -> Result<Response, AdminError> {
    let provider = query.as_deref().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "provider")
            .map(|(_, v)| v.into_owned())
    });
    let rechecking = request_recheck(&state, provider.as_deref())?;
    tracing::info!(admin = id.who(), providers = ?rechecking, "asked for a key recheck");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "rechecking": rechecking })),
    )
        .into_response())
}
